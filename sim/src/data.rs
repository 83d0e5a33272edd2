//! A data node process in the simulator: simulated I/O around the data-node core. The old and
//! the new store of one shard are [`MemStore`]s behind the data-store interface; the core
//! decides every read, write, fence and admission, and this shell performs them.

use crate::app::{self, AppOp};
use crate::checker::AdmissionPoint;
use crate::config::Bug;
use crate::fidelity::History;
use crate::wire::{DataRequest, DataResponse};
use crate::world::{World, DATA_BASE};
use node_core::data_node::{DataEvent, DataInput, DataNodeConfig, DataNodeCore, DataOutput, StoreOp, StoreResult};
use node_core::store::{MemStore, NewStore, OldStore};
use node_core::{NodeRecord, RequestKey, StoreAnswer};
use protocol::codec;
use protocol::schema::RowOp;
use protocol::{Duty, Universe};
use std::collections::VecDeque;

/// Pause between two transform steps.
const TRANSFORM_INTERVAL_MS: u64 = 10;
/// Most request answers a data node remembers for idempotency.
const ANSWERS_MAX: usize = 65_536;

/// A data node. `old`, `new` and `disk` survive a crash; the core is lost.
pub struct DataProc {
    pub addr: u64,
    pub name: String,
    pub old: MemStore,
    pub new: MemStore,
    pub disk: NodeRecord,
    pub core: DataNodeCore,
    /// The deadline a timer task is armed for.
    pub armed_ms: Option<u64>,
    /// The request being served (the shell's only state besides the stores).
    serving: Option<(RequestKey, AppOp, Option<DataResponse>)>,
}

impl DataProc {
    pub fn new(world: &World, index: usize) -> DataProc {
        let name = format!("db-{index}");
        DataProc {
            addr: DATA_BASE + index as u64,
            old: MemStore::with_schema(&world.plan.old_schema),
            new: MemStore::with_schema(&world.mapping.new_schema()),
            disk: NodeRecord::default(),
            core: DataProc::core(world, &name),
            name,
            armed_ms: None,
            serving: None,
        }
    }

    fn core(world: &World, name: &str) -> DataNodeCore {
        let config = DataNodeConfig {
            agent: world.agent_config(name, vec![Duty::Capture, Duty::Transform]),
            mapping: world.mapping.clone(),
            transform_interval_ms: TRANSFORM_INTERVAL_MS,
            answers_max: ANSWERS_MAX,
        };
        DataNodeCore::new(config).with_bug(Bug::transform(world.config.bug))
    }
}

impl World {
    /// Serves one client request forwarded by a router (`None`: no answer is sent).
    pub fn data_request(&mut self, i: usize, bytes: &[u8]) -> Option<Vec<u8>> {
        let response = match codec::decode_frame::<DataRequest>(bytes) {
            Ok(Some((request, _))) => {
                let input = DataInput::Request {
                    key: request.key,
                    universe: request.universe,
                    mirror: request.mirror,
                    read_only: request.op.read_only(),
                };
                self.data[i].serving = Some((request.key, request.op, None));
                self.data_node(i, input);
                self.data[i].serving.take().and_then(|(_, _, answer)| answer)?
            }
            Ok(None) => DataResponse::Rejected { reason: "truncated frame".into() },
            Err(e) => DataResponse::Rejected { reason: e.to_string() },
        };
        Some(codec::encode_frame(&response).expect("data responses encode"))
    }

    /// Feeds one input to data node `i`'s core and performs its outputs in order, feeding back
    /// what they answer (store results, persists) until the core is quiet; then re-arms its
    /// timer.
    pub fn data_node(&mut self, i: usize, input: DataInput) {
        let now = self.now_ms();
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            for out in self.data[i].core.handle(now, input) {
                inputs.extend(self.data_output(i, out));
            }
        }
        let (addr, deadline) = (self.data[i].addr, self.data[i].core.next_deadline_ms());
        if let Some(at) = self.arm(addr, self.data[i].armed_ms, deadline) {
            self.data[i].armed_ms = Some(at);
        }
    }

    /// Data node `i`'s timer fired for `at`.
    pub fn data_timer(&mut self, i: usize, at: u64) {
        if self.data[i].armed_ms != Some(at) {
            return; // superseded by an earlier deadline
        }
        self.data[i].armed_ms = None;
        self.data_node(i, DataInput::Timer);
        let name = self.data[i].name.clone();
        self.check_progress(&name, self.data[i].core.next_deadline_ms());
    }

    fn data_output(&mut self, i: usize, out: DataOutput) -> Option<DataInput> {
        match out {
            DataOutput::Execute { key, universe, mirror } => {
                let d = &mut self.data[i];
                let (serving, op, _) = d.serving.as_ref().expect("executing the request being served");
                assert_eq!(*serving, key, "executing another request than the one served");
                let answer = match universe {
                    Universe::Old => execute_old(&mut d.old, op, &mut self.fidelity.shards[i]),
                    Universe::New => execute_new(&mut d.new, op),
                };
                Some(DataInput::Executed { key, universe, mirror, answer })
            }
            DataOutput::Reply { key, answer } => {
                let serving = self.data[i].serving.as_mut().expect("a reply to the request being served");
                assert_eq!(serving.0, key, "a reply to another request than the one served");
                serving.2 = Some(answer);
                None
            }
            DataOutput::Send { id, replica, request, deadline_ms } => {
                let addr = self.data[i].addr;
                self.send_agent_request(addr, id, replica, request, deadline_ms);
                None
            }
            DataOutput::Persist(record) => {
                self.data[i].disk = record;
                let name = self.data[i].name.clone();
                self.note_persisted(&name, record.decision);
                Some(DataInput::Persisted(record))
            }
            DataOutput::Store(op) => Some(DataInput::Store(self.store_op(i, op))),
            DataOutput::Event(event) => {
                self.data_event(i, event);
                None
            }
        }
    }

    /// Performs one store operation through the data-store interface.
    fn store_op(&mut self, i: usize, op: StoreOp) -> StoreResult {
        let d = &mut self.data[i];
        match op {
            StoreOp::OpenSnapshot => {
                let (snapshot, at) = d.old.open_snapshot();
                StoreResult::SnapshotOpened { snapshot, at }
            }
            StoreOp::ReadSnapshot { snapshot, after, limit } => match d.old.snapshot_chunk(snapshot, &after, limit) {
                Ok(chunk) => StoreResult::Chunk(chunk),
                Err(_) => StoreResult::SnapshotGone,
            },
            StoreOp::ReadChanges { after, limit } => {
                let (changes, last) = d.old.changes_after(after, limit);
                StoreResult::Changes { changes, last }
            }
            StoreOp::Apply(batch) => {
                d.new.apply_batch(&batch);
                let position = batch.checkpoint.applied;
                if let Some(what) = self.fidelity.check_batch(i, &self.mapping, &batch.ops, position, &self.data[i].new)
                {
                    let (now, name) = (self.now_us(), self.data[i].name.clone());
                    self.checker.violation(now, format!("transform fidelity: {name}: {what}"));
                }
                StoreResult::Applied
            }
            StoreOp::Fence => {
                let final_position = d.old.fence();
                StoreResult::Fenced { final_position }
            }
            StoreOp::Unfence => {
                d.old.unfence();
                StoreResult::Unfenced
            }
            StoreOp::ReadRows { after, limit } => StoreResult::Rows(d.old.rows_chunk(&after, limit)),
            StoreOp::NewChecksum => StoreResult::NewChecksum(d.new.checksum()),
        }
    }

    fn data_event(&mut self, i: usize, event: DataEvent) {
        let (now, name) = (self.now_us(), self.data[i].name.clone());
        match event {
            DataEvent::Acted(decision) => self.note_acted(&name, decision),
            DataEvent::Admitted { key, universe } => {
                self.checker.admitted(now, AdmissionPoint::Store, &name, universe, key.id);
            }
            DataEvent::Copying => {
                self.stats.copying_seen.insert(i, true);
            }
            DataEvent::Fenced { final_position } => {
                self.record(format_args!("{name} fenced old store at {}", final_position.0));
            }
            DataEvent::Compared { final_position, matched } => {
                if !matched {
                    self.checker.violation(
                        now,
                        format!(
                            "no lost writes: {name} checksums differ after applying up to the final position {}",
                            final_position.0
                        ),
                    );
                }
            }
            DataEvent::Drained { final_position, .. } => {
                // What a commit relies on, checked independently of the core: everything up to
                // P is in the new universe, and both universes match.
                let applied = self.data[i].new.checkpoint().applied;
                let matched = self.universes_match(i);
                if applied < final_position || !matched {
                    let what = format!(
                        "no lost writes: {name} acked Drained({}) with {} applied and universes that {}",
                        final_position.0,
                        applied.0,
                        if matched { "match" } else { "differ" }
                    );
                    self.checker.violation(now, what);
                }
            }
            DataEvent::TransformFailed(e) => {
                self.checker.violation(now, format!("transform on {name} failed: {e}"));
            }
        }
    }

    /// Whether the new store holds exactly the old store's data, transformed (the simulator's
    /// own check, independent of the core's comparison).
    pub fn universes_match(&self, i: usize) -> bool {
        let d = &self.data[i];
        let mut expected = MemStore::with_schema(&self.mapping.new_schema());
        for (table, rows) in d.old.tables() {
            for (key, row) in rows {
                let op = RowOp::Upsert { table: table.clone(), key: *key, row: row.clone() };
                for converted in self.mapping.convert(&op).unwrap_or_default() {
                    expected.write(&converted);
                }
            }
        }
        expected.checksum() == d.new.checksum()
    }

    pub fn crash_data(&mut self, i: usize) {
        let addr = self.data[i].addr;
        if !self.set_up(addr, false) {
            return;
        }
        // The stores and the disk survive; snapshots die with the process's connections.
        self.data[i].old.disconnect();
        let core = DataProc::core(self, &self.data[i].name);
        let d = &mut self.data[i];
        d.core = core;
        d.armed_ms = None;
        d.serving = None;
        let name = d.name.clone();
        self.record(format_args!("{name} crashed"));
    }

    pub fn restart_data(&mut self, i: usize) {
        let addr = self.data[i].addr;
        if !self.set_up(addr, true) {
            return;
        }
        let d = &self.data[i];
        let (record, checkpoint, old_fenced) = (d.disk, d.new.checkpoint(), d.old.is_fenced());
        let name = d.name.clone();
        self.record(format_args!("{name} restarted with {:?}, checkpoint {}", record.decision, checkpoint.applied.0));
        self.data_node(i, DataInput::Boot { record, checkpoint, old_fenced });
    }
}

fn execute_old(store: &mut MemStore, op: &AppOp, history: &mut History) -> DataResponse {
    if op.read_only() {
        return StoreAnswer::Ok { body: app::v1::read(store, op), position: store.captured() };
    }
    match app::v1::write(store, op) {
        Err(reason) => StoreAnswer::Rejected { reason },
        Ok(ops) => {
            for row_op in ops {
                match store.write_captured(row_op.clone()) {
                    Ok(position) => history.record(position, &row_op),
                    Err(e) => return StoreAnswer::Rejected { reason: e.to_string() },
                }
            }
            StoreAnswer::Ok { body: None, position: store.captured() }
        }
    }
}

fn execute_new(store: &mut MemStore, op: &AppOp) -> DataResponse {
    let position = store.checkpoint().applied;
    if op.read_only() {
        return StoreAnswer::Ok { body: app::v2::read(store, op), position };
    }
    match app::v2::write(store, op) {
        Err(reason) => StoreAnswer::Rejected { reason },
        Ok(ops) => {
            for row_op in &ops {
                store.write(row_op);
            }
            StoreAnswer::Ok { body: None, position }
        }
    }
}
