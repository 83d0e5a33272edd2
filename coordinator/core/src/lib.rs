//! The upgrade state machine replicated by the coordinator (docs/design.md). Pure: no I/O, no clock
//! (time arrives inside commands, stamped by the proposer), no randomness.
//!
//! `apply` re-checks every precondition, so a wrong proposal from a confused or stale leader
//! is rejected by the state machine rather than trusted. Exactly one outcome is ever decided for
//! an epoch: committed by the state itself when the last ack it needs is applied, or aborted by an
//! `Abort{e}` applied first. Epochs only grow.

mod driver;
mod gate;
mod view;

pub use driver::{next_command, next_deadline_ms};
pub use gate::{ready_gate, validation_seen, ValidationSeen};
pub use view::{decision_view, status};

use protocol::messages::{Ack, DiskSummary, NodeReport, Phase, RejectKind, Rejection, RosterStatus};
use protocol::plan::{Plan, SwitchMode};
use protocol::{Decision, Duty, Epoch, Generation, NodeName, Position, UpgradeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A change to the replicated state; one Raft log entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Start an upgrade with a validated plan; `token` identifies the request (retries reuse it).
    Start { plan: Box<Plan>, token: String },
    /// A node named by the plan registers its duties and whether its new-universe side is
    /// deployed, for `upgrade` (refused for any other: a late registration of an earlier one).
    Register { node: NodeName, duties: Vec<Duty>, deployed: bool, upgrade: UpgradeId },
    /// A node's latest measurements, for `upgrade` (refused for any other).
    Report { node: NodeName, report: NodeReport, upgrade: UpgradeId },
    /// The operator asks for the switch (manual mode).
    RequestSwitch,
    /// Freeze attempt `epoch`, proposed by the driver at `now_ms`.
    Freeze { epoch: Epoch, now_ms: u64, deadline_ms: u64 },
    /// A node acknowledges its part of `epoch`.
    Ack { node: NodeName, epoch: Epoch, ack: Ack },
    /// Several nodes' acks of freeze `epoch` (`Frozen`, `Drained`), gathered by the leader so
    /// that one log entry carries them: applied in order, as many `Ack`s would be, and answered
    /// with [`Applied::Each`].
    Acks { epoch: Epoch, acks: Vec<(NodeName, Ack)> },
    /// Give up attempt `epoch`.
    Abort { epoch: Epoch, reason: String, now_ms: u64 },
    /// The operator ends the upgrade: the old universe keeps serving.
    OperatorAbort { reason: String, now_ms: u64 },
    /// Put a router on the roster (refused during a freeze).
    Join { node: NodeName },
    /// Take a router off the roster: at once if `force` (the operator asserts it is cut off
    /// from clients), else once it acks `Retired`.
    Retire { node: NodeName, force: bool },
    /// A group rebuilt from nothing learns the cluster from the disks of `expected` nodes
    /// (accepted only by a state that has decided nothing yet); `lost` ones are not waited for.
    /// Given again during the recovery, it adds to `lost`.
    /// `abort_unknown_freeze`: the operator asserts that no client saw the new universe of a
    /// freeze whose outcome the disks cannot tell (see [`Recovery::unknown_freeze`]).
    Recover { expected: Vec<NodeName>, lost: Vec<NodeName>, abort_unknown_freeze: bool },
    /// The first command of a group rebuilt from nothing (its replicas started with
    /// `imago coordinator --rebuilt`; accepted only by a pristine state): until `Recover`, the
    /// state refuses everything else. A rebuilt group looks like a new cluster, so without it a
    /// join or a start sent before `imago cluster recover` was taken as the first of a new
    /// cluster at generation 1 (simulator hunt seed 61000041).
    AwaitRecovery,
    /// The cluster writes replicated-state format `to` from now on (`imago cluster
    /// raise-format`, once every replica has said it reads it). Accepted only above the
    /// current format; whether this build can read `to` is the replica's own check before it
    /// applies the command (the store stops a replica that cannot, so no replica applies what
    /// it cannot read).
    RaiseFormat { to: u32 },
    /// A node's disk, while recovering (see [`protocol::messages::NodeRequest::Recover`]).
    Recovered { node: NodeName, duties: Vec<Duty>, known_version: u64, known_upgrade: u64, disk: Option<DiskSummary> },
}

/// A recovery under way: what the group waits for and what it has learnt.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    pub expected: BTreeSet<NodeName>,
    pub lost: BTreeSet<NodeName>,
    /// Each node's disk as it reported it, with its duties and the highest version it saw.
    pub disks: BTreeMap<NodeName, (Vec<Duty>, u64, Option<DiskSummary>)>,
    /// The highest upgrade id any node saw.
    pub known_upgrade: u64,
    /// The operator asserted that no client saw the new universe of an undecided freeze.
    pub abort_unknown_freeze: bool,
}

impl Recovery {
    /// The newest decision on the disks that reported (a retired router's aside).
    fn newest(&self) -> Option<&DiskSummary> {
        self.disks
            .values()
            .filter_map(|(_, _, d)| d.as_ref())
            .filter(|d| d.decision != Decision::Retired)
            .max_by_key(|d| (d.decision.order_key(), d.generation))
    }

    /// The freeze whose outcome the disks cannot tell, if the newest decision is a freeze and
    /// some node could have acted on its outcome unseen: one lost, or one whose disk vouches
    /// for nothing (a replaced disk may have held the commit). Aborting it then needs the
    /// operator's word.
    pub fn unknown_freeze(&self) -> Option<Epoch> {
        let freeze = match self.newest()?.decision {
            Decision::Freeze(e) => e,
            _ => return None,
        };
        let blind = !self.lost.is_empty() || self.disks.values().any(|(_, _, d)| d.is_none());
        (blind && !self.abort_unknown_freeze).then_some(freeze)
    }

    /// Why the recovery is not done yet, for the operator.
    pub fn blocked(&self) -> Option<String> {
        let waiting = self.waiting();
        if !waiting.is_empty() {
            let names: Vec<&str> = waiting.iter().map(|n| n.0.as_str()).collect();
            return Some(format!("waiting for the disks of {}", names.join(", ")));
        }
        self.unknown_freeze().map(|e| {
            format!(
                "no disk holds the outcome of freeze {e}, and a lost node or a disk that vouches for nothing may \
                 have acted on it: if no client can have seen the new universe, recover with \
                 --abort-unknown-freeze"
            )
        })
    }
    /// Nodes still to report.
    pub fn waiting(&self) -> Vec<NodeName> {
        self.expected.iter().filter(|n| !self.lost.contains(*n) && !self.disks.contains_key(*n)).cloned().collect()
    }
}

/// The result of applying a command (the Raft response).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    Started(UpgradeId),
    Accepted,
    Rejected(Rejection),
    /// One result per ack of a [`Command::Acks`], in its order.
    Each(Vec<Applied>),
}

impl Applied {
    /// Whether the command changed the state (a batch did if any of its parts did).
    pub fn changed(&self) -> bool {
        match self {
            Applied::Rejected(_) => false,
            Applied::Each(each) => each.iter().any(Applied::changed),
            Applied::Started(_) | Applied::Accepted => true,
        }
    }
}

/// The committed outcome of one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Committed,
    Aborted { reason: String },
}

/// What the coordinator knows of one node of the plan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub registered: bool,
    pub deployed: bool,
    pub report: NodeReport,
    /// Epoch of the last `Frozen` ack.
    pub frozen: Option<Epoch>,
    /// Epoch, final position and checksum verdict of the last `Drained` ack.
    pub drained: Option<(Epoch, Position, bool)>,
    /// Epoch of the last `Switched` ack.
    pub switched: Option<Epoch>,
}

/// One upgrade in progress (or the last one, ended).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Upgrade {
    pub id: UpgradeId,
    /// The generation this upgrade upgrades from (its plan's); its new universe is the next.
    pub from: Generation,
    /// The start request's idempotency token.
    pub token: String,
    pub plan: Plan,
    pub phase: Phase,
    /// Current (or last) freeze epoch of this upgrade; `Epoch(0)` before the first freeze.
    pub epoch: Epoch,
    /// Freeze attempts so far.
    pub attempts: u32,
    pub switch_requested: bool,
    pub freeze_deadline_ms: u64,
    pub retry_not_before_ms: u64,
    pub nodes: BTreeMap<NodeName, NodeState>,
    pub last_abort_reason: Option<String>,
    /// What the ready gate saw when the current epoch froze (why it froze, for the record).
    pub frozen_on: Option<ValidationSeen>,
    /// The routers this upgrade needs (every freeze's `Frozen`, the switch's `Switched`): the
    /// roster's active and retiring routers, kept equal to them while the upgrade runs.
    pub routers: BTreeSet<NodeName>,
}

/// The whole replicated state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpgradeState {
    /// The generation the cluster serves: the last switched upgrade's new one (genesis before
    /// any). The next upgrade's plan must upgrade from it.
    pub generation: Generation,
    pub current: Option<Upgrade>,
    /// Highest epoch ever frozen on this cluster (epochs grow across upgrades too).
    pub last_epoch: Epoch,
    /// Outcome of every epoch ever decided.
    pub outcomes: BTreeMap<Epoch, Outcome>,
    pub upgrades_started: u64,
    /// Bumped by every accepted command that changes what a node may watch (everything but
    /// reports), so parked watches wake only for news.
    pub version: u64,
    /// The cluster's routers, outside any plan: who joined, who is being retired, who is.
    pub roster: BTreeMap<NodeName, RosterStatus>,
    /// Where each universe a router may serve or mirror to answers, by generation (the plans'
    /// `[universe] endpoints`): at most the generation served and the one after.
    pub universes: BTreeMap<Generation, Vec<String>>,
    /// A group rebuilt from nothing, learning from the nodes' disks: it decides nothing until
    /// every expected node has reported.
    pub recovery: Option<Recovery>,
    /// A group rebuilt from nothing, waiting for the operator's `Recover` ([`Command::AwaitRecovery`]).
    pub awaiting_recovery: bool,
    /// The format of the replicated state's commands and shape that the cluster writes.
    pub format: StateFormat,
}

/// A format of the replicated state (see the design notes, "Versioned formats").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StateFormat(pub u32);

impl Default for StateFormat {
    fn default() -> StateFormat {
        StateFormat(1)
    }
}

/// The newest replicated-state format this build reads, and so the highest a cluster of this
/// build's replicas may be raised to.
pub const STATE_FORMAT_MAX: StateFormat = StateFormat(1);

/// Why a rebuilt group refuses a command before `Recover`.
pub const REBUILT_FIRST: &str = "this group was rebuilt from nothing: run `imago cluster recover` before any other \
     command (until then it cannot tell the cluster's generation, roster and last epoch)";

fn reject(kind: RejectKind, detail: impl Into<String>) -> Applied {
    Applied::Rejected(Rejection { kind, detail: detail.into() })
}

impl Upgrade {
    /// Whether every router this upgrade needs satisfies `pred`.
    fn all_routers(&self, pred: impl Fn(&NodeState) -> bool) -> bool {
        self.routers.iter().all(|n| self.nodes.get(n).is_some_and(&pred))
    }

    /// The nodes this upgrade needs: the plan's nodes that are not routers, and the roster's
    /// routers (a plan cannot leave one out; a retired one is not needed).
    pub fn required(&self) -> impl Iterator<Item = &NodeName> {
        self.plan.nodes.iter().filter(|n| !n.duties.contains(&Duty::Route)).map(|n| &n.name).chain(&self.routers)
    }

    /// The duties `node` takes part with: the plan's, or `route` for a router that joined
    /// the roster outside the plan; `None` if the upgrade does not need it.
    pub fn duties_of(&self, node: &NodeName) -> Option<Vec<Duty>> {
        if self.plan.node(node).is_some_and(|n| n.duties.contains(&Duty::Route)) && !self.routers.contains(node) {
            return None;
        }
        match self.plan.node(node) {
            Some(n) => Some(n.duties.clone()),
            None => self.routers.contains(node).then(|| vec![Duty::Route]),
        }
    }

    /// Freezing only: every router acked `Frozen` for the current epoch.
    pub fn all_routers_frozen(&self) -> bool {
        self.phase == Phase::Freezing && self.all_routers(|n| n.frozen == Some(self.epoch))
    }

    /// Nodes whose ack for the current freeze is still missing, with the ack they owe.
    pub fn missing_acks(&self) -> Vec<String> {
        self.acks_owed().map(|(name, ack)| format!("{name} ({ack})")).collect()
    }

    /// The nodes that owe an ack to the current epoch (`frozen` or `drained`), in name order
    /// within each duty.
    fn acks_owed(&self) -> impl Iterator<Item = (&NodeName, &'static str)> {
        let routers = self
            .routers
            .iter()
            .filter(|name| self.nodes.get(*name).and_then(|s| s.frozen) != Some(self.epoch))
            .map(|name| (name, "frozen"));
        let data = self
            .plan
            .nodes_with(Duty::Transform)
            .filter(|name| self.nodes.get(*name).and_then(|s| s.drained).map(|d| d.0) != Some(self.epoch))
            .map(|name| (name, "drained"));
        routers.chain(data)
    }

    /// A data node that drained with a checksum mismatch for the current epoch, if any.
    pub fn checksum_mismatch(&self) -> Option<(NodeName, Position)> {
        self.nodes.iter().find_map(|(name, n)| match n.drained {
            Some((e, position, false)) if e == self.epoch => Some((name.clone(), position)),
            _ => None,
        })
    }
}

/// Deliberately broken variants of `apply`, to prove the simulator's checkers catch them.
#[cfg(feature = "planted-bugs")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyBug {
    /// An ack for an earlier epoch is counted for the current one.
    CountStaleAck,
}

impl UpgradeState {
    /// [`UpgradeState::apply`] with a planted bug (simulator only).
    #[cfg(feature = "planted-bugs")]
    pub fn apply_planted(&mut self, command: &Command, bug: Option<ApplyBug>) -> Applied {
        let current = self.current.as_ref().map(|u| u.epoch);
        match (bug, command, current) {
            (Some(ApplyBug::CountStaleAck), Command::Ack { node, epoch, ack }, Some(now)) if *epoch < now => {
                self.apply(&Command::Ack { node: node.clone(), epoch: now, ack: ack.clone() })
            }
            _ => self.apply(command),
        }
    }

    /// Whether the acks of `nodes` are all that freeze `epoch` still waits for: the state
    /// Freezing at `epoch` and every node that owes an ack among `nodes`. The leader proposes a
    /// freeze's acks together once they complete it ([`Command::Acks`]).
    pub fn acks_complete(&self, epoch: Epoch, nodes: &BTreeSet<&NodeName>) -> bool {
        self.acks_awaited(epoch) && self.current.as_ref().is_some_and(|u| u.acks_owed().all(|(n, _)| nodes.contains(n)))
    }

    /// Whether freeze `epoch` is under way and undecided (its acks are worth gathering).
    pub fn acks_awaited(&self, epoch: Epoch) -> bool {
        self.current.as_ref().is_some_and(|u| u.phase == Phase::Freezing && u.epoch == epoch)
    }

    /// Applies one committed command. Every precondition is checked here, and the state's
    /// invariants are asserted afterwards (a broken invariant is a bug, never an input error).
    pub fn apply(&mut self, command: &Command) -> Applied {
        let before = (
            self.version,
            self.last_epoch,
            self.outcomes.len(),
            self.outcomes.get(&self.last_epoch).cloned(),
            self.generation,
        );
        let result = self.apply_inner(command);
        self.advance();
        if result.changed() && !matches!(command, Command::Report { .. }) {
            self.version += 1;
        }
        self.assert_invariants(before);
        result
    }

    /// The state's invariants, given what they were before a command.
    fn assert_invariants(&self, before: (u64, Epoch, usize, Option<Outcome>, Generation)) {
        let (version, last_epoch, decided, last_outcome, generation) = before;
        assert!(self.version >= version, "version went backwards");
        assert!(self.generation >= generation, "generations went backwards");
        assert!(
            self.universes.keys().all(|g| *g == self.generation || *g == self.generation.next()),
            "endpoints kept for generations {:?} while serving {:?}",
            self.universes.keys().collect::<Vec<_>>(),
            self.generation
        );
        assert!(self.last_epoch >= last_epoch, "epochs went backwards");
        assert!(self.outcomes.len() >= decided, "an outcome was forgotten");
        if let Some(outcome) = last_outcome {
            assert_eq!(self.outcomes.get(&last_epoch), Some(&outcome), "a second outcome for {last_epoch}");
        }
        if let Some((epoch, _)) = self.outcomes.last_key_value() {
            assert!(*epoch <= self.last_epoch, "an outcome for {epoch}, beyond the last frozen epoch");
        }
        let Some(u) = &self.current else { return };
        if !u.phase.is_terminal() {
            let on_roster: BTreeSet<&NodeName> = self
                .roster
                .iter()
                .filter(|(_, s)| matches!(s, RosterStatus::Active | RosterStatus::Retiring))
                .map(|(n, _)| n)
                .collect();
            assert_eq!(
                u.routers.iter().collect::<BTreeSet<_>>(),
                on_roster,
                "the upgrade's routers are not the roster's"
            );
        }
        assert!(u.epoch <= self.last_epoch, "the upgrade's epoch is beyond the last frozen epoch");
        let outcome = self.outcomes.get(&u.epoch);
        match u.phase {
            Phase::Freezing => {
                assert!(u.epoch == self.last_epoch && u.epoch > Epoch(0), "Freezing at an old epoch");
                assert!(outcome.is_none(), "Freezing at a decided epoch {}", u.epoch);
            }
            Phase::Switched | Phase::Done => {
                assert_eq!(outcome, Some(&Outcome::Committed), "{:?} without a committed outcome", u.phase);
            }
            Phase::Staged | Phase::Syncing | Phase::RolledBack => assert!(
                u.epoch == Epoch(0) || matches!(outcome, Some(Outcome::Aborted { .. })),
                "{:?} after an epoch that was not aborted",
                u.phase
            ),
        }
        let switched = matches!(u.phase, Phase::Switched | Phase::Done);
        let serving = if switched { u.from.next() } else { u.from };
        assert_eq!(self.generation, serving, "the cluster's generation is not the one its last upgrade left");
    }

    /// A state that has decided nothing and knows no roster: a new cluster's, or a rebuilt one's.
    fn pristine(&self) -> bool {
        self.current.is_none()
            && self.outcomes.is_empty()
            && self.roster.is_empty()
            && self.upgrades_started == 0
            && self.generation == Generation::GENESIS
            && self.recovery.is_none()
    }

    /// Whether a rebuilt group's replica leading this state must first propose
    /// [`Command::AwaitRecovery`] (and refuse everything but `Recover` until it is applied).
    pub fn awaits_recovery_mark(&self) -> bool {
        self.pristine() && !self.awaiting_recovery
    }

    /// What a replica of a rebuilt group (`imago coordinator --rebuilt`) answers `command`
    /// before proposing it while this state is not marked yet: the same refusal the marked
    /// state gives, for anything but the recovery.
    pub fn refused_before_the_mark(&self, command: &Command) -> Option<Rejection> {
        (self.awaits_recovery_mark() && !Self::allowed_before_recovery(command))
            .then(|| Rejection { kind: RejectKind::Recovering, detail: REBUILT_FIRST.to_string() })
    }

    /// The commands a rebuilt group takes before `Recover`.
    fn allowed_before_recovery(command: &Command) -> bool {
        matches!(command, Command::Recover { .. } | Command::AwaitRecovery)
    }

    fn apply_inner(&mut self, command: &Command) -> Applied {
        if self.awaiting_recovery && !Self::allowed_before_recovery(command) {
            return reject(RejectKind::Recovering, REBUILT_FIRST);
        }
        if let Some(r) = &self.recovery {
            if !matches!(command, Command::Recover { .. } | Command::Recovered { .. }) {
                let detail = format!("recovering: {}", r.blocked().unwrap_or_default());
                return reject(RejectKind::Recovering, detail);
            }
        }
        match command {
            Command::Recover { expected, lost, abort_unknown_freeze } => {
                self.recover(expected, lost, *abort_unknown_freeze)
            }
            Command::RaiseFormat { to } if *to <= self.format.0 => reject(
                RejectKind::BadCommand,
                format!("the cluster already writes format {}: a format is only ever raised", self.format.0),
            ),
            Command::RaiseFormat { to } => {
                self.format = StateFormat(*to);
                Applied::Accepted
            }
            Command::AwaitRecovery if self.awaiting_recovery => Applied::Accepted,
            Command::AwaitRecovery if !self.pristine() => {
                reject(RejectKind::BadCommand, "this group has state of its own: it was not rebuilt from nothing")
            }
            Command::AwaitRecovery => {
                self.awaiting_recovery = true;
                Applied::Accepted
            }
            Command::Recovered { node, duties, known_version, known_upgrade, disk } => {
                let Some(r) = self.recovery.as_mut() else {
                    return reject(RejectKind::BadCommand, "not recovering");
                };
                if !r.expected.contains(node) {
                    return reject(RejectKind::UnknownNode, format!("`{node}` is not one of the nodes recovered from"));
                }
                // A report again (a retry, a restart): the newest decision it ever reported
                // stands; a disk it vouched for is not taken back by a later "nothing".
                let reported = r.disks.entry(node.clone()).or_insert((duties.clone(), 0, None));
                reported.0 = duties.clone();
                reported.1 = reported.1.max(*known_version);
                let newer = match (&reported.2, disk) {
                    (_, None) => false,
                    (None, Some(_)) => true,
                    (Some(had), Some(new)) => new.decision.order_key() > had.decision.order_key(),
                };
                if newer {
                    reported.2 = disk.clone();
                }
                r.known_upgrade = r.known_upgrade.max(*known_upgrade);
                self.maybe_recovered();
                Applied::Accepted
            }
            Command::Start { plan, token } => self.start(plan, token),
            Command::Register { node, duties, deployed, upgrade } => {
                self.with_node(node, Some(*upgrade), |u, state| {
                    let planned = u.duties_of(node).expect("checked by with_node");
                    let (mut got, mut want) = (duties.clone(), planned.clone());
                    got.sort();
                    want.sort();
                    // A router that joined outside the plan may validate too.
                    let joined_router = u.plan.node(node).is_none() && got.contains(&Duty::Route);
                    if got != want && !joined_router {
                        return reject(
                            RejectKind::WrongDuties,
                            format!("node `{node}` registers duties {duties:?} but the plan gives it {planned:?}"),
                        );
                    }
                    state.registered = true;
                    state.deployed = *deployed;
                    Applied::Accepted
                })
            }
            Command::Report { node, report, upgrade } => self.with_node(node, Some(*upgrade), |_, state| {
                if !state.registered {
                    return reject(RejectKind::NotRegistered, format!("node `{node}` reports before registering"));
                }
                state.report = report.clone();
                Applied::Accepted
            }),
            Command::RequestSwitch => self.request_switch(),
            Command::Freeze { epoch, now_ms, deadline_ms } => self.freeze(*epoch, *now_ms, *deadline_ms),
            Command::Ack { node, ack: Ack::Retired, .. } => match self.roster.get(node) {
                Some(RosterStatus::Retiring) => self.retired(node),
                Some(RosterStatus::Retired) => Applied::Accepted,
                _ => reject(RejectKind::BadCommand, format!("`{node}` was not asked to retire")),
            },
            Command::Ack { node, epoch, ack } => self.ack(node, *epoch, ack),
            Command::Acks { epoch, acks } => Applied::Each(
                acks.iter()
                    .map(|(node, ack)| match ack {
                        Ack::Frozen | Ack::Drained { .. } => self.ack(node, *epoch, ack),
                        Ack::Switched | Ack::Retired => {
                            reject(RejectKind::BadCommand, "only Frozen and Drained acks are gathered")
                        }
                    })
                    .collect(),
            ),
            Command::Abort { epoch, reason, now_ms } => self.abort(*epoch, reason, *now_ms, false),
            Command::OperatorAbort { reason, now_ms } => self.operator_abort(reason, *now_ms),
            Command::Join { node } => self.join(node),
            Command::Retire { node, force } => self.retire(node, *force),
        }
    }

    fn join(&mut self, node: &NodeName) -> Applied {
        match self.roster.get(node) {
            Some(RosterStatus::Active) => return Applied::Accepted,
            Some(RosterStatus::Retiring) => {
                return reject(RejectKind::Retired, format!("router `{node}` is being retired"));
            }
            Some(RosterStatus::Retired) => {
                return reject(
                    RejectKind::Retired,
                    format!("router `{node}` was retired; a router joins again only under a new name (and with a fresh disk)"),
                );
            }
            Some(RosterStatus::NotOn) | None => {}
        }
        if let Some(u) = self.current.as_ref().filter(|u| !u.phase.is_terminal()) {
            if u.phase == Phase::Freezing {
                return reject(
                    RejectKind::WrongPhase,
                    format!("router `{node}` cannot join during a freeze (epoch {})", u.epoch),
                );
            }
            if u.plan.node(node).is_some_and(|n| !n.duties.contains(&Duty::Route)) {
                return reject(
                    RejectKind::WrongDuties,
                    format!("`{node}` is a node of the plan without the route duty"),
                );
            }
        }
        self.roster.insert(node.clone(), RosterStatus::Active);
        if let Some(u) = self.current.as_mut().filter(|u| !u.phase.is_terminal()) {
            u.routers.insert(node.clone());
        }
        Applied::Accepted
    }

    fn retire(&mut self, node: &NodeName, force: bool) -> Applied {
        let status = match self.roster.get(node) {
            None | Some(RosterStatus::NotOn) => {
                return reject(RejectKind::UnknownNode, format!("router `{node}` is not on the roster"))
            }
            Some(status) => *status,
        };
        match (status, force) {
            (RosterStatus::Retired, _) | (RosterStatus::Retiring, false) => Applied::Accepted,
            (_, true) => self.retired(node),
            (_, false) => {
                self.roster.insert(node.clone(), RosterStatus::Retiring);
                Applied::Accepted
            }
        }
    }

    /// `node` is off the roster: no upgrade needs it any more.
    fn retired(&mut self, node: &NodeName) -> Applied {
        self.roster.insert(node.clone(), RosterStatus::Retired);
        if let Some(u) = self.current.as_mut().filter(|u| !u.phase.is_terminal()) {
            u.routers.remove(node);
        }
        Applied::Accepted
    }

    fn active(&mut self) -> Result<&mut Upgrade, Applied> {
        match &mut self.current {
            Some(u) if !u.phase.is_terminal() => Ok(u),
            _ => Err(reject(RejectKind::NoUpgrade, "no upgrade in progress")),
        }
    }

    /// Applies `f` to `node`'s state in the current upgrade; `upgrade`: the one the command is
    /// for, if it names one.
    fn with_node(
        &mut self,
        node: &NodeName,
        upgrade: Option<UpgradeId>,
        f: impl FnOnce(&Upgrade, &mut NodeState) -> Applied,
    ) -> Applied {
        if let Some(status @ (RosterStatus::Retiring | RosterStatus::Retired)) = self.roster.get(node) {
            return reject(RejectKind::Retired, format!("router `{node}` is {status:?}: it takes part in nothing"));
        }
        let named = upgrade;
        let upgrade = match self.active() {
            Ok(u) => u,
            Err(r) => return r,
        };
        if let Some(named) = named.filter(|n| *n != upgrade.id) {
            return reject(
                RejectKind::WrongUpgrade,
                format!("`{node}` sent this for upgrade {}, but the current upgrade is {}", named.0, upgrade.id.0),
            );
        }
        if upgrade.duties_of(node).is_none() {
            return reject(
                RejectKind::UnknownNode,
                format!("node `{node}` is neither named by the plan of upgrade {} nor on the roster", upgrade.id.0),
            );
        }
        let mut state = upgrade.nodes.get(node).cloned().unwrap_or_default();
        let result = f(upgrade, &mut state);
        if result == Applied::Accepted {
            upgrade.nodes.insert(node.clone(), state);
        }
        result
    }

    fn start(&mut self, plan: &Plan, token: &str) -> Applied {
        if let Some(u) = &self.current {
            if u.token == token {
                return Applied::Started(u.id);
            }
            if !u.phase.is_terminal() {
                return reject(
                    RejectKind::InProgress,
                    format!("upgrade {} (`{}`) is still in progress ({:?})", u.id.0, u.plan.name, u.phase),
                );
            }
        }
        if plan.old_generation != self.generation {
            let why = match self.current.as_ref().filter(|u| u.from.next() == self.generation) {
                Some(last) => format!(" (upgrade {} `{}` switched it from {})", last.id.0, last.plan.name, last.from),
                None => String::new(),
            };
            return reject(
                RejectKind::WrongGeneration,
                format!(
                    "the plan upgrades from generation {}, but the cluster serves generation {}{why}: \
                     write the plan against {} (its `upgrade.old_generation` and old schema)",
                    plan.old_generation.0, self.generation.0, self.generation.0
                ),
            );
        }
        if let Err(e) = plan.mapping() {
            return reject(RejectKind::BadPlan, format!("plan transforms do not fit the old schema: {e}"));
        }
        for router in plan.nodes_with(Duty::Route) {
            if let Some(status @ (RosterStatus::Retiring | RosterStatus::Retired)) = self.roster.get(router) {
                return reject(RejectKind::Retired, format!("the plan names router `{router}`, which is {status:?}"));
            }
        }
        // The plan's routers join the roster; the roster's routers are needed whether the plan
        // names them or not.
        for router in plan.nodes_with(Duty::Route) {
            self.roster.insert(router.clone(), RosterStatus::Active);
        }
        let routers = self
            .roster
            .iter()
            .filter(|(_, s)| matches!(s, RosterStatus::Active | RosterStatus::Retiring))
            .map(|(n, _)| n.clone())
            .collect();
        self.upgrades_started += 1;
        let id = UpgradeId(self.upgrades_started);
        // A retry after a rollback may name new endpoints: nobody serves that generation yet.
        self.universes.insert(plan.old_generation.next(), plan.endpoints.clone());
        self.current = Some(Upgrade {
            id,
            from: plan.old_generation,
            token: token.to_string(),
            plan: plan.clone(),
            phase: Phase::Staged,
            epoch: Epoch(0),
            attempts: 0,
            switch_requested: false,
            freeze_deadline_ms: 0,
            retry_not_before_ms: 0,
            nodes: BTreeMap::new(),
            last_abort_reason: None,
            frozen_on: None,
            routers,
        });
        Applied::Started(id)
    }

    fn request_switch(&mut self) -> Applied {
        let upgrade = match self.active() {
            Ok(u) => u,
            Err(r) => return r,
        };
        if upgrade.phase != Phase::Syncing {
            return reject(
                RejectKind::WrongPhase,
                format!("switch needs phase Syncing, the upgrade is {:?}", upgrade.phase),
            );
        }
        if let Err(blockers) = ready_gate(upgrade) {
            return reject(
                RejectKind::NotReady,
                format!(
                    "not ready to switch: {}",
                    blockers.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
                ),
            );
        }
        upgrade.switch_requested = true;
        Applied::Accepted
    }

    fn freeze(&mut self, epoch: Epoch, now_ms: u64, deadline_ms: u64) -> Applied {
        let last_epoch = self.last_epoch;
        let upgrade = match self.active() {
            Ok(u) => u,
            Err(r) => return r,
        };
        if upgrade.phase != Phase::Syncing {
            return reject(
                RejectKind::WrongPhase,
                format!("freeze needs phase Syncing, the upgrade is {:?}", upgrade.phase),
            );
        }
        if epoch.0 != last_epoch.0 + 1 {
            return reject(
                RejectKind::WrongEpoch,
                format!("freeze epoch {epoch} is not the next epoch after {last_epoch}"),
            );
        }
        if upgrade.plan.switch == SwitchMode::Manual && !upgrade.switch_requested {
            return reject(RejectKind::ManualSwitch, "manual switch: waiting for the operator");
        }
        if now_ms < upgrade.retry_not_before_ms {
            return reject(RejectKind::Backoff, format!("retry backoff until {} ms", upgrade.retry_not_before_ms));
        }
        if deadline_ms <= now_ms {
            return reject(RejectKind::BadCommand, "freeze deadline is not after its proposal time");
        }
        if let Err(blockers) = ready_gate(upgrade) {
            return reject(
                RejectKind::NotReady,
                format!("ready gate: {}", blockers.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")),
            );
        }
        upgrade.frozen_on = Some(validation_seen(upgrade));
        upgrade.phase = Phase::Freezing;
        upgrade.epoch = epoch;
        upgrade.attempts += 1;
        upgrade.freeze_deadline_ms = deadline_ms;
        self.last_epoch = epoch;
        Applied::Accepted
    }

    fn ack(&mut self, node: &NodeName, epoch: Epoch, ack: &Ack) -> Applied {
        // Epochs grow across upgrades: the epoch names the upgrade.
        self.with_node(node, None, |u, state| {
            if epoch != u.epoch {
                return reject(RejectKind::WrongEpoch, format!("ack for {epoch} but the current epoch is {}", u.epoch));
            }
            // Which phase and which duty each ack needs.
            let (name, phase_ok, phase_needed, duty) = match ack {
                Ack::Frozen => ("Frozen", u.phase == Phase::Freezing, "Freezing", Duty::Route),
                Ack::Drained { .. } => ("Drained", u.phase == Phase::Freezing, "Freezing", Duty::Transform),
                Ack::Switched => {
                    ("Switched", matches!(u.phase, Phase::Switched | Phase::Done), "Switched", Duty::Route)
                }
                Ack::Retired => unreachable!("handled before"),
            };
            if !phase_ok {
                let detail = format!("{name} ack needs phase {phase_needed}, the upgrade is {:?}", u.phase);
                return reject(RejectKind::WrongPhase, detail);
            }
            let duties = u.duties_of(node).expect("checked by with_node");
            // A data node acks `Switched` too, once its new store is open to clients.
            let switching = *ack == Ack::Switched && duties.contains(&Duty::Transform);
            if !duties.contains(&duty) && !switching {
                return reject(RejectKind::WrongDuties, format!("`{node}` has no {duty:?} duty"));
            }
            match ack {
                Ack::Frozen => state.frozen = Some(epoch),
                // A data node may fence (and drain) once every router told it directly that it is
                // frozen, before their acks are applied here; the commit still needs them all.
                Ack::Drained { final_position, checksum_match } => {
                    state.drained = Some((epoch, *final_position, *checksum_match));
                }
                Ack::Switched => state.switched = Some(epoch),
                Ack::Retired => unreachable!("handled before"),
            }
            Applied::Accepted
        })
    }

    /// The upgrade if `epoch` may still be decided: not decided yet, and Freezing at it.
    fn undecided(&mut self, epoch: Epoch, verb: &str) -> Result<&mut Upgrade, Applied> {
        if let Some(outcome) = self.outcomes.get(&epoch) {
            return Err(reject(RejectKind::AlreadyDecided, format!("{epoch} is already decided: {outcome:?}")));
        }
        let upgrade = self.active()?;
        if upgrade.phase != Phase::Freezing || upgrade.epoch != epoch {
            return Err(reject(
                RejectKind::WrongPhase,
                format!(
                    "{verb} {epoch} needs phase Freezing at {epoch}, the upgrade is {:?} at {}",
                    upgrade.phase, upgrade.epoch
                ),
            ));
        }
        Ok(upgrade)
    }

    fn abort(&mut self, epoch: Epoch, reason: &str, now_ms: u64, by_operator: bool) -> Applied {
        let upgrade = match self.undecided(epoch, "abort") {
            Ok(u) => u,
            Err(r) => return r,
        };
        upgrade.last_abort_reason = Some(reason.to_string());
        upgrade.switch_requested = false;
        upgrade.retry_not_before_ms = now_ms.saturating_add(upgrade.plan.thresholds.retry_backoff_ms);
        upgrade.phase = if by_operator || upgrade.attempts >= upgrade.plan.max_attempts {
            Phase::RolledBack
        } else {
            Phase::Syncing
        };
        self.outcomes.insert(epoch, Outcome::Aborted { reason: reason.to_string() });
        Applied::Accepted
    }

    fn operator_abort(&mut self, reason: &str, now_ms: u64) -> Applied {
        let upgrade = match self.active() {
            Ok(u) => u,
            Err(r) => return r,
        };
        let reason = format!("operator: {reason}");
        match upgrade.phase {
            Phase::Freezing => {
                let epoch = upgrade.epoch;
                self.abort(epoch, &reason, now_ms, true)
            }
            Phase::Staged | Phase::Syncing => {
                upgrade.phase = Phase::RolledBack;
                upgrade.last_abort_reason = Some(reason);
                Applied::Accepted
            }
            Phase::Switched | Phase::Done | Phase::RolledBack => reject(
                RejectKind::AlreadyEnded,
                format!("the upgrade is already {:?}; the switch cannot be undone by abort", upgrade.phase),
            ),
        }
    }

    /// Transitions that follow from the state alone (no proposal needed).
    /// Starts a recovery (a state that has decided nothing), or adds to its lost nodes.
    fn recover(&mut self, expected: &[NodeName], lost: &[NodeName], abort_unknown_freeze: bool) -> Applied {
        if let Some(r) = self.recovery.as_mut() {
            r.lost.extend(lost.iter().cloned());
            r.abort_unknown_freeze |= abort_unknown_freeze;
            self.maybe_recovered();
            return Applied::Accepted;
        }
        if !self.pristine() {
            return reject(
                RejectKind::BadCommand,
                "this group has state of its own: only a group rebuilt from nothing recovers",
            );
        }
        if expected.is_empty() {
            return reject(RejectKind::BadCommand, "a recovery names the nodes whose disks it waits for");
        }
        self.awaiting_recovery = false;
        self.recovery = Some(Recovery {
            expected: expected.iter().cloned().collect(),
            lost: lost.iter().cloned().collect(),
            disks: BTreeMap::new(),
            known_upgrade: 0,
            abort_unknown_freeze,
        });
        self.maybe_recovered();
        Applied::Accepted
    }

    /// Once every expected node reported (or is lost): the cluster's state as its disks hold it.
    ///
    /// The newest decision any disk holds (by [`Decision::order_key`]) is the last one the old
    /// group decided that any node acted on. A commit or an abort stands. A freeze whose outcome
    /// no disk holds is aborted: no node acted on an outcome (every node persists a decision
    /// before it acts on it, and every node reported), so no client saw the new universe and no
    /// data node opened it. The version starts above every version a node saw, so no node takes
    /// the rebuilt group's views for stale ones, and its next upgrade id above every one a node
    /// saw (nodes tell upgrades apart by id); routers that reported are on the roster again
    /// (a retired one stays retired).
    fn maybe_recovered(&mut self) {
        let Some(r) = &self.recovery else { return };
        if r.blocked().is_some() {
            return;
        }
        let r = self.recovery.take().expect("checked");
        let disks: Vec<&DiskSummary> = r.disks.values().filter_map(|(_, _, d)| d.as_ref()).collect();
        let newest = r.newest();
        // A frozen record names the endpoints of the generation it froze (its base).
        let endpoints_of = |g: Generation| {
            disks
                .iter()
                .find(|d| {
                    d.decision.serving_generation(d.generation).unwrap_or(d.generation) == g && !d.endpoints.is_empty()
                })
                .map(|d| d.endpoints.clone())
        };
        if let Some(d) = newest {
            let epoch = d.decision.epoch();
            let (generation, outcome) = match d.decision {
                Decision::Commit(_) => (d.generation.next(), Some(Outcome::Committed)),
                Decision::Abort(_) => {
                    (d.generation, Some(Outcome::Aborted { reason: "recovered from the nodes' disks".into() }))
                }
                Decision::Freeze(_) => (
                    d.generation,
                    Some(Outcome::Aborted { reason: "recovered: no node's disk held this freeze's outcome".into() }),
                ),
                Decision::Initial | Decision::Retired => (d.generation, None),
            };
            self.generation = generation;
            self.last_epoch = epoch;
            if let Some(o) = outcome {
                self.outcomes.insert(epoch, o);
            }
            if let Some(e) = endpoints_of(generation) {
                self.universes.insert(generation, e);
            }
        }
        for (node, (duties, _, disk)) in &r.disks {
            if duties.contains(&Duty::Route) {
                let retired = disk.as_ref().is_some_and(|d| d.decision == Decision::Retired);
                self.roster.insert(node.clone(), if retired { RosterStatus::Retired } else { RosterStatus::Active });
            }
        }
        let seen = r.disks.values().map(|(_, v, _)| *v).max().unwrap_or(0);
        self.version = self.version.max(seen);
        self.upgrades_started = self.upgrades_started.max(r.known_upgrade);
    }

    fn advance(&mut self) {
        let Some(upgrade) = &mut self.current else { return };
        // The switch is decided by the state itself, in the step that applies the last ack it
        // needs (every router `Frozen`, every data node `Drained` with matching checksums): no
        // extra proposal round, and any later `Abort` of this epoch finds it decided.
        if upgrade.phase == Phase::Freezing
            && upgrade.missing_acks().is_empty()
            && upgrade.checksum_mismatch().is_none()
        {
            upgrade.phase = Phase::Switched;
            self.outcomes.insert(upgrade.epoch, Outcome::Committed);
            self.generation = upgrade.from.next();
            let serving = self.generation;
            self.universes.retain(|g, _| *g >= serving);
        }
        if upgrade.phase == Phase::Staged
            && upgrade.required().all(|n| upgrade.nodes.get(n).is_some_and(|s| s.registered && s.deployed))
        {
            upgrade.phase = Phase::Syncing;
        }
        // Done: every router serves the new universe, and every data node's new store takes
        // clients (a data node deployed for the next upgrade finds its old store open).
        let switched = |n: &NodeState| n.switched == Some(upgrade.epoch);
        if upgrade.phase == Phase::Switched
            && upgrade.all_routers(switched)
            && upgrade.plan.nodes_with(Duty::Transform).all(|n| upgrade.nodes.get(n).is_some_and(switched))
        {
            upgrade.phase = Phase::Done;
        }
    }

    /// A cluster whose roster starts with these routers (the cluster file's; every replica
    /// starts from the same state).
    pub fn with_roster(routers: impl IntoIterator<Item = NodeName>) -> UpgradeState {
        let roster = routers.into_iter().map(|r| (r, RosterStatus::Active)).collect();
        UpgradeState { roster, ..UpgradeState::default() }
    }
}

#[cfg(test)]
mod tests;
