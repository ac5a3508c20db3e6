//! Every way a rotation starts, end to end, in one stack, each audited with its `trigger`: the
//! schedule, an API request, the watch catching an out-of-band rotation (a recovery re-rotation), a
//! run missed while the daemon was down (catch-up), reconcile repairing a stale destination, a key
//! older than its `max_age`, and the command line.
//!
//! The first two daemons run on fixed clocks (libfaketime, see `support::stack::fake_clock`), so the
//! schedule comes due at a known moment whatever the day the test runs: the first daemon starts a few
//! seconds before a daily noon run, the second two days later (that run was missed).

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::daemon::Daemon;
use crate::support::stack::{AWS_SECRET, FIRST_CONTACT_ROTATES, KEY, Options, Stack};

const LONG: Duration = Duration::from_secs(60);

/// The audit's finished record of a rotation started by `trigger`, once it is there.
async fn finished_by(stack: &Stack, daemon: &Daemon, trigger: &str) -> Value {
    stack
        .eventually(
            LONG,
            &format!("a rotation triggered by {trigger}"),
            || async {
                stack
                    .audit()
                    .iter()
                    .any(|r| r["event"] == "finished" && r["trigger"] == trigger)
            },
        )
        .await;
    let record = stack
        .audit()
        .into_iter()
        .find(|r| r["event"] == "finished" && r["trigger"] == trigger)
        .unwrap();
    assert_eq!(
        record["outcome"],
        "success",
        "{trigger}: {record:#}\n{}",
        daemon.log_text()
    );
    record
}

/// The rotation started by `trigger` has ended and nothing runs: the key is idle again.
async fn settled(stack: &Stack, daemon: &Daemon, trigger: &str) {
    finished_by(stack, daemon, trigger).await;
    stack
        .eventually(LONG, "the key idle", || async {
            daemon.key().await["phase"] == "idle"
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_trigger_starts_a_rotation_and_is_audited() {
    let stack = Stack::start().await;
    let daily = Options {
        schedule: Some("0 0 12 * * *".into()),
        // The destinations start empty: a key keyrotd never held is otherwise left to an operator.
        key_extra: FIRST_CONTACT_ROTATES.into(),
        watch: "30s".into(),
        watch_interval: "1s".into(),
        ..Options::default()
    };
    let config = stack.write_config(&daily);

    // Monday 11:59:52: the noon run comes due while the daemon runs.
    let mut daemon = stack.daemon_at("2026-03-02 11:59:52", &config).await;
    finished_by(&stack, &daemon, "schedule").await;

    // An operator's request through the API.
    let record = daemon.rotate("test: api").await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    assert_eq!(record["trigger"], "api");

    // Someone rotates in the portal during the API rotation's watch: the watch sees the provider's
    // key change and re-rotates (a recovery rotation, reason drift).
    let oob = stack.portal.rotate_out_of_band().await;
    finished_by(&stack, &daemon, "recovery").await;
    assert_ne!(stack.portal.state().await.key_id, oob, "re-rotated");
    assert!(
        stack.audit_has("drift", "trigger", "reconcile"),
        "the watch audits the drift it saw"
    );
    daemon.terminate(LONG);

    // Wednesday 10:00: Tuesday's noon run was missed while keyrotd was down. Reconcile is on.
    let reconciling = Options {
        reconcile_interval: "2s".into(),
        ..daily.clone()
    };
    let config = stack.write_config(&reconciling);
    let mut daemon = stack.daemon_at("2026-03-04 10:00:00", &config).await;
    settled(&stack, &daemon, "catch_up").await;

    // AWS holds a stale value: reconcile copies the active key there, without regenerating.
    let regenerations = stack.regenerations().await;
    stack
        .moto
        .client()
        .await
        .put_secret_value()
        .secret_id(AWS_SECRET)
        .secret_string(json!({ "api_key": "stale-value-put-by-hand" }).to_string())
        .send()
        .await
        .expect("moto PutSecretValue");
    finished_by(&stack, &daemon, "reconcile").await;
    assert_eq!(
        stack.regenerations().await,
        regenerations,
        "copied, not regenerated"
    );
    stack.assert_consistent(&reconciling).await;
    daemon.terminate(LONG);

    // A key older than its max_age (no schedule any more: age alone decides). The age is the portal's
    // Last Rotated on the portal's own clock, so this daemon keeps the real one, with a max_age of
    // seconds: the key comes due that long after the catch-up rotated it.
    let aging = Options {
        max_age: Some("10s".into()),
        ..Options::default()
    };
    let config = stack.write_config(&aging);
    let mut daemon = stack.daemon(&config).await;
    settled(&stack, &daemon, "max_age").await;
    daemon.terminate(LONG);

    // The command line, in its own process.
    let (code, out, err) = tokio::task::block_in_place(|| {
        stack.command(&config, &["rotate", KEY, "--reason", "test: cli"])
    });
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    finished_by(&stack, &daemon, "manual").await;

    let audit = stack.audit();
    let mut triggers: Vec<&str> = audit.iter().filter_map(|r| r["trigger"].as_str()).collect();
    triggers.sort_unstable();
    triggers.dedup();
    assert_eq!(
        triggers,
        [
            "api",
            "catch_up",
            "manual",
            "max_age",
            "reconcile",
            "recovery",
            "schedule"
        ],
        "every trigger of the audit log's contract, and no other"
    );
    stack.assert_consistent(&aging).await;
}
