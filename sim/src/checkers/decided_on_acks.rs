//! Decided on acks seen: a commit is applied only after every router in service sent `Frozen(e)`
//! and every data node sent `Drained(e)` with matching checksums, and an upgrade is `Done` only
//! after every router in service sent `Switched(e)`. The routers in service are the simulator's
//! own count (the plan's, and a joined one once it served, less those that sent `Retired` or
//! were retired by force), not the state machine's roster. Judged from the acks the simulator saw leave the nodes, not from
//! the state machine's own bookkeeping, so a state machine that counts the wrong acks, or
//! decides without them, is caught even when nothing visibly breaks in that run.

use super::acks_counted::AcksCounted;
use super::Violation;
use coordinator::upgrade::UpgradeState;
use protocol::messages::{Ack, Phase};
use protocol::{Duty, Epoch, NodeName};
use std::collections::BTreeSet;

/// Epochs already reported (each decision is reported once).
#[derive(Debug, Default)]
pub struct DecidedOnAcks {
    reported: BTreeSet<(Epoch, bool)>,
}

impl DecidedOnAcks {
    pub fn check(&mut self, acks: &AcksCounted, state: &UpgradeState, routers: &[NodeName]) -> Vec<Violation> {
        let Some(u) = &state.current else { return Vec::new() };
        let e = u.epoch;
        let committed = matches!(u.phase, Phase::Switched | Phase::Done);
        let mut missing = Vec::new();
        if committed && !self.reported.contains(&(e, false)) {
            for node in routers {
                if !acks.sent_any(node, e, |a| *a == Ack::Frozen) {
                    missing.push(format!("{node} Frozen"));
                }
            }
            for node in u.plan.nodes_with(Duty::Transform) {
                if !acks.sent_any(node, e, |a| matches!(a, Ack::Drained { checksum_match: true, .. })) {
                    missing.push(format!("{node} Drained (matching)"));
                }
            }
            if !missing.is_empty() {
                self.reported.insert((e, false));
                return vec![Violation::DecidedWithoutAcks { epoch: e, decision: "commit".into(), missing }];
            }
        }
        if u.phase == Phase::Done && !self.reported.contains(&(e, true)) {
            // Every router serves the new universe, and every data node's new store is open.
            for node in routers.iter().chain(u.plan.nodes_with(Duty::Transform)) {
                if !acks.sent_any(node, e, |a| *a == Ack::Switched) {
                    missing.push(format!("{node} Switched"));
                }
            }
            if !missing.is_empty() {
                self.reported.insert((e, true));
                return vec![Violation::DecidedWithoutAcks { epoch: e, decision: "done".into(), missing }];
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator::upgrade::{Command, Outcome};
    use protocol::plan::Plan;
    use protocol::{NodeName, Position};

    #[test]
    fn a_commit_or_done_without_the_acks_sent_is_a_violation() {
        let text = crate::app::plan_toml(protocol::Generation::GENESIS, 1, 1, 3, 1_000, 500, 2_500, false);
        let plan = Plan::from_toml("t.toml", &text).expect("a valid plan");
        let mut s = UpgradeState::default();
        s.apply(&Command::Start { plan: Box::new(plan), token: "t".into() });
        s.last_epoch = Epoch(1);
        s.outcomes.insert(Epoch(1), Outcome::Committed);
        let u = s.current.as_mut().expect("started");
        u.epoch = Epoch(1);
        u.phase = Phase::Switched;
        let (router, db) = (NodeName::from("router-0"), NodeName::from("db-0"));
        let routers = [router.clone()];
        let mut acks = AcksCounted::default();
        acks.sent(&router, Epoch(1), &Ack::Frozen);
        let mut d = DecidedOnAcks::default();
        assert!(matches!(&d.check(&acks, &s, &routers)[..], [Violation::DecidedWithoutAcks { .. }]), "no Drained sent");
        assert!(d.check(&acks, &s, &routers).is_empty(), "reported once");
        acks.sent(&db, Epoch(1), &Ack::Drained { final_position: Position(9), checksum_match: true });
        let mut d = DecidedOnAcks::default();
        assert!(d.check(&acks, &s, &routers).is_empty());
        s.current.as_mut().expect("started").phase = Phase::Done;
        assert!(
            matches!(&d.check(&acks, &s, &routers)[..], [Violation::DecidedWithoutAcks { .. }]),
            "no Switched sent"
        );
        acks.sent(&router, Epoch(1), &Ack::Switched);
        let mut d = DecidedOnAcks::default();
        let missing = d.check(&acks, &s, &routers);
        assert!(
            matches!(&missing[..], [Violation::DecidedWithoutAcks { missing, .. }] if missing == &["db-0 Switched"]),
            "the data node's new store must be open too: {missing:?}"
        );
        acks.sent(&db, Epoch(1), &Ack::Switched);
        let mut d = DecidedOnAcks::default();
        assert!(d.check(&acks, &s, &routers).is_empty());
        // A router in service the plan does not name (it joined) is needed too.
        let joined = [router.clone(), NodeName::from("router-9")];
        let mut d = DecidedOnAcks::default();
        assert!(matches!(&d.check(&acks, &s, &joined)[..], [Violation::DecidedWithoutAcks { .. }]));
    }
}
