//! Capture: the old universe's ordered change stream.
//!
//! Every row change committed in the old store is appended here in the same step (as a trigger
//! writes a change table), with the next position. Positions are contiguous from 1; a fenced
//! stream accepts nothing, and its last position is the final position `P` of the freeze.

use protocol::schema::RowOp;
use protocol::Position;

/// Why a change was not captured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    #[error("the old store is fenced at position {0}")]
    Fenced(u64),
}

/// An ordered, append-only change stream with positions.
#[derive(Clone, Debug, Default)]
pub struct ChangeLog {
    changes: Vec<RowOp>,
    fenced: bool,
}

impl ChangeLog {
    /// Appends a change; returns its position.
    pub fn append(&mut self, op: RowOp) -> Result<Position, CaptureError> {
        if self.fenced {
            return Err(CaptureError::Fenced(self.last().0));
        }
        self.changes.push(op);
        Ok(self.last())
    }

    /// Position of the last change (0 when empty).
    pub fn last(&self) -> Position {
        Position(self.changes.len() as u64)
    }

    /// Up to `limit` changes after `after`, with their positions.
    pub fn after(&self, after: Position, limit: usize) -> Vec<(Position, RowOp)> {
        let start = (after.0 as usize).min(self.changes.len());
        let end = start.saturating_add(limit).min(self.changes.len());
        (start..end).map(|i| (Position(i as u64 + 1), self.changes[i].clone())).collect()
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
    }
}
