//! Messages between nodes, the CLI and coordinator replicas.
//!
//! Wire types avoid `#[serde(tag)]` and `skip_serializing_if`: the codec is not self-describing.

use crate::ids::{Decision, Duty, Epoch, Generation, NodeName, Position, ReplicaId, UpgradeId};
use crate::plan::Plan;
use serde::{Deserialize, Serialize};

/// Phase of an upgrade in the coordinator's replicated state (see docs/design.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Plan accepted; waiting for every node to register and report the new universe deployed.
    Staged,
    /// Capture, transform and validate run; the ready gate is evaluated.
    Syncing,
    /// `Freeze{epoch}` committed; waiting for every required ack.
    Freezing,
    /// `Commit{epoch}` committed; routers flip to the new universe.
    Switched,
    /// Every router acked the switch.
    Done,
    /// Out of attempts, or aborted by the operator; the old universe serves.
    RolledBack,
}

impl Phase {
    /// Whether the upgrade has ended (no decision can follow).
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Done | Phase::RolledBack)
    }
}

/// What a node last measured (capture/transform positions, validation counts).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Last position captured in the old universe.
    pub captured: Position,
    /// Last position applied to the new universe.
    pub applied: Position,
    /// Whether the bulk copy has finished.
    pub bulk_done: bool,
    /// Mirrored requests compared so far.
    pub samples: u64,
    /// Of those, how many differed.
    pub mismatches: u64,
    /// Rows the bulk copy in progress (or the last one) has copied, of how many its snapshot
    /// holds (0: not known).
    pub copied_rows: u64,
    pub copy_rows_total: u64,
    /// The transform's pace (data nodes).
    pub pace: Pace,
    /// The comparison of transform(old) with new by key range while traffic runs (data
    /// nodes).
    pub ranges: RangeCheck,
}

/// A data node's comparison of transform(old) with the new store, range of old keys by range,
/// while the old universe keeps serving: each range's old rows are read with the position they
/// show, converted by the new store once it has applied up to there, and compared with the
/// new rows they give.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeCheck {
    /// The plan's rows can be compared range by range (no merge, no escape hatch, no expression
    /// that reads a new table): otherwise everything is compared at the drain only.
    pub by_range: bool,
    /// Ranges the old tables are cut into (they split as they grow).
    pub ranges: u64,
    /// Ranges compared at least once since the copy, or left for the drain because they
    /// changed while being compared.
    pub attempted: u64,
    /// Ranges whose last comparison matched and whose old rows have not changed since: the
    /// drain compares only the others.
    pub clean: u64,
    /// Ranges whose last comparison found the universes different.
    pub differed: u64,
    /// Old rows compared so far.
    pub rows: u64,
    /// Row counts by new table, over the ranges compared, each as of its last comparison: what
    /// transform(old) gives, and what the new store holds of the same keys.
    pub tables: Vec<TableRows>,
}

/// One new table's rows in the ranges compared ([`RangeCheck::tables`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRows {
    pub table: String,
    /// Rows transform(old) gives.
    pub expected: u64,
    /// Rows of the same keys the new store holds.
    pub actual: u64,
}

/// A data node's transform pace, as an operator reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pace {
    /// How long the oldest captured change not yet applied has waited since the node saw it
    /// captured (0: none waits).
    pub lag_ms: u64,
    /// Changes applied per second, lately.
    pub changes_per_s: u64,
    /// Rows the bulk copy in progress (or the last one) copied per second.
    pub copy_rows_per_s: u64,
    /// Time the copy in progress needs yet at its pace, when it runs and its size is known.
    pub copy_eta_ms: Option<u64>,
}

/// Acknowledgement of a decision by a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ack {
    /// A router admits nothing to the old universe and has no request in flight there.
    Frozen,
    /// A data node fenced the old store at `final_position` and applied everything up to it;
    /// `checksum_match` says whether both universes then held the same (transformed) data.
    Drained { final_position: Position, checksum_match: bool },
    /// A router serves the new universe.
    Switched,
    /// A router asked to retire has persisted that it is retired and serves nothing (any epoch).
    Retired,
}

/// Where a router stands on the cluster's roster (the routers every freeze and switch need).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RosterStatus {
    /// Not on the roster (never joined, or not a router).
    #[default]
    NotOn,
    Active,
    /// Asked to retire: it must persist that, stop serving and ack `Retired`.
    Retiring,
    /// Retired (it acked, or the operator forced it): it serves nothing, ever.
    Retired,
}

/// Node → coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum NodeRequest {
    /// Registers for `upgrade` (the one the node's view names): a registration or report
    /// that arrives late, after another upgrade started, is refused, not taken for that one's.
    Register {
        node: NodeName,
        duties: Vec<Duty>,
        deployed: bool,
        upgrade: UpgradeId,
    },
    Report {
        node: NodeName,
        report: NodeReport,
        upgrade: UpgradeId,
    },
    Ack {
        node: NodeName,
        epoch: Epoch,
        ack: Ack,
    },
    /// Long poll: answered once the state's version exceeds `known_version` **and** the node's
    /// view says something new (its [`DecisionView::digest`] differs from `known_digest`; `0`:
    /// any change is news), or after `wait_ms`. A watcher is not woken by other nodes' news
    /// (each wake-up costs it a round trip with no watch parked, when the next decision may
    /// come). `linearizable` asks the replica to confirm leadership first (a restarted router
    /// does).
    Watch {
        node: NodeName,
        known_version: u64,
        known_digest: u64,
        linearizable: bool,
        wait_ms: u32,
    },
    /// While a rebuilt coordinator group recovers ([`DecisionView::recovering`]): what the
    /// node's own disk holds (`None`: nothing it can vouch for, a new or copied disk), its
    /// duties, and the highest state version and upgrade id it has seen (so the group's next
    /// versions and upgrades are newer: a node tells upgrades apart by their id).
    Recover {
        node: NodeName,
        duties: Vec<Duty>,
        known_version: u64,
        known_upgrade: u64,
        disk: Option<DiskSummary>,
    },
}

/// What a node's disk holds, as a recovering coordinator group learns it: the decision it
/// persisted, of an upgrade from `generation`, and where the generation it serves answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSummary {
    pub decision: Decision,
    pub generation: Generation,
    pub endpoints: Vec<String>,
}

impl NodeRequest {
    /// The node the request says it comes from (a server checks it against the caller's
    /// certificate).
    pub fn node(&self) -> &NodeName {
        match self {
            NodeRequest::Register { node, .. }
            | NodeRequest::Report { node, .. }
            | NodeRequest::Ack { node, .. }
            | NodeRequest::Watch { node, .. }
            | NodeRequest::Recover { node, .. } => node,
        }
    }
}

/// What one node needs to know of the upgrade, as read from a replica's applied state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionView {
    /// Version of the replicated state this view was read from (grows with every change a
    /// node may watch; comparable across replicas).
    pub version: u64,
    pub upgrade: Option<UpgradeId>,
    pub phase: Option<Phase>,
    /// The decision to act on (committed, since it was read from applied state).
    pub decision: Decision,
    /// The generation the decision's upgrade upgrades from: the decision serves
    /// `decision.serving_generation(generation)`. (Before a new upgrade's first freeze the
    /// decision is the last one decided, of the upgrade before.)
    pub generation: Generation,
    /// The generation the current (or last) upgrade upgrades from; `None` before any upgrade.
    /// A data node configured for another pair of generations takes no part in it.
    pub upgrade_from: Option<Generation>,
    /// Whether the asking node is named by the current plan.
    pub known: bool,
    pub registered: bool,
    /// Freezing only: every router of the plan acked `Frozen` for this epoch.
    pub all_routers_frozen: bool,
    /// Acks of the asking node recorded for `decision.epoch()`.
    pub acked_frozen: bool,
    pub acked_drained: bool,
    pub acked_switched: bool,
    /// The asking node on the roster.
    pub roster: RosterStatus,
    /// A data node's view while Freezing: every router the freeze needs. A data node may fence
    /// once each of them told it directly that it is frozen for this epoch, without waiting
    /// for the replicated state to show all their acks (a round of consensus saved). Empty
    /// otherwise.
    pub routers: Vec<NodeName>,
    /// Where universes answer, by generation: the one this view's decision serves and the
    /// current upgrade's new one (as the plans named them; generation 1's come from the
    /// cluster file). A generation's endpoints never change once a router may serve it.
    pub universes: Vec<(Generation, Vec<String>)>,
    /// The current (or last) plan's rules for routers, which they apply from the view on
    /// (before any plan, a router keeps its own configured ones).
    pub rules: Option<RouterRules>,
    /// The group was rebuilt from nothing and is learning from the nodes' disks: nothing in
    /// this view is to be acted on; the node sends what its disk holds
    /// ([`NodeRequest::Recover`]) unless `disk_recorded`.
    pub recovering: bool,
    /// Recovering: the asking node's disk is recorded.
    pub disk_recorded: bool,
}

/// What a plan tells its routers: how long and how many requests a frozen router holds
/// (`hold_ms_max`, `hold_queue_max`), how long a request in flight may keep it from acking
/// (`inflight_ms_max`), which routes' requests it ends at once (`long_routes`), and how it
/// mirrors and compares (`validation`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterRules {
    pub hold_ms_max: u64,
    pub hold_queue_max: u32,
    pub inflight_ms_max: u64,
    pub long_routes: Vec<String>,
    pub validation: crate::plan::Validation,
}

impl RouterRules {
    /// Whether a request with this method is mirrored (it only reads).
    pub fn mirrors(&self, method: &str) -> bool {
        self.validation.mirror_methods.iter().any(|m| m == method)
    }

    /// Whether a request for `path` is a long one (ended at once at a freeze).
    pub fn is_long(&self, path: &str) -> bool {
        self.long_routes.iter().any(|prefix| path.starts_with(prefix.as_str()))
    }
}

impl DecisionView {
    /// A digest of the news a view brings its node: every field but the version and the node's
    /// own acks (FNV-1a; never `0`, which a watch uses for "no view yet").
    pub fn digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |x: u64| {
            for b in x.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(self.upgrade.map_or(u64::MAX, |u| u.0));
        eat(self.phase.map_or(u64::MAX, |p| p as u64));
        let (epoch, rank) = self.decision.order_key();
        eat(epoch);
        eat(u64::from(rank));
        eat(self.generation.0);
        eat(self.upgrade_from.map_or(u64::MAX, |g| g.0));
        // The node's own acks are left out: it learns they took effect from the answer to the
        // ack itself, and waking its watch for them would leave no watch parked when the outcome
        // comes. (They are in the view all the same, for a node that restarted.)
        let flags = [self.known, self.registered, self.all_routers_frozen, self.recovering, self.disk_recorded];
        eat(flags.iter().fold(0, |acc, f| (acc << 1) | u64::from(*f)));
        eat(self.roster as u64);
        for router in &self.routers {
            for b in router.0.bytes() {
                eat(u64::from(b));
            }
            eat(u64::MAX);
        }
        if let Some(r) = &self.rules {
            eat(r.hold_ms_max);
            eat(u64::from(r.hold_queue_max));
            eat(r.inflight_ms_max);
            for list in [&r.long_routes, &r.validation.mirror_methods, &r.validation.ignore] {
                for entry in list {
                    for b in entry.bytes() {
                        eat(u64::from(b));
                    }
                    eat(u64::MAX);
                }
                eat(u64::MAX - 1);
            }
        }
        for (generation, endpoints) in &self.universes {
            eat(generation.0);
            for endpoint in endpoints {
                endpoint.bytes().for_each(|b| eat(u64::from(b)));
                eat(u64::MAX);
            }
        }
        h.max(1)
    }
}

/// Why the coordinator's state machine refused a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectKind {
    /// No upgrade is in progress.
    NoUpgrade,
    /// Another upgrade is still in progress.
    InProgress,
    /// The plan's transforms do not fit its old schema.
    BadPlan,
    /// The node is not named by the plan.
    UnknownNode,
    /// The node's duties differ from the plan's, or it lacks the duty the command needs.
    WrongDuties,
    /// The node has not registered.
    NotRegistered,
    /// The upgrade is in another phase than the command needs.
    WrongPhase,
    /// The command names another epoch than the current (or next) one.
    WrongEpoch,
    /// The ready gate does not pass.
    NotReady,
    /// Manual switch: the operator has not asked for it.
    ManualSwitch,
    /// The retry backoff after an abort has not passed.
    Backoff,
    /// The command is malformed (e.g. a deadline before its proposal time).
    BadCommand,
    /// The group is recovering (rebuilt from nothing, learning from the nodes' disks): it
    /// decides nothing until every node has told it what its disk holds.
    Recovering,
    /// The epoch already has an outcome.
    AlreadyDecided,
    /// A commit without every ack of the epoch.
    MissingAcks,
    /// A commit with a checksum mismatch acked.
    ChecksumMismatch,
    /// The upgrade has ended (or switched): nothing can undo it.
    AlreadyEnded,
    /// The router is retired (or being retired): it takes part in nothing any more.
    Retired,
    /// The plan upgrades from another generation than the one the cluster serves.
    WrongGeneration,
    /// A registration or report for another upgrade than the current one (it arrived late).
    WrongUpgrade,
    /// A change of the coordinator group's membership was refused (another is in progress, the
    /// replica is unknown or already a member, …).
    Membership,
}

/// A command the state machine refused, and why (the command did not take effect).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub kind: RejectKind,
    pub detail: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.detail)
    }
}

/// Why the ready gate does not pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GateBlocker {
    NotRegistered {
        node: NodeName,
    },
    BulkCopyRunning {
        node: NodeName,
    },
    Lag {
        node: NodeName,
        lag: u64,
        lag_max: u64,
    },
    /// The oldest change not yet applied has waited longer than the plan allows.
    LagMs {
        node: NodeName,
        lag_ms: u64,
        lag_ms_max: u64,
    },
    TooFewSamples {
        samples: u64,
        samples_min: u64,
    },
    MismatchRatio {
        ratio: f64,
        mismatch_ratio_max: f64,
    },
    /// A data node has not yet compared every range of its tables once.
    DataComparing {
        node: NodeName,
        attempted: u64,
        ranges: u64,
    },
    /// A data node found ranges where transform(old) and new differ.
    DataDiffers {
        node: NodeName,
        ranges: u64,
    },
}

impl std::fmt::Display for GateBlocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GateBlocker::NotRegistered { node } => write!(f, "{node}: not registered"),
            GateBlocker::BulkCopyRunning { node } => write!(f, "{node}: bulk copy not finished"),
            GateBlocker::Lag { node, lag, lag_max } => write!(f, "{node}: lag {lag} > lag_max {lag_max}"),
            GateBlocker::LagMs { node, lag_ms, lag_ms_max } => {
                write!(f, "{node}: lag of {lag_ms} ms > lag_ms_max {lag_ms_max}")
            }
            GateBlocker::TooFewSamples { samples, samples_min } => {
                write!(f, "validation: {samples} samples < samples_min {samples_min}")
            }
            GateBlocker::MismatchRatio { ratio, mismatch_ratio_max } => {
                write!(f, "validation: mismatch ratio {ratio:.4} > mismatch_ratio_max {mismatch_ratio_max}")
            }
            GateBlocker::DataComparing { node, attempted, ranges } => {
                write!(f, "{node}: data compared in {attempted} of {ranges} key ranges")
            }
            GateBlocker::DataDiffers { node, ranges } => {
                write!(f, "{node}: transform(old) and new differ in {ranges} key ranges")
            }
        }
    }
}

/// Coordinator → node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeResponse {
    Accepted,
    Rejected(Rejection),
    /// The outcome is not known (e.g. the proposal was not committed in time): it may still
    /// take effect. Never to be taken as a refusal.
    Unknown {
        reason: String,
    },
    NotLeader {
        leader: Option<ReplicaId>,
    },
    View(DecisionView),
}

/// CLI → coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CliRequest {
    /// Start an upgrade. `token` makes retries idempotent: a start whose token matches the
    /// current (or last) upgrade's answers with that upgrade instead of starting another.
    Start {
        plan: Box<Plan>,
        token: String,
    },
    Status,
    Switch,
    Abort {
        reason: String,
    },
    /// Put a router on the roster (refused during a freeze).
    Join {
        node: NodeName,
    },
    /// Take a router off the roster. Without `force` the retire completes once the router has
    /// acknowledged it (persisted "retired" and stopped serving). `force` retires at once a
    /// router that cannot answer: the operator asserts it is cut off from every client.
    Retire {
        node: NodeName,
        force: bool,
    },
    /// The coordinator group as the answering replica sees it (any replica answers).
    Cluster,
    /// The cluster writes replicated-state format `to` from now on (the CLI first asks every
    /// replica whether it reads it).
    RaiseFormat {
        to: u32,
    },
    /// A group rebuilt from nothing (every replica's data lost): learn the cluster's state from
    /// the disks of the `expected` nodes (the cluster file's) before deciding anything. Nodes in
    /// `lost` are not waited for: the operator asserts they are gone and cut off from clients.
    /// Given again, it adds to `lost`. `abort_unknown_freeze`: the operator asserts that no
    /// client saw the new universe of a freeze whose outcome the disks cannot tell.
    Recover {
        expected: Vec<NodeName>,
        lost: Vec<NodeName>,
        abort_unknown_freeze: bool,
    },
    /// Add replica `id` to the group: it catches up as a learner, then becomes a voter.
    /// `address` is `name@ip:port`, as every replica will dial it.
    AddReplica {
        id: ReplicaId,
        address: String,
    },
    /// Take replica `id` out of the group.
    RemoveReplica {
        id: ReplicaId,
    },
}

/// The coordinator group as one replica sees it (`imago cluster status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The replica that answered.
    pub replica: ReplicaId,
    pub leader: Option<ReplicaId>,
    pub term: u64,
    /// Voting members of the current membership.
    pub members: Vec<ReplicaId>,
    /// The last log index this replica applied.
    pub applied_index: Option<u64>,
    /// The generation the cluster serves.
    pub generation: Generation,
    pub roster: Vec<(NodeName, RosterStatus)>,
    /// When this replica last heard from each node, in ms before the answer (not replicated:
    /// another replica may have heard from it later).
    pub last_contact_ms_ago: Vec<(NodeName, u64)>,
    /// The replicated state's format the cluster writes.
    pub format: u32,
    /// The newest replicated-state format this replica's build reads.
    pub format_readable: u32,
}

/// Status of one node as the coordinator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: NodeName,
    pub registered: bool,
    pub report: NodeReport,
}

/// The operator's view of the current (or last) upgrade.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub upgrade: Option<UpgradeId>,
    pub name: String,
    pub phase: Option<Phase>,
    pub epoch: Epoch,
    /// The generation the cluster serves (the next plan upgrades from it).
    pub generation: Generation,
    pub attempts: u32,
    /// Why the ready gate does not pass (empty when it does).
    pub gate_blockers: Vec<GateBlocker>,
    pub last_abort_reason: Option<String>,
    pub nodes: Vec<NodeStatus>,
    /// Recovering: the nodes whose disks are still awaited.
    pub recovery_waiting: Option<Vec<NodeName>>,
    /// Recovering: why it is not done yet.
    pub recovery_blocked: Option<String>,
}

/// Coordinator → CLI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CliResponse {
    Started {
        upgrade: UpgradeId,
    },
    Accepted,
    Status(StatusView),
    Rejected(Rejection),
    /// The outcome is not known (e.g. the proposal was not committed in time): it may still
    /// take effect. The CLI says so; it never reports it as success or refusal.
    Unknown {
        reason: String,
    },
    NotLeader {
        leader: Option<ReplicaId>,
    },
    Cluster(ClusterView),
}

/// Everything a coordinator replica accepts on its port. Raft RPCs travel pre-encoded, so that
/// this crate stays free of openraft.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Raft(Vec<u8>),
    Node(NodeRequest),
    Cli(CliRequest),
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Raft(Vec<u8>),
    Node(NodeResponse),
    Cli(CliResponse),
    /// The request could not be decoded or served; the connection stays usable.
    Error {
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> DecisionView {
        DecisionView {
            version: 4,
            upgrade: Some(UpgradeId(1)),
            phase: Some(Phase::Freezing),
            decision: Decision::Freeze(Epoch(2)),
            generation: crate::Generation::GENESIS,
            upgrade_from: Some(crate::Generation::GENESIS),
            known: true,
            registered: true,
            all_routers_frozen: false,
            acked_frozen: false,
            acked_drained: false,
            acked_switched: false,
            roster: RosterStatus::Active,
            routers: Vec::new(),
            universes: Vec::new(),
            rules: None,
            recovering: false,
            disk_recorded: false,
        }
    }

    fn rules(hold_ms_max: u64, hold_queue_max: u32) -> RouterRules {
        RouterRules {
            hold_ms_max,
            hold_queue_max,
            inflight_ms_max: 1_000,
            long_routes: Vec::new(),
            validation: crate::plan::Validation::default(),
        }
    }

    #[test]
    fn a_digest_sees_every_field_a_node_acts_on_but_the_version_and_its_own_acks() {
        let v = view();
        assert_eq!(v.digest(), DecisionView { version: 99, ..v.clone() }.digest());
        let own_acks = DecisionView { acked_frozen: true, acked_drained: true, acked_switched: true, ..v.clone() };
        assert_eq!(v.digest(), own_acks.digest(), "a node learns of its own acks from their answers");
        let changed = [
            DecisionView { decision: Decision::Commit(Epoch(2)), ..v.clone() },
            DecisionView { phase: Some(Phase::Switched), ..v.clone() },
            DecisionView { all_routers_frozen: true, ..v.clone() },
            DecisionView { registered: false, ..v.clone() },
            DecisionView { known: false, ..v.clone() },
            DecisionView { roster: RosterStatus::Retiring, ..v.clone() },
            DecisionView { upgrade: Some(UpgradeId(2)), ..v.clone() },
            DecisionView { routers: vec![NodeName::from("router-1")], ..v.clone() },
            DecisionView { universes: vec![(crate::Generation(2), vec!["http://b:1".into()])], ..v.clone() },
            DecisionView { rules: Some(rules(5, 2)), ..v.clone() },
            DecisionView {
                rules: Some(RouterRules { long_routes: vec!["/events".into()], ..rules(5, 2) }),
                ..v.clone()
            },
        ];
        let ignored = |keys: &[&str]| {
            let validation =
                crate::plan::Validation { ignore: keys.iter().map(|k| k.to_string()).collect(), ..Default::default() };
            DecisionView { rules: Some(RouterRules { validation, ..rules(5, 2) }), ..v.clone() }.digest()
        };
        assert_ne!(ignored(&["a"]), ignored(&[]), "an ignore rule is news");
        assert_ne!(ignored(&["a", "b"]), ignored(&["ab"]), "entries are kept apart");
        for c in changed {
            assert_ne!(c.digest(), v.digest(), "{c:?}");
            assert_ne!(c.digest(), 0);
        }
    }
}
