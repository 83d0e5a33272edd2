//! Acks counted were sent: every ack the replicated state counts for a node is one that node
//! sent (the simulator sees each ack leave its node). A state machine that counts an ack for
//! the wrong epoch or the wrong node, or with another final position, breaks this at once,
//! even when the premature commit it allows happens to harm nobody in that run.

use super::Violation;
use coordinator::upgrade::UpgradeState;
use protocol::messages::Ack;
use protocol::{Epoch, NodeName};
use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct AcksCounted {
    /// Every distinct ack each node sent, per epoch.
    sent: BTreeMap<(NodeName, Epoch), Vec<Ack>>,
    /// Routers' frozen notices sent to the data nodes, per epoch (not acks: the replicated
    /// state never counts them; a data node may fence on them).
    noticed: std::collections::BTreeSet<(NodeName, Epoch)>,
}

impl AcksCounted {
    /// `node` sent `ack` for `epoch`.
    pub fn sent(&mut self, node: &NodeName, epoch: Epoch, ack: &Ack) {
        let acks = self.sent.entry((node.clone(), epoch)).or_default();
        if !acks.contains(ack) {
            acks.push(ack.clone());
        }
    }

    /// Router `node` sent its frozen notice for `epoch` to the data nodes.
    pub fn noticed(&mut self, node: &NodeName, epoch: Epoch) {
        self.noticed.insert((node.clone(), epoch));
    }

    /// Whether router `node` said it is frozen for `epoch`, by ack or by notice.
    pub fn said_frozen(&self, node: &NodeName, epoch: Epoch) -> bool {
        self.noticed.contains(&(node.clone(), epoch)) || self.sent_any(node, epoch, |a| *a == Ack::Frozen)
    }

    /// Whether `node` sent, for `epoch`, an ack that `wanted` accepts.
    pub fn sent_any(&self, node: &NodeName, epoch: Epoch, wanted: impl Fn(&Ack) -> bool) -> bool {
        self.sent.get(&(node.clone(), epoch)).is_some_and(|acks| acks.iter().any(wanted))
    }

    /// Checks every ack `state` counts (`replica`: whose applied state it is).
    pub fn check(&self, replica: u64, state: &UpgradeState) -> Vec<Violation> {
        let Some(upgrade) = &state.current else { return Vec::new() };
        let mut found = Vec::new();
        for (node, n) in &upgrade.nodes {
            let counted = [
                n.frozen.map(|e| (e, Ack::Frozen)),
                n.drained
                    .map(|(e, final_position, checksum_match)| (e, Ack::Drained { final_position, checksum_match })),
                n.switched.map(|e| (e, Ack::Switched)),
            ];
            for (epoch, ack) in counted.into_iter().flatten() {
                if !self.sent_any(node, epoch, |a| *a == ack) {
                    found.push(Violation::AckNeverSent {
                        replica,
                        node: node.to_string(),
                        epoch,
                        ack: format!("{ack:?}"),
                    });
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator::upgrade::{NodeState, Upgrade};
    use protocol::plan::Plan;

    #[test]
    fn an_ack_counted_but_never_sent_is_a_violation() {
        let plan_text = crate::app::plan_toml(protocol::Generation::GENESIS, 1, 1, 3, 1_000, 500, 2_500, false);
        let plan = Plan::from_toml("t.toml", &plan_text).expect("a valid plan");
        let node = NodeName::from("router-0");
        let mut nodes = BTreeMap::new();
        nodes.insert(node.clone(), NodeState { frozen: Some(Epoch(2)), ..NodeState::default() });
        let upgrade = Upgrade {
            id: protocol::UpgradeId(1),
            from: protocol::Generation::GENESIS,
            token: "t".into(),
            plan,
            phase: protocol::messages::Phase::Freezing,
            epoch: Epoch(2),
            attempts: 2,
            switch_requested: false,
            freeze_deadline_ms: 0,
            retry_not_before_ms: 0,
            nodes,
            last_abort_reason: None,
            frozen_on: None,
            routers: [node.clone()].into(),
        };
        let state = UpgradeState { current: Some(upgrade), ..UpgradeState::default() };
        let mut acks = AcksCounted::default();
        acks.sent(&node, Epoch(1), &Ack::Frozen);
        assert!(matches!(&acks.check(1, &state)[..], [Violation::AckNeverSent { .. }]), "sent for epoch 1 only");
        acks.sent(&node, Epoch(2), &Ack::Frozen);
        assert!(acks.check(1, &state).is_empty());
    }
}
