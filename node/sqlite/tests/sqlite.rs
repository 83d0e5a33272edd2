//! The SQLite adapter against real database files: capture, snapshots, fences (the
//! application's own connections refused), batches with their checkpoint across restarts,
//! checksums equal to the in-memory store's, and no object of Imago's left behind.

use imago_node_sqlite::{SqliteError, SqliteNew, SqliteOld};
use node_core::duties::transform::{TransformCore, Work};
use node_core::store::{Batch, ChangeRead, Checkpoint, CopyState, MemStore, NewStore, OldStore, StoreError};
use proptest::prelude::*;
use protocol::schema::{ColumnType, Mapping, Row, RowOp, Schema, SplitPart, TableSchema, Transform, Value};
use protocol::Position;
use rusqlite::Connection;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory of its own under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("imago-sqlite-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn users_schema() -> Schema {
    let mut tables = BTreeMap::new();
    tables.insert(
        "users".to_string(),
        TableSchema { key: "id".into(), columns: vec!["id".into(), "name".into(), "email".into(), "bio".into()] },
    );
    tables.insert("items".to_string(), TableSchema { key: "id".into(), columns: vec!["id".into(), "title".into()] });
    Schema { tables }
}

/// The application's database: the old schema, made by the application (not by Imago).
fn app_database(path: &str) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT, email TEXT, bio TEXT);
         CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, title TEXT);",
    )
    .unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    conn
}

fn row(pairs: &[(&str, Value)]) -> Row {
    pairs.iter().map(|(c, v)| (c.to_string(), v.clone())).collect()
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// The rows of a whole old store, read through the interface (current contents).
fn all_rows(old: &impl OldStore) -> Vec<(String, i64, Row)> {
    let mut rows = Vec::new();
    let mut after = None;
    loop {
        let chunk = old.rows_chunk(&after, 7).unwrap();
        after = chunk.rows.last().map(|(t, k, _)| (t.clone(), *k)).or(after);
        rows.extend(chunk.rows);
        if chunk.last {
            return rows;
        }
    }
}

/// One step of the transform core over the old store, as a data node takes it: the batch to
/// apply, if the step read anything (copy chunks of `chunk_rows`, stream reads of `changes`).
fn next_batch(core: &mut TransformCore, old: &mut SqliteOld, chunk_rows: usize, changes: usize) -> Option<Batch> {
    match core.next_work() {
        Work::Snapshot => {
            let (snapshot, at) = old.open_snapshot().unwrap();
            Some(core.copy_started(snapshot, at))
        }
        Work::CopyChunk { snapshot, after, .. } => {
            let chunk = old.snapshot_chunk(snapshot, &after, chunk_rows).unwrap();
            Some(core.copy_chunk(chunk.rows, chunk.last).unwrap())
        }
        Work::Stream { after, .. } => {
            let read = old.changes_after(after, changes).unwrap().changes;
            (!read.is_empty()).then(|| core.apply_changes(&read).unwrap())
        }
    }
}

/// How often the transform's process was killed mid-copy and mid-stream.
#[derive(Debug, Default)]
struct Kills {
    mid_copy: u32,
    mid_stream: u32,
}

impl Kills {
    /// A kill now, with the transform where `core` is.
    fn note(&mut self, core: &TransformCore) {
        if core.bulk_done() {
            self.mid_stream += 1;
        } else {
            self.mid_copy += 1;
        }
    }

    fn assert_both(&self) {
        assert!(self.mid_copy > 0 && self.mid_stream > 0, "killed mid-copy and mid-stream: {self:?}");
    }
}

#[test]
fn capture_sees_every_write_of_the_applications_own_connection_in_order() {
    let dir = TempDir::new();
    let path = dir.file("old.db");
    let app = app_database(&path);
    app.execute_batch("INSERT INTO users VALUES (1, 'ann', 'a@x', 'hi')").unwrap();
    let old = SqliteOld::open(&path, &users_schema()).unwrap();
    assert_eq!(old.captured().unwrap(), Position(0), "rows before capture are the snapshot's, not changes");
    app.execute_batch(
        "INSERT INTO users VALUES (2, 'bob', 'b@x', NULL);
         UPDATE users SET name = 'anna' WHERE id = 1;
         UPDATE users SET id = 3 WHERE id = 2;
         DELETE FROM users WHERE id = 1;
         INSERT OR REPLACE INTO items VALUES (5, 'lamp');
         INSERT OR REPLACE INTO items VALUES (5, 'desk');",
    )
    .unwrap();
    let ChangeRead { changes, captured: last, .. } = old.changes_after(Position(0), 100).unwrap();
    assert_eq!(last, Position(7));
    let ops: Vec<RowOp> = changes.iter().map(|(_, op)| op.clone()).collect();
    let upsert = |table: &str, key, r| RowOp::Upsert { table: table.into(), key, row: r };
    let delete = |table: &str, key| RowOp::Delete { table: table.into(), key };
    let bob = |id| row(&[("id", Value::Int(id)), ("name", text("bob")), ("email", text("b@x")), ("bio", Value::Null)]);
    assert_eq!(
        ops,
        vec![
            upsert("users", 2, bob(2)),
            upsert(
                "users",
                1,
                row(&[("id", Value::Int(1)), ("name", text("anna")), ("email", text("a@x")), ("bio", text("hi"))])
            ),
            // A key that changes is a delete of the old key and an upsert of the new one.
            delete("users", 2),
            upsert("users", 3, bob(3)),
            delete("users", 1),
            upsert("items", 5, row(&[("id", Value::Int(5)), ("title", text("lamp"))])),
            upsert("items", 5, row(&[("id", Value::Int(5)), ("title", text("desk"))])),
        ]
    );
    assert_eq!(changes.iter().map(|(p, _)| p.0).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
    let later = old.changes_after(Position(5), 1).unwrap().changes;
    assert_eq!(later.iter().map(|(p, _)| p.0).collect::<Vec<_>>(), vec![6], "a limit and a start");
}

#[test]
fn a_rolled_back_write_leaves_no_change_and_no_gap() {
    let dir = TempDir::new();
    let path = dir.file("old.db");
    let app = app_database(&path);
    let old = SqliteOld::open(&path, &users_schema()).unwrap();
    app.execute_batch("BEGIN; INSERT INTO items VALUES (1, 'a'); ROLLBACK;").unwrap();
    app.execute_batch("INSERT INTO items VALUES (2, 'b')").unwrap();
    let ChangeRead { changes, captured: last, .. } = old.changes_after(Position(0), 10).unwrap();
    assert_eq!((changes.len(), changes[0].0, last), (1, Position(1), Position(1)));
    // Pruned up to the last change, the numbering still goes on from it.
    let mut old = old;
    old.prune(Position(1)).unwrap();
    app.execute_batch("INSERT INTO items VALUES (3, 'c')").unwrap();
    let ChangeRead { changes, captured: last, .. } = old.changes_after(Position(1), 10).unwrap();
    assert_eq!((changes.len(), changes[0].0, last), (1, Position(2), Position(2)));
    drop(old);
    let old = SqliteOld::open(&path, &users_schema()).unwrap();
    assert_eq!(old.captured().unwrap(), Position(2), "and after a restart");
}

#[test]
fn a_snapshot_sees_the_rows_as_of_its_position_while_writers_go_on_and_dies_with_its_connection() {
    let dir = TempDir::new();
    let path = dir.file("old.db");
    let app = app_database(&path);
    for k in 1..=5 {
        app.execute(&format!("INSERT INTO items VALUES ({k}, 't{k}')"), []).unwrap();
    }
    let mut old = SqliteOld::open(&path, &users_schema()).unwrap();
    app.execute_batch("INSERT INTO items VALUES (6, 't6')").unwrap();
    let (snap, at) = old.open_snapshot().unwrap();
    assert_eq!(at, Position(1));
    // The application writes on, through its own connection, while the snapshot is open.
    app.execute_batch("INSERT INTO items VALUES (7, 't7'); DELETE FROM items WHERE id = 1;").unwrap();
    let mut keys = Vec::new();
    let mut after = None;
    loop {
        let chunk = old.snapshot_chunk(snap, &after, 4).unwrap();
        assert_eq!(chunk.position, Position(3), "a chunk names the store's position when it was read");
        after = chunk.rows.last().map(|(t, k, _)| (t.clone(), *k)).or(after);
        keys.extend(chunk.rows.iter().map(|(t, k, _)| (t.clone(), *k)));
        if chunk.last {
            break;
        }
    }
    let expected: Vec<(String, i64)> = (1..=6).map(|k| ("items".to_string(), k)).collect();
    assert_eq!(keys, expected, "as of position 1: key 6 in, key 7 not yet, key 1 not yet deleted");
    assert_eq!(old.snapshot_rows(snap).unwrap(), 6, "the copy's total, as of the snapshot");
    old.disconnect();
    assert!(matches!(old.snapshot_chunk(snap, &None, 4), Err(StoreError::SnapshotGone(s)) if s == snap));
    let (again, _) = old.open_snapshot().unwrap();
    assert_ne!(again, snap, "snapshot handles are not reused");
}

#[test]
fn the_fence_waits_for_the_writer_in_flight_then_refuses_every_connection_until_unfenced() {
    let dir = TempDir::new();
    let path = dir.file("old.db");
    let app = app_database(&path);
    let mut old = SqliteOld::open(&path, &users_schema()).unwrap();
    let writer_path = path.clone();
    // A transaction in flight on another connection: the fence must let it commit (and be
    // captured) before it reads the final position.
    let (begun_tx, begun) = std::sync::mpsc::channel();
    #[allow(clippy::disallowed_methods)] // a second process's writer, in a test of a real database
    let writer = std::thread::spawn(move || {
        let conn = app_database(&writer_path);
        conn.execute_batch("BEGIN IMMEDIATE; INSERT INTO items VALUES (1, 'in flight');").unwrap();
        begun_tx.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        conn.execute_batch("COMMIT").unwrap();
    });
    begun.recv().unwrap();
    let final_position = old.fence().unwrap();
    writer.join().unwrap();
    assert_eq!(final_position, Position(1), "the write in flight finished first and is inside the final position");
    assert!(old.is_fenced().unwrap());
    let refused = app.execute_batch("INSERT INTO items VALUES (2, 'late')").unwrap_err().to_string();
    assert!(refused.contains("imago") && refused.contains("fenced"), "{refused}");
    let refused = app.execute_batch("DELETE FROM items").unwrap_err().to_string();
    assert!(refused.contains("fenced"), "{refused}");
    assert_eq!(old.fence().unwrap(), final_position, "fencing again names the same final position");
    assert_eq!(old.captured().unwrap(), final_position, "nothing captured after the fence");
    old.unfence().unwrap();
    assert!(!old.is_fenced().unwrap());
    app.execute_batch("INSERT INTO items VALUES (2, 'after')").unwrap();
    assert_eq!(old.captured().unwrap(), Position(2));
}

#[test]
fn the_new_database_takes_writes_only_from_the_transform_until_the_switch() {
    let dir = TempDir::new();
    let path = dir.file("new.db");
    let mapping = Mapping::compile(&users_schema(), &[]).unwrap();
    let mut new = SqliteNew::open(&path, &mapping).unwrap();
    let console = Connection::open(&path).unwrap();
    let refused = console.execute_batch("INSERT INTO items VALUES (1, 'rogue')").unwrap_err().to_string();
    assert!(refused.contains("only Imago's transform writes it until the switch"), "{refused}");
    let one = |key, base: Checkpoint, applied| Batch {
        base,
        reset: false,
        ops: vec![RowOp::Upsert {
            table: "items".into(),
            key,
            row: row(&[("id", Value::Int(key)), ("title", text("t"))]),
        }],
        checkpoint: Checkpoint { applied: Position(applied), copy: CopyState::Done, copies: 1 },
    };
    new.apply_batch(&one(1, Checkpoint::default(), 1)).unwrap().unwrap();
    assert_eq!(new.rows("items").unwrap().len(), 1, "the transform's own write went in");
    // A node that restarts before the switch is still the only writer.
    drop(new);
    let mut new = SqliteNew::open(&path, &mapping).unwrap();
    assert!(console.execute_batch("DELETE FROM items").is_err());
    assert!(!new.is_open_to_clients().unwrap());
    new.open_to_clients().unwrap();
    console.execute_batch("INSERT INTO items VALUES (2, 'client')").unwrap();
    drop(new);
    let new = SqliteNew::open(&path, &mapping).unwrap();
    assert!(new.is_open_to_clients().unwrap(), "opened to clients for good, across restarts");
    console.execute_batch("INSERT INTO items VALUES (3, 'client')").unwrap();
}

/// Held writers wait instead of being refused: a writer with a busy timeout that comes while
/// the drain's hold stands goes in once the switch opens the database; after an abort's
/// release, the guard refuses it. (The window this closes: a router that learnt the commit
/// sends to the new application before the data node learns it.)
#[test]
fn held_writers_wait_for_the_opening_and_are_refused_after_a_release() {
    let dir = TempDir::new();
    let path = dir.file("new.db");
    let mapping = Mapping::compile(&users_schema(), &[]).unwrap();
    let write = |path: String, id: i64| {
        #[allow(clippy::disallowed_methods)] // the new application's writer, in a test of a real database
        std::thread::spawn(move || {
            let conn = Connection::open(&path).unwrap();
            conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
            let result = conn.execute_batch(&format!("INSERT INTO items VALUES ({id}, 'client')"));
            result.map_err(|e| e.to_string())
        })
    };

    // Aborted: the held writer is refused by the guard once released.
    let mut new = SqliteNew::open(&path, &mapping).unwrap();
    new.hold_writers().unwrap();
    new.hold_writers().unwrap();
    let writer = write(path.clone(), 1);
    #[allow(clippy::disallowed_methods)] // lets the writer reach the lock
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!writer.is_finished(), "the writer waits on the held lock");
    new.release_writers().unwrap();
    let result = writer.join().unwrap();
    assert!(result.is_err_and(|e| e.contains("only Imago's transform writes it")), "refused after the release");

    // Committed: the held writer goes in once the database opens, having waited for it.
    new.hold_writers().unwrap();
    let writer = write(path.clone(), 2);
    #[allow(clippy::disallowed_methods)] // lets the writer reach the lock
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!writer.is_finished(), "the writer waits on the held lock");
    new.open_to_clients().unwrap();
    let result = writer.join().unwrap();
    assert_eq!(result, Ok(()), "the held writer went in after the opening");
    assert!(new.is_open_to_clients().unwrap());
    assert_eq!(new.rows("items").unwrap().len(), 1);
    // A batch after a hold (a freeze aborted without a release seen) starts its own transaction.
    new.hold_writers().unwrap();
    let batch = Batch { base: Checkpoint::default(), reset: false, ops: Vec::new(), checkpoint: Checkpoint::default() };
    assert_eq!(new.apply_batch(&batch).unwrap(), Ok(()));
}

#[test]
fn a_batch_and_its_checkpoint_are_one_transaction_applied_once_across_restarts() {
    let dir = TempDir::new();
    let path = dir.file("new.db");
    let bio_is_a_number =
        Transform::ChangeType { table: "users".into(), column: "bio".into(), to: ColumnType::Int, expression: None };
    let mapping = Mapping::compile(&users_schema(), &[bio_is_a_number]).unwrap();
    let mut new = SqliteNew::open(&path, &mapping).unwrap();
    let at = |applied| Checkpoint { applied: Position(applied), copy: CopyState::Done, copies: 1 };
    let item = |key: i64, title: &str| RowOp::Upsert {
        table: "items".into(),
        key,
        row: row(&[("id", Value::Int(key)), ("title", text(title))]),
    };
    let first =
        Batch { base: Checkpoint::default(), reset: false, ops: vec![item(1, "a"), item(2, "b")], checkpoint: at(2) };
    new.apply_batch(&first).unwrap().unwrap();
    // The process dies; the checkpoint is read back from the database with the data.
    drop(new);
    let mut new = SqliteNew::open(&path, &mapping).unwrap();
    assert_eq!(new.checkpoint().unwrap(), at(2));
    let stale = new.apply_batch(&first).unwrap().unwrap_err();
    assert_eq!((stale.base, stale.found), (Checkpoint::default(), at(2)), "a batch delivered twice is refused");
    let next = Batch {
        base: at(2),
        reset: false,
        ops: vec![item(2, "b2"), RowOp::Delete { table: "items".into(), key: 1 }],
        checkpoint: at(3),
    };
    new.apply_batch(&next).unwrap().unwrap();
    let titles: Vec<(i64, Value)> =
        new.rows("items").unwrap().into_iter().map(|(k, r)| (k, r["title"].clone())).collect();
    assert_eq!(titles, vec![(2, text("b2"))]);
    // A copy that starts over empties every table with its first batch.
    let reset = Batch { base: at(3), reset: true, ops: vec![item(9, "z")], checkpoint: at(7) };
    new.apply_batch(&reset).unwrap().unwrap();
    assert_eq!(new.rows("items").unwrap().iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![9]);
    // A batch that fails halfway changes nothing, its checkpoint included.
    let bad = Batch {
        base: at(7),
        reset: false,
        ops: vec![
            item(10, "y"),
            RowOp::Upsert {
                table: "users".into(),
                key: 1,
                row: row(&[("id", Value::Int(1)), ("name", Value::Null), ("email", Value::Null), ("bio", text("x"))]),
            },
        ],
        checkpoint: at(8),
    };
    let refused = new.apply_batch(&bad).unwrap_err();
    assert!(matches!(&refused, StoreError::Rejected(why) if why.contains("\"x\"")), "{refused}");
    assert_eq!(new.checkpoint().unwrap(), at(7));
    assert_eq!(new.rows("items").unwrap().len(), 1);
}

#[test]
fn checksums_equal_the_in_memory_stores_for_the_same_rows() {
    let dir = TempDir::new();
    let mapping = Mapping::compile(&users_schema(), &[]).unwrap();
    let mut new = SqliteNew::open(&dir.file("new.db"), &mapping).unwrap();
    let mut mem = MemStore::with_schema(&mapping.new_schema());
    let ops = vec![
        RowOp::Upsert {
            table: "users".into(),
            key: 4,
            row: row(&[("id", Value::Int(4)), ("name", text("é")), ("email", Value::Null), ("bio", text(""))]),
        },
        RowOp::Upsert { table: "items".into(), key: -3, row: row(&[("id", Value::Int(-3)), ("title", Value::Int(7))]) },
    ];
    let batch = Batch { base: Checkpoint::default(), reset: false, ops, checkpoint: Checkpoint::default() };
    let batch = Batch { checkpoint: Checkpoint { applied: Position(1), ..Checkpoint::default() }, ..batch };
    new.apply_batch(&batch).unwrap().unwrap();
    mem.apply_batch(&batch).unwrap().unwrap();
    assert_eq!(new.checksum().unwrap(), mem.checksum().unwrap());
    assert_ne!(new.checksum().unwrap(), 0);
}

#[test]
fn live_tables_that_differ_from_the_plan_are_refused_with_the_table_and_column() {
    let dir = TempDir::new();
    let path = dir.file("old.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE items (id INTEGER PRIMARY KEY, title TEXT, price REAL)").unwrap();
    let items = |columns: &[&str], key: &str| Schema {
        tables: [(
            "items".to_string(),
            TableSchema { key: key.into(), columns: columns.iter().map(|c| c.to_string()).collect() },
        )]
        .into(),
    };
    let err = SqliteOld::open(&path, &items(&["id", "title"], "id")).unwrap_err().to_string();
    assert!(err.contains("`items`") && err.contains("`price`") && err.contains("not in the plan"), "{err}");
    let err = SqliteOld::open(&path, &items(&["id", "title", "price", "color"], "id")).unwrap_err().to_string();
    assert!(err.contains("`color`") && err.contains("lacks"), "{err}");
    let err = SqliteOld::open(&path, &items(&["id", "title", "price"], "title")).unwrap_err().to_string();
    assert!(err.contains("INTEGER PRIMARY KEY"), "{err}");
    let err = SqliteOld::open(
        &path,
        &Schema { tables: [("nope".to_string(), items(&["id"], "id").tables["items"].clone())].into() },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`nope`") && err.contains("no such table"), "{err}");
    assert!(SqliteOld::open(&path, &items(&["id", "title", "price"], "id")).is_ok());
}

#[test]
fn a_value_imago_cannot_carry_never_fails_the_applications_write_and_is_reported_by_name() {
    let dir = TempDir::new();
    let path = dir.file("old.db");
    // No type affinity on `title`: SQLite keeps what it is given (a TEXT column would have
    // stored the REAL as text).
    let app = Connection::open(&path).unwrap();
    app.execute_batch("CREATE TABLE items (id INTEGER PRIMARY KEY, title)").unwrap();
    let items = users_schema().tables["items"].clone();
    let old = SqliteOld::open(&path, &Schema { tables: [("items".to_string(), items)].into() }).unwrap();
    app.execute_batch("INSERT INTO items VALUES (1, 2.5)").unwrap();
    app.execute_batch("INSERT INTO items VALUES (2, x'00ff')").unwrap();
    let err = old.changes_after(Position(0), 1).unwrap_err().to_string();
    assert!(err.contains("`items`") && err.contains("`title`") && err.contains("REAL"), "{err}");
    let err = old.changes_after(Position(1), 1).unwrap_err().to_string();
    assert!(err.contains("BLOB"), "{err}");
    let err = old.rows_chunk(&None, 10).unwrap_err().to_string();
    assert!(err.contains("`title`"), "{err}");
}

#[test]
fn nothing_of_imago_is_left_after_the_upgrade_ends() {
    let dir = TempDir::new();
    let (old_path, new_path) = (dir.file("old.db"), dir.file("new.db"));
    let app = app_database(&old_path);
    let mut old = SqliteOld::open(&old_path, &users_schema()).unwrap();
    old.fence().unwrap();
    assert!(!old.imago_objects().unwrap().is_empty());
    old.remove_capture().unwrap();
    assert!(
        old.imago_objects().unwrap().iter().all(|o| o.starts_with("imago_fence_")),
        "after the switch the old database stays fenced until retired: {:?}",
        old.imago_objects().unwrap()
    );
    assert!(app.execute_batch("INSERT INTO items VALUES (1, 'x')").is_err());
    old.retire().unwrap();
    app.execute_batch("INSERT INTO items VALUES (1, 'x')").unwrap();
    let objects: Vec<String> = {
        let mut stmt = app
            .prepare("SELECT name FROM sqlite_master WHERE name LIKE 'imago%' AND name <> 'imago_requests'")
            .unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    };
    assert_eq!(objects, Vec::<String>::new(), "no trigger or table of Imago's stays in the old database");
    let mapping = Mapping::compile(&users_schema(), &[]).unwrap();
    let mut new = SqliteNew::open(&new_path, &mapping).unwrap();
    assert!(!new.imago_objects().unwrap().is_empty());
    new.remove_imago().unwrap();
    assert_eq!(new.imago_objects().unwrap(), Vec::<String>::new());
}

/// A store error is a typed error with the path, then a store error the core retries.
#[test]
fn a_database_that_cannot_open_says_which_file() {
    let err = SqliteOld::open("/nonexistent-dir/old.db", &users_schema()).unwrap_err();
    assert!(matches!(err, SqliteError::Open { .. }));
    assert!(err.to_string().contains("/nonexistent-dir/old.db"), "{err}");
    let as_store: StoreError = err.into();
    assert!(matches!(as_store, StoreError::Unavailable(_)));
}

/// The transform core over both SQLite stores, with the application writing through its own
/// connection all along and the transform's process killed (its objects dropped, the files
/// kept) mid-copy and mid-stream: after the fence and the catch-up, the new database holds
/// exactly transform(old), row for row.
#[test]
fn the_transform_over_sqlite_survives_kills_and_ends_equal_to_transform_of_old() {
    let dir = TempDir::new();
    let (old_path, new_path) = (dir.file("old.db"), dir.file("new.db"));
    let app = app_database(&old_path);
    for k in 1..=700 {
        app.execute(&format!("INSERT INTO users VALUES ({k}, 'n{k}', 'e{k}', 'b{k}')"), []).unwrap();
        if k % 3 == 0 {
            app.execute(&format!("INSERT INTO items VALUES ({k}, 'i{k}')"), []).unwrap();
        }
    }
    let transforms = vec![
        Transform::RenameColumn { table: "users".into(), from: "name".into(), to: "nickname".into() },
        Transform::SplitTable {
            table: "users".into(),
            into: vec![
                SplitPart {
                    table: "users".into(),
                    columns: vec!["nickname".into(), "email".into()],
                    ..Default::default()
                },
                SplitPart { table: "user_profiles".into(), columns: vec!["bio".into()], ..Default::default() },
            ],
        },
    ];
    let mapping = Mapping::compile(&users_schema(), &transforms).unwrap();
    let open = || {
        let old = SqliteOld::open(&old_path, &users_schema()).unwrap();
        let new = SqliteNew::open(&new_path, &mapping).unwrap();
        (old, new)
    };
    let (mut old, mut new) = open();
    let mut core = TransformCore::new(new.checkpoint().unwrap());
    let mut write = 0u64;
    let mut kills = Kills::default();
    for step in 0..400u64 {
        // The application writes between every two steps of the transform.
        write += 1;
        let k = (write * 37) % 900 + 1;
        match write % 4 {
            0 => app.execute(&format!("DELETE FROM users WHERE id = {k}"), []).map(drop).unwrap(),
            1 => app
                .execute(&format!("INSERT OR REPLACE INTO users VALUES ({k}, 'w{write}', NULL, 'b')"), [])
                .map(drop)
                .unwrap(),
            2 => app.execute(&format!("UPDATE users SET bio = 'u{write}' WHERE id = {k}"), []).map(drop).unwrap(),
            _ => app.execute(&format!("INSERT OR REPLACE INTO items VALUES ({k}, 'w{write}')"), []).map(drop).unwrap(),
        }
        // The process is killed now and then: a mid-copy kill loses the snapshot.
        if step % 45 == 10 {
            kills.note(&core);
            drop((old, new));
            (old, new) = open();
            core = TransformCore::new(new.checkpoint().unwrap());
        }
        if let Some(batch) = next_batch(&mut core, &mut old, 50, 20) {
            new.apply_batch(&batch).unwrap().unwrap();
            if core.bulk_done() && step % 10 == 0 {
                old.prune(core.checkpoint().applied).unwrap();
            }
        }
    }
    kills.assert_both();
    let final_position = old.fence().unwrap();
    while core.checkpoint().applied < final_position {
        let changes = old.changes_after(core.checkpoint().applied, 100).unwrap().changes;
        let batch = core.apply_changes(&changes).unwrap();
        new.apply_batch(&batch).unwrap().unwrap();
    }
    // transform(old), computed by the in-memory store from the old rows as they stand.
    let mut expected = MemStore::with_schema(&mapping.new_schema());
    for (table, key, r) in all_rows(&old) {
        for op in mapping.convert(&RowOp::Upsert { table, key, row: r }).unwrap() {
            expected.write(&op);
        }
    }
    for (table, rows) in expected.tables() {
        let got: Vec<(i64, Row)> = new.rows(table).unwrap();
        let want: Vec<(i64, Row)> = rows.iter().map(|(k, r)| (*k, r.clone())).collect();
        assert_eq!(got.len(), want.len(), "{table}: row count");
        assert!(got == want, "{table}: the new database differs from transform(old)");
    }
    assert_eq!(new.checksum().unwrap(), expected.checksum().unwrap());
}

/// The same random writes on the in-memory store and on SQLite (through the application's
/// connection) capture the same changes at the same positions, and read the same rows.
#[derive(Clone, Debug)]
enum Op {
    Put { table: bool, key: i64, value: u8 },
    Delete { table: bool, key: i64 },
    Prune { up_to: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (any::<bool>(), -3i64..12, any::<u8>()).prop_map(|(table, key, value)| Op::Put { table, key, value }),
        2 => (any::<bool>(), -3i64..12).prop_map(|(table, key)| Op::Delete { table, key }),
        1 => (0u64..40).prop_map(|up_to| Op::Prune { up_to }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn sqlite_capture_agrees_with_the_in_memory_store(ops in proptest::collection::vec(op(), 1..40), limit in 1usize..9) {
        let dir = TempDir::new();
        let path = dir.file("old.db");
        let app = app_database(&path);
        let mut old = SqliteOld::open(&path, &users_schema()).unwrap();
        let mut mem = MemStore::with_schema(&users_schema());
        for op in ops {
            match op {
                Op::Put { table, key, value } => {
                    let (name, r) = if table {
                        ("items", row(&[("id", Value::Int(key)), ("title", text(&value.to_string()))]))
                    } else {
                        ("users", row(&[("id", Value::Int(key)), ("name", text(&value.to_string())), ("email", Value::Null), ("bio", text("b"))]))
                    };
                    let sql = if table {
                        format!("INSERT INTO items VALUES ({key}, {value}) ON CONFLICT (id) DO UPDATE SET title = excluded.title")
                    } else {
                        format!("INSERT INTO users VALUES ({key}, '{value}', NULL, 'b') ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email, bio = excluded.bio")
                    };
                    app.execute_batch(&sql).unwrap();
                    mem.write_captured(RowOp::Upsert { table: name.into(), key, row: r }).unwrap();
                }
                Op::Delete { table, key } => {
                    let name = if table { "items" } else { "users" };
                    // A delete of a missing row captures nothing in a database: only existing rows.
                    if mem.get(name, key).is_some() {
                        app.execute_batch(&format!("DELETE FROM {name} WHERE id = {key}")).unwrap();
                        mem.write_captured(RowOp::Delete { table: name.into(), key }).unwrap();
                    }
                }
                Op::Prune { up_to } => {
                    let up_to = Position(up_to.min(mem.captured().0));
                    old.prune(up_to).unwrap();
                    mem.prune(up_to).unwrap();
                }
            }
        }
        prop_assert_eq!(old.captured().unwrap(), mem.captured());
        let from = Position(mem.captured().0.saturating_sub(limit as u64 * 2));
        let from = from.max(Position(mem.captured().0 - mem.changes().kept() as u64));
        prop_assert_eq!(old.changes_after(from, limit).unwrap(), mem.changes_after(from, limit).unwrap());
        prop_assert_eq!(all_rows(&old), all_rows(&mem));
        let (snap, at) = old.open_snapshot().unwrap();
        let (msnap, mat) = mem.open_snapshot().unwrap();
        prop_assert_eq!(at, mat);
        let mut after = None;
        loop {
            let a = old.snapshot_chunk(snap, &after, limit).unwrap();
            let b = mem.snapshot_chunk(msnap, &after, limit).unwrap();
            prop_assert_eq!(&a, &b);
            after = a.rows.last().map(|(t, k, _)| (t.clone(), *k)).or(after);
            if a.last {
                break;
            }
        }
    }
}

/// The MediaWiki 1.4 → 1.5 plan shipped in `plans/`: `cur` and `old` become `page`, `revision`
/// and `text`, with revision and text ids generated by the new database, `page_latest` and
/// `rev_text_id` pointing at them, and `rev_page` looked up by an SQL expression. The wiki keeps
/// being edited (an edit archives the current text into `old` and updates `cur`, as 1.4 did)
/// while the transform copies and streams, and the transform's process is killed mid-copy and
/// mid-stream. At the end the new database equals transform(old) (the store's own comparison),
/// every page points at its newest revision and text, and no old row got two generated keys.
#[test]
fn mediawiki_1_4_becomes_1_5_while_it_is_edited_and_the_transform_is_killed() {
    let plan = protocol::plan::Plan::from_toml("mediawiki-1.5.toml", include_str!("../../../plans/mediawiki-1.5.toml"))
        .unwrap();
    let mapping = plan.mapping().unwrap();
    let dir = TempDir::new();
    let (old_path, new_path) = (dir.file("wiki14.db"), dir.file("wiki15.db"));
    let app = Connection::open(&old_path).unwrap();
    app.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE cur (cur_id INTEGER PRIMARY KEY, cur_namespace INTEGER, cur_title TEXT, cur_text TEXT,
                           cur_comment TEXT, cur_user INTEGER, cur_timestamp TEXT);
         CREATE TABLE old (old_id INTEGER PRIMARY KEY, old_namespace INTEGER, old_title TEXT, old_text TEXT,
                           old_comment TEXT, old_user INTEGER, old_timestamp TEXT);",
    )
    .unwrap();
    app.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    let mut clock = 0u64;
    // An edit as MediaWiki 1.4 made it: the current text is archived into `old`, then `cur`
    // holds the new text.
    let edit = |app: &Connection, page: i64, clock: &mut u64| {
        *clock += 1;
        let t = *clock;
        app.execute_batch(&format!(
            "BEGIN;
             INSERT INTO old (old_namespace, old_title, old_text, old_comment, old_user, old_timestamp)
               SELECT cur_namespace, cur_title, cur_text, cur_comment, cur_user, cur_timestamp FROM cur WHERE cur_id = {page};
             UPDATE cur SET cur_text = 'text {page} at {t}', cur_comment = 'edit {t}', cur_user = {u}, cur_timestamp = '{t:08}'
               WHERE cur_id = {page};
             COMMIT;",
            u = t % 7
        ))
        .unwrap();
    };
    for page in 1..=120 {
        app.execute(
            "INSERT INTO cur VALUES (?1, ?2, ?3, ?4, 'created', 1, '00000000')",
            rusqlite::params![page, page % 3, format!("Page_{page}"), format!("text {page}")],
        )
        .unwrap();
    }
    for i in 0..150 {
        edit(&app, i % 120 + 1, &mut clock);
    }
    let schema = &plan.old_schema;
    let open = || {
        let old = SqliteOld::open(&old_path, schema).unwrap();
        let new = SqliteNew::open(&new_path, &mapping).unwrap();
        (old, new)
    };
    let (mut old, mut new) = open();
    let mut core = TransformCore::new(new.checkpoint().unwrap());
    let mut kills = Kills::default();
    for step in 0..300u64 {
        if step % 2 == 0 {
            edit(&app, (step * 7) as i64 % 120 + 1, &mut clock);
        }
        if step % 3 == 0 {
            // A new page now and then.
            app.execute(
                "INSERT INTO cur (cur_namespace, cur_title, cur_text, cur_comment, cur_user, cur_timestamp)
                 VALUES (0, ?1, 'new', 'created', 2, '00000000')",
                [format!("New_{step}")],
            )
            .unwrap();
        }
        if step % 70 == 6 {
            kills.note(&core);
            drop((old, new));
            (old, new) = open();
            core = TransformCore::new(new.checkpoint().unwrap());
        }
        if let Some(batch) = next_batch(&mut core, &mut old, 40, 25) {
            new.apply_batch(&batch).unwrap().unwrap();
            // A batch delivered again is refused: no second revision for any row.
            assert!(new.apply_batch(&batch).unwrap().is_err());
        }
    }
    kills.assert_both();
    let final_position = old.fence().unwrap();
    while core.checkpoint().applied < final_position {
        let changes = old.changes_after(core.checkpoint().applied, 100).unwrap().changes;
        new.apply_batch(&core.apply_changes(&changes).unwrap()).unwrap().unwrap();
    }

    // The store's own comparison: transform(old), staged beside the new tables, equals them.
    let rows = all_rows(&old);
    let rejected =
        new.stage(&rows[..rows.len() / 2], true).unwrap() + new.stage(&rows[rows.len() / 2..], false).unwrap();
    assert_eq!(rejected, 0);
    let (expected, actual) = new.compare_staged().unwrap();
    assert_eq!(expected, actual, "the new database differs from transform(old)");
    assert_eq!(new.compare_staged().unwrap(), (expected, actual), "asked again (an answer lost), the same");

    // What 1.5 needs of the data, checked directly.
    let count = |table: &str| all_rows(&old).iter().filter(|(t, _, _)| t == table).count();
    let (curs, olds) = (count("cur"), count("old"));
    let pages = new.rows("page").unwrap();
    let revisions: BTreeMap<i64, Row> = new.rows("revision").unwrap().into_iter().collect();
    let texts: BTreeMap<i64, Row> = new.rows("text").unwrap().into_iter().collect();
    assert_eq!(pages.len(), curs);
    assert_eq!(revisions.len(), curs + olds, "one revision per cur row and per old row, none twice");
    assert_eq!(texts.len(), curs + olds);
    let current: BTreeMap<i64, Row> =
        all_rows(&old).into_iter().filter(|(t, _, _)| t == "cur").map(|(_, k, r)| (k, r)).collect();
    for (page_id, page) in &pages {
        let Value::Int(latest) = page["page_latest"] else { panic!("page {page_id} has no latest revision") };
        let revision = &revisions[&latest];
        assert_eq!(revision["rev_page"], Value::Int(*page_id));
        let Value::Int(text_id) = revision["rev_text_id"] else { panic!("revision {latest} has no text") };
        assert_eq!(texts[&text_id]["old_text"], current[page_id]["cur_text"], "page {page_id}'s latest text");
        assert_eq!(revision["rev_timestamp"], current[page_id]["cur_timestamp"]);
    }
    let archived = revisions.values().filter(|r| !pages.iter().any(|(_, p)| p["page_latest"] == r["rev_id"]));
    for revision in archived {
        assert!(matches!(revision["rev_page"], Value::Int(p) if pages.iter().any(|(id, _)| *id == p)), "{revision:?}");
    }
    let keys = new.key_map().unwrap();
    assert_eq!(keys.len(), 2 * (curs + olds), "a revision and a text per old row, in the key map");
}

/// The comparison sees a difference: a row of the new database changed behind the transform
/// (here by a connection that gets around the guard), and an old row whose generated key the
/// new database never made.
#[test]
fn the_staged_comparison_sees_a_row_changed_behind_the_transform() {
    let plan = protocol::plan::Plan::from_toml("mediawiki-1.5.toml", include_str!("../../../plans/mediawiki-1.5.toml"))
        .unwrap();
    let mapping = plan.mapping().unwrap();
    let dir = TempDir::new();
    let new_path = dir.file("wiki15.db");
    let mut new = SqliteNew::open(&new_path, &mapping).unwrap();
    let cur = |id: i64, text: &str| {
        row(&[
            ("cur_id", Value::Int(id)),
            ("cur_namespace", Value::Int(0)),
            ("cur_title", self::text(&format!("P{id}"))),
            ("cur_text", self::text(text)),
            ("cur_comment", Value::Null),
            ("cur_user", Value::Int(1)),
            ("cur_timestamp", self::text("t")),
        ])
    };
    let ops = vec![RowOp::Upsert { table: "cur".into(), key: 1, row: cur(1, "a") }];
    let batch = Batch {
        base: Checkpoint::default(),
        reset: false,
        ops,
        checkpoint: Checkpoint { applied: Position(1), copy: CopyState::Done, copies: 1 },
    };
    new.apply_batch(&batch).unwrap().unwrap();
    let staged = [("cur".to_string(), 1, cur(1, "a"))];
    assert_eq!(new.stage(&staged, true).unwrap(), 0);
    let (expected, actual) = new.compare_staged().unwrap();
    assert_eq!(expected, actual);
    // A console that gets around the guard (it attaches the transform's marker) edits a text.
    let rogue = Connection::open(&new_path).unwrap();
    rogue.execute_batch("ATTACH ':memory:' AS imago_transform; UPDATE text SET old_text = 'vandalised';").unwrap();
    new.stage(&staged, true).unwrap();
    let (expected, actual) = new.compare_staged().unwrap();
    assert_ne!(expected, actual, "the changed text shows");
    // An old row the new database never saw has no generated keys: it cannot be staged.
    assert_eq!(new.stage(&[("cur".to_string(), 2, cur(2, "b"))], true).unwrap(), 1);
    assert!(new.key_map().unwrap().iter().all(|((_, key, _), _)| *key == 1), "staging makes no key");
}

/// The plan's expressions are checked by the new database when the store opens: one it
/// rejects is refused with the transform that wrote it.
#[test]
fn an_expression_the_new_database_rejects_is_refused_at_open_naming_its_transform() {
    let text = include_str!("../../../plans/mediawiki-1.5.toml")
        .replace("SELECT page_id FROM page", "SELEC page_id FROM page");
    let plan = protocol::plan::Plan::from_toml("mediawiki-1.5.toml", &text).unwrap();
    let dir = TempDir::new();
    let err = SqliteNew::open(&dir.file("new.db"), &plan.mapping().unwrap()).unwrap_err();
    assert!(matches!(err, SqliteError::Expression { transform: 7, .. }), "{err}");
    assert!(err.to_string().contains("syntax error"), "{err}");
    let text = include_str!("../../../plans/mediawiki-1.5.toml").replace("FROM page WHERE", "FROM pages WHERE");
    let plan = protocol::plan::Plan::from_toml("mediawiki-1.5.toml", &text).unwrap();
    let err = SqliteNew::open(&dir.file("new2.db"), &plan.mapping().unwrap()).unwrap_err();
    assert!(err.to_string().contains("no such table: pages"), "{err}");
}

/// A mapping with a merge, a split with a generated key and references, and a conversion: the
/// declarative forms a store in memory runs too.
fn every_declarative_form() -> (Schema, Mapping) {
    let mut tables = BTreeMap::new();
    let table = |key: &str, columns: &[&str]| TableSchema {
        key: key.into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
    };
    tables.insert("accounts".to_string(), table("id", &["id", "email", "age"]));
    tables.insert("profiles".to_string(), table("user_id", &["user_id", "bio"]));
    tables.insert("posts".to_string(), table("id", &["id", "title", "body"]));
    let old = Schema { tables };
    let transforms = vec![
        Transform::ChangeType {
            table: "accounts".into(),
            column: "age".into(),
            to: ColumnType::Text,
            expression: None,
        },
        Transform::MergeTables { table: "accounts".into(), with: "profiles".into(), into: "users".into() },
        Transform::SplitTable {
            table: "posts".into(),
            into: vec![
                SplitPart {
                    table: "posts".into(),
                    columns: vec!["title".into()],
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
        3 => (0u8..3, 1i64..6, any::<u8>()).prop_map(|(table, key, value)| Change::Put { table, key, value }),
        1 => (0u8..3, 1i64..6).prop_map(|(table, key)| Change::Delete { table, key }),
    ]
}

fn old_op(change: &Change) -> RowOp {
    let name = |t: u8| ["accounts", "profiles", "posts"][t as usize];
    match change {
        Change::Put { table, key, value } => {
            let v = Value::Text(format!("v{value}"));
            let row = match table {
                0 => row(&[("id", Value::Int(*key)), ("email", v), ("age", Value::Int(i64::from(*value)))]),
                1 => row(&[("user_id", Value::Int(*key)), ("bio", v)]),
                _ => row(&[("id", Value::Int(*key)), ("title", v.clone()), ("body", v)]),
            };
            RowOp::Upsert { table: name(*table).into(), key: *key, row }
        }
        Change::Delete { table, key } => RowOp::Delete { table: name(*table).into(), key: *key },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
    /// The same batches on SQLite and on the store in memory leave the same rows (generated
    /// keys included), and both stage transform(old) equal to what they hold.
    #[test]
    fn sqlite_runs_the_mapping_as_the_in_memory_store_does(batches in proptest::collection::vec(proptest::collection::vec(change(), 1..6), 1..8)) {
        let (old_schema, mapping) = every_declarative_form();
        let dir = TempDir::new();
        let mut sqlite = SqliteNew::open(&dir.file("new.db"), &mapping).unwrap();
        let mut mem = MemStore::new_universe(mapping.clone());
        // What the old universe holds, to stage at the end.
        let mut old = MemStore::with_schema(&old_schema);
        for (n, changes) in batches.iter().enumerate() {
            let ops: Vec<RowOp> = changes.iter().map(old_op).collect();
            for op in &ops {
                old.write(op);
            }
            let base = sqlite.checkpoint().unwrap();
            let checkpoint = Checkpoint { applied: Position(n as u64 + 1), copy: CopyState::Done, copies: 1 };
            let batch = Batch { base, reset: false, ops, checkpoint };
            sqlite.apply_batch(&batch).unwrap().unwrap();
            mem.apply_batch(&batch).unwrap().unwrap();
            for table in mapping.new_schema().tables.keys() {
                let want: Vec<(i64, Row)> = mem.tables()[table].iter().map(|(k, r)| (*k, r.clone())).collect();
                prop_assert_eq!(sqlite.rows(table).unwrap(), want, "{} after batch {}", table, n);
            }
        }
        let rows = all_rows(&old);
        prop_assert_eq!(sqlite.stage(&rows, true).unwrap(), 0);
        prop_assert_eq!(mem.stage(&rows, true).unwrap(), 0);
        let (expected, actual) = sqlite.compare_staged().unwrap();
        prop_assert_eq!(expected, actual, "SQLite: transform(old) differs from the new tables");
        prop_assert_eq!(mem.compare_staged().unwrap(), (expected, actual));
    }
}

/// The escape hatch: statements of the plan's own, run by the new database with the old row's
/// columns bound (insert for a row not seen yet, update for one seen, delete with the key).
#[test]
fn the_plans_own_statements_run_for_rows_the_declarative_forms_cannot_say() {
    let plan_text = r#"
[upgrade]
name = "listings"
old_generation = 1

[[nodes]]
name = "router-1"
tier = "web"
duties = ["route"]

[[nodes]]
name = "db-1"
tier = "db"
duties = ["capture", "transform"]

[schema.old.items]
key = "id"
columns = ["id", "title", "price_cents"]

[[transforms]]
kind = "rename_column"
table = "items"
from = "title"
to = "name"

[[transforms]]
kind = "sql"
table = "items"
writes = ["listings"]
insert = "INSERT INTO listings (id, label) VALUES (:id, upper(:name) || ' @ ' || printf('%.2f', :price_cents / 100.0))"
update = "UPDATE listings SET label = upper(:name) || ' @ ' || printf('%.2f', :price_cents / 100.0) WHERE id = :id"
delete = "DELETE FROM listings WHERE id = :id"

[schema.new.listings]
key = "id"
columns = ["id", "label"]
"#;
    let plan = protocol::plan::Plan::from_toml("listings.toml", plan_text).unwrap();
    let mapping = plan.mapping().unwrap();
    assert_eq!(mapping.new_schema().tables["listings"].columns, vec!["id", "label"]);
    let dir = TempDir::new();
    let old_path = dir.file("old.db");
    let app = Connection::open(&old_path).unwrap();
    app.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE items (id INTEGER PRIMARY KEY, title TEXT, price_cents INTEGER);
         INSERT INTO items VALUES (1, 'lamp', 1250), (2, 'desk', 9900);",
    )
    .unwrap();
    let mut old = SqliteOld::open(&old_path, &plan.old_schema).unwrap();
    let mut new = SqliteNew::open(&dir.file("new.db"), &mapping).unwrap();
    let mut core = TransformCore::new(new.checkpoint().unwrap());
    let mut step = |old: &mut SqliteOld, new: &mut SqliteNew| {
        while let Some(batch) = next_batch(&mut core, old, 10, 10) {
            new.apply_batch(&batch).unwrap().unwrap();
        }
    };
    step(&mut old, &mut new);
    app.execute_batch(
        "UPDATE items SET price_cents = 1300 WHERE id = 1;
         INSERT INTO items VALUES (3, 'chair', 4500);
         DELETE FROM items WHERE id = 2;",
    )
    .unwrap();
    step(&mut old, &mut new);
    let labels: Vec<(i64, Value)> =
        new.rows("listings").unwrap().into_iter().map(|(k, r)| (k, r["label"].clone())).collect();
    assert_eq!(labels, vec![(1, text("LAMP @ 13.00")), (3, text("CHAIR @ 45.00"))]);
    let rows = all_rows(&old);
    assert_eq!(new.stage(&rows, true).unwrap(), 0);
    let (expected, actual) = new.compare_staged().unwrap();
    assert_eq!(expected, actual, "transform(old) by the plan's statements equals the new table");
    // A statement the database rejects is refused when the store opens, naming its transform.
    let broken = plan_text.replace("UPDATE listings SET", "UPDATE listing SET");
    let plan = protocol::plan::Plan::from_toml("listings.toml", &broken).unwrap();
    let err = SqliteNew::open(&dir.file("broken.db"), &plan.mapping().unwrap()).unwrap_err();
    assert!(matches!(err, SqliteError::Expression { transform: 1, .. }), "{err}");
    assert!(err.to_string().contains("no such table: listing"), "{err}");
}

/// `AUTOINCREMENT` keys the old application handed out are never handed out again by the new
/// one: at the opening, the new table's `sqlite_sequence` is set past the old table's (rows 9
/// and 10 were deleted: the new application starts at 11, not 9). Once open, the sequence is
/// the application's (an opening asked again does not touch it).
#[test]
fn the_new_applications_autoincrement_keys_continue_after_the_old_ones() {
    let dir = TempDir::new();
    let (old_path, new_path) = (dir.file("old.db"), dir.file("new.db"));
    let app = Connection::open(&old_path).unwrap();
    app.execute_batch(
        "CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT);
         WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 10)
         INSERT INTO items (title) SELECT 'item ' || n FROM g;
         DELETE FROM items WHERE id > 8;",
    )
    .unwrap();
    // The new application's own migration.
    let new_app = Connection::open(&new_path).unwrap();
    new_app.execute_batch("CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT);").unwrap();
    let schema = Schema {
        tables: [("items".to_string(), TableSchema { key: "id".into(), columns: vec!["id".into(), "title".into()] })]
            .into_iter()
            .collect(),
    };
    let rename = Transform::RenameColumn { table: "items".into(), from: "title".into(), to: "name".into() };
    let mapping = Mapping::compile(&schema, &[rename]).unwrap();
    let mut old = SqliteOld::open(&old_path, &schema).unwrap();
    let mut new = SqliteNew::open(&new_path, &mapping).unwrap();
    let mut core = TransformCore::new(new.checkpoint().unwrap());
    while let Some(batch) = next_batch(&mut core, &mut old, 100, 100) {
        new.apply_batch(&batch).unwrap().unwrap();
    }
    old.fence().unwrap();
    let sequences = OldStore::sequences(&old).unwrap();
    assert_eq!(sequences, [("items".to_string(), 10)].into_iter().collect());
    NewStore::open_to_clients(&mut new, &sequences).unwrap();
    new_app.execute_batch("INSERT INTO items (name) VALUES ('new')").unwrap();
    NewStore::open_to_clients(&mut new, &[("items".to_string(), 10)].into_iter().collect()).unwrap();
    new_app.execute_batch("INSERT INTO items (name) VALUES ('new')").unwrap();
    let keys: Vec<i64> = new.rows("items").unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec![1, 2, 3, 4, 5, 6, 7, 8, 11, 12]);
}

#[path = "../../range_checks.rs"]
mod range_checks;

/// The mapping of [`users_schema`] the comparison by range runs: a rename, and a split of
/// `items` with a generated key and references both ways.
fn renamed_and_split() -> Mapping {
    let split = Transform::SplitTable {
        table: "items".into(),
        into: vec![
            SplitPart {
                table: "items".into(),
                columns: vec!["title".into()],
                references: vec![("label_id".into(), "labels".into())],
                ..Default::default()
            },
            SplitPart {
                table: "labels".into(),
                columns: vec!["title".into()],
                key: Some("label_id".into()),
                generated: true,
                references: vec![("item".into(), "items".into())],
            },
        ],
    };
    let rename = Transform::RenameColumn { table: "users".into(), from: "name".into(), to: "nickname".into() };
    Mapping::compile(&users_schema(), &[rename, split]).unwrap()
}

/// Ranges of old keys compared while the application writes: each compared at matching
/// positions (SQLite reads rows and change log in one transaction, so none is spoiled) and
/// found equal; the drain then stages only the ranges changed since, and still sees a row
/// of a clean range changed by hand behind the transform (the new tables' whole checksum), as
/// does that range's comparison.
#[test]
fn ranges_compared_while_writes_go_on_leave_the_drain_only_what_changed() {
    let dir = TempDir::new();
    let (old_path, new_path) = (dir.file("old.db"), dir.file("new.db"));
    let app = app_database(&old_path);
    app.execute_batch(
        "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 300)
         INSERT INTO users SELECT n, 'user ' || n, n || '@example.org', NULL FROM g;
         WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 200)
         INSERT INTO items SELECT n, 'item ' || n FROM g;",
    )
    .unwrap();
    let mapping = renamed_and_split();
    assert!(mapping.rows_stand_alone());
    let mut old = SqliteOld::open(&old_path, &users_schema()).unwrap();
    let mut new = SqliteNew::open(&new_path, &mapping).unwrap();
    let core = TransformCore::new(new.checkpoint().unwrap()).with_copy_chunk_rows(64);
    let mut drive = range_checks::Drive::new(&mut old, &mut new, core);
    while !drive.core.bulk_done() {
        drive.step();
    }
    let mut round = 0;
    while let Some(outcome) = drive.compare_range(25) {
        assert_eq!(outcome, Some(true), "range {round}: {:?}", drive.ranges.report());
        round += 1;
        assert!(round < 200, "the comparison does not converge: {:?}", drive.ranges.report());
        if round <= 15 {
            // Between comparisons: rows of ranges compared already and of ranges to come.
            app.execute_batch(&format!(
                "UPDATE users SET bio = 'bio {round}' WHERE id = {u};
                 DELETE FROM items WHERE id = {d};
                 INSERT INTO items VALUES ({i}, 'late {round}');",
                u = round * 19 % 300 + 1,
                d = round * 13,
                i = 1_000 + round
            ))
            .unwrap();
        }
    }
    let report = drive.ranges.report();
    assert!(report.ranges >= 20 && report.clean == report.ranges && report.attempted == report.ranges, "{report:?}");
    assert_eq!(report.differed, 0);
    // Rows by new table, each range as of its last comparison (all after the last write):
    // what the new tables hold, and what transform(old) gives.
    let reader = Connection::open(&new_path).unwrap();
    assert_eq!(report.tables.len(), mapping.new_schema().tables.len(), "{report:?}");
    for t in &report.tables {
        let held: i64 = reader.query_row(&format!("SELECT count(*) FROM {}", t.table), [], |r| r.get(0)).unwrap();
        assert_eq!((t.expected, t.actual), (held as u64, held as u64), "{t:?}");
    }
    // Written after the last comparison: only those ranges are staged at the drain.
    app.execute_batch(
        "UPDATE users SET bio = 'late' WHERE id = 150; DELETE FROM items WHERE id = 50;
         INSERT INTO users VALUES (301, 'new', NULL, NULL);",
    )
    .unwrap();
    let final_position = drive.old.fence().unwrap();
    drive.catch_up(final_position, 100);
    assert!(drive.drain_matches(100), "transform(old) and new differ at the drain");
    let old_rows = 301 + 200;
    assert!(
        drive.staged_rows > 0 && drive.staged_rows <= 3 * 25 + 1,
        "the drain staged {} of {old_rows} old rows: the three changed ranges only",
        drive.staged_rows
    );
    // A fix by hand in a clean range, behind the transform (around the guard).
    let rogue = Connection::open(&new_path).unwrap();
    rogue
        .execute_batch("ATTACH ':memory:' AS imago_transform; UPDATE users SET nickname = 'vandal' WHERE id = 10;")
        .unwrap();
    assert!(!drive.drain_matches(100), "the drain sees the row changed in a clean range");
    drive.ranges.all_changed();
    let ranges = drive.ranges.report().ranges;
    let outcomes: Vec<_> = (0..ranges).map_while(|_| drive.compare_range(25)).collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == Some(false)).count(),
        1,
        "the range of users 10 differs: {outcomes:?}"
    );
}

/// After a rollback the data node removes capture from an unfenced old database (writes go on
/// uncaptured); the next copy's snapshot captures again, numbering changes afresh, and a
/// change after that snapshot is in the stream while none from before is.
#[test]
fn capture_removed_after_a_rollback_comes_back_with_the_next_snapshot() {
    let dir = TempDir::new();
    let path = dir.file("old.db");
    let app = app_database(&path);
    let mut old = SqliteOld::open(&path, &users_schema()).unwrap();
    app.execute_batch("INSERT INTO items VALUES (1, 'a'); INSERT INTO items VALUES (2, 'b');").unwrap();
    assert_eq!(old.changes_after(Position(0), 10).unwrap().changes.len(), 2);
    old.remove_capture().unwrap();
    assert_eq!(old.imago_objects().unwrap(), Vec::<String>::new(), "no capture left after the rollback");
    app.execute_batch("INSERT INTO items VALUES (3, 'uncaptured')").unwrap();
    assert_eq!(old.imago_objects().unwrap(), Vec::<String>::new(), "a write adds nothing of Imago's");

    let (snapshot, at) = old.open_snapshot().unwrap();
    assert_eq!(at, Position(0), "numbered afresh");
    let rows = old.snapshot_chunk(snapshot, &None, 10).unwrap().rows;
    assert_eq!(rows.iter().filter(|(t, _, _)| t == "items").count(), 3, "the snapshot holds every row");
    app.execute_batch("UPDATE items SET title = 'after' WHERE id = 3").unwrap();
    let ChangeRead { changes, captured, .. } = old.changes_after(at, 10).unwrap();
    assert_eq!(captured, Position(1));
    let [(Position(1), RowOp::Upsert { table, key: 3, row })] = changes.as_slice() else { panic!("{changes:?}") };
    assert_eq!((table.as_str(), row.get("title")), ("items", Some(&text("after"))));
}
