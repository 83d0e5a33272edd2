//! The HTTP/1.1 ingress proxy: clients' requests into the ingress actor, the core's forwards and
//! mirrors out to the universes' endpoints, the core's replies back to the clients.
//!
//! The shell keeps only the map from request to I/O handle: a forwarded answer waits here until
//! the core says what the client gets (the answer itself, or 503/504). The core sees an answer
//! as a row: the status, and the top-level fields of a JSON object body (or the body as text),
//! so that its validator compares the two universes' answers field by field and skips the
//! headers and fields the plan ignores (timestamps, say). The row's keys are protocol's
//! (`plan::STATUS_KEY`, `plan::header_key`, ...); headers of one hop, `date`, `content-length`
//! and Imago's own are never compared.
//!
//! Which requests are mirrored (by method) and which are long (by path) the shell tells by the
//! rules the core learnt from the plan (`IngressCore::rules`), until a plan by its own
//! configuration.

use crate::pool::Pool;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use node::ingress::ClientRequest;
use node::io::{Ingress, Purpose};
use node_core::ingress::{ClientReply, IngressCore, IngressEvent, Unavailable};
use node_core::{RequestKey, StoreAnswer};
use protocol::plan::{header_key, BODY_KEY, STATUS_KEY};
use protocol::schema::{Row, Value};
use protocol::{Epoch, Generation, Position};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::oneshot;

/// The header that carries a request's idempotency key to the universe.
pub const KEY_HEADER: &str = "x-imago-request-key";
/// The header that names the generation a request was sent to.
pub const GENERATION_HEADER: &str = "x-imago-generation";
/// Present on mirrored copies (the new universe may skip side effects it would log, say).
pub const MIRROR_HEADER: &str = "x-imago-mirror";

/// Limits of the proxy.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Longest a universe gets to answer one forwarded request (then: unknown, 504).
    pub forward_ms_max: u64,
    /// Longest to connect to an endpoint.
    pub connect_ms_max: u64,
    /// Largest request or answer body (a larger request: 413; a larger answer: unknown).
    pub body_bytes_max: usize,
    /// Largest request head (request line and headers).
    pub head_bytes_max: usize,
    /// Idle keep-alive connections kept per endpoint.
    pub idle_per_endpoint_max: usize,
    /// Methods whose requests are read-only (mirrored during an upgrade's sync).
    pub read_only_methods: Vec<Method>,
    /// An answer body longer than this is compared by digest, not as text.
    pub compared_text_bytes_max: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            forward_ms_max: 10_000,
            connect_ms_max: 1_000,
            body_bytes_max: 8 * 1024 * 1024,
            head_bytes_max: 64 * 1024,
            idle_per_endpoint_max: 64,
            read_only_methods: vec![Method::GET, Method::HEAD],
            compared_text_bytes_max: 4 * 1024,
        }
    }
}

/// One client request inside the node: what it asked, and where its answer goes. Boxed: the
/// actor keeps open requests in a map, which moves its values.
pub struct HttpRequest(Box<Asked>);

struct Asked {
    /// Where its forwarded answer waits for the core's reply. Only the request holds it
    /// strongly: an answer that comes after its client was answered (a request ended at a
    /// freeze) is dropped, not kept.
    answer: std::sync::Arc<std::sync::Mutex<Option<Response<Bytes>>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    reply: oneshot::Sender<Response<Full<Bytes>>>,
}

/// The proxy's side of the ingress actor.
pub struct HttpIngress {
    pool: Pool,
    /// When idle connections were last pruned (the node's clock, ms).
    pruned_ms: std::cell::Cell<u64>,
    config: Rc<ProxyConfig>,
    /// Each endpoint as parsed.
    targets: RefCell<BTreeMap<String, Rc<Target>>>,
    /// The plan's rules, as the core last had them (shared with [`serve`]).
    rules: Rules,
    /// The core's `rules_changes` when `rules` was copied.
    rules_seen: std::cell::Cell<u64>,
    /// The upgrade the router validates for and the epoch of the last decision it acted on:
    /// what it logs runs in their span.
    upgrade: std::cell::Cell<(Option<u64>, u64)>,
    /// Requests the core has in progress (after its last input): a stopping node waits for 0.
    in_progress: Rc<std::cell::Cell<usize>>,
    metrics: Option<crate::metrics::NodeMetrics>,
}

impl HttpIngress {
    pub fn new(config: ProxyConfig) -> HttpIngress {
        HttpIngress {
            pool: Pool::new(config.connect_ms_max, config.idle_per_endpoint_max),
            pruned_ms: std::cell::Cell::new(0),
            config: Rc::new(config),
            targets: RefCell::default(),
            rules: Rc::default(),
            rules_seen: std::cell::Cell::new(0),
            upgrade: std::cell::Cell::new((None, 0)),
            in_progress: Rc::default(),
            metrics: None,
        }
    }

    /// The same, exporting what it sees to `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::NodeMetrics) -> HttpIngress {
        self.metrics = Some(metrics);
        self
    }

    /// Where `path` at `endpoint` goes: the endpoint's authority, and the path in origin form
    /// (under the endpoint's base path). Each endpoint is parsed once.
    fn target(&self, endpoint: &str, path: Option<&PathAndQuery>) -> Result<(Authority, PathAndQuery), String> {
        let known = self.targets.borrow().get(endpoint).cloned();
        let target = match known {
            Some(t) => t,
            None => {
                let parts = endpoint.parse::<Uri>().map_err(|e| format!("endpoint `{endpoint}`: {e}"))?.into_parts();
                let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
                    return Err(format!("endpoint `{endpoint}` names no scheme and host"));
                };
                if scheme != hyper::http::uri::Scheme::HTTP {
                    return Err(format!("endpoint `{endpoint}`: the router forwards over http only"));
                }
                if authority.as_str().contains('@') {
                    return Err(format!("endpoint `{endpoint}`: user info in an endpoint is not supported"));
                }
                let base = parts.path_and_query.as_ref().map_or("", |p| p.path()).trim_end_matches('/').to_string();
                let t = Rc::new(Target { authority, base });
                self.targets.borrow_mut().insert(endpoint.to_string(), t.clone());
                t
            }
        };
        let path_and_query = match (target.base.is_empty(), path) {
            (true, Some(p)) => p.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, p) => {
                let p = p.map_or("/", PathAndQuery::as_str);
                format!("{}{p}", target.base).parse::<PathAndQuery>().map_err(|e| e.to_string())?
            }
        };
        Ok((target.authority.clone(), path_and_query))
    }

    /// The plan's rules as the core has them, for [`serve`] to classify requests by.
    pub fn rules(&self) -> Rules {
        self.rules.clone()
    }

    /// How many requests the core has in progress, kept current after every input.
    pub fn in_progress(&self) -> Rc<std::cell::Cell<usize>> {
        self.in_progress.clone()
    }
}

/// The plan's rules for routers, once the core has them.
pub type Rules = Rc<RefCell<Option<protocol::messages::RouterRules>>>;

/// Headers of one hop, not passed on (nor `host`: the endpoint's applies).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
];
const KEY: HeaderName = HeaderName::from_static(KEY_HEADER);
const GENERATION: HeaderName = HeaderName::from_static(GENERATION_HEADER);
const MIRROR: HeaderName = HeaderName::from_static(MIRROR_HEADER);

/// A request key as its header carries it: `origin-id`, each 16 hex digits.
fn key_value(key: RequestKey) -> HeaderValue {
    let mut text = [0u8; 33];
    let hex = |n: u64, out: &mut [u8]| {
        for (i, b) in out.iter_mut().enumerate() {
            *b = b"0123456789abcdef"[((n >> (60 - 4 * i)) & 0xf) as usize];
        }
    };
    hex(key.origin, &mut text[..16]);
    text[16] = b'-';
    hex(key.id, &mut text[17..]);
    HeaderValue::from_bytes(&text).expect("hex digits and a dash make a header value")
}

/// An endpoint as parsed once: authority and base path (its scheme is http).
struct Target {
    authority: Authority,
    base: String,
}

/// Headers never compared: one hop's, the date, the length (the body is), and Imago's own.
const NOT_COMPARED: [&str; 4] = ["date", "content-length", "server-timing", "age"];

/// The row the core compares for an answer: its status, its headers (each value as text; a
/// header given twice, its values joined by `, `), and the fields of a JSON object body (each
/// as its JSON text), or the body as text (a digest if it is long). Keys as
/// [`protocol::plan::STATUS_KEY`] says.
pub fn answer_row(parts: &hyper::http::response::Parts, body: &[u8], text_bytes_max: usize) -> Row {
    let mut row = Row::new();
    row.insert(STATUS_KEY.to_string(), Value::Int(i64::from(parts.status.as_u16())));
    for name in parts.headers.keys() {
        let compared = !HOP_BY_HOP.contains(name)
            && !NOT_COMPARED.contains(&name.as_str())
            && !name.as_str().starts_with("x-imago-");
        if compared {
            let values: Vec<String> = parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            row.insert(header_key(name.as_str()), Value::Text(values.join(", ")));
        }
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(fields)) => {
            for (k, v) in fields {
                row.insert(k, Value::Text(v.to_string()));
            }
        }
        _ if body.len() <= text_bytes_max => {
            row.insert(BODY_KEY.to_string(), Value::Text(String::from_utf8_lossy(body).into_owned()));
        }
        _ => {
            let digest = body
                .iter()
                .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3));
            row.insert(BODY_KEY.to_string(), Value::Text(format!("{} bytes, fnv {digest:016x}", body.len())));
        }
    }
    row
}

fn plain(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

impl Ingress for HttpIngress {
    type Request = HttpRequest;
    type Sent = Option<StoreAnswer>;

    fn forward(
        &self,
        request: &HttpRequest,
        generation: Generation,
        endpoint: &str,
        key: RequestKey,
        purpose: Purpose,
    ) -> impl Future<Output = Option<StoreAnswer>> + 'static {
        let request = &request.0;
        let mirror = purpose.is_mirror();
        let compared = purpose.compared();
        let sent = self.target(endpoint, request.uri.path_and_query()).map(|(authority, path_and_query)| {
            let mut headers = HeaderMap::with_capacity(request.headers.len() + 3);
            for (name, value) in &request.headers {
                if !HOP_BY_HOP.contains(name) {
                    headers.append(name.clone(), value.clone());
                }
            }
            headers.insert(KEY, key_value(key));
            headers.insert(GENERATION, HeaderValue::from(generation.0));
            if mirror {
                headers.insert(MIRROR, HeaderValue::from_static("1"));
            }
            let mut outgoing = Request::new(Full::new(request.body.clone()));
            *outgoing.method_mut() = request.method.clone();
            *outgoing.uri_mut() = Uri::from(path_and_query);
            *outgoing.headers_mut() = headers;
            self.pool.send(&authority, outgoing)
        });
        let config = self.config.clone();
        let waiting = std::sync::Arc::downgrade(&request.answer);
        async move {
            let sent = match sent {
                Err(e) => {
                    tracing::warn!(error = %e, "cannot build the forwarded request");
                    return None;
                }
                Ok(sent) => sent,
            };
            // The whole answer, head and body, within `forward_ms_max`; the connection goes
            // back to the pool once the body is read.
            let answer = async {
                let (response, lease) = sent.await.map_err(|e| e.to_string())?;
                let (parts, body) = response.into_parts();
                let collected = Limited::new(body, config.body_bytes_max).collect().await.map_err(|e| e.to_string())?;
                lease.release();
                Ok::<_, String>((parts, collected.to_bytes()))
            };
            let (parts, bytes) = match tokio::time::timeout(Duration::from_millis(config.forward_ms_max), answer).await
            {
                Ok(Ok(answer)) => answer,
                // No answer in time, or none at all: the outcome is unknown to the core.
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, generation = generation.0, mirror, "forward failed");
                    return None;
                }
                Err(_) => return None,
            };
            // Only an answer the core compares is read as a row.
            let row = compared.then(|| answer_row(&parts, &bytes, config.compared_text_bytes_max));
            if !mirror {
                if let Some(waiting) = waiting.upgrade() {
                    *waiting.lock().unwrap_or_else(|e| e.into_inner()) = Some(Response::from_parts(parts, bytes));
                }
            }
            Some(StoreAnswer::Ok { body: row, position: Position(0) })
        }
    }

    fn taken(&self, sent: Option<StoreAnswer>) -> Option<StoreAnswer> {
        sent
    }

    fn reply(&self, request: HttpRequest, reply: ClientReply) {
        if let Some(m) = &self.metrics {
            m.replied(&reply);
        }
        let request = *request.0;
        let stashed = request.answer.lock().unwrap_or_else(|e| e.into_inner()).take();
        let response = match reply {
            ClientReply::Answer(StoreAnswer::Ok { .. }) => match stashed {
                Some(answer) => {
                    let (mut parts, body) = answer.into_parts();
                    // Most answers carry none of these: one pass over their few headers says so.
                    if parts.headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
                        for name in &HOP_BY_HOP {
                            parts.headers.remove(name);
                        }
                    }
                    Response::from_parts(parts, Full::new(body))
                }
                None => plain(StatusCode::BAD_GATEWAY, "the universe's answer was lost\n".into()),
            },
            ClientReply::Answer(other) => plain(StatusCode::BAD_GATEWAY, format!("{other:?}\n")),
            ClientReply::Unavailable { retry_after_ms, reason } => {
                let why = match reason {
                    Unavailable::Hold(r) => format!("held during the switch, then released: {r:?}"),
                    Unavailable::Overloaded => "too many requests in progress".to_string(),
                    Unavailable::NoEndpoint(g) => format!("no endpoint known for generation {}", g.0),
                };
                let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
                let seconds = retry_after_ms.div_ceil(1000).max(1);
                response.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(seconds));
                response
            }
            ClientReply::Unknown => plain(
                StatusCode::GATEWAY_TIMEOUT,
                "no answer in time: the request may or may not have taken effect\n".into(),
            ),
        };
        let _ = request.reply.send(response);
    }

    fn notify_frozen(&self, epoch: Epoch) {
        // Data nodes that listen for these notices come with the data tier; a lost notice only
        // leaves a data node to learn of the freeze from the coordinator.
        tracing::debug!(epoch = epoch.0, "frozen");
    }

    fn event(&self, event: IngressEvent) {
        if let Some(m) = &self.metrics {
            m.event(&event);
        }
        let (mut upgrade, mut epoch) = self.upgrade.get();
        match &event {
            IngressEvent::Acted(decision) if decision.epoch().0 > 0 => epoch = decision.epoch().0,
            IngressEvent::ValidationReset { upgrade: u } => upgrade = u.map(|u| u.0),
            _ => {}
        }
        self.upgrade.set((upgrade, epoch));
        let span = tracing::info_span!("upgrade", id = upgrade, epoch);
        let _entered = span.enter();
        match &event {
            // What an operator follows in the log: each decision the router acts on.
            IngressEvent::Acted(decision) => tracing::info!(?decision, "acting on the decision"),
            IngressEvent::ValidationReset { .. } => tracing::info!("validating a new upgrade"),
            IngressEvent::Ended { id, in_flight_ms, .. } => {
                tracing::info!(request = id, in_flight_ms, "ended a request in flight at the freeze")
            }
            _ => tracing::debug!(?event, "ingress"),
        }
    }

    fn observe(&self, now_ms: u64, core: &IngressCore) {
        self.in_progress.set(core.requests());
        if now_ms >= self.pruned_ms.get() + 1_000 {
            self.pruned_ms.set(now_ms);
            self.pool.prune();
        }
        let (upgrade, epoch) = self.upgrade.get();
        if upgrade != core.upgrade().map(|u| u.0) {
            self.upgrade.set((core.upgrade().map(|u| u.0), epoch));
        }
        if self.rules_seen.get() != core.rules_changes() {
            self.rules_seen.set(core.rules_changes());
            *self.rules.borrow_mut() = core.rules().cloned();
        }
        if let Some(m) = &self.metrics {
            m.observe(core);
        }
    }
}

/// Where the proxy hands client requests: the ingress actor.
pub type Inbox = actix::Recipient<ClientRequest<HttpRequest>>;

/// Serves HTTP/1.1 clients on `listener` until `stop` turns true; each request goes to `inbox`.
/// Runs on the current `LocalSet` (the actor's thread).
pub async fn serve(
    listener: tokio::net::TcpListener,
    inbox: Inbox,
    config: ProxyConfig,
    rules: Rules,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let config = Rc::new(config);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let _ = stream.set_nodelay(true);
        let (inbox, shared, rules) = (inbox.clone(), config.clone(), rules.clone());
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let (inbox, config, rules) = (inbox.clone(), shared.clone(), rules.clone());
            async move { Ok::<_, std::convert::Infallible>(handle(request, &inbox, &config, &rules).await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .max_buf_size(config.head_bytes_max.max(8192))
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        tokio::task::spawn_local(async move {
            let _ = connection.await;
        });
    }
}

async fn handle(
    request: Request<Incoming>,
    inbox: &Inbox,
    config: &ProxyConfig,
    rules: &Rules,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = if hyper::body::Body::is_end_stream(&body) {
        Bytes::new()
    } else {
        match Limited::new(body, config.body_bytes_max).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request bodies are limited to {} bytes\n", config.body_bytes_max),
                )
            }
        }
    };
    let (read_only, long) = match rules.borrow().as_ref() {
        Some(r) => (r.mirrors(parts.method.as_str()), r.is_long(parts.uri.path())),
        None => (config.read_only_methods.contains(&parts.method), false),
    };
    let (reply, answer) = oneshot::channel();
    let request = HttpRequest(Box::new(Asked {
        answer: std::sync::Arc::default(),
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
        reply,
    }));
    match inbox.try_send(ClientRequest { read_only, long, request }) {
        Ok(()) => {}
        Err(actix::prelude::SendError::Full(_)) => {
            let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, "too many requests waiting\n".into());
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
            return response;
        }
        Err(actix::prelude::SendError::Closed(_)) => {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "the router is stopping\n".into())
        }
    }
    answer.await.unwrap_or_else(|_| plain(StatusCode::SERVICE_UNAVAILABLE, "the router stopped\n".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(status: u16, headers: &[(&str, &str)]) -> hyper::http::response::Parts {
        let mut response = Response::builder().status(status);
        for (k, v) in headers {
            response = response.header(*k, *v);
        }
        response.body(()).expect("a response").into_parts().0
    }

    #[test]
    fn an_answer_is_compared_by_status_headers_and_json_fields() {
        let head = parts(200, &[("content-type", "application/json"), ("date", "Thu, 26 Nov 2026"), ("x-v", "1")]);
        let a = answer_row(&head, br#"{"id": 4, "title": "lamp", "at": "12:00", "status": "sold"}"#, 64);
        assert_eq!(a.get(STATUS_KEY), Some(&Value::Int(200)));
        assert_eq!(a.get("status"), Some(&Value::Text("\"sold\"".into())), "a field named status is a field");
        assert_eq!(a.get("title"), Some(&Value::Text("\"lamp\"".into())));
        assert_eq!(a.get("id"), Some(&Value::Text("4".into())));
        assert_eq!(a.get(&header_key("content-type")), Some(&Value::Text("application/json".into())));
        assert_eq!(a.get(&header_key("x-v")), Some(&Value::Text("1".into())));
        assert_eq!(a.get(&header_key("date")), None, "the date is never compared");
        let text = answer_row(&parts(404, &[]), b"no such item", 64);
        assert_eq!(text.get(BODY_KEY), Some(&Value::Text("no such item".into())));
        let long = answer_row(&parts(200, &[]), &[b'x'; 100], 64);
        assert!(matches!(long.get(BODY_KEY), Some(Value::Text(t)) if t.starts_with("100 bytes, fnv ")));
        assert_ne!(long, answer_row(&parts(200, &[]), &[b'y'; 100], 64), "long bodies differ by digest");
        let twice = answer_row(&parts(200, &[("vary", "a"), ("vary", "b")]), b"", 64);
        assert_eq!(twice.get(&header_key("vary")), Some(&Value::Text("a, b".into())));
    }
}

#[cfg(test)]
mod forward_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend that reads one request head and answers `head` and `body`, then keeps the
    /// connection open without another byte.
    async fn backend(answer: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            stream.write_all(answer.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        endpoint
    }

    fn request() -> (HttpRequest, oneshot::Receiver<Response<Full<Bytes>>>) {
        let (reply, answer) = oneshot::channel();
        let asked = Asked {
            answer: std::sync::Arc::default(),
            method: Method::GET,
            uri: Uri::from_static("/item/4"),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            reply,
        };
        (HttpRequest(Box::new(asked)), answer)
    }

    use crate::pool::tests::run;

    /// A request to `endpoint` forwarded by a fresh ingress with `config`: the ingress, the
    /// request (for the core's reply), where the client's answer arrives, and the forward.
    fn forwarded(
        endpoint: &str,
        config: ProxyConfig,
        compared: bool,
    ) -> (HttpIngress, HttpRequest, oneshot::Receiver<Response<Full<Bytes>>>, Forward) {
        let ingress = HttpIngress::new(config);
        let (request, answer) = request();
        let key = RequestKey { origin: 7, id: 9 };
        let sent = ingress.forward(&request, Generation(2), endpoint, key, Purpose::Serve { compared });
        (ingress, request, answer, Box::pin(sent))
    }

    type Forward = std::pin::Pin<Box<dyn Future<Output = Option<StoreAnswer>>>>;

    #[test]
    fn an_answer_waits_in_its_request_until_the_core_replies() {
        run(async {
            let endpoint = backend("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-v: 2\r\n\r\nhello").await;
            let (ingress, request, answer, sent) = forwarded(&endpoint, ProxyConfig::default(), true);
            match sent.await {
                Some(StoreAnswer::Ok { body: Some(row), .. }) => {
                    assert_eq!(row.get(BODY_KEY), Some(&Value::Text("hello".into())));
                }
                other => panic!("an answer compared as a row, got {other:?}"),
            }
            ingress.reply(request, ClientReply::Answer(StoreAnswer::Ok { body: None, position: Position(0) }));
            let response = answer.await.unwrap();
            assert_eq!(response.headers().get("x-v").unwrap(), "2");
            let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hello");
        });
    }

    #[test]
    fn an_answer_whose_body_stalls_is_unknown_within_the_forward_deadline() {
        run(async {
            // The head comes at once, the body never whole: the deadline covers both.
            let endpoint = backend("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b").await;
            let config = ProxyConfig { forward_ms_max: 200, ..ProxyConfig::default() };
            let started = tokio::time::Instant::now();
            let (_ingress, request, _answer, sent) = forwarded(&endpoint, config, false);
            assert!(sent.await.is_none(), "no whole answer in time: the outcome is unknown");
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(200) && took < Duration::from_millis(1_500), "took {took:?}");
            assert!(request.0.answer.lock().unwrap().is_none(), "nothing kept for the client");
        });
    }

    #[test]
    fn a_client_answered_before_its_forward_came_back_gets_the_cores_reply() {
        run(async {
            let endpoint = backend("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
            let (ingress, request, answer, sent) = forwarded(&endpoint, ProxyConfig::default(), false);
            // The core answers the client first (a request ended at a freeze, say): the
            // universe's answer, when it comes, has no request to wait in and is dropped.
            ingress.reply(request, ClientReply::Unknown);
            assert_eq!(answer.await.unwrap().status(), StatusCode::GATEWAY_TIMEOUT);
            assert!(matches!(sent.await, Some(StoreAnswer::Ok { .. })), "the universe answered all the same");
        });
    }
}
