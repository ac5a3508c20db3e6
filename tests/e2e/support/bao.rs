//! A real OpenBao dev server for tests: `bao server -dev` on a free port of 127.0.0.1 with a random
//! root token, `secret/` mounted as KV v2 (dev mode does that). Its output goes to a temp file, shown
//! only when it fails to come up. The process is killed when the [`Bao`] is dropped.
//!
//! [`Bao::stop`] and [`Bao::start_again`] restart it on the same address and root token, for tests
//! that take OpenBao away mid-rotation. Dev mode keeps everything in memory: a restarted server is
//! empty again (no KV data, policies, tokens other than root, or auth methods).
//!
//! `start`/`stop`/`start_again` are blocking (they poll the port with plain TCP); the helpers that talk
//! to the API are async.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{free_port, tools_bin};

/// How long OpenBao gets to answer `/v1/sys/health` after starting.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Bao {
    /// `http://127.0.0.1:PORT`
    pub addr: String,
    pub root_token: String,
    port: u16,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
    http: reqwest::Client,
}

impl Bao {
    /// Starts OpenBao. Panics with a clear message when the binary is missing or it does not come up.
    pub fn start() -> Bao {
        let root_token = format!("root-{}", uuid::Uuid::new_v4().simple());
        let mut last_port = 0;
        // A free port can be taken between our probe and bao's bind: try a few.
        for _ in 0..3 {
            let port = free_port();
            last_port = port;
            let mut bao = Bao {
                addr: format!("http://127.0.0.1:{port}"),
                root_token: root_token.clone(),
                port,
                child: None,
                log: tempfile::Builder::new()
                    .prefix("keyrotd-test-bao-")
                    .suffix(".log")
                    .tempfile()
                    .expect("cannot create a temp file for OpenBao's log"),
                http: reqwest::Client::new(),
            };
            if bao.spawn_and_wait().is_ok() {
                return bao;
            }
        }
        panic!(
            "OpenBao did not come up on 127.0.0.1:{last_port} after 3 attempts (its log is above)"
        );
    }

    fn binary() -> PathBuf {
        let bin = tools_bin().join("bao");
        assert!(
            bin.exists(),
            "OpenBao binary not found at {}: run scripts/install-tools.sh",
            bin.display()
        );
        bin
    }

    /// Spawns `bao server -dev` on `self.port` and waits for it. On failure, prints its log.
    fn spawn_and_wait(&mut self) -> Result<(), ()> {
        let out = std::fs::OpenOptions::new()
            .append(true)
            .open(self.log.path())
            .and_then(|f| f.try_clone().map(|g| (f, g)))
            .expect("cannot open OpenBao's log file");
        let mut child = Command::new(Self::binary())
            .args([
                "server",
                "-dev",
                &format!("-dev-root-token-id={}", self.root_token),
                &format!("-dev-listen-address=127.0.0.1:{}", self.port),
                "-dev-no-store-token",
            ])
            .env("HOME", std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.0))
            .stderr(Stdio::from(out.1))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start OpenBao ({e}): run scripts/install-tools.sh"));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!(
                    "OpenBao exited early ({status}) on port {}; its log:\n{}",
                    self.port,
                    self.log_text()
                );
                return Err(());
            }
            if http_status(self.port, "/v1/sys/health") == Some(200) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "OpenBao did not answer /v1/sys/health on 127.0.0.1:{} within {:?}; its log:\n{}\n\
                     (is it installed? run scripts/install-tools.sh)",
                    self.port,
                    READY_TIMEOUT,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What OpenBao has printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Kills the server and waits until the port no longer answers. All its data is lost.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh dev server on the same address with the same root token (empty again).
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "OpenBao is still running: stop() it first"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        // The old process's socket may linger for a moment.
        while self.spawn_and_wait().is_err() {
            assert!(
                Instant::now() < deadline,
                "OpenBao could not start again on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A request as root; panics on a transport error or a non-2xx answer (test setup must work).
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.api_as(&self.root_token, method, path, body).await
    }

    pub async fn api_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        self.request(token, None, method, path, body).await
    }

    /// A request as root inside namespace `ns`.
    pub async fn api_in_namespace(
        &self,
        ns: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        self.request(&self.root_token, Some(ns), method, path, body)
            .await
    }

    async fn request(
        &self,
        token: &str,
        ns: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", token);
        if let Some(ns) = ns {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = &body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("OpenBao {method} {path}: {e}"));
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "OpenBao {method} {path} answered {status}: {text}"
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Creates namespace `ns` with a KV v2 engine mounted at `secret/` inside it.
    pub async fn create_namespace(&self, ns: &str) {
        self.api(reqwest::Method::POST, &format!("sys/namespaces/{ns}"), None)
            .await;
        self.api_in_namespace(
            ns,
            reqwest::Method::POST,
            "sys/mounts/secret",
            Some(json!({ "type": "kv", "options": { "version": "2" } })),
        )
        .await;
    }

    /// Creates or replaces an ACL policy.
    pub async fn write_policy(&self, name: &str, hcl: &str) {
        self.api(
            reqwest::Method::PUT,
            &format!("sys/policies/acl/{name}"),
            Some(json!({ "policy": hcl })),
        )
        .await;
    }

    /// A new token with these policies (and not `default`'s extras beyond what it grants).
    pub async fn create_token(&self, policies: &[&str]) -> String {
        let v = self
            .api(
                reqwest::Method::POST,
                "auth/token/create",
                Some(json!({ "policies": policies, "ttl": "1h" })),
            )
            .await;
        v.pointer("/auth/client_token")
            .and_then(Value::as_str)
            .expect("auth/token/create returned no client_token")
            .to_string()
    }

    /// Enables AppRole at `approle/` (once) and creates `role` with `policies`. Returns
    /// (role_id, secret_id).
    pub async fn enable_approle(&self, role: &str, policies: &[&str]) -> (String, String) {
        let mounts = self.api(reqwest::Method::GET, "sys/auth", None).await;
        let mounted =
            mounts.get("approle/").is_some() || mounts.pointer("/data/approle~1").is_some();
        if !mounted {
            self.api(
                reqwest::Method::POST,
                "sys/auth/approle",
                Some(json!({ "type": "approle" })),
            )
            .await;
        }
        self.api(
            reqwest::Method::POST,
            &format!("auth/approle/role/{role}"),
            Some(json!({ "token_policies": policies, "token_ttl": "10m" })),
        )
        .await;
        let role_id = self
            .api(
                reqwest::Method::GET,
                &format!("auth/approle/role/{role}/role-id"),
                None,
            )
            .await;
        let secret_id = self
            .api(
                reqwest::Method::POST,
                &format!("auth/approle/role/{role}/secret-id"),
                None,
            )
            .await;
        (
            role_id
                .pointer("/data/role_id")
                .and_then(Value::as_str)
                .expect("no role_id")
                .to_string(),
            secret_id
                .pointer("/data/secret_id")
                .and_then(Value::as_str)
                .expect("no secret_id")
                .to_string(),
        )
    }

    /// Writes a whole KV v2 secret under `secret/` (no check-and-set), as an operator would.
    pub async fn kv_put(&self, path: &str, data: Value) -> Value {
        self.api(
            reqwest::Method::POST,
            &format!("secret/data/{path}"),
            Some(json!({ "data": data })),
        )
        .await
    }

    /// The latest KV v2 version under `secret/`: `{"data": {...}, "metadata": {...}}`.
    pub async fn kv_get(&self, path: &str) -> Value {
        self.api(reqwest::Method::GET, &format!("secret/data/{path}"), None)
            .await
            .get("data")
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The KV v2 metadata under `secret/` (versions, custom_metadata...).
    pub async fn kv_metadata(&self, path: &str) -> Value {
        self.api(
            reqwest::Method::GET,
            &format!("secret/metadata/{path}"),
            None,
        )
        .await
        .get("data")
        .cloned()
        .unwrap_or(Value::Null)
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The HTTP status of `GET path` on 127.0.0.1:port, or None when nothing answers. Plain TCP, so
/// it needs no runtime.
pub(crate) fn http_status(port: u16, path: &str) -> Option<u16> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 32];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let line = std::str::from_utf8(&head[..n]).ok()?;
    line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}
