//! Preflight aborts through the real daemon: each one leaves the portal's key untouched (same key id,
//! the old secret still authenticates), ends `aborted` and is audited.

use crate::support::daemon::{Options, Stack};
use serde_json::json;

/// What a rotation must not have changed.
struct Before {
    key_id: String,
    secret: String,
    regenerations: u64,
}

async fn before(stack: &Stack) -> Before {
    let s = stack.portal.state().await;
    Before {
        key_id: s.key_id,
        secret: stack.portal.current_secret().await,
        regenerations: s.regenerations,
    }
}

/// The rotation ended `aborted`, is audited as such, and the portal's key is the one from before and
/// still authenticates.
async fn assert_aborted_and_unchanged(
    stack: &Stack,
    record: &serde_json::Value,
    b: &Before,
    why: &str,
) {
    assert_eq!(record["outcome"], "aborted", "{record:#}");
    let text = record.to_string();
    assert!(
        text.contains(why),
        "the record says why ({why}): {record:#}"
    );
    let s = stack.portal.state().await;
    assert_eq!(s.key_id, b.key_id, "the portal's key is unchanged");
    assert_eq!(s.regenerations, b.regenerations, "nothing was regenerated");
    let provider = stack.portal.provider();
    let old = keyrotd::secret::Secret::from(b.secret.clone());
    assert!(
        provider.auth_check(&old).await.unwrap().is_some(),
        "the old key still authenticates"
    );
    let audit = stack.audit();
    assert!(
        audit
            .iter()
            .any(|r| r["event"] == "aborted" && r["outcome"] == "aborted"),
        "audit has the abort: {audit:#?}"
    );
    assert!(
        !audit.iter().any(|r| r["event"] == "regenerated"),
        "audit has no regenerate: {audit:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inactive_key_aborts() {
    let stack = Stack::start().await;
    let daemon = stack.daemon(&stack.write_config(&Options::default())).await;
    stack.portal.faults(json!({ "active": false })).await;
    let b = before(&stack).await;
    let record = daemon.rotate("test: inactive").await;
    assert_aborted_and_unchanged(&stack, &record, &b, "not Active").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_of_another_account_aborts() {
    let stack = Stack::start().await;
    let daemon = stack.daemon(&stack.write_config(&Options::default())).await;
    stack.portal.faults(json!({ "account_id": "other" })).await;
    let b = before(&stack).await;
    let record = daemon.rotate("test: wrong account").await;
    assert_aborted_and_unchanged(&stack, &record, &b, "account other").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_store_token_aborts() {
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
    let daemon = stack
        .daemon_with_env(&config, &[("KEYROTD_TEST_VAULT_TOKEN", token.as_str())])
        .await;
    let b = before(&stack).await;
    let record = daemon.rotate("test: read-only token").await;
    assert_aborted_and_unchanged(&stack, &record, &b, "lacks create/update capability").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_dependent_aborts() {
    let mut stack = Stack::start().await;
    let daemon = stack.daemon(&stack.write_config(&Options::default())).await;
    stack.dep_aws.kill();
    let b = before(&stack).await;
    let record = daemon.rotate("test: dependent down").await;
    assert_aborted_and_unchanged(&stack, &record, &b, "dependent edge unreachable").await;
}
