//! Validation judged by the simulator: every mirrored read's two answers, as they arrived at
//! the router, are compared here, independently of the validate core's verdict. At the same
//! data position (the new universe had applied exactly what the old one had captured) the two
//! universes must give the same canonical answer; any difference is a violation, whether or not
//! the validator noticed it, unless a rogue writer changed that shard's new database behind the
//! transform (then the difference is real, and the validator and the drain must catch it).

use super::Violation;
use node_core::{RequestKey, StoreAnswer};
use protocol::Position;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Default)]
struct Pair {
    old: Option<Option<StoreAnswer>>,
    new: Option<Option<StoreAnswer>>,
    /// The new answer came from a database a rogue writer changed.
    drifted: bool,
}

/// Mirrored reads whose answers are not both in yet, by router and request key.
#[derive(Debug, Default)]
pub struct Mirrors {
    pending: BTreeMap<(usize, RequestKey), Pair>,
    /// Reads a new database changed by a rogue writer answered: their answer may arrive once
    /// that database was replaced (a deploy after the rollback), and still shows the change.
    drifted_answers: BTreeSet<RequestKey>,
    /// Conclusive comparisons seen (what a correct validator counts as samples).
    pub samples: u64,
}

impl Mirrors {
    /// A new database a rogue writer changed answered read `key`.
    pub fn answered_by_drifted(&mut self, key: RequestKey) {
        self.drifted_answers.insert(key);
    }

    /// Router `router` mirrors read `key` to the new universe.
    pub fn mirrored(&mut self, router: usize, key: RequestKey) {
        self.pending.insert((router, key), Pair::default());
    }

    /// Mirrors of `router` whose answer it does not have yet.
    pub fn pending(&self, router: usize) -> usize {
        self.pending
            .range((router, RequestKey { origin: 0, id: 0 })..)
            .take_while(|((r, _), _)| *r == router)
            .filter(|(_, p)| p.new.is_none())
            .count()
    }

    /// A router crashed: its mirrors will never be compared.
    pub fn forget_router(&mut self, router: usize) {
        self.pending.retain(|(r, _), _| *r != router);
    }

    /// A universe answered read `key` of `router` (`mirror`: the new universe's copy;
    /// `drifted`: a rogue writer has written to that shard's new database).
    pub fn answered(
        &mut self,
        router: usize,
        name: &str,
        key: RequestKey,
        mirror: bool,
        answer: Option<StoreAnswer>,
        drifted: bool,
    ) -> Option<Violation> {
        let drifted_answer = mirror && self.drifted_answers.remove(&key);
        let pair = self.pending.get_mut(&(router, key))?;
        pair.drifted |= drifted_answer;
        let drifted = drifted || pair.drifted;
        if mirror {
            pair.new = Some(answer);
        } else {
            pair.old = Some(answer);
        }
        let (Some(old), Some(new)) = (&pair.old, &pair.new) else { return None };
        let found = match (old, new) {
            (
                Some(StoreAnswer::Ok { body: old, position: p_old }),
                Some(StoreAnswer::Ok { body: new, position: p_new }),
            ) => {
                if *p_new >= *p_old && (old == new || p_new == p_old) {
                    self.samples += 1;
                }
                (p_old == p_new && old != new && !drifted).then(|| Violation::MirrorMismatch {
                    router: name.to_string(),
                    request: key.id,
                    position: Position(p_old.0),
                    old: format!("{old:?}"),
                    new: format!("{new:?}"),
                })
            }
            _ => None,
        };
        self.pending.remove(&(router, key));
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::schema::{Row, Value};

    fn ok(v: i64, position: u64) -> Option<StoreAnswer> {
        let body: Row = [("v".to_string(), Value::Int(v))].into_iter().collect();
        Some(StoreAnswer::Ok { body: Some(body), position: Position(position) })
    }

    #[test]
    fn different_answers_at_one_position_are_a_mismatch_whatever_the_order() {
        let mut m = Mirrors::default();
        let key = |id| RequestKey { origin: 1, id };
        m.mirrored(0, key(1));
        assert_eq!(m.answered(0, "r", key(1), true, ok(2, 5), false), None);
        assert!(matches!(m.answered(0, "r", key(1), false, ok(1, 5), false), Some(Violation::MirrorMismatch { .. })));
        m.mirrored(0, key(2));
        assert_eq!(m.answered(0, "r", key(2), false, ok(1, 5), false), None);
        assert_eq!(m.answered(0, "r", key(2), true, ok(2, 6), false), None, "the new universe is ahead: inconclusive");
        assert_eq!(m.answered(0, "r", key(3), false, ok(1, 5), false), None, "not mirrored");
        m.mirrored(0, key(4));
        assert_eq!(m.answered(0, "r", key(4), false, ok(1, 5), true), None);
        assert_eq!(
            m.answered(0, "r", key(4), true, ok(2, 5), true),
            None,
            "a rogue writer's change: a real difference"
        );
        assert_eq!(m.samples, 2);
        assert!(m.pending.is_empty());
    }
}
