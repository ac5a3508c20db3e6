//! The AOS portal contract (docs/portal-api.md): `GET current` for the key's metadata, `POST
//! regenerate` for a new key (the old one dies with the response), `GET auth/check` to ask whether a
//! secret is the active key. Error classification is shared with the `http` provider
//! ([`super::http::wire`]); this module only knows the paths and the JSON shapes.

use chrono::{DateTime, Utc};
use reqwest::Client;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use url::Url;

use super::http::{sensitive_value, wire};
use super::{AuthIdentity, KeyStatus, ProviderError, Regenerated};
use crate::config::AosProviderConfig;
use crate::secret::Secret;

pub struct AosProvider {
    name: String,
    management_token: Secret,
    account_id: Option<String>,
    requested_by: String,
    status_url: Url,
    regenerate_url: Url,
    auth_check_url: Url,
    client: Client,
}

/// `GET current`. Unknown fields are ignored (no `deny_unknown_fields`: the portal may add some).
#[derive(Deserialize)]
struct StatusBody {
    #[serde(default = "default_active")]
    active: bool,
    key_id: String,
    account_id: Option<String>,
    first_generated: Option<DateTime<Utc>>,
    last_rotated: Option<DateTime<Utc>>,
    generated_by: Option<String>,
}

fn default_active() -> bool {
    true
}

/// `POST regenerate`'s answer. No `Debug`: it holds the new secret until it is wrapped.
#[derive(Deserialize)]
struct RegenerateBody {
    key_id: String,
    secret: String,
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

impl AosProvider {
    pub fn new(name: &str, c: &AosProviderConfig) -> Result<Self, ProviderError> {
        let bad = |what: &str, e: String| ProviderError::Permanent {
            provider: name.to_string(),
            operation: "configure",
            message: format!("invalid {what} url: {e}"),
        };
        let join = |what: &str, path: &str| {
            wire::join(&c.base_url, path).map_err(|e| bad(what, e.to_string()))
        };
        Ok(Self {
            name: name.into(),
            management_token: c.management_token.clone(),
            account_id: c.account_id.clone(),
            requested_by: c.requested_by.clone(),
            status_url: join("status", &c.paths.status)?,
            regenerate_url: join("regenerate", &c.paths.regenerate)?,
            auth_check_url: join("auth_check", &c.paths.auth_check)?,
            client: wire::client(c.timeout).map_err(|e| bad("client", e.to_string()))?,
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
            .management(self.client.get(self.status_url.clone()))
            .send()
            .await
            .map_err(|e| ctx.read_send_error(&e))?;
        let resp = ctx
            .check_management(resp, &[&self.management_token])
            .await?;
        let body: StatusBody = resp.json().await.map_err(|e| {
            ctx.transient(if e.is_decode() {
                "status response is not the expected JSON".into()
            } else {
                "status response body incomplete".into()
            })
        })?;
        Ok(KeyStatus {
            active: body.active,
            key_id: body.key_id,
            account_id: body.account_id,
            first_generated: body.first_generated,
            last_rotated: body.last_rotated,
            generated_by: body.generated_by,
        })
    }

    /// Regenerates the key. From a 200/201 on, the previous key is dead; the secret is wrapped at once.
    /// See [`wire::Ctx::regenerate_body`] for how failures are classified.
    pub async fn regenerate(&self, reason: &str) -> Result<Regenerated, ProviderError> {
        let ctx = self.ctx("regenerate");
        let resp = self
            .management(self.client.post(self.regenerate_url.clone()))
            .json(&RegenerateRequest {
                reason,
                requested_by: &self.requested_by,
            })
            .send()
            .await
            .map_err(|e| ctx.regenerate_send_error(&e))?;
        let value = ctx.regenerate_body(resp).await?;
        let body: RegenerateBody = serde_json::from_value(value).map_err(|_| {
            ctx.ambiguous("regenerate response lacks key_id or secret, or has bad types".into())
        })?;
        if body.secret.is_empty() {
            return Err(ctx.ambiguous("regenerate response has an empty secret".into()));
        }
        Ok(Regenerated {
            key_id: body.key_id,
            secret: Secret::from(body.secret),
            last_rotated: body.last_rotated,
            generated_by: body.generated_by,
        })
    }

    /// `Some` when `secret` is the active key (200), `None` when refused (401/403).
    pub async fn auth_check(&self, secret: &Secret) -> Result<Option<AuthIdentity>, ProviderError> {
        let ctx = self.ctx("auth_check");
        let value = sensitive_value("", secret)
            .ok_or_else(|| ctx.permanent("the secret cannot be sent in a header".into()))?;
        let resp = self
            .client
            .get(self.auth_check_url.clone())
            .header("X-API-Key", value)
            .send()
            .await
            .map_err(|e| ctx.read_send_error(&e))?;
        let Some(resp) = ctx.check_auth_check(resp)? else {
            return Ok(None);
        };
        // 200 is the answer; the identity is a bonus, so a body we cannot read is not an error.
        let body: AuthCheckBody = resp.json().await.unwrap_or_default();
        Ok(Some(AuthIdentity {
            account_id: body.account_id,
            key_id: body.key_id,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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

    #[test]
    fn paths_keep_a_base_url_prefix() {
        let p = provider("http://portal.example/api/");
        assert_eq!(
            p.status_url.as_str(),
            "http://portal.example/api/v1/api-keys/current"
        );
    }
}
