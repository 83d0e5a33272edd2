//! A replica on a real data directory: what it committed survives a restart and a crash, and a
//! directory of another cluster is refused.

use imago_coordinator::raft::{open_data_dir, read_disk, DataDirError, RaftTiming, Transport, TransportError};
use imago_coordinator::service::Replica;
use imago_coordinator::upgrade::UpgradeState;
use protocol::messages::{CliRequest, CliResponse, Request, Response};
use protocol::{NodeName, ReplicaId};
use std::sync::Arc;
use std::time::Duration;

/// A single replica calls nobody.
#[derive(Clone)]
struct Alone;

impl Transport for Alone {
    #[allow(clippy::manual_async_fn)]
    fn call(
        &self,
        to: ReplicaId,
        _: Request,
        _: Duration,
    ) -> impl std::future::Future<Output = Result<Response, TransportError>> + Send + 'static {
        async move { Err(TransportError::Unreachable(format!("no replica {to}"))) }
    }
}

async fn start(dir: &std::path::Path) -> Replica {
    let disk = open_data_dir(dir, "test", UpgradeState::default()).expect("data dir");
    let replica =
        Replica::start(1, &[1], disk, Alone, RaftTiming::default(), Arc::new(|| 0), true).await.expect("start");
    for _ in 0..200 {
        if replica.is_leader() {
            return replica;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("a single replica leads within 2 s");
}

#[tokio::test]
async fn committed_state_and_the_log_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = start(dir.path()).await;
    for router in ["router-1", "router-2"] {
        let join = CliRequest::Join { node: NodeName(router.into()) };
        assert_eq!(replica.handle(Request::Cli(join)).await, Response::Cli(CliResponse::Accepted));
    }
    let version = replica.applied_version();
    let (entries, vote) = read_disk(&replica.disk(), |d| (d.log.len(), d.vote));
    assert!(entries >= 3, "membership and two joins are in the log");
    replica.shutdown().await;
    drop(replica);

    let again = start(dir.path()).await;
    let roster: Vec<String> = again.read(|s| s.roster.keys().map(|n| n.0.clone()).collect());
    assert_eq!(roster, ["router-1", "router-2"]);
    assert!(again.applied_version() >= version, "the state machine came back from the file");
    let (entries_after, vote_after) = read_disk(&again.disk(), |d| (d.log.len(), d.vote));
    assert!(entries_after >= entries, "the log came back");
    assert!(vote_after >= vote, "the vote came back (a term never goes back)");
    // It goes on committing after the restart.
    let join = CliRequest::Join { node: NodeName("router-3".into()) };
    assert_eq!(again.handle(Request::Cli(join)).await, Response::Cli(CliResponse::Accepted));
    again.shutdown().await;
}

/// A crash keeps the log and loses what was not made durable: a copy of the file taken while the
/// replica runs is what a crash at that moment leaves on the disk. Its state machine is behind
/// its log (the applied state is not fsynced), and the replica restarted on it applies the
/// committed log again.
#[tokio::test]
async fn a_crash_loses_only_the_applied_state_and_the_log_brings_it_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = start(dir.path()).await;
    for router in ["router-1", "router-2"] {
        let join = CliRequest::Join { node: NodeName(router.into()) };
        assert_eq!(replica.handle(Request::Cli(join)).await, Response::Cli(CliResponse::Accepted));
    }
    let crashed = tempfile::tempdir().expect("tempdir");
    let file = imago_coordinator::raft::FILE_NAME;
    std::fs::copy(dir.path().join(file), crashed.path().join(file)).expect("a crash image");
    replica.shutdown().await;
    drop(replica);

    let disk = open_data_dir(crashed.path(), "test", UpgradeState::default()).expect("the crash image opens");
    let (applied, last) = read_disk(&disk, |d| (d.applied.last_applied, d.log.values().next_back().map(|e| e.log_id)));
    assert!(applied < last, "the image's state machine ({applied:?}) is behind its log ({last:?})");
    drop(disk);

    let again = start(crashed.path()).await;
    let roster = || again.read(|s| s.roster.keys().map(|n| n.0.clone()).collect::<Vec<_>>());
    for _ in 0..200 {
        if roster().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(roster(), ["router-1", "router-2"], "the committed log was applied again");
    again.shutdown().await;
}

#[test]
fn a_data_directory_of_another_cluster_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open_data_dir(dir.path(), "east", UpgradeState::default()).expect("new"));
    match open_data_dir(dir.path(), "west", UpgradeState::default()) {
        Err(e @ DataDirError::OtherCluster { .. }) => {
            let message = e.to_string();
            assert!(message.contains("belongs to cluster `east`, not `west`"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(open_data_dir(dir.path(), "east", UpgradeState::default()).is_ok(), "its own cluster opens it");
}

/// The replicated state's format is raised only to one every replica reads: the leader refuses
/// the operator's request for a format its build does not read, and a replica whose log gets
/// such a raise anyway (written by a newer leader) stops before applying it, saying why, with
/// its state as it was.
#[tokio::test]
async fn a_replica_stops_at_a_state_format_it_cannot_read() {
    use imago_coordinator::upgrade::{Command, StateFormat, STATE_FORMAT_MAX};
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = start(dir.path()).await;
    let newer = STATE_FORMAT_MAX.0 + 1;
    match replica.handle(Request::Cli(CliRequest::RaiseFormat { to: newer })).await {
        Response::Cli(CliResponse::Rejected(r)) => assert!(r.detail.contains("reads up to format"), "{r}"),
        other => panic!("{other:?}"),
    }
    let written =
        tokio::time::timeout(Duration::from_secs(5), replica.raft.client_write(Command::RaiseFormat { to: newer }))
            .await
            .expect("openraft answers");
    let error = written.expect_err("a format this build cannot read is not applied").to_string();
    assert!(error.contains("upgrade imago on this replica"), "{error}");
    assert_eq!(replica.read(|s| s.format), StateFormat(1), "nothing of it applied");
}
