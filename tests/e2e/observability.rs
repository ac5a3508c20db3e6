//! Observability end to end (docs/metrics.md, docs/audit-log.md): after a real rotation through the
//! daemon, every documented metric is exported with its labels and passes `promtool check metrics`;
//! series of a key removed by a reload disappear; every log line of a rotation carries `key` and
//! `rotation_id` (JSON and text); the audit log has every field; the post-rotation watch exports a
//! dependent that keeps its old key and clears it once the resent reload hook makes it reload.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::daemon::Daemon;
use crate::support::metrics::Scrape;
use crate::support::stack::{ADMIN_TOKEN, KEY, Options, Stack};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// `promtool check metrics` on a scrape: the exposition parses and passes the lint.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool on PATH (it ships with the prometheus Debian package)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn metric_eventually(
    stack: &Stack,
    daemon: &Daemon,
    what: &str,
    check: impl Fn(&Scrape) -> bool,
) -> Scrape {
    stack
        .eventually(T, what, || async { check(&daemon.metrics().await) })
        .await;
    daemon.metrics().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_exports_every_metric_of_the_spec_with_its_labels() {
    let stack = Stack::start().await;
    let o = Options {
        watch: "5s".into(),
        watch_interval: "1s".into(),
        log_format: "json".into(),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    // Destinations that already hold the portal's key are adopted at start: no drift.
    stack
        .seed_destinations(&stack.portal.current_secret().await)
        .await;
    let daemon = stack.daemon(&config).await;

    // Before any rotation: every label combination known from the config is there at 0.
    let before = daemon.metrics().await;
    promtool_check(before.text());
    for outcome in ["success", "degraded", "aborted", "failed"] {
        assert_eq!(
            before.get(
                "keyrotd_rotations_total",
                &[("key", KEY), ("outcome", outcome)]
            ),
            0.0
        );
    }
    for dep in ["worker", "edge"] {
        assert_eq!(
            before.get(
                "keyrotd_post_rotation_auth_failing",
                &[("key", KEY), ("dependent", dep)]
            ),
            0.0
        );
    }
    assert_eq!(before.get("keyrotd_drift", &[("key", KEY)]), 0.0);

    // The start-up look has adopted the seeded destinations: from here on, the daemon's only work is
    // the rotation the test asks for.
    stack
        .eventually(T, "the destinations adopted", || async {
            daemon.key().await["destinations"]
                .as_array()
                .is_some_and(|d| !d.is_empty() && d.iter().all(|d| d["in_sync"] == true))
        })
        .await;
    let log_from = daemon.log_text().len();
    let record = daemon.rotate("test: observability").await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    let rotation_id = record["rotation_id"].as_str().unwrap().to_string();

    // Wait for the watch to probe both dependents.
    let m = metric_eventually(&stack, &daemon, "watch probes of both dependents", |m| {
        ["worker", "edge"].iter().all(|d| {
            m.value(
                "keyrotd_post_rotation_checks_total",
                &[("key", KEY), ("dependent", d), ("result", "ok")],
            )
            .unwrap_or(0.0)
                >= 1.0
        })
    })
    .await;
    promtool_check(m.text());

    let k = [("key", KEY)];
    assert_eq!(
        m.get(
            "keyrotd_rotations_total",
            &[("key", KEY), ("outcome", "success")]
        ),
        1.0
    );
    for outcome in ["degraded", "aborted", "failed"] {
        assert_eq!(
            m.get(
                "keyrotd_rotations_total",
                &[("key", KEY), ("outcome", outcome)]
            ),
            0.0
        );
    }
    assert_eq!(m.get("keyrotd_rotation_duration_seconds_count", &k), 1.0);
    assert!(m.get("keyrotd_rotation_duration_seconds_sum", &k) > 0.0);
    assert_eq!(
        m.get(
            "keyrotd_rotation_duration_seconds_bucket",
            &[("key", KEY), ("le", "+Inf")]
        ),
        1.0
    );
    assert_eq!(m.get("keyrotd_invalidation_window_seconds_count", &k), 1.0);
    assert_window_matches_the_events(
        m.get("keyrotd_invalidation_window_seconds_sum", &k),
        &record,
    );
    for store in ["vault", "aws", "local"] {
        assert!(
            m.get(
                "keyrotd_store_writes_total",
                &[("key", KEY), ("store", store), ("outcome", "ok")]
            ) >= 1.0,
            "store {store} written"
        );
        m.get(
            "keyrotd_store_writes_total",
            &[("key", KEY), ("store", store), ("outcome", "error")],
        );
    }
    for dep in ["worker", "edge"] {
        assert_eq!(
            m.get(
                "keyrotd_reload_hooks_total",
                &[("key", KEY), ("dependent", dep), ("outcome", "ok")]
            ),
            1.0,
            "reload hook of {dep}"
        );
        assert_eq!(
            m.get(
                "keyrotd_reload_hooks_total",
                &[("key", KEY), ("dependent", dep), ("outcome", "error")]
            ),
            0.0
        );
        for result in ["auth_failure", "error"] {
            m.get(
                "keyrotd_post_rotation_checks_total",
                &[("key", KEY), ("dependent", dep), ("result", result)],
            );
        }
        assert_eq!(
            m.get(
                "keyrotd_post_rotation_checks_total",
                &[("key", KEY), ("dependent", dep), ("result", "auth_failure")]
            ),
            0.0
        );
        assert_eq!(
            m.get(
                "keyrotd_post_rotation_auth_failures_total",
                &[("key", KEY), ("dependent", dep)]
            ),
            0.0
        );
        assert_eq!(
            m.get(
                "keyrotd_post_rotation_auth_failing",
                &[("key", KEY), ("dependent", dep)]
            ),
            0.0
        );
    }
    for reason in ["lost_before_storage", "crash_recovery", "drift"] {
        assert_eq!(
            m.get(
                "keyrotd_rerotations_total",
                &[("key", KEY), ("reason", reason)]
            ),
            0.0
        );
    }
    let started = chrono::DateTime::parse_from_rfc3339(record["started_at"].as_str().unwrap())
        .unwrap()
        .timestamp() as f64;
    let finished = chrono::DateTime::parse_from_rfc3339(record["finished_at"].as_str().unwrap())
        .unwrap()
        .timestamp() as f64;
    let attempt = m.get("keyrotd_rotation_last_attempt_timestamp_seconds", &k);
    assert!(
        (attempt - started).abs() < 5.0,
        "last attempt {attempt} ≈ start {started}"
    );
    let success = m.get("keyrotd_rotation_last_success_timestamp_seconds", &k);
    assert!(
        (success - finished).abs() < 5.0 && success >= attempt,
        "last success {success} ≈ end {finished}"
    );
    assert_eq!(m.get("keyrotd_key_active", &k), 1.0);
    let portal = stack.portal.state().await;
    let _ = portal;
    let view = daemon.key().await;
    let last_rotated = chrono::DateTime::parse_from_rfc3339(view["last_rotated"].as_str().unwrap())
        .unwrap()
        .timestamp() as f64;
    let exported = m.get("keyrotd_key_last_rotation_timestamp_seconds", &k);
    assert!(
        (exported - last_rotated).abs() < 1.0,
        "key_last_rotation {exported} = provider's Last Rotated {last_rotated}"
    );
    assert!(
        (exported - started).abs() < 10.0,
        "Last Rotated is this rotation's"
    );
    assert_eq!(m.get("keyrotd_drift", &k), 0.0);
    for op in ["status", "regenerate", "auth_check"] {
        assert!(
            m.get(
                "keyrotd_provider_requests_total",
                &[("provider", "portal"), ("operation", op), ("outcome", "ok")]
            ) >= 1.0,
            "provider {op} counted"
        );
        for outcome in ["auth_error", "rate_limited", "transient", "ambiguous"] {
            m.get(
                "keyrotd_provider_requests_total",
                &[
                    ("provider", "portal"),
                    ("operation", op),
                    ("outcome", outcome),
                ],
            );
        }
    }
    assert_eq!(
        m.get(
            "keyrotd_provider_requests_total",
            &[
                ("provider", "portal"),
                ("operation", "regenerate"),
                ("outcome", "ok")
            ]
        ),
        1.0
    );
    assert_eq!(m.get("keyrotd_paused", &[]), 0.0);
    assert_eq!(
        m.get(
            "keyrotd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(
        m.get("keyrotd_config_reloads_total", &[("outcome", "ok")]),
        0.0
    );

    // The log as it stands once the watch is over (the journal is back to idle): from the recovery
    // scan on, everything the daemon did was this rotation and its watch.
    stack
        .eventually(T, "the watch over", || async {
            stack.journal_phase() == "idle"
        })
        .await;
    let rotation_log = daemon.log_text()[log_from..].to_string();

    // Pause and reload.
    let (status, _) = daemon
        .post("/v1/pause", Some(ADMIN_TOKEN), Value::Null)
        .await;
    assert_eq!(status, 200);
    daemon.signal("HUP");
    let m = metric_eventually(&stack, &daemon, "a counted reload", |m| {
        m.value("keyrotd_config_reloads_total", &[("outcome", "ok")]) == Some(1.0)
    })
    .await;
    assert_eq!(m.get("keyrotd_paused", &[]), 1.0);
    assert_eq!(
        m.get("keyrotd_config_reloads_total", &[("outcome", "error")]),
        0.0
    );
    // A bad config is refused and counted.
    std::fs::write(&config, "this is not toml [").unwrap();
    daemon.signal("HUP");
    let m = metric_eventually(&stack, &daemon, "a refused reload", |m| {
        m.value("keyrotd_config_reloads_total", &[("outcome", "error")]) == Some(1.0)
    })
    .await;
    promtool_check(m.text());
    let (status, _) = daemon
        .post("/v1/resume", Some(ADMIN_TOKEN), Value::Null)
        .await;
    assert_eq!(status, 200);
    assert_eq!(daemon.metrics().await.get("keyrotd_paused", &[]), 0.0);

    // No label value outside the config's names and the fixed sets.
    for line in m.text().lines().filter(|l| l.starts_with("keyrotd_")) {
        assert!(
            !line.contains(&rotation_id),
            "a rotation id in a label: {line}"
        );
    }

    // Logs: JSON, one object per line; every line of the rotation carries key and rotation_id.
    let log = daemon.log_text();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<Value>(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
    }
    assert_rotation_logs_json(&rotation_log, &rotation_id);

    // Audit log: every documented field on every record; the rotation's events in order.
    let audit = stack.audit();
    let fields = [
        "ts",
        "key",
        "rotation_id",
        "event",
        "trigger",
        "reason",
        "requested_by",
        "outcome",
        "old_key_id",
        "new_key_id",
        "fingerprint",
        "detail",
        "owner",
        "approved_by",
    ];
    for r in &audit {
        let obj = r.as_object().expect("audit record is an object");
        for f in fields {
            assert!(obj.contains_key(f), "audit record without {f}: {r}");
        }
        assert!(
            obj.keys().all(|k| fields.contains(&k.as_str())),
            "audit record with an undocumented field: {r}"
        );
    }
    let ours: Vec<&Value> = audit
        .iter()
        .filter(|r| r["rotation_id"] == rotation_id.as_str())
        .collect();
    let events: Vec<&str> = ours.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events.first(), Some(&"started"), "{events:?}");
    assert_eq!(events.last(), Some(&"finished"), "{events:?}");
    for e in ["regenerated", "verified"] {
        assert!(events.contains(&e), "{events:?}");
    }
    assert_eq!(
        events.iter().filter(|e| **e == "stored").count(),
        3,
        "one stored per destination: {events:?}"
    );
    assert_eq!(
        events.iter().filter(|e| **e == "notified").count(),
        2,
        "one notified per dependent: {events:?}"
    );
    let allowed = [
        "started",
        "aborted",
        "regenerated",
        "stored",
        "verified",
        "notified",
        "finished",
        "rerotation",
        "drift",
        "recovered",
    ];
    assert!(
        events.iter().all(|e| allowed.contains(e)),
        "events outside the documented set: {events:?}"
    );
    let state = stack.portal.state().await;
    let regenerated = ours.iter().find(|r| r["event"] == "regenerated").unwrap();
    let finished = ours.last().unwrap();
    for r in [regenerated, finished] {
        assert_eq!(r["key"], KEY);
        assert_eq!(r["trigger"], "api");
        assert_eq!(r["reason"], "test: observability");
        assert_eq!(r["new_key_id"], state.key_id.as_str());
        assert_eq!(r["fingerprint"], state.fingerprint.as_str());
        assert!(r["old_key_id"].is_string(), "{r}");
        assert_ne!(r["old_key_id"], r["new_key_id"]);
        assert_eq!(r["fingerprint"].as_str().unwrap().len(), 12);
    }
    assert_eq!(finished["outcome"], "success");
    let audit_text = std::fs::read_to_string(stack.state_dir().join("audit.jsonl")).unwrap();
    for secret in stack.portal.issued_secrets().await {
        assert!(!audit_text.contains(&secret), "a secret in the audit log");
        assert!(!log.contains(&secret), "a secret in the log");
    }
}

/// Every line parses as JSON and carries `key` and `rotation_id`: `log` is what the daemon logged from
/// the moment the test asked for the rotation until its watch ended, when the daemon did nothing
/// else, so no line is left out because it lacks the context checked for. The rotation's own events
/// are among them.
fn assert_rotation_logs_json(log: &str, rotation_id: &str) {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut events = Vec::new();
    for line in &lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert_eq!(
            field(&v, "key").as_deref(),
            Some(KEY),
            "line without key: {line}"
        );
        assert_eq!(
            field(&v, "rotation_id").as_deref(),
            Some(rotation_id),
            "line without the rotation's id: {line}"
        );
        if let Some(e) = v["fields"]["event"].as_str() {
            events.push(e.to_string());
        }
    }
    assert!(lines.len() >= 8, "too few rotation lines:\n{log}");
    for e in ["started", "regenerated", "stored", "notified", "finished"] {
        assert!(
            events.iter().any(|x| x == e),
            "no log line for event {e}: {events:?}\n{log}"
        );
    }
}

/// The invalidation window keyrotd exported lies within what the rotation's own event timestamps
/// allow: it cannot start before the regenerate answer nor after the first confirmed store, and it
/// ends with the last destination written or hook answered.
fn assert_window_matches_the_events(window: f64, record: &Value) {
    let events = record["events"].as_array().expect("events");
    let ts = |e: &Value| {
        chrono::DateTime::parse_from_rfc3339(e["ts"].as_str().expect("ts"))
            .expect("RFC 3339")
            .timestamp_micros() as f64
            / 1e6
    };
    let at = |name: &str| -> Vec<f64> {
        events
            .iter()
            .filter(|e| e["event"] == name)
            .map(ts)
            .collect()
    };
    let regenerated = at("regenerated")[0];
    let stored = at("stored");
    let notified = at("notified");
    assert_eq!((stored.len(), notified.len()), (3, 2), "{record:#}");
    let first_stored = stored.iter().copied().fold(f64::MAX, f64::min);
    let last_effect = stored
        .iter()
        .chain(&notified)
        .copied()
        .fold(f64::MIN, f64::max);
    // The daemon takes its monotonic instant and the event's wall-clock time next to each other.
    let slack = 0.02;
    assert!(
        window <= last_effect - regenerated + slack,
        "window {window}s is longer than regenerate answer to last effect ({}s)",
        last_effect - regenerated
    );
    assert!(
        window >= last_effect - first_stored - slack,
        "window {window}s is shorter than first store to last effect ({}s)",
        last_effect - first_stored
    );
    let reported = record.to_string();
    assert!(
        reported.contains(&format!("invalidation window {window:.3}s")),
        "the finished event reports the same window ({window:.3}s): {record:#}"
    );
}

/// A field of a JSON log line: top level, in its fields, or in its current span.
fn field(v: &Value, name: &str) -> Option<String> {
    [&v[name], &v["fields"][name], &v["span"][name]]
        .into_iter()
        .find_map(|x| x.as_str().map(String::from))
}

#[tokio::test(flavor = "multi_thread")]
async fn text_logs_show_the_rotation_span_on_every_line_failures_included() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    // Lines logged deep inside the rotation, where a lost span would show: a regenerate answered 503
    // (retried) and a reload hook failing once (retried).
    stack
        .portal
        .faults(serde_json::json!({ "regenerate": { "fail_next": 1, "status": 503 } }))
        .await;
    stack
        .dep_aws
        .faults(serde_json::json!({ "fail_reload_next": 1 }))
        .await;
    // From here on, the daemon's only work is the rotation the test asks for.
    let log_from = daemon.log_text().len();
    let id = daemon.start_rotate("test: text logs").await;
    let record = daemon.wait_rotation(&id, T).await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    let log = daemon.log_text()[log_from..].to_string();
    let context = format!("rotation{{key={KEY} rotation_id={id}}}");
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 10, "too few lines of the rotation:\n{log}");
    for line in &lines {
        assert!(line.contains(&context), "line without {context}: {line}");
    }
    let warnings: Vec<&&str> = lines.iter().filter(|l| l.contains(" WARN ")).collect();
    assert!(
        warnings.iter().any(|l| l.contains("Reload hook failed.")),
        "the failing hook's warning is among them:\n{log}"
    );
    for event in ["started", "regenerated", "stored", "notified", "finished"] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("event=\"{event}\""))),
            "no line for {event}:\n{log}"
        );
    }
}

/// The config of `stack` plus a second key `other` on its own provider (`portal2`, the same
/// simulator), with a file destination and a verified, hooked dependent.
fn config_with_other(stack: &Stack, o: &Options) -> String {
    let mut text = stack.config(o);
    text.push_str(&format!(
        r#"
[providers.portal2]
kind = "aos"
base_url = "{portal}"
management_token = {{ env = "KEYROTD_TEST_AOS_TOKEN" }}
account_id = "acct_42"
timeout = "5s"

[[keys]]
name = "other"
provider = "portal2"
schedule = "0 3 * * *"
max_age = "30d"
watch = "0s"

  [[keys.destinations]]
  store = "local"
  file = "other.key"

  [[keys.dependents]]
  name = "other-worker"
  reads_from = ["local"]
  verify = {{ url = "{verify}", expect_status = 200, timeout = "2s" }}
  reload = {{ url = "{reload}", timeout = "3s", signing_key = {{ env = "KEYROTD_TEST_HOOK_KEY" }} }}
"#,
        portal = stack.portal.url(),
        verify = stack.dep_vault.verify_url(),
        reload = stack.dep_vault.reload_url(),
    ));
    text
}

fn other_series(m: &Scrape) -> Vec<String> {
    m.text()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.contains("\"other\"") || l.contains("other-worker") || l.contains("portal2"))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_removed_by_a_reload_loses_its_series() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    std::fs::write(&config, config_with_other(&stack, &o)).unwrap();
    // The daemon's clock starts on Monday 2026-03-02 at 10:00 UTC: `other` (daily at 03:00) is next
    // due on Tuesday at 03:00, and cannot come due while the test runs.
    let daemon = stack.daemon_at("2026-03-02 10:00:00", &config).await;

    let m = daemon.metrics().await;
    promtool_check(m.text());
    let other = [("key", "other")];
    assert_eq!(
        m.get(
            "keyrotd_rotations_total",
            &[("key", "other"), ("outcome", "success")]
        ),
        0.0
    );
    assert_eq!(
        m.get(
            "keyrotd_store_writes_total",
            &[("key", "other"), ("store", "local"), ("outcome", "ok")]
        ),
        0.0
    );
    assert_eq!(
        m.get(
            "keyrotd_post_rotation_auth_failing",
            &[("key", "other"), ("dependent", "other-worker")]
        ),
        0.0
    );
    // Its destinations are empty: no destination holds the active key, which the start-up look reports.
    assert_eq!(m.get("keyrotd_drift", &other), 1.0);
    // A scheduled key has its next rotation and period from the start; max_age is exported.
    assert_eq!(
        m.get("keyrotd_key_next_rotation_timestamp_seconds", &other),
        1_772_506_800.0,
        "next rotation 2026-03-03T03:00:00Z"
    );
    assert_eq!(
        m.get("keyrotd_key_schedule_period_seconds", &other),
        86400.0
    );
    assert_eq!(m.get("keyrotd_key_max_age_seconds", &other), 30.0 * 86400.0);
    // The manual-only key has no next rotation.
    assert_eq!(
        m.value(
            "keyrotd_key_next_rotation_timestamp_seconds",
            &[("key", KEY)]
        ),
        None
    );
    // Recovery read both keys' status: both are active.
    assert_eq!(m.get("keyrotd_key_active", &other), 1.0);
    assert_eq!(m.get("keyrotd_key_active", &[("key", KEY)]), 1.0);
    assert!(
        m.get(
            "keyrotd_provider_requests_total",
            &[
                ("provider", "portal2"),
                ("operation", "status"),
                ("outcome", "ok")
            ]
        ) >= 1.0
    );
    assert!(!other_series(&m).is_empty());

    // Reload without `other`: its series are gone, billing's stay.
    stack.write_config(&o);
    daemon.signal("HUP");
    let m = metric_eventually(&stack, &daemon, "the reload", |m| {
        m.value("keyrotd_config_reloads_total", &[("outcome", "ok")]) == Some(1.0)
    })
    .await;
    promtool_check(m.text());
    assert_eq!(other_series(&m), Vec::<String>::new(), "stale series");
    for name in [
        "keyrotd_rotations_total",
        "keyrotd_drift",
        "keyrotd_key_active",
        "keyrotd_store_writes_total",
        "keyrotd_reload_hooks_total",
    ] {
        assert!(
            m.samples(name)
                .any(|s| s.labels.get("key").map(String::as_str) == Some(KEY)),
            "{name} of {KEY} kept"
        );
    }
    let (status, _) = daemon.get("/v1/keys/other").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dependent_keeping_its_old_key_is_exported_until_the_resent_hook_reloads_it() {
    let stack = Stack::start().await;
    let o = Options {
        watch: "60s".into(),
        watch_interval: "1s".into(),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    // A first rotation gives both dependents a key; then the worker ignores the next rotation's hook
    // and the first resend, and reloads on the second resend.
    let first = daemon.rotate("test: first key").await;
    assert_eq!(first["outcome"], "success", "{first:#}");
    stack.assert_consistent(&o).await;
    stack
        .dep_vault
        .faults(serde_json::json!({ "ignore_reload_next": 2 }))
        .await;

    let record = daemon.rotate("test: ignore reload").await;
    // The hook answered 200, so the rotation itself succeeded: only the watch can tell.
    assert_eq!(record["outcome"], "success", "{record:#}");
    let worker = [("key", KEY), ("dependent", "worker")];
    let m = metric_eventually(&stack, &daemon, "worker failing auth", |m| {
        m.value("keyrotd_post_rotation_auth_failing", &worker) == Some(1.0)
    })
    .await;
    assert!(
        m.get(
            "keyrotd_post_rotation_checks_total",
            &[
                ("key", KEY),
                ("dependent", "worker"),
                ("result", "auth_failure")
            ]
        ) >= 1.0
    );
    // The other dependent reloaded: not failing.
    assert_eq!(
        m.get(
            "keyrotd_post_rotation_auth_failing",
            &[("key", KEY), ("dependent", "edge")]
        ),
        0.0
    );

    // Three failed probes, a resend (ignored), three more, the second resend: it reloads, and the
    // gauge goes back to 0.
    let m = metric_eventually(&stack, &daemon, "worker authenticating again", |m| {
        m.value("keyrotd_post_rotation_auth_failing", &worker) == Some(0.0)
    })
    .await;
    assert_eq!(
        m.get(
            "keyrotd_reload_hooks_total",
            &[("key", KEY), ("dependent", "worker"), ("outcome", "ok")]
        ),
        4.0,
        "one call per rotation and two resends"
    );
    assert_eq!(
        m.get("keyrotd_post_rotation_auth_failures_total", &worker),
        6.0,
        "three failed probes before each resend"
    );
    let statuses: Vec<u16> = stack
        .dep_vault
        .requests()
        .await
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200], "four reload requests");
    stack.assert_consistent(&o).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_remembers_the_last_successful_rotation() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    let mut daemon = stack.daemon(&config).await;
    let record = daemon.rotate("test: before restart").await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    let k = [("key", KEY)];
    let before = daemon
        .metrics()
        .await
        .get("keyrotd_rotation_last_success_timestamp_seconds", &k);
    daemon.terminate(Duration::from_secs(30));

    let daemon = stack.daemon(&config).await;
    let m = daemon.metrics().await;
    let after = m.get("keyrotd_rotation_last_success_timestamp_seconds", &k);
    assert!(
        (after - before).abs() < 2.0,
        "last success {before} forgotten by the restart: {after}"
    );
    // What the provider says is read again at start.
    assert_eq!(m.get("keyrotd_key_active", &k), 1.0);
    assert!(m.get("keyrotd_key_last_rotation_timestamp_seconds", &k) > 0.0);
}
