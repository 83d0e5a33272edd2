//! Wire and plan types shared by every Imago process.
//!
//! This crate knows no I/O: it defines identifiers, the upgrade plan (and its validation),
//! the schema transforms, the messages between nodes, the CLI and the coordinator, and the one
//! codec facade (bincode 2 behind length-prefixed frames).

pub mod cluster;
pub mod codec;
pub mod ids;
pub mod located;
pub mod messages;
pub mod plan;
pub mod schema;
pub mod transport;

pub use ids::{Decision, Duty, Epoch, Generation, NodeName, Position, ReplicaId, Universe, UpgradeId};
