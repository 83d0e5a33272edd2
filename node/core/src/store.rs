//! An in-memory table store: the old or the new universe's database in the simulator.
//!
//! The old store captures every change into its [`ChangeLog`] in the same step (as a trigger
//! would). The new store keeps the transform [`Checkpoint`] with its data, so a batch and its
//! checkpoint land together.

use crate::duties::capture::{CaptureError, ChangeLog};
use crate::duties::transform::{Batch, Checkpoint};
use crate::duties::validate::checksum;
use protocol::schema::{Row, RowOp, Schema};
use protocol::Position;
use std::collections::BTreeMap;

/// Tables: name → key → row.
pub type Tables = BTreeMap<String, BTreeMap<i64, Row>>;

/// One universe's store.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    pub tables: Tables,
    /// Captured changes (old store only).
    pub capture: ChangeLog,
    /// Transform progress (new store only).
    pub checkpoint: Checkpoint,
    /// Snapshots taken for bulk copies, by position (kept like an exported snapshot).
    pub snapshots: BTreeMap<Position, Tables>,
}

impl MemStore {
    /// An empty store with these tables.
    pub fn with_schema(schema: &Schema) -> Self {
        let tables = schema.tables.keys().map(|t| (t.clone(), BTreeMap::new())).collect();
        MemStore { tables, ..Default::default() }
    }

    fn apply_op(&mut self, op: &RowOp) {
        match op {
            RowOp::Upsert { table, key, row } => {
                self.tables.entry(table.clone()).or_default().insert(*key, row.clone());
            }
            RowOp::Delete { table, key } => {
                if let Some(rows) = self.tables.get_mut(table) {
                    rows.remove(key);
                }
            }
        }
    }

    /// A client write to the old store: applied and captured together.
    pub fn write_captured(&mut self, op: RowOp) -> Result<Position, CaptureError> {
        let position = self.capture.append(op.clone())?;
        self.apply_op(&op);
        Ok(position)
    }

    /// A client write to the new store (after the switch).
    pub fn write(&mut self, op: &RowOp) {
        self.apply_op(op);
    }

    pub fn get(&self, table: &str, key: i64) -> Option<&Row> {
        self.tables.get(table)?.get(&key)
    }

    /// Applies a transform batch and its checkpoint atomically.
    pub fn apply_batch(&mut self, batch: &Batch) {
        for op in &batch.ops {
            self.apply_op(op);
        }
        self.checkpoint = batch.checkpoint.clone();
    }

    /// Takes (or finds) the consistent snapshot at the current capture position.
    pub fn snapshot(&mut self) -> Position {
        let at = self.capture.last();
        self.snapshots.entry(at).or_insert_with(|| self.tables.clone());
        at
    }

    /// Up to `limit` rows of the snapshot at `at`, after `after`, in (table, key) order, and
    /// whether they are the last ones.
    pub fn snapshot_rows(
        &self,
        at: Position,
        after: &Option<(String, i64)>,
        limit: usize,
    ) -> (Vec<(String, i64, Row)>, bool) {
        let snapshot = self.snapshots.get(&at).expect("snapshot kept until the copy is done");
        let mut rows = Vec::with_capacity(limit);
        for (table, table_rows) in snapshot {
            let range: Box<dyn Iterator<Item = (&i64, &Row)>> = match after {
                Some((t, _)) if t > table => continue,
                Some((t, k)) if t == table => {
                    Box::new(table_rows.range((std::ops::Bound::Excluded(*k), std::ops::Bound::Unbounded)))
                }
                _ => Box::new(table_rows.iter()),
            };
            for (key, row) in range {
                if rows.len() == limit {
                    return (rows, false);
                }
                rows.push((table.clone(), *key, row.clone()));
            }
        }
        (rows, true)
    }

    pub fn checksum(&self) -> u64 {
        checksum(&self.tables)
    }
}
