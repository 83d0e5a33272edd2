//! How a seed ends: whether the cluster has settled, and the checks made at the very end.

use crate::checkers::Violation;
use crate::oracle::ClientOutcome;
use crate::world::*;
use node_core::duties::router::Mode;
use node_core::store::NewStore;
use protocol::messages::Phase;
use protocol::schema::Value;
use protocol::Universe;

impl World {
    /// The upgrade ended and every router serves the final universe with nothing held.
    pub(crate) fn finished(&self) -> bool {
        let state = self.freshest_state();
        let Some(upgrade) = state.current.as_ref() else { return false };
        let universe = match upgrade.phase {
            Phase::Done => Universe::New,
            Phase::RolledBack => Universe::Old,
            _ => return false,
        };
        self.routers
            .iter()
            .all(|r| self.procs[&r.addr].up && r.observed.mode == Mode::Serving(universe) && r.observed.held == 0)
    }

    pub(crate) fn final_checks(&mut self) {
        let now = self.now_us();
        let state = self.freshest_state();
        let Some(upgrade) = state.current.clone() else {
            self.checker.violation(now, Violation::NeverStarted);
            return;
        };
        let universe = match upgrade.phase {
            Phase::Done => Universe::New,
            Phase::RolledBack => Universe::Old,
            phase => {
                if self.checker.violations.is_empty() {
                    self.checker.violation(now, Violation::EndedInPhase { phase });
                }
                return;
            }
        };
        // Durability: every outcome seen applied anywhere is in the final state.
        for (epoch, committed) in self.checker.agreement.seen_outcomes.clone() {
            let kept = state.outcomes.get(&epoch).map(|o| *o == coordinator::upgrade::Outcome::Committed);
            if kept != Some(committed) {
                self.checker.violation(now, Violation::OutcomeLost { epoch, committed, kept });
            }
        }
        let shards = self.config.data_nodes as i64;
        let mut lost = Vec::new();
        let mut phantom = Vec::new();
        for (id, outcome) in &self.oracle.registrations {
            let d = &self.data[id.rem_euclid(shards) as usize];
            let in_old = d.old.get("users", *id).is_some();
            let in_new = d.new.get("users", *id).is_some() && d.new.get("user_profiles", *id).is_some();
            let present = if universe == Universe::New { in_new } else { in_old };
            match outcome {
                ClientOutcome::Acked if !present => lost.push(*id),
                ClientOutcome::Failed if in_old || d.new.get("users", *id).is_some() => phantom.push(*id),
                _ => {}
            }
        }
        if !lost.is_empty() {
            self.checker.violation(now, Violation::LostWrites { universe, users: lost });
        }
        if !phantom.is_empty() {
            let what = format!("registrations reported failed are present: {:?}", &phantom[..phantom.len().min(10)]);
            self.checker.violation(now, Violation::PhantomWrite { what });
        }
        for (id, updates) in &self.oracle.bio_updates {
            let d = &self.data[id.rem_euclid(shards) as usize];
            let bio = if universe == Universe::New {
                d.new.get("user_profiles", *id).and_then(|r| r.get("bio").cloned())
            } else {
                d.old.get("users", *id).and_then(|r| r.get("bio").cloned())
            };
            let Some(Value::Text(bio)) = bio else { continue };
            if updates.iter().any(|(b, o)| *b == bio && *o == ClientOutcome::Failed) {
                let what = format!("user {id} has bio {bio} from an update reported failed");
                self.checker.violation(now, Violation::PhantomWrite { what });
            }
        }
        if universe == Universe::New {
            for d in &self.data {
                let (captured, applied) = (d.old.captured(), d.new.checkpoint().applied);
                if captured != applied {
                    let found = Violation::NotExactlyOnce { node: d.name.clone(), captured, applied };
                    self.checker.violation(now, found);
                }
            }
        }
    }
}
