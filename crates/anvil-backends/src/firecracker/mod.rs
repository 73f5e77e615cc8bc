//! Firecracker backend.
