//! The client oracle: what every write's client was told. A timed-out write is *unknown*: it
//! may or may not have happened. Acknowledged writes must be present at the end; writes the
//! client was told failed must not be.

use std::collections::BTreeMap;

/// What the client learnt of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientOutcome {
    Acked,
    Failed,
    Unknown,
}

/// Writes and their outcomes.
#[derive(Debug, Default)]
pub struct Oracle {
    /// User id → outcome of its registration.
    pub registrations: BTreeMap<i64, ClientOutcome>,
    /// User id → (bio written, outcome) of each update.
    pub bio_updates: BTreeMap<i64, Vec<(String, ClientOutcome)>>,
    pub acked: u64,
    pub failed: u64,
    pub unknown: u64,
    pub reads: u64,
}

impl Oracle {
    pub fn count(&mut self, outcome: ClientOutcome) {
        match outcome {
            ClientOutcome::Acked => self.acked += 1,
            ClientOutcome::Failed => self.failed += 1,
            ClientOutcome::Unknown => self.unknown += 1,
        }
    }
}
