//! anvil-core: the domain of the anvil sandbox daemon.
//!
//! House rule: nothing in this crate touches sockets, `/proc`, `/sys`, processes or an async
//! runtime. Parsing functions take text; the daemon reads the files.

pub mod backend;
pub mod lifecycle;
