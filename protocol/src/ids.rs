//! Identifiers and small value types.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Name of a tier node as written in the plan (e.g. `router-1`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeName(pub String);

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeName {
    fn from(s: &str) -> Self {
        NodeName(s.to_string())
    }
}

/// Raft id of a coordinator replica.
pub type ReplicaId = u64;

/// Identifier of one upgrade; grows with every upgrade started on a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UpgradeId(pub u64);

/// Switch attempt number. Epochs only grow; epoch 0 means "never frozen".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// A universe generation: the cluster starts serving generation 1 ([`Generation::GENESIS`]), and
/// each switched upgrade makes its new universe the next generation, which the following upgrade
/// upgrades from. Generations are absolute: what a router serves and persists is a generation,
/// never "old" or "new" (those are relative to one upgrade).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation a cluster serves before its first upgrade.
    pub const GENESIS: Generation = Generation(1);

    /// The generation an upgrade from this one produces.
    pub fn next(self) -> Generation {
        Generation(self.0 + 1)
    }
}

impl Default for Generation {
    fn default() -> Self {
        Generation::GENESIS
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// Position in a captured change stream (1-based; 0 means "nothing").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position(pub u64);

/// Which universe serves or receives a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Universe {
    Old,
    New,
}

/// What a tier node does during an upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Duty {
    /// Record what the old universe does (requests at the ingress, row changes at the store).
    Capture,
    /// Convert captured data to the new schema and apply it to the new universe.
    Transform,
    /// Compare the new universe with the old one.
    Validate,
    /// The ingress router: sends client traffic to the active universe.
    Route,
}

impl Duty {
    /// Parses the plan spelling (`capture`, `transform`, `validate`, `route`).
    pub fn parse(s: &str) -> Option<Duty> {
        match s {
            "capture" => Some(Duty::Capture),
            "transform" => Some(Duty::Transform),
            "validate" => Some(Duty::Validate),
            "route" => Some(Duty::Route),
            _ => None,
        }
    }
}

/// A committed switch decision as a node acts on it.
///
/// Decisions are totally ordered by [`Decision::order_key`]; a node never acts on a decision
/// ordered before the one it already acted on (epochs never go backwards).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Decision {
    /// No switch attempt was ever frozen: serve the old universe.
    #[default]
    Initial,
    /// `Freeze{e}` committed: stop admitting to the old universe, hold, drain, ack.
    Freeze(Epoch),
    /// `Commit{e}` committed: serve the new universe.
    Commit(Epoch),
    /// `Abort{e}` committed: release to the old universe.
    Abort(Epoch),
    /// The router was taken off the roster (a committed `Retire`): it serves nothing, ever.
    /// Ordered after every other decision, so nothing undoes it.
    Retired,
}

impl Decision {
    /// Total order of decisions: by epoch, then Freeze before its outcome.
    pub fn order_key(&self) -> (u64, u8) {
        match *self {
            Decision::Initial => (0, 0),
            Decision::Freeze(e) => (e.0, 1),
            Decision::Commit(e) | Decision::Abort(e) => (e.0, 2),
            Decision::Retired => (u64::MAX, 3),
        }
    }

    /// Epoch this decision belongs to (none, `Epoch(0)`, for `Initial` and `Retired`).
    pub fn epoch(&self) -> Epoch {
        match *self {
            Decision::Initial | Decision::Retired => Epoch(0),
            Decision::Freeze(e) | Decision::Commit(e) | Decision::Abort(e) => e,
        }
    }

    /// The generation that may receive client traffic under this decision, for a decision of
    /// an upgrade from generation `base` (`None` while frozen or retired).
    pub fn serving_generation(&self, base: Generation) -> Option<Generation> {
        self.serving().map(|u| match u {
            Universe::Old => base,
            Universe::New => base.next(),
        })
    }

    /// The universe that may receive client traffic under this decision (`None` while frozen).
    pub fn serving(&self) -> Option<Universe> {
        match self {
            Decision::Initial | Decision::Abort(_) => Some(Universe::Old),
            Decision::Commit(_) => Some(Universe::New),
            Decision::Freeze(_) | Decision::Retired => None,
        }
    }
}
