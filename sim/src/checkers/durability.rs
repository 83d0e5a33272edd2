//! Durability: what a node persists never goes backwards, across its restarts too; every
//! outcome seen applied on any replica is in the final state.

use super::Violation;
use coordinator::upgrade::Outcome;
use protocol::{Decision, Epoch};
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct Durability {
    /// The last decision each node persisted.
    persisted: BTreeMap<String, Decision>,
}

impl Durability {
    /// The node lost its disk: it starts from nothing, legitimately.
    pub fn disk_lost(&mut self, node: &str) {
        self.persisted.remove(node);
    }

    pub fn persisted(&mut self, node: &str, decision: Decision) -> Option<Violation> {
        let previous = self.persisted.insert(node.to_string(), decision)?;
        (decision.order_key() < previous.order_key()).then(|| Violation::EpochWentBackwards {
            node: node.to_string(),
            from: previous,
            to: decision,
        })
    }
}

/// Every outcome seen applied (`seen`: committed or not) is kept in `outcomes`.
pub fn outcomes_kept(seen: &BTreeMap<Epoch, bool>, outcomes: &BTreeMap<Epoch, Outcome>) -> Vec<Violation> {
    seen.iter()
        .filter_map(|(epoch, committed)| {
            let kept = outcomes.get(epoch).map(|o| *o == Outcome::Committed);
            (kept != Some(*committed)).then_some(Violation::OutcomeLost { epoch: *epoch, committed: *committed, kept })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Epoch;

    #[test]
    fn a_persisted_decision_never_goes_backwards() {
        let mut d = Durability::default();
        assert_eq!(d.persisted("r1", Decision::Commit(Epoch(1))), None);
        assert!(matches!(d.persisted("r1", Decision::Freeze(Epoch(1))), Some(Violation::EpochWentBackwards { .. })));
        assert_eq!(d.persisted("r2", Decision::Freeze(Epoch(1))), None, "per node");
        d.disk_lost("r1");
        assert_eq!(d.persisted("r1", Decision::Initial), None, "a new disk starts from nothing");
    }

    #[test]
    fn an_outcome_seen_must_be_kept() {
        let seen = BTreeMap::from([(Epoch(1), false), (Epoch(2), true)]);
        let kept =
            BTreeMap::from([(Epoch(1), Outcome::Aborted { reason: "x".into() }), (Epoch(2), Outcome::Committed)]);
        assert!(outcomes_kept(&seen, &kept).is_empty());
        let lost = BTreeMap::from([(Epoch(1), Outcome::Aborted { reason: "x".into() })]);
        assert!(matches!(&outcomes_kept(&seen, &lost)[..], [Violation::OutcomeLost { kept: None, .. }]));
    }
}
