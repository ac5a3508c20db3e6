//! SIGTERM and SIGINT, end to end: scheduling stops at once, and a rotation between regenerate and the
//! end of storing is waited for, at most its `store_deadline`.
//!
//! The stack has a second key, `other`, on a portal of its own, scheduled every second: while the
//! daemon waits for `billing`'s rotation to finish storing (OpenBao is down, so it takes the whole
//! store deadline), `other` would start several rotations if scheduling went on. Times are compared
//! on the daemon's own clock: its log and its audit log.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::support::sim::Portal;
use crate::support::stack::{KEY, Options, Stack};

const LONG: Duration = Duration::from_secs(60);
const STORE_DEADLINE: u64 = 6;

/// The stack's config plus `other`: its own portal, a file destination, due every second.
fn config_with_other(stack: &Stack, o: &Options, portal: &Portal) -> String {
    format!(
        r#"{base}
[providers.other-portal]
kind = "aos"
base_url = "{url}"
management_token = {{ env = "KEYROTD_TEST_OTHER_TOKEN" }}
account_id = "acct_42"

[[keys]]
name = "other"
provider = "other-portal"
schedule = "* * * * * *"
watch = "0s"
on_first_contact = "rotate"
max_regenerations_per_day = 1000

  [[keys.destinations]]
  store = "local"
  file = "other.key"
"#,
        base = stack.config(o),
        url = portal.url(),
    )
}

/// The daemon's timestamp at the start of the first log line holding `text`.
fn logged_at(log: &str, text: &str) -> DateTime<Utc> {
    let line = log
        .lines()
        .find(|l| l.contains(text))
        .unwrap_or_else(|| panic!("no {text:?} in the log:\n{log}"));
    let ts = line.split_whitespace().next().unwrap_or_default();
    ts.parse()
        .unwrap_or_else(|e| panic!("no timestamp ({e}) on: {line}"))
}

fn audit_at(r: &serde_json::Value) -> DateTime<Utc> {
    r["ts"].as_str().expect("ts").parse().expect("RFC 3339")
}

async fn a_signal_stops_scheduling_and_waits_for_storing(sig: &str) {
    let stack = Stack::start().await;
    let other_portal = Portal::start();
    let o = Options {
        store_deadline: format!("{STORE_DEADLINE}s"),
        ..Options::default()
    };
    let config = stack.write_config_text(&config_with_other(&stack, &o, &other_portal));
    let mut daemon = stack
        .daemon_with_env(
            &config,
            &[("KEYROTD_TEST_OTHER_TOKEN", other_portal.token())],
        )
        .await;
    let other_started = || {
        stack
            .audit()
            .into_iter()
            .filter(|r| r["key"] == "other" && r["event"] == "started")
            .collect::<Vec<_>>()
    };
    stack
        .eventually(LONG, "the schedule rotating other", || async {
            other_started().len() >= 2
        })
        .await;

    // billing: the portal answers after a second, and by then OpenBao is gone: storing lasts the
    // whole store deadline.
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 1000 } }))
        .await;
    let id = daemon.start_rotate("test: shutdown while storing").await;
    daemon.wait_phase("regenerating", LONG).await;
    stack.bao.down();
    stack
        .eventually(LONG, "a refused OpenBao write: storing goes on", || async {
            daemon.metrics().await.get(
                "keyrotd_store_writes_total",
                &[("key", KEY), ("store", "vault"), ("outcome", "error")],
            ) >= 1.0
        })
        .await;
    let exit = tokio::task::block_in_place(|| daemon.stop_with(sig, LONG));
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", daemon.log_text());

    let log = daemon.log_text();
    let shutdown = logged_at(&log, "Shutting down");
    let ended = logged_at(&log, "All rotations ended");
    // It waited for the rotation: billing's outcome was decided before the daemon ended...
    let finished = stack
        .audit()
        .into_iter()
        .find(|r| r["rotation_id"] == id.as_str() && r["event"] == "finished")
        .unwrap_or_else(|| panic!("the rotation was not waited for:\n{log}"));
    assert_eq!(finished["outcome"], "degraded", "{finished:#}");
    assert!(
        shutdown < audit_at(&finished) && audit_at(&finished) <= ended,
        "the signal came while the rotation was storing, and it ended before the daemon:\n{log}"
    );
    // ...which took at most the store deadline from the signal on.
    let waited = (ended - shutdown).to_std().unwrap_or_default();
    assert!(
        waited <= Duration::from_secs(STORE_DEADLINE + 2),
        "waited {waited:?} for a rotation with a {STORE_DEADLINE}s store deadline:\n{log}"
    );
    // Nothing was scheduled after the signal.
    let late: Vec<_> = other_started()
        .into_iter()
        .filter(|r| audit_at(r) > shutdown)
        .collect();
    assert!(late.is_empty(), "rotations started after {sig}: {late:#?}");
    assert_eq!(stack.journal()["phase"], "idle", "{:#}", stack.journal());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_scheduling_and_waits_at_most_the_store_deadline() {
    a_signal_stops_scheduling_and_waits_for_storing("TERM").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_stops_scheduling_and_waits_at_most_the_store_deadline() {
    a_signal_stops_scheduling_and_waits_for_storing("INT").await;
}
