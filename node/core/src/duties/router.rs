//! Route: the ingress router's switch logic (admit / hold / flip / release / fail closed).
//!
//! The router acts only on committed decisions handed to it by the agent. While frozen (or
//! after a restart, until the agent has read the current decision) it holds new requests in a
//! bounded queue for at most `hold_ms_max`, then fails them with 503 + Retry-After: it never
//! guesses. It acks `Frozen` once nothing it admitted to the old universe is still in flight.
//!
//! A request in flight cannot keep a freeze waiting for long: once frozen, the router ends a
//! request on a long route (a stream, a long poll) at once, and any other once it has been in
//! flight for `inflight_ms_max`. Its client is told the outcome is unknown (the universe may still
//! act on it: what it writes there after the data tier's fence is refused), and the router no
//! longer waits for it.

use protocol::messages::Ack;
use protocol::{Decision, Epoch, Generation};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// A client request's id, unique per router.
pub type RequestId = u64;

/// Deliberately broken variants, to prove the simulator's checkers catch them.
#[cfg(feature = "planted-bugs")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterBug {
    /// When a hold times out, release held requests to the old universe instead of failing them.
    ReleaseOldOnTimeout,
    /// Ack `Frozen` at once, with requests to the old universe still in flight.
    AckFrozenWithInFlight,
}

/// Router limits.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub hold_ms_max: u64,
    pub hold_queue_max: usize,
    /// Longest a request in flight keeps a freeze waiting (then it is ended).
    pub inflight_ms_max: u64,
    /// Retry-After sent with a 503.
    pub retry_after_ms: u64,
}

/// Inputs to the router core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouterInput {
    /// A client request arrived; `long` if on a route the plan names long (ended at once at a
    /// freeze).
    Request { id: RequestId, read_only: bool, long: bool },
    /// A forwarded request finished (answered, failed or timed out), ended or not.
    Completed { id: RequestId },
    /// A committed decision to act on, of an upgrade from generation `base`.
    Decision { decision: Decision, base: Generation },
    /// Whether read-only requests are mirrored to the new universe (during Syncing).
    Mirroring(bool),
    /// Time passed (expires holds): the shell calls at [`RouterCore::next_deadline_ms`].
    Tick,
    /// The node restarted on its own disk. Until it acts on the decision there (once its boot
    /// record is durable, a local write), what it holds waits for its disk, not the coordinator;
    /// with a freeze on its disk (`frozen`), what it holds waits for that freeze's outcome.
    OwnDisk { frozen: bool },
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouterOutput {
    /// Send the request to this generation (absolute: never "old" or "new" of some upgrade).
    Forward { id: RequestId, generation: Generation },
    /// Send a copy of a read-only request to the upgrade's new universe for validation.
    Mirror { id: RequestId },
    /// Answer 503 with Retry-After.
    Fail { id: RequestId, retry_after_ms: u64, reason: FailReason },
    /// Tell the coordinator (via the agent).
    Ack { epoch: Epoch, ack: Ack },
    /// A held request was released (forwarded or failed) after `held_ms`.
    Released { id: RequestId, held_ms: u64, cause: HoldCause },
    /// A request in flight was ended at a freeze after `in_flight_ms`: its client is told the
    /// outcome is unknown, and the router no longer waits for it (its `Completed` comes later).
    Ended { id: RequestId, in_flight_ms: u64 },
}

/// Why a request was held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldCause {
    /// The router was frozen for a switch.
    Freeze,
    /// The router had not yet read the current decision (after a start or restart without disk
    /// state of its own: it waits for the coordinator).
    Startup,
    /// The router restarted on its own disk and was writing its boot record (it then serves from
    /// its disk without the coordinator).
    Boot,
}

/// Why a request was failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailReason {
    HoldTimeout,
    HoldQueueFull,
    /// The router is retired: it serves nothing, ever.
    Retired,
}

/// Where the router stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Restarted, decision not yet read: hold.
    Unknown,
    Serving(Generation),
    Frozen(Epoch),
    /// Off the roster: every request fails.
    Retired,
}

#[derive(Clone, Copy, Debug)]
struct Flight {
    since_ms: u64,
    long: bool,
}

#[derive(Clone, Copy, Debug)]
struct Held {
    id: RequestId,
    since_ms: u64,
    cause: HoldCause,
    long: bool,
}

/// The router core.
#[derive(Clone, Debug)]
pub struct RouterCore {
    config: RouterConfig,
    mode: Mode,
    held: VecDeque<Held>,
    /// Forwarded and not finished. Every generation counts: the one a freeze stops may be the
    /// previous upgrade's new one, and nothing may be left in flight there when it acks.
    in_flight: BTreeMap<RequestId, Flight>,
    /// Ended at a freeze, their `Completed` still to come.
    ended: BTreeSet<RequestId>,
    frozen_acked: Option<Epoch>,
    mirroring: bool,
    /// Why requests are held before the first decision.
    startup_cause: HoldCause,
    /// The generation the last decision's upgrade upgrades from.
    last_base: Generation,
    /// Retired, and acked once nothing was in flight to the old universe any more.
    retired_acked: bool,
    #[cfg(feature = "planted-bugs")]
    bug: Option<RouterBug>,
}

impl RouterCore {
    /// A router that has not yet read a decision (holds everything).
    pub fn new(config: RouterConfig) -> Self {
        assert!(
            config.hold_ms_max > 0 && config.hold_queue_max > 0 && config.inflight_ms_max > 0,
            "router limits must be positive"
        );
        RouterCore {
            config,
            mode: Mode::Unknown,
            held: VecDeque::new(),
            in_flight: BTreeMap::new(),
            ended: BTreeSet::new(),
            last_base: Generation::GENESIS,
            frozen_acked: None,
            mirroring: false,
            startup_cause: HoldCause::Startup,
            retired_acked: false,
            #[cfg(feature = "planted-bugs")]
            bug: None,
        }
    }

    /// The same core with a planted bug (simulator only).
    #[cfg(feature = "planted-bugs")]
    pub fn with_bug(mut self, bug: Option<RouterBug>) -> Self {
        self.bug = bug;
        self
    }

    /// When the oldest held request's hold expires, or (frozen, not yet acked) the oldest
    /// request in flight is to be ended: the shell must call by then.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let hold = self.held.front().map(|h| h.since_ms + self.config.hold_ms_max);
        let end = self.waiting_for_flights().then(|| self.in_flight.values().map(|f| f.since_ms).min()).flatten();
        [hold, end.map(|since| since + self.config.inflight_ms_max)].into_iter().flatten().min()
    }

    /// Frozen and not yet acked: requests in flight keep the ack waiting.
    fn waiting_for_flights(&self) -> bool {
        matches!(self.mode, Mode::Frozen(e) if self.frozen_acked != Some(e))
    }

    /// Limits from now on (a plan's, from the coordinator's view): new holds and the deadlines
    /// of those held and in flight are counted with them.
    pub fn set_limits(&mut self, hold_ms_max: u64, hold_queue_max: usize, inflight_ms_max: u64) {
        assert!(hold_ms_max > 0 && hold_queue_max > 0 && inflight_ms_max > 0, "router limits must be positive");
        self.config.hold_ms_max = hold_ms_max;
        self.config.hold_queue_max = hold_queue_max;
        self.config.inflight_ms_max = inflight_ms_max;
    }

    /// The limits in force: (`hold_ms_max`, `hold_queue_max`, `inflight_ms_max`).
    pub fn limits(&self) -> (u64, usize, u64) {
        (self.config.hold_ms_max, self.config.hold_queue_max, self.config.inflight_ms_max)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Arrival time of the oldest held request.
    pub fn oldest_held_ms(&self) -> Option<u64> {
        self.held.front().map(|h| h.since_ms)
    }

    /// Whether `id` was ended at a freeze and its `Completed` is still to come.
    pub fn is_ended(&self, id: RequestId) -> bool {
        self.ended.contains(&id)
    }

    /// Requests forwarded and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn handle(&mut self, now_ms: u64, input: RouterInput) -> Vec<RouterOutput> {
        let mut out = Vec::new();
        match input {
            RouterInput::Request { id, read_only, long } => match self.mode {
                Mode::Serving(generation) => self.forward(now_ms, id, generation, read_only, long, &mut out),
                Mode::Retired => out.push(RouterOutput::Fail {
                    id,
                    retry_after_ms: self.config.retry_after_ms,
                    reason: FailReason::Retired,
                }),
                Mode::Frozen(_) | Mode::Unknown => {
                    if self.held.len() >= self.config.hold_queue_max {
                        out.push(RouterOutput::Fail {
                            id,
                            retry_after_ms: self.config.retry_after_ms,
                            reason: FailReason::HoldQueueFull,
                        });
                    } else {
                        let cause = if self.mode == Mode::Unknown { self.startup_cause } else { HoldCause::Freeze };
                        self.held.push_back(Held { id, since_ms: now_ms, cause, long });
                    }
                }
            },
            RouterInput::Completed { id } => {
                let was_in_flight = self.in_flight.remove(&id).is_some() || self.ended.remove(&id);
                assert!(was_in_flight, "request {id} completed but was never forwarded");
            }
            RouterInput::Decision { decision, base } => self.decide(now_ms, decision, base, &mut out),
            RouterInput::Mirroring(on) => self.mirroring = on,
            RouterInput::Tick => {
                self.expire(now_ms, &mut out);
                self.end_flights(now_ms, &mut out);
            }
            RouterInput::OwnDisk { frozen } => {
                assert_eq!(self.mode, Mode::Unknown, "told of its own disk after acting on a decision");
                self.startup_cause = if frozen { HoldCause::Freeze } else { HoldCause::Boot };
            }
        }
        self.maybe_ack_frozen(&mut out);
        // Retired once nothing is in flight to the old universe: after the ack, the others may
        // switch without this router, so it must have nothing left that could land there.
        if self.mode == Mode::Retired && !self.retired_acked && self.in_flight.is_empty() {
            self.retired_acked = true;
            out.push(RouterOutput::Ack { epoch: Epoch(0), ack: Ack::Retired });
        }
        out
    }

    fn forward(
        &mut self,
        now_ms: u64,
        id: RequestId,
        generation: Generation,
        read_only: bool,
        long: bool,
        out: &mut Vec<RouterOutput>,
    ) {
        self.in_flight.insert(id, Flight { since_ms: now_ms, long });
        out.push(RouterOutput::Forward { id, generation });
        // The composition core says when to mirror: while the upgrade syncs, and this router
        // serves the generation it upgrades from.
        if read_only && self.mirroring {
            out.push(RouterOutput::Mirror { id });
        }
    }

    fn decide(&mut self, now_ms: u64, decision: Decision, base: Generation, out: &mut Vec<RouterOutput>) {
        assert!(self.mode != Mode::Retired, "a retired router acts on nothing ({decision:?})");
        self.last_base = base;
        match decision {
            Decision::Freeze(epoch) => {
                self.mode = Mode::Frozen(epoch);
                self.end_flights(now_ms, out);
            }
            Decision::Retired => {
                self.mode = Mode::Retired;
                self.mirroring = false;
                while let Some(h) = self.held.pop_front() {
                    out.push(RouterOutput::Released { id: h.id, held_ms: now_ms - h.since_ms, cause: h.cause });
                    out.push(RouterOutput::Fail {
                        id: h.id,
                        retry_after_ms: self.config.retry_after_ms,
                        reason: FailReason::Retired,
                    });
                }
            }
            Decision::Initial | Decision::Abort(_) | Decision::Commit(_) => {
                let generation = decision.serving_generation(base).expect("these decisions serve a generation");
                self.mode = Mode::Serving(generation);
                while let Some(h) = self.held.pop_front() {
                    out.push(RouterOutput::Released { id: h.id, held_ms: now_ms - h.since_ms, cause: h.cause });
                    // Held requests are released as if new: read-only flags are not kept, so
                    // they are not mirrored.
                    self.forward(now_ms, h.id, generation, false, h.long, out);
                }
                if let Decision::Commit(epoch) = decision {
                    out.push(RouterOutput::Ack { epoch, ack: Ack::Switched });
                }
            }
        }
    }

    fn expire(&mut self, now_ms: u64, out: &mut Vec<RouterOutput>) {
        while let Some(h) = self.held.front().copied() {
            if now_ms < h.since_ms + self.config.hold_ms_max {
                break;
            }
            self.held.pop_front();
            out.push(RouterOutput::Released { id: h.id, held_ms: now_ms - h.since_ms, cause: h.cause });
            #[cfg(feature = "planted-bugs")]
            if self.bug == Some(RouterBug::ReleaseOldOnTimeout) {
                self.forward(now_ms, h.id, self.last_base, false, h.long, out);
                continue;
            }
            out.push(RouterOutput::Fail {
                id: h.id,
                retry_after_ms: self.config.retry_after_ms,
                reason: FailReason::HoldTimeout,
            });
        }
    }

    /// Frozen and not yet acked: ends the requests in flight on long routes, and those in flight
    /// for `inflight_ms_max` (then the ack may go).
    fn end_flights(&mut self, now_ms: u64, out: &mut Vec<RouterOutput>) {
        if !self.waiting_for_flights() {
            return;
        }
        let inflight_ms_max = self.config.inflight_ms_max;
        let ending: Vec<(RequestId, Flight)> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.long || now_ms >= f.since_ms + inflight_ms_max)
            .map(|(id, f)| (*id, *f))
            .collect();
        for (id, flight) in ending {
            self.in_flight.remove(&id);
            self.ended.insert(id);
            out.push(RouterOutput::Ended { id, in_flight_ms: now_ms - flight.since_ms });
        }
    }

    fn maybe_ack_frozen(&mut self, out: &mut Vec<RouterOutput>) {
        if let Mode::Frozen(epoch) = self.mode {
            #[cfg(feature = "planted-bugs")]
            let quiet = self.in_flight.is_empty() || self.bug == Some(RouterBug::AckFrozenWithInFlight);
            #[cfg(not(feature = "planted-bugs"))]
            let quiet = self.in_flight.is_empty();
            if quiet && self.frozen_acked != Some(epoch) {
                self.frozen_acked = Some(epoch);
                out.push(RouterOutput::Ack { epoch, ack: Ack::Frozen });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G1: Generation = Generation(1);
    const G2: Generation = Generation(2);

    fn router() -> RouterCore {
        RouterCore::new(RouterConfig {
            hold_ms_max: 100,
            hold_queue_max: 2,
            inflight_ms_max: 1_000,
            retry_after_ms: 1000,
        })
    }

    fn forwards(out: &[RouterOutput]) -> Vec<(RequestId, Generation)> {
        out.iter()
            .filter_map(
                |o| if let RouterOutput::Forward { id, generation } = o { Some((*id, *generation)) } else { None },
            )
            .collect()
    }

    #[test]
    fn only_reads_to_the_old_universe_are_mirrored_and_old_requests_are_counted_until_done() {
        let mut r = router();
        r.handle(0, RouterInput::Decision { decision: Decision::Initial, base: G1 });
        let out = r.handle(1, RouterInput::Request { id: 1, read_only: true, long: false });
        assert_eq!(out, vec![RouterOutput::Forward { id: 1, generation: G1 }], "not mirroring yet");
        r.handle(2, RouterInput::Mirroring(true));
        let out = r.handle(3, RouterInput::Request { id: 2, read_only: false, long: false });
        assert_eq!(out, vec![RouterOutput::Forward { id: 2, generation: G1 }], "writes are never mirrored");
        assert_eq!(r.in_flight(), 2);
        r.handle(4, RouterInput::Completed { id: 1 });
        assert_eq!(r.in_flight(), 1);
    }

    /// Upgrade after upgrade: the generation the next freeze stops is the last switch's new
    /// one, and a request in flight there keeps the router from acking `Frozen` all the same.
    #[test]
    fn the_next_upgrade_freezes_the_generation_the_last_one_switched_to() {
        let mut r = router();
        r.handle(0, RouterInput::Decision { decision: Decision::Commit(Epoch(1)), base: G1 });
        assert_eq!(
            forwards(&r.handle(1, RouterInput::Request { id: 1, read_only: false, long: false })),
            vec![(1, G2)]
        );
        let out = r.handle(2, RouterInput::Decision { decision: Decision::Freeze(Epoch(2)), base: G2 });
        assert!(out.is_empty(), "request 1 still in flight to g2: no ack yet");
        assert_eq!(
            r.handle(3, RouterInput::Completed { id: 1 }),
            vec![RouterOutput::Ack { epoch: Epoch(2), ack: Ack::Frozen }]
        );
        r.handle(4, RouterInput::Request { id: 2, read_only: false, long: false });
        let out = r.handle(5, RouterInput::Decision { decision: Decision::Commit(Epoch(2)), base: G2 });
        assert_eq!(forwards(&out), vec![(2, Generation(3))]);
    }

    #[test]
    fn restarted_router_holds_until_it_knows() {
        let mut r = router();
        assert!(r.handle(0, RouterInput::Request { id: 1, read_only: false, long: false }).is_empty());
        assert!(r.handle(4, RouterInput::Request { id: 2, read_only: false, long: false }).is_empty());
        assert_eq!((r.held(), r.oldest_held_ms()), (2, Some(0)));
        let out = r.handle(10, RouterInput::Decision { decision: Decision::Initial, base: G1 });
        assert_eq!(forwards(&out), vec![(1, G1), (2, G1)]);
        assert!(out.contains(&RouterOutput::Released { id: 1, held_ms: 10, cause: HoldCause::Startup }));
        assert_eq!((r.held(), r.oldest_held_ms()), (0, None));
    }

    #[test]
    fn freeze_waits_for_in_flight_then_acks_and_commit_flips() {
        let mut r = router();
        r.handle(0, RouterInput::Decision { decision: Decision::Initial, base: G1 });
        r.handle(0, RouterInput::Mirroring(true));
        let out = r.handle(1, RouterInput::Request { id: 1, read_only: true, long: false });
        assert_eq!(out, vec![RouterOutput::Forward { id: 1, generation: G1 }, RouterOutput::Mirror { id: 1 }]);
        let out = r.handle(2, RouterInput::Decision { decision: Decision::Freeze(Epoch(1)), base: G1 });
        assert!(out.is_empty(), "request 1 still in flight: no ack yet");
        assert!(r.handle(3, RouterInput::Request { id: 2, read_only: false, long: false }).is_empty(), "held");
        let out = r.handle(4, RouterInput::Completed { id: 1 });
        assert_eq!(out, vec![RouterOutput::Ack { epoch: Epoch(1), ack: Ack::Frozen }]);
        let out = r.handle(50, RouterInput::Decision { decision: Decision::Commit(Epoch(1)), base: G1 });
        assert_eq!(forwards(&out), vec![(2, G2)]);
        assert!(out.contains(&RouterOutput::Released { id: 2, held_ms: 47, cause: HoldCause::Freeze }));
        assert!(out.contains(&RouterOutput::Ack { epoch: Epoch(1), ack: Ack::Switched }));
        assert_eq!(
            forwards(&r.handle(51, RouterInput::Request { id: 3, read_only: true, long: false })),
            vec![(3, G2)]
        );
    }

    #[test]
    fn a_freeze_ends_long_requests_at_once_and_others_after_inflight_ms_max() {
        let mut r = router();
        r.set_limits(100, 2, 30);
        r.handle(0, RouterInput::Decision { decision: Decision::Initial, base: G1 });
        r.handle(1, RouterInput::Request { id: 1, read_only: false, long: true });
        r.handle(5, RouterInput::Request { id: 2, read_only: false, long: false });
        assert_eq!(r.next_deadline_ms(), None, "serving: nothing is ended");
        let out = r.handle(10, RouterInput::Decision { decision: Decision::Freeze(Epoch(1)), base: G1 });
        assert_eq!(out, vec![RouterOutput::Ended { id: 1, in_flight_ms: 9 }], "the long one at once");
        assert_eq!((r.in_flight(), r.next_deadline_ms()), (1, Some(35)), "request 2 at 5 + 30 ms");
        assert!(r.handle(34, RouterInput::Tick).is_empty());
        let out = r.handle(35, RouterInput::Tick);
        assert_eq!(
            out,
            vec![
                RouterOutput::Ended { id: 2, in_flight_ms: 30 },
                RouterOutput::Ack { epoch: Epoch(1), ack: Ack::Frozen }
            ]
        );
        assert_eq!(r.next_deadline_ms(), None, "acked: nothing more to end");
        // Their answers come later, once each.
        assert!(r.handle(40, RouterInput::Completed { id: 1 }).is_empty());
        assert!(r.handle(41, RouterInput::Completed { id: 2 }).is_empty());
    }

    #[test]
    #[should_panic(expected = "completed but was never forwarded")]
    fn an_ended_request_completes_once() {
        let mut r = router();
        r.handle(0, RouterInput::Decision { decision: Decision::Initial, base: G1 });
        r.handle(1, RouterInput::Request { id: 1, read_only: false, long: true });
        r.handle(2, RouterInput::Decision { decision: Decision::Freeze(Epoch(1)), base: G1 });
        r.handle(3, RouterInput::Completed { id: 1 });
        r.handle(4, RouterInput::Completed { id: 1 });
    }

    #[test]
    fn hold_times_out_with_503_and_queue_is_bounded() {
        let mut r = router();
        r.handle(0, RouterInput::Decision { decision: Decision::Freeze(Epoch(1)), base: G1 });
        r.handle(0, RouterInput::Request { id: 1, read_only: false, long: false });
        r.handle(10, RouterInput::Request { id: 2, read_only: false, long: false });
        let out = r.handle(11, RouterInput::Request { id: 3, read_only: false, long: false });
        assert!(matches!(out[0], RouterOutput::Fail { id: 3, reason: FailReason::HoldQueueFull, .. }));
        let out = r.handle(100, RouterInput::Tick);
        assert!(out.iter().any(|o| matches!(o, RouterOutput::Fail { id: 1, reason: FailReason::HoldTimeout, .. })));
        assert!(forwards(&out).is_empty(), "fail closed: never guess");
        assert_eq!(r.held(), 1);
    }

    #[test]
    fn abort_releases_to_old() {
        let mut r = router();
        r.handle(0, RouterInput::Decision { decision: Decision::Freeze(Epoch(1)), base: G1 });
        r.handle(1, RouterInput::Request { id: 1, read_only: false, long: false });
        let out = r.handle(2, RouterInput::Decision { decision: Decision::Abort(Epoch(1)), base: G1 });
        assert_eq!(forwards(&out), vec![(1, G1)]);
    }

    #[test]
    fn the_next_deadline_is_the_oldest_hold_expiry() {
        let mut r = router();
        assert_eq!(r.next_deadline_ms(), None);
        r.handle(0, RouterInput::Decision { decision: Decision::Freeze(Epoch(1)), base: G1 });
        r.handle(7, RouterInput::Request { id: 1, read_only: false, long: false });
        r.handle(9, RouterInput::Request { id: 2, read_only: false, long: false });
        assert_eq!(r.next_deadline_ms(), Some(107));
        let out = r.handle(107, RouterInput::Tick);
        assert!(matches!(
            out[..],
            [RouterOutput::Released { id: 1, held_ms: 100, .. }, RouterOutput::Fail { id: 1, .. }]
        ));
        assert_eq!(r.next_deadline_ms(), Some(109));
    }

    #[cfg(feature = "planted-bugs")]
    #[test]
    fn planted_bug_releases_to_old_on_timeout() {
        let mut r = router().with_bug(Some(RouterBug::ReleaseOldOnTimeout));
        r.handle(0, RouterInput::Decision { decision: Decision::Freeze(Epoch(1)), base: G1 });
        r.handle(0, RouterInput::Request { id: 1, read_only: false, long: false });
        assert_eq!(forwards(&r.handle(100, RouterInput::Tick)), vec![(1, G1)]);
    }
}

#[cfg(test)]
mod properties {
    //! The fail-closed rule over random inputs: a router sends to the old universe only under
    //! `Initial`/`Abort`, to the new one only under `Commit`, acks `Frozen` only with nothing in
    //! flight to the old universe, and never holds past `hold_ms_max` when called at its deadline.

    use super::*;

    const G1: Generation = Generation(1);
    use proptest::prelude::*;

    /// Longest gap between two steps of time.
    const WAIT_MAX_MS: u64 = 20;

    #[derive(Clone, Debug)]
    enum Step {
        Arrive {
            read_only: bool,
        },
        Complete(usize),
        Tick,
        Wait(u64),
        /// Advance the decision: 0 freeze, 1 commit, 2 abort (of the current epoch), 3 next epoch's freeze.
        Decide(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => any::<bool>().prop_map(|read_only| Step::Arrive { read_only }),
            2 => (0usize..64).prop_map(Step::Complete),
            2 => Just(Step::Tick),
            2 => (1u64..=WAIT_MAX_MS).prop_map(Step::Wait),
            1 => (0u8..4).prop_map(Step::Decide),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn router_never_guesses(steps in proptest::collection::vec(step(), 1..200)) {
            let hold_ms_max = 100;
            let mut r = RouterCore::new(RouterConfig { hold_ms_max, hold_queue_max: 8, inflight_ms_max: 1_000, retry_after_ms: 1000 });
            let mut now = 0u64;
            let mut next_id = 0u64;
            let mut decision = Decision::Initial;
            let mut in_flight: Vec<RequestId> = Vec::new();
            let mut acted = false;
            for s in steps {
                let out = match s {
                    Step::Arrive { read_only } => {
                        next_id += 1;
                        r.handle(now, RouterInput::Request { id: next_id, read_only, long: false })
                    }
                    Step::Complete(i) if !in_flight.is_empty() => {
                        let id = in_flight.remove(i % in_flight.len());
                        r.handle(now, RouterInput::Completed { id })
                    }
                    Step::Complete(_) => Vec::new(),
                    Step::Tick => r.handle(now, RouterInput::Tick),
                    Step::Wait(ms) => {
                        // The shell's contract: it calls no later than the core's deadline.
                        now = (now + ms).min(r.next_deadline_ms().unwrap_or(u64::MAX)).max(now);
                        r.handle(now, RouterInput::Tick)
                    }
                    Step::Decide(k) => {
                        let e = decision.epoch();
                        let next = match (decision, k) {
                            (Decision::Initial | Decision::Abort(_), 0 | 3) => Decision::Freeze(Epoch(e.0 + 1)),
                            (Decision::Freeze(e), 1) => Decision::Commit(e),
                            (Decision::Freeze(e), 2) => Decision::Abort(e),
                            _ => decision,
                        };
                        if next == decision && acted {
                            continue;
                        }
                        decision = next;
                        acted = true;
                        r.handle(now, RouterInput::Decision { decision, base: G1 })
                    }
                };
                for o in &out {
                    match o {
                        RouterOutput::Forward { id, generation } => {
                            prop_assert!(acted, "forwarded before reading any decision");
                            prop_assert_eq!(Some(*generation), decision.serving_generation(G1), "forwarded to {:?} under {:?}", generation, decision);
                            in_flight.push(*id);
                        }
                        RouterOutput::Released { held_ms, .. } => prop_assert!(*held_ms <= hold_ms_max, "held {} ms", held_ms),
                        RouterOutput::Ack { epoch, ack: Ack::Frozen } => {
                            prop_assert_eq!(decision, Decision::Freeze(*epoch));
                            prop_assert!(in_flight.is_empty(), "acked Frozen with requests in flight");
                        }
                        _ => {}
                    }
                }
                if let Some(since) = r.oldest_held_ms() {
                    prop_assert!(now - since <= hold_ms_max, "held {} ms", now - since);
                }
            }
        }
    }
}
