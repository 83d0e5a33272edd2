//! The operator's commands (`imago upgrade …`, `imago router …`, `imago cluster status`): one
//! request to the coordinator group, over QUIC with the `operator` certificate.
//!
//! Exit codes: 0 done, 1 refused by the coordinator, 2 bad input or local error, 3 no
//! coordinator answered, 4 the outcome is not known (it may still take effect: look with
//! `imago upgrade status` before trying again).

use crate::cluster_cmd::ClusterArg;
use anyhow::Context;
use clap::{Args, Subcommand};
use protocol::cluster::{ClusterFile, OPERATOR_NAME};
use protocol::messages::{CliRequest, CliResponse, ClusterView, Phase, Request, Response, StatusView};
use protocol::transport::{Transport, TransportError};
use protocol::{NodeName, ReplicaId};
use quic::endpoint::QuicTransport;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

/// How long one coordinator gets to answer.
const CALL_MS_MAX: u64 = 1_500;
/// How long a command tries before it says that no coordinator answered.
const COMMAND_MS_MAX: u64 = 5_000;
/// How long a membership change may take (the coordinators give it 30 s).
const MEMBERSHIP_MS_MAX: u64 = 35_000;

#[derive(Args, Clone)]
pub struct Common {
    #[command(flatten)]
    cluster: ClusterArg,
    /// Print JSON (one object) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum UpgradeCommand {
    /// Start the upgrade a plan describes (safe to repeat: the same plan file starts it once).
    Start {
        plan: std::path::PathBuf,
        /// Start the plan again after upgrade N, which ran it and was rolled back (without
        /// this, the same plan file answers with upgrade N and starts nothing).
        #[arg(long, value_name = "N")]
        retry: Option<u64>,
        #[command(flatten)]
        common: Common,
    },
    /// The upgrade's phase, epoch, generation, gate and nodes.
    Status {
        /// Print again every second until the upgrade ends.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Ask for the switch (a manual plan freezes once its ready gate passes).
    Switch {
        #[command(flatten)]
        common: Common,
    },
    /// Abort the upgrade (back to syncing, or rolled back after a freeze).
    Abort {
        #[arg(long, default_value = "aborted by the operator")]
        reason: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
pub enum RouterCommand {
    /// Put a router on the roster (refused during a freeze).
    Join {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Take a router off the roster. It completes once the router has persisted that it is
    /// retired and stopped serving.
    Retire {
        name: String,
        /// Retire a router that cannot answer, at once. You assert that it is cut off from
        /// every client: a forced-out router that still serves could serve the old generation
        /// after the others switch.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Leader, term, members, applied index, roster, and when each node was last heard from.
    Status {
        #[command(flatten)]
        common: Common,
    },
    /// Add a replica named in the cluster file (started with `imago coordinator`) to the group:
    /// it catches up, then votes. One membership change at a time; to replace a replica, add
    /// the new one, then remove the old one.
    AddReplica {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Take a replica out of the group (then stop it, and take it out of the cluster file).
    RemoveReplica {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// After a disaster that lost every replica's data: a group started afresh (empty data
    /// directories) learns the cluster from the disks of the nodes in the cluster file: the
    /// generation served, the last epoch and its outcome, the routers. It decides nothing until
    /// each node has told it (`imago upgrade status` lists those it waits for). `--without NODE`
    /// stops waiting for a node whose disk is gone for good: you assert it is cut off from
    /// clients; name routers retired by force here too (else they are back on the roster).
    /// Given again, it adds to them.
    Recover {
        #[arg(long = "without", value_name = "NODE")]
        without: Vec<String>,
        /// If the newest decision on the disks is a freeze and a lost node, or one whose disk
        /// was replaced, may have acted on its outcome, the recovery waits for your word: this
        /// asserts that no client can have seen the new universe, and aborts that freeze.
        #[arg(long)]
        abort_unknown_freeze: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Raise the replicated state's format to `--to` (after every replica runs a build that
    /// reads it; see "Versioned formats" in the design notes). Every replica of the group is
    /// asked first: one that does not answer, or reads only older formats, is named and nothing
    /// changes. A format is only ever raised: an older build cannot join the group afterwards.
    RaiseFormat {
        #[arg(long)]
        to: u32,
        #[command(flatten)]
        common: Common,
    },
}

/// The coordinator group, called with the operator's certificate.
struct Coordinators {
    transport: QuicTransport,
    order: Vec<ReplicaId>,
    names: BTreeMap<ReplicaId, String>,
}

/// What became of one request.
enum Outcome {
    Answered(CliResponse),
    /// No replica answered (each one's reason).
    NoAnswer(Vec<String>),
}

impl Coordinators {
    fn new(cluster: &ClusterFile) -> anyhow::Result<Coordinators> {
        let identity = quic::certs::load(&cluster.certs, &cluster.id, OPERATOR_NAME)
            .context("loading the operator's certificate (`imago certs init` makes it)")?;
        let (_, transport) = crate::cluster_cmd::coordinator_client(cluster, &identity)?;
        let names = cluster.coordinators.iter().map(|c| (c.id, c.name.0.clone())).collect();
        Ok(Coordinators { transport, order: cluster.coordinators.iter().map(|c| c.id).collect(), names })
    }

    /// Sends `request` to the leader (following hints), trying every replica within
    /// [`COMMAND_MS_MAX`] ([`MEMBERSHIP_MS_MAX`] for a membership change, which waits for a
    /// new replica to catch up). A definite answer ends it; not knowing the outcome is an
    /// answer too.
    async fn call(&self, request: CliRequest) -> Outcome {
        let (call_ms, command_ms) = match request {
            CliRequest::AddReplica { .. } | CliRequest::RemoveReplica { .. } => (MEMBERSHIP_MS_MAX, MEMBERSHIP_MS_MAX),
            _ => (CALL_MS_MAX, COMMAND_MS_MAX),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(command_ms);
        let mut failures = Vec::new();
        let mut queue: Vec<ReplicaId> = self.order.clone();
        let mut next = 0;
        while tokio::time::Instant::now() < deadline && !queue.is_empty() {
            let to = queue[next % queue.len()];
            next += 1;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let timeout = left.min(Duration::from_millis(call_ms));
            let name = self.names.get(&to).cloned().unwrap_or_default();
            match self.transport.call(to, Request::Cli(request.clone()), timeout).await {
                Ok(Response::Cli(CliResponse::NotLeader { leader: Some(leader) })) if leader != to => {
                    // Ask the leader next.
                    queue.retain(|r| *r != leader);
                    queue.insert(next % (queue.len() + 1), leader);
                }
                Ok(Response::Cli(CliResponse::NotLeader { .. })) => {
                    failures.push(format!("{name}: no leader known yet"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // Any replica describes the group, but the leader's description is the freshest.
                Ok(Response::Cli(CliResponse::Cluster(view)))
                    if view.leader.is_some_and(|l| l != to && self.names.contains_key(&l)) =>
                {
                    let leader = view.leader.expect("checked");
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let timeout = left.min(Duration::from_millis(CALL_MS_MAX));
                    return match self.transport.call(leader, Request::Cli(request.clone()), timeout).await {
                        Ok(Response::Cli(fresher @ CliResponse::Cluster(_))) => Outcome::Answered(fresher),
                        _ => Outcome::Answered(CliResponse::Cluster(view)),
                    };
                }
                Ok(Response::Cli(answer)) => return Outcome::Answered(answer),
                Ok(Response::Error { reason }) => failures.push(format!("{name}: {reason}")),
                Ok(other) => failures.push(format!("{name}: unexpected answer {other:?}")),
                Err(TransportError::Refused(reason)) => {
                    failures.push(format!("refused: {reason}"));
                    return Outcome::NoAnswer(failures);
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        Outcome::NoAnswer(failures)
    }
}

/// The coordinators' status of the current (or last) upgrade, or why none was had (no
/// coordinator answered, or one answered something else).
pub(crate) fn status_of(cluster: &ClusterFile) -> anyhow::Result<Result<StatusView, String>> {
    runtime()?.block_on(async {
        let coordinators = Coordinators::new(cluster)?;
        Ok(match coordinators.call(CliRequest::Status).await {
            Outcome::Answered(CliResponse::Status(status)) => Ok(status),
            Outcome::Answered(other) => Err(format!("the coordinators answered {other:?} to a status request")),
            Outcome::NoAnswer(failures) => Err(format!(
                "no coordinator answered, so whether the upgrade ended is unknown: {}",
                failures.join("; ")
            )),
        })
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Runs one request and prints what became of it.
fn one(common: &Common, request: CliRequest, what: &str) -> anyhow::Result<ExitCode> {
    let cluster = common.cluster.load()?;
    runtime()?.block_on(async {
        let coordinators = Coordinators::new(&cluster)?;
        let outcome = coordinators.call(request).await;
        Ok(report(common.json, what, outcome))
    })
}

fn report(json: bool, what: &str, outcome: Outcome) -> ExitCode {
    let (code, text, value) = match outcome {
        Outcome::NoAnswer(failures) => (
            3,
            format!(
                "{what}: no coordinator answered in time; nothing is known to have happened\n  {}",
                failures.join("\n  ")
            ),
            serde_json::json!({ "outcome": "no-answer", "failures": failures }),
        ),
        Outcome::Answered(CliResponse::Accepted) => {
            (0, format!("{what}: done"), serde_json::json!({ "outcome": "accepted" }))
        }
        Outcome::Answered(CliResponse::Started { upgrade }) => (
            0,
            format!("{what}: upgrade {} started", upgrade.0),
            serde_json::json!({ "outcome": "started", "upgrade": upgrade.0 }),
        ),
        Outcome::Answered(CliResponse::Rejected(rejection)) => (
            1,
            format!("{what}: refused: {}", rejection.detail),
            serde_json::json!({ "outcome": "refused", "kind": format!("{:?}", rejection.kind), "detail": rejection.detail }),
        ),
        Outcome::Answered(CliResponse::Unknown { reason }) => (
            4,
            format!(
                "{what}: outcome UNKNOWN ({reason}); it may still take effect: check `imago upgrade status` before \
                 trying again"
            ),
            serde_json::json!({ "outcome": "unknown", "reason": reason }),
        ),
        Outcome::Answered(CliResponse::Status(status)) => {
            (0, status_text(&status), serde_json::to_value(status_json(&status)).unwrap_or_default())
        }
        Outcome::Answered(CliResponse::Cluster(view)) => (0, cluster_text(&view), cluster_json(&view)),
        Outcome::Answered(CliResponse::NotLeader { .. }) => {
            (3, format!("{what}: no leader"), serde_json::json!({ "outcome": "no-leader" }))
        }
    };
    if json {
        println!("{value}");
    } else if code == 0 {
        println!("{text}");
    } else {
        eprintln!("{text}");
    }
    ExitCode::from(code)
}

fn status_json(s: &StatusView) -> serde_json::Value {
    serde_json::json!({
        "upgrade": s.upgrade.map(|u| u.0),
        "name": s.name,
        "phase": s.phase.map(|p| format!("{p:?}")),
        "epoch": s.epoch.0,
        "generation": s.generation.0,
        "attempts": s.attempts,
        "gate_blockers": s.gate_blockers.iter().map(|b| format!("{b:?}")).collect::<Vec<_>>(),
        "last_abort_reason": s.last_abort_reason,
        "recovery_waiting": s.recovery_waiting.as_ref().map(|w| w.iter().map(|n| n.0.clone()).collect::<Vec<_>>()),
        "recovery_blocked": s.recovery_blocked,
        "nodes": s.nodes.iter().map(|n| serde_json::json!({
            "name": n.name.0,
            "registered": n.registered,
            "report": {
                "captured": n.report.captured.0,
                "applied": n.report.applied.0,
                "bulk_done": n.report.bulk_done,
                "samples": n.report.samples,
                "mismatches": n.report.mismatches,
                "copied_rows": n.report.copied_rows,
                "copy_rows_total": n.report.copy_rows_total,
                "lag_ms": n.report.pace.lag_ms,
                "changes_per_s": n.report.pace.changes_per_s,
                "copy_rows_per_s": n.report.pace.copy_rows_per_s,
                "copy_eta_ms": n.report.pace.copy_eta_ms,
                "ranges": {
                    "by_range": n.report.ranges.by_range,
                    "ranges": n.report.ranges.ranges,
                    "attempted": n.report.ranges.attempted,
                    "clean": n.report.ranges.clean,
                    "differed": n.report.ranges.differed,
                    "rows": n.report.ranges.rows,
                    "tables": n.report.ranges.tables.iter().map(|t| serde_json::json!({
                        "table": t.table, "expected": t.expected, "actual": t.actual,
                    })).collect::<Vec<_>>(),
                },
            },
        })).collect::<Vec<_>>(),
    })
}

fn status_text(s: &StatusView) -> String {
    if let Some(why) = &s.recovery_blocked {
        return format!("recovering from the nodes' disks: {why}");
    }
    let Some(upgrade) = s.upgrade else {
        return format!("no upgrade yet; the cluster serves generation {}", s.generation.0);
    };
    let mut out = format!(
        "upgrade {} `{}`: {}, epoch {}, attempts {}; the cluster serves generation {}",
        upgrade.0,
        s.name,
        s.phase.map_or("-".to_string(), |p| format!("{p:?}")),
        s.epoch.0,
        s.attempts,
        s.generation.0
    );
    if !s.gate_blockers.is_empty() {
        out.push_str("\n  the ready gate waits for:");
        for b in &s.gate_blockers {
            out.push_str(&format!("\n    {b}"));
        }
    }
    if let Some(reason) = &s.last_abort_reason {
        out.push_str(&format!("\n  last abort: {reason}"));
    }
    for n in &s.nodes {
        out.push_str(&format!("\n  {}: {}", n.name, node_line(n)));
    }
    out
}

/// A duration for people: `850 ms`, `4.2 s`, `3 min 20 s`.
fn seconds(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1_000.0),
        _ => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1_000),
    }
}

/// One node's progress, as the coordinator last heard it.
fn node_line(n: &protocol::messages::NodeStatus) -> String {
    let r = &n.report;
    if !n.registered {
        return "not registered".to_string();
    }
    let mut parts = Vec::new();
    if r.captured.0 > 0 || r.applied.0 > 0 || r.bulk_done {
        let p = &r.pace;
        let copy = match (r.bulk_done, r.copy_rows_total) {
            (true, _) => "done".to_string(),
            (false, 0) => format!("running ({} rows copied, {} rows/s)", r.copied_rows, p.copy_rows_per_s),
            (false, total) => format!(
                "running ({} of {} rows, {} %, {} rows/s{})",
                r.copied_rows,
                total,
                100 * r.copied_rows.min(total) / total,
                p.copy_rows_per_s,
                p.copy_eta_ms.map_or(String::new(), |ms| format!(", {} left", seconds(ms)))
            ),
        };
        parts.push(format!(
            "applied {} of {} captured (lag {}, {}), {} changes/s, copy {copy}",
            r.applied.0,
            r.captured.0,
            r.captured.0.saturating_sub(r.applied.0),
            seconds(p.lag_ms),
            p.changes_per_s,
        ));
    }
    let c = &r.ranges;
    if c.by_range && r.bulk_done {
        parts.push(format!(
            "data compared in {} of {} key ranges ({} unchanged since, {} differ; {} rows read)",
            c.attempted, c.ranges, c.clean, c.differed, c.rows
        ));
        // Rows by new table: transform(old)'s, then the new store's where they differ.
        let tables: Vec<String> = c
            .tables
            .iter()
            .map(|t| match t.expected == t.actual {
                true => format!("{} {}", t.table, t.expected),
                false => format!("{} {} (new store: {})", t.table, t.expected, t.actual),
            })
            .collect();
        if !tables.is_empty() {
            parts.push(format!("rows compared by table: {}", tables.join(", ")));
        }
    }
    if r.samples > 0 || parts.is_empty() {
        parts.push(format!("validated {} mirrored requests, {} differed", r.samples, r.mismatches));
    }
    parts.join("; ")
}

/// `imago upgrade status --watch` on a terminal: the phase on a spinner, the gate's samples and
/// each node's progress on bars, until the upgrade ends.
async fn watch_with_bars(coordinators: &Coordinators) -> ExitCode {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let multi = MultiProgress::new();
    let header = multi.add(ProgressBar::new_spinner());
    header.set_style(
        ProgressStyle::with_template("{spinner} {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let bar_style = ProgressStyle::with_template("  {prefix:<14} [{bar:30}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    // A copy's bar: indicatif measures its pace between two answers, and the time left.
    let copy_style = ProgressStyle::with_template(
        "  {prefix:<14} [{bar:30}] {human_pos}/{human_len} rows, {per_sec}, {eta} left {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    loop {
        match coordinators.call(CliRequest::Status).await {
            Outcome::Answered(CliResponse::Status(s)) => {
                header.set_message(format!(
                    "upgrade {} `{}`: {} (epoch {}, attempts {}); the cluster serves generation {}",
                    s.upgrade.map_or(0, |u| u.0),
                    s.name,
                    s.phase.map_or("-".to_string(), |p| format!("{p:?}")),
                    s.epoch.0,
                    s.attempts,
                    s.generation.0
                ));
                header.tick();
                for blocker in &s.gate_blockers {
                    if let protocol::messages::GateBlocker::TooFewSamples { samples, samples_min } = blocker {
                        let bar = bars.entry("gate".into()).or_insert_with(|| {
                            let bar = multi.add(ProgressBar::new(*samples_min));
                            bar.set_style(bar_style.clone());
                            bar.set_prefix("validation");
                            bar
                        });
                        bar.set_length(*samples_min);
                        bar.set_position((*samples).min(*samples_min));
                        bar.set_message("mirrored requests compared");
                    }
                }
                for n in &s.nodes {
                    let bar = bars.entry(n.name.0.clone()).or_insert_with(|| {
                        let bar = multi.add(ProgressBar::new(1));
                        bar.set_style(bar_style.clone());
                        bar.set_prefix(n.name.0.clone());
                        bar
                    });
                    let copying = !n.report.bulk_done && n.report.copy_rows_total > 0;
                    bar.set_style(if copying { copy_style.clone() } else { bar_style.clone() });
                    let (pos, len) = if copying {
                        // The copy: rows of its snapshot.
                        (n.report.copied_rows, n.report.copy_rows_total)
                    } else if n.report.captured.0 > 0 {
                        (n.report.applied.0, n.report.captured.0)
                    } else {
                        (n.report.samples, n.report.samples.max(1))
                    };
                    bar.set_length(len);
                    bar.set_position(pos.min(len));
                    bar.set_message(node_line(n));
                }
                if s.phase.is_none_or(|p| p.is_terminal()) {
                    for bar in bars.values() {
                        bar.finish();
                    }
                    header.finish();
                    return ExitCode::SUCCESS;
                }
            }
            other => {
                header.abandon();
                return report(false, "upgrade status", other);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn cluster_json(v: &ClusterView) -> serde_json::Value {
    serde_json::json!({
        "replica": v.replica,
        "leader": v.leader,
        "term": v.term,
        "members": v.members,
        "applied_index": v.applied_index,
        "generation": v.generation.0,
        "format": v.format,
        "format_readable": v.format_readable,
        "roster": v.roster.iter().map(|(n, r)| serde_json::json!({"name": n.0, "status": format!("{r:?}")})).collect::<Vec<_>>(),
        "last_contact_ms_ago": v.last_contact_ms_ago.iter().map(|(n, ms)| serde_json::json!({"name": n.0, "ms": ms})).collect::<Vec<_>>(),
    })
}

fn cluster_text(v: &ClusterView) -> String {
    let mut out = format!(
        "replica {} answers: leader {}, term {}, members {:?}, applied index {}; the cluster serves generation {}",
        v.replica,
        v.leader.map_or("unknown".to_string(), |l| l.to_string()),
        v.term,
        v.members,
        v.applied_index.map_or("-".to_string(), |i| i.to_string()),
        v.generation.0
    );
    out.push_str(&format!(
        "\n  replicated state: format {} (this replica reads up to {})",
        v.format, v.format_readable
    ));
    if v.roster.is_empty() {
        out.push_str("\n  roster: empty (routers join with `imago router join NAME`)");
    }
    for (name, status) in &v.roster {
        out.push_str(&format!("\n  router {name}: {status:?}"));
    }
    for (name, ms) in &v.last_contact_ms_ago {
        out.push_str(&format!("\n  node {name}: last heard {ms} ms ago (by this replica)"));
    }
    out
}

pub fn upgrade(command: UpgradeCommand) -> anyhow::Result<ExitCode> {
    match command {
        UpgradeCommand::Start { plan, retry, common } => {
            let text = std::fs::read_to_string(&plan).with_context(|| format!("reading {}", plan.display()))?;
            let parsed = match protocol::plan::Plan::from_toml(&plan.display().to_string(), &text) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(2));
                }
            };
            if parsed.endpoints.is_empty() {
                eprintln!(
                    "{}: [universe] endpoints: the plan names no endpoint for the new universe; routers could \
                     neither validate it nor switch to it",
                    plan.display()
                );
                return Ok(ExitCode::from(2));
            }
            // The same plan text makes the same token: repeating the command after an unknown
            // outcome answers with the upgrade it started, never starts a second one.
            // A retry names the upgrade it follows, so repeating it is just as safe.
            let mut token = format!("{}-{:016x}", parsed.name, fnv1a(text.as_bytes()));
            if let Some(after) = retry {
                token.push_str(&format!("-retry-{after}"));
            }
            let cluster = common.cluster.load()?;
            runtime()?.block_on(async {
                let coordinators = Coordinators::new(&cluster)?;
                let outcome = coordinators.call(CliRequest::Start { plan: Box::new(parsed), token }).await;
                let Outcome::Answered(CliResponse::Started { upgrade }) = &outcome else {
                    return Ok(report(common.json, "upgrade start", outcome));
                };
                // The same plan (and retry) as an upgrade that has since ended: nothing started.
                let ended = match coordinators.call(CliRequest::Status).await {
                    Outcome::Answered(CliResponse::Status(s)) if s.upgrade == Some(*upgrade) => {
                        s.phase.filter(|p| p.is_terminal())
                    }
                    _ => None,
                };
                let Some(phase) = ended else {
                    return Ok(report(common.json, "upgrade start", outcome));
                };
                let retry = match phase {
                    Phase::RolledBack => format!(
                        "; to run it again: imago upgrade start {} --retry {}",
                        plan.display(),
                        upgrade.0
                    ),
                    _ => String::new(),
                };
                let text = format!(
                    "upgrade start: this plan already ran as upgrade {}, which ended {phase:?}: nothing was started{retry}",
                    upgrade.0
                );
                if common.json {
                    let value = serde_json::json!({ "outcome": "ended", "upgrade": upgrade.0, "phase": format!("{phase:?}") });
                    println!("{value}");
                } else {
                    eprintln!("{text}");
                }
                Ok(ExitCode::from(5))
            })
        }
        UpgradeCommand::Status { watch, common } => {
            if !watch {
                return one(&common, CliRequest::Status, "upgrade status");
            }
            let cluster = common.cluster.load()?;
            let bars = !common.json && std::io::IsTerminal::is_terminal(&std::io::stdout());
            runtime()?.block_on(async {
                let coordinators = Coordinators::new(&cluster)?;
                if bars {
                    return Ok(watch_with_bars(&coordinators).await);
                }
                loop {
                    let outcome = coordinators.call(CliRequest::Status).await;
                    let ended = match &outcome {
                        Outcome::Answered(CliResponse::Status(s)) => s.phase.is_none_or(|p| p.is_terminal()),
                        _ => false,
                    };
                    let code = report(common.json, "upgrade status", outcome);
                    if ended {
                        return Ok(code);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        }
        UpgradeCommand::Switch { common } => one(&common, CliRequest::Switch, "upgrade switch"),
        UpgradeCommand::Abort { reason, common } => one(&common, CliRequest::Abort { reason }, "upgrade abort"),
    }
}

pub fn router(command: RouterCommand) -> anyhow::Result<ExitCode> {
    match command {
        RouterCommand::Join { name, common } => {
            one(&common, CliRequest::Join { node: NodeName(name.clone()) }, &format!("router join {name}"))
        }
        RouterCommand::Retire { name, force, common } => one(
            &common,
            CliRequest::Retire { node: NodeName(name.clone()), force },
            &format!("router retire {name}{}", if force { " --force" } else { "" }),
        ),
    }
}

pub fn cluster(command: ClusterCommand) -> anyhow::Result<ExitCode> {
    match command {
        ClusterCommand::Status { common } => one(&common, CliRequest::Cluster, "cluster status"),
        ClusterCommand::AddReplica { name, common } => {
            let cluster = common.cluster.load()?;
            let Some(replica) = cluster.coordinator_named(&name) else {
                anyhow::bail!("`{name}` is not a coordinator of the cluster file: add it there first");
            };
            let request =
                CliRequest::AddReplica { id: replica.id, address: format!("{}@{}", replica.name, replica.address) };
            one(&common, request, &format!("cluster add-replica {name}"))
        }
        ClusterCommand::Recover { without, abort_unknown_freeze, common } => {
            let cluster = common.cluster.load()?;
            let expected: Vec<protocol::NodeName> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
            let lost: Vec<protocol::NodeName> = without.iter().map(|n| protocol::NodeName::from(n.as_str())).collect();
            if let Some(unknown) = lost.iter().find(|n| !expected.contains(n)) {
                anyhow::bail!("`{unknown}` is not a node of the cluster file");
            }
            one(&common, CliRequest::Recover { expected, lost, abort_unknown_freeze }, "cluster recover")
        }
        ClusterCommand::RaiseFormat { to, common } => raise_format(&common, to),
        ClusterCommand::RemoveReplica { name, common } => {
            let cluster = common.cluster.load()?;
            let Some(replica) = cluster.coordinator_named(&name) else {
                anyhow::bail!("`{name}` is not a coordinator of the cluster file");
            };
            one(&common, CliRequest::RemoveReplica { id: replica.id }, &format!("cluster remove-replica {name}"))
        }
    }
}

/// `imago cluster raise-format --to N`: every member must say it reads `N`, then the leader
/// proposes it. A replica that cannot be asked, or reads less, is named and nothing changes.
fn raise_format(common: &Common, to: u32) -> anyhow::Result<ExitCode> {
    let cluster = common.cluster.load()?;
    let what = format!("cluster raise-format --to {to}");
    runtime()?.block_on(async {
        let coordinators = Coordinators::new(&cluster)?;
        let members = match coordinators.call(CliRequest::Cluster).await {
            Outcome::Answered(CliResponse::Cluster(view)) => view.members,
            other => return Ok(report(common.json, &what, other)),
        };
        let mut unable = Vec::new();
        for id in members {
            let name = coordinators.names.get(&id).cloned().unwrap_or_else(|| format!("replica {id}"));
            let timeout = Duration::from_millis(CALL_MS_MAX);
            match coordinators.transport.call(id, Request::Cli(CliRequest::Cluster), timeout).await {
                Ok(Response::Cli(CliResponse::Cluster(v))) if v.format_readable >= to => {}
                Ok(Response::Cli(CliResponse::Cluster(v))) => {
                    unable.push(format!("{name} reads up to format {}", v.format_readable))
                }
                Ok(other) => unable.push(format!("{name} answered {other:?}")),
                Err(e) => unable.push(format!("{name} did not answer ({e})")),
            }
        }
        if !unable.is_empty() {
            let detail = format!("nothing changed: every replica must read format {to} first: {}", unable.join("; "));
            let refused = protocol::messages::Rejection { kind: protocol::messages::RejectKind::BadCommand, detail };
            return Ok(report(common.json, &what, Outcome::Answered(CliResponse::Rejected(refused))));
        }
        Ok(report(common.json, &what, coordinators.call(CliRequest::RaiseFormat { to }).await))
    })
}

/// FNV-1a (64 bits): a stable digest of the plan text for the start token.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::messages::{NodeReport, NodeStatus, Pace};
    use protocol::Position;

    #[test]
    fn a_data_nodes_line_says_its_pace_and_time_left() {
        let copying = NodeReport {
            captured: Position(12),
            applied: Position(7),
            copied_rows: 4_000,
            copy_rows_total: 10_000,
            pace: Pace { lag_ms: 1_500, changes_per_s: 40, copy_rows_per_s: 2_000, copy_eta_ms: Some(3_000) },
            ..Default::default()
        };
        let line = node_line(&NodeStatus { name: "db-1".into(), registered: true, report: copying.clone() });
        assert_eq!(
            line,
            "applied 7 of 12 captured (lag 5, 1.5 s), 40 changes/s, copy running (4000 of 10000 rows, 40 %, 2000 rows/s, 3.0 s left)"
        );
        let streaming = NodeReport { bulk_done: true, pace: Pace { lag_ms: 200_000, ..copying.pace }, ..copying };
        let line = node_line(&NodeStatus { name: "db-1".into(), registered: true, report: streaming.clone() });
        assert!(line.contains("(lag 5, 3 min 20 s), 40 changes/s, copy done"), "{line}");
        let table =
            |table: &str, expected, actual| protocol::messages::TableRows { table: table.into(), expected, actual };
        let ranges = protocol::messages::RangeCheck {
            by_range: true,
            ranges: 40,
            attempted: 38,
            clean: 30,
            differed: 1,
            rows: 41_000,
            tables: vec![table("page", 40_000, 40_000), table("text", 1_000, 999)],
        };
        let comparing = NodeReport { ranges, ..streaming };
        let line = node_line(&NodeStatus { name: "db-1".into(), registered: true, report: comparing });
        assert!(
            line.ends_with(
                "; data compared in 38 of 40 key ranges (30 unchanged since, 1 differ; 41000 rows read); \
                 rows compared by table: page 40000, text 1000 (new store: 999)"
            ),
            "{line}"
        );
    }
}
