//! The decoder against a live server: one of each change, read back with
//! `pg_logical_slot_peek_binary_changes` and decoded. The unit tests of `src/pgoutput.rs` hold
//! bytes this test printed (run it with `--nocapture` to see them); this test checks that what
//! the server sends today still decodes the same way.

use imago_node_postgres::pgoutput::{decode, Lsn, OldTuple, PgOutput, ReplicaIdentity, Tuple, Value};
use imago_node_postgres::throwaway::ThrowawayCluster;
use tokio_postgres::Client;

/// The scenario: each statement a query of its own (several in one query string would be one
/// transaction, and a slot cannot be created in a transaction that wrote).
const SETUP: &[&str] = &[
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE TABLE t (id int PRIMARY KEY, name text, big text)",
    "CREATE TABLE f (id int PRIMARY KEY, v text, m mood)",
    "ALTER TABLE f REPLICA IDENTITY FULL",
    "CREATE PUBLICATION p FOR TABLE t, f",
    "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
    "SELECT pg_replication_origin_create('upstream')",
];

/// 12,800 bytes of chained md5 hex: too big to stay inline, too random for pglz to compress, so
/// the value is stored out of line (TOASTed) and an update that leaves it is sent as 'u'.
const BIG: &str =
    "WITH RECURSIVE c(i, h) AS (SELECT 1, md5('imago') UNION ALL SELECT i + 1, md5(h) FROM c WHERE i < 400)
    SELECT string_agg(h, '' ORDER BY i) FROM c";

const CHANGES: &[&str] = &[
    "INSERT INTO t VALUES (1, 'one', NULL)",
    "INSERT INTO f VALUES (1, 'a', 'ok')",
    "UPDATE f SET v = 'b' WHERE id = 1",
    "INSERT INTO t SELECT 2, 'two', (BIG)",
    "UPDATE t SET name = 'two!' WHERE id = 2",
    "DELETE FROM t WHERE id = 1",
    "DELETE FROM f WHERE id = 1",
    "SELECT pg_logical_emit_message(true, 'imago', 'hello')",
    "SELECT pg_logical_emit_message(false, 'imago', '\\xff00'::bytea)",
    // A transaction replicated from elsewhere: its origin and the commit's LSN there.
    "SELECT pg_replication_origin_session_setup('upstream')",
    "BEGIN",
    "SELECT pg_replication_origin_xact_setup('1/2345ABCD', '2020-01-01 00:00:00+00')",
    "INSERT INTO t VALUES (3, 'three', NULL)",
    "COMMIT",
    "SELECT pg_replication_origin_session_reset()",
    "UPDATE t SET id = 30 WHERE id = 3",
    "TRUNCATE t, f RESTART IDENTITY CASCADE",
];

const PEEK: &str = "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL,
    'proto_version', '1', 'publication_names', 'p', 'messages', 'true'";

async fn connect(cluster: &ThrowawayCluster, db: &str) -> Client {
    cluster.client(db, "postgres").await.expect("connect")
}

async fn peek(client: &Client, options: &str) -> Vec<(Lsn, Vec<u8>)> {
    let rows = client.query(&format!("{PEEK}{options})"), &[]).await.expect("peek");
    rows.iter()
        .map(|row| {
            let lsn: String = row.get(0);
            (lsn.parse().expect("the server's LSN parses"), row.get(1))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(tuple: &Tuple) -> Vec<Option<&str>> {
    tuple
        .0
        .iter()
        .map(|v| match v {
            Value::Null => None,
            Value::UnchangedToast => Some("<unchanged toast>"),
            other => Some(other.as_text().expect("text")),
        })
        .collect()
}

#[tokio::test]
async fn what_the_server_sends_decodes() {
    let Some(cluster) = ThrowawayCluster::start_for_test() else { return };
    cluster.create_database("capture").expect("create database");
    let client = connect(&cluster, "capture").await;
    for change in SETUP.iter().chain(CHANGES) {
        client.batch_execute(&change.replace("(BIG)", &format!("({BIG})"))).await.expect(change);
    }

    let messages = peek(&client, "").await;
    let mut decoded = Vec::new();
    for (lsn, bytes) in &messages {
        let message = decode(bytes).unwrap_or_else(|e| panic!("{lsn} {}: {e}", hex(bytes)));
        let kind = format!("{message:?}");
        let kind = kind.split('(').next().unwrap_or_default().to_string();
        // What the unit tests paste (the big insert aside).
        if bytes.len() < 1000 {
            println!("{lsn} {kind}: {}", hex(bytes));
        }
        decoded.push(message);
    }
    let kinds: Vec<&str> = decoded
        .iter()
        .map(|m| match m {
            PgOutput::Begin(_) => "B",
            PgOutput::Commit(_) => "C",
            PgOutput::Origin(_) => "O",
            PgOutput::Relation(_) => "R",
            PgOutput::Type(_) => "Y",
            PgOutput::Insert(_) => "I",
            PgOutput::Update(_) => "U",
            PgOutput::Delete(_) => "D",
            PgOutput::Truncate(_) => "T",
            PgOutput::Message(_) => "M",
        })
        .collect();
    // TRUNCATE gives both tables new files, which invalidates what the session sent of them: their
    // Relation (and f's Type) messages come again before the Truncate.
    assert_eq!(
        kinds.join(" "),
        "B R I C  B Y R I C  B U C  B I C  B U C  B D C  B D C  B M C  M  B O I C  B U C  B R Y R T C"
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );

    // Each transaction's Begin names its Commit's LSN, and commits come in LSN order.
    let mut last_end = Lsn(0);
    let mut final_lsn = None;
    for message in &decoded {
        match message {
            PgOutput::Begin(b) => final_lsn = Some(b.final_lsn),
            PgOutput::Commit(c) => {
                assert_eq!(final_lsn.take(), Some(c.commit_lsn));
                assert!(c.end_lsn > c.commit_lsn && c.commit_lsn > last_end);
                last_end = c.end_lsn;
            }
            _ => {}
        }
    }

    let relations: Vec<_> =
        decoded.iter().filter_map(|m| if let PgOutput::Relation(r) = m { Some(r) } else { None }).collect();
    let (t, f) = (relations[0], relations[1]);
    assert_eq!((t.namespace.as_str(), t.name.as_str(), t.replica_identity), ("public", "t", ReplicaIdentity::Default));
    assert_eq!(
        t.columns.iter().map(|c| (c.name.as_str(), c.is_key())).collect::<Vec<_>>(),
        [("id", true), ("name", false), ("big", false)]
    );
    assert_eq!(t.columns[0].type_oid, 23, "int4");
    assert_eq!(t.columns[1].type_oid, 25, "text");
    assert_eq!(f.replica_identity, ReplicaIdentity::Full);
    let PgOutput::Type(mood) = &decoded[5] else { panic!("a Type message before f's Relation") };
    assert_eq!((mood.namespace.as_str(), mood.name.as_str()), ("public", "mood"));
    assert_eq!(f.columns[2].type_oid, mood.oid);

    let changes: Vec<&PgOutput> = decoded
        .iter()
        .filter(|m| matches!(m, PgOutput::Insert(_) | PgOutput::Update(_) | PgOutput::Delete(_)))
        .collect();
    let [PgOutput::Insert(i1), PgOutput::Insert(i2), PgOutput::Update(u_full), PgOutput::Insert(big), PgOutput::Update(u_toast), PgOutput::Delete(d_key), PgOutput::Delete(d_full), PgOutput::Insert(i3), PgOutput::Update(u_key)] =
        changes.as_slice()
    else {
        panic!("unexpected changes: {changes:?}")
    };
    assert_eq!((i1.relation, text(&i1.new)), (t.oid, vec![Some("1"), Some("one"), None]));
    assert_eq!((i2.relation, text(&i2.new)), (f.oid, vec![Some("1"), Some("a"), Some("ok")]));
    assert_eq!(
        u_full
            .old
            .as_ref()
            .map(|o| matches!(o, OldTuple::Full(old) if text(old) == [Some("1"), Some("a"), Some("ok")])),
        Some(true)
    );
    assert_eq!(text(&u_full.new), [Some("1"), Some("b"), Some("ok")]);
    let big_value = big.new.0[2].as_text().expect("big text");
    assert_eq!(big_value.len(), 12_800);
    assert_eq!(u_toast.old, None, "the key did not change");
    assert_eq!(text(&u_toast.new), [Some("2"), Some("two!"), Some("<unchanged toast>")]);
    assert!(matches!(&d_key.old, OldTuple::Key(k) if text(k) == [Some("1"), None, None]));
    assert!(matches!(&d_full.old, OldTuple::Full(o) if text(o) == [Some("1"), Some("b"), Some("ok")]));
    assert_eq!(text(&i3.new), [Some("3"), Some("three"), None]);
    assert!(
        matches!(&u_key.old, Some(OldTuple::Key(k)) if text(k) == [Some("3"), None, None]),
        "a changed key sends the old key"
    );
    assert_eq!(text(&u_key.new), [Some("30"), Some("three"), None]);

    let origin = decoded.iter().find_map(|m| if let PgOutput::Origin(o) = m { Some(o) } else { None }).expect("origin");
    assert_eq!((origin.name.as_str(), origin.commit_lsn.to_string().as_str()), ("upstream", "1/2345ABCD"));
    let truncate =
        decoded.iter().find_map(|m| if let PgOutput::Truncate(t) = m { Some(t) } else { None }).expect("truncate");
    assert!(truncate.cascade() && truncate.restart_identity());
    let mut truncated = truncate.relations.clone();
    truncated.sort();
    let mut expected = vec![t.oid, f.oid];
    expected.sort();
    assert_eq!(truncated, expected);
    let emitted: Vec<_> =
        decoded.iter().filter_map(|m| if let PgOutput::Message(m) = m { Some(m) } else { None }).collect();
    assert_eq!(emitted.len(), 2);
    assert!(emitted[0].transactional && emitted[0].prefix == "imago" && emitted[0].content == b"hello");
    assert!(!emitted[1].transactional && emitted[1].content == [0xff, 0x00]);

    // With the binary option, values come in their types' send format.
    let binary = peek(&client, ", 'binary', 'true'").await;
    let first_insert = binary
        .iter()
        .find_map(|(_, bytes)| match decode(bytes) {
            Ok(PgOutput::Insert(insert)) => Some((insert, bytes)),
            _ => None,
        })
        .expect("an insert");
    println!("binary Insert: {}", hex(first_insert.1));
    assert_eq!(
        first_insert.0.new.0,
        [Value::Binary(1i32.to_be_bytes().to_vec()), Value::Binary(b"one".to_vec()), Value::Null]
    );
}
