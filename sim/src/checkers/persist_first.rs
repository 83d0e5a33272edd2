//! Persist before act: a node acts on a decision only once its own disk holds it (or a later
//! one). The simulator reads the node's disk, not the core's idea of it, when the node says it
//! acts. (That a restart boots from what the disk holds, and never persists an older decision,
//! is the durability checker's business.)

use super::Violation;
use protocol::Decision;

pub fn acted(node: &str, decision: Decision, on_disk: Decision) -> Option<Violation> {
    (on_disk.order_key() < decision.order_key()).then(|| Violation::ActedBeforePersisted {
        node: node.to_string(),
        decision,
        on_disk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Epoch;

    #[test]
    fn acting_on_a_decision_the_disk_does_not_hold_is_a_violation() {
        assert_eq!(acted("r", Decision::Freeze(Epoch(1)), Decision::Freeze(Epoch(1))), None);
        assert_eq!(acted("r", Decision::Initial, Decision::Initial), None);
        assert!(matches!(
            acted("r", Decision::Commit(Epoch(1)), Decision::Freeze(Epoch(1))),
            Some(Violation::ActedBeforePersisted { .. })
        ));
    }
}
