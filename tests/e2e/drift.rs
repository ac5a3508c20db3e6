//! Drift through the real daemon's reconcile loop: an out-of-band rotation (re-rotated), one stale
//! destination (copied from a good one, no regenerate), a pre-populated destination on first start
//! (adopted, not drift), and drift with auto_recover off (reported only).

use std::time::Duration;

use crate::support::daemon::Daemon;
use crate::support::stack::{AWS_SECRET, KEY, Options, Stack, fp};
use serde_json::json;

const LONG: Duration = Duration::from_secs(90);

fn reconciling() -> Options {
    Options {
        reconcile_interval: "2s".into(),
        ..Options::default()
    }
}

async fn drift_gauge(daemon: &Daemon) -> f64 {
    daemon.metrics().await.get("keyrotd_drift", &[("key", KEY)])
}

async fn rerotations(daemon: &Daemon, reason: &str) -> f64 {
    daemon.metrics().await.get(
        "keyrotd_rerotations_total",
        &[("key", KEY), ("reason", reason)],
    )
}

/// The daemon, started over destinations that already hold the portal's current key.
async fn seeded(stack: &Stack, o: &Options) -> Daemon {
    stack
        .seed_destinations(&stack.portal.current_secret().await)
        .await;
    let config = stack.write_config(o);
    stack.daemon(&config).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_out_of_band_rotation_is_detected_and_rerotated() {
    let stack = Stack::start().await;
    let o = reconciling();
    let daemon = seeded(&stack, &o).await;
    stack
        .eventually(LONG, "reconcile sees every destination in sync", || async {
            let k = daemon.key().await;
            k["drift"] == false
                && k["destinations"]
                    .as_array()
                    .is_some_and(|d| d.iter().all(|d| d["in_sync"] == true))
        })
        .await;

    let oob_key = stack.portal.rotate_out_of_band().await;
    let oob_secret = stack.portal.current_secret().await;
    stack
        .eventually(LONG, "a drift re-rotation replaces the key", || async {
            let s = stack.portal.state().await;
            s.key_id != oob_key && stack.journal()["last_outcome"] == "success"
        })
        .await;
    stack
        .eventually(LONG, "the dependents authenticate again", || async {
            stack.dep_vault.verify().await == 200 && stack.dep_aws.verify().await == 200
        })
        .await;
    stack.assert_consistent(&o).await;
    // A new key, not the out-of-band one (keyrotd never saw that secret).
    let fps = stack.destination_fingerprints().await;
    assert!(
        fps.iter()
            .all(|f| f.as_deref() != Some(fp(&oob_secret).as_str()))
    );
    assert_eq!(
        rerotations(&daemon, "drift").await,
        1.0,
        "{}",
        daemon.metrics().await
    );
    let audit = stack.audit();
    assert!(
        audit.iter().any(|r| r["event"] == "drift"),
        "audit has a drift event: {audit:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_destination_is_copied_from_a_good_one_without_regenerating() {
    let stack = Stack::start().await;
    let o = reconciling();
    let daemon = seeded(&stack, &o).await;
    let record = daemon.rotate("test: before partial drift").await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    let regenerations = stack.regenerations().await;
    let reloads = stack.dep_aws.state().await.reloads;

    stack
        .moto
        .client()
        .await
        .put_secret_value()
        .secret_id(AWS_SECRET)
        .secret_string(json!({ "api_key": "junk-not-a-key" }).to_string())
        .send()
        .await
        .unwrap();
    let active = stack.portal.state().await.fingerprint;
    stack
        .eventually(LONG, "AWS holds the active key again", || async {
            stack.destination_fingerprints().await[1].as_deref() == Some(active.as_str())
        })
        .await;
    stack
        .eventually(LONG, "the AWS-reading dependent was told", || async {
            stack.dep_aws.state().await.reloads > reloads
        })
        .await;
    stack.assert_consistent(&o).await;
    assert_eq!(
        stack.regenerations().await,
        regenerations,
        "repairing a stale destination does not regenerate"
    );
    assert!(stack.audit().iter().any(|r| r["event"] == "drift"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prepopulated_destination_is_adopted_not_drift() {
    let stack = Stack::start().await;
    let o = reconciling();
    let daemon = seeded(&stack, &o).await;
    stack
        .eventually(LONG, "every destination in sync", || async {
            let k = daemon.key().await;
            k["destinations"]
                .as_array()
                .is_some_and(|d| !d.is_empty() && d.iter().all(|d| d["in_sync"] == true))
        })
        .await;
    // Three reconcile rounds later still nothing happened.
    daemon
        .holds_for_rounds(3, "in sync, no drift, no regenerate", || async {
            let k = daemon.key().await;
            k["drift"] == false
                && k["destinations"]
                    .as_array()
                    .is_some_and(|d| d.iter().all(|d| d["in_sync"] == true))
                && stack.regenerations().await == 0
                && drift_gauge(&daemon).await == 0.0
                && !stack.audit().iter().any(|r| r["event"] == "drift")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_without_auto_recover_is_reported_not_rerotated() {
    let stack = Stack::start().await;
    let o = Options {
        auto_recover: false,
        ..reconciling()
    };
    let daemon = seeded(&stack, &o).await;
    stack
        .eventually(LONG, "in sync first", || async {
            drift_gauge(&daemon).await == 0.0
                && daemon.key().await["destinations"]
                    .as_array()
                    .is_some_and(|d| !d.is_empty() && d.iter().all(|d| d["in_sync"] == true))
        })
        .await;
    let oob_key = stack.portal.rotate_out_of_band().await;
    let regenerations = stack.regenerations().await;
    stack
        .eventually(LONG, "drift reported", || async {
            drift_gauge(&daemon).await == 1.0 && daemon.key().await["drift"] == true
        })
        .await;
    let (_, keys) = daemon.get("/v1/keys").await;
    assert!(keys.to_string().contains("\"drift\":true"), "{keys:#}");
    // Three more reconcile rounds: still reported, still no re-rotation.
    daemon
        .holds_for_rounds(3, "drift reported and nothing rotated", || async {
            stack.portal.state().await.key_id == oob_key
                && stack.regenerations().await == regenerations
                && drift_gauge(&daemon).await == 1.0
                && rerotations(&daemon, "drift").await == 0.0
        })
        .await;
}
