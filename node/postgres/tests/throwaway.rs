//! The throwaway cluster: it runs with the settings logical decoding needs, serves queries, and
//! leaves nothing behind when dropped.

use imago_node_postgres::throwaway::{ThrowawayCluster, ThrowawayError, ThrowawayOptions};
use tokio_postgres::{Client, NoTls};

async fn connect(cluster: &ThrowawayCluster, db: &str) -> Client {
    let (client, connection) =
        tokio_postgres::connect(&cluster.connection_string(db), NoTls).await.expect("connect to the throwaway cluster");
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("connection ended: {e}");
        }
    });
    client
}

async fn show(client: &Client, setting: &str) -> String {
    let row = client.query_one(&format!("SHOW {setting}"), &[]).await.expect("SHOW");
    row.get(0)
}

#[tokio::test]
async fn a_cluster_serves_logical_decoding_and_is_gone_when_dropped() {
    let Some(cluster) = ThrowawayCluster::start_for_test() else { return };
    let client = connect(&cluster, "postgres").await;
    assert_eq!(show(&client, "wal_level").await, "logical");
    assert_eq!(show(&client, "max_replication_slots").await, "10");
    assert_eq!(show(&client, "max_wal_senders").await, "10");
    assert_eq!(show(&client, "fsync").await, "on", "fsync is on by default");
    assert_eq!(show(&client, "listen_addresses").await, "127.0.0.1");

    cluster.create_database("app db").expect("create a database");
    let app = connect(&cluster, "app db").await;
    app.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)").await.expect("create table");
    app.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')", &[]).await.expect("insert");
    let rows: Vec<(i32, String)> = app
        .query("SELECT id, v FROM t ORDER BY id", &[])
        .await
        .expect("select")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(rows, [(1, "one".to_string()), (2, "two".to_string())]);
    // The new database is not the one we connected to first.
    let none = client.query("SELECT 1 FROM pg_tables WHERE tablename = 't'", &[]).await.expect("select");
    assert!(none.is_empty());

    let data_dir = cluster.data_dir();
    let port = cluster.port();
    assert!(data_dir.join("PG_VERSION").is_file());
    drop((client, app));
    drop(cluster);
    assert!(!data_dir.exists(), "{} is left behind", data_dir.display());
    assert!(!data_dir.parent().expect("the cluster's directory").exists(), "the cluster's directory is left behind");
    let refused = std::net::TcpStream::connect(("127.0.0.1", port));
    assert!(refused.is_err(), "the server still listens on port {port}");
}

#[tokio::test]
async fn options_reach_the_server() {
    let options = ThrowawayOptions {
        fsync: false,
        settings: vec![("work_mem".into(), "'7MB'".into())],
        ..ThrowawayOptions::default()
    };
    let Some(cluster) = ThrowawayCluster::start_for_test_with(options) else { return };
    let client = connect(&cluster, "postgres").await;
    assert_eq!(show(&client, "fsync").await, "off");
    assert_eq!(show(&client, "work_mem").await, "7MB");
}

#[test]
fn a_server_that_cannot_start_says_why_from_its_log() {
    // A bad setting: initdb succeeds, the server refuses to start and logs why.
    let options =
        ThrowawayOptions { settings: vec![("shared_buffers".into(), "'lots'".into())], ..ThrowawayOptions::default() };
    // Only when a good cluster can start is the failure of this one meaningful.
    let Some(good) = ThrowawayCluster::start_for_test() else { return };
    drop(good);
    let e = ThrowawayCluster::start(options).expect_err("shared_buffers = 'lots' must not start");
    let text = e.to_string();
    assert!(matches!(e, ThrowawayError::Start { .. }), "{text}");
    assert!(text.contains("shared_buffers"), "the log tail names the setting: {text}");
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&format!("imago-pg-{}-", std::process::id())))
        .collect();
    // Other tests of this process may be running, but none of theirs has a failed start.
    for entry in leftovers {
        let log = std::fs::read_to_string(entry.path().join("log")).unwrap_or_default();
        assert!(!log.contains("lots"), "a failed start left {} behind", entry.path().display());
    }
}

#[test]
fn a_wrong_bindir_is_an_error_naming_it() {
    let options = ThrowawayOptions { bindir: Some("/nonexistent/pg/bin".into()), ..ThrowawayOptions::default() };
    let e = ThrowawayCluster::start(options).expect_err("no binaries there");
    assert!(matches!(e, ThrowawayError::NoBinaries(_)), "{e}");
    assert!(e.to_string().contains("/nonexistent/pg/bin"), "{e}");
}
