//! How a seed ends: whether the cluster has settled, and the checks made at the very end.

use crate::app::{self, AppOp};
use crate::checkers::lost_writes::{self, UserSeen};
use crate::checkers::{
    attempts, availability, change_log, durability, exactly_once, healthy_freeze, liveness, Violation,
};
use crate::oracle::ClientOutcome;
use crate::world::*;
use node_core::duties::router::Mode;
use node_core::store::NewStore;
use protocol::messages::Phase;

impl World {
    /// One registration per shard, through routers in turn: the users they register.
    pub(crate) fn send_probes(&mut self) -> Vec<(usize, i64)> {
        let shards = self.config.data_nodes;
        let mut probes = Vec::new();
        for shard in 0..shards {
            while self.next_user.rem_euclid(shards as i64) as usize != shard {
                self.next_user += 1;
            }
            let id = self.next_user;
            self.next_user += 1;
            let op = AppOp::RegisterUser {
                id,
                name: format!("user{id}"),
                email: format!("u{id}@example.org"),
                bio: format!("probe{id}"),
            };
            self.client_arrival(shard % self.routers.len(), op);
            probes.push((shard, id));
        }
        probes
    }

    /// Every probe was acknowledged.
    pub(crate) fn check_probes(&mut self, probes: &[(usize, i64)]) {
        let now = self.now_us();
        for (shard, id) in probes {
            let write = self.oracle.users.get(id).and_then(|u| u.registration()).copied();
            let outcome = write.and_then(|w| w.outcome());
            let found = availability::probe(*shard, outcome == Some(ClientOutcome::Acked), format!("{outcome:?}"));
            self.checker.found(now, found);
        }
    }

    /// The last upgrade of the chain ended and every router serves the final universe with
    /// nothing held.
    pub(crate) fn finished(&self) -> bool {
        let state = self.freshest_state();
        // (One more than the chain's upgrades when the last was lost in a disaster and started
        // again.)
        let last = self.started.last().copied().filter(|_| self.started.len() >= self.config.upgrades as usize);
        let Some(upgrade) = state.current.as_ref().filter(|u| Some(u.id) == last) else {
            return false;
        };
        let generation = match upgrade.phase {
            Phase::Done => upgrade.from.next(),
            Phase::RolledBack => upgrade.from,
            _ => return false,
        };
        // Routers in service: deployed, not retired (a retired one serves nothing, ever).
        self.routers
            .iter()
            .filter(|r| r.deployed && !r.retired)
            .all(|r| self.procs[&r.addr].up && r.observed.mode == Mode::Serving(generation) && r.observed.held == 0)
    }

    pub(crate) fn final_checks(&mut self) {
        let now = self.now_us();
        let state = self.freshest_state();
        let generation = match liveness::ended(&state) {
            Ok(generation) => generation,
            Err(violation) => {
                // An upgrade that did not end was already reported by the run loop, if it could.
                if self.checker.violations.is_empty() {
                    self.checker.violation(now, violation);
                }
                return;
            }
        };
        // A group lost in a disaster keeps its outcomes; the rebuilt one holds only the last.
        let mut outcomes = state.outcomes.clone();
        for lost in &self.lost_groups {
            for (e, o) in &lost.outcomes {
                outcomes.entry(*e).or_insert_with(|| o.clone());
            }
        }
        for found in durability::outcomes_kept(&self.checker.agreement.seen_outcomes, &outcomes) {
            self.checker.violation(now, found);
        }
        for found in healthy_freeze::check(
            &self.checker.frozen_healthy,
            &outcomes,
            self.stats.drift_seen || self.data.iter().any(|d| d.drifted),
        ) {
            self.checker.violation(now, found);
        }
        let found = attempts::check(&state, self.stats.epochs_before);
        self.checker.found(now, found);
        let shards = self.config.data_nodes as i64;
        // The final stores: the last upgrade's two (each data node is deployed for it).
        fn serving(d: &crate::procs::DataProc, generation: protocol::Generation) -> &node_core::store::MemStore {
            if generation == d.from {
                &d.old
            } else {
                &d.new
            }
        }
        let seen = |id: i64| {
            let d = &self.data[id.rem_euclid(shards) as usize];
            let (present, bio) = app::user(generation, serving(d, generation), id);
            let anywhere = d.old.get("users", id).is_some() || d.new.get("users", id).is_some();
            UserSeen { present, anywhere, bio }
        };
        let found = lost_writes::check(&self.oracle, generation, seen);
        for v in found {
            self.checker.violation(now, v);
        }
        let bids = |item: i64| {
            let d = &self.data[item.rem_euclid(shards) as usize];
            app::bids(generation, serving(d, generation), item)
        };
        for v in exactly_once::check_bids(&self.oracle, bids) {
            self.checker.violation(now, v);
        }
        // Rolled back or not, the transform keeps up while the upgrade runs: the new universe
        // may be switched to by a later attempt, so it must hold every change exactly once.
        // A rolled-back upgrade that a data node abandoned keeps no copy: nothing resumed it.
        for d in &self.data {
            if d.abandoned {
                let checkpoint = d.new.checkpoint().expect(crate::procs::MEM);
                if checkpoint.copy != node_core::store::CopyState::NotStarted {
                    let found =
                        Violation::AbandonedResumed { node: d.name.clone(), checkpoint: format!("{checkpoint:?}") };
                    self.checker.violation(now, found);
                }
                continue;
            }
            let (captured, applied) = (d.old.captured(), d.new.checkpoint().expect(crate::procs::MEM).applied);
            let found = exactly_once::check(&d.name, captured, applied);
            self.checker.found(now, found);
            let kept = d.old.changes().kept() as u64;
            let lag = captured.0.saturating_sub(applied.0);
            let found = change_log::check(&d.name, kept, lag, crate::data::CHANGE_LOG_APPLIED_MAX);
            self.checker.found(now, found);
        }
    }
}
