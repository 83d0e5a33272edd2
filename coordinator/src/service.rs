//! A coordinator replica: answers Raft RPCs, node and CLI requests, and runs the upgrade driver.
//!
//! This is shell code: every decision is made by [`crate::upgrade`]; here requests are decoded,
//! proposed through Raft, and views are read from the replica's applied state.

use crate::raft::{self, raft_config, NetworkFactory, Raft, RaftReply, RaftRpc, RaftTiming, SharedDisk, Transport};
use crate::upgrade::{
    decision_view, next_command, next_deadline_ms, status, Applied, Command, UpgradeState, STATE_FORMAT_MAX,
};
use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use protocol::codec;
use protocol::messages::Ack;
use protocol::messages::{CliRequest, CliResponse, ClusterView, NodeRequest, NodeResponse, Request, Response};
use protocol::{Epoch, NodeName, ReplicaId};
use std::collections::{BTreeMap, BTreeSet};
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

/// Longest the leader holds a freeze's `Frozen` or `Drained` ack while it waits for the others
/// that would complete the freeze, so that they go into one log entry ([`Command::Acks`]) instead
/// of one round each (openraft 0.9 keeps one batch in flight per follower). The ack that
/// completes the freeze is proposed at once, with those waiting.
pub const ACK_GATHER_MS: u64 = 2;

/// Longest a membership change may take (a learner catching up, then two joint commits).
pub const MEMBERSHIP_TIMEOUT_MS: u64 = 30_000;

fn membership_refused(detail: &str) -> CliResponse {
    CliResponse::Rejected(protocol::messages::Rejection {
        kind: protocol::messages::RejectKind::Membership,
        detail: detail.to_string(),
    })
}

/// A membership change openraft refused or could not finish: not the leader (it forwards), or
/// refused (its reason), or not known to have happened.
fn membership_error<E: std::fmt::Display>(e: RaftError<u64, E>) -> CliResponse {
    match e {
        RaftError::APIError(e) => membership_refused(&e.to_string()),
        RaftError::Fatal(e) => CliResponse::Unknown { reason: e.to_string() },
    }
}

/// What a node is told of its proposal.
fn node_response(proposed: Proposed) -> NodeResponse {
    match proposed {
        Proposed::Applied(Applied::Rejected(rejection)) => NodeResponse::Rejected(rejection),
        Proposed::Applied(_) => NodeResponse::Accepted,
        Proposed::NotLeader(leader) => NodeResponse::NotLeader { leader },
        Proposed::Unknown(reason) => NodeResponse::Unknown { reason },
    }
}

/// The answer of a held ack whose proposer went away before it knew the outcome.
fn lost_answer() -> NodeResponse {
    NodeResponse::Unknown { reason: "the proposal of a batch of acks was abandoned".to_string() }
}

/// Who may ask what, by the name in the caller's certificate: Raft RPCs only from a replica of
/// the group, CLI requests only from the operator, a node's requests only from that node (no
/// process speaks for another). `Err` says why, for the caller and the log.
pub fn authorize(
    caller: &str,
    coordinators: &BTreeSet<String>,
    operator: &str,
    request: &Request,
) -> Result<(), String> {
    match request {
        Request::Raft(_) if !coordinators.contains(caller) => {
            Err(format!("`{caller}` is not a coordinator replica: Raft traffic refused"))
        }
        Request::Cli(_) if caller != operator => {
            Err(format!("`{caller}` is not the operator: CLI requests need the `{operator}` certificate"))
        }
        Request::Node(r) if r.node().0 != caller => {
            Err(format!("`{caller}` sent a request as `{}`: a node speaks only for itself", r.node()))
        }
        Request::Node(_) if coordinators.contains(caller) || caller == operator => {
            Err(format!("`{caller}` is not a node"))
        }
        _ => Ok(()),
    }
}

/// One running coordinator replica.
#[derive(Clone)]
pub struct Replica {
    pub id: ReplicaId,
    pub raft: Raft,
    disk: SharedDisk,
    applied: watch::Receiver<u64>,
    clock: Clock,
    /// How long the last freeze this replica decided as leader took, from the freeze applied to
    /// its outcome applied (µs; metrics and the cluster benchmark).
    last_decision_us: Arc<std::sync::atomic::AtomicU64>,
    /// Held through a membership change: one at a time (concurrent changes can leave openraft
    /// stuck in a joint configuration).
    membership: Arc<tokio::sync::Mutex<()>>,
    /// Freeze acks held to be proposed together, by epoch (see [`ACK_GATHER_MS`]).
    gathered: Arc<std::sync::Mutex<BTreeMap<Epoch, Vec<GatheredAck>>>>,
    /// Started as a replica of a group rebuilt from nothing ([`Replica::set_rebuilt`]).
    rebuilt: Arc<std::sync::atomic::AtomicBool>,
}

/// An ack held by the leader, and where its answer goes.
struct GatheredAck {
    node: NodeName,
    ack: Ack,
    answer: tokio::sync::oneshot::Sender<NodeResponse>,
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
        Ok(Replica {
            id,
            raft,
            disk,
            applied,
            clock,
            last_decision_us: Arc::default(),
            membership: Arc::default(),
            gathered: Arc::default(),
            rebuilt: Arc::default(),
        })
    }

    /// Marks this replica as one of a group rebuilt from nothing (`imago coordinator --rebuilt`):
    /// while its state is pristine, it refuses every command but `Recover` and, leading,
    /// proposes [`Command::AwaitRecovery`] first, after which the state itself refuses them (so
    /// a replica started without the flag cannot take them either). Harmless on a state that
    /// has anything of its own.
    pub fn set_rebuilt(&self) {
        self.rebuilt.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A rebuilt group's replica whose state is not marked yet refuses `command` (unless it
    /// recovers): the answer ([`UpgradeState::refused_before_the_mark`]).
    fn refused_before_recovery(&self, command: &Command) -> Option<protocol::messages::Rejection> {
        if !self.rebuilt.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        self.read(|state| state.refused_before_the_mark(command))
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
            NodeRequest::Ack { node, epoch, ack: ack @ (Ack::Frozen | Ack::Drained { .. }) }
                if self.is_leader() && self.read(|state| state.acks_awaited(epoch)) =>
            {
                return self.gather_ack(node, epoch, ack).await;
            }
            NodeRequest::Ack { node, epoch, ack } => Command::Ack { node, epoch, ack },
            NodeRequest::Recover { node, duties, known_version, known_upgrade, disk } => {
                Command::Recovered { node, duties, known_version, known_upgrade, disk }
            }
        };
        if let Some(rejection) = self.refused_before_recovery(&command) {
            return NodeResponse::Rejected(rejection);
        }
        node_response(self.propose(command).await)
    }

    /// Holds a freeze ack until the acks held with it complete the freeze (then proposes them
    /// all at once) or [`ACK_GATHER_MS`] pass (then proposes what is held). Every ack gets the
    /// answer to its own part; a batch not known to be committed is unknown for each.
    async fn gather_ack(&self, node: NodeName, epoch: Epoch, ack: Ack) -> NodeResponse {
        let (answer, mut answered) = tokio::sync::oneshot::channel();
        let complete = {
            let mut gathered = self.gathered.lock().unwrap_or_else(|p| p.into_inner());
            // Acks of earlier freezes left by callers that went away are never proposed now
            // (those freezes are decided); their waiters, if any, hear "unknown".
            gathered.retain(|e, _| *e >= epoch);
            let held = gathered.entry(epoch).or_default();
            held.push(GatheredAck { node, ack, answer });
            let nodes: BTreeSet<&NodeName> = held.iter().map(|g| &g.node).collect();
            self.read(|state| state.acks_complete(epoch, &nodes))
        };
        if !complete {
            if let Ok(answer) = tokio::time::timeout(Duration::from_millis(ACK_GATHER_MS), &mut answered).await {
                return answer.unwrap_or_else(|_| lost_answer());
            }
        }
        self.propose_gathered(epoch).await;
        answered.await.unwrap_or_else(|_| lost_answer())
    }

    /// Proposes the acks held for `epoch` (none if another caller took them) and answers each.
    async fn propose_gathered(&self, epoch: Epoch) {
        let held = self.gathered.lock().unwrap_or_else(|p| p.into_inner()).remove(&epoch).unwrap_or_default();
        let answers = match held.as_slice() {
            [] => return,
            [one] => vec![node_response(
                self.propose(Command::Ack { node: one.node.clone(), epoch, ack: one.ack.clone() }).await,
            )],
            many => {
                let acks = many.iter().map(|g| (g.node.clone(), g.ack.clone())).collect();
                match self.propose(Command::Acks { epoch, acks }).await {
                    Proposed::Applied(Applied::Each(each)) if each.len() == many.len() => {
                        each.into_iter().map(|a| node_response(Proposed::Applied(a))).collect()
                    }
                    Proposed::Applied(other) => {
                        vec![
                            NodeResponse::Unknown { reason: format!("a batch of acks answered {other:?}") };
                            many.len()
                        ]
                    }
                    proposed => vec![node_response(proposed); many.len()],
                }
            }
        };
        for (gathered, answer) in held.into_iter().zip(answers) {
            let _ = gathered.answer.send(answer);
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
        // A group rebuilt from nothing: its versions are below what the node saw, so waiting for
        // a newer one would park the watch until it times out. A node that has not seen the
        // recovering view yet gets it at once (it must tell the group its disk).
        let view = self.read(|state| decision_view(state, state.version, node));
        if view.recovering && view.digest() != known_digest {
            return NodeResponse::View(view);
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
            // The leader's view is the freshest: a follower that knows another leader sends the
            // operator there; with no leader known, this replica's own view is the best there is.
            CliRequest::Status => {
                let leader = self.raft.metrics().borrow().current_leader;
                return match leader {
                    Some(l) if l != self.id => CliResponse::NotLeader { leader: Some(l) },
                    _ => CliResponse::Status(self.read(status)),
                };
            }
            CliRequest::Cluster => return CliResponse::Cluster(self.cluster_view()),
            // The leader checks its own build; the CLI has asked every replica first.
            CliRequest::RaiseFormat { to } if to > STATE_FORMAT_MAX.0 => {
                return CliResponse::Rejected(protocol::messages::Rejection {
                    kind: protocol::messages::RejectKind::BadCommand,
                    detail: format!(
                        "replica {} reads up to format {}: upgrade it before raising the format to {to}",
                        self.id, STATE_FORMAT_MAX.0
                    ),
                })
            }
            CliRequest::RaiseFormat { to } => Command::RaiseFormat { to },
            CliRequest::AddReplica { id, address } => return self.add_replica(id, address).await,
            CliRequest::RemoveReplica { id } => return self.remove_replica(id).await,
            CliRequest::Start { plan, token } => Command::Start { plan, token },
            CliRequest::Switch => Command::RequestSwitch,
            CliRequest::Abort { reason } => Command::OperatorAbort { reason, now_ms: (self.clock)() },
            CliRequest::Join { node } => Command::Join { node },
            CliRequest::Retire { node, force } => Command::Retire { node, force },
            CliRequest::Recover { expected, lost, abort_unknown_freeze } => {
                Command::Recover { expected, lost, abort_unknown_freeze }
            }
        };
        if let Some(rejection) = self.refused_before_recovery(&command) {
            return CliResponse::Rejected(rejection);
        }
        match self.propose(command).await {
            Proposed::Applied(Applied::Started(upgrade)) => CliResponse::Started { upgrade },
            Proposed::Applied(Applied::Accepted) => CliResponse::Accepted,
            Proposed::Applied(Applied::Rejected(rejection)) => CliResponse::Rejected(rejection),
            Proposed::Applied(Applied::Each(_)) => {
                CliResponse::Unknown { reason: "a batch answer to one command".into() }
            }
            Proposed::NotLeader(leader) => CliResponse::NotLeader { leader },
            Proposed::Unknown(reason) => CliResponse::Unknown { reason },
        }
    }

    /// Adds replica `id` (a learner until it has caught up, then a voter). Leader only; one
    /// membership change at a time.
    async fn add_replica(&self, id: ReplicaId, address: String) -> CliResponse {
        let Some(_one) = self.membership_turn() else {
            return membership_refused("another membership change is in progress");
        };
        if let Some(answer) = self.not_leader() {
            return answer;
        }
        let voters: BTreeSet<u64> = self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        if voters.contains(&id) {
            return membership_refused(&format!("replica {id} is already a member"));
        }
        let learner = self.raft.add_learner(id, BasicNode::new(address), true);
        match tokio::time::timeout(Duration::from_millis(MEMBERSHIP_TIMEOUT_MS), learner).await {
            Err(_) => {
                return CliResponse::Unknown {
                    reason: format!("replica {id} did not catch up within {MEMBERSHIP_TIMEOUT_MS} ms"),
                }
            }
            Ok(Err(e)) => return membership_error(e),
            Ok(Ok(_)) => {}
        }
        let mut next = voters;
        next.insert(id);
        self.change_voters(next).await
    }

    /// Takes replica `id` out of the group. Leader only; one membership change at a time.
    async fn remove_replica(&self, id: ReplicaId) -> CliResponse {
        let Some(_one) = self.membership_turn() else {
            return membership_refused("another membership change is in progress");
        };
        if let Some(answer) = self.not_leader() {
            return answer;
        }
        let mut voters: BTreeSet<u64> =
            self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        if !voters.remove(&id) {
            return membership_refused(&format!("replica {id} is not a member"));
        }
        if voters.is_empty() {
            return membership_refused("the last replica cannot be removed");
        }
        self.change_voters(voters).await
    }

    fn membership_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.membership.try_lock().ok()
    }

    fn not_leader(&self) -> Option<CliResponse> {
        let leader = self.raft.metrics().borrow().current_leader;
        (leader != Some(self.id)).then_some(CliResponse::NotLeader { leader })
    }

    async fn change_voters(&self, voters: BTreeSet<u64>) -> CliResponse {
        let change = self.raft.change_membership(voters, false);
        match tokio::time::timeout(Duration::from_millis(MEMBERSHIP_TIMEOUT_MS), change).await {
            Err(_) => CliResponse::Unknown {
                reason: format!("the membership change did not commit within {MEMBERSHIP_TIMEOUT_MS} ms"),
            },
            Ok(Err(e)) => membership_error(e),
            Ok(Ok(_)) => CliResponse::Accepted,
        }
    }

    /// How long the last freeze this replica decided as leader took (ms), 0 if none.
    pub fn last_decision_us(&self) -> u64 {
        self.last_decision_us.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The coordinator group as this replica sees it.
    pub fn cluster_view(&self) -> ClusterView {
        let metrics = self.raft.metrics().borrow().clone();
        let (generation, roster) =
            self.read(|s| (s.generation, s.roster.iter().map(|(n, r)| (n.clone(), *r)).collect()));
        ClusterView {
            replica: self.id,
            leader: metrics.current_leader,
            term: metrics.current_term,
            members: metrics.membership_config.membership().voter_ids().collect(),
            applied_index: metrics.last_applied.map(|l| l.index),
            generation,
            roster,
            // The process that serves the replica fills this in (it sees each caller).
            last_contact_ms_ago: Vec::new(),
            format: self.read(|s| s.format.0),
            format_readable: STATE_FORMAT_MAX.0,
        }
    }

    /// The upgrade driver: while this replica leads, proposes what [`next_command`] says. It
    /// reacts to events, not to a tick: it looks again when the applied state or the leadership
    /// changes (openraft's metrics), when the state's own deadline comes ([`next_deadline_ms`]),
    /// or after `DRIVER_RETRY_MS` when a proposal did not take effect. Runs until dropped.
    pub async fn run_driver(&self) {
        let mut metrics = self.raft.metrics();
        // The freeze this replica saw applied while leading, and when (an observation for the
        // core: a freeze is given up no sooner than its timeout after its leader first saw it),
        // with the instant (the decision's latency, finer than the cluster clock's ms).
        let mut freeze_seen: Option<(protocol::Epoch, u64)> = None;
        let mut freeze_seen_at = tokio::time::Instant::now();
        let mut logged_phase = None;
        loop {
            let now_ms = (self.clock)();
            let leading = metrics.borrow().current_leader == Some(self.id);
            let freezing = self.read(|state| {
                state.current.as_ref().filter(|u| u.phase == protocol::messages::Phase::Freezing).map(|u| u.epoch)
            });
            // The log follows the upgrade as the leader sees it: one line per phase change.
            let now_phase = self.read(|state| state.current.as_ref().map(|u| (u.id, u.phase, u.epoch)));
            // What the driver logs and proposes runs in the span of the upgrade and its epoch.
            let span = match now_phase {
                Some((upgrade, _, epoch)) => tracing::info_span!("upgrade", id = upgrade.0, epoch = epoch.0),
                None => tracing::Span::none(),
            };
            if leading && now_phase != logged_phase {
                if let Some((_, phase, _)) = now_phase {
                    span.in_scope(|| tracing::info!(replica = self.id, ?phase, "upgrade phase"));
                }
                logged_phase = now_phase;
            }
            // A freeze this replica saw applied while leading, now decided: how long it took,
            // from the freeze applied to its outcome applied (the switch decision's latency).
            if let (None, Some((e, _))) = (freezing, freeze_seen) {
                if leading && self.read(|state| state.outcomes.contains_key(&e)) {
                    let took_us = u64::try_from(freeze_seen_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                    self.last_decision_us.store(took_us, std::sync::atomic::Ordering::Relaxed);
                    let ms = took_us as f64 / 1000.0;
                    span.in_scope(|| tracing::info!(replica = self.id, epoch = e.0, ms, "freeze decided"));
                }
            }
            freeze_seen = match (freezing, freeze_seen) {
                (Some(e), Some((seen, at))) if leading && seen == e => Some((seen, at)),
                (Some(e), _) if leading => {
                    freeze_seen_at = tokio::time::Instant::now();
                    Some((e, now_ms))
                }
                _ => None,
            };
            let seen_ms = freeze_seen.map(|(_, at)| at);
            let rebuilt = self.rebuilt.load(std::sync::atomic::Ordering::Relaxed);
            let (command, deadline_ms) = if leading && rebuilt && self.read(UpgradeState::awaits_recovery_mark) {
                (Some(Command::AwaitRecovery), None)
            } else if leading {
                self.read(|state| (next_command(state, now_ms, seen_ms), next_deadline_ms(state, now_ms, seen_ms)))
            } else {
                (None, None)
            };
            let wait_ms = match command {
                Some(command) => {
                    span.in_scope(|| tracing::debug!(replica = self.id, ?command, "driver proposes"));
                    match tracing::Instrument::instrument(self.propose(command), span.clone()).await {
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

#[cfg(test)]
mod tests {
    use super::authorize;
    use protocol::messages::{CliRequest, NodeRequest, Request};
    use protocol::NodeName;
    use std::collections::BTreeSet;

    #[test]
    fn each_caller_may_send_only_its_own_kind_of_request() {
        let coordinators: BTreeSet<String> = ["coord-1".to_string(), "coord-2".to_string()].into();
        let watch = |node: &str| {
            Request::Node(NodeRequest::Watch {
                node: NodeName(node.into()),
                known_version: 0,
                known_digest: 0,
                linearizable: false,
                wait_ms: 0,
            })
        };
        let ok = |caller: &str, r: &Request| authorize(caller, &coordinators, "operator", r).is_ok();
        assert!(ok("coord-2", &Request::Raft(vec![])));
        assert!(!ok("router-1", &Request::Raft(vec![])));
        assert!(!ok("operator", &Request::Raft(vec![])));
        assert!(ok("operator", &Request::Cli(CliRequest::Status)));
        assert!(!ok("router-1", &Request::Cli(CliRequest::Status)));
        assert!(!ok("coord-1", &Request::Cli(CliRequest::Switch)));
        assert!(ok("router-1", &watch("router-1")));
        assert!(!ok("router-1", &watch("router-2")), "a node speaking for another");
        assert!(!ok("operator", &watch("operator")));
        assert!(!ok("coord-1", &watch("coord-1")));
    }
}
