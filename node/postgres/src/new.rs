//! The new universe's PostgreSQL database: batches converted by the plan's mapping with their
//! checkpoint, the key map, the guard, and the comparison with transform(old).
//!
//! [`PgNew`] performs the new side of the data-store interface (`node_core::store::NewStore`,
//! the same operations and contracts, as `async fn`s):
//!
//! - *Tables.* The plan's new tables and the request log are made where missing (the key
//!   `bigint PRIMARY KEY`; a column every source of which is an integer `bigint`; a column
//!   copied as it is, the old column's type where [`PgNew::open_typed`] was given the old
//!   database's types and the type is a built-in one; any other `text`) and checked where present (exactly the declared columns, the key an integer and
//!   the primary key). Values are bound as text and cast to the live column's type.
//! - *The guard.* Until [`PgNew::open_to_clients`], statement-level triggers (`ENABLE ALWAYS`)
//!   refuse every write (SQLSTATE 25006) of a session that has not set [`TRANSFORM_SETTING`],
//!   which the transform's own connection sets when it connects. They are made once, when the
//!   store is first set up, and not made again at a restart: a store opened to clients stays
//!   open.
//! - *A batch* is one transaction: the stored checkpoint ([`CHECKPOINT_TABLE`]) is locked and
//!   compared with the batch's base, the reset empties the tables and the key map, each old
//!   change runs the plan's mapping as SQL (`program.rs`), and the new checkpoint is written.
//! - *The comparison* converts old rows into temporary tables named as the new ones (which
//!   PostgreSQL looks up first, so a plan's expression reading a new table reads the scratch
//!   copy), and sums the same row hashes as the store in memory over both.

use crate::changes::{value_of, ColumnInfo};
use crate::program::{self, Cache, Live, LiveTable, Program, ProgramError, Target, KEYS_TABLE, KEY_NEXT_TABLE};
use crate::set::{set_run, Insert, SET_ROWS_MIN};
use crate::sql::{self, describe, ident, literal, sql_error};
use crate::PgError;
use node_core::duties::validate::row_hash;
use node_core::store::{Batch, Checkpoint, CopyState, KeysCompared, Sequences, StaleBatch, StoreError, StoredRow};
use protocol::schema::{Mapping, Row, RowOp, Schema, REQUEST_LOG_TABLE};
use protocol::Position;
use std::collections::BTreeMap;
use tokio_postgres::{Client, SimpleQueryMessage};

/// The checkpoint table: one row, the transform's progress.
pub const CHECKPOINT_TABLE: &str = "imago_checkpoint";
/// The guard's trigger function; each guarded table has a trigger of this name.
pub const GUARD_FUNCTION: &str = "imago_guard_refuse";
/// The guard's triggers' name (on each new table).
pub const GUARD_TRIGGER: &str = "imago_guard";
/// The session setting the transform's connection sets to `on`: the guard lets its writes
/// through.
pub const TRANSFORM_SETTING: &str = "imago.transform";
/// The SQLSTATE the guard raises (`read_only_sql_transaction`).
pub const GUARD_SQLSTATE: &str = "25006";
/// Most rows a read of a table (a checksum's, [`PgNew::rows`]) asks for at once.
pub const READ_CHUNK_ROWS: usize = 10_000;
/// How long dropping the guard waits for a lock before it fails (and is tried again).
pub const GUARD_LOCK_TIMEOUT_MS: u64 = 2_000;

/// A key-map entry: old table, old key, new table.
pub type KeyMapEntry = (String, i64, String);

/// The new universe's PostgreSQL database, written by the transform. See the module's
/// documentation.
pub struct PgNew {
    config: tokio_postgres::Config,
    /// The transform's session (made again when it breaks).
    client: Client,
    cache: Cache,
    /// The new tables (the plan's and the request log) as they are in the database.
    live: Live,
    /// What the old universe's rows and changes become.
    mapping: Mapping,
    /// The scratch copy (temporary tables shadowing the new ones) exists.
    staging: bool,
    /// Writers are held ([`PgNew::hold_writers`]): the session is in a transaction that holds
    /// `SHARE` locks on the new tables.
    held: bool,
    /// Changes applied (or staged) as sets so far by this value, and sets refused.
    sets: SetCounts,
}

impl std::fmt::Debug for PgNew {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgNew")
            .field("schema", &self.live.schema)
            .field("tables", &self.live.tables.keys().collect::<Vec<_>>())
            .field("staging", &self.staging)
            .field("held", &self.held)
            .finish()
    }
}

/// The transform's connection: the pinned settings of the old side's, and the guard's mark.
fn config(conn_str: &str) -> Result<tokio_postgres::Config, PgError> {
    let mut config: tokio_postgres::Config =
        conn_str.parse().map_err(|e: tokio_postgres::Error| PgError::ConnectionString(describe(&e)))?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(PgError::ConnectionString("sslmode=require: TLS is not supported yet".into()));
    }
    let ours = format!("{} -c {TRANSFORM_SETTING}=on", sql::PINNED_OPTIONS);
    let options = match config.get_options() {
        Some(theirs) => format!("{theirs} {ours}"),
        None => ours,
    };
    config.options(options);
    if config.get_application_name().is_none() {
        config.application_name("imago-transform");
    }
    Ok(config)
}

impl PgNew {
    /// Connects to the database of `conn_str` (libpq keyword/value or URL form; no TLS yet) for
    /// `mapping`: makes the new tables where they are missing and checks those that exist,
    /// checks that the database takes every SQL expression and statement of the plan (one it
    /// rejects is [`PgError::Expression`], naming its transform), and guards the tables: until
    /// [`PgNew::open_to_clients`], only the transform's sessions may write. Idempotent.
    pub async fn open(conn_str: &str, mapping: &Mapping) -> Result<PgNew, PgError> {
        Self::open_typed(conn_str, mapping, &program::LiveTypes::new()).await
    }

    /// [`PgNew::open`], a table Imago makes typing each column copied as it is (renamed or not)
    /// as the old database types it (`old_types`: [`crate::PgOld::live_types`]).
    pub async fn open_typed(
        conn_str: &str,
        mapping: &Mapping,
        old_types: &program::LiveTypes,
    ) -> Result<PgNew, PgError> {
        let config = config(conn_str)?;
        let client = sql::connect(&config).await?;
        let mut live = current_schema(&client).await?;
        client.batch_execute("BEGIN").await.map_err(sql_error("begin setting up"))?;
        let set_up = Self::set_up(&client, &mut live, mapping, old_types).await;
        let checked = match set_up {
            Ok(()) => program::check(&client, &live, mapping)
                .await
                .map_err(|(transform, message)| PgError::Expression { transform, message }),
            Err(e) => Err(e),
        };
        if let Err(e) = checked {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
        client.batch_execute("COMMIT").await.map_err(sql_error("commit setting up"))?;
        // After setting up: its unqualified `CREATE`s go to the first schema of the path.
        catalog_types_first(&client).await?;
        Ok(PgNew {
            config,
            client,
            cache: Cache::default(),
            live,
            mapping: mapping.clone(),
            staging: false,
            sets: SetCounts::default(),
            held: false,
        })
    }

    /// Makes and checks the tables, Imago's own and the guard (in the caller's transaction).
    async fn set_up(
        client: &Client,
        live: &mut Live,
        mapping: &Mapping,
        old_types: &program::LiveTypes,
    ) -> Result<(), PgError> {
        let checkpoint = live.imago(CHECKPOINT_TABLE);
        // Set up before (the checkpoint table is there): the guard is as it was left, so a
        // database opened to clients stays open after a restart.
        let was_set_up: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&checkpoint])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(sql_error("look for the checkpoint table"))?;
        let types = program::column_types(mapping, old_types);
        let schema = sql::with_request_log(&mapping.new_schema());
        for (name, table) in &schema.tables {
            let qualified = live.imago(name);
            if name == REQUEST_LOG_TABLE {
                sql::create_request_log(client).await?;
            } else {
                let columns: Vec<String> = table
                    .columns
                    .iter()
                    .map(|c| {
                        let kind = types.get(name).and_then(|t| t.get(c)).map_or("text", String::as_str);
                        if *c == table.key {
                            format!("{} bigint PRIMARY KEY", ident(c))
                        } else {
                            format!("{} {kind}", ident(c))
                        }
                    })
                    .collect();
                let ddl = format!("CREATE TABLE IF NOT EXISTS {qualified} ({})", columns.join(", "));
                client.batch_execute(&ddl).await.map_err(sql_error(format!("create table {name}")))?;
            }
            let info = sql::check_table(client, name, table).await?;
            let rows = client
                .query(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid FROM pg_attribute a \
                     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
                    &[&info.oid],
                )
                .await
                .map_err(sql_error(format!("read the columns of {name}")))?;
            let mut found: Vec<(String, String, u32)> = Vec::with_capacity(rows.len());
            for row in rows {
                let column = (row.try_get(0), row.try_get(1), row.try_get(2));
                match column {
                    (Ok(c), Ok(t), Ok(oid)) => found.push((c, t, oid)),
                    (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                        return Err(sql_error(format!("read the columns of {name}"))(e))
                    }
                }
            }
            // In the plan's order (check_table found each).
            let columns = table.columns.iter().filter_map(|c| found.iter().find(|(f, _, _)| f == c).cloned()).collect();
            // The key's own sequence (a `serial` or identity key the new application made): keys
            // Imago makes for the table come from it.
            let key_sequence: Option<String> = client
                .query_one("SELECT pg_get_serial_sequence($1, $2)", &[&qualified, &table.key])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(sql_error(format!("look for the sequence of {name}")))?;
            live.tables.insert(name.clone(), LiveTable { key: table.key.clone(), columns, key_sequence });
        }
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {checkpoint} (\
               id int PRIMARY KEY CHECK (id = 1), applied bigint NOT NULL, copy text NOT NULL, \
               snapshot_at bigint, after_table text, after_key bigint, copies bigint NOT NULL);\n\
             INSERT INTO {checkpoint} (id, applied, copy, copies) VALUES (1, 0, 'not_started', 0) ON CONFLICT DO NOTHING;\n\
             {}",
            program::key_map_ddl(live)
        );
        client.batch_execute(&ddl).await.map_err(sql_error("create Imago's tables"))?;
        if !was_set_up {
            client.batch_execute(&guard_ddl(live, &schema)).await.map_err(sql_error("create the guard"))?;
        }
        Ok(())
    }

    /// Connects again if the session broke (a server restarted, a connection killed): its
    /// prepared statements and the scratch copy died with it.
    async fn reconnect(&mut self) -> Result<(), StoreError> {
        if self.client.is_closed() {
            let client = sql::connect(&self.config).await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
            catalog_types_first(&client).await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
            self.client = client;
            self.cache = Cache::default();
            self.staging = false;
            // The held locks ended with the session.
            self.held = false;
        }
        Ok(())
    }

    /// The checkpoint stored with the data (what a restarted transform resumes from).
    pub async fn checkpoint(&mut self) -> Result<Checkpoint, StoreError> {
        self.reconnect().await?;
        self.stored_checkpoint(false).await.map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    async fn stored_checkpoint(&self, for_update: bool) -> Result<Checkpoint, PgError> {
        let row = self.client.query_opt(&self.checkpoint_select(for_update), &[]).await;
        checkpoint_of(row.map_err(sql_error(READ_CHECKPOINT))?)
    }

    fn checkpoint_select(&self, for_update: bool) -> String {
        format!(
            "SELECT applied, copy, snapshot_at, after_table, after_key, copies FROM {} WHERE id = 1{}",
            self.live.imago(CHECKPOINT_TABLE),
            if for_update { " FOR UPDATE" } else { "" }
        )
    }

    /// Applies `batch` as `NewStore::apply_batch` says: its reset (the tables and the key map
    /// emptied), its old-schema changes converted by the plan's mapping, and its checkpoint, in
    /// one transaction, only if the stored checkpoint is `batch.base` (else `Ok(Err(stale))`,
    /// nothing changed). A change the database or Imago refuses refuses the whole batch
    /// ([`StoreError::Rejected`]); an error that may pass (a connection lost, a serialization
    /// failure, a lock timeout) is [`StoreError::Unavailable`], the outcome unknown if it was
    /// the commit's.
    pub async fn apply_batch(&mut self, batch: &Batch) -> Result<Result<(), StaleBatch>, StoreError> {
        self.reconnect().await?;
        self.release_writers().await?;
        self.drop_staging().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let result = self.apply_in_transaction(batch).await;
        match result {
            Ok(Ok(())) => {
                self.client.batch_execute("COMMIT").await.map_err(|e| classify(&e))?;
                Ok(Ok(()))
            }
            other => {
                let _ = self.client.batch_execute("ROLLBACK").await;
                other
            }
        }
    }

    /// Begins the transaction, locks and reads the stored checkpoint and writes the batch's
    /// (undone by the caller's rollback if the stored one is not the batch's base), then applies
    /// the changes. The three statements go out together (tokio-postgres pipelines requests
    /// polled at once), prepared once per session: on a loopback connection of a busy machine a
    /// round trip costs about a millisecond, and the copy's chunks paid nine of them each.
    async fn apply_in_transaction(&mut self, batch: &Batch) -> Result<Result<(), StaleBatch>, StoreError> {
        let (select, update) = (self.checkpoint_select(true), self.checkpoint_update());
        let mut program =
            Program { client: &self.client, cache: &mut self.cache, live: &self.live, target: Target::Main };
        let select = program.statement(&select, None).await.map_err(|e| unavailable(&e))?;
        let update = program.statement(&update, None).await.map_err(|e| classify(&e))?;
        let c = &batch.checkpoint;
        let (copy, snapshot_at, after) = match &c.copy {
            CopyState::NotStarted => ("not_started", None, None),
            CopyState::Done => ("done", None, None),
            CopyState::Copying { snapshot_at, after } => ("copying", Some(snapshot_at.0 as i64), after.clone()),
        };
        let (after_table, after_key) = match after {
            Some((t, k)) => (Some(t), Some(k)),
            None => (None, None),
        };
        let (applied, copies) = (c.applied.0 as i64, c.copies as i64);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
            [&applied, &copy, &snapshot_at, &after_table, &after_key, &copies];
        let (begun, found, updated) = futures_util::join!(
            self.client.batch_execute("BEGIN"),
            self.client.query_opt(&select, &[]),
            self.client.execute(&update, &params),
        );
        begun.map_err(|e| unavailable(&e))?;
        let found = found.map_err(sql_error(READ_CHECKPOINT)).and_then(checkpoint_of);
        let found = found.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        updated.map_err(|e| classify(&e))?;
        if found != batch.base {
            return Ok(Err(StaleBatch { base: batch.base.clone(), found }));
        }
        if batch.reset {
            let mut ddl = String::new();
            for name in self.live.tables.keys() {
                ddl.push_str(&format!("DELETE FROM {};\n", self.live.qualified(name, Target::Main)));
            }
            ddl.push_str(&format!(
                "DELETE FROM {};\nDELETE FROM {};",
                self.live.imago(KEYS_TABLE),
                self.live.imago(KEY_NEXT_TABLE)
            ));
            self.client.batch_execute(&ddl).await.map_err(|e| classify(&e))?;
        }
        let mut program =
            Program { client: &self.client, cache: &mut self.cache, live: &self.live, target: Target::Main };
        // A chunk of the copy: its rows' keys are past every key copied before (the copy began
        // with a reset), so they are new.
        let insert = match batch.checkpoint.copy {
            CopyState::Copying { .. } => Insert::New,
            CopyState::NotStarted | CopyState::Done => Insert::Upsert,
        };
        let mut at = 0;
        while at < batch.ops.len() {
            let run = set_run(&self.mapping, &batch.ops[at..]);
            let ops = &batch.ops[at..at + run];
            if applied_as_set(&mut program, &self.mapping, ops, insert, &mut self.sets).await? {
                at += run;
                continue;
            }
            // Row by row: a table that needs the key map, a short run, or a set the database
            // refused (this names the change at fault).
            for op in &batch.ops[at..at + run.max(1)] {
                program.apply(&self.mapping, op).await.map_err(|e| refused(op, e))?;
            }
            at += run.max(1);
        }
        Ok(Ok(()))
    }

    fn checkpoint_update(&self) -> String {
        format!(
            "UPDATE {} SET applied = $1, copy = $2, snapshot_at = $3, after_table = $4, after_key = $5, copies = $6 \
             WHERE id = 1",
            self.live.imago(CHECKPOINT_TABLE)
        )
    }

    /// How many changes this value applied or staged as sets (the rest went row by row), and
    /// how many sets the database refused (each then went row by row).
    pub fn sets(&self) -> SetCounts {
        self.sets
    }

    /// Converts old rows into the scratch copy of the new tables (emptied first if `first`),
    /// looking generated keys up in the key map without making any: how many rows could not
    /// be converted (no key yet, a value or an expression that does not convert). Each row in a
    /// savepoint of its own, so one that cannot be converted leaves nothing behind.
    pub async fn stage(&mut self, rows: &[StoredRow], first: bool) -> Result<u64, StoreError> {
        self.stage_rows(rows, first).await
    }

    async fn stage_rows(&mut self, rows: &[StoredRow], first: bool) -> Result<u64, StoreError> {
        self.reconnect().await?;
        self.release_writers().await?;
        let down = |e: PgError| StoreError::Unavailable(e.to_string());
        if first {
            self.drop_staging().await.map_err(down)?;
        }
        if !self.staging {
            let mut ddl = String::new();
            for name in self.live.tables.keys() {
                ddl.push_str(&format!(
                    "CREATE TEMPORARY TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES);\n",
                    ident(name),
                    self.live.qualified(name, Target::Main)
                ));
            }
            self.cache.forget_staging();
            self.client.batch_execute(&ddl).await.map_err(|e| unavailable(&e))?;
            self.staging = true;
        }
        self.client.batch_execute("BEGIN").await.map_err(|e| unavailable(&e))?;
        let ops: Vec<RowOp> = rows
            .iter()
            .map(|(table, key, row)| RowOp::Upsert { table: table.clone(), key: *key, row: row.clone() })
            .collect();
        let mut rejected = 0;
        let mut at = 0;
        while at < ops.len() {
            let run = set_run(&self.mapping, &ops[at..]);
            let mut program =
                Program { client: &self.client, cache: &mut self.cache, live: &self.live, target: Target::Staging };
            // Staged rows are new to the scratch copy (emptied by the first stage, each row
            // staged once, as a comparison reads the old rows once, in key order).
            match applied_as_set(&mut program, &self.mapping, &ops[at..at + run], Insert::New, &mut self.sets).await {
                Ok(true) => {
                    at += run;
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = self.client.batch_execute("ROLLBACK").await;
                    return Err(e);
                }
            }
            let end = at + run.max(1);
            rejected += match self.stage_one_by_one(&ops[at..end]).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = self.client.batch_execute("ROLLBACK").await;
                    return Err(e);
                }
            };
            at = end;
        }
        self.client.batch_execute("COMMIT").await.map_err(|e| unavailable(&e))?;
        Ok(rejected)
    }

    /// Stages `ops` one by one, each in a savepoint of its own: how many the mapping or the
    /// database refused (they leave nothing behind). The transaction is the caller's.
    async fn stage_one_by_one(&mut self, ops: &[RowOp]) -> Result<u64, StoreError> {
        let mut rejected = 0;
        for op in ops {
            let step = async {
                self.client.batch_execute("SAVEPOINT imago_row").await?;
                let mut program =
                    Program { client: &self.client, cache: &mut self.cache, live: &self.live, target: Target::Staging };
                match program.apply(&self.mapping, op).await {
                    Ok(()) => {
                        self.client.batch_execute("RELEASE SAVEPOINT imago_row").await?;
                        Ok(None)
                    }
                    Err(e) => {
                        self.client
                            .batch_execute("ROLLBACK TO SAVEPOINT imago_row; RELEASE SAVEPOINT imago_row")
                            .await?;
                        Ok(Some(e))
                    }
                }
            };
            let outcome: Result<Option<ProgramError>, tokio_postgres::Error> = step.await;
            match outcome {
                Ok(None) => {}
                Ok(Some(e)) => match refused(op, e) {
                    StoreError::Rejected(_) => rejected += 1,
                    other => return Err(other),
                },
                Err(e) => return Err(unavailable(&e)),
            }
        }
        Ok(rejected)
    }

    /// The checksums of the scratch copy (transform(old), as staged; 0 when nothing was) and of
    /// the new tables. Asking again gives the same answer: the scratch copy stays until the
    /// next stage with `first` or the next batch.
    pub async fn compare_staged(&mut self) -> Result<(u64, u64), StoreError> {
        self.reconnect().await?;
        let down = |e: PgError| StoreError::Unavailable(e.to_string());
        let staged = if self.staging { self.sum(Target::Staging).await.map_err(down)? } else { 0 };
        Ok((staged, self.sum(Target::Main).await.map_err(down)?))
    }

    /// The checksums of the scratch copy and of the new tables' rows whose keys it holds (the
    /// comparison of a range of old rows while traffic runs).
    pub async fn compare_staged_keys(&mut self) -> Result<KeysCompared, StoreError> {
        self.reconnect().await?;
        if !self.staging {
            return Ok(KeysCompared::default());
        }
        let down = |e: PgError| StoreError::Unavailable(e.to_string());
        let staged = self.tally_of(Target::Staging, false).await.map_err(down)?;
        Ok(KeysCompared::of(&staged, &self.tally_of(Target::Main, true).await.map_err(down)?))
    }

    /// Order-independent checksum of every row of the new tables (`row_hash` summed), the same
    /// as the store in memory's for the same rows.
    pub async fn checksum(&mut self) -> Result<u64, StoreError> {
        self.reconnect().await?;
        self.sum(Target::Main).await.map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// The switch committed: clients may write now. The guard goes (and stays gone when the
    /// store is opened again). Idempotent. Held writers ([`PgNew::hold_writers`]) go on as the
    /// guard goes: it is dropped in the transaction that holds them, and they find it gone.
    pub async fn open_to_clients(&mut self) -> Result<(), StoreError> {
        self.open_to_clients_after(&Sequences::new()).await
    }

    /// [`PgNew::open_to_clients`], and while still guarded, in the same transaction, each new
    /// table's key sequence (serial or identity) set past its largest key (the copy wrote keys
    /// without the sequence) and past the old tables' sequences that feed it (`sequences`), so
    /// the new application never hands out a key the old one did. Once open, sequences are the
    /// application's: they are not touched again.
    pub async fn open_to_clients_after(&mut self, sequences: &Sequences) -> Result<(), StoreError> {
        self.reconnect().await?;
        let begin = format!(
            "{}SET LOCAL lock_timeout = {};",
            if self.held { "" } else { "BEGIN; " },
            literal(&format!("{GUARD_LOCK_TIMEOUT_MS}ms"))
        );
        // Committed or rolled back: the locks are let go either way.
        self.held = false;
        let opened = async {
            self.client.batch_execute(&begin).await?;
            let function = format!("{}.{}()", self.live.schema, ident(GUARD_FUNCTION));
            let guarded: bool =
                self.client.query_one("SELECT to_regprocedure($1) IS NOT NULL", &[&function]).await?.try_get(0)?;
            if guarded {
                let feeding = node_core::store::feeding(&self.mapping, sequences);
                for (name, table) in self.live.tables.iter().filter(|(name, _)| name.as_str() != REQUEST_LOG_TABLE) {
                    let qualified = self.live.qualified(name, Target::Main);
                    let sequence: Option<String> = self
                        .client
                        .query_one("SELECT pg_get_serial_sequence($1, $2)", &[&qualified, &table.key])
                        .await?
                        .try_get(0)?;
                    let Some(sequence) = sequence else { continue };
                    let old = feeding.get(name).copied().unwrap_or(1);
                    let set = format!(
                        "SELECT setval($1::text::regclass, greatest((SELECT last_value FROM {sequence}), \
                         (SELECT max({}) FROM {qualified}), $2::bigint))",
                        ident(&table.key)
                    );
                    self.client.execute(&set, &[&sequence, &old]).await?;
                }
            }
            let drop_guard = format!("DROP FUNCTION IF EXISTS {function} CASCADE; COMMIT;");
            self.client.batch_execute(&drop_guard).await
        };
        if let Err(e) = opened.await {
            let _ = self.client.batch_execute("ROLLBACK").await;
            return Err(unavailable(&e));
        }
        Ok(())
    }

    /// The drain is done and the switch may commit: other sessions' writes to the new tables
    /// wait (a `SHARE` lock on each, which every `INSERT`, `UPDATE`, `DELETE` conflicts with,
    /// held in an open transaction of the transform's session) instead of meeting the guard,
    /// until [`PgNew::open_to_clients`] lets them through or [`PgNew::release_writers`] lets the
    /// guard refuse them. Reads go on. The locks end with the session, so a crash releases them.
    /// Idempotent; a lock not granted within [`GUARD_LOCK_TIMEOUT_MS`] fails, and holds nothing.
    pub async fn hold_writers(&mut self) -> Result<(), StoreError> {
        self.reconnect().await?;
        if self.held {
            return Ok(());
        }
        self.drop_staging().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let tables: Vec<String> = self.live.tables.keys().map(|t| self.live.qualified(t, Target::Main)).collect();
        let ddl = format!(
            "BEGIN; SET LOCAL lock_timeout = {}; LOCK TABLE {} IN SHARE MODE;",
            literal(&format!("{GUARD_LOCK_TIMEOUT_MS}ms")),
            tables.join(", ")
        );
        if let Err(e) = self.client.batch_execute(&ddl).await {
            let _ = self.client.batch_execute("ROLLBACK").await;
            return Err(unavailable(&e));
        }
        self.held = true;
        Ok(())
    }

    /// The freeze aborted: held writers are let go (the guard refuses them). Idempotent.
    pub async fn release_writers(&mut self) -> Result<(), StoreError> {
        if !std::mem::take(&mut self.held) {
            return Ok(());
        }
        // A failed rollback leaves the session broken: it is made again, without the locks.
        if let Err(e) = self.client.batch_execute("ROLLBACK").await {
            return Err(unavailable(&e));
        }
        Ok(())
    }

    /// Whether clients may write (the switch committed): the guard is gone.
    pub async fn is_open_to_clients(&mut self) -> Result<bool, StoreError> {
        self.reconnect().await?;
        let function = format!("{}.{}()", self.live.schema, ident(GUARD_FUNCTION));
        let row = self
            .client
            .query_one("SELECT to_regprocedure($1) IS NULL", &[&function])
            .await
            .map_err(|e| unavailable(&e))?;
        row.try_get(0).map_err(|e| unavailable(&e))
    }

    /// The upgrade is over: Imago's objects go (the scratch copy, the guard, the checkpoint and
    /// the key map). The request log stays.
    pub async fn remove_imago(&mut self) -> Result<(), PgError> {
        self.release_writers().await.map_err(|e| PgError::Unavailable(e.to_string()))?;
        self.drop_staging().await?;
        remove_imago(&self.client, &self.live).await?;
        self.cache = Cache::default();
        Ok(())
    }

    /// The operator retires the new database of `conn_str` after its upgrade ended: Imago's
    /// objects go, as [`PgNew::remove_imago`], without setting anything up first (opening the
    /// store would make the guard again where the checkpoint is gone, and refuse a serving
    /// application's writes meanwhile). What of Imago's is left but the request log.
    pub async fn retire(conn_str: &str) -> Result<Vec<String>, PgError> {
        let client = sql::connect(&config(conn_str)?).await?;
        let live = current_schema(&client).await?;
        remove_imago(&client, &live).await?;
        imago_objects(&client).await
    }

    /// Names of Imago's objects left in the database but the request log (triggers, tables
    /// and functions named `imago_…`), for checks.
    pub async fn imago_objects(&self) -> Result<Vec<String>, PgError> {
        imago_objects(&self.client).await
    }

    /// Every row of new table `table` (key order), for checks.
    pub async fn rows(&self, table: &str) -> Result<Vec<(i64, Row)>, PgError> {
        self.read(table, Target::Main).await
    }

    /// The key map's entries: (old table, old key, new table) → generated key, for checks (the
    /// escape hatch's and merges' marks included).
    pub async fn key_map(&self) -> Result<Vec<(KeyMapEntry, i64)>, PgError> {
        let sql =
            format!("SELECT src_table, src_key, target, key FROM {} ORDER BY 1, 2, 3", self.live.imago(KEYS_TABLE));
        let rows = self.client.query(&sql, &[]).await.map_err(sql_error("read the key map"))?;
        rows.iter()
            .map(|r| Ok(((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?), r.try_get(3)?)))
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(sql_error("read the key map"))
    }

    /// Every row of `table` in `target`, in key order, in chunks of [`READ_CHUNK_ROWS`].
    async fn read(&self, table: &str, target: Target) -> Result<Vec<(i64, Row)>, PgError> {
        let mut rows = Vec::new();
        let mut after = None;
        loop {
            let chunk = self.read_chunk(table, target, after, false).await?;
            let last = chunk.len() < READ_CHUNK_ROWS;
            after = chunk.last().map(|(k, _)| *k);
            rows.extend(chunk);
            if last {
                return Ok(rows);
            }
        }
    }

    /// Up to [`READ_CHUNK_ROWS`] rows of `table` in `target` after key `after`, in key order,
    /// read in the server's text format (as the old side reads its rows).
    async fn read_chunk(
        &self,
        table: &str,
        target: Target,
        after: Option<i64>,
        staged_keys: bool,
    ) -> Result<Vec<(i64, Row)>, PgError> {
        let Some(live) = self.live.tables.get(table) else {
            return Err(PgError::Table { table: table.into(), message: "not a table of the new schema".into() });
        };
        let columns = live.columns.iter().map(|(c, _, _)| ident(c)).collect::<Vec<_>>().join(", ");
        let key = ident(&live.key);
        let mut conditions: Vec<String> = after.map(|k| format!("{key} > {k}")).into_iter().collect();
        if staged_keys {
            conditions.push(format!("{key} IN (SELECT {key} FROM {})", self.live.qualified(table, Target::Staging)));
        }
        let filter = if conditions.is_empty() { String::new() } else { format!("WHERE {} ", conditions.join(" AND ")) };
        let sql = format!(
            "SELECT {columns} FROM {} {filter}ORDER BY {key} LIMIT {READ_CHUNK_ROWS}",
            self.live.qualified(table, target)
        );
        let answer = self.client.simple_query(&sql).await.map_err(sql_error(format!("read rows of {table}")))?;
        let mut rows = Vec::new();
        for message in answer {
            let SimpleQueryMessage::Row(r) = message else { continue };
            let mut row = Row::new();
            let mut key = None;
            for (i, (name, _, oid)) in live.columns.iter().enumerate() {
                let text = r.try_get(i).map_err(sql_error(format!("read {table}.{name}")))?;
                let column = ColumnInfo { name: name.clone(), type_oid: *oid };
                let value = value_of(table, &column, text)?;
                if *name == live.key {
                    if let protocol::schema::Value::Int(k) = value {
                        key = Some(k);
                    }
                }
                row.insert(name.clone(), value);
            }
            let key =
                key.ok_or_else(|| PgError::Table { table: table.into(), message: "a row whose key is NULL".into() })?;
            rows.push((key, row));
        }
        Ok(rows)
    }

    /// The row hashes of every table of `target` summed, read in one snapshot, a chunk at a
    /// time.
    async fn sum(&self, target: Target) -> Result<u64, PgError> {
        self.sum_of(target, false).await
    }

    /// [`PgNew::sum`], of the rows whose keys the scratch copy holds only if `staged_keys`.
    async fn sum_of(&self, target: Target, staged_keys: bool) -> Result<u64, PgError> {
        let tally = self.tally_of(target, staged_keys).await?;
        Ok(tally.values().fold(0u64, |sum, (_, s)| sum.wrapping_add(*s)))
    }

    /// [`PgNew::sum_of`] by table: (rows, their hashes summed).
    async fn tally_of(&self, target: Target, staged_keys: bool) -> Result<BTreeMap<String, (u64, u64)>, PgError> {
        self.client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(sql_error("begin reading"))?;
        let mut tally = BTreeMap::new();
        for name in self.live.tables.keys() {
            let (mut rows, mut sum) = (0u64, 0u64);
            let mut after = None;
            loop {
                let chunk = match self.read_chunk(name, target, after, staged_keys).await {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        let _ = self.client.batch_execute("ROLLBACK").await;
                        return Err(e);
                    }
                };
                for (key, row) in &chunk {
                    sum = sum.wrapping_add(row_hash(name, *key, row));
                }
                rows += chunk.len() as u64;
                if chunk.len() < READ_CHUNK_ROWS {
                    break;
                }
                after = chunk.last().map(|(k, _)| *k);
            }
            tally.insert(name.clone(), (rows, sum));
        }
        self.client.batch_execute("COMMIT").await.map_err(sql_error("end reading"))?;
        Ok(tally)
    }

    /// Drops the scratch copy, if any (so that nothing but a comparison ever sees it).
    async fn drop_staging(&mut self) -> Result<(), PgError> {
        if self.staging {
            let mut ddl = String::new();
            for name in self.live.tables.keys() {
                ddl.push_str(&format!("DROP TABLE IF EXISTS {};\n", self.live.qualified(name, Target::Staging)));
            }
            self.client.batch_execute(&ddl).await.map_err(sql_error("drop the scratch copy"))?;
            self.cache.forget_staging();
            self.staging = false;
        }
        Ok(())
    }
}

const READ_CHECKPOINT: &str = "read the checkpoint";

/// The checkpoint a row of Imago's checkpoint table holds (none: nothing was applied yet).
fn checkpoint_of(row: Option<tokio_postgres::Row>) -> Result<Checkpoint, PgError> {
    let Some(row) = row else {
        return Ok(Checkpoint::default());
    };
    let get = |e: tokio_postgres::Error| sql_error(READ_CHECKPOINT)(e);
    let applied: i64 = row.try_get(0).map_err(get)?;
    let copy: String = row.try_get(1).map_err(get)?;
    let snapshot_at: Option<i64> = row.try_get(2).map_err(get)?;
    let after_table: Option<String> = row.try_get(3).map_err(get)?;
    let after_key: Option<i64> = row.try_get(4).map_err(get)?;
    let copies: i64 = row.try_get(5).map_err(get)?;
    let copy = match (copy.as_str(), snapshot_at) {
        ("not_started", _) => CopyState::NotStarted,
        ("done", _) => CopyState::Done,
        ("copying", Some(at)) => {
            CopyState::Copying { snapshot_at: Position(at as u64), after: after_table.zip(after_key) }
        }
        (other, _) => {
            return Err(PgError::Table {
                table: CHECKPOINT_TABLE.into(),
                message: format!("an unreadable checkpoint: copy state {other:?}"),
            })
        }
    };
    // Positions are stored as bigint, bit for bit.
    Ok(Checkpoint { applied: Position(applied as u64), copy, copies: copies as u64 })
}

/// Puts `pg_catalog` before `pg_temp` in the session's search path (the rest as it was; an
/// unqualified `CREATE` would then go to `pg_catalog`, so the session makes nothing after it).
/// PostgreSQL looks types up in `pg_temp` first unless told otherwise, and the scratch copy's
/// temporary tables have row types of their names: a new table named `text` (MediaWiki 1.5 has
/// one) made every `::text` cast of staging mean that row type, and every row was refused. After
/// this, relations are still found in `pg_temp` first among the searched schemas (the plan's
/// expressions read the scratch copy while staging), and types in the catalog.
async fn catalog_types_first(client: &Client) -> Result<(), PgError> {
    client
        .batch_execute(
            "SELECT set_config('search_path', 'pg_catalog, pg_temp, ' || current_setting('search_path'), false)",
        )
        .await
        .map_err(sql_error("set the search path"))
}

/// Names of Imago's objects in the database but the request log (triggers, tables and
/// functions named `imago_…`).
async fn imago_objects(client: &Client) -> Result<Vec<String>, PgError> {
    let rows = client
        .query(
            "SELECT 'trigger ' || tgname || ' on ' || tgrelid::regclass::text FROM pg_trigger WHERE tgname LIKE 'imago\\_%' \
             UNION ALL SELECT 'table ' || relname FROM pg_class WHERE relname LIKE 'imago\\_%' AND relkind = 'r' AND relname <> $1 \
             UNION ALL SELECT 'function ' || proname FROM pg_proc WHERE proname LIKE 'imago\\_%' \
             ORDER BY 1",
            &[&REQUEST_LOG_TABLE],
        )
        .await
        .map_err(sql_error("list Imago's objects"))?;
    rows.iter().map(|r| r.try_get(0).map_err(sql_error("list Imago's objects"))).collect()
}

/// The session's current schema, where the new tables and Imago's are (no table known yet).
async fn current_schema(client: &Client) -> Result<Live, PgError> {
    let schema_name: Option<String> = client
        .query_one("SELECT current_schema()::text", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(sql_error("read the current schema"))?;
    let Some(schema_name) = schema_name else {
        return Err(PgError::Refused(
            "no schema to make tables in (the search_path names none that exists): set search_path".into(),
        ));
    };
    Ok(Live { schema: ident(&schema_name), tables: BTreeMap::new() })
}

/// Drops the guard, the checkpoint and the key map in `live`'s schema, in one transaction.
async fn remove_imago(client: &Client, live: &Live) -> Result<(), PgError> {
    let ddl = format!(
        "BEGIN; SET LOCAL lock_timeout = {}; DROP FUNCTION IF EXISTS {}.{}() CASCADE; \
         DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {}; COMMIT;",
        literal(&format!("{GUARD_LOCK_TIMEOUT_MS}ms")),
        live.schema,
        ident(GUARD_FUNCTION),
        live.imago(CHECKPOINT_TABLE),
        live.imago(KEYS_TABLE),
        live.imago(KEY_NEXT_TABLE),
    );
    if let Err(e) = client.batch_execute(&ddl).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(sql_error("remove Imago's objects")(e));
    }
    Ok(())
}

/// The guard: a trigger function that raises unless the session set [`TRANSFORM_SETTING`], and
/// a statement-level trigger of it on every new table (`ENABLE ALWAYS`, so that
/// `session_replication_role` does not get around it).
fn guard_ddl(live: &Live, schema: &Schema) -> String {
    let function = format!("{}.{}", live.schema, ident(GUARD_FUNCTION));
    let mut ddl = format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $imago$\n\
         BEGIN\n\
           IF coalesce(current_setting({setting}, true), '') <> 'on' THEN\n\
             RAISE EXCEPTION USING ERRCODE = {code}, MESSAGE = format(\
               'imago: %s belongs to a universe that is not switched to yet: only Imago''s transform writes it until the switch', \
               TG_TABLE_NAME);\n\
           END IF;\n\
           RETURN NULL;\n\
         END\n\
         $imago$;\n",
        setting = literal(TRANSFORM_SETTING),
        code = literal(GUARD_SQLSTATE),
    );
    for name in schema.tables.keys() {
        let table = live.imago(name);
        let trigger = ident(GUARD_TRIGGER);
        ddl.push_str(&format!(
            "DROP TRIGGER IF EXISTS {trigger} ON {table};\n\
             CREATE TRIGGER {trigger} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} \
             FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n\
             ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger};\n"
        ));
    }
    ddl
}

/// Whether a database error may pass if the same is tried again: a connection lost or not
/// made, a serialization failure or deadlock, a lock or statement timeout, a server shutting
/// down or short of resources. Errors without a server's answer (the connection) may too.
fn may_pass(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else {
        return true;
    };
    let code = code.code();
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57")
        || code.starts_with("58")
        || matches!(code, "40001" | "40P01" | "55P03" | "55006")
}

fn unavailable(e: &tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(describe(e))
}

/// A database error: [`StoreError::Unavailable`] if it may pass, else [`StoreError::Rejected`].
fn classify(e: &tokio_postgres::Error) -> StoreError {
    if may_pass(e) {
        unavailable(e)
    } else {
        StoreError::Rejected(describe(e))
    }
}

/// Why a change of the batch could not be applied, naming it: a conversion Imago refuses, or
/// the database's error as [`classify`] sorts it.
fn refused(op: &RowOp, e: ProgramError) -> StoreError {
    let (table, key) = match op {
        RowOp::Upsert { table, key, .. } | RowOp::Delete { table, key } => (table, key),
    };
    match e {
        ProgramError::Convert(e) => StoreError::Rejected(format!("old row {table} {key}: {e}")),
        ProgramError::Pg(e) => match classify(&e) {
            StoreError::Rejected(message) => StoreError::Rejected(format!("old row {table} {key}: {message}")),
            other => other,
        },
    }
}

/// Changes applied or staged as sets, and sets refused (by the database, or a value Imago
/// cannot convert) and then applied row by row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetCounts {
    pub changes: u64,
    pub refused: u64,
}

/// Applies `ops` as sets in a savepoint of their own: `Ok(true)` when done; `Ok(false)` when
/// they make no set or the database refused it (rolled back to the savepoint: the caller goes
/// row by row, which names the change at fault); an error that may pass is
/// [`StoreError::Unavailable`].
async fn applied_as_set(
    program: &mut Program<'_>,
    mapping: &Mapping,
    ops: &[RowOp],
    insert: Insert,
    counts: &mut SetCounts,
) -> Result<bool, StoreError> {
    if ops.len() < SET_ROWS_MIN {
        return Ok(false);
    }
    program.client.batch_execute("SAVEPOINT imago_set").await.map_err(|e| classify(&e))?;
    let done = match program.apply_set(mapping, ops, insert).await {
        Ok(done) => done,
        Err(ProgramError::Pg(e)) if !may_pass(&e) => {
            counts.refused += 1;
            tracing::debug!("a set of {} changes refused, applied row by row: {}", ops.len(), describe(&e));
            false
        }
        Err(ProgramError::Pg(e)) => return Err(unavailable(&e)),
        Err(ProgramError::Convert(e)) => {
            counts.refused += 1;
            tracing::debug!("a set of {} changes refused, applied row by row: {e}", ops.len());
            false
        }
    };
    if done {
        counts.changes += ops.len() as u64;
    }
    let end = if done {
        "RELEASE SAVEPOINT imago_set"
    } else {
        "ROLLBACK TO SAVEPOINT imago_set; RELEASE SAVEPOINT imago_set"
    };
    program.client.batch_execute(end).await.map_err(|e| classify(&e))?;
    Ok(done)
}
