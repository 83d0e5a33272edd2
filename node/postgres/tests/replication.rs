//! Copy, then stream, with nothing lost and nothing twice, over `pgwire-replication` 0.5.0:
//!
//! 1. On a replication connection (`ReplicationClient::connect_gated`, not started),
//!    `CREATE_REPLICATION_SLOT s LOGICAL pgoutput (SNAPSHOT 'export')` (`simple_query`) answers
//!    the slot's consistent point and the name of a snapshot exported as of that point. The
//!    snapshot lives until the walsender gets its next command, and the gated client sends none.
//! 2. An ordinary connection imports it (`SET TRANSACTION SNAPSHOT`) in a REPEATABLE READ
//!    transaction: the copy reads exactly the rows committed before the slot, even while a third
//!    connection commits more.
//! 3. `start()` sends `START_REPLICATION SLOT s LOGICAL 0/0 (proto_version '1',
//!    publication_names 'p', messages 'true')` on the same connection: the stream carries exactly
//!    the transactions committed after the consistent point. Row changes arrive as raw pgoutput
//!    bytes (`ReplicationEvent::XLogData`), decoded here by `pgoutput::decode`; Begin, Commit and
//!    logical messages arrive parsed by the crate (`ReplicationEvent::Begin` / `Commit` /
//!    `Message`), never as bytes.
//! 4. The slot's `confirmed_flush_lsn` moves only when we call `update_applied_lsn`, and to
//!    exactly what we acknowledged.

use std::collections::BTreeMap;
use std::time::Duration;

use imago_node_postgres::pgoutput::{decode, Lsn, OldTuple, PgOutput, Tuple};
use imago_node_postgres::throwaway::ThrowawayCluster;
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio_postgres::Client;

/// The end of the test's writes: a transactional logical message after them.
const END_PREFIX: &str = "imago.test";

async fn connect(cluster: &ThrowawayCluster, db: &str) -> Client {
    cluster.client(db, "postgres").await.expect("connect")
}

async fn rows(client: &Client) -> BTreeMap<i32, String> {
    let rows = client.query("SELECT id, v FROM items", &[]).await.expect("select items");
    rows.iter().map(|row| (row.get(0), row.get(1))).collect()
}

async fn confirmed_flush(client: &Client) -> Lsn {
    let row = client
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 's'", &[])
        .await
        .expect("the slot");
    row.get::<_, String>(0).parse().expect("an LSN")
}

/// Waits (polling, up to 10 s) until the slot's confirmed position is `lsn`.
async fn await_confirmed(client: &Client, lsn: Lsn) {
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let now = confirmed_flush(client).await;
            if now == lsn {
                return;
            }
            assert!(now < lsn, "confirmed {now}, past the {lsn} we acknowledged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the slot never confirmed {lsn} (at {})", confirmed_flush(client).await);
}

/// The id and value of a row of `items` (id, v).
fn row_of(tuple: &Tuple) -> (i32, Option<String>) {
    let id = tuple.0[0].as_text().expect("id as text").parse().expect("an int");
    (id, tuple.0[1].as_text().map(str::to_string))
}

/// What the stream said, applied to the snapshot's copy.
#[derive(Debug, Default)]
struct Applied {
    inserts: usize,
    updates: usize,
    deletes: usize,
    /// (xid, end LSN) of each transaction, in order.
    commits: Vec<(u32, Lsn)>,
}

impl Applied {
    /// Applies one pgoutput message to `table`, refusing any change that would mean a row was
    /// copied and streamed both, or neither.
    fn apply(&mut self, table: &mut BTreeMap<i32, String>, relation: &mut Option<u32>, message: PgOutput) {
        match message {
            PgOutput::Relation(r) => {
                assert_eq!((r.namespace.as_str(), r.name.as_str()), ("public", "items"));
                *relation = Some(r.oid);
            }
            PgOutput::Insert(insert) => {
                assert_eq!(Some(insert.relation), *relation, "a Relation comes before its first change");
                let (id, v) = row_of(&insert.new);
                let before = table.insert(id, v.expect("v is NOT NULL"));
                assert_eq!(before, None, "row {id} inserted, but the copy has it: it came twice");
                self.inserts += 1;
            }
            PgOutput::Update(update) => {
                assert!(update.old.is_none(), "no key changes here");
                let (id, v) = row_of(&update.new);
                assert!(table.insert(id, v.expect("v")).is_some(), "row {id} updated, but neither copied nor inserted");
                self.updates += 1;
            }
            PgOutput::Delete(delete) => {
                let OldTuple::Key(key) = delete.old else { panic!("REPLICA IDENTITY DEFAULT sends the key") };
                let (id, _) = row_of(&key);
                assert!(table.remove(&id).is_some(), "row {id} deleted, but neither copied nor inserted");
                self.deletes += 1;
            }
            other => panic!("pgwire-replication passes Begin, Commit and Message as events, not bytes: {other:?}"),
        }
    }
}

/// Reads the stream up to the end marker's commit, applying its changes to `table`.
async fn stream_to_end(
    walsender: &mut ReplicationClient,
    consistent_point: Lsn,
    table: &mut BTreeMap<i32, String>,
) -> Applied {
    let mut applied = Applied::default();
    let mut relation = None;
    let mut xid = None;
    let mut ended = false;
    let streamed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let event = walsender.recv().await.expect("the stream").expect("the stream goes on");
            match event {
                ReplicationEvent::Begin { final_lsn, xid: begun, .. } => {
                    assert!(Lsn(final_lsn.0) > consistent_point, "a transaction from before the slot");
                    xid = Some(begun);
                }
                ReplicationEvent::XLogData { data, .. } => {
                    let message = decode(&data).unwrap_or_else(|e| panic!("undecodable {data:?}: {e}"));
                    applied.apply(table, &mut relation, message);
                }
                ReplicationEvent::Message { transactional, prefix, content, .. } => {
                    assert!(transactional && prefix == END_PREFIX && &content[..] == b"end", "{prefix}");
                    ended = true;
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    applied.commits.push((xid.take().expect("a Begin first"), Lsn(end_lsn.0)));
                    if ended {
                        return;
                    }
                }
                ReplicationEvent::KeepAlive { .. } => {}
                ReplicationEvent::StoppedAt { reached } => panic!("no stop LSN was set, yet stopped at {reached}"),
            }
        }
    })
    .await;
    assert!(streamed.is_ok(), "the stream did not reach the end marker in 30 s: {applied:?}");
    applied
}

#[tokio::test]
async fn exported_snapshot_then_stream_sees_every_change_exactly_once() {
    let Some(cluster) = ThrowawayCluster::start_for_test() else { return };
    cluster.create_database("app").expect("create database");
    let writer = connect(&cluster, "app").await;
    for sql in [
        "CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL)",
        "INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 100) i",
        "CREATE PUBLICATION p FOR TABLE items",
    ] {
        writer.batch_execute(sql).await.expect(sql);
    }
    let before_slot = rows(&writer).await;
    assert_eq!(before_slot.len(), 100);

    // (a) The slot and its exported snapshot, on the connection that will stream.
    let config = ReplicationConfig::new(cluster.host(), "postgres", "", "app", "s", "p")
        .with_port(cluster.port())
        .with_status_interval(Duration::from_millis(50));
    let mut walsender = ReplicationClient::connect_gated(config).await.expect("replication connection");
    let answer = walsender
        .simple_query("CREATE_REPLICATION_SLOT s LOGICAL pgoutput (SNAPSHOT 'export')")
        .await
        .expect("CREATE_REPLICATION_SLOT");
    let [row] = answer.as_slice() else { panic!("one row: {answer:?}") };
    let column = |i: usize| -> String {
        let value = row.get(i).cloned().flatten().unwrap_or_else(|| panic!("column {i} of {row:?}"));
        String::from_utf8(value.to_vec()).expect("text")
    };
    assert_eq!((column(0).as_str(), column(3).as_str()), ("s", "pgoutput"));
    let consistent_point: Lsn = column(1).parse().expect("consistent_point");
    let snapshot = column(2);

    // The copy's transaction imports the snapshot while the walsender is idle.
    let reader = connect(&cluster, "app").await;
    reader.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await.expect("begin");
    reader.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'")).await.expect("import the snapshot");

    // Changes committed meanwhile on a third connection, each statement a transaction, then one
    // transaction of three changes, then the end marker.
    for sql in [
        "INSERT INTO items VALUES (101, 'new 101'), (102, 'new 102')",
        "UPDATE items SET v = 'changed' WHERE id IN (5, 101)",
        "DELETE FROM items WHERE id IN (7, 102)",
        "BEGIN",
        "INSERT INTO items VALUES (103, 'new 103')",
        "UPDATE items SET v = 'changed too' WHERE id = 1",
        "DELETE FROM items WHERE id = 2",
        "COMMIT",
    ] {
        writer.batch_execute(sql).await.expect(sql);
    }
    writer
        .batch_execute(&format!("SELECT pg_logical_emit_message(true, '{END_PREFIX}', 'end')"))
        .await
        .expect("end marker");
    let after = rows(&writer).await;
    assert_ne!(after, before_slot, "the writes are committed");

    // The copy sees exactly the rows before the slot.
    assert_eq!(rows(&reader).await, before_slot, "the snapshot is the slot's consistent point");
    reader.batch_execute("COMMIT").await.expect("end the copy");

    // A new slot has confirmed its consistent point.
    assert_eq!(confirmed_flush(&writer).await, consistent_point);

    // (b) Stream from the slot on the same connection.
    walsender.start().await.expect("START_REPLICATION");
    walsender.wait_started().await.expect("the server accepted START_REPLICATION");
    // The exported snapshot ended with the walsender's next command.
    let late = connect(&cluster, "app").await;
    late.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.expect("begin");
    let gone = late.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'")).await;
    let gone = gone.expect_err("the snapshot outlived START_REPLICATION");
    let reason = gone.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
    assert!(reason.contains("invalid snapshot identifier"), "{gone}");
    drop(late);

    let mut table = before_slot.clone();
    let applied = stream_to_end(&mut walsender, consistent_point, &mut table).await;

    // Every change once: the copy plus the stream is the table now.
    assert_eq!(table, after);
    assert_eq!((applied.inserts, applied.updates, applied.deletes), (3, 3, 3));
    assert_eq!(applied.commits.len(), 5, "four writing transactions and the marker's: {:?}", applied.commits);
    let xids: Vec<u32> = applied.commits.iter().map(|(xid, _)| *xid).collect();
    assert!(xids.windows(2).all(|w| w[0] != w[1]), "a transaction came twice: {xids:?}");

    // (c) Acknowledge the first transaction only: the slot confirms exactly that, no more.
    let (_, first_end) = applied.commits[0];
    // Status updates went out since the start (every 50 ms), carrying 0/0 (the configured
    // `start_lsn`, as nothing was acknowledged), which the server ignores: the slot did not move.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(confirmed_flush(&writer).await, consistent_point, "confirmed before we acknowledged");
    walsender.update_applied_lsn(pgwire_replication::Lsn(first_end.0));
    await_confirmed(&writer, first_end).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(confirmed_flush(&writer).await, first_end, "confirmed more than we acknowledged");
    let (_, last_end) = applied.commits[applied.commits.len() - 1];
    walsender.update_applied_lsn(pgwire_replication::Lsn(last_end.0));
    await_confirmed(&writer, last_end).await;

    walsender.shutdown().await.expect("a clean end of the stream");
}

/// A write transaction open when the slot is created: `CREATE_REPLICATION_SLOT` waits for it to
/// end (the consistent point is after every transaction running when it began), so its rows are
/// in the snapshot and not in the stream.
#[tokio::test]
async fn a_transaction_open_at_slot_creation_is_in_the_copy_not_the_stream() {
    let Some(cluster) = ThrowawayCluster::start_for_test() else { return };
    let writer = connect(&cluster, "postgres").await;
    for sql in [
        "CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL)",
        "INSERT INTO items VALUES (1, 'v1')",
        "CREATE PUBLICATION p FOR TABLE items",
    ] {
        writer.batch_execute(sql).await.expect(sql);
    }
    let open = connect(&cluster, "postgres").await;
    open.batch_execute("BEGIN").await.expect("begin");
    open.batch_execute("INSERT INTO items VALUES (2, 'in flight')").await.expect("insert");

    let config = ReplicationConfig::new(cluster.host(), "postgres", "", "postgres", "s", "p")
        .with_port(cluster.port())
        .with_status_interval(Duration::from_millis(50));
    let mut walsender = ReplicationClient::connect_gated(config).await.expect("replication connection");
    let answer = {
        let create = walsender.simple_query("CREATE_REPLICATION_SLOT s LOGICAL pgoutput (SNAPSHOT 'export')");
        tokio::pin!(create);
        let early = tokio::time::timeout(Duration::from_millis(500), &mut create).await;
        assert!(early.is_err(), "the slot was created while a write transaction was open: {early:?}");
        open.batch_execute("COMMIT").await.expect("commit");
        tokio::time::timeout(Duration::from_secs(10), create).await.expect("created once it committed")
    };
    let answer = answer.expect("CREATE_REPLICATION_SLOT");
    let column = |i: usize| -> String {
        let value = answer[0].get(i).cloned().flatten().unwrap_or_else(|| panic!("column {i}"));
        String::from_utf8(value.to_vec()).expect("text")
    };
    let (consistent_point, snapshot): (Lsn, String) = (column(1).parse().expect("an LSN"), column(2));

    let reader = connect(&cluster, "postgres").await;
    reader.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await.expect("begin");
    reader.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'")).await.expect("import");
    writer.batch_execute("INSERT INTO items VALUES (3, 'after')").await.expect("insert");
    writer
        .batch_execute(&format!("SELECT pg_logical_emit_message(true, '{END_PREFIX}', 'end')"))
        .await
        .expect("end marker");
    let mut table = rows(&reader).await;
    assert_eq!(table, BTreeMap::from([(1, "v1".to_string()), (2, "in flight".to_string())]));
    reader.batch_execute("COMMIT").await.expect("commit");

    walsender.start().await.expect("START_REPLICATION");
    let applied = stream_to_end(&mut walsender, consistent_point, &mut table).await;
    assert_eq!((applied.inserts, applied.updates, applied.deletes), (1, 0, 0));
    assert_eq!(table, rows(&writer).await);
    walsender.shutdown().await.expect("a clean end of the stream");
}
