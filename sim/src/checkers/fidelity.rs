//! Transform fidelity by position, checked by the simulator itself (not by the code under test).
//!
//! The simulator keeps every version of every old-universe row with the change position that
//! wrote it. Whenever a data node applies a transform batch whose checkpoint says "everything
//! up to position `p` is here", every row the batch wrote must equal the transformed version of
//! its old row as of `p`. A copy read from the wrong snapshot, a change applied out of order or
//! to the wrong row, or a stream resumed from the wrong position breaks this at once.

use node_core::store::{MemStore, Tables};
use protocol::schema::{Mapping, Row, RowOp, REQUEST_LOG_TABLE};
use protocol::Position;
use std::collections::BTreeMap;

/// The versions of one row: (position that wrote it, the row or `None` when deleted).
type Versions = Vec<(Position, Option<Row>)>;

/// Every version of the old rows of one shard, by table and key.
#[derive(Debug, Default)]
pub struct History {
    versions: BTreeMap<String, BTreeMap<i64, Versions>>,
}

impl History {
    /// Rows present before capture started (position 0).
    pub fn initial(tables: &Tables) -> History {
        let mut h = History::default();
        for (table, rows) in tables {
            for (key, row) in rows {
                h.versions.entry(table.clone()).or_default().insert(*key, vec![(Position(0), Some(row.clone()))]);
            }
        }
        h
    }

    /// A captured change at `position`.
    pub fn record(&mut self, position: Position, op: RowOp) {
        let (table, key, row) = match op {
            RowOp::Upsert { table, key, row } => (table, key, Some(row)),
            RowOp::Delete { table, key } => (table, key, None),
        };
        let versions = self.versions.entry(table).or_default().entry(key).or_default();
        assert!(versions.last().is_none_or(|(p, _)| *p < position), "positions grow");
        versions.push((position, row));
    }

    /// The old row as of `position` (`None`: absent then).
    pub fn at(&self, table: &str, key: i64, position: Position) -> Option<&Row> {
        let versions = self.versions.get(table)?.get(&key)?;
        let i = versions.partition_point(|(p, _)| *p <= position);
        versions[..i].last().and_then(|(_, row)| row.as_ref())
    }
}

/// The checker: which old table feeds each new table.
#[derive(Debug)]
pub struct Fidelity {
    source_of: BTreeMap<String, String>,
    pub shards: Vec<History>,
}

impl Fidelity {
    pub fn new(mapping: &Mapping) -> Fidelity {
        let mut source_of: BTreeMap<String, String> = mapping
            .outputs
            .iter()
            .flat_map(|(old, outputs)| outputs.iter().map(move |o| (o.table.clone(), old.clone())))
            .collect();
        // Every mapping passes the request log through unchanged.
        source_of.insert(REQUEST_LOG_TABLE.to_string(), REQUEST_LOG_TABLE.to_string());
        Fidelity { source_of, shards: Vec::new() }
    }

    /// Checks the rows a batch wrote (its old-schema changes, converted) against the old rows as
    /// of the batch's checkpoint; returns
    /// the first row that differs, described.
    pub fn check_batch(
        &self,
        shard: usize,
        mapping: &Mapping,
        ops: &[RowOp],
        position: Position,
        new: &MemStore,
    ) -> Option<String> {
        // A batch carries old-schema changes: the rows they write are their conversions (the
        // simulator's plans have neither generated keys nor SQL expressions).
        let written: Vec<RowOp> = ops.iter().flat_map(|op| mapping.convert(op).unwrap_or_default()).collect();
        for op in &written {
            let (table, key) = match op {
                RowOp::Upsert { table, key, .. } | RowOp::Delete { table, key } => (table, *key),
            };
            let source = self.source_of.get(table).expect("every new table has an old source");
            let expected = match self.shards[shard].at(source, key, position) {
                None => None,
                Some(row) => {
                    let upsert = RowOp::Upsert { table: source.clone(), key, row: row.clone() };
                    mapping.convert(&upsert).ok()?.into_iter().find_map(|c| match c {
                        RowOp::Upsert { table: t, row, .. } if t == *table => Some(row),
                        _ => None,
                    })
                }
            };
            let actual = new.get(table, key);
            if actual != expected.as_ref() {
                return Some(format!(
                    "{table}/{key} is {actual:?} after a batch up to position {}, but {source}/{key} at that position transforms to {expected:?}",
                    position.0
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::schema::Value;

    fn row(v: i64) -> Row {
        [("v".to_string(), Value::Int(v))].into_iter().collect()
    }

    #[test]
    fn versions_are_found_by_position() {
        let mut h = History::default();
        h.record(Position(2), RowOp::Upsert { table: "t".into(), key: 1, row: row(2) });
        h.record(Position(5), RowOp::Delete { table: "t".into(), key: 1 });
        h.record(Position(7), RowOp::Upsert { table: "t".into(), key: 1, row: row(7) });
        assert_eq!(h.at("t", 1, Position(1)), None);
        assert_eq!(h.at("t", 1, Position(4)), Some(&row(2)));
        assert_eq!(h.at("t", 1, Position(5)), None);
        assert_eq!(h.at("t", 1, Position(9)), Some(&row(7)));
        assert_eq!(h.at("t", 2, Position(9)), None);
    }
}
