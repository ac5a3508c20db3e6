//! A world for a vendor that keeps two keys live: OpenBao, moto, the vendor simulator
//! (`keyrotd-sim vendor`) and dependents probing the vendor with the key they read (from OpenBao,
//! AWS or a file), each reporting the fingerprint it uses at `/key` (their `confirm` endpoint).
//! keyrotd rotates `payments` (and, for the group tests, more keys) with `overlap = "dual"`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyrotd::sim::VendorState;
use rand::RngExt;
use rand::distr::Alphanumeric;
use serde_json::{Value, json};

use super::bao::Bao;
use super::daemon::Daemon;
use super::moto::{Moto, REGION, aws_env};
use super::process::{Proc, http_status};
use super::secrets::Haystacks;
use super::sim::{Dependent, DependentOptions, DependentSource};
use super::stack::{ADMIN_TOKEN, fp};

pub const KEY: &str = "payments";
pub const VAULT_PATH: &str = "apps/payments";
pub const AWS_SECRET: &str = "prod/payments";

fn random(n: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

/// A running dual-key vendor simulator.
pub struct Vendor {
    _proc: Proc,
    url: String,
    token: String,
}

impl Vendor {
    /// A vendor with one live key per `(name, secret)`.
    pub fn start(seeds: &[(&str, &str)], dir: &std::path::Path) -> Vendor {
        let token = random(32);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd-sim"));
        cmd.args([
            "vendor",
            "--listen",
            "127.0.0.1:0",
            "--token-env",
            "SIM_TOKEN",
        ])
        .env("SIM_TOKEN", &token);
        for (name, secret) in seeds {
            let path = dir.join(format!("seed-{name}"));
            std::fs::write(&path, secret).expect("seed file");
            cmd.arg("--seed").arg(format!("{name}={}", path.display()));
        }
        let mut proc = Proc::spawn("vendor simulator", cmd);
        let port = proc.wait_port(Duration::from_secs(30), |p| {
            http_status(p, "/_sim/state") == Some(200)
        });
        Vendor {
            _proc: proc,
            url: format!("http://127.0.0.1:{port}"),
            token,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn state(&self) -> VendorState {
        http()
            .get(format!("{}/_sim/state", self.url))
            .send()
            .await
            .expect("vendor state")
            .json()
            .await
            .expect("vendor state JSON")
    }

    /// Ids of the live keys named `name`, oldest first.
    pub async fn live(&self, name: &str) -> Vec<String> {
        self.state()
            .await
            .live
            .into_iter()
            .filter(|k| k.name == name)
            .map(|k| k.id)
            .collect()
    }

    /// Fingerprints of the live keys named `name`, oldest first.
    pub async fn live_fingerprints(&self, name: &str) -> Vec<String> {
        self.state()
            .await
            .live
            .into_iter()
            .filter(|k| k.name == name)
            .map(|k| k.fingerprint)
            .collect()
    }

    pub async fn issued_secrets(&self) -> Vec<String> {
        let v: Value = http()
            .get(format!("{}/_sim/issued-secrets", self.url))
            .send()
            .await
            .expect("issued secrets")
            .json()
            .await
            .expect("issued secrets JSON");
        v["secrets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["secret"].as_str().map(str::to_string))
            .collect()
    }
}

/// Knobs of the generated config.
#[derive(Clone)]
pub struct DualOptions {
    /// Extra lines of the `payments` key table.
    pub key_extra: String,
    /// A third dependent, `canary`, reading the file destination, with `canary = true`.
    pub canary: bool,
    pub watch: String,
}

impl Default for DualOptions {
    fn default() -> Self {
        DualOptions {
            key_extra: "confirm_deadline = \"20s\"".into(),
            canary: false,
            watch: "0s".into(),
        }
    }
}

/// The stack: OpenBao, moto, the vendor, and dependents `worker` (OpenBao), `edge` (AWS) and
/// `canary` (the file), each probing the vendor every 50 ms.
pub struct DualStack {
    pub bao: Bao,
    pub moto: Moto,
    pub vendor: Vendor,
    pub worker: Dependent,
    pub edge: Dependent,
    pub canary: Dependent,
    pub dir: tempfile::TempDir,
    daemons: AtomicUsize,
}

fn probing(source: DependentSource) -> DependentOptions {
    let mut o = DependentOptions::new(source);
    o.probe_interval = Duration::from_millis(50);
    o
}

impl DualStack {
    pub async fn start() -> DualStack {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("keys")).expect("keys dir");
        let original = format!("sk_live_{}", random(40));
        let bao = Bao::start();
        let moto = Moto::start();
        moto.create_secret(AWS_SECRET, "{}").await;
        let vendor = Vendor::start(&[(KEY, &original)], dir.path());
        let stack_dir = dir.path().to_path_buf();
        seed(&bao, &moto, &stack_dir, &original).await;
        let worker = Dependent::start_with(
            vendor.url(),
            probing(DependentSource::Vault {
                addr: bao.addr.clone(),
                mount: "secret".into(),
                path: VAULT_PATH.into(),
                field: "api_key".into(),
                token: bao.root_token.clone(),
            }),
        );
        let edge = Dependent::start_with(
            vendor.url(),
            probing(DependentSource::Aws {
                endpoint: moto.endpoint.clone(),
                secret_id: AWS_SECRET.into(),
                field: Some("api_key".into()),
                region: REGION.into(),
                access_key_id: "test".into(),
                secret_access_key: "test".into(),
            }),
        );
        let canary = Dependent::start_with(
            vendor.url(),
            probing(DependentSource::File(stack_dir.join("keys/payments.key"))),
        );
        DualStack {
            bao,
            moto,
            vendor,
            worker,
            edge,
            canary,
            dir,
            daemons: AtomicUsize::new(0),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    /// The daemon, the vendor (with `status` for `payments` when `status`) and the stores.
    fn head(&self, status: bool) -> String {
        let status = if status {
            format!(
                "status = {{ url = \"{}/v1/keys/current?name={KEY}\", key_id_pointer = \"/id\", active_pointer = \"/active\" }}",
                self.vendor.url()
            )
        } else {
            String::new()
        };
        format!(
            r#"[daemon]
state_dir = "{state}"
listen = "127.0.0.1:0"
admin_token = {{ env = "KEYROTD_TEST_ADMIN_TOKEN" }}
reconcile_interval = "0s"

[providers.vendor]
kind = "http"
overlap = "dual"
auth = {{ value = {{ env = "KEYROTD_TEST_VENDOR_TOKEN" }} }}
create = {{ url = "{v}/v1/keys", body = '{{"name": "{{key}}"}}', secret_pointer = "/secret", key_id_pointer = "/id" }}
revoke = {{ url = "{v}/v1/keys/{{key_id}}" }}
list = {{ url = "{v}/v1/keys?name={{key}}", ids_pointer = "/data", id_pointer = "/id" }}
{status}
auth_check = {{ url = "{v}/v1/auth/check", header = "X-API-Key" }}
timeout = "5s"

[stores.vault]
kind = "vault"
address = "{bao}"
token = {{ env = "KEYROTD_TEST_VAULT_TOKEN" }}

[stores.aws]
kind = "aws"
region = "{REGION}"
endpoint_url = "{moto}"

[stores.local]
kind = "file"
dir = "{keys}"
"#,
            state = self.state_dir().display(),
            v = self.vendor.url(),
            bao = self.bao.addr,
            moto = self.moto.endpoint,
            keys = self.keys_dir().display(),
        )
    }

    /// One dependent's table: verify, confirm and reload on the simulator `d`.
    fn dependent(name: &str, store: &str, d: &Dependent, extra: &str) -> String {
        let base = d.reload_url().trim_end_matches("/-/reload").to_string();
        format!(
            r#"
  [[keys.dependents]]
  name = "{name}"
  reads_from = ["{store}"]
  verify = {{ url = "{verify}", timeout = "2s" }}
  confirm = {{ url = "{base}/key", fingerprint_pointer = "/fingerprint" }}
  reload = {{ url = "{reload}", timeout = "3s" }}
  {extra}
"#,
            verify = d.verify_url(),
            reload = d.reload_url(),
        )
    }

    /// The config: `payments` on the vendor, written to OpenBao, AWS and a file, read by `worker`,
    /// `edge` (and `canary`).
    pub fn config(&self, o: &DualOptions) -> PathBuf {
        let mut text = format!(
            "{}\n[[keys]]\nname = \"{KEY}\"\nprovider = \"vendor\"\nwatch = \"{}\"\nwatch_interval = \"1s\"\nstore_deadline = \"10s\"\nmax_regenerations_per_day = 20\n{}\n",
            self.head(true),
            o.watch,
            o.key_extra
        );
        text.push_str(&format!(
            "  [[keys.destinations]]\n  store = \"vault\"\n  path = \"{VAULT_PATH}\"\n  field = \"api_key\"\n\n  [[keys.destinations]]\n  store = \"aws\"\n  secret_id = \"{AWS_SECRET}\"\n  field = \"api_key\"\n\n  [[keys.destinations]]\n  store = \"local\"\n  file = \"payments.key\"\n"
        ));
        text.push_str(&Self::dependent("worker", "vault", &self.worker, ""));
        text.push_str(&Self::dependent("edge", "aws", &self.edge, ""));
        if o.canary {
            text.push_str(&Self::dependent(
                "canary",
                "local",
                &self.canary,
                "canary = true",
            ));
        }
        self.write(&text)
    }

    /// Three keys on the vendor (`set-a`, `set-b`, `set-c`), each in a file, and one dependent
    /// (`canary`'s simulator, reading `set-a`) that every key names with the same reload hook: a
    /// service that uses all three. `grouped`: the keys are the group `set`; otherwise each has
    /// `reload_coalesce = "3s"`.
    pub fn three_keys_config(&self, grouped: bool) -> PathBuf {
        let mut text = self.head(false);
        if grouped {
            text.push_str("\n[groups.set]\nschedule = \"@yearly\"\n");
        }
        // The status names `payments`' key: these keys go without (their old ids come from the
        // journal once keyrotd created them).
        let how = if grouped {
            "group = \"set\""
        } else {
            "reload_coalesce = \"3s\""
        };
        for name in ["set-a", "set-b", "set-c"] {
            text.push_str(&format!(
                "\n[[keys]]\nname = \"{name}\"\nprovider = \"vendor\"\n{how}\nwatch = \"0s\"\nconfirm_deadline = \"10s\"\n  [[keys.destinations]]\n  store = \"local\"\n  file = \"{name}.key\"\n  [[keys.dependents]]\n  name = \"shared\"\n  reload = {{ url = \"{reload}\", timeout = \"3s\" }}\n",
                reload = self.canary.reload_url(),
            ));
        }
        self.write(&text)
    }

    fn write(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("keyrotd.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = aws_env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("KEYROTD_TEST_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()));
        env.push((
            "KEYROTD_TEST_VAULT_TOKEN".into(),
            self.bao.root_token.clone(),
        ));
        env.push((
            "KEYROTD_TEST_VENDOR_TOKEN".into(),
            self.vendor.token.clone(),
        ));
        env.push(("RUST_LOG".into(), "info,keyrotd=debug".into()));
        env
    }

    /// `keyrotd run`, ready; `extra` environment (e.g. `FAILPOINTS`).
    pub async fn daemon(&self, config: &std::path::Path, extra: &[(&str, &str)]) -> Daemon {
        let n = self.daemons.fetch_add(1, Ordering::SeqCst);
        let log = self.dir.path().join(format!("daemon-{n}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd"));
        cmd.arg("-c")
            .arg(config)
            .arg("run")
            .envs(self.env())
            .envs(extra.iter().copied());
        let d = Daemon::spawn(cmd, &log).await;
        d.wait_ready(Duration::from_secs(60)).await;
        d
    }

    pub fn daemon_logs(&self) -> Vec<PathBuf> {
        (0..self.daemons.load(Ordering::SeqCst))
            .map(|n| self.dir.path().join(format!("daemon-{n}.log")))
            .collect()
    }

    /// Fingerprints of what OpenBao, AWS and the file hold.
    pub async fn destination_fingerprints(&self) -> Vec<Option<String>> {
        let vault = self
            .bao
            .kv_field(VAULT_PATH, "api_key")
            .await
            .as_deref()
            .map(fp);
        let aws = async {
            let out = self
                .moto
                .client()
                .await
                .get_secret_value()
                .secret_id(AWS_SECRET)
                .send()
                .await
                .ok()?;
            let v: Value = serde_json::from_str(out.secret_string()?).ok()?;
            v["api_key"].as_str().map(fp)
        }
        .await;
        let file = std::fs::read(self.keys_dir().join("payments.key"))
            .ok()
            .map(|b| keyrotd::secret::fingerprint_bytes(&b));
        vec![vault, aws, file]
    }

    /// The key's journal as JSON.
    pub fn journal(&self, key: &str) -> Value {
        let path = self.state_dir().join("journal").join(format!("{key}.json"));
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state_dir().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Every secret the vendor issued and every credential keyrotd was given, nowhere in what
    /// keyrotd wrote or answered (logs, journal, audit, sidecars, Vault metadata, AWS tags, the
    /// dependents' reload requests, `extra` outputs the test gathered).
    pub async fn assert_no_secret_leaked(&self, mut out: Haystacks) {
        out.add_files_under(&self.state_dir(), &|_| true);
        for log in self.daemon_logs() {
            out.add_files_under(log.parent().expect("a directory"), &|p| p == log);
        }
        out.add_files_under(&self.keys_dir(), &|p| {
            p.to_string_lossy().ends_with(".meta.json")
        });
        out.add(
            "OpenBao metadata",
            self.bao.kv_metadata_opt(VAULT_PATH).await.to_string(),
        );
        for (name, d) in [
            ("worker", &self.worker),
            ("edge", &self.edge),
            ("canary", &self.canary),
        ] {
            out.add(
                format!("{name} reload requests"),
                format!("{:?}", d.requests().await),
            );
        }
        let mut secrets: Vec<(String, String)> = self
            .vendor
            .issued_secrets()
            .await
            .into_iter()
            .enumerate()
            .map(|(i, s)| (format!("vendor secret #{i}"), s))
            .collect();
        for (k, v) in self.env() {
            if k.starts_with("KEYROTD_TEST_") {
                secrets.push((k, v));
            }
        }
        out.assert_none_of(&secrets);
    }
}

/// Puts `secret` in OpenBao, AWS and the file, as an operator would before keyrotd first starts.
async fn seed(bao: &Bao, moto: &Moto, dir: &std::path::Path, secret: &str) {
    bao.kv_put(VAULT_PATH, json!({ "api_key": secret })).await;
    moto.client()
        .await
        .put_secret_value()
        .secret_id(AWS_SECRET)
        .secret_string(json!({ "api_key": secret }).to_string())
        .send()
        .await
        .expect("moto PutSecretValue");
    std::fs::write(dir.join("keys/payments.key"), secret).expect("key file");
}

impl Daemon {
    /// Starts a rotation of `key` through the API; returns its id.
    pub async fn start_rotate_key(&self, key: &str, reason: &str) -> String {
        let (status, answer) = self
            .post(
                &format!("/v1/keys/{key}/rotate"),
                Some(ADMIN_TOKEN),
                json!({ "reason": reason }),
            )
            .await;
        assert_eq!(status, 202, "rotation of {key} accepted: {answer}");
        answer["rotation_id"]
            .as_str()
            .expect("rotation_id")
            .to_string()
    }

    /// Rotates `key` and waits for the outcome; returns the record.
    pub async fn rotate_key(&self, key: &str, reason: &str) -> Value {
        let id = self.start_rotate_key(key, reason).await;
        self.wait_rotation(&id, Duration::from_secs(90)).await
    }
}
