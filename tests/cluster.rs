//! End-to-end tests of a real coordinator group: `imago coordinator` processes on 127.0.0.1,
//! QUIC with mutual TLS, durable data directories, and the operator's CLI.

// Real processes on a real machine: these tests time them with the wall clock.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn imago() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imago"))
}

/// A free UDP port on loopback (bound and released: good enough for tests on one machine).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A test cluster: its directory, cluster file and running processes.
struct Cluster {
    dir: PathBuf,
    file: PathBuf,
    coordinators: Vec<(String, u16)>,
    running: BTreeMap<String, Child>,
}

impl Cluster {
    /// Writes a cluster file with `n` coordinators and `nodes`, and makes its certificates.
    fn new(test: &str, n: usize, nodes: &[&str]) -> Cluster {
        let dir = std::env::temp_dir().join(format!("imago-cluster-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let coordinators: Vec<(String, u16)> = (1..=n).map(|i| (format!("coord-{i}"), free_udp_port())).collect();
        let mut text = format!("[cluster]\nid = \"{test}\"\n");
        for (i, (name, port)) in coordinators.iter().enumerate() {
            text.push_str(&format!(
                "\n[[coordinators]]\nid = {}\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\n",
                i + 1
            ));
        }
        for node in nodes {
            text.push_str(&format!("\n[[nodes]]\nname = \"{node}\"\nhttp = \"127.0.0.1:{}\"\n", free_udp_port()));
        }
        let file = dir.join("cluster.toml");
        std::fs::write(&file, text).expect("write");
        let cluster = Cluster { dir, file, coordinators, running: BTreeMap::new() };
        let out = cluster.cli(&["certs", "init"]);
        assert!(out.status.success(), "certs init: {}", String::from_utf8_lossy(&out.stderr));
        cluster
    }

    fn start(&mut self, name: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log");
        let child = imago()
            .args(["coordinator", "--name", name])
            .env("IMAGO_CLUSTER", &self.file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn");
        self.running.insert(name.to_string(), child);
    }

    fn start_all(&mut self) {
        for (name, _) in self.coordinators.clone() {
            self.start(&name);
        }
    }

    fn kill9(&mut self, name: &str) {
        if let Some(mut child) = self.running.remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit (it closes its data directory).
    fn stop(&mut self, name: &str) {
        if let Some(mut child) = self.running.remove(name) {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            for _ in 0..100 {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop_all(&mut self) {
        for name in self.running.keys().cloned().collect::<Vec<_>>() {
            self.stop(&name);
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        imago().args(args).env("IMAGO_CLUSTER", &self.file).output().expect("run imago")
    }

    /// `cluster status --json`, retried until a leader is known (at most 15 s).
    fn status_with_leader(&self) -> serde_json::Value {
        for _ in 0..150 {
            let out = self.cli(&["cluster", "status", "--json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
                if !v["leader"].is_null() {
                    return v;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no leader within 15 s; logs in {}", self.dir.display());
    }

    fn leader_name(&self) -> String {
        let leader = self.status_with_leader()["leader"].as_u64().expect("leader");
        self.coordinators[leader as usize - 1].0.clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.running) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn roster(status: &serde_json::Value) -> Vec<(String, String)> {
    status["roster"]
        .as_array()
        .expect("roster")
        .iter()
        .map(|r| (r["name"].as_str().unwrap_or("").to_string(), r["status"].as_str().unwrap_or("").to_string()))
        .collect()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {} / {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

#[test]
fn cluster_of_three_keeps_its_state_through_a_leader_crash_and_a_full_restart() {
    let mut c = Cluster::new("keep", 3, &["router-1", "router-2"]);
    c.start_all();
    let first = c.status_with_leader();
    assert_eq!(first["members"], serde_json::json!([1, 2, 3]));
    assert_eq!(first["generation"], 1);

    for router in ["router-1", "router-2"] {
        let out = c.cli(&["router", "join", router, "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(json(&out)["outcome"], "accepted");
    }
    // A name the cluster file does not have cannot join.
    let stranger = c.cli(&["router", "join", "router-9"]);
    assert_eq!(stranger.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&stranger.stderr).contains("not a node of the cluster file"));

    // kill -9 of the leader: another replica leads, with the same roster.
    let leader = c.leader_name();
    c.kill9(&leader);
    let after = loop {
        let s = c.status_with_leader();
        if c.coordinators[s["leader"].as_u64().expect("leader") as usize - 1].0 != leader {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let want = vec![("router-1".to_string(), "Active".to_string()), ("router-2".to_string(), "Active".to_string())];
    assert_eq!(roster(&after), want);
    let retire = c.cli(&["router", "retire", "router-2", "--force"]);
    assert_eq!(retire.status.code(), Some(0), "{}", String::from_utf8_lossy(&retire.stderr));

    // Every replica stopped and started again: the state is the one they committed.
    c.stop_all();
    c.start_all();
    // A new leader applies what was committed before once it commits in its own term.
    let want = vec![("router-1".to_string(), "Active".to_string()), ("router-2".to_string(), "Retired".to_string())];
    let mut restarted = c.status_with_leader();
    for _ in 0..100 {
        if roster(&restarted) == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        restarted = c.status_with_leader();
    }
    assert_eq!(roster(&restarted), want);
    assert!(restarted["term"].as_u64() > first["term"].as_u64(), "{restarted}");

    // With every coordinator down the CLI says so, quickly, with its own exit code.
    c.stop_all();
    let started = std::time::Instant::now();
    let out = c.cli(&["upgrade", "status"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no coordinator answered"));
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

#[test]
fn cluster_refuses_certificates_of_another_ca_and_survives_garbage() {
    let mut c = Cluster::new("strangers", 1, &[]);
    c.start_all();
    c.status_with_leader();

    // The same cluster id and names, but another CA: the operator's certificate is worthless.
    let other = c.dir.join("other");
    std::fs::create_dir_all(&other).expect("dir");
    let text = std::fs::read_to_string(&c.file).expect("read");
    std::fs::write(other.join("cluster.toml"), &text).expect("write");
    let init = imago().args(["certs", "init", "--cluster"]).arg(other.join("cluster.toml")).output().expect("run");
    assert!(init.status.success());
    let out =
        imago().args(["cluster", "status"]).env("IMAGO_CLUSTER", other.join("cluster.toml")).output().expect("run");
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stdout));

    // Garbage: raw datagrams, and a TLS-verified peer that sends bytes that are no frame.
    let port = c.coordinators[0].1;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    for size in [1, 100, 1200, 1500] {
        socket.send_to(&vec![0xAB; size], ("127.0.0.1", port)).expect("send");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async {
        let identity = quic::certs::load(&c.dir.join("certs"), "strangers", "operator").expect("identity");
        let endpoint = quic::endpoint::bind_client(&identity, std::net::Ipv4Addr::LOCALHOST.into()).expect("bind");
        let server = quic::certs::dns_name("coord-1", "strangers");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let connection = endpoint.connect(addr, &server).expect("connect").await.expect("handshake");
        assert!(quic::endpoint::exchange(&connection, "coord-1", b"not a frame at all").await.is_err());
        let reason = connection.closed().await;
        assert!(format!("{reason:?}").contains("malformed"), "{reason:?}");
    });

    // The coordinator still serves its own operator.
    let out = c.cli(&["cluster", "status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["leader"], 1);
    let log = std::fs::read_to_string(c.dir.join("coord-1.log")).expect("log");
    assert!(log.contains("handshake failed") || log.contains("refused"), "the refusal is logged: {log}");
    assert!(log.contains("malformed frame"), "{log}");
    c.stop_all();
}

#[test]
fn cluster_replica_refuses_a_data_directory_of_another_cluster() {
    let mut first = Cluster::new("dir-a", 1, &[]);
    first.start_all();
    first.status_with_leader();
    first.stop_all();
    // A second cluster pointed at the first one's data directory.
    let second = Cluster::new("dir-b", 1, &[]);
    let text = std::fs::read_to_string(&second.file).expect("read");
    let data: &Path = &first.dir.join("data/coord-1");
    let text = text.replace("name = \"coord-1\"\n", &format!("name = \"coord-1\"\ndata = \"{}\"\n", data.display()));
    std::fs::write(&second.file, text).expect("write");
    let out =
        imago().args(["coordinator", "--name", "coord-1"]).env("IMAGO_CLUSTER", &second.file).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("belongs to cluster `dir-a`, not `dir-b`"), "{stderr}");
}
