//! Simulation settings.

use coordinator::upgrade::ApplyBug;
use node_core::agent::AgentBug;
use node_core::duties::router::RouterBug;
use node_core::duties::transform::TransformBug;

/// A deliberately broken component (`--bug`), to prove the checkers catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Bug {
    /// Routers release held requests to the old universe when a hold times out.
    ReleaseOldOnTimeout,
    /// A restarted transform resumes one position past its checkpoint, losing a change.
    LoseChangeOnRestart,
    /// A transform that crashed mid-copy resumes the copy at its last key on a fresh snapshot,
    /// while the stream continues from the old snapshot's position.
    ResumeCopyFromNewSnapshot,
    /// Routers ack `Frozen` at once, with requests to the old universe still in flight.
    AckFrozenWithInFlight,
    /// Nodes act on a newer decision as soon as they see it, before persisting it.
    ActBeforePersist,
    /// The coordinator's state machine counts an ack from an earlier epoch for the current one.
    CountStaleAck,
    /// A router restarted on its own disk holding a freeze serves the old universe until a read
    /// tells it the outcome.
    ServeOldAfterFrozenRestart,
    /// Nodes forget their persisted decision when a new upgrade starts (and serve the first
    /// generation until the next news). Shows with `--upgrades 2` or more.
    ResetPersistedOnNewUpgrade,
    /// Data nodes open their new store to client writes once drained, before the commit.
    OpenNewWhenDrained,
}

/// The name of a value of a `clap::ValueEnum` (as the command line spells it).
pub fn value_name<T: clap::ValueEnum>(value: &T) -> String {
    value.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string())
}

impl Bug {
    pub fn router(bug: Option<Bug>) -> Option<RouterBug> {
        match bug {
            Some(Bug::ReleaseOldOnTimeout) => Some(RouterBug::ReleaseOldOnTimeout),
            Some(Bug::AckFrozenWithInFlight) => Some(RouterBug::AckFrozenWithInFlight),
            _ => None,
        }
    }

    pub fn apply(bug: Option<Bug>) -> Option<ApplyBug> {
        (bug == Some(Bug::CountStaleAck)).then_some(ApplyBug::CountStaleAck)
    }

    pub fn agent(bug: Option<Bug>) -> Option<AgentBug> {
        match bug {
            Some(Bug::ActBeforePersist) => Some(AgentBug::ActBeforePersist),
            Some(Bug::ServeOldAfterFrozenRestart) => Some(AgentBug::ServeOldAfterFrozenRestart),
            Some(Bug::ResetPersistedOnNewUpgrade) => Some(AgentBug::ResetPersistedOnNewUpgrade),
            _ => None,
        }
    }

    pub fn transform(bug: Option<Bug>) -> Option<TransformBug> {
        match bug {
            Some(Bug::LoseChangeOnRestart) => Some(TransformBug::ResumePastCheckpoint),
            Some(Bug::ResumeCopyFromNewSnapshot) => Some(TransformBug::ResumeCopyFromNewSnapshot),
            Some(Bug::OpenNewWhenDrained) => Some(TransformBug::OpenNewWhenDrained),
            _ => None,
        }
    }
}
use std::fmt;

/// Fault kinds a run may draw (`--faults loss,delay,...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultSet {
    pub loss: bool,
    pub delay: bool,
    pub duplicate: bool,
    pub partition: bool,
    pub crash: bool,
    pub clock: bool,
    /// Frames of random bytes sent to coordinators and data nodes.
    pub garbage: bool,
    /// Operator actions: manual switch mode, aborts at random times and during a freeze.
    pub operator: bool,
    /// Faults fired when a freeze is seen (leader crash, router partition, data node crash,
    /// lost commit).
    pub trigger: bool,
    /// A confused leader proposes stale or premature commands.
    pub confused: bool,
    /// Lagging replicas answer watches with old views.
    pub stale: bool,
    /// Small hold queues, bursts of client requests during a freeze, slow stores.
    pub load: bool,
    /// A rogue writer changes rows of the new database behind the transform.
    pub drift: bool,
    /// Routers join the roster and are retired (normally, or forced when cut off).
    pub roster: bool,
    /// Store operations fail (busy, an I/O error), before or after they took effect.
    pub store: bool,
}

impl FaultSet {
    pub const ALL: FaultSet = FaultSet {
        loss: true,
        delay: true,
        duplicate: true,
        partition: true,
        crash: true,
        clock: true,
        garbage: true,
        operator: true,
        trigger: true,
        confused: true,
        stale: true,
        load: true,
        drift: true,
        roster: true,
        store: true,
    };
    pub const NONE: FaultSet = FaultSet {
        loss: false,
        delay: false,
        duplicate: false,
        partition: false,
        crash: false,
        clock: false,
        garbage: false,
        operator: false,
        trigger: false,
        confused: false,
        stale: false,
        load: false,
        drift: false,
        roster: false,
        store: false,
    };

    /// The set of the kinds named (`all` and `none` stand for every kind and no kind).
    pub fn from_kinds(kinds: &[FaultKind]) -> FaultSet {
        let mut set = FaultSet::NONE;
        for kind in kinds {
            match kind {
                FaultKind::All => set = FaultSet::ALL,
                FaultKind::None => {}
                kind => *set.flag(*kind) = true,
            }
        }
        set
    }

    /// The flag of one fault kind (`all` and `none` have none).
    fn flag(&mut self, kind: FaultKind) -> &mut bool {
        match kind {
            FaultKind::Loss => &mut self.loss,
            FaultKind::Delay => &mut self.delay,
            FaultKind::Duplicate => &mut self.duplicate,
            FaultKind::Partition => &mut self.partition,
            FaultKind::Crash => &mut self.crash,
            FaultKind::Clock => &mut self.clock,
            FaultKind::Garbage => &mut self.garbage,
            FaultKind::Operator => &mut self.operator,
            FaultKind::Trigger => &mut self.trigger,
            FaultKind::Confused => &mut self.confused,
            FaultKind::Stale => &mut self.stale,
            FaultKind::Load => &mut self.load,
            FaultKind::Drift => &mut self.drift,
            FaultKind::Roster => &mut self.roster,
            FaultKind::Store => &mut self.store,
            FaultKind::All | FaultKind::None => unreachable!("not a single kind"),
        }
    }

    pub fn any(&self) -> bool {
        *self != FaultSet::NONE
    }
}

impl fmt::Display for FaultSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == FaultSet::ALL {
            return f.write_str("all");
        }
        let mut set = *self;
        let on: Vec<String> = <FaultKind as clap::ValueEnum>::value_variants()
            .iter()
            .filter(|k| !matches!(k, FaultKind::All | FaultKind::None) && *set.flag(**k))
            .map(value_name)
            .collect();
        f.write_str(if on.is_empty() { "none" } else { "" })?;
        f.write_str(&on.join(","))
    }
}

/// One kind of fault (`--faults loss,delay,...`), or all of them, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultKind {
    /// Every kind below.
    All,
    /// No faults.
    None,
    /// Messages lost (0–30 %).
    Loss,
    /// Delays and reordering; a few messages arrive seconds late, after their sender gave up.
    Delay,
    /// Messages delivered twice, and transform batches delivered to the new store again.
    Duplicate,
    /// Symmetric and asymmetric partitions, and processes cut off from the coordinators.
    Partition,
    /// Crashes and restarts of any process (disks kept).
    Crash,
    /// Coordinator clock jumps.
    Clock,
    /// Frames of random bytes sent to coordinators and data nodes.
    Garbage,
    /// Manual switch mode, operator aborts at random times and during a freeze.
    Operator,
    /// Faults fired when a freeze or a bulk copy is seen.
    Trigger,
    /// A confused leader proposes stale or premature commands (an old epoch's ack, a second
    /// outcome for a decided epoch, the next epoch's outcome): the state machine must refuse.
    Confused,
    /// Lagging replicas answer a node's (non-linearizable) watches with views older than the
    /// node has seen and persisted.
    Stale,
    /// Small hold queues, bursts of client requests (writes too) during a freeze, and slow
    /// stores (a drain that takes time).
    Load,
    /// A rogue writer (a console session, a cron job) changes rows of the new database behind
    /// the transform before the switch: validation and the drain's checksums must keep clients
    /// off it (the operator aborts when validation reports mismatches).
    Drift,
    /// The operator changes the roster: a new router joins (started with no disk, put in
    /// rotation once it serves), or one is retired — normally (it acks, then serves nothing) or
    /// forced (it is crashed and kept cut off from clients first).
    Roster,
    /// A data node's store operations fail (a busy database, an I/O error), some after they
    /// took effect (a commit whose answer was lost): the node tries them again.
    Store,
}

/// Named scenarios (tests and `imago sim --scenario`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The coordinator leader crashes while the upgrade is Freezing.
    LeaderCrashDuringFreeze,
    /// One router is cut off from every coordinator while Freezing, right after it acks.
    RouterPartitionedDuringFreeze,
    /// A data node crashes while its bulk copy runs.
    DataNodeCrashMidTransform,
    /// The view carrying `Commit` is lost on its way to one router (several times).
    CommitLostToRouter,
    /// Every coordinator replica is down for 60 s while the data nodes copy (no freeze can be
    /// pending), and every router is restarted once meanwhile (gracefully: its load balancer
    /// takes it out of rotation first). Clients must not notice.
    CoordinatorsDown,
    /// Between the first and the second upgrade, every coordinator replica loses its data; a
    /// group started afresh recovers from the nodes' disks (`imago cluster recover`), and the
    /// chain goes on. Needs `--upgrades 2` or more.
    Disaster,
    /// The disaster under the full fault mix of `--faults`: the seed's faults are drawn as
    /// without a scenario (crashes, partitions, loss, stale views, triggers, …), and between the
    /// first and the second upgrade every coordinator replica loses its data whether or not they
    /// have healed. Needs `--upgrades 2` or more.
    DisasterUnderFaults,
    /// Every coordinator replica loses its data while the first upgrade switches (as a router
    /// freezes, as its ack leaves, or as it acts on the commit): nodes hold the freeze, some
    /// may have acked, some may hold the commit. The group started afresh must learn the
    /// freeze's outcome from their disks (or, when no disk can tell, take the operator's word
    /// that no client saw the new universe), and the chain goes on. Needs `--upgrades 2` or more.
    DisasterDuringFreeze,
    /// The disaster during a switch under the full fault mix of `--faults`: the seed's faults
    /// are drawn as without a scenario, and every coordinator replica loses its data as a
    /// router freezes, as its ack leaves, or as it acts on the commit, of whichever upgrade
    /// gets there first. An upgrade the rebuilt group no longer knows is started again by the
    /// operator if it was the chain's last. Needs `--upgrades 2` or more.
    DisasterDuringFreezeUnderFaults,
}

impl Scenario {
    pub fn name(self) -> String {
        value_name(&self)
    }
}

/// One simulated cluster and its workload.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub coordinators: usize,
    pub routers: usize,
    pub data_nodes: usize,
    pub datacenters: usize,
    pub faults: FaultSet,
    pub bug: Option<Bug>,
    /// Rows loaded into the old universe before the upgrade starts.
    pub initial_users: u64,
    pub initial_items: u64,
    /// Client requests per simulated second, over all routers.
    pub client_rate_per_s: f64,
    pub tick_ms: u64,
    /// After faults heal, the upgrade must end (Done or RolledBack) within this bound.
    pub liveness_bound_ms: u64,
    /// Keep the trace as text lines (for a trace file), not only its hash.
    pub trace_lines: bool,
    /// A named scenario instead of random faults.
    pub scenario: Option<Scenario>,
    /// Upgrades run back to back in each seed (the new universe of one is the old universe of
    /// the next; one that rolls back is retried from the same generation by the next).
    pub upgrades: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            coordinators: 3,
            routers: 3,
            data_nodes: 2,
            datacenters: 1,
            faults: FaultSet::ALL,
            bug: None,
            initial_users: 300,
            initial_items: 100,
            client_rate_per_s: 150.0,
            tick_ms: 10,
            liveness_bound_ms: 40_000,
            trace_lines: false,
            scenario: None,
            upgrades: 1,
        }
    }
}

impl SimConfig {
    /// Checks the limits; the CLI reports the message.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=7).contains(&self.coordinators) {
            return Err("--coordinators must be 1..=7".into());
        }
        if !(1..=1000).contains(&self.routers) {
            return Err("--routers must be 1..=1000".into());
        }
        if !(1..=16).contains(&self.data_nodes) {
            return Err("--data-nodes must be 1..=16".into());
        }
        if !(1..=5).contains(&self.datacenters) {
            return Err("--datacenters must be 1..=5".into());
        }
        if !(1..=20).contains(&self.upgrades) {
            return Err("--upgrades must be 1..=20".into());
        }
        if matches!(
            self.scenario,
            Some(
                Scenario::Disaster
                    | Scenario::DisasterUnderFaults
                    | Scenario::DisasterDuringFreeze
                    | Scenario::DisasterDuringFreezeUnderFaults
            )
        ) && self.upgrades < 2
        {
            return Err("--scenario disaster strikes between upgrades: it needs --upgrades 2 or more".into());
        }
        Ok(())
    }

    /// Whether links between datacenters are slow (timeouts scale with it).
    pub fn wide_area(&self) -> bool {
        self.datacenters > 1
    }
}
