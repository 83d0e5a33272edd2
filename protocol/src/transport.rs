//! The request/response transport between Imago processes: QUIC in production, the
//! simulator's in-memory network under test. Implementations encode with [`crate::codec`] and
//! give up after the timeout they are handed.

use crate::messages::{Request, Response};
use crate::ReplicaId;
use std::future::Future;
use std::time::Duration;

/// Why a call over the transport failed. A timed-out call may still have been carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The peer refused this caller (its certificate, its name, or the roster): retrying the
    /// same call will not help.
    #[error("refused: {0}")]
    Refused(String),
    #[error("codec: {0}")]
    Codec(String),
}

/// Request/response calls to coordinator replicas. The call is made when `call` is invoked
/// (the returned future only waits for the answer), so a caller's I/O happens in order.
pub trait Transport: Clone + Send + Sync + 'static {
    fn call(
        &self,
        to: ReplicaId,
        request: Request,
        timeout: Duration,
    ) -> impl Future<Output = Result<Response, TransportError>> + Send + 'static;

    /// Replica `id` is where the group's membership says (`name@ip:port`, as a replica is added
    /// with): a transport that dials by address remembers it. The default ignores it (the
    /// simulator knows every address).
    fn learn_peer(&self, _id: ReplicaId, _address: &str) {}
}
