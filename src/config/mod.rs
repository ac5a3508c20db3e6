//! Configuration: the TOML file's raw serde shape ([`raw`]) and the validated [`Config`] it becomes
//! ([`load`]). Everything downstream reads only the validated types below: names resolved, durations
//! parsed, credentials resolved into [`Secret`]s, schedules compiled. Field docs are written for
//! operators, in the words of the configuration reference, docs/config.md.

pub mod load;
pub mod raw;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chrono_tz::Tz;
use url::Url;

use crate::schedule::{Schedule, Window};
use crate::secret::Secret;

pub use load::{ConfigError, Problem, load_file, load_str};

/// A loaded, validated configuration. Built only by [`load`]; cheap to share behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub stores: BTreeMap<String, StoreConfig>,
    pub keys: Vec<KeyConfig>,
    pub coordination: Option<CoordinationConfig>,
    /// `max_concurrent_requests` of the providers and stores that set it, by name; the others get
    /// the defaults of `crate::limits`.
    pub limits: BTreeMap<String, usize>,
    /// `[notify.NAME]`: where notifications about keys are sent (each key names its own).
    pub notify: BTreeMap<String, NotifyTargetConfig>,
    /// Things worth saying that do not make the config invalid (manual-only keys, a schedule whose runs
    /// all fall outside the window, an `http` provider without `status`...). `check-config` prints them.
    pub warnings: Vec<String>,
}

impl Config {
    pub fn key(&self, name: &str) -> Option<&KeyConfig> {
        self.keys.iter().find(|k| k.name == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Journal, lock file and audit log live here. Default: `$STATE_DIRECTORY` or `./state`.
    pub state_dir: PathBuf,
    /// Metrics, health and admin API. Default `127.0.0.1:9464`.
    pub listen: SocketAddr,
    /// Bearer token for the admin API's POSTs; `None` = every POST answers 403.
    pub admin_token: Option<Secret>,
    /// Rotations running at once across all keys. Default 16.
    pub max_concurrent_rotations: usize,
    /// How often every key is compared with its destinations; `None` = reconcile disabled ("0s").
    pub reconcile_interval: Option<Duration>,
    pub log_format: LogFormat,
    /// Start with scheduled rotations paused.
    pub paused: bool,
}

/// A fleet has one provider per key, most of them `aos`: the far larger `http` description is boxed
/// so that an `aos` provider does not pay for it. (Boxing the common `aos` too, as clippy would have
/// it, would only add an allocation per provider.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ProviderConfig {
    Aos(AosProviderConfig),
    Http(Box<HttpProviderConfig>),
}

impl ProviderConfig {
    /// Whether the provider can keep two keys live at once.
    pub fn overlap(&self) -> Overlap {
        match self {
            ProviderConfig::Aos(_) => Overlap::None,
            ProviderConfig::Http(h) => h.overlap,
        }
    }
}

/// What a provider can do with a key's successor (docs/config.md, "overlap").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Issuing a new key invalidates the old one at once (`regenerate`): the `aos` portal, always.
    #[default]
    None,
    /// A second key can be created while the first stays valid, and the first revoked later by id:
    /// zero-downtime rotation.
    Dual,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::None => "none",
            Overlap::Dual => "dual",
        }
    }
}

/// The portal's paths under `base_url`. The defaults are borrowed: a fleet of providers on the
/// contract's paths allocates none.
#[derive(Debug, Clone)]
pub struct AosPaths {
    pub status: Cow<'static, str>,
    pub regenerate: Cow<'static, str>,
    pub auth_check: Cow<'static, str>,
}

impl Default for AosPaths {
    fn default() -> Self {
        AosPaths {
            status: Cow::Borrowed("/v1/api-keys/current"),
            regenerate: Cow::Borrowed("/v1/api-keys/regenerate"),
            auth_check: Cow::Borrowed("/v1/auth/check"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AosProviderConfig {
    pub base_url: Url,
    pub management_token: Secret,
    /// The business account the key must belong to; any other aborts the rotation.
    pub account_id: Option<String>,
    /// Per request. Default 10s.
    pub timeout: Duration,
    /// Sent with every regenerate. Default `keyrotd@<hostname>`.
    pub requested_by: String,
    pub paths: AosPaths,
    pub tls: TlsConfig,
    /// The longest `Retry-After` obeyed; a portal asking for more is waited on this long. Default 5m.
    pub max_retry_after: Duration,
}

#[derive(Debug, Clone)]
pub struct HttpAuth {
    pub header: String,
    pub prefix: String,
    pub value: Secret,
}

#[derive(Debug, Clone)]
pub struct HttpRegenerate {
    pub method: String,
    /// May contain `{key_id}`.
    pub url: String,
    pub body: Option<String>,
    pub secret_pointer: String,
    pub key_id_pointer: String,
}

/// `revoke`: retires a key by id (`{key_id}` in the URL). A 404 means it is already gone.
#[derive(Debug, Clone)]
pub struct HttpRevoke {
    pub method: String,
    /// Contains `{key_id}`; may contain `{key}` (the `[[keys]]` name).
    pub url: String,
}

/// `list`: the live key ids, to find a key a `create` made whose answer was lost.
#[derive(Debug, Clone)]
pub struct HttpList {
    pub method: String,
    /// May contain `{key}` (the `[[keys]]` name).
    pub url: String,
    /// JSON Pointer to the array of keys in the response.
    pub ids_pointer: String,
    /// JSON Pointer to the id inside each element (`/id`); absent: the elements are the ids.
    pub id_pointer: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HttpStatus {
    pub url: String,
    pub key_id_pointer: String,
    pub last_rotated_pointer: Option<String>,
    pub active_pointer: Option<String>,
    pub account_id_pointer: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HttpAuthCheck {
    pub url: String,
    pub header: String,
    pub prefix: String,
}

#[derive(Debug, Clone)]
pub struct HttpProviderConfig {
    pub auth: Option<HttpAuth>,
    /// `none` needs `regenerate`; `dual` needs `create` and `revoke`.
    pub overlap: Overlap,
    pub regenerate: Option<HttpRegenerate>,
    /// A second key while the first stays valid (`{key}` in `url` and `body` is the key's name).
    pub create: Option<HttpRegenerate>,
    pub revoke: Option<HttpRevoke>,
    pub list: Option<HttpList>,
    pub status: Option<HttpStatus>,
    pub auth_check: Option<HttpAuthCheck>,
    pub account_id: Option<String>,
    pub timeout: Duration,
    pub requested_by: String,
    pub tls: TlsConfig,
    /// As for `aos`. Default 5m.
    pub max_retry_after: Duration,
}

/// How an HTTPS client proves the server's identity and, optionally, its own: `ca_file`,
/// `client_cert` and `client_key` on Vault stores, providers, reload hooks and verify probes. Paths
/// are absolute (relative ones are resolved against the config file's directory at load). The
/// files are read and checked at load and read again whenever the client is built (start, reload).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsConfig {
    /// PEM bundle of CA certificates trusted in addition to the system's roots: a private CA.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate (chain) presented when the server asks for one (mTLS); with `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `client_cert`.
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Vault(VaultStoreConfig),
    Aws(AwsStoreConfig),
    File(FileStoreConfig),
}

impl StoreConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            StoreConfig::Vault(_) => "vault",
            StoreConfig::Aws(_) => "aws",
            StoreConfig::File(_) => "file",
        }
    }
}

#[derive(Debug, Clone)]
pub enum VaultAuth {
    Token(Secret),
    AppRole {
        role_id: Secret,
        secret_id: Secret,
        /// Auth mount of the AppRole method. Default "approle".
        mount: String,
    },
}

#[derive(Debug, Clone)]
pub struct VaultStoreConfig {
    pub address: Url,
    pub auth: VaultAuth,
    /// KV v2 mount. Default "secret".
    pub mount: String,
    pub namespace: Option<String>,
    /// Per request. Default 10s.
    pub timeout: Duration,
    /// Where the token was read from when it is `token = { file = ... }` (a Vault Agent sink, a
    /// systemd credential): the store reads it again when the file changes, and after a 403.
    pub token_file: Option<PathBuf>,
    pub tls: TlsConfig,
}

#[derive(Debug, Clone)]
pub struct AwsStoreConfig {
    /// Default: the standard AWS chain (AWS_REGION, profile...).
    pub region: Option<String>,
    /// A local emulator or a VPC endpoint.
    pub endpoint_url: Option<Url>,
    /// Per request. Default 10s.
    pub timeout: Duration,
    /// PEM CA certificates trusted in addition to the system's roots (a TLS-inspecting proxy, a
    /// private endpoint). The SDK's client takes no client certificate, so there is no mTLS here.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct FileStoreConfig {
    pub dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct CoordinationConfig {
    pub store: String,
    pub path: String,
    pub ttl: Duration,
}

/// One managed key: a `[[keys]]` entry.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub name: String,
    pub provider: String,
    pub schedule: Option<Schedule>,
    pub timezone: Tz,
    pub max_age: Option<Duration>,
    pub jitter: Duration,
    pub window: Option<Window>,
    pub catch_up: bool,
    /// `Duration::ZERO` = no watch.
    pub watch: Duration,
    pub watch_interval: Duration,
    pub store_deadline: Duration,
    pub auto_recover: bool,
    pub max_rerotations: u32,
    pub max_regenerations_per_day: u32,
    /// Who the key belongs to: shown by `status`, `/v1/keys`, `check-config` and `plan`, written into
    /// every audit record of the key and joined onto its alerts (`keyrotd_key_info`).
    /// Boxed: most of a fleet's keys have none, or share a few, and it is read rarely.
    pub owner: Option<Box<OwnerConfig>>,
    /// Scheduled rotations wait for an operator's approval (`None`: they run when due).
    pub approval: Option<ApprovalConfig>,
    /// `[notify.NAME]` targets told about this key's events.
    pub notify: Vec<String>,
    /// What a key keyrotd has never issued nor adopted gets when no destination holds its active key.
    pub on_first_contact: FirstContact,
    /// How a new key reaches the dependents: overlap, canary, confirmation, coalesced reloads, group.
    pub rollout: Rollout,
    pub destinations: Vec<DestinationConfig>,
    pub dependents: Vec<DependentConfig>,
}

/// How a key's new value rolls out (docs/lifecycle.md, "Two live keys").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// The key's provider's overlap: with `Dual` the old key stays valid until every dependent
    /// confirmed the new one.
    pub overlap: Overlap,
    /// `rollout = "canary"`: dependents with `canary = true` are told first and watched for
    /// `canary_watch`; the others only once they stay healthy. Dual keys only.
    pub canary: bool,
    /// How long the dependents have to confirm the new key before the rotation ends `degraded` with
    /// the old key still valid. Default 5m.
    pub confirm_deadline: Duration,
    /// When set, the old key is revoked this long after the new one was created even if a dependent
    /// never confirmed (logged and audited).
    pub revoke_after: Option<Duration>,
    /// How long canary dependents are watched before the others are told. Default 1m.
    pub canary_watch: Duration,
    /// Reloads of one reload target requested within this window become one reload.
    pub reload_coalesce: Option<Duration>,
    /// `[groups.NAME]` this key rotates with.
    pub group: Option<String>,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            overlap: Overlap::None,
            canary: false,
            confirm_deadline: Duration::from_secs(300),
            revoke_after: None,
            canary_watch: Duration::from_secs(60),
            reload_coalesce: None,
            group: None,
        }
    }
}

impl KeyConfig {
    /// Neither a schedule nor a max age: rotated only on demand.
    pub fn is_manual_only(&self) -> bool {
        self.schedule.is_none() && self.max_age.is_none()
    }

    /// The owner's name, as exported in `keyrotd_key_info` and written into audit records.
    pub fn owner_name(&self) -> Option<&str> {
        self.owner.as_ref().map(|o| o.name.as_str())
    }
}

/// `owner = { name, contact, runbook }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerConfig {
    /// A person or a team.
    pub name: String,
    /// How to reach them (an address, a chat channel, a pager handle).
    pub contact: Option<String>,
    /// Where the key's runbook lives.
    pub runbook: Option<Url>,
}

impl OwnerConfig {
    /// The owner as `/v1/keys`, `status --json`, `plan --checklist --json` and notifications show it.
    pub fn view(&self) -> OwnerView {
        OwnerView {
            name: self.name.clone(),
            contact: self.contact.clone(),
            runbook: self.runbook.as_ref().map(|u| u.to_string()),
        }
    }
}

/// A key's owner in JSON: `{"name", "contact", "runbook"}` (the last two `null` when not set).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OwnerView {
    pub name: String,
    pub contact: Option<String>,
    pub runbook: Option<String>,
}

impl std::fmt::Display for OwnerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)?;
        if let Some(c) = &self.contact {
            write!(f, " <{c}>")?;
        }
        if let Some(r) = &self.runbook {
            write!(f, ", runbook {r}")?;
        }
        Ok(())
    }
}

/// `approval = { required = true, timeout = "30m", notify = [...] }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalConfig {
    /// How long a due rotation waits for approval before it is skipped. Default 30m.
    pub timeout: Duration,
    /// Targets told that a rotation awaits approval, besides the key's own `notify`.
    pub notify: Vec<String>,
}

/// `on_first_contact`: what happens to a key keyrotd has never issued nor adopted, when no
/// destination holds the portal's active key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FirstContact {
    /// Report it (drift, status, notification, alert) and regenerate nothing until an operator
    /// rotates it. The default: the key in use today may live outside every destination.
    #[default]
    Report,
    /// Rotate it like any drifting key: scheduled rotations and reconcile populate it.
    Rotate,
}

impl FirstContact {
    pub fn as_str(self) -> &'static str {
        match self {
            FirstContact::Report => "report",
            FirstContact::Rotate => "rotate",
        }
    }
}

/// A `[notify.NAME]` target.
#[derive(Debug, Clone)]
pub struct NotifyTargetConfig {
    /// Events sent to it; empty = every event.
    pub events: std::collections::BTreeSet<crate::notify::targets::NoticeEvent>,
    /// Attempts after the first. Default 3.
    pub retries: u32,
    pub kind: NotifyKind,
}

#[derive(Debug, Clone)]
pub enum NotifyKind {
    /// JSON POST of the notice, optionally signed like reload hooks.
    Webhook {
        url: WebhookUrl,
        /// Default 5s.
        timeout: Duration,
        signing_key: Option<Secret>,
        tls: TlsConfig,
    },
    /// A program given the notice as JSON on stdin and as `KEYROTD_*` variables.
    Command {
        command: Vec<String>,
        /// Default 30s.
        timeout: Duration,
        env: BTreeMap<String, String>,
    },
}

/// A webhook's URL: written in the config, or read from a credential reference (a chat incoming
/// webhook's URL carries its token, so it is treated as a secret and never shown).
#[derive(Debug, Clone)]
pub enum WebhookUrl {
    Plain(Url),
    Secret {
        url: Secret,
        /// Where it was read from, for `check-config` (`env CHAT_URL`, `file /run/...`).
        from: String,
    },
}

impl std::fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WebhookUrl::Plain(u) => write!(f, "{u}"),
            WebhookUrl::Secret { from, .. } => write!(f, "(URL from {from})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationConfig {
    /// Name of a `[stores.*]` entry.
    pub store: String,
    pub target: DestinationTarget,
}

/// Where on its store a destination lives; the variant matches the store's kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DestinationTarget {
    /// KV v2 `path` under the store's mount; `field` is written, the other fields kept.
    Vault { path: String, field: String },
    /// `field` None = the whole SecretString is the key; Some = one field of a JSON object.
    Aws {
        secret_id: String,
        field: Option<String>,
    },
    /// Relative to the store's `dir`.
    File { file: String },
}

impl std::fmt::Display for DestinationTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DestinationTarget::Vault { path, field } => write!(f, "{path}#{field}"),
            DestinationTarget::Aws {
                secret_id,
                field: Some(field),
            } => write!(f, "{secret_id}#{field}"),
            DestinationTarget::Aws {
                secret_id,
                field: None,
            } => write!(f, "{secret_id}"),
            DestinationTarget::File { file } => write!(f, "{file}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DependentConfig {
    pub name: String,
    /// Store names; the hook is called once all of the key's destinations on these stores are
    /// confirmed. Defaults to every store the key has a destination on.
    pub reads_from: Vec<String>,
    pub verify: Option<VerifyConfig>,
    pub reload: Option<ReloadHook>,
    /// Told first in a canary rollout, and watched before the others are told.
    pub canary: bool,
    /// Where the dependent reports the fingerprint of the key it uses (dual keys' confirm phase).
    pub confirm: Option<ConfirmConfig>,
}

impl DependentConfig {
    /// What identifies the dependent across keys: its reload hook's URL, or its command line.
    pub fn reload_target(&self) -> Option<String> {
        self.reload.as_ref().map(ReloadHook::target)
    }
}

/// `confirm = { url, fingerprint_pointer }`: `GET url` answers JSON holding, at the pointer, the
/// fingerprint of the key the dependent uses (12 hex digits of SHA-256, as keyrotd logs it).
#[derive(Debug, Clone)]
pub struct ConfirmConfig {
    pub url: Url,
    pub fingerprint_pointer: String,
    /// Default 5s.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub url: Url,
    /// Default 200.
    pub expect_status: u16,
    /// Default 5s.
    pub timeout: Duration,
    pub tls: TlsConfig,
}

#[derive(Debug, Clone)]
pub enum ReloadHook {
    Http {
        url: Url,
        /// Default POST.
        method: String,
        /// Default 5s.
        timeout: Duration,
        signing_key: Option<Secret>,
        /// Attempts after the first. Default 2.
        retries: u32,
        tls: TlsConfig,
    },
    Command {
        /// argv; run without a shell.
        command: Vec<String>,
        /// Default 30s.
        timeout: Duration,
        /// Static environment added to PATH, LANG and the KEYROTD_* variables.
        env: BTreeMap<String, String>,
        /// Attempts after the first. Default 2.
        retries: u32,
    },
}

impl ReloadHook {
    /// The URL, or the command line joined by spaces: two dependents with one target are one
    /// service, reloaded once when reloads are coalesced.
    pub fn target(&self) -> String {
        match self {
            ReloadHook::Http { url, .. } => url.to_string(),
            ReloadHook::Command { command, .. } => command.join(" "),
        }
    }
}
