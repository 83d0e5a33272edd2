//! Drain: the data node's part of a freeze.
//!
//! Once every router is frozen for epoch `e`, fence the old store (it takes no more client
//! requests), read the final capture position `P`, wait until transform has applied up to `P`,
//! compare checksums of both universes, and ack `Drained{P}`. An abort unfences; a commit
//! opens the new store to client writes.

use protocol::messages::Ack;
use protocol::{Decision, Epoch, Position, Universe};

/// Inputs to the drain core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrainInput {
    /// A committed decision, and whether every router is frozen for it.
    Decision { decision: Decision, all_routers_frozen: bool },
    /// The old store was fenced at this final position, for the freeze of `epoch` (a fence
    /// asked for an earlier freeze, since aborted, does not count).
    Fenced { epoch: Epoch, final_position: Position },
    /// Transform progress.
    Applied { position: Position },
    /// The result of comparing both universes at the final position of `epoch`'s freeze.
    Checksums { epoch: Epoch, matched: bool },
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrainOutput {
    /// Fence the old store for the freeze of this epoch and report [`DrainInput::Fenced`].
    Fence(Epoch),
    Unfence,
    /// The switch committed: open the new store to client writes (its guard goes).
    OpenNew,
    /// The switch committed: the old store's capture goes (its fence stays).
    RemoveCapture,
    /// Compare both universes at `final_position` and report [`DrainInput::Checksums`] for
    /// this epoch.
    CompareChecksums {
        epoch: Epoch,
        final_position: Position,
    },
    Ack {
        epoch: Epoch,
        ack: Ack,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Restarted with the old store fenced: take nothing until a decision says what to do.
    Recovering,
    Open,
    Fencing(Epoch),
    Draining {
        epoch: Epoch,
        final_position: Position,
    },
    Comparing {
        epoch: Epoch,
        final_position: Position,
    },
    Drained(Epoch),
    Committed,
}

/// The drain core.
#[derive(Clone, Debug)]
pub struct DrainCore {
    state: State,
    applied: Position,
}

impl DrainCore {
    /// A drain core that has applied up to `applied` (from the transform checkpoint), on an
    /// old store that is (`old_fenced`) or is not fenced.
    pub fn new(applied: Position, old_fenced: bool) -> Self {
        DrainCore { state: if old_fenced { State::Recovering } else { State::Open }, applied }
    }

    /// Which universe takes client requests at this data node (`None`: neither, while fenced
    /// and not committed).
    pub fn accepting(&self) -> Option<Universe> {
        match self.state {
            State::Open => Some(Universe::Old),
            State::Committed => Some(Universe::New),
            // Drained: every router is frozen and data is complete; a router only sends to the
            // new universe after the commit, which this node may learn later. (The data node
            // admits the new universe's writes only once its store is open, after the commit.)
            State::Drained(_) => Some(Universe::New),
            State::Recovering | State::Fencing(_) | State::Draining { .. } | State::Comparing { .. } => None,
        }
    }

    /// Fenced, waiting for the transform to apply everything up to the final position: the
    /// switch waits on each transform step, so they run without the usual pause.
    pub fn draining(&self) -> bool {
        matches!(self.state, State::Draining { .. })
    }

    /// The freeze whose comparison is awaited, if one is. Once the drain has moved on (a
    /// commit opened the new universe to client writes, or an abort), a comparison still
    /// running is moot: its new-side checksum may include those writes.
    pub fn comparing(&self) -> Option<Epoch> {
        match self.state {
            State::Comparing { epoch, .. } => Some(epoch),
            _ => None,
        }
    }

    /// The freeze the old store is fenced for (in memory: not after a restart).
    fn fenced_for(&self) -> Option<Epoch> {
        match self.state {
            State::Fencing(e)
            | State::Drained(e)
            | State::Draining { epoch: e, .. }
            | State::Comparing { epoch: e, .. } => Some(e),
            State::Recovering | State::Open | State::Committed => None,
        }
    }

    pub fn handle(&mut self, input: DrainInput) -> Vec<DrainOutput> {
        let mut out = Vec::new();
        // A newer freeze means the one this store is fenced for was aborted, though the node
        // may never have seen that `Abort` (it acts on the newest decision only): unfence as the
        // abort would have, then take the new freeze as from an open store. (Hunt seed
        // 23007300: a node fenced and drained for e1 ignored e2 and e3, and every later freeze
        // aborted for want of its `Drained`.)
        if let DrainInput::Decision { decision: Decision::Freeze(e), .. } = &input {
            if self.fenced_for().is_some_and(|fenced| fenced < *e) {
                self.state = State::Open;
                out.push(DrainOutput::Unfence);
            }
        }
        match input {
            DrainInput::Decision { decision, all_routers_frozen } => match decision {
                // A store fenced in memory is fenced for this freeze (an older one's fence was
                // undone just above), so re-fencing is idempotent; after a restart it may be
                // fenced for any freeze, and is fenced again for this one.
                Decision::Freeze(epoch)
                    if (all_routers_frozen && self.state == State::Open) || self.state == State::Recovering =>
                {
                    self.state = State::Fencing(epoch);
                    out.push(DrainOutput::Fence(epoch));
                }
                Decision::Freeze(_) => {}
                Decision::Initial if self.state != State::Recovering => {}
                Decision::Initial | Decision::Abort(_) => {
                    // Idempotent: after a restart the store may still be fenced on disk.
                    self.state = State::Open;
                    out.push(DrainOutput::Unfence);
                }
                // Asked once per incarnation (a restart asks again: the opening is idempotent).
                Decision::Commit(_) if self.state != State::Committed => {
                    self.state = State::Committed;
                    out.push(DrainOutput::OpenNew);
                    out.push(DrainOutput::RemoveCapture);
                }
                Decision::Commit(_) => {}
                // Only routers are on the roster; a data node is never retired through it.
                Decision::Retired => {}
            },
            // A result for an earlier freeze (aborted since) is not this freeze's final position.
            DrainInput::Fenced { epoch, final_position } => {
                if self.state == State::Fencing(epoch) {
                    self.state = State::Draining { epoch, final_position };
                }
            }
            DrainInput::Applied { position } => self.applied = self.applied.max(position),
            DrainInput::Checksums { epoch: compared, matched } => {
                if let State::Comparing { epoch, final_position } = self.state {
                    if epoch != compared {
                        return out;
                    }
                    self.state = State::Drained(epoch);
                    out.push(DrainOutput::Ack { epoch, ack: Ack::Drained { final_position, checksum_match: matched } });
                }
            }
        }
        if let State::Draining { epoch, final_position } = self.state {
            if self.applied >= final_position {
                self.state = State::Comparing { epoch, final_position };
                out.push(DrainOutput::CompareChecksums { epoch, final_position });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that drained for e1 and never saw its `Abort` takes part in e2 all the same.
    #[test]
    fn a_newer_freeze_unfences_a_store_fenced_for_an_older_one() {
        let (e1, e2) = (Epoch(1), Epoch(2));
        let mut d = DrainCore::new(Position(5), false);
        assert_eq!(
            d.handle(DrainInput::Decision { decision: Decision::Freeze(e1), all_routers_frozen: true }),
            vec![DrainOutput::Fence(e1)]
        );
        d.handle(DrainInput::Fenced { epoch: e1, final_position: Position(5) });
        let out = d.handle(DrainInput::Checksums { epoch: e1, matched: false });
        assert!(matches!(out[..], [DrainOutput::Ack { epoch, .. }] if epoch == e1), "{out:?}");
        assert_eq!(d.accepting(), Some(Universe::New));

        let out = d.handle(DrainInput::Decision { decision: Decision::Freeze(e2), all_routers_frozen: false });
        assert_eq!(out, vec![DrainOutput::Unfence], "e1 was aborted: the old store takes requests again");
        assert_eq!(d.accepting(), Some(Universe::Old));
        let out = d.handle(DrainInput::Decision { decision: Decision::Freeze(e2), all_routers_frozen: true });
        assert_eq!(out, vec![DrainOutput::Fence(e2)]);
        let out = d.handle(DrainInput::Fenced { epoch: e2, final_position: Position(5) });
        assert_eq!(out, vec![DrainOutput::CompareChecksums { epoch: e2, final_position: Position(5) }]);
        let out = d.handle(DrainInput::Checksums { epoch: e2, matched: true });
        let drained = Ack::Drained { final_position: Position(5), checksum_match: true };
        assert_eq!(out, vec![DrainOutput::Ack { epoch: e2, ack: drained }]);

        // Straight from e1's fence to e3 (all frozen): unfence, then fence for e3. (Everything up
        // to 9 applied: a late result taken for e3 would start its comparison at once.)
        let mut d = DrainCore::new(Position(9), false);
        d.handle(DrainInput::Decision { decision: Decision::Freeze(e1), all_routers_frozen: true });
        let out = d.handle(DrainInput::Decision { decision: Decision::Freeze(Epoch(3)), all_routers_frozen: true });
        assert_eq!(out, vec![DrainOutput::Unfence, DrainOutput::Fence(Epoch(3))]);
        // A result of e1's fence, arriving late, is not e3's final position.
        assert!(d.handle(DrainInput::Fenced { epoch: e1, final_position: Position(9) }).is_empty());
    }

    #[test]
    fn fences_only_when_all_routers_frozen_then_acks_after_applying() {
        let mut d = DrainCore::new(Position(3), false);
        let freeze = |all| DrainInput::Decision { decision: Decision::Freeze(Epoch(1)), all_routers_frozen: all };
        assert!(d.handle(freeze(false)).is_empty());
        assert_eq!(d.accepting(), Some(Universe::Old));
        assert_eq!(d.handle(freeze(true)), vec![DrainOutput::Fence(Epoch(1))]);
        assert_eq!(d.accepting(), None);
        assert!(d.handle(DrainInput::Fenced { epoch: Epoch(1), final_position: Position(5) }).is_empty());
        assert_eq!(
            d.handle(DrainInput::Applied { position: Position(5) }),
            vec![DrainOutput::CompareChecksums { epoch: Epoch(1), final_position: Position(5) }]
        );
        let out = d.handle(DrainInput::Checksums { epoch: Epoch(1), matched: true });
        assert_eq!(
            out,
            vec![DrainOutput::Ack {
                epoch: Epoch(1),
                ack: Ack::Drained { final_position: Position(5), checksum_match: true }
            }]
        );
        assert_eq!(d.accepting(), Some(Universe::New));
        assert_eq!(
            d.handle(DrainInput::Decision { decision: Decision::Abort(Epoch(1)), all_routers_frozen: false }),
            vec![DrainOutput::Unfence]
        );
        assert_eq!(d.accepting(), Some(Universe::Old));
    }

    #[test]
    fn a_fence_asked_for_an_aborted_freeze_is_not_the_next_freezes_final_position() {
        let mut d = DrainCore::new(Position(0), false);
        let decide = |decision| DrainInput::Decision { decision, all_routers_frozen: true };
        assert_eq!(d.handle(decide(Decision::Freeze(Epoch(1)))), vec![DrainOutput::Fence(Epoch(1))]);
        assert_eq!(d.handle(decide(Decision::Abort(Epoch(1)))), vec![DrainOutput::Unfence]);
        assert_eq!(d.handle(decide(Decision::Freeze(Epoch(2)))), vec![DrainOutput::Fence(Epoch(2))]);
        // The first fence's result arrives late: it is not epoch 2's final position.
        assert!(d.handle(DrainInput::Fenced { epoch: Epoch(1), final_position: Position(1) }).is_empty());
        assert_eq!(d.accepting(), None, "still fencing for epoch 2");
        let out = d.handle(DrainInput::Fenced { epoch: Epoch(2), final_position: Position(2) });
        assert!(out.is_empty(), "applied 0 < 2: draining");
        assert!(d.handle(DrainInput::Checksums { epoch: Epoch(1), matched: true }).is_empty(), "not comparing yet");
        assert_eq!(
            d.handle(DrainInput::Applied { position: Position(2) }),
            vec![DrainOutput::CompareChecksums { epoch: Epoch(2), final_position: Position(2) }]
        );
    }

    #[test]
    fn restart_on_a_fenced_store_takes_nothing_until_told() {
        let mut d = DrainCore::new(Position(5), true);
        assert_eq!(d.accepting(), None);
        let out = d.handle(DrainInput::Decision { decision: Decision::Freeze(Epoch(2)), all_routers_frozen: false });
        assert_eq!(out, vec![DrainOutput::Fence(Epoch(2))]);
        let mut d = DrainCore::new(Position(5), true);
        d.handle(DrainInput::Decision { decision: Decision::Commit(Epoch(2)), all_routers_frozen: false });
        assert_eq!(d.accepting(), Some(Universe::New));
        // Fenced on disk, and the decision is that nothing was ever frozen: open the store.
        let mut d = DrainCore::new(Position(5), true);
        let out = d.handle(DrainInput::Decision { decision: Decision::Initial, all_routers_frozen: false });
        assert_eq!(out, vec![DrainOutput::Unfence]);
        assert_eq!(d.accepting(), Some(Universe::Old));
        // Not fenced: Initial changes nothing.
        let mut d = DrainCore::new(Position(5), false);
        assert!(d.handle(DrainInput::Decision { decision: Decision::Initial, all_routers_frozen: false }).is_empty());
    }
}
