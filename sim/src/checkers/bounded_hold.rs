//! Bounded hold: every held request is released or failed within `hold_ms_max` (the cores
//! report their deadlines, so there is no tick of slack).

use super::Violation;

#[derive(Debug)]
pub struct BoundedHold {
    pub bound_ms: u64,
    /// The longest hold seen.
    pub held_max_ms: u64,
}

impl BoundedHold {
    pub fn new(bound_ms: u64) -> Self {
        BoundedHold { bound_ms, held_max_ms: 0 }
    }

    /// A held request was released (forwarded or failed) after `held_ms`.
    pub fn released(&mut self, router: &str, held_ms: u64) -> Option<Violation> {
        self.held_max_ms = self.held_max_ms.max(held_ms);
        (held_ms > self.bound_ms).then(|| Violation::HoldTooLong {
            router: router.to_string(),
            held_ms,
            bound_ms: self.bound_ms,
            released: true,
        })
    }

    /// Checked by scan: the oldest request a router still holds.
    pub fn holding(&mut self, router: &str, oldest_since_ms: u64, now_ms: u64) -> Option<Violation> {
        let held_ms = now_ms.saturating_sub(oldest_since_ms);
        (held_ms > self.bound_ms).then(|| Violation::HoldTooLong {
            router: router.to_string(),
            held_ms,
            bound_ms: self.bound_ms,
            released: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_beyond_the_bound_are_violations() {
        let mut c = BoundedHold::new(1_000);
        assert_eq!(c.released("r1", 1_000), None);
        assert_eq!(c.holding("r1", 0, 1_000), None);
        assert!(matches!(c.released("r1", 1_001), Some(Violation::HoldTooLong { released: true, .. })));
        assert!(matches!(c.holding("r1", 0, 1_001), Some(Violation::HoldTooLong { released: false, .. })));
        assert_eq!(c.held_max_ms, 1_001);
    }
}
