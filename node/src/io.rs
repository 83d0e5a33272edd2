//! The small I/O traits the actors are generic over. Implementations do I/O and nothing else:
//! no retries, no timeouts of their own beyond the one they are handed, no decisions.
//!
//! - [`protocol::transport::Transport`]: calls to coordinator replicas.
//! - [`NodeDisk`]: the node's own durable record.
//! - [`Ingress`]: an ingress node's clients (answers) and its forwarding to each universe.
//! - [`Stores`]: a data node's stores (the data-store interface) and the requests it serves.
//! - [`Clock`]: milliseconds on a monotonic clock.

use node_core::data_node::{DataEvent, DataNodeCore, StoreOp, StoreResult};
use node_core::ingress::{ClientReply, IngressCore, IngressEvent};
use node_core::{NodeRecord, RequestKey, StoreAnswer};
use protocol::{Generation, Universe};
use std::future::Future;

/// Milliseconds since an arbitrary start, never decreasing.
pub trait Clock: Unpin + 'static {
    fn now_ms(&self) -> u64;
}

impl<F: Fn() -> u64 + Unpin + 'static> Clock for F {
    fn now_ms(&self) -> u64 {
        self()
    }
}

/// Why a write to the node's disk failed. The actor stops: a node that cannot persist a
/// decision must not act on it, nor go on as if it had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node disk: {0}")]
pub struct DiskError(pub String);

/// The node's own disk: one small record, written durably.
pub trait NodeDisk: Unpin + 'static {
    /// Resolves once `record` is durable (written and synced).
    fn persist(&self, record: NodeRecord) -> impl Future<Output = Result<(), DiskError>> + 'static;
}

/// Why a request goes to a universe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// To answer the client; the answer's body is compared only if `compared` (a mirror goes
    /// along).
    Serve { compared: bool },
    /// A copy for validation, compared with the served answer.
    Mirror,
}

impl Purpose {
    pub fn is_mirror(self) -> bool {
        self == Purpose::Mirror
    }

    /// Whether the core compares the answer: the shell must then give its body.
    pub fn compared(self) -> bool {
        matches!(self, Purpose::Mirror | Purpose::Serve { compared: true })
    }
}

/// An ingress node's side toward clients and universes.
pub trait Ingress: Unpin + 'static {
    /// One client request: its payload and how to answer it.
    type Request: 'static;
    /// What a send resolves to (see [`Ingress::taken`]).
    type Sent: Send + 'static;
    /// Sends `request` to `generation`'s universe at `endpoint` (the core chose it), keyed by
    /// `key`, for `purpose`. The future runs as a task of its own, outside the actor.
    fn forward(
        &self,
        request: &Self::Request,
        generation: Generation,
        endpoint: &str,
        key: RequestKey,
        purpose: Purpose,
    ) -> impl Future<Output = Self::Sent> + 'static;
    /// The answer of a send, as the actor takes it to feed the core: `None` when none came in
    /// time. Called on the actor, just before the core learns it (the simulator's checkers
    /// note it here, so their counts and the core's agree between any two inputs).
    fn taken(&self, sent: Self::Sent) -> Option<StoreAnswer>;
    /// Answers the client.
    fn reply(&self, request: Self::Request, reply: ClientReply);
    /// Tells every data node that this router is frozen for `epoch` (best effort, no answer).
    fn notify_frozen(&self, epoch: protocol::Epoch);
    /// Metrics and checkers.
    fn event(&self, event: IngressEvent);
    /// Called after every input (handled at `now_ms`) with the core's state (metrics; the
    /// simulator's observers).
    fn observe(&self, _now_ms: u64, _core: &IngressCore) {}
}

/// A data node's side toward its stores and the requests it serves.
pub trait Stores: Unpin + 'static {
    /// One request forwarded by an ingress node: its payload and how to answer it.
    type Request: 'static;
    /// Runs `request` on `universe`'s store. A write runs in one transaction with its entry
    /// in the store's request log under `key` (see `MemStore::write_request`); a write whose
    /// key the log already holds is answered from the log, not run again.
    fn execute(
        &self,
        key: RequestKey,
        request: &Self::Request,
        universe: Universe,
    ) -> impl Future<Output = StoreAnswer> + 'static;
    /// Answers the request.
    fn reply(&self, request: Self::Request, answer: StoreAnswer);
    /// Performs one operation of the data-store interface.
    fn store(&self, op: StoreOp) -> impl Future<Output = StoreResult> + 'static;
    /// Metrics and checkers.
    fn event(&self, event: DataEvent);
    /// Called after every input (handled at `now_ms`) with the core's state (metrics; the
    /// simulator's observers).
    fn observe(&self, _now_ms: u64, _core: &DataNodeCore) {}
}
