//! openraft glue: type config, seeded runtime, storage, network.

mod durable;
mod network;
mod runtime;
mod store;

pub use durable::{open_data_dir, DataDirError, FILE_NAME, FORMAT_VERSION};
pub use network::{raft_request, NetworkFactory, RaftReply, RaftRpc};
pub use openraft::BasicNode;
pub use protocol::transport::{Transport, TransportError};
pub use runtime::{seed_runtime_rng, SeededRuntime};
pub use store::{
    new_disk, new_disk_with, open, read_applied, read_disk, AppliedState, LogStore, RaftDisk, SharedDisk,
    StateMachineStore,
};

use crate::upgrade::{Applied, Command};
use std::io::Cursor;

openraft::declare_raft_types!(
    /// Raft types of the coordinator group.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = SeededRuntime,
);

/// A coordinator replica's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// Raft timing used by the coordinator (milliseconds).
///
/// openraft 0.9 uses the heartbeat interval as the AppendEntries timeout, so `heartbeat_ms` must
/// exceed the worst round trip between replicas (across datacenters: hundreds of ms).
#[derive(Clone, Copy, Debug)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot (and purge the log) every this many applied entries.
    pub snapshot_every_logs: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming { heartbeat_ms: 50, election_min_ms: 150, election_max_ms: 300, snapshot_every_logs: 500 }
    }
}

/// The openraft config for `timing`.
pub fn raft_config(timing: RaftTiming) -> openraft::Config {
    let config = openraft::Config {
        cluster_name: "imago".to_string(),
        heartbeat_interval: timing.heartbeat_ms,
        election_timeout_min: timing.election_min_ms,
        election_timeout_max: timing.election_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(timing.snapshot_every_logs),
        max_in_snapshot_log_to_keep: timing.snapshot_every_logs / 5,
        install_snapshot_timeout: 1_000,
        ..Default::default()
    };
    config.validate().expect("static raft config is valid")
}
