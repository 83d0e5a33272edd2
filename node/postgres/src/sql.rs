//! SQL of the old database: identifiers, connections, the checks at open, chunked reads.

use crate::changes::{is_int, value_of, ColumnInfo, TableInfo};
use crate::PgError;
use node_core::store::{Chunk, RowCursor, StoredRow};
use protocol::schema::{Row, TableSchema, Value, REQUEST_LOG_TABLE};
use protocol::Position;
use std::collections::{BTreeMap, BTreeSet};
use tokio_postgres::{Client, GenericClient, NoTls, SimpleQueryMessage};

/// Session settings every connection of an old store pins. Those that decide how values are
/// written as text are the same on the copy's connections and on the replication connection
/// (whose pgoutput writes the stream's values), so that a row copied and the same row streamed
/// have the same text. And no timeout ends a snapshot's transaction, idle between chunks. The
/// server's notices of Imago's own idempotent DDL ("already exists, skipping") are not sent.
pub const PINNED_OPTIONS: &str = "-c DateStyle=ISO,MDY -c IntervalStyle=postgres -c TimeZone=UTC \
     -c extra_float_digits=1 -c bytea_output=hex -c lc_monetary=C \
     -c idle_in_transaction_session_timeout=0 -c statement_timeout=0 -c client_min_messages=warning";

/// `name` as an SQL identifier (double-quoted, quotes doubled).
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as an SQL string literal.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// What the server said, in full (tokio-postgres's own message is "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; detail: {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// Maps a tokio-postgres error to [`PgError::Sql`], saying what was being done.
pub fn sql_error(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    let what = what.into();
    move |e| PgError::Sql { what, message: describe(&e) }
}

/// Opens a connection; its driver runs as a task of its own until the client is dropped.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Client, PgError> {
    let (client, connection) = config.connect(NoTls).await.map_err(sql_error("connect"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("an old store's connection ended: {}", describe(&e));
        }
    });
    Ok(client)
}

pub use protocol::schema::{request_log_schema, with_request_log};

/// Creates the request log where it is missing.
pub async fn create_request_log(client: &Client) -> Result<(), PgError> {
    let table = request_log_schema();
    let columns: Vec<String> =
        table
            .columns
            .iter()
            .map(|c| {
                if *c == table.key {
                    format!("{} bigint PRIMARY KEY", ident(c))
                } else {
                    format!("{} bigint", ident(c))
                }
            })
            .collect();
    let sql = format!("CREATE TABLE IF NOT EXISTS {} ({})", ident(REQUEST_LOG_TABLE), columns.join(", "));
    client.batch_execute(&sql).await.map_err(sql_error("create the request log"))
}

/// Checks the server: `wal_level = logical`, a role that may replicate, and room for walsenders
/// and slots. Returns warnings about settings that work but are risky.
pub async fn check_server(client: &Client) -> Result<Vec<String>, PgError> {
    let setting = |name: &'static str| async move {
        let row = client
            .query_one("SELECT setting FROM pg_settings WHERE name = $1", &[&name])
            .await
            .map_err(sql_error(format!("read the setting {name}")))?;
        row.try_get::<_, String>(0).map_err(sql_error(format!("read the setting {name}")))
    };
    let wal_level = setting("wal_level").await?;
    if wal_level != "logical" {
        return Err(PgError::Refused(format!(
            "wal_level is {wal_level}: logical decoding needs it logical; set wal_level = logical in postgresql.conf and restart the server"
        )));
    }
    for name in ["max_replication_slots", "max_wal_senders"] {
        if setting(name).await? == "0" {
            return Err(PgError::Refused(format!(
                "{name} is 0: the capture needs a slot and a walsender; set {name} (10, say) in postgresql.conf and restart the server"
            )));
        }
    }
    let row = client
        .query_one(
            "SELECT current_user::text, rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(sql_error("read the role's privileges"))?;
    let (role, may): (String, bool) =
        (row.try_get(0).map_err(sql_error("role"))?, row.try_get(1).map_err(sql_error("role"))?);
    if !may {
        return Err(PgError::Refused(format!(
            "role {role} may not replicate: ALTER ROLE {} REPLICATION (or connect as a role that may)",
            ident(&role)
        )));
    }
    let mut warnings = Vec::new();
    if setting("max_slot_wal_keep_size").await? == "-1" {
        warnings.push(
            "max_slot_wal_keep_size is -1 (unbounded): a slot nobody reads keeps every WAL file from then on, \
             until the disk is full; set it (ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf()) \
             so that the server gives up a stuck slot first"
                .to_string(),
        );
    }
    Ok(warnings)
}

/// An index that identifies rows: the primary key or the replica identity index.
struct Identity {
    primary: bool,
    replica: bool,
    columns: BTreeSet<String>,
}

/// Checks the live table `name` against the plan and returns what the stream needs of it:
/// exactly the declared columns (one the plan does not name would not be carried), none
/// generated (pgoutput in PostgreSQL 15 does not send them), and its key, an integer, as its
/// primary key (or its replica identity index), so that a delete or a key change names the key.
pub async fn check_table(client: &Client, name: &str, table: &TableSchema) -> Result<TableInfo, PgError> {
    let refuse = |message: String| PgError::Table { table: name.to_string(), message };
    let what = || format!("read the definition of table {name}");
    let found = client
        .query_opt(
            "SELECT c.oid, c.relkind::text, c.relreplident::text FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&ident(name)],
        )
        .await
        .map_err(sql_error(what()))?
        .ok_or_else(|| refuse("no such table in the database".into()))?;
    let oid: u32 = found.try_get(0).map_err(sql_error(what()))?;
    let kind: String = found.try_get(1).map_err(sql_error(what()))?;
    let identity: String = found.try_get(2).map_err(sql_error(what()))?;
    if kind != "r" {
        return Err(refuse(format!(
            "it is not an ordinary table (relkind {kind}): partitioned tables, views and the like are not captured"
        )));
    }
    let live = columns(client, oid).await?;
    for column in &table.columns {
        if !live.iter().any(|c| c.name == *column) {
            return Err(refuse(format!("the plan names column `{column}`, which the table lacks")));
        }
    }
    if let Some(extra) = live.iter().find(|c| !table.columns.contains(&c.name)) {
        return Err(refuse(format!("column `{}` is not in the plan's schema (it would not be carried)", extra.name)));
    }
    if let Some(generated) = live.iter().find(|c| c.generated) {
        return Err(refuse(format!(
            "column `{}` is generated: pgoutput (PostgreSQL 15) does not send generated columns",
            generated.name
        )));
    }
    let key =
        live.iter().find(|c| c.name == table.key).ok_or_else(|| refuse(format!("no key column `{}`", table.key)))?;
    if !is_int(key.type_oid) {
        return Err(refuse(format!(
            "its key `{}` is of type {}; Imago's keys are integers (smallint, integer or bigint)",
            table.key, key.type_name
        )));
    }
    check_identity(client, name, oid, &identity, &table.key).await?;
    let columns = table
        .columns
        .iter()
        .filter_map(|c| live.iter().find(|l| l.name == *c))
        .map(|c| ColumnInfo { name: c.name.clone(), type_oid: c.type_oid })
        .collect();
    Ok(TableInfo { name: name.to_string(), oid, key: table.key.clone(), columns })
}

struct LiveColumn {
    name: String,
    type_oid: u32,
    type_name: String,
    generated: bool,
}

async fn columns(client: &Client, oid: u32) -> Result<Vec<LiveColumn>, PgError> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod), a.attgenerated::text <> '' \
             FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(sql_error("read the columns"))?;
    rows.iter()
        .map(|r| {
            Ok(LiveColumn {
                name: r.try_get(0)?,
                type_oid: r.try_get(1)?,
                type_name: r.try_get(2)?,
                generated: r.try_get(3)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(sql_error("read the columns"))
}

/// The key must identify rows to the stream: the primary key (replica identity DEFAULT or FULL),
/// or the replica identity index. Replica identity NOTHING would make the application's own
/// updates and deletes fail once the table is published.
async fn check_identity(client: &Client, name: &str, oid: u32, identity: &str, key: &str) -> Result<(), PgError> {
    let refuse = |message: String| PgError::Table { table: name.to_string(), message };
    let rows = client
        .query(
            "SELECT i.indisprimary, i.indisreplident, \
               ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) \
             FROM pg_index i WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident)",
            &[&oid],
        )
        .await
        .map_err(sql_error(format!("read the indexes of table {name}")))?;
    let indexes = rows
        .iter()
        .map(|r| {
            Ok(Identity {
                primary: r.try_get(0)?,
                replica: r.try_get(1)?,
                columns: r.try_get::<_, Vec<String>>(2)?.into_iter().collect(),
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(sql_error(format!("read the indexes of table {name}")))?;
    let only_key: BTreeSet<String> = [key.to_string()].into();
    let table = ident(name);
    let primary = indexes.iter().find(|i| i.primary);
    match (identity, primary) {
        ("n", _) => Err(refuse(format!(
            "its REPLICA IDENTITY is NOTHING: once published, its updates and deletes would fail; \
             ALTER TABLE {table} REPLICA IDENTITY DEFAULT"
        ))),
        ("i", _) => match indexes.iter().find(|i| i.replica) {
            Some(index) if index.columns == only_key => Ok(()),
            _ => Err(refuse(format!(
                "its replica identity index is not on its key `{key}` alone: ALTER TABLE {table} REPLICA IDENTITY DEFAULT \
                 (with the primary key on `{key}`), or USING INDEX a unique index on `{key}`"
            ))),
        },
        (_, Some(index)) if index.columns == only_key => Ok(()),
        (_, Some(index)) => Err(refuse(format!(
            "its primary key is ({}), but the plan's key is `{key}`: the key must be the table's primary key",
            index.columns.iter().cloned().collect::<Vec<_>>().join(", ")
        ))),
        (_, None) => Err(refuse(format!(
            "it has no primary key: the capture needs its key to identify rows; ALTER TABLE {table} ADD PRIMARY KEY ({})",
            ident(key)
        ))),
    }
}

/// Creates the publication of exactly `tables` if it is missing; an existing one must publish
/// exactly them, every operation (a restarted node opens the same one again).
pub async fn ensure_publication(client: &Client, publication: &str, tables: &[&TableInfo]) -> Result<(), PgError> {
    let what = || format!("read publication {publication}");
    let exists = client
        .query_opt(
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(sql_error(what()))?;
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let Some(row) = exists else {
        let list: Vec<String> = tables.iter().map(|t| ident(&t.name)).collect();
        let sql = format!("CREATE PUBLICATION {} FOR TABLE {}", ident(publication), list.join(", "));
        return client.batch_execute(&sql).await.map_err(sql_error(format!("create publication {publication}")));
    };
    let every_operation: bool = row.try_get(0).map_err(sql_error(what()))?;
    let rows = client
        .query(
            "SELECT format('%I.%I', schemaname, tablename), to_regclass(format('%I.%I', schemaname, tablename))::oid \
             FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await
        .map_err(sql_error(what()))?;
    let published: BTreeMap<u32, String> = rows
        .iter()
        .map(|r| Ok((r.try_get(1)?, r.try_get(0)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(sql_error(what()))?;
    let ours: BTreeSet<u32> = oids.iter().copied().collect();
    if published.keys().copied().collect::<BTreeSet<u32>>() != ours || !every_operation {
        return Err(PgError::Refused(format!(
            "publication {publication} exists, publishing {:?}{}, not exactly the captured tables with every operation: \
             DROP PUBLICATION {} (or name another)",
            published.values().collect::<Vec<_>>(),
            if every_operation { "" } else { " without every operation" },
            ident(publication)
        )));
    }
    Ok(())
}

/// Up to `limit` rows after `after`, in (table, key) order over `tables` (in name order), read
/// on `client` (a snapshot's transaction, or the current rows). The simple query protocol
/// returns each value in its type's text format, as pgoutput writes it (a cast to `text` would
/// not: `true::text` is `true`, pgoutput writes `t`).
pub async fn read_rows<C: GenericClient>(
    client: &C,
    tables: &BTreeMap<String, TableInfo>,
    after: &RowCursor,
    limit: usize,
    position: Position,
) -> Result<Chunk, PgError> {
    let mut rows: Vec<StoredRow> = Vec::with_capacity(limit.min(1024));
    for (name, table) in tables {
        let from = match after {
            Some((t, _)) if t > name => continue,
            Some((t, k)) if t == name => Some(*k),
            _ => None,
        };
        let wanted = limit - rows.len();
        let columns = table.columns.iter().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ");
        let key = ident(&table.key);
        let filter = from.map(|k| format!("WHERE {key} > {k} ")).unwrap_or_default();
        // One more than wanted tells whether more follows (even when nothing more is wanted).
        let sql = format!("SELECT {columns} FROM {} {filter}ORDER BY {key} LIMIT {}", ident(name), wanted + 1);
        let answer = client.simple_query(&sql).await.map_err(sql_error(format!("read rows of {name}")))?;
        for message in answer {
            let SimpleQueryMessage::Row(r) = message else { continue };
            if rows.len() == limit {
                return Ok(Chunk { rows, last: false, position });
            }
            let (key, row) = row_of(table, &r)?;
            rows.push((name.clone(), key, row));
        }
    }
    Ok(Chunk { rows, last: true, position })
}

/// The row of `table` at `key` as it is now, if there is one.
pub async fn read_row<C: GenericClient>(client: &C, table: &TableInfo, key: i64) -> Result<Option<Row>, PgError> {
    let columns = table.columns.iter().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ");
    let sql = format!("SELECT {columns} FROM {} WHERE {} = {key}", ident(&table.name), ident(&table.key));
    let what = || format!("read row {key} of {}", table.name);
    let answer = client.simple_query(&sql).await.map_err(sql_error(what()))?;
    for message in answer {
        if let SimpleQueryMessage::Row(r) = message {
            return Ok(Some(row_of(table, &r)?.1));
        }
    }
    Ok(None)
}

/// A row of `table`'s columns, in order.
fn row_of(table: &TableInfo, r: &tokio_postgres::SimpleQueryRow) -> Result<(i64, Row), PgError> {
    let mut row = Row::new();
    let mut key = None;
    for (i, column) in table.columns.iter().enumerate() {
        let text = r.try_get(i).map_err(sql_error(format!("read {}.{}", table.name, column.name)))?;
        let value = value_of(&table.name, column, text)?;
        if column.name == table.key {
            if let Value::Int(k) = value {
                key = Some(k);
            }
        }
        row.insert(column.name.clone(), value);
    }
    let key =
        key.ok_or_else(|| PgError::Table { table: table.name.clone(), message: "a row whose key is NULL".into() })?;
    Ok((key, row))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changes::{INT2, INT4, INT8};

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn the_request_log_is_added_to_the_plans_tables() {
        let schema = with_request_log(&protocol::schema::Schema::default());
        assert_eq!(schema.tables[REQUEST_LOG_TABLE].key, "key");
        assert!([INT2, INT4, INT8].into_iter().all(is_int) && !is_int(25), "text is not an integer");
    }
}
