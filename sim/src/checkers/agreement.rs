//! Agreement: no two nodes act on different outcomes of one epoch, no node acts on a decision
//! no replica has applied, and replicas agree on every outcome they applied.

use super::Violation;
use protocol::{Decision, Epoch};
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct Agreement {
    /// The outcome acted on per epoch, and who acted on it first.
    acted: BTreeMap<Epoch, (Decision, String)>,
    /// Outcomes seen applied on any replica, per epoch (true: committed).
    pub seen_outcomes: BTreeMap<Epoch, bool>,
}

impl Agreement {
    /// `node` acts on `decision`; `committed` says whether some replica has applied it.
    pub fn acted(&mut self, node: &str, decision: Decision, committed: bool) -> Vec<Violation> {
        let mut found = Vec::new();
        if !committed {
            found.push(Violation::ActedUncommitted { node: node.to_string(), decision });
        }
        if let Decision::Commit(e) | Decision::Abort(e) = decision {
            match self.acted.get(&e) {
                Some((other, who)) if *other != decision => found.push(Violation::ConflictingOutcomes {
                    node: node.to_string(),
                    decision,
                    other_node: who.clone(),
                    other: *other,
                }),
                Some(_) => {}
                None => {
                    self.acted.insert(e, (decision, node.to_string()));
                }
            }
        }
        found
    }

    /// Every replica lost its data: outcomes that no node acted on were the lost group's alone.
    /// No disk holds them, so the rebuilt group may decide those epochs again (aborting a freeze
    /// whose commit no node learnt, or numbering a new freeze with an epoch no node knew).
    /// Outcomes some node acted on stay: the rebuilt group must agree with them.
    pub fn forget_unacted_outcomes(&mut self) {
        let acted = &self.acted;
        self.seen_outcomes.retain(|e, _| acted.contains_key(e));
    }

    /// Replica `replica` has applied `epoch`'s outcome.
    pub fn outcome_applied(&mut self, replica: u64, epoch: Epoch, committed: bool) -> Option<Violation> {
        match self.seen_outcomes.get(&epoch) {
            Some(prev) if *prev != committed => Some(Violation::ReplicasDisagree { replica, epoch, committed }),
            Some(_) => None,
            None => {
                self.seen_outcomes.insert(epoch, committed);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicting_and_uncommitted_outcomes_are_violations() {
        let mut a = Agreement::default();
        assert!(a.acted("r1", Decision::Commit(Epoch(1)), true).is_empty());
        assert!(matches!(a.acted("r2", Decision::Abort(Epoch(1)), true)[..], [Violation::ConflictingOutcomes { .. }]));
        assert!(matches!(a.acted("r3", Decision::Freeze(Epoch(2)), false)[..], [Violation::ActedUncommitted { .. }]));
        assert_eq!(a.outcome_applied(1, Epoch(3), true), None);
        assert!(matches!(a.outcome_applied(2, Epoch(3), false), Some(Violation::ReplicasDisagree { .. })));
    }
}
