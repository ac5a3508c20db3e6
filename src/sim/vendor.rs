//! The dual-key vendor simulator: a vendor that, unlike the AOS portal, keeps every key live until it
//! is revoked (as Stripe, GitHub apps, cloud IAM keys or Datadog do). Keys have a `name` (one name
//! per keyrotd key), so several keys can share one simulated account:
//!
//! - `POST /v1/keys` `{"name": N}` → 201 `{"id", "name", "secret", "created_at"}`: a new key; the
//!   others stay valid;
//! - `GET /v1/keys?name=N` → `{"data": [{"id", "name", "created_at"}]}`: the live keys, oldest first;
//! - `DELETE /v1/keys/{id}` → 204, or 404 for a key not live (revoked before, or never made);
//! - `GET /v1/keys/current?name=N` → `{"id", "created_at", "active": true}`: the newest live key;
//! - `GET /v1/auth/check` with `X-API-Key` → 200 while the key is live, 401 otherwise (the endpoint
//!   the dependent simulator probes, at the same path as the portal's).
//!
//! Management calls need `Authorization: Bearer <token>`. `/_sim/` (loopback only): `state`, `faults`
//! (`create.fail_next`/`status`/`lose_next`/`delay_ms`, `revoke.fail_next`/`status`), `reset`, and
//! `issued-secrets`, the leak tests' oracle.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::portal::{new_key_id, new_secret};
use super::{Conn, VendorKey, VendorState};
use crate::secret::{Secret, fingerprint};

/// How the simulator is set up (the `keyrotd-sim vendor` flags).
pub struct VendorOptions {
    pub management_token: Secret,
    /// Keys live at start: (name, secret).
    pub seeds: Vec<(String, Secret)>,
}

struct Key {
    id: String,
    name: String,
    secret: Secret,
    created_at: DateTime<Utc>,
}

#[derive(Default)]
struct Faults {
    create_fail_next: u64,
    create_fail_status: Option<u16>,
    create_lose_next: u64,
    create_delay_ms: u64,
    revoke_fail_next: u64,
    revoke_fail_status: Option<u16>,
}

#[derive(Default)]
struct Inner {
    live: Vec<Key>,
    issued: Vec<(String, Secret)>,
    creates: u64,
    revokes: u64,
    auth_ok: u64,
    auth_failed: u64,
    faults: Faults,
}

#[derive(Clone)]
pub struct Vendor {
    token: Arc<Secret>,
    inner: Arc<Mutex<Inner>>,
}

fn error(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "error": text }))).into_response()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Vendor {
    pub fn new(options: VendorOptions) -> Vendor {
        let mut inner = Inner::default();
        for (name, secret) in options.seeds {
            inner.add(&name, secret);
        }
        Vendor {
            token: Arc::new(options.management_token),
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a handler panicked mid-update; the state is still the best we have.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn router(self) -> Router {
        let sim = Router::new()
            .route("/_sim/state", get(sim_state))
            .route("/_sim/faults", post(sim_faults))
            .route("/_sim/reset", post(sim_reset))
            .route("/_sim/issued-secrets", get(sim_issued))
            .route_layer(axum::middleware::from_fn(super::loopback_only));
        Router::new()
            .route("/v1/keys", post(create).get(list))
            .route("/v1/keys/current", get(current))
            .route("/v1/keys/{id}", delete(revoke))
            .route("/v1/auth/check", get(auth_check))
            .merge(sim)
            .with_state(self)
    }

    /// `Some(401)` unless the request carries the management token.
    fn refuse(&self, headers: &HeaderMap) -> Option<Response> {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok: bool = presented
            .as_bytes()
            .ct_eq(self.token.expose_secret().as_bytes())
            .into();
        (!ok).then(|| error(StatusCode::UNAUTHORIZED, "invalid management token"))
    }
}

impl Inner {
    fn add(&mut self, name: &str, secret: Secret) -> &Key {
        let id = new_key_id().replacen("ak_", "rk_", 1);
        self.issued.push((id.clone(), secret.clone()));
        self.live.push(Key {
            id,
            name: name.to_string(),
            secret,
            created_at: Utc::now(),
        });
        let last = self.live.len() - 1;
        &self.live[last]
    }
}

#[derive(Deserialize, Default)]
struct NameQuery {
    name: Option<String>,
}

fn name_of(q: &NameQuery) -> &str {
    q.name.as_deref().unwrap_or("default")
}

#[derive(Deserialize, Default)]
struct CreateBody {
    name: Option<String>,
}

async fn create(
    State(v): State<Vendor>,
    Extension(conn): Extension<Conn>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = v.refuse(&headers) {
        return r;
    }
    let name = if body.is_empty() {
        "default".to_string()
    } else {
        match serde_json::from_slice::<CreateBody>(&body) {
            Ok(b) => b.name.unwrap_or_else(|| "default".into()),
            Err(_) => return error(StatusCode::BAD_REQUEST, "body must be JSON"),
        }
    };
    let (answer, lose, delay) = {
        let mut inner = v.lock();
        if inner.faults.create_fail_next > 0 {
            inner.faults.create_fail_next -= 1;
            let code = inner.faults.create_fail_status.unwrap_or(503);
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return error(status, "simulated create failure");
        }
        inner.creates += 1;
        let key = inner.add(&name, new_secret());
        let answer = json!({
            "id": key.id,
            "name": key.name,
            "secret": key.secret.expose_secret(),
            "created_at": rfc3339(key.created_at),
        });
        let lose = inner.faults.create_lose_next > 0;
        if lose {
            inner.faults.create_lose_next -= 1;
        }
        (answer, lose, inner.faults.create_delay_ms)
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if lose {
        conn.drop_connection();
        return std::future::pending().await;
    }
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn list(State(v): State<Vendor>, headers: HeaderMap, Query(q): Query<NameQuery>) -> Response {
    if let Some(r) = v.refuse(&headers) {
        return r;
    }
    let inner = v.lock();
    let data: Vec<_> = inner
        .live
        .iter()
        .filter(|k| k.name == name_of(&q))
        .map(|k| json!({"id": k.id, "name": k.name, "created_at": rfc3339(k.created_at)}))
        .collect();
    Json(json!({ "data": data })).into_response()
}

async fn current(
    State(v): State<Vendor>,
    headers: HeaderMap,
    Query(q): Query<NameQuery>,
) -> Response {
    if let Some(r) = v.refuse(&headers) {
        return r;
    }
    let inner = v.lock();
    match inner.live.iter().rev().find(|k| k.name == name_of(&q)) {
        Some(k) => Json(json!({
            "id": k.id,
            "created_at": rfc3339(k.created_at),
            "active": true,
        }))
        .into_response(),
        None => error(StatusCode::NOT_FOUND, "no live key of that name"),
    }
}

async fn revoke(State(v): State<Vendor>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Some(r) = v.refuse(&headers) {
        return r;
    }
    let mut inner = v.lock();
    if inner.faults.revoke_fail_next > 0 {
        inner.faults.revoke_fail_next -= 1;
        let code = inner.faults.revoke_fail_status.unwrap_or(503);
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return error(status, "simulated revoke failure");
    }
    let before = inner.live.len();
    inner.live.retain(|k| k.id != id);
    if inner.live.len() == before {
        return error(StatusCode::NOT_FOUND, "no live key with that id");
    }
    inner.revokes += 1;
    StatusCode::NO_CONTENT.into_response()
}

async fn auth_check(State(v): State<Vendor>, headers: HeaderMap) -> Response {
    let presented = headers
        .get("x-api-key")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let mut inner = v.lock();
    let found = inner
        .live
        .iter()
        .find(|k| {
            !presented.is_empty()
                && bool::from(
                    presented
                        .as_bytes()
                        .ct_eq(k.secret.expose_secret().as_bytes()),
                )
        })
        .map(|k| k.id.clone());
    match found {
        Some(id) => {
            inner.auth_ok += 1;
            Json(json!({ "key_id": id })).into_response()
        }
        None => {
            inner.auth_failed += 1;
            error(StatusCode::UNAUTHORIZED, "invalid API key")
        }
    }
}

async fn sim_state(State(v): State<Vendor>) -> Json<VendorState> {
    let inner = v.lock();
    Json(VendorState {
        live: inner
            .live
            .iter()
            .map(|k| VendorKey {
                id: k.id.clone(),
                name: k.name.clone(),
                fingerprint: fingerprint(&k.secret),
            })
            .collect(),
        creates: inner.creates,
        revokes: inner.revokes,
        auth_ok: inner.auth_ok,
        auth_failed: inner.auth_failed,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsRequest {
    create: Option<CallFaults>,
    revoke: Option<CallFaults>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallFaults {
    fail_next: Option<u64>,
    status: Option<u16>,
    lose_next: Option<u64>,
    delay_ms: Option<u64>,
}

/// Sets the faults named in the body; the others stay as they are.
async fn sim_faults(State(v): State<Vendor>, body: axum::body::Bytes) -> Response {
    let req: FaultsRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad faults: {e}")),
    };
    let mut inner = v.lock();
    let f = &mut inner.faults;
    if let Some(c) = req.create {
        f.create_fail_next = c.fail_next.unwrap_or(f.create_fail_next);
        f.create_fail_status = c.status.or(f.create_fail_status);
        f.create_lose_next = c.lose_next.unwrap_or(f.create_lose_next);
        f.create_delay_ms = c.delay_ms.unwrap_or(f.create_delay_ms);
    }
    if let Some(r) = req.revoke {
        f.revoke_fail_next = r.fail_next.unwrap_or(f.revoke_fail_next);
        f.revoke_fail_status = r.status.or(f.revoke_fail_status);
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn sim_reset(State(v): State<Vendor>) -> Response {
    let mut inner = v.lock();
    inner.faults = Faults::default();
    inner.creates = 0;
    inner.revokes = 0;
    inner.auth_ok = 0;
    inner.auth_failed = 0;
    StatusCode::NO_CONTENT.into_response()
}

/// Test oracle: every secret ever issued, oldest first. Deliberately returns secrets.
async fn sim_issued(State(v): State<Vendor>) -> Response {
    let inner = v.lock();
    let list: Vec<_> = inner
        .issued
        .iter()
        .map(|(id, s)| json!({"key_id": id, "secret": s.expose_secret()}))
        .collect();
    Json(json!({ "secrets": list })).into_response()
}

/// Parses a `--seed NAME=FILE` flag's value.
pub fn parse_seed(text: &str) -> Result<(String, std::path::PathBuf), String> {
    let (name, file) = text
        .split_once('=')
        .ok_or_else(|| format!("--seed {text:?}: expected NAME=FILE"))?;
    if name.is_empty() || file.is_empty() {
        return Err(format!("--seed {text:?}: expected NAME=FILE"));
    }
    Ok((name.to_string(), file.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_name_equals_file() {
        assert_eq!(
            parse_seed("billing=/tmp/s").unwrap(),
            ("billing".to_string(), "/tmp/s".into())
        );
        assert!(parse_seed("billing").is_err());
        assert!(parse_seed("=x").is_err());
    }

    #[test]
    fn every_live_key_authenticates_until_revoked() {
        let mut inner = Inner::default();
        let a = inner.add("k", Secret::from("one".to_string())).id.clone();
        inner.add("k", Secret::from("two".to_string()));
        assert_eq!(inner.live.len(), 2);
        inner.live.retain(|k| k.id != a);
        assert_eq!(inner.live.len(), 1);
        assert_eq!(inner.issued.len(), 2, "the oracle keeps every secret");
    }
}
