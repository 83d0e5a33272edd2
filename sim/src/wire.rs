//! The simulated service's data-plane messages (router → data node), sent through the real
//! codec like everything else.

use crate::app::AppOp;
use protocol::schema::Row;
use protocol::{Position, Universe};
use serde::{Deserialize, Serialize};

/// A client request forwarded (or mirrored) to one universe at a data node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRequest {
    /// Unique per router and request: the data node answers a duplicate with the first answer.
    pub request: u64,
    pub universe: Universe,
    pub mirror: bool,
    pub op: AppOp,
}

/// A data node's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataResponse {
    /// Done; the body (reads) and the position the store had reached.
    Ok {
        body: Option<Row>,
        position: Position,
    },
    Rejected {
        reason: String,
    },
}
