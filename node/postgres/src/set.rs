//! Changes applied as sets: many old rows of one table become one statement per new table
//! (`INSERT … SELECT … FROM unnest($1, $2, …) … ON CONFLICT`, `DELETE … WHERE key = ANY($1)`)
//! instead of one per row. One round trip for a chunk of the copy or a run of the stream
//! where the row-by-row program ([`crate::program`]) needs one per row and output.
//!
//! The same program, rendered for many rows at once: each value the row-by-row statement binds
//! as a parameter becomes an array with one element per row, and the statement reads the
//! arrays side by side. A value bound as text and cast to its column's type stays so (a `text[]`
//! cast element by element). A parameter of a plan's expression is typed by its values, as row
//! by row: `bigint[]` when every row's is an integer or NULL, `text[]` when every row's is
//! text or NULL, and written out as `NULL` when every row's is. Values of both kinds (SQLite's
//! dynamic typing) make no set: the caller applies those rows one by one.
//!
//! A chunk of the copy whose new table Imago computes alone (no column of the plan's SQL) goes
//! by `COPY … FROM STDIN` instead, in text format: each value as the row-by-row statement binds
//! it (text), read by the column type's input function as the cast of a text parameter is.
//!
//! Generated keys go as sets too: the key map is read for the run's rows in one statement per
//! old table, the keys a row by row run would make are made in the run's order (above every key
//! the table holds and every key made for it before), and the map's changes are written as sets.
//! What does not go as a set: a merge, and an old table the plan's statements handle. Within a run
//! of changes only each row's last state matters to a new table that only this old table feeds
//! (the plan compiler lets no other plain table share it), so a run is applied as its deletes
//! (every row deleted anywhere in the run) and then its upserts (every row whose last change is
//! one), which leaves the same rows as the changes one by one. A table with a column the plan's
//! SQL computes goes as a set of its own changes only, since the expression may read new tables
//! other changes write; it sees its own new table as it was before the set's statement.

use crate::program::{Live, Program, ProgramError, Target, KEYS_TABLE, KEY_NEXT_TABLE};
use crate::sql::ident;
use futures_util::SinkExt;
use protocol::schema::REQUEST_LOG_TABLE;
use protocol::schema::{evaluate, sql_params, ConvertError, Mapping, Output, Row, RowOp, Source, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write as _;
use tokio_postgres::types::ToSql;

/// Fewest changes worth a set (below it, row by row costs no more round trips).
pub const SET_ROWS_MIN: usize = 4;
/// Most changes in one set (bounds a statement's parameters and the memory it takes).
pub const SET_ROWS_MAX: usize = 10_000;

/// Whether the changes of old table `table` can be applied as a set (see the module's notes).
pub fn set_ready(mapping: &Mapping, table: &str) -> bool {
    if table == REQUEST_LOG_TABLE {
        return true;
    }
    if mapping.custom.contains_key(table) {
        return false;
    }
    let Some(outputs) = mapping.outputs.get(table) else {
        // Not in the new universe: nothing to do, as a set or not.
        return true;
    };
    // A new table another old table feeds too: only when every feeder's keys are generated
    // (disjoint rows, keys made in the run's order); a plain feeder beside a generated one
    // would change which keys are free.
    outputs.iter().all(|output| {
        !output.merged
            && mapping.outputs.iter().all(|(other, theirs)| {
                other == table || theirs.iter().all(|o| o.table != output.table || (o.generated && output.generated))
            })
    })
}

/// Whether a new table fed by old table `table` has a column the plan's SQL computes (which
/// may read other new tables).
fn computed(mapping: &Mapping, table: &str) -> bool {
    fn sql(source: &Source) -> bool {
        match source {
            Source::Sql { .. } => true,
            Source::Convert(inner, _) => sql(inner),
            _ => false,
        }
    }
    mapping.outputs.get(table).is_some_and(|outputs| outputs.iter().any(|o| o.columns.iter().any(|(_, s)| sql(s))))
}

/// How many changes from the start of `ops` can go as one set, at most [`SET_ROWS_MAX`]: the
/// run of changes to tables that [`set_ready`] accepts and whose new tables Imago computes
/// alone, in any order; or, for a table with a column the plan's SQL computes, the run of
/// changes to that table only (its expression may read the new tables other changes write,
/// and must see them as the changes before it left them).
pub fn set_run(mapping: &Mapping, ops: &[RowOp]) -> usize {
    let Some(first) = ops.first().map(op_table) else {
        return 0;
    };
    if !set_ready(mapping, first) {
        return 0;
    }
    let run = ops.iter().take(SET_ROWS_MAX);
    if computed(mapping, first) {
        return run.take_while(|op| op_table(op) == first).count();
    }
    let mut ready: BTreeMap<&str, bool> = BTreeMap::new();
    run.take_while(|op| {
        let table = op_table(op);
        *ready.entry(table).or_insert_with(|| set_ready(mapping, table) && !computed(mapping, table))
    })
    .count()
}

fn op_table(op: &RowOp) -> &str {
    match op {
        RowOp::Upsert { table, .. } | RowOp::Delete { table, .. } => table,
    }
}

/// One array parameter of a set statement.
#[derive(Debug, PartialEq)]
enum Array {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
}

impl Array {
    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Array::Text(values) => values,
            Array::Int(values) => values,
        }
    }
}

/// What a value of the row-by-row statement is.
#[derive(Clone, Debug)]
enum Leaf {
    /// The new row's key, cast to the key column's type.
    Key(String),
    /// Converted by Imago, bound as text and cast to its column's type.
    Cast(String),
    /// A parameter of a plan's expression, typed by its values.
    Param,
}

/// A set statement and its arrays.
#[derive(Debug, PartialEq)]
pub(crate) struct SetRendered {
    pub sql: String,
    arrays: Vec<Array>,
}

impl SetRendered {
    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.arrays.iter().map(Array::param).collect()
    }
}

/// Pushes the values `source` needs, in the order [`write_source`] writes them.
fn leaves_of(
    source: &Source,
    row: &Row,
    key_of: &mut dyn FnMut(&str) -> Result<i64, ConvertError>,
    out: &mut Vec<Value>,
) -> Result<(), ConvertError> {
    match source {
        Source::Sql { sql, params, transform } => {
            for (_, name) in sql_params(sql) {
                let param = params.get(&name).ok_or(ConvertError::NeedsDatabase { transform: *transform })?;
                leaves_of(param, row, key_of, out)?;
            }
            Ok(())
        }
        other => {
            out.push(evaluate(other, row, key_of)?);
            Ok(())
        }
    }
}

/// The key old row `key` has in a new table (`key_of(key, table)`): the old key, or the one
/// made for it.
pub(crate) type KeyOf<'a> = dyn Fn(i64, &str) -> Result<i64, ConvertError> + 'a;

/// Every new table's key is the old one.
#[cfg(test)]
fn same_keys(key: i64, _table: &str) -> Result<i64, ConvertError> {
    Ok(key)
}

/// The kinds of `source`'s values, in the order [`leaves_of`] pushes them.
fn kinds_of(source: &Source, column_type: Option<&str>, out: &mut Vec<Leaf>) {
    match source {
        Source::Sql { sql, params, .. } => {
            for (_, name) in sql_params(sql) {
                if let Some(param) = params.get(&name) {
                    kinds_of(param, None, out);
                }
            }
        }
        _ => out.push(match column_type {
            Some(t) => Leaf::Cast(t.to_string()),
            None => Leaf::Param,
        }),
    }
}

/// `source` as SQL over the arrays, each value taken from `slots` (its SQL, in order).
fn write_source(source: &Source, slots: &mut std::vec::IntoIter<String>, out: &mut String) {
    match source {
        Source::Sql { sql, params, .. } => {
            out.push('(');
            let mut at = 0;
            for (range, name) in sql_params(sql) {
                out.push_str(&sql[at..range.start]);
                if let Some(param) = params.get(&name) {
                    write_source(param, slots, out);
                }
                at = range.end;
            }
            out.push_str(&sql[at..]);
            out.push(')');
        }
        _ => out.push_str(&slots.next().unwrap_or_else(|| "NULL".to_string())),
    }
}

/// The upsert of `output`'s rows for `rows` (old key, old row; each key once) as one
/// statement; `None` when the rows' values do not make one (a parameter both integer and text
/// across rows). A value Imago cannot convert is the error the row-by-row program gives.
/// `Insert::New`: the rows are known to be new (a chunk of the copy), and the statement has no
/// `ON CONFLICT` clause (which doubles its cost); were one there after all, the statement
/// fails and the caller goes row by row.
pub(crate) fn upsert_set(
    live: &Live,
    target: Target,
    output: &Output,
    rows: &[(i64, &Row)],
    insert: Insert,
    keys: &KeyOf,
) -> Result<Option<SetRendered>, ConvertError> {
    let table = live.tables.get(&output.table);
    let type_of = |column: &str| table.map_or("text", |t| t.type_of(column)).to_string();
    let mut kinds = Vec::new();
    for (column, source) in &output.columns {
        if *column == output.key {
            kinds.push(Leaf::Key(type_of(column)));
        } else if matches!(source, Source::Sql { .. }) {
            kinds_of(source, None, &mut kinds);
        } else {
            kinds_of(source, Some(&type_of(column)), &mut kinds);
        }
    }
    // Leaf-major values: one column of the set per value of the row-by-row statement.
    let mut values: Vec<Vec<Value>> = kinds.iter().map(|_| Vec::with_capacity(rows.len())).collect();
    let mut leaves = Vec::with_capacity(kinds.len());
    for (key, row) in rows {
        leaves.clear();
        for (column, source) in &output.columns {
            if *column == output.key {
                leaves.push(Value::Int(keys(*key, &output.table)?));
            } else {
                leaves_of(source, row, &mut |t| keys(*key, t), &mut leaves)?;
            }
        }
        assert_eq!(leaves.len(), kinds.len(), "every row has the same values");
        for (column, value) in values.iter_mut().zip(leaves.drain(..)) {
            column.push(value);
        }
    }
    let mut arrays = Vec::new();
    let mut slots = Vec::with_capacity(kinds.len());
    let mut unnest = Vec::new();
    for (kind, column) in kinds.iter().zip(values) {
        let n = arrays.len() + 1;
        let (array, slot) = match kind {
            Leaf::Key(t) => {
                let keys = column.into_iter().map(|v| if let Value::Int(k) = v { Some(k) } else { None }).collect();
                (Array::Int(keys), format!("u.c{n}::{t}"))
            }
            Leaf::Cast(t) => (Array::Text(column.into_iter().map(text_of).collect()), format!("u.c{n}::{t}")),
            Leaf::Param => {
                let ints = column.iter().all(|v| matches!(v, Value::Int(_) | Value::Null));
                let texts = column.iter().all(|v| matches!(v, Value::Text(_) | Value::Null));
                match (ints, texts) {
                    // Every row's NULL: written out, as row by row.
                    (true, true) => {
                        slots.push("NULL".to_string());
                        continue;
                    }
                    (true, false) => {
                        let ints = column.into_iter().map(|v| if let Value::Int(i) = v { Some(i) } else { None });
                        (Array::Int(ints.collect()), format!("u.c{n}::bigint"))
                    }
                    (false, true) => (Array::Text(column.into_iter().map(text_of).collect()), format!("u.c{n}::text")),
                    (false, false) => return Ok(None),
                }
            }
        };
        unnest.push(match array {
            Array::Int(_) => format!("${n}::bigint[]"),
            Array::Text(_) => format!("${n}::text[]"),
        });
        arrays.push(array);
        slots.push(slot);
    }
    let mut slots = slots.into_iter();
    let mut names = Vec::with_capacity(output.columns.len());
    let mut exprs = Vec::with_capacity(output.columns.len());
    for (column, source) in &output.columns {
        names.push(ident(column));
        let mut expr = String::new();
        if *column == output.key {
            expr.push_str(&slots.next().unwrap_or_default());
        } else {
            write_source(source, &mut slots, &mut expr);
        }
        exprs.push(expr);
    }
    let aliases: Vec<String> = (1..=unnest.len()).map(|n| format!("c{n}")).collect();
    let updates: Vec<String> = output
        .columns
        .iter()
        .filter(|(c, _)| *c != output.key)
        .map(|(c, _)| format!("{0} = EXCLUDED.{0}", ident(c)))
        .collect();
    let on_conflict = match insert {
        Insert::New => String::new(),
        Insert::Upsert if updates.is_empty() => format!(" ON CONFLICT ({}) DO NOTHING", ident(&output.key)),
        Insert::Upsert => format!(" ON CONFLICT ({}) DO UPDATE SET {}", ident(&output.key), updates.join(", ")),
    };
    let sql = format!(
        "INSERT INTO {} ({}) SELECT {} FROM unnest({}) AS u({}){on_conflict}",
        live.qualified(&output.table, target),
        names.join(", "),
        exprs.join(", "),
        unnest.join(", "),
        aliases.join(", "),
    );
    Ok(Some(SetRendered { sql, arrays }))
}

fn text_of(value: Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::Int(i) => Some(i.to_string()),
        Value::Text(t) => Some(t),
    }
}

/// `output`'s rows for `rows` (old key, old row; each key once, none in the table yet) as a
/// `COPY … FROM STDIN` and its data in text format; `None` when a column is the plan's SQL.
pub(crate) fn copy_set(
    live: &Live,
    target: Target,
    output: &Output,
    rows: &[(i64, &Row)],
    keys: &KeyOf,
) -> Result<Option<(String, Vec<u8>)>, ConvertError> {
    if output.columns.iter().any(|(_, source)| matches!(source, Source::Sql { .. })) {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(rows.len() * 16 * output.columns.len());
    for (key, row) in rows {
        for (n, (column, source)) in output.columns.iter().enumerate() {
            if n > 0 {
                data.push(b'\t');
            }
            // A column copied as it is is written from the row (no copy of its text).
            let value = if *column == output.key {
                Cow::Owned(Value::Int(keys(*key, &output.table)?))
            } else if let Source::Column(c) = source {
                row.get(c).map_or(Cow::Owned(Value::Null), Cow::Borrowed)
            } else {
                Cow::Owned(evaluate(source, row, &mut |t| keys(*key, t))?)
            };
            match value.as_ref() {
                Value::Null => data.extend_from_slice(b"\\N"),
                Value::Int(i) => {
                    // Writing to a vector cannot fail.
                    let _ = write!(data, "{i}");
                }
                Value::Text(t) => copy_text(t, &mut data),
            }
        }
        data.push(b'\n');
    }
    let names: Vec<String> = output.columns.iter().map(|(c, _)| ident(c)).collect();
    let sql = format!("COPY {} ({}) FROM STDIN", live.qualified(&output.table, target), names.join(", "));
    Ok(Some((sql, data)))
}

/// `text` as a value of COPY's text format: backslash, newline, carriage return and tab
/// escaped (the rest as it is).
fn copy_text(text: &str, out: &mut Vec<u8>) {
    let bytes = text.as_bytes();
    let mut from = 0;
    for (at, byte) in bytes.iter().enumerate() {
        let escaped: &[u8] = match byte {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&bytes[from..at]);
        out.extend_from_slice(escaped);
        from = at + 1;
    }
    out.extend_from_slice(&bytes[from..]);
}

/// Whether a set's rows may already be in its new table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    /// They may: an upsert (`ON CONFLICT … DO UPDATE` of the output's own columns).
    Upsert,
    /// They are not: a chunk of the copy (keys past every key copied before, after a reset),
    /// or old rows staged for a comparison (each once, into a scratch copy emptied first).
    New,
}

/// A run of changes as sets: per old table, the keys to delete first and the rows to upsert
/// after (see the module's notes).
#[derive(Default)]
struct Run<'a> {
    deletes: Vec<i64>,
    upserts: BTreeMap<i64, &'a Row>,
}

/// (old table, old key, new table): where a generated key belongs.
type KeyAt = (String, i64, String);

/// The generated keys of a run's rows as a row by row run would leave them, and what changed
/// in the key map.
#[derive(Default)]
struct Made {
    /// Keys as the run leaves them (`None`: forgotten).
    now: BTreeMap<KeyAt, Option<i64>>,
    /// Keys the map held when the run began.
    before: BTreeMap<KeyAt, i64>,
    /// Per new table, the next key to make, if the run made any.
    next: BTreeMap<String, i64>,
    /// Per new table, every key a deleted row had (its row goes).
    gone: BTreeMap<String, Vec<i64>>,
}

/// Replays `ops` on the generated keys `now` as row by row would: an upsert of a row with no
/// key for a new table makes one (`make`), a delete forgets it (into `gone`, by new table).
/// Returns how many keys each new table was made.
fn replay_into(
    mapping: &Mapping,
    ops: &[RowOp],
    now: &mut BTreeMap<KeyAt, Option<i64>>,
    gone: &mut BTreeMap<String, Vec<i64>>,
    make: &mut dyn FnMut(&str) -> i64,
) -> BTreeMap<String, usize> {
    let mut made: BTreeMap<String, usize> = BTreeMap::new();
    for op in ops {
        let (table, key, upsert) = match op {
            RowOp::Upsert { table, key, .. } => (table, *key, true),
            RowOp::Delete { table, key } => (table, *key, false),
        };
        let Some(outputs) = mapping.outputs.get(table) else { continue };
        for target in outputs.iter().filter(|o| o.generated).map(|o| &o.table) {
            let at = (table.clone(), key, target.clone());
            match (upsert, now.get(&at).copied().flatten()) {
                (true, Some(_)) | (false, None) => {}
                (true, None) => {
                    now.insert(at, Some(make(target)));
                    *made.entry(target.clone()).or_default() += 1;
                }
                (false, Some(key)) => {
                    gone.entry(target.clone()).or_default().push(key);
                    now.insert(at, None);
                }
            }
        }
    }
    made
}

impl Program<'_> {
    /// Applies `ops` (a run [`set_run`] accepts) as sets. An error leaves the transaction to
    /// the caller: roll back (to a savepoint) and apply the run row by row, which names the
    /// change at fault. `Ok(false)`: the rows make no set (or, staging, a row has no generated
    /// key yet), nothing was done.
    pub async fn apply_set(&mut self, mapping: &Mapping, ops: &[RowOp], insert: Insert) -> Result<bool, ProgramError> {
        let mut runs: BTreeMap<&str, Run> = BTreeMap::new();
        for op in ops {
            let run = runs.entry(op_table(op)).or_default();
            match op {
                RowOp::Upsert { key, row, .. } => {
                    run.upserts.insert(*key, row);
                }
                RowOp::Delete { key, .. } => {
                    run.upserts.remove(key);
                    run.deletes.push(*key);
                }
            }
        }
        let Some(made) = self.make_keys(mapping, ops, &runs, insert).await? else {
            return Ok(false);
        };
        // Rendered before anything runs, so that rows that make no set change nothing.
        let mut rendered = Vec::new();
        let mut copies = Vec::new();
        let mut deletes: Vec<(String, Vec<i64>)> = Vec::new();
        let request_log = protocol::schema::request_log_output();
        for (table, run) in &runs {
            let outputs: &[Output] = if *table == REQUEST_LOG_TABLE {
                std::slice::from_ref(&request_log)
            } else {
                mapping.outputs.get(*table).map_or(&[], Vec::as_slice)
            };
            let rows: Vec<(i64, &Row)> = run.upserts.iter().map(|(k, r)| (*k, *r)).collect();
            let generated: Vec<&str> = outputs.iter().filter(|o| o.generated).map(|o| o.table.as_str()).collect();
            let keys = |key: i64, new_table: &str| -> Result<i64, ConvertError> {
                if !generated.contains(&new_table) {
                    return Ok(key);
                }
                let found = made.now.get(&(table.to_string(), key, new_table.to_string())).copied().flatten();
                found.ok_or(ConvertError::NeedsKeyMap { table: new_table.to_string() })
            };
            for output in outputs {
                let gone = if output.generated {
                    made.gone.get(&output.table).cloned().unwrap_or_default()
                } else {
                    run.deletes.clone()
                };
                if !gone.is_empty() {
                    let sql = format!(
                        "DELETE FROM {} WHERE {} = ANY($1::bigint[])",
                        self.live.qualified(&output.table, self.target),
                        ident(&output.key)
                    );
                    deletes.push((sql, gone));
                }
                if rows.is_empty() {
                    continue;
                }
                if insert == Insert::New {
                    if let Some(copy) = copy_set(self.live, self.target, output, &rows, &keys)? {
                        copies.push(copy);
                        continue;
                    }
                }
                match upsert_set(self.live, self.target, output, &rows, insert, &keys)? {
                    Some(set) => rendered.push(set),
                    None => return Ok(false),
                }
            }
        }
        // Rows of deleted old rows go (a generated table's once, whichever old table fed it).
        deletes.sort();
        deletes.dedup();
        for (sql, keys) in &deletes {
            let statement = self.statement(sql, None).await?;
            self.client.execute(&statement, &[keys]).await?;
        }
        if self.target == Target::Main {
            self.write_key_map(&made).await?;
        }
        for set in &rendered {
            let statement = self.statement(&set.sql, None).await?;
            self.client.execute(&statement, &set.params()).await?;
        }
        for (sql, data) in copies {
            // Prepared once per session (a round trip less for each chunk of the copy).
            let statement = self.statement(&sql, None).await?;
            let sink = self.client.copy_in::<_, bytes::Bytes>(&statement).await?;
            futures_util::pin_mut!(sink);
            sink.send(bytes::Bytes::from(data)).await?;
            sink.finish().await?;
        }
        Ok(true)
    }

    /// The run's generated keys: the key map read for its rows (one statement per old table;
    /// not for a chunk of the copy, whose rows the map cannot hold since the copy's reset), then
    /// the keys a row by row run would make, in the run's order. `None` while staging when a
    /// row has no key yet (staging makes none).
    ///
    /// The map is read by an unnamed statement, planned for each run: a prepared one keeps the
    /// plan made while the map was empty (an index scan on `src_table` alone), which reads the
    /// whole map once it holds a million rows (the benchmark's split slowed to a crawl).
    async fn make_keys(
        &mut self,
        mapping: &Mapping,
        ops: &[RowOp],
        runs: &BTreeMap<&str, Run<'_>>,
        insert: Insert,
    ) -> Result<Option<Made>, ProgramError> {
        let mut made = Made::default();
        let generated = |table: &str| -> Vec<String> {
            mapping
                .outputs
                .get(table)
                .map_or(Vec::new(), |outputs| outputs.iter().filter(|o| o.generated).map(|o| o.table.clone()).collect())
        };
        if runs.keys().all(|t| generated(t).is_empty()) {
            return Ok(Some(made));
        }
        let keys_table = self.live.imago(KEYS_TABLE);
        for (table, run) in runs {
            let targets = generated(table);
            if targets.is_empty() || (insert == Insert::New && self.target == Target::Main) {
                continue;
            }
            let mut src: Vec<i64> = run.deletes.iter().chain(run.upserts.keys()).copied().collect();
            src.sort_unstable();
            src.dedup();
            let sql = format!(
                "SELECT src_key, target, key FROM {keys_table} \
                 WHERE src_table = $1 AND src_key = ANY($2::bigint[]) AND target = ANY($3::text[])"
            );
            for row in self.client.query(sql.as_str(), &[&table.to_string(), &src, &targets]).await? {
                let (src_key, target, key): (i64, String, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
                made.before.insert((table.to_string(), src_key, target.clone()), key);
                made.now.insert((table.to_string(), src_key, target), Some(key));
            }
        }
        // How many keys each new table needs, in a first pass (the second makes them in the
        // same order): a table with a sequence of its own takes that many values of it at once.
        let (mut now, mut gone) = (made.now.clone(), BTreeMap::new());
        let needed = replay_into(mapping, ops, &mut now, &mut gone, &mut |_| 0);
        if needed.is_empty() {
            // Nothing to make: the first pass is the run's keys.
            made.now = now;
            made.gone = gone;
            return Ok(Some(made));
        }
        if self.target == Target::Staging {
            return Ok(None);
        }
        let mut keys: BTreeMap<String, std::vec::IntoIter<i64>> = BTreeMap::new();
        for (target, n) in &needed {
            let values: Vec<i64> = match self.live.tables.get(target).and_then(|t| t.key_sequence.clone()) {
                Some(sequence) => {
                    let rows = self
                        .client
                        .query(
                            "SELECT nextval($1::text::regclass) AS k FROM generate_series(1, $2::bigint) ORDER BY k",
                            &[&sequence, &(*n as i64)],
                        )
                        .await?;
                    rows.iter().map(|r| r.try_get::<_, i64>(0)).collect::<Result<_, _>>()?
                }
                None => {
                    let first = self.next_key(target).await?;
                    made.next.insert(target.clone(), first + *n as i64);
                    (first..first + *n as i64).collect()
                }
            };
            assert_eq!(values.len(), *n, "a key for each row that needs one");
            keys.insert(target.clone(), values.into_iter());
        }
        let (mut now, mut gone) = (made.now.clone(), BTreeMap::new());
        replay_into(mapping, ops, &mut now, &mut gone, &mut |target| {
            keys.get_mut(target).and_then(Iterator::next).unwrap_or_default()
        });
        made.now = now;
        made.gone = gone;
        Ok(Some(made))
    }

    /// The next key to make for new table `target` (one without a sequence of its own): above
    /// every key it holds and every key
    /// made for it before (as the row by row program makes them).
    async fn next_key(&mut self, target: &str) -> Result<i64, ProgramError> {
        let next = self.live.imago(KEY_NEXT_TABLE);
        let key = self.live.tables.get(target).map_or("id", |t| t.key.as_str());
        let sql = format!(
            "SELECT greatest(coalesce((SELECT max({key})::bigint FROM {t}), 0) + 1, \
                             coalesce((SELECT next FROM {next} WHERE target = $1), 1))",
            key = ident(key),
            t = self.live.qualified(target, Target::Main),
        );
        let statement = self.statement(&sql, None).await?;
        let row = self.client.query_one(&statement, &[&target]).await?;
        Ok(row.try_get::<_, i64>(0)?)
    }

    /// The run's changes to the key map: forgotten keys deleted, made ones inserted, and each
    /// new table's next key moved past them; three statements at most.
    async fn write_key_map(&mut self, made: &Made) -> Result<(), ProgramError> {
        let keys_table = self.live.imago(KEYS_TABLE);
        let (mut forget_tables, mut forget_keys, mut forget_targets) = (Vec::new(), Vec::new(), Vec::new());
        let (mut keep_tables, mut keep_keys, mut keep_targets, mut keep_made) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (at, now) in &made.now {
            let before = made.before.get(at).copied();
            if before == *now {
                continue;
            }
            let (table, src_key, target) = at;
            if before.is_some() {
                forget_tables.push(table.clone());
                forget_keys.push(*src_key);
                forget_targets.push(target.clone());
            }
            if let Some(key) = now {
                keep_tables.push(table.clone());
                keep_keys.push(*src_key);
                keep_targets.push(target.clone());
                keep_made.push(*key);
            }
        }
        if !forget_tables.is_empty() {
            let sql = format!(
                "DELETE FROM {keys_table} k USING unnest($1::text[], $2::bigint[], $3::text[]) AS u(t, s, g) \
                 WHERE k.src_table = u.t AND k.src_key = u.s AND k.target = u.g"
            );
            // Unnamed, planned for each run (see `make_keys`).
            self.client.execute(sql.as_str(), &[&forget_tables, &forget_keys, &forget_targets]).await?;
        }
        if !keep_tables.is_empty() {
            let sql = format!(
                "INSERT INTO {keys_table} (src_table, src_key, target, key) \
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[])"
            );
            let statement = self.statement(&sql, None).await?;
            self.client.execute(&statement, &[&keep_tables, &keep_keys, &keep_targets, &keep_made]).await?;
        }
        if !made.next.is_empty() {
            let (targets, nexts): (Vec<String>, Vec<i64>) = made.next.iter().map(|(t, n)| (t.clone(), *n)).unzip();
            let sql = format!(
                "INSERT INTO {} (target, next) SELECT * FROM unnest($1::text[], $2::bigint[]) \
                 ON CONFLICT (target) DO UPDATE SET next = EXCLUDED.next",
                self.live.imago(KEY_NEXT_TABLE)
            );
            let statement = self.statement(&sql, None).await?;
            self.client.execute(&statement, &[&targets, &nexts]).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::program::LiveTable;
    use protocol::schema::{ColumnType, Schema, TableSchema, Transform};

    fn mapping() -> Mapping {
        let mut tables = BTreeMap::new();
        let columns = ["id", "name", "age"].into_iter().map(String::from).collect();
        tables.insert("users".to_string(), TableSchema { key: "id".into(), columns });
        let transforms = vec![
            Transform::ChangeType {
                table: "users".into(),
                column: "age".into(),
                to: ColumnType::Int,
                expression: None,
            },
            Transform::AddColumn {
                table: "users".into(),
                column: "handle".into(),
                default: Value::Null,
                expression: Some("lower(:name) || '-' || :id || coalesce(:age, 0)".into()),
            },
        ];
        Mapping::compile(&Schema { tables }, &transforms).unwrap()
    }

    fn live() -> Live {
        let columns = [("id", "integer"), ("name", "text"), ("age", "smallint"), ("handle", "text")];
        let table = LiveTable {
            key_sequence: None,
            key: "id".into(),
            columns: columns.iter().map(|(c, t)| (c.to_string(), t.to_string(), 0)).collect(),
        };
        Live { schema: "\"app\"".into(), tables: [("users".to_string(), table)].into() }
    }

    fn row(values: &[(&str, Value)]) -> Row {
        values.iter().map(|(c, v)| (c.to_string(), v.clone())).collect()
    }

    #[test]
    fn a_set_binds_one_array_per_value_and_writes_a_parameter_null_in_every_row_out() {
        let mapping = mapping();
        let output = &mapping.outputs["users"][0];
        let ann =
            row(&[("id", Value::Int(7)), ("name", Value::Text("Ann".into())), ("age", Value::Text(" 41".into()))]);
        let bob = row(&[("id", Value::Int(8)), ("name", Value::Text("Bob".into()))]);
        let set = upsert_set(&live(), Target::Main, output, &[(7, &ann), (8, &bob)], Insert::Upsert, &same_keys)
            .unwrap()
            .unwrap();
        assert_eq!(
            set.sql,
            "INSERT INTO \"app\".\"users\" (\"id\", \"name\", \"age\", \"handle\") \
             SELECT u.c1::integer, u.c2::text, u.c3::smallint, (lower(u.c4::text) || '-' || u.c5::bigint || coalesce(u.c6::bigint, 0)) \
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[]) AS u(c1, c2, c3, c4, c5, c6) \
             ON CONFLICT (\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"age\" = EXCLUDED.\"age\", \"handle\" = EXCLUDED.\"handle\""
        );
        assert_eq!(set.arrays[0], Array::Int(vec![Some(7), Some(8)]));
        assert_eq!(set.arrays[2], Array::Text(vec![Some("41".into()), None]), "converted by Imago, then bound as text");
        assert_eq!(set.arrays[5], Array::Int(vec![Some(41), None]), "a parameter typed by its values");

        let set = upsert_set(&live(), Target::Main, output, &[(8, &bob)], Insert::New, &same_keys).unwrap().unwrap();
        assert!(set.sql.contains("coalesce(NULL, 0)"), "a parameter NULL in every row is written out: {}", set.sql);
        assert!(set.sql.ends_with("AS u(c1, c2, c3, c4, c5)"), "rows known new: no ON CONFLICT: {}", set.sql);
        assert_eq!(set.arrays.len(), 5);
    }

    #[test]
    fn a_copy_writes_text_format_escaped_and_only_where_imago_computes_every_column() {
        let mut tables = BTreeMap::new();
        let columns = ["id", "name", "age"].into_iter().map(String::from).collect();
        tables.insert("users".to_string(), TableSchema { key: "id".into(), columns });
        let transforms = vec![Transform::ChangeType {
            table: "users".into(),
            column: "age".into(),
            to: ColumnType::Int,
            expression: None,
        }];
        let plain = Mapping::compile(&Schema { tables }, &transforms).unwrap();
        let output = &plain.outputs["users"][0];
        let odd = row(&[("name", Value::Text("a\tb\\c\nd\re \\N".into())), ("age", Value::Text(" 7".into()))]);
        let none = row(&[]);
        let (sql, data) =
            copy_set(&live(), Target::Staging, output, &[(1, &odd), (2, &none)], &same_keys).unwrap().unwrap();
        assert_eq!(sql, "COPY pg_temp.\"users\" (\"id\", \"name\", \"age\") FROM STDIN");
        assert_eq!(String::from_utf8(data).unwrap(), "1\ta\\tb\\\\c\\nd\\re \\\\N\t7\n2\t\\N\t\\N\n");
        let bad = row(&[("age", Value::Text("old".into()))]);
        assert!(copy_set(&live(), Target::Main, output, &[(3, &bad)], &same_keys).is_err(), "as row by row: refused");
        let computed = &mapping().outputs["users"][0];
        assert_eq!(copy_set(&live(), Target::Main, computed, &[(1, &odd)], &same_keys).unwrap(), None);
    }

    #[test]
    fn values_of_both_kinds_make_no_set_and_a_value_that_does_not_convert_is_an_error() {
        let mapping = mapping();
        let output = &mapping.outputs["users"][0];
        let ann = row(&[("id", Value::Int(7)), ("name", Value::Text("Ann".into()))]);
        let bob = row(&[("id", Value::Int(8)), ("name", Value::Int(3))]);
        assert_eq!(
            upsert_set(&live(), Target::Main, output, &[(7, &ann), (8, &bob)], Insert::Upsert, &same_keys).unwrap(),
            None
        );
        let bad = row(&[("id", Value::Int(9)), ("age", Value::Text("old".into()))]);
        assert!(upsert_set(&live(), Target::Main, output, &[(7, &ann), (9, &bad)], Insert::Upsert, &same_keys).is_err());
    }

    #[test]
    fn a_run_stops_at_a_merge_or_at_another_table_beside_a_computed_one() {
        let mut mapping = mapping();
        let upsert = |table: &str, key| RowOp::Upsert { table: table.into(), key, row: Row::new() };
        let ops = vec![upsert("users", 1), upsert("users", 2), upsert("gone", 2), upsert(REQUEST_LOG_TABLE, 3)];
        assert_eq!(set_run(&mapping, &ops), 2, "`users` has a computed column: a run of its own");
        assert_eq!(set_run(&mapping, &ops[2..]), 2);
        let plain = Mapping::compile(
            &Schema {
                tables: mapping
                    .outputs
                    .keys()
                    .map(|t| {
                        (
                            t.clone(),
                            TableSchema {
                                key: "id".into(),
                                columns: ["id", "name"].into_iter().map(String::from).collect(),
                            },
                        )
                    })
                    .collect(),
            },
            &[],
        )
        .unwrap();
        assert_eq!(set_run(&plain, &ops), 4, "tables Imago computes alone go together");
        mapping.outputs.get_mut("users").unwrap()[0].merged = true;
        assert_eq!(set_run(&mapping, &ops), 0);
        assert_eq!(set_run(&mapping, &ops[2..]), 2);
        assert_eq!(set_run(&mapping, &[]), 0);
    }
}
