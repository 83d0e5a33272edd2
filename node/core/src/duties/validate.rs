//! Validate: compare mirrored responses of the two universes, and checksum data.

use protocol::schema::{Row, Value};
use protocol::Position;

/// A response as observed from one universe: the canonical body (as the client API shows it)
/// and the data position the universe had reached when it answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub body: Option<Row>,
    /// Old universe: last captured position; new universe: last applied position.
    pub position: Position,
}

/// The result of one comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Match,
    Mismatch,
    /// Not a sample: the new universe had not yet applied what the old one answered from, or
    /// had applied more and answered differently (inconclusive).
    Stale,
}

/// Counts comparisons of mirrored read-only requests.
#[derive(Clone, Debug, Default)]
pub struct ValidateCore {
    /// Response fields ignored when comparing (e.g. timestamps).
    pub ignore_fields: Vec<String>,
    pub samples: u64,
    pub mismatches: u64,
    pub stale: u64,
}

impl ValidateCore {
    /// Compares the old universe's answer with the new one's and counts the verdict.
    pub fn compare(&mut self, old: &Observed, new: &Observed) -> Verdict {
        if new.position < old.position {
            self.stale += 1;
            return Verdict::Stale;
        }
        self.samples += 1;
        let strip = |body: &Option<Row>| {
            body.as_ref().map(|row| {
                row.iter()
                    .filter(|(k, _)| !self.ignore_fields.contains(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Row>()
            })
        };
        if strip(&old.body) == strip(&new.body) {
            Verdict::Match
        } else if new.position > old.position {
            self.samples -= 1;
            self.stale += 1;
            Verdict::Stale
        } else {
            self.mismatches += 1;
            Verdict::Mismatch
        }
    }
}

/// A row's hash, for order-independent checksums (summed over rows). FNV-1a over the table,
/// key and every (column, value), then a 64-bit finalizer so that sums of hashes mix well.
pub fn row_hash(table: &str, key: i64, row: &Row) -> u64 {
    let mut h = Fnv::default();
    h.bytes(table.as_bytes());
    h.bytes(&[0xff]);
    h.bytes(&key.to_le_bytes());
    for (column, value) in row {
        h.bytes(column.as_bytes());
        match value {
            Value::Null => h.bytes(&[0]),
            Value::Int(i) => {
                h.bytes(&[1]);
                h.bytes(&i.to_le_bytes())
            }
            Value::Text(t) => {
                h.bytes(&[2]);
                h.bytes(t.as_bytes());
                h.bytes(&[0])
            }
        }
    }
    // splitmix64's finalizer.
    let mut z = h.0;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a, 64 bit: small, deterministic, dependency-free.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &str) -> Option<Row> {
        Some([("name".to_string(), Value::Text(v.into())), ("at".to_string(), Value::Int(1))].into_iter().collect())
    }

    #[test]
    fn compares_counts_and_skips_stale() {
        let mut v = ValidateCore { ignore_fields: vec!["at".into()], ..Default::default() };
        let old = Observed { body: row("a"), position: Position(5) };
        assert_eq!(v.compare(&old, &Observed { body: row("a"), position: Position(4) }), Verdict::Stale);
        assert_eq!(v.compare(&old, &Observed { body: row("a"), position: Position(5) }), Verdict::Match);
        let mut other = row("a");
        other.as_mut().unwrap().insert("at".into(), Value::Int(2));
        assert_eq!(v.compare(&old, &Observed { body: other, position: Position(6) }), Verdict::Match, "ignored field");
        assert_eq!(
            v.compare(&old, &Observed { body: row("b"), position: Position(6) }),
            Verdict::Stale,
            "newer and different: inconclusive"
        );
        assert_eq!(v.compare(&old, &Observed { body: row("b"), position: Position(5) }), Verdict::Mismatch);
        assert_eq!((v.samples, v.mismatches, v.stale), (3, 1, 2));
    }

    #[test]
    fn row_hash_sees_any_difference() {
        let a = row("x").unwrap();
        assert_eq!(row_hash("t", 1, &a), row_hash("t", 1, &a.clone()));
        assert_ne!(row_hash("t", 1, &a), row_hash("t", 1, &row("y").unwrap()));
        assert_ne!(row_hash("t", 1, &a), row_hash("t", 2, &a));
        assert_ne!(row_hash("t", 1, &a), row_hash("u", 1, &a));
    }

    #[test]
    fn fnv_matches_the_published_test_vectors() {
        let fnv = |bytes: &[u8]| {
            let mut h = Fnv::default();
            h.bytes(bytes);
            h.0
        };
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Row hashes are part of the checksum format: a data store that computes checksums
    /// itself (in SQL, in another process or version) must give the same numbers, so the
    /// value for a known row is pinned (checked against an independent implementation of
    /// FNV-1a and splitmix64's finalizer over the same bytes).
    #[test]
    fn a_row_hash_is_stable() {
        let r: Row = [("name".to_string(), Value::Text("ada".into())), ("n".to_string(), Value::Int(-3))]
            .into_iter()
            .chain([("gone".to_string(), Value::Null)])
            .collect();
        assert_eq!(row_hash("users", 42, &r), PINNED_ROW_HASH, "{:#x}", row_hash("users", 42, &r));
    }

    const PINNED_ROW_HASH: u64 = 0xe4e1_78d4_e612_44a0;
}
