//! Availability, bounded:
//! - under a stable leader (the same replica leads, every replica is up, no partition), a
//!   freeze is decided within its timeout plus the clock skew between replicas plus a slack;
//!   a driver that never aborts a stuck freeze leaves clients failing until an operator acts;
//! - at the end, every shard takes a write through a router (an old store left fenced after an
//!   abort, or a new one never opened, shows here).

use super::Violation;
use protocol::Epoch;

/// Watches one undecided freeze.
#[derive(Debug, Default)]
pub struct FreezeWatch {
    /// The epoch watched, the leader it has been stable under, and since when (µs).
    stable: Option<(Epoch, usize, u64)>,
    reported: Option<Epoch>,
}

impl FreezeWatch {
    /// One observation: the upgrade freezes at `freezing` (if it does), `leader` leads under
    /// stable conditions (`None`: no stable leader now).
    pub fn observe(
        &mut self,
        now_us: u64,
        freezing: Option<Epoch>,
        leader: Option<usize>,
        bound_ms: u64,
    ) -> Option<Violation> {
        let (Some(epoch), Some(leader)) = (freezing, leader) else {
            self.stable = None;
            return None;
        };
        match self.stable {
            Some((e, l, _)) if e == epoch && l == leader => {}
            _ => self.stable = Some((epoch, leader, now_us)),
        }
        let (_, _, since_us) = self.stable.expect("just set");
        let waited_ms = (now_us - since_us) / 1_000;
        if waited_ms > bound_ms && self.reported != Some(epoch) {
            self.reported = Some(epoch);
            return Some(Violation::FreezeUndecided { epoch, waited_ms, bound_ms });
        }
        None
    }
}

/// The probe write of shard `shard` ended with `outcome` (`None`: no answer at all).
pub fn probe(shard: usize, acked: bool, outcome: String) -> Option<Violation> {
    (!acked).then_some(Violation::NotWritable { shard, outcome })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freeze_undecided_too_long_under_one_leader_is_a_violation() {
        let mut w = FreezeWatch::default();
        assert_eq!(w.observe(0, Some(Epoch(1)), Some(0), 100), None);
        assert_eq!(w.observe(90_000, Some(Epoch(1)), Some(1), 100), None, "a new leader starts the clock again");
        assert_eq!(w.observe(150_000, Some(Epoch(1)), None, 100), None, "unstable: no clock");
        assert_eq!(w.observe(160_000, Some(Epoch(1)), Some(1), 100), None);
        assert!(matches!(w.observe(261_000, Some(Epoch(1)), Some(1), 100), Some(Violation::FreezeUndecided { .. })));
        assert_eq!(w.observe(400_000, Some(Epoch(1)), Some(1), 100), None, "reported once");
        assert!(probe(0, true, "acked".into()).is_none());
        assert!(matches!(probe(1, false, "failed".into()), Some(Violation::NotWritable { shard: 1, .. })));
    }
}
