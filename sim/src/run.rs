//! One seed: build the world, run the safety phase with faults, heal, run the liveness phase,
//! check everything at the end.

use crate::app;
use crate::checkers::{Checker, Seen, Violation};
use crate::clients::workload;
use crate::config::SimConfig;
use crate::faults::FaultPlan;
use crate::inject::{fire, heal, timed_faults};
use crate::net::NetModel;
use crate::net::ProcId;
use crate::operator::run_chain;
use crate::oracle::Oracle;
use crate::procs::{DataProc, RouterProc};
use crate::trace::Trace;
use crate::world::*;
use coordinator::raft::{read_disk, seed_runtime_rng, RaftTiming};
use coordinator::upgrade::UpgradeState;
use protocol::messages::Phase;
use protocol::plan::Plan;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How one seed ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedOutcome {
    Switched,
    RolledBack,
    /// The upgrade did not end within the liveness bound (a violation).
    Unfinished,
}

/// Everything measured in one seed.
#[derive(Debug, Clone)]
pub struct SeedReport {
    pub seed: u64,
    pub outcome: SeedOutcome,
    pub aborted_epochs: u64,
    /// Why each freeze was aborted, and why the upgrade was rolled back if that was not a freeze.
    pub abort_reasons: Vec<String>,
    pub violations: Vec<Seen>,
    pub sim_ms: u64,
    pub trace_hash: u64,
    pub trace_events: u64,
    pub trace_lines: Option<Vec<String>>,
    pub hold_ms: Vec<u64>,
    pub startup_hold_ms: Vec<u64>,
    /// Held by routers restarted on their own disk while their boot record was written.
    pub boot_hold_ms: Vec<u64>,
    /// Requests in flight ended by routers at a freeze.
    pub ended: u64,
    /// Store operations failed by the store fault (tried again by the data nodes).
    pub store_failures: u64,
    /// From the first freeze to the commit, if it switched.
    pub switch_ms: Option<u64>,
    pub messages: u64,
    pub dropped: u64,
    pub acked_writes: u64,
    pub failed_writes: u64,
    pub unknown_writes: u64,
    /// Client requests of any kind that did not succeed (unknown outcomes included).
    pub failed_requests: u64,
    pub fault_log: Vec<String>,
    pub copying_seen: bool,
    /// Ranges of old keys data nodes compared while traffic ran.
    pub ranges_compared: u64,
    pub abandoned: u64,
    /// Raft snapshots built and installed over all replicas.
    pub snapshots_built: u64,
    pub snapshots_installed: u64,
    /// Upgrades asked for, started, and switched (each commits at most one epoch).
    pub upgrades_asked: u32,
    pub upgrades_run: u64,
    pub upgrades_switched: u64,
    /// Routers that joined the roster during the seed, and routers retired.
    pub routers_joined: u64,
    pub routers_retired: u64,
}

/// Small, so that snapshots, log purges and snapshot installs happen within a seed.
const SNAPSHOT_EVERY_LOGS: u64 = 40;
const SETTLE_MS: u64 = 500;
const DRAIN_CLIENTS_MS: u64 = 3_000;
/// How long the end-of-run probe writes may take.
const PROBE_WAIT_MS: u64 = 3_000;

/// Runs one seed to completion (deterministic: the same seed gives the same report).
pub fn run_seed(config: &SimConfig, seed: u64) -> SeedReport {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder
        .enable_time()
        .start_paused(true)
        .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()))
        // A panic in any task must fail the seed, not vanish with its task.
        .unhandled_panic(tokio::runtime::UnhandledPanic::ShutdownRuntime);
    let runtime = builder.build().expect("a current-thread runtime builds");
    seed_runtime_rng(seed ^ 0x005e_ed0f_0af7);
    // Actors run on a LocalSet (actix spawns with spawn_local); a panic in any local task must
    // fail the seed too.
    let mut local = tokio::task::LocalSet::new();
    local.unhandled_panic(tokio::runtime::UnhandledPanic::ShutdownRuntime);
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| local.block_on(&runtime, run(config.clone(), seed))));
    drop(runtime);
    outcome.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a task panicked".to_string());
        SeedReport::panicked(seed, what)
    })
}

impl SeedReport {
    fn panicked(seed: u64, what: String) -> SeedReport {
        SeedReport {
            seed,
            outcome: SeedOutcome::Unfinished,
            aborted_epochs: 0,
            abort_reasons: Vec::new(),
            violations: vec![Seen { at_us: 0, violation: Violation::Panic { what } }],
            sim_ms: 0,
            trace_hash: 0,
            trace_events: 0,
            trace_lines: None,
            hold_ms: Vec::new(),
            startup_hold_ms: Vec::new(),
            boot_hold_ms: Vec::new(),
            ended: 0,
            store_failures: 0,
            switch_ms: None,
            messages: 0,
            dropped: 0,
            acked_writes: 0,
            failed_writes: 0,
            unknown_writes: 0,
            failed_requests: 0,
            fault_log: Vec::new(),
            copying_seen: false,
            ranges_compared: 0,
            abandoned: 0,
            snapshots_built: 0,
            snapshots_installed: 0,
            upgrades_asked: 0,
            upgrades_run: 0,
            upgrades_switched: 0,
            routers_joined: 0,
            routers_retired: 0,
        }
    }
}

fn build(config: SimConfig, seed: u64) -> Shared {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut faults = FaultPlan::draw(&config, &mut rng);
    faults.draw_store_failures(&config, seed);
    // Across datacenters a switch needs several 100–300 ms round trips: hold and freeze longer.
    // (Measured: a fault-free switch across 3 datacenters takes ~1.7 s from freeze to commit, its
    // tail ~3 s; `sim/benches/throughput.rs` reports it.)
    let (hold_ms_max, freeze_timeout_ms) = if config.wide_area() { (5_000, 8_000) } else { (1_000, 2_500) };
    let plan_text = app::plan_toml(
        protocol::Generation::GENESIS,
        config.routers,
        config.data_nodes,
        faults.max_attempts,
        hold_ms_max,
        faults.hold_queue_max,
        freeze_timeout_ms,
        faults.manual_switch,
    );
    let plan = Plan::from_toml("sim-plan.toml", &plan_text).expect("the simulator's plan is valid");
    let mapping = plan.mapping().expect("the simulator's transforms fit");
    let fidelity = crate::checkers::fidelity::Fidelity::new(&mapping);
    let mut net = NetModel::new(config.datacenters, &mut rng);
    net.loss = faults.loss;
    net.duplicate = faults.duplicate;
    net.jitter_max_us = faults.jitter_max_us;
    net.late = faults.late;
    net.late_us_max = faults.late_us_max;
    let wide = config.wide_area();
    let timing = if wide {
        // openraft 0.9 times out AppendEntries after one heartbeat interval: it must exceed the
        // worst round trip (2 × 150 ms + jitter).
        RaftTiming {
            heartbeat_ms: 500,
            election_min_ms: 2_000,
            election_max_ms: 4_000,
            snapshot_every_logs: SNAPSHOT_EVERY_LOGS,
        }
    } else {
        RaftTiming { snapshot_every_logs: SNAPSHOT_EVERY_LOGS, ..RaftTiming::default() }
    };
    let mut procs = BTreeMap::new();
    let dcs = config.datacenters;
    for i in 0..config.coordinators {
        procs.insert(coordinator_addr(i), ProcInfo { up: false, incarnation: 0 });
        net.dc_of.insert(coordinator_addr(i), i % dcs);
    }
    // A reserve router slot (not in the plan, not on the roster) if the seed may join one.
    let router_slots = config.routers + usize::from(faults.reserve_router);
    for i in 0..router_slots {
        procs.insert(ProcId::Router(i).addr(), ProcInfo { up: true, incarnation: 1 });
        net.dc_of.insert(ProcId::Router(i).addr(), i % dcs);
    }
    for i in 0..config.data_nodes {
        procs.insert(ProcId::Data(i).addr(), ProcInfo { up: true, incarnation: 1 });
        net.dc_of.insert(ProcId::Data(i).addr(), i % dcs);
    }
    procs.insert(ProcId::Operator.addr(), ProcInfo { up: true, incarnation: 1 });
    net.dc_of.insert(ProcId::Operator.addr(), 0);
    // Cores say when they next need their shell: a hold ends exactly at its deadline.
    let hold_bound_ms = plan.thresholds.hold_ms_max;
    let mut fault_log = Vec::new();
    if faults.manual_switch {
        fault_log.push("plan: switch = manual (the operator requests the switch)".to_string());
    }
    let world = World {
        seed,
        start: virtual_now(),
        now_us: std::cell::Cell::new(None),
        rng,
        net,
        procs,
        // The cluster starts with the plan's routers on its roster (the cluster file's).
        replicas: replica_slots(
            config.coordinators,
            crate::config::Bug::apply(config.bug),
            &UpgradeState::with_roster(plan.nodes_with(protocol::Duty::Route).cloned()),
        ),
        routers: Vec::new(),
        data: Vec::new(),
        mapping,
        faults,
        oracle: Oracle::initial(config.initial_users as i64, config.initial_items as i64),
        checker: Checker::new(hold_bound_ms),
        fidelity,
        trace: Trace::new(config.trace_lines),
        stats: Stats { fault_log, ..Stats::default() },
        timing,
        agent_timeout_ms: if wide { 1_500 } else { 500 },
        data_timeout_ms: if wide { 2_000 } else { 1_000 },
        healed: false,
        healthy_from_us: u64::MAX,
        freeze_skews: None,
        next_user: config.initial_users as i64,
        next_item: config.initial_items as i64,
        lose_commit: BTreeMap::new(),
        lost_groups: Vec::new(),
        recovering: false,
        started: Vec::new(),
        disks_lost: Default::default(),
        views_sent: BTreeMap::new(),
        me: std::sync::Weak::new(),
        plan,
        config,
    };
    let shared = Arc::new(Mutex::new(world));
    with(&shared, |w| {
        w.me = Arc::downgrade(&shared);
        w.routers = (0..w.config.routers).map(RouterProc::new).collect();
        if w.faults.reserve_router {
            let mut reserve = RouterProc::new(w.config.routers);
            (reserve.deployed, reserve.in_rotation) = (false, false);
            w.routers.push(reserve);
        }
        w.data = (0..w.config.data_nodes).map(|i| DataProc::new(i, &w.plan.old_schema, &w.mapping)).collect();
        let shards = w.config.data_nodes as i64;
        for id in 0..w.config.initial_users as i64 {
            w.data[id.rem_euclid(shards) as usize].old.write(&app::initial_user(id));
        }
        for id in 0..w.config.initial_items as i64 {
            w.data[id.rem_euclid(shards) as usize].old.write(&app::initial_item(id));
        }
        w.fidelity.shards =
            w.data.iter().map(|d| crate::checkers::fidelity::History::initial(d.old.tables())).collect();
        for i in 0..w.routers.len() {
            let name = w.routers[i].name.clone();
            if !w.routers[i].deployed {
                // The reserve: no process, no disk state of its own.
                w.procs.get_mut(&w.routers[i].addr).expect("registered").up = false;
                continue;
            }
            w.routers[i].disk = w.deployed_disk(&name);
            w.procs.get_mut(&w.routers[i].addr).expect("registered").up = false;
            w.restart_router(i);
        }
        for i in 0..w.data.len() {
            let name = w.data[i].name.clone();
            w.data[i].disk = w.deployed_disk(&name);
            w.procs.get_mut(&w.data[i].addr).expect("registered").up = false;
            w.restart_data(i);
        }
    });
    shared
}

async fn run(config: SimConfig, seed: u64) -> SeedReport {
    let shared = build(config, seed);
    let coordinators = with(&shared, |w| w.config.coordinators);
    for i in 0..coordinators {
        start_replica(&shared, i).await;
    }
    let first = with(&shared, |w| w.replicas[0].running.clone()).expect("replica 0 started");
    let members: BTreeMap<u64, openraft::BasicNode> =
        (0..coordinators).map(|i| (coordinator_addr(i), openraft::BasicNode::default())).collect();
    if let Err(e) = first.raft.initialize(members).await {
        with(&shared, |w| {
            let now = w.now_us();
            w.checker.violation(now, Violation::Setup { what: format!("cluster initialization failed: {e}") })
        });
    }
    let (tick_ms, safety_ms, bound_ms) =
        // Every upgrade of the chain still to run after the heal gets the bound.
        with(&shared, |w| (w.config.tick_ms, w.faults.safety_ms, w.config.liveness_bound_ms * u64::from(w.config.upgrades)));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    tokio::task::spawn_local(ticker(shared.clone(), tick_ms));
    tokio::task::spawn_local(workload(shared.clone(), running.clone()));
    tokio::task::spawn_local(timed_faults(shared.clone()));
    tokio::task::spawn_local(run_chain(shared.clone()));
    tokio::task::spawn_local(crate::clients::abort_on_mismatches(shared.clone()));

    tokio::time::sleep(Duration::from_millis(safety_ms)).await;
    heal(&shared).await;
    let healed_at = virtual_now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if with(&shared, |w| w.finished()) {
            break;
        }
        if healed_at.elapsed() > Duration::from_millis(bound_ms) {
            with(&shared, |w| {
                let now = w.now_us();
                let state = w.freshest_state();
                let (phase, reason) =
                    state.current.as_ref().map_or((None, None), |u| (Some(u.phase), u.last_abort_reason.clone()));
                let blockers = coordinator::upgrade::status(&state).gate_blockers;
                let routers: Vec<String> = w
                    .routers
                    .iter()
                    .map(|r| format!("{}={:?}/held {}", r.name, r.observed.mode, r.observed.held))
                    .collect();
                let found = Violation::NotSettled { bound_ms, phase, last_abort: reason, blockers, routers };
                w.checker.violation(now, found);
            });
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    running.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(DRAIN_CLIENTS_MS)).await;
    let probes = with(&shared, |w| w.finished().then(|| w.send_probes()));
    if let Some(probes) = probes {
        tokio::time::sleep(Duration::from_millis(PROBE_WAIT_MS)).await;
        with(&shared, |w| w.check_probes(&probes));
    }
    with(&shared, |w| w.final_checks());
    with(&shared, |w| w.report())
}

async fn ticker(shared: Shared, tick_ms: u64) {
    let mut interval = tokio::time::interval(Duration::from_millis(tick_ms));
    let mut n: u64 = 0;
    loop {
        interval.tick().await;
        n += 1;
        let triggers = with(&shared, |w| {
            // The nodes run on their own timers; this tick only observes (for checkers and
            // triggered faults).
            for i in 0..w.routers.len() {
                if let Some(since) = w.routers[i].observed.oldest_held_ms {
                    let (now_us, now_ms, name) = (w.now_us(), w.now_ms(), w.routers[i].name.clone());
                    let found = w.checker.bounded_hold.holding(&name, since, now_ms);
                    w.checker.found(now_us, found);
                }
            }
            w.observe_phases();
            w.watch_freezes();
            if n.is_multiple_of(5) {
                w.scan_replicas();
            }
            w.due_triggers()
        });
        for (after_ms, event) in triggers {
            let shared = shared.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                fire(&shared, event).await;
            });
        }
    }
}

impl World {
    fn report(&mut self) -> SeedReport {
        let state = self.freshest_state();
        let outcome = match state.current.as_ref().map(|u| u.phase) {
            Some(Phase::Done) => SeedOutcome::Switched,
            Some(Phase::RolledBack) => SeedOutcome::RolledBack,
            _ => SeedOutcome::Unfinished,
        };
        let aborted_epochs =
            state.outcomes.values().filter(|o| matches!(o, coordinator::upgrade::Outcome::Aborted { .. })).count()
                as u64;
        let mut abort_reasons: Vec<String> = state
            .outcomes
            .values()
            .filter_map(|o| match o {
                coordinator::upgrade::Outcome::Aborted { reason } => Some(reason.clone()),
                coordinator::upgrade::Outcome::Committed => None,
            })
            .collect();
        if let Some(reason) = state.current.as_ref().and_then(|u| u.last_abort_reason.clone()) {
            if !abort_reasons.contains(&reason) {
                abort_reasons.push(reason);
            }
        }
        let switch_ms = match (self.stats.first_freeze_us, self.stats.switched_us) {
            (Some(a), Some(b)) => Some((b.saturating_sub(a)) / 1000),
            _ => None,
        };
        SeedReport {
            seed: self.seed,
            outcome,
            aborted_epochs,
            abort_reasons,
            violations: self.checker.violations.clone(),
            sim_ms: self.now_ms(),
            trace_hash: self.trace.hash(),
            trace_events: self.trace.events,
            trace_lines: self.trace.lines().map(|l| l.to_vec()),
            hold_ms: std::mem::take(&mut self.stats.hold_ms),
            startup_hold_ms: std::mem::take(&mut self.stats.startup_hold_ms),
            boot_hold_ms: std::mem::take(&mut self.stats.boot_hold_ms),
            ended: self.stats.ended,
            store_failures: self.stats.store_failures,
            switch_ms,
            messages: self.net.sent,
            dropped: self.net.dropped,
            acked_writes: self.oracle.acked,
            failed_writes: self.oracle.failed,
            unknown_writes: self.oracle.unknown,
            failed_requests: self.stats.failed_requests,
            fault_log: self.stats.fault_log.clone(),
            copying_seen: !self.stats.copying_seen.is_empty(),
            ranges_compared: self.stats.ranges_compared,
            abandoned: self.stats.abandoned,
            snapshots_built: self.replicas.iter().map(|r| read_disk(&r.disk, |d| d.snapshots_built)).sum(),
            snapshots_installed: self.replicas.iter().map(|r| read_disk(&r.disk, |d| d.snapshots_installed)).sum(),
            upgrades_asked: self.config.upgrades,
            upgrades_run: state.upgrades_started,
            upgrades_switched: state
                .outcomes
                .values()
                .filter(|o| matches!(o, coordinator::upgrade::Outcome::Committed))
                .count() as u64,
            // The cluster starts with router-0 .. router-(n-1); any other on the roster joined.
            routers_joined: state
                .roster
                .keys()
                .filter(|n| !(0..self.config.routers).any(|i| n.0 == format!("router-{i}")))
                .count() as u64,
            routers_retired: state
                .roster
                .values()
                .filter(|s| matches!(s, protocol::messages::RosterStatus::Retired))
                .count() as u64,
        }
    }
}
