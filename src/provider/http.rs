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

mod dual;

use super::{AuthIdentity, KeyStatus, ProviderError, Regenerated};
use crate::config::{HttpAuth, HttpProviderConfig, HttpRegenerate, HttpStatus};
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
        let methods = [
            ("regenerate", config.regenerate.as_ref().map(|r| &r.method)),
            ("create", config.create.as_ref().map(|r| &r.method)),
            ("revoke", config.revoke.as_ref().map(|r| &r.method)),
            ("list", config.list.as_ref().map(|l| &l.method)),
        ];
        for (call, method) in methods {
            if let Some(m) = method {
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| permanent(format!("invalid {call} method {m:?}")))?;
            }
        }
        if let Some(auth) = &config.auth {
            HeaderName::from_bytes(auth.header.as_bytes())
                .map_err(|_| permanent(format!("invalid auth header name {:?}", auth.header)))?;
        }
        if let Some(check) = &config.auth_check {
            HeaderName::from_bytes(check.header.as_bytes()).map_err(|_| {
                permanent(format!("invalid auth_check header name {:?}", check.header))
            })?;
        }
        let client =
            wire::client(config.timeout, &config.tls).map_err(|e| permanent(e.to_string()))?;
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

    pub fn overlap(&self) -> crate::config::Overlap {
        self.config.overlap
    }

    pub fn has_list(&self) -> bool {
        self.config.list.is_some()
    }

    fn ctx(&self, operation: &'static str) -> wire::Ctx<'_> {
        wire::Ctx {
            provider: &self.name,
            operation,
            max_retry_after: self.config.max_retry_after,
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
        let body = ctx.read_body(resp).await?;
        parse_status(status, &body).map_err(|m| ctx.transient(m))
    }

    /// `current_key_id` fills `{key_id}` in the URL (percent-encoded as one path segment).
    pub async fn regenerate(
        &self,
        _reason: &str,
        current_key_id: Option<&str>,
    ) -> Result<Regenerated, ProviderError> {
        let ctx = self.ctx("regenerate");
        let Some(regen) = &self.config.regenerate else {
            return Err(ctx
                .permanent("this provider has no regenerate section (overlap = \"dual\")".into()));
        };
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
        parse_regenerate(regen, &body).map_err(|m| ctx.ambiguous(m))
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

/// Reads a status body as `status` describes it. Messages name pointers, never values.
pub fn parse_status(status: &HttpStatus, body: &[u8]) -> Result<KeyStatus, String> {
    let body: Value =
        serde_json::from_slice(body).map_err(|_| "status response is not JSON".to_string())?;
    let key_id = pointer_id(&body, &status.key_id_pointer)
        .ok_or_else(|| format!("status response has no key id at {}", status.key_id_pointer))?;
    let last_rotated = match &status.last_rotated_pointer {
        Some(p) => pointer_time(&body, p)?,
        None => None,
    };
    let active = match &status.active_pointer {
        Some(p) => match body.pointer(p) {
            Some(Value::Bool(b)) => *b,
            _ => return Err(format!("status response has no boolean at {p}")),
        },
        // The vendor has no notion of an inactive key: the config says so by leaving it out.
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

/// Reads a regenerate body as `regen` describes it. The secret is moved out of the parsed value into a
/// [`Secret`], and every other string of the value is wiped before it is freed. Messages name
/// pointers, never values.
pub fn parse_regenerate(regen: &HttpRegenerate, body: &[u8]) -> Result<Regenerated, String> {
    let mut body: Value =
        serde_json::from_slice(body).map_err(|_| "regenerate response is not JSON".to_string())?;
    let result = take_regenerated(regen, &mut body);
    crate::secret::wipe_json(&mut body);
    result
}

fn take_regenerated(regen: &HttpRegenerate, body: &mut Value) -> Result<Regenerated, String> {
    let key_id = pointer_id(body, &regen.key_id_pointer).ok_or_else(|| {
        format!(
            "regenerate response has no key id at {}",
            regen.key_id_pointer
        )
    })?;
    let secret = match body.pointer_mut(&regen.secret_pointer) {
        Some(Value::String(s)) if !s.is_empty() => Secret::from(std::mem::take(s)),
        _ => {
            return Err(format!(
                "regenerate response has no secret at {}",
                regen.secret_pointer
            ));
        }
    };
    Ok(Regenerated {
        key_id,
        secret,
        last_rotated: None,
        generated_by: None,
    })
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
pub mod wire {
    use std::time::Duration;

    use std::time::SystemTime;

    use reqwest::{Client, Response, StatusCode};
    use secrecy::ExposeSecret;
    use serde_json::Value;
    use url::Url;
    use zeroize::{Zeroize, Zeroizing};

    use crate::provider::ProviderError;
    use crate::secret::Secret;

    /// Retry-After used when a 429 has none (or one we cannot read).
    pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
    /// The largest response body read from a provider. Real answers are a few hundred bytes; a portal
    /// (or something impersonating one) that sends more gets an error, not all of keyrotd's memory.
    pub const MAX_BODY: usize = 1 << 20;
    /// Longest excerpt of an error text kept in a message.
    const EXCERPT: usize = 200;

    /// The provider's shared client ([`crate::http_client`]): no redirects (a 3xx is reported as
    /// the status it is, never followed), the provider's timeout, its CA and client certificate.
    pub fn client(
        timeout: Duration,
        tls: &crate::config::TlsConfig,
    ) -> Result<Client, crate::http_client::ClientError> {
        crate::http_client::client(&crate::http_client::ClientSettings {
            timeout: Some(timeout),
            connect_timeout: Some(timeout),
            tls: tls.clone(),
        })
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

    /// The wait a 429 asks for, at most `max`; [`DEFAULT_RETRY_AFTER`] when the header is missing or
    /// unreadable.
    pub fn retry_after(resp: &Response, max: Duration) -> Duration {
        let asked = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()))
            .unwrap_or(DEFAULT_RETRY_AFTER);
        crate::backoff::cap_retry_after(asked, max)
    }

    /// A `Retry-After` value (RFC 9110): a number of seconds or an HTTP-date (a date already past means
    /// no wait). `None` when it is neither.
    pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
        let value = value.trim();
        if let Ok(secs) = value.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        let at = httpdate::parse_http_date(value).ok()?;
        Some(at.duration_since(now).unwrap_or(Duration::ZERO))
    }

    /// Why a body could not be read in full.
    #[derive(Debug)]
    pub enum BodyError {
        /// Longer than the limit (by its Content-Length or as it arrived).
        /// Larger than the limit it names.
        TooLarge(usize),
        /// The connection failed before the end of the body.
        Incomplete(String),
    }

    impl std::error::Error for BodyError {}

    impl std::fmt::Display for BodyError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                BodyError::TooLarge(limit) => write!(f, "response body larger than {limit} bytes"),
                BodyError::Incomplete(why) => write!(f, "response body incomplete: {why}"),
            }
        }
    }

    /// Reads a body of at most `limit` bytes into a buffer that is wiped when dropped. Each chunk is
    /// wiped once copied (when the transport hands over the only reference to it), and the buffer
    /// never reallocates over a secret: it grows by copying into a new wiped-on-drop buffer.
    pub async fn read_capped(
        mut resp: Response,
        limit: usize,
    ) -> Result<Zeroizing<Vec<u8>>, BodyError> {
        let declared = resp.content_length().unwrap_or(0);
        if declared > limit as u64 {
            return Err(BodyError::TooLarge(limit));
        }
        let mut buf = Zeroizing::new(Vec::with_capacity((declared as usize).max(1024)));
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(buf),
                Err(e) => return Err(BodyError::Incomplete(transport_message(&e))),
            };
            if buf.len() + chunk.len() > limit {
                return Err(BodyError::TooLarge(limit));
            }
            let mut chunk: Vec<u8> = chunk.into();
            append_wiping(&mut buf, &chunk);
            chunk.zeroize();
        }
    }

    /// `buf.extend(bytes)`, but a full buffer is moved into a larger one by hand so the old allocation
    /// is wiped (a plain `extend` would free it with its contents).
    fn append_wiping(buf: &mut Zeroizing<Vec<u8>>, bytes: &[u8]) {
        let needed = buf.len() + bytes.len();
        if needed > buf.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(needed.max(buf.capacity() * 2)));
            bigger.extend_from_slice(buf);
            *buf = bigger; // the old buffer is zeroized as it drops
        }
        buf.extend_from_slice(bytes);
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

    /// The provider and operation an error is about, and the provider's `max_retry_after`.
    pub struct Ctx<'a> {
        pub provider: &'a str,
        pub operation: &'static str,
        pub max_retry_after: Duration,
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
                operation: self.operation,
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
                retry_after: retry_after(resp, self.max_retry_after),
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
            // An error page is read only up to the cap; one larger than that is not quoted.
            let body = read_capped(resp, MAX_BODY).await.unwrap_or_default();
            let message = describe(status, excerpt(&String::from_utf8_lossy(&body), secrets));
            if status.is_server_error() {
                Err(self.transient(message))
            } else {
                Err(self.permanent(message))
            }
        }

        /// A 2xx body, at most [`MAX_BODY`] bytes (a read-only call: any failure is transient).
        pub async fn read_body(&self, resp: Response) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
            let status = resp.status().as_u16();
            read_capped(resp, MAX_BODY)
                .await
                .map_err(|e| self.transient(format!("HTTP {status}: {e}")))
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

        /// Classifies a regenerate response and reads its body. 401/403 Auth and 429 RateLimited (the
        /// portal refused before acting), other 4xx Permanent; 5xx, a 3xx (a redirect is never
        /// followed, and nothing says the portal did not act before sending it) and any body that
        /// cannot be read in full (cut off, or larger than [`MAX_BODY`]) Ambiguous, so the engine
        /// re-reads the status. Error bodies are never quoted (they could hold the new secret); the
        /// returned buffer is wiped when dropped.
        pub async fn regenerate_body(
            &self,
            resp: Response,
        ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(self.auth(status));
            }
            if status == StatusCode::TOO_MANY_REQUESTS {
                return Err(self.rate_limited(&resp));
            }
            if status.is_server_error() || status.is_redirection() {
                return Err(self.ambiguous(describe(status, None)));
            }
            if !status.is_success() {
                return Err(self.permanent(describe(status, None)));
            }
            read_capped(resp, MAX_BODY)
                .await
                .map_err(|e| self.ambiguous(format!("HTTP {}: {e}", status.as_u16())))
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
            overlap: crate::config::Overlap::None,
            regenerate: Some(HttpRegenerate {
                method: "POST".into(),
                url: format!("{server}/v2/keys/{{key_id}}/roll"),
                body: Some(r#"{"expire_old": "now"}"#.into()),
                secret_pointer: "/data/secret".into(),
                key_id_pointer: "/data/id".into(),
            }),
            create: None,
            revoke: None,
            list: None,
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
            tls: Default::default(),
            max_retry_after: crate::backoff::DEFAULT_MAX_RETRY_AFTER,
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
            // A redirect is never followed, and the portal may have acted before sending it.
            (
                ResponseTemplate::new(302).insert_header("Location", "http://127.0.0.1:1/x"),
                "ambiguous",
            ),
            (
                ResponseTemplate::new(307).set_body_string(r#"{"error":"vx_secret_in_err"}"#),
                "ambiguous",
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
    fn retry_after_reads_seconds_and_http_dates() {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(
            wire::parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            wire::parse_retry_after("Sun, 06 Nov 1994 08:51:37 GMT", now),
            Some(Duration::from_secs(120))
        );
        // The two obsolete forms RFC 9110 still asks recipients to accept.
        assert_eq!(
            wire::parse_retry_after("Sunday, 06-Nov-94 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            wire::parse_retry_after("Sun Nov  6 08:49:47 1994", now),
            Some(Duration::from_secs(10))
        );
        // A date already past: no wait.
        assert_eq!(
            wire::parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(wire::parse_retry_after("soon", now), None);
        assert_eq!(wire::parse_retry_after("-5", SystemTime::now()), None);
    }

    #[tokio::test]
    async fn a_huge_retry_after_is_capped_by_max_retry_after() {
        let server = MockServer::start().await;
        let mut c = config(&server.uri());
        c.max_retry_after = Duration::from_secs(30);
        let p = HttpProvider::new("vendor-x", &c).unwrap();
        let far =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(7 * 86_400));
        for value in ["86400".to_string(), far] {
            server.reset().await;
            Mock::given(method("POST"))
                .respond_with(
                    ResponseTemplate::new(429).insert_header("Retry-After", value.as_str()),
                )
                .mount(&server)
                .await;
            match p.regenerate("scheduled", Some("k1")).await.unwrap_err() {
                ProviderError::RateLimited { retry_after, .. } => {
                    assert_eq!(retry_after, Duration::from_secs(30), "Retry-After: {value}")
                }
                e => panic!("wanted RateLimited, got {e:?}"),
            }
        }
        // An HTTP-date a minute ahead is honoured (not replaced by the 1 s default), under the
        // default cap of 5 minutes.
        let p = HttpProvider::new("vendor-x", &config(&server.uri())).unwrap();
        server.reset().await;
        let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(61));
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", soon.as_str()))
            .mount(&server)
            .await;
        match p.status().await.unwrap_err() {
            ProviderError::RateLimited { retry_after, .. } => assert!(
                retry_after > Duration::from_secs(50) && retry_after <= Duration::from_secs(61),
                "{retry_after:?}"
            ),
            e => panic!("wanted RateLimited, got {e:?}"),
        }
    }

    #[tokio::test]
    async fn oversized_bodies_are_errors() {
        let server = MockServer::start().await;
        let p = HttpProvider::new("vendor-x", &config(&server.uri())).unwrap();
        let big = format!(r#"{{"id":"k-9","pad":"{}"}}"#, "y".repeat(wire::MAX_BODY));
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_string(big.clone()))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string(big))
            .mount(&server)
            .await;
        let e = p.status().await.unwrap_err();
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
        assert!(e.to_string().contains("larger than"), "{e}");
        let e = p.regenerate("scheduled", Some("k1")).await.unwrap_err();
        assert!(matches!(e, ProviderError::Ambiguous { .. }), "{e:?}");
    }

    #[test]
    fn parsed_regenerate_bodies_are_wiped_but_the_secret_survives() {
        let c = config("http://127.0.0.1:9");
        let r = parse_regenerate(
            c.regenerate.as_ref().unwrap(),
            br#"{"data":{"id":"k2","secret":"vx_new"}}"#,
        )
        .unwrap();
        assert_eq!(r.secret.expose_secret(), "vx_new");
        let mut v = serde_json::json!({"a": ["s3cret", {"b": "x"}], "n": 1});
        crate::secret::wipe_json(&mut v);
        assert_eq!(v, serde_json::json!({"a": ["", {"b": ""}], "n": 1}));
    }

    #[test]
    fn bad_method_is_refused_at_build() {
        let mut c = config("http://127.0.0.1:9");
        if let Some(r) = c.regenerate.as_mut() {
            r.method = "PO ST".into();
        }
        assert!(HttpProvider::new("vendor-x", &c).is_err());
    }
}
