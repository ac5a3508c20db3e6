//! The generic HTTP provider's calls for a vendor that keeps two keys live (`overlap = "dual"`):
//! `create` a second key, `revoke` one by id, `list` the live ids. Classified like the other calls:
//! a create is ambiguous once the request may have left (the vendor may have made a key), a revoke
//! and a list are safe to retry (a revoke of a key already gone answers 404, which is success).

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::{HttpProvider, parse_regenerate, percent_encode_segment, pointer_id, wire};
use crate::config::HttpList;
use crate::provider::{ProviderError, Regenerated, Revoked};

impl HttpProvider {
    /// `POST create.url` (with `{key}` filled in url and body): the new key's id and secret.
    pub async fn create(&self, key: &str) -> Result<Regenerated, ProviderError> {
        let ctx = self.ctx("create");
        let Some(create) = &self.config.create else {
            return Err(ctx.permanent("this provider has no create section".into()));
        };
        let url = wire::parse_url(&ctx, &fill(&create.url, key, None))?;
        // Checked in `new`, so this cannot fail; stay panic-free anyway.
        let method = Method::from_bytes(create.method.as_bytes()).unwrap_or(Method::POST);
        let mut req = self.with_auth(self.client.request(method, url));
        if let Some(body) = &create.body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.replace("{key}", key));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ctx.regenerate_send_error(&e))?;
        let body = ctx.regenerate_body(resp).await?;
        parse_regenerate(create, &body).map_err(|m| ctx.ambiguous(m))
    }

    /// `DELETE revoke.url` with `{key_id}`; a 404 is [`Revoked::AlreadyGone`].
    pub async fn revoke(&self, key: &str, key_id: &str) -> Result<Revoked, ProviderError> {
        let ctx = self.ctx("revoke");
        let Some(revoke) = &self.config.revoke else {
            return Err(ctx.permanent("this provider has no revoke section".into()));
        };
        let url = wire::parse_url(&ctx, &fill(&revoke.url, key, Some(key_id)))?;
        let method = Method::from_bytes(revoke.method.as_bytes()).unwrap_or(Method::DELETE);
        let resp = self
            .with_auth(self.client.request(method, url))
            .send()
            .await
            .map_err(|e| ctx.read_send_error(&e))?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(Revoked::AlreadyGone);
        }
        ctx.check_management(resp, &self.secrets()).await?;
        Ok(Revoked::Now)
    }

    /// `GET list.url`: the ids of the live keys (`ids_pointer`, then `id_pointer` in each element).
    pub async fn list(&self, key: &str) -> Result<Vec<String>, ProviderError> {
        let ctx = self.ctx("list");
        let Some(list) = &self.config.list else {
            return Err(ctx.permanent("this provider has no list section".into()));
        };
        let url = wire::parse_url(&ctx, &fill(&list.url, key, None))?;
        let method = Method::from_bytes(list.method.as_bytes()).unwrap_or(Method::GET);
        let resp = self
            .with_auth(self.client.request(method, url))
            .send()
            .await
            .map_err(|e| ctx.read_send_error(&e))?;
        let resp = ctx.check_management(resp, &self.secrets()).await?;
        let body = ctx.read_body(resp).await?;
        parse_list(list, &body).map_err(|m| ctx.transient(m))
    }
}

/// `{key}` (the `[[keys]]` name) and `{key_id}` in a URL, each percent-encoded as one segment.
fn fill(url: &str, key: &str, key_id: Option<&str>) -> String {
    let url = url.replace("{key}", &percent_encode_segment(key));
    match key_id {
        Some(id) => url.replace("{key_id}", &percent_encode_segment(id)),
        None => url,
    }
}

/// Reads a list body as `list` describes it. Messages name pointers, never values.
pub fn parse_list(list: &HttpList, body: &[u8]) -> Result<Vec<String>, String> {
    let body: Value =
        serde_json::from_slice(body).map_err(|_| "list response is not JSON".to_string())?;
    let Some(Value::Array(items)) = body.pointer(&list.ids_pointer) else {
        return Err(format!(
            "list response has no array at {}",
            list.ids_pointer
        ));
    };
    items
        .iter()
        .map(|item| {
            let id = match &list.id_pointer {
                Some(p) => pointer_id(item, p),
                None => pointer_id(item, ""),
            };
            id.ok_or_else(|| {
                format!(
                    "an element of the list at {} has no id{}",
                    list.ids_pointer,
                    list.id_pointer
                        .as_deref()
                        .map(|p| format!(" at {p}"))
                        .unwrap_or_default()
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use secrecy::ExposeSecret;
    use wiremock::matchers::{body_string, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::config::{HttpAuth, HttpProviderConfig, HttpRegenerate, HttpRevoke, Overlap};
    use crate::secret::Secret;

    fn config(server: &str) -> HttpProviderConfig {
        HttpProviderConfig {
            auth: Some(HttpAuth {
                header: "Authorization".into(),
                prefix: "Bearer ".into(),
                value: Secret::from("mgmt-token-123".to_string()),
            }),
            overlap: Overlap::Dual,
            regenerate: None,
            create: Some(HttpRegenerate {
                method: "POST".into(),
                url: format!("{server}/v1/keys"),
                body: Some(r#"{"name": "{key}"}"#.into()),
                secret_pointer: "/secret".into(),
                key_id_pointer: "/id".into(),
            }),
            revoke: Some(HttpRevoke {
                method: "DELETE".into(),
                url: format!("{server}/v1/keys/{{key_id}}"),
            }),
            list: Some(HttpList {
                method: "GET".into(),
                url: format!("{server}/v1/keys?name={{key}}"),
                ids_pointer: "/data".into(),
                id_pointer: Some("/id".into()),
            }),
            status: None,
            auth_check: None,
            account_id: None,
            timeout: Duration::from_secs(2),
            requested_by: "keyrotd@test".into(),
            tls: Default::default(),
            max_retry_after: crate::backoff::DEFAULT_MAX_RETRY_AFTER,
        }
    }

    #[tokio::test]
    async fn create_names_the_key_and_reads_the_pointers() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/keys"))
            .and(header("authorization", "Bearer mgmt-token-123"))
            .and(body_string(r#"{"name": "billing"}"#))
            .respond_with(
                ResponseTemplate::new(201)
                    .set_body_json(serde_json::json!({"id": "rk_2", "secret": "sk_new"})),
            )
            .expect(1)
            .mount(&server)
            .await;
        let p = HttpProvider::new("vendor", &config(&server.uri())).unwrap();
        let k = p.create("billing").await.unwrap();
        assert_eq!(k.key_id, "rk_2");
        assert_eq!(k.secret.expose_secret(), "sk_new");
    }

    #[tokio::test]
    async fn a_create_that_may_have_acted_is_ambiguous_and_one_that_never_left_is_transient() {
        let server = MockServer::start().await;
        let p = HttpProvider::new("vendor", &config(&server.uri())).unwrap();
        for (template, ambiguous) in [
            (ResponseTemplate::new(502), true),
            (
                ResponseTemplate::new(200).set_body_string("{\"id\": \"rk"),
                true,
            ),
            (ResponseTemplate::new(401), false),
        ] {
            server.reset().await;
            Mock::given(method("POST"))
                .respond_with(template)
                .mount(&server)
                .await;
            let e = p.create("billing").await.unwrap_err();
            assert_eq!(
                matches!(e, ProviderError::Ambiguous { .. }),
                ambiguous,
                "{e:?}"
            );
            if ambiguous {
                assert!(e.to_string().contains("create outcome unknown"), "{e}");
            }
        }
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = held.local_addr().unwrap();
        let p = HttpProvider::new("vendor", &config(&format!("http://{addr}"))).unwrap();
        let e = p.create("billing").await.unwrap_err();
        drop(held);
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn a_revoke_of_a_key_already_gone_is_success() {
        let server = MockServer::start().await;
        Mock::given(method("DELETE"))
            .and(path("/v1/keys/rk_1"))
            .respond_with(ResponseTemplate::new(204))
            .mount(&server)
            .await;
        Mock::given(method("DELETE"))
            .and(path("/v1/keys/rk_gone"))
            .respond_with(ResponseTemplate::new(404))
            .mount(&server)
            .await;
        Mock::given(method("DELETE"))
            .and(path("/v1/keys/rk_busy"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&server)
            .await;
        let p = HttpProvider::new("vendor", &config(&server.uri())).unwrap();
        assert_eq!(p.revoke("billing", "rk_1").await.unwrap(), Revoked::Now);
        assert_eq!(
            p.revoke("billing", "rk_gone").await.unwrap(),
            Revoked::AlreadyGone
        );
        let e = p.revoke("billing", "rk_busy").await.unwrap_err();
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn list_reads_the_ids_of_the_key_named_in_the_url() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/keys"))
            .and(wiremock::matchers::query_param("name", "billing"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "data": [{"id": "rk_1"}, {"id": 7}]
            })))
            .mount(&server)
            .await;
        let p = HttpProvider::new("vendor", &config(&server.uri())).unwrap();
        assert_eq!(p.list("billing").await.unwrap(), vec!["rk_1", "7"]);
    }

    #[test]
    fn list_bodies_without_ids_are_errors_naming_the_pointer() {
        let c = config("http://127.0.0.1:9");
        let list = c.list.as_ref().unwrap();
        let e = parse_list(list, br#"{"data": [{"name": "x"}]}"#).unwrap_err();
        assert!(e.contains("/data") && e.contains("/id"), "{e}");
        assert!(parse_list(list, br#"{"items": []}"#).is_err());
        let bare = HttpList {
            id_pointer: None,
            ..list.clone()
        };
        assert_eq!(
            parse_list(&bare, br#"{"data": ["a", "b"]}"#).unwrap(),
            vec!["a", "b"]
        );
    }

    #[tokio::test]
    async fn an_aos_like_provider_has_no_dual_calls() {
        let mut c = config("http://127.0.0.1:9");
        c.create = None;
        let p = HttpProvider::new("vendor", &c).unwrap();
        let e = p.create("billing").await.unwrap_err();
        assert!(matches!(e, ProviderError::Permanent { .. }), "{e:?}");
    }
}
