//! The ready gate: a pure function of the node reports in the replicated state.

use super::Upgrade;
use protocol::messages::GateBlocker;
use protocol::Duty;
use serde::{Deserialize, Serialize};

/// `Ok` when the upgrade may freeze; otherwise every reason it may not, in plan order.
pub fn ready_gate(upgrade: &Upgrade) -> Result<(), Vec<GateBlocker>> {
    let t = &upgrade.plan.thresholds;
    let mut blockers = Vec::new();
    for name in upgrade.plan.nodes_with(Duty::Transform) {
        let Some(node) = upgrade.nodes.get(name).filter(|n| n.registered) else {
            blockers.push(GateBlocker::NotRegistered { node: name.clone() });
            continue;
        };
        let r = &node.report;
        if !r.bulk_done {
            blockers.push(GateBlocker::BulkCopyRunning { node: name.clone() });
        }
        let lag = r.captured.0.saturating_sub(r.applied.0);
        if lag > t.lag_max {
            blockers.push(GateBlocker::Lag { node: name.clone(), lag, lag_max: t.lag_max });
        }
        if let Some(lag_ms_max) = t.lag_ms_max.filter(|max| r.pace.lag_ms > *max) {
            blockers.push(GateBlocker::LagMs { node: name.clone(), lag_ms: r.pace.lag_ms, lag_ms_max });
        }
        let ranges = &r.ranges;
        if r.bulk_done && ranges.by_range {
            if ranges.attempted < ranges.ranges {
                let (attempted, ranges) = (ranges.attempted, ranges.ranges);
                blockers.push(GateBlocker::DataComparing { node: name.clone(), attempted, ranges });
            }
            if ranges.differed > 0 {
                blockers.push(GateBlocker::DataDiffers { node: name.clone(), ranges: ranges.differed });
            }
        }
    }
    let ValidationSeen { samples, mismatches } = validation_seen(upgrade);
    if samples < t.samples_min {
        blockers.push(GateBlocker::TooFewSamples { samples, samples_min: t.samples_min });
    } else if mismatches as f64 > t.mismatch_ratio_max * samples as f64 {
        // Compared without dividing: mismatches reported with no samples (a malformed report)
        // block too, at an infinite ratio.
        let ratio = if samples == 0 { f64::INFINITY } else { mismatches as f64 / samples as f64 };
        blockers.push(GateBlocker::MismatchRatio { ratio, mismatch_ratio_max: t.mismatch_ratio_max });
    }
    if blockers.is_empty() {
        Ok(())
    } else {
        Err(blockers)
    }
}

/// Validation as the ready gate sees it: samples and mismatches summed over the validators'
/// latest reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationSeen {
    pub samples: u64,
    pub mismatches: u64,
}

pub fn validation_seen(upgrade: &Upgrade) -> ValidationSeen {
    let validators = upgrade.plan.nodes_with(Duty::Validate).filter_map(|n| upgrade.nodes.get(n));
    let (samples, mismatches) =
        validators.fold((0u64, 0u64), |(s, m), n| (s + n.report.samples, m + n.report.mismatches));
    ValidationSeen { samples, mismatches }
}
