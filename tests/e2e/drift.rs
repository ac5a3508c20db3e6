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

/// Waits until the daemon's view of the key shows no drift and every destination in sync.
async fn in_sync(stack: &Stack, daemon: &Daemon, what: &str) {
    stack
        .eventually(LONG, what, || async {
            let k = daemon.key().await;
            k["drift"] == false
                && k["destinations"]
                    .as_array()
                    .is_some_and(|d| d.iter().all(|d| d["in_sync"] == true))
        })
        .await;
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
    in_sync(&stack, &daemon, "reconcile sees every destination in sync").await;

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

/// A key whose portal accepts connections and never answers holds up no other key: the other key's
/// drift is found and repaired round after round while the hanging key's status request is still
/// open (its timeout is long, and each timeout is retried).
#[tokio::test(flavor = "multi_thread")]
async fn a_key_whose_portal_hangs_does_not_stall_reconcile_of_the_others() {
    let stack = Stack::start().await;
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hang_addr = hang.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = hang.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(conn);
            }
        }
    });
    let o = reconciling();
    stack
        .seed_destinations(&stack.portal.current_secret().await)
        .await;
    // `hung` comes second in the file, so each round looks at it after the seeded key; a round that
    // waited for it would hold the seeded key's next look back for minutes.
    let mut text = stack.config(&o);
    text.push_str(&format!(
        r#"
[providers.hanging]
kind = "aos"
base_url = "http://{hang_addr}"
management_token = {{ env = "KEYROTD_TEST_AOS_TOKEN" }}
account_id = "acct_hung"
timeout = "120s"

[[keys]]
name = "hung"
provider = "hanging"
  [[keys.destinations]]
  store = "local"
  file = "hung.key"
"#
    ));
    let config = stack.write_config_text(&text);
    let daemon = stack.daemon(&config).await;
    in_sync(&stack, &daemon, "reconcile sees the seeded key in sync").await;

    // Two connections to the hanging portal: the first look at start, and the first round's (which
    // comes after the seeded key's in that round). From now on the seeded key is looked at again
    // only by a later round.
    stack
        .eventually(
            LONG,
            "the first round's look at the hanging key",
            || async { accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2 },
        )
        .await;
    let oob_key = stack.portal.rotate_out_of_band().await;
    stack
        .eventually(LONG, "the seeded key's drift repaired", || async {
            stack.portal.state().await.key_id != oob_key
                && stack.journal()["last_outcome"] == "success"
        })
        .await;
    stack.assert_consistent(&o).await;
    // All along, the hanging key's requests were open: its status was never read.
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let (_, hung) = daemon.get("/v1/keys/hung").await;
    assert!(hung["key_id"].is_null(), "{hung:#}");
    server.abort();
}
