//! The raw mechanisms anvil is compared with, measured in the same run.

pub mod bwrap;
pub mod firecracker;
pub mod oci;
