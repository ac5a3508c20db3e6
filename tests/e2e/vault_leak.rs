//! A Vault that answers badly never makes keyrotd leak a secret or a token. A scripted server gives
//! the answers that carry them back: truncated JSON holding the secret, a wrong-type field quoting
//! it, a 502 HTML page echoing it, a non-UTF-8 body, Vault's `errors` array echoing it, and an
//! AppRole login reply that does not parse. Every test uses a canary secret and canary credentials
//! and searches for them in the log (every target at TRACE, text and JSON), in `StoreError`'s
//! `Display` and `Debug`, and in `{:?}` of the store; the last two tests run the real binary.
//!
//! The scripted server is the test's own listener on 127.0.0.1:0, held for the whole test.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::sim::Portal;
use crate::support::{eventually, holds_for};
use chrono::Utc;
use keyrotd::config::{DestinationTarget, VaultAuth, VaultStoreConfig};
use keyrotd::secret::{Secret, fingerprint};
use keyrotd::store::vault::{VaultStore, quiet_client_logs};
use keyrotd::store::{Prepared, Store, StoreError, WriteRequest};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

// ---- a scripted Vault ---------------------------------------------------------------------------

/// One request as the scripted server saw it.
#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    head: String,
    body: Vec<u8>,
}

/// An answer: status, content type, body bytes.
type Answer = (u16, &'static str, Vec<u8>);
type Script = Arc<dyn Fn(&Req) -> Answer + Send + Sync>;

/// Serves `script` on a free port of 127.0.0.1 until the test ends; one request per connection.
async fn scripted(script: Script) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let script = script.clone();
            tokio::spawn(async move {
                let Some(req) = read_request(&mut s).await else {
                    return;
                };
                let (status, kind, body) = script(&req);
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn read_request(s: &mut tokio::net::TcpStream) -> Option<Req> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let mut first = head.lines().next()?.split(' ');
    Some(Req {
        method: first.next()?.to_string(),
        path: first.next()?.to_string(),
        body: buf[head_end..].to_vec(),
        head,
    })
}

fn envelope(data: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({ "request_id": "r", "lease_id": "", "lease_duration": 0,
        "renewable": false, "data": data, "warnings": null, "wrap_info": null, "auth": null }),
    )
    .unwrap()
}

/// A healthy answer to the token endpoints, so that each test reaches the answer it is about.
fn token_endpoints(req: &Req) -> Option<Answer> {
    match req.path.as_str() {
        "/v1/auth/token/lookup-self" => Some((
            200,
            "application/json",
            envelope(json!({ "ttl": 0, "renewable": false, "creation_ttl": 0 })),
        )),
        "/v1/sys/capabilities-self" => {
            let body: serde_json::Value =
                serde_json::from_slice(&req.body).unwrap_or(json!({ "paths": [] }));
            let mut caps = serde_json::Map::new();
            for p in body["paths"].as_array().into_iter().flatten() {
                caps.insert(p.as_str().unwrap_or("").to_string(), json!(["root"]));
            }
            Some((
                200,
                "application/json",
                envelope(serde_json::Value::Object(caps)),
            ))
        }
        _ => None,
    }
}

// ---- the canaries and the capture ----------------------------------------------------------------

struct Canaries {
    secret: String,
    token: String,
    role_id: String,
    secret_id: String,
}

impl Canaries {
    fn new() -> Canaries {
        let u = || Uuid::new_v4().simple().to_string();
        Canaries {
            secret: format!("aos_sk_live_canary{}", u()),
            token: format!("hvs.canarytoken{}", u()),
            role_id: format!("canary-role-{}", u()),
            secret_id: format!("canary-secret-id-{}", u()),
        }
    }

    fn all(&self) -> [(&'static str, &str); 4] {
        [
            ("secret", &self.secret),
            ("token", &self.token),
            ("role_id", &self.role_id),
            ("secret_id", &self.secret_id),
        ]
    }

    /// The names of the canaries found in `text`.
    fn found_in(&self, text: &str) -> Vec<&'static str> {
        self.all()
            .iter()
            .filter(|(_, v)| text.contains(*v))
            .map(|(n, _)| *n)
            .collect()
    }

    /// Panics naming every canary found in `text`.
    fn assert_absent(&self, place: &str, text: &str) {
        let found = self.found_in(text);
        assert!(found.is_empty(), "{found:?} leaked into {place}:\n{text}");
    }
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Every event and span of every target at TRACE, in text and in JSON, through the same filter
/// the binary installs. Current-thread runtime: the store's own task logs on this thread too.
fn capture() -> (tracing::subscriber::DefaultGuard, Buf, Buf) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    // tracing-core caches a callsite's interest for the process. While exactly one dispatcher is
    // registered (this capture), a callsite first hit by another test's thread, which has none,
    // caches "never" and the capture misses it for good (tokio-rs/tracing#3611). A second dispatcher,
    // registered for the life of the binary and the default of no thread, keeps tracing-core on its
    // general path, which asks every registered dispatcher.
    static PINNED: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    PINNED.get_or_init(|| tracing::Dispatch::new(tracing_subscriber::registry()));
    let (text, json) = (Buf::default(), Buf::default());
    let (t, j) = (text.clone(), json.clone());
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || t.clone())
                .with_filter(tracing_subscriber::filter::LevelFilter::TRACE),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(move || j.clone())
                .with_filter(tracing_subscriber::filter::LevelFilter::TRACE),
        )
        .with(quiet_client_logs());
    (tracing::subscriber::set_default(subscriber), text, json)
}

fn config(address: &str, auth: VaultAuth) -> VaultStoreConfig {
    VaultStoreConfig {
        address: address.parse().unwrap(),
        auth,
        mount: "secret".into(),
        namespace: None,
        timeout: Duration::from_secs(5),
        token_file: None,
        tls: Default::default(),
    }
}

fn target() -> DestinationTarget {
    DestinationTarget::Vault {
        path: "apps/billing".into(),
        field: "api_key".into(),
    }
}

/// Runs a read, a write of the canary secret and a preflight against `script` with the canary
/// token (or AppRole with the canary role and secret ids), then searches every output.
async fn run_scenario(name: &str, c: &Canaries, approle: bool, script: Script) {
    let (_guard, text, json) = capture();
    let lookups = Arc::new(AtomicUsize::new(0));
    let counted: Script = {
        let lookups = lookups.clone();
        Arc::new(move |req| {
            if req.path == "/v1/auth/token/lookup-self" {
                lookups.fetch_add(1, Ordering::SeqCst);
            }
            script(req)
        })
    };
    let addr = scripted(counted).await;
    let auth = if approle {
        VaultAuth::AppRole {
            role_id: Secret::from(c.role_id.clone()),
            secret_id: Secret::from(c.secret_id.clone()),
            mount: "approle".into(),
        }
    } else {
        VaultAuth::Token(Secret::from(c.token.clone()))
    };
    let store = Store::Vault(VaultStore::new("vault-main", &config(&addr, auth)).unwrap());
    let Store::Vault(vault) = &store else {
        unreachable!("built as a Vault store")
    };
    let secret = Secret::from(c.secret.clone());
    let fp = fingerprint(&secret);
    let req = WriteRequest {
        key: "billing",
        rotation_id: Uuid::new_v4(),
        key_id: "key_1",
        secret: &secret,
        fingerprint: &fp,
        rotated_at: Utc::now(),
        fence: None,
    };
    let mut errors: Vec<StoreError> = Vec::new();
    errors.extend(store.read(&target()).await.err());
    // The Vault store itself, not `Store::write`, whose redaction would hide a leak; then what
    // follows a write off the outage path (the custom metadata).
    errors.extend(vault.write(&target(), &req, &Prepared::none()).await.err());
    errors.extend(
        store
            .after_write(&target(), &req, &Prepared::none())
            .await
            .err(),
    );
    errors.extend(store.preflight(&target()).await.err());
    token_task_looked(name, c, approle, &lookups, &text, &json).await;
    assert!(
        !errors.is_empty(),
        "{name}: the bad answers must fail something"
    );
    for e in &errors {
        c.assert_absent(&format!("{name}: StoreError Display"), &e.to_string());
        c.assert_absent(&format!("{name}: StoreError Debug"), &format!("{e:?}"));
    }
    c.assert_absent(
        &format!("{name}: {{:?}} of the store"),
        &format!("{vault:?}"),
    );
    c.assert_absent(&format!("{name}: text log"), &text.text());
    c.assert_absent(&format!("{name}: JSON log"), &json.text());
    assert!(
        text.text().contains("TRACE") || json.text().contains("TRACE"),
        "{name}: the capture saw nothing at TRACE"
    );
}

/// The store's token task looks the token up once, beside the calls of [`run_scenario`], and what it
/// logs is searched too. With a token, its `lookup-self` is the one besides the preflight's: this
/// waits until the server has received it, then watches the log for a bounded time (this thread runs
/// the task: it reads the answer while the test sleeps). With AppRole no token is held until a login
/// works, which it never does here: the task has nothing to look at.
async fn token_task_looked(
    name: &str,
    c: &Canaries,
    approle: bool,
    lookups: &AtomicUsize,
    text: &Buf,
    json: &Buf,
) {
    if !approle {
        eventually(
            Duration::from_secs(10),
            &format!("{name}: the token task's lookup-self"),
            || async { lookups.load(Ordering::SeqCst) >= 2 },
        )
        .await;
    }
    holds_for(
        Duration::from_millis(300),
        &format!("{name}: no canary in the log while the token task reads its answer"),
        || async { c.found_in(&text.text()).is_empty() && c.found_in(&json.text()).is_empty() },
    )
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn truncated_json_holding_the_secret() {
    let c = Canaries::new();
    let secret = c.secret.clone();
    let script: Script = Arc::new(move |req| {
        token_endpoints(req).unwrap_or_else(|| {
            let full =
                String::from_utf8(envelope(json!({ "data": { "api_key": secret } }))).unwrap();
            let cut = full.find(secret.as_str()).unwrap() + secret.len();
            (200, "application/json", full.as_bytes()[..cut].to_vec())
        })
    });
    run_scenario("truncated JSON", &c, false, script).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_wrong_type_field_quoting_the_secret() {
    let c = Canaries::new();
    let secret = c.secret.clone();
    let script: Script = Arc::new(move |req| {
        token_endpoints(req).unwrap_or_else(|| {
            // `version` should be a number: serde's error quotes the string it found.
            let body = envelope(json!({
                "data": { "api_key": secret },
                "metadata": { "version": secret, "created_time": "", "deletion_time": "",
                              "destroyed": false, "custom_metadata": null }
            }));
            (200, "application/json", body)
        })
    });
    run_scenario("wrong-type field", &c, false, script).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_502_html_page_echoing_the_request() {
    let c = Canaries::new();
    let (secret, token) = (c.secret.clone(), c.token.clone());
    let script: Script = Arc::new(move |req| {
        let page = format!(
            "<html><body><h1>502 Bad Gateway</h1><pre>{} {}\n{}\n{}</pre><p>{secret} {token}</p></body></html>",
            req.method,
            req.path,
            req.head,
            String::from_utf8_lossy(&req.body)
        );
        (502, "text/html", page.into_bytes())
    });
    run_scenario("502 HTML echo", &c, false, script).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_body_that_is_not_utf8() {
    let c = Canaries::new();
    let secret = c.secret.clone();
    let script: Script = Arc::new(move |req| {
        token_endpoints(req).unwrap_or_else(|| {
            let mut body = vec![0xff, 0xfe, 0x00, 0xc3];
            body.extend_from_slice(secret.as_bytes());
            body.extend_from_slice(&[0xc3, 0x28]);
            let status = if req.method == "GET" { 200 } else { 500 };
            (status, "application/json", body)
        })
    });
    run_scenario("non-UTF-8 body", &c, false, script).await;
}

#[tokio::test(flavor = "current_thread")]
async fn vaults_errors_array_echoing_the_request() {
    let c = Canaries::new();
    let (secret, token) = (c.secret.clone(), c.token.clone());
    let script: Script = Arc::new(move |req| {
        let echo = format!(
            "1 error occurred: invalid value {} in {} (token {token}, value {secret})",
            String::from_utf8_lossy(&req.body),
            req.path
        );
        let status = match req.path.as_str() {
            "/v1/auth/token/lookup-self" => 403,
            _ if req.method == "GET" => 500,
            _ => 400,
        };
        let body = serde_json::to_vec(&json!({ "errors": [echo, "permission denied"] })).unwrap();
        (status, "application/json", body)
    });
    run_scenario("errors array echo", &c, false, script).await;
}

#[tokio::test(flavor = "current_thread")]
async fn an_approle_login_reply_that_does_not_parse() {
    let c = Canaries::new();
    let token = c.token.clone();
    let script: Script = Arc::new(move |req| {
        if req.path == "/v1/auth/approle/login" {
            let sent = String::from_utf8_lossy(&req.body).into_owned();
            // The token is there, but `lease_duration` is a string (quoting the request) and the
            // other required fields are missing.
            let body = serde_json::to_vec(&json!({
                "request_id": "r", "lease_id": "", "lease_duration": 0, "renewable": false,
                "auth": { "client_token": token, "lease_duration": sent, "renewable": token }
            }))
            .unwrap();
            return (200, "application/json", body);
        }
        token_endpoints(req).unwrap_or((404, "application/json", b"{\"errors\":[]}".to_vec()))
    });
    run_scenario("AppRole login that does not parse", &c, true, script).await;
}

// ---- the real binary, every target at TRACE, text and JSON ---------------------------------------

/// A Vault whose token endpoints work (so preflight passes) and whose KV answers cycle through the
/// bad kinds above, each echoing the request body (the new key) and the token it was sent.
fn echoing_vault() -> Script {
    let n = Arc::new(Mutex::new(0usize));
    Arc::new(move |req| {
        if let Some(a) = token_endpoints(req) {
            return a;
        }
        let token = req
            .head
            .lines()
            .find_map(|l| {
                l.strip_prefix("x-vault-token: ")
                    .or(l.strip_prefix("X-Vault-Token: "))
            })
            .unwrap_or("")
            .to_string();
        let sent = String::from_utf8_lossy(&req.body).into_owned();
        if req.path.starts_with("/v1/auth/approle/login") {
            let body = json!({ "auth": { "client_token": sent, "lease_duration": sent } });
            return (200, "application/json", serde_json::to_vec(&body).unwrap());
        }
        if req.method == "GET" {
            return (404, "application/json", b"{\"errors\":[]}".to_vec());
        }
        let mut i = n.lock().unwrap();
        *i += 1;
        let echo = format!("{sent} {token}");
        // In this order: the first four are retried (transient or unreadable), the 400 ends it.
        match *i % 5 {
            1 => (
                200,
                "application/json",
                format!("{{\"data\":{{\"echo\":\"{echo}").into_bytes(),
            ),
            2 => (
                200,
                "application/json",
                envelope(
                    json!({ "version": echo, "created_time": "", "deletion_time": "", "destroyed": false }),
                ),
            ),
            3 => (
                502,
                "text/html",
                format!("<html>{echo}</html>").into_bytes(),
            ),
            4 => {
                let mut b = vec![0xff, 0xfe];
                b.extend_from_slice(echo.as_bytes());
                (500, "application/json", b)
            }
            _ => (
                400,
                "application/json",
                serde_json::to_vec(&json!({ "errors": [echo] })).unwrap(),
            ),
        }
    })
}

fn daemon_config(dir: &std::path::Path, portal: &Portal, vault: &str, approle: bool) -> String {
    let auth = if approle {
        r#"approle = { role_id = { env = "KEYROTD_TEST_ROLE_ID" }, secret_id = { env = "KEYROTD_TEST_SECRET_ID" } }"#
    } else {
        r#"token = { env = "KEYROTD_TEST_VAULT_TOKEN" }"#
    };
    format!(
        r#"[daemon]
state_dir = "{state}"
listen = "127.0.0.1:0"
reconcile_interval = "0s"

[providers.portal]
kind = "aos"
base_url = "{portal}"
management_token = {{ env = "KEYROTD_TEST_AOS_TOKEN" }}

[stores.vault]
kind = "vault"
address = "{vault}"
{auth}

[[keys]]
name = "billing"
provider = "portal"
store_deadline = "15s"
max_rerotations = 0
watch = "0s"
  [[keys.destinations]]
  store = "vault"
  path = "apps/billing"
  field = "api_key"
"#,
        state = dir.join("state").display(),
        portal = portal.url(),
    )
}

/// Runs `keyrotd rotate billing` in this process (no daemon) at `RUST_LOG=trace` with log format
/// `format`; returns stdout and stderr together.
fn run_binary(config: &std::path::Path, c: &Canaries, portal: &Portal, format: &str) -> String {
    let args = ["rotate", "billing", "--reason", "leak check"];
    let out = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
        .arg("-c")
        .arg(config)
        .args(args)
        .env("KEYROTD_TEST_AOS_TOKEN", portal.token())
        .env("KEYROTD_TEST_VAULT_TOKEN", &c.token)
        .env("KEYROTD_TEST_ROLE_ID", &c.role_id)
        .env("KEYROTD_TEST_SECRET_ID", &c.secret_id)
        .env("KEYROTD__DAEMON__LOG_FORMAT", format)
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .output()
        .expect("run keyrotd");
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_at_trace_keeps_new_keys_and_tokens_out_of_text_and_json_logs() {
    let portal = Portal::start();
    let c = Canaries::new();
    let vault = scripted(echoing_vault()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keyrotd.toml");
    std::fs::write(&config, daemon_config(dir.path(), &portal, &vault, false)).unwrap();
    let mut logs = Vec::new();
    for format in ["text", "json"] {
        // The scripted Vault answers on the runtime's other thread meanwhile.
        let log = tokio::task::block_in_place(|| run_binary(&config, &c, &portal, format));
        logs.push((format, log));
    }
    let issued = portal.issued_secrets().await;
    assert!(
        !issued.is_empty(),
        "the portal issued no key: the run never reached the store"
    );
    for (format, log) in &logs {
        assert!(
            log.contains("TRACE"),
            "{format}: RUST_LOG=trace gave no TRACE line"
        );
        for kind in [
            "not the JSON keyrotd expects",
            "failed with HTTP 502",
            "failed with HTTP 400",
        ] {
            assert!(
                log.contains(kind),
                "{format}: the store never saw {kind:?}:\n{log}"
            );
        }
        for s in &issued {
            assert!(
                !log.contains(s.as_str()),
                "a new key leaked into the {format} output:\n{log}"
            );
        }
        c.assert_absent(&format!("{format} output"), log);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_at_trace_keeps_approle_credentials_out_of_a_failed_login() {
    let portal = Portal::start();
    let c = Canaries::new();
    let vault = scripted(echoing_vault()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keyrotd.toml");
    std::fs::write(&config, daemon_config(dir.path(), &portal, &vault, true)).unwrap();
    for format in ["text", "json"] {
        let log = tokio::task::block_in_place(|| run_binary(&config, &c, &portal, format));
        assert!(
            log.contains("TRACE"),
            "{format}: RUST_LOG=trace gave no TRACE line"
        );
        assert!(
            log.contains("AppRole login"),
            "{format}: the login failure is reported:\n{log}"
        );
        c.assert_absent(&format!("{format} output"), &log);
    }
}
