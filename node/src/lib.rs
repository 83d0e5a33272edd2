//! The Imago node runtime: the shells around the pure node cores of `imago-node-core`.
//!
//! The actix actors (one per composition core, generic over small I/O traits) live here; until
//! they land, this crate re-exports the cores so that shells have one place to import from.

pub use node_core::*;
