//! The upgrade plan: what an operator writes (TOML) and what the coordinator replicates.
//!
//! [`Plan::from_toml`] parses and validates a plan; every error names the file, the line and
//! column, and the field (e.g. `plan.toml:14:8: transforms[1].from: column `nmae` does not
//! exist in `users``). The validated [`Plan`] is a plain wire type (no spans) that goes into
//! the coordinator's replicated state.

use crate::ids::{Duty, Generation, NodeName};
use crate::schema::{ColumnType, Mapping, Schema, SplitPart, TableSchema, Transform, TransformField, Value};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use toml::Spanned;

/// Whether the switch waits for the operator once the ready gate passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SwitchMode {
    /// Freeze as soon as the ready gate passes.
    Auto,
    /// Freeze only after `imago upgrade switch` (and the gate passes).
    Manual,
}

/// Limits and thresholds of one upgrade. Every one has an explicit range (see [`Plan::from_toml`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Largest transform lag (captured − applied positions: changes in SQLite, WAL bytes in
    /// PostgreSQL) at which the gate may pass.
    pub lag_max: u64,
    /// Longest the oldest captured change not yet applied may have waited for the gate to pass
    /// (a data node's `lag_ms`: the same unit whatever the store); none: not checked.
    pub lag_ms_max: Option<u64>,
    /// Fewest validated mirrored requests before the gate may pass.
    pub samples_min: u64,
    /// Largest mismatching share of validated requests, in [0, 1].
    pub mismatch_ratio_max: f64,
    /// Longest a router holds one request while frozen before failing it (503).
    pub hold_ms_max: u64,
    /// Most requests one router holds at once; more are refused with 503 at once.
    pub hold_queue_max: u32,
    /// Longest a request in flight keeps a frozen router from acking: then the router ends it
    /// (its client gets 504, the outcome unknown) and stops waiting for it. Below
    /// `freeze_timeout_ms`, so one slow request cannot abort every freeze.
    pub inflight_ms_max: u64,
    /// Time from `Freeze{e}` to an `Abort{e}` when acks are missing.
    pub freeze_timeout_ms: u64,
    /// Pause after an abort before the next freeze attempt.
    pub retry_backoff_ms: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            lag_max: 100,
            lag_ms_max: None,
            samples_min: 20,
            mismatch_ratio_max: 0.01,
            hold_ms_max: 2_000,
            hold_queue_max: 1_000,
            inflight_ms_max: 1_000,
            freeze_timeout_ms: 3_000,
            retry_backoff_ms: 1_000,
        }
    }
}

/// One tier node named by the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanNode {
    pub name: NodeName,
    pub tier: String,
    pub duties: Vec<Duty>,
}

/// A validated upgrade plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    /// The generation this plan upgrades from: the cluster's current one (a plan written for
    /// another is refused at start). Its new universe becomes the next generation.
    pub old_generation: Generation,
    pub switch: SwitchMode,
    /// Freeze attempts before the upgrade ends `RolledBack`.
    pub max_attempts: u32,
    pub thresholds: Thresholds,
    pub nodes: Vec<PlanNode>,
    pub old_schema: Schema,
    pub transforms: Vec<Transform>,
    /// Where the new universe (the generation after `old_generation`) answers: routers forward
    /// its requests there (`[universe] endpoints`, e.g. `http://10.0.2.7:8080`). Empty: the
    /// plan names none, and routers can neither mirror to it nor switch to it.
    pub endpoints: Vec<String>,
    /// How routers mirror and compare requests (`[validation]`).
    pub validation: Validation,
    /// Path prefixes of long requests (streams, long polls, WebSocket upgrades): a frozen router
    /// ends them at once instead of waiting (`[routes] long`).
    pub long_routes: Vec<String>,
    /// Most rows per second a data node's bulk copy reads from the old universe, so that it
    /// keeps serving (`[copy] rows_per_s_max`; none: as fast as the copy goes).
    pub copy_rows_per_s_max: Option<u64>,
    /// Rows per chunk of a data node's bulk copy, each chunk one transaction of the new
    /// database, and of its drain's comparison (`[copy] chunk_rows`, 1 to
    /// [`COPY_CHUNK_ROWS_MAX`]; none: [`COPY_CHUNK_ROWS_DEFAULT`]).
    pub copy_chunk_rows: Option<usize>,
}

/// Most rows a plan's copy chunk may have (`[copy] chunk_rows`).
pub const COPY_CHUNK_ROWS_MAX: usize = 50_000;

/// Rows per chunk of a data node's bulk copy when the plan names none. Each chunk is one
/// transaction of the new database, and PostgreSQL applies a chunk as one statement per new
/// table, so larger chunks copy faster: 10,000 rows copied 303 k rows/s in the benchmark,
/// 2,000 rows 277 k. (The simulator keeps smaller ones: its tables are small, and a copy
/// should take several chunks there.)
pub const COPY_CHUNK_ROWS_DEFAULT: usize = 10_000;

/// How routers mirror requests to the new universe and compare the answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validation {
    /// Methods of the requests mirrored: those that only read (`GET` and `HEAD` by default).
    pub mirror_methods: Vec<String>,
    /// Keys of an answer's row left out of the comparison: each ignored header as
    /// [`header_key`], each ignored field as itself.
    pub ignore: Vec<String>,
}

impl Default for Validation {
    fn default() -> Self {
        Validation { mirror_methods: vec!["GET".into(), "HEAD".into()], ignore: Vec::new() }
    }
}

/// How an HTTP answer is compared, as a row: its status under [`STATUS_KEY`], each header
/// under [`header_key`] (lowercase name), each top-level field of a JSON object body under its
/// own name, and any other body under [`BODY_KEY`]. Names that start with `:` are never
/// columns or fields, so they cannot collide.
pub const STATUS_KEY: &str = ":status";
/// See [`STATUS_KEY`].
pub const BODY_KEY: &str = ":body";

/// The row key of header `name` (see [`STATUS_KEY`]).
pub fn header_key(name: &str) -> String {
    format!(":header:{}", name.to_ascii_lowercase())
}

/// The methods a plan may mirror: those that change nothing (RFC 9110's safe methods).
pub const SAFE_METHODS: [&str; 4] = ["GET", "HEAD", "OPTIONS", "TRACE"];

/// Most entries in each list of `[validation]` and `[routes]`.
pub const RULES_MAX: usize = 64;
/// Longest entry in those lists.
pub const RULE_BYTES_MAX: usize = 256;

/// Most endpoints one universe may have.
pub const ENDPOINTS_MAX: usize = 64;
/// Longest endpoint.
pub const ENDPOINT_BYTES_MAX: usize = 256;

/// Whether `endpoint` has the form `scheme://authority[/path]`, with a lowercase scheme.
pub fn valid_endpoint(endpoint: &str) -> bool {
    let Some((scheme, rest)) = endpoint.split_once("://") else { return false };
    let authority = rest.split('/').next().unwrap_or("");
    !scheme.is_empty()
        && scheme.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'+' || b == b'-')
        && !authority.is_empty()
        && endpoint.len() <= ENDPOINT_BYTES_MAX
        && !endpoint.chars().any(char::is_whitespace)
}

/// A universe's endpoints as a file lists them (a plan's `[universe]`, the cluster file's):
/// 1 to [`ENDPOINTS_MAX`], each `scheme://host:port`, none twice.
pub(crate) fn endpoints(
    file: &str,
    text: &str,
    raw: &Spanned<Vec<Spanned<String>>>,
    field: &str,
) -> Result<Vec<String>, PlanError> {
    let src = crate::located::Source { file, text };
    let list = raw.get_ref();
    if list.is_empty() || list.len() > ENDPOINTS_MAX {
        return src.error(raw.span(), field, format!("{} endpoints: name 1 to {ENDPOINTS_MAX}", list.len()));
    }
    let mut seen = BTreeSet::new();
    for (i, e) in list.iter().enumerate() {
        let endpoint = e.get_ref();
        if !valid_endpoint(endpoint) {
            let message = format!("`{endpoint}` is not an endpoint of the form scheme://host:port");
            return src.error(e.span(), format!("{field}[{i}]"), message);
        }
        if !seen.insert(endpoint.as_str()) {
            return src.error(e.span(), format!("{field}[{i}]"), format!("`{endpoint}` is named twice"));
        }
    }
    Ok(list.iter().map(|e| e.get_ref().clone()).collect())
}

impl Plan {
    /// Parses and validates a plan. `file` only labels errors.
    pub fn from_toml(file: &str, text: &str) -> Result<Plan, PlanError> {
        let raw: PlanFile = toml::from_str(text).map_err(|e| PlanError::from_toml(file, text, &e))?;
        Validator { src: crate::located::Source { file, text } }.plan(raw)
    }

    /// The compiled row mapping (cannot fail for a validated plan).
    pub fn mapping(&self) -> Result<Mapping, crate::schema::SchemaError> {
        Mapping::compile(&self.old_schema, &self.transforms)
    }

    /// The plan's node of that name.
    pub fn node(&self, name: &NodeName) -> Option<&PlanNode> {
        self.nodes.iter().find(|n| &n.name == name)
    }

    /// Names of the nodes that have `duty`.
    pub fn nodes_with(&self, duty: Duty) -> impl Iterator<Item = &NodeName> {
        self.nodes.iter().filter(move |n| n.duties.contains(&duty)).map(|n| &n.name)
    }
}

/// A plan error: where (file, line, column, field) and what.
pub type PlanError = crate::located::FileError;

// ---- the TOML shape -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    upgrade: UpgradeSection,
    #[serde(default)]
    thresholds: Option<ThresholdsSection>,
    nodes: Spanned<Vec<NodeSection>>,
    schema: SchemaSection,
    #[serde(default)]
    transforms: Vec<TransformSection>,
    universe: Option<UniverseSection>,
    validation: Option<ValidationSection>,
    routes: Option<RoutesSection>,
    copy: Option<CopySection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CopySection {
    rows_per_s_max: Option<Spanned<i64>>,
    chunk_rows: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidationSection {
    mirror_methods: Option<Spanned<Vec<Spanned<String>>>>,
    ignore_headers: Option<Spanned<Vec<Spanned<String>>>>,
    ignore_fields: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesSection {
    long: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UniverseSection {
    endpoints: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeSection {
    name: Spanned<String>,
    old_generation: Option<Spanned<i64>>,
    switch: Option<Spanned<String>>,
    max_attempts: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThresholdsSection {
    lag_max: Option<Spanned<i64>>,
    lag_ms_max: Option<Spanned<i64>>,
    samples_min: Option<Spanned<i64>>,
    mismatch_ratio_max: Option<Spanned<f64>>,
    hold_ms_max: Option<Spanned<i64>>,
    /// Old names, refused with "renamed to …" (qualifiers go last: `lag_max`, not `max_lag`).
    max_lag: Option<Spanned<toml::Value>>,
    min_samples: Option<Spanned<toml::Value>>,
    max_mismatch_ratio: Option<Spanned<toml::Value>>,
    hold_max_ms: Option<Spanned<toml::Value>>,
    hold_queue_max: Option<Spanned<i64>>,
    inflight_ms_max: Option<Spanned<i64>>,
    freeze_timeout_ms: Option<Spanned<i64>>,
    retry_backoff_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    name: Spanned<String>,
    tier: Spanned<String>,
    duties: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaSection {
    old: BTreeMap<String, Spanned<TableSection>>,
    new: Option<BTreeMap<String, Spanned<TableSection>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableSection {
    key: Option<Spanned<String>>,
    columns: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransformSection {
    kind: Spanned<String>,
    table: Option<Spanned<String>>,
    from: Option<Spanned<String>>,
    to: Option<Spanned<String>>,
    column: Option<Spanned<String>>,
    default: Option<Spanned<toml::Value>>,
    expression: Option<Spanned<String>>,
    /// `merge_tables`: the second table.
    with: Option<Spanned<String>>,
    /// `sql`: the new tables its statements write, and the statements.
    writes: Option<Spanned<Vec<Spanned<String>>>>,
    insert: Option<Spanned<String>>,
    update: Option<Spanned<String>>,
    delete: Option<Spanned<String>>,
    into: Option<Vec<SplitPartSection>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitPartSection {
    table: Spanned<String>,
    columns: Spanned<Vec<Spanned<String>>>,
    key: Option<Spanned<String>>,
    generated: Option<bool>,
    /// Column → part table; in name order.
    references: Option<BTreeMap<String, Spanned<String>>>,
}

/// A request in flight may keep a freeze waiting only for less than the freeze's own timeout.
fn in_order(
    thresholds: Thresholds,
    t: &ThresholdsSection,
    src: &crate::located::Source,
) -> Result<Thresholds, PlanError> {
    if thresholds.inflight_ms_max < thresholds.freeze_timeout_ms {
        return Ok(thresholds);
    }
    let span = t.inflight_ms_max.as_ref().or(t.freeze_timeout_ms.as_ref()).map_or(0..0, |s| s.span());
    let message = format!(
        "inflight_ms_max ({}) must be below freeze_timeout_ms ({})",
        thresholds.inflight_ms_max, thresholds.freeze_timeout_ms
    );
    src.error(span, "thresholds.inflight_ms_max", message)
}

// ---- validation -----------------------------------------------------------------------------

struct Validator<'a> {
    src: crate::located::Source<'a>,
}

impl Validator<'_> {
    fn ranged(
        &self,
        value: &Option<Spanned<i64>>,
        field: &str,
        min: i64,
        max: i64,
        default: u64,
    ) -> Result<u64, PlanError> {
        match value {
            None => Ok(default),
            Some(v) if *v.get_ref() < min || *v.get_ref() > max => {
                self.src.error(v.span(), field, format!("{} is out of range {min}..={max}", v.get_ref()))
            }
            Some(v) => Ok(*v.get_ref() as u64),
        }
    }

    fn plan(&self, raw: PlanFile) -> Result<Plan, PlanError> {
        let name = raw.upgrade.name.get_ref().trim().to_string();
        if name.is_empty() {
            return self.src.error(raw.upgrade.name.span(), "upgrade.name", "must not be empty");
        }
        let switch = match &raw.upgrade.switch {
            None => SwitchMode::Manual,
            Some(s) => match s.get_ref().as_str() {
                "auto" => SwitchMode::Auto,
                "manual" => SwitchMode::Manual,
                other => {
                    return self.src.error(
                        s.span(),
                        "upgrade.switch",
                        format!("`{other}` is not one of `auto`, `manual`"),
                    )
                }
            },
        };
        let max_attempts = self.ranged(&raw.upgrade.max_attempts, "upgrade.max_attempts", 1, 100, 3)? as u32;
        let old_generation = Generation(self.ranged(
            &raw.upgrade.old_generation,
            "upgrade.old_generation",
            1,
            i64::from(u32::MAX),
            Generation::GENESIS.0,
        )?);
        let thresholds = self.thresholds(raw.thresholds)?;
        let nodes = self.nodes(&raw.nodes)?;
        let old_schema = self.schema(&raw.schema.old, "schema.old")?;
        let transforms = self.transforms(&raw.transforms, raw.schema.new.as_ref())?;
        match Mapping::compile(&old_schema, &transforms) {
            Err(e) => {
                let raw_transform = &raw.transforms[e.transform];
                let (span, field) = transform_field_span(raw_transform, e.field);
                return self.src.error(span, format!("transforms[{}].{field}", e.transform), e.message);
            }
            Ok(mapping) => {
                if let Some(declared) = &raw.schema.new {
                    let computed = mapping.new_schema();
                    for (table, section) in declared {
                        let field = format!("schema.new.{table}");
                        let Some(got) = computed.tables.get(table) else {
                            return self.src.error(section.span(), field, "the transforms do not produce this table");
                        };
                        let want = self.table(section, &field)?;
                        if *got != want {
                            return self.src.error(
                                section.span(),
                                field,
                                format!("the transforms produce key `{}` and columns {:?}", got.key, got.columns),
                            );
                        }
                    }
                    if let Some(missing) = computed.tables.keys().find(|t| !declared.contains_key(*t)) {
                        return self.src.error(
                            0..0,
                            "schema.new",
                            format!("the transforms produce table `{missing}`, which is not declared"),
                        );
                    }
                }
            }
        }
        let endpoints = match &raw.universe {
            None => Vec::new(),
            Some(u) => self.endpoints(&u.endpoints, "universe.endpoints")?,
        };
        let validation = self.validation(raw.validation)?;
        let copy_rows_per_s_max = match raw.copy.as_ref().map(|c| &c.rows_per_s_max) {
            None | Some(None) => None,
            Some(limit) => Some(self.ranged(limit, "copy.rows_per_s_max", 1, 1_000_000_000, 0)?),
        };
        let copy_chunk_rows = match raw.copy.as_ref().map(|c| &c.chunk_rows) {
            None | Some(None) => None,
            Some(rows) => Some(self.ranged(rows, "copy.chunk_rows", 1, COPY_CHUNK_ROWS_MAX as i64, 0)? as usize),
        };
        let long_routes = match &raw.routes {
            None => Vec::new(),
            Some(r) => self.list(&r.long, "routes.long", |p| {
                if p.starts_with('/') {
                    Ok(p.to_string())
                } else {
                    Err(format!("`{p}` is not a path prefix (it starts with `/`)"))
                }
            })?,
        };
        Ok(Plan {
            name,
            old_generation,
            switch,
            max_attempts,
            thresholds,
            nodes,
            old_schema,
            transforms,
            endpoints,
            validation,
            long_routes,
            copy_rows_per_s_max,
            copy_chunk_rows,
        })
    }

    /// A list of at most [`RULES_MAX`] entries of at most [`RULE_BYTES_MAX`] bytes, none twice,
    /// each checked (and normalized) by `check`.
    fn list(
        &self,
        raw: &Spanned<Vec<Spanned<String>>>,
        field: &str,
        check: impl Fn(&str) -> Result<String, String>,
    ) -> Result<Vec<String>, PlanError> {
        if raw.get_ref().len() > RULES_MAX {
            let message = format!("{} entries: at most {RULES_MAX}", raw.get_ref().len());
            return self.src.error(raw.span(), field, message);
        }
        let mut out: Vec<String> = Vec::new();
        for (i, entry) in raw.get_ref().iter().enumerate() {
            let text = entry.get_ref();
            let checked = if text.is_empty() || text.len() > RULE_BYTES_MAX {
                Err(format!("must be 1 to {RULE_BYTES_MAX} bytes long"))
            } else {
                check(text)
            };
            match checked {
                Err(message) => return self.src.error(entry.span(), format!("{field}[{i}]"), message),
                Ok(v) if out.contains(&v) => {
                    return self.src.error(entry.span(), format!("{field}[{i}]"), format!("`{text}` is named twice"))
                }
                Ok(v) => out.push(v),
            }
        }
        Ok(out)
    }

    fn validation(&self, raw: Option<ValidationSection>) -> Result<Validation, PlanError> {
        let d = Validation::default();
        let Some(v) = raw else { return Ok(d) };
        // An HTTP token (RFC 9110): what a method or a header name may be.
        let token = |t: &str| t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        let mirror_methods = match &v.mirror_methods {
            None => d.mirror_methods,
            // A mirrored copy runs in the new universe while the old one serves: only methods
            // that by definition change nothing (RFC 9110's safe methods) may be mirrored.
            Some(m) => self.list(m, "validation.mirror_methods", |t| {
                if SAFE_METHODS.contains(&t) {
                    Ok(t.to_string())
                } else if token(t) {
                    Err(format!("`{t}` may change state: only {} are mirrored", SAFE_METHODS.join(", ")))
                } else {
                    Err(format!("`{t}` is not an HTTP method (uppercase, like `GET`)"))
                }
            })?,
        };
        let mut ignore = Vec::new();
        if let Some(h) = &v.ignore_headers {
            ignore.extend(self.list(h, "validation.ignore_headers", |t| {
                if token(t) {
                    Ok(header_key(t))
                } else {
                    Err(format!("`{t}` is not a header name"))
                }
            })?);
        }
        if let Some(f) = &v.ignore_fields {
            ignore.extend(self.list(f, "validation.ignore_fields", |t| {
                if t.starts_with(':') {
                    Err(format!("`{t}`: a field name does not start with `:`"))
                } else {
                    Ok(t.to_string())
                }
            })?);
        }
        Ok(Validation { mirror_methods, ignore })
    }

    fn endpoints(&self, raw: &Spanned<Vec<Spanned<String>>>, field: &str) -> Result<Vec<String>, PlanError> {
        endpoints(self.src.file, self.src.text, raw, field)
    }

    fn thresholds(&self, raw: Option<ThresholdsSection>) -> Result<Thresholds, PlanError> {
        let d = Thresholds::default();
        let Some(t) = raw else { return Ok(d) };
        let renamed = [
            (&t.max_lag, "max_lag", "lag_max"),
            (&t.min_samples, "min_samples", "samples_min"),
            (&t.max_mismatch_ratio, "max_mismatch_ratio", "mismatch_ratio_max"),
            (&t.hold_max_ms, "hold_max_ms", "hold_ms_max"),
        ];
        for (value, old, new) in renamed {
            if let Some(v) = value {
                return self.src.error(
                    v.span(),
                    format!("thresholds.{old}"),
                    format!("`{old}` was renamed to `{new}`"),
                );
            }
        }
        let mismatch_ratio_max = match &t.mismatch_ratio_max {
            None => d.mismatch_ratio_max,
            Some(v) if !(0.0..=1.0).contains(v.get_ref()) => {
                return self.src.error(
                    v.span(),
                    "thresholds.mismatch_ratio_max",
                    format!("{} is out of range 0.0..=1.0", v.get_ref()),
                )
            }
            Some(v) => *v.get_ref(),
        };
        let thresholds = Thresholds {
            lag_max: self.ranged(&t.lag_max, "thresholds.lag_max", 0, 1_000_000_000, d.lag_max)?,
            lag_ms_max: match &t.lag_ms_max {
                None => None,
                Some(_) => Some(self.ranged(&t.lag_ms_max, "thresholds.lag_ms_max", 1, 86_400_000, 0)?),
            },
            samples_min: self.ranged(&t.samples_min, "thresholds.samples_min", 0, 1_000_000_000, d.samples_min)?,
            mismatch_ratio_max,
            hold_ms_max: self.ranged(&t.hold_ms_max, "thresholds.hold_ms_max", 1, 600_000, d.hold_ms_max)?,
            hold_queue_max: self.ranged(
                &t.hold_queue_max,
                "thresholds.hold_queue_max",
                1,
                1_000_000,
                d.hold_queue_max as u64,
            )? as u32,
            inflight_ms_max: self.ranged(
                &t.inflight_ms_max,
                "thresholds.inflight_ms_max",
                1,
                3_600_000,
                d.inflight_ms_max,
            )?,
            freeze_timeout_ms: self.ranged(
                &t.freeze_timeout_ms,
                "thresholds.freeze_timeout_ms",
                1,
                3_600_000,
                d.freeze_timeout_ms,
            )?,
            retry_backoff_ms: self.ranged(
                &t.retry_backoff_ms,
                "thresholds.retry_backoff_ms",
                0,
                3_600_000,
                d.retry_backoff_ms,
            )?,
        };
        in_order(thresholds, &t, &self.src)
    }

    fn nodes(&self, raw: &Spanned<Vec<NodeSection>>) -> Result<Vec<PlanNode>, PlanError> {
        let mut nodes: Vec<PlanNode> = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, n) in raw.get_ref().iter().enumerate() {
            let name = n.name.get_ref().trim();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return self.src.error(
                    n.name.span(),
                    format!("nodes[{i}].name"),
                    "must be a non-empty name without spaces",
                );
            }
            if !seen.insert(name.to_string()) {
                return self.src.error(
                    n.name.span(),
                    format!("nodes[{i}].name"),
                    format!("duplicate node name `{name}`"),
                );
            }
            if n.tier.get_ref().trim().is_empty() {
                return self.src.error(n.tier.span(), format!("nodes[{i}].tier"), "must not be empty");
            }
            if n.duties.get_ref().is_empty() {
                return self.src.error(n.duties.span(), format!("nodes[{i}].duties"), "a node needs at least one duty");
            }
            let mut duties = Vec::new();
            for (j, d) in n.duties.get_ref().iter().enumerate() {
                let Some(duty) = Duty::parse(d.get_ref()) else {
                    return self.src.error(
                        d.span(),
                        format!("nodes[{i}].duties[{j}]"),
                        format!("`{}` is not one of `capture`, `transform`, `validate`, `route`", d.get_ref()),
                    );
                };
                if duties.contains(&duty) {
                    return self.src.error(
                        d.span(),
                        format!("nodes[{i}].duties[{j}]"),
                        format!("duty `{}` named twice", d.get_ref()),
                    );
                }
                duties.push(duty);
            }
            nodes.push(PlanNode {
                name: NodeName(name.to_string()),
                tier: n.tier.get_ref().trim().to_string(),
                duties,
            });
        }
        if !nodes.iter().any(|n| n.duties.contains(&Duty::Route)) {
            return self.src.error(raw.span(), "nodes", "the plan needs at least one node with the `route` duty");
        }
        Ok(nodes)
    }

    fn table(&self, t: &Spanned<TableSection>, field: &str) -> Result<TableSchema, PlanError> {
        let section = t.get_ref();
        let mut columns = Vec::new();
        for (i, c) in section.columns.get_ref().iter().enumerate() {
            if c.get_ref().trim().is_empty() {
                return self.src.error(c.span(), format!("{field}.columns[{i}]"), "must not be empty");
            }
            if columns.contains(c.get_ref()) {
                return self.src.error(
                    c.span(),
                    format!("{field}.columns[{i}]"),
                    format!("column `{}` named twice", c.get_ref()),
                );
            }
            columns.push(c.get_ref().clone());
        }
        let key = section.key.as_ref().map_or("id".to_string(), |k| k.get_ref().clone());
        if !columns.contains(&key) {
            let span = section.key.as_ref().map_or(section.columns.span(), |k| k.span());
            return self.src.error(
                span,
                format!("{field}.key"),
                format!("key column `{key}` is not among the columns"),
            );
        }
        Ok(TableSchema { key, columns })
    }

    fn schema(&self, raw: &BTreeMap<String, Spanned<TableSection>>, field: &str) -> Result<Schema, PlanError> {
        if raw.is_empty() {
            return self.src.error(0..0, field, "declare at least one table");
        }
        let mut tables = BTreeMap::new();
        for (name, t) in raw {
            if crate::schema::is_reserved(name) {
                return self.src.error(
                    t.span(),
                    format!("{field}.{name}"),
                    format!(
                        "table names starting with `{}` are reserved for Imago's own tables",
                        crate::schema::RESERVED_PREFIX
                    ),
                );
            }
            tables.insert(name.clone(), self.table(t, &format!("{field}.{name}"))?);
        }
        Ok(Schema { tables })
    }

    fn transforms(
        &self,
        raw: &[TransformSection],
        declared: Option<&BTreeMap<String, Spanned<TableSection>>>,
    ) -> Result<Vec<Transform>, PlanError> {
        raw.iter().enumerate().map(|(i, t)| self.transform(i, t, declared)).collect()
    }

    fn transform(
        &self,
        i: usize,
        t: &TransformSection,
        declared: Option<&BTreeMap<String, Spanned<TableSection>>>,
    ) -> Result<Transform, PlanError> {
        let need = |value: &Option<Spanned<String>>, name: &str| -> Result<String, PlanError> {
            match value {
                Some(v) if !v.get_ref().trim().is_empty() => Ok(v.get_ref().clone()),
                Some(v) => self.src.error(v.span(), format!("transforms[{i}].{name}"), "must not be empty"),
                None => self.src.error(
                    t.kind.span(),
                    format!("transforms[{i}].{name}"),
                    format!("`{}` needs `{name}`", t.kind.get_ref()),
                ),
            }
        };
        let table = need(&t.table, "table")?;
        let expression = match &t.expression {
            None => None,
            Some(e) if e.get_ref().trim().is_empty() => {
                return self.src.error(e.span(), format!("transforms[{i}].expression"), "must not be empty")
            }
            Some(e) if !matches!(t.kind.get_ref().as_str(), "add_column" | "change_type") => {
                return self.src.error(
                    e.span(),
                    format!("transforms[{i}].expression"),
                    "only `add_column` and `change_type` take an expression",
                );
            }
            Some(e) => Some(e.get_ref().clone()),
        };
        let transform = match t.kind.get_ref().as_str() {
            "rename_table" => Transform::RenameTable { table, to: need(&t.to, "to")? },
            "rename_column" => Transform::RenameColumn { table, from: need(&t.from, "from")?, to: need(&t.to, "to")? },
            "add_column" => {
                let default = match &t.default {
                    None => Value::Null,
                    Some(v) => match v.get_ref() {
                        toml::Value::Integer(n) => Value::Int(*n),
                        toml::Value::String(s) => Value::Text(s.clone()),
                        _ => return self.src.error(v.span(), format!("transforms[{i}].default"), "must be an integer or a string"),
                    },
                };
                if let (Some(d), Some(_)) = (&t.default, &expression) {
                    return self.src.error(
                        d.span(),
                        format!("transforms[{i}].default"),
                        "give `default` or `expression`, not both",
                    );
                }
                Transform::AddColumn { table, column: need(&t.column, "column")?, default, expression }
            }
            "drop_column" => Transform::DropColumn { table, column: need(&t.column, "column")? },
            "change_type" => {
                let to = match t.to.as_ref().map(|s| s.get_ref().as_str()) {
                    Some("int") => ColumnType::Int,
                    Some("text") => ColumnType::Text,
                    _ => {
                        let span = t.to.as_ref().map_or(t.kind.span(), |s| s.span());
                        return self.src.error(span, format!("transforms[{i}].to"), "`change_type` needs `to` = `int` or `text`");
                    }
                };
                Transform::ChangeType { table, column: need(&t.column, "column")?, to, expression }
            }
            "split_table" => {
                let Some(into) = &t.into else {
                    return self.src.error(t.kind.span(), format!("transforms[{i}].into"), "`split_table` needs `into`");
                };
                let mut parts = Vec::with_capacity(into.len());
                for (p, part) in into.iter().enumerate() {
                    if let Some(key) = part.key.as_ref().filter(|k| k.get_ref().trim().is_empty()) {
                        return self.src.error(key.span(), format!("transforms[{i}].into[{p}].key"), "must not be empty");
                    }
                    parts.push(SplitPart {
                        table: part.table.get_ref().clone(),
                        columns: part.columns.get_ref().iter().map(|c| c.get_ref().clone()).collect(),
                        key: part.key.as_ref().map(|k| k.get_ref().clone()),
                        generated: part.generated.unwrap_or(false),
                        references: part
                            .references
                            .iter()
                            .flatten()
                            .map(|(column, target)| (column.clone(), target.get_ref().clone()))
                            .collect(),
                    });
                }
                let into = parts;
                Transform::SplitTable { table, into }
            }
            "merge_tables" => Transform::MergeTables { table, with: need(&t.with, "with")?, into: need(&t.to, "to")? },
            "sql" => {
                let Some(written) = t.writes.as_ref().filter(|w| !w.get_ref().is_empty()) else {
                    let span = t.writes.as_ref().map_or(t.kind.span(), |w| w.span());
                    return self.src.error(span, format!("transforms[{i}].writes"), "`sql` needs `writes`, the new tables its statements write");
                };
                let mut writes = Vec::new();
                for (w, name) in written.get_ref().iter().enumerate() {
                    let field = format!("transforms[{i}].writes[{w}]");
                    let Some(section) = declared.and_then(|d| d.get(name.get_ref())) else {
                        return self.src.error(name.span(), field, format!("`{}` must be declared in [schema.new]", name.get_ref()));
                    };
                    writes.push((name.get_ref().clone(), self.table(section, &format!("schema.new.{}", name.get_ref()))?));
                }
                Transform::Sql {
                    table,
                    writes,
                    insert: need(&t.insert, "insert")?,
                    update: need(&t.update, "update")?,
                    delete: need(&t.delete, "delete")?,
                }
            }
            other => {
                return self.src.error(
                    t.kind.span(),
                    format!("transforms[{i}].kind"),
                    format!(
                        "`{other}` is not one of `rename_table`, `rename_column`, `add_column`, `drop_column`, `change_type`, `split_table`, `merge_tables`, `sql`"
                    ),
                )
            }
        };
        Ok(transform)
    }
}

fn transform_field_span(t: &TransformSection, field: TransformField) -> (Range<usize>, String) {
    let or_kind = |v: &Option<Spanned<String>>| v.as_ref().map_or(t.kind.span(), |s| s.span());
    match field {
        TransformField::Table => (or_kind(&t.table), "table".into()),
        TransformField::From => (or_kind(&t.from), "from".into()),
        TransformField::To => (or_kind(&t.to), "to".into()),
        TransformField::Column => (or_kind(&t.column), "column".into()),
        TransformField::With => (or_kind(&t.with), "with".into()),
        TransformField::Insert => (or_kind(&t.insert), "insert".into()),
        TransformField::Update => (or_kind(&t.update), "update".into()),
        TransformField::Delete => (or_kind(&t.delete), "delete".into()),
        TransformField::Writes(w) => {
            let span = t.writes.as_ref().and_then(|ws| ws.get_ref().get(w)).map_or(t.kind.span(), |n| n.span());
            (span, format!("writes[{w}]"))
        }
        TransformField::Expression => (or_kind(&t.expression), "expression".into()),
        TransformField::IntoKey(p) => {
            let part = t.into.as_ref().and_then(|parts| parts.get(p));
            let span = part.map_or(t.kind.span(), |part| part.key.as_ref().map_or(part.table.span(), |k| k.span()));
            (span, format!("into[{p}].key"))
        }
        TransformField::IntoReference(p, r) => {
            let part = t.into.as_ref().and_then(|parts| parts.get(p));
            let found = part.and_then(|part| part.references.as_ref()).and_then(|refs| refs.iter().nth(r));
            match found {
                Some((column, target)) => (target.span(), format!("into[{p}].references.{column}")),
                None => (part.map_or(t.kind.span(), |part| part.table.span()), format!("into[{p}].references")),
            }
        }
        TransformField::Into(p) => {
            let span = t.into.as_ref().and_then(|parts| parts.get(p)).map_or(t.kind.span(), |part| part.table.span());
            (span, format!("into[{p}]"))
        }
        TransformField::IntoColumn(p, c) => {
            let span = t
                .into
                .as_ref()
                .and_then(|parts| parts.get(p))
                .and_then(|part| part.columns.get_ref().get(c))
                .map_or(t.kind.span(), |col| col.span());
            (span, format!("into[{p}].columns[{c}]"))
        }
    }
}
