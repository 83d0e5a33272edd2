//! The old universe's database: capture by triggers, snapshots, the fence.

use crate::sql::{self, ident, literal};
use crate::SqliteError;
use node_core::store::{ChangeRead, Chunk, OldStore, RowCursor, Sequences, SnapshotId, StoreError};
use protocol::schema::{Row, RowOp, Schema, TableSchema, Value};
use protocol::Position;
use rusqlite::{Connection, TransactionBehavior};
use std::collections::BTreeMap;

/// The change table: one row per captured change, keyed by its position.
pub const CHANGES_TABLE: &str = "imago_changes";
/// Capture triggers' names start with this.
pub const CAPTURE_PREFIX: &str = "imago_capture_";
/// Fence triggers' names start with this.
pub const FENCE_PREFIX: &str = "imago_fence_";

/// The old universe's SQLite database, captured.
pub struct SqliteOld {
    path: String,
    conn: Connection,
    /// The plan's old tables and the request log, in name order (the order rows are read in).
    schema: Schema,
    /// Open snapshots: a read transaction each, on a connection of its own.
    snapshots: BTreeMap<SnapshotId, Connection>,
    next_snapshot: u64,
}

impl std::fmt::Debug for SqliteOld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteOld").field("path", &self.path).field("snapshots", &self.snapshots.len()).finish()
    }
}

impl SqliteOld {
    /// Opens the database at `path` (a file: snapshots need connections of their own), checks
    /// its tables against the plan's old `schema`, and installs capture (idempotent: a
    /// restarted node opens it again and captures on from where it was).
    pub fn open(path: &str, schema: &Schema) -> Result<Self, SqliteError> {
        let conn = sql::open(path)?;
        let schema = sql::with_request_log(schema);
        for (name, table) in &schema.tables {
            if name == protocol::schema::REQUEST_LOG_TABLE {
                sql::create_table(&conn, name, table)?;
            }
            sql::check_table(&conn, path, name, table)?;
        }
        let store = SqliteOld { path: path.to_string(), conn, schema, snapshots: BTreeMap::new(), next_snapshot: 0 };
        store.install_capture()?;
        Ok(store)
    }

    fn install_capture(&self) -> Result<(), SqliteError> {
        let mut ddl = format!(
            "CREATE TABLE IF NOT EXISTS {CHANGES_TABLE} (\
               position INTEGER PRIMARY KEY, \
               tbl TEXT NOT NULL, \
               key INTEGER NOT NULL, \
               row TEXT);\n"
        );
        for (name, table) in &self.schema.tables {
            ddl.push_str(&capture_triggers(name, table));
        }
        let tx = self.conn.unchecked_transaction()?;
        tx.execute_batch(&ddl)?;
        tx.commit()?;
        Ok(())
    }

    /// The last captured position (0 before the first change).
    pub fn captured(&self) -> Result<Position, SqliteError> {
        last_position(&self.conn)
    }

    /// Runs `sql` on the database as the application would (tests, demos).
    pub fn execute(&self, sql: &str) -> Result<(), SqliteError> {
        self.conn.execute_batch(sql)?;
        Ok(())
    }

    /// Removes capture: the triggers and the change table (the upgrade ended or was aborted).
    /// The fence, if any, stays: see [`SqliteOld::retire`].
    pub fn remove_capture(&mut self) -> Result<(), SqliteError> {
        self.snapshots.clear();
        remove(&mut self.conn, false)
    }

    /// The operator retires the old database after a switch: every object of Imago's goes,
    /// the fence too.
    pub fn retire(&mut self) -> Result<(), SqliteError> {
        self.snapshots.clear();
        remove(&mut self.conn, true)
    }

    /// The operator retires the old database at `path` once its upgrade ended, as
    /// [`SqliteOld::retire`], without opening the store (which would install capture first).
    /// What of Imago's is left but the request log.
    pub fn retire_at(path: &str) -> Result<Vec<String>, SqliteError> {
        let mut conn = sql::open(path)?;
        remove(&mut conn, true)?;
        imago_objects(&conn)
    }

    /// Names of Imago's objects left in the database (triggers and tables), for checks.
    pub fn imago_objects(&self) -> Result<Vec<String>, SqliteError> {
        imago_objects(&self.conn)
    }

    /// The `AUTOINCREMENT` tables' last keys given (`sqlite_sequence`), by captured table.
    pub fn sequences(&self) -> Result<Sequences, SqliteError> {
        let mut found = Sequences::new();
        if !sql::has_sequences(&self.conn)? {
            return Ok(found);
        }
        let mut stmt = self.conn.prepare("SELECT name, seq FROM sqlite_sequence")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (name, seq): (String, i64) = (r.get(0)?, r.get(1)?);
            if self.schema.tables.contains_key(&name) {
                found.insert(name, seq);
            }
        }
        Ok(found)
    }

    fn changes(&self, after: Position, limit: usize) -> Result<(Vec<(Position, RowOp)>, Position), SqliteError> {
        let tx = self.conn.unchecked_transaction()?;
        let last = last_position(&tx)?;
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT position, tbl, key, row FROM {CHANGES_TABLE} WHERE position > ?1 ORDER BY position LIMIT ?2"
        ))?;
        let mut found = stmt.query(rusqlite::params![after.0 as i64, limit as i64])?;
        let mut changes = Vec::new();
        while let Some(r) = found.next()? {
            let position = Position(r.get::<_, i64>(0)? as u64);
            let table: String = r.get(1)?;
            let key: i64 = r.get(2)?;
            let row: Option<String> = r.get(3)?;
            let op = match row {
                None => RowOp::Delete { table, key },
                Some(json) => {
                    let row = decode_row(&table, &json)?;
                    RowOp::Upsert { table, key, row }
                }
            };
            changes.push((position, op));
        }
        drop(found);
        drop(stmt);
        tx.commit()?;
        Ok((changes, last))
    }

    fn do_fence(&mut self) -> Result<Position, SqliteError> {
        // A write transaction: it starts once the writer in flight commits (or the busy
        // timeout ends, and the core tries again), so in-flight writes finish and are captured
        // before the final position is read.
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut ddl = String::new();
        for name in self.schema.tables.keys() {
            for (event, what) in [("insert", "INSERT"), ("update", "UPDATE"), ("delete", "DELETE")] {
                let message = format!(
                    "imago: `{name}` is fenced: an upgrade is switching this database over (writes are refused until it ends)"
                );
                ddl.push_str(&format!(
                    "CREATE TRIGGER IF NOT EXISTS {trigger} BEFORE {what} ON {table} BEGIN SELECT RAISE(ABORT, {message}); END;\n",
                    trigger = ident(&format!("{FENCE_PREFIX}{name}_{event}")),
                    table = ident(name),
                    message = literal(&message),
                ));
            }
        }
        tx.execute_batch(&ddl)?;
        let last = last_position(&tx)?;
        tx.commit()?;
        Ok(last)
    }

    fn do_unfence(&mut self) -> Result<(), SqliteError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        sql::drop_triggers(&tx, FENCE_PREFIX)?;
        tx.commit()?;
        Ok(())
    }
}

/// The capture triggers of one table: every change's row (or, for a delete, none) with the
/// next position, in the writer's own transaction.
fn capture_triggers(name: &str, table: &TableSchema) -> String {
    let row = |of: &str| {
        let fields: Vec<String> = table
            .columns
            .iter()
            .map(|c| {
                let v = format!("{of}.{}", ident(c));
                // Text loses any JSON subtype (`|| ''`), so it is stored as a string; a BLOB
                // becomes an object, refused when read (a trigger must never fail the write).
                format!(
                    "{}, CASE typeof({v}) WHEN 'text' THEN {v} || '' WHEN 'blob' THEN json_object('blob', hex({v})) ELSE {v} END",
                    literal(c)
                )
            })
            .collect();
        format!("json_object({})", fields.join(", "))
    };
    let (t, key, tbl) = (ident(name), ident(&table.key), literal(name));
    let trigger = |event: &str| ident(&format!("{CAPTURE_PREFIX}{name}_{event}"));
    format!(
        "CREATE TRIGGER IF NOT EXISTS {ins} AFTER INSERT ON {t} BEGIN \
           INSERT INTO {CHANGES_TABLE} (tbl, key, row) VALUES ({tbl}, NEW.{key}, {new_row}); END;\n\
         CREATE TRIGGER IF NOT EXISTS {upd} AFTER UPDATE ON {t} BEGIN \
           INSERT INTO {CHANGES_TABLE} (tbl, key, row) SELECT {tbl}, OLD.{key}, NULL WHERE OLD.{key} IS NOT NEW.{key}; \
           INSERT INTO {CHANGES_TABLE} (tbl, key, row) VALUES ({tbl}, NEW.{key}, {new_row}); END;\n\
         CREATE TRIGGER IF NOT EXISTS {del} AFTER DELETE ON {t} BEGIN \
           INSERT INTO {CHANGES_TABLE} (tbl, key, row) VALUES ({tbl}, OLD.{key}, NULL); END;\n",
        ins = trigger("insert"),
        upd = trigger("update"),
        del = trigger("delete"),
        new_row = row("NEW"),
    )
}

/// A captured row back from its JSON.
fn decode_row(table: &str, json: &str) -> Result<Row, SqliteError> {
    let err =
        |column: &str, what: &str| SqliteError::Value { table: table.into(), column: column.into(), what: what.into() };
    let parsed: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(json).map_err(|e| err("", &format!("a captured row that is not a JSON object: {e}")))?;
    let mut row = Row::new();
    for (column, value) in parsed {
        let value = match value {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::String(s) => Value::Text(s),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => return Err(err(&column, "a REAL value: Imago carries integers, text and NULL")),
            },
            serde_json::Value::Object(_) => {
                return Err(err(&column, "a BLOB value: Imago carries integers, text and NULL"))
            }
            other => return Err(err(&column, &format!("an unexpected captured value {other}"))),
        };
        row.insert(column, value);
    }
    Ok(row)
}

/// The last position handed out by the change table (0 when none was): its largest key. The
/// row with the largest key is never pruned, so a new change is always numbered after every
/// earlier one (SQLite gives a new row the largest key plus one); without `AUTOINCREMENT` a
/// change writes no `sqlite_sequence` page as well.
fn last_position(conn: &Connection) -> Result<Position, SqliteError> {
    let last: i64 =
        conn.query_row(&format!("SELECT coalesce(max(position), 0) FROM {CHANGES_TABLE}"), [], |r| r.get(0))?;
    Ok(Position(last.max(0) as u64))
}

/// Imago's triggers and tables in the database (the request log aside: it is data).
pub(crate) fn imago_objects(conn: &Connection) -> Result<Vec<String>, SqliteError> {
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE substr(name, 1, 6) = 'imago_' AND name <> ?1 AND type IN ('table', 'trigger') ORDER BY name",
    )?;
    let names = stmt.query_map([protocol::schema::REQUEST_LOG_TABLE], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(names)
}

/// Drops capture (triggers and change table) and, if `fence`, the fence, in one transaction.
fn remove(conn: &mut Connection, fence: bool) -> Result<(), SqliteError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    sql::drop_triggers(&tx, CAPTURE_PREFIX)?;
    tx.execute_batch(&format!("DROP TABLE IF EXISTS {CHANGES_TABLE}"))?;
    if fence {
        sql::drop_triggers(&tx, FENCE_PREFIX)?;
    }
    tx.commit()?;
    Ok(())
}

impl OldStore for SqliteOld {
    fn open_snapshot(&mut self) -> Result<(SnapshotId, Position), StoreError> {
        // Capture first (idempotent): it was removed if an earlier upgrade from this
        // database was rolled back, and every change after the snapshot must be captured.
        self.install_capture()?;
        let conn = sql::open_reader(&self.path)?;
        // The read transaction starts at its first read: the position and every later read
        // of this snapshot see the same committed state.
        conn.execute_batch("BEGIN DEFERRED").map_err(SqliteError::from)?;
        let at = last_position(&conn)?;
        self.next_snapshot += 1;
        let id = SnapshotId(self.next_snapshot);
        self.snapshots.insert(id, conn);
        Ok((id, at))
    }

    fn snapshot_rows(&self, snapshot: SnapshotId) -> Result<u64, StoreError> {
        let conn = self.snapshots.get(&snapshot).ok_or(StoreError::SnapshotGone(snapshot))?;
        let mut rows = 0u64;
        for name in self.schema.tables.keys() {
            let count: i64 = conn
                .query_row(&format!("SELECT count(*) FROM {}", ident(name)), [], |r| r.get(0))
                .map_err(SqliteError::from)?;
            rows += count.max(0) as u64;
        }
        Ok(rows)
    }

    fn snapshot_chunk(&self, snapshot: SnapshotId, after: &RowCursor, limit: usize) -> Result<Chunk, StoreError> {
        let conn = self.snapshots.get(&snapshot).ok_or(StoreError::SnapshotGone(snapshot))?;
        let position = last_position(&self.conn)?;
        Ok(sql::read_rows(conn, &self.schema, after, limit, position)?)
    }

    fn rows_chunk(&self, after: &RowCursor, limit: usize) -> Result<Chunk, StoreError> {
        let tx = self.conn.unchecked_transaction().map_err(SqliteError::from)?;
        let position = last_position(&tx)?;
        let chunk = sql::read_rows(&tx, &self.schema, after, limit, position)?;
        tx.commit().map_err(SqliteError::from)?;
        Ok(chunk)
    }

    fn changes_after(&self, after: Position, limit: usize) -> Result<ChangeRead, StoreError> {
        let (changes, last) = self.changes(after, limit)?;
        Ok(ChangeRead::counted(after, limit, changes, last))
    }

    fn fence(&mut self) -> Result<Position, StoreError> {
        Ok(self.do_fence()?)
    }

    fn unfence(&mut self) -> Result<(), StoreError> {
        Ok(self.do_unfence()?)
    }

    fn is_fenced(&self) -> Result<bool, StoreError> {
        Ok(!sql::triggers(&self.conn, FENCE_PREFIX)?.is_empty())
    }

    fn prune(&mut self, up_to: Position) -> Result<(), StoreError> {
        // The last change stays (see `last_position`): it holds the numbering.
        self.conn
            .execute(
                &format!(
                    "DELETE FROM {CHANGES_TABLE} WHERE position <= ?1 AND position < (SELECT max(position) FROM {CHANGES_TABLE})"
                ),
                [up_to.0 as i64],
            )
            .map_err(SqliteError::from)?;
        Ok(())
    }

    fn disconnect(&mut self) {
        self.snapshots.clear();
    }

    fn sequences(&self) -> Result<Sequences, StoreError> {
        Ok(SqliteOld::sequences(self)?)
    }

    fn remove_capture(&mut self) -> Result<(), StoreError> {
        Ok(SqliteOld::remove_capture(self)?)
    }
}
