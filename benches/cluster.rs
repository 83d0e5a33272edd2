//! Real-cluster benchmark: `imago coordinator` and `imago node` processes on 127.0.0.1.
//!
//! `cargo bench --bench cluster` prints each figure beside its baseline from the same run and
//! writes them to `target/bench/cluster.json` (or `$IMAGO_BENCH_OUT`):
//! - forwarding cost: a backend answering 1 KiB, loaded by closed-loop keep-alive clients,
//!   straight, through nginx as a reverse proxy (the Debian package; said so if missing), and
//!   through an Imago router: throughput and latency p50/p99, with 32 clients (saturation) and
//!   with one (latency without queueing; `IMAGO_BENCH_ONLY=forwarding` measures only this);
//! - the switch at a steady 1,000 requests/s for 1, 2 and 4 routers: how long from the switch
//!   request to the first answer from the new universe ("switch latency"), the client-visible
//!   latency of requests during the switch (the hold) p50/p99/max against requests before it,
//!   and failed requests;
//! - a router's memory over 60 s at 1,000 requests/s, and a full hold queue answering 503 at once
//!   (`IMAGO_BENCH_ONLY=switch` measures only the switch, `=queue` only the full queue; nothing
//!   written).
//!
//! Set `IMAGO_BENCH_QUICK=1` for shorter runs (a smoke test of the benchmark itself).

// A benchmark times real processes with the wall clock.
#![allow(clippy::disallowed_methods)]

use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BODY_BYTES: usize = 1024;

fn quick() -> bool {
    std::env::var("IMAGO_BENCH_QUICK").is_ok_and(|v| v == "1")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

// ---- a backend answering 1 KiB ----------------------------------------------------------------

/// Starts a backend of universe `version` on its own thread; `/slow` answers after 3 s.
fn backend(version: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_backend(stream, version));
            }
        });
    });
    port
}

async fn serve_backend(stream: TcpStream, version: &'static str) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let body = "x".repeat(BODY_BYTES);
    loop {
        let mut length = 0usize;
        let mut path = String::new();
        let mut first = true;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            if first {
                path = line.split(' ').nth(1).unwrap_or("/").to_string();
                first = false;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut skip = vec![0; length];
        if reader.read_exact(&mut skip).await.is_err() {
            return;
        }
        if path.starts_with("/slow") {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-version: {version}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if write.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

// ---- a keep-alive HTTP/1.1 client ------------------------------------------------------------

struct Conn {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Conn {
    async fn open(port: u16) -> Option<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let _ = stream.set_nodelay(true);
        let (read, writer) = stream.into_split();
        Some(Conn { reader: BufReader::new(read), writer })
    }

    /// One GET: (status, x-version). `None`: the connection failed.
    async fn get(&mut self, path: &str) -> Option<(u16, String)> {
        let request = format!("GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n");
        self.writer.write_all(request.as_bytes()).await.ok()?;
        let mut status = 0;
        let mut version = String::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            if line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if status == 0 {
                status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            } else if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            } else if let Some(v) = lower.strip_prefix("x-version:") {
                version = v.trim().to_string();
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).await.ok()?;
        Some((status, version))
    }
}

/// Latencies in µs: p50, p99, max.
fn percentiles(mut us: Vec<u64>) -> (f64, f64, f64) {
    if us.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    us.sort_unstable();
    let at = |q: f64| us[((us.len() - 1) as f64 * q) as usize] as f64;
    (at(0.5), at(0.99), *us.last().expect("not empty") as f64)
}

#[derive(Serialize, Clone, Debug)]
struct Forwarding {
    path: String,
    connections: usize,
    requests_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// Answers other than 200, and connections that failed.
    failed: usize,
    /// CPU time (user and system) the proxy's process spent per answered request, where there
    /// is a proxy process to read it from (nginx's worker, the router): the cost of forwarding
    /// that does not depend on how the 2 cores are shared with the clients and the backend.
    proxy_cpu_us_per_request: Option<f64>,
    /// Of which in user space (the rest is the kernel's: sockets, wake-ups).
    proxy_user_cpu_us_per_request: Option<f64>,
}

/// Closed loop: `connections` clients each sending GETs one after another for `secs`.
async fn load(port: u16, connections: usize, secs: f64, path: &str) -> Forwarding {
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut failed) = (Vec::new(), 0);
            let Some(mut conn) = Conn::open(port).await else { return (latencies, 1) };
            while Instant::now() < stop {
                let started = Instant::now();
                match conn.get("/bench").await {
                    Some((200, _)) => latencies.push(started.elapsed().as_micros() as u64),
                    // Any other answer, or none: failed, and a new connection.
                    _ => {
                        failed += 1;
                        match Conn::open(port).await {
                            Some(c) => conn = c,
                            None => break,
                        }
                    }
                }
            }
            (latencies, failed)
        }));
    }
    let (mut all, mut failed) = (Vec::new(), 0);
    for t in tasks {
        let (latencies, f) = t.await.unwrap_or_default();
        all.extend(latencies);
        failed += f;
    }
    let (p50, p99, _) = percentiles(all.clone());
    let requests_per_s = all.len() as f64 / secs;
    let (proxy_cpu_us_per_request, proxy_user_cpu_us_per_request) = (None, None);
    Forwarding {
        path: path.to_string(),
        connections,
        requests_per_s,
        p50_us: p50,
        p99_us: p99,
        failed,
        proxy_cpu_us_per_request,
        proxy_user_cpu_us_per_request,
    }
}

/// CPU time `pid` has spent, in µs: (user, system) (`/proc/PID/stat`, clock ticks of 10 ms).
fn cpu_us(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's name (which may hold spaces): state is the 3rd field, utime
    // the 14th and stime the 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (user, system) = (fields.get(11)?.parse::<u64>().ok()?, fields.get(12)?.parse::<u64>().ok()?);
    Some((user * 10_000, system * 10_000))
}

/// The children of `pid` (nginx's worker under its master).
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).ok().is_some_and(|stat| {
                let rest = stat.rfind(')').map_or("", |at| &stat[at + 2..]);
                rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid)
            })
        })
        .collect()
}

/// [`load`], reading the CPU time the processes `pids` spent during it.
async fn load_measured(port: u16, connections: usize, secs: f64, path: &str, pids: &[u32]) -> Forwarding {
    let cpu = || pids.iter().filter_map(|p| cpu_us(*p)).fold((0, 0), |(u, s), (u2, s2)| (u + u2, s + s2));
    let before = cpu();
    let mut f = load(port, connections, secs, path).await;
    let after = cpu();
    let (user_us, system_us) = (after.0.saturating_sub(before.0), after.1.saturating_sub(before.1));
    let answered = f.requests_per_s * secs;
    if !pids.is_empty() && answered > 0.0 {
        f.proxy_cpu_us_per_request = Some((user_us + system_us) as f64 / answered);
        f.proxy_user_cpu_us_per_request = Some(user_us as f64 / answered);
    }
    f
}

// ---- processes --------------------------------------------------------------------------------

struct Cluster {
    dir: PathBuf,
    file: PathBuf,
    coordinators: Vec<String>,
    /// Each coordinator's metrics port.
    coordinator_metrics: Vec<u16>,
    routers: Vec<(String, u16, u16)>,
    running: BTreeMap<String, Child>,
}

impl Cluster {
    fn new(name: &str, coordinators: usize, routers: usize, genesis: u16) -> Cluster {
        let dir = std::env::temp_dir().join(format!("imago-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut text =
            format!("[cluster]\nid = \"bench\"\n\n[universe]\nendpoints = [\"http://127.0.0.1:{genesis}\"]\n");
        let names: Vec<String> = (1..=coordinators).map(|i| format!("coord-{i}")).collect();
        let coordinator_metrics: Vec<u16> = names.iter().map(|_| free_port()).collect();
        for (i, n) in names.iter().enumerate() {
            text.push_str(&format!(
                "\n[[coordinators]]\nid = {}\nname = \"{n}\"\naddress = \"127.0.0.1:{}\"\nmetrics = \"127.0.0.1:{}\"\n",
                i + 1,
                free_udp_port(),
                coordinator_metrics[i]
            ));
        }
        let routers: Vec<(String, u16, u16)> =
            (1..=routers).map(|i| (format!("router-{i}"), free_port(), free_port())).collect();
        for (n, http, metrics) in &routers {
            text.push_str(&format!(
                "\n[[nodes]]\nname = \"{n}\"\nhttp = \"127.0.0.1:{http}\"\nmetrics = \"127.0.0.1:{metrics}\"\n"
            ));
        }
        let file = dir.join("cluster.toml");
        std::fs::write(&file, text).expect("write");
        let c = Cluster { dir, file, coordinators: names, coordinator_metrics, routers, running: BTreeMap::new() };
        let certs = c.cli(&["certs", "init"]);
        assert!(certs.status.success(), "certs init: {}", String::from_utf8_lossy(&certs.stderr));
        c
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_imago")).args(args).env("IMAGO_CLUSTER", &self.file).output().expect("imago")
    }

    fn spawn(&mut self, kind: &str, name: &str, extra: &[&str]) {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_imago"))
            .args([kind, "--name", name])
            .args(extra)
            .env("IMAGO_CLUSTER", &self.file)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn");
        self.running.insert(name.to_string(), child);
    }

    /// Starts the coordinators, joins and starts the routers; returns once every router serves.
    fn start(&mut self, router_flags: &[&str]) {
        for n in self.coordinators.clone() {
            self.spawn("coordinator", &n, &[]);
        }
        for _ in 0..100 {
            if self.cli(&["cluster", "status"]).status.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for (n, _, _) in self.routers.clone() {
            assert!(self.cli(&["router", "join", &n]).status.success(), "join {n}");
            self.spawn("node", &n, router_flags);
        }
        for (_, port, _) in &self.routers {
            let mut ok = false;
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok() {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(ok, "router on {port} listens");
        }
    }

    fn phase(&self) -> String {
        let out = self.cli(&["upgrade", "status", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v["phase"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    fn gate_open(&self) -> bool {
        let out = self.cli(&["upgrade", "status", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .is_some_and(|v| v["phase"] == "Syncing" && v["gate_blockers"].as_array().is_some_and(|b| b.is_empty()))
    }

    fn plan(&self, new_port: u16, hold_ms_max: u64) -> PathBuf {
        self.plan_named("bench", 1, new_port, hold_ms_max)
    }

    /// A plan upgrading from `from` to a universe at `new_port`.
    fn plan_named(&self, name: &str, from: u32, new_port: u16, hold_ms_max: u64) -> PathBuf {
        let mut plan = format!(
            "[upgrade]\nname = \"{name}\"\nold_generation = {from}\nswitch = \"manual\"\n\n[thresholds]\nsamples_min = 20\n\
             mismatch_ratio_max = 0.0\nhold_ms_max = {hold_ms_max}\nfreeze_timeout_ms = 10000\n\
             inflight_ms_max = 9000\n\n[validation]\nignore_headers = [\"x-version\"]\n\n[universe]\n\
             endpoints = [\"http://127.0.0.1:{new_port}\"]\n\n[schema.old.t]\nkey = \"id\"\ncolumns = [\"id\"]\n"
        );
        for (n, _, _) in &self.routers {
            plan.push_str(&format!(
                "\n[[nodes]]\nname = \"{n}\"\ntier = \"web\"\nduties = [\"route\", \"validate\"]\n"
            ));
        }
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, plan).expect("plan");
        path
    }

    /// The leader's `imago_switch_decision_ms` (freeze applied → outcome applied, as it measured).
    fn decision_ms(&self) -> Option<f64> {
        let out = self.cli(&["cluster", "status", "--json"]);
        let leader = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?["leader"].as_u64()?;
        let port = self.coordinator_metrics[leader as usize - 1];
        // Metrics are read from the replica every half second.
        std::thread::sleep(Duration::from_millis(700));
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: m\r\nconnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.lines().find_map(|l| l.strip_prefix("imago_switch_decision_ms ").and_then(|v| v.trim().parse().ok()))
    }

    fn pid(&self, name: &str) -> u32 {
        self.running[name].id()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.running) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.split_whitespace().next()?.parse().ok()))
        })
        .unwrap_or(0)
}

/// nginx as a reverse proxy to `backend`, if the machine has it: its port.
fn nginx(dir: &Path, backend: u16) -> Option<(Child, u16)> {
    let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| Path::new(p).exists())?;
    let port = free_port();
    std::fs::create_dir_all(dir.join("logs")).ok()?;
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\n\
         events {{ worker_connections 1024; }}\nhttp {{\n access_log off;\n client_body_temp_path {d};\n \
         proxy_temp_path {d};\n fastcgi_temp_path {d};\n uwsgi_temp_path {d};\n scgi_temp_path {d};\n \
         keepalive_requests 1000000;\n \
         upstream b {{ server 127.0.0.1:{backend}; keepalive 64; keepalive_requests 1000000; }}\n \
         server {{ listen 127.0.0.1:{port};\n  \
         location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).ok()?;
    let child = Command::new(binary)
        .args(["-c", &dir.join("nginx.conf").display().to_string(), "-p", &dir.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((child, port));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

// ---- the switch at a steady rate --------------------------------------------------------------

#[derive(Serialize, Clone, Debug)]
struct Switch {
    routers: usize,
    requests: usize,
    failed: usize,
    /// Upgrades run one after another, each switched.
    switches: usize,
    /// Each switch decision: from the freeze applied to the commit applied, as the leader saw it.
    decisions_ms: Vec<f64>,
    decision_p50_ms: f64,
    decision_max_ms: f64,
    /// From the first switch request (`imago upgrade switch`, a process of its own) to the first
    /// answer from the new universe.
    switch_latency_ms: f64,
    /// Requests sent while a switch was under way (switch request → every router on the new
    /// universe).
    during_switch_requests: usize,
    hold_p50_ms: f64,
    hold_p99_ms: f64,
    hold_max_ms: f64,
    /// The same figures for requests before the upgrade started: the baseline.
    baseline_p50_ms: f64,
    baseline_p99_ms: f64,
    baseline_max_ms: f64,
}

/// One request's record: when it was sent, how long it took, what came back.
type Sample = (Instant, u64, u16, String);

/// Open loop at `rate` requests/s spread over `ports` until `stop`.
async fn steady(ports: Vec<u16>, rate: u64, stop: Arc<AtomicBool>, samples: Arc<Mutex<Vec<Sample>>>) {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut i = 0usize;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let port = ports[i % ports.len()];
        i += 1;
        let samples = samples.clone();
        tokio::spawn(async move {
            let sent = Instant::now();
            let (status, version) = match Conn::open(port).await {
                Some(mut c) => c.get(&format!("/steady/{i}")).await.unwrap_or((0, String::new())),
                None => (0, String::new()),
            };
            samples.lock().expect("lock").push((sent, sent.elapsed().as_micros() as u64, status, version));
        });
    }
}

/// Upgrades one after another (v1 → v2 → v1 → ...: each a new generation, at the other
/// backend) at a steady 1,000 requests/s through every router.
fn switch_at_steady_rate(rt: &tokio::runtime::Runtime, routers: usize) -> Switch {
    let switches = if quick() { 2 } else { 20 };
    let (v1, v2) = (backend("v1"), backend("v2"));
    let mut c = Cluster::new(&format!("switch-{routers}"), 3, routers, v1);
    c.start(&["--hold-ms-max", "2000"]);
    let ports: Vec<u16> = c.routers.iter().map(|r| r.1).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let load = rt.spawn(steady(ports, 1_000, stop.clone(), samples.clone()));
    std::thread::sleep(Duration::from_secs(if quick() { 1 } else { 3 }));
    let upgrade_started = Instant::now();
    // Each switch: from the switch request to every router on the new universe (Done).
    let mut windows = Vec::new();
    let mut decisions_ms = Vec::new();
    for i in 0..switches {
        let (to, generation) = (if i % 2 == 0 { v2 } else { v1 }, i + 1);
        let plan = c.plan_named(&format!("bench-{}", i + 1), generation as u32, to, 2_000);
        assert!(c.cli(&["upgrade", "start", plan.to_str().expect("path")]).status.success());
        for _ in 0..200 {
            if c.gate_open() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let switch_at = Instant::now();
        assert!(c.cli(&["upgrade", "switch"]).status.success());
        for _ in 0..200 {
            if c.phase() == "Done" {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        windows.push((switch_at, Instant::now()));
        decisions_ms.extend(c.decision_ms());
    }
    let switch_at = windows[0].0;
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        let _ = load.await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    });
    let samples = samples.lock().expect("lock").clone();
    let first_v2 = samples.iter().filter(|s| s.3 == "v2").map(|s| s.0 + Duration::from_micros(s.1)).min();
    let ms = |v: Vec<u64>| {
        let (a, b, c) = percentiles(v);
        (a / 1000.0, b / 1000.0, c / 1000.0)
    };
    let during: Vec<u64> =
        samples.iter().filter(|s| windows.iter().any(|(from, to)| s.0 >= *from && s.0 <= *to)).map(|s| s.1).collect();
    let before: Vec<u64> = samples.iter().filter(|s| s.0 < upgrade_started).map(|s| s.1).collect();
    let (hold_p50_ms, hold_p99_ms, hold_max_ms) = ms(during.clone());
    let (baseline_p50_ms, baseline_p99_ms, baseline_max_ms) = ms(before);
    let mut sorted = decisions_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let decision_p50_ms = sorted.get(sorted.len().saturating_sub(1) / 2).copied().unwrap_or(f64::NAN);
    let decision_max_ms = sorted.last().copied().unwrap_or(f64::NAN);
    Switch {
        routers,
        switches,
        requests: samples.len(),
        failed: samples.iter().filter(|s| s.2 != 200).count(),
        decisions_ms,
        decision_p50_ms,
        decision_max_ms,
        switch_latency_ms: first_v2.map_or(f64::NAN, |t| t.saturating_duration_since(switch_at).as_secs_f64() * 1000.0),
        during_switch_requests: during.len(),
        hold_p50_ms,
        hold_p99_ms,
        hold_max_ms,
        baseline_p50_ms,
        baseline_p99_ms,
        baseline_max_ms,
    }
}

#[derive(Serialize, Clone, Debug)]
struct Memory {
    seconds: u64,
    rss_kib_at_start: u64,
    rss_kib_at_end: u64,
    requests: usize,
    failed: usize,
}

#[derive(Serialize, Clone, Debug)]
struct FullQueue {
    hold_queue_max: usize,
    sent_while_frozen: usize,
    /// Answered 503 within 50 ms (the queue was full), and held (answered after the freeze).
    answered_503_within_50ms: usize,
    held: usize,
    rss_kib_before: u64,
    /// Half-way through the load (the queue long full) and at its end: flat, since a refused
    /// request costs nothing once answered.
    rss_kib_half_way: u64,
    rss_kib_after: u64,
}

#[derive(Serialize)]
struct Report {
    forwarding: Vec<Forwarding>,
    nginx: Option<String>,
    router_share_of_direct: f64,
    router_share_of_nginx: Option<f64>,
    router_added_p50_us: f64,
    router_added_p50_us_one_client: f64,
    switch: Vec<Switch>,
    memory: Memory,
    full_queue: FullQueue,
    targets: BTreeMap<&'static str, &'static str>,
}

fn print_switch(s: &Switch) {
    println!(
        "  {} router(s), {} switches: decision p50 {:.1} / max {:.1} ms (target p50 <= 5; first switch request \
         to first v2 answer {:.1} ms); hold p50 {:.1} / p99 {:.1} / max {:.1} ms (target p99 <= 10, max <= 50) \
         vs baseline {:.1} / {:.1} / {:.1} ms; {} requests, {} during, {} failed",
        s.routers,
        s.switches,
        s.decision_p50_ms,
        s.decision_max_ms,
        s.switch_latency_ms,
        s.hold_p50_ms,
        s.hold_p99_ms,
        s.hold_max_ms,
        s.baseline_p50_ms,
        s.baseline_p99_ms,
        s.baseline_max_ms,
        s.requests,
        s.during_switch_requests,
        s.failed
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let secs = if quick() { 1.0 } else { 3.0 };

    if std::env::var("IMAGO_BENCH_ONLY").is_ok_and(|v| v == "queue") {
        let q = full_hold_queue(&rt);
        println!("{q:?}");
        println!("(IMAGO_BENCH_ONLY=queue: nothing else measured, nothing written)");
        return;
    }
    if std::env::var("IMAGO_BENCH_ONLY").is_ok_and(|v| v == "switch") {
        for routers in [1, 2, 4] {
            print_switch(&switch_at_steady_rate(&rt, routers));
        }
        println!("(IMAGO_BENCH_ONLY=switch: nothing else measured, nothing written)");
        return;
    }

    // Forwarding cost.
    let direct_port = backend("v1");
    let mut c = Cluster::new("forward", 1, 1, direct_port);
    c.start(&[]);
    let router_port = c.routers[0].1;
    let nginx_dir = c.dir.join("nginx");
    let proxy = nginx(&nginx_dir, direct_port);
    // At saturation (32 clients: throughput) and with one client (latency without queueing).
    let mut forwarding = Vec::new();
    // Rounds interleave the three paths, so that a drift of the machine's speed hits them alike;
    // each path's figure is its median round (by throughput).
    let rounds = if quick() { 1 } else { 3 };
    let mut ports = vec![("direct", direct_port, Vec::new())];
    if let Some((child, port)) = &proxy {
        ports.push(("nginx", *port, children(child.id())));
    }
    ports.push(("router", router_port, vec![c.pid("router-1")]));
    for connections in [32, 1] {
        let mut runs: BTreeMap<&str, Vec<Forwarding>> = BTreeMap::new();
        for _ in 0..rounds {
            for (path, port, pids) in &ports {
                runs.entry(*path).or_default().push(rt.block_on(load_measured(*port, connections, secs, path, pids)));
            }
        }
        for (path, _, _) in &ports {
            let mut of_path = runs.remove(path).unwrap_or_default();
            of_path.sort_by(|a, b| a.requests_per_s.total_cmp(&b.requests_per_s));
            forwarding.push(of_path.swap_remove(of_path.len() / 2));
        }
    }
    let nginx_note =
        proxy.is_none().then(|| "nginx is not installed (Debian package `nginx`): no nginx baseline".to_string());
    if let Some((mut child, _)) = proxy {
        // SIGQUIT: nginx's graceful stop, which takes its workers down too (a kill would leave
        // them running).
        let _ = Command::new("kill").args(["-QUIT", &child.id().to_string()]).status();
        let _ = child.wait();
    }
    let find =
        |p: &str, connections: usize| forwarding.iter().find(|f| f.path == p && f.connections == connections).cloned();
    let (direct, router) = (find("direct", 32).expect("direct"), find("router", 32).expect("router"));
    let router_share_of_direct = router.requests_per_s / direct.requests_per_s;
    let router_share_of_nginx = find("nginx", 32).map(|n| router.requests_per_s / n.requests_per_s);
    let router_added_p50_us = router.p50_us - direct.p50_us;
    let (direct_1, router_1) = (find("direct", 1).expect("direct"), find("router", 1).expect("router"));
    let router_added_p50_us_one_client = router_1.p50_us - direct_1.p50_us;
    print_forwarding(&forwarding, &nginx_note);
    println!(
        "  router: {:.0} % of direct (target >= 60 %), {} of nginx (target >= 80 %); adds {:.0} µs at p50 \
         with one client (target <= 200), {:.0} µs at saturation",
        router_share_of_direct * 100.0,
        router_share_of_nginx.map_or("-".to_string(), |s| format!("{:.0} %", s * 100.0)),
        router_added_p50_us_one_client,
        router_added_p50_us
    );
    if std::env::var("IMAGO_BENCH_ONLY").is_ok_and(|v| v == "forwarding") {
        println!("(IMAGO_BENCH_ONLY=forwarding: nothing else measured, nothing written)");
        return;
    }

    // Memory over a steady run through one router, then a full hold queue.
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let run_secs = if quick() { 5 } else { 60 };
    let load_task = rt.spawn(steady(vec![router_port], 1_000, stop.clone(), samples.clone()));
    std::thread::sleep(Duration::from_secs(2));
    let rss_start = rss_kib(c.pid("router-1"));
    std::thread::sleep(Duration::from_secs(run_secs - 2));
    let rss_end = rss_kib(c.pid("router-1"));
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        let _ = load_task.await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let steady_samples = samples.lock().expect("lock").clone();
    let memory = Memory {
        seconds: run_secs,
        rss_kib_at_start: rss_start,
        rss_kib_at_end: rss_end,
        requests: steady_samples.len(),
        failed: steady_samples.iter().filter(|s| s.2 != 200).count(),
    };
    drop(c);
    let full_queue = full_hold_queue(&rt);

    let switch: Vec<Switch> = [1, 2, 4].into_iter().map(|n| switch_at_steady_rate(&rt, n)).collect();

    println!("switch at 1,000 requests/s, 3 coordinators, fsync on (hold: requests sent during the switch; baseline: before):");
    for s in &switch {
        print_switch(s);
    }
    println!(
        "router memory over {} s at 1,000 req/s: {} KiB -> {} KiB ({} requests, {} failed)",
        memory.seconds, memory.rss_kib_at_start, memory.rss_kib_at_end, memory.requests, memory.failed
    );
    println!(
        "full hold queue ({}): {} sent while frozen, {} held, {} answered 503 within 50 ms; RSS {} -> {} (half-way) -> {} KiB",
        full_queue.hold_queue_max,
        full_queue.sent_while_frozen,
        full_queue.held,
        full_queue.answered_503_within_50ms,
        full_queue.rss_kib_before,
        full_queue.rss_kib_half_way,
        full_queue.rss_kib_after
    );
    let targets = BTreeMap::from([
        ("hold", "p99 <= 10 ms, max <= 50 ms"),
        ("switch_latency", "p50 <= 5 ms"),
        ("failed", "0"),
        ("router_throughput", ">= 60 % of direct, >= 80 % of nginx"),
        ("router_added_p50", "<= 200 µs (one client)"),
        ("memory", "flat over 60 s; a full hold queue answers 503"),
    ]);
    let report = Report {
        forwarding,
        nginx: nginx_note,
        router_share_of_direct,
        router_share_of_nginx,
        router_added_p50_us,
        router_added_p50_us_one_client,
        switch,
        memory,
        full_queue,
        targets,
    };
    let out = std::env::var("IMAGO_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/cluster.json"));
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report).expect("json")).expect("write");
    println!("wrote {}", out.display());
}

fn print_forwarding(forwarding: &[Forwarding], nginx_note: &Option<String>) {
    println!(
        "forwarding a 1 KiB answer over keep-alive connections (closed loop; each the median of interleaved rounds):"
    );
    for f in forwarding {
        let cpu = match (f.proxy_cpu_us_per_request, f.proxy_user_cpu_us_per_request) {
            (Some(all), Some(user)) => format!("   proxy CPU {all:.1} µs/request ({user:.1} in user space)"),
            _ => String::new(),
        };
        println!(
            "  {:<7} {:>2} client(s) {:>9.0} req/s   p50 {:>7.0} µs   p99 {:>7.0} µs   {} failed{cpu}",
            f.path, f.connections, f.requests_per_s, f.p50_us, f.p99_us, f.failed
        );
    }
    if let Some(note) = nginx_note {
        println!("  ({note})");
    }
}

/// A freeze held open (a slow write in flight keeps a router from acking), a small hold queue,
/// and 1,000 requests/s: the queue fills, and the rest are answered 503 at once.
fn full_hold_queue(rt: &tokio::runtime::Runtime) -> FullQueue {
    let (v1, v2) = (backend("v1"), backend("v2"));
    let mut c = Cluster::new("queue", 1, 1, v1);
    c.start(&["--hold-ms-max", "5000", "--hold-queue-max", "100"]);
    let port = c.routers[0].1;
    // The plan's limits are the ones the router applies during its upgrade.
    let plan = c.plan(v2, 5_000);
    let text = std::fs::read_to_string(&plan).expect("plan");
    let limited = text.replace("hold_ms_max = 5000\n", "hold_ms_max = 5000\nhold_queue_max = 100\n");
    assert_ne!(limited, text, "the plan names its hold limit");
    std::fs::write(&plan, limited).expect("plan");
    assert!(c.cli(&["upgrade", "start", plan.to_str().expect("path")]).status.success());
    // Mirrored reads for the gate.
    rt.block_on(async {
        for _ in 0..200 {
            if let Some(mut conn) = Conn::open(port).await {
                let _ = conn.get("/warm").await;
            }
        }
    });
    for _ in 0..100 {
        if c.gate_open() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A slow request in flight: the router cannot ack the freeze for 3 s.
    let slow = rt.spawn(async move {
        if let Some(mut conn) = Conn::open(port).await {
            let _ = conn.get("/slow").await;
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let rss_before = rss_kib(c.pid("router-1"));
    assert!(c.cli(&["upgrade", "switch"]).status.success());
    for _ in 0..100 {
        if c.phase() == "Freezing" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let load_task = rt.spawn(steady(vec![port], 1_000, stop.clone(), samples.clone()));
    std::thread::sleep(Duration::from_millis(750));
    let rss_half_way = rss_kib(c.pid("router-1"));
    std::thread::sleep(Duration::from_millis(750));
    stop.store(true, Ordering::SeqCst);
    let rss_after = rss_kib(c.pid("router-1"));
    rt.block_on(async {
        let _ = load_task.await;
        let _ = slow.await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let samples = samples.lock().expect("lock").clone();
    FullQueue {
        hold_queue_max: 100,
        sent_while_frozen: samples.len(),
        answered_503_within_50ms: samples.iter().filter(|s| s.2 == 503 && s.1 <= 50_000).count(),
        held: samples.iter().filter(|s| s.1 > 50_000).count(),
        rss_kib_before: rss_before,
        rss_kib_half_way: rss_half_way,
        rss_kib_after: rss_after,
    }
}
