#![allow(clippy::disallowed_methods)] // a benchmark measures wall-clock time (Instant::now)
//! The data tier's benchmark on SQLite (`cargo bench -p imago-node-sqlite --bench data`): each
//! figure beside its baseline from the same run, written to `target/bench/data-sqlite.json` (or
//! `$IMAGO_BENCH_OUT`).
//!
//! - bulk copy + a one-to-one transform (a renamed column), rows/s, beside a plain copy of the
//!   same table by SQLite itself (`INSERT … SELECT` from the attached old database);
//! - the same copy for a split with a generated key and a reference (report);
//! - catch-up: changes/s applied from a backlog of single-row updates;
//! - capture overhead: the application's single-row inserts per second with the capture triggers
//!   and on an identical copy of the database without them, interleaved pairs, median and a 95 %
//!   confidence interval of the ratio;
//! - the process's peak memory after the copy (VmHWM).
//!
//! `IMAGO_BENCH_QUICK=1`: a small table and few pairs (a smoke test of the benchmark itself).
//! The transform runs with the core's own chunk sizes, one batch per transaction with
//! `synchronous = FULL` (each batch is durable before the next).

use imago_node_sqlite::{SqliteNew, SqliteOld};
use node_core::duties::transform::{TransformCore, Work};
use node_core::store::{NewStore, OldStore};
use rusqlite::Connection;
use std::path::PathBuf;
use std::time::Instant;

#[path = "../../bench_support.rs"]
mod bench_support;
use bench_support::{items_schema, median, median_ci, one_to_one, peak_rss_mib, rate, split};

fn quick() -> bool {
    std::env::var("IMAGO_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// A directory removed at the end.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir() -> Dir {
    let dir = std::env::temp_dir().join(format!("imago-bench-data-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    Dir(dir)
}

fn path(dir: &Dir, name: &str) -> String {
    dir.0.join(name).to_str().expect("utf-8").to_string()
}

/// The old database: `rows` items, made in one transaction.
fn old_database(file: &str, rows: u64) -> Connection {
    let conn = Connection::open(file).expect("open");
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE items (id INTEGER PRIMARY KEY, title TEXT, seller INTEGER, price INTEGER);",
    )
    .expect("schema");
    conn.execute_batch("BEGIN").expect("begin");
    {
        let mut insert = conn.prepare("INSERT INTO items VALUES (?1, ?2, ?3, ?4)").expect("prepare");
        for id in 1..=rows as i64 {
            insert.execute(rusqlite::params![id, format!("item number {id}"), id % 977, id * 3 % 10_000]).expect("row");
        }
    }
    conn.execute_batch("COMMIT").expect("commit");
    conn
}

/// Runs the transform core over both stores until the copy is done and the stream is empty;
/// the number of rows or changes it applied.
fn transform(old: &mut SqliteOld, new: &mut SqliteNew, core: &mut TransformCore) -> u64 {
    let mut applied = 0;
    loop {
        let batch = match core.next_work() {
            Work::Snapshot => {
                let (snapshot, at) = old.open_snapshot().expect("snapshot");
                core.copy_started(snapshot, at)
            }
            Work::CopyChunk { snapshot, after, limit } => {
                let chunk = old.snapshot_chunk(snapshot, &after, limit).expect("chunk");
                applied += chunk.rows.len() as u64;
                core.copy_chunk(chunk.rows, chunk.last).expect("copy")
            }
            Work::Stream { after, limit } => {
                let changes = old.changes_after(after, limit).expect("changes").changes;
                if changes.is_empty() {
                    return applied;
                }
                applied += changes.len() as u64;
                core.apply_changes(&changes).expect("stream")
            }
        };
        new.apply_batch(&batch).expect("apply").expect("in order");
    }
}

/// Single-row inserts per second, autocommit, on `conn`, for `count` rows from `first`.
fn inserts_per_second(conn: &Connection, first: i64, count: i64) -> f64 {
    let mut insert = conn.prepare_cached("INSERT INTO items VALUES (?1, 'new', 1, 1)").expect("prepare");
    let start = Instant::now();
    for id in first..first + count {
        insert.execute([id]).expect("insert");
    }
    rate(count as u64, start.elapsed())
}

fn main() {
    let rows: u64 = if quick() { 50_000 } else { 1_000_000 };
    let pairs: usize = if quick() { 4 } else { 10 };
    let inserts: i64 = if quick() { 300 } else { 1_000 };
    let dir = dir();
    let old_file = path(&dir, "old.db");
    let app = old_database(&old_file, rows);
    // The capture overhead's baseline: the same database, never captured.
    let bare_file = path(&dir, "bare.db");
    app.execute(&format!("VACUUM INTO '{bare_file}'"), []).expect("copy of the old database");
    println!("data benchmark (SQLite): {rows} rows, synchronous = FULL");

    // Baseline: SQLite copies the table itself.
    let plain = Connection::open(path(&dir, "plain.db")).expect("open");
    plain
        .execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE items (id INTEGER PRIMARY KEY, title TEXT, seller INTEGER, price INTEGER);
             ATTACH '{old_file}' AS old;"
        ))
        .expect("plain");
    let start = Instant::now();
    plain.execute_batch("INSERT INTO items SELECT * FROM old.items").expect("plain copy");
    let plain_rate = rate(rows, start.elapsed());
    drop(plain);

    // Imago's copy, one-to-one (a column renamed).
    let one_to_one = one_to_one();
    let mut old = SqliteOld::open(&old_file, &items_schema()).expect("old");
    let mut new = SqliteNew::open(&path(&dir, "new.db"), &one_to_one).expect("new");
    let mut core = TransformCore::new(new.checkpoint().expect("checkpoint"))
        .with_copy_chunk_rows(protocol::plan::COPY_CHUNK_ROWS_DEFAULT);
    let start = Instant::now();
    let copied = transform(&mut old, &mut new, &mut core);
    let copy_rate = rate(copied, start.elapsed());
    let peak_mib = peak_rss_mib();
    println!(
        "bulk copy + one-to-one transform: {copy_rate:.0} rows/s; plain copy by SQLite: {plain_rate:.0} rows/s ({:.0} %)",
        100.0 * copy_rate / plain_rate
    );

    // A split with a generated key and a reference.
    let split_mapping = split();
    let mut split_new = SqliteNew::open(&path(&dir, "split.db"), &split_mapping).expect("new");
    let mut split_core = TransformCore::new(split_new.checkpoint().expect("checkpoint"))
        .with_copy_chunk_rows(protocol::plan::COPY_CHUNK_ROWS_DEFAULT);
    let start = Instant::now();
    let split_copied = transform(&mut old, &mut split_new, &mut split_core);
    let split_rate = rate(split_copied, start.elapsed());
    println!("bulk copy + split with a generated key: {split_rate:.0} rows/s (report)");

    // Catch-up from a backlog of single-row updates (each its own transaction, as an
    // application writes them).
    let backlog: i64 = if quick() { 2_000 } else { 20_000 };
    app.execute_batch("PRAGMA synchronous = NORMAL").expect("pragma");
    {
        let mut update = app.prepare("UPDATE items SET price = price + 1 WHERE id = ?1").expect("prepare");
        for i in 0..backlog {
            update.execute([(i * 7919) % rows as i64 + 1]).expect("update");
        }
    }
    app.execute_batch("PRAGMA synchronous = FULL").expect("pragma");
    let start = Instant::now();
    let streamed = transform(&mut old, &mut new, &mut core);
    let stream_rate = rate(streamed, start.elapsed());
    println!("catch-up: {stream_rate:.0} changes/s over a backlog of {streamed}");
    assert_eq!(streamed, backlog as u64, "every change of the backlog applied once");
    let rows_now = all_rows(&old);
    assert_eq!(new.stage(&rows_now, true).expect("stage"), 0);
    let (expected, actual) = new.compare_staged().expect("compare");
    assert_eq!(expected, actual, "the new database equals transform(old) after the benchmark");

    // Capture overhead: the same inserts on a captured and an uncaptured database, interleaved.
    let bare = Connection::open(&bare_file).expect("open");
    bare.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;").expect("pragma");
    let mut ratios = Vec::with_capacity(pairs);
    let (mut with_rates, mut without_rates) = (Vec::new(), Vec::new());
    let mut next_id = rows as i64 + 1;
    for _ in 0..pairs {
        let without = inserts_per_second(&bare, next_id, inserts);
        let with = inserts_per_second(&app, next_id, inserts);
        next_id += inserts;
        ratios.push(with / without);
        with_rates.push(with);
        without_rates.push(without);
    }
    let (ratio, low, high) = median_ci(&ratios);
    println!(
        "capture overhead (SQLite triggers, synchronous = FULL): {:.0} inserts/s with capture, {:.0} without: \
         median ratio {ratio:.3} (95 % CI {low:.3}–{high:.3}), overhead {:.1} % (report)",
        median(&mut with_rates),
        median(&mut without_rates),
        100.0 * (1.0 - ratio)
    );
    if let Some(mib) = peak_mib {
        println!("peak memory after copying {rows} rows: {mib:.0} MiB (the whole benchmark process)");
    }

    let out = std::env::var("IMAGO_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/data-sqlite.json"));
    let json = serde_json::json!({
        "store": "sqlite",
        "rows": rows,
        "copy_one_to_one_rows_per_s": copy_rate,
        "baseline_plain_copy_rows_per_s": plain_rate,
        "copy_ratio_of_plain": copy_rate / plain_rate,
        "copy_split_generated_key_rows_per_s": split_rate,
        "catch_up_changes_per_s": stream_rate,
        "catch_up_changes": streamed,
        "capture_insert_ratio_median": ratio,
        "capture_insert_ratio_ci95": [low, high],
        "capture_inserts_per_s_median": median(&mut with_rates),
        "baseline_inserts_per_s_median": median(&mut without_rates),
        "peak_rss_mib": peak_mib,
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).expect("bench dir");
    }
    std::fs::write(&out, serde_json::to_string_pretty(&json).expect("json")).expect("write");
    println!("written to {}", out.display());
}

/// Every current row of the old database, through the interface.
fn all_rows(old: &SqliteOld) -> Vec<(String, i64, protocol::schema::Row)> {
    let mut rows = Vec::new();
    let mut after = None;
    loop {
        let chunk = old.rows_chunk(&after, 5_000).expect("rows");
        after = chunk.rows.last().map(|(t, k, _)| (t.clone(), *k)).or(after);
        rows.extend(chunk.rows);
        if chunk.last {
            return rows;
        }
    }
}
