//! Commands that read the cluster file, and `imago certs`.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use protocol::cluster::ClusterFile;
use std::path::{Path, PathBuf};

/// Where the cluster file is: `--cluster FILE`, or the `IMAGO_CLUSTER` environment variable.
#[derive(Args, Clone, Debug)]
pub struct ClusterArg {
    /// The cluster file (TOML): cluster id, certificate directory, coordinators, nodes.
    #[arg(long = "cluster", env = "IMAGO_CLUSTER", value_name = "FILE")]
    pub file: Option<PathBuf>,
}

impl ClusterArg {
    /// Loads and validates the cluster file; relative paths in it are resolved against its
    /// directory. An invalid file is an error naming file, line and field.
    pub fn load(&self) -> anyhow::Result<ClusterFile> {
        let Some(file) = &self.file else {
            bail!("no cluster file: pass --cluster FILE or set IMAGO_CLUSTER");
        };
        load_cluster(file)
    }
}

/// The coordinators as a QUIC client dials them (by Raft id).
pub fn coordinator_peers(cluster: &ClusterFile) -> std::collections::BTreeMap<u64, quic::Peer> {
    cluster.coordinators.iter().map(|c| (c.id, quic::Peer { address: c.address, name: c.name.0.clone() })).collect()
}

/// A client endpoint for `identity` (on loopback if the coordinators are there, else on every
/// interface), and a transport to the coordinators over it.
pub fn coordinator_client(
    cluster: &ClusterFile,
    identity: &quic::Identity,
) -> anyhow::Result<(quic::endpoint::Endpoint, quic::QuicTransport)> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let interface = match cluster.coordinators.first().map(|c| c.address.ip()) {
        Some(ip) if ip.is_loopback() => ip,
        Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let endpoint = quic::endpoint::bind_client(identity, interface)?;
    let transport = quic::QuicTransport::new(endpoint.clone(), &cluster.id, coordinator_peers(cluster));
    Ok((endpoint, transport))
}

/// Loads the cluster file at `file`.
pub fn load_cluster(file: &Path) -> anyhow::Result<ClusterFile> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading the cluster file {}", file.display()))?;
    let cluster = ClusterFile::from_toml(&file.display().to_string(), &text)?;
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(cluster.resolve(dir))
}

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Make a cluster CA and one certificate and key per name (keys are written with mode 0600;
    /// nothing is overwritten). With --cluster and no --names: every name in the cluster file,
    /// and `operator` (the CLI), into the file's certificate directory.
    Init(CertsArgs),
    /// Add certificates for new names (a router that joins later), signed by the CA in DIR.
    Add(CertsArgs),
}

#[derive(Args)]
pub struct CertsArgs {
    /// The certificate directory (default: the cluster file's `cluster.certs`).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Comma-separated names, e.g. coord-1,coord-2,coord-3,router-1,operator.
    #[arg(long, value_delimiter = ',')]
    names: Vec<String>,
    /// The cluster id (default: the cluster file's `cluster.id`).
    #[arg(long)]
    cluster_id: Option<String>,
    #[command(flatten)]
    cluster: ClusterArg,
}

pub fn certs(command: CertsCommand) -> anyhow::Result<std::process::ExitCode> {
    let (init, args) = match command {
        CertsCommand::Init(args) => (true, args),
        CertsCommand::Add(args) => (false, args),
    };
    let file =
        if args.cluster.file.is_some() && (args.dir.is_none() || args.cluster_id.is_none() || args.names.is_empty()) {
            Some(args.cluster.load()?)
        } else {
            None
        };
    let dir = match (&args.dir, &file) {
        (Some(dir), _) => dir.clone(),
        (None, Some(f)) => f.certs.clone(),
        (None, None) => bail!("no certificate directory: pass --dir DIR (or --cluster FILE)"),
    };
    let cluster_id = match (&args.cluster_id, &file) {
        (Some(id), _) => id.clone(),
        (None, Some(f)) => f.id.clone(),
        (None, None) => bail!("no cluster id: pass --cluster-id ID (or --cluster FILE)"),
    };
    let names = match (args.names.is_empty(), &file) {
        (false, _) => args.names.clone(),
        (true, Some(f)) if init => f.names(),
        _ => bail!("no names: pass --names NAME,NAME,..."),
    };
    let written =
        if init { quic::certs::init(&dir, &cluster_id, &names)? } else { quic::certs::add(&dir, &cluster_id, &names)? };
    for path in &written {
        println!("wrote {}", path.display());
    }
    println!(
        "{} certificate(s) for cluster `{cluster_id}` in {} ({}); keep the *.key files secret",
        names.len(),
        dir.display(),
        if init { "new CA" } else { "existing CA" }
    );
    Ok(std::process::ExitCode::SUCCESS)
}
