//! The simulated service in two versions: an auction site's users and items, v1 on the old
//! schema and v2 on the new one (renamed column, split table, renamed table, changed type,
//! added column). Both answer with the same canonical body, so mirrored reads compare.
//!
//! A bid increments an item's counter: applied twice, it counts twice (writes are not all
//! idempotent, so a request executed twice shows).

use node_core::store::MemStore;
use protocol::schema::{Row, RowOp, Value};
use protocol::Generation;
use serde::{Deserialize, Serialize};

/// A client operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppOp {
    RegisterUser {
        id: i64,
        name: String,
        email: String,
        bio: String,
    },
    UpdateBio {
        id: i64,
        bio: String,
    },
    AddItem {
        id: i64,
        title: String,
        seller: i64,
        price: i64,
    },
    /// One more bid on an item (`bids += 1`).
    Bid {
        item: i64,
    },
    ViewUser {
        id: i64,
    },
    ViewItem {
        id: i64,
    },
}

impl AppOp {
    pub fn read_only(&self) -> bool {
        matches!(self, AppOp::ViewUser { .. } | AppOp::ViewItem { .. })
    }

    /// The key that picks the data node (shard).
    pub fn key(&self) -> i64 {
        match self {
            AppOp::RegisterUser { id, .. }
            | AppOp::UpdateBio { id, .. }
            | AppOp::AddItem { id, .. }
            | AppOp::Bid { item: id }
            | AppOp::ViewUser { id }
            | AppOp::ViewItem { id } => *id,
        }
    }
}

/// Why an operation failed inside the app.
pub type AppError = String;

fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

fn row(pairs: &[(&str, Value)]) -> Row {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// The bio of every user loaded before the run.
pub const INITIAL_BIO: &str = "hello";

/// Old-schema rows for the initial data.
pub fn initial_user(id: i64) -> RowOp {
    let r = row(&[
        ("id", Value::Int(id)),
        ("name", text(&format!("user{id}"))),
        ("email", text(&format!("u{id}@example.org"))),
        ("bio", text(INITIAL_BIO)),
    ]);
    RowOp::Upsert { table: "users".into(), key: id, row: r }
}

pub fn initial_item(id: i64) -> RowOp {
    let r = row(&[
        ("id", Value::Int(id)),
        ("title", text(&format!("item{id}"))),
        ("seller", Value::Int(id % 7)),
        ("price", Value::Int(100 + id)),
        ("bids", Value::Int(0)),
    ]);
    RowOp::Upsert { table: "items".into(), key: id, row: r }
}

/// The row with its `bids` counter one higher.
fn bid(mut r: Row) -> Row {
    let bids = match r.get("bids") {
        Some(Value::Int(n)) => *n,
        _ => 0,
    };
    r.insert("bids".into(), Value::Int(bids + 1));
    r
}

/// v1: writes return the row ops to apply to the old store (captured); reads answer.
pub mod v1 {
    use super::*;

    pub fn write(store: &MemStore, op: &AppOp) -> Result<Vec<RowOp>, AppError> {
        Ok(match op {
            AppOp::RegisterUser { id, name, email, bio } => vec![RowOp::Upsert {
                table: "users".into(),
                key: *id,
                row: row(&[("id", Value::Int(*id)), ("name", text(name)), ("email", text(email)), ("bio", text(bio))]),
            }],
            AppOp::UpdateBio { id, bio } => {
                let mut r = store.get("users", *id).cloned().ok_or_else(|| format!("no user {id}"))?;
                r.insert("bio".into(), text(bio));
                vec![RowOp::Upsert { table: "users".into(), key: *id, row: r }]
            }
            AppOp::AddItem { id, title, seller, price } => vec![RowOp::Upsert {
                table: "items".into(),
                key: *id,
                row: row(&[
                    ("id", Value::Int(*id)),
                    ("title", text(title)),
                    ("seller", Value::Int(*seller)),
                    ("price", Value::Int(*price)),
                    ("bids", Value::Int(0)),
                ]),
            }],
            AppOp::Bid { item } => {
                let r = store.get("items", *item).cloned().ok_or_else(|| format!("no item {item}"))?;
                vec![RowOp::Upsert { table: "items".into(), key: *item, row: bid(r) }]
            }
            AppOp::ViewUser { .. } | AppOp::ViewItem { .. } => Vec::new(),
        })
    }

    pub fn read(store: &MemStore, op: &AppOp) -> Option<Row> {
        match op {
            AppOp::ViewUser { id } => store.get("users", *id).cloned(),
            AppOp::ViewItem { id } => store.get("items", *id).cloned(),
            _ => None,
        }
    }
}

/// The column of `auctions` that holds an auction's status in generation `g` (2 and later:
/// each upgrade after the first renames it, so that every upgrade of a chain has a schema
/// change to carry).
pub fn status_column(g: Generation) -> String {
    if g.0 <= 2 {
        "status".to_string()
    } else {
        format!("status_g{}", g.0)
    }
}

/// Generation `g`'s write: the row ops it applies (v1 for generation 1, v2 after).
pub fn write(g: Generation, store: &MemStore, op: &AppOp) -> Result<Vec<RowOp>, AppError> {
    if g == Generation::GENESIS {
        v1::write(store, op)
    } else {
        v2::write(store, op, &status_column(g))
    }
}

/// Generation `g`'s read, in v1's canonical shape.
pub fn read(g: Generation, store: &MemStore, op: &AppOp) -> Option<Row> {
    if g == Generation::GENESIS {
        v1::read(store, op)
    } else {
        v2::read(store, op, &status_column(g))
    }
}

/// User `id` as generation `g`'s store holds it: every row of the user there, and the bio.
pub fn user(g: Generation, store: &MemStore, id: i64) -> (bool, Option<String>) {
    let text = |row: Option<&Row>| match row.and_then(|r| r.get("bio")) {
        Some(Value::Text(t)) => Some(t.clone()),
        _ => None,
    };
    if g == Generation::GENESIS {
        let row = store.get("users", id);
        (row.is_some(), text(row))
    } else {
        let profile = store.get("user_profiles", id);
        (store.get("users", id).is_some() && profile.is_some(), text(profile))
    }
}

/// Item `id`'s bid count in generation `g`'s store.
pub fn bids(g: Generation, store: &MemStore, id: i64) -> Option<i64> {
    let table = if g == Generation::GENESIS { "items" } else { "auctions" };
    match store.get(table, id).and_then(|r| r.get("bids")) {
        Some(Value::Int(n)) => Some(*n),
        _ => None,
    }
}

/// v2: the same API on the new schema (`status`: the name of the status column).
pub mod v2 {
    use super::*;

    pub fn write(store: &MemStore, op: &AppOp, status: &str) -> Result<Vec<RowOp>, AppError> {
        Ok(match op {
            AppOp::RegisterUser { id, name, email, bio } => vec![
                RowOp::Upsert {
                    table: "users".into(),
                    key: *id,
                    row: row(&[("id", Value::Int(*id)), ("nickname", text(name)), ("email", text(email))]),
                },
                RowOp::Upsert {
                    table: "user_profiles".into(),
                    key: *id,
                    row: row(&[("id", Value::Int(*id)), ("bio", text(bio))]),
                },
            ],
            AppOp::UpdateBio { id, bio } => {
                if store.get("users", *id).is_none() {
                    return Err(format!("no user {id}"));
                }
                vec![RowOp::Upsert {
                    table: "user_profiles".into(),
                    key: *id,
                    row: row(&[("id", Value::Int(*id)), ("bio", text(bio))]),
                }]
            }
            AppOp::AddItem { id, title, seller, price } => vec![RowOp::Upsert {
                table: "auctions".into(),
                key: *id,
                row: row(&[
                    ("id", Value::Int(*id)),
                    ("title", text(title)),
                    ("seller", Value::Int(*seller)),
                    ("price", text(&price.to_string())),
                    ("bids", Value::Int(0)),
                    (status, text("open")),
                ]),
            }],
            AppOp::Bid { item } => {
                let r = store.get("auctions", *item).cloned().ok_or_else(|| format!("no item {item}"))?;
                vec![RowOp::Upsert { table: "auctions".into(), key: *item, row: bid(r) }]
            }
            AppOp::ViewUser { .. } | AppOp::ViewItem { .. } => Vec::new(),
        })
    }

    /// Answers in v1's canonical shape.
    pub fn read(store: &MemStore, op: &AppOp, status: &str) -> Option<Row> {
        match op {
            AppOp::ViewUser { id } => {
                let user = store.get("users", *id)?;
                let profile = store.get("user_profiles", *id);
                let mut r = Row::new();
                r.insert("id".into(), Value::Int(*id));
                r.insert("name".into(), user.get("nickname").cloned().unwrap_or(Value::Null));
                r.insert("email".into(), user.get("email").cloned().unwrap_or(Value::Null));
                r.insert("bio".into(), profile.and_then(|p| p.get("bio").cloned()).unwrap_or(Value::Null));
                Some(r)
            }
            AppOp::ViewItem { id } => {
                let a = store.get("auctions", *id)?;
                let mut r: Row = a.iter().filter(|(k, _)| *k != status).map(|(k, v)| (k.clone(), v.clone())).collect();
                if let Some(Value::Text(p)) = r.get("price") {
                    let parsed = p.parse().map(Value::Int).unwrap_or(Value::Null);
                    r.insert("price".into(), parsed);
                }
                Some(r)
            }
            _ => None,
        }
    }
}

/// Where generation `generation`'s universe answers in the simulator (the plans name it; the
/// routers' requests for a generation must go there, and nowhere else).
pub fn endpoint(generation: Generation) -> String {
    format!("sim://universe-{}", generation.0)
}

/// The plan the simulator loads (through the real plan loader) for the upgrade from generation
/// `from`: v1 to v2 from generation 1; after that,
/// each renames the status column of `auctions` (the new schema of one upgrade is the old
/// schema of the next).
#[allow(clippy::too_many_arguments)]
pub fn plan_toml(
    from: Generation,
    routers: usize,
    data_nodes: usize,
    max_attempts: u32,
    hold_ms_max: u64,
    hold_queue_max: u64,
    freeze_timeout_ms: u64,
    manual: bool,
) -> String {
    let switch = if manual { "manual" } else { "auto" };
    let name = format!("sim-auction-g{}", from.next().0);
    let generation = from.0;
    let mut s = format!(
        r#"[upgrade]
name = "{name}"
old_generation = {generation}
switch = "{switch}"
max_attempts = {max_attempts}

[thresholds]
lag_max = 50
samples_min = 20
mismatch_ratio_max = 0.0
hold_ms_max = {hold_ms_max}
hold_queue_max = {hold_queue_max}
freeze_timeout_ms = {freeze_timeout_ms}
retry_backoff_ms = 500

[universe]
endpoints = ["{endpoint}"]
"#,
        endpoint = endpoint(from.next())
    );
    for i in 0..routers {
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"router-{i}\"\ntier = \"web\"\nduties = [\"route\", \"validate\"]\n"
        ));
    }
    for i in 0..data_nodes {
        s.push_str(&format!("\n[[nodes]]\nname = \"db-{i}\"\ntier = \"db\"\nduties = [\"capture\", \"transform\"]\n"));
    }
    if from != Generation::GENESIS {
        let (status, next) = (status_column(from), status_column(from.next()));
        s.push_str(&format!(
            r#"
[schema.old.users]
columns = ["id", "nickname", "email"]

[schema.old.user_profiles]
columns = ["id", "bio"]

[schema.old.auctions]
columns = ["id", "title", "seller", "price", "bids", "{status}"]

[[transforms]]
kind = "rename_column"
table = "auctions"
from = "{status}"
to = "{next}"
"#
        ));
        return s;
    }
    s.push_str(
        r#"
[schema.old.users]
columns = ["id", "name", "email", "bio"]

[schema.old.items]
columns = ["id", "title", "seller", "price", "bids"]

[[transforms]]
kind = "rename_column"
table = "users"
from = "name"
to = "nickname"

[[transforms]]
kind = "split_table"
table = "users"
into = [{ table = "users", columns = ["nickname", "email"] }, { table = "user_profiles", columns = ["bio"] }]

[[transforms]]
kind = "rename_table"
table = "items"
to = "auctions"

[[transforms]]
kind = "change_type"
table = "auctions"
column = "price"
to = "text"

[[transforms]]
kind = "add_column"
table = "auctions"
column = "status"
default = "open"
"#,
    );
    s
}
