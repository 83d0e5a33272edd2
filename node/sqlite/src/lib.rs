//! The SQLite adapter of the data-store interface ([`node_core::store`]): Imago's embedded
//! default.
//!
//! - [`SqliteOld`] is the old universe's database. Capture is by triggers: every insert, update
//!   and delete of a captured table writes the row (as JSON) into `imago_changes`, whose
//!   integer key is the change's position (the row with the largest is never pruned, so numbers
//!   are never reused). SQLite has one writer at a time, so positions are committed in order: a
//!   reader that sees position `p` sees every change before it. A
//!   snapshot is a read transaction on a connection of its own (WAL mode: writers go on), so it
//!   dies with the process. The fence is a set of triggers that raise, created in one write
//!   transaction: it waits for the writer in flight (the busy timeout), then refuses every
//!   connection's writes, the application's own included.
//! - [`SqliteNew`] is the new universe's database. Each batch and the checkpoint it reaches are
//!   one transaction, applied only on top of the checkpoint it names. Until the switch, guard
//!   triggers refuse every write that does not come from the transform's own connection (it
//!   attaches a database named `imago_transform`, which the triggers look for).
//!
//! Imago's objects (`imago_changes`, `imago_checkpoint`, the triggers) are removed by
//! [`SqliteOld::remove_capture`] and [`SqliteNew::open_to_clients`] / [`SqliteNew::remove_imago`].
//!
//! Values: SQLite's integers, text and NULL map to [`Value`]; a REAL or a BLOB in a captured
//! column is refused with an error naming it (Imago does not carry them yet).

mod new;
mod old;
mod program;
mod sql;

pub use new::SqliteNew;
pub use old::SqliteOld;

use protocol::schema::Value;

/// How long a statement waits for another connection's write lock before it gives up (the
/// fence waits this long for the writer in flight).
pub const BUSY_TIMEOUT_MS: u64 = 5_000;

/// Why an SQLite store could not open or do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("{path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    /// The live database does not match the plan's schema.
    #[error("{path}: table `{table}`: {message}")]
    Schema { path: String, table: String, message: String },
    /// The new database rejects an SQL expression of the plan.
    #[error("{path}: transform {transform}'s expression: the database says: {message}")]
    Expression { path: String, transform: usize, message: String },
    /// A value Imago cannot carry.
    #[error("table `{table}`, column `{column}`: {what}")]
    Value { table: String, column: String, what: String },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

impl From<SqliteError> for node_core::store::StoreError {
    fn from(e: SqliteError) -> Self {
        node_core::store::StoreError::Unavailable(e.to_string())
    }
}

/// A stored value as Imago carries it.
fn value_of(table: &str, column: &str, v: rusqlite::types::ValueRef<'_>) -> Result<Value, SqliteError> {
    use rusqlite::types::ValueRef;
    let err = |what: &str| SqliteError::Value { table: table.into(), column: column.into(), what: what.into() };
    match v {
        ValueRef::Null => Ok(Value::Null),
        ValueRef::Integer(i) => Ok(Value::Int(i)),
        ValueRef::Text(t) => {
            std::str::from_utf8(t).map(|s| Value::Text(s.to_string())).map_err(|_| err("text that is not UTF-8"))
        }
        ValueRef::Real(_) => Err(err("a REAL value: Imago carries integers, text and NULL")),
        ValueRef::Blob(_) => Err(err("a BLOB value: Imago carries integers, text and NULL")),
    }
}
