//! Both sides together, as a data node runs them: `PgOldStore` and `PgNewStore` (the
//! synchronous data-store interface, each on a runtime of its own) driven by the transform core,
//! one operation at a time through `node_core::data_node::perform`.

// A real server: the test bounds its wait with the wall clock.
#![allow(clippy::disallowed_methods)]

use imago_node_postgres::throwaway::{ThrowawayCluster, ThrowawayOptions};
use imago_node_postgres::{Names, PgNewStore, PgOldStore};
use node_core::data_node::{perform, StoreOp, StoreResult};
use node_core::duties::transform::{Positions, TransformCore, Work};
use node_core::store::{Checkpoint, CopyState, NewStore, OldStore};
use protocol::schema::{Mapping, Schema, SplitPart, TableSchema, Transform, Value};
use protocol::{Position, UpgradeId};
use std::time::{Duration, Instant};

/// Runs `sql` on database `db` with `psql`-free means: a client on a runtime of its own.
fn run(cluster: &ThrowawayCluster, db: &str, sql: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = cluster.client(db, "postgres").await.expect("connect");
        client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    });
}

/// Rows of `table` in `db`: id → the text of `column`.
fn rows(cluster: &ThrowawayCluster, db: &str, table: &str, column: &str) -> Vec<(i64, String)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = cluster.client(db, "postgres").await.expect("connect");
        let sql = format!("SELECT id, {column} FROM {table} ORDER BY id");
        client.query(&sql, &[]).await.expect("rows").iter().map(|r| (r.get(0), r.get(1))).collect()
    })
}

/// The stores of an upgrade of `docs(id, title)` from database `old_db` to `new_db` (`title`
/// renamed `name`), and the transform core on the new one's checkpoint.
fn docs(
    cluster: &ThrowawayCluster,
    old_db: &str,
    new_db: &str,
    upgrade: u64,
) -> (PgOldStore, PgNewStore, TransformCore) {
    let schema = Schema {
        tables: [("docs".to_string(), TableSchema { key: "id".into(), columns: vec!["id".into(), "title".into()] })]
            .into_iter()
            .collect(),
    };
    let rename = Transform::RenameColumn { table: "docs".into(), from: "title".into(), to: "name".into() };
    let mapping = Mapping::compile(&schema, &[rename]).expect("mapping");
    let old = PgOldStore::open(&cluster.connection_string(old_db), &schema, Names::for_upgrade(UpgradeId(upgrade)))
        .expect("open the old database");
    let new = PgNewStore::open(&cluster.connection_string(new_db), &mapping).expect("open the new database");
    let core = TransformCore::new(new.checkpoint().expect("checkpoint")).with_positions(Positions::Ordered);
    (old, new, core)
}

/// One transform step through the stores, as the data node's core asks for it; `true` when
/// the stream is read to `until` (and nothing was left to do).
fn step(
    core: &mut TransformCore,
    old: &mut PgOldStore,
    new: &mut PgNewStore,
    until: Position,
    again: &mut u32,
) -> bool {
    let batch = match core.next_work() {
        Work::Snapshot => match perform(old, new, StoreOp::OpenSnapshot) {
            StoreResult::SnapshotOpened { snapshot, at, .. } => core.copy_started(snapshot, at),
            other => panic!("open a snapshot: {other:?}"),
        },
        Work::CopyChunk { snapshot, after, limit } => {
            match perform(old, new, StoreOp::ReadSnapshot { snapshot, after, limit }) {
                StoreResult::Chunk(chunk) => core.copy_chunk(chunk.rows, chunk.last).expect("copy"),
                other => panic!("read the snapshot: {other:?}"),
            }
        }
        Work::Stream { after, limit } => match perform(old, new, StoreOp::ReadChanges { after, limit }) {
            StoreResult::Changes(read) => {
                if read.changes.is_empty() && !core.read_moves(read.complete_to) {
                    return after >= until;
                }
                core.apply_read(&read.changes, read.complete_to).expect("stream")
            }
            StoreResult::CopyAgain { reason } => {
                assert!(reason.contains("TRUNCATE of table docs"), "{reason}");
                *again += 1;
                core.copy_again();
                return false;
            }
            other => panic!("read changes: {other:?}"),
        },
    };
    assert_eq!(perform(old, new, StoreOp::Apply(batch)), StoreResult::Applied);
    false
}

/// An application's `TRUNCATE` while the upgrade runs: the stream cannot say it row by row, so
/// the copy starts again from a fresh snapshot (a new slot), and the new database ends equal
/// to transform(old): the rows written before the `TRUNCATE` are gone, those written after it
/// are there. (Regression: the copy's snapshot transaction stayed open after the copy, holding
/// its locks, and the `TRUNCATE` waited for it for ever; the last chunk now ends it.)
#[test]
fn a_truncate_in_the_stream_starts_the_copy_again_and_the_new_database_ends_equal() {
    let Some(cluster) = ThrowawayCluster::start_for_test_with(ThrowawayOptions { fsync: false, ..Default::default() })
    else {
        return;
    };
    for db in ["old_docs", "new_docs"] {
        cluster.create_database(db).expect("create database");
    }
    run(
        &cluster,
        "old_docs",
        "CREATE TABLE docs (id bigint PRIMARY KEY, title text); \
         INSERT INTO docs SELECT g, 'before-' || g FROM generate_series(1, 300) g;",
    );
    let (mut old, mut new, mut core) = docs(&cluster, "old_docs", "new_docs", 9);
    let mut again = 0;
    // The copy, then a few changes streamed.
    while !core.bulk_done() {
        step(&mut core, &mut old, &mut new, Position(u64::MAX), &mut again);
    }
    run(&cluster, "old_docs", "UPDATE docs SET title = 'changed' WHERE id <= 10; DELETE FROM docs WHERE id = 300;");
    run(&cluster, "old_docs", "TRUNCATE docs; INSERT INTO docs VALUES (1000, 'after'), (1001, 'after');");
    let final_position = old.fence().expect("fence");
    let started = Instant::now();
    while !step(&mut core, &mut old, &mut new, final_position, &mut again) {
        assert!(started.elapsed() < Duration::from_secs(30), "not caught up: {:?}", core.checkpoint());
    }
    assert_eq!(again, 1, "the copy started again once");
    let checkpoint: Checkpoint = new.checkpoint().expect("checkpoint");
    assert_eq!(checkpoint.copy, CopyState::Done);
    assert_eq!(checkpoint.copies, 2, "a second copy");
    assert!(checkpoint.applied >= final_position);
    assert_eq!(
        rows(&cluster, "new_docs", "docs", "name"),
        vec![(1000, "after".to_string()), (1001, "after".to_string())]
    );
    let (expected, actual) = {
        let chunk = old.rows_chunk(&None, 1_000).expect("old rows");
        assert_eq!(chunk.rows.len(), 2);
        assert!(chunk.rows.iter().all(|(_, _, r)| r["title"] == Value::Text("after".into())));
        new.stage(&chunk.rows, true).expect("stage");
        new.compare_staged().expect("compare")
    };
    assert_eq!(expected, actual, "transform(old) equals the new database");
    old.remove_capture().expect("clean-up");
    assert_eq!(
        old.imago_objects()
            .expect("objects")
            .iter()
            .filter(|o| o.starts_with("slot") || o.starts_with("publication"))
            .count(),
        0,
        "no slot or publication left"
    );
}

/// Keys the old application's sequence handed out are never handed out again by the new one:
/// at the opening (the old database fenced), each new table's sequence is set past the old
/// table's that feeds it (ids 9 and 10 were deleted: the new application starts at 11, not 9)
/// and past the keys the copy wrote without it. Once open, the sequence is the application's
/// (an opening asked again does not move it back).
#[test]
fn the_new_applications_keys_continue_after_the_old_ones() {
    let Some(cluster) = ThrowawayCluster::start_for_test_with(ThrowawayOptions { fsync: false, ..Default::default() })
    else {
        return;
    };
    for db in ["old_seq", "new_seq"] {
        cluster.create_database(db).expect("create database");
    }
    run(
        &cluster,
        "old_seq",
        "CREATE TABLE docs (id bigserial PRIMARY KEY, title text); \
         INSERT INTO docs (title) SELECT 'doc ' || g FROM generate_series(1, 10) g; \
         DELETE FROM docs WHERE id > 8;",
    );
    // The new application's own migration: its key a sequence too.
    run(&cluster, "new_seq", "CREATE TABLE docs (id bigserial PRIMARY KEY, name text);");
    let (mut old, mut new, mut core) = docs(&cluster, "old_seq", "new_seq", 10);
    let mut again = 0;
    while !core.bulk_done() {
        step(&mut core, &mut old, &mut new, Position(u64::MAX), &mut again);
    }
    let final_position = old.fence().expect("fence");
    let started = Instant::now();
    while !step(&mut core, &mut old, &mut new, final_position, &mut again) {
        assert!(started.elapsed() < Duration::from_secs(30), "not caught up: {:?}", core.checkpoint());
    }
    assert_eq!(old.sequences().expect("sequences"), [("docs".to_string(), 10)].into_iter().collect());
    assert_eq!(perform(&mut old, &mut new, StoreOp::OpenNew), StoreResult::OpenedToClients);
    let insert = "INSERT INTO docs (name) VALUES ('new')";
    run(&cluster, "new_seq", insert);
    assert_eq!(perform(&mut old, &mut new, StoreOp::OpenNew), StoreResult::OpenedToClients, "asked again");
    run(&cluster, "new_seq", insert);
    let keys: Vec<i64> = rows(&cluster, "new_seq", "docs", "name").into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![1, 2, 3, 4, 5, 6, 7, 8, 11, 12]);
    old.remove_capture().expect("clean-up");
}

/// The drain's comparison, as the data node makes it: every current old row read a chunk at
/// a time and staged (none refused: each has its generated keys), then both checksums equal.
fn assert_new_equals_transform_of_old(old: &PgOldStore, new: &mut PgNewStore) {
    let mut after = None;
    let mut first = true;
    loop {
        let chunk = old.rows_chunk(&after, 100).expect("old rows");
        after = chunk.rows.last().map(|(t, k, _)| (t.clone(), *k)).or(after);
        assert_eq!(new.stage(&chunk.rows, first).expect("stage"), 0, "every old row has its keys");
        first = false;
        if chunk.last {
            break;
        }
    }
    let (expected, actual) = new.compare_staged().expect("compare");
    assert_eq!(expected, actual, "the new database differs from transform(old)");
}

/// The first column of each row `sql` returns from `db` (text).
fn column(cluster: &ThrowawayCluster, db: &str, sql: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = cluster.client(db, "postgres").await.expect("connect");
        client.query(sql, &[]).await.expect("rows").iter().map(|r| r.get::<_, String>(0)).collect()
    })
}

/// A split with a generated key and references both ways (`items` keeps its title and points at
/// its `prices` row, whose key the new database makes and which points back), copied in small
/// chunks while the application inserts, updates and deletes between them, then streamed
/// (whole transactions of many rows: runs that go as sets, with keys made and forgotten): the
/// new database ends equal to transform(old), with one price row per item, each pointing at
/// its own item, and no key made twice.
/// Databases `dbs` (old, new) and their stores for a split of `items(id, title, price)`
/// (`rows` rows): `items` keeps its title and a reference to its price, `prices` gets the price
/// under a key the new database makes, with a reference back.
fn split_items(cluster: &ThrowawayCluster, dbs: (&str, &str), rows: u32, upgrade: u64) -> (PgOldStore, PgNewStore) {
    for db in [dbs.0, dbs.1] {
        cluster.create_database(db).expect("create database");
    }
    run(
        cluster,
        dbs.0,
        &format!(
            "CREATE TABLE items (id bigint PRIMARY KEY, title text, price bigint); \
             INSERT INTO items SELECT g, 'item ' || g, g * 10 FROM generate_series(1, {rows}) g;"
        ),
    );
    let columns = ["id", "title", "price"].into_iter().map(String::from).collect();
    let schema = Schema { tables: [("items".to_string(), TableSchema { key: "id".into(), columns })].into() };
    let split = Transform::SplitTable {
        table: "items".into(),
        into: vec![
            SplitPart {
                table: "items".into(),
                columns: vec!["title".into()],
                references: vec![("price_id".into(), "prices".into())],
                ..Default::default()
            },
            SplitPart {
                table: "prices".into(),
                columns: vec!["price".into()],
                key: Some("price_id".into()),
                generated: true,
                references: vec![("item".into(), "items".into())],
            },
        ],
    };
    let mapping = Mapping::compile(&schema, &[split]).expect("mapping");
    assert!(mapping.rows_stand_alone(), "a split's rows stand alone: they can be compared by range");
    let old = PgOldStore::open(&cluster.connection_string(dbs.0), &schema, Names::for_upgrade(UpgradeId(upgrade)))
        .expect("open the old database");
    let new = PgNewStore::open(&cluster.connection_string(dbs.1), &mapping).expect("open the new database");
    (old, new)
}

#[test]
fn a_split_with_generated_keys_copies_and_streams_under_writes_and_ends_equal() {
    let Some(cluster) = ThrowawayCluster::start_for_test_with(ThrowawayOptions { fsync: false, ..Default::default() })
    else {
        return;
    };
    let (mut old, mut new) = split_items(&cluster, ("old_split", "new_split"), 400, 11);
    let mut core = TransformCore::new(new.checkpoint().expect("checkpoint"))
        .with_positions(Positions::Ordered)
        .with_copy_chunk_rows(37);
    let mut again = 0;
    let mut round = 0;
    while !core.bulk_done() {
        step(&mut core, &mut old, &mut new, Position(u64::MAX), &mut again);
        round += 1;
        // Between chunks: rows the copy has passed and rows it has not reached yet.
        run(
            &cluster,
            "old_split",
            &format!(
                "UPDATE items SET price = price + 1 WHERE id % 50 = {r}; \
                 DELETE FROM items WHERE id = {d}; \
                 INSERT INTO items VALUES ({i}, 'late', 7) ON CONFLICT DO NOTHING;",
                r = round % 50,
                d = 3 + round * 7,
                i = 1_000 + round
            ),
        );
    }
    // Streamed: transactions of many rows each (runs as sets), keys made and forgotten.
    run(&cluster, "old_split", "UPDATE items SET price = price * 2 WHERE id % 3 = 0;");
    run(&cluster, "old_split", "DELETE FROM items WHERE id % 5 = 0; INSERT INTO items VALUES (5, 'back', 1);");
    run(
        &cluster,
        "old_split",
        "BEGIN; INSERT INTO items SELECT g, 'new ' || g, g FROM generate_series(2000, 2100) g; \
         DELETE FROM items WHERE id BETWEEN 2000 AND 2010; \
         INSERT INTO items VALUES (2001, 'again', 1); COMMIT;",
    );
    let final_position = old.fence().expect("fence");
    let started = Instant::now();
    while !step(&mut core, &mut old, &mut new, final_position, &mut again) {
        assert!(started.elapsed() < Duration::from_secs(30), "not caught up: {:?}", core.checkpoint());
    }
    assert_eq!(again, 0);
    // transform(old) equals the new database: every old row staged (its keys looked up).
    assert_new_equals_transform_of_old(&old, &mut new);
    let items = column(&cluster, "old_split", "SELECT count(*)::text FROM items");
    let check = "SELECT count(*)::text || ' ' || count(DISTINCT p.price_id)::text || ' ' || \
                 count(*) FILTER (WHERE i.price_id = p.price_id)::text \
                 FROM prices p JOIN items i ON i.id = p.item::bigint";
    assert_eq!(
        column(&cluster, "new_split", check),
        vec![format!("{0} {0} {0}", items[0])],
        "one price per item, keys distinct, each item pointing at its own price"
    );
    let made = column(&cluster, "new_split", "SELECT (SELECT count(*) FROM imago_keys)::text");
    assert_eq!(made, items, "the key map holds one key per old row");
    let sets = new.sets();
    assert!(sets.changes > 400, "the copy and the stream's transactions went as sets: {sets:?}");
    assert_eq!(sets.refused, 0, "no set refused (each would have gone row by row)");
}

/// Pairs `(key, text)` that `sql` returns from `db`.
fn pairs(cluster: &ThrowawayCluster, db: &str, sql: &str) -> Vec<(i64, String)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = cluster.client(db, "postgres").await.expect("connect");
        client
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    })
}

/// The MediaWiki 1.4 → 1.5 plan shipped in `plans/`, on PostgreSQL: `cur` and `old` become
/// `page`, `revision` and `text` (revision and text ids generated by the new database, from
/// two old tables; `rev_page` looked up in the new `page` by an expression), while the wiki is
/// edited as 1.4 did (the current text archived into `old`, then `cur` updated, one
/// transaction), and the transform's stores are dropped and opened again (its process killed)
/// mid-copy and mid-stream. At the end the new database equals transform(old), every page
/// points at its newest revision and text, no old row got two generated keys, and the runs went
/// as sets with none refused.
#[test]
fn mediawiki_1_4_becomes_1_5_on_postgresql_while_it_is_edited_and_the_transform_is_killed() {
    let Some(cluster) = ThrowawayCluster::start_for_test_with(ThrowawayOptions { fsync: false, ..Default::default() })
    else {
        return;
    };
    for db in ["wiki14", "wiki15"] {
        cluster.create_database(db).expect("create database");
    }
    let plan = protocol::plan::Plan::from_toml("mediawiki-1.5.toml", include_str!("../../../plans/mediawiki-1.5.toml"))
        .expect("plan");
    let mapping = plan.mapping().expect("mapping");
    run(
        &cluster,
        "wiki14",
        "CREATE TABLE cur (cur_id bigserial PRIMARY KEY, cur_namespace integer, cur_title text, cur_text text, \
                           cur_comment text, cur_user integer, cur_timestamp text); \
         CREATE TABLE old (old_id bigserial PRIMARY KEY, old_namespace integer, old_title text, old_text text, \
                           old_comment text, old_user integer, old_timestamp text); \
         INSERT INTO cur (cur_namespace, cur_title, cur_text, cur_comment, cur_user, cur_timestamp) \
           SELECT g % 3, 'Page_' || g, 'text ' || g, 'created', 1, '00000000' FROM generate_series(1, 120) g;",
    );
    // MediaWiki 1.5's own tables, typed as its installer makes them (tables Imago makes itself
    // have `text` columns where the plan does not say: `page_namespace = :old_namespace` would
    // then compare text with an integer, which PostgreSQL refuses).
    run(
        &cluster,
        "wiki15",
        "CREATE TABLE page (page_id bigint PRIMARY KEY, page_namespace integer, page_title text, page_latest bigint);          CREATE TABLE revision (rev_id bigint PRIMARY KEY, rev_comment text, rev_user integer, rev_timestamp text,                                 rev_page bigint, rev_text_id bigint);          CREATE TABLE text (old_id bigint PRIMARY KEY, old_text text);",
    );
    let mut clock = 0u64;
    // An edit as MediaWiki 1.4 made it: the current text archived into `old`, then `cur` holds
    // the new text.
    let edit = |page: u64, clock: &mut u64| {
        *clock += 1;
        let t = *clock;
        run(
            &cluster,
            "wiki14",
            &format!(
                "BEGIN; \
                 INSERT INTO old (old_namespace, old_title, old_text, old_comment, old_user, old_timestamp) \
                   SELECT cur_namespace, cur_title, cur_text, cur_comment, cur_user, cur_timestamp FROM cur WHERE cur_id = {page}; \
                 UPDATE cur SET cur_text = 'text {page} at {t}', cur_comment = 'edit {t}', cur_user = {u}, \
                   cur_timestamp = '{t:08}' WHERE cur_id = {page}; \
                 COMMIT;",
                u = t % 7
            ),
        );
    };
    for i in 0..150 {
        edit(i % 120 + 1, &mut clock);
    }
    let open = || {
        let old =
            PgOldStore::open(&cluster.connection_string("wiki14"), &plan.old_schema, Names::for_upgrade(UpgradeId(12)))
                .expect("open the old database");
        let new = PgNewStore::open(&cluster.connection_string("wiki15"), &mapping).expect("open the new database");
        let core = TransformCore::new(new.checkpoint().expect("checkpoint"))
            .with_positions(Positions::Ordered)
            .with_copy_chunk_rows(25);
        (old, new, core)
    };
    let (mut old, mut new, mut core) = open();
    let (mut killed_copying, mut killed_streaming) = (false, false);
    let mut sets = 0;
    let mut again = 0;
    for step_no in 0..160u64 {
        if step_no % 2 == 0 {
            edit(step_no * 7 % 120 + 1, &mut clock);
        }
        if step_no % 3 == 0 {
            run(
                &cluster,
                "wiki14",
                &format!(
                    "INSERT INTO cur (cur_namespace, cur_title, cur_text, cur_comment, cur_user, cur_timestamp) \
                     VALUES (0, 'New_{step_no}', 'new', 'created', 2, '00000000')"
                ),
            );
        }
        if step_no % 70 == 6 {
            if core.bulk_done() {
                killed_streaming = true;
            } else {
                killed_copying = true;
            }
            let counts = new.sets();
            assert_eq!(counts.refused, 0, "no set refused");
            sets += counts.changes;
            drop((old, new, core));
            (old, new, core) = open();
        }
        step(&mut core, &mut old, &mut new, Position(u64::MAX), &mut again);
    }
    assert!(killed_copying && killed_streaming, "killed mid-copy and mid-stream");
    let final_position = old.fence().expect("fence");
    let started = Instant::now();
    while !step(&mut core, &mut old, &mut new, final_position, &mut again) {
        assert!(started.elapsed() < Duration::from_secs(30), "not caught up: {:?}", core.checkpoint());
    }
    assert_eq!(again, 0);
    let counts = new.sets();
    assert_eq!(counts.refused, 0, "no set refused");
    assert!(sets + counts.changes > 200, "the copy and the stream went as sets: {}", sets + counts.changes);

    // The store's own comparison: transform(old), staged beside the new tables, equals them.
    assert_new_equals_transform_of_old(&old, &mut new);

    // What 1.5 needs of the data, checked directly.
    let count = |db: &str, table: &str| pairs(&cluster, db, &format!("SELECT count(*), '' FROM {table}"))[0].0;
    let (curs, olds) = (count("wiki14", "cur"), count("wiki14", "old"));
    assert_eq!(count("wiki15", "page"), curs);
    assert_eq!(count("wiki15", "revision"), curs + olds, "one revision per cur row and per old row, none twice");
    assert_eq!(count("wiki15", "text"), curs + olds);
    assert_eq!(count("wiki15", "imago_keys"), 2 * (curs + olds), "a revision and a text per old row");
    let latest = pairs(
        &cluster,
        "wiki15",
        "SELECT p.page_id, t.old_text FROM page p JOIN revision r ON r.rev_id = p.page_latest \
         JOIN text t ON t.old_id = r.rev_text_id WHERE r.rev_page = p.page_id ORDER BY p.page_id",
    );
    assert_eq!(
        latest,
        pairs(&cluster, "wiki14", "SELECT cur_id, cur_text FROM cur ORDER BY cur_id"),
        "every page points at its newest revision, which points back and at the current text"
    );
    let orphans = count("wiki15", "revision r WHERE NOT EXISTS (SELECT 1 FROM page p WHERE p.page_id = r.rev_page)");
    assert_eq!(orphans, 0, "every archived revision belongs to a page");
}

#[path = "../../range_checks.rs"]
mod range_checks;

/// Ranges of old keys compared while the application writes, on PostgreSQL: a read's rows
/// show every transaction the stream delivered before it, and none past the comparison's
/// marker, which the stream brings after them; a range is found equal once the transform has
/// applied up to the marker (or left changed, when a transaction between the two touched it).
/// The drain then stages only the ranges changed since, and still sees a row of a clean range
/// changed by hand behind the transform.
#[test]
fn ranges_compared_while_writes_go_on_leave_the_drain_only_what_changed() {
    let Some(cluster) = ThrowawayCluster::start_for_test_with(ThrowawayOptions { fsync: false, ..Default::default() })
    else {
        return;
    };
    let (mut old, mut new) = split_items(&cluster, ("old_ranges", "new_ranges"), 500, 21);
    let core = TransformCore::new(new.checkpoint().expect("checkpoint"))
        .with_positions(Positions::Ordered)
        .with_copy_chunk_rows(100);
    let mut drive = range_checks::Drive::new(&mut old, &mut new, core);
    while !drive.core.bulk_done() {
        drive.step();
    }
    let mut round = 0;
    let mut spoiled = 0;
    while let Some(outcome) = drive.compare_range(40) {
        assert_ne!(outcome, Some(false), "range {round} differs: {:?}", drive.ranges.report());
        spoiled += u32::from(outcome.is_none());
        round += 1;
        assert!(round < 300, "the comparison does not converge: {:?}", drive.ranges.report());
        if round <= 12 {
            run(
                &cluster,
                "old_ranges",
                &format!(
                    "UPDATE items SET price = price + 1 WHERE id = {u}; DELETE FROM items WHERE id = {d}; \
                     INSERT INTO items VALUES ({i}, 'late', 7);",
                    u = round * 37 % 500 + 1,
                    d = round * 11,
                    i = 1_000 + round
                ),
            );
        }
    }
    let report = drive.ranges.report();
    assert!(report.ranges >= 12 && report.clean == report.ranges && report.differed == 0, "{report:?}");
    assert!(spoiled <= 12, "{spoiled} comparisons spoiled by 12 writes");
    // Rows by new table, each range as of its last comparison (all after the last write): what
    // the new tables hold (a price row per item, under a key the new database made).
    let tables: Vec<&str> = report.tables.iter().map(|t| t.table.as_str()).collect();
    assert_eq!(tables, ["items", "prices"], "{report:?}");
    for t in &report.tables {
        let held = column(&cluster, "new_ranges", &format!("SELECT count(*)::text FROM {}", t.table));
        let held: u64 = held[0].parse().expect("a count");
        assert_eq!((t.expected, t.actual), (held, held), "{t:?}");
    }
    run(&cluster, "old_ranges", "UPDATE items SET title = 'late' WHERE id = 250; DELETE FROM items WHERE id = 60;");
    let final_position = drive.old.fence().expect("fence");
    drive.catch_up(final_position, 1_000);
    assert!(drive.drain_matches(100), "transform(old) and new differ at the drain");
    assert!(
        drive.staged_rows > 0 && drive.staged_rows <= 2 * 40,
        "the drain staged {} old rows: the two changed ranges only",
        drive.staged_rows
    );
    // A fix by hand in a clean range, behind the transform (its owner disables the guard).
    run(
        &cluster,
        "new_ranges",
        "BEGIN; ALTER TABLE prices DISABLE TRIGGER USER; UPDATE prices SET price = '0' WHERE item = '10'; \
         ALTER TABLE prices ENABLE TRIGGER USER; COMMIT;",
    );
    assert!(!drive.drain_matches(100), "the drain sees the row changed in a clean range");
    drive.ranges.all_changed();
    let ranges = drive.ranges.report().ranges;
    let outcomes: Vec<_> = (0..ranges).map_while(|_| drive.compare_range(40)).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == Some(false)).count(), 1, "the range of item 10 differs: {outcomes:?}");
}

/// A table Imago makes types each column copied as it is (renamed or not) as the old database
/// does: the new application finds the types it had (an integer compares as one, a timestamp
/// sorts as one), and values keep their form. A type the old database made itself (an
/// enum) is not in the new database: such a column is `text`. Copied and streamed, the new
/// database ends equal to transform(old).
#[test]
fn imago_made_tables_type_copied_columns_as_the_old_database_does() {
    let Some(cluster) = ThrowawayCluster::start_for_test_with(ThrowawayOptions { fsync: false, ..Default::default() })
    else {
        return;
    };
    for db in ["old_typed", "new_typed"] {
        cluster.create_database(db).expect("create database");
    }
    run(
        &cluster,
        "old_typed",
        "CREATE TYPE mood AS ENUM ('sad', 'happy'); \
         CREATE TABLE events (id bigint PRIMARY KEY, n integer, at timestamptz, price numeric(10,2), \
           label varchar(12), done boolean, doc jsonb, feel mood); \
         INSERT INTO events SELECT g, g, timestamptz '2026-01-01 00:00+00' + g * interval '1 hour', g * 1.25, \
           'e' || g, g % 2 = 0, jsonb_build_object('g', g), 'happy' FROM generate_series(1, 50) g;",
    );
    let columns = ["id", "n", "at", "price", "label", "done", "doc", "feel"];
    let schema = Schema {
        tables: [(
            "events".to_string(),
            TableSchema { key: "id".into(), columns: columns.iter().map(|c| c.to_string()).collect() },
        )]
        .into_iter()
        .collect(),
    };
    let transforms = vec![
        Transform::RenameColumn { table: "events".into(), from: "n".into(), to: "count".into() },
        Transform::AddColumn {
            table: "events".into(),
            column: "big".into(),
            default: Value::Null,
            expression: Some("CASE WHEN :count > 10 THEN 'yes' ELSE 'no' END".into()),
        },
    ];
    let mapping = Mapping::compile(&schema, &transforms).expect("mapping");
    let mut old = PgOldStore::open(&cluster.connection_string("old_typed"), &schema, Names::for_upgrade(UpgradeId(11)))
        .expect("open the old database");
    let types = old.live_types().expect("the old types");
    assert_eq!(types["events"]["at"], "timestamp with time zone");
    assert!(!types["events"].contains_key("feel"), "the old database's own type is left out: {types:?}");
    let mut new = PgNewStore::open_typed(&cluster.connection_string("new_typed"), &mapping, &types)
        .expect("open the new database");
    let made = column(
        &cluster,
        "new_typed",
        "SELECT column_name || ' ' || format_type(atttypid, atttypmod) FROM information_schema.columns c \
         JOIN pg_attribute a ON a.attrelid = 'events'::regclass AND a.attname = c.column_name \
         WHERE c.table_name = 'events' ORDER BY column_name",
    );
    assert_eq!(
        made,
        [
            "at timestamp with time zone",
            "big text",
            "count integer",
            "doc jsonb",
            "done boolean",
            "feel text",
            "id bigint",
            "label character varying(12)",
            "price numeric(10,2)",
        ]
    );
    let mut core = TransformCore::new(new.checkpoint().expect("checkpoint")).with_positions(Positions::Ordered);
    let mut again = 0;
    while !core.bulk_done() {
        step(&mut core, &mut old, &mut new, Position(u64::MAX), &mut again);
    }
    run(&cluster, "old_typed", "UPDATE events SET n = 99, price = 0.5, doc = '{\"x\": [1, 2]}' WHERE id = 3;");
    let final_position = old.fence().expect("fence");
    let started = Instant::now();
    while !step(&mut core, &mut old, &mut new, final_position, &mut again) {
        assert!(started.elapsed() < Duration::from_secs(30), "not caught up: {:?}", core.checkpoint());
    }
    let row = column(
        &cluster,
        "new_typed",
        "SELECT concat_ws(' ', count, big, price, at, doc::text, done, label) FROM events WHERE id IN (3, 11) ORDER BY id",
    );
    assert_eq!(
        row,
        [
            "99 yes 0.50 2026-01-01 03:00:00+00 {\"x\": [1, 2]} f e3",
            "11 yes 13.75 2026-01-01 11:00:00+00 {\"g\": 11} f e11",
        ]
    );
    assert_new_equals_transform_of_old(&old, &mut new);
    old.remove_capture().expect("clean-up");
}
