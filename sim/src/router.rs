//! A router process: agent + router core + validate core, and its clients' requests.

use crate::app::AppOp;
use crate::checker::AdmissionPoint;
use crate::config::Bug;
use crate::oracle::ClientOutcome;
use crate::wire::{DataRequest, DataResponse};
use crate::world::{Done, World, DATA_BASE, ROUTER_BASE};
use node_core::agent::{AgentCore, AgentInput, AgentOutput};
use node_core::duties::router::{HoldCause, RouterConfig, RouterCore, RouterInput, RouterOutput};
use node_core::duties::validate::{Observed, ValidateCore, Verdict};
use protocol::codec;
use protocol::messages::{NodeReport, Phase};
use protocol::{Decision, Duty, Universe};
use std::collections::BTreeMap;

/// One client request inside a router.
#[derive(Clone, Debug)]
pub struct ClientRequest {
    pub op: AppOp,
    pub answered: bool,
    pub mirror_pending: bool,
    pub old_seen: Option<Observed>,
    pub new_seen: Option<Observed>,
}

/// A router process. `persisted` is its disk; the rest is lost in a crash.
pub struct RouterProc {
    pub addr: u64,
    pub name: String,
    pub persisted: Decision,
    pub core: RouterCore,
    pub agent: AgentCore,
    pub validate: ValidateCore,
    pub requests: BTreeMap<u64, ClientRequest>,
    pub next_request: u64,
}

impl RouterProc {
    pub fn new(world: &World, index: usize) -> RouterProc {
        let name = format!("router-{index}");
        let agent = AgentCore::new(world.agent_config(&name, vec![Duty::Route, Duty::Validate]));
        RouterProc {
            addr: ROUTER_BASE + index as u64,
            name,
            persisted: Decision::Initial,
            core: RouterCore::new(router_config(world)),
            agent,
            validate: ValidateCore::default(),
            requests: BTreeMap::new(),
            next_request: 1,
        }
    }
}

fn router_config(world: &World) -> RouterConfig {
    let t = &world.plan.thresholds;
    RouterConfig {
        hold_ms_max: t.hold_ms_max,
        hold_queue_max: t.hold_queue_max as usize,
        retry_after_ms: 1_000,
        bug: Bug::router(world.config.bug),
    }
}

impl World {
    /// A client sends `op` to router `i`.
    pub fn client_arrival(&mut self, i: usize, op: AppOp) {
        let addr = self.routers[i].addr;
        if !self.procs[&addr].up {
            // Connection refused: the request reached nobody.
            self.client_outcome(&op, ClientOutcome::Failed);
            return;
        }
        let router = &mut self.routers[i];
        let id = router.next_request;
        router.next_request += 1;
        let read_only = op.read_only();
        router
            .requests
            .insert(id, ClientRequest { op, answered: false, mirror_pending: false, old_seen: None, new_seen: None });
        let now = self.now_ms();
        let outs = self.routers[i].core.handle(now, RouterInput::Request { id, read_only });
        self.router_outputs(i, outs);
    }

    pub fn router_outputs(&mut self, i: usize, outs: Vec<RouterOutput>) {
        for out in outs {
            match out {
                RouterOutput::Forward { id, universe } => self.forward(i, id, universe, false),
                RouterOutput::Mirror { id } => self.forward(i, id, Universe::New, true),
                RouterOutput::Fail { id, reason, .. } => {
                    let name = self.routers[i].name.clone();
                    self.record(format_args!("{name} fails {id}: {reason:?}"));
                    self.finish(i, id, ClientOutcome::Failed)
                }
                RouterOutput::Ack { epoch, ack } => {
                    let now = self.now_ms();
                    let outs = self.routers[i].agent.handle(now, AgentInput::OweAck { epoch, ack });
                    self.router_agent_outputs(i, outs);
                }
                RouterOutput::Released { id, held_ms, cause } => {
                    let now = self.now_us();
                    let name = self.routers[i].name.clone();
                    self.record(format_args!("{name} released {id} after {held_ms} ms"));
                    self.checker.released(now, &name, held_ms);
                    match cause {
                        HoldCause::Freeze => self.stats.hold_ms.push(held_ms),
                        HoldCause::Startup => self.stats.startup_hold_ms.push(held_ms),
                    }
                }
            }
        }
    }

    fn forward(&mut self, i: usize, id: u64, universe: Universe, mirror: bool) {
        let Some(request) = self.routers[i].requests.get_mut(&id) else { return };
        if mirror {
            request.mirror_pending = true;
        }
        let op = request.op.clone();
        let (addr, name) = (self.routers[i].addr, self.routers[i].name.clone());
        if !mirror {
            let now = self.now_us();
            self.checker.admitted(now, AdmissionPoint::Router, &name, universe, id);
        }
        self.record(format_args!("{name} forwards {id} to {universe:?} mirror={mirror}"));
        let shard = op.key().rem_euclid(self.config.data_nodes as i64) as u64;
        let wire = DataRequest { request: (addr << 32) | id, universe, mirror, op };
        let bytes = codec::encode_frame(&wire).expect("data requests encode");
        let done = if mirror {
            Done::Mirror { router: i, request: id }
        } else {
            Done::Data { router: i, request: id, universe }
        };
        let timeout = self.data_timeout_ms;
        self.node_call(addr, DATA_BASE + shard, bytes, timeout, done);
    }

    pub fn data_done(&mut self, i: usize, id: u64, universe: Universe, answer: Option<Vec<u8>>) {
        let now = self.now_ms();
        if universe == Universe::Old {
            let outs = self.routers[i].core.handle(now, RouterInput::OldCompleted { id });
            self.router_outputs(i, outs);
        }
        let response = answer.and_then(|b| codec::decode_frame::<DataResponse>(&b).ok().flatten().map(|(r, _)| r));
        let outcome = match response {
            None => ClientOutcome::Unknown,
            Some(DataResponse::Rejected { .. }) => ClientOutcome::Failed,
            Some(DataResponse::Ok { body, position }) => {
                if let Some(request) = self.routers[i].requests.get_mut(&id) {
                    if request.mirror_pending || request.new_seen.is_some() {
                        request.old_seen = Some(Observed { body, position });
                    }
                }
                ClientOutcome::Acked
            }
        };
        self.finish(i, id, outcome);
    }

    pub fn mirror_done(&mut self, i: usize, id: u64, answer: Option<Vec<u8>>) {
        let response = answer.and_then(|b| codec::decode_frame::<DataResponse>(&b).ok().flatten().map(|(r, _)| r));
        if let Some(request) = self.routers[i].requests.get_mut(&id) {
            request.mirror_pending = false;
            if let Some(DataResponse::Ok { body, position }) = response {
                request.new_seen = Some(Observed { body, position });
            }
        }
        self.maybe_compare(i, id);
        self.maybe_forget(i, id);
    }

    fn maybe_compare(&mut self, i: usize, id: u64) {
        let Some(request) = self.routers[i].requests.get(&id) else { return };
        let (Some(old), Some(new)) = (request.old_seen.clone(), request.new_seen.clone()) else { return };
        let verdict = self.routers[i].validate.compare(&old, &new);
        if verdict == Verdict::Mismatch {
            let now = self.now_us();
            let name = self.routers[i].name.clone();
            self.checker.violation(
                now,
                format!(
                    "validate: {name} request {id} differs at position {}: old {:?} new {:?}",
                    old.position.0, old.body, new.body
                ),
            );
        }
        if let Some(r) = self.routers[i].requests.get_mut(&id) {
            r.old_seen = None;
            r.new_seen = None;
        }
        let v = &self.routers[i].validate;
        let report = NodeReport { samples: v.samples, mismatches: v.mismatches, ..Default::default() };
        let now = self.now_ms();
        let outs = self.routers[i].agent.handle(now, AgentInput::Report(report));
        self.router_agent_outputs(i, outs);
    }

    fn maybe_forget(&mut self, i: usize, id: u64) {
        if self.routers[i].requests.get(&id).is_some_and(|r| r.answered && !r.mirror_pending) {
            self.routers[i].requests.remove(&id);
        }
    }

    fn finish(&mut self, i: usize, id: u64, outcome: ClientOutcome) {
        let Some(request) = self.routers[i].requests.get_mut(&id) else { return };
        if request.answered {
            return;
        }
        request.answered = true;
        let op = request.op.clone();
        self.client_outcome(&op, outcome);
        self.maybe_compare(i, id);
        self.maybe_forget(i, id);
    }

    pub fn client_outcome(&mut self, op: &AppOp, outcome: ClientOutcome) {
        match op {
            AppOp::RegisterUser { id, .. } => {
                self.oracle.registrations.insert(*id, outcome);
                self.oracle.count(outcome);
            }
            AppOp::UpdateBio { id, bio } => {
                self.oracle.bio_updates.entry(*id).or_default().push((bio.clone(), outcome));
                self.oracle.count(outcome);
            }
            AppOp::AddItem { .. } => self.oracle.count(outcome),
            AppOp::ViewUser { .. } | AppOp::ViewItem { .. } => self.oracle.reads += 1,
        }
    }

    pub fn router_agent_outputs(&mut self, i: usize, outs: Vec<AgentOutput>) {
        let addr = self.routers[i].addr;
        self.send_agent_requests(addr, &outs);
        let now_ms = self.now_ms();
        for out in outs {
            match out {
                AgentOutput::Send { .. } => {}
                AgentOutput::Persist(decision) => {
                    self.routers[i].persisted = decision;
                    let name = self.routers[i].name.clone();
                    self.note_persisted(&name, decision);
                }
                AgentOutput::Act(decision) => {
                    let name = self.routers[i].name.clone();
                    self.note_acted(&name, decision);
                    let outs = self.routers[i].core.handle(now_ms, RouterInput::Decision(decision));
                    self.router_outputs(i, outs);
                }
                AgentOutput::View(view) => {
                    let mirroring = view.phase == Some(Phase::Syncing);
                    let outs = self.routers[i].core.handle(now_ms, RouterInput::Mirroring(mirroring));
                    self.router_outputs(i, outs);
                }
            }
        }
    }

    /// Periodic work of router `i`.
    pub fn router_tick(&mut self, i: usize) {
        let now_ms = self.now_ms();
        let outs = self.routers[i].agent.handle(now_ms, AgentInput::Tick);
        self.router_agent_outputs(i, outs);
        let outs = self.routers[i].core.handle(now_ms, RouterInput::Tick);
        self.router_outputs(i, outs);
        if let Some(since) = self.routers[i].core.oldest_held_ms() {
            let (now, name) = (self.now_us(), self.routers[i].name.clone());
            self.checker.holding(now, &name, since, now_ms);
        }
    }

    pub fn crash_router(&mut self, i: usize) {
        let addr = self.routers[i].addr;
        if !self.set_up(addr, false) {
            return;
        }
        let pending: Vec<AppOp> =
            self.routers[i].requests.values().filter(|r| !r.answered).map(|r| r.op.clone()).collect();
        for op in pending {
            self.client_outcome(&op, ClientOutcome::Unknown);
        }
        // The disk keeps the last decision and the request counter (request ids are
        // idempotency keys at the data nodes: reusing one would return another request's answer).
        let fresh = RouterProc {
            persisted: self.routers[i].persisted,
            next_request: self.routers[i].next_request,
            ..RouterProc::new(self, i)
        };
        self.routers[i] = fresh;
        let name = self.routers[i].name.clone();
        self.record(format_args!("{name} crashed"));
    }

    pub fn restart_router(&mut self, i: usize) {
        let addr = self.routers[i].addr;
        if !self.set_up(addr, true) {
            return;
        }
        let persisted = self.routers[i].persisted;
        let now = self.now_ms();
        let outs = self.routers[i].agent.handle(now, AgentInput::Boot { persisted });
        let name = self.routers[i].name.clone();
        self.record(format_args!("{name} restarted with {persisted:?}"));
        self.router_agent_outputs(i, outs);
    }
}
