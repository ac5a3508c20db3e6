//! Store outages during a rotation, through the real daemon: a destination down when the new key
//! arrives (degraded, then filled when it is back), a destination down for part of the store deadline
//! (retried within it), and every destination down (the key is lost, then re-rotated by recovery).
//!
//! "Down before storing": preflight would abort with a store down, so a store is taken away (its gate
//! closed, see support/gate.rs) while the portal's regenerate is slowed down (`delay_ms`): the portal
//! has already rotated, keyrotd is waiting for the answer, and the store vanishes before it can write.

use std::time::Duration;

use serde_json::json;

use crate::support::daemon::Daemon;
use crate::support::stack::{KEY, Options, Stack};

const LONG: Duration = Duration::from_secs(90);

/// Regenerate answers at once again (counters kept, unlike `reset`).
async fn fast_regenerate(stack: &Stack) {
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 0 } }))
        .await;
}

/// Slows the portal's regenerate so the test can take stores away between preflight and storing.
async fn slow_regenerate(stack: &Stack) {
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 3000 } }))
        .await;
}

async fn store_writes(daemon: &Daemon, store: &str, outcome: &str) -> f64 {
    daemon.metrics().await.get(
        "keyrotd_store_writes_total",
        &[("key", KEY), ("store", store), ("outcome", outcome)],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn openbao_down_before_storing_degrades_then_the_background_fill_writes_it() {
    let stack = Stack::start().await;
    // Reconcile is off: only the degraded rotation's own background fill can repair OpenBao.
    let o = Options {
        store_deadline: "3s".into(),
        reconcile_interval: "0s".into(),
        ..Options::default()
    };
    let old = stack.portal.current_secret().await;
    stack.seed_destinations(&old).await;
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    slow_regenerate(&stack).await;

    let id = daemon.start_rotate("test: openbao outage").await;
    daemon
        .wait_phase("regenerating", Duration::from_secs(30))
        .await;
    stack.bao.down();
    let record = daemon.wait_rotation(&id, LONG).await;
    assert_eq!(
        record["outcome"],
        "degraded",
        "{record:#}\n{}",
        daemon.log_text()
    );
    let journal = stack.journal();
    assert_eq!(
        journal["lost"], false,
        "the key is held by AWS and the file"
    );
    let new_fp = stack.portal.state().await.fingerprint;
    assert_eq!(
        stack.destination_fingerprints().await,
        vec![
            Some(crate::support::stack::fp(&old)),
            Some(new_fp.clone()),
            Some(new_fp.clone())
        ],
        "OpenBao still holds the old key; AWS and the file the new one"
    );

    // Counted as what it was: a degraded rotation, failed OpenBao writes, and the hook of the
    // OpenBao-reading dependent not sent (counted as an error) while the other one was.
    let m = daemon.metrics().await;
    let k = |outcome| [("key", KEY), ("outcome", outcome)];
    assert_eq!(m.get("keyrotd_rotations_total", &k("degraded")), 1.0);
    assert_eq!(m.get("keyrotd_rotations_total", &k("success")), 0.0);
    assert!(store_writes(&daemon, "vault", "error").await >= 1.0, "{m}");
    assert_eq!(store_writes(&daemon, "vault", "ok").await, 0.0, "{m}");
    assert_eq!(store_writes(&daemon, "aws", "ok").await, 1.0, "{m}");
    let hook = |dep, outcome| [("key", KEY), ("dependent", dep), ("outcome", outcome)];
    assert_eq!(
        m.get("keyrotd_reload_hooks_total", &hook("worker", "error")),
        1.0
    );
    assert_eq!(
        m.get("keyrotd_reload_hooks_total", &hook("worker", "ok")),
        0.0
    );
    assert_eq!(
        m.get("keyrotd_reload_hooks_total", &hook("edge", "ok")),
        1.0
    );

    fast_regenerate(&stack).await;
    let reloads_before = stack.dep_vault.state().await.reloads;
    stack.bao.up();
    stack
        .eventually(LONG, "OpenBao holds the new key", || async {
            stack.vault_fingerprint().await.as_deref() == Some(new_fp.as_str())
        })
        .await;
    stack
        .eventually(
            LONG,
            "the OpenBao-reading dependent is told and authenticates",
            || async {
                stack.dep_vault.state().await.reloads > reloads_before
                    && stack.dep_vault.verify().await == 200
            },
        )
        .await;
    stack.assert_consistent(&o).await;
    assert_eq!(store_writes(&daemon, "vault", "ok").await, 1.0);
    assert!(
        daemon
            .log_text()
            .contains("Destination filled after the deadline."),
        "the background fill wrote it:\n{}",
        daemon.log_text()
    );
    assert_eq!(
        stack.portal.state().await.fingerprint,
        new_fp,
        "filling OpenBao did not regenerate"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn openbao_down_while_storing_is_retried_within_the_store_deadline() {
    let stack = Stack::start().await;
    let o = Options {
        store_deadline: "30s".into(),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    slow_regenerate(&stack).await;

    let id = daemon.start_rotate("test: openbao blip").await;
    daemon
        .wait_phase("regenerating", Duration::from_secs(30))
        .await;
    stack.bao.down();
    // keyrotd is storing: AWS and the file confirm, OpenBao refuses, and keyrotd tries it again.
    stack
        .eventually(LONG, "a second failed OpenBao write", || async {
            store_writes(&daemon, "vault", "error").await >= 2.0
        })
        .await;
    let (_, running) = daemon.get(&format!("/v1/rotations/{id}")).await;
    assert!(running["outcome"].is_null(), "still storing: {running:#}");
    stack.bao.up();
    let record = daemon.wait_rotation(&id, LONG).await;
    assert_eq!(
        record["outcome"],
        "success",
        "{record:#}\n{}",
        daemon.log_text()
    );
    let stored: Vec<&str> = record["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "stored")
        .filter_map(|e| e["detail"].as_str())
        .collect();
    assert_eq!(stored.len(), 3, "every destination confirmed: {stored:?}");
    assert!(
        stored.last().unwrap().starts_with("vault"),
        "OpenBao confirmed last, after it came back: {stored:?}"
    );
    assert_eq!(store_writes(&daemon, "vault", "ok").await, 1.0);
    fast_regenerate(&stack).await;
    stack.assert_consistent(&o).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_store_down_loses_the_key_and_recovery_rerotates_when_back() {
    let stack = Stack::start().await;
    let o = Options {
        store_deadline: "3s".into(),
        with_file: false,
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    slow_regenerate(&stack).await;
    let regenerations_before = stack.regenerations().await;

    let id = daemon.start_rotate("test: total outage").await;
    daemon
        .wait_phase("regenerating", Duration::from_secs(30))
        .await;
    stack.bao.down();
    stack.moto.down();
    let record = daemon.wait_rotation(&id, LONG).await;
    assert_eq!(
        record["outcome"],
        "failed",
        "{record:#}\n{}",
        daemon.log_text()
    );
    let journal = stack.journal();
    assert_eq!(journal["lost"], true, "journal: {journal:#}");
    let lost_secret = stack.portal.current_secret().await;
    // The journal never holds the secret.
    assert!(!journal.to_string().contains(&lost_secret));
    let m = daemon.metrics().await;
    assert_eq!(
        m.get(
            "keyrotd_rotations_total",
            &[("key", KEY), ("outcome", "failed")]
        ),
        1.0
    );
    for store in ["vault", "aws"] {
        assert!(store_writes(&daemon, store, "error").await >= 1.0, "{m}");
        assert_eq!(store_writes(&daemon, store, "ok").await, 0.0, "{m}");
    }

    fast_regenerate(&stack).await;
    stack.bao.up();
    stack.moto.up();

    // The recovery tick re-rotates by itself once a destination is writable.
    stack
        .eventually(LONG, "a re-rotation after the loss succeeds", || async {
            let j = stack.journal();
            j["lost"] == false
                && j["last_outcome"] == "success"
                && stack.portal.current_secret().await != lost_secret
        })
        .await;
    stack.assert_consistent(&o).await;
    assert_eq!(stack.regenerations().await, regenerations_before + 2);
    let audit = stack.audit();
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "rerotation" && r["detail"] == "lost_before_storage"),
        "audit records a re-rotation for lost_before_storage: {audit:#?}"
    );
    assert_eq!(
        daemon.metrics().await.get(
            "keyrotd_rerotations_total",
            &[("key", KEY), ("reason", "lost_before_storage")]
        ),
        1.0
    );
}
