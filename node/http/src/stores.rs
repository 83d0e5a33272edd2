//! A data node's stores on real databases: the data-store interface of an adapter (SQLite's,
//! PostgreSQL's) run one operation at a time on the runtime's blocking threads, so that a long
//! statement (a fence waiting for the writer in flight, a chunk of the bulk copy) never stalls
//! the node's watch of the coordinator or its timers. Shell code: which operation runs next and
//! what its result means are the data-node core's decisions ([`node_core::data_node::perform`]
//! is the one place an operation meets a store).
//!
//! A real data node serves no client requests itself: the application's servers write to their
//! databases directly, and the databases' own triggers capture, fence and guard. So
//! [`ThreadStores::Request`](node::io::Stores::Request) is uninhabited.

use node_core::data_node::{perform, DataEvent, DataNodeCore, StoreOp, StoreResult};
use node_core::store::{NewStore, OldStore};
use node_core::{RequestKey, StoreAnswer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use protocol::Universe;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

/// A data node's metrics (cheap to clone: each is shared).
#[derive(Clone, Debug, Default)]
pub struct DataMetrics {
    captured: Gauge,
    applied: Gauge,
    copied_rows: Gauge,
    copy_rows_total: Gauge,
    lag_ms: Gauge,
    changes_per_s: Gauge,
    copy_rows_per_s: Gauge,
    copy_eta_ms: Gauge,
    store_failures: Counter,
    transform_failures: Counter,
    fenced: Gauge,
    drained: Counter,
    mismatched_drains: Counter,
    ranges_compared: Counter,
    ranges_differed: Counter,
    ranges: Gauge,
    ranges_clean: Gauge,
}

impl DataMetrics {
    /// Registers a data node's metrics in `registry`.
    pub fn register(registry: &mut Registry) -> DataMetrics {
        let m = DataMetrics::default();
        registry.register(
            "imago_captured_position",
            "The last change position captured in the old store",
            m.captured.clone(),
        );
        registry.register(
            "imago_applied_position",
            "The last change position applied to the new store",
            m.applied.clone(),
        );
        registry.register("imago_copied_rows", "Rows of the bulk copy applied by this process", m.copied_rows.clone());
        registry.register(
            "imago_copy_rows_total",
            "Rows the bulk copy's snapshot holds (0: not known)",
            m.copy_rows_total.clone(),
        );
        registry.register(
            "imago_change_lag_ms",
            "How long the oldest captured change not yet applied has waited since this node saw it (0: none waits)",
            m.lag_ms.clone(),
        );
        registry.register(
            "imago_applied_changes_per_second",
            "Changes of the stream applied per second over the last 10 s",
            m.changes_per_s.clone(),
        );
        registry.register(
            "imago_copy_rows_per_second",
            "Rows the bulk copy in progress (or the last one) copied per second",
            m.copy_rows_per_s.clone(),
        );
        registry.register(
            "imago_copy_eta_ms",
            "Time the bulk copy in progress needs yet at its pace (-1: not running or not known)",
            m.copy_eta_ms.clone(),
        );
        registry.register(
            "imago_store_failures",
            "Store operations that failed and were tried again",
            m.store_failures.clone(),
        );
        registry.register(
            "imago_transform_failures",
            "Batches the transform could not make or the new store refused",
            m.transform_failures.clone(),
        );
        registry.register("imago_old_fenced", "Whether this process fenced the old store (1) or not", m.fenced.clone());
        registry.register(
            "imago_drains",
            "Drains acked (everything up to the final position applied)",
            m.drained.clone(),
        );
        registry.register(
            "imago_drains_mismatched",
            "Drains whose comparison found the universes different",
            m.mismatched_drains.clone(),
        );
        registry.register(
            "imago_ranges_compared",
            "Ranges of old keys compared with the new store while traffic runs (spoiled ones included)",
            m.ranges_compared.clone(),
        );
        registry.register(
            "imago_ranges_differed",
            "Range comparisons that found transform(old) and new different",
            m.ranges_differed.clone(),
        );
        registry.register("imago_ranges", "Ranges of old keys the old tables are cut into", m.ranges.clone());
        registry.register(
            "imago_ranges_clean",
            "Ranges compared equal and unchanged since (the drain compares only the others)",
            m.ranges_clean.clone(),
        );
        m
    }

    fn event(&self, event: &DataEvent) {
        match event {
            DataEvent::StoreFailed { .. } => {
                self.store_failures.inc();
            }
            DataEvent::TransformFailed(_) => {
                self.transform_failures.inc();
            }
            DataEvent::Fenced { .. } => {
                self.fenced.set(1);
            }
            DataEvent::Drained { checksum_match, .. } => {
                self.drained.inc();
                if !checksum_match {
                    self.mismatched_drains.inc();
                }
            }
            DataEvent::Acted(protocol::Decision::Abort(_)) => {
                self.fenced.set(0);
            }
            DataEvent::RangeCompared { matched, .. } => {
                self.ranges_compared.inc();
                if *matched == Some(false) {
                    self.ranges_differed.inc();
                }
            }
            DataEvent::Acted(_)
            | DataEvent::Admitted { .. }
            | DataEvent::CopyStarted { .. }
            | DataEvent::Copying
            | DataEvent::CopyDone { .. }
            | DataEvent::CopyAgain { .. }
            | DataEvent::Compared { .. }
            | DataEvent::Abandoned { .. } => {}
        }
    }

    fn observe(&self, now_ms: u64, core: &DataNodeCore) {
        let pace = core.pace(now_ms);
        let ranges = core.range_check();
        self.ranges.set(ranges.ranges as i64);
        self.ranges_clean.set(ranges.clean as i64);
        self.lag_ms.set(pace.lag_ms as i64);
        self.changes_per_s.set(pace.changes_per_s as i64);
        self.copy_rows_per_s.set(pace.copy_rows_per_s as i64);
        self.copy_eta_ms.set(pace.copy_eta_ms.map_or(-1, |ms| ms as i64));
        if let Some(checkpoint) = core.checkpoint() {
            self.applied.set(checkpoint.applied.0 as i64);
        }
        let (copied, total) = core.copy_progress();
        self.copied_rows.set(copied as i64);
        self.copy_rows_total.set(total as i64);
        self.captured.set(core.captured().0 as i64);
    }
}

/// An old and a new store, each operation run on a blocking thread (see the module's notes).
pub struct ThreadStores<O, N> {
    stores: Arc<Mutex<(O, N)>>,
    metrics: Option<DataMetrics>,
    /// When the pace was last logged (the core's clock).
    logged_ms: std::cell::Cell<Option<u64>>,
}

/// How often a data node logs its pace while its copy runs or changes wait.
pub const PACE_LOG_INTERVAL_MS: u64 = 10_000;

impl<O: OldStore + Send + 'static, N: NewStore + Send + 'static> ThreadStores<O, N> {
    pub fn new(old: O, new: N) -> Self {
        ThreadStores { stores: Arc::new(Mutex::new((old, new))), metrics: None, logged_ms: Default::default() }
    }

    pub fn with_metrics(mut self, metrics: DataMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }
}

impl<O: OldStore + Send + 'static, N: NewStore + Send + 'static> node::io::Stores for ThreadStores<O, N> {
    type Request = Infallible;

    fn execute(
        &self,
        _key: RequestKey,
        request: &Infallible,
        _universe: Universe,
    ) -> impl Future<Output = StoreAnswer> + 'static {
        let never: Infallible = *request;
        async move { match never {} }
    }

    fn reply(&self, request: Infallible, _answer: StoreAnswer) {
        match request {}
    }

    fn store(&self, op: StoreOp) -> impl Future<Output = StoreResult> + 'static {
        let stores = self.stores.clone();
        async move {
            let run = tokio::task::spawn_blocking(move || {
                // A panic in an adapter poisons the lock; the stores themselves are only ever
                // changed by their own transactions, so the next operation may use them.
                let mut guard = stores.lock().unwrap_or_else(PoisonError::into_inner);
                let (old, new) = &mut *guard;
                perform(old, new, op)
            });
            run.await.unwrap_or_else(|e| StoreResult::Failed { reason: format!("the store's thread ended: {e}") })
        }
    }

    fn event(&self, event: DataEvent) {
        match &event {
            DataEvent::Fenced { final_position } => {
                tracing::info!(final_position = final_position.0, "old store fenced")
            }
            DataEvent::Drained { epoch, final_position, checksum_match } => tracing::info!(
                epoch = epoch.0,
                final_position = final_position.0,
                checksum_match,
                "drained: everything up to the final position is applied"
            ),
            DataEvent::Compared { final_position, matched } => {
                tracing::info!(final_position = final_position.0, matched, "universes compared")
            }
            DataEvent::RangeCompared { rows, matched: Some(false) } => {
                tracing::warn!(rows, "a range of old keys compared: transform(old) and new differ")
            }
            DataEvent::RangeCompared { .. } => {}
            DataEvent::TransformFailed(e) => tracing::warn!(error = %e, "transform"),
            DataEvent::StoreFailed { reason } => tracing::warn!(%reason, "store operation failed; tried again"),
            DataEvent::Acted(decision) => tracing::info!(?decision, "acted"),
            DataEvent::CopyStarted { rows_in_snapshot } => tracing::info!(rows_in_snapshot, "bulk copy under way"),
            DataEvent::CopyDone { copied_rows } => tracing::info!(copied_rows, "bulk copy done"),
            DataEvent::CopyAgain { reason } => tracing::warn!(%reason, "the bulk copy starts again"),
            DataEvent::Abandoned { upgrade } => tracing::info!(
                upgrade = upgrade.0,
                "the upgrade was rolled back: capture removed from the old database, the new database's copy \
                 abandoned (a later upgrade copies afresh)"
            ),
            DataEvent::Admitted { .. } | DataEvent::Copying => {}
        }
        if let Some(metrics) = &self.metrics {
            metrics.event(&event);
        }
    }

    fn observe(&self, now_ms: u64, core: &DataNodeCore) {
        let due = self.logged_ms.get().is_none_or(|t| now_ms >= t + PACE_LOG_INTERVAL_MS);
        let pace = core.pace(now_ms);
        let (copied, total) = core.copy_progress();
        // A copy under way in this process (a snapshot opened; not the pause before the first).
        let copying = core.checkpoint().is_some_and(|c| matches!(c.copy, node_core::store::CopyState::Copying { .. }))
            && (copied > 0 || total > 0);
        if due && (copying || pace.lag_ms > 0) {
            self.logged_ms.set(Some(now_ms));
            let applied = core.checkpoint().map_or(0, |c| c.applied.0);
            if copying {
                tracing::info!(
                    copied_rows = copied,
                    rows_in_snapshot = total,
                    rows_per_s = pace.copy_rows_per_s,
                    eta_s = pace.copy_eta_ms.map(|ms| ms.div_ceil(1_000)),
                    "bulk copy"
                );
            } else {
                tracing::info!(
                    applied,
                    captured = core.captured().0,
                    lag_ms = pace.lag_ms,
                    changes_per_s = pace.changes_per_s,
                    "change stream"
                );
            }
        }
        if let Some(metrics) = &self.metrics {
            metrics.observe(now_ms, core);
        }
    }
}
