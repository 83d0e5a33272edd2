//! The PostgreSQL adapter of the data-store interface.
//!
//! - [`old`]: [`PgOld`], the old universe's database captured by logical decoding: a slot and
//!   its exported snapshot, the stream buffered as whole transactions ([`changes`]), the fence.
//! - [`new`]: [`PgNew`], the new universe's database: batches converted by the plan's mapping
//!   as SQL with their checkpoint, the key map, the guard, the comparison with transform(old).
//!   Runs of changes that need no key map go as sets, one statement per new table ([`set`]).
//! - [`pgoutput`]: a decoder of PostgreSQL's `pgoutput` logical replication messages (pure).
//! - [`blocking`]: both behind the synchronous data-store interface, each on a runtime of its
//!   own, for a data node's blocking threads.
//! - [`throwaway`]: a PostgreSQL cluster a test or a benchmark starts for itself.

pub mod blocking;
pub mod changes;
pub mod new;
pub mod old;
pub mod pgoutput;
mod program;
mod set;
mod sql;
mod stream;
pub mod throwaway;

pub use blocking::{PgNewStore, PgOldStore};
pub use changes::{ChangeError, PgChange, PgOp};
pub use new::PgNew;
pub use old::{Names, PgOld};
pub use program::LiveTypes;

use node_core::store::StoreError;
use protocol::Position;

/// Why the old database could not be opened or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("connection string: {0}")]
    ConnectionString(String),
    /// The server or database cannot be captured as it is; the message says what to change.
    #[error("{0}")]
    Refused(String),
    /// A captured table is not as the plan says, or cannot be captured.
    #[error("table `{table}`: {message}")]
    Table { table: String, message: String },
    /// The new database rejects an SQL expression or statement of the plan.
    #[error("transform {transform}'s expression: the database says: {message}")]
    Expression { transform: usize, message: String },
    #[error("{what}: {message}")]
    Sql { what: String, message: String },
    #[error("replication connection: {what}: {message}")]
    Replication { what: String, message: String },
    #[error("change stream: {0}")]
    Changes(#[from] ChangeError),
    #[error("change stream: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    /// Changes the slot no longer holds were asked for (they were acknowledged as applied).
    #[error("changes after {after:?} were asked for, but the slot holds only those after {confirmed:?}")]
    Pruned { after: Position, confirmed: Position },
    /// Not possible now (a lock, a busy slot, a timeout): may be tried again.
    #[error("{0}")]
    Unavailable(String),
}

/// Every failure of the old store is one the caller may try again (a snapshot that is gone is
/// said as such where it is found, in `PgOld::snapshot_chunk`).
impl From<PgError> for StoreError {
    fn from(e: PgError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}
