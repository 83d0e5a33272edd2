//! Keep-alive HTTP/1.1 connections to the universes' endpoints, for the proxy's one thread.
//!
//! hyper's own connections (`hyper::client::conn::http1`), pooled here rather than by
//! hyper-util's general client: that one is built for many threads (a locked pool keyed by
//! hashing, a task spawned per request to take the connection back, the `Host` header formatted
//! per request), and its bookkeeping was the largest part of the router's own CPU time per
//! forwarded request. Here an endpoint's idle connections are a stack on the proxy's thread
//! (the most recently used first), its `Host` header is made once, and a connection comes back
//! when the proxy has read its answer whole.
//!
//! What the general client did that matters is kept: a request that a reused connection closed
//! before it was sent is sent again on another (a backend may close an idle connection at any
//! time), never one that may have reached the backend; connecting has a deadline; at most
//! `idle_max` connections idle per endpoint, none for longer than [`IDLE_MS_MAX`].

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, HOST};
use hyper::http::uri::Authority;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;
use tokio::time::Instant;

/// Longest a connection is kept idle.
pub const IDLE_MS_MAX: u64 = 30_000;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot connect to {address}: {error}")]
    Connect { address: String, error: std::io::Error },
    #[error("no connection to {address} within {connect_ms_max} ms")]
    ConnectTimeout { address: String, connect_ms_max: u64 },
    #[error("HTTP/1.1 handshake with {address}: {error}")]
    Handshake { address: String, error: hyper::Error },
    #[error("request to {address}: {error}")]
    Send { address: String, error: hyper::Error },
}

/// The connections to each endpoint (by authority).
pub struct Pool {
    connect_ms_max: u64,
    idle_max: usize,
    endpoints: RefCell<BTreeMap<String, Rc<Endpoint>>>,
}

/// One endpoint: where to connect, its `Host` header, its idle connections (oldest first).
struct Endpoint {
    address: String,
    host: HeaderValue,
    idle_max: usize,
    idle: RefCell<Vec<Idle>>,
}

struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

/// A connection in use: given back with [`Lease::release`] once its answer was read whole
/// (dropped instead, it closes once the answer ends).
pub struct Lease {
    sender: SendRequest<Full<Bytes>>,
    endpoint: Rc<Endpoint>,
}

impl Lease {
    /// Gives the connection back for another request, if it is ready for one (its answer read
    /// and its request written whole: a backend may answer before it has read a large request
    /// body, and such a connection is closed rather than kept) and there is room.
    pub fn release(self) {
        if !self.sender.is_ready() {
            return;
        }
        let mut idle = self.endpoint.idle.borrow_mut();
        if idle.len() < self.endpoint.idle_max {
            idle.push(Idle { sender: self.sender, since: Instant::now() });
        }
    }
}

impl Pool {
    pub fn new(connect_ms_max: u64, idle_max: usize) -> Pool {
        Pool { connect_ms_max, idle_max, endpoints: RefCell::default() }
    }

    /// Sends `request` (its URI in origin form: path and query) to `authority` over a pooled
    /// connection, or a new one; sets its `Host` header.
    pub fn send(
        &self,
        authority: &Authority,
        mut request: Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease), PoolError>> + 'static {
        let endpoint = self.endpoint(authority);
        let connect_ms_max = self.connect_ms_max;
        request.headers_mut().insert(HOST, endpoint.host.clone());
        async move {
            // Each turn of the loop takes another idle connection or makes a new one; a request
            // is sent again only if a reused connection refused it unsent.
            loop {
                let (mut sender, reused) = match endpoint.checkout() {
                    Some(sender) => (sender, true),
                    None => (endpoint.connect(connect_ms_max).await?, false),
                };
                if let Err(error) = sender.ready().await {
                    if reused {
                        continue;
                    }
                    return Err(PoolError::Send { address: endpoint.address.clone(), error });
                }
                match sender.try_send_request(request).await {
                    Ok(response) => return Ok((response, Lease { sender, endpoint })),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) if reused => request = unsent,
                        _ => return Err(PoolError::Send { address: endpoint.address.clone(), error: e.into_error() }),
                    },
                }
            }
        }
    }

    /// Closes connections idle for longer than [`IDLE_MS_MAX`] (each endpoint's oldest first),
    /// and forgets endpoints with none left.
    pub fn prune(&self) {
        let now = Instant::now();
        let old = |idle: &Idle| now.saturating_duration_since(idle.since) > Duration::from_millis(IDLE_MS_MAX);
        self.endpoints.borrow_mut().retain(|_, endpoint| {
            let mut idle = endpoint.idle.borrow_mut();
            idle.retain(|i| !old(i) && !i.sender.is_closed());
            // An endpoint with a request in flight holds its `Rc` in that request's future.
            !idle.is_empty() || Rc::strong_count(endpoint) > 1
        });
    }

    /// Connections idle now, over every endpoint.
    pub fn idle(&self) -> usize {
        self.endpoints.borrow().values().map(|e| e.idle.borrow().len()).sum()
    }

    fn endpoint(&self, authority: &Authority) -> Rc<Endpoint> {
        if let Some(e) = self.endpoints.borrow().get(authority.as_str()) {
            return e.clone();
        }
        // The `Host` header names the port only if it is not http's own, as clients do.
        let port = authority.port_u16().unwrap_or(80);
        let address = format!("{}:{port}", authority.host());
        let host = match port {
            80 => authority.host().to_string(),
            _ => address.clone(),
        };
        let host = HeaderValue::from_str(&host).expect("an authority's host and port are a valid header value");
        let endpoint = Rc::new(Endpoint { address, host, idle_max: self.idle_max, idle: RefCell::default() });
        self.endpoints.borrow_mut().insert(authority.as_str().to_string(), endpoint.clone());
        endpoint
    }
}

impl Endpoint {
    /// The most recently used idle connection still ready and not idle for too long.
    fn checkout(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.borrow_mut();
        let now = Instant::now();
        while let Some(i) = idle.pop() {
            let fresh = now.saturating_duration_since(i.since) <= Duration::from_millis(IDLE_MS_MAX);
            if fresh && i.sender.is_ready() {
                return Some(i.sender);
            }
        }
        None
    }

    /// A new connection within `connect_ms_max`. A host name is resolved, and its addresses
    /// are tried in turn, within that one deadline: endpoints are best named by address.
    async fn connect(&self, connect_ms_max: u64) -> Result<SendRequest<Full<Bytes>>, PoolError> {
        let address = self.address.clone();
        let connecting = tokio::net::TcpStream::connect(address.clone());
        let stream = match tokio::time::timeout(Duration::from_millis(connect_ms_max), connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(PoolError::Connect { address, error }),
            Err(_) => return Err(PoolError::ConnectTimeout { address, connect_ms_max }),
        };
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| PoolError::Handshake { address: address.clone(), error })?;
        // The connection's own task: it ends when the connection closes, or when its sender
        // is dropped while it is idle.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, address, "connection to an endpoint ended");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    /// A backend that answers each connection's requests with the connection's number and the
    /// request's `Host`, and closes each connection after `per_connection` answers.
    async fn backend(per_connection: usize) -> (Authority, Rc<std::cell::Cell<usize>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Rc::new(std::cell::Cell::new(0));
        let count = accepted.clone();
        tokio::task::spawn_local(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.set(count.get() + 1);
                let number = count.get();
                tokio::task::spawn_local(async move {
                    let (read, mut write) = stream.into_split();
                    let mut reader = BufReader::new(read);
                    for _ in 0..per_connection {
                        let mut host = String::new();
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some(h) = line.to_ascii_lowercase().strip_prefix("host:") {
                                host = h.trim().to_string();
                            }
                        }
                        let body = format!("{number} {host}");
                        let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                        if write.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    // Closes after its last answer, as a backend's keep-alive limit does.
                    let mut rest = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_millis(1), reader.read_to_end(&mut rest)).await;
                });
            }
        });
        (authority, accepted)
    }

    async fn get(pool: &Pool, authority: &Authority) -> String {
        let request = Request::get("/x").body(Full::new(Bytes::new())).unwrap();
        let (response, lease) = pool.send(authority, request).await.expect("an answer");
        let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
        lease.release();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Runs `test` as the proxy runs: one thread, in a `LocalSet` (the proxy's tests use it too).
    pub(crate) fn run(test: impl Future<Output = ()>) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, test);
    }

    #[test]
    fn a_connection_is_reused_and_the_host_header_is_the_endpoints() {
        run(async {
            let (authority, accepted) = backend(100).await;
            let pool = Pool::new(1_000, 4);
            for _ in 0..5 {
                assert_eq!(get(&pool, &authority).await, format!("1 {authority}"));
            }
            assert_eq!(accepted.get(), 1, "one connection for five requests one after another");
            assert_eq!(pool.idle(), 1);
        });
    }

    #[test]
    fn a_request_on_a_connection_the_backend_closed_goes_out_on_a_new_one() {
        run(async {
            // Each connection answers once, then closes: every request after the first finds
            // its idle connection closed (or closing) and must not fail for it.
            let (authority, accepted) = backend(1).await;
            let pool = Pool::new(1_000, 4);
            for i in 1..=5 {
                assert_eq!(get(&pool, &authority).await, format!("{i} {authority}"));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(accepted.get(), 5);
        });
    }

    #[test]
    fn idle_connections_are_bounded_per_endpoint_and_pruned() {
        run(async {
            let (authority, accepted) = backend(100).await;
            let pool = Pool::new(1_000, 2);
            // Five requests at once: five connections, of which two stay idle.
            let sends: Vec<_> = (0..5)
                .map(|_| pool.send(&authority, Request::get("/").body(Full::new(Bytes::new())).unwrap()))
                .collect();
            let mut leases = Vec::new();
            for send in sends {
                let (response, lease) = send.await.unwrap();
                let _ = http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
                leases.push(lease);
            }
            assert_eq!(accepted.get(), 5);
            leases.into_iter().for_each(Lease::release);
            assert_eq!(pool.idle(), 2, "at most idle_max idle connections per endpoint");
            pool.prune();
            assert_eq!(pool.idle(), 2, "none idle for too long yet");
        });
    }

    #[test]
    fn the_host_header_names_the_port_only_if_it_is_not_the_default() {
        let pool = Pool::new(1_000, 2);
        let plain = pool.endpoint(&"shop.example".parse().unwrap());
        assert_eq!((plain.address.as_str(), plain.host.to_str().unwrap()), ("shop.example:80", "shop.example"));
        let own = pool.endpoint(&"shop.example:80".parse().unwrap());
        assert_eq!((own.address.as_str(), own.host.to_str().unwrap()), ("shop.example:80", "shop.example"));
        let other = pool.endpoint(&"10.0.0.7:8080".parse().unwrap());
        assert_eq!((other.address.as_str(), other.host.to_str().unwrap()), ("10.0.0.7:8080", "10.0.0.7:8080"));
    }

    #[test]
    fn no_listener_is_an_error_not_a_hang() {
        run(async {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let authority: Authority = format!("127.0.0.1:{port}").parse().unwrap();
            let pool = Pool::new(1_000, 2);
            let request = Request::get("/").body(Full::new(Bytes::new())).unwrap();
            match pool.send(&authority, request).await {
                Err(PoolError::Connect { .. }) => {}
                other => panic!("expected a connect error, got {:?}", other.map(|_| ())),
            }
        });
    }
}
