//! Durability: what a node persists never goes backwards, across its restarts too. (That every
//! outcome seen applied survives to the final state is checked at the end of the run.)

use super::Violation;
use protocol::Decision;
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct Durability {
    /// The last decision each node persisted.
    persisted: BTreeMap<String, Decision>,
}

impl Durability {
    pub fn persisted(&mut self, node: &str, decision: Decision) -> Option<Violation> {
        let previous = self.persisted.insert(node.to_string(), decision)?;
        (decision.order_key() < previous.order_key()).then(|| Violation::EpochWentBackwards {
            node: node.to_string(),
            from: previous,
            to: decision,
        })
    }
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
    }
}
