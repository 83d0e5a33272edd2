//! Exactly once, at the end of every run (switched or rolled back):
//! - every change captured in the old universe was applied to the new one, up to the last
//!   position (the transform skips what it has, and a gap is an error);
//! - every item's bid counter, in the universe that serves, counts each acknowledged bid once:
//!   at least the bids acknowledged, at most those not reported failed (a client request
//!   executed twice, or a change applied twice, counts too much).
//!
//! (That no change is applied twice or out of place inside the transform is the fidelity
//! checker's business.)

use super::Violation;
use crate::oracle::{ClientOutcome, Oracle};
use protocol::Position;

pub fn check(node: &str, captured: Position, applied: Position) -> Option<Violation> {
    (captured != applied).then(|| Violation::NotExactlyOnce { node: node.to_string(), captured, applied })
}

/// Checks every item's final bid count; `bids` looks an item's counter up (`None`: no row).
pub fn check_bids(oracle: &Oracle, bids: impl Fn(i64) -> Option<i64>) -> Vec<Violation> {
    let mut found = Vec::new();
    for (item, log) in &oracle.items {
        let acked = log.bids.iter().filter(|w| w.outcome() == Some(ClientOutcome::Acked)).count() as i64;
        let possible = log.bids.iter().filter(|w| w.outcome() != Some(ClientOutcome::Failed)).count() as i64;
        let counted = bids(*item).unwrap_or(0);
        if counted < acked || counted > possible {
            found.push(Violation::BidsMiscounted { item: *item, counted, acked, possible });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::AppOp;

    #[test]
    fn captured_but_not_applied_is_a_violation() {
        assert_eq!(check("db", Position(5), Position(5)), None);
        assert!(matches!(check("db", Position(5), Position(4)), Some(Violation::NotExactlyOnce { .. })));
    }

    #[test]
    fn a_bid_counted_twice_or_lost_is_a_violation() {
        let mut oracle = Oracle::initial(0, 1);
        for outcome in [ClientOutcome::Acked, ClientOutcome::Unknown, ClientOutcome::Failed] {
            let w = oracle.issued(&AppOp::Bid { item: 0 }, 1);
            oracle.done(w, outcome, 2);
        }
        assert!(check_bids(&oracle, |_| Some(1)).is_empty());
        assert!(check_bids(&oracle, |_| Some(2)).is_empty(), "the unknown one may have happened");
        assert!(matches!(&check_bids(&oracle, |_| Some(3))[..], [Violation::BidsMiscounted { counted: 3, .. }]));
        assert!(matches!(&check_bids(&oracle, |_| Some(0))[..], [Violation::BidsMiscounted { counted: 0, .. }]));
    }
}
