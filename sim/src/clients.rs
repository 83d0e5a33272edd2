//! Everything outside the cluster that talks to it: clients (the workload) and the operator.

use crate::app::AppOp;
use crate::net::ProcId;
use crate::world::*;
use protocol::messages::{CliRequest, CliResponse, Phase, Request, Response};
use rand::Rng;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// When the operator starts the upgrade.
pub(crate) const START_UPGRADE_MS: u64 = 200;

/// The index of the replica a leader hint names.
pub(crate) fn replica_index(replica: u64) -> usize {
    match ProcId::of(replica) {
        ProcId::Coordinator(i) => i,
        other => panic!("a leader hint names {other:?}, not a coordinator"),
    }
}

pub(crate) async fn workload(shared: Shared, running: Arc<std::sync::atomic::AtomicBool>) {
    while running.load(Ordering::Relaxed) {
        let wait_us = with(&shared, |w| {
            let rate = w.config.client_rate_per_s.max(1.0);
            let u: f64 = w.rng.gen_range(f64::EPSILON..1.0);
            (-u.ln() / rate * 1e6) as u64
        });
        tokio::time::sleep(Duration::from_micros(wait_us.max(1))).await;
        with(&shared, |w| {
            let router = w.rng.gen_range(0..w.routers.len());
            let op = w.next_op();
            w.client_arrival(router, op);
        });
    }
}

/// Starts upgrade `k` (0-based) with the deployed plan, retrying until a replica answers.
pub(crate) async fn start_upgrade(shared: &Shared, k: u32) {
    let coordinators = with(shared, |w| w.config.coordinators);
    let mut target = 0;
    loop {
        // A router the operator retired is left out of the plan (a start naming one is refused).
        let plan = with(shared, |w| {
            let mut plan = w.plan.clone();
            plan.nodes.retain(|n| !w.routers.iter().any(|r| r.retired && r.name == n.name.0));
            plan
        });
        let token = if k == 0 { "sim-operator-start".to_string() } else { format!("sim-operator-start-{k}") };
        let start = CliRequest::Start { plan: Box::new(plan.clone()), token };
        let answer = operator_call(shared, coordinator_addr(target), Request::Cli(start)).await;
        match answer {
            Some(Response::Cli(CliResponse::Started { upgrade })) => {
                with(shared, |w| {
                    w.record(format_args!("operator: upgrade {} started", upgrade.0));
                    w.started.push(upgrade);
                });
                if plan.switch == protocol::plan::SwitchMode::Manual {
                    request_switch(shared, upgrade).await;
                }
                return;
            }
            Some(Response::Cli(CliResponse::Rejected(r))) => {
                // A router being retired is still named (it leaves the plan once retired); a
                // refusal for any other reason stays, and the liveness checker reports it.
                with(shared, |w| w.record(format_args!("operator: start refused: {r}")));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Some(Response::Cli(CliResponse::NotLeader { leader: Some(l) })) => target = replica_index(l),
            _ => {
                target = (target + 1) % coordinators;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The drift fault's operator: one who watches `imago upgrade status` and, once validation
/// reports mismatches that a rogue writer explains, aborts the upgrade (the runbook: a new
/// database that differs from the old one is never switched to; investigate, then start over).
/// In a seed without a rogue writer this operator never acts, so a validator that reports
/// mismatches on correct data leaves the upgrade stuck, and liveness catches it.
pub(crate) async fn abort_on_mismatches(shared: Shared) {
    let coordinators = with(&shared, |w| w.config.coordinators);
    let mut target = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (state, drifted) = with(&shared, |w| (w.freshest_state(), w.data.iter().any(|d| d.drifted)));
        let Some(upgrade) = &state.current else { continue };
        if upgrade.phase.is_terminal() {
            // The next upgrade (if any) is watched the same way.
            continue;
        }
        let blockers = coordinator::upgrade::status(&state).gate_blockers;
        let mismatches = blockers.iter().any(|b| {
            matches!(
                b,
                protocol::messages::GateBlocker::MismatchRatio { .. }
                    | protocol::messages::GateBlocker::DataDiffers { .. }
            )
        });
        if !drifted || upgrade.phase != Phase::Syncing || !mismatches {
            continue;
        }
        let abort = CliRequest::Abort { reason: "validation found mismatches".into() };
        match operator_call(&shared, coordinator_addr(target), Request::Cli(abort)).await {
            Some(Response::Cli(CliResponse::NotLeader { leader: Some(l) })) => target = replica_index(l),
            Some(answer) => with(&shared, |w| w.record(format_args!("operator: abort on mismatches: {answer:?}"))),
            None => target = (target + 1) % coordinators,
        }
    }
}

/// Manual mode: a persistent operator asks for the switch whenever the upgrade is syncing
/// (again after an abort, which clears the request) until the upgrade ends.
pub(crate) async fn request_switch(shared: &Shared, id: protocol::UpgradeId) {
    let (coordinators, groups_lost) = with(shared, |w| (w.config.coordinators, w.lost_groups.len()));
    let mut target = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (state, lost) = with(shared, |w| (w.freshest_state(), w.upgrade_lost_since(groups_lost)));
        // The group that knew this upgrade was lost in a disaster, and the rebuilt one holds
        // none: there is nothing to switch (the chain's operator decides what comes next).
        if lost {
            return;
        }
        let Some(upgrade) = state.current.filter(|u| u.id >= id) else { continue };
        if upgrade.phase.is_terminal() || upgrade.id > id {
            return;
        }
        if upgrade.phase != Phase::Syncing || upgrade.switch_requested {
            continue;
        }
        match operator_call(shared, coordinator_addr(target), Request::Cli(CliRequest::Switch)).await {
            Some(Response::Cli(CliResponse::Accepted)) => {
                with(shared, |w| w.record(format_args!("operator: switch requested")));
            }
            Some(Response::Cli(CliResponse::NotLeader { leader: Some(l) })) => target = replica_index(l),
            Some(Response::Cli(CliResponse::Rejected(_))) => {}
            _ => target = (target + 1) % coordinators,
        }
    }
}

pub(crate) async fn operator_call(shared: &Shared, to: u64, request: Request) -> Option<Response> {
    let transport =
        SimTransport { world: Arc::downgrade(shared), me: ProcId::Operator.addr(), detach: false, incarnation: None };
    coordinator::raft::Transport::call(&transport, to, request, Duration::from_millis(3_000)).await.ok()
}

impl World {
    /// A group was lost in a disaster since `groups_lost` were, and the rebuilt group, its
    /// recovery done, holds no upgrade: the upgrade in flight then is gone with it (the
    /// rebuilt group learnt its freeze's outcome from the nodes' disks, not the upgrade). With
    /// 0: since the run began.
    pub(crate) fn upgrade_lost_since(&self, groups_lost: usize) -> bool {
        let state = self.freshest_state();
        self.lost_groups.len() > groups_lost && !self.recovering && state.current.is_none() && state.recovery.is_none()
    }

    /// A client updates only a user whose registration it saw succeed (a real client registers
    /// first); for one not known to exist, a user loaded before the run. The app would refuse
    /// the update ("no user"), an answer of the application's, not a failure of the cluster.
    fn existing_user(&self, id: i64) -> i64 {
        let acked =
            self.oracle.users.get(&id).and_then(|u| u.bios.first()).is_some_and(|b| b.write.acked_us().is_some());
        if acked {
            id
        } else {
            id.rem_euclid(self.config.initial_users.max(1) as i64)
        }
    }

    /// The same for items: a bid goes to an item whose listing succeeded.
    fn existing_item(&self, id: i64) -> i64 {
        let acked = self.oracle.items.get(&id).and_then(|i| i.added.as_ref()).is_some_and(|w| w.acked_us().is_some());
        if acked {
            id
        } else {
            id.rem_euclid(self.config.initial_items.max(1) as i64)
        }
    }

    pub(crate) fn next_op(&mut self) -> AppOp {
        let roll = self.rng.gen_range(0..100);
        let users = self.next_user.max(1);
        match roll {
            0..=34 => AppOp::ViewUser { id: self.rng.gen_range(0..users) },
            35..=44 => AppOp::ViewItem { id: self.rng.gen_range(0..self.next_item.max(1)) },
            45..=69 => {
                let id = self.next_user;
                self.next_user += 1;
                AppOp::RegisterUser {
                    id,
                    name: format!("user{id}"),
                    email: format!("u{id}@example.org"),
                    bio: format!("new{id}"),
                }
            }
            70..=84 => {
                let drawn = self.rng.gen_range(0..users);
                let id = self.existing_user(drawn);
                let tag: u64 = self.rng.gen();
                AppOp::UpdateBio { id, bio: format!("b{tag:016x}") }
            }
            85..=94 => {
                let drawn = self.rng.gen_range(0..self.next_item.max(1));
                AppOp::Bid { item: self.existing_item(drawn) }
            }
            _ => {
                let id = self.next_item;
                self.next_item += 1;
                AppOp::AddItem { id, title: format!("item{id}"), seller: id % 7, price: 100 + id }
            }
        }
    }
}
