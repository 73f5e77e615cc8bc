//! Decoding "fuzz" tests of the API request bodies (cargo-fuzz needs nightly): random and
//! mutated JSON into the request types directly, and into the running daemon's endpoints.
//! Nothing panics; the daemon answers every body with a JSON error naming what is wrong (or
//! a success), never a 500 or a dropped connection.
mod common;

use anvil::model::{
    CheckpointRequest, CreateRequest, ExecRequest, ResetRequest, RollbackRequest, SizingRequest,
    TemplateRequest, TtlRequest,
};
use common::*;
use proptest::prelude::*;
use serde_json::json;

fn seeds() -> Vec<Vec<u8>> {
    [
        json!({"workload_class": "mock-class", "labels": {"a": "b"}, "ttl_secs": 60, "env": {"K": "V"}, "id": "sb-fuzz"}),
        json!({"cmd": ["/bin/sh", "-c", "echo hi"], "env": {"A": "1"}, "cwd": "/", "stdin": "x", "timeout_ms": 1000}),
        json!({"stop": true}),
        json!({"return_to_pool": true}),
        json!({"checkpoint_id": "ck-0123456789abcdef"}),
        json!({"ttl_secs": 30}),
        json!({"min": 1, "target": 2, "max": 3, "enabled": true, "warm_ttl_secs": 60}),
        json!({"name": "t", "rootfs_dir": "/tmp/x"}),
    ]
    .iter()
    .map(|v| serde_json::to_vec(v).unwrap())
    .collect()
}

fn mutate(base: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut b = base.to_vec();
    for &(i, op, x) in edits {
        let len = b.len().max(1);
        match op % 4 {
            0 if !b.is_empty() => b[i % len] = x,
            1 => b.insert(i % (b.len() + 1), x),
            2 if !b.is_empty() => {
                b.remove(i % len);
            }
            3 => b.truncate(i % (b.len() + 1)),
            _ => {}
        }
    }
    b
}

fn byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        prop::sample::select(b"{}[]\":,0123456789-.eEtrufalsn \\/u".to_vec()),
        any::<u8>()
    ]
}

/// Every request type; errors must say something.
fn decode_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    macro_rules! try_type {
        ($t:ty) => {
            if let Err(e) = serde_json::from_slice::<$t>(bytes) {
                prop_assert!(!e.to_string().is_empty());
            }
        };
    }
    try_type!(CreateRequest);
    try_type!(ExecRequest);
    try_type!(CheckpointRequest);
    try_type!(ResetRequest);
    try_type!(RollbackRequest);
    try_type!(TtlRequest);
    try_type!(SizingRequest);
    try_type!(TemplateRequest);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn request_types_decode_without_panics(
        seed in 0usize..8,
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), byte()), 1..10),
    ) {
        decode_all(&mutate(&seeds()[seed], &edits))?;
    }

    #[test]
    fn random_bytes_decode_without_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        decode_all(&bytes)?;
    }
}

/// Mutated bodies against the real daemon's endpoints (mock backend).
#[test]
fn daemon_answers_every_mutated_body_cleanly() {
    let d = Daemon::start(Opts::default());
    let id = d.create(json!({"workload_class": "mock-class"}));
    let endpoints = [
        ("POST", "/v1/instances".to_string(), 0usize),
        ("POST", format!("/v1/instances/{id}/exec"), 1),
        ("POST", format!("/v1/instances/{id}/checkpoint"), 2),
        ("POST", format!("/v1/instances/{id}/reset"), 3),
        ("POST", format!("/v1/instances/{id}/rollback"), 4),
        ("POST", format!("/v1/instances/{id}/ttl"), 5),
        ("PUT", "/v1/pools/mock/mock-class/sizing".to_string(), 6),
        ("POST", "/v1/templates".to_string(), 7),
    ];
    let seeds = seeds();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let (ok, refused) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    let result = runner.run(
        &(
            0usize..8,
            prop::collection::vec((any::<usize>(), any::<u8>(), byte()), 1..8),
        ),
        |(which, edits)| {
            let (method, path, seed) = &endpoints[which];
            let body = mutate(&seeds[*seed], &edits);
            let r = d
                .try_request(
                    method,
                    path,
                    Some(body.clone()),
                    &[("content-type", "application/json")],
                )
                .map_err(|e| {
                    TestCaseError::fail(format!("{method} {path}: connection failed: {e}"))
                })?;
            prop_assert!(
                r.status != 500,
                "{} {} with {:?} → 500: {}",
                method,
                path,
                String::from_utf8_lossy(&body),
                r.text()
            );
            if r.status >= 400 {
                let v: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| {
                    TestCaseError::fail(format!(
                        "{method} {path}: non-JSON error {}: {e}: {}",
                        r.status,
                        r.text()
                    ))
                })?;
                prop_assert!(v["error"].as_str().is_some_and(|s| !s.is_empty()), "{}", v);
                prop_assert!(v["code"].as_str().is_some_and(|s| !s.is_empty()), "{}", v);
                refused.set(refused.get() + 1);
            } else {
                ok.set(ok.get() + 1);
            }
            Ok(())
        },
    );
    eprintln!(
        "mutated bodies: {} accepted, {} refused with a JSON error",
        ok.get(),
        refused.get()
    );
    if let Err(e) = result {
        panic!("{e}\n{}", d.log());
    }
    assert_eq!(d.get("/v1/health").status, 200, "daemon still serving");
}
