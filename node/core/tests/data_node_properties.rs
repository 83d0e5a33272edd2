//! Property tests of the data-node composition core ([`DataNodeCore`]), driven the way a shell
//! must drive it (the driving rules at the top of `node/core/src/data_node.rs`):
//!
//! - `now_ms` never decreases, and time only jumps to `min(now + wait, next_deadline_ms())`,
//!   where a `Timer` is fed;
//! - every output is applied in order; a `Persist(record)` is written to the (simulated) disk and
//!   answered by `Persisted(record)` right after the batch, before any other input;
//! - every `Store(op)` is performed on two [`MemStore`]s (old and new) through the
//!   [`OldStore`]/[`NewStore`] traits and answered by its `Store(result)`, at once (right after
//!   the batch) or a few steps later; clients write to the old store with
//!   [`MemStore::write_captured`] (directly, and through the requests the core lets through);
//! - coordinator requests are answered (or dropped, or answered `NotLeader`) by a model of the
//!   coordinator whose committed history is legal: `Initial`, `Freeze(e1)` (once the bulk copy
//!   is reported done), then `Commit(e1)` (only after every router is frozen and this node
//!   acked `Drained` with matching checksums) or `Abort(e1)`, then `Freeze(e2)`... A replica may
//!   lag (never behind a view already shown to this node) or, in robust cases, be stale (behind
//!   one already shown: the core must ignore it). A linearizable watch gets the newest view or
//!   nothing;
//! - routers send the new universe client requests only once `Commit` is committed; the
//!   process crashes at random (an outstanding store operation may or may not have happened)
//!   and restarts from its disk record, the new store's checkpoint and the old store's fence;
//!   the old store's connection drops at random (its snapshots die).
//!
//! Every output of every step is checked against the rules of the data node.

// The package is `imago-node-core`; the workspace knows it as `node_core`.
extern crate imago_node_core as node_core;

use node_core::agent::AgentConfig;
use node_core::data_node::{DataEvent, DataInput, DataNodeConfig, DataNodeCore, DataOutput, StoreOp, StoreResult};
use node_core::duties::transform::CopyState;
use node_core::store::{MemStore, NewStore, OldStore};
use node_core::{NodeRecord, RequestKey, StoreAnswer};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use protocol::messages::{Ack, DecisionView, NodeRequest, NodeResponse, Phase};
use protocol::schema::{Mapping, Row, RowOp, Schema, TableSchema, Transform, Value};
use protocol::{Decision, Duty, Epoch, Generation, NodeName, Position, Universe, UpgradeId};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Longest jump of time in one step (the core's deadlines cut it short).
const WAIT_MAX_MS: u64 = 30;
const REPLICAS: [u64; 3] = [1, 2, 3];
/// Client rows use keys 1..=KEYS (the bulk of a large table lies beyond them).
const KEYS: i64 = 8;

/// One table `t(id, v)`; the upgrade renames `v` to `w`.
fn mapping() -> Mapping {
    let mut tables = BTreeMap::new();
    tables.insert("t".to_string(), TableSchema { key: "id".into(), columns: vec!["id".into(), "v".into()] });
    let transforms = vec![Transform::RenameColumn { table: "t".into(), from: "v".into(), to: "w".into() }];
    Mapping::compile(&Schema { tables }, &transforms).expect("the rename fits the schema")
}

/// The data node's settings; the old store's change log is pruned once more than
/// `change_log_applied_max` applied changes are kept.
fn config(change_log_applied_max: u64) -> DataNodeConfig {
    DataNodeConfig {
        agent: AgentConfig {
            node: NodeName::from("data-1"),
            duties: vec![Duty::Capture, Duty::Transform, Duty::Validate],
            replicas: REPLICAS.to_vec(),
            request_timeout_ms: 20,
            watch_wait_ms: 20,
            report_interval_ms: 10,
            stale_watch_limit: 3,
            upgrade_from: Some(Generation::GENESIS),
        },
        transform_interval_ms: 5,
        transform_idle_ms: 20,
        store_retry_ms: 7,
        positions: Default::default(),
        copy_rows_per_s_max: None,
        copy_chunk_rows: node_core::duties::transform::COPY_CHUNK_ROWS,
        compare_chunk_rows: node_core::data_node::COMPARE_CHUNK_ROWS,
        range_rows: None,
        range_again_ms: 10,
        answers_max: 4,
        change_log_applied_max,
    }
}

fn row(key: i64, column: &str, value: i64) -> Row {
    [("id".to_string(), Value::Int(key)), (column.to_string(), Value::Int(value))].into_iter().collect()
}

/// A client write in the old (`v`) or new (`w`) schema.
fn client_op(column: &str, key: u8, value: u8, delete: bool) -> RowOp {
    let key = i64::from(key) % KEYS + 1;
    if delete {
        RowOp::Delete { table: "t".into(), key }
    } else {
        RowOp::Upsert { table: "t".into(), key, row: row(key, column, i64::from(value)) }
    }
}

/// Performs one store operation, as a shell does, through the data-store interface.
fn perform(old: &mut impl OldStore, new: &mut impl NewStore, op: &StoreOp) -> StoreResult {
    node_core::data_node::perform(old, new, op.clone())
}

/// SplitMix64: the few per-output choices (answer a store operation at once or later).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// The coordinator's replicated state as this data node sees it, and every state it went
/// through (a lagging replica answers from an older one).
struct Coordinator {
    phase: Phase,
    decision: Decision,
    registered: bool,
    /// Every router acked `Frozen` for the current epoch (routers are not simulated).
    routers_frozen: bool,
    /// This node's last recorded `Drained` ack: epoch and checksum verdict.
    drained: Option<(Epoch, bool)>,
    /// This node's last recorded `Switched` ack (its new store open after the commit).
    switched: Option<Epoch>,
    /// This node reported its bulk copy done (the ready gate's part that concerns it).
    bulk_done: bool,
    /// Every committed state, oldest first (`states[i].version == i + 1`).
    states: Vec<DecisionView>,
    /// The newest state shown to this node.
    shown: usize,
}

impl Coordinator {
    fn new() -> Self {
        let mut c = Coordinator {
            phase: Phase::Staged,
            decision: Decision::Initial,
            registered: false,
            routers_frozen: false,
            drained: None,
            switched: None,
            bulk_done: false,
            states: Vec::new(),
            shown: 0,
        };
        c.publish();
        c
    }

    fn all_routers_frozen(&self) -> bool {
        self.phase == Phase::Freezing && self.routers_frozen
    }

    fn view(&self, version: u64) -> DecisionView {
        let epoch = self.decision.epoch();
        DecisionView {
            version,
            upgrade: Some(UpgradeId(1)),
            phase: Some(self.phase),
            decision: self.decision,
            generation: protocol::Generation::GENESIS,
            upgrade_from: Some(protocol::Generation::GENESIS),
            known: true,
            registered: self.registered,
            all_routers_frozen: self.all_routers_frozen(),
            acked_frozen: false,
            acked_drained: self.drained.is_some_and(|(e, _)| e == epoch) && epoch != Epoch(0),
            acked_switched: self.switched == Some(epoch) && epoch != Epoch(0),
            roster: protocol::messages::RosterStatus::Active,
            routers: Vec::new(),
            universes: Vec::new(),
            rules: None,
            recovering: false,
            disk_recorded: false,
        }
    }

    /// Records the current state if it changed (a new version).
    fn publish(&mut self) {
        let next = self.view(self.states.len() as u64 + 1);
        let changed =
            self.states.last().is_none_or(|last| DecisionView { version: next.version, ..last.clone() } != next);
        if changed {
            self.states.push(next);
        }
    }

    /// Commits the next step of the upgrade if it is legal (`k` picks which).
    fn advance(&mut self, k: u8) {
        match (self.phase, self.decision) {
            (Phase::Syncing, d) if self.bulk_done => {
                self.decision = Decision::Freeze(Epoch(d.epoch().0 + 1));
                self.phase = Phase::Freezing;
                self.routers_frozen = false;
            }
            (Phase::Freezing, Decision::Freeze(e)) => match k % 16 {
                0..=7 => self.routers_frozen = true,
                8..=13 if self.routers_frozen && self.drained == Some((e, true)) => {
                    self.decision = Decision::Commit(e);
                    self.phase = Phase::Switched;
                }
                13 | 14 => {
                    self.decision = Decision::Abort(e);
                    self.phase = Phase::Syncing;
                }
                15 => {
                    self.decision = Decision::Abort(e);
                    self.phase = Phase::RolledBack;
                }
                _ => {}
            },
            // Every router acked `Switched` (routers are not simulated), and so did this node.
            (Phase::Switched, Decision::Commit(e)) if self.switched == Some(e) => self.phase = Phase::Done,
            _ => {}
        }
        self.publish();
    }

    /// Applies a write if the state machine would accept it.
    fn write(&mut self, request: &NodeRequest) -> bool {
        let accepted = match request {
            // This model coordinator never loses its state.
            NodeRequest::Recover { .. } => false,
            NodeRequest::Register { .. } => {
                self.registered = true;
                if self.phase == Phase::Staged {
                    self.phase = Phase::Syncing;
                }
                true
            }
            NodeRequest::Report { report, .. } => {
                self.bulk_done |= report.bulk_done;
                true
            }
            NodeRequest::Ack { epoch, ack: Ack::Drained { checksum_match, .. }, .. } => {
                let ok = *epoch == self.decision.epoch() && self.all_routers_frozen();
                if ok {
                    self.drained = Some((*epoch, *checksum_match));
                }
                ok
            }
            NodeRequest::Ack { epoch, ack: Ack::Switched, .. } => {
                let ok = self.decision == Decision::Commit(*epoch);
                if ok {
                    self.switched = Some(*epoch);
                }
                ok
            }
            NodeRequest::Ack { .. } => false,
            NodeRequest::Watch { .. } => unreachable!("a watch is not a write"),
        };
        self.publish();
        accepted
    }

    /// The view a replica answers a watch with: the newest for a linearizable read; otherwise
    /// `lag` states behind the newest but never older than one already shown, or (`stale`) an
    /// older one than that.
    fn watch(&mut self, linearizable: bool, lag: u8, stale: bool) -> DecisionView {
        let newest = self.states.len() - 1;
        let i = if linearizable {
            newest
        } else if stale && self.shown > 0 {
            self.shown - 1 - (lag as usize % self.shown)
        } else {
            newest - (lag as usize).min(newest - self.shown)
        };
        self.shown = self.shown.max(i);
        self.states[i].clone()
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// A client request arrives (`kind` picks universe, mirror and read-only).
    Request { origin: u8, id: u8, kind: u8 },
    /// A request the core let through is run on its store (`ok`: the store answers; else it
    /// refuses); writes write `key`.
    Executed { pick: usize, ok: bool, key: u8, value: u8, delete: bool },
    /// A client write lands on the old store (refused while it is fenced).
    ClientWrite { key: u8, value: u8, delete: bool },
    /// The outstanding store operation finishes.
    StoreDone,
    /// A coordinator request is answered (`action` 0..=4, and 5 for a linearizable watch), taken
    /// into account with its answer lost (5, writes), lost (6), or refused with `NotLeader` (7;
    /// a linearizable watch is then lost instead).
    Coordinator { pick: usize, action: u8, lag: u8, stale: bool },
    /// The coordinator commits its next step (if one is legal).
    Advance(u8),
    /// An early timer (allowed: at or before the deadline).
    Timer,
    /// Time passes, up to the next deadline, then a timer.
    Wait(u64),
    /// The old store's connection drops: its snapshots die.
    Disconnect,
    /// The process crashes (an outstanding store operation happened or not) and restarts.
    Crash { performed: bool },
    /// The outstanding store operation fails (busy, an I/O error), after it happened or not
    /// (a commit whose answer was lost).
    StoreFailed { performed: bool },
}

/// How many states behind the newest a replica answers from (mostly none).
fn lag() -> impl Strategy<Value = u8> {
    prop_oneof![6 => Just(0u8), 1 => Just(1), 1 => Just(2)]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (any::<u8>(), any::<u8>(), 0u8..16).prop_map(|(origin, id, kind)| Step::Request { origin, id, kind }),
        6 => (0usize..8, prop::bool::weighted(0.85), any::<u8>(), any::<u8>(), prop::bool::weighted(0.2))
            .prop_map(|(pick, ok, key, value, delete)| Step::Executed { pick, ok, key, value, delete }),
        3 => (any::<u8>(), any::<u8>(), prop::bool::weighted(0.2))
            .prop_map(|(key, value, delete)| Step::ClientWrite { key, value, delete }),
        8 => Just(Step::StoreDone),
        30 => (0usize..4, 0u8..8, lag(), prop::bool::weighted(0.3))
            .prop_map(|(pick, action, lag, stale)| Step::Coordinator { pick, action, lag, stale }),
        6 => any::<u8>().prop_map(Step::Advance),
        1 => Just(Step::Timer),
        14 => (1u64..=WAIT_MAX_MS).prop_map(Step::Wait),
        1 => Just(Step::Disconnect),
        1 => any::<bool>().prop_map(|performed| Step::Crash { performed }),
        1 => any::<bool>().prop_map(|performed| Step::StoreFailed { performed }),
    ]
}

/// How often each interesting situation came up (to prove the properties are not vacuous).
#[derive(Debug, Default)]
struct Coverage {
    acted_freeze: u64,
    acted_commit: u64,
    acted_abort: u64,
    fences: u64,
    fences_recovering: u64,
    drained: u64,
    compared: u64,
    copy_restarts: u64,
    prunes: u64,
    snapshots_gone: u64,
    store_failures: u64,
    copy_progress: u64,
    ranges_matched: u64,
    applies: u64,
    executed_old: u64,
    executed_new: u64,
    executed_mirrors: u64,
    duplicates: u64,
    stale_views: u64,
    crashes: u64,
    abandoned: u64,
    switched_acks: u64,
}

struct Shell<'a> {
    /// Makes a fresh core (at every boot).
    make_core: fn(DataNodeConfig) -> DataNodeCore,
    config: DataNodeConfig,
    core: DataNodeCore,
    now: u64,
    disk: NodeRecord,
    old: MemStore,
    new: MemStore,
    coordinator: Coordinator,
    /// Whether replicas may answer with views older than one already shown.
    robust: bool,
    rng: Rng,
    /// Percent of store operations answered right after their batch (the others later).
    at_once_pct: u64,
    // The shell's work in flight (lost with the process).
    /// Coordinator requests: id, request, deadline.
    sends: Vec<(u64, NodeRequest, u64)>,
    /// The outstanding store operation.
    op: Option<StoreOp>,
    /// Requests let through and not yet run: key, universe, mirror, read-only.
    executes: Vec<(RequestKey, Universe, bool, bool)>,
    /// Requests and replies per (key, mirror).
    requests: BTreeMap<(RequestKey, bool), u32>,
    replies: BTreeMap<(RequestKey, bool), u32>,
    /// The request being fed, and what `accepting()` said just before it.
    current: Option<(RequestKey, Universe, bool, bool, Option<Universe>)>,
    /// Requests waiting for the new store to open just before the input being fed, with
    /// whether each only reads.
    awaiting: Vec<(RequestKey, bool)>,
    /// Whether the last request of each key only reads.
    read_only: BTreeMap<RequestKey, bool>,
    // What the core did.
    /// The decision of the last `Persisted` fed to this incarnation.
    confirmed: Option<Decision>,
    /// The first decision this incarnation acted on.
    first_acted: Option<Decision>,
    /// Freezes this incarnation acted on.
    acted_freezes: BTreeSet<Epoch>,
    /// Freezes a view shown to this incarnation said every router is frozen for.
    frozen_views: BTreeSet<Epoch>,
    /// Freezes this incarnation fenced for.
    fenced_for: BTreeSet<Epoch>,
    /// The epoch of the last fence asked for.
    last_fence: Option<Epoch>,
    booted_fenced: bool,
    /// The order key of the last decision acted on, over every incarnation.
    acted_key: (u64, u8),
    coverage: &'a RefCell<Coverage>,
}

impl<'a> Shell<'a> {
    fn new(case: &Case, make_core: fn(DataNodeConfig) -> DataNodeCore, coverage: &'a RefCell<Coverage>) -> Self {
        let config = DataNodeConfig { range_rows: case.range_rows, ..config(case.change_log_applied_max) };
        let mapping = mapping();
        let mut old = MemStore::with_schema(&Schema {
            tables: [("t".to_string(), TableSchema { key: "id".into(), columns: vec!["id".into(), "v".into()] })]
                .into_iter()
                .collect(),
        });
        // Rows present before the upgrade (not captured: the bulk copy brings them over).
        for key in 1..=case.rows {
            old.write(&RowOp::Upsert { table: "t".into(), key, row: row(key, "v", key) });
        }
        Shell {
            make_core,
            core: make_core(config.clone()),
            config,
            now: 0,
            disk: NodeRecord {
                decision: Decision::Initial,
                boots: case.boots,
                disk_id: 7,
                owner: NodeRecord::owner_of("data-1"),
                confirmed: case.boots > 0,
                generation: Generation::GENESIS,
                endpoints: Vec::new(),
            },
            old,
            new: MemStore::new_universe(mapping.clone()),
            coordinator: Coordinator::new(),
            robust: case.robust,
            rng: Rng(case.seed),
            at_once_pct: case.at_once_pct,
            sends: Vec::new(),
            op: None,
            executes: Vec::new(),
            requests: BTreeMap::new(),
            replies: BTreeMap::new(),
            current: None,
            awaiting: Vec::new(),
            read_only: BTreeMap::new(),
            confirmed: None,
            first_acted: None,
            acted_freezes: BTreeSet::new(),
            frozen_views: BTreeSet::new(),
            fenced_for: BTreeSet::new(),
            last_fence: None,
            booted_fenced: false,
            acted_key: (0, 0),
            coverage,
        }
    }

    /// Starts a fresh incarnation on the disk record, the new store's checkpoint and the old
    /// store's fence.
    fn boot(&mut self) -> Result<(), TestCaseError> {
        self.core = (self.make_core)(self.config.clone());
        self.sends.clear();
        self.op = None;
        self.executes.clear();
        self.requests.clear();
        self.replies.clear();
        self.confirmed = None;
        self.first_acted = None;
        self.acted_freezes.clear();
        self.frozen_views.clear();
        self.fenced_for.clear();
        self.booted_fenced = self.old.is_fenced().unwrap();
        let checkpoint = self.new.checkpoint().unwrap();
        self.feed(DataInput::Boot { record: self.disk.clone(), checkpoint, old_fenced: self.booted_fenced })
    }

    /// Feeds one input, then the answers its outputs ask for at once (`Persisted`, and store
    /// results answered right away), checking every output.
    fn feed(&mut self, input: DataInput) -> Result<(), TestCaseError> {
        let mut queue = VecDeque::from([input]);
        while let Some(input) = queue.pop_front() {
            self.current = None;
            match &input {
                DataInput::Persisted(record) => self.confirmed = Some(record.decision),
                DataInput::Request { key, generation, mirror, read_only } => {
                    *self.requests.entry((*key, *mirror)).or_default() += 1;
                    self.read_only.insert(*key, *read_only);
                    let universe = if *generation == Generation(1) { Universe::Old } else { Universe::New };
                    self.current = Some((*key, universe, *mirror, *read_only, self.core.accepting()));
                }
                DataInput::Store(_) => {
                    prop_assert!(self.op.take().is_some(), "the shell answered a store operation nobody asked for");
                }
                _ => {}
            }
            self.awaiting = self.core.awaiting_open().map(|k| (*k, self.read_only[k])).collect();
            for output in self.core.handle(self.now, input) {
                self.apply(output, &mut queue)?;
            }
        }
        self.current = None;
        self.check_replies()
    }

    /// Every request gets exactly one reply: all of them once nothing for its key is running.
    fn check_replies(&self) -> Result<(), TestCaseError> {
        for (&(key, mirror), &requested) in &self.requests {
            let replied = self.replies.get(&(key, mirror)).copied().unwrap_or(0);
            // A request waiting for the new store to open is let through, not yet executed.
            let awaiting = !mirror && self.core.awaiting_open().any(|k| *k == key);
            let running = self.executes.iter().filter(|(k, _, m, _)| *k == key && *m == mirror).count() as u32
                + u32::from(awaiting);
            if mirror {
                prop_assert_eq!(
                    requested - replied,
                    running,
                    "mirror {:?}: {} requests, {} replies, {} running",
                    key,
                    requested,
                    replied,
                    running
                );
            } else {
                prop_assert!(running <= 1, "request {:?} let through {} times at once", key, running);
                prop_assert!(
                    if running == 0 { replied == requested } else { replied < requested },
                    "request {:?}: {} requests, {} replies, {} running",
                    key,
                    requested,
                    replied,
                    running
                );
            }
        }
        Ok(())
    }

    fn apply(&mut self, output: DataOutput, queue: &mut VecDeque<DataInput>) -> Result<(), TestCaseError> {
        match output {
            DataOutput::Execute { key, universe, mirror } => {
                let waited = self.awaiting.iter().find(|(k, _)| *k == key).map(|(k, r)| (*k, Universe::New, false, *r));
                let current = match (self.current, waited) {
                    // A request that waited for the new store runs once the store is open.
                    (None, Some((k, u, m, read_only))) => Some((k, u, m, read_only, self.core.accepting())),
                    (current, _) => current,
                };
                let Some((k, u, m, read_only, accepting)) = current else {
                    return Err(TestCaseError::fail(format!("{key:?} let through to {universe:?} without a request")));
                };
                prop_assert!(
                    (k, u, m) == (key, universe, mirror),
                    "request {:?} for {:?} (mirror {}) let through as {:?} for {:?} (mirror {})",
                    k,
                    u,
                    m,
                    key,
                    universe,
                    mirror
                );
                if !mirror {
                    prop_assert_eq!(
                        accepting,
                        Some(universe),
                        "request {:?} let through to the {:?} universe while accepting() said {:?}",
                        key,
                        universe,
                        accepting
                    );
                }
                self.executes.push((key, universe, mirror, read_only));
            }
            DataOutput::Reply { key, mirror, .. } => {
                let requested = self.requests.get(&(key, mirror)).copied().unwrap_or(0);
                let replied = self.replies.entry((key, mirror)).or_default();
                *replied += 1;
                prop_assert!(
                    *replied <= requested,
                    "{:?} (mirror {}) got reply {} for {} requests",
                    key,
                    mirror,
                    *replied,
                    requested
                );
            }
            DataOutput::Send { id, replica, request, deadline_ms } => {
                prop_assert!(REPLICAS.contains(&replica), "sent to unknown replica {}", replica);
                if let NodeRequest::Report { report, .. } = &request {
                    // The copy's progress: never more rows than its snapshot holds.
                    prop_assert!(
                        report.copied_rows <= report.copy_rows_total,
                        "copied {} of a snapshot of {} rows",
                        report.copied_rows,
                        report.copy_rows_total
                    );
                    if report.copied_rows > 0 && !report.bulk_done {
                        self.coverage.borrow_mut().copy_progress += 1;
                    }
                }
                if let NodeRequest::Ack { epoch, ack: Ack::Switched, .. } = &request {
                    // Switched: this node's new store takes clients, after the commit.
                    prop_assert!(self.new.is_open_to_clients(), "Switched for {:?} with the new store guarded", epoch);
                    prop_assert_eq!(self.confirmed, Some(Decision::Commit(*epoch)));
                    self.coverage.borrow_mut().switched_acks += 1;
                }
                prop_assert!(deadline_ms > self.now, "request {} sent with a deadline already passed", id);
                self.sends.push((id, request, deadline_ms));
            }
            DataOutput::Persist(record) => {
                prop_assert!(record.boots >= self.disk.boots, "the boot count went backwards: {:?}", record);
                prop_assert!(
                    record.decision.order_key() >= self.disk.decision.order_key(),
                    "persisted {:?} over the later {:?}",
                    record.decision,
                    self.disk.decision
                );
                prop_assert!(record.endpoints.is_empty(), "a data node keeps no endpoints");
                self.disk = record.clone();
                queue.push_back(DataInput::Persisted(record));
            }
            DataOutput::Store(op) => {
                prop_assert!(
                    self.op.is_none(),
                    "store operation {:?} asked for while {:?} is outstanding",
                    op,
                    self.op
                );
                match &op {
                    StoreOp::Fence => self.check_fence()?,
                    StoreOp::Prune { up_to } => {
                        // Only changes durably applied to the new universe may be forgotten.
                        let durable = self.new.checkpoint().unwrap();
                        prop_assert!(
                            durable.copy == CopyState::Done && *up_to <= durable.applied,
                            "pruning the change log up to {:?} with the new store's checkpoint at {:?}",
                            up_to,
                            durable
                        );
                        self.coverage.borrow_mut().prunes += 1;
                    }
                    StoreOp::Apply(batch) => {
                        let durable = self.new.checkpoint().unwrap().applied;
                        prop_assert!(
                            batch.reset || batch.checkpoint.applied >= durable,
                            "a batch without reset moves the checkpoint back from {:?} to {:?}",
                            durable,
                            batch.checkpoint.applied
                        );
                        let mut c = self.coverage.borrow_mut();
                        c.applies += 1;
                        if batch.reset && durable > Position(0) {
                            c.copy_restarts += 1;
                        }
                    }
                    _ => {}
                }
                if self.rng.below(100) < self.at_once_pct {
                    let result = perform(&mut self.old, &mut self.new, &op);
                    if result == StoreResult::SnapshotGone {
                        self.coverage.borrow_mut().snapshots_gone += 1;
                    }
                    queue.push_back(DataInput::Store(result));
                }
                self.op = Some(op);
            }
            DataOutput::Event(event) => self.event(event)?,
        }
        Ok(())
    }

    /// A fence only for a freeze this incarnation acted on, once a view said every router is
    /// frozen for it (or, on a store found fenced at boot, for the first decision acted on).
    fn check_fence(&mut self) -> Result<(), TestCaseError> {
        let booted_fenced = self.booted_fenced;
        let first_acted = self.first_acted;
        let allowed = self.acted_freezes.iter().copied().find(|e| {
            !self.fenced_for.contains(e)
                && (self.frozen_views.contains(e) || (booted_fenced && first_acted == Some(Decision::Freeze(*e))))
        });
        prop_assert!(
            allowed.is_some(),
            "fenced the old store without a persisted freeze all routers are frozen for: acted on freezes {:?}, \
             views with every router frozen for {:?}, already fenced for {:?}, booted fenced {}",
            self.acted_freezes,
            self.frozen_views,
            self.fenced_for,
            booted_fenced
        );
        let epoch = allowed.expect("checked");
        self.fenced_for.insert(epoch);
        self.last_fence = Some(epoch);
        let mut c = self.coverage.borrow_mut();
        c.fences += 1;
        if !self.frozen_views.contains(&epoch) {
            c.fences_recovering += 1;
        }
        Ok(())
    }

    fn event(&mut self, event: DataEvent) -> Result<(), TestCaseError> {
        match event {
            DataEvent::Acted(decision) => {
                prop_assert_eq!(
                    self.confirmed,
                    Some(decision),
                    "persist before act: acted on {:?} while the last record made durable holds {:?}",
                    decision,
                    self.confirmed
                );
                prop_assert!(
                    decision.order_key() >= self.acted_key,
                    "acted on {:?} after a decision ordered later ({:?})",
                    decision,
                    self.acted_key
                );
                self.acted_key = decision.order_key();
                self.first_acted.get_or_insert(decision);
                let mut c = self.coverage.borrow_mut();
                match decision {
                    Decision::Freeze(e) => {
                        self.acted_freezes.insert(e);
                        c.acted_freeze += 1;
                    }
                    Decision::Commit(_) => c.acted_commit += 1,
                    Decision::Abort(_) => c.acted_abort += 1,
                    Decision::Initial => {}
                    Decision::Retired => prop_assert!(false, "a data node is never on the roster, never retired"),
                }
            }
            DataEvent::Drained { epoch, final_position, .. } => {
                let applied = self.new.checkpoint().unwrap().applied;
                prop_assert!(
                    applied >= final_position,
                    "drained {:?} at final position {:?} with the new store's checkpoint at {:?}",
                    epoch,
                    final_position,
                    applied
                );
                self.coverage.borrow_mut().drained += 1;
            }
            DataEvent::Compared { final_position, matched } => {
                // No lost writes: nothing but the transform writes the new universe before the
                // commit, so transform(old) and new agree at the final position.
                prop_assert!(
                    matched,
                    "checksums differ at the final position {:?} (new checkpoint {:?})",
                    final_position,
                    self.new.checkpoint().unwrap()
                );
                self.coverage.borrow_mut().compared += 1;
            }
            DataEvent::RangeCompared { matched, rows } => {
                // Compared at matching positions, with nothing but the transform writing the
                // new universe: a range never differs (and where every change has a number, no
                // change spoils a comparison).
                prop_assert!(matched == Some(true), "a range of {} rows compared {:?}", rows, matched);
                self.coverage.borrow_mut().ranges_matched += 1;
            }
            DataEvent::TransformFailed(e) => {
                // The old store's stream has no gaps and the rename converts every row.
                return Err(TestCaseError::fail(format!("the transform failed on a well-formed stream: {e}")));
            }
            DataEvent::Abandoned { upgrade } => {
                // Only a rolled-back upgrade is abandoned, once its abort is acted on: the old
                // store is open to clients again, and no copy holds in the new store.
                prop_assert_eq!(self.coordinator.phase, Phase::RolledBack, "abandoned {:?}", upgrade);
                prop_assert!(!self.old.is_fenced().unwrap(), "abandoned with the old store fenced");
                prop_assert_eq!(self.new.checkpoint().unwrap().copy, CopyState::NotStarted);
                self.coverage.borrow_mut().abandoned += 1;
            }
            DataEvent::Admitted { .. }
            | DataEvent::CopyStarted { .. }
            | DataEvent::Copying
            | DataEvent::CopyDone { .. }
            | DataEvent::CopyAgain { .. }
            | DataEvent::Fenced { .. }
            | DataEvent::StoreFailed { .. } => {}
        }
        Ok(())
    }

    fn step(&mut self, step: Step) -> Result<(), TestCaseError> {
        match step {
            Step::Request { origin, id, kind } => {
                let key = RequestKey { origin: u64::from(origin % 2) + 1, id: u64::from(id % 6) };
                // Routers send the new universe client requests only once the commit is committed.
                let committed = matches!(self.coordinator.decision, Decision::Commit(_));
                let (universe, mirror, read_only) = match kind {
                    // Once committed, most routers have flipped (a late one still sends to the old).
                    0..=9 if committed && kind >= 4 => (Universe::New, false, kind % 2 == 0),
                    0..=9 => (Universe::Old, false, kind % 2 == 0),
                    10..=13 => (Universe::New, true, true),
                    // Malformed mirrors (the core refuses them).
                    14 => (Universe::Old, true, true),
                    _ => (Universe::New, true, false),
                };
                if self.requests.contains_key(&(key, mirror)) {
                    self.coverage.borrow_mut().duplicates += 1;
                }
                let generation = if universe == Universe::Old { Generation(1) } else { Generation(2) };
                self.feed(DataInput::Request { key, generation, mirror, read_only })?;
            }
            Step::Executed { pick, ok, key, value, delete } => {
                if self.executes.is_empty() {
                    return Ok(());
                }
                let (k, universe, mirror, read_only) = self.executes.remove(pick % self.executes.len());
                let answer = if ok {
                    self.execute(k, universe, mirror, read_only, key, value, delete)
                } else {
                    StoreAnswer::Rejected { reason: "the store refused".into() }
                };
                self.feed(DataInput::Executed { key: k, universe, mirror, answer })?;
            }
            Step::ClientWrite { key, value, delete } => {
                // Refused while fenced, like any write.
                let _ = self.old.write_captured(client_op("v", key, value, delete));
            }
            Step::StoreDone => {
                if let Some(op) = self.op.clone() {
                    let result = perform(&mut self.old, &mut self.new, &op);
                    if result == StoreResult::SnapshotGone {
                        self.coverage.borrow_mut().snapshots_gone += 1;
                    }
                    self.feed(DataInput::Store(result))?;
                }
            }
            Step::Coordinator { pick, action, lag, stale } => {
                if self.sends.is_empty() {
                    return Ok(());
                }
                let (id, request, _) = self.sends.remove(pick % self.sends.len());
                let response = match &request {
                    NodeRequest::Watch { linearizable, .. } => match action {
                        // A linearizable read is answered only with the newest view (or not at all).
                        0..=5 if *linearizable => Some(self.coordinator.watch(true, 0, false)),
                        0..=4 => {
                            let stale = stale && self.robust;
                            if stale {
                                self.coverage.borrow_mut().stale_views += 1;
                            }
                            Some(self.coordinator.watch(false, lag, stale))
                        }
                        _ => None,
                    }
                    .map(|view| {
                        if let (Decision::Freeze(e), true) = (view.decision, view.all_routers_frozen) {
                            self.frozen_views.insert(e);
                        }
                        NodeResponse::View(view)
                    })
                    .or_else(|| {
                        (action == 7 && !*linearizable)
                            .then(|| NodeResponse::NotLeader { leader: Some(REPLICAS[lag as usize % REPLICAS.len()]) })
                    }),
                    _ => match action {
                        0..=4 => Some(if self.coordinator.write(&request) {
                            NodeResponse::Accepted
                        } else {
                            // Refused by the state machine (stands for `Rejected`).
                            NodeResponse::NotLeader { leader: None }
                        }),
                        5 => {
                            self.coordinator.write(&request);
                            None
                        }
                        6 => None,
                        _ => Some(NodeResponse::NotLeader { leader: None }),
                    },
                };
                if let Some(response) = response {
                    self.feed(DataInput::Coordinator { id, response })?;
                }
            }
            Step::Advance(k) => self.coordinator.advance(k),
            Step::Timer => self.feed(DataInput::Timer)?,
            Step::Wait(ms) => {
                let deadline = self.core.next_deadline_ms().unwrap_or(u64::MAX);
                self.now = (self.now + ms).min(deadline).max(self.now);
                let now = self.now;
                // The shell gives up on a coordinator request at its deadline, as the core does.
                self.sends.retain(|(_, _, deadline_ms)| *deadline_ms > now);
                self.feed(DataInput::Timer)?;
                if let Some(next) = self.core.next_deadline_ms() {
                    prop_assert!(next > now, "after a timer at {} the core asks for another at {}", now, next);
                }
            }
            Step::Disconnect => self.old.disconnect(),
            Step::StoreFailed { performed } => {
                if let Some(op) = self.op.clone() {
                    self.coverage.borrow_mut().store_failures += 1;
                    if performed {
                        perform(&mut self.old, &mut self.new, &op);
                    }
                    if op == StoreOp::Fence {
                        // The core asks for the same fence again: allowed once more.
                        let epoch = self.last_fence.expect("a fence was checked when asked for");
                        self.fenced_for.remove(&epoch);
                    }
                    self.feed(DataInput::Store(StoreResult::Failed { reason: "the store is busy".into() }))?;
                }
            }
            Step::Crash { performed } => {
                self.coverage.borrow_mut().crashes += 1;
                if let Some(op) = self.op.take() {
                    if performed {
                        perform(&mut self.old, &mut self.new, &op);
                    }
                }
                // The process's snapshots die with it.
                self.old.disconnect();
                self.boot()?;
            }
        }
        Ok(())
    }

    /// Runs a request the core let through on its store.
    #[allow(clippy::too_many_arguments)]
    fn execute(
        &mut self,
        request: RequestKey,
        universe: Universe,
        mirror: bool,
        read_only: bool,
        key: u8,
        value: u8,
        delete: bool,
    ) -> StoreAnswer {
        let mut c = self.coverage.borrow_mut();
        match (universe, mirror) {
            (_, true) => c.executed_mirrors += 1,
            (Universe::Old, false) => c.executed_old += 1,
            (Universe::New, false) => c.executed_new += 1,
        }
        drop(c);
        let read = i64::from(key) % KEYS + 1;
        match (universe, read_only) {
            (Universe::Old, true) => {
                StoreAnswer::Ok { body: self.old.get("t", read).cloned(), position: self.old.captured() }
            }
            // A write runs once per request key (the store's request log), as a database
            // adapter runs it.
            (Universe::Old, false) => {
                self.old.execute_write(request, true, |_| Ok(vec![client_op("v", key, value, delete)])).0
            }
            (Universe::New, true) => StoreAnswer::Ok {
                body: self.new.get("t", read).cloned(),
                position: self.new.checkpoint().unwrap().applied,
            },
            (Universe::New, false) => {
                self.new.execute_write(request, false, |_| Ok(vec![client_op("w", key, value, delete)])).0
            }
        }
    }

    /// Runs every request still let through: every request must then have had exactly one reply
    /// (but one still waiting for the new store to open, which gets its reply when the store
    /// opens or the freeze aborts).
    fn finish(&mut self) -> Result<(), TestCaseError> {
        while let Some((key, universe, mirror, read_only)) = self.executes.pop() {
            let answer = self.execute(key, universe, mirror, read_only, 0, 0, false);
            self.feed(DataInput::Executed { key, universe, mirror, answer })?;
        }
        for (&(key, mirror), &requested) in &self.requests {
            if !mirror && self.core.awaiting_open().any(|k| *k == key) {
                continue;
            }
            let replied = self.replies.get(&(key, mirror)).copied().unwrap_or(0);
            prop_assert_eq!(
                replied,
                requested,
                "{:?} (mirror {}): {} requests, {} replies",
                key,
                mirror,
                requested,
                replied
            );
        }
        Ok(())
    }
}

/// One generated run.
#[derive(Clone, Debug)]
struct Case {
    /// Seeds the shell's choice of answering a store operation at once or later.
    seed: u64,
    /// Whether replicas may answer with views older than one already shown.
    robust: bool,
    /// Rows in the old store before the upgrade (250: a copy of two chunks).
    rows: i64,
    /// Percent of store operations answered right after their batch.
    at_once_pct: u64,
    /// The boot count on disk at the start.
    boots: u64,
    /// Applied changes the old store's change log keeps before the core prunes them.
    change_log_applied_max: u64,
    /// Old rows per range compared while traffic runs (`None`: at the drain only; the fixed
    /// replays below predate the comparison by range, and replay their store operations).
    range_rows: Option<usize>,
    steps: Vec<Step>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        any::<bool>(),
        prop_oneof![Just(0i64), Just(5), Just(250)],
        prop_oneof![Just(100u64), Just(90), Just(50)],
        0u64..3,
        prop_oneof![Just(2u64), Just(1_000_000)],
        prop_oneof![Just(None), Just(Some(7usize)), Just(Some(100))],
        // Long enough for several freezes, a drain and a commit in most cases.
        proptest::collection::vec(step(), 1..300),
    )
        .prop_map(|(seed, robust, rows, at_once_pct, boots, change_log_applied_max, range_rows, steps)| Case {
            seed,
            robust,
            rows,
            at_once_pct,
            boots,
            change_log_applied_max,
            range_rows,
            steps,
        })
}

fn run(
    case: Case,
    make_core: fn(DataNodeConfig) -> DataNodeCore,
    coverage: &RefCell<Coverage>,
) -> Result<(), TestCaseError> {
    let mut shell = Shell::new(&case, make_core, coverage);
    shell.boot()?;
    for step in case.steps {
        shell.step(step)?;
    }
    shell.finish()
}

/// The same 256 cases every run (CI must not pass or fail by luck); a counterexample found by a
/// run with another seed is kept as a fixed case below.
fn runner() -> TestRunner {
    let config = ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() };
    let rng = proptest::test_runner::TestRng::deterministic_rng(config.rng_algorithm);
    TestRunner::new_with_rng(config, rng)
}

#[test]
fn data_node_core_follows_committed_decisions() {
    let coverage = RefCell::new(Coverage::default());
    let result = runner().run(&case(), |case| run(case, DataNodeCore::new, &coverage));
    if let Err(e) = result {
        panic!("{e}");
    }
    // The properties are only as good as the situations they meet.
    let c = coverage.into_inner();
    eprintln!("data-node coverage over 256 cases: {c:?}");
    assert!(c.acted_freeze > 0 && c.acted_commit > 0 && c.acted_abort > 0, "decisions not all reached: {c:?}");
    assert!(c.fences > 0 && c.drained > 0 && c.compared > 0, "the drain was not exercised: {c:?}");
    assert!(c.executed_old > 0 && c.executed_new > 0 && c.executed_mirrors > 0, "requests not exercised: {c:?}");
    assert!(c.copy_restarts > 0 && c.crashes > 0 && c.stale_views > 0, "recovery not exercised: {c:?}");
    assert!(c.prunes > 0, "the change log was never pruned: {c:?}");
    assert!(c.store_failures > 0, "no store operation failed: {c:?}");
    assert!(c.copy_progress > 0, "no report showed a copy's progress: {c:?}");
    assert!(c.ranges_matched > 0, "no range was compared while traffic ran: {c:?}");
    assert!(c.abandoned > 0, "no rolled-back upgrade was abandoned: {c:?}");
    assert!(c.switched_acks > 0, "no data node acked Switched: {c:?}");
}

/// The simulator's planted transform bug (a restarted stream skips the change right after its
/// checkpoint) must not go unnoticed: the comparison at the final position catches it.
#[cfg(feature = "planted-bugs")]
#[test]
fn planted_resume_past_checkpoint_is_caught() {
    use node_core::duties::transform::TransformBug;
    let coverage = RefCell::new(Coverage::default());
    let make_core = |config| DataNodeCore::new(config).with_bug(Some(TransformBug::ResumePastCheckpoint));
    let result = runner().run(&case(), |case| run(case, make_core, &coverage));
    let Err(e) = result else { panic!("the planted bug ResumePastCheckpoint went unnoticed") };
    // At the drain, or earlier: by the comparison of a range while traffic runs.
    let e = e.to_string();
    assert!(
        e.contains("checksums differ") || e.contains("compared Some(false)"),
        "caught, but by another property: {e}"
    );
}

/// A replay of a failure the properties found (rarely: about once in 20 000 random cases), kept
/// as a deterministic regression: "no lost writes" (the comparison at the final position).
///
/// Every store operation is answered late (one `StoreDone` step each). Freeze(1) is acted on
/// with every router frozen while an `Apply` is outstanding, so its `Fence` waits in the queue;
/// Abort(1) queues an `Unfence`; Freeze(2) (every router frozen) queues a second `Fence`. The
/// result of the first fence (`Fenced{1}`) then arrives while the drain is `Fencing(2)`, so it
/// is taken as epoch 2's final position; the queued `Unfence` reopens the old store, a client
/// write lands at position 2, the second `Fenced{2}` is ignored (the drain is already
/// comparing), and the drain compares, and acks `Drained`, at position 1 while the old store's
/// final position is 2. (Since simulator seed 318 the queued first fence is dropped at the abort.)
#[test]
fn a_fence_result_of_an_aborted_freeze_is_not_taken_for_the_next_freeze() {
    let watch = Step::Coordinator { pick: 0, action: 0, lag: 0, stale: false };
    let write = Step::Coordinator { pick: 1, action: 0, lag: 0, stale: false };
    let done = Step::StoreDone;
    let advance = Step::Advance(0);
    let steps = vec![
        // Boot, first (linearizable) view, register; the bulk copy of an empty table.
        watch.clone(),
        write.clone(),
        done.clone(),
        done.clone(),
        Step::Wait(5),
        done.clone(),
        done.clone(),
        write.clone(),
        watch.clone(),
        // One captured change; the report of the finished copy; its Apply stays outstanding.
        Step::ClientWrite { key: 0, value: 0, delete: false },
        Step::Wait(5),
        write.clone(),
        done.clone(),
        // Freeze(1) with every router frozen, Abort(1), Freeze(2) with every router frozen.
        advance.clone(),
        advance.clone(),
        watch.clone(),
        Step::Advance(13),
        watch.clone(),
        advance.clone(),
        advance.clone(),
        watch.clone(),
        // Applied, Fenced{1}, Unfenced; a client write; Fenced{2}, the comparison.
        done.clone(),
        done.clone(),
        done.clone(),
        Step::ClientWrite { key: 0, value: 1, delete: false },
        done.clone(),
        done.clone(),
        done.clone(),
        // Room for a correct core to stream position 2 and finish its drain (the last store
        // operation holds the new store's writers before the ack).
        Step::Wait(5),
        done.clone(),
        done.clone(),
        done.clone(),
        done.clone(),
        done.clone(),
        done,
    ];
    let case = Case {
        seed: 0,
        robust: false,
        rows: 0,
        at_once_pct: 0,
        boots: 0,
        change_log_applied_max: 2,
        range_rows: None,
        steps,
    };
    let coverage = RefCell::new(Coverage::default());
    if let Err(e) = run(case, DataNodeCore::new, &coverage) {
        panic!("{e}");
    }
    let c = coverage.into_inner();
    // Since simulator seed 318, a fence still queued when its freeze ends is not performed: the
    // replay fences once, for epoch 2 (the drain core's own test keeps a late fence result of
    // an aborted freeze from counting for the next).
    assert!(c.fences >= 1 && c.drained > 0, "the replay no longer reaches a drain: {c:?}");
}

/// A counterexample a randomly seeded run found (CI, 2026-11-26), kept as a fixed case: a node
/// restarted on a freeze compared the universes again, learnt the commit while the new side's
/// checksum was outstanding, took a client write on the new universe, and reported the
/// universes different at the final position. A comparison the drain no longer waits for is
/// now dropped (rule test `a_comparison_overtaken_by_the_commit_is_dropped_not_reported_as_a_difference`).
/// With the request log, this exact schedule no longer reaches the race (the write is a
/// duplicate the new store answers from its log); the rule test pins it down.
#[test]
fn regression_a_write_then_a_crash_before_the_first_read_is_persisted() {
    let case = Case {
        seed: 259904973033188761,
        robust: false,
        rows: 0,
        at_once_pct: 50,
        boots: 0,
        change_log_applied_max: 2,
        range_rows: None,
        steps: vec![
            Step::Request { origin: 0, id: 0, kind: 1 },
            Step::StoreDone,
            Step::Coordinator { pick: 0, action: 0, lag: 0, stale: false },
            Step::StoreDone,
            Step::Wait(5),
            Step::Coordinator { pick: 1, action: 0, lag: 0, stale: false },
            Step::Executed { pick: 0, ok: true, key: 0, value: 0, delete: false },
            Step::StoreDone,
            Step::Wait(5),
            Step::Wait(5),
            Step::Wait(10),
            Step::Coordinator { pick: 1, action: 0, lag: 0, stale: false },
            Step::ClientWrite { key: 0, value: 0, delete: false },
            Step::Advance(0),
            Step::Advance(16),
            Step::Timer,
            Step::Advance(16),
            Step::Coordinator { pick: 0, action: 0, lag: 0, stale: false },
            Step::StoreDone,
            Step::StoreDone,
            Step::StoreDone,
            Step::StoreDone,
            Step::Request { origin: 0, id: 0, kind: 0 },
            Step::StoreDone,
            Step::Coordinator { pick: 2, action: 0, lag: 0, stale: false },
            Step::Coordinator { pick: 2, action: 0, lag: 0, stale: false },
            Step::Crash { performed: false },
            Step::Coordinator { pick: 0, action: 0, lag: 0, stale: false },
            Step::StoreDone,
            Step::Advance(56),
            Step::Coordinator { pick: 0, action: 0, lag: 0, stale: false },
            Step::Request { origin: 0, id: 0, kind: 5 },
            Step::Executed { pick: 0, ok: true, key: 0, value: 1, delete: false },
            Step::StoreDone,
        ],
    };
    let coverage = RefCell::new(Coverage::default());
    if let Err(e) = run(case, DataNodeCore::new, &coverage) {
        panic!("{e}");
    }
}
