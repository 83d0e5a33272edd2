//! A healthy freeze commits: a freeze that starts after every fault has healed (all processes
//! up, no loss, no partition, no late message still on its way) must not be aborted, except by
//! the operator, or for a checksum mismatch after a rogue writer changed a new database (the
//! drift fault: the difference stays until a client's write overwrites it). Rolling back is a
//! valid end for an upgrade, so nothing else notices a protocol that can no longer switch (a
//! gate that never passes is caught by liveness; a freeze that can never commit is caught here).

use super::Violation;
use coordinator::upgrade::Outcome;
use protocol::Epoch;
use std::collections::{BTreeMap, BTreeSet};

/// Checks the final outcomes against the epochs first seen freezing after the heal
/// (`drifted`: a rogue writer changed a new database during the run).
pub fn check(started_healthy: &BTreeSet<Epoch>, outcomes: &BTreeMap<Epoch, Outcome>, drifted: bool) -> Vec<Violation> {
    let expected =
        |reason: &str| reason.starts_with("operator") || (drifted && reason.starts_with("checksum mismatch"));
    started_healthy
        .iter()
        .filter_map(|epoch| match outcomes.get(epoch) {
            Some(Outcome::Aborted { reason }) if !expected(reason) => {
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
        let outcomes = BTreeMap::from([
            (Epoch(1), Outcome::Aborted { reason: "deadline".into() }),
            (Epoch(2), Outcome::Aborted { reason: "operator: changed their mind".into() }),
            (Epoch(3), Outcome::Aborted { reason: "freeze deadline passed".into() }),
            (Epoch(4), Outcome::Aborted { reason: "checksum mismatch on `db-0` at position 9".into() }),
        ]);
        let started = BTreeSet::from([Epoch(2), Epoch(3), Epoch(4)]);
        let found = check(&started, &outcomes, false);
        assert!(matches!(
            &found[..],
            [
                Violation::HealthyFreezeAborted { epoch: Epoch(3), .. },
                Violation::HealthyFreezeAborted { epoch: Epoch(4), .. }
            ]
        ));
        let found = check(&started, &outcomes, true);
        assert!(
            matches!(&found[..], [Violation::HealthyFreezeAborted { epoch: Epoch(3), .. }]),
            "a rogue writer's change"
        );
    }
}
