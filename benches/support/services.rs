//! The outside components: OpenBao (dev mode), moto, and the `keyrotd-sim` portal (one account or a
//! fleet), dependent and proxy.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_secretsmanager::config::{Credentials, Region};
use keyrotd::sim::proxy::{LoggedRequest, ProxyCounters};
use keyrotd::sim::{FleetAccount, FleetCounters, PortalState};
use serde_json::{Value, json};

use super::{Proc, free_port, token, tools_bin, wait_http};

pub const REGION: &str = "us-east-1";

/// Environment for a process that talks to moto: dummy credentials, a region, no metadata lookups.
pub fn aws_env() -> [(&'static str, &'static str); 4] {
    [
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_REGION", REGION),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
}

/// `bao server -dev` with a random root token; `secret/` is KV v2.
pub struct Bao {
    pub addr: String,
    pub root_token: String,
    pub proc: Proc,
    http: reqwest::Client,
}

impl Bao {
    pub async fn start(dir: &Path) -> Bao {
        let bin = tools_bin().join("bao");
        assert!(
            bin.exists(),
            "{} not found: run scripts/install-tools.sh",
            bin.display()
        );
        let port = free_port();
        let root_token = format!("root-{}", token(24));
        let mut cmd = Command::new(bin);
        cmd.args([
            "server",
            "-dev",
            &format!("-dev-root-token-id={root_token}"),
            &format!("-dev-listen-address=127.0.0.1:{port}"),
        ]);
        let mut proc = Proc::spawn("openbao", dir, cmd);
        let addr = format!("http://127.0.0.1:{port}");
        wait_http(
            &mut proc,
            &format!("{addr}/v1/sys/health"),
            Duration::from_secs(30),
            |s| s == 200,
        )
        .await;
        Bao {
            addr,
            root_token,
            proc,
            http: reqwest::Client::new(),
        }
    }

    /// Writes a whole KV v2 secret under `secret/` as an operator would (no check-and-set).
    pub async fn kv_put(&self, path: &str, data: Value) {
        let r = self
            .http
            .post(format!("{}/v1/secret/data/{path}", self.addr))
            .header("X-Vault-Token", &self.root_token)
            .json(&json!({ "data": data }))
            .send()
            .await
            .unwrap_or_else(|e| panic!("OpenBao write {path}: {e}"));
        assert!(
            r.status().is_success(),
            "OpenBao write {path}: HTTP {}",
            r.status()
        );
    }

    /// The latest version's data at `path`, `Value::Null` when there is none.
    pub async fn kv_get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}/v1/secret/data/{path}", self.addr))
            .header("X-Vault-Token", &self.root_token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("OpenBao read {path}: {e}"));
        let v: Value = r.json().await.unwrap_or(Value::Null);
        v["data"]["data"].clone()
    }
}

/// `moto_server`, the AWS emulator.
pub struct Moto {
    pub endpoint: String,
    pub proc: Proc,
}

impl Moto {
    pub async fn start(dir: &Path) -> Moto {
        let bin = tools_bin().join("moto_server");
        assert!(
            bin.exists(),
            "{} not found: run scripts/install-tools.sh",
            bin.display()
        );
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let mut proc = Proc::spawn("moto", dir, cmd);
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_http(
            &mut proc,
            &format!("{endpoint}/moto-api/"),
            Duration::from_secs(60),
            |s| s < 500,
        )
        .await;
        Moto { endpoint, proc }
    }

    /// A Secrets Manager client for `endpoint` (moto itself, or a proxy in front of it).
    pub async fn client_for(endpoint: &str) -> aws_sdk_secretsmanager::Client {
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .credentials_provider(Credentials::new(
                "bench",
                "bench",
                None,
                None,
                "keyrotd-bench",
            ))
            .region(Region::new(REGION))
            .endpoint_url(endpoint)
            .load()
            .await;
        aws_sdk_secretsmanager::Client::new(&conf)
    }

    pub async fn client(&self) -> aws_sdk_secretsmanager::Client {
        Moto::client_for(&self.endpoint).await
    }

    /// Creates a secret holding `value` (keyrotd never creates secrets: an operator does).
    pub async fn create_secret(client: &aws_sdk_secretsmanager::Client, name: &str, value: &str) {
        client
            .create_secret()
            .name(name)
            .secret_string(value)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "moto CreateSecret {name}: {}",
                    aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
                )
            });
    }

    /// The SecretString of `name` parsed as JSON (`Value::Null` when absent or not JSON).
    pub async fn json_value(client: &aws_sdk_secretsmanager::Client, name: &str) -> Value {
        let out = client.get_secret_value().secret_id(name).send().await.ok();
        out.and_then(|o| o.secret_string().and_then(|s| serde_json::from_str(s).ok()))
            .unwrap_or(Value::Null)
    }
}

/// `keyrotd-sim portal`: one account, or with `accounts` a fleet under `/a/<i>`.
pub struct Portal {
    pub url: String,
    pub token: String,
    pub proc: Proc,
    http: reqwest::Client,
}

impl Portal {
    pub fn start(dir: &Path, accounts: Option<usize>) -> Portal {
        let token = token(32);
        let mut args: Vec<String> = [
            "portal",
            "--listen",
            "127.0.0.1:0",
            "--token-env",
            "BENCH_PORTAL_TOKEN",
        ]
        .map(String::from)
        .into();
        if let Some(n) = accounts {
            args.extend(["--accounts".into(), n.to_string()]);
        }
        let (proc, urls) = Proc::spawn_sim("portal", dir, &args, &[("BENCH_PORTAL_TOKEN", &token)]);
        Portal {
            url: urls[0].clone(),
            token,
            proc,
            http: reqwest::Client::new(),
        }
    }

    /// Account `i`'s base URL in a fleet.
    pub fn account_url(&self, i: usize) -> String {
        format!("{}/a/{i}", self.url)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, url: &str) -> T {
        let r = self
            .http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert!(r.status().is_success(), "GET {url}: HTTP {}", r.status());
        r.json().await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    /// The single-account portal's state, or one account's (`base` = [`Portal::account_url`]).
    pub async fn state(&self, base: &str) -> PortalState {
        self.get(&format!("{base}/_sim/state")).await
    }

    /// The first secret an account issued: its key before any rotation.
    pub async fn initial_secret(&self, base: &str) -> String {
        let v: Value = self.get(&format!("{base}/_sim/issued-secrets")).await;
        v["secrets"][0]["secret"]
            .as_str()
            .unwrap_or_else(|| panic!("{base}/_sim/issued-secrets has no secret"))
            .to_string()
    }

    pub async fn fleet_counters(&self) -> FleetCounters {
        self.get(&format!("{}/_sim/counters", self.url)).await
    }

    pub async fn fleet_accounts(&self) -> Vec<FleetAccount> {
        self.get(&format!("{}/_sim/accounts", self.url)).await
    }
}

/// `keyrotd-sim dependent` answering its reload hook 200 once the signature checks, without reading
/// the key (so a hook costs one request and the same for every caller).
pub struct Hook {
    pub url: String,
    pub proc: Proc,
}

impl Hook {
    pub async fn start(dir: &Path, name: &str, portal: &str, signing_key: &str) -> Hook {
        let args: Vec<String> = [
            "dependent",
            "--listen",
            "127.0.0.1:0",
            "--portal",
            portal,
            "--source",
            "file",
            "--file",
            "/nonexistent",
            "--signing-key-env",
            "BENCH_HOOK_KEY",
        ]
        .map(String::from)
        .into();
        let (proc, urls) = Proc::spawn_sim(name, dir, &args, &[("BENCH_HOOK_KEY", signing_key)]);
        let url = urls[0].clone();
        let r = reqwest::Client::new()
            .post(format!("{url}/_sim/faults"))
            .json(&json!({ "ignore_reload": true }))
            .send()
            .await
            .expect("dependent /_sim/faults");
        assert!(
            r.status().is_success(),
            "dependent /_sim/faults: HTTP {}",
            r.status()
        );
        Hook { url, proc }
    }

    pub fn reload_url(&self) -> String {
        format!("{}/-/reload", self.url)
    }

    /// Reload requests answered 200.
    pub async fn reloads(&self) -> u64 {
        let v: Value = reqwest::get(format!("{}/_sim/state", self.url))
            .await
            .expect("dependent /_sim/state")
            .json()
            .await
            .expect("dependent state is JSON");
        v["reloads"].as_u64().unwrap_or(0)
    }
}

/// `keyrotd-sim proxy` in front of `upstream` (`http://HOST:PORT`), `delay_ms` per direction.
pub struct Proxy {
    /// `http://127.0.0.1:PORT`: use it in place of the upstream's URL.
    pub url: String,
    control: String,
    pub proc: Proc,
}

impl Proxy {
    pub fn start(dir: &Path, name: &str, upstream: &str, delay_ms: u64) -> Proxy {
        let host_port = upstream.trim_start_matches("http://").trim_end_matches('/');
        let args: Vec<String> = vec![
            "proxy".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--upstream".into(),
            host_port.into(),
            "--delay-ms".into(),
            delay_ms.to_string(),
        ];
        let (mut proc, urls) = Proc::spawn_sim(name, dir, &args, &[]);
        let Some(control) = urls.get(1).and_then(|u| u.strip_suffix("/_sim/counters")) else {
            proc.fail("did not say where its counters are")
        };
        Proxy {
            control: control.to_string(),
            url: urls[0].clone(),
            proc,
        }
    }

    /// What passed through since start or the last [`Proxy::reset`].
    pub async fn counters(&self) -> ProxyCounters {
        reqwest::get(format!("{}/_sim/counters", self.control))
            .await
            .expect("proxy counters")
            .json()
            .await
            .expect("proxy counters are JSON")
    }

    /// The latest requests with the time each arrived, oldest first.
    pub async fn log(&self) -> Vec<LoggedRequest> {
        reqwest::get(format!("{}/_sim/requests", self.control))
            .await
            .expect("proxy requests")
            .json()
            .await
            .expect("proxy requests are JSON")
    }

    pub async fn reset(&self) {
        let r = reqwest::Client::new()
            .post(format!("{}/_sim/reset", self.control))
            .send()
            .await
            .expect("proxy reset");
        assert!(r.status().is_success(), "proxy reset: HTTP {}", r.status());
    }
}
