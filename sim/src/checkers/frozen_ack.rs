//! Quiet before `Frozen`: a router acks `Frozen(e)` only when nothing it forwarded to the old
//! universe is still in flight. Checked where the ack leaves the router, against the requests
//! the simulator itself saw leave the router and come back (or time out), so the old store's
//! fence cannot mask a router that acks too early.

use super::Violation;
use protocol::Epoch;
use std::collections::{BTreeMap, BTreeSet};

/// Requests in flight to the old universe, per router (of its running incarnation).
#[derive(Debug, Default)]
pub struct FrozenAck {
    in_flight: BTreeMap<usize, BTreeSet<u64>>,
}

impl FrozenAck {
    pub fn forwarded(&mut self, router: usize, request: u64) {
        self.in_flight.entry(router).or_default().insert(request);
    }

    /// The router has the answer (or gave up waiting for it).
    pub fn completed(&mut self, router: usize, request: u64) {
        if let Some(set) = self.in_flight.get_mut(&router) {
            set.remove(&request);
        }
    }

    /// The router crashed: nothing of its is in flight any more (to its new incarnation).
    pub fn crashed(&mut self, router: usize) {
        self.in_flight.remove(&router);
    }

    /// Requests of `router` in flight (to any generation: the one a freeze stops may be the
    /// last switch's new one).
    pub fn in_flight(&self, router: usize) -> usize {
        self.in_flight.get(&router).map_or(0, BTreeSet::len)
    }

    /// The router sends `Frozen(epoch)`.
    pub fn acked(&self, router: usize, name: &str, epoch: Epoch) -> Option<Violation> {
        let in_flight = self.in_flight.get(&router).map_or(0, BTreeSet::len);
        (in_flight > 0).then(|| Violation::FrozenWithInFlight { router: name.to_string(), epoch, in_flight })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_with_a_request_in_flight_is_a_violation() {
        let mut f = FrozenAck::default();
        f.forwarded(0, 7);
        f.forwarded(1, 8);
        assert!(matches!(f.acked(0, "r0", Epoch(1)), Some(Violation::FrozenWithInFlight { in_flight: 1, .. })));
        f.completed(0, 7);
        assert_eq!(f.acked(0, "r0", Epoch(1)), None);
        f.crashed(1);
        assert_eq!(f.acked(1, "r1", Epoch(1)), None);
    }
}
