//! The upgrade driver's decision: what the leader should propose next. Pure: the shell calls
//! it with the applied state and `now_ms`, proposes the command, and `apply` re-checks it.

use super::{ready_gate, Command, UpgradeState};
use protocol::messages::Phase;
use protocol::plan::SwitchMode;
use protocol::Epoch;

/// When a freeze must be given up: its stamped deadline, or `freeze_timeout_ms` after this leader
/// first saw it (`freeze_seen_ms`), whichever is later. The stamp is the proposer's clock at
/// proposal time; a proposal committed late (its leader lost the lead and a later one committed
/// the entry) would otherwise be aborted as soon as it is applied, before any node could ack it
/// (hunt seeds 14004767 and 18016555).
fn freeze_deadline_ms(state: &UpgradeState, freeze_seen_ms: Option<u64>) -> Option<u64> {
    let upgrade = state.current.as_ref().filter(|u| u.phase == Phase::Freezing)?;
    let seen = freeze_seen_ms.map_or(0, |s| s.saturating_add(upgrade.plan.thresholds.freeze_timeout_ms));
    Some(upgrade.freeze_deadline_ms.max(seen))
}

/// The next command the leader should propose at `now_ms`, if any. `freeze_seen_ms`: when this
/// leader first saw the current freeze applied, if it is Freezing.
pub fn next_command(state: &UpgradeState, now_ms: u64, freeze_seen_ms: Option<u64>) -> Option<Command> {
    let upgrade = state.current.as_ref()?;
    match upgrade.phase {
        Phase::Syncing => {
            let wanted = upgrade.plan.switch == SwitchMode::Auto || upgrade.switch_requested;
            if wanted && now_ms >= upgrade.retry_not_before_ms && ready_gate(upgrade).is_ok() {
                let deadline_ms = now_ms + upgrade.plan.thresholds.freeze_timeout_ms;
                return Some(Command::Freeze { epoch: Epoch(state.last_epoch.0 + 1), now_ms, deadline_ms });
            }
            None
        }
        Phase::Freezing => {
            let epoch = upgrade.epoch;
            if let Some((node, position)) = upgrade.checksum_mismatch() {
                let reason = format!("checksum mismatch on `{node}` at position {}", position.0);
                return Some(Command::Abort { epoch, reason, now_ms });
            }
            // Every ack in and no mismatch: the state machine has committed already.
            let missing = upgrade.missing_acks();
            if freeze_deadline_ms(state, freeze_seen_ms).is_some_and(|d| now_ms >= d) {
                let waited = upgrade.plan.thresholds.freeze_timeout_ms;
                let reason = format!("freeze deadline passed after {waited} ms; missing acks: {}", missing.join(", "));
                return Some(Command::Abort { epoch, reason, now_ms });
            }
            None
        }
        Phase::Staged | Phase::Switched | Phase::Done | Phase::RolledBack => None,
    }
}

/// When [`next_command`] may next propose something although the state has not changed: the
/// end of the retry backoff (Syncing) or the freeze deadline (Freezing), if still ahead of
/// `now_ms`. Any other proposal follows a change of the applied state.
pub fn next_deadline_ms(state: &UpgradeState, now_ms: u64, freeze_seen_ms: Option<u64>) -> Option<u64> {
    let upgrade = state.current.as_ref()?;
    let at = match upgrade.phase {
        Phase::Syncing => upgrade.retry_not_before_ms,
        Phase::Freezing => freeze_deadline_ms(state, freeze_seen_ms)?,
        Phase::Staged | Phase::Switched | Phase::Done | Phase::RolledBack => return None,
    };
    (at > now_ms).then_some(at)
}
