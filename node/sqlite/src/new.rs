//! The new universe's database: batches with their checkpoint, the guard, checksums.

use crate::sql::{self, ident, literal};
use crate::SqliteError;
use node_core::duties::validate::row_hash;
use node_core::store::{Batch, Checkpoint, NewStore, StaleBatch, StoreError};
use protocol::schema::{RowOp, Schema};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

/// The checkpoint table: one row, the transform's progress as JSON.
pub const CHECKPOINT_TABLE: &str = "imago_checkpoint";
/// Guard triggers' names start with this.
pub const GUARD_PREFIX: &str = "imago_guard_";
/// The database the transform's connection attaches: the guard lets through the writes of a
/// connection that has it.
pub const TRANSFORM_MARK: &str = "imago_transform";

/// The new universe's SQLite database, written by the transform.
pub struct SqliteNew {
    path: String,
    conn: Connection,
    /// The plan's new tables and the request log.
    schema: Schema,
}

impl std::fmt::Debug for SqliteNew {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteNew").field("path", &self.path).finish()
    }
}

impl SqliteNew {
    /// Opens the database at `path` (`:memory:` for one that lives with this process), makes
    /// the plan's new tables where they are missing and checks those that exist, and guards
    /// it: until [`SqliteNew::open_to_clients`], only this connection may write.
    pub fn open(path: &str, schema: &Schema) -> Result<Self, SqliteError> {
        let conn = sql::open(path)?;
        conn.execute_batch(&format!("ATTACH DATABASE ':memory:' AS {TRANSFORM_MARK}"))?;
        let schema = sql::with_request_log(schema);
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
        if !set_up {
            tx.execute_batch(&guard_triggers(&schema))?;
        }
        tx.commit()?;
        Ok(SqliteNew { path: path.to_string(), conn, schema })
    }

    /// The switch committed: clients may write now. The guard goes (and stays gone when the
    /// node opens the database again).
    pub fn open_to_clients(&mut self) -> Result<(), SqliteError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        sql::drop_triggers(&tx, GUARD_PREFIX)?;
        tx.commit()?;
        Ok(())
    }

    /// Whether clients may write (the switch committed).
    pub fn is_open_to_clients(&self) -> Result<bool, SqliteError> {
        Ok(sql::triggers(&self.conn, GUARD_PREFIX)?.is_empty())
    }

    /// The upgrade is over: Imago's objects go (the checkpoint and the guard).
    pub fn remove_imago(&mut self) -> Result<(), SqliteError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        sql::drop_triggers(&tx, GUARD_PREFIX)?;
        tx.execute_batch(&format!("DROP TABLE IF EXISTS {CHECKPOINT_TABLE}"))?;
        tx.commit()?;
        Ok(())
    }

    /// Names of Imago's objects left in the database (triggers and tables), for checks.
    pub fn imago_objects(&self) -> Result<Vec<String>, SqliteError> {
        crate::old::imago_objects(&self.conn)
    }

    /// Every row of `table` (key order), for checks.
    pub fn rows(&self, table: &str) -> Result<Vec<(i64, protocol::schema::Row)>, SqliteError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let one = Schema { tables: [(table.to_string(), self.schema.tables[table].clone())].into() };
            let chunk = sql::read_rows(&self.conn, &one, &after, 1000, protocol::Position(0))?;
            after = chunk.rows.last().map(|(t, k, _)| (t.clone(), *k)).or(after);
            all.extend(chunk.rows.into_iter().map(|(_, k, r)| (k, r)));
            if chunk.last {
                return Ok(all);
            }
        }
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

    fn apply(&mut self, batch: &Batch) -> Result<Result<(), StaleBatch>, SqliteError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found = Self::stored_checkpoint(&tx)?;
        if found != batch.base {
            return Ok(Err(StaleBatch { base: batch.base.clone(), found }));
        }
        if batch.reset {
            for name in self.schema.tables.keys() {
                tx.execute_batch(&format!("DELETE FROM {}", ident(name)))?;
            }
        }
        for op in &batch.ops {
            apply_op(&tx, &self.schema, op)?;
        }
        tx.execute(
            &format!(
                "INSERT INTO {CHECKPOINT_TABLE} (id, checkpoint) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET checkpoint = excluded.checkpoint"
            ),
            [encode(&batch.checkpoint)],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }

    fn sum(&self) -> Result<u64, SqliteError> {
        let tx = self.conn.unchecked_transaction()?;
        let mut sum = 0u64;
        for (name, table) in &self.schema.tables {
            let columns = table.columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
            let mut stmt = tx.prepare_cached(&format!("SELECT {columns} FROM {}", ident(name)))?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let (key, row) = sql::row_of(name, table, r)?;
                sum = sum.wrapping_add(row_hash(name, key, &row));
            }
        }
        tx.commit()?;
        Ok(sum)
    }
}

fn encode(checkpoint: &Checkpoint) -> String {
    serde_json::to_string(checkpoint).expect("a checkpoint encodes")
}

/// One new-schema change, as an upsert by key or a delete by key.
fn apply_op(conn: &Connection, schema: &Schema, op: &RowOp) -> Result<(), SqliteError> {
    let unknown = |table: &str| SqliteError::Schema {
        path: String::new(),
        table: table.into(),
        message: "a change for a table the new schema lacks".into(),
    };
    match op {
        RowOp::Upsert { table, key, row } => {
            let schema_table = schema.tables.get(table).ok_or_else(|| unknown(table))?;
            let columns: Vec<&String> = row.keys().collect();
            let names = columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
            let params = (1..=columns.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
            let updates: Vec<String> = columns
                .iter()
                .filter(|c| ***c != schema_table.key)
                .map(|c| format!("{0} = excluded.{0}", ident(c)))
                .collect();
            let on_conflict = if updates.is_empty() {
                "DO NOTHING".to_string()
            } else {
                format!("DO UPDATE SET {}", updates.join(", "))
            };
            let sql = format!(
                "INSERT INTO {} ({names}) VALUES ({params}) ON CONFLICT ({}) {on_conflict}",
                ident(table),
                ident(&schema_table.key)
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let values: Vec<rusqlite::types::Value> = row
                .iter()
                .map(
                    |(c, v)| {
                        if *c == schema_table.key {
                            rusqlite::types::Value::Integer(*key)
                        } else {
                            sql::sql_value(v)
                        }
                    },
                )
                .collect();
            stmt.execute(rusqlite::params_from_iter(values))?;
        }
        RowOp::Delete { table, key } => {
            let schema_table = schema.tables.get(table).ok_or_else(|| unknown(table))?;
            let mut stmt =
                conn.prepare_cached(&format!("DELETE FROM {} WHERE {} = ?1", ident(table), ident(&schema_table.key)))?;
            stmt.execute([*key])?;
        }
    }
    Ok(())
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
        Ok(self.apply(batch)?)
    }

    fn checksum(&self) -> Result<u64, StoreError> {
        Ok(self.sum()?)
    }
}
