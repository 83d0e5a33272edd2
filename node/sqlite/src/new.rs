//! The new universe's database: batches converted by the plan's mapping with their checkpoint,
//! the key map, the guard, and the comparison with transform(old).

use crate::program::{self, ProgramError, Target, KEYS_TABLE, KEY_NEXT_TABLE};
use crate::sql::{self, ident, literal};
use crate::SqliteError;
use node_core::duties::validate::row_hash;
use node_core::store::{Batch, Checkpoint, KeysCompared, NewStore, Sequences, StaleBatch, StoreError, StoredRow};
use protocol::schema::{Mapping, RowOp, Schema};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use std::collections::BTreeMap;

/// The checkpoint table: one row, the transform's progress as JSON.
pub const CHECKPOINT_TABLE: &str = "imago_checkpoint";
/// Guard triggers' names start with this.
pub const GUARD_PREFIX: &str = "imago_guard_";
/// The database the transform's connection attaches: the guard lets through the writes of a
/// connection that has it.
pub const TRANSFORM_MARK: &str = "imago_transform";

/// A key-map entry: old table, old key, new table.
pub type KeyMapEntry = (String, i64, String);

/// The new universe's SQLite database, written by the transform.
pub struct SqliteNew {
    path: String,
    conn: Connection,
    /// What the old universe's rows and changes become.
    mapping: Mapping,
    /// The plan's new tables and the request log.
    schema: Schema,
    /// The scratch copy (temporary tables shadowing the new ones) exists.
    staging: bool,
    /// A write transaction is open on this connection, holding every other writer (see
    /// `NewStore::hold_writers`).
    held: bool,
}

impl std::fmt::Debug for SqliteNew {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteNew").field("path", &self.path).finish()
    }
}

impl SqliteNew {
    /// Opens the database at `path` (`:memory:` for one that lives with this process) for
    /// `mapping`: makes the new tables where they are missing and checks those that exist,
    /// checks that the database takes every SQL expression of the plan, and guards it: until
    /// [`SqliteNew::open_to_clients`], only this connection may write.
    pub fn open(path: &str, mapping: &Mapping) -> Result<Self, SqliteError> {
        let conn = sql::open(path)?;
        conn.execute_batch(&format!("ATTACH DATABASE ':memory:' AS {TRANSFORM_MARK}"))?;
        let schema = sql::with_request_log(&mapping.new_schema());
        let tx = conn.unchecked_transaction()?;
        // Set up before (the checkpoint table is there): the guard is as it was left, so a
        // database opened to clients stays open after a restart.
        let set_up = tx
            .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1", [CHECKPOINT_TABLE], |_| Ok(()))
            .optional()?
            .is_some();
        for (name, table) in &schema.tables {
            sql::create_table(&tx, name, table)?;
            sql::check_table(&tx, path, name, table)?;
        }
        tx.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} (id INTEGER PRIMARY KEY CHECK (id = 1), checkpoint TEXT NOT NULL)"
        ))?;
        program::create_key_map(&tx)?;
        if !set_up {
            tx.execute_batch(&guard_triggers(&schema))?;
        }
        if let Err((transform, message)) = program::check(&tx, mapping) {
            return Err(SqliteError::Expression { path: path.to_string(), transform, message });
        }
        tx.commit()?;
        Ok(SqliteNew { path: path.to_string(), conn, mapping: mapping.clone(), schema, staging: false, held: false })
    }

    /// The switch committed: clients may write now. The guard goes (and stays gone when the
    /// node opens the database again). Writers held wait no more: the guard goes in the very
    /// transaction that held them.
    pub fn open_to_clients(&mut self) -> Result<(), SqliteError> {
        self.open_to_clients_after(&Sequences::new())
    }

    /// [`SqliteNew::open_to_clients`], and while still guarded, in the same transaction, each
    /// new `AUTOINCREMENT` table's `sqlite_sequence` set past the old tables' that feed it and
    /// past its own largest key (see `NewStore::open_to_clients`).
    pub fn open_to_clients_after(&mut self, sequences: &Sequences) -> Result<(), SqliteError> {
        if self.held {
            self.continue_sequences(sequences)?;
            sql::drop_triggers(&self.conn, GUARD_PREFIX)?;
            self.conn.execute_batch("COMMIT")?;
            self.held = false;
            return Ok(());
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let opened = self
            .continue_sequences(sequences)
            .and_then(|()| sql::drop_triggers(&self.conn, GUARD_PREFIX))
            .and_then(|()| Ok(self.conn.execute_batch("COMMIT")?));
        if opened.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        opened
    }

    /// In the caller's transaction, while guarded: `sqlite_sequence` of every new
    /// `AUTOINCREMENT` table set to at least the sequences of the old tables feeding it.
    fn continue_sequences(&self, sequences: &Sequences) -> Result<(), SqliteError> {
        if sequences.is_empty()
            || sql::triggers(&self.conn, GUARD_PREFIX)?.is_empty()
            || !sql::has_sequences(&self.conn)?
        {
            return Ok(());
        }
        for (table, value) in node_core::store::feeding(&self.mapping, sequences) {
            let autoincrement: Option<String> = self
                .conn
                .query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1", [&table], |r| r.get(0))
                .optional()?;
            if !autoincrement.is_some_and(|sql| sql.to_ascii_uppercase().contains("AUTOINCREMENT")) {
                continue;
            }
            let current: Option<i64> = self
                .conn
                .query_row("SELECT seq FROM sqlite_sequence WHERE name = ?1", [&table], |r| r.get(0))
                .optional()?;
            match current {
                Some(seq) if seq >= value => {}
                Some(_) => {
                    self.conn.execute(
                        "UPDATE sqlite_sequence SET seq = ?2 WHERE name = ?1",
                        rusqlite::params![table, value],
                    )?;
                }
                None => {
                    self.conn.execute(
                        "INSERT INTO sqlite_sequence (name, seq) VALUES (?1, ?2)",
                        rusqlite::params![table, value],
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Holds every other writer: a write transaction stays open on this connection (they wait
    /// for it within their busy timeout) until [`SqliteNew::open_to_clients`] or
    /// [`SqliteNew::release_writers`]. Idempotent.
    pub fn hold_writers(&mut self) -> Result<(), SqliteError> {
        if !self.held {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            self.held = true;
        }
        Ok(())
    }

    /// Lets held writers go on (the guard then refuses them). Idempotent.
    pub fn release_writers(&mut self) -> Result<(), SqliteError> {
        if self.held {
            self.held = false;
            self.conn.execute_batch("ROLLBACK")?;
        }
        Ok(())
    }

    /// Whether clients may write (the switch committed).
    pub fn is_open_to_clients(&self) -> Result<bool, SqliteError> {
        Ok(sql::triggers(&self.conn, GUARD_PREFIX)?.is_empty())
    }

    /// The upgrade is over: Imago's objects go (the checkpoint, the key map and the guard).
    pub fn remove_imago(&mut self) -> Result<(), SqliteError> {
        self.release_writers()?;
        self.drop_staging()?;
        remove_imago(&mut self.conn)
    }

    /// The operator retires the new database at `path` after its upgrade ended: Imago's objects
    /// go, as [`SqliteNew::remove_imago`], without setting anything up first (opening the
    /// store would make the guard again where the checkpoint is gone, and refuse a serving
    /// application's writes meanwhile). What of Imago's is left but the request log.
    pub fn retire(path: &str) -> Result<Vec<String>, SqliteError> {
        let mut conn = sql::open(path)?;
        remove_imago(&mut conn)?;
        crate::old::imago_objects(&conn)
    }

    /// Names of Imago's objects left in the database (triggers and tables), for checks.
    pub fn imago_objects(&self) -> Result<Vec<String>, SqliteError> {
        crate::old::imago_objects(&self.conn)
    }

    /// Every row of `table` (key order), for checks.
    pub fn rows(&self, table: &str) -> Result<Vec<(i64, protocol::schema::Row)>, SqliteError> {
        let Some(schema) = self.schema.tables.get(table) else {
            return Err(SqliteError::Schema {
                path: self.path.clone(),
                table: table.into(),
                message: "not a table of the new schema".into(),
            });
        };
        let columns = schema.columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
        let sql = format!("SELECT {columns} FROM main.{} ORDER BY {}", ident(table), ident(&schema.key));
        let mut stmt = self.conn.prepare(&sql)?;
        let mut rows = stmt.query([])?;
        let mut all = Vec::new();
        while let Some(r) = rows.next()? {
            all.push(sql::row_of(table, schema, r)?);
        }
        Ok(all)
    }

    /// The key map's entries: (old table, old key, new table) → generated key, for checks.
    pub fn key_map(&self) -> Result<Vec<(KeyMapEntry, i64)>, SqliteError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT src_table, src_key, target, key FROM main.{KEYS_TABLE} ORDER BY 1, 2, 3"))?;
        let entries =
            stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?, r.get(2)?), r.get(3)?)))?.collect::<Result<_, _>>()?;
        Ok(entries)
    }

    /// Drops the scratch copy, if any (so that nothing but a comparison ever sees it).
    fn drop_staging(&mut self) -> Result<(), SqliteError> {
        if self.staging {
            for name in self.schema.tables.keys() {
                self.conn.execute_batch(&format!("DROP TABLE IF EXISTS temp.{}", ident(name)))?;
            }
            self.staging = false;
        }
        Ok(())
    }

    fn stored_checkpoint(conn: &Connection) -> Result<Checkpoint, SqliteError> {
        let json: Option<String> = conn
            .query_row(&format!("SELECT checkpoint FROM {CHECKPOINT_TABLE} WHERE id = 1"), [], |r| r.get(0))
            .optional()?;
        match json {
            None => Ok(Checkpoint::default()),
            Some(json) => serde_json::from_str(&json).map_err(|e| SqliteError::Value {
                table: CHECKPOINT_TABLE.into(),
                column: "checkpoint".into(),
                what: format!("an unreadable checkpoint: {e}"),
            }),
        }
    }

    fn apply(&mut self, batch: &Batch) -> Result<Result<(), StaleBatch>, StoreError> {
        self.release_writers()?;
        self.drop_staging()?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(unavailable)?;
        let found = Self::stored_checkpoint(&tx)?;
        if found != batch.base {
            return Ok(Err(StaleBatch { base: batch.base.clone(), found }));
        }
        if batch.reset {
            for name in self.schema.tables.keys() {
                tx.execute_batch(&format!("DELETE FROM main.{}", ident(name))).map_err(unavailable)?;
            }
            tx.execute_batch(&format!("DELETE FROM main.{KEYS_TABLE}; DELETE FROM main.{KEY_NEXT_TABLE};"))
                .map_err(unavailable)?;
        }
        for op in &batch.ops {
            program::apply(&tx, &self.mapping, op, Target::Main).map_err(refused)?;
        }
        tx.execute(
            &format!(
                "INSERT INTO {CHECKPOINT_TABLE} (id, checkpoint) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET checkpoint = excluded.checkpoint"
            ),
            [encode(&batch.checkpoint)],
        )
        .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(Ok(()))
    }

    /// Old rows through the mapping into the scratch copy: temporary tables named as the new
    /// ones, which they shadow for the plan's expressions. Each row in a savepoint of its own,
    /// so one that cannot be converted leaves nothing behind.
    fn stage_rows(&mut self, rows: &[StoredRow], first: bool) -> Result<u64, SqliteError> {
        self.release_writers()?;
        if first {
            self.drop_staging()?;
        }
        if !self.staging {
            for (name, table) in &self.schema.tables {
                sql::create_table_in(&self.conn, "temp", name, table)?;
            }
            self.staging = true;
        }
        let tx = self.conn.unchecked_transaction()?;
        let mut rejected = 0;
        for (table, key, row) in rows {
            tx.execute_batch("SAVEPOINT imago_row")?;
            let op = RowOp::Upsert { table: table.clone(), key: *key, row: row.clone() };
            match program::apply(&tx, &self.mapping, &op, Target::Staging) {
                Ok(()) => tx.execute_batch("RELEASE imago_row")?,
                Err(_) => {
                    rejected += 1;
                    tx.execute_batch("ROLLBACK TO imago_row; RELEASE imago_row")?;
                }
            }
        }
        tx.commit()?;
        Ok(rejected)
    }

    fn sum(&self, schema_name: &str) -> Result<u64, SqliteError> {
        self.sum_of(schema_name, false)
    }

    /// The row hashes of `schema_name`'s tables summed; with `staged_keys`, of the rows whose
    /// keys the scratch copy holds only.
    fn sum_of(&self, schema_name: &str, staged_keys: bool) -> Result<u64, SqliteError> {
        Ok(self.tally_of(schema_name, staged_keys)?.values().fold(0u64, |sum, (_, s)| sum.wrapping_add(*s)))
    }

    /// [`SqliteNew::sum_of`] by table: (rows, their hashes summed).
    fn tally_of(&self, schema_name: &str, staged_keys: bool) -> Result<BTreeMap<String, (u64, u64)>, SqliteError> {
        let tx = self.conn.unchecked_transaction()?;
        let mut tally = BTreeMap::new();
        for (name, table) in &self.schema.tables {
            let (mut rows_seen, mut sum) = (0u64, 0u64);
            let columns = table.columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
            let (table_name, key) = (ident(name), ident(&table.key));
            let filter = if staged_keys {
                format!(" WHERE {key} IN (SELECT {key} FROM temp.{table_name})")
            } else {
                String::new()
            };
            let mut stmt = tx.prepare_cached(&format!("SELECT {columns} FROM {schema_name}.{table_name}{filter}"))?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let (key, row) = sql::row_of(name, table, r)?;
                sum = sum.wrapping_add(row_hash(name, key, &row));
                rows_seen += 1;
            }
            tally.insert(name.clone(), (rows_seen, sum));
        }
        tx.commit()?;
        Ok(tally)
    }
}

fn encode(checkpoint: &Checkpoint) -> String {
    serde_json::to_string(checkpoint).expect("a checkpoint encodes")
}

/// A database error: busy, or an I/O failure, may pass (try again); anything else about the
/// batch will not.
fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Why a change of the batch could not be applied: a conversion Imago refuses, or an error of
/// the database's (busy and I/O errors pass; an expression it rejects, a constraint, do not).
fn refused(e: ProgramError) -> StoreError {
    use rusqlite::ErrorCode;
    match e {
        ProgramError::Sqlite(rusqlite::Error::SqliteFailure(f, _))
            if matches!(
                f.code,
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::SystemIoFailure | ErrorCode::DiskFull
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        e => StoreError::Rejected(e.to_string()),
    }
}

/// Triggers that refuse every write but the transform's (a connection with [`TRANSFORM_MARK`]
/// attached) until the switch.
fn guard_triggers(schema: &Schema) -> String {
    let mut ddl = String::new();
    for name in schema.tables.keys() {
        for (event, what) in [("insert", "INSERT"), ("update", "UPDATE"), ("delete", "DELETE")] {
            let message = format!(
                "imago: `{name}` belongs to a universe that is not switched to yet: only Imago's transform writes it until the switch"
            );
            ddl.push_str(&format!(
                "CREATE TRIGGER IF NOT EXISTS {trigger} BEFORE {what} ON {table} \
                 WHEN NOT EXISTS (SELECT 1 FROM pragma_database_list WHERE name = {mark}) \
                 BEGIN SELECT RAISE(ABORT, {message}); END;\n",
                trigger = ident(&format!("{GUARD_PREFIX}{name}_{event}")),
                table = ident(name),
                mark = literal(TRANSFORM_MARK),
                message = literal(&message),
            ));
        }
    }
    ddl
}

impl NewStore for SqliteNew {
    fn checkpoint(&self) -> Result<Checkpoint, StoreError> {
        Ok(Self::stored_checkpoint(&self.conn)?)
    }

    fn apply_batch(&mut self, batch: &Batch) -> Result<Result<(), StaleBatch>, StoreError> {
        self.apply(batch)
    }

    fn stage(&mut self, rows: &[StoredRow], first: bool) -> Result<u64, StoreError> {
        Ok(self.stage_rows(rows, first)?)
    }

    fn compare_staged(&mut self) -> Result<(u64, u64), StoreError> {
        if !self.staging {
            // Nothing was staged: transform(old) is empty.
            return Ok((0, self.sum("main")?));
        }
        // The scratch copy stays until the next batch or first stage: an answer lost on its way
        // is asked for again and must be the same.
        Ok((self.sum("temp")?, self.sum("main")?))
    }

    fn compare_staged_keys(&mut self) -> Result<KeysCompared, StoreError> {
        if !self.staging {
            return Ok(KeysCompared::default());
        }
        Ok(KeysCompared::of(&self.tally_of("temp", false)?, &self.tally_of("main", true)?))
    }

    fn checksum(&self) -> Result<u64, StoreError> {
        Ok(self.sum("main")?)
    }

    fn open_to_clients(&mut self, sequences: &Sequences) -> Result<(), StoreError> {
        Ok(SqliteNew::open_to_clients_after(self, sequences)?)
    }

    fn hold_writers(&mut self) -> Result<(), StoreError> {
        Ok(SqliteNew::hold_writers(self)?)
    }

    fn release_writers(&mut self) -> Result<(), StoreError> {
        Ok(SqliteNew::release_writers(self)?)
    }
}

/// Drops the guard, the checkpoint and the key map, in one transaction.
fn remove_imago(conn: &mut rusqlite::Connection) -> Result<(), SqliteError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    sql::drop_triggers(&tx, GUARD_PREFIX)?;
    tx.execute_batch(&format!(
        "DROP TABLE IF EXISTS {CHECKPOINT_TABLE}; DROP TABLE IF EXISTS main.{KEYS_TABLE}; DROP TABLE IF EXISTS main.{KEY_NEXT_TABLE};"
    ))?;
    tx.commit()?;
    Ok(())
}
