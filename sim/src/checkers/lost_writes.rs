//! No lost writes, no phantom writes: at the end, every write acknowledged to a client is in
//! the universe that serves (transformed), and no write a client was told failed is anywhere.
//! Judged from the client oracle (timed-out writes are unknown and may go either way).

use super::Violation;
use crate::oracle::{ClientOutcome, Oracle};
use protocol::Generation;

/// What the stores hold of one user at the end.
#[derive(Clone, Debug, Default)]
pub struct UserSeen {
    /// Every row of the user in the generation that serves.
    pub present: bool,
    /// Any row of the user in any store.
    pub anywhere: bool,
    /// The user's bio in the generation that serves.
    pub bio: Option<String>,
}

/// Checks the oracle against the final stores; `seen` looks a user up.
pub fn check(oracle: &Oracle, serving: Generation, seen: impl Fn(i64) -> UserSeen) -> Vec<Violation> {
    let mut found = Vec::new();
    let mut lost = Vec::new();
    let mut phantom = Vec::new();
    for (id, log) in &oracle.users {
        let user = seen(*id);
        match log.registration().and_then(|w| w.outcome()) {
            Some(ClientOutcome::Acked) if !user.present => lost.push(*id),
            Some(ClientOutcome::Failed) if user.anywhere => phantom.push(*id),
            _ => {}
        }
        let Some(bio) = user.bio else { continue };
        let Some(written) = log.bios.iter().find(|b| b.bio == bio) else {
            found.push(Violation::PhantomWrite { what: format!("user {id} has bio {bio}, which nobody wrote") });
            continue;
        };
        if written.write.outcome() == Some(ClientOutcome::Failed) {
            let what = format!("user {id} has bio {bio} from an update reported failed");
            found.push(Violation::PhantomWrite { what });
        }
        // An update acknowledged after this bio's write was acknowledged, and issued after
        // it, was applied after it: ending on the older bio loses it.
        if let Some(acked) = written.write.acked_us() {
            if log.bios.iter().any(|b| b.write.issued_us > acked && b.write.acked_us().is_some()) {
                lost.push(*id);
            }
        }
    }
    if !lost.is_empty() {
        found.push(Violation::LostWrites { generation: serving, users: lost });
    }
    if !phantom.is_empty() {
        let what = format!("registrations reported failed are present: {:?}", &phantom[..phantom.len().min(10)]);
        found.push(Violation::PhantomWrite { what });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_missing_is_lost_and_failed_present_is_a_phantom() {
        use crate::app::AppOp;
        let mut oracle = Oracle::default();
        let register =
            |id: i64| AppOp::RegisterUser { id, name: "n".into(), email: "e".into(), bio: format!("new{id}") };
        for (id, outcome) in [(1, ClientOutcome::Acked), (2, ClientOutcome::Failed), (3, ClientOutcome::Unknown)] {
            let w = oracle.issued(&register(id), 1);
            oracle.done(w, outcome, 2);
        }
        let w = oracle.issued(&register(4), 1);
        oracle.done(w, ClientOutcome::Acked, 2);
        let w = oracle.issued(&AppOp::UpdateBio { id: 4, bio: "x".into() }, 3);
        oracle.done(w, ClientOutcome::Failed, 4);
        let seen = |id| match id {
            2 => UserSeen { anywhere: true, ..UserSeen::default() },
            3 => UserSeen { anywhere: true, present: true, ..UserSeen::default() },
            4 => UserSeen { anywhere: true, present: true, bio: Some("x".into()) },
            _ => UserSeen::default(),
        };
        let found = check(&oracle, Generation(2), seen);
        assert!(
            matches!(&found[..], [
            Violation::PhantomWrite { .. },
            Violation::LostWrites { users, .. },
            Violation::PhantomWrite { .. },
        ] if users == &vec![1]),
            "{found:?}"
        );
        assert!(check(&Oracle::default(), Generation(1), |_| UserSeen::default()).is_empty());
    }

    #[test]
    fn ending_on_a_superseded_bio_loses_an_update() {
        use crate::app::AppOp;
        let mut oracle = Oracle::initial(1, 0);
        let w = oracle.issued(&AppOp::UpdateBio { id: 0, bio: "later".into() }, 5);
        oracle.done(w, ClientOutcome::Acked, 6);
        let at_end = |bio: &str| {
            let bio = Some(bio.to_string());
            move |_| UserSeen { present: true, anywhere: true, bio: bio.clone() }
        };
        assert!(check(&oracle, Generation(1), at_end("later")).is_empty());
        assert!(matches!(
            &check(&oracle, Generation(1), at_end(crate::app::INITIAL_BIO))[..],
            [Violation::LostWrites { users, .. }] if users == &vec![0]
        ));
    }
}
