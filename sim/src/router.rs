//! A router process in the simulator: simulated I/O around the ingress core. Every decision is
//! the core's; here client requests arrive, payloads travel, answers come back, and the disk
//! is a field that survives crashes.

use crate::app::AppOp;
use crate::checker::AdmissionPoint;
use crate::oracle::ClientOutcome;
use crate::wire::{DataRequest, DataResponse};
use crate::world::{Done, World, DATA_BASE, ROUTER_BASE};
use node_core::duties::router::{HoldCause, RouterConfig};
use node_core::duties::validate::Verdict;
use node_core::ingress::{ClientReply, IngressConfig, IngressCore, IngressEvent, IngressInput, IngressOutput};
use node_core::{NodeRecord, RequestKey, StoreAnswer};
use protocol::codec;
use protocol::{Duty, Universe};
use std::collections::{BTreeMap, VecDeque};

/// Most requests one router tracks at once.
const REQUESTS_MAX: usize = 10_000;

/// A router process. `disk` survives a crash; the rest is lost.
pub struct RouterProc {
    pub addr: u64,
    pub name: String,
    pub disk: NodeRecord,
    pub core: IngressCore,
    /// The shell's only state: the payload of each request in progress, by id.
    pub requests: BTreeMap<u64, AppOp>,
    pub next_request: u64,
    /// The deadline a timer task is armed for.
    pub armed_ms: Option<u64>,
}

impl RouterProc {
    pub fn new(world: &World, index: usize) -> RouterProc {
        let name = format!("router-{index}");
        let t = &world.plan.thresholds;
        let config = IngressConfig {
            agent: world.agent_config(&name, vec![Duty::Route, Duty::Validate]),
            router: RouterConfig {
                hold_ms_max: t.hold_ms_max,
                hold_queue_max: t.hold_queue_max as usize,
                retry_after_ms: 1_000,
            },
            ignore_fields: Vec::new(),
            requests_max: REQUESTS_MAX,
        };
        RouterProc {
            addr: ROUTER_BASE + index as u64,
            name,
            disk: NodeRecord::default(),
            core: IngressCore::new(config).with_bug(crate::config::Bug::router(world.config.bug)),
            requests: BTreeMap::new(),
            next_request: 1,
            armed_ms: None,
        }
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
        router.requests.insert(id, op);
        self.ingress(i, IngressInput::Request { id, read_only });
    }

    /// Feeds one input to router `i`'s core and performs its outputs in order, feeding back
    /// what they answer (a persist) until the core is quiet; then re-arms its timer.
    pub fn ingress(&mut self, i: usize, input: IngressInput) {
        let now = self.now_ms();
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            for out in self.routers[i].core.handle(now, input) {
                inputs.extend(self.ingress_output(i, out));
            }
        }
        let (addr, deadline) = (self.routers[i].addr, self.routers[i].core.next_deadline_ms());
        if let Some(at) = self.arm(addr, self.routers[i].armed_ms, deadline) {
            self.routers[i].armed_ms = Some(at);
        }
    }

    /// Router `i`'s timer fired for `at`.
    pub fn ingress_timer(&mut self, i: usize, at: u64) {
        if self.routers[i].armed_ms != Some(at) {
            return; // superseded by an earlier deadline
        }
        self.routers[i].armed_ms = None;
        self.ingress(i, IngressInput::Timer);
        let name = self.routers[i].name.clone();
        self.check_progress(&name, self.routers[i].core.next_deadline_ms());
    }

    fn ingress_output(&mut self, i: usize, out: IngressOutput) -> Option<IngressInput> {
        match out {
            IngressOutput::Forward { id, universe, key } => self.forward(i, id, key, universe, false),
            IngressOutput::Mirror { id, key } => self.forward(i, id, key, Universe::New, true),
            IngressOutput::Reply { id, reply } => {
                let op = self.routers[i].requests.remove(&id).expect("a reply for a request in progress");
                let outcome = match reply {
                    ClientReply::Answer(StoreAnswer::Ok { .. }) => ClientOutcome::Acked,
                    ClientReply::Answer(StoreAnswer::Rejected { .. }) => ClientOutcome::Failed,
                    ClientReply::Unavailable { reason, .. } => {
                        let name = self.routers[i].name.clone();
                        self.record(format_args!("{name} fails {id}: {reason:?}"));
                        ClientOutcome::Failed
                    }
                    ClientReply::Unknown => ClientOutcome::Unknown,
                };
                self.client_outcome(&op, outcome);
            }
            IngressOutput::Send { id, replica, request, deadline_ms } => {
                let addr = self.routers[i].addr;
                self.send_agent_request(addr, id, replica, request, deadline_ms);
            }
            IngressOutput::Persist(record) => {
                self.routers[i].disk = record;
                let name = self.routers[i].name.clone();
                self.note_persisted(&name, record.decision);
                return Some(IngressInput::Persisted(record));
            }
            IngressOutput::Event(IngressEvent::Acted(decision)) => {
                let name = self.routers[i].name.clone();
                self.note_acted(&name, decision);
            }
            IngressOutput::Event(IngressEvent::Released { id, held_ms, cause }) => {
                let now = self.now_us();
                let name = self.routers[i].name.clone();
                self.record(format_args!("{name} released {id} after {held_ms} ms"));
                self.checker.released(now, &name, held_ms);
                match cause {
                    HoldCause::Freeze => self.stats.hold_ms.push(held_ms),
                    HoldCause::Startup => self.stats.startup_hold_ms.push(held_ms),
                }
            }
            IngressOutput::Event(IngressEvent::Compared { id, verdict, old, new }) => {
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
            }
        }
        None
    }

    fn forward(&mut self, i: usize, id: u64, key: RequestKey, universe: Universe, mirror: bool) {
        let op = self.routers[i].requests.get(&id).expect("forwarding a request in progress").clone();
        let (addr, name) = (self.routers[i].addr, self.routers[i].name.clone());
        if !mirror {
            let now = self.now_us();
            self.checker.admitted(now, AdmissionPoint::Router, &name, universe, id);
        }
        self.record(format_args!("{name} forwards {id} to {universe:?} mirror={mirror}"));
        let shard = op.key().rem_euclid(self.config.data_nodes as i64) as u64;
        let wire = DataRequest { key, universe, mirror, op };
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
        let answer = answer.and_then(|b| codec::decode_frame::<DataResponse>(&b).ok().flatten().map(|(r, _)| r));
        self.ingress(i, IngressInput::Answered { id, universe, answer });
    }

    pub fn mirror_done(&mut self, i: usize, id: u64, answer: Option<Vec<u8>>) {
        let answer = answer.and_then(|b| codec::decode_frame::<DataResponse>(&b).ok().flatten().map(|(r, _)| r));
        self.ingress(i, IngressInput::Mirrored { id, answer });
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

    pub fn crash_router(&mut self, i: usize) {
        let addr = self.routers[i].addr;
        if !self.set_up(addr, false) {
            return;
        }
        let pending: Vec<AppOp> = std::mem::take(&mut self.routers[i].requests).into_values().collect();
        for op in pending {
            self.client_outcome(&op, ClientOutcome::Unknown);
        }
        // Only the disk survives.
        let fresh = RouterProc { disk: self.routers[i].disk, ..RouterProc::new(self, i) };
        self.routers[i] = fresh;
        let name = self.routers[i].name.clone();
        self.record(format_args!("{name} crashed"));
    }

    pub fn restart_router(&mut self, i: usize) {
        let addr = self.routers[i].addr;
        if !self.set_up(addr, true) {
            return;
        }
        let record = self.routers[i].disk;
        let name = self.routers[i].name.clone();
        self.record(format_args!("{name} restarted with {:?}", record.decision));
        self.ingress(i, IngressInput::Boot { record });
    }
}
