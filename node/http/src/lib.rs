//! A node's real I/O under the node runtime's actors: the HTTP/1.1 ingress proxy ([`proxy`]) and
//! the node's durable record ([`disk`]). Shell code: what a request means, where it goes and
//! what the client is told are the ingress core's decisions.

pub mod disk;
pub mod metrics;
pub mod proxy;
