//! A whole world for end-to-end tests: OpenBao, moto, the portal simulator and two dependents (one
//! reading the key from OpenBao, one from AWS), a keyrotd config wired to them, and the real
//! `keyrotd` binary started as a daemon (`keyrotd run`) or as a command.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::bao::Bao;
use super::free_port;
use super::moto::{Moto, REGION, aws_env};
use super::sim::{Dependent, DependentOptions, DependentSource, Portal};

pub const KEY: &str = "billing";
pub const VAULT_PATH: &str = "apps/billing";
pub const AWS_SECRET: &str = "prod/billing";
pub const ADMIN_TOKEN: &str = "test-admin-token-7f3a";
pub const HOOK_KEY: &str = "test-hook-signing-key-91c2";

/// Knobs of the generated config; `Default` is a key without schedule (manual), fast watch, short
/// deadlines, two dependents with verify and signed HTTP reload hooks.
#[derive(Clone)]
pub struct Options {
    pub schedule: Option<String>,
    pub max_age: Option<String>,
    pub watch: String,
    pub watch_interval: String,
    pub store_deadline: String,
    pub reconcile_interval: String,
    pub max_rerotations: u32,
    pub max_regenerations_per_day: u32,
    pub auto_recover: bool,
    pub with_aws: bool,
    pub with_file: bool,
    pub log_format: String,
    /// Extra TOML appended to the `[[keys]]` table (before destinations), e.g. `jitter = "1s"`.
    pub key_extra: String,
    /// A command hook dependent (argv), in addition to the two HTTP ones.
    pub command_hook: Option<Vec<String>>,
    pub admin_token: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            schedule: None,
            max_age: None,
            watch: "0s".into(),
            watch_interval: "1s".into(),
            store_deadline: "10s".into(),
            reconcile_interval: "0s".into(),
            max_rerotations: 3,
            max_regenerations_per_day: 20,
            auto_recover: true,
            with_aws: true,
            with_file: true,
            log_format: "text".into(),
            key_extra: String::new(),
            command_hook: None,
            admin_token: true,
        }
    }
}

/// Every outside component a rotation touches, running.
pub struct Stack {
    pub bao: Bao,
    pub moto: Moto,
    pub portal: Portal,
    pub dep_vault: Dependent,
    pub dep_aws: Dependent,
    pub dir: tempfile::TempDir,
    pub listen: String,
}

impl Stack {
    /// Starts OpenBao, moto (with the AWS secret created), the portal and the two dependents.
    pub async fn start() -> Stack {
        let bao = Bao::start();
        let moto = Moto::start();
        moto.create_secret(AWS_SECRET, "{}").await;
        let portal = Portal::start();
        let dep_vault = Dependent::start_with(
            portal.url(),
            signed(DependentSource::Vault {
                addr: bao.addr.clone(),
                mount: "secret".into(),
                path: VAULT_PATH.into(),
                field: "api_key".into(),
                token: bao.root_token.clone(),
            }),
        );
        let dep_aws = Dependent::start_with(
            portal.url(),
            signed(DependentSource::Aws {
                endpoint: moto.endpoint.clone(),
                secret_id: AWS_SECRET.into(),
                field: Some("api_key".into()),
                region: REGION.into(),
                access_key_id: "test".into(),
                secret_access_key: "test".into(),
            }),
        );
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("keys")).expect("keys dir");
        let listen = format!("127.0.0.1:{}", free_port());
        Stack {
            bao,
            moto,
            portal,
            dep_vault,
            dep_aws,
            dir,
            listen,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("keys").join("billing.key")
    }

    /// The keyrotd config for this stack.
    pub fn config(&self, o: &Options) -> String {
        let mut key_opts = String::new();
        if let Some(s) = &o.schedule {
            key_opts.push_str(&format!("schedule = {s:?}\n"));
        }
        if let Some(m) = &o.max_age {
            key_opts.push_str(&format!("max_age = {m:?}\n"));
        }
        let admin = if o.admin_token {
            "admin_token = { env = \"KEYROTD_TEST_ADMIN_TOKEN\" }"
        } else {
            ""
        };
        let mut text = format!(
            r#"[daemon]
state_dir = "{state}"
listen = "{listen}"
{admin}
reconcile_interval = "{reconcile}"
log_format = "{log_format}"

[providers.portal]
kind = "aos"
base_url = "{portal}"
management_token = {{ env = "KEYROTD_TEST_AOS_TOKEN" }}
account_id = "acct_42"
timeout = "5s"

[stores.vault]
kind = "vault"
address = "{bao}"
token = {{ env = "KEYROTD_TEST_VAULT_TOKEN" }}

[stores.aws]
kind = "aws"
region = "{region}"
endpoint_url = "{moto}"

[stores.local]
kind = "file"
dir = "{keys}"

[[keys]]
name = "{KEY}"
provider = "portal"
{key_opts}watch = "{watch}"
watch_interval = "{watch_interval}"
store_deadline = "{deadline}"
auto_recover = {auto_recover}
max_rerotations = {max_rerotations}
max_regenerations_per_day = {max_regen}
{key_extra}
  [[keys.destinations]]
  store = "vault"
  path = "{VAULT_PATH}"
  field = "api_key"
"#,
            state = self.state_dir().display(),
            listen = self.listen,
            reconcile = o.reconcile_interval,
            log_format = o.log_format,
            portal = self.portal.url(),
            bao = self.bao.addr,
            region = REGION,
            moto = self.moto.endpoint,
            keys = self.dir.path().join("keys").display(),
            watch = o.watch,
            watch_interval = o.watch_interval,
            deadline = o.store_deadline,
            auto_recover = o.auto_recover,
            max_rerotations = o.max_rerotations,
            max_regen = o.max_regenerations_per_day,
            key_extra = o.key_extra,
        );
        if o.with_aws {
            text.push_str(&format!(
                "\n  [[keys.destinations]]\n  store = \"aws\"\n  secret_id = \"{AWS_SECRET}\"\n  field = \"api_key\"\n"
            ));
        }
        if o.with_file {
            text.push_str(
                "\n  [[keys.destinations]]\n  store = \"local\"\n  file = \"billing.key\"\n",
            );
        }
        for (name, dep, store) in [
            ("worker", &self.dep_vault, "vault"),
            ("edge", &self.dep_aws, "aws"),
        ] {
            if store == "aws" && !o.with_aws {
                continue;
            }
            text.push_str(&format!(
                r#"
  [[keys.dependents]]
  name = "{name}"
  reads_from = ["{store}"]
  verify = {{ url = "{verify}", expect_status = 200, timeout = "2s" }}
  reload = {{ url = "{reload}", timeout = "3s", signing_key = {{ env = "KEYROTD_TEST_HOOK_KEY" }} }}
"#,
                verify = dep.verify_url(),
                reload = dep.reload_url(),
            ));
        }
        if let Some(cmd) = &o.command_hook {
            let argv: Vec<String> = cmd.iter().map(|a| format!("{a:?}")).collect();
            text.push_str(&format!(
                "\n  [[keys.dependents]]\n  name = \"script\"\n  reads_from = [\"local\"]\n  reload = {{ command = [{}], timeout = \"5s\" }}\n",
                argv.join(", ")
            ));
        }
        text
    }

    /// Writes the config for these options and returns its path.
    pub fn write_config(&self, o: &Options) -> PathBuf {
        let path = self.dir.path().join("keyrotd.toml");
        std::fs::write(&path, self.config(o)).expect("write config");
        path
    }

    /// The environment keyrotd needs for this stack (credentials, AWS).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = aws_env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push((
            "KEYROTD_TEST_AOS_TOKEN".into(),
            self.portal.token().to_string(),
        ));
        env.push((
            "KEYROTD_TEST_VAULT_TOKEN".into(),
            self.bao.root_token.clone(),
        ));
        env.push(("KEYROTD_TEST_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()));
        env.push(("KEYROTD_TEST_HOOK_KEY".into(), HOOK_KEY.into()));
        env.push(("RUST_LOG".into(), "info,keyrotd=debug".into()));
        env
    }

    /// Runs a `keyrotd` command to completion: (exit code, stdout, stderr).
    pub fn command(&self, config: &Path, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
            .arg("-c")
            .arg(config)
            .args(args)
            .envs(self.env())
            .stdin(Stdio::null())
            .output()
            .expect("run keyrotd");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts `keyrotd run` and waits until `/readyz` answers 200.
    pub async fn daemon(&self, config: &Path) -> Daemon {
        self.daemon_with_env(config, &[]).await
    }

    pub async fn daemon_with_env(&self, config: &Path, extra: &[(&str, &str)]) -> Daemon {
        let d = self.spawn_daemon(config, extra);
        d.wait_ready(Duration::from_secs(60)).await;
        d
    }

    /// Starts `keyrotd run` without waiting for readiness.
    pub fn spawn_daemon(&self, config: &Path, extra: &[(&str, &str)]) -> Daemon {
        let log_path = self.dir.path().join(format!("daemon-{}.log", free_port()));
        let log = std::fs::File::create(&log_path).expect("daemon log");
        let stdout = log.try_clone().expect("log handle");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd"));
        cmd.arg("-c").arg(config).arg("run").envs(self.env());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .expect("spawn keyrotd run");
        Daemon {
            child: Some(child),
            base: format!("http://{}", self.listen),
            log: log_path,
        }
    }

    /// What every destination holds now: fingerprints (None when empty or unreadable).
    pub async fn destination_fingerprints(&self) -> Vec<Option<String>> {
        let mut out = Vec::new();
        // Tolerant: a path never written answers 404, and a stopped OpenBao answers nothing.
        let vault = reqwest::Client::new()
            .get(format!("{}/v1/secret/data/{VAULT_PATH}", self.bao.addr))
            .header("X-Vault-Token", &self.bao.root_token)
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success());
        let vault_value = match vault {
            Some(r) => r.json::<Value>().await.ok(),
            None => None,
        };
        out.push(vault_value.and_then(|v| v["data"]["data"]["api_key"].as_str().map(fp)));
        let client = self.moto.client().await;
        let aws = client
            .get_secret_value()
            .secret_id(AWS_SECRET)
            .send()
            .await
            .ok();
        let aws_value = aws
            .and_then(|o| o.secret_string().map(String::from))
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v["api_key"].as_str().map(String::from));
        out.push(aws_value.as_deref().map(fp));
        if let Ok(bytes) = std::fs::read(self.key_file()) {
            out.push(Some(keyrotd::secret::fingerprint_bytes(&bytes)));
        } else {
            out.push(None);
        }
        out
    }

    /// The consistent end state: every destination holds the portal's active key, both dependents
    /// authenticate with it.
    pub async fn assert_consistent(&self, o: &Options) {
        let state = self.portal.state().await;
        let fps = self.destination_fingerprints().await;
        let expected: Vec<Option<String>> = [true, o.with_aws, o.with_file]
            .iter()
            .zip(&fps)
            .filter(|(on, _)| **on)
            .map(|_| Some(state.fingerprint.clone()))
            .collect();
        let held: Vec<Option<String>> = [true, o.with_aws, o.with_file]
            .iter()
            .zip(fps)
            .filter(|(on, _)| **on)
            .map(|(_, f)| f)
            .collect();
        assert_eq!(
            held, expected,
            "every destination holds the portal's active key"
        );
        assert_eq!(
            self.dep_vault.verify().await,
            200,
            "the vault-reading dependent authenticates"
        );
        if o.with_aws {
            assert_eq!(
                self.dep_aws.verify().await,
                200,
                "the aws-reading dependent authenticates"
            );
        }
    }

    /// Waits (polling) until `check` holds; panics with `what` after `timeout`.
    pub async fn eventually<F, Fut>(&self, timeout: Duration, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("timed out after {timeout:?} waiting for: {what}");
    }

    /// The key's journal as JSON (phase, ids, budget).
    pub fn journal(&self) -> Value {
        let path = self.state_dir().join("journal").join(format!("{KEY}.json"));
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    /// Every audit record.
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state_dir().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn signed(source: DependentSource) -> DependentOptions {
    let mut o = DependentOptions::new(source);
    o.signing_key = Some(HOOK_KEY.into());
    o.probe_interval = Duration::from_millis(500);
    o
}

pub fn fp(secret: &str) -> String {
    keyrotd::secret::fingerprint_bytes(secret.as_bytes())
}

/// A running `keyrotd run`.
pub struct Daemon {
    child: Option<Child>,
    pub base: String,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        let http = reqwest::Client::new();
        while start.elapsed() < timeout {
            if let Ok(r) = http.get(format!("{}/readyz", self.base)).send().await
                && r.status().as_u16() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "keyrotd did not become ready in {timeout:?}; log:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// SIGKILL: a crash, nothing runs after it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal("TERM");
        let start = Instant::now();
        let mut child = self.child.take().expect("daemon running");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                panic!(
                    "keyrotd did not exit within {timeout:?} after SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = reqwest::get(format!("{}{path}", self.base))
            .await
            .expect("GET");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.base))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .unwrap_or_default()
    }

    /// POST with an optional bearer token.
    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.expect("POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Starts a rotation through the API and waits for its outcome; returns the record.
    pub async fn rotate(&self, reason: &str) -> Value {
        let (status, body) = self
            .post(
                &format!("/v1/keys/{KEY}/rotate"),
                Some(ADMIN_TOKEN),
                serde_json::json!({ "reason": reason }),
            )
            .await;
        assert_eq!(status, 202, "rotation accepted: {body}");
        let id = body["rotation_id"]
            .as_str()
            .expect("rotation_id")
            .to_string();
        self.wait_rotation(&id, Duration::from_secs(60)).await
    }

    /// Waits for a rotation's outcome.
    pub async fn wait_rotation(&self, id: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let (status, r) = self.get(&format!("/v1/rotations/{id}")).await;
            if status == 200 && !r["outcome"].is_null() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "rotation {id} did not finish in {timeout:?}; log:\n{}",
            self.log_text()
        );
    }

    /// The key's live view (`GET /v1/keys/billing`).
    pub async fn key(&self) -> Value {
        self.get(&format!("/v1/keys/{KEY}")).await.1
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Every sample of metric `name` (exact name, e.g. `keyrotd_rotations_total` or
/// `keyrotd_invalidation_window_seconds_count`) in a Prometheus text exposition: (labels, value).
pub fn metric_samples(
    text: &str,
    name: &str,
) -> Vec<(std::collections::BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let (metric, labels) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let mut map = std::collections::BTreeMap::new();
        // Label values here never contain `,` or `"` (names from the config and fixed sets).
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once('=') {
                map.insert(k.to_string(), v.trim_matches('"').to_string());
            }
        }
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or(f64::NAN),
        };
        out.push((map, value));
    }
    out
}

/// The value of the one sample of `name` whose labels include every `(label, value)` of `labels`;
/// `None` when there is none. Panics when several match (the test must name the series exactly).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = metric_samples(text, name)
        .into_iter()
        .filter(|(l, _)| {
            labels
                .iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .collect();
    assert!(
        matching.len() <= 1,
        "{name}{labels:?} matches {} series",
        matching.len()
    );
    matching.first().copied()
}

impl Stack {
    /// Writes `secret` into every destination (Vault, AWS, file) as an operator would before keyrotd
    /// first starts.
    pub async fn seed_destinations(&self, secret: &str) {
        self.bao
            .kv_put(VAULT_PATH, serde_json::json!({ "api_key": secret }))
            .await;
        self.moto
            .client()
            .await
            .put_secret_value()
            .secret_id(AWS_SECRET)
            .secret_string(serde_json::json!({ "api_key": secret }).to_string())
            .send()
            .await
            .expect("moto PutSecretValue");
        std::fs::write(self.key_file(), secret).expect("write key file");
    }

    /// The fingerprint of the key OpenBao holds; None when empty, down or unreadable (never panics).
    pub async fn vault_fingerprint(&self) -> Option<String> {
        let r = reqwest::Client::new()
            .get(format!("{}/v1/secret/data/{VAULT_PATH}", self.bao.addr))
            .header("X-Vault-Token", &self.bao.root_token)
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        v["data"]["data"]["api_key"].as_str().map(fp)
    }

    /// How many times the portal regenerated (out-of-band rotations included).
    pub async fn regenerations(&self) -> u64 {
        self.portal.state().await.regenerations
    }
}

impl Daemon {
    /// Starts a rotation through the API and returns its id at once (202 asserted).
    pub async fn start_rotate(&self, reason: &str) -> String {
        let (status, body) = self
            .post(
                &format!("/v1/keys/{KEY}/rotate"),
                Some(ADMIN_TOKEN),
                serde_json::json!({ "reason": reason }),
            )
            .await;
        assert_eq!(status, 202, "rotation accepted: {body}");
        body["rotation_id"]
            .as_str()
            .expect("rotation_id")
            .to_string()
    }

    /// Waits until the key's live phase is `phase` (e.g. "regenerating").
    pub async fn wait_phase(&self, phase: &str, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.key().await["phase"] == phase {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "key never reached phase {phase} in {timeout:?}; log:\n{}",
            self.log_text()
        );
    }

    /// The value of metric `name` on the line carrying every label in `labels` (e.g.
    /// `key="billing"`), if exported.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .find(|l| labels.iter().all(|lab| l.contains(lab)))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}
