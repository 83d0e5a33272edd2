//! Validation counted right: every verdict a router's validator gives is the verdict the
//! simulator reaches on the same two answers, and every report a router sends carries counts
//! the validator really had at some moment of this incarnation (nothing invented, no mismatch
//! dropped). Without this, a validator that calls a mismatch a match, or forgets to count it,
//! lets the gate pass on a new universe that answers differently.
//!
//! The simulator's own rule, written from the meaning of the positions rather than from the
//! validate core: a comparison is conclusive when the new universe had applied at least what
//! the old one answered from; different answers at the same position are a mismatch; different
//! answers with the new universe ahead are inconclusive (it may hold a later write).

use super::Violation;
use node_core::duties::validate::{Observed, Verdict};
use protocol::messages::NodeReport;
use protocol::schema::Row;
use std::collections::BTreeMap;

/// Per router (by index), for its current incarnation: the mismatches counted after each
/// conclusive comparison (`[s]` = mismatches among the first `s` samples).
#[derive(Debug, Default)]
pub struct Verdicts {
    history: BTreeMap<usize, Vec<u64>>,
    /// Inconclusive comparisons, per router.
    stale: BTreeMap<usize, u64>,
}

/// The verdict two answers deserve (`ignore`: response fields the plan says to ignore).
pub fn expected(old: &Observed, new: &Observed, ignore: &[String]) -> Verdict {
    let strip = |body: &Option<Row>| -> Option<Row> {
        body.as_ref()
            .map(|row| row.iter().filter(|(k, _)| !ignore.contains(k)).map(|(k, v)| (k.clone(), v.clone())).collect())
    };
    let same = strip(&old.body) == strip(&new.body);
    if new.position < old.position || (!same && new.position > old.position) {
        Verdict::Stale
    } else if same {
        Verdict::Match
    } else {
        Verdict::Mismatch
    }
}

impl Verdicts {
    /// Router `router` compared `old` with `new` and said `verdict`.
    pub fn compared(
        &mut self,
        router: usize,
        name: &str,
        verdict: Verdict,
        old: &Observed,
        new: &Observed,
        ignore: &[String],
    ) -> Option<Violation> {
        let want = expected(old, new, ignore);
        let history = self.history.entry(router).or_insert_with(|| vec![0]);
        let last = *history.last().expect("never empty");
        match want {
            Verdict::Match => history.push(last),
            Verdict::Mismatch => history.push(last + 1),
            Verdict::Stale => *self.stale.entry(router).or_default() += 1,
        }
        (verdict != want).then(|| Violation::WrongVerdict {
            router: name.to_string(),
            expected: format!("{want:?}"),
            got: format!("{verdict:?}"),
            old: format!("{old:?}"),
            new: format!("{new:?}"),
        })
    }

    /// Router `router` sends `report` to a coordinator.
    pub fn reported(&self, router: usize, name: &str, report: &NodeReport) -> Option<Violation> {
        let history = self.history.get(&router).map_or(&[0][..], |h| &h[..]);
        let had = usize::try_from(report.samples).ok().and_then(|s| history.get(s));
        (had != Some(&report.mismatches)).then(|| Violation::ValidationMiscounted {
            router: name.to_string(),
            samples: report.samples,
            mismatches: report.mismatches,
            seen: match had {
                Some(m) => format!("{m} mismatches among the first {} samples", report.samples),
                None => format!("only {} conclusive comparisons", history.len() - 1),
            },
        })
    }

    /// A router's validator starts counting from zero: it crashed, or a new upgrade began.
    pub fn reset(&mut self, router: usize) {
        self.history.remove(&router);
        self.stale.remove(&router);
    }

    /// What router `router`'s validator should count now: (samples, mismatches, inconclusive).
    pub fn counts(&self, router: usize) -> (u64, u64, u64) {
        let history = self.history.get(&router).map_or(&[0][..], |h| &h[..]);
        let last = *history.last().expect("never empty");
        (history.len() as u64 - 1, last, self.stale.get(&router).copied().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::schema::Value;
    use protocol::Position;

    fn seen(v: i64, at: i64, position: u64) -> Observed {
        let body: Row = [("v".to_string(), Value::Int(v)), ("at".to_string(), Value::Int(at))].into_iter().collect();
        Observed { body: Some(body), position: Position(position) }
    }

    fn report(samples: u64, mismatches: u64) -> NodeReport {
        NodeReport { samples, mismatches, ..Default::default() }
    }

    #[test]
    fn the_expected_verdict_follows_positions_and_ignored_fields() {
        let ignore = vec!["at".to_string()];
        assert_eq!(expected(&seen(1, 0, 5), &seen(1, 9, 5), &ignore), Verdict::Match);
        assert_eq!(expected(&seen(1, 0, 5), &seen(1, 9, 5), &[]), Verdict::Mismatch);
        assert_eq!(expected(&seen(1, 0, 5), &seen(2, 0, 5), &ignore), Verdict::Mismatch);
        assert_eq!(expected(&seen(1, 0, 5), &seen(2, 0, 6), &ignore), Verdict::Stale, "new universe ahead");
        assert_eq!(expected(&seen(1, 0, 5), &seen(1, 0, 6), &ignore), Verdict::Match, "ahead, same answer");
        assert_eq!(expected(&seen(1, 0, 5), &seen(1, 0, 4), &ignore), Verdict::Stale, "new universe behind");
    }

    #[test]
    fn a_wrong_verdict_and_a_report_never_counted_are_violations() {
        let mut v = Verdicts::default();
        assert_eq!(v.reported(0, "r", &report(0, 0)), None, "nothing compared yet");
        assert_eq!(v.compared(0, "r", Verdict::Match, &seen(1, 0, 5), &seen(1, 0, 5), &[]), None);
        assert_eq!(v.compared(0, "r", Verdict::Mismatch, &seen(1, 0, 5), &seen(2, 0, 5), &[]), None);
        assert_eq!(v.compared(0, "r", Verdict::Stale, &seen(1, 0, 5), &seen(2, 0, 4), &[]), None);
        let wrong = v.compared(0, "r", Verdict::Match, &seen(1, 0, 5), &seen(2, 0, 5), &[]);
        assert!(matches!(wrong, Some(Violation::WrongVerdict { .. })));
        // Counted so far: samples 1..=3 with 0, 1, 2 mismatches.
        assert_eq!(v.reported(0, "r", &report(1, 0)), None, "an older report is fine");
        assert_eq!(v.reported(0, "r", &report(3, 2)), None);
        assert!(
            matches!(v.reported(0, "r", &report(3, 1)), Some(Violation::ValidationMiscounted { .. })),
            "one dropped"
        );
        assert!(matches!(v.reported(0, "r", &report(4, 2)), Some(Violation::ValidationMiscounted { .. })), "invented");
        assert!(matches!(v.reported(1, "s", &report(1, 0)), Some(Violation::ValidationMiscounted { .. })));
        v.reset(0);
        assert!(matches!(v.reported(0, "r", &report(3, 2)), Some(Violation::ValidationMiscounted { .. })));
        assert_eq!(v.reported(0, "r", &report(0, 0)), None, "a restarted validator counts from zero");
    }
}
