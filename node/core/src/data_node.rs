//! The data-node composition core: a data node's agent, capture, transform, validate and drain
//! duties as one sans-I/O state machine.
//!
//! It takes every decision of a data node: which client requests each universe admits (the
//! fences), the idempotency of requests by key, when to read the old store and what, what to
//! write to the new store with which checkpoint, how a crashed copy recovers (from a fresh
//! snapshot: see [`crate::duties::transform`]), when to fence and unfence, the comparison of
//! transform(old) with new at the final position, and which decision the drain acts on (only
//! one that is persisted). The shell performs each [`StoreOp`] on the stores and feeds the
//! [`StoreResult`] back.
//!
//! Driving rules: `now_ms` never decreases (asserted); outputs are applied in order; at most
//! one store operation is outstanding (the core asks for the next one only once the last one's
//! result is in; a result that answers no outstanding operation is a shell bug, asserted);
//! [`DataOutput::Persist`] is durable before
//! [`DataInput::Persisted`] is fed back; the shell calls [`DataInput::Timer`] no later than
//! [`DataNodeCore::next_deadline_ms`].

use crate::agent::{AgentConfig, AgentCore, AgentInput, AgentOutput};
use crate::duties::drain::{DrainCore, DrainInput, DrainOutput};
use crate::duties::progress::Progress;
use crate::duties::ranges::{Outcome, Ranges, Span};
use crate::duties::transform::{Batch, Checkpoint, CopyState, Positions, TransformCore, TransformError, Work};
use crate::store::{ChangeRead, Chunk, NewStore, OldStore, RowCursor, SnapshotId, StaleBatch, StoreError, StoredRow};
use crate::{Durable, NodeRecord, RequestKey, StoreAnswer};
use protocol::messages::{Ack, NodeReport, NodeRequest, NodeResponse, Pace, Phase};
use protocol::schema::RowOp;
use protocol::{Decision, Epoch, Generation, NodeName, Position, ReplicaId, Universe, UpgradeId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A planted transform bug shows only after a restart (simulator only).
#[cfg(feature = "planted-bugs")]
fn planted_after_restart(
    transform: TransformCore,
    bug: Option<crate::duties::transform::TransformBug>,
    boots: u64,
) -> TransformCore {
    if boots > 0 {
        transform.with_bug(bug)
    } else {
        transform
    }
}

/// Rows per read while comparing both universes at the final position.
pub const COMPARE_CHUNK_ROWS: usize = 500;

/// Most old rows per range compared while traffic runs, in a real node (see
/// [`crate::duties::ranges`]): small enough that a busy table leaves most ranges unchanged
/// between their comparison and the drain, large enough that a comparison is worth its round
/// trips.
pub const RANGE_ROWS_DEFAULT: usize = 1_000;

/// Data-node settings.
#[derive(Clone, Debug)]
pub struct DataNodeConfig {
    pub agent: AgentConfig,
    /// Pause between two transform steps (a rate limit on the copy and the stream).
    pub transform_interval_ms: u64,
    /// Pause between two reads of the change stream while it is idle (the last read found
    /// nothing and no write was seen through this node since).
    pub transform_idle_ms: u64,
    /// Most request answers remembered for idempotency (oldest forgotten first).
    pub answers_max: usize,
    /// Most applied changes the old store's change log keeps before the core prunes them.
    pub change_log_applied_max: u64,
    /// Pause before a store operation that failed ([`StoreResult::Failed`]) is tried again.
    pub store_retry_ms: u64,
    /// How the old store numbers its changes.
    pub positions: Positions,
    /// Most rows per second the bulk copy reads (the plan's `[copy] rows_per_s_max`): a chunk
    /// of `n` rows is followed by a pause of at least `n / rate` seconds.
    pub copy_rows_per_s_max: Option<u64>,
    /// Rows per chunk of the bulk copy (each chunk one batch of the new store).
    pub copy_chunk_rows: usize,
    /// Old rows per chunk the drain's comparison reads and stages ([`COMPARE_CHUNK_ROWS`]
    /// in the simulator; a real node takes its copy's chunk).
    pub compare_chunk_rows: usize,
    /// Most old rows per range compared while traffic runs ([`crate::duties::ranges`]), if
    /// the plan's rows can be compared by range
    /// ([`protocol::schema::Mapping::rows_stand_alone`]); `None`: compared at the drain only.
    pub range_rows: Option<usize>,
    /// Least pause between two comparisons of ranges once each was compared (those that
    /// changed since are compared again): besides it, the old store is read by comparisons at
    /// most half the time, and within [`DataNodeConfig::copy_rows_per_s_max`].
    pub range_again_ms: u64,
}

/// A store operation for the shell (see [`crate::store`]); its result comes back as
/// [`DataInput::Store`].
#[derive(Clone, Debug, PartialEq)]
pub enum StoreOp {
    /// Old store: [`crate::store::OldStore::open_snapshot`] → [`StoreResult::SnapshotOpened`].
    OpenSnapshot,
    /// Old store: a snapshot chunk → [`StoreResult::Chunk`] or [`StoreResult::SnapshotGone`].
    ReadSnapshot { snapshot: SnapshotId, after: RowCursor, limit: usize },
    /// Old store: captured changes → [`StoreResult::Changes`].
    ReadChanges { after: Position, limit: usize },
    /// New store: apply atomically, on top of the batch's base → [`StoreResult::Applied`] or
    /// [`StoreResult::ApplyRefused`].
    Apply(Batch),
    /// Old store: fence → [`StoreResult::Fenced`].
    Fence,
    /// Old store: unfence → [`StoreResult::Unfenced`].
    Unfence,
    /// Old store: current rows, for the comparison → [`StoreResult::Rows`].
    ReadRows { after: RowCursor, limit: usize },
    /// Old store: current rows while writes go on, with the positions they show →
    /// [`StoreResult::RowsToCompare`] (see [`crate::store::OldStore::rows_to_compare`]).
    ReadRowsToCompare { after: RowCursor, limit: usize },
    /// Old store: forget captured changes up to `up_to` → [`StoreResult::Pruned`].
    Prune { up_to: Position },
    /// New store: convert old rows into a scratch copy beside the new tables (emptied first if
    /// `first`) → [`StoreResult::Staged`].
    Stage { rows: Vec<StoredRow>, first: bool },
    /// New store: the checksums of the scratch copy and of the new tables →
    /// [`StoreResult::Compared`].
    CompareStaged,
    /// New store: the checksums of the scratch copy and of the new rows with its keys, and
    /// each table's row counts → [`StoreResult::KeysCompared`].
    CompareStagedKeys,
    /// New store: its checkpoint → [`StoreResult::Checkpoint`] (after an apply whose outcome
    /// is unknown).
    ReadCheckpoint,
    /// New store: the switch committed, open it to client writes →
    /// [`StoreResult::OpenedToClients`].
    OpenNew,
    /// Old store: the switch committed (or the upgrade was rolled back and abandoned), remove
    /// capture → [`StoreResult::CaptureRemoved`].
    RemoveCapture,
    /// New store: drained, hold writers until the outcome → [`StoreResult::WritersHeld`].
    HoldWriters,
    /// New store: the freeze aborted, release held writers → [`StoreResult::WritersReleased`].
    ReleaseWriters,
}

impl StoreOp {
    /// The operation's name, without its data (for logs).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreOp::OpenSnapshot => "OpenSnapshot",
            StoreOp::ReadSnapshot { .. } => "ReadSnapshot",
            StoreOp::ReadChanges { .. } => "ReadChanges",
            StoreOp::Apply(_) => "Apply",
            StoreOp::Fence => "Fence",
            StoreOp::Unfence => "Unfence",
            StoreOp::ReadRows { .. } => "ReadRows",
            StoreOp::ReadRowsToCompare { .. } => "ReadRowsToCompare",
            StoreOp::Prune { .. } => "Prune",
            StoreOp::Stage { .. } => "Stage",
            StoreOp::CompareStaged => "CompareStaged",
            StoreOp::CompareStagedKeys => "CompareStagedKeys",
            StoreOp::ReadCheckpoint => "ReadCheckpoint",
            StoreOp::OpenNew => "OpenNew",
            StoreOp::RemoveCapture => "RemoveCapture",
            StoreOp::HoldWriters => "HoldWriters",
            StoreOp::ReleaseWriters => "ReleaseWriters",
        }
    }
}

/// The result of a [`StoreOp`].
#[derive(Clone, Debug, PartialEq)]
pub enum StoreResult {
    SnapshotOpened {
        snapshot: SnapshotId,
        at: Position,
        /// Rows the snapshot holds (0: not known).
        rows: u64,
    },
    Chunk(Chunk),
    SnapshotGone,
    Changes(ChangeRead),
    /// The change stream cannot go on row by row (a `TRUNCATE`): the copy starts again.
    CopyAgain {
        reason: String,
    },
    Applied,
    /// The new store refused the batch (its checkpoint is not the batch's base).
    ApplyRefused(StaleBatch),
    Fenced {
        final_position: Position,
    },
    Unfenced,
    Rows(Chunk),
    /// Rows read while writes go on: the chunk's position is one every change at or before
    /// which they show; `through` one every change they show is at or before.
    RowsToCompare {
        chunk: Chunk,
        through: Position,
    },
    /// Old rows staged; how many could not be converted.
    Staged {
        rejected: u64,
    },
    /// transform(old) as staged, and the new tables.
    Compared {
        expected: u64,
        actual: u64,
    },
    /// transform(old) as staged, and the new tables' rows of the same keys, with row counts.
    KeysCompared(crate::store::KeysCompared),
    Pruned,
    Checkpoint(Checkpoint),
    OpenedToClients,
    CaptureRemoved,
    WritersHeld,
    WritersReleased,
    /// The store could not perform the operation (busy, an I/O error): the core tries it
    /// again after [`DataNodeConfig::store_retry_ms`]. For an apply, whether it committed is
    /// unknown: the core reads the new store's checkpoint before it goes on.
    Failed {
        reason: String,
    },
}

/// Performs one store operation through the data-store interface, as a shell does: the
/// result to feed back as [`DataInput::Store`]. A store's failure becomes
/// [`StoreResult::Failed`] (a snapshot that is gone, [`StoreResult::SnapshotGone`]).
pub fn perform(old: &mut impl OldStore, new: &mut impl NewStore, op: StoreOp) -> StoreResult {
    let failed = |e: StoreError| match e {
        StoreError::SnapshotGone(_) => StoreResult::SnapshotGone,
        StoreError::CopyAgain(reason) => StoreResult::CopyAgain { reason },
        e => StoreResult::Failed { reason: e.to_string() },
    };
    let done = match op {
        StoreOp::OpenSnapshot => old.open_snapshot().and_then(|(snapshot, at)| {
            let rows = old.snapshot_rows(snapshot)?;
            Ok(StoreResult::SnapshotOpened { snapshot, at, rows })
        }),
        StoreOp::ReadSnapshot { snapshot, after, limit } => {
            old.snapshot_chunk(snapshot, &after, limit).map(StoreResult::Chunk)
        }
        StoreOp::ReadChanges { after, limit } => old.changes_after(after, limit).map(StoreResult::Changes),
        StoreOp::Apply(batch) => new.apply_batch(&batch).map(|applied| match applied {
            Ok(()) => StoreResult::Applied,
            Err(stale) => StoreResult::ApplyRefused(stale),
        }),
        StoreOp::Fence => old.fence().map(|final_position| StoreResult::Fenced { final_position }),
        StoreOp::Unfence => old.unfence().map(|()| StoreResult::Unfenced),
        StoreOp::ReadRows { after, limit } => old.rows_chunk(&after, limit).map(StoreResult::Rows),
        StoreOp::ReadRowsToCompare { after, limit } => {
            old.rows_to_compare(&after, limit).map(|(chunk, through)| StoreResult::RowsToCompare { chunk, through })
        }
        StoreOp::Prune { up_to } => old.prune(up_to).map(|()| StoreResult::Pruned),
        StoreOp::Stage { rows, first } => new.stage(&rows, first).map(|rejected| StoreResult::Staged { rejected }),
        StoreOp::CompareStaged => {
            new.compare_staged().map(|(expected, actual)| StoreResult::Compared { expected, actual })
        }
        StoreOp::CompareStagedKeys => new.compare_staged_keys().map(StoreResult::KeysCompared),
        StoreOp::ReadCheckpoint => new.checkpoint().map(StoreResult::Checkpoint),
        // The old store is fenced for good by now: its sequences are final.
        StoreOp::OpenNew => {
            old.sequences().and_then(|sequences| new.open_to_clients(&sequences)).map(|()| StoreResult::OpenedToClients)
        }
        StoreOp::RemoveCapture => old.remove_capture().map(|()| StoreResult::CaptureRemoved),
        StoreOp::HoldWriters => new.hold_writers().map(|()| StoreResult::WritersHeld),
        StoreOp::ReleaseWriters => new.release_writers().map(|()| StoreResult::WritersReleased),
    };
    done.unwrap_or_else(failed)
}

/// Inputs to the data-node core.
#[derive(Clone, Debug, PartialEq)]
pub enum DataInput {
    /// The process (re)started: its disk record, the checkpoint stored in the new store, and
    /// whether the old store is fenced.
    Boot { record: NodeRecord, checkpoint: Checkpoint, old_fenced: bool },
    /// A client request for `generation`'s universe (a copy for validation if `mirror`),
    /// keyed for idempotency by `key`. This node holds two generations, the old and the new
    /// universe of the upgrade it is deployed for; a request for any other is refused.
    Request { key: RequestKey, generation: Generation, mirror: bool, read_only: bool },
    /// The universe answered a request the core let through ([`DataOutput::Execute`]).
    Executed { key: RequestKey, universe: Universe, mirror: bool, answer: StoreAnswer },
    /// A coordinator replica answered request `id` of the agent.
    Coordinator { id: u64, response: NodeResponse },
    /// The record asked for by [`DataOutput::Persist`] is durable.
    Persisted(NodeRecord),
    /// The outstanding [`StoreOp`] finished.
    Store(StoreResult),
    /// The deadline given by [`DataNodeCore::next_deadline_ms`] has come.
    Timer,
    /// Router `router` says it is frozen for `epoch` (its notice, sent with its `Frozen` ack).
    RouterFrozen { router: NodeName, epoch: Epoch },
}

/// Most routers' frozen notices a data node keeps (for one epoch at a time).
pub const FROZEN_NOTICES_MAX: usize = 10_000;

/// Most requests for the new universe that wait for its store to open (drained, the commit
/// not yet acted on or the store not yet open); more are kept out at once.
pub const AWAITING_OPEN_MAX: usize = 10_000;

/// What the shell must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum DataOutput {
    /// Run request `key` on `universe`'s store and answer [`DataInput::Executed`].
    Execute { key: RequestKey, universe: Universe, mirror: bool },
    /// Answer request `key` (every [`DataInput::Request`] gets exactly one reply, in order
    /// per key and `mirror`).
    Reply { key: RequestKey, mirror: bool, answer: StoreAnswer },
    /// Send a request to a coordinator replica; give up at `deadline_ms` (the core does too).
    Send { id: u64, replica: ReplicaId, request: NodeRequest, deadline_ms: u64 },
    /// Write the record to disk, then answer [`DataInput::Persisted`].
    Persist(NodeRecord),
    /// Perform this store operation and answer [`DataInput::Store`].
    Store(StoreOp),
    /// For metrics and checkers only.
    Event(DataEvent),
}

/// What happened, for metrics and checkers.
#[derive(Clone, Debug, PartialEq)]
pub enum DataEvent {
    /// The node acted on a (persisted) decision.
    Acted(Decision),
    /// A client request ran on `universe` (mirrors excluded).
    Admitted { key: RequestKey, universe: Universe },
    /// The bulk copy (re)started from a fresh snapshot holding this many rows (0: not known).
    CopyStarted { rows_in_snapshot: u64 },
    /// A chunk of the bulk copy was applied and the copy goes on.
    Copying,
    /// The bulk copy's last batch was applied: this incarnation copied `copied_rows` rows.
    CopyDone { copied_rows: u64 },
    /// The change stream held what cannot be applied row by row: the copy starts again.
    CopyAgain { reason: String },
    /// The old store was fenced at `final_position`.
    Fenced { final_position: Position },
    /// The comparison of transform(old) with new at the final position.
    Compared { final_position: Position, matched: bool },
    /// A range of old keys compared while traffic runs (`rows` old rows): `Some(matched)`, or
    /// `None` when its rows changed meanwhile (it is compared again, or at the drain).
    RangeCompared { rows: u64, matched: Option<bool> },
    /// The drain acked: everything up to `final_position` is applied.
    Drained { epoch: Epoch, final_position: Position, checksum_match: bool },
    /// The transform refused the change stream (a gap) or a row (a conversion error).
    TransformFailed(TransformError),
    /// A store operation failed; it is tried again.
    StoreFailed { reason: String },
    /// The upgrade this node transformed for was rolled back: the new store is emptied and its
    /// checkpoint says no copy holds (no transform resumes from it), and the old store's
    /// capture is gone. A later upgrade from the same generation copies afresh.
    Abandoned { upgrade: UpgradeId },
}

/// Work the drain asked for, done by the store one operation at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DrainWork {
    Fence(Epoch),
    Unfence,
    OpenNew,
    RemoveCapture,
    ReleaseWriters,
    Compare { epoch: Epoch, final_position: Position },
}

/// What an outstanding store operation was (without its data).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pending {
    OpenSnapshot,
    ReadSnapshot,
    ReadChanges,
    Apply {
        copying: bool,
        /// Changes of the stream the batch applies (0 for the copy's batches).
        changes: u64,
        /// The batch's checkpoint has the copy done.
        done: bool,
        /// The batch is the one that finishes the copy.
        finishes_copy: bool,
        applied: Position,
    },
    /// A fence asked for the freeze of this epoch.
    Fence(Epoch),
    Unfence,
    OpenNew,
    RemoveCapture,
    /// Writers held before the drain acks this epoch's comparison (`matched`).
    HoldWriters {
        epoch: Epoch,
        matched: bool,
    },
    ReleaseWriters,
    ReadRows,
    /// Rows staged for the drain's comparison (those read since the last stage).
    Stage,
    CompareStaged,
    /// The comparison of a range while traffic runs: its read (of at most `limit` rows), its
    /// stage and its comparison.
    RangeRead,
    RangeStage,
    RangeCompare,
    /// A prune, and what was pruned before it (restored if it fails).
    Prune {
        previous: Position,
    },
    ReadCheckpoint,
    /// The checkpoint that says no copy holds, written after a rollback.
    Abandon,
    /// The capture removed after `upgrade` was rolled back.
    RemoveAbandoned(UpgradeId),
}

impl Pending {
    fn of(op: &StoreOp) -> Pending {
        match op {
            StoreOp::OpenSnapshot => Pending::OpenSnapshot,
            StoreOp::ReadSnapshot { .. } => Pending::ReadSnapshot,
            StoreOp::ReadChanges { .. } => Pending::ReadChanges,
            StoreOp::Apply(batch) => Pending::Apply {
                copying: matches!(batch.checkpoint.copy, CopyState::Copying { .. }),
                changes: if batch.base.copy == CopyState::Done { batch.ops.len() as u64 } else { 0 },
                done: batch.checkpoint.copy == CopyState::Done,
                finishes_copy: batch.base.copy != CopyState::Done && batch.checkpoint.copy == CopyState::Done,
                applied: batch.checkpoint.applied,
            },
            StoreOp::Fence => unreachable!("a fence's pending state names its epoch"),
            StoreOp::Unfence => Pending::Unfence,
            StoreOp::OpenNew => Pending::OpenNew,
            StoreOp::RemoveCapture => Pending::RemoveCapture,
            StoreOp::HoldWriters => unreachable!("a hold's pending state names its comparison"),
            StoreOp::ReleaseWriters => Pending::ReleaseWriters,
            StoreOp::ReadRows { .. } => Pending::ReadRows,
            StoreOp::Stage { .. } => unreachable!("a stage's pending state says whose it is"),
            StoreOp::CompareStaged => Pending::CompareStaged,
            StoreOp::ReadRowsToCompare { .. } => Pending::RangeRead,
            StoreOp::CompareStagedKeys => Pending::RangeCompare,
            StoreOp::Prune { .. } => unreachable!("a prune's pending state names what was pruned before"),
            StoreOp::ReadCheckpoint => Pending::ReadCheckpoint,
        }
    }
}

#[derive(Clone, Debug)]
struct Comparing {
    epoch: Epoch,
    /// What is left to stage: runs of old rows `(after, through]` (through `None`: to the
    /// last row), the ranges not compared clean while traffic ran (all rows without them).
    spans: VecDeque<Span>,
    /// The clean ranges' checksums: what their old rows give, not staged again.
    clean_digest: u64,
    /// Rows read and not yet staged (several spans' go in one stage).
    unstaged: Vec<StoredRow>,
    /// The last old row read in the first span left.
    cursor: RowCursor,
    /// Rows were staged (the next stage adds to them).
    staged: bool,
    /// An old row could not be converted: the universes differ.
    rejected: bool,
    /// Every old row is staged: the comparison is next.
    rows_done: bool,
    final_position: Position,
}

/// The data-node composition core.
#[derive(Clone, Debug)]
pub struct DataNodeCore {
    config: DataNodeConfig,
    agent: AgentCore,
    transform: Option<TransformCore>,
    drain: Option<DrainCore>,
    durable: Durable,
    last_now_ms: u64,
    /// The outstanding store operation.
    pending: Option<Pending>,
    drain_work: VecDeque<DrainWork>,
    comparing: Option<Comparing>,
    /// The comparison by range while traffic runs (`None`: the plan's rows are compared at
    /// the drain only).
    ranges: Option<Ranges>,
    /// No comparison of a range starts before this time (its pace).
    range_next_ms: u64,
    /// When the comparison of the range under way started.
    range_started_ms: u64,
    next_step_ms: u64,
    /// When the last transform step started.
    last_step_ms: u64,
    /// A write was seen here (or the old store fenced) since the last transform step began:
    /// the stream is not idle, whatever that step read.
    woken_since_step: bool,
    /// The new store holds the whole copy (the last copy batch was applied).
    store_bulk_done: bool,
    captured: Position,
    /// Captured changes up to here are pruned from the old store.
    pruned: Position,
    /// Answers by request key, and their order (for the bound).
    answers: BTreeMap<RequestKey, StoreAnswer>,
    answer_order: VecDeque<RequestKey>,
    /// Requests running, with how many duplicates of each wait for its answer.
    executing: BTreeMap<RequestKey, u32>,
    /// Routers that said they are frozen, for one epoch (the newest heard of).
    frozen_notices: (Epoch, BTreeSet<NodeName>),
    /// A store operation failed: no store operation starts before this time.
    retry_at_ms: u64,
    /// An apply failed: what the new store holds is unknown until its checkpoint is read.
    recheck: bool,
    /// The transform's pace: copy rate and time left, stream throughput, lag in time.
    progress: Progress,
    /// A store result that took time was just handled: the next store operation waits for the
    /// next timer.
    store_turn_due: bool,
    /// When the last store operation was asked for.
    store_issued_ms: u64,
    /// The new store takes client writes (it said so after the commit, in this incarnation).
    new_open: bool,
    /// This process holds the new store's writers (see [`NewStore::hold_writers`]).
    writers_held: bool,
    /// Requests for the new universe that came once the drain was done but before the store
    /// was open, in order: they run when it opens, and are kept out if the freeze aborts.
    awaiting_open: VecDeque<RequestKey>,
    /// The rolled-back upgrade whose capture this incarnation removed (see
    /// [`DataEvent::Abandoned`]).
    abandoned: Option<UpgradeId>,
    #[cfg(feature = "planted-bugs")]
    bug: Option<crate::duties::transform::TransformBug>,
}

impl DataNodeCore {
    pub fn new(config: DataNodeConfig) -> Self {
        assert!(config.agent.upgrade_from.is_some(), "a data node is deployed for the upgrade from one generation");
        assert!(
            config.answers_max > 0
                && config.transform_interval_ms > 0
                && config.transform_idle_ms >= config.transform_interval_ms
                && config.store_retry_ms > 0,
            "data-node limits must be positive, and the idle pace no faster than the busy one"
        );
        DataNodeCore {
            agent: AgentCore::new(config.agent.clone()),
            transform: None,
            drain: None,
            durable: Durable::default(),
            last_now_ms: 0,
            pending: None,
            drain_work: VecDeque::new(),
            comparing: None,
            ranges: config.range_rows.map(|_| Ranges::new()),
            range_next_ms: 0,
            range_started_ms: 0,
            next_step_ms: 0,
            last_step_ms: 0,
            woken_since_step: false,
            store_bulk_done: false,
            captured: Position(0),
            pruned: Position(0),
            answers: BTreeMap::new(),
            answer_order: VecDeque::new(),
            executing: BTreeMap::new(),
            frozen_notices: (Epoch(0), BTreeSet::new()),
            retry_at_ms: 0,
            recheck: false,
            store_turn_due: false,
            store_issued_ms: 0,
            new_open: false,
            writers_held: false,
            awaiting_open: VecDeque::new(),
            abandoned: None,
            progress: Progress::default(),
            #[cfg(feature = "planted-bugs")]
            bug: None,
            config,
        }
    }

    /// The same core with a planted agent bug (simulator only).
    #[cfg(feature = "planted-bugs")]
    pub fn with_agent_bug(mut self, bug: Option<crate::agent::AgentBug>) -> Self {
        self.agent = self.agent.with_bug(bug);
        self
    }

    /// The same core with a planted transform bug (simulator only); it shows after a restart.
    #[cfg(feature = "planted-bugs")]
    pub fn with_bug(mut self, bug: Option<crate::duties::transform::TransformBug>) -> Self {
        self.bug = bug;
        self
    }

    /// The transform's checkpoint (as last applied), once started.
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.transform.as_ref().map(|t| t.checkpoint())
    }

    /// Requests for the new universe waiting for its store to open, in order.
    pub fn awaiting_open(&self) -> impl Iterator<Item = &RequestKey> {
        self.awaiting_open.iter()
    }

    /// The last position the old store was seen to have captured.
    pub fn captured(&self) -> Position {
        self.captured
    }

    /// Rows copied by this incarnation's bulk copy, and how many its snapshot holds (0: not
    /// known).
    pub fn copy_progress(&self) -> (u64, u64) {
        self.progress.copy()
    }

    /// The comparison by range while traffic runs, as reported (all zero when the plan's rows
    /// are compared at the drain only).
    pub fn range_check(&self) -> protocol::messages::RangeCheck {
        self.ranges.as_ref().map(Ranges::report).unwrap_or_default()
    }

    /// The transform's pace at `now_ms` (what the node reports, and its shell exports).
    pub fn pace(&self, now_ms: u64) -> Pace {
        self.progress.figures(now_ms)
    }

    /// Which universe takes client requests here (`None`: neither, while fenced). The new
    /// universe only once its store is open to clients: its guard refuses them until then.
    pub fn accepting(&self) -> Option<Universe> {
        self.drain.as_ref().and_then(|d| d.accepting()).filter(|u| *u == Universe::Old || self.new_open)
    }

    /// When the shell must feed [`DataInput::Timer`] next, if ever.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        // A step waits for an outstanding store operation, which is answered before any timer;
        // every store operation waits out a failed one's pause.
        let store = if self.pending.is_some() {
            None
        } else if self.store_turn_due {
            // At once, but after the shell's turn (see `handle`).
            Some(self.last_now_ms.max(self.retry_at_ms))
        } else if self.retry_at_ms > self.last_now_ms {
            Some(self.retry_at_ms)
        } else {
            let step = self.transform_wanted().then_some(self.next_step_due_ms());
            let abandon = self.abandon_op().map(|_| self.last_now_ms);
            [step, self.range_due_ms(), abandon].into_iter().flatten().min()
        };
        [self.agent.next_deadline_ms(), store].into_iter().flatten().min()
    }

    /// Whether the comparison by range may go on: the upgrade syncs (the copy complete in the
    /// store, no drain under way or asked for), and what the new store holds is known.
    fn ranges_allowed(&self) -> bool {
        self.ranges.is_some()
            && self.transform_wanted()
            && self.store_bulk_done
            && !self.recheck
            && self.comparing.is_none()
            && self.drain_work.is_empty()
            && self
                .drain
                .as_ref()
                .is_some_and(|d| !d.draining() && d.comparing().is_none() && d.accepting() == Some(Universe::Old))
    }

    /// Whether the range under way can go on now: its rows are staged, or the transform has
    /// applied everything they show.
    fn range_ready(&self) -> bool {
        let (Some(r), Some(t)) = (&self.ranges, &self.transform) else { return false };
        r.staged_waiting() || r.waits_for().is_some_and(|through| t.checkpoint().applied >= through)
    }

    /// When the comparison by range needs a store operation next, if it does.
    fn range_due_ms(&self) -> Option<u64> {
        let r = self.ranges.as_ref().filter(|_| self.ranges_allowed())?;
        if self.range_ready() {
            Some(self.last_now_ms)
        } else if r.busy() || !r.has_work() {
            // Waits for the transform (whose steps are due anyway), or all is clean.
            None
        } else {
            Some(self.range_next_ms)
        }
    }

    /// When the next transform step may start: after the usual pause, or a millisecond after
    /// the last one while the drain waits for it (a switch holds clients meanwhile; the
    /// millisecond keeps a step that fails from spinning).
    fn next_step_due_ms(&self) -> u64 {
        if self.drain.as_ref().is_some_and(DrainCore::draining) {
            self.next_step_ms.min(self.last_step_ms + 1)
        } else {
            self.next_step_ms
        }
    }

    fn transform_wanted(&self) -> bool {
        self.durable.started()
            && !matches!(self.own(self.agent.persisted(), self.agent.persisted_base()), Some(Decision::Commit(_)))
            && self.agent.last_view().is_some_and(|v| v.known && v.upgrade_from == Some(self.from()))
            && self.rolled_back().is_none()
    }

    /// The upgrade this node is deployed for, if the last view shows it rolled back (an end:
    /// no freeze of it will come again). Views are taken newest first once the first, read
    /// linearizably after the boot, is in: a rollback shown is a rollback decided.
    fn rolled_back(&self) -> Option<UpgradeId> {
        let v = self.agent.last_view()?;
        let ours =
            !v.recovering && v.known && v.upgrade_from == Some(self.from()) && v.phase == Some(Phase::RolledBack);
        ours.then_some(v.upgrade).flatten()
    }

    /// The store operation that abandons a rolled-back upgrade, once the node has acted on its
    /// abort (the old store open to clients, no drain work left): first the checkpoint that
    /// says no copy holds, written with the new store emptied (so that no transform ever
    /// resumes on the capture about to go), then the capture's removal. A node restarted
    /// in between removes the capture again (idempotent).
    fn abandon_op(&self) -> Option<(Pending, StoreOp)> {
        let upgrade = self.rolled_back().filter(|u| self.abandoned != Some(*u))?;
        let view = self.agent.last_view()?;
        if view.decision.order_key() > self.agent.persisted().order_key() {
            // The abort is not yet persisted, let alone acted on.
            return None;
        }
        let opened = self.drain.as_ref().is_some_and(|d| d.accepting() == Some(Universe::Old));
        if !opened || !self.drain_work.is_empty() || self.comparing.is_some() || self.recheck {
            return None;
        }
        let checkpoint = self.transform.as_ref()?.checkpoint();
        let abandoned = Checkpoint { applied: Position(0), copy: CopyState::NotStarted, copies: checkpoint.copies + 1 };
        if checkpoint.copy == CopyState::NotStarted && checkpoint.applied == Position(0) {
            Some((Pending::RemoveAbandoned(upgrade), StoreOp::RemoveCapture))
        } else {
            // Emptied too: nothing of the rolled-back copy stays to be taken for data.
            let batch = Batch { base: checkpoint.clone(), reset: true, ops: Vec::new(), checkpoint: abandoned };
            Some((Pending::Abandon, StoreOp::Apply(batch)))
        }
    }

    /// The generation the upgrade this node is deployed for upgrades from: its old store
    /// holds it, its new store the next.
    pub fn from(&self) -> Generation {
        self.config.agent.upgrade_from.expect("checked at construction")
    }

    /// Which of this node's stores holds `generation`, if one does.
    pub fn universe_of(&self, generation: Generation) -> Option<Universe> {
        if generation == self.from() {
            Some(Universe::Old)
        } else if generation == self.from().next() {
            Some(Universe::New)
        } else {
            None
        }
    }

    /// `decision` (of an upgrade from `base`) as this node's upgrade sees it: its own upgrade's
    /// decisions as they are; the switch of the upgrade before (which made this upgrade's old
    /// universe the one serving) as `Initial`, nothing frozen yet. `None` for a decision that
    /// says nothing about this node's two stores (a node deployed for another upgrade than the
    /// cluster's): it is not acted on.
    fn own(&self, decision: Decision, base: Generation) -> Option<Decision> {
        match decision {
            _ if base == self.from() => Some(decision),
            Decision::Commit(_) if base.next() == self.from() => Some(Decision::Initial),
            _ => None,
        }
    }

    pub fn handle(&mut self, now_ms: u64, input: DataInput) -> Vec<DataOutput> {
        assert!(now_ms >= self.last_now_ms, "time went backwards: {now_ms} < {}", self.last_now_ms);
        self.last_now_ms = now_ms;
        let mut out = Vec::new();
        let mut stored = false;
        match input {
            DataInput::Boot { record, checkpoint, old_fenced } => {
                assert!(self.transform.is_none(), "booted twice");
                let booted = self.durable.boot(record, NodeRecord::owner_of(&self.config.agent.node.0));
                let transform = TransformCore::new(checkpoint.clone())
                    .with_positions(self.config.positions)
                    .with_copy_chunk_rows(self.config.copy_chunk_rows);
                #[cfg(feature = "planted-bugs")]
                let transform = planted_after_restart(transform, self.bug, booted.boots - 1);
                self.transform = Some(transform);
                self.store_bulk_done = checkpoint.copy == CopyState::Done;
                self.drain = Some(DrainCore::new(checkpoint.applied, old_fenced));
                out.push(DataOutput::Persist(booted));
            }
            DataInput::Request { key, generation, mirror, read_only } => match self.universe_of(generation) {
                Some(universe) => self.request(key, universe, mirror, read_only, &mut out),
                None => {
                    // Not remembered: the same key may yet come for a generation held here.
                    let (old, new) = (self.from(), self.from().next());
                    let reason = format!("generation {generation} is not held here (this node holds {old} and {new})");
                    out.push(DataOutput::Reply { key, mirror, answer: StoreAnswer::NotAdmitted { reason } });
                }
            },
            DataInput::Executed { key, universe, mirror, answer } => {
                let mut replies = 1;
                if !mirror {
                    let duplicates = self.executing.remove(&key);
                    let duplicates =
                        duplicates.unwrap_or_else(|| panic!("request {key:?} ran without being let through"));
                    replies += duplicates;
                    if matches!(answer, StoreAnswer::Ok { .. }) {
                        out.push(DataOutput::Event(DataEvent::Admitted { key, universe }));
                        if universe == Universe::Old {
                            self.stream_wake();
                        }
                    }
                    self.remember(key, answer.clone());
                }
                for _ in 0..replies {
                    out.push(DataOutput::Reply { key, mirror, answer: answer.clone() });
                }
            }
            DataInput::Coordinator { id, response } => {
                let outs = self.agent.handle(now_ms, AgentInput::Response { id, response });
                self.agent_outputs(now_ms, outs, &mut out);
            }
            DataInput::Persisted(record) => {
                let input = self.durable.persisted(record);
                let outs = self.agent.handle(now_ms, input);
                self.agent_outputs(now_ms, outs, &mut out);
            }
            DataInput::Store(result) => {
                stored = true;
                self.store_result(now_ms, result, &mut out)
            }
            DataInput::Timer => {
                let outs = self.agent.handle(now_ms, AgentInput::Timer);
                self.agent_outputs(now_ms, outs, &mut out);
            }
            DataInput::RouterFrozen { router, epoch } => self.router_frozen(now_ms, router, epoch, &mut out),
        }
        if stored && now_ms > self.store_issued_ms {
            // A store operation that took time: the next one starts at the next timer, not in
            // the same breath. A shell that waits for each store operation (the actor's mailbox
            // waits) must get a turn between two, or a slow store that answers each step just
            // as the next is due starves the node's timers and messages (simulator seed 304: a
            // draining node read its stream back to back and never watched again).
            self.store_turn_due = self.pending.is_none();
        } else {
            self.store_turn_due = false;
            self.pump(now_ms, &mut out);
        }
        if out.iter().any(|o| matches!(o, DataOutput::Store(_))) {
            self.store_issued_ms = now_ms;
        }
        self.refuse_awaiting_if_aborted(&mut out);
        out
    }

    /// Requests waiting for the new store to open are kept out once the drain went back to
    /// the old universe (the freeze aborted, or a newer one began): the store will not open.
    fn refuse_awaiting_if_aborted(&mut self, out: &mut Vec<DataOutput>) {
        if self.awaiting_open.is_empty() || self.drain.as_ref().and_then(DrainCore::accepting) == Some(Universe::New) {
            return;
        }
        for key in std::mem::take(&mut self.awaiting_open) {
            let duplicates = self.executing.remove(&key).expect("an awaiting request is let through");
            let answer = StoreAnswer::NotAdmitted { reason: "the switch did not commit".to_string() };
            self.remember(key, answer.clone());
            for _ in 0..=duplicates {
                out.push(DataOutput::Reply { key, mirror: false, answer: answer.clone() });
            }
        }
    }

    fn request(
        &mut self,
        key: RequestKey,
        universe: Universe,
        mirror: bool,
        read_only: bool,
        out: &mut Vec<DataOutput>,
    ) {
        if !mirror {
            if let Some(answer) = self.answers.get(&key) {
                out.push(DataOutput::Reply { key, mirror, answer: answer.clone() });
                return;
            }
            if let Some(waiting) = self.executing.get_mut(&key) {
                // A duplicate of a request still running: it gets the same answer.
                *waiting += 1;
                return;
            }
        }
        let accepting = self.accepting();
        let drained = self.drain.as_ref().and_then(DrainCore::accepting) == Some(Universe::New);
        if universe == Universe::New && !mirror && drained && !self.new_open {
            // A router sends to the new universe once it learnt the commit, which this node may
            // learn later: the request waits for the store to open (as an application's write
            // waits on the database's lock), not refused for a window nobody chose.
            if self.awaiting_open.len() < AWAITING_OPEN_MAX {
                self.executing.insert(key, 0);
                self.awaiting_open.push_back(key);
                return;
            }
        }
        // Mirrors wait for the copy to be complete *in the store*, not only in the core.
        let bulk_done = self.store_bulk_done;
        let refusal = match (universe, mirror) {
            (Universe::Old, true) => Some("mirrors go to the new universe".to_string()),
            (Universe::New, true) if !read_only => Some("only read-only requests are mirrored".to_string()),
            // Nothing is complete before the bulk copy is: no answer would be conclusive.
            (Universe::New, true) if !bulk_done => Some("bulk copy in progress".to_string()),
            // Once the new universe takes client writes, its position no longer says what it
            // holds (writes do not move the transform's checkpoint): a comparison would be
            // meaningless, and validation is over anyway.
            (Universe::New, true) if drained => Some("the new universe serves clients: validation is over".to_string()),
            (Universe::New, true) => None,
            (universe, false) if accepting != Some(universe) => {
                Some(format!("{universe:?} universe not accepting (accepting {accepting:?})"))
            }
            (_, false) => None,
        };
        match refusal {
            Some(reason) => {
                // A client request kept out by the fences is not refused for good: once the
                // store reopens, a late copy of it would run (see `StoreAnswer::NotAdmitted`).
                let answer =
                    if mirror { StoreAnswer::Rejected { reason } } else { StoreAnswer::NotAdmitted { reason } };
                if !mirror {
                    self.remember(key, answer.clone());
                }
                out.push(DataOutput::Reply { key, mirror, answer });
            }
            None => {
                if !mirror {
                    self.executing.insert(key, 0);
                }
                out.push(DataOutput::Execute { key, universe, mirror });
            }
        }
    }

    fn remember(&mut self, key: RequestKey, answer: StoreAnswer) {
        if self.answers.insert(key, answer).is_none() {
            self.answer_order.push_back(key);
        }
        while self.answer_order.len() > self.config.answers_max {
            let oldest = self.answer_order.pop_front().expect("longer than a positive bound");
            self.answers.remove(&oldest);
        }
    }

    /// Starts the next store operation, if none is outstanding: the drain's work first, then a
    /// transform step when it is due.
    fn pump(&mut self, now_ms: u64, out: &mut Vec<DataOutput>) {
        if self.pending.is_some() || !self.durable.started() || now_ms < self.retry_at_ms {
            return;
        }
        self.drop_moot_comparison();
        let ranges_allowed = self.ranges_allowed();
        if let Some(r) = self.ranges.as_mut().filter(|r| r.busy() && !ranges_allowed) {
            // A drain begins (or the stores are in doubt): the range is compared another time.
            r.abandon();
        }
        let op = if self.comparing.is_some() {
            self.comparison_op(out);
            return;
        } else if let Some(work) = self.drain_work.pop_front() {
            match work {
                DrainWork::Fence(epoch) => {
                    if self.agent.persisting().is_some_and(|d| d.order_key() > Decision::Freeze(epoch).order_key()) {
                        // A later decision (this freeze's abort, or a later freeze) is being
                        // written to disk: the fence waits, and goes when it is acted on
                        // (hunt seed 42001539: the fence ran with the abort on disk).
                        self.drain_work.push_front(work);
                        return;
                    }
                    self.pending = Some(Pending::Fence(epoch));
                    out.push(DataOutput::Store(StoreOp::Fence));
                    return;
                }
                DrainWork::Unfence => Some(StoreOp::Unfence),
                DrainWork::OpenNew => Some(StoreOp::OpenNew),
                DrainWork::RemoveCapture => Some(StoreOp::RemoveCapture),
                DrainWork::ReleaseWriters => Some(StoreOp::ReleaseWriters),
                DrainWork::Compare { epoch, final_position } => {
                    self.comparing = Some(self.comparison(epoch, final_position));
                    self.comparison_op(out);
                    return;
                }
            }
        } else if let Some(up_to) = self.prune_due() {
            self.pending = Some(Pending::Prune { previous: self.pruned });
            self.pruned = up_to;
            out.push(DataOutput::Store(StoreOp::Prune { up_to }));
            return;
        } else if self.recheck {
            Some(StoreOp::ReadCheckpoint)
        } else if let Some((pending, op)) = self.abandon_op() {
            if let StoreOp::Apply(batch) = &op {
                // The core holds the checkpoint on its way, as for any batch (a failed apply
                // reads the store's again).
                self.restart_transform(now_ms, batch.checkpoint.clone(), out);
            }
            self.pending = Some(pending);
            out.push(DataOutput::Store(op));
            return;
        } else if ranges_allowed && self.range_ready() {
            let r = self.ranges.as_mut().expect("compared by range");
            if r.staged_waiting() {
                Some(StoreOp::CompareStagedKeys)
            } else {
                // Over a scratch copy of its own: what the new store gives for these rows only.
                let op = StoreOp::Stage { rows: r.take_rows(), first: true };
                self.pending = Some(Pending::RangeStage);
                out.push(DataOutput::Store(op));
                return;
            }
        } else if self.transform_wanted() && now_ms >= self.next_step_due_ms() {
            self.last_step_ms = now_ms;
            self.next_step_ms = now_ms + self.config.transform_interval_ms;
            self.woken_since_step = false;
            let transform = self.transform.as_ref().expect("started");
            // A range waits for the transform to apply what its rows show: where every change
            // has a number, the read stops right there, so that no later change can spoil it.
            let range_through = self.ranges.as_ref().and_then(Ranges::waits_for).filter(|_| ranges_allowed);
            Some(match transform.next_work() {
                Work::Snapshot => StoreOp::OpenSnapshot,
                Work::CopyChunk { snapshot, after, limit } => StoreOp::ReadSnapshot { snapshot, after, limit },
                Work::Stream { after, limit } => {
                    let limit = match range_through {
                        Some(through) if self.config.positions == Positions::Counted && through > after => {
                            limit.min(usize::try_from(through.0 - after.0).unwrap_or(usize::MAX))
                        }
                        _ => limit,
                    };
                    StoreOp::ReadChanges { after, limit }
                }
            })
        } else if ranges_allowed && now_ms >= self.range_next_ms && !self.ranges.as_ref().is_some_and(Ranges::busy) {
            let limit = self.config.range_rows.expect("compared by range");
            self.ranges.as_mut().and_then(Ranges::start).map(|after| {
                self.range_started_ms = now_ms;
                StoreOp::ReadRowsToCompare { after, limit }
            })
        } else {
            None
        };
        if let Some(op) = op {
            self.pending = Some(Pending::of(&op));
            out.push(DataOutput::Store(op));
        }
    }

    /// Something may have been captured: the stream is read again at the normal pace.
    fn stream_wake(&mut self) {
        self.woken_since_step = true;
        self.next_step_ms = self.next_step_ms.min(self.last_step_ms + self.config.transform_interval_ms);
    }

    /// Applied changes to prune from the old store, once more than the limit are kept.
    fn prune_due(&self) -> Option<Position> {
        // After a failed apply, the transform's checkpoint may be ahead of the new store's.
        if self.recheck {
            return None;
        }
        let transform = self.transform.as_ref()?;
        let applied = transform.checkpoint().applied;
        (transform.bulk_done() && applied.0 >= self.pruned.0 + self.config.change_log_applied_max).then_some(applied)
    }

    fn store_result(&mut self, now_ms: u64, result: StoreResult, out: &mut Vec<DataOutput>) {
        let op = self.pending.take().expect("a store result without an outstanding operation");
        if let StoreResult::Failed { reason } = result {
            self.store_failed(now_ms, op, reason, out);
            return;
        }
        let transform = self.transform.as_mut().expect("started");
        let batch = match (op, result) {
            (Pending::OpenSnapshot, StoreResult::SnapshotOpened { snapshot, at, rows }) => {
                // The copy (again) replaces what the new store holds.
                if let Some(r) = self.ranges.as_mut() {
                    r.reset();
                }
                self.captured = self.captured.max(at);
                self.progress.copy_started(now_ms, rows);
                self.progress.captured(now_ms, at);
                out.push(DataOutput::Event(DataEvent::CopyStarted { rows_in_snapshot: rows }));
                Some(Ok(transform.copy_started(snapshot, at)))
            }
            (Pending::ReadSnapshot, StoreResult::Chunk(chunk)) => {
                self.captured = self.captured.max(chunk.position);
                self.progress.copied(now_ms, chunk.rows.len() as u64, chunk.last);
                if let Some(rate) = self.config.copy_rows_per_s_max {
                    let pause_ms = (chunk.rows.len() as u64 * 1_000).div_ceil(rate.max(1));
                    self.next_step_ms = self.next_step_ms.max(self.last_step_ms + pause_ms);
                }
                Some(transform.copy_chunk(chunk.rows, chunk.last))
            }
            (Pending::ReadSnapshot, StoreResult::SnapshotGone) => {
                transform.snapshot_lost();
                None
            }
            (Pending::ReadChanges, StoreResult::CopyAgain { reason }) => {
                out.push(DataOutput::Event(DataEvent::CopyAgain { reason }));
                transform.copy_again();
                None
            }
            (Pending::ReadChanges, StoreResult::Changes(read)) => {
                self.captured = self.captured.max(read.captured).max(read.complete_to);
                self.progress.captured(now_ms, self.captured);
                // Idle: nothing found, and nothing written here since the read began (a write
                // seen meanwhile may not be in what was read).
                if read.changes.is_empty() && !self.woken_since_step {
                    self.next_step_ms = self.last_step_ms + self.config.transform_idle_ms;
                }
                if let Some(r) = self.ranges.as_mut() {
                    // What changed since the ranges were compared (a change the checkpoint
                    // covers is a replay, already in what they read).
                    let from = transform.checkpoint().applied;
                    for (position, op) in read.changes.iter().filter(|(p, _)| *p > from) {
                        let (RowOp::Upsert { table, key, .. } | RowOp::Delete { table, key }) = op;
                        r.changed(table, *key, *position);
                    }
                }
                let moves = !read.changes.is_empty() || transform.read_moves(read.complete_to);
                moves.then(|| transform.apply_read(&read.changes, read.complete_to))
            }
            (Pending::Apply { copying, changes, done, finishes_copy, applied }, StoreResult::Applied) => {
                // What the store now holds (a copy started again is not done).
                self.store_bulk_done = done;
                self.progress.applied(now_ms, applied, changes);
                if copying {
                    out.push(DataOutput::Event(DataEvent::Copying));
                }
                if finishes_copy {
                    out.push(DataOutput::Event(DataEvent::CopyDone { copied_rows: self.progress.copy().0 }));
                }
                // A copy's batch carries its snapshot's position, but the copy is whole only
                // once done: a drain counts applied positions of a complete copy.
                if done {
                    let outs = self.drain_mut().handle(DrainInput::Applied { position: applied });
                    self.drain_outputs(now_ms, outs, out);
                }
                self.report(now_ms, out);
                None
            }
            (Pending::Apply { .. }, StoreResult::ApplyRefused(stale)) => {
                // Something else moved the new store's checkpoint: what this core believed
                // applied is not. Start again from what the store holds (as after a restart).
                let found = stale.found.clone();
                out.push(DataOutput::Event(DataEvent::TransformFailed(TransformError::StaleBatch(stale))));
                self.restart_transform(now_ms, found, out);
                None
            }
            (Pending::Fence(epoch), StoreResult::Fenced { final_position }) => {
                self.stream_wake();
                out.push(DataOutput::Event(DataEvent::Fenced { final_position }));
                let outs = self.drain_mut().handle(DrainInput::Fenced { epoch, final_position });
                self.drain_outputs(now_ms, outs, out);
                None
            }
            (Pending::Unfence, StoreResult::Unfenced)
            | (Pending::Prune { .. }, StoreResult::Pruned)
            | (Pending::RemoveCapture, StoreResult::CaptureRemoved) => None,
            (Pending::OpenNew, StoreResult::OpenedToClients) => {
                self.new_open = true;
                self.writers_held = false;
                for key in std::mem::take(&mut self.awaiting_open) {
                    out.push(DataOutput::Execute { key, universe: Universe::New, mirror: false });
                }
                // The upgrade is done only once every data node's new store takes clients: a
                // node deployed for the next upgrade must find its old store open (hunt seed
                // 40001811, 2 upgrades).
                if let Some(Decision::Commit(epoch)) = self.own(self.agent.persisted(), self.agent.persisted_base()) {
                    let outs = self.agent.handle(now_ms, AgentInput::OweAck { epoch, ack: Ack::Switched });
                    self.agent_outputs(now_ms, outs, out);
                }
                None
            }
            (Pending::ReadRows, StoreResult::Rows(chunk)) => {
                self.compare_rows(chunk);
                None
            }
            (Pending::Stage, StoreResult::Staged { rejected }) => {
                let c = self.comparing.as_mut().expect("comparing");
                c.staged = true;
                c.rejected |= rejected > 0;
                c.rows_done = c.spans.is_empty() && c.unstaged.is_empty();
                None
            }
            (Pending::RangeRead, StoreResult::RowsToCompare { chunk, through }) => {
                let limit = self.config.range_rows.expect("compared by range");
                let r = self.ranges.as_mut().expect("compared by range");
                r.read(chunk.rows, chunk.last, limit, chunk.position, through.max(chunk.position));
                None
            }
            (Pending::RangeStage, StoreResult::Staged { rejected }) => {
                self.ranges.as_mut().expect("compared by range").staged(rejected);
                None
            }
            (Pending::RangeCompare, StoreResult::KeysCompared(found)) => {
                let r = self.ranges.as_mut().expect("compared by range");
                let rows = r.rows_in_flight();
                let outcome = r.compared(found);
                let matched = outcome.map(|o| matches!(o, Outcome::Matched { .. }));
                out.push(DataOutput::Event(DataEvent::RangeCompared { rows, matched }));
                // The old store is read at most half the time, within the copy's rate; once every
                // range was compared, ranges that changed are compared again at the idle pace.
                let first_round = r.report().attempted < r.report().ranges;
                let took_ms = now_ms - self.range_started_ms;
                let rate_ms = self.config.copy_rows_per_s_max.map_or(0, |rate| (rows * 1_000).div_ceil(rate.max(1)));
                let pace_ms = if first_round { self.config.transform_interval_ms } else { self.config.range_again_ms };
                self.range_next_ms = now_ms + took_ms.max(rate_ms).max(pace_ms);
                self.report(now_ms, out);
                None
            }
            (Pending::CompareStaged, StoreResult::Compared { .. }) if self.drop_moot_comparison() => None,
            (Pending::CompareStaged, StoreResult::Compared { expected, actual }) => {
                let c = self.comparing.take().expect("comparing");
                // The clean ranges were not staged again: their rows give what they gave.
                let matched = !c.rejected && expected.wrapping_add(c.clean_digest) == actual;
                if let Some(r) = self.ranges.as_mut().filter(|_| !matched) {
                    r.all_changed();
                }
                out.push(DataOutput::Event(DataEvent::Compared { final_position: c.final_position, matched }));
                if matched {
                    // Before the ack (after which the switch may commit, and routers send to
                    // the new universe before this node learns it): writers to the new store
                    // wait on its lock from now on, instead of being refused by the guard.
                    self.pending = Some(Pending::HoldWriters { epoch: c.epoch, matched });
                    out.push(DataOutput::Store(StoreOp::HoldWriters));
                } else {
                    self.checksums(now_ms, c.epoch, matched, out);
                }
                None
            }
            (Pending::HoldWriters { epoch, matched }, StoreResult::WritersHeld) => {
                self.writers_held = true;
                if self.drain.as_ref().and_then(DrainCore::comparing) == Some(epoch) {
                    self.checksums(now_ms, epoch, matched, out);
                } else if self.drain.as_ref().and_then(DrainCore::accepting) != Some(Universe::New) {
                    // The outcome came meanwhile and it is not the switch: let them go.
                    self.drain_work.push_front(DrainWork::ReleaseWriters);
                }
                None
            }
            (Pending::ReleaseWriters, StoreResult::WritersReleased) => {
                self.writers_held = false;
                None
            }
            (Pending::ReadCheckpoint, StoreResult::Checkpoint(found)) => {
                self.recheck = false;
                self.restart_transform(now_ms, found, out);
                None
            }
            (Pending::Abandon, StoreResult::Applied) => None,
            (Pending::Abandon, StoreResult::ApplyRefused(stale)) => {
                // The store holds another checkpoint than believed: abandon from that one.
                self.restart_transform(now_ms, stale.found, out);
                None
            }
            (Pending::RemoveAbandoned(upgrade), StoreResult::CaptureRemoved) => {
                self.abandoned = Some(upgrade);
                out.push(DataOutput::Event(DataEvent::Abandoned { upgrade }));
                None
            }
            (op, result) => panic!("store result {result:?} does not answer {op:?}"),
        };
        match batch {
            None => {}
            Some(Ok(batch)) => {
                let op = StoreOp::Apply(batch);
                self.pending = Some(Pending::of(&op));
                out.push(DataOutput::Store(op));
            }
            Some(Err(e)) => out.push(DataOutput::Event(DataEvent::TransformFailed(e))),
        }
    }

    /// The transform goes on from what the new store holds (as after a restart), and the drain
    /// learns what that is: a batch whose answer was lost may have applied everything up to the
    /// final position, and no later batch would then tell it (simulator seed 304).
    fn restart_transform(&mut self, now_ms: u64, found: Checkpoint, out: &mut Vec<DataOutput>) {
        // What the ranges compared may not be what the store holds.
        if let Some(r) = self.ranges.as_mut() {
            r.reset();
        }
        self.store_bulk_done = found.copy == CopyState::Done;
        self.progress.restarted(found.applied);
        if found.copy == CopyState::NotStarted {
            self.forget_positions(found.applied);
        }
        let applied = (found.copy == CopyState::Done).then_some(found.applied);
        self.transform = Some(
            TransformCore::new(found)
                .with_positions(self.config.positions)
                .with_copy_chunk_rows(self.config.copy_chunk_rows),
        );
        if let (Some(position), Some(drain)) = (applied, self.drain.as_mut()) {
            let outs = drain.handle(DrainInput::Applied { position });
            self.drain_outputs(now_ms, outs, out);
        }
    }

    /// No copy holds in the new store (it was abandoned after a rollback): what this core knew
    /// of the old store's positions goes with it. A store whose capture was removed numbers its
    /// changes afresh once capture is back (SQLite's change table starts again at 1), so
    /// positions seen before mean nothing to the next copy: the drain counts from what the
    /// checkpoint says, and nothing is pruned before that copy applies it. Only while the old
    /// store is open to clients (no freeze under way: an abandoned upgrade has none).
    fn forget_positions(&mut self, applied: Position) {
        if self.drain.as_ref().is_some_and(|d| d.accepting() == Some(Universe::Old)) && self.drain_work.is_empty() {
            self.drain = Some(DrainCore::new(applied, false));
            self.captured = applied;
            self.pruned = applied;
        }
    }

    /// A store operation failed: the same work is asked for again after the pause. Reads are
    /// asked again by the state that asked for them (the transform's, the comparison's); the
    /// drain's fence or unfence goes back to the front of its queue; after an apply, the new
    /// store's checkpoint is read first (the apply may have committed); a prune is due again.
    fn store_failed(&mut self, now_ms: u64, op: Pending, reason: String, out: &mut Vec<DataOutput>) {
        out.push(DataOutput::Event(DataEvent::StoreFailed { reason }));
        self.retry_at_ms = now_ms + self.config.store_retry_ms;
        match op {
            Pending::Apply { .. } | Pending::ReadCheckpoint | Pending::Abandon => self.recheck = true,
            // Due again (the upgrade is not yet marked abandoned in this incarnation).
            Pending::RemoveAbandoned(_) => {}
            Pending::Fence(epoch) => self.drain_work.push_front(DrainWork::Fence(epoch)),
            Pending::Unfence => self.drain_work.push_front(DrainWork::Unfence),
            Pending::OpenNew => self.drain_work.push_front(DrainWork::OpenNew),
            Pending::RemoveCapture => self.drain_work.push_front(DrainWork::RemoveCapture),
            Pending::ReleaseWriters => self.drain_work.push_front(DrainWork::ReleaseWriters),
            // The hold only spares writers a refusal: without it, the drain acks all the same
            // (whether the hold took is unknown: a release is asked for if the freeze aborts).
            Pending::HoldWriters { epoch, matched } => {
                self.writers_held = true;
                if self.drain.as_ref().and_then(DrainCore::comparing) == Some(epoch) {
                    self.checksums(now_ms, epoch, matched, out);
                }
            }
            // Due again at once (the log stays within its bound).
            Pending::Prune { previous } => self.pruned = previous,
            // The rows read since the last stage went with it: the comparison starts again.
            Pending::Stage => {
                if let Some(c) = self.comparing.take() {
                    self.comparing = Some(self.comparison(c.epoch, c.final_position));
                }
            }
            Pending::RangeRead | Pending::RangeStage | Pending::RangeCompare => {
                self.ranges.as_mut().expect("compared by range").abandon()
            }
            Pending::OpenSnapshot
            | Pending::ReadSnapshot
            | Pending::ReadChanges
            | Pending::ReadRows
            | Pending::CompareStaged => {}
        }
    }

    /// The comparison of `epoch`'s freeze is done: the drain acks.
    fn checksums(&mut self, now_ms: u64, epoch: Epoch, matched: bool, out: &mut Vec<DataOutput>) {
        let outs = self.drain_mut().handle(DrainInput::Checksums { epoch, matched });
        self.drain_outputs(now_ms, outs, out);
    }

    /// Drops a comparison the drain no longer waits for (it learnt the outcome meanwhile, and
    /// after a commit the new universe takes client writes, so its checksum would include
    /// them: a false "differ"). Whether it dropped one.
    fn drop_moot_comparison(&mut self) -> bool {
        let awaited = self.drain.as_ref().and_then(DrainCore::comparing);
        let moot = self.comparing.as_ref().is_some_and(|c| awaited != Some(c.epoch));
        if moot {
            self.comparing = None;
        }
        moot
    }

    /// The drain's comparison of `epoch`'s freeze at `final_position`: the old rows of every
    /// range not compared clean while traffic ran are staged, the clean ones' checksums added.
    fn comparison(&self, epoch: Epoch, final_position: Position) -> Comparing {
        let (spans, clean_digest) = match &self.ranges {
            Some(r) => (r.spans().into(), r.clean_digest()),
            None => (VecDeque::from([Span { after: None, through: None, ranges: usize::MAX }]), 0),
        };
        let cursor = spans.front().and_then(|span| span.after.clone());
        Comparing {
            epoch,
            spans,
            clean_digest,
            unstaged: Vec::new(),
            cursor,
            staged: false,
            rejected: false,
            rows_done: false,
            final_position,
        }
    }

    /// The drain's comparison's next store operation: read the spans left, stage what was read
    /// (a chunk at a time, and at least once, so that nothing staged before counts), compare.
    fn comparison_op(&mut self, out: &mut Vec<DataOutput>) {
        let chunk_rows = self.config.compare_chunk_rows;
        let c = self.comparing.as_mut().expect("comparing");
        let (op, pending) = if c.rows_done {
            (StoreOp::CompareStaged, Pending::CompareStaged)
        } else if let Some(span) = c.spans.front().filter(|_| c.unstaged.len() < chunk_rows) {
            let limit = span.read_limit(self.config.range_rows.unwrap_or(usize::MAX), chunk_rows);
            (StoreOp::ReadRows { after: c.cursor.clone(), limit }, Pending::ReadRows)
        } else {
            // The new store converts them into its scratch copy (only it can: it evaluates the
            // plan's expressions and knows the generated keys).
            (StoreOp::Stage { rows: std::mem::take(&mut c.unstaged), first: !c.staged }, Pending::Stage)
        };
        self.pending = Some(pending);
        out.push(DataOutput::Store(op));
    }

    /// Old rows read for the drain's comparison: those of the span being read wait to be
    /// staged; the span is done at its end, or at the last row.
    fn compare_rows(&mut self, chunk: Chunk) {
        let c = self.comparing.as_mut().expect("comparing");
        let (rows, span_done) = c.spans.front().expect("a span is read").take(chunk.rows, chunk.last);
        if let Some((t, k, _)) = rows.last() {
            c.cursor = Some((t.clone(), *k));
        }
        c.unstaged.extend(rows);
        if span_done {
            c.spans.pop_front();
            c.cursor = c.spans.front().and_then(|span| span.after.clone());
        }
    }

    fn drain_mut(&mut self) -> &mut DrainCore {
        self.drain.as_mut().expect("started")
    }

    fn report(&mut self, now_ms: u64, out: &mut Vec<DataOutput>) {
        let transform = self.transform.as_ref().expect("started");
        let report = NodeReport {
            captured: self.captured,
            applied: transform.checkpoint().applied,
            bulk_done: transform.bulk_done(),
            samples: 0,
            mismatches: 0,
            copied_rows: self.progress.copy().0,
            copy_rows_total: self.progress.copy().1,
            pace: self.progress.figures(now_ms),
            ranges: self.range_check(),
        };
        let outs = self.agent.handle(now_ms, AgentInput::Report(report));
        self.agent_outputs(now_ms, outs, out);
    }

    fn drain_outputs(&mut self, now_ms: u64, outs: Vec<DrainOutput>, out: &mut Vec<DataOutput>) {
        for o in outs {
            match o {
                DrainOutput::Fence(epoch) => self.drain_work.push_back(DrainWork::Fence(epoch)),
                DrainOutput::Unfence => {
                    // A fence asked for and not yet performed (a store operation ahead of it,
                    // or its retry's pause) is for a freeze that ended: it is not performed,
                    // or clients would be refused in an aborted freeze (simulator seed 318).
                    self.drain_work.retain(|w| !matches!(w, DrainWork::Fence(_)));
                    self.drain_work.push_back(DrainWork::Unfence);
                    if self.writers_held {
                        self.drain_work.push_back(DrainWork::ReleaseWriters);
                    }
                }
                DrainOutput::OpenNew => self.drain_work.push_back(DrainWork::OpenNew),
                DrainOutput::RemoveCapture => self.drain_work.push_back(DrainWork::RemoveCapture),
                DrainOutput::CompareChecksums { epoch, final_position } => {
                    self.drain_work.push_back(DrainWork::Compare { epoch, final_position })
                }
                DrainOutput::Ack { epoch, ack } => {
                    if let Ack::Drained { final_position, checksum_match } = ack {
                        out.push(DataOutput::Event(DataEvent::Drained { epoch, final_position, checksum_match }));
                        #[cfg(feature = "planted-bugs")]
                        if self.bug == Some(crate::duties::transform::TransformBug::OpenNewWhenDrained) {
                            self.drain_work.push_back(DrainWork::OpenNew);
                        }
                    }
                    let outs = self.agent.handle(now_ms, AgentInput::OweAck { epoch, ack });
                    self.agent_outputs(now_ms, outs, out);
                }
            }
        }
    }

    /// A router's frozen notice. Once every router the freeze needs (the view's list) has sent
    /// one, the drain may fence, as it would once the view showed all their acks.
    fn router_frozen(&mut self, now_ms: u64, router: NodeName, epoch: Epoch, out: &mut Vec<DataOutput>) {
        let (heard_epoch, heard) = &mut self.frozen_notices;
        if epoch > *heard_epoch {
            *heard_epoch = epoch;
            heard.clear();
        }
        if epoch == *heard_epoch && heard.len() < FROZEN_NOTICES_MAX {
            heard.insert(router);
        }
        let decision = self.agent.persisted();
        let own = self.own(decision, self.agent.persisted_base()) == Some(decision);
        if self.durable.started() && self.drain.is_some() && own && decision == Decision::Freeze(epoch) {
            let all_routers_frozen = self.all_routers_frozen(decision);
            if all_routers_frozen {
                let outs = self.drain_mut().handle(DrainInput::Decision { decision, all_routers_frozen });
                self.drain_outputs(now_ms, outs, out);
            }
        }
    }

    /// Whether every router is frozen for `decision` (a freeze), as far as this node knows: the
    /// newest view shows all their acks, or each router the view names sent its notice.
    fn all_routers_frozen(&self, decision: Decision) -> bool {
        let Some(view) = self.agent.last_view().filter(|v| v.decision == decision) else { return false };
        if view.all_routers_frozen {
            return true;
        }
        let (heard_epoch, heard) = &self.frozen_notices;
        decision == Decision::Freeze(*heard_epoch)
            && !view.routers.is_empty()
            && view.routers.iter().all(|r| heard.contains(r))
    }

    fn agent_outputs(&mut self, now_ms: u64, outs: Vec<AgentOutput>, out: &mut Vec<DataOutput>) {
        for o in outs {
            match o {
                AgentOutput::Send { id, replica, request } => {
                    let deadline_ms = self.agent.request_deadline_ms(id).expect("a request just sent is in flight");
                    out.push(DataOutput::Send { id, replica, request, deadline_ms });
                }
                AgentOutput::Persist(decision) => {
                    // A data node serves no clients: it keeps no endpoints.
                    let record = self.durable.decide(decision, self.agent.persisting_base(), Vec::new());
                    out.push(DataOutput::Persist(record));
                }
                AgentOutput::Act(decision) => {
                    out.push(DataOutput::Event(DataEvent::Acted(decision)));
                    // The drain acts only on the persisted decision; whether every router is
                    // frozen comes from the newest view, if it shows that same decision (its
                    // acks, or the routers it names and their notices).
                    let all_routers_frozen = self.all_routers_frozen(decision);
                    if let Some(decision) = self.own(decision, self.agent.persisted_base()) {
                        let outs = self.drain_mut().handle(DrainInput::Decision { decision, all_routers_frozen });
                        self.drain_outputs(now_ms, outs, out);
                    }
                }
                // A recovering group's view says nothing to act on: the node tells it its disk.
                AgentOutput::View(view) if view.recovering => {
                    if !view.disk_recorded {
                        let outs = self.agent.handle(now_ms, AgentInput::Recover(self.durable.summary()));
                        self.agent_outputs(now_ms, outs, out);
                    }
                }
                AgentOutput::View(view) => {
                    let own = self.own(view.decision, view.generation);
                    if let Some(decision) = own.filter(|_| view.decision == self.agent.persisted()) {
                        let input = DrainInput::Decision {
                            decision,
                            all_routers_frozen: self.all_routers_frozen(view.decision),
                        };
                        let outs = self.drain_mut().handle(input);
                        self.drain_outputs(now_ms, outs, out);
                    }
                }
            }
        }
    }
}
