//! The portal simulator: the `aos` contract (docs/portal-api.md) over one account's one key, plus
//! the `/_sim/` control endpoints (state, request counters, faults, out-of-band rotation, reset) and the
//! leak-test oracle `GET /_sim/issued-secrets`.
//!
//! [`Fleet`] serves many such accounts side by side, account `i` under the path prefix `/a/<i>` (its
//! contract at `/a/<i>/v1/...`, its controls at `/a/<i>/_sim/...`), with totals at `/_sim/counters`:
//! an `aos` provider's `base_url` keeps its path, so one process stands in for a fleet of portals
//! when keyrotd is measured with thousands of keys.
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

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
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

use super::{Conn, FleetAccount, FleetCounters, PortalCounters, PortalState};
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
    /// Every request that reached a contract route, answered in any way.
    counters: PortalCounters,
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
        Portal::account(
            Arc::new(options.management_token),
            options.account_id,
            options.seed_secret,
        )
    }

    /// One account; the accounts of a [`Fleet`] share their management token.
    fn account(token: Arc<Secret>, account_id: String, seed_secret: Option<Secret>) -> Portal {
        let secret = seed_secret.unwrap_or_else(new_secret);
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
            counters: PortalCounters::default(),
            faults: Faults::default(),
        };
        Portal {
            token,
            account_id: account_id.into(),
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
        account_routes("").with_state(self)
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

    fn state(&self) -> PortalState {
        let inner = self.lock();
        PortalState {
            key_id: inner.key.key_id.clone(),
            fingerprint: fingerprint(&inner.key.secret),
            regenerations: inner.regenerations,
            out_of_band_rotations: inner.out_of_band_rotations,
            auth_ok: inner.auth_ok,
            auth_failed: inner.auth_failed,
        }
    }

    /// Clears faults and counters; keeps the key.
    fn reset(&self) {
        let mut inner = self.lock();
        inner.faults = Faults::default();
        inner.regenerations = 0;
        inner.out_of_band_rotations = 0;
        inner.auth_ok = 0;
        inner.auth_failed = 0;
        inner.counters = PortalCounters::default();
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

/// The contract's routes and one account's `/_sim/` controls under `prefix` (empty for the
/// single-account portal, `/a/{account}` in a fleet). The handlers find their account with [`Account`].
fn account_routes<S>(prefix: &str) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    Account: FromRequestParts<S>,
{
    let sim = Router::new()
        .route(&format!("{prefix}/_sim/state"), get(sim_state))
        .route(&format!("{prefix}/_sim/counters"), get(sim_counters))
        .route(&format!("{prefix}/_sim/faults"), post(sim_faults))
        .route(&format!("{prefix}/_sim/rotate"), post(sim_rotate))
        .route(&format!("{prefix}/_sim/reset"), post(sim_reset))
        .route(
            &format!("{prefix}/_sim/issued-secrets"),
            get(sim_issued_secrets),
        )
        .route_layer(axum::middleware::from_fn(super::loopback_only));
    Router::new()
        .route(&format!("{prefix}/v1/api-keys/current"), get(current))
        .route(
            &format!("{prefix}/v1/api-keys/regenerate"),
            post(regenerate),
        )
        .route(&format!("{prefix}/v1/auth/check"), get(auth_check))
        .merge(sim)
}

/// The account a request is for: the portal itself, or in a [`Fleet`] the one its path names.
pub struct Account(Portal);

impl FromRequestParts<Portal> for Account {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_: &mut Parts, p: &Portal) -> Result<Self, Self::Rejection> {
        Ok(Account(p.clone()))
    }
}

impl FromRequestParts<Fleet> for Account {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, fleet: &Fleet) -> Result<Self, Self::Rejection> {
        let unknown = || error(StatusCode::NOT_FOUND, "unknown account");
        let Path(i) = Path::<usize>::from_request_parts(parts, fleet)
            .await
            .map_err(|_| unknown())?;
        fleet
            .accounts
            .get(i)
            .cloned()
            .map(Account)
            .ok_or_else(unknown)
    }
}

async fn current(Account(p): Account, headers: HeaderMap) -> Response {
    let mut inner = p.lock();
    inner.counters.status += 1;
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
    Account(p): Account,
    Extension(conn): Extension<Conn>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (lose, delay, answer) = {
        let mut inner = p.lock();
        inner.counters.regenerate += 1;
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

async fn auth_check(Account(p): Account, headers: HeaderMap) -> Response {
    let presented = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut inner = p.lock();
    inner.counters.auth_check += 1;
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

async fn sim_state(Account(p): Account) -> Json<PortalState> {
    Json(p.state())
}

async fn sim_counters(Account(p): Account) -> Json<PortalCounters> {
    Json(p.lock().counters)
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
async fn sim_faults(Account(p): Account, body: axum::body::Bytes) -> Response {
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

async fn sim_rotate(Account(p): Account) -> Response {
    let mut inner = p.lock();
    let (key_id, _, _) = Portal::rotate(&mut inner, "user:portal-ui");
    inner.out_of_band_rotations += 1;
    Json(json!({ "key_id": key_id })).into_response()
}

async fn sim_reset(Account(p): Account) -> Response {
    p.reset();
    StatusCode::NO_CONTENT.into_response()
}

/// Test oracle: every secret ever issued, oldest first. Deliberately returns secrets.
async fn sim_issued_secrets(Account(p): Account) -> Response {
    let inner = p.lock();
    let list: Vec<_> = inner
        .issued
        .iter()
        .map(|(id, s)| json!({"key_id": id, "secret": s.expose_secret()}))
        .collect();
    Json(json!({ "secrets": list })).into_response()
}

/// How a fleet of accounts is set up (`keyrotd-sim portal --accounts N`).
pub struct FleetOptions {
    /// The management token of every account.
    pub management_token: Secret,
    /// How many accounts: `0..accounts`, account `i` reporting `acct_<i>`.
    pub accounts: usize,
}

/// Many independent accounts, one key each, account `i` under `/a/<i>`. Each behaves exactly as a
/// single-account [`Portal`] (faults, counters and controls are its own).
#[derive(Clone)]
pub struct Fleet {
    accounts: Arc<[Portal]>,
}

impl Fleet {
    pub fn new(options: FleetOptions) -> Fleet {
        let token = Arc::new(options.management_token);
        let accounts = (0..options.accounts)
            .map(|i| Portal::account(token.clone(), format!("acct_{i}"), None))
            .collect();
        Fleet { accounts }
    }

    /// Every account's routes under `/a/{account}`, and the fleet's own `/_sim/` controls.
    pub fn router(self) -> Router {
        let sim = Router::new()
            .route("/_sim/counters", get(fleet_counters))
            .route("/_sim/accounts", get(fleet_accounts))
            .route("/_sim/reset", post(fleet_reset))
            .route_layer(axum::middleware::from_fn(super::loopback_only));
        account_routes("/a/{account}").merge(sim).with_state(self)
    }

    fn totals(&self) -> FleetCounters {
        let mut t = FleetCounters {
            accounts: self.accounts.len(),
            ..FleetCounters::default()
        };
        for p in self.accounts.iter() {
            let inner = p.lock();
            t.requests.add(&inner.counters);
            t.regenerations += inner.regenerations;
            t.out_of_band_rotations += inner.out_of_band_rotations;
            t.auth_ok += inner.auth_ok;
            t.auth_failed += inner.auth_failed;
        }
        t
    }
}

async fn fleet_counters(State(f): State<Fleet>) -> Json<FleetCounters> {
    Json(f.totals())
}

async fn fleet_accounts(State(f): State<Fleet>) -> Json<Vec<FleetAccount>> {
    let list = f
        .accounts
        .iter()
        .enumerate()
        .map(|(account, p)| {
            let inner = p.lock();
            FleetAccount {
                account,
                key_id: inner.key.key_id.clone(),
                regenerations: inner.regenerations,
                requests: inner.counters,
            }
        })
        .collect();
    Json(list)
}

async fn fleet_reset(State(f): State<Fleet>) -> Response {
    for p in f.accounts.iter() {
        p.reset();
    }
    StatusCode::NO_CONTENT.into_response()
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

    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(super::super::serve(listener, router));
        url
    }

    async fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> T {
        let r = reqwest::get(url).await.unwrap();
        assert!(r.status().is_success(), "GET {url}: {}", r.status());
        r.json().await.unwrap()
    }

    /// Three accounts: a regenerate through account 1's prefix rotates account 1's key only, with its
    /// own management checks and faults; its counters and the fleet's totals count every request that
    /// reached a contract route; an account beyond the fleet is a 404.
    #[tokio::test]
    async fn a_fleet_serves_independent_accounts_under_path_prefixes() {
        let url = serve(
            Fleet::new(FleetOptions {
                management_token: Secret::from("mgmt".to_string()),
                accounts: 3,
            })
            .router(),
        )
        .await;
        let http = reqwest::Client::new();
        let before: Vec<FleetAccount> = get_json(&format!("{url}/_sim/accounts")).await;
        assert_eq!(before.len(), 3);

        let status: serde_json::Value = http
            .get(format!("{url}/a/1/v1/api-keys/current"))
            .bearer_auth("mgmt")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(status["account_id"], "acct_1");
        assert_eq!(status["key_id"], before[1].key_id.as_str());

        http.post(format!("{url}/a/2/_sim/faults"))
            .body(r#"{"rate_limit_next": 1}"#)
            .send()
            .await
            .unwrap();
        let regenerate = |i: usize| {
            http.post(format!("{url}/a/{i}/v1/api-keys/regenerate"))
                .bearer_auth("mgmt")
                .body("{}")
                .send()
        };
        let answer: serde_json::Value = regenerate(1).await.unwrap().json().await.unwrap();
        assert_eq!(
            regenerate(2).await.unwrap().status(),
            429,
            "account 2's fault is its own"
        );
        let refused = http
            .post(format!("{url}/a/0/v1/api-keys/regenerate"))
            .bearer_auth("wrong")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);

        let after: Vec<FleetAccount> = get_json(&format!("{url}/_sim/accounts")).await;
        assert_eq!(after[1].key_id, answer["key_id"].as_str().unwrap());
        assert_eq!(after[0].key_id, before[0].key_id, "account 0 kept its key");
        assert_eq!(after[2].key_id, before[2].key_id, "account 2 kept its key");
        let one: PortalState = get_json(&format!("{url}/a/1/_sim/state")).await;
        assert_eq!(
            (one.key_id.as_str(), one.regenerations),
            (after[1].key_id.as_str(), 1)
        );
        let one: PortalCounters = get_json(&format!("{url}/a/1/_sim/counters")).await;
        assert_eq!((one.status, one.regenerate, one.auth_check), (1, 1, 0));

        let totals: FleetCounters = get_json(&format!("{url}/_sim/counters")).await;
        assert_eq!(totals.accounts, 3);
        assert_eq!(
            totals.requests.regenerate, 3,
            "refused ones count as requests"
        );
        assert_eq!(totals.requests.total(), 4);
        assert_eq!(totals.regenerations, 1, "only one rotated");

        let missing = http
            .get(format!("{url}/a/3/v1/api-keys/current"))
            .bearer_auth("mgmt")
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);

        http.post(format!("{url}/_sim/reset")).send().await.unwrap();
        let totals: FleetCounters = get_json(&format!("{url}/_sim/counters")).await;
        assert_eq!(totals.requests.total(), 0);
        let kept: Vec<FleetAccount> = get_json(&format!("{url}/_sim/accounts")).await;
        assert_eq!(kept[1].key_id, after[1].key_id, "a reset is not a rotation");
    }

    /// The single-account portal keeps its routes and gains the same counters.
    #[tokio::test]
    async fn the_single_account_portal_counts_its_requests() {
        let url = serve(
            Portal::new(PortalOptions {
                management_token: Secret::from("mgmt".to_string()),
                account_id: "acct_42".into(),
                seed_secret: Some(Secret::from("seed".to_string())),
            })
            .router(),
        )
        .await;
        let http = reqwest::Client::new();
        let ok = http
            .get(format!("{url}/v1/auth/check"))
            .header("x-api-key", "seed")
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
        http.get(format!("{url}/v1/api-keys/current"))
            .send()
            .await
            .unwrap();
        let c: PortalCounters = get_json(&format!("{url}/_sim/counters")).await;
        assert_eq!((c.status, c.regenerate, c.auth_check), (1, 0, 1));
        let state: PortalState = get_json(&format!("{url}/_sim/state")).await;
        assert_eq!(state.auth_ok, 1);
    }
}
