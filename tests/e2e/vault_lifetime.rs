//! A Vault store's credentials over a daemon's lifetime, against a real OpenBao: a periodic token
//! outlives its period because keyrotd renews it, a token file rewritten by an agent is picked up
//! for the next write, a policy 403 does not spend an AppRole `secret_id` use, and a deleted latest
//! version does not break check-and-set.

use std::time::Duration;

use crate::support::bao::Bao;
use crate::support::eventually;
use crate::support::secrets::{Haystacks, secrets_of};
use crate::support::stack::{Options, Stack};
use chrono::Utc;
use keyrotd::config::{DestinationTarget, VaultAuth, VaultStoreConfig};
use keyrotd::secret::{Secret, fingerprint};
use keyrotd::store::vault::VaultStore;
use keyrotd::store::{Store, StoreErrorKind, WriteRequest};
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

/// Everything a keyrotd token needs on `secret/` (the default policy adds lookup-self,
/// renew-self and capabilities-self).
const KV_POLICY: &str = r#"
path "secret/data/*" { capabilities = ["create", "read", "update"] }
path "secret/metadata/*" { capabilities = ["create", "read", "update"] }
"#;

fn config(bao: &Bao, auth: VaultAuth) -> VaultStoreConfig {
    VaultStoreConfig {
        address: bao.addr.parse().unwrap(),
        auth,
        mount: "secret".into(),
        namespace: None,
        timeout: Duration::from_secs(5),
        token_file: None,
        tls: Default::default(),
    }
}

fn target(path: &str) -> DestinationTarget {
    DestinationTarget::Vault {
        path: path.into(),
        field: "api_key".into(),
    }
}

/// Writes a fresh value; returns it.
async fn write(store: &Store, t: &DestinationTarget) -> Result<(String, Option<String>), String> {
    let secret = Secret::from(format!("aos_sk_live_{}", Uuid::new_v4().simple()));
    let fp = fingerprint(&secret);
    let req = WriteRequest {
        key: "billing",
        rotation_id: Uuid::new_v4(),
        key_id: "key_1",
        secret: &secret,
        fingerprint: &fp,
        rotated_at: Utc::now(),
        fence: None,
    };
    match store.write(t, &req).await {
        Ok(v) => Ok((fp, v)),
        Err(e) => Err(e.to_string()),
    }
}

async fn token_with(bao: &Bao, body: Value) -> String {
    let v = bao.api(Method::POST, "auth/token/create", Some(body)).await;
    v.pointer("/auth/client_token")
        .and_then(Value::as_str)
        .expect("client_token")
        .to_string()
}

/// The token's lifetime as OpenBao counts it (looked up as root, which does not renew it): seconds
/// from its creation to its last renewal, 0 before the first renewal. Panics when OpenBao no longer
/// knows the token (it expired).
async fn renewed_after(bao: &Bao, token: &str) -> u64 {
    let lookup = bao
        .api(
            Method::POST,
            "auth/token/lookup",
            Some(json!({ "token": token })),
        )
        .await;
    let created = lookup["data"]["creation_time"]
        .as_u64()
        .unwrap_or_else(|| panic!("no creation_time in the token lookup: {lookup}"));
    // OpenBao names the last renewal only once there has been one.
    lookup["data"]["last_renewal_time"]
        .as_u64()
        .map_or(0, |renewed| renewed.saturating_sub(created))
}

#[tokio::test]
async fn a_periodic_token_outlives_its_period_and_a_rotation_then_succeeds() {
    const PERIOD: u64 = 10;
    let stack = Stack::start().await;
    stack.bao.write_policy("keyrotd", KV_POLICY).await;
    let token = token_with(
        &stack.bao,
        json!({ "policies": ["keyrotd"], "period": format!("{PERIOD}s"), "no_parent": true }),
    )
    .await;
    let o = Options {
        with_aws: false,
        with_file: false,
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let d = stack
        .daemon_with_env(&config, &[("KEYROTD_TEST_VAULT_TOKEN", &token)])
        .await;
    // Three periods on OpenBao's clock: without renewal the token would have died after the
    // first (and the lookup would fail), so only a daemon that kept renewing it gets here.
    eventually(
        Duration::from_secs(90),
        "OpenBao shows the token renewed more than three periods after its creation",
        || async { renewed_after(&stack.bao, &token).await > 3 * PERIOD },
    )
    .await;
    let record = d.rotate("after three token periods of uptime").await;
    assert_eq!(
        record["outcome"],
        "success",
        "{record}\nlog:\n{}",
        d.log_text()
    );
    let lookup = stack
        .bao
        .api(
            Method::POST,
            "auth/token/lookup",
            Some(json!({ "token": token })),
        )
        .await;
    assert!(lookup["data"]["ttl"].as_u64().unwrap_or(0) > 0, "{lookup}");
    let scrape = d.metrics().await;
    assert_eq!(
        scrape.value(
            "keyrotd_store_credential_expiry_timestamp_seconds",
            &[("store", "vault")],
        ),
        Some(f64::INFINITY),
        "kept valid by renewal:\n{scrape}"
    );
    assert_eq!(
        scrape.value(
            "keyrotd_store_credential_renewal_failing",
            &[("store", "vault")]
        ),
        Some(0.0),
        "{scrape}"
    );
    // Renewal sends the token on every call: it must not surface in any output either.
    let mut outputs = Haystacks::default();
    outputs.gather_standard(&stack).await;
    let mut secrets = secrets_of(&stack).await;
    secrets.push(("the periodic Vault token".into(), token.clone()));
    outputs.assert_none_of(&secrets);
}

#[tokio::test]
async fn a_rewritten_token_file_is_used_for_the_next_write() {
    let bao = Bao::start();
    bao.write_policy("keyrotd", KV_POLICY).await;
    let first = token_with(&bao, json!({ "policies": ["keyrotd"], "ttl": "1h" })).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vault-token");
    std::fs::write(&file, format!("{first}\n")).unwrap();
    let mut c = config(&bao, VaultAuth::Token(Secret::from(first.clone())));
    c.token_file = Some(file.clone());
    let store = Store::Vault(VaultStore::new("vault-main", &c).unwrap());
    let t = target("apps/agent");
    write(&store, &t).await.expect("first token writes");

    // The agent writes a new token, and the old one is revoked.
    let second = token_with(&bao, json!({ "policies": ["keyrotd"], "ttl": "1h" })).await;
    std::fs::write(&file, format!("{second}\n")).unwrap();
    bao.api(
        Method::POST,
        "auth/token/revoke",
        Some(json!({ "token": first })),
    )
    .await;
    let (fp, version) = write(&store, &t).await.expect("the new token writes");
    assert_eq!(version.as_deref(), Some("2"));
    assert_eq!(
        store.read(&t).await.unwrap().unwrap().fingerprint,
        fp,
        "the value written with the new token reads back"
    );
}

#[tokio::test]
async fn a_token_file_is_read_again_after_a_403_even_when_it_looks_unchanged() {
    let bao = Bao::start();
    bao.write_policy("keyrotd", KV_POLICY).await;
    let first = token_with(&bao, json!({ "policies": ["keyrotd"], "ttl": "1h" })).await;
    let second = token_with(&bao, json!({ "policies": ["keyrotd"], "ttl": "1h" })).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vault-token");
    // The store starts with a token the file no longer holds (an agent wrote the file between
    // the config load and the store's first look), so its stamp matches but its content differs.
    std::fs::write(&file, &second).unwrap();
    let mut c = config(&bao, VaultAuth::Token(Secret::from(first.clone())));
    c.token_file = Some(file);
    let store = Store::Vault(VaultStore::new("vault-main", &c).unwrap());
    bao.api(
        Method::POST,
        "auth/token/revoke",
        Some(json!({ "token": first })),
    )
    .await;
    write(&store, &target("apps/agent2"))
        .await
        .expect("the 403 made the store read the file again");
}

/// A role whose secret_id may log in twice; returns (role_id, secret_id).
async fn approle_with_two_uses(bao: &Bao) -> (String, String) {
    bao.api(
        Method::POST,
        "sys/auth/approle",
        Some(json!({ "type": "approle" })),
    )
    .await;
    bao.api(
        Method::POST,
        "auth/approle/role/keyrotd",
        Some(json!({ "token_policies": ["keyrotd"], "token_ttl": "10m", "secret_id_num_uses": 2 })),
    )
    .await;
    let role = bao
        .api(Method::GET, "auth/approle/role/keyrotd/role-id", None)
        .await;
    let secret = bao
        .api(Method::POST, "auth/approle/role/keyrotd/secret-id", None)
        .await;
    (
        role["data"]["role_id"].as_str().unwrap().to_string(),
        secret["data"]["secret_id"].as_str().unwrap().to_string(),
    )
}

async fn uses_left(bao: &Bao, secret_id: &str) -> u64 {
    let v = bao
        .api(
            Method::POST,
            "auth/approle/role/keyrotd/secret-id/lookup",
            Some(json!({ "secret_id": secret_id })),
        )
        .await;
    v["data"]["secret_id_num_uses"]
        .as_u64()
        .unwrap_or_else(|| panic!("no secret_id_num_uses in {v}"))
}

#[tokio::test]
async fn a_policy_403_does_not_spend_an_approle_secret_id_use() {
    let bao = Bao::start();
    bao.write_policy(
        "keyrotd",
        r#"
        path "secret/data/apps/*" { capabilities = ["create", "read", "update"] }
        path "secret/metadata/apps/*" { capabilities = ["create", "read", "update"] }
        "#,
    )
    .await;
    let (role_id, secret_id) = approle_with_two_uses(&bao).await;
    bao.kv_put("other/x", json!({ "api_key": "not ours" }))
        .await;
    let store = Store::Vault(
        VaultStore::new(
            "vault-main",
            &config(
                &bao,
                VaultAuth::AppRole {
                    role_id: Secret::from(role_id),
                    secret_id: Secret::from(secret_id.clone()),
                    mount: "approle".into(),
                },
            ),
        )
        .unwrap(),
    );
    write(&store, &target("apps/billing"))
        .await
        .expect("allowed path");
    assert_eq!(uses_left(&bao, &secret_id).await, 1, "one login so far");
    // Three reconciles read a path the policy does not grant.
    for _ in 0..3 {
        let e = store.read(&target("other/x")).await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Auth, "{e}");
    }
    assert_eq!(
        uses_left(&bao, &secret_id).await,
        1,
        "a policy 403 must not log in again"
    );
    write(&store, &target("apps/billing"))
        .await
        .expect("the token still works");
}

#[tokio::test]
async fn after_the_latest_version_is_deleted_the_next_write_uses_the_right_check_and_set() {
    let bao = Bao::start();
    let store = Store::Vault(
        VaultStore::new(
            "vault-main",
            &config(&bao, VaultAuth::Token(Secret::from(bao.root_token.clone()))),
        )
        .unwrap(),
    );
    let t = target("apps/deleted");
    write(&store, &t).await.unwrap();
    write(&store, &t).await.unwrap();
    // `bao kv delete`: soft-deletes the latest version (2); its number stays current.
    bao.api(Method::DELETE, "secret/data/apps/deleted", None)
        .await;
    assert!(
        store.read(&t).await.unwrap().is_none(),
        "deleted reads as empty"
    );
    let (fp, version) = write(&store, &t).await.expect("write after delete");
    assert_eq!(version.as_deref(), Some("3"));
    let got = store.read(&t).await.unwrap().unwrap();
    assert_eq!((got.fingerprint, got.version.as_deref()), (fp, Some("3")));
}
