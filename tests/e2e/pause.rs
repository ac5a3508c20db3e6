//! Pause, end to end: scheduled rotations stop (through `POST /v1/pause`, or `paused = true` from
//! the start) and start again on resume, while an operator's forced rotation and recovery still run.
//!
//! That a paused schedule starts nothing can only be observed for a while: each test watches for three
//! of the schedule's periods and says so.

use std::time::Duration;

use serde_json::json;

use crate::support::daemon::Daemon;
use crate::support::holds_for;
use crate::support::stack::{ADMIN_TOKEN, FIRST_CONTACT_ROTATES, KEY, Options, Stack};

const LONG: Duration = Duration::from_secs(60);

/// Every 3 seconds.
const SCHEDULE: &str = "*/3 * * * * *";
const THREE_PERIODS: Duration = Duration::from_secs(9);

/// How many rotations the schedule started (audit `started` records with trigger `schedule`).
fn scheduled(stack: &Stack) -> usize {
    stack
        .audit()
        .iter()
        .filter(|r| r["event"] == "started" && r["trigger"] == "schedule")
        .count()
}

async fn paused_gauge(daemon: &Daemon) -> f64 {
    daemon.metrics().await.get("keyrotd_paused", &[])
}

#[tokio::test(flavor = "multi_thread")]
async fn pausing_stops_the_schedule_and_resuming_starts_it_again() {
    let stack = Stack::start().await;
    let o = Options {
        schedule: Some(SCHEDULE.into()),
        // The destinations start empty: a key keyrotd never held is otherwise left to an operator.
        key_extra: FIRST_CONTACT_ROTATES.into(),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    stack
        .eventually(LONG, "a scheduled rotation", || async {
            stack.audit().iter().any(|r| {
                r["event"] == "finished" && r["trigger"] == "schedule" && r["outcome"] == "success"
            })
        })
        .await;

    daemon.admin_post("/v1/pause", 200).await;
    assert_eq!(paused_gauge(&daemon).await, 1.0);
    // A scheduled rotation that had already started is allowed to finish.
    stack
        .eventually(LONG, "no rotation running", || async {
            daemon.key().await["phase"] == "idle"
        })
        .await;
    let before = scheduled(&stack);
    holds_for(
        THREE_PERIODS,
        "no scheduled rotation while paused",
        || async { scheduled(&stack) == before },
    )
    .await;
    stack.assert_consistent(&o).await;

    daemon.admin_post("/v1/resume", 200).await;
    assert_eq!(paused_gauge(&daemon).await, 0.0);
    stack
        .eventually(LONG, "the schedule running again", || async {
            scheduled(&stack) > before
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn paused_at_start_holds_yet_forced_and_recovery_rotations_run() {
    let stack = Stack::start().await;
    let o = Options {
        schedule: Some(SCHEDULE.into()),
        // The destinations start empty: a key keyrotd never held is otherwise left to an operator.
        key_extra: FIRST_CONTACT_ROTATES.into(),
        paused: true,
        store_deadline: "3s".into(),
        with_file: false,
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    assert_eq!(paused_gauge(&daemon).await, 1.0, "paused from the start");
    holds_for(
        THREE_PERIODS,
        "no scheduled rotation while paused from the start",
        || async { stack.audit().is_empty() },
    )
    .await;
    assert_eq!(stack.regenerations().await, 0);

    // An operator's rotation is refused unless forced, through the API and the command line.
    let (status, body) = daemon
        .post(
            &format!("/v1/keys/{KEY}/rotate"),
            Some(ADMIN_TOKEN),
            json!({ "reason": "paused" }),
        )
        .await;
    assert_eq!(status, 423, "{body}");
    let (code, out, err) = tokio::task::block_in_place(|| {
        stack.command_via(
            &daemon,
            &config,
            &["rotate", KEY, "--reason", "cli, paused"],
        )
    });
    assert_eq!(code, 1, "refused while paused:\n{out}\n{err}");
    let (code, out, err) = tokio::task::block_in_place(|| {
        stack.command_via(
            &daemon,
            &config,
            &["rotate", KEY, "--reason", "cli, forced", "--force"],
        )
    });
    assert_eq!(code, 0, "forced:\n{out}\n{err}");
    assert_eq!(stack.regenerations().await, 1);
    stack.assert_consistent(&o).await;

    // A forced rotation whose key is lost (every store down while the portal answers)...
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 1500 } }))
        .await;
    let id = daemon
        .start_rotate_with(json!({ "reason": "forced, stores go down", "force": true }))
        .await;
    daemon.wait_phase("regenerating", LONG).await;
    stack.bao.down();
    stack.moto.down();
    let record = daemon.wait_rotation(&id, LONG).await;
    assert_eq!(record["outcome"], "failed", "{record:#}");
    assert_eq!(stack.journal()["lost"], true);

    // ...is re-rotated by recovery once the stores are back, pause or not.
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 0 } }))
        .await;
    stack.bao.up();
    stack.moto.up();
    stack
        .eventually(LONG, "the recovery re-rotation succeeds", || async {
            stack.journal()["lost"] == false
                && stack.audit().iter().any(|r| {
                    r["event"] == "finished"
                        && r["trigger"] == "recovery"
                        && r["outcome"] == "success"
                })
        })
        .await;
    stack.assert_consistent(&o).await;
    assert_eq!(paused_gauge(&daemon).await, 1.0, "still paused");
    assert_eq!(scheduled(&stack), 0, "the schedule never ran");
}
