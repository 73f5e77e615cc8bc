//! anvil-core: the domain of the anvil sandbox daemon.
//!
//! House rule: nothing in this crate touches sockets, `/proc`, `/sys`, processes or an async
//! runtime. Parsing functions take text; the daemon reads the files.

pub mod backend;
pub mod config;
pub mod hooks;
pub mod ids;
pub mod lifecycle;
pub mod policy;
pub mod pool;
pub mod quantity;
pub mod selector;
pub mod template;
mod tomlfile;
