//! The old universe's PostgreSQL database, captured by logical decoding.
//!
//! [`PgOld`] performs the old side of the data-store interface (`node_core::store::OldStore`,
//! the same operations and contracts, as `async fn`s) on a live database that keeps serving:
//!
//! - *Capture* is a logical replication slot (pgoutput) and a publication of exactly the plan's
//!   tables and the request log. Positions are LSNs: every change of a source transaction is at
//!   its commit's end LSN, and a read returns whole transactions ([`PgChange`]).
//! - *Snapshots* are exported by the slot's creation and imported into a `REPEATABLE READ READ
//!   ONLY` transaction on a connection of their own: the copy reads exactly what was committed
//!   before the slot's consistent point, and the stream exactly what was committed after.
//! - *The fence* is a statement-level trigger on every captured table that raises, and the final
//!   position is a logical message's transaction committed after the triggers.
//!
//! An adapter only: it decides nothing, and a failure goes back to the caller as
//! [`StoreError::Unavailable`] (tried again later).
//!
//! Where it differs from `OldStore` (for whoever drives it):
//! - Positions are LSNs: they grow but are not contiguous, so "the first new change is
//!   `applied + 1`" does not hold. What holds instead: a read after `after` returns every
//!   transaction committed after `after`, in commit order, whole; a batch that ends with a
//!   read's last change ends at a transaction boundary, a checkpoint that is safe to resume from.
//! - Changes are [`PgChange`]s: a `RowOp`, or what a `RowOp` cannot say: an update lacking the
//!   TOASTed columns it left unchanged ([`crate::PgOp::PartialUpdate`]), a `TRUNCATE`
//!   ([`crate::PgOp::Truncate`]), the fence's marker ([`crate::PgOp::Fence`], nothing to apply).
//! - The reads that move the stream or may make a broken connection again take `&mut self`.
//! - An open snapshot's transaction holds `ACCESS SHARE` locks on the tables it has read until
//!   it ends: the application's `TRUNCATE` or `ALTER TABLE`, and [`PgOld::unfence`]'s `DROP
//!   TRIGGER`, wait for the copy to end ([`PgOld::disconnect`] ends it, and so does the first
//!   read of the stream, which comes once the copy is done).
//! - Sequences and DDL are not carried; a table whose definition changes stops the stream with
//!   an error that names it ([`crate::ChangeError::Changed`]).

use crate::changes::{PgChange, PgOp, TableInfo, FENCE_MESSAGE_PREFIX};
use crate::pgoutput::Lsn;
use crate::sql::{self, ident, literal, sql_error};
use crate::stream::Stream;
use crate::PgError;
use node_core::store::{ChangeRead, Chunk, RowCursor, Sequences, SnapshotId, StoreError};
use pgwire_replication::{ReplicationClient, ReplicationConfig};
use protocol::schema::{RowOp, Schema};
use protocol::{Position, UpgradeId};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::{Client, IsolationLevel};

/// The fence's trigger on every captured table.
pub const FENCE_TRIGGER: &str = "imago_fence";
/// The function the fence's triggers run (it raises).
pub const FENCE_FUNCTION: &str = "imago_fence_refuse";
/// The fence's durable state: one row, the final position once it is known.
pub const FENCE_TABLE: &str = "imago_fence";

/// How long the fence waits for one table's in-flight writers before it gives up an attempt.
pub const LOCK_TIMEOUT: &str = "2s";
/// Attempts of the fence (and of the unfence) before the caller is told to try later.
pub const FENCE_ATTEMPTS: u32 = 3;
/// How long the fence reads the stream for its marker.
pub const FENCE_MARKER_WAIT: Duration = Duration::from_secs(30);
/// How long creating or dropping the slot may wait: a creation waits for every write
/// transaction in flight to end, a drop for the slot's walsender to let it go.
pub const SLOT_WAIT: Duration = Duration::from_secs(30);

/// The change buffer's bound in bytes of pgoutput messages (about what the decoded changes
/// take in memory). A transaction larger than that is still held whole, since it is applied
/// whole; the replication client holds up to [`REPLICATION_EVENTS`] events more.
pub const BUFFER_BYTES: usize = 64 << 20;
/// The replication client's channel, in events.
pub const REPLICATION_EVENTS: usize = 1024;
/// How often the replication connection reports the acknowledged position.
pub const STATUS_INTERVAL: Duration = Duration::from_millis(250);

/// The names of an upgrade's objects in the old database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub slot: String,
    pub publication: String,
}

impl Names {
    /// `imago_upgrade_<id>` for both (slots and publications have names of their own kinds).
    pub fn for_upgrade(upgrade: UpgradeId) -> Names {
        let name = format!("imago_upgrade_{}", upgrade.0);
        Names { slot: name.clone(), publication: name }
    }

    /// Slot names are lower-case letters, digits and underscores (PostgreSQL's rule), and
    /// pgwire-replication writes both names into `START_REPLICATION` unquoted: the publication
    /// follows the same rule.
    fn check(&self) -> Result<(), PgError> {
        for (what, name) in [("slot", &self.slot), ("publication", &self.publication)] {
            let fine = !name.is_empty()
                && name.len() <= 63
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !fine {
                return Err(PgError::Refused(format!(
                    "{what} name {name:?}: use 1 to 63 lower-case letters, digits and underscores"
                )));
            }
        }
        Ok(())
    }
}

/// The copy's next chunk, read ahead ([`PgOld::snapshot_chunk`]). Dropped, it stops.
struct ReadAhead {
    snapshot: SnapshotId,
    after: RowCursor,
    limit: usize,
    read: tokio::task::JoinHandle<Result<Chunk, PgError>>,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.read.abort();
    }
}

/// The old universe's PostgreSQL database, captured. See the module's documentation.
pub struct PgOld {
    config: tokio_postgres::Config,
    replication: ReplicationConfig,
    names: Names,
    /// The plan's tables and the request log, by name (the order rows are read in).
    tables: BTreeMap<String, TableInfo>,
    /// The connection for everything but snapshots and the stream (made again if it breaks).
    sql: Client,
    /// Open snapshots: a `REPEATABLE READ` transaction each, on a connection of its own.
    snapshots: BTreeMap<SnapshotId, Arc<Client>>,
    /// The copy's next chunk, being read while the caller applies the last one.
    read_ahead: Option<ReadAhead>,
    next_snapshot: u64,
    /// The slot streamed, once read (started on first need, again after a failure).
    stream: Option<Stream>,
    /// The highest position the caller said is applied: acknowledged to the slot once the
    /// stream has delivered it.
    prune_wanted: Position,
    buffer_bytes: usize,
    warnings: Vec<String>,
}

impl std::fmt::Debug for PgOld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOld")
            .field("names", &self.names)
            .field("tables", &self.tables.keys().collect::<Vec<_>>())
            .field("snapshots", &self.snapshots.len())
            .field("stream", &self.stream)
            .finish()
    }
}

impl PgOld {
    /// Connects to the database of `conn_str` (libpq keyword/value or URL form; no TLS yet),
    /// checks it can be captured as the plan's old `schema` says, and creates the request log
    /// and the publication where missing. Idempotent: a restarted node opens it again and
    /// resumes. Each refusal says what to change.
    pub async fn open(conn_str: &str, schema: &Schema, names: Names) -> Result<PgOld, PgError> {
        names.check()?;
        let config = sql_config(conn_str)?;
        let replication = replication_config(&config, &names)?;
        let sql = sql::connect(&config).await?;
        let warnings = sql::check_server(&sql).await?;
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        let mut tables = BTreeMap::new();
        for (name, table) in &schema.tables {
            tables.insert(name.clone(), sql::check_table(&sql, name, table).await?);
        }
        sql::create_request_log(&sql).await?;
        for (name, table) in sql::with_request_log(&Schema::default()).tables {
            tables.insert(name.clone(), sql::check_table(&sql, &name, &table).await?);
        }
        check_slot(&sql, &names.slot).await?;
        sql::ensure_publication(&sql, &names.publication, &tables.values().collect::<Vec<_>>()).await?;
        Ok(PgOld::connected(config, replication, names, tables, sql, warnings))
    }

    /// A store on a connection made, no snapshot or stream yet.
    fn connected(
        config: tokio_postgres::Config,
        replication: ReplicationConfig,
        names: Names,
        tables: BTreeMap<String, TableInfo>,
        sql: Client,
        warnings: Vec<String>,
    ) -> PgOld {
        PgOld {
            config,
            replication,
            names,
            tables,
            sql,
            snapshots: BTreeMap::new(),
            read_ahead: None,
            next_snapshot: 0,
            stream: None,
            prune_wanted: Position(0),
            buffer_bytes: BUFFER_BYTES,
            warnings,
        }
    }

    /// What [`open`](Self::open) found risky but not wrong.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The SQL types of the plan's old tables' columns (built-in types only), for the new
    /// tables Imago makes ([`crate::PgNew::open_typed`]).
    pub async fn live_types(&mut self) -> Result<crate::LiveTypes, PgError> {
        let oids: Vec<(String, u32)> = self.tables.values().map(|t| (t.name.clone(), t.oid)).collect();
        let mut types = crate::LiveTypes::new();
        for (table, oid) in oids {
            let what = format!("read the column types of {table}");
            // Types below 16384 are the system's own (FirstNormalObjectId): the new database has them.
            let rows = self
                .sql()
                .await?
                .query(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypid < 16384",
                    &[&oid],
                )
                .await
                .map_err(sql_error(what.clone()))?;
            let columns = types.entry(table).or_default();
            for row in rows {
                let (column, kind): (String, String) = (
                    row.try_get(0).map_err(sql_error(what.clone()))?,
                    row.try_get(1).map_err(sql_error(what.clone()))?,
                );
                columns.insert(column, kind);
            }
        }
        Ok(types)
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Bounds the change buffer at `bytes` instead of [`BUFFER_BYTES`] (from the next stream).
    pub fn set_buffer_bytes(&mut self, bytes: usize) {
        self.buffer_bytes = bytes;
    }

    /// The end of the last complete transaction the stream delivered (0 before the stream).
    pub fn captured(&self) -> Position {
        self.stream.as_ref().map_or(Position(0), |s| s.buffer.captured())
    }

    /// The slot's confirmed position (what the server keeps WAL after), if the slot exists.
    pub async fn confirmed(&mut self) -> Result<Option<Position>, PgError> {
        let slot = self.names.slot.clone();
        Ok(slot_state(self.sql().await?, &slot).await?.map(|s| s.confirmed))
    }

    /// Opens a consistent snapshot and returns the position it was taken at: the slot's
    /// consistent point. The slot is made with the snapshot, so an existing slot is dropped
    /// and made again: an open snapshot means the copy starts (again) from the beginning, and
    /// a snapshot cannot outlive the process that exported it (a copy restarted after a crash).
    /// That is safe because a copy that restarts empties the new store and applies the stream
    /// only after the fresh snapshot's position (docs/design.md, "Copy, stream, and recovery"):
    /// nothing the old slot still held is needed.
    pub async fn open_snapshot(&mut self) -> Result<(SnapshotId, Position), StoreError> {
        Ok(self.snapshot().await?)
    }

    async fn snapshot(&mut self) -> Result<(SnapshotId, Position), PgError> {
        self.close_stream().await;
        let mut walsender =
            ReplicationClient::connect_gated(self.replication.clone()).await.map_err(|e| replication("connect", e))?;
        let slot = self.names.slot.clone();
        if slot_state(self.sql().await?, &slot).await?.is_some() {
            gated(&mut walsender, &format!("DROP_REPLICATION_SLOT {slot} WAIT"), "drop the slot").await?;
        }
        // The publication goes with the capture when an upgrade from this database is rolled
        // back; the next copy makes it again (idempotent).
        let tables: Vec<_> = self.tables.values().cloned().collect();
        let publication = self.names.publication.clone();
        sql::ensure_publication(self.sql().await?, &publication, &tables.iter().collect::<Vec<_>>()).await?;
        let created = gated(
            &mut walsender,
            &format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'export')"),
            "create the slot (it waits for every write transaction in flight to end)",
        )
        .await?;
        let (consistent, exported) = slot_answer(&created)?;
        // The snapshot lives until the walsender's next command: import it first.
        let reader = sql::connect(&self.config).await?;
        let import =
            format!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}", literal(&exported));
        reader.batch_execute(&import).await.map_err(sql_error("import the exported snapshot"))?;
        walsender.start().await.map_err(|e| replication("START_REPLICATION", e))?;
        match tokio::time::timeout(SLOT_WAIT, walsender.wait_started()).await {
            Ok(started) => started.map_err(|e| replication("START_REPLICATION", e))?,
            Err(_) => return Err(PgError::Unavailable(format!("START_REPLICATION: no answer within {SLOT_WAIT:?}"))),
        }
        let tables = self.tables.values().cloned().collect();
        self.stream = Some(Stream::started(walsender, tables, consistent, self.buffer_bytes));
        self.next_snapshot += 1;
        let id = SnapshotId(self.next_snapshot);
        self.read_ahead = None;
        self.snapshots.insert(id, Arc::new(reader));
        Ok((id, consistent))
    }

    /// How many rows `snapshot` holds (counted in it: the copy's progress and ETA).
    pub async fn snapshot_rows(&self, snapshot: SnapshotId) -> Result<u64, StoreError> {
        let reader =
            self.snapshots.get(&snapshot).filter(|c| !c.is_closed()).ok_or(StoreError::SnapshotGone(snapshot))?;
        let counts: Vec<String> = self.tables.keys().map(|t| format!("(SELECT count(*) FROM {})", ident(t))).collect();
        let sql = format!("SELECT ({})::bigint", counts.join(" + "));
        let row = reader.query_one(&sql, &[]).await.map_err(sql_error("count the snapshot's rows"))?;
        let rows: i64 = row.try_get(0).map_err(sql_error("count the snapshot's rows"))?;
        Ok(rows.max(0) as u64)
    }

    /// Up to `limit` rows of `snapshot` after `after`, in (table, key) order. The last chunk
    /// ends the snapshot (its transaction, and the locks and the oldest snapshot it holds): a
    /// copy reads it once.
    ///
    /// Every other chunk starts reading the next one (after its last row, as many rows) on the
    /// store's runtime before it returns: the copy's reads then overlap the applies of the
    /// chunks before (the benchmark's copy spent a third of its time reading). A call that asks
    /// for exactly that chunk takes it; any other call drops it.
    pub async fn snapshot_chunk(
        &mut self,
        snapshot: SnapshotId,
        after: &RowCursor,
        limit: usize,
    ) -> Result<Chunk, StoreError> {
        let gone = StoreError::SnapshotGone(snapshot);
        let ahead = self.read_ahead.take();
        let read = match ahead {
            Some(mut ahead) if ahead.snapshot == snapshot && ahead.after == *after && ahead.limit == limit => {
                match (&mut ahead.read).await {
                    Ok(read) => read,
                    Err(e) => Err(PgError::Unavailable(format!("the read ahead of the copy ended: {e}"))),
                }
            }
            other => {
                drop(other);
                let reader = self.snapshots.get(&snapshot).filter(|c| !c.is_closed()).ok_or(gone.clone())?;
                sql::read_rows(&**reader, &self.tables, after, limit, self.captured()).await
            }
        };
        match read {
            Ok(chunk) => {
                if chunk.last {
                    self.end_snapshots();
                } else if let Some(reader) = self.snapshots.get(&snapshot) {
                    let next: RowCursor = chunk.rows.last().map(|(t, k, _)| (t.clone(), *k)).or(after.clone());
                    let (reader, tables, position) = (reader.clone(), self.tables.clone(), self.captured());
                    let from = next.clone();
                    let read =
                        tokio::spawn(async move { sql::read_rows(&*reader, &tables, &from, limit, position).await });
                    self.read_ahead = Some(ReadAhead { snapshot, after: next, limit, read });
                }
                Ok(chunk)
            }
            // The connection is lost, or the transaction aborted: the snapshot cannot be read.
            Err(PgError::Sql { what, message }) => {
                tracing::debug!("snapshot {snapshot:?} is gone: {what}: {message}");
                Err(gone)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Up to `limit` rows of the current contents after `after` (used while fenced).
    pub async fn rows_chunk(&mut self, after: &RowCursor, limit: usize) -> Result<Chunk, StoreError> {
        let position = self.captured();
        let tables = self.tables.clone();
        let client = self.sql().await?;
        let read = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(sql_error("begin a read"))?;
        let chunk = sql::read_rows(&read, &tables, after, limit, position).await?;
        read.commit().await.map_err(sql_error("end a read"))?;
        Ok(chunk)
    }

    /// Current rows while writes go on, for the comparison by range: [`PgOld::rows_chunk`]'s
    /// chunk, whose position is the end of the last transaction the stream delivered before the
    /// read (the read's snapshot, taken after, shows it), and a second position, that of a
    /// logical message emitted in a transaction of its own once the read is over: every
    /// transaction the snapshot showed committed before it, and the stream will bring it
    /// (with nothing to apply), so the transform's checkpoint passes it.
    pub async fn rows_to_compare(&mut self, after: &RowCursor, limit: usize) -> Result<(Chunk, Position), StoreError> {
        let chunk = self.rows_chunk(after, limit).await?;
        let row = self
            .sql()
            .await?
            .query_one("SELECT pg_logical_emit_message(true, $1, '')::text", &[&crate::changes::COMPARE_MESSAGE_PREFIX])
            .await
            .map_err(sql_error("emit the comparison's marker"))?;
        let lsn: String = row.try_get(0).map_err(sql_error("emit the comparison's marker"))?;
        let through = parse_lsn(&lsn)?;
        Ok((chunk, through))
    }

    /// Whole transactions after `after` until `limit` changes are reached (one larger than
    /// `limit` comes whole), and the last position known to be captured. Transactions at or
    /// before `after` are not returned (the slot sends again what it was not told was applied).
    pub async fn changes_after(
        &mut self,
        after: Position,
        limit: usize,
    ) -> Result<(Vec<PgChange>, Position), StoreError> {
        // The stream is read once the copy is done: a snapshot still open would only hold its
        // transaction, its `ACCESS SHARE` locks (the application's `TRUNCATE` and `ALTER TABLE`
        // would wait for them) and the database's oldest snapshot (vacuum could not clean up).
        self.end_snapshots();
        let read = self.read_changes(after, limit).await;
        if read.is_err() {
            // Started afresh from the slot on the next call.
            self.close_stream().await;
        }
        Ok(read?)
    }

    /// The changes after `after` as the data-store interface carries them (`OldStore`'s
    /// `changes_after` with `Positions::Ordered`): row changes at their transaction's position,
    /// and the position the read is complete up to (every change up to there is returned; the
    /// last one returned when `limit` may have cut the read short), so that a reader's
    /// checkpoint moves past transactions with nothing to apply, the fence's marker among them.
    ///
    /// - The fence's marker carries nothing.
    /// - An update that left TOASTed values unchanged ([`crate::PgOp::PartialUpdate`]) takes
    ///   them from the row as it is now: a later change of such a value comes later in the
    ///   stream, whole, so the values may be newer than the update's, never lost, and the row is
    ///   exact again once the stream reaches the present (at the latest, the final position). A
    ///   row gone by now is deleted (its deletion, or its move, follows in the stream).
    /// - A `TRUNCATE` cannot be said row by row: the read is [`StoreError::CopyAgain`], naming
    ///   it, and the copy starts again from a fresh snapshot (a new slot), which holds its
    ///   effect.
    pub async fn row_changes(&mut self, after: Position, limit: usize) -> Result<ChangeRead, StoreError> {
        let (changes, captured) = self.changes_after(after, limit).await?;
        let complete = match changes.last() {
            Some(last) if changes.len() >= limit => last.position,
            _ => captured,
        };
        let mut ops = Vec::with_capacity(changes.len());
        for PgChange { position, op } in changes {
            match op {
                PgOp::Row(op) => ops.push((position, op)),
                PgOp::Fence => {}
                PgOp::PartialUpdate { table, key, mut row, unchanged, moved_from } => {
                    if let Some(from) = moved_from {
                        ops.push((position, RowOp::Delete { table: table.clone(), key: from }));
                    }
                    let info = self.tables.get(&table).cloned().ok_or_else(|| {
                        StoreError::Unavailable(format!("a change of table {table}, which is not captured"))
                    })?;
                    match sql::read_row(self.sql().await?, &info, key).await? {
                        Some(now) => {
                            for column in unchanged {
                                if let Some(value) = now.get(&column) {
                                    row.insert(column, value.clone());
                                }
                            }
                            ops.push((position, RowOp::Upsert { table, key, row }));
                        }
                        None => ops.push((position, RowOp::Delete { table, key })),
                    }
                }
                PgOp::Truncate { table } => {
                    return Err(StoreError::CopyAgain(format!(
                        "TRUNCATE of table {table} at LSN {}: pgoutput names the table, not its rows",
                        Lsn(position.0)
                    )))
                }
            }
        }
        Ok(ChangeRead { changes: ops, complete_to: complete, captured: captured.max(complete) })
    }

    async fn read_changes(&mut self, after: Position, limit: usize) -> Result<(Vec<PgChange>, Position), PgError> {
        let stream = self.stream().await?;
        // The buffer gave up transactions the caller asks for again (it read them and did not
        // apply them), or dropped some it could not hold: read the slot again from its
        // confirmed position.
        if after < stream.buffer.floor() || (stream.buffer.overflowed() && !stream.buffer.holds_after(after)) {
            self.close_stream().await;
        }
        let prune_wanted = self.prune_wanted;
        let stream = self.stream().await?;
        if after < stream.buffer.floor() {
            return Err(PgError::Pruned { after, confirmed: stream.buffer.floor() });
        }
        stream.buffer.give_up_to(after);
        if !stream.buffer.overflowed() {
            stream.fill(after).await?;
        }
        let changes = stream.buffer.read(after, limit);
        let captured = stream.buffer.captured();
        stream.acknowledge(prune_wanted.min(captured));
        Ok((changes, captured))
    }

    /// Refuses every further write to the captured tables, from every role, after the writes
    /// in flight; returns the final position `P`: every write made before the fence is at or
    /// before `P`, and the transaction at `P` is the fence's marker ([`crate::PgOp::Fence`]).
    /// Fencing a fenced store returns the same `P`, also after a restart.
    ///
    /// The fence is a statement-level `BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE` trigger
    /// that raises, `ENABLE ALWAYS` (so `session_replication_role = replica` does not skip it),
    /// created under `lock_timeout`: creating it waits for the writers in flight on the table
    /// and holds off new ones until it commits. Neither `default_transaction_read_only` (a
    /// session sets `transaction_read_only = off`) nor `REVOKE` (the table's owner and superusers
    /// keep their rights) would refuse every writer. Then a logical message is emitted in a
    /// transaction of its own; its commit's end LSN, read from the stream, is `P`, kept in
    /// [`FENCE_TABLE`] (made with the triggers).
    pub async fn fence(&mut self) -> Result<Position, StoreError> {
        Ok(self.do_fence().await?)
    }

    async fn do_fence(&mut self) -> Result<Position, PgError> {
        if let Some(final_position) = self.intact_fence().await? {
            return Ok(final_position);
        }
        // The final position is read from the stream: no fence without one (no slot, no stream).
        self.stream().await?;
        self.retried("install the fence", &fence_ddl(&self.tables)).await?;
        let row = self
            .sql()
            .await?
            .query_one(
                "SELECT pg_current_xact_id()::text, pg_logical_emit_message(true, $1, pg_current_xact_id()::text)::text",
                &[&FENCE_MESSAGE_PREFIX],
            )
            .await
            .map_err(sql_error("emit the fence's marker"))?;
        let token: String = row.try_get(0).map_err(sql_error("emit the fence's marker"))?;
        let found = self.stream().await?.read_to_marker(&token, FENCE_MARKER_WAIT).await;
        let final_position = match found {
            Ok(position) => position,
            Err(e) => {
                self.close_stream().await;
                return Err(e);
            }
        };
        let recorded = format!("UPDATE {} SET final_lsn = $1::text::pg_lsn WHERE id = 1", ident(FENCE_TABLE));
        self.sql()
            .await?
            .execute(&recorded, &[&Lsn(final_position.0).to_string()])
            .await
            .map_err(sql_error("record the final position"))?;
        Ok(final_position)
    }

    /// The recorded final position, if every captured table's fence trigger is in place.
    async fn intact_fence(&mut self) -> Result<Option<Position>, PgError> {
        if self.fence_triggers().await? < self.tables.len() as i64 {
            return Ok(None);
        }
        let sql = format!("SELECT final_lsn::text FROM {} WHERE id = 1", ident(FENCE_TABLE));
        let client = self.sql().await?;
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&ident(FENCE_TABLE)])
            .await
            .map_err(sql_error("look for the fence"))?
            .try_get(0)
            .map_err(sql_error("look for the fence"))?;
        if !exists {
            return Ok(None);
        }
        let row = client.query_opt(&sql, &[]).await.map_err(sql_error("read the final position"))?;
        let text: Option<String> = match row {
            Some(row) => row.try_get(0).map_err(sql_error("read the final position"))?,
            None => None,
        };
        text.map(|t| parse_lsn(&t)).transpose()
    }

    /// How many captured tables carry the fence trigger.
    async fn fence_triggers(&mut self) -> Result<i64, PgError> {
        let oids: Vec<u32> = self.tables.values().map(|t| t.oid).collect();
        let row = self
            .sql()
            .await?
            .query_one(
                "SELECT count(*) FROM pg_trigger WHERE tgname = $1 AND tgrelid = ANY($2) AND tgenabled = 'A'",
                &[&FENCE_TRIGGER, &oids],
            )
            .await
            .map_err(sql_error("look for the fence"))?;
        row.try_get(0).map_err(sql_error("look for the fence"))
    }

    /// Accepts writes again (after an aborted switch): the triggers, their function and the
    /// recorded final position go. `DROP TRIGGER` takes an `ACCESS EXCLUSIVE` lock: it waits
    /// (under [`LOCK_TIMEOUT`], retried) for every transaction that read a captured table,
    /// an open snapshot's too.
    pub async fn unfence(&mut self) -> Result<(), StoreError> {
        let ddl = self.unfence_ddl().await?;
        Ok(self.retried("remove the fence", &ddl).await?)
    }

    /// Whether any captured table is fenced.
    pub async fn is_fenced(&mut self) -> Result<bool, StoreError> {
        Ok(self.fence_triggers().await? > 0)
    }

    /// Acknowledges the slot up to `up_to` (the caller has applied every change up to there,
    /// durably): the server may recycle the WAL before it. Positions the stream has not
    /// delivered yet are acknowledged once it has.
    pub async fn prune(&mut self, up_to: Position) -> Result<(), StoreError> {
        self.prune_wanted = self.prune_wanted.max(up_to);
        let wanted = self.prune_wanted;
        let stream = self.stream().await?;
        let up_to = wanted.min(stream.buffer.captured());
        stream.buffer.give_up_to(up_to);
        stream.acknowledge(up_to);
        Ok(())
    }

    /// The last value each captured table's key sequence (serial or identity) gave, by table.
    pub async fn sequences(&mut self) -> Result<Sequences, StoreError> {
        let mut found = Sequences::new();
        let tables: Vec<(String, String)> = self
            .tables
            .iter()
            .filter(|(name, _)| name.as_str() != protocol::schema::REQUEST_LOG_TABLE)
            .map(|(name, table)| (name.clone(), table.key.clone()))
            .collect();
        let client = self.sql().await?;
        for (name, key) in tables {
            let what = || format!("read the key sequence of {name}");
            let row = client
                .query_one("SELECT pg_get_serial_sequence($1, $2)", &[&ident(&name), &key])
                .await
                .map_err(sql_error(what()))?;
            let sequence: Option<String> = row.try_get(0).map_err(sql_error(what()))?;
            let Some(sequence) = sequence else { continue };
            let row = client
                .query_one(&format!("SELECT last_value FROM {sequence}"), &[])
                .await
                .map_err(sql_error(what()))?;
            let value: i64 = row.try_get(0).map_err(sql_error(what()))?;
            found.insert(name, value);
        }
        Ok(found)
    }

    /// The process that held snapshots ended: every snapshot it opened is gone.
    pub fn disconnect(&mut self) {
        self.end_snapshots();
    }

    /// Ends every snapshot (their connections close) and the read ahead.
    fn end_snapshots(&mut self) {
        self.read_ahead = None;
        self.snapshots.clear();
    }

    /// Removes the capture: the slot (the stream first) and the publication. The fence, if
    /// any, stays: see [`retire`](Self::retire).
    pub async fn remove_capture(&mut self) -> Result<(), PgError> {
        self.end_snapshots();
        self.close_stream().await;
        let slot = self.names.slot.clone();
        if slot_state(self.sql().await?, &slot).await?.is_some() {
            let mut walsender = ReplicationClient::connect_gated(self.replication.clone())
                .await
                .map_err(|e| replication("connect", e))?;
            gated(&mut walsender, &format!("DROP_REPLICATION_SLOT {slot} WAIT"), "drop the slot").await?;
        }
        let drop = format!("DROP PUBLICATION IF EXISTS {}", ident(&self.names.publication));
        self.sql().await?.batch_execute(&drop).await.map_err(sql_error("drop the publication"))
    }

    /// The operator retires the old database of `conn_str` once its upgrade ended, as
    /// [`PgOld::retire`], without opening the store (which would check the server and make the
    /// publication first): the slot, the publication and the fence go. What of Imago's is left
    /// but the request log.
    pub async fn retire_at(conn_str: &str, names: Names) -> Result<Vec<String>, PgError> {
        names.check()?;
        let config = sql_config(conn_str)?;
        let replication = replication_config(&config, &names)?;
        let sql = sql::connect(&config).await?;
        let mut old = PgOld::connected(config, replication, names, BTreeMap::new(), sql, Vec::new());
        old.retire().await?;
        old.imago_objects().await
    }

    /// The operator retires the old database after a switch: every object of Imago's goes, the
    /// fence too (the request log stays: it is data).
    pub async fn retire(&mut self) -> Result<(), PgError> {
        self.remove_capture().await?;
        let ddl = self.unfence_ddl().await?;
        self.retried("remove the fence", &ddl).await
    }

    /// Imago's objects in the database, but the request log (for checks): its slot and
    /// publication, and every trigger, table and function named `imago_…`.
    pub async fn imago_objects(&mut self) -> Result<Vec<String>, PgError> {
        let (slot, publication) = (self.names.slot.clone(), self.names.publication.clone());
        let rows = self
            .sql()
            .await?
            .query(
                "SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE slot_name = $1 \
                 UNION ALL SELECT 'publication ' || pubname FROM pg_publication WHERE pubname = $2 \
                 UNION ALL SELECT 'trigger ' || tgname || ' on ' || tgrelid::regclass::text FROM pg_trigger WHERE tgname LIKE 'imago\\_%' \
                 UNION ALL SELECT 'table ' || relname FROM pg_class WHERE relname LIKE 'imago\\_%' AND relkind = 'r' AND relname <> $3 \
                 UNION ALL SELECT 'function ' || proname FROM pg_proc WHERE proname LIKE 'imago\\_%' \
                 ORDER BY 1",
                &[&slot, &publication, &protocol::schema::REQUEST_LOG_TABLE],
            )
            .await
            .map_err(sql_error("list Imago's objects"))?;
        rows.iter().map(|r| r.try_get(0).map_err(sql_error("list Imago's objects"))).collect()
    }

    /// The DDL that removes the fence, wherever its function is used.
    async fn unfence_ddl(&mut self) -> Result<String, PgError> {
        let rows = self
            .sql()
            .await?
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_trigger t \
                 JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE t.tgfoid = to_regprocedure($1)::oid ORDER BY 1",
                &[&format!("{}()", ident(FENCE_FUNCTION))],
            )
            .await
            .map_err(sql_error("look for the fence"))?;
        let mut ddl = String::new();
        for row in rows {
            let table: String = row.try_get(0).map_err(sql_error("look for the fence"))?;
            ddl.push_str(&format!("DROP TRIGGER IF EXISTS {} ON {table};\n", ident(FENCE_TRIGGER)));
        }
        ddl.push_str(&format!("DROP TABLE IF EXISTS {};\n", ident(FENCE_TABLE)));
        ddl.push_str(&format!("DROP FUNCTION IF EXISTS {}();\n", ident(FENCE_FUNCTION)));
        Ok(ddl)
    }

    /// Runs `ddl` in one transaction under [`LOCK_TIMEOUT`], up to [`FENCE_ATTEMPTS`] times
    /// while a lock is not granted in time (writers in flight).
    async fn retried(&mut self, what: &str, ddl: &str) -> Result<(), PgError> {
        let mut last = String::new();
        for _ in 0..FENCE_ATTEMPTS {
            let client = self.sql().await?;
            let tx = client.transaction().await.map_err(sql_error(what))?;
            let run = tx.batch_execute(&format!("SET LOCAL lock_timeout = {};\n{ddl}", literal(LOCK_TIMEOUT))).await;
            match run {
                Ok(()) => return tx.commit().await.map_err(sql_error(what)),
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                    last = sql::describe(&e);
                }
                Err(e) => return Err(sql_error(what)(e)),
            }
        }
        Err(PgError::Unavailable(format!(
            "{what}: tables stayed locked by writers in flight ({FENCE_ATTEMPTS} attempts of {LOCK_TIMEOUT}): {last}"
        )))
    }

    /// The main connection, made again if it broke.
    async fn sql(&mut self) -> Result<&mut Client, PgError> {
        if self.sql.is_closed() {
            self.sql = sql::connect(&self.config).await?;
        }
        Ok(&mut self.sql)
    }

    /// The stream, started from the slot's confirmed position if it is not running.
    async fn stream(&mut self) -> Result<&mut Stream, PgError> {
        if self.stream.is_none() {
            let slot = self.names.slot.clone();
            let state = slot_state(self.sql().await?, &slot)
                .await?
                .ok_or_else(|| PgError::Unavailable(format!("no slot {slot}: the capture starts with a snapshot")))?;
            let tables = self.tables.values().cloned().collect();
            let started = Stream::start(&self.replication, tables, state.confirmed, self.buffer_bytes).await?;
            self.stream = Some(started);
        }
        self.stream.as_mut().ok_or_else(|| PgError::Unavailable("the stream did not start".into()))
    }

    async fn close_stream(&mut self) {
        if let Some(stream) = self.stream.take() {
            stream.close().await;
        }
    }
}

/// The fence's DDL: its function, its state table (the final position unknown yet) and a
/// trigger on every captured table, in name order.
fn fence_ddl(tables: &BTreeMap<String, TableInfo>) -> String {
    let function = ident(FENCE_FUNCTION);
    let mut ddl = format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $imago$\n\
         BEGIN\n\
           RAISE EXCEPTION 'imago: table % is fenced: an upgrade is switching this database over (writes are refused until it ends)', \
             TG_TABLE_NAME USING ERRCODE = 'read_only_sql_transaction';\n\
         END\n\
         $imago$;\n\
         CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY CHECK (id = 1), final_lsn pg_lsn);\n\
         INSERT INTO {table} VALUES (1, NULL) ON CONFLICT (id) DO UPDATE SET final_lsn = NULL;\n",
        table = ident(FENCE_TABLE),
    );
    for name in tables.keys() {
        let (trigger, table) = (ident(FENCE_TRIGGER), ident(name));
        ddl.push_str(&format!(
            "CREATE OR REPLACE TRIGGER {trigger} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} \
               FOR EACH STATEMENT EXECUTE FUNCTION {function}();\n\
             ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger};\n"
        ));
    }
    ddl
}

/// A replication slot as the server describes it.
struct SlotState {
    confirmed: Position,
}

async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, PgError> {
    let row = client
        .query_opt("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .map_err(sql_error(format!("read slot {slot}")))?;
    let Some(row) = row else { return Ok(None) };
    let confirmed: Option<String> = row.try_get(0).map_err(sql_error(format!("read slot {slot}")))?;
    let confirmed = confirmed.ok_or_else(|| PgError::Refused(format!("slot {slot} is not a logical slot")))?;
    Ok(Some(SlotState { confirmed: parse_lsn(&confirmed)? }))
}

/// An existing slot of this name must be this database's pgoutput slot: a restarted node's.
async fn check_slot(client: &Client, slot: &str) -> Result<(), PgError> {
    let row = client
        .query_opt(
            "SELECT slot_type = 'logical' AND plugin = 'pgoutput' AND database = current_database() \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql_error(format!("read slot {slot}")))?;
    match row.map(|r| r.try_get::<_, Option<bool>>(0)) {
        None | Some(Ok(Some(true))) => Ok(()),
        Some(Err(e)) => Err(sql_error(format!("read slot {slot}"))(e)),
        Some(Ok(_)) => Err(PgError::Refused(format!(
            "replication slot {slot} exists, but is not a pgoutput slot of this database: \
             SELECT pg_drop_replication_slot('{slot}') if it is not in use, or name another"
        ))),
    }
}

/// Runs a command on a replication session that has not started streaming.
async fn gated(
    walsender: &mut ReplicationClient,
    command: &str,
    what: &str,
) -> Result<Vec<pgwire_replication::QueryRow>, PgError> {
    match tokio::time::timeout(SLOT_WAIT, walsender.simple_query(command)).await {
        Ok(answer) => answer.map_err(|e| replication(what, e)),
        Err(_) => Err(PgError::Unavailable(format!("{what}: no answer within {SLOT_WAIT:?}"))),
    }
}

/// `CREATE_REPLICATION_SLOT`'s answer: the consistent point and the exported snapshot's name.
fn slot_answer(rows: &[pgwire_replication::QueryRow]) -> Result<(Position, String), PgError> {
    let column = |i: usize| -> Option<String> {
        let value = rows.first()?.get(i)?.as_ref()?;
        String::from_utf8(value.to_vec()).ok()
    };
    match (column(1), column(2)) {
        (Some(point), Some(snapshot)) => Ok((parse_lsn(&point)?, snapshot)),
        _ => Err(PgError::Replication {
            what: "create the slot".into(),
            message: format!("an answer without a consistent point and a snapshot: {rows:?}"),
        }),
    }
}

fn parse_lsn(text: &str) -> Result<Position, PgError> {
    let lsn: Lsn = text.parse().map_err(|e| PgError::Unavailable(format!("the server's LSN: {e}")))?;
    Ok(Position(lsn.0))
}

fn replication(what: &str, e: pgwire_replication::PgWireError) -> PgError {
    PgError::Replication { what: what.into(), message: e.to_string() }
}

/// The connection string, with the pinned session settings ([`sql::PINNED_OPTIONS`]).
fn sql_config(conn_str: &str) -> Result<tokio_postgres::Config, PgError> {
    let mut config: tokio_postgres::Config =
        conn_str.parse().map_err(|e: tokio_postgres::Error| PgError::ConnectionString(sql::describe(&e)))?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(PgError::ConnectionString("sslmode=require: TLS is not supported yet".into()));
    }
    let options = match config.get_options() {
        Some(theirs) => format!("{theirs} {}", sql::PINNED_OPTIONS),
        None => sql::PINNED_OPTIONS.to_string(),
    };
    config.options(options);
    if config.get_application_name().is_none() {
        config.application_name("imago");
    }
    Ok(config)
}

/// The replication connection's settings, from the same connection string.
fn replication_config(config: &tokio_postgres::Config, names: &Names) -> Result<ReplicationConfig, PgError> {
    let bad = |what: &str| PgError::ConnectionString(what.to_string());
    let host = match (config.get_hosts().first(), config.get_hostaddrs().first()) {
        (Some(tokio_postgres::config::Host::Tcp(host)), _) => host.clone(),
        (Some(tokio_postgres::config::Host::Unix(dir)), _) => {
            dir.to_str().ok_or_else(|| bad("a socket directory that is not UTF-8"))?.to_string()
        }
        (None, Some(addr)) => addr.to_string(),
        (None, None) => return Err(bad("no host")),
    };
    let user = config.get_user().ok_or_else(|| bad("no user"))?;
    let password = match config.get_password() {
        Some(p) => String::from_utf8(p.to_vec()).map_err(|_| bad("a password that is not UTF-8"))?,
        None => String::new(),
    };
    let database = config.get_dbname().unwrap_or(user);
    let options = config.get_options().unwrap_or(sql::PINNED_OPTIONS);
    Ok(ReplicationConfig::new(host, user, password, database, names.slot.as_str(), names.publication.as_str())
        .with_port(config.get_ports().first().copied().unwrap_or(5432))
        .with_status_interval(STATUS_INTERVAL)
        .with_buffer_size(REPLICATION_EVENTS)
        .with_options(options)
        .with_application_name(format!("imago {}", names.slot)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_plain() {
        assert!(Names::for_upgrade(UpgradeId(7)).check().is_ok());
        assert_eq!(Names::for_upgrade(UpgradeId(7)).slot, "imago_upgrade_7");
        for bad in ["", "Upper", "a-b", "a'b", "a,b", &"x".repeat(64)] {
            let names = Names { slot: "s".into(), publication: bad.to_string() };
            assert!(names.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_connection_string_gives_both_connections_with_pinned_settings() {
        let names = Names::for_upgrade(UpgradeId(1));
        let config =
            sql_config("host=db port=6543 user=app password=secret dbname=shop options='-c work_mem=64MB'").unwrap();
        assert_eq!(config.get_options(), Some(format!("-c work_mem=64MB {}", sql::PINNED_OPTIONS).as_str()));
        let replication = replication_config(&config, &names).unwrap();
        assert_eq!(
            (replication.host.as_str(), replication.port, replication.user.as_str(), replication.database.as_str()),
            ("db", 6543, "app", "shop")
        );
        assert_eq!(replication.password, "secret");
        assert_eq!(
            replication.options.as_deref(),
            config.get_options(),
            "the stream writes values as the copy reads them"
        );
        assert_eq!(replication.slot, "imago_upgrade_1");
        let defaulted = replication_config(&sql_config("host=/run/pg user=app").unwrap(), &names).unwrap();
        assert_eq!((defaulted.host.as_str(), defaulted.port, defaulted.database.as_str()), ("/run/pg", 5432, "app"));
        assert!(sql_config("host=db user=app sslmode=require").is_err());
        assert!(replication_config(&sql_config("host=db").unwrap(), &names).is_err(), "no user");
    }

    #[test]
    fn the_fence_covers_every_table_always() {
        let table = |name: &str| TableInfo { name: name.into(), oid: 1, key: "id".into(), columns: vec![] };
        let tables: BTreeMap<String, TableInfo> = [("b".into(), table("b")), ("a\"x".into(), table("a\"x"))].into();
        let ddl = fence_ddl(&tables);
        let first = ddl.find("ON \"a\"\"x\"").unwrap();
        let second = ddl.find("ON \"b\"").unwrap();
        assert!(first < second, "tables are locked in name order");
        assert_eq!(ddl.matches("ENABLE ALWAYS TRIGGER").count(), 2);
        assert!(ddl.contains("BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE"));
    }
}
