//! The actors add no decision: every output of their core becomes exactly one I/O call, in
//! order, and nothing else happens. A persist holds the mailbox until it is durable.
//!
//! Each test runs an actor on a paused current-thread runtime inside a `LocalSet`, with I/O
//! that records every call into one log, and taps the core (every input and its outputs).

use imago_node as node;
use node::data_node::{DataBoot, DataNodeActor, DataRequest};
use node::ingress::{ClientRequest, IngressActor};
use node::io::{DiskError, Ingress, NodeDisk, Purpose, Stores};
use node_core::agent::AgentConfig;
use node_core::data_node::{DataEvent, DataNodeConfig, DataNodeCore, DataOutput, StoreOp, StoreResult};
use node_core::duties::router::RouterConfig;
use node_core::ingress::{ClientReply, IngressConfig, IngressCore, IngressEvent, IngressInput, IngressOutput};
use node_core::store::{MemStore, NewStore};
use node_core::{NodeRecord, RequestKey, StoreAnswer};
use proptest::prelude::*;
use protocol::messages::{DecisionView, NodeRequest, NodeResponse, Phase, Request, Response};
use protocol::schema::{Mapping, RowOp, Schema, TableSchema, Transform, Value};
use protocol::transport::{Transport, TransportError};
use protocol::{Decision, Duty, Epoch, Generation, NodeName, Position, Universe, UpgradeId};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One I/O call, as the I/O side saw it (or as a core output says it should be).
#[derive(Clone, Debug, PartialEq)]
enum Io {
    Forward { generation: Generation, endpoint: String, key: RequestKey, mirror: bool },
    Reply(String),
    Send(NodeRequest),
    Persist(NodeRecord),
    Event(String),
    Execute { key: RequestKey, universe: Universe },
    Store(String),
    NotifyFrozen(protocol::Epoch),
}

#[derive(Clone, Debug, PartialEq)]
enum Entry {
    /// The core handled an input and returned these outputs (as the I/O they stand for).
    Core {
        input: String,
        outputs: Vec<Io>,
    },
    Io(Io),
}

type Log = Arc<Mutex<Vec<Entry>>>;

fn push(log: &Log, io: Io) {
    log.lock().unwrap().push(Entry::Io(io));
}

/// Checks that after every core entry come exactly the I/O calls of its outputs, in order,
/// and that no I/O happens otherwise. Returns the number of core entries.
fn check_log(log: &[Entry]) -> Result<usize, String> {
    let mut i = 0;
    let mut cores = 0;
    while i < log.len() {
        let Entry::Core { input, outputs } = &log[i] else {
            return Err(format!("I/O without a core output at {i}: {:?}", log[i]));
        };
        cores += 1;
        for (k, want) in outputs.iter().enumerate() {
            match log.get(i + 1 + k) {
                Some(Entry::Io(got)) if got == want => {}
                other => return Err(format!("after {input}: output {k} is {want:?}, I/O was {other:?}")),
            }
        }
        i += 1 + outputs.len();
    }
    Ok(cores)
}

fn run_local<F: Future<Output = ()>>(test: F) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, test);
}

fn clock() -> Box<dyn Fn() -> u64> {
    let start = tokio::time::Instant::now();
    Box::new(move || start.elapsed().as_millis() as u64)
}

fn agent_config(name: &str, duties: Vec<Duty>) -> AgentConfig {
    let upgrade_from = duties.contains(&Duty::Transform).then_some(Generation::GENESIS);
    AgentConfig {
        node: NodeName::from(name),
        duties,
        replicas: vec![1, 2, 3],
        request_timeout_ms: 500,
        watch_wait_ms: 1_000,
        report_interval_ms: 100,
        stale_watch_limit: 2,
        upgrade_from,
    }
}

/// A coordinator that answers watches with the decision `script` says is committed at that
/// time, accepts every write, and drops every `drop_every`-th call.
#[derive(Clone)]
struct ScriptedCoordinator {
    log: Log,
    script: Arc<Vec<(u64, Decision)>>,
    calls: Arc<Mutex<u64>>,
    drop_every: u64,
    all_routers_frozen: bool,
    /// When the test started (the script's times count from here).
    start: tokio::time::Instant,
}

impl ScriptedCoordinator {
    fn view(&self, now_ms: u64) -> DecisionView {
        let (index, decision) =
            self.script.iter().enumerate().rev().find(|(_, (t, _))| *t <= now_ms).map(|(i, (_, d))| (i, *d)).unwrap();
        let phase = match decision {
            Decision::Initial | Decision::Abort(_) => Phase::Syncing,
            Decision::Freeze(_) => Phase::Freezing,
            Decision::Commit(_) => Phase::Switched,
            Decision::Retired => unreachable!("a coordinator never decides a retirement as a decision"),
        };
        DecisionView {
            version: index as u64 + 1,
            upgrade: Some(UpgradeId(1)),
            phase: Some(phase),
            decision,
            generation: protocol::Generation::GENESIS,
            upgrade_from: Some(protocol::Generation::GENESIS),
            known: true,
            registered: true,
            all_routers_frozen: self.all_routers_frozen && matches!(decision, Decision::Freeze(_)),
            acked_frozen: false,
            acked_drained: false,
            acked_switched: false,
            roster: protocol::messages::RosterStatus::Active,
            routers: Vec::new(),
            universes: vec![(protocol::Generation(2), vec![endpoint(2)])],
            rules: None,
            recovering: false,
            disk_recorded: false,
        }
    }
}

/// Where generation `g` answers in these tests.
fn endpoint(g: u64) -> String {
    format!("test://universe-{g}")
}

impl Transport for ScriptedCoordinator {
    fn call(
        &self,
        _to: u64,
        request: Request,
        timeout: Duration,
    ) -> impl Future<Output = Result<Response, TransportError>> + Send + 'static {
        let Request::Node(request) = request else { panic!("nodes only send node requests") };
        push(&self.log, Io::Send(request.clone()));
        let n = {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            *calls
        };
        let this = self.clone();
        async move {
            if n % this.drop_every == 0 {
                tokio::time::sleep(timeout).await;
                return Err(TransportError::Timeout(timeout));
            }
            let response = match request {
                NodeRequest::Watch { wait_ms, .. } => {
                    tokio::time::sleep(Duration::from_millis(u64::from(wait_ms).min(30))).await;
                    NodeResponse::View(this.view(this.start.elapsed().as_millis() as u64))
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    NodeResponse::Accepted
                }
            };
            Ok(Response::Node(response))
        }
    }
}

/// A disk that records every write and takes `delay_ms` to make it durable.
struct SlowDisk {
    log: Log,
    delay_ms: u64,
}

impl NodeDisk for SlowDisk {
    fn persist(&self, record: NodeRecord) -> impl Future<Output = Result<(), DiskError>> + 'static {
        push(&self.log, Io::Persist(record));
        let delay_ms = self.delay_ms;
        async move {
            if delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            Ok(())
        }
    }
}

/// Clients and universes: every forward is answered after a millisecond.
struct TestIngress {
    log: Log,
}

impl Ingress for TestIngress {
    type Request = u64;
    type Sent = Option<StoreAnswer>;

    fn forward(
        &self,
        _request: &u64,
        generation: Generation,
        endpoint: &str,
        key: RequestKey,
        purpose: Purpose,
    ) -> impl Future<Output = Option<StoreAnswer>> + 'static {
        push(&self.log, Io::Forward { generation, endpoint: endpoint.to_string(), key, mirror: purpose.is_mirror() });
        async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Some(StoreAnswer::Ok { body: None, position: Position(0) })
        }
    }

    fn taken(&self, sent: Option<StoreAnswer>) -> Option<StoreAnswer> {
        sent
    }

    fn reply(&self, request: u64, reply: ClientReply) {
        push(&self.log, Io::Reply(format!("{request}: {reply:?}")));
    }

    fn notify_frozen(&self, epoch: protocol::Epoch) {
        push(&self.log, Io::NotifyFrozen(epoch));
    }

    fn event(&self, event: IngressEvent) {
        push(&self.log, Io::Event(format!("{event:?}")));
    }
}

fn ingress_io(output: &IngressOutput) -> Io {
    match output {
        IngressOutput::Forward { generation, key, endpoint, .. } => {
            Io::Forward { generation: *generation, endpoint: endpoint.clone(), key: *key, mirror: false }
        }
        IngressOutput::Mirror { generation, key, endpoint, .. } => {
            Io::Forward { generation: *generation, endpoint: endpoint.clone(), key: *key, mirror: true }
        }
        // The actor numbers requests 1, 2, ... in arrival order; the test's tickets are the same.
        IngressOutput::Reply { id, reply } => Io::Reply(format!("{id}: {reply:?}")),
        IngressOutput::Send { request, .. } => Io::Send(request.clone()),
        IngressOutput::Persist(record) => Io::Persist(record.clone()),
        IngressOutput::NotifyFrozen { epoch } => Io::NotifyFrozen(*epoch),
        IngressOutput::Event(event) => Io::Event(format!("{event:?}")),
    }
}

fn ingress_actor(
    log: &Log,
    script: Vec<(u64, Decision)>,
    drop_every: u64,
    disk_ms: u64,
) -> IngressActor<ScriptedCoordinator, SlowDisk, TestIngress, Box<dyn Fn() -> u64>> {
    let config = IngressConfig {
        agent: agent_config("router-1", vec![Duty::Route, Duty::Validate]),
        router: RouterConfig { hold_ms_max: 200, hold_queue_max: 16, inflight_ms_max: 1_000, retry_after_ms: 100 },
        ignore_fields: Vec::new(),
        requests_max: 64,
        genesis_endpoints: vec![endpoint(1)],
    };
    let coordinator = ScriptedCoordinator {
        log: log.clone(),
        script: Arc::new(script),
        calls: Arc::new(Mutex::new(0)),
        drop_every,
        all_routers_frozen: false,
        start: tokio::time::Instant::now(),
    };
    let tap_log = log.clone();
    IngressActor::new(
        IngressCore::new(config),
        NodeRecord::default(),
        coordinator,
        SlowDisk { log: log.clone(), delay_ms: disk_ms },
        TestIngress { log: log.clone() },
        clock(),
    )
    .with_tap(move |_, input, outputs| {
        let entry = Entry::Core { input: format!("{input:?}"), outputs: outputs.iter().map(ingress_io).collect() };
        tap_log.lock().unwrap().push(entry);
    })
}

/// A legal committed history: Initial, then Freeze(e) and its outcome, epoch after epoch.
fn script(steps: &[(u64, bool)]) -> Vec<(u64, Decision)> {
    let mut script = vec![(0, Decision::Initial)];
    let mut t = 0;
    for (e, (gap_ms, commit)) in steps.iter().enumerate() {
        let epoch = Epoch(e as u64 + 1);
        t += gap_ms;
        script.push((t, Decision::Freeze(epoch)));
        t += gap_ms;
        script.push((t, if *commit { Decision::Commit(epoch) } else { Decision::Abort(epoch) }));
        if *commit {
            break;
        }
    }
    script
}

#[derive(Clone, Debug)]
enum Step {
    Request { read_only: bool },
    Wait(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => any::<bool>().prop_map(|read_only| Step::Request { read_only }),
        2 => (1u64..120).prop_map(Step::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The ingress actor's I/O calls are its core's outputs, in order, and nothing else.
    #[test]
    fn ingress_actor_performs_exactly_its_cores_outputs(
        steps in proptest::collection::vec(step(), 1..60),
        history in proptest::collection::vec((20u64..300, any::<bool>()), 1..4),
        drop_every in 2u64..9,
        disk_ms in 0u64..3,
    ) {
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let actor_log = log.clone();
        run_local(async move {
            let (addr, task) = node::start_local(ingress_actor(&actor_log, script(&history), drop_every, disk_ms));
            let mut ticket = 0;
            for s in steps {
                match s {
                    Step::Request { read_only } => {
                        ticket += 1;
                        addr.do_send(ClientRequest { read_only, long: false, request: ticket });
                        tokio::task::yield_now().await;
                    }
                    Step::Wait(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                }
            }
            tokio::time::sleep(Duration::from_millis(2_000)).await;
            task.abort();
        });
        let log = log.lock().unwrap().clone();
        let cores = check_log(&log).map_err(TestCaseError::fail)?;
        prop_assert!(cores > 3, "the core ran only {} times", cores);
    }
}

/// A slow persist does not stall the node: with a disk that takes 100 ms, client requests sent
/// meanwhile reach the core before the record is durable, and yet the core acts on a decision
/// only after its `Persisted`.
#[test]
fn a_slow_persist_stalls_nothing_and_nothing_is_acted_on_before_it_is_durable() {
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let actor_log = log.clone();
    run_local(async move {
        let script = vec![(0, Decision::Initial), (300, Decision::Freeze(Epoch(1))), (600, Decision::Abort(Epoch(1)))];
        let (addr, task) = node::start_local(ingress_actor(&actor_log, script, u64::MAX, 100));
        for ticket in 1..=40 {
            addr.do_send(ClientRequest { read_only: ticket % 2 == 0, long: false, request: ticket });
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        task.abort();
    });
    let log = log.lock().unwrap().clone();
    check_log(&log).unwrap();
    let cores: Vec<(&String, &Vec<Io>)> = log
        .iter()
        .filter_map(|e| if let Entry::Core { input, outputs } = e { Some((input, outputs)) } else { None })
        .collect();
    let mut persists = 0;
    let mut requests_while_writing = 0;
    for (i, (_, outputs)) in cores.iter().enumerate() {
        for io in outputs.iter() {
            let Io::Persist(record) = io else { continue };
            persists += 1;
            let want = format!("{:?}", IngressInput::Persisted(record.clone()));
            let done = (i + 1..cores.len())
                .find(|j| *cores[*j].0 == want)
                .unwrap_or_else(|| panic!("Persist({record:?}) was never answered with {want}"));
            let acted = format!("{:?}", IngressEvent::Acted(record.decision));
            for (input, outputs) in &cores[i + 1..done] {
                requests_while_writing += usize::from(input.starts_with("Request"));
                assert!(
                    !outputs.iter().any(|o| matches!(o, Io::Event(e) if *e == acted)),
                    "acted on {:?} before it was durable (on {input})",
                    record.decision
                );
            }
        }
    }
    assert!(persists >= 3, "boot, freeze and abort are persisted (saw {persists})");
    assert!(requests_while_writing > 0, "requests reached the core while a record was being written");
}

// ---- the data-node actor ----------------------------------------------------------------------

/// Both stores of a shard in memory, and every request answered as an empty success.
struct TestStores {
    log: Log,
    stores: Arc<Mutex<(MemStore, MemStore)>>,
}

impl Stores for TestStores {
    type Request = u64;

    fn execute(
        &self,
        key: RequestKey,
        request: &u64,
        universe: Universe,
    ) -> impl Future<Output = StoreAnswer> + 'static {
        assert_eq!(key, RequestKey { origin: 7, id: *request }, "the core's key for this request");
        push(&self.log, Io::Execute { key, universe });
        let mut stores = self.stores.lock().unwrap();
        let answer = match universe {
            Universe::Old => match stores.0.write_request(key, vec![upsert(*request as i64)], true) {
                Ok((position, _)) => StoreAnswer::Ok { body: None, position },
                Err(e) => StoreAnswer::Rejected { reason: e.to_string() },
            },
            Universe::New => StoreAnswer::Ok { body: None, position: stores.1.checkpoint().unwrap().applied },
        };
        std::future::ready(answer)
    }

    fn reply(&self, request: u64, answer: StoreAnswer) {
        push(&self.log, Io::Reply(format!("{request}: {answer:?}")));
    }

    fn store(&self, op: StoreOp) -> impl Future<Output = StoreResult> + 'static {
        push(&self.log, Io::Store(format!("{op:?}")));
        let mut guard = self.stores.lock().unwrap();
        let (old, new) = &mut *guard;
        let result = node_core::data_node::perform(old, new, op);
        std::future::ready(result)
    }

    fn event(&self, event: DataEvent) {
        push(&self.log, Io::Event(format!("{event:?}")));
    }
}

fn schema() -> Schema {
    let mut tables = BTreeMap::new();
    tables.insert("t".to_string(), TableSchema { key: "id".into(), columns: vec!["id".into(), "v".into()] });
    Schema { tables }
}

fn upsert(key: i64) -> RowOp {
    let row = [("id".to_string(), Value::Int(key)), ("v".to_string(), Value::Int(key * 10))].into_iter().collect();
    RowOp::Upsert { table: "t".into(), key, row }
}

fn data_io(output: &DataOutput) -> Io {
    match output {
        DataOutput::Execute { key, universe, .. } => Io::Execute { key: *key, universe: *universe },
        DataOutput::Reply { key, answer, .. } => Io::Reply(format!("{}: {answer:?}", key.id)),
        DataOutput::Send { request, .. } => Io::Send(request.clone()),
        DataOutput::Persist(record) => Io::Persist(record.clone()),
        DataOutput::Store(op) => Io::Store(format!("{op:?}")),
        DataOutput::Event(event) => Io::Event(format!("{event:?}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The data-node actor's I/O calls are its core's outputs, in order, and nothing else —
    /// through a copy, the stream, a freeze with its fence and comparison, and its outcome.
    #[test]
    fn data_node_actor_performs_exactly_its_cores_outputs(
        writes in proptest::collection::vec((0u64..40, any::<bool>()), 1..50),
        history in proptest::collection::vec((50u64..400, any::<bool>()), 1..3),
        drop_every in 3u64..9,
    ) {
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let actor_log = log.clone();
        run_local(async move {
            let mapping = Mapping::compile(
                &schema(),
                &[Transform::RenameColumn { table: "t".into(), from: "v".into(), to: "w".into() }],
            )
            .unwrap();
            let mut old = MemStore::with_schema(&schema());
            for k in 0..30 {
                old.write(&upsert(1_000 + k));
            }
            let new = MemStore::new_universe(mapping);
            let stores = Arc::new(Mutex::new((old, new)));
            let config = DataNodeConfig {
                agent: agent_config("db-1", vec![Duty::Capture, Duty::Transform]),
                transform_interval_ms: 10,
                transform_idle_ms: 30,
                store_retry_ms: 10,
                positions: Default::default(),
                copy_rows_per_s_max: None,
                copy_chunk_rows: node_core::duties::transform::COPY_CHUNK_ROWS,
                compare_chunk_rows: node_core::data_node::COMPARE_CHUNK_ROWS,
        range_rows: None,
        range_again_ms: 0,
                answers_max: 1_000,
                change_log_applied_max: 5,
            };
            let coordinator = ScriptedCoordinator {
                log: actor_log.clone(),
                script: Arc::new(script(&history)),
                calls: Arc::new(Mutex::new(0)),
                drop_every,
                all_routers_frozen: true,
                start: tokio::time::Instant::now(),
            };
            let tap_log = actor_log.clone();
            let boot = DataBoot { record: NodeRecord::default(), checkpoint: Default::default(), old_fenced: false };
            let actor = DataNodeActor::new(
                DataNodeCore::new(config),
                boot,
                coordinator,
                SlowDisk { log: actor_log.clone(), delay_ms: 0 },
                TestStores { log: actor_log.clone(), stores },
                clock(),
            )
            .with_tap(move |_, input, outputs| {
                let entry = Entry::Core { input: format!("{input:?}"), outputs: outputs.iter().map(data_io).collect() };
                tap_log.lock().unwrap().push(entry);
            });
            let (addr, task) = node::start_local(actor);
            for (i, (wait_ms, old)) in writes.into_iter().enumerate() {
                let generation = if old { Generation(1) } else { Generation(2) };
                let key = RequestKey { origin: 7, id: i as u64 };
                addr.do_send(DataRequest { key, generation, mirror: false, read_only: false, request: i as u64 });
                tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            }
            tokio::time::sleep(Duration::from_millis(2_000)).await;
            task.abort();
        });
        let log = log.lock().unwrap().clone();
        let cores = check_log(&log).map_err(TestCaseError::fail)?;
        prop_assert!(cores > 10, "the core ran only {} times", cores);
        let stored = log.iter().filter(|e| matches!(e, Entry::Io(Io::Store(_)))).count();
        prop_assert!(stored > 2, "the transform never ran ({} store operations)", stored);
    }
}
