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
use protocol::{Decision, Generation, Position};
use serde::{Deserialize, Serialize};

/// What a node keeps on its own disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The last decision persisted (and so the last one the node may have acted on).
    pub decision: Decision,
    /// The generation the upgrade of `decision` upgrades from, written in the same durable
    /// write: what the node serves is absolute, `decision.serving_generation(generation)`,
    /// never "old" or "new" of whichever upgrade runs when it restarts.
    pub generation: Generation,
    /// How many times the node has started: request ids carry it, so that an id is never
    /// reused across restarts (data nodes answer a repeated id with the first answer).
    pub boots: u64,
    /// Names this disk's life: the shell draws it at random when it formats an empty disk. A
    /// node whose disk was lost or replaced starts counting boots again, so request keys carry
    /// this too.
    pub disk_id: u64,
    /// Whose record this is ([`NodeRecord::owner_of`] the node's name). A node trusts only a
    /// record it wrote itself: a disk copied from another node is as good as an empty one.
    pub owner: u64,
    /// The decision on this disk was read from the coordinator by this node (its first
    /// linearizable read on this disk is done). Until then the disk says nothing: a new or
    /// replaced disk holds `Initial` whatever the cluster decided meanwhile.
    pub confirmed: bool,
    /// Where the generation `decision` serves answers (a router's; empty for a data node, or
    /// while frozen), written in the same durable write as the decision: a router restarted
    /// on its own disk serves there at once, and a stale mapping can never point it at a
    /// universe still being loaded.
    pub endpoints: Vec<String>,
}

impl NodeRecord {
    /// The owner mark of node `name`'s records.
    pub fn owner_of(name: &str) -> u64 {
        let mut h = duties::validate::Fnv::default();
        h.bytes(b"imago node record\xff");
        h.bytes(name.as_bytes());
        h.0
    }
}

/// A core's view of its node's record: what it last asked to persist, and whether the boot
/// record (with the new boot count) is durable yet. Both composition cores keep one.
#[derive(Clone, Debug, Default)]
pub(crate) struct Durable {
    record: NodeRecord,
    started: bool,
    /// The disk held state of this node's own, confirmed by a read from the coordinator.
    trusted: bool,
}

impl Durable {
    /// Booting from the record found on disk: the same record with one more boot, to persist
    /// before anything else. A record of another node's (a copied disk) counts as none: the
    /// node starts afresh on it, and does not serve from it.
    pub(crate) fn boot(&mut self, found: NodeRecord, owner: u64) -> NodeRecord {
        assert!(!self.started, "booted twice");
        let own = found.owner == owner;
        self.trusted = own && found.confirmed;
        let found = if own || found.boots == 0 {
            found
        } else {
            NodeRecord { disk_id: found.disk_id, ..NodeRecord::default() }
        };
        self.record = NodeRecord { boots: found.boots + 1, owner, ..found };
        self.record.clone()
    }

    /// A decision to persist (read from the coordinator): the record to write.
    pub(crate) fn decide(&mut self, decision: Decision, base: Generation, endpoints: Vec<String>) -> NodeRecord {
        self.record.decision = decision;
        self.record.generation = base;
        self.record.confirmed = true;
        self.record.endpoints = endpoints;
        self.record.clone()
    }

    /// `record` is durable: what the agent is told (its boot, or the persisted decision).
    pub(crate) fn persisted(&mut self, record: NodeRecord) -> agent::AgentInput {
        assert_eq!(record.boots, self.record.boots, "persisted a record that was not asked for");
        if self.started {
            return agent::AgentInput::Persisted(record.decision);
        }
        assert_eq!(record, self.record, "persisted a record that was not asked for");
        self.started = true;
        agent::AgentInput::Boot { persisted: record.decision, base: record.generation, trusted: self.trusted }
    }

    /// The disk booted from held this node's own state (known once [`Durable::boot`] ran).
    pub(crate) fn trusted(&self) -> bool {
        self.trusted
    }

    pub(crate) fn started(&self) -> bool {
        self.started
    }

    pub(crate) fn boots(&self) -> u64 {
        self.record.boots
    }

    /// What this node's disk holds, for a recovering coordinator group: `None` unless a
    /// coordinator confirmed it (a new, copied or unconfirmed disk vouches for nothing).
    pub(crate) fn summary(&self) -> Option<protocol::messages::DiskSummary> {
        self.record.confirmed.then(|| protocol::messages::DiskSummary {
            decision: self.record.decision,
            generation: self.record.generation,
            endpoints: self.record.endpoints.clone(),
        })
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
    /// Not run: the node's fences (or the generations it holds) kept it out this time. Not a
    /// final outcome: a copy of the same request may still run if one reaches the node after
    /// it reopens (the refusal lives only in the node's memory, lost at a restart), so a client
    /// is told the outcome is unknown, never that the request failed. (Hunt `--upgrades 3`,
    /// seeds 34002054, 34011019, 34012377: a write refused by a fence was told failed, and a
    /// copy delivered late, after the node restarted and unfenced, ran.)
    NotAdmitted {
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_counts_one_more_and_starts_once_its_record_is_durable() {
        let mut d = Durable::default();
        let owner = NodeRecord::owner_of("router-1");
        let found = NodeRecord {
            decision: Decision::Freeze(protocol::Epoch(2)),
            boots: 3,
            disk_id: 9,
            owner,
            confirmed: true,
            ..NodeRecord::default()
        };
        let booted = d.boot(found.clone(), owner);
        assert_eq!(booted, NodeRecord { boots: 4, ..found.clone() });
        assert!(!d.started(), "not before the boot record is durable");
        assert_eq!(
            d.persisted(booted),
            agent::AgentInput::Boot { persisted: found.decision, base: Generation::GENESIS, trusted: true }
        );
        assert!(d.started());
        assert_eq!(d.boots(), 4);
        let next = d.decide(Decision::Commit(protocol::Epoch(2)), Generation::GENESIS, Vec::new());
        assert_eq!(d.persisted(next), agent::AgentInput::Persisted(Decision::Commit(protocol::Epoch(2))));
    }

    #[test]
    fn only_a_disk_this_node_booted_from_before_is_trusted() {
        let owner = NodeRecord::owner_of("router-1");
        assert_ne!(owner, NodeRecord::owner_of("router-2"));
        let boot = |found: NodeRecord| {
            let mut d = Durable::default();
            let booted = d.boot(found, owner);
            (booted.clone(), d.persisted(booted))
        };
        // A fresh disk (new, or lost and replaced): nothing to serve from.
        let fresh = NodeRecord { disk_id: 5, ..NodeRecord::default() };
        // What a node starts with on a disk it cannot trust: one boot, nothing decided.
        let afresh = NodeRecord { boots: 1, disk_id: 5, owner, ..NodeRecord::default() };
        let untrusted =
            agent::AgentInput::Boot { persisted: Decision::Initial, base: Generation::GENESIS, trusted: false };
        let (booted, input) = boot(fresh.clone());
        assert_eq!((booted, input), (afresh.clone(), untrusted.clone()));
        // Its own disk, booted before but never confirmed by a read (the coordinator was out of
        // reach): it says nothing yet.
        let unread = NodeRecord { boots: 1, owner, ..fresh.clone() };
        assert_eq!(boot(unread).1, untrusted);
        // Its own disk, confirmed: trusted, whatever the decision.
        let own = NodeRecord {
            decision: Decision::Commit(protocol::Epoch(3)),
            boots: 1,
            disk_id: 5,
            owner,
            confirmed: true,
            ..NodeRecord::default()
        };
        assert_eq!(
            boot(own.clone()).1,
            agent::AgentInput::Boot { persisted: own.decision, base: Generation::GENESIS, trusted: true }
        );
        // Another node's disk: started afresh, its decision forgotten, its boots not counted.
        let copied = NodeRecord { owner: NodeRecord::owner_of("router-2"), ..own };
        let (booted, input) = boot(copied);
        assert_eq!((booted, input), (afresh, untrusted.clone()));
        // A decision persisted after a read confirms the disk.
        let mut d = Durable::default();
        let booted = d.boot(fresh.clone(), owner);
        d.persisted(booted);
        assert!(d.decide(Decision::Initial, Generation::GENESIS, Vec::new()).confirmed);
    }
}
