//! A small validated `Config` built by hand, for tests of the metrics, alert rules and dashboard that
//! need a configured keyrotd but no outside services: one scheduled key with a file destination and a
//! dependent with a reload hook and a verify, an owner, an approval and a chat notify target; and a
//! second key on a vendor that keeps two keys live (`overlap = "dual"`, with `revoke_after`), so that
//! the dual keys' series exist too.

use std::collections::BTreeMap;
use std::time::Duration;

use keyrotd::config::{
    AosPaths, AosProviderConfig, ApprovalConfig, Config, DaemonConfig, DependentConfig,
    DestinationConfig, DestinationTarget, FileStoreConfig, HttpProviderConfig, HttpRegenerate,
    HttpRevoke, KeyConfig, LogFormat, NotifyKind, NotifyTargetConfig, Overlap, OwnerConfig,
    ProviderConfig, ReloadHook, Rollout, StoreConfig, VerifyConfig, WebhookUrl,
};
use keyrotd::schedule::Schedule;

/// One scheduled key with a file destination and a dependent with hook and verify.
pub fn dependent(name: &str) -> DependentConfig {
    DependentConfig {
        name: name.into(),
        reads_from: vec![],
        verify: Some(VerifyConfig {
            url: "http://127.0.0.1:1/health".parse().expect("valid URL"),
            expect_status: 200,
            timeout: Duration::from_secs(5),
            tls: Default::default(),
        }),
        reload: Some(ReloadHook::Command {
            command: vec!["/bin/true".into()],
            timeout: Duration::from_secs(30),
            env: BTreeMap::new(),
            retries: 2,
        }),
        canary: false,
        confirm: None,
    }
}

pub fn config() -> Config {
    let key = KeyConfig {
        name: "billing".into(),
        provider: "aos".into(),
        schedule: Some(Schedule::parse("@weekly").expect("valid schedule")),
        timezone: chrono_tz::UTC,
        max_age: Some(Duration::from_secs(30 * 86400)),
        jitter: Duration::ZERO,
        window: None,
        catch_up: false,
        watch: Duration::from_secs(600),
        watch_interval: Duration::from_secs(30),
        store_deadline: Duration::from_secs(60),
        auto_recover: true,
        max_rerotations: 3,
        max_regenerations_per_day: 6,
        owner: Some(Box::new(OwnerConfig {
            name: "team-payments".into(),
            contact: Some("#payments-oncall".into()),
            runbook: None,
        })),
        approval: Some(ApprovalConfig {
            timeout: Duration::from_secs(1800),
            notify: Vec::new(),
        }),
        notify: vec!["chat".into()],
        on_first_contact: Default::default(),
        rollout: Default::default(),
        destinations: vec![DestinationConfig {
            store: "files".into(),
            target: DestinationTarget::File {
                file: "billing.key".into(),
            },
        }],
        dependents: vec![dependent("api")],
    };
    let dual = KeyConfig {
        name: "payments".into(),
        provider: "vendor".into(),
        destinations: vec![DestinationConfig {
            store: "files".into(),
            target: DestinationTarget::File {
                file: "payments.key".into(),
            },
        }],
        rollout: Rollout {
            overlap: Overlap::Dual,
            revoke_after: Some(Duration::from_secs(86400)),
            ..Rollout::default()
        },
        ..key.clone()
    };
    Config {
        daemon: DaemonConfig {
            state_dir: "/tmp/state".into(),
            listen: "127.0.0.1:9464".parse().expect("valid address"),
            admin_token: None,
            max_concurrent_rotations: 16,
            reconcile_interval: None,
            log_format: LogFormat::Json,
            paused: false,
        },
        providers: BTreeMap::from([
            (
                "vendor".to_string(),
                ProviderConfig::Http(Box::new(HttpProviderConfig {
                    auth: None,
                    overlap: Overlap::Dual,
                    regenerate: None,
                    create: Some(HttpRegenerate {
                        method: "POST".into(),
                        url: "http://127.0.0.1:1/v1/keys".into(),
                        body: None,
                        secret_pointer: "/secret".into(),
                        key_id_pointer: "/id".into(),
                    }),
                    revoke: Some(HttpRevoke {
                        method: "DELETE".into(),
                        url: "http://127.0.0.1:1/v1/keys/{key_id}".into(),
                    }),
                    list: None,
                    status: None,
                    auth_check: None,
                    account_id: None,
                    timeout: Duration::from_secs(10),
                    requested_by: "keyrotd@test".into(),
                    tls: Default::default(),
                    max_retry_after: keyrotd::backoff::DEFAULT_MAX_RETRY_AFTER,
                })),
            ),
            (
                "aos".to_string(),
                ProviderConfig::Aos(AosProviderConfig {
                    base_url: "http://127.0.0.1:1/".parse().expect("valid URL"),
                    management_token: "not-a-real-token".to_string().into(),
                    account_id: Some("acct-1".into()),
                    timeout: Duration::from_secs(10),
                    requested_by: "keyrotd@test".into(),
                    paths: AosPaths::default(),
                    tls: Default::default(),
                    max_retry_after: keyrotd::backoff::DEFAULT_MAX_RETRY_AFTER,
                }),
            ),
        ]),
        stores: BTreeMap::from([(
            "files".to_string(),
            StoreConfig::File(FileStoreConfig { dir: "/tmp".into() }),
        )]),
        keys: vec![key, dual],
        coordination: None,
        limits: Default::default(),
        notify: BTreeMap::from([(
            "chat".to_string(),
            NotifyTargetConfig {
                events: Default::default(),
                retries: 3,
                kind: NotifyKind::Webhook {
                    url: WebhookUrl::Plain(
                        "https://chat.example/hooks/keyrotd".parse().expect("URL"),
                    ),
                    timeout: Duration::from_secs(5),
                    signing_key: None,
                    tls: Default::default(),
                },
            },
        )]),
        warnings: vec![],
    }
}
