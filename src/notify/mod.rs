//! Dependents: calling their reload hooks (HTTP or command) and probing their `verify` endpoints.
//!
//! A hook never receives the secret: an HTTP hook gets `{"key","rotation_id","key_id","rotated_at"}`
//! (optionally signed with HMAC-SHA256), a command gets `KEYROTD_KEY`, `KEYROTD_ROTATION_ID`,
//! `KEYROTD_KEY_ID` in a cleared environment (keyrotd's own environment holds credentials), no shell.
//! This module does the I/O; how often to retry and what a failure means is decided by the engine.

use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};
use secrecy::ExposeSecret;
use serde::Serialize;
use uuid::Uuid;

use crate::config::{ReloadHook, TlsConfig, VerifyConfig};

/// What a reload hook is told.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadNotice<'a> {
    pub key: &'a str,
    pub rotation_id: Uuid,
    pub key_id: &'a str,
    pub rotated_at: DateTime<Utc>,
}

/// Why a hook call failed. Never holds a body or an environment value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HookError {
    #[error("HTTP {0}")]
    Status(u16),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("request failed: {0}")]
    Request(String),
    #[error("cannot start command {program}: {reason}")]
    Spawn { program: String, reason: String },
    #[error("command exited with {0}")]
    Exit(String),
}

/// The result of one `verify` probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The expected status.
    Ok,
    /// 401 or 403: the dependent's key does not authenticate.
    AuthFailure(u16),
    /// Any other status: the dependent answers but is not healthy.
    Unexpected(u16),
    /// No HTTP answer at all.
    Unreachable(String),
}

/// Calls dependents. One shared HTTP client (connection reuse keeps hooks fast).
#[derive(Clone)]
pub struct Notifier {
    http: reqwest::Client,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

/// `sha256=<hex HMAC-SHA256 of body>`, the `X-Keyrotd-Signature` header value.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key)
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        .expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Notifier {
    pub fn new() -> Notifier {
        let http = crate::http_client::client(&crate::http_client::ClientSettings::default())
            .unwrap_or_default();
        Notifier { http }
    }

    /// The client for a hook or probe: the shared default one, or the shared one for its CA and
    /// client certificate. Timeouts are per request.
    fn client_for(&self, tls: &TlsConfig) -> Result<reqwest::Client, HookError> {
        if *tls == TlsConfig::default() {
            return Ok(self.http.clone());
        }
        crate::http_client::client(&crate::http_client::ClientSettings {
            tls: tls.clone(),
            ..Default::default()
        })
        .map_err(|e| HookError::Request(e.to_string()))
    }

    /// One call of a reload hook (no retries: the engine retries).
    pub async fn reload(
        &self,
        hook: &ReloadHook,
        notice: &ReloadNotice<'_>,
    ) -> Result<(), HookError> {
        match hook {
            ReloadHook::Http {
                url,
                method,
                timeout,
                signing_key,
                tls,
                ..
            } => {
                let body =
                    serde_json::to_vec(notice).map_err(|e| HookError::Request(e.to_string()))?;
                let method =
                    reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::POST);
                let mut req = self
                    .client_for(tls)?
                    .request(method, url.clone())
                    .timeout(*timeout)
                    .header(reqwest::header::CONTENT_TYPE, "application/json");
                if let Some(k) = signing_key {
                    req = req.header(
                        "X-Keyrotd-Signature",
                        signature(k.expose_secret().as_bytes(), &body),
                    );
                }
                let resp = req
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| classify_reqwest(e, *timeout))?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(HookError::Status(resp.status().as_u16()))
                }
            }
            ReloadHook::Command {
                command,
                timeout,
                env,
                ..
            } => {
                let Some((program, args)) = command.split_first() else {
                    return Err(HookError::Spawn {
                        program: String::new(),
                        reason: "empty command".into(),
                    });
                };
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(args)
                    .env_clear()
                    .env(
                        "PATH",
                        std::env::var("PATH")
                            .unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
                    )
                    .env(
                        "LANG",
                        std::env::var("LANG").unwrap_or_else(|_| "C.UTF-8".into()),
                    )
                    .envs(env)
                    .env("KEYROTD_KEY", notice.key)
                    .env("KEYROTD_ROTATION_ID", notice.rotation_id.to_string())
                    .env("KEYROTD_KEY_ID", notice.key_id)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true);
                let mut child = cmd.spawn().map_err(|e| HookError::Spawn {
                    program: program.clone(),
                    reason: e.to_string(),
                })?;
                match tokio::time::timeout(*timeout, child.wait()).await {
                    Ok(Ok(status)) if status.success() => Ok(()),
                    Ok(Ok(status)) => Err(HookError::Exit(status.to_string())),
                    Ok(Err(e)) => Err(HookError::Exit(e.to_string())),
                    Err(_) => {
                        let _ = child.kill().await;
                        Err(HookError::Timeout(*timeout))
                    }
                }
            }
        }
    }

    /// One probe of a dependent's `verify` endpoint.
    pub async fn probe(&self, verify: &VerifyConfig) -> Probe {
        let client = match self.client_for(&verify.tls) {
            Ok(c) => c,
            Err(e) => return Probe::Unreachable(e.to_string()),
        };
        match client
            .get(verify.url.clone())
            .timeout(verify.timeout)
            .send()
            .await
        {
            Ok(resp) => {
                let status = resp.status().as_u16();
                if status == verify.expect_status {
                    Probe::Ok
                } else if status == 401 || status == 403 {
                    Probe::AuthFailure(status)
                } else {
                    Probe::Unexpected(status)
                }
            }
            Err(e) => Probe::Unreachable(classify_reqwest(e, verify.timeout).to_string()),
        }
    }
}

fn classify_reqwest(e: reqwest::Error, timeout: Duration) -> HookError {
    if e.is_timeout() {
        HookError::Timeout(timeout)
    } else if e.is_connect() {
        HookError::Request("connection failed".into())
    } else {
        // Without the URL: it is config, already in the log context.
        HookError::Request(e.without_url().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn notice() -> ReloadNotice<'static> {
        ReloadNotice {
            key: "billing",
            rotation_id: Uuid::nil(),
            key_id: "ak_2",
            rotated_at: DateTime::parse_from_rfc3339("2026-12-01T03:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
        }
    }

    #[test]
    fn signature_is_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[tokio::test]
    async fn command_hooks_get_a_cleared_environment_with_the_keyrotd_variables() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env.txt");
        let hook = ReloadHook::Command {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("env > {}", out.display()),
            ],
            timeout: Duration::from_secs(5),
            env: BTreeMap::from([("EXTRA".to_string(), "1".to_string())]),
            retries: 0,
        };
        Notifier::new().reload(&hook, &notice()).await.unwrap();
        let env = std::fs::read_to_string(&out).unwrap();
        let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
        for want in [
            "KEYROTD_KEY",
            "KEYROTD_ROTATION_ID",
            "KEYROTD_KEY_ID",
            "PATH",
            "LANG",
            "EXTRA",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(env.contains("KEYROTD_KEY_ID=ak_2"));
        // Nothing of the test process's environment leaks through (HOME is always set here).
        assert!(!names.contains(&"HOME"), "{names:?}");
    }

    #[tokio::test]
    async fn a_failing_or_slow_command_is_an_error() {
        let fail = ReloadHook::Command {
            command: vec!["/bin/false".into()],
            timeout: Duration::from_secs(5),
            env: BTreeMap::new(),
            retries: 0,
        };
        assert!(matches!(
            Notifier::new().reload(&fail, &notice()).await,
            Err(HookError::Exit(_))
        ));
        let slow = ReloadHook::Command {
            command: vec!["/bin/sleep".into(), "5".into()],
            timeout: Duration::from_millis(100),
            env: BTreeMap::new(),
            retries: 0,
        };
        assert!(matches!(
            Notifier::new().reload(&slow, &notice()).await,
            Err(HookError::Timeout(_))
        ));
    }

    #[tokio::test]
    async fn http_hooks_send_the_notice_signed_and_probes_classify_statuses() {
        use wiremock::matchers::{header_exists, method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/-/reload"))
            .and(header_exists("X-Keyrotd-Signature"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/ok"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/401"))
            .respond_with(ResponseTemplate::new(401))
            .mount(&server)
            .await;
        let hook = ReloadHook::Http {
            url: format!("{}/-/reload", server.uri()).parse().unwrap(),
            method: "POST".into(),
            timeout: Duration::from_secs(2),
            signing_key: Some(crate::secret::Secret::from("hook-key".to_string())),
            retries: 0,
            tls: TlsConfig::default(),
        };
        let n = Notifier::new();
        n.reload(&hook, &notice()).await.unwrap();
        let req = &server.received_requests().await.unwrap()[0];
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(body["key_id"], "ak_2");
        assert_eq!(
            body.as_object().unwrap().len(),
            4,
            "only key, rotation_id, key_id, rotated_at: {body}"
        );
        let sig = req
            .headers
            .get("X-Keyrotd-Signature")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(sig, signature(b"hook-key", &req.body));

        let verify = |p: &str| VerifyConfig {
            url: format!("{}{p}", server.uri()).parse().unwrap(),
            expect_status: 200,
            timeout: Duration::from_secs(2),
            tls: TlsConfig::default(),
        };
        assert_eq!(n.probe(&verify("/ok")).await, Probe::Ok);
        assert_eq!(n.probe(&verify("/401")).await, Probe::AuthFailure(401));
        assert_eq!(n.probe(&verify("/missing")).await, Probe::Unexpected(404));
    }
}
