//! One seed: build the world, run the safety phase with faults, heal, run the liveness phase,
//! check everything at the end.

use crate::app::{self, AppOp};
use crate::checker::Checker;
use crate::config::SimConfig;
use crate::data::DataProc;
use crate::faults::{Condition, FaultEvent, FaultPlan, Target};
use crate::net::NetModel;
use crate::oracle::{ClientOutcome, Oracle};
use crate::router::RouterProc;
use crate::trace::Trace;
use crate::world::*;
use coordinator::raft::{read_disk, seed_runtime_rng, RaftTiming};
use node::duties::router::Mode;
use protocol::messages::{CliRequest, CliResponse, Phase, Request, Response};
use protocol::plan::Plan;
use protocol::schema::Value;
use protocol::Universe;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
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
    pub violations: Vec<String>,
    pub sim_ms: u64,
    pub trace_hash: u64,
    pub trace_events: u64,
    pub trace_lines: Option<Vec<String>>,
    pub hold_ms: Vec<u64>,
    pub startup_hold_ms: Vec<u64>,
    /// From the first freeze to the commit, if it switched.
    pub switch_ms: Option<u64>,
    pub messages: u64,
    pub dropped: u64,
    pub acked_writes: u64,
    pub failed_writes: u64,
    pub unknown_writes: u64,
    pub fault_log: Vec<String>,
    pub copying_seen: bool,
    /// Raft snapshots built and installed over all replicas.
    pub snapshots_built: u64,
    pub snapshots_installed: u64,
}

const START_UPGRADE_MS: u64 = 200;
/// Small, so that snapshots, log purges and snapshot installs happen within a seed.
const SNAPSHOT_EVERY_LOGS: u64 = 40;
const SETTLE_MS: u64 = 500;
const DRAIN_CLIENTS_MS: u64 = 3_000;

/// Runs one seed to completion (deterministic: the same seed gives the same report).
pub fn run_seed(config: &SimConfig, seed: u64) -> SeedReport {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    #[cfg(tokio_unstable)]
    builder
        .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()))
        // A panic in any task must fail the seed, not vanish with its task.
        .unhandled_panic(tokio::runtime::UnhandledPanic::ShutdownRuntime);
    let runtime = builder.build().expect("a current-thread runtime builds");
    seed_runtime_rng(seed ^ 0x005e_ed0f_0af7);
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(run(config.clone(), seed))));
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
            violations: vec![format!("panic: {what}")],
            sim_ms: 0,
            trace_hash: 0,
            trace_events: 0,
            trace_lines: None,
            hold_ms: Vec::new(),
            startup_hold_ms: Vec::new(),
            switch_ms: None,
            messages: 0,
            dropped: 0,
            acked_writes: 0,
            failed_writes: 0,
            unknown_writes: 0,
            fault_log: Vec::new(),
            copying_seen: false,
            snapshots_built: 0,
            snapshots_installed: 0,
        }
    }
}

fn build(config: SimConfig, seed: u64) -> Shared {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let faults = FaultPlan::draw(&config, &mut rng);
    // Across datacenters a switch needs several 100–300 ms round trips: hold and freeze longer.
    // (Measured: a fault-free switch across 3 datacenters takes ~1.7 s from freeze to commit, its
    // tail ~3 s; `sim/benches/throughput.rs` reports it.)
    let (hold_max_ms, freeze_timeout_ms) = if config.wide_area() { (5_000, 8_000) } else { (1_000, 2_500) };
    let plan_text = app::plan_toml(
        config.routers,
        config.data_nodes,
        faults.max_attempts,
        hold_max_ms,
        freeze_timeout_ms,
        faults.manual_switch,
    );
    let plan = Plan::from_toml("sim-plan.toml", &plan_text).expect("the simulator's plan is valid");
    let mapping = plan.mapping().expect("the simulator's transforms fit");
    let mut net = NetModel::new(config.datacenters, &mut rng);
    net.loss = faults.loss;
    net.duplicate = faults.duplicate;
    net.jitter_max_us = faults.jitter_max_us;
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
    for i in 0..config.routers {
        procs.insert(ROUTER_BASE + i as u64, ProcInfo { up: true, incarnation: 1 });
        net.dc_of.insert(ROUTER_BASE + i as u64, i % dcs);
    }
    for i in 0..config.data_nodes {
        procs.insert(DATA_BASE + i as u64, ProcInfo { up: true, incarnation: 1 });
        net.dc_of.insert(DATA_BASE + i as u64, i % dcs);
    }
    procs.insert(OPERATOR, ProcInfo { up: true, incarnation: 1 });
    net.dc_of.insert(OPERATOR, 0);
    let hold_bound_ms = plan.thresholds.hold_max_ms + config.tick_ms;
    let mut fault_log = Vec::new();
    if faults.manual_switch {
        fault_log.push("plan: switch = manual (the operator requests the switch)".to_string());
    }
    let world = World {
        seed,
        start: virtual_now(),
        rng,
        net,
        procs,
        replicas: replica_slots(config.coordinators),
        routers: Vec::new(),
        data: Vec::new(),
        mapping,
        faults,
        oracle: Oracle::default(),
        checker: Checker::new(hold_bound_ms),
        trace: Trace::new(config.trace_lines),
        stats: Stats { fault_log, ..Stats::default() },
        timing,
        agent_timeout_ms: if wide { 1_500 } else { 500 },
        data_timeout_ms: if wide { 2_000 } else { 1_000 },
        healed: false,
        next_user: config.initial_users as i64,
        next_item: config.initial_items as i64,
        lose_commit: BTreeMap::new(),
        me: std::sync::Weak::new(),
        plan,
        config,
    };
    let shared = Arc::new(Mutex::new(world));
    with(&shared, |w| {
        w.me = Arc::downgrade(&shared);
        w.routers = (0..w.config.routers).map(|i| RouterProc::new(w, i)).collect();
        w.data = (0..w.config.data_nodes).map(|i| DataProc::new(w, i)).collect();
        let shards = w.config.data_nodes as i64;
        for id in 0..w.config.initial_users as i64 {
            w.data[id.rem_euclid(shards) as usize].old.write(&app::initial_user(id));
        }
        for id in 0..w.config.initial_items as i64 {
            w.data[id.rem_euclid(shards) as usize].old.write(&app::initial_item(id));
        }
        for i in 0..w.routers.len() {
            w.procs.get_mut(&w.routers[i].addr).expect("registered").up = false;
            w.restart_router(i);
        }
        for i in 0..w.data.len() {
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
            w.checker.violation(now, format!("cluster initialization failed: {e}"))
        });
    }
    let (tick_ms, safety_ms, bound_ms) =
        with(&shared, |w| (w.config.tick_ms, w.faults.safety_ms, w.config.liveness_bound_ms));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    tokio::spawn(ticker(shared.clone(), tick_ms));
    tokio::spawn(workload(shared.clone(), running.clone()));
    tokio::spawn(timed_faults(shared.clone()));
    tokio::spawn(operator(shared.clone()));

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
                let routers: Vec<String> = w
                    .routers
                    .iter()
                    .map(|r| format!("{}={:?}/held {}", r.name, r.core.mode(), r.core.held()))
                    .collect();
                w.checker.violation(
                    now,
                    format!("liveness: not settled {bound_ms} ms after faults healed (phase {phase:?}, last abort {reason:?}, routers {routers:?})"),
                );
            });
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    running.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(DRAIN_CLIENTS_MS)).await;
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
            for i in 0..w.routers.len() {
                if w.procs[&w.routers[i].addr].up {
                    w.router_tick(i);
                }
            }
            for i in 0..w.data.len() {
                if w.procs[&w.data[i].addr].up {
                    w.data_tick(i);
                }
            }
            w.observe_phases();
            if n.is_multiple_of(5) {
                w.scan_replicas();
            }
            w.due_triggers()
        });
        for (after_ms, event) in triggers {
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                fire(&shared, event).await;
            });
        }
    }
}

async fn workload(shared: Shared, running: Arc<std::sync::atomic::AtomicBool>) {
    while running.load(Ordering::Relaxed) {
        let wait_us = with(&shared, |w| {
            let rate = w.config.client_rate_per_s.max(1.0);
            let u: f64 = w.rng.gen_range(f64::EPSILON..1.0);
            (-u.ln() / rate * 1e6) as u64
        });
        tokio::time::sleep(Duration::from_micros(wait_us.max(1))).await;
        with(&shared, |w| {
            let router = w.rng.gen_range(0..w.routers.len());
            let op = w.next_op();
            w.client_arrival(router, op);
        });
    }
}

async fn operator(shared: Shared) {
    tokio::time::sleep(Duration::from_millis(START_UPGRADE_MS)).await;
    let (plan, coordinators) = with(&shared, |w| (w.plan.clone(), w.config.coordinators));
    let mut target = 0;
    loop {
        let start = CliRequest::Start { plan: plan.clone(), token: "sim-operator-start".into() };
        let answer = operator_call(&shared, coordinator_addr(target), Request::Cli(start)).await;
        match answer {
            Some(Response::Cli(CliResponse::Started { upgrade })) => {
                with(&shared, |w| w.record(format_args!("operator: upgrade {} started", upgrade.0)));
                if plan.switch == protocol::plan::SwitchMode::Manual {
                    request_switch(&shared).await;
                }
                return;
            }
            Some(Response::Cli(CliResponse::NotLeader { leader: Some(l) })) => target = (l - 1) as usize,
            _ => {
                target = (target + 1) % coordinators;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Manual mode: a persistent operator asks for the switch whenever the upgrade is syncing
/// (again after an abort, which clears the request) until the upgrade ends.
async fn request_switch(shared: &Shared) {
    let coordinators = with(shared, |w| w.config.coordinators);
    let mut target = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let state = with(shared, |w| w.freshest_state());
        let Some(upgrade) = state.current else { continue };
        if upgrade.phase.is_terminal() {
            return;
        }
        if upgrade.phase != Phase::Syncing || upgrade.switch_requested {
            continue;
        }
        match operator_call(shared, coordinator_addr(target), Request::Cli(CliRequest::Switch)).await {
            Some(Response::Cli(CliResponse::Accepted)) => {
                with(shared, |w| w.record(format_args!("operator: switch requested")));
            }
            Some(Response::Cli(CliResponse::NotLeader { leader: Some(l) })) => target = (l - 1) as usize,
            Some(Response::Cli(CliResponse::Rejected { .. })) => {}
            _ => target = (target + 1) % coordinators,
        }
    }
}

async fn operator_call(shared: &Shared, to: u64, request: Request) -> Option<Response> {
    let transport = SimTransport { world: Arc::downgrade(shared), me: OPERATOR };
    coordinator::raft::Transport::call(&transport, to, request, Duration::from_millis(3_000)).await.ok()
}

async fn timed_faults(shared: Shared) {
    let events = with(&shared, |w| w.faults.timed.clone());
    let start = with(&shared, |w| w.start);
    for (at_ms, event) in events {
        tokio::time::sleep_until(start + Duration::from_millis(at_ms)).await;
        if with(&shared, |w| w.healed) {
            return;
        }
        fire(&shared, event).await;
    }
}

/// Applies one fault now.
async fn fire(shared: &Shared, event: FaultEvent) {
    if with(shared, |w| w.healed) {
        return;
    }
    with(shared, |w| {
        let line = format!("{:.3}s {event:?}", w.now_us() as f64 / 1e6);
        w.record(format_args!("fault: {line}"));
        w.stats.fault_log.push(line);
    });
    match event {
        FaultEvent::Partition { side_share, symmetric, duration_ms } => {
            let id = with(shared, |w| {
                let all: Vec<u64> = w.procs.keys().copied().filter(|a| *a != OPERATOR).collect();
                let (mut a, mut b) = (BTreeSet::new(), BTreeSet::new());
                for addr in all {
                    if w.rng.gen_bool(side_share) {
                        a.insert(addr);
                    } else {
                        b.insert(addr);
                    }
                }
                w.net.add_partition(a, b, symmetric)
            });
            heal_later(shared, duration_ms, move |w| w.net.remove_partition(id));
        }
        FaultEvent::Isolate { target, duration_ms } => {
            // Cut the target off from every coordinator, both ways (a coordinator: from everyone).
            let id = with(shared, |w| {
                let addr = w.resolve(target)?;
                let others: BTreeSet<u64> = if addr < ROUTER_BASE {
                    w.procs.keys().copied().filter(|a| *a != addr).collect()
                } else {
                    (0..w.config.coordinators).map(coordinator_addr).collect()
                };
                Some(w.net.add_partition(BTreeSet::from([addr]), others, true))
            });
            if let Some(id) = id {
                heal_later(shared, duration_ms, move |w| w.net.remove_partition(id));
            }
        }
        FaultEvent::Crash { target, down_ms } => {
            let addr = with(shared, |w| w.resolve(target));
            let Some(addr) = addr else { return };
            crash(shared, addr);
            if let Some(down_ms) = down_ms {
                let shared = shared.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(down_ms)).await;
                    if !with(&shared, |w| w.healed) {
                        restart(&shared, addr).await;
                    }
                });
            }
        }
        FaultEvent::Garbage { target, frames } => {
            with(shared, |w| {
                if let Some(addr) = w.resolve(target) {
                    for _ in 0..frames {
                        let frame = garbage_frame(&mut w.rng);
                        w.inject(OPERATOR, addr, frame);
                    }
                }
            });
        }
        FaultEvent::OperatorAbort => {
            let shared = shared.clone();
            tokio::spawn(async move {
                // Like the CLI: try a replica, follow a leader hint, give up after a few tries.
                let mut target = with(&shared, |w| w.rng.gen_range(0..w.config.coordinators));
                for _ in 0..3 {
                    let abort = CliRequest::Abort { reason: "operator changed their mind".into() };
                    let answer = operator_call(&shared, coordinator_addr(target), Request::Cli(abort)).await;
                    with(&shared, |w| w.record(format_args!("operator abort answered {answer:?}")));
                    match answer {
                        Some(Response::Cli(CliResponse::NotLeader { leader: Some(l) })) => target = (l - 1) as usize,
                        Some(_) => return,
                        None => target = (target + 1) % with(&shared, |w| w.config.coordinators),
                    }
                }
            });
        }
        FaultEvent::ClockJump { replica, delta_ms } => {
            with(shared, |w| w.replicas[replica].skew_ms.fetch_add(delta_ms, Ordering::Relaxed));
        }
        FaultEvent::LoseCommit { router, count } => {
            with(shared, |w| {
                let addr = w.routers[router].addr;
                *w.lose_commit.entry(addr).or_default() += count;
            });
        }
    }
}

/// Random bytes, half of them behind a valid frame header (so the payload decoder is hit).
fn garbage_frame(rng: &mut ChaCha8Rng) -> Vec<u8> {
    let len = rng.gen_range(0..64);
    let payload: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
    if rng.gen_bool(0.5) {
        let mut frame = protocol::codec::MAGIC.to_vec();
        frame.extend_from_slice(&protocol::codec::PROTOCOL_VERSION.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame
    } else {
        payload
    }
}

fn heal_later(shared: &Shared, after_ms: u64, f: impl FnOnce(&mut World) + Send + 'static) {
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        with(&shared, f);
    });
}

fn crash(shared: &Shared, addr: u64) {
    if addr < ROUTER_BASE {
        crash_replica(shared, (addr - 1) as usize);
    } else if addr < DATA_BASE {
        with(shared, |w| w.crash_router((addr - ROUTER_BASE) as usize));
    } else {
        with(shared, |w| w.crash_data((addr - DATA_BASE) as usize));
    }
}

async fn restart(shared: &Shared, addr: u64) {
    if addr < ROUTER_BASE {
        if !with(shared, |w| w.procs[&addr].up) {
            start_replica(shared, (addr - 1) as usize).await;
        }
    } else if addr < DATA_BASE {
        with(shared, |w| w.restart_router((addr - ROUTER_BASE) as usize));
    } else {
        with(shared, |w| w.restart_data((addr - DATA_BASE) as usize));
    }
}

/// Ends the safety phase: no more faults, everything down restarts.
async fn heal(shared: &Shared) {
    let down = with(shared, |w| {
        w.healed = true;
        w.net.heal();
        w.lose_commit.clear();
        w.record(format_args!("faults healed"));
        w.procs.iter().filter(|(_, p)| !p.up).map(|(a, _)| *a).collect::<Vec<_>>()
    });
    for addr in down {
        restart(shared, addr).await;
    }
}

impl World {
    /// The address a fault target names now.
    pub fn resolve(&self, target: Target) -> Option<u64> {
        match target {
            Target::Coordinator(i) => Some(coordinator_addr(i)),
            Target::Leader => self.leader().map(coordinator_addr),
            Target::Router(i) => Some(self.routers[i].addr),
            Target::Data(i) => Some(self.data[i].addr),
        }
    }

    /// Triggered faults whose condition now holds (each fires once).
    fn due_triggers(&mut self) -> Vec<(u64, FaultEvent)> {
        if self.healed || self.faults.triggered.is_empty() {
            return Vec::new();
        }
        let freezing = self.stats.first_freeze_us.is_some();
        let mut due = Vec::new();
        let mut keep = Vec::new();
        for t in std::mem::take(&mut self.faults.triggered) {
            match t.when {
                Condition::Freezing { after_ms } if freezing => due.push((after_ms, t.event)),
                Condition::Copying { data } if self.stats.copying_seen.get(&data).copied().unwrap_or(false) => {
                    due.push((0, t.event))
                }
                _ => keep.push(t),
            }
        }
        self.faults.triggered = keep;
        due
    }

    fn next_op(&mut self) -> AppOp {
        let roll = self.rng.gen_range(0..100);
        let users = self.next_user.max(1);
        match roll {
            0..=39 => AppOp::ViewUser { id: self.rng.gen_range(0..users) },
            40..=49 => AppOp::ViewItem { id: self.rng.gen_range(0..self.next_item.max(1)) },
            50..=79 => {
                let id = self.next_user;
                self.next_user += 1;
                AppOp::RegisterUser {
                    id,
                    name: format!("user{id}"),
                    email: format!("u{id}@example.org"),
                    bio: format!("new{id}"),
                }
            }
            80..=94 => {
                let id = self.rng.gen_range(0..users);
                let tag: u64 = self.rng.gen();
                AppOp::UpdateBio { id, bio: format!("b{tag:016x}") }
            }
            _ => {
                let id = self.next_item;
                self.next_item += 1;
                AppOp::AddItem { id, title: format!("item{id}"), seller: id % 7, price: 100 + id }
            }
        }
    }

    /// The upgrade ended and every router serves the final universe with nothing held.
    fn finished(&self) -> bool {
        let state = self.freshest_state();
        let Some(upgrade) = state.current.as_ref() else { return false };
        let universe = match upgrade.phase {
            Phase::Done => Universe::New,
            Phase::RolledBack => Universe::Old,
            _ => return false,
        };
        self.routers
            .iter()
            .all(|r| self.procs[&r.addr].up && r.core.mode() == Mode::Serving(universe) && r.core.held() == 0)
    }

    fn final_checks(&mut self) {
        let now = self.now_us();
        let state = self.freshest_state();
        let Some(upgrade) = state.current.clone() else {
            self.checker.violation(now, "liveness: the upgrade never started".into());
            return;
        };
        let universe = match upgrade.phase {
            Phase::Done => Universe::New,
            Phase::RolledBack => Universe::Old,
            phase => {
                if self.checker.violations.is_empty() {
                    self.checker.violation(now, format!("liveness: upgrade ended in phase {phase:?}"));
                }
                return;
            }
        };
        // Durability: every outcome seen applied anywhere is in the final state.
        for (epoch, committed) in self.checker.seen_outcomes.clone() {
            let kept = state.outcomes.get(&epoch).map(|o| *o == coordinator::upgrade::Outcome::Committed);
            if kept != Some(committed) {
                self.checker.violation(now, format!("durability: outcome of {epoch} (committed={committed}) missing from the final state ({kept:?})"));
            }
        }
        let shards = self.config.data_nodes as i64;
        let mut lost = Vec::new();
        let mut phantom = Vec::new();
        for (id, outcome) in &self.oracle.registrations {
            let d = &self.data[id.rem_euclid(shards) as usize];
            let in_old = d.old.get("users", *id).is_some();
            let in_new = d.new.get("users", *id).is_some() && d.new.get("user_profiles", *id).is_some();
            let present = if universe == Universe::New { in_new } else { in_old };
            match outcome {
                ClientOutcome::Acked if !present => lost.push(*id),
                ClientOutcome::Failed if in_old || d.new.get("users", *id).is_some() => phantom.push(*id),
                _ => {}
            }
        }
        if !lost.is_empty() {
            self.checker.violation(
                now,
                format!(
                    "no lost writes: acknowledged registrations missing from the {universe:?} universe: {:?}",
                    &lost[..lost.len().min(10)]
                ),
            );
        }
        if !phantom.is_empty() {
            self.checker.violation(
                now,
                format!(
                    "no phantom writes: registrations reported failed are present: {:?}",
                    &phantom[..phantom.len().min(10)]
                ),
            );
        }
        for (id, updates) in &self.oracle.bio_updates {
            let d = &self.data[id.rem_euclid(shards) as usize];
            let bio = if universe == Universe::New {
                d.new.get("user_profiles", *id).and_then(|r| r.get("bio").cloned())
            } else {
                d.old.get("users", *id).and_then(|r| r.get("bio").cloned())
            };
            let Some(Value::Text(bio)) = bio else { continue };
            if updates.iter().any(|(b, o)| *b == bio && *o == ClientOutcome::Failed) {
                self.checker.violation(
                    now,
                    format!("no phantom writes: user {id} has bio {bio} from an update reported failed"),
                );
            }
        }
        if universe == Universe::New {
            for d in &self.data {
                let (captured, applied) = (d.old.capture.last(), d.new.checkpoint.applied);
                if captured != applied {
                    self.checker.violation(
                        now,
                        format!("exactly once: {} captured {} changes but applied {}", d.name, captured.0, applied.0),
                    );
                }
            }
        }
    }

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
        let switch_ms = match (self.stats.first_freeze_us, self.stats.switched_us) {
            (Some(a), Some(b)) => Some((b.saturating_sub(a)) / 1000),
            _ => None,
        };
        SeedReport {
            seed: self.seed,
            outcome,
            aborted_epochs,
            violations: self.checker.violations.clone(),
            sim_ms: self.now_ms(),
            trace_hash: self.trace.hash(),
            trace_events: self.trace.events,
            trace_lines: self.trace.lines().map(|l| l.to_vec()),
            hold_ms: std::mem::take(&mut self.stats.hold_ms),
            startup_hold_ms: std::mem::take(&mut self.stats.startup_hold_ms),
            switch_ms,
            messages: self.net.sent,
            dropped: self.net.dropped,
            acked_writes: self.oracle.acked,
            failed_writes: self.oracle.failed,
            unknown_writes: self.oracle.unknown,
            fault_log: self.stats.fault_log.clone(),
            copying_seen: !self.stats.copying_seen.is_empty(),
            snapshots_built: self.replicas.iter().map(|r| read_disk(&r.disk, |d| d.snapshots_built)).sum(),
            snapshots_installed: self.replicas.iter().map(|r| read_disk(&r.disk, |d| d.snapshots_installed)).sum(),
        }
    }
}
