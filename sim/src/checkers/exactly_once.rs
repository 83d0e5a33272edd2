//! Exactly once: when the new universe serves, every change captured in the old one was
//! applied, up to the last position (the transform skips what it has, and a gap is an error).
//! (That no change is applied twice or out of place is the fidelity checker's business.)

use super::Violation;
use protocol::Position;

pub fn check(node: &str, captured: Position, applied: Position) -> Option<Violation> {
    (captured != applied).then(|| Violation::NotExactlyOnce { node: node.to_string(), captured, applied })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_but_not_applied_is_a_violation() {
        assert_eq!(check("db", Position(5), Position(5)), None);
        assert!(matches!(check("db", Position(5), Position(4)), Some(Violation::NotExactlyOnce { .. })));
    }
}
