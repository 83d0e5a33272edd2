//! Table schemas, the declared transforms between the old and the new schema, and the row
//! mapping compiled from them.
//!
//! A transform list is compiled once (when the plan is loaded) into a [`Mapping`]: for each old
//! table, the new tables its rows become and where each new column comes from. Compiling checks
//! every name against the schema as it stands at that transform, so a plan that renames a
//! column the old schema lacks is refused before anything runs.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A column value. Keys are always `Int`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

/// Column types a transform can convert between.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ColumnType {
    Int,
    Text,
}

/// Imago's own tables start with this prefix; a plan may neither declare nor make one.
pub const RESERVED_PREFIX: &str = "imago_";

/// The request log: every client write a store applied, by request key, written in the same
/// transaction as the write (so a duplicate of the request is answered, not run again, after a
/// crash too). Every mapping passes its rows through unchanged, so the log moves into the new
/// universe with the data and a duplicate that arrives after the switch is still recognised.
pub const REQUEST_LOG_TABLE: &str = "imago_requests";

/// Whether `table` is a name only Imago may use.
pub fn is_reserved(table: &str) -> bool {
    table.starts_with(RESERVED_PREFIX)
}

/// One row: column name to value (the key column included).
pub type Row = BTreeMap<String, Value>;

/// One table: its key column (an integer) and its columns in order (the key among them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSchema {
    pub key: String,
    pub columns: Vec<String>,
}

/// A database schema: table name to table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    pub tables: BTreeMap<String, TableSchema>,
}

/// One part of a split table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPart {
    pub table: String,
    /// Columns moved into this part (the key column is always added).
    pub columns: Vec<String>,
}

/// A declared schema change, applied in plan order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transform {
    RenameTable { table: String, to: String },
    RenameColumn { table: String, from: String, to: String },
    AddColumn { table: String, column: String, default: Value },
    DropColumn { table: String, column: String },
    ChangeType { table: String, column: String, to: ColumnType },
    SplitTable { table: String, into: Vec<SplitPart> },
}

/// Which field of a transform a [`SchemaError`] is about (so the plan loader can point at it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransformField {
    Table,
    From,
    To,
    Column,
    Into(usize),
    IntoColumn(usize, usize),
}

/// A transform that does not fit the schema it applies to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SchemaError {
    /// Index of the transform in plan order.
    pub transform: usize,
    pub field: TransformField,
    pub message: String,
}

/// Where a new column's value comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    Column(String),
    Const(Value),
    Convert(Box<Source>, ColumnType),
}

/// One new table fed by an old table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub table: String,
    pub key: String,
    /// New column name and its source, in column order.
    pub columns: Vec<(String, Source)>,
}

/// The compiled old→new row mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// Old table name to the new tables its rows feed.
    pub outputs: BTreeMap<String, Vec<Output>>,
}

/// A row-level change in either schema: an upsert of a whole row, or a delete by key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RowOp {
    Upsert { table: String, key: i64, row: Row },
    Delete { table: String, key: i64 },
}

/// A value that could not be converted (e.g. text that is not a number).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot convert {value:?} to {to:?}")]
pub struct ConvertError {
    pub value: Value,
    pub to: ColumnType,
}

impl Mapping {
    /// Compiles `transforms` against `old`, checking every name as it goes.
    pub fn compile(old: &Schema, transforms: &[Transform]) -> Result<Mapping, SchemaError> {
        let mut outputs: BTreeMap<String, Vec<Output>> = BTreeMap::new();
        for (name, table) in &old.tables {
            let columns = table.columns.iter().map(|c| (c.clone(), Source::Column(c.clone()))).collect();
            outputs.insert(name.clone(), vec![Output { table: name.clone(), key: table.key.clone(), columns }]);
        }
        let mut mapping = Mapping { outputs };
        for (index, transform) in transforms.iter().enumerate() {
            mapping.apply(index, transform)?;
        }
        Ok(mapping)
    }

    /// The new schema this mapping produces.
    pub fn new_schema(&self) -> Schema {
        let mut tables = BTreeMap::new();
        for output in self.outputs.values().flatten() {
            let columns = output.columns.iter().map(|(c, _)| c.clone()).collect();
            tables.insert(output.table.clone(), TableSchema { key: output.key.clone(), columns });
        }
        Schema { tables }
    }

    fn find(&mut self, table: &str) -> Option<&mut Output> {
        self.outputs.values_mut().flatten().find(|o| o.table == table)
    }

    fn has_table(&self, table: &str) -> bool {
        self.outputs.values().flatten().any(|o| o.table == table)
    }

    fn apply(&mut self, index: usize, transform: &Transform) -> Result<(), SchemaError> {
        let err = |field, message: String| SchemaError { transform: index, field, message };
        let table_name = match transform {
            Transform::RenameTable { table, .. }
            | Transform::RenameColumn { table, .. }
            | Transform::AddColumn { table, .. }
            | Transform::DropColumn { table, .. }
            | Transform::ChangeType { table, .. }
            | Transform::SplitTable { table, .. } => table.clone(),
        };
        if !self.has_table(&table_name) {
            return Err(err(
                TransformField::Table,
                format!("table `{table_name}` does not exist in the schema at this point"),
            ));
        }
        let made = match transform {
            Transform::RenameTable { to, .. } => vec![(TransformField::To, to)],
            Transform::SplitTable { into, .. } => {
                into.iter().enumerate().map(|(i, part)| (TransformField::Into(i), &part.table)).collect()
            }
            _ => Vec::new(),
        };
        if let Some((field, name)) = made.into_iter().find(|(_, name)| is_reserved(name)) {
            return Err(err(
                field,
                format!("table names starting with `{RESERVED_PREFIX}` are reserved for Imago's own tables: `{name}`"),
            ));
        }
        match transform {
            Transform::RenameTable { to, .. } => {
                if self.has_table(to) {
                    return Err(err(TransformField::To, format!("table `{to}` already exists")));
                }
                self.find(&table_name).expect("checked").table = to.clone();
            }
            Transform::RenameColumn { from, to, .. } => {
                let output = self.find(&table_name).expect("checked");
                if output.columns.iter().any(|(c, _)| c == to) {
                    return Err(err(TransformField::To, format!("column `{to}` already exists in `{table_name}`")));
                }
                let Some(column) = output.columns.iter_mut().find(|(c, _)| c == from) else {
                    return Err(err(TransformField::From, format!("column `{from}` does not exist in `{table_name}`")));
                };
                column.0 = to.clone();
                if output.key == *from {
                    output.key = to.clone();
                }
            }
            Transform::AddColumn { column, default, .. } => {
                let output = self.find(&table_name).expect("checked");
                if output.columns.iter().any(|(c, _)| c == column) {
                    return Err(err(
                        TransformField::Column,
                        format!("column `{column}` already exists in `{table_name}`"),
                    ));
                }
                output.columns.push((column.clone(), Source::Const(default.clone())));
            }
            Transform::DropColumn { column, .. } => {
                let output = self.find(&table_name).expect("checked");
                if output.key == *column {
                    return Err(err(TransformField::Column, format!("column `{column}` is the key of `{table_name}`")));
                }
                let before = output.columns.len();
                output.columns.retain(|(c, _)| c != column);
                if output.columns.len() == before {
                    return Err(err(
                        TransformField::Column,
                        format!("column `{column}` does not exist in `{table_name}`"),
                    ));
                }
            }
            Transform::ChangeType { column, to, .. } => {
                let output = self.find(&table_name).expect("checked");
                if output.key == *column {
                    return Err(err(TransformField::Column, format!("column `{column}` is the key of `{table_name}`")));
                }
                let Some(entry) = output.columns.iter_mut().find(|(c, _)| c == column) else {
                    return Err(err(
                        TransformField::Column,
                        format!("column `{column}` does not exist in `{table_name}`"),
                    ));
                };
                let source = std::mem::replace(&mut entry.1, Source::Const(Value::Null));
                entry.1 = Source::Convert(Box::new(source), *to);
            }
            Transform::SplitTable { into, .. } => {
                if into.len() < 2 {
                    return Err(err(TransformField::Into(0), "a split needs at least two parts".to_string()));
                }
                let original = self.find(&table_name).expect("checked").clone();
                let mut parts = Vec::with_capacity(into.len());
                for (part_index, part) in into.iter().enumerate() {
                    if part.table != table_name && self.has_table(&part.table) {
                        return Err(err(
                            TransformField::Into(part_index),
                            format!("table `{}` already exists", part.table),
                        ));
                    }
                    if parts.iter().any(|p: &Output| p.table == part.table) {
                        return Err(err(
                            TransformField::Into(part_index),
                            format!("table `{}` named twice", part.table),
                        ));
                    }
                    let key_column =
                        original.columns.iter().find(|(c, _)| *c == original.key).expect("key present").clone();
                    let mut columns = vec![key_column];
                    for (column_index, column) in part.columns.iter().enumerate() {
                        if *column == original.key {
                            continue;
                        }
                        let Some(found) = original.columns.iter().find(|(c, _)| c == column) else {
                            return Err(err(
                                TransformField::IntoColumn(part_index, column_index),
                                format!("column `{column}` does not exist in `{table_name}`"),
                            ));
                        };
                        columns.push(found.clone());
                    }
                    parts.push(Output { table: part.table.clone(), key: original.key.clone(), columns });
                }
                for outputs in self.outputs.values_mut() {
                    if let Some(at) = outputs.iter().position(|o| o.table == table_name) {
                        outputs.splice(at..=at, parts);
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Converts one old-schema change into new-schema changes.
    pub fn convert(&self, op: &RowOp) -> Result<Vec<RowOp>, ConvertError> {
        let (table, key) = match op {
            RowOp::Upsert { table, key, .. } | RowOp::Delete { table, key } => (table, *key),
        };
        if table == REQUEST_LOG_TABLE {
            return Ok(vec![op.clone()]);
        }
        let Some(outputs) = self.outputs.get(table) else {
            return Ok(Vec::new());
        };
        let mut converted = Vec::with_capacity(outputs.len());
        for output in outputs {
            match op {
                RowOp::Delete { .. } => converted.push(RowOp::Delete { table: output.table.clone(), key }),
                RowOp::Upsert { row, .. } => {
                    let mut new_row = Row::new();
                    for (column, source) in &output.columns {
                        new_row.insert(column.clone(), evaluate(source, row)?);
                    }
                    converted.push(RowOp::Upsert { table: output.table.clone(), key, row: new_row });
                }
            }
        }
        Ok(converted)
    }
}

fn evaluate(source: &Source, row: &Row) -> Result<Value, ConvertError> {
    match source {
        Source::Column(c) => Ok(row.get(c).cloned().unwrap_or(Value::Null)),
        Source::Const(v) => Ok(v.clone()),
        Source::Convert(inner, to) => {
            let value = evaluate(inner, row)?;
            match (value, to) {
                (Value::Null, _) => Ok(Value::Null),
                (Value::Int(i), ColumnType::Int) => Ok(Value::Int(i)),
                (Value::Int(i), ColumnType::Text) => Ok(Value::Text(i.to_string())),
                (Value::Text(t), ColumnType::Text) => Ok(Value::Text(t)),
                (Value::Text(t), ColumnType::Int) => {
                    t.trim().parse().map(Value::Int).map_err(|_| ConvertError { value: Value::Text(t), to: *to })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Schema {
        let mut tables = BTreeMap::new();
        tables.insert(
            "users".to_string(),
            TableSchema { key: "id".into(), columns: vec!["id".into(), "name".into(), "email".into(), "bio".into()] },
        );
        Schema { tables }
    }

    fn rename_and_split() -> Vec<Transform> {
        vec![
            Transform::RenameColumn { table: "users".into(), from: "name".into(), to: "nickname".into() },
            Transform::SplitTable {
                table: "users".into(),
                into: vec![
                    SplitPart { table: "users".into(), columns: vec!["nickname".into(), "email".into()] },
                    SplitPart { table: "user_profiles".into(), columns: vec!["bio".into()] },
                ],
            },
        ]
    }

    #[test]
    fn the_request_log_passes_through_every_mapping_unchanged() {
        let mapping = Mapping::compile(&users(), &rename_and_split()).unwrap();
        let row: Row = [("origin".to_string(), Value::Int(-3)), ("id".to_string(), Value::Int(9))].into();
        let upsert = RowOp::Upsert { table: REQUEST_LOG_TABLE.into(), key: 5, row };
        assert_eq!(mapping.convert(&upsert).unwrap(), vec![upsert.clone()]);
        let delete = RowOp::Delete { table: REQUEST_LOG_TABLE.into(), key: 5 };
        assert_eq!(mapping.convert(&delete).unwrap(), vec![delete.clone()]);
        assert!(!mapping.new_schema().tables.contains_key(REQUEST_LOG_TABLE), "not a table of the plan's schema");
    }

    #[test]
    fn rename_then_split_maps_rows_into_two_tables() {
        let mapping = Mapping::compile(&users(), &rename_and_split()).unwrap();
        let schema = mapping.new_schema();
        assert_eq!(schema.tables["users"].columns, vec!["id", "nickname", "email"]);
        assert_eq!(schema.tables["user_profiles"].columns, vec!["id", "bio"]);
        let row: Row = [
            ("id".to_string(), Value::Int(7)),
            ("name".to_string(), Value::Text("ann".into())),
            ("email".to_string(), Value::Text("a@x".into())),
            ("bio".to_string(), Value::Text("hi".into())),
        ]
        .into_iter()
        .collect();
        let out = mapping.convert(&RowOp::Upsert { table: "users".into(), key: 7, row }).unwrap();
        assert_eq!(out.len(), 2);
        match &out[0] {
            RowOp::Upsert { table, row, .. } => {
                assert_eq!(table, "users");
                assert_eq!(row["nickname"], Value::Text("ann".into()));
                assert!(!row.contains_key("bio"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let deletes = mapping.convert(&RowOp::Delete { table: "users".into(), key: 7 }).unwrap();
        assert_eq!(deletes.len(), 2);
    }

    #[test]
    fn unknown_column_is_refused_with_its_field() {
        let transforms =
            vec![Transform::RenameColumn { table: "users".into(), from: "nmae".into(), to: "nickname".into() }];
        let error = Mapping::compile(&users(), &transforms).unwrap_err();
        assert_eq!(error.field, TransformField::From);
        assert!(error.message.contains("nmae"), "{}", error.message);
    }

    #[test]
    fn change_type_converts_and_reports_bad_values() {
        let transforms =
            vec![Transform::ChangeType { table: "users".into(), column: "bio".into(), to: ColumnType::Int }];
        let mapping = Mapping::compile(&users(), &transforms).unwrap();
        let row: Row =
            [("id".to_string(), Value::Int(1)), ("bio".to_string(), Value::Text("x".into()))].into_iter().collect();
        assert!(mapping.convert(&RowOp::Upsert { table: "users".into(), key: 1, row }).is_err());
    }
}
