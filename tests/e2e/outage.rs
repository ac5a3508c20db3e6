//! Store outages during a rotation, through the real daemon: a destination down when the new key
//! arrives (degraded, then filled when it is back), a destination down for part of the store deadline
//! (retried within it), and every destination down (the key is lost, then re-rotated by recovery).
//!
//! "Stopped before storing": preflight would abort with a store down, so OpenBao (and moto) are stopped
//! while the portal's regenerate is slowed down (`delay_ms`): the portal has already rotated, keyrotd is
//! waiting for the answer, and the stores vanish before it can write.

use std::time::Duration;

use crate::support::daemon::{AWS_SECRET, Options, Stack, fp};
use serde_json::json;

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

#[tokio::test(flavor = "multi_thread")]
async fn openbao_down_before_storing_degrades_then_is_filled_when_back() {
    let mut stack = Stack::start().await;
    let o = Options {
        store_deadline: "3s".into(),
        reconcile_interval: "2s".into(),
        ..Options::default()
    };
    // Destinations start in sync so reconcile has nothing to do before the rotation.
    stack
        .seed_destinations(&stack.portal.current_secret().await)
        .await;
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    slow_regenerate(&stack).await;

    let id = daemon.start_rotate("test: openbao outage").await;
    daemon
        .wait_phase("regenerating", Duration::from_secs(30))
        .await;
    stack.bao.stop();
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
    let file = std::fs::read(stack.key_file()).expect("the file holds the new key");
    assert_eq!(keyrotd::secret::fingerprint_bytes(&file), new_fp);
    assert_eq!(
        aws_fingerprint(&stack).await.as_deref(),
        Some(new_fp.as_str())
    );

    fast_regenerate(&stack).await;
    stack.bao.start_again();
    // Dev mode lost the data: the background fill or reconcile writes the key again and tells the
    // dependent that reads from OpenBao.
    let reloads_before = stack.dep_vault.state().await.reloads;
    stack
        .eventually(LONG, "OpenBao holds the new key again", || async {
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
    assert_eq!(
        stack.portal.state().await.fingerprint,
        new_fp,
        "filling OpenBao did not regenerate"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn openbao_down_while_storing_is_retried_within_the_store_deadline() {
    let mut stack = Stack::start().await;
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
    stack.bao.stop();
    // Keyrotd is storing (AWS and the file confirm; OpenBao refuses connections) when OpenBao returns.
    stack
        .eventually(LONG, "a destination confirmed the new key", || async {
            let (_, r) = daemon.get(&format!("/v1/rotations/{id}")).await;
            r["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["event"] == "stored"))
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.bao.start_again();
    let record = daemon.wait_rotation(&id, LONG).await;
    assert_eq!(
        record["outcome"],
        "success",
        "{record:#}\n{}",
        daemon.log_text()
    );
    let events: Vec<&str> = record["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(
        events.contains(&"stored"),
        "stored events in the record: {events:?}"
    );
    fast_regenerate(&stack).await;
    stack.assert_consistent(&o).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_store_down_loses_the_key_and_recovery_rerotates_when_back() {
    let mut stack = Stack::start().await;
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
    stack.bao.stop();
    stack.moto.stop();
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

    fast_regenerate(&stack).await;
    stack.bao.start_again();
    stack.moto.start_again();
    stack.moto.create_secret(AWS_SECRET, "{}").await;

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
    assert!(stack.regenerations().await >= regenerations_before + 2);
    let audit = stack.audit();
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "rerotation" && r["detail"] == "lost_before_storage"),
        "audit records a re-rotation for lost_before_storage: {audit:#?}"
    );
    assert!(
        daemon
            .metric(
                "keyrotd_rerotations_total",
                &["reason=\"lost_before_storage\""]
            )
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
}

/// The fingerprint of the key AWS holds (without touching OpenBao, which may be down).
async fn aws_fingerprint(stack: &Stack) -> Option<String> {
    let out = stack
        .moto
        .client()
        .await
        .get_secret_value()
        .secret_id(AWS_SECRET)
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(out.secret_string()?).ok()?;
    v["api_key"].as_str().map(fp)
}
