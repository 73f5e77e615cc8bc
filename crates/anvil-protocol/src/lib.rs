//! Agent wire protocol.
