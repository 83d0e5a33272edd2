//! Capture: the old universe's ordered change stream.
//!
//! Every row change committed in the old store is appended here in the same step (as a trigger
//! writes a change table), with the next position. Positions are contiguous from 1; a fenced
//! stream accepts nothing, and its last position is the final position `P` of the freeze.
//! Changes already applied to the new universe are pruned ([`ChangeLog::prune`]), so the log
//! stays bounded while the transform keeps up.

use protocol::schema::RowOp;
use protocol::Position;

/// Why a change was not captured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    #[error("the old store is fenced at position {0}")]
    Fenced(u64),
    /// The new store takes writes only from the transform until the switch commits.
    #[error("the new store is not open to clients (the switch has not committed)")]
    Guarded,
}

/// An ordered, append-only change stream with positions.
#[derive(Clone, Debug, Default)]
pub struct ChangeLog {
    /// Changes after position `pruned`, in order.
    changes: std::collections::VecDeque<RowOp>,
    /// Every change up to here is pruned.
    pruned: u64,
    fenced: bool,
}

impl ChangeLog {
    /// Appends a change; returns its position.
    pub fn append(&mut self, op: RowOp) -> Result<Position, CaptureError> {
        if self.fenced {
            return Err(CaptureError::Fenced(self.last().0));
        }
        self.changes.push_back(op);
        Ok(self.last())
    }

    /// Position of the last change (0 when empty).
    pub fn last(&self) -> Position {
        Position(self.pruned + self.changes.len() as u64)
    }

    /// Up to `limit` changes after `after`, with their positions. Pruned changes cannot be
    /// read again: asking for them is a bug of the reader (asserted).
    pub fn after(&self, after: Position, limit: usize) -> Vec<(Position, RowOp)> {
        assert!(
            after.0 >= self.pruned,
            "changes after {} were asked for, but up to {} are pruned",
            after.0,
            self.pruned
        );
        let start = ((after.0 - self.pruned) as usize).min(self.changes.len());
        let end = start.saturating_add(limit).min(self.changes.len());
        (start..end).map(|i| (Position(self.pruned + i as u64 + 1), self.changes[i].clone())).collect()
    }

    /// Forgets the changes up to `up_to` (they are applied and will not be read again).
    pub fn prune(&mut self, up_to: Position) {
        let up_to = up_to.0.min(self.last().0);
        while self.pruned < up_to {
            self.changes.pop_front();
            self.pruned += 1;
        }
    }

    /// Changes kept (not yet pruned).
    pub fn kept(&self) -> usize {
        self.changes.len()
    }

    /// Stops accepting changes; returns the final position.
    pub fn fence(&mut self) -> Position {
        self.fenced = true;
        self.last()
    }

    /// Accepts changes again (after an abort).
    pub fn unfence(&mut self) {
        self.fenced = false;
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: i64) -> RowOp {
        RowOp::Delete { table: "t".into(), key }
    }

    #[test]
    fn positions_are_contiguous_and_fencing_stops_appends() {
        let mut log = ChangeLog::default();
        assert_eq!(log.append(op(1)), Ok(Position(1)));
        assert_eq!(log.append(op(2)), Ok(Position(2)));
        let tail = log.after(Position(1), 10);
        assert_eq!(tail, vec![(Position(2), op(2))]);
        assert_eq!(log.fence(), Position(2));
        assert_eq!(log.append(op(3)), Err(CaptureError::Fenced(2)));
        log.unfence();
        assert_eq!(log.append(op(3)), Ok(Position(3)));
        assert!(log.after(Position(99), 10).is_empty());
        log.prune(Position(2));
        assert_eq!(log.kept(), 1);
        assert_eq!(log.last(), Position(3));
        assert_eq!(log.after(Position(2), 10), vec![(Position(3), op(3))]);
    }
}
