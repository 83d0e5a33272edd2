//! The plan's mapping run by the new database: an old-schema change becomes SQL statements on
//! the new tables. Values Imago converts itself (columns, constants, `int` ↔ `text`, keys) are
//! bound as parameters; the plan's SQL expressions are written into the statement, each `:name`
//! replaced by its parameter, so the database evaluates them (in the batch's transaction, seeing
//! the rows written before them). Generated keys are kept in the key map `imago_keys`.

use crate::sql::{ident, sql_value};
use protocol::schema::{
    evaluate, sql_params, ConvertError, Custom, Mapping, Output, Row, RowOp, Source, REQUEST_LOG_TABLE,
};
use rusqlite::{Connection, OptionalExtension};

/// The key map: old row (table, key) and new table → the key the new database made for it.
pub const KEYS_TABLE: &str = "imago_keys";
/// The next key to make per new table (keys are never made twice, even after deletes).
pub const KEY_NEXT_TABLE: &str = "imago_key_next";

/// Where a change lands: the new tables, or the scratch copy that shadows them while the
/// universes are compared (temporary tables of the same names: a plan's expression that reads
/// a new table reads the scratch one then).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Main,
    Staging,
}

impl Target {
    fn schema(self) -> &'static str {
        match self {
            Target::Main => "main",
            Target::Staging => "temp",
        }
    }
}

/// Why a change could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// Imago's own conversion refused a value, or a generated key is unknown while staging.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// The key map's tables (in the new database, with the data they describe).
pub fn create_key_map(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS main.{KEYS_TABLE} (\
           src_table TEXT NOT NULL, src_key INTEGER NOT NULL, target TEXT NOT NULL, key INTEGER NOT NULL, \
           PRIMARY KEY (src_table, src_key, target)) WITHOUT ROWID;\n\
         CREATE INDEX IF NOT EXISTS main.imago_keys_by_target ON {KEYS_TABLE} (target, key);\n\
         CREATE TABLE IF NOT EXISTS main.{KEY_NEXT_TABLE} (target TEXT PRIMARY KEY, next INTEGER NOT NULL);"
    ))
}

/// Applies one old-schema change to `target`.
pub fn apply(conn: &Connection, mapping: &Mapping, op: &RowOp, target: Target) -> Result<(), ProgramError> {
    let (table, key) = match op {
        RowOp::Upsert { table, key, .. } | RowOp::Delete { table, key } => (table.as_str(), *key),
    };
    if table == REQUEST_LOG_TABLE {
        // Carried as it is (see `REQUEST_LOG_TABLE`).
        let output = protocol::schema::request_log_output();
        return match op {
            RowOp::Upsert { row, .. } => upsert(conn, std::slice::from_ref(&output), &output, table, key, row, target),
            RowOp::Delete { .. } => delete_row(conn, &output, key, target),
        };
    }
    if let Some(custom) = mapping.custom.get(table) {
        return apply_custom(conn, custom, table, key, op, target);
    }
    let Some(outputs) = mapping.outputs.get(table) else {
        return Ok(());
    };
    for output in outputs {
        match op {
            RowOp::Upsert { row, .. } => {
                upsert(conn, outputs, output, table, key, row, target)?;
                if output.merged && target == Target::Main {
                    conn.prepare_cached(&format!(
                        "INSERT INTO main.{KEYS_TABLE} (src_table, src_key, target, key) VALUES (?1, ?2, ?3, ?2) \
                         ON CONFLICT DO NOTHING"
                    ))?
                    .execute(rusqlite::params![table, key, output.table])?;
                }
            }
            RowOp::Delete { .. } if output.merged => delete_merged(conn, output, table, key, target)?,
            RowOp::Delete { .. } => {
                let new_key =
                    if output.generated { forget(conn, table, key, &output.table, target)? } else { Some(key) };
                if let Some(new_key) = new_key {
                    delete_row(conn, output, new_key, target)?;
                }
            }
        }
    }
    Ok(())
}

/// The key map's mark of an old row the plan's own statements have seen (`insert` ran).
const SEEN_BY_STATEMENTS: &str = "";

/// The escape hatch: the plan's statements for an old table's row. `insert` for a row not seen
/// yet, `update` for one seen, `delete` when it goes (it sees the key only: the other values
/// of a deleted row are gone). Staging runs `insert` into the scratch copy.
fn apply_custom(
    conn: &Connection,
    custom: &Custom,
    table: &str,
    key: i64,
    op: &RowOp,
    target: Target,
) -> Result<(), ProgramError> {
    let seen = if target == Target::Main {
        conn.prepare_cached(&format!(
            "SELECT 1 FROM main.{KEYS_TABLE} WHERE src_table = ?1 AND src_key = ?2 AND target = ?3"
        ))?
        .query_row(rusqlite::params![table, key, SEEN_BY_STATEMENTS], |r| r.get::<_, i64>(0))
        .optional()?
        .is_some()
    } else {
        false
    };
    let mark = |present: bool| -> Result<(), ProgramError> {
        let sql = if present {
            format!("INSERT INTO main.{KEYS_TABLE} (src_table, src_key, target, key) VALUES (?1, ?2, ?3, ?2) ON CONFLICT DO NOTHING")
        } else {
            format!("DELETE FROM main.{KEYS_TABLE} WHERE src_table = ?1 AND src_key = ?2 AND target = ?3")
        };
        conn.prepare_cached(&sql)?.execute(rusqlite::params![table, key, SEEN_BY_STATEMENTS])?;
        Ok(())
    };
    match op {
        RowOp::Upsert { row, .. } => {
            let statement = if seen { &custom.update } else { &custom.insert };
            run_statement(conn, statement, row)?;
            if !seen && target == Target::Main {
                mark(true)?;
            }
        }
        RowOp::Delete { .. } => {
            if seen {
                let key_only = key_row(custom, key);
                run_statement(conn, &custom.delete, &key_only)?;
                mark(false)?;
            }
        }
    }
    Ok(())
}

/// A deleted row as the `delete` statement sees it: its key, every other column NULL.
fn key_row(custom: &Custom, key: i64) -> Row {
    [(custom.old_key.clone(), protocol::schema::Value::Int(key))].into()
}

/// One of the plan's statements written out, its `:name`s replaced by parameters bound to the
/// old row's values (no key map: a statement sees the old row only).
fn render_statement(statement: &Source, row: &Row) -> Result<Rendered, ConvertError> {
    let Source::Sql { sql, params, .. } = statement else {
        unreachable!("a statement is compiled as SQL");
    };
    let mut rendered = Rendered { sql: String::new(), values: Vec::new() };
    let mut no_keys = |t: &str| Err(ConvertError::NeedsKeyMap { table: t.to_string() });
    let mut at = 0;
    for (range, name) in sql_params(sql) {
        rendered.sql.push_str(&sql[at..range.start]);
        render(&params[&name], row, &mut no_keys, &mut rendered)?;
        at = range.end;
    }
    rendered.sql.push_str(&sql[at..]);
    Ok(rendered)
}

/// Runs one of the plan's statements with the old row's values bound.
fn run_statement(conn: &Connection, statement: &Source, row: &Row) -> Result<(), ProgramError> {
    let rendered = render_statement(statement, row)?;
    conn.prepare_cached(&rendered.sql)?.execute(rusqlite::params_from_iter(rendered.values))?;
    Ok(())
}

/// An old table's row of a merged table goes: its columns are emptied, and the row goes too
/// unless another old table still has it (the key map marks who has which merged row).
fn delete_merged(
    conn: &Connection,
    output: &Output,
    table: &str,
    key: i64,
    target: Target,
) -> Result<(), ProgramError> {
    if target == Target::Main {
        conn.prepare_cached(&format!(
            "DELETE FROM main.{KEYS_TABLE} WHERE src_table = ?1 AND src_key = ?2 AND target = ?3"
        ))?
        .execute(rusqlite::params![table, key, output.table])?;
    }
    let others: Option<i64> = conn
        .prepare_cached(&format!(
            "SELECT 1 FROM main.{KEYS_TABLE} WHERE target = ?1 AND key = ?2 AND src_table <> ?3 LIMIT 1"
        ))?
        .query_row(rusqlite::params![output.table, key, table], |r| r.get(0))
        .optional()?;
    if others.is_none() {
        return delete_row(conn, output, key, target);
    }
    let own: Vec<String> =
        output.columns.iter().filter(|(c, _)| *c != output.key).map(|(c, _)| format!("{} = NULL", ident(c))).collect();
    if !own.is_empty() {
        let sql = format!(
            "UPDATE {}.{} SET {} WHERE {} = ?1",
            target.schema(),
            ident(&output.table),
            own.join(", "),
            ident(&output.key)
        );
        conn.prepare_cached(&sql)?.execute([key])?;
    }
    Ok(())
}

fn delete_row(conn: &Connection, output: &Output, key: i64, target: Target) -> Result<(), ProgramError> {
    let sql = format!("DELETE FROM {}.{} WHERE {} = ?1", target.schema(), ident(&output.table), ident(&output.key));
    conn.prepare_cached(&sql)?.execute([key])?;
    Ok(())
}

/// The key old row `(table, key)` has in the output `target` among `outputs`.
fn key_in(
    conn: &Connection,
    outputs: &[Output],
    table: &str,
    key: i64,
    target_table: &str,
    target: Target,
) -> Result<i64, ConvertError> {
    match outputs.iter().find(|o| o.table == target_table) {
        Some(o) if o.generated => generated(conn, table, key, target_table, &o.key, target),
        _ => Ok(key),
    }
}

/// The generated key of old row `(table, key)` in `new_table`: from the key map, or made now
/// (above every key the table holds and every key made for it before) and kept. Staging only
/// looks up.
fn generated(
    conn: &Connection,
    table: &str,
    key: i64,
    new_table: &str,
    new_key: &str,
    target: Target,
) -> Result<i64, ConvertError> {
    let needs = || ConvertError::NeedsKeyMap { table: new_table.to_string() };
    let found: Option<i64> = conn
        .prepare_cached(&format!(
            "SELECT key FROM main.{KEYS_TABLE} WHERE src_table = ?1 AND src_key = ?2 AND target = ?3"
        ))
        .and_then(|mut s| s.query_row(rusqlite::params![table, key, new_table], |r| r.get(0)).optional())
        .map_err(|_| needs())?;
    if let Some(found) = found {
        return Ok(found);
    }
    if target == Target::Staging {
        return Err(needs());
    }
    let made: i64 = conn
        .prepare_cached(&format!(
            "SELECT max(coalesce((SELECT max({key}) FROM main.{t}), 0) + 1, \
                        coalesce((SELECT next FROM main.{KEY_NEXT_TABLE} WHERE target = ?1), 1))",
            key = ident(new_key),
            t = ident(new_table),
        ))
        .and_then(|mut s| s.query_row([new_table], |r| r.get(0)))
        .map_err(|_| needs())?;
    conn.prepare_cached(&format!(
        "INSERT INTO main.{KEY_NEXT_TABLE} (target, next) VALUES (?1, ?2) ON CONFLICT (target) DO UPDATE SET next = excluded.next"
    ))
    .and_then(|mut s| s.execute(rusqlite::params![new_table, made + 1]))
    .map_err(|_| needs())?;
    conn.prepare_cached(&format!(
        "INSERT INTO main.{KEYS_TABLE} (src_table, src_key, target, key) VALUES (?1, ?2, ?3, ?4)"
    ))
    .and_then(|mut s| s.execute(rusqlite::params![table, key, new_table, made]))
    .map_err(|_| needs())?;
    Ok(made)
}

/// Forgets the generated key of old row `(table, key)` in `new_table` (staging: looks it up).
fn forget(
    conn: &Connection,
    table: &str,
    key: i64,
    new_table: &str,
    target: Target,
) -> Result<Option<i64>, ProgramError> {
    let found: Option<i64> = conn
        .prepare_cached(&format!(
            "SELECT key FROM main.{KEYS_TABLE} WHERE src_table = ?1 AND src_key = ?2 AND target = ?3"
        ))?
        .query_row(rusqlite::params![table, key, new_table], |r| r.get(0))
        .optional()?;
    if found.is_some() && target == Target::Main {
        conn.prepare_cached(&format!(
            "DELETE FROM main.{KEYS_TABLE} WHERE src_table = ?1 AND src_key = ?2 AND target = ?3"
        ))?
        .execute(rusqlite::params![table, key, new_table])?;
    }
    Ok(found)
}

/// An SQL fragment and the values of its `?N` parameters, in order.
struct Rendered {
    sql: String,
    values: Vec<rusqlite::types::Value>,
}

/// `source` as SQL: an expression of the plan written out (its `:name`s replaced), anything
/// else evaluated here and bound.
fn render(
    source: &Source,
    row: &Row,
    key_of: &mut dyn FnMut(&str) -> Result<i64, ConvertError>,
    out: &mut Rendered,
) -> Result<(), ConvertError> {
    match source {
        Source::Sql { sql, params, .. } => {
            out.sql.push('(');
            let mut at = 0;
            for (range, name) in sql_params(sql) {
                out.sql.push_str(&sql[at..range.start]);
                let param = params.get(&name).expect("every parameter is bound when the plan compiles");
                render(param, row, key_of, out)?;
                at = range.end;
            }
            out.sql.push_str(&sql[at..]);
            out.sql.push(')');
        }
        other => {
            let value = evaluate(other, row, key_of)?;
            out.values.push(sql_value(&value));
            out.sql.push_str(&format!("?{}", out.values.len()));
        }
    }
    Ok(())
}

fn upsert(
    conn: &Connection,
    outputs: &[Output],
    output: &Output,
    table: &str,
    key: i64,
    row: &Row,
    target: Target,
) -> Result<(), ProgramError> {
    let mut key_of = |t: &str| key_in(conn, outputs, table, key, t, target);
    let new_key = key_of(&output.table)?;
    let mut rendered = Rendered { sql: String::new(), values: Vec::new() };
    let mut names = Vec::with_capacity(output.columns.len());
    let mut exprs = Vec::with_capacity(output.columns.len());
    for (column, source) in &output.columns {
        names.push(ident(column));
        if *column == output.key {
            rendered.values.push(rusqlite::types::Value::Integer(new_key));
            exprs.push(format!("?{}", rendered.values.len()));
            continue;
        }
        let start = rendered.sql.len();
        render(source, row, &mut key_of, &mut rendered)?;
        exprs.push(rendered.sql[start..].to_string());
    }
    let updates: Vec<String> = output
        .columns
        .iter()
        .filter(|(c, _)| *c != output.key)
        .map(|(c, _)| format!("{0} = excluded.{0}", ident(c)))
        .collect();
    let on_conflict =
        if updates.is_empty() { "DO NOTHING".to_string() } else { format!("DO UPDATE SET {}", updates.join(", ")) };
    let sql = format!(
        "INSERT INTO {}.{} ({}) VALUES ({}) ON CONFLICT ({}) {on_conflict}",
        target.schema(),
        ident(&output.table),
        names.join(", "),
        exprs.join(", "),
        ident(&output.key),
    );
    conn.prepare_cached(&sql)?.execute(rusqlite::params_from_iter(rendered.values))?;
    Ok(())
}

/// Prepares (without running) the statement of every output that has an SQL expression, with
/// its parameters, so an expression the database rejects is found when the store opens: the
/// transform's index and the database's message.
pub fn check(conn: &Connection, mapping: &Mapping) -> Result<(), (usize, String)> {
    for custom in mapping.custom.values() {
        for statement in [&custom.insert, &custom.update, &custom.delete] {
            let Source::Sql { transform, .. } = statement else { continue };
            // Every value bound as NULL: only whether the database takes the SQL matters.
            let rendered = render_statement(statement, &Row::new()).map_err(|e| (*transform, e.to_string()))?;
            if let Err(e) = conn.prepare(&rendered.sql) {
                return Err((*transform, e.to_string()));
            }
        }
    }
    for outputs in mapping.outputs.values() {
        for output in outputs {
            for (_, source) in &output.columns {
                let Source::Sql { transform, .. } = source else { continue };
                let mut rendered = Rendered { sql: String::new(), values: Vec::new() };
                let mut key_of = |_: &str| Ok(0);
                // Every value bound as NULL: only whether the database takes the SQL matters.
                let row = Row::new();
                if let Err(e) = render(source, &row, &mut key_of, &mut rendered) {
                    return Err((*transform, e.to_string()));
                }
                let sql = format!("SELECT {}", rendered.sql);
                if let Err(e) = conn.prepare(&sql) {
                    return Err((*transform, e.to_string()));
                }
            }
        }
    }
    Ok(())
}
