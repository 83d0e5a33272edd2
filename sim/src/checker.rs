//! Invariant checkers (the invariants of docs/design.md). Fed by the world as events happen; every breach becomes a
//! violation line.

use protocol::{Decision, Epoch, Universe};
use std::collections::BTreeMap;

/// Where an admission was observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdmissionPoint {
    /// A router forwarded a client request.
    Router,
    /// A data node executed a client request.
    Store,
}

/// The invariant checkers of one run.
#[derive(Debug, Default)]
pub struct Checker {
    pub violations: Vec<String>,
    /// First admission to the new universe, per observation point: (time µs, who).
    first_new: BTreeMap<u8, (u64, String)>,
    /// Outcome acted on per epoch, and by whom first.
    acted: BTreeMap<Epoch, (Decision, String)>,
    /// Last decision each node persisted (across its restarts).
    persisted: BTreeMap<String, Decision>,
    /// Outcomes seen applied on any replica, per epoch.
    pub seen_outcomes: BTreeMap<Epoch, bool>,
    pub hold_bound_ms: u64,
    pub held_max_ms: u64,
}

fn point_key(p: AdmissionPoint) -> u8 {
    match p {
        AdmissionPoint::Router => 0,
        AdmissionPoint::Store => 1,
    }
}

impl Checker {
    pub fn new(hold_bound_ms: u64) -> Self {
        Checker { hold_bound_ms, ..Default::default() }
    }

    pub fn violation(&mut self, now_us: u64, what: String) {
        if self.violations.len() < 100 {
            self.violations.push(format!("t={:.3}s {what}", now_us as f64 / 1e6));
        }
    }

    /// Invariant 2 (single universe): a non-mirrored request admitted to the old universe
    /// after any request was admitted to the new one.
    pub fn admitted(&mut self, now_us: u64, point: AdmissionPoint, who: &str, universe: Universe, request: u64) {
        let key = point_key(point);
        match universe {
            Universe::New => {
                self.first_new.entry(key).or_insert_with(|| (now_us, who.to_string()));
            }
            Universe::Old => {
                if let Some((t, first)) = self.first_new.get(&key).cloned() {
                    self.violation(
                        now_us,
                        format!(
                            "single universe ({point:?}): {who} admitted request {request} to the old universe after {first} admitted to the new one at {:.3}s",
                            t as f64 / 1e6
                        ),
                    );
                }
            }
        }
    }

    /// Invariant 1 (agreement) and 5 (epochs never go backwards): `node` acts on `decision`,
    /// which `committed` says is (or is not) in some replica's applied state.
    pub fn acted(&mut self, now_us: u64, node: &str, decision: Decision, committed: bool) {
        if !committed {
            self.violation(now_us, format!("agreement: {node} acted on {decision:?}, which no replica has applied"));
        }
        if let Decision::Commit(e) | Decision::Abort(e) = decision {
            match self.acted.get(&e) {
                Some((other, who)) if *other != decision => {
                    let msg = format!("agreement: {node} acted on {decision:?} but {who} acted on {other:?}");
                    self.violation(now_us, msg);
                }
                Some(_) => {}
                None => {
                    self.acted.insert(e, (decision, node.to_string()));
                }
            }
        }
    }

    /// Invariant 5: what a node persists never goes backwards, across restarts too.
    pub fn persisted(&mut self, now_us: u64, node: &str, decision: Decision) {
        if let Some(prev) = self.persisted.get(node) {
            if decision.order_key() < prev.order_key() {
                self.violation(
                    now_us,
                    format!("durability: {node} persisted {decision:?} after {prev:?} (epoch went backwards)"),
                );
            }
        }
        self.persisted.insert(node.to_string(), decision);
    }

    /// Invariant 4: a held request was released or failed after `held_ms`.
    pub fn released(&mut self, now_us: u64, router: &str, held_ms: u64) {
        self.held_max_ms = self.held_max_ms.max(held_ms);
        if held_ms > self.hold_bound_ms {
            self.violation(
                now_us,
                format!("bounded hold: {router} held a request {held_ms} ms > {} ms", self.hold_bound_ms),
            );
        }
    }

    /// Invariant 4 checked by scan: the oldest request a router still holds.
    pub fn holding(&mut self, now_us: u64, router: &str, oldest_since_ms: u64, now_ms: u64) {
        let held = now_ms.saturating_sub(oldest_since_ms);
        if held > self.hold_bound_ms {
            self.violation(
                now_us,
                format!("bounded hold: {router} still holds a request after {held} ms > {} ms", self.hold_bound_ms),
            );
        }
    }

    /// Invariants 1 and 5 across replicas: an epoch's outcome as applied by some replica.
    pub fn outcome_applied(&mut self, now_us: u64, replica: u64, epoch: Epoch, committed: bool) {
        match self.seen_outcomes.get(&epoch) {
            Some(prev) if *prev != committed => {
                self.violation(
                    now_us,
                    format!("agreement: replica {replica} applied {epoch} as committed={committed}, another as {prev}"),
                );
            }
            Some(_) => {}
            None => {
                self.seen_outcomes.insert(epoch, committed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_admission_after_a_new_one_is_a_violation() {
        let mut c = Checker::new(1_010);
        c.admitted(1, AdmissionPoint::Router, "r1", Universe::Old, 1);
        c.admitted(2, AdmissionPoint::Router, "r2", Universe::New, 2);
        assert!(c.violations.is_empty());
        c.admitted(3, AdmissionPoint::Store, "db", Universe::Old, 3);
        assert!(c.violations.is_empty(), "points are checked separately");
        c.admitted(4, AdmissionPoint::Router, "r1", Universe::Old, 4);
        assert_eq!(c.violations.len(), 1);
    }

    #[test]
    fn conflicting_outcomes_uncommitted_actions_and_backward_epochs_are_violations() {
        let mut c = Checker::new(1_010);
        c.acted(1, "r1", Decision::Commit(Epoch(1)), true);
        c.acted(2, "r2", Decision::Abort(Epoch(1)), true);
        c.acted(3, "r3", Decision::Freeze(Epoch(2)), false);
        c.persisted(4, "r1", Decision::Commit(Epoch(1)));
        c.persisted(5, "r1", Decision::Freeze(Epoch(1)));
        c.outcome_applied(6, 1, Epoch(3), true);
        c.outcome_applied(7, 2, Epoch(3), false);
        assert_eq!(c.violations.len(), 4, "{:?}", c.violations);
    }

    #[test]
    fn holds_beyond_the_bound_are_violations() {
        let mut c = Checker::new(1_010);
        c.released(1, "r1", 1_010);
        c.holding(2, "r1", 0, 1_000);
        assert!(c.violations.is_empty());
        c.released(3, "r1", 1_011);
        c.holding(4, "r1", 0, 1_011);
        assert_eq!(c.violations.len(), 2);
        assert_eq!(c.held_max_ms, 1_011);
    }
}
