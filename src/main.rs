//! The `imago` command line.

mod cluster_cmd;
mod coordinator_cmd;
mod data_node_cmd;
mod data_retire_cmd;
mod metrics_http;
mod node_cmd;
mod operator_cmd;
mod signals;
mod sim_cmd;

/// The simulator allocates a message, a task and a timer per network hop; mimalloc is markedly
/// faster than the system allocator for that pattern (measured with `imago sim --jobs 1`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use protocol::plan::COPY_CHUNK_ROWS_DEFAULT;

#[derive(Parser)]
#[command(name = "imago", version, about = "Dependable online upgrades of multi-tier clusters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text or as JSON objects (on stderr; filter with IMAGO_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the deterministic simulator over many seeds and check every invariant.
    Sim(sim_cmd::SimArgs),
    /// Work with upgrade plans.
    Plan {
        #[command(subcommand)]
        command: PlanCommand,
    },
    /// Make the cluster's certificates (mutual TLS between every Imago process).
    Certs {
        #[command(subcommand)]
        command: cluster_cmd::CertsCommand,
    },
    /// Run one coordinator replica (Raft over QUIC, a durable data directory).
    Coordinator(coordinator_cmd::CoordinatorArgs),
    /// Run one node: a router (the HTTP ingress proxy) of the cluster file.
    Node(node_cmd::NodeArgs),
    /// Start, watch, switch or abort an upgrade.
    Upgrade {
        #[command(subcommand)]
        command: operator_cmd::UpgradeCommand,
    },
    /// Add routers to the roster, or retire them.
    Router {
        #[command(subcommand)]
        command: operator_cmd::RouterCommand,
    },
    /// The coordinator group.
    Cluster {
        #[command(subcommand)]
        command: operator_cmd::ClusterCommand,
    },
    /// Clean up a data node's databases once its upgrade has ended.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Stop the data node first. Once the plan's upgrade has switched or been rolled back (the
    /// coordinators are asked), remove what Imago left: from the old database its capture (a
    /// PostgreSQL slot keeps WAL until it goes) and its fence, from the new one its checkpoint,
    /// key map and guard. The request logs stay. While the upgrade runs, or when no coordinator
    /// answers, nothing is touched.
    Retire(data_retire_cmd::RetireArgs),
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Load and validate a plan; print its new schema.
    Check {
        file: std::path::PathBuf,
        /// The generation the cluster serves (`imago upgrade status` shows it): a plan that
        /// upgrades from another is refused, as `upgrade start` would refuse it.
        #[arg(long)]
        generation: Option<u64>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A one-shot command whose reader went away (`imago plan check … | head`) ends quietly, as
    // Unix tools do, instead of panicking in `println!`. Long-running processes keep Rust's
    // default (SIGPIPE ignored), so a peer that closes a socket never kills them.
    if !matches!(cli.command, Command::Coordinator(_) | Command::Node(_)) {
        // SAFETY: called first thing, before any other thread exists; it only restores the
        // signal's default disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // Long-running processes log what they do; one-shot commands only what goes wrong.
    let default_filter = match cli.command {
        Command::Coordinator(_) | Command::Node(_) => "info,openraft=warn",
        _ => "warn,openraft=off",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("IMAGO_LOG").unwrap_or_else(|_| default_filter.into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    if cli.log_format == LogFormat::Json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    let result = match cli.command {
        Command::Sim(args) => sim_cmd::run(args),
        Command::Plan { command: PlanCommand::Check { file, generation } } => plan_check(&file, generation),
        Command::Certs { command } => cluster_cmd::certs(command),
        Command::Coordinator(args) => coordinator_cmd::run(args),
        Command::Node(args) => node_cmd::run(args),
        Command::Upgrade { command } => operator_cmd::upgrade(command),
        Command::Router { command } => operator_cmd::router(command),
        Command::Cluster { command } => operator_cmd::cluster(command),
        Command::Data { command: DataCommand::Retire(args) } => data_retire_cmd::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn plan_check(file: &std::path::Path, generation: Option<u64>) -> anyhow::Result<std::process::ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let plan = match protocol::plan::Plan::from_toml(&file.display().to_string(), &text) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("{e}");
            return Ok(std::process::ExitCode::from(1));
        }
    };
    if let Some(serving) = generation.filter(|g| *g != plan.old_generation.0) {
        // Where the plan says it (or its `[upgrade]` table, when it says nothing: generation 1).
        let line = text
            .lines()
            .position(|l| l.trim_start().starts_with("old_generation"))
            .or_else(|| text.lines().position(|l| l.trim() == "[upgrade]"))
            .map_or(1, |i| i + 1);
        eprintln!(
            "{}:{line}:1: upgrade.old_generation: the plan upgrades from generation {}, but the cluster serves \
             generation {serving}: write the plan against generation {serving} (its old schema is that \
             generation's)",
            file.display(),
            plan.old_generation.0
        );
        return Ok(std::process::ExitCode::from(1));
    }
    println!(
        "plan `{}`: generation {} -> {}, {} nodes, {} transforms, switch {:?}",
        plan.name,
        plan.old_generation.0,
        plan.old_generation.next().0,
        plan.nodes.len(),
        plan.transforms.len(),
        plan.switch
    );
    if plan.endpoints.is_empty() {
        println!("  the new universe has no endpoints (`[universe] endpoints`): routers cannot switch to it");
    } else {
        println!("  the new universe answers at {}", plan.endpoints.join(", "));
    }
    let v = &plan.validation;
    let ignored = if v.ignore.is_empty() { "nothing".to_string() } else { v.ignore.join(", ") };
    println!("  routers mirror {} requests and compare answers but {ignored}", v.mirror_methods.join("/"));
    let long = if plan.long_routes.is_empty() { "none".to_string() } else { plan.long_routes.join(", ") };
    println!(
        "  at a freeze, routers end long requests at once (routes: {long}) and others after {} ms",
        plan.thresholds.inflight_ms_max
    );
    match plan.copy_rows_per_s_max {
        Some(rate) => println!("  data nodes copy at most {rate} rows/s from the old universe"),
        None => println!("  data nodes copy as fast as they can (no [copy] rows_per_s_max)"),
    }
    match plan.copy_chunk_rows {
        Some(rows) => println!("  data nodes copy {rows} rows per chunk (one transaction each)"),
        None => println!("  data nodes copy {COPY_CHUNK_ROWS_DEFAULT} rows per chunk (no [copy] chunk_rows)"),
    }
    let mapping = plan.mapping().context("compiling transforms")?;
    for (table, t) in &mapping.new_schema().tables {
        println!("  new table {table}({})", t.columns.join(", "));
    }
    for (old_table, outputs) in &mapping.outputs {
        for output in outputs {
            let mut notes = Vec::new();
            if output.generated {
                notes.push(format!("key {} generated by the new database (kept in its key map)", output.key));
            }
            if output.merged {
                notes.push("merged by key with another table's rows".to_string());
            }
            for (column, source) in &output.columns {
                match source {
                    protocol::schema::Source::KeyOf(other) if *column != output.key => {
                        notes.push(format!("{column} = the key of the same row in {other}"))
                    }
                    protocol::schema::Source::Sql { sql, .. } => notes.push(format!("{column} = the database's {sql}")),
                    _ => {}
                }
            }
            if !notes.is_empty() {
                println!("  {old_table} -> {}: {}", output.table, notes.join("; "));
            }
        }
    }
    for (old_table, custom) in &mapping.custom {
        let written: Vec<&str> = custom.writes.iter().map(|(t, _)| t.as_str()).collect();
        println!("  {old_table} -> {}: by the plan's own insert, update and delete statements", written.join(", "));
    }
    if mapping.needs_database().is_some() {
        println!(
            "  the new database evaluates some of these transforms (SQL): the in-memory store cannot run this plan"
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}
