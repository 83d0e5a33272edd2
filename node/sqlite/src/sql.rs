//! SQL text shared by both sides: identifiers, the connection's settings, table checks, reads.

use crate::{value_of, SqliteError, BUSY_TIMEOUT_MS};
use node_core::store::{Chunk, RowCursor, StoredRow};
use protocol::schema::{Row, Schema, TableSchema, Value};
use protocol::Position;
use rusqlite::{Connection, OpenFlags};
use std::time::Duration;

/// Prepared statements a connection keeps.
const STATEMENT_CACHE: usize = 256;

/// `name` as an SQL identifier (double-quoted, quotes doubled).
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as an SQL string literal.
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Opens `path` read-write (created if missing) in WAL mode with the busy timeout.
pub(crate) fn open(path: &str) -> Result<Connection, SqliteError> {
    let open = |source| SqliteError::Open { path: path.to_string(), source };
    let conn = Connection::open(path).map_err(open)?;
    conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS)).map_err(open)?;
    // WAL: a snapshot (a read transaction) does not stop the application's writers. An
    // in-memory database has no WAL and answers "memory": that is fine for it.
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(open)?;
    conn.execute_batch("PRAGMA synchronous = FULL").map_err(open)?;
    // One statement per output and operation of a plan, and Imago's own: keep them all prepared.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// A second, read-only connection to `path` (for a snapshot).
pub(crate) fn open_reader(path: &str) -> Result<Connection, SqliteError> {
    let open = |source| SqliteError::Open { path: path.to_string(), source };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags).map_err(open)?;
    conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS)).map_err(open)?;
    Ok(conn)
}

pub(crate) use protocol::schema::with_request_log;

/// `CREATE TABLE IF NOT EXISTS` for `table` (typeless columns; the key is the rowid).
pub(crate) fn create_table(conn: &Connection, name: &str, table: &TableSchema) -> Result<(), SqliteError> {
    create_table_in(conn, "main", name, table)
}

/// [`create_table`] in schema `schema_name` (`main`, or `temp` for the scratch copy).
pub(crate) fn create_table_in(
    conn: &Connection,
    schema_name: &str,
    name: &str,
    table: &TableSchema,
) -> Result<(), SqliteError> {
    let columns: Vec<String> = table
        .columns
        .iter()
        .map(|c| if *c == table.key { format!("{} INTEGER PRIMARY KEY", ident(c)) } else { ident(c) })
        .collect();
    conn.execute_batch(&format!("CREATE TABLE IF NOT EXISTS {schema_name}.{} ({})", ident(name), columns.join(", ")))?;
    Ok(())
}

/// Checks that the live `name` has exactly the declared columns and the key as its integer
/// primary key (the rowid), so no column goes uncaptured and keys are what Imago reads.
pub(crate) fn check_table(conn: &Connection, path: &str, name: &str, table: &TableSchema) -> Result<(), SqliteError> {
    let err = |message: String| SqliteError::Schema { path: path.into(), table: name.into(), message };
    let mut stmt = conn.prepare("SELECT name, type, pk FROM pragma_table_info(?1)")?;
    let live: Vec<(String, String, i64)> =
        stmt.query_map([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?;
    if live.is_empty() {
        return Err(err("no such table in the database".into()));
    }
    for column in &table.columns {
        if !live.iter().any(|(c, _, _)| c == column) {
            return Err(err(format!("the plan names column `{column}`, which the database lacks")));
        }
    }
    if let Some((column, _, _)) = live.iter().find(|(c, _, _)| !table.columns.contains(c)) {
        return Err(err(format!("column `{column}` is not in the plan's schema (it would not be carried)")));
    }
    let keys: Vec<&(String, String, i64)> = live.iter().filter(|(_, _, pk)| *pk > 0).collect();
    match keys.as_slice() {
        [(column, kind, _)] if *column == table.key && kind.eq_ignore_ascii_case("INTEGER") => Ok(()),
        _ => Err(err(format!("its key `{}` must be its only primary key, declared INTEGER PRIMARY KEY", table.key))),
    }
}

/// Up to `limit` rows after `after`, in (table, key) order over `schema`'s tables, on `conn`
/// (a snapshot's connection, or the main one for current rows).
pub(crate) fn read_rows(
    conn: &Connection,
    schema: &Schema,
    after: &RowCursor,
    limit: usize,
    position: Position,
) -> Result<Chunk, SqliteError> {
    let mut rows: Vec<StoredRow> = Vec::with_capacity(limit.min(1024));
    for (name, table) in &schema.tables {
        let from = match after {
            Some((t, _)) if t > name => continue,
            Some((t, k)) if t == name => Some(*k),
            _ => None,
        };
        let wanted = limit - rows.len();
        let columns = table.columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
        let (key, name_sql) = (ident(&table.key), ident(name));
        // One more than wanted tells whether more follows (even when nothing more is wanted).
        let sql = match from {
            Some(_) => format!("SELECT {columns} FROM {name_sql} WHERE {key} > ?1 ORDER BY {key} LIMIT ?2"),
            None => format!("SELECT {columns} FROM {name_sql} WHERE ?1 IS NULL ORDER BY {key} LIMIT ?2"),
        };
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut found = stmt.query(rusqlite::params![from, (wanted + 1) as i64])?;
        while let Some(r) = found.next()? {
            if rows.len() == limit {
                return Ok(Chunk { rows, last: false, position });
            }
            let (key, row) = row_of(name, table, r)?;
            rows.push((name.clone(), key, row));
        }
    }
    Ok(Chunk { rows, last: true, position })
}

/// A row read with `table`'s columns in order.
pub(crate) fn row_of(name: &str, table: &TableSchema, r: &rusqlite::Row<'_>) -> Result<(i64, Row), SqliteError> {
    let mut row = Row::new();
    let mut key = None;
    for (i, column) in table.columns.iter().enumerate() {
        let value = value_of(name, column, r.get_ref(i)?)?;
        if *column == table.key {
            match value {
                Value::Int(k) => key = Some(k),
                _ => {
                    return Err(SqliteError::Value {
                        table: name.into(),
                        column: column.clone(),
                        what: "a key that is not an integer".into(),
                    })
                }
            }
        }
        row.insert(column.clone(), value);
    }
    let key = key.expect("the key is among the columns (checked at open)");
    Ok((key, row))
}

/// Binds a value.
pub(crate) fn sql_value(v: &Value) -> rusqlite::types::Value {
    match v {
        Value::Null => rusqlite::types::Value::Null,
        Value::Int(i) => rusqlite::types::Value::Integer(*i),
        Value::Text(t) => rusqlite::types::Value::Text(t.clone()),
    }
}

/// Names of the triggers on `conn` starting with `prefix`.
pub(crate) fn triggers(conn: &Connection, prefix: &str) -> Result<Vec<String>, SqliteError> {
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND substr(name, 1, length(?1)) = ?1 ORDER BY name",
    )?;
    let names = stmt.query_map([prefix], |r| r.get(0))?.collect::<Result<_, _>>()?;
    Ok(names)
}

/// Drops every trigger whose name starts with `prefix`.
pub(crate) fn drop_triggers(conn: &Connection, prefix: &str) -> Result<(), SqliteError> {
    for name in triggers(conn, prefix)? {
        conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", ident(&name)))?;
    }
    Ok(())
}

/// Whether the database has `sqlite_sequence` (made with its first `AUTOINCREMENT` table).
pub(crate) fn has_sequences(conn: &Connection) -> Result<bool, SqliteError> {
    let n: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'",
        [],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}
