//! The PostgreSQL adapter (under construction).
//!
//! - [`pgoutput`]: a decoder of PostgreSQL's `pgoutput` logical replication messages (pure).
//! - [`throwaway`]: a PostgreSQL cluster a test or a benchmark starts for itself.

pub mod pgoutput;
pub mod throwaway;
