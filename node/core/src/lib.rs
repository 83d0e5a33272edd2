//! Pure node cores: every decision an Imago tier node makes, without I/O, clock or randomness.
//!
//! - [`ingress`]: the ingress composition core (agent + router + validate).
//! - [`data_node`]: the data-node composition core (agent + capture + transform + validate +
//!   drain).
//! - [`duties`]: the duty cores the composition cores are made of.
//! - [`agent`]: register, report, watch decisions, persist the last decision before acting.
//! - [`store`]: the data-store interface ([`store::OldStore`], [`store::NewStore`]) and
//!   [`store::MemStore`], the in-memory store that implements it with real databases' limits.
//!
//! Every core is driven the same way: `handle(now_ms, input) -> outputs`, with `now_ms` never
//! decreasing, outputs applied in order, and the shell calling again by `next_deadline_ms()`.

pub mod agent;
pub mod data_node;
pub mod duties;
pub mod ingress;
pub mod store;

use protocol::schema::Row;
use protocol::{Decision, Position};
use serde::{Deserialize, Serialize};

/// What a node keeps on its own disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeRecord {
    /// The last decision persisted (and so the last one the node may have acted on).
    pub decision: Decision,
    /// How many times the node has started: request ids carry it, so that an id is never
    /// reused across restarts (data nodes answer a repeated id with the first answer).
    pub boots: u64,
    /// Names this disk's life: the shell draws it at random when it formats an empty disk. A
    /// node whose disk was lost or replaced starts counting boots again, so request keys carry
    /// this too.
    pub disk_id: u64,
}

/// A core's view of its node's record: what it last asked to persist, and whether the boot
/// record (with the new boot count) is durable yet. Both composition cores keep one.
#[derive(Clone, Debug, Default)]
pub(crate) struct Durable {
    record: NodeRecord,
    started: bool,
}

impl Durable {
    /// Booting from the record found on disk: the same record with one more boot, to persist
    /// before anything else.
    pub(crate) fn boot(&mut self, found: NodeRecord) -> NodeRecord {
        assert!(!self.started, "booted twice");
        self.record = NodeRecord { boots: found.boots + 1, ..found };
        self.record
    }

    /// A decision to persist: the record to write.
    pub(crate) fn decide(&mut self, decision: Decision) -> NodeRecord {
        self.record.decision = decision;
        self.record
    }

    /// `record` is durable: what the agent is told (its boot, or the persisted decision).
    pub(crate) fn persisted(&mut self, record: NodeRecord) -> agent::AgentInput {
        assert_eq!(record.boots, self.record.boots, "persisted a record that was not asked for");
        if self.started {
            return agent::AgentInput::Persisted(record.decision);
        }
        assert_eq!(record, self.record, "persisted a record that was not asked for");
        self.started = true;
        agent::AgentInput::Boot { persisted: record.decision }
    }

    pub(crate) fn started(&self) -> bool {
        self.started
    }

    pub(crate) fn boots(&self) -> u64 {
        self.record.boots
    }
}

/// A client request's idempotency key at the data tier: the ingress node it came through (a
/// hash of its name) and its id there (which carries the node's boot count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestKey {
    pub origin: u64,
    pub id: u64,
}

/// A universe's answer to one client request, as a data node gives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreAnswer {
    /// Done; the body (reads) and the data position the universe had reached (old: last
    /// captured; new: last applied).
    Ok {
        body: Option<Row>,
        position: Position,
    },
    Rejected {
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_counts_one_more_and_starts_once_its_record_is_durable() {
        let mut d = Durable::default();
        let found = NodeRecord { decision: Decision::Freeze(protocol::Epoch(2)), boots: 3, disk_id: 9 };
        let booted = d.boot(found);
        assert_eq!(booted, NodeRecord { boots: 4, ..found });
        assert!(!d.started(), "not before the boot record is durable");
        assert_eq!(d.persisted(booted), agent::AgentInput::Boot { persisted: found.decision });
        assert!(d.started());
        assert_eq!(d.boots(), 4);
        let next = d.decide(Decision::Commit(protocol::Epoch(2)));
        assert_eq!(d.persisted(next), agent::AgentInput::Persisted(Decision::Commit(protocol::Epoch(2))));
    }
}
