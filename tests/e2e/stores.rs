//! The destination stores against the real thing: OpenBao (dev server), moto, and the local
//! filesystem. Each test starts what it needs on free ports and fails loudly if it cannot.
//!
//! The story per store: a value written reads back with its fingerprint, key id and version; what else
//! lives at the destination survives; concurrent and repeated writes lose nothing and duplicate
//! nothing; preflight refuses with an error that says what is wrong; and no error ever carries the
//! value.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use crate::support::bao::Bao;
use crate::support::moto::Moto;
use chrono::{TimeZone, Utc};
use keyrotd::config::{DestinationTarget, FileStoreConfig, VaultAuth, VaultStoreConfig};
use keyrotd::secret::{Secret, fingerprint};
use keyrotd::store::aws::AwsStore;
use keyrotd::store::file::FileStore;
use keyrotd::store::vault::VaultStore;
use keyrotd::store::{Prepared, Store, StoreError, StoreErrorKind, WriteRequest};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use uuid::Uuid;

/// A new key as a rotation would hold it: a distinctive value (so a leak is easy to grep for) and
/// the request that writes it.
struct NewKey {
    secret: Secret,
    fingerprint: String,
    key_id: String,
    rotation_id: Uuid,
}

impl NewKey {
    fn new(key_id: &str) -> NewKey {
        let secret = Secret::from(format!("aos_sk_live_{}", Uuid::new_v4().simple()));
        NewKey {
            fingerprint: fingerprint(&secret),
            secret,
            key_id: key_id.to_string(),
            rotation_id: Uuid::new_v4(),
        }
    }

    fn req(&self) -> WriteRequest<'_> {
        WriteRequest {
            key: "billing-api",
            rotation_id: self.rotation_id,
            key_id: &self.key_id,
            secret: &self.secret,
            fingerprint: &self.fingerprint,
            rotated_at: Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap(),
            fence: None,
        }
    }

    fn value(&self) -> &str {
        self.secret.expose_secret()
    }
}

fn assert_no_value(e: &StoreError, key: &NewKey) {
    let shown = format!("{e} | {e:?}");
    assert!(
        !shown.contains(key.value()),
        "the secret value leaked into a store error: {shown}"
    );
}

// ---------------------------------------------------------------------------------------------------
// Vault / OpenBao

fn vault_config(bao_addr: &str, auth: VaultAuth) -> VaultStoreConfig {
    VaultStoreConfig {
        address: bao_addr.parse().unwrap(),
        auth,
        mount: "secret".into(),
        namespace: None,
        timeout: Duration::from_secs(5),
        token_file: None,
        tls: Default::default(),
    }
}

fn vault_store(bao: &Bao, token: &str) -> Store {
    let c = vault_config(&bao.addr, VaultAuth::Token(Secret::from(token.to_string())));
    Store::Vault(VaultStore::new("vault-main", &c).unwrap())
}

/// A value and then (as a rotation does, off the outage path) its metadata.
async fn write_all(
    store: &Store,
    target: &DestinationTarget,
    req: &WriteRequest<'_>,
) -> Result<Option<String>, StoreError> {
    let version = store.write(target, req).await?;
    store.after_write(target, req, &Prepared::none()).await?;
    Ok(version)
}

fn vault_target(path: &str, field: &str) -> DestinationTarget {
    DestinationTarget::Vault {
        path: path.into(),
        field: field.into(),
    }
}

#[tokio::test]
async fn vault_write_reads_back_with_fingerprint_key_id_version_and_metadata() {
    let bao = Bao::start();
    let store = vault_store(&bao, &bao.root_token);
    let target = vault_target("apps/billing/aos", "api_key");
    assert!(
        store.read(&target).await.unwrap().is_none(),
        "a fresh path holds nothing"
    );

    let key = NewKey::new("key_01");
    let version = write_all(&store, &target, &key.req()).await.unwrap();
    assert_eq!(version.as_deref(), Some("1"));

    let got = store.read(&target).await.unwrap().expect("value written");
    assert_eq!(got.secret.expose_secret(), key.value());
    assert_eq!(got.fingerprint, key.fingerprint);
    assert_eq!(got.key_id.as_deref(), Some("key_01"));
    assert_eq!(got.version.as_deref(), Some("1"));

    let meta = bao.kv_metadata("apps/billing/aos").await;
    let custom = &meta["custom_metadata"];
    assert_eq!(custom["keyrotd_key_id"], "key_01");
    assert_eq!(custom["keyrotd_fingerprint"], key.fingerprint.as_str());
    assert_eq!(custom["keyrotd_rotation_id"], key.rotation_id.to_string());
    assert_eq!(custom["keyrotd_rotated_at"], "2026-03-02T09:00:00+00:00");
    assert!(
        !meta.to_string().contains(key.value()),
        "metadata holds the value"
    );

    // A second rotation replaces the value and the metadata: version 2.
    let next = NewKey::new("key_02");
    assert_eq!(
        write_all(&store, &target, &next.req())
            .await
            .unwrap()
            .as_deref(),
        Some("2")
    );
    let got = store.read(&target).await.unwrap().unwrap();
    assert_eq!(got.fingerprint, next.fingerprint);
    assert_eq!(got.key_id.as_deref(), Some("key_02"));
}

#[tokio::test]
async fn vault_write_keeps_the_other_fields_and_operator_metadata() {
    let bao = Bao::start();
    bao.kv_put(
        "apps/billing/aos",
        json!({ "username": "svc-billing", "endpoint": "https://aos.example", "api_key": "old" }),
    )
    .await;
    bao.api(
        reqwest::Method::POST,
        "secret/metadata/apps/billing/aos",
        Some(json!({ "custom_metadata": { "owner": "team-billing" } })),
    )
    .await;
    let store = vault_store(&bao, &bao.root_token);
    let key = NewKey::new("key_07");
    let target = vault_target("apps/billing/aos", "api_key");
    assert_eq!(
        write_all(&store, &target, &key.req())
            .await
            .unwrap()
            .as_deref(),
        Some("2")
    );

    let now = bao.kv_get("apps/billing/aos").await;
    assert_eq!(
        now["data"],
        json!({ "username": "svc-billing", "endpoint": "https://aos.example", "api_key": key.value() })
    );
    let meta = bao.kv_metadata("apps/billing/aos").await;
    assert_eq!(meta["custom_metadata"]["owner"], "team-billing");
    assert_eq!(meta["custom_metadata"]["keyrotd_key_id"], "key_07");
}

#[tokio::test]
async fn vault_retry_of_the_same_write_makes_no_new_version() {
    let bao = Bao::start();
    let store = vault_store(&bao, &bao.root_token);
    let target = vault_target("apps/x", "api_key");
    let key = NewKey::new("key_1");
    let first = write_all(&store, &target, &key.req()).await.unwrap();
    let again = write_all(&store, &target, &key.req()).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(bao.kv_metadata("apps/x").await["current_version"], 1);
}

#[tokio::test]
async fn vault_concurrent_writers_on_one_path_lose_no_update() {
    let bao = Bao::start();
    // Separate clients, as two keyrotd keys (or two daemons) sharing one KV path would be.
    let fields = ["a", "b", "c", "d", "e", "f"];
    let keys: Vec<Arc<NewKey>> = fields
        .iter()
        .map(|f| Arc::new(NewKey::new(&format!("key_{f}"))))
        .collect();
    let mut tasks = Vec::new();
    for (field, key) in fields.iter().zip(&keys) {
        let store = vault_store(&bao, &bao.root_token);
        let target = vault_target("shared/path", field);
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            store.write(&target, &key.req()).await
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("each writer succeeds (CAS conflicts retried)");
    }
    let now = bao.kv_get("shared/path").await;
    for (field, key) in fields.iter().zip(&keys) {
        assert_eq!(
            now["data"][field].as_str(),
            Some(key.value()),
            "field {field} was lost to a concurrent writer: {}",
            now["data"]
        );
    }
    // Every writer made exactly one version: none was overwritten by a stale read.
    assert_eq!(
        bao.kv_metadata("shared/path").await["current_version"],
        fields.len()
    );
}

#[tokio::test]
async fn vault_key_id_is_reported_only_for_the_value_the_metadata_describes() {
    let bao = Bao::start();
    let store = vault_store(&bao, &bao.root_token);
    let a = NewKey::new("key_a");
    let b = NewKey::new("key_b");
    write_all(&store, &vault_target("shared", "a"), &a.req())
        .await
        .unwrap();
    write_all(&store, &vault_target("shared", "b"), &b.req())
        .await
        .unwrap();
    // Metadata is per path and now describes b: a's value is known by fingerprint only.
    let got_a = store
        .read(&vault_target("shared", "a"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got_a.fingerprint, a.fingerprint);
    assert_eq!(got_a.key_id, None);
    let got_b = store
        .read(&vault_target("shared", "b"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got_b.key_id.as_deref(), Some("key_b"));
    assert!(
        store
            .read(&vault_target("shared", "missing"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn vault_value_put_there_by_someone_else_has_no_key_id() {
    let bao = Bao::start();
    bao.kv_put("apps/y", json!({ "api_key": "typed-in-by-hand" }))
        .await;
    let store = vault_store(&bao, &bao.root_token);
    let got = store
        .read(&vault_target("apps/y", "api_key"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got.fingerprint,
        keyrotd::secret::fingerprint_bytes(b"typed-in-by-hand")
    );
    assert_eq!(got.key_id, None);
    assert_eq!(got.version.as_deref(), Some("1"));
}

#[tokio::test]
async fn vault_preflight_accepts_a_writer_and_names_the_missing_capability() {
    let bao = Bao::start();
    bao.write_policy(
        "billing-writer",
        r#"
        path "secret/data/apps/billing/*" { capabilities = ["create", "read", "update"] }
        path "secret/metadata/apps/billing/*" { capabilities = ["create", "read", "update"] }
        "#,
    )
    .await;
    bao.write_policy(
        "billing-reader",
        r#"path "secret/data/apps/billing/*" { capabilities = ["read"] }"#,
    )
    .await;
    let target = vault_target("apps/billing/aos", "api_key");

    let writer = vault_store(&bao, &bao.create_token(&["billing-writer"]).await);
    writer.preflight(&target).await.expect("writer passes");
    let key = NewKey::new("key_w");
    writer
        .write(&target, &key.req())
        .await
        .expect("and can write");

    let reader = vault_store(&bao, &bao.create_token(&["billing-reader"]).await);
    let e = reader.preflight(&target).await.unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Auth, "{e}");
    assert!(
        e.message
            .contains("lacks create/update capability on secret/data/apps/billing/aos"),
        "{e}"
    );
    assert!(e.message.contains("has: read"), "{e}");
    // The preflight told the truth: the write (of a new value) is refused the same way.
    let next = NewKey::new("key_r");
    let e = reader.write(&target, &next.req()).await.unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Auth, "{e}");
    assert_no_value(&e, &next);

    // A token on a path its policy does not cover at all.
    let e = writer
        .preflight(&vault_target("apps/other/x", "api_key"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Auth);
    assert!(
        e.message
            .contains("read capability on secret/data/apps/other/x"),
        "{e}"
    );

    // A token that does not exist.
    let bogus = vault_store(&bao, "s.not-a-real-token");
    let e = bogus.preflight(&target).await.unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Auth, "{e}");
    assert!(e.message.contains("lookup-self"), "{e}");
}

#[tokio::test]
async fn vault_approle_logs_in_on_first_use_and_writes() {
    let bao = Bao::start();
    bao.write_policy(
        "kr",
        r#"
        path "secret/data/apps/*" { capabilities = ["create", "read", "update"] }
        path "secret/metadata/apps/*" { capabilities = ["create", "read", "update"] }
        "#,
    )
    .await;
    let (role_id, secret_id) = bao.enable_approle("keyrotd", &["kr"]).await;
    let c = vault_config(
        &bao.addr,
        VaultAuth::AppRole {
            role_id: Secret::from(role_id),
            secret_id: Secret::from(secret_id),
            mount: "approle".into(),
        },
    );
    let store = Store::Vault(VaultStore::new("vault-main", &c).unwrap());
    let target = vault_target("apps/z", "api_key");
    store
        .preflight(&target)
        .await
        .expect("approle token passes");
    let key = NewKey::new("key_ar");
    write_all(&store, &target, &key.req()).await.unwrap();
    assert_eq!(
        store.read(&target).await.unwrap().unwrap().fingerprint,
        key.fingerprint
    );

    // Wrong secret_id: an Auth error naming the login, without the credential.
    let c = vault_config(
        &bao.addr,
        VaultAuth::AppRole {
            role_id: Secret::from("nope".to_string()),
            secret_id: Secret::from("wrong-secret-id-value".to_string()),
            mount: "approle".into(),
        },
    );
    let bad = VaultStore::new("vault-main", &c).unwrap();
    let e = bad.preflight(&target).await.unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Auth, "{e}");
    assert!(e.message.contains("AppRole login"), "{e}");
    assert!(!e.to_string().contains("wrong-secret-id-value"), "{e}");
}

#[tokio::test]
async fn vault_namespace_is_sent_with_every_request() {
    let bao = Bao::start();
    bao.create_namespace("ops").await;
    let mut c = vault_config(
        &bao.addr,
        VaultAuth::Token(Secret::from(bao.root_token.clone())),
    );
    c.namespace = Some("ops".into());
    let store = Store::Vault(VaultStore::new("vault-ops", &c).unwrap());
    let target = vault_target("apps/ns", "api_key");
    store.preflight(&target).await.unwrap();
    let key = NewKey::new("key_ns");
    write_all(&store, &target, &key.req()).await.unwrap();
    assert_eq!(
        store.read(&target).await.unwrap().unwrap().fingerprint,
        key.fingerprint
    );
    let inside = bao
        .api_in_namespace("ops", reqwest::Method::GET, "secret/data/apps/ns", None)
        .await;
    assert_eq!(
        inside["data"]["data"]["api_key"].as_str(),
        Some(key.value())
    );
    // Nothing landed in the root namespace.
    let root_store = vault_store(&bao, &bao.root_token);
    assert!(root_store.read(&target).await.unwrap().is_none());
}

#[tokio::test]
async fn vault_down_is_transient_and_the_error_holds_no_secret() {
    let bao = Bao::start();
    let store = vault_store(&bao, &bao.root_token);
    let target = vault_target("apps/x", "api_key");
    bao.down();
    let key = NewKey::new("key_down");
    let e = store.write(&target, &key.req()).await.unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Transient, "{e}");
    assert!(e.is_retryable());
    assert!(e.message.contains("cannot reach Vault"), "{e}");
    assert_no_value(&e, &key);
    assert!(
        !e.to_string().contains(&bao.root_token),
        "token leaked: {e}"
    );
    let e = store.preflight(&target).await.unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Transient, "{e}");

    // Back, and the same client carries on.
    bao.up();
    write_all(&store, &target, &key.req()).await.unwrap();
    assert_eq!(
        store.read(&target).await.unwrap().unwrap().fingerprint,
        key.fingerprint
    );
}

// ---------------------------------------------------------------------------------------------------
// AWS Secrets Manager (moto)

fn aws_target(secret_id: &str, field: Option<&str>) -> DestinationTarget {
    DestinationTarget::Aws {
        secret_id: secret_id.into(),
        field: field.map(Into::into),
    }
}

async fn version_ids(moto: &Moto, secret_id: &str) -> Vec<(String, Vec<String>)> {
    let out = moto
        .client()
        .await
        .list_secret_version_ids()
        .secret_id(secret_id)
        .send()
        .await
        .unwrap();
    out.versions()
        .iter()
        .map(|v| {
            (
                v.version_id().unwrap_or_default().to_string(),
                v.version_stages().to_vec(),
            )
        })
        .collect()
}

async fn current_string(moto: &Moto, secret_id: &str) -> String {
    moto.client()
        .await
        .get_secret_value()
        .secret_id(secret_id)
        .send()
        .await
        .unwrap()
        .secret_string()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn aws_raw_write_becomes_current_reads_back_and_is_tagged_after() {
    let moto = Moto::start();
    moto.create_secret("prod/billing/aos", "old-value").await;
    let store = Store::Aws(moto.store("aws-main").await);
    let target = aws_target("prod/billing/aos", None);
    store.preflight(&target).await.unwrap();

    let key = NewKey::new("key_01");
    let version = store
        .write(&target, &key.req())
        .await
        .unwrap()
        .expect("a VersionId");
    assert_eq!(version, key.req().idempotency_token().to_string());
    assert_eq!(current_string(&moto, "prod/billing/aos").await, key.value());
    let versions = version_ids(&moto, "prod/billing/aos").await;
    let new = versions.iter().find(|(id, _)| *id == version).unwrap();
    assert!(new.1.contains(&"AWSCURRENT".to_string()), "{versions:?}");

    // Before the tags: the value is known by its fingerprint, its key id not yet.
    let got = store.read(&target).await.unwrap().unwrap();
    assert_eq!(got.secret.expose_secret(), key.value());
    assert_eq!(got.fingerprint, key.fingerprint);
    assert_eq!(got.version.as_deref(), Some(version.as_str()));
    assert_eq!(got.key_id, None);

    store
        .after_write(&target, &key.req(), &Prepared::none())
        .await
        .unwrap();
    let got = store.read(&target).await.unwrap().unwrap();
    assert_eq!(got.key_id.as_deref(), Some("key_01"));
    let tags = moto
        .client()
        .await
        .describe_secret()
        .secret_id("prod/billing/aos")
        .send()
        .await
        .unwrap();
    let tag = |k: &str| {
        tags.tags()
            .iter()
            .find(|t| t.key() == Some(k))
            .and_then(|t| t.value())
            .map(str::to_string)
    };
    assert_eq!(tag("keyrotd:fingerprint"), Some(key.fingerprint.clone()));
    assert_eq!(
        tag("keyrotd:rotated_at").as_deref(),
        Some("2026-03-02T09:00:00+00:00")
    );
}

#[tokio::test]
async fn aws_retry_of_the_same_request_makes_one_version() {
    let moto = Moto::start();
    moto.create_secret("prod/x", "old").await;
    let store = Store::Aws(moto.store("aws-main").await);
    let target = aws_target("prod/x", None);
    let key = NewKey::new("key_1");
    let first = store.write(&target, &key.req()).await.unwrap();
    let again = store.write(&target, &key.req()).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(
        version_ids(&moto, "prod/x").await.len(),
        2,
        "initial + exactly one new"
    );

    // A re-rotation's new value gets a new token, hence a new version.
    let next = NewKey::new("key_2");
    let third = store.write(&target, &next.req()).await.unwrap();
    assert_ne!(third, first);
    assert_eq!(current_string(&moto, "prod/x").await, next.value());
}

#[tokio::test]
async fn aws_json_field_mode_keeps_the_other_fields() {
    let moto = Moto::start();
    moto.create_secret(
        "prod/billing",
        r#"{"username":"svc-billing","api_key":"old","port":5432}"#,
    )
    .await;
    let store = Store::Aws(moto.store("aws-main").await);
    let target = aws_target("prod/billing", Some("api_key"));
    let key = NewKey::new("key_j");
    let v1 = store.write(&target, &key.req()).await.unwrap();
    let now: Value = serde_json::from_str(&current_string(&moto, "prod/billing").await).unwrap();
    assert_eq!(
        now,
        json!({ "username": "svc-billing", "api_key": key.value(), "port": 5432 })
    );
    let got = store.read(&target).await.unwrap().unwrap();
    assert_eq!(got.secret.expose_secret(), key.value());
    assert_eq!(got.fingerprint, key.fingerprint);

    // Writing a field that already holds the value makes no new version.
    let v2 = store.write(&target, &key.req()).await.unwrap();
    assert_eq!(v1, v2);
    assert_eq!(version_ids(&moto, "prod/billing").await.len(), 2);

    // A field that is not there yet reads as nothing.
    assert!(
        store
            .read(&aws_target("prod/billing", Some("other")))
            .await
            .unwrap()
            .is_none()
    );
}

/// Preflight reads the JSON object ahead, so the write on the outage path is one PutSecretValue. A
/// write by someone else in between would be overwritten by that merge: after the hooks, keyrotd sees
/// that the version it replaced is not the one it read ahead and sets its field again in theirs.
#[tokio::test]
async fn aws_json_field_read_ahead_keeps_a_field_written_in_between() {
    let moto = Moto::start();
    moto.create_secret("prod/billing", r#"{"username":"svc-a","api_key":"old"}"#)
        .await;
    let store = Store::Aws(moto.store("aws-main").await);
    let target = aws_target("prod/billing", Some("api_key"));

    // Nobody writes in between: one new version, the other fields kept, nothing rewritten after.
    let key = NewKey::new("key_1");
    let prepared = store.prepare(&target).await.unwrap();
    store
        .write_prepared(&target, &key.req(), &prepared)
        .await
        .unwrap();
    store
        .after_write(&target, &key.req(), &prepared)
        .await
        .unwrap();
    assert_eq!(version_ids(&moto, "prod/billing").await.len(), 2);
    let now: Value = serde_json::from_str(&current_string(&moto, "prod/billing").await).unwrap();
    assert_eq!(now, json!({ "username": "svc-a", "api_key": key.value() }));

    // Someone changes another field between the read-ahead and the write.
    let next = NewKey::new("key_2");
    let prepared = store.prepare(&target).await.unwrap();
    moto.client()
        .await
        .put_secret_value()
        .secret_id("prod/billing")
        .secret_string(format!(
            r#"{{"username":"svc-b","api_key":"{}"}}"#,
            key.value()
        ))
        .send()
        .await
        .unwrap();
    store
        .write_prepared(&target, &next.req(), &prepared)
        .await
        .unwrap();
    store
        .after_write(&target, &next.req(), &prepared)
        .await
        .unwrap();
    let now: Value = serde_json::from_str(&current_string(&moto, "prod/billing").await).unwrap();
    assert_eq!(
        now,
        json!({ "username": "svc-b", "api_key": next.value() }),
        "the field written in between is kept, and the new key is there"
    );
}

#[tokio::test]
async fn aws_json_field_mode_refuses_a_non_json_secret_without_showing_it() {
    let moto = Moto::start();
    moto.create_secret("prod/plain", "plain-old-secret-value")
        .await;
    let store = Store::Aws(moto.store("aws-main").await);
    let key = NewKey::new("key_p");
    let e = store
        .write(&aws_target("prod/plain", Some("api_key")), &key.req())
        .await
        .unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Permanent, "{e}");
    assert!(
        e.message
            .contains("secret prod/plain holds a value that is not JSON"),
        "{e}"
    );
    assert!(!e.to_string().contains("plain-old-secret-value"), "{e}");
    assert_no_value(&e, &key);
    assert_eq!(
        current_string(&moto, "prod/plain").await,
        "plain-old-secret-value"
    );
}

#[tokio::test]
async fn aws_preflight_says_a_missing_secret_must_be_created_first() {
    let moto = Moto::start();
    let store = Store::Aws(moto.store("aws-main").await);
    let target = aws_target("prod/missing", None);
    let e = store.preflight(&target).await.unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::NotFound, "{e}");
    assert!(
        e.message.contains(
            "secret prod/missing does not exist; keyrotd does not create secrets — create it first"
        ),
        "{e}"
    );
    // A write does not create it either.
    let key = NewKey::new("key_m");
    let e = store.write(&target, &key.req()).await.unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::NotFound, "{e}");
    assert_no_value(&e, &key);
}

#[tokio::test]
async fn aws_down_is_transient_and_the_error_holds_no_secret() {
    let moto = Moto::start();
    moto.create_secret("prod/x", "old").await;
    let store = Store::Aws(moto.store("aws-main").await);
    moto.down();
    let key = NewKey::new("key_down");
    let e = store
        .write(&aws_target("prod/x", None), &key.req())
        .await
        .unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Transient, "{e}");
    assert_no_value(&e, &key);
    let e = store
        .write(&aws_target("prod/x", Some("f")), &key.req())
        .await
        .unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Transient, "{e}");
    assert_no_value(&e, &key);

    // Back, and the same client carries on.
    moto.up();
    store
        .write(&aws_target("prod/x", None), &key.req())
        .await
        .unwrap();
    assert_eq!(current_string(&moto, "prod/x").await, key.value());
}

#[tokio::test]
async fn aws_new_reads_the_standard_chain_and_needs_a_region() {
    // Region given in the store config: builds without any environment.
    let mut c = keyrotd::config::AwsStoreConfig {
        region: Some("eu-central-2".into()),
        endpoint_url: None,
        timeout: Duration::from_secs(1),
        ca_file: None,
    };
    AwsStore::new("aws-main", &c).await.unwrap();
    // No region anywhere: a clear config error rather than a failure at the first write.
    c.region = None;
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    let e = AwsStore::with_sdk_config("aws-main", &c, &sdk)
        .err()
        .expect("no region is an error");
    assert_eq!(e.kind, StoreErrorKind::Permanent);
    assert!(e.message.contains("no AWS region"), "{e}");
}

// ---------------------------------------------------------------------------------------------------
// Files

fn file_store(dir: &std::path::Path) -> Store {
    Store::File(FileStore::new(
        "local",
        &FileStoreConfig {
            dir: dir.to_path_buf(),
        },
    ))
}

fn file_target(file: &str) -> DestinationTarget {
    DestinationTarget::File { file: file.into() }
}

#[tokio::test]
async fn file_write_is_0600_exactly_the_bytes_with_a_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("billing-api.key");
    // An old key left world-readable by hand: the new file must not inherit that.
    std::fs::write(&path, "old-key\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

    let store = file_store(dir.path());
    let target = file_target("billing-api.key");
    store.preflight(&target).await.unwrap();
    let key = NewKey::new("key_f");
    let version = store.write(&target, &key.req()).await.unwrap().unwrap();

    assert_eq!(std::fs::read(&path).unwrap(), key.value().as_bytes());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode {mode:o}");

    let sidecar_path = dir.path().join("billing-api.key.meta.json");
    let sidecar: Value = serde_json::from_slice(&std::fs::read(&sidecar_path).unwrap()).unwrap();
    assert_eq!(sidecar["key_id"], "key_f");
    assert_eq!(sidecar["fingerprint"], key.fingerprint.as_str());
    assert_eq!(sidecar["rotation_id"], key.rotation_id.to_string());
    assert_eq!(sidecar["rotated_at"], "2026-03-02T09:00:00Z");
    let smode = std::fs::metadata(&sidecar_path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(smode, 0o600);

    // Nothing but the file and its sidecar: no temp file left behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["billing-api.key", "billing-api.key.meta.json"]);

    let got = store.read(&target).await.unwrap().unwrap();
    assert_eq!(got.secret.expose_secret(), key.value());
    assert_eq!(got.fingerprint, key.fingerprint);
    assert_eq!(got.key_id.as_deref(), Some("key_f"));
    assert_eq!(got.version.as_deref(), Some(version.as_str()));
    chrono::DateTime::parse_from_rfc3339(&version).expect("version is the mtime in RFC 3339");
}

#[tokio::test]
async fn file_changed_by_hand_loses_its_key_id_and_missing_file_reads_as_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_store(dir.path());
    let target = file_target("k.key");
    assert!(store.read(&target).await.unwrap().is_none());
    let key = NewKey::new("key_h");
    store.write(&target, &key.req()).await.unwrap();
    std::fs::write(dir.path().join("k.key"), "pasted-by-an-operator").unwrap();
    let got = store.read(&target).await.unwrap().unwrap();
    assert_eq!(
        got.fingerprint,
        keyrotd::secret::fingerprint_bytes(b"pasted-by-an-operator")
    );
    assert_eq!(got.key_id, None, "the sidecar describes another value");
}

#[tokio::test]
async fn file_preflight_names_a_missing_or_unusable_dir() {
    let root = tempfile::tempdir().unwrap();
    let key = NewKey::new("key_x");

    let missing = root.path().join("not-there");
    let store = file_store(&missing);
    let e = store.preflight(&file_target("k.key")).await.unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::NotFound, "{e}");
    assert!(e.message.contains(&missing.display().to_string()), "{e}");
    let e = store
        .write(&file_target("k.key"), &key.req())
        .await
        .unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::NotFound, "{e}");
    assert_no_value(&e, &key);

    let not_a_dir = root.path().join("a-file");
    std::fs::write(&not_a_dir, "x").unwrap();
    let e = file_store(&not_a_dir)
        .preflight(&file_target("k.key"))
        .await
        .unwrap_err();
    assert!(e.message.contains("is not a directory"), "{e}");

    // Escaping the dir is refused before touching the disk.
    let e = file_store(root.path())
        .write(&file_target("../escape.key"), &key.req())
        .await
        .unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Permanent, "{e}");
    assert!(!root.path().parent().unwrap().join("escape.key").exists());
}

#[tokio::test]
async fn file_preflight_and_write_refuse_a_directory_that_cannot_be_written() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("keys");
    std::fs::create_dir(&dir).unwrap();
    // Read-only for root too (the tests run as root, which ignores permission bits).
    let _ro = crate::support::ReadOnlyDir::new(&dir);
    let store = file_store(&dir);

    let e = store.preflight(&file_target("k.key")).await.unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Auth, "{e}");
    assert!(e.message.contains("is not writable"), "{e}");
    assert!(e.message.contains(&dir.display().to_string()), "{e}");

    // The preflight told the truth: the write is refused the same way, and shows no value.
    let key = NewKey::new("key_ro");
    let e = store
        .write(&file_target("k.key"), &key.req())
        .await
        .unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Auth, "{e}");
    assert_no_value(&e, &key);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing left behind"
    );
}
