//! Preflight aborts through the real daemon: each one leaves the portal's key untouched (same key id,
//! the old secret still authenticates), ends `aborted`, is audited and counted, and says why.
//!
//! One stack serves every case: each case sets its fault up, checks the abort, and puts things back,
//! so the next case starts from a key that would rotate.

use serde_json::json;

use crate::support::ReadOnlyDir;
use crate::support::daemon::Daemon;
use crate::support::stack::{AWS_SECRET, KEY, Options, Stack};

/// What a rotation must not have changed.
struct Before {
    key_id: String,
    secret: String,
    regenerations: u64,
    aborted: f64,
}

async fn before(stack: &Stack, daemon: &Daemon) -> Before {
    let s = stack.portal.state().await;
    Before {
        key_id: s.key_id,
        secret: stack.portal.current_secret().await,
        regenerations: s.regenerations,
        aborted: aborted(daemon).await,
    }
}

async fn aborted(daemon: &Daemon) -> f64 {
    daemon.metrics().await.get(
        "keyrotd_rotations_total",
        &[("key", KEY), ("outcome", "aborted")],
    )
}

/// Rotates, and checks that the rotation ended `aborted` for `why`: audited and counted as such, no
/// regenerate, the portal's key the one from before and still working.
async fn assert_aborts(stack: &Stack, daemon: &Daemon, case: &str, why: &str) {
    let b = before(stack, daemon).await;
    let record = daemon.rotate(&format!("test: {case}")).await;
    assert_eq!(record["outcome"], "aborted", "{case}: {record:#}");
    let id = record["rotation_id"].as_str().unwrap();
    assert!(
        record.to_string().contains(why),
        "{case}: the record says why ({why}): {record:#}"
    );
    let s = stack.portal.state().await;
    assert_eq!(s.key_id, b.key_id, "{case}: the portal's key is unchanged");
    assert_eq!(
        s.regenerations, b.regenerations,
        "{case}: nothing was regenerated"
    );
    let old = keyrotd::secret::Secret::from(b.secret);
    assert!(
        stack
            .portal
            .provider()
            .auth_check(&old)
            .await
            .unwrap()
            .is_some(),
        "{case}: the old key still authenticates"
    );
    let ours: Vec<_> = stack
        .audit()
        .into_iter()
        .filter(|r| r["rotation_id"] == id)
        .collect();
    assert!(
        ours.iter()
            .any(|r| r["event"] == "aborted" && r["outcome"] == "aborted"),
        "{case}: audit has the abort: {ours:#?}"
    );
    assert!(
        !ours.iter().any(|r| r["event"] == "regenerated"),
        "{case}: audit has no regenerate: {ours:#?}"
    );
    assert_eq!(
        aborted(daemon).await,
        b.aborted + 1.0,
        "{case}: keyrotd_rotations_total{{outcome=\"aborted\"}} counts it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_preflight_failure_aborts_without_touching_the_key() {
    let mut stack = Stack::start().await;
    let o = Options::default();
    let daemon = stack.daemon(&stack.write_config(&o)).await;

    // The portal says the key is not Active: aborted, and keyrotd_key_active follows the portal.
    assert_eq!(
        daemon
            .metrics()
            .await
            .get("keyrotd_key_active", &[("key", KEY)]),
        1.0
    );
    stack.portal.faults(json!({ "active": false })).await;
    assert_aborts(&stack, &daemon, "inactive", "not Active").await;
    assert_eq!(
        daemon
            .metrics()
            .await
            .get("keyrotd_key_active", &[("key", KEY)]),
        0.0,
        "keyrotd_key_active drops to 0 once the portal says so"
    );
    stack.portal.faults(json!({ "active": true })).await;

    // A key of another business account.
    stack.portal.faults(json!({ "account_id": "other" })).await;
    assert_aborts(&stack, &daemon, "wrong account", "account other").await;
    stack.portal.reset().await;

    // The AWS secret is gone: keyrotd never creates secrets, so the rotation must not start.
    stack
        .moto
        .client()
        .await
        .delete_secret()
        .secret_id(AWS_SECRET)
        .force_delete_without_recovery(true)
        .send()
        .await
        .expect("moto DeleteSecret");
    assert_aborts(&stack, &daemon, "missing AWS secret", "does not exist").await;
    stack.moto.create_secret(AWS_SECRET, "{}").await;

    // The file store's directory cannot be written (read-only, even for root).
    {
        let _ro = ReadOnlyDir::new(&stack.keys_dir());
        assert_aborts(
            &stack,
            &daemon,
            "read-only key directory",
            "is not writable",
        )
        .await;
    }

    // A dependent that does not answer its verify at all.
    stack.dep_aws.kill();
    assert_aborts(
        &stack,
        &daemon,
        "dependent down",
        "dependent edge unreachable",
    )
    .await;

    // Nothing was left behind: no destination was written at any point.
    assert_eq!(
        stack.destination_fingerprints().await,
        vec![None, None, None],
        "no destination holds a key"
    );
    let j = stack.journal();
    assert_eq!(j["phase"], "idle", "{j:#}");
    assert_eq!(stack.journal_regenerations(), 0, "no budget spent: {j:#}");
    let m = daemon.metrics().await;
    for outcome in ["success", "degraded", "failed"] {
        assert_eq!(
            m.get(
                "keyrotd_rotations_total",
                &[("key", KEY), ("outcome", outcome)]
            ),
            0.0,
            "only aborts were counted"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_credentials_abort() {
    let stack = Stack::start().await;
    stack
        .bao
        .write_policy(
            "billing-read-only",
            r#"path "secret/data/apps/billing" { capabilities = ["read"] }
path "secret/metadata/apps/billing" { capabilities = ["read"] }"#,
        )
        .await;
    let token = stack.bao.create_token(&["billing-read-only"]).await;
    let config = stack.write_config(&Options::default());
    let mut daemon = stack
        .daemon_with_env(&config, &[("KEYROTD_TEST_VAULT_TOKEN", token.as_str())])
        .await;
    assert_aborts(
        &stack,
        &daemon,
        "read-only token",
        "lacks create/update capability",
    )
    .await;
    daemon.terminate(std::time::Duration::from_secs(30));

    // The portal refuses keyrotd's management token: aborted, and counted as an auth error.
    let daemon = stack
        .daemon_with_env(
            &config,
            &[("KEYROTD_TEST_AOS_TOKEN", "not-the-portals-management-token")],
        )
        .await;
    assert_aborts(&stack, &daemon, "refused management token", "401").await;
    assert!(
        daemon.metrics().await.get(
            "keyrotd_provider_requests_total",
            &[
                ("provider", "portal"),
                ("operation", "status"),
                ("outcome", "auth_error")
            ]
        ) >= 1.0
    );
}
