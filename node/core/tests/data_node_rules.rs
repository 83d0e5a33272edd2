//! Rules of the data-node composition core ([`DataNodeCore`]) that the property tests do not
//! pin down: how many answers it remembers for idempotency, what it reports of its
//! checkpoint, and the pace of the change stream after a write wakes it.

// The package is `imago-node-core`; the workspace knows it as `node_core`.
extern crate imago_node_core as node_core;

use node_core::agent::AgentConfig;
use node_core::data_node::{DataEvent, DataInput, DataNodeConfig, DataNodeCore, DataOutput, StoreOp, StoreResult};
use node_core::duties::transform::CopyState;
use node_core::store::Checkpoint;
use node_core::{NodeRecord, RequestKey, StoreAnswer};
use protocol::messages::{DecisionView, NodeRequest, NodeResponse, Phase};
use protocol::{Decision, Duty, Generation, NodeName, Position, Universe, UpgradeId};

const INTERVAL_MS: u64 = 5;
const IDLE_MS: u64 = 20;

fn config(answers_max: usize) -> DataNodeConfig {
    DataNodeConfig {
        agent: AgentConfig {
            node: NodeName::from("data-1"),
            duties: vec![Duty::Capture, Duty::Transform, Duty::Validate],
            replicas: vec![1, 2, 3],
            request_timeout_ms: 20,
            watch_wait_ms: 20,
            report_interval_ms: 10,
            stale_watch_limit: 3,
            upgrade_from: Some(Generation::GENESIS),
        },
        transform_interval_ms: INTERVAL_MS,
        transform_idle_ms: IDLE_MS,
        store_retry_ms: 10,
        positions: Default::default(),
        copy_rows_per_s_max: None,
        copy_chunk_rows: node_core::duties::transform::COPY_CHUNK_ROWS,
        compare_chunk_rows: node_core::data_node::COMPARE_CHUNK_ROWS,
        range_rows: None,
        range_again_ms: 0,
        answers_max,
        change_log_applied_max: 100,
    }
}

/// A core booted on `checkpoint`, its boot record durable.
fn booted(answers_max: usize, checkpoint: Checkpoint) -> (DataNodeCore, Vec<DataOutput>) {
    booted_with(config(answers_max), checkpoint)
}

/// [`booted`] with a configuration of the test's own.
fn booted_with(config: DataNodeConfig, checkpoint: Checkpoint) -> (DataNodeCore, Vec<DataOutput>) {
    let mut core = DataNodeCore::new(config);
    let out = core.handle(0, DataInput::Boot { record: NodeRecord::default(), checkpoint, old_fenced: false });
    let Some(DataOutput::Persist(record)) = out.into_iter().find(|o| matches!(o, DataOutput::Persist(_))) else {
        panic!("a boot persists its record first")
    };
    let out = core.handle(0, DataInput::Persisted(record));
    (core, out)
}

/// The node's own disk, confirmed by an earlier read, holding `decision`.
fn own_disk(decision: Decision) -> NodeRecord {
    NodeRecord {
        decision,
        boots: 1,
        disk_id: 3,
        owner: NodeRecord::owner_of("data-1"),
        confirmed: true,
        ..NodeRecord::default()
    }
}

/// The id of the watch a booted agent sent.
fn watch_id(out: &[DataOutput]) -> u64 {
    out.iter()
        .find_map(|o| match o {
            DataOutput::Send { id, request: NodeRequest::Watch { .. }, .. } => Some(*id),
            _ => None,
        })
        .expect("a booted agent watches")
}

/// A view of upgrade 1 that names this node.
fn view(version: u64, phase: Phase, decision: Decision, acked_drained: bool) -> DecisionView {
    DecisionView {
        version,
        upgrade: Some(UpgradeId(1)),
        phase: Some(phase),
        decision,
        generation: protocol::Generation::GENESIS,
        upgrade_from: Some(protocol::Generation::GENESIS),
        known: true,
        registered: true,
        all_routers_frozen: false,
        acked_frozen: false,
        acked_drained,
        acked_switched: false,
        roster: protocol::messages::RosterStatus::Active,
        routers: Vec::new(),
        universes: Vec::new(),
        rules: None,
        recovering: false,
        disk_recorded: false,
    }
}

fn key(id: u64) -> RequestKey {
    RequestKey { origin: 1, id }
}

fn answer(v: i64) -> StoreAnswer {
    let body = [("v".to_string(), protocol::schema::Value::Int(v))].into_iter().collect();
    StoreAnswer::Ok { body: Some(body), position: Position(0) }
}

/// Sends write `id` to the old universe; returns whether the core let it run (rather than
/// answering from memory), and the outputs of its last step.
fn write(core: &mut DataNodeCore, now_ms: u64, id: u64) -> (bool, Vec<DataOutput>) {
    let out = core.handle(
        now_ms,
        DataInput::Request { key: key(id), generation: Generation(1), mirror: false, read_only: false },
    );
    let ran = out.iter().any(|o| matches!(o, DataOutput::Execute { .. }));
    if ran {
        let executed = core.handle(
            now_ms,
            DataInput::Executed { key: key(id), universe: Universe::Old, mirror: false, answer: answer(id as i64) },
        );
        assert!(executed.iter().any(|o| matches!(o, DataOutput::Reply { .. })));
        return (true, executed);
    }
    assert!(out.iter().any(|o| matches!(o, DataOutput::Reply { answer, .. } if *answer == self::answer(id as i64))));
    (false, out)
}

#[test]
fn the_last_answers_max_answers_are_remembered_and_no_more() {
    let (mut core, _) = booted(2, Checkpoint::default());
    for id in 1..=3 {
        assert!(write(&mut core, 1, id).0, "request {id} is new");
    }
    assert!(!write(&mut core, 2, 3).0, "a retry of the newest is answered from memory");
    assert!(!write(&mut core, 2, 2).0, "so is the one before (answers_max = 2)");
    assert!(write(&mut core, 2, 1).0, "the oldest was forgotten: it runs again");
}

#[test]
fn the_checkpoint_is_the_one_booted_on() {
    let at = Checkpoint { applied: Position(7), copy: CopyState::Done, copies: 0 };
    let (core, _) = booted(4, at.clone());
    assert_eq!(core.checkpoint(), Some(&at));
}

#[test]
fn a_write_through_the_node_wakes_an_idle_change_stream() {
    let (mut core, out) = booted(4, Checkpoint { applied: Position(0), copy: CopyState::Done, copies: 0 });
    // The first (linearizable) view names this node in a syncing upgrade.
    let watch = watch_id(&out);
    let view = view(3, Phase::Syncing, Decision::Initial, false);
    // Late enough that a pace computed by multiplying times instead of adding them shows.
    let mut now = 100;
    let mut out = core.handle(now, DataInput::Coordinator { id: watch, response: NodeResponse::View(view) });
    // Step the stream until it reads nothing and goes idle.
    let read_at = loop {
        if out.iter().any(|o| matches!(o, DataOutput::Store(StoreOp::ReadChanges { .. }))) {
            core.handle(now, DataInput::Store(StoreResult::Changes(read(Vec::new(), Position(0)))));
            break now;
        }
        assert!(!out.iter().any(|o| matches!(o, DataOutput::Store(_))), "only the stream is read: {out:?}");
        assert!(now < 1_000, "the stream was never read");
        now = core.next_deadline_ms().expect("the stream has a next step").max(now);
        out = core.handle(now, DataInput::Timer);
    };
    let reads = |out: &[DataOutput]| out.iter().any(|o| matches!(o, DataOutput::Store(StoreOp::ReadChanges { .. })));
    let out = core.handle(read_at + INTERVAL_MS, DataInput::Timer);
    assert!(!reads(&out), "idle: the next read waits transform_idle_ms, not transform_interval_ms");
    let out = core.handle(read_at + IDLE_MS, DataInput::Timer);
    assert!(reads(&out), "idle: the stream is still read every transform_idle_ms");
    let read_at = read_at + IDLE_MS;
    core.handle(read_at, DataInput::Store(StoreResult::Changes(read(Vec::new(), Position(0)))));
    let out = core.handle(read_at + INTERVAL_MS, DataInput::Timer);
    // Regression: the idle pace held for one read only; the next empty read went back to
    // reading every transform_interval_ms.
    assert!(!reads(&out), "still idle");
    let (ran, out) = write(&mut core, read_at + INTERVAL_MS + 1, 1);
    assert!(ran);
    assert!(reads(&out), "a write seen here brings the stream back to the normal pace at once");
}

#[test]
fn after_the_commit_the_old_universe_is_no_longer_read() {
    let mut core = DataNodeCore::new(config(4));
    let committed = Decision::Commit(protocol::Epoch(1));
    let record = own_disk(committed);
    let checkpoint = Checkpoint { applied: Position(9), copy: CopyState::Done, copies: 0 };
    let out = core.handle(0, DataInput::Boot { record, checkpoint, old_fenced: true });
    let Some(DataOutput::Persist(booted)) = out.into_iter().find(|o| matches!(o, DataOutput::Persist(_))) else {
        panic!("a boot persists its record first")
    };
    let out = core.handle(0, DataInput::Persisted(booted));
    let watch = watch_id(&out);
    let view = view(9, Phase::Switched, committed, true);
    let mut out = core.handle(1, DataInput::Coordinator { id: watch, response: NodeResponse::View(view) });
    for now in (10..200).step_by(10) {
        let read = out.iter().find(|o| {
            matches!(
                o,
                DataOutput::Store(StoreOp::ReadChanges { .. } | StoreOp::OpenSnapshot | StoreOp::ReadSnapshot { .. })
            )
        });
        assert!(read.is_none(), "committed: the transform has nothing left to read, but {read:?}");
        out = core.handle(now, DataInput::Timer);
    }
}

#[test]
fn a_refused_batch_restarts_the_transform_from_the_stores_checkpoint_and_mirrors_go_on() {
    let (mut core, out) = booted(4, Checkpoint { applied: Position(0), copy: CopyState::Done, copies: 0 });
    let watch = watch_id(&out);
    let view = view(3, Phase::Syncing, Decision::Initial, false);
    let out = core.handle(1, DataInput::Coordinator { id: watch, response: NodeResponse::View(view) });
    assert!(out.iter().any(|o| matches!(o, DataOutput::Store(StoreOp::ReadChanges { .. }))));
    let row = [("id".to_string(), protocol::schema::Value::Int(1)), ("v".to_string(), protocol::schema::Value::Int(5))]
        .into_iter()
        .collect();
    let change = (Position(1), protocol::schema::RowOp::Upsert { table: "t".into(), key: 1, row });
    let out = core.handle(1, DataInput::Store(StoreResult::Changes(read(vec![change], Position(1)))));
    let Some(DataOutput::Store(StoreOp::Apply(batch))) =
        out.into_iter().find(|o| matches!(o, DataOutput::Store(StoreOp::Apply(_))))
    else {
        panic!("the change is applied")
    };
    // Something else moved the new store to position 1 (copy done): the batch is refused.
    let found = Checkpoint { applied: Position(1), copy: CopyState::Done, copies: 0 };
    let stale = node_core::store::StaleBatch { base: batch.base.clone(), found: found.clone() };
    core.handle(2, DataInput::Store(StoreResult::ApplyRefused(stale)));
    assert_eq!(core.checkpoint(), Some(&found), "the transform starts again from what the store holds");
    let mirror =
        core.handle(3, DataInput::Request { key: key(9), generation: Generation(2), mirror: true, read_only: true });
    assert!(
        mirror.iter().any(|o| matches!(o, DataOutput::Execute { mirror: true, .. })),
        "the copy is still complete in the store: mirrors run ({mirror:?})"
    );
}

#[test]
fn duplicates_of_a_running_request_share_its_answer_and_mirrors_take_reads_only() {
    let (mut core, _) = booted(4, Checkpoint { applied: Position(0), copy: CopyState::Done, copies: 0 });
    let request = |core: &mut DataNodeCore, id, universe, mirror, read_only| {
        core.handle(3, DataInput::Request { key: key(id), generation: generation_of(universe), mirror, read_only })
    };
    let executes = |out: &[DataOutput]| out.iter().filter(|o| matches!(o, DataOutput::Execute { .. })).count();
    let replies = |out: &[DataOutput]| out.iter().filter(|o| matches!(o, DataOutput::Reply { .. })).count();
    let out =
        core.handle(1, DataInput::Request { key: key(1), generation: Generation(1), mirror: false, read_only: false });
    assert_eq!((executes(&out), replies(&out)), (1, 0));
    for _ in 0..2 {
        let out = core
            .handle(1, DataInput::Request { key: key(1), generation: Generation(1), mirror: false, read_only: false });
        assert_eq!((executes(&out), replies(&out)), (0, 0), "a duplicate waits for the running request");
    }
    let out =
        core.handle(2, DataInput::Executed { key: key(1), universe: Universe::Old, mirror: false, answer: answer(1) });
    assert_eq!(replies(&out), 3, "the request and its two duplicates get one answer each");
    // A mirrored write is refused, and the refusal is not remembered for the key: the same
    // key sent as a real write runs.
    let out = request(&mut core, 2, Universe::New, true, false);
    assert!(out
        .iter()
        .any(|o| matches!(o, DataOutput::Reply { answer: StoreAnswer::Rejected { .. }, mirror: true, .. })));
    let out = request(&mut core, 2, Universe::Old, false, false);
    assert_eq!(executes(&out), 1, "the write itself runs");
}

#[test]
fn mirrors_wait_for_a_bulk_copy_complete_in_the_store() {
    for (copy, runs) in [(CopyState::Done, true), (CopyState::NotStarted, false)] {
        let (mut core, _) = booted(4, Checkpoint { applied: Position(0), copy: copy.clone(), copies: 0 });
        let out = core
            .handle(1, DataInput::Request { key: key(5), generation: Generation(2), mirror: true, read_only: true });
        let ran = out.iter().any(|o| matches!(o, DataOutput::Execute { mirror: true, .. }));
        assert_eq!(ran, runs, "booted on a copy {copy:?}: {out:?}");
    }
}

#[test]
fn a_busy_change_stream_is_read_every_transform_interval() {
    let (mut core, out) = booted(4, Checkpoint { applied: Position(0), copy: CopyState::Done, copies: 0 });
    let watch = watch_id(&out);
    let view = view(3, Phase::Syncing, Decision::Initial, false);
    let reads = |out: &[DataOutput]| out.iter().any(|o| matches!(o, DataOutput::Store(StoreOp::ReadChanges { .. })));
    let out = core.handle(100, DataInput::Coordinator { id: watch, response: NodeResponse::View(view) });
    assert!(reads(&out), "the first step reads the stream at once");
    let row = [("id".to_string(), protocol::schema::Value::Int(1)), ("v".to_string(), protocol::schema::Value::Int(5))]
        .into_iter()
        .collect();
    let change = (Position(1), protocol::schema::RowOp::Upsert { table: "t".into(), key: 1, row });
    let out = core.handle(101, DataInput::Store(StoreResult::Changes(read(vec![change], Position(1)))));
    assert!(out.iter().any(|o| matches!(o, DataOutput::Store(StoreOp::Apply(_)))));
    let out = core.handle(102, DataInput::Store(StoreResult::Applied));
    assert!(!reads(&out), "not before the interval");
    let out = core.handle(100 + INTERVAL_MS, DataInput::Timer);
    assert!(reads(&out), "the next read comes transform_interval_ms after the last step began");
}

/// Feeds `input`, then answers at once every persist, fence, row read, stage, opening of the
/// new store and removal of capture it leads to; returns every output seen.
fn settle(core: &mut DataNodeCore, now_ms: u64, input: DataInput) -> Vec<DataOutput> {
    let mut seen = Vec::new();
    let mut queue = std::collections::VecDeque::from([input]);
    while let Some(input) = queue.pop_front() {
        for output in core.handle(now_ms, input) {
            match &output {
                DataOutput::Persist(record) => queue.push_back(DataInput::Persisted(record.clone())),
                DataOutput::Store(StoreOp::Fence) => {
                    queue.push_back(DataInput::Store(StoreResult::Fenced { final_position: Position(9) }))
                }
                DataOutput::Store(StoreOp::ReadRows { .. }) => {
                    queue.push_back(DataInput::Store(StoreResult::Rows(node_core::store::Chunk {
                        rows: Vec::new(),
                        last: true,
                        position: Position(9),
                    })))
                }
                DataOutput::Store(StoreOp::Stage { .. }) => {
                    queue.push_back(DataInput::Store(StoreResult::Staged { rejected: 0 }))
                }
                DataOutput::Store(StoreOp::OpenNew) => queue.push_back(DataInput::Store(StoreResult::OpenedToClients)),
                DataOutput::Store(StoreOp::RemoveCapture) => {
                    queue.push_back(DataInput::Store(StoreResult::CaptureRemoved))
                }
                _ => {}
            }
            seen.push(output);
        }
    }
    seen
}

/// The property tests found this (a fixed case there): a node restarted on a freeze compares
/// the universes again; it learns the commit while the new side's checksum is being computed,
/// the new universe takes a client write, and the checksum includes it. That comparison is moot
/// (the outcome is known): it must not be reported as the universes differing.
#[test]
fn a_comparison_overtaken_by_the_commit_is_dropped_not_reported_as_a_difference() {
    let mut core = DataNodeCore::new(config(4));
    let freeze = Decision::Freeze(protocol::Epoch(1));
    let record = own_disk(freeze);
    let checkpoint = Checkpoint { applied: Position(9), copy: CopyState::Done, copies: 1 };
    let out = settle(&mut core, 0, DataInput::Boot { record, checkpoint, old_fenced: true });
    let watch = watch_id(&out);
    let frozen = view(5, Phase::Freezing, freeze, false);
    let out = settle(&mut core, 1, DataInput::Coordinator { id: watch, response: NodeResponse::View(frozen) });
    assert!(
        out.iter().any(|o| matches!(o, DataOutput::Store(StoreOp::CompareStaged))),
        "the restarted node compares the universes at the final position: {out:?}"
    );
    let watch = watch_id(&out);
    let committed = view(6, Phase::Switched, Decision::Commit(protocol::Epoch(1)), true);
    settle(&mut core, 2, DataInput::Coordinator { id: watch, response: NodeResponse::View(committed) });
    assert_eq!(core.accepting(), None, "the new store opens after the comparison in progress");
    let out = settle(&mut core, 3, DataInput::Store(StoreResult::Compared { expected: 1, actual: 12345 }));
    let reported = out.iter().find(|o| {
        matches!(
            o,
            DataOutput::Event(node_core::data_node::DataEvent::Compared { .. })
                | DataOutput::Send { request: NodeRequest::Ack { .. }, .. }
        )
    });
    assert!(reported.is_none(), "a moot comparison is reported: {reported:?}");
    let later = settle(&mut core, 10, DataInput::Timer);
    assert!(
        !later.iter().any(|o| matches!(o, DataOutput::Store(StoreOp::ReadRows { .. } | StoreOp::CompareStaged))),
        "and not started again: {later:?}"
    );
    assert!(later.contains(&DataOutput::Store(StoreOp::OpenNew)), "the store's next turn opens it: {later:?}");
    assert_eq!(core.accepting(), Some(Universe::New), "the commit opens the new universe");
}

/// A data node fences once every router the freeze needs told it directly that it is frozen,
/// without waiting for a view that shows all their acks (a round of consensus saved); a notice
/// of another epoch, or from a router the view does not name, does not count.
#[test]
fn a_data_node_fences_once_every_router_said_it_is_frozen() {
    let (mut core, out) = booted(4, Checkpoint { applied: Position(0), copy: CopyState::Done, copies: 1 });
    let watch = watch_id(&out);
    let freeze = Decision::Freeze(protocol::Epoch(2));
    let routers = vec![NodeName::from("router-1"), NodeName::from("router-2")];
    let frozen = DecisionView { routers: routers.clone(), ..view(5, Phase::Freezing, freeze, false) };
    let out = settle(&mut core, 1, DataInput::Coordinator { id: watch, response: NodeResponse::View(frozen) });
    let fenced = |out: &[DataOutput]| out.iter().any(|o| matches!(o, DataOutput::Store(StoreOp::Fence)));
    assert!(!fenced(&out), "no router said it is frozen yet: {out:?}");
    let notice = |router: &str, epoch: u64| DataInput::RouterFrozen {
        router: NodeName::from(router),
        epoch: protocol::Epoch(epoch),
    };
    assert!(!fenced(&settle(&mut core, 2, notice("router-1", 2))));
    assert!(!fenced(&settle(&mut core, 3, notice("router-2", 1))), "a notice of another epoch");
    assert!(!fenced(&settle(&mut core, 4, notice("intruder", 2))), "a router the freeze does not need");
    let out5 = settle(&mut core, 5, notice("router-2", 2));
    // The fence waits for a transform read still outstanding (one store operation at a time).
    let reading = out.iter().any(|o| matches!(o, DataOutput::Store(StoreOp::ReadChanges { .. })));
    let out = if reading {
        assert!(!fenced(&out5), "a second store operation while one is outstanding");
        settle(&mut core, 6, DataInput::Store(StoreResult::Changes(read(Vec::new(), Position(0)))));
        // A store operation that took time: the next one starts at the next timer, at once.
        assert_eq!(core.next_deadline_ms(), Some(6), "the shell gets a turn first");
        settle(&mut core, 6, DataInput::Timer)
    } else {
        out5
    };
    assert!(fenced(&out), "every router said it is frozen: {out:?}");
}

/// While the drain waits for the transform to reach the final position, the switch holds
/// clients: the stream is read again a millisecond after each step, not after the usual pause.
#[test]
fn a_draining_node_reads_the_change_stream_without_the_usual_pause() {
    let (mut core, out) = draining();
    let mut step_times = Vec::new();
    // Answer every store operation at once: the old store was fenced at position 3; each read
    // of the change stream returns one change.
    drive(
        &mut core,
        out,
        40,
        |now, op| {
            Some(match op {
                StoreOp::Fence => StoreResult::Fenced { final_position: Position(3) },
                StoreOp::ReadChanges { after, .. } => {
                    step_times.push(*now);
                    let next = after.0 + 1;
                    let changes = if next <= 3 { vec![(Position(next), row(next as i64))] } else { Vec::new() };
                    StoreResult::Changes(read(changes, Position(3)))
                }
                StoreOp::Apply(_) => StoreResult::Applied,
                StoreOp::Prune { .. } => StoreResult::Pruned,
                StoreOp::ReadRows { .. } => {
                    StoreResult::Rows(node_core::store::Chunk { rows: Vec::new(), last: true, position: Position(3) })
                }
                StoreOp::Stage { .. } => StoreResult::Staged { rejected: 0 },
                StoreOp::CompareStaged => return None,
                other => panic!("unexpected store operation {other:?}"),
            })
        },
        |_| {},
    );
    assert!(step_times.len() >= 3, "the stream was read {step_times:?}");
    let gaps: Vec<u64> = step_times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g <= 1),
        "steps while draining {step_times:?} (gaps {gaps:?}, the pause is {INTERVAL_MS} ms)"
    );
}

/// A node booted with its copy done that acted on a freeze every router is frozen for (it
/// fences and drains), and its outputs so far.
fn draining() -> (DataNodeCore, Vec<DataOutput>) {
    let (mut core, out) = booted(4, Checkpoint { applied: Position(0), copy: CopyState::Done, copies: 1 });
    let watch = watch_id(&out);
    let freeze = Decision::Freeze(protocol::Epoch(1));
    let frozen = DecisionView { all_routers_frozen: true, ..view(5, Phase::Freezing, freeze, false) };
    let out = core.handle(1, DataInput::Coordinator { id: watch, response: NodeResponse::View(frozen) });
    (core, out)
}

/// A row of the test table `t`.
/// A read of the change stream complete up to `last`, which is also the last captured.
fn read(changes: Vec<(Position, protocol::schema::RowOp)>, last: Position) -> node_core::store::ChangeRead {
    node_core::store::ChangeRead { changes, complete_to: last, captured: last }
}

fn row(k: i64) -> protocol::schema::RowOp {
    let row = [("id".to_string(), protocol::schema::Value::Int(k)), ("v".to_string(), protocol::schema::Value::Int(k))];
    protocol::schema::RowOp::Upsert { table: "t".into(), key: k, row: row.into_iter().collect() }
}

/// Drives `core` from its outputs `out` for at most `rounds`: records are durable at once,
/// timers fire at their deadlines, and each store operation is answered by `answer` (which may
/// move the clock; `None` ends the drive); `answered` sees what each answer led to.
fn drive(
    core: &mut DataNodeCore,
    mut out: Vec<DataOutput>,
    rounds: usize,
    mut answer: impl FnMut(&mut u64, StoreOp) -> Option<StoreResult>,
    mut answered: impl FnMut(&[DataOutput]),
) {
    let mut now = 1;
    for _ in 0..rounds {
        if let Some(DataOutput::Persist(record)) = out.iter().find(|o| matches!(o, DataOutput::Persist(_))) {
            let record = record.clone();
            let mut more = core.handle(now, DataInput::Persisted(record));
            out.retain(|o| !matches!(o, DataOutput::Persist(_)));
            out.append(&mut more);
            continue;
        }
        let Some(op) = out.iter().rev().find_map(|o| match o {
            DataOutput::Store(op) => Some(op.clone()),
            _ => None,
        }) else {
            now = core.next_deadline_ms().expect("a draining node has a next step").max(now);
            out = core.handle(now, DataInput::Timer);
            continue;
        };
        let Some(result) = answer(&mut now, op) else { return };
        out = core.handle(now, DataInput::Store(result));
        answered(&out);
    }
}

/// Hunt seed 17017428: a mirror delayed past the commit ran on a new universe that already took
/// client writes, under the checkpoint position it had at the freeze, so its answer "differed
/// at the same position". Once the new universe serves clients, mirrors are refused.
#[test]
fn a_mirror_after_the_commit_is_refused() {
    let mut core = DataNodeCore::new(config(4));
    let committed = Decision::Commit(protocol::Epoch(1));
    let record = own_disk(committed);
    let checkpoint = Checkpoint { applied: Position(9), copy: CopyState::Done, copies: 1 };
    let out = settle(&mut core, 0, DataInput::Boot { record, checkpoint, old_fenced: true });
    let watch = watch_id(&out);
    settle(
        &mut core,
        1,
        DataInput::Coordinator { id: watch, response: NodeResponse::View(view(9, Phase::Switched, committed, true)) },
    );
    assert_eq!(core.accepting(), Some(Universe::New));
    let out =
        core.handle(2, DataInput::Request { key: key(7), generation: Generation(2), mirror: true, read_only: true });
    assert!(
        matches!(&out[..], [DataOutput::Reply { mirror: true, answer: StoreAnswer::Rejected { reason }, .. }] if reason.contains("validation is over")),
        "{out:?}"
    );
}

/// The generation of `universe` for a node deployed for the first upgrade.
fn generation_of(universe: Universe) -> Generation {
    match universe {
        Universe::Old => Generation(1),
        Universe::New => Generation(2),
    }
}

/// A data node deployed for the upgrade from generation 2: its stores hold 2 and 3. The last
/// switch (of the upgrade from 1) is, for it, "nothing frozen yet": it serves generation 2 from
/// its old store; a request for generation 1 is refused with the reason; and it registers only
/// for an upgrade from 2.
#[test]
fn a_node_deployed_for_the_next_upgrade_serves_the_last_switch_from_its_old_store() {
    let mut config = config(8);
    config.agent.upgrade_from = Some(Generation(2));
    let mut core = DataNodeCore::new(config);
    let record = NodeRecord { generation: Generation(1), ..own_disk(Decision::Commit(protocol::Epoch(1))) };
    let out = core.handle(0, DataInput::Boot { record, checkpoint: Checkpoint::default(), old_fenced: false });
    let Some(DataOutput::Persist(record)) = out.into_iter().find(|o| matches!(o, DataOutput::Persist(_))) else {
        panic!("a boot persists its record first")
    };
    let out = core.handle(0, DataInput::Persisted(record));
    let watch = watch_id(&out);
    assert_eq!(core.accepting(), Some(Universe::Old), "its old store holds generation 2, which serves");

    let out =
        core.handle(1, DataInput::Request { key: key(1), generation: Generation(2), mirror: false, read_only: false });
    assert!(out.iter().any(|o| matches!(o, DataOutput::Execute { universe: Universe::Old, .. })), "{out:?}");
    let out =
        core.handle(1, DataInput::Request { key: key(2), generation: Generation(1), mirror: false, read_only: false });
    let refused = out.iter().any(|o| {
        matches!(o, DataOutput::Reply { answer: StoreAnswer::NotAdmitted { reason }, .. }
            if reason.contains("generation g1 is not held here (this node holds g2 and g3)"))
    });
    assert!(refused, "{out:?}");

    // The cluster still runs the upgrade from 1 (it has not ended): no registration.
    let old_upgrade = DecisionView {
        generation: Generation(1),
        upgrade_from: Some(Generation(1)),
        registered: false,
        ..view(5, Phase::Switched, Decision::Commit(protocol::Epoch(1)), false)
    };
    let out = core.handle(2, DataInput::Coordinator { id: watch, response: NodeResponse::View(old_upgrade) });
    let registers = |out: &[DataOutput]| {
        out.iter().any(|o| matches!(o, DataOutput::Send { request: NodeRequest::Register { .. }, .. }))
    };
    assert!(!registers(&out), "not its upgrade: {out:?}");
    let watch = watch_id(&out);
    let next = DecisionView {
        upgrade: Some(UpgradeId(2)),
        generation: Generation(1),
        upgrade_from: Some(Generation(2)),
        registered: false,
        ..view(6, Phase::Staged, Decision::Commit(protocol::Epoch(1)), false)
    };
    let out = core.handle(3, DataInput::Coordinator { id: watch, response: NodeResponse::View(next) });
    assert!(registers(&out), "its upgrade: {out:?}");
}

/// A write the fences keep out is not refused for good: a late copy of it would run once the
/// store reopens (the refusal lives only in memory), so the answer says "not admitted", which
/// the router tells the client as an unknown outcome, never as a failure.
#[test]
fn a_write_kept_out_by_a_fence_is_not_admitted_rather_than_refused() {
    let mut core = DataNodeCore::new(config(8));
    let out = core.handle(
        0,
        DataInput::Boot { record: NodeRecord::default(), checkpoint: Checkpoint::default(), old_fenced: true },
    );
    let Some(DataOutput::Persist(record)) = out.into_iter().find(|o| matches!(o, DataOutput::Persist(_))) else {
        panic!("a boot persists its record first")
    };
    core.handle(0, DataInput::Persisted(record));
    assert_eq!(core.accepting(), None, "restarted fenced: nothing is taken until a decision says");
    let out =
        core.handle(1, DataInput::Request { key: key(1), generation: Generation(1), mirror: false, read_only: false });
    assert!(
        out.iter()
            .any(|o| matches!(o, DataOutput::Reply { answer: StoreAnswer::NotAdmitted { .. }, mirror: false, .. })),
        "{out:?}"
    );
    assert!(!out.iter().any(|o| matches!(o, DataOutput::Execute { .. })));
}

/// Simulator seed 304: a draining node whose store answers late, and whose apply up to the
/// final position committed but answered with a failure. The node reads the new store's
/// checkpoint, and the drain learns from it that everything is applied (no later batch would
/// tell it); and each late answer leaves the shell a turn before the next operation (the
/// node read its stream back to back, starving its own timers, and never watched again).
#[test]
fn a_lost_apply_that_reached_the_final_position_still_drains_and_slow_answers_leave_turns() {
    let (mut core, out) = draining();
    let (mut failed_once, mut compared) = (false, false);
    drive(
        &mut core,
        out,
        60,
        |now, op| {
            // Every store operation answers 3 ms later.
            *now += 3;
            Some(match op {
                StoreOp::Fence => StoreResult::Fenced { final_position: Position(3) },
                StoreOp::ReadChanges { after, .. } => {
                    let changes = (after.0 + 1..=3).map(|p| (Position(p), row(p as i64))).collect();
                    StoreResult::Changes(read(changes, Position(3)))
                }
                StoreOp::Apply(batch) if batch.checkpoint.applied == Position(3) && !failed_once => {
                    failed_once = true;
                    StoreResult::Failed { reason: "the answer was lost (the commit happened)".into() }
                }
                StoreOp::Apply(_) => StoreResult::Applied,
                StoreOp::ReadCheckpoint => {
                    StoreResult::Checkpoint(Checkpoint { applied: Position(3), copy: CopyState::Done, copies: 1 })
                }
                StoreOp::Prune { .. } => StoreResult::Pruned,
                StoreOp::ReadRows { .. } => {
                    compared = true;
                    return None;
                }
                other => panic!("unexpected store operation {other:?}"),
            })
        },
        |out| {
            let chained = out.iter().any(|o| matches!(o, DataOutput::Store(op) if !matches!(op, StoreOp::Apply(_))));
            assert!(!chained, "a late answer must leave the shell a turn before the next operation: {out:?}");
        },
    );
    assert!(failed_once, "the apply up to the final position failed once");
    assert!(compared, "the drain went on to the comparison once the checkpoint showed position 3");
}

/// The plan's `[copy] rows_per_s_max`: after a chunk of `n` rows, the copy reads the next one
/// no sooner than `n / rate` seconds after the last began, so the old universe keeps serving.
#[test]
fn the_bulk_copy_keeps_to_the_plans_rows_per_second() {
    let config = DataNodeConfig { copy_rows_per_s_max: Some(1_000), ..config(4) };
    let (mut core, out) = booted_with(config, Checkpoint::default());
    let watch = watch_id(&out);
    let view = view(3, Phase::Syncing, Decision::Initial, false);
    let out = core.handle(100, DataInput::Coordinator { id: watch, response: NodeResponse::View(view) });
    assert!(out.iter().any(|o| matches!(o, DataOutput::Store(StoreOp::OpenSnapshot))));
    let snapshot = node_core::store::SnapshotId(1);
    let out = core.handle(100, DataInput::Store(StoreResult::SnapshotOpened { snapshot, at: Position(0), rows: 400 }));
    assert!(out.iter().any(|o| matches!(o, DataOutput::Store(StoreOp::Apply(_)))), "the copy's first batch");
    core.handle(100, DataInput::Store(StoreResult::Applied));
    let mut reads = Vec::new();
    let mut now = 100;
    for _ in 0..50 {
        if reads.len() == 3 {
            break;
        }
        now = core.next_deadline_ms().expect("a copy step is due").max(now);
        let out = core.handle(now, DataInput::Timer);
        if !out.iter().any(|o| matches!(o, DataOutput::Store(StoreOp::ReadSnapshot { .. }))) {
            continue;
        }
        let first = reads.len() as i64 * 200;
        reads.push(now);
        let rows = (first + 1..=first + 200)
            .map(|key| {
                let row = [("id".to_string(), protocol::schema::Value::Int(key))].into_iter().collect();
                ("t".to_string(), key, row)
            })
            .collect();
        let chunk = node_core::store::Chunk { rows, last: false, position: Position(0) };
        core.handle(now, DataInput::Store(StoreResult::Chunk(chunk)));
        core.handle(now, DataInput::Store(StoreResult::Applied));
    }
    assert_eq!(reads.len(), 3, "{reads:?}");
    let gaps: Vec<u64> = reads.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g >= 200), "200 rows at 1,000 rows/s: 200 ms apart at least, not {gaps:?}");
}

/// The new database refuses client writes until the switch commits (its guard), so the node
/// runs none before its store says it is open: not when drained, not when the commit is
/// learnt, only once the opening asked for at the commit succeeded (a failed one is asked
/// again after the pause). A request that comes meanwhile waits for the opening, as a write
/// waits on a database's lock, rather than failing for a window nobody chose (simulator seed 0
/// of `coordinators-down`: routers that learnt the commit first saw 45 requests kept out). A
/// restart on the committed disk opens the store again (idempotent).
#[test]
fn the_new_universe_is_admitted_only_once_its_store_is_open_after_the_commit() {
    let mut core = DataNodeCore::new(config(4));
    let committed = Decision::Commit(protocol::Epoch(1));
    let checkpoint = Checkpoint { applied: Position(9), copy: CopyState::Done, copies: 1 };
    let out = core.handle(0, DataInput::Boot { record: own_disk(committed), checkpoint, old_fenced: true });
    let Some(DataOutput::Persist(record)) = out.into_iter().find(|o| matches!(o, DataOutput::Persist(_))) else {
        panic!("a boot persists its record first")
    };
    let out = core.handle(0, DataInput::Persisted(record));
    assert!(out.contains(&DataOutput::Store(StoreOp::OpenNew)), "the commit on disk opens the new store: {out:?}");
    let watch = watch_id(&out);
    let view = NodeResponse::View(view(9, Phase::Switched, committed, true));
    core.handle(1, DataInput::Coordinator { id: watch, response: view });
    assert_eq!(core.accepting(), None, "not before the store says it is open");
    let request = |id| DataInput::Request { key: key(id), generation: Generation(2), mirror: false, read_only: false };
    let out = core.handle(2, request(1));
    assert!(out.is_empty(), "a write before the store is open waits: {out:?}");

    let out = core.handle(3, DataInput::Store(StoreResult::Failed { reason: "busy".into() }));
    assert!(!out.contains(&DataOutput::Store(StoreOp::OpenNew)), "not again at once: {out:?}");
    assert_eq!(core.accepting(), None);
    let mut asked = false;
    for now in 4..40 {
        let out = core.handle(now, DataInput::Timer);
        if out.contains(&DataOutput::Store(StoreOp::OpenNew)) {
            assert!(now >= 3 + 10, "asked again only after store_retry_ms, at {now}");
            asked = true;
            let out = core.handle(now, DataInput::Store(StoreResult::OpenedToClients));
            let run = DataOutput::Execute { key: key(1), universe: Universe::New, mirror: false };
            let remove = DataOutput::Store(StoreOp::RemoveCapture);
            let switched = |o: &DataOutput| {
                matches!(
                    o,
                    DataOutput::Send {
                        request: NodeRequest::Ack {
                            epoch: protocol::Epoch(1),
                            ack: protocol::messages::Ack::Switched,
                            ..
                        },
                        ..
                    }
                )
            };
            assert!(out.iter().any(switched), "the store open, the node acks Switched: {out:?}");
            let rest: Vec<_> = out.into_iter().filter(|o| !switched(o)).collect();
            assert_eq!(rest, vec![run, remove], "the waiting write runs once the store is open; capture goes next");
            break;
        }
    }
    assert!(asked, "a failed opening is asked again");
    assert_eq!(core.accepting(), Some(Universe::New));
    let out = core.handle(50, request(2));
    assert!(out.iter().any(|o| matches!(o, DataOutput::Execute { universe: Universe::New, .. })), "{out:?}");
}

/// A request for the new universe that waits for the store to open is kept out (not refused:
/// the outcome is unknown to its client) when the freeze aborts instead, duplicates included.
#[test]
fn a_request_waiting_for_the_new_store_is_kept_out_when_the_freeze_aborts() {
    let (mut core, mut out) = draining();
    let mut seen = Vec::new();
    let mut now = 1;
    // The drain runs to its ack: nothing more to stream, nothing to compare.
    for _ in 0..200 {
        let mut next = Vec::new();
        for o in std::mem::take(&mut out) {
            let result = match &o {
                DataOutput::Persist(record) => {
                    next.extend(core.handle(now, DataInput::Persisted(record.clone())));
                    None
                }
                DataOutput::Store(StoreOp::ReadChanges { .. }) => {
                    Some(StoreResult::Changes(read(Vec::new(), Position(0))))
                }
                DataOutput::Store(StoreOp::Fence) => Some(StoreResult::Fenced { final_position: Position(0) }),
                DataOutput::Store(StoreOp::ReadRows { .. }) => Some(StoreResult::Rows(node_core::store::Chunk {
                    rows: Vec::new(),
                    last: true,
                    position: Position(0),
                })),
                DataOutput::Store(StoreOp::Stage { .. }) => Some(StoreResult::Staged { rejected: 0 }),
                DataOutput::Store(StoreOp::CompareStaged) => Some(StoreResult::Compared { expected: 0, actual: 0 }),
                DataOutput::Store(StoreOp::HoldWriters) => Some(StoreResult::WritersHeld),
                _ => None,
            };
            if let Some(result) = result {
                next.extend(core.handle(now, DataInput::Store(result)));
            }
            seen.push(o);
        }
        if seen.iter().any(|o| matches!(o, DataOutput::Event(node_core::data_node::DataEvent::Drained { .. }))) {
            break;
        }
        if next.is_empty() {
            now = core.next_deadline_ms().expect("a draining node has a next step").max(now);
            next = core.handle(now, DataInput::Timer);
        }
        out = next;
    }
    assert!(
        seen.iter().any(|o| matches!(o, DataOutput::Event(node_core::data_node::DataEvent::Drained { .. }))),
        "the drain acked: {seen:?}"
    );
    let request = DataInput::Request { key: key(5), generation: Generation(2), mirror: false, read_only: false };
    assert!(core.handle(now, request.clone()).is_empty(), "drained, not open: the request waits");
    assert!(core.handle(now, request).is_empty(), "its duplicate waits with it");

    let watch = seen
        .iter()
        .rev()
        .find_map(|o| match o {
            DataOutput::Send { id, request: NodeRequest::Watch { .. }, .. } => Some(*id),
            _ => None,
        })
        .expect("the agent watches");
    let aborted = view(9, Phase::Syncing, Decision::Abort(protocol::Epoch(1)), false);
    let out = settle(&mut core, now, DataInput::Coordinator { id: watch, response: NodeResponse::View(aborted) });
    assert_eq!(core.accepting(), Some(Universe::Old), "the abort unfenced the old store: {out:?}");
    let kept_out = out
        .iter()
        .filter(|o| {
            matches!(o, DataOutput::Reply { key: k, mirror: false, answer: StoreAnswer::NotAdmitted { .. } } if *k == key(5))
        })
        .count();
    assert_eq!(kept_out, 2, "the request and its duplicate are kept out: {out:?}");
    assert!(!out.iter().any(|o| matches!(o, DataOutput::Execute { .. })), "nothing ran: {out:?}");
    // The new store's writers, held since the drain (before its ack), are let go after the
    // unfence: the guard refuses them again.
    let held = seen.iter().position(|o| *o == DataOutput::Store(StoreOp::HoldWriters));
    let acked = seen.iter().position(|o| matches!(o, DataOutput::Send { request: NodeRequest::Ack { .. }, .. }));
    assert!(held.is_some() && acked.is_some() && held < acked, "writers held before the ack: {seen:?}");
    assert!(out.contains(&DataOutput::Store(StoreOp::Unfence)), "{out:?}");
    let out = core.handle(now, DataInput::Store(StoreResult::Unfenced));
    assert!(out.contains(&DataOutput::Store(StoreOp::ReleaseWriters)), "held writers are released: {out:?}");
}

/// The copy's end is told once, by the batch that finishes it, not by every stream batch after
/// it (the first data nodes on PostgreSQL logged "bulk copy done" after each batch). With
/// positions that have gaps (PostgreSQL's LSNs), a read complete up to a position with nothing
/// to apply there (the fence's marker) moves the checkpoint to it in a batch of its own, so a
/// drain whose final position is such a marker ends.
#[test]
fn the_copy_ends_once_and_ordered_reads_move_the_checkpoint_past_empty_positions() {
    let config = DataNodeConfig { positions: node_core::duties::transform::Positions::Ordered, ..config(4) };
    let (mut core, out) = booted_with(config, Checkpoint::default());
    let watch = watch_id(&out);
    let view = view(3, Phase::Syncing, Decision::Initial, false);
    let out = core.handle(1, DataInput::Coordinator { id: watch, response: NodeResponse::View(view) });
    let mut done_events = 0;
    let mut applied = Vec::new();
    let mut reads = 0;
    drive(
        &mut core,
        out,
        200,
        |now, op| {
            *now += 10;
            Some(match op {
                StoreOp::OpenSnapshot => StoreResult::SnapshotOpened {
                    snapshot: node_core::store::SnapshotId(1),
                    at: Position(100),
                    rows: 1,
                },
                StoreOp::ReadSnapshot { .. } => {
                    let (table, key, row) = match row(1) {
                        protocol::schema::RowOp::Upsert { table, key, row } => (table, key, row),
                        protocol::schema::RowOp::Delete { .. } => unreachable!(),
                    };
                    StoreResult::Chunk(node_core::store::Chunk {
                        rows: vec![(table, key, row)],
                        last: true,
                        position: Position(100),
                    })
                }
                StoreOp::ReadChanges { after, .. } => {
                    reads += 1;
                    match reads {
                        // A transaction at 140, then a read complete up to 190 with nothing to
                        // apply (a marker), then nothing new.
                        1 => StoreResult::Changes(read(vec![(Position(140), row(2))], Position(140))),
                        2 => StoreResult::Changes(read(vec![], Position(190))),
                        _ => StoreResult::Changes(read(vec![], after)),
                    }
                }
                StoreOp::Apply(batch) => {
                    applied.push((batch.ops.len(), batch.checkpoint.applied, batch.checkpoint.copy.clone()));
                    StoreResult::Applied
                }
                StoreOp::Prune { .. } => StoreResult::Pruned,
                _ => return None,
            })
        },
        |out| {
            done_events += out.iter().filter(|o| matches!(o, DataOutput::Event(DataEvent::CopyDone { .. }))).count();
        },
    );
    assert!(reads >= 4, "the stream was read on: {reads}");
    let stream: Vec<(usize, Position)> =
        applied.iter().filter(|(_, _, c)| *c == CopyState::Done).map(|(n, p, _)| (*n, *p)).collect();
    assert_eq!(stream, vec![(1, Position(100)), (1, Position(140)), (0, Position(190))], "{applied:?}");
    assert_eq!(done_events, 1, "the copy's end is told once");
    assert_eq!(core.checkpoint().map(|c| c.applied), Some(Position(190)));
}

/// A change the store cannot say row by row (PostgreSQL's `TRUNCATE`) makes the copy start
/// again from a fresh snapshot: its first batch empties the new universe on top of the current
/// checkpoint (compare-and-set, so a crash before it meets the same change again), and the
/// stream goes on after the new snapshot's position.
#[test]
fn a_change_that_is_not_rows_makes_the_copy_start_again() {
    let done = Checkpoint { applied: Position(100), copy: CopyState::Done, copies: 1 };
    let (mut core, mut out) = booted(4, done.clone());
    let watch = watch_id(&out);
    let view = view(3, Phase::Syncing, Decision::Initial, false);
    // The boot's own store operation (a prune up to the checkpoint) is answered first.
    out.retain(|o| matches!(o, DataOutput::Store(_)));
    out.extend(core.handle(1, DataInput::Coordinator { id: watch, response: NodeResponse::View(view) }));
    let (mut reads, mut snapshots) = (0, 0);
    let mut batches = Vec::new();
    let mut events = Vec::new();
    drive(
        &mut core,
        out,
        200,
        |now, op| {
            *now += 10;
            Some(match op {
                StoreOp::ReadChanges { after, .. } => {
                    reads += 1;
                    match reads {
                        1 => StoreResult::CopyAgain { reason: "TRUNCATE of table t".into() },
                        _ => StoreResult::Changes(read(Vec::new(), after)),
                    }
                }
                StoreOp::OpenSnapshot => {
                    snapshots += 1;
                    StoreResult::SnapshotOpened {
                        snapshot: node_core::store::SnapshotId(7),
                        at: Position(150),
                        rows: 1,
                    }
                }
                StoreOp::ReadSnapshot { .. } => {
                    let protocol::schema::RowOp::Upsert { table, key, row } = row(5) else { unreachable!() };
                    StoreResult::Chunk(node_core::store::Chunk {
                        rows: vec![(table, key, row)],
                        last: true,
                        position: Position(150),
                    })
                }
                StoreOp::Apply(batch) => {
                    batches.push(batch);
                    StoreResult::Applied
                }
                StoreOp::Prune { .. } => StoreResult::Pruned,
                other => panic!("unexpected {other:?}"),
            })
        },
        |out| {
            events.extend(out.iter().filter_map(|o| match o {
                DataOutput::Event(
                    e @ (DataEvent::CopyAgain { .. } | DataEvent::CopyStarted { .. } | DataEvent::CopyDone { .. }),
                ) => Some(e.clone()),
                _ => None,
            }))
        },
    );
    assert_eq!(snapshots, 1, "one new copy; reads {reads}, events {events:?}, batches {batches:?}");
    assert!(
        matches!(&events[..], [DataEvent::CopyAgain { .. }, DataEvent::CopyStarted { .. }, DataEvent::CopyDone { .. }]),
        "{events:?}"
    );
    let first = &batches[0];
    assert!(
        first.reset && first.base == done,
        "the new copy empties the new universe on top of the checkpoint: {first:?}"
    );
    assert_eq!(first.checkpoint.copies, 2);
    assert_eq!(batches[1].checkpoint, Checkpoint { applied: Position(150), copy: CopyState::Done, copies: 2 });
    assert!(reads >= 2, "the stream goes on after the new copy");
    assert_eq!(core.checkpoint().map(|c| c.applied), Some(Position(150)));
}

/// Answers every persist and store operation in `out`, and those they lead to, at `now_ms`
/// with `answer`; returns every output seen, in order.
fn answer_all(
    core: &mut DataNodeCore,
    now_ms: u64,
    out: Vec<DataOutput>,
    answer: &mut impl FnMut(&StoreOp) -> StoreResult,
) -> Vec<DataOutput> {
    let mut seen = Vec::new();
    let mut queue = std::collections::VecDeque::from(out);
    while let Some(output) = queue.pop_front() {
        let input = match &output {
            DataOutput::Persist(record) => Some(DataInput::Persisted(record.clone())),
            DataOutput::Store(op) => Some(DataInput::Store(answer(op))),
            _ => None,
        };
        seen.push(output);
        if let Some(input) = input {
            queue.extend(core.handle(now_ms, input));
        }
    }
    seen
}

/// The id of the last watch among `seen`.
fn last_watch(seen: &[DataOutput]) -> u64 {
    seen.iter()
        .rev()
        .find_map(|o| match o {
            DataOutput::Send { id, request: NodeRequest::Watch { .. }, .. } => Some(*id),
            _ => None,
        })
        .expect("the agent keeps a watch")
}

/// A rolled-back upgrade ends the transform: the node writes a checkpoint that says no copy
/// holds (so nothing resumes on the capture), then removes the capture — only once it has acted
/// on the abort. A later upgrade from the same generation, on the same running node, copies
/// afresh; the store numbers its changes anew once capture is back (SQLite's change table
/// starts again), and the drain must count from the new copy, not from the 800 applied before.
#[test]
fn a_rolled_back_upgrade_is_abandoned_and_the_next_copies_afresh_counting_positions_anew() {
    let (mut core, out) = booted(4, Checkpoint { applied: Position(800), copy: CopyState::Done, copies: 1 });
    let watch = watch_id(&out);
    let abandoned_ops = std::cell::RefCell::new(Vec::new());
    let mut abandon = |op: &StoreOp| {
        if let StoreOp::Prune { .. } = op {
            // What the checkpoint says applied, before any view.
            return StoreResult::Pruned;
        }
        abandoned_ops.borrow_mut().push(op.clone());
        match op {
            StoreOp::Unfence => StoreResult::Unfenced,
            StoreOp::Apply(_) => StoreResult::Applied,
            StoreOp::RemoveCapture => StoreResult::CaptureRemoved,
            other => panic!("nothing but the abort and the abandonment runs for a rolled-back upgrade: {other:?}"),
        }
    };
    let mut seen = answer_all(&mut core, 0, out, &mut abandon);
    let rolled_back = view(5, Phase::RolledBack, Decision::Abort(protocol::Epoch(1)), false);
    let out = core.handle(1, DataInput::Coordinator { id: watch, response: NodeResponse::View(rolled_back) });
    seen.extend(answer_all(&mut core, 1, out, &mut abandon));
    for now in 2..200 {
        let out = core.handle(now, DataInput::Timer);
        seen.extend(answer_all(&mut core, now, out, &mut abandon));
    }
    let abandoned = Checkpoint { applied: Position(0), copy: CopyState::NotStarted, copies: 2 };
    let ops = abandoned_ops.take();
    assert_eq!(ops.len(), 3, "{ops:?}");
    assert_eq!(ops[0], StoreOp::Unfence, "the abort is acted on first");
    let StoreOp::Apply(batch) = &ops[1] else { panic!("the checkpoint goes before the capture: {ops:?}") };
    assert_eq!(batch.base, Checkpoint { applied: Position(800), copy: CopyState::Done, copies: 1 });
    assert_eq!((&batch.checkpoint, batch.ops.is_empty(), batch.reset), (&abandoned, true, true));
    assert_eq!(ops[2], StoreOp::RemoveCapture);
    assert_eq!(core.checkpoint(), Some(&abandoned));
    assert!(seen.contains(&DataOutput::Event(DataEvent::Abandoned { upgrade: UpgradeId(1) })));

    // The next upgrade from generation 1: the store's change log starts again at 1.
    let captured = std::cell::Cell::new(0u64);
    let mut store = |op: &StoreOp| match op {
        StoreOp::OpenSnapshot => {
            StoreResult::SnapshotOpened { snapshot: node_core::store::SnapshotId(1), at: Position(0), rows: 0 }
        }
        StoreOp::ReadSnapshot { .. } => {
            StoreResult::Chunk(node_core::store::Chunk { rows: Vec::new(), last: true, position: Position(0) })
        }
        StoreOp::Apply(_) => StoreResult::Applied,
        StoreOp::ReadChanges { after, .. } => {
            let last = Position(captured.get());
            let changes = (after.0 + 1..=last.0).map(|p| (Position(p), row(p as i64))).collect();
            StoreResult::Changes(read(changes, last))
        }
        StoreOp::Prune { .. } => StoreResult::Pruned,
        StoreOp::Fence => {
            captured.set(3);
            StoreResult::Fenced { final_position: Position(3) }
        }
        StoreOp::ReadRows { .. } => {
            StoreResult::Rows(node_core::store::Chunk { rows: Vec::new(), last: true, position: Position(3) })
        }
        StoreOp::Stage { .. } => StoreResult::Staged { rejected: 0 },
        StoreOp::CompareStaged => StoreResult::Compared { expected: 0, actual: 0 },
        StoreOp::HoldWriters => StoreResult::WritersHeld,
        StoreOp::Unfence => StoreResult::Unfenced,
        other => panic!("not asked for here: {other:?}"),
    };
    let next = DecisionView {
        upgrade: Some(UpgradeId(2)),
        ..view(6, Phase::Syncing, Decision::Abort(protocol::Epoch(1)), false)
    };
    let out = core.handle(200, DataInput::Coordinator { id: last_watch(&seen), response: NodeResponse::View(next) });
    let mut seen = answer_all(&mut core, 200, out, &mut store);
    let mut now = 200;
    while !seen.contains(&DataOutput::Event(DataEvent::CopyDone { copied_rows: 0 })) {
        assert!(now < 400, "the next upgrade's copy ends");
        now += 1;
        let out = core.handle(now, DataInput::Timer);
        seen.extend(answer_all(&mut core, now, out, &mut store));
    }
    let freeze = DecisionView {
        upgrade: Some(UpgradeId(2)),
        all_routers_frozen: true,
        ..view(7, Phase::Freezing, Decision::Freeze(protocol::Epoch(2)), false)
    };
    let out = core.handle(now, DataInput::Coordinator { id: last_watch(&seen), response: NodeResponse::View(freeze) });
    seen.extend(answer_all(&mut core, now, out, &mut store));
    let drained =
        |seen: &[DataOutput]| seen.iter().position(|o| matches!(o, DataOutput::Event(DataEvent::Drained { .. })));
    while drained(&seen).is_none() {
        assert!(now < 600, "the node drains");
        now += 1;
        let out = core.handle(now, DataInput::Timer);
        seen.extend(answer_all(&mut core, now, out, &mut store));
    }
    let applied_final = seen.iter().position(
        |o| matches!(o, DataOutput::Store(StoreOp::Apply(b)) if b.checkpoint.applied == Position(3) && !b.ops.is_empty()),
    );
    assert!(
        applied_final.is_some_and(|i| Some(i) < drained(&seen)),
        "the drain waits for the changes up to the final position 3 to be applied: {seen:#?}"
    );
    assert!(seen.contains(&DataOutput::Event(DataEvent::Drained {
        epoch: protocol::Epoch(2),
        final_position: Position(3),
        checksum_match: true
    })));
}
