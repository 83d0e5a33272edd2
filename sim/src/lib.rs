//! The deterministic simulator (docs/design.md): the real coordinator (openraft) and the real node
//! cores on one paused current-thread runtime, a seeded network with faults, a client workload
//! with an oracle, and the invariant checkers.
//!
//! [`run_seed`] runs one seed; the same seed always gives the same trace hash.

// tokio's own scheduler randomness (`select!`, task order) is seeded only with `tokio_unstable`
// (set in `.cargo/config.toml`). A `RUSTFLAGS` environment variable replaces that file's flags
// silently, and the simulator would lose its determinism: refuse to build instead.
#[cfg(not(tokio_unstable))]
compile_error!(
    "imago-sim needs `--cfg tokio_unstable` (set in .cargo/config.toml); a RUSTFLAGS environment variable replaces it: add `--cfg tokio_unstable` to RUSTFLAGS or unset it"
);

pub mod app;
pub mod checkers;
mod clients;
pub mod config;
mod data;
mod ending;
pub mod faults;
mod inject;
pub mod net;
mod node_io;
mod operator;
pub mod oracle;
mod procs;
mod router;
mod run;
pub mod summary;
pub mod trace;
pub mod wire;
mod world;

pub use checkers::{Seen, Violation};
pub use config::{value_name, Bug, FaultKind, FaultSet, SimConfig};
pub use faults::Scenario;
pub use run::{run_seed, SeedOutcome, SeedReport};
pub use summary::Summary;
