//! A coordinator replica: answers Raft RPCs, node and CLI requests, and runs the upgrade driver.
//!
//! This is shell code: every decision is made by [`crate::upgrade`]; here requests are decoded,
//! proposed through Raft, and views are read from the replica's applied state.

use crate::raft::{self, raft_config, NetworkFactory, Raft, RaftReply, RaftRpc, RaftTiming, SharedDisk, Transport};
use crate::upgrade::{decision_view, next_command, next_deadline_ms, status, Applied, Command};
use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use protocol::codec;
use protocol::messages::{CliRequest, CliResponse, NodeRequest, NodeResponse, Request, Response};
use protocol::ReplicaId;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Milliseconds on the cluster's shared clock (wall clock in production, virtual in the sim).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Longest a proposal may wait for its commit before the caller is told to retry.
pub const PROPOSAL_TIMEOUT_MS: u64 = 2_000;
/// Longest a watch may be parked.
pub const WATCH_WAIT_MAX_MS: u32 = 5_000;
/// How long the driver waits after a proposal that did not take effect (unless something
/// changes first).
pub const DRIVER_RETRY_MS: u64 = 20;

/// One running coordinator replica.
#[derive(Clone)]
pub struct Replica {
    pub id: ReplicaId,
    pub raft: Raft,
    disk: SharedDisk,
    applied: watch::Receiver<u64>,
    clock: Clock,
}

/// Outcome of proposing a command.
enum Proposed {
    Applied(Applied),
    NotLeader(Option<ReplicaId>),
    /// Not known to be committed (timed out, or the replica failed while waiting): it may still
    /// be applied. Reported as unknown, never as refused.
    Unknown(String),
}

impl Replica {
    /// Starts a replica on `disk` (fresh or kept from an earlier incarnation). With
    /// `initialize`, a fresh cluster of `members` is initialized from this replica.
    pub async fn start<T: Transport>(
        id: ReplicaId,
        members: &[ReplicaId],
        disk: SharedDisk,
        transport: T,
        timing: RaftTiming,
        clock: Clock,
        initialize: bool,
    ) -> Result<Replica, String> {
        let (log, state_machine, applied) = raft::open(&disk);
        let config = Arc::new(raft_config(timing));
        let raft = Raft::new(id, config, NetworkFactory { transport }, log, state_machine)
            .await
            .map_err(|e| format!("raft start: {e}"))?;
        if initialize {
            let nodes: BTreeMap<u64, BasicNode> = members.iter().map(|m| (*m, BasicNode::default())).collect();
            // Already-initialized is fine: a restarted initializer keeps its log.
            let _ = raft.initialize(nodes).await;
        }
        Ok(Replica { id, raft, disk, applied, clock })
    }

    /// Stops this incarnation (its disk stays).
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }

    /// This replica's disk (tests and counters read it).
    pub fn disk(&self) -> SharedDisk {
        self.disk.clone()
    }

    /// The view version of this replica's applied state.
    pub fn applied_version(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Reads this replica's applied state.
    pub fn read<T>(&self, f: impl FnOnce(&crate::upgrade::UpgradeState) -> T) -> T {
        raft::read_applied(&self.disk, |a| f(&a.state))
    }

    /// Whether this replica believes it leads.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Answers one request (any kind). Never panics on bad input.
    pub async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Raft(bytes) => Response::Raft(self.handle_raft(&bytes).await),
            Request::Node(request) => Response::Node(self.handle_node(request).await),
            Request::Cli(request) => Response::Cli(self.handle_cli(request).await),
        }
    }

    async fn handle_raft(&self, bytes: &[u8]) -> Vec<u8> {
        let reply = match codec::decode::<RaftRpc>(bytes) {
            Err(e) => RaftReply::Error(format!("bad raft rpc: {e}")),
            Ok(RaftRpc::AppendEntries(rpc)) => match self.raft.append_entries(rpc).await {
                Ok(r) => RaftReply::AppendEntries(r),
                Err(e) => RaftReply::Error(e.to_string()),
            },
            Ok(RaftRpc::Vote(rpc)) => match self.raft.vote(rpc).await {
                Ok(r) => RaftReply::Vote(r),
                Err(e) => RaftReply::Error(e.to_string()),
            },
            Ok(RaftRpc::InstallSnapshot(rpc)) => match self.raft.install_snapshot(rpc).await {
                Ok(r) => RaftReply::InstallSnapshot(r),
                Err(e) => RaftReply::Error(e.to_string()),
            },
        };
        codec::encode(&reply).unwrap_or_else(|e| codec::encode(&RaftReply::Error(e.to_string())).unwrap_or_default())
    }

    async fn propose(&self, command: Command) -> Proposed {
        let write = self.raft.client_write(command);
        match tokio::time::timeout(Duration::from_millis(PROPOSAL_TIMEOUT_MS), write).await {
            Err(_) => Proposed::Unknown(format!("not committed within {PROPOSAL_TIMEOUT_MS} ms")),
            Ok(Ok(response)) => Proposed::Applied(response.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Proposed::NotLeader(f.leader_id),
            Ok(Err(e)) => Proposed::Unknown(e.to_string()),
        }
    }

    async fn handle_node(&self, request: NodeRequest) -> NodeResponse {
        let command = match request {
            NodeRequest::Watch { node, known_version, known_digest, linearizable, wait_ms } => {
                return self.watch(&node, (known_version, known_digest), linearizable, wait_ms).await;
            }
            NodeRequest::Register { node, duties, deployed, upgrade } => {
                Command::Register { node, duties, deployed, upgrade }
            }
            NodeRequest::Report { node, report, upgrade } => Command::Report { node, report, upgrade },
            NodeRequest::Ack { node, epoch, ack } => Command::Ack { node, epoch, ack },
        };
        match self.propose(command).await {
            Proposed::Applied(Applied::Rejected(rejection)) => NodeResponse::Rejected(rejection),
            Proposed::Applied(_) => NodeResponse::Accepted,
            Proposed::NotLeader(leader) => NodeResponse::NotLeader { leader },
            Proposed::Unknown(reason) => NodeResponse::Unknown { reason },
        }
    }

    async fn watch(
        &self,
        node: &protocol::NodeName,
        (known, known_digest): (u64, u64),
        linearizable: bool,
        wait_ms: u32,
    ) -> NodeResponse {
        if linearizable {
            let read = self.raft.ensure_linearizable();
            match tokio::time::timeout(Duration::from_millis(PROPOSAL_TIMEOUT_MS), read).await {
                Err(_) => return NodeResponse::Unknown { reason: "linearizable read timed out".to_string() },
                Ok(Err(e)) => {
                    let leader = e.forward_to_leader().and_then(|f| f.leader_id);
                    return NodeResponse::NotLeader { leader };
                }
                Ok(Ok(_)) => {}
            }
        }
        let mut applied = self.applied.clone();
        let wait = Duration::from_millis(u64::from(wait_ms.min(WATCH_WAIT_MAX_MS)));
        let deadline = tokio::time::Instant::now() + wait;
        let mut known = known;
        loop {
            let woken = tokio::time::timeout_at(deadline, applied.wait_for(|v| *v > known)).await;
            let view = self.read(|state| decision_view(state, state.version, node));
            // News for this node, or time is up: answer. Another node's news: keep waiting.
            if !matches!(woken, Ok(Ok(_))) || known_digest == 0 || view.digest() != known_digest {
                return NodeResponse::View(view);
            }
            known = view.version;
        }
    }

    async fn handle_cli(&self, request: CliRequest) -> CliResponse {
        let command = match request {
            CliRequest::Status => return CliResponse::Status(self.read(status)),
            CliRequest::Start { plan, token } => Command::Start { plan, token },
            CliRequest::Switch => Command::RequestSwitch,
            CliRequest::Abort { reason } => Command::OperatorAbort { reason, now_ms: (self.clock)() },
            CliRequest::Join { node } => Command::Join { node },
            CliRequest::Retire { node, force } => Command::Retire { node, force },
        };
        match self.propose(command).await {
            Proposed::Applied(Applied::Started(upgrade)) => CliResponse::Started { upgrade },
            Proposed::Applied(Applied::Accepted) => CliResponse::Accepted,
            Proposed::Applied(Applied::Rejected(rejection)) => CliResponse::Rejected(rejection),
            Proposed::NotLeader(leader) => CliResponse::NotLeader { leader },
            Proposed::Unknown(reason) => CliResponse::Unknown { reason },
        }
    }

    /// The upgrade driver: while this replica leads, proposes what [`next_command`] says. It
    /// reacts to events, not to a tick: it looks again when the applied state or the leadership
    /// changes (openraft's metrics), when the state's own deadline comes ([`next_deadline_ms`]),
    /// or after `DRIVER_RETRY_MS` when a proposal did not take effect. Runs until dropped.
    pub async fn run_driver(&self) {
        let mut metrics = self.raft.metrics();
        // The freeze this replica saw applied while leading, and when (an observation for the
        // core: a freeze is given up no sooner than its timeout after its leader first saw it).
        let mut freeze_seen: Option<(protocol::Epoch, u64)> = None;
        loop {
            let now_ms = (self.clock)();
            let leading = metrics.borrow().current_leader == Some(self.id);
            let freezing = self.read(|state| {
                state.current.as_ref().filter(|u| u.phase == protocol::messages::Phase::Freezing).map(|u| u.epoch)
            });
            freeze_seen = match (freezing, freeze_seen) {
                (Some(e), Some((seen, at))) if leading && seen == e => Some((seen, at)),
                (Some(e), _) if leading => Some((e, now_ms)),
                _ => None,
            };
            let seen_ms = freeze_seen.map(|(_, at)| at);
            let (command, deadline_ms) = if leading {
                self.read(|state| (next_command(state, now_ms, seen_ms), next_deadline_ms(state, now_ms, seen_ms)))
            } else {
                (None, None)
            };
            let wait_ms = match command {
                Some(command) => {
                    tracing::debug!(replica = self.id, ?command, "driver proposes");
                    match self.propose(command).await {
                        // The state changed: look again at once.
                        Proposed::Applied(Applied::Accepted | Applied::Started(_)) => continue,
                        // Refused or not known: do not spin on the same proposal.
                        _ => Some(DRIVER_RETRY_MS),
                    }
                }
                None => deadline_ms.map(|d| d - now_ms),
            };
            match wait_ms {
                Some(ms) => {
                    let _ = tokio::time::timeout(Duration::from_millis(ms), metrics.changed()).await;
                }
                None => {
                    if metrics.changed().await.is_err() {
                        return; // the Raft instance is gone
                    }
                }
            }
        }
    }
}
