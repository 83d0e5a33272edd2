//! The ready gate's preconditions, checked on the stores themselves when a freeze is applied
//! (not on the reports the gate read): every shard's bulk copy is complete in the new store,
//! and no report the coordinator holds claims more than happened (captured and applied
//! positions, a finished copy, validation samples), and the mismatches the validators reported
//! are within the plan's ratio.

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

/// Validation when the freeze is applied, and the plan's bounds.
#[derive(Clone, Copy, Debug)]
pub struct GateFacts {
    /// Sums over the validators' reports the replicated state holds.
    pub samples_reported: u64,
    pub mismatches_reported: u64,
    /// Conclusive comparisons the simulator saw.
    pub samples_seen: u64,
    /// The plan's bounds.
    pub samples_min: u64,
    pub mismatch_ratio_max: f64,
}

/// Checks the facts at the freeze of `epoch`.
pub fn check(epoch: Epoch, shards: &[ShardFacts<'_>], v: GateFacts) -> Vec<Violation> {
    let GateFacts { samples_reported, mismatches_reported, samples_seen, samples_min, mismatch_ratio_max } = v;
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
    // The ratio the plan allows, in integers: mismatches / samples <= max.
    if mismatches_reported as f64 > mismatch_ratio_max * samples_reported as f64 {
        not_met(format!(
            "{mismatches_reported} mismatches in {samples_reported} samples reported, mismatch_ratio_max is {mismatch_ratio_max}"
        ));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(samples_reported: u64, mismatches_reported: u64, samples_seen: u64) -> GateFacts {
        GateFacts { samples_reported, mismatches_reported, samples_seen, samples_min: 20, mismatch_ratio_max: 0.01 }
    }

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
        assert!(check(Epoch(1), &[fine], facts(20, 0, 25)).is_empty());
        let early =
            ShardFacts { node: "db", copy: &copying, captured: Position(9), applied: Position(3), report: None };
        assert!(matches!(&check(Epoch(1), &[early], facts(20, 0, 25))[..], [Violation::GateNotMet { .. }]));
        let inflated = ShardFacts {
            node: "db",
            copy: &done,
            captured: Position(9),
            applied: Position(8),
            report: Some((true, Position(9), Position(9))),
        };
        assert_eq!(check(Epoch(1), &[inflated], facts(20, 0, 25)).len(), 1);
        assert_eq!(check(Epoch(1), &[], facts(30, 0, 25)).len(), 1, "more samples reported than seen");
        assert_eq!(check(Epoch(1), &[], facts(10, 0, 15)).len(), 1, "fewer samples seen than the gate needs");
        assert_eq!(check(Epoch(1), &[], facts(100, 1, 100)).len(), 0, "1 % of mismatches is allowed");
        assert_eq!(check(Epoch(1), &[], facts(100, 2, 100)).len(), 1, "2 % of mismatches is not");
    }
}
