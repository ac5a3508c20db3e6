//! The admin HTTP API on `daemon.listen` (docs/admin-api.md): metrics, health, readiness, the
//! keys' live view, rotation records, and the few POSTs (rotate, pause, resume).
//!
//! GET endpoints never change state and never show a secret. POSTs need `Authorization: Bearer
//! <admin_token>`, compared in constant time; without a configured token every POST answers 403.
//!
//! The server is bounded so that a misbehaving or hostile client cannot starve it ([`Limits`]): at
//! most 64 connections at once (more wait in the kernel's backlog), request headers within 10 s,
//! request bodies of at most 64 KiB within 10 s.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::engine::{Engine, RotationRequest, RunResult, Trigger, TriggerError};

/// How much the admin server gives one client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; the next ones wait to be accepted.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (also the idle limit of a kept-alive
    /// connection).
    pub header_timeout: Duration,
    /// Time a client has to send a request's body once its headers are in.
    pub body_timeout: Duration,
    /// The largest request body read. A rotate request is a few hundred bytes.
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_body: 64 * 1024,
        }
    }
}

/// Builds the router. The admin token is read from the engine's current config on every request, so
/// a reload that changes it takes effect at once.
pub fn router(engine: Arc<Engine>) -> axum::Router {
    router_with(engine, Limits::default())
}

fn router_with(engine: Arc<Engine>, limits: Limits) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/keys", get(keys))
        .route("/v1/keys/{name}", get(key))
        .route("/v1/keys/{name}/rotate", post(rotate))
        .route("/v1/rotations/{id}", get(rotation))
        .route("/v1/pause", post(pause))
        .route("/v1/resume", post(resume))
        .layer(axum::middleware::from_fn(move |req, next| {
            bounded_body(limits, req, next)
        }))
        .with_state(engine)
}

/// Reads the whole request body before any handler runs: at most `max_body` bytes (413 past it)
/// within `body_timeout` (408 past it), so a slow or endless body cannot hold a handler.
async fn bounded_body(limits: Limits, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(
        limits.body_timeout,
        axum::body::to_bytes(body, limits.max_body),
    )
    .await;
    let bytes = match read {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body larger than {} bytes, or cut off",
                    limits.max_body
                ),
            );
        }
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "request body too slow"),
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Serves the router until `shutdown` is cancelled, within the default [`Limits`].
pub async fn serve(listener: tokio::net::TcpListener, engine: Arc<Engine>) -> std::io::Result<()> {
    serve_with(listener, engine, Limits::default()).await
}

/// [`serve`] within `limits`.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    limits: Limits,
) -> std::io::Result<()> {
    let shutdown = engine.shutdown.clone();
    let app = router_with(engine, limits);
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        // A permit first, then accept: past the limit, clients wait in the listen backlog.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "Admin API: accept failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            serve_connection(stream, service, limits.header_timeout, shutdown).await;
        });
    }
    connections.close();
    // In-flight requests get a moment to finish; the daemon's own shutdown bound covers the rest.
    let _ = tokio::time::timeout(Duration::from_secs(5), connections.wait()).await;
    Ok(())
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    service: TowerToHyperService<axum::Router>,
    header_timeout: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn metrics(State(engine): State<Arc<Engine>>) -> Response {
    // The stores' token tasks keep their credential status in memory; a scrape is when it is read.
    for (name, store) in &engine.runtime().stores {
        engine
            .metrics
            .store_credential(name, store.credential_status().as_ref());
    }
    // Written a few hundred keys at a time as the client reads: at 10,000 keys the whole text is tens
    // of megabytes, which the daemon never holds at once.
    let chunks = futures::stream::unfold(
        (engine, crate::telemetry::Scrape::default()),
        |(engine, mut cursor)| async move {
            let chunk = engine.metrics.next_chunk(&mut cursor)?;
            Some((Ok::<_, std::convert::Infallible>(chunk), (engine, cursor)))
        },
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        axum::body::Body::from_stream(chunks),
    )
        .into_response()
}

async fn readyz(State(engine): State<Arc<Engine>>) -> Response {
    match engine.readiness() {
        Ok(()) => Json(json!({ "ready": true })).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reason": reason })),
        )
            .into_response(),
    }
}

async fn keys(State(engine): State<Arc<Engine>>) -> Response {
    Json(engine.key_views()).into_response()
}

async fn key(State(engine): State<Arc<Engine>>, Path(name): Path<String>) -> Response {
    match engine.key_views().into_iter().find(|k| k.name == name) {
        Some(k) => Json(k).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("unknown key {name:?}")),
    }
}

async fn rotation(State(engine): State<Arc<Engine>>, Path(id): Path<String>) -> Response {
    let Ok(id) = Uuid::parse_str(&id) else {
        return error(StatusCode::NOT_FOUND, "not a rotation id");
    };
    match engine.rotation(id) {
        Some(r) => Json(r).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no rotation {id} (the daemon keeps the last 100 per key)"),
        ),
    }
}

/// `None` when the request carries the configured admin token; else the refusal to send.
fn authorize(engine: &Engine, headers: &HeaderMap) -> Option<Response> {
    let config = engine.config();
    let Some(token) = &config.daemon.admin_token else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "no admin_token configured: the admin API accepts no POST",
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok: bool = given
        .as_bytes()
        .ct_eq(token.expose_secret().as_bytes())
        .into();
    if ok {
        None
    } else {
        Some(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        ))
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RotateBody {
    reason: Option<String>,
    requested_by: Option<String>,
    force: bool,
    allow_partial: bool,
    dry_run: bool,
}

async fn rotate(
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refusal) = authorize(&engine, &headers) {
        return refusal;
    }
    let body: RotateBody = if body.is_empty() {
        RotateBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
        }
    };
    let mut req = RotationRequest::new(
        Trigger::Api,
        body.reason.unwrap_or_else(|| "api".into()),
        body.requested_by.unwrap_or_else(|| "admin-api".into()),
    );
    if body.allow_partial && !body.force {
        return error(
            StatusCode::BAD_REQUEST,
            "allow_partial is an emergency override and needs force",
        );
    }
    req.force = body.force;
    req.allow_partial = body.allow_partial;
    req.dry_run = body.dry_run;
    if req.dry_run {
        return match engine.rotate(&name, req).await {
            Ok((
                id,
                RunResult::DryRun {
                    would_rotate,
                    findings,
                    problems,
                },
            )) => {
                let events = engine.rotation(id).map(|r| r.events).unwrap_or_default();
                let preflight: Vec<String> = findings.into_iter().chain(problems.clone()).collect();
                Json(json!({
                    "rotation_id": id,
                    "dry_run": true,
                    "would_rotate": would_rotate,
                    "preflight": preflight,
                    "problems": problems,
                    "events": events,
                }))
                .into_response()
            }
            Ok(_) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the dry run did not report",
            ),
            Err(e) => trigger_error(e),
        };
    }
    match engine.start_rotation(&name, req) {
        Ok(id) => (StatusCode::ACCEPTED, Json(json!({ "rotation_id": id }))).into_response(),
        Err(e) => trigger_error(e),
    }
}

fn trigger_error(e: TriggerError) -> Response {
    let status = match e {
        TriggerError::UnknownKey(_) => StatusCode::NOT_FOUND,
        TriggerError::Busy(_) | TriggerError::HeldElsewhere { .. } => StatusCode::CONFLICT,
        TriggerError::Paused | TriggerError::OutsideWindow(_) | TriggerError::Blocked { .. } => {
            StatusCode::LOCKED
        }
        TriggerError::ShuttingDown | TriggerError::NotReady => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.to_string())
}

async fn pause(State(engine): State<Arc<Engine>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = authorize(&engine, &headers) {
        return refusal;
    }
    engine.set_paused(true);
    Json(json!({ "paused": true })).into_response()
}

async fn resume(State(engine): State<Arc<Engine>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = authorize(&engine, &headers) {
        return refusal;
    }
    engine.set_paused(false);
    Json(json!({ "paused": false })).into_response()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::telemetry::Metrics;

    async fn engine() -> (Arc<Engine>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("tok");
        std::fs::write(&tok, "t").unwrap();
        let config = crate::config::load_str(&format!(
            r#"
[daemon]
state_dir = "{state}"
[providers.p]
kind = "aos"
base_url = "http://127.0.0.1:1"
management_token = {{ file = "{tok}" }}
[stores.local]
kind = "file"
dir = "{state}"
[[keys]]
name = "k"
provider = "p"
  [[keys.destinations]]
  store = "local"
  file = "k"
"#,
            state = dir.path().display(),
            tok = tok.display()
        ))
        .unwrap();
        let engine = Engine::new(Arc::new(config), Arc::new(Metrics::new()))
            .await
            .unwrap();
        (engine, dir)
    }

    /// Serves with `limits` on a free port; returns its address.
    async fn start(limits: Limits) -> (std::net::SocketAddr, Arc<Engine>, tempfile::TempDir) {
        let (engine, dir) = engine().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_with(listener, engine.clone(), limits));
        (addr, engine, dir)
    }

    /// Sends `raw`, returns what came back before the server closed or `wait` passed.
    async fn exchange(addr: std::net::SocketAddr, raw: &[u8], wait: Duration) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_refused_before_any_handler() {
        let (addr, _e, _d) = start(Limits::default()).await;
        let body = "x".repeat(100 * 1024);
        let req = format!(
            "POST /v1/pause HTTP/1.1\r\nhost: a\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let answer = exchange(addr, req.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }

    #[tokio::test]
    async fn a_body_that_never_comes_times_out() {
        let limits = Limits {
            body_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (addr, _e, _d) = start(limits).await;
        let req = b"POST /v1/pause HTTP/1.1\r\nhost: a\r\ncontent-length: 50\r\n\r\n{\"par";
        let answer = exchange(addr, req, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }

    #[tokio::test]
    async fn headers_that_never_end_close_the_connection() {
        let limits = Limits {
            header_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (addr, _e, _d) = start(limits).await;
        let started = std::time::Instant::now();
        // No blank line: the headers never end. The server hangs up instead of waiting forever.
        let answer = exchange(
            addr,
            b"GET /healthz HTTP/1.1\r\nhost: a\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "still open after {:?}: {answer}",
            started.elapsed()
        );
        assert!(!answer.contains("ok"), "{answer}");
    }

    #[tokio::test]
    async fn connections_past_the_limit_wait_for_a_free_slot() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let (addr, _e, _d) = start(limits).await;
        let idle1 = TcpStream::connect(addr).await.unwrap();
        let _idle2 = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let get = b"GET /healthz HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";
        let answer = exchange(addr, get, Duration::from_millis(500)).await;
        assert_eq!(answer, "", "a third connection was served past the limit");
        drop(idle1);
        let answer = exchange(addr, get, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
