//! Roster: a router serves clients only while it is on the roster. One that has not joined
//! (no freeze would wait for it), one that acknowledged its retirement, and one retired by
//! force (the operator asserted it is cut off) answers no client from a universe. Judged from
//! what the simulator saw: the roster as some replica applied it, the `Retired` acks that left
//! the router, the operator's forced retirements.

use super::Violation;

/// Where a router stood when it answered a client from a universe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Standing {
    /// Some replica's applied roster has it active or retiring.
    pub on_roster: bool,
    /// It sent its `Retired` ack.
    pub acked_retired: bool,
    /// The operator retired it by force.
    pub forced: bool,
}

/// `router` answered a client with a universe's answer, standing as `standing` says.
pub fn served(router: &str, standing: Standing) -> Option<Violation> {
    let why = if standing.forced {
        "it was retired by force (cut off)"
    } else if standing.acked_retired {
        "it had acknowledged its retirement"
    } else if !standing.on_roster {
        "no replica has it on the roster"
    } else {
        return None;
    };
    Some(Violation::ServedOffRoster { router: router.to_string(), why: why.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_router_on_the_roster_and_not_retired_may_serve() {
        let on = Standing { on_roster: true, acked_retired: false, forced: false };
        assert_eq!(served("r", on), None);
        assert!(served("r", Standing { on_roster: false, ..on }).is_some());
        assert!(served("r", Standing { acked_retired: true, ..on }).is_some());
        assert!(served("r", Standing { forced: true, ..on }).is_some());
    }
}
