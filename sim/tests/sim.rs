//! The simulator's acceptance tests: determinism, many faulty seeds without a violation, a
//! planted bug caught, named scenarios, and scale.

use imago_sim::{run_seed, Bug, FaultSet, Scenario, SeedOutcome, SeedReport, SimConfig, Violation};

fn run(config: &SimConfig, seeds: impl IntoIterator<Item = u64>) -> Vec<SeedReport> {
    seeds.into_iter().map(|s| run_seed(config, s)).collect()
}

fn assert_clean(reports: &[SeedReport]) {
    let failing: Vec<String> = reports
        .iter()
        .filter(|r| !r.violations.is_empty())
        .map(|r| {
            format!("seed {}: {:?}\n  faults: {:?}", r.seed, &r.violations[..r.violations.len().min(3)], r.fault_log)
        })
        .collect();
    assert!(failing.is_empty(), "violations:\n{}", failing.join("\n"));
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let config = SimConfig::default();
    let first = run(&config, 0..20);
    let second = run(&config, 0..20);
    for (a, b) in first.iter().zip(&second) {
        assert!(a.trace_events > 1_000, "seed {} traced only {} events", a.seed, a.trace_events);
        assert_eq!(a.trace_hash, b.trace_hash, "seed {} diverged between two runs", a.seed);
        assert_eq!(a.sim_ms, b.sim_ms);
        assert_eq!(a.fault_log, b.fault_log);
    }
    let mut hashes: Vec<u64> = first.iter().map(|r| r.trace_hash).collect();
    hashes.sort_unstable();
    hashes.dedup();
    assert_eq!(hashes.len(), 20, "different seeds must give different runs");
    assert!(first.iter().any(|r| !r.fault_log.is_empty()), "these seeds must be faulty");
}

/// The store fault: data nodes' store operations fail (some after they took effect) and are
/// tried again. Seeds 8 and 99 found the first bug of it: a failed prune was left to the next
/// one, which came only a whole bound later, so the change log outgrew its bound
/// (`ChangeLogUnbounded`); a failed prune is now due again at once. Seed 20 with
/// `--upgrades 3` found the second: a comparison whose answer was lost (performed, then failed)
/// was asked for again after the store had dropped its scratch copy, so it compared nothing
/// with the new tables and the node acked "the universes differ" (`ChecksumVerdictWrong`); the
/// scratch copy now stays until the next comparison or batch. Seed 304 found two more: an
/// apply up to the final position committed but answered with a failure, so the node read the
/// new store's checkpoint and went on from it, but its drain never heard that everything was
/// applied (no later batch would tell it); and, draining on a slow store, the node read its
/// stream back to back, each answer arriving just as the next read was due, so its actor never
/// had a turn for its timers: it stopped watching and never learned the abort.
#[test]
fn failed_store_operations_are_tried_again_and_lose_nothing() {
    let config = SimConfig::default();
    let mut reports = run(&config, [8, 99, 304].into_iter().chain(200..230));
    reports.extend(run(&SimConfig { upgrades: 3, ..SimConfig::default() }, [20]));
    assert_clean(&reports);
    for seed in [8, 99] {
        let r = reports.iter().find(|r| r.seed == seed).expect("run");
        assert!(r.store_failures > 0, "seed {seed} must draw the store fault");
    }
    let failing = reports.iter().filter(|r| r.store_failures > 0).count();
    assert!(failing >= 5, "only {failing} of {} seeds failed store operations", reports.len());
    assert!(reports.iter().all(|r| r.outcome != SeedOutcome::Unfinished));
}

/// Seeds 0..200 under every fault kind, plus seeds that once found bugs (regressions):
/// 3, 9, 14, 16, 18 (lost writes from reused request ids; retry spin; duplicate start) are in
/// the range; 202 (a false mismatch before the bulk copy ended) is added. 18 and 71 lose a
/// router's disk: request keys that named only the node and its boot count collided with those
/// of its earlier disk (reads got other requests' answers) until keys carried the disk's id.
/// 818: a watch timing out on a crashed replica moved the agent's shared target off the leader
/// a write had just found, back to the crashed replica, every time: the data nodes never
/// learned the abort (the propagation checker saw it).
/// From the first 30,000-seed hunt (build before the fixes): 5000346 (a `Frozen` resent after an
/// abort, with requests in flight), 5004104 (a late batch of a copy restarted at the same position
/// passed the compare-and-set), 5007213 (a crashed router still sent a report), 5009700 (a lost
/// disk never confirmed by a read was taken for the router's own state), 5012372 (a clock jump
/// after the freeze was stamped moved its deadline beyond the availability bound).
/// 15003149 (100,000-seed hunt): a joined router was expected to follow decisions before its join
/// was applied (a checker's mistake: off the roster it acts on nothing, by design).
/// From the 65,000-seed hunt: 9009048 (a bid counted twice: a duplicate delivered after the data
/// node restarted ran again, its idempotency answer having lived only in memory; now the store's
/// request log answers it) and 7000386 (3 datacenters; an acknowledged bid missing at the end;
/// passes since the request log, whose rows change the schedule, so its cause is not proven).
/// 700573 and 1016306 (the liveness hole of the issue that added the roster: the upgrade stayed
/// `Switched`, never `Done`, 40 s after the heal): they end `Done` today, but they stopped
/// reproducing when later changes moved their schedules, so the cause is not proven; kept as
/// regression seeds all the same.
/// 318 (once data nodes compared ranges while traffic ran, which moved its schedule): a fence
/// queued behind a store operation's retry was performed after the freeze's abort was on disk.
/// 42001539: the same fence, started while the abort was being written to disk (persisted, not
/// yet acted on): a fence now waits while a later decision is being persisted.
#[test]
fn two_hundred_faulty_seeds_keep_every_invariant_and_both_outcomes_occur() {
    let config = SimConfig::default();
    let reports = run(
        &config,
        (0..200).chain([
            202, 318, 818, 700_573, 1_016_306, 5_000_346, 5_004_104, 5_007_213, 5_009_700, 5_012_372, 9_009_048,
            15_003_149, 42_001_539,
        ]),
    );
    assert_clean(&reports);
    let switched = reports.iter().filter(|r| r.outcome == SeedOutcome::Switched).count();
    let rolled_back = reports.iter().filter(|r| r.outcome == SeedOutcome::RolledBack).count();
    let faulty = reports.iter().filter(|r| !r.fault_log.is_empty()).count();
    assert_eq!(switched + rolled_back, reports.len(), "every seed must end");
    assert!(switched > 100, "only {switched} of {} seeds switched", reports.len());
    assert!(rolled_back > 0, "no seed rolled back: faults never forced an abort");
    assert!(faulty > 150, "only {faulty} seeds drew faults");
    assert!(
        reports.iter().any(|r| r.aborted_epochs > 0 && r.outcome == SeedOutcome::Switched),
        "no retry after an abort ever switched"
    );
    let seeds_with = |needle: &str| reports.iter().filter(|r| r.fault_log.iter().any(|f| f.contains(needle))).count();
    let garbage = seeds_with("Garbage");
    assert!(garbage > 50, "random frames were sent in only {garbage} seeds");
    let manual = seeds_with("switch = manual");
    assert!(manual > 20, "manual switch mode ran in only {manual} seeds");
    assert!(
        reports
            .iter()
            .any(|r| r.outcome == SeedOutcome::Switched && r.fault_log.iter().any(|f| f.contains("switch = manual"))),
        "no manual-mode seed switched"
    );
    let compared = reports.iter().filter(|r| r.ranges_compared > 0).count();
    assert!(compared > 150, "data nodes compared key ranges while traffic ran in only {compared} seeds");
    let drift = seeds_with("Drift");
    assert!(drift > 20, "a rogue writer changed a new database in only {drift} seeds");
    let aborts = seeds_with("OperatorAbort");
    assert!(aborts > 10, "operator aborts were tried in only {aborts} seeds");
    let built = reports.iter().filter(|r| r.snapshots_built > 0).count();
    assert!(built > 150, "Raft snapshots were built in only {built} seeds");
    let installed = reports.iter().filter(|r| r.snapshots_installed > 0).count();
    assert!(installed > 10, "snapshot installs (a lagging replica catching up) happened in only {installed} seeds");
}

#[test]
fn planted_bug_release_old_on_timeout_is_caught_within_50_seeds() {
    let config = SimConfig { bug: Some(Bug::ReleaseOldOnTimeout), ..SimConfig::default() };
    let caught = (0..50)
        .map(|s| run_seed(&config, s))
        .find(|r| r.violations.iter().any(|v| matches!(v.violation, Violation::MixedUniverses { .. })));
    let report = caught.expect("the broken router was not caught within 50 seeds");
    assert!(report.seed < 50);
}

#[test]
fn planted_bug_lose_change_on_restart_is_caught_within_50_seeds() {
    let config = SimConfig { bug: Some(Bug::LoseChangeOnRestart), ..SimConfig::default() };
    let caught = (0..50).map(|s| run_seed(&config, s)).find(|r| {
        r.violations.iter().any(|v| {
            matches!(
                v.violation,
                Violation::LostWrites { .. } | Violation::ChecksumsDiffer { .. } | Violation::DrainedIncomplete { .. }
            )
        })
    });
    assert!(caught.is_some(), "a transform that loses a change on restart was not caught within 50 seeds");
}

/// A crashed copy must restart from a fresh snapshot (its old snapshot died with the process).
/// Resuming the old copy's key cursor on a fresh snapshot, while the stream goes on from the old
/// snapshot's position, leaves rows newer than the checkpoint says: the fidelity check sees it
/// even though the final contents converge.
#[test]
fn planted_bug_resume_copy_from_new_snapshot_is_caught_within_50_seeds() {
    let config = SimConfig { bug: Some(Bug::ResumeCopyFromNewSnapshot), ..SimConfig::default() };
    let caught = (0..50)
        .map(|s| run_seed(&config, s))
        .find(|r| r.violations.iter().any(|v| matches!(v.violation, Violation::TransformFidelity { .. })));
    assert!(caught.is_some(), "a copy resumed on a fresh snapshot was not caught within 50 seeds");
}

/// A data node that opens its new store to clients once drained, before the commit, is caught
/// where it opens it: its disk holds the freeze, not the commit.
#[test]
fn planted_bug_open_new_when_drained_is_caught_within_50_seeds() {
    let caught = first_caught(Bug::OpenNewWhenDrained, |v| matches!(v, Violation::OpenedEarly { .. }));
    assert!(caught.is_some(), "a data node opening its new store before the commit was not caught within 50 seeds");
}

/// The first seed of 0..50 whose violations include one that `wanted` matches.
fn first_caught(bug: Bug, wanted: impl Fn(&Violation) -> bool) -> Option<u64> {
    let config = SimConfig { bug: Some(bug), ..SimConfig::default() };
    (0..50).map(|s| run_seed(&config, s)).find(|r| r.violations.iter().any(|v| wanted(&v.violation))).map(|r| r.seed)
}

/// A router that acks `Frozen` with requests still in flight to the old universe is caught
/// where the ack leaves it (the old store's fence would otherwise hide it).
#[test]
fn planted_bug_ack_frozen_with_in_flight_is_caught_within_50_seeds() {
    let caught = first_caught(Bug::AckFrozenWithInFlight, |v| matches!(v, Violation::FrozenWithInFlight { .. }));
    assert!(caught.is_some(), "a router acking Frozen with requests in flight was not caught within 50 seeds");
}

#[test]
fn planted_bug_act_before_persist_is_caught_within_50_seeds() {
    let caught = first_caught(Bug::ActBeforePersist, |v| matches!(v, Violation::ActedBeforePersisted { .. }));
    assert!(caught.is_some(), "a node acting before persisting was not caught within 50 seeds");
}

/// A state machine that counts an ack of an earlier epoch for the current one is caught when a
/// confused leader proposes such an ack: the simulator sees that the node never sent it.
#[test]
fn planted_bug_count_stale_ack_is_caught_within_50_seeds() {
    let caught = first_caught(Bug::CountStaleAck, |v| matches!(v, Violation::AckNeverSent { .. }));
    assert!(caught.is_some(), "a state machine counting stale acks was not caught within 50 seeds");
}

/// A router that restarts with a freeze on its disk and serves the old universe before it
/// learns the outcome mixes universes once the freeze committed without it.
#[test]
fn planted_bug_serve_old_after_frozen_restart_is_caught_within_50_seeds() {
    let caught = first_caught(Bug::ServeOldAfterFrozenRestart, |v| matches!(v, Violation::MixedUniverses { .. }));
    assert!(
        caught.is_some(),
        "a router serving the old universe after a frozen restart was not caught within 50 seeds"
    );
}

/// A node that forgets its persisted decision when the next upgrade starts serves the first
/// generation again after the cluster switched to the second.
#[test]
fn planted_bug_reset_persisted_on_new_upgrade_is_caught_within_50_seeds() {
    let config = SimConfig { bug: Some(Bug::ResetPersistedOnNewUpgrade), upgrades: 2, ..SimConfig::default() };
    let caught = (0..50)
        .map(|s| run_seed(&config, s))
        .find(|r| r.violations.iter().any(|v| matches!(v.violation, Violation::MixedUniverses { .. })));
    assert!(caught.is_some(), "a node forgetting its decision at the next upgrade was not caught within 50 seeds");
}

/// Upgrade after upgrade (`--upgrades 3`): every invariant holds across the chain, and the
/// final generation holds every acknowledged write (the end checks judge it), through two or
/// three switches. Most seeds switch all three; in some an upgrade rolls back under faults and
/// the next one retries from the same generation; in some routers join and are retired
/// between and during upgrades.
#[test]
fn upgrade_after_upgrade_keeps_every_invariant() {
    let config = SimConfig { upgrades: 3, ..SimConfig::default() };
    let reports = run(&config, 0..80);
    assert_clean(&reports);
    assert!(reports.iter().all(|r| r.upgrades_run == 3), "every seed runs three upgrades");
    let all = reports.iter().filter(|r| r.upgrades_switched == 3).count();
    assert!(all * 2 > reports.len(), "most seeds switch all three upgrades ({all} of {})", reports.len());
    let retried = reports.iter().filter(|r| r.upgrades_switched < 3 && r.upgrades_switched > 0).count();
    assert!(retried > 0, "some upgrade rolls back and a later one switches");
    // A rolled-back upgrade is abandoned by its data nodes (capture removed, copy given up),
    // and in half the retries the same running nodes copy afresh for the next.
    assert!(reports.iter().any(|r| r.abandoned > 0), "no data node abandoned a rolled-back upgrade");
    assert!(reports.iter().any(|r| r.routers_joined > 0), "a router joins in some seed");
    assert!(reports.iter().any(|r| r.routers_retired > 0), "a router is retired in some seed");
}

/// Hunt seeds of upgrade chains. 93 (`--upgrades 3`): a data node's report of its previous
/// pair's stores, delayed in the network, arrived after it registered for the next upgrade and
/// was taken for that one's; the gate passed on positions the new stores never reached.
/// Registrations and reports now name their upgrade. 34002054, 34011019, 34012377 (15,000-seed
/// hunt with `--upgrades 3`): a write a data node's fence kept out was told failed, and a copy
/// of it delivered late ran once the node had restarted (for the next upgrade) and unfenced:
/// the refusal lived only in memory. Such a write is now an unknown outcome (`NotAdmitted`).
/// 41002531: a data node kept running for the retry of a rolled-back upgrade heard of the
/// rollback 5 s late: its watches went to a replica answering with older views, which only a
/// frozen node used to leave; any node now leaves it.
#[test]
fn hunt_seeds_of_upgrade_chains_keep_every_invariant() {
    let config = SimConfig { upgrades: 3, ..SimConfig::default() };
    let reports = run(&config, [93, 34_002_054, 34_011_019, 34_012_377, 41_002_531]);
    assert_clean(&reports);
    // 47002062 (3 datacenters, 2 upgrades): a mirrored read answered by a new database a rogue
    // writer had changed arrived once the operator had replaced that database (the rollback's
    // redeploy); the checker took the difference for the transform's. It now remembers which
    // answers such a database gave (a checker's mistake, not the code's).
    let three = SimConfig { datacenters: 3, upgrades: 2, ..SimConfig::default() };
    assert_clean(&run(&three, [47_002_062]));
}

/// Hunt seed 40001811 (`--upgrades 2`): the first upgrade's commit reached the routers, which
/// acked `Switched`, so the upgrade was `Done`, before a data node had opened its new store to
/// clients (it had crashed on the freeze); the operator deployed the next upgrade, whose data
/// node took that store as its old one, still guarded: every write to the serving generation
/// was refused until the second upgrade, rolled back, left it serving. `Done` now needs every
/// data node's `Switched` too, sent once its new store is open.
#[test]
fn hunt_seed_done_waits_for_every_data_nodes_new_store_to_open() {
    let config = SimConfig { upgrades: 2, ..SimConfig::default() };
    let reports = run(&config, [40_001_811]);
    assert_clean(&reports);
}

#[test]
fn without_faults_every_upgrade_of_a_chain_switches() {
    let config = SimConfig { faults: FaultSet::NONE, upgrades: 4, ..SimConfig::default() };
    let reports = run(&config, 0..5);
    assert_clean(&reports);
    for r in &reports {
        assert_eq!((r.upgrades_run, r.upgrades_switched), (4, 4), "seed {}", r.seed);
        assert_eq!(r.aborted_epochs, 0, "seed {}", r.seed);
    }
}

#[test]
fn without_faults_every_seed_switches_quickly() {
    let config = SimConfig { faults: FaultSet::NONE, ..SimConfig::default() };
    let reports = run(&config, 0..10);
    assert_clean(&reports);
    for r in &reports {
        assert_eq!(r.outcome, SeedOutcome::Switched, "seed {}", r.seed);
        assert_eq!(r.aborted_epochs, 0);
        assert_eq!(r.failed_writes, 0, "seed {}: no write may fail without faults", r.seed);
        assert!(
            r.hold_ms.iter().all(|h| *h < 1_000),
            "seed {}: a fault-free switch held a request to hold_max",
            r.seed
        );
    }
}

fn scenario(s: Scenario, seeds: std::ops::Range<u64>) -> Vec<SeedReport> {
    let reports = run(&SimConfig { scenario: Some(s), ..SimConfig::default() }, seeds);
    assert_clean(&reports);
    for r in &reports {
        assert_ne!(r.outcome, SeedOutcome::Unfinished, "{s:?} seed {}", r.seed);
    }
    reports
}

#[test]
fn scenario_coordinator_leader_crashes_during_freezing() {
    let reports = scenario(Scenario::LeaderCrashDuringFreeze, 0..10);
    for r in &reports {
        assert!(
            r.fault_log.iter().any(|f| f.contains("Crash { target: Leader")),
            "seed {}: no crash fired: {:?}",
            r.seed,
            r.fault_log
        );
    }
    assert!(
        reports.iter().any(|r| r.outcome == SeedOutcome::Switched),
        "a new leader must be able to finish the switch"
    );
}

#[test]
fn scenario_router_partitioned_during_freezing() {
    let reports = scenario(Scenario::RouterPartitionedDuringFreeze, 0..10);
    for r in &reports {
        assert!(
            r.fault_log.iter().any(|f| f.contains("Isolate { target: Router")),
            "seed {}: {:?}",
            r.seed,
            r.fault_log
        );
    }
    // A router cut off while frozen fails closed: it answers 503 rather than guess.
    assert!(reports.iter().any(|r| r.failed_writes > 0), "no partitioned router ever failed a held request");
}

#[test]
fn scenario_data_node_crashes_mid_transform() {
    let reports = scenario(Scenario::DataNodeCrashMidTransform, 0..10);
    for r in &reports {
        assert!(r.copying_seen, "seed {}: the bulk copy was never observed running", r.seed);
        assert!(r.fault_log.iter().any(|f| f.contains("Crash { target: Data")), "seed {}: {:?}", r.seed, r.fault_log);
    }
    assert!(
        reports.iter().filter(|r| r.outcome == SeedOutcome::Switched).count() >= 8,
        "the copy must resume after the crash"
    );
}

/// Isolation: with the whole coordinator down for a minute outside any freeze, routers that
/// restart serve from their own disks, and clients see no failure at all.
#[test]
fn scenario_coordinators_down_while_syncing_fails_no_client_request() {
    let config = SimConfig { scenario: Some(Scenario::CoordinatorsDown), ..SimConfig::default() };
    let reports = scenario(Scenario::CoordinatorsDown, 0..3);
    for r in &reports {
        let all_down = format!("({} coordinator replicas down)", config.coordinators);
        let restarts =
            r.fault_log.iter().filter(|f| f.contains("restarted gracefully") && f.contains(&all_down)).count();
        assert_eq!(
            restarts, config.routers,
            "seed {}: every router restarts while the coordinator is down: {:?}",
            r.seed, r.fault_log
        );
        assert_eq!(r.failed_requests, 0, "seed {}: clients saw failures", r.seed);
        // Every router restarted on its own disk: none waited for the coordinator.
        assert!(r.startup_hold_ms.is_empty(), "seed {}: a router with its own disk waited for the coordinator", r.seed);
        assert_eq!(
            r.outcome,
            SeedOutcome::Switched,
            "seed {}: the upgrade goes on once the coordinator is back",
            r.seed
        );
    }
}

/// The seed's disaster struck and the rebuilt group accepted the recovery.
fn assert_recovered(r: &SeedReport) {
    assert!(r.fault_log.iter().any(|f| f.contains("Disaster")), "seed {}: {:?}", r.seed, r.fault_log);
    assert!(r.fault_log.iter().any(|f| f.contains("cluster recover: Accepted")), "seed {}: {:?}", r.seed, r.fault_log);
}

/// Disaster recovery: between two upgrades every coordinator replica loses its data; a group
/// started afresh recovers from the nodes' disks (the generation, the last epoch and its
/// outcome, the roster, versions and upgrade ids above the nodes'), and the second upgrade
/// switches through it. (Were versions or ids to start again, nodes would ignore the new group,
/// or the chain would wait forever for its next upgrade.)
#[test]
fn scenario_disaster_the_rebuilt_group_recovers_and_the_chain_goes_on() {
    let config = SimConfig { scenario: Some(Scenario::Disaster), upgrades: 2, ..SimConfig::default() };
    let reports = run(&config, 0..6);
    assert_clean(&reports);
    for r in &reports {
        assert_recovered(r);
        assert_eq!((r.upgrades_run, r.upgrades_switched), (2, 2), "seed {}: {:?}", r.seed, r.fault_log);
    }
    // Hunt seeds: a router whose last view was the recovering group's (naming no upgrade) kept
    // its registration and a report to send, so its deadline said "report now" while nothing
    // could be sent (the actor's assertion: "the core asks to be called again at now"). The
    // report's deadline and its sending now share one rule (`AgentCore::may_report`).
    let chain = SimConfig { scenario: Some(Scenario::Disaster), upgrades: 3, ..SimConfig::default() };
    assert_clean(&run(&chain, [48, 57]));
    let wide = SimConfig { routers: 5, datacenters: 3, ..config };
    assert_clean(&run(&wide, [20]));
}

/// The disaster in the middle of a switch: as a router freezes, as its ack leaves, or as it acts
/// on the commit. The rebuilt group learns the freeze's outcome from the disks: a commit that
/// one router's disk holds stands (both upgrades switch), and a freeze no disk saw decided is
/// aborted (the chain goes on from the old generation); no client sees both universes.
#[test]
fn scenario_disaster_during_freeze_learns_the_outcome_from_the_disks() {
    let config = SimConfig { scenario: Some(Scenario::DisasterDuringFreeze), upgrades: 2, ..SimConfig::default() };
    let reports = run(&config, 0..10);
    assert_clean(&reports);
    reports.iter().for_each(assert_recovered);
    let switched: Vec<u64> = reports.iter().map(|r| r.upgrades_switched).collect();
    assert!(switched.contains(&2), "a commit held by a disk stands: {switched:?}");
    assert!(switched.contains(&1), "a freeze no disk saw decided is aborted: {switched:?}");
    let wide = SimConfig { routers: 5, datacenters: 3, coordinators: 5, ..config };
    let reports = run(&wide, [64000000, 64000001, 64000002]);
    assert_clean(&reports);
    reports.iter().for_each(assert_recovered);
}

/// The disaster under the full fault mix. The seeds are the harness's own mistakes this scenario
/// showed first: a roster change fired while the rebuilt group recovered (refused, yet the
/// router was cut off or deployed: seeds 22, 97, 183), a crashed replica's long-poll watch
/// answering after the views were forgotten (8), an upgrade id given again because no node
/// remembered the lost one (134), and a join asked again across the disaster, taken by the
/// rebuilt group before `cluster recover` as the first join of a new cluster (61000041, 5
/// routers in 3 datacenters). From a 1,000-seed hunt: a replica restarted by its crash's timer
/// during the disaster ran beside the one the operator started (60000419), a wiped replica's
/// long poll answered after the views were forgotten (60000317), an epoch no node acted on
/// decided again by the rebuilt group (60000254), and a recovery waiting for the operator's word
/// on a freeze no disk could tell, which the simulated operator never gave (60000748, 60000962).
#[test]
fn scenario_disaster_under_faults_recovers_and_the_chain_goes_on() {
    let config = SimConfig { scenario: Some(Scenario::DisasterUnderFaults), upgrades: 2, ..SimConfig::default() };
    let hunt = [60000254, 60000317, 60000419, 60000748, 60000962];
    let reports = run(&config, (0..4).chain([8, 22, 97, 134, 183]).chain(hunt));
    assert_clean(&reports);
    reports.iter().for_each(assert_recovered);
    let wide = SimConfig { routers: 5, datacenters: 3, ..config };
    assert_clean(&run(&wide, [61000041]));
}

/// The disaster during a switch under the full fault mix. Seeds 124 and 179 lose the chain's
/// last upgrade: its freeze is aborted by the recovery (no disk saw it decided), the rebuilt
/// group knows the outcome but not the upgrade, and its data nodes waited for it with their
/// capture unapplied until the end ("captured but not applied"). The operator now starts it
/// again, and the run ends with that start's outcome.
#[test]
fn scenario_disaster_during_freeze_under_faults_starts_a_lost_last_upgrade_again() {
    let config =
        SimConfig { scenario: Some(Scenario::DisasterDuringFreezeUnderFaults), upgrades: 2, ..SimConfig::default() };
    // (In some seeds the trigger never fires: a drift's abort, say, leaves no switch to strike.)
    let reports = run(&config, (0..3).chain([124, 179]));
    assert_clean(&reports);
    for r in reports.iter().filter(|r| [124, 179].contains(&r.seed)) {
        assert_recovered(r);
        assert_eq!(r.upgrades_run, 3, "seed {}: the lost last upgrade is started again", r.seed);
    }
}

#[test]
fn scenario_commit_message_lost_to_one_router() {
    let reports = scenario(Scenario::CommitLostToRouter, 0..10);
    let lost = reports.iter().filter(|r| r.fault_log.iter().any(|f| f.contains("lost a commit view"))).count();
    assert!(lost >= 5, "the commit view was dropped in only {lost} of 10 seeds");
    for r in &reports {
        assert_eq!(r.outcome, SeedOutcome::Switched, "seed {}: the router must learn the commit later", r.seed);
    }
}

#[test]
fn five_coordinators_two_hundred_routers_three_datacenters() {
    let config = SimConfig { coordinators: 5, routers: 200, datacenters: 3, ..SimConfig::default() };
    let reports = run(&config, 0..2);
    assert_clean(&reports);
    for r in &reports {
        assert_ne!(r.outcome, SeedOutcome::Unfinished);
    }
}

/// The operator changes the roster under faults: a router joins (started with no disk, in
/// rotation once it serves), routers are retired normally (they ack, then serve nothing) and by
/// force (crashed and kept cut off first). Every invariant holds, including the roster's own
/// (no router serves clients off the roster), and each kind of change happens.
#[test]
fn routers_join_and_retire_under_faults() {
    use imago_sim::FaultKind;
    let kinds = [FaultKind::Roster, FaultKind::Crash, FaultKind::Loss, FaultKind::Partition, FaultKind::Delay];
    let config = SimConfig { faults: FaultSet::from_kinds(&kinds), ..SimConfig::default() };
    let reports = run(&config, 0..80);
    assert_clean(&reports);
    let count = |needle: &str| reports.iter().filter(|r| r.fault_log.iter().any(|f| f.contains(needle))).count();
    let joined = count("serves: in rotation");
    let retired = count("router retire router-");
    let forced = count("router retire --force router-");
    assert!(joined >= 3 && retired >= 3 && forced >= 3, "joined {joined}, retired {retired}, forced {forced}");
    for r in &reports {
        assert_ne!(r.outcome, SeedOutcome::Unfinished, "seed {}", r.seed);
    }
}

/// Hunt seeds of the 3-datacenter topology (see the two-hundred-seed test for 7000386). 14004767
/// (70,000-seed hunt at `825a617`): a freeze started after the faults healed was aborted at its
/// deadline with every ack missing, as if no node learned of it in 8 s; it passes since the
/// changes to watches (only a node's own news wakes it) and acks, which change the schedule.
/// 18016555 (100,000-seed hunt at `d55f48b`) showed the cause: a freeze proposed before a leader
/// change was committed by a later leader near its stamped deadline and aborted at once. A leader
/// now gives a freeze its whole timeout from when it first saw it.
#[test]
fn hunt_seeds_across_three_datacenters_keep_every_invariant() {
    let config = SimConfig { datacenters: 3, ..SimConfig::default() };
    let reports = run(&config, [7_000_386, 14_004_767, 18_016_555, 23_007_300]);
    assert_clean(&reports);
}

/// Hunt seeds of the smallest topology (one coordinator, one router, one data node).
/// 21005627: the coordinator's clock, jumped back past the start, stood still at 0 while a
/// freeze was stamped; the availability checker's clock spread missed that (the driver was
/// right).
#[test]
fn hunt_seeds_of_the_smallest_topology_keep_every_invariant() {
    let config = SimConfig { coordinators: 1, routers: 1, data_nodes: 1, ..SimConfig::default() };
    let reports = run(&config, [21_005_627]);
    assert_clean(&reports);
}

/// (23007300 above: a data node fenced and drained for e1 went straight to e2's freeze without
/// seeing e1's abort, ignored every later freeze, and each aborted for want of its `Drained`.)
///
/// Hunt seeds of the 5-coordinator, 7-router, 3-data-node topology. 17017428 (100,000-seed hunt
/// at `d55f48b`): a mirror delayed past the commit ran on a new universe that had taken client
/// writes and was compared as if at the freeze's position; data nodes now refuse mirrors once
/// the new universe serves clients.
#[test]
fn hunt_seeds_of_the_larger_topology_keep_every_invariant() {
    let config = SimConfig { coordinators: 5, routers: 7, data_nodes: 3, ..SimConfig::default() };
    let reports = run(&config, [17_017_428]);
    assert_clean(&reports);
}

/// A rogue writer changes rows of a new database behind the transform (the drift fault): no
/// client ever reads them, because validation (the operator aborts on its mismatches) or the
/// drain's comparison (the freeze is aborted on a checksum mismatch) keeps the switch from
/// happening until the difference is gone. Both ways are taken in these seeds.
#[test]
fn a_rogue_writer_is_stopped_by_validation_or_by_the_checksums() {
    let config = SimConfig { faults: FaultSet::from_kinds(&[imago_sim::FaultKind::Drift]), ..SimConfig::default() };
    let reports = run(&config, 0..120);
    assert_clean(&reports);
    let drifted: Vec<&SeedReport> =
        reports.iter().filter(|r| r.fault_log.iter().any(|f| f.contains("Drift"))).collect();
    assert!(drifted.len() > 15, "the rogue writer ran in only {} seeds", drifted.len());
    let with_reason =
        |needle: &str| drifted.iter().filter(|r| r.abort_reasons.iter().any(|a| a.contains(needle))).count();
    assert!(with_reason("checksum mismatch") > 0, "no freeze was aborted on a checksum mismatch");
    assert!(with_reason("validation found mismatches") > 0, "validation never stopped the upgrade");
    let others = reports.iter().filter(|r| !r.fault_log.iter().any(|f| f.contains("Drift")));
    assert!(others.clone().all(|r| r.abort_reasons.is_empty()), "aborts without a rogue writer or any other fault");
}
