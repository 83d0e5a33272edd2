//! Fence after every router froze: a data node fences its old store for the freeze of epoch `e`
//! only once every router has sent `Frozen(e)`. Fencing earlier refuses the writes routers
//! still send to the old universe (clients see failures that the protocol promises to hold
//! instead). Judged where the store is fenced (an unfenced store becoming fenced), from the
//! acks seen on the wire and the decision the node's disk holds.

use super::acks_counted::AcksCounted;
use super::Violation;
use protocol::{Decision, NodeName};

/// Checks a fresh fence by `node`, whose disk holds `on_disk`; `routers` are the plan's routers.
pub fn check(acks: &AcksCounted, routers: &[NodeName], node: &str, on_disk: Decision) -> Option<Violation> {
    let Decision::Freeze(epoch) = on_disk else {
        return Some(Violation::FencedEarly { node: node.to_string(), decision: on_disk, missing: Vec::new() });
    };
    let missing: Vec<String> =
        routers.iter().filter(|r| !acks.said_frozen(r, epoch)).map(ToString::to_string).collect();
    (!missing.is_empty()).then(|| Violation::FencedEarly { node: node.to_string(), decision: on_disk, missing })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::messages::Ack;
    use protocol::Epoch;

    #[test]
    fn a_fence_before_every_router_sent_frozen_is_a_violation() {
        let mut acks = AcksCounted::default();
        let routers = [NodeName::from("router-0"), NodeName::from("router-1")];
        let freeze = Decision::Freeze(Epoch(2));
        acks.sent(&routers[0], Epoch(2), &Ack::Frozen);
        acks.sent(&routers[1], Epoch(1), &Ack::Frozen);
        assert!(matches!(check(&acks, &routers, "db-0", freeze), Some(Violation::FencedEarly { .. })));
        acks.noticed(&routers[1], Epoch(1));
        assert!(check(&acks, &routers, "db-0", freeze).is_some(), "a notice for another epoch");
        acks.noticed(&routers[1], Epoch(2));
        assert_eq!(check(&acks, &routers, "db-0", freeze), None, "its notice says it is frozen too");
        acks.sent(&routers[1], Epoch(2), &Ack::Frozen);
        assert_eq!(check(&acks, &routers, "db-0", freeze), None);
        assert!(check(&acks, &routers, "db-0", Decision::Initial).is_some(), "a fence without a freeze on disk");
    }
}
