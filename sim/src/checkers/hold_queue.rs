//! Bounded hold queue: a router never holds more than `hold_queue_max` requests; beyond it,
//! it answers 503 at once. Judged from what the simulator sees: requests a router has received
//! (they arrived before now, and a router never blocks on I/O, so it has taken them) and has
//! neither forwarded nor answered.

use super::Violation;

pub fn check(router: &str, held: usize, limit: usize) -> Option<Violation> {
    (held > limit).then(|| Violation::HoldQueueOverflow { router: router.to_string(), held, limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_held_than_the_limit_is_a_violation() {
        assert_eq!(check("r", 5, 5), None);
        assert!(matches!(check("r", 6, 5), Some(Violation::HoldQueueOverflow { held: 6, .. })));
    }
}
