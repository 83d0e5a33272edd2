//! A node's real I/O under the node runtime's actors: the HTTP/1.1 ingress proxy ([`proxy`]),
//! the node's durable record ([`disk`]), and a data node's stores on real databases
//! ([`stores`]). Shell code: what a request means, where it goes and
//! what the client is told are the ingress core's decisions.

pub mod disk;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod stores;
