//! The dependent simulator: a service that uses the key. On `POST /-/reload` it reads the key from its
//! source (a file, a Vault KV v2 field, an AWS secret); from then on it calls the portal's auth check
//! with it every probe interval, and `GET /health/upstream` (its verify endpoint) answers 200 while the
//! key authenticates and 401 when it does not. `GET /key` reports the fingerprint of the key it uses
//! (`{"fingerprint": "..."}`, a dual key's `confirm` endpoint). `/_sim/` shows what it saw and
//! injects faults: `ignore_reload` (it never picks up a new key), `unhealthy_after_reload` (a canary
//! that cannot work with the new key: its health answers 401 after its next reload).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Value, json};
use url::Url;

use super::{DependentState, RecordedRequest};
use crate::secret::{Secret, fingerprint};

/// Where the dependent reads its key on reload.
pub enum Source {
    /// The whole file is the key (one trailing newline stripped).
    File(PathBuf),
    /// `GET <addr>/v1/<mount>/data/<path>`, field `<field>` of the data.
    Vault {
        addr: Url,
        mount: String,
        path: String,
        field: String,
        token: Secret,
    },
    /// `GetSecretValue(secret_id)` with the standard AWS environment; `field` of a JSON SecretString,
    /// or the whole string.
    Aws {
        endpoint: Option<String>,
        secret_id: String,
        field: Option<String>,
    },
}

impl Source {
    async fn read(&self, http: &reqwest::Client) -> Result<Secret, String> {
        match self {
            Source::File(path) => {
                let mut text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| format!("cannot read {}: {}", path.display(), e.kind()))?;
                if text.ends_with('\n') {
                    text.pop();
                }
                non_empty(text)
            }
            Source::Vault {
                addr,
                mount,
                path,
                field,
                token,
            } => {
                let url = format!(
                    "{}/v1/{}/data/{}",
                    addr.as_str().trim_end_matches('/'),
                    mount.trim_matches('/'),
                    path.trim_matches('/')
                );
                let resp = http
                    .get(url)
                    .header("X-Vault-Token", token.expose_secret())
                    .send()
                    .await
                    .map_err(|e| format!("vault unreachable: {e}"))?;
                if !resp.status().is_success() {
                    return Err(format!("vault answered HTTP {}", resp.status().as_u16()));
                }
                let body: Value = resp
                    .json()
                    .await
                    .map_err(|_| "vault answer is not JSON".to_string())?;
                match body.pointer(&format!("/data/data/{field}")) {
                    Some(Value::String(s)) => non_empty(s.clone()),
                    _ => Err(format!("vault secret has no string field {field}")),
                }
            }
            Source::Aws {
                endpoint,
                secret_id,
                field,
            } => {
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
                if let Some(ep) = endpoint {
                    loader = loader.endpoint_url(ep);
                }
                let conf = loader.load().await;
                let client = aws_sdk_secretsmanager::Client::new(&conf);
                let out = client
                    .get_secret_value()
                    .secret_id(secret_id)
                    .send()
                    .await
                    .map_err(|e| format!("GetSecretValue failed: {}", e.into_service_error()))?;
                let text = out
                    .secret_string()
                    .ok_or_else(|| "secret has no SecretString".to_string())?;
                match field {
                    None => non_empty(text.to_string()),
                    Some(f) => {
                        let v: Value = serde_json::from_str(text)
                            .map_err(|_| "SecretString is not a JSON object".to_string())?;
                        match v.get(f) {
                            Some(Value::String(s)) => non_empty(s.clone()),
                            _ => Err(format!("SecretString has no string field {f}")),
                        }
                    }
                }
            }
        }
    }
}

fn non_empty(s: String) -> Result<Secret, String> {
    if s.is_empty() {
        Err("the key source is empty".into())
    } else {
        Ok(Secret::from(s))
    }
}

/// How the simulator is set up (the `keyrotd-sim dependent` flags).
pub struct DependentOptions {
    /// The portal's base URL; it calls `<portal>/v1/auth/check`.
    pub portal: Url,
    pub source: Source,
    pub probe_interval: Duration,
    /// When set, reloads must carry `X-Keyrotd-Timestamp` (within `max_signature_age` of now) and a
    /// valid `X-Keyrotd-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
    pub signing_key: Option<Secret>,
    /// How far a reload's timestamp may be from this process's clock (default 5 minutes).
    pub max_signature_age: Duration,
}

#[derive(Default)]
struct Inner {
    key: Option<Secret>,
    reloads: u64,
    auth_ok: u64,
    auth_failed: u64,
    last_reload_body: Option<Value>,
    requests: Vec<RecordedRequest>,
    ignore_reload: bool,
    ignore_reload_next: u64,
    fail_reload_next: u64,
    unhealthy_after_reload: bool,
    unhealthy: bool,
}

#[derive(Clone)]
pub struct Dependent {
    options: Arc<DependentOptions>,
    http: reqwest::Client,
    inner: Arc<Mutex<Inner>>,
}

/// What one auth check against the portal said.
enum Upstream {
    Ok,
    Refused,
    Unavailable,
}

impl Dependent {
    pub fn new(options: DependentOptions) -> Result<Dependent, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Dependent {
            options: Arc::new(options),
            http,
            inner: Arc::new(Mutex::new(Inner::default())),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // See portal.rs: a poisoned lock still holds the best state we have.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the key once (best effort) and starts the probe loop. Call once, inside a runtime.
    pub async fn start_background(&self) {
        if let Ok(key) = self.options.source.read(&self.http).await {
            self.lock().key = Some(key);
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.options.probe_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.check_upstream().await;
            }
        });
    }

    /// Calls the portal's auth check with the current key and counts the result.
    async fn check_upstream(&self) -> Upstream {
        let Some(key) = self.lock().key.clone() else {
            return Upstream::Unavailable;
        };
        let url = format!(
            "{}/v1/auth/check",
            self.options.portal.as_str().trim_end_matches('/')
        );
        let resp = self
            .http
            .get(url)
            .header("X-API-Key", key.expose_secret())
            .send()
            .await;
        let outcome = match resp {
            Ok(r) if r.status().is_success() => Upstream::Ok,
            Ok(r) if matches!(r.status().as_u16(), 401 | 403) => Upstream::Refused,
            _ => Upstream::Unavailable,
        };
        let mut inner = self.lock();
        match outcome {
            Upstream::Ok => inner.auth_ok += 1,
            Upstream::Refused => inner.auth_failed += 1,
            Upstream::Unavailable => {}
        }
        outcome
    }

    pub fn router(self) -> Router {
        let sim = Router::new()
            .route("/_sim/state", get(sim_state))
            .route("/_sim/faults", post(sim_faults))
            .route("/_sim/requests", get(sim_requests))
            .route_layer(axum::middleware::from_fn(super::loopback_only));
        Router::new()
            .route("/-/reload", post(reload))
            .route("/health/upstream", get(health))
            .route("/key", get(key_fingerprint))
            .merge(sim)
            .with_state(self)
    }
}

/// A signed reload is checked as a dependent should check it: [`crate::notify::verify_signature`].
fn signature_check(
    key: &Secret,
    max_age: Duration,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), crate::notify::SignatureError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    crate::notify::verify_signature_within(
        key.expose_secret().as_bytes(),
        header(crate::notify::TIMESTAMP_HEADER),
        header(crate::notify::SIGNATURE_HEADER),
        body,
        now,
        max_age,
    )
}

async fn reload(
    State(d): State<Dependent>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let body_value = serde_json::from_slice::<Value>(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    let header_map: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let record = |d: &Dependent, status: StatusCode| {
        let mut inner = d.lock();
        inner.requests.push(RecordedRequest {
            body: body_value.clone(),
            headers: header_map.clone(),
            status: status.as_u16(),
        });
        if status.is_success() {
            inner.reloads += 1;
            inner.last_reload_body = Some(body_value.clone());
        }
    };

    if let Some(key) = &d.options.signing_key
        && let Err(why) = signature_check(
            key,
            d.options.max_signature_age,
            &headers,
            &body,
            chrono::Utc::now().timestamp(),
        )
    {
        record(&d, StatusCode::UNAUTHORIZED);
        return (StatusCode::UNAUTHORIZED, format!("{why}\n")).into_response();
    }
    {
        let mut inner = d.lock();
        if inner.fail_reload_next > 0 {
            inner.fail_reload_next -= 1;
            drop(inner);
            record(&d, StatusCode::SERVICE_UNAVAILABLE);
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "simulated reload failure\n",
            )
                .into_response();
        }
        if inner.ignore_reload || inner.ignore_reload_next > 0 {
            inner.ignore_reload_next = inner.ignore_reload_next.saturating_sub(1);
            drop(inner);
            record(&d, StatusCode::OK);
            return (StatusCode::OK, "reloaded\n").into_response();
        }
    }
    match d.options.source.read(&d.http).await {
        Ok(key) => {
            {
                let mut inner = d.lock();
                inner.key = Some(key);
                inner.unhealthy |= inner.unhealthy_after_reload;
            }
            record(&d, StatusCode::OK);
            (StatusCode::OK, "reloaded\n").into_response()
        }
        Err(e) => {
            record(&d, StatusCode::SERVICE_UNAVAILABLE);
            (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
        }
    }
}

async fn health(State(d): State<Dependent>) -> Response {
    if d.lock().unhealthy {
        return (
            StatusCode::UNAUTHORIZED,
            "upstream refuses what this service does with the new key\n",
        )
            .into_response();
    }
    match d.check_upstream().await {
        Upstream::Ok => (StatusCode::OK, "upstream ok\n").into_response(),
        Upstream::Refused => {
            (StatusCode::UNAUTHORIZED, "upstream refused our key\n").into_response()
        }
        Upstream::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no key or portal unreachable\n",
        )
            .into_response(),
    }
}

/// The fingerprint of the key in use (never the key): what a dual key's `confirm` reads.
async fn key_fingerprint(State(d): State<Dependent>) -> Json<Value> {
    let fp = d.lock().key.as_ref().map(fingerprint);
    Json(json!({ "fingerprint": fp }))
}

async fn sim_state(State(d): State<Dependent>) -> Json<DependentState> {
    let inner = d.lock();
    Json(DependentState {
        reloads: inner.reloads,
        fingerprint: inner.key.as_ref().map(fingerprint),
        auth_ok: inner.auth_ok,
        auth_failed: inner.auth_failed,
        last_reload_body: inner.last_reload_body.clone(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsRequest {
    ignore_reload: Option<bool>,
    /// Answer the next N reloads 200 without reading the key (then reload for real again).
    ignore_reload_next: Option<u64>,
    fail_reload_next: Option<u64>,
    /// After its next reload, `/health/upstream` answers 401 (a canary that fails with the new key).
    unhealthy_after_reload: Option<bool>,
}

async fn sim_faults(State(d): State<Dependent>, body: axum::body::Bytes) -> Response {
    let req: FaultsRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad faults: {e}\n")).into_response(),
    };
    let mut inner = d.lock();
    if let Some(b) = req.ignore_reload {
        inner.ignore_reload = b;
    }
    if let Some(n) = req.ignore_reload_next {
        inner.ignore_reload_next = n;
    }
    if let Some(n) = req.fail_reload_next {
        inner.fail_reload_next = n;
    }
    if let Some(b) = req.unhealthy_after_reload {
        inner.unhealthy_after_reload = b;
        if !b {
            inner.unhealthy = false;
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn sim_requests(State(d): State<Dependent>) -> Json<Value> {
    Json(json!({ "requests": d.lock().requests.clone() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_must_be_signed_recently() {
        let key = Secret::from("hook-key".to_string());
        let body = br#"{"key":"billing"}"#;
        let now = 1_700_000_000;
        let signed = |ts: i64| {
            let mut h = HeaderMap::new();
            h.insert("x-keyrotd-timestamp", ts.to_string().parse().unwrap());
            h.insert(
                "x-keyrotd-signature",
                crate::notify::signature(b"hook-key", ts, body)
                    .parse()
                    .unwrap(),
            );
            h
        };
        let age = crate::notify::MAX_SIGNATURE_AGE;
        assert_eq!(signature_check(&key, age, &signed(now), body, now), Ok(()));
        assert!(signature_check(&key, age, &signed(now), b"{}", now).is_err());
        assert!(signature_check(&key, age, &HeaderMap::new(), body, now).is_err());
        // A request captured and replayed six minutes later is refused.
        assert_eq!(
            signature_check(&key, age, &signed(now), body, now + 360),
            Err(crate::notify::SignatureError::Stale)
        );
        // ... unless the dependent was told to allow more (a test stack on a fixed clock).
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(
            signature_check(&key, day, &signed(now), body, now + 360),
            Ok(())
        );
    }
}
