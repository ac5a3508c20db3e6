//! The generic HTTP provider (docs/config.md#kind--http--any-vendor-described-field-by-field): a vendor
//! API described entirely by config — where to regenerate, where the new secret and key id are in the
//! response (JSON Pointers), and optionally how to read the key's status and check a secret.
//!
//! This module also owns [`wire`], the error classification both providers share: one function decides
//! whether a failed call is `Auth`, `RateLimited`, `Transient`, `Ambiguous` or `Permanent`, so the two
//! providers cannot drift apart on what the engine's retry policy sees.

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Client, Method};
use secrecy::ExposeSecret;
use serde_json::Value;

use super::{AuthIdentity, KeyStatus, ProviderError, Regenerated};
use crate::config::{HttpAuth, HttpProviderConfig};
use crate::secret::Secret;

pub struct HttpProvider {
    name: String,
    config: HttpProviderConfig,
    client: Client,
}

impl HttpProvider {
    /// Builds the HTTP client. Fails (Permanent) only if the config cannot describe a request: an
    /// invalid method or header name. URLs are validated per call because `{key_id}` is filled late.
    pub fn new(name: &str, config: &HttpProviderConfig) -> Result<Self, ProviderError> {
        let permanent = |message: String| ProviderError::Permanent {
            provider: name.to_string(),
            operation: "configure",
            message,
        };
        Method::from_bytes(config.regenerate.method.as_bytes()).map_err(|_| {
            permanent(format!(
                "invalid regenerate method {:?}",
                config.regenerate.method
            ))
        })?;
        if let Some(auth) = &config.auth {
            HeaderName::from_bytes(auth.header.as_bytes())
                .map_err(|_| permanent(format!("invalid auth header name {:?}", auth.header)))?;
        }
        if let Some(check) = &config.auth_check {
            HeaderName::from_bytes(check.header.as_bytes()).map_err(|_| {
                permanent(format!("invalid auth_check header name {:?}", check.header))
            })?;
        }
        let client = wire::client(config.timeout).map_err(|e| permanent(e.to_string()))?;
        Ok(Self {
            name: name.into(),
            config: config.clone(),
            client,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn expected_account(&self) -> Option<&str> {
        self.config.account_id.as_deref()
    }

    pub fn has_status(&self) -> bool {
        self.config.status.is_some()
    }

    pub fn has_auth_check(&self) -> bool {
        self.config.auth_check.is_some()
    }

    fn ctx(&self, operation: &'static str) -> wire::Ctx<'_> {
        wire::Ctx {
            provider: &self.name,
            operation,
        }
    }

    fn with_auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.config.auth {
            Some(auth) => req.header(auth_header_name(auth), auth_header_value(auth)),
            None => req,
        }
    }

    pub async fn status(&self) -> Result<KeyStatus, ProviderError> {
        let ctx = self.ctx("status");
        let Some(status) = &self.config.status else {
            return Err(ctx.permanent("this provider has no status section".into()));
        };
        let url = wire::parse_url(&ctx, &status.url)?;
        let resp = self
            .with_auth(self.client.get(url))
            .send()
            .await
            .map_err(|e| ctx.read_send_error(&e))?;
        let resp = ctx.check_management(resp, &self.secrets()).await?;
        let body: Value = resp
            .json()
            .await
            .map_err(|_| ctx.transient("status response is not JSON".into()))?;
        let key_id = pointer_id(&body, &status.key_id_pointer).ok_or_else(|| {
            ctx.transient(format!(
                "status response has no key id at {}",
                status.key_id_pointer
            ))
        })?;
        let last_rotated = match &status.last_rotated_pointer {
            Some(p) => pointer_time(&body, p).map_err(|m| ctx.transient(m))?,
            None => None,
        };
        let active = match &status.active_pointer {
            Some(p) => match body.pointer(p) {
                Some(Value::Bool(b)) => *b,
                _ => return Err(ctx.transient(format!("status response has no boolean at {p}"))),
            },
            None => true,
        };
        let account_id = status
            .account_id_pointer
            .as_ref()
            .and_then(|p| pointer_id(&body, p));
        Ok(KeyStatus {
            active,
            key_id,
            account_id,
            first_generated: None,
            last_rotated,
            generated_by: None,
        })
    }

    /// `current_key_id` fills `{key_id}` in the URL (percent-encoded as one path segment).
    pub async fn regenerate(
        &self,
        _reason: &str,
        current_key_id: Option<&str>,
    ) -> Result<Regenerated, ProviderError> {
        let ctx = self.ctx("regenerate");
        let regen = &self.config.regenerate;
        let url = if regen.url.contains("{key_id}") {
            let Some(id) = current_key_id else {
                return Err(ctx.permanent(
                    "the regenerate url needs {key_id} but the current key id is unknown".into(),
                ));
            };
            regen.url.replace("{key_id}", &percent_encode_segment(id))
        } else {
            regen.url.clone()
        };
        let url = wire::parse_url(&ctx, &url)?;
        // Checked in `new`, so this cannot fail; stay panic-free anyway.
        let method = Method::from_bytes(regen.method.as_bytes()).unwrap_or(Method::POST);
        let mut req = self.with_auth(self.client.request(method, url));
        if let Some(body) = &regen.body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ctx.regenerate_send_error(&e))?;
        let body = ctx.regenerate_body(resp).await?;
        let secret = match body.pointer(&regen.secret_pointer) {
            Some(Value::String(s)) if !s.is_empty() => Secret::from(s.clone()),
            _ => {
                return Err(ctx.ambiguous(format!(
                    "regenerate response has no secret at {}",
                    regen.secret_pointer
                )));
            }
        };
        let key_id = pointer_id(&body, &regen.key_id_pointer).ok_or_else(|| {
            ctx.ambiguous(format!(
                "regenerate response has no key id at {}",
                regen.key_id_pointer
            ))
        })?;
        drop(body);
        Ok(Regenerated {
            key_id,
            secret,
            last_rotated: None,
            generated_by: None,
        })
    }

    /// 2xx: the secret authenticates; 401/403: it does not.
    pub async fn auth_check(&self, secret: &Secret) -> Result<Option<AuthIdentity>, ProviderError> {
        let ctx = self.ctx("auth_check");
        let Some(check) = &self.config.auth_check else {
            return Err(ctx.permanent("this provider has no auth_check section".into()));
        };
        let url = wire::parse_url(&ctx, &check.url)?;
        let name = HeaderName::from_bytes(check.header.as_bytes())
            .map_err(|_| ctx.permanent("invalid auth_check header name".into()))?;
        let value = sensitive_value(&check.prefix, secret)
            .ok_or_else(|| ctx.permanent("the secret cannot be sent in a header".into()))?;
        let resp = self
            .client
            .get(url)
            .header(name, value)
            .send()
            .await
            .map_err(|e| ctx.read_send_error(&e))?;
        Ok(ctx.check_auth_check(resp)?.map(|_| AuthIdentity {
            account_id: None,
            key_id: None,
        }))
    }

    /// Credentials that must never appear in an error excerpt.
    fn secrets(&self) -> Vec<&Secret> {
        self.config.auth.iter().map(|a| &a.value).collect()
    }
}

fn auth_header_name(auth: &HttpAuth) -> HeaderName {
    // Validated in `new`.
    HeaderName::from_bytes(auth.header.as_bytes()).unwrap_or(reqwest::header::AUTHORIZATION)
}

fn auth_header_value(auth: &HttpAuth) -> HeaderValue {
    sensitive_value(&auth.prefix, &auth.value).unwrap_or_else(|| HeaderValue::from_static(""))
}

/// `prefix + secret` as a header value marked sensitive (kept out of reqwest's own Debug output).
pub(super) fn sensitive_value(prefix: &str, secret: &Secret) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("{prefix}{}", secret.expose_secret())).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// A string or a number at `pointer`, as a string (key ids are sometimes numeric).
fn pointer_id(body: &Value, pointer: &str) -> Option<String> {
    match body.pointer(pointer)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// An RFC 3339 time or null/absent at `pointer`.
fn pointer_time(body: &Value, pointer: &str) -> Result<Option<DateTime<Utc>>, String> {
    match body.pointer(pointer) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| format!("value at {pointer} is not an RFC 3339 time")),
        Some(_) => Err(format!("value at {pointer} is not an RFC 3339 time")),
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a key id is one path segment.
fn percent_encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What both providers share: the client, URL handling and the error classification.
pub(super) mod wire {
    use std::time::Duration;

    use reqwest::{Client, Response, StatusCode};
    use secrecy::ExposeSecret;
    use serde_json::Value;
    use url::Url;
    use zeroize::Zeroize;

    use crate::provider::ProviderError;
    use crate::secret::Secret;

    /// Retry-After used when a 429 has none (or one we cannot read).
    pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
    /// Longest excerpt of an error text kept in a message.
    const EXCERPT: usize = 200;

    pub fn client(timeout: Duration) -> reqwest::Result<Client> {
        Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect would replay a regenerate as a GET elsewhere, or drop the credential on the
            // way: a 3xx is reported (as the status it is), never followed.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("keyrotd/", env!("CARGO_PKG_VERSION")))
            .build()
    }

    pub fn parse_url(ctx: &Ctx<'_>, s: &str) -> Result<Url, ProviderError> {
        Url::parse(s).map_err(|e| ctx.permanent(format!("invalid url: {e}")))
    }

    /// `base` + `path`, keeping any path prefix of `base` (`https://h/api` + `/v1/x` = `https://h/api/v1/x`).
    pub fn join(base: &Url, path: &str) -> Result<Url, url::ParseError> {
        let base = base.as_str().trim_end_matches('/');
        if path.starts_with('/') {
            Url::parse(&format!("{base}{path}"))
        } else {
            Url::parse(&format!("{base}/{path}"))
        }
    }

    /// Seconds in `Retry-After`; [`DEFAULT_RETRY_AFTER`] when missing or not a number of seconds.
    pub fn retry_after(resp: &Response) -> Duration {
        resp.headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_RETRY_AFTER)
    }

    /// A short, printable account of an error body: the text of `{"error": "..."}` (at most 200 chars),
    /// "HTML error page", or nothing. Any known secret in it is masked.
    pub fn excerpt(body: &str, secrets: &[&Secret]) -> Option<String> {
        let trimmed = body.trim_start();
        let text = if let Ok(v) = serde_json::from_str::<Value>(body) {
            match v.get("error") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => match o.get("message") {
                    Some(Value::String(s)) => s.clone(),
                    _ => return None,
                },
                _ => return None,
            }
        } else if trimmed.starts_with('<') {
            return Some("HTML error page".into());
        } else {
            return None;
        };
        let mut text: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(EXCERPT)
            .collect();
        for s in secrets {
            let s = s.expose_secret();
            if !s.is_empty() && text.contains(s) {
                text = text.replace(s, "[redacted]");
            }
        }
        // A truncated secret could survive the replace above; drop the excerpt if a long prefix of one
        // is still there.
        for s in secrets {
            let s = s.expose_secret();
            if let Some(prefix) = s.get(..8)
                && text.contains(prefix)
            {
                return None;
            }
        }
        Some(text)
    }

    fn describe(status: StatusCode, excerpt: Option<String>) -> String {
        match excerpt {
            Some(e) => format!("HTTP {}: {e}", status.as_u16()),
            None => format!("HTTP {}", status.as_u16()),
        }
    }

    /// The provider and operation an error is about.
    pub struct Ctx<'a> {
        pub provider: &'a str,
        pub operation: &'static str,
    }

    impl Ctx<'_> {
        pub fn transient(&self, message: String) -> ProviderError {
            ProviderError::Transient {
                provider: self.provider.into(),
                operation: self.operation,
                message,
            }
        }
        pub fn permanent(&self, message: String) -> ProviderError {
            ProviderError::Permanent {
                provider: self.provider.into(),
                operation: self.operation,
                message,
            }
        }
        pub fn ambiguous(&self, message: String) -> ProviderError {
            ProviderError::Ambiguous {
                provider: self.provider.into(),
                message,
            }
        }
        fn auth(&self, status: StatusCode) -> ProviderError {
            ProviderError::Auth {
                provider: self.provider.into(),
                operation: self.operation,
                status: status.as_u16(),
            }
        }
        fn rate_limited(&self, resp: &Response) -> ProviderError {
            ProviderError::RateLimited {
                provider: self.provider.into(),
                operation: self.operation,
                retry_after: retry_after(resp),
            }
        }

        /// A read-only call (status, auth_check) failed without a response: always worth a retry.
        pub fn read_send_error(&self, e: &reqwest::Error) -> ProviderError {
            self.transient(transport_message(e))
        }

        /// A regenerate failed without a response. Only a failure to connect proves the request never
        /// left; anything later (timeout, reset, incomplete response) is ambiguous.
        pub fn regenerate_send_error(&self, e: &reqwest::Error) -> ProviderError {
            if e.is_connect() {
                self.transient(transport_message(e))
            } else {
                self.ambiguous(transport_message(e))
            }
        }

        /// Classifies a management response (status): 2xx passes through; 401/403 Auth; 429
        /// RateLimited; 5xx Transient; other 4xx Permanent. `secrets` are masked in any excerpt.
        pub async fn check_management(
            &self,
            resp: Response,
            secrets: &[&Secret],
        ) -> Result<Response, ProviderError> {
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(self.auth(status));
            }
            if status == StatusCode::TOO_MANY_REQUESTS {
                return Err(self.rate_limited(&resp));
            }
            let body = resp.text().await.unwrap_or_default();
            let message = describe(status, excerpt(&body, secrets));
            if status.is_server_error() {
                Err(self.transient(message))
            } else {
                Err(self.permanent(message))
            }
        }

        /// Classifies an auth check response: `Ok(Some(resp))` for 2xx, `Ok(None)` for 401/403. The
        /// body is never quoted (a portal might echo the secret under test).
        pub fn check_auth_check(&self, resp: Response) -> Result<Option<Response>, ProviderError> {
            let status = resp.status();
            if status.is_success() {
                return Ok(Some(resp));
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Ok(None);
            }
            if status == StatusCode::TOO_MANY_REQUESTS {
                return Err(self.rate_limited(&resp));
            }
            let message = describe(status, None);
            if status.is_server_error() {
                Err(self.transient(message))
            } else {
                Err(self.permanent(message))
            }
        }

        /// Classifies a regenerate response and parses its JSON body. 401/403 Auth and 429
        /// RateLimited (the portal refused before acting), other 4xx Permanent, 5xx and any body that
        /// cannot be read or parsed Ambiguous. Error bodies are never quoted (they could hold the
        /// new secret); the raw body buffer is zeroized once parsed.
        pub async fn regenerate_body(&self, resp: Response) -> Result<Value, ProviderError> {
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(self.auth(status));
            }
            if status == StatusCode::TOO_MANY_REQUESTS {
                return Err(self.rate_limited(&resp));
            }
            if status.is_server_error() {
                return Err(self.ambiguous(describe(status, None)));
            }
            if !status.is_success() {
                return Err(self.permanent(describe(status, None)));
            }
            let mut bytes: Vec<u8> = match resp.bytes().await {
                Ok(b) => b.into(),
                Err(e) => {
                    return Err(self.ambiguous(format!(
                        "HTTP {}: response body incomplete: {}",
                        status.as_u16(),
                        transport_message(&e)
                    )));
                }
            };
            let parsed = serde_json::from_slice::<Value>(&bytes);
            bytes.zeroize();
            parsed.map_err(|_| {
                self.ambiguous(format!("HTTP {}: response is not JSON", status.as_u16()))
            })
        }
    }

    /// A transport error in a few words, without URLs' query strings or bodies.
    fn transport_message(e: &reqwest::Error) -> String {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "cannot connect"
        } else if e.is_body() || e.is_decode() {
            "response body incomplete"
        } else if e.is_request() {
            "connection failed (reset or closed)"
        } else {
            "request failed"
        };
        // The innermost source says e.g. "connection refused" or "connection closed before message
        // completed"; it never holds a body.
        let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
        let mut last = None;
        while let Some(s) = source {
            last = Some(s.to_string());
            source = s.source();
        }
        match last {
            Some(l) => format!("{what}: {}", l.chars().take(EXCERPT).collect::<String>()),
            None => what.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use wiremock::matchers::{body_string, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::config::{HttpAuthCheck, HttpRegenerate, HttpStatus};

    fn config(server: &str) -> HttpProviderConfig {
        HttpProviderConfig {
            auth: Some(HttpAuth {
                header: "Authorization".into(),
                prefix: "Bearer ".into(),
                value: Secret::from("mgmt-token-123".to_string()),
            }),
            regenerate: HttpRegenerate {
                method: "POST".into(),
                url: format!("{server}/v2/keys/{{key_id}}/roll"),
                body: Some(r#"{"expire_old": "now"}"#.into()),
                secret_pointer: "/data/secret".into(),
                key_id_pointer: "/data/id".into(),
            },
            status: Some(HttpStatus {
                url: format!("{server}/v2/keys/current"),
                key_id_pointer: "/id".into(),
                last_rotated_pointer: Some("/rotated_at".into()),
                active_pointer: None,
                account_id_pointer: Some("/owner/account".into()),
            }),
            auth_check: Some(HttpAuthCheck {
                url: format!("{server}/v2/whoami"),
                header: "X-Key".into(),
                prefix: "Key ".into(),
            }),
            account_id: Some("acct_7".into()),
            timeout: Duration::from_secs(2),
            requested_by: "keyrotd@test".into(),
        }
    }

    #[tokio::test]
    async fn regenerate_substitutes_the_encoded_key_id_and_reads_the_pointers() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v2/keys/k%2F1%20x/roll"))
            .and(header("authorization", "Bearer mgmt-token-123"))
            .and(body_string(r#"{"expire_old": "now"}"#))
            .respond_with(
                ResponseTemplate::new(201).set_body_json(
                    serde_json::json!({"data": {"id": 77, "secret": "vx_new_secret"}}),
                ),
            )
            .expect(1)
            .mount(&server)
            .await;
        let p = HttpProvider::new("vendor-x", &config(&server.uri())).unwrap();
        let r = p.regenerate("scheduled", Some("k/1 x")).await.unwrap();
        assert_eq!(r.key_id, "77");
        assert_eq!(r.secret.expose_secret(), "vx_new_secret");
        assert!(!format!("{r:?}").contains("vx_new_secret"));
    }

    #[tokio::test]
    async fn regenerate_without_a_known_key_id_is_permanent_and_sends_nothing() {
        let server = MockServer::start().await;
        let p = HttpProvider::new("vendor-x", &config(&server.uri())).unwrap();
        let e = p.regenerate("scheduled", None).await.unwrap_err();
        assert!(matches!(e, ProviderError::Permanent { .. }), "{e:?}");
        assert!(server.received_requests().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn regenerate_errors_are_classified_and_never_quote_the_body() {
        let server = MockServer::start().await;
        let p = HttpProvider::new("vendor-x", &config(&server.uri())).unwrap();
        let cases: Vec<(ResponseTemplate, &str)> = vec![
            (ResponseTemplate::new(401), "auth"),
            (ResponseTemplate::new(403), "auth"),
            (
                ResponseTemplate::new(429).insert_header("Retry-After", "7"),
                "rate7",
            ),
            (
                ResponseTemplate::new(502)
                    .set_body_string(r#"{"error":"leaked vx_secret_in_err"}"#),
                "ambiguous",
            ),
            (
                ResponseTemplate::new(200).set_body_string("{\"data\": {\"id\": 1, \"secr"),
                "ambiguous",
            ),
            (
                ResponseTemplate::new(200).set_body_json(serde_json::json!({"data": {"id": 1}})),
                "ambiguous",
            ),
            (
                ResponseTemplate::new(400).set_body_string(r#"{"error":"vx_secret_in_err"}"#),
                "permanent",
            ),
        ];
        for (template, want) in cases {
            server.reset().await;
            Mock::given(method("POST"))
                .respond_with(template)
                .mount(&server)
                .await;
            let e = p.regenerate("scheduled", Some("k1")).await.unwrap_err();
            let ok = match (&e, want) {
                (ProviderError::Auth { .. }, "auth") => true,
                (ProviderError::RateLimited { retry_after, .. }, "rate7") => {
                    *retry_after == Duration::from_secs(7)
                }
                (ProviderError::Ambiguous { .. }, "ambiguous") => true,
                (ProviderError::Permanent { .. }, "permanent") => true,
                _ => false,
            };
            assert!(ok, "wanted {want}, got {e:?}");
            assert!(!e.to_string().contains("vx_secret_in_err"), "{e}");
        }
    }

    #[tokio::test]
    async fn regenerate_that_cannot_connect_is_transient() {
        // A port that refuses connections for the whole test: bound (so nothing else can take it)
        // but never listening.
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = held.local_addr().unwrap();
        let p = HttpProvider::new("vendor-x", &config(&format!("http://{addr}"))).unwrap();
        let e = p.regenerate("scheduled", Some("k1")).await.unwrap_err();
        drop(held);
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn regenerate_that_times_out_after_sending_is_ambiguous() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
            .mount(&server)
            .await;
        let mut c = config(&server.uri());
        c.timeout = Duration::from_millis(300);
        let p = HttpProvider::new("vendor-x", &c).unwrap();
        let e = p.regenerate("scheduled", Some("k1")).await.unwrap_err();
        assert!(matches!(e, ProviderError::Ambiguous { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn status_reads_pointers_and_defaults_active_to_true() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v2/keys/current"))
            .and(header("authorization", "Bearer mgmt-token-123"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "id": "k-9", "rotated_at": "2026-11-01T03:00:00Z",
                "owner": {"account": "acct_7"}, "extra": [1, 2]
            })))
            .mount(&server)
            .await;
        let p = HttpProvider::new("vendor-x", &config(&server.uri())).unwrap();
        let s = p.status().await.unwrap();
        assert_eq!(s.key_id, "k-9");
        assert!(s.active);
        assert_eq!(s.account_id.as_deref(), Some("acct_7"));
        assert_eq!(
            s.last_rotated.unwrap().to_rfc3339(),
            "2026-11-01T03:00:00+00:00"
        );
    }

    #[tokio::test]
    async fn status_reads_an_explicit_inactive_flag_and_a_null_rotation() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_json(
                serde_json::json!({"id": "k-9", "rotated_at": null, "state": {"on": false}}),
            ))
            .mount(&server)
            .await;
        let mut c = config(&server.uri());
        if let Some(s) = c.status.as_mut() {
            s.active_pointer = Some("/state/on".into());
        }
        let p = HttpProvider::new("vendor-x", &c).unwrap();
        let s = p.status().await.unwrap();
        assert!(!s.active);
        assert_eq!(s.last_rotated, None);
    }

    #[tokio::test]
    async fn status_errors_are_classified_and_mask_the_management_token() {
        let server = MockServer::start().await;
        let p = HttpProvider::new("vendor-x", &config(&server.uri())).unwrap();
        Mock::given(method("GET"))
            .respond_with(
                ResponseTemplate::new(500)
                    .set_body_string(r#"{"error":"bad token mgmt-token-123 somewhere"}"#),
            )
            .mount(&server)
            .await;
        let e = p.status().await.unwrap_err();
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
        assert!(e.to_string().contains("bad token"), "{e}");
        assert!(!e.to_string().contains("mgmt-token-123"), "{e}");

        server.reset().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(503).set_body_string("<html><body>oops</body>"))
            .mount(&server)
            .await;
        let e = p.status().await.unwrap_err();
        assert!(e.to_string().contains("HTML error page"), "{e}");

        server.reset().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(429))
            .mount(&server)
            .await;
        match p.status().await.unwrap_err() {
            ProviderError::RateLimited { retry_after, .. } => {
                assert_eq!(retry_after, wire::DEFAULT_RETRY_AFTER)
            }
            e => panic!("wanted RateLimited, got {e:?}"),
        }
    }

    #[tokio::test]
    async fn auth_check_sends_the_secret_with_its_prefix() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v2/whoami"))
            .and(header("x-key", "Key good"))
            .respond_with(ResponseTemplate::new(204))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v2/whoami"))
            .respond_with(ResponseTemplate::new(403))
            .mount(&server)
            .await;
        let p = HttpProvider::new("vendor-x", &config(&server.uri())).unwrap();
        assert!(
            p.auth_check(&Secret::from("good".to_string()))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            p.auth_check(&Secret::from("bad".to_string()))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn missing_sections_are_reported_not_guessed() {
        let mut c = config("http://127.0.0.1:9");
        c.status = None;
        c.auth_check = None;
        let p = HttpProvider::new("vendor-x", &c).unwrap();
        assert!(!p.has_status() && !p.has_auth_check());
        assert!(matches!(
            p.status().await.unwrap_err(),
            ProviderError::Permanent { .. }
        ));
    }

    #[test]
    fn excerpt_keeps_error_text_short_and_masks_secrets() {
        let s = Secret::from("supersecretvalue".to_string());
        let long = format!(r#"{{"error": "{}"}}"#, "x".repeat(500));
        assert_eq!(wire::excerpt(&long, &[]).unwrap().len(), 200);
        assert_eq!(
            wire::excerpt(r#"{"error":"no supersecretvalue here"}"#, &[&s]).unwrap(),
            "no [redacted] here"
        );
        assert_eq!(wire::excerpt("plain text body", &[]), None);
        assert_eq!(
            wire::excerpt("<!DOCTYPE html>", &[]).as_deref(),
            Some("HTML error page")
        );
    }

    #[test]
    fn bad_method_is_refused_at_build() {
        let mut c = config("http://127.0.0.1:9");
        c.regenerate.method = "PO ST".into();
        assert!(HttpProvider::new("vendor-x", &c).is_err());
    }
}
