//! Propagation: a node that can reach a stable leader over a loss-free network acts on the
//! current decision within a bound. A node stuck on a crashed replica, parked on a stale one, or
//! dropping the view that carries news holds (or serves the wrong universe) far longer than the
//! protocol allows, although every safety property holds.

use super::Violation;
use protocol::Decision;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Default)]
pub struct Propagation {
    /// The newest decision each running node acted on (forgotten when it crashes).
    acted: BTreeMap<String, Decision>,
    /// Since when (µs) each node has been behind the current decision in good conditions.
    behind_since: BTreeMap<String, (Decision, u64)>,
    /// (node, the decision's order key) already reported.
    reported: BTreeSet<(String, (u64, u8))>,
}

impl Propagation {
    pub fn acted(&mut self, node: &str, decision: Decision) {
        let newest = self.acted.entry(node.to_string()).or_insert(decision);
        if decision.order_key() > newest.order_key() {
            *newest = decision;
        }
    }

    /// The node stopped: what it acted on is gone with it.
    pub fn crashed(&mut self, node: &str) {
        self.acted.remove(node);
        self.behind_since.remove(node);
    }

    /// One observation of `node`: `current` is the decision it should reach, `good` whether it
    /// is up and can reach a stable leader over a loss-free network.
    pub fn observe(
        &mut self,
        now_us: u64,
        node: &str,
        current: Decision,
        good: bool,
        bound_ms: u64,
    ) -> Option<Violation> {
        let caught_up = self.acted.get(node).is_some_and(|d| d.order_key() >= current.order_key());
        if caught_up || !good {
            self.behind_since.remove(node);
            return None;
        }
        let (_, since) = *self
            .behind_since
            .entry(node.to_string())
            .and_modify(|(d, since)| {
                if *d != current {
                    *d = current;
                    *since = now_us;
                }
            })
            .or_insert((current, now_us));
        let waited_ms = (now_us - since) / 1_000;
        if waited_ms > bound_ms && self.reported.insert((node.to_string(), current.order_key())) {
            return Some(Violation::NotPropagated {
                node: node.to_string(),
                decision: current,
                acted: self.acted.get(node).copied(),
                waited_ms,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Epoch;

    #[test]
    fn a_node_behind_too_long_in_good_conditions_is_a_violation() {
        let mut p = Propagation::default();
        let freeze = Decision::Freeze(Epoch(1));
        p.acted("r", Decision::Initial);
        assert_eq!(p.observe(0, "r", freeze, true, 100), None);
        assert_eq!(p.observe(50_000, "r", freeze, false, 100), None, "bad conditions stop the clock");
        assert_eq!(p.observe(60_000, "r", freeze, true, 100), None);
        assert!(matches!(p.observe(170_000, "r", freeze, true, 100), Some(Violation::NotPropagated { .. })));
        assert_eq!(p.observe(400_000, "r", freeze, true, 100), None, "reported once");
        p.acted("r", freeze);
        assert_eq!(p.observe(500_000, "r", freeze, true, 100), None);
        p.crashed("r");
        assert_eq!(p.observe(600_000, "r", freeze, true, 100), None, "the clock starts when it is behind");
    }
}
