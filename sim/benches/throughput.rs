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
    Row {
        name: name.to_string(),
        coordinators: config.coordinators,
        routers: config.routers,
        datacenters: config.datacenters,
        faults: config.faults.to_string(),
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
    let out = std::env::var("IMAGO_BENCH_OUT").unwrap_or_else(|_| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench");
        let _ = std::fs::create_dir_all(dir);
        format!("{dir}/sim-throughput.json")
    });
    std::fs::write(&out, serde_json::to_string_pretty(&rows).expect("rows serialize")).expect("bench output writable");
    println!("wrote {out}");
    assert!(rows.iter().all(|r| r.summary.violations == 0), "a benchmark run found violations");
}
