//! The spawner registry: one backend per kind, built from probes at start.
