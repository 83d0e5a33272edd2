//! Plan loading: the example plan is valid; every mistake names file, line and field.

use imago_protocol::plan::{header_key, Plan, PlanError, SwitchMode, Validation};

const EXAMPLE: &str = include_str!("../../plans/example.toml");

fn load_err(text: &str) -> PlanError {
    Plan::from_toml("plan.toml", text).expect_err("plan should be refused")
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).expect("needle present") + 1
}

#[test]
fn example_plan_loads() {
    let plan = Plan::from_toml("example.toml", EXAMPLE).unwrap();
    assert_eq!(plan.name, "auction-v2");
    assert_eq!(plan.switch, SwitchMode::Auto);
    assert_eq!(plan.nodes.len(), 3);
    assert_eq!(plan.thresholds.hold_ms_max, 2000);
    let schema = plan.mapping().unwrap().new_schema();
    assert!(schema.tables.contains_key("user_profiles"));
    assert!(schema.tables.contains_key("auctions"));
    assert_eq!(plan.endpoints, vec!["http://127.0.0.1:9002".to_string()]);
    assert_eq!(plan.thresholds.inflight_ms_max, 1000);
    assert_eq!(plan.validation.mirror_methods, vec!["GET".to_string(), "HEAD".to_string()]);
    let ignored = [header_key("x-request-id"), header_key("etag"), "generated_at".to_string()];
    assert_eq!(plan.validation.ignore, ignored.to_vec());
    assert_eq!(plan.long_routes, vec!["/events".to_string(), "/ws".to_string()]);
}

#[test]
fn validation_and_routes_are_checked_entry_by_entry() {
    let cases = [
        (r#"mirror_methods = ["GET", "HEAD"]"#, r#"mirror_methods = ["GET", "get"]"#, "validation.mirror_methods[1]"),
        (r#"mirror_methods = ["GET", "HEAD"]"#, r#"mirror_methods = ["POST"]"#, "validation.mirror_methods[0]"),
        (
            r#"ignore_headers = ["x-request-id", "etag"]"#,
            r#"ignore_headers = ["x request"]"#,
            "validation.ignore_headers[0]",
        ),
        (r#"ignore_fields = ["generated_at"]"#, r#"ignore_fields = [":status"]"#, "validation.ignore_fields[0]"),
        (r#"ignore_fields = ["generated_at"]"#, r#"ignore_fields = ["a", "a"]"#, "validation.ignore_fields[1]"),
        (r#"long = ["/events", "/ws"]"#, r#"long = ["events"]"#, "routes.long[0]"),
        (r#"long = ["/events", "/ws"]"#, r#"long = [""]"#, "routes.long[0]"),
    ];
    for (from, to, field) in cases {
        let text = EXAMPLE.replace(from, to);
        let e = load_err(&text);
        assert_eq!((e.field.as_str(), e.line), (field, line_of(&text, to)), "{e}");
    }
    // No section: mirror reads, ignore nothing, no long routes.
    let text = EXAMPLE.replace("[validation]", "").replace("[routes]", "");
    let text: String = text
        .lines()
        .filter(|l| !["mirror_methods", "ignore_", "long ="].iter().any(|k| l.starts_with(k)))
        .collect::<Vec<_>>()
        .join("\n");
    let plan = Plan::from_toml("p.toml", &text).expect("the sections are optional");
    assert_eq!(plan.validation, Validation::default());
    assert!(plan.long_routes.is_empty());
}

#[test]
fn a_request_in_flight_may_not_outwait_the_freeze() {
    let text = EXAMPLE.replace("inflight_ms_max = 1000", "inflight_ms_max = 3000");
    let e = load_err(&text);
    assert_eq!((e.field.as_str(), e.line), ("thresholds.inflight_ms_max", line_of(&text, "inflight_ms_max")));
    assert!(e.message.contains("below freeze_timeout_ms (3000)"), "{e}");
}

#[test]
fn universe_endpoints_must_be_urls_named_once() {
    let text =
        EXAMPLE.replace(r#"endpoints = ["http://127.0.0.1:9002"]"#, r#"endpoints = ["http://a:1", "127.0.0.1:9002"]"#);
    let e = load_err(&text);
    assert_eq!((e.field.as_str(), e.line), ("universe.endpoints[1]", line_of(&text, "endpoints =")));
    assert!(e.message.contains("scheme://host:port"), "{e}");
    let e = load_err(&EXAMPLE.replace(r#"["http://127.0.0.1:9002"]"#, r#"["http://a:1", "http://a:1"]"#));
    assert!(e.message.contains("named twice"), "{e}");
    let e = load_err(&EXAMPLE.replace(r#"["http://127.0.0.1:9002"]"#, "[]"));
    assert_eq!(e.field, "universe.endpoints");
    let none = Plan::from_toml(
        "p.toml",
        &EXAMPLE.replace(r#"endpoints = ["http://127.0.0.1:9002"]"#, "").replace("[universe]", ""),
    )
    .expect("a plan may leave them out");
    assert!(none.endpoints.is_empty());
}

#[test]
fn unknown_field_names_line_and_field() {
    let text = EXAMPLE.replace("lag_max = 50", "max_lagg = 50");
    let e = load_err(&text);
    assert_eq!(e.field, "max_lagg", "{e}");
    assert_eq!(e.line, line_of(&text, "max_lagg"), "{e}");
    assert_eq!(e.file, "plan.toml");
    assert!(e.to_string().starts_with(&format!("plan.toml:{}:", e.line)), "{e}");
}

#[test]
fn lag_ms_max_is_optional_and_ranged() {
    let text = EXAMPLE.replace("lag_max = 50", "lag_max = 50\nlag_ms_max = 0");
    let e = load_err(&text);
    assert_eq!(e.field, "thresholds.lag_ms_max", "{e}");
    assert_eq!(e.line, line_of(&text, "lag_ms_max"), "{e}");
}

#[test]
fn old_threshold_names_are_refused_with_their_new_names() {
    for (new, old) in [
        ("lag_max", "max_lag"),
        ("samples_min", "min_samples"),
        ("mismatch_ratio_max", "max_mismatch_ratio"),
        ("hold_ms_max", "hold_max_ms"),
    ] {
        let text = EXAMPLE.replacen(&format!("{new} ="), &format!("{old} ="), 1);
        let e = load_err(&text);
        assert_eq!(e.field, format!("thresholds.{old}"), "{e}");
        assert_eq!(e.line, line_of(&text, &format!("{old} =")), "{e}");
        assert!(e.message.contains(&format!("renamed to `{new}`")), "{e}");
    }
}

#[test]
fn duplicate_node_name_points_at_second() {
    let text = EXAMPLE.replace("name = \"router-2\"", "name = \"router-1\"");
    let e = load_err(&text);
    assert_eq!(e.field, "nodes[1].name", "{e}");
    let second = text.lines().enumerate().filter(|(_, l)| l.contains("\"router-1\"")).nth(1).unwrap().0 + 1;
    assert_eq!(e.line, second, "{e}");
    assert!(e.message.contains("duplicate"), "{e}");
}

#[test]
fn transform_naming_missing_column_points_at_it() {
    let text = EXAMPLE.replace("from = \"name\"", "from = \"nmae\"");
    let e = load_err(&text);
    assert_eq!(e.field, "transforms[0].from", "{e}");
    assert_eq!(e.line, line_of(&text, "from = \"nmae\""), "{e}");
    assert!(e.message.contains("nmae"), "{e}");
}

#[test]
fn split_naming_missing_column_points_at_it() {
    let text = EXAMPLE.replace("columns = [\"bio\"]", "columns = [\"biography\"]");
    let e = load_err(&text);
    assert_eq!(e.field, "transforms[1].into[1].columns[0]", "{e}");
    assert_eq!(e.line, line_of(&text, "biography"), "{e}");
}

#[test]
fn threshold_out_of_range_is_refused() {
    let text = EXAMPLE.replace("mismatch_ratio_max = 0.0", "mismatch_ratio_max = 1.5");
    let e = load_err(&text);
    assert_eq!(e.field, "thresholds.mismatch_ratio_max", "{e}");
    assert_eq!(e.line, line_of(&text, "mismatch_ratio_max"), "{e}");

    let text = EXAMPLE.replace("hold_ms_max = 2000", "hold_ms_max = 0");
    let e = load_err(&text);
    assert_eq!(e.field, "thresholds.hold_ms_max", "{e}");
    assert_eq!(e.line, line_of(&text, "hold_ms_max"), "{e}");
}

#[test]
fn unknown_duty_and_switch_mode_are_refused() {
    let e = load_err(&EXAMPLE.replace(
        "[\"route\", \"validate\"]\n\n[[nodes]]\nname = \"router-2\"",
        "[\"rout\"]\n\n[[nodes]]\nname = \"router-2\"",
    ));
    assert_eq!(e.field, "nodes[0].duties[0]", "{e}");
    let e = load_err(&EXAMPLE.replace("switch = \"auto\"", "switch = \"sometimes\""));
    assert_eq!(e.field, "upgrade.switch", "{e}");
}

#[test]
fn declared_new_schema_must_match_the_transforms() {
    let text = EXAMPLE.replace("columns = [\"id\", \"bio\"]", "columns = [\"id\", \"bio\", \"avatar\"]");
    let e = load_err(&text);
    assert_eq!(e.field, "schema.new.user_profiles", "{e}");
}

#[test]
fn syntax_error_has_a_line() {
    let text = EXAMPLE.replace("tier = \"db\"", "tier = \"db");
    let e = load_err(&text);
    assert_eq!(e.line, line_of(&text, "tier = \"db"), "{e}");
}

#[test]
fn imago_table_names_are_reserved_in_schemas_and_transforms() {
    let text = EXAMPLE.replace("[schema.old.items]", "[schema.old.imago_items]");
    let e = load_err(&text);
    assert_eq!(e.field, "schema.old.imago_items", "{e}");
    assert!(e.message.contains("reserved"), "{e}");

    let text = EXAMPLE.replace("to = \"auctions\"", "to = \"imago_requests\"");
    let e = load_err(&text);
    assert_eq!(e.field, "transforms[2].to", "{e}");
    assert_eq!(e.line, line_of(&text, "to = \"imago_requests\""), "{e}");
    assert!(e.message.contains("reserved"), "{e}");
}

const MEDIAWIKI: &str = include_str!("../../plans/mediawiki-1.5.toml");

#[test]
fn the_mediawiki_plan_makes_pages_revisions_and_texts_with_generated_keys() {
    let plan = Plan::from_toml("mediawiki-1.5.toml", MEDIAWIKI).unwrap();
    let mapping = plan.mapping().unwrap();
    let schema = mapping.new_schema();
    assert_eq!(schema.tables.keys().map(String::as_str).collect::<Vec<_>>(), vec!["page", "revision", "text"]);
    let cur: Vec<(&str, bool)> = mapping.outputs["cur"].iter().map(|o| (o.table.as_str(), o.generated)).collect();
    assert_eq!(cur, vec![("page", false), ("revision", true), ("text", true)]);
    let old: Vec<(&str, bool)> = mapping.outputs["old"].iter().map(|o| (o.table.as_str(), o.generated)).collect();
    assert_eq!(old, vec![("revision", true), ("text", true)], "both old tables feed revision and text");
    assert!(mapping.needs_database().is_some(), "rev_page is an SQL expression");
}

#[test]
fn expressions_keys_and_references_are_checked_where_they_are_written() {
    let cases = [
        (":old_namespace AND", ":old_space AND", "transforms[7].expression", "`:old_space`"),
        (
            r#"references = { rev_text_id = "text" } },"#,
            r#"references = { rev_text_id = "texts" } },"#,
            "transforms[11].into[0].references.rev_text_id",
            "`texts`",
        ),
        // A part that is not generated cannot join rows of another table.
        (
            r#"{ table = "text", key = "old_id", generated = true, columns = ["old_text"] },
]

[schema.new.page]"#,
            r#"{ table = "text", key = "old_id", columns = ["old_text"] },
]

[schema.new.page]"#,
            "transforms[11].into[1]",
            "generated keys",
        ),
    ];
    for (from, to, field, says) in cases {
        assert!(MEDIAWIKI.contains(from), "{from}");
        let text = MEDIAWIKI.replacen(from, to, 1);
        let e = load_err(&text);
        let needle = to.lines().next().unwrap();
        assert_eq!((e.field.as_str(), e.line), (field, line_of(&text, needle)), "{e}");
        assert!(e.message.contains(says), "{e}");
    }
    let both = EXAMPLE.replace(r#"default = "open""#, "default = \"open\"\nexpression = \"'open'\"");
    let e = load_err(&both);
    assert_eq!(e.field, "transforms[4].default", "{e}");
    let misplaced = EXAMPLE.replace("to = \"auctions\"", "to = \"auctions\"\nexpression = \"1\"");
    let e = load_err(&misplaced);
    assert!(e.field.ends_with(".expression") && e.message.contains("only `add_column`"), "{e}");
}

#[test]
fn the_escape_hatch_names_declared_tables_and_the_columns_of_its_table() {
    let base = EXAMPLE.to_string()
        + r#"
[[transforms]]
kind = "sql"
table = "auctions"
writes = ["listings"]
insert = "INSERT INTO listings (id, label) VALUES (:id, :title)"
update = "UPDATE listings SET label = :title WHERE id = :id"
delete = "DELETE FROM listings WHERE id = :id"

[schema.new.listings]
key = "id"
columns = ["id", "label"]
"#;
    let text =
        base.replace("[schema.new.auctions]\ncolumns = [\"id\", \"title\", \"seller\", \"price\", \"status\"]\n", "");
    let plan = Plan::from_toml("plan.toml", &text).expect("auctions are now written by the statements");
    let mapping = plan.mapping().unwrap();
    assert!(mapping.custom.contains_key("items") && !mapping.outputs.contains_key("items"));
    assert_eq!(mapping.new_schema().tables["listings"].columns, vec!["id", "label"]);
    let undeclared = text.replace("[schema.new.listings]", "[schema.new.listing]");
    let e = load_err(&undeclared);
    assert_eq!((e.field.as_str(), e.line), ("transforms[5].writes[0]", line_of(&undeclared, "writes = [")), "{e}");
    let unknown = text.replace("VALUES (:id, :title)", "VALUES (:id, :titel)");
    let e = load_err(&unknown);
    assert_eq!((e.field.as_str(), e.line), ("transforms[5].insert", line_of(&unknown, "insert = ")), "{e}");
    assert!(e.message.contains("`:titel`"), "{e}");
}

#[test]
fn the_copys_pace_is_a_positive_number_of_rows_per_second() {
    let plan = Plan::from_toml("plan.toml", EXAMPLE).unwrap();
    assert_eq!(plan.copy_rows_per_s_max, Some(50_000));
    let text = EXAMPLE.replace("rows_per_s_max = 50000", "rows_per_s_max = 0");
    let e = load_err(&text);
    assert_eq!((e.field.as_str(), e.line), ("copy.rows_per_s_max", line_of(&text, "rows_per_s_max = 0")), "{e}");
    let unlimited = EXAMPLE.replace("[copy]\nrows_per_s_max = 50000\n", "");
    assert_eq!(Plan::from_toml("plan.toml", &unlimited).unwrap().copy_rows_per_s_max, None);
}

#[test]
fn the_copys_chunk_is_bounded_and_optional() {
    assert_eq!(Plan::from_toml("plan.toml", EXAMPLE).unwrap().copy_chunk_rows, None);
    let chunked = EXAMPLE.replace("rows_per_s_max = 50000", "rows_per_s_max = 50000\nchunk_rows = 5000");
    assert_eq!(Plan::from_toml("plan.toml", &chunked).unwrap().copy_chunk_rows, Some(5_000));
    let text = EXAMPLE.replace("rows_per_s_max = 50000", "rows_per_s_max = 50000\nchunk_rows = 50001");
    let e = load_err(&text);
    assert_eq!((e.field.as_str(), e.line), ("copy.chunk_rows", line_of(&text, "chunk_rows = 50001")), "{e}");
    assert!(e.message.contains("1..=50000"), "{e}");
}
