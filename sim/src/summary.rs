//! Aggregates seed reports into the figures `imago sim` prints.

use crate::run::{SeedOutcome, SeedReport};
use serde::Serialize;

/// Percentile of sorted values (nearest rank).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What a run of many seeds produced.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub seeds: u64,
    pub switched: u64,
    pub aborted: u64,
    pub unfinished: u64,
    /// Seeds in which at least one freeze was aborted (before a switch or a rollback).
    pub seeds_with_aborted_epochs: u64,
    pub violations: u64,
    pub failing_seeds: Vec<u64>,
    pub simulated_seconds: f64,
    pub wall_seconds: f64,
    pub simulated_seconds_per_wall_second: f64,
    pub held_requests: u64,
    pub hold_p50_ms: u64,
    pub hold_p99_ms: u64,
    pub hold_ms_max: u64,
    /// Requests held by routers that restarted without disk state of their own (the only ones
    /// that wait for the coordinator at startup; with their own disk they serve at once).
    pub startup_held: u64,
    pub startup_hold_p50_ms: u64,
    pub startup_hold_max_ms: u64,
    /// Requests held by routers restarted on their own disk while they wrote their boot record
    /// (a local write; they wait for no coordinator), and the longest such hold.
    pub boot_held: u64,
    pub boot_hold_max_ms: u64,
    /// Requests in flight that routers ended at a freeze (`inflight_ms_max` reached).
    pub ended: u64,
    /// Store operations that failed (the store fault) and were tried again.
    pub store_failures: u64,
    /// Ranges of old keys data nodes compared while traffic ran.
    pub ranges_compared: u64,
    /// Rolled-back upgrades data nodes abandoned (capture removed, copy given up).
    pub abandoned: u64,
    /// Requests held by a freeze (the switch's cost to clients).
    pub freeze_hold_ms_p50: u64,
    pub freeze_hold_ms_max: u64,
    /// Client requests of any kind that did not succeed: refused, 503, rejected, or unknown
    /// (timed out, or lost with a crashed router).
    pub failed_requests: u64,
    /// Upgrades run (`--upgrades` per seed), and those that switched.
    pub upgrades_run: u64,
    pub upgrades_switched: u64,
    /// Seeds in which every upgrade asked for switched.
    pub seeds_all_switched: u64,
    /// Routers that joined the roster, and routers retired, over all seeds.
    pub routers_joined: u64,
    pub routers_retired: u64,
    pub switch_p50_ms: u64,
    pub switch_max_ms: u64,
    pub messages: u64,
    pub acked_writes: u64,
    pub failed_writes: u64,
    pub unknown_writes: u64,
    #[serde(skip)]
    hold_all: Vec<u64>,
    #[serde(skip)]
    switch_all: Vec<u64>,
    #[serde(skip)]
    startup_all: Vec<u64>,
}

impl Summary {
    pub fn add(&mut self, r: &SeedReport) {
        self.seeds += 1;
        match r.outcome {
            SeedOutcome::Switched => self.switched += 1,
            SeedOutcome::RolledBack => self.aborted += 1,
            SeedOutcome::Unfinished => self.unfinished += 1,
        }
        if r.aborted_epochs > 0 {
            self.seeds_with_aborted_epochs += 1;
        }
        if !r.violations.is_empty() {
            self.violations += r.violations.len() as u64;
            self.failing_seeds.push(r.seed);
        }
        self.simulated_seconds += r.sim_ms as f64 / 1000.0;
        self.hold_all.extend_from_slice(&r.hold_ms);
        self.startup_all.extend_from_slice(&r.startup_hold_ms);
        self.boot_held += r.boot_hold_ms.len() as u64;
        self.ended += r.ended;
        self.store_failures += r.store_failures;
        self.ranges_compared += r.ranges_compared;
        self.abandoned += r.abandoned;
        self.boot_hold_max_ms = self.boot_hold_max_ms.max(r.boot_hold_ms.iter().copied().max().unwrap_or(0));
        self.switch_all.extend(r.switch_ms);
        self.messages += r.messages;
        self.acked_writes += r.acked_writes;
        self.failed_writes += r.failed_writes;
        self.unknown_writes += r.unknown_writes;
        self.failed_requests += r.failed_requests;
        self.upgrades_run += r.upgrades_run;
        self.upgrades_switched += r.upgrades_switched;
        self.seeds_all_switched += u64::from(r.upgrades_switched == u64::from(r.upgrades_asked));
        self.routers_joined += r.routers_joined;
        self.routers_retired += r.routers_retired;
    }

    /// Computes the derived figures once all seeds are in.
    pub fn finish(&mut self, wall_seconds: f64) {
        self.wall_seconds = wall_seconds;
        self.simulated_seconds_per_wall_second =
            if wall_seconds > 0.0 { self.simulated_seconds / wall_seconds } else { 0.0 };
        self.hold_all.sort_unstable();
        self.switch_all.sort_unstable();
        self.held_requests = self.hold_all.len() as u64;
        self.hold_p50_ms = percentile(&self.hold_all, 50.0);
        self.hold_p99_ms = percentile(&self.hold_all, 99.0);
        self.hold_ms_max = self.hold_all.last().copied().unwrap_or(0);
        self.startup_all.sort_unstable();
        self.startup_held = self.startup_all.len() as u64;
        self.freeze_hold_ms_p50 = self.hold_p50_ms;
        self.freeze_hold_ms_max = self.hold_ms_max;
        self.startup_hold_p50_ms = percentile(&self.startup_all, 50.0);
        self.startup_hold_max_ms = self.startup_all.last().copied().unwrap_or(0);
        self.switch_p50_ms = percentile(&self.switch_all, 50.0);
        self.switch_max_ms = self.switch_all.last().copied().unwrap_or(0);
    }
}
