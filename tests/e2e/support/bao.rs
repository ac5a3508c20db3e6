//! A real OpenBao dev server for tests: `bao server -dev` on a loopback port it picks itself, with a
//! random root token and `secret/` mounted as KV v2 (dev mode does that), killed when the [`Bao`] is
//! dropped.
//!
//! keyrotd and the dependents reach it through a [`Gate`]: [`Bao::down`] makes it unreachable for them
//! (keeping its data) and [`Bao::up`] brings it back, for tests that take OpenBao away mid-rotation.
//! The test's own helpers talk to the server directly, so they work while it is down.

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use super::gate::Gate;
use super::process::{Proc, http_status};
use super::tools_bin;

/// How long OpenBao gets to answer `/v1/sys/health` after starting.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Bao {
    /// `http://127.0.0.1:PORT` of the gate: what keyrotd and the dependents are given.
    pub addr: String,
    pub root_token: String,
    /// `http://127.0.0.1:PORT` of the server itself.
    direct: String,
    gate: Gate,
    _proc: Proc,
    http: reqwest::Client,
}

impl Bao {
    /// Starts OpenBao. Panics with a clear message when the binary is missing or it does not come up.
    pub fn start() -> Bao {
        Bao::start_with_config(None)
    }

    /// Starts OpenBao with a file audit device writing every request it serves to `log` (one JSON
    /// object per request and per response): OpenBao's own count of the traffic it received.
    pub fn start_with_audit(log: &std::path::Path) -> Bao {
        let dir = log.parent().expect("an audit log path has a directory");
        let config = dir.join("openbao-audit.hcl");
        std::fs::write(
            &config,
            format!(
                "audit \"file\" \"requests\" {{\n  options {{\n    file_path = {:?}\n  }}\n}}\n",
                log.display().to_string()
            ),
        )
        .expect("write the OpenBao audit config");
        Bao::start_with_config(Some(&config))
    }

    /// `http://127.0.0.1:PORT` of the server itself (not the gate).
    pub fn direct_url(&self) -> &str {
        &self.direct
    }

    fn start_with_config(config: Option<&std::path::Path>) -> Bao {
        let root_token = format!("root-{}", uuid::Uuid::new_v4().simple());
        let bin = tools_bin().join("bao");
        assert!(
            bin.exists(),
            "OpenBao binary not found at {}: run scripts/install-tools.sh",
            bin.display()
        );
        let mut cmd = Command::new(bin);
        cmd.args([
            "server",
            "-dev",
            &format!("-dev-root-token-id={root_token}"),
            "-dev-listen-address=127.0.0.1:0",
            "-dev-no-store-token",
        ])
        .env("HOME", std::env::temp_dir());
        if let Some(c) = config {
            cmd.arg(format!("-config={}", c.display()));
        }
        let mut proc = Proc::spawn("OpenBao", cmd);
        // It also listens on a cluster port (TLS): the API port is the one that answers HTTP health.
        let port = proc.wait_port(READY_TIMEOUT, |p| {
            http_status(p, "/v1/sys/health") == Some(200)
        });
        let gate = Gate::new(([127, 0, 0, 1], port).into());
        Bao {
            addr: gate.url(),
            root_token,
            direct: format!("http://127.0.0.1:{port}"),
            gate,
            _proc: proc,
            http: reqwest::Client::new(),
        }
    }

    /// keyrotd and the dependents can no longer reach OpenBao (it keeps its data).
    pub fn down(&self) {
        self.gate.close();
    }

    /// OpenBao is reachable again.
    pub fn up(&self) {
        self.gate.open();
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
            .request(method.clone(), format!("{}/v1/{path}", self.direct))
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

    /// Field `field` of the latest KV v2 version at `path`; `None` when the path or the field is not
    /// there (never panics: tests poll this while keyrotd is writing).
    pub async fn kv_field(&self, path: &str, field: &str) -> Option<String> {
        let resp = self
            .http
            .get(format!("{}/v1/secret/data/{path}", self.direct))
            .header("X-Vault-Token", &self.root_token)
            .send()
            .await
            .ok()?;
        let v: Value = resp.json().await.ok()?;
        v["data"]["data"][field].as_str().map(String::from)
    }

    /// The KV v2 metadata at `path`, or `Null` when there is none (never panics).
    pub async fn kv_metadata_opt(&self, path: &str) -> Value {
        let resp = self
            .http
            .get(format!("{}/v1/secret/metadata/{path}", self.direct))
            .header("X-Vault-Token", &self.root_token)
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => {
                r.json::<Value>().await.unwrap_or_default()["data"].clone()
            }
            _ => Value::Null,
        }
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
