//! A real moto server (AWS emulator) for tests: `moto_server -H 127.0.0.1 -p 0`, on a port it picks
//! itself, killed when the [`Moto`] is dropped. Like OpenBao it sits behind a [`Gate`]: [`Moto::down`]
//! and [`Moto::up`] take it away from keyrotd and the dependents and give it back, secrets kept.
//!
//! Credentials: moto accepts any. In-process tests build the store with [`Moto::store`] /
//! [`Moto::sdk_config`] (static dummy credentials, no environment needed); a test that runs the
//! keyrotd binary passes [`aws_env`] in the child's environment.

use std::process::Command;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_secretsmanager::config::{Credentials, Region};
use keyrotd::config::AwsStoreConfig;
use keyrotd::store::aws::AwsStore;

use super::gate::Gate;
use super::process::{Proc, http_status};
use super::tools_bin;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
pub const REGION: &str = "us-east-1";

/// Environment for a child process (e.g. the keyrotd binary) that talks to moto: dummy credentials,
/// a region, no instance-metadata lookups.
pub fn aws_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", REGION),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
}

pub struct Moto {
    /// `http://127.0.0.1:PORT` of the gate: what keyrotd and the dependents are given.
    pub endpoint: String,
    /// `http://127.0.0.1:PORT` of the server itself, for the test's own calls.
    direct: String,
    gate: Gate,
    _proc: Proc,
}

impl Moto {
    /// Starts moto. Panics with a clear message when it is missing or does not come up.
    pub fn start() -> Moto {
        let bin = tools_bin().join("moto_server");
        assert!(
            bin.exists(),
            "moto_server not found at {}: run scripts/install-tools.sh",
            bin.display()
        );
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", "0"]);
        let mut proc = Proc::spawn("moto", cmd);
        let port = proc.wait_port(READY_TIMEOUT, |p| http_status(p, "/moto-api/").is_some());
        let gate = Gate::new(([127, 0, 0, 1], port).into());
        Moto {
            endpoint: gate.url(),
            direct: format!("http://127.0.0.1:{port}"),
            gate,
            _proc: proc,
        }
    }

    /// keyrotd and the dependents can no longer reach moto (it keeps its secrets).
    pub fn down(&self) {
        self.gate.close();
    }

    /// moto is reachable again.
    pub fn up(&self) {
        self.gate.open();
    }

    /// An SDK config pointing at `endpoint`, with static dummy credentials.
    async fn sdk_config_for(endpoint: &str) -> SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .credentials_provider(Credentials::new(
                "test",
                "test",
                None,
                None,
                "keyrotd-tests",
            ))
            .region(Region::new(REGION))
            .endpoint_url(endpoint)
            .load()
            .await
    }

    /// An SDK config for keyrotd's side of the gate.
    pub async fn sdk_config(&self) -> SdkConfig {
        Self::sdk_config_for(&self.endpoint).await
    }

    /// The store config a keyrotd config for this moto would hold.
    pub fn store_config(&self) -> AwsStoreConfig {
        AwsStoreConfig {
            region: Some(REGION.to_string()),
            endpoint_url: Some(self.endpoint.parse().expect("moto endpoint is a URL")),
            timeout: Duration::from_secs(5),
            ca_file: None,
        }
    }

    /// A keyrotd AWS store named `name` talking to this moto.
    pub async fn store(&self, name: &str) -> AwsStore {
        AwsStore::with_sdk_config(name, &self.store_config(), &self.sdk_config().await)
            .expect("AwsStore for moto")
    }

    /// A raw Secrets Manager client, for setting up and inspecting secrets as an operator would.
    /// It talks to moto directly, so it works while moto is [`Moto::down`].
    pub async fn client(&self) -> aws_sdk_secretsmanager::Client {
        aws_sdk_secretsmanager::Client::new(&Self::sdk_config_for(&self.direct).await)
    }

    /// Creates a secret holding `initial_value` (keyrotd never creates secrets itself). A freshly
    /// started moto on a loaded machine sometimes drops the first requests: a transport failure is
    /// retried for a few seconds before the test fails.
    pub async fn create_secret(&self, name: &str, initial_value: &str) {
        let client = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let result = client
                .create_secret()
                .name(name)
                .secret_string(initial_value)
                .send()
                .await;
            match result {
                Ok(_) => return,
                Err(e)
                    if Instant::now() < deadline
                        && !matches!(
                            e,
                            aws_sdk_secretsmanager::error::SdkError::ServiceError(_)
                        ) =>
                {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => panic!(
                    "moto CreateSecret {name}: {}",
                    aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
                ),
            }
        }
    }
}
