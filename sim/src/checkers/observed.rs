//! What a node says about itself is true. Shells export the cores' own figures as metrics
//! (requests held and since when, requests in flight to the old universe, requests tracked,
//! validation counts, the transform's checkpoint) and stores answer for their own state (fenced,
//! snapshots open, changes kept); the reasons a router gives a client for a 503 and the cause it
//! gives for a hold are figures too. Operators act on them: a hold queue that looks empty, a
//! store that looks unfenced, a transform that looks caught up. Each is held here to what the
//! simulator itself saw.
//!
//! Requests that arrived at the very instant of a check may not have been taken by the router
//! yet (its mailbox runs after the arrival), so router figures are checked within the bounds
//! of what it has surely taken and what it may have taken.

use super::Violation;
use node_core::duties::router::{FailReason, HoldCause};

fn misreported(node: &str, what: &'static str, reported: String, seen: String) -> Violation {
    Violation::Misreported { node: node.to_string(), what, reported, seen }
}

/// A router's figures, as it reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterFigures {
    pub held: usize,
    pub oldest_held_ms: Option<u64>,
    pub in_flight: usize,
    pub requests: usize,
    pub samples: u64,
    pub mismatches: u64,
    pub stale: u64,
}

/// What the simulator saw of one router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterSeen {
    pub now_ms: u64,
    /// Requests neither forwarded nor answered that arrived before now (surely taken).
    pub held_taken: usize,
    /// The same, with those that arrived at this instant (maybe not yet taken).
    pub held_all: usize,
    /// When the oldest of the surely taken held requests arrived.
    pub oldest_taken_ms: Option<u64>,
    pub in_flight: usize,
    /// Client requests not yet answered: surely taken, and all.
    pub open_taken: usize,
    pub open_all: usize,
    /// Mirrors sent whose answer the router does not have yet.
    pub mirrors_pending: usize,
    /// Conclusive comparisons, mismatches among them, and inconclusive ones, of this incarnation.
    pub samples: u64,
    pub mismatches: u64,
    pub stale: u64,
}

/// One figure: whether it is right, what it is, and (for a violation only) its two texts.
type Check<'a> = (bool, &'static str, &'a dyn Fn() -> (String, String));

pub fn router(name: &str, got: RouterFigures, seen: RouterSeen) -> Vec<Violation> {
    let requests_max = seen.open_all + seen.mirrors_pending;
    let oldest_ok = match seen.oldest_taken_ms {
        Some(at) => got.oldest_held_ms == Some(at),
        None => {
            got.oldest_held_ms.is_none_or(|at| at == seen.now_ms) && (got.oldest_held_ms.is_some() == (got.held > 0))
        }
    };
    let counts = (got.samples, got.mismatches, got.stale);
    let seen_counts = (seen.samples, seen.mismatches, seen.stale);
    // Checked on every input a router handles: the texts are built only for a violation.
    let checks: [Check; 5] = [
        ((seen.held_taken..=seen.held_all).contains(&got.held), "requests held", &|| {
            (got.held.to_string(), format!("{}..={}", seen.held_taken, seen.held_all))
        }),
        (oldest_ok, "oldest held request", &|| {
            (format!("{:?}", got.oldest_held_ms), format!("{:?}", seen.oldest_taken_ms))
        }),
        (got.in_flight == seen.in_flight, "requests in flight", &|| {
            (got.in_flight.to_string(), seen.in_flight.to_string())
        }),
        ((seen.open_taken..=requests_max).contains(&got.requests), "requests tracked", &|| {
            (got.requests.to_string(), format!("{}..={requests_max}", seen.open_taken))
        }),
        (counts == seen_counts, "validation counts (samples, mismatches, inconclusive)", &|| {
            (format!("{counts:?}"), format!("{seen_counts:?}"))
        }),
    ];
    checks
        .into_iter()
        .filter(|(ok, _, _)| !ok)
        .map(|(_, what, texts)| {
            let (reported, seen) = texts();
            misreported(name, what, reported, seen)
        })
        .collect()
}

/// A router answered a client 503 for `reason`. `held_others`: requests it may hold besides
/// this one; `held_ms`: how long this one waited.
pub fn fail_reason(
    name: &str,
    reason: FailReason,
    held_others: usize,
    hold_queue_max: usize,
    held_ms: u64,
    hold_ms_max: u64,
    retired: bool,
) -> Option<Violation> {
    let (ok, seen) = match reason {
        FailReason::Retired => (retired, format!("retired on disk: {retired}")),
        FailReason::HoldQueueFull => (held_others >= hold_queue_max, format!("{held_others} others held")),
        FailReason::HoldTimeout => (held_ms >= hold_ms_max, format!("held {held_ms} ms")),
    };
    (!ok).then(|| misreported(name, "reason for a 503", format!("{reason:?}"), seen))
}

/// How a router booted: on its own disk or not, and whether that disk held a freeze.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Booted {
    pub own_disk: bool,
    pub disk_frozen: bool,
}

/// A router, booted as `booted` says, released a held request for `cause`, having acted in this
/// incarnation on `serving_acts` decisions that serve a universe and `freeze_acts` freezes. A
/// startup hold (on its own disk: `Boot`; without: `Startup`) ends at the first decision that
/// serves (or times out before); a freeze hold needs a freeze, acted on or on its own disk.
pub fn hold_cause(
    name: &str,
    cause: HoldCause,
    booted: Booted,
    serving_acts: u32,
    freeze_acts: u32,
) -> Option<Violation> {
    let Booted { own_disk, disk_frozen } = booted;
    let ok = match cause {
        HoldCause::Startup => serving_acts <= 1 && !own_disk,
        HoldCause::Boot => serving_acts <= 1 && own_disk && !disk_frozen,
        HoldCause::Freeze => freeze_acts >= 1 || (own_disk && disk_frozen),
    };
    let disk = if own_disk { "on its own disk" } else { "without disk state of its own" };
    let seen = format!("booted {disk}; {serving_acts} serving decisions and {freeze_acts} freezes acted on");
    (!ok).then(|| misreported(name, "cause of a hold", format!("{cause:?}"), seen))
}

/// What a store says about itself, and what the simulator did to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreFigures {
    pub fenced: bool,
    pub snapshots_open: usize,
    pub changes_kept: u64,
}

pub fn store(name: &str, got: StoreFigures, seen: StoreFigures) -> Option<Violation> {
    (got != seen).then(|| misreported(name, "old store's state", format!("{got:?}"), format!("{seen:?}")))
}

/// A data node's transform checkpoint: the new store's, or the one of a batch on its way there.
pub fn checkpoint<C: PartialEq + std::fmt::Debug>(
    name: &str,
    got: Option<&C>,
    store: &C,
    applying: Option<&C>,
) -> Option<Violation> {
    let ok = got == Some(store) || (applying.is_some() && got == applying);
    (!ok).then(|| {
        misreported(name, "transform checkpoint", format!("{got:?}"), format!("{store:?} (applying {applying:?})"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen() -> RouterSeen {
        RouterSeen {
            now_ms: 100,
            held_taken: 2,
            held_all: 3,
            oldest_taken_ms: Some(40),
            in_flight: 1,
            open_taken: 5,
            open_all: 6,
            mirrors_pending: 1,
            samples: 3,
            mismatches: 1,
            stale: 2,
        }
    }

    fn figures() -> RouterFigures {
        RouterFigures {
            held: 2,
            oldest_held_ms: Some(40),
            in_flight: 1,
            requests: 6,
            samples: 3,
            mismatches: 1,
            stale: 2,
        }
    }

    #[test]
    fn router_figures_within_what_was_seen_pass() {
        assert_eq!(router("r", figures(), seen()), vec![]);
        assert_eq!(router("r", RouterFigures { held: 3, requests: 7, ..figures() }, seen()), vec![]);
        let nothing_taken = RouterSeen { held_taken: 0, held_all: 1, oldest_taken_ms: None, ..seen() };
        let fresh = RouterFigures { held: 1, oldest_held_ms: Some(100), ..figures() };
        assert_eq!(router("r", fresh, nothing_taken), vec![]);
        let idle = RouterFigures { held: 0, oldest_held_ms: None, ..figures() };
        assert_eq!(router("r", idle, nothing_taken), vec![]);
    }

    #[test]
    fn each_wrong_router_figure_is_a_violation() {
        let what = |got: RouterFigures| -> Vec<&'static str> {
            router("r", got, seen())
                .into_iter()
                .map(|v| match v {
                    Violation::Misreported { what, .. } => what,
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(what(RouterFigures { held: 0, ..figures() }), ["requests held"]);
        assert_eq!(what(RouterFigures { oldest_held_ms: None, ..figures() }), ["oldest held request"]);
        assert_eq!(what(RouterFigures { in_flight: 0, ..figures() }), ["requests in flight"]);
        assert_eq!(what(RouterFigures { requests: 8, ..figures() }), ["requests tracked"]);
        assert_eq!(what(RouterFigures { requests: 4, ..figures() }), ["requests tracked"]);
        assert_eq!(what(RouterFigures { stale: 0, ..figures() }).len(), 1);
        let nothing_taken = RouterSeen { held_taken: 0, held_all: 0, oldest_taken_ms: None, ..seen() };
        let phantom = RouterFigures { held: 0, oldest_held_ms: Some(100), ..figures() };
        assert_eq!(router("r", phantom, nothing_taken).len(), 1, "an oldest held request with none held");
    }

    #[test]
    fn reasons_and_causes_must_match_what_happened() {
        assert_eq!(fail_reason("r", FailReason::HoldQueueFull, 5, 5, 0, 1000, false), None);
        assert!(fail_reason("r", FailReason::HoldQueueFull, 4, 5, 0, 1000, false).is_some());
        assert_eq!(fail_reason("r", FailReason::HoldTimeout, 0, 5, 1000, 1000, false), None);
        assert!(fail_reason("r", FailReason::HoldTimeout, 0, 5, 999, 1000, false).is_some());
        assert_eq!(fail_reason("r", FailReason::Retired, 0, 5, 0, 1000, true), None);
        assert!(fail_reason("r", FailReason::Retired, 0, 5, 0, 1000, false).is_some());
        let fresh = Booted { own_disk: false, disk_frozen: false };
        let own = Booted { own_disk: true, disk_frozen: false };
        let own_frozen = Booted { own_disk: true, disk_frozen: true };
        assert_eq!(hold_cause("r", HoldCause::Startup, fresh, 1, 0), None);
        assert!(
            hold_cause("r", HoldCause::Startup, fresh, 2, 1).is_some(),
            "a second serving decision ends no startup hold"
        );
        assert!(hold_cause("r", HoldCause::Startup, own, 1, 0).is_some(), "its own disk: no wait for the coordinator");
        assert_eq!(hold_cause("r", HoldCause::Boot, own, 1, 0), None);
        assert!(hold_cause("r", HoldCause::Boot, fresh, 1, 0).is_some(), "a boot hold without its own disk");
        assert_eq!(hold_cause("r", HoldCause::Freeze, fresh, 1, 1), None);
        assert_eq!(hold_cause("r", HoldCause::Freeze, own_frozen, 1, 0), None, "a freeze on its own disk");
        assert!(hold_cause("r", HoldCause::Freeze, own, 0, 0).is_some(), "a freeze hold without a freeze");
    }

    #[test]
    fn stores_and_checkpoints_must_match_what_was_done() {
        let s = StoreFigures { fenced: true, snapshots_open: 1, changes_kept: 3 };
        assert_eq!(store("db", s, s), None);
        assert!(store("db", StoreFigures { fenced: false, ..s }, s).is_some());
        assert!(store("db", StoreFigures { snapshots_open: 0, ..s }, s).is_some());
        assert!(store("db", StoreFigures { changes_kept: 4, ..s }, s).is_some());
        assert_eq!(checkpoint("db", Some(&3), &3, None), None);
        assert_eq!(checkpoint("db", Some(&4), &3, Some(&4)), None, "a batch on its way");
        assert!(checkpoint("db", Some(&4), &3, None).is_some());
        assert!(checkpoint::<u8>("db", None, &3, None).is_some());
    }
}
