//! The portal simulator: the `aos` contract (docs/portal-api.md) over one account's one key, plus
//! the `/_sim/` control endpoints (state, faults, out-of-band rotation, reset) and the leak-test oracle
//! `GET /_sim/issued-secrets`.
//!
//! Semantics worth knowing when writing tests against it:
//! - `regenerate` rotates first and then applies `delay_ms`, so a client that times out during the
//!   delay has lost the new key (an ambiguous regenerate in which the portal did rotate);
//! - `lose_next` rotates and then resets the TCP connection before any response byte;
//! - `fail_next` answers the given status (default 503 for regenerate, 500 for status) without
//!   rotating;
//! - `rate_limit_next` consumes one per management request (status or regenerate) with a valid token;
//! - `html_errors` makes those simulated failures answer an HTML page, as a proxy in front of a portal
//!   might, that quotes the request's `Authorization` header back (so tests can show that keyrotd
//!   never repeats what an error body holds);
//! - `/_sim/reset` clears faults and counters and keeps the current key (a reset is not a rotation).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use rand::RngExt;
use rand::distr::Alphanumeric;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::{Conn, PortalState};
use crate::secret::{Secret, fingerprint};

/// How the simulator is set up (the `keyrotd-sim portal` flags).
pub struct PortalOptions {
    /// Compared with `Authorization: Bearer ...` on management calls.
    pub management_token: Secret,
    /// Reported as the key's account. Default `acct_42`.
    pub account_id: String,
    /// The initial key's secret; random when `None`.
    pub seed_secret: Option<Secret>,
}

#[derive(Default)]
struct Faults {
    regenerate_fail_next: u64,
    regenerate_fail_status: Option<u16>,
    regenerate_lose_next: u64,
    regenerate_delay_ms: u64,
    status_fail_next: u64,
    status_fail_status: Option<u16>,
    auth_check_fail_next: u64,
    auth_check_fail_status: Option<u16>,
    rate_limit_next: u64,
    inactive: bool,
    account_id: Option<String>,
    html_errors: bool,
}

struct Key {
    key_id: String,
    secret: Secret,
}

struct Inner {
    key: Key,
    first_generated: DateTime<Utc>,
    last_rotated: Option<DateTime<Utc>>,
    generated_by: String,
    /// Every (key id, secret) ever issued, in order; the oracle for leak tests.
    issued: Vec<(String, Secret)>,
    regenerations: u64,
    out_of_band_rotations: u64,
    auth_ok: u64,
    auth_failed: u64,
    faults: Faults,
}

/// The simulator's shared state.
#[derive(Clone)]
pub struct Portal {
    token: Arc<Secret>,
    account_id: Arc<str>,
    inner: Arc<Mutex<Inner>>,
}

/// A key id like `ak_01J9Z3...`: 10 characters of millisecond time then 16 random, Crockford base32.
pub fn new_key_id() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut ms = Utc::now().timestamp_millis().max(0) as u64;
    let mut time = [0u8; 10];
    for c in time.iter_mut().rev() {
        *c = ALPHABET[(ms % 32) as usize];
        ms /= 32;
    }
    let mut rng = rand::rng();
    let random: String = (0..16)
        .map(|_| ALPHABET[rng.random_range(0..32)] as char)
        .collect();
    format!("ak_{}{random}", String::from_utf8_lossy(&time))
}

/// `aos_sk_live_` + 40 random alphanumerics.
pub fn new_secret() -> Secret {
    let tail: String = rand::rng()
        .sample_iter(Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    Secret::from(format!("aos_sk_live_{tail}"))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn error(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "error": text }))).into_response()
}

/// The answer of a simulated failure: JSON, or with `html_errors` an HTML page quoting the request's
/// `Authorization` header.
fn fault(inner: &Inner, headers: &HeaderMap, status: StatusCode, text: &str) -> Response {
    if !inner.faults.html_errors {
        return error(status, text);
    }
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let page = format!(
        "<html><head><title>{status}</title></head><body><h1>{status}</h1><p>{text}</p>\
         <pre>Authorization: {auth}</pre></body></html>"
    );
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}

impl Portal {
    pub fn new(options: PortalOptions) -> Portal {
        let secret = options.seed_secret.unwrap_or_else(new_secret);
        let key_id = new_key_id();
        let inner = Inner {
            issued: vec![(key_id.clone(), secret.clone())],
            key: Key { key_id, secret },
            first_generated: Utc::now(),
            last_rotated: None,
            generated_by: "role:admin".into(),
            regenerations: 0,
            out_of_band_rotations: 0,
            auth_ok: 0,
            auth_failed: 0,
            faults: Faults::default(),
        };
        Portal {
            token: Arc::new(options.management_token),
            account_id: options.account_id.into(),
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a handler panicked mid-update; the simulator's state is still the best
        // answer we have.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The routes: the contract and `/_sim/`.
    pub fn router(self) -> Router {
        let sim = Router::new()
            .route("/_sim/state", get(sim_state))
            .route("/_sim/faults", post(sim_faults))
            .route("/_sim/rotate", post(sim_rotate))
            .route("/_sim/reset", post(sim_reset))
            .route("/_sim/issued-secrets", get(sim_issued_secrets))
            .route_layer(axum::middleware::from_fn(super::loopback_only));
        Router::new()
            .route("/v1/api-keys/current", get(current))
            .route("/v1/api-keys/regenerate", post(regenerate))
            .route("/v1/auth/check", get(auth_check))
            .merge(sim)
            .with_state(self)
    }

    /// The management token check, then the rate limit. `Some(response)` = answer that instead.
    fn management_gate(&self, headers: &HeaderMap, inner: &mut Inner) -> Option<Response> {
        let presented = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok: bool = presented
            .as_bytes()
            .ct_eq(self.token.expose_secret().as_bytes())
            .into();
        if !ok {
            return Some(error(StatusCode::UNAUTHORIZED, "invalid management token"));
        }
        if inner.faults.rate_limit_next > 0 {
            inner.faults.rate_limit_next -= 1;
            let mut r = fault(
                inner,
                headers,
                StatusCode::TOO_MANY_REQUESTS,
                "rate limited",
            );
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            return Some(r);
        }
        None
    }

    fn rotate(inner: &mut Inner, generated_by: &str) -> (String, Secret, DateTime<Utc>) {
        let key_id = new_key_id();
        let secret = new_secret();
        let now = Utc::now();
        inner.issued.push((key_id.clone(), secret.clone()));
        inner.key = Key {
            key_id: key_id.clone(),
            secret: secret.clone(),
        };
        inner.last_rotated = Some(now);
        inner.generated_by = generated_by.into();
        (key_id, secret, now)
    }
}

async fn current(State(p): State<Portal>, headers: HeaderMap) -> Response {
    let mut inner = p.lock();
    if let Some(r) = p.management_gate(&headers, &mut inner) {
        return r;
    }
    if inner.faults.status_fail_next > 0 {
        inner.faults.status_fail_next -= 1;
        let code = inner.faults.status_fail_status.unwrap_or(500);
        return fault(
            &inner,
            &headers,
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "simulated status failure",
        );
    }
    let account = inner
        .faults
        .account_id
        .clone()
        .unwrap_or_else(|| p.account_id.to_string());
    Json(json!({
        "active": !inner.faults.inactive,
        "key_id": inner.key.key_id,
        "account_id": account,
        "first_generated": rfc3339(inner.first_generated),
        "last_rotated": inner.last_rotated.map(rfc3339),
        "generated_by": inner.generated_by,
        "plan": "simulated",
    }))
    .into_response()
}

async fn regenerate(
    State(p): State<Portal>,
    Extension(conn): Extension<Conn>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (lose, delay, answer) = {
        let mut inner = p.lock();
        if let Some(r) = p.management_gate(&headers, &mut inner) {
            return r;
        }
        if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
            return error(StatusCode::BAD_REQUEST, "body must be JSON");
        }
        if inner.faults.regenerate_fail_next > 0 {
            inner.faults.regenerate_fail_next -= 1;
            let code = inner.faults.regenerate_fail_status.unwrap_or(503);
            return fault(
                &inner,
                &headers,
                StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "simulated regenerate failure",
            );
        }
        let (key_id, secret, now) = Portal::rotate(&mut inner, "role:rotation-bot");
        inner.regenerations += 1;
        let lose = inner.faults.regenerate_lose_next > 0;
        if lose {
            inner.faults.regenerate_lose_next -= 1;
        }
        let answer = json!({
            "key_id": key_id,
            "secret": secret.expose_secret(),
            "last_rotated": rfc3339(now),
            "generated_by": "role:rotation-bot",
        });
        (lose, inner.faults.regenerate_delay_ms, answer)
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if lose {
        conn.drop_connection();
        return std::future::pending().await;
    }
    (StatusCode::OK, Json(answer)).into_response()
}

async fn auth_check(State(p): State<Portal>, headers: HeaderMap) -> Response {
    let presented = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut inner = p.lock();
    if inner.faults.auth_check_fail_next > 0 {
        inner.faults.auth_check_fail_next -= 1;
        let code = inner.faults.auth_check_fail_status.unwrap_or(503);
        return fault(
            &inner,
            &headers,
            StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "simulated auth check failure",
        );
    }
    let ok: bool = !presented.is_empty()
        && bool::from(
            presented
                .as_bytes()
                .ct_eq(inner.key.secret.expose_secret().as_bytes()),
        );
    if ok {
        inner.auth_ok += 1;
        let account = inner
            .faults
            .account_id
            .clone()
            .unwrap_or_else(|| p.account_id.to_string());
        Json(json!({"account_id": account, "key_id": inner.key.key_id})).into_response()
    } else {
        inner.auth_failed += 1;
        error(StatusCode::UNAUTHORIZED, "invalid API key")
    }
}

async fn sim_state(State(p): State<Portal>) -> Json<PortalState> {
    let inner = p.lock();
    Json(PortalState {
        key_id: inner.key.key_id.clone(),
        fingerprint: fingerprint(&inner.key.secret),
        regenerations: inner.regenerations,
        out_of_band_rotations: inner.out_of_band_rotations,
        auth_ok: inner.auth_ok,
        auth_failed: inner.auth_failed,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsRequest {
    regenerate: Option<RegenerateFaults>,
    status: Option<StatusFaults>,
    auth_check: Option<StatusFaults>,
    rate_limit_next: Option<u64>,
    active: Option<bool>,
    account_id: Option<String>,
    html_errors: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegenerateFaults {
    fail_next: Option<u64>,
    status: Option<u16>,
    lose_next: Option<u64>,
    delay_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusFaults {
    fail_next: Option<u64>,
    status: Option<u16>,
}

fn valid_error_status(code: Option<u16>) -> bool {
    code.is_none_or(|c| (400..=599).contains(&c))
}

/// Sets the faults named in the body; the others are left as they are.
async fn sim_faults(State(p): State<Portal>, body: axum::body::Bytes) -> Response {
    let req: FaultsRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad faults: {e}")),
    };
    if !valid_error_status(req.regenerate.as_ref().and_then(|r| r.status))
        || !valid_error_status(req.status.as_ref().and_then(|s| s.status))
        || !valid_error_status(req.auth_check.as_ref().and_then(|s| s.status))
    {
        return error(StatusCode::BAD_REQUEST, "fault status must be 400..=599");
    }
    let mut inner = p.lock();
    let f = &mut inner.faults;
    if let Some(r) = req.regenerate {
        if let Some(n) = r.fail_next {
            f.regenerate_fail_next = n;
        }
        if r.status.is_some() {
            f.regenerate_fail_status = r.status;
        }
        if let Some(n) = r.lose_next {
            f.regenerate_lose_next = n;
        }
        if let Some(ms) = r.delay_ms {
            f.regenerate_delay_ms = ms;
        }
    }
    if let Some(s) = req.status {
        if let Some(n) = s.fail_next {
            f.status_fail_next = n;
        }
        if s.status.is_some() {
            f.status_fail_status = s.status;
        }
    }
    if let Some(a) = req.auth_check {
        if let Some(n) = a.fail_next {
            f.auth_check_fail_next = n;
        }
        if a.status.is_some() {
            f.auth_check_fail_status = a.status;
        }
    }
    if let Some(n) = req.rate_limit_next {
        f.rate_limit_next = n;
    }
    if let Some(a) = req.active {
        f.inactive = !a;
    }
    if let Some(acct) = req.account_id {
        f.account_id = Some(acct);
    }
    if let Some(h) = req.html_errors {
        f.html_errors = h;
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn sim_rotate(State(p): State<Portal>) -> Response {
    let mut inner = p.lock();
    let (key_id, _, _) = Portal::rotate(&mut inner, "user:portal-ui");
    inner.out_of_band_rotations += 1;
    Json(json!({ "key_id": key_id })).into_response()
}

async fn sim_reset(State(p): State<Portal>) -> Response {
    let mut inner = p.lock();
    inner.faults = Faults::default();
    inner.regenerations = 0;
    inner.out_of_band_rotations = 0;
    inner.auth_ok = 0;
    inner.auth_failed = 0;
    StatusCode::NO_CONTENT.into_response()
}

/// Test oracle: every secret ever issued, oldest first. Deliberately returns secrets.
async fn sim_issued_secrets(State(p): State<Portal>) -> Response {
    let inner = p.lock();
    let list: Vec<_> = inner
        .issued
        .iter()
        .map(|(id, s)| json!({"key_id": id, "secret": s.expose_secret()}))
        .collect();
    Json(json!({ "secrets": list })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_secrets_have_the_documented_shape() {
        let id = new_key_id();
        assert!(id.starts_with("ak_") && id.len() == 29, "{id}");
        let s = new_secret();
        let s = s.expose_secret();
        assert!(s.starts_with("aos_sk_live_") && s.len() == 52);
        assert!(s[12..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(new_key_id(), new_key_id());
    }
}
