//! Firing faults (timed and triggered), and healing them for the liveness phase.

use crate::checkers::Violation;
use crate::clients::{operator_call, replica_index};
use crate::faults::{Condition, FaultEvent, Target};
use crate::net::ProcId;
use crate::world::*;
use coordinator::upgrade::{Applied, Command, Outcome, UpgradeState};
use node_core::NodeRecord;
use protocol::messages::{Ack, CliRequest, CliResponse, Phase, RejectKind, Request, Response};
use protocol::{Duty, Epoch, NodeName, Position};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub(crate) async fn timed_faults(shared: Shared) {
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
pub(crate) async fn fire(shared: &Shared, event: FaultEvent) {
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
                let all: Vec<u64> = w.procs.keys().copied().filter(|a| ProcId::of(*a) != ProcId::Operator).collect();
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
                let others: BTreeSet<u64> = if matches!(ProcId::of(addr), ProcId::Coordinator(_)) {
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
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(Duration::from_millis(down_ms)).await;
                    if !with(&shared, |w| w.healed) {
                        restart(&shared, addr).await;
                    }
                });
            }
        }
        FaultEvent::LoseDisk { target, down_ms } => {
            let Some(addr) = with(shared, |w| w.resolve(target)) else { return };
            crash(shared, addr);
            with(shared, |w| w.lose_disk(addr));
            let shared = shared.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(Duration::from_millis(down_ms)).await;
                if !with(&shared, |w| w.healed) {
                    restart(&shared, addr).await;
                }
            });
        }
        FaultEvent::Garbage { target, frames } => {
            with(shared, |w| {
                if let Some(addr) = w.resolve(target) {
                    for _ in 0..frames {
                        let frame = garbage_frame(&mut w.rng);
                        w.inject(ProcId::Operator.addr(), addr, frame);
                    }
                }
            });
        }
        FaultEvent::OperatorAbort => {
            let shared = shared.clone();
            tokio::task::spawn_local(async move {
                // Like the CLI: try a replica, follow a leader hint, give up after a few tries.
                let mut target = with(&shared, |w| w.rng.gen_range(0..w.config.coordinators));
                for _ in 0..3 {
                    let abort = CliRequest::Abort { reason: "operator changed their mind".into() };
                    let answer = operator_call(&shared, coordinator_addr(target), Request::Cli(abort)).await;
                    with(&shared, |w| w.record(format_args!("operator abort answered {answer:?}")));
                    match answer {
                        Some(Response::Cli(CliResponse::NotLeader { leader: Some(l) })) => target = replica_index(l),
                        Some(_) => return,
                        None => target = (target + 1) % with(&shared, |w| w.config.coordinators),
                    }
                }
            });
        }
        FaultEvent::Restart { router, after_ms, down_ms } => {
            let shared = shared.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                // Stops once it has answered every client it took (or crashed meanwhile).
                out_of_rotation(&shared, router).await;
                with(&shared, |w| {
                    let name = w.routers[router].name.clone();
                    w.record(format_args!("{name} stops for a restart"));
                    w.crash_router(router);
                });
                tokio::time::sleep(Duration::from_millis(down_ms)).await;
                with(&shared, |w| {
                    w.restart_router(router);
                    // A router retired meanwhile stays out of rotation.
                    w.routers[router].in_rotation = !w.routers[router].retired;
                    let down = (0..w.config.coordinators).filter(|&c| !w.procs[&coordinator_addr(c)].up).count();
                    let line = format!(
                        "{:.3}s {} restarted gracefully ({down} coordinator replicas down)",
                        w.now_us() as f64 / 1e6,
                        w.routers[router].name
                    );
                    w.stats.fault_log.push(line);
                });
            });
        }
        FaultEvent::Burst { requests, over_ms } => {
            let shared = shared.clone();
            tokio::task::spawn_local(async move {
                let gap = Duration::from_micros((over_ms * 1_000 / u64::from(requests.max(1))).max(1));
                for _ in 0..requests {
                    tokio::time::sleep(gap).await;
                    with(&shared, |w| {
                        let router = w.rng.gen_range(0..w.routers.len());
                        let op = w.next_op();
                        w.client_arrival(router, op);
                    });
                }
            });
        }
        FaultEvent::Drift { data, rows } => with(shared, |w| {
            // Timed: only while syncing (a freeze may be draining; after the switch the new
            // database is production and the writer is just another client).
            let state = w.freshest_state();
            if state.current.as_ref().is_some_and(|u| u.phase == protocol::messages::Phase::Syncing) {
                w.drift_now(data, rows);
            } else {
                w.record(format_args!("fault: drift skipped (not syncing)"));
            }
        }),
        FaultEvent::ConfusedLeader => {
            let shared = shared.clone();
            tokio::task::spawn_local(async move { confused_leader(&shared).await });
        }
        FaultEvent::ClockJump { replica, delta_ms } => {
            with(shared, |w| w.replicas[replica].skew_ms.fetch_add(delta_ms, Ordering::Relaxed));
        }
        FaultEvent::Join => {
            let shared = shared.clone();
            tokio::task::spawn_local(async move { join_reserve(&shared).await });
        }
        FaultEvent::Retire { router, force } => {
            let shared = shared.clone();
            tokio::task::spawn_local(async move { retire(&shared, router, force).await });
        }
        FaultEvent::Disaster => Box::pin(disaster(shared)).await,
        FaultEvent::LoseCommit { router, count } => {
            with(shared, |w| {
                let addr = w.routers[router].addr;
                *w.lose_commit.entry(addr).or_default() += count;
            });
        }
    }
}

/// Runs one roster command as the CLI does until the state machine answers it (following
/// leader hints); returns its answer (`Accepted`, or the refusal that ends it).
async fn roster_command(shared: &Shared, request: CliRequest) -> CliResponse {
    let coordinators = with(shared, |w| w.config.coordinators);
    let mut target = 0;
    loop {
        // A command asked again across a disaster reaches the rebuilt group, which refuses it
        // until it has recovered (`Recovering`: before `cluster recover`, a join was once taken
        // as the first of a new cluster at generation 1, hunt seed 61000041); asked again then.
        match operator_call(shared, coordinator_addr(target), Request::Cli(request.clone())).await {
            Some(Response::Cli(CliResponse::Accepted)) => return CliResponse::Accepted,
            Some(Response::Cli(CliResponse::NotLeader { leader: Some(l) })) => target = replica_index(l),
            // Refused for now (a join during a freeze, anything while recovering): ask again later.
            Some(Response::Cli(CliResponse::Rejected(r)))
                if matches!(r.kind, RejectKind::WrongPhase | RejectKind::Recovering) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some(Response::Cli(answer @ CliResponse::Rejected(_))) => return answer,
            // Not known to have taken effect, or no answer: the command is idempotent, ask again.
            _ => {
                target = (target + 1) % coordinators;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Notes in the fault log what the operator's command `what` got for an answer.
fn operator_said(shared: &Shared, what: &str, answer: &CliResponse) {
    with(shared, |w| {
        let line = format!("{:.3}s operator: {what}: {answer:?}", w.now_us() as f64 / 1e6);
        w.stats.fault_log.push(line);
    });
}

/// Waits while a rebuilt group recovers. The group itself refuses roster commands until then
/// (`Recovering`, which [`roster_command`] asks again after); this wait is for what the operator
/// does to the routers around them (deploying one, taking one out of rotation or cutting it
/// off), which an operator does once the group serves again.
async fn after_recovery(shared: &Shared) {
    while with(shared, |w| w.recovering) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The reserve router is deployed (no disk state of its own) and joins; the load balancer puts
/// it in rotation once it serves (its readiness check).
async fn join_reserve(shared: &Shared) {
    after_recovery(shared).await;
    let (index, name) = with(shared, |w| {
        let index = w.routers.len() - 1;
        assert!(!w.routers[index].deployed, "the join fault needs the reserve router slot");
        w.routers[index].deployed = true;
        w.restart_router(index);
        (index, w.routers[index].name.clone())
    });
    let answer = roster_command(shared, CliRequest::Join { node: protocol::NodeName::from(name.as_str()) }).await;
    operator_said(shared, &format!("router join {name}"), &answer);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let serving = with(shared, |w| {
            let serving = matches!(w.routers[index].observed.mode, node_core::duties::router::Mode::Serving(_));
            if serving {
                w.routers[index].in_rotation = true;
                let line = format!("{:.3}s {name} serves: in rotation", w.now_us() as f64 / 1e6);
                w.stats.fault_log.push(line);
            }
            serving
        });
        if serving {
            return;
        }
    }
}

/// The load balancer takes `router` out of rotation; resolves once the router has answered every
/// client it took (or crashed meanwhile).
async fn out_of_rotation(shared: &Shared, router: usize) {
    let idle = with(shared, |w| {
        let r = &mut w.routers[router];
        r.in_rotation = false;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if r.open.is_empty() {
            let _ = tx.send(());
        } else {
            r.idle = Some(tx);
        }
        rx
    });
    let _ = idle.await;
}

/// The operator retires `router`: out of rotation and drained of its clients first; with
/// `force`, crashed and kept cut off, then retired with `--force`.
async fn retire(shared: &Shared, router: usize, force: bool) {
    after_recovery(shared).await;
    with(shared, |w| w.routers[router].retired = true);
    out_of_rotation(shared, router).await;
    let name = with(shared, |w| {
        if force {
            w.routers[router].cut_off = true;
            w.crash_router(router);
        }
        w.routers[router].name.clone()
    });
    let request = CliRequest::Retire { node: protocol::NodeName::from(name.as_str()), force };
    let answer = roster_command(shared, request).await;
    let how = if force { " --force" } else { "" };
    operator_said(shared, &format!("router retire{how} {name}"), &answer);
}

/// The leader proposes one bad command of its own, through Raft, as a confused or stale leader
/// would. Some are bad whenever they are applied (an ack for an earlier epoch, a second outcome
/// for a decided epoch, an old freeze epoch, an unknown node): accepting one is a violation at
/// once. Others are only premature (the next epoch's outcome, a freeze inside the backoff): the
/// state machine must check again when it applies them, and the other checkers see the harm if
/// it does not. (No command commits: the state commits itself when the last ack is applied.)
async fn confused_leader(shared: &Shared) {
    let picked = with(shared, |w| {
        let replica = w.replicas[w.leader()?].running.clone()?;
        let state = replica.read(|s| s.clone());
        let mut commands = confused_commands(&state, w.now_ms());
        if commands.is_empty() {
            return None;
        }
        let (command, always_bad) = commands.swap_remove(w.rng.gen_range(0..commands.len()));
        w.record(format_args!("fault: confused leader {} proposes {command:?}", replica.id));
        Some((replica, command, always_bad))
    });
    let Some((replica, command, always_bad)) = picked else { return };
    let write = replica.raft.client_write(command.clone());
    let Ok(Ok(response)) = tokio::time::timeout(Duration::from_millis(2_000), write).await else { return };
    with(shared, |w| {
        w.record(format_args!("confused leader's {command:?} applied as {:?}", response.data));
        if always_bad && !matches!(response.data, Applied::Rejected(_)) {
            let now = w.now_us();
            let what = format!("{command:?} applied as {:?}", response.data);
            w.checker.violation(now, Violation::BadCommandAccepted { what });
        }
    });
}

/// Bad commands for `state`, each with whether it is bad whenever applied.
fn confused_commands(state: &UpgradeState, now_ms: u64) -> Vec<(Command, bool)> {
    let mut commands = Vec::new();
    let Some(upgrade) = &state.current else { return commands };
    let epoch = upgrade.epoch;
    if epoch > Epoch(0) {
        // Epochs only grow: an ack for an earlier epoch is stale whenever it is applied.
        let stale = Epoch(epoch.0 - 1);
        for node in &upgrade.plan.nodes {
            let ack = if node.duties.contains(&Duty::Route) {
                Ack::Frozen
            } else {
                Ack::Drained { final_position: Position(0), checksum_match: true }
            };
            commands.push((Command::Ack { node: node.name.clone(), epoch: stale, ack }, true));
        }
    }
    for (e, outcome) in &state.outcomes {
        let second = match outcome {
            Outcome::Committed => Command::Abort { epoch: *e, reason: "confused".into(), now_ms },
            Outcome::Aborted { .. } => Command::Abort { epoch: *e, reason: "confused, again".into(), now_ms },
        };
        commands.push((second, true));
    }
    if state.last_epoch > Epoch(0) {
        let old = Command::Freeze { epoch: state.last_epoch, now_ms, deadline_ms: now_ms + 1_000 };
        commands.push((old, true));
    }
    let ghost = Command::Ack { node: NodeName::from("ghost"), epoch, ack: Ack::Frozen };
    commands.push((ghost, true));

    let next = Epoch(state.last_epoch.0 + 1);
    match upgrade.phase {
        Phase::Freezing => {
            // The next epoch's outcome while this one is undecided.
            commands.push((Command::Abort { epoch: next, reason: "confused".into(), now_ms }, false));
        }
        Phase::Syncing => {
            commands.push((Command::Abort { epoch: next, reason: "confused".into(), now_ms }, false));
            if now_ms < upgrade.retry_not_before_ms {
                // A retry before the backoff ends: the command's own time is inside the backoff,
                // and the backoff never moves earlier.
                let early = Command::Freeze { epoch: next, now_ms, deadline_ms: now_ms + 1_000 };
                commands.push((early, true));
            }
        }
        _ => {}
    }
    commands
}

/// Random bytes, half of them behind a valid frame header (so the payload decoder is hit).
pub(crate) fn garbage_frame(rng: &mut ChaCha8Rng) -> Vec<u8> {
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

pub(crate) fn heal_later(shared: &Shared, after_ms: u64, f: impl FnOnce(&mut World) + Send + 'static) {
    let shared = shared.clone();
    tokio::task::spawn_local(async move {
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        with(&shared, f);
    });
}

pub(crate) fn crash(shared: &Shared, addr: u64) {
    match ProcId::of(addr) {
        ProcId::Coordinator(i) => crash_replica(shared, i),
        ProcId::Router(i) => with(shared, |w| w.crash_router(i)),
        ProcId::Data(i) => with(shared, |w| w.crash_data(i)),
        ProcId::Operator => {}
    }
}

pub(crate) async fn restart(shared: &Shared, addr: u64) {
    match ProcId::of(addr) {
        ProcId::Coordinator(i) => {
            if !with(shared, |w| w.procs[&addr].up) {
                start_replica(shared, i).await;
            }
        }
        ProcId::Router(i) => with(shared, |w| w.restart_router(i)),
        ProcId::Data(i) => with(shared, |w| w.restart_data(i)),
        ProcId::Operator => {}
    }
}

/// How long processes restarted at the heal get to rejoin before the world counts as healthy.
/// (Seed 53: a replica restarted after a 5 s outage answered watches without news for over a
/// second, and a freeze started 0.2 s after the heal timed out; open question.)
const REJOIN_US: u64 = 2_000_000;

/// Ends the safety phase: no more faults, everything down restarts.
pub(crate) async fn heal(shared: &Shared) {
    let down = with(shared, |w| {
        w.healed = true;
        // Messages held back before the heal still arrive until late_us_max after it, and
        // restarted replicas need a moment to catch up: the world is healthy only from then on.
        let late_us = if w.faults.late > 0.0 { w.faults.late_us_max } else { 0 };
        w.healthy_from_us = w.now_us() + late_us + REJOIN_US;
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
    /// A fresh, empty node disk (its id drawn from the seed, as a real shell draws one at random).
    pub fn fresh_disk(&mut self) -> NodeRecord {
        NodeRecord { disk_id: self.rng.gen(), ..NodeRecord::default() }
    }

    /// The disk of a node that ran before the simulated upgrade: it booted once and has served
    /// the old universe since (a production system runs long before anyone upgrades it).
    pub fn deployed_disk(&mut self, name: &str) -> NodeRecord {
        NodeRecord { boots: 1, owner: NodeRecord::owner_of(name), confirmed: true, ..self.fresh_disk() }
    }

    /// A crashed node's disk is lost: it will start from an empty one.
    pub fn lose_disk(&mut self, addr: u64) {
        let node = ProcId::of(addr);
        if !matches!(node, ProcId::Router(_) | ProcId::Data(_)) {
            return;
        }
        let fresh = self.fresh_disk();
        let (disk, name) = self.node_disk(node);
        *disk = fresh;
        let name = name.to_string();
        self.checker.durability.disk_lost(&name);
        self.disks_lost.insert(name.clone());
        self.record(format_args!("{name} lost its disk"));
    }

    /// The address a fault target names now.
    pub fn resolve(&self, target: Target) -> Option<u64> {
        match target {
            Target::Coordinator(i) => Some(coordinator_addr(i)),
            Target::Leader => self.leader().map(coordinator_addr),
            Target::Router(i) => Some(self.routers[i].addr),
            Target::Data(i) => Some(self.data[i].addr),
        }
    }

    /// Fires at once the triggered faults whose condition is `happened` (an event a node just
    /// reported, which the ticker would see too late).
    /// Applies the drift fault to data node `data` now.
    pub(crate) fn drift_now(&mut self, data: usize, rows: u32) {
        let changed = self.drift(data, rows);
        let name = self.data[data].name.clone();
        self.record(format_args!("fault: a rogue writer changed {changed:?} in {name}'s new database"));
    }

    pub(crate) fn fire_on(&mut self, happened: Condition) {
        if self.healed || !self.faults.triggered.iter().any(|t| t.when == happened) {
            return;
        }
        let (due, keep) = std::mem::take(&mut self.faults.triggered).into_iter().partition(|t| t.when == happened);
        self.faults.triggered = keep;
        let Some(shared) = self.me.upgrade() else { return };
        for t in due {
            // A node crash lands right here, before the node can say anything more.
            if let FaultEvent::Crash { target: target @ (Target::Router(_) | Target::Data(_)), down_ms: None } = t.event
            {
                let line = format!("{:.3}s {:?} on {happened:?}", self.now_us() as f64 / 1e6, t.event);
                self.record(format_args!("fault: {line}"));
                self.stats.fault_log.push(line);
                match target {
                    Target::Router(i) => self.crash_router(i),
                    Target::Data(i) => self.crash_data(i),
                    Target::Coordinator(_) | Target::Leader => unreachable!("matched above"),
                }
                continue;
            }
            // A rogue write lands right here too, before the drain compares.
            if let FaultEvent::Drift { data, rows } = t.event {
                let line = format!("{:.3}s {:?} on {happened:?}", self.now_us() as f64 / 1e6, t.event);
                self.record(format_args!("fault: {line}"));
                self.stats.fault_log.push(line);
                self.drift_now(data, rows);
                continue;
            }
            self.record(format_args!("fault: {:?} fires on {happened:?}", t.event));
            let shared = shared.clone();
            tokio::task::spawn_local(async move { fire(&shared, t.event).await });
        }
    }

    /// Triggered faults whose condition now holds (each fires once).
    pub(crate) fn due_triggers(&mut self) -> Vec<(u64, FaultEvent)> {
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
                Condition::Freezing { .. }
                | Condition::Copying { .. }
                | Condition::RouterFreezes { .. }
                | Condition::RouterAcked { .. }
                | Condition::RouterCommits { .. }
                | Condition::Fenced { .. } => keep.push(t),
            }
        }
        self.faults.triggered = keep;
        due
    }
}

/// The views sent so far were a lost group's (or a wiped replica's): versions start again.
fn forget_views(shared: &Shared) {
    with(shared, |w| {
        w.checker.views = Default::default();
        w.views_sent.clear();
    });
}

/// Every replica stopped and its disk replaced by an empty one.
fn wipe_replicas(shared: &Shared, coordinators: usize) {
    for i in 0..coordinators {
        crash_replica(shared, i);
    }
    with(shared, |w| {
        for slot in &mut w.replicas {
            let bug = slot.disk.lock().unwrap_or_else(|p| p.into_inner()).bug;
            slot.disk = coordinator::raft::new_disk_with(UpgradeState::default());
            slot.disk.lock().unwrap_or_else(|p| p.into_inner()).bug = bug;
        }
    });
}

/// The disaster: every coordinator replica loses its data. A group is started afresh on empty
/// disks (and its membership initialized, as at the first start), and the operator runs
/// `imago cluster recover`, naming every node that can still tell what its disk holds (the data
/// nodes and the deployed routers) and, as lost, the routers retired by force (cut off for
/// good). Returns once the group has recovered, so the chain's next upgrade goes to it.
pub(crate) async fn disaster(shared: &Shared) {
    let coordinators = with(shared, |w| {
        w.scan_replicas();
        let lost_group = w.freshest_state();
        w.lost_groups.push(lost_group);
        w.recovering = true;
        let line = format!("{:.3}s Disaster: every coordinator replica loses its data", w.now_us() as f64 / 1e6);
        w.record(format_args!("fault: {line}"));
        w.stats.fault_log.push(line);
        w.config.coordinators
    });
    wipe_replicas(shared, coordinators);
    forget_views(shared);
    // The lost group's messages still in the network die out before the new group starts
    // (the latest a late message may arrive, and a second more).
    let die_out_us = with(shared, |w| w.faults.late_us_max.max(2_000_000) + 1_000_000);
    tokio::time::sleep(Duration::from_micros(die_out_us)).await;
    // A replica whose earlier crash ended meanwhile was restarted by its fault's timer, on an
    // empty disk: it is stopped and wiped again, so the group starts as the operator starts it
    // (hunt seed 60000419: such a replica ran beside the one started here, and voted), and its
    // long-poll watches end before the views are forgotten (seed 60000317).
    wipe_replicas(shared, coordinators);
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    // The views seen so far were the lost group's: the new group's versions start again. (Not
    // before the wait: a crashed replica's long-poll watch still answers, into the void, with
    // its group's view.)
    forget_views(shared);
    with(shared, |w| w.checker.agreement.forget_unacted_outcomes());
    for i in 0..coordinators {
        start_replica(shared, i).await;
    }
    let first = with(shared, |w| w.replicas[0].running.clone());
    let members: std::collections::BTreeMap<u64, openraft::BasicNode> =
        (0..coordinators).map(|i| (coordinator_addr(i), openraft::BasicNode::default())).collect();
    if let Some(first) = first {
        if let Err(e) = first.raft.initialize(members).await {
            with(shared, |w| {
                let now = w.now_us();
                w.checker
                    .violation(now, Violation::Setup { what: format!("the new group's initialization failed: {e}") })
            });
        }
    }
    let (expected, lost) = with(shared, |w| {
        let routers = w.routers.iter().filter(|r| r.deployed);
        let expected: Vec<NodeName> = routers
            .clone()
            .filter(|r| !r.cut_off)
            .map(|r| NodeName::from(r.name.as_str()))
            .chain(w.data.iter().map(|d| NodeName::from(d.name.as_str())))
            .collect();
        let lost: Vec<NodeName> = routers.filter(|r| r.cut_off).map(|r| NodeName::from(r.name.as_str())).collect();
        (expected.into_iter().chain(lost.iter().cloned()).collect::<Vec<_>>(), lost)
    });
    let answer =
        roster_command(shared, CliRequest::Recover { expected: expected.clone(), lost, abort_unknown_freeze: false })
            .await;
    operator_said(shared, "cluster recover", &answer);
    let mut asserted = false;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The recovery waits for the operator's word on a freeze whose outcome the disks cannot
        // tell, because a node reported no disk record. The operator knows which nodes lost a
        // disk: one that did not has no record because it never persisted a decision, so it
        // never served (a router persists before it serves), and no client saw the freeze's
        // new universe (hunt seed 60000962: a router that joined during the freeze).
        let vouched = with(shared, |w| {
            let state = w.freshest_state();
            let r = state.recovery.as_ref()?;
            r.unknown_freeze()?;
            let blind_by_loss =
                !r.lost.is_empty() || r.disks.iter().any(|(n, (_, _, d))| d.is_none() && w.disks_lost.contains(&n.0));
            // Else the operator finds out (routers' logs and metrics): did any client reach the
            // freeze's new universe? (Hunt seed 60000748: a data node lost its disk early.)
            let freeze = protocol::Decision::Freeze(r.unknown_freeze()?);
            let base = r.disks.values().filter_map(|(_, _, d)| d.as_ref()).filter(|d| d.decision == freeze);
            let base = base.map(|d| d.generation).max()?;
            let seen_new = w.checker.single_universe.newest_admitted().is_some_and(|g| g > base);
            (!blind_by_loss || !seen_new).then_some(())
        });
        if vouched.is_some() && !asserted {
            asserted = true;
            let request =
                CliRequest::Recover { expected: expected.clone(), lost: Vec::new(), abort_unknown_freeze: true };
            let answer = roster_command(shared, request).await;
            operator_said(shared, "cluster recover --abort-unknown-freeze", &answer);
        }
        let recovered = with(shared, |w| {
            let state = w.freshest_state();
            let done = state.recovery.is_none() && !state.roster.is_empty();
            if done {
                w.recovering = false;
                w.record(format_args!("the rebuilt group recovered: generation {:?}", state.generation));
            }
            done
        });
        if recovered {
            return;
        }
    }
}
