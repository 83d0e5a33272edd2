//! A healthy freeze commits: a freeze that starts after every fault has healed (all processes
//! up, no loss, no partition, no late message still on its way) must not be aborted, except by
//! the operator. Rolling back is a
//! valid end for an upgrade, so nothing else notices a protocol that can no longer switch (a
//! gate that never passes is caught by liveness; a freeze that can never commit is caught here).

use super::Violation;
use coordinator::upgrade::Outcome;
use protocol::Epoch;
use std::collections::{BTreeMap, BTreeSet};

/// Checks the final outcomes against the epochs first seen freezing after the heal.
pub fn check(started_healthy: &BTreeSet<Epoch>, outcomes: &BTreeMap<Epoch, Outcome>) -> Vec<Violation> {
    started_healthy
        .iter()
        .filter_map(|epoch| match outcomes.get(epoch) {
            Some(Outcome::Aborted { reason }) if !reason.starts_with("operator") => {
                Some(Violation::HealthyFreezeAborted { epoch: *epoch, reason: reason.clone() })
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_healthy_freeze_aborted_by_anyone_but_the_operator_is_a_violation() {
        let started = BTreeSet::from([Epoch(2), Epoch(3)]);
        let outcomes = BTreeMap::from([
            (Epoch(1), Outcome::Aborted { reason: "deadline".into() }),
            (Epoch(2), Outcome::Aborted { reason: "operator: changed their mind".into() }),
            (Epoch(3), Outcome::Aborted { reason: "freeze deadline passed".into() }),
        ]);
        assert!(matches!(&check(&started, &outcomes)[..], [Violation::HealthyFreezeAborted { epoch: Epoch(3), .. }]));
    }
}
