//! Progress of a data node's transform, as an operator reads it: the bulk copy's pace and time
//! left, the change stream's throughput, and how long the oldest change not yet applied has
//! waited. Pure: every figure is computed from the core's own clock (`now_ms`), so the
//! simulator's runs stay deterministic.
//!
//! *Lag in time* is measured from when this node first learnt that a position was captured
//! (a read of the change stream, or a snapshot's position), not from the source's commit time,
//! which the data-store interface does not carry: it is the transform's own delay, a lower
//! bound of the delay since the application's commit (the read interval adds to it).

pub use protocol::messages::Pace as Figures;
use protocol::Position;
use std::collections::VecDeque;

/// Most (position, first seen) marks kept for the lag: when full, the newest mark moves up to
/// the newest position (its time stays), so the oldest waiting change keeps its time and the
/// memory stays bounded.
pub const LAG_MARKS_MAX: usize = 64;
/// The window the change stream's throughput is measured over.
pub const RATE_WINDOW_MS: u64 = 10_000;
/// Most samples of the throughput window kept (at most one a step).
pub const RATE_SAMPLES_MAX: usize = 256;

/// The transform's pace over time (see the module's notes).
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Captured positions with the time each was first seen, ascending in both.
    marks: VecDeque<(Position, u64)>,
    /// (time, changes applied so far) at each applied stream batch, ascending.
    rate: VecDeque<(u64, u64)>,
    changes_applied: u64,
    /// The copy: when it started, rows copied, rows its snapshot holds (0: not known), done.
    copy_started_ms: Option<u64>,
    copy_ended_ms: Option<u64>,
    copied_rows: u64,
    copy_rows_total: u64,
}

impl Progress {
    /// A copy starts at `now_ms` from a snapshot of `rows_total` rows (0: not known).
    pub fn copy_started(&mut self, now_ms: u64, rows_total: u64) {
        self.copy_started_ms = Some(now_ms);
        self.copy_ended_ms = None;
        self.copied_rows = 0;
        self.copy_rows_total = rows_total;
    }

    /// `rows` more rows of the copy were applied at `now_ms`; `last`: the copy is done.
    pub fn copied(&mut self, now_ms: u64, rows: u64, last: bool) {
        self.copied_rows += rows;
        if last {
            self.copy_ended_ms = Some(now_ms);
        }
    }

    /// The node learnt at `now_ms` that everything up to `position` was captured.
    pub fn captured(&mut self, now_ms: u64, position: Position) {
        let full = self.marks.len() >= LAG_MARKS_MAX;
        match self.marks.back_mut() {
            Some((newest, _)) if position <= *newest => {}
            Some((newest, _)) if full => *newest = position,
            _ => self.marks.push_back((position, now_ms)),
        }
        debug_assert!(self.marks.len() <= LAG_MARKS_MAX);
    }

    /// A stream batch of `changes` changes was applied at `now_ms`, up to `applied`.
    pub fn applied(&mut self, now_ms: u64, applied: Position, changes: u64) {
        while self.marks.front().is_some_and(|(p, _)| *p <= applied) {
            self.marks.pop_front();
        }
        self.changes_applied += changes;
        if self.rate.back().is_some_and(|(t, _)| *t == now_ms) {
            self.rate.pop_back();
        }
        self.rate.push_back((now_ms, self.changes_applied));
        while self.rate.len() > RATE_SAMPLES_MAX || self.rate.front().is_some_and(|(t, _)| t + RATE_WINDOW_MS < now_ms)
        {
            self.rate.pop_front();
        }
    }

    /// The transform starts again from the store's checkpoint `applied` (a restart): marks at
    /// or before it are applied.
    pub fn restarted(&mut self, applied: Position) {
        while self.marks.front().is_some_and(|(p, _)| *p <= applied) {
            self.marks.pop_front();
        }
    }

    /// Rows the copy in progress (or the last one) copied, and how many its snapshot holds (0:
    /// not known).
    pub fn copy(&self) -> (u64, u64) {
        (self.copied_rows, self.copy_rows_total)
    }

    /// The figures at `now_ms`.
    pub fn figures(&self, now_ms: u64) -> Figures {
        let lag_ms = self.marks.front().map_or(0, |(_, seen)| now_ms.saturating_sub(*seen));
        // Over the window: from its oldest sample to now (an idle stream's pace falls to 0).
        let changes_per_s = match self.rate.front() {
            Some((since, at)) if now_ms > *since && since + RATE_WINDOW_MS >= now_ms => {
                (self.changes_applied - at) * 1_000 / (now_ms - since)
            }
            _ => 0,
        };
        let (copy_rows_per_s, copy_eta_ms) = match self.copy_started_ms {
            Some(started) => {
                let until = self.copy_ended_ms.unwrap_or(now_ms);
                let rate = if until > started { self.copied_rows * 1_000 / (until - started) } else { 0 };
                let left = self.copy_rows_total.saturating_sub(self.copied_rows);
                let eta =
                    (self.copy_ended_ms.is_none() && self.copy_rows_total > 0 && rate > 0).then(|| left * 1_000 / rate);
                (rate, eta)
            }
            None => (0, None),
        };
        Figures { lag_ms, changes_per_s, copy_rows_per_s, copy_eta_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_wait_of_the_oldest_change_not_applied() {
        let mut p = Progress::default();
        assert_eq!(p.figures(5).lag_ms, 0);
        p.captured(100, Position(10));
        p.captured(300, Position(20));
        p.captured(400, Position(20));
        assert_eq!(p.figures(1_000).lag_ms, 900, "position 10 waits since 100");
        p.applied(1_000, Position(10), 10);
        assert_eq!(p.figures(1_000).lag_ms, 700, "then position 20, since 300");
        p.applied(1_100, Position(20), 10);
        assert_eq!(p.figures(1_100).lag_ms, 0);
        // Bounded: a flood of marks keeps the oldest one's time.
        for i in 0..1_000u64 {
            p.captured(2_000 + i, Position(100 + i));
        }
        assert!(p.marks.len() <= LAG_MARKS_MAX);
        assert_eq!(p.figures(5_000).lag_ms, 3_000);
        p.restarted(Position(2_000));
        assert_eq!(p.figures(5_000).lag_ms, 0);
    }

    #[test]
    fn throughput_is_measured_over_the_window_and_falls_to_zero_when_idle() {
        let mut p = Progress::default();
        for s in 0..=20u64 {
            p.applied(s * 1_000, Position(s), 500);
        }
        assert_eq!(p.figures(20_000).changes_per_s, 500);
        assert_eq!(p.figures(40_000).changes_per_s, 0, "nothing for longer than the window");
        assert!(p.rate.len() <= RATE_SAMPLES_MAX);
    }

    #[test]
    fn the_copy_has_a_pace_and_a_time_left_until_it_ends() {
        let mut p = Progress::default();
        assert_eq!(p.figures(0), Figures::default());
        p.copy_started(1_000, 10_000);
        p.copied(3_000, 4_000, false);
        let f = p.figures(3_000);
        assert_eq!((f.copy_rows_per_s, f.copy_eta_ms), (2_000, Some(3_000)));
        p.copied(6_000, 6_000, true);
        let f = p.figures(60_000);
        assert_eq!((f.copy_rows_per_s, f.copy_eta_ms), (2_000, None), "the pace of the copy that ended");
        p.copy_started(70_000, 0);
        p.copied(71_000, 100, false);
        assert_eq!(p.figures(71_000).copy_eta_ms, None, "no time left without the snapshot's size");
    }
}
