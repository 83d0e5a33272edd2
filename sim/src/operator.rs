//! The operator's runbook for a chain of upgrades (`--upgrades N`): start one, wait for its end,
//! deploy the next, sometimes change the roster in between, start the next.

use crate::clients::{start_upgrade, START_UPGRADE_MS};
use crate::world::*;
use std::time::Duration;

/// The operator runs `config.upgrades` upgrades back to back: it starts one, waits until it has
/// ended (`Done` or `RolledBack`, as `imago upgrade status` shows), deploys the next (the plan
/// from the generation the cluster serves now, and each data node's stores for it), and starts
/// that one.
pub(crate) async fn run_chain(shared: Shared) {
    tokio::time::sleep(Duration::from_millis(START_UPGRADE_MS)).await;
    let upgrades = with(&shared, |w| w.config.upgrades);
    for k in 0..upgrades {
        if k > 0 {
            let generation = loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                // The upgrade the operator started last, as the group numbered it.
                let (state, last, lost) =
                    with(&shared, |w| (w.freshest_state(), w.started.last().copied(), w.upgrade_lost_since(0)));
                if state.current.as_ref().is_some_and(|u| Some(u.id) == last && u.phase.is_terminal()) {
                    break state.generation;
                }
                // A disaster during its freeze: the rebuilt group knows the generation the freeze
                // left (its outcome, learnt from the nodes' disks) but not the upgrade. It ended
                // there, as far as the operator can tell; the next one starts from it.
                if lost {
                    break state.generation;
                }
            };
            with(&shared, |w| w.deploy_next(generation));
            let between = with(&shared, |w| w.faults.between_upgrades.clone().filter(|(after, _)| *after == k));
            if let Some((_, event)) = between {
                with(&shared, |w| w.record(format_args!("operator: between upgrades {k} and {}: {event:?}", k + 1)));
                // A disaster strikes whether or not the other faults have healed.
                if event == crate::faults::FaultEvent::Disaster {
                    crate::inject::disaster(&shared).await;
                } else {
                    crate::inject::fire(&shared, event).await;
                }
            }
        }
        start_upgrade(&shared, k).await;
    }
    // The chain's last upgrade lost in a disaster during its switch: the rebuilt group learnt
    // the freeze's outcome, not the upgrade, and the upgrade's data nodes wait for it (their
    // capture runs on, nothing applies it). The operator starts it again from the generation
    // the group serves: as after a rollback, the data nodes either keep running (they take the
    // new start for theirs, from the same generation, and go on from their checkpoints) or
    // are deployed afresh.
    let generation = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (state, last, lost) =
            with(&shared, |w| (w.freshest_state(), w.started.last().copied(), w.upgrade_lost_since(0)));
        if state.current.as_ref().is_some_and(|u| Some(u.id) == last && u.phase.is_terminal()) {
            return;
        }
        if lost {
            break state.generation;
        }
    };
    with(&shared, |w| {
        w.record(format_args!("operator: the last upgrade was lost in a disaster; it starts again"));
        w.deploy_next(generation);
    });
    start_upgrade(&shared, upgrades).await;
}
