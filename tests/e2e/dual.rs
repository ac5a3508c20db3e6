//! Two live keys, end to end (docs/lifecycle.md, "Two live keys"): the real daemon rotates a key of
//! the vendor simulator, which keeps the old key valid until it is revoked, writing OpenBao, moto and
//! a file, with dependents that probe the vendor with their key every 50 ms and report the
//! fingerprint they use.
//!
//! - a dual rotation: no dependent ever sees an authentication failure, the old key is revoked only
//!   after every dependent confirmed the new one, and the overlap is reported;
//! - a dependent that never picks up the new key: the old key stays live, the outcome is `degraded`,
//!   and the metrics name the dependent (the alert on them is tested by promtool, offline);
//! - a failing canary: the rollout stops, the others are never told, the new key is revoked and the
//!   old one still works everywhere;
//! - three keys of a group read by one dependent: one reload; three keys with `reload_coalesce`
//!   rotated within its window: one reload;
//! - no secret of any of these paths reaches an output.

use std::time::Duration;

use serde_json::json;

use crate::support::dual::{DualOptions, DualStack, KEY};
use crate::support::eventually;
use crate::support::secrets::Haystacks;

/// The audit records of `event` for `key`.
fn audited(stack: &DualStack, event: &str) -> Vec<serde_json::Value> {
    stack
        .audit()
        .into_iter()
        .filter(|r| r["event"] == event && r["key"] == KEY)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dual_rotation_has_no_outage_and_revokes_the_old_key_once_everyone_confirmed() {
    let stack = DualStack::start().await;
    let config = stack.config(&DualOptions::default());
    let d = stack.daemon(&config, &[]).await;
    let old = stack.vendor.live(KEY).await;
    assert_eq!(old.len(), 1);
    // The dependents authenticate with the original key before anything happens.
    for dep in [&stack.worker, &stack.edge] {
        eventually(Duration::from_secs(10), "the dependent probes", || async {
            dep.state().await.auth_ok > 0
        })
        .await;
    }

    let record = d.rotate_key(KEY, "test: dual rotation").await;
    assert_eq!(record["outcome"], "success", "{record:#}\n{}", d.log_text());
    let live = stack.vendor.live(KEY).await;
    assert_eq!(live.len(), 1, "one live key: {live:?}");
    assert_ne!(live, old, "the old key is revoked");
    let new_fp = stack.vendor.live_fingerprints(KEY).await.remove(0);
    assert_eq!(
        stack.destination_fingerprints().await,
        vec![Some(new_fp.clone()); 3],
        "every destination holds the new key"
    );

    // Revoked only after every dependent confirmed: the audit log's order.
    let audit = stack.audit();
    let position = |event: &str, detail: Option<&str>| {
        audit
            .iter()
            .position(|r| {
                r["event"] == event && detail.is_none_or(|d| r["detail"].as_str() == Some(d))
            })
            .unwrap_or_else(|| panic!("no {event} {detail:?} in the audit log: {audit:#?}"))
    };
    let revoked = position("revoked", None);
    assert_eq!(audit[revoked]["old_key_id"], old[0].as_str());
    assert!(position("confirmed", Some("worker")) < revoked);
    assert!(position("confirmed", Some("edge")) < revoked);

    // Probing every 50 ms from before the rotation until after the revoke: never refused. Each
    // dependent is watched until it has probed five more times since the revoke, so that a probe
    // with the revoked key would be among those counted.
    for (name, dep) in [("worker", &stack.worker), ("edge", &stack.edge)] {
        let s = dep.state().await;
        let probed = s.auth_ok + s.auth_failed;
        eventually(
            Duration::from_secs(10),
            &format!("{name} probing after the revoke"),
            || async {
                let s = dep.state().await;
                s.auth_ok + s.auth_failed >= probed + 5
            },
        )
        .await;
    }
    for (name, dep) in [("worker", &stack.worker), ("edge", &stack.edge)] {
        let s = dep.state().await;
        assert_eq!(s.auth_failed, 0, "{name} saw an authentication failure");
        assert!(s.auth_ok > 5, "{name} probed throughout: {s:?}");
        assert_eq!(s.fingerprint.as_deref(), Some(new_fp.as_str()), "{name}");
    }
    let m = d.metrics().await;
    assert!(m.get("keyrotd_key_overlap_seconds", &[("key", KEY)]) > 0.0);
    assert_eq!(m.get("keyrotd_dependents_confirmed", &[("key", KEY)]), 2.0);
    assert_eq!(
        m.get(
            "keyrotd_provider_requests_total",
            &[("operation", "revoke"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(stack.journal(KEY)["phase"], "idle");
    stack.assert_no_secret_leaked(Haystacks::default()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dependent_that_never_picks_up_the_new_key_keeps_the_old_key_live() {
    let stack = DualStack::start().await;
    let o = DualOptions {
        key_extra: "confirm_deadline = \"4s\"".into(),
        ..DualOptions::default()
    };
    let config = stack.config(&o);
    let d = stack.daemon(&config, &[]).await;
    stack.edge.faults(json!({ "ignore_reload": true })).await;
    let old = stack.vendor.live(KEY).await;

    let record = d.rotate_key(KEY, "test: edge never reloads").await;
    assert_eq!(record["outcome"], "degraded", "{record:#}");
    let live = stack.vendor.live(KEY).await;
    assert_eq!(live.len(), 2, "both keys live: {live:?}");
    assert!(live.contains(&old[0]), "the old key is not revoked");
    assert_eq!(
        stack.edge.verify().await,
        200,
        "edge still works on the old key"
    );
    assert_eq!(stack.edge.state().await.auth_failed, 0);
    assert!(audited(&stack, "revoked").is_empty());

    let m = d.metrics().await;
    let unconfirmed = |dep| {
        m.get(
            "keyrotd_dependent_unconfirmed",
            &[("key", KEY), ("dependent", dep)],
        )
    };
    assert_eq!((unconfirmed("edge"), unconfirmed("worker")), (1.0, 0.0));
    assert!(
        m.get(
            "keyrotd_key_old_key_live_since_timestamp_seconds",
            &[("key", KEY)]
        ) > 0.0
    );
    assert_eq!(
        m.get(
            "keyrotd_rotations_total",
            &[("key", KEY), ("outcome", "degraded")]
        ),
        1.0
    );
    let j = stack.journal(KEY);
    assert_eq!(j["pending_revoke"], json!([old[0]]), "{j:#}");
    assert_eq!(j["unconfirmed"], json!(["edge"]), "{j:#}");
    stack.assert_no_secret_leaked(Haystacks::default()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_after_retires_a_kept_old_key_and_logs_it() {
    let stack = DualStack::start().await;
    let o = DualOptions {
        key_extra: "confirm_deadline = \"3s\"\nrevoke_after = \"8s\"".into(),
        ..DualOptions::default()
    };
    let config = stack.config(&o);
    let d = stack.daemon(&config, &[]).await;
    stack.edge.faults(json!({ "ignore_reload": true })).await;
    let old = stack.vendor.live(KEY).await;
    let record = d.rotate_key(KEY, "test: revoke_after").await;
    assert_eq!(record["outcome"], "degraded", "{record:#}");
    assert_eq!(stack.vendor.live(KEY).await.len(), 2);
    // The audit record is written once the vendor has answered the revoke: wait for both.
    eventually(
        Duration::from_secs(30),
        "the old key revoked at revoke_after, and audited",
        || async {
            !stack.vendor.live(KEY).await.contains(&old[0])
                && !audited(&stack, "revoked").is_empty()
        },
    )
    .await;
    let revoked = audited(&stack, "revoked");
    assert_eq!(revoked.len(), 1, "{revoked:#?}");
    let why = revoked[0]["detail"].as_str().unwrap_or_default();
    assert!(
        why.contains("revoke_after") && why.contains("edge"),
        "{why}"
    );
    assert!(
        d.log_text().contains("revoke_after reached"),
        "the forced revoke is logged"
    );
    // The gauge is cleared once the revoke is journaled, just after the vendor and the audit log
    // saw it.
    eventually(
        Duration::from_secs(10),
        "no old key reported live once it is revoked",
        || async {
            d.metrics().await.get(
                "keyrotd_key_old_key_live_since_timestamp_seconds",
                &[("key", KEY)],
            ) == 0.0
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_canary_aborts_the_rollout_and_the_others_are_never_told() {
    let stack = DualStack::start().await;
    let o = DualOptions {
        key_extra: "rollout = \"canary\"\ncanary_watch = \"3s\"\nconfirm_deadline = \"20s\"".into(),
        canary: true,
        ..DualOptions::default()
    };
    let config = stack.config(&o);
    let d = stack.daemon(&config, &[]).await;
    stack
        .canary
        .faults(json!({ "unhealthy_after_reload": true }))
        .await;
    let old = stack.vendor.live(KEY).await;
    let old_fp = stack.vendor.live_fingerprints(KEY).await.remove(0);

    let record = d.rotate_key(KEY, "test: failing canary").await;
    assert_eq!(record["outcome"], "aborted", "{record:#}\n{}", d.log_text());
    let events = record["events"].to_string();
    assert!(events.contains("canary_failed"), "{events}");

    assert!(
        stack.worker.requests().await.is_empty() && stack.edge.requests().await.is_empty(),
        "the other dependents were never told"
    );
    assert_eq!(stack.vendor.live(KEY).await, old, "the new key is revoked");
    assert_eq!(stack.vendor.state().await.revokes, 1);
    assert_eq!(
        stack.destination_fingerprints().await,
        vec![Some(old_fp.clone()); 3],
        "every destination holds the old key again"
    );
    for dep in [&stack.worker, &stack.edge] {
        assert_eq!(dep.verify().await, 200, "the old key still works");
        assert_eq!(dep.state().await.auth_failed, 0);
    }
    assert_eq!(
        stack.canary.state().await.fingerprint.as_deref(),
        Some(old_fp.as_str()),
        "the canary was told to reload the old key"
    );
    assert_eq!(stack.journal(KEY)["last_outcome"], "aborted");
    stack.assert_no_secret_leaked(Haystacks::default()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_keys_of_a_group_read_by_one_dependent_reload_it_once() {
    let stack = DualStack::start().await;
    let config = stack.three_keys_config(true);
    let d = stack.daemon(&config, &[]).await;
    let before = stack.canary.state().await.reloads;

    // An operator's rotation of one key of the group rotates the group.
    let record = d.rotate_key("set-b", "test: group").await;
    assert_eq!(record["outcome"], "success", "{record:#}\n{}", d.log_text());
    for key in ["set-a", "set-c"] {
        eventually(
            Duration::from_secs(60),
            "every key of the group rotated",
            || async { stack.journal(key)["last_outcome"] == "success" },
        )
        .await;
        assert_eq!(stack.vendor.live(key).await.len(), 1, "{key}");
    }
    assert_eq!(
        stack.canary.state().await.reloads - before,
        1,
        "one reload for three keys: {:?}",
        stack.canary.requests().await
    );
    let body = &stack.canary.requests().await[0].body;
    let mut keys: Vec<&str> = body["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(keys, ["set-a", "set-b", "set-c"], "{body}");
    let m = d.metrics().await;
    assert_eq!(m.get("keyrotd_reloads_coalesced_total", &[]), 2.0);
    for key in ["set-a", "set-b", "set-c"] {
        assert_eq!(
            m.get(
                "keyrotd_reload_hooks_total",
                &[("key", key), ("dependent", "shared"), ("outcome", "ok")]
            ),
            1.0,
            "{key}"
        );
    }
    stack.assert_no_secret_leaked(Haystacks::default()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_rotated_within_reload_coalesce_reload_their_shared_dependent_once() {
    let stack = DualStack::start().await;
    let config = stack.three_keys_config(false);
    let d = stack.daemon(&config, &[]).await;
    let before = stack.canary.state().await.reloads;
    let mut ids = Vec::new();
    for key in ["set-a", "set-b", "set-c"] {
        ids.push(d.start_rotate_key(key, "test: coalesce").await);
    }
    for id in &ids {
        let record = d.wait_rotation(id, Duration::from_secs(60)).await;
        assert_eq!(record["outcome"], "success", "{record:#}");
    }
    assert_eq!(
        stack.canary.state().await.reloads - before,
        1,
        "three keys stored within the window: one reload"
    );
    let m = d.metrics().await;
    assert_eq!(m.get("keyrotd_reloads_coalesced_total", &[]), 2.0);

    // A rotation after the window is reloaded on its own.
    let record = d.rotate_key("set-a", "test: later").await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    assert_eq!(stack.canary.state().await.reloads - before, 2);
    assert_eq!(m.get("keyrotd_reloads_coalesced_total", &[]), 2.0);
}
