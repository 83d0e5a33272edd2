//! Simulator benchmark: throughput (simulated seconds per wall second, one thread) and switch
//! figures (hold times, freeze → commit) for several cluster shapes, with and without faults.
//!
//! `cargo bench -p imago-sim --bench throughput` prints a table and writes
//! `target/bench/sim-throughput.json` (or `$IMAGO_BENCH_OUT`) to compare runs.

use imago_sim::{run_seed, FaultSet, SimConfig, Summary};
use serde::Serialize;

#[derive(Serialize)]
struct Row {
    name: String,
    coordinators: usize,
    routers: usize,
    datacenters: usize,
    faults: String,
    /// The switch's targets for this shape, fault-free (issue: a faster switch): requests held
    /// p50 and max, in ms; `None` where there is none.
    target_hold_p50_ms: Option<u64>,
    target_hold_ms_max: Option<u64>,
    #[serde(flatten)]
    summary: Summary,
}

fn measure(name: &str, config: SimConfig, seeds: u64) -> Row {
    // The benchmark's edge: wall time of a whole run (the simulator itself never reads it).
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    let mut summary = Summary::default();
    for seed in 0..seeds {
        summary.add(&run_seed(&config, seed));
    }
    summary.finish(started.elapsed().as_secs_f64());
    let fault_free = !config.faults.any();
    let (target_hold_p50_ms, target_hold_ms_max) = match (fault_free, config.datacenters) {
        (true, 1) => (None, Some(10)),
        (true, _) => (Some(500), Some(1_000)),
        (false, _) => (None, None),
    };
    Row {
        name: name.to_string(),
        coordinators: config.coordinators,
        routers: config.routers,
        datacenters: config.datacenters,
        faults: config.faults.to_string(),
        target_hold_p50_ms,
        target_hold_ms_max,
        summary,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = |n: u64| if quick { (n / 10).max(2) } else { n };
    let base = SimConfig::default();
    let none = FaultSet::NONE;
    let wide = |routers| SimConfig { coordinators: 5, routers, datacenters: 3, ..SimConfig::default() };
    let rows = vec![
        measure("default, all faults", base.clone(), scale(300)),
        measure("default, no faults", SimConfig { faults: none, ..base.clone() }, scale(100)),
        measure("5c/10r/3dc, all faults", wide(10), scale(20)),
        measure("5c/50r/3dc, all faults", wide(50), scale(20)),
        measure("5c/200r/3dc, all faults", wide(200), scale(20)),
        measure("5c/10r/3dc, no faults", SimConfig { faults: none, ..wide(10) }, scale(20)),
        measure("5c/50r/3dc, no faults", SimConfig { faults: none, ..wide(50) }, scale(20)),
        measure("5c/200r/3dc, no faults", SimConfig { faults: none, ..wide(200) }, scale(20)),
    ];
    println!(
        "{:<26} {:>6} {:>9} {:>8} {:>8} {:>5} {:>5} {:>4} {:>9} {:>8} {:>8} {:>10}",
        "config",
        "seeds",
        "wall s",
        "sim s",
        "sim/wall",
        "sw",
        "rb",
        "viol",
        "hold p50",
        "hold p99",
        "hold max",
        "frz->cmt"
    );
    for r in &rows {
        let s = &r.summary;
        println!(
            "{:<26} {:>6} {:>9.2} {:>8.0} {:>8.0} {:>5} {:>5} {:>4} {:>7}ms {:>6}ms {:>6}ms {:>8}ms",
            r.name,
            s.seeds,
            s.wall_seconds,
            s.simulated_seconds,
            s.simulated_seconds_per_wall_second,
            s.switched,
            s.aborted,
            s.violations,
            s.hold_p50_ms,
            s.hold_p99_ms,
            s.hold_ms_max,
            s.switch_p50_ms
        );
    }
    println!();
    println!("switch targets (fault-free; requests held while frozen):");
    for r in rows.iter().filter(|r| r.target_hold_ms_max.is_some()) {
        let s = &r.summary;
        let p50 = r.target_hold_p50_ms.map_or("-".to_string(), |t| {
            format!("p50 {} ms (target <= {t}: {})", s.hold_p50_ms, if s.hold_p50_ms <= t { "met" } else { "NOT met" })
        });
        let max = r.target_hold_ms_max.expect("filtered");
        let met = if s.hold_ms_max <= max { "met" } else { "NOT met" };
        println!("  {:<26} {p50}; max {} ms (target <= {max}: {met})", r.name, s.hold_ms_max);
    }
    let out = std::env::var("IMAGO_BENCH_OUT").unwrap_or_else(|_| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench");
        let _ = std::fs::create_dir_all(dir);
        format!("{dir}/sim-throughput.json")
    });
    std::fs::write(&out, serde_json::to_string_pretty(&rows).expect("rows serialize")).expect("bench output writable");
    println!("wrote {out}");
    assert!(rows.iter().all(|r| r.summary.violations == 0), "a benchmark run found violations");
}
