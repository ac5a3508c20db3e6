//! Reload hooks that fail, end to end: a failure is retried and a retry that works leaves the rotation
//! a success; a hook that fails every retry makes the rotation `degraded` (counted and audited); and
//! `keyrotd rotate` then exits 3.

use serde_json::json;

use crate::support::daemon::Daemon;
use crate::support::stack::{KEY, Options, Stack};

async fn hook_calls(daemon: &Daemon, outcome: &str) -> f64 {
    daemon.metrics().await.get(
        "keyrotd_reload_hooks_total",
        &[("key", KEY), ("dependent", "edge"), ("outcome", outcome)],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_reload_hooks_are_retried_then_degrade_the_rotation() {
    let stack = Stack::start().await;
    let o = Options {
        hook_retries: Some(2),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let mut daemon = stack.daemon(&config).await;

    // One failure, then the retry works: a success, with the failed call counted.
    stack.dep_aws.faults(json!({ "fail_reload_next": 1 })).await;
    let record = daemon.rotate("test: one hook failure").await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    assert_eq!(hook_calls(&daemon, "error").await, 1.0);
    assert_eq!(hook_calls(&daemon, "ok").await, 1.0);
    let statuses: Vec<u16> = stack
        .dep_aws
        .requests()
        .await
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [503, 200], "the hook was called again");
    stack.assert_consistent(&o).await;

    // Every attempt fails (the first call and its two retries): degraded, because of the hook only.
    stack.dep_aws.faults(json!({ "fail_reload_next": 3 })).await;
    let record = daemon.rotate("test: hook keeps failing").await;
    assert_eq!(record["outcome"], "degraded", "{record:#}");
    assert_eq!(hook_calls(&daemon, "error").await, 1.0 + 3.0);
    assert_eq!(hook_calls(&daemon, "ok").await, 1.0);
    let events: Vec<(&str, &str)> = record["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["event"].as_str().unwrap(), e["detail"].as_str().unwrap()))
        .collect();
    assert!(
        events.contains(&("hook_failed", "edge")),
        "the record names the hook: {events:?}"
    );
    assert_eq!(
        events.iter().filter(|(e, _)| *e == "stored").count(),
        3,
        "every destination was written: {events:?}"
    );
    let m = daemon.metrics().await;
    for (outcome, n) in [("success", 1.0), ("degraded", 1.0), ("failed", 0.0)] {
        assert_eq!(
            m.get(
                "keyrotd_rotations_total",
                &[("key", KEY), ("outcome", outcome)]
            ),
            n,
            "{outcome}"
        );
    }
    let id = record["rotation_id"].as_str().unwrap();
    assert!(
        stack.audit().iter().any(|r| r["rotation_id"] == id
            && r["event"] == "finished"
            && r["outcome"] == "degraded"),
        "the audit log says degraded"
    );
    daemon.terminate(std::time::Duration::from_secs(30));

    // The command line: a degraded rotation exits 3.
    stack.dep_aws.faults(json!({ "fail_reload_next": 3 })).await;
    let (code, out, err) = tokio::task::block_in_place(|| {
        stack.command(&config, &["rotate", KEY, "--reason", "test: cli degraded"])
    });
    assert_eq!(code, 3, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("outcome: degraded"), "{out}");
}
