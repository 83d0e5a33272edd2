//! Rules of the upgrade state machine (docs/design.md, "The upgrade lifecycle").

use super::*;
use protocol::messages::{Ack, GateBlocker, NodeReport, Phase};
use protocol::messages::{RejectKind, Rejection};
use protocol::{Decision, Position};

const EXAMPLE: &str = include_str!("../../../plans/example.toml");

fn plan(switch: &str, max_attempts: u32) -> Plan {
    let text = EXAMPLE
        .replace("switch = \"auto\"", &format!("switch = \"{switch}\""))
        .replace("max_attempts = 3", &format!("max_attempts = {max_attempts}"));
    Plan::from_toml("example.toml", &text).unwrap()
}

/// The example plan, written to upgrade from generation `g`.
fn plan_from(g: u64) -> Plan {
    let text = EXAMPLE
        .replace("old_generation = 1 ", &format!("old_generation = {g} "))
        .replace("http://127.0.0.1:9002", &format!("http://127.0.0.1:{}", 9001 + g));
    let plan = Plan::from_toml("example.toml", &text).unwrap();
    assert_eq!(plan.old_generation, Generation(g));
    plan
}

/// The first upgrade (most tests run only it).
const U1: UpgradeId = UpgradeId(1);

fn n(name: &str) -> NodeName {
    NodeName::from(name)
}

const ROUTERS: [&str; 2] = ["router-1", "router-2"];

fn accepted(state: &mut UpgradeState, command: Command) {
    let result = state.apply(&command);
    assert_eq!(result, Applied::Accepted, "{command:?}");
}

fn rejected(state: &mut UpgradeState, command: Command) -> Rejection {
    match state.apply(&command) {
        Applied::Rejected(rejection) => rejection,
        other => panic!("{command:?} was {other:?}, expected a rejection"),
    }
}

/// A state in Syncing with every node registered and a passing ready gate.
fn ready(switch: &str, max_attempts: u32) -> UpgradeState {
    let mut state = UpgradeState::default();
    assert_eq!(
        state.apply(&Command::Start { plan: Box::new(plan(switch, max_attempts)), token: "t1".into() }),
        Applied::Started(UpgradeId(1))
    );
    for r in ROUTERS {
        accepted(
            &mut state,
            Command::Register { node: n(r), duties: vec![Duty::Route, Duty::Validate], deployed: true, upgrade: U1 },
        );
    }
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Staged, "db-1 not yet registered");
    accepted(
        &mut state,
        Command::Register {
            node: n("db-1"),
            duties: vec![Duty::Capture, Duty::Transform, Duty::Validate],
            deployed: true,
            upgrade: U1,
        },
    );
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Syncing);
    let report = NodeReport {
        captured: Position(10),
        applied: Position(10),
        bulk_done: true,
        samples: 30,
        mismatches: 0,
        ..Default::default()
    };
    accepted(&mut state, Command::Report { node: n("router-1"), report: report.clone(), upgrade: U1 });
    accepted(&mut state, Command::Report { node: n("db-1"), report, upgrade: U1 });
    state
}

fn freeze(state: &mut UpgradeState, epoch: u64, now_ms: u64) {
    accepted(state, Command::Freeze { epoch: Epoch(epoch), now_ms, deadline_ms: now_ms + 3000 });
}

fn all_acks(state: &mut UpgradeState, epoch: u64) {
    for r in ROUTERS {
        accepted(state, Command::Ack { node: n(r), epoch: Epoch(epoch), ack: Ack::Frozen });
    }
    let drained = Ack::Drained { final_position: Position(10), checksum_match: true };
    accepted(state, Command::Ack { node: n("db-1"), epoch: Epoch(epoch), ack: drained });
}

#[test]
fn unknown_nodes_and_wrong_duties_are_refused() {
    let mut state = UpgradeState::default();
    state.apply(&Command::Start { plan: Box::new(plan("auto", 3)), token: "t1".into() });
    let reason = rejected(
        &mut state,
        Command::Register { node: n("intruder"), duties: vec![Duty::Route], deployed: true, upgrade: U1 },
    );
    assert!(reason.detail.contains("nor on the roster"), "{reason}");
    assert_eq!(reason.kind, RejectKind::UnknownNode);
    let reason = rejected(
        &mut state,
        Command::Register { node: n("router-1"), duties: vec![Duty::Transform], deployed: true, upgrade: U1 },
    );
    assert!(reason.detail.contains("duties"), "{reason}");
}

#[test]
fn a_second_upgrade_cannot_start_while_one_runs() {
    let mut state = ready("auto", 3);
    let reason = rejected(&mut state, Command::Start { plan: Box::new(plan("auto", 3)), token: "t2".into() });
    assert!(reason.detail.contains("still in progress"), "{reason}");
    assert_eq!(reason.kind, RejectKind::InProgress);
}

/// Regression (sim seed 18): a retried start whose first answer was lost arrived after the
/// upgrade had finished and started a second upgrade.
#[test]
fn start_is_idempotent_by_token_even_after_the_upgrade_ended() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    all_acks(&mut state, 1);
    for r in ROUTERS {
        accepted(&mut state, Command::Ack { node: n(r), epoch: Epoch(1), ack: Ack::Switched });
    }
    accepted(&mut state, Command::Ack { node: n("db-1"), epoch: Epoch(1), ack: Ack::Switched });
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Done);
    let retry = state.apply(&Command::Start { plan: Box::new(plan("auto", 3)), token: "t1".into() });
    assert_eq!(retry, Applied::Started(UpgradeId(1)));
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Done, "the retry changed nothing");
    let next = state.apply(&Command::Start { plan: Box::new(plan_from(2)), token: "t2".into() });
    assert_eq!(next, Applied::Started(UpgradeId(2)), "a new token starts the next upgrade");
}

#[test]
fn freeze_needs_the_ready_gate() {
    let mut state = ready("auto", 3);
    let lagging = NodeReport {
        captured: Position(500),
        applied: Position(10),
        bulk_done: false,
        samples: 0,
        mismatches: 0,
        ..Default::default()
    };
    accepted(&mut state, Command::Report { node: n("db-1"), report: lagging, upgrade: U1 });
    let reason = rejected(&mut state, Command::Freeze { epoch: Epoch(1), now_ms: 0, deadline_ms: 10 });
    assert!(reason.detail.contains("bulk copy not finished") && reason.detail.contains("lag 490"), "{reason}");
    assert_eq!(next_command(&state, 0, None), None, "the driver must not propose a freeze either");
}

#[test]
fn freeze_epoch_must_be_the_next_one() {
    let mut state = ready("auto", 3);
    let reason = rejected(&mut state, Command::Freeze { epoch: Epoch(2), now_ms: 0, deadline_ms: 10 });
    assert!(reason.detail.contains("not the next epoch"), "{reason}");
    assert_eq!(reason.kind, RejectKind::WrongEpoch);
    freeze(&mut state, 1, 0);
    assert_eq!(state.decision(), Decision::Freeze(Epoch(1)));
    let reason = rejected(&mut state, Command::Freeze { epoch: Epoch(2), now_ms: 0, deadline_ms: 10 });
    assert!(reason.detail.contains("Syncing"), "{reason}");
}

#[test]
fn commit_without_every_ack_is_rejected_even_when_a_leader_proposes_it() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    accepted(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Frozen });
    let missing = state.current.as_ref().unwrap().missing_acks();
    assert!(
        missing.iter().any(|m| m.contains("router-2 (frozen)")) && missing.iter().any(|m| m.contains("db-1 (drained)")),
        "{missing:?}"
    );
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Freezing);
    assert_eq!(state.decision(), Decision::Freeze(Epoch(1)), "undecided until every ack is in");
}

#[test]
fn an_ack_needs_its_phase_and_its_duty() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    let reason = rejected(&mut state, Command::Ack { node: n("db-1"), epoch: Epoch(1), ack: Ack::Frozen });
    assert_eq!(reason.kind, RejectKind::WrongDuties, "{reason}");
    let reason = rejected(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Switched });
    assert_eq!(reason.kind, RejectKind::WrongPhase, "{reason}");
    assert!(reason.detail.contains("Switched ack needs phase Switched"), "{reason}");
    let drained = Ack::Drained { final_position: Position(1), checksum_match: true };
    let reason = rejected(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: drained });
    assert_eq!(reason.kind, RejectKind::WrongDuties, "{reason}");
}

/// A data node may drain as soon as every router told it directly that it is frozen, before
/// their acks are applied: its `Drained` is recorded, and the commit still waits for them all.
#[test]
fn a_drained_ack_before_the_routers_acks_waits_for_them() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    let drained = Ack::Drained { final_position: Position(10), checksum_match: true };
    accepted(&mut state, Command::Ack { node: n("db-1"), epoch: Epoch(1), ack: drained });
    accepted(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Frozen });
    assert_eq!(phase(&state), Phase::Freezing, "router-2 has not acked");
    accepted(&mut state, Command::Ack { node: n("router-2"), epoch: Epoch(1), ack: Ack::Frozen });
    assert_eq!(phase(&state), Phase::Switched);
}

#[test]
fn commit_after_abort_is_rejected_and_vice_versa() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    accepted(&mut state, Command::Abort { epoch: Epoch(1), reason: "test".into(), now_ms: 5 });
    // The acks that would have committed it come too late.
    let late = rejected(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Frozen });
    assert_eq!(late.kind, RejectKind::WrongPhase);
    assert_eq!(state.decision(), Decision::Abort(Epoch(1)));

    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    all_acks(&mut state, 1);
    assert_eq!(state.decision(), Decision::Commit(Epoch(1)), "the last ack decides the commit");
    let reason = rejected(&mut state, Command::Abort { epoch: Epoch(1), reason: "late".into(), now_ms: 9 });
    assert!(reason.detail.contains("already decided"), "{reason}");
    let reason = rejected(&mut state, Command::OperatorAbort { reason: "oops".into(), now_ms: 9 });
    assert!(reason.detail.contains("cannot be undone"), "{reason}");
    assert_eq!(reason.kind, RejectKind::AlreadyEnded);
    assert_eq!(state.decision(), Decision::Commit(Epoch(1)));
}

#[test]
fn abort_returns_to_syncing_then_rolls_back_when_out_of_attempts() {
    let mut state = ready("auto", 2);
    freeze(&mut state, 1, 0);
    accepted(&mut state, Command::Abort { epoch: Epoch(1), reason: "deadline".into(), now_ms: 100 });
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Syncing);
    let reason = rejected(&mut state, Command::Freeze { epoch: Epoch(2), now_ms: 200, deadline_ms: 3000 });
    assert!(reason.detail.contains("backoff"), "{reason}");
    assert_eq!(reason.kind, RejectKind::Backoff);
    freeze(&mut state, 2, 1100);
    let stale = rejected(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Frozen });
    assert!(stale.detail.contains("current epoch is e2"), "{stale}");
    accepted(&mut state, Command::Abort { epoch: Epoch(2), reason: "deadline".into(), now_ms: 4200 });
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::RolledBack);
    assert_eq!(state.decision(), Decision::Abort(Epoch(2)));
    assert!(next_command(&state, 99_999, None).is_none());
}

/// Done once every router serves the new universe and every data node's new store is open
/// (hunt seed 40001811: a data node deployed for the next upgrade found its old store guarded).
#[test]
fn switch_completes_when_every_router_and_every_data_node_acks() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    all_acks(&mut state, 1);
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Switched, "committed by the last ack, no proposal");
    assert_eq!(next_command(&state, 10, None), None);
    accepted(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Switched });
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Switched);
    accepted(&mut state, Command::Ack { node: n("router-2"), epoch: Epoch(1), ack: Ack::Switched });
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Switched, "db-1's new store is not yet open");
    assert!(decision_view(&state, state.version, &n("router-1")).acked_switched);
    accepted(&mut state, Command::Ack { node: n("db-1"), epoch: Epoch(1), ack: Ack::Switched });
    assert!(decision_view(&state, state.version, &n("db-1")).acked_switched);
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Done);
}

/// Hunt seeds 14004767 and 18016555: a freeze proposed before a leader change was committed by
/// a later leader close to its stamped deadline, and aborted at once, before any node could ack.
/// A leader gives a freeze at least its timeout from when it first saw it.
#[test]
fn a_freeze_committed_late_gets_its_whole_timeout_from_when_the_leader_saw_it() {
    let mut state = ready("auto", 3);
    // Proposed at 1000 (deadline 4000), seen applied by the new leader only at 3900.
    freeze(&mut state, 1, 1000);
    assert_eq!(next_command(&state, 4000, Some(3900)), None, "not given up 100 ms after it was seen");
    assert_eq!(next_deadline_ms(&state, 4000, Some(3900)), Some(6900));
    assert!(matches!(next_command(&state, 6900, Some(3900)), Some(Command::Abort { .. })));
    // Seen in time, the stamped deadline holds.
    assert!(matches!(next_command(&state, 4000, Some(1000)), Some(Command::Abort { .. })));
}

#[test]
fn driver_aborts_after_the_deadline_naming_missing_acks() {
    let mut state = ready("auto", 3);
    match next_command(&state, 1000, None) {
        Some(Command::Freeze { epoch, deadline_ms, .. }) => {
            assert_eq!(epoch, Epoch(1));
            assert_eq!(deadline_ms, 4000);
        }
        other => panic!("expected a freeze, got {other:?}"),
    }
    freeze(&mut state, 1, 1000);
    accepted(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Frozen });
    assert_eq!(next_command(&state, 3999, None), None);
    match next_command(&state, 4000, None) {
        Some(Command::Abort { epoch, reason, .. }) => {
            assert_eq!(epoch, Epoch(1));
            assert!(reason.contains("router-2 (frozen)") && !reason.contains("router-1"), "{reason}");
        }
        other => panic!("expected an abort, got {other:?}"),
    }
}

/// Freezing at e1 with every router frozen and db-1 drained with different checksums.
fn drained_with_a_mismatch() -> UpgradeState {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    for r in ROUTERS {
        accepted(&mut state, Command::Ack { node: n(r), epoch: Epoch(1), ack: Ack::Frozen });
    }
    let bad = Ack::Drained { final_position: Position(10), checksum_match: false };
    accepted(&mut state, Command::Ack { node: n("db-1"), epoch: Epoch(1), ack: bad });
    state
}

#[test]
fn checksum_mismatch_blocks_commit_and_drives_abort() {
    let state = drained_with_a_mismatch();
    assert!(state.current.as_ref().unwrap().missing_acks().is_empty(), "every ack is in");
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Freezing, "a mismatch keeps the epoch undecided");
    assert!(matches!(next_command(&state, 1, None), Some(Command::Abort { .. })));
}

#[test]
fn manual_switch_waits_for_the_operator() {
    let mut state = ready("manual", 3);
    assert_eq!(next_command(&state, 0, None), None);
    let reason = rejected(&mut state, Command::Freeze { epoch: Epoch(1), now_ms: 0, deadline_ms: 10 });
    assert!(reason.detail.contains("operator"), "{reason}");
    accepted(&mut state, Command::RequestSwitch);
    assert!(matches!(next_command(&state, 0, None), Some(Command::Freeze { .. })));
}

#[test]
fn operator_abort_during_freeze_rolls_back() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    accepted(&mut state, Command::OperatorAbort { reason: "stop".into(), now_ms: 1 });
    let upgrade = state.current.as_ref().unwrap();
    assert_eq!(upgrade.phase, Phase::RolledBack);
    assert_eq!(upgrade.last_abort_reason.as_deref(), Some("operator: stop"));
    assert_eq!(state.decision(), Decision::Abort(Epoch(1)));
}

fn report(captured: u64, applied: u64, samples: u64, mismatches: u64) -> NodeReport {
    NodeReport {
        captured: Position(captured),
        applied: Position(applied),
        bulk_done: true,
        samples,
        mismatches,
        ..Default::default()
    }
}

/// The gate of `ready` with these reports from db-1 and router-1 (router-2 reports nothing),
/// under a plan allowing `mismatch_ratio_max`.
fn gate_with(mismatch_ratio_max: &str, db: NodeReport, router: NodeReport) -> Result<(), Vec<GateBlocker>> {
    let mut state = ready("auto", 3);
    if let Some(u) = state.current.as_mut() {
        let text = EXAMPLE.replace("mismatch_ratio_max = 0.0", &format!("mismatch_ratio_max = {mismatch_ratio_max}"));
        u.plan = Plan::from_toml("example.toml", &text).unwrap();
    }
    accepted(&mut state, Command::Report { node: n("db-1"), report: db, upgrade: U1 });
    accepted(&mut state, Command::Report { node: n("router-1"), report: router, upgrade: U1 });
    ready_gate(state.current.as_ref().unwrap())
}

#[test]
fn the_gate_takes_lag_up_to_lag_max_and_samples_from_samples_min() {
    // lag_max = 50, samples_min = 20 (summed over every validator).
    assert_eq!(gate_with("0.0", report(60, 10, 0, 0), report(0, 0, 20, 0)), Ok(()));
    let lag = gate_with("0.0", report(61, 10, 0, 0), report(0, 0, 20, 0)).unwrap_err();
    assert!(matches!(&lag[..], [GateBlocker::Lag { lag: 51, .. }]), "{lag:?}");
    let few = gate_with("0.0", report(10, 10, 9, 0), report(0, 0, 10, 0)).unwrap_err();
    assert!(matches!(&few[..], [GateBlocker::TooFewSamples { samples: 19, .. }]), "{few:?}");
}

/// `lag_ms_max` (optional) bounds how long the oldest change not yet applied has waited, the
/// same unit on every store.
#[test]
fn the_gate_takes_lag_in_time_up_to_lag_ms_max_when_the_plan_sets_it() {
    let mut state = ready("auto", 3);
    let waiting =
        |lag_ms| NodeReport { pace: protocol::messages::Pace { lag_ms, ..Default::default() }, ..report(10, 10, 0, 0) };
    accepted(&mut state, Command::Report { node: n("db-1"), report: waiting(90_000), upgrade: U1 });
    accepted(&mut state, Command::Report { node: n("router-1"), report: report(0, 0, 20, 0), upgrade: U1 });
    assert_eq!(ready_gate(state.current.as_ref().unwrap()), Ok(()), "not checked without lag_ms_max");
    if let Some(u) = state.current.as_mut() {
        let text = EXAMPLE.replace("lag_max = 50", "lag_max = 50\nlag_ms_max = 2000");
        u.plan = Plan::from_toml("example.toml", &text).unwrap();
        assert_eq!(u.plan.thresholds.lag_ms_max, Some(2_000));
    }
    let blocked = ready_gate(state.current.as_ref().unwrap()).unwrap_err();
    assert!(matches!(&blocked[..], [GateBlocker::LagMs { lag_ms: 90_000, lag_ms_max: 2_000, .. }]), "{blocked:?}");
    assert_eq!(blocked[0].to_string(), "db-1: lag of 90000 ms > lag_ms_max 2000");
    accepted(&mut state, Command::Report { node: n("db-1"), report: waiting(2_000), upgrade: U1 });
    assert_eq!(ready_gate(state.current.as_ref().unwrap()), Ok(()), "up to lag_ms_max");
}

/// A data node whose rows are compared by range holds the gate until it has compared every
/// range once, and while any range differs; a node whose plan compares at the drain only does
/// not.
#[test]
fn the_gate_waits_for_every_key_range_compared_once_and_none_differing() {
    use protocol::messages::RangeCheck;
    let with = |ranges| NodeReport { bulk_done: true, ranges, ..report(10, 10, 0, 0) };
    let validator = report(0, 0, 20, 0);
    let first_round = RangeCheck { by_range: true, ranges: 9, attempted: 7, clean: 7, ..Default::default() };
    let blocked = gate_with("0.0", with(first_round.clone()), validator.clone()).unwrap_err();
    assert!(matches!(&blocked[..], [GateBlocker::DataComparing { attempted: 7, ranges: 9, .. }]), "{blocked:?}");
    assert_eq!(blocked[0].to_string(), "db-1: data compared in 7 of 9 key ranges");
    let differs = RangeCheck { attempted: 9, differed: 2, ..first_round.clone() };
    let blocked = gate_with("0.0", with(differs), validator.clone()).unwrap_err();
    assert!(matches!(&blocked[..], [GateBlocker::DataDiffers { ranges: 2, .. }]), "{blocked:?}");
    assert_eq!(blocked[0].to_string(), "db-1: transform(old) and new differ in 2 key ranges");
    // Compared once each, some changed since (the drain compares those): ready.
    let done = RangeCheck { attempted: 9, clean: 4, ..first_round.clone() };
    assert_eq!(gate_with("0.0", with(done), validator.clone()), Ok(()));
    let at_the_drain_only = RangeCheck { by_range: false, ..first_round };
    assert_eq!(gate_with("0.0", with(at_the_drain_only), validator), Ok(()));
}

#[test]
fn the_gate_sums_every_validators_mismatches_against_the_ratio() {
    // 10 mismatches in 100 samples is exactly 10 %: allowed; 11 is not.
    assert_eq!(gate_with("0.1", report(10, 10, 50, 5), report(0, 0, 50, 5)), Ok(()));
    let over = gate_with("0.1", report(10, 10, 50, 5), report(0, 0, 50, 6)).unwrap_err();
    assert!(matches!(&over[..], [GateBlocker::MismatchRatio { .. }]), "{over:?}");
    let one = gate_with("0.0", report(10, 10, 0, 0), report(0, 0, 40, 1)).unwrap_err();
    assert!(
        matches!(&one[..], [GateBlocker::MismatchRatio { ratio, .. }] if *ratio == 1.0 / 40.0),
        "one mismatch is too many at 0.0, and the ratio shown is 1/40: {one:?}"
    );
}

#[test]
fn mismatches_reported_without_samples_block_the_gate() {
    let mut state = ready("auto", 3);
    if let Some(u) = state.current.as_mut() {
        let text = EXAMPLE.replace("samples_min = 20", "samples_min = 0");
        u.plan = Plan::from_toml("example.toml", &text).unwrap();
    }
    accepted(&mut state, Command::Report { node: n("db-1"), report: report(10, 10, 0, 0), upgrade: U1 });
    accepted(&mut state, Command::Report { node: n("router-1"), report: report(0, 0, 0, 0), upgrade: U1 });
    assert_eq!(ready_gate(state.current.as_ref().unwrap()), Ok(()), "no samples and none needed");
    accepted(&mut state, Command::Report { node: n("router-1"), report: report(0, 0, 0, 2), upgrade: U1 });
    let blocked = ready_gate(state.current.as_ref().unwrap()).unwrap_err();
    assert!(matches!(&blocked[..], [GateBlocker::MismatchRatio { ratio, .. }] if ratio.is_infinite()), "{blocked:?}");
}

#[test]
fn the_version_moves_with_every_accepted_change_and_with_nothing_else() {
    let mut state = ready("auto", 3);
    let v = state.version;
    accepted(&mut state, Command::Report { node: n("db-1"), report: report(11, 11, 30, 0), upgrade: U1 });
    assert_eq!(state.version, v, "reports are not watched");
    rejected(&mut state, Command::Abort { epoch: Epoch(1), reason: "nothing frozen".into(), now_ms: 0 });
    assert_eq!(state.version, v, "a refusal changes nothing");
    freeze(&mut state, 1, 0);
    assert_eq!(state.version, v + 1, "watchers wait for a newer version to see the freeze");
}

#[test]
fn an_ended_upgrade_takes_no_more_node_commands() {
    let mut state = ready("auto", 3);
    accepted(&mut state, Command::OperatorAbort { reason: "stop".into(), now_ms: 1 });
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::RolledBack);
    let register = Command::Register {
        node: n("router-1"),
        duties: vec![Duty::Route, Duty::Validate],
        deployed: true,
        upgrade: U1,
    };
    assert_eq!(rejected(&mut state, register).kind, RejectKind::NoUpgrade);
    let report = Command::Report { node: n("db-1"), report: report(1, 1, 1, 0), upgrade: U1 };
    assert_eq!(rejected(&mut state, report).kind, RejectKind::NoUpgrade);
}

#[test]
fn a_retry_waits_out_the_whole_backoff_and_not_longer() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    accepted(&mut state, Command::Abort { epoch: Epoch(1), reason: "deadline".into(), now_ms: 100 });
    // retry_backoff_ms = 1000: the next freeze may come at 1100.
    assert_eq!(next_deadline_ms(&state, 500, None), Some(1100), "the driver wakes at the end of the backoff");
    assert_eq!(next_deadline_ms(&state, 1100, None), None);
    assert_eq!(next_command(&state, 1099, None), None);
    let early = rejected(&mut state, Command::Freeze { epoch: Epoch(2), now_ms: 1099, deadline_ms: 4099 });
    assert_eq!(early.kind, RejectKind::Backoff);
    assert!(matches!(next_command(&state, 1100, None), Some(Command::Freeze { epoch: Epoch(2), .. })));
    freeze(&mut state, 2, 1100);
    assert_eq!(next_deadline_ms(&state, 1200, None), Some(4100), "the driver wakes at the freeze deadline");
    assert_eq!(next_deadline_ms(&state, 4100, None), None);
}

#[test]
fn the_next_epochs_outcome_cannot_be_decided_while_this_one_is_frozen() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    accepted(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Frozen });
    let abort = Command::Abort { epoch: Epoch(2), reason: "confused".into(), now_ms: 1 };
    assert_eq!(rejected(&mut state, abort).kind, RejectKind::WrongPhase);
    assert!(state.outcomes.is_empty());
}

#[test]
fn syncing_needs_every_node_registered_with_its_version_deployed() {
    let mut state = UpgradeState::default();
    state.apply(&Command::Start { plan: Box::new(plan("auto", 3)), token: "t1".into() });
    for r in ROUTERS {
        accepted(
            &mut state,
            Command::Register { node: n(r), duties: vec![Duty::Route, Duty::Validate], deployed: true, upgrade: U1 },
        );
    }
    let db = |deployed| Command::Register {
        node: n("db-1"),
        duties: vec![Duty::Capture, Duty::Transform, Duty::Validate],
        deployed,
        upgrade: U1,
    };
    accepted(&mut state, db(false));
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Staged, "db-1's new version is not deployed");
    accepted(&mut state, db(true));
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Syncing);
}

#[test]
fn a_checksum_mismatch_of_an_aborted_freeze_does_not_count_for_the_next() {
    let mut state = drained_with_a_mismatch();
    assert!(state.current.as_ref().unwrap().checksum_mismatch().is_some());
    accepted(&mut state, Command::Abort { epoch: Epoch(1), reason: "checksum mismatch".into(), now_ms: 10 });
    freeze(&mut state, 2, 2000);
    assert_eq!(state.current.as_ref().unwrap().checksum_mismatch(), None, "e1's mismatch is not e2's");
    assert_eq!(next_command(&state, 2001, None), None, "nothing to abort: e2 waits for its acks");
    all_acks(&mut state, 2);
    assert_eq!(state.decision(), Decision::Commit(Epoch(2)));
}

/// The state machine fails loudly on a state that breaks its invariants (a damaged snapshot, a
/// bug elsewhere) rather than deciding on it.
#[test]
#[should_panic(expected = "without a committed outcome")]
fn a_damaged_state_is_caught_at_the_next_command() {
    let mut state = ready("auto", 3);
    state.current.as_mut().unwrap().phase = Phase::Switched;
    state.apply(&Command::Report { node: n("db-1"), report: report(1, 1, 1, 0), upgrade: U1 });
}

#[test]
#[should_panic(expected = "outside Freezing/Switched")]
fn no_decision_is_made_up_for_an_epoch_that_was_never_decided() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    state.current.as_mut().unwrap().phase = Phase::Syncing;
    state.decision();
}

#[test]
fn views_tell_each_node_its_acks() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    accepted(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Frozen });
    let v1 = decision_view(&state, 42, &n("router-1"));
    assert_eq!(v1.version, 42);
    assert!(v1.acked_frozen && v1.known && v1.registered && !v1.all_routers_frozen);
    let v2 = decision_view(&state, 42, &n("router-2"));
    assert!(!v2.acked_frozen);
    assert!(!decision_view(&state, 42, &n("nobody")).known);
    let s = status(&state);
    assert_eq!(s.phase, Some(Phase::Freezing));
    assert_eq!(s.nodes.len(), 3);
    accepted(&mut state, Command::Ack { node: n("router-2"), epoch: Epoch(1), ack: Ack::Frozen });
    let db = |state: &UpgradeState| decision_view(state, 43, &n("db-1"));
    assert!(db(&state).all_routers_frozen && !db(&state).acked_drained);
    let drained = Ack::Drained { final_position: Position(10), checksum_match: true };
    accepted(&mut state, Command::Ack { node: n("db-1"), epoch: Epoch(1), ack: drained });
    assert!(db(&state).acked_drained && !db(&state).all_routers_frozen, "the last ack committed: the freeze is over");
    assert!(!decision_view(&state, 44, &n("router-1")).acked_switched);
    accepted(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Switched });
    assert!(decision_view(&state, 45, &n("router-1")).acked_switched);
    assert!(!decision_view(&state, 45, &n("router-2")).acked_switched);
}

#[test]
fn a_view_before_any_freeze_owes_and_shows_no_ack() {
    let state = ready("auto", 3);
    let v = decision_view(&state, 1, &n("db-1"));
    assert_eq!(v.decision, Decision::Initial);
    assert!(!v.acked_frozen && !v.acked_drained && !v.acked_switched);
}

mod properties {
    //! Random command sequences (any order, stale epochs, unknown nodes, proposals a confused
    //! leader might make) never break the safety rules.

    use super::*;
    use proptest::prelude::*;

    const NODES: [&str; 5] = ["router-1", "router-2", "db-1", "intruder", "router-3"];

    fn command() -> impl Strategy<Value = Command> {
        let node = (0..NODES.len()).prop_map(|i| n(NODES[i]));
        let epoch = (0u64..4).prop_map(Epoch);
        let ack = prop_oneof![
            Just(Ack::Frozen),
            Just(Ack::Switched),
            Just(Ack::Retired),
            (0u64..20, any::<bool>())
                .prop_map(|(p, m)| Ack::Drained { final_position: Position(p), checksum_match: m }),
        ];
        let duties = prop_oneof![
            Just(vec![Duty::Route, Duty::Validate]),
            Just(vec![Duty::Capture, Duty::Transform, Duty::Validate]),
            Just(vec![Duty::Route]),
        ];
        let report = (0u64..200, 0u64..200, any::<bool>(), 0u64..40, 0u64..2).prop_map(
            |(c, a, bulk_done, samples, mismatches)| NodeReport {
                captured: Position(c),
                applied: Position(a),
                bulk_done,
                samples,
                mismatches,
                ..Default::default()
            },
        );
        prop_oneof![
            (node.clone(), duties, any::<bool>(), 1u64..=2).prop_map(|(node, duties, deployed, u)| Command::Register {
                node,
                duties,
                deployed,
                upgrade: UpgradeId(u)
            }),
            (node.clone(), report, 1u64..=2).prop_map(|(node, report, u)| Command::Report {
                node,
                report,
                upgrade: UpgradeId(u)
            }),
            Just(Command::RequestSwitch),
            (epoch.clone(), 0u64..10_000, 0u64..10_000).prop_map(|(epoch, now_ms, d)| Command::Freeze {
                epoch,
                now_ms,
                deadline_ms: now_ms + d
            }),
            (node.clone(), epoch.clone(), ack).prop_map(|(node, epoch, ack)| Command::Ack { node, epoch, ack }),
            (epoch, 0u64..10_000).prop_map(|(epoch, now_ms)| Command::Abort { epoch, reason: "random".into(), now_ms }),
            (0u64..10_000).prop_map(|now_ms| Command::OperatorAbort { reason: "random".into(), now_ms }),
            node.clone().prop_map(|node| Command::Join { node }),
            (1u64..=3, 0u8..3)
                .prop_map(|(g, t)| Command::Start { plan: Box::new(plan_from(g)), token: format!("t{t}") }),
            (node, any::<bool>()).prop_map(|(node, force)| Command::Retire { node, force }),
        ]
    }

    /// The happy path to a freeze; a random-length prefix of it starts most cases deep enough
    /// that freezes, commits and aborts are explored.
    fn happy_path() -> Vec<Command> {
        let good = NodeReport {
            captured: Position(10),
            applied: Position(10),
            bulk_done: true,
            samples: 30,
            mismatches: 0,
            ..Default::default()
        };
        let mut path = Vec::new();
        for r in ROUTERS {
            path.push(Command::Register {
                node: n(r),
                duties: vec![Duty::Route, Duty::Validate],
                deployed: true,
                upgrade: U1,
            });
        }
        path.push(Command::Register {
            node: n("db-1"),
            duties: vec![Duty::Capture, Duty::Transform, Duty::Validate],
            deployed: true,
            upgrade: U1,
        });
        path.push(Command::Report { node: n("router-1"), report: good.clone(), upgrade: U1 });
        path.push(Command::Report { node: n("db-1"), report: good, upgrade: U1 });
        path.push(Command::RequestSwitch);
        path.push(Command::Freeze { epoch: Epoch(1), now_ms: 0, deadline_ms: 3_000 });
        path.push(Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Frozen });
        path.push(Command::Ack { node: n("router-2"), epoch: Epoch(1), ack: Ack::Frozen });
        path
    }

    static REACHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        #[test]
        fn random_commands_keep_the_safety_rules(
            manual in any::<bool>(),
            prefix in 0usize..=11,
            random in proptest::collection::vec(command(), 1..80),
        ) {
            let mut state = UpgradeState::default();
            let started = state.apply(&Command::Start { plan: Box::new(plan(if manual { "manual" } else { "auto" }, 3)), token: "t".into() });
            prop_assert_eq!(started, Applied::Started(UpgradeId(1)));
            let commands: Vec<Command> = happy_path().into_iter().take(prefix).chain(random).collect();
            for command in &commands {
                let before = state.clone();
                let decision_before = before.decision();
                let (held, base) = before.decision_and_base();
                let serving_before = held.serving_generation(base);
                let result = state.apply(command);
                if matches!(result, Applied::Rejected(_)) {
                    let mut unchanged = before.clone();
                    unchanged.version = state.version;
                    prop_assert_eq!(&state, &unchanged, "a rejected command changed the state: {:?}", command);
                }
                // Epochs only grow; a decided outcome never changes or disappears.
                prop_assert!(state.last_epoch >= before.last_epoch);
                for (epoch, outcome) in &before.outcomes {
                    prop_assert_eq!(state.outcomes.get(epoch), Some(outcome));
                }
                // What nodes watch only moves forward.
                prop_assert!(state.decision().order_key() >= decision_before.order_key(), "{:?} -> {:?} after {:?}", decision_before, state.decision(), command);
                // An epoch is committed only with every ack in place and no checksum mismatch.
                let newly_committed = state.outcomes.iter().find(|(e, o)| **o == Outcome::Committed && !before.outcomes.contains_key(e));
                if let Some((epoch, _)) = newly_committed {
                    let u = state.current.as_ref().unwrap();
                    prop_assert!(u.missing_acks().is_empty() && u.checksum_mismatch().is_none());
                    prop_assert_eq!(u.epoch, *epoch);
                    // Every router still on the roster (it may serve) acked this freeze.
                    for (router, status) in &state.roster {
                        if matches!(status, RosterStatus::Active | RosterStatus::Retiring) {
                            prop_assert_eq!(u.nodes.get(router).and_then(|s| s.frozen), Some(*epoch), "{} on the roster", router);
                        }
                    }
                    prop_assert!(
                        matches!(command, Command::Ack { .. } | Command::Retire { force: true, .. }),
                        "committed by {:?}", command
                    );
                }
                let u = state.current.as_ref().unwrap();
                if matches!(u.phase, Phase::Switched | Phase::Done) {
                    prop_assert_eq!(state.outcomes.get(&u.epoch), Some(&Outcome::Committed));
                }
                // Each commit makes exactly one generation; what a decision serves never goes back.
                let commits = state.outcomes.values().filter(|o| **o == Outcome::Committed).count() as u64;
                prop_assert_eq!(commits + 1, state.generation.0);
                let (now, base) = state.decision_and_base();
                if let (Some(before), Some(after)) = (serving_before, now.serving_generation(base)) {
                    prop_assert!(after >= before, "served {} then {} after {:?}", before, after, command);
                }
            }
            if !state.outcomes.is_empty() {
                REACHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn the_random_commands_reach_decisions() {
        // Run the property, then check it explored decided epochs (commits and aborts).
        random_commands_keep_the_safety_rules();
        let reached = REACHED.load(std::sync::atomic::Ordering::Relaxed);
        assert!(reached > 100, "only {reached} of 1024 cases decided an epoch");
    }
}

fn phase(state: &UpgradeState) -> Phase {
    state.current.as_ref().unwrap().phase
}

fn register_router(state: &mut UpgradeState, name: &str) {
    accepted(
        state,
        Command::Register { node: n(name), duties: vec![Duty::Route, Duty::Validate], deployed: true, upgrade: U1 },
    );
}

#[test]
fn a_router_that_joins_while_syncing_is_needed_by_the_next_freeze_and_the_switch() {
    let mut state = ready("auto", 3);
    accepted(&mut state, Command::Join { node: n("router-3") });
    assert_eq!(state.roster.get(&n("router-3")), Some(&RosterStatus::Active));
    register_router(&mut state, "router-3");
    freeze(&mut state, 1, 100);
    let reason = rejected(&mut state, Command::Join { node: n("router-4") });
    assert_eq!(reason.kind, RejectKind::WrongPhase, "no join during a freeze: {reason}");
    for r in ROUTERS {
        accepted(&mut state, Command::Ack { node: n(r), epoch: Epoch(1), ack: Ack::Frozen });
    }
    assert!(!state.current.as_ref().unwrap().all_routers_frozen(), "router-3 has not acked Frozen");
    assert!(state.current.as_ref().unwrap().missing_acks().iter().any(|m| m.contains("router-3")));
    accepted(&mut state, Command::Ack { node: n("router-3"), epoch: Epoch(1), ack: Ack::Frozen });
    let drained = Ack::Drained { final_position: Position(10), checksum_match: true };
    accepted(&mut state, Command::Ack { node: n("db-1"), epoch: Epoch(1), ack: drained });
    assert_eq!(phase(&state), Phase::Switched);
    for r in ROUTERS {
        accepted(&mut state, Command::Ack { node: n(r), epoch: Epoch(1), ack: Ack::Switched });
    }
    assert_eq!(phase(&state), Phase::Switched, "router-3 has not switched");
    accepted(&mut state, Command::Ack { node: n("router-3"), epoch: Epoch(1), ack: Ack::Switched });
    accepted(&mut state, Command::Ack { node: n("db-1"), epoch: Epoch(1), ack: Ack::Switched });
    assert_eq!(phase(&state), Phase::Done);
}

#[test]
fn a_retiring_router_is_needed_until_it_acks_and_is_refused_after() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 100);
    accepted(&mut state, Command::Retire { node: n("router-2"), force: false });
    assert_eq!(state.roster.get(&n("router-2")), Some(&RosterStatus::Retiring));
    let reason = rejected(&mut state, Command::Ack { node: n("router-2"), epoch: Epoch(1), ack: Ack::Frozen });
    assert_eq!(reason.kind, RejectKind::Retired, "{reason}");
    accepted(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Frozen });
    assert!(!state.current.as_ref().unwrap().all_routers_frozen(), "a retiring router still serves until it acks");
    accepted(&mut state, Command::Ack { node: n("router-2"), epoch: Epoch(0), ack: Ack::Retired });
    assert_eq!(state.roster.get(&n("router-2")), Some(&RosterStatus::Retired));
    assert!(state.current.as_ref().unwrap().all_routers_frozen(), "a retired router is not needed");
    let drained = Ack::Drained { final_position: Position(10), checksum_match: true };
    accepted(&mut state, Command::Ack { node: n("db-1"), epoch: Epoch(1), ack: drained });
    assert_eq!(phase(&state), Phase::Switched);
    accepted(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Switched });
    accepted(&mut state, Command::Ack { node: n("db-1"), epoch: Epoch(1), ack: Ack::Switched });
    assert_eq!(phase(&state), Phase::Done, "a retired router does not block Done");
    let reason = rejected(&mut state, Command::Join { node: n("router-2") });
    assert_eq!(reason.kind, RejectKind::Retired, "{reason}");
    let view = decision_view(&state, state.version, &n("router-2"));
    assert_eq!(view.roster, RosterStatus::Retired);
    assert!(!view.known);
}

#[test]
fn a_forced_retire_unblocks_a_stuck_switch_at_once() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 100);
    accepted(&mut state, Command::Ack { node: n("router-1"), epoch: Epoch(1), ack: Ack::Frozen });
    assert!(!state.current.as_ref().unwrap().all_routers_frozen(), "router-2 is dead and never acks");
    accepted(&mut state, Command::Retire { node: n("router-2"), force: true });
    let drained = Ack::Drained { final_position: Position(10), checksum_match: true };
    accepted(&mut state, Command::Ack { node: n("db-1"), epoch: Epoch(1), ack: drained });
    assert_eq!(phase(&state), Phase::Switched);
    let reason = rejected(
        &mut state,
        Command::Register { node: n("router-2"), duties: vec![Duty::Route], deployed: true, upgrade: U1 },
    );
    assert_eq!(reason.kind, RejectKind::Retired, "a retired router that comes back is refused: {reason}");
    let reason = rejected(&mut state, Command::Retire { node: n("router-9"), force: true });
    assert_eq!(reason.kind, RejectKind::UnknownNode, "{reason}");
}

#[test]
fn a_plan_cannot_leave_out_a_roster_router_nor_name_a_retired_one() {
    let mut state = UpgradeState::with_roster([n("router-1"), n("router-2"), n("router-0")]);
    assert_eq!(
        state.apply(&Command::Start { plan: Box::new(plan("auto", 3)), token: "t1".into() }),
        Applied::Started(UpgradeId(1))
    );
    let u = state.current.as_ref().unwrap();
    assert!(u.routers.contains(&n("router-0")), "needed though the plan does not name it");
    assert!(u.missing_acks().is_empty() || u.phase != Phase::Freezing);
    for r in ROUTERS {
        register_router(&mut state, r);
    }
    accepted(
        &mut state,
        Command::Register {
            node: n("db-1"),
            duties: vec![Duty::Capture, Duty::Transform, Duty::Validate],
            deployed: true,
            upgrade: U1,
        },
    );
    assert_eq!(phase(&state), Phase::Staged, "router-0 has not registered");
    register_router(&mut state, "router-0");
    assert_eq!(phase(&state), Phase::Syncing);

    let mut state = UpgradeState::with_roster([n("router-1"), n("router-2")]);
    accepted(&mut state, Command::Retire { node: n("router-2"), force: true });
    let reason = rejected(&mut state, Command::Start { plan: Box::new(plan("auto", 3)), token: "t1".into() });
    assert_eq!(reason.kind, RejectKind::Retired, "{reason}");
    assert!(state.current.is_none());
}

fn switch_and_finish(state: &mut UpgradeState, epoch: u64) {
    let at = state.current.as_ref().unwrap().retry_not_before_ms;
    freeze(state, epoch, at);
    all_acks(state, epoch);
    for r in ROUTERS {
        accepted(state, Command::Ack { node: n(r), epoch: Epoch(epoch), ack: Ack::Switched });
    }
    accepted(state, Command::Ack { node: n("db-1"), epoch: Epoch(epoch), ack: Ack::Switched });
    assert_eq!(phase(state), Phase::Done);
}

/// Registers every node of the example plan and makes the gate pass (a started upgrade).
fn make_ready(state: &mut UpgradeState) {
    let upgrade = state.current.as_ref().expect("started").id;
    for r in ROUTERS {
        accepted(
            state,
            Command::Register { node: n(r), duties: vec![Duty::Route, Duty::Validate], deployed: true, upgrade },
        );
    }
    let db = Command::Register {
        node: n("db-1"),
        duties: vec![Duty::Capture, Duty::Transform, Duty::Validate],
        deployed: true,
        upgrade,
    };
    accepted(state, db);
    let report = NodeReport {
        captured: Position(10),
        applied: Position(10),
        bulk_done: true,
        samples: 30,
        mismatches: 0,
        ..Default::default()
    };
    accepted(state, Command::Report { node: n("router-1"), report: report.clone(), upgrade });
    accepted(state, Command::Report { node: n("db-1"), report, upgrade });
}

/// Upgrade after upgrade: the winner of one is the old universe of the next; a plan written
/// for another generation is refused with the reason; the next upgrade's nodes keep the last
/// decision (never `Initial` again, which they would order before what they hold).
#[test]
fn upgrade_after_upgrade_moves_the_generation_and_keeps_the_last_decision() {
    let mut state = ready("auto", 3);
    assert_eq!(state.generation, Generation(1));
    switch_and_finish(&mut state, 1);
    assert_eq!(state.generation, Generation(2), "the switch made generation 2 the cluster's");

    let stale = rejected(&mut state, Command::Start { plan: Box::new(plan_from(1)), token: "t2".into() });
    assert_eq!(stale.kind, RejectKind::WrongGeneration);
    assert!(stale.detail.contains("upgrades from generation 1, but the cluster serves generation 2"), "{stale}");
    let ahead = rejected(&mut state, Command::Start { plan: Box::new(plan_from(3)), token: "t2".into() });
    assert_eq!(ahead.kind, RejectKind::WrongGeneration);

    assert_eq!(
        state.apply(&Command::Start { plan: Box::new(plan_from(2)), token: "t2".into() }),
        Applied::Started(UpgradeId(2))
    );
    let view = decision_view(&state, 1, &n("router-1"));
    assert_eq!(view.decision, Decision::Commit(Epoch(1)), "the new upgrade shows the last decision");
    assert_eq!(view.decision.serving_generation(view.generation), Some(Generation(2)));
    assert_eq!(view.upgrade_from, Some(Generation(2)));
    // Where the generation served answers (the last plan's), and where the next one will.
    let universes = vec![
        (Generation(2), vec!["http://127.0.0.1:9002".to_string()]),
        (Generation(3), vec!["http://127.0.0.1:9003".to_string()]),
    ];
    assert_eq!(view.universes, universes);

    make_ready(&mut state);
    freeze(&mut state, 2, 0);
    let view = decision_view(&state, 2, &n("router-1"));
    assert_eq!((view.decision, view.generation), (Decision::Freeze(Epoch(2)), Generation(2)), "epochs keep growing");
    accepted(&mut state, Command::Abort { epoch: Epoch(2), reason: "test".into(), now_ms: 10 });
    let view = decision_view(&state, 3, &n("router-1"));
    assert_eq!(view.decision.serving_generation(view.generation), Some(Generation(2)), "an abort keeps generation 2");
    assert_eq!(state.generation, Generation(2));

    switch_and_finish(&mut state, 3);
    assert_eq!(state.generation, Generation(3));
    let kept: Vec<Generation> = state.universes.keys().copied().collect();
    assert_eq!(kept, [Generation(3)], "a generation nobody serves any more is forgotten");
    let view = decision_view(&state, 9, &n("router-1"));
    assert_eq!(view.universes, vec![(Generation(3), vec!["http://127.0.0.1:9003".to_string()])]);
    let (decision, base) = state.decision_and_base();
    assert_eq!(decision.serving_generation(base), Some(Generation(3)));
    assert_eq!(status(&state).generation, Generation(3));
}

/// A registration or report that arrives late, after the next upgrade started, is refused: the
/// node's numbers of an earlier upgrade are not this one's (hunt with `--upgrades 3`, seed 93: a
/// data node's report of its previous pair's stores, delayed in the network, let a freeze pass
/// the gate on positions its new stores never reached).
#[test]
fn a_late_report_of_an_earlier_upgrade_is_refused() {
    let mut state = ready("auto", 3);
    switch_and_finish(&mut state, 1);
    assert_eq!(
        state.apply(&Command::Start { plan: Box::new(plan_from(2)), token: "t2".into() }),
        Applied::Started(UpgradeId(2))
    );
    make_ready(&mut state);
    let stale = NodeReport {
        captured: Position(95),
        applied: Position(95),
        bulk_done: true,
        samples: 0,
        mismatches: 0,
        ..Default::default()
    };
    let reason = rejected(&mut state, Command::Report { node: n("db-1"), report: stale, upgrade: U1 });
    assert_eq!(reason.kind, RejectKind::WrongUpgrade, "{reason}");
    assert!(reason.detail.contains("for upgrade 1, but the current upgrade is 2"), "{reason}");
    let register = Command::Register {
        node: n("router-1"),
        duties: vec![Duty::Route, Duty::Validate],
        deployed: true,
        upgrade: U1,
    };
    assert_eq!(rejected(&mut state, register).kind, RejectKind::WrongUpgrade);
    let report = &state.current.as_ref().unwrap().nodes[&n("db-1")].report;
    assert_eq!(report.captured, Position(10), "the report of upgrade 2 stands");
}

/// A rolled-back upgrade leaves the generation; the next plan upgrades from the same one, and
/// its nodes keep serving it under the last abort until its first freeze.
#[test]
fn after_a_rollback_the_next_upgrade_starts_from_the_same_generation() {
    let mut state = ready("auto", 1);
    freeze(&mut state, 1, 0);
    accepted(&mut state, Command::Abort { epoch: Epoch(1), reason: "deadline".into(), now_ms: 100 });
    assert_eq!(phase(&state), Phase::RolledBack);
    let reason = rejected(&mut state, Command::Start { plan: Box::new(plan_from(2)), token: "t2".into() });
    assert_eq!(reason.kind, RejectKind::WrongGeneration, "{reason}");
    assert_eq!(
        state.apply(&Command::Start { plan: Box::new(plan_from(1)), token: "t2".into() }),
        Applied::Started(UpgradeId(2))
    );
    let view = decision_view(&state, 1, &n("db-1"));
    assert_eq!((view.decision, view.generation), (Decision::Abort(Epoch(1)), Generation(1)));
    make_ready(&mut state);
    switch_and_finish(&mut state, 2);
    assert_eq!(state.generation, Generation(2));
}

// ---- recovery of a group rebuilt from nothing ----------------------------------------------

fn disk(decision: Decision, generation: u64, endpoints: &[&str]) -> Option<DiskSummary> {
    Some(DiskSummary {
        decision,
        generation: Generation(generation),
        endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
    })
}

fn reported(state: &mut UpgradeState, node: &str, duties: Vec<Duty>, version: u64, disk: Option<DiskSummary>) {
    accepted(state, Command::Recovered { node: n(node), duties, known_version: version, known_upgrade: 2, disk });
}

fn recovering(expected: &[&str]) -> UpgradeState {
    let mut state = UpgradeState::default();
    accepted(
        &mut state,
        Command::Recover {
            expected: expected.iter().map(|e| n(e)).collect(),
            lost: Vec::new(),
            abort_unknown_freeze: false,
        },
    );
    state
}

/// A commit that some nodes persisted stands, and nodes that only froze learn it; the rebuilt
/// group decides nothing before every node reported, and its versions start above every node's.
#[test]
fn a_recovered_group_learns_a_commit_from_the_disks_and_decides_nothing_before() {
    let mut state = recovering(&["router-1", "router-2", "db-1"]);
    let refused = rejected(&mut state, Command::Start { plan: Box::new(plan_from(2)), token: "t".into() });
    assert_eq!(refused.kind, RejectKind::Recovering);
    assert!(refused.detail.contains("router-1, router-2, db-1") || refused.detail.contains("db-1"), "{refused:?}");
    assert!(decision_view(&state, state.version, &n("router-1")).recovering);
    let route = vec![Duty::Route, Duty::Validate];
    reported(&mut state, "router-1", route.clone(), 50, disk(Decision::Commit(Epoch(3)), 1, &["http://v2:80"]));
    reported(&mut state, "router-2", route, 40, disk(Decision::Freeze(Epoch(3)), 1, &[]));
    assert!(state.recovery.is_some(), "db-1 has not reported");
    assert_eq!(rejected(&mut state, Command::Join { node: n("router-3") }).kind, RejectKind::Recovering);
    reported(&mut state, "db-1", vec![Duty::Capture, Duty::Transform], 45, disk(Decision::Commit(Epoch(3)), 1, &[]));
    assert!(state.recovery.is_none(), "every node reported");
    assert_eq!(
        (state.generation, state.last_epoch, state.decision()),
        (Generation(2), Epoch(3), Decision::Commit(Epoch(3)))
    );
    assert!(state.version > 50, "views newer than any a node saw: {}", state.version);
    assert_eq!(state.roster.get(&n("router-2")), Some(&RosterStatus::Active));
    assert_eq!(state.roster.get(&n("db-1")), None, "data nodes are not on the roster");
    assert_eq!(state.universes.get(&Generation(2)), Some(&vec!["http://v2:80".to_string()]));
    let view = decision_view(&state, state.version, &n("router-2"));
    assert_eq!(
        (view.decision, view.decision.serving_generation(view.generation)),
        (Decision::Commit(Epoch(3)), Some(Generation(2)))
    );
    assert!(!view.recovering);
    // The next upgrade starts from what the disks said, with an id no node saw (they said 2).
    assert_eq!(
        state.apply(&Command::Start { plan: Box::new(plan_from(2)), token: "t".into() }),
        Applied::Started(UpgradeId(3))
    );
}

/// A freeze whose outcome no disk holds is aborted: no node acted on one.
#[test]
fn a_freeze_no_disk_knows_the_outcome_of_is_aborted() {
    let mut state = recovering(&["router-1", "router-2"]);
    let route = vec![Duty::Route];
    reported(&mut state, "router-1", route.clone(), 9, disk(Decision::Freeze(Epoch(2)), 2, &[]));
    reported(&mut state, "router-2", route, 7, disk(Decision::Commit(Epoch(1)), 1, &["http://v2:80"]));
    assert_eq!((state.generation, state.decision()), (Generation(2), Decision::Abort(Epoch(2))));
    assert!(matches!(state.outcomes.get(&Epoch(2)), Some(Outcome::Aborted { .. })));
    assert_eq!(state.universes.get(&Generation(2)), Some(&vec!["http://v2:80".to_string()]));
}

/// A node declared lost is not waited for, and is not on the roster; a retired router stays
/// retired; a node with no disk it can vouch for counts as reported.
#[test]
fn lost_retired_and_empty_disks() {
    let mut state = recovering(&["router-1", "router-2", "router-3", "router-4"]);
    reported(&mut state, "router-1", vec![Duty::Route], 3, disk(Decision::Commit(Epoch(1)), 1, &["http://v2:80"]));
    reported(&mut state, "router-2", vec![Duty::Route], 3, disk(Decision::Retired, 1, &[]));
    reported(&mut state, "router-3", vec![Duty::Route], 0, None);
    assert_eq!(state.recovery.as_ref().map(Recovery::waiting), Some(vec![n("router-4")]));
    accepted(
        &mut state,
        Command::Recover { expected: Vec::new(), lost: vec![n("router-4")], abort_unknown_freeze: false },
    );
    assert!(state.recovery.is_none());
    assert_eq!(state.roster.get(&n("router-2")), Some(&RosterStatus::Retired));
    assert_eq!(state.roster.get(&n("router-3")), Some(&RosterStatus::Active));
    assert_eq!(state.roster.get(&n("router-4")), None);
    assert_eq!(state.generation, Generation(2));
}

/// Only a group that has decided nothing recovers; only expected nodes report.
#[test]
fn recovery_is_for_a_group_rebuilt_from_nothing() {
    let mut state = ready("auto", 3);
    let r = rejected(
        &mut state,
        Command::Recover { expected: vec![n("router-1")], lost: Vec::new(), abort_unknown_freeze: false },
    );
    assert_eq!(r.kind, RejectKind::BadCommand);
    let mut state = recovering(&["router-1"]);
    let r = rejected(
        &mut state,
        Command::Recovered {
            node: n("stranger"),
            duties: vec![Duty::Route],
            known_version: 1,
            known_upgrade: 0,
            disk: None,
        },
    );
    assert_eq!(r.kind, RejectKind::UnknownNode);
    let mut fresh = UpgradeState::default();
    let r = rejected(
        &mut fresh,
        Command::Recovered { node: n("router-1"), duties: vec![], known_version: 1, known_upgrade: 0, disk: None },
    );
    assert_eq!(r.kind, RejectKind::BadCommand, "not recovering");
}

/// A freeze the disks cannot tell the outcome of, with a node whose disk vouches for nothing
/// (it may have been replaced after it acted on the commit): the recovery waits for the
/// operator's word that no client saw the new universe; with it, the freeze is aborted.
#[test]
fn an_unknown_freeze_with_a_blind_disk_waits_for_the_operators_word() {
    let mut state = recovering(&["router-1", "router-2"]);
    reported(&mut state, "router-1", vec![Duty::Route], 9, disk(Decision::Freeze(Epoch(2)), 1, &["http://v1:80"]));
    reported(&mut state, "router-2", vec![Duty::Route], 0, None);
    let r = state.recovery.as_ref().expect("still recovering");
    assert_eq!(r.unknown_freeze(), Some(Epoch(2)));
    assert!(r.blocked().is_some_and(|b| b.contains("--abort-unknown-freeze")), "{:?}", r.blocked());
    let refused = rejected(&mut state, Command::Start { plan: Box::new(plan_from(1)), token: "t".into() });
    assert!(refused.detail.contains("freeze e2"), "{refused:?}");
    accepted(&mut state, Command::Recover { expected: Vec::new(), lost: Vec::new(), abort_unknown_freeze: true });
    assert!(state.recovery.is_none());
    assert_eq!((state.generation, state.decision()), (Generation(1), Decision::Abort(Epoch(2))));
    assert_eq!(state.universes.get(&Generation(1)), Some(&vec!["http://v1:80".to_string()]), "a frozen disk's base");
}

/// A node that reports again cannot take back a disk it vouched for, nor an older decision
/// replace a newer one.
#[test]
fn a_second_report_keeps_the_newest_decision() {
    let mut state = recovering(&["router-1", "router-2"]);
    reported(&mut state, "router-1", vec![Duty::Route], 5, disk(Decision::Commit(Epoch(1)), 1, &["http://v2:80"]));
    reported(&mut state, "router-1", vec![Duty::Route], 6, None);
    reported(&mut state, "router-1", vec![Duty::Route], 6, disk(Decision::Freeze(Epoch(1)), 1, &[]));
    reported(&mut state, "router-2", vec![Duty::Route], 3, disk(Decision::Freeze(Epoch(1)), 1, &[]));
    assert!(state.recovery.is_none(), "router-1's disk vouched: nothing is unknown");
    assert_eq!((state.generation, state.decision()), (Generation(2), Decision::Commit(Epoch(1))));
}

/// The leader gathers a freeze's acks into one command: what completes the freeze is known
/// before proposing, the batch decides the commit in the step that applies it, and each ack
/// gets its own answer (a wrong one is refused without spoiling the others).
#[test]
fn a_batch_of_acks_decides_the_freeze_in_one_step_and_answers_each() {
    let mut state = ready("auto", 3);
    freeze(&mut state, 1, 0);
    let (r1, r2, db) = (n("router-1"), n("router-2"), n("db-1"));
    assert!(state.acks_awaited(Epoch(1)) && !state.acks_awaited(Epoch(2)));
    assert!(!state.acks_complete(Epoch(1), &[&r1, &r2].into_iter().collect()), "db-1 has not drained");
    assert!(state.acks_complete(Epoch(1), &[&r1, &r2, &db].into_iter().collect()));
    assert!(!state.acks_complete(Epoch(2), &[&r1, &r2, &db].into_iter().collect()), "not the epoch frozen");
    let drained = Ack::Drained { final_position: Position(10), checksum_match: true };
    let version = state.version;
    let answer = state.apply(&Command::Acks {
        epoch: Epoch(1),
        acks: vec![(r1.clone(), Ack::Frozen), (db.clone(), Ack::Frozen), (r2.clone(), Ack::Switched)],
    });
    let Applied::Each(each) = answer else { panic!("{answer:?}") };
    assert_eq!(each[0], Applied::Accepted);
    assert!(matches!(&each[1], Applied::Rejected(r) if r.kind == RejectKind::WrongDuties), "{:?}", each[1]);
    assert!(matches!(&each[2], Applied::Rejected(r) if r.kind == RejectKind::BadCommand), "{:?}", each[2]);
    assert_eq!(state.version, version + 1, "one batch, one version");
    assert!(state.acks_complete(Epoch(1), &[&r2, &db].into_iter().collect()), "router-1 is counted");
    let answer = state.apply(&Command::Acks { epoch: Epoch(1), acks: vec![(r2, Ack::Frozen), (db, drained)] });
    assert_eq!(answer, Applied::Each(vec![Applied::Accepted, Applied::Accepted]));
    assert_eq!(state.current.as_ref().unwrap().phase, Phase::Switched, "the batch's last ack decides");
    assert_eq!(state.outcomes.get(&Epoch(1)), Some(&Outcome::Committed));
    assert!(!state.acks_awaited(Epoch(1)), "decided: nothing left to gather");
    let stale = state.apply(&Command::Acks { epoch: Epoch(1), acks: vec![(n("router-1"), Ack::Frozen)] });
    assert!(!stale.changed(), "a batch after the decision changes nothing: {stale:?}");
}

/// A rebuilt group marks its pristine state first; until `Recover` it refuses everything else
/// (hunt seed 61000041: a join sent before `cluster recover` was taken as the first join of a
/// new cluster at generation 1), and says why in the operator's status. A state with anything
/// of its own is not marked.
#[test]
fn a_rebuilt_group_refuses_everything_but_recover_until_it_recovers() {
    let mut state = UpgradeState::default();
    assert!(state.awaits_recovery_mark());
    // Before the mark, a rebuilt group's replica refuses the same way (all but the recovery).
    let join = Command::Join { node: n("router-1") };
    assert_eq!(state.refused_before_the_mark(&join).map(|r| r.kind), Some(RejectKind::Recovering));
    let recover = Command::Recover { expected: vec![n("router-1")], lost: Vec::new(), abort_unknown_freeze: false };
    assert_eq!(state.refused_before_the_mark(&recover), None);
    accepted(&mut state, Command::AwaitRecovery);
    accepted(&mut state, Command::AwaitRecovery);
    assert!(!state.awaits_recovery_mark(), "marked");
    assert_eq!(status(&state).recovery_blocked.as_deref(), Some(REBUILT_FIRST));
    for command in [
        Command::Join { node: n("router-1") },
        Command::Start { plan: Box::new(plan("auto", 3)), token: "t1".into() },
        Command::Retire { node: n("router-1"), force: true },
    ] {
        let refused = rejected(&mut state, command);
        assert_eq!(refused.kind, RejectKind::Recovering);
        assert!(refused.detail.contains("imago cluster recover"), "{refused}");
    }
    assert!(state.roster.is_empty() && state.current.is_none(), "nothing taken");
    let refused =
        rejected(&mut state, Command::Recover { expected: Vec::new(), lost: Vec::new(), abort_unknown_freeze: false });
    assert_eq!(refused.kind, RejectKind::BadCommand, "a recovery names the nodes: still awaiting");
    assert!(state.awaiting_recovery);
    accepted(
        &mut state,
        Command::Recover { expected: vec![n("router-1")], lost: Vec::new(), abort_unknown_freeze: false },
    );
    assert!(!state.awaiting_recovery && state.recovery.is_some());
    assert!(!state.awaits_recovery_mark(), "recovering: never marked again");
    assert_eq!(rejected(&mut state, Command::AwaitRecovery).kind, RejectKind::Recovering);

    let mut new_cluster = UpgradeState::default();
    accepted(&mut new_cluster, Command::Join { node: n("router-1") });
    assert!(!new_cluster.awaits_recovery_mark());
    assert_eq!(rejected(&mut new_cluster, Command::AwaitRecovery).kind, RejectKind::BadCommand);
    accepted(&mut new_cluster, Command::Join { node: n("router-2") });
}

/// The replicated state's format is only ever raised, by a command (each replica checks before
/// applying it that its build reads the new format: `raft/store.rs`).
#[test]
fn the_state_format_is_only_ever_raised() {
    let mut state = UpgradeState::default();
    assert_eq!(state.format, StateFormat(1), "a new cluster writes format 1");
    assert!(STATE_FORMAT_MAX >= state.format, "this build reads what it writes");
    for to in [0, 1] {
        let refused = rejected(&mut state, Command::RaiseFormat { to });
        assert!(refused.detail.contains("already writes format 1"), "{refused}");
    }
    let version = state.version;
    accepted(&mut state, Command::RaiseFormat { to: 3 });
    assert_eq!((state.format, state.version), (StateFormat(3), version + 1));
    assert_eq!(rejected(&mut state, Command::RaiseFormat { to: 2 }).kind, RejectKind::BadCommand);
}
