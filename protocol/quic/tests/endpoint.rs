//! Real QUIC on loopback: mutual TLS, identities, refusals, and bad bytes closing one
//! connection only.

use imago_quic::endpoint::{self, bind_client, bind_server, close, serve, Handler, Peer, QuicTransport};
use imago_quic::{certs, Identity};
use protocol::codec;
use protocol::messages::{Request, Response};
use protocol::transport::{Transport, TransportError};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const CLUSTER: &str = "test";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Answers every request with the name of the peer that sent it; refuses `router-2`.
#[derive(Clone)]
struct Echo;

impl Handler for Echo {
    fn admit(&self, name: &str) -> Result<(), String> {
        if name == "router-2" {
            return Err("router-2 is not on the roster".into());
        }
        Ok(())
    }

    async fn handle(&self, peer: Arc<str>, request: Request) -> Response {
        let what = match request {
            Request::Raft(bytes) => format!("raft {}", bytes.len()),
            other => format!("{other:?}"),
        };
        Response::Error { reason: format!("{peer} asked {what}") }
    }
}

fn certs_in(dir: &Path, names: &[&str]) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    certs::init(dir, CLUSTER, &names).expect("certs");
}

fn identity(dir: &Path, name: &str) -> Identity {
    certs::load(dir, CLUSTER, name).expect("identity")
}

/// Starts a server named `name` (from `dir`) on a free loopback port.
fn server(dir: &Path, name: &str) -> SocketAddr {
    let endpoint = bind_server(&identity(dir, name), SocketAddr::new(LOOPBACK, 0)).expect("bind");
    let addr = endpoint.local_addr().expect("addr");
    tokio::spawn(serve(endpoint, CLUSTER.into(), Echo));
    addr
}

/// A transport from `caller` (certificates in `dir`) to replica 1 at `addr`, expected to be `name`.
fn client(dir: &Path, caller: &str, addr: SocketAddr, name: &str) -> QuicTransport {
    let endpoint = bind_client(&identity(dir, caller), LOOPBACK).expect("bind");
    QuicTransport::new(endpoint, CLUSTER, BTreeMap::from([(1, Peer { address: addr, name: name.into() })]))
}

async fn ask(t: &QuicTransport) -> Result<Response, TransportError> {
    t.call(1, Request::Raft(vec![7; 3]), Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_reaches_the_server_which_knows_the_caller_by_its_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs_in(dir.path(), &["coord-1", "router-1", "router-2"]);
    let addr = server(dir.path(), "coord-1");
    let t = client(dir.path(), "router-1", addr, "coord-1");
    for _ in 0..3 {
        let answer = ask(&t).await.expect("answer");
        assert_eq!(answer, Response::Error { reason: "router-1 asked raft 3".into() });
    }
    // A name added later is signed by the same CA (the CA is rebuilt from its name and key).
    certs::add(dir.path(), CLUSTER, &["router-3".to_string()]).expect("add");
    let later = client(dir.path(), "router-3", addr, "coord-1");
    assert_eq!(ask(&later).await, Ok(Response::Error { reason: "router-3 asked raft 3".into() }));
    // A refused name is told why, as a refusal (not as unreachable).
    let refused = client(dir.path(), "router-2", addr, "coord-1");
    match ask(&refused).await {
        Err(TransportError::Refused(reason)) => assert!(reason.contains("not on the roster"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_another_ca_and_names_that_do_not_match_are_refused() {
    let (ours, theirs) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    certs_in(ours.path(), &["coord-1", "coord-2", "router-1"]);
    // Another CA, same cluster id and names: a stolen name is worth nothing without our CA.
    certs_in(theirs.path(), &["coord-1", "router-1"]);
    let addr = server(ours.path(), "coord-1");
    let stranger = client(theirs.path(), "router-1", addr, "coord-1");
    assert!(ask(&stranger).await.is_err(), "a client certificate from another CA");
    let fake_addr = server(theirs.path(), "coord-1");
    let fooled = client(ours.path(), "router-1", fake_addr, "coord-1");
    assert!(ask(&fooled).await.is_err(), "a server certificate from another CA");
    // coord-2 answering where coord-1 is expected: the client checks the server's name.
    let impostor = server(ours.path(), "coord-2");
    let t = client(ours.path(), "router-1", impostor, "coord-1");
    assert!(ask(&t).await.is_err(), "a server presenting another name");
    // Our own server still serves our own clients.
    assert!(ask(&client(ours.path(), "router-1", addr, "coord-1")).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_close_that_connection_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs_in(dir.path(), &["coord-1", "router-1"]);
    let addr = server(dir.path(), "coord-1");
    let endpoint = bind_client(&identity(dir.path(), "router-1"), LOOPBACK).expect("bind");
    let server_name = certs::dns_name("coord-1", CLUSTER);
    let connect = || async { endpoint.connect(addr, &server_name).expect("connect").await.expect("handshake") };

    let good = connect().await;
    let bad = connect().await;
    let garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    let answer = endpoint::exchange(&bad, "coord-1", &garbage).await;
    assert!(answer.is_err(), "garbage gets no answer");
    let reason = bad.closed().await;
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == quinn::VarInt::from_u32(close::MALFORMED)),
        "{reason:?}"
    );

    // A header that announces more than the limit, then a stream longer than any frame.
    let big = connect().await;
    let mut header = codec::MAGIC.to_vec();
    header.extend_from_slice(&codec::PROTOCOL_VERSION.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(endpoint::exchange(&big, "coord-1", &header).await.is_err());
    let huge = connect().await;
    let flood = vec![0u8; codec::HEADER_BYTES + codec::MAX_PAYLOAD_BYTES + 1];
    assert!(endpoint::exchange(&huge, "coord-1", &flood).await.is_err());
    assert!(huge.close_reason().is_some(), "an oversized stream closes its connection");

    // The connection opened before, and new ones, are still served.
    let frame = codec::encode_frame(&Request::Raft(vec![1])).expect("frame");
    // A request of a newer protocol version is answered (in this build's format) with why,
    // and its connection stays up.
    let mut newer = frame.clone();
    newer[4..6].copy_from_slice(&(codec::PROTOCOL_VERSION + 1).to_be_bytes());
    match endpoint::exchange(&good, "coord-1", &newer).await {
        Ok(Response::Error { reason }) => assert!(reason.contains("unsupported protocol version 2"), "{reason}"),
        other => panic!("expected an answer saying why, got {other:?}"),
    }
    assert!(endpoint::exchange(&good, "coord-1", &frame).await.is_ok(), "the other connection is untouched");
    let fresh = connect().await;
    assert!(endpoint::exchange(&fresh, "coord-1", &frame).await.is_ok(), "the server keeps serving");
    // Raw datagrams that are not QUIC at all are dropped by the endpoint.
    let socket = tokio::net::UdpSocket::bind((LOOPBACK, 0)).await.expect("udp");
    socket.send_to(&[0xff; 1200], addr).await.expect("send");
    assert!(endpoint::exchange(&fresh, "coord-1", &frame).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_nobody_times_out_within_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs_in(dir.path(), &["coord-1", "router-1"]);
    // A bound UDP socket that never answers.
    let silent = std::net::UdpSocket::bind((LOOPBACK, 0)).expect("udp");
    let t = client(dir.path(), "router-1", silent.local_addr().expect("addr"), "coord-1");
    let started = tokio::time::Instant::now();
    let result = t.call(1, Request::Raft(vec![]), Duration::from_millis(300)).await;
    assert_eq!(result, Err(TransportError::Timeout(Duration::from_millis(300))));
    assert!(started.elapsed() < Duration::from_secs(3));
}
