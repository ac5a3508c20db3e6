//! The admin HTTP API on `daemon.listen` (docs/admin-api.md): metrics, health, readiness, the
//! keys' live view, rotation records, and the few POSTs (rotate, pause, resume).
//!
//! GET endpoints never change state and never show a secret. POSTs need `Authorization: Bearer
//! <admin_token>`, compared in constant time; without a configured token every POST answers 403.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::engine::{Engine, RotationRequest, RunResult, Trigger, TriggerError};

/// Builds the router. The admin token is read from the engine's current config on every request, so
/// a reload that changes it takes effect at once.
pub fn router(engine: Arc<Engine>) -> axum::Router {
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
        .with_state(engine)
}

/// Serves the router until `shutdown` is cancelled.
pub async fn serve(listener: tokio::net::TcpListener, engine: Arc<Engine>) -> std::io::Result<()> {
    let shutdown = engine.shutdown.clone();
    axum::serve(listener, router(engine))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn metrics(State(engine): State<Arc<Engine>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        engine.metrics.encode(),
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
