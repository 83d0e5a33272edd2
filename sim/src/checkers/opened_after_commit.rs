//! Opened after commit: a data node opens its new store to client writes only once its disk
//! holds the `Commit` of the upgrade that store is for. Opening earlier lets a console or a
//! cron job write to the new database of a switch that may yet abort (the transform would then
//! stream over those writes). Judged where the store is opened (a guarded store becoming open),
//! from the node's disk.

use super::Violation;
use protocol::{Decision, Generation};

/// Checks that `node`, deployed for the upgrade from `from`, may open its new store with
/// `on_disk` (of the upgrade from `base`) on its disk.
pub fn check(node: &str, from: Generation, on_disk: Decision, base: Generation) -> Option<Violation> {
    let committed = matches!(on_disk, Decision::Commit(_)) && base == from;
    (!committed).then(|| Violation::OpenedEarly { node: node.to_string(), decision: on_disk })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Epoch;

    #[test]
    fn opening_without_the_commit_of_its_own_upgrade_on_disk_is_a_violation() {
        let g1 = Generation::GENESIS;
        assert_eq!(check("db-0", g1, Decision::Commit(Epoch(2)), g1), None);
        assert!(matches!(check("db-0", g1, Decision::Freeze(Epoch(2)), g1), Some(Violation::OpenedEarly { .. })));
        assert!(check("db-0", g1, Decision::Initial, g1).is_some());
        assert!(check("db-0", g1.next(), Decision::Commit(Epoch(2)), g1).is_some(), "the upgrade before's commit");
    }
}
