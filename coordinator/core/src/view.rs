//! Read-only views of the state: what one node needs, and what the operator sees.

use super::{ready_gate, Outcome, UpgradeState, REBUILT_FIRST};
use protocol::messages::{DecisionView, NodeStatus, Phase, StatusView};
use protocol::{Decision, Epoch, Generation, NodeName};

impl UpgradeState {
    /// The committed decision nodes act on (see [`Decision`]).
    pub fn decision(&self) -> Decision {
        self.decision_and_base().0
    }

    /// The committed decision nodes act on, and the generation its upgrade upgrades from. Before an upgrade's first freeze that is the last decision of the cluster
    /// (an upgrade never starts nodes again from `Initial`: they would order it before what
    /// they hold, and ignore it).
    pub fn decision_and_base(&self) -> (Decision, Generation) {
        // No upgrade yet: the last decision there is (a recovered group's, learnt from the disks).
        let Some(upgrade) = &self.current else { return self.last_decision() };
        match upgrade.phase {
            Phase::Freezing => (Decision::Freeze(upgrade.epoch), upgrade.from),
            Phase::Switched | Phase::Done => (Decision::Commit(upgrade.epoch), upgrade.from),
            Phase::Staged | Phase::Syncing | Phase::RolledBack => match self.outcomes.get(&upgrade.epoch) {
                Some(Outcome::Aborted { .. }) => (Decision::Abort(upgrade.epoch), upgrade.from),
                _ if upgrade.epoch == Epoch(0) => self.last_decision(),
                other => unreachable!("epoch {} decided {other:?} outside Freezing/Switched", upgrade.epoch),
            },
        }
    }

    /// The newest decided epoch's decision, and the generation its upgrade upgraded from (a
    /// commit made the cluster's generation; an abort left it as it was).
    fn last_decision(&self) -> (Decision, Generation) {
        match self.outcomes.last_key_value() {
            None => (Decision::Initial, self.generation),
            Some((e, Outcome::Committed)) => (Decision::Commit(*e), Generation(self.generation.0 - 1)),
            Some((e, Outcome::Aborted { .. })) => (Decision::Abort(*e), self.generation),
        }
    }
}

/// What `node` needs to know, read from state applied up to log index `version`.
pub fn decision_view(state: &UpgradeState, version: u64, node: &NodeName) -> DecisionView {
    let (decision, generation) = state.decision_and_base();
    let epoch = decision.epoch();
    let upgrade = state.current.as_ref();
    let node_state = upgrade.and_then(|u| u.nodes.get(node)).cloned().unwrap_or_default();
    DecisionView {
        version,
        upgrade: upgrade.map(|u| u.id),
        phase: upgrade.map(|u| u.phase),
        decision,
        generation,
        upgrade_from: upgrade.map(|u| u.from),
        known: upgrade.is_some_and(|u| u.duties_of(node).is_some()),
        registered: node_state.registered,
        all_routers_frozen: upgrade.is_some_and(|u| u.all_routers_frozen()),
        acked_frozen: node_state.frozen == Some(epoch) && epoch != Epoch(0),
        acked_drained: node_state.drained.is_some_and(|d| d.0 == epoch) && epoch != Epoch(0),
        // A commit of no current upgrade (a finished one's, or one a recovered group learnt)
        // waits for no `Switched`: a node that owes one owes it no more.
        acked_switched: epoch != Epoch(0)
            && (node_state.switched == Some(epoch)
                || (matches!(decision, Decision::Commit(_)) && upgrade.is_none_or(|u| u.epoch != epoch))),
        roster: state.roster.get(node).copied().unwrap_or_default(),
        routers: upgrade
            .filter(|u| u.phase == Phase::Freezing)
            .filter(|u| u.duties_of(node).is_some_and(|d| d.contains(&protocol::Duty::Transform)))
            .map(|u| u.routers.iter().cloned().collect())
            .unwrap_or_default(),
        universes: [decision.serving_generation(generation), upgrade.map(|u| u.from.next())]
            .into_iter()
            .flatten()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter_map(|g| state.universes.get(&g).map(|e| (g, e.clone())))
            .collect(),
        rules: upgrade.map(|u| protocol::messages::RouterRules {
            hold_ms_max: u.plan.thresholds.hold_ms_max,
            hold_queue_max: u.plan.thresholds.hold_queue_max,
            inflight_ms_max: u.plan.thresholds.inflight_ms_max,
            long_routes: u.plan.long_routes.clone(),
            validation: u.plan.validation.clone(),
        }),
        recovering: state.recovery.is_some(),
        disk_recorded: state.recovery.as_ref().is_some_and(|r| r.disks.contains_key(node)),
    }
}

/// The operator's view of the current (or last) upgrade.
pub fn status(state: &UpgradeState) -> StatusView {
    let Some(u) = &state.current else {
        return StatusView {
            upgrade: None,
            name: String::new(),
            phase: None,
            epoch: state.last_epoch,
            generation: state.generation,
            attempts: 0,
            gate_blockers: Vec::new(),
            last_abort_reason: None,
            recovery_waiting: state.recovery.as_ref().map(|r| r.waiting()),
            recovery_blocked: match &state.recovery {
                Some(r) => r.blocked(),
                None => state.awaiting_recovery.then(|| REBUILT_FIRST.to_string()),
            },
            nodes: Vec::new(),
        };
    };
    let nodes = u
        .plan
        .nodes
        .iter()
        .map(|n| {
            let s = u.nodes.get(&n.name).cloned().unwrap_or_default();
            NodeStatus { name: n.name.clone(), registered: s.registered, report: s.report }
        })
        .collect();
    StatusView {
        upgrade: Some(u.id),
        name: u.plan.name.clone(),
        phase: Some(u.phase),
        epoch: u.epoch,
        generation: state.generation,
        attempts: u.attempts,
        gate_blockers: ready_gate(u).err().unwrap_or_default(),
        last_abort_reason: u.last_abort_reason.clone(),
        nodes,
        recovery_waiting: None,
        recovery_blocked: None,
    }
}
