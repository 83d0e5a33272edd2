//! `PgNew` against a live server: the guard until the switch, batches compared-and-set with
//! their checkpoint, generated keys made once, the plan's expressions and statements run by the
//! database (checked at open), the scratch copy shadowing the new tables, clean-up, and a
//! property test that runs the same batches through PostgreSQL and the store in memory.
//!
//! One throwaway cluster serves the whole binary (one test, a database per section), so that a
//! run starts PostgreSQL once.

use std::collections::BTreeMap;

use imago_node_postgres::new::{GUARD_SQLSTATE, GUARD_TRIGGER};
use imago_node_postgres::throwaway::{ThrowawayCluster, ThrowawayOptions};
use imago_node_postgres::{PgError, PgNew};
use node_core::duties::validate::row_hash;
use node_core::store::{Batch, Checkpoint, CopyState, MemStore, NewStore, StoreError, StoredRow};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use protocol::schema::{
    ColumnType, Mapping, Row, RowOp, Schema, SplitPart, TableSchema, Transform, Value, REQUEST_LOG_TABLE,
};
use protocol::Position;
use tokio::runtime::Runtime;

fn row(pairs: &[(&str, Value)]) -> Row {
    pairs.iter().map(|(c, v)| (c.to_string(), v.clone())).collect()
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn table(key: &str, columns: &[&str]) -> TableSchema {
    TableSchema { key: key.into(), columns: columns.iter().map(|c| c.to_string()).collect() }
}

fn schema(tables: &[(&str, TableSchema)]) -> Schema {
    Schema { tables: tables.iter().map(|(n, t)| (n.to_string(), t.clone())).collect() }
}

fn upsert(table: &str, key: i64, pairs: &[(&str, Value)]) -> RowOp {
    RowOp::Upsert { table: table.into(), key, row: row(pairs) }
}

fn stored(op: &RowOp) -> StoredRow {
    match op {
        RowOp::Upsert { table, key, row } => (table.clone(), *key, row.clone()),
        RowOp::Delete { .. } => panic!("a delete is not a row"),
    }
}

fn at(applied: u64) -> Checkpoint {
    Checkpoint { applied: Position(applied), copy: CopyState::Done, copies: 1 }
}

/// The next batch on top of what `new` holds.
async fn batch(new: &mut PgNew, applied: u64, reset: bool, ops: Vec<RowOp>) -> Batch {
    Batch { base: new.checkpoint().await.unwrap(), reset, ops, checkpoint: at(applied) }
}

async fn apply(new: &mut PgNew, applied: u64, ops: Vec<RowOp>) {
    let b = batch(new, applied, false, ops).await;
    new.apply_batch(&b).await.unwrap().unwrap();
}

/// A database of its own for a section, and its connection string.
fn database(cluster: &ThrowawayCluster, name: &str) -> String {
    cluster.create_database(name).unwrap_or_else(|e| panic!("create database {name}: {e}"));
    cluster.connection_string(name)
}

#[test]
fn the_new_side_against_a_live_server() {
    let Some(cluster) = ThrowawayCluster::start_for_test_with(ThrowawayOptions { fsync: false, ..Default::default() })
    else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(the_guard_refuses_other_sessions_until_the_switch_and_stays_gone(&cluster));
    rt.block_on(held_writers_wait_for_the_opening_and_are_refused_after_a_release(&cluster));
    rt.block_on(a_stale_or_refused_batch_changes_nothing(&cluster));
    rt.block_on(a_replayed_change_makes_no_second_generated_key(&cluster));
    rt.block_on(expressions_run_in_the_database_and_staging_reads_the_scratch_copy(&cluster));
    rt.block_on(an_expression_the_database_rejects_is_refused_at_open_naming_its_transform(&cluster));
    rt.block_on(the_plans_own_statements_run_for_an_old_tables_rows(&cluster));
    rt.block_on(live_tables_are_checked_and_their_types_taken(&cluster));
    rt.block_on(a_lock_timeout_or_a_lost_connection_is_unavailable_and_passes(&cluster));
    postgres_runs_the_mapping_as_the_in_memory_store_does(&cluster, &rt);
    sets_leave_what_row_by_row_leaves(&cluster, &rt);
    rt.block_on(a_new_table_named_like_a_type_stages_compares_and_opens(&cluster));
    rt.block_on(generated_keys_come_from_the_tables_own_sequence(&cluster));
}

/// A table the new application made with a sequence for its key (`bigserial`): the keys Imago
/// makes for it are that sequence's values, row by row and in sets, so the new application's
/// own inserts after the switch never meet one; a replayed change takes none.
async fn generated_keys_come_from_the_tables_own_sequence(cluster: &ThrowawayCluster) {
    let conn = database(cluster, "sequenced");
    let (app, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    app.batch_execute(
        "CREATE TABLE revision (rev_id bigserial PRIMARY KEY, text text, page bigint);          SELECT setval('revision_rev_id_seq', 1000);",
    )
    .await
    .unwrap();
    let mut new = PgNew::open(&conn, &pages_mapping()).await.unwrap();
    let cur = |k: i64, t: &str| upsert("cur", k, &[("id", Value::Int(k)), ("text", text(t))]);
    // Row by row (two changes), then a set (six).
    apply(&mut new, 1, vec![cur(1, "a"), cur(2, "b")]).await;
    apply(&mut new, 2, (3..=8).map(|k| cur(k, "c")).collect()).await;
    assert_eq!(new.sets().changes, 6);
    let made: Vec<i64> = new.rows("revision").await.unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(made, (1001..=1008).collect::<Vec<_>>(), "the sequence's values, in the changes' order");
    // A replay takes no key; a delete and an insert again take the next value.
    apply(&mut new, 3, vec![cur(1, "a"), cur(2, "b2"), cur(3, "c"), cur(4, "c")]).await;
    apply(&mut new, 4, vec![RowOp::Delete { table: "cur".into(), key: 1 }, cur(1, "again")]).await;
    let made: Vec<i64> = new.rows("revision").await.unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(made, (1002..=1009).collect::<Vec<_>>());
    new.open_to_clients().await.unwrap();
    app.batch_execute("INSERT INTO revision (text, page) VALUES ('by the new application', 1)").await.unwrap();
    let max = app.query_one("SELECT max(rev_id) FROM revision", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(max, 1010, "the new application's next key follows Imago's");
}

/// A new table named `text` (MediaWiki 1.5 has one): while its scratch copy exists, a temporary
/// table's row type would shadow the type `text` in every `::text` cast of the session (staging
/// refused every row; the opening's `setval($1::text::regclass, …)` would fail). Regression.
async fn a_new_table_named_like_a_type_stages_compares_and_opens(cluster: &ThrowawayCluster) {
    let conn = database(cluster, "typed_names");
    let old = schema(&[("notes", table("id", &["id", "body", "n"]))]);
    let transforms = [
        Transform::RenameTable { table: "notes".into(), to: "text".into() },
        Transform::ChangeType { table: "text".into(), column: "n".into(), to: ColumnType::Int, expression: None },
    ];
    let mapping = Mapping::compile(&old, &transforms).unwrap();
    // The new application's own table, its key a sequence (which the opening sets).
    let (app, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    app.batch_execute("CREATE TABLE text (id bigserial PRIMARY KEY, body text, n bigint)").await.unwrap();
    let mut new = PgNew::open(&conn, &mapping).await.unwrap();
    let note =
        |k: i64| upsert("notes", k, &[("id", Value::Int(k)), ("body", text(&format!("b{k}"))), ("n", text("7"))]);
    let notes: Vec<RowOp> = (1..=6).map(note).collect();
    apply(&mut new, 1, notes.clone()).await;
    let rows: Vec<StoredRow> = notes.iter().map(stored).collect();
    // Row by row (two rows: no set), then the rest as a set.
    assert_eq!(new.stage(&rows[..2], true).await.unwrap(), 0, "staged row by row, with `::text` casts");
    assert_eq!(new.stage(&rows[2..], false).await.unwrap(), 0);
    let (expected, actual) = new.compare_staged().await.unwrap();
    assert_eq!(expected, actual);
    // The scratch copy still there (a lost answer may be asked again): the opening sets the
    // sequence with a `::text::regclass` cast.
    let sequences = [("notes".to_string(), 6)].into_iter().collect();
    new.open_to_clients_after(&sequences).await.unwrap();
    assert!(new.is_open_to_clients().await.unwrap());
    app.batch_execute("INSERT INTO text (body) VALUES ('new')").await.unwrap();
    let id = app.query_one("SELECT max(id) FROM text", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(id, 7, "the new application's keys continue after the old ones");
}

fn users_mapping() -> Mapping {
    let old = schema(&[("users", table("id", &["id", "name"]))]);
    let rename = Transform::RenameColumn { table: "users".into(), from: "name".into(), to: "nickname".into() };
    Mapping::compile(&old, &[rename]).unwrap()
}

async fn the_guard_refuses_other_sessions_until_the_switch_and_stays_gone(cluster: &ThrowawayCluster) {
    let conn = database(cluster, "guard");
    let mapping = users_mapping();
    let mut new = PgNew::open(&conn, &mapping).await.unwrap();
    assert!(!new.is_open_to_clients().await.unwrap());
    apply(&mut new, 1, vec![upsert("users", 1, &[("id", Value::Int(1)), ("name", text("ann"))])]).await;
    let console = cluster.client("guard", "postgres").await.unwrap();
    for sql in [
        "INSERT INTO users (id, nickname) VALUES (2, 'bob')",
        "UPDATE users SET nickname = 'x'",
        "DELETE FROM users",
        "TRUNCATE users",
        "INSERT INTO imago_requests (key) VALUES (1)",
    ] {
        let e = console.batch_execute(sql).await.expect_err(sql);
        let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {e:?}"));
        assert_eq!(db.code().code(), GUARD_SQLSTATE, "{sql}");
        assert!(db.message().contains("not switched to yet"), "{sql}: {}", db.message());
    }
    // Not even with the replication role's trick.
    let e = console
        .batch_execute("SET session_replication_role = replica; INSERT INTO users (id, nickname) VALUES (2, 'bob')")
        .await
        .expect_err("session_replication_role does not get around the guard");
    assert_eq!(e.code().map(|c| c.code()), Some(GUARD_SQLSTATE));
    console.batch_execute("RESET session_replication_role").await.unwrap();
    // Opened again before the switch: still guarded, and the transform still writes.
    drop(new);
    let mut new = PgNew::open(&conn, &mapping).await.unwrap();
    assert!(!new.is_open_to_clients().await.unwrap());
    assert!(console.batch_execute("DELETE FROM users").await.is_err());
    apply(&mut new, 2, vec![upsert("users", 3, &[("id", Value::Int(3)), ("name", text("cy"))])]).await;
    new.open_to_clients().await.unwrap();
    new.open_to_clients().await.unwrap();
    assert!(new.is_open_to_clients().await.unwrap());
    console.batch_execute("INSERT INTO users (id, nickname) VALUES (2, 'bob')").await.unwrap();
    // Opened again after the switch (a restarted node): the guard is not made again.
    drop(new);
    let mut new = PgNew::open(&conn, &mapping).await.unwrap();
    assert!(new.is_open_to_clients().await.unwrap());
    console.batch_execute("UPDATE users SET nickname = 'b' WHERE id = 2").await.unwrap();
    let names: Vec<(i64, Value)> =
        new.rows("users").await.unwrap().into_iter().map(|(k, r)| (k, r["nickname"].clone())).collect();
    assert_eq!(names, vec![(1, text("ann")), (2, text("b")), (3, text("cy"))]);
    let objects = new.imago_objects().await.unwrap();
    assert!(!objects.iter().any(|o| o.contains(GUARD_TRIGGER)), "{objects:?}");
    assert!(objects.contains(&"table imago_checkpoint".to_string()), "{objects:?}");
    new.remove_imago().await.unwrap();
    assert_eq!(new.imago_objects().await.unwrap(), Vec::<String>::new(), "nothing of Imago but the request log");
}

/// Waits until a session waits for a lock on `table` (the lock manager says so).
async fn until_a_writer_waits(console: &tokio_postgres::Client, table: &str) {
    for _ in 0..500 {
        let row = console
            .query_one("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1::text::regclass", &[&table])
            .await
            .unwrap();
        if row.get::<_, i64>(0) > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no writer waits on {table}");
}

async fn held_writers_wait_for_the_opening_and_are_refused_after_a_release(cluster: &ThrowawayCluster) {
    let conn = database(cluster, "hold");
    let mapping = users_mapping();
    let mut new = PgNew::open(&conn, &mapping).await.unwrap();
    apply(&mut new, 1, vec![upsert("users", 1, &[("id", Value::Int(1)), ("name", text("ann"))])]).await;
    let console = cluster.client("hold", "postgres").await.unwrap();

    // Held, then released (an aborted freeze): the waiting writer meets the guard.
    new.hold_writers().await.unwrap();
    new.hold_writers().await.unwrap();
    let writer = cluster.client("hold", "postgres").await.unwrap();
    let write =
        tokio::spawn(async move { writer.batch_execute("INSERT INTO users (id, nickname) VALUES (2, 'bob')").await });
    until_a_writer_waits(&console, "users").await;
    let read = console.query_one("SELECT count(*) FROM users", &[]).await.unwrap();
    assert_eq!(read.get::<_, i64>(0), 1, "reads go on while writers are held");
    new.release_writers().await.unwrap();
    new.release_writers().await.unwrap();
    let refused = write.await.unwrap().expect_err("the guard refuses a released writer");
    assert_eq!(refused.code().map(|c| c.code()), Some(GUARD_SQLSTATE));
    // The transform writes after a release, and a batch while held lets the writers go first.
    apply(&mut new, 2, vec![upsert("users", 3, &[("id", Value::Int(3)), ("name", text("cy"))])]).await;
    new.hold_writers().await.unwrap();
    apply(&mut new, 3, vec![upsert("users", 4, &[("id", Value::Int(4)), ("name", text("dee"))])]).await;

    // Held, then opened (a committed switch): the waiting writer goes in.
    new.hold_writers().await.unwrap();
    let writer = cluster.client("hold", "postgres").await.unwrap();
    let write =
        tokio::spawn(async move { writer.batch_execute("INSERT INTO users (id, nickname) VALUES (2, 'bob')").await });
    until_a_writer_waits(&console, "users").await;
    new.open_to_clients().await.unwrap();
    write.await.unwrap().expect("the held writer goes in once the store is open");
    assert!(new.is_open_to_clients().await.unwrap());
    let keys: Vec<i64> = new.rows("users").await.unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![1, 2, 3, 4]);
    // Holding after the opening holds nothing for long: a release lets writers on, unguarded.
    new.hold_writers().await.unwrap();
    new.release_writers().await.unwrap();
    console.batch_execute("UPDATE users SET nickname = 'b' WHERE id = 2").await.unwrap();
}

async fn a_stale_or_refused_batch_changes_nothing(cluster: &ThrowawayCluster) {
    let conn = database(cluster, "stale");
    let old = schema(&[("t", table("id", &["id", "n"]))]);
    let to_int = Transform::ChangeType { table: "t".into(), column: "n".into(), to: ColumnType::Int, expression: None };
    let mapping = Mapping::compile(&old, &[to_int]).unwrap();
    let mut new = PgNew::open(&conn, &mapping).await.unwrap();
    assert_eq!(new.checkpoint().await.unwrap(), Checkpoint::default());
    let t = |k: i64, n: &str| upsert("t", k, &[("id", Value::Int(k)), ("n", text(n))]);
    let first = batch(&mut new, 1, false, vec![t(1, "7")]).await;
    new.apply_batch(&first).await.unwrap().unwrap();
    let stored = new.checkpoint().await.unwrap();
    assert_eq!(stored, at(1));
    let before = new.checksum().await.unwrap();
    // Delivered again (a retried commit): refused by the compare-and-set, nothing applied.
    let again = Batch { ops: vec![t(1, "8"), t(2, "9")], ..first.clone() };
    let stale = new.apply_batch(&again).await.unwrap().unwrap_err();
    assert_eq!((stale.base, stale.found), (Checkpoint::default(), stored.clone()));
    assert_eq!(new.checksum().await.unwrap(), before);
    assert_eq!(new.rows("t").await.unwrap(), vec![(1, row(&[("id", Value::Int(1)), ("n", Value::Int(7))]))]);
    // A value that does not convert refuses the batch, its reset included.
    let refused = batch(&mut new, 2, true, vec![t(3, "3"), t(4, "x")]).await;
    let e = new.apply_batch(&refused).await.unwrap_err();
    assert!(matches!(&e, StoreError::Rejected(m) if m.contains("\"x\"")), "{e}");
    assert_eq!(new.checkpoint().await.unwrap(), stored);
    assert_eq!(new.checksum().await.unwrap(), before);
    // A checkpoint mid-copy round-trips.
    let copying = Checkpoint {
        applied: Position(u64::MAX - 5),
        copy: CopyState::Copying { snapshot_at: Position(1 << 40), after: Some(("t".into(), -4)) },
        copies: 3,
    };
    let b = Batch { base: stored, reset: false, ops: vec![], checkpoint: copying.clone() };
    new.apply_batch(&b).await.unwrap().unwrap();
    assert_eq!(new.checkpoint().await.unwrap(), copying);
}

/// `cur` split into `page` (its own key) and `revision` (a generated key the page points at).
fn pages_mapping() -> Mapping {
    let old = schema(&[("cur", table("id", &["id", "text"]))]);
    let split = Transform::SplitTable {
        table: "cur".into(),
        into: vec![
            SplitPart {
                table: "page".into(),
                references: vec![("latest".into(), "revision".into())],
                ..Default::default()
            },
            SplitPart {
                table: "revision".into(),
                columns: vec!["text".into()],
                key: Some("rev_id".into()),
                generated: true,
                references: vec![("page".into(), "page".into())],
            },
        ],
    };
    Mapping::compile(&old, &[split]).unwrap()
}

async fn a_replayed_change_makes_no_second_generated_key(cluster: &ThrowawayCluster) {
    let conn = database(cluster, "replay");
    let mut new = PgNew::open(&conn, &pages_mapping()).await.unwrap();
    let cur = |k: i64, t: &str| upsert("cur", k, &[("id", Value::Int(k)), ("text", text(t))]);
    apply(&mut new, 1, vec![cur(1, "a"), cur(2, "b")]).await;
    let keys = new.key_map().await.unwrap();
    assert_eq!(keys.len(), 2);
    // The same change again (a replay the compare-and-set lets through): no second key.
    apply(&mut new, 2, vec![cur(1, "a"), cur(1, "a2")]).await;
    assert_eq!(new.key_map().await.unwrap(), keys);
    let revisions = new.rows("revision").await.unwrap();
    assert_eq!(revisions.len(), 2);
    let latest =
        |rows: &[(i64, Row)], page: i64| rows.iter().find(|(k, _)| *k == page).map(|(_, r)| r["latest"].clone());
    let pages = new.rows("page").await.unwrap();
    let Some(Value::Int(first)) = latest(&pages, 1) else { panic!("{pages:?}") };
    let revision = revisions.iter().find(|(k, _)| *k == first).unwrap();
    assert_eq!((revision.1["text"].clone(), revision.1["page"].clone()), (text("a2"), Value::Int(1)));
    // Deleted and made again: a new key, above every key made before.
    apply(&mut new, 3, vec![RowOp::Delete { table: "cur".into(), key: 1 }]).await;
    assert!(new.rows("revision").await.unwrap().iter().all(|(k, _)| *k != first));
    apply(&mut new, 4, vec![cur(1, "again")]).await;
    let Some(Value::Int(again)) = latest(&new.rows("page").await.unwrap(), 1) else { panic!() };
    assert!(again > keys.iter().map(|(_, k)| *k).max().unwrap(), "a key is never made twice");
    // Staging looks keys up and makes none: an old row without one cannot be staged.
    assert_eq!(new.stage(&[stored(&cur(1, "again")), stored(&cur(2, "b"))], true).await.unwrap(), 0);
    let (expected, actual) = new.compare_staged().await.unwrap();
    assert_eq!(expected, actual);
    assert_eq!(new.compare_staged().await.unwrap(), (expected, actual), "asked again, the same answer");
    assert_eq!(new.stage(&[stored(&cur(9, "never seen"))], true).await.unwrap(), 1);
    assert_eq!(new.key_map().await.unwrap().len(), 2, "staging makes no key");
    // A reset (a copy that starts over) empties the key map with the tables.
    let b = batch(&mut new, 5, true, vec![cur(2, "b")]).await;
    new.apply_batch(&b).await.unwrap().unwrap();
    assert_eq!(new.key_map().await.unwrap().len(), 1);
    assert_eq!(new.rows("page").await.unwrap().len(), 1);
}

/// Authors and books; a book gets its author's name by an expression that reads the new
/// `authors` table, and a handle computed from its title.
fn books_mapping() -> Mapping {
    let old = schema(&[
        ("authors", table("id", &["id", "name"])),
        ("books", table("id", &["id", "author_id", "title", "pages"])),
    ]);
    Mapping::compile(&old, &books_transforms()).unwrap()
}

fn books_transforms() -> Vec<Transform> {
    vec![
        Transform::AddColumn {
            table: "books".into(),
            column: "author_name".into(),
            default: Value::Null,
            expression: Some("(SELECT name FROM authors WHERE authors.id = :author_id)".into()),
        },
        Transform::RenameColumn { table: "books".into(), from: "title".into(), to: "name".into() },
        Transform::AddColumn {
            table: "books".into(),
            column: "handle".into(),
            default: Value::Null,
            expression: Some("lower(:name) || '-' || :id".into()),
        },
        Transform::ChangeType {
            table: "books".into(),
            column: "pages".into(),
            to: ColumnType::Text,
            expression: Some("CASE WHEN :pages::int > 300 THEN 'long' ELSE 'short' END".into()),
        },
    ]
}

async fn expressions_run_in_the_database_and_staging_reads_the_scratch_copy(cluster: &ThrowawayCluster) {
    let conn = database(cluster, "books");
    let mut new = PgNew::open(&conn, &books_mapping()).await.unwrap();
    let author = |k: i64, n: &str| upsert("authors", k, &[("id", Value::Int(k)), ("name", text(n))]);
    let book = |k: i64, a: i64, t: &str, p: &str| {
        upsert(
            "books",
            k,
            &[("id", Value::Int(k)), ("author_id", Value::Int(a)), ("title", text(t)), ("pages", text(p))],
        )
    };
    // The author first, in the same batch: the book's expression sees it.
    apply(&mut new, 1, vec![author(1, "Ann"), book(10, 1, "Dune", "412"), book(11, 2, "Emma", "90")]).await;
    let books = new.rows("books").await.unwrap();
    let want = |id: i64, author: i64, name: Value, title: &str, handle: &str, pages: &str| {
        (
            id,
            row(&[
                ("id", Value::Int(id)),
                // A column Imago made from a plain column is `text` (the plan's schema has no types).
                ("author_id", text(&author.to_string())),
                ("name", text(title)),
                ("pages", text(pages)),
                ("author_name", name),
                ("handle", text(handle)),
            ]),
        )
    };
    assert_eq!(
        books,
        vec![want(10, 1, text("Ann"), "Dune", "dune-10", "long"), want(11, 2, Value::Null, "Emma", "emma-11", "short"),]
    );
    // A value the expression cannot take refuses the batch, alone or in a set (which the
    // database refuses; row by row then names the change at fault).
    let b = batch(&mut new, 2, false, vec![book(12, 1, "X", "many")]).await;
    let e = new.apply_batch(&b).await.unwrap_err();
    assert!(matches!(&e, StoreError::Rejected(m) if m.contains("books 12") && m.contains("22P02")), "{e}");
    let set = vec![book(20, 1, "A", "1"), book(21, 1, "B", "2"), book(12, 1, "X", "many"), book(22, 1, "C", "3")];
    let b = batch(&mut new, 2, false, set).await;
    let e = new.apply_batch(&b).await.unwrap_err();
    assert!(matches!(&e, StoreError::Rejected(m) if m.contains("books 12") && m.contains("22P02")), "{e}");
    assert_eq!(new.rows("books").await.unwrap().len(), 2, "nothing of the refused batch stays");
    // Staged, the book's expression reads the scratch `authors` (pg_temp first), not the real one.
    let staged = [author(1, "Bob"), book(10, 1, "Dune", "412")];
    assert_eq!(new.stage(&staged.iter().map(stored).collect::<Vec<_>>(), true).await.unwrap(), 0);
    let (expected, actual) = new.compare_staged().await.unwrap();
    let now = new.checksum().await.unwrap();
    let scratch = row_hash("authors", 1, &row(&[("id", Value::Int(1)), ("name", text("Bob"))])).wrapping_add(row_hash(
        "books",
        10,
        &want(10, 1, text("Bob"), "Dune", "dune-10", "long").1,
    ));
    assert_eq!(expected, scratch, "the staged book names the staged author");
    assert_eq!(actual, now);
    // A batch drops the scratch copy: the real tables are written, the real author read.
    apply(&mut new, 2, vec![book(12, 1, "Solaris", "200")]).await;
    let books = new.rows("books").await.unwrap();
    assert_eq!(books[2], want(12, 1, text("Ann"), "Solaris", "solaris-12", "short"));
    let now = new.checksum().await.unwrap();
    assert_eq!(new.compare_staged().await.unwrap(), (0, now), "nothing staged since");
    // Everything staged: equal.
    let all = [author(1, "Ann"), book(10, 1, "Dune", "412"), book(11, 2, "Emma", "90"), book(12, 1, "Solaris", "200")];
    assert_eq!(new.stage(&all[..2].iter().map(stored).collect::<Vec<_>>(), true).await.unwrap(), 0);
    assert_eq!(new.stage(&all[2..].iter().map(stored).collect::<Vec<_>>(), false).await.unwrap(), 0);
    let (expected, actual) = new.compare_staged().await.unwrap();
    assert_eq!(expected, actual);
    assert_eq!(new.compare_staged().await.unwrap(), (expected, actual));
    // A row whose expression fails is counted, and leaves nothing behind.
    assert_eq!(new.stage(&[stored(&book(13, 1, "Y", "lots")), stored(&all[0])], true).await.unwrap(), 1);
}

async fn an_expression_the_database_rejects_is_refused_at_open_naming_its_transform(cluster: &ThrowawayCluster) {
    let conn = database(cluster, "rejected");
    let old = schema(&[("users", table("id", &["id", "name"]))]);
    let with = |expression: &str| {
        let transforms = vec![
            Transform::RenameColumn { table: "users".into(), from: "name".into(), to: "nickname".into() },
            Transform::AddColumn {
                table: "users".into(),
                column: "handle".into(),
                default: Value::Null,
                expression: Some(expression.into()),
            },
        ];
        Mapping::compile(&old, &transforms).unwrap()
    };
    let err = PgNew::open(&conn, &with("SELEC lower(:nickname)")).await.unwrap_err();
    assert!(matches!(&err, PgError::Expression { transform: 1, message } if message.contains("syntax error")), "{err}");
    let err = PgNew::open(&conn, &with("(SELECT nickname FROM nobody LIMIT 1)")).await.unwrap_err();
    assert!(matches!(&err, PgError::Expression { transform: 1, message } if message.contains("nobody")), "{err}");
    // Nothing of a refused open stays: no table, no guard.
    let console = cluster.client("rejected", "postgres").await.unwrap();
    let tables: i64 =
        console.query_one("SELECT count(*) FROM pg_class WHERE relname = 'users'", &[]).await.unwrap().get(0);
    assert_eq!(tables, 0);
    PgNew::open(&conn, &with("lower(:nickname)")).await.unwrap();
}

async fn the_plans_own_statements_run_for_an_old_tables_rows(cluster: &ThrowawayCluster) {
    let conn = database(cluster, "listings");
    let old = schema(&[("items", table("id", &["id", "title", "price_cents"]))]);
    let label = "upper(:name) || ' @ ' || to_char(:price_cents / 100.0, 'FM999990.00')";
    let transforms = |update: &str| {
        vec![
            Transform::RenameColumn { table: "items".into(), from: "title".into(), to: "name".into() },
            Transform::Sql {
                table: "items".into(),
                writes: vec![("listings".into(), table("id", &["id", "label"]))],
                insert: format!("INSERT INTO listings (id, label) VALUES (:id, {label})"),
                update: update.to_string(),
                delete: "DELETE FROM listings WHERE id = :id".into(),
            },
        ]
    };
    let update = format!("UPDATE listings SET label = {label} WHERE id = :id");
    let mapping = Mapping::compile(&old, &transforms(&update)).unwrap();
    let mut new = PgNew::open(&conn, &mapping).await.unwrap();
    let item = |k: i64, t: &str, p: i64| {
        upsert("items", k, &[("id", Value::Int(k)), ("title", text(t)), ("price_cents", Value::Int(p))])
    };
    apply(&mut new, 1, vec![item(1, "lamp", 1250), item(2, "desk", 9900)]).await;
    apply(
        &mut new,
        2,
        vec![item(1, "lamp", 1300), item(3, "chair", 4500), RowOp::Delete { table: "items".into(), key: 2 }],
    )
    .await;
    let labels: Vec<(i64, Value)> =
        new.rows("listings").await.unwrap().into_iter().map(|(k, r)| (k, r["label"].clone())).collect();
    assert_eq!(labels, vec![(1, text("LAMP @ 13.00")), (3, text("CHAIR @ 45.00"))]);
    let rows = [item(1, "lamp", 1300), item(3, "chair", 4500)].iter().map(stored).collect::<Vec<_>>();
    assert_eq!(new.stage(&rows, true).await.unwrap(), 0);
    let (expected, actual) = new.compare_staged().await.unwrap();
    assert_eq!(expected, actual, "transform(old) by the plan's statements equals the new table");
    let broken = Mapping::compile(&old, &transforms(&update.replace("UPDATE listings", "UPDATE listing"))).unwrap();
    let err = PgNew::open(&conn, &broken).await.unwrap_err();
    assert!(matches!(&err, PgError::Expression { transform: 1, message } if message.contains("listing")), "{err}");
}

async fn live_tables_are_checked_and_their_types_taken(cluster: &ThrowawayCluster) {
    let conn = database(cluster, "typed");
    let console = cluster.client("typed", "postgres").await.unwrap();
    console
        .batch_execute(
            "CREATE TABLE users (id integer PRIMARY KEY, nickname varchar(20), born date, score numeric(6, 2));",
        )
        .await
        .unwrap();
    let old = schema(&[("users", table("id", &["id", "name", "born", "score"]))]);
    let rename = Transform::RenameColumn { table: "users".into(), from: "name".into(), to: "nickname".into() };
    let mapping = Mapping::compile(&old, &[rename]).unwrap();
    let mut new = PgNew::open(&conn, &mapping).await.unwrap();
    let user = upsert(
        "users",
        1,
        &[("id", Value::Int(1)), ("name", text("ann")), ("born", text("1990-02-03")), ("score", text("12.5"))],
    );
    apply(&mut new, 1, vec![user]).await;
    let rows = new.rows("users").await.unwrap();
    assert_eq!(rows[0].1["born"], text("1990-02-03"));
    assert_eq!(rows[0].1["score"], text("12.50"), "the live column's type");
    let bad = upsert("users", 2, &[("id", Value::Int(2)), ("born", text("not a date"))]);
    let b = batch(&mut new, 2, false, vec![bad]).await;
    assert!(matches!(new.apply_batch(&b).await, Err(StoreError::Rejected(_))));
    // An expression whose type the live column cannot take is refused at open, naming it.
    let conn2 = database(cluster, "typed2");
    let console2 = cluster.client("typed2", "postgres").await.unwrap();
    console2.batch_execute("CREATE TABLE users (id bigint PRIMARY KEY, name text, score integer)").await.unwrap();
    let old2 = schema(&[("users", table("id", &["id", "name"]))]);
    let score = Transform::AddColumn {
        table: "users".into(),
        column: "score".into(),
        default: Value::Null,
        expression: Some("'x' || :name".into()),
    };
    let err = PgNew::open(&conn2, &Mapping::compile(&old2, &[score]).unwrap()).await.unwrap_err();
    assert!(matches!(&err, PgError::Expression { transform: 0, message } if message.contains("integer")), "{err}");
    // A live table with a column the plan lacks is refused, naming it.
    console.batch_execute("ALTER TABLE users ADD COLUMN extra text").await.unwrap();
    let err = PgNew::open(&conn, &mapping).await.unwrap_err();
    assert!(
        matches!(&err, PgError::Table { table, message } if table == "users" && message.contains("extra")),
        "{err}"
    );
}

async fn a_lock_timeout_or_a_lost_connection_is_unavailable_and_passes(cluster: &ThrowawayCluster) {
    // The caller's own settings stay (here a lock timeout), Imago's are added.
    let conn = format!("{} options='-c lock_timeout=200'", database(cluster, "lost"));
    let mut new = PgNew::open(&conn, &users_mapping()).await.unwrap();
    let user = |k: i64| upsert("users", k, &[("id", Value::Int(k)), ("name", text("u"))]);
    apply(&mut new, 1, vec![user(1)]).await;
    let console = cluster.client("lost", "postgres").await.unwrap();
    console.batch_execute("BEGIN; SELECT * FROM imago_checkpoint FOR UPDATE").await.unwrap();
    let b = Batch { base: at(1), reset: false, ops: vec![user(2)], checkpoint: at(2) };
    let e = new.apply_batch(&b).await.unwrap_err();
    assert!(matches!(&e, StoreError::Unavailable(m) if m.contains("55P03")), "{e}");
    console.batch_execute("COMMIT").await.unwrap();
    assert_eq!(new.checkpoint().await.unwrap(), at(1), "nothing of it applied");
    // The transform's session killed: a call fails (or finds it gone first), the next connects again.
    console
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = 'lost' AND application_name = 'imago-transform'",
        )
        .await
        .unwrap();
    let mut failures = 0;
    loop {
        match new.apply_batch(&b).await {
            Ok(Ok(())) => break,
            Err(StoreError::Unavailable(_)) if failures < 3 => {
                failures += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(new.checkpoint().await.unwrap(), at(2));
    assert_eq!(new.rows("users").await.unwrap().len(), 2);
    // The new session is the transform's too: the guard lets it write.
    apply(&mut new, 3, vec![user(3)]).await;
}

/// A mapping with every declarative form a store in memory runs too: renames of a table and a
/// column, a dropped column, a column with a default, conversions both ways, a merge, and a
/// split with a generated key and references.
fn every_declarative_form() -> (Schema, Mapping) {
    let old = schema(&[
        ("accounts", table("id", &["id", "email", "age"])),
        ("profiles", table("user_id", &["user_id", "bio"])),
        ("posts", table("id", &["id", "title", "body", "draft"])),
        ("tags", table("id", &["id", "label", "weight"])),
    ]);
    let transforms = vec![
        Transform::ChangeType {
            table: "accounts".into(),
            column: "age".into(),
            to: ColumnType::Text,
            expression: None,
        },
        Transform::RenameColumn { table: "accounts".into(), from: "email".into(), to: "mail".into() },
        Transform::MergeTables { table: "accounts".into(), with: "profiles".into(), into: "users".into() },
        Transform::DropColumn { table: "posts".into(), column: "draft".into() },
        Transform::AddColumn { table: "posts".into(), column: "lang".into(), default: text("en"), expression: None },
        Transform::SplitTable {
            table: "posts".into(),
            into: vec![
                SplitPart {
                    table: "posts".into(),
                    columns: vec!["title".into(), "lang".into()],
                    references: vec![("body_id".into(), "bodies".into())],
                    ..Default::default()
                },
                SplitPart {
                    table: "bodies".into(),
                    columns: vec!["body".into()],
                    key: Some("body_id".into()),
                    generated: true,
                    references: vec![("post".into(), "posts".into())],
                },
            ],
        },
        Transform::RenameTable { table: "tags".into(), to: "labels".into() },
        Transform::ChangeType {
            table: "labels".into(),
            column: "weight".into(),
            to: ColumnType::Int,
            expression: None,
        },
    ];
    let mapping = Mapping::compile(&old, &transforms).unwrap();
    (old, mapping)
}

#[derive(Clone, Debug)]
enum Change {
    Put { table: u8, key: i64, value: u8 },
    Delete { table: u8, key: i64 },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (0u8..5, 1i64..6, any::<u8>()).prop_map(|(table, key, value)| Change::Put { table, key, value }),
        1 => (0u8..5, 1i64..6).prop_map(|(table, key)| Change::Delete { table, key }),
    ]
}

fn old_op(change: &Change) -> RowOp {
    let name = |t: u8| ["accounts", "profiles", "posts", "tags", REQUEST_LOG_TABLE][t as usize];
    match change {
        Change::Put { table, key, value } => {
            let v = text(&format!("v{value}"));
            let k = Value::Int(*key);
            let n = Value::Int(i64::from(*value));
            let row = match table {
                0 => row(&[("id", k), ("email", v), ("age", n)]),
                1 => row(&[("user_id", k), ("bio", v)]),
                2 => row(&[("id", k), ("title", v.clone()), ("body", v), ("draft", text("d"))]),
                3 => row(&[("id", k), ("label", v), ("weight", text(&value.to_string()))]),
                _ => row(&[
                    ("key", k),
                    ("origin", Value::Int(7)),
                    ("id", n.clone()),
                    ("position", n),
                    ("seq", Value::Null),
                ]),
            };
            RowOp::Upsert { table: name(*table).into(), key: *key, row }
        }
        Change::Delete { table, key } => RowOp::Delete { table: name(*table).into(), key: *key },
    }
}

/// The same batches on PostgreSQL and on the store in memory leave the same rows (generated
/// keys included) and checksums, and both stage transform(old) equal to what they hold. Each
/// case starts with a reset (a copy that starts over), on one database.
fn postgres_runs_the_mapping_as_the_in_memory_store_does(cluster: &ThrowawayCluster, rt: &Runtime) {
    let conn = database(cluster, "property");
    let (old_schema, mapping) = every_declarative_form();
    let new = std::cell::RefCell::new(rt.block_on(PgNew::open(&conn, &mapping)).unwrap());
    let mut runner = TestRunner::new(Config { cases: 16, failure_persistence: None, ..Config::default() });
    // Up to a dozen changes a batch: runs long enough to go as sets (generated keys too).
    let batches = proptest::collection::vec(proptest::collection::vec(change(), 1..12), 1..6);
    let result = runner.run(&batches, |batches| {
        let mut pg = new.borrow_mut();
        rt.block_on(async {
            let mut mem = MemStore::new_universe(mapping.clone());
            let mut old = MemStore::with_schema(&sch_with_log(&old_schema));
            for (n, changes) in batches.iter().enumerate() {
                let ops: Vec<RowOp> = changes.iter().map(old_op).collect();
                for op in &ops {
                    old.write(op);
                }
                let base = pg.checkpoint().await.unwrap();
                let checkpoint = Checkpoint { applied: Position(base.applied.0 + 1), copy: CopyState::Done, copies: 1 };
                let batch = Batch { base: base.clone(), reset: n == 0, ops, checkpoint };
                pg.apply_batch(&batch).await.unwrap().unwrap();
                mem.apply_batch(&Batch { base: mem.checkpoint().unwrap(), ..batch.clone() }).unwrap().unwrap();
                for (table, rows) in mem.tables() {
                    let want: Vec<(i64, Row)> = rows.iter().map(|(k, r)| (*k, r.clone())).collect();
                    prop_assert_eq!(pg.rows(table).await.unwrap(), want, "{} after batch {}", table, n);
                }
                prop_assert_eq!(pg.checksum().await.unwrap(), mem.checksum().unwrap(), "after batch {}", n);
            }
            let rows: Vec<StoredRow> = old
                .tables()
                .iter()
                .flat_map(|(t, rows)| rows.iter().map(move |(k, r)| (t.clone(), *k, r.clone())))
                .collect();
            prop_assert_eq!(pg.stage(&rows, true).await.unwrap(), 0);
            prop_assert_eq!(mem.stage(&rows, true).unwrap(), 0);
            let (expected, actual) = pg.compare_staged().await.unwrap();
            prop_assert_eq!(expected, actual, "PostgreSQL: transform(old) differs from the new tables");
            prop_assert_eq!(mem.compare_staged().unwrap(), (expected, actual));
            Ok::<(), TestCaseError>(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(new.borrow().sets().changes > 0, "some runs went as sets");
}

/// The old schema with the request log (whose rows every mapping carries as they are).
fn sch_with_log(old: &Schema) -> Schema {
    let mut tables: BTreeMap<String, TableSchema> = old.tables.clone();
    tables.insert(REQUEST_LOG_TABLE.into(), table("key", &["key", "origin", "id", "position", "seq"]));
    Schema { tables }
}

/// Books and authors (an expression reads the new `authors`), tags (an `int` Imago converts)
/// and the request log, in random runs with repeated keys: a database that takes each batch
/// whole (runs as sets) ends with the rows of one that takes one change per batch (row by
/// row), and staging whole runs gives transform(old) equal to either.
fn sets_leave_what_row_by_row_leaves(cluster: &ThrowawayCluster, rt: &Runtime) {
    let mapping = {
        let old = schema(&[
            ("authors", table("id", &["id", "name"])),
            ("books", table("id", &["id", "author_id", "title", "pages"])),
            ("tags", table("id", &["id", "label", "weight"])),
        ]);
        let mut transforms = books_transforms();
        transforms.push(Transform::ChangeType {
            table: "tags".into(),
            column: "weight".into(),
            to: ColumnType::Int,
            expression: None,
        });
        Mapping::compile(&old, &transforms).unwrap()
    };
    let sets = std::cell::RefCell::new(rt.block_on(PgNew::open(&database(cluster, "sets"), &mapping)).unwrap());
    let rows = std::cell::RefCell::new(rt.block_on(PgNew::open(&database(cluster, "rows"), &mapping)).unwrap());
    let op = (0u8..4, 1i64..8, 0u8..6, proptest::option::of(0u16..600), any::<bool>()).prop_map(
        |(table, key, value, pages, delete)| {
            let name = ["authors", "books", "tags", REQUEST_LOG_TABLE][table as usize];
            if delete && value == 0 {
                return RowOp::Delete { table: name.into(), key };
            }
            let v = text(&format!("V{value}"));
            let row = match table {
                0 => row(&[("id", Value::Int(key)), ("name", v)]),
                1 => row(&[
                    ("id", Value::Int(key)),
                    ("author_id", Value::Int(i64::from(value))),
                    ("title", v),
                    ("pages", pages.map_or(Value::Null, |p| text(&p.to_string()))),
                ]),
                2 => row(&[("id", Value::Int(key)), ("label", v), ("weight", text(&format!(" {value}")))]),
                _ => row(&[("key", Value::Int(key)), ("origin", Value::Int(1)), ("id", Value::Int(key))]),
            };
            RowOp::Upsert { table: name.into(), key, row }
        },
    );
    let mut runner = TestRunner::new(Config { cases: 24, failure_persistence: None, ..Config::default() });
    let result = runner.run(&proptest::collection::vec(op, 4..40), |ops| {
        let (mut sets, mut rows) = (sets.borrow_mut(), rows.borrow_mut());
        rt.block_on(async {
            let base = sets.checkpoint().await.unwrap();
            let next = Position(base.applied.0 + 1);
            let whole = Batch { base, reset: false, ops: ops.clone(), checkpoint: at(next.0) };
            sets.apply_batch(&whole).await.unwrap().unwrap();
            for op in &ops {
                let base = rows.checkpoint().await.unwrap();
                let checkpoint = at(base.applied.0 + 1);
                rows.apply_batch(&Batch { base, reset: false, ops: vec![op.clone()], checkpoint })
                    .await
                    .unwrap()
                    .unwrap();
            }
            for table in ["authors", "books", "tags", REQUEST_LOG_TABLE] {
                prop_assert_eq!(sets.rows(table).await.unwrap(), rows.rows(table).await.unwrap(), "{}", table);
            }
            Ok::<(), TestCaseError>(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let mut sets = sets.into_inner();
    assert!(sets.sets().changes > 100, "the runs went as sets: {:?}", sets.sets());
    assert_eq!(sets.sets().refused, 0, "no set refused");
    // Staging goes as sets too: the authors and tags the batches left, read back as old rows.
    rt.block_on(async {
        let mut old = Vec::new();
        for (key, r) in sets.rows("authors").await.unwrap() {
            old.push(("authors".to_string(), key, r));
        }
        for (key, mut r) in sets.rows("tags").await.unwrap() {
            if let Some(Value::Int(w)) = r.get("weight").cloned() {
                r.insert("weight".into(), text(&w.to_string()));
            }
            old.push(("tags".to_string(), key, r));
        }
        let before = sets.sets().changes;
        assert_eq!(sets.stage(&old, true).await.unwrap(), 0);
        assert!(old.len() < 4 || sets.sets().changes > before, "staged as sets");
    });
}
