//! Stage 1: the real client (AosProvider, VaultStore, AwsStore, FileStore, Notifier) meets the real
//! fault, and what it returns is recorded. Each call also proves that the error quotes no secret the
//! request carried (the fault server echoes the whole request back) and that no 100 MB body was read.

use std::collections::BTreeMap;
use std::time::Duration;

use keyrotd::config::{
    AosPaths, AosProviderConfig, AwsStoreConfig, DestinationTarget, FileStoreConfig, ReloadHook,
    VaultAuth, VaultStoreConfig, VerifyConfig,
};
use keyrotd::notify::{HookError, Notifier, Probe, ReloadNotice};
use keyrotd::provider::ProviderError;
use keyrotd::provider::aos::AosProvider;
use keyrotd::secret::{Secret, fingerprint};
use keyrotd::store::{StoreError, WriteRequest};
use keyrotd::store::{aws::AwsStore, file::FileStore, vault::VaultStore};

use super::model::{Component, Fault, Op};
use super::server::{Answer, ECHO, FaultServer, Mount, Refusing};

/// Every credential and secret the stage's requests carry: none may appear in what a client reports.
pub const MANAGEMENT_TOKEN: &str = "mgmt-token-canary-5d1e7a";
pub const VAULT_TOKEN: &str = "vault-token-canary-82bf04";
pub const SECRET: &str = "aos_sk_live_canary_secret_31c9e6f0";
pub const SIGNING_KEY: &str = "hook-signing-canary-77a0c2";
pub const HOOK_ENV_TOKEN: &str = "hook-env-canary-0b94de";
const SECRETS: [&str; 5] = [
    MANAGEMENT_TOKEN,
    VAULT_TOKEN,
    SECRET,
    SIGNING_KEY,
    HOOK_ENV_TOKEN,
];

/// The client's timeout against a stalled server: short, so the stall is a timeout at once.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// The client's timeout against every other fault: long enough that a loaded machine never turns an
/// answer into a timeout.
const PATIENT: Duration = Duration::from_secs(15);

fn timeout_for(fault: Fault) -> Duration {
    if fault == Fault::Timeout {
        TIMEOUT
    } else {
        PATIENT
    }
}
/// A 100 MB body.
pub const HUGE: u64 = 100 << 20;
/// More than this many body bytes taken by one connection from a 100 MB answer means the client read
/// it rather than stopped (loopback socket buffers hold a few MB by themselves).
pub const READ_LIMIT: u64 = 16 << 20;

/// What a client returned.
#[derive(Clone, Debug)]
pub enum Reported {
    /// The call succeeded; what it said.
    Answered(&'static str),
    Provider(ProviderError),
    Store(StoreError),
    Hook(HookError),
    Probe(Probe),
    /// The fault is made for real in the engine's own state dir (stage 2 only).
    InPlace,
}

impl Reported {
    /// The error kind in a word or two (the engine decides from it).
    pub fn kind(&self) -> String {
        match self {
            Reported::Answered(what) => format!("ok: {what}"),
            Reported::Provider(e) => match e {
                ProviderError::Auth { .. } => "auth".into(),
                ProviderError::RateLimited { retry_after, .. } => {
                    format!("rate limited ({}s)", retry_after.as_secs())
                }
                ProviderError::Transient { .. } => "transient".into(),
                ProviderError::Ambiguous { .. } => "ambiguous".into(),
                ProviderError::Permanent { .. } => "permanent".into(),
            },
            Reported::Store(e) => format!("{:?}", e.kind).to_lowercase(),
            Reported::Hook(e) => match e {
                HookError::Status(c) => format!("HTTP {c}"),
                HookError::Timeout { .. } => "timeout".into(),
                HookError::Request(_) => "request failed".into(),
                HookError::Spawn { .. } => "cannot start".into(),
                HookError::Exit { .. } => "exit".into(),
            },
            Reported::Probe(p) => match p {
                Probe::Ok => "ok".into(),
                Probe::AuthFailure(c) => format!("auth failure ({c})"),
                Probe::Unexpected(c) => format!("unexpected ({c})"),
                Probe::Unreachable(_) => "unreachable".into(),
            },
            Reported::InPlace => "-".into(),
        }
    }

    /// The whole message, as keyrotd would log it.
    pub fn message(&self) -> String {
        match self {
            Reported::Answered(_) | Reported::InPlace => String::new(),
            Reported::Provider(e) => e.to_string(),
            Reported::Store(e) => e.to_string(),
            // The kind says it all.
            Reported::Hook(HookError::Status(_)) => String::new(),
            Reported::Hook(e) => e.to_string(),
            Reported::Probe(Probe::Unreachable(why)) => why.clone(),
            Reported::Probe(_) => String::new(),
        }
    }
}

/// One client call against one fault, with what it proved besides its answer.
#[derive(Clone, Debug)]
pub struct Met {
    pub reported: Reported,
    /// The most body bytes one connection took from a 100 MB answer; 0 otherwise.
    pub body_bytes_taken: u64,
    /// Requests the server read whole.
    pub requests: u64,
    /// Text of the fault's own making that a message may name: the server's address (`{server}` in
    /// the docs) or the temporary directory (`{dir}`).
    pub server: String,
}

/// The server behind a network fault; `None` for a refused connection.
async fn server_for(component: Component, fault: Fault) -> (Option<FaultServer>, Option<Refusing>) {
    let echo = format!("{{\"error\": \"upstream failed: {ECHO}\"}}");
    let answer = match fault {
        Fault::Refused => return (None, Some(Refusing::new())),
        Fault::Timeout => Answer::Stall,
        Fault::ServerError => Answer::status(503, &echo),
        Fault::Unauthorized => {
            let code = if matches!(component, Component::Vault | Component::Aws) {
                403
            } else {
                401
            };
            Answer::status(code, &echo)
        }
        Fault::RateLimited => Answer::status(429, &echo).with_header("retry-after", "86400"),
        Fault::MalformedJson => Answer::status(
            200,
            &format!("{{\"key_id\": \"ak_2\", \"secret\": \"{ECHO}"),
        ),
        Fault::Huge => Answer::Stream {
            status: 200,
            len: HUGE,
        },
        Fault::ResetAfterCommit => Answer::Reset,
        Fault::Redirect => {
            Answer::status(302, &echo).with_header("location", "http://127.0.0.1:1/")
        }
        Fault::DiskFull | Fault::ReadOnly | Fault::Symlink => unreachable!("not a network fault"),
    };
    (Some(FaultServer::start(answer).await), None)
}

/// Runs `component`'s client operation `op` against `fault`.
pub async fn meet(component: Component, fault: Fault, op: Op) -> Met {
    match component {
        Component::File => return file(fault, op).await,
        Component::CommandHook => return command(fault).await,
        Component::StateDir => {
            return Met {
                reported: Reported::InPlace,
                body_bytes_taken: 0,
                requests: 0,
                server: String::new(),
            };
        }
        _ => {}
    }
    let (server, refusing) = server_for(component, fault).await;
    let url = match (&server, &refusing) {
        (Some(s), _) => s.url(),
        (_, Some(r)) => r.url(),
        _ => unreachable!(),
    };
    // A hung client is a failure of its own; the bound only keeps the suite from hanging with it.
    let call = call(component, op, &url, timeout_for(fault));
    let reported = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .unwrap_or_else(|_| panic!("{component:?} {op:?} against {fault:?} hung for 60 s"));
    Met {
        reported,
        body_bytes_taken: server.as_ref().map_or(0, |s| s.body_bytes_sent()),
        requests: server.as_ref().map_or(0, |s| s.requests()),
        server: url.trim_start_matches("http://").to_string(),
    }
}

async fn call(component: Component, op: Op, url: &str, timeout: Duration) -> Reported {
    match component {
        Component::PortalStatus | Component::PortalRegenerate | Component::PortalAuthCheck => {
            portal(op, url, timeout).await
        }
        Component::Vault => vault(op, url, timeout).await,
        Component::Aws => aws(op, url, timeout).await,
        Component::HttpHook => http_hook(url, timeout).await,
        Component::Probe => probe(url, timeout).await,
        _ => unreachable!("{component:?} is not a network client"),
    }
}

async fn portal(op: Op, url: &str, timeout: Duration) -> Reported {
    let p = AosProvider::new(
        "portal",
        &AosProviderConfig {
            base_url: url.parse().expect("url"),
            management_token: Secret::from(MANAGEMENT_TOKEN.to_string()),
            account_id: Some("acct".into()),
            timeout,
            requested_by: "keyrotd@matrix".into(),
            paths: AosPaths::default(),
            tls: Default::default(),
            max_retry_after: keyrotd::backoff::DEFAULT_MAX_RETRY_AFTER,
        },
    )
    .expect("portal client");
    let r = match op {
        Op::Status => p.status().await.map(|_| "status read"),
        Op::Regenerate => p.regenerate("matrix").await.map(|_| "issued"),
        Op::AuthCheck => p
            .auth_check(&Secret::from(SECRET.to_string()))
            .await
            .map(|id| {
                if id.is_some() {
                    "authenticates"
                } else {
                    "refused the secret"
                }
            }),
        _ => unreachable!(),
    };
    r.map_or_else(Reported::Provider, Reported::Answered)
}

fn write_request<'a>(secret: &'a Secret, fp: &'a str) -> WriteRequest<'a> {
    WriteRequest {
        key: "billing",
        rotation_id: uuid::Uuid::nil(),
        key_id: "ak_2",
        secret,
        fingerprint: fp,
        rotated_at: chrono::Utc::now(),
        fence: None,
    }
}

async fn vault(op: Op, url: &str, timeout: Duration) -> Reported {
    let store = VaultStore::new(
        "vault",
        &VaultStoreConfig {
            address: url.parse().expect("url"),
            auth: VaultAuth::Token(Secret::from(VAULT_TOKEN.to_string())),
            mount: "secret".into(),
            namespace: None,
            timeout,
            token_file: None,
            tls: Default::default(),
        },
    )
    .expect("vault client");
    let target = DestinationTarget::Vault {
        path: "apps/billing".into(),
        field: "api_key".into(),
    };
    let secret = Secret::from(SECRET.to_string());
    let fp = fingerprint(&secret);
    let r = match op {
        Op::StorePreflight => store.preflight(&target).await.map(|_| "writable"),
        Op::StoreWrite => {
            let prepared = keyrotd::store::Prepared::none();
            store
                .write(&target, &write_request(&secret, &fp), &prepared)
                .await
                .map(|_| "written")
        }
        Op::StoreRead => store.read(&target).await.map(|_| "read"),
        _ => unreachable!(),
    };
    r.map_or_else(Reported::Store, Reported::Answered)
}

async fn aws(op: Op, url: &str, timeout: Duration) -> Reported {
    use aws_sdk_secretsmanager::config::{Credentials, Region};
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .credentials_provider(Credentials::new("test", "test", None, None, "matrix"))
        .region(Region::new("us-east-1"))
        .load()
        .await;
    let config = AwsStoreConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(url.parse().expect("url")),
        timeout,
        ca_file: None,
    };
    let store = AwsStore::with_sdk_config("aws", &config, &sdk).expect("aws client");
    let target = DestinationTarget::Aws {
        secret_id: "prod/billing".into(),
        field: Some("api_key".into()),
    };
    let secret = Secret::from(SECRET.to_string());
    let fp = fingerprint(&secret);
    let r = match op {
        Op::StorePreflight => store.preflight(&target).await.map(|_| "writable"),
        Op::StoreWrite => {
            let prepared = keyrotd::store::Prepared::none();
            store
                .write(&target, &write_request(&secret, &fp), &prepared)
                .await
                .map(|_| "written")
        }
        Op::StoreRead => store.read(&target).await.map(|_| "read"),
        _ => unreachable!(),
    };
    r.map_or_else(Reported::Store, Reported::Answered)
}

fn notice() -> ReloadNotice<'static> {
    ReloadNotice {
        key: "billing",
        rotation_id: uuid::Uuid::nil(),
        key_id: "ak_2",
        rotated_at: chrono::Utc::now(),
        keys: &[],
    }
}

async fn http_hook(url: &str, timeout: Duration) -> Reported {
    let hook = ReloadHook::Http {
        url: format!("{url}/reload").parse().expect("url"),
        method: "POST".into(),
        timeout,
        signing_key: Some(Secret::from(SIGNING_KEY.to_string())),
        retries: 0,
        tls: Default::default(),
    };
    match Notifier::new().reload(&hook, &notice()).await {
        Ok(()) => Reported::Answered("reloaded"),
        Err(e) => Reported::Hook(e),
    }
}

async fn probe(url: &str, timeout: Duration) -> Reported {
    let verify = VerifyConfig {
        url: format!("{url}/health").parse().expect("url"),
        expect_status: 200,
        timeout,
        tls: Default::default(),
    };
    Reported::Probe(Notifier::new().probe(&verify).await)
}

/// A command hook that meets its fault (the command is the fault).
async fn command(fault: Fault) -> Met {
    let dir = tempfile::tempdir().expect("temp dir");
    let marker = dir.path().join("reloaded");
    let sh = |script: String| vec!["/bin/sh".to_string(), "-c".to_string(), script];
    let (argv, timeout) = match fault {
        Fault::Refused => (vec!["/nonexistent/reload-hook".to_string()], TIMEOUT),
        Fault::Timeout => (sh("sleep 5".into()), TIMEOUT),
        Fault::ServerError => (
            sh("echo \"reload failed with token $TOKEN\"; exit 1".into()),
            Duration::from_secs(10),
        ),
        Fault::Huge => (
            sh("head -c 104857600 /dev/zero | tr '\\0' x".into()),
            Duration::from_secs(30),
        ),
        Fault::ResetAfterCommit => (
            sh(format!("touch {}; kill -9 $$", marker.display())),
            Duration::from_secs(10),
        ),
        other => unreachable!("{other:?} is not a command hook fault"),
    };
    let hook = ReloadHook::Command {
        command: argv,
        timeout,
        env: BTreeMap::from([("TOKEN".to_string(), HOOK_ENV_TOKEN.to_string())]),
        retries: 0,
    };
    let reported = match Notifier::new().reload(&hook, &notice()).await {
        Ok(()) => Reported::Answered("reloaded"),
        Err(e) => Reported::Hook(e),
    };
    if fault == Fault::ResetAfterCommit {
        assert!(marker.exists(), "the killed hook did its work first");
    }
    Met {
        reported,
        body_bytes_taken: 0,
        requests: 0,
        server: dir.path().display().to_string(),
    }
}

/// A file store whose directory (a tmpfs of its own) meets the fault.
async fn file(fault: Fault, op: Op) -> Met {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("keys");
    let mount = Mount::tmpfs(&keys, "512k");
    let dest = keys.join("billing.key");
    std::fs::write(&dest, "aos_sk_live_the_old_key").expect("old key");
    let _ro = match fault {
        Fault::DiskFull => {
            mount.fill();
            None
        }
        Fault::ReadOnly => Some(Mount::read_only(&keys)),
        Fault::Symlink => {
            std::fs::remove_file(&dest).expect("rm");
            std::os::unix::fs::symlink("/dev/zero", &dest).expect("symlink");
            None
        }
        Fault::Huge => {
            // Sparse: 100 MB to a reader, nothing on the tmpfs.
            let f = std::fs::File::create(&dest).expect("create");
            f.set_len(HUGE).expect("set_len");
            None
        }
        other => unreachable!("{other:?} is not a file fault"),
    };
    let store = FileStore::new("files", &FileStoreConfig { dir: keys.clone() });
    let target = DestinationTarget::File {
        file: "billing.key".into(),
    };
    let secret = Secret::from(SECRET.to_string());
    let fp = fingerprint(&secret);
    let r = match op {
        Op::StorePreflight => store.preflight(&target).await.map(|_| "writable"),
        Op::StoreWrite => store
            .write(&target, &write_request(&secret, &fp))
            .await
            .map(|_| "written"),
        Op::StoreRead => store.read(&target).await.map(|_| "read"),
        _ => unreachable!(),
    };
    drop(_ro);
    drop(mount);
    Met {
        reported: r.map_or_else(Reported::Store, Reported::Answered),
        body_bytes_taken: 0,
        requests: 0,
        server: keys.display().to_string(),
    }
}

/// What must hold of every client's answer, whatever the fault: no secret in its words, no 100 MB
/// body read. Returns the problems found.
pub fn check(met: &Met) -> Vec<String> {
    let mut problems = Vec::new();
    let text = format!("{} {:?}", met.reported.message(), met.reported);
    for s in SECRETS {
        if text.contains(s) || text.contains(&s[..12]) {
            problems.push(format!("the error quotes a secret ({}...)", &s[..6]));
        }
    }
    if met.body_bytes_taken > READ_LIMIT {
        problems.push(format!(
            "the client read {} MB of a 100 MB body",
            met.body_bytes_taken >> 20
        ));
    }
    problems
}
