//! A decoder of PostgreSQL's `pgoutput` logical replication messages, protocol version 1.
//!
//! Pure: bytes in, a typed message out. Each message is what one `XLogData` of a replication
//! stream carries, or one row of `pg_logical_slot_peek_binary_changes(…, 'proto_version', '1',
//! 'publication_names', …)`. The format is PostgreSQL's "Logical Replication Message Formats"
//! (chapter 55.9 of the PostgreSQL 15 documentation).
//!
//! Version 1 is all Imago asks for: versions 2 to 4 (PostgreSQL 14 to 16) add the streaming of
//! transactions still in progress and two-phase commit, whose messages carry a transaction id
//! before their body. Imago reads committed transactions only, so it asks for version 1 and
//! refuses the others' messages ([`DecodeError::Unsupported`]) rather than misread them.
//!
//! [`decode`] never panics: a truncated message, an unknown tag, a length past the end, a name
//! that is not UTF-8 or bytes after the end are each a [`DecodeError`] naming the field and its
//! offset. Column values stay bytes ([`Value`]): they are in the server's text (or binary) format
//! and the consumer knows their types from the [`Relation`].

use std::fmt;
use std::str::FromStr;

/// A position in PostgreSQL's write-ahead log. Displays and parses as PostgreSQL writes it:
/// `X/Y`, the high and low 32 bits in upper-case hex (`16/B374D848`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// An LSN that is not `X/Y` with one to eight hex digits on each side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an LSN (X/Y in hex): {0:?}")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (high, low) = s.split_once('/').ok_or_else(err)?;
        let half = |part: &str| -> Result<u64, ParseLsnError> {
            // from_str_radix alone would take a sign.
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u64::from_str_radix(part, 16).map_err(|_| err())
        };
        Ok(Lsn(half(high)? << 32 | half(low)?))
    }
}

/// One `pgoutput` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutput {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(Type),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(Message),
}

/// 'B': a transaction's changes follow, up to its [`Commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// Where the transaction's commit record is (the [`Commit::commit_lsn`] to come).
    pub final_lsn: Lsn,
    /// Commit time, in microseconds since 2000-01-01 00:00 UTC (PostgreSQL's epoch).
    pub commit_time_micros: i64,
    pub xid: u32,
}

/// 'C': the end of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Unused by PostgreSQL 15 (0).
    pub flags: u8,
    /// Where the commit record is.
    pub commit_lsn: Lsn,
    /// Just past the commit record: the position to acknowledge once the transaction is applied.
    pub end_lsn: Lsn,
    /// Commit time, in microseconds since 2000-01-01 00:00 UTC.
    pub commit_time_micros: i64,
}

/// 'O': the transaction was replicated from elsewhere (a replication origin was set up for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The commit's LSN on the origin server.
    pub commit_lsn: Lsn,
    pub name: String,
}

/// 'R': a table's description; sent before the first change to it in a session, and again
/// after its definition changed. Changes name their table by [`Relation::oid`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// The schema; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

/// What an update or a delete says of the old row (`ALTER TABLE … REPLICA IDENTITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// 'd': the primary key's columns.
    Default,
    /// 'n': nothing.
    Nothing,
    /// 'f': every column.
    Full,
    /// 'i': the columns of a chosen unique index.
    Index,
}

/// A column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Bit 1: the column is part of the replica identity (the "key").
    pub flags: u8,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod` (-1: none), such as a `varchar`'s length plus 4.
    pub type_modifier: i32,
}

impl Column {
    /// Part of the replica identity: its value is in a [`OldTuple::Key`].
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// 'Y': a type that is not built in (an enum, a domain …), sent before a relation using it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
}

/// 'I': a new row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation: u32,
    pub new: Tuple,
}

/// 'U': a changed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub relation: u32,
    /// The old row, when the replica identity says so and (for a key) when the key changed.
    pub old: Option<OldTuple>,
    /// The new row; an unchanged TOASTed value is [`Value::UnchangedToast`].
    pub new: Tuple,
}

/// 'D': a removed row, as the replica identity describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub relation: u32,
    pub old: OldTuple,
}

/// The old row of an update or a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': the replica identity's columns; the others are [`Value::Null`].
    Key(Tuple),
    /// 'O': every column (`REPLICA IDENTITY FULL`).
    Full(Tuple),
}

/// 'T': tables emptied by one `TRUNCATE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Bit 1: `CASCADE`; bit 2: `RESTART IDENTITY`.
    pub options: u8,
    pub relations: Vec<u32>,
}

impl Truncate {
    pub fn cascade(&self) -> bool {
        self.options & 1 != 0
    }

    pub fn restart_identity(&self) -> bool {
        self.options & 2 != 0
    }
}

/// 'M': a message from `pg_logical_emit_message` (sent only with the `messages` option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Emitted inside a transaction (and sent between its Begin and Commit, if it committed);
    /// otherwise sent at once, outside any transaction.
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Vec<u8>,
}

/// The columns of a row, in the relation's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple(pub Vec<Value>);

/// One column's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// 'n'.
    Null,
    /// 'u': a TOASTed value the change did not touch; not sent (the consumer keeps the old one).
    UnchangedToast,
    /// 't': the type's text output.
    Text(Vec<u8>),
    /// 'b': the type's binary (send) output (only with the `binary` option).
    Binary(Vec<u8>),
}

impl Value {
    /// The text, if this is a text value in UTF-8.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }
}

/// Why bytes are not a `pgoutput` version 1 message. `at` is a byte offset into the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("unknown message tag {tag:#04x}")]
    UnknownTag { tag: u8 },
    /// A message of a later protocol version (streaming or two-phase), never sent for version 1.
    #[error("message tag {:?} ({what}) needs protocol version 2 or later; this decoder reads version 1", char::from(*tag))]
    Unsupported { tag: u8, what: &'static str },
    #[error("truncated at byte {at}: {what} needs {needed} more bytes, {available} left")]
    Truncated { what: &'static str, at: usize, needed: usize, available: usize },
    #[error("{what} at byte {at} has no terminating NUL")]
    Unterminated { what: &'static str, at: usize },
    #[error("{what} at byte {at} is not UTF-8")]
    NotUtf8 { what: &'static str, at: usize },
    #[error("{what} at byte {at} is negative ({value})")]
    Negative { what: &'static str, at: usize, value: i64 },
    #[error("{what} at byte {at}: unexpected {:?} ({found:#04x})", char::from(*found))]
    Unexpected { what: &'static str, at: usize, found: u8 },
    #[error("{count} bytes after the end of the message (at byte {at})")]
    Trailing { at: usize, count: usize },
}

/// Decodes one message. Never panics.
pub fn decode(bytes: &[u8]) -> Result<PgOutput, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    let Some(&tag) = bytes.first() else {
        return Err(DecodeError::Empty);
    };
    r.at = 1;
    let message = match tag {
        b'B' => PgOutput::Begin(Begin {
            final_lsn: r.lsn("Begin final LSN")?,
            commit_time_micros: r.i64("Begin commit time")?,
            xid: r.u32("Begin xid")?,
        }),
        b'C' => PgOutput::Commit(Commit {
            flags: r.u8("Commit flags")?,
            commit_lsn: r.lsn("Commit LSN")?,
            end_lsn: r.lsn("Commit end LSN")?,
            commit_time_micros: r.i64("Commit time")?,
        }),
        b'O' => PgOutput::Origin(Origin { commit_lsn: r.lsn("Origin commit LSN")?, name: r.string("Origin name")? }),
        b'R' => PgOutput::Relation(r.relation()?),
        b'Y' => PgOutput::Type(Type {
            oid: r.u32("Type oid")?,
            namespace: r.string("Type namespace")?,
            name: r.string("Type name")?,
        }),
        b'I' => {
            let relation = r.u32("Insert relation")?;
            r.expect(b'N', "Insert new tuple")?;
            PgOutput::Insert(Insert { relation, new: r.tuple()? })
        }
        b'U' => {
            let relation = r.u32("Update relation")?;
            let at = r.at;
            let old = match r.u8("Update tuple kind")? {
                b'K' => Some(OldTuple::Key(r.tuple()?)),
                b'O' => Some(OldTuple::Full(r.tuple()?)),
                b'N' => None,
                found => return Err(DecodeError::Unexpected { what: "Update tuple kind (K, O or N)", at, found }),
            };
            if old.is_some() {
                r.expect(b'N', "Update new tuple")?;
            }
            PgOutput::Update(Update { relation, old, new: r.tuple()? })
        }
        b'D' => {
            let relation = r.u32("Delete relation")?;
            let at = r.at;
            let old = match r.u8("Delete tuple kind")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                found => return Err(DecodeError::Unexpected { what: "Delete tuple kind (K or O)", at, found }),
            };
            PgOutput::Delete(Delete { relation, old })
        }
        b'T' => {
            let count = r.count32("Truncate relation count")?;
            let options = r.u8("Truncate options")?;
            // Each oid takes 4 bytes: a count past the end allocates no more than the bytes left.
            let mut relations = Vec::with_capacity(count.min(r.left() / 4));
            for _ in 0..count {
                relations.push(r.u32("Truncate relation")?);
            }
            PgOutput::Truncate(Truncate { options, relations })
        }
        b'M' => {
            let flags = r.u8("Message flags")?;
            let lsn = r.lsn("Message LSN")?;
            let prefix = r.string("Message prefix")?;
            let len = r.count32("Message content length")?;
            let content = r.take(len, "Message content")?.to_vec();
            PgOutput::Message(Message { transactional: flags & 1 != 0, lsn, prefix, content })
        }
        b'S' => return Err(DecodeError::Unsupported { tag, what: "Stream Start" }),
        b'E' => return Err(DecodeError::Unsupported { tag, what: "Stream Stop" }),
        b'c' => return Err(DecodeError::Unsupported { tag, what: "Stream Commit" }),
        b'A' => return Err(DecodeError::Unsupported { tag, what: "Stream Abort" }),
        b'b' => return Err(DecodeError::Unsupported { tag, what: "Begin Prepare" }),
        b'P' => return Err(DecodeError::Unsupported { tag, what: "Prepare" }),
        b'K' => return Err(DecodeError::Unsupported { tag, what: "Commit Prepared" }),
        b'r' => return Err(DecodeError::Unsupported { tag, what: "Rollback Prepared" }),
        b'p' => return Err(DecodeError::Unsupported { tag, what: "Stream Prepare" }),
        _ => return Err(DecodeError::UnknownTag { tag }),
    };
    r.finish()?;
    Ok(message)
}

/// A cursor over one message; every read checks the bytes are there.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len().saturating_sub(self.at)
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        match self.bytes.get(self.at..).and_then(|rest| rest.get(..n)) {
            Some(taken) => {
                self.at += n;
                Ok(taken)
            }
            None => Err(DecodeError::Truncated { what, at: self.at, needed: n, available: self.left() }),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let at = self.at;
        let bytes = self.take(N, what)?;
        bytes.try_into().map_err(|_| DecodeError::Truncated { what, at, needed: N, available: bytes.len() })
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array(what)?)))
    }

    /// A signed 16-bit count that must not be negative.
    fn count16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let at = self.at;
        let n = i16::from_be_bytes(self.array(what)?);
        usize::try_from(n).map_err(|_| DecodeError::Negative { what, at, value: n.into() })
    }

    /// A signed 32-bit count or length that must not be negative.
    fn count32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let at = self.at;
        let n = self.i32(what)?;
        usize::try_from(n).map_err(|_| DecodeError::Negative { what, at, value: n.into() })
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let at = self.at;
        let rest = self.bytes.get(at..).unwrap_or_default();
        let len = rest.iter().position(|&b| b == 0).ok_or(DecodeError::Unterminated { what, at })?;
        let text = self.take(len, what)?;
        self.at += 1; // the NUL, found above
        String::from_utf8(text.to_vec()).map_err(|_| DecodeError::NotUtf8 { what, at })
    }

    fn expect(&mut self, tag: u8, what: &'static str) -> Result<(), DecodeError> {
        let at = self.at;
        match self.u8(what)? {
            found if found == tag => Ok(()),
            found => Err(DecodeError::Unexpected { what, at, found }),
        }
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let oid = self.u32("Relation oid")?;
        let namespace = self.string("Relation namespace")?;
        let name = self.string("Relation name")?;
        let at = self.at;
        let replica_identity = match self.u8("Relation replica identity")? {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            found => {
                return Err(DecodeError::Unexpected { what: "Relation replica identity (d, n, f or i)", at, found })
            }
        };
        let count = self.count16("Relation column count")?;
        // A column takes at least 10 bytes.
        let mut columns = Vec::with_capacity(count.min(self.left() / 10));
        for _ in 0..count {
            columns.push(Column {
                flags: self.u8("Relation column flags")?,
                name: self.string("Relation column name")?,
                type_oid: self.u32("Relation column type")?,
                type_modifier: self.i32("Relation column type modifier")?,
            });
        }
        Ok(Relation { oid, namespace, name, replica_identity, columns })
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.count16("TupleData column count")?;
        // A column takes at least 1 byte.
        let mut values = Vec::with_capacity(count.min(self.left()));
        for _ in 0..count {
            let at = self.at;
            let value = match self.u8("TupleData column kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.count32("TupleData text length")?;
                    Value::Text(self.take(len, "TupleData text value")?.to_vec())
                }
                b'b' => {
                    let len = self.count32("TupleData binary length")?;
                    Value::Binary(self.take(len, "TupleData binary value")?.to_vec())
                }
                found => {
                    return Err(DecodeError::Unexpected { what: "TupleData column kind (n, u, t or b)", at, found })
                }
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.left() {
            0 => Ok(()),
            count => Err(DecodeError::Trailing { at: self.at, count }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Captured from PostgreSQL 15.18 by `tests/pgoutput_live.rs` (run with `--nocapture`): each is
    // one row of `pg_logical_slot_peek_binary_changes('s', NULL, NULL, 'proto_version', '1',
    // 'publication_names', 'p', 'messages', 'true')` after the statements named.
    // Tables: `t (id int PRIMARY KEY, name text, big text)` (oid 16393), and
    // `f (id int PRIMARY KEY, v text, m mood)` (oid 16400) with REPLICA IDENTITY FULL, where
    // `mood` is an enum (oid 16386).

    /// Begin of `INSERT INTO t VALUES (1, 'one', NULL)`.
    const BEGIN: &str = "42000000000192abf80003042cbb582e1c000002db";
    /// Its Commit.
    const COMMIT: &str = "4300000000000192abf8000000000192ac280003042cbb582e1c";
    /// t's Relation, before its first change.
    const RELATION_T: &str = "52000040097075626c69630074006400030169640000000017ffffffff006e616d650000000019ffffffff006269670000000019ffffffff";
    /// f's Relation: REPLICA IDENTITY FULL flags every column as key.
    const RELATION_F: &str =
        "52000040107075626c69630066006600030169640000000017ffffffff01760000000019ffffffff016d0000004002ffffffff";
    /// The Type of f's enum column, before f's Relation.
    const TYPE_MOOD: &str = "59000040027075626c6963006d6f6f6400";
    /// `INSERT INTO t VALUES (1, 'one', NULL)`.
    const INSERT: &str = "49000040094e000374000000013174000000036f6e656e";
    /// The same insert with the `binary` option.
    const INSERT_BINARY: &str = "49000040094e000362000000040000000162000000036f6e656e";
    /// `UPDATE f SET v = 'b' WHERE id = 1` (REPLICA IDENTITY FULL: the old row, 'O').
    const UPDATE_FULL: &str =
        "55000040104f000374000000013174000000016174000000026f6b4e000374000000013174000000016274000000026f6b";
    /// `UPDATE t SET name = 'two!' WHERE id = 2`, where `big` holds 12,800 TOASTed bytes: 'u'.
    const UPDATE_TOAST: &str = "55000040094e0003740000000132740000000474776f2175";
    /// `UPDATE t SET id = 30 WHERE id = 3`: the key changed, so the old key comes ('K').
    const UPDATE_KEY: &str = "55000040094b00037400000001336e6e4e000374000000023330740000000574687265656e";
    /// `DELETE FROM t WHERE id = 1`: the key.
    const DELETE_KEY: &str = "44000040094b00037400000001316e6e";
    /// `DELETE FROM f WHERE id = 1`: the whole old row.
    const DELETE_FULL: &str = "44000040104f000374000000013174000000016274000000026f6b";
    /// `SELECT pg_logical_emit_message(true, 'imago', 'hello')`.
    const MESSAGE: &str = "4d01000000000192e6b8696d61676f000000000568656c6c6f";
    /// `SELECT pg_logical_emit_message(false, 'imago', '\xff00'::bytea)`.
    const MESSAGE_NOW: &str = "4d00000000000192e728696d61676f0000000002ff00";
    /// After `pg_replication_origin_xact_setup('1/2345ABCD', …)` in a session set up for origin
    /// `upstream`.
    const ORIGIN: &str = "4f000000012345abcd757073747265616d00";
    /// `TRUNCATE t, f RESTART IDENTITY CASCADE`.
    const TRUNCATE: &str = "5400000002030000400900004010";

    const ALL: &[&str] = &[
        BEGIN,
        COMMIT,
        RELATION_T,
        RELATION_F,
        TYPE_MOOD,
        INSERT,
        INSERT_BINARY,
        UPDATE_FULL,
        UPDATE_TOAST,
        UPDATE_KEY,
        DELETE_KEY,
        DELETE_FULL,
        MESSAGE,
        MESSAGE_NOW,
        ORIGIN,
        TRUNCATE,
    ];

    fn bytes(hex: &str) -> Vec<u8> {
        assert!(hex.len().is_multiple_of(2), "odd hex");
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect()
    }

    fn decoded(hex: &str) -> PgOutput {
        decode(&bytes(hex)).unwrap_or_else(|e| panic!("{hex}: {e}"))
    }

    fn text(s: &str) -> Value {
        Value::Text(s.as_bytes().to_vec())
    }

    const T: u32 = 16393;
    const F: u32 = 16400;

    #[test]
    fn lsns_display_and_parse_as_postgresql_writes_them() {
        assert_eq!(Lsn(0x192ABF8).to_string(), "0/192ABF8");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        for lsn in [Lsn(0), Lsn(1), Lsn(0x1_0000_0000), Lsn(0x16_B374_D848), Lsn(u64::MAX)] {
            assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
        }
        assert_eq!("16/b374d848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        for bad in ["", "0", "/0", "0/", "g/0", "+1/0", "0/-1", "1/2/3", "123456789/0", "0/123456789", " 0/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn begin_and_commit() {
        let begin = Begin { final_lsn: Lsn(0x192ABF8), commit_time_micros: 0x0003_042c_bb58_2e1c, xid: 731 };
        assert_eq!(decoded(BEGIN), PgOutput::Begin(begin));
        let commit = Commit {
            flags: 0,
            commit_lsn: Lsn(0x192ABF8),
            end_lsn: Lsn(0x192AC28),
            commit_time_micros: 0x0003_042c_bb58_2e1c,
        };
        assert_eq!(decoded(COMMIT), PgOutput::Commit(commit));
    }

    #[test]
    fn relations_and_types() {
        let column = |flags, name: &str, type_oid| Column { flags, name: name.into(), type_oid, type_modifier: -1 };
        let t = Relation {
            oid: T,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![column(1, "id", 23), column(0, "name", 25), column(0, "big", 25)],
        };
        assert_eq!(decoded(RELATION_T), PgOutput::Relation(t));
        let PgOutput::Relation(f) = decoded(RELATION_F) else { panic!("a relation") };
        assert_eq!((f.oid, f.replica_identity), (F, ReplicaIdentity::Full));
        assert!(f.columns.iter().all(Column::is_key), "FULL: every column is key");
        assert_eq!(f.columns[2], column(1, "m", 16386));
        let mood = Type { oid: 16386, namespace: "public".into(), name: "mood".into() };
        assert_eq!(decoded(TYPE_MOOD), PgOutput::Type(mood));
    }

    #[test]
    fn inserts_in_text_and_binary() {
        let insert = Insert { relation: T, new: Tuple(vec![text("1"), text("one"), Value::Null]) };
        assert_eq!(decoded(INSERT), PgOutput::Insert(insert));
        let binary = Tuple(vec![Value::Binary(vec![0, 0, 0, 1]), Value::Binary(b"one".to_vec()), Value::Null]);
        assert_eq!(decoded(INSERT_BINARY), PgOutput::Insert(Insert { relation: T, new: binary }));
        assert_eq!(Value::Binary(b"one".to_vec()).as_text(), None);
        assert_eq!(text("one").as_text(), Some("one"));
    }

    #[test]
    fn updates_with_full_old_row_unchanged_toast_and_old_key() {
        let update = Update {
            relation: F,
            old: Some(OldTuple::Full(Tuple(vec![text("1"), text("a"), text("ok")]))),
            new: Tuple(vec![text("1"), text("b"), text("ok")]),
        };
        assert_eq!(decoded(UPDATE_FULL), PgOutput::Update(update));
        let update =
            Update { relation: T, old: None, new: Tuple(vec![text("2"), text("two!"), Value::UnchangedToast]) };
        assert_eq!(decoded(UPDATE_TOAST), PgOutput::Update(update));
        let update = Update {
            relation: T,
            old: Some(OldTuple::Key(Tuple(vec![text("3"), Value::Null, Value::Null]))),
            new: Tuple(vec![text("30"), text("three"), Value::Null]),
        };
        assert_eq!(decoded(UPDATE_KEY), PgOutput::Update(update));
    }

    #[test]
    fn deletes_by_key_and_by_full_row() {
        let delete = Delete { relation: T, old: OldTuple::Key(Tuple(vec![text("1"), Value::Null, Value::Null])) };
        assert_eq!(decoded(DELETE_KEY), PgOutput::Delete(delete));
        let delete = Delete { relation: F, old: OldTuple::Full(Tuple(vec![text("1"), text("b"), text("ok")])) };
        assert_eq!(decoded(DELETE_FULL), PgOutput::Delete(delete));
    }

    #[test]
    fn truncate_messages_and_origin() {
        let PgOutput::Truncate(truncate) = decoded(TRUNCATE) else { panic!("a truncate") };
        assert_eq!(truncate.relations, [T, F]);
        assert!(truncate.cascade() && truncate.restart_identity());
        let message =
            Message { transactional: true, lsn: Lsn(0x192E6B8), prefix: "imago".into(), content: b"hello".to_vec() };
        assert_eq!(decoded(MESSAGE), PgOutput::Message(message));
        let message =
            Message { transactional: false, lsn: Lsn(0x192E728), prefix: "imago".into(), content: vec![0xff, 0] };
        assert_eq!(decoded(MESSAGE_NOW), PgOutput::Message(message));
        let origin = Origin { commit_lsn: "1/2345ABCD".parse().expect("lsn"), name: "upstream".into() };
        assert_eq!(decoded(ORIGIN), PgOutput::Origin(origin));
    }

    #[test]
    fn every_truncation_of_a_real_message_is_an_error() {
        for hex in ALL {
            let whole = bytes(hex);
            for end in 0..whole.len() {
                let e = decode(&whole[..end]).expect_err("a strict prefix decoded");
                let expected =
                    matches!(e, DecodeError::Empty | DecodeError::Truncated { .. } | DecodeError::Unterminated { .. });
                assert!(expected, "{hex}[..{end}]: {e}");
            }
        }
    }

    #[test]
    fn malformed_messages_are_refused_with_the_reason() {
        let err = |hex: &str| decode(&bytes(hex)).expect_err(hex);
        assert_eq!(err(""), DecodeError::Empty);
        assert_eq!(err("7a"), DecodeError::UnknownTag { tag: b'z' });
        assert_eq!(err("53000002db"), DecodeError::Unsupported { tag: b'S', what: "Stream Start" });
        // A byte after a whole message.
        assert_eq!(err(&format!("{INSERT}00")), DecodeError::Trailing { at: 23, count: 1 });
        // Insert whose tuple is not introduced by 'N'.
        assert!(matches!(err("49000040094b0000"), DecodeError::Unexpected { at: 5, found: b'K', .. }));
        // Update with an old-tuple kind that does not exist.
        assert!(matches!(err("55000040095800"), DecodeError::Unexpected { at: 5, found: b'X', .. }));
        // Delete must say which old tuple it carries.
        assert!(matches!(err("44000040094e0000"), DecodeError::Unexpected { at: 5, found: b'N', .. }));
        // A column kind that does not exist.
        assert!(matches!(err("49000040094e000178"), DecodeError::Unexpected { at: 8, found: b'x', .. }));
        // Negative column count and negative value length.
        assert!(matches!(err("49000040094e8000"), DecodeError::Negative { at: 6, value: -32768, .. }));
        assert!(matches!(err("49000040094e000174ffffffff"), DecodeError::Negative { at: 9, value: -1, .. }));
        // A length past the end.
        assert!(matches!(
            err("49000040094e0001747fffffff41"),
            DecodeError::Truncated { needed: 0x7fff_ffff, available: 1, .. }
        ));
        // A Type whose name is not UTF-8, and one whose name never ends.
        assert!(matches!(err("5900004002707562006d6fff00"), DecodeError::NotUtf8 { at: 9, what: "Type name" }));
        assert!(matches!(err("5900004002707562006d6f"), DecodeError::Unterminated { at: 9, what: "Type name" }));
        // Relation with an unknown replica identity.
        assert!(matches!(err("52000040097000740078"), DecodeError::Unexpected { found: b'x', .. }));
        // Truncate claiming a billion relations (and no allocation for them).
        assert!(matches!(err("54400000000000000001"), DecodeError::Truncated { .. }));
        let text = err("49000040094e000174ffffffff").to_string();
        assert_eq!(text, "TupleData text length at byte 9 is negative (-1)");
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&data);
        }

        /// A valid tag, then bytes rich in the format's own tags, NULs and small lengths, so that
        /// decoding gets past the first field of each message.
        #[test]
        fn decode_never_panics_after_a_valid_tag(
            tag in prop::sample::select(b"BCORYIUDTMSEcAbPKrp".to_vec()),
            rest in proptest::collection::vec(
                prop_oneof![any::<u8>(), prop::sample::select(b"\0\0\0\x01\x02nutbKNOdfi".to_vec())],
                0..160,
            ),
        ) {
            let mut data = vec![tag];
            data.extend(rest);
            let _ = decode(&data);
        }

        /// Real messages with bytes changed, inserted or removed.
        #[test]
        fn decode_never_panics_on_damaged_real_messages(
            which in 0..ALL.len(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0..3u8), 1..6),
        ) {
            let mut data = bytes(ALL[which]);
            for (at, byte, how) in edits {
                let at = at % (data.len() + 1);
                match how {
                    0 if at < data.len() => data[at] = byte,
                    1 => data.insert(at, byte),
                    _ if at < data.len() => { data.remove(at); }
                    _ => data.push(byte),
                }
            }
            let _ = decode(&data);
        }
    }
}
