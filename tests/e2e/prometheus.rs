//! The shipped alert rules against a real Prometheus scraping the real daemon: a dependent that keeps
//! its old key after a rotation makes `KeyrotdPostRotationAuthFailures` fire (after its `for:`), and
//! once the dependent reloads the alert resolves and the "seen" warning takes over.
//!
//! Prometheus loads a test copy of `prometheus/alerts.yml` in which every `for:` is cut to a few
//! seconds: the expressions, labels and annotations are the shipped ones, only the waiting is shorter
//! (the shipped durations themselves are checked by the promtool unit tests in tests/offline).
//!
//! Needs the `prometheus` binary on PATH (Debian package `prometheus`); fails loudly without it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::process::{Proc, http_status};
use crate::support::project_root;
use crate::support::stack::{HOOK_KEY, KEY, Options, Stack};

/// The `for:` every alert gets in the test copy of the rules.
const TEST_FOR: &str = "5s";

/// A Prometheus server scraping keyrotd every second with the test copy of the rules loaded.
struct Prometheus {
    _proc: Proc,
    base: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("alerts.yml");
        std::fs::write(&rules, short_for_copy(&rules_file())).unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: keyrotd
    static_configs:
      - targets: ["{target}"]
"#,
                rules = rules.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0");
        let mut proc = Proc::spawn("prometheus (Debian package `prometheus`, on PATH)", cmd);
        let port = proc.wait_port(Duration::from_secs(60), |p| {
            http_status(p, "/-/ready") == Some(200)
        });
        Prometheus {
            _proc: proc,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    async fn get(&self, path: &str) -> Value {
        reqwest::get(format!("{}{path}", self.base))
            .await
            .expect("prometheus answers")
            .json()
            .await
            .expect("prometheus answers JSON")
    }

    /// Current alerts: (alertname, labels, state).
    async fn alerts(&self) -> Vec<Value> {
        self.get("/api/v1/alerts").await["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn alert_state(&self, name: &str, dependent: &str) -> Option<String> {
        self.alerts()
            .await
            .into_iter()
            .find(|a| a["labels"]["alertname"] == name && a["labels"]["dependent"] == dependent)
            .and_then(|a| a["state"].as_str().map(String::from))
    }
}

/// What the dependent's operator does: make it reload (a correctly signed reload request).
async fn signed_reload(url: &str) -> u16 {
    let body = serde_json::to_vec(&json!({ "key": KEY, "reason": "operator restart" })).unwrap();
    let now = chrono::Utc::now().timestamp();
    let sig = keyrotd::notify::signature(HOOK_KEY.as_bytes(), now, &body);
    reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header(keyrotd::notify::TIMESTAMP_HEADER, now.to_string())
        .header(keyrotd::notify::SIGNATURE_HEADER, sig)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn rules_file() -> PathBuf {
    project_root().join("prometheus/alerts.yml")
}

/// The rules with every `for:` set to [`TEST_FOR`].
fn short_for_copy(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let mut fors = 0;
    let copy: Vec<String> = text
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => {
                fors += 1;
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}for: {TEST_FOR}")
            }
            None => l.to_string(),
        })
        .collect();
    assert!(fors > 0, "no `for:` in {}", path.display());
    copy.join("\n") + "\n"
}

/// The `for:` of an alert in a rules file.
fn alert_for(text: &str, name: &str) -> Duration {
    let after = text
        .split(&format!("- alert: {name}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("no alert {name} in the rules"));
    let block = after.split("- alert:").next().unwrap();
    let f = block
        .lines()
        .find_map(|l| l.trim().strip_prefix("for: "))
        .unwrap_or("0s");
    humantime::parse_duration(f).unwrap_or_else(|e| panic!("for: {f}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dependent_on_the_old_key_fires_the_post_rotation_alert_until_it_reloads() {
    let name = "KeyrotdPostRotationAuthFailures";
    let shipped = std::fs::read_to_string(rules_file()).unwrap();
    assert!(
        alert_for(&shipped, name) > Duration::ZERO,
        "{name} waits before it fires"
    );
    let hold = alert_for(&short_for_copy(&rules_file()), name);
    assert_eq!(hold, humantime::parse_duration(TEST_FOR).unwrap());

    let stack = Stack::start().await;
    let o = Options {
        watch: "600s".into(),
        watch_interval: "1s".into(),
        key_extra: "owner = { name = \"team-payments\" }\n".into(),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    let prom = Prometheus::start(&daemon.addr());

    // A first rotation gives the dependents a key.
    let first = daemon.rotate("test: first key").await;
    assert_eq!(first["outcome"], "success", "{first:#}");
    stack.assert_consistent(&o).await;

    // Prometheus scrapes keyrotd as job "keyrotd".
    stack
        .eventually(
            Duration::from_secs(60),
            "keyrotd scraped and up",
            || async {
                let r = prom
                    .get("/api/v1/query?query=up%7Bjob%3D%22keyrotd%22%7D")
                    .await;
                r["data"]["result"][0]["value"][1] == "1"
            },
        )
        .await;

    // The worker ignores reloads from now on: after the next rotation it keeps the old, dead key.
    stack
        .dep_vault
        .faults(json!({ "ignore_reload": true }))
        .await;
    let record = daemon.rotate("test: dependent keeps its old key").await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    let worker = [("key", KEY), ("dependent", "worker")];
    stack
        .eventually(
            Duration::from_secs(60),
            "keyrotd sees the worker failing",
            || async {
                daemon
                    .metrics()
                    .await
                    .value("keyrotd_post_rotation_auth_failing", &worker)
                    == Some(1.0)
            },
        )
        .await;

    // Pending first (its `for:` holds it back), then firing.
    stack
        .eventually(Duration::from_secs(60), "the alert pending", || async {
            prom.alert_state(name, "worker").await.as_deref() == Some("pending")
        })
        .await;
    stack
        .eventually(
            hold + Duration::from_secs(60),
            "the alert firing",
            || async { prom.alert_state(name, "worker").await.as_deref() == Some("firing") },
        )
        .await;
    let alerts = prom.alerts().await;
    let ours = alerts
        .iter()
        .find(|a| a["labels"]["alertname"] == name)
        .unwrap();
    assert_eq!(ours["labels"]["key"], KEY);
    assert_eq!(ours["labels"]["job"], "keyrotd");
    assert_eq!(ours["labels"]["severity"], "page");
    // The owner, joined from keyrotd_key_info by the rule, as a label and an annotation.
    assert_eq!(ours["labels"]["owner"], "team-payments");
    assert_eq!(ours["annotations"]["owner"], "team-payments");
    // The dependent that reloaded does not alert; nothing says keyrotd is down.
    for a in &alerts {
        let n = a["labels"]["alertname"].as_str().unwrap_or("");
        assert!(
            !(n == name && a["labels"]["dependent"] == "edge"),
            "edge reloaded: {a}"
        );
        assert!(
            !["KeyrotdDown", "KeyrotdNotKeyrotd"].contains(&n),
            "unexpected {n}: {a}"
        );
    }

    // The operator makes the worker reload: the watch sees it authenticate, the alert resolves.
    stack
        .dep_vault
        .faults(json!({ "ignore_reload": false }))
        .await;
    assert_eq!(signed_reload(&stack.dep_vault.reload_url()).await, 200);
    assert_eq!(stack.dep_vault.verify().await, 200);
    stack
        .eventually(
            Duration::from_secs(30),
            "keyrotd sees the worker recovered",
            || async {
                daemon
                    .metrics()
                    .await
                    .value("keyrotd_post_rotation_auth_failing", &worker)
                    == Some(0.0)
            },
        )
        .await;
    stack
        .eventually(Duration::from_secs(60), "the alert resolved", || async {
            prom.alert_state(name, "worker").await.is_none()
        })
        .await;
    // What is left is the warning that it happened.
    stack
        .eventually(
            Duration::from_secs(60),
            "the seen warning firing",
            || async {
                prom.alert_state("KeyrotdPostRotationAuthFailuresSeen", "worker")
                    .await
                    .as_deref()
                    == Some("firing")
            },
        )
        .await;
}
