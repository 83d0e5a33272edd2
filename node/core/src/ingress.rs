//! The ingress composition core: an ingress router node's agent, router and validate duties
//! as one sans-I/O state machine.
//!
//! It takes every decision of an ingress node: which universe a client request goes to, what
//! is held and for how long, when a request is mirrored to the new universe (only while the
//! upgrade is `Syncing`), how a mirrored answer is paired with the old one and compared, what
//! the client is answered, what is persisted and when a decision is acted on. The shell moves
//! bytes: it forwards a request's payload where [`IngressOutput::Forward`] says, answers the
//! client what [`IngressOutput::Reply`] says, and hands every answer back as an input.
//!
//! Driving rules (quinn-proto's): `now_ms` never decreases (asserted); outputs are applied in
//! order; [`IngressOutput::Persist`] is durable before [`IngressInput::Persisted`] is fed back,
//! and nothing is acted on before; the shell calls [`IngressInput::Timer`] no later than
//! [`IngressCore::next_deadline_ms`].

use crate::agent::{AgentConfig, AgentCore, AgentInput, AgentOutput};
use crate::duties::router::{FailReason, HoldCause, RouterConfig, RouterCore, RouterInput, RouterOutput};
use crate::duties::validate::Fnv;
use crate::duties::validate::{Observed, ValidateCore, Verdict};
use crate::{Durable, NodeRecord, RequestKey, StoreAnswer};
use protocol::messages::{NodeReport, NodeRequest, NodeResponse, Phase, RouterRules};
use protocol::{Decision, Epoch, Generation, ReplicaId, UpgradeId};
use std::collections::BTreeMap;

/// A client request's id, given by the shell (unique within one incarnation).
pub type RequestId = u64;

/// Ingress settings.
#[derive(Clone, Debug)]
pub struct IngressConfig {
    pub agent: AgentConfig,
    pub router: RouterConfig,
    /// Answer fields ignored when comparing mirrored answers (e.g. timestamps).
    pub ignore_fields: Vec<String>,
    /// Most client requests tracked at once (forwarded, held or mirrored); more are refused.
    pub requests_max: usize,
    /// Where generation 1 (the universe that ran before Imago) answers: the cluster file's.
    /// Later generations' endpoints come from the plans, through the coordinator's views.
    pub genesis_endpoints: Vec<String>,
}

/// Inputs to the ingress core.
#[derive(Clone, Debug, PartialEq)]
pub enum IngressInput {
    /// The process (re)started; its disk holds this record.
    Boot { record: NodeRecord },
    /// A client request arrived: `read_only` if its kind is mirrored, `long` if on a route the
    /// plan names long (the shell tells both by [`IngressCore::rules`]).
    Request { id: RequestId, read_only: bool, long: bool },
    /// The answer to a forwarded request (`None`: no answer in time).
    Answered { id: RequestId, answer: Option<StoreAnswer> },
    /// The new universe's answer to a mirrored request (`None`: no answer in time).
    Mirrored { id: RequestId, answer: Option<StoreAnswer> },
    /// A coordinator replica answered request `id` of the agent.
    Coordinator { id: u64, response: NodeResponse },
    /// The record asked for by [`IngressOutput::Persist`] is durable.
    Persisted(NodeRecord),
    /// The deadline given by [`IngressCore::next_deadline_ms`] has come.
    Timer,
}

/// What a client is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientReply {
    /// The universe's answer.
    Answer(StoreAnswer),
    /// 503 with Retry-After: held too long, hold queue full, or too many requests.
    Unavailable { retry_after_ms: u64, reason: Unavailable },
    /// 504: the universe did not answer in time, or a data node kept it out without refusing it
    /// for good; the request may or may not have happened.
    Unknown,
}

/// Why a request was answered 503.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unavailable {
    Hold(FailReason),
    /// More than `requests_max` requests in progress.
    Overloaded,
    /// No endpoint is known for the generation the request is for (a plan without
    /// `[universe] endpoints`, or a cluster file without generation 1's): nothing was sent.
    NoEndpoint(Generation),
}

/// What the shell must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum IngressOutput {
    /// Send request `id` to `generation`'s universe, keyed by `key` (the data tier's
    /// idempotency key), and answer [`IngressInput::Answered`]. Only if `compared` (a mirror
    /// goes along) does the core compare the answer's body; otherwise it only hands the answer
    /// back in the [`IngressOutput::Reply`], so a shell that answers its clients from its own
    /// copy (HTTP) need not read the body as a row.
    Forward { id: RequestId, generation: Generation, key: RequestKey, endpoint: String, compared: bool },
    /// Send a copy of read-only request `id` to the upgrade's new universe, `generation`, and
    /// answer [`IngressInput::Mirrored`].
    Mirror { id: RequestId, generation: Generation, key: RequestKey, endpoint: String },
    /// Answer the client.
    Reply { id: RequestId, reply: ClientReply },
    /// Send a request to a coordinator replica; give up at `deadline_ms` (the core does too).
    Send { id: u64, replica: ReplicaId, request: NodeRequest, deadline_ms: u64 },
    /// Write the record to disk, then answer [`IngressInput::Persisted`].
    Persist(NodeRecord),
    /// Tell every data node that this router is frozen for `epoch` (nothing admitted to the old
    /// universe, nothing in flight there but requests it ended), as its `Frozen` ack tells the coordinator: a data
    /// node may then fence without waiting for the replicated state. Best effort, no answer: a
    /// lost notice only leaves the data node to learn it from the coordinator.
    NotifyFrozen { epoch: Epoch },
    /// For metrics and checkers only.
    Event(IngressEvent),
}

/// What happened, for metrics and checkers.
#[derive(Clone, Debug, PartialEq)]
pub enum IngressEvent {
    /// The node acted on a (persisted) decision.
    Acted(Decision),
    /// A held request was released (forwarded or failed) after `held_ms`.
    Released { id: RequestId, held_ms: u64, cause: HoldCause },
    /// A mirrored answer was compared with the old universe's.
    Compared { id: RequestId, verdict: Verdict, old: Observed, new: Observed },
    /// A new upgrade: the validator counts from zero for it.
    ValidationReset { upgrade: Option<UpgradeId> },
    /// A request in flight was ended at a freeze after `in_flight_ms` (its client told the
    /// outcome is unknown); its answer, when it comes, is dropped.
    Ended { id: RequestId, key: RequestKey, in_flight_ms: u64 },
}

#[derive(Clone, Debug)]
struct Tracked {
    answered: bool,
    mirror_pending: bool,
    /// The upgrade a mirror was sent for: its comparison counts for that upgrade only.
    mirrored_for: Option<UpgradeId>,
    old_seen: Option<Observed>,
    new_seen: Option<Observed>,
}

/// The Retry-After of a request refused because its universe has no endpoint known.
pub const NO_ENDPOINT_RETRY_MS: u64 = 5_000;

/// Request ids per boot must fit below this (the boot count takes the bits above).
pub const REQUESTS_PER_BOOT_MAX: u64 = 1 << 40;

/// The ingress composition core.
#[derive(Clone, Debug)]
pub struct IngressCore {
    config: IngressConfig,
    agent: AgentCore,
    router: RouterCore,
    validate: ValidateCore,
    requests: BTreeMap<RequestId, Tracked>,
    /// The node's record (as last persisted, or being persisted).
    durable: Durable,
    last_now_ms: u64,
    phase: Option<Phase>,
    /// The current upgrade (from the newest view); the validator counts for it alone.
    upgrade: Option<UpgradeId>,
    /// The generation the current upgrade upgrades from (from the newest view).
    upgrade_from: Option<Generation>,
    /// What the router serves, from the last decision handed to it.
    serving: Option<Generation>,
    /// Whether the router is told to mirror.
    mirroring: bool,
    /// This node's part of every request key (a hash of its name and its disk's id).
    origin: u64,
    /// Where each generation answers (the cluster file's generation 1, the views', the disk's).
    endpoints: BTreeMap<Generation, Vec<String>>,
    /// The current (or last) plan's rules for routers, from the newest view that had them.
    rules: Option<RouterRules>,
    /// How many times `rules` changed.
    rules_changes: u64,
}

impl IngressCore {
    pub fn new(config: IngressConfig) -> Self {
        assert!(config.requests_max > 0, "requests_max must be positive");
        IngressCore {
            agent: AgentCore::new(config.agent.clone()),
            router: RouterCore::new(config.router.clone()),
            validate: ValidateCore { ignore_fields: config.ignore_fields.clone(), ..Default::default() },
            requests: BTreeMap::new(),
            durable: Durable::default(),
            last_now_ms: 0,
            phase: None,
            upgrade: None,
            upgrade_from: None,
            serving: None,
            mirroring: false,
            origin: 0,
            endpoints: [(Generation::GENESIS, config.genesis_endpoints.clone())]
                .into_iter()
                .filter(|(_, e)| !e.is_empty())
                .collect(),
            rules: None,
            rules_changes: 0,
            config,
        }
    }

    /// The same core with a planted agent bug (simulator only).
    #[cfg(feature = "planted-bugs")]
    pub fn with_agent_bug(mut self, bug: Option<crate::agent::AgentBug>) -> Self {
        self.agent = self.agent.with_bug(bug);
        self
    }

    /// The same core with a planted router bug (simulator only).
    #[cfg(feature = "planted-bugs")]
    pub fn with_bug(mut self, bug: Option<crate::duties::router::RouterBug>) -> Self {
        self.router = self.router.with_bug(bug);
        self
    }

    pub fn router(&self) -> &RouterCore {
        &self.router
    }

    pub fn validate(&self) -> &ValidateCore {
        &self.validate
    }

    /// Requests in progress (forwarded, held, or waiting for a mirror).
    pub fn requests(&self) -> usize {
        self.requests.len()
    }

    /// When the shell must feed [`IngressInput::Timer`] next, if ever.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        [self.agent.next_deadline_ms(), self.router.next_deadline_ms()].into_iter().flatten().min()
    }

    pub fn handle(&mut self, now_ms: u64, input: IngressInput) -> Vec<IngressOutput> {
        assert!(now_ms >= self.last_now_ms, "time went backwards: {now_ms} < {}", self.last_now_ms);
        self.last_now_ms = now_ms;
        let mut out = Vec::new();
        match input {
            IngressInput::Boot { record } => {
                // A node that lost its disk counts boots from zero again: its disk's id keeps
                // its request keys apart from those of its earlier disk.
                let mut h = Fnv::default();
                h.bytes(self.config.agent.node.0.as_bytes());
                h.bytes(&record.disk_id.to_le_bytes());
                self.origin = h.0;
                // The boot count is persisted before any request id of this boot is used.
                let booted = self.durable.boot(record, NodeRecord::owner_of(&self.config.agent.node.0));
                let frozen = matches!(booted.decision, Decision::Freeze(_));
                if self.durable.trusted() && !booted.endpoints.is_empty() {
                    if let Some(g) = booted.decision.serving_generation(booted.generation) {
                        self.endpoints.insert(g, booted.endpoints.clone());
                    }
                }
                out.push(IngressOutput::Persist(booted));
                if self.durable.trusted() {
                    let outs = self.router.handle(now_ms, RouterInput::OwnDisk { frozen });
                    self.router_outputs(now_ms, outs, &mut out);
                }
            }
            IngressInput::Request { id, read_only, long } => self.request(now_ms, id, read_only, long, &mut out),
            IngressInput::Answered { id, answer } => self.answered(now_ms, id, answer, &mut out),
            IngressInput::Mirrored { id, answer } => {
                let tracked = self.requests.get_mut(&id).expect("a mirror answer for a tracked request");
                assert!(tracked.mirror_pending, "request {id} answered a mirror it was not sent");
                tracked.mirror_pending = false;
                if let Some(StoreAnswer::Ok { body, position }) = answer {
                    tracked.new_seen = Some(Observed { body, position });
                }
                self.compare(now_ms, id, &mut out);
                self.maybe_forget(id);
            }
            IngressInput::Coordinator { id, response } => {
                if let NodeResponse::View(view) = &response {
                    // Learnt before the agent may persist a decision serving one of them.
                    for (g, endpoints) in &view.universes {
                        if !endpoints.is_empty() {
                            self.endpoints.insert(*g, endpoints.clone());
                        }
                    }
                }
                let outs = self.agent.handle(now_ms, AgentInput::Response { id, response });
                self.agent_outputs(now_ms, outs, &mut out);
            }
            IngressInput::Persisted(record) => {
                let input = self.durable.persisted(record);
                let outs = self.agent.handle(now_ms, input);
                self.agent_outputs(now_ms, outs, &mut out);
            }
            IngressInput::Timer => {
                let outs = self.agent.handle(now_ms, AgentInput::Timer);
                self.agent_outputs(now_ms, outs, &mut out);
                let outs = self.router.handle(now_ms, RouterInput::Tick);
                self.router_outputs(now_ms, outs, &mut out);
            }
        }
        out
    }

    /// The endpoint of `generation` request `id` goes to (spread over them by id).
    fn endpoint(&self, generation: Generation, id: RequestId) -> Option<String> {
        let endpoints = self.endpoints.get(&generation).filter(|e| !e.is_empty())?;
        Some(endpoints[(id % endpoints.len() as u64) as usize].clone())
    }

    /// The current (or last) plan's rules for routers, once a view brought them: the shell
    /// tells by them which requests are mirrored and which are long.
    pub fn rules(&self) -> Option<&RouterRules> {
        self.rules.as_ref()
    }

    /// How many times the rules changed (a shell that keeps a copy compares this, not them).
    pub fn rules_changes(&self) -> u64 {
        self.rules_changes
    }

    /// The current (or last) upgrade, from the newest view (the validator counts for it).
    pub fn upgrade(&self) -> Option<UpgradeId> {
        self.upgrade
    }

    /// Answer fields the validator leaves out: the node's own, and the plan's.
    fn ignored(&self) -> Vec<String> {
        let plan = self.rules.iter().flat_map(|r| r.validation.ignore.iter());
        let mut all: Vec<String> = self.config.ignore_fields.iter().chain(plan).cloned().collect();
        all.sort();
        all.dedup();
        all
    }

    /// Where `generation` answers, if known.
    pub fn endpoints(&self, generation: Generation) -> Option<&[String]> {
        self.endpoints.get(&generation).map(Vec::as_slice)
    }

    fn key(&self, id: RequestId) -> RequestKey {
        assert!(id < REQUESTS_PER_BOOT_MAX, "request id {id} beyond the per-boot limit");
        RequestKey { origin: self.origin, id: (self.durable.boots() << 40) | id }
    }

    fn request(&mut self, now_ms: u64, id: RequestId, read_only: bool, long: bool, out: &mut Vec<IngressOutput>) {
        assert!(!self.requests.contains_key(&id), "request id {id} reused");
        if self.requests.len() >= self.config.requests_max {
            let reply = ClientReply::Unavailable {
                retry_after_ms: self.config.router.retry_after_ms,
                reason: Unavailable::Overloaded,
            };
            out.push(IngressOutput::Reply { id, reply });
            return;
        }
        self.requests.insert(
            id,
            Tracked { answered: false, mirror_pending: false, mirrored_for: None, old_seen: None, new_seen: None },
        );
        let outs = self.router.handle(now_ms, RouterInput::Request { id, read_only, long });
        self.router_outputs(now_ms, outs, out);
    }

    fn answered(&mut self, now_ms: u64, id: RequestId, answer: Option<StoreAnswer>, out: &mut Vec<IngressOutput>) {
        // Ended at a freeze: its client was told the outcome is unknown then (the router keeps
        // which, until this late answer).
        let ended = self.router.is_ended(id);
        let outs = self.router.handle(now_ms, RouterInput::Completed { id });
        self.router_outputs(now_ms, outs, out);
        if ended {
            return;
        }
        let tracked = self.requests.get_mut(&id).expect("an answer for a tracked request");
        assert!(!tracked.answered, "request {id} answered twice");
        let reply = match answer {
            // No answer in time, or kept out for now by a node that may yet run a copy of it.
            None | Some(StoreAnswer::NotAdmitted { .. }) => ClientReply::Unknown,
            Some(answer) => {
                if let StoreAnswer::Ok { body, position } = &answer {
                    if tracked.mirror_pending || tracked.new_seen.is_some() {
                        tracked.old_seen = Some(Observed { body: body.clone(), position: *position });
                    }
                }
                ClientReply::Answer(answer)
            }
        };
        self.finish(now_ms, id, reply, out);
    }

    fn finish(&mut self, now_ms: u64, id: RequestId, reply: ClientReply, out: &mut Vec<IngressOutput>) {
        let tracked = self.requests.get_mut(&id).expect("finishing a tracked request");
        assert!(!tracked.answered, "request {id} answered twice");
        tracked.answered = true;
        out.push(IngressOutput::Reply { id, reply });
        self.compare(now_ms, id, out);
        self.maybe_forget(id);
    }

    /// Compares a mirrored request once both answers are in, and reports the counts.
    fn compare(&mut self, now_ms: u64, id: RequestId, out: &mut Vec<IngressOutput>) {
        let Some(tracked) = self.requests.get_mut(&id) else { return };
        if tracked.old_seen.is_none() || tracked.new_seen.is_none() {
            return;
        }
        let (Some(old), Some(new)) = (tracked.old_seen.take(), tracked.new_seen.take()) else { unreachable!() };
        if tracked.mirrored_for != self.upgrade {
            // Mirrored for an upgrade that has ended: it says nothing of this one.
            return;
        }
        let verdict = self.validate.compare(&old, &new);
        out.push(IngressOutput::Event(IngressEvent::Compared { id, verdict, old, new }));
        let v = &self.validate;
        let report = NodeReport { samples: v.samples, mismatches: v.mismatches, ..Default::default() };
        let outs = self.agent.handle(now_ms, AgentInput::Report(report));
        self.agent_outputs(now_ms, outs, out);
    }

    fn maybe_forget(&mut self, id: RequestId) {
        if self.requests.get(&id).is_some_and(|r| r.answered && !r.mirror_pending) {
            self.requests.remove(&id);
        }
    }

    fn router_outputs(&mut self, now_ms: u64, outs: Vec<RouterOutput>, out: &mut Vec<IngressOutput>) {
        let mut outs = outs.into_iter().peekable();
        while let Some(o) = outs.next() {
            match o {
                RouterOutput::Forward { id, generation } => match self.endpoint(generation, id) {
                    Some(endpoint) => {
                        // The router asks for a request's mirror right after its forward.
                        let compared = matches!(outs.peek(), Some(RouterOutput::Mirror { id: m }) if *m == id)
                            && self.upgrade_from.is_some_and(|g| self.endpoint(g.next(), id).is_some());
                        let key = self.key(id);
                        out.push(IngressOutput::Forward { id, generation, key, endpoint, compared })
                    }
                    None => {
                        // Nothing was sent: the client is told so (not "unknown").
                        let outs = self.router.handle(now_ms, RouterInput::Completed { id });
                        self.router_outputs(now_ms, outs, out);
                        let reply = ClientReply::Unavailable {
                            retry_after_ms: NO_ENDPOINT_RETRY_MS,
                            reason: Unavailable::NoEndpoint(generation),
                        };
                        self.finish(now_ms, id, reply, out);
                    }
                },
                RouterOutput::Mirror { id } => {
                    // Mirror only while the upgrade is syncing from what this router serves: the
                    // router is told so (see `set_mirroring`).
                    let generation = self.upgrade_from.expect("mirroring only during an upgrade").next();
                    // A new universe with no endpoint known is not validated through this router.
                    let Some(endpoint) = self.endpoint(generation, id) else { continue };
                    // Its forward found no endpoint: the request is already answered (503).
                    let Some(tracked) = self.requests.get_mut(&id) else { continue };
                    tracked.mirror_pending = true;
                    tracked.mirrored_for = self.upgrade;
                    out.push(IngressOutput::Mirror { id, generation, key: self.key(id), endpoint });
                }
                RouterOutput::Fail { id, retry_after_ms, reason } => {
                    let reply = ClientReply::Unavailable { retry_after_ms, reason: Unavailable::Hold(reason) };
                    self.finish(now_ms, id, reply, out);
                }
                RouterOutput::Ack { epoch, ack } => {
                    if ack == protocol::messages::Ack::Frozen {
                        out.push(IngressOutput::NotifyFrozen { epoch });
                    }
                    let outs = self.agent.handle(now_ms, AgentInput::OweAck { epoch, ack });
                    self.agent_outputs(now_ms, outs, out);
                }
                RouterOutput::Released { id, held_ms, cause } => {
                    out.push(IngressOutput::Event(IngressEvent::Released { id, held_ms, cause }));
                }
                RouterOutput::Ended { id, in_flight_ms } => {
                    let key = self.key(id);
                    out.push(IngressOutput::Event(IngressEvent::Ended { id, key, in_flight_ms }));
                    self.finish(now_ms, id, ClientReply::Unknown, out);
                }
            }
        }
    }

    fn agent_outputs(&mut self, now_ms: u64, outs: Vec<AgentOutput>, out: &mut Vec<IngressOutput>) {
        for o in outs {
            match o {
                AgentOutput::Send { id, replica, request } => {
                    let deadline_ms = self.agent.request_deadline_ms(id).expect("a request just sent is in flight");
                    out.push(IngressOutput::Send { id, replica, request, deadline_ms });
                }
                AgentOutput::Persist(decision) => {
                    let base = self.agent.persisting_base();
                    let endpoints = decision
                        .serving_generation(base)
                        .and_then(|g| self.endpoints.get(&g).cloned())
                        .unwrap_or_default();
                    let record = self.durable.decide(decision, base, endpoints);
                    out.push(IngressOutput::Persist(record));
                }
                AgentOutput::Act(decision) => {
                    out.push(IngressOutput::Event(IngressEvent::Acted(decision)));
                    // Acted on once persisted: the agent's persisted decision's upgrade is this
                    // decision's.
                    let base = self.agent.persisted_base();
                    self.serving = decision.serving_generation(base);
                    let outs = self.router.handle(now_ms, RouterInput::Decision { decision, base });
                    self.router_outputs(now_ms, outs, out);
                    self.set_mirroring(now_ms, out);
                }
                // A recovering group's view says nothing to act on: the node tells it its disk.
                AgentOutput::View(view) if view.recovering => {
                    if !view.disk_recorded {
                        // A frozen record names no endpoints: those of the generation it froze.
                        let mut summary = self.durable.summary();
                        if let Some(s) = summary.as_mut().filter(|s| s.endpoints.is_empty()) {
                            let g = s.decision.serving_generation(s.generation).unwrap_or(s.generation);
                            s.endpoints = self.endpoints.get(&g).cloned().unwrap_or_default();
                        }
                        let outs = self.agent.handle(now_ms, AgentInput::Recover(summary));
                        self.agent_outputs(now_ms, outs, out);
                    }
                }
                AgentOutput::View(view) => {
                    // The plan's rules, for the requests to come, from a view the agent took (a
                    // lagging replica's is not); a plan's limits are validated positive.
                    if let Some(r) = view.rules.as_ref().filter(|r| self.rules.as_ref() != Some(*r)) {
                        if r.hold_ms_max > 0 && r.hold_queue_max > 0 && r.inflight_ms_max > 0 {
                            self.router.set_limits(r.hold_ms_max, r.hold_queue_max as usize, r.inflight_ms_max);
                        }
                        self.rules = Some(r.clone());
                        self.rules_changes += 1;
                        self.validate.ignore_fields = self.ignored();
                    }
                    if view.upgrade != self.upgrade && self.upgrade.is_none() {
                        // The first view: nothing was compared yet.
                        self.upgrade = view.upgrade;
                    } else if view.upgrade != self.upgrade {
                        // A new upgrade: its validation starts from nothing (the last one's
                        // samples and mismatches are not its own).
                        self.upgrade = view.upgrade;
                        self.validate = ValidateCore { ignore_fields: self.ignored(), ..Default::default() };
                        out.push(IngressOutput::Event(IngressEvent::ValidationReset { upgrade: view.upgrade }));
                        // The report waiting to be sent is the last upgrade's: replaced by this
                        // one's (nothing compared yet).
                        let outs = self.agent.handle(now_ms, AgentInput::Report(NodeReport::default()));
                        self.agent_outputs(now_ms, outs, out);
                    }
                    self.phase = view.phase;
                    self.upgrade_from = view.upgrade_from;
                    self.set_mirroring(now_ms, out);
                }
            }
        }
    }

    /// Read-only requests are mirrored while the upgrade syncs and this router serves the
    /// generation it upgrades from (after an earlier upgrade, that is the earlier one's new).
    fn set_mirroring(&mut self, now_ms: u64, out: &mut Vec<IngressOutput>) {
        let mirroring =
            self.phase == Some(Phase::Syncing) && self.upgrade_from.is_some() && self.serving == self.upgrade_from;
        if mirroring != self.mirroring {
            self.mirroring = mirroring;
            let outs = self.router.handle(now_ms, RouterInput::Mirroring(mirroring));
            self.router_outputs(now_ms, outs, out);
        }
    }
}
