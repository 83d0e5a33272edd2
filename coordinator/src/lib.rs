//! The Imago coordinator: the replicated upgrade state machine and its Raft shell.
//!
//! - [`upgrade`] (the `imago-coordinator-core` crate): the pure state machine, the ready gate,
//!   the driver's next command, views.
//! - [`raft`]: openraft glue (type config, in-memory log and state machine storage, network
//!   over a [`raft::Transport`], the seeded async runtime).
//! - [`service`]: a replica's request handler (nodes, CLI, Raft RPCs) and the driver loop.

pub mod raft;
pub mod service;
/// The pure state machine lives in its own crate, `imago-coordinator-core`.
pub use coordinator_core as upgrade;
