//! End-to-end tests of the `imago` binary.

use std::path::PathBuf;
use std::process::Command;

fn imago() -> Command {
    Command::new(env!("CARGO_BIN_EXE_imago"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("imago-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn last_json(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    let last = text.lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"))
}

#[test]
fn sim_prints_a_summary_and_json_and_exits_zero() {
    let out = imago().args(["sim", "--seeds", "6", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("seeds run: 6"), "{text}");
    assert!(text.contains("simulated s per wall s"), "{text}");
    let summary = last_json(&out.stdout);
    assert_eq!(summary["seeds"], 6);
    assert_eq!(summary["violations"], 0);
    let ended = summary["switched"].as_u64().unwrap() + summary["aborted"].as_u64().unwrap();
    assert_eq!(ended, 6);
}

#[test]
fn sim_with_the_planted_bug_fails_and_prints_a_replay_command_and_trace() {
    let dir = temp_dir("bug");
    let out = imago()
        .args(["sim", "--seeds", "50", "--fail-fast", "--bug", "release-old-on-timeout", "--json", "--trace-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "violations must make the command fail");
    let text = String::from_utf8_lossy(&out.stdout);
    let replay = text.lines().find_map(|l| l.trim().strip_prefix("replay: ")).expect("a replay command").to_string();
    assert!(replay.contains("--bug release-old-on-timeout") && replay.contains("--seeds 1"), "{replay}");
    let trace = text.lines().find_map(|l| l.trim().strip_prefix("trace:")).expect("a trace path").trim().to_string();
    let trace_text = std::fs::read_to_string(&trace).unwrap();
    // Releasing held requests to the old universe shows first as requests in flight there when
    // the router's `Frozen` ack is resent, then as mixed universes.
    assert!(
        trace_text.contains("single universe") || trace_text.contains("quiet before frozen"),
        "the trace names the violation"
    );
    assert!(last_json(&out.stdout)["violations"].as_u64().unwrap() > 0);

    // The replay command reproduces the failure.
    let args: Vec<&str> = replay.split_whitespace().skip(1).collect();
    let again = imago().args(&args).arg("--trace-dir").arg(&dir).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sim_results_do_not_depend_on_the_number_of_jobs() {
    let run = |jobs: &str| {
        let out = imago().args(["sim", "--seeds", "6", "--seed", "40", "--json", "--jobs", jobs]).output().unwrap();
        assert!(out.status.success());
        let mut summary = last_json(&out.stdout);
        let map = summary.as_object_mut().unwrap();
        map.remove("wall_seconds");
        map.remove("simulated_seconds_per_wall_second");
        summary
    };
    assert_eq!(run("1"), run("2"));
}

#[test]
fn sim_refuses_bad_arguments_clearly() {
    let out = imago().args(["sim", "--faults", "lightning"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("lightning") && stderr.contains("possible values") && stderr.contains("partition"),
        "{stderr}"
    );
    let out = imago().args(["sim", "--bug", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn plan_check_accepts_the_example_and_points_at_mistakes() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = imago().args(["plan", "check"]).arg(root.join("plans/example.toml")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("new table user_profiles(id, bio)"));

    let dir = temp_dir("plan");
    let text =
        std::fs::read_to_string(root.join("plans/example.toml")).unwrap().replace("from = \"name\"", "from = \"nmae\"");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, &text).unwrap();
    let out = imago().args(["plan", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let line = text.lines().position(|l| l.contains("nmae")).unwrap() + 1;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("bad.toml:{line}:")) && stderr.contains("transforms[0].from"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plan written for another generation than the cluster serves is refused, pointing at the
/// field; the right one passes.
#[test]
fn plan_check_refuses_a_plan_for_another_generation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let example = root.join("plans/example.toml");
    let out = imago().args(["plan", "check", "--generation", "1"]).arg(&example).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("generation 1 -> 2"));
    let out = imago().args(["plan", "check", "--generation", "2"]).arg(&example).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(&example).unwrap();
    let line = text.lines().position(|l| l.trim_start().starts_with("old_generation")).unwrap() + 1;
    assert!(
        stderr.contains(&format!("example.toml:{line}:1: upgrade.old_generation"))
            && stderr.contains("upgrades from generation 1, but the cluster serves generation 2"),
        "{stderr}"
    );
}

#[test]
fn certs_init_makes_every_name_of_the_cluster_file_and_never_overwrites() {
    let dir = temp_dir("certs");
    let file = dir.join("cluster.toml");
    std::fs::write(
        &file,
        "[cluster]\nid = \"demo\"\n\n[[coordinators]]\nid = 1\nname = \"coord-1\"\naddress = \"127.0.0.1:7101\"\n\n\
         [[nodes]]\nname = \"router-1\"\nhttp = \"127.0.0.1:8080\"\n",
    )
    .unwrap();
    let out = imago().args(["certs", "init"]).env("IMAGO_CLUSTER", &file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for name in ["ca", "coord-1", "router-1", "operator"] {
        let key = dir.join("certs").join(format!("{name}.key"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert!(dir.join("certs").join(format!("{name}.pem")).exists(), "{name}");
    }
    let again = imago().args(["certs", "init", "--cluster"]).arg(&file).output().unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let added = imago().args(["certs", "add", "--names", "router-2", "--cluster"]).arg(&file).output().unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    assert!(dir.join("certs/router-2.pem").exists());
}

#[test]
fn a_bad_cluster_file_is_refused_with_file_line_and_field() {
    let dir = temp_dir("cluster-file");
    let file = dir.join("cluster.toml");
    std::fs::write(
        &file,
        "[cluster]\nid = \"demo\"\n\n[[coordinators]]\nid = 1\nname = \"coord-1\"\naddress = \"nowhere\"\n",
    )
    .unwrap();
    let out = imago().args(["certs", "init", "--cluster"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cluster.toml:7:11: coordinators[0].address: `nowhere` is not an address"), "{stderr}");
    let missing = imago().args(["certs", "init"]).env_remove("IMAGO_CLUSTER").output().unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--dir"), "says what is missing");
}

/// A data node refuses a plan that does not name it for capture and transform, databases it
/// cannot use, and an old database that does not match the plan, each with a message that says
/// what to change, and without making the new database or touching the old one.
#[test]
fn a_data_node_refuses_bad_plans_and_databases_clearly_and_touches_nothing() {
    let dir = temp_dir("data-node");
    let cluster = dir.join("cluster.toml");
    std::fs::write(
        &cluster,
        "[cluster]\nid = \"demo\"\n\n[[coordinators]]\nid = 1\nname = \"coord-1\"\naddress = \"127.0.0.1:7999\"\n\n\
         [[nodes]]\nname = \"db-1\"\n",
    )
    .unwrap();
    assert!(imago().args(["certs", "init", "--cluster"]).arg(&cluster).status().unwrap().success());
    let plan_with = |duties: &str| {
        format!(
            "[upgrade]\nname = \"v2\"\n\n[universe]\nendpoints = [\"http://127.0.0.1:9\"]\n\n\
             [schema.old.items]\nkey = \"id\"\ncolumns = [\"id\", \"body\"]\n\n\
             [[nodes]]\nname = \"router-1\"\ntier = \"web\"\nduties = [\"route\"]\n\n\
             [[nodes]]\nname = \"db-1\"\ntier = \"db\"\nduties = {duties}\n"
        )
    };
    let good = dir.join("good.toml");
    std::fs::write(&good, plan_with("[\"capture\", \"transform\"]")).unwrap();
    let routing = dir.join("routing.toml");
    std::fs::write(&routing, plan_with("[\"route\"]")).unwrap();
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, plan_with("[\"capture\", \"transform\"]").replace("key = \"id\"", "key = 7")).unwrap();
    let (old, new) = (dir.join("old.db"), dir.join("new.db"));
    let run = |plan: &std::path::Path, old_db: &str, new_db: &str| {
        let out = imago()
            .args(["node", "--name", "db-1", "--cluster"])
            .arg(&cluster)
            .arg("--plan")
            .arg(plan)
            .args(["--old-db", old_db, "--new-db", new_db])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (old_s, new_s) = (old.to_str().unwrap(), new.to_str().unwrap());
    let stderr = run(&good, old_s, new_s);
    assert!(stderr.contains("no such database file"), "{stderr}");
    assert!(!old.exists() && !new.exists(), "a missing old database is not made, nor the new one");
    rusqlite::Connection::open(&old).unwrap().execute_batch("CREATE TABLE other (id INTEGER PRIMARY KEY)").unwrap();
    let same = dir.join(".").join("old.db");
    let cases = [
        (
            routing.as_path(),
            old_s,
            new_s,
            "has duties [Route] in the plan; a data node needs `capture` and `transform`",
        ),
        (broken.as_path(), old_s, new_s, "broken.toml:"),
        (good.as_path(), old_s, old_s, "--old-db and --new-db name the same database"),
        (good.as_path(), old_s, same.to_str().unwrap(), "--old-db and --new-db name the same database"),
        (good.as_path(), "postgres://u@127.0.0.1:1/app", "postgres://u@127.0.0.1:1/app", "name the same database"),
        // Nothing listens there: the connection's failure is said, naming the database (and
        // not its password).
        (
            good.as_path(),
            "postgres://u:secret@127.0.0.1:1/app",
            new_s,
            "opening the old database postgres://u@127.0.0.1:1/app",
        ),
        (good.as_path(), ":memory:", new_s, "name a database file"),
    ];
    for (plan, old_db, new_db, said) in cases {
        let stderr = run(plan, old_db, new_db);
        assert!(stderr.contains(said), "expected `{said}` in: {stderr}");
        assert!(!stderr.contains("secret"), "a password is never shown: {stderr}");
    }
    // The old database has no such table: refused, and the new database is not made.
    let stderr = run(&good, old_s, new_s);
    assert!(stderr.contains("opening the old database") && stderr.contains("items"), "{stderr}");
    assert!(!new.exists(), "the new database was made although the old one was refused");
    let triggers: i64 = rusqlite::Connection::open(&old)
        .unwrap()
        .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'trigger'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(triggers, 0, "nothing was installed in a database that was refused");
}
