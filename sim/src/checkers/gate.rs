//! The ready gate's preconditions, checked on the stores themselves when a freeze is applied
//! (not on the reports the gate read): every shard's bulk copy is complete in the new store,
//! and no report the coordinator holds claims more than happened (captured and applied
//! positions, a finished copy, validation samples).

use super::Violation;
use node_core::store::CopyState;
use protocol::{Epoch, Position};

/// What one shard really holds when the freeze is applied, and what its report says.
pub struct ShardFacts<'a> {
    pub node: &'a str,
    pub copy: &'a CopyState,
    pub captured: Position,
    pub applied: Position,
    /// The report the replicated state holds, if any: (bulk_done, captured, applied).
    pub report: Option<(bool, Position, Position)>,
}

/// Checks the facts at the freeze of `epoch`; `samples_reported` is the sum the state holds,
/// `samples_seen` the conclusive comparisons the simulator saw, `samples_min` the plan's bound.
pub fn check(
    epoch: Epoch,
    shards: &[ShardFacts<'_>],
    samples_reported: u64,
    samples_seen: u64,
    samples_min: u64,
) -> Vec<Violation> {
    let mut found = Vec::new();
    let mut not_met = |what: String| found.push(Violation::GateNotMet { epoch, what });
    for s in shards {
        if *s.copy != CopyState::Done {
            not_met(format!("{}: the bulk copy is not complete in the new store ({:?})", s.node, s.copy));
        }
        if let Some((bulk_done, captured, applied)) = s.report {
            if bulk_done && *s.copy != CopyState::Done {
                not_met(format!("{}: reported the bulk copy done", s.node));
            }
            if captured > s.captured || applied > s.applied {
                not_met(format!(
                    "{}: reported captured {} / applied {}, but the stores hold {} / {}",
                    s.node, captured.0, applied.0, s.captured.0, s.applied.0
                ));
            }
        }
    }
    if samples_reported > samples_seen {
        not_met(format!("{samples_reported} validation samples reported, {samples_seen} conclusive comparisons seen"));
    }
    if samples_seen < samples_min {
        not_met(format!("only {samples_seen} conclusive comparisons were seen, samples_min is {samples_min}"));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freeze_before_the_copy_or_on_inflated_reports_is_a_violation() {
        let done = CopyState::Done;
        let copying = CopyState::Copying { snapshot_at: Position(3), after: None };
        let fine = ShardFacts {
            node: "db",
            copy: &done,
            captured: Position(9),
            applied: Position(8),
            report: Some((true, Position(7), Position(7))),
        };
        assert!(check(Epoch(1), &[fine], 20, 25, 20).is_empty());
        let early =
            ShardFacts { node: "db", copy: &copying, captured: Position(9), applied: Position(3), report: None };
        assert!(matches!(&check(Epoch(1), &[early], 20, 25, 20)[..], [Violation::GateNotMet { .. }]));
        let inflated = ShardFacts {
            node: "db",
            copy: &done,
            captured: Position(9),
            applied: Position(8),
            report: Some((true, Position(9), Position(9))),
        };
        assert_eq!(check(Epoch(1), &[inflated], 20, 25, 20).len(), 1);
        assert_eq!(check(Epoch(1), &[], 30, 25, 20).len(), 1, "more samples reported than seen");
        assert_eq!(check(Epoch(1), &[], 10, 15, 20).len(), 1, "fewer samples seen than the gate needs");
    }
}
