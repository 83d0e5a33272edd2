//! Fault plans, drawn per seed (or named scenarios).

pub use crate::config::Scenario;
use crate::config::SimConfig;
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Which process a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Coordinator(usize),
    /// Whichever replica leads when the fault fires.
    Leader,
    Router(usize),
    Data(usize),
}

/// A fault at a point in time.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultEvent {
    /// Cut links between a random side and the rest (one way if not symmetric).
    Partition { side_share: f64, symmetric: bool, duration_ms: u64 },
    /// Cut one process off from every coordinator (both ways).
    Isolate { target: Target, duration_ms: u64 },
    /// Crash; restart after `down_ms` (`None`: stays down until the faults heal).
    Crash { target: Target, down_ms: Option<u64> },
    /// Crash a node and lose its disk (it restarts with an empty one; a data node's stores are
    /// databases of their own and stay).
    LoseDisk { target: Target, down_ms: u64 },
    /// Jump a coordinator's clock.
    ClockJump { replica: usize, delta_ms: i64 },
    /// Drop the next `count` views carrying `Commit` to this router.
    LoseCommit { router: usize, count: u32 },
    /// Send `frames` frames of random bytes to a process (it must answer with an error).
    Garbage { target: Target, frames: u32 },
    /// The operator runs `imago upgrade abort` (once; the answer may be lost).
    OperatorAbort,
    /// The leader proposes a stale or premature command of its own.
    ConfusedLeader,
    /// `requests` client requests (the usual mix, writes too) within `over_ms`.
    Burst { requests: u32, over_ms: u64 },
    /// A graceful restart of a router after `after_ms`: its load balancer stops sending it
    /// clients, it stops once it has answered every client it took, and it starts again
    /// `down_ms` later (and is put back in rotation).
    Restart { router: usize, after_ms: u64, down_ms: u64 },
    /// A rogue writer changes `rows` rows of a data node's new database behind the transform
    /// (only before the switch: while syncing, or as the node fences its old store).
    Drift { data: usize, rows: u32 },
    /// The reserve router (the last slot, not in the plan) is started with no disk and joins
    /// the roster (`imago router join`); the load balancer sends it clients once it serves.
    Join,
    /// The operator retires a router: out of rotation first, then `imago router retire`
    /// (`force`: the router is crashed and kept cut off, then retired with `--force`).
    Retire { router: usize, force: bool },
    /// Every coordinator replica loses its data; a group is started afresh on empty disks and
    /// the operator runs `imago cluster recover` (between upgrades only: run by the operator's
    /// chain, not by `fire`).
    Disaster,
}

/// The plan's hold queue limit in seeds without a small one.
pub const HOLD_QUEUE_MAX: u64 = 500;

/// When a triggered fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// The upgrade entered Freezing (first time), plus a delay.
    Freezing { after_ms: u64 },
    /// A data node is in the middle of its bulk copy.
    Copying { data: usize },
    /// A router acts on a freeze (fires at once, before it can ack).
    RouterFreezes { router: usize },
    /// A router's `Frozen` ack leaves it (fires as the ack is on its way).
    RouterAcked { router: usize },
    /// A data node fenced its old store (fires at once, mid-drain).
    Fenced { data: usize },
    /// A router acts on a commit (fires at once: it may be the only node that holds it).
    RouterCommits { router: usize },
}

/// A fault that fires on a condition.
#[derive(Clone, Debug, PartialEq)]
pub struct Triggered {
    pub when: Condition,
    pub event: FaultEvent,
}

/// Everything that goes wrong in one seed.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultPlan {
    pub loss: f64,
    pub duplicate: f64,
    pub jitter_max_us: u64,
    /// Share of messages that arrive very late (after their sender gave up), and how late.
    pub late: f64,
    pub late_us_max: u64,
    /// Faults stop (and crashed processes restart) at this time.
    pub safety_ms: u64,
    pub timed: Vec<(u64, FaultEvent)>,
    pub triggered: Vec<Triggered>,
    pub max_attempts: u32,
    /// `switch = "manual"`: the operator asks for the switch until it is accepted.
    pub manual_switch: bool,
    /// Share of a node's non-linearizable watches answered with an older view it was sent before
    /// (a lagging replica, or a replayed answer).
    pub stale_views: f64,
    /// Share of transform batches after which the new store gets an earlier batch again.
    pub redeliver_batches: f64,
    /// Share of a data node's store operations that fail (half of them after they took
    /// effect).
    pub store_failures: f64,
    /// The plan's `hold_queue_max` (small in some seeds, so that queues fill).
    pub hold_queue_max: u64,
    /// A store operation of a data node takes up to this long.
    pub store_delay_us_max: u64,
    /// A node's disk write takes up to this long (a crash can land between the write and the
    /// node learning it is durable).
    pub disk_delay_us_max: u64,
    /// A reserve router slot exists (a `Join` may start it).
    pub reserve_router: bool,
    /// A roster change the operator makes between two upgrades of a chain: after upgrade
    /// `.0` (1-based) ended and the next was deployed, before it starts.
    pub between_upgrades: Option<(u32, FaultEvent)>,
}

impl FaultPlan {
    /// The share of store operations that fail in `seed`, drawn from a stream of its own so
    /// that adding this fault changed no earlier seed's plan (regression seeds stay what they
    /// were).
    pub fn draw_store_failures(&mut self, config: &SimConfig, seed: u64) {
        if !config.faults.store || config.scenario.is_some() {
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5354_4f52_4546_4149);
        if rng.gen_bool(0.3) {
            self.store_failures = rng.gen_range(0.01..0.15);
        }
    }

    /// Draws a plan for one seed.
    pub fn draw(config: &SimConfig, rng: &mut ChaCha8Rng) -> FaultPlan {
        match config.scenario {
            Some(Scenario::DisasterUnderFaults) => {
                let mut plan = FaultPlan::draw(&SimConfig { scenario: None, ..config.clone() }, rng);
                // The disaster takes the place of a join or retirement drawn between upgrades (a
                // router held back for that join stays out).
                if matches!(plan.between_upgrades, Some((_, FaultEvent::Join))) {
                    plan.reserve_router = plan.timed.iter().any(|(_, e)| *e == FaultEvent::Join);
                }
                plan.between_upgrades = Some((1, FaultEvent::Disaster));
                return plan;
            }
            Some(Scenario::DisasterDuringFreezeUnderFaults) => {
                let mut plan = FaultPlan::draw(&SimConfig { scenario: None, ..config.clone() }, rng);
                plan.triggered
                    .push(Triggered { when: FaultPlan::during_a_switch(config, rng), event: FaultEvent::Disaster });
                return plan;
            }
            Some(s) => return FaultPlan::scenario(s, config, rng),
            None => {}
        }
        let f = config.faults;
        let safety_ms = rng.gen_range(3_000..=10_000);
        let mut plan = FaultPlan {
            loss: if f.loss && rng.gen_bool(0.5) { rng.gen_range(0.0..0.3) } else { 0.0 },
            duplicate: if f.duplicate && rng.gen_bool(0.3) { rng.gen_range(0.0..0.05) } else { 0.0 },
            jitter_max_us: if f.delay { rng.gen_range(0..20_000) } else { 500 },
            late: if f.delay && rng.gen_bool(0.3) { rng.gen_range(0.001..0.02) } else { 0.0 },
            late_us_max: rng.gen_range(1_000_000..4_000_000),
            safety_ms,
            timed: Vec::new(),
            triggered: Vec::new(),
            max_attempts: if f.any() { rng.gen_range(1..=3) } else { 3 },
            manual_switch: f.operator && rng.gen_bool(0.3),
            disk_delay_us_max: if f.crash && rng.gen_bool(0.5) { rng.gen_range(0..5_000) } else { 0 },
            stale_views: if f.stale && rng.gen_bool(0.4) { rng.gen_range(0.05..0.5) } else { 0.0 },
            redeliver_batches: if f.duplicate && rng.gen_bool(0.4) { rng.gen_range(0.02..0.2) } else { 0.0 },
            // Drawn apart (`FaultPlan::draw_store_failures`): seeds found before this fault existed keep their plans.
            store_failures: 0.0,
            hold_queue_max: if f.load && rng.gen_bool(0.3) { rng.gen_range(2..40) } else { HOLD_QUEUE_MAX },
            store_delay_us_max: if f.load && rng.gen_bool(0.3) { rng.gen_range(1_000..40_000) } else { 0 },
            reserve_router: false,
            between_upgrades: None,
        };
        if f.load && rng.gen_bool(0.5) {
            let when = Condition::Freezing { after_ms: rng.gen_range(0..200) };
            let event = FaultEvent::Burst { requests: rng.gen_range(50..400), over_ms: rng.gen_range(10..300) };
            plan.triggered.push(Triggered { when, event });
        }
        let at = |rng: &mut ChaCha8Rng| rng.gen_range(300..safety_ms);
        if f.partition {
            for _ in 0..rng.gen_range(0..=3) {
                let event = if rng.gen_bool(0.5) {
                    FaultEvent::Partition {
                        side_share: rng.gen_range(0.1..0.5),
                        symmetric: rng.gen_bool(0.6),
                        duration_ms: rng.gen_range(200..4_000),
                    }
                } else {
                    FaultEvent::Isolate { target: random_target(config, rng), duration_ms: rng.gen_range(200..4_000) }
                };
                plan.timed.push((at(rng), event));
            }
        }
        if f.crash {
            for _ in 0..rng.gen_range(0..=3) {
                let down_ms = if rng.gen_bool(0.2) { None } else { Some(rng.gen_range(200..3_000)) };
                plan.timed.push((at(rng), FaultEvent::Crash { target: random_target(config, rng), down_ms }));
            }
            if rng.gen_bool(0.2) {
                // A node lost for the rest of the faulty phase in the middle of a freeze (a
                // router as it freezes, a data node as it fences): the freeze must be aborted
                // at its deadline, not wait for the node.
                let (when, target) = match rng.gen_range(0..2) {
                    0 => {
                        let router = rng.gen_range(0..config.routers);
                        (Condition::RouterFreezes { router }, Target::Router(router))
                    }
                    _ => {
                        let data = rng.gen_range(0..config.data_nodes);
                        (Condition::Fenced { data }, Target::Data(data))
                    }
                };
                plan.triggered.push(Triggered { when, event: FaultEvent::Crash { target, down_ms: None } });
                // Long enough that a freeze left waiting for the node outlives its deadline.
                plan.safety_ms = plan.safety_ms.max(8_000);
            }
            if rng.gen_bool(0.2) {
                let target = match rng.gen_range(0..2) {
                    0 => Target::Router(rng.gen_range(0..config.routers)),
                    _ => Target::Data(rng.gen_range(0..config.data_nodes)),
                };
                plan.timed.push((at(rng), FaultEvent::LoseDisk { target, down_ms: rng.gen_range(200..3_000) }));
            }
        }
        if f.clock {
            for _ in 0..rng.gen_range(0..=2) {
                let replica = rng.gen_range(0..config.coordinators);
                plan.timed.push((at(rng), FaultEvent::ClockJump { replica, delta_ms: rng.gen_range(-2_000..=2_000) }));
            }
        }
        if f.garbage {
            for _ in 0..rng.gen_range(0..=2) {
                let target = random_target(config, rng);
                plan.timed.push((at(rng), FaultEvent::Garbage { target, frames: rng.gen_range(1..=20) }));
            }
        }
        if f.operator && rng.gen_bool(0.1) {
            plan.timed.push((at(rng), FaultEvent::OperatorAbort));
        }
        if f.operator && rng.gen_bool(0.2) {
            let when = Condition::Freezing { after_ms: rng.gen_range(0..40) };
            plan.triggered.push(Triggered { when, event: FaultEvent::OperatorAbort });
        }
        if f.confused {
            for _ in 0..rng.gen_range(0..=2) {
                plan.timed.push((at(rng), FaultEvent::ConfusedLeader));
            }
            if rng.gen_bool(0.5) {
                let when = Condition::Freezing { after_ms: rng.gen_range(0..60) };
                plan.triggered.push(Triggered { when, event: FaultEvent::ConfusedLeader });
            }
        }
        if f.drift && rng.gen_bool(0.3) {
            let data = rng.gen_range(0..config.data_nodes);
            let event = FaultEvent::Drift { data, rows: rng.gen_range(1..=20) };
            if rng.gen_bool(0.5) {
                plan.timed.push((at(rng), event));
            } else {
                // After the gate passed, before the drain compares: only the checksums can
                // keep clients off the new universe.
                plan.triggered.push(Triggered { when: Condition::Fenced { data }, event });
            }
        }
        if f.trigger && rng.gen_bool(0.7) {
            let kind = rng.gen_range(0..4);
            let scenario = <Scenario as clap::ValueEnum>::value_variants()[kind];
            plan.triggered.extend(FaultPlan::scenario(scenario, config, rng).triggered);
        }
        // Drawn last, so that the plans drawn before it stay as they were.
        if f.crash && rng.gen_bool(0.5) {
            // A router crashes as its `Frozen` ack leaves and is back soon: the freeze may commit
            // meanwhile, and the router restarts with the freeze on its disk.
            let router = rng.gen_range(0..config.routers);
            let down_ms = rng.gen_range(20..400);
            let event = FaultEvent::Crash { target: Target::Router(router), down_ms: Some(down_ms) };
            plan.triggered.push(Triggered { when: Condition::RouterAcked { router }, event });
            if rng.gen_bool(0.5) {
                // ... and comes back cut off from the coordinators for a while: it must hold (its
                // disk holds the freeze, whose outcome it cannot learn), not serve a guess.
                let duration_ms = down_ms + rng.gen_range(300..1_500);
                let event = FaultEvent::Isolate { target: Target::Router(router), duration_ms };
                plan.triggered.push(Triggered { when: Condition::RouterAcked { router }, event });
            }
        }
        if f.roster {
            // Drawn after everything else, so that the plans drawn before it stay as they were.
            let at = rng.gen_range(300..safety_ms);
            if rng.gen_bool(0.2) {
                plan.reserve_router = true;
                plan.timed.push((at, FaultEvent::Join));
            }
            let retires = config.routers >= 2 && rng.gen_bool(0.2);
            if retires {
                let event = FaultEvent::Retire { router: rng.gen_range(0..config.routers), force: rng.gen_bool(0.5) };
                plan.timed.push((rng.gen_range(300..safety_ms), event));
            }
            // Between two upgrades of a chain (drawn only for chains, so that the plans of single
            // upgrades stay as they were): a join, or a retirement, when no other is drawn.
            if config.upgrades > 1 && rng.gen_bool(0.4) {
                let after = rng.gen_range(1..config.upgrades);
                if !plan.reserve_router && rng.gen_bool(0.5) {
                    plan.reserve_router = true;
                    plan.between_upgrades = Some((after, FaultEvent::Join));
                } else if !retires && config.routers >= 2 {
                    let event =
                        FaultEvent::Retire { router: rng.gen_range(0..config.routers), force: rng.gen_bool(0.3) };
                    plan.between_upgrades = Some((after, event));
                }
            }
        }
        plan.timed.sort_by_key(|(t, _)| *t);
        plan
    }

    /// The plan of a named scenario: light network noise plus the scenario's fault.
    pub fn scenario(scenario: Scenario, config: &SimConfig, rng: &mut ChaCha8Rng) -> FaultPlan {
        if scenario == Scenario::CoordinatorsDown {
            return FaultPlan::coordinators_down(config, rng);
        }
        if scenario == Scenario::Disaster {
            return FaultPlan { between_upgrades: Some((1, FaultEvent::Disaster)), ..FaultPlan::quiet(rng) };
        }
        if scenario == Scenario::DisasterDuringFreeze {
            let when = FaultPlan::during_a_switch(config, rng);
            return FaultPlan {
                triggered: vec![Triggered { when, event: FaultEvent::Disaster }],
                ..FaultPlan::quiet(rng)
            };
        }
        let router = rng.gen_range(0..config.routers);
        let (when, event) = match scenario {
            Scenario::LeaderCrashDuringFreeze => (
                Condition::Freezing { after_ms: rng.gen_range(0..30) },
                FaultEvent::Crash { target: Target::Leader, down_ms: Some(rng.gen_range(300..3_000)) },
            ),
            // As its `Frozen` ack leaves (a freeze in one datacenter takes a few milliseconds,
            // less than any fixed delay after it is seen).
            Scenario::RouterPartitionedDuringFreeze => (
                Condition::RouterAcked { router },
                FaultEvent::Isolate { target: Target::Router(router), duration_ms: rng.gen_range(500..4_000) },
            ),
            Scenario::DataNodeCrashMidTransform => (
                Condition::Copying { data: rng.gen_range(0..config.data_nodes) },
                FaultEvent::Crash { target: Target::Data(0), down_ms: Some(rng.gen_range(200..2_000)) },
            ),
            Scenario::CommitLostToRouter => {
                (Condition::Freezing { after_ms: 0 }, FaultEvent::LoseCommit { router, count: rng.gen_range(1..=4) })
            }
            Scenario::CoordinatorsDown
            | Scenario::Disaster
            | Scenario::DisasterUnderFaults
            | Scenario::DisasterDuringFreeze
            | Scenario::DisasterDuringFreezeUnderFaults => {
                unreachable!("planned above")
            }
        };
        let event = match (when, event) {
            (Condition::Copying { data }, FaultEvent::Crash { down_ms, .. }) => {
                FaultEvent::Crash { target: Target::Data(data), down_ms }
            }
            (_, e) => e,
        };
        FaultPlan { triggered: vec![Triggered { when, event }], ..FaultPlan::quiet(rng) }
    }

    /// A moment of a switch, a third of seeds each: as a router freezes (before its ack), as its
    /// ack leaves, or as it acts on the commit. Some routers then hold the freeze, some may have
    /// acked, and the commit may be decided and held by some disks only.
    fn during_a_switch(config: &SimConfig, rng: &mut ChaCha8Rng) -> Condition {
        let router = rng.gen_range(0..config.routers);
        match rng.gen_range(0..3) {
            0 => Condition::RouterFreezes { router },
            1 => Condition::RouterAcked { router },
            _ => Condition::RouterCommits { router },
        }
    }

    /// Light network noise and nothing else.
    fn quiet(rng: &mut ChaCha8Rng) -> FaultPlan {
        FaultPlan {
            loss: 0.0,
            duplicate: 0.0,
            jitter_max_us: rng.gen_range(0..3_000),
            late: 0.0,
            late_us_max: 0,
            safety_ms: 8_000,
            timed: Vec::new(),
            triggered: Vec::new(),
            max_attempts: 3,
            manual_switch: false,
            disk_delay_us_max: 0,
            stale_views: 0.0,
            redeliver_batches: 0.0,
            store_failures: 0.0,
            hold_queue_max: HOLD_QUEUE_MAX,
            store_delay_us_max: 0,
            reserve_router: false,
            between_upgrades: None,
        }
    }
}

impl FaultPlan {
    /// Outage of the whole coordinator for `COORDINATORS_DOWN_MS` while the data nodes copy,
    /// with every router restarted once during it, at staggered times.
    fn coordinators_down(config: &SimConfig, rng: &mut ChaCha8Rng) -> FaultPlan {
        let when = Condition::Copying { data: 0 };
        let mut triggered: Vec<Triggered> = (0..config.coordinators)
            .map(|c| Triggered {
                when,
                event: FaultEvent::Crash { target: Target::Coordinator(c), down_ms: Some(COORDINATORS_DOWN_MS) },
            })
            .collect();
        for router in 0..config.routers {
            let after_ms = rng.gen_range(1_000..COORDINATORS_DOWN_MS - 5_000);
            let event = FaultEvent::Restart { router, after_ms, down_ms: rng.gen_range(200..2_000) };
            triggered.push(Triggered { when, event });
        }
        // The faults heal after the outage (the copy starts within a few seconds).
        FaultPlan { triggered, safety_ms: COORDINATORS_DOWN_MS + 15_000, ..FaultPlan::quiet(rng) }
    }
}

/// How long the coordinator is down in the `coordinators-down` scenario.
pub const COORDINATORS_DOWN_MS: u64 = 60_000;

fn random_target(config: &SimConfig, rng: &mut ChaCha8Rng) -> Target {
    match rng.gen_range(0..4) {
        0 => Target::Coordinator(rng.gen_range(0..config.coordinators)),
        1 => Target::Leader,
        2 => Target::Router(rng.gen_range(0..config.routers)),
        _ => Target::Data(rng.gen_range(0..config.data_nodes)),
    }
}
