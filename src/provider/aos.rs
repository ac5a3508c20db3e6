//! The AOS portal contract (docs/portal-api.md): `GET current` for the key's metadata, `POST
//! regenerate` for a new key (the old one dies with the response), `GET auth/check` to ask whether a
//! secret is the active key. Error classification is shared with the `http` provider
//! ([`super::http::wire`]); this module only knows the paths and the JSON shapes.
//!
//! The bodies are parsed by small pure functions ([`parse_status`], [`parse_regenerate`],
//! [`parse_auth_check`]) so that tests and the fuzzer can feed them anything a portal might send.

use chrono::{DateTime, Utc};
use reqwest::Client;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::http::{sensitive_value, wire};
use super::{AuthIdentity, KeyStatus, ProviderError, Regenerated};
use crate::config::AosProviderConfig;
use crate::secret::Secret;

pub struct AosProvider {
    name: String,
    management_token: Secret,
    account_id: Option<String>,
    requested_by: String,
    // Checked URLs kept as text (a parsed `Url` is five times the size; a fleet has one provider per
    // key), parsed again per request, which costs far less than the request.
    status_url: Box<str>,
    regenerate_url: Box<str>,
    auth_check_url: Box<str>,
    client: Client,
    max_retry_after: std::time::Duration,
}

/// `GET current`. Unknown fields are ignored (no `deny_unknown_fields`: the portal may add some).
/// `active` has no default: a portal that leaves it out has not said the key is Active.
#[derive(Deserialize)]
struct StatusBody {
    active: Option<bool>,
    key_id: String,
    account_id: Option<String>,
    first_generated: Option<DateTime<Utc>>,
    last_rotated: Option<DateTime<Utc>>,
    generated_by: Option<String>,
}

/// `POST regenerate`'s answer. The secret is deserialized straight into a [`Secret`]: it never sits
/// in a plain `String` that would be freed without being wiped.
#[derive(Deserialize)]
struct RegenerateBody {
    key_id: String,
    secret: Secret,
    last_rotated: Option<DateTime<Utc>>,
    generated_by: Option<String>,
}

#[derive(Serialize)]
struct RegenerateRequest<'a> {
    reason: &'a str,
    requested_by: &'a str,
}

#[derive(Deserialize, Default)]
struct AuthCheckBody {
    account_id: Option<String>,
    key_id: Option<String>,
}

/// Why a body could not be used. Fixed texts only: a parser's own message can quote the value it
/// choked on, and in a regenerate answer that value may be the new secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyProblem {
    #[error("response is not the expected JSON")]
    NotExpectedJson,
    #[error("status response has no `active` field: cannot tell whether the key is Active")]
    NoActive,
    #[error("regenerate response lacks key_id or secret, or has bad types")]
    BadRegenerate,
    #[error("regenerate response has an empty secret")]
    EmptySecret,
}

/// Reads a `GET current` body.
pub fn parse_status(body: &[u8]) -> Result<KeyStatus, BodyProblem> {
    let b: StatusBody = serde_json::from_slice(body).map_err(|_| BodyProblem::NotExpectedJson)?;
    Ok(KeyStatus {
        active: b.active.ok_or(BodyProblem::NoActive)?,
        key_id: b.key_id,
        account_id: b.account_id,
        first_generated: b.first_generated,
        last_rotated: b.last_rotated,
        generated_by: b.generated_by,
    })
}

/// Reads a `POST regenerate` body (a 200/201: the new key exists at the portal from now on).
pub fn parse_regenerate(body: &[u8]) -> Result<Regenerated, BodyProblem> {
    let b: RegenerateBody = serde_json::from_slice(body).map_err(|_| BodyProblem::BadRegenerate)?;
    if b.secret.expose_secret().is_empty() {
        return Err(BodyProblem::EmptySecret);
    }
    Ok(Regenerated {
        key_id: b.key_id,
        secret: b.secret,
        last_rotated: b.last_rotated,
        generated_by: b.generated_by,
    })
}

/// Reads an auth check's 200 body. The 200 is the answer; the identity is a bonus, so a body that
/// cannot be read gives an empty identity rather than an error.
pub fn parse_auth_check(body: &[u8]) -> AuthIdentity {
    let b: AuthCheckBody = serde_json::from_slice(body).unwrap_or_default();
    AuthIdentity {
        account_id: b.account_id,
        key_id: b.key_id,
    }
}

impl AosProvider {
    pub fn new(name: &str, c: &AosProviderConfig) -> Result<Self, ProviderError> {
        let bad = |what: &str, e: String| ProviderError::Permanent {
            provider: name.to_string(),
            operation: "configure",
            message: format!("invalid {what} url: {e}"),
        };
        let join = |what: &str, path: &str| {
            wire::join(&c.base_url, path)
                .map(|u| Box::<str>::from(u.as_str()))
                .map_err(|e| bad(what, e.to_string()))
        };
        Ok(Self {
            name: name.into(),
            management_token: c.management_token.clone(),
            account_id: c.account_id.clone(),
            requested_by: c.requested_by.clone(),
            status_url: join("status", &c.paths.status)?,
            regenerate_url: join("regenerate", &c.paths.regenerate)?,
            auth_check_url: join("auth_check", &c.paths.auth_check)?,
            client: wire::client(c.timeout, &c.tls).map_err(|e| ProviderError::Permanent {
                provider: name.to_string(),
                operation: "configure",
                message: e.to_string(),
            })?,
            max_retry_after: c.max_retry_after,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn expected_account(&self) -> Option<&str> {
        self.account_id.as_deref()
    }

    fn ctx(&self, operation: &'static str) -> wire::Ctx<'_> {
        wire::Ctx {
            provider: &self.name,
            operation,
            max_retry_after: self.max_retry_after,
        }
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.management_token.expose_secret())
    }

    fn management(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match sensitive_value("Bearer ", &self.management_token) {
            Some(v) => req.header(reqwest::header::AUTHORIZATION, v),
            // A token with bytes a header cannot carry: send it anyway for the portal to refuse.
            None => req.bearer_auth(self.bearer()),
        }
    }

    pub async fn status(&self) -> Result<KeyStatus, ProviderError> {
        let ctx = self.ctx("status");
        let resp = self
            .management(self.client.get(&*self.status_url))
            .send()
            .await
            .map_err(|e| ctx.read_send_error(&e))?;
        let resp = ctx
            .check_management(resp, &[&self.management_token])
            .await?;
        let body = ctx.read_body(resp).await?;
        parse_status(&body).map_err(|p| match p {
            BodyProblem::NoActive => ctx.permanent(p.to_string()),
            _ => ctx.transient(format!("status {p}")),
        })
    }

    /// Regenerates the key. From a 200/201 on, the previous key is dead; the secret is wrapped at once.
    /// See [`wire::Ctx::regenerate_body`] for how failures are classified.
    pub async fn regenerate(&self, reason: &str) -> Result<Regenerated, ProviderError> {
        let ctx = self.ctx("regenerate");
        let resp = self
            .management(self.client.post(&*self.regenerate_url))
            .json(&RegenerateRequest {
                reason,
                requested_by: &self.requested_by,
            })
            .send()
            .await
            .map_err(|e| ctx.regenerate_send_error(&e))?;
        let body = ctx.regenerate_body(resp).await?;
        parse_regenerate(&body).map_err(|p| ctx.ambiguous(p.to_string()))
    }

    /// `Some` when `secret` is the active key (200), `None` when refused (401/403).
    pub async fn auth_check(&self, secret: &Secret) -> Result<Option<AuthIdentity>, ProviderError> {
        let ctx = self.ctx("auth_check");
        let value = sensitive_value("", secret)
            .ok_or_else(|| ctx.permanent("the secret cannot be sent in a header".into()))?;
        let resp = self
            .client
            .get(&*self.auth_check_url)
            .header("X-API-Key", value)
            .send()
            .await
            .map_err(|e| ctx.read_send_error(&e))?;
        let Some(resp) = ctx.check_auth_check(resp)? else {
            return Ok(None);
        };
        // The identity is a bonus: an oversized or cut-off body leaves it empty.
        let body = ctx.read_body(resp).await.unwrap_or_default();
        Ok(Some(parse_auth_check(&body)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use url::Url;

    use wiremock::matchers::{body_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::config::AosPaths;

    fn provider(base: &str) -> AosProvider {
        AosProvider::new(
            "aos",
            &AosProviderConfig {
                base_url: Url::parse(base).unwrap(),
                management_token: Secret::from("mgmt-xyz".to_string()),
                account_id: Some("acct_42".into()),
                timeout: Duration::from_secs(2),
                requested_by: "keyrotd@host-a".into(),
                paths: AosPaths::default(),
                tls: Default::default(),
                max_retry_after: crate::backoff::DEFAULT_MAX_RETRY_AFTER,
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn status_ignores_unknown_fields_and_accepts_a_null_last_rotated() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/api-keys/current"))
            .and(header("authorization", "Bearer mgmt-xyz"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "active": true, "key_id": "ak_1", "account_id": "acct_42",
                "first_generated": "2026-01-05T10:00:00Z", "last_rotated": null,
                "generated_by": "role:rotation-bot", "tier": "gold"
            })))
            .mount(&server)
            .await;
        let s = provider(&server.uri()).status().await.unwrap();
        assert_eq!(s.key_id, "ak_1");
        assert_eq!(s.last_rotated, None);
        assert!(s.first_generated.is_some());
        assert_eq!(s.account_id.as_deref(), Some("acct_42"));
    }

    #[tokio::test]
    async fn regenerate_sends_reason_and_requester_and_wraps_the_secret() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/api-keys/regenerate"))
            .and(header("authorization", "Bearer mgmt-xyz"))
            .and(body_json(
                serde_json::json!({"reason": "scheduled", "requested_by": "keyrotd@host-a"}),
            ))
            .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({
                "key_id": "ak_2", "secret": "aos_sk_live_NEW", "last_rotated": "2026-12-01T03:00:00Z",
                "generated_by": "role:rotation-bot"
            })))
            .expect(1)
            .mount(&server)
            .await;
        let r = provider(&server.uri())
            .regenerate("scheduled")
            .await
            .unwrap();
        assert_eq!(r.key_id, "ak_2");
        assert_eq!(r.secret.expose_secret(), "aos_sk_live_NEW");
        assert!(r.last_rotated.is_some());
        assert!(!format!("{r:?}").contains("aos_sk_live_NEW"));
    }

    #[tokio::test]
    async fn a_regenerate_body_without_a_secret_is_ambiguous() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(serde_json::json!({"key_id": "ak_2"})),
            )
            .mount(&server)
            .await;
        let e = provider(&server.uri())
            .regenerate("scheduled")
            .await
            .unwrap_err();
        assert!(matches!(e, ProviderError::Ambiguous { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn auth_check_sends_the_key_and_reads_the_identity() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/auth/check"))
            .and(header("x-api-key", "aos_sk_live_GOOD"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(serde_json::json!({"account_id": "acct_42", "key_id": "ak_1"})),
            )
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(401))
            .mount(&server)
            .await;
        let p = provider(&server.uri());
        let id = p
            .auth_check(&Secret::from("aos_sk_live_GOOD".to_string()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(id.key_id.as_deref(), Some("ak_1"));
        assert!(
            p.auth_check(&Secret::from("aos_sk_live_OLD".to_string()))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn auth_check_server_errors_are_transient() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(502))
            .mount(&server)
            .await;
        let e = provider(&server.uri())
            .auth_check(&Secret::from("k".to_string()))
            .await
            .unwrap_err();
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn a_status_without_the_active_field_fails_closed() {
        // The contract makes `active` required: a portal that leaves it out has not said the key is
        // Active, so the status is an error and preflight aborts instead of rotating.
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(serde_json::json!({"key_id": "ak_1", "account_id": "acct_42"})),
            )
            .mount(&server)
            .await;
        let e = provider(&server.uri()).status().await.unwrap_err();
        assert!(matches!(e, ProviderError::Permanent { .. }), "{e:?}");
        assert!(e.to_string().contains("`active`"), "{e}");
        assert_eq!(
            parse_status(br#"{"key_id":"ak_1","active":false}"#).map(|s| s.active),
            Ok(false)
        );
    }

    #[tokio::test]
    async fn a_huge_body_is_refused_not_read_into_memory() {
        let server = MockServer::start().await;
        let huge = format!(
            r#"{{"key_id":"ak_2","secret":"aos_sk_live_BIG","pad":"{}"}}"#,
            "x".repeat(wire::MAX_BODY)
        );
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string(huge.clone()))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_string(huge))
            .mount(&server)
            .await;
        let p = provider(&server.uri());
        // A regenerate answered with more than the cap may still have rotated: ambiguous.
        let e = p.regenerate("scheduled").await.unwrap_err();
        assert!(matches!(e, ProviderError::Ambiguous { .. }), "{e:?}");
        assert!(e.to_string().contains("larger than"), "{e}");
        assert!(!e.to_string().contains("aos_sk_live_BIG"), "{e}");
        let e = p.status().await.unwrap_err();
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
    }

    #[test]
    fn body_problems_never_quote_the_body() {
        // A number where the secret should be: serde's own message would quote it.
        let e = parse_regenerate(br#"{"key_id":"ak_2","secret":98765432123}"#).unwrap_err();
        assert!(!e.to_string().contains("98765432123"), "{e}");
        let e = parse_regenerate(br#"{"key_id":"ak_2","secret":""}"#).unwrap_err();
        assert_eq!(e, BodyProblem::EmptySecret);
        let id = parse_auth_check(b"not json");
        assert_eq!(id.key_id, None);
    }

    #[test]
    fn paths_keep_a_base_url_prefix() {
        let p = provider("http://portal.example/api/");
        assert_eq!(
            &*p.status_url,
            "http://portal.example/api/v1/api-keys/current"
        );
    }
}
