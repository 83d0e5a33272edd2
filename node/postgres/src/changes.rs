//! The captured change stream as Imago reads it: whole source transactions, every change of one
//! at the position of its commit (the commit record's end LSN), buffered between the replication
//! connection and the reader.
//!
//! Pure: [`Buffer`] is fed the stream's events (a transaction's begin, its pgoutput messages,
//! logical messages, its commit) and answers reads. The replication connection that feeds it is
//! `stream.rs`'s.

use crate::pgoutput::{self, OldTuple, PgOutput, Tuple};
use protocol::schema::{Row, RowOp, Value};
use protocol::Position;
use std::collections::{BTreeMap, VecDeque};

/// PostgreSQL's type oids of the integer types: their values are [`Value::Int`].
pub const INT2: u32 = 21;
pub const INT4: u32 = 23;
pub const INT8: u32 = 20;

/// The prefix of the fence's logical message (`pg_logical_emit_message`).
pub const FENCE_MESSAGE_PREFIX: &str = "imago_fence";
/// Prefix of the logical message a comparison by range emits after it read its rows: a
/// transaction of its own, with nothing to apply, whose commit the stream brings after every
/// transaction the read saw.
pub const COMPARE_MESSAGE_PREFIX: &str = "imago_compare";

/// One change of the old database, at the position of the transaction that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgChange {
    /// The end LSN of the source transaction's commit: every change of one transaction has the
    /// same position, and a read returns whole transactions only.
    pub position: Position,
    pub op: PgOp,
}

/// What a change does. [`RowOp`] says most of it; what it cannot say has a variant of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgOp {
    /// A whole row written (insert, or update with every column known), or a row deleted. A
    /// key-changing update is a `Delete` of the old key, then an `Upsert` of the new row.
    Row(RowOp),
    /// An update whose new row lacks columns: pgoutput does not send a TOASTed value the update
    /// left unchanged (a value stored out of line, over about 2 kB), and the old row carries it
    /// only under `REPLICA IDENTITY FULL` (then the row is completed from it and this is a
    /// [`PgOp::Row`]). Apply it by setting `row`'s columns and keeping the `unchanged` ones as
    /// they are on the row at `moved_from`, or at `key` when the key did not change; a row moved
    /// to a new key leaves its old key (`moved_from`) deleted.
    PartialUpdate { table: String, key: i64, row: Row, unchanged: Vec<String>, moved_from: Option<i64> },
    /// `TRUNCATE`: every row of `table` is gone. pgoutput names the table, not its rows.
    Truncate { table: String },
    /// The fence's marker (an empty transaction): nothing to apply. Everything written before
    /// the fence is at an earlier position; the fence's final position is this one.
    Fence,
}

impl PgChange {
    /// The change as a [`RowOp`], when it is one.
    pub fn row_op(&self) -> Option<&RowOp> {
        match &self.op {
            PgOp::Row(op) => Some(op),
            _ => None,
        }
    }
}

/// Why the stream's content cannot be turned into changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("the stream names relation {oid}, which is not a captured table")]
    UnknownRelation { oid: u32 },
    #[error("a change to relation {oid} came before its Relation message")]
    NoRelation { oid: u32 },
    /// The table's definition changed since the capture began: DDL is not carried.
    #[error("table `{table}` changed since the capture began (DDL is not carried): {what}")]
    Changed { table: String, what: String },
    #[error("table `{table}`, column `{column}`: {what}")]
    Value { table: String, column: String, what: String },
    #[error("{0} outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("unexpected pgoutput message in the stream: {0}")]
    Unexpected(String),
}

/// A captured table as the stream reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    pub name: String,
    pub oid: u32,
    pub key: String,
    /// In the plan's order.
    pub columns: Vec<ColumnInfo>,
}

/// A column and its type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    pub type_oid: u32,
}

impl ColumnInfo {
    pub fn is_int(&self) -> bool {
        is_int(self.type_oid)
    }
}

pub fn is_int(type_oid: u32) -> bool {
    matches!(type_oid, INT2 | INT4 | INT8)
}

/// A value in PostgreSQL's text format (`None`: NULL) as Imago carries it: integers as
/// [`Value::Int`], everything else as text.
pub fn value_of(table: &str, column: &ColumnInfo, text: Option<&str>) -> Result<Value, ChangeError> {
    match text {
        None => Ok(Value::Null),
        Some(t) if column.is_int() => t.parse().map(Value::Int).map_err(|_| ChangeError::Value {
            table: table.into(),
            column: column.name.clone(),
            what: format!("{t:?} is not a 64-bit integer"),
        }),
        Some(t) => Ok(Value::Text(t.to_string())),
    }
}

/// A committed transaction's changes, at its position.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Transaction {
    end: Position,
    ops: Vec<PgOp>,
    /// What its messages weighed on the wire (the buffer's measure).
    bytes: usize,
}

/// The transaction being received.
#[derive(Debug)]
struct Receiving {
    ops: Vec<PgOp>,
    bytes: usize,
    /// Kept in the buffer; otherwise read past (the buffer was full) and dropped.
    kept: bool,
    /// The contents of the fence markers it carries.
    markers: Vec<String>,
}

/// What a commit completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub end: Position,
    /// The fence markers (their contents) the transaction carried.
    pub markers: Vec<String>,
}

/// Received transactions not yet given up by the reader, bounded.
///
/// The buffer holds every transaction whose position is in `(floor, top]` that has changes for
/// Imago, `top` being its last. A read after `after` gives up every transaction at or before
/// `after` (the reader says it has them) and answers from the rest. It holds about
/// [`Buffer::max_bytes`] of transactions: beyond that it is not filled ([`Buffer::wants_more`]),
/// except that a transaction is always held whole, however large, because it is applied whole.
/// A transaction that must be read past while the buffer is full (the fence reads on to its
/// marker) is dropped, and the buffer is then `overflowed`: what follows `top` must be read
/// again from the slot before anything after `top` is answered.
#[derive(Debug)]
pub struct Buffer {
    tables: BTreeMap<u32, TableInfo>,
    /// The stream's description of each relation, by oid: its columns in the stream's order.
    relations: BTreeMap<u32, Vec<ColumnInfo>>,
    receiving: Option<Receiving>,
    ready: VecDeque<Transaction>,
    bytes: usize,
    max_bytes: usize,
    floor: Position,
    overflowed: bool,
    captured: Position,
}

impl Buffer {
    /// An empty buffer for a stream that starts after `start` (the slot's confirmed position).
    pub fn new(tables: impl IntoIterator<Item = TableInfo>, start: Position, max_bytes: usize) -> Self {
        Buffer {
            tables: tables.into_iter().map(|t| (t.oid, t)).collect(),
            relations: BTreeMap::new(),
            receiving: None,
            ready: VecDeque::new(),
            bytes: 0,
            max_bytes,
            floor: start,
            overflowed: false,
            captured: start,
        }
    }

    /// Every transaction at or before this position is given up (or was never wanted).
    pub fn floor(&self) -> Position {
        self.floor
    }

    /// The end of the last complete transaction received (read past or not).
    pub fn captured(&self) -> Position {
        self.captured
    }

    /// Transactions after the buffer's last were dropped: they must be read again.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Bytes of the transactions held, the one being received included.
    pub fn bytes(&self) -> usize {
        self.bytes + self.receiving.as_ref().map_or(0, |r| if r.kept { r.bytes } else { 0 })
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Whether a reader should read on: the buffer has room, or holds no complete transaction
    /// (so the one being received must be read to its end, however large).
    pub fn wants_more(&self) -> bool {
        !self.overflowed && (self.bytes() < self.max_bytes || self.ready.is_empty())
    }

    /// Gives up the transactions at or before `after`: the reader has them.
    pub fn give_up_to(&mut self, after: Position) {
        while let Some(first) = self.ready.front() {
            if first.end > after {
                break;
            }
            self.bytes -= first.bytes;
            self.ready.pop_front();
        }
        self.floor = self.floor.max(after);
    }

    /// Whether a transaction after `after` is held.
    pub fn holds_after(&self, after: Position) -> bool {
        self.ready.back().is_some_and(|t| t.end > after)
    }

    /// Whole transactions after `after`, in order, until `limit` changes are reached (a single
    /// transaction larger than `limit` comes whole). Nothing is given up.
    pub fn read(&self, after: Position, limit: usize) -> Vec<PgChange> {
        let mut changes = Vec::new();
        for t in self.ready.iter().filter(|t| t.end > after) {
            if changes.len() >= limit {
                break;
            }
            changes.extend(t.ops.iter().map(|op| PgChange { position: t.end, op: op.clone() }));
        }
        changes
    }

    /// A transaction begins.
    pub fn begin(&mut self) -> Result<(), ChangeError> {
        if self.receiving.is_some() {
            return Err(ChangeError::Unexpected("a Begin inside a transaction".into()));
        }
        let kept = self.wants_more();
        self.overflowed |= !kept;
        self.receiving = Some(Receiving { ops: Vec::new(), bytes: 0, kept, markers: Vec::new() });
        Ok(())
    }

    /// A pgoutput message of the transaction being received, `size` bytes on the wire.
    pub fn message(&mut self, message: PgOutput, size: usize) -> Result<(), ChangeError> {
        if let PgOutput::Relation(relation) = message {
            // Always read, even in a transaction read past: the stream sends it once.
            return self.relation(relation);
        }
        if let PgOutput::Message(m) = message {
            self.logical_message(m.transactional, &m.prefix, &m.content);
            return Ok(());
        }
        let receiving = self.receiving.as_mut().ok_or(ChangeError::OutsideTransaction("a row change"))?;
        receiving.bytes += size;
        if !receiving.kept {
            return Ok(());
        }
        let ops = convert(&self.tables, &self.relations, message)?;
        if let Some(receiving) = self.receiving.as_mut() {
            receiving.ops.extend(ops);
        }
        Ok(())
    }

    /// A logical message (`pg_logical_emit_message`). Only the fence's transactional markers
    /// mean anything here; others (another application's) are ignored.
    pub fn logical_message(&mut self, transactional: bool, prefix: &str, content: &[u8]) {
        if !transactional || prefix != FENCE_MESSAGE_PREFIX {
            return;
        }
        if let Some(receiving) = self.receiving.as_mut() {
            receiving.markers.push(String::from_utf8_lossy(content).into_owned());
            if receiving.kept && !receiving.ops.contains(&PgOp::Fence) {
                receiving.ops.push(PgOp::Fence);
            }
        }
    }

    /// The transaction being received commits; `end` is its commit's end LSN.
    pub fn commit(&mut self, end: Position) -> Result<Committed, ChangeError> {
        let receiving = self.receiving.take().ok_or(ChangeError::OutsideTransaction("a Commit"))?;
        self.captured = self.captured.max(end);
        // A transaction at or before the floor was given up (a slot re-sends what it was not
        // told was applied); one without changes for Imago takes no room.
        if receiving.kept && end > self.floor && !receiving.ops.is_empty() {
            self.bytes += receiving.bytes;
            self.ready.push_back(Transaction { end, ops: receiving.ops, bytes: receiving.bytes });
        }
        Ok(Committed { end, markers: receiving.markers })
    }

    fn relation(&mut self, relation: pgoutput::Relation) -> Result<(), ChangeError> {
        let table = self.tables.get(&relation.oid).ok_or(ChangeError::UnknownRelation { oid: relation.oid })?;
        let columns: Vec<ColumnInfo> =
            relation.columns.iter().map(|c| ColumnInfo { name: c.name.clone(), type_oid: c.type_oid }).collect();
        let mut theirs: Vec<&ColumnInfo> = columns.iter().collect();
        let mut ours: Vec<&ColumnInfo> = table.columns.iter().collect();
        theirs.sort_by(|a, b| a.name.cmp(&b.name));
        ours.sort_by(|a, b| a.name.cmp(&b.name));
        if theirs != ours {
            let list = |cs: &[&ColumnInfo]| cs.iter().map(|c| format!("{}:{}", c.name, c.type_oid)).collect::<Vec<_>>();
            return Err(ChangeError::Changed {
                table: table.name.clone(),
                what: format!("columns (name:type oid) {:?}, captured as {:?}", list(&theirs), list(&ours)),
            });
        }
        self.relations.insert(relation.oid, columns);
        Ok(())
    }
}

/// The ops of one row change.
fn convert(
    tables: &BTreeMap<u32, TableInfo>,
    relations: &BTreeMap<u32, Vec<ColumnInfo>>,
    message: PgOutput,
) -> Result<Vec<PgOp>, ChangeError> {
    let described = |oid: u32| -> Result<(&TableInfo, &Vec<ColumnInfo>), ChangeError> {
        let table = tables.get(&oid).ok_or(ChangeError::UnknownRelation { oid })?;
        let columns = relations.get(&oid).ok_or(ChangeError::NoRelation { oid })?;
        Ok((table, columns))
    };
    match message {
        PgOutput::Insert(insert) => {
            let (table, columns) = described(insert.relation)?;
            let decoded = decode_tuple(table, columns, &insert.new)?;
            if let Some(column) = decoded.unchanged.first() {
                return Err(value_error(table, column, "an insert without the column's value"));
            }
            Ok(vec![PgOp::Row(RowOp::Upsert { table: table.name.clone(), key: decoded.key(table)?, row: decoded.row })])
        }
        PgOutput::Update(update) => {
            let (table, columns) = described(update.relation)?;
            let mut new = decode_tuple(table, columns, &update.new)?;
            let key = new.key(table)?;
            let old = match &update.old {
                Some(OldTuple::Key(t)) | Some(OldTuple::Full(t)) => Some(decode_tuple(table, columns, t)?),
                None => None,
            };
            let old_key = match &old {
                Some(old) => Some(old.key(table)?),
                None => None,
            };
            if let (Some(OldTuple::Full(_)), Some(old)) = (&update.old, &old) {
                // Unchanged means equal to the old row's value, which REPLICA IDENTITY FULL sends.
                new.fill_from(old);
            }
            let moved_from = old_key.filter(|k| *k != key);
            let name = table.name.clone();
            if new.unchanged.is_empty() {
                let mut ops = Vec::with_capacity(2);
                if let Some(from) = moved_from {
                    ops.push(PgOp::Row(RowOp::Delete { table: name.clone(), key: from }));
                }
                ops.push(PgOp::Row(RowOp::Upsert { table: name, key, row: new.row }));
                Ok(ops)
            } else {
                Ok(vec![PgOp::PartialUpdate { table: name, key, row: new.row, unchanged: new.unchanged, moved_from }])
            }
        }
        PgOutput::Delete(delete) => {
            let (table, columns) = described(delete.relation)?;
            let (OldTuple::Key(old) | OldTuple::Full(old)) = &delete.old;
            let key = decode_tuple(table, columns, old)?.key(table)?;
            Ok(vec![PgOp::Row(RowOp::Delete { table: table.name.clone(), key })])
        }
        PgOutput::Truncate(truncate) => truncate
            .relations
            .iter()
            .map(|oid| {
                let table = tables.get(oid).ok_or(ChangeError::UnknownRelation { oid: *oid })?;
                Ok(PgOp::Truncate { table: table.name.clone() })
            })
            .collect(),
        // A type before a relation using it, and a transaction's origin: nothing for Imago.
        PgOutput::Type(_) | PgOutput::Origin(_) => Ok(Vec::new()),
        other => Err(ChangeError::Unexpected(format!("{other:?}"))),
    }
}

/// A tuple's values by column name, and the columns it did not carry (unchanged TOAST).
struct Decoded {
    row: Row,
    unchanged: Vec<String>,
}

impl Decoded {
    fn key(&self, table: &TableInfo) -> Result<i64, ChangeError> {
        match self.row.get(&table.key) {
            Some(Value::Int(k)) => Ok(*k),
            _ => Err(value_error(table, &table.key, "a key that is not an integer")),
        }
    }

    /// Takes the unchanged columns' values from `old` where it has them.
    fn fill_from(&mut self, old: &Decoded) {
        let mut still = Vec::new();
        for column in std::mem::take(&mut self.unchanged) {
            match old.row.get(&column) {
                Some(value) => {
                    self.row.insert(column, value.clone());
                }
                None => still.push(column),
            }
        }
        self.unchanged = still;
    }
}

fn value_error(table: &TableInfo, column: &str, what: &str) -> ChangeError {
    ChangeError::Value { table: table.name.clone(), column: column.into(), what: what.into() }
}

fn decode_tuple(table: &TableInfo, columns: &[ColumnInfo], tuple: &Tuple) -> Result<Decoded, ChangeError> {
    if tuple.0.len() != columns.len() {
        return Err(ChangeError::Changed {
            table: table.name.clone(),
            what: format!("a row of {} columns, described with {}", tuple.0.len(), columns.len()),
        });
    }
    let mut decoded = Decoded { row: Row::new(), unchanged: Vec::new() };
    for (column, value) in columns.iter().zip(&tuple.0) {
        let value = match value {
            pgoutput::Value::Null => Value::Null,
            pgoutput::Value::UnchangedToast => {
                decoded.unchanged.push(column.name.clone());
                continue;
            }
            pgoutput::Value::Text(bytes) => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| value_error(table, &column.name, "text that is not UTF-8"))?;
                value_of(&table.name, column, Some(text))?
            }
            pgoutput::Value::Binary(_) => {
                return Err(value_error(table, &column.name, "a binary value (not asked for)"))
            }
        };
        decoded.row.insert(column.name.clone(), value);
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, Delete, Insert, Relation, ReplicaIdentity, Truncate, Update};

    const T: u32 = 16400;

    fn table() -> TableInfo {
        TableInfo {
            name: "t".into(),
            oid: T,
            key: "id".into(),
            columns: vec![
                ColumnInfo { name: "id".into(), type_oid: INT4 },
                ColumnInfo { name: "v".into(), type_oid: 25 },
                ColumnInfo { name: "big".into(), type_oid: 25 },
            ],
        }
    }

    fn relation() -> PgOutput {
        let column = |flags, name: &str, type_oid| Column { flags, name: name.into(), type_oid, type_modifier: -1 };
        PgOutput::Relation(Relation {
            oid: T,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            // The stream's order need not be the plan's.
            columns: vec![column(1, "id", INT4), column(0, "big", 25), column(0, "v", 25)],
        })
    }

    fn t(s: &str) -> pgoutput::Value {
        pgoutput::Value::Text(s.as_bytes().to_vec())
    }

    /// (id, big, v) in the stream's order.
    fn tuple(id: &str, big: pgoutput::Value, v: &str) -> Tuple {
        Tuple(vec![t(id), big, t(v)])
    }

    fn insert(id: &str, v: &str) -> PgOutput {
        PgOutput::Insert(Insert { relation: T, new: tuple(id, pgoutput::Value::Null, v) })
    }

    fn row(id: i64, v: &str) -> Row {
        [("id".to_string(), Value::Int(id)), ("big".to_string(), Value::Null), ("v".to_string(), Value::Text(v.into()))]
            .into()
    }

    fn buffer(max_bytes: usize) -> Buffer {
        let mut b = Buffer::new([table()], Position(100), max_bytes);
        b.begin().unwrap();
        b.message(relation(), 10).unwrap();
        b.commit(Position(100)).unwrap();
        b
    }

    /// One transaction of `messages` (each 10 bytes), committed at `end`.
    fn transaction(b: &mut Buffer, end: u64, messages: Vec<PgOutput>) -> Committed {
        b.begin().unwrap();
        for m in messages {
            b.message(m, 10).unwrap();
        }
        b.commit(Position(end)).unwrap()
    }

    fn upsert(id: i64, v: &str) -> PgOp {
        PgOp::Row(RowOp::Upsert { table: "t".into(), key: id, row: row(id, v) })
    }

    #[test]
    fn reads_return_whole_transactions_at_their_commit() {
        let mut b = buffer(1 << 20);
        transaction(&mut b, 200, vec![insert("1", "a"), insert("2", "b"), insert("3", "c")]);
        transaction(&mut b, 300, vec![insert("4", "d")]);
        let first = b.read(Position(100), 1);
        assert_eq!(first.len(), 3, "a transaction larger than the limit comes whole");
        assert!(first.iter().all(|c| c.position == Position(200)));
        assert_eq!(first[2].op, upsert(3, "c"));
        assert_eq!(b.read(Position(100), 4).len(), 4, "the next transaction once the limit allows");
        assert_eq!(b.read(Position(100), 3).len(), 3, "never split");
        assert_eq!(b.read(Position(200), 10), vec![PgChange { position: Position(300), op: upsert(4, "d") }]);
        assert_eq!(b.read(Position(300), 10), vec![]);
        assert_eq!(b.read(Position(100), 0), vec![], "nothing asked, nothing read");
        assert_eq!(b.captured(), Position(300));
    }

    #[test]
    fn giving_up_frees_room_and_what_the_slot_sends_again_is_skipped() {
        let mut b = buffer(25);
        transaction(&mut b, 200, vec![insert("1", "a"), insert("2", "b")]);
        assert!(b.wants_more(), "20 bytes of 25");
        transaction(&mut b, 300, vec![insert("3", "c")]);
        assert!(!b.wants_more(), "full");
        b.give_up_to(Position(200));
        assert_eq!((b.floor(), b.bytes()), (Position(200), 10));
        assert!(b.wants_more());
        // The slot sends a given-up transaction again (it was not told it was applied).
        transaction(&mut b, 150, vec![insert("9", "z")]);
        assert_eq!(b.read(Position(100), 10).len(), 1, "only the one at 300");
        assert!(b.holds_after(Position(200)) && !b.holds_after(Position(300)));
    }

    #[test]
    fn a_full_buffer_still_takes_a_whole_transaction_and_reading_past_it_overflows() {
        let mut b = buffer(15);
        // Nothing complete is held: a transaction is read whole, however large.
        b.begin().unwrap();
        for i in 1..=5 {
            b.message(insert(&i.to_string(), "x"), 10).unwrap();
            assert!(b.wants_more(), "nothing complete yet");
        }
        b.commit(Position(200)).unwrap();
        assert!(!b.wants_more());
        // Read past (as the fence does): dropped, and the buffer says it overflowed.
        let committed = transaction(
            &mut b,
            300,
            vec![PgOutput::Message(pgoutput::Message {
                transactional: true,
                lsn: pgoutput::Lsn(250),
                prefix: FENCE_MESSAGE_PREFIX.into(),
                content: b"42".to_vec(),
            })],
        );
        assert_eq!(committed, Committed { end: Position(300), markers: vec!["42".into()] });
        assert!(b.overflowed() && !b.wants_more());
        assert_eq!(b.captured(), Position(300));
        assert_eq!(b.read(Position(100), 100).len(), 5, "the dropped transaction is not answered");
    }

    #[test]
    fn the_fence_marker_is_an_empty_transaction_and_other_messages_are_nothing() {
        let mut b = buffer(1 << 20);
        b.begin().unwrap();
        b.logical_message(true, "someone.else", b"x");
        b.logical_message(true, FENCE_MESSAGE_PREFIX, b"7");
        let committed = b.commit(Position(200)).unwrap();
        assert_eq!(committed.markers, vec!["7".to_string()]);
        transaction(&mut b, 300, vec![]);
        b.begin().unwrap();
        b.logical_message(true, "someone.else", b"x");
        b.commit(Position(400)).unwrap();
        b.logical_message(false, FENCE_MESSAGE_PREFIX, b"8");
        assert_eq!(b.read(Position(100), 10), vec![PgChange { position: Position(200), op: PgOp::Fence }]);
        assert_eq!(b.captured(), Position(400));
    }

    #[test]
    fn updates_deletes_and_truncates() {
        let mut b = buffer(1 << 20);
        let key = |id: &str| Tuple(vec![t(id), pgoutput::Value::Null, pgoutput::Value::Null]);
        let moved =
            Update { relation: T, old: Some(OldTuple::Key(key("1"))), new: tuple("10", pgoutput::Value::Null, "a") };
        let same = Update { relation: T, old: None, new: tuple("2", pgoutput::Value::Null, "b") };
        let toast = Update { relation: T, old: None, new: tuple("3", pgoutput::Value::UnchangedToast, "c") };
        let toast_moved = Update {
            relation: T,
            old: Some(OldTuple::Key(key("3"))),
            new: tuple("30", pgoutput::Value::UnchangedToast, "c"),
        };
        let full = Update {
            relation: T,
            old: Some(OldTuple::Full(tuple("4", t("long"), "d"))),
            new: tuple("4", pgoutput::Value::UnchangedToast, "e"),
        };
        let delete = Delete { relation: T, old: OldTuple::Key(key("5")) };
        let messages = vec![
            PgOutput::Update(moved),
            PgOutput::Update(same),
            PgOutput::Update(toast),
            PgOutput::Update(toast_moved),
            PgOutput::Update(full),
            PgOutput::Delete(delete),
            PgOutput::Truncate(Truncate { options: 0, relations: vec![T] }),
        ];
        transaction(&mut b, 200, messages);
        let ops: Vec<PgOp> = b.read(Position(100), 100).into_iter().map(|c| c.op).collect();
        let partial = |key, moved_from| {
            let row: Row = [("id".to_string(), Value::Int(key)), ("v".to_string(), Value::Text("c".into()))].into();
            PgOp::PartialUpdate { table: "t".into(), key, row, unchanged: vec!["big".into()], moved_from }
        };
        let mut filled = row(4, "e");
        filled.insert("big".into(), Value::Text("long".into()));
        assert_eq!(
            ops,
            vec![
                PgOp::Row(RowOp::Delete { table: "t".into(), key: 1 }),
                upsert(10, "a"),
                upsert(2, "b"),
                partial(3, None),
                partial(30, Some(3)),
                PgOp::Row(RowOp::Upsert { table: "t".into(), key: 4, row: filled }),
                PgOp::Row(RowOp::Delete { table: "t".into(), key: 5 }),
                PgOp::Truncate { table: "t".into() },
            ]
        );
    }

    #[test]
    fn what_cannot_be_carried_is_refused_by_name() {
        let mut b = buffer(1 << 20);
        b.begin().unwrap();
        let e = b.message(PgOutput::Insert(Insert { relation: 99, new: tuple("1", pgoutput::Value::Null, "a") }), 1);
        assert_eq!(e, Err(ChangeError::UnknownRelation { oid: 99 }));
        let e = b.message(insert("x", "a"), 1).unwrap_err();
        assert_eq!(e.to_string(), "table `t`, column `id`: \"x\" is not a 64-bit integer");
        let e = b.message(
            PgOutput::Insert(Insert { relation: T, new: tuple("1", pgoutput::Value::UnchangedToast, "a") }),
            1,
        );
        assert!(matches!(e, Err(ChangeError::Value { column, .. }) if column == "big"));
        let PgOutput::Relation(mut altered) = relation() else { unreachable!() };
        altered.columns.pop();
        let e = b.message(PgOutput::Relation(altered), 1).unwrap_err();
        assert!(e.to_string().starts_with("table `t` changed since the capture began"), "{e}");
        assert_eq!(b.commit(Position(200)).map(|c| c.end), Ok(Position(200)));
        assert!(matches!(b.commit(Position(300)), Err(ChangeError::OutsideTransaction(_))));
        assert!(matches!(b.message(insert("1", "a"), 1), Err(ChangeError::OutsideTransaction(_))));
        let mut fresh = Buffer::new([table()], Position(0), 100);
        fresh.begin().unwrap();
        assert_eq!(fresh.message(insert("1", "a"), 1), Err(ChangeError::NoRelation { oid: T }));
    }
}
