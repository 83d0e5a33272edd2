//! What the adapters' tests share (`node/sqlite/tests/sqlite.rs` and
//! `node/postgres/tests/both.rs` include this file as a module of their own): an old and a new
//! store driven through the comparison by range as a data node drives them — the transform
//! core's steps, [`Ranges`] for what is compared, each operation through
//! `node_core::data_node::perform` — and the drain's comparison of what is left.

// Real databases: the wall clock times the comparisons (for the benchmark's breakdown).
#![allow(clippy::disallowed_methods)]

use node_core::data_node::{perform, StoreOp, StoreResult};
use node_core::duties::ranges::Ranges;
use node_core::duties::transform::{TransformCore, Work};
use node_core::store::{NewStore, OldStore};
use protocol::schema::RowOp;
use protocol::Position;
use std::time::{Duration, Instant};

/// The stores, the transform's core and the ranges, as one data node holds them.
pub struct Drive<'a, O: OldStore, N: NewStore> {
    pub old: &'a mut O,
    pub new: &'a mut N,
    pub core: TransformCore,
    pub ranges: Ranges,
    /// Old rows the last drain staged.
    pub staged_rows: usize,
    /// Where the comparisons' time went (summed): reading the rows, the transform catching up,
    /// staging, comparing.
    pub took: [Duration; 4],
    /// Most rows per range (the limit of [`Drive::compare_range`]'s reads).
    pub range_rows: usize,
}

impl<'a, O: OldStore, N: NewStore> Drive<'a, O, N> {
    pub fn new(old: &'a mut O, new: &'a mut N, core: TransformCore) -> Self {
        Drive {
            old,
            new,
            core,
            ranges: Ranges::new(),
            staged_rows: 0,
            took: [Duration::ZERO; 4],
            range_rows: usize::MAX,
        }
    }

    /// One transform step (the copy's or the stream's); `false` when the stream had nothing
    /// to apply. Every change read marks the ranges it changed.
    pub fn step(&mut self) -> bool {
        let batch = match self.core.next_work() {
            Work::Snapshot => match perform(self.old, self.new, StoreOp::OpenSnapshot) {
                StoreResult::SnapshotOpened { snapshot, at, .. } => {
                    self.ranges.reset();
                    self.core.copy_started(snapshot, at)
                }
                other => panic!("open a snapshot: {other:?}"),
            },
            Work::CopyChunk { snapshot, after, limit } => {
                match perform(self.old, self.new, StoreOp::ReadSnapshot { snapshot, after, limit }) {
                    StoreResult::Chunk(chunk) => self.core.copy_chunk(chunk.rows, chunk.last).expect("copy"),
                    other => panic!("read the snapshot: {other:?}"),
                }
            }
            Work::Stream { after, limit } => match perform(self.old, self.new, StoreOp::ReadChanges { after, limit }) {
                StoreResult::Changes(read) => {
                    if read.changes.is_empty() && !self.core.read_moves(read.complete_to) {
                        return false;
                    }
                    let from = self.core.checkpoint().applied;
                    for (position, op) in read.changes.iter().filter(|(p, _)| *p > from) {
                        let (RowOp::Upsert { table, key, .. } | RowOp::Delete { table, key }) = op;
                        self.ranges.changed(table, *key, *position);
                    }
                    self.core.apply_read(&read.changes, read.complete_to).expect("stream")
                }
                other => panic!("read changes: {other:?}"),
            },
        };
        assert_eq!(perform(self.old, self.new, StoreOp::Apply(batch)), StoreResult::Applied);
        true
    }

    /// Steps until the stream has been applied up to `position` (`tries` steps at most).
    pub fn catch_up(&mut self, position: Position, tries: u32) {
        for _ in 0..tries {
            if self.core.checkpoint().applied >= position {
                return;
            }
            self.step();
        }
        panic!("the stream did not reach {position:?}: {:?}", self.core.checkpoint());
    }

    /// Compares the next range that is not clean, as a data node does while traffic runs:
    /// `None` when every range is clean; else `Some(Some(matched))`, or `Some(None)` when a
    /// change read meanwhile spoiled it.
    pub fn compare_range(&mut self, limit: usize) -> Option<Option<bool>> {
        self.range_rows = limit;
        let after = self.ranges.start()?;
        let mut lap = Instant::now();
        let mut phase = |took: &mut [Duration; 4], i: usize| {
            took[i] += lap.elapsed();
            lap = Instant::now();
        };
        let (chunk, through) = match perform(self.old, self.new, StoreOp::ReadRowsToCompare { after, limit }) {
            StoreResult::RowsToCompare { chunk, through } => (chunk, through),
            other => panic!("read rows to compare: {other:?}"),
        };
        assert!(through >= chunk.position, "the rows show changes past {through:?}, all up to {:?}", chunk.position);
        self.ranges.read(chunk.rows, chunk.last, limit, chunk.position, through);
        phase(&mut self.took, 0);
        let through = self.ranges.waits_for().expect("rows read");
        self.catch_up(through, 1_000);
        phase(&mut self.took, 1);
        let rows = self.ranges.take_rows();
        match perform(self.old, self.new, StoreOp::Stage { rows, first: true }) {
            StoreResult::Staged { rejected } => self.ranges.staged(rejected),
            other => panic!("stage: {other:?}"),
        }
        phase(&mut self.took, 2);
        let outcome = match perform(self.old, self.new, StoreOp::CompareStagedKeys) {
            StoreResult::KeysCompared(found) => self.ranges.compared(found),
            other => panic!("compare staged keys: {other:?}"),
        };
        phase(&mut self.took, 3);
        Some(outcome.map(|o| matches!(o, node_core::duties::ranges::Outcome::Matched { .. })))
    }

    /// The drain's comparison, once the old store is fenced and its final position applied:
    /// the rows of the ranges not clean are staged (`chunk` at a time), the clean ranges'
    /// checksums added; whether transform(old) equals new.
    pub fn drain_matches(&mut self, chunk: usize) -> bool {
        let mut first = true;
        let mut rejected = 0;
        self.staged_rows = 0;
        let spans = self.ranges.spans();
        for span in &spans {
            let mut cursor = span.after.clone();
            let limit = span.read_limit(self.range_rows, chunk);
            loop {
                let read = self.old.rows_chunk(&cursor, limit).expect("old rows");
                let (rows, done) = span.take(read.rows, read.last);
                cursor = rows.last().map(|(t, k, _)| (t.clone(), *k)).or(cursor);
                self.staged_rows += rows.len();
                rejected += self.new.stage(&rows, first).expect("stage");
                first = false;
                if done {
                    break;
                }
            }
        }
        if first {
            self.new.stage(&[], true).expect("stage nothing");
        }
        let (expected, actual) = self.new.compare_staged().expect("compare");
        rejected == 0 && expected.wrapping_add(self.ranges.clean_digest()) == actual
    }
}
