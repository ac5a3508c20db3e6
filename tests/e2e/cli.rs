//! The `keyrotd` command line against the real stack: `rotate` in-process and handed to a daemon, its
//! exit codes (0 success, 1 aborted/refused, 2 unknown key), `--force` and windows, `--dry-run`, the
//! state-dir lock, `status` (human and JSON, never a secret), `plan`, and a scheduled rotation.

use std::time::Duration;

use crate::support::daemon::{ADMIN_TOKEN, KEY, Options, Stack};
use chrono::{Datelike, Utc};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(90);

/// Runs `keyrotd -c config args...` to completion without blocking the runtime's other tasks.
fn keyrotd(stack: &Stack, config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    tokio::task::block_in_place(|| stack.command(config, args))
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_without_a_daemon_runs_in_process_and_prints_the_phases() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    let (code, out, err) = keyrotd(&stack, &config, &["rotate", KEY, "--reason", "test: cli"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for phase in [
        "preflight_ok",
        "regenerated",
        "stored",
        "notified",
        "verified",
        "finished",
    ] {
        assert!(out.contains(phase), "{phase} printed:\n{out}");
    }
    assert!(out.contains("outcome: success"), "{out}");
    assert!(!out.contains("handing the rotation"), "{out}");
    stack.assert_consistent(&o).await;
    let audit = stack.audit();
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "finished" && r["reason"] == "test: cli"),
        "{audit:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_hands_over_to_a_running_daemon() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    let (code, out, err) = keyrotd(&stack, &config, &["rotate", KEY, "--reason", "via daemon"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("handing the rotation to it"), "{out}");
    assert!(out.contains("outcome: success"), "{out}");
    // The daemon ran it: its metrics count it.
    assert_eq!(
        daemon
            .metric(
                "keyrotd_rotations_total",
                &["key=\"billing\"", "outcome=\"success\""]
            )
            .await,
        Some(1.0),
        "{}",
        daemon.metrics().await
    );
    stack.assert_consistent(&o).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_exit_codes_for_an_abort_and_an_unknown_key() {
    let stack = Stack::start().await;
    let config = stack.write_config(&Options::default());
    let (code, out, err) = keyrotd(&stack, &config, &["rotate", "nope", "--reason", "x"]);
    assert_eq!(code, 2, "unknown key: stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("unknown key"), "{err}");

    stack.portal.faults(json!({ "active": false })).await;
    let key_id = stack.portal.state().await.key_id;
    let (code, out, err) = keyrotd(&stack, &config, &["rotate", KEY, "--reason", "x"]);
    assert_eq!(code, 1, "aborted: stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("outcome: aborted"), "{out}");
    assert_eq!(stack.portal.state().await.key_id, key_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn force_overrides_the_rotation_window() {
    let stack = Stack::start().await;
    // A one-minute window on a day that is not today: we are outside it.
    let day = if Utc::now().weekday() == chrono::Weekday::Mon {
        "Tue"
    } else {
        "Mon"
    };
    let o = Options {
        key_extra: format!("window = {{ days = \"{day}\", start = \"00:00\", end = \"00:01\" }}\n"),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let key_id = stack.portal.state().await.key_id;
    let (code, out, err) = keyrotd(&stack, &config, &["rotate", KEY, "--reason", "x"]);
    assert_eq!(
        code, 1,
        "outside the window: stdout:\n{out}\nstderr:\n{err}"
    );
    assert!(err.contains("outside its rotation window"), "{err}");
    assert!(err.contains("--force"), "the message says how: {err}");
    assert_eq!(stack.portal.state().await.key_id, key_id, "nothing rotated");

    let (code, out, err) = keyrotd(
        &stack,
        &config,
        &["rotate", KEY, "--reason", "x", "--force"],
    );
    assert_eq!(code, 0, "forced: stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("outcome: success"), "{out}");
    assert_ne!(stack.portal.state().await.key_id, key_id);
    stack.assert_consistent(&o).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_prints_the_preflight_and_changes_nothing() {
    let stack = Stack::start().await;
    let config = stack.write_config(&Options::default());
    let before = stack.portal.state().await;
    let (code, out, err) = keyrotd(
        &stack,
        &config,
        &["rotate", KEY, "--reason", "x", "--dry-run"],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("dry run: would rotate"), "{out}");
    assert!(
        out.contains("writable"),
        "preflight findings printed: {out}"
    );
    assert!(out.contains("dependent worker reachable"), "{out}");
    let after = stack.portal.state().await;
    assert_eq!(after.key_id, before.key_id);
    assert_eq!(after.regenerations, before.regenerations);
    assert_eq!(stack.vault_fingerprint().await, None, "OpenBao not written");
    assert!(!stack.key_file().exists(), "the file not written");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_portal_and_destinations_but_no_secret() {
    let stack = Stack::start().await;
    let config = stack.write_config(&Options::default());
    let (code, out, err) = keyrotd(&stack, &config, &["rotate", KEY, "--reason", "x"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let portal = stack.portal.state().await;

    let (code, text, err) = keyrotd(&stack, &config, &["status", KEY]);
    assert_eq!(code, 0, "{err}");
    for word in [
        "Active yes",
        "First Generated",
        "Last Rotated",
        "Generated By",
        "acct_42",
        portal.key_id.as_str(),
        portal.fingerprint.as_str(),
        "vault",
        "aws",
        "local",
    ] {
        assert!(text.contains(word), "{word} in status:\n{text}");
    }
    assert!(text.contains("drift: no"), "{text}");

    let (code, js, err) = keyrotd(&stack, &config, &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&js).expect("status --json is JSON");
    let k = &v[0];
    assert_eq!(k["name"], KEY);
    assert_eq!(k["portal"]["active"], true);
    assert_eq!(k["portal"]["account_id"], "acct_42");
    assert_eq!(k["portal"]["key_id"], portal.key_id.as_str());
    assert!(!k["portal"]["first_generated"].is_null(), "{k:#}");
    assert!(!k["portal"]["last_rotated"].is_null(), "{k:#}");
    assert!(!k["portal"]["generated_by"].is_null(), "{k:#}");
    let dests = k["destinations"].as_array().expect("destinations");
    assert_eq!(dests.len(), 3);
    for d in dests {
        assert_eq!(d["fingerprint"], portal.fingerprint.as_str(), "{d:#}");
        assert_eq!(d["key_id"], portal.key_id.as_str(), "{d:#}");
        assert_eq!(d["in_sync"], true, "{d:#}");
    }
    let secrets = stack.portal.issued_secrets().await;
    assert!(secrets.len() >= 2);
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "status prints no secret");
        assert!(!js.contains(s.as_str()), "status --json prints no secret");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_prints_the_next_runs_of_a_scheduled_key() {
    let stack = Stack::start().await;
    let o = Options {
        schedule: Some("0 0 3 * * *".into()),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let (code, out, err) = keyrotd(&stack, &config, &["plan", "--count", "3"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let now = Utc::now().naive_utc();
    let times: Vec<chrono::NaiveDateTime> = out
        .split('(')
        .skip(1)
        .filter_map(|s| s.split(" UTC)").next())
        .filter_map(|s| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").ok())
        .collect();
    assert_eq!(times.len(), 3, "three runs:\n{out}");
    assert!(times.iter().all(|t| *t > now), "in the future:\n{out}");
    assert!(times.windows(2).all(|w| w[0] < w[1]), "ascending:\n{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_in_process_rotate_is_kept_out_by_the_state_lock() {
    let stack = Stack::start().await;
    let config = stack.write_config(&Options::default());
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 4000 } }))
        .await;
    let (first, second) = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let first = s.spawn(|| stack.command(&config, &["rotate", KEY, "--reason", "one"]));
            std::thread::sleep(Duration::from_millis(1500));
            let second = stack.command(&config, &["rotate", KEY, "--reason", "two"]);
            (first.join().unwrap(), second)
        })
    });
    assert_eq!(first.0, 0, "first: {}\n{}", first.1, first.2);
    assert_ne!(second.0, 0, "second refused: {}\n{}", second.1, second.2);
    assert!(
        second.2.contains("another keyrotd process holds"),
        "{}",
        second.2
    );
    assert_eq!(stack.portal.state().await.regenerations, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_trigger_while_rotating_answers_409() {
    let stack = Stack::start().await;
    let config = stack.write_config(&Options::default());
    let daemon = stack.daemon(&config).await;
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 3000 } }))
        .await;
    let id = daemon.start_rotate("one").await;
    let (status, body) = daemon
        .post(
            &format!("/v1/keys/{KEY}/rotate"),
            Some(ADMIN_TOKEN),
            json!({ "reason": "two" }),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let record = daemon.wait_rotation(&id, LONG).await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    assert_eq!(stack.portal.state().await.regenerations, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_rotation_runs_by_itself() {
    let stack = Stack::start().await;
    let o = Options {
        schedule: Some("*/5 * * * * *".into()),
        key_extra: "jitter = \"0s\"\n".into(),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    stack
        .eventually(LONG, "a scheduled rotation succeeds", || async {
            stack.audit().iter().any(|r| {
                r["event"] == "finished" && r["trigger"] == "schedule" && r["outcome"] == "success"
            })
        })
        .await;
    // Stop the schedule, let any running rotation finish, then check the end state.
    let (status, _) = daemon.post("/v1/pause", Some(ADMIN_TOKEN), json!({})).await;
    assert_eq!(status, 200);
    stack
        .eventually(LONG, "no rotation running", || async {
            daemon.key().await["phase"] == "idle"
        })
        .await;
    stack.assert_consistent(&o).await;
}
