//! `PgOld` against a live server: copy then stream with nothing lost or twice while another
//! connection writes, whole transactions at their commit's position, the fence, restarts, what
//! pgoutput cannot say as a row (TRUNCATE, unchanged TOAST), the checks at open, clean-up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use imago_node_postgres::throwaway::{ThrowawayCluster, ThrowawayOptions};
use imago_node_postgres::{Names, PgChange, PgError, PgOld, PgOp};
use node_core::store::{RowCursor, SnapshotId, StoreError};
use protocol::schema::{Row, RowOp, Schema, TableSchema, Value, REQUEST_LOG_TABLE};
use protocol::{Position, UpgradeId};
use tokio_postgres::Client;

type Tables = BTreeMap<String, BTreeMap<i64, Row>>;

/// 12,800 bytes of chained md5 hex: too big to stay inline, too random for pglz to compress, so
/// the value is stored out of line (TOASTed) and an update that leaves it is sent as 'u'.
const BIG: &str =
    "(WITH RECURSIVE c(i, h) AS (SELECT 1, md5('imago') UNION ALL SELECT i + 1, md5(h) FROM c WHERE i < 400)
    SELECT string_agg(h, '' ORDER BY i) FROM c)";

fn cluster() -> Option<ThrowawayCluster> {
    ThrowawayCluster::start_for_test_with(ThrowawayOptions { fsync: false, ..Default::default() })
}

async fn connect_as(cluster: &ThrowawayCluster, user: &str) -> Client {
    cluster.client("postgres", user).await.expect("connect")
}

async fn connect(cluster: &ThrowawayCluster) -> Client {
    connect_as(cluster, "postgres").await
}

async fn run(client: &Client, statements: &[&str]) {
    for sql in statements {
        client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
}

fn names() -> Names {
    Names::for_upgrade(UpgradeId(1))
}

/// Tables with an `id` key and these columns each.
fn schema(tables: &[(&str, &[&str])]) -> Schema {
    let tables = tables
        .iter()
        .map(|(name, columns)| {
            let columns = columns.iter().map(|c| c.to_string()).collect();
            (name.to_string(), TableSchema { key: "id".into(), columns })
        })
        .collect();
    Schema { tables }
}

async fn open(cluster: &ThrowawayCluster, schema: &Schema) -> PgOld {
    PgOld::open(&cluster.connection_string("postgres"), schema, names()).await.expect("open")
}

fn row(values: &[(&str, Value)]) -> Row {
    values.iter().map(|(c, v)| (c.to_string(), v.clone())).collect()
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// Reads changes after `after` until `done` says the changes read so far are enough (10 s at
/// most), `limit` at a time, moving on after each read's last position.
async fn read_until(
    old: &mut PgOld,
    after: Position,
    limit: usize,
    done: impl Fn(&[PgChange]) -> bool,
) -> Vec<PgChange> {
    let mut all = Vec::new();
    let mut cursor = after;
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !done(&all) {
            let (changes, captured) = old.changes_after(cursor, limit).await.expect("changes_after");
            assert!(changes.iter().all(|c| c.position > cursor && c.position <= captured), "{changes:?}");
            match changes.last() {
                Some(last) => cursor = last.position,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            all.extend(changes);
        }
    })
    .await;
    assert!(read.is_ok(), "changes did not come in 10 s; read so far: {all:?}");
    all
}

/// Reads through `until` (a fence's final position).
async fn read_through(old: &mut PgOld, after: Position, until: Position) -> Vec<PgChange> {
    read_until(old, after, 100, |all| all.last().is_some_and(|c| c.position >= until)).await
}

/// Reads a whole snapshot, `limit` rows at a time.
async fn read_snapshot(old: &mut PgOld, snapshot: SnapshotId, limit: usize, between: impl AsyncFn()) -> Tables {
    let mut tables = Tables::new();
    let mut after: RowCursor = None;
    loop {
        let chunk = old.snapshot_chunk(snapshot, &after, limit).await.expect("snapshot chunk");
        assert!(chunk.rows.len() <= limit);
        for (table, key, row) in chunk.rows {
            let previous = tables.entry(table.clone()).or_default().insert(key, row);
            assert!(previous.is_none(), "{table} {key} read twice");
            after = Some((table, key));
        }
        if chunk.last {
            return tables;
        }
        between().await;
    }
}

fn apply(tables: &mut Tables, change: &PgChange) {
    match &change.op {
        PgOp::Row(RowOp::Upsert { table, key, row }) => {
            tables.entry(table.clone()).or_default().insert(*key, row.clone());
        }
        PgOp::Row(RowOp::Delete { table, key }) => {
            tables.entry(table.clone()).or_default().remove(key);
        }
        PgOp::PartialUpdate { table, key, row, unchanged, moved_from } => {
            let rows = tables.entry(table.clone()).or_default();
            let old = rows.remove(&moved_from.unwrap_or(*key)).expect("a partial update of a row that exists");
            let mut new = row.clone();
            for column in unchanged {
                new.insert(column.clone(), old[column].clone());
            }
            rows.insert(*key, new);
        }
        PgOp::Truncate { table } => {
            tables.entry(table.clone()).or_default().clear();
        }
        PgOp::Fence => {}
    }
}

/// `items (id, v, n)` as a plain SELECT reads it (typed, not through the adapter).
async fn items(client: &Client) -> BTreeMap<i64, Row> {
    let rows = client.query("SELECT id, v, n FROM items", &[]).await.expect("select items");
    rows.iter()
        .map(|r| {
            let id: i32 = r.get(0);
            let v: Option<String> = r.get(1);
            let n: Option<i64> = r.get(2);
            let row = row(&[
                ("id", Value::Int(id.into())),
                ("v", v.map_or(Value::Null, Value::Text)),
                ("n", n.map_or(Value::Null, Value::Int)),
            ]);
            (id.into(), row)
        })
        .collect()
}

fn items_schema() -> Schema {
    schema(&[("items", &["id", "v", "n"])])
}

async fn items_cluster() -> Option<(ThrowawayCluster, Client)> {
    let cluster = cluster()?;
    let client = connect(&cluster).await;
    run(
        &client,
        &[
            "CREATE TABLE items (id int PRIMARY KEY, v text, n bigint)",
            "INSERT INTO items SELECT i, 'v' || i, i * 10 FROM generate_series(1, 300) i",
        ],
    )
    .await;
    Some((cluster, client))
}

/// One writing transaction of the concurrent writer: an insert, an update, a delete, and every
/// fifth time a key change.
async fn write_once(client: &Client, i: i64) {
    let mut sql = format!(
        "BEGIN; INSERT INTO items VALUES ({new}, 'new {i}', {i}); \
         UPDATE items SET v = 'changed {i}', n = n + 1 WHERE id = {updated}; \
         DELETE FROM items WHERE id = {deleted};",
        new = 1000 + i,
        updated = (i * 7) % 300 + 1,
        deleted = (i * 13) % 300 + 1,
    );
    if i % 5 == 4 {
        sql.push_str(&format!(" UPDATE items SET id = {} WHERE id = {};", 5000 + i, 1000 + i - 1));
    }
    sql.push_str(" COMMIT;");
    client.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

#[tokio::test]
async fn copy_then_stream_reproduces_the_table_under_concurrent_writes() {
    let Some((cluster, client)) = items_cluster().await else { return };
    let mut old = open(&cluster, &items_schema()).await;
    run(&client, &["INSERT INTO imago_requests VALUES (1, 7, 1, 0, 1)"]).await;
    let writer = connect(&cluster).await;
    let (stop, commits) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let task = {
        let (stop, commits) = (stop.clone(), commits.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                write_once(&writer, i).await;
                commits.fetch_add(1, Ordering::SeqCst);
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (snapshot, at) = old.open_snapshot().await.expect("open a snapshot");
    let before_copy = commits.load(Ordering::SeqCst);
    let mut copy =
        read_snapshot(&mut old, snapshot, 37, async || tokio::time::sleep(Duration::from_millis(3)).await).await;
    assert!(commits.load(Ordering::SeqCst) > before_copy + 5, "the writer wrote during the copy");
    // Stream a while, with the writer still on.
    run(&client, &["INSERT INTO imago_requests VALUES (2, 7, 2, 0, 2)"]).await;
    let streamed = read_until(&mut old, at, 50, |all| all.len() >= 40).await;
    // Enough writes for the checks below (every fifth changes a key), however slow the machine:
    // the writer is stopped by its count, not by the time the reads above took.
    for _ in 0..1_000 {
        if commits.load(Ordering::SeqCst) >= 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    task.await.expect("the writer");
    let final_position = old.fence().await.expect("fence");
    let cursor = streamed.last().map_or(at, |c| c.position);
    let rest = read_through(&mut old, cursor, final_position).await;
    let changes: Vec<PgChange> = streamed.into_iter().chain(rest).collect();

    assert!(changes.windows(2).all(|w| w[0].position <= w[1].position), "in commit order");
    assert!(changes.iter().all(|c| c.position > at), "nothing from before the snapshot");
    assert_eq!(changes.last().map(|c| (&c.op, c.position)), Some((&PgOp::Fence, final_position)));
    let deletes = changes.iter().filter(|c| matches!(c.op, PgOp::Row(RowOp::Delete { .. }))).count();
    assert!(deletes > 10, "deletes and key changes were streamed: {deletes}");
    for change in &changes {
        apply(&mut copy, change);
    }
    let now = items(&client).await;
    assert!(now.keys().filter(|k| **k > 5000).count() > 5, "the writer's rows, keys changed too");
    assert_eq!(copy["items"], now, "the copy plus the stream is the table");
    let log: Vec<i64> = copy[REQUEST_LOG_TABLE].keys().copied().collect();
    assert_eq!(log, vec![1, 2], "the request log is captured like any table");
}

#[tokio::test]
async fn a_read_returns_whole_transactions_at_their_commit_position() {
    let Some((cluster, client)) = items_cluster().await else { return };
    let mut old = open(&cluster, &items_schema()).await;
    let (_, at) = old.open_snapshot().await.expect("snapshot");
    run(
        &client,
        &[
            "BEGIN; INSERT INTO items VALUES (1001, 'a', 1); INSERT INTO items VALUES (1002, 'b', 2); \
             UPDATE items SET v = 'c' WHERE id = 1001; COMMIT;",
            "INSERT INTO items VALUES (1003, 'd', 3)",
            // A key change: the old key goes, the new row comes, in one transaction.
            "UPDATE items SET id = 1010 WHERE id = 1002",
        ],
    )
    .await;
    let (first, captured) = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let read = old.changes_after(at, 1).await.expect("changes");
            if !read.0.is_empty() {
                return read;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the first transaction came");
    assert_eq!(first.len(), 3, "a 3-change transaction with limit 1 comes whole, alone: {first:?}");
    let p1 = first[0].position;
    assert!(first.iter().all(|c| c.position == p1) && p1 > at && captured >= p1);
    let upsert = |key: i64, v: &str, n: i64| {
        let row = row(&[("id", Value::Int(key)), ("v", text(v)), ("n", Value::Int(n))]);
        PgOp::Row(RowOp::Upsert { table: "items".into(), key, row })
    };
    let ops: Vec<PgOp> = first.iter().map(|c| c.op.clone()).collect();
    assert_eq!(ops, vec![upsert(1001, "a", 1), upsert(1002, "b", 2), upsert(1001, "c", 1)]);

    let second = read_until(&mut old, p1, 1, |all| !all.is_empty()).await;
    assert_eq!(second.iter().map(|c| c.op.clone()).collect::<Vec<_>>(), vec![upsert(1003, "d", 3)]);
    let p2 = second[0].position;
    assert!(p2 > p1);
    let third = read_until(&mut old, p2, 10, |all| !all.is_empty()).await;
    let ops: Vec<PgOp> = third.iter().map(|c| c.op.clone()).collect();
    assert_eq!(ops, vec![PgOp::Row(RowOp::Delete { table: "items".into(), key: 1002 }), upsert(1010, "b", 2)]);
    assert_eq!(third[0].position, third[1].position, "one transaction, one position");

    // Read again from the start (an apply that did not commit): the same transactions.
    let again = read_until(&mut old, at, 100, |all| all.len() >= 6).await;
    let positions: Vec<Position> = again.iter().map(|c| c.position).collect();
    assert_eq!(positions, vec![p1, p1, p1, p2, third[0].position, third[0].position]);
    let (none, captured) = old.changes_after(third[0].position, 10).await.expect("changes");
    assert_eq!((none, captured), (vec![], third[0].position), "nothing after the last");
}

#[tokio::test]
async fn the_fence_waits_for_a_writer_in_flight_then_refuses_every_role() {
    let Some(cluster) = cluster() else { return };
    let admin = connect(&cluster).await;
    run(&admin, &["CREATE ROLE app LOGIN", "GRANT CREATE ON SCHEMA public TO app"]).await;
    let owner = connect_as(&cluster, "app").await;
    run(
        &owner,
        &["CREATE TABLE items (id int PRIMARY KEY, v text, n bigint)", "INSERT INTO items VALUES (1, 'one', 1)"],
    )
    .await;
    let mut old = open(&cluster, &items_schema()).await;
    let (_, at) = old.open_snapshot().await.expect("snapshot");
    assert!(!old.is_fenced().await.expect("is_fenced"));

    // A transaction in flight on another connection, committing 200 ms after its insert.
    let in_flight = connect_as(&cluster, "app").await;
    let (inserted_tx, inserted) = tokio::sync::oneshot::channel();
    let writer = tokio::spawn(async move {
        run(&in_flight, &["BEGIN", "INSERT INTO items VALUES (42, 'in flight', 42)"]).await;
        inserted_tx.send(()).expect("the test waits");
        tokio::time::sleep(Duration::from_millis(200)).await;
        run(&in_flight, &["COMMIT"]).await;
    });
    inserted.await.expect("inserted");
    let began = tokio::time::Instant::now();
    let final_position = old.fence().await.expect("fence");
    assert!(began.elapsed() >= Duration::from_millis(150), "the fence waited for the writer in flight");
    writer.await.expect("the writer committed");
    assert!(old.is_fenced().await.expect("is_fenced"));

    let changes = read_through(&mut old, at, final_position).await;
    let in_flight_at = changes
        .iter()
        .find(|c| matches!(&c.op, PgOp::Row(RowOp::Upsert { key: 42, .. })))
        .map(|c| c.position)
        .expect("the write in flight is captured");
    assert!(in_flight_at < final_position, "the final position is after the write in flight");
    assert_eq!(changes.last().map(|c| &c.op), Some(&PgOp::Fence));

    // Every write is refused, the table's owner's and a superuser's skipping triggers too.
    for sql in [
        "INSERT INTO items VALUES (2, 'two', 2)",
        "UPDATE items SET v = 'x'",
        "DELETE FROM items",
        "TRUNCATE items",
        "INSERT INTO items VALUES (3, 'three', 3) ON CONFLICT DO NOTHING",
    ] {
        let refused = owner.batch_execute(sql).await.expect_err(sql);
        let message = refused.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
        assert!(message.contains("fenced"), "{sql}: {message}");
    }
    let refused =
        admin.batch_execute("SET session_replication_role = replica; INSERT INTO items VALUES (4, 'x', 4)").await;
    assert!(refused.is_err(), "ENABLE ALWAYS: replica mode does not skip the fence");
    run(&admin, &["RESET session_replication_role"]).await;
    assert_eq!(items(&admin).await.len(), 2, "nothing was written");
    // The current rows, read while fenced, page by page.
    let (mut current, mut after) = (BTreeMap::new(), None);
    loop {
        let chunk = old.rows_chunk(&after, 1).await.expect("rows");
        assert_eq!(chunk.position, final_position, "read at the final position");
        for (table, key, row) in chunk.rows {
            if table == "items" {
                current.insert(key, row);
            }
            after = Some((table, key));
        }
        if chunk.last {
            break;
        }
    }
    assert_eq!(current, items(&admin).await);

    assert_eq!(old.fence().await.expect("fence again"), final_position, "fencing twice names the same position");
    drop(old);
    let mut old = open(&cluster, &items_schema()).await;
    assert_eq!(old.fence().await.expect("fence after a restart"), final_position, "also after a restart");

    old.unfence().await.expect("unfence");
    assert!(!old.is_fenced().await.expect("is_fenced"));
    run(&owner, &["INSERT INTO items VALUES (2, 'two', 2)", "TRUNCATE items"]).await;
    let again = old.fence().await.expect("fence anew");
    assert!(again > final_position, "a new fence has a new final position, after the later writes");
}

#[tokio::test]
async fn a_restart_mid_stream_resumes_after_the_last_pruned_position() {
    let Some((cluster, client)) = items_cluster().await else { return };
    let mut old = open(&cluster, &items_schema()).await;
    let (_, at) = old.open_snapshot().await.expect("snapshot");
    for i in 1..=4 {
        run(&client, &[&format!("INSERT INTO items VALUES ({}, 'streamed', {i})", 1000 + i)]).await;
    }
    let changes = read_until(&mut old, at, 100, |all| all.len() >= 4).await;
    let p: Vec<Position> = changes.iter().map(|c| c.position).collect();
    assert!(p.windows(2).all(|w| w[0] < w[1]), "four transactions: {p:?}");
    old.prune(p[1]).await.expect("prune");
    let confirmed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if old.confirmed().await.expect("confirmed") == Some(p[1]) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
    assert!(confirmed.is_ok(), "the slot confirms what was pruned");
    drop(old);

    let mut old = open(&cluster, &items_schema()).await;
    // The new store applied up to p[2]: the slot sends p[2] again (it confirmed p[1] only), and it
    // is skipped by position.
    let resumed = read_until(&mut old, p[2], 100, |all| !all.is_empty()).await;
    assert_eq!(resumed.iter().map(|c| c.position).collect::<Vec<_>>(), vec![p[3]], "neither lost nor repeated");
    let key = |c: &PgChange| {
        c.row_op().map(|op| match op {
            RowOp::Upsert { key, .. } | RowOp::Delete { key, .. } => *key,
        })
    };
    assert_eq!(key(&resumed[0]), Some(1004));
    // An earlier position than the last read (an apply that did not commit): read again.
    let again = read_until(&mut old, p[1], 100, |all| all.len() >= 2).await;
    assert_eq!(again.iter().map(|c| c.position).collect::<Vec<_>>(), vec![p[2], p[3]]);
    assert_eq!(old.confirmed().await.expect("confirmed"), Some(p[1]), "nothing was acknowledged beyond the prune");
    // Before the pruned position: gone, and said so.
    let e = old.changes_after(at, 10).await.expect_err("pruned changes");
    assert!(matches!(&e, StoreError::Unavailable(m) if m.contains("slot holds only")), "{e}");
}

#[tokio::test]
async fn a_restart_mid_copy_starts_again_from_a_fresh_snapshot() {
    let Some((cluster, client)) = items_cluster().await else { return };
    let mut old = open(&cluster, &items_schema()).await;
    let (first, q1) = old.open_snapshot().await.expect("snapshot");
    let chunk = old.snapshot_chunk(first, &None, 3).await.expect("a chunk");
    assert_eq!((chunk.rows.len(), chunk.last), (3, false));
    run(&client, &["INSERT INTO items VALUES (1001, 'after the first snapshot', 1)"]).await;
    drop(old);

    let mut old = open(&cluster, &items_schema()).await;
    assert_eq!(old.snapshot_chunk(first, &None, 3).await, Err(StoreError::SnapshotGone(first)));
    let (second, q2) = old.open_snapshot().await.expect("a fresh snapshot");
    assert!(q2 > q1, "the slot was made again, at a later consistent point");
    assert_eq!(old.confirmed().await.expect("confirmed"), Some(q2));
    let copied = read_snapshot(&mut old, second, 100, async || {}).await;
    assert_eq!(copied["items"], items(&client).await, "the fresh snapshot has the later write");
    assert!(copied["items"].contains_key(&1001));
    let slots = client.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await.expect("slots");
    assert_eq!(slots.get::<_, i64>(0), 1, "one slot");

    run(&client, &["INSERT INTO items VALUES (1002, 'streamed', 2)"]).await;
    let streamed = read_until(&mut old, q2, 10, |all| !all.is_empty()).await;
    assert_eq!(streamed.len(), 1, "only what came after the fresh snapshot: {streamed:?}");

    old.disconnect();
    assert_eq!(old.snapshot_chunk(second, &None, 3).await, Err(StoreError::SnapshotGone(second)));
    let (third, _) = old.open_snapshot().await.expect("another snapshot");
    assert_ne!(third, second, "snapshot ids are not reused");
}

/// A chunk of the copy reads the next one ahead: asked for, it is the same rows a read of the
/// snapshot gives; asked for something else (the chunk again, another limit), the read ahead is
/// dropped and the answer is read afresh, still from the snapshot (a write after it is in none).
#[tokio::test]
async fn the_copy_reads_ahead_and_what_it_read_is_the_snapshots() {
    let Some((cluster, client)) = items_cluster().await else { return };
    let mut old = open(&cluster, &items_schema()).await;
    let (snapshot, _) = old.open_snapshot().await.expect("snapshot");
    let first = old.snapshot_chunk(snapshot, &None, 4).await.expect("a chunk");
    run(&client, &["UPDATE items SET v = 'after the snapshot'", "INSERT INTO items VALUES (1001, 'new', 1)"]).await;
    let cursor = |chunk: &node_core::store::Chunk| chunk.rows.last().map(|(t, k, _)| (t.clone(), *k));
    // The chunk again (another cursor): the read ahead goes, the same rows come back.
    assert_eq!(old.snapshot_chunk(snapshot, &None, 4).await.expect("again").rows, first.rows);
    let second = old.snapshot_chunk(snapshot, &cursor(&first), 4).await.expect("the next");
    // Another limit for the next chunk: read afresh; then the read ahead of it, as asked.
    let third_wide = old.snapshot_chunk(snapshot, &cursor(&second), 8).await.expect("wider");
    let third = old.snapshot_chunk(snapshot, &cursor(&second), 4).await.expect("as read ahead?");
    assert_eq!(third.rows[..], third_wide.rows[..4]);
    let fourth = old.snapshot_chunk(snapshot, &cursor(&third), 4).await.expect("read ahead");
    assert_eq!(fourth.rows[..], third_wide.rows[4..8.min(third_wide.rows.len())]);
    let mut all: Vec<_> = [first, second, third, fourth].into_iter().flat_map(|c| c.rows).collect();
    let mut after = all.last().map(|(t, k, _)| (t.clone(), *k));
    loop {
        let chunk = old.snapshot_chunk(snapshot, &after, 4).await.expect("a chunk");
        after = cursor(&chunk).or(after);
        let last = chunk.last;
        all.extend(chunk.rows);
        if last {
            break;
        }
    }
    assert!(all.iter().all(|(_, k, r)| *k != 1001 && r["v"] != text("after the snapshot")), "the snapshot's rows");
    let keys: Vec<i64> = all.iter().map(|(_, k, _)| *k).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(keys, sorted, "each row once, in key order");
    assert_eq!(keys.len(), items(&client).await.len() - 1, "every row of the snapshot");
    assert_eq!(old.snapshot_chunk(snapshot, &after, 4).await, Err(StoreError::SnapshotGone(snapshot)), "ended");
}

#[tokio::test]
async fn truncate_and_unchanged_toast_are_reported_as_such() {
    let Some(cluster) = cluster() else { return };
    let client = connect(&cluster).await;
    run(
        &client,
        &[
            "CREATE TABLE docs (id int PRIMARY KEY, title text, body text)",
            "CREATE TABLE full_docs (id int PRIMARY KEY, title text, body text)",
            "ALTER TABLE full_docs REPLICA IDENTITY FULL",
            &format!("INSERT INTO docs SELECT 1, 'a', {BIG}"),
            &format!("INSERT INTO full_docs SELECT 1, 'a', {BIG}"),
        ],
    )
    .await;
    let big: String = client.query_one(&format!("SELECT {BIG}"), &[]).await.expect("big").get(0);
    assert!(big.len() > 8192);
    let tables = schema(&[("docs", &["id", "title", "body"]), ("full_docs", &["id", "title", "body"])]);
    let mut old = open(&cluster, &tables).await;
    let (snapshot, at) = old.open_snapshot().await.expect("snapshot");
    let mut copy = read_snapshot(&mut old, snapshot, 10, async || {}).await;
    // The copy's transaction holds ACCESS SHARE locks on what it read: TRUNCATE waits for it.
    old.disconnect();
    run(
        &client,
        &[
            "UPDATE docs SET title = 'b' WHERE id = 1",
            "UPDATE docs SET id = 2 WHERE id = 1",
            "UPDATE full_docs SET title = 'b' WHERE id = 1",
            "TRUNCATE docs",
        ],
    )
    .await;
    let changes = read_until(&mut old, at, 100, |all| all.len() >= 4).await;
    let ops: Vec<PgOp> = changes.iter().map(|c| c.op.clone()).collect();
    let partial = |key: i64, moved_from| PgOp::PartialUpdate {
        table: "docs".into(),
        key,
        row: row(&[("id", Value::Int(key)), ("title", text("b"))]),
        unchanged: vec!["body".into()],
        moved_from,
    };
    let full = row(&[("id", Value::Int(1)), ("title", text("b")), ("body", text(&big))]);
    assert_eq!(
        ops,
        vec![
            partial(1, None),
            partial(2, Some(1)),
            PgOp::Row(RowOp::Upsert { table: "full_docs".into(), key: 1, row: full.clone() }),
            PgOp::Truncate { table: "docs".into() },
        ]
    );
    // Applied as they say, they give the tables.
    for change in &changes[..2] {
        apply(&mut copy, change);
    }
    assert_eq!(copy["docs"][&2], row(&[("id", Value::Int(2)), ("title", text("b")), ("body", text(&big))]));
    for change in &changes[2..] {
        apply(&mut copy, change);
    }
    assert_eq!(copy["docs"], BTreeMap::new());
    assert_eq!(copy["full_docs"][&1], full);
}

/// What the data-store interface reads (`row_changes`): row changes only, an update that left
/// a TOASTed value unchanged completed from the row as it is now (a moved row's old key
/// deleted, a row gone by now deleted), nothing for the fence's marker but a read complete up
/// to it, a read cut short by its limit complete only up to its last transaction, and a
/// TRUNCATE that asks for the copy to start again, by name.
#[tokio::test]
async fn row_changes_complete_unchanged_toast_from_the_row_and_end_at_the_marker() {
    let Some(cluster) = cluster() else { return };
    let client = connect(&cluster).await;
    run(
        &client,
        &[
            "CREATE TABLE docs (id int PRIMARY KEY, title text, body text)",
            &format!("INSERT INTO docs SELECT 1, 'a', {BIG}"),
        ],
    )
    .await;
    let tables = schema(&[("docs", &["id", "title", "body"])]);
    let mut old = open(&cluster, &tables).await;
    let (snapshot, at) = old.open_snapshot().await.expect("snapshot");
    let mut copy = read_snapshot(&mut old, snapshot, 10, async || {}).await;
    old.disconnect();
    run(
        &client,
        &[
            "UPDATE docs SET title = 'b' WHERE id = 1",
            "UPDATE docs SET id = 2 WHERE id = 1",
            "INSERT INTO docs VALUES (3, 'c', 'small')",
            "UPDATE docs SET body = 'short' WHERE id = 2",
        ],
    )
    .await;
    let final_position = old.fence().await.expect("fence");
    // One transaction at a time: each read is complete up to its own transaction only.
    let read = old.row_changes(at, 1).await.expect("read");
    let (first, complete) = (read.changes, read.complete_to);
    assert!(read.captured >= complete, "what is captured is known beyond what was read");
    assert_eq!(first, vec![(complete, RowOp::Delete { table: "docs".into(), key: 1 })], "row 1 is gone by now");
    assert!(complete < final_position);
    let read = old.row_changes(complete, 100).await.expect("read");
    let (rest, complete_to) = (read.changes, read.complete_to);
    assert_eq!(read.captured, final_position);
    assert_eq!(complete_to, final_position, "read up to the marker, which carries nothing");
    let doc =
        |id: i64, title: &str, body: &str| row(&[("id", Value::Int(id)), ("title", text(title)), ("body", text(body))]);
    let ops: Vec<RowOp> = rest.iter().map(|(_, op)| op.clone()).collect();
    assert_eq!(
        ops,
        vec![
            RowOp::Delete { table: "docs".into(), key: 1 },
            // Unchanged then, taken from now: newer than the update's, and made exact again
            // by the change that follows.
            RowOp::Upsert { table: "docs".into(), key: 2, row: doc(2, "b", "short") },
            RowOp::Upsert { table: "docs".into(), key: 3, row: doc(3, "c", "small") },
            RowOp::Upsert { table: "docs".into(), key: 2, row: doc(2, "b", "short") },
        ]
    );
    assert!(rest.windows(2).all(|w| w[0].0 <= w[1].0) && rest.iter().all(|(p, _)| *p > complete));
    for (_, op) in first.iter().chain(&rest) {
        match op {
            RowOp::Upsert { table, key, row } => copy.entry(table.clone()).or_default().insert(*key, row.clone()),
            RowOp::Delete { table, key } => copy.entry(table.clone()).or_default().remove(key),
        };
    }
    assert_eq!(copy["docs"], BTreeMap::from([(2, doc(2, "b", "short")), (3, doc(3, "c", "small"))]));
    // Nothing new: complete up to where it was.
    let read = old.row_changes(final_position, 100).await.expect("read");
    assert_eq!((read.changes.len(), read.complete_to), (0, final_position));
    // A TRUNCATE cannot be said row by row: the read asks for a new copy, naming it.
    old.unfence().await.expect("unfence");
    run(&client, &["TRUNCATE docs"]).await;
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match old.row_changes(final_position, 100).await {
                Err(e) => return e,
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("the TRUNCATE is read");
    assert!(matches!(&refused, StoreError::CopyAgain(m) if m.contains("TRUNCATE of table docs")), "{refused:?}");
}

#[tokio::test]
async fn copied_and_streamed_values_have_the_same_text() {
    let Some(cluster) = cluster() else { return };
    let client = connect(&cluster).await;
    let columns = ["id", "b", "n", "ts", "d", "j", "ip", "by", "f", "iv", "s", "c", "arr"];
    let values =
        "true, 12.50, '2024-02-03 04:05:06+02', '2024-02-03', '{\"a\": [1, 2]}', '10.0.0.1', '\\x00ff'::bytea, \
                  0.1, '1 day 02:00', 7, 'ab', '{1,2}'";
    run(
        &client,
        &[
            "CREATE TABLE vals (id bigint PRIMARY KEY, b bool, n numeric, ts timestamptz, d date, j jsonb, ip inet, \
             by bytea, f float8, iv interval, s smallint, c char(5), arr int[])",
            &format!("INSERT INTO vals VALUES (1, {values})"),
            // The application's session writes with other settings: values are stored, not text.
            "SET DateStyle = 'German'; SET TimeZone = 'Asia/Tokyo'",
        ],
    )
    .await;
    let mut old = open(&cluster, &schema(&[("vals", &columns)])).await;
    let (snapshot, at) = old.open_snapshot().await.expect("snapshot");
    run(&client, &[&format!("INSERT INTO vals VALUES (2, {values})")]).await;
    let copied = read_snapshot(&mut old, snapshot, 10, async || {}).await["vals"][&1].clone();
    let streamed = read_until(&mut old, at, 10, |all| !all.is_empty()).await;
    let PgOp::Row(RowOp::Upsert { row: mut streamed, .. }) = streamed[0].op.clone() else { panic!("an insert") };
    assert_eq!(streamed.insert("id".into(), Value::Int(1)), Some(Value::Int(2)));
    assert_eq!(copied, streamed, "the copy and the stream write every type alike");
    assert_eq!(copied["b"], text("t"), "the type's text output, not a cast to text");
    assert_eq!(copied["s"], Value::Int(7));
    assert_eq!(copied["ts"], text("2024-02-03 02:05:06+00"), "pinned: ISO, UTC");
    assert_eq!(copied["ip"], text("10.0.0.1"));
}

#[tokio::test]
async fn a_tiny_buffer_loses_and_repeats_nothing() {
    let Some((cluster, client)) = items_cluster().await else { return };
    let mut old = open(&cluster, &items_schema()).await;
    old.set_buffer_bytes(1);
    let (snapshot, at) = old.open_snapshot().await.expect("snapshot");
    let mut copy = read_snapshot(&mut old, snapshot, 1000, async || {}).await;
    for i in 0..20 {
        write_once(&client, i).await;
    }
    // The fence reads past a full buffer to its marker; what it read past is read again later.
    let final_position = old.fence().await.expect("fence");
    let changes = read_until(&mut old, at, 1, |all| all.last().is_some_and(|c| c.position >= final_position)).await;
    let mut positions: Vec<Position> = changes.iter().map(|c| c.position).collect();
    positions.dedup();
    assert_eq!(positions.len(), 21, "twenty transactions and the fence's, each once");
    for change in &changes {
        apply(&mut copy, change);
    }
    assert_eq!(copy["items"], items(&client).await);
}

#[tokio::test]
async fn open_refuses_what_cannot_be_captured_and_says_what_to_change() {
    let Some(cluster) = cluster() else { return };
    let client = connect(&cluster).await;
    run(
        &client,
        &[
            "CREATE TABLE no_key (id int, v text)",
            "CREATE TABLE text_key (id text PRIMARY KEY, v text)",
            "CREATE TABLE other_key (id int, v int PRIMARY KEY)",
            "CREATE TABLE nothing (id int PRIMARY KEY, v text)",
            "ALTER TABLE nothing REPLICA IDENTITY NOTHING",
            "CREATE TABLE by_index (id int NOT NULL, v text)",
            "CREATE UNIQUE INDEX by_index_id ON by_index (id)",
            "ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_id",
            "CREATE TABLE fine (id int PRIMARY KEY, v text, extra text)",
        ],
    )
    .await;
    let conn = cluster.connection_string("postgres");
    let refusal = async |table: &str, columns: &[&str]| {
        let e = PgOld::open(&conn, &schema(&[(table, columns)]), names()).await.expect_err(table);
        e.to_string()
    };
    assert!(refusal("no_key", &["id", "v"]).await.contains("no primary key"));
    assert!(refusal("text_key", &["id", "v"]).await.contains("integers"));
    assert!(refusal("other_key", &["id", "v"]).await.contains("primary key is (v)"));
    assert!(refusal("nothing", &["id", "v"]).await.contains("REPLICA IDENTITY is NOTHING"));
    assert!(refusal("fine", &["id", "v", "extra", "gone"]).await.contains("`gone`, which the table lacks"));
    assert!(refusal("fine", &["id", "v"]).await.contains("`extra` is not in the plan"));
    assert!(refusal("missing", &["id"]).await.contains("no such table"));
    let bad_names = Names { slot: "Bad-Name".into(), publication: "p".into() };
    let e = PgOld::open(&conn, &schema(&[("fine", &["id", "v", "extra"])]), bad_names).await.expect_err("bad name");
    assert!(matches!(e, PgError::Refused(_)), "{e}");
    let nothing_made = client.query_one("SELECT count(*) FROM pg_publication", &[]).await.expect("publications");
    assert_eq!(nothing_made.get::<_, i64>(0), 0, "a refused open makes no publication");

    // A replica identity index on the key will do; an unbounded slot is warned about.
    let old = PgOld::open(&conn, &schema(&[("by_index", &["id", "v"])]), names()).await.expect("open");
    assert!(old.warnings().iter().any(|w| w.contains("max_slot_wal_keep_size")), "{:?}", old.warnings());
    drop(old);
    run(&client, &["ALTER SYSTEM SET max_slot_wal_keep_size = '1GB'", "SELECT pg_reload_conf()"]).await;
    let reloaded = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let row = client.query_one("SHOW max_slot_wal_keep_size", &[]).await.expect("show");
            if row.get::<_, String>(0) == "1GB" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(reloaded.is_ok(), "the setting was reloaded");
    let old = PgOld::open(&conn, &schema(&[("by_index", &["id", "v"])]), names()).await.expect("open again");
    assert_eq!(old.warnings(), &[] as &[String], "a bounded slot is not warned about");
}

#[tokio::test]
async fn open_refuses_a_server_without_logical_decoding() {
    let options =
        ThrowawayOptions { fsync: false, settings: vec![("wal_level".into(), "replica".into())], ..Default::default() };
    let Some(cluster) = ThrowawayCluster::start_for_test_with(options) else { return };
    let client = connect(&cluster).await;
    run(&client, &["CREATE TABLE items (id int PRIMARY KEY, v text, n bigint)"]).await;
    let e = PgOld::open(&cluster.connection_string("postgres"), &items_schema(), names()).await.expect_err("refused");
    assert!(e.to_string().contains("set wal_level = logical in postgresql.conf and restart"), "{e}");
}

/// Imago's objects, as the catalogs list them (the request log aside: it is data).
async fn imago_objects(client: &Client) -> Vec<String> {
    let rows = client
        .query(
            "SELECT 'slot ' || slot_name FROM pg_replication_slots \
             UNION ALL SELECT 'publication ' || pubname FROM pg_publication \
             UNION ALL SELECT 'trigger ' || tgname || ' on ' || tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal \
             UNION ALL SELECT 'table ' || relname FROM pg_class WHERE relname LIKE 'imago%' AND relname <> 'imago_requests' \
               AND relkind = 'r' \
             UNION ALL SELECT 'function ' || proname FROM pg_proc WHERE proname LIKE 'imago%' ORDER BY 1",
            &[],
        )
        .await
        .expect("list objects");
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test]
async fn clean_up_leaves_nothing_of_imago_but_the_request_log() {
    let Some((cluster, client)) = items_cluster().await else { return };
    let mut old = open(&cluster, &items_schema()).await;
    let (_, at) = old.open_snapshot().await.expect("snapshot");
    run(&client, &["INSERT INTO items VALUES (1001, 'x', 1)"]).await;
    read_until(&mut old, at, 10, |all| !all.is_empty()).await;
    old.fence().await.expect("fence");
    let objects = imago_objects(&client).await;
    assert_eq!(old.imago_objects().await.expect("the adapter's own list"), objects);
    assert_eq!(
        objects,
        [
            "function imago_fence_refuse",
            "publication imago_upgrade_1",
            "slot imago_upgrade_1",
            "table imago_fence",
            "trigger imago_fence on imago_requests",
            "trigger imago_fence on items",
        ]
    );

    old.remove_capture().await.expect("remove the capture");
    let objects = imago_objects(&client).await;
    assert!(objects.iter().all(|o| !o.starts_with("slot") && !o.starts_with("publication")), "{objects:?}");
    assert!(old.is_fenced().await.expect("is_fenced"), "removing the capture leaves the fence");

    old.retire().await.expect("retire");
    assert_eq!(imago_objects(&client).await, Vec::<String>::new(), "nothing left");
    let log = client.query_one("SELECT to_regclass('imago_requests') IS NOT NULL", &[]).await.expect("log");
    assert!(log.get::<_, bool>(0), "the request log is data: it stays");
}

/// After a rollback the data node removes the capture from the (unfenced) old database: the
/// slot and the publication go, so no WAL stays pinned while the application writes on. The
/// next copy's snapshot makes both again, and streams what is written after it.
#[tokio::test]
async fn capture_removed_after_a_rollback_comes_back_with_the_next_snapshot() {
    let Some((cluster, client)) = items_cluster().await else { return };
    let mut old = open(&cluster, &items_schema()).await;
    let (_, at) = old.open_snapshot().await.expect("snapshot");
    run(&client, &["INSERT INTO items VALUES (1001, 'x', 1)"]).await;
    read_until(&mut old, at, 10, |all| !all.is_empty()).await;
    old.remove_capture().await.expect("remove the capture");
    assert_eq!(imago_objects(&client).await, Vec::<String>::new(), "no slot or publication after the rollback");
    run(&client, &["INSERT INTO items VALUES (1002, 'uncaptured', 2)"]).await;

    let (_, again) = old.open_snapshot().await.expect("the next copy's snapshot");
    assert!(again > at, "LSNs only grow");
    let objects = imago_objects(&client).await;
    assert_eq!(objects, ["publication imago_upgrade_1", "slot imago_upgrade_1"], "capture is back");
    run(&client, &["UPDATE items SET v = 'after' WHERE id = 1002"]).await;
    let changes = read_until(&mut old, again, 10, |all| !all.is_empty()).await;
    let rows: Vec<_> = changes
        .iter()
        .filter_map(|c| match &c.op {
            PgOp::Row(RowOp::Upsert { key, row, .. }) => Some((*key, row.get("v").cloned())),
            _ => None,
        })
        .collect();
    assert_eq!(rows, [(1002, Some(Value::Text("after".into())))], "{changes:?}");
    old.remove_capture().await.expect("clean-up");
}
