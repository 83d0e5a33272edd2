//! The simulated world: processes, the network between them, and the bookkeeping the checkers
//! need. Everything runs on one paused current-thread tokio runtime; the world is one mutex
//! that no task holds across an await.

use crate::checkers::{Checker, Violation};
use crate::config::SimConfig;
use crate::faults::FaultPlan;
use crate::net::{Addr, NetModel, ProcId};
use crate::oracle::Oracle;
use crate::procs::{DataProc, RouterProc};
use crate::procs::{ReplySlot, ReplyTo};
use crate::trace::Trace;
use coordinator::raft::{new_disk_with, read_applied, RaftTiming, SharedDisk, Transport, TransportError};
use coordinator::service::{Clock, Replica};
use coordinator::upgrade::{Outcome, UpgradeState};
use node_core::agent::AgentConfig;
use node_core::NodeRecord;
use protocol::codec;
use protocol::messages::{Ack, DecisionView, NodeRequest, NodeResponse, Request, Response};
use protocol::plan::Plan;
use protocol::schema::Mapping;
use protocol::{Decision, Duty, NodeName};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub type Shared = Arc<Mutex<World>>;

/// How much longer than its timeout a freeze may stay undecided under a stable leader (an
/// abort's consensus round, the driver noticing, a lossy network).
const FREEZE_DECIDE_SLACK_MS: u64 = 1_500;
const FREEZE_DECIDE_SLACK_WIDE_MS: u64 = 6_000;

/// How long a node that can reach a stable leader may take to act on a decision: a watch parked
/// at a replica, a request timing out on a crashed one, stale answers from a lagging one.
const PROPAGATION_MS: u64 = 5_000;
const PROPAGATION_WIDE_MS: u64 = 12_000;

/// Views kept per node for the stale-view fault.
const STALE_VIEWS_KEPT: usize = 8;

/// Runs `f` with the world locked. Never call it while the world is locked.
pub fn with<T>(shared: &Shared, f: impl FnOnce(&mut World) -> T) -> T {
    f(&mut lock(shared))
}

fn lock(shared: &Shared) -> MutexGuard<'_, World> {
    let world = shared.lock().unwrap_or_else(|p| p.into_inner());
    // Virtual time cannot pass while the world is locked (no task holds it across an await):
    // read the clock once per lock.
    world.now_us.set(None);
    world
}

/// The simulation's clock: tokio's *paused* virtual clock (it advances only when every task
/// waits), never the wall clock. The one place the simulator reads time.
pub fn virtual_now() -> Instant {
    Instant::now()
}

/// The address (and Raft id) of coordinator replica `index`.
pub fn coordinator_addr(index: usize) -> Addr {
    ProcId::Coordinator(index).addr()
}

/// Liveness of one process.
#[derive(Clone, Copy, Debug)]
pub struct ProcInfo {
    pub up: bool,
    pub incarnation: u64,
}

/// A coordinator replica: its disk survives crashes.
pub struct ReplicaSlot {
    pub disk: SharedDisk,
    pub running: Option<Replica>,
    pub driver: Option<JoinHandle<()>>,
    pub skew_ms: Arc<AtomicI64>,
}

#[derive(Clone)]
enum Packet {
    Request { bytes: Arc<Vec<u8>>, slot: ReplySlot, caller_inc: u64 },
    Reply { bytes: Arc<Vec<u8>>, slot: ReplySlot, caller_inc: u64 },
}

/// Per-seed measurements.
#[derive(Debug, Default)]
pub struct Stats {
    /// When the simulator first saw a node act on each freeze.
    pub first_freeze_act_us: BTreeMap<protocol::Epoch, u64>,
    /// Holds caused by a freeze (the switch's cost to clients).
    pub hold_ms: Vec<u64>,
    /// Holds of routers that had not yet read the current decision after (re)starting.
    pub startup_hold_ms: Vec<u64>,
    /// Holds of routers that restarted on their own disk, while their boot record was written.
    pub boot_hold_ms: Vec<u64>,
    /// Requests in flight that routers ended at a freeze (`inflight_ms_max` reached).
    pub ended: u64,
    /// Client requests that did not succeed: refused, failed (503, rejected) or unknown
    /// (timed out, or lost with a crashed router).
    pub failed_requests: u64,
    pub first_freeze_us: Option<u64>,
    pub switched_us: Option<u64>,
    pub fault_log: Vec<String>,
    pub copying_seen: BTreeMap<usize, bool>,
    /// The last epoch frozen when the current upgrade was deployed (its freezes come after).
    pub epochs_before: u64,
    /// A rogue writer changed a new database at some time in the seed (a data node's own
    /// flag goes with its store when the next upgrade is deployed).
    pub drift_seen: bool,
    /// Store operations failed by the store fault.
    pub store_failures: u64,
    /// Ranges of old keys data nodes compared while traffic ran.
    pub ranges_compared: u64,
    /// Rolled-back upgrades data nodes abandoned (capture removed, copy given up).
    pub abandoned: u64,
}

/// The whole simulated cluster.
pub struct World {
    pub config: SimConfig,
    pub seed: u64,
    pub start: Instant,
    /// Virtual time at the current lock (see `lock`).
    pub(crate) now_us: std::cell::Cell<Option<u64>>,
    pub rng: ChaCha8Rng,
    pub net: NetModel,
    pub procs: BTreeMap<Addr, ProcInfo>,
    pub replicas: Vec<ReplicaSlot>,
    pub routers: Vec<RouterProc>,
    pub data: Vec<DataProc>,
    pub plan: Plan,
    pub mapping: Mapping,
    pub faults: FaultPlan,
    pub oracle: Oracle,
    pub checker: Checker,
    pub fidelity: crate::checkers::fidelity::Fidelity,
    pub trace: Trace,
    pub stats: Stats,
    pub timing: RaftTiming,
    pub agent_timeout_ms: u64,
    pub data_timeout_ms: u64,
    pub healed: bool,
    /// From when (µs) no fault at all, not even a late message, can touch the run.
    pub healthy_from_us: u64,
    /// The lowest and highest replica clock skews seen while the current epoch is frozen.
    pub freeze_skews: Option<(protocol::Epoch, i64, i64)>,
    pub next_user: i64,
    pub next_item: i64,
    pub lose_commit: BTreeMap<Addr, u32>,
    /// The final states of coordinator groups lost in a disaster (their decisions stand).
    pub lost_groups: Vec<UpgradeState>,
    /// A group rebuilt after a disaster has not recovered yet: the lost group's roster is still
    /// the one routers serve by.
    pub recovering: bool,
    /// The upgrades the operator started, in order, as the group numbered them. A group rebuilt
    /// after a disaster numbers its first above every upgrade a node remembers; when every node
    /// was restarted since the last one (a redeploy), none does, and an id may come again.
    pub started: Vec<protocol::UpgradeId>,
    /// Nodes that lost their disk (the disk-loss fault), by name.
    pub disks_lost: std::collections::BTreeSet<String>,
    /// Views recently sent to each node (for the stale-view fault).
    pub views_sent: BTreeMap<NodeName, std::collections::VecDeque<DecisionView>>,
    pub me: Weak<Mutex<World>>,
}

impl World {
    /// Virtual microseconds since the seed started (read when the world was locked).
    pub fn now_us(&self) -> u64 {
        match self.now_us.get() {
            Some(now) => now,
            None => {
                let now = virtual_now().duration_since(self.start).as_micros() as u64;
                self.now_us.set(Some(now));
                now
            }
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.now_us() / 1000
    }

    pub fn record(&mut self, what: std::fmt::Arguments<'_>) {
        let now = self.now_us();
        self.trace.event(now, what);
    }

    /// Brings a process up or down; a new incarnation either way (messages and replies of the
    /// old one are then dropped). Returns false if it already was in that state.
    pub fn set_up(&mut self, addr: Addr, up: bool) -> bool {
        let info = self.procs.get_mut(&addr).expect("process registered");
        if info.up == up {
            return false;
        }
        info.up = up;
        info.incarnation += 1;
        true
    }

    pub fn is_up(&self, addr: Addr, incarnation: u64) -> bool {
        self.procs.get(&addr).is_some_and(|p| p.up && p.incarnation == incarnation)
    }

    /// The generation the simulated operator's current (deployed) upgrade upgrades from.
    pub fn upgrade_from(&self) -> protocol::Generation {
        self.plan.old_generation
    }

    /// `upgrade_from`: a data node's deployment (see [`AgentConfig::upgrade_from`]).
    pub fn agent_config(
        &self,
        name: &str,
        duties: Vec<Duty>,
        upgrade_from: Option<protocol::Generation>,
    ) -> AgentConfig {
        AgentConfig {
            node: NodeName::from(name),
            duties,
            replicas: (0..self.config.coordinators).map(coordinator_addr).collect(),
            request_timeout_ms: self.agent_timeout_ms,
            watch_wait_ms: 1_000,
            report_interval_ms: 200,
            stale_watch_limit: 2,
            upgrade_from,
        }
    }

    // ---- network ---------------------------------------------------------------------------

    fn send_packet(&mut self, from: Addr, to: Addr, packet: Packet) {
        if !self.procs.get(&from).is_some_and(|p| p.up) {
            return;
        }
        if let Packet::Reply { bytes, .. } = &packet {
            if self.lose_commit.get(&to).is_some_and(|n| *n > 0) && carries_commit(bytes) {
                *self.lose_commit.get_mut(&to).expect("checked") -= 1;
                self.record(format_args!("fault: lost commit view {from}->{to}"));
                self.stats.fault_log.push(format!("{:.3}s lost a commit view to {to}", self.now_us() as f64 / 1e6));
                return;
            }
        }
        let delays = self.net.fate(&mut self.rng, from, to);
        let len = match &packet {
            Packet::Request { bytes, .. } | Packet::Reply { bytes, .. } => bytes.len(),
        };
        let now = self.now_us();
        self.trace.packet(now, from, to, len, &delays, || describe(&packet));
        for delay_us in delays {
            let me = self.me.clone();
            let packet = packet.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(delay_us)).await;
                if let Some(shared) = me.upgrade() {
                    World::arrive(&shared, from, to, packet);
                }
            });
        }
    }

    fn arrive(shared: &Shared, from: Addr, to: Addr, packet: Packet) {
        let mut w = lock(shared);
        match packet {
            Packet::Reply { bytes, slot, caller_inc } => {
                if w.is_up(to, caller_inc) {
                    if let Some(tx) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        let _ = tx.send(bytes.to_vec());
                    }
                }
            }
            Packet::Request { bytes, slot, caller_inc } => {
                let Some(info) = w.procs.get(&to).copied().filter(|p| p.up) else { return };
                match ProcId::of(to) {
                    ProcId::Data(i) => {
                        let reply_to =
                            ReplyTo { server: to, server_inc: info.incarnation, caller: from, caller_inc, slot };
                        w.data_request(i, &bytes, reply_to);
                    }
                    ProcId::Coordinator(i) => {
                        let Some(replica) = w.replicas[i].running.clone() else { return };
                        drop(w);
                        let shared = shared.clone();
                        // Boxed: the replica's request future is large, and tokio would otherwise
                        // copy it whole into and out of the task cell.
                        tokio::spawn(Box::pin(async move {
                            let (response, watcher) = match codec::decode_frame::<Request>(&bytes) {
                                Ok(Some((request, _))) => {
                                    // Whose watch this is: every view is checked, and a lagging
                                    // replica may answer a non-linearizable one with an old view.
                                    let watcher = match &request {
                                        Request::Node(NodeRequest::Watch { node, linearizable, .. }) => {
                                            Some((node.clone(), *linearizable))
                                        }
                                        _ => None,
                                    };
                                    (replica.handle(request).await, watcher)
                                }
                                Ok(None) => (Response::Error { reason: "truncated frame".into() }, None),
                                Err(e) => (Response::Error { reason: e.to_string() }, None),
                            };
                            with(&shared, |w| {
                                let response = match (watcher, response) {
                                    (Some((node, linearizable)), Response::Node(NodeResponse::View(view))) => {
                                        let found = w.checker.views.sent(&node, &view);
                                        let now = w.now_us();
                                        w.checker.found(now, found);
                                        let view = if linearizable { view } else { w.maybe_stale(&node, view) };
                                        Response::Node(NodeResponse::View(view))
                                    }
                                    (_, response) => response,
                                };
                                let answer = codec::encode_frame(&response).expect("responses encode");
                                w.reply(to, info.incarnation, from, answer, slot, caller_inc)
                            });
                        }));
                    }
                    // Routers and the operator serve no requests.
                    ProcId::Router(_) | ProcId::Operator => {}
                }
            }
        }
    }

    /// The stale-view fault: the answer to a node's non-linearizable watch is, at the seed's
    /// rate, a view sent to that node before (a lagging replica's, or a replayed one); otherwise
    /// `view`, remembered for later.
    fn maybe_stale(&mut self, node: &NodeName, view: DecisionView) -> DecisionView {
        let rate = self.faults.stale_views;
        if rate <= 0.0 || self.healed {
            return view;
        }
        let seen = self.views_sent.entry(node.clone()).or_default();
        if !seen.is_empty() && self.rng.gen_bool(rate) {
            let old = seen[self.rng.gen_range(0..seen.len())].clone();
            self.record(format_args!("fault: {node} gets an old view {} ({:?})", old.version, old.decision));
            return old;
        }
        if seen.len() >= STALE_VIEWS_KEPT {
            seen.pop_front();
        }
        seen.push_back(view.clone());
        view
    }

    /// Sends the answer to a request (nothing if the server restarted since it got it).
    pub fn answer(&mut self, to: ReplyTo, bytes: Vec<u8>) {
        self.reply(to.server, to.server_inc, to.caller, bytes, to.slot, to.caller_inc);
    }

    fn reply(&mut self, server: Addr, server_inc: u64, caller: Addr, bytes: Vec<u8>, slot: ReplySlot, caller_inc: u64) {
        if !self.is_up(server, server_inc) {
            return;
        }
        self.send_packet(server, caller, Packet::Reply { bytes: Arc::new(bytes), slot, caller_inc });
    }

    /// Sends a request whose answer nobody waits for (garbage injection).
    pub fn inject(&mut self, from: Addr, to: Addr, bytes: Vec<u8>) {
        let (tx, _rx) = oneshot::channel();
        let caller_inc = self.procs[&from].incarnation;
        let slot = Arc::new(Mutex::new(Some(tx)));
        self.send_packet(from, to, Packet::Request { bytes: Arc::new(bytes), slot, caller_inc });
    }

    /// Sends a request from `from` to `to` now; the receiver gets the answer, if one comes.
    pub fn send_request(&mut self, from: Addr, to: Addr, bytes: Vec<u8>) -> oneshot::Receiver<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        let slot = Arc::new(Mutex::new(Some(tx)));
        let caller_inc = self.procs[&from].incarnation;
        self.send_packet(from, to, Packet::Request { bytes: Arc::new(bytes), slot, caller_inc });
        rx
    }

    /// Checks what an agent persisted (epochs never go backwards, across restarts too).
    pub fn note_persisted(&mut self, name: &str, decision: Decision) {
        let now = self.now_us();
        let found = self.checker.durability.persisted(name, decision);
        self.checker.found(now, found);
    }

    /// A node's disk and name (only routers and data nodes have a node disk).
    pub fn node_disk(&mut self, node: ProcId) -> (&mut NodeRecord, &str) {
        match node {
            ProcId::Router(i) => {
                let r = &mut self.routers[i];
                (&mut r.disk, &r.name)
            }
            ProcId::Data(i) => {
                let d = &mut self.data[i];
                (&mut d.disk, &d.name)
            }
            ProcId::Coordinator(_) | ProcId::Operator => unreachable!("only nodes have a node disk"),
        }
    }

    /// Checks that a node acts only on a committed decision, the same one as everybody, and
    /// only once its disk holds it.
    pub fn note_acted(&mut self, node: ProcId, decision: Decision) {
        let now = self.now_us();
        let (disk, name) = self.node_disk(node);
        let (on_disk, name) = (disk.decision, name.to_string());
        let committed = self.is_committed(&name, decision);
        for found in self.checker.agreement.acted(&name, decision, committed) {
            self.checker.violation(now, found);
        }
        let found = crate::checkers::persist_first::acted(&name, decision, on_disk);
        self.checker.found(now, found);
        self.checker.propagation.acted(&name, decision);
        self.record(format_args!("{name} acts on {decision:?}"));
        let now = self.now_us();
        if let ProcId::Router(router) = node {
            self.routers[router].joined_us.get_or_insert(now);
        }
        if let Decision::Freeze(e) = decision {
            self.stats.first_freeze_act_us.entry(e).or_insert(now);
        }
        match (node, decision) {
            (ProcId::Router(router), Decision::Freeze(_)) => {
                self.fire_on(crate::faults::Condition::RouterFreezes { router })
            }
            (ProcId::Router(router), Decision::Commit(_)) => {
                self.fire_on(crate::faults::Condition::RouterCommits { router })
            }
            _ => {}
        }
    }

    /// Whether some replica's applied state, or a group lost in a disaster, holds `decision`
    /// for `node` (i.e. it was committed).
    pub fn is_committed(&self, node: &str, decision: Decision) -> bool {
        let holds = |state: &UpgradeState| match decision {
            Decision::Retired => matches!(
                state.roster.get(&protocol::NodeName::from(node)),
                Some(protocol::messages::RosterStatus::Retiring | protocol::messages::RosterStatus::Retired)
            ),
            Decision::Initial => true,
            Decision::Freeze(e) => state.last_epoch >= e,
            Decision::Commit(e) => state.outcomes.get(&e) == Some(&Outcome::Committed),
            Decision::Abort(e) => matches!(state.outcomes.get(&e), Some(Outcome::Aborted { .. })),
        };
        self.lost_groups.iter().any(holds) || self.replicas.iter().any(|r| read_applied(&r.disk, |a| holds(&a.state)))
    }

    /// The most advanced applied state among replicas (by applied log index).
    pub fn freshest_state(&self) -> UpgradeState {
        self.freshest(UpgradeState::clone)
    }

    /// Notes when a freeze and a commit are first seen applied (for the switch-time figure).
    pub fn observe_phases(&mut self) {
        if self.stats.first_freeze_us.is_some() && self.stats.switched_us.is_some() {
            return;
        }
        let now = self.now_us();
        for r in &self.replicas {
            let (freezing, committed) = read_applied(&r.disk, |a| {
                let phase = a.state.current.as_ref().map(|u| u.phase);
                (
                    phase == Some(protocol::messages::Phase::Freezing),
                    a.state.outcomes.values().any(|o| *o == Outcome::Committed),
                )
            });
            if freezing && self.stats.first_freeze_us.is_none() {
                self.stats.first_freeze_us = Some(now);
            }
            if committed && self.stats.switched_us.is_none() {
                self.stats.switched_us = Some(now);
            }
        }
    }

    /// The freshest replica's applied state, read through `f` (no copy of the whole state).
    pub fn freshest<T>(&self, f: impl Fn(&UpgradeState) -> T) -> T {
        let best = self
            .replicas
            .iter()
            .max_by_key(|r| read_applied(&r.disk, |a| a.last_applied.map_or(0, |l| l.index)))
            .expect("at least one replica");
        read_applied(&best.disk, |a| f(&a.state))
    }

    /// Each tick: a freeze under a stable leader is decided in bounded time, and a freeze is
    /// checked once against the gate's preconditions on the stores themselves.
    pub fn watch_freezes(&mut self) {
        let now = self.now_us();
        let freezing = self.freshest(|s| {
            s.current.as_ref().filter(|u| u.phase == protocol::messages::Phase::Freezing).map(|u| u.epoch)
        });
        // Stable: a leader that reaches a majority of running replicas both ways (partitions
        // that cut nodes off from the coordinators leave it stable: it can still decide).
        let leader = self.leader().filter(|l| {
            let me = coordinator_addr(*l);
            let reachable = (0..self.replicas.len())
                .filter(|r| {
                    let peer = coordinator_addr(*r);
                    self.replicas[*r].running.is_some()
                        && self.procs[&peer].up
                        && !self.net.blocked(me, peer)
                        && !self.net.blocked(peer, me)
                })
                .count();
            reachable > self.replicas.len() / 2
        });
        // Deadlines are stamped with the proposer's clock and read with the leader's: the skews
        // that count are all those seen while this epoch is frozen (a clock that jumps back after
        // stamping moves the deadline later), not only today's.
        let elapsed_ms = (now / 1000) as i64;
        let skews: Vec<i64> =
            self.replicas.iter().map(|r| clock_offset_ms(elapsed_ms, r.skew_ms.load(Ordering::Relaxed))).collect();
        let (lo, hi) = (*skews.iter().min().unwrap_or(&0), *skews.iter().max().unwrap_or(&0));
        let range = match (freezing, self.freeze_skews) {
            (Some(e), Some((seen, l, h))) if seen == e => Some((e, l.min(lo), h.max(hi))),
            (Some(e), _) => Some((e, lo, hi)),
            (None, _) => None,
        };
        self.freeze_skews = range;
        let spread_ms = range.map_or(0, |(_, l, h)| (h - l).unsigned_abs());
        let slack_ms = if self.config.wide_area() { FREEZE_DECIDE_SLACK_WIDE_MS } else { FREEZE_DECIDE_SLACK_MS };
        let bound_ms = self.plan.thresholds.freeze_timeout_ms + spread_ms + slack_ms;
        let found = self.checker.freeze_watch.observe(now, freezing, leader, bound_ms);
        self.checker.found(now, found);
        self.watch_propagation(leader);
        if let Some(epoch) = freezing {
            if self.healed && now >= self.healthy_from_us && !self.checker.gate_checked.contains(&epoch) {
                self.checker.frozen_healthy.insert(epoch);
            }
        }
        if let Some(epoch) = freezing.filter(|e| !self.checker.gate_checked.contains(e)) {
            self.checker.gate_checked.insert(epoch);
            for v in self.check_gate(epoch) {
                self.checker.violation(now, v);
            }
        }
    }

    /// Each tick: every node that can reach the stable `leader` over a loss-free network acts on
    /// the current decision within a bound.
    fn watch_propagation(&mut self, leader: Option<usize>) {
        let now = self.now_us();
        let current = self.freshest(|s| s.decision());
        let bound_ms = if self.config.wide_area() { PROPAGATION_WIDE_MS } else { PROPAGATION_MS };
        // A router that joined (not one of the plan's) acts on nothing until its join is applied:
        // it is expected to follow only once some replica has it on the roster.
        let nodes: Vec<(String, Addr)> = self
            .routers
            .iter()
            .enumerate()
            .filter(|(i, r)| *i < self.config.routers || self.on_roster_somewhere(&r.name))
            .map(|(_, r)| (r.name.clone(), r.addr))
            .chain(self.data.iter().map(|d| (d.name.clone(), d.addr)))
            .collect();
        for (name, addr) in nodes {
            // Not under a fault that drops its messages on purpose (lost commit views).
            let good = self.net.loss == 0.0
                && self.net.late == 0.0
                && self.lose_commit.get(&addr).is_none_or(|n| *n == 0)
                && self.procs[&addr].up
                && leader.is_some_and(|l| {
                    let l = coordinator_addr(l);
                    !self.net.blocked(addr, l) && !self.net.blocked(l, addr)
                });
            let found = self.checker.propagation.observe(now, &name, current, good, bound_ms);
            self.checker.found(now, found);
        }
    }

    fn check_gate(&self, epoch: protocol::Epoch) -> Vec<Violation> {
        use crate::checkers::gate::{self, ShardFacts};
        use node_core::store::NewStore;
        let (reports, seen) = self.freshest(|s| {
            let Some(u) = &s.current else { return (BTreeMap::new(), None) };
            let reports: BTreeMap<String, protocol::messages::NodeReport> =
                u.nodes.iter().map(|(n, state)| (n.0.clone(), state.report.clone())).collect();
            // Validation as the gate saw it when this epoch froze (reports applied after the
            // freeze, within the tick, must not count).
            (reports, u.frozen_on.filter(|_| u.epoch == epoch))
        });
        let seen = seen.unwrap_or_default();
        let (samples_reported, mismatches_reported) = (seen.samples, seen.mismatches);
        let checkpoints: Vec<_> = self.data.iter().map(|d| d.new.checkpoint().expect(crate::procs::MEM)).collect();
        let shards: Vec<ShardFacts<'_>> = self
            .data
            .iter()
            .zip(&checkpoints)
            .map(|(d, c)| ShardFacts {
                node: &d.name,
                copy: &c.copy,
                captured: d.old.captured(),
                applied: c.applied,
                report: reports.get(&d.name).map(|r| (r.bulk_done, r.captured, r.applied)),
            })
            .collect();
        // The freshest state may already hold reports sent after the freeze (within one tick):
        // the stores' facts only grow, so that errs on the strict side; validation comes from
        // what the state recorded at the freeze.
        let t = &self.plan.thresholds;
        let validation = gate::GateFacts {
            samples_reported,
            mismatches_reported,
            samples_seen: self.checker.mirrors.samples,
            samples_min: t.samples_min,
            mismatch_ratio_max: t.mismatch_ratio_max,
        };
        gate::check(epoch, &shards, validation)
    }

    /// Feeds outcomes applied on each replica to the agreement/durability checker.
    /// The routers freeze `epoch` needs, by the simulator's own count: the plan's, and a joined
    /// one if it acted before any node acted on that freeze (so its join was applied before the
    /// freeze: joins are refused during one), less any that sent `Retired` or were retired by
    /// force.
    pub fn routers_in_service(&self, epoch: protocol::Epoch) -> Vec<protocol::NodeName> {
        let freeze_seen_us = self.stats.first_freeze_act_us.get(&epoch).copied().unwrap_or(0);
        self.routers
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                r.deployed
                    && !r.cut_off
                    && (*i < self.config.routers || r.joined_us.is_some_and(|j| j < freeze_seen_us))
            })
            .map(|(_, r)| protocol::NodeName::from(r.name.as_str()))
            .filter(|n| {
                !self.checker.acks_counted.sent_any(n, protocol::Epoch(0), |a| *a == protocol::messages::Ack::Retired)
            })
            .collect()
    }

    /// Whether some replica's applied roster has `router` active or retiring (while a rebuilt
    /// group recovers: the lost group's).
    pub fn on_roster_somewhere(&self, router: &str) -> bool {
        let name = protocol::NodeName::from(router);
        if self.recovering {
            return self.lost_groups.last().is_some_and(|g| {
                matches!(
                    g.roster.get(&name),
                    Some(protocol::messages::RosterStatus::Active | protocol::messages::RosterStatus::Retiring)
                )
            });
        }
        self.replicas.iter().any(|r| {
            read_applied(&r.disk, |a| {
                matches!(
                    a.state.roster.get(&name),
                    Some(protocol::messages::RosterStatus::Active | protocol::messages::RosterStatus::Retiring)
                )
            })
        })
    }

    pub fn scan_replicas(&mut self) {
        let now = self.now_us();
        let epochs: Vec<protocol::Epoch> = self
            .replicas
            .iter()
            .map(|r| read_applied(&r.disk, |a| a.state.current.as_ref().map_or(protocol::Epoch(0), |u| u.epoch)))
            .collect();
        let needed: Vec<Vec<protocol::NodeName>> = epochs.iter().map(|e| self.routers_in_service(*e)).collect();
        for (i, r) in self.replicas.iter().enumerate() {
            let routers = &needed[i];
            let (found, decided) = read_applied(&r.disk, |a| {
                let found = self.checker.acks_counted.check(coordinator_addr(i), &a.state);
                (found, self.checker.decided_on_acks.check(&self.checker.acks_counted, &a.state, routers))
            });
            for v in found.into_iter().chain(decided) {
                self.checker.violation(now, v);
            }
            let outcomes: Vec<_> = read_applied(&r.disk, |a| {
                a.state.outcomes.iter().map(|(e, o)| (*e, *o == Outcome::Committed)).collect()
            });
            for (epoch, committed) in outcomes {
                let found = self.checker.agreement.outcome_applied(coordinator_addr(i), epoch, committed);
                self.checker.found(now, found);
            }
        }
    }

    /// The replica that currently believes it leads, if any.
    pub fn leader(&self) -> Option<usize> {
        self.replicas.iter().position(|r| r.running.as_ref().is_some_and(|rep| rep.is_leader()))
    }
}

/// Waits for a reply until `timeout`. A lost message drops its reply slot, but a real caller
/// cannot know that: it learns only by waiting out its timeout (answering at once would let
/// retry loops spin without virtual time passing).
pub async fn await_reply(rx: oneshot::Receiver<Vec<u8>>, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = virtual_now() + timeout;
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(bytes)) => Some(bytes),
        Ok(Err(_dropped)) => {
            tokio::time::sleep_until(deadline).await;
            None
        }
        Err(_elapsed) => None,
    }
}

fn carries_commit(bytes: &[u8]) -> bool {
    matches!(
        codec::decode_frame::<Response>(bytes),
        Ok(Some((Response::Node(NodeResponse::View(v)), _))) if matches!(v.decision, Decision::Commit(_))
    )
}

/// The coordinator replicas' transport in the simulator.
#[derive(Clone)]
pub struct SimTransport {
    pub world: Weak<Mutex<World>>,
    pub me: Addr,
    /// Wait for answers in a task of their own (for actors: see [`detached`]).
    pub detach: bool,
    /// The node incarnation that calls (`None`: the operator, or a coordinator replica): a
    /// process that has crashed sends nothing more, even from the middle of its last step.
    pub incarnation: Option<u64>,
}

/// Runs `wait` in a task of its own and returns a future of its output that is cheap to poll.
/// An actor polls every pending future of its own each time it wakes; a future with a timer
/// inside re-registers that timer at every poll, so actors wait on a channel instead.
pub fn detached<T: Send + 'static>(wait: impl Future<Output = T> + Send + 'static) -> impl Future<Output = T> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(wait.await);
    });
    async move { rx.await.expect("the waiting task ends only by answering") }
}

impl Transport for SimTransport {
    fn call(
        &self,
        to: u64,
        request: Request,
        timeout: Duration,
    ) -> impl Future<Output = Result<Response, TransportError>> + Send + 'static {
        // The request leaves now; the future only waits for the answer.
        let frozen_ack = match (&request, ProcId::of(self.me)) {
            (Request::Node(NodeRequest::Ack { epoch, ack: Ack::Frozen, .. }), ProcId::Router(i)) => Some((i, *epoch)),
            _ => None,
        };
        let sent = codec::encode_frame(&request).map_err(|e| TransportError::Codec(e.to_string())).and_then(|bytes| {
            let shared = self.world.upgrade().ok_or_else(|| TransportError::Unreachable("world ended".into()))?;
            with(&shared, |w| {
                if self.incarnation.is_some_and(|inc| !w.is_up(self.me, inc)) {
                    return Err(TransportError::Unreachable("the process is down".into()));
                }
                if let Request::Node(NodeRequest::Ack { node, epoch, ack }) = &request {
                    w.checker.acks_counted.sent(node, *epoch, ack);
                }
                if let (Request::Node(NodeRequest::Report { report, .. }), ProcId::Router(i)) =
                    (&request, ProcId::of(self.me))
                {
                    // Checked where the report leaves the router.
                    let found = w.checker.verdicts.reported(i, &w.routers[i].name, report);
                    let now = w.now_us();
                    w.checker.found(now, found);
                }
                if let Some((router, epoch)) = frozen_ack {
                    // Checked where the ack leaves the router.
                    let found = w.checker.frozen_ack.acked(router, &w.routers[router].name, epoch);
                    let now = w.now_us();
                    w.checker.found(now, found);
                }
                let sent = w.send_request(self.me, to, bytes);
                if let Some((router, _)) = frozen_ack {
                    w.fire_on(crate::faults::Condition::RouterAcked { router });
                }
                Ok(sent)
            })
        });
        let wait = async move {
            match await_reply(sent?, timeout).await {
                Some(bytes) => match codec::decode_frame::<Response>(&bytes) {
                    Ok(Some((response, _))) => Ok(response),
                    Ok(None) => Err(TransportError::Codec("truncated frame".into())),
                    Err(e) => Err(TransportError::Codec(e.to_string())),
                },
                None => Err(TransportError::Timeout(timeout)),
            }
        };
        let detach = self.detach;
        async move {
            if detach {
                detached(wait).await
            } else {
                wait.await
            }
        }
    }
}

// ---- coordinator lifecycle ------------------------------------------------------------------

/// A message in a few words, for a trace kept as text.
fn describe(packet: &Packet) -> String {
    let (Packet::Request { bytes, .. } | Packet::Reply { bytes, .. }) = packet;
    let text = if let Ok(Some((r, _))) = protocol::codec::decode_frame::<protocol::messages::Request>(bytes) {
        format!("{r:?}")
    } else if let Ok(Some((r, _))) = protocol::codec::decode_frame::<protocol::messages::Response>(bytes) {
        format!("{r:?}")
    } else if let Ok(Some((m, _))) = protocol::codec::decode_frame::<crate::wire::DataMessage>(bytes) {
        format!("{m:?}")
    } else if let Ok(Some((a, _))) = protocol::codec::decode_frame::<crate::wire::DataResponse>(bytes) {
        format!("{a:?}")
    } else {
        String::new()
    };
    text.chars().take(200).collect()
}

/// What a replica's clock reads minus virtual time, `elapsed_ms` into the run: its skew, except
/// while a jump back past the start pins the clock at 0. Then the clock stands still, a
/// backward jump that grows with time, which the checkers' clock spread must count (hunt seed
/// 21005627: a freeze stamped on a pinned clock was decided 1.8 s "late").
pub(crate) fn clock_offset_ms(elapsed_ms: i64, skew_ms: i64) -> i64 {
    (elapsed_ms + skew_ms).max(0) - elapsed_ms
}

/// Starts (or restarts) replica `index` on its kept disk.
pub async fn start_replica(shared: &Shared, index: usize) {
    let addr = coordinator_addr(index);
    let (disk, timing, members, skew, start) = with(shared, |w| {
        let slot = &w.replicas[index];
        let members: Vec<u64> = (0..w.config.coordinators).map(coordinator_addr).collect();
        (slot.disk.clone(), w.timing, members, slot.skew_ms.clone(), w.start)
    });
    let clock: Clock = Arc::new(move || {
        let elapsed_ms = virtual_now().duration_since(start).as_millis() as i64;
        (elapsed_ms + clock_offset_ms(elapsed_ms, skew.load(Ordering::Relaxed))) as u64
    });
    let transport = SimTransport { world: Arc::downgrade(shared), me: addr, detach: false, incarnation: None };
    let replica = match Replica::start(addr, &members, disk, transport, timing, clock, false).await {
        Ok(r) => r,
        Err(e) => {
            with(shared, |w| {
                let now = w.now_us();
                w.checker.violation(now, Violation::Setup { what: format!("replica {addr} failed to start: {e}") })
            });
            return;
        }
    };
    // A group started after a disaster is a rebuilt one: its replicas are started as the
    // operator is told to (`imago coordinator --rebuilt`).
    if with(shared, |w| !w.lost_groups.is_empty()) {
        replica.set_rebuilt();
    }
    let driver = {
        let r = replica.clone();
        tokio::spawn(async move { r.run_driver().await })
    };
    with(shared, |w| {
        w.set_up(addr, true);
        let slot = &mut w.replicas[index];
        slot.running = Some(replica);
        slot.driver = Some(driver);
        w.record(format_args!("replica {addr} started"));
    });
}

/// Crashes replica `index`: its tasks stop, its disk stays.
pub fn crash_replica(shared: &Shared, index: usize) {
    let addr = coordinator_addr(index);
    let stopped = with(shared, |w| {
        if !w.set_up(addr, false) {
            return None;
        }
        let slot = &mut w.replicas[index];
        if let Some(d) = slot.driver.take() {
            d.abort();
        }
        w.record(format_args!("replica {addr} crashed"));
        w.replicas[index].running.take()
    });
    if let Some(replica) = stopped {
        tokio::spawn(async move { replica.shutdown().await });
    }
}

/// Creates the replica slots (all down, fresh disks, with the planted state-machine bug if any).
pub fn replica_slots(
    count: usize,
    bug: Option<coordinator::upgrade::ApplyBug>,
    genesis: &UpgradeState,
) -> Vec<ReplicaSlot> {
    (0..count)
        .map(|_| {
            let disk = new_disk_with(genesis.clone());
            disk.lock().unwrap_or_else(|p| p.into_inner()).bug = bug;
            ReplicaSlot { disk, running: None, driver: None, skew_ms: Arc::new(AtomicI64::new(0)) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::clock_offset_ms;

    #[test]
    fn a_clock_pinned_at_zero_falls_further_behind_until_it_moves_again() {
        assert_eq!(clock_offset_ms(10, 5), 5);
        assert_eq!(clock_offset_ms(1958, -3763), -1958, "pinned at 0: behind by all the time elapsed");
        assert_eq!(clock_offset_ms(4000, -3763), -3763, "moving again: behind by its skew");
    }
}
