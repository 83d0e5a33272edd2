//! End-to-end tests of a real coordinator group: `imago coordinator` processes on 127.0.0.1,
//! QUIC with mutual TLS, durable data directories, and the operator's CLI.

// Real processes on a real machine: these tests time them with the wall clock.
#![allow(clippy::disallowed_methods)]

use node_postgres::throwaway::{ThrowawayCluster, ThrowawayOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn imago() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imago"))
}

/// A free UDP port on loopback (bound and released: good enough for tests on one machine).
fn free_udp_port() -> u16 {
    unique_port(|| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port())
}

/// A free TCP port on loopback.
fn free_tcp_port() -> u16 {
    unique_port(|| std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port())
}

/// A port `probe` finds free that this test process has not handed out before: the OS may give
/// a port it just gave (the probe's socket is closed at once), and a cluster file naming one
/// port twice is refused.
fn unique_port(probe: impl Fn() -> u16) -> u16 {
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    loop {
        let port = probe();
        if GIVEN.lock().expect("not poisoned").insert(port) {
            return port;
        }
    }
}

/// A test cluster: its directory, cluster file and running processes.
struct Cluster {
    dir: PathBuf,
    file: PathBuf,
    coordinators: Vec<(String, u16)>,
    /// Each router's HTTP port.
    http: BTreeMap<String, u16>,
    /// Each data node's arguments beside its name (`--plan`, its databases).
    data_args: BTreeMap<String, Vec<String>>,
    running: BTreeMap<String, Child>,
}

impl Cluster {
    /// Writes a cluster file with `n` coordinators and `nodes` (routers; a name starting with
    /// `db-` is a data node, with no HTTP address), and makes its certificates.
    fn new(test: &str, n: usize, nodes: &[&str]) -> Cluster {
        Cluster::with_universe(test, n, nodes, None)
    }

    /// The same, with generation 1 answering at `genesis` (an endpoint URL).
    fn with_universe(test: &str, n: usize, nodes: &[&str], genesis: Option<&str>) -> Cluster {
        let dir = std::env::temp_dir().join(format!("imago-cluster-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let coordinators: Vec<(String, u16)> = (1..=n).map(|i| (format!("coord-{i}"), free_udp_port())).collect();
        let mut text = format!("[cluster]\nid = \"{test}\"\n");
        for (i, (name, port)) in coordinators.iter().enumerate() {
            text.push_str(&format!(
                "\n[[coordinators]]\nid = {}\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\nmetrics = \"127.0.0.1:{}\"\n",
                i + 1,
                free_tcp_port()
            ));
        }
        if let Some(endpoint) = genesis {
            text.push_str(&format!("\n[universe]\nendpoints = [\"{endpoint}\"]\n"));
        }
        let mut http = BTreeMap::new();
        for node in nodes {
            text.push_str(&format!("\n[[nodes]]\nname = \"{node}\"\nmetrics = \"127.0.0.1:{}\"\n", free_tcp_port()));
            if !node.starts_with("db-") {
                let port = free_tcp_port();
                http.insert(node.to_string(), port);
                text.push_str(&format!("http = \"127.0.0.1:{port}\"\n"));
            }
        }
        let file = dir.join("cluster.toml");
        std::fs::write(&file, text).expect("write");
        let cluster = Cluster { dir, file, coordinators, http, data_args: BTreeMap::new(), running: BTreeMap::new() };
        let out = cluster.cli(&["certs", "init"]);
        assert!(out.status.success(), "certs init: {}", String::from_utf8_lossy(&out.stderr));
        cluster
    }

    fn start(&mut self, name: &str) {
        self.start_with(name, &[]);
    }

    fn start_with(&mut self, name: &str, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log");
        let kind =
            if self.http.contains_key(name) || self.data_args.contains_key(name) { "node" } else { "coordinator" };
        let child = imago()
            .args([kind, "--name", name])
            .args(self.data_args.get(name).into_iter().flatten())
            .args(extra)
            .env("IMAGO_CLUSTER", &self.file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn");
        self.running.insert(name.to_string(), child);
    }

    /// Adds coordinator `name` (id `id`) to the cluster file, with a certificate.
    fn add_coordinator(&mut self, id: u64, name: &str) {
        let port = free_udp_port();
        let mut text = std::fs::read_to_string(&self.file).expect("read");
        text.push_str(&format!("\n[[coordinators]]\nid = {id}\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\n"));
        std::fs::write(&self.file, text).expect("write");
        self.coordinators.push((name.to_string(), port));
        let out = self.cli(&["certs", "add", "--names", name]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts every coordinator.
    fn start_all(&mut self) {
        for (name, _) in self.coordinators.clone() {
            self.start(&name);
        }
    }

    /// Stops every coordinator.
    fn stop_coordinators(&mut self) {
        for (name, _) in self.coordinators.clone() {
            self.stop(&name);
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
    // The replicated state's format is raised only once every replica says it reads it: the
    // dead one cannot say so.
    let raise = c.cli(&["cluster", "raise-format", "--to", "1"]);
    let said = String::from_utf8_lossy(&raise.stderr).into_owned();
    assert_eq!(raise.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("{leader} did not answer")) && said.contains("nothing changed"), "{said}");

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
    assert_eq!((restarted["format"].as_u64(), restarted["format_readable"].as_u64()), (Some(1), Some(1)));
    // No replica of this build reads format 2; format 1 is the one written already.
    let raise = c.cli(&["cluster", "raise-format", "--to", "2"]);
    let said = String::from_utf8_lossy(&raise.stderr).into_owned();
    assert_eq!(raise.status.code(), Some(1), "{said}");
    for (name, _) in &c.coordinators {
        assert!(said.contains(&format!("{name} reads up to format 1")), "{said}");
    }
    let raise = c.cli(&["cluster", "raise-format", "--to", "1"]);
    let said = String::from_utf8_lossy(&raise.stderr).into_owned();
    assert_eq!(raise.status.code(), Some(1), "{said}");
    assert!(said.contains("already writes format 1"), "{said}");

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

// ---- HTTP: two universes' backends and a client ---------------------------------------------

/// What the backends saw: (version, sequence number) of every admitted request (mirrored
/// copies are not admissions), in one global sequence shared by both universes.
type Admissions = std::sync::Arc<std::sync::Mutex<Vec<(String, u64)>>>;

/// One request as a test backend sees it.
struct Seen {
    method: String,
    path: String,
    /// A router's mirrored copy (`x-imago-mirror`), not an admission.
    mirror: bool,
}

/// Starts an HTTP/1.1 server on a free port of loopback that answers each request with
/// `answer(request)`: status, extra header lines (each ending in CRLF) and a JSON body.
fn http_server(answer: impl Fn(&Seen) -> (u16, String, String) + Send + Sync + 'static) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let answer = std::sync::Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let answer = answer.clone();
            std::thread::spawn(move || serve_http(stream, &*answer));
        }
    });
    port
}

fn serve_http(mut stream: std::net::TcpStream, answer: &dyn Fn(&Seen) -> (u16, String, String)) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => head.push(line.trim_end().to_ascii_lowercase()),
            }
        }
        let length: usize = head
            .iter()
            .find_map(|h| h.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let mut words = head.first().map(|l| l.split(' ')).into_iter().flatten();
        let method = words.next().unwrap_or("GET").to_ascii_uppercase();
        let path = words.next().unwrap_or("/").to_string();
        let mirror = head.iter().any(|h| h.starts_with("x-imago-mirror:"));
        let seen = Seen { method, path, mirror };
        let (status, extra, body) = answer(&seen);
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// Starts a backend of universe `version` on a free port; every answer carries `x-version` and,
/// for an admission, `x-seq`. The body is the same in both universes (so mirrored reads match).
fn backend(version: &'static str, seq: std::sync::Arc<std::sync::atomic::AtomicU64>, seen: Admissions) -> u16 {
    http_server(move |request| {
        if request.path.starts_with("/slow") {
            // Keeps a request in flight: a router acks a freeze only once none is.
            std::thread::sleep(Duration::from_millis(1_500));
        }
        (200, admit(version, request.mirror, &seq, &seen), format!("{{\"path\":\"{}\"}}", request.path))
    })
}

/// Counts an admission (not a mirrored copy) in the sequence both universes share; the header
/// lines that say so.
fn admit(version: &str, mirror: bool, seq: &std::sync::atomic::AtomicU64, seen: &Admissions) -> String {
    let mut extra = format!("x-version: {version}\r\n");
    if !mirror {
        let n = seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        seen.lock().expect("lock").push((version.to_string(), n));
        extra.push_str(&format!("x-seq: {n}\r\n"));
    }
    extra
}

/// One client request: (status, `x-version` of the answer, milliseconds it took).
fn http_call(port: u16, method: &str, path: &str) -> (u16, String, u64) {
    use std::io::{Read, Write};
    let started = std::time::Instant::now();
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new(), 0);
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(15)));
    let body = if method == "POST" { "{\"bid\":1}" } else { "" };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new(), 0);
    }
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = text
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-version:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    (status, version, started.elapsed().as_millis() as u64)
}

/// The `/metrics` text of process `name` (its address from the cluster file).
fn metrics_of(c: &Cluster, name: &str) -> String {
    let text = std::fs::read_to_string(&c.file).expect("read");
    let section = text.split("name = \"").find(|s| s.starts_with(&format!("{name}\""))).expect("named");
    let port: u16 = section
        .lines()
        .find_map(|l| l.strip_prefix("metrics = \"127.0.0.1:"))
        .and_then(|p| p.trim_end_matches('"').parse().ok())
        .expect("a metrics address");
    use std::io::{Read, Write};
    // The metrics are updated every half second: read them after that.
    std::thread::sleep(Duration::from_millis(600));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: m\r\nconnection: close\r\n\r\n").expect("write");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
}

/// The value of metric `name` (with its labels, as printed) in a `/metrics` text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// A plan from generation 1 to 2 for `routers`, whose new universe answers at `endpoint`. The
/// backends stamp their version and (admissions only) a sequence number in headers, which the
/// comparison of mirrored answers ignores; a request in flight may keep a freeze waiting 2.5 s
/// (the slow writes take 1.5 s).
fn web_plan(routers: &[&str], endpoint: &str, samples_min: u64) -> String {
    let mut plan = format!(
        "[upgrade]\nname = \"web-v2\"\nold_generation = 1\nswitch = \"manual\"\n\n[thresholds]\n\
         samples_min = {samples_min}\nmismatch_ratio_max = 0.0\nhold_ms_max = 3000\nfreeze_timeout_ms = 3000\n\
         inflight_ms_max = 2500\n\n[validation]\nignore_headers = [\"x-version\", \"x-seq\"]\n\n\
         [universe]\nendpoints = [\"{endpoint}\"]\n\n[schema.old.pages]\nkey = \"id\"\ncolumns = [\"id\", \"body\"]\n"
    );
    for r in routers {
        plan.push_str(&format!("\n[[nodes]]\nname = \"{r}\"\ntier = \"web\"\nduties = [\"route\", \"validate\"]\n"));
    }
    plan
}

fn upgrade_phase(c: &Cluster) -> String {
    let out = c.cli(&["upgrade", "status", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["phase"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Two universes (v1, v2) behind routers of a running coordinator group.
struct Web {
    c: Cluster,
    /// The backend ports of generations 2 and 3's universes.
    v2: u16,
    v3: u16,
    admissions: Admissions,
    /// The routers' HTTP ports, in the order named.
    ports: Vec<u16>,
}

/// Starts the universes' backends, 3 coordinators, and `routers` (joined, serving v1).
fn web(test: &str, routers: &[&str]) -> Web {
    web_with(test, routers, &[])
}

/// The same, with `reserve` routers named in the cluster file but neither joined nor started.
fn web_with(test: &str, routers: &[&str], reserve: &[&str]) -> Web {
    let seq = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    let admissions: Admissions = Default::default();
    let v1 = backend("v1", seq.clone(), admissions.clone());
    let v2 = backend("v2", seq.clone(), admissions.clone());
    let v3 = backend("v3", seq.clone(), admissions.clone());
    let named: Vec<&str> = routers.iter().chain(reserve).copied().collect();
    let mut c = Cluster::with_universe(test, 3, &named, Some(&format!("http://127.0.0.1:{v1}")));
    let ports = start_serving_v1(&mut c, routers);
    Web { c, v2, v3, admissions, ports }
}

/// Starts every coordinator, joins and starts `routers`, and waits until each serves v1 (a new
/// disk waits for the coordinator's first read); their HTTP ports.
fn start_serving_v1(c: &mut Cluster, routers: &[&str]) -> Vec<u16> {
    c.start_all();
    c.status_with_leader();
    for r in routers {
        assert!(c.cli(&["router", "join", r]).status.success());
        c.start(r);
    }
    let ports: Vec<u16> = routers.iter().map(|r| c.http[*r]).collect();
    for port in &ports {
        assert_eq!(answer_when_up(*port, "/ready"), (200, "v1".to_string()), "router on port {port}");
    }
    ports
}

/// The first answer of a router once it accepts connections (whatever its status).
fn answer_when_listening(port: u16, path: &str) -> (u16, String, u64) {
    for _ in 0..100 {
        let answer = http_call(port, "GET", path);
        if answer.0 != 0 {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on port {port}");
}

/// The first answer a router gives (retrying while it is not up or not serving yet): status
/// and version.
fn answer_when_up(port: u16, path: &str) -> (u16, String) {
    let mut answer = (0, String::new(), 0);
    for _ in 0..100 {
        answer = http_call(port, "GET", path);
        if answer.0 == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (answer.0, answer.1)
}

impl Web {
    /// Starts the upgrade to v2 (manual switch) and waits for its ready gate, sending reads
    /// through every router so that mirrored answers are compared.
    fn start_and_wait_for_the_gate(&self) {
        let routers: Vec<String> = self.c.running.keys().filter(|n| self.c.http.contains_key(*n)).cloned().collect();
        let routers: Vec<&str> = routers.iter().map(String::as_str).collect();
        self.start_upgrade_and_wait_for_the_gate(1, &routers, &self.ports.clone());
    }

    /// Starts the upgrade from generation `from` (to v2 or v3), naming `routers`, and waits for
    /// its gate, sending reads through `ports`.
    fn start_upgrade_and_wait_for_the_gate(&self, from: u64, routers: &[&str], ports: &[u16]) {
        let plan = self.c.dir.join(format!("plan-{from}.toml"));
        let endpoint = format!("http://127.0.0.1:{}", if from == 1 { self.v2 } else { self.v3 });
        let text = web_plan(routers, &endpoint, 10)
            .replace("old_generation = 1", &format!("old_generation = {from}"))
            .replace("web-v2", &format!("web-v{}", from + 1));
        std::fs::write(&plan, text).expect("plan");
        let start = self.c.cli(&["upgrade", "start", plan.to_str().expect("path"), "--json"]);
        assert!(start.status.success(), "{}", String::from_utf8_lossy(&start.stderr));
        for i in 0..200 {
            let out = self.c.cli(&["upgrade", "status", "--json"]);
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            if status["phase"] == "Syncing" && status["gate_blockers"].as_array().is_some_and(|b| b.is_empty()) {
                return;
            }
            for port in ports {
                http_call(*port, "GET", &format!("/warm/{i}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the ready gate did not pass; logs in {}", self.c.dir.display());
    }

    /// Waits (at most `secs`) until the upgrade's phase is one of `phases`; returns it.
    fn wait_phase(&self, phases: &[&str], secs: u64) -> String {
        for _ in 0..secs * 20 {
            let phase = upgrade_phase(&self.c);
            if phases.contains(&phase.as_str()) {
                return phase;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no phase of {phases:?} within {secs} s; logs in {}", self.c.dir.display());
    }

    /// Every v1 admission precedes every v2 admission, and every v2 one every v3 one: no
    /// request reached a universe after the next one took a request.
    fn assert_one_switch_point(&self) {
        let seen = self.admissions.lock().expect("lock").clone();
        for (old, new) in [("v1", "v2"), ("v2", "v3")] {
            let last_old = seen.iter().filter(|(v, _)| v == old).map(|(_, n)| *n).max().unwrap_or(0);
            let first_new = seen.iter().filter(|(v, _)| v == new).map(|(_, n)| *n).min().unwrap_or(u64::MAX);
            assert!(last_old < first_new, "{old}'s last admission {last_old} precedes {new}'s first {first_new}");
        }
    }
}

/// Acceptance: 3 coordinators and 2 routers in front of two universes, clients running through
/// the whole upgrade: start, mirrored validation, switch. Every v1 admission precedes the first
/// v2 admission, every answer after the switch is v2's, and no client request fails. Then every
/// coordinator is stopped and a router killed and restarted: it serves v2 from its own disk.
#[test]
fn cluster_routers_switch_two_universes_atomically_under_load() {
    let routers = ["router-1", "router-2"];
    let w = web("switch", &routers);
    let ports = w.ports.clone();

    // Clients: reads and writes through both routers, all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let results = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|k| {
            let (stop, results, ports) = (stop.clone(), results.clone(), ports.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let method = if i.is_multiple_of(3) { "POST" } else { "GET" };
                    let r = http_call(ports[(i as usize + k) % ports.len()], method, &format!("/item/{k}/{i}"));
                    results.lock().expect("lock").push((std::time::Instant::now(), r));
                    i += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();

    w.start_and_wait_for_the_gate();
    let switch = w.c.cli(&["upgrade", "switch"]);
    assert!(switch.status.success(), "{}", String::from_utf8_lossy(&switch.stderr));
    w.wait_phase(&["Done"], 10);
    let switched_at = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for client in clients {
        client.join().expect("client");
    }

    let results = results.lock().expect("lock").clone();
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.0 != 200).collect();
    assert!(failed.is_empty(), "failed client requests: {:?}", &failed[..failed.len().min(5)]);
    let after: Vec<_> = results.iter().filter(|(at, _)| *at > switched_at).collect();
    assert!(!after.is_empty());
    assert!(after.iter().all(|(_, r)| r.1 == "v2"), "every answer after the switch is v2's");
    w.assert_one_switch_point();
    // What the processes export: the router counted its answers, mirrors and the switch; the
    // coordinator its Raft view and the upgrade.
    let router = metrics_of(&w.c, "router-1");
    assert!(metric(&router, "imago_serving_generation") == Some(2.0), "{router}");
    assert!(metric(&router, "imago_mirrored_total").is_some_and(|n| n >= 5.0), "{router}");
    assert!(metric(&router, "imago_requests_total{outcome=\"answered\"}").is_some_and(|n| n > 100.0), "{router}");
    assert_eq!(metric(&router, "imago_epoch"), Some(1.0));
    // And what they log: the leader each phase of the upgrade, the router each decision.
    let logs: String = ["coord-1", "coord-2", "coord-3"]
        .iter()
        .map(|n| std::fs::read_to_string(w.c.dir.join(format!("{n}.log"))).unwrap_or_default())
        .collect();
    for phase in ["Syncing", "Freezing", "Done"] {
        assert!(logs.contains(&format!("phase={phase}")), "the leader logs the {phase} phase");
    }
    let router_log = std::fs::read_to_string(w.c.dir.join("router-1.log")).unwrap_or_default();
    assert!(router_log.contains("acting on the decision decision=Commit(Epoch(1))"), "{router_log}");
    // In the span of the upgrade and its epoch.
    assert!(
        router_log.lines().any(|l| l.contains("upgrade{id=1 epoch=1}") && l.contains("decision=Commit(Epoch(1))")),
        "{router_log}"
    );
    assert!(logs.lines().any(|l| l.contains("upgrade{id=1 epoch=1}") && l.contains("phase=Done")), "{logs}");
    let contacts = json(&w.c.cli(&["cluster", "status", "--json"]))["last_contact_ms_ago"].to_string();
    assert!(contacts.contains("router-1") && contacts.contains("router-2"), "nodes heard from: {contacts}");
    let coordinator = metrics_of(&w.c, &w.c.leader_name());
    assert_eq!(metric(&coordinator, "imago_generation"), Some(2.0), "{coordinator}");
    assert_eq!(metric(&coordinator, "imago_raft_is_leader"), Some(1.0));
    assert_eq!(metric(&coordinator, "imago_upgrade_phase{phase=\"Done\"}"), Some(1.0), "{coordinator}");
    let mut latencies: Vec<u64> = results.iter().map(|(_, r)| r.2).collect();
    latencies.sort_unstable();
    let p99 = latencies[latencies.len() * 99 / 100];
    println!(
        "switch under load: {} requests, none failed; latency p99 {p99} ms, max {} ms (the hold is within it)",
        latencies.len(),
        latencies.last().copied().unwrap_or(0)
    );

    // Isolation: with every coordinator down, a router killed and restarted serves v2 at once.
    let mut c = w.c;
    c.stop_coordinators();
    c.kill9("router-1");
    c.start("router-1");
    let mut answer = (0, String::new(), 0);
    for _ in 0..50 {
        answer = http_call(ports[0], "GET", "/after-restart");
        if answer.0 != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!((answer.0, answer.1.as_str()), (200, "v2"), "served from its own disk, no coordinator");
    // Every coordinator restarted: the upgrade's state is what they had committed.
    c.start_all();
    c.status_with_leader();
    let status = json(&c.cli(&["upgrade", "status", "--json"]));
    assert_eq!((status["phase"].as_str(), status["generation"].as_u64()), (Some("Done"), Some(2)), "{status}");
    c.stop_all();
}

/// Starts a write that keeps its router's request in flight for 1.5 s (a router acks a freeze
/// only once nothing is in flight to the old universe), asks for the switch, and waits until the
/// coordinators have applied the freeze. Returns the slow write's thread (its status).
fn switch_with_a_slow_write(w: &Web, port: u16) -> std::thread::JoinHandle<u16> {
    let slow = std::thread::spawn(move || http_call(port, "POST", "/slow/write").0);
    std::thread::sleep(Duration::from_millis(200));
    let switch = w.c.cli(&["upgrade", "switch"]);
    assert!(switch.status.success(), "{}", String::from_utf8_lossy(&switch.stderr));
    w.wait_phase(&["Freezing"], 5);
    slow
}

/// The version every router answers with, once they agree (at most 20 s).
fn agreed_version(ports: &[u16]) -> String {
    let mut last = Vec::new();
    for _ in 0..200 {
        last = ports.iter().map(|p| http_call(*p, "GET", "/agree")).collect::<Vec<_>>();
        if last.iter().all(|r| r.0 == 200 && r.1 == last[0].1) {
            return last[0].1.clone();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the routers never agreed: {last:?}");
}

/// Acceptance: kill -9 of the coordinator leader while a freeze is pending. The upgrade still
/// ends consistently: the routers serve one universe, the one the outcome names, and no request
/// reached the other.
#[test]
fn cluster_leader_killed_during_freezing_ends_consistently() {
    let mut w = web("leader-kill", &["router-1", "router-2"]);
    w.start_and_wait_for_the_gate();
    let slow = switch_with_a_slow_write(&w, w.ports[0]);
    let leader = w.c.leader_name();
    w.c.kill9(&leader);
    let status = slow.join().expect("slow write");
    assert!(status == 200 || status == 504, "the slow write was answered or its outcome is unknown: {status}");
    // The write ends 1.5 s into the freeze; its router then acks to a live replica well before
    // the freeze's 3 s deadline, so the new leader commits. (It once aborted: the ack waited
    // 3 s on the dead leader.)
    let phase = w.wait_phase(&["Done", "Syncing", "RolledBack"], 20);
    let status = String::from_utf8_lossy(&w.c.cli(&["upgrade", "status", "--json"]).stdout).into_owned();
    assert_eq!(phase, "Done", "{status}");
    assert_eq!(agreed_version(&w.ports), "v2");
    println!("leader {leader} killed during the freeze: the new leader committed; the routers serve v2");
    w.assert_one_switch_point();
}

/// Acceptance: kill -9 of a router while a freeze is pending, then restart: it serves the
/// committed outcome (its disk holds the freeze: it holds until it learns the outcome), never
/// the other universe.
#[test]
fn cluster_router_killed_during_freezing_serves_the_outcome_after_restart() {
    let mut w = web("router-kill", &["router-1", "router-2"]);
    w.start_and_wait_for_the_gate();
    let slow = switch_with_a_slow_write(&w, w.ports[0]);
    w.c.kill9("router-1");
    let _ = slow.join();
    w.c.start("router-1");
    // Restarted on a disk that holds the freeze, it holds until it learns the outcome; with
    // nothing in flight any more it acks, and the freeze commits.
    let phase = w.wait_phase(&["Done", "Syncing", "RolledBack"], 20);
    assert_eq!(phase, "Done");
    assert_eq!(agreed_version(&w.ports), "v2", "both routers serve the committed outcome");
    w.assert_one_switch_point();
}

/// Acceptance: a second upgrade (v2 → v3) after the first, with a router joined between them
/// and one retired. The retired router serves nothing; the others switch again.
#[test]
fn cluster_second_upgrade_after_a_router_joined_and_one_retired() {
    let mut w = web_with("chain", &["router-1", "router-2"], &["router-3"]);
    w.start_and_wait_for_the_gate();
    assert!(w.c.cli(&["upgrade", "switch"]).status.success());
    w.wait_phase(&["Done"], 10);
    assert_eq!(agreed_version(&w.ports), "v2");

    // Between the upgrades: router-3 joins (a new disk: it reads the coordinator first, then
    // serves what the cluster serves), router-2 is retired (it acks once nothing is in flight).
    assert!(w.c.cli(&["router", "join", "router-3"]).status.success());
    w.c.start("router-3");
    let port3 = w.c.http["router-3"];
    assert_eq!(answer_when_up(port3, "/joined"), (200, "v2".to_string()), "the new router serves generation 2");
    let retire = w.c.cli(&["router", "retire", "router-2"]);
    assert!(retire.status.success(), "{}", String::from_utf8_lossy(&retire.stderr));
    let port2 = w.c.http["router-2"];
    let mut retired = false;
    for _ in 0..100 {
        let status = w.c.cli(&["cluster", "status", "--json"]);
        let roster = roster(&json(&status));
        if roster.contains(&("router-2".to_string(), "Retired".to_string())) {
            retired = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(retired, "router-2 acks its retirement");
    assert_eq!(http_call(port2, "GET", "/retired").0, 503, "a retired router serves nothing");

    let live = [w.ports[0], port3];
    w.start_upgrade_and_wait_for_the_gate(2, &["router-1", "router-3"], &live);
    assert!(w.c.cli(&["upgrade", "switch"]).status.success());
    w.wait_phase(&["Done"], 10);
    assert_eq!(agreed_version(&live), "v3");
    let status = json(&w.c.cli(&["upgrade", "status", "--json"]));
    assert_eq!(status["generation"], 3);
    assert_eq!(http_call(port2, "GET", "/still-retired").0, 503);
    w.assert_one_switch_point();
}

/// Acceptance (isolation): with every coordinator stopped while no freeze is pending, under
/// steady load, every router is restarted in turn: clients (which fail over to the other
/// router when one does not accept connections, as a load balancer would) see no failed
/// request. Routers restarted on their own disks never wait for the coordinators.
#[test]
fn cluster_without_coordinators_routers_restart_under_load_and_no_request_fails() {
    let mut w = web("isolation", &["router-1", "router-2"]);
    w.c.stop_coordinators();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let results = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|k| {
            let (stop, results, ports) = (stop.clone(), results.clone(), w.ports.clone());
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let method = if i.is_multiple_of(3) { "POST" } else { "GET" };
                    let first = (i + k) % ports.len();
                    // Not accepting (0): the other router. Any answer is the client's result.
                    let mut r = http_call(ports[first], method, &format!("/steady/{k}/{i}"));
                    if r.0 == 0 {
                        r = http_call(ports[(first + 1) % ports.len()], method, &format!("/steady/{k}/{i}"));
                    }
                    results.lock().expect("lock").push(r);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    for (name, port) in [("router-1", w.ports[0]), ("router-2", w.ports[1])] {
        std::thread::sleep(Duration::from_millis(300));
        w.c.stop(name);
        w.c.start(name);
        assert_eq!(answer_when_up(port, "/back"), (200, "v1".to_string()), "{name} serves from its disk");
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for client in clients {
        client.join().expect("client");
    }
    let results = results.lock().expect("lock").clone();
    let failed: Vec<_> = results.iter().filter(|r| r.0 != 200).collect();
    println!("{} requests while every router restarted with no coordinator; failed: {}", results.len(), failed.len());
    assert!(results.len() > 100);
    assert!(failed.is_empty(), "failed: {:?}", &failed[..failed.len().min(5)]);
    assert!(results.iter().all(|r| r.1 == "v1"));
}

/// Acceptance: a node off the roster, a node with a certificate of another CA, and a node
/// presenting another's name are refused; garbage on a router's HTTP port closes that
/// connection only.
#[test]
fn cluster_refuses_nodes_off_the_roster_of_another_ca_or_under_another_name() {
    let mut w = web_with("node-refusals", &["router-1"], &["router-2", "router-3"]);
    // Off the roster: it may read the coordinator, but it serves nothing.
    w.c.start("router-2");
    let off = answer_when_listening(w.c.http["router-2"], "/off-roster");
    assert_eq!(off.0, 503, "a router off the roster serves nothing");

    // Another CA: the same cluster file but another certificate directory.
    let other = w.c.dir.join("other.toml");
    let text = std::fs::read_to_string(&w.c.file)
        .expect("read")
        .replace("id = \"node-refusals\"\n", "id = \"node-refusals\"\ncerts = \"other-certs\"\n");
    std::fs::write(&other, text).expect("write");
    let init = imago().args(["certs", "init", "--cluster"]).arg(&other).output().expect("run");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let log = std::fs::File::create(w.c.dir.join("stranger.log")).expect("log");
    let mut stranger = imago()
        .args(["node", "--name", "router-3", "--cluster"])
        .arg(&other)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let refused = answer_when_listening(w.c.http["router-3"], "/stranger");
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert_eq!(refused.0, 503, "a node the coordinators refuse never learns what to serve");
    let coordinator_logs: String = ["coord-1", "coord-2", "coord-3"]
        .iter()
        .map(|n| std::fs::read_to_string(w.c.dir.join(format!("{n}.log"))).unwrap_or_default())
        .collect();
    assert!(coordinator_logs.contains("handshake failed"), "the refusal is logged");

    // Another's name: router-3's files are router-1's certificate and key.
    for ext in ["pem", "key"] {
        let certs = w.c.dir.join("certs");
        std::fs::copy(certs.join(format!("router-1.{ext}")), certs.join(format!("router-3.{ext}"))).expect("copy");
    }
    let impostor = w.c.cli(&["node", "--name", "router-3"]);
    assert_eq!(impostor.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&impostor.stderr).contains("not for `router-3"),
        "{}",
        String::from_utf8_lossy(&impostor.stderr)
    );

    // Garbage on the router's HTTP port: that connection is answered or closed, nothing else.
    use std::io::{Read, Write};
    let port = w.ports[0];
    for garbage in [&b"\x00\x01\x02 not http at all\r\n\r\n"[..], &[b'A'; 100_000][..]] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(garbage);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        assert!(answer.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
    }
    assert_eq!(answer_when_up(port, "/still-serving"), (200, "v1".to_string()));
    w.c.stop_all();
}

/// Acceptance: a replica replaced (a new one added, the old one removed) while an upgrade is
/// syncing; the upgrade then switches.
#[test]
fn cluster_replica_replaced_while_syncing_then_the_upgrade_switches() {
    let mut w = web("replace", &["router-1", "router-2"]);
    w.start_and_wait_for_the_gate();
    w.c.add_coordinator(4, "coord-4");
    w.c.start("coord-4");
    let add = w.c.cli(&["cluster", "add-replica", "coord-4"]);
    assert!(add.status.success(), "{}{}", String::from_utf8_lossy(&add.stdout), String::from_utf8_lossy(&add.stderr));
    let again = w.c.cli(&["cluster", "add-replica", "coord-4"]);
    assert_eq!(again.status.code(), Some(1), "already a member: refused");
    let remove = w.c.cli(&["cluster", "remove-replica", "coord-3"]);
    assert!(remove.status.success(), "{}", String::from_utf8_lossy(&remove.stderr));
    w.c.stop("coord-3");
    let mut members = serde_json::Value::Null;
    for _ in 0..50 {
        members = w.c.status_with_leader()["members"].clone();
        if members == serde_json::json!([1, 2, 4]) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(members, serde_json::json!([1, 2, 4]));
    assert_eq!(upgrade_phase(&w.c), "Syncing", "the upgrade went on syncing");
    assert!(w.c.cli(&["upgrade", "switch"]).status.success());
    w.wait_phase(&["Done"], 10);
    assert_eq!(agreed_version(&w.ports), "v2");
    // The new replica holds the state: stop one of the old ones, and a quorum of {2, 4} (with
    // 1 gone) still answers with the upgrade done.
    w.c.stop("coord-1");
    w.wait_phase(&["Done"], 10);
    w.assert_one_switch_point();
}

/// Mirrored answers are compared header by header: with the backends' version header not
/// ignored, every mirrored read mismatches and the gate stays shut. With the plan's ignore
/// rules the gate passes; then a request on a route the plan names long (a stream that would
/// last 1.5 s) does not hold the freeze: it is ended at once (504), and the switch completes.
#[test]
fn cluster_mirrors_compare_headers_and_a_long_request_does_not_hold_the_switch() {
    let w = web("rules", &["router-1"]);
    let port = w.ports[0];
    let endpoint = format!("http://127.0.0.1:{}", w.v2);
    let strict = web_plan(&["router-1"], &endpoint, 10)
        .replace("ignore_headers = [\"x-version\", \"x-seq\"]", "ignore_headers = []")
        .replace("web-v2", "web-v2-strict");
    let plan = w.c.dir.join("strict.toml");
    std::fs::write(&plan, strict).expect("plan");
    assert!(w.c.cli(&["upgrade", "start", plan.to_str().expect("path")]).status.success());
    let mut status = serde_json::Value::Null;
    for i in 0..100 {
        http_call(port, "GET", &format!("/read/{i}"));
        status = json(&w.c.cli(&["upgrade", "status", "--json"]));
        let mismatches = status["nodes"][0]["report"]["mismatches"].as_u64().unwrap_or(0);
        if mismatches >= 10 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = &status["nodes"][0]["report"];
    assert!(report["mismatches"].as_u64().unwrap_or(0) >= 10, "x-version differs on every read: {status}");
    assert_eq!(report["mismatches"], report["samples"], "{status}");
    assert!(!status["gate_blockers"].as_array().expect("blockers").is_empty(), "the gate stays shut: {status}");
    assert!(w.c.cli(&["upgrade", "abort"]).status.success());
    w.wait_phase(&["RolledBack"], 10);

    // The plan that ignores the stamps, with a long route.
    let plan = w.c.dir.join("plan-1.toml");
    let text = web_plan(&["router-1"], &endpoint, 10) + "\n[routes]\nlong = [\"/slow/stream\"]\n";
    std::fs::write(&plan, text).expect("plan");
    assert!(w.c.cli(&["upgrade", "start", plan.to_str().expect("path")]).status.success());
    let mut open = false;
    for i in 0..200 {
        http_call(port, "GET", &format!("/warm/{i}"));
        let status = json(&w.c.cli(&["upgrade", "status", "--json"]));
        if status["phase"] == "Syncing" && status["gate_blockers"].as_array().is_some_and(|b| b.is_empty()) {
            assert_eq!(status["nodes"][0]["report"]["mismatches"], 0, "{status}");
            open = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(open, "the ready gate did not pass; logs in {}", w.c.dir.display());
    let stream = std::thread::spawn(move || http_call(port, "GET", "/slow/stream"));
    std::thread::sleep(Duration::from_millis(200));
    let switched_at = std::time::Instant::now();
    assert!(w.c.cli(&["upgrade", "switch"]).status.success());
    assert_eq!(w.wait_phase(&["Done", "RolledBack"], 10), "Done");
    let (status, _, _) = stream.join().expect("stream");
    assert_eq!(status, 504, "the long request was ended at the freeze: its outcome is unknown");
    assert!(
        switched_at.elapsed() < Duration::from_millis(1_300),
        "the switch did not wait for the 1.5 s stream: {:?}",
        switched_at.elapsed()
    );
    assert_eq!(http_call(port, "GET", "/after").1, "v2");
    let metrics = metrics_of(&w.c, "router-1");
    assert_eq!(metric(&metrics, "imago_requests_ended_total"), Some(1.0), "{metrics}");
    let mut c = w.c;
    c.stop_all();
}

/// Disaster recovery: every coordinator's data is lost after a switch. Routers keep serving
/// from their disks; a group started afresh and told `imago cluster recover` learns from the
/// routers' disks the generation served and the last epoch, and the next upgrade (whose views
/// and epochs the routers would otherwise take for stale ones) switches.
#[test]
fn cluster_rebuilt_from_nothing_learns_from_the_nodes_disks_and_upgrades_again() {
    let mut w = web("recover", &["router-1", "router-2"]);
    w.start_and_wait_for_the_gate();
    assert!(w.c.cli(&["upgrade", "switch"]).status.success());
    w.wait_phase(&["Done"], 10);
    assert_eq!(agreed_version(&w.ports), "v2");

    // The disaster: every replica and its data gone.
    w.c.stop_coordinators();
    std::fs::remove_dir_all(w.c.dir.join("data").join("coord-1")).expect("coord-1's data");
    for i in 2..=3 {
        let _ = std::fs::remove_dir_all(w.c.dir.join("data").join(format!("coord-{i}")));
    }
    for port in &w.ports {
        assert_eq!(http_call(*port, "GET", "/alone").1, "v2", "routers serve from their disks");
    }
    w.c.start_all();
    w.c.status_with_leader();
    // A group that decided anything of its own (here a join, taken: a fresh group knows no
    // roster) is not one rebuilt from nothing: it refuses to recover. Start it over.
    assert!(w.c.cli(&["router", "join", "router-1"]).status.success());
    let refused = w.c.cli(&["cluster", "recover"]);
    assert_eq!(refused.status.code(), Some(1), "{}", String::from_utf8_lossy(&refused.stderr));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("state of its own"));
    // Started as the design notes say, with `--rebuilt`: the group refuses anything but the
    // recovery, with a message that says what to do.
    w.c.stop_coordinators();
    for i in 1..=3 {
        let _ = std::fs::remove_dir_all(w.c.dir.join("data").join(format!("coord-{i}")));
    }
    for (name, _) in w.c.coordinators.clone() {
        w.c.start_with(&name, &["--rebuilt"]);
    }
    w.c.status_with_leader();
    let mut refused = w.c.cli(&["router", "join", "router-1"]);
    for _ in 0..50 {
        // No leader yet (exit 3) or no answer known (4): asked again; the refusal is 1.
        if refused.status.code() == Some(1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        refused = w.c.cli(&["router", "join", "router-1"]);
    }
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(said.contains("rebuilt from nothing") && said.contains("imago cluster recover"), "{said}");
    let status = json(&w.c.cli(&["upgrade", "status", "--json"]));
    assert!(status["recovery_blocked"].as_str().is_some_and(|s| s.contains("cluster recover")), "{status}");
    let recover = w.c.cli(&["cluster", "recover"]);
    assert!(recover.status.success(), "{}", String::from_utf8_lossy(&recover.stderr));
    let mut recovered = serde_json::Value::Null;
    for _ in 0..150 {
        let status = json(&w.c.cli(&["upgrade", "status", "--json"]));
        if status["recovery_waiting"].is_null() && status["generation"] == 2 {
            recovered = status;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!((recovered["generation"].as_u64(), recovered["epoch"].as_u64()), (Some(2), Some(1)), "{recovered}");
    let cluster = json(&w.c.cli(&["cluster", "status", "--json"]));
    let on_roster = roster(&cluster);
    for r in ["router-1", "router-2"] {
        assert!(on_roster.contains(&(r.to_string(), "Active".to_string())), "{on_roster:?}");
    }
    for port in &w.ports {
        assert_eq!(http_call(*port, "GET", "/recovered").1, "v2");
    }
    // The next upgrade: its epoch (2), id (2) and views are newer than anything the routers saw.
    w.start_upgrade_and_wait_for_the_gate(2, &["router-1", "router-2"], &w.ports.clone());
    let status = json(&w.c.cli(&["upgrade", "status", "--json"]));
    assert_eq!(status["upgrade"], 2, "upgrade ids go on from the routers' (they tell upgrades apart by id)");
    assert!(w.c.cli(&["upgrade", "switch"]).status.success());
    assert_eq!(w.wait_phase(&["Done", "RolledBack"], 10), "Done");
    assert_eq!(agreed_version(&w.ports), "v3");
    w.assert_one_switch_point();
    w.c.stop_all();
}

// ---- data nodes: the application's databases through a real switch --------------------------

/// The application's databases of one kind (SQLite files or PostgreSQL databases) for the
/// data tier's acceptance test ([`data_switches_under_writes_and_kills`]): one per universe
/// (v1, v2, v3), each with its application.
struct DataTier {
    kind: &'static str,
    /// Each universe's database as `imago node --old-db / --new-db` names it.
    dbs: Vec<String>,
    /// Each universe's application (HTTP port on loopback).
    apps: Vec<u16>,
    /// Writes an application tried again because the new database's guard refused them.
    guarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Runs SQL on universe `v`'s database as a console would; the error, if refused.
    console: Box<Console>,
    /// Every row of `items` in universe `v`'s database: id → (the body, under the column
    /// named; the size, if the table has one).
    items: Box<ItemsOf>,
    /// Imago's capture objects left in universe `v`'s database.
    capture_left: Box<dyn Fn(usize) -> Vec<String>>,
}

/// Runs SQL on universe `v`'s database as a console would; the error, if refused.
type Console = dyn Fn(usize, &str) -> Option<String>;
/// Every row of `items` in universe `v`'s database: id → (body, size).
type ItemsOf = dyn Fn(usize, &str) -> BTreeMap<i64, (String, Option<i64>)>;

/// The rows the databases are seeded with (v1's `items`: `seed-{id}` for ids 1..=SEEDED).
const SEEDED: i64 = 4_000;

/// Serves one universe's application: `POST /item/{id}/{value}` runs `write(id, value)` against
/// its own database directly (as real applications do, not through Imago) and answers reads
/// with the path only (so mirrored reads compare equal whatever the transform's lag). A write
/// `write` reports as guarded (`Err(true)`: the switch committed, but the data node has not
/// opened the new database yet) is tried again every 5 ms for up to 3 s, as an application
/// with a retry policy would; `guarded` counts them.
fn data_app(
    version: &'static str,
    write: impl Fn(i64, &str) -> Result<(), (bool, String)> + Send + Sync + 'static,
    seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
    seen: Admissions,
    guarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> u16 {
    http_server(move |request| {
        let extra = admit(version, request.mirror, &seq, &seen);
        let parts: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
        let ["item", id, value] = parts[..] else {
            return (200, extra, format!("{{\"path\":\"{}\"}}", request.path));
        };
        if request.method != "POST" {
            return (200, extra, format!("{{\"path\":\"{}\"}}", request.path));
        }
        let id: i64 = id.parse().expect("an integer id");
        for _ in 0..600 {
            match write(id, value) {
                Ok(()) => return (200, extra, format!("{{\"id\":{id}}}")),
                Err((true, _)) => {
                    guarded.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((false, e)) => return (500, extra, format!("{{\"error\":{e:?}}}")),
            }
        }
        (503, extra, "{\"error\":\"the new database stayed guarded\"}".to_string())
    })
}

/// Each universe's write of `items` (v1: `body`; v2 adds `size`; v3 renames `body` to `text`),
/// `?1`/`$1` the id and `?2`/`$2` the value (SQLite and PostgreSQL both take `$n`).
const ITEM_WRITES: [&str; 3] = [
    "INSERT INTO items (id, body) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
    "INSERT INTO items (id, body, size) VALUES ($1, $2, length($2)) \
     ON CONFLICT (id) DO UPDATE SET body = excluded.body, size = excluded.size",
    "INSERT INTO items (id, text, size) VALUES ($1, $2, length($2)) \
     ON CONFLICT (id) DO UPDATE SET text = excluded.text, size = excluded.size",
];

/// The plan of the upgrade from generation `from` for `routers` and data node `db-1`, its new
/// universe at `endpoint`: from 1, `items(id, body)` gains `size`, the length of its body,
/// computed by the new database; from 2, `body` is renamed `text`. The bulk copy reads 3,000
/// rows a second.
fn items_plan(from: u64, routers: &[&str], endpoint: &str) -> String {
    let (columns, transform) = if from == 1 {
        (
            "[\"id\", \"body\"]",
            "kind = \"add_column\"\ntable = \"items\"\ncolumn = \"size\"\nexpression = \"length(:body)\"",
        )
    } else {
        ("[\"id\", \"body\", \"size\"]", "kind = \"rename_column\"\ntable = \"items\"\nfrom = \"body\"\nto = \"text\"")
    };
    let mut plan = format!(
        "[upgrade]\nname = \"items-v{}\"\nold_generation = {from}\nswitch = \"manual\"\nmax_attempts = 5\n\n\
         [thresholds]\nsamples_min = 5\nmismatch_ratio_max = 0.0\nlag_max = 200\nhold_ms_max = 6000\n\
         freeze_timeout_ms = 4000\nretry_backoff_ms = 500\n\n\
         [validation]\nignore_headers = [\"x-version\", \"x-seq\"]\n\n[copy]\nrows_per_s_max = 3000\nchunk_rows = 500\n\n\
         [universe]\nendpoints = [\"{endpoint}\"]\n\n\
         [schema.old.items]\nkey = \"id\"\ncolumns = {columns}\n\n[[transforms]]\n{transform}\n\n\
         [[nodes]]\nname = \"db-1\"\ntier = \"db\"\nduties = [\"capture\", \"transform\"]\n",
        from + 1
    );
    for r in routers {
        plan.push_str(&format!("\n[[nodes]]\nname = \"{r}\"\ntier = \"web\"\nduties = [\"route\", \"validate\"]\n"));
    }
    plan
}

/// The application's SQLite files in `dir`: v1 seeded, v2 and v3 made by the data nodes.
fn sqlite_tier(dir: &Path, seq: std::sync::Arc<std::sync::atomic::AtomicU64>, seen: Admissions) -> DataTier {
    let dbs: Vec<PathBuf> = (1..=3).map(|v| dir.join(format!("items-v{v}.db"))).collect();
    let open = |db: &Path| {
        let conn = rusqlite::Connection::open(db).expect("open");
        conn.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
        conn
    };
    {
        let conn = open(&dbs[0]);
        conn.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE items (id INTEGER PRIMARY KEY, body TEXT);")
            .expect("schema");
        let tx = conn.unchecked_transaction().expect("tx");
        for id in 1..=SEEDED {
            tx.execute("INSERT INTO items (id, body) VALUES (?1, ?2)", rusqlite::params![id, format!("seed-{id}")])
                .expect("seed");
        }
        tx.commit().expect("commit");
    }
    let guarded = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let apps = ["v1", "v2", "v3"]
        .into_iter()
        .enumerate()
        .map(|(i, version)| {
            let db = dbs[i].clone();
            let write = move |id: i64, value: &str| {
                let conn = open(&db);
                conn.execute(ITEM_WRITES[i], rusqlite::params![id, value]).map(|_| ()).map_err(|e| {
                    let e = e.to_string();
                    (e.contains("not switched to yet"), e)
                })
            };
            data_app(version, write, seq.clone(), seen.clone(), guarded.clone())
        })
        .collect();
    let (for_console, for_items, for_capture) = (dbs.clone(), dbs.clone(), dbs.clone());
    DataTier {
        kind: "SQLite",
        dbs: dbs.iter().map(|p| p.to_str().expect("utf-8").to_string()).collect(),
        apps,
        guarded,
        console: Box::new(move |v, sql| open(&for_console[v]).execute(sql, []).err().map(|e| e.to_string())),
        items: Box::new(move |v, body_column| {
            let conn = open(&for_items[v]);
            let size = if conn.prepare("SELECT size FROM items LIMIT 0").is_ok() { "size" } else { "NULL" };
            let mut stmt = conn.prepare(&format!("SELECT id, {body_column}, {size} FROM items")).expect("prepare");
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?)))).expect("query");
            rows.collect::<Result<_, _>>().expect("rows")
        }),
        capture_left: Box::new(move |v| {
            let conn = open(&for_capture[v]);
            let mut stmt = conn
                .prepare("SELECT name FROM sqlite_master WHERE name LIKE 'imago_capture_%' OR name = 'imago_changes'")
                .expect("prepare");
            let names = stmt.query_map([], |r| r.get(0)).expect("query");
            names.collect::<Result<_, _>>().expect("names")
        }),
    }
}

/// Acceptance of the data tier in a real cluster: 3 coordinators, 2 routers and a data node
/// over the application's databases of `tier`, clients writing all along, through two upgrades
/// (v1 → v2 → v3). In the first, the data node is killed (-9) during its bulk copy and again at
/// the switch; it goes on from its databases and disk. For the second, the next data node takes
/// the database that was new as its old one. Until a commit the new database takes no
/// console's write; after it the old one takes none, and keeps only its fence. At the end every
/// acknowledged write is in the last database, converted twice there, the seeded rows too; no
/// client request failed; and no write reached a universe after one reached the next.
fn data_switches_under_writes_and_kills(test: &str, tier: DataTier, admissions: Admissions) {
    let routers = ["router-1", "router-2"];
    let mut c = Cluster::with_universe(
        test,
        3,
        &["router-1", "router-2", "db-1"],
        Some(&format!("http://127.0.0.1:{}", tier.apps[0])),
    );
    let path = |p: &Path| p.to_str().expect("utf-8").to_string();
    let plans: Vec<PathBuf> = (1..=2u64)
        .map(|from| {
            let plan = c.dir.join(format!("items-v{}.toml", from + 1));
            let endpoint = format!("http://127.0.0.1:{}", tier.apps[from as usize]);
            std::fs::write(&plan, items_plan(from, &routers, &endpoint)).expect("plan");
            plan
        })
        .collect();
    let deploy = |c: &mut Cluster, upgrade: usize| {
        let args =
            ["--plan", &path(&plans[upgrade]), "--old-db", &tier.dbs[upgrade], "--new-db", &tier.dbs[upgrade + 1]];
        c.data_args.insert("db-1".into(), args.map(String::from).to_vec());
    };
    deploy(&mut c, 0);
    let ports = start_serving_v1(&mut c, &routers);
    c.start("db-1");

    // Clients: each writes ids of its own (some seeded rows, some new), and reads, all along.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let results = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..3i64)
        .map(|k| {
            let (stop, results, ports) = (stop.clone(), results.clone(), ports.clone());
            std::thread::spawn(move || {
                let mut i = 0i64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let port = ports[(i + k) as usize % ports.len()];
                    // Ids 3k+1.. among the seeded rows, then 10,000 + ... beyond them.
                    let id = if i % 2 == 0 { 3 * (i % 500) + k + 1 } else { 10_000 + 3 * i + k };
                    let value = format!("c{k}-{i}");
                    let r = http_call(port, "POST", &format!("/item/{id}/{value}"));
                    results.lock().expect("lock").push((id, value, r.clone()));
                    http_call(port, "GET", &format!("/read/{k}/{i}"));
                    i += 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
            })
        })
        .collect();

    let log = c.dir.join("db-1.log");
    let logged = |what: &str| std::fs::read_to_string(&log).unwrap_or_default().matches(what).count();
    let wait_gate = |c: &Cluster| {
        for _ in 0..600 {
            let status = json(&c.cli(&["upgrade", "status", "--json"]));
            if status["phase"] == "Syncing" && status["gate_blockers"].as_array().is_some_and(|b| b.is_empty()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the ready gate did not pass; logs in {}", c.dir.display());
    };
    let wait_done = |c: &Cluster| {
        for _ in 0..600 {
            if upgrade_phase(c) == "Done" {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the upgrade did not end; logs in {}", c.dir.display());
    };

    // Upgrade 1 (v1 → v2).
    let start = c.cli(&["upgrade", "start", &path(&plans[0])]);
    assert!(start.status.success(), "{}", String::from_utf8_lossy(&start.stderr));
    // Killed during the bulk copy (4,000 rows at 3,000 a second): the copy starts again from a
    // fresh snapshot (the first one died with the process).
    for _ in 0..500 {
        if logged("bulk copy under way") > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    c.kill9("db-1");
    assert_eq!(
        (logged("bulk copy under way"), logged("bulk copy done")),
        (1, 0),
        "killed while copying; logs in {}",
        c.dir.display()
    );
    c.start("db-1");
    wait_gate(&c);
    // The copy's pace, as the operator sees it: within the plan's 3,000 rows a second.
    let status = json(&c.cli(&["upgrade", "status", "--json"]));
    let report = status["nodes"].as_array().and_then(|n| n.iter().find(|n| n["name"] == "db-1")).map(|n| &n["report"]);
    let pace = report.and_then(|r| r["copy_rows_per_s"].as_u64()).unwrap_or(0);
    assert!((1_000..=3_300).contains(&pace), "copy pace {pace} rows/s: {status}");
    assert!(report.is_some_and(|r| r["lag_ms"].is_u64() && r["copy_eta_ms"].is_null()), "{status}");
    // The plan's rows stand alone: the node compared them key range by key range while the
    // clients wrote, each range once at least, none different, before the gate passed.
    let ranges = report.map(|r| &r["ranges"]);
    assert!(
        ranges.is_some_and(|r| r["by_range"] == true
            && r["ranges"].as_u64().is_some_and(|n| n >= 1)
            && r["attempted"] == r["ranges"]
            && r["differed"] == 0
            && r["tables"].as_array().is_some_and(
                |t| !t.is_empty() && t.iter().all(|t| t["table"] == "items" && t["expected"] == t["actual"])
            )),
        "compared by key range, rows counted by table: {status}"
    );
    let db = metrics_of(&c, "db-1");
    assert!(metric(&db, "imago_ranges").is_some_and(|n| n >= 1.0), "{db}");
    assert!(metric(&db, "imago_ranges_compared_total").is_some_and(|n| n >= 1.0), "{db}");
    assert!(metric(&db, "imago_copy_rows_per_second").is_some_and(|r| r > 0.0), "{db}");
    assert!(metric(&db, "imago_change_lag_ms").is_some() && metric(&db, "imago_copy_eta_ms") == Some(-1.0), "{db}");
    let refused = (tier.console)(1, "INSERT INTO items (id, body, size) VALUES (-1, 'console', 7)");
    assert!(refused.is_some_and(|e| e.contains("not switched to yet")), "the guard refuses a console");
    let switch = c.cli(&["upgrade", "switch"]);
    assert!(switch.status.success(), "{}", String::from_utf8_lossy(&switch.stderr));
    // Killed at the switch: restarted on a freeze, it fences again, drains and acks (or the
    // freeze aborts at its deadline and the next one switches).
    c.kill9("db-1");
    std::thread::sleep(Duration::from_millis(300));
    c.start("db-1");
    wait_done(&c);
    assert_eq!(logged("bulk copy under way"), 2, "the copy started again after the kill");
    let db = metrics_of(&c, "db-1");
    assert_eq!(metric(&db, "imago_drains_mismatched_total"), Some(0.0), "{db}");
    assert!(metric(&db, "imago_applied_position").is_some_and(|p| p > 0.0), "{db}");

    // Upgrade 2 (v2 → v3): the next data node, on the database that was new.
    c.stop("db-1");
    deploy(&mut c, 1);
    c.start("db-1");
    let start = c.cli(&["upgrade", "start", &path(&plans[1])]);
    assert!(start.status.success(), "{}", String::from_utf8_lossy(&start.stderr));
    wait_gate(&c);
    let refused = (tier.console)(2, "INSERT INTO items (id, text, size) VALUES (-1, 'console', 7)");
    assert!(refused.is_some_and(|e| e.contains("not switched to yet")), "the guard refuses a console");
    // Retiring the databases of an upgrade that still runs touches nothing.
    let retire = |c: &Cluster, upgrade: usize| {
        c.cli(&[
            "data",
            "retire",
            "--plan",
            &path(&plans[upgrade]),
            "--old-db",
            &tier.dbs[upgrade],
            "--new-db",
            &tier.dbs[upgrade + 1],
        ])
    };
    let early = retire(&c, 1);
    let said = String::from_utf8_lossy(&early.stderr);
    assert_eq!(early.status.code(), Some(2), "{said}");
    assert!(said.contains("still running (Syncing)") && said.contains("nothing was touched"), "{said}");
    // The operator rolls it back: the data node abandons the upgrade on its own, and no
    // capture is left in the old database (no `imago data retire` needed for that). A retry
    // with the same node still running copies afresh.
    assert!(!(tier.capture_left)(1).is_empty(), "capture while the upgrade runs");
    let abort = c.cli(&["upgrade", "abort"]);
    assert!(abort.status.success(), "{}", String::from_utf8_lossy(&abort.stderr));
    let mut left = (tier.capture_left)(1);
    for _ in 0..400 {
        if upgrade_phase(&c) == "RolledBack" && left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
        left = (tier.capture_left)(1);
    }
    assert_eq!(upgrade_phase(&c), "RolledBack");
    assert!(left.is_empty(), "capture left after the rollback: {left:?}; logs in {}", c.dir.display());
    assert_eq!(logged("the upgrade was rolled back: capture removed"), 1, "logs in {}", c.dir.display());
    let copies = logged("bulk copy under way");
    // The same plan again starts nothing, and says how to retry it.
    let again = c.cli(&["upgrade", "start", &path(&plans[1])]);
    let said = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(5), "{said}");
    assert!(said.contains("already ran as upgrade 2, which ended RolledBack") && said.contains("--retry 2"), "{said}");
    for _ in 0..2 {
        // Repeated (an unknown outcome, say), the retry starts one upgrade.
        let start = c.cli(&["upgrade", "start", &path(&plans[1]), "--retry", "2"]);
        let said = String::from_utf8_lossy(&start.stdout);
        assert!(start.status.success() && said.contains("upgrade 3 started"), "{said}");
    }
    wait_gate(&c);
    assert_eq!(logged("bulk copy under way"), copies + 1, "the retry copies afresh; logs in {}", c.dir.display());
    assert!(!(tier.capture_left)(1).is_empty(), "capture is back for the retry");
    let switch = c.cli(&["upgrade", "switch"]);
    assert!(switch.status.success(), "{}", String::from_utf8_lossy(&switch.stderr));
    wait_done(&c);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for client in clients {
        client.join().expect("client");
    }

    let results = results.lock().expect("lock").clone();
    let failed: Vec<_> = results.iter().filter(|(_, _, r)| r.0 != 200).collect();
    assert!(failed.is_empty(), "failed writes: {:?}; logs in {}", &failed[..failed.len().min(5)], c.dir.display());
    let served = |v: &str| results.iter().filter(|(_, _, r)| r.1 == v).count();
    assert!(served("v2") > 0 && served("v3") > 0, "each new universe took writes after its switch");
    // Writes to one id come from one client, in order: the last acknowledged value is the row's.
    let mut expected: BTreeMap<i64, String> = (1..=SEEDED).map(|id| (id, format!("seed-{id}"))).collect();
    for (id, value, _) in &results {
        expected.insert(*id, value.clone());
    }
    let found = (tier.items)(2, "text");
    for (id, body) in &expected {
        let size = i64::try_from(body.len()).expect("small");
        assert_eq!(found.get(id), Some(&(body.clone(), Some(size))), "row {id} in the last database");
    }
    assert_eq!(found.len(), expected.len(), "no row the clients did not write");
    // One switch point each: no write reached a universe after one reached the next.
    let seen = admissions.lock().expect("lock").clone();
    for (old, new) in [("v1", "v2"), ("v2", "v3")] {
        let last_old = seen.iter().filter(|(v, _)| v == old).map(|(_, n)| *n).max().unwrap_or(0);
        let first_new = seen.iter().filter(|(v, _)| v == new).map(|(_, n)| *n).min().unwrap_or(u64::MAX);
        assert!(last_old < first_new, "{old}'s last admission {last_old} precedes {new}'s first {first_new}");
    }
    // Each old database stays fenced, and capture went at the commit.
    for (v, sql) in [(0, "UPDATE items SET body = 'console' WHERE id = 1"), (1, "DELETE FROM items WHERE id = 1")] {
        assert!((tier.console)(v, sql).is_some_and(|e| e.contains("is fenced")), "v{} stays fenced", v + 1);
        assert_eq!((tier.capture_left)(v), Vec::<String>::new(), "capture left in v{}", v + 1);
    }
    // The operator retires both upgrades' databases (the data node stopped first): the fences
    // go, and nothing of Imago's is left but the request logs.
    c.stop("db-1");
    // Each database holds Imago's objects of two upgrades (as new, then as old): it is clean
    // once both are retired, and retiring again (idempotent) finds nothing left.
    for upgrade in [0, 1, 0] {
        let out = retire(&c, upgrade);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && said.contains("switched"), "{said}{}", String::from_utf8_lossy(&out.stderr));
    }
    let again = retire(&c, 1);
    let said = String::from_utf8_lossy(&again.stdout);
    assert_eq!(said.matches("left: nothing but the request log").count(), 2, "{said}");
    for v in 0..2 {
        assert_eq!((tier.console)(v, "DELETE FROM items WHERE id = -5"), None, "v{} takes writes again", v + 1);
        assert_eq!((tier.capture_left)(v), Vec::<String>::new());
    }
    println!(
        "data switches under writes on {}: {} writes ({} to v2, {} to v3), none failed; {} rows in the last \
         database; {} writes waited for a new database's guard to open",
        tier.kind,
        results.len(),
        served("v2"),
        served("v3"),
        found.len(),
        tier.guarded.load(std::sync::atomic::Ordering::SeqCst)
    );
    c.stop_all();
}

#[test]
fn cluster_data_node_switches_sqlite_databases_under_writes_and_kills() {
    let dir = std::env::temp_dir().join(format!("imago-data-apps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let seq = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    let admissions: Admissions = Default::default();
    let tier = sqlite_tier(&dir, seq.clone(), admissions.clone());
    data_switches_under_writes_and_kills("data", tier, admissions);
}

/// The application's PostgreSQL databases `items_v1` (seeded), `items_v2` and `items_v3` (their
/// tables made by the new application's own migration, as an operator would: typed columns)
/// in `pg`.
fn postgres_tier(
    pg: &ThrowawayCluster,
    seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
    seen: Admissions,
) -> DataTier {
    let tables = [
        "CREATE TABLE items (id bigint PRIMARY KEY, body text); \
         INSERT INTO items SELECT g, 'seed-' || g FROM generate_series(1, 4000) g;",
        "CREATE TABLE items (id bigint PRIMARY KEY, body text, size bigint);",
        "CREATE TABLE items (id bigint PRIMARY KEY, text text, size bigint);",
    ];
    let runtime = std::sync::Arc::new(
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime"),
    );
    let clients: Vec<std::sync::Arc<tokio_postgres::Client>> = (1..=3)
        .map(|v| {
            let name = format!("items_v{v}");
            pg.create_database(&name).expect("create database");
            let client = runtime.block_on(pg.client(&name, "postgres")).expect("connect");
            runtime.block_on(client.batch_execute(tables[v - 1])).expect("tables");
            std::sync::Arc::new(client)
        })
        .collect();
    assert_eq!(SEEDED, 4_000, "the seed above");
    let said = |e: &tokio_postgres::Error| e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string());
    let guarded = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let apps = ["v1", "v2", "v3"]
        .into_iter()
        .enumerate()
        .map(|(i, version)| {
            let (runtime, client) = (runtime.clone(), clients[i].clone());
            let write = move |id: i64, value: &str| {
                let value = value.to_string();
                runtime.block_on(client.execute(ITEM_WRITES[i], &[&id, &value])).map(|_| ()).map_err(|e| {
                    let guard = e.code().is_some_and(|c| c.code() == node_postgres::new::GUARD_SQLSTATE);
                    (guard, said(&e))
                })
            };
            data_app(version, write, seq.clone(), seen.clone(), guarded.clone())
        })
        .collect();
    let (r1, c1, r2, c2, r3, c3) =
        (runtime.clone(), clients.clone(), runtime.clone(), clients.clone(), runtime.clone(), clients.clone());
    DataTier {
        kind: "PostgreSQL",
        dbs: (1..=3).map(|v| format!("postgres://postgres@{}:{}/items_v{v}", pg.host(), pg.port())).collect(),
        apps,
        guarded,
        console: Box::new(move |v, sql| r1.block_on(c1[v].batch_execute(sql)).err().map(|e| said(&e))),
        items: Box::new(move |v, body_column| {
            let has_size = r2
                .block_on(c2[v].query_opt(
                    "SELECT 1 FROM information_schema.columns WHERE table_name = 'items' AND column_name = 'size'",
                    &[],
                ))
                .expect("columns")
                .is_some();
            let size = if has_size { "size" } else { "NULL::bigint" };
            let sql = format!("SELECT id, {body_column}, {size} FROM items");
            let rows = r2.block_on(c2[v].query(&sql, &[])).expect("rows");
            rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect()
        }),
        capture_left: Box::new(move |v| {
            let sql = "SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE database = current_database() \
                       UNION ALL SELECT 'publication ' || pubname FROM pg_publication";
            let rows = r3.block_on(c3[v].query(sql, &[])).expect("capture objects");
            rows.iter().map(|r| r.get(0)).collect()
        }),
    }
}

/// The same acceptance on PostgreSQL (logical decoding, fences and guards by triggers), on a
/// throwaway cluster of its own.
#[test]
fn cluster_data_node_switches_postgres_databases_under_writes_and_kills() {
    let Some(pg) = ThrowawayCluster::start_for_test_with(ThrowawayOptions { fsync: false, ..Default::default() })
    else {
        return;
    };
    let seq = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    let admissions: Admissions = Default::default();
    let tier = postgres_tier(&pg, seq, admissions.clone());
    data_switches_under_writes_and_kills("data-pg", tier, admissions);
}
