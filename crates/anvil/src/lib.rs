//! The anvil daemon: HTTP API, manager, store, pools, metrics, CLI.

pub mod api;
pub mod client;
pub mod doctor;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod policies;
pub mod sdnotify;
pub mod server;
pub mod store;
pub mod templates;
pub mod tls;
pub mod util;

use anvil_core::config::Config;
use std::path::Path;

/// Reads and validates a config file; the error names the file and the key.
pub fn load_config(path: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    let abs = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Config::from_toml(&text, &abs).map_err(|e| e.to_string())
}
