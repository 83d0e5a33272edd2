//! A data node process: the old and the new store of one shard, capture, transform, drain.

use crate::app::{self, AppOp};
use crate::checker::AdmissionPoint;
use crate::config::Bug;
use crate::wire::{DataRequest, DataResponse};
use crate::world::{World, DATA_BASE};
use node_core::agent::{AgentConfig, AgentCore, AgentInput, AgentOutput};
use node_core::duties::drain::{DrainCore, DrainInput, DrainOutput};
use node_core::duties::transform::{CopyState, TransformCore, Work};
use node_core::store::MemStore;
use protocol::codec;
use protocol::messages::NodeReport;
use protocol::schema::Mapping;
use protocol::{Decision, Duty, Universe};
use std::collections::BTreeMap;

/// A data node. `old`, `new`, `persisted` and `executed` are its disk.
pub struct DataProc {
    pub addr: u64,
    pub name: String,
    pub old: MemStore,
    pub new: MemStore,
    pub persisted: Decision,
    /// Answers already given, by request id (client requests are idempotent by id).
    pub executed: BTreeMap<u64, DataResponse>,
    pub agent: AgentCore,
    pub transform: TransformCore,
    pub drain: DrainCore,
    /// Whether this node has started before (a planted restart bug needs a restart).
    pub booted: bool,
    /// The last comparison of both universes while fenced: (old last, new applied, matched).
    pub compared: Option<(protocol::Position, protocol::Position, bool)>,
}

impl DataProc {
    pub fn new(world: &World, index: usize) -> DataProc {
        let name = format!("db-{index}");
        let old = MemStore::with_schema(&world.plan.old_schema);
        let new = MemStore::with_schema(&world.mapping.new_schema());
        let mut proc = DataProc {
            addr: DATA_BASE + index as u64,
            agent: AgentCore::new(world.agent_config(&name, vec![Duty::Capture, Duty::Transform])),
            transform: TransformCore::new(world.mapping.clone(), new.checkpoint.clone()),
            drain: DrainCore::new(new.checkpoint.applied, false),
            name,
            old,
            new,
            persisted: Decision::Initial,
            executed: BTreeMap::new(),
            booted: false,
            compared: None,
        };
        let agent = world.agent_config(&proc.name, vec![Duty::Capture, Duty::Transform]);
        proc.rebuild_volatile(agent, &world.mapping, world.config.bug);
        proc
    }

    /// Rebuilds what a crash loses from what the disk kept.
    fn rebuild_volatile(&mut self, agent: AgentConfig, mapping: &Mapping, bug: Option<Bug>) {
        self.agent = AgentCore::new(agent);
        self.transform = TransformCore::new(mapping.clone(), self.new.checkpoint.clone());
        if self.booted {
            self.transform = self.transform.clone().with_bug(Bug::transform(bug));
        }
        self.booted = true;
        self.drain = DrainCore::new(self.new.checkpoint.applied, self.old.capture.is_fenced());
    }
}

impl World {
    /// Serves one client request forwarded by a router.
    pub fn data_request(&mut self, i: usize, _from: u64, bytes: &[u8]) -> Vec<u8> {
        let response = match codec::decode_frame::<DataRequest>(bytes) {
            Ok(Some((request, _))) => self.execute(i, request),
            Ok(None) => DataResponse::Rejected { reason: "truncated frame".into() },
            Err(e) => DataResponse::Rejected { reason: e.to_string() },
        };
        codec::encode_frame(&response).expect("data responses encode")
    }

    fn execute(&mut self, i: usize, request: DataRequest) -> DataResponse {
        if !request.mirror {
            if let Some(answer) = self.data[i].executed.get(&request.request) {
                return answer.clone();
            }
        }
        let accepting = self.data[i].drain.accepting();
        let d = &mut self.data[i];
        let response = match (request.universe, request.mirror) {
            (Universe::Old, true) => DataResponse::Rejected { reason: "mirrors go to the new universe".into() },
            (Universe::New, true) => {
                if !request.op.read_only() {
                    DataResponse::Rejected { reason: "only read-only requests are mirrored".into() }
                } else if d.new.checkpoint.copy != CopyState::Done {
                    // Nothing is complete before the bulk copy is: no answer would be conclusive.
                    DataResponse::Rejected { reason: "bulk copy in progress".into() }
                } else {
                    DataResponse::Ok { body: app::v2::read(&d.new, &request.op), position: d.new.checkpoint.applied }
                }
            }
            (universe, false) if accepting != Some(universe) => DataResponse::Rejected {
                reason: format!("{universe:?} universe not accepting (accepting {accepting:?})"),
            },
            (Universe::Old, false) => execute_old(&mut d.old, &request.op),
            (Universe::New, false) => execute_new(&mut d.new, &request.op),
        };
        if !request.mirror {
            if let DataResponse::Ok { .. } = response {
                let (now, name) = (self.now_us(), self.data[i].name.clone());
                self.checker.admitted(now, AdmissionPoint::Store, &name, request.universe, request.request);
            }
            self.data[i].executed.insert(request.request, response.clone());
        }
        response
    }

    pub fn data_agent_outputs(&mut self, i: usize, outs: Vec<AgentOutput>) {
        let addr = self.data[i].addr;
        self.send_agent_requests(addr, &outs);
        for out in outs {
            match out {
                AgentOutput::Send { .. } => {}
                AgentOutput::Persist(decision) => {
                    self.data[i].persisted = decision;
                    let name = self.data[i].name.clone();
                    self.note_persisted(&name, decision);
                }
                AgentOutput::Act(decision) => {
                    let name = self.data[i].name.clone();
                    self.note_acted(&name, decision);
                    let outs = self.data[i].drain.handle(DrainInput::Decision { decision, all_routers_frozen: false });
                    self.drain_outputs(i, outs);
                }
                AgentOutput::View(view) => {
                    if view.decision == self.data[i].agent.persisted() {
                        let input = DrainInput::Decision {
                            decision: view.decision,
                            all_routers_frozen: view.all_routers_frozen,
                        };
                        let outs = self.data[i].drain.handle(input);
                        self.drain_outputs(i, outs);
                    }
                }
            }
        }
    }

    fn drain_outputs(&mut self, i: usize, outs: Vec<DrainOutput>) {
        for out in outs {
            match out {
                DrainOutput::Fence => {
                    let final_position = self.data[i].old.capture.fence();
                    let name = self.data[i].name.clone();
                    self.record(format_args!("{name} fenced old store at {}", final_position.0));
                    let outs = self.data[i].drain.handle(DrainInput::Fenced { final_position });
                    self.drain_outputs(i, outs);
                }
                DrainOutput::Unfence => self.data[i].old.capture.unfence(),
                DrainOutput::CompareChecksums => {
                    let matched = self.universes_match_cached(i);
                    if !matched {
                        let (now, name) = (self.now_us(), self.data[i].name.clone());
                        self.checker.violation(
                            now,
                            format!("no lost writes: {name} checksums differ after applying up to the final position"),
                        );
                    }
                    let outs = self.data[i].drain.handle(DrainInput::Checksums { matched });
                    self.drain_outputs(i, outs);
                }
                DrainOutput::Ack { epoch, ack } => {
                    if let protocol::messages::Ack::Drained { final_position, .. } = &ack {
                        // What a commit relies on: everything up to P is in the new universe.
                        let applied = self.data[i].new.checkpoint.applied;
                        let matched = self.universes_match_cached(i);
                        if applied < *final_position || !matched {
                            let (now, name) = (self.now_us(), self.data[i].name.clone());
                            let what = format!(
                                "no lost writes: {name} acked Drained({}) with {} applied and universes that {}",
                                final_position.0,
                                applied.0,
                                if matched { "match" } else { "differ" }
                            );
                            self.checker.violation(now, what);
                        }
                    }
                    let now = self.now_ms();
                    let outs = self.data[i].agent.handle(now, AgentInput::OweAck { epoch, ack });
                    self.data_agent_outputs(i, outs);
                }
            }
        }
    }

    /// [`World::universes_match`], computed once per (fenced) final position.
    fn universes_match_cached(&mut self, i: usize) -> bool {
        let d = &self.data[i];
        let (old_at, new_at, fenced) = (d.old.capture.last(), d.new.checkpoint.applied, d.old.capture.is_fenced());
        if let Some((o, n, matched)) = d.compared {
            if fenced && (o, n) == (old_at, new_at) {
                return matched;
            }
        }
        let matched = self.universes_match(i);
        self.data[i].compared = fenced.then_some((old_at, new_at, matched));
        matched
    }

    /// Whether the new store holds exactly the old store's data, transformed.
    pub fn universes_match(&self, i: usize) -> bool {
        let d = &self.data[i];
        let mut expected = MemStore::with_schema(&self.mapping.new_schema());
        for (table, rows) in &d.old.tables {
            for (key, row) in rows {
                let op = protocol::schema::RowOp::Upsert { table: table.clone(), key: *key, row: row.clone() };
                for converted in self.mapping.convert(&op).unwrap_or_default() {
                    expected.write(&converted);
                }
            }
        }
        expected.checksum() == d.new.checksum()
    }

    /// Periodic work of data node `i`: one transform step, a report, the agent's timers.
    pub fn data_tick(&mut self, i: usize) {
        let now = self.now_ms();
        let committed = matches!(self.data[i].persisted, Decision::Commit(_));
        if !committed && self.data[i].agent.last_view().is_some_and(|v| v.known) {
            self.transform_step(i);
        }
        let d = &self.data[i];
        let report = NodeReport {
            captured: d.old.capture.last(),
            applied: d.new.checkpoint.applied,
            bulk_done: d.transform.bulk_done(),
            samples: 0,
            mismatches: 0,
        };
        let mut outs = self.data[i].agent.handle(now, AgentInput::Report(report));
        outs.extend(self.data[i].agent.handle(now, AgentInput::Tick));
        self.data_agent_outputs(i, outs);
    }

    fn transform_step(&mut self, i: usize) {
        let d = &mut self.data[i];
        let batch = match d.transform.next_work() {
            Work::Snapshot => {
                let at = d.old.snapshot();
                Ok(d.transform.copy_started(at))
            }
            Work::CopyChunk { snapshot_at, after, limit } => {
                let (rows, last) = d.old.snapshot_rows(snapshot_at, &after, limit);
                d.transform.copy_chunk(&rows, last)
            }
            Work::Stream { after, limit } => {
                let changes = d.old.capture.after(after, limit);
                if changes.is_empty() {
                    return;
                }
                d.transform.apply_changes(&changes)
            }
        };
        match batch {
            Ok(batch) => {
                d.new.apply_batch(&batch);
                let applied = batch.checkpoint.applied;
                if matches!(batch.checkpoint.copy, CopyState::Copying { .. }) {
                    self.stats.copying_seen.insert(i, true);
                }
                let outs = self.data[i].drain.handle(DrainInput::Applied { position: applied });
                self.drain_outputs(i, outs);
            }
            Err(e) => {
                let (now, name) = (self.now_us(), self.data[i].name.clone());
                self.checker.violation(now, format!("transform on {name} failed: {e}"));
            }
        }
    }

    pub fn crash_data(&mut self, i: usize) {
        let addr = self.data[i].addr;
        if !self.set_up(addr, false) {
            return;
        }
        let name = self.data[i].name.clone();
        self.record(format_args!("{name} crashed"));
    }

    pub fn restart_data(&mut self, i: usize) {
        let addr = self.data[i].addr;
        if !self.set_up(addr, true) {
            return;
        }
        let agent = self.agent_config(&self.data[i].name, vec![Duty::Capture, Duty::Transform]);
        let mapping = self.mapping.clone();
        self.data[i].rebuild_volatile(agent, &mapping, self.config.bug);
        let persisted = self.data[i].persisted;
        let now = self.now_ms();
        let outs = self.data[i].agent.handle(now, AgentInput::Boot { persisted });
        let name = self.data[i].name.clone();
        let applied = self.data[i].new.checkpoint.applied.0;
        self.record(format_args!("{name} restarted with {persisted:?}, checkpoint {applied}"));
        self.data_agent_outputs(i, outs);
    }
}

fn execute_old(store: &mut MemStore, op: &AppOp) -> DataResponse {
    if op.read_only() {
        return DataResponse::Ok { body: app::v1::read(store, op), position: store.capture.last() };
    }
    match app::v1::write(store, op) {
        Err(reason) => DataResponse::Rejected { reason },
        Ok(ops) => {
            for row_op in ops {
                if let Err(e) = store.write_captured(row_op) {
                    return DataResponse::Rejected { reason: e.to_string() };
                }
            }
            DataResponse::Ok { body: None, position: store.capture.last() }
        }
    }
}

fn execute_new(store: &mut MemStore, op: &AppOp) -> DataResponse {
    if op.read_only() {
        return DataResponse::Ok { body: app::v2::read(store, op), position: store.checkpoint.applied };
    }
    match app::v2::write(store, op) {
        Err(reason) => DataResponse::Rejected { reason },
        Ok(ops) => {
            for row_op in &ops {
                store.write(row_op);
            }
            DataResponse::Ok { body: None, position: store.checkpoint.applied }
        }
    }
}
