//! The client oracle: every write a client issued, when, and what its client was told. A
//! timed-out write is *unknown*: it may or may not have happened. Acknowledged writes must be
//! present at the end and visible to every read issued after their acknowledgement; writes the
//! client was told failed must never be seen.

use crate::app::AppOp;
use std::collections::BTreeMap;

/// What the client learnt of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientOutcome {
    Acked,
    Failed,
    Unknown,
}

/// One write as its client saw it (virtual µs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Write {
    pub issued_us: u64,
    /// When the client got its answer, and which.
    pub done: Option<(u64, ClientOutcome)>,
}

impl Write {
    /// A write that was there before the run (acknowledged at time 0).
    pub const INITIAL: Write = Write { issued_us: 0, done: Some((0, ClientOutcome::Acked)) };

    pub fn acked_us(&self) -> Option<u64> {
        match self.done {
            Some((at, ClientOutcome::Acked)) => Some(at),
            _ => None,
        }
    }

    pub fn outcome(&self) -> Option<ClientOutcome> {
        self.done.map(|(_, o)| o)
    }

    /// Acknowledged before `us`.
    pub fn acked_before(&self, us: u64) -> bool {
        self.acked_us().is_some_and(|at| at < us)
    }
}

/// One write of a user's bio (the registration writes the first one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BioWrite {
    pub bio: String,
    pub write: Write,
}

/// Every write of one user: `bios[0]` is the registration (or the initial row).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserLog {
    pub bios: Vec<BioWrite>,
}

impl UserLog {
    pub fn registration(&self) -> Option<&Write> {
        self.bios.first().map(|b| &b.write)
    }
}

/// Every write of one item: its creation and its bids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ItemLog {
    pub added: Option<Write>,
    pub bids: Vec<Write>,
}

/// Which write of the oracle a client request is (to record its outcome).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteRef {
    Bio {
        user: i64,
        index: usize,
    },
    Item {
        item: i64,
    },
    Bid {
        item: i64,
        index: usize,
    },
    /// A read (nothing to record but its count).
    Read,
}

/// Writes and their outcomes.
#[derive(Debug, Default)]
pub struct Oracle {
    pub users: BTreeMap<i64, UserLog>,
    pub items: BTreeMap<i64, ItemLog>,
    pub acked: u64,
    pub failed: u64,
    pub unknown: u64,
    pub reads: u64,
}

impl Oracle {
    /// The rows loaded before the run.
    pub fn initial(users: i64, items: i64) -> Oracle {
        let mut oracle = Oracle::default();
        for id in 0..users {
            let bio = BioWrite { bio: crate::app::INITIAL_BIO.to_string(), write: Write::INITIAL };
            oracle.users.insert(id, UserLog { bios: vec![bio] });
        }
        for id in 0..items {
            oracle.items.insert(id, ItemLog { added: Some(Write::INITIAL), bids: Vec::new() });
        }
        oracle
    }

    /// A client issued `op` at `now_us`: which write it is.
    pub fn issued(&mut self, op: &AppOp, now_us: u64) -> WriteRef {
        let write = Write { issued_us: now_us, done: None };
        match op {
            AppOp::RegisterUser { id, bio, .. } | AppOp::UpdateBio { id, bio } => {
                let log = self.users.entry(*id).or_default();
                log.bios.push(BioWrite { bio: bio.clone(), write });
                WriteRef::Bio { user: *id, index: log.bios.len() - 1 }
            }
            AppOp::AddItem { id, .. } => {
                self.items.entry(*id).or_default().added = Some(write);
                WriteRef::Item { item: *id }
            }
            AppOp::Bid { item } => {
                let log = self.items.entry(*item).or_default();
                log.bids.push(write);
                WriteRef::Bid { item: *item, index: log.bids.len() - 1 }
            }
            AppOp::ViewUser { .. } | AppOp::ViewItem { .. } => WriteRef::Read,
        }
    }

    /// The client of `write` was told `outcome` at `now_us`.
    pub fn done(&mut self, write: WriteRef, outcome: ClientOutcome, now_us: u64) {
        let slot = match write {
            WriteRef::Bio { user, index } => &mut self.users.get_mut(&user).expect("issued").bios[index].write,
            WriteRef::Item { item } => self.items.get_mut(&item).and_then(|i| i.added.as_mut()).expect("issued"),
            WriteRef::Bid { item, index } => &mut self.items.get_mut(&item).expect("issued").bids[index],
            WriteRef::Read => {
                self.reads += 1;
                return;
            }
        };
        assert!(slot.done.is_none(), "a client is answered once");
        slot.done = Some((now_us, outcome));
        match outcome {
            ClientOutcome::Acked => self.acked += 1,
            ClientOutcome::Failed => self.failed += 1,
            ClientOutcome::Unknown => self.unknown += 1,
        }
    }
}
