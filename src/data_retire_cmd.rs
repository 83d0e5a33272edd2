//! `imago data retire --plan PLAN --old-db OLD --new-db NEW`: clean-up after an upgrade ended.
//!
//! A data node is deployed for one upgrade. Once that upgrade has ended, switched or rolled
//! back, the operator stops the data node and retires what Imago left in its two databases:
//! - in the old database, the capture (SQLite: triggers and change table; PostgreSQL: the
//!   replication slot, which otherwise keeps WAL without bound, and the publication) and the
//!   fence (after a switch it kept the old application's writes out; retiring says the old
//!   application is gone);
//! - in the new database, the checkpoint, the key map and the guard.
//!
//! The request log stays in both (it is data). The coordinators say whether the upgrade ended:
//! while it runs, or when none answers (its outcome unknown), nothing is touched.

use crate::data_node_cmd::{load_plan, Database};
use anyhow::bail;
use clap::Args;
use protocol::messages::{Phase, StatusView};
use protocol::Generation;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct RetireArgs {
    #[command(flatten)]
    cluster: crate::cluster_cmd::ClusterArg,
    /// The plan of the upgrade the data node was deployed for.
    #[arg(long)]
    plan: PathBuf,
    /// The old universe's database, as the data node named it.
    #[arg(long)]
    old_db: String,
    /// The new universe's database, as the data node named it.
    #[arg(long)]
    new_db: String,
}

/// How the plan's upgrade ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The cluster serves a later generation than the plan's old one.
    Switched,
    /// The plan's upgrade is the cluster's last, and it was rolled back.
    RolledBack,
    /// The coordinator group was rebuilt after a disaster (it has decided epochs, learnt from
    /// the nodes' disks, but holds no upgrade) and serves the plan's old generation: an upgrade
    /// in flight then was lost with the group, its freeze aborted, its new universe never
    /// served. Its data node waits for it for ever; it is retired, or the upgrade started again.
    Lost,
}

/// Whether the upgrade of plan `name` from generation `from` has ended, by the coordinators'
/// status; why not (or why it cannot be told) otherwise.
pub fn ended(status: &StatusView, name: &str, from: Generation) -> Result<Ended, String> {
    if let Some(why) = &status.recovery_blocked {
        return Err(format!("the coordinators are recovering from the nodes' disks ({why}): try again later"));
    }
    if status.generation > from {
        return Ok(Ended::Switched);
    }
    if status.generation < from {
        return Err(format!(
            "the cluster serves generation {}, before the plan's {}: its upgrade has not run",
            status.generation.0, from.0
        ));
    }
    match (status.upgrade, status.name == name, status.phase) {
        (None, _, _) if status.epoch.0 > 0 => Ok(Ended::Lost),
        (Some(_), true, Some(Phase::RolledBack)) => Ok(Ended::RolledBack),
        (Some(_), true, Some(phase)) if !phase.is_terminal() => {
            Err(format!("upgrade `{name}` is still running ({phase:?}): retire its databases once it has ended"))
        }
        (Some(_), false, _) => Err(format!(
            "the cluster's last upgrade is `{}`, not `{name}`: the plan's upgrade is not known to have ended",
            status.name
        )),
        _ => Err(format!("upgrade `{name}` has not ended (the cluster still serves generation {})", from.0)),
    }
}

pub fn run(args: &RetireArgs) -> anyhow::Result<ExitCode> {
    let plan = load_plan(&args.plan)?;
    let old_db = Database::parse(&args.old_db, "--old-db")?;
    let new_db = Database::parse(&args.new_db, "--new-db")?;
    if old_db == new_db {
        bail!("--old-db and --new-db name the same database {}", old_db.shown());
    }
    let cluster = args.cluster.load()?;
    let status = match crate::operator_cmd::status_of(&cluster)? {
        Ok(status) => status,
        Err(why) => {
            eprintln!("data retire: {why}; nothing was touched");
            return Ok(ExitCode::from(3));
        }
    };
    let how = match ended(&status, &plan.name, plan.old_generation) {
        Ok(how) => how,
        Err(why) => {
            eprintln!("data retire: {why}; nothing was touched");
            return Ok(ExitCode::from(2));
        }
    };
    let left_old = old_db.retire_old(&plan)?;
    let left_new = new_db.retire_new()?;
    let outcome = match how {
        Ended::Switched => "switched",
        Ended::RolledBack => "was rolled back",
        Ended::Lost => "was lost with the coordinators rebuilt after a disaster (never switched to)",
    };
    println!(
        "upgrade `{}` {outcome}: Imago's capture and fence are gone from {} (left: {}), its checkpoint, key map and \
         guard from {} (left: {})",
        plan.name,
        old_db.shown(),
        listed(&left_old),
        new_db.shown(),
        listed(&left_new)
    );
    Ok(ExitCode::SUCCESS)
}

fn listed(objects: &[String]) -> String {
    if objects.is_empty() {
        "nothing but the request log".to_string()
    } else {
        objects.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Epoch, UpgradeId};

    fn status(generation: u64, name: &str, phase: Option<Phase>) -> StatusView {
        StatusView {
            upgrade: phase.map(|_| UpgradeId(4)),
            name: name.into(),
            phase,
            // A cluster that never upgraded has decided no epoch.
            epoch: Epoch(if phase.is_some() { 2 } else { 0 }),
            generation: Generation(generation),
            attempts: 1,
            gate_blockers: Vec::new(),
            last_abort_reason: None,
            nodes: Vec::new(),
            recovery_waiting: None,
            recovery_blocked: None,
        }
    }

    #[test]
    fn only_an_upgrade_known_to_have_ended_is_retired() {
        let from = Generation(2);
        assert_eq!(ended(&status(3, "v3", Some(Phase::Done)), "v3", from), Ok(Ended::Switched));
        // A later upgrade runs: the plan's switched long ago.
        assert_eq!(ended(&status(4, "v5", Some(Phase::Syncing)), "v3", from), Ok(Ended::Switched));
        assert_eq!(ended(&status(2, "v3", Some(Phase::RolledBack)), "v3", from), Ok(Ended::RolledBack));
        let running = ended(&status(2, "v3", Some(Phase::Syncing)), "v3", from).unwrap_err();
        assert!(running.contains("still running (Syncing)"), "{running}");
        let other = ended(&status(2, "other", Some(Phase::RolledBack)), "v3", from).unwrap_err();
        assert!(other.contains("last upgrade is `other`"), "{other}");
        let none = ended(&status(2, "", None), "v3", from).unwrap_err();
        assert!(none.contains("has not ended"), "{none}");
        // A group rebuilt after a disaster has epochs but no upgrade: one in flight was lost.
        let rebuilt = StatusView { epoch: Epoch(7), ..status(2, "", None) };
        assert_eq!(ended(&rebuilt, "v3", from), Ok(Ended::Lost));
        let switched_then_lost = StatusView { epoch: Epoch(7), ..status(3, "", None) };
        assert_eq!(ended(&switched_then_lost, "v3", from), Ok(Ended::Switched));
        let early = ended(&status(1, "", None), "v3", from).unwrap_err();
        assert!(early.contains("before the plan's 2"), "{early}");
        let recovering = StatusView { recovery_blocked: Some("waiting for db-1".into()), ..status(3, "v3", None) };
        assert!(ended(&recovering, "v3", from).unwrap_err().contains("recovering"));
    }
}
