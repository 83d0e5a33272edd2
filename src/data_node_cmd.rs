//! `imago node --plan PLAN --old-db DB --new-db DB`: a data node on a real machine.
//!
//! The data-node actor (the same one the simulator runs) over QUIC to the coordinators, with its
//! two databases behind the data-store interface of their adapter, each operation on a blocking
//! thread ([`node_http::stores::ThreadStores`]). The node is deployed for one upgrade: the plan
//! names it with the `capture` and `transform` duties, and its old generation and mapping are
//! the plan's. After a switch, the next upgrade's data node is started with the next plan, the
//! database that was new as its old one, and a fresh new one.

use anyhow::{bail, Context};
use clap::Args;
use node::data_node::{DataBoot, DataNodeActor};
use node_core::agent::AgentConfig;
use node_core::data_node::{DataNodeConfig, DataNodeCore};
use node_core::duties::transform::Positions;
use node_core::store::{
    Batch, ChangeRead, Checkpoint, Chunk, RowCursor, Sequences, SnapshotId, StaleBatch, StoreError, StoredRow,
};
use node_core::store::{NewStore, OldStore};
use node_http::disk::FileDisk;
use node_http::stores::{DataMetrics, ThreadStores};
use node_postgres::{PgNewStore, PgOldStore};
use node_sqlite::{SqliteNew, SqliteOld};
use protocol::cluster::{ClusterFile, NodeEntry};
use protocol::Duty;
use protocol::Position;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct DataArgs {
    /// The plan of the upgrade this data node is deployed for (it names the node, with the
    /// `capture` and `transform` duties): a data node runs with `--plan`, a router without.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// The old universe's database: a SQLite file (`PATH` or `sqlite:PATH`), or a PostgreSQL
    /// database (`postgres://…` or `postgresql://…`; `wal_level=logical`). Imago installs its
    /// capture there (SQLite: triggers and a change table; PostgreSQL: a replication slot and a
    /// publication), and fences it at the switch.
    #[arg(long, requires = "plan")]
    pub old_db: Option<String>,
    /// The new universe's database: a SQLite file (made if missing) or a PostgreSQL database.
    /// Until the switch commits, only the transform may write to it.
    #[arg(long, requires = "plan")]
    pub new_db: Option<String>,
    /// Pause between two transform steps (a copy chunk, a read of the change stream).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub transform_interval_ms: u64,
    /// Pause between two reads of an idle change stream.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub transform_idle_ms: u64,
    /// Pause before a failed store operation is tried again.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    pub store_retry_ms: u64,
}

/// A database named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Database {
    /// A SQLite file: `PATH` or `sqlite:PATH`.
    Sqlite(String),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

impl Database {
    pub(crate) fn parse(arg: &str, flag: &str) -> anyhow::Result<Database> {
        if arg.starts_with("postgres://") || arg.starts_with("postgresql://") {
            return Ok(Database::Postgres(arg.to_string()));
        }
        let path = arg.strip_prefix("sqlite:").unwrap_or(arg);
        if path.is_empty() || path == ":memory:" {
            bail!("{flag} {arg}: name a database file (a data node's databases outlive its process)");
        }
        Ok(Database::Sqlite(path.to_string()))
    }

    /// Retires it as the old database of `plan`'s upgrade (capture and fence go; nothing is
    /// installed first); what of Imago's is left but the request log.
    pub(crate) fn retire_old(&self, plan: &protocol::plan::Plan) -> anyhow::Result<Vec<String>> {
        let failed = |e: &dyn std::fmt::Display| anyhow::anyhow!("retiring the old database {}: {e}", self.shown());
        match self {
            Database::Sqlite(path) => {
                if !Path::new(path).exists() {
                    bail!("--old-db {path}: no such database file");
                }
                SqliteOld::retire_at(path).map_err(|e| failed(&e))
            }
            Database::Postgres(url) => PgOldStore::retire(url, pg_names(plan.old_generation)).map_err(|e| failed(&e)),
        }
    }

    /// Retires it as a new database (checkpoint, key map and guard go, nothing is set up
    /// first: the database may serve the application); what of Imago's is left but the
    /// request log.
    pub(crate) fn retire_new(&self) -> anyhow::Result<Vec<String>> {
        let failed = |e: &dyn std::fmt::Display| anyhow::anyhow!("retiring the new database {}: {e}", self.shown());
        match self {
            Database::Sqlite(path) => {
                if !Path::new(path).exists() {
                    bail!("--new-db {path}: no such database file");
                }
                SqliteNew::retire(path).map_err(|e| failed(&e))
            }
            Database::Postgres(url) => PgNewStore::retire(url).map_err(|e| failed(&e)),
        }
    }

    /// How it is named in logs: a URL without its password.
    pub(crate) fn shown(&self) -> String {
        match self {
            Database::Sqlite(path) => path.clone(),
            Database::Postgres(url) => match (url.find("://"), url.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    let user_info = &url[scheme + 3..at];
                    let user = user_info.split(':').next().unwrap_or("");
                    format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
                }
                _ => url.clone(),
            },
        }
    }
}

/// The PostgreSQL objects of the upgrade from `generation` (a data node is deployed for one):
/// `imago_from_<generation>` for the slot and the publication.
fn pg_names(generation: protocol::Generation) -> node_postgres::Names {
    let name = format!("imago_from_{}", generation.0);
    node_postgres::Names { slot: name.clone(), publication: name }
}

pub(crate) fn load_plan(file: &Path) -> anyhow::Result<protocol::plan::Plan> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading the plan {}", file.display()))?;
    // The plan's own errors name file, line and field.
    protocol::plan::Plan::from_toml(&file.display().to_string(), &text).map_err(anyhow::Error::msg)
}

pub fn run(
    cluster: &ClusterFile,
    me: &NodeEntry,
    args: &DataArgs,
    coordinator_ms_max: u64,
) -> anyhow::Result<std::process::ExitCode> {
    let plan_file = args.plan.as_deref().expect("called with --plan");
    let plan = load_plan(plan_file)?;
    let Some(entry) = plan.node(&me.name) else {
        bail!(
            "{}: the plan names no node `{}`: a data node runs for a plan that names it",
            plan_file.display(),
            me.name
        );
    };
    if !entry.duties.contains(&Duty::Capture) || !entry.duties.contains(&Duty::Transform) {
        bail!(
            "{}: node `{}` has duties {:?} in the plan; a data node needs `capture` and `transform`",
            plan_file.display(),
            me.name,
            entry.duties
        );
    }
    let mapping = plan.mapping().map_err(|e| anyhow::anyhow!("{}: {e}", plan_file.display()))?;
    let (Some(old_db), Some(new_db)) = (&args.old_db, &args.new_db) else {
        bail!("a data node needs both --old-db and --new-db");
    };
    let (old_db, new_db) = (Database::parse(old_db, "--old-db")?, Database::parse(new_db, "--new-db")?);
    if let Database::Sqlite(old_path) = &old_db {
        // The old database is the application's: it must be there (opening a missing file
        // would make an empty one).
        let Ok(old_real) = std::fs::canonicalize(old_path) else {
            bail!("--old-db {old_path}: no such database file (the old universe's database must exist)");
        };
        if let Database::Sqlite(new_path) = &new_db {
            let new_real = std::fs::canonicalize(new_path).unwrap_or_else(|_| PathBuf::from(new_path));
            if old_path == new_path || old_real == new_real {
                bail!("--old-db and --new-db name the same database {old_path}");
            }
        }
    }
    if old_db == new_db {
        bail!("--old-db and --new-db name the same database {}", old_db.shown());
    }
    // Everything that can be refused without touching the databases is checked first: opening
    // the old one installs capture.
    let identity = quic::certs::load(&cluster.certs, &cluster.id, &me.name.0)
        .with_context(|| format!("loading the certificate of `{}`", me.name))?;
    let disk = FileDisk::new(&me.data, &cluster.id, &me.name.0).map_err(anyhow::Error::msg)?;
    let record = disk.read().map_err(anyhow::Error::msg)?;
    let (old_shown, new_shown) = (old_db.shown(), new_db.shown());
    let opened_old = |e: &dyn std::fmt::Display| anyhow::anyhow!("opening the old database {old_shown}: {e}");
    let opened_new = |e: &dyn std::fmt::Display| anyhow::anyhow!("opening the new database {new_shown}: {e}");
    let (old, positions) = match &old_db {
        Database::Sqlite(path) => {
            // SQLite's change table numbers every change.
            (Old::Sqlite(SqliteOld::open(path, &plan.old_schema).map_err(|e| opened_old(&e))?), Positions::Counted)
        }
        Database::Postgres(url) => {
            let old =
                PgOldStore::open(url, &plan.old_schema, pg_names(plan.old_generation)).map_err(|e| opened_old(&e))?;
            for warning in old.warnings() {
                eprintln!("warning: the old database {old_shown}: {warning}");
            }
            // LSNs: ordered, with gaps.
            (Old::Postgres(old), Positions::Ordered)
        }
    };
    let new = match &new_db {
        Database::Sqlite(path) => New::Sqlite(SqliteNew::open(path, &mapping).map_err(|e| opened_new(&e))?),
        Database::Postgres(url) => {
            // A table Imago makes types a column copied as it is as the old database does.
            let old_types = match &old {
                Old::Postgres(old) => old.live_types().map_err(|e| opened_old(&e))?,
                Old::Sqlite(_) => node_postgres::LiveTypes::new(),
            };
            New::Postgres(PgNewStore::open_typed(url, &mapping, &old_types).map_err(|e| opened_new(&e))?)
        }
    };
    let boot = DataBoot {
        record,
        checkpoint: new.checkpoint().context("reading the new database's checkpoint")?,
        old_fenced: old.is_fenced().context("reading whether the old database is fenced")?,
    };
    let config = DataNodeConfig {
        agent: AgentConfig {
            node: me.name.clone(),
            duties: entry.duties.clone(),
            replicas: cluster.coordinators.iter().map(|c| c.id).collect(),
            request_timeout_ms: coordinator_ms_max,
            watch_wait_ms: 2_000,
            report_interval_ms: 1_000,
            stale_watch_limit: 3,
            upgrade_from: Some(plan.old_generation),
        },
        transform_interval_ms: args.transform_interval_ms,
        transform_idle_ms: args.transform_idle_ms.max(args.transform_interval_ms),
        answers_max: 1,
        change_log_applied_max: 10_000,
        store_retry_ms: args.store_retry_ms,
        positions,
        copy_rows_per_s_max: plan.copy_rows_per_s_max,
        copy_chunk_rows: plan.copy_chunk_rows.unwrap_or(protocol::plan::COPY_CHUNK_ROWS_DEFAULT),
        // The drain's comparison reads and stages as the copy does (a freeze waits for it).
        compare_chunk_rows: plan.copy_chunk_rows.unwrap_or(protocol::plan::COPY_CHUNK_ROWS_DEFAULT),
        // While traffic runs, ranges are compared so that the drain compares only what changed.
        range_rows: mapping.rows_stand_alone().then_some(node_core::data_node::RANGE_ROWS_DEFAULT),
        range_again_ms: args.transform_interval_ms,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let (endpoint, transport) = crate::cluster_cmd::coordinator_client(cluster, &identity)?;
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = DataMetrics::register(&mut registry);
        if let Some(addr) = me.metrics {
            crate::metrics_http::serve(addr, std::sync::Arc::new(registry)).await?;
        }
        let stores = ThreadStores::new(old, new).with_metrics(metrics);
        let (old_path, new_path) = (old_db.shown(), new_db.shown());
        // The core's clock: milliseconds since this process started (monotonic).
        let started = tokio::time::Instant::now();
        let clock = move || started.elapsed().as_millis() as u64;
        let actor = DataNodeActor::new(DataNodeCore::new(config), boot, transport, disk, stores, clock);
        let (addr, task) = node::start_local(actor);
        tracing::info!(node = %me.name, cluster = %cluster.id, plan = %plan.name, old = %old_path, new = %new_path, "data node running");
        eprintln!(
            "data node {} of cluster `{}` running plan `{}` (from generation {}): {old_path} → {new_path}",
            me.name, cluster.id, plan.name, plan.old_generation.0
        );
        tokio::select! {
            _ = crate::signals::terminated() => {}
            _ = task => bail!("the data-node actor stopped (its disk could not be written?)"),
        }
        // A store operation in progress finishes in its own transaction; what the node did is
        // in its databases and on its disk, and a restart goes on from there.
        addr.do_send(node::Stop);
        quic::endpoint::shut_down(&endpoint, Duration::from_secs(1)).await;
        tracing::info!("stopped");
        Ok(std::process::ExitCode::SUCCESS)
    })
}

/// The old database, of either kind (one per process: its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Old {
    Sqlite(SqliteOld),
    Postgres(PgOldStore),
}

/// The new database, of either kind (one per process).
#[allow(clippy::large_enum_variant)]
enum New {
    Sqlite(SqliteNew),
    Postgres(PgNewStore),
}

/// Calls `$call` on the store inside, whatever its kind.
macro_rules! each {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            Old::Sqlite($s) => $call,
            Old::Postgres($s) => $call,
        }
    };
}

macro_rules! each_new {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            New::Sqlite($s) => $call,
            New::Postgres($s) => $call,
        }
    };
}

impl OldStore for Old {
    fn open_snapshot(&mut self) -> Result<(SnapshotId, Position), StoreError> {
        each!(self, s => OldStore::open_snapshot(s))
    }
    fn snapshot_rows(&self, snapshot: SnapshotId) -> Result<u64, StoreError> {
        each!(self, s => OldStore::snapshot_rows(s, snapshot))
    }
    fn snapshot_chunk(&self, snapshot: SnapshotId, after: &RowCursor, limit: usize) -> Result<Chunk, StoreError> {
        each!(self, s => OldStore::snapshot_chunk(s, snapshot, after, limit))
    }
    fn rows_chunk(&self, after: &RowCursor, limit: usize) -> Result<Chunk, StoreError> {
        each!(self, s => OldStore::rows_chunk(s, after, limit))
    }
    fn rows_to_compare(&mut self, after: &RowCursor, limit: usize) -> Result<(Chunk, Position), StoreError> {
        each!(self, s => OldStore::rows_to_compare(s, after, limit))
    }
    fn changes_after(&self, after: Position, limit: usize) -> Result<ChangeRead, StoreError> {
        each!(self, s => OldStore::changes_after(s, after, limit))
    }
    fn fence(&mut self) -> Result<Position, StoreError> {
        each!(self, s => OldStore::fence(s))
    }
    fn unfence(&mut self) -> Result<(), StoreError> {
        each!(self, s => OldStore::unfence(s))
    }
    fn is_fenced(&self) -> Result<bool, StoreError> {
        each!(self, s => OldStore::is_fenced(s))
    }
    fn prune(&mut self, up_to: Position) -> Result<(), StoreError> {
        each!(self, s => OldStore::prune(s, up_to))
    }
    fn disconnect(&mut self) {
        each!(self, s => OldStore::disconnect(s))
    }
    fn remove_capture(&mut self) -> Result<(), StoreError> {
        each!(self, s => OldStore::remove_capture(s))
    }
    fn sequences(&self) -> Result<Sequences, StoreError> {
        each!(self, s => OldStore::sequences(s))
    }
}

impl NewStore for New {
    fn checkpoint(&self) -> Result<Checkpoint, StoreError> {
        each_new!(self, s => NewStore::checkpoint(s))
    }
    fn apply_batch(&mut self, batch: &Batch) -> Result<Result<(), StaleBatch>, StoreError> {
        each_new!(self, s => NewStore::apply_batch(s, batch))
    }
    fn stage(&mut self, rows: &[StoredRow], first: bool) -> Result<u64, StoreError> {
        each_new!(self, s => NewStore::stage(s, rows, first))
    }
    fn compare_staged(&mut self) -> Result<(u64, u64), StoreError> {
        each_new!(self, s => NewStore::compare_staged(s))
    }
    fn compare_staged_keys(&mut self) -> Result<node_core::store::KeysCompared, StoreError> {
        each_new!(self, s => NewStore::compare_staged_keys(s))
    }
    fn checksum(&self) -> Result<u64, StoreError> {
        each_new!(self, s => NewStore::checksum(s))
    }
    fn open_to_clients(&mut self, sequences: &Sequences) -> Result<(), StoreError> {
        each_new!(self, s => NewStore::open_to_clients(s, sequences))
    }
    fn hold_writers(&mut self) -> Result<(), StoreError> {
        each_new!(self, s => NewStore::hold_writers(s))
    }
    fn release_writers(&mut self) -> Result<(), StoreError> {
        each_new!(self, s => NewStore::release_writers(s))
    }
}
