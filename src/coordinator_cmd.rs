//! `imago coordinator`: one replica of the coordinator group, on QUIC with mutual TLS and a
//! durable data directory. Shell code: the replica service and the upgrade driver decide.

use crate::cluster_cmd::ClusterArg;
use anyhow::{bail, Context};
use clap::Args;
use coordinator::raft::BasicNode;
use coordinator::raft::{open_data_dir, RaftTiming};
use coordinator::service::{authorize, Replica};
use coordinator::upgrade::UpgradeState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use protocol::cluster::{ClusterFile, OPERATOR_NAME};
use protocol::messages::{CliRequest, CliResponse, RejectKind, Rejection, Request, Response};
use quic::endpoint::{bind_server, serve, Handler, QuicTransport};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    cluster: ClusterArg,
    /// This replica's name in the cluster file.
    #[arg(long)]
    name: String,
    /// This replica belongs to a group rebuilt after every replica's data was lost: until
    /// `imago cluster recover`, the group refuses every other command (a rebuilt group cannot
    /// otherwise tell itself from a new cluster). Give it to every replica of the rebuilt group;
    /// it changes nothing once the group holds state of its own.
    #[arg(long)]
    rebuilt: bool,
}

/// Milliseconds of the wall clock: the coordinators' shared clock for deadlines (the driver
/// stamps a freeze with it; a skew between replicas only moves an abort later, see the design).
#[allow(clippy::disallowed_methods)] // the binary's edge: a real process reads the real clock
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The names the cluster file gives, as this replica last read it.
struct Names {
    cluster: String,
    /// Every process (coordinators, nodes) and the operator.
    known: BTreeSet<String>,
    /// The nodes (only they can join the roster: a router needs its addresses there).
    nodes: BTreeSet<String>,
    coordinators: BTreeSet<String>,
}

impl Names {
    fn of(cluster: &ClusterFile) -> Names {
        Names {
            cluster: cluster.id.clone(),
            known: cluster.names().into_iter().collect(),
            nodes: cluster.nodes.iter().map(|n| n.name.0.clone()).collect(),
            coordinators: cluster.coordinators.iter().map(|c| c.name.0.clone()).collect(),
        }
    }
}

/// Answers QUIC requests with the replica, after checking who may ask what.
#[derive(Clone)]
struct CoordinatorHandler {
    replica: Replica,
    names: Arc<std::sync::RwLock<Names>>,
    /// The cluster file, read again when a name it did not have shows up (a router or a
    /// replica added to the file after this replica started).
    file: std::path::PathBuf,
    /// When each node was last heard from (wall ms), for `imago cluster status`.
    contacts: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
}

impl CoordinatorHandler {
    fn names<T>(&self, f: impl FnOnce(&Names) -> T) -> T {
        f(&self.names.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads the cluster file again; keeps what it had if the file is now invalid.
    fn reload(&self) {
        match crate::cluster_cmd::load_cluster(&self.file) {
            Ok(cluster) if self.names(|n| n.cluster == cluster.id) => {
                *self.names.write().unwrap_or_else(|p| p.into_inner()) = Names::of(&cluster);
            }
            Ok(_) => tracing::warn!(file = %self.file.display(), "the cluster file now names another cluster: ignored"),
            Err(e) => tracing::warn!(file = %self.file.display(), error = %e, "cannot read the cluster file again"),
        }
    }

    /// Whether `which` holds of the names, reading the cluster file again if it does not.
    fn named(&self, which: impl Fn(&Names) -> bool) -> bool {
        if self.names(&which) {
            return true;
        }
        self.reload();
        self.names(which)
    }
}

impl Handler for CoordinatorHandler {
    fn admit(&self, name: &str) -> Result<(), String> {
        if self.named(|n| n.known.contains(name)) {
            Ok(())
        } else {
            Err(format!("`{name}` is not named in the cluster file"))
        }
    }

    async fn handle(&self, peer: Arc<str>, request: Request) -> Response {
        if matches!(request, Request::Raft(_)) {
            self.named(|n| n.coordinators.contains(&*peer));
        }
        let coordinators = self.names(|n| n.coordinators.clone());
        if let Err(reason) = authorize(&peer, &coordinators, OPERATOR_NAME, &request) {
            tracing::warn!(%peer, %reason, "request refused");
            return Response::Error { reason };
        }
        if matches!(request, Request::Node(_)) {
            let mut contacts = self.contacts.lock().unwrap_or_else(|p| p.into_inner());
            match contacts.get_mut(&*peer) {
                Some(at) => *at = wall_ms(),
                None => {
                    contacts.insert(peer.to_string(), wall_ms());
                }
            }
        }
        if let Request::Cli(CliRequest::Join { node }) = &request {
            if !self.named(|n| n.nodes.contains(&node.0)) {
                let detail =
                    format!("`{node}` is not a node of the cluster file: add it there (with its addresses) first");
                return Response::Cli(CliResponse::Rejected(Rejection { kind: RejectKind::UnknownNode, detail }));
            }
        }
        match self.replica.handle(request).await {
            Response::Cli(CliResponse::Cluster(mut view)) => {
                let now = wall_ms();
                let contacts = self.contacts.lock().unwrap_or_else(|p| p.into_inner());
                view.last_contact_ms_ago =
                    contacts.iter().map(|(n, at)| (protocol::NodeName(n.clone()), now.saturating_sub(*at))).collect();
                Response::Cli(CliResponse::Cluster(view))
            }
            other => other,
        }
    }
}

/// How often a coordinator's metrics are read from its replica.
const METRICS_EVERY_MS: u64 = 500;

/// What a coordinator exports on `/metrics`: its Raft view and the upgrade as it has applied it.
struct CoordinatorMetrics {
    term: Gauge,
    leader: Gauge,
    is_leader: Gauge,
    applied_index: Gauge,
    generation: Gauge,
    epoch: Gauge,
    upgrade: Gauge,
    phase: Family<PhaseLabel, Gauge>,
    roster: Family<StatusLabel, Gauge>,
    decision_ms: Gauge<f64, std::sync::atomic::AtomicU64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

impl CoordinatorMetrics {
    fn register(registry: &mut Registry) -> CoordinatorMetrics {
        let m = CoordinatorMetrics {
            term: Gauge::default(),
            leader: Gauge::default(),
            is_leader: Gauge::default(),
            applied_index: Gauge::default(),
            generation: Gauge::default(),
            epoch: Gauge::default(),
            upgrade: Gauge::default(),
            phase: Family::default(),
            roster: Family::default(),
            decision_ms: Gauge::default(),
        };
        registry.register(
            "imago_switch_decision_ms",
            "How long the last freeze this replica decided as leader took, freeze applied to outcome applied",
            m.decision_ms.clone(),
        );
        registry.register("imago_raft_term", "Raft term", m.term.clone());
        registry.register("imago_raft_leader", "The leader's replica id (0: none known)", m.leader.clone());
        registry.register("imago_raft_is_leader", "1 if this replica leads", m.is_leader.clone());
        registry.register("imago_raft_applied_index", "The last log index applied", m.applied_index.clone());
        registry.register("imago_generation", "The generation the cluster serves", m.generation.clone());
        registry.register("imago_epoch", "The highest epoch frozen", m.epoch.clone());
        registry.register("imago_upgrade", "The current (or last) upgrade's id (0: none)", m.upgrade.clone());
        registry.register("imago_upgrade_phase", "1 for the current upgrade's phase", m.phase.clone());
        registry.register("imago_roster_routers", "Routers on the roster, by status", m.roster.clone());
        m
    }

    fn update(&self, replica: &Replica) {
        let view = replica.cluster_view();
        self.term.set(view.term as i64);
        self.leader.set(view.leader.unwrap_or(0) as i64);
        self.is_leader.set(i64::from(view.leader == Some(view.replica)));
        self.applied_index.set(view.applied_index.unwrap_or(0) as i64);
        self.generation.set(view.generation.0 as i64);
        self.decision_ms.set(replica.last_decision_us() as f64 / 1000.0);
        let (epoch, upgrade, phase) = replica
            .read(|s| (s.last_epoch.0, s.current.as_ref().map_or(0, |u| u.id.0), s.current.as_ref().map(|u| u.phase)));
        self.epoch.set(epoch as i64);
        self.upgrade.set(upgrade as i64);
        self.phase.clear();
        if let Some(phase) = phase {
            self.phase.get_or_create(&PhaseLabel { phase: format!("{phase:?}") }).set(1);
        }
        self.roster.clear();
        for (_, status) in &view.roster {
            self.roster.get_or_create(&StatusLabel { status: format!("{status:?}") }).inc();
        }
    }
}

pub fn run(args: CoordinatorArgs) -> anyhow::Result<std::process::ExitCode> {
    let cluster = args.cluster.load()?;
    let Some(me) = cluster.coordinator_named(&args.name).cloned() else {
        bail!("`{}` is not a coordinator in the cluster file", args.name);
    };
    let identity = quic::certs::load(&cluster.certs, &cluster.id, &me.name.0)
        .with_context(|| format!("loading the certificate of `{}`", me.name))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let disk = open_data_dir(&me.data, &cluster.id, UpgradeState::default())?;
        let endpoint = bind_server(&identity, me.address)?;
        let peers = crate::cluster_cmd::coordinator_peers(&cluster);
        let transport = QuicTransport::new(endpoint.clone(), &cluster.id, peers);
        let members: Vec<u64> = cluster.coordinators.iter().map(|c| c.id).collect();
        // The replica with the lowest id bootstraps the group (a no-op once it has a log).
        let initialize = members.iter().min() == Some(&me.id);
        let replica = Replica::start(me.id, &members, disk, transport, RaftTiming::default(), Arc::new(wall_ms), false)
            .await
            .map_err(anyhow::Error::msg)?;
        if args.rebuilt {
            replica.set_rebuilt();
        }
        if initialize {
            // Each member as the others will dial it: `name@address` (a replica added later is
            // learnt the same way, from the membership).
            let nodes: BTreeMap<u64, BasicNode> = cluster
                .coordinators
                .iter()
                .map(|c| (c.id, BasicNode::new(format!("{}@{}", c.name, c.address))))
                .collect();
            // Already initialized is fine: a restarted initializer keeps its log.
            let _ = replica.raft.initialize(nodes).await;
        }
        let handler = CoordinatorHandler {
            replica: replica.clone(),
            names: Arc::new(std::sync::RwLock::new(Names::of(&cluster))),
            file: args.cluster.file.clone().expect("loaded from a file"),
            contacts: Arc::default(),
        };
        tokio::spawn(serve(endpoint.clone(), cluster.id.as_str().into(), handler));
        if let Some(addr) = me.metrics {
            let mut registry = prometheus_client::registry::Registry::default();
            let metrics = CoordinatorMetrics::register(&mut registry);
            crate::metrics_http::serve(addr, Arc::new(registry)).await?;
            let watched = replica.clone();
            tokio::spawn(async move {
                loop {
                    metrics.update(&watched);
                    tokio::time::sleep(Duration::from_millis(METRICS_EVERY_MS)).await;
                }
            });
        }
        let driver = replica.clone();
        tokio::spawn(async move { driver.run_driver().await });
        tracing::info!(
            replica = me.id,
            name = %me.name,
            cluster = %cluster.id,
            address = %me.address,
            data = %me.data.display(),
            "coordinator serving"
        );
        eprintln!("coordinator {} (replica {}) of cluster `{}` serving on {}", me.name, me.id, cluster.id, me.address);
        crate::signals::terminated().await;
        tracing::info!("stopping");
        replica.shutdown().await;
        quic::endpoint::shut_down(&endpoint, Duration::from_secs(2)).await;
        Ok(std::process::ExitCode::SUCCESS)
    })
}
