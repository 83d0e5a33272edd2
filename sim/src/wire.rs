//! The simulated service's data-plane messages (router → data node), sent through the real
//! codec like everything else.

use crate::app::AppOp;
use node_core::{RequestKey, StoreAnswer};
use protocol::Generation;
use serde::{Deserialize, Serialize};

/// A client request forwarded (or mirrored) to one universe at a data node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRequest {
    /// The idempotency key: the data node answers a duplicate with the first answer.
    pub key: RequestKey,
    /// The generation the router sends it to.
    pub generation: Generation,
    pub mirror: bool,
    pub op: AppOp,
}

/// A data node's answer.
pub type DataResponse = StoreAnswer;

/// What an ingress node sends a data node: a request, or its notice that it is frozen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataMessage {
    Request(DataRequest),
    /// `router` is frozen for `epoch` (no answer is sent).
    Frozen {
        router: protocol::NodeName,
        epoch: protocol::Epoch,
    },
}
