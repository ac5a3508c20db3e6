//! How the Vault store talks to Vault: vaultrs's endpoint and response types, sent with keyrotd's own
//! request decoration through keyrotd's reqwest client, whose answers are read up to [`MAX_ANSWER`]
//! (rustify's own client reads every body whole), and the one function that turns any failure into a
//! [`StoreError`].
//!
//! Why not vaultrs's `VaultClient` and its `api::exec_*` helpers: its middleware adds the token as
//! an ordinary header (`HeaderValue::from_str(token).unwrap()`, which also panics on a token holding
//! a control character), and its settings builder fills every unset field from `VAULT_TOKEN`,
//! `VAULT_SKIP_VERIFY`, `VAULT_CACERT`... Here the endpoints are the same, the client is ours
//! ([`crate::http_client`]: timeouts, no redirects, the store's CA and client certificate), the
//! token header is marked sensitive, and nothing is read from the environment.
//!
//! Errors: rustify's body-carrying variants (`ServerResponseError`, `ResponseParseError`) hold the
//! response body, which for a KV read is the secret, and a serde error in a source chain quotes the
//! offending value. [`Wire::error`] is the only place that looks at them: it keeps the HTTP status, a
//! fixed phrase for the few Vault conditions it recognises, and transport causes from reqwest. It
//! never formats a vaultrs or rustify error, its `Debug` or its sources.

use std::collections::HashMap;

use rustify::endpoint::{Endpoint, EndpointResult};
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use rustify::errors::ClientError as RestError;
use serde::Deserialize;
use serde_json::Value;

use crate::http_client::{chain, sensitive_header};
use crate::provider::http::wire::{BodyError, read_capped};
use crate::secret::Secret;
use crate::store::{StoreError, StoreErrorKind};

/// The largest answer read from Vault. KV values are small (and Vault's integrated storage keeps an
/// entry under 1 MiB); twice that leaves room for the JSON around the largest one.
pub const MAX_ANSWER: usize = 2 << 20;

/// The Vault HTTP client of one store. Holds no token: each request is given the one in force.
pub struct Wire {
    store: String,
    /// `address` as configured, for messages.
    address: String,
    /// The path of `address` (without a trailing slash), kept in front of `/v1`.
    prefix: String,
    namespace: Option<String>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("store", &self.store)
            .field("address", &self.address)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Wire {
    pub fn new(
        store: &str,
        address: &url::Url,
        namespace: Option<String>,
        http: reqwest::Client,
    ) -> Wire {
        let base = address.as_str().trim_end_matches('/').to_string();
        Wire {
            store: store.to_string(),
            prefix: address.path().trim_end_matches('/').to_string(),
            address: base.clone(),
            namespace,
            http,
        }
    }

    /// Sends `endpoint` with `token` (none for a login) and returns the raw answer; any non-2xx
    /// status is `Err(ServerResponseError)`.
    pub async fn send<E: Endpoint>(
        &self,
        endpoint: &E,
        token: Option<&Secret>,
    ) -> Result<EndpointResult<E::Response>, RestError> {
        let mut req = endpoint.request(&self.address)?;
        self.decorate(&mut req, token)?;
        let resp = self.execute(req).await?;
        Ok(EndpointResult::new(resp, E::RESPONSE_BODY_TYPE))
    }

    /// What rustify's reqwest client does, but with the answer's body read up to [`MAX_ANSWER`]: Vault's
    /// answers are small, and a server (or something in front of it) that sends more gets an error,
    /// not all of keyrotd's memory. Any non-2xx status is `Err(ServerResponseError)`.
    async fn execute(
        &self,
        req: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, RestError> {
        let request = reqwest::Request::try_from(req)
            .map_err(|source| RestError::ReqwestBuildError { source })?;
        let (url, method) = (request.url().to_string(), request.method().to_string());
        let response = self
            .http
            .execute(request)
            .await
            .map_err(|e| RestError::RequestError {
                source: e.into(),
                url,
                method,
            })?;
        let code = response.status().as_u16();
        let mut builder = http::Response::builder().status(code);
        for (name, value) in response.headers() {
            builder = builder.header(name, value);
        }
        let body = read_capped(response, MAX_ANSWER)
            .await
            .map_err(|e| RestError::ResponseError { source: e.into() })?;
        if !rustify::client::HTTP_SUCCESS_CODES.contains(&code) {
            return Err(RestError::ServerResponseError {
                code,
                content: String::from_utf8(body.to_vec()).ok(),
            });
        }
        builder
            .body(body.to_vec())
            .map_err(|e| RestError::ResponseError { source: e.into() })
    }

    /// `/v1` after the address's own path, Vault's request marker, the namespace and the token (as
    /// a sensitive header).
    fn decorate(
        &self,
        req: &mut http::Request<Vec<u8>>,
        token: Option<&Secret>,
    ) -> Result<(), RestError> {
        let uri = req.uri().clone();
        let rest = uri.path().strip_prefix(&self.prefix).unwrap_or(uri.path());
        // rustify joins the address and the endpoint path with an empty segment between them;
        // Vault would answer a `//` path with a redirect, so keep only the non-empty segments.
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let mut path = format!("{}/v1/{}", self.prefix, segments.join("/"));
        if let Some(q) = uri.query() {
            path.push('?');
            path.push_str(q);
        }
        let mut parts = uri.into_parts();
        parts.path_and_query = Some(
            path.parse()
                .map_err(|e| RestError::UrlBuildError { source: e })?,
        );
        *req.uri_mut() = http::Uri::from_parts(parts).map_err(|e| RestError::GenericError {
            source: anyhow::Error::new(e),
        })?;
        let headers = req.headers_mut();
        headers.insert("X-Vault-Request", http::HeaderValue::from_static("true"));
        if let Some(ns) = &self.namespace {
            let value = http::HeaderValue::from_str(ns).map_err(|_| RestError::GenericError {
                source: anyhow::anyhow!("namespace is not a valid header value"),
            })?;
            headers.insert("X-Vault-Namespace", value);
        }
        if let Some(token) = token {
            let value = sensitive_header("", token).ok_or_else(|| RestError::GenericError {
                source: anyhow::anyhow!("token is not a valid header value"),
            })?;
            headers.insert("X-Vault-Token", value);
        }
        Ok(())
    }

    /// A failure of `what` (e.g. "write secret/data/apps/x") as a [`StoreError`] of the right kind.
    pub fn error(&self, target: &str, what: &str, e: &RestError) -> StoreError {
        let (kind, message) = match e {
            RestError::ServerResponseError { code, content } => {
                let errors = vault_errors(content.as_deref());
                let (kind, phrase) = classify(*code, &errors);
                let hint = if kind == StoreErrorKind::Auth {
                    " (token invalid, expired, or lacking permission)"
                } else {
                    ""
                };
                let phrase = phrase.map(|p| format!(": {p}")).unwrap_or_default();
                (
                    kind,
                    format!("{what} failed with HTTP {code}{phrase}{hint}"),
                )
            }
            RestError::RequestError { source, .. } => (
                StoreErrorKind::Transient,
                format!(
                    "{what}: cannot reach Vault at {}: {}",
                    self.address,
                    transport(source)
                ),
            ),
            RestError::ResponseError { source } => (
                StoreErrorKind::Transient,
                format!(
                    "{what}: Vault's answer was interrupted: {}",
                    transport(source)
                ),
            ),
            RestError::ResponseParseError { source, .. } => (
                parse_kind(source),
                format!("{what}: Vault's answer is not the JSON keyrotd expects"),
            ),
            RestError::ResponseConversionError { .. } => (
                StoreErrorKind::Permanent,
                format!("{what}: Vault's answer is not UTF-8 text"),
            ),
            _ => (
                StoreErrorKind::Permanent,
                format!(
                    "{what}: cannot build the request (check the store's address, namespace and token)"
                ),
            ),
        };
        StoreError {
            kind,
            store: self.store.clone(),
            target: target.to_string(),
            message,
        }
    }
}

/// Whether a 400 answer is a lost check-and-set.
pub fn is_cas_mismatch(e: &RestError) -> bool {
    matches!(e, RestError::ServerResponseError { code: 400, content }
        if vault_errors(content.as_deref()).iter().any(|m| m.contains("check-and-set")))
}

/// The HTTP status of a request's error answer, if it failed with one.
pub fn status_of<T>(result: &Result<T, RestError>) -> Option<u16> {
    result.as_ref().err().and_then(status)
}

/// The metadata in Vault's 404 for a path whose latest version is deleted or destroyed: KV v2
/// answers it with the version's metadata so that a writer can still check-and-set.
pub fn deleted_version(
    e: &RestError,
) -> Option<vaultrs::api::kv2::responses::SecretVersionMetadata> {
    #[derive(Deserialize)]
    struct Reply {
        data: Option<Inner>,
    }
    #[derive(Deserialize)]
    struct Inner {
        metadata: Option<vaultrs::api::kv2::responses::SecretVersionMetadata>,
    }
    let RestError::ServerResponseError {
        code: 404,
        content: Some(c),
    } = e
    else {
        return None;
    };
    serde_json::from_str::<Reply>(c).ok()?.data?.metadata
}

/// The HTTP status of a Vault error answer, if it is one.
pub fn status(e: &RestError) -> Option<u16> {
    match e {
        RestError::ServerResponseError { code, .. } => Some(*code),
        _ => None,
    }
}

/// Vault's `errors` strings, when the body is Vault's error JSON. Used to recognise a condition,
/// never shown.
fn vault_errors(content: Option<&str>) -> Vec<String> {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<String>,
    }
    content
        .and_then(|c| serde_json::from_str::<Errors>(c).ok())
        .map(|e| e.errors)
        .unwrap_or_default()
}

/// Conditions worth naming, found in Vault's `errors` strings, and the fixed words keyrotd uses for
/// them. Anything else is reported by its status alone: the strings can echo the request.
const KNOWN_CONDITIONS: &[(&str, &str)] = &[
    ("check-and-set", "check-and-set version mismatch"),
    ("permission denied", "permission denied"),
    ("sealed", "Vault is sealed"),
    ("invalid role or secret id", "invalid role_id or secret_id"),
    ("invalid secret id", "invalid role_id or secret_id"),
    ("invalid role id", "invalid role_id or secret_id"),
    ("missing client token", "missing client token"),
    ("invalid token", "invalid token"),
    ("bad token", "invalid token"),
    (
        "no handler for route",
        "no such mount or path (no handler for route)",
    ),
    ("standby", "Vault is a standby"),
    ("rate limit", "rate limited"),
];

/// The error kind of an HTTP status (with the recognised condition, for the message).
fn classify(code: u16, errors: &[String]) -> (StoreErrorKind, Option<&'static str>) {
    let lower: Vec<String> = errors.iter().map(|e| e.to_lowercase()).collect();
    let phrase = KNOWN_CONDITIONS
        .iter()
        .find(|(needle, _)| lower.iter().any(|e| e.contains(needle)))
        .map(|(_, phrase)| *phrase);
    let kind = match code {
        401 | 403 => StoreErrorKind::Auth,
        404 => StoreErrorKind::NotFound,
        400 if phrase == Some("check-and-set version mismatch") => StoreErrorKind::Conflict,
        // 412: a performance standby has not caught up yet; 429: rate limited; 5xx: sealed,
        // standby, overloaded or broken — all may clear on their own.
        412 | 429 | 500..=599 => StoreErrorKind::Transient,
        _ => StoreErrorKind::Permanent,
    };
    (kind, phrase)
}

/// A reqwest transport error's causes (connection refused, timeout, TLS: "invalid peer
/// certificate: UnknownIssuer"). These never hold a body.
fn transport(source: &anyhow::Error) -> String {
    if let Some(e) = source.downcast_ref::<BodyError>() {
        return e.to_string();
    }
    match source.downcast_ref::<reqwest::Error>() {
        Some(e) if e.is_timeout() => "timed out".to_string(),
        Some(e) => chain(e),
        None => "transport error".to_string(),
    }
}

/// A truncated answer may be a cut connection (transient); a well-formed one of the wrong shape
/// will be wrong again (permanent). Decided from serde's category, never from its text.
fn parse_kind(source: &anyhow::Error) -> StoreErrorKind {
    match source.downcast_ref::<serde_json::Error>() {
        Some(e) if e.is_eof() || e.is_io() => StoreErrorKind::Transient,
        _ => StoreErrorKind::Permanent,
    }
}

// ---- endpoints vaultrs lacks, reading only what keyrotd needs --------------------------------------

/// `GET auth/token/lookup-self`, keeping only the lifetime fields: vaultrs's own response type also
/// keeps `id`, the token itself.
pub struct LookupSelf;

#[derive(Debug, Clone, Deserialize)]
pub struct TokenLookup {
    /// Seconds left; 0 = never expires (root tokens).
    pub ttl: u64,
    #[serde(default)]
    pub renewable: Option<bool>,
    /// The TTL it is renewed to: `period` for a periodic token, else `creation_ttl`.
    #[serde(default)]
    pub creation_ttl: u64,
    #[serde(default)]
    pub period: Option<u64>,
    /// 0 = none; else no renewal takes it past `creation_time + explicit_max_ttl`.
    #[serde(default)]
    pub explicit_max_ttl: u64,
    #[serde(default)]
    pub creation_time: u64,
}

impl Endpoint for LookupSelf {
    type Response = TokenLookup;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        "auth/token/lookup-self".into()
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::GET
    }
}

/// `POST auth/token/renew-self` with no increment: the token is renewed to its own TTL or period.
pub struct RenewSelf;

/// The renewed lease: only its length and whether it can be renewed again.
#[derive(Debug, Clone, Deserialize)]
pub struct Renewed {
    pub auth: RenewedLease,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RenewedLease {
    pub lease_duration: u64,
    #[serde(default)]
    pub renewable: bool,
}

impl Endpoint for RenewSelf {
    type Response = Renewed;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        "auth/token/renew-self".into()
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::POST
    }
}

/// `POST sys/capabilities-self` for a few paths.
pub struct CapabilitiesSelf {
    pub paths: Vec<String>,
}

impl Endpoint for CapabilitiesSelf {
    type Response = HashMap<String, Value>;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        "sys/capabilities-self".into()
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::POST
    }

    fn body(&self) -> Result<Option<Vec<u8>>, RestError> {
        serde_json::to_vec(&serde_json::json!({ "paths": self.paths }))
            .map(Some)
            .map_err(|e| RestError::DataParseError { source: e.into() })
    }
}

/// The `data` of Vault's response envelope (vaultrs's `EndpointResult`).
pub fn data<T>(result: &EndpointResult<T>) -> Result<Option<T>, RestError>
where
    T: serde::de::DeserializeOwned + Send + Sync,
{
    Ok(result.wrap::<vaultrs::api::EndpointResult<T>>()?.data)
}

/// The secret in a login answer's `auth.client_token`, with its lease. Parsed with vaultrs's
/// `AuthInfo`; the token is wrapped before anything else can see it.
pub fn login_token(
    result: &EndpointResult<()>,
) -> Result<Option<(Secret, RenewedLease)>, RestError> {
    let reply = result.wrap::<vaultrs::api::EndpointResult<()>>()?;
    Ok(reply.auth.map(|a| {
        (
            Secret::from(a.client_token),
            RenewedLease {
                lease_duration: a.lease_duration,
                renewable: a.renewable,
            },
        )
    }))
}
