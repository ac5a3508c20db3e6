//! A running `keyrotd run`, and what a test does with it: the admin API, `/metrics`, signals.

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::metrics::Scrape;
use super::process::Proc;
use super::stack::{ADMIN_TOKEN, KEY};

/// How long the daemon gets to bind its admin API after starting.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Daemon {
    pub(super) proc: Proc,
    /// `http://127.0.0.1:PORT` of its admin API (the port it bound itself).
    pub base: String,
    http: reqwest::Client,
}

impl Daemon {
    /// Starts `cmd` (a `keyrotd run`) logging to `log`, and waits until its admin API listens.
    pub async fn spawn(cmd: Command, log: &Path) -> Daemon {
        let mut proc = Proc::spawn_logging_to("keyrotd run", cmd, log);
        let start = Instant::now();
        let port = loop {
            if let Some(status) = proc.exited() {
                panic!("keyrotd run exited ({status}); log:\n{}", proc.log_text());
            }
            if let Some(port) = proc.listening_ports().first() {
                break *port;
            }
            assert!(
                start.elapsed() < LISTEN_TIMEOUT,
                "keyrotd run did not listen within {LISTEN_TIMEOUT:?}; log:\n{}",
                proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Daemon {
            proc,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        }
    }

    /// `127.0.0.1:PORT`, as `daemon.listen` would name it.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    pub async fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await
                && r.status().as_u16() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "keyrotd did not become ready in {timeout:?}; log:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    pub fn signal(&self, sig: &str) {
        self.proc.signal(sig);
    }

    /// Sends `sig` and waits for the exit; panics with the log after `timeout`.
    pub fn stop_with(&mut self, sig: &str, timeout: Duration) -> ExitStatus {
        self.signal(sig);
        self.wait_exit(timeout)
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.stop_with("TERM", timeout)
    }

    /// Waits for the process to exit by itself; panics with the log after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.proc.wait_exit(timeout) {
            Some(status) => status,
            None => panic!(
                "keyrotd did not exit within {timeout:?}; log:\n{}",
                self.log_text()
            ),
        }
    }

    /// Waits for the process to exit by itself; `None` when it still runs after `timeout` (for callers
    /// that report a slow exit rather than fail at once).
    pub fn exit_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(timeout)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A scrape of `/metrics`.
    pub async fn metrics(&self) -> Scrape {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .unwrap_or_default();
        Scrape::parse(text)
    }

    /// POST with an optional bearer token.
    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.expect("POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST `path` with the admin token; the status must be `want`.
    pub async fn admin_post(&self, path: &str, want: u16) -> Value {
        let (status, body) = self.post(path, Some(ADMIN_TOKEN), Value::Null).await;
        assert_eq!(status, want, "POST {path}: {body}");
        body
    }

    /// Starts a rotation through the API and returns its id at once (202 asserted).
    pub async fn start_rotate(&self, reason: &str) -> String {
        self.start_rotate_with(serde_json::json!({ "reason": reason }))
            .await
    }

    /// Starts a rotation with this request body (e.g. `{"reason": "x", "force": true}`).
    pub async fn start_rotate_with(&self, body: Value) -> String {
        let (status, answer) = self
            .post(&format!("/v1/keys/{KEY}/rotate"), Some(ADMIN_TOKEN), body)
            .await;
        assert_eq!(status, 202, "rotation accepted: {answer}");
        answer["rotation_id"]
            .as_str()
            .expect("rotation_id")
            .to_string()
    }

    /// Starts a rotation through the API and waits for its outcome; returns the record.
    pub async fn rotate(&self, reason: &str) -> Value {
        let id = self.start_rotate(reason).await;
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

    /// How many times keyrotd has asked a provider for a key's status, whatever the answer. Every
    /// reconcile round and every recovery tick with something owed asks once per key, so this is the
    /// daemon's own clock for "a round has passed".
    pub async fn status_reads(&self) -> f64 {
        self.metrics().await.sum(
            "keyrotd_provider_requests_total",
            &[("operation", "status")],
        )
    }

    /// That something does *not* happen can only be observed for a while. This observes it for
    /// `rounds` of the daemon's own cadence (status reads, see [`Daemon::status_reads`]): `holds` is
    /// checked until keyrotd has read the status `rounds` more times, and the test fails the first
    /// time it is false (or when the rounds do not come within a minute).
    pub async fn holds_for_rounds<F, Fut>(&self, rounds: u32, what: &str, mut holds: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let from = self.status_reads().await;
        let start = Instant::now();
        loop {
            assert!(
                holds().await,
                "{what} stopped holding after {:?}",
                start.elapsed()
            );
            if self.status_reads().await >= from + f64::from(rounds) {
                // One last look after the final round.
                assert!(
                    holds().await,
                    "{what} stopped holding after {:?}",
                    start.elapsed()
                );
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "keyrotd read the status fewer than {rounds} times in a minute; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The key's live view (`GET /v1/keys/billing`).
    pub async fn key(&self) -> Value {
        self.get(&format!("/v1/keys/{KEY}")).await.1
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
}
