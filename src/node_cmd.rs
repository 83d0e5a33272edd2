//! `imago node`: a router (the ingress duty) or a data node on a real machine.
//!
//! - A router: the ingress actor over QUIC to the coordinators, the HTTP/1.1 proxy toward
//!   clients and universes, and a file for its disk.
//! - A data node (`--plan`): the data-node actor over QUIC to the coordinators, its old and new
//!   databases through their adapter (capture, transform, fence and guard in the databases
//!   themselves), and a file for its disk. It is deployed for one upgrade: the plan says which
//!   (its old generation and mapping), and the node's entry in it its duties.

use crate::cluster_cmd::ClusterArg;
use anyhow::{bail, Context};
use clap::Args;
use node::ingress::IngressActor;
use node_core::agent::AgentConfig;
use node_core::duties::router::RouterConfig;
use node_core::ingress::{IngressConfig, IngressCore};
use node_http::disk::FileDisk;
use node_http::proxy::{serve, HttpIngress, ProxyConfig};
use protocol::Duty;
use std::time::Duration;

#[derive(Args)]
pub struct NodeArgs {
    #[command(flatten)]
    cluster: ClusterArg,
    /// This node's name in the cluster file (a node with an `http` address: a router).
    #[arg(long)]
    name: String,
    /// Longest the router holds one request before failing it with 503, until an upgrade's
    /// plan sets its own `hold_ms_max` (from then on, the plan's).
    #[arg(long, default_value_t = 2_000)]
    hold_ms_max: u64,
    /// Most requests held at once (more get 503 at once), until a plan sets `hold_queue_max`.
    #[arg(long, default_value_t = 1_000)]
    hold_queue_max: usize,
    /// Longest a request in flight keeps a freeze waiting before the router ends it (504),
    /// until a plan sets `inflight_ms_max`.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    inflight_ms_max: u64,
    /// Longest a universe gets to answer one request (then 504: unknown).
    #[arg(long, default_value_t = 10_000)]
    forward_ms_max: u64,
    /// Longest a coordinator replica gets to answer one request (a watch: its wait, plus this)
    /// before the node asks another: a few round trips between the node and the coordinators.
    /// An ack that waits on a dead replica waits this long, so keep it well below the plans'
    /// `freeze_timeout_ms`.
    #[arg(long, default_value_t = 500)]
    coordinator_ms_max: u64,
    #[command(flatten)]
    data: crate::data_node_cmd::DataArgs,
}

pub fn run(args: NodeArgs) -> anyhow::Result<std::process::ExitCode> {
    let cluster = args.cluster.load()?;
    let Some(me) = cluster.node(&args.name).cloned() else {
        bail!("`{}` is not a node in the cluster file", args.name);
    };
    if args.data.plan.is_some() {
        return crate::data_node_cmd::run(&cluster, &me, &args.data, args.coordinator_ms_max);
    }
    let Some(http) = me.http else {
        bail!(
            "node `{}` has no `http` address in the cluster file, so it is not a router; a data node is \
             started with `--plan` and its databases",
            me.name
        );
    };
    let identity = quic::certs::load(&cluster.certs, &cluster.id, &me.name.0)
        .with_context(|| format!("loading the certificate of `{}`", me.name))?;
    let disk = FileDisk::new(&me.data, &cluster.id, &me.name.0).map_err(anyhow::Error::msg)?;
    let record = disk.read().map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let (endpoint, transport) = crate::cluster_cmd::coordinator_client(&cluster, &identity)?;
        let config = IngressConfig {
            agent: AgentConfig {
                node: me.name.clone(),
                duties: vec![Duty::Route, Duty::Validate],
                replicas: cluster.coordinators.iter().map(|c| c.id).collect(),
                request_timeout_ms: args.coordinator_ms_max,
                watch_wait_ms: 2_000,
                report_interval_ms: 1_000,
                stale_watch_limit: 3,
                upgrade_from: None,
            },
            router: RouterConfig {
                hold_ms_max: args.hold_ms_max,
                hold_queue_max: args.hold_queue_max,
                inflight_ms_max: args.inflight_ms_max,
                retry_after_ms: 1_000,
            },
            ignore_fields: Vec::new(),
            requests_max: 100_000,
            genesis_endpoints: cluster.genesis_endpoints.clone(),
        };
        let proxy = ProxyConfig { forward_ms_max: args.forward_ms_max, ..ProxyConfig::default() };
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = node_http::metrics::NodeMetrics::register(&mut registry);
        if let Some(addr) = me.metrics {
            crate::metrics_http::serve(addr, std::sync::Arc::new(registry)).await?;
        }
        let ingress = HttpIngress::new(proxy.clone()).with_metrics(metrics);
        let (in_progress, rules) = (ingress.in_progress(), ingress.rules());
        // The core's clock: milliseconds since this process started (monotonic).
        let started = tokio::time::Instant::now();
        let clock = move || started.elapsed().as_millis() as u64;
        let actor = IngressActor::new(IngressCore::new(config), record, transport, disk, ingress, clock);
        let (addr, task) = node::start_local(actor);
        let listener = tokio::net::TcpListener::bind(http).await.with_context(|| format!("listening on {http}"))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::task::spawn_local(serve(listener, addr.clone().recipient(), proxy, rules, stop_rx));
        tracing::info!(node = %me.name, cluster = %cluster.id, %http, "router serving");
        eprintln!("router {} of cluster `{}` serving clients on {http}", me.name, cluster.id);
        tokio::select! {
            _ = crate::signals::terminated() => {}
            _ = task => bail!("the ingress actor stopped (its disk could not be written?)"),
        }
        // Stop taking requests; let those in progress finish (a hold ends by its own limit).
        let _ = stop_tx.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(args.hold_ms_max + args.forward_ms_max);
        while in_progress.get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        addr.do_send(node::Stop);
        quic::endpoint::shut_down(&endpoint, Duration::from_secs(1)).await;
        tracing::info!("stopped");
        Ok(std::process::ExitCode::SUCCESS)
    })
}
