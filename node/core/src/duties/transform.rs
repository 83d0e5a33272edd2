//! Transform: bulk copy, then the change stream, applied to the new universe exactly once by
//! position. The batches carry the old universe's rows and changes as they are: the new store
//! converts them by the plan's mapping (a database store evaluates the plan's SQL expressions and
//! generates keys itself, in the batch's transaction).
//!
//! The core decides what to read next ([`TransformCore::next_work`]) and turns what was read
//! into a [`Batch`] that the shell applies to the new store *atomically with its checkpoint*.
//! A restarted transform resumes from the checkpoint kept in the new store. The stream resumes
//! after the last applied position: a change at or before the checkpoint is skipped (exactly
//! once), a gap in positions is an error. A copy cannot resume: its snapshot died with the
//! process that opened it (as a real database's exported snapshot or read transaction does). So
//! a copy that was interrupted **restarts from a fresh snapshot**: the first batch of the new
//! copy empties the new universe's tables and sets the checkpoint to the fresh snapshot's
//! position, in one transaction. Nothing is lost (every row is copied again from a snapshot
//! that contains every change up to its position, and the stream resumes right after that
//! position) and nothing is applied twice (changes up to that position are skipped; rows are
//! upserted by key into emptied tables).

pub use crate::store::{Batch, Checkpoint, CopyState};
use crate::store::{RowCursor, SnapshotId, StoredRow};
use protocol::schema::RowOp;
use protocol::Position;

/// What the shell should read next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    /// Open a consistent snapshot of the old store and call [`TransformCore::copy_started`].
    Snapshot,
    /// Read up to `limit` rows of `snapshot` after `after` and call [`TransformCore::copy_chunk`].
    CopyChunk { snapshot: SnapshotId, after: RowCursor, limit: usize },
    /// Read up to `limit` changes after `after` and call [`TransformCore::apply_changes`].
    Stream { after: Position, limit: usize },
}

/// How a store numbers its changes, and so what a read that continues the stream looks like.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Positions {
    /// One number per change, counting up from 1 without gaps (the in-memory store, SQLite):
    /// the next change after `p` is `p + 1`, and anything else is a gap.
    #[default]
    Counted,
    /// Ordered but with gaps, every change of a source transaction at the same position (the
    /// transaction's commit LSN in PostgreSQL); the store returns whole transactions, so a
    /// checkpoint always falls between two.
    Ordered,
}

/// A change stream that does not continue where the checkpoint ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransformError {
    #[error("change stream gap: expected position {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    #[error("change stream out of order: position {got} after {after}")]
    OutOfOrder { after: u64, got: u64 },
    /// The new store refused a batch: something else moved its checkpoint.
    #[error(transparent)]
    StaleBatch(#[from] crate::store::StaleBatch),
}

/// Rows and changes per step (explicit limits, TigerBeetle style). The copy's chunk is a
/// default: a data node takes the plan's `[copy] chunk_rows`.
pub const COPY_CHUNK_ROWS: usize = 200;
pub const STREAM_BATCH_CHANGES: usize = 500;

/// Deliberately broken variants, to prove the simulator's checkers catch them.
#[cfg(feature = "planted-bugs")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransformBug {
    /// After a restart, resume one position past the checkpoint: the change right after it is
    /// lost (the classic capture-restart bug).
    ResumePastCheckpoint,
    /// After a restart mid-copy, continue the copy at its last key on a fresh snapshot while
    /// the stream continues from the old snapshot's position.
    ResumeCopyFromNewSnapshot,
    /// The data node opens its new store to client writes as soon as it has drained, before
    /// the commit (a switch that then aborts leaves writes nobody should have made).
    OpenNewWhenDrained,
}

/// The transform duty's core.
#[derive(Clone, Debug)]
pub struct TransformCore {
    checkpoint: Checkpoint,
    positions: Positions,
    /// The open snapshot of the copy in progress (volatile: it dies with the process).
    snapshot: Option<SnapshotId>,
    /// Duplicates skipped so far (changes at or before the checkpoint).
    pub duplicates_skipped: u64,
    /// Planted bug: the next change is dropped (set on resume).
    skip_next: bool,
    /// The stream held what cannot be applied row by row: the next work is a new copy.
    recopy: bool,
    /// Rows per chunk of the copy ([`COPY_CHUNK_ROWS`] unless set).
    copy_chunk_rows: usize,
    #[cfg(feature = "planted-bugs")]
    bug: Option<TransformBug>,
}

impl TransformCore {
    /// Resumes from the checkpoint read from the new store (a copy in progress restarts).
    pub fn new(checkpoint: Checkpoint) -> Self {
        TransformCore {
            checkpoint,
            positions: Positions::Counted,
            snapshot: None,
            duplicates_skipped: 0,
            skip_next: false,
            recopy: false,
            copy_chunk_rows: COPY_CHUNK_ROWS,
            #[cfg(feature = "planted-bugs")]
            bug: None,
        }
    }

    /// The same core copying `rows` rows per chunk (each chunk is one batch: one transaction
    /// of the new store). At least one.
    pub fn with_copy_chunk_rows(mut self, rows: usize) -> Self {
        assert!(rows > 0, "a chunk has rows");
        self.copy_chunk_rows = rows;
        self
    }

    /// The same core with a planted bug (simulator only), applied as if it had just resumed.
    /// The planted `resume-copy-from-new-snapshot` bug: a restarted copy keeps its key cursor.
    #[cfg(feature = "planted-bugs")]
    fn planted_resume_copy(&self) -> bool {
        self.bug == Some(TransformBug::ResumeCopyFromNewSnapshot) && self.checkpoint.copy != CopyState::NotStarted
    }

    #[cfg(feature = "planted-bugs")]
    pub fn with_bug(mut self, bug: Option<TransformBug>) -> Self {
        self.skip_next = bug == Some(TransformBug::ResumePastCheckpoint) && self.checkpoint.copy == CopyState::Done;
        self.bug = bug;
        self
    }

    /// The same core for a store that numbers its changes as `positions` says.
    pub fn with_positions(mut self, positions: Positions) -> Self {
        self.positions = positions;
        self
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    pub fn bulk_done(&self) -> bool {
        self.checkpoint.copy == CopyState::Done
    }

    /// What to read next.
    pub fn next_work(&self) -> Work {
        if self.recopy {
            return Work::Snapshot;
        }
        match &self.checkpoint.copy {
            CopyState::NotStarted => Work::Snapshot,
            CopyState::Copying { after, .. } => match self.snapshot {
                // The copy's snapshot died with an earlier incarnation: start over.
                None => Work::Snapshot,
                Some(snapshot) => Work::CopyChunk { snapshot, after: after.clone(), limit: self.copy_chunk_rows },
            },
            CopyState::Done => Work::Stream { after: self.checkpoint.applied, limit: STREAM_BATCH_CHANGES },
        }
    }

    /// A snapshot was opened at `snapshot_at`; changes up to it are covered by the copy. The
    /// batch empties the new universe (a copy that restarts leaves nothing of the last one).
    pub fn copy_started(&mut self, snapshot: SnapshotId, snapshot_at: Position) -> Batch {
        assert_eq!(self.next_work(), Work::Snapshot, "a snapshot opened while none was asked for");
        self.snapshot = Some(snapshot);
        self.recopy = false;
        let base = self.checkpoint.clone();
        #[cfg(feature = "planted-bugs")]
        if self.planted_resume_copy() {
            return Batch { base, reset: false, ops: Vec::new(), checkpoint: self.checkpoint.clone() };
        }
        let copies = base.copies + 1;
        self.checkpoint =
            Checkpoint { applied: snapshot_at, copy: CopyState::Copying { snapshot_at, after: None }, copies };
        Batch { base, reset: true, ops: Vec::new(), checkpoint: self.checkpoint.clone() }
    }

    /// The copy's snapshot is gone (the store lost its connection): the copy starts over.
    pub fn snapshot_lost(&mut self) {
        self.snapshot = None;
    }

    /// The change stream holds a change that cannot be applied row by row (a `TRUNCATE`): the
    /// copy starts again from a fresh snapshot, whose first batch empties the new universe on
    /// top of the current checkpoint (so a crash before it leaves the checkpoint as it was, and
    /// the restarted stream meets the same change again).
    pub fn copy_again(&mut self) {
        self.snapshot = None;
        self.recopy = true;
    }

    /// Converts a chunk of snapshot rows (in (table, key) order, after the checkpoint's `after`).
    /// `last` says the snapshot has no rows after this chunk.
    pub fn copy_chunk(&mut self, rows: Vec<StoredRow>, last: bool) -> Result<Batch, TransformError> {
        assert!(self.snapshot.is_some(), "copy_chunk without an open snapshot");
        let CopyState::Copying { snapshot_at, after } = &self.checkpoint.copy else {
            panic!("copy_chunk outside a copy: {:?}", self.checkpoint.copy);
        };
        let snapshot_at = *snapshot_at;
        let base = self.checkpoint.clone();
        let mut ops = Vec::with_capacity(rows.len() * 2);
        let mut cursor = after.clone();
        for (table, key, row) in rows {
            let here = (table, key);
            assert!(cursor.as_ref().is_none_or(|c| *c < here), "copy rows out of order at {here:?}");
            ops.push(RowOp::Upsert { table: here.0.clone(), key, row });
            cursor = Some(here);
        }
        self.checkpoint.copy = if last { CopyState::Done } else { CopyState::Copying { snapshot_at, after: cursor } };
        if last {
            self.snapshot = None;
        }
        Ok(Batch { base, reset: false, ops, checkpoint: self.checkpoint.clone() })
    }

    /// Converts captured changes (ascending positions). Positions at or before the checkpoint
    /// are skipped; the first new one must directly follow it.
    pub fn apply_changes(&mut self, changes: &[(Position, RowOp)]) -> Result<Batch, TransformError> {
        self.apply_read(changes, changes.last().map_or(Position(0), |(p, _)| *p))
    }

    /// Whether a read that ends at `last` moves the checkpoint even with no change to apply:
    /// with [`Positions::Ordered`], past transactions that carry nothing to apply (a fence's
    /// marker, a transaction the publication saw no row of).
    pub fn read_moves(&self, last: Position) -> bool {
        self.positions == Positions::Ordered && self.bulk_done() && last > self.checkpoint.applied
    }

    /// Converts a read of the change stream: its changes (ascending positions, as
    /// [`TransformCore::apply_changes`] takes them) and `last`. With [`Positions::Ordered`],
    /// the store's read is complete up to `last` (every change in (checkpoint, `last`] is
    /// among `changes`; see `OldStore::changes_after`), so the checkpoint moves to `last`: a
    /// store whose final position is a marker with nothing to apply is drained once read.
    /// With [`Positions::Counted`], `last` is not used.
    pub fn apply_read(&mut self, changes: &[(Position, RowOp)], last: Position) -> Result<Batch, TransformError> {
        assert!(self.bulk_done(), "changes applied before the bulk copy finished");
        let base = self.checkpoint.clone();
        let mut ops = Vec::new();
        // Skipped: what the checkpoint covers (a change of a transaction at the checkpoint's
        // position is covered too: the checkpoint falls between whole transactions).
        let from = self.checkpoint.applied;
        let mut applied = from;
        for (position, op) in changes {
            if *position <= from {
                self.duplicates_skipped += 1;
                continue;
            }
            match self.positions {
                Positions::Counted if position.0 != applied.0 + 1 => {
                    return Err(TransformError::Gap { expected: applied.0 + 1, got: position.0 });
                }
                Positions::Ordered if *position < applied => {
                    return Err(TransformError::OutOfOrder { after: applied.0, got: position.0 });
                }
                Positions::Counted | Positions::Ordered => {}
            }
            applied = *position;
            if std::mem::take(&mut self.skip_next) {
                continue;
            }
            ops.push(op.clone());
        }
        if self.positions == Positions::Ordered {
            assert!(changes.last().is_none_or(|(p, _)| *p <= last.max(from)), "a read past its own end");
            applied = applied.max(last);
        }
        self.checkpoint.applied = applied;
        Ok(Batch { base, reset: false, ops, checkpoint: self.checkpoint.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::schema::{Mapping, Row, Schema, TableSchema, Transform, Value};
    use std::collections::BTreeMap;

    fn core() -> TransformCore {
        core_at(Checkpoint::default())
    }

    trait IntoRow {
        fn into_row(self) -> protocol::schema::Row;
    }

    impl IntoRow for RowOp {
        fn into_row(self) -> protocol::schema::Row {
            match self {
                RowOp::Upsert { row, .. } => row,
                RowOp::Delete { .. } => unreachable!(),
            }
        }
    }

    fn core_at(checkpoint: Checkpoint) -> TransformCore {
        let mut tables = BTreeMap::new();
        tables.insert("t".to_string(), TableSchema { key: "id".into(), columns: vec!["id".into(), "a".into()] });
        let transforms = vec![Transform::RenameColumn { table: "t".into(), from: "a".into(), to: "b".into() }];
        let _ = Mapping::compile(&Schema { tables }, &transforms).unwrap();
        TransformCore::new(checkpoint)
    }

    fn upsert(key: i64, a: i64) -> RowOp {
        let row: Row = [("id".to_string(), Value::Int(key)), ("a".to_string(), Value::Int(a))].into_iter().collect();
        RowOp::Upsert { table: "t".into(), key, row }
    }

    #[test]
    fn copy_then_stream_exactly_once() {
        let mut t = core();
        assert_eq!(t.next_work(), Work::Snapshot);
        let b = t.copy_started(SnapshotId(1), Position(2));
        assert!(b.reset, "a copy starts from an empty new universe");
        let row = |k: i64| {
            (
                "t".to_string(),
                k,
                [("id".to_string(), Value::Int(k)), ("a".to_string(), Value::Int(0))].into_iter().collect(),
            )
        };
        let b = t.copy_chunk(vec![row(1)], false).unwrap();
        assert_eq!(b.checkpoint.copy, CopyState::Copying { snapshot_at: Position(2), after: Some(("t".into(), 1)) });
        t.copy_chunk(vec![row(2)], true).unwrap();
        assert!(t.bulk_done());
        assert_eq!(t.next_work(), Work::Stream { after: Position(2), limit: STREAM_BATCH_CHANGES });
        // Positions 1..=2 are covered by the snapshot: skipped. 3 applies. Replaying 3 is skipped.
        let b = t
            .apply_changes(&[(Position(1), upsert(1, 1)), (Position(2), upsert(2, 2)), (Position(3), upsert(3, 3))])
            .unwrap();
        assert_eq!(b.ops.len(), 1);
        assert_eq!(b.checkpoint.applied, Position(3));
        let b = t.apply_changes(&[(Position(3), upsert(3, 3))]).unwrap();
        assert!(b.ops.is_empty());
        assert_eq!(t.duplicates_skipped, 3);
        assert_eq!(t.apply_changes(&[(Position(5), upsert(5, 5))]), Err(TransformError::Gap { expected: 4, got: 5 }));
    }

    #[test]
    fn an_interrupted_copy_restarts_from_a_fresh_snapshot() {
        let mut t = core();
        t.copy_started(SnapshotId(1), Position(2));
        let row = |k: i64| ("t".to_string(), k, upsert(k, 0).into_row());
        let b = t.copy_chunk(vec![row(1)], false).unwrap();
        // The process dies: a new core resumes from the stored checkpoint without its snapshot.
        let mut t = core_at(b.checkpoint);
        assert_eq!(t.next_work(), Work::Snapshot, "the old snapshot is gone");
        let b = t.copy_started(SnapshotId(2), Position(7));
        assert!(b.reset);
        assert_eq!(
            b.checkpoint,
            Checkpoint {
                applied: Position(7),
                copy: CopyState::Copying { snapshot_at: Position(7), after: None },
                copies: 2
            },
            "the second copy"
        );
        // A copy that restarts at the same position has a checkpoint of its own: a late batch of
        // the first copy cannot land on it (regression: simulator seed 5004104).
        let mut again = core_at(b.checkpoint.clone());
        let first = again.copy_started(SnapshotId(3), Position(7));
        assert_eq!(first.base, b.checkpoint);
        assert_ne!(first.checkpoint, b.checkpoint, "same position, another copy");
        assert_eq!(t.next_work(), Work::CopyChunk { snapshot: SnapshotId(2), after: None, limit: COPY_CHUNK_ROWS });
        t.snapshot_lost();
        assert_eq!(t.next_work(), Work::Snapshot);
    }

    #[test]
    fn ordered_positions_take_whole_transactions_at_one_position_and_skip_by_it() {
        let mut t = core_at(Checkpoint { applied: Position(100), copy: CopyState::Done, copies: 1 })
            .with_positions(Positions::Ordered);
        // Transaction at 100 (covered), then transactions at 140 (two changes) and 170.
        let b = t
            .apply_changes(&[
                (Position(100), upsert(1, 1)),
                (Position(140), upsert(2, 2)),
                (Position(140), upsert(3, 3)),
                (Position(170), upsert(4, 4)),
            ])
            .unwrap();
        assert_eq!((b.ops.len(), b.checkpoint.applied), (3, Position(170)), "both changes at 140 apply");
        assert_eq!(t.duplicates_skipped, 1);
        let again = t.apply_changes(&[(Position(170), upsert(4, 4)), (Position(200), upsert(5, 5))]).unwrap();
        assert_eq!(again.ops.len(), 1, "a transaction read again is skipped whole");
        assert_eq!(
            t.apply_changes(&[(Position(300), upsert(6, 6)), (Position(250), upsert(7, 7))]),
            Err(TransformError::OutOfOrder { after: 300, got: 250 })
        );
        // A read complete up to 260 with nothing to apply (a fence's marker) moves the
        // checkpoint there; a read that ends before the checkpoint does not move it back.
        assert!(t.read_moves(Position(260)));
        let marker = t.apply_read(&[], Position(260)).unwrap();
        assert_eq!((marker.ops.len(), marker.checkpoint.applied), (0, Position(260)));
        assert!(!t.read_moves(Position(200)));
        assert_eq!(t.apply_read(&[], Position(200)).unwrap().checkpoint.applied, Position(260));
        // Counted positions keep the gap check.
        let mut counted = core_at(Checkpoint { applied: Position(3), copy: CopyState::Done, copies: 1 });
        assert_eq!(
            counted.apply_changes(&[(Position(5), upsert(5, 5))]),
            Err(TransformError::Gap { expected: 4, got: 5 })
        );
    }
}
