//! bubblewrap backend.
