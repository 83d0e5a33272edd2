//! The agent core: a node's side of the coordinator protocol.
//!
//! It registers the node, sends acks until the coordinator's state shows them, sends the latest
//! report, and keeps one long-poll watch open. It hands the node a decision only once it is
//! durable: it outputs `Persist(d)`, and outputs `Act(d)` only when the shell answers
//! `Persisted(d)` (so a failed fsync can never be skipped). It never hands over a decision
//! ordered before the persisted one (epochs never go backwards). After a (re)start it hands over
//! the decision on the node's own, confirmed disk at once unless that is a freeze; otherwise
//! nothing until a linearizable read has answered (and, on a disk not yet confirmed, until what
//! it read is written back). A router acts on nothing while its view says it is not on the
//! roster; one being retired persists `Retired` (ordered after every decision) and, once its
//! router core has nothing in flight to the old universe, sends only its `Retired` ack.
//!
//! Driving rules: `now_ms` never decreases; outputs are applied in order; the shell calls
//! [`AgentInput::Timer`] no later than [`AgentCore::next_deadline_ms`].

use protocol::messages::{Ack, DecisionView, DiskSummary, NodeReport, NodeRequest, NodeResponse, RosterStatus};
use protocol::{Decision, Duty, Epoch, Generation, NodeName, ReplicaId, UpgradeId};
use std::collections::BTreeMap;

/// Deliberately broken variants, to prove the simulator's checkers catch them.
#[cfg(feature = "planted-bugs")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentBug {
    /// Hand a newer decision to the duties as soon as it is seen, before it is persisted.
    ActBeforePersist,
    /// After a restart on its own disk holding a freeze, serve the old universe (act on
    /// `Initial`) until a read says otherwise.
    ServeOldAfterFrozenRestart,
    /// When a new upgrade starts, forget what was persisted: act on `Initial` of the first
    /// generation, as if the cluster had never switched, until the next news.
    ResetPersistedOnNewUpgrade,
}

/// Agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node: NodeName,
    pub duties: Vec<Duty>,
    pub replicas: Vec<ReplicaId>,
    /// Give up on a request (and try another replica) after this long.
    pub request_timeout_ms: u64,
    /// How long a watch may be parked at the replica.
    pub watch_wait_ms: u32,
    /// Least time between two reports.
    pub report_interval_ms: u64,
    /// Try another replica after this many watch answers in a row without news while a
    /// decision is awaited (the replica may be a partitioned follower).
    pub stale_watch_limit: u32,
    /// A data node is deployed for one upgrade: the generation it upgrades from (its stores
    /// hold that one and the next). It registers only for an upgrade from that generation.
    /// `None` (a router): every upgrade.
    pub upgrade_from: Option<Generation>,
}

/// Inputs to the agent core.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentInput {
    /// The process (re)started with this persisted decision, of an upgrade from generation
    /// `base`; `trusted`: the node's own disk, confirmed by an earlier read (not a new,
    /// replaced, unconfirmed or copied one).
    Boot { persisted: Decision, base: Generation, trusted: bool },
    /// A reply to request `id`.
    Response { id: u64, response: NodeResponse },
    /// The deadline given by [`AgentCore::next_deadline_ms`] has come.
    Timer,
    /// The decision asked for by [`AgentOutput::Persist`] is durable.
    Persisted(Decision),
    /// A duty owes the coordinator this ack.
    OweAck { epoch: Epoch, ack: Ack },
    /// The latest measurements of the node's duties.
    Report(NodeReport),
    /// What the node's disk holds (`None`: nothing it can vouch for), for a recovering group
    /// whose view does not yet show it recorded: the composition answers such a view with it.
    Recover(Option<DiskSummary>),
}

/// What the shell must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentOutput {
    Send {
        id: u64,
        replica: ReplicaId,
        request: NodeRequest,
    },
    /// Write the decision to durable storage, then answer [`AgentInput::Persisted`].
    Persist(Decision),
    /// Hand the (persisted) decision to the duties.
    Act(Decision),
    /// The latest view (duties read phase and `all_routers_frozen` from it).
    View(DecisionView),
}

#[derive(Clone, Debug)]
enum Pending {
    Watch,
    Write(WriteKind),
}

#[derive(Clone, Debug, PartialEq)]
enum WriteKind {
    Register,
    Recover,
    Ack(Epoch, Ack),
    Report,
}

#[derive(Clone, Debug)]
struct InFlight {
    id: u64,
    deadline_ms: u64,
    what: Pending,
    linearizable: bool,
    /// The replica it was sent to (an index into the configured replicas).
    replica: usize,
}

/// The agent core.
#[derive(Clone, Debug)]
pub struct AgentCore {
    config: AgentConfig,
    persisted: Decision,
    /// The generation the upgrade of `persisted` upgrades from; `persisting` and `wanted` carry
    /// theirs. (A decision names one epoch, so one upgrade: the pair is never ambiguous.)
    persisted_base: Generation,
    persisting_base: Generation,
    wanted_base: Generation,
    /// Being persisted (asked for, not yet durable).
    persisting: Option<Decision>,
    /// The newest decision seen while another was being persisted.
    wanted: Option<Decision>,
    booted: bool,
    /// Acted on the persisted decision at boot (a trusted disk), before any read.
    acted_at_boot: bool,
    /// The disk booted from is the node's own and confirmed by an earlier read.
    trusted: bool,
    linearized: bool,
    target: usize,
    next_id: u64,
    known_version: u64,
    /// The disk to tell a recovering group, until a view shows it recorded.
    recover: Option<Option<DiskSummary>>,
    /// The highest upgrade id a view named (a recovering group's next ones go above it).
    known_upgrade: u64,
    registered: bool,
    owed: BTreeMap<(Epoch, u8), Ack>,
    report: Option<NodeReport>,
    report_sent: Option<NodeReport>,
    last_report_ms: Option<u64>,
    watch: Option<InFlight>,
    /// A registration or an ack in flight.
    write: Option<InFlight>,
    /// A report in flight: a slot of its own, so that an ack never waits behind a report (in a
    /// wide-area cluster a report's proposal takes a few round trips, and a router's `Frozen`
    /// queued behind one delays the whole switch).
    reporting: Option<InFlight>,
    stale_watches: u32,
    /// Of those, answers older than a view already taken (only a lagging replica or a replay
    /// gives one).
    older_views: u32,
    last_view: Option<DecisionView>,
    /// A router whose last view says it is not on the roster: it acts on nothing until it is.
    off_roster: bool,
    #[cfg(feature = "planted-bugs")]
    bug: Option<AgentBug>,
}

/// Whether `ack` of epoch `e` is still owed while the node's decision is `decision`: `Frozen` and
/// `Drained` while it is that freeze, `Switched` while it is that commit.
fn owed_under(decision: Decision, e: Epoch, ack: &Ack) -> bool {
    match ack {
        Ack::Frozen | Ack::Drained { .. } => decision == Decision::Freeze(e),
        Ack::Switched => decision == Decision::Commit(e),
        Ack::Retired => decision == Decision::Retired,
    }
}

fn ack_rank(ack: &Ack) -> u8 {
    match ack {
        Ack::Frozen => 0,
        Ack::Drained { .. } => 1,
        Ack::Switched => 2,
        Ack::Retired => 3,
    }
}

impl AgentCore {
    pub fn new(config: AgentConfig) -> Self {
        assert!(!config.replicas.is_empty(), "an agent needs at least one coordinator replica");
        AgentCore {
            config,
            persisted: Decision::Initial,
            persisted_base: Generation::GENESIS,
            persisting_base: Generation::GENESIS,
            wanted_base: Generation::GENESIS,
            persisting: None,
            wanted: None,
            booted: false,
            acted_at_boot: false,
            trusted: false,
            linearized: false,
            target: 0,
            next_id: 1,
            known_version: 0,
            recover: None,
            known_upgrade: 0,
            registered: false,
            owed: BTreeMap::new(),
            report: None,
            report_sent: None,
            last_report_ms: None,
            watch: None,
            write: None,
            reporting: None,
            stale_watches: 0,
            older_views: 0,
            last_view: None,
            off_roster: false,
            #[cfg(feature = "planted-bugs")]
            bug: None,
        }
    }

    /// The same core with a planted bug (simulator only).
    #[cfg(feature = "planted-bugs")]
    pub fn with_bug(mut self, bug: Option<AgentBug>) -> Self {
        self.bug = bug;
        self
    }

    #[cfg(feature = "planted-bugs")]
    fn planted_serve_old(&self) -> bool {
        self.bug == Some(AgentBug::ServeOldAfterFrozenRestart)
    }

    /// The decision last persisted (and acted on).
    pub fn persisted(&self) -> Decision {
        self.persisted
    }

    /// The generation the upgrade of the persisted decision upgrades from (what a decision
    /// acted on serves is `decision.serving_generation(base)`).
    pub fn persisted_base(&self) -> Generation {
        self.persisted_base
    }

    /// The decision being written to disk, if one is ([`AgentOutput::Persist`]).
    pub fn persisting(&self) -> Option<Decision> {
        self.persisting
    }

    /// The same for the decision being persisted (what [`AgentOutput::Persist`] writes).
    pub fn persisting_base(&self) -> Generation {
        self.persisting_base
    }

    /// The replica the agent talks to now.
    pub fn target(&self) -> ReplicaId {
        self.config.replicas[self.target]
    }

    pub fn last_view(&self) -> Option<&DecisionView> {
        self.last_view.as_ref()
    }

    pub fn handle(&mut self, now_ms: u64, input: AgentInput) -> Vec<AgentOutput> {
        let mut out = Vec::new();
        match input {
            AgentInput::Boot { persisted, base, trusted } => {
                self.persisted = persisted;
                self.persisted_base = base;
                self.booted = true;
                self.trusted = trusted;
                // Serve from the node's own disk at once, without the coordinator: the decision
                // on it is still in force unless a newer one was committed, and no newer one
                // can be without this node (a commit needs every router's `Frozen`, and a node
                // persists a freeze before it acts on it). A freeze on disk is not acted on: its
                // outcome may be decided by now, so the node fails closed (a router holds, a
                // data node keeps its old store fenced) until a read tells it.
                #[cfg(feature = "planted-bugs")]
                if trusted && matches!(persisted, Decision::Freeze(_)) && self.planted_serve_old() {
                    out.push(AgentOutput::Act(Decision::Initial));
                }
                if trusted && !matches!(persisted, Decision::Freeze(_)) {
                    self.acted_at_boot = true;
                    out.push(AgentOutput::Act(persisted));
                }
            }
            AgentInput::Response { id, response } => self.on_response(id, response, &mut out),
            AgentInput::Timer => self.expire(now_ms),
            AgentInput::Persisted(decision) => self.on_persisted(decision, &mut out),
            AgentInput::OweAck { epoch, ack } => {
                self.owed.insert((epoch, ack_rank(&ack)), ack);
            }
            AgentInput::Report(report) => self.report = Some(report),
            AgentInput::Recover(disk) => self.recover = Some(disk),
        }
        if self.booted {
            self.send_next(now_ms, &mut out);
        }
        out
    }

    /// When the shell must call [`AgentInput::Timer`] next (a request's deadline or the next
    /// report), if ever.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if !self.booted {
            return None;
        }
        let report_due =
            self.may_report().then(|| self.last_report_ms.map_or(0, |t| t + self.config.report_interval_ms));
        [&self.watch, &self.write, &self.reporting]
            .into_iter()
            .map(|slot| slot.as_ref().map(|w| w.deadline_ms))
            .chain([report_due])
            .flatten()
            .min()
    }

    /// Whether a report would go out once due: registered for the upgrade the last view names
    /// (a recovering group's names none), with news, no report in flight. A retired router
    /// reports nothing (it sends only its `Retired` ack). The deadline and the sending agree
    /// on this.
    fn may_report(&self) -> bool {
        let upgrade_named = self.last_view.as_ref().is_some_and(|v| v.upgrade.is_some());
        self.reporting.is_none()
            && self.registered
            && upgrade_named
            && self.persisted != Decision::Retired
            && self.report.is_some()
            && self.report != self.report_sent
    }

    /// The deadline of request `id`, while it is in flight.
    pub fn request_deadline_ms(&self, id: u64) -> Option<u64> {
        [&self.watch, &self.write, &self.reporting].into_iter().flatten().find(|f| f.id == id).map(|f| f.deadline_ms)
    }

    fn on_persisted(&mut self, decision: Decision, out: &mut Vec<AgentOutput>) {
        assert_eq!(self.persisting, Some(decision), "persisted a decision that was not asked for");
        self.persisting = None;
        self.persisted = decision;
        self.persisted_base = self.persisting_base;
        self.trusted = true;
        // Acks owed for a decision the node has left are never sent again (they would be
        // refused, and a `Frozen` resent after an abort would claim a quiet the router no longer
        // keeps).
        self.owed.retain(|(e, _), ack| owed_under(decision, *e, ack));
        out.push(AgentOutput::Act(decision));
        if let Some(next) = self.wanted.take().filter(|w| w.order_key() > decision.order_key()) {
            self.persisting = Some(next);
            self.persisting_base = self.wanted_base;
            out.push(AgentOutput::Persist(next));
        }
    }

    /// Moves on from replica `from` after it failed a request, unless the target has moved
    /// already: the watch and the write share one target, and a failure of one must not undo
    /// what the other just learned (a timeout on a crashed replica would otherwise send the
    /// next watch back to it, again and again, while writes are answered by the leader).
    fn rotate_from(&mut self, from: usize) {
        if self.target == from {
            self.target = (self.target + 1) % self.config.replicas.len();
        }
    }

    fn point_at(&mut self, from: usize, leader: Option<ReplicaId>) {
        match leader.and_then(|l| self.config.replicas.iter().position(|r| *r == l)) {
            Some(i) => self.target = i,
            None => self.rotate_from(from),
        }
    }

    fn expire(&mut self, now_ms: u64) {
        let mut timed_out = Vec::new();
        for slot in [&mut self.watch, &mut self.write, &mut self.reporting] {
            if slot.as_ref().is_some_and(|f| now_ms >= f.deadline_ms) {
                // A report that may be lost is sent again (its content may not change for long).
                if slot.as_ref().is_some_and(|f| matches!(f.what, Pending::Write(WriteKind::Report))) {
                    self.report_sent = None;
                }
                timed_out.extend(slot.take().map(|f| f.replica));
            }
        }
        timed_out.dedup();
        for from in timed_out {
            self.rotate_from(from);
        }
    }

    fn on_response(&mut self, id: u64, response: NodeResponse, out: &mut Vec<AgentOutput>) {
        if let Some(w) = self.watch.as_ref().filter(|w| w.id == id) {
            let (linearizable, from) = (w.linearizable, w.replica);
            self.watch = None;
            match response {
                NodeResponse::View(view) => self.on_view(view, linearizable, from, out),
                NodeResponse::NotLeader { leader } => self.point_at(from, leader),
                NodeResponse::Accepted | NodeResponse::Rejected(_) | NodeResponse::Unknown { .. } => {
                    self.rotate_from(from)
                }
            }
            return;
        }
        let slot = if self.write.as_ref().is_some_and(|w| w.id == id) {
            Some(&mut self.write)
        } else if self.reporting.as_ref().is_some_and(|w| w.id == id) {
            Some(&mut self.reporting)
        } else {
            None
        };
        if let Some(w) = slot.and_then(Option::take) {
            let Pending::Write(kind) = w.what.clone() else { unreachable!("write slots hold writes") };
            let from = w.replica;
            match response {
                NodeResponse::Accepted => match kind {
                    WriteKind::Register => self.registered = true,
                    // Recorded: a later view shows it (the composition tells it again until then).
                    WriteKind::Recover => self.recover = None,
                    WriteKind::Report => {}
                    // `Accepted` means committed and applied (an answer not known to be either is
                    // `Unknown`): the ack is owed no more. (Resending it until a view shows it cost
                    // a log entry per round trip, and made every watcher's view change.)
                    WriteKind::Ack(epoch, ack) => {
                        let key = (epoch, ack_rank(&ack));
                        if self.owed.get(&key) == Some(&ack) {
                            self.owed.remove(&key);
                        }
                    }
                },
                NodeResponse::NotLeader { leader } => {
                    if kind == WriteKind::Report {
                        self.report_sent = None;
                    }
                    self.point_at(from, leader)
                }
                // Refused, or not known to have taken effect: a report is sent again; an ack stays
                // owed until a view shows it; a registration until a view says registered.
                NodeResponse::Rejected(_) | NodeResponse::Unknown { .. } => {
                    if kind == WriteKind::Report {
                        self.report_sent = None;
                    }
                    // A recovering group that refuses this node's disk (not a node it waits
                    // for) is not asked again until a later view asks for it.
                    if matches!(response, NodeResponse::Rejected(_)) && kind == WriteKind::Recover {
                        self.recover = None;
                    }
                }
                NodeResponse::View(_) => self.rotate_from(from),
            }
        }
        // A late answer to a request already given up on is ignored.
    }

    fn on_view(&mut self, view: DecisionView, linearizable: bool, from: usize, out: &mut Vec<AgentOutput>) {
        // A group rebuilt from nothing: its versions start from scratch, below what this node
        // has seen, so its view is taken whatever its version; nothing in it is acted on. The
        // node tells it what its disk holds (the composition hands that over on this view).
        if view.recovering {
            if view.disk_recorded {
                self.recover = None;
            }
            out.push(AgentOutput::View(view.clone()));
            self.last_view = Some(view);
            return;
        }
        if view.version <= self.known_version && self.linearized {
            self.stale_watches += 1;
            self.older_views += u32::from(view.version < self.known_version);
            // A frozen node moves on from a replica that brings no news; any node moves on
            // from one that answered with an older view than it holds: a lagging replica would
            // otherwise keep it from hearing of an abort or a commit (hunt seed 41002531, 3
            // upgrades: a data node heard of a rollback 5 s late).
            let frozen = matches!(self.persisted, Decision::Freeze(_));
            if self.stale_watches >= self.config.stale_watch_limit && (frozen || self.older_views > 0) {
                self.stale_watches = 0;
                self.older_views = 0;
                self.rotate_from(from);
            }
        } else {
            self.stale_watches = 0;
            self.older_views = 0;
        }
        if self.linearized && view.version < self.known_version {
            // An older view (a lagging replica's, or a replayed answer): nothing in it is news,
            // and taking it would undo what newer views said (acks owed, registration, phase).
            return;
        }
        self.known_version = self.known_version.max(view.version);
        self.known_upgrade = self.known_upgrade.max(view.upgrade.map_or(0, |u| u.0));
        self.registered = view.registered;
        // A router taken off the roster (being retired, or retired) persists that it is
        // retired, which orders after every decision: it serves nothing from then on.
        let retire = matches!(view.roster, RosterStatus::Retiring | RosterStatus::Retired);
        let decision = if retire { Decision::Retired } else { view.decision };
        let epoch = decision.epoch();
        let acked = |ack: &Ack| match ack {
            Ack::Frozen => view.acked_frozen,
            Ack::Drained { .. } => view.acked_drained,
            Ack::Switched => view.acked_switched,
            Ack::Retired => view.roster == RosterStatus::Retired,
        };
        // Keep only acks still owed for the current decision: `Frozen` and `Drained` while it
        // is that freeze, `Switched` while it is that commit. (An ack for a freeze the node has
        // left would be refused, and resending it forever would block every other write.)
        self.owed.retain(|(e, _), ack| *e == epoch && owed_under(decision, *e, ack) && !acked(ack));
        let first = !self.linearized || self.off_roster;
        if !self.linearized {
            if !linearizable {
                return;
            }
            self.linearized = true;
        }
        // A router not on the roster serves nothing: no freeze would wait for it, so what it
        // served could mix universes. It acts once a view shows it joined. That view need not
        // be linearizable: a join is refused during a freeze, and no commit after the join can
        // be decided without this router's `Frozen`, so the decision in any view that shows
        // it on the roster is still in force.
        let router = self.config.duties.contains(&Duty::Route);
        self.off_roster = router && view.roster == RosterStatus::NotOn && !self.acted_at_boot;
        if self.off_roster {
            out.push(AgentOutput::View(view.clone()));
            self.last_view = Some(view);
            return;
        }
        #[cfg(feature = "planted-bugs")]
        if self.bug == Some(AgentBug::ResetPersistedOnNewUpgrade)
            && self.persisting.is_none()
            && self.last_view.as_ref().is_some_and(|last| last.upgrade.is_some() && last.upgrade != view.upgrade)
        {
            self.persisted = Decision::Initial;
            self.persisted_base = Generation::GENESIS;
            out.push(AgentOutput::Act(Decision::Initial));
            out.push(AgentOutput::View(view.clone()));
            self.last_view = Some(view);
            return;
        }
        if decision.order_key() > self.persisted.order_key() {
            #[cfg(feature = "planted-bugs")]
            if self.bug == Some(AgentBug::ActBeforePersist) && self.persisting.is_none() {
                out.push(AgentOutput::Act(decision));
            }
            match self.persisting {
                None => {
                    self.persisting = Some(decision);
                    self.persisting_base = view.generation;
                    out.push(AgentOutput::Persist(decision));
                }
                Some(p) if decision.order_key() > p.order_key() => {
                    self.wanted = Some(decision);
                    self.wanted_base = view.generation;
                }
                Some(_) => {}
            }
        } else if first && !self.trusted && self.persisting.is_none() {
            // A disk not yet confirmed: the decision read is written to it (even if it is the
            // one there), so that it is trusted at the next boot, and acted on once durable.
            self.persisting = Some(self.persisted);
            self.persisting_base = self.persisted_base;
            out.push(AgentOutput::Persist(self.persisted));
        } else if first && !self.acted_at_boot {
            out.push(AgentOutput::Act(self.persisted));
        }
        out.push(AgentOutput::View(view.clone()));
        self.last_view = Some(view);
    }

    fn send_next(&mut self, now_ms: u64, out: &mut Vec<AgentOutput>) {
        let replica = self.target();
        if self.watch.is_none() {
            let id = self.next_id;
            self.next_id += 1;
            let linearizable = !self.linearized;
            let known_digest = match (&self.last_view, linearizable) {
                (Some(view), false) => view.digest(),
                _ => 0,
            };
            let request = NodeRequest::Watch {
                node: self.config.node.clone(),
                known_version: if linearizable { 0 } else { self.known_version },
                known_digest,
                linearizable,
                wait_ms: self.config.watch_wait_ms,
            };
            let deadline_ms = now_ms + u64::from(self.config.watch_wait_ms) + self.config.request_timeout_ms;
            self.watch = Some(InFlight { id, deadline_ms, what: Pending::Watch, linearizable, replica: self.target });
            out.push(AgentOutput::Send { id, replica, request });
        }
        // A data node takes part only in the upgrade it is deployed for.
        let upgrade_known = self.last_view.as_ref().is_some_and(|v| {
            v.known && v.upgrade.is_some() && self.config.upgrade_from.is_none_or(|from| v.upgrade_from == Some(from))
        });
        let retired = self.persisted == Decision::Retired;
        // A recovering group takes nothing but the disks it waits for.
        let recovering = self.last_view.as_ref().is_some_and(|v| v.recovering);
        let tell = self.last_view.as_ref().is_some_and(|v| !v.disk_recorded) && self.recover.is_some();
        if self.write.is_none() && recovering && tell {
            self.write = Some(self.send_write(now_ms, WriteKind::Recover, out));
        }
        if self.write.is_none() && !recovering {
            let kind = if !self.registered && !retired {
                // Register once the coordinator knows an upgrade naming this node.
                upgrade_known.then_some(WriteKind::Register)
            } else {
                // A retired router sends its `Retired` ack and nothing else.
                self.owed.iter().next().map(|((epoch, _), ack)| WriteKind::Ack(*epoch, ack.clone()))
            };
            if let Some(kind) = kind {
                self.write = Some(self.send_write(now_ms, kind, out));
            }
        }
        let due = self.last_report_ms.is_none_or(|t| now_ms >= t + self.config.report_interval_ms);
        if self.may_report() && due {
            self.reporting = Some(self.send_write(now_ms, WriteKind::Report, out));
        }
    }

    fn send_write(&mut self, now_ms: u64, kind: WriteKind, out: &mut Vec<AgentOutput>) -> InFlight {
        let replica = self.target();
        let node = self.config.node.clone();
        // Registrations and reports are for the upgrade the node's view names (the callers
        // send them only with one; `0` names none and is refused).
        let upgrade = self.last_view.as_ref().and_then(|v| v.upgrade).unwrap_or(UpgradeId(0));
        let request = match &kind {
            WriteKind::Register => {
                NodeRequest::Register { node, duties: self.config.duties.clone(), deployed: true, upgrade }
            }
            WriteKind::Ack(epoch, ack) => NodeRequest::Ack { node, epoch: *epoch, ack: ack.clone() },
            WriteKind::Recover => NodeRequest::Recover {
                node,
                duties: self.config.duties.clone(),
                known_version: self.known_version,
                known_upgrade: self.known_upgrade,
                disk: self.recover.clone().flatten(),
            },
            WriteKind::Report => {
                let report = self.report.clone().expect("checked by the caller");
                self.report_sent = Some(report.clone());
                self.last_report_ms = Some(now_ms);
                NodeRequest::Report { node, report, upgrade }
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        out.push(AgentOutput::Send { id, replica, request });
        InFlight {
            id,
            deadline_ms: now_ms + self.config.request_timeout_ms,
            what: Pending::Write(kind),
            linearizable: false,
            replica: self.target,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::messages::Phase;
    use protocol::UpgradeId;

    fn agent() -> AgentCore {
        AgentCore::new(AgentConfig {
            node: NodeName::from("router-1"),
            duties: vec![Duty::Route],
            replicas: vec![1, 2, 3],
            request_timeout_ms: 500,
            watch_wait_ms: 1000,
            report_interval_ms: 100,
            stale_watch_limit: 3,
            upgrade_from: None,
        })
    }

    fn view(version: u64, decision: Decision) -> DecisionView {
        DecisionView {
            version,
            upgrade: Some(UpgradeId(1)),
            phase: Some(Phase::Freezing),
            decision,
            generation: protocol::Generation::GENESIS,
            upgrade_from: Some(protocol::Generation::GENESIS),
            known: true,
            registered: true,
            all_routers_frozen: false,
            acked_frozen: false,
            acked_drained: false,
            acked_switched: false,
            roster: protocol::messages::RosterStatus::Active,
            routers: Vec::new(),
            universes: Vec::new(),
            rules: None,
            recovering: false,
            disk_recorded: false,
        }
    }

    fn sends(out: &[AgentOutput]) -> Vec<(u64, ReplicaId, NodeRequest)> {
        out.iter()
            .filter_map(|o| {
                if let AgentOutput::Send { id, replica, request } = o {
                    Some((*id, *replica, request.clone()))
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn first_view_must_be_linearizable_and_persist_comes_before_act() {
        let mut a = agent();
        let out = a.handle(
            0,
            AgentInput::Boot { persisted: Decision::Freeze(Epoch(1)), base: Generation::GENESIS, trusted: false },
        );
        let s = sends(&out);
        assert!(matches!(s[0].2, NodeRequest::Watch { linearizable: true, .. }));
        let out = a.handle(
            5,
            AgentInput::Response { id: s[0].0, response: NodeResponse::View(view(7, Decision::Commit(Epoch(1)))) },
        );
        assert!(out.contains(&AgentOutput::Persist(Decision::Commit(Epoch(1)))));
        assert!(!out.iter().any(|o| matches!(o, AgentOutput::Act(_))), "no act before the persist is durable");
        assert_eq!(a.persisted(), Decision::Freeze(Epoch(1)));
        let acted = a.handle(6, AgentInput::Persisted(Decision::Commit(Epoch(1))));
        assert_eq!(acted, vec![AgentOutput::Act(Decision::Commit(Epoch(1)))]);
        assert_eq!(a.persisted(), Decision::Commit(Epoch(1)));
        let next = sends(&out);
        assert!(matches!(next[0].2, NodeRequest::Watch { linearizable: false, known_version: 7, .. }));
    }

    #[test]
    fn a_node_with_its_own_disk_acts_at_boot_and_not_again_after_the_first_read() {
        for persisted in [Decision::Initial, Decision::Abort(Epoch(1)), Decision::Commit(Epoch(2))] {
            let mut a = agent();
            let out = a.handle(0, AgentInput::Boot { persisted, base: Generation::GENESIS, trusted: true });
            assert_eq!(out[0], AgentOutput::Act(persisted), "{persisted:?}: acted on at once, before any read");
            let (out, _) = answer_watch(&mut a, 1, &out, view(5, persisted));
            assert!(!out.iter().any(|o| matches!(o, AgentOutput::Act(_))), "{persisted:?}: not acted on twice");
        }
        // A freeze on disk waits for the outcome (it may be decided by now); so does any
        // decision on a disk that is not the node's own.
        let mut a = agent();
        let frozen = Decision::Freeze(Epoch(3));
        let out = a.handle(0, AgentInput::Boot { persisted: frozen, base: Generation::GENESIS, trusted: true });
        assert!(!out.iter().any(|o| matches!(o, AgentOutput::Act(_))), "not acted on before a read");
        let (out, _) = answer_watch(&mut a, 1, &out, view(5, frozen));
        assert!(out.contains(&AgentOutput::Act(frozen)), "acted on after the first read");
        // A disk not confirmed yet (new, replaced, or never read on): the decision read is
        // written to it before it is acted on, even if it is the one already there.
        let mut a = agent();
        let committed = Decision::Commit(Epoch(2));
        let out = a.handle(0, AgentInput::Boot { persisted: committed, base: Generation::GENESIS, trusted: false });
        assert!(!out.iter().any(|o| matches!(o, AgentOutput::Act(_))), "not acted on before a read");
        let (out, _) = answer_watch(&mut a, 1, &out, view(5, committed));
        assert!(
            out.contains(&AgentOutput::Persist(committed)) && !out.iter().any(|o| matches!(o, AgentOutput::Act(_)))
        );
        assert_eq!(a.handle(2, AgentInput::Persisted(committed)), vec![AgentOutput::Act(committed)]);
        // A newer decision read afterwards is persisted before it is acted on, as always.
        let mut a = agent();
        let out = a.handle(
            0,
            AgentInput::Boot { persisted: Decision::Freeze(Epoch(3)), base: Generation::GENESIS, trusted: true },
        );
        let (out, _) = answer_watch(&mut a, 1, &out, view(6, Decision::Commit(Epoch(3))));
        assert!(out.contains(&AgentOutput::Persist(Decision::Commit(Epoch(3)))));
        assert!(!out.iter().any(|o| matches!(o, AgentOutput::Act(_))));
    }

    #[test]
    fn stale_views_never_move_epochs_backwards() {
        let mut a = agent();
        let out = a.handle(
            0,
            AgentInput::Boot { persisted: Decision::Commit(Epoch(2)), base: Generation::GENESIS, trusted: false },
        );
        let id = sends(&out)[0].0;
        let out =
            a.handle(1, AgentInput::Response { id, response: NodeResponse::View(view(3, Decision::Freeze(Epoch(2)))) });
        assert!(out.contains(&AgentOutput::Persist(Decision::Commit(Epoch(2)))), "confirms its persisted decision");
        assert!(!out.iter().any(|o| matches!(o, AgentOutput::Persist(Decision::Freeze(_)))), "never the older one");
        let out = a.handle(2, AgentInput::Persisted(Decision::Commit(Epoch(2))));
        assert_eq!(out, vec![AgentOutput::Act(Decision::Commit(Epoch(2)))], "re-acts on its persisted decision");
        assert_eq!(a.persisted(), Decision::Commit(Epoch(2)));
    }

    /// Regression (the simulator's stale-view fault): an older view once dropped the acks owed
    /// for the current decision, so a `Switched` ack was never sent and the upgrade never ended.
    #[test]
    fn an_older_view_after_a_newer_one_changes_nothing() {
        let mut a = agent();
        let out = a.handle(
            0,
            AgentInput::Boot { persisted: Decision::Freeze(Epoch(1)), base: Generation::GENESIS, trusted: false },
        );
        let id = sends(&out)[0].0;
        let out =
            a.handle(1, AgentInput::Response { id, response: NodeResponse::View(view(5, Decision::Commit(Epoch(1)))) });
        a.handle(2, AgentInput::Persisted(Decision::Commit(Epoch(1))));
        let out2 = a.handle(3, AgentInput::OweAck { epoch: Epoch(1), ack: Ack::Switched });
        let watch = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Watch { .. })).unwrap().0;
        let ack = sends(&out2).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Ack { .. })).unwrap().0;
        // The ack's answer is lost; an old view (Freeze) answers the watch.
        let out = a.handle(
            4,
            AgentInput::Response { id: watch, response: NodeResponse::View(view(3, Decision::Freeze(Epoch(1)))) },
        );
        assert!(!out.iter().any(|o| matches!(o, AgentOutput::View(_) | AgentOutput::Persist(_) | AgentOutput::Act(_))));
        let out =
            a.handle(5, AgentInput::Response { id: ack, response: NodeResponse::Unknown { reason: "lost".into() } });
        let resent = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Ack { .. }));
        assert!(
            matches!(resent, Some((_, _, NodeRequest::Ack { ack: Ack::Switched, .. }))),
            "the Switched ack is still owed: {out:?}"
        );
    }

    #[test]
    fn a_newer_decision_seen_while_persisting_is_persisted_next() {
        let mut a = agent();
        let out =
            a.handle(0, AgentInput::Boot { persisted: Decision::Initial, base: Generation::GENESIS, trusted: false });
        let id = sends(&out)[0].0;
        let out =
            a.handle(1, AgentInput::Response { id, response: NodeResponse::View(view(2, Decision::Freeze(Epoch(1)))) });
        assert!(out.contains(&AgentOutput::Persist(Decision::Freeze(Epoch(1)))));
        let id = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Watch { .. })).unwrap().0;
        let out =
            a.handle(2, AgentInput::Response { id, response: NodeResponse::View(view(3, Decision::Commit(Epoch(1)))) });
        assert!(!out.iter().any(|o| matches!(o, AgentOutput::Persist(_))), "one persist at a time");
        let out = a.handle(3, AgentInput::Persisted(Decision::Freeze(Epoch(1))));
        assert_eq!(
            out,
            vec![AgentOutput::Act(Decision::Freeze(Epoch(1))), AgentOutput::Persist(Decision::Commit(Epoch(1)))]
        );
    }

    #[test]
    #[should_panic(expected = "not asked for")]
    fn a_persisted_answer_nobody_asked_for_is_a_shell_bug() {
        let mut a = agent();
        a.handle(0, AgentInput::Boot { persisted: Decision::Initial, base: Generation::GENESIS, trusted: false });
        a.handle(1, AgentInput::Persisted(Decision::Freeze(Epoch(1))));
    }

    #[test]
    fn acks_are_resent_until_the_view_shows_them_and_timeouts_rotate() {
        let mut a = agent();
        let out =
            a.handle(0, AgentInput::Boot { persisted: Decision::Initial, base: Generation::GENESIS, trusted: false });
        let watch = sends(&out)[0].0;
        a.handle(
            1,
            AgentInput::Response { id: watch, response: NodeResponse::View(view(2, Decision::Freeze(Epoch(1)))) },
        );
        let out = a.handle(2, AgentInput::OweAck { epoch: Epoch(1), ack: Ack::Frozen });
        let s = sends(&out);
        let (ack_id, replica, request) =
            s.iter().find(|(_, _, r)| matches!(r, NodeRequest::Ack { .. })).cloned().unwrap();
        assert_eq!(replica, 1);
        assert!(matches!(request, NodeRequest::Ack { epoch: Epoch(1), ack: Ack::Frozen, .. }));
        let out =
            a.handle(3, AgentInput::Response { id: ack_id, response: NodeResponse::NotLeader { leader: Some(3) } });
        let resent = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Ack { .. })).unwrap();
        assert_eq!(resent.1, 3, "follows the leader hint");
        // No answer: after the timeout the agent tries another replica.
        assert_eq!(a.next_deadline_ms(), Some(503), "the resent ack's deadline comes first");
        let out = a.handle(600, AgentInput::Timer);
        let again = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Ack { .. })).unwrap();
        assert_eq!(again.1, 1);
    }

    /// Regression (simulator seed 818 of the drift-fault session): the watch and the write share
    /// one target. A watch timing out on a crashed replica rotated the target away from the
    /// leader that a write had just been pointed at, straight back to the crashed replica, so
    /// every watch went there and the node never learned the decision.
    #[test]
    fn a_request_failing_on_a_replica_the_agent_already_left_does_not_move_it() {
        let mut a = agent();
        let out =
            a.handle(0, AgentInput::Boot { persisted: Decision::Initial, base: Generation::GENESIS, trusted: false });
        let first = sends(&out)[0].0;
        let out = a.handle(
            1,
            AgentInput::Response { id: first, response: NodeResponse::View(view(2, Decision::Freeze(Epoch(1)))) },
        );
        let (watch, replica, _) =
            sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Watch { .. })).unwrap();
        assert_eq!(replica, 1, "the watch waits on replica 1 (which then crashes)");
        let report = NodeReport { samples: 1, ..Default::default() };
        let out = a.handle(2, AgentInput::Report(report));
        let (sent, _, _) = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Report { .. })).unwrap();
        a.handle(3, AgentInput::Response { id: sent, response: NodeResponse::NotLeader { leader: Some(3) } });
        assert_eq!(a.target(), 3, "the write follows the leader hint");
        let out = a.handle(102, AgentInput::Timer);
        let (resent, to, _) =
            sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Report { .. })).unwrap();
        assert_eq!(to, 3, "the report is sent again, to the leader");
        a.handle(103, AgentInput::Response { id: resent, response: NodeResponse::Accepted });
        // The watch on replica 1 times out (1000 ms wait + 500 ms timeout after t=1).
        let out = a.handle(1_501, AgentInput::Timer);
        assert_ne!(a.request_deadline_ms(watch), Some(1_501), "the old watch is given up");
        let next = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Watch { .. })).unwrap();
        assert_eq!(next.1, 3, "the next watch goes to the leader, not back to the dead replica");
        // A failure on the current target still moves on.
        let out = a
            .handle(1_502, AgentInput::Response { id: next.0, response: NodeResponse::Unknown { reason: "x".into() } });
        let after = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Watch { .. })).unwrap();
        assert_eq!(after.1, 1);
    }

    /// Answers the watch in `out` with `view` at `now_ms`; returns the next watch sent.
    fn answer_watch(
        a: &mut AgentCore,
        now_ms: u64,
        out: &[AgentOutput],
        view: DecisionView,
    ) -> (Vec<AgentOutput>, (u64, ReplicaId)) {
        let (id, _, _) = sends(out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Watch { .. })).unwrap();
        let out = a.handle(now_ms, AgentInput::Response { id, response: NodeResponse::View(view) });
        let next = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Watch { .. })).unwrap();
        (out, (next.0, next.1))
    }

    #[test]
    fn a_frozen_node_leaves_a_replica_that_keeps_answering_without_news() {
        for (persisted, moves) in [(Decision::Freeze(Epoch(1)), true), (Decision::Initial, false)] {
            let mut a = agent();
            let out = a.handle(0, AgentInput::Boot { persisted, base: Generation::GENESIS, trusted: false });
            let (out, (_, to)) = answer_watch(&mut a, 1, &out, view(5, persisted));
            assert_eq!(to, 1);
            // stale_watch_limit = 3 answers without news.
            let (out, (_, to)) = answer_watch(&mut a, 2, &out, view(5, persisted));
            assert_eq!(to, 1, "one answer without news is a normal long-poll timeout");
            let (out, (_, to)) = answer_watch(&mut a, 3, &out, view(5, persisted));
            assert_eq!(to, 1);
            let (_, (_, to)) = answer_watch(&mut a, 4, &out, view(5, persisted));
            assert_eq!(
                to == 1,
                !moves,
                "{persisted:?}: after 3 answers without news the watch moves only while frozen"
            );
        }
        // Answers with news never count, however many.
        let mut a = agent();
        let frozen = Decision::Freeze(Epoch(1));
        let mut out = a.handle(0, AgentInput::Boot { persisted: frozen, base: Generation::GENESIS, trusted: false });
        for (t, version) in (1..=6).zip(5..) {
            let (next, (_, to)) = answer_watch(&mut a, t, &out, view(version, frozen));
            assert_eq!(to, 1, "view {version} had news: the watch stays");
            out = next;
        }
    }

    /// Hunt seed 41002531 (3 upgrades): a data node holding `Initial` kept watching a replica
    /// that answered with older views than it held, and heard of the rollback 5 s late. Any
    /// node leaves a replica that answered with an older view among its answers without news.
    #[test]
    fn any_node_leaves_a_replica_that_answers_with_older_views() {
        let mut a = agent();
        let initial = Decision::Initial;
        let out = a.handle(0, AgentInput::Boot { persisted: initial, base: Generation::GENESIS, trusted: false });
        let (out, (_, to)) = answer_watch(&mut a, 1, &out, view(7, initial));
        assert_eq!(to, 1);
        let (out, (_, to)) = answer_watch(&mut a, 2, &out, view(4, initial));
        assert_eq!(to, 1, "one older answer may be a replay");
        let (out, (_, to)) = answer_watch(&mut a, 3, &out, view(7, initial));
        assert_eq!(to, 1);
        let (_, (_, to)) = answer_watch(&mut a, 4, &out, view(7, initial));
        assert_ne!(to, 1, "three answers without news, one of them older: the watch moves on");
    }

    #[test]
    fn a_refused_report_is_sent_again_even_unchanged() {
        let mut a = agent();
        let out =
            a.handle(0, AgentInput::Boot { persisted: Decision::Initial, base: Generation::GENESIS, trusted: false });
        answer_watch(&mut a, 1, &out, view(5, Decision::Initial));
        let report = NodeReport { samples: 1, ..Default::default() };
        let out = a.handle(10, AgentInput::Report(report.clone()));
        let (id, _, _) = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Report { .. })).unwrap();
        let refused =
            protocol::messages::Rejection { kind: protocol::messages::RejectKind::NoUpgrade, detail: "x".into() };
        a.handle(11, AgentInput::Response { id, response: NodeResponse::Rejected(refused) });
        let out = a.handle(110, AgentInput::Timer);
        let again = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Report { .. }));
        assert!(again.is_some(), "the same report goes again after the interval");
    }

    #[test]
    fn a_changed_report_waits_out_the_report_interval() {
        let mut a = agent();
        let out =
            a.handle(0, AgentInput::Boot { persisted: Decision::Initial, base: Generation::GENESIS, trusted: false });
        let (_, _) = answer_watch(&mut a, 1, &out, view(5, Decision::Initial));
        let out = a.handle(10, AgentInput::Report(NodeReport { samples: 1, ..Default::default() }));
        let (id, _, _) = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Report { .. })).unwrap();
        a.handle(11, AgentInput::Response { id, response: NodeResponse::Accepted });
        let out = a.handle(12, AgentInput::Report(NodeReport { samples: 2, ..Default::default() }));
        assert!(!sends(&out).iter().any(|(_, _, r)| matches!(r, NodeRequest::Report { .. })), "too soon");
        assert_eq!(a.next_deadline_ms(), Some(110), "report_interval_ms = 100 after the last report at 10");
        let out = a.handle(110, AgentInput::Timer);
        assert!(sends(&out)
            .iter()
            .any(|(_, _, r)| matches!(r, NodeRequest::Report { report, .. } if report.samples == 2)));
    }

    #[test]
    fn a_router_off_the_roster_acts_on_nothing_until_a_view_shows_it_joined() {
        let mut a = agent();
        let out =
            a.handle(0, AgentInput::Boot { persisted: Decision::Initial, base: Generation::GENESIS, trusted: false });
        let off = DecisionView { roster: RosterStatus::NotOn, ..view(3, Decision::Initial) };
        let (out, _) = answer_watch(&mut a, 1, &out, off.clone());
        assert!(!out.iter().any(|o| matches!(o, AgentOutput::Persist(_) | AgentOutput::Act(_))), "{out:?}");
        let (out, _) = answer_watch(&mut a, 2, &out, DecisionView { version: 4, ..off });
        assert!(!out.iter().any(|o| matches!(o, AgentOutput::Persist(_) | AgentOutput::Act(_))), "{out:?}");
        // Joined (a watch need not be linearizable now: no commit after the join can be
        // decided without this router).
        let (out, _) = answer_watch(&mut a, 3, &out, view(5, Decision::Initial));
        assert!(out.contains(&AgentOutput::Persist(Decision::Initial)), "a new disk is confirmed first: {out:?}");
        let acted = a.handle(4, AgentInput::Persisted(Decision::Initial));
        assert!(acted.contains(&AgentOutput::Act(Decision::Initial)));
    }

    #[test]
    fn an_ack_never_waits_behind_a_report_in_flight() {
        let mut a = agent();
        let out =
            a.handle(0, AgentInput::Boot { persisted: Decision::Initial, base: Generation::GENESIS, trusted: true });
        let (out, _) = answer_watch(&mut a, 1, &out, view(3, Decision::Initial));
        let report = NodeReport { samples: 3, ..NodeReport::default() };
        let out2 = a.handle(2, AgentInput::Report(report));
        let reports = |out: &[AgentOutput]| {
            sends(out).into_iter().filter(|(_, _, r)| matches!(r, NodeRequest::Report { .. })).count()
        };
        assert_eq!(reports(&out2), 1, "a report goes out: {out:?} {out2:?}");
        let out3 = a.handle(3, AgentInput::OweAck { epoch: Epoch(1), ack: Ack::Frozen });
        assert!(
            sends(&out3).iter().any(|(_, _, r)| matches!(r, NodeRequest::Ack { ack: Ack::Frozen, .. })),
            "the ack goes out while the report is in flight: {out3:?}"
        );
    }

    #[test]
    fn a_watch_names_the_view_it_has_so_only_news_wakes_it() {
        let mut a = agent();
        let out =
            a.handle(0, AgentInput::Boot { persisted: Decision::Initial, base: Generation::GENESIS, trusted: true });
        let first = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Watch { .. })).unwrap();
        assert!(matches!(first.2, NodeRequest::Watch { known_digest: 0, linearizable: true, .. }));
        let seen = view(3, Decision::Initial);
        let (out, _) = answer_watch(&mut a, 1, &out, seen.clone());
        let next = sends(&out).into_iter().find(|(_, _, r)| matches!(r, NodeRequest::Watch { .. })).unwrap();
        assert!(
            matches!(next.2, NodeRequest::Watch { known_version: 3, known_digest, .. } if known_digest == seen.digest()),
            "{next:?}"
        );
    }

    #[test]
    fn a_retired_router_persists_it_acts_on_it_and_sends_only_its_retired_ack() {
        let mut a = agent();
        let out = a.handle(
            0,
            AgentInput::Boot { persisted: Decision::Commit(Epoch(2)), base: Generation::GENESIS, trusted: true },
        );
        assert_eq!(out[0], AgentOutput::Act(Decision::Commit(Epoch(2))));
        let retiring = DecisionView { roster: RosterStatus::Retiring, ..view(6, Decision::Commit(Epoch(2))) };
        let (out, (watch, _)) = answer_watch(&mut a, 1, &out, retiring);
        assert!(out.contains(&AgentOutput::Persist(Decision::Retired)), "{out:?}");
        let out = a.handle(2, AgentInput::Persisted(Decision::Retired));
        assert!(out.contains(&AgentOutput::Act(Decision::Retired)));
        let out = a.handle(3, AgentInput::OweAck { epoch: Epoch(0), ack: Ack::Retired });
        let writes: Vec<NodeRequest> =
            sends(&out).into_iter().map(|(_, _, r)| r).filter(|r| !matches!(r, NodeRequest::Watch { .. })).collect();
        assert!(
            matches!(&writes[..], [NodeRequest::Ack { ack: Ack::Retired, .. }]),
            "only the retired ack: {writes:?}"
        );
        // A view that shows it retired: nothing more is owed, and a decision never follows.
        let retired = DecisionView { roster: RosterStatus::Retired, ..view(8, Decision::Commit(Epoch(3))) };
        let out = a.handle(5, AgentInput::Response { id: watch, response: NodeResponse::View(retired) });
        assert!(!out.iter().any(|o| matches!(o, AgentOutput::Persist(_) | AgentOutput::Act(_))), "{out:?}");
        assert_eq!(a.persisted(), Decision::Retired);
    }
}
