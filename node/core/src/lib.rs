//! The Imago node agent: duty cores (pure state machines) and the agent core.
//!
//! - [`duties`]: router, capture, transform, validate, drain: each `handle(now_ms, input) ->
//!   outputs`, no I/O, no clock, no randomness.
//! - [`agent`]: register, report, watch decisions, persist the last decision before acting.
//! - [`store`]: the in-memory table store (old and new universe) used by the simulator; the
//!   SQLite and PostgreSQL adapters implement the same operations later.

pub mod agent;
pub mod duties;
pub mod store;
