//! The comparison of transform(old) with the new store while traffic runs, range of old keys
//! by range, and what it leaves the drain to compare.
//!
//! The old tables, in (table, key) order, are cut into ranges `(after, through]` as they are
//! read: the first read of a range takes at most `limit` rows, and a range that holds more is
//! split after the last row read. A range is compared at matching positions:
//!
//! 1. its current old rows are read, with two positions: `seen_to`, a position every change at
//!    or before which the rows show, and `through`, one every change they show is at or before
//!    (the same position in a store that reads its rows and its change log in one transaction);
//! 2. once the transform has applied everything up to `through`, the new store converts the
//!    rows into its scratch copy and gives two checksums: the scratch copy's, and that of its
//!    own rows with the scratch rows' keys;
//! 3. a change after `seen_to` to a row of the range read meanwhile *spoils* the comparison
//!    (the rows read are no longer what the new store holds): the range is left as changed.
//!
//! A range whose last comparison matched and whose rows have not changed since (no change read
//! after its `seen_to`) is *clean*: its scratch checksum is what its old rows give now. So the
//! drain stages only the other ranges' rows, and compares the new store's whole checksum with
//! the clean ranges' checksums plus the staged ones: every new row comes from exactly one old
//! row ([`protocol::schema::Mapping::rows_stand_alone`]), and the checksum is a sum of row
//! hashes. The new store's whole checksum still covers every row, so a row written behind the
//! transform's back, in a clean range or not, shows there.
//!
//! Pure and deterministic: the data-node core feeds it the reads, the changes it reads from the
//! stream, and the stores' answers.

use crate::store::{KeysCompared, RowCursor, StoredRow};
use protocol::messages::{RangeCheck, TableRows};
use protocol::Position;
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// A row's place in (table, key) order.
pub type RowAt = (String, i64);

/// Most ranges kept: a range that holds more rows than a read takes splits, and past this many
/// ranges it stops splitting (its remainder is compared at the drain).
pub const RANGES_MAX: usize = 1 << 20;

/// What the last comparison of a range found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// transform(old) and new matched; `digest` is the scratch copy's checksum.
    Matched {
        digest: u64,
    },
    Differed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Range {
    /// Rows after this place (`None`: from the first).
    after: RowCursor,
    /// Rows up to this place, inclusive (`None`: to the last).
    through: Option<RowAt>,
    /// The last comparison's outcome, if one ended.
    outcome: Option<Outcome>,
    /// The last comparison's read showed every change up to here.
    seen_to: Position,
    /// A change after `seen_to` was read since the last comparison.
    changed: bool,
    /// Compared at least once (or spoiled while being compared).
    attempted: bool,
    /// By new table, the last counted comparison's rows: transform(old)'s, the new store's.
    rows: BTreeMap<String, (u64, u64)>,
}

impl Range {
    fn clean(&self) -> bool {
        matches!(self.outcome, Some(Outcome::Matched { .. })) && !self.changed
    }

    fn fresh(after: RowCursor, through: Option<RowAt>) -> Range {
        Range {
            after,
            through,
            outcome: None,
            seen_to: Position(0),
            changed: false,
            attempted: false,
            rows: BTreeMap::new(),
        }
    }
}

/// `a` against `b` in (table, key) order.
fn order(a: (&str, i64), b: (&str, i64)) -> Ordering {
    a.cmp(&b)
}

fn at(place: &RowAt) -> (&str, i64) {
    (place.0.as_str(), place.1)
}

/// A run of old rows `(after, through]` the drain stages, and how many ranges it joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub after: RowCursor,
    /// `None`: to the last row.
    pub through: Option<RowAt>,
    pub ranges: usize,
}

impl Span {
    /// Most rows one read of the span takes: about its ranges' rows (each was read in reads
    /// of `range_rows` at most), but a whole `chunk_rows` for a span to the last row (its last
    /// range may never have been read, and hold any number).
    pub fn read_limit(&self, range_rows: usize, chunk_rows: usize) -> usize {
        let span_rows = if self.through.is_some() { range_rows.saturating_mul(self.ranges) } else { usize::MAX };
        chunk_rows.min(span_rows).max(1)
    }

    /// What of a read after a cursor in the span belongs to it (`last`: no row follows the
    /// read), and whether the span is done: the read passed its end, reached its last row, or
    /// reached the last row of all.
    pub fn take(&self, mut rows: Vec<StoredRow>, last: bool) -> (Vec<StoredRow>, bool) {
        let read = rows.len();
        rows.retain(|(t, k, _)| in_span((t, *k), &None, &self.through));
        let at_end =
            self.through.as_ref().is_some_and(|(t, k)| rows.last().is_some_and(|(rt, rk, _)| rt == t && rk == k));
        let done = last || rows.len() < read || at_end;
        (rows, done)
    }
}

/// A comparison under way: the range, the rows read and their positions.
#[derive(Clone, Debug)]
struct InFlight {
    index: usize,
    rows: Option<Vec<StoredRow>>,
    row_count: u64,
    seen_to: Position,
    through: Position,
    staged: bool,
    rejected: bool,
    spoiled: bool,
}

/// The ranges and the comparison under way (see the module's notes).
#[derive(Clone, Debug)]
pub struct Ranges {
    ranges: Vec<Range>,
    /// The next range to look at (they are compared round and round).
    next: usize,
    /// A read asked for, of this range.
    reading: Option<usize>,
    in_flight: Option<InFlight>,
    rows_compared: u64,
}

impl Default for Ranges {
    fn default() -> Self {
        Ranges::new()
    }
}

impl Ranges {
    /// One range holding every row, not yet compared.
    pub fn new() -> Ranges {
        Ranges { ranges: vec![Range::fresh(None, None)], next: 0, reading: None, in_flight: None, rows_compared: 0 }
    }

    /// Forgets everything (the new store was emptied: a copy started again).
    pub fn reset(&mut self) {
        *self = Ranges::new();
    }

    fn find(&self, place: (&str, i64)) -> usize {
        let index =
            self.ranges.partition_point(|r| r.through.as_ref().is_some_and(|t| order(at(t), place) == Ordering::Less));
        assert!(index < self.ranges.len(), "the last range reaches the end");
        index
    }

    /// Whether a range is not clean (one to compare).
    pub fn has_work(&self) -> bool {
        self.ranges.iter().any(|r| !r.clean())
    }

    /// Old rows of the comparison under way.
    pub fn rows_in_flight(&self) -> u64 {
        self.in_flight.as_ref().map_or(0, |f| f.row_count)
    }

    /// Whether a comparison is under way (a read asked for, or rows read).
    pub fn busy(&self) -> bool {
        self.reading.is_some() || self.in_flight.is_some()
    }

    /// The next range to compare, if one is not clean: its read starts after the returned
    /// cursor. Asks for the read (answer with [`Ranges::read`]).
    pub fn start(&mut self) -> Option<RowCursor> {
        assert!(!self.busy(), "one comparison at a time");
        let n = self.ranges.len();
        let index = (0..n).map(|i| (self.next + i) % n).find(|&i| !self.ranges[i].clean())?;
        self.reading = Some(index);
        Some(self.ranges[index].after.clone())
    }

    /// The rows read for the range [`Ranges::start`] named: up to `limit` rows after its start,
    /// `last` if none follow; `seen_to` and `through` as in the module's notes.
    pub fn read(&mut self, mut rows: Vec<StoredRow>, last: bool, limit: usize, seen_to: Position, through: Position) {
        let index = self.reading.take().expect("a read was asked for");
        assert!(seen_to <= through, "rows show changes up to {through:?}, all of them up to {seen_to:?}");
        let range = &self.ranges[index];
        let cut_at = range.through.clone();
        let read_whole = rows.len() < limit || last;
        if let Some(end) = &cut_at {
            rows.retain(|(t, k, _)| order((t.as_str(), *k), at(end)) != Ordering::Greater);
        }
        let reached_end = read_whole
            || rows.len() < limit
            || cut_at.as_ref().is_some_and(|end| rows.last().is_some_and(|(t, k, _)| (t, *k) == (&end.0, end.1)));
        if !reached_end && self.ranges.len() < RANGES_MAX {
            // More rows than one read takes: the range splits after the last row read, and its
            // rest is a range of its own, not yet compared (the outcome of the whole is void).
            let (t, k, _) = rows.last().expect("a full read holds rows");
            let split: RowAt = (t.clone(), *k);
            let rest = Range::fresh(Some(split.clone()), cut_at);
            let range = &mut self.ranges[index];
            range.through = Some(split);
            range.outcome = None;
            range.rows.clear();
            self.ranges.insert(index + 1, rest);
        } else if !reached_end {
            // Too many ranges: this one is never clean (the drain compares it).
            let range = &mut self.ranges[index];
            range.attempted = true;
            range.outcome = None;
            self.next = index + 1;
            return;
        }
        self.in_flight = Some(InFlight {
            index,
            row_count: rows.len() as u64,
            rows: Some(rows),
            seen_to,
            through,
            staged: false,
            rejected: false,
            spoiled: false,
        });
    }

    /// The position the transform must have applied before the rows read are staged.
    pub fn waits_for(&self) -> Option<Position> {
        self.in_flight.as_ref().filter(|f| !f.staged).map(|f| f.through)
    }

    /// The rows to stage, once the transform has applied up to [`Ranges::waits_for`].
    pub fn take_rows(&mut self) -> Vec<StoredRow> {
        let f = self.in_flight.as_mut().expect("rows read");
        f.rows.take().expect("rows are staged once")
    }

    /// The rows were staged; `rejected` could not be converted.
    pub fn staged(&mut self, rejected: u64) {
        let f = self.in_flight.as_mut().expect("rows read");
        assert!(f.rows.is_none(), "rows taken before they are staged");
        f.staged = true;
        f.rejected = rejected > 0;
    }

    /// Whether the staged rows wait for their comparison.
    pub fn staged_waiting(&self) -> bool {
        self.in_flight.as_ref().is_some_and(|f| f.staged)
    }

    /// The new store compared the scratch copy (`expected`) with its rows of the same keys
    /// (`actual`). Returns the range's outcome, if the comparison counted.
    pub fn compared(&mut self, found: KeysCompared) -> Option<Outcome> {
        let KeysCompared { expected, actual, rows } = found;
        let f = self.in_flight.take().expect("a comparison under way");
        assert!(f.staged, "compared before staged");
        self.next = f.index + 1;
        self.rows_compared += f.row_count;
        let range = &mut self.ranges[f.index];
        range.attempted = true;
        if f.spoiled {
            // The rows changed while being compared: left for the drain (or the next round).
            range.changed = true;
            return None;
        }
        let outcome =
            if !f.rejected && expected == actual { Outcome::Matched { digest: expected } } else { Outcome::Differed };
        range.outcome = Some(outcome);
        range.seen_to = f.seen_to;
        range.changed = false;
        range.rows = rows;
        Some(outcome)
    }

    /// The comparison under way stops (a store operation failed, a drain begins): the range
    /// stays as it was.
    pub fn abandon(&mut self) {
        self.reading = None;
        self.in_flight = None;
    }

    /// The transform read a change at `position` to old row `(table, key)`.
    pub fn changed(&mut self, table: &str, key: i64, position: Position) {
        assert!(self.reading.is_none(), "changes are read between store operations");
        let index = self.find((table, key));
        if let Some(f) = self.in_flight.as_mut().filter(|f| f.index == index && position > f.seen_to) {
            f.spoiled = true;
        }
        let range = &mut self.ranges[index];
        if range.outcome.is_some() && position > range.seen_to {
            range.changed = true;
        }
    }

    /// Every range changed (the drain found the universes different as a whole, and cannot
    /// say where): each is compared again.
    pub fn all_changed(&mut self) {
        self.ranges.iter_mut().for_each(|r| r.changed = true);
    }

    /// The clean ranges' checksums, summed (as the store sums row hashes).
    pub fn clean_digest(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.clean())
            .map(|r| match r.outcome {
                Some(Outcome::Matched { digest }) => digest,
                _ => unreachable!("a clean range matched"),
            })
            .fold(0u64, u64::wrapping_add)
    }

    /// What the drain must stage: each run of ranges that are not clean, as `(after, through)`
    /// (`through`: `None` to the last row), in order, with how many ranges it joins (a read of
    /// the span need not take more than that many ranges' rows).
    pub fn spans(&self) -> Vec<Span> {
        let mut spans: Vec<Span> = Vec::new();
        let mut joins = false;
        for range in &self.ranges {
            if range.clean() {
                joins = false;
                continue;
            }
            match spans.last_mut() {
                Some(span) if joins => {
                    span.through = range.through.clone();
                    span.ranges += 1;
                }
                _ => spans.push(Span { after: range.after.clone(), through: range.through.clone(), ranges: 1 }),
            }
            joins = true;
        }
        spans
    }

    /// What a node reports.
    pub fn report(&self) -> RangeCheck {
        let count = |f: fn(&Range) -> bool| self.ranges.iter().filter(|r| f(r)).count() as u64;
        RangeCheck {
            by_range: true,
            ranges: self.ranges.len() as u64,
            attempted: count(|r| r.attempted),
            clean: count(Range::clean),
            differed: count(|r| r.outcome == Some(Outcome::Differed)),
            rows: self.rows_compared,
            tables: self.table_rows(),
        }
    }

    /// Row counts by new table (Imago's request log left out), summed over the ranges.
    fn table_rows(&self) -> Vec<TableRows> {
        let mut tables: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for (table, (expected, actual)) in self.ranges.iter().flat_map(|r| &r.rows) {
            if table == protocol::schema::REQUEST_LOG_TABLE {
                continue;
            }
            let sum = tables.entry(table).or_default();
            *sum = (sum.0 + expected, sum.1 + actual);
        }
        tables
            .into_iter()
            .map(|(table, (expected, actual))| TableRows { table: table.to_string(), expected, actual })
            .collect()
    }
}

/// Whether `(table, key)` lies in a span `(after, through]`.
pub fn in_span(place: (&str, i64), after: &RowCursor, through: &Option<RowAt>) -> bool {
    after.as_ref().is_none_or(|a| order(place, at(a)) == Ordering::Greater)
        && through.as_ref().is_none_or(|t| order(place, at(t)) != Ordering::Greater)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::schema::{Row, Value};

    fn sums(expected: u64, actual: u64) -> KeysCompared {
        KeysCompared { expected, actual, rows: BTreeMap::new() }
    }

    fn row(table: &str, key: i64) -> StoredRow {
        (table.to_string(), key, Row::from([("v".to_string(), Value::Int(key))]))
    }

    fn rows(table: &str, keys: std::ops::RangeInclusive<i64>) -> Vec<StoredRow> {
        keys.map(|k| row(table, k)).collect()
    }

    /// Reads, stages and compares the next range with the given outcome.
    fn compare(r: &mut Ranges, read: Vec<StoredRow>, last: bool, limit: usize, at: u64, matched: bool) -> RowCursor {
        let after = r.start().expect("a range to compare");
        r.read(read, last, limit, Position(at), Position(at));
        assert_eq!(r.waits_for(), Some(Position(at)));
        let staged = r.take_rows();
        r.staged(0);
        let digest = staged.len() as u64 * 100 + at;
        r.compared(sums(digest, if matched { digest } else { digest + 1 }));
        after
    }

    #[test]
    fn ranges_split_as_they_are_read_and_a_full_round_makes_every_range_clean() {
        let mut r = Ranges::new();
        // Three rows per read: a, then b's rows.
        assert_eq!(compare(&mut r, rows("a", 1..=3), false, 3, 10, true), None);
        assert_eq!(r.report().ranges, 2);
        assert_eq!(
            compare(&mut r, vec![row("a", 4), row("b", 1), row("b", 2)], false, 3, 11, true),
            Some(("a".into(), 3))
        );
        assert_eq!(compare(&mut r, vec![row("b", 3)], true, 3, 12, true), Some(("b".into(), 2)));
        let report = r.report();
        assert_eq!((report.ranges, report.attempted, report.clean, report.differed, report.rows), (3, 3, 3, 0, 7));
        assert_eq!(r.start(), None, "everything is clean");
        assert!(r.spans().is_empty());
        assert_eq!(r.clean_digest(), 310 + 311 + 112);
    }

    #[test]
    fn a_change_after_the_read_makes_a_range_changed_and_the_drain_stages_runs_of_them() {
        let mut r = Ranges::new();
        compare(&mut r, rows("a", 1..=2), false, 2, 5, true);
        compare(&mut r, rows("a", 3..=4), false, 2, 6, true);
        compare(&mut r, rows("a", 5..=6), false, 2, 7, true);
        compare(&mut r, vec![], true, 2, 8, true);
        assert_eq!(r.report().clean, 4);
        // Changes at or before a range's read are in it; later ones are not.
        r.changed("a", 2, Position(5));
        r.changed("a", 3, Position(9));
        r.changed("a", 99, Position(9));
        assert_eq!(r.report().clean, 2);
        assert_eq!(
            r.spans(),
            vec![
                Span { after: Some(("a".into(), 2)), through: Some(("a".into(), 4)), ranges: 1 },
                Span { after: Some(("a".into(), 6)), through: None, ranges: 1 }
            ],
            "changed ranges, runs apart"
        );
        assert_eq!(r.clean_digest(), 205 + 207);
        assert!(in_span(("a", 3), &Some(("a".into(), 2)), &Some(("a".into(), 4))));
        assert!(!in_span(("a", 2), &Some(("a".into(), 2)), &Some(("a".into(), 4))));
        assert!(in_span(("b", 0), &Some(("a".into(), 6)), &None));
        r.changed("a", 5, Position(9));
        assert_eq!(
            r.spans(),
            vec![Span { after: Some(("a".into(), 2)), through: None, ranges: 3 }],
            "changed ranges, runs joined"
        );
        // The next round compares a changed range again.
        assert_eq!(r.start(), Some(Some(("a".into(), 2))));
    }

    #[test]
    fn a_span_is_read_for_about_its_rows_and_ends_at_its_end() {
        let span = Span { after: Some(("a".into(), 2)), through: Some(("a".into(), 6)), ranges: 2 };
        assert_eq!(span.read_limit(3, 100), 6, "two ranges of at most 3 rows");
        assert_eq!(span.read_limit(3, 4), 4, "never more than a chunk");
        assert_eq!(Span { through: None, ..span.clone() }.read_limit(3, 100), 100, "to the last row: a chunk");
        let (taken, done) = span.take(rows("a", 3..=5), false);
        assert_eq!((taken.len(), done), (3, false), "within the span, its end not reached");
        let (taken, done) = span.take(rows("a", 6..=7), false);
        assert_eq!((taken.len(), done), (1, true), "past its end");
        assert_eq!(span.take(rows("a", 5..=6), false), (rows("a", 5..=6), true), "at its last row");
        assert!(span.take(rows("a", 3..=4), true).1, "the last row of all");
    }

    #[test]
    fn a_change_read_while_comparing_spoils_it_and_a_difference_is_reported() {
        let mut r = Ranges::new();
        r.start();
        r.read(rows("a", 1..=3), true, 10, Position(4), Position(6));
        assert_eq!(r.waits_for(), Some(Position(6)));
        r.changed("a", 2, Position(4)); // shown by the read
        r.changed("a", 3, Position(5)); // maybe not
        let staged = r.take_rows();
        assert_eq!(staged.len(), 3);
        r.staged(0);
        assert_eq!(r.compared(sums(1, 1)), None, "spoiled");
        let report = r.report();
        assert_eq!((report.attempted, report.clean, report.differed), (1, 0, 0));
        assert_eq!(r.spans(), vec![Span { after: None, through: None, ranges: 1 }]);
        // Again, undisturbed, but the universes differ.
        r.start();
        r.read(rows("a", 1..=3), true, 10, Position(7), Position(7));
        r.take_rows();
        r.staged(0);
        assert_eq!(r.compared(sums(1, 2)), Some(Outcome::Differed));
        assert_eq!(r.report().differed, 1);
        // A row the store could not convert is a difference too.
        r.start();
        r.read(rows("a", 1..=3), true, 10, Position(7), Position(7));
        r.take_rows();
        r.staged(1);
        assert_eq!(r.compared(sums(1, 1)), Some(Outcome::Differed));
        r.start();
        r.read(rows("a", 1..=3), true, 10, Position(8), Position(8));
        r.take_rows();
        r.staged(0);
        assert_eq!(r.compared(sums(3, 3)), Some(Outcome::Matched { digest: 3 }));
        assert_eq!((r.report().differed, r.report().clean), (0, 1));
        // The drain found a difference somewhere: all again.
        r.all_changed();
        assert_eq!((r.report().clean, r.spans()), (0, vec![Span { after: None, through: None, ranges: 1 }]));
    }

    #[test]
    fn a_range_that_grew_splits_again_and_rows_past_its_end_belong_to_the_next() {
        let mut r = Ranges::new();
        compare(&mut r, rows("a", 1..=4), false, 4, 1, true);
        compare(&mut r, vec![], true, 4, 1, true);
        // Rows inserted into the first range: a read there sees rows of the next range too.
        r.changed("a", 3, Position(2));
        let after = r.start();
        assert_eq!(after, Some(None));
        r.read(
            vec![row("a", 1), row("a", 2), row("a", 3), row("a", 5), row("a", 9)],
            false,
            5,
            Position(3),
            Position(3),
        );
        assert_eq!(r.take_rows().len(), 3, "a 5 and a 9 lie past the range's end (a 4 was deleted)");
        r.staged(0);
        r.compared(sums(7, 7));
        assert_eq!(r.report().ranges, 2);
        // More rows than a read takes: split.
        r.changed("a", 2, Position(4));
        r.start();
        r.read(rows("a", 1..=2), false, 2, Position(5), Position(5));
        r.take_rows();
        r.staged(0);
        r.compared(sums(8, 8));
        assert_eq!(r.report().ranges, 3);
        assert_eq!(r.report().attempted, 2, "the split-off rest is not compared yet");
        assert_eq!(r.start(), Some(Some(("a".into(), 2))));
        r.abandon();
        assert!(!r.busy());
        r.reset();
        assert_eq!(r.report(), RangeCheck { by_range: true, ranges: 1, ..Default::default() });
    }

    /// Row counts by new table add up over the ranges, each as of its last counted comparison;
    /// Imago's request log is left out of the report.
    #[test]
    fn row_counts_by_table_add_up_over_the_ranges_as_last_compared() {
        let mut r = Ranges::new();
        let counts = |pairs: &[(&str, u64, u64)]| -> KeysCompared {
            let rows = pairs.iter().map(|(t, e, a)| (t.to_string(), (*e, *a))).collect();
            KeysCompared { expected: 1, actual: 1, rows }
        };
        let read = |r: &mut Ranges, rows_read: Vec<StoredRow>, last: bool, found: KeysCompared| {
            r.start().expect("a range to compare");
            r.read(rows_read, last, 3, Position(5), Position(5));
            r.take_rows();
            r.staged(0);
            r.compared(found)
        };
        read(&mut r, rows("a", 1..=3), false, counts(&[("a", 3, 3), ("b", 3, 3)]));
        read(&mut r, rows("a", 4..=5), true, counts(&[("a", 2, 1), (protocol::schema::REQUEST_LOG_TABLE, 9, 9)]));
        let tables = r.report().tables;
        let found: Vec<_> = tables.iter().map(|t| (t.table.as_str(), t.expected, t.actual)).collect();
        assert_eq!(found, [("a", 5, 4), ("b", 3, 3)]);
        // Compared again: the second range's counts replace its first ones.
        r.changed("a", 4, Position(6));
        read(&mut r, rows("a", 4..=5), true, counts(&[("a", 2, 2)]));
        let found: Vec<_> = r.report().tables.iter().map(|t| (t.table.clone(), t.expected, t.actual)).collect();
        assert_eq!(found, [("a".to_string(), 5, 5), ("b".to_string(), 3, 3)]);
    }
}
