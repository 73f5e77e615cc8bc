//! Mount helpers (overlay, unmount).
