//! A router process in the simulator: the production ingress actor over simulated I/O. Every
//! decision is the core's, every wiring the actor's; here client requests arrive, payloads
//! travel through the simulated network, answers reach the client oracle, and the disk is a
//! field that survives crashes.

use crate::app::AppOp;
use crate::checkers::observed::{self, RouterFigures, RouterSeen};
use crate::checkers::{hold_queue, isolation, reads, AdmissionPoint, Violation};
use crate::config::Bug;
use crate::net::ProcId;
use crate::node_io::{sim_clock, SimClock, SimDisk};
use crate::oracle::ClientOutcome;
use crate::procs::{OpenRequest, RouterObserved, SimClient};
use crate::wire::{DataMessage, DataRequest, DataResponse};
use crate::world::{await_reply, detached, with, SimTransport, World};
use node::ingress::{ClientRequest, IngressActor};
use node::io::{Ingress, Purpose};
use node_core::duties::router::Mode;
use node_core::duties::router::{HoldCause, RouterConfig};
use node_core::ingress::{ClientReply, IngressConfig, IngressCore, IngressEvent, Unavailable};
use node_core::{NodeRecord, RequestKey, StoreAnswer};
use protocol::codec;
use protocol::{Decision, Duty, Generation};
use std::future::Future;
use std::sync::Weak;
use std::time::Duration;

/// Most requests one router tracks at once.
const REQUESTS_MAX: usize = 10_000;
/// Response fields the validator ignores: the simulated application's answers carry no
/// timestamps or other fields that may differ between universes.
const IGNORE_FIELDS: &[String] = &[];

pub type RouterActor = IngressActor<SimTransport, SimDisk, SimIngress, SimClock>;

/// The router's side toward clients and data nodes, in the simulated world.
pub struct SimIngress {
    world: Weak<std::sync::Mutex<World>>,
    index: usize,
    incarnation: u64,
    /// What was last written to the world (it is written only when it changes).
    observed: std::cell::Cell<Option<RouterObserved>>,
}

impl SimIngress {
    fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> Option<T> {
        let shared = self.world.upgrade()?;
        let addr = ProcId::Router(self.index).addr();
        with(&shared, |w| w.is_up(addr, self.incarnation).then(|| f(w)))
    }
}

/// A send's answer on its way to the router's actor, with what the checkers note of it.
pub struct SimSent {
    key: RequestKey,
    purpose: Purpose,
    read_only: bool,
    /// The data node it went to, if it was sent.
    sent_to: Option<usize>,
    answer: Option<StoreAnswer>,
}

impl Ingress for SimIngress {
    type Request = SimClient;
    type Sent = SimSent;

    fn forward(
        &self,
        request: &SimClient,
        generation: Generation,
        endpoint: &str,
        key: RequestKey,
        purpose: Purpose,
    ) -> impl Future<Output = SimSent> + 'static {
        let mirror = purpose.is_mirror();
        let index = self.index;
        let read_only = request.op.read_only();
        let sent = self.with(|w| {
            let now = w.now_us();
            let (addr, name) = (w.routers[index].addr, &w.routers[index].name);
            if endpoint != crate::app::endpoint(generation) {
                let found = Violation::WrongEndpoint {
                    router: name.clone(),
                    generation: generation.0,
                    endpoint: endpoint.to_string(),
                };
                w.checker.violation(now, found);
            }
            if !mirror {
                let found = w.checker.single_universe.admitted(now, AdmissionPoint::Router, name, generation, key.id);
                w.checker.found(now, found);
                w.checker.frozen_ack.forwarded(index, key.id);
                let router = &mut w.routers[index];
                if let Some(open) = router.open.get_mut(&request.ticket) {
                    if !open.forwarded {
                        router.unforwarded.remove(&(open.issued_us, request.ticket));
                    }
                    open.forwarded = true;
                }
            } else {
                w.checker.mirrors.mirrored(index, key);
                // Mirrors go from the generation the upgrade upgrades from to the next.
                let from = w.upgrade_from();
                if matches!(w.routers[index].observed.mode, Mode::Serving(g) if g != from) || generation != from.next()
                {
                    let router = name.clone();
                    w.checker.violation(now, Violation::MirroredAfterSwitch { router, request: key.id });
                }
            }
            w.trace.forward(now, addr, key.id, generation, mirror);
            let shard = request.op.key().rem_euclid(w.config.data_nodes as i64) as usize;
            let wire = DataMessage::Request(DataRequest { key, generation, mirror, op: request.op.clone() });
            let bytes = codec::encode_frame(&wire).expect("data requests encode");
            (w.send_request(addr, ProcId::Data(shard).addr(), bytes), w.data_timeout_ms, shard)
        });
        let sent_to = sent.as_ref().map(|(_, _, shard)| *shard);
        let answer = detached(async move {
            let (rx, timeout_ms, _) = sent?;
            let bytes = await_reply(rx, Duration::from_millis(timeout_ms)).await;
            bytes.and_then(|b| codec::decode_frame::<DataResponse>(&b).ok().flatten().map(|(r, _)| r))
        });
        async move { SimSent { key, purpose, read_only, sent_to, answer: answer.await } }
    }

    // What the router learns is noted when the actor takes the answer, just before the core
    // learns it, so the checkers' counts and the core's agree between any two inputs.
    fn taken(&self, sent: SimSent) -> Option<StoreAnswer> {
        let SimSent { key, purpose, read_only, sent_to, answer } = sent;
        let (index, mirror) = (self.index, purpose.is_mirror());
        self.with(|w| {
            if !mirror {
                w.checker.frozen_ack.completed(index, key.id);
            }
            if read_only {
                // The simulator compares mirrored answers itself, as they arrive.
                let name = w.routers[index].name.clone();
                let drifted = sent_to.is_some_and(|shard| w.data[shard].drifted);
                let found = w.checker.mirrors.answered(index, &name, key, mirror, answer.clone(), drifted);
                let now = w.now_us();
                w.checker.found(now, found);
            }
        });
        answer
    }

    fn notify_frozen(&self, epoch: protocol::Epoch) {
        let index = self.index;
        self.with(|w| {
            let (addr, name) = (w.routers[index].addr, w.routers[index].name.clone());
            let router = protocol::NodeName::from(name.as_str());
            w.checker.acks_counted.noticed(&router, epoch);
            let bytes = codec::encode_frame(&DataMessage::Frozen { router, epoch }).expect("notices encode");
            for shard in 0..w.data.len() {
                // No answer is awaited: the reply slot is dropped.
                drop(w.send_request(addr, ProcId::Data(shard).addr(), bytes.clone()));
            }
        });
    }

    fn reply(&self, request: SimClient, reply: ClientReply) {
        let index = self.index;
        self.with(|w| {
            let Some(open) = w.routers[index].open.remove(&request.ticket) else { return };
            w.routers[index].unforwarded.remove(&(open.issued_us, request.ticket));
            let now = w.now_us();
            let outcome = match &reply {
                ClientReply::Answer(StoreAnswer::Ok { body, .. }) => {
                    let name = w.routers[index].name.clone();
                    let found = reads::check(&w.oracle, &name, &open.op, body.as_ref(), open.issued_us, now);
                    w.checker.found(now, found);
                    let standing = crate::checkers::roster::Standing {
                        on_roster: w.on_roster_somewhere(&name),
                        acked_retired: w.checker.acks_counted.sent_any(
                            &protocol::NodeName::from(name.as_str()),
                            protocol::Epoch(0),
                            |a| *a == protocol::messages::Ack::Retired,
                        ),
                        forced: w.routers[index].cut_off,
                    };
                    w.checker.found(now, crate::checkers::roster::served(&name, standing));
                    ClientOutcome::Acked
                }
                ClientReply::Answer(StoreAnswer::Rejected { reason }) => {
                    let name = w.routers[index].name.clone();
                    w.record(format_args!("{name} answers ticket {}: rejected ({reason})", request.ticket));
                    ClientOutcome::Failed
                }
                ClientReply::Unavailable { reason, .. } => {
                    let name = w.routers[index].name.clone();
                    if let Unavailable::Hold(reason) = reason {
                        let held_others = w.routers[index].unforwarded.len();
                        let t = &w.plan.thresholds;
                        let held_ms = now / 1_000 - open.issued_us / 1_000;
                        let found = observed::fail_reason(
                            &name,
                            *reason,
                            held_others,
                            t.hold_queue_max as usize,
                            held_ms,
                            t.hold_ms_max,
                            w.routers[index].disk.decision == protocol::Decision::Retired,
                        );
                        w.checker.found(now, found);
                    }
                    w.record(format_args!("{name} fails ticket {}: {reason:?}", request.ticket));
                    ClientOutcome::Failed
                }
                // (The ingress core tells a client `Unknown` for a request not admitted.)
                ClientReply::Unknown | ClientReply::Answer(StoreAnswer::NotAdmitted { .. }) => ClientOutcome::Unknown,
            };
            w.client_done(open.write, outcome, now);
            let router = &mut w.routers[index];
            if router.open.is_empty() {
                if let Some(idle) = router.idle.take() {
                    let _ = idle.send(());
                }
            }
        });
    }

    fn event(&self, event: IngressEvent) {
        let index = self.index;
        self.with(|w| {
            let now = w.now_us();
            let name = &w.routers[index].name;
            match event {
                IngressEvent::Acted(decision) => {
                    let router = &mut w.routers[index];
                    match decision {
                        Decision::Freeze(_) => router.acted_freezes += 1,
                        _ => router.acted_serving += 1,
                    }
                    w.note_acted(ProcId::Router(index), decision)
                }
                IngressEvent::Released { id, held_ms, cause } => {
                    w.trace.event(now, format_args!("{name} released {id} after {held_ms} ms"));
                    let r = &w.routers[index];
                    let found = observed::hold_cause(name, cause, r.booted, r.acted_serving, r.acted_freezes);
                    w.checker.found(now, found);
                    let found = isolation::released(name, r.booted.own_disk, cause, held_ms);
                    w.checker.found(now, found);
                    let found = w.checker.bounded_hold.released(name, held_ms);
                    w.checker.found(now, found);
                    match cause {
                        HoldCause::Freeze => w.stats.hold_ms.push(held_ms),
                        HoldCause::Startup => w.stats.startup_hold_ms.push(held_ms),
                        HoldCause::Boot => w.stats.boot_hold_ms.push(held_ms),
                    }
                }
                // The answers are judged by the simulator itself (`checkers::mirrors`); the
                // verdict is checked against the one they deserve (`checkers::verdicts`).
                IngressEvent::Compared { id, verdict, old, new } => {
                    w.trace.event(now, format_args!("{name} compared {id}: {verdict:?}"));
                    let found = w.checker.verdicts.compared(index, name, verdict, &old, &new, IGNORE_FIELDS);
                    w.checker.found(now, found);
                }
                // The router no longer waits for it: its answer, if any, comes to nothing. What
                // it may still write in the old universe is the data tier's fence's to refuse
                // (`checkers::single_universe` judges the admissions).
                IngressEvent::Ended { id, key, in_flight_ms } => {
                    w.trace.event(now, format_args!("{name} ended {id} after {in_flight_ms} ms in flight"));
                    w.checker.frozen_ack.completed(index, key.id);
                    w.stats.ended += 1;
                }
                IngressEvent::ValidationReset { upgrade } => {
                    w.trace.event(now, format_args!("{name} validates for upgrade {upgrade:?} from zero"));
                    w.checker.verdicts.reset(index);
                }
            }
        });
    }

    fn observe(&self, now_ms: u64, core: &IngressCore) {
        let router = core.router();
        let observed =
            RouterObserved { mode: router.mode(), held: router.held(), oldest_held_ms: router.oldest_held_ms() };
        let validate = core.validate();
        let figures = RouterFigures {
            held: router.held(),
            oldest_held_ms: router.oldest_held_ms(),
            in_flight: router.in_flight(),
            requests: core.requests(),
            samples: validate.samples,
            mismatches: validate.mismatches,
            stale: validate.stale,
        };
        let changed = self.observed.replace(Some(observed)) != Some(observed);
        let index = self.index;
        self.with(|w| {
            if changed {
                w.routers[index].observed = observed;
                w.check_hold_queue(index);
            }
            // Requests that arrived before this millisecond began are surely taken (the router's
            // mailbox runs before time moves on); requests arrive in ticket order, so the others
            // are the last ones.
            let ms_start_us = now_ms * 1_000;
            let r = &w.routers[index];
            let held_all = r.unforwarded.len();
            let held_taken = held_all - r.unforwarded.iter().rev().take_while(|(at, _)| *at >= ms_start_us).count();
            let oldest_taken_us = r.unforwarded.first().map(|(at, _)| *at).filter(|at| *at < ms_start_us);
            let open_taken = r.open.len() - r.open.values().rev().take_while(|o| o.issued_us >= ms_start_us).count();
            let (samples, mismatches, stale) = w.checker.verdicts.counts(index);
            let seen = RouterSeen {
                now_ms,
                held_taken,
                held_all,
                oldest_taken_ms: oldest_taken_us.map(|us| us / 1_000),
                in_flight: w.checker.frozen_ack.in_flight(index),
                open_taken,
                open_all: r.open.len(),
                mirrors_pending: w.checker.mirrors.pending(index),
                samples,
                mismatches,
                stale,
            };
            for found in observed::router(&r.name, figures, seen) {
                let now = w.now_us();
                w.checker.violation(now, found);
            }
        });
    }
}

impl World {
    /// A client sends `op` to router `i`.
    pub fn client_arrival(&mut self, i: usize, op: AppOp) {
        // The load balancer in front of the routers sends nothing to one taken out of rotation.
        let n = self.routers.len();
        let i = (i..i + n).map(|j| j % n).find(|&j| self.routers[j].in_rotation).unwrap_or(i);
        let now = self.now_us();
        let write = self.oracle.issued(&op, now);
        let router = &mut self.routers[i];
        let Some((actor, _)) = router.actor.as_ref().filter(|_| self.procs[&router.addr].up) else {
            // Connection refused: the request reached nobody.
            let name = self.routers[i].name.clone();
            self.record(format_args!("a client request to {name} is refused: the router is down"));
            self.client_done(write, ClientOutcome::Failed, now);
            return;
        };
        let ticket = router.next_ticket;
        router.next_ticket += 1;
        router.open.insert(ticket, OpenRequest { op: op.clone(), issued_us: now, write, forwarded: false });
        router.unforwarded.insert((now, ticket));
        actor.do_send(ClientRequest { read_only: op.read_only(), long: false, request: SimClient { ticket, op } });
    }

    /// Requests router `i` has taken (arrived before now) and neither forwarded nor answered
    /// are held: never more than the plan's limit.
    fn check_hold_queue(&mut self, i: usize) {
        let now = self.now_us();
        let router = &self.routers[i];
        let held = router.unforwarded.len() - router.unforwarded.iter().rev().take_while(|(at, _)| *at >= now).count();
        let found = hold_queue::check(&router.name, held, self.plan.thresholds.hold_queue_max as usize);
        self.checker.found(now, found);
    }

    /// A client's request ended with `outcome` (every failure counts, reads too).
    fn client_done(&mut self, write: crate::oracle::WriteRef, outcome: ClientOutcome, now: u64) {
        if outcome != ClientOutcome::Acked {
            self.stats.failed_requests += 1;
        }
        self.oracle.done(write, outcome, now);
    }

    pub fn crash_router(&mut self, i: usize) {
        let addr = self.routers[i].addr;
        if !self.set_up(addr, false) {
            return;
        }
        // The process and every task it started end at once; only the disk survives.
        if let Some((_, task)) = self.routers[i].actor.take() {
            task.abort();
        }
        let open = std::mem::take(&mut self.routers[i].open);
        self.routers[i].unforwarded.clear();
        let now = self.now_us();
        for request in open.into_values() {
            self.client_done(request.write, ClientOutcome::Unknown, now);
        }
        self.checker.mirrors.forget_router(i);
        self.checker.verdicts.reset(i);
        self.checker.frozen_ack.crashed(i);
        let name = self.routers[i].name.clone();
        self.checker.propagation.crashed(&name);
        self.routers[i].observed = RouterObserved::DOWN;
        let name = self.routers[i].name.clone();
        self.record(format_args!("{name} crashed"));
    }

    pub fn restart_router(&mut self, i: usize) {
        let addr = self.routers[i].addr;
        // A router retired by force stays cut off; the reserve runs only once it is deployed.
        if self.routers[i].cut_off || !self.routers[i].deployed {
            return;
        }
        if !self.set_up(addr, true) {
            return;
        }
        let record = self.routers[i].disk.clone();
        let name = self.routers[i].name.clone();
        self.record(format_args!("{name} restarted with {:?}", record.decision));
        let t = &self.plan.thresholds;
        let config = IngressConfig {
            agent: self.agent_config(&name, vec![Duty::Route, Duty::Validate], None),
            router: RouterConfig {
                hold_ms_max: t.hold_ms_max,
                hold_queue_max: t.hold_queue_max as usize,
                inflight_ms_max: t.inflight_ms_max,
                retry_after_ms: 1_000,
            },
            ignore_fields: IGNORE_FIELDS.to_vec(),
            requests_max: REQUESTS_MAX,
            genesis_endpoints: vec![crate::app::endpoint(Generation::GENESIS)],
        };
        let bug = self.config.bug;
        let core = IngressCore::new(config).with_bug(Bug::router(bug)).with_agent_bug(Bug::agent(bug));
        let incarnation = self.procs[&addr].incarnation;
        let world = self.me.clone();
        let actor = RouterActor::new(
            core,
            record.clone(),
            SimTransport { world: world.clone(), me: addr, detach: true, incarnation: Some(incarnation) },
            SimDisk { world: world.clone(), node: ProcId::Router(i), incarnation },
            SimIngress { world, index: i, incarnation, observed: std::cell::Cell::new(None) },
            sim_clock(self),
        );
        let (addr, task) = node::start_local(actor);
        let router = &mut self.routers[i];
        router.actor = Some((addr.recipient(), task));
        (router.acted_serving, router.acted_freezes) = (0, 0);
        // The simulator's own account of "its own disk": its own record, confirmed by a read.
        let own_disk = record.confirmed && record.owner == NodeRecord::owner_of(&router.name);
        let disk_frozen = matches!(record.decision, Decision::Freeze(_));
        router.booted = observed::Booted { own_disk, disk_frozen };
    }
}
