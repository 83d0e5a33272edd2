//! The cluster file: one TOML file that names a cluster and every Imago process in it.
//!
//! ```toml
//! [cluster]
//! id = "shop-eu"            # in every data directory, disk record and certificate
//! certs = "certs"           # the certificate directory (`imago certs init`), relative to this file
//!
//! [[coordinators]]
//! id = 1                    # the Raft id, never reused
//! name = "coord-1"          # the name in its certificate
//! address = "127.0.0.1:7101"  # QUIC: Raft, nodes and the CLI
//! data = "data/coord-1"     # optional (default `data/<name>`, relative to this file)
//! metrics = "127.0.0.1:9101"  # optional: Prometheus `/metrics`
//!
//! [universe]                # generation 1: where the system that ran before Imago answers
//! endpoints = ["http://10.0.1.5:8080"]
//!
//! [[nodes]]
//! name = "router-1"
//! address = "127.0.0.1:7201"  # optional: QUIC, for notices from other nodes
//! http = "127.0.0.1:8080"     # optional: the ingress proxy's listen address (routers)
//! metrics = "127.0.0.1:9201"  # optional
//! data = "data/router-1"      # optional
//! ```
//!
//! [`ClusterFile::from_toml`] parses and validates; every error names the file, the line and
//! column, and the field, as a plan's errors do. Paths stay relative here: [`ClusterFile::resolve`]
//! joins them to the cluster file's directory (the one place that knows it).

use crate::ids::NodeName;
use crate::located::FileError;
use crate::ReplicaId;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Most coordinator replicas a cluster file may name (Raft quorums beyond that only slow commits).
pub const COORDINATORS_MAX: usize = 7;
/// Most nodes a cluster file may name.
pub const NODES_MAX: usize = 1_000;
/// Longest name (a DNS label, so that it fits a certificate's subject alternative name).
pub const NAME_BYTES_MAX: usize = 63;
/// The name of the operator's certificate (the CLI). No process may take it.
pub const OPERATOR_NAME: &str = "operator";
/// The name of the cluster CA's files in the certificate directory. No process may take it.
pub const CA_NAME: &str = "ca";

/// One coordinator replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorEntry {
    pub id: ReplicaId,
    pub name: NodeName,
    pub address: SocketAddr,
    pub data: PathBuf,
    pub metrics: Option<SocketAddr>,
}

/// One tier node (router or data node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    pub name: NodeName,
    pub address: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub data: PathBuf,
}

/// A validated cluster file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterFile {
    pub id: String,
    pub certs: PathBuf,
    pub coordinators: Vec<CoordinatorEntry>,
    pub nodes: Vec<NodeEntry>,
    /// Where generation 1 answers (routers forward there until the first switch). Later
    /// generations' endpoints come from the plans.
    pub genesis_endpoints: Vec<String>,
}

impl ClusterFile {
    /// Parses and validates the text of cluster file `file`.
    pub fn from_toml(file: &str, text: &str) -> Result<ClusterFile, FileError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| FileError::from_toml(file, text, &e))?;
        Validator { src: crate::located::Source { file, text } }.cluster(raw)
    }

    /// Joins every relative path to `dir` (the cluster file's directory).
    pub fn resolve(mut self, dir: &Path) -> ClusterFile {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        join(&mut self.certs);
        self.coordinators.iter_mut().for_each(|c| join(&mut c.data));
        self.nodes.iter_mut().for_each(|n| join(&mut n.data));
        self
    }

    /// The coordinator with Raft id `id`.
    pub fn coordinator(&self, id: ReplicaId) -> Option<&CoordinatorEntry> {
        self.coordinators.iter().find(|c| c.id == id)
    }

    /// The coordinator named `name`.
    pub fn coordinator_named(&self, name: &str) -> Option<&CoordinatorEntry> {
        self.coordinators.iter().find(|c| c.name.0 == name)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeEntry> {
        self.nodes.iter().find(|n| n.name.0 == name)
    }

    /// Every name a certificate may carry in this cluster: coordinators, nodes and the operator.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.coordinators.iter().map(|c| c.name.0.clone()).collect();
        names.extend(self.nodes.iter().map(|n| n.name.0.clone()));
        names.push(OPERATOR_NAME.to_string());
        names
    }
}

/// Whether `name` is a valid process or cluster name: a DNS label of lowercase letters, digits
/// and inner hyphens.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

// ---- the TOML shape -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    cluster: RawCluster,
    coordinators: Spanned<Vec<RawCoordinator>>,
    #[serde(default)]
    nodes: Vec<RawNode>,
    universe: Option<RawUniverse>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUniverse {
    endpoints: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    id: Spanned<String>,
    certs: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    id: Spanned<i64>,
    name: Spanned<String>,
    address: Spanned<String>,
    data: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    address: Option<Spanned<String>>,
    http: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    data: Option<Spanned<String>>,
}

struct Validator<'a> {
    src: crate::located::Source<'a>,
}

impl Validator<'_> {
    fn name(&self, raw: &Spanned<String>, field: &str) -> Result<NodeName, FileError> {
        let name = raw.get_ref();
        if !valid_name(name) {
            return self.src.error(
                raw.span(),
                field,
                format!(
                    "`{name}` is not a valid name: 1 to {NAME_BYTES_MAX} lowercase letters, digits and inner hyphens"
                ),
            );
        }
        Ok(NodeName(name.clone()))
    }

    fn address(&self, raw: &Spanned<String>, field: &str) -> Result<SocketAddr, FileError> {
        raw.get_ref().parse().or_else(|_| {
            self.src.error(raw.span(), field, format!("`{}` is not an address of the form IP:PORT", raw.get_ref()))
        })
    }

    fn optional_address(&self, raw: &Option<Spanned<String>>, field: &str) -> Result<Option<SocketAddr>, FileError> {
        raw.as_ref().map(|a| self.address(a, field)).transpose()
    }

    fn path(&self, raw: &Option<Spanned<String>>, field: &str, default: String) -> Result<PathBuf, FileError> {
        match raw {
            None => Ok(PathBuf::from(default)),
            Some(p) if p.get_ref().trim().is_empty() => self.src.error(p.span(), field, "must not be empty"),
            Some(p) => Ok(PathBuf::from(p.get_ref())),
        }
    }

    fn cluster(&self, raw: RawFile) -> Result<ClusterFile, FileError> {
        let id = self.name(&raw.cluster.id, "cluster.id")?.0;
        let certs = self.path(&raw.cluster.certs, "cluster.certs", "certs".to_string())?;
        let listed = raw.coordinators.get_ref();
        if listed.is_empty() || listed.len() > COORDINATORS_MAX {
            return self.src.error(
                raw.coordinators.span(),
                "coordinators",
                format!("{} coordinators: name 1 to {COORDINATORS_MAX} (3 or 5 to survive failures)", listed.len()),
            );
        }
        if raw.nodes.len() > NODES_MAX {
            return self.src.error(0..0, "nodes", format!("{} nodes: at most {NODES_MAX}", raw.nodes.len()));
        }
        let mut names: BTreeSet<String> = BTreeSet::new();
        let mut addresses: BTreeSet<SocketAddr> = BTreeSet::new();
        let mut ids: BTreeSet<ReplicaId> = BTreeSet::new();
        let mut claim_name = |v: &Self, raw: &Spanned<String>, field: &str| -> Result<NodeName, FileError> {
            let name = v.name(raw, field)?;
            if name.0 == OPERATOR_NAME || name.0 == CA_NAME {
                return v.src.error(
                    raw.span(),
                    field,
                    format!("`{name}` is reserved (the operator's certificate, the CA)"),
                );
            }
            if !names.insert(name.0.clone()) {
                return v.src.error(raw.span(), field, format!("`{name}` is named twice"));
            }
            Ok(name)
        };
        let mut claim_address =
            |v: &Self, raw: &Option<Spanned<String>>, field: &str| -> Result<Option<SocketAddr>, FileError> {
                let address = v.optional_address(raw, field)?;
                if let (Some(a), Some(r)) = (address, raw) {
                    if !addresses.insert(a) {
                        return v.src.error(r.span(), field, format!("{a} is used twice"));
                    }
                }
                Ok(address)
            };
        let mut coordinators = Vec::with_capacity(listed.len());
        for (i, c) in listed.iter().enumerate() {
            let at = |f: &str| format!("coordinators[{i}].{f}");
            let id = *c.id.get_ref();
            if id < 1 {
                return self.src.error(c.id.span(), at("id"), format!("{id} is not a Raft id (1 or more)"));
            }
            if !ids.insert(id as ReplicaId) {
                return self.src.error(c.id.span(), at("id"), format!("id {id} is used twice"));
            }
            let name = claim_name(self, &c.name, &at("name"))?;
            let address = claim_address(self, &Some(c.address.clone()), &at("address"))?.expect("required");
            let metrics = claim_address(self, &c.metrics, &at("metrics"))?;
            let data = self.path(&c.data, &at("data"), format!("data/{name}"))?;
            coordinators.push(CoordinatorEntry { id: id as ReplicaId, name, address, data, metrics });
        }
        let mut nodes = Vec::with_capacity(raw.nodes.len());
        for (i, n) in raw.nodes.iter().enumerate() {
            let at = |f: &str| format!("nodes[{i}].{f}");
            let name = claim_name(self, &n.name, &at("name"))?;
            let address = claim_address(self, &n.address, &at("address"))?;
            let http = claim_address(self, &n.http, &at("http"))?;
            let metrics = claim_address(self, &n.metrics, &at("metrics"))?;
            let data = self.path(&n.data, &at("data"), format!("data/{name}"))?;
            nodes.push(NodeEntry { name, address, http, metrics, data });
        }
        let genesis_endpoints = match &raw.universe {
            None => Vec::new(),
            Some(u) => crate::plan::endpoints(self.src.file, self.src.text, &u.endpoints, "universe.endpoints")?,
        };
        Ok(ClusterFile { id, certs, coordinators, nodes, genesis_endpoints })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
id = "shop-eu"

[[coordinators]]
id = 1
name = "coord-1"
address = "127.0.0.1:7101"

[[coordinators]]
id = 2
name = "coord-2"
address = "127.0.0.1:7102"
metrics = "127.0.0.1:9102"

[[nodes]]
name = "router-1"
http = "127.0.0.1:8080"
data = "/var/lib/imago/router-1"
"#;

    fn error(text: &str) -> FileError {
        ClusterFile::from_toml("cluster.toml", text).expect_err("the file is refused")
    }

    #[test]
    fn a_good_file_parses_with_defaults_and_resolves_relative_paths() {
        let c = ClusterFile::from_toml("cluster.toml", GOOD).expect("valid");
        assert_eq!(c.id, "shop-eu");
        assert_eq!(c.coordinators.len(), 2);
        assert_eq!(c.coordinator(2).map(|c| c.metrics), Some(Some("127.0.0.1:9102".parse().expect("addr"))));
        assert_eq!(c.names(), vec!["coord-1", "coord-2", "router-1", "operator"]);
        let c = c.resolve(Path::new("/etc/imago"));
        assert_eq!(c.certs, PathBuf::from("/etc/imago/certs"));
        assert_eq!(c.coordinators[0].data, PathBuf::from("/etc/imago/data/coord-1"));
        assert_eq!(c.nodes[0].data, PathBuf::from("/var/lib/imago/router-1"), "absolute paths stay");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = error(&GOOD.replace("127.0.0.1:7102", "localhost"));
        assert_eq!((e.file.as_str(), e.line, e.field.as_str()), ("cluster.toml", 13, "coordinators[1].address"));
        assert!(e.to_string().starts_with("cluster.toml:13:11: coordinators[1].address: `localhost`"), "{e}");

        let e = error(&GOOD.replace("\"router-1\"", "\"coord-1\""));
        assert_eq!((e.line, e.field.as_str()), (17, "nodes[0].name"));
        assert!(e.message.contains("named twice"), "{e}");

        let e = error(&GOOD.replace("id = 2", "id = 1"));
        assert_eq!((e.line, e.field.as_str()), (11, "coordinators[1].id"));

        let e = error(&GOOD.replace("127.0.0.1:9102", "127.0.0.1:7101"));
        assert_eq!(e.field, "coordinators[1].metrics");
        assert!(e.message.contains("used twice"), "{e}");

        let e = error(&GOOD.replace("\"router-1\"", "\"Router_1\""));
        assert_eq!(e.field, "nodes[0].name");

        let e = error(&GOOD.replace("\"router-1\"", "\"operator\""));
        assert!(e.message.contains("reserved"), "{e}");
        let e = error(&GOOD.replace("\"router-1\"", "\"ca\""));
        assert!(e.message.contains("reserved"), "{e}");

        let e = error(&GOOD.replace("http =", "htp ="));
        assert_eq!(e.line, 18);
        assert!(e.message.contains("unknown field `htp`"), "{e}");

        let e = error(&format!("{GOOD}\n[universe]\nendpoints = [\"10.0.0.1:80\"]\n"));
        assert_eq!((e.line, e.field.as_str()), (22, "universe.endpoints[0]"));

        let e = error("[cluster]\nid = \"x\"\ncoordinators = []\n");
        assert_eq!((e.line, e.field.as_str()), (3, "coordinators"));
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(valid_name("coord-1"));
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
