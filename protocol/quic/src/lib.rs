//! QUIC with mutual TLS for every Imago process: Raft between coordinator replicas, agents to
//! coordinators, the operator's CLI to coordinators.
//!
//! - [`certs`]: the cluster CA and one certificate per name (`imago certs init`); loading an
//!   identity checks it is the right name in the right cluster.
//! - [`endpoint`]: a server ([`endpoint::serve`] with a [`endpoint::Handler`]) and a client
//!   ([`endpoint::QuicTransport`], the production [`protocol::transport::Transport`]).
//!
//! Shell code only: frames are the codec's, requests and answers are the protocol's, and what
//! a request means is the handler's business.

pub mod certs;
pub mod endpoint;

pub use certs::{CertError, Identity};
pub use endpoint::{Handler, Peer, QuicTransport};
