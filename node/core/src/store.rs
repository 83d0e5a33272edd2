//! The data-store interface, and [`MemStore`], the in-memory table store that implements it.
//!
//! A data node reads the old universe's store ([`OldStore`]) and writes the new universe's
//! ([`NewStore`]). The data-node core decides every read and write; a shell performs them
//! through these traits (the simulator on `MemStore`, the SQLite and PostgreSQL adapters on
//! real databases) and hands the results back.
//!
//! The interface carries real databases' limits:
//! - a snapshot handle ([`SnapshotId`]) lives only as long as the process that opened it (an
//!   exported PostgreSQL snapshot or an SQLite read transaction dies with its connection);
//!   [`OldStore::disconnect`] is what a crash does to it;
//! - a batch and the checkpoint it reaches are applied in one transaction, together with an
//!   optional reset of the new universe's tables ([`Batch::reset`]) when a copy restarts.

use crate::duties::capture::{CaptureError, ChangeLog};
use crate::duties::validate::row_hash;
use crate::{RequestKey, StoreAnswer};
use protocol::schema::{ConvertError, KeyMap, Mapping, Row, RowOp, Schema, Value, REQUEST_LOG_TABLE};
use protocol::Position;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Tables: name → key → row.
pub type Tables = BTreeMap<String, BTreeMap<i64, Row>>;

/// A row as read from a store: (table, key, row), in (table, key) order.
pub type StoredRow = (String, i64, Row);

/// A cursor in (table, key) order: the last row read.
pub type RowCursor = Option<(String, i64)>;

/// A consistent snapshot of the old store, valid only within the incarnation that opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnapshotId(pub u64);

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The snapshot is gone (its process or connection ended): restart the copy.
    #[error("snapshot {0:?} is gone")]
    SnapshotGone(SnapshotId),
    /// The change stream holds a change the store cannot say row by row (PostgreSQL's
    /// `TRUNCATE`): the copy must start again from a fresh snapshot, which holds its effect.
    #[error("the copy must start again: {0}")]
    CopyAgain(String),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The store could not do it now (busy, an I/O error, a connection lost): the operation
    /// changed nothing it reports, and may be tried again.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store refuses the batch for good (a value the plan's conversion cannot take, an
    /// expression the database rejects): nothing of it is applied; trying again will not help.
    #[error("batch refused: {0}")]
    Rejected(String),
}

/// Rows read in (table, key) order, whether they are the last ones, and the store's change
/// position when they were read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub rows: Vec<StoredRow>,
    pub last: bool,
    pub position: Position,
}

/// A read of the change stream ([`OldStore::changes_after`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeRead {
    /// Changes after the read's start, in ascending positions.
    pub changes: Vec<(Position, RowOp)>,
    /// The read is complete up to here: every change in (start, `complete_to`] is among
    /// `changes` (less than `captured` when the limit cut the read short). A store whose
    /// positions have gaps (`Positions::Ordered`) may have positions with nothing to apply (a
    /// fence's marker): the transform's checkpoint moves to `complete_to` past them.
    pub complete_to: Position,
    /// The last position the store knows was captured (what the transform is behind).
    pub captured: Position,
}

impl ChangeRead {
    /// A read of a store that numbers every change (`Positions::Counted`): `changes` are the
    /// first `limit` or fewer after `after`, `captured` the last position captured.
    pub fn counted(after: Position, limit: usize, changes: Vec<(Position, RowOp)>, captured: Position) -> Self {
        let complete_to = match changes.last() {
            Some((last, _)) if changes.len() >= limit => *last,
            _ => captured.max(after),
        };
        ChangeRead { changes, complete_to, captured: captured.max(complete_to) }
    }
}

/// The old universe's store, as a data node reads it. A real store can fail at any call
/// ([`StoreError::Unavailable`]); the core tries again later.
pub trait OldStore {
    /// Opens a consistent snapshot at the current change position.
    fn open_snapshot(&mut self) -> Result<(SnapshotId, Position), StoreError>;
    /// How many rows `snapshot` holds (progress and ETA of the copy; 0 when the store cannot
    /// tell cheaply).
    fn snapshot_rows(&self, _snapshot: SnapshotId) -> Result<u64, StoreError> {
        Ok(0)
    }
    /// Up to `limit` rows of `snapshot` after `after`.
    fn snapshot_chunk(&self, snapshot: SnapshotId, after: &RowCursor, limit: usize) -> Result<Chunk, StoreError>;
    /// Up to `limit` rows of the current contents after `after` (used while fenced).
    fn rows_chunk(&self, after: &RowCursor, limit: usize) -> Result<Chunk, StoreError>;
    /// Current rows while writes go on, for the comparison by range
    /// (the `ranges` duty): a chunk as [`OldStore::rows_chunk`] reads it, whose position
    /// is one every change at or before which the rows show, and a second position every change
    /// they show is at or before, one the change stream will reach. A store that reads its rows
    /// and its change log in one transaction gives the same position twice (the default).
    fn rows_to_compare(&mut self, after: &RowCursor, limit: usize) -> Result<(Chunk, Position), StoreError> {
        let chunk = self.rows_chunk(after, limit)?;
        let through = chunk.position;
        Ok((chunk, through))
    }
    /// Up to `limit` captured changes after `after` (a store whose positions have gaps returns
    /// whole transactions, so one may come past the limit), what the read is complete up to, and
    /// the last captured position: see [`ChangeRead`].
    fn changes_after(&self, after: Position, limit: usize) -> Result<ChangeRead, StoreError>;
    /// Refuses further writes (in-flight ones finish first); returns the final position.
    /// Fencing a fenced store returns the same final position.
    fn fence(&mut self) -> Result<Position, StoreError>;
    fn unfence(&mut self) -> Result<(), StoreError>;
    fn is_fenced(&self) -> Result<bool, StoreError>;
    /// Forgets captured changes up to `up_to` (applied to the new universe, durably).
    fn prune(&mut self, up_to: Position) -> Result<(), StoreError>;
    /// The process that held snapshots ended: every snapshot it opened is gone.
    fn disconnect(&mut self);
    /// The switch committed, or the upgrade was rolled back and abandoned: capture is no
    /// longer needed, and goes (the adapters' triggers and change table, or slot and
    /// publication; every change is forgotten). The fence stays. Idempotent. A later
    /// [`OldStore::open_snapshot`] captures again (a store may then number changes afresh).
    fn remove_capture(&mut self) -> Result<(), StoreError>;
    /// The last value each captured table's key sequence gave (PostgreSQL's serial and
    /// identity keys, SQLite's `AUTOINCREMENT`), by old table; tables without one are left out.
    /// Read once fenced, so that the new universe's sequences continue after them.
    fn sequences(&self) -> Result<Sequences, StoreError> {
        Ok(Sequences::new())
    }
}

/// Old table → the last value its key's sequence gave.
pub type Sequences = BTreeMap<String, i64>;
/// New table → the largest sequence value of the old tables whose rows feed it with their own
/// key (a generated key's table has Imago's key map instead).
pub fn feeding(mapping: &Mapping, sequences: &Sequences) -> BTreeMap<String, i64> {
    let mut found = BTreeMap::new();
    for (old, value) in sequences {
        for output in mapping.outputs.get(old).into_iter().flatten().filter(|o| !o.generated) {
            let entry = found.entry(output.table.clone()).or_insert(*value);
            *entry = (*entry).max(*value);
        }
    }
    found
}

/// The new universe's store, as a data node writes it. It converts what it is given by the
/// plan's mapping, which it holds: a batch carries the old universe's rows and changes.
pub trait NewStore {
    /// The checkpoint stored with the data (what a restarted transform resumes from).
    fn checkpoint(&self) -> Result<Checkpoint, StoreError>;
    /// Applies `batch.reset` (if set: the tables and the key map emptied), its ops (old-schema
    /// changes, converted here; generated keys made and kept in the key map) and its
    /// checkpoint in one transaction, if the store's checkpoint is `batch.base` (compare and
    /// set); otherwise changes nothing and answers `Ok(Err(stale))`. An `Err` of the store
    /// itself leaves the outcome unknown to the caller (the commit may have happened): the
    /// next batch's compare and set tells.
    fn apply_batch(&mut self, batch: &Batch) -> Result<Result<(), StaleBatch>, StoreError>;
    /// Converts old rows into a scratch copy of the new tables, beside the real ones (emptied
    /// first if `first`), looking generated keys up in the key map without making any: how
    /// many rows could not be converted (no key yet, a value that does not convert).
    fn stage(&mut self, rows: &[StoredRow], first: bool) -> Result<u64, StoreError>;
    /// The checksums of the scratch copy (transform(old), as staged) and of the new tables.
    /// Asking again gives the same answer: the scratch copy stays until the next stage with
    /// `first` or the next batch.
    fn compare_staged(&mut self) -> Result<(u64, u64), StoreError>;
    /// The checksums of the scratch copy and of the new tables' rows whose keys the scratch
    /// copy holds (a comparison of the rows some old rows give), and each table's row counts.
    /// Asked again, the same answer.
    fn compare_staged_keys(&mut self) -> Result<KeysCompared, StoreError>;
    /// Order-independent checksum of every row ([`row_hash`] summed).
    fn checksum(&self) -> Result<u64, StoreError>;
    /// The switch committed: clients may write now (until then, only the transform may).
    /// Idempotent, and it lasts: a store opened stays open when opened again. If writers are
    /// held ([`NewStore::hold_writers`]), the opening lets them through. In the same
    /// transaction, while the store is still guarded (never once open: the application's own
    /// inserts move them on then), each new table's key sequence is set past the old tables'
    /// that feed it (`sequences`, read from the fenced old store) and past its own largest key,
    /// so the new application never hands out a key the old one did.
    fn open_to_clients(&mut self, sequences: &Sequences) -> Result<(), StoreError>;
    /// The drain is done and the switch may commit: make writers other than the transform wait
    /// (a database's write lock) instead of being refused, until [`NewStore::open_to_clients`]
    /// lets them through or [`NewStore::release_writers`] lets the guard refuse them. Held by
    /// this process: its end releases them. Idempotent.
    fn hold_writers(&mut self) -> Result<(), StoreError>;
    /// The freeze aborted: writers held are released (the guard refuses them). Idempotent.
    fn release_writers(&mut self) -> Result<(), StoreError>;
}

/// What [`NewStore::compare_staged_keys`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeysCompared {
    /// The scratch copy's checksum: what transform(old) gives.
    pub expected: u64,
    /// The checksum of the store's rows of the same keys.
    pub actual: u64,
    /// By new table: rows in the scratch copy, rows of the same keys in the store.
    pub rows: BTreeMap<String, (u64, u64)>,
}

impl KeysCompared {
    /// From each side's tables, by name: (rows, checksum).
    pub fn of(staged: &BTreeMap<String, (u64, u64)>, held: &BTreeMap<String, (u64, u64)>) -> KeysCompared {
        let mut found = KeysCompared::default();
        for (table, (rows, sum)) in staged {
            found.expected = found.expected.wrapping_add(*sum);
            found.rows.entry(table.clone()).or_default().0 = *rows;
        }
        for (table, (rows, sum)) in held {
            found.actual = found.actual.wrapping_add(*sum);
            found.rows.entry(table.clone()).or_default().1 = *rows;
        }
        found
    }
}

/// Progress of the bulk copy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyState {
    #[default]
    NotStarted,
    /// Copying the snapshot taken at `snapshot_at`; `after` is the last copied (table, key).
    Copying {
        snapshot_at: Position,
        after: Option<(String, i64)>,
    },
    Done,
}

/// The transform's durable progress, stored in the new store with the data it covers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Every change up to here is applied (or covered by the copied snapshot).
    pub applied: Position,
    pub copy: CopyState,
    /// Copies started on this store. A checkpoint never repeats: a copy that restarts at the
    /// same position as the last one (nothing was captured in between) still has a checkpoint of
    /// its own, so a late batch of the earlier copy (a commit retried after a crash) is refused
    /// by the compare-and-set instead of landing on the new copy (the ABA problem).
    pub copies: u64,
}

/// Writes for the new store plus the checkpoint they reach; apply all of it atomically, and
/// only on top of `base`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The checkpoint this batch continues from. The store applies the batch only if its own
    /// checkpoint is this one, so a batch delivered twice (a retried commit whose first answer
    /// was lost, a late duplicate) is refused instead of applied again.
    pub base: Checkpoint,
    /// Empty the new universe's tables first (a copy that starts over).
    pub reset: bool,
    pub ops: Vec<RowOp>,
    pub checkpoint: Checkpoint,
}

/// A batch refused because the store's checkpoint is not the batch's base.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a batch based on {base:?} was refused: the store's checkpoint is {found:?}")]
pub struct StaleBatch {
    pub base: Checkpoint,
    pub found: Checkpoint,
}

/// Most request-log entries a store keeps by default (oldest forgotten first): a duplicate of
/// any of a store's last this-many applied writes is answered, not run again.
pub const REQUEST_LOG_MAX: usize = 4096;

/// The key map of a store in memory: old row (table, key) and new table → the key made for it,
/// and the next key to make per new table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemKeys {
    keys: BTreeMap<(String, i64, String), i64>,
    next: BTreeMap<String, i64>,
    /// Merged rows: (new table, key) → the old tables that have it.
    merged: BTreeMap<(String, i64), BTreeSet<String>>,
}

/// A key map being written, over the tables it makes keys for.
struct KeysIn<'a> {
    keys: &'a mut MemKeys,
    tables: &'a Tables,
    /// Staging: look up only.
    read_only: bool,
}

impl KeyMap for KeysIn<'_> {
    fn generated(&mut self, table: &str, key: i64, target: &str) -> Result<i64, ConvertError> {
        let entry = (table.to_string(), key, target.to_string());
        if let Some(found) = self.keys.keys.get(&entry) {
            return Ok(*found);
        }
        if self.read_only {
            return Err(ConvertError::NeedsKeyMap { table: target.to_string() });
        }
        // Above every key the table holds or this map made (none is ever made twice).
        let highest = self.tables.get(target).and_then(|rows| rows.keys().next_back()).copied().unwrap_or(0);
        let next = self.keys.next.entry(target.to_string()).or_insert(1);
        let made = (*next).max(highest + 1);
        *next = made + 1;
        self.keys.keys.insert(entry, made);
        Ok(made)
    }

    fn forget(&mut self, table: &str, key: i64, target: &str) -> Result<Option<i64>, ConvertError> {
        if self.read_only {
            return Ok(self.keys.keys.get(&(table.to_string(), key, target.to_string())).copied());
        }
        Ok(self.keys.keys.remove(&(table.to_string(), key, target.to_string())))
    }

    fn mark(&mut self, table: &str, key: i64, target: &str, present: bool) -> Result<bool, ConvertError> {
        if self.read_only {
            return Ok(true);
        }
        let sources = self.keys.merged.entry((target.to_string(), key)).or_default();
        if present {
            sources.insert(table.to_string());
        } else {
            sources.remove(table);
        }
        let others = sources.iter().any(|s| s != table);
        if sources.is_empty() {
            self.keys.merged.remove(&(target.to_string(), key));
        }
        Ok(others)
    }

    fn row(&self, target: &str, key: i64) -> Option<Row> {
        self.tables.get(target)?.get(&key).cloned()
    }
}

/// Converts old-schema `ops` by `mapping` (as they are without one), with `keys` over `tables`.
fn convert(
    mapping: Option<&Mapping>,
    ops: &[RowOp],
    keys: &mut MemKeys,
    tables: &Tables,
    read_only: bool,
) -> Result<Vec<RowOp>, ConvertError> {
    let Some(mapping) = mapping else {
        return Ok(ops.to_vec());
    };
    let mut keys = KeysIn { keys, tables, read_only };
    let mut converted = Vec::with_capacity(ops.len());
    for op in ops {
        converted.extend(mapping.convert_with(op, &mut keys)?);
    }
    Ok(converted)
}

/// One universe's store, in memory.
#[derive(Clone, Debug)]
pub struct MemStore {
    tables: Tables,
    /// The plan's mapping (new store): what a batch's old-schema changes become. `None`: they
    /// are applied as they are.
    mapping: Option<Mapping>,
    /// Generated keys (new store).
    keys: MemKeys,
    /// The scratch copy of [`NewStore::stage`] (volatile).
    staged: Option<Tables>,
    /// Captured changes (old store only).
    capture: ChangeLog,
    /// Transform progress (new store only).
    checkpoint: Checkpoint,
    /// Open snapshots (volatile: dropped by [`OldStore::disconnect`]).
    snapshots: BTreeMap<SnapshotId, Tables>,
    /// Snapshot ids are never reused, across disconnects too.
    next_snapshot: u64,
    /// The request log's rows by age (an index, as a database keeps one): sequence → key.
    request_log: BTreeMap<i64, i64>,
    /// Most request-log rows kept.
    request_log_max: usize,
    /// Client writes are refused (a new store until the switch commits), as the adapters'
    /// guards in the database refuse them.
    guarded: bool,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore {
            tables: Tables::new(),
            mapping: None,
            keys: MemKeys::default(),
            staged: None,
            capture: ChangeLog::default(),
            checkpoint: Checkpoint::default(),
            snapshots: BTreeMap::new(),
            next_snapshot: 0,
            request_log: BTreeMap::new(),
            request_log_max: REQUEST_LOG_MAX,
            guarded: false,
        }
    }
}

/// A request-log row's key: a hash of the request key (the row holds the whole key, so a
/// collision is told apart; it only makes the older request forgotten early).
fn request_log_key(key: RequestKey) -> i64 {
    let mut h = crate::duties::validate::Fnv::default();
    h.bytes(&key.origin.to_le_bytes());
    h.bytes(&key.id.to_le_bytes());
    h.0 as i64
}

fn int(row: &Row, column: &str) -> Option<i64> {
    match row.get(column) {
        Some(Value::Int(i)) => Some(*i),
        _ => None,
    }
}

impl MemStore {
    /// An empty store with these tables.
    pub fn with_schema(schema: &Schema) -> Self {
        let tables = schema.tables.keys().map(|t| (t.clone(), BTreeMap::new())).collect();
        MemStore { tables, ..Default::default() }
    }

    /// An empty new universe for `mapping`: a batch's old-schema changes are converted by it.
    pub fn new_universe(mapping: Mapping) -> Self {
        let mut store = MemStore::with_schema(&mapping.new_schema());
        store.mapping = Some(mapping);
        store.guarded = true;
        store
    }

    /// Whether client writes are taken (see [`NewStore::open_to_clients`]).
    pub fn is_open_to_clients(&self) -> bool {
        !self.guarded
    }

    /// The key map (new store).
    pub fn key_map(&self) -> &MemKeys {
        &self.keys
    }

    /// The same store keeping at most `max` request-log rows.
    pub fn with_request_log_max(mut self, max: usize) -> Self {
        assert!(max > 0, "a request log keeps at least one entry");
        self.request_log_max = max;
        self
    }

    fn apply_op(&mut self, op: &RowOp) {
        match op {
            RowOp::Upsert { table, key, row } => {
                let old = self.tables.entry(table.clone()).or_default().insert(*key, row.clone());
                if table == REQUEST_LOG_TABLE {
                    if let Some(seq) = old.as_ref().and_then(|r| int(r, "seq")) {
                        self.request_log.remove(&seq);
                    }
                    if let Some(seq) = int(row, "seq") {
                        self.request_log.insert(seq, *key);
                    }
                }
            }
            RowOp::Delete { table, key } => {
                let old = self.tables.get_mut(table).and_then(|rows| rows.remove(key));
                if table == REQUEST_LOG_TABLE {
                    if let Some(seq) = old.as_ref().and_then(|r| int(r, "seq")) {
                        self.request_log.remove(&seq);
                    }
                }
            }
        }
    }

    /// Where the store answered request `key`, if it applied that request's write (the
    /// request log; see [`REQUEST_LOG_TABLE`]). A duplicate gets this answer instead of running
    /// again.
    pub fn applied_request(&self, key: RequestKey) -> Option<Position> {
        let row = self.get(REQUEST_LOG_TABLE, request_log_key(key))?;
        let same = int(row, "origin") == Some(key.origin as i64) && int(row, "id") == Some(key.id as i64);
        same.then(|| Position(int(row, "position").unwrap_or(0) as u64))
    }

    /// A client write for request `key`, as one transaction with its request-log row (and the
    /// pruning of the oldest rows beyond the bound). `captured`: the old store (every row,
    /// the log's too, is captured, so the log reaches the new universe with the data); else
    /// the new store. Returns the position the answer names (old: last captured; new: last
    /// applied) and every row written, in order.
    pub fn write_request(
        &mut self,
        key: RequestKey,
        ops: Vec<RowOp>,
        captured: bool,
    ) -> Result<(Position, Vec<(Position, RowOp)>), CaptureError> {
        if captured && self.capture.is_fenced() {
            // Nothing of the transaction is applied.
            return Err(CaptureError::Fenced(self.capture.last().0));
        }
        if self.guarded {
            return Err(CaptureError::Guarded);
        }
        let log_key = request_log_key(key);
        let evicted: Vec<i64> = self
            .request_log
            .values()
            .take((self.request_log.len() + 1).saturating_sub(self.request_log_max))
            .copied()
            .collect();
        let count = ops.len() + 1 + evicted.len();
        let position = if captured { self.capture.last().0 + count as u64 } else { self.checkpoint.applied.0 };
        let seq = self.request_log.last_key_value().map_or(1, |(s, _)| s + 1);
        let row: Row = [
            ("key".to_string(), Value::Int(log_key)),
            ("origin".to_string(), Value::Int(key.origin as i64)),
            ("id".to_string(), Value::Int(key.id as i64)),
            ("position".to_string(), Value::Int(position as i64)),
            ("seq".to_string(), Value::Int(seq)),
        ]
        .into();
        let mut ops = ops;
        ops.extend(evicted.into_iter().map(|k| RowOp::Delete { table: REQUEST_LOG_TABLE.into(), key: k }));
        ops.push(RowOp::Upsert { table: REQUEST_LOG_TABLE.into(), key: log_key, row });
        let mut written = Vec::with_capacity(ops.len());
        for op in ops {
            if captured {
                let at = self.capture.append(op.clone())?;
                self.apply_op(&op);
                written.push((at, op));
            } else {
                self.apply_op(&op);
                written.push((self.checkpoint.applied, op));
            }
        }
        debug_assert!(!captured || self.capture.last().0 == position);
        Ok((Position(position), written))
    }

    /// Runs client write `key` as a database adapter does: answered from the request log if the
    /// log holds the key (a duplicate), else the application's `write` (which may refuse) is
    /// applied with its log row in one transaction (`captured`: on the old store). Returns the
    /// answer and every row written, in order (none for a duplicate or a refusal).
    pub fn execute_write(
        &mut self,
        key: RequestKey,
        captured: bool,
        write: impl FnOnce(&MemStore) -> Result<Vec<RowOp>, String>,
    ) -> (StoreAnswer, Vec<(Position, RowOp)>) {
        if let Some(position) = self.applied_request(key) {
            return (StoreAnswer::Ok { body: None, position }, Vec::new());
        }
        let ops = match write(self) {
            Ok(ops) => ops,
            Err(reason) => return (StoreAnswer::Rejected { reason }, Vec::new()),
        };
        match self.write_request(key, ops, captured) {
            Ok((position, written)) => (StoreAnswer::Ok { body: None, position }, written),
            Err(e) => (StoreAnswer::Rejected { reason: e.to_string() }, Vec::new()),
        }
    }

    /// A client write to the old store: applied and captured together (as a trigger does).
    pub fn write_captured(&mut self, op: RowOp) -> Result<Position, CaptureError> {
        let position = self.capture.append(op.clone())?;
        self.apply_op(&op);
        Ok(position)
    }

    /// A write that is not captured: initial data, or a client write to the new store.
    pub fn write(&mut self, op: &RowOp) {
        self.apply_op(op);
    }

    pub fn get(&self, table: &str, key: i64) -> Option<&Row> {
        self.tables.get(table)?.get(&key)
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// Last captured position (old store).
    pub fn captured(&self) -> Position {
        self.capture.last()
    }

    /// Every captured change, in order (for checkers).
    pub fn changes(&self) -> &ChangeLog {
        &self.capture
    }

    /// Snapshots currently open (they die with the process that opened them).
    pub fn open_snapshots(&self) -> usize {
        self.snapshots.len()
    }
}

fn chunk_of(tables: &Tables, after: &RowCursor, limit: usize, position: Position) -> Chunk {
    let mut rows = Vec::with_capacity(limit.min(1024));
    for (table, table_rows) in tables {
        let range: Box<dyn Iterator<Item = (&i64, &Row)>> = match after {
            Some((t, _)) if t > table => continue,
            Some((t, k)) if t == table => {
                Box::new(table_rows.range((std::ops::Bound::Excluded(*k), std::ops::Bound::Unbounded)))
            }
            _ => Box::new(table_rows.iter()),
        };
        for (key, row) in range {
            if rows.len() == limit {
                return Chunk { rows, last: false, position };
            }
            rows.push((table.clone(), *key, row.clone()));
        }
    }
    Chunk { rows, last: true, position }
}

impl OldStore for MemStore {
    fn open_snapshot(&mut self) -> Result<(SnapshotId, Position), StoreError> {
        self.next_snapshot += 1;
        let id = SnapshotId(self.next_snapshot);
        self.snapshots.insert(id, self.tables.clone());
        Ok((id, self.capture.last()))
    }

    fn snapshot_chunk(&self, snapshot: SnapshotId, after: &RowCursor, limit: usize) -> Result<Chunk, StoreError> {
        let tables = self.snapshots.get(&snapshot).ok_or(StoreError::SnapshotGone(snapshot))?;
        Ok(chunk_of(tables, after, limit, self.capture.last()))
    }

    fn snapshot_rows(&self, snapshot: SnapshotId) -> Result<u64, StoreError> {
        let tables = self.snapshots.get(&snapshot).ok_or(StoreError::SnapshotGone(snapshot))?;
        Ok(tables.values().map(|rows| rows.len() as u64).sum())
    }

    fn rows_chunk(&self, after: &RowCursor, limit: usize) -> Result<Chunk, StoreError> {
        Ok(chunk_of(&self.tables, after, limit, self.capture.last()))
    }

    fn changes_after(&self, after: Position, limit: usize) -> Result<ChangeRead, StoreError> {
        Ok(ChangeRead::counted(after, limit, self.capture.after(after, limit), self.capture.last()))
    }

    fn fence(&mut self) -> Result<Position, StoreError> {
        Ok(self.capture.fence())
    }

    fn unfence(&mut self) -> Result<(), StoreError> {
        self.capture.unfence();
        Ok(())
    }

    fn is_fenced(&self) -> Result<bool, StoreError> {
        Ok(self.capture.is_fenced())
    }

    fn prune(&mut self, up_to: Position) -> Result<(), StoreError> {
        self.capture.prune(up_to);
        Ok(())
    }

    fn disconnect(&mut self) {
        self.snapshots.clear();
    }

    fn remove_capture(&mut self) -> Result<(), StoreError> {
        // Positions are kept (the store is fenced: nothing is captured after this anyway).
        self.capture.prune(self.capture.last());
        Ok(())
    }
}

impl NewStore for MemStore {
    fn checkpoint(&self) -> Result<Checkpoint, StoreError> {
        Ok(self.checkpoint.clone())
    }

    fn apply_batch(&mut self, batch: &Batch) -> Result<Result<(), StaleBatch>, StoreError> {
        if self.checkpoint != batch.base {
            return Ok(Err(StaleBatch { base: batch.base.clone(), found: self.checkpoint.clone() }));
        }
        self.staged = None;
        // One transaction: each change is converted over the rows as the batch's earlier ones
        // left them (a merge reads the row), and a refusal undoes everything.
        let keys_before = self.keys.clone();
        let tables_before = batch.reset.then(|| {
            let emptied = self.tables.keys().map(|t| (t.clone(), BTreeMap::new())).collect();
            self.keys = MemKeys::default();
            std::mem::replace(&mut self.tables, emptied)
        });
        let request_log_before = batch.reset.then(|| std::mem::take(&mut self.request_log));
        let mut undo: Vec<RowOp> = Vec::new();
        for op in &batch.ops {
            let converted =
                match convert(self.mapping.as_ref(), std::slice::from_ref(op), &mut self.keys, &self.tables, false) {
                    Ok(converted) => converted,
                    Err(e) => {
                        for op in undo.iter().rev() {
                            self.apply_op(op);
                        }
                        if let (Some(tables), Some(log)) = (tables_before, request_log_before) {
                            self.tables = tables;
                            self.request_log = log;
                        }
                        self.keys = keys_before;
                        return Err(StoreError::Rejected(e.to_string()));
                    }
                };
            for op in converted {
                let (table, key) = match &op {
                    RowOp::Upsert { table, key, .. } | RowOp::Delete { table, key } => (table, *key),
                };
                undo.push(match self.get(table, key) {
                    Some(row) => RowOp::Upsert { table: table.clone(), key, row: row.clone() },
                    None => RowOp::Delete { table: table.clone(), key },
                });
                self.apply_op(&op);
            }
        }
        self.checkpoint = batch.checkpoint.clone();
        Ok(Ok(()))
    }

    fn stage(&mut self, rows: &[StoredRow], first: bool) -> Result<u64, StoreError> {
        let mut staged = match (first, self.staged.take()) {
            (false, Some(staged)) => staged,
            _ => self.tables.keys().map(|t| (t.clone(), BTreeMap::new())).collect(),
        };
        // Staging only looks keys up (`read_only`): the map is lent, not copied.
        let mut keys = std::mem::take(&mut self.keys);
        let mut rejected = 0;
        for (table, key, row) in rows {
            let op = RowOp::Upsert { table: table.clone(), key: *key, row: row.clone() };
            // Over the scratch rows: a merge fills the row the other old table staged.
            match convert(self.mapping.as_ref(), std::slice::from_ref(&op), &mut keys, &staged, true) {
                Ok(converted) => {
                    for op in converted {
                        if let RowOp::Upsert { table, key, row } = op {
                            staged.entry(table).or_default().insert(key, row);
                        }
                    }
                }
                Err(_) => rejected += 1,
            }
        }
        self.keys = keys;
        self.staged = Some(staged);
        Ok(rejected)
    }

    fn compare_staged(&mut self) -> Result<(u64, u64), StoreError> {
        // The scratch copy stays until the next comparison or batch: an answer lost on its way
        // is asked for again and must be the same (simulator seed 20 with `--upgrades 3`).
        let staged = self.staged.as_ref().map_or(0, checksum);
        Ok((staged, checksum(&self.tables)))
    }

    fn compare_staged_keys(&mut self) -> Result<KeysCompared, StoreError> {
        let Some(staged) = self.staged.as_ref() else { return Ok(KeysCompared::default()) };
        let (mut scratch, mut same_keys) = (BTreeMap::new(), BTreeMap::new());
        for (table, rows) in staged {
            let sum = rows.iter().map(|(key, row)| row_hash(table, *key, row)).fold(0u64, u64::wrapping_add);
            scratch.insert(table.clone(), (rows.len() as u64, sum));
            let held = self.tables.get(table);
            let found: Vec<u64> = rows
                .keys()
                .filter_map(|key| held.and_then(|h| h.get(key)).map(|row| row_hash(table, *key, row)))
                .collect();
            same_keys.insert(table.clone(), (found.len() as u64, found.into_iter().fold(0u64, u64::wrapping_add)));
        }
        Ok(KeysCompared::of(&scratch, &same_keys))
    }

    fn checksum(&self) -> Result<u64, StoreError> {
        Ok(checksum(&self.tables))
    }

    fn open_to_clients(&mut self, _sequences: &Sequences) -> Result<(), StoreError> {
        self.guarded = false;
        Ok(())
    }

    // The in-memory store serves its requests through the data node, whose core makes a request
    // for the new universe wait for the opening: there is no lock to hold.
    fn hold_writers(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn release_writers(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Order-independent checksum of tables: the wrapping sum of every row's [`row_hash`].
pub fn checksum(tables: &Tables) -> u64 {
    tables
        .iter()
        .flat_map(|(table, rows)| rows.iter().map(move |(key, row)| row_hash(table, *key, row)))
        .fold(0u64, u64::wrapping_add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::schema::{Mapping, TableSchema, Value};

    fn key(id: u64) -> RequestKey {
        RequestKey { origin: 77, id }
    }

    #[test]
    fn a_write_and_its_request_key_are_one_transaction_and_both_captured() {
        let mut s = store();
        assert_eq!(s.applied_request(key(1)), None);
        let (position, written) = s.write_request(key(1), vec![upsert(6)], true).unwrap();
        assert_eq!(position, Position(2), "the write and its log row");
        assert_eq!(s.captured(), position);
        assert_eq!(written.len(), 2);
        assert_eq!(s.applied_request(key(1)), Some(position));
        assert_eq!(s.applied_request(RequestKey { origin: 78, id: 1 }), None, "another origin");
        assert_eq!(s.applied_request(key(2)), None);
        s.fence().unwrap();
        assert!(s.write_request(key(2), vec![upsert(7)], true).is_err());
        assert_eq!(s.get("t", 7), None, "a fenced store applies nothing of the transaction");
        assert_eq!(s.applied_request(key(2)), None);
        assert_eq!(s.captured(), position);
    }

    /// A duplicate is answered from the log without running the application again; a refusal
    /// writes nothing (not even a log row: the key may come again and run).
    #[test]
    fn a_write_runs_once_per_key_and_a_refusal_writes_nothing() {
        let mut s = store();
        let (first, written) = s.execute_write(key(1), true, |_| Ok(vec![upsert(6)]));
        assert_eq!(first, StoreAnswer::Ok { body: None, position: Position(2) });
        assert_eq!(written.len(), 2, "the write and its log row");
        let (again, written) = s.execute_write(key(1), true, |_| panic!("a duplicate must not run again"));
        assert_eq!((again, written.len()), (first, 0));
        let (refused, written) = s.execute_write(key(2), true, |_| Err("no user 9".to_string()));
        assert_eq!((refused, written.len()), (StoreAnswer::Rejected { reason: "no user 9".into() }, 0));
        assert_eq!((s.applied_request(key(2)), s.captured()), (None, Position(2)));
    }

    #[test]
    fn the_request_log_forgets_its_oldest_entries_beyond_its_bound() {
        let mut s = store().with_request_log_max(3);
        for id in 1..=5 {
            s.write_request(key(id), vec![upsert(id as i64 + 10)], true).unwrap();
        }
        let remembered: Vec<u64> = (1..=5).filter(|&id| s.applied_request(key(id)).is_some()).collect();
        assert_eq!(remembered, vec![3, 4, 5]);
        assert_eq!(s.tables()[REQUEST_LOG_TABLE].len(), 3);
        let deletes = s
            .changes()
            .after(Position(0), 100)
            .iter()
            .filter(|(_, op)| matches!(op, RowOp::Delete { table, .. } if table == REQUEST_LOG_TABLE))
            .count();
        assert_eq!(deletes, 2, "forgetting is captured too, so the new universe forgets the same");
    }

    #[test]
    fn the_request_log_reaches_the_new_universe_with_the_data_and_answers_there() {
        let mut old = store().with_request_log_max(2);
        let mapping = Mapping::compile(&Schema { tables: BTreeMap::new() }, &[]).unwrap();
        let mut new = MemStore::default().with_request_log_max(2);
        for id in 1..=3 {
            old.write_request(key(id), vec![upsert(id as i64 + 10)], true).unwrap();
        }
        let ops: Vec<RowOp> =
            old.changes().after(Position(0), 100).iter().flat_map(|(_, op)| mapping.convert(op).unwrap()).collect();
        let checkpoint = Checkpoint { applied: old.captured(), copy: CopyState::Done, copies: 1 };
        new.apply_batch(&Batch { base: Checkpoint::default(), reset: false, ops, checkpoint }).unwrap().unwrap();
        assert_eq!(new.applied_request(key(1)), None);
        assert_eq!(new.applied_request(key(3)), old.applied_request(key(3)));
        // The new universe's own writes continue the log (and its bound) from there.
        let (at, _) = new.write_request(key(4), vec![], false).unwrap();
        assert_eq!(at, old.captured(), "the new store answers with its applied position");
        assert_eq!(new.applied_request(key(4)), Some(at));
        assert_eq!(new.applied_request(key(2)), None, "the oldest forgotten");
        assert_eq!(new.applied_request(key(3)), old.applied_request(key(3)));
    }

    fn store() -> MemStore {
        let mut tables = BTreeMap::new();
        tables.insert("t".to_string(), TableSchema { key: "id".into(), columns: vec!["id".into()] });
        let mut s = MemStore::with_schema(&Schema { tables });
        for k in 1..=5 {
            s.write(&upsert(k));
        }
        s
    }

    fn upsert(key: i64) -> RowOp {
        RowOp::Upsert { table: "t".into(), key, row: [("id".to_string(), Value::Int(key))].into_iter().collect() }
    }

    #[test]
    fn a_snapshot_is_consistent_and_dies_with_its_process() {
        let mut s = store();
        let (snap, at) = s.open_snapshot().unwrap();
        assert_eq!(at, Position(0));
        s.write_captured(upsert(6)).unwrap();
        let chunk = s.snapshot_chunk(snap, &Some(("t".into(), 3)), 10).unwrap();
        assert_eq!(chunk.rows.iter().map(|r| r.1).collect::<Vec<_>>(), vec![4, 5], "the later write is not in it");
        assert!(chunk.last);
        assert_eq!(chunk.position, Position(1));
        let first = s.snapshot_chunk(snap, &None, 2).unwrap();
        assert_eq!((first.rows.len(), first.last), (2, false));
        s.disconnect();
        assert_eq!(s.snapshot_chunk(snap, &None, 2), Err(StoreError::SnapshotGone(snap)));
        let (again, _) = s.open_snapshot().unwrap();
        assert_ne!(again, snap, "handles are never reused");
    }

    #[test]
    fn a_reset_batch_empties_the_tables_with_its_checkpoint() {
        let mut s = store();
        let before = s.checksum().unwrap();
        let at = Checkpoint { applied: Position(3), copy: CopyState::NotStarted, copies: 0 };
        let batch = Batch { base: Checkpoint::default(), reset: true, ops: vec![upsert(9)], checkpoint: at.clone() };
        s.apply_batch(&batch).unwrap().unwrap();
        assert_eq!(s.tables()["t"].keys().copied().collect::<Vec<_>>(), vec![9]);
        assert_ne!(s.checksum().unwrap(), before);
        assert_eq!(s.checkpoint().unwrap(), at);
    }

    #[test]
    fn a_batch_delivered_twice_is_refused_the_second_time() {
        let mut s = store();
        let next = Checkpoint { applied: Position(1), copy: CopyState::Done, copies: 0 };
        let batch = Batch { base: Checkpoint::default(), reset: false, ops: vec![upsert(9)], checkpoint: next.clone() };
        s.apply_batch(&batch).unwrap().unwrap();
        s.write(&RowOp::Delete { table: "t".into(), key: 9 });
        let again = s.apply_batch(&batch).unwrap();
        assert_eq!(again, Err(StaleBatch { base: Checkpoint::default(), found: next }));
        assert!(s.get("t", 9).is_none(), "the refused batch changed nothing");
    }

    #[test]
    fn checksums_do_not_depend_on_insertion_order() {
        let mut a = store();
        let mut b = MemStore::with_schema(&Schema::default());
        for k in (1..=5).rev() {
            b.write(&upsert(k));
        }
        assert_eq!(a.checksum().unwrap(), b.checksum().unwrap());
        a.write(&RowOp::Delete { table: "t".into(), key: 2 });
        assert_ne!(a.checksum().unwrap(), b.checksum().unwrap());
    }

    #[test]
    fn a_store_made_from_a_schema_lists_its_tables_empty() {
        let mut tables = BTreeMap::new();
        for t in ["a", "b"] {
            tables.insert(t.to_string(), TableSchema { key: "id".into(), columns: vec!["id".into()] });
        }
        let s = MemStore::with_schema(&Schema { tables });
        assert_eq!(s.tables().keys().map(String::as_str).collect::<Vec<_>>(), vec!["a", "b"]);
        assert!(s.tables().values().all(BTreeMap::is_empty));
    }

    #[test]
    fn two_open_snapshots_keep_their_own_rows_and_are_counted() {
        let mut s = store();
        assert_eq!(s.open_snapshots(), 0);
        let (first, _) = s.open_snapshot().unwrap();
        s.write_captured(upsert(6)).unwrap();
        let (second, _) = s.open_snapshot().unwrap();
        assert_ne!(first, second);
        assert_eq!(s.open_snapshots(), 2);
        let keys = |s: &MemStore, snap| s.snapshot_chunk(snap, &None, 10).unwrap().rows.len();
        assert_eq!((keys(&s, first), keys(&s, second)), (5, 6), "each snapshot sees the rows as it opened");
        s.disconnect();
        assert_eq!(s.open_snapshots(), 0, "snapshots die with the connection");
    }

    #[test]
    fn a_fence_shows_and_refuses_captured_writes_until_unfenced() {
        let mut s = store();
        assert!(!s.is_fenced().unwrap());
        s.write_captured(upsert(6)).unwrap();
        assert_eq!(s.fence().unwrap(), Position(1));
        assert!(s.is_fenced().unwrap());
        assert!(s.write_captured(upsert(7)).is_err(), "a fenced store takes no writes");
        s.unfence().unwrap();
        assert!(!s.is_fenced().unwrap());
        assert_eq!(s.write_captured(upsert(7)), Ok(Position(2)));
        assert_eq!(s.changes().kept(), 2);
        s.prune(Position(1)).unwrap();
        assert_eq!(s.changes().kept(), 1, "pruned up to the applied position");
    }

    #[test]
    fn a_chunk_that_crosses_into_the_next_table_reads_it_from_its_first_key() {
        let mut tables = BTreeMap::new();
        for t in ["a", "b"] {
            tables.insert(t.to_string(), TableSchema { key: "id".into(), columns: vec!["id".into()] });
        }
        let mut s = MemStore::with_schema(&Schema { tables });
        for t in ["a", "b"] {
            for k in 1..=5 {
                let row = [("id".to_string(), Value::Int(k))].into_iter().collect();
                s.write(&RowOp::Upsert { table: t.into(), key: k, row });
            }
        }
        let (snap, _) = s.open_snapshot().unwrap();
        let chunk = s.snapshot_chunk(snap, &Some(("a".into(), 4)), 3).unwrap();
        let got: Vec<(String, i64)> = chunk.rows.iter().map(|r| (r.0.clone(), r.1)).collect();
        assert_eq!(got, vec![("a".into(), 5), ("b".into(), 1), ("b".into(), 2)]);
        assert!(!chunk.last);
    }

    /// `cur` split into `page` (its own key) and `revision` (a generated key the page points
    /// at), as a store in memory runs it.
    fn pages_mapping() -> Mapping {
        use protocol::schema::{SplitPart, Transform};
        let mut tables = BTreeMap::new();
        tables.insert("cur".to_string(), TableSchema { key: "id".into(), columns: vec!["id".into(), "text".into()] });
        let split = Transform::SplitTable {
            table: "cur".into(),
            into: vec![
                SplitPart {
                    table: "page".into(),
                    references: vec![("latest".into(), "revision".into())],
                    ..Default::default()
                },
                SplitPart {
                    table: "revision".into(),
                    columns: vec!["text".into()],
                    key: Some("rev_id".into()),
                    generated: true,
                    references: vec![("page".into(), "page".into())],
                },
            ],
        };
        Mapping::compile(&Schema { tables }, &[split]).unwrap()
    }

    fn cur(id: i64, text: &str) -> RowOp {
        let row = [("id".to_string(), Value::Int(id)), ("text".to_string(), Value::Text(text.into()))].into();
        RowOp::Upsert { table: "cur".into(), key: id, row }
    }

    fn batch(base: Checkpoint, applied: u64, reset: bool, ops: Vec<RowOp>) -> Batch {
        let checkpoint = Checkpoint { applied: Position(applied), copy: CopyState::Done, copies: 1 };
        Batch { base, reset, ops, checkpoint }
    }

    #[test]
    fn a_new_universe_makes_each_generated_key_once_and_forgets_it_with_the_row() {
        let mut new = MemStore::new_universe(pages_mapping());
        new.apply_batch(&batch(Checkpoint::default(), 2, false, vec![cur(1, "a"), cur(2, "b")])).unwrap().unwrap();
        let latest = |s: &MemStore, page| match s.get("page", page).unwrap()["latest"] {
            Value::Int(k) => k,
            ref other => panic!("{other:?}"),
        };
        let (first, second) = (latest(&new, 1), latest(&new, 2));
        assert_ne!(first, second);
        assert_eq!(new.get("revision", first).unwrap()["page"], Value::Int(1));
        let at2 = new.checkpoint().unwrap();
        new.apply_batch(&batch(at2.clone(), 3, false, vec![cur(1, "a2")])).unwrap().unwrap();
        assert_eq!(latest(&new, 1), first, "an update reaches the same revision");
        assert_eq!(new.get("revision", first).unwrap()["text"], Value::Text("a2".into()));
        let at3 = new.checkpoint().unwrap();
        new.apply_batch(&batch(at3.clone(), 4, false, vec![RowOp::Delete { table: "cur".into(), key: 1 }]))
            .unwrap()
            .unwrap();
        assert!(new.get("revision", first).is_none() && new.get("page", 1).is_none());
        let at4 = new.checkpoint().unwrap();
        new.apply_batch(&batch(at4, 5, false, vec![cur(1, "again")])).unwrap().unwrap();
        assert!(latest(&new, 1) > second, "a key is never made twice, even after its row went");
        assert_eq!(new.key_map().keys.len(), 2);
        // A reset (a copy that starts over) empties the key map with the tables.
        let at5 = new.checkpoint().unwrap();
        new.apply_batch(&batch(at5, 6, true, vec![])).unwrap().unwrap();
        assert!(new.key_map().keys.is_empty() && new.tables()["revision"].is_empty());
    }

    #[test]
    fn staging_converts_old_rows_beside_the_new_ones_with_the_keys_the_map_holds() {
        let mut new = MemStore::new_universe(pages_mapping());
        new.apply_batch(&batch(Checkpoint::default(), 2, false, vec![cur(1, "a"), cur(2, "b")])).unwrap().unwrap();
        let old_row = |op: RowOp| match op {
            RowOp::Upsert { table, key, row } => (table, key, row),
            RowOp::Delete { .. } => unreachable!(),
        };
        let rows = [old_row(cur(1, "a")), old_row(cur(2, "b"))];
        assert_eq!(new.stage(&rows[..1], true).unwrap(), 0);
        assert_eq!(new.stage(&rows[1..], false).unwrap(), 0);
        let (expected, actual) = new.compare_staged().unwrap();
        assert_eq!(expected, actual);
        assert_eq!(new.compare_staged().unwrap(), (expected, actual), "asked again (an answer lost), the same");
        // A row the new universe lacks: staged, it differs; without a generated key, refused.
        new.stage(&[old_row(cur(1, "a")), old_row(cur(2, "changed"))], true).unwrap();
        let (expected, actual) = new.compare_staged().unwrap();
        assert_ne!(expected, actual);
        assert_eq!(new.stage(&[old_row(cur(3, "c"))], true).unwrap(), 1, "no key was ever made for it");
        assert_eq!(new.key_map().keys.len(), 2, "staging makes no key");
    }

    #[test]
    fn a_batch_that_does_not_convert_changes_nothing() {
        use protocol::schema::{ColumnType, Transform};
        let mut tables = BTreeMap::new();
        tables.insert("t".to_string(), TableSchema { key: "id".into(), columns: vec!["id".into(), "n".into()] });
        let to_int =
            Transform::ChangeType { table: "t".into(), column: "n".into(), to: ColumnType::Int, expression: None };
        let mut new = MemStore::new_universe(Mapping::compile(&Schema { tables }, &[to_int]).unwrap());
        let op = |n: &str| RowOp::Upsert {
            table: "t".into(),
            key: 1,
            row: [("id".to_string(), Value::Int(1)), ("n".to_string(), Value::Text(n.into()))].into(),
        };
        new.apply_batch(&batch(Checkpoint::default(), 1, false, vec![op("7")])).unwrap().unwrap();
        let at = new.checkpoint().unwrap();
        let refused = new.apply_batch(&batch(at.clone(), 2, true, vec![op("x")])).unwrap_err();
        assert!(matches!(refused, StoreError::Rejected(_)), "{refused}");
        assert_eq!(new.checkpoint().unwrap(), at, "nothing of it, not even its reset");
        assert_eq!(new.get("t", 1).unwrap()["n"], Value::Int(7));
    }

    fn merge_mapping() -> Mapping {
        use protocol::schema::Transform;
        let mut tables = BTreeMap::new();
        tables.insert(
            "accounts".to_string(),
            TableSchema { key: "id".into(), columns: vec!["id".into(), "email".into()] },
        );
        tables.insert(
            "profiles".to_string(),
            TableSchema { key: "user_id".into(), columns: vec!["user_id".into(), "bio".into()] },
        );
        let merge = Transform::MergeTables { table: "accounts".into(), with: "profiles".into(), into: "users".into() };
        Mapping::compile(&Schema { tables }, &[merge]).unwrap()
    }

    fn account(id: i64, email: &str) -> RowOp {
        let row = [("id".to_string(), Value::Int(id)), ("email".to_string(), Value::Text(email.into()))].into();
        RowOp::Upsert { table: "accounts".into(), key: id, row }
    }

    fn profile(id: i64, bio: &str) -> RowOp {
        let row = [("user_id".to_string(), Value::Int(id)), ("bio".to_string(), Value::Text(bio.into()))].into();
        RowOp::Upsert { table: "profiles".into(), key: id, row }
    }

    #[test]
    fn a_merged_row_takes_each_tables_columns_and_lives_while_either_has_it() {
        let mut new = MemStore::new_universe(merge_mapping());
        let mut applied = 0;
        let mut apply = |new: &mut MemStore, ops: Vec<RowOp>| {
            applied += 1;
            let base = new.checkpoint().unwrap();
            new.apply_batch(&batch(base, applied, false, ops)).unwrap().unwrap();
        };
        let user = |new: &MemStore, id| new.get("users", id).cloned();
        let text = |s: &str| Value::Text(s.into());
        // Both halves of one row in one batch: the second sees the first.
        apply(&mut new, vec![account(1, "a@x"), profile(1, "hi"), profile(2, "only a profile")]);
        let one = user(&new, 1).unwrap();
        assert_eq!((one["email"].clone(), one["bio"].clone()), (text("a@x"), text("hi")));
        let two = user(&new, 2).unwrap();
        assert_eq!((two["email"].clone(), two["bio"].clone()), (Value::Null, text("only a profile")));
        apply(&mut new, vec![account(1, "new@x")]);
        assert_eq!(user(&new, 1).unwrap()["bio"], text("hi"), "an account's update leaves the profile's columns");
        apply(&mut new, vec![RowOp::Delete { table: "accounts".into(), key: 1 }]);
        let one = user(&new, 1).expect("the profile still has the row");
        assert_eq!((one["email"].clone(), one["bio"].clone()), (Value::Null, text("hi")));
        apply(&mut new, vec![RowOp::Delete { table: "profiles".into(), key: 1 }]);
        assert_eq!(user(&new, 1), None, "neither has it: gone");
        // transform(old) staged from both tables' rows equals the merged table.
        let old_rows = |op: RowOp| match op {
            RowOp::Upsert { table, key, row } => (table, key, row),
            RowOp::Delete { .. } => unreachable!(),
        };
        new.stage(&[old_rows(profile(2, "only a profile"))], true).unwrap();
        assert!(new.compare_staged().map(|(e, a)| e == a).unwrap());
        new.stage(&[old_rows(account(2, "late@x")), old_rows(profile(2, "only a profile"))], true).unwrap();
        assert!(!new.compare_staged().map(|(e, a)| e == a).unwrap(), "an account the new store lacks");
    }
}
