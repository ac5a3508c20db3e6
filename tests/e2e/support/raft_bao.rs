//! A real OpenBao that keeps its data when it is stopped and started again: one node on integrated
//! storage (raft) in a temporary directory, initialised by the test with a single unseal key, with a
//! KV v2 engine at `secret/` (as the dev server has). The dev server keeps everything in memory, so a
//! restart of it would be a new, empty server; this one restarts as a production server does: sealed,
//! until the test unseals it.
//!
//! keyrotd reaches it through a [`Gate`]. Each start listens on port 0 (the kernel's choice, read
//! back as every child's port is), and the gate is pointed at the new port: keyrotd keeps one address
//! across the restart, and no port is chosen by the test.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::gate::Gate;
use super::process::{Proc, http_status};
use super::tools_bin;

/// How long OpenBao gets to answer HTTP after starting, and to become active after unsealing.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct RaftBao {
    /// `http://127.0.0.1:PORT` of the gate: what keyrotd is given; the same across restarts.
    pub addr: String,
    pub root_token: String,
    unseal_key: String,
    /// `http://127.0.0.1:PORT` of the server now running (`None` while stopped).
    direct: Option<String>,
    gate: Gate,
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    starts: usize,
    http: reqwest::Client,
}

impl RaftBao {
    /// Starts a new server, initialises and unseals it, and mounts KV v2 at `secret/`.
    pub async fn start() -> RaftBao {
        let dir = tempfile::tempdir().expect("temp dir for OpenBao's storage");
        std::fs::create_dir_all(dir.path().join("data")).expect("OpenBao data dir");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("reqwest client");
        let (proc, direct) = spawn(dir.path(), 0);
        let init = call(
            &http,
            reqwest::Method::PUT,
            &format!("{direct}/v1/sys/init"),
            None,
            Some(json!({ "secret_shares": 1, "secret_threshold": 1 })),
        )
        .await;
        let text = |v: &Value, ptr: &str| {
            v.pointer(ptr)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("OpenBao init answered without {ptr}: {v}"))
                .to_string()
        };
        let gate = Gate::new(direct.trim_start_matches("http://").parse().expect("addr"));
        let bao = RaftBao {
            addr: gate.url(),
            root_token: text(&init, "/root_token"),
            unseal_key: text(&init, "/keys/0"),
            direct: Some(direct),
            gate,
            proc: Some(proc),
            dir,
            starts: 1,
            http,
        };
        bao.unseal().await;
        bao.api(
            reqwest::Method::POST,
            "sys/mounts/secret",
            Some(json!({ "type": "kv", "options": { "version": "2" } })),
        )
        .await;
        bao
    }

    /// Stops the server (SIGTERM, as systemd would) and waits for it to exit. Through the gate,
    /// connections are refused until [`RaftBao::start_again`].
    pub fn stop(&mut self) {
        let mut proc = self.proc.take().expect("OpenBao is running");
        proc.signal("TERM");
        assert!(
            proc.wait_exit(Duration::from_secs(30)).is_some(),
            "OpenBao did not stop within 30s; its log:\n{}",
            proc.log_text()
        );
        self.direct = None;
    }

    /// Starts the server again on its stored data, unseals it and points the gate at it.
    pub async fn start_again(&mut self) {
        assert!(self.proc.is_none(), "OpenBao is already running");
        let (proc, direct) = spawn(self.dir.path(), self.starts);
        self.starts += 1;
        self.proc = Some(proc);
        self.direct = Some(direct.clone());
        self.unseal().await;
        self.gate
            .retarget(direct.trim_start_matches("http://").parse().expect("addr"));
    }

    /// `http://127.0.0.1:PORT` of the server now running.
    pub fn direct_url(&self) -> &str {
        self.direct.as_deref().expect("OpenBao is running")
    }

    async fn unseal(&self) {
        let direct = self.direct_url().to_string();
        call(
            &self.http,
            reqwest::Method::PUT,
            &format!("{direct}/v1/sys/unseal"),
            None,
            Some(json!({ "key": self.unseal_key })),
        )
        .await;
        // Unsealed, raft elects this single node; until then requests answer 5xx.
        let start = Instant::now();
        loop {
            let health = self
                .http
                .get(format!("{direct}/v1/sys/health"))
                .send()
                .await
                .map(|r| r.status().as_u16());
            if health.as_ref().is_ok_and(|s| *s == 200) {
                return;
            }
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "OpenBao was not active {READY_TIMEOUT:?} after unsealing (health {health:?}); its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// A request as root to the running server; panics on an error (test setup must work).
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/v1/{path}", self.direct_url());
        call(&self.http, method, &url, Some(&self.root_token), body).await
    }
}

/// Starts `bao server` on the storage in `dir`; returns it and its API URL once it answers HTTP
/// (sealed: health says 503 until unsealed).
fn spawn(dir: &std::path::Path, n: usize) -> (Proc, String) {
    let bin = tools_bin().join("bao");
    assert!(
        bin.exists(),
        "OpenBao binary not found at {}: run scripts/install-tools.sh",
        bin.display()
    );
    let config: PathBuf = dir.join("openbao.hcl");
    // api_addr/cluster_addr are only advertised to other nodes; a single node never dials them.
    std::fs::write(
        &config,
        format!(
            r#"storage "raft" {{
  path = "{data}"
  node_id = "node-1"
}}
listener "tcp" {{
  address = "127.0.0.1:0"
  cluster_address = "127.0.0.1:0"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:8200"
cluster_addr = "http://127.0.0.1:8201"
"#,
            data = dir.join("data").display()
        ),
    )
    .expect("write the OpenBao config");
    let mut cmd = Command::new(bin);
    cmd.arg("server")
        .arg(format!("-config={}", config.display()))
        .env("HOME", dir);
    let log = dir.join(format!("openbao-{n}.log"));
    let mut proc = Proc::spawn_logging_to("OpenBao (raft)", cmd, &log);
    let port = proc.wait_port(READY_TIMEOUT, |p| {
        http_status(p, "/v1/sys/health").is_some()
    });
    (proc, format!("http://127.0.0.1:{port}"))
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Value {
    let mut req = http.request(method.clone(), url);
    if let Some(t) = token {
        req = req.header("X-Vault-Token", t);
    }
    if let Some(b) = &body {
        req = req.json(b);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("OpenBao {method} {url}: {e}"));
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(
        status.is_success(),
        "OpenBao {method} {url} answered {status}: {text}"
    );
    serde_json::from_str(&text).unwrap_or(Value::Null)
}
