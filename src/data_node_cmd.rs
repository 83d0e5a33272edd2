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
use node_core::store::{NewStore, OldStore};
use node_http::disk::FileDisk;
use node_http::stores::{DataMetrics, ThreadStores};
use node_sqlite::{SqliteNew, SqliteOld};
use protocol::cluster::{ClusterFile, NodeEntry};
use protocol::Duty;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct DataArgs {
    /// The plan of the upgrade this data node is deployed for (it names the node, with the
    /// `capture` and `transform` duties): a data node runs with `--plan`, a router without.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// The old universe's database: a SQLite file (`PATH` or `sqlite:PATH`). Imago installs its
    /// capture triggers and change table there, and fences it at the switch.
    #[arg(long, requires = "plan")]
    pub old_db: Option<String>,
    /// The new universe's database: a SQLite file, made if missing. Until the switch commits,
    /// only the transform may write to it.
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

/// A SQLite database named on the command line: `PATH` or `sqlite:PATH`.
fn sqlite_path(arg: &str, flag: &str) -> anyhow::Result<String> {
    if arg.starts_with("postgres://") || arg.starts_with("postgresql://") {
        bail!("{flag} {arg}: PostgreSQL data nodes are not available in `imago node` yet; use a SQLite file");
    }
    let path = arg.strip_prefix("sqlite:").unwrap_or(arg);
    if path.is_empty() || path == ":memory:" {
        bail!("{flag} {arg}: name a database file (a data node's databases outlive its process)");
    }
    Ok(path.to_string())
}

fn load_plan(file: &Path) -> anyhow::Result<protocol::plan::Plan> {
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
    let (old_path, new_path) = (sqlite_path(old_db, "--old-db")?, sqlite_path(new_db, "--new-db")?);
    // The old database is the application's: it must be there (opening a missing file would
    // make an empty one).
    let Ok(old_real) = std::fs::canonicalize(&old_path) else {
        bail!("--old-db {old_path}: no such database file (the old universe's database must exist)");
    };
    let new_real = std::fs::canonicalize(&new_path).unwrap_or_else(|_| PathBuf::from(&new_path));
    if old_path == new_path || old_real == new_real {
        bail!("--old-db and --new-db name the same database {old_path}");
    }
    // Everything that can be refused without touching the databases is checked first: opening
    // the old one installs capture.
    let identity = quic::certs::load(&cluster.certs, &cluster.id, &me.name.0)
        .with_context(|| format!("loading the certificate of `{}`", me.name))?;
    let disk = FileDisk::new(&me.data, &cluster.id, &me.name.0).map_err(anyhow::Error::msg)?;
    let record = disk.read().map_err(anyhow::Error::msg)?;
    let old =
        SqliteOld::open(&old_path, &plan.old_schema).with_context(|| format!("opening the old database {old_path}"))?;
    let new = SqliteNew::open(&new_path, &mapping).with_context(|| format!("opening the new database {new_path}"))?;
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
        // SQLite's change table numbers every change.
        positions: Positions::Counted,
        copy_rows_per_s_max: plan.copy_rows_per_s_max,
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
