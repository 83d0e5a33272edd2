//! One view per version: a replica's state version names one state, so every view of it that a
//! node is sent (by any replica, linearizable or not, now or replayed) is the same. A state
//! machine that changes the decision without moving the version breaks this, and its watchers,
//! which wait for a newer version, would miss the change.

use super::Violation;
use protocol::messages::DecisionView;
use protocol::NodeName;
use std::collections::BTreeMap;

/// Versions remembered per node.
const VERSIONS_KEPT_MAX: usize = 256;

/// Views already sent, by node and version (the newest `VERSIONS_KEPT_MAX` per node).
#[derive(Debug, Default)]
pub struct Views {
    sent: BTreeMap<NodeName, BTreeMap<u64, DecisionView>>,
}

impl Views {
    /// A replica answers `node`'s watch with `view`.
    pub fn sent(&mut self, node: &NodeName, view: &DecisionView) -> Option<Violation> {
        // Looked up by reference: this runs for every view a replica sends.
        let versions = match self.sent.get_mut(node) {
            Some(versions) => versions,
            None => self.sent.entry(node.clone()).or_default(),
        };
        match versions.get(&view.version) {
            Some(first) if first != view => Some(Violation::ViewVersionReused {
                node: node.to_string(),
                version: view.version,
                first: format!("{first:?}"),
                second: format!("{view:?}"),
            }),
            Some(_) => None,
            None => {
                versions.insert(view.version, view.clone());
                // A version's views come close together (the same state read from several
                // replicas, or a replayed answer): the newest ones are enough.
                if versions.len() > VERSIONS_KEPT_MAX {
                    versions.pop_first();
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Decision, Epoch};

    fn view(version: u64, decision: Decision) -> DecisionView {
        DecisionView {
            version,
            upgrade: None,
            phase: None,
            decision,
            generation: protocol::Generation::GENESIS,
            upgrade_from: None,
            known: true,
            registered: true,
            all_routers_frozen: false,
            acked_frozen: false,
            acked_drained: false,
            acked_switched: false,
            roster: protocol::messages::RosterStatus::Active,
            routers: Vec::new(),
            universes: Vec::new(),
            rules: None,
            recovering: false,
            disk_recorded: false,
        }
    }

    #[test]
    fn two_views_of_one_version_must_be_equal() {
        let mut v = Views::default();
        let (a, b) = (NodeName::from("router-0"), NodeName::from("db-0"));
        assert_eq!(v.sent(&a, &view(3, Decision::Initial)), None);
        assert_eq!(v.sent(&a, &view(3, Decision::Initial)), None, "the same view again");
        assert_eq!(v.sent(&b, &view(3, Decision::Freeze(Epoch(1)))), None, "another node's view");
        assert!(matches!(v.sent(&a, &view(3, Decision::Freeze(Epoch(1)))), Some(Violation::ViewVersionReused { .. })));
        assert_eq!(v.sent(&a, &view(4, Decision::Freeze(Epoch(1)))), None);
    }
}
