//! Attempts: an upgrade freezes at most `max_attempts` times, and the driver rolls it back only
//! once all of them were aborted (an operator's abort ends it at any time).

use super::Violation;
use coordinator::upgrade::{Outcome, UpgradeState};
use protocol::messages::Phase;

/// Checks the current upgrade, which started when the last epoch frozen was `epochs_before`
/// (every epoch since is one of its freezes: epochs grow across upgrades).
pub fn check(state: &UpgradeState, epochs_before: u64) -> Option<Violation> {
    let u = state.current.as_ref()?;
    let max = u64::from(u.plan.max_attempts);
    let freezes = state.last_epoch.0.saturating_sub(epochs_before);
    let by_operator = u.last_abort_reason.as_deref().is_some_and(|r| r.starts_with("operator"))
        || state
            .outcomes
            .range(protocol::Epoch(epochs_before + 1)..)
            .any(|(_, o)| matches!(o, Outcome::Aborted { reason } if reason.starts_with("operator")));
    if freezes > max {
        return Some(Violation::Attempts { what: format!("{freezes} freezes, max_attempts {max}") });
    }
    if u.phase == Phase::RolledBack && !by_operator && freezes < max {
        return Some(Violation::Attempts {
            what: format!("rolled back by the driver after {freezes} of {max} attempts"),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator::upgrade::Command;
    use protocol::plan::Plan;
    use protocol::Epoch;

    /// A state after `freezes` aborted freezes, rolled back or not.
    fn state(max_attempts: u32, freezes: u64, phase: Phase, reason: &str) -> UpgradeState {
        let text = crate::app::plan_toml(protocol::Generation::GENESIS, 1, 1, max_attempts, 1_000, 500, 2_500, false);
        let plan = Plan::from_toml("t.toml", &text).expect("a valid plan");
        let mut s = UpgradeState::default();
        s.apply(&Command::Start { plan: Box::new(plan), token: "t".into() });
        s.last_epoch = Epoch(freezes);
        for e in 1..=freezes {
            s.outcomes.insert(Epoch(e), Outcome::Aborted { reason: reason.into() });
        }
        let u = s.current.as_mut().expect("started");
        u.phase = phase;
        u.last_abort_reason = Some(reason.into());
        s
    }

    #[test]
    fn more_freezes_than_allowed_or_an_early_rollback_is_a_violation() {
        assert_eq!(check(&state(2, 2, Phase::RolledBack, "deadline"), 0), None);
        assert!(matches!(check(&state(2, 3, Phase::Syncing, "deadline"), 0), Some(Violation::Attempts { .. })));
        assert!(matches!(check(&state(3, 1, Phase::RolledBack, "deadline"), 0), Some(Violation::Attempts { .. })));
        assert_eq!(check(&state(3, 1, Phase::RolledBack, "operator: stop"), 0), None, "the operator may end it");
        // Upgrade after upgrade: only the epochs since the current one started are its freezes.
        assert_eq!(check(&state(2, 3, Phase::Syncing, "deadline"), 1), None);
        assert!(matches!(check(&state(2, 4, Phase::Syncing, "deadline"), 1), Some(Violation::Attempts { .. })));
    }
}
