//! The durable state store: an embedded transactional database (redb) under `state_dir`.
//!
//! Every write commits (fsync) before it returns, so a transition is on disk before the API
//! acknowledges it. Values are JSON so a record can be read by hand in an emergency and a
//! corrupt one is reported with its key instead of poisoning the whole load.
// redb's error type is large by design; store calls are not on a hot error path.
#![allow(clippy::result_large_err)]

use crate::model::{CheckpointRecord, InstanceRecord, PoolSizingRecord};
use anvil_core::template::TemplateRecord;
use redb::{Database, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("checkpoints");
const TEMPLATES: TableDefinition<&str, &[u8]> = TableDefinition::new("templates");
const POOL_SIZING: TableDefinition<&str, &[u8]> = TableDefinition::new("pool_sizing");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {message}")]
    Db { path: PathBuf, message: String },
    #[error("state store record {table}/{key} could not be encoded: {source}")]
    Encode {
        table: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A record that failed to decode on load: reported, skipped, never silently dropped.
#[derive(Debug, Clone)]
pub struct CorruptRecord {
    pub table: &'static str,
    pub key: String,
    pub error: String,
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

/// Everything loaded at start.
#[derive(Default)]
pub struct Loaded {
    pub instances: Vec<InstanceRecord>,
    pub checkpoints: Vec<CheckpointRecord>,
    pub templates: Vec<TemplateRecord>,
    pub pool_sizing: Vec<PoolSizingRecord>,
    pub corrupt: Vec<CorruptRecord>,
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let path = state_dir.join("anvil.redb");
        // redb asserts (panics) on some damaged files, e.g. one truncated below its recorded
        // layout; report that like any other open error instead of crashing.
        let opened = std::panic::catch_unwind(|| Database::create(&path)).map_err(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown failure".into());
            StoreError::Db {
                path: path.clone(),
                message: format!(
                    "the file is damaged (truncated or corrupt: {what}); restore it from a backup, or move it aside to start with an empty store (the sandboxes it recorded are then not adopted)"
                ),
            }
        })?;
        let db = opened.map_err(|e| StoreError::Db {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let store = Store { db, path };
        // Create the tables so readers never meet a missing one.
        store.write(|txn| {
            txn.open_table(INSTANCES)?;
            txn.open_table(CHECKPOINTS)?;
            txn.open_table(TEMPLATES)?;
            txn.open_table(POOL_SIZING)?;
            Ok(())
        })?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        f(&txn).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &'static str,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = encode(name, key, value)?;
        self.write(|txn| {
            txn.open_table(table)?.insert(key, bytes.as_slice())?;
            Ok(())
        })
    }

    fn delete(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(table)?.remove(key)?;
            Ok(())
        })
    }

    pub fn put_instance(&self, rec: &InstanceRecord) -> Result<(), StoreError> {
        self.put(INSTANCES, "instances", &rec.instance.id, rec)
    }

    /// Writes several instance records in one transaction (a reset that swaps runtimes
    /// between two instances must never be stored half-done).
    pub fn put_instances(&self, recs: &[&InstanceRecord]) -> Result<(), StoreError> {
        let mut encoded = Vec::with_capacity(recs.len());
        for rec in recs {
            let id = rec.instance.id.as_str();
            encoded.push((id, encode("instances", id, rec)?));
        }
        self.write(|txn| {
            let mut t = txn.open_table(INSTANCES)?;
            for (id, bytes) in &encoded {
                t.insert(*id, bytes.as_slice())?;
            }
            Ok(())
        })
    }

    /// Replaces the record stored under `old_id` by `rec` (a warm instance claimed under a
    /// client-chosen id) in one transaction.
    pub fn rename_instance(&self, old_id: &str, rec: &InstanceRecord) -> Result<(), StoreError> {
        let bytes = encode("instances", &rec.instance.id, rec)?;
        self.write(|txn| {
            let mut t = txn.open_table(INSTANCES)?;
            t.remove(old_id)?;
            t.insert(rec.instance.id.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    pub fn delete_instance(&self, id: &str) -> Result<(), StoreError> {
        self.delete(INSTANCES, id)
    }

    pub fn put_checkpoint(&self, rec: &CheckpointRecord) -> Result<(), StoreError> {
        self.put(
            CHECKPOINTS,
            "checkpoints",
            &rec.checkpoint.checkpoint_id,
            rec,
        )
    }

    pub fn delete_checkpoint(&self, id: &str) -> Result<(), StoreError> {
        self.delete(CHECKPOINTS, id)
    }

    pub fn put_template(&self, rec: &TemplateRecord) -> Result<(), StoreError> {
        self.put(TEMPLATES, "templates", &rec.id, rec)
    }

    pub fn delete_template(&self, id: &str) -> Result<(), StoreError> {
        self.delete(TEMPLATES, id)
    }

    pub fn put_pool_sizing(&self, rec: &PoolSizingRecord) -> Result<(), StoreError> {
        self.put(
            POOL_SIZING,
            "pool_sizing",
            &format!("{}/{}", rec.backend, rec.workload_class),
            rec,
        )
    }

    /// Loads every table. Records that do not decode are returned in `corrupt`.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut out = Loaded::default();
        out.instances = self.load_table(&txn, INSTANCES, "instances", &mut out.corrupt)?;
        out.checkpoints = self.load_table(&txn, CHECKPOINTS, "checkpoints", &mut out.corrupt)?;
        out.templates = self.load_table(&txn, TEMPLATES, "templates", &mut out.corrupt)?;
        out.pool_sizing = self.load_table(&txn, POOL_SIZING, "pool_sizing", &mut out.corrupt)?;
        Ok(out)
    }

    fn load_table<T: DeserializeOwned>(
        &self,
        txn: &redb::ReadTransaction,
        table: TableDefinition<&str, &[u8]>,
        name: &'static str,
        corrupt: &mut Vec<CorruptRecord>,
    ) -> Result<Vec<T>, StoreError> {
        let t = txn.open_table(table).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            match serde_json::from_slice::<T>(v.value()) {
                Ok(rec) => out.push(rec),
                Err(e) => corrupt.push(CorruptRecord {
                    table: name,
                    key: k.value().to_string(),
                    error: e.to_string(),
                }),
            }
        }
        Ok(out)
    }

    /// Removes a corrupt record after it has been reported (so it is reported once).
    pub fn drop_corrupt(&self, rec: &CorruptRecord) -> Result<(), StoreError> {
        let table = match rec.table {
            "instances" => INSTANCES,
            "checkpoints" => CHECKPOINTS,
            "templates" => TEMPLATES,
            _ => POOL_SIZING,
        };
        self.delete(table, &rec.key)
    }
}

/// A record as stored (JSON), or an error naming its table and key.
fn encode<T: Serialize>(table: &'static str, key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        table,
        key: key.to_string(),
        source,
    })
}
