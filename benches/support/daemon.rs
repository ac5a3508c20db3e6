//! The release `keyrotd` (the binary `cargo bench` builds beside the benchmark) run as `keyrotd run`,
//! and its admin API.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Proc, ProcStats, proc_stats};

/// `keyrotd`'s path.
pub fn keyrotd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_keyrotd")
}

/// Runs `keyrotd -c config check-config` and returns its wall time; panics with its output when it
/// does not exit 0.
pub fn check_config(config: &Path, env: &[(String, String)]) -> Duration {
    let start = Instant::now();
    let out = Command::new(keyrotd_bin())
        .arg("-c")
        .arg(config)
        .arg("check-config")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("run keyrotd check-config");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "keyrotd check-config failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// A running `keyrotd run`.
pub struct Daemon {
    pub proc: Proc,
    pub base: String,
    admin_token: String,
    http: reqwest::Client,
    /// For POSTs: a new connection each, so a POST never races the server closing an idle one (a
    /// POST is not retried, and a retry could start a second rotation).
    post: reqwest::Client,
}

impl Daemon {
    /// Starts `keyrotd -c config run` listening on `listen`, with `env`; does not wait.
    pub fn spawn(
        dir: &Path,
        config: &Path,
        listen: &str,
        admin_token: &str,
        env: &[(String, String)],
    ) -> Daemon {
        // `KEYROTD_NOFILE=N`: run keyrotd with an open-files limit of N, as a service gets from the
        // init system (systemd's default soft limit is 1024). The shell execs keyrotd: same pid.
        let mut cmd = match std::env::var("KEYROTD_NOFILE") {
            Ok(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", "ulimit -n \"$0\" && exec \"$@\"", &n, keyrotd_bin()]);
                c
            }
            Err(_) => Command::new(keyrotd_bin()),
        };
        cmd.arg("-c")
            .arg(config)
            .arg("run")
            .envs(env.iter().map(|(k, v)| (k, v)));
        Daemon {
            proc: Proc::spawn("keyrotd", dir, cmd),
            base: format!("http://{listen}"),
            admin_token: admin_token.into(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("reqwest client"),
            post: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("reqwest client"),
        }
    }

    pub fn stats(&self) -> ProcStats {
        proc_stats(self.proc.pid())
    }

    /// Polls `/readyz` every 20 ms until it answers 200; returns when it did. Panics with the log
    /// after `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Instant {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let r = self
                .http
                .get(format!("{}/readyz", self.base))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if r.is_ok_and(|r| r.status().as_u16() == 200) {
                return Instant::now();
            }
            if !self.proc.running() {
                self.proc.fail("exited before it was ready");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.proc.fail(&format!("was not ready within {timeout:?}"));
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "GET {path}: {e:?}; the end of keyrotd's log ({}):\n{}",
                    self.proc.log.display(),
                    self.proc.log_tail(40)
                )
            });
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `GET /v1/keys`.
    pub async fn keys(&self) -> Vec<Value> {
        match self.get("/v1/keys").await {
            (200, Value::Array(keys)) => keys,
            (status, body) => panic!("GET /v1/keys: HTTP {status}: {body}"),
        }
    }

    /// Polls `/v1/keys` every `every` until no key is still `observing`; returns how many polls it
    /// took. Panics with the log after `timeout`.
    pub async fn wait_observed(&mut self, every: Duration, timeout: Duration) -> usize {
        let start = Instant::now();
        let mut polls = 0;
        while start.elapsed() < timeout {
            polls += 1;
            if self.keys().await.iter().all(|k| k["observing"] == false) {
                return polls;
            }
            tokio::time::sleep(every).await;
        }
        self.proc
            .fail(&format!("still observing keys after {timeout:?}"));
    }

    /// `POST /v1/keys/{key}/rotate`: the rotation id, or the status and body of a refusal.
    pub async fn start_rotation(&self, key: &str, reason: &str) -> Result<String, (u16, Value)> {
        let r = self
            .post
            .post(format!("{}/v1/keys/{key}/rotate", self.base))
            .bearer_auth(&self.admin_token)
            .json(&json!({ "reason": reason }))
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| (0, json!({ "error": format!("{e:?}") })))?;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        match (status, body["rotation_id"].as_str()) {
            (202, Some(id)) => Ok(id.to_string()),
            _ => Err((status, body)),
        }
    }

    /// `GET /v1/rotations/{id}` once it has an outcome (polled every 20 ms).
    pub async fn wait_rotation(&mut self, id: &str, timeout: Duration) -> Value {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let (status, r) = self.get(&format!("/v1/rotations/{id}")).await;
            if status == 200 && !r["outcome"].is_null() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.proc
            .fail(&format!("rotation {id} did not finish within {timeout:?}"));
    }

    /// SIGTERM and wait (SIGKILL after 60 s).
    pub fn stop(&mut self) -> bool {
        self.proc.terminate(Duration::from_secs(60))
    }
}

/// The keyrotd environment every benchmark passes: AWS for moto, and the credentials the config
/// references, as `(name, value)`.
pub fn env_with(credentials: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = super::services::aws_env()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.extend(
        credentials
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    env
}

/// Writes `text` to `<dir>/keyrotd.toml` and returns the path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("keyrotd.toml");
    std::fs::write(&path, text).expect("write the keyrotd config");
    path
}
