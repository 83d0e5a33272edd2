//! Rules of the ingress composition core ([`IngressCore`]) that the property tests do not pin
//! down: what the validator has counted (the shell exports it as metrics), and the counts a
//! router reports to the coordinator.

// The package is `imago-node-core`; the workspace knows it as `node_core`.
extern crate imago_node_core as node_core;

use node_core::agent::AgentConfig;
use node_core::duties::router::RouterConfig;
use node_core::ingress::{ClientReply, IngressConfig, IngressCore, IngressInput, IngressOutput, Unavailable};
use node_core::{NodeRecord, StoreAnswer};
use protocol::messages::{DecisionView, NodeRequest, NodeResponse, Phase};
use protocol::schema::{Row, Value};
use protocol::{Decision, Duty, NodeName, Position, UpgradeId};

fn config() -> IngressConfig {
    IngressConfig {
        agent: AgentConfig {
            node: NodeName::from("router-1"),
            duties: vec![Duty::Route, Duty::Validate],
            replicas: vec![1, 2, 3],
            request_timeout_ms: 50,
            watch_wait_ms: 100,
            report_interval_ms: 20,
            stale_watch_limit: 3,
            upgrade_from: None,
        },
        router: RouterConfig { hold_ms_max: 100, hold_queue_max: 3, inflight_ms_max: 1_000, retry_after_ms: 1000 },
        ignore_fields: Vec::new(),
        requests_max: 6,
        genesis_endpoints: vec!["http://g1:80".into()],
    }
}

fn answer(v: i64) -> StoreAnswer {
    let body: Row = [("v".to_string(), Value::Int(v))].into_iter().collect();
    StoreAnswer::Ok { body: Some(body), position: Position(4) }
}

/// Sends mirrored read `id`, answered `old` by the old universe and `new` by the new one.
fn mirrored_read(core: &mut IngressCore, now_ms: u64, id: u64, old: i64, new: i64) -> Vec<IngressOutput> {
    let out = core.handle(now_ms, IngressInput::Request { id, read_only: true, long: false });
    assert!(out.iter().any(|o| matches!(o, IngressOutput::Mirror { .. })), "syncing: reads are mirrored");
    let mut out = core.handle(now_ms, IngressInput::Answered { id, answer: Some(answer(old)) });
    out.extend(core.handle(now_ms, IngressInput::Mirrored { id, answer: Some(answer(new)) }));
    out
}

#[test]
fn the_validator_counts_what_it_compared_and_the_router_reports_it() {
    // A new disk: the decision read is written before it is acted on.
    let (mut core, _) = serving_from_a_new_disk(syncing(3, 1, Decision::Initial));
    mirrored_read(&mut core, 2, 1, 7, 7);
    let out = mirrored_read(&mut core, 3, 2, 7, 8);
    assert_eq!((core.validate().samples, core.validate().mismatches), (2, 1));
    assert_eq!(core.requests(), 0, "both reads are done, mirrors included");
    let reported = out.iter().find_map(|o| match o {
        IngressOutput::Send { request: NodeRequest::Report { report, .. }, .. } => Some(report.clone()),
        _ => None,
    });
    let report = reported.or_else(|| {
        core.handle(100, IngressInput::Timer).into_iter().find_map(|o| match o {
            IngressOutput::Send { request: NodeRequest::Report { report, .. }, .. } => Some(report),
            _ => None,
        })
    });
    let report = report.expect("the counts are reported");
    assert_eq!((report.samples, report.mismatches), (2, 1));
}

/// Upgrade after upgrade: a router that serves what the last switch made (its own disk holds
/// that commit) forwards there, and while the next upgrade syncs it mirrors reads to the
/// generation after; the record it persists names the generation absolutely.
#[test]
fn the_next_upgrade_forwards_to_the_last_switch_and_mirrors_to_the_one_after() {
    use protocol::{Epoch, Generation};
    let own =
        own_disk(Decision::Commit(Epoch(1)), Generation(1), vec!["http://g2-a:80".into(), "http://g2-b:80".into()]);
    let (mut core, watch) = booted(own);
    let out = core.handle(1, IngressInput::Request { id: 1, read_only: true, long: false });
    assert!(
        out.iter().any(|o| matches!(o, IngressOutput::Forward { id: 1, generation: Generation(2), endpoint, .. }
            if endpoint == "http://g2-b:80")),
        "served from its own disk: generation 2, at the endpoints its record names ({out:?})"
    );
    assert!(!out.iter().any(|o| matches!(o, IngressOutput::Mirror { .. })), "no upgrade known yet: {out:?}");
    // The second upgrade syncs: the view keeps the last decision, of the upgrade from 1.
    let view = DecisionView {
        generation: Generation(1),
        upgrade_from: Some(Generation(2)),
        acked_switched: true,
        ..syncing(9, 2, Decision::Commit(Epoch(1)))
    };
    core.handle(2, IngressInput::Coordinator { id: watch, response: NodeResponse::View(view) });
    let out = core.handle(3, IngressInput::Request { id: 2, read_only: true, long: false });
    assert!(
        out.iter().any(|o| matches!(o, IngressOutput::Forward { id: 2, generation: Generation(2), .. })),
        "{out:?}"
    );
    assert!(
        out.iter().any(|o| matches!(o, IngressOutput::Mirror { id: 2, generation: Generation(3), endpoint, .. }
            if endpoint == "http://g3:80")),
        "{out:?}"
    );
}

/// A core booted on `record`, its boot record durable: the core and the id of its watch.
/// router-1's own disk (confirmed), holding `decision` of an upgrade from `generation`, serving
/// at `endpoints`.
fn own_disk(decision: Decision, generation: protocol::Generation, endpoints: Vec<String>) -> NodeRecord {
    NodeRecord {
        decision,
        generation,
        boots: 1,
        disk_id: 4,
        owner: NodeRecord::owner_of("router-1"),
        confirmed: true,
        endpoints,
    }
}

fn booted(record: NodeRecord) -> (IngressCore, u64) {
    booted_with(config(), record)
}

fn booted_with(config: IngressConfig, record: NodeRecord) -> (IngressCore, u64) {
    let mut core = IngressCore::new(config);
    let out = core.handle(0, IngressInput::Boot { record });
    let Some(IngressOutput::Persist(record)) = out.into_iter().find(|o| matches!(o, IngressOutput::Persist(_))) else {
        panic!("a boot persists its record first")
    };
    let out = core.handle(0, IngressInput::Persisted(record));
    (core, watch_in(&out).expect("a booted agent watches"))
}

/// A core on a new disk that read `first` and wrote it back: the core and its watch's id.
fn serving_from_a_new_disk(first: DecisionView) -> (IngressCore, u64) {
    serving_from_a_new_disk_with(config(), first)
}

fn serving_from_a_new_disk_with(config: IngressConfig, first: DecisionView) -> (IngressCore, u64) {
    let (mut core, watch) = booted_with(config, NodeRecord::default());
    let out = core.handle(1, IngressInput::Coordinator { id: watch, response: NodeResponse::View(first) });
    let watch = watch_in(&out).expect("watching on");
    let Some(IngressOutput::Persist(confirmed)) = out.into_iter().find(|o| matches!(o, IngressOutput::Persist(_)))
    else {
        panic!("the first read on a new disk is persisted")
    };
    assert!(confirmed.confirmed);
    core.handle(1, IngressInput::Persisted(confirmed));
    (core, watch)
}

/// The id of the watch among `out`, if one was sent.
fn watch_in(out: &[IngressOutput]) -> Option<u64> {
    out.iter().find_map(|o| match o {
        IngressOutput::Send { id, request: NodeRequest::Watch { .. }, .. } => Some(*id),
        _ => None,
    })
}

/// A view of upgrade `upgrade` syncing from generation 1 (after a rollback, say).
fn syncing(version: u64, upgrade: u64, decision: Decision) -> DecisionView {
    DecisionView {
        version,
        upgrade: Some(UpgradeId(upgrade)),
        phase: Some(Phase::Syncing),
        decision,
        generation: protocol::Generation::GENESIS,
        upgrade_from: Some(protocol::Generation::GENESIS),
        known: true,
        registered: true,
        all_routers_frozen: false,
        acked_frozen: false,
        acked_drained: false,
        acked_switched: false,
        roster: protocol::messages::RosterStatus::Active,
        routers: Vec::new(),
        // Every generation these tests upgrade to answers at its own endpoint.
        universes: (2..=4).map(|g| (protocol::Generation(g), vec![format!("http://g{g}:80")])).collect(),
        rules: None,
        recovering: false,
        disk_recorded: false,
    }
}

/// A new upgrade validates from nothing: the last one's samples and mismatches are not its
/// own (a mismatch an upgrade rolled back for would otherwise block every later one), and the
/// report waiting to be sent is replaced.
#[test]
fn a_new_upgrade_validates_from_zero() {
    let (mut core, watch) = serving_from_a_new_disk(syncing(3, 1, Decision::Initial));
    mirrored_read(&mut core, 2, 1, 7, 8);
    assert_eq!((core.validate().samples, core.validate().mismatches), (1, 1));

    let view = NodeResponse::View(syncing(9, 2, Decision::Abort(protocol::Epoch(1))));
    let out = core.handle(3, IngressInput::Coordinator { id: watch, response: view });
    assert!(
        out.iter().any(|o| matches!(
            o,
            IngressOutput::Event(node_core::ingress::IngressEvent::ValidationReset { upgrade: Some(UpgradeId(2)) })
        )),
        "{out:?}"
    );
    assert_eq!((core.validate().samples, core.validate().mismatches), (0, 0));
    let mut sent = out;
    sent.extend(core.handle(500, IngressInput::Timer));
    let reports: Vec<_> = sent
        .iter()
        .filter_map(|o| match o {
            IngressOutput::Send { request: NodeRequest::Report { report, .. }, .. } => Some(report.clone()),
            _ => None,
        })
        .collect();
    assert!(reports.iter().all(|r| r.mismatches == 0), "upgrade 1's mismatch reported to upgrade 2: {reports:?}");
    mirrored_read(&mut core, 501, 2, 7, 7);
    assert_eq!((core.validate().samples, core.validate().mismatches), (1, 0));
}

/// A request a data node did not admit (its fences kept it out, not for good) is an unknown
/// outcome for the client, like no answer at all.
#[test]
fn a_request_not_admitted_is_an_unknown_outcome() {
    let (mut core, _) = serving_from_a_new_disk(syncing(3, 1, Decision::Initial));
    let out = core.handle(2, IngressInput::Request { id: 1, read_only: false, long: false });
    assert!(out.iter().any(|o| matches!(o, IngressOutput::Forward { id: 1, .. })), "{out:?}");
    let kept_out = StoreAnswer::NotAdmitted { reason: "Old universe not accepting".into() };
    let out = core.handle(3, IngressInput::Answered { id: 1, answer: Some(kept_out) });
    assert!(
        out.iter()
            .any(|o| matches!(o, IngressOutput::Reply { id: 1, reply: node_core::ingress::ClientReply::Unknown })),
        "{out:?}"
    );
}

/// The validator that starts from zero for a new upgrade still ignores the fields the
/// configuration says to ignore.
#[test]
fn a_new_upgrade_ignores_the_same_fields() {
    let config = IngressConfig { ignore_fields: vec!["v".to_string()], ..config() };
    let (mut core, watch) = serving_from_a_new_disk_with(config, syncing(3, 1, Decision::Initial));
    let view = NodeResponse::View(syncing(9, 2, Decision::Abort(protocol::Epoch(1))));
    core.handle(3, IngressInput::Coordinator { id: watch, response: view });
    mirrored_read(&mut core, 4, 1, 7, 8);
    assert_eq!((core.validate().samples, core.validate().mismatches), (1, 0), "`v` is ignored");
}

/// A request for a generation whose endpoints nobody named is refused at once (503, nothing
/// sent); a decision is persisted with the endpoints of the generation it serves, so that the
/// router can serve there from its own disk after a restart.
#[test]
fn no_endpoint_no_request_and_the_record_keeps_where_the_decision_serves() {
    use protocol::{Epoch, Generation};
    let own = own_disk(Decision::Initial, Generation(1), Vec::new());
    let config = IngressConfig { genesis_endpoints: Vec::new(), ..config() };
    let (mut core, watch) = booted_with(config, own);
    let out = core.handle(1, IngressInput::Request { id: 1, read_only: false, long: false });
    assert!(!out.iter().any(|o| matches!(o, IngressOutput::Forward { .. })), "{out:?}");
    assert!(
        out.iter().any(|o| matches!(
            o,
            IngressOutput::Reply {
                id: 1,
                reply: ClientReply::Unavailable { reason: Unavailable::NoEndpoint(Generation(1)), .. }
            }
        )),
        "{out:?}"
    );
    let commit = DecisionView { phase: Some(Phase::Switched), ..syncing(5, 1, Decision::Commit(Epoch(1))) };
    let out = core.handle(2, IngressInput::Coordinator { id: watch, response: NodeResponse::View(commit) });
    let persisted = out.iter().find_map(|o| match o {
        IngressOutput::Persist(record) => Some(record.clone()),
        _ => None,
    });
    let record = persisted.expect("the commit is persisted");
    assert_eq!(record.decision, Decision::Commit(Epoch(1)));
    assert_eq!(record.endpoints, vec!["http://g2:80".to_string()], "the endpoints of the generation it serves");
}

/// The plan's hold limits reach a router through the view: a freeze then holds at most
/// `hold_queue_max` requests (more get 503 at once), each for at most `hold_ms_max`.
#[test]
fn a_router_holds_by_the_plans_limits() {
    use node_core::duties::router::FailReason;
    use protocol::{Epoch, Generation};
    let own = own_disk(Decision::Initial, Generation(1), vec!["http://g1:80".into()]);
    let (mut core, watch) = booted(own);
    assert_eq!(core.router().limits(), (100, 3, 1_000), "its own configuration before any plan");
    let freeze = DecisionView {
        phase: Some(Phase::Freezing),
        rules: Some(rules(40, 1, 30)),
        ..syncing(7, 1, Decision::Freeze(Epoch(1)))
    };
    let out = core.handle(1, IngressInput::Coordinator { id: watch, response: NodeResponse::View(freeze) });
    assert_eq!(core.router().limits(), (40, 1, 30), "the plan's, from the view");
    let record = out
        .iter()
        .find_map(|o| match o {
            IngressOutput::Persist(r) => Some(r.clone()),
            _ => None,
        })
        .expect("the freeze is persisted");
    core.handle(2, IngressInput::Persisted(record));
    let held = core.handle(3, IngressInput::Request { id: 1, read_only: false, long: false });
    assert!(held.iter().all(|o| !matches!(o, IngressOutput::Forward { .. } | IngressOutput::Reply { .. })), "{held:?}");
    let failed = |out: &[IngressOutput], id: u64, why: FailReason| {
        out.iter().any(|o| {
            matches!(o, IngressOutput::Reply { id: i, reply: ClientReply::Unavailable { reason: Unavailable::Hold(r), .. } }
                if *i == id && *r == why)
        })
    };
    let full = core.handle(4, IngressInput::Request { id: 2, read_only: false, long: false });
    assert!(failed(&full, 2, FailReason::HoldQueueFull), "{full:?}");
    let expired = core.handle(43, IngressInput::Timer);
    assert!(failed(&expired, 1, FailReason::HoldTimeout), "held 40 ms, the plan's limit: {expired:?}");
}

fn rules(hold_ms_max: u64, hold_queue_max: u32, inflight_ms_max: u64) -> protocol::messages::RouterRules {
    protocol::messages::RouterRules {
        hold_ms_max,
        hold_queue_max,
        inflight_ms_max,
        long_routes: vec!["/events".into()],
        validation: protocol::plan::Validation::default(),
    }
}

/// A request in flight cannot keep a freeze waiting: a long one (on a route the plan names) is
/// ended at once, any other once it has been in flight for the plan's `inflight_ms_max`. Each
/// client is told the outcome is unknown, the ack then goes, and the answers that come later
/// come to nothing.
#[test]
fn a_frozen_router_ends_long_and_overdue_requests_then_acks() {
    use node_core::ingress::IngressEvent;
    use protocol::messages::Ack;
    use protocol::Epoch;
    let syncing_view = DecisionView { rules: Some(rules(100, 3, 50)), ..syncing(3, 1, Decision::Initial) };
    let (mut core, watch) = serving_from_a_new_disk(syncing_view);
    core.handle(10, IngressInput::Request { id: 1, read_only: false, long: true });
    core.handle(20, IngressInput::Request { id: 2, read_only: false, long: false });
    core.handle(30, IngressInput::Request { id: 3, read_only: false, long: false });
    core.handle(31, IngressInput::Answered { id: 3, answer: Some(answer(1)) });
    let ended = |out: &[IngressOutput], id: u64| {
        out.iter().any(|o| matches!(o, IngressOutput::Event(IngressEvent::Ended { id: i, .. }) if *i == id))
            && out.iter().any(|o| matches!(o, IngressOutput::Reply { id: i, reply: ClientReply::Unknown } if *i == id))
    };
    let acked = |out: &[IngressOutput]| {
        out.iter().any(|o| matches!(o, IngressOutput::Send { request: NodeRequest::Ack { ack: Ack::Frozen, .. }, .. }))
    };
    let freeze = DecisionView {
        phase: Some(Phase::Freezing),
        rules: Some(rules(100, 3, 50)),
        ..syncing(7, 1, Decision::Freeze(Epoch(1)))
    };
    let mut out = core.handle(40, IngressInput::Coordinator { id: watch, response: NodeResponse::View(freeze) });
    let record = out.iter().find_map(|o| match o {
        IngressOutput::Persist(r) => Some(r.clone()),
        _ => None,
    });
    out.extend(core.handle(41, IngressInput::Persisted(record.expect("the freeze is persisted"))));
    assert!(ended(&out, 1), "the long request is ended at the freeze: {out:?}");
    assert!(!ended(&out, 2) && !acked(&out), "request 2 has been in flight 21 ms of 50: {out:?}");
    assert_eq!(core.router().in_flight(), 1);
    assert_eq!(core.next_deadline_ms(), Some(70), "request 2's 50 ms end at 70");
    let out = core.handle(70, IngressInput::Timer);
    assert!(ended(&out, 2), "{out:?}");
    assert!(acked(&out), "nothing is waited for any more: the ack goes ({out:?})");
    // The late answers: no second reply, nothing in flight again.
    for id in [1, 2] {
        let late = core.handle(80, IngressInput::Answered { id, answer: Some(answer(2)) });
        assert!(!late.iter().any(|o| matches!(o, IngressOutput::Reply { .. })), "{late:?}");
    }
    assert_eq!((core.router().in_flight(), core.requests()), (0, 0));
}

/// The plan's ignore rules reach the validator through the view: answers that differ only in
/// an ignored header match; in another header, they do not.
#[test]
fn the_plans_ignore_rules_reach_the_validator() {
    let header = |name: &str, value: &str| {
        let body: Row = [(protocol::plan::header_key(name), Value::Text(value.into()))].into_iter().collect();
        StoreAnswer::Ok { body: Some(body), position: Position(4) }
    };
    let mut r = rules(100, 3, 50);
    r.validation.ignore = vec![protocol::plan::header_key("x-version")];
    let (mut core, _) = serving_from_a_new_disk(DecisionView { rules: Some(r), ..syncing(3, 1, Decision::Initial) });
    for (id, name) in [(1, "x-version"), (2, "x-other")] {
        let at = 10 * id;
        let out = core.handle(at, IngressInput::Request { id, read_only: true, long: false });
        assert!(out.iter().any(|o| matches!(o, IngressOutput::Mirror { .. })), "{out:?}");
        core.handle(at + 1, IngressInput::Answered { id, answer: Some(header(name, "v1")) });
        core.handle(at + 2, IngressInput::Mirrored { id, answer: Some(header(name, "v2")) });
    }
    assert_eq!((core.validate().samples, core.validate().mismatches), (2, 1), "only x-other differs");
}

/// A coordinator group rebuilt from nothing recovers: its view (whatever its version, which
/// starts from scratch) is not acted on; the router tells it what its disk holds and keeps
/// serving from that disk. (The recovered group's views are taken as usual: the end-to-end
/// recovery test and the simulator's `disaster` scenario.)
#[test]
fn a_router_tells_a_recovering_group_its_disk_and_serves_from_it_meanwhile() {
    use protocol::messages::DiskSummary;
    use protocol::{Epoch, Generation};
    let own = own_disk(Decision::Commit(Epoch(4)), Generation(1), vec!["http://g2:80".into()]);
    let (mut core, watch) = booted(own);
    let recovering = DecisionView {
        version: 2,
        recovering: true,
        phase: None,
        upgrade: None,
        upgrade_from: None,
        known: false,
        registered: false,
        ..syncing(2, 1, Decision::Initial)
    };
    let out = core.handle(5, IngressInput::Coordinator { id: watch, response: NodeResponse::View(recovering) });
    assert!(!out.iter().any(|o| matches!(o, IngressOutput::Persist(_))), "nothing is acted on: {out:?}");
    let told = out.iter().find_map(|o| match o {
        IngressOutput::Send { request: NodeRequest::Recover { disk, .. }, .. } => Some(disk.clone()),
        _ => None,
    });
    let disk = DiskSummary {
        decision: Decision::Commit(Epoch(4)),
        generation: Generation(1),
        endpoints: vec!["http://g2:80".into()],
    };
    assert_eq!(told, Some(Some(disk)), "{out:?}");
    let out = core.handle(6, IngressInput::Request { id: 1, read_only: false, long: false });
    assert!(
        out.iter().any(|o| matches!(o, IngressOutput::Forward { generation: Generation(2), .. })),
        "still serving generation 2 from its disk: {out:?}"
    );
}

/// A router with a new disk vouches for nothing (and keeps holding: it has nothing to serve).
#[test]
fn a_new_router_tells_a_recovering_group_it_has_no_disk() {
    let (mut core, watch) = booted(NodeRecord::default());
    let recovering = DecisionView { recovering: true, upgrade: None, phase: None, ..syncing(2, 1, Decision::Initial) };
    let out = core.handle(5, IngressInput::Coordinator { id: watch, response: NodeResponse::View(recovering) });
    assert!(
        out.iter().any(|o| matches!(o, IngressOutput::Send { request: NodeRequest::Recover { disk: None, .. }, .. })),
        "{out:?}"
    );
    assert!(!out.iter().any(|o| matches!(o, IngressOutput::Persist(_))), "{out:?}");
    let out = core.handle(6, IngressInput::Request { id: 1, read_only: false, long: false });
    assert!(!out.iter().any(|o| matches!(o, IngressOutput::Forward { .. })), "held: {out:?}");
}

/// A read while syncing, with no endpoint known for the generation served (a cluster file
/// without generation 1's) but one for the next: the client is told 503 at once, and the
/// mirror that would go along is not sent (it used to find its request already forgotten, and
/// panic).
#[test]
fn a_read_with_no_endpoint_to_serve_it_is_not_mirrored() {
    let config = IngressConfig { genesis_endpoints: Vec::new(), ..config() };
    let (mut core, _) = serving_from_a_new_disk_with(config, syncing(3, 1, Decision::Initial));
    let out = core.handle(5, IngressInput::Request { id: 1, read_only: true, long: false });
    assert!(
        out.iter().any(|o| matches!(
            o,
            IngressOutput::Reply { id: 1, reply: ClientReply::Unavailable { reason: Unavailable::NoEndpoint(_), .. } }
        )),
        "{out:?}"
    );
    assert!(!out.iter().any(|o| matches!(o, IngressOutput::Mirror { .. } | IngressOutput::Forward { .. })), "{out:?}");
    assert_eq!(core.requests(), 0);
}
