//! Applied once: the new store accepts a transform batch only on top of the checkpoint the
//! batch was built from. The simulator re-delivers batches it has already applied (a retried
//! commit whose first answer was lost, a late duplicate); the store must refuse each, or the
//! changes in it are applied twice (an increment counted twice, a row moved back in time).

use super::Violation;
use node_core::store::{Batch, Checkpoint};

/// The store held `before` and `accepted` says whether it applied `batch`.
pub fn check(node: &str, before: &Checkpoint, batch: &Batch, accepted: bool) -> Option<Violation> {
    (accepted && *before != batch.base).then(|| Violation::AppliedTwice {
        node: node.to_string(),
        base: format!("{:?}", batch.base),
        found: format!("{before:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Position;

    #[test]
    fn a_batch_accepted_on_top_of_another_checkpoint_is_a_violation() {
        let base = Checkpoint::default();
        let later = Checkpoint { applied: Position(4), ..Checkpoint::default() };
        let batch = Batch { base: base.clone(), reset: false, ops: Vec::new(), checkpoint: later.clone() };
        assert_eq!(check("db", &base, &batch, true), None);
        assert_eq!(check("db", &later, &batch, false), None, "refused: fine");
        assert!(matches!(check("db", &later, &batch, true), Some(Violation::AppliedTwice { .. })));
    }
}
