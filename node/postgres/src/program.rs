//! The plan's mapping run by the new PostgreSQL database: an old-schema change becomes SQL
//! statements on the new tables (a port of the SQLite adapter's program).
//!
//! Values Imago converts itself (columns, constants, `int` ↔ `text`, keys) are bound as text
//! parameters and cast to the live column's type (`$n::<type>`), so a table the operator made
//! with types of their own takes them. The plan's SQL expressions are written into the
//! statement, each `:name` replaced by a parameter: an integer as `$n::bigint`, text as
//! `$n::text`, NULL as `NULL` (a plan casts text that means something else, `:price::numeric`).
//! Generated keys and merge marks are kept in the key map `imago_keys`, written in the batch's
//! transaction.

use crate::sql::{describe, ident};
use protocol::schema::{
    evaluate, sql_params, ConvertError, Custom, Mapping, Output, Row, RowOp, Source, Value, REQUEST_LOG_TABLE,
};
use std::collections::BTreeMap;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

/// The key map: old row (table, key) and new table → the key the new database made for it.
pub const KEYS_TABLE: &str = "imago_keys";
/// The next key to make per new table (keys are never made twice, even after deletes).
pub const KEY_NEXT_TABLE: &str = "imago_key_next";

/// Most prepared statements a connection keeps (one per output, operation and kind of value of
/// an expression's parameters, and Imago's own); past it they are all forgotten and prepared
/// again as needed.
pub const STATEMENTS_MAX: usize = 1024;

/// The key map's mark of an old row the plan's own statements have seen (`insert` ran).
const SEEN_BY_STATEMENTS: &str = "";

/// Where a change lands: the new tables, or the scratch copy that shadows them while the
/// universes are compared (temporary tables of the same names: PostgreSQL looks relation names
/// up in `pg_temp` first, so a plan's expression that reads a new table reads the scratch one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Main,
    Staging,
}

/// Why a change could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// Imago's own conversion refused a value, or a generated key is unknown while staging.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// The database refused a statement.
    #[error("{}", describe(.0))]
    Pg(#[from] tokio_postgres::Error),
}

/// A new table as it is in the database: its key and its columns with their types.
#[derive(Clone, Debug)]
pub struct LiveTable {
    pub key: String,
    /// (column, type as SQL, type's oid), in the plan's order.
    pub columns: Vec<(String, String, u32)>,
    /// The sequence of the key (`serial` or identity), qualified, if it has one: generated keys
    /// for the table are its values.
    pub key_sequence: Option<String>,
}

impl LiveTable {
    pub(crate) fn type_of(&self, column: &str) -> &str {
        self.columns.iter().find(|(c, _, _)| c == column).map_or("text", |(_, t, _)| t.as_str())
    }
}

/// The new tables (the plan's and the request log) in the schema they live in.
#[derive(Clone, Debug)]
pub struct Live {
    /// The schema holding the new tables and Imago's, quoted.
    pub schema: String,
    pub tables: BTreeMap<String, LiveTable>,
}

impl Live {
    /// `table` qualified for `target` (the scratch copy lives in `pg_temp`).
    pub fn qualified(&self, table: &str, target: Target) -> String {
        match target {
            Target::Main => format!("{}.{}", self.schema, ident(table)),
            Target::Staging => format!("pg_temp.{}", ident(table)),
        }
    }

    /// One of Imago's tables (always the real one).
    pub fn imago(&self, table: &str) -> String {
        format!("{}.{}", self.schema, ident(table))
    }
}

/// Prepared statements, by target and text. The scratch copy's are forgotten when it is
/// dropped (a statement prepared over a temporary table would otherwise be parsed again over
/// the real one).
#[derive(Default)]
pub struct Cache {
    statements: BTreeMap<(Target, String), Statement>,
}

impl Cache {
    /// Forgets the statements prepared for the scratch copy.
    pub fn forget_staging(&mut self) {
        self.statements.retain(|(target, _), _| *target == Target::Main);
    }
}

/// One run of the program: the connection, its statements, the live tables, where changes land.
pub struct Program<'a> {
    pub client: &'a Client,
    pub cache: &'a mut Cache,
    pub live: &'a Live,
    pub target: Target,
}

/// An SQL fragment and the values of its `$n` parameters (all declared `text`), in order.
#[derive(Default)]
struct Rendered {
    sql: String,
    values: Vec<Option<String>>,
}

impl Rendered {
    /// A parameter holding `value` as text: `$n`.
    fn param(&mut self, value: &Value) -> String {
        self.values.push(match value {
            Value::Null => None,
            Value::Int(i) => Some(i.to_string()),
            Value::Text(t) => Some(t.clone()),
        });
        format!("${}", self.values.len())
    }
}

/// The key map's tables (in the new database, with the data they describe).
pub fn key_map_ddl(live: &Live) -> String {
    let keys = live.imago(KEYS_TABLE);
    let next = live.imago(KEY_NEXT_TABLE);
    format!(
        "CREATE TABLE IF NOT EXISTS {keys} (\
           src_table text NOT NULL, src_key bigint NOT NULL, target text NOT NULL, key bigint NOT NULL, \
           PRIMARY KEY (src_table, src_key, target));\n\
         CREATE INDEX IF NOT EXISTS imago_keys_by_target ON {keys} (target, key);\n\
         CREATE TABLE IF NOT EXISTS {next} (target text PRIMARY KEY, next bigint NOT NULL);"
    )
}

/// `source` as SQL inside a plan's expression: an expression written out (its `:name`s
/// replaced), anything else evaluated here and bound with the type of its value.
fn render(
    source: &Source,
    row: &Row,
    key_of: &mut dyn FnMut(&str) -> Result<i64, ConvertError>,
    out: &mut Rendered,
) -> Result<(), ConvertError> {
    match source {
        Source::Sql { sql, params, transform } => {
            out.sql.push('(');
            let mut at = 0;
            for (range, name) in sql_params(sql) {
                out.sql.push_str(&sql[at..range.start]);
                // Every parameter is bound when the plan compiles; one that is not is refused.
                let param = params.get(&name).ok_or(ConvertError::NeedsDatabase { transform: *transform })?;
                render(param, row, key_of, out)?;
                at = range.end;
            }
            out.sql.push_str(&sql[at..]);
            out.sql.push(')');
        }
        other => {
            let value = evaluate(other, row, key_of)?;
            let sql = match &value {
                Value::Null => "NULL".to_string(),
                Value::Int(_) => format!("{}::bigint", out.param(&value)),
                Value::Text(_) => format!("{}::text", out.param(&value)),
            };
            out.sql.push_str(&sql);
        }
    }
    Ok(())
}

/// A column's value: an expression as [`render`] writes it (the database casts its result on
/// assignment), anything else bound as text and cast to the column's type.
fn render_column(
    source: &Source,
    row: &Row,
    column_type: &str,
    key_of: &mut dyn FnMut(&str) -> Result<i64, ConvertError>,
    out: &mut Rendered,
) -> Result<(), ConvertError> {
    if matches!(source, Source::Sql { .. }) {
        return render(source, row, key_of, out);
    }
    let value = evaluate(source, row, key_of)?;
    let param = out.param(&value);
    out.sql.push_str(&format!("{param}::{column_type}"));
    Ok(())
}

/// One of the plan's statements written out, its `:name`s replaced by parameters bound to the
/// old row's values (no key map: a statement sees the old row only).
fn render_statement(statement: &Source, row: &Row) -> Result<Rendered, ConvertError> {
    let Source::Sql { sql, params, transform } = statement else {
        // A statement is compiled as SQL; anything else is not one of the plan's statements.
        return Err(ConvertError::NeedsDatabase { transform: 0 });
    };
    let mut rendered = Rendered::default();
    let mut no_keys = |t: &str| Err(ConvertError::NeedsKeyMap { table: t.to_string() });
    let mut at = 0;
    for (range, name) in sql_params(sql) {
        rendered.sql.push_str(&sql[at..range.start]);
        let param = params.get(&name).ok_or(ConvertError::NeedsDatabase { transform: *transform })?;
        render(param, row, &mut no_keys, &mut rendered)?;
        at = range.end;
    }
    rendered.sql.push_str(&sql[at..]);
    Ok(rendered)
}

/// The upsert of `output`'s row `new_key`: `INSERT … ON CONFLICT (key) DO UPDATE` of the
/// output's own columns (a merged row keeps the other tables' columns).
fn upsert_sql(
    live: &Live,
    target: Target,
    output: &Output,
    new_key: i64,
    row: &Row,
    key_of: &mut dyn FnMut(&str) -> Result<i64, ConvertError>,
) -> Result<Rendered, ConvertError> {
    let table = live.tables.get(&output.table);
    let type_of = |column: &str| table.map_or("text", |t| t.type_of(column)).to_string();
    let mut rendered = Rendered::default();
    let mut names = Vec::with_capacity(output.columns.len());
    let mut exprs = Vec::with_capacity(output.columns.len());
    for (column, source) in &output.columns {
        names.push(ident(column));
        let start = rendered.sql.len();
        if *column == output.key {
            let param = rendered.param(&Value::Int(new_key));
            rendered.sql.push_str(&format!("{param}::{}", type_of(column)));
        } else {
            render_column(source, row, &type_of(column), key_of, &mut rendered)?;
        }
        exprs.push(rendered.sql[start..].to_string());
    }
    let updates: Vec<String> = output
        .columns
        .iter()
        .filter(|(c, _)| *c != output.key)
        .map(|(c, _)| format!("{0} = EXCLUDED.{0}", ident(c)))
        .collect();
    let on_conflict =
        if updates.is_empty() { "DO NOTHING".to_string() } else { format!("DO UPDATE SET {}", updates.join(", ")) };
    let sql = format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) {on_conflict}",
        live.qualified(&output.table, target),
        names.join(", "),
        exprs.join(", "),
        ident(&output.key),
    );
    Ok(Rendered { sql, values: rendered.values })
}

/// Prepares (without running) an insert of every SQL expression of the plan into its column,
/// and every statement of the escape hatch, every value NULL, so that an expression the
/// database rejects (its syntax, a table it names, its type against its column's) is found
/// when the store opens: the transform's index and the database's message.
pub async fn check(client: &Client, live: &Live, mapping: &Mapping) -> Result<(), (usize, String)> {
    for custom in mapping.custom.values() {
        for statement in [&custom.insert, &custom.update, &custom.delete] {
            let Source::Sql { transform, .. } = statement else { continue };
            let rendered = render_statement(statement, &Row::new()).map_err(|e| (*transform, e.to_string()))?;
            let types = vec![Type::TEXT; rendered.values.len()];
            if let Err(e) = client.prepare_typed(&rendered.sql, &types).await {
                return Err((*transform, describe(&e)));
            }
        }
    }
    for output in mapping.outputs.values().flatten() {
        // Each expression into its column alone, so an error names the transform that wrote it.
        for (column, source) in &output.columns {
            let Source::Sql { transform, .. } = source else { continue };
            let mut rendered = Rendered::default();
            let mut key_of = |_: &str| Ok(0);
            render(source, &Row::new(), &mut key_of, &mut rendered).map_err(|e| (*transform, e.to_string()))?;
            let sql = format!(
                "INSERT INTO {} ({}) VALUES ({})",
                live.qualified(&output.table, Target::Main),
                ident(column),
                rendered.sql
            );
            let types = vec![Type::TEXT; rendered.values.len()];
            if let Err(e) = client.prepare_typed(&sql, &types).await {
                return Err((*transform, describe(&e)));
            }
        }
    }
    Ok(())
}

impl Program<'_> {
    /// The statement for `sql`, prepared once per connection (every parameter `text` when
    /// `text_params` is given, else as the server infers them).
    pub(crate) async fn statement(
        &mut self,
        sql: &str,
        text_params: Option<usize>,
    ) -> Result<Statement, tokio_postgres::Error> {
        let key = (self.target, sql.to_string());
        if let Some(found) = self.cache.statements.get(&key) {
            return Ok(found.clone());
        }
        let statement = match text_params {
            Some(n) => self.client.prepare_typed(sql, &vec![Type::TEXT; n]).await?,
            None => self.client.prepare(sql).await?,
        };
        if self.cache.statements.len() >= STATEMENTS_MAX {
            self.cache.statements.clear();
        }
        self.cache.statements.insert(key, statement.clone());
        Ok(statement)
    }

    /// Runs a rendered statement.
    async fn run(&mut self, rendered: &Rendered) -> Result<u64, ProgramError> {
        let statement = self.statement(&rendered.sql, Some(rendered.values.len())).await?;
        let params: Vec<&(dyn ToSql + Sync)> = rendered.values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        Ok(self.client.execute(&statement, &params).await?)
    }

    /// Runs `sql` with `params`, types inferred.
    async fn exec(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, ProgramError> {
        let statement = self.statement(sql, None).await?;
        Ok(self.client.execute(&statement, params).await?)
    }

    /// The first column of the first row `sql` returns, if any.
    async fn query_i64(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<i64>, ProgramError> {
        let statement = self.statement(sql, None).await?;
        match self.client.query_opt(&statement, params).await? {
            Some(row) => Ok(row.try_get::<_, Option<i64>>(0)?),
            None => Ok(None),
        }
    }

    /// Applies one old-schema change to the target.
    pub async fn apply(&mut self, mapping: &Mapping, op: &RowOp) -> Result<(), ProgramError> {
        let (table, key) = match op {
            RowOp::Upsert { table, key, .. } | RowOp::Delete { table, key } => (table.as_str(), *key),
        };
        if table == REQUEST_LOG_TABLE {
            // Carried as it is (see `REQUEST_LOG_TABLE`).
            let output = protocol::schema::request_log_output();
            return match op {
                RowOp::Upsert { row, .. } => self.upsert(&[], &output, key, row).await,
                RowOp::Delete { .. } => self.delete_row(&output, key).await,
            };
        }
        if let Some(custom) = mapping.custom.get(table) {
            return self.apply_custom(custom, table, key, op).await;
        }
        let Some(outputs) = mapping.outputs.get(table) else {
            return Ok(());
        };
        match op {
            RowOp::Upsert { row, .. } => {
                // Every generated key the row has, made (or looked up) first.
                let mut keys: Vec<(String, i64)> = Vec::new();
                for output in outputs.iter().filter(|o| o.generated) {
                    let made = self.generated(table, key, &output.table).await?;
                    keys.push((output.table.clone(), made));
                }
                for output in outputs {
                    self.upsert(&keys, output, key, row).await?;
                    if output.merged && self.target == Target::Main {
                        let sql = format!(
                            "INSERT INTO {} (src_table, src_key, target, key) VALUES ($1, $2, $3, $2) ON CONFLICT DO NOTHING",
                            self.live.imago(KEYS_TABLE)
                        );
                        self.exec(&sql, &[&table, &key, &output.table]).await?;
                    }
                }
            }
            RowOp::Delete { .. } => {
                for output in outputs {
                    if output.merged {
                        self.delete_merged(output, table, key).await?;
                        continue;
                    }
                    let new_key =
                        if output.generated { self.forget(table, key, &output.table).await? } else { Some(key) };
                    if let Some(new_key) = new_key {
                        self.delete_row(output, new_key).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Upserts `output`'s row for old row `key`, `keys` holding the row's generated keys.
    async fn upsert(
        &mut self,
        keys: &[(String, i64)],
        output: &Output,
        key: i64,
        row: &Row,
    ) -> Result<(), ProgramError> {
        let mut key_of = |t: &str| Ok(keys.iter().find(|(k, _)| k == t).map_or(key, |(_, made)| *made));
        let new_key = key_of(&output.table)?;
        let rendered = upsert_sql(self.live, self.target, output, new_key, row, &mut key_of)?;
        self.run(&rendered).await?;
        Ok(())
    }

    /// The escape hatch: the plan's statements for an old table's row. `insert` for a row not
    /// seen yet, `update` for one seen, `delete` when it goes (it sees the key only). Staging
    /// runs `insert` into the scratch copy.
    async fn apply_custom(&mut self, custom: &Custom, table: &str, key: i64, op: &RowOp) -> Result<(), ProgramError> {
        let keys = self.live.imago(KEYS_TABLE);
        let seen = if self.target == Target::Main {
            let sql = format!("SELECT 1::bigint FROM {keys} WHERE src_table = $1 AND src_key = $2 AND target = $3");
            self.query_i64(&sql, &[&table, &key, &SEEN_BY_STATEMENTS]).await?.is_some()
        } else {
            false
        };
        match op {
            RowOp::Upsert { row, .. } => {
                let statement = if seen { &custom.update } else { &custom.insert };
                let rendered = render_statement(statement, row)?;
                self.run(&rendered).await?;
                if !seen && self.target == Target::Main {
                    let sql = format!(
                        "INSERT INTO {keys} (src_table, src_key, target, key) VALUES ($1, $2, $3, $2) ON CONFLICT DO NOTHING"
                    );
                    self.exec(&sql, &[&table, &key, &SEEN_BY_STATEMENTS]).await?;
                }
            }
            RowOp::Delete { .. } if seen => {
                // A deleted row as the `delete` statement sees it: its key, every other column NULL.
                let key_only: Row = [(custom.old_key.clone(), Value::Int(key))].into();
                let rendered = render_statement(&custom.delete, &key_only)?;
                self.run(&rendered).await?;
                let sql = format!("DELETE FROM {keys} WHERE src_table = $1 AND src_key = $2 AND target = $3");
                self.exec(&sql, &[&table, &key, &SEEN_BY_STATEMENTS]).await?;
            }
            RowOp::Delete { .. } => {}
        }
        Ok(())
    }

    /// An old table's row of a merged table goes: its columns are emptied, and the row goes too
    /// unless another old table still has it (the key map marks who has which merged row).
    async fn delete_merged(&mut self, output: &Output, table: &str, key: i64) -> Result<(), ProgramError> {
        let keys = self.live.imago(KEYS_TABLE);
        if self.target == Target::Main {
            let sql = format!("DELETE FROM {keys} WHERE src_table = $1 AND src_key = $2 AND target = $3");
            self.exec(&sql, &[&table, &key, &output.table]).await?;
        }
        let sql = format!("SELECT 1::bigint FROM {keys} WHERE target = $1 AND key = $2 AND src_table <> $3 LIMIT 1");
        let others = self.query_i64(&sql, &[&output.table, &key, &table]).await?;
        if others.is_none() {
            return self.delete_row(output, key).await;
        }
        let own: Vec<String> = output
            .columns
            .iter()
            .filter(|(c, _)| *c != output.key)
            .map(|(c, _)| format!("{} = NULL", ident(c)))
            .collect();
        if !own.is_empty() {
            let sql = format!(
                "UPDATE {} SET {} WHERE {} = $1::bigint",
                self.live.qualified(&output.table, self.target),
                own.join(", "),
                ident(&output.key)
            );
            self.exec(&sql, &[&key]).await?;
        }
        Ok(())
    }

    async fn delete_row(&mut self, output: &Output, key: i64) -> Result<(), ProgramError> {
        let sql = format!(
            "DELETE FROM {} WHERE {} = $1::bigint",
            self.live.qualified(&output.table, self.target),
            ident(&output.key)
        );
        self.exec(&sql, &[&key]).await?;
        Ok(())
    }

    /// The generated key of old row `(table, key)` in `new_table`: from the key map, or made now
    /// (above every key the table holds and every key made for it before) and kept. Staging only
    /// looks up.
    async fn generated(&mut self, table: &str, key: i64, new_table: &str) -> Result<i64, ProgramError> {
        let keys = self.live.imago(KEYS_TABLE);
        let next = self.live.imago(KEY_NEXT_TABLE);
        let sql = format!("SELECT key FROM {keys} WHERE src_table = $1 AND src_key = $2 AND target = $3");
        if let Some(found) = self.query_i64(&sql, &[&table, &key, &new_table]).await? {
            return Ok(found);
        }
        if self.target == Target::Staging {
            return Err(ConvertError::NeedsKeyMap { table: new_table.to_string() }.into());
        }
        if let Some(sequence) = self.live.tables.get(new_table).and_then(|t| t.key_sequence.clone()) {
            let made = self
                .query_i64("SELECT nextval($1::text::regclass)", &[&sequence])
                .await?
                .ok_or(ConvertError::NeedsKeyMap { table: new_table.to_string() })?;
            let sql = format!("INSERT INTO {keys} (src_table, src_key, target, key) VALUES ($1, $2, $3, $4)");
            self.exec(&sql, &[&table, &key, &new_table, &made]).await?;
            return Ok(made);
        }
        let new_key = self.live.tables.get(new_table).map_or("id", |t| t.key.as_str());
        let sql = format!(
            "SELECT greatest(coalesce((SELECT max({key})::bigint FROM {t}), 0) + 1, \
                             coalesce((SELECT next FROM {next} WHERE target = $1), 1))",
            key = ident(new_key),
            t = self.live.qualified(new_table, Target::Main),
        );
        let made = self
            .query_i64(&sql, &[&new_table])
            .await?
            .ok_or(ConvertError::NeedsKeyMap { table: new_table.to_string() })?;
        let sql = format!(
            "INSERT INTO {next} (target, next) VALUES ($1, $2) ON CONFLICT (target) DO UPDATE SET next = EXCLUDED.next"
        );
        self.exec(&sql, &[&new_table, &(made + 1)]).await?;
        let sql = format!("INSERT INTO {keys} (src_table, src_key, target, key) VALUES ($1, $2, $3, $4)");
        self.exec(&sql, &[&table, &key, &new_table, &made]).await?;
        Ok(made)
    }

    /// Forgets the generated key of old row `(table, key)` in `new_table` (staging: looks it up).
    async fn forget(&mut self, table: &str, key: i64, new_table: &str) -> Result<Option<i64>, ProgramError> {
        let keys = self.live.imago(KEYS_TABLE);
        let sql = format!("SELECT key FROM {keys} WHERE src_table = $1 AND src_key = $2 AND target = $3");
        let found = self.query_i64(&sql, &[&table, &key, &new_table]).await?;
        if found.is_some() && self.target == Target::Main {
            let sql = format!("DELETE FROM {keys} WHERE src_table = $1 AND src_key = $2 AND target = $3");
            self.exec(&sql, &[&table, &key, &new_table]).await?;
        }
        Ok(found)
    }
}

/// The SQL types of the old tables' columns, by table and column, as the old database has them
/// (`format_type`), built-in types only: a type the old database made (an enum, a domain) may
/// not exist in the new one.
pub type LiveTypes = BTreeMap<String, BTreeMap<String, String>>;

/// The type a new table's column gets when Imago makes the table: `bigint` for its key and for
/// a column every source of which is an integer (a key, a conversion to `int`, an integer
/// constant); the old column's own type (`old`) for a column copied as it is (renamed or not),
/// where every source agrees; `text` for any other (PostgreSQL needs a type; the plan's schema
/// has none).
pub fn column_types(mapping: &Mapping, old: &LiveTypes) -> BTreeMap<String, BTreeMap<String, String>> {
    let type_of = |table: &str, column: &str, key: &str, source: &Source| -> String {
        match source {
            _ if column == key => "bigint".to_string(),
            Source::KeyOf(_) | Source::Convert(_, protocol::schema::ColumnType::Int) | Source::Const(Value::Int(_)) => {
                "bigint".to_string()
            }
            Source::Column(c) => old.get(table).and_then(|t| t.get(c)).cloned().unwrap_or_else(|| "text".to_string()),
            _ => "text".to_string(),
        }
    };
    let mut types: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (old_table, outputs) in &mapping.outputs {
        for output in outputs {
            let table = types.entry(output.table.clone()).or_default();
            for (column, source) in &output.columns {
                let here = type_of(old_table, column, &output.key, source);
                // Sources that disagree (a merge) meet in `text`.
                let entry = table.entry(column.clone()).or_insert_with(|| here.clone());
                if *entry != here {
                    *entry = "text".to_string();
                }
            }
        }
    }
    for (name, table) in mapping.custom.values().flat_map(|c| c.writes.iter()) {
        let columns = table
            .columns
            .iter()
            .map(|c| (c.clone(), if *c == table.key { "bigint" } else { "text" }.to_string()))
            .collect();
        types.insert(name.clone(), columns);
    }
    types
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::schema::{ColumnType, Schema, SplitPart, TableSchema, Transform};

    fn mapping() -> Mapping {
        let mut tables = BTreeMap::new();
        let columns = ["id", "name", "age", "body"].into_iter().map(String::from).collect();
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
                expression: Some("lower(:name) || '-' || :id || ':x'".into()),
            },
            Transform::SplitTable {
                table: "users".into(),
                into: vec![
                    SplitPart {
                        table: "users".into(),
                        columns: vec!["name".into(), "age".into(), "handle".into()],
                        references: vec![("body_id".into(), "bodies".into())],
                        ..Default::default()
                    },
                    SplitPart {
                        table: "bodies".into(),
                        columns: vec!["body".into()],
                        key: Some("body_id".into()),
                        generated: true,
                        ..Default::default()
                    },
                ],
            },
        ];
        Mapping::compile(&Schema { tables }, &transforms).unwrap()
    }

    #[test]
    fn columns_imago_makes_are_bigint_where_every_source_is_an_integer_else_text() {
        let types = column_types(&mapping(), &LiveTypes::new());
        let users: Vec<(&str, &str)> = types["users"].iter().map(|(c, t)| (c.as_str(), t.as_str())).collect();
        assert_eq!(
            users,
            vec![("age", "bigint"), ("body_id", "bigint"), ("handle", "text"), ("id", "bigint"), ("name", "text")]
        );
        assert_eq!(types["bodies"]["body_id"], "bigint");
        assert_eq!(types["bodies"]["body"], "text");
    }

    #[test]
    fn a_column_copied_as_it_is_keeps_the_old_columns_type() {
        let old: LiveTypes = [(
            "users".to_string(),
            [("name", "character varying(40)"), ("body", "jsonb"), ("age", "smallint")]
                .into_iter()
                .map(|(c, t)| (c.to_string(), t.to_string()))
                .collect(),
        )]
        .into();
        let types = column_types(&mapping(), &old);
        assert_eq!(types["users"]["name"], "character varying(40)");
        assert_eq!(types["bodies"]["body"], "jsonb", "split off into a table of its own");
        assert_eq!(types["users"]["age"], "bigint", "converted: the conversion's type");
        assert_eq!(types["users"]["handle"], "text", "an expression's: not known");
        assert_eq!(types["users"]["id"], "bigint");
    }

    #[test]
    fn an_expressions_parameters_are_typed_by_their_values_and_null_is_written_out() {
        let mapping = mapping();
        let output = &mapping.outputs["users"][0];
        let (_, handle) = output.columns.iter().find(|(c, _)| c == "handle").unwrap();
        let row: Row = [("id".to_string(), Value::Int(7)), ("name".to_string(), Value::Text("Ann".into()))].into();
        let mut out = Rendered::default();
        render(handle, &row, &mut |_| Ok(0), &mut out).unwrap();
        assert_eq!(out.sql, "(lower($1::text) || '-' || $2::bigint || ':x')", "a quoted `:x` is no parameter");
        assert_eq!(out.values, vec![Some("Ann".to_string()), Some("7".to_string())]);
        let mut out = Rendered::default();
        render(handle, &Row::new(), &mut |_| Ok(0), &mut out).unwrap();
        assert_eq!((out.sql.as_str(), out.values.len()), ("(lower(NULL) || '-' || NULL || ':x')", 0));
    }

    #[test]
    fn an_upsert_casts_each_bound_value_to_its_live_column_and_updates_only_its_own_columns() {
        let mapping = mapping();
        let output = &mapping.outputs["users"][0];
        let live_table = |columns: &[(&str, &str)]| LiveTable {
            key: "id".into(),
            columns: columns.iter().map(|(c, t)| (c.to_string(), t.to_string(), 0)).collect(),
            key_sequence: None,
        };
        let live = Live {
            schema: "\"app\"".into(),
            tables: [("users".to_string(), live_table(&[("id", "integer"), ("age", "smallint")]))].into(),
        };
        let row: Row = [("id".to_string(), Value::Int(7)), ("age".to_string(), Value::Text(" 41".into()))].into();
        let mut key_of = |t: &str| Ok(if t == "bodies" { 99 } else { 7 });
        let rendered = upsert_sql(&live, Target::Staging, output, 7, &row, &mut key_of).unwrap();
        assert!(
            rendered
                .sql
                .starts_with("INSERT INTO pg_temp.\"users\" (\"id\", \"name\", \"age\", \"handle\", \"body_id\")"),
            "{}",
            rendered.sql
        );
        assert!(
            rendered.sql.contains(
                "VALUES ($1::integer, $2::text, $3::smallint, (lower(NULL) || '-' || $4::bigint || ':x'), $5::text)"
            ),
            "{}",
            rendered.sql
        );
        assert!(rendered.sql.ends_with("ON CONFLICT (\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"age\" = EXCLUDED.\"age\", \"handle\" = EXCLUDED.\"handle\", \"body_id\" = EXCLUDED.\"body_id\""), "{}", rendered.sql);
        let values: Vec<Option<&str>> = rendered.values.iter().map(|v| v.as_deref()).collect();
        assert_eq!(values, vec![Some("7"), None, Some("41"), Some("7"), Some("99")], "converted by Imago, then bound");
    }
}
