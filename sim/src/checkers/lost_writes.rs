//! No lost writes, no phantom writes: at the end, every write acknowledged to a client is in
//! the universe that serves (transformed), and no write a client was told failed is anywhere.
//! Judged from the client oracle (timed-out writes are unknown and may go either way).

use super::Violation;
use crate::oracle::{ClientOutcome, Oracle};
use protocol::Universe;

/// What the stores hold of one user at the end.
#[derive(Clone, Debug, Default)]
pub struct UserSeen {
    pub in_old: bool,
    /// The user's row in the new universe (`users`).
    pub in_new: bool,
    /// Every new-universe row of the user (`users` and `user_profiles`).
    pub complete_in_new: bool,
    /// The user's bio in the universe that serves.
    pub bio: Option<String>,
}

/// Checks the oracle against the final stores; `seen` looks a user up.
pub fn check(oracle: &Oracle, serving: Universe, seen: impl Fn(i64) -> UserSeen) -> Vec<Violation> {
    let mut found = Vec::new();
    let mut lost = Vec::new();
    let mut phantom = Vec::new();
    for (id, outcome) in &oracle.registrations {
        let user = seen(*id);
        let present = if serving == Universe::New { user.complete_in_new } else { user.in_old };
        match outcome {
            ClientOutcome::Acked if !present => lost.push(*id),
            ClientOutcome::Failed if user.in_old || user.in_new => phantom.push(*id),
            _ => {}
        }
    }
    if !lost.is_empty() {
        found.push(Violation::LostWrites { universe: serving, users: lost });
    }
    if !phantom.is_empty() {
        let what = format!("registrations reported failed are present: {:?}", &phantom[..phantom.len().min(10)]);
        found.push(Violation::PhantomWrite { what });
    }
    for (id, updates) in &oracle.bio_updates {
        let Some(bio) = seen(*id).bio else { continue };
        if updates.iter().any(|(b, o)| *b == bio && *o == ClientOutcome::Failed) {
            let what = format!("user {id} has bio {bio} from an update reported failed");
            found.push(Violation::PhantomWrite { what });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_missing_is_lost_and_failed_present_is_a_phantom() {
        let mut oracle = Oracle::default();
        oracle.registrations.insert(1, ClientOutcome::Acked);
        oracle.registrations.insert(2, ClientOutcome::Failed);
        oracle.registrations.insert(3, ClientOutcome::Unknown);
        oracle.bio_updates.insert(4, vec![("x".into(), ClientOutcome::Failed)]);
        let seen = |id| match id {
            2 => UserSeen { in_old: true, ..UserSeen::default() },
            3 => UserSeen { in_new: true, complete_in_new: true, ..UserSeen::default() },
            4 => UserSeen { bio: Some("x".into()), ..UserSeen::default() },
            _ => UserSeen::default(),
        };
        let found = check(&oracle, Universe::New, seen);
        assert!(
            matches!(&found[..], [
            Violation::LostWrites { users, .. },
            Violation::PhantomWrite { .. },
            Violation::PhantomWrite { .. },
        ] if users == &vec![1]),
            "{found:?}"
        );
        assert!(check(&Oracle::default(), Universe::Old, |_| UserSeen::default()).is_empty());
    }
}
