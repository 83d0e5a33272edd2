//! [`PgOld`] and [`PgNew`] behind the data-store interface (`node_core::store::OldStore` and
//! `NewStore`), for a shell that performs store operations one at a time on a blocking thread
//! (the data node's `ThreadStores`).
//!
//! Each store owns a small tokio runtime of its own (one worker thread), on which its
//! connections' tasks live between operations (the replication connection keeps reporting its
//! position, the SQL connections answer the server), and blocks the calling thread on each
//! operation. Shell code only: what each operation does is the adapter's, and what comes next
//! is the data-node core's.
//!
//! The interface is synchronous because the core's one place where an operation meets a store
//! (`node_core::data_node::perform`) is; a blocking thread per operation is what the SQLite
//! adapter needs anyway.

use crate::{Names, PgError, PgNew, PgOld};
use node_core::store::{
    Batch, ChangeRead, Checkpoint, Chunk, NewStore, OldStore, RowCursor, Sequences, SnapshotId, StaleBatch, StoreError,
    StoredRow,
};
use protocol::schema::{Mapping, Schema};
use protocol::Position;
use std::cell::RefCell;
use tokio::runtime::Runtime;

/// A runtime for one store's connections.
fn runtime(name: &str) -> Result<Runtime, PgError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| PgError::Unavailable(format!("start the {name} runtime: {e}")))
}

/// A store and the runtime its connections live on. The store goes before the runtime (its
/// connections end on the runtime's threads), and the runtime shuts down without waiting, so
/// it may be dropped anywhere, on an async thread too.
struct OnRuntime<S> {
    runtime: Option<Runtime>,
    store: RefCell<Option<S>>,
}

impl<S> OnRuntime<S> {
    fn new(runtime: Runtime, store: S) -> Self {
        OnRuntime { runtime: Some(runtime), store: RefCell::new(Some(store)) }
    }

    fn run<T>(&self, f: impl AsyncFnOnce(&mut S) -> T) -> T {
        let runtime = self.runtime.as_ref().expect("the runtime lives as long as the store");
        let mut store = self.store.borrow_mut();
        let store = store.as_mut().expect("the store lives until dropped");
        runtime.block_on(f(store))
    }
}

impl<S> Drop for OnRuntime<S> {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            {
                let _inside = runtime.enter();
                drop(self.store.get_mut().take());
            }
            runtime.shutdown_background();
        }
    }
}

/// The old universe's PostgreSQL database as an [`OldStore`] (positions are LSNs:
/// `Positions::Ordered`).
pub struct PgOldStore(OnRuntime<PgOld>);

impl std::fmt::Debug for PgOldStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PgOldStore").field(&self.0.store.borrow()).finish()
    }
}

impl PgOldStore {
    /// [`PgOld::open`] on a runtime of its own. Must not be called on an async thread.
    pub fn open(conn_str: &str, schema: &Schema, names: Names) -> Result<PgOldStore, PgError> {
        let runtime = runtime("imago-pg-old")?;
        let old = runtime.block_on(PgOld::open(conn_str, schema, names))?;
        Ok(PgOldStore(OnRuntime::new(runtime, old)))
    }

    /// What opening found risky but not wrong.
    pub fn warnings(&self) -> Vec<String> {
        self.0.run(async |old: &mut PgOld| old.warnings().to_vec())
    }

    /// [`PgOld::live_types`].
    pub fn live_types(&self) -> Result<crate::LiveTypes, PgError> {
        self.0.run(async |old: &mut PgOld| old.live_types().await)
    }

    /// Imago's objects in the database but the request log (for checks and clean-up reports).
    pub fn imago_objects(&self) -> Result<Vec<String>, PgError> {
        self.0.run(async |old: &mut PgOld| old.imago_objects().await)
    }

    /// [`PgOld::retire_at`] on a runtime of its own. Must not be called on an async thread.
    pub fn retire(conn_str: &str, names: Names) -> Result<Vec<String>, PgError> {
        let runtime = runtime("imago-pg-old")?;
        let left = runtime.block_on(PgOld::retire_at(conn_str, names));
        runtime.shutdown_background();
        left
    }
}

impl OldStore for PgOldStore {
    fn open_snapshot(&mut self) -> Result<(SnapshotId, Position), StoreError> {
        self.0.run(async |old: &mut PgOld| old.open_snapshot().await)
    }

    fn snapshot_rows(&self, snapshot: SnapshotId) -> Result<u64, StoreError> {
        self.0.run(async |old: &mut PgOld| old.snapshot_rows(snapshot).await)
    }

    fn snapshot_chunk(&self, snapshot: SnapshotId, after: &RowCursor, limit: usize) -> Result<Chunk, StoreError> {
        self.0.run(async |old: &mut PgOld| old.snapshot_chunk(snapshot, after, limit).await)
    }

    fn rows_chunk(&self, after: &RowCursor, limit: usize) -> Result<Chunk, StoreError> {
        self.0.run(async |old: &mut PgOld| old.rows_chunk(after, limit).await)
    }

    fn rows_to_compare(&mut self, after: &RowCursor, limit: usize) -> Result<(Chunk, Position), StoreError> {
        self.0.run(async |old: &mut PgOld| old.rows_to_compare(after, limit).await)
    }

    fn changes_after(&self, after: Position, limit: usize) -> Result<ChangeRead, StoreError> {
        self.0.run(async |old: &mut PgOld| old.row_changes(after, limit).await)
    }

    fn fence(&mut self) -> Result<Position, StoreError> {
        self.0.run(async |old: &mut PgOld| old.fence().await)
    }

    fn unfence(&mut self) -> Result<(), StoreError> {
        self.0.run(async |old: &mut PgOld| old.unfence().await)
    }

    fn is_fenced(&self) -> Result<bool, StoreError> {
        self.0.run(async |old: &mut PgOld| old.is_fenced().await)
    }

    fn prune(&mut self, up_to: Position) -> Result<(), StoreError> {
        self.0.run(async |old: &mut PgOld| old.prune(up_to).await)
    }

    fn disconnect(&mut self) {
        self.0.run(async |old: &mut PgOld| old.disconnect())
    }

    fn remove_capture(&mut self) -> Result<(), StoreError> {
        self.0.run(async |old: &mut PgOld| old.remove_capture().await.map_err(StoreError::from))
    }

    fn sequences(&self) -> Result<Sequences, StoreError> {
        self.0.run(async |old: &mut PgOld| old.sequences().await)
    }
}

/// The new universe's PostgreSQL database as a [`NewStore`].
pub struct PgNewStore(OnRuntime<PgNew>);

impl std::fmt::Debug for PgNewStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PgNewStore").field(&self.0.store.borrow()).finish()
    }
}

impl PgNewStore {
    /// [`PgNew::open`] on a runtime of its own. Must not be called on an async thread.
    pub fn open(conn_str: &str, mapping: &Mapping) -> Result<PgNewStore, PgError> {
        Self::open_typed(conn_str, mapping, &crate::LiveTypes::new())
    }

    /// [`PgNew::open_typed`] on a runtime of its own. Must not be called on an async thread.
    pub fn open_typed(conn_str: &str, mapping: &Mapping, old_types: &crate::LiveTypes) -> Result<PgNewStore, PgError> {
        let runtime = runtime("imago-pg-new")?;
        let new = runtime.block_on(PgNew::open_typed(conn_str, mapping, old_types))?;
        Ok(PgNewStore(OnRuntime::new(runtime, new)))
    }

    /// Imago's objects in the database but the request log (for checks).
    pub fn imago_objects(&self) -> Result<Vec<String>, PgError> {
        self.0.run(async |new: &mut PgNew| new.imago_objects().await)
    }

    /// [`PgNew::sets`]: changes applied as sets, and sets refused.
    pub fn sets(&self) -> crate::new::SetCounts {
        self.0.run(async |new: &mut PgNew| new.sets())
    }

    /// [`PgNew::retire`] on a runtime of its own. Must not be called on an async thread.
    pub fn retire(conn_str: &str) -> Result<Vec<String>, PgError> {
        let runtime = runtime("imago-pg-new")?;
        let left = runtime.block_on(PgNew::retire(conn_str));
        runtime.shutdown_background();
        left
    }
}

impl NewStore for PgNewStore {
    fn checkpoint(&self) -> Result<Checkpoint, StoreError> {
        self.0.run(async |new: &mut PgNew| new.checkpoint().await)
    }

    fn apply_batch(&mut self, batch: &Batch) -> Result<Result<(), StaleBatch>, StoreError> {
        self.0.run(async |new: &mut PgNew| new.apply_batch(batch).await)
    }

    fn stage(&mut self, rows: &[StoredRow], first: bool) -> Result<u64, StoreError> {
        self.0.run(async |new: &mut PgNew| new.stage(rows, first).await)
    }

    fn compare_staged(&mut self) -> Result<(u64, u64), StoreError> {
        self.0.run(async |new: &mut PgNew| new.compare_staged().await)
    }

    fn compare_staged_keys(&mut self) -> Result<node_core::store::KeysCompared, StoreError> {
        self.0.run(async |new: &mut PgNew| new.compare_staged_keys().await)
    }

    fn checksum(&self) -> Result<u64, StoreError> {
        self.0.run(async |new: &mut PgNew| new.checksum().await)
    }

    fn open_to_clients(&mut self, sequences: &Sequences) -> Result<(), StoreError> {
        self.0.run(async |new: &mut PgNew| new.open_to_clients_after(sequences).await)
    }

    fn hold_writers(&mut self) -> Result<(), StoreError> {
        self.0.run(async |new: &mut PgNew| new.hold_writers().await)
    }

    fn release_writers(&mut self) -> Result<(), StoreError> {
        self.0.run(async |new: &mut PgNew| new.release_writers().await)
    }
}
