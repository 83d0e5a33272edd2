#![allow(clippy::disallowed_methods)] // a benchmark measures wall-clock time (Instant::now)
//! The data tier's benchmark on PostgreSQL (`cargo bench -p imago-node-postgres --bench data`):
//! each figure beside its baseline from the same run, written to `target/bench/data.json`
//! (or `$IMAGO_BENCH_OUT`). A throwaway cluster with `fsync` on; the benchmark fails if
//! PostgreSQL cannot start.
//!
//! - baselines: a plain `COPY items TO STDOUT` out of the old database, and a plain `COPY items
//!   FROM STDIN` of those bytes into an identical empty table of another database;
//! - bulk copy + a one-to-one transform (a renamed column), rows/s, through `PgOldStore`,
//!   `PgNewStore` and the transform core, beside the plain `COPY FROM` (target: ≥ 50 %);
//! - the same copy for a split with a generated key and a reference (report);
//! - catch-up: changes/s applied from a backlog of single-row updates;
//! - steady streaming: an application's single-row updates at a fixed rate while the transform
//!   runs: the lag (WAL bytes at each read of the stream, and the wall time from a write's commit
//!   to its application), p50 and max;
//! - slot overhead: the application's single-row inserts per second into a database whose slot
//!   is being read and into an identical one without a slot, `synchronous_commit` on and off,
//!   interleaved pairs, median and a 95 % confidence interval of the ratio;
//! - the process's peak memory after the copy (VmHWM).
//!
//! At the end the new database is checked equal to transform(old) (every current old row staged,
//! equal checksums), and every change of the backlog and of the steady writes applied once.
//!
//! `IMAGO_BENCH_QUICK=1`: a small table, a short stream and few pairs (a smoke test of the
//! benchmark itself). The transform runs with a data node's chunk sizes (the copy's: the plan's
//! default), one batch per transaction, each committed durably before the next.

use futures_util::{SinkExt, StreamExt};
use imago_node_postgres::throwaway::{ThrowawayCluster, ThrowawayOptions};
use imago_node_postgres::{Names, PgNewStore, PgOldStore};
use node_core::data_node::{perform, StoreOp, StoreResult};
use node_core::duties::transform::{Positions, TransformCore, Work};
use node_core::store::{ChangeRead, NewStore, OldStore};
use protocol::plan::COPY_CHUNK_ROWS_DEFAULT;
use protocol::schema::RowOp;
use protocol::{Position, UpgradeId};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "../../bench_support.rs"]
mod bench_support;
#[path = "../../range_checks.rs"]
mod range_checks;
use bench_support::{items_schema, median, median_ci, one_to_one, peak_rss_mib, rate, split};
use tokio::runtime::Runtime;

/// Where the copy's time goes (µs, summed over its chunks): reading the old database's
/// snapshot, the transform core, applying batches to the new database. The steps run one after
/// another, as a data node runs them.
static COPY_READ_US: AtomicU64 = AtomicU64::new(0);
static COPY_CORE_US: AtomicU64 = AtomicU64::new(0);
static COPY_APPLY_US: AtomicU64 = AtomicU64::new(0);

fn quick() -> bool {
    std::env::var("IMAGO_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// A plan's default `freeze_timeout_ms`: how long the drain's comparison may take at most.
fn freeze_timeout_ms() -> u64 {
    protocol::plan::Thresholds::default().freeze_timeout_ms
}

const ITEMS_TABLE: &str = "CREATE TABLE items (id bigint PRIMARY KEY, title text, seller bigint, price bigint)";
const UPDATE_PRICE: &str = "UPDATE items SET price = price + 1 WHERE id = $1";

/// How long a phase may wait for the stream before the benchmark gives up.
const STREAM_WAIT: Duration = Duration::from_secs(300);

/// A runtime for the benchmark's own SQL (the stores have runtimes of their own).
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// A client of `db`, its connection on `rt` (use it only inside `rt.block_on`).
fn client(rt: &Runtime, cluster: &ThrowawayCluster, db: &str) -> tokio_postgres::Client {
    rt.block_on(cluster.client(db, "postgres")).unwrap_or_else(|e| panic!("connect to {db}: {e}"))
}

fn run(rt: &Runtime, client: &tokio_postgres::Client, sql: &str) {
    rt.block_on(client.batch_execute(sql)).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// A database holding `items` with `rows` rows, made by one `INSERT … SELECT`, then vacuumed
/// (so that the first reader does not pay for the hint bits).
fn items_database(rt: &Runtime, cluster: &ThrowawayCluster, db: &str, rows: u64) {
    cluster.create_database(db).expect("create database");
    let client = client(rt, cluster, db);
    run(rt, &client, ITEMS_TABLE);
    run(
        rt,
        &client,
        &format!(
            "INSERT INTO items SELECT g, 'item number ' || g, g % 977, g * 3 % 10000 FROM generate_series(1, {rows}) g"
        ),
    );
    run(rt, &client, "VACUUM ANALYZE items");
}

/// What one transform step did.
enum Step {
    /// Rows of the copy applied (0: the snapshot was opened).
    Copied(u64),
    /// A read of the stream after `after`; `applied` says whether it moved anything.
    Read { after: Position, read: ChangeRead, applied: bool },
}

/// One transform step through the stores, as the data node's core asks for it (as
/// `tests/both.rs` drives it), each batch applied in its own transaction.
fn step(old: &mut PgOldStore, new: &mut PgNewStore, core: &mut TransformCore) -> Step {
    let (batch, done) = match core.next_work() {
        Work::Snapshot => match perform(old, new, StoreOp::OpenSnapshot) {
            StoreResult::SnapshotOpened { snapshot, at, .. } => (core.copy_started(snapshot, at), Step::Copied(0)),
            other => panic!("open a snapshot: {other:?}"),
        },
        Work::CopyChunk { snapshot, after, limit } => {
            let t0 = Instant::now();
            match perform(old, new, StoreOp::ReadSnapshot { snapshot, after, limit }) {
                StoreResult::Chunk(chunk) => {
                    COPY_READ_US.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                    let rows = chunk.rows.len() as u64;
                    let t1 = Instant::now();
                    let batch = core.copy_chunk(chunk.rows, chunk.last).expect("copy");
                    COPY_CORE_US.fetch_add(t1.elapsed().as_micros() as u64, Ordering::Relaxed);
                    (batch, Step::Copied(rows))
                }
                other => panic!("read the snapshot: {other:?}"),
            }
        }
        Work::Stream { after, limit } => match perform(old, new, StoreOp::ReadChanges { after, limit }) {
            StoreResult::Changes(read) => {
                if read.changes.is_empty() && !core.read_moves(read.complete_to) {
                    return Step::Read { after, read, applied: false };
                }
                let batch = core.apply_read(&read.changes, read.complete_to).expect("stream");
                (batch, Step::Read { after, read, applied: true })
            }
            other => panic!("read changes: {other:?}"),
        },
    };
    let t2 = Instant::now();
    match perform(old, new, StoreOp::Apply(batch)) {
        StoreResult::Applied => {
            if matches!(done, Step::Copied(_)) {
                COPY_APPLY_US.fetch_add(t2.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            done
        }
        other => panic!("apply a batch: {other:?}"),
    }
}

/// The bulk copy, to its end: the rows copied.
fn copy(old: &mut PgOldStore, new: &mut PgNewStore, core: &mut TransformCore) -> u64 {
    let mut rows = 0;
    while !core.bulk_done() {
        match step(old, new, core) {
            Step::Copied(n) => rows += n,
            Step::Read { .. } => unreachable!("the stream before the copy is done"),
        }
    }
    rows
}

/// Checks that the new database equals transform(old) as the drain's comparison does: every
/// current old row read and staged a chunk at a time (a data node's chunk), then the checksums
/// compared.
fn check_equal(old: &PgOldStore, new: &mut PgNewStore) -> usize {
    let mut after = None;
    let mut first = true;
    let mut staged = 0;
    loop {
        let chunk = old.rows_chunk(&after, COPY_CHUNK_ROWS_DEFAULT).expect("old rows");
        after = chunk.rows.last().map(|(t, k, _)| (t.clone(), *k)).or(after);
        staged += chunk.rows.len();
        assert_eq!(new.stage(&chunk.rows, first).expect("stage"), 0, "every old row converts");
        first = false;
        if chunk.last {
            break;
        }
    }
    let (expected, actual) = new.compare_staged().expect("compare");
    assert_eq!(expected, actual, "the new database equals transform(old) after the benchmark");
    staged
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// The baselines: a plain `COPY items TO STDOUT` out of `from` (kept in memory, one message a
/// row), then a plain `COPY items FROM STDIN` of the same bytes into `to`'s empty `items`, each
/// timed alone: (bytes, rows/s out, rows/s in).
fn plain_copies(rt: &Runtime, cluster: &ThrowawayCluster, from: &str, to: &str, rows: u64) -> (u64, f64, f64) {
    let reader = client(rt, cluster, from);
    let writer = client(rt, cluster, to);
    rt.block_on(async {
        reader.batch_execute("CHECKPOINT").await.expect("checkpoint");
        let start = Instant::now();
        let stream = reader.copy_out("COPY items TO STDOUT").await.expect("copy out");
        let mut stream = std::pin::pin!(stream);
        let (mut data, mut bytes, mut read) = (Vec::new(), 0u64, 0u64);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.expect("copy out data");
            bytes += chunk.len() as u64;
            read += chunk.iter().filter(|b| **b == b'\n').count() as u64;
            data.push(chunk);
        }
        let out_rate = rate(read, start.elapsed());
        assert_eq!(read, rows, "COPY TO read every row");

        writer.batch_execute("CHECKPOINT").await.expect("checkpoint");
        let start = Instant::now();
        let sink = writer.copy_in("COPY items FROM STDIN").await.expect("copy in");
        let mut sink = std::pin::pin!(sink);
        for chunk in data {
            sink.send(chunk).await.expect("copy in data");
        }
        let written = sink.as_mut().finish().await.expect("copy in");
        let in_rate = rate(written, start.elapsed());
        assert_eq!(written, rows, "COPY FROM wrote every row");
        (bytes, out_rate, in_rate)
    })
}

/// Single-row inserts per second, each its own transaction, on `client` with its prepared
/// `insert`, for `count` rows from `first`.
fn inserts_per_second(
    rt: &Runtime,
    client: &tokio_postgres::Client,
    insert: &tokio_postgres::Statement,
    first: i64,
    count: i64,
) -> f64 {
    rt.block_on(async {
        let start = Instant::now();
        for id in first..first + count {
            client.execute(insert, &[&id]).await.expect("insert");
        }
        rate(count as u64, start.elapsed())
    })
}

/// The slot's side of the overhead measurement: a capture of `db`'s `items` whose copy is done,
/// its stream read (and acknowledged) until `stop`, then until `expected` changes were read;
/// `ready` once the stream is what remains. The changes read.
fn slot_reader(
    conn: String,
    ready: mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
    expected: Arc<std::sync::atomic::AtomicU64>,
) -> u64 {
    let mut old =
        PgOldStore::open(&conn, &items_schema(), Names::for_upgrade(UpgradeId(3))).expect("open the slot's db");
    let (snapshot, at) = old.open_snapshot().expect("snapshot");
    let mut after = None;
    loop {
        let chunk = old.snapshot_chunk(snapshot, &after, 1_000).expect("chunk");
        after = chunk.rows.last().map(|(t, k, _)| (t.clone(), *k)).or(after);
        if chunk.last {
            break;
        }
    }
    let mut position = at;
    let mut read = 0;
    let first = old.changes_after(position, 500).expect("changes");
    read += first.changes.len() as u64;
    position = first.complete_to.max(position);
    ready.send(()).expect("ready");
    let mut stopped_at = None;
    loop {
        let changes = old.changes_after(position, 500).expect("changes");
        read += changes.changes.len() as u64;
        position = changes.complete_to.max(position);
        old.prune(position).expect("prune");
        if stop.load(Ordering::SeqCst) {
            let since = *stopped_at.get_or_insert_with(Instant::now);
            if changes.changes.is_empty() && read >= expected.load(Ordering::SeqCst) {
                break;
            }
            assert!(since.elapsed() < STREAM_WAIT, "the slot's reader did not catch up: {read} changes read");
        }
    }
    old.remove_capture().expect("remove the slot");
    read
}

fn main() {
    let rows: u64 = if quick() { 50_000 } else { 1_000_000 };
    let backlog: i64 = if quick() { 2_000 } else { 20_000 };
    let (steady_rate, steady_secs): (u64, u64) = if quick() { (200, 3) } else { (500, 10) };
    let pairs: usize = if quick() { 4 } else { 10 };
    let cluster = ThrowawayCluster::start(ThrowawayOptions { fsync: true, ..Default::default() })
        .unwrap_or_else(|e| panic!("the benchmark needs PostgreSQL, which cannot start: {e}"));
    let rt = runtime();
    items_database(&rt, &cluster, "old", rows);
    for db in ["plain", "new", "split"] {
        cluster.create_database(db).expect("create database");
    }
    run(&rt, &client(&rt, &cluster, "plain"), ITEMS_TABLE);
    println!("data benchmark (PostgreSQL, throwaway cluster, fsync on): {rows} rows");

    // Imago's copy, one-to-one (a column renamed).
    let one_to_one = one_to_one();
    let mut old =
        PgOldStore::open(&cluster.connection_string("old"), &items_schema(), Names::for_upgrade(UpgradeId(1)))
            .expect("open the old database");
    let mut new = PgNewStore::open(&cluster.connection_string("new"), &one_to_one).expect("open the new database");
    let mut core = TransformCore::new(new.checkpoint().expect("checkpoint"))
        .with_positions(Positions::Ordered)
        .with_copy_chunk_rows(COPY_CHUNK_ROWS_DEFAULT);
    // Each copy (this one and the baselines) starts right after a checkpoint, so that none
    // pays for another's dirty pages or full-page writes.
    run(&rt, &client(&rt, &cluster, "old"), "CHECKPOINT");
    let start = Instant::now();
    let copied = copy(&mut old, &mut new, &mut core);
    let copy_rate = rate(copied, start.elapsed());
    let copy_ms = |phase: &AtomicU64| phase.load(Ordering::Relaxed) / 1_000;
    let (read_ms, core_ms, apply_ms) = (copy_ms(&COPY_READ_US), copy_ms(&COPY_CORE_US), copy_ms(&COPY_APPLY_US));
    println!("the copy's time: reading the old database {read_ms} ms, the core {core_ms} ms, applying {apply_ms} ms");
    let peak_mib = peak_rss_mib();
    assert_eq!(copied, rows, "the copy read every row");

    // Baselines: PostgreSQL's own COPY out of the old database and into an identical table.
    let (copy_bytes, copy_out_rate, copy_in_rate) = plain_copies(&rt, &cluster, "old", "plain", rows);
    let copy_ratio = copy_rate / copy_in_rate;
    println!(
        "plain COPY items TO STDOUT: {copy_out_rate:.0} rows/s ({:.1} MiB); plain COPY items FROM STDIN: {copy_in_rate:.0} rows/s",
        copy_bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "bulk copy + one-to-one transform: {copy_rate:.0} rows/s; plain COPY FROM: {copy_in_rate:.0} rows/s \
         ({:.0} % of it; target ≥ 50 %: {})",
        100.0 * copy_ratio,
        if copy_ratio >= 0.5 { "met" } else { "NOT met" }
    );

    // A split with a generated key and a reference, from a capture of its own (a snapshot of
    // the first capture would make its slot again), removed once copied.
    let split_mapping = split();
    let split_rate = {
        let mut split_old =
            PgOldStore::open(&cluster.connection_string("old"), &items_schema(), Names::for_upgrade(UpgradeId(2)))
                .expect("open the old database");
        let mut split_new =
            PgNewStore::open(&cluster.connection_string("split"), &split_mapping).expect("open the split database");
        let mut split_core = TransformCore::new(split_new.checkpoint().expect("checkpoint"))
            .with_positions(Positions::Ordered)
            .with_copy_chunk_rows(COPY_CHUNK_ROWS_DEFAULT);
        let start = Instant::now();
        let split_copied = copy(&mut split_old, &mut split_new, &mut split_core);
        let split_rate = rate(split_copied, start.elapsed());
        split_old.remove_capture().expect("remove the split's capture");
        split_rate
    };
    println!(
        "bulk copy + split with a generated key: {split_rate:.0} rows/s; plain COPY FROM: {copy_in_rate:.0} rows/s \
         ({:.0} %, report)",
        100.0 * split_rate / copy_in_rate
    );

    // Catch-up from a backlog of single-row updates, each its own transaction as an
    // application writes them (made quickly: `synchronous_commit = off` for this session).
    let app = client(&rt, &cluster, "old");
    let backlog_took = rt.block_on(async {
        app.batch_execute("SET synchronous_commit = off").await.expect("set");
        let update = app.prepare(UPDATE_PRICE).await.expect("prepare");
        let start = Instant::now();
        for i in 0..backlog {
            app.execute(&update, &[&((i * 7919) % rows as i64 + 1)]).await.expect("update");
        }
        app.batch_execute("SET synchronous_commit = on").await.expect("set");
        start.elapsed()
    });
    let backlog_rate = rate(backlog as u64, backlog_took);
    let skipped_before = core.duplicates_skipped;
    let start = Instant::now();
    let mut streamed = 0u64;
    loop {
        match step(&mut old, &mut new, &mut core) {
            Step::Read { read, applied: true, .. } => streamed += read.changes.len() as u64,
            Step::Read { applied: false, .. } if streamed >= backlog as u64 => break,
            Step::Read { .. } => assert!(start.elapsed() < STREAM_WAIT, "not caught up: {streamed} changes"),
            Step::Copied(_) => unreachable!("the copy is done"),
        }
    }
    let stream_rate = rate(streamed, start.elapsed());
    println!(
        "catch-up: {stream_rate:.0} changes/s over a backlog of {streamed}; the application wrote them at \
         {backlog_rate:.0} updates/s (synchronous_commit off)"
    );
    assert_eq!(streamed, backlog as u64, "every change of the backlog read once");
    assert_eq!(core.duplicates_skipped, skipped_before, "no change read twice");

    // Steady streaming: an application writing single-row updates at a fixed rate (each its
    // own transaction, `synchronous_commit = on`) while the transform follows.
    let writes = steady_rate * steady_secs;
    let committed: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; writes as usize]));
    let mut applied_at: Vec<Option<Instant>> = vec![None; writes as usize];
    let writer_done = Arc::new(AtomicBool::new(false));
    let mut lag_bytes = Vec::new();
    let (steady_streamed, steady_took, write_took) = std::thread::scope(|scope| {
        let writer = {
            let (committed, done, cluster) = (committed.clone(), writer_done.clone(), &cluster);
            scope.spawn(move || {
                let rt = runtime();
                let app = client(&rt, cluster, "old");
                let took = rt.block_on(async {
                    let update = app.prepare(UPDATE_PRICE).await.expect("prepare");
                    let start = tokio::time::Instant::now();
                    let every = Duration::from_secs(1) / steady_rate as u32;
                    for i in 0..writes {
                        tokio::time::sleep_until(start + every * i as u32).await;
                        app.execute(&update, &[&(i as i64 + 1)]).await.expect("update");
                        committed.lock().expect("lock")[i as usize] = Some(Instant::now());
                    }
                    start.elapsed()
                });
                done.store(true, Ordering::SeqCst);
                took
            })
        };
        let start = Instant::now();
        let mut streamed = 0u64;
        loop {
            let writing = !writer_done.load(Ordering::SeqCst);
            match step(&mut old, &mut new, &mut core) {
                Step::Read { after, read, applied } => {
                    if writing {
                        lag_bytes.push(read.captured.0.saturating_sub(after.0) as f64);
                    }
                    if applied {
                        let now = Instant::now();
                        streamed += read.changes.len() as u64;
                        for (_, op) in &read.changes {
                            if let RowOp::Upsert { key, .. } = op {
                                if let Some(slot) = applied_at.get_mut((*key - 1) as usize) {
                                    slot.get_or_insert(now);
                                }
                            }
                        }
                    } else if !writing && streamed >= writes {
                        break;
                    }
                }
                Step::Copied(_) => unreachable!("the copy is done"),
            }
            assert!(start.elapsed() < STREAM_WAIT, "not caught up: {streamed} of {writes} changes");
        }
        (streamed, start.elapsed(), writer.join().expect("writer"))
    });
    assert_eq!(steady_streamed, writes, "every steady write read once");
    let committed = committed.lock().expect("lock").clone();
    let mut lag_ms: Vec<f64> = committed
        .iter()
        .zip(&applied_at)
        .map(|(c, a)| {
            let (c, a) = (c.expect("every write committed"), a.expect("every write applied"));
            a.saturating_duration_since(c).as_secs_f64() * 1000.0
        })
        .collect();
    let write_rate = rate(writes, write_took);
    let steady_apply_rate = rate(steady_streamed, steady_took);
    let (lag_ms_p50, lag_ms_max) = (quantile(&mut lag_ms, 0.5), quantile(&mut lag_ms, 1.0));
    let (lag_bytes_p50, lag_bytes_max) = (quantile(&mut lag_bytes, 0.5), quantile(&mut lag_bytes, 1.0));
    println!(
        "steady streaming: the application wrote {writes} updates at {write_rate:.0}/s (target {steady_rate}/s, \
         synchronous_commit on); the transform applied {steady_apply_rate:.0} changes/s over the phase; \
         lag commit → applied p50 {lag_ms_p50:.1} ms, max {lag_ms_max:.1} ms; captured − applied at each read \
         p50 {lag_bytes_p50:.0} B, max {lag_bytes_max:.0} B ({} reads)",
        lag_bytes.len()
    );

    // The new database equals transform(old), after the copy, the backlog and the steady writes.
    let start = Instant::now();
    let checked = check_equal(&old, &mut new);
    let full_compare = start.elapsed();
    let compare_rate = rate(checked as u64, full_compare);
    println!(
        "checked: the new database equals transform(old), compared as the drain does: {checked} rows read, \
         staged and summed in {:.1} s ({compare_rate:.0} rows/s; a freeze of {} ms compares at most about {:.0} rows)",
        start.elapsed().as_secs_f64(),
        freeze_timeout_ms(),
        compare_rate * freeze_timeout_ms() as f64 / 1_000.0,
    );

    // The comparison by key range while traffic runs, as a data node syncs: a first round over
    // every range, then single-row updates while the ranges they change are compared again; at
    // the freeze, the drain stages only the ranges changed since, and reads the new database's
    // whole checksum. Twice: updates of a hot set (the newest 1 % of the rows, as an
    // application mostly changes its recent rows), then updates spread over the whole table
    // (the worst case: every update can change a range of its own). Beside the whole
    // comparison above (same run).
    let range_rows = node_core::data_node::RANGE_ROWS_DEFAULT;
    let (range_writes_per_s, range_secs): (u64, u64) = if quick() { (50, 3) } else { (100, 10) };
    let range_writes = range_writes_per_s * range_secs;
    let mut drive = range_checks::Drive::new(&mut old, &mut new, core);
    let start = Instant::now();
    while let Some(outcome) = drive.compare_range(range_rows) {
        assert_eq!(outcome, Some(true), "a range compared different: {:?}", drive.ranges.report());
    }
    let first_round = start.elapsed();
    let [read, catch_up, stage, compare] = drive.took.map(|d| d.as_millis());
    let ranges = drive.ranges.report().ranges;
    let range_rate = rate(drive.ranges.report().rows, first_round);
    println!(
        "comparison by key range: a first round over {ranges} ranges of at most {range_rows} rows in {:.1} s \
         ({range_rate:.0} rows/s): reading rows {read} ms, the transform catching up {catch_up} ms, staging \
         {stage} ms, comparing {compare} ms",
        first_round.as_secs_f64()
    );
    let mut by_range = Vec::new();
    for (name, hot) in [("hot set", true), ("spread", false)] {
        let writer_done = AtomicBool::new(false);
        let (again, spoiled) = std::thread::scope(|scope| {
            let cluster = &cluster;
            let done = &writer_done;
            scope.spawn(move || {
                let rt = runtime();
                let app = client(&rt, cluster, "old");
                rt.block_on(async {
                    let update = app.prepare(UPDATE_PRICE).await.expect("prepare");
                    let start = tokio::time::Instant::now();
                    let every = Duration::from_secs(1) / range_writes_per_s as u32;
                    for i in 0..range_writes {
                        tokio::time::sleep_until(start + every * i as u32).await;
                        let id = if hot { rows - (i * 7_919) % (rows / 100) } else { (i * 7_919) % rows + 1 };
                        app.execute(&update, &[&(id as i64)]).await.expect("update");
                    }
                });
                done.store(true, Ordering::SeqCst);
            });
            let (mut again, mut spoiled) = (0u64, 0u64);
            while !writer_done.load(Ordering::SeqCst) {
                match drive.compare_range(range_rows) {
                    None => {
                        drive.step();
                    }
                    Some(None) => spoiled += 1,
                    Some(Some(true)) => again += 1,
                    Some(Some(false)) => panic!("a range compared different: {:?}", drive.ranges.report()),
                }
            }
            (again, spoiled)
        });
        // The freeze: every write applied (the last phase fences; before it, the writer has
        // stopped and the stream is read until it has nothing more).
        if hot {
            while drive.step() {}
        } else {
            let final_position = drive.old.fence().expect("fence");
            drive.catch_up(final_position, 100_000);
        }
        let changed = drive.ranges.report().ranges - drive.ranges.report().clean;
        let start = Instant::now();
        assert!(drive.drain_matches(COPY_CHUNK_ROWS_DEFAULT), "the drain found transform(old) and new different");
        let drain = start.elapsed();
        println!(
            "comparison by key range, {name}: {range_writes} updates at {range_writes_per_s}/s while changed \
             ranges were compared again ({again} comparisons, {spoiled} spoiled by a write); at the freeze \
             {changed} ranges had changed since: the drain staged {} rows and compared in {:.2} s, against \
             {:.2} s for the whole comparison above",
            drive.staged_rows,
            drain.as_secs_f64(),
            full_compare.as_secs_f64(),
        );
        by_range.push(serde_json::json!({
            "writes": name,
            "writes_per_s": range_writes_per_s,
            "updates": range_writes,
            "compared_again": again,
            "spoiled": spoiled,
            "ranges_changed_at_freeze": changed,
            "drain_staged_rows": drive.staged_rows,
            "drain_ms": drain.as_millis() as u64,
        }));
        // After the hot phase's drain, ranges compared again start the next phase clean.
        while let Some(outcome) = drive.compare_range(range_rows) {
            assert_ne!(outcome, Some(false), "a range compared different");
        }
    }
    drop(old);
    drop(new);

    // Slot overhead: the same inserts into a database whose slot is read and into an identical
    // one without, interleaved, with `synchronous_commit` on and off.
    let app_rows: u64 = 10_000;
    items_database(&rt, &cluster, "slot_app", app_rows);
    items_database(&rt, &cluster, "bare_app", app_rows);
    let stop = Arc::new(AtomicBool::new(false));
    let expected = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut overhead = Vec::new();
    let mut inserted = 0u64;
    let slot_read = std::thread::scope(|scope| {
        let reader = {
            let (conn, stop, expected) = (cluster.connection_string("slot_app"), stop.clone(), expected.clone());
            scope.spawn(move || slot_reader(conn, ready_tx, stop, expected))
        };
        ready_rx.recv().expect("the slot's reader is ready");
        let slot_client = client(&rt, &cluster, "slot_app");
        let bare_client = client(&rt, &cluster, "bare_app");
        let mut next_id = app_rows as i64 + 1;
        for (mode, inserts) in [("on", if quick() { 200 } else { 1_000 }), ("off", if quick() { 1_000 } else { 5_000 })]
        {
            let set = format!("SET synchronous_commit = {mode}");
            run(&rt, &slot_client, &set);
            run(&rt, &bare_client, &set);
            let sql = "INSERT INTO items VALUES ($1, 'new', 1, 1)";
            let slot_insert = rt.block_on(slot_client.prepare(sql)).expect("prepare");
            let bare_insert = rt.block_on(bare_client.prepare(sql)).expect("prepare");
            let (mut ratios, mut with_rates, mut without_rates) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..pairs {
                let without = inserts_per_second(&rt, &bare_client, &bare_insert, next_id, inserts);
                let with = inserts_per_second(&rt, &slot_client, &slot_insert, next_id, inserts);
                next_id += inserts;
                inserted += inserts as u64;
                ratios.push(with / without);
                with_rates.push(with);
                without_rates.push(without);
            }
            let (ratio, low, high) = median_ci(&ratios);
            let (with, without) = (median(&mut with_rates), median(&mut without_rates));
            println!(
                "slot overhead (synchronous_commit {mode}, {pairs} pairs of {inserts} inserts): {with:.0} inserts/s \
                 with a slot being read, {without:.0} without: median ratio {ratio:.3} (95 % CI {low:.3}–{high:.3}), \
                 overhead {:.1} % (report)",
                100.0 * (1.0 - ratio)
            );
            overhead.push(serde_json::json!({
                "synchronous_commit": mode,
                "pairs": pairs,
                "inserts_per_measurement": inserts,
                "insert_ratio_median": ratio,
                "insert_ratio_ci95": [low, high],
                "inserts_per_s_with_slot_median": with,
                "baseline_inserts_per_s_median": without,
            }));
        }
        expected.store(inserted, Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
        reader.join().expect("the slot's reader")
    });
    assert_eq!(slot_read, inserted, "the slot's reader read every insert once");
    if let Some(mib) = peak_mib {
        println!("peak memory after copying {rows} rows: {mib:.0} MiB (the whole benchmark process)");
    }

    let out = std::env::var("IMAGO_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/data.json"));
    let json = serde_json::json!({
        "store": "postgres",
        "fsync": true,
        "rows": rows,
        "baseline_copy_out_rows_per_s": copy_out_rate,
        "baseline_copy_out_bytes": copy_bytes,
        "baseline_copy_in_rows_per_s": copy_in_rate,
        "copy_one_to_one_rows_per_s": copy_rate,
        "copy_ratio_of_copy_in": copy_ratio,
        "copy_ratio_target": 0.5,
        "copy_ratio_meets_target": copy_ratio >= 0.5,
        "copy_split_generated_key_rows_per_s": split_rate,
        "drain_compare_rows_per_s": compare_rate,
        "drain_compare_whole_ms": full_compare.as_millis() as u64,
        "range_rows": range_rows,
        "ranges": ranges,
        "range_first_round_rows_per_s": range_rate,
        "drain_by_range": by_range,
        "copy_read_ms": read_ms,
        "copy_core_ms": core_ms,
        "copy_apply_ms": apply_ms,
        "catch_up_changes_per_s": stream_rate,
        "catch_up_changes": streamed,
        "backlog_written_updates_per_s": backlog_rate,
        "steady_target_writes_per_s": steady_rate,
        "steady_seconds": steady_secs,
        "steady_writes": writes,
        "steady_writes_per_s": write_rate,
        "steady_applied_changes_per_s": steady_apply_rate,
        "steady_lag_ms_p50": lag_ms_p50,
        "steady_lag_ms_max": lag_ms_max,
        "steady_lag_wal_bytes_p50": lag_bytes_p50,
        "steady_lag_wal_bytes_max": lag_bytes_max,
        "slot_overhead": overhead,
        "peak_rss_mib": peak_mib,
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).expect("bench dir");
    }
    std::fs::write(&out, serde_json::to_string_pretty(&json).expect("json")).expect("write");
    println!("written to {}", out.display());
}
