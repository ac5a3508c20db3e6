//! Dependents: calling their reload hooks (HTTP or command) and probing their `verify` endpoints.
//!
//! A hook never receives the secret: an HTTP hook gets `{"key","rotation_id","key_id","rotated_at"}`
//! (optionally signed with HMAC-SHA256 over `timestamp + "." + body`, see [`signature`]), a command
//! gets `KEYROTD_KEY`, `KEYROTD_ROTATION_ID`, `KEYROTD_KEY_ID` in a cleared environment (keyrotd's own
//! environment holds credentials), no shell, in a process group of its own so that a timeout kills
//! everything it started. This module does the I/O; how often to retry and what a failure means is
//! decided by the engine.
//!
//! [`targets`] sends notifications about keys to people (webhooks, commands), with the same command
//! runner and signature scheme.
//!
//! Nothing a dependent sends back is read beyond a bound: HTTP hook and probe bodies are never read
//! (only the status counts), and a command's output is kept to a short excerpt for the log.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};
use secrecy::ExposeSecret;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use uuid::Uuid;

pub mod targets;

use crate::config::{ReloadHook, TlsConfig, VerifyConfig};
use crate::secret::Secret;

mod confirm;
pub use confirm::parse_fingerprint;

/// The header carrying `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "X-Keyrotd-Signature";
/// The header carrying the signing time, in Unix seconds; it is part of what is signed.
pub const TIMESTAMP_HEADER: &str = "X-Keyrotd-Timestamp";
/// How far a signed request's timestamp may be from the receiver's clock before it is refused as a
/// replay (or a clock too far off).
pub const MAX_SIGNATURE_AGE: Duration = Duration::from_secs(300);
/// The most of a command hook's output (stdout and stderr, each) kept for the log.
pub const OUTPUT_EXCERPT: usize = 512;
/// How long a command's output is still read after it exited (a child it left in the background
/// may hold the pipe open).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// How many secrets [`Notifier::mask_also`] remembers.
const MASKS_KEPT: usize = 16;

/// What a reload hook is told.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadNotice<'a> {
    pub key: &'a str,
    pub rotation_id: Uuid,
    pub key_id: &'a str,
    pub rotated_at: DateTime<Utc>,
    /// A coalesced reload: every key it serves (`key` among them). Absent from the body otherwise.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub keys: &'a [String],
}

/// Why a hook call failed. Never holds a body or an environment value; a command's output excerpt
/// has every known secret masked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HookError {
    #[error("HTTP {0}")]
    Status(u16),
    #[error("timed out after {timeout:?}{}", output_suffix(.output))]
    Timeout {
        timeout: Duration,
        /// The command's output excerpt (empty for HTTP hooks).
        output: String,
    },
    #[error("request failed: {0}")]
    Request(String),
    #[error("cannot start command {program}: {reason}")]
    Spawn { program: String, reason: String },
    #[error("command exited with {status}{}", output_suffix(.output))]
    Exit { status: String, output: String },
}

fn output_suffix(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!("; output: {output}")
    }
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
    /// Secrets masked in command output besides the hook's own (recent keys, credentials).
    masks: Arc<Mutex<Vec<Secret>>>,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

/// `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`, the [`SIGNATURE_HEADER`] value. Signing the
/// timestamp with the body lets a dependent refuse a captured request replayed later.
pub fn signature(key: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(mac(key, timestamp, body).finalize().into_bytes())
    )
}

fn mac(key: &[u8], timestamp: i64, body: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key)
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        .expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Why a signed request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing or malformed {TIMESTAMP_HEADER}")]
    Timestamp,
    #[error("{TIMESTAMP_HEADER} is more than 5 minutes from now (a replay, or a clock far off)")]
    Stale,
    #[error("missing or wrong {SIGNATURE_HEADER}")]
    Signature,
}

/// What a dependent does with a signed reload: the timestamp is within [`MAX_SIGNATURE_AGE`] of
/// `now` (Unix seconds), and the signature is the HMAC of `timestamp + "." + body`, compared in
/// constant time. `timestamp` and `signature` are the raw header values.
pub fn verify_signature(
    key: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    verify_signature_within(key, timestamp, signature, body, now, MAX_SIGNATURE_AGE)
}

/// [`verify_signature`] with another freshness limit than [`MAX_SIGNATURE_AGE`].
pub fn verify_signature_within(
    key: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
    max_age: Duration,
) -> Result<(), SignatureError> {
    let ts: i64 = timestamp
        .and_then(|t| t.trim().parse().ok())
        .ok_or(SignatureError::Timestamp)?;
    if now.abs_diff(ts) > max_age.as_secs() {
        return Err(SignatureError::Stale);
    }
    let sig = signature
        .and_then(|s| s.trim().strip_prefix("sha256="))
        .and_then(|h| hex::decode(h).ok())
        .ok_or(SignatureError::Signature)?;
    mac(key, ts, body)
        .verify_slice(&sig)
        .map_err(|_| SignatureError::Signature)
}

impl Notifier {
    pub fn new() -> Notifier {
        let http = crate::http_client::client(&crate::http_client::ClientSettings::default())
            .unwrap_or_default();
        Notifier {
            http,
            masks: Arc::default(),
        }
    }

    /// Masks `secret` in every command output excerpt from now on (the most recent
    /// [`MASKS_KEPT`] are kept). A hook that prints the key it just reloaded must not put it in the log.
    pub fn mask_also(&self, secret: &Secret) {
        let mut masks = self.masks.lock().unwrap_or_else(|p| p.into_inner());
        if masks.len() >= MASKS_KEPT {
            masks.remove(0);
        }
        masks.push(secret.clone());
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
                    let now = Utc::now().timestamp();
                    req = req.header(TIMESTAMP_HEADER, now.to_string()).header(
                        SIGNATURE_HEADER,
                        signature(k.expose_secret().as_bytes(), now, &body),
                    );
                }
                // Only the status counts: the response body is dropped unread, so a dependent
                // answering with gigabytes costs nothing.
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
            } => self.run_command(command, *timeout, env, notice).await,
        }
    }

    /// Runs a command hook in its own process group; on timeout the whole group is killed (a shell
    /// script's children too). Its output is read up to [`OUTPUT_EXCERPT`] bytes per stream.
    async fn run_command(
        &self,
        command: &[String],
        timeout: Duration,
        env: &std::collections::BTreeMap<String, String>,
        notice: &ReloadNotice<'_>,
    ) -> Result<(), HookError> {
        let mut vars = vec![
            ("KEYROTD_KEY", notice.key.to_string()),
            ("KEYROTD_ROTATION_ID", notice.rotation_id.to_string()),
            ("KEYROTD_KEY_ID", notice.key_id.to_string()),
        ];
        // A coalesced reload serves several keys: all of them, comma-separated.
        if !notice.keys.is_empty() {
            vars.push(("KEYROTD_KEYS", notice.keys.join(",")));
        }
        let program = Program {
            command,
            timeout,
            env,
            vars: &vars,
            stdin: None,
        };
        run_program(program, |output| self.masked(output, env)).await
    }

    /// `output` with every remembered secret and the hook's own environment values replaced.
    fn masked(&self, output: String, env: &std::collections::BTreeMap<String, String>) -> String {
        let masks = self.masks.lock().unwrap_or_else(|p| p.into_inner());
        let secrets: Vec<&str> = masks.iter().map(|s| s.expose_secret()).collect();
        let values: Vec<&str> = env.values().map(String::as_str).collect();
        mask_output(output, &secrets, &values)
    }

    /// One probe of a dependent's `verify` endpoint. Only the status is read, never the body.
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

/// A program to run: argv without a shell, a cleared environment holding only `PATH`, `LANG`, the
/// configured `env` and `vars`, and optionally bytes on its stdin.
pub(crate) struct Program<'a> {
    pub command: &'a [String],
    pub timeout: Duration,
    pub env: &'a std::collections::BTreeMap<String, String>,
    pub vars: &'a [(&'a str, String)],
    pub stdin: Option<Vec<u8>>,
}

/// Runs `p` in a process group of its own; on timeout the whole group is killed (a shell script's
/// children too). Its output is read up to [`OUTPUT_EXCERPT`] bytes per stream and passed through
/// `mask` before it goes into an error.
pub(crate) async fn run_program(
    p: Program<'_>,
    mask: impl FnOnce(String) -> String,
) -> Result<(), HookError> {
    let Some((program, args)) = p.command.split_first() else {
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
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env(
            "LANG",
            std::env::var("LANG").unwrap_or_else(|_| "C.UTF-8".into()),
        )
        .envs(p.env)
        .envs(p.vars.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(if p.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| HookError::Spawn {
        program: program.clone(),
        reason: e.to_string(),
    })?;
    // The group id is the child's pid (process_group(0)); taken now, before the child is reaped.
    let group = child.id().and_then(|id| i32::try_from(id).ok());
    if let (Some(bytes), Some(mut pipe)) = (p.stdin, child.stdin.take()) {
        // Written beside the wait: a program that never reads its stdin must not hold keyrotd.
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = pipe.write_all(&bytes).await;
        });
    }
    let stdout = read_excerpt(child.stdout.take());
    let stderr = read_excerpt(child.stderr.take());
    let output = async {
        let (o, e) = tokio::join!(stdout, stderr);
        join_output(&o, &e)
    };
    tokio::pin!(output);
    // The output is read while the command runs (a full pipe would block it), and the wait
    // ends at the timeout.
    let deadline = tokio::time::sleep(p.timeout);
    tokio::pin!(deadline);
    let mut read: Option<String> = None;
    let status = loop {
        tokio::select! {
            s = child.wait() => break Some(s),
            o = &mut output, if read.is_none() => read = Some(o),
            _ = &mut deadline => break None,
        }
    };
    if status.is_none() {
        kill_group(group);
        let _ = child.kill().await;
    }
    let output = match read {
        Some(o) => o,
        None => tokio::time::timeout(OUTPUT_GRACE, &mut output)
            .await
            .unwrap_or_default(),
    };
    let output = mask(output);
    match status {
        Some(Ok(s)) if s.success() => Ok(()),
        Some(Ok(s)) => Err(HookError::Exit {
            status: s.to_string(),
            output,
        }),
        Some(Err(e)) => Err(HookError::Exit {
            status: e.to_string(),
            output,
        }),
        None => Err(HookError::Timeout {
            timeout: p.timeout,
            output,
        }),
    }
}

/// SIGKILL to a whole process group; a group already gone is not an error.
fn kill_group(group: Option<i32>) {
    if let Some(pgid) = group.filter(|g| *g > 1) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The first [`OUTPUT_EXCERPT`] bytes of a stream; the rest is read and dropped so the command never
/// blocks on a full pipe.
async fn read_excerpt<R: AsyncRead + Unpin>(stream: Option<R>) -> Vec<u8> {
    let Some(mut stream) = stream else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = OUTPUT_EXCERPT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// stdout and stderr as one printable line: control characters become spaces.
fn join_output(stdout: &[u8], stderr: &[u8]) -> String {
    let text = |b: &[u8]| -> String {
        String::from_utf8_lossy(b)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
            .trim()
            .to_string()
    };
    match (text(stdout), text(stderr)) {
        (o, e) if e.is_empty() => o,
        (o, e) if o.is_empty() => e,
        (o, e) => format!("{o} | {e}"),
    }
}

/// Replaces every `secret` and every `value` (a hook's configured environment, which may hold a
/// token) in `output` with `[redacted]`. An excerpt cut in the middle of a secret could keep its
/// start: output still holding the first 8 characters of a secret is withheld whole.
pub fn mask_output(mut output: String, secrets: &[&str], values: &[&str]) -> String {
    for k in secrets.iter().chain(values).filter(|k| k.len() >= 4) {
        if output.contains(*k) {
            output = output.replace(*k, "[redacted]");
        }
    }
    let leaks_a_prefix = secrets
        .iter()
        .any(|k| k.get(..8).is_some_and(|p| output.contains(p)));
    if leaks_a_prefix {
        return "[output withheld: it held part of a secret]".into();
    }
    output
}

pub(crate) fn classify_reqwest(e: reqwest::Error, timeout: Duration) -> HookError {
    if e.is_timeout() {
        HookError::Timeout {
            timeout,
            output: String::new(),
        }
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
            keys: &[],
        }
    }

    #[test]
    fn signature_is_hex_hmac_sha256_of_timestamp_dot_body() {
        // The same HMAC computed independently over the exact bytes "1700000000.{}".
        let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"1700000000.{}");
        let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(signature(b"Jefe", 1_700_000_000, b"{}"), want);
        // Another time, another signature: a captured one does not fit a later request.
        assert_ne!(signature(b"Jefe", 1_700_000_001, b"{}"), want);
    }

    #[test]
    fn a_dependent_refuses_old_future_unsigned_or_altered_requests() {
        let now = 1_700_000_000;
        let body = br#"{"key":"billing"}"#;
        let sig = signature(b"k", now, body);
        let ts = now.to_string();
        let check = |ts: Option<&str>, sig: Option<&str>, body: &[u8], at: i64| {
            verify_signature(b"k", ts, sig, body, at)
        };
        assert_eq!(check(Some(&ts), Some(&sig), body, now), Ok(()));
        assert_eq!(check(Some(&ts), Some(&sig), body, now + 300), Ok(()));
        assert_eq!(
            check(Some(&ts), Some(&sig), body, now + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            check(Some(&ts), Some(&sig), body, now - 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            check(None, Some(&sig), body, now),
            Err(SignatureError::Timestamp)
        );
        assert_eq!(
            check(Some(&ts), Some(&sig), b"{}", now),
            Err(SignatureError::Signature)
        );
        // A replayed signature with a fresh timestamp does not verify.
        let fresh = (now + 400).to_string();
        assert_eq!(
            check(Some(&fresh), Some(&sig), body, now + 400),
            Err(SignatureError::Signature)
        );
        assert_eq!(
            check(Some(&ts), None, body, now),
            Err(SignatureError::Signature)
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
            Err(HookError::Exit { .. })
        ));
        let slow = ReloadHook::Command {
            command: vec!["/bin/sleep".into(), "5".into()],
            timeout: Duration::from_millis(100),
            env: BTreeMap::new(),
            retries: 0,
        };
        assert!(matches!(
            Notifier::new().reload(&slow, &notice()).await,
            Err(HookError::Timeout { .. })
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
        let header = |name: &str| req.headers.get(name).map(|v| v.to_str().unwrap());
        let ts = header(TIMESTAMP_HEADER).unwrap();
        let now = Utc::now().timestamp();
        assert!(now.abs_diff(ts.parse::<i64>().unwrap()) < 60, "{ts}");
        assert_eq!(
            verify_signature(
                b"hook-key",
                Some(ts),
                header(SIGNATURE_HEADER),
                &req.body,
                now
            ),
            Ok(())
        );

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

    fn command(script: &str, timeout: Duration) -> ReloadHook {
        ReloadHook::Command {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout,
            env: BTreeMap::from([("SERVICE_TOKEN".to_string(), "svc-token-abc".to_string())]),
            retries: 0,
        }
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        // The hook starts a grandchild that would outlive it, then hangs.
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let e = Notifier::new()
            .reload(&command(&script, Duration::from_millis(300)), &notice())
            .await
            .unwrap_err();
        assert!(matches!(e, HookError::Timeout { .. }), "{e:?}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed, not left running (reaped by init, so it is gone or a zombie for an instant).
        let mut alive = true;
        for _ in 0..50 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                alive = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive, "the grandchild {pid} survived the hook's timeout");
    }

    #[tokio::test]
    async fn a_failed_command_reports_a_short_masked_excerpt_of_its_output() {
        let n = Notifier::new();
        n.mask_also(&crate::secret::Secret::from(
            "aos_sk_live_NEWKEY123".to_string(),
        ));
        let script = "echo reading aos_sk_live_NEWKEY123 with svc-token-abc; \
                      head -c 100000 /dev/zero | tr '\\0' x; echo oops >&2; exit 3";
        let e = n
            .reload(&command(script, Duration::from_secs(10)), &notice())
            .await
            .unwrap_err();
        let HookError::Exit { status, output } = &e else {
            panic!("wanted Exit, got {e:?}")
        };
        assert!(status.contains('3'), "{status}");
        assert!(
            output.starts_with("reading [redacted] with [redacted]"),
            "{output}"
        );
        assert!(output.ends_with("| oops"), "{output}");
        assert!(output.len() < 2 * OUTPUT_EXCERPT + 16, "{}", output.len());
        let shown = e.to_string();
        assert!(
            !shown.contains("NEWKEY123") && !shown.contains("svc-token-abc"),
            "{shown}"
        );
    }

    #[test]
    fn a_secret_cut_by_the_excerpt_withholds_the_output() {
        assert_eq!(
            mask_output("x aos_sk_live_NEW".into(), &["aos_sk_live_NEWKEY"], &[]),
            "[output withheld: it held part of a secret]"
        );
        assert_eq!(
            mask_output("fine".into(), &["aos_sk_live_NEWKEY"], &[]),
            "fine"
        );
    }

    #[tokio::test]
    async fn hook_and_probe_bodies_are_never_read() {
        // A dependent that answers 200 with an endless body: only the status line matters.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut req = [0u8; 4096];
                    let _ = sock.read(&mut req).await;
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                        .await;
                    let chunk = format!("10000\r\n{}\r\n", "z".repeat(0x10000));
                    while sock.write_all(chunk.as_bytes()).await.is_ok() {}
                });
            }
        });
        let n = Notifier::new();
        let verify = VerifyConfig {
            url: format!("http://{addr}/health").parse().unwrap(),
            expect_status: 200,
            timeout: Duration::from_secs(5),
            tls: Default::default(),
        };
        assert_eq!(n.probe(&verify).await, Probe::Ok);
        let hook = ReloadHook::Http {
            url: format!("http://{addr}/-/reload").parse().unwrap(),
            method: "POST".into(),
            timeout: Duration::from_secs(5),
            signing_key: None,
            retries: 0,
            tls: Default::default(),
        };
        n.reload(&hook, &notice()).await.unwrap();
    }
}
