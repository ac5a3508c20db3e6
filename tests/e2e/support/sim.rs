//! The portal and dependent simulators (`keyrotd-sim`), run as real processes. Both bind port 0; the
//! port is read back from the kernel ([`Proc::wait_port`]) and the simulator is ready once
//! `/_sim/state` answers. The process is killed when the handle is dropped. The `/_sim/` helpers are
//! async (tests are `#[tokio::test]`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use keyrotd::config::{AosPaths, AosProviderConfig};
use keyrotd::provider::Provider;
use keyrotd::secret::Secret;
use keyrotd::sim::{DependentState, PortalState, RecordedRequest};
use rand::RngExt;
use rand::distr::Alphanumeric;
use serde_json::Value;

use super::process::{Proc, http_status};

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts `keyrotd-sim` with `args`/`envs` and waits until it serves; returns it and its base URL.
fn spawn_sim(what: &str, args: &[String], envs: &[(String, String)]) -> (Proc, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd-sim"));
    cmd.args(args).envs(envs.iter().map(|(k, v)| (k, v)));
    let mut proc = Proc::spawn(&format!("{what} simulator"), cmd);
    let port = proc.wait_port(STARTUP_TIMEOUT, |p| {
        http_status(p, "/_sim/state") == Some(200)
    });
    (proc, format!("http://127.0.0.1:{port}"))
}

fn random_token() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

async fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> T {
    let resp = http()
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(
        resp.status().is_success(),
        "GET {url}: HTTP {}",
        resp.status()
    );
    resp.json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: bad JSON: {e}"))
}

async fn post_json(url: &str, body: &Value) -> reqwest::Response {
    let resp = http()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    assert!(
        resp.status().is_success(),
        "POST {url}: HTTP {}",
        resp.status()
    );
    resp
}

/// Options for [`Portal::start_with`].
#[derive(Default)]
pub struct PortalOptions {
    /// Default `acct_42`.
    pub account_id: Option<String>,
    /// The initial key's secret; random when `None`.
    pub seed_secret: Option<String>,
}

/// A running portal simulator.
pub struct Portal {
    _proc: Proc,
    url: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl Portal {
    /// A portal with a random initial key, account `acct_42` and a random management token.
    pub fn start() -> Portal {
        Portal::start_with(PortalOptions::default())
    }

    pub fn start_with(options: PortalOptions) -> Portal {
        let token = random_token();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut args = vec![
            "portal".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--token-env".into(),
            "KEYROTD_SIM_TOKEN".into(),
        ];
        if let Some(a) = options.account_id {
            args.extend(["--account-id".into(), a]);
        }
        if let Some(seed) = options.seed_secret {
            let path = dir.path().join("seed");
            std::fs::write(&path, seed).expect("write seed secret");
            args.extend(["--seed-secret-file".into(), path.display().to_string()]);
        }
        let (proc, url) = spawn_sim(
            "portal",
            &args,
            &[("KEYROTD_SIM_TOKEN".into(), token.clone())],
        );
        Portal {
            _proc: proc,
            url,
            token,
            _dir: dir,
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:41234` (no trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The management token it accepts.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// An `aos` provider config for this portal: account `acct_42`, timeout 5s.
    pub fn aos_config(&self) -> AosProviderConfig {
        AosProviderConfig {
            base_url: self.url.parse().expect("simulator URL parses"),
            management_token: Secret::from(self.token.clone()),
            account_id: Some("acct_42".into()),
            timeout: Duration::from_secs(5),
            requested_by: "keyrotd@test".into(),
            paths: AosPaths::default(),
            tls: Default::default(),
            max_retry_after: keyrotd::backoff::DEFAULT_MAX_RETRY_AFTER,
        }
    }

    /// A ready [`Provider`] named `aos` for [`Portal::aos_config`].
    pub fn provider(&self) -> Provider {
        Provider::Aos(
            keyrotd::provider::aos::AosProvider::new("aos", &self.aos_config())
                .expect("aos provider for the simulator"),
        )
    }

    pub async fn state(&self) -> PortalState {
        get_json(&format!("{}/_sim/state", self.url)).await
    }

    /// `POST /_sim/faults` with `faults` (see docs/portal-api.md#the-portal-simulator-keyrotd-sim-portal).
    pub async fn faults(&self, faults: Value) {
        post_json(&format!("{}/_sim/faults", self.url), &faults).await;
    }

    /// Rotates as a person in the portal UI would; returns the new key id.
    pub async fn rotate_out_of_band(&self) -> String {
        let v: Value = post_json(&format!("{}/_sim/rotate", self.url), &Value::Null)
            .await
            .json()
            .await
            .expect("/_sim/rotate answers JSON");
        v["key_id"]
            .as_str()
            .expect("/_sim/rotate answers a key_id")
            .to_string()
    }

    /// Clears faults and counters (keeps the key).
    pub async fn reset(&self) {
        post_json(&format!("{}/_sim/reset", self.url), &Value::Null).await;
    }

    /// Every secret the portal ever issued, oldest first (the first is the initial key).
    pub async fn issued_secrets(&self) -> Vec<String> {
        let v: Value = get_json(&format!("{}/_sim/issued-secrets", self.url)).await;
        v["secrets"]
            .as_array()
            .expect("secrets array")
            .iter()
            .map(|s| s["secret"].as_str().expect("secret string").to_string())
            .collect()
    }

    /// The secret of the active key.
    pub async fn current_secret(&self) -> String {
        self.issued_secrets()
            .await
            .pop()
            .expect("the portal always has a key")
    }
}

/// Where a [`Dependent`] reads its key.
pub enum DependentSource {
    File(PathBuf),
    Vault {
        addr: String,
        mount: String,
        path: String,
        field: String,
        token: String,
    },
    Aws {
        endpoint: String,
        secret_id: String,
        field: Option<String>,
        region: String,
        access_key_id: String,
        secret_access_key: String,
    },
}

/// Options for [`Dependent::start_with`].
pub struct DependentOptions {
    pub source: DependentSource,
    /// Reloads must be signed with this HMAC key.
    pub signing_key: Option<String>,
    /// Default 1s.
    pub probe_interval: Duration,
    /// How far a signed reload's timestamp may be from the dependent's clock; default 5 minutes.
    pub max_signature_age: Option<Duration>,
}

impl DependentOptions {
    pub fn new(source: DependentSource) -> DependentOptions {
        DependentOptions {
            source,
            signing_key: None,
            probe_interval: Duration::from_secs(1),
            max_signature_age: None,
        }
    }
}

/// A running dependent simulator.
pub struct Dependent {
    proc: Proc,
    url: String,
}

impl Dependent {
    pub fn start(portal_url: &str, source: DependentSource) -> Dependent {
        Dependent::start_with(portal_url, DependentOptions::new(source))
    }

    pub fn start_with(portal_url: &str, options: DependentOptions) -> Dependent {
        let mut args: Vec<String> = vec![
            "dependent".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--portal".into(),
            portal_url.into(),
            "--probe-interval".into(),
            format!("{}ms", options.probe_interval.as_millis().max(1)),
        ];
        let mut envs: Vec<(String, String)> = Vec::new();
        match options.source {
            DependentSource::File(path) => {
                args.extend(["--source".into(), "file".into()]);
                args.extend(["--file".into(), path.display().to_string()]);
            }
            DependentSource::Vault {
                addr,
                mount,
                path,
                field,
                token,
            } => {
                args.extend(["--source".into(), "vault".into()]);
                args.extend(["--vault-addr".into(), addr]);
                args.extend(["--vault-mount".into(), mount]);
                args.extend(["--vault-path".into(), path]);
                args.extend(["--vault-field".into(), field]);
                envs.push(("VAULT_TOKEN".into(), token));
            }
            DependentSource::Aws {
                endpoint,
                secret_id,
                field,
                region,
                access_key_id,
                secret_access_key,
            } => {
                args.extend(["--source".into(), "aws".into()]);
                args.extend(["--aws-endpoint".into(), endpoint]);
                args.extend(["--aws-secret-id".into(), secret_id]);
                if let Some(f) = field {
                    args.extend(["--aws-field".into(), f]);
                }
                envs.push(("AWS_REGION".into(), region));
                envs.push(("AWS_ACCESS_KEY_ID".into(), access_key_id));
                envs.push(("AWS_SECRET_ACCESS_KEY".into(), secret_access_key));
                envs.push(("AWS_EC2_METADATA_DISABLED".into(), "true".into()));
            }
        }
        if let Some(key) = options.signing_key {
            args.extend(["--signing-key-env".into(), "KEYROTD_SIM_HOOK_KEY".into()]);
            envs.push(("KEYROTD_SIM_HOOK_KEY".into(), key));
        }
        if let Some(age) = options.max_signature_age {
            args.extend(["--max-signature-age".into(), format!("{}s", age.as_secs())]);
        }
        let (proc, url) = spawn_sim("dependent", &args, &envs);
        Dependent { proc, url }
    }

    /// `POST` here to make it reload (`[keys.dependents.reload] url`).
    pub fn reload_url(&self) -> String {
        format!("{}/-/reload", self.url)
    }

    /// 200 while its key authenticates, 401 when not (`verify.url`).
    pub fn verify_url(&self) -> String {
        format!("{}/health/upstream", self.url)
    }

    /// Status of `GET verify_url()` (it checks with the portal now).
    pub async fn verify(&self) -> u16 {
        http()
            .get(self.verify_url())
            .send()
            .await
            .expect("dependent verify endpoint answers")
            .status()
            .as_u16()
    }

    /// Status of an unsigned `POST reload_url()` with `body`.
    pub async fn reload(&self, body: &Value) -> u16 {
        http()
            .post(self.reload_url())
            .json(body)
            .send()
            .await
            .expect("dependent reload endpoint answers")
            .status()
            .as_u16()
    }

    pub async fn state(&self) -> DependentState {
        get_json(&format!("{}/_sim/state", self.url)).await
    }

    /// `POST /_sim/faults`: `{"ignore_reload": true}`, `{"fail_reload_next": N}`.
    pub async fn faults(&self, faults: Value) {
        post_json(&format!("{}/_sim/faults", self.url), &faults).await;
    }

    /// Every reload request it received (bodies, headers, what it answered).
    pub async fn requests(&self) -> Vec<RecordedRequest> {
        let v: Value = get_json(&format!("{}/_sim/requests", self.url)).await;
        serde_json::from_value(v["requests"].clone()).expect("recorded requests")
    }
}

impl Dependent {
    /// Kills the dependent: its verify and reload URLs stop answering.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}
