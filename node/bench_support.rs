//! What the data benchmarks share (`node/sqlite/benches/data.rs` and
//! `node/postgres/benches/data.rs` include this file as a module of their own): the workload's
//! old schema and its two mappings, and the statistics.

use protocol::schema::{Mapping, Schema, SplitPart, TableSchema, Transform};
use std::time::Duration;

/// The old database's one table: `items(id, title, seller, price)`.
pub fn items_schema() -> Schema {
    let table = TableSchema {
        key: "id".into(),
        columns: ["id", "title", "seller", "price"].into_iter().map(String::from).collect(),
    };
    Schema { tables: [("items".to_string(), table)].into() }
}

/// One-to-one: `title` renamed `name`.
pub fn one_to_one() -> Mapping {
    let rename = Transform::RenameColumn { table: "items".into(), from: "title".into(), to: "name".into() };
    Mapping::compile(&items_schema(), &[rename]).expect("mapping")
}

/// A split with a generated key and references: `items` keeps title and seller, `prices` gets
/// the price under a key the new database makes.
pub fn split() -> Mapping {
    let split = Transform::SplitTable {
        table: "items".into(),
        into: vec![
            SplitPart {
                table: "items".into(),
                columns: vec!["title".into(), "seller".into()],
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
    Mapping::compile(&items_schema(), &[split]).expect("split")
}

pub fn rate(count: u64, took: Duration) -> f64 {
    count as f64 / took.as_secs_f64()
}

/// The process's peak resident memory, in MiB (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The median of `ratios` and a distribution-free 95 % confidence interval for it (the order
/// statistics of the binomial interval; with fewer than 6 values, the range).
pub fn median_ci(ratios: &[f64]) -> (f64, f64, f64) {
    let mut sorted = ratios.to_vec();
    let m = median(&mut sorted);
    let n = sorted.len();
    let half = (1.96 * (n as f64).sqrt() / 2.0).ceil() as usize;
    let low = (n / 2).saturating_sub(half);
    let high = (n / 2 + half).min(n - 1);
    (m, sorted[low], sorted[high])
}
