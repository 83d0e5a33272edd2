//! Reads agree with acknowledged writes, whichever universe answers: the simulator checks
//! every read a client was answered against the client oracle, not against either universe.
//!
//! - A row whose creation was acknowledged before the read was issued is found.
//! - A value read was written by some client (or loaded before the run), by a write not
//!   reported failed, and it is not *superseded*: no other write of the same row was issued
//!   after it was acknowledged and acknowledged before the read was issued (that write was
//!   applied after it, and before the read).
//! - A counter read lies between the increments acknowledged before the read was issued and
//!   the increments issued before it was answered and not reported failed (an increment applied
//!   twice counts too much).
//! - Every other field is what the application wrote.
//!
//! So a new universe that answers wrongly, a switch that loses acknowledged writes, or a
//! request executed twice shows in the client's own answers, with no trust in the validator.

use super::Violation;
use crate::app::AppOp;
use crate::oracle::{ClientOutcome, Oracle};
use protocol::schema::{Row, Value};

/// Checks the answer `body` to read `op`, issued at `issued_us` and answered at `done_us`.
pub fn check(
    oracle: &Oracle,
    router: &str,
    op: &AppOp,
    body: Option<&Row>,
    issued_us: u64,
    done_us: u64,
) -> Option<Violation> {
    let found = match op {
        AppOp::ViewUser { id } => user(oracle, *id, body, issued_us),
        AppOp::ViewItem { id } => item(oracle, *id, body, issued_us, done_us),
        _ => Ok(()),
    };
    found.err().map(|(stale, what)| {
        let (router, what) = (router.to_string(), format!("{op:?}: {what}"));
        if stale {
            Violation::StaleRead { router, what }
        } else {
            Violation::WrongAnswer { router, what }
        }
    })
}

/// `Err((stale, what))`: stale (an acknowledged write is missing) or wrong (never written).
type Found = Result<(), (bool, String)>;

fn field_is(row: &Row, column: &str, expected: Value) -> Found {
    match row.get(column) {
        Some(v) if *v == expected => Ok(()),
        other => Err((false, format!("{column} is {other:?}, the application wrote {expected:?}"))),
    }
}

fn columns_are(row: &Row, columns: &[&str]) -> Found {
    let mut got: Vec<&str> = row.keys().map(String::as_str).collect();
    got.sort_unstable();
    let mut want = columns.to_vec();
    want.sort_unstable();
    if got == want {
        Ok(())
    } else {
        Err((false, format!("columns {got:?}, expected {want:?}")))
    }
}

fn user(oracle: &Oracle, id: i64, body: Option<&Row>, issued_us: u64) -> Found {
    let log = oracle.users.get(&id);
    let Some(row) = body else {
        if let Some(at) = log.and_then(|l| l.registration()).and_then(|w| w.acked_us()).filter(|at| *at < issued_us) {
            return Err((true, format!("not found, but its registration was acknowledged at {at} µs")));
        }
        return Ok(());
    };
    columns_are(row, &["id", "name", "email", "bio"])?;
    field_is(row, "id", Value::Int(id))?;
    field_is(row, "name", Value::Text(format!("user{id}")))?;
    field_is(row, "email", Value::Text(format!("u{id}@example.org")))?;
    let Some(Value::Text(bio)) = row.get("bio") else {
        return Err((false, format!("bio is {:?}", row.get("bio"))));
    };
    let bios = log.map(|l| &l.bios[..]).unwrap_or_default();
    let Some(written) = bios.iter().find(|b| b.bio == *bio) else {
        return Err((false, format!("bio {bio:?} was never written")));
    };
    if written.write.outcome() == Some(ClientOutcome::Failed) {
        return Err((false, format!("bio {bio:?} is from a write reported failed")));
    }
    if let Some(acked) = written.write.acked_us() {
        if let Some(later) = bios.iter().find(|b| b.write.issued_us > acked && b.write.acked_before(issued_us)) {
            return Err((
                true,
                format!(
                    "bio {bio:?} (acknowledged at {acked} µs) is superseded by {:?}, issued at {} µs and acknowledged before the read",
                    later.bio, later.write.issued_us
                ),
            ));
        }
    }
    Ok(())
}

fn item(oracle: &Oracle, id: i64, body: Option<&Row>, issued_us: u64, done_us: u64) -> Found {
    let log = oracle.items.get(&id);
    let Some(row) = body else {
        if let Some(at) = log.and_then(|l| l.added.as_ref()).and_then(|w| w.acked_us()).filter(|at| *at < issued_us) {
            return Err((true, format!("not found, but it was acknowledged at {at} µs")));
        }
        return Ok(());
    };
    columns_are(row, &["id", "title", "seller", "price", "bids"])?;
    field_is(row, "id", Value::Int(id))?;
    field_is(row, "title", Value::Text(format!("item{id}")))?;
    field_is(row, "seller", Value::Int(id % 7))?;
    field_is(row, "price", Value::Int(100 + id))?;
    let Some(Value::Int(bids)) = row.get("bids") else {
        return Err((false, format!("bids is {:?}", row.get("bids"))));
    };
    let all = log.map(|l| &l.bids[..]).unwrap_or_default();
    let acked = all.iter().filter(|w| w.acked_before(issued_us)).count() as i64;
    let possible =
        all.iter().filter(|w| w.issued_us < done_us && w.outcome() != Some(ClientOutcome::Failed)).count() as i64;
    if *bids < acked {
        return Err((true, format!("{bids} bids, but {acked} were acknowledged before the read")));
    }
    if *bids > possible {
        return Err((false, format!("{bids} bids, but only {possible} were issued and not failed (counted twice?)")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::WriteRef;

    fn user_row(id: i64, bio: &str) -> Row {
        [
            ("id", Value::Int(id)),
            ("name", Value::Text(format!("user{id}"))),
            ("email", Value::Text(format!("u{id}@example.org"))),
            ("bio", Value::Text(bio.into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn item_row(id: i64, bids: i64) -> Row {
        [
            ("id", Value::Int(id)),
            ("title", Value::Text(format!("item{id}"))),
            ("seller", Value::Int(id % 7)),
            ("price", Value::Int(100 + id)),
            ("bids", Value::Int(bids)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[test]
    fn a_read_after_an_acknowledged_write_sees_it() {
        let mut o = Oracle::initial(1, 1);
        let reg = o.issued(&AppOp::RegisterUser { id: 5, name: "n".into(), email: "e".into(), bio: "new5".into() }, 10);
        o.done(reg, ClientOutcome::Acked, 20);
        let view = AppOp::ViewUser { id: 5 };
        assert!(matches!(check(&o, "r", &view, None, 30, 40), Some(Violation::StaleRead { .. })));
        assert_eq!(check(&o, "r", &view, None, 15, 40), None, "issued before the ack: may miss it");
        assert_eq!(check(&o, "r", &view, Some(&user_row(5, "new5")), 30, 40), None);
        let upd = o.issued(&AppOp::UpdateBio { id: 5, bio: "b1".into() }, 50);
        assert_eq!(check(&o, "r", &view, Some(&user_row(5, "b1")), 55, 56), None, "in flight: may be seen");
        o.done(upd, ClientOutcome::Acked, 60);
        assert!(
            matches!(check(&o, "r", &view, Some(&user_row(5, "new5")), 70, 80), Some(Violation::StaleRead { .. })),
            "superseded by an update acknowledged before the read"
        );
        assert!(matches!(check(&o, "r", &view, Some(&user_row(5, "zz")), 70, 80), Some(Violation::WrongAnswer { .. })));
        let mut wrong = user_row(0, crate::app::INITIAL_BIO);
        wrong.insert("email".into(), Value::Text("x".into()));
        let view0 = AppOp::ViewUser { id: 0 };
        assert!(matches!(check(&o, "r", &view0, Some(&wrong), 70, 80), Some(Violation::WrongAnswer { .. })));
        let failed = o.issued(&AppOp::UpdateBio { id: 0, bio: "f".into() }, 90);
        o.done(failed, ClientOutcome::Failed, 95);
        assert!(matches!(
            check(&o, "r", &view0, Some(&user_row(0, "f")), 99, 100),
            Some(Violation::WrongAnswer { .. })
        ));
    }

    #[test]
    fn a_counter_counts_each_increment_once() {
        let mut o = Oracle::initial(0, 1);
        let bids: Vec<WriteRef> = (0..3).map(|i| o.issued(&AppOp::Bid { item: 0 }, 10 + i)).collect();
        o.done(bids[0], ClientOutcome::Acked, 20);
        o.done(bids[1], ClientOutcome::Failed, 20);
        let view = AppOp::ViewItem { id: 0 };
        assert_eq!(check(&o, "r", &view, Some(&item_row(0, 1)), 30, 40), None);
        assert_eq!(check(&o, "r", &view, Some(&item_row(0, 2)), 30, 40), None, "the third is still unknown");
        assert!(matches!(check(&o, "r", &view, Some(&item_row(0, 0)), 30, 40), Some(Violation::StaleRead { .. })));
        assert!(matches!(check(&o, "r", &view, Some(&item_row(0, 3)), 30, 40), Some(Violation::WrongAnswer { .. })));
    }
}
