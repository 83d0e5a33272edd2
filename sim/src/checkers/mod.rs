//! The simulator's checkers: one file per invariant, each a small state machine fed by the
//! world as events happen, and a typed [`Violation`] for every breach (tests match variants,
//! not text). The checkers judge from what the simulator itself saw, never from the verdict of
//! the code under test.
//!
//! - [`acks_counted`]: every ack the replicated state counts was sent by its node.
//! - [`decided_on_acks`]: a commit follows every `Frozen` and matching `Drained` sent; `Done`
//!   follows every `Switched` sent.
//! - [`attempts`]: at most `max_attempts` freezes; the driver rolls back only after all failed.
//! - [`agreement`]: no two nodes act on different outcomes of an epoch; none acts on an
//!   uncommitted decision; replicas agree on every outcome.
//! - [`single_universe`]: no request reaches the old universe after one reached the new one.
//! - [`durability`]: what a node persists never goes backwards; outcomes seen are kept.
//! - [`persist_first`]: a node acts on a decision only once its disk holds it.
//! - [`fenced_after_frozen`]: a data node fences its old store only after every router sent (by
//!   ack or frozen notice)
//!   `Frozen` for that freeze.
//! - [`opened_after_commit`]: a data node opens its new store to client writes only once its
//!   disk holds its upgrade's `Commit`.
//! - [`views`]: every view of one state version that a node is sent is the same.
//! - [`frozen_ack`]: a router acks `Frozen` only with nothing in flight to the old universe.
//! - [`bounded_hold`]: no request is held longer than `hold_ms_max`.
//! - [`hold_queue`]: no router holds more than `hold_queue_max` requests.
//! - [`isolation`]: a router that restarts on its own disk serves from it at once (it holds
//!   nothing for want of the coordinator).
//! - [`fidelity`]: every transform batch matches the old rows as of its checkpoint position.
//! - [`mirrors`]: a mirrored read's two answers agree at the same data position (compared by
//!   the simulator, not by the validator).
//! - [`verdicts`]: every validator verdict is the one the two answers deserve, and every
//!   report carries counts the validator really had.
//! - [`observed`]: what a node says about itself (the figures shells export as metrics, a
//!   store's own state, the reason for a 503, the cause of a hold) is what the simulator saw.
//! - [`reads`]: every read a client gets agrees with the writes acknowledged before it.
//! - [`lost_writes`]: at the end, acknowledged writes are present and failed ones absent.
//! - [`applied_once`]: the new store refuses a batch delivered again.
//! - [`change_log`]: applied changes are pruned from the old store's change log.
//! - [`exactly_once`]: at the end, everything captured was applied, and every counter counts
//!   each acknowledged increment once.
//! - [`gate`]: when a freeze is applied, the stores meet the ready gate's preconditions.
//! - [`availability`]: a freeze is decided in bounded time under a stable leader; every shard
//!   takes writes at the end.
//! - [`propagation`]: a node that can reach a stable leader acts on the current decision in
//!   bounded time.
//! - [`liveness`]: the upgrade ends.
//! - [`healthy_freeze`]: a freeze started after every fault healed commits.
//! - [`roster`]: a router serves clients only while on the roster (joined, not retired).
//!
//! `ending.rs` runs the end-of-run checks on the world's final state.

pub mod acks_counted;
pub mod agreement;
pub mod applied_once;
pub mod attempts;
pub mod availability;
pub mod bounded_hold;
pub mod change_log;
pub mod decided_on_acks;
pub mod durability;
pub mod exactly_once;
pub mod fenced_after_frozen;
pub mod fidelity;
pub mod frozen_ack;
pub mod gate;
pub mod healthy_freeze;
pub mod hold_queue;
pub mod isolation;
pub mod liveness;
pub mod lost_writes;
pub mod mirrors;
pub mod observed;
pub mod opened_after_commit;
pub mod persist_first;
pub mod propagation;
pub mod reads;
pub mod roster;
pub mod single_universe;
pub mod verdicts;
pub mod views;

use protocol::messages::{GateBlocker, Phase};
use protocol::{Decision, Epoch, Position};
use std::fmt;

/// Where an admission was observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdmissionPoint {
    /// A router forwarded a client request.
    Router,
    /// A data node executed a client request.
    Store,
}

/// A breach of an invariant (or of the harness itself).
#[derive(Clone, Debug, PartialEq)]
pub enum Violation {
    /// Agreement: a node acted on a decision no replica has applied.
    ActedUncommitted { node: String, decision: Decision },
    /// Roster: a router answered a client from a universe while off the roster.
    ServedOffRoster { router: String, why: String },
    /// Agreement: two nodes acted on different outcomes of one epoch.
    ConflictingOutcomes { node: String, decision: Decision, other_node: String, other: Decision },
    /// Acks counted were sent: a replica's state counts an ack its node never sent.
    AckNeverSent { replica: u64, node: String, epoch: Epoch, ack: String },
    /// Decided on acks seen: a commit or `Done` without the acks it needs having been sent.
    DecidedWithoutAcks { epoch: Epoch, decision: String, missing: Vec<String> },
    /// Attempts: more freezes than `max_attempts`, or a rollback before they were used up.
    Attempts { what: String },
    /// A command that is bad whenever it is applied (proposed by a confused leader) was accepted.
    BadCommandAccepted { what: String },
    /// Agreement: two replicas applied different outcomes of one epoch.
    ReplicasDisagree { replica: u64, epoch: Epoch, committed: bool },
    /// Single universe: a request reached the old universe after one reached the new one.
    MixedUniverses {
        point: AdmissionPoint,
        node: String,
        request: u64,
        generation: protocol::Generation,
        newer: protocol::Generation,
        first_newer_by: String,
        first_newer_at_us: u64,
    },
    /// Durability: a node persisted a decision ordered before one it had persisted.
    EpochWentBackwards { node: String, from: Decision, to: Decision },
    /// Persist before act: a node acted on a decision its disk did not hold yet.
    ActedBeforePersisted { node: String, decision: Decision, on_disk: Decision },
    /// Quiet before Frozen: a router acked `Frozen` with requests to the old universe in flight.
    FrozenWithInFlight { router: String, epoch: Epoch, in_flight: usize },
    /// Durability: an outcome seen applied is missing from the final state.
    OutcomeLost { epoch: Epoch, committed: bool, kept: Option<bool> },
    /// Bounded hold: a request was (or still is) held longer than the bound.
    HoldTooLong { router: String, held_ms: u64, bound_ms: u64, released: bool },
    /// Bounded hold queue: a router held more requests than `hold_queue_max`.
    HoldQueueOverflow { router: String, held: usize, limit: usize },
    /// No lost writes: acknowledged writes are missing from the universe that serves.
    LostWrites { generation: protocol::Generation, users: Vec<i64> },
    /// No phantom writes: a write the client was told failed is present.
    PhantomWrite { what: String },
    /// No lost writes: a data node acked `Drained(P)` without everything up to P, or claiming
    /// universes match when they differ (or the reverse).
    DrainedIncomplete { node: String, final_position: Position, applied: Position, claimed: bool, real: bool },
    /// No lost writes: the universes differ after a drain although nothing wrote to the new
    /// database behind the transform.
    ChecksumsDiffer { node: String, final_position: Position },
    /// Validation by range: a data node compared a range of old keys at matching positions
    /// and found the universes different, although nothing wrote to the new database behind
    /// the transform.
    RangeDiffers { node: String, rows: u64 },
    /// Abandon after rollback: a data node gave up its copy and removed the old store's
    /// capture for an upgrade not rolled back (`why`).
    AbandonedUnended { node: String, upgrade: u64, why: String },
    /// Abandon after rollback: a transform ran again for an upgrade its data node abandoned.
    AbandonedResumed { node: String, checkpoint: String },
    /// Fence after frozen: a data node fenced its old store before every router sent `Frozen`.
    FencedEarly { node: String, decision: Decision, missing: Vec<String> },
    /// Opened after commit: a data node opened its new store to client writes without its
    /// upgrade's `Commit` on disk.
    OpenedEarly { node: String, decision: Decision },
    /// One view per version: a node was sent two different views of one state version.
    ViewVersionReused { node: String, version: u64, first: String, second: String },
    /// Checksums: a data node's comparison of the universes says the opposite of what they hold.
    ChecksumVerdictWrong { node: String, final_position: Position, claimed: bool },
    /// Validation: a validator's verdict on two answers is not the verdict they deserve.
    WrongVerdict { router: String, expected: String, got: String, old: String, new: String },
    /// Validation: a router reported counts its validator never had (samples invented, or
    /// mismatches dropped).
    ValidationMiscounted { router: String, samples: u64, mismatches: u64, seen: String },
    /// Exactly once: captured and applied positions differ at the end.
    NotExactlyOnce { node: String, captured: Position, applied: Position },
    /// Applied once: the new store accepted a batch not built on its checkpoint (delivered again).
    AppliedTwice { node: String, base: String, found: String },
    /// Bounded change log: the old store keeps applied changes beyond the limit.
    ChangeLogUnbounded { node: String, kept: u64, bound: u64 },
    /// Exactly once: an item's bid counter at the end is not the bids acknowledged (at
    /// least) and not failed (at most).
    BidsMiscounted { item: i64, counted: i64, acked: i64, possible: i64 },
    /// Fidelity: a transform batch wrote a row that is not the old row as of its checkpoint.
    TransformFidelity { node: String, what: String },
    /// The transform refused the stream or a row.
    TransformFailed { node: String, error: String },
    /// Reads: a client read missed a write acknowledged before it was issued.
    StaleRead { router: String, what: String },
    /// Reads: a client read returned something no client wrote (or a write reported failed,
    /// or an increment counted twice).
    WrongAnswer { router: String, what: String },
    /// Validation: a mirrored answer differs from the old universe's at the same position.
    MirrorMismatch { router: String, request: u64, position: Position, old: String, new: String },
    /// Gate: a freeze was applied although the stores did not meet the gate's preconditions.
    GateNotMet { epoch: Epoch, what: String },
    /// Availability: a freeze stayed undecided too long under a stable leader.
    FreezeUndecided { epoch: Epoch, waited_ms: u64, bound_ms: u64 },
    /// Propagation: a node in good conditions stayed behind the current decision too long.
    NotPropagated { node: String, decision: Decision, acted: Option<Decision>, waited_ms: u64 },
    /// Availability: a shard refused a write at the end.
    NotWritable { shard: usize, outcome: String },
    /// Liveness: a freeze started after the faults healed was aborted (not by the operator).
    HealthyFreezeAborted { epoch: Epoch, reason: String },
    /// Liveness: the upgrade did not settle within the bound after faults healed.
    NotSettled {
        bound_ms: u64,
        phase: Option<Phase>,
        last_abort: Option<String>,
        blockers: Vec<GateBlocker>,
        routers: Vec<String>,
    },
    /// Liveness: the upgrade ended in a phase that is not an end.
    EndedInPhase { phase: Phase },
    /// Liveness: the upgrade never started.
    NeverStarted,
    /// Isolation: a router that restarted on its own disk held a request for want of a first read.
    HeldAtStartupWithDisk { router: String, held_ms: u64 },
    /// Observed: a node's or a store's account of itself differs from what the simulator saw.
    Misreported { node: String, what: &'static str, reported: String, seen: String },
    /// Validation: a router mirrored a read while serving the new universe.
    MirroredAfterSwitch { router: String, request: u64 },
    /// Durability: a boot record that does not count one more boot than the disk held.
    BootMiscounted { node: String, on_disk: u64, written: u64 },
    /// Single universe: a request for one generation sent to another generation's endpoint.
    WrongEndpoint { router: String, generation: u64, endpoint: String },
    /// The harness failed (a replica did not start, the cluster did not initialize).
    Setup { what: String },
    /// A task panicked.
    Panic { what: String },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Violation::*;
        match self {
            ActedUncommitted { node, decision } => {
                write!(f, "agreement: {node} acted on {decision:?}, which no replica has applied")
            }
            ServedOffRoster { router, why } => write!(f, "roster: {router} answered a client though {why}"),
            ConflictingOutcomes { node, decision, other_node, other } => {
                write!(f, "agreement: {node} acted on {decision:?} but {other_node} acted on {other:?}")
            }
            AckNeverSent { replica, node, epoch, ack } => {
                write!(f, "acks counted: replica {replica} counts {ack} of {epoch} for {node}, which {node} never sent")
            }
            DecidedWithoutAcks { epoch, decision, missing } => {
                write!(f, "decided on acks: {decision} of {epoch} applied without {missing:?} sent")
            }
            Attempts { what } => write!(f, "attempts: {what}"),
            BadCommandAccepted { what } => write!(f, "state machine: a confused leader's {what}"),
            ReplicasDisagree { replica, epoch, committed } => {
                write!(f, "agreement: replica {replica} applied {epoch} as committed={committed}, another did not")
            }
            MixedUniverses { point, node, request, generation, newer, first_newer_by, first_newer_at_us } => write!(
                f,
                "single universe ({point:?}): {node} admitted request {request} to generation {generation} after {first_newer_by} admitted to {newer} at {:.3}s",
                *first_newer_at_us as f64 / 1e6
            ),
            EpochWentBackwards { node, from, to } => {
                write!(f, "durability: {node} persisted {to:?} after {from:?} (epoch went backwards)")
            }
            ActedBeforePersisted { node, decision, on_disk } => {
                write!(f, "persist before act: {node} acted on {decision:?} while its disk held {on_disk:?}")
            }
            FrozenWithInFlight { router, epoch, in_flight } => write!(
                f,
                "quiet before frozen: {router} acked Frozen({epoch}) with {in_flight} request(s) to the old universe in flight"
            ),
            OutcomeLost { epoch, committed, kept } => write!(
                f,
                "durability: outcome of {epoch} (committed={committed}) missing from the final state ({kept:?})"
            ),
            HoldTooLong { router, held_ms, bound_ms, released } => {
                let what = if *released { "held a request" } else { "still holds a request after" };
                write!(f, "bounded hold: {router} {what} {held_ms} ms > {bound_ms} ms")
            }
            HoldQueueOverflow { router, held, limit } => {
                write!(f, "bounded hold queue: {router} holds {held} requests > {limit}")
            }
            LostWrites { generation, users } => write!(
                f,
                "no lost writes: acknowledged registrations missing from generation {generation}: {:?}",
                &users[..users.len().min(10)]
            ),
            PhantomWrite { what } => write!(f, "no phantom writes: {what}"),
            DrainedIncomplete { node, final_position, applied, claimed, real } => write!(
                f,
                "no lost writes: {node} acked Drained({}) with {} applied, saying the universes {} when they {}",
                final_position.0,
                applied.0,
                if *claimed { "match" } else { "differ" },
                if *real { "match" } else { "differ" }
            ),
            ChecksumVerdictWrong { node, final_position, claimed } => write!(
                f,
                "checksums: {node} found the universes {} at {} when they {}",
                if *claimed { "matching" } else { "different" },
                final_position.0,
                if *claimed { "differ" } else { "match" }
            ),
            FencedEarly { node, decision, missing } => write!(
                f,
                "fence after frozen: {node} fenced its old store with {decision:?} on disk, before {missing:?} sent Frozen"
            ),
            OpenedEarly { node, decision } => {
                write!(f, "opened after commit: {node} opened its new store to clients with {decision:?} on disk")
            }
            ViewVersionReused { node, version, first, second } => {
                write!(f, "one view per version: {node} was sent {first} and then {second} for version {version}")
            }
            HeldAtStartupWithDisk { router, held_ms } => write!(
                f,
                "isolation: {router} restarted on its own disk and still held a request {held_ms} ms for the coordinator"
            ),
            Misreported { node, what, reported, seen } => {
                write!(f, "observed: {node} reports {what} {reported}, the simulator saw {seen}")
            }
            MirroredAfterSwitch { router, request } => {
                write!(f, "validation: {router} mirrored request {request} while not serving the upgrade's old universe, or not to its new one")
            }
            WrongEndpoint { router, generation, endpoint } => {
                write!(f, "single universe: {router} sent a request for generation {generation} to {endpoint}")
            }
            BootMiscounted { node, on_disk, written } => {
                write!(f, "durability: {node} wrote boot count {written} over {on_disk} (one more boot expected)")
            }
            WrongVerdict { router, expected, got, old, new } => {
                write!(f, "validation: {router} called {old} vs {new} {got}, not {expected}")
            }
            ValidationMiscounted { router, samples, mismatches, seen } => write!(
                f,
                "validation: {router} reported {mismatches} mismatches in {samples} samples, but its validator saw {seen}"
            ),
            AbandonedResumed { node, checkpoint } => write!(
                f,
                "abandon after rollback: {node} abandoned its upgrade, but its new store's checkpoint is {checkpoint}"
            ),
            AbandonedUnended { node, upgrade, why } => write!(
                f,
                "abandon after rollback: {node} abandoned upgrade {upgrade}, which was not rolled back ({why})"
            ),
            RangeDiffers { node, rows } => write!(
                f,
                "validation by range: {node} found transform(old) and new different in a range of {rows} old rows, with no rogue writer"
            ),
            ChecksumsDiffer { node, final_position } => write!(
                f,
                "no lost writes: {node} checksums differ after applying up to the final position {}",
                final_position.0
            ),
            NotExactlyOnce { node, captured, applied } => {
                write!(f, "exactly once: {node} captured {} changes but applied {}", captured.0, applied.0)
            }
            AppliedTwice { node, base, found } => {
                write!(f, "applied once: {node} accepted a batch based on {base} while its checkpoint was {found}")
            }
            ChangeLogUnbounded { node, kept, bound } => {
                write!(f, "bounded change log: {node} keeps {kept} changes > {bound}")
            }
            BidsMiscounted { item, counted, acked, possible } => write!(
                f,
                "exactly once: item {item} counts {counted} bids; {acked} were acknowledged and {possible} not failed"
            ),
            TransformFidelity { node, what } => write!(f, "transform fidelity: {node}: {what}"),
            TransformFailed { node, error } => write!(f, "transform on {node} failed: {error}"),
            StaleRead { router, what } => write!(f, "reads: a read through {router} is stale: {what}"),
            WrongAnswer { router, what } => write!(f, "reads: a read through {router} is wrong: {what}"),
            MirrorMismatch { router, request, position, old, new } => write!(
                f,
                "validate: {router} request {request} differs at position {}: old {old} new {new}",
                position.0
            ),
            GateNotMet { epoch, what } => write!(f, "ready gate: {epoch} froze although {what}"),
            FreezeUndecided { epoch, waited_ms, bound_ms } => write!(
                f,
                "availability: {epoch} stayed undecided {waited_ms} ms under a stable leader (bound {bound_ms} ms)"
            ),
            NotPropagated { node, decision, acted, waited_ms } => write!(
                f,
                "propagation: {node} still acts on {acted:?}, {waited_ms} ms after {decision:?} (reachable, stable leader)"
            ),
            NotWritable { shard, outcome } => {
                write!(f, "availability: shard {shard} refused a write at the end ({outcome})")
            }
            HealthyFreezeAborted { epoch, reason } => {
                write!(f, "liveness: {epoch} froze after the faults healed but was aborted: {reason}")
            }
            NotSettled { bound_ms, phase, last_abort, blockers, routers } => {
                let blockers: Vec<String> = blockers.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "liveness: not settled {bound_ms} ms after faults healed (phase {phase:?}, last abort {last_abort:?}, gate blockers {blockers:?}, routers {routers:?})"
                )
            }
            EndedInPhase { phase } => write!(f, "liveness: upgrade ended in phase {phase:?}"),
            NeverStarted => write!(f, "liveness: the upgrade never started"),
            Setup { what } => write!(f, "setup: {what}"),
            Panic { what } => write!(f, "panic: {what}"),
        }
    }
}

/// A violation and when (virtual µs) it was seen.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    pub at_us: u64,
    pub violation: Violation,
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t={:.3}s {}", self.at_us as f64 / 1e6, self.violation)
    }
}

/// Most violations kept per seed (the first ones say what went wrong).
pub const VIOLATIONS_KEPT_MAX: usize = 100;

/// The checkers of one run.
#[derive(Debug)]
pub struct Checker {
    pub violations: Vec<Seen>,
    pub agreement: agreement::Agreement,
    pub single_universe: single_universe::SingleUniverse,
    pub durability: durability::Durability,
    pub bounded_hold: bounded_hold::BoundedHold,
    pub mirrors: mirrors::Mirrors,
    pub verdicts: verdicts::Verdicts,
    pub views: views::Views,
    pub frozen_ack: frozen_ack::FrozenAck,
    pub acks_counted: acks_counted::AcksCounted,
    pub decided_on_acks: decided_on_acks::DecidedOnAcks,
    pub freeze_watch: availability::FreezeWatch,
    pub propagation: propagation::Propagation,
    /// Epochs first seen freezing after the faults healed.
    pub frozen_healthy: std::collections::BTreeSet<Epoch>,
    /// Epochs whose freeze was checked against the gate's preconditions.
    pub gate_checked: std::collections::BTreeSet<Epoch>,
}

impl Checker {
    pub fn new(hold_bound_ms: u64) -> Self {
        Checker {
            violations: Vec::new(),
            agreement: Default::default(),
            single_universe: Default::default(),
            durability: Default::default(),
            bounded_hold: bounded_hold::BoundedHold::new(hold_bound_ms),
            mirrors: Default::default(),
            verdicts: Default::default(),
            views: Default::default(),
            frozen_ack: Default::default(),
            acks_counted: Default::default(),
            decided_on_acks: Default::default(),
            freeze_watch: Default::default(),
            propagation: Default::default(),
            gate_checked: Default::default(),
            frozen_healthy: Default::default(),
        }
    }

    pub fn violation(&mut self, at_us: u64, violation: Violation) {
        if self.violations.len() < VIOLATIONS_KEPT_MAX {
            self.violations.push(Seen { at_us, violation });
        }
    }

    /// Records what a checker found, if anything.
    pub fn found(&mut self, at_us: u64, found: Option<Violation>) {
        if let Some(v) = found {
            self.violation(at_us, v);
        }
    }
}
