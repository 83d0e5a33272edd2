//! `imago sim`: many seeds, a summary, and a replay command for every failure.

use anyhow::Context;
use clap::Args;
use sim::{value_name, Bug, FaultKind, FaultSet, Scenario, SeedReport, SimConfig, Summary};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// Number of seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed (seeds run are seed, seed+1, ...).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Coordinator replicas (a Raft group).
    #[arg(long, default_value_t = 3)]
    coordinators: usize,
    /// Ingress routers (each with the route and validate duties).
    #[arg(long, default_value_t = 3)]
    routers: usize,
    /// Data nodes (shards; each holds the old and the new store, captures and transforms).
    #[arg(long = "data-nodes", default_value_t = 2)]
    data_nodes: usize,
    /// Datacenters (more than one: 50–150 ms between them).
    #[arg(long, default_value_t = 1)]
    datacenters: usize,
    /// Fault kinds, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    faults: Vec<FaultKind>,
    /// Plant a known bug to prove the checkers catch it.
    #[arg(long, value_enum)]
    bug: Option<Bug>,
    /// Run a named scenario instead of random faults.
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// Upgrades run back to back in each seed (v1 -> v2 -> v3 ...; one that rolls back is
    /// retried by the next).
    #[arg(long, default_value_t = 1)]
    upgrades: u32,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// Where failing seeds' traces are written.
    #[arg(long, default_value = "sim-traces")]
    trace_dir: PathBuf,
    /// Worker threads (each seed runs alone on one thread; results do not depend on this).
    #[arg(long)]
    jobs: Option<usize>,
    /// Stop at the first failing seed.
    #[arg(long)]
    fail_fast: bool,
    /// Write the trace of every seed run, failing or not (use with few seeds).
    #[arg(long)]
    trace: bool,
}

impl SimArgs {
    fn config(&self) -> anyhow::Result<SimConfig> {
        let config = SimConfig {
            coordinators: self.coordinators,
            routers: self.routers,
            data_nodes: self.data_nodes,
            datacenters: self.datacenters,
            faults: FaultSet::from_kinds(&self.faults),
            bug: self.bug,
            scenario: self.scenario,
            upgrades: self.upgrades,
            ..SimConfig::default()
        };
        config.validate().map_err(anyhow::Error::msg)?;
        Ok(config)
    }

    /// The command that replays one seed with the same settings.
    fn replay(&self, seed: u64) -> String {
        let mut cmd = format!(
            "imago sim --seed {seed} --seeds 1 --coordinators {} --routers {} --data-nodes {} --datacenters {} --faults {}",
            self.coordinators,
            self.routers,
            self.data_nodes,
            self.datacenters,
            FaultSet::from_kinds(&self.faults)
        );
        if let Some(bug) = &self.bug {
            cmd.push_str(&format!(" --bug {}", value_name(bug)));
        }
        if let Some(s) = &self.scenario {
            cmd.push_str(&format!(" --scenario {}", value_name(s)));
        }
        if self.upgrades != 1 {
            cmd.push_str(&format!(" --upgrades {}", self.upgrades));
        }
        cmd
    }
}

pub fn run(args: SimArgs) -> anyhow::Result<ExitCode> {
    let config = args.config()?;
    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).clamp(1, 64);
    // The binary's edge: wall time of the whole run, for the simulated-per-wall figure.
    #[allow(clippy::disallowed_methods)]
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let reports: Mutex<Vec<SeedReport>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= args.seeds || stop.load(Ordering::Relaxed) {
                    return;
                }
                let report = sim::run_seed(&config, args.seed + k);
                if !report.violations.is_empty() && args.fail_fast {
                    stop.store(true, Ordering::Relaxed);
                }
                reports.lock().expect("no worker panics holding it").push(report);
            });
        }
    });
    let wall = started.elapsed().as_secs_f64();
    let mut reports = reports.into_inner().expect("workers done");
    reports.sort_by_key(|r| r.seed);
    let mut summary = Summary::default();
    for r in &reports {
        summary.add(r);
    }
    summary.finish(wall);

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "seeds run: {} (faults: {}; {} coordinators, {} routers, {} data nodes, {} datacenter(s){}{})",
        summary.seeds,
        config.faults,
        config.coordinators,
        config.routers,
        config.data_nodes,
        config.datacenters,
        config.bug.map_or(String::new(), |b| format!("; planted bug {}", value_name(&b))),
        config.scenario.map_or(String::new(), |s| format!("; scenario {}", s.name())),
    )?;
    writeln!(
        out,
        "outcomes: switched {}, aborted (rolled back) {}, unfinished {}; seeds with an aborted freeze: {}",
        summary.switched, summary.aborted, summary.unfinished, summary.seeds_with_aborted_epochs
    )?;
    writeln!(
        out,
        "upgrades: {} run, {} switched ({} per seed asked); seeds that switched every one: {}; roster changes: {} joins, {} retirements",
        summary.upgrades_run,
        summary.upgrades_switched,
        config.upgrades,
        summary.seeds_all_switched,
        summary.routers_joined,
        summary.routers_retired
    )?;
    writeln!(
        out,
        "simulated {:.1} s in {:.2} s wall: {:.0} simulated s per wall s ({} jobs)",
        summary.simulated_seconds, summary.wall_seconds, summary.simulated_seconds_per_wall_second, jobs
    )?;
    writeln!(
        out,
        "switch hold: {} requests held while frozen, p50 {} ms, p99 {} ms, max {} ms; freeze seen -> commit applied p50 {} ms, max {} ms",
        summary.held_requests, summary.hold_p50_ms, summary.hold_p99_ms, summary.hold_ms_max, summary.switch_p50_ms, summary.switch_max_ms
    )?;
    writeln!(
        out,
        "startup hold (only routers without disk state of their own wait for a first read): {} requests, p50 {} ms, max {} ms",
        summary.startup_held, summary.startup_hold_p50_ms, summary.startup_hold_max_ms
    )?;
    writeln!(
        out,
        "boot hold (routers restarted on their own disk, while writing their boot record): {} requests, max {} ms",
        summary.boot_held, summary.boot_hold_max_ms
    )?;
    writeln!(out, "requests in flight ended at a freeze (inflight_ms_max reached): {}", summary.ended)?;
    writeln!(out, "store operations failed and tried again: {}", summary.store_failures)?;
    writeln!(out, "ranges of old keys compared while traffic ran: {}", summary.ranges_compared)?;
    writeln!(out, "rolled-back upgrades abandoned by data nodes (capture removed): {}", summary.abandoned)?;
    writeln!(
        out,
        "client writes: {} acked, {} failed (503/refused), {} unknown (timed out); failed requests of any kind: {}; {} messages",
        summary.acked_writes, summary.failed_writes, summary.unknown_writes, summary.failed_requests, summary.messages
    )?;
    writeln!(out, "violations: {}", summary.violations)?;
    for r in reports.iter().filter(|r| !r.violations.is_empty()).take(10) {
        writeln!(out, "\nseed {} FAILED:", r.seed)?;
        for v in r.violations.iter().take(5) {
            writeln!(out, "  {v}")?;
        }
        for f in r.fault_log.iter().take(10) {
            writeln!(out, "  fault: {f}")?;
        }
        let path = write_trace(&args, &config, r.seed).context("writing the trace")?;
        writeln!(out, "  replay: {}", args.replay(r.seed))?;
        writeln!(out, "  trace:  {}", path.display())?;
    }
    if args.trace {
        for r in reports.iter().filter(|r| r.violations.is_empty()) {
            let path = write_trace(&args, &config, r.seed).context("writing the trace")?;
            writeln!(out, "trace of seed {}: {}", r.seed, path.display())?;
        }
    }
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&summary)?)?;
    }
    Ok(if summary.violations > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Re-runs a seed with its trace kept as text and writes it (deterministic, so it is the
/// same run).
fn write_trace(args: &SimArgs, config: &SimConfig, seed: u64) -> anyhow::Result<PathBuf> {
    let traced = SimConfig { trace_lines: true, ..config.clone() };
    let report = sim::run_seed(&traced, seed);
    std::fs::create_dir_all(&args.trace_dir)?;
    let path = args.trace_dir.join(format!("seed-{seed}.trace"));
    let mut text = format!("# {}\n# trace hash {:016x}\n", args.replay(seed), report.trace_hash);
    for v in &report.violations {
        text.push_str(&format!("# violation: {v}\n"));
    }
    for line in report.trace_lines.unwrap_or_default() {
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(&path, text)?;
    Ok(path)
}
