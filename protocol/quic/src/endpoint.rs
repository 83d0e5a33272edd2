//! QUIC endpoints with mutual TLS: a server that answers requests, and a client that implements
//! [`Transport`].
//!
//! One request per bidirectional stream: the caller writes one frame and finishes its side; the
//! server writes one frame back. Both sides read at most one frame's worth of bytes. A peer is
//! who its certificate says (verified against the cluster CA, for a name of this cluster); a
//! server asks its [`Handler`] whether to admit that name before reading anything from it. A
//! malformed or oversized frame closes that connection only.

use crate::certs::{self, Identity};
use protocol::codec::{self, HEADER_BYTES, MAX_PAYLOAD_BYTES};
use protocol::messages::{Request, Response};
use protocol::transport::{Transport, TransportError};
use protocol::ReplicaId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
pub use quinn::Endpoint;
use quinn::{Connection, VarInt};
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The application protocol name both sides require.
pub const ALPN: &[u8] = b"imago/1";
/// Streams one peer may have open at once.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// A connection with no traffic for this long is closed (clients keep theirs alive).
pub const IDLE_MS_MAX: u64 = 30_000;
/// Longest a server waits for one request's bytes before resetting that stream.
pub const REQUEST_READ_MS_MAX: u64 = 10_000;

/// Close codes (application errors) a server closes a connection with.
pub mod close {
    /// The peer's certificate names no process of this cluster, or the handler refused it.
    pub const REFUSED: u32 = 1;
    /// The peer sent bytes that are not a frame, or a frame too large.
    pub const MALFORMED: u32 = 2;
    /// The process is shutting down.
    pub const SHUTDOWN: u32 = 3;
}

/// Why an endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

fn tls(e: impl std::fmt::Display) -> EndpointError {
    EndpointError::Tls(e.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(identity: &Identity) -> Result<Arc<RootCertStore>, EndpointError> {
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca.clone()).map_err(tls)?;
    Ok(Arc::new(roots))
}

fn transport_config(keep_alive: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(STREAMS_PER_CONNECTION_MAX));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.max_idle_timeout(Some(VarInt::from_u32(IDLE_MS_MAX as u32).into()));
    if keep_alive {
        t.keep_alive_interval(Some(Duration::from_millis(IDLE_MS_MAX / 3)));
    }
    Arc::new(t)
}

fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, EndpointError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(identity)?, provider()).build().map_err(tls)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(config).map_err(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport_config(false));
    Ok(server)
}

fn client_config(identity: &Identity) -> Result<quinn::ClientConfig, EndpointError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots(identity)?)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(config).map_err(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport_config(true));
    Ok(client)
}

/// Binds a QUIC endpoint that serves on `addr` and can also call out.
pub fn bind_server(identity: &Identity, addr: SocketAddr) -> Result<Endpoint, EndpointError> {
    let mut endpoint =
        Endpoint::server(server_config(identity)?, addr).map_err(|source| EndpointError::Bind { addr, source })?;
    endpoint.set_default_client_config(client_config(identity)?);
    Ok(endpoint)
}

/// Binds a QUIC endpoint that only calls out (the CLI; a node without a QUIC listener), on an
/// ephemeral port of `local` (an address of the interface to use).
pub fn bind_client(identity: &Identity, local: std::net::IpAddr) -> Result<Endpoint, EndpointError> {
    let addr = SocketAddr::new(local, 0);
    let mut endpoint = Endpoint::client(addr).map_err(|source| EndpointError::Bind { addr, source })?;
    endpoint.set_default_client_config(client_config(identity)?);
    Ok(endpoint)
}

/// Closes every connection of `endpoint` (telling peers it shuts down) and waits at most
/// `wait` for them to be acknowledged.
pub async fn shut_down(endpoint: &Endpoint, wait: Duration) {
    endpoint.close(VarInt::from_u32(close::SHUTDOWN), b"shutting down");
    let _ = tokio::time::timeout(wait, endpoint.wait_idle()).await;
}

/// The verified name of the peer of `connection` in `cluster`, if its certificate names one.
pub fn peer_of(connection: &Connection, cluster: &str) -> Option<String> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs::peer_name(chain.first()?, cluster)
}

/// What a server does with its peers' requests.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Whether the verified peer `name` may talk to this process at all (asked once per
    /// connection, before anything it sent is read). `Err` carries the reason it is told.
    fn admit(&self, name: &str) -> Result<(), String>;
    /// Answers one request from `peer`.
    fn handle(&self, peer: Arc<str>, request: Request) -> impl Future<Output = Response> + Send;
}

/// Serves `endpoint`'s incoming connections with `handler` until the endpoint is closed.
pub async fn serve<H: Handler>(endpoint: Endpoint, cluster: Arc<str>, handler: H) {
    while let Some(incoming) = endpoint.accept().await {
        let (handler, cluster) = (handler.clone(), cluster.clone());
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(connection) => serve_connection(connection, &cluster, handler).await,
                Err(e) => tracing::info!(%remote, error = %e, "handshake failed"),
            }
        });
    }
}

async fn serve_connection<H: Handler>(connection: Connection, cluster: &str, handler: H) {
    let remote = connection.remote_address();
    let Some(peer) = peer_of(&connection, cluster) else {
        tracing::warn!(%remote, "refused: the certificate names no process of cluster {cluster}");
        connection.close(VarInt::from_u32(close::REFUSED), b"certificate names no process of this cluster");
        return;
    };
    if let Err(reason) = handler.admit(&peer) {
        tracing::warn!(%remote, %peer, %reason, "refused");
        connection.close(VarInt::from_u32(close::REFUSED), reason.as_bytes());
        return;
    }
    let peer: Arc<str> = peer.into();
    loop {
        let (mut send, mut recv) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(_) => return,
        };
        let (handler, peer, connection) = (handler.clone(), peer.clone(), connection.clone());
        tokio::spawn(async move {
            let read = tokio::time::timeout(
                Duration::from_millis(REQUEST_READ_MS_MAX),
                recv.read_to_end(HEADER_BYTES + MAX_PAYLOAD_BYTES),
            )
            .await;
            let bytes = match read {
                Ok(Ok(bytes)) => bytes,
                Ok(Err(quinn::ReadToEndError::TooLong)) => {
                    tracing::warn!(%remote, %peer, "closing the connection: oversized frame");
                    connection.close(VarInt::from_u32(close::MALFORMED), b"oversized frame");
                    return;
                }
                // The peer reset or went away, or was too slow: only this stream is lost.
                Ok(Err(_)) | Err(_) => return,
            };
            let request = match codec::decode_frame::<Request>(&bytes) {
                Ok(Some((request, used))) if used == bytes.len() => request,
                Ok(_) => return malformed(&connection, remote, &peer, "incomplete frame or trailing bytes"),
                // A peer of a newer build: told so in this build's format (which it reads), and
                // the connection stays up.
                Err(e @ codec::CodecError::UnsupportedVersion(_)) => {
                    tracing::warn!(%remote, %peer, reason = %e, "request of a newer protocol version");
                    if let Ok(frame) = codec::encode_frame(&Response::Error { reason: e.to_string() }) {
                        if send.write_all(&frame).await.is_ok() {
                            let _ = send.finish();
                        }
                    }
                    return;
                }
                Err(e) => return malformed(&connection, remote, &peer, &e.to_string()),
            };
            let response = handler.handle(peer, request).await;
            let frame = codec::encode_frame(&response).unwrap_or_else(|e| {
                codec::encode_frame(&Response::Error { reason: format!("cannot encode the answer: {e}") })
                    .unwrap_or_default()
            });
            if send.write_all(&frame).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}

fn malformed(connection: &Connection, remote: SocketAddr, peer: &str, why: &str) {
    tracing::warn!(%remote, %peer, reason = %why, "closing the connection: malformed frame");
    connection.close(VarInt::from_u32(close::MALFORMED), b"malformed frame");
}

/// One peer a client can call: where it listens and its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub address: SocketAddr,
    pub name: String,
}

/// A [`Transport`] over QUIC to the cluster's coordinator replicas (by Raft id). Connections are
/// made on first use and made again once closed.
#[derive(Clone)]
pub struct QuicTransport {
    endpoint: Endpoint,
    cluster: Arc<str>,
    peers: Arc<Mutex<BTreeMap<ReplicaId, Peer>>>,
    connections: Arc<Mutex<BTreeMap<ReplicaId, Connection>>>,
}

impl QuicTransport {
    pub fn new(endpoint: Endpoint, cluster: &str, peers: BTreeMap<ReplicaId, Peer>) -> QuicTransport {
        QuicTransport {
            endpoint,
            cluster: cluster.into(),
            peers: Arc::new(Mutex::new(peers)),
            connections: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    async fn connection(&self, to: ReplicaId) -> Result<Connection, TransportError> {
        let cached = self.connections.lock().unwrap_or_else(|p| p.into_inner()).get(&to).cloned();
        if let Some(c) = cached.filter(|c| c.close_reason().is_none()) {
            return Ok(c);
        }
        let peer = self.peer(to).ok_or_else(|| TransportError::Unreachable(format!("no replica {to}")))?;
        let server_name = certs::dns_name(&peer.name, &self.cluster);
        let connecting = self
            .endpoint
            .connect(peer.address, &server_name)
            .map_err(|e| TransportError::Unreachable(format!("{}: {e}", peer.address)))?;
        let connection = connecting.await.map_err(|e| unreachable(&peer.name, e))?;
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).insert(to, connection.clone());
        Ok(connection)
    }

    fn peer(&self, id: ReplicaId) -> Option<Peer> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Forgets the cached connection to `to` if it is `connection` (a call on it failed or timed
    /// out: the peer may be dead, or restarted with a new connection to be made).
    fn forget(&self, to: ReplicaId, connection: &Connection) {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if connections.get(&to).is_some_and(|c| c.stable_id() == connection.stable_id()) {
            connections.remove(&to);
        }
    }
}

fn unreachable(name: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Unreachable(format!("{name}: {e}"))
}

/// A failed exchange: a connection the peer closed as refused is [`TransportError::Refused`].
fn failed(connection: &Connection, name: &str, e: impl std::fmt::Display) -> TransportError {
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(app)) if app.error_code == VarInt::from_u32(close::REFUSED) => {
            TransportError::Refused(format!("{name}: {}", String::from_utf8_lossy(&app.reason)))
        }
        _ => unreachable(name, e),
    }
}

/// Sends one request frame on a new stream of `connection` and reads the answer.
pub async fn exchange(connection: &Connection, name: &str, frame: &[u8]) -> Result<Response, TransportError> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| failed(connection, name, e))?;
    send.write_all(frame).await.map_err(|e| failed(connection, name, e))?;
    let _ = send.finish();
    let bytes = recv.read_to_end(HEADER_BYTES + MAX_PAYLOAD_BYTES).await.map_err(|e| failed(connection, name, e))?;
    match codec::decode_frame::<Response>(&bytes) {
        Ok(Some((response, used))) if used == bytes.len() => Ok(response),
        Ok(_) => Err(TransportError::Codec("incomplete answer".into())),
        Err(e) => Err(TransportError::Codec(e.to_string())),
    }
}

impl Transport for QuicTransport {
    fn call(
        &self,
        to: ReplicaId,
        request: Request,
        timeout: Duration,
    ) -> impl Future<Output = Result<Response, TransportError>> + Send + 'static {
        let this = self.clone();
        // The call starts now (the transport's contract), not when the future is first polled.
        let task = tokio::spawn(async move {
            let frame = codec::encode_frame(&request).map_err(|e| TransportError::Codec(e.to_string()))?;
            let deadline = tokio::time::Instant::now() + timeout;
            let connection = match tokio::time::timeout_at(deadline, this.connection(to)).await {
                Ok(connection) => connection?,
                Err(_) => return Err(TransportError::Timeout(timeout)),
            };
            let name = this.peer(to).map_or_else(|| "?".to_string(), |p| p.name);
            let result = match tokio::time::timeout_at(deadline, exchange(&connection, &name, &frame)).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::Timeout(timeout)),
            };
            if matches!(result, Err(TransportError::Timeout(_) | TransportError::Unreachable(_))) {
                this.forget(to, &connection);
            }
            result
        });
        async move { task.await.unwrap_or_else(|e| Err(TransportError::Unreachable(format!("call task: {e}")))) }
    }

    /// `address` is `name@ip:port` (how a replica is added to the group): a replica this
    /// transport did not know, or one that moved, is dialled there from now on.
    fn learn_peer(&self, id: ReplicaId, address: &str) {
        let Some((name, addr)) = address.split_once('@') else { return };
        let Ok(addr) = addr.parse::<SocketAddr>() else { return };
        let peer = Peer { address: addr, name: name.to_string() };
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.get(&id) != Some(&peer) {
            peers.insert(id, peer);
            self.connections.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
    }
}
