//! The `aos` provider against the real portal simulator (`keyrotd-sim portal`), and the dependent
//! simulator against the portal: what the engine will see when a portal rotates, loses a key in
//! transit, fails, rate-limits or refuses the management token.

use std::time::Duration;

use crate::support::sim::{Dependent, DependentOptions, DependentSource, Portal};
use keyrotd::provider::ProviderError;
use keyrotd::secret::{Secret, fingerprint};
use secrecy::ExposeSecret;
use serde_json::json;

fn secret(s: &str) -> Secret {
    Secret::from(s.to_string())
}

#[tokio::test]
async fn regenerate_invalidates_the_previous_key_and_status_follows() {
    let portal = Portal::start();
    let p = portal.provider();
    let old = portal.current_secret().await;
    let before = p.status().await.unwrap();
    assert_eq!(before.last_rotated, None, "never rotated yet");
    assert!(p.auth_check(&secret(&old)).await.unwrap().is_some());

    let new = p.regenerate("scheduled", None).await.unwrap();

    assert_ne!(new.key_id, before.key_id);
    assert!(
        p.auth_check(&secret(&old)).await.unwrap().is_none(),
        "the old key must die with the regenerate response"
    );
    let id = p
        .auth_check(&new.secret)
        .await
        .unwrap()
        .expect("new key works");
    assert_eq!(id.key_id.as_deref(), Some(new.key_id.as_str()));
    assert_eq!(id.account_id.as_deref(), Some("acct_42"));

    let after = p.status().await.unwrap();
    assert_eq!(after.key_id, new.key_id);
    assert!(after.last_rotated.is_some());
    assert_eq!(after.last_rotated, new.last_rotated);

    let state = portal.state().await;
    assert_eq!(state.fingerprint, fingerprint(&new.secret));
    assert_eq!(state.regenerations, 1);
    assert_eq!((state.auth_ok, state.auth_failed), (2, 1));
    assert_eq!(
        portal.issued_secrets().await.last().map(String::as_str),
        Some(new.secret.expose_secret())
    );
}

#[tokio::test]
async fn a_lost_response_is_ambiguous_while_the_portal_did_rotate() {
    let portal = Portal::start();
    let p = portal.provider();
    let before = portal.state().await;
    portal.faults(json!({"regenerate": {"lose_next": 1}})).await;

    let e = p.regenerate("scheduled", None).await.unwrap_err();

    assert!(matches!(e, ProviderError::Ambiguous { .. }), "{e:?}");
    let after = portal.state().await;
    assert_ne!(after.key_id, before.key_id, "the portal rotated");
    assert_eq!(after.regenerations, 1);
    assert_eq!(p.status().await.unwrap().key_id, after.key_id);
}

#[tokio::test]
async fn a_5xx_regenerate_is_ambiguous_and_status_shows_nothing_changed() {
    let portal = Portal::start();
    let p = portal.provider();
    let before = p.status().await.unwrap();
    portal
        .faults(json!({"regenerate": {"fail_next": 1, "status": 503}}))
        .await;

    let e = p.regenerate("scheduled", None).await.unwrap_err();

    // From the client's side a 5xx after sending cannot say whether the portal rotated, so it is
    // Ambiguous. Resolving it is the engine's job (docs/lifecycle.md#ambiguous-regenerate): it re-reads
    // status, sees the key id unchanged, and treats it as transient (retry with backoff).
    assert!(matches!(e, ProviderError::Ambiguous { .. }), "{e:?}");
    assert!(e.to_string().contains("503"), "{e}");
    assert_eq!(p.status().await.unwrap().key_id, before.key_id);
    assert_eq!(portal.state().await.regenerations, 0);

    // The fault was for one call only: the retry the engine would make succeeds.
    let new = p.regenerate("scheduled", None).await.unwrap();
    assert_ne!(new.key_id, before.key_id);
}

#[tokio::test]
async fn a_slow_regenerate_that_times_out_has_rotated_anyway() {
    let portal = Portal::start();
    let mut config = portal.aos_config();
    config.timeout = Duration::from_millis(300);
    let p = keyrotd::provider::aos::AosProvider::new("aos", &config).unwrap();
    let before = portal.state().await;
    portal
        .faults(json!({"regenerate": {"delay_ms": 2000}}))
        .await;

    let e = p.regenerate("scheduled").await.unwrap_err();

    assert!(matches!(e, ProviderError::Ambiguous { .. }), "{e:?}");
    assert_ne!(portal.state().await.key_id, before.key_id);
}

#[tokio::test]
async fn a_failing_status_is_transient() {
    let portal = Portal::start();
    let p = portal.provider();
    portal
        .faults(json!({"status": {"fail_next": 1, "status": 500}}))
        .await;

    let e = p.status().await.unwrap_err();

    assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
    assert!(e.to_string().contains("500"), "{e}");
    assert!(p.status().await.is_ok(), "only the next status fails");
}

#[tokio::test]
async fn rate_limits_carry_retry_after_and_rotate_nothing() {
    let portal = Portal::start();
    let p = portal.provider();
    let before = portal.state().await;
    portal.faults(json!({"rate_limit_next": 2})).await;

    for e in [
        p.status().await.unwrap_err(),
        p.regenerate("scheduled", None).await.unwrap_err(),
    ] {
        match e {
            ProviderError::RateLimited { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_secs(1))
            }
            e => panic!("wanted RateLimited, got {e:?}"),
        }
    }
    assert_eq!(portal.state().await.key_id, before.key_id);
    assert!(p.status().await.is_ok(), "the budget of 2 is used up");
}

#[tokio::test]
async fn a_wrong_management_token_is_an_auth_error_and_changes_nothing() {
    let portal = Portal::start();
    let mut config = portal.aos_config();
    config.management_token = secret("not-the-token");
    let p = keyrotd::provider::aos::AosProvider::new("aos", &config).unwrap();
    let before = portal.state().await;

    for e in [
        p.status().await.unwrap_err(),
        p.regenerate("scheduled").await.unwrap_err(),
    ] {
        assert!(
            matches!(e, ProviderError::Auth { status: 401, .. }),
            "{e:?}"
        );
        assert!(!e.to_string().contains("not-the-token"), "{e}");
    }
    assert_eq!(portal.state().await, before);
}

#[tokio::test]
async fn status_reports_what_the_portal_says_active_and_account_included() {
    // The portal's own account, different from what the provider config expects: status must report
    // the portal's, not echo the config.
    let portal = Portal::start_with(crate::support::sim::PortalOptions {
        account_id: Some("acct_portal_side".into()),
        ..Default::default()
    });
    let p = portal.provider();
    assert_eq!(p.expected_account(), Some("acct_42"));
    let s = p.status().await.unwrap();
    assert!(s.active);
    assert_eq!(s.account_id.as_deref(), Some("acct_portal_side"));
    assert_eq!(s.key_id, portal.state().await.key_id);

    portal
        .faults(json!({"active": false, "account_id": "other"}))
        .await;

    let s = p.status().await.unwrap();
    assert!(!s.active);
    assert_eq!(s.account_id.as_deref(), Some("other"));

    portal.reset().await;
    let s = p.status().await.unwrap();
    assert!(s.active, "reset clears faults");
    assert_eq!(s.account_id.as_deref(), Some("acct_portal_side"));
}

#[tokio::test]
async fn an_out_of_band_rotation_kills_the_key_we_knew() {
    let portal = Portal::start();
    let p = portal.provider();
    let known = portal.current_secret().await;

    let new_id = portal.rotate_out_of_band().await;

    assert_eq!(p.status().await.unwrap().key_id, new_id);
    assert!(p.auth_check(&secret(&known)).await.unwrap().is_none());
    assert_eq!(portal.state().await.out_of_band_rotations, 1);
}

#[tokio::test]
async fn a_seeded_portal_starts_with_the_given_secret() {
    let portal = Portal::start_with(crate::support::sim::PortalOptions {
        seed_secret: Some("aos_sk_live_seeded_for_the_demo".into()),
        ..Default::default()
    });
    let p = portal.provider();
    assert!(
        p.auth_check(&secret("aos_sk_live_seeded_for_the_demo"))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        portal.issued_secrets().await,
        vec!["aos_sk_live_seeded_for_the_demo".to_string()]
    );
}

#[tokio::test]
async fn a_regenerate_that_cannot_connect_is_transient() {
    // A port held (so nothing else can take it) that refuses every connection.
    let (refusing, _held) = crate::support::process::refusing_port();
    let portal = Portal::start();
    let mut config = portal.aos_config();
    config.base_url = format!("http://{refusing}").parse().unwrap();
    let p = keyrotd::provider::aos::AosProvider::new("aos", &config).unwrap();

    let e = p.regenerate("scheduled").await.unwrap_err();

    assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
}

#[tokio::test]
async fn a_dependent_fails_after_regenerate_until_it_reloads_the_new_key() {
    let portal = Portal::start();
    let p = portal.provider();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("billing-api.key");
    std::fs::write(&key_file, portal.current_secret().await).unwrap();
    let dependent = Dependent::start(portal.url(), DependentSource::File(key_file.clone()));
    assert_eq!(dependent.verify().await, 200, "it loaded the key at start");

    let new = p.regenerate("scheduled", None).await.unwrap();
    assert_eq!(dependent.verify().await, 401, "its key died at the portal");

    // Reloading before the destination holds the new key changes nothing.
    assert_eq!(dependent.reload(&json!({"key": "billing-api"})).await, 200);
    assert_eq!(dependent.verify().await, 401);

    std::fs::write(&key_file, new.secret.expose_secret()).unwrap();
    assert_eq!(dependent.reload(&json!({"key": "billing-api"})).await, 200);
    assert_eq!(dependent.verify().await, 200);

    let state = dependent.state().await;
    assert_eq!(state.reloads, 2);
    assert_eq!(state.fingerprint, Some(fingerprint(&new.secret)));
    assert_eq!(state.last_reload_body, Some(json!({"key": "billing-api"})));
    assert!(state.auth_failed >= 2, "{state:?}");
    assert!(
        portal.state().await.auth_failed >= 2,
        "the portal saw the failures"
    );
}

#[tokio::test]
async fn a_dependent_with_a_signing_key_refuses_unsigned_reloads_and_honours_faults() {
    let portal = Portal::start();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("k");
    std::fs::write(&key_file, portal.current_secret().await).unwrap();
    let mut options = DependentOptions::new(DependentSource::File(key_file));
    options.signing_key = Some("hook-key".into());
    let dependent = Dependent::start_with(portal.url(), options);

    assert_eq!(dependent.reload(&json!({"key": "k"})).await, 401);

    let body = br#"{"key":"k","rotation_id":"r1"}"#.to_vec();
    let now = chrono::Utc::now().timestamp();
    let signed_at = |ts: i64| {
        reqwest::Client::new()
            .post(dependent.reload_url())
            .header(keyrotd::notify::TIMESTAMP_HEADER, ts.to_string())
            .header(
                keyrotd::notify::SIGNATURE_HEADER,
                keyrotd::notify::signature(b"hook-key", ts, &body),
            )
            .body(body.clone())
    };
    let signed = || signed_at(now);
    assert_eq!(signed().send().await.unwrap().status().as_u16(), 200);
    // A request signed (or captured) ten minutes ago is refused as a replay.
    assert_eq!(
        signed_at(now - 600).send().await.unwrap().status().as_u16(),
        401
    );

    dependent.faults(json!({"fail_reload_next": 1})).await;
    assert_eq!(signed().send().await.unwrap().status().as_u16(), 503);
    assert_eq!(signed().send().await.unwrap().status().as_u16(), 200);

    let requests = dependent.requests().await;
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![401, 200, 401, 503, 200]);
    assert_eq!(
        requests[1].headers.get("x-keyrotd-signature"),
        Some(&keyrotd::notify::signature(b"hook-key", now, &body))
    );
    assert_eq!(dependent.state().await.reloads, 2);
}

#[tokio::test]
async fn a_dependent_that_ignores_reloads_keeps_the_old_key() {
    let portal = Portal::start();
    let p = portal.provider();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("k");
    std::fs::write(&key_file, portal.current_secret().await).unwrap();
    let dependent = Dependent::start(portal.url(), DependentSource::File(key_file.clone()));
    dependent.faults(json!({"ignore_reload": true})).await;

    let new = p.regenerate("scheduled", None).await.unwrap();
    std::fs::write(&key_file, new.secret.expose_secret()).unwrap();

    assert_eq!(dependent.reload(&json!({})).await, 200);
    assert_eq!(dependent.verify().await, 401);
}
