//! A userspace TCP proxy that adds a fixed delay to each direction and counts the HTTP/1 requests that
//! pass through it, for the benchmarks: put one in front of a store or a hook and a loopback link
//! behaves like one with a round-trip time of twice the delay (this project's machines have no `netem`
//! qdisc), and the counters say how many requests a rotation sent there.
//!
//! How the delay is applied: every chunk read from one side is written to the other side `delay`
//! after it was read, in order, without holding back the chunks behind it, so the link's latency grows
//! and its throughput does not shrink. The TCP handshake cannot be delayed from user space (the kernel
//! completes it before `accept`), so the first bytes a client sends on a new connection are held until
//! one extra round trip after the connection was accepted, as the handshake would have cost on a real
//! link. tokio's timer has millisecond resolution: each delay is `delay` rounded up to the next
//! millisecond tick, so allow up to 1 ms more per direction.
//!
//! How requests are counted: the client-to-upstream bytes are followed as HTTP/1 requests (head, then a
//! `Content-Length` or chunked body), so pipelined and kept-alive requests each count once. A stream
//! that stops looking like HTTP/1 is passed on uncounted from there on. The last [`LOG_LEN`] requests
//! are also kept with the time their head arrived (`GET /_sim/requests`), so a benchmark can tell which
//! requests fell inside a given interval, such as one rotation's invalidation window.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A request head larger than this is not HTTP the proxy follows: it stops counting that connection.
const MAX_HEAD: usize = 64 * 1024;

/// How many of the latest requests `GET /_sim/requests` keeps.
pub const LOG_LEN: usize = 10_000;

/// `GET /_sim/counters` of the proxy: what passed through since start or the last reset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyCounters {
    /// Connections accepted.
    pub connections: u64,
    /// HTTP/1 requests sent upstream.
    pub requests: u64,
    /// Requests by `METHOD /path` (the query string dropped).
    pub by_request: BTreeMap<String, u64>,
    /// Requests by their `X-Amz-Target` header (the AWS operation, e.g.
    /// `secretsmanager.PutSecretValue`); requests without one are not listed.
    pub by_target: BTreeMap<String, u64>,
    /// Bytes forwarded client to upstream, and upstream to client.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// One entry of `GET /_sim/requests`: a request that passed through, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedRequest {
    /// When its head had arrived from the client (before the delay).
    pub at: DateTime<Utc>,
    /// `METHOD /path`, the query string dropped.
    pub request: String,
    /// Its `X-Amz-Target` header, if any.
    pub target: Option<String>,
}

#[derive(Default)]
struct Seen {
    counters: ProxyCounters,
    log: VecDeque<LoggedRequest>,
}

/// The proxy's shared state: where to forward, how late, and what it counted.
#[derive(Clone)]
pub struct Proxy {
    upstream: Arc<str>,
    delay: Duration,
    seen: Arc<Mutex<Seen>>,
}

impl Proxy {
    /// A proxy to `upstream` (`HOST:PORT`, connected to anew for each client connection).
    pub fn new(upstream: impl Into<String>, delay: Duration) -> Proxy {
        Proxy {
            upstream: upstream.into().into(),
            delay,
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        // A poisoned lock means a connection task panicked mid-count; the counts are still the best
        // answer there is.
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the counters now.
    pub fn snapshot(&self) -> ProxyCounters {
        self.seen().counters.clone()
    }

    /// The latest requests, oldest first.
    pub fn log(&self) -> Vec<LoggedRequest> {
        self.seen().log.iter().cloned().collect()
    }

    /// `GET /_sim/counters`, `GET /_sim/requests` and `POST /_sim/reset` (loopback callers only), served by
    /// [`super::serve`] on a listener of its own.
    pub fn control_router(&self) -> Router {
        Router::new()
            .route("/_sim/counters", get(control_counters))
            .route("/_sim/requests", get(control_requests))
            .route("/_sim/reset", post(control_reset))
            .route_layer(axum::middleware::from_fn(super::loopback_only))
            .with_state(self.clone())
    }

    /// Accepts connections on `listener` and proxies each until the process ends.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let client = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let proxy = self.clone();
            tokio::spawn(async move { proxy.connection(client).await });
        }
    }

    async fn connection(self, client: TcpStream) {
        let accepted = Instant::now();
        self.seen().counters.connections += 1;
        let upstream = match TcpStream::connect(&*self.upstream).await {
            Ok(s) => s,
            Err(e) => {
                // Dropping the client's socket closes it: to the client, the upstream is down.
                tracing::warn!(upstream = %self.upstream, error = %e, "cannot connect upstream");
                return;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (client_read, client_write) = client.into_split();
        let (upstream_read, upstream_write) = upstream.into_split();
        // The handshake's round trip (see the module's note): nothing leaves before it is over.
        let handshake = accepted + self.delay * 2;
        let mut requests = RequestCounter::default();
        let up = self.pipe(client_read, upstream_write, Some(handshake), |p, bytes| {
            let mut seen = p.seen();
            seen.counters.bytes_up += bytes.len() as u64;
            requests.feed(bytes, |head| seen.count(head));
        });
        let down = self.pipe(upstream_read, client_write, None, |p, bytes| {
            p.seen().counters.bytes_down += bytes.len() as u64;
        });
        tokio::join!(up, down);
    }

    /// Forwards `from` to `to`, each chunk `delay` after it was read (or after `not_before`, when it
    /// was read earlier), calling `seen` on every chunk as it is read. Ends when either side closes.
    async fn pipe(
        &self,
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        not_before: Option<Instant>,
        mut seen: impl FnMut(&Proxy, &[u8]),
    ) {
        let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(64);
        let read = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = from.read(&mut buf).await.unwrap_or(0);
                let now = Instant::now();
                let due = not_before.map_or(now, |nb| now.max(nb)) + self.delay;
                let chunk = (n > 0).then(|| buf[..n].to_vec());
                if let Some(bytes) = &chunk {
                    seen(self, bytes);
                }
                let end = chunk.is_none();
                if tx.send((due, chunk)).await.is_err() || end {
                    return;
                }
            }
        };
        let write = async {
            while let Some((due, chunk)) = rx.recv().await {
                if due > Instant::now() {
                    tokio::time::sleep_until(due).await;
                }
                match chunk {
                    Some(bytes) => {
                        if to.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    None => {
                        let _ = to.shutdown().await;
                        return;
                    }
                }
            }
        };
        tokio::join!(read, write);
    }
}

impl Seen {
    fn count(&mut self, head: &RequestHead) {
        let request = format!("{} {}", head.method, head.path);
        let c = &mut self.counters;
        c.requests += 1;
        *c.by_request.entry(request.clone()).or_default() += 1;
        if let Some(target) = &head.amz_target {
            *c.by_target.entry(target.clone()).or_default() += 1;
        }
        if self.log.len() == LOG_LEN {
            self.log.pop_front();
        }
        self.log.push_back(LoggedRequest {
            at: Utc::now(),
            request,
            target: head.amz_target.clone(),
        });
    }
}

async fn control_counters(State(p): State<Proxy>) -> Json<ProxyCounters> {
    Json(p.snapshot())
}

async fn control_requests(State(p): State<Proxy>) -> Json<Vec<LoggedRequest>> {
    Json(p.log())
}

async fn control_reset(State(p): State<Proxy>) -> Response {
    *p.seen() = Seen::default();
    StatusCode::NO_CONTENT.into_response()
}

/// Binds `addr` and prints `keyrotd-sim proxy listening on http://<addr> (counters on
/// http://<control>/_sim/counters)` to stdout: the same readiness line as the other simulators, whose
/// first `http://` word is the proxy's address.
pub async fn bind_and_announce(
    addr: SocketAddr,
    control: SocketAddr,
) -> std::io::Result<TcpListener> {
    use std::io::Write;
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "keyrotd-sim proxy listening on http://{local} (counters on http://{control}/_sim/counters)"
    )?;
    out.flush()?;
    Ok(listener)
}

/// What the counters keep of one request head.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RequestHead {
    method: String,
    /// The request target without its query string.
    path: String,
    amz_target: Option<String>,
}

/// Where the client's byte stream is in the HTTP/1 framing.
#[derive(Debug)]
enum Framing {
    /// Collecting a request head until its empty line.
    Head(Vec<u8>),
    /// Inside a `Content-Length` body: bytes left.
    Body(u64),
    /// Collecting a chunk-size line of a chunked body.
    ChunkSize(Vec<u8>),
    /// Inside a chunk: its data and the CRLF after it, bytes left.
    ChunkData(u64),
    /// After the last chunk: collecting trailer lines until an empty one.
    Trailer(Vec<u8>),
    /// Not HTTP/1 the proxy can follow (or an upgraded connection): nothing more is counted.
    Opaque,
}

/// Follows one connection's client-to-upstream bytes as a sequence of HTTP/1 requests.
#[derive(Debug)]
struct RequestCounter {
    framing: Framing,
}

impl Default for RequestCounter {
    fn default() -> Self {
        RequestCounter {
            framing: Framing::Head(Vec::new()),
        }
    }
}

impl RequestCounter {
    /// Consumes `data`, calling `on_request` once for each request head completed in it.
    fn feed(&mut self, mut data: &[u8], mut on_request: impl FnMut(&RequestHead)) {
        while !data.is_empty() {
            data = match &mut self.framing {
                Framing::Opaque => return,
                Framing::Head(buf) => {
                    let (rest, next) = head_step(buf, data, &mut on_request);
                    if let Some(next) = next {
                        self.framing = next;
                    }
                    rest
                }
                Framing::Body(left) | Framing::ChunkData(left) => {
                    let take = (*left).min(data.len() as u64) as usize;
                    *left -= take as u64;
                    if *left == 0 {
                        self.framing = match self.framing {
                            Framing::ChunkData(_) => Framing::ChunkSize(Vec::new()),
                            _ => Framing::Head(Vec::new()),
                        };
                    }
                    &data[take..]
                }
                Framing::ChunkSize(line) => {
                    let (rest, complete) = take_line(line, data);
                    if complete {
                        self.framing = match chunk_size(line) {
                            Some(0) => Framing::Trailer(Vec::new()),
                            Some(n) => Framing::ChunkData(n + 2),
                            None => Framing::Opaque,
                        };
                    }
                    rest
                }
                Framing::Trailer(line) => {
                    let (rest, complete) = take_line(line, data);
                    if complete {
                        if line.as_slice() == b"\r\n" {
                            self.framing = Framing::Head(Vec::new());
                        } else {
                            line.clear();
                        }
                    }
                    rest
                }
            };
        }
    }
}

/// Adds `data` to a request head being collected. Returns the bytes after the head and, once the head
/// is complete (or cannot be HTTP/1), the framing of what follows.
fn head_step<'a>(
    buf: &mut Vec<u8>,
    data: &'a [u8],
    on_request: &mut impl FnMut(&RequestHead),
) -> (&'a [u8], Option<Framing>) {
    let before = buf.len();
    buf.extend_from_slice(data);
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let (head, next) = read_head(&req);
            on_request(&head);
            (&data[len - before..], Some(next))
        }
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => (&[], None),
        _ => (&[], Some(Framing::Opaque)),
    }
}

/// The counted facts of a parsed head, and the framing of its body.
fn read_head(req: &httparse::Request<'_, '_>) -> (RequestHead, Framing) {
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("");
    let path = target.split('?').next().unwrap_or("").to_string();
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    let amz_target = header("x-amz-target");
    let chunked =
        header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    let upgrade = method == "CONNECT" || header("upgrade").is_some();
    let next = if upgrade {
        Framing::Opaque
    } else if chunked {
        Framing::ChunkSize(Vec::new())
    } else {
        match header("content-length").map(|v| v.parse::<u64>()) {
            None | Some(Ok(0)) => Framing::Head(Vec::new()),
            Some(Ok(n)) => Framing::Body(n),
            Some(Err(_)) => Framing::Opaque,
        }
    };
    let head = RequestHead {
        method,
        path,
        amz_target,
    };
    (head, next)
}

/// Adds bytes of `data` to `line` up to and including the first `\n`. Returns the rest of `data` and
/// whether the line is complete. An overlong line stays incomplete and is cut (the framing then turns
/// opaque at its parse).
fn take_line<'a>(line: &mut Vec<u8>, data: &'a [u8]) -> (&'a [u8], bool) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => {
            if line.len() < MAX_HEAD {
                line.extend_from_slice(&data[..=i]);
            }
            (&data[i + 1..], true)
        }
        None => {
            if line.len() < MAX_HEAD {
                line.extend_from_slice(data);
            }
            (&[], false)
        }
    }
}

/// The size of a chunk from its size line (`1a;ext=1\r\n`); `None` when it is not one.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let hex = text
        .trim_end_matches(['\r', '\n'])
        .split(';')
        .next()?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(chunks: &[&[u8]]) -> Vec<RequestHead> {
        let mut counter = RequestCounter::default();
        let mut seen = Vec::new();
        for c in chunks {
            counter.feed(c, |h| seen.push(h.clone()));
        }
        seen
    }

    fn head(method: &str, path: &str) -> RequestHead {
        RequestHead {
            method: method.into(),
            path: path.into(),
            amz_target: None,
        }
    }

    #[test]
    fn kept_alive_requests_with_bodies_each_count_once() {
        let stream = b"POST /v1/secret/data/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nGET /GET /v1/secret/data/a?version=2 HTTP/1.1\r\nHost: x\r\n\r\n";
        // Byte by byte: the framing must not depend on how the stream was cut.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let expected = vec![
            head("POST", "/v1/secret/data/a"),
            head("GET", "/v1/secret/data/a"),
        ];
        assert_eq!(count(&bytes), expected);
        assert_eq!(count(&[stream]), expected, "the same in one chunk");
    }

    #[test]
    fn a_chunked_body_that_looks_like_a_request_is_not_counted() {
        let stream = b"POST /hook HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
            14\r\nGET /fake HTTP/1.1\r\n\r\n0\r\nX-Trailer: 1\r\n\r\n\
            POST / HTTP/1.1\r\nX-Amz-Target: secretsmanager.PutSecretValue\r\nContent-Length: 2\r\n\r\n{}";
        let mut put = head("POST", "/");
        put.amz_target = Some("secretsmanager.PutSecretValue".into());
        assert_eq!(count(&[stream]), vec![head("POST", "/hook"), put.clone()]);
        let bytes: Vec<&[u8]> = stream.chunks(3).collect();
        assert_eq!(count(&bytes), vec![head("POST", "/hook"), put]);
    }

    #[test]
    fn a_stream_that_is_not_http_stops_the_count() {
        assert_eq!(
            count(&[b"\x16\x03\x01\x02\x00 TLS hello", b"GET / HTTP/1.1\r\n\r\n"]),
            vec![]
        );
        let bad_length = b"POST /a HTTP/1.1\r\nContent-Length: many\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(count(&[bad_length]), vec![head("POST", "/a")]);
    }

    /// An echo upstream, the proxy with 20 ms per direction in front of it, and one exchange on a
    /// new connection then one on the same connection: the first costs the handshake's extra round
    /// trip as well, the second at least one round trip; both are counted.
    #[tokio::test]
    async fn each_direction_is_delayed_and_requests_are_counted() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        let delay = Duration::from_millis(20);
        let proxy = Proxy::new(upstream_addr.to_string(), delay);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(proxy.clone().serve(listener));

        let request = b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut s = TcpStream::connect(addr).await.unwrap();
        let exchange = async |s: &mut TcpStream| {
            let start = std::time::Instant::now();
            s.write_all(request).await.unwrap();
            let mut got = vec![0u8; request.len()];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(&got[..], &request[..], "bytes pass unchanged");
            start.elapsed()
        };
        let first = exchange(&mut s).await;
        let second = exchange(&mut s).await;
        // Lower bounds only: the proxy guarantees them; how much longer a loaded machine takes is not
        // the proxy's to promise.
        assert!(
            first >= delay * 4,
            "new connection: handshake + one round trip, took {first:?}"
        );
        assert!(
            second >= delay * 2,
            "kept alive: one round trip, took {second:?}"
        );
        let c = proxy.snapshot();
        assert_eq!((c.connections, c.requests), (1, 2));
        assert_eq!(c.by_request.get("GET /v1/sys/health"), Some(&2));
        assert_eq!(c.bytes_up, 2 * request.len() as u64);
        assert_eq!(c.bytes_down, 2 * request.len() as u64);
        let log = proxy.log();
        assert_eq!(log.len(), 2);
        assert!(log[0].at <= log[1].at && log[1].request == "GET /v1/sys/health");
    }
}
