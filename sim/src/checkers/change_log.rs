//! Bounded change log: once the transform has applied changes, they are pruned from the old
//! store's change log, so the log keeps at most the changes not yet applied plus
//! `change_log_applied_max`. Checked at the end of every run, when the transform has caught up.

use super::Violation;

pub fn check(node: &str, kept: u64, lag: u64, applied_max: u64) -> Option<Violation> {
    (kept > lag + applied_max).then(|| Violation::ChangeLogUnbounded {
        node: node.to_string(),
        kept,
        bound: lag + applied_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_log_that_keeps_applied_changes_is_a_violation() {
        assert_eq!(check("db", 45, 10, 40), None);
        assert!(matches!(check("db", 300, 0, 40), Some(Violation::ChangeLogUnbounded { .. })));
    }
}
