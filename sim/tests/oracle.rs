//! The simulator alone as a test oracle, for mutation testing (docs/mutation-testing.md): a fixed
//! set of faulty seeds, every checker on, nothing else. A mutant of a core that this test does
//! not fail is one the simulator cannot see.
//!
//! Ignored in the normal suite (it wants a release build: about 300 seeds in a few seconds);
//! run it with `cargo test -p imago-sim --profile mutants --test oracle -- --ignored`.

use imago_sim::{run_seed, SimConfig};
use std::sync::atomic::{AtomicBool, Ordering};

/// Seeds run: enough that a fault seen in one seed of a hundred is seen a few times.
const ORACLE_SEEDS: u64 = 300;

#[test]
#[ignore = "the mutation-testing oracle: run in release with --ignored"]
fn the_simulator_alone_finds_no_violation_in_300_faulty_seeds() {
    let config = SimConfig::default();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8) as u64;
    // A mutant is caught at its first failing seed: the others stop there.
    let failed = AtomicBool::new(false);
    let failing: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (config, failed) = (&config, &failed);
                scope.spawn(move || {
                    let mut found = Vec::new();
                    for seed in (0..ORACLE_SEEDS).filter(|s| s % workers == w) {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let report = run_seed(config, seed);
                        if let Some(first) = report.violations.first() {
                            failed.store(true, Ordering::Relaxed);
                            found.push(format!("seed {seed}: {first}"));
                        }
                    }
                    found
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a worker panicked")).collect()
    });
    assert!(failing.is_empty(), "violations:\n{}", failing.join("\n"));
}
