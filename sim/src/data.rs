//! A data node process in the simulator: the production data-node actor over simulated I/O.
//! The old and the new store of one shard are [`MemStore`]s behind the data-store interface;
//! the core decides every read, write, fence and admission, the actor wires it, and this file
//! performs the I/O.

use crate::app::{self, AppOp};
use crate::checkers::fidelity::History;
use crate::checkers::observed::{self, StoreFigures};
use crate::checkers::{applied_once, fenced_after_frozen, opened_after_commit, AdmissionPoint, Violation};
use crate::config::Bug;
use crate::net::ProcId;
use crate::node_io::{sim_clock, SimClock, SimDisk};
use crate::procs::MEM;
use crate::procs::{ReplyTo, SimDataRequest};
use crate::wire::{DataMessage, DataResponse};
use crate::world::{detached, with, SimTransport, World};
use node::data_node::{DataBoot, DataNodeActor, DataRequest as ActorRequest, RouterFrozen};
use node::io::Stores;
use node_core::data_node::{DataEvent, DataNodeConfig, DataNodeCore, StoreOp, StoreResult};
use node_core::store::{Batch, MemStore, NewStore, OldStore};
use node_core::{RequestKey, StoreAnswer};
use protocol::codec;
use protocol::messages::Phase;
use protocol::schema::{RowOp, Value};
use protocol::{Duty, Generation, Universe};
use rand::Rng;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Weak;

/// Pause between two transform steps.
const TRANSFORM_INTERVAL_MS: u64 = 10;
/// Pause between two reads of an idle change stream (every write passes through the data node
/// in the simulator, which wakes the stream at once).
const TRANSFORM_IDLE_MS: u64 = 50;
/// Pause before a failed store operation is tried again.
const STORE_RETRY_MS: u64 = 20;
/// Most request answers a data node remembers for idempotency.
const ANSWERS_MAX: usize = 65_536;
/// Most old rows per range a data node compares while traffic runs.
const RANGE_ROWS: usize = 50;
/// Least pause between two comparisons of ranges compared before (changed since).
const RANGE_AGAIN_MS: u64 = 500;
/// Batches kept per shard for the re-delivery fault.
const BATCHES_KEPT: usize = 4;
/// Small, so that pruning the change log happens within a seed.
pub(crate) const CHANGE_LOG_APPLIED_MAX: u64 = 40;

pub type DataActor = DataNodeActor<SimTransport, SimDisk, SimStores, SimClock>;

/// A data node's stores and requests, in the simulated world.
pub struct SimStores {
    world: Weak<std::sync::Mutex<World>>,
    index: usize,
    incarnation: u64,
}

impl SimStores {
    fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> Option<T> {
        let shared = self.world.upgrade()?;
        let addr = ProcId::Data(self.index).addr();
        with(&shared, |w| w.is_up(addr, self.incarnation).then(|| f(w)))
    }
}

impl Stores for SimStores {
    type Request = SimDataRequest;

    fn execute(
        &self,
        key: RequestKey,
        request: &SimDataRequest,
        universe: Universe,
    ) -> impl Future<Output = StoreAnswer> + 'static {
        let index = self.index;
        let answer = self.with(|w| {
            let d = &mut w.data[index];
            match universe {
                Universe::Old => execute_old(d.from, &mut d.old, key, &request.op, &mut w.fidelity.shards[index]),
                Universe::New => {
                    if d.drifted {
                        w.checker.mirrors.answered_by_drifted(key);
                    }
                    execute_new(d.from.next(), &mut d.new, key, &request.op)
                }
            }
        });
        std::future::ready(answer.unwrap_or_else(|| StoreAnswer::Rejected { reason: "the process is down".into() }))
    }

    fn reply(&self, request: SimDataRequest, answer: StoreAnswer) {
        self.with(|w| w.answer(request.reply_to, codec::encode_frame(&answer).expect("data responses encode")));
    }

    fn store(&self, op: StoreOp) -> impl Future<Output = StoreResult> + 'static {
        let index = self.index;
        if let StoreOp::Apply(batch) = &op {
            self.with(|w| w.data[index].applying = Some(batch.checkpoint.clone()));
        }
        if op == StoreOp::Fence {
            // Judged by the decision on disk when the node asked (a slow store may fence only
            // after the node learned the outcome; the unfence then follows).
            self.with(|w| w.data[index].fence_asked_with = Some(w.data[index].disk.decision));
        }
        // A slow store (the load fault) takes a drawn time, and does the work at its end.
        let delay_us = self
            .with(|w| match w.faults.store_delay_us_max {
                0 => 0,
                max => w.rng.gen_range(0..=max),
            })
            .unwrap_or(0);
        // The operation moves into whichever path runs it (a batch is not copied).
        let (early, op) =
            if delay_us == 0 { (Some(self.with(|w| w.store_op(index, op))), None) } else { (None, Some(op)) };
        let (world, incarnation) = (self.world.clone(), self.incarnation);
        async move {
            let result = match (early, op) {
                (Some(result), _) => result,
                (None, Some(op)) => {
                    detached(tokio::time::sleep(std::time::Duration::from_micros(delay_us))).await;
                    let later = SimStores { world, index, incarnation };
                    later.with(|w| w.store_op(index, op))
                }
                (None, None) => unreachable!("one of the two paths has the operation"),
            };
            // A dead process's store operations never complete (its actor is gone anyway).
            match result {
                Some(result) => result,
                None => std::future::pending().await,
            }
        }
    }

    fn event(&self, event: DataEvent) {
        let index = self.index;
        self.with(|w| w.data_event(index, event));
    }

    fn observe(&self, _now_ms: u64, core: &DataNodeCore) {
        let index = self.index;
        self.with(|w| {
            let d = &w.data[index];
            let checkpoint =
                observed::checkpoint(&d.name, core.checkpoint(), &d.new.checkpoint().expect(MEM), d.applying.as_ref());
            let got = StoreFigures {
                fenced: d.old.is_fenced().expect(MEM),
                snapshots_open: d.old.open_snapshots(),
                changes_kept: d.old.changes().kept() as u64,
            };
            let seen = StoreFigures {
                fenced: d.fenced_seen,
                snapshots_open: d.snapshots_seen,
                changes_kept: d.old.captured().0 - d.pruned_seen,
            };
            let store = observed::store(&d.name, got, seen);
            if checkpoint.is_some() || store.is_some() {
                let now = w.now_us();
                w.checker.found(now, checkpoint);
                w.checker.found(now, store);
            }
        });
    }
}

impl World {
    /// A request for data node `i` arrived from the network.
    pub fn data_request(&mut self, i: usize, bytes: &[u8], reply_to: ReplyTo) {
        let refused = match codec::decode_frame::<DataMessage>(bytes) {
            Ok(Some((DataMessage::Frozen { router, epoch }, _))) => {
                let name = self.data[i].name.clone();
                self.record(format_args!("{name} hears {router} frozen for {epoch}"));
                if let Some(notices) = self.data[i].notices.as_ref() {
                    notices.do_send(RouterFrozen { router, epoch });
                }
                return;
            }
            Ok(Some((DataMessage::Request(request), _))) => match self.data[i].actor.as_ref() {
                Some((actor, _)) => {
                    let read_only = request.op.read_only();
                    actor.do_send(ActorRequest {
                        key: request.key,
                        generation: request.generation,
                        mirror: request.mirror,
                        read_only,
                        request: SimDataRequest { op: request.op, reply_to },
                    });
                    return;
                }
                None => return,
            },
            Ok(None) => DataResponse::Rejected { reason: "truncated frame".into() },
            Err(e) => DataResponse::Rejected { reason: e.to_string() },
        };
        self.answer(reply_to, codec::encode_frame(&refused).expect("data responses encode"));
    }

    /// Performs one store operation, or fails it (the store fault): before it took effect, or
    /// after (the answer of a commit lost). A failed apply leaves `applying` as it was: the
    /// core's checkpoint stays that batch's until it reads the store's again.
    fn store_op(&mut self, i: usize, op: StoreOp) -> StoreResult {
        let rate = self.faults.store_failures;
        if rate <= 0.0 || self.healed || !self.rng.gen_bool(rate) {
            return self.store_op_now(i, op);
        }
        let performed = self.rng.gen_bool(0.5);
        let name = self.data[i].name.clone();
        let what = op.kind();
        self.record(format_args!("fault: {name}'s store fails {what} (performed: {performed})"));
        self.stats.store_failures += 1;
        if performed {
            let applying = self.data[i].applying.clone();
            let _ = self.store_op_now(i, op);
            self.data[i].applying = applying;
        }
        StoreResult::Failed { reason: "the store is busy (injected)".into() }
    }

    /// Performs one store operation through the data-store interface.
    fn store_op_now(&mut self, i: usize, op: StoreOp) -> StoreResult {
        let d = &mut self.data[i];
        match op {
            StoreOp::OpenSnapshot => {
                d.snapshots_seen += 1;
                let (snapshot, at) = d.old.open_snapshot().expect(MEM);
                let rows = d.old.snapshot_rows(snapshot).expect(MEM);
                StoreResult::SnapshotOpened { snapshot, at, rows }
            }
            StoreOp::ReadSnapshot { snapshot, after, limit } => match d.old.snapshot_chunk(snapshot, &after, limit) {
                Ok(chunk) => StoreResult::Chunk(chunk),
                Err(_) => StoreResult::SnapshotGone,
            },
            StoreOp::ReadChanges { after, limit } => {
                StoreResult::Changes(d.old.changes_after(after, limit).expect(MEM))
            }
            StoreOp::Apply(batch) => {
                d.applying = None;
                let before = d.new.checkpoint().expect(MEM);
                let accepted = d.new.apply_batch(&batch).expect(MEM);
                let found = applied_once::check(&d.name, &before, &batch, accepted.is_ok());
                let now = self.now_us();
                self.checker.found(now, found);
                let result = match accepted {
                    Ok(()) => {
                        let position = batch.checkpoint.applied;
                        let new = &self.data[i].new;
                        if let Some(what) = self.fidelity.check_batch(i, &self.mapping, &batch.ops, position, new) {
                            let name = self.data[i].name.clone();
                            self.checker.violation(now, Violation::TransformFidelity { node: name, what });
                        }
                        StoreResult::Applied
                    }
                    Err(stale) => StoreResult::ApplyRefused(stale),
                };
                self.redeliver(i, batch);
                result
            }
            StoreOp::Fence => {
                if !d.old.is_fenced().expect(MEM) {
                    let asked_with = self.data[i].fence_asked_with.unwrap_or(self.data[i].disk.decision);
                    let routers = self.routers_in_service(asked_with.epoch());
                    let d = &self.data[i];
                    let found = fenced_after_frozen::check(&self.checker.acks_counted, &routers, &d.name, asked_with);
                    let now = self.now_us();
                    self.checker.found(now, found);
                }
                let d = &mut self.data[i];
                d.fenced_seen = true;
                let final_position = d.old.fence().expect(MEM);
                StoreResult::Fenced { final_position }
            }
            StoreOp::Unfence => {
                d.fenced_seen = false;
                d.old.unfence().expect(MEM);
                StoreResult::Unfenced
            }
            StoreOp::ReadRows { after, limit } => StoreResult::Rows(d.old.rows_chunk(&after, limit).expect(MEM)),
            StoreOp::Stage { rows, first } => StoreResult::Staged { rejected: d.new.stage(&rows, first).expect(MEM) },
            StoreOp::CompareStaged => {
                let (expected, actual) = d.new.compare_staged().expect(MEM);
                StoreResult::Compared { expected, actual }
            }
            StoreOp::ReadRowsToCompare { after, limit } => {
                let (chunk, through) = d.old.rows_to_compare(&after, limit).expect(MEM);
                StoreResult::RowsToCompare { chunk, through }
            }
            StoreOp::CompareStagedKeys => StoreResult::KeysCompared(d.new.compare_staged_keys().expect(MEM)),
            StoreOp::ReadCheckpoint => StoreResult::Checkpoint(d.new.checkpoint().expect(MEM)),
            StoreOp::OpenNew => {
                if !d.new.is_open_to_clients() {
                    let found = opened_after_commit::check(&d.name, d.from, d.disk.decision, d.disk.generation);
                    let now = self.now_us();
                    self.checker.found(now, found);
                }
                let d = &mut self.data[i];
                d.new.open_to_clients(&Default::default()).expect(MEM);
                StoreResult::OpenedToClients
            }
            StoreOp::RemoveCapture => {
                // Every change goes (an unapplied one would be lost: the checkers of lost writes
                // and of the transform's fidelity see that).
                d.old.remove_capture().expect(MEM);
                d.pruned_seen = d.old.captured().0;
                StoreResult::CaptureRemoved
            }
            StoreOp::HoldWriters => {
                d.new.hold_writers().expect(MEM);
                StoreResult::WritersHeld
            }
            StoreOp::ReleaseWriters => {
                d.new.release_writers().expect(MEM);
                StoreResult::WritersReleased
            }
            StoreOp::Prune { up_to } => {
                d.pruned_seen = d.pruned_seen.max(up_to.0.min(d.old.captured().0));
                d.old.prune(up_to).expect(MEM);
                StoreResult::Pruned
            }
        }
    }

    /// The re-delivery fault: at the seed's rate, a batch this store applied before comes again
    /// (a retried commit whose first answer was lost, or a late duplicate). The store must
    /// refuse it; the shell swallows the answer, as a driver's retry would.
    fn redeliver(&mut self, i: usize, batch: Batch) {
        let rate = self.faults.redeliver_batches;
        if rate <= 0.0 || self.healed {
            return;
        }
        let d = &mut self.data[i];
        if d.delivered.len() >= BATCHES_KEPT {
            d.delivered.pop_front();
        }
        d.delivered.push_back(batch);
        if !self.rng.gen_bool(rate) {
            return;
        }
        let old = self.data[i].delivered[self.rng.gen_range(0..self.data[i].delivered.len())].clone();
        let d = &mut self.data[i];
        let before = d.new.checkpoint().expect(MEM);
        let accepted = d.new.apply_batch(&old).expect(MEM).is_ok();
        let name = d.name.clone();
        let found = applied_once::check(&name, &before, &old, accepted);
        let now = self.now_us();
        self.record(format_args!("fault: batch up to {} delivered again to {name}", old.checkpoint.applied.0));
        self.checker.found(now, found);
    }

    fn data_event(&mut self, i: usize, event: DataEvent) {
        let (now, name) = (self.now_us(), self.data[i].name.clone());
        match event {
            DataEvent::Acted(decision) => self.note_acted(ProcId::Data(i), decision),
            DataEvent::Admitted { key, universe } => {
                let from = self.data[i].from;
                let generation = if universe == Universe::New { from.next() } else { from };
                let found =
                    self.checker.single_universe.admitted(now, AdmissionPoint::Store, &name, generation, key.id);
                self.checker.found(now, found);
            }
            DataEvent::Copying => {
                self.stats.copying_seen.insert(i, true);
            }
            DataEvent::Fenced { final_position } => {
                self.record(format_args!("{name} fenced old store at {}", final_position.0));
                self.fire_on(crate::faults::Condition::Fenced { data: i });
            }
            DataEvent::Compared { final_position, matched } => {
                // The node's comparison against the stores themselves (row by row, not by
                // checksum); the universes may differ only after a rogue writer's change.
                let real = self.universes_match(i);
                if matched != real {
                    let found =
                        Violation::ChecksumVerdictWrong { node: name.clone(), final_position, claimed: matched };
                    self.checker.violation(now, found);
                }
                if !real && !self.data[i].drifted {
                    self.checker.violation(now, Violation::ChecksumsDiffer { node: name, final_position });
                }
            }
            DataEvent::Drained { final_position, checksum_match, .. } => {
                self.record(format_args!("{name} drained at {} (checksums match: {checksum_match})", final_position.0));
                // What a commit relies on, checked independently of the core: everything up to
                // P is in the new universe, and the ack says truly whether both universes match.
                let applied = self.data[i].new.checkpoint().expect(MEM).applied;
                let real = self.universes_match(i);
                if applied < final_position || checksum_match != real {
                    let found = Violation::DrainedIncomplete {
                        node: name,
                        final_position,
                        applied,
                        claimed: checksum_match,
                        real,
                    };
                    self.checker.violation(now, found);
                }
            }
            DataEvent::TransformFailed(e) => {
                self.checker.violation(now, Violation::TransformFailed { node: name, error: e.to_string() });
            }
            DataEvent::RangeCompared { rows, matched } => {
                self.stats.ranges_compared += 1;
                if matched == Some(false) && !self.data[i].drifted {
                    self.checker.violation(now, Violation::RangeDiffers { node: name, rows });
                }
            }
            DataEvent::Abandoned { upgrade } => {
                self.stats.abandoned += 1;
                self.data[i].abandoned = true;
                self.record(format_args!("{name} abandoned rolled-back upgrade {}", upgrade.0));
                // Judged by the replicated state, not by the node's view: the upgrade ended
                // rolled back, and the cluster still serves the node's old generation.
                let state = self.freshest_state();
                let from = self.data[i].from;
                let why = match state.current.as_ref() {
                    _ if state.generation != from => {
                        Some(format!("the cluster serves generation {}, not {}", state.generation.0, from.0))
                    }
                    Some(u) if u.id == upgrade && u.phase != Phase::RolledBack => Some(format!("it is {:?}", u.phase)),
                    Some(u) if u.id.0 < upgrade.0 => Some(format!("the cluster's last upgrade is {}", u.id.0)),
                    // (A group rebuilt after a disaster may not know the lost group's upgrade.)
                    None if self.lost_groups.is_empty() => Some("no upgrade ever started".to_string()),
                    _ => None,
                };
                if let Some(why) = why {
                    self.checker.violation(now, Violation::AbandonedUnended { node: name, upgrade: upgrade.0, why });
                }
            }
            // Injected by `store_op` (and recorded there); the node tries again.
            DataEvent::CopyStarted { .. } => self.data[i].abandoned = false,
            DataEvent::StoreFailed { .. } | DataEvent::CopyDone { .. } | DataEvent::CopyAgain { .. } => {}
        }
    }

    /// Whether the new store holds exactly the old store's data, transformed (the simulator's
    /// own check, row by row: independent of the core's comparison and of its checksums).
    pub fn universes_match(&self, i: usize) -> bool {
        let d = &self.data[i];
        if self.mapping.rows_stand_alone() {
            // Each new row comes from one old row: look each converted row up (no store built).
            let mut converted = 0usize;
            for (table, rows) in d.old.tables() {
                for (key, row) in rows {
                    let op = RowOp::Upsert { table: table.clone(), key: *key, row: row.clone() };
                    for c in self.mapping.convert(&op).unwrap_or_default() {
                        let RowOp::Upsert { table, key, row } = &c else { return false };
                        if d.new.get(table, *key) != Some(row) {
                            return false;
                        }
                        converted += 1;
                    }
                }
            }
            return converted == d.new.tables().values().map(BTreeMap::len).sum::<usize>();
        }
        let mut expected = MemStore::with_schema(&self.mapping.new_schema());
        for (table, rows) in d.old.tables() {
            for (key, row) in rows {
                let op = RowOp::Upsert { table: table.clone(), key: *key, row: row.clone() };
                for converted in self.mapping.convert(&op).unwrap_or_default() {
                    expected.write(&converted);
                }
            }
        }
        expected.tables() == d.new.tables()
    }

    /// The drift fault: a rogue writer (a console session, a cron job, a fix by hand) changes
    /// `rows` rows of shard `i`'s new database behind the transform's back, before the switch.
    /// Validation and the drain's comparison must keep clients off the new universe until the
    /// difference is gone. Returns what was changed, for the log.
    pub(crate) fn drift(&mut self, i: usize, rows: u32) -> Vec<String> {
        let picks: Vec<(String, i64)> = {
            let tables = self.data[i].new.tables();
            let all: Vec<(&String, &i64)> =
                tables.iter().flat_map(|(t, rows)| rows.keys().map(move |k| (t, k))).collect();
            if all.is_empty() {
                return Vec::new();
            }
            (0..rows).map(|_| all[self.rng.gen_range(0..all.len())]).map(|(t, k)| (t.clone(), *k)).collect()
        };
        let mut changed = Vec::new();
        for (table, key) in picks {
            let Some(mut row) = self.data[i].new.get(&table, key).cloned() else { continue };
            let Some((column, value)) = row.iter_mut().find(|(_, v)| !matches!(v, Value::Null)) else { continue };
            match value {
                Value::Int(n) => *n = n.wrapping_add(1_000),
                Value::Text(t) => t.push_str(" (edited by hand)"),
                Value::Null => unreachable!("skipped above"),
            }
            changed.push(format!("{table}[{key}].{column}"));
            self.data[i].new.write(&RowOp::Upsert { table, key, row });
        }
        if !changed.is_empty() {
            self.data[i].drifted = true;
            self.stats.drift_seen = true;
        }
        changed
    }

    /// The operator deploys the upgrade from `generation` (the one the cluster serves now):
    /// its plan, and each data node's two stores for it. After a switch the new store becomes
    /// the old one and an empty store for the next generation is added (the store of the
    /// generation before is retired); after a rollback the new store is replaced by an empty
    /// one. Each data node's agent restarts with that configuration (a running one is stopped
    /// first: in-flight requests at it are lost, as at any restart).
    pub fn deploy_next(&mut self, generation: protocol::Generation) {
        // The upgrade that ended is judged now: later ones freeze after it.
        let state = self.freshest_state();
        let now = self.now_us();
        let found = crate::checkers::attempts::check(&state, self.stats.epochs_before);
        self.checker.found(now, found);
        self.stats.epochs_before = state.last_epoch.0;
        let plan = &self.plan;
        let text = app::plan_toml(
            generation,
            self.config.routers,
            self.config.data_nodes,
            plan.max_attempts,
            plan.thresholds.hold_ms_max,
            u64::from(plan.thresholds.hold_queue_max),
            plan.thresholds.freeze_timeout_ms,
            plan.switch == protocol::plan::SwitchMode::Manual,
        );
        let plan = protocol::plan::Plan::from_toml("sim-plan.toml", &text).expect("the simulator's plans are valid");
        let mapping = plan.mapping().expect("the simulator's transforms fit");
        let switched = self.data.iter().all(|d| d.from.next() == generation);
        assert!(switched || self.data.iter().all(|d| d.from == generation), "every data node is deployed alike");
        self.record(format_args!("operator: deploys {} (from {generation})", plan.name));
        self.plan = plan;
        self.mapping = mapping.clone();
        // After a rollback, in half the upgrades (by seed and upgrade, not drawn: schedules
        // stay as they were), the operator retries with the data nodes left running on their
        // stores: each abandoned the rolled-back upgrade, and copies afresh for the next.
        if !switched && (self.seed + state.upgrades_started).is_multiple_of(2) {
            self.record(format_args!("operator: the data nodes keep running for the retry"));
            return;
        }
        for i in 0..self.data.len() {
            let up = self.procs[&self.data[i].addr].up;
            if up {
                self.crash_data(i);
            }
            let d = &mut self.data[i];
            let fresh = MemStore::new_universe(mapping.clone());
            if switched {
                d.old = std::mem::replace(&mut d.new, fresh);
                d.pruned_seen = 0;
            } else {
                d.new = fresh;
            }
            d.from = generation;
            d.fenced_seen = d.old.is_fenced().expect(MEM);
            d.delivered.clear();
            d.drifted = false;
            d.applying = None;
            d.abandoned = false;
            d.fence_asked_with = None;
            if up {
                self.restart_data(i);
            }
        }
        if switched {
            // The old rows the transform must match are now the last switch's new rows.
            self.fidelity = crate::checkers::fidelity::Fidelity::new(&mapping);
            self.fidelity.shards =
                self.data.iter().map(|d| crate::checkers::fidelity::History::initial(d.old.tables())).collect();
        }
    }

    pub fn crash_data(&mut self, i: usize) {
        let addr = self.data[i].addr;
        if !self.set_up(addr, false) {
            return;
        }
        // The process and every task it started end at once. The stores and the disk survive;
        // snapshots die with the process's connections.
        self.data[i].notices = None;
        if let Some((_, task)) = self.data[i].actor.take() {
            task.abort();
        }
        self.data[i].old.disconnect();
        self.data[i].snapshots_seen = 0;
        self.data[i].applying = None;
        let name = self.data[i].name.clone();
        self.checker.propagation.crashed(&name);
        self.record(format_args!("{name} crashed"));
    }

    pub fn restart_data(&mut self, i: usize) {
        let addr = self.data[i].addr;
        if !self.set_up(addr, true) {
            return;
        }
        let d = &self.data[i];
        let boot = DataBoot {
            record: d.disk.clone(),
            checkpoint: d.new.checkpoint().expect(MEM),
            old_fenced: d.old.is_fenced().expect(MEM),
        };
        let name = d.name.clone();
        self.record(format_args!(
            "{name} restarted with {:?}, checkpoint {}",
            boot.record.decision, boot.checkpoint.applied.0
        ));
        let config = DataNodeConfig {
            agent: self.agent_config(&name, vec![Duty::Capture, Duty::Transform], Some(self.data[i].from)),
            transform_interval_ms: TRANSFORM_INTERVAL_MS,
            transform_idle_ms: TRANSFORM_IDLE_MS,
            store_retry_ms: STORE_RETRY_MS,
            positions: Default::default(),
            copy_rows_per_s_max: self.plan.copy_rows_per_s_max,
            // Small chunks by default: the simulator's tables take several, with writes between.
            copy_chunk_rows: self.plan.copy_chunk_rows.unwrap_or(node_core::duties::transform::COPY_CHUNK_ROWS),
            compare_chunk_rows: node_core::data_node::COMPARE_CHUNK_ROWS,
            // Small ranges: the simulator's tables are cut into several.
            range_rows: self.mapping.rows_stand_alone().then_some(RANGE_ROWS),
            range_again_ms: RANGE_AGAIN_MS,
            answers_max: ANSWERS_MAX,
            change_log_applied_max: CHANGE_LOG_APPLIED_MAX,
        };
        let bug = self.config.bug;
        let core = DataNodeCore::new(config).with_bug(Bug::transform(bug)).with_agent_bug(Bug::agent(bug));
        let incarnation = self.procs[&addr].incarnation;
        let world = self.me.clone();
        let actor = DataActor::new(
            core,
            boot,
            SimTransport { world: world.clone(), me: addr, detach: true, incarnation: Some(incarnation) },
            SimDisk { world: world.clone(), node: ProcId::Data(i), incarnation },
            SimStores { world, index: i, incarnation },
            sim_clock(self),
        );
        let (addr, task) = node::start_local(actor);
        self.data[i].notices = Some(addr.clone().recipient());
        self.data[i].actor = Some((addr.recipient(), task));
    }
}

/// A request on the old store, as a database adapter runs it: a read as it is; a write in one
/// transaction with its request-log entry, or answered from the log if it is there already.
fn execute_old(
    generation: Generation,
    store: &mut MemStore,
    key: RequestKey,
    op: &AppOp,
    history: &mut History,
) -> DataResponse {
    if op.read_only() {
        return StoreAnswer::Ok { body: app::read(generation, store, op), position: store.captured() };
    }
    let (answer, written) = store.execute_write(key, true, |store| app::write(generation, store, op));
    for (at, row_op) in written {
        history.record(at, row_op);
    }
    answer
}

/// The same on the new store (whose request log holds the old one's, carried by the transform).
fn execute_new(generation: Generation, store: &mut MemStore, key: RequestKey, op: &AppOp) -> DataResponse {
    if op.read_only() {
        return StoreAnswer::Ok {
            body: app::read(generation, store, op),
            position: store.checkpoint().expect(MEM).applied,
        };
    }
    store.execute_write(key, false, |store| app::write(generation, store, op)).0
}
