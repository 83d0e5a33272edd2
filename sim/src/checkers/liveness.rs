//! Liveness: after the faults heal, the upgrade ends (`Done` or `RolledBack`) within a bound,
//! with every router serving the final universe and holding nothing. (The bound itself is
//! watched by the run loop, which reports [`Violation::NotSettled`].)

use super::Violation;
use coordinator::upgrade::UpgradeState;
use protocol::messages::Phase;
use protocol::Generation;

/// The generation that serves at the end, or why the upgrade did not end.
pub fn ended(state: &UpgradeState) -> Result<Generation, Violation> {
    let Some(upgrade) = state.current.as_ref() else { return Err(Violation::NeverStarted) };
    match upgrade.phase {
        Phase::Done => Ok(upgrade.from.next()),
        Phase::RolledBack => Ok(upgrade.from),
        phase => Err(Violation::EndedInPhase { phase }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_that_never_started_did_not_end() {
        assert_eq!(ended(&UpgradeState::default()), Err(Violation::NeverStarted));
    }
}
