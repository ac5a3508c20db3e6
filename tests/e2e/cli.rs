//! The `keyrotd` command line against the real stack: `rotate` in-process and handed to a daemon, its
//! exit codes (0 success, 1 aborted/refused, 2 unknown key, 3 degraded), `--force` and windows,
//! `--dry-run`, `--watch`, the state-dir lock, the regeneration budget it shares with the daemon,
//! `status` (human and JSON, never a secret) and `plan`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::daemon::Daemon;
use crate::support::stack::{ADMIN_TOKEN, KEY, Options, Stack};

const LONG: Duration = Duration::from_secs(90);

/// Runs `keyrotd -c config args...` (no daemon to hand over to) to completion without blocking the
/// runtime's other tasks.
fn keyrotd(stack: &Stack, config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    tokio::task::block_in_place(|| stack.command(config, args))
}

/// The same, finding `daemon` where the config says the daemon listens.
fn keyrotd_via(
    stack: &Stack,
    daemon: &Daemon,
    config: &std::path::Path,
    args: &[&str],
) -> (i32, String, String) {
    tokio::task::block_in_place(|| stack.command_via(daemon, config, args))
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
    let (code, out, err) = keyrotd_via(
        &stack,
        &daemon,
        &config,
        &["rotate", KEY, "--reason", "via daemon"],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("handing the rotation to it"), "{out}");
    assert!(out.contains("outcome: success"), "{out}");
    // The daemon ran it: its metrics count it.
    assert_eq!(
        daemon.metrics().await.get(
            "keyrotd_rotations_total",
            &[("key", KEY), ("outcome", "success")]
        ),
        1.0
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

/// A Monday morning (UTC), the clock the calendar tests run on.
const MONDAY_10AM: &str = "2026-03-02 10:00:00";

#[tokio::test(flavor = "multi_thread")]
async fn force_overrides_the_rotation_window() {
    let stack = Stack::start().await;
    // A window open on Tuesdays only; the command runs on a Monday.
    let o = Options {
        key_extra: "window = { days = \"Tue\", start = \"00:00\", end = \"23:59\" }\n".into(),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let key_id = stack.portal.state().await.key_id;
    let rotate = |args: &[&str]| {
        tokio::task::block_in_place(|| stack.command_at(MONDAY_10AM, &config, args))
    };
    let (code, out, err) = rotate(&["rotate", KEY, "--reason", "x"]);
    assert_eq!(
        code, 1,
        "outside the window: stdout:\n{out}\nstderr:\n{err}"
    );
    assert!(err.contains("outside its rotation window"), "{err}");
    assert!(err.contains("--force"), "the message says how: {err}");
    assert_eq!(stack.portal.state().await.key_id, key_id, "nothing rotated");

    let (code, out, err) = rotate(&["rotate", KEY, "--reason", "x", "--force"]);
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
    let (code, out, err) = tokio::task::block_in_place(|| {
        stack.command_at(MONDAY_10AM, &config, &["plan", "--count", "3"])
    });
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let times: Vec<&str> = out
        .split('(')
        .skip(1)
        .filter_map(|s| s.split(')').next())
        .collect();
    assert_eq!(
        times,
        [
            "2026-03-03 03:00:00 UTC",
            "2026-03-04 03:00:00 UTC",
            "2026-03-05 03:00:00 UTC"
        ],
        "the three 03:00 runs after Monday 10:00:\n{out}"
    );
    assert!(out.contains(KEY), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_in_process_rotate_is_kept_out_by_the_state_lock() {
    let stack = Stack::start().await;
    let config = stack.write_config(&Options::default());
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 4000 } }))
        .await;
    let rt = tokio::runtime::Handle::current();
    let (first, second) = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let first = s.spawn(|| stack.command(&config, &["rotate", KEY, "--reason", "one"]));
            // The portal counts a regenerate when it receives it and then holds the answer back: the
            // first process is inside its rotation, holding the lock.
            rt.block_on(
                stack.eventually(LONG, "the first rotate regenerating", || async {
                    stack.regenerations().await == 1
                }),
            );
            let second = stack.command(&config, &["rotate", KEY, "--reason", "two"]);
            (first.join().unwrap(), second)
        })
    });
    assert_eq!(first.0, 0, "first: {}\n{}", first.1, first.2);
    assert_eq!(second.0, 1, "second refused: {}\n{}", second.1, second.2);
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
    // `keyrotd rotate` handed to the daemon gets the same 409 and exits 1, saying so.
    let (code, out, err) = keyrotd_via(
        &stack,
        &daemon,
        &config,
        &["rotate", KEY, "--reason", "three"],
    );
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("409"), "the refusal is shown: {err}");
    let record = daemon.wait_rotation(&id, LONG).await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    assert_eq!(stack.portal.state().await.regenerations, 1);
}

/// The lines of `rotate` output for watch probes of `dependent`.
fn probe_lines<'a>(out: &'a str, dependent: &str) -> Vec<&'a str> {
    out.lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("probe"))
        .filter(|l| l.contains(&format!("{dependent}:")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_watch_stays_through_the_watch_and_prints_each_probe() {
    let stack = Stack::start().await;
    let o = Options {
        watch: "3s".into(),
        watch_interval: "1s".into(),
        ..Options::default()
    };
    let config = stack.write_config(&o);

    // In this process: every probe of both dependents is printed, then the outcome. (Its clock is
    // fixed in the morning so that the printed times of day can be compared.)
    let (code, out, err) = tokio::task::block_in_place(|| {
        stack.command_at(
            MONDAY_10AM,
            &config,
            &["rotate", KEY, "--reason", "watched", "--watch"],
        )
    });
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for dep in ["worker", "edge"] {
        let probes = probe_lines(&out, dep);
        assert!(probes.len() >= 2, "probes of {dep} over 3 s:\n{out}");
        assert!(
            probes.iter().all(|p| p.to_lowercase().ends_with(": ok")),
            "{out}"
        );
    }
    // It stayed through the watch: probes a watch_interval and more after the rotation finished.
    let at = |line: &str| {
        let t = line.split_whitespace().next().expect("a time");
        chrono::NaiveTime::parse_from_str(t, "%H:%M:%S%.3f").expect("HH:MM:SS.mmm")
    };
    let finished = out
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("finished"))
        .expect("a finished line");
    let last_probe = *probe_lines(&out, "worker").last().unwrap();
    assert!(
        at(last_probe) - at(finished) >= chrono::Duration::milliseconds(900),
        "the last probe comes a watch_interval after the outcome:\n{out}"
    );
    let outcome = out.rfind("outcome: success").expect("the outcome line");
    assert!(
        out.rfind(last_probe).unwrap() < outcome,
        "the outcome line is printed after the watch:\n{out}"
    );

    // Handed to a daemon: the same, followed through the daemon's record.
    let daemon = stack.daemon(&config).await;
    let (code, out, err) = keyrotd_via(
        &stack,
        &daemon,
        &config,
        &["rotate", KEY, "--reason", "watched via daemon", "--watch"],
    );
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("handing the rotation to it"), "{out}");
    for dep in ["worker", "edge"] {
        assert!(probe_lines(&out, dep).len() >= 2, "probes of {dep}:\n{out}");
    }
    assert_ne!(
        daemon.key().await["phase"],
        "watching",
        "it returned after the watch"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_regeneration_budget_spent_by_the_cli_binds_the_daemon() {
    let stack = Stack::start().await;
    let o = Options {
        max_regenerations_per_day: 1,
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let (code, out, err) = keyrotd(&stack, &config, &["rotate", KEY, "--reason", "cli"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(stack.regenerations().await, 1);
    assert_eq!(stack.journal_regenerations(), 1, "{:#}", stack.journal());

    // The daemon reads the budget from the same journal: the day's one regeneration is spent.
    let daemon = stack.daemon(&config).await;
    let record = daemon.rotate("daemon after the cli").await;
    assert_eq!(record["outcome"], "failed", "{record:#}");
    assert!(
        record.to_string().contains("regeneration budget exhausted"),
        "the record names the budget: {record:#}"
    );
    assert_eq!(
        stack.regenerations().await,
        1,
        "the daemon did not regenerate"
    );
    stack.assert_consistent(&o).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_emergency_rotation_with_openbao_down_rotates_only_with_allow_partial() {
    let stack = Stack::start().await;
    // The command's own background fill ends with its process: the daemon's reconcile copies the
    // key to what the command could not reach.
    let o = Options {
        reconcile_interval: "5s".into(),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let before = stack.portal.state().await;
    stack.bao.down();

    // `--force` alone: preflight needs every destination, so nothing is regenerated.
    let args = ["rotate", KEY, "--reason", "test: key exposed", "--force"];
    let (code, out, err) = keyrotd(&stack, &config, &args);
    assert_eq!(code, 1, "aborted: stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("outcome: aborted"), "{out}");
    assert_eq!(stack.portal.state().await.key_id, before.key_id);

    // The operator's explicit choice: rotated, stored where it can be, `degraded` (exit code 3).
    let args = [&args[..], &["--allow-partial"]].concat();
    let (code, out, err) = keyrotd(&stack, &config, &args);
    assert_eq!(code, 3, "degraded: stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("outcome: degraded"), "{out}");
    assert!(out.contains("filled by the daemon's reconcile"), "{out}");
    let now = stack.portal.state().await;
    assert_ne!(now.key_id, before.key_id, "the exposed key is gone");
    let held = stack.destination_fingerprints().await;
    assert_ne!(
        held[0],
        Some(now.fingerprint.clone()),
        "OpenBao was out of reach"
    );
    assert_eq!(
        held[1..],
        [Some(now.fingerprint.clone()), Some(now.fingerprint.clone())],
        "AWS and the key file hold the new key"
    );
    let audit = stack.audit();
    assert!(
        audit.iter().any(|r| r["event"] == "started"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("partial destinations allowed"))),
        "the choice is in the audit log: {audit:#?}"
    );

    // OpenBao back: the daemon's reconcile fills what the command could not reach.
    stack.bao.up();
    let _daemon = stack.daemon(&config).await;
    stack
        .eventually(LONG, "OpenBao filled with the new key", || async {
            stack.vault_fingerprint().await == Some(now.fingerprint.clone())
        })
        .await;
    stack.assert_consistent(&o).await;
    assert_eq!(
        stack.portal.state().await.regenerations,
        1,
        "regenerated once"
    );
}
