//! The layout is kept by the compiler and checked here: pure crates depend on no runtime, the
//! simulator on no real network or database client, and no crate's modules import each other in
//! a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The names of every package `package` depends on (normal dependencies, transitively).
fn dependency_tree(package: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--locked", "--offline", "-e", "normal", "--prefix", "none", "--format", "{p}", "-p", package])
        .current_dir(root())
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn assert_free_of(package: &str, forbidden: &[&str]) {
    let tree = dependency_tree(package);
    assert!(tree.len() > 1, "{package}: cargo tree listed nothing: {tree:?}");
    let found: Vec<&&str> = forbidden.iter().filter(|f| tree.contains(**f)).collect();
    assert!(found.is_empty(), "{package} depends on {found:?}");
}

#[test]
fn pure_cores_depend_on_no_runtime_network_or_database() {
    let runtimes = ["actix", "tokio", "openraft", "hyper", "quinn", "rusqlite", "tokio-postgres"];
    assert_free_of("imago-protocol", &runtimes);
    assert_free_of("imago-coordinator-core", &runtimes);
    assert_free_of("imago-node-core", &runtimes);
    // The actors are the shells: actix and tokio, but no network or database client.
    assert_free_of("imago-node", &["openraft", "hyper", "quinn", "rusqlite", "tokio-postgres"]);
}

#[test]
fn the_simulator_depends_on_no_real_network_or_postgres_client() {
    assert_free_of("imago-sim", &["hyper", "quinn", "tokio-postgres", "imago-quic", "imago-node-http"]);
    let tree = dependency_tree("imago-sim");
    assert!(tree.contains("imago-node") && tree.contains("actix"), "the simulator runs the production actors");
}

/// A crate's modules, each with the modules it imports (`crate::a::b` resolves to the longest
/// module path that exists).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let module_of = |path: &Path| -> String {
        let rel = path.strip_prefix(src).unwrap().with_extension("");
        let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().to_string()).collect();
        match parts.last().map(String::as_str) {
            Some("lib") | Some("main") => String::new(),
            Some("mod") => parts[..parts.len() - 1].join("::"),
            _ => parts.join("::"),
        }
    };
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let from = module_of(file);
        let text = std::fs::read_to_string(file).unwrap();
        let mut to = BTreeSet::new();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            let target = (1..=segments.len()).rev().map(|n| segments[..n].join("::")).find(|m| modules.contains(m));
            if let Some(target) = target.filter(|t| *t != from && !from.starts_with(&format!("{t}::"))) {
                to.insert(target);
            }
        }
        graph.insert(from, to);
    }
    graph
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|p| p == node) {
            return Some(path[start..].to_vec());
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_an_import_cycle() {
    let crates = [
        "protocol/src",
        "protocol/quic/src",
        "coordinator/core/src",
        "coordinator/src",
        "node/core/src",
        "node/src",
        "node/http/src",
        "node/sqlite/src",
        "node/postgres/src",
        "sim/src",
        "src",
    ];
    for src in crates {
        let graph = module_graph(&root().join(src));
        assert!(graph.len() > 1 || src == "node/src", "{src}: no modules found");
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{src}: modules import each other in a circle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into_iter()
    .collect();
    assert_eq!(find_cycle(&graph).map(|c| c.len()), Some(3));
    let acyclic: BTreeMap<String, BTreeSet<String>> =
        [("a".to_string(), BTreeSet::from(["b".to_string()])), ("b".to_string(), BTreeSet::new())]
            .into_iter()
            .collect();
    assert_eq!(find_cycle(&acyclic), None);
}
