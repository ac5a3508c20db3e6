//! A real moto server (AWS emulator) for tests: `moto_server -H 127.0.0.1 -p PORT` on a free port,
//! output in a temp file, killed when the [`Moto`] is dropped. moto keeps everything in memory:
//! after [`Moto::stop`] + [`Moto::start_again`] (same port) it holds no secrets.
//!
//! Credentials: moto accepts any. In-process tests build the store with
//! [`Moto::store`] / [`Moto::sdk_config`] (static dummy credentials, no environment needed); a test that
//! runs the keyrotd binary passes [`aws_env`] in the child's environment.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_secretsmanager::config::{Credentials, Region};
use keyrotd::config::AwsStoreConfig;
use keyrotd::store::aws::AwsStore;

use super::bao::http_status;
use super::{free_port, tools_bin};

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
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    port: u16,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl Moto {
    /// Starts moto. Panics with a clear message when it is missing or does not come up.
    pub fn start() -> Moto {
        let mut last_port = 0;
        for _ in 0..3 {
            let port = free_port();
            last_port = port;
            let mut moto = Moto {
                endpoint: format!("http://127.0.0.1:{port}"),
                port,
                child: None,
                log: tempfile::Builder::new()
                    .prefix("keyrotd-test-moto-")
                    .suffix(".log")
                    .tempfile()
                    .expect("cannot create a temp file for moto's log"),
            };
            if moto.spawn_and_wait().is_ok() {
                return moto;
            }
        }
        panic!("moto did not come up on 127.0.0.1:{last_port} after 3 attempts (its log is above)");
    }

    fn binary() -> PathBuf {
        let bin = tools_bin().join("moto_server");
        assert!(
            bin.exists(),
            "moto_server not found at {}: run scripts/install-tools.sh",
            bin.display()
        );
        bin
    }

    fn spawn_and_wait(&mut self) -> Result<(), ()> {
        let out = std::fs::OpenOptions::new()
            .append(true)
            .open(self.log.path())
            .and_then(|f| f.try_clone().map(|g| (f, g)))
            .expect("cannot open moto's log file");
        let mut child = Command::new(Self::binary())
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.0))
            .stderr(Stdio::from(out.1))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start moto_server ({e}): run scripts/install-tools.sh")
            });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!(
                    "moto exited early ({status}) on port {}; its log:\n{}",
                    self.port,
                    self.log_text()
                );
                return Err(());
            }
            if http_status(self.port, "/moto-api/").is_some() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "moto did not answer on 127.0.0.1:{} within {:?}; its log:\n{}\n\
                     (is it installed? run scripts/install-tools.sh)",
                    self.port,
                    READY_TIMEOUT,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Kills moto. All its secrets are lost.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh (empty) moto on the same port.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "moto is still running: stop() it first"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.spawn_and_wait().is_err() {
            assert!(
                Instant::now() < deadline,
                "moto could not start again on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// An SDK config pointing at this moto, with static dummy credentials.
    pub async fn sdk_config(&self) -> SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .credentials_provider(Credentials::new(
                "test",
                "test",
                None,
                None,
                "keyrotd-tests",
            ))
            .region(Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .load()
            .await
    }

    /// The store config a keyrotd config for this moto would hold.
    pub fn store_config(&self) -> AwsStoreConfig {
        AwsStoreConfig {
            region: Some(REGION.to_string()),
            endpoint_url: Some(self.endpoint.parse().expect("moto endpoint is a URL")),
            timeout: Duration::from_secs(5),
        }
    }

    /// A keyrotd AWS store named `name` talking to this moto.
    pub async fn store(&self, name: &str) -> AwsStore {
        AwsStore::with_sdk_config(name, &self.store_config(), &self.sdk_config().await)
            .expect("AwsStore for moto")
    }

    /// A raw Secrets Manager client, for setting up and inspecting secrets as an operator would.
    pub async fn client(&self) -> aws_sdk_secretsmanager::Client {
        aws_sdk_secretsmanager::Client::new(&self.sdk_config().await)
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

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}
