//! TOML + `KEYROTD__` environment overrides -> raw -> validated [`Config`]. Every problem reported at
//! once, each naming its field path.
//!
//! The pipeline: the `config` crate merges the file with the `KEYROTD__SECTION__FIELD` variables (only
//! those: `KEYROTD_CONFIG` or `KEYROTD_ADMIN_TOKEN` have a single underscore and are never fields);
//! [`raw::from_value`] checks the shape; [`validate`] checks meaning (names that refer to other
//! sections, durations, URLs, schedules...), resolves credential references and applies defaults.
//!
//! Loading is a pure function of the text, the environment and the files that credential references
//! point at. No error message ever contains a credential's value: credential fields refuse inline values
//! without repeating them, and references are reported by variable or file name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::Utc;
use chrono_tz::Tz;
use url::Url;

use super::raw::{self, Num, RawSecret};
use super::{
    AosPaths, AosProviderConfig, AwsStoreConfig, Config, ConfirmConfig, CoordinationConfig,
    DaemonConfig, DependentConfig, DestinationConfig, DestinationTarget, FileStoreConfig, HttpAuth,
    HttpAuthCheck, HttpList, HttpProviderConfig, HttpRegenerate, HttpRevoke, HttpStatus, KeyConfig,
    LogFormat, Overlap, ProviderConfig, ReloadHook, Rollout, StoreConfig, TlsConfig, VaultAuth,
    VaultStoreConfig, VerifyConfig,
};
use super::{
    ApprovalConfig, FirstContact, NotifyKind, NotifyTargetConfig, OwnerConfig, WebhookUrl,
};
use crate::http_client::ClientError;
use crate::notify::targets::NoticeEvent;
use crate::schedule::{self, Schedule, Window};
use crate::secret::Secret;
use crate::secret::SecretRef;

/// The prefix of environment overrides: `KEYROTD__DAEMON__LISTEN` sets `daemon.listen`.
pub const ENV_PREFIX: &str = "KEYROTD__";

/// One thing wrong with a config, naming its field, e.g. `keys[1].destinations[0].store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    /// The file was read, and this is everything wrong with it.
    #[error("{} problem(s) in the configuration", .0.len())]
    Invalid(Vec<Problem>),
}

/// Loads and validates the file at `path`, with the process's `KEYROTD__*` overrides.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let overrides = process_overrides();
    let doc = merge(&text, &overrides).map_err(|p| ConfigError::Invalid(vec![p]))?;
    validate(raw::read(&doc), path.parent().map(Path::to_path_buf))
}

fn process_overrides() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect()
}

/// Loads and validates TOML text, with the process's `KEYROTD__*` overrides.
pub fn load_str(text: &str) -> Result<Config, ConfigError> {
    load_str_with_overrides(text, &process_overrides())
}

/// [`load_str`] with the given variables in place of the process environment's overrides (only names
/// starting with `KEYROTD__` take effect). Credential references are still resolved from the process.
pub fn load_str_with_overrides(
    text: &str,
    overrides: &BTreeMap<String, String>,
) -> Result<Config, ConfigError> {
    let doc = merge(text, overrides).map_err(|p| ConfigError::Invalid(vec![p]))?;
    validate(raw::read(&doc), None)
}

/// The file with the overrides applied, as one JSON-like document.
fn merge(text: &str, overrides: &BTreeMap<String, String>) -> Result<serde_json::Value, Problem> {
    // The `config` crate lowercases variable names and matches the prefix case-insensitively, so
    // filter on the exact spelling first: `keyrotd__x` is not an override.
    let env: config::Map<String, String> = overrides
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.len() > ENV_PREFIX.len())
        .map(|(k, v)| (index_segments(k), v.clone()))
        .collect();
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("KEYROTD")
                .separator("__")
                .source(Some(env)),
        )
        .build()
        .map_err(|e| Problem::new("", format!("not valid TOML: {}", syntax_message(&e))))?;
    built
        .try_deserialize::<serde_json::Value>()
        .map_err(|e| Problem::new("", format!("cannot read the configuration: {e}")))
}

/// `KEYROTD__KEYS__0__WATCH` -> `KEYROTD__KEYS[0]__WATCH`, so that a number addresses an entry of
/// an array (`keys[0].watch`) instead of turning the array into a table.
fn index_segments(name: &str) -> String {
    let rest = &name[ENV_PREFIX.len()..];
    let mut out = String::from(ENV_PREFIX);
    for (n, segment) in rest.split("__").enumerate() {
        if n > 0 && !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if n > 0 {
                out.push_str("__");
            }
            out.push_str(segment);
        }
    }
    out
}

/// A TOML syntax error without the excerpt of the offending line (which could be a credential someone
/// meant to quote).
fn syntax_message(e: &config::ConfigError) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains('|') && !l.starts_with('^'))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Collects problems and warnings while the validated config is built.
struct Check {
    problems: Vec<Problem>,
    warnings: Vec<String>,
    /// The config file's directory: a relative `{ file = ... }` reference is read from there.
    base_dir: Option<PathBuf>,
    /// Every schedule expression parsed so far: a fleet of keys on one schedule shares one parse.
    schedules: HashMap<String, Schedule>,
}

impl Check {
    /// `text` parsed, or the earlier parse of the same text.
    fn schedule(&mut self, text: &str) -> Result<Schedule, String> {
        if let Some(parsed) = self.schedules.get(text) {
            return Ok(parsed.clone());
        }
        let parsed = Schedule::parse(text)?;
        self.schedules.insert(text.to_owned(), parsed.clone());
        Ok(parsed)
    }

    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem::new(path, message));
    }

    /// A duration field. `zero_ok`: whether "0s" is allowed (it means "off" where it is).
    fn duration(
        &mut self,
        path: &str,
        text: Option<&String>,
        default: Duration,
        zero_ok: bool,
    ) -> Duration {
        let Some(text) = text else { return default };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d.is_zero() && !zero_ok => {
                self.problem(path, "must be longer than 0s");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.problem(
                    path,
                    format!("invalid duration {text:?} ({e}); write e.g. \"90s\", \"10m\", \"36h\" or \"30d\""),
                );
                default
            }
        }
    }

    /// An http(s) URL.
    fn url(&mut self, path: &str, text: &str) -> Option<Url> {
        match Url::parse(text) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
            Ok(u) => {
                self.problem(
                    path,
                    format!(
                        "{text:?} must be an http:// or https:// URL (scheme {:?})",
                        u.scheme()
                    ),
                );
                None
            }
            Err(e) => {
                self.problem(path, format!("invalid URL {text:?}: {e}"));
                None
            }
        }
    }

    /// Refuses a plain `http://` URL that would carry a credential to a host other than loopback,
    /// unless the section opts in with `allow_insecure_http = true`. `section` is the table's path.
    fn plaintext_credential(&mut self, path: &str, section: &str, url: &str, allowed: bool) {
        if allowed {
            return;
        }
        let Ok(u) = Url::parse(&url.replace("{key_id}", "KEY_ID").replace("{key}", "KEY")) else {
            return; // `url` reports it
        };
        if u.scheme() != "http" || is_loopback_host(&u) {
            return;
        }
        self.problem(
            path,
            format!(
                "http:// would send a credential in plain text to {}: use https://, or set `allow_insecure_http = true` in [{section}] if the network between them is trusted",
                u.host_str().unwrap_or("?")
            ),
        );
    }

    /// A URL that may contain `{key_id}` or `{key}`; kept as text.
    fn url_template(&mut self, path: &str, text: &str) -> String {
        let _ = self.url(
            path,
            &text.replace("{key_id}", "KEY_ID").replace("{key}", "KEY"),
        );
        text.to_string()
    }

    fn secret(&mut self, path: &str, raw: &RawSecret) -> Option<Secret> {
        match raw.0.resolve_in(self.base_dir.as_deref()) {
            Ok(s) => Some(s),
            Err(e) => {
                self.problem(path, e.to_string());
                None
            }
        }
    }

    /// `ca_file`, `client_cert`, `client_key` of the table at `base`: relative paths resolved
    /// against the config file's directory, and the files read and parsed now, so that a bad one
    /// is a load error naming its field.
    fn tls(
        &mut self,
        base: &str,
        ca_file: Option<PathBuf>,
        client_cert: Option<PathBuf>,
        client_key: Option<PathBuf>,
    ) -> TlsConfig {
        let resolve = |p: PathBuf| match &self.base_dir {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        };
        let tls = TlsConfig {
            ca_file: ca_file.map(resolve),
            client_cert: client_cert.map(resolve),
            client_key: client_key.map(resolve),
        };
        if let Err(e) = crate::http_client::check_tls(&tls) {
            let field = match &e {
                ClientError::Read { field, .. } | ClientError::NoCertificate { field, .. } => field,
                ClientError::BadIdentity { .. } | ClientError::Build(_) => "client_cert",
                ClientError::HalfIdentity if tls.client_cert.is_none() => "client_cert",
                ClientError::HalfIdentity => "client_key",
            };
            self.problem(format!("{base}.{field}"), e.to_string());
        }
        tls
    }

    fn count(&mut self, path: &str, n: Option<Num>, default: u32, min: u32) -> u32 {
        let Some(Num(n)) = n else { return default };
        match u32::try_from(n) {
            Ok(n) if n >= min => n,
            _ => {
                self.problem(
                    path,
                    format!("must be a whole number from {min} to {}", u32::MAX),
                );
                default
            }
        }
    }

    fn non_empty(&mut self, path: &str, text: &str) {
        if text.trim().is_empty() {
            self.problem(path, "must not be empty");
        }
    }

    fn json_pointer(&mut self, path: &str, text: &str) {
        if !text.is_empty() && !text.starts_with('/') {
            self.problem(
                path,
                format!("{text:?} is not a JSON Pointer (RFC 6901): write e.g. \"/secret\""),
            );
        }
    }
}

const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

/// `localhost`, 127.0.0.0/8 or ::1: traffic that never leaves the machine.
fn is_loopback_host(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// `max_retry_after`: positive, default [`crate::backoff::DEFAULT_MAX_RETRY_AFTER`].
fn max_retry_after(c: &mut Check, base: &str, text: Option<&String>) -> Duration {
    c.duration(
        &format!("{base}.max_retry_after"),
        text,
        crate::backoff::DEFAULT_MAX_RETRY_AFTER,
        false,
    )
}

fn default_requested_by() -> String {
    format!("keyrotd@{}", gethostname::gethostname().to_string_lossy())
}

fn default_state_dir() -> PathBuf {
    // systemd's StateDirectory= may list several, separated by colons; the first is ours.
    match std::env::var("STATE_DIRECTORY") {
        Ok(v) if !v.is_empty() => PathBuf::from(v.split(':').next().unwrap_or(&v)),
        _ => PathBuf::from("./state"),
    }
}

/// A well-formed key name: `[a-z0-9][a-z0-9_-]*`.
pub fn is_valid_key_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn known(names: impl Iterator<Item = impl AsRef<str>>) -> String {
    let names: Vec<String> = names.map(|n| n.as_ref().to_string()).collect();
    if names.is_empty() {
        "none are configured".into()
    } else {
        format!("known: {}", names.join(", "))
    }
}

/// "a vault", "an aws", "a file".
fn article(kind: &str) -> String {
    if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {kind}")
    } else {
        format!("a {kind}")
    }
}

/// Keys without an owner: one warning each for a few, one warning naming the first few for a fleet
/// (ten thousand identical lines would bury every other warning, and stay in memory for good).
fn owner_warnings(c: &mut Check, keys: &[KeyConfig]) {
    const EACH: usize = 5;
    const HINT: &str = "set owner = { name = \"...\" } so that status, alerts and notifications say whose key it is";
    let without: Vec<&str> = keys
        .iter()
        .filter(|k| k.owner.is_none())
        .map(|k| k.name.as_str())
        .collect();
    if without.len() <= EACH {
        for name in without {
            c.warnings.push(format!("key {name:?}: no owner: {HINT}"));
        }
        return;
    }
    let first: Vec<String> = without[..3].iter().map(|n| format!("{n:?}")).collect();
    c.warnings.push(format!(
        "{} keys have no owner ({} and {} more): {HINT}",
        without.len(),
        first.join(", "),
        without.len() - first.len()
    ));
}

/// Reconcile rounds that would keep the portals and stores busy: more than
/// [`RECONCILE_KEYS_PER_SECOND`] keys a second, each a status request and a read per destination.
fn reconcile_warning(c: &mut Check, interval: Option<Duration>, keys: usize) {
    let Some(interval) = interval else { return };
    let rate = keys as f64 / interval.as_secs_f64().max(1.0);
    if rate > RECONCILE_KEYS_PER_SECOND {
        c.warnings.push(format!(
            "daemon.reconcile_interval: {keys} keys every {} is {rate:.0} keys a second, each a status request and a read per destination, for good: consider a longer interval (e.g. \"1h\")",
            humantime::format_duration(interval)
        ));
    }
}

/// See [`reconcile_warning`].
const RECONCILE_KEYS_PER_SECOND: f64 = 10.0;

/// `v` without spare capacity.
fn shrunk<T>(mut v: Vec<T>) -> Vec<T> {
    v.shrink_to_fit();
    v
}

/// Meaning, references between sections, defaults and credentials: raw -> [`Config`].
fn validate(parsed: raw::Parsed, base_dir: Option<PathBuf>) -> Result<Config, ConfigError> {
    let raw::Parsed {
        raw,
        key_indices,
        provider_names,
        store_kinds,
        notify_names,
        group_names,
        problems,
    } = parsed;
    let mut c = Check {
        problems,
        warnings: Vec::new(),
        base_dir,
        schedules: HashMap::new(),
    };
    let daemon = daemon(&mut c, raw.daemon);
    let mut limits = BTreeMap::new();
    let providers: BTreeMap<String, ProviderConfig> = raw
        .providers
        .into_iter()
        .filter_map(|(name, p)| {
            limit(
                &mut c,
                &mut limits,
                "providers",
                &name,
                p.max_concurrent_requests(),
            );
            let built = provider(&mut c, &name, p)?;
            Some((name, built))
        })
        .collect();
    let stores: BTreeMap<String, StoreConfig> = raw
        .stores
        .into_iter()
        .filter_map(|(name, s)| {
            limit(
                &mut c,
                &mut limits,
                "stores",
                &name,
                s.max_concurrent_requests(),
            );
            let built = store(&mut c, &name, s)?;
            Some((name, built))
        })
        .collect();
    let notify: BTreeMap<String, NotifyTargetConfig> = raw
        .notify
        .into_iter()
        .filter_map(|(name, t)| {
            let built = notify_target(&mut c, &name, t)?;
            Some((name, built))
        })
        .collect();
    let names = Names {
        providers: &provider_names,
        store_kinds: &store_kinds,
        notify: &notify_names,
    };
    let groups = groups(&mut c, raw.groups);
    let mut keys = Vec::new();
    let mut seen_names: HashMap<String, usize> = HashMap::new();
    // Who writes each destination, to find two keys writing the same place. File destinations are
    // also compared by their full path, since two file stores may share a directory.
    let mut writers: HashMap<(String, DestinationTarget), String> = HashMap::new();
    let mut aos_users: HashMap<String, String> = HashMap::new();
    let mut file_paths: HashMap<PathBuf, String> = HashMap::new();
    // Names and destinations of keys whose own shape is broken are not known; their problems are.
    for (i, k) in key_indices.into_iter().zip(raw.keys) {
        let path = format!("keys[{i}]");
        if !is_valid_key_name(&k.name) {
            c.problem(
                format!("{path}.name"),
                format!(
                    "{:?} is not a valid key name: use lowercase letters, digits, '-' and '_', starting with a letter or digit",
                    k.name
                ),
            );
        } else if let Some(first) = seen_names.get(&k.name) {
            c.problem(
                format!("{path}.name"),
                format!("duplicate key name {:?} (also keys[{first}])", k.name),
            );
        } else {
            seen_names.insert(k.name.clone(), i);
        }
        let dual_only = dual_only_fields(&k);
        let Some(mut built) = key(&mut c, &path, k, &names) else {
            continue;
        };
        rollout(&mut c, &path, &mut built, &providers, &dual_only);
        join_group(&mut c, &path, &mut built, &groups, &group_names);
        // An `aos` account has exactly one active key: two keys on one such provider would each
        // invalidate the other at every rotation.
        if matches!(providers.get(&built.provider), Some(ProviderConfig::Aos(_))) {
            if let Some(other) = aos_users.get(&built.provider) {
                c.problem(
                    format!("{path}.provider"),
                    format!(
                        "provider {:?} is already used by {other}: an aos account has one active key, so two keys on it would invalidate each other",
                        built.provider
                    ),
                );
            } else {
                aos_users.insert(built.provider.clone(), path.clone());
            }
        }
        for (j, d) in built.destinations.iter().enumerate() {
            let here = format!("{path}.destinations[{j}]");
            let id = (d.store.clone(), d.target.clone());
            if let Some(other) = writers.get(&id) {
                c.problem(
                    &here,
                    format!(
                        "{} on store {:?} is already written by {other}",
                        d.target, d.store
                    ),
                );
                continue;
            }
            writers.insert(id, here.clone());
            if let (Some(StoreConfig::File(fs)), DestinationTarget::File { file }) =
                (stores.get(&d.store), &d.target)
            {
                let full = fs.dir.join(file);
                if let Some(other) = file_paths.get(&full) {
                    c.problem(
                        &here,
                        format!("{} is already written by {other}", full.display()),
                    );
                } else {
                    file_paths.insert(full, here);
                }
            }
        }
        keys.push(built);
    }

    let coordination = raw
        .coordination
        .and_then(|co| coordination(&mut c, co, &store_kinds));
    shared_dual_providers(&mut c, &keys, &providers);
    for name in groups.keys() {
        if !keys
            .iter()
            .any(|k| k.rollout.group.as_deref() == Some(name))
        {
            c.warnings
                .push(format!("groups.{name}: no key is in this group"));
        }
    }

    // Warnings: things that are allowed but worth saying.
    for (name, p) in &providers {
        if let ProviderConfig::Http(h) = p
            && h.status.is_none()
            && h.overlap == Overlap::None
        {
            c.warnings.push(format!(
                "providers.{name}: no [status]: drift detection and recovery of an ambiguous regenerate fall back to re-rotation"
            ));
        }
        if let ProviderConfig::Http(h) = p
            && h.list.is_none()
            && h.overlap == Overlap::Dual
        {
            c.warnings.push(format!(
                "providers.{name}: no [list]: a key whose create answer was lost cannot be found and revoked (the create is retried; the vendor may keep an extra key)"
            ));
        }
    }
    for name in providers.keys() {
        if !keys.iter().any(|k: &KeyConfig| &k.provider == name) {
            c.warnings
                .push(format!("providers.{name}: not used by any key"));
        }
    }
    for name in stores.keys() {
        let used = keys
            .iter()
            .any(|k| k.destinations.iter().any(|d| &d.store == name))
            || coordination.as_ref().is_some_and(|co| &co.store == name);
        if !used {
            c.warnings
                .push(format!("stores.{name}: not used by any key"));
        }
    }
    for name in notify.keys() {
        let used = keys.iter().any(|k| {
            k.notify.contains(name) || k.approval.as_ref().is_some_and(|a| a.notify.contains(name))
        });
        if !used {
            c.warnings
                .push(format!("notify.{name}: not used by any key"));
        }
    }
    if keys.is_empty() && c.problems.is_empty() {
        c.warnings
            .push("no [[keys]] configured: keyrotd has nothing to rotate".into());
    }
    owner_warnings(&mut c, &keys);
    reconcile_warning(&mut c, daemon.reconcile_interval, keys.len());
    for k in &keys {
        if k.is_manual_only() {
            c.warnings.push(format!(
                "key {:?}: neither schedule nor max_age: manual-only, rotated only by `keyrotd rotate`",
                k.name
            ));
        }
        if k.approval.is_some() && k.is_manual_only() {
            c.warnings.push(format!(
                "key {:?}: approval applies to scheduled and max_age rotations, and this key has neither",
                k.name
            ));
        }
        if k.schedule.is_some() && k.window.is_some() && schedule_misses_window(k) {
            c.warnings.push(format!(
                "key {:?}: none of the next scheduled runs falls inside its window; each run will wait for the window to open",
                k.name
            ));
        }
    }

    if !c.problems.is_empty() {
        return Err(ConfigError::Invalid(c.problems));
    }
    keys.shrink_to_fit();
    Ok(Config {
        daemon,
        providers,
        stores,
        keys,
        coordination,
        limits,
        notify,
        warnings: c.warnings,
    })
}

/// A provider's or store's `max_concurrent_requests`: at least 1 when given.
fn limit(
    c: &mut Check,
    limits: &mut BTreeMap<String, usize>,
    section: &str,
    name: &str,
    given: Option<usize>,
) {
    match given {
        Some(0) => c.problem(
            format!("{section}.{name}.max_concurrent_requests"),
            "must be at least 1",
        ),
        Some(n) => {
            limits.insert(name.to_string(), n);
        }
        None => {}
    }
}

/// The names a key may refer to: every provider, store and notify target of the file, well-formed
/// or not (a broken one has its own problem; it is not also "unknown").
struct Names<'a> {
    providers: &'a BTreeSet<String>,
    store_kinds: &'a BTreeMap<String, Option<&'static str>>,
    notify: &'a BTreeSet<String>,
}

/// True when every one of the next runs had to be moved into the window: the runs with and without
/// the window have nothing in common.
fn schedule_misses_window(k: &KeyConfig) -> bool {
    const RUNS: usize = 50;
    let now = Utc::now();
    let in_window = schedule::next_runs(k, now, RUNS);
    let mut unconstrained = k.clone();
    unconstrained.window = None;
    let free = schedule::next_runs(&unconstrained, now, RUNS);
    !in_window.is_empty() && !free.is_empty() && !free.iter().any(|t| in_window.contains(t))
}

fn daemon(c: &mut Check, d: raw::RawDaemon) -> DaemonConfig {
    let listen_text = d.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen = match SocketAddr::from_str(listen_text.trim()) {
        Ok(a) => a,
        Err(_) => {
            c.problem(
                "daemon.listen",
                format!("{listen_text:?} is not a socket address: write IP:PORT, e.g. \"127.0.0.1:9464\" or \"[::1]:9464\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 9464))
        }
    };
    let admin_token = d
        .admin_token
        .as_ref()
        .and_then(|s| c.secret("daemon.admin_token", s));
    let max_concurrent_rotations = c.count(
        "daemon.max_concurrent_rotations",
        d.max_concurrent_rotations,
        16,
        1,
    ) as usize;
    let reconcile = c.duration(
        "daemon.reconcile_interval",
        d.reconcile_interval.as_ref(),
        Duration::from_secs(300),
        true,
    );
    let log_format = match d.log_format.as_deref().map(str::trim) {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            c.problem(
                "daemon.log_format",
                format!("unknown log format {other:?} (expected text or json)"),
            );
            LogFormat::Text
        }
    };
    let state_dir = match d.state_dir {
        Some(p) if p.as_os_str().is_empty() => {
            c.problem("daemon.state_dir", "must not be empty");
            default_state_dir()
        }
        Some(p) => p,
        None => default_state_dir(),
    };
    DaemonConfig {
        state_dir,
        listen,
        admin_token,
        max_concurrent_rotations,
        reconcile_interval: (!reconcile.is_zero()).then_some(reconcile),
        log_format,
        paused: d.paused.is_some_and(|f| f.0),
    }
}

fn provider(c: &mut Check, name: &str, p: raw::RawProvider) -> Option<ProviderConfig> {
    let base = format!("providers.{name}");
    match p {
        raw::RawProvider::Aos(a) => {
            let base_url = c.url(&format!("{base}.base_url"), &a.base_url);
            let token = c.secret(&format!("{base}.management_token"), &a.management_token);
            let timeout = c.duration(
                &format!("{base}.timeout"),
                a.timeout.as_ref(),
                Duration::from_secs(10),
                false,
            );
            let mut paths = AosPaths::default();
            if let Some(rp) = a.paths {
                for (field, value, slot) in [
                    ("status", rp.status, &mut paths.status),
                    ("regenerate", rp.regenerate, &mut paths.regenerate),
                    ("auth_check", rp.auth_check, &mut paths.auth_check),
                ] {
                    if let Some(v) = value {
                        if !v.starts_with('/') {
                            c.problem(
                                format!("{base}.paths.{field}"),
                                format!("{v:?} must start with '/'"),
                            );
                        }
                        *slot = v.into();
                    }
                }
            }
            if let Some(acct) = &a.account_id {
                c.non_empty(&format!("{base}.account_id"), acct);
            }
            let requested_by = requested_by(c, &base, a.requested_by);
            let tls = c.tls(&base, a.ca_file, a.client_cert, a.client_key);
            let insecure_ok = a.allow_insecure_http.is_some_and(|f| f.0);
            c.plaintext_credential(&format!("{base}.base_url"), &base, &a.base_url, insecure_ok);
            if overlap(c, &base, a.overlap.as_deref()) == Overlap::Dual {
                c.problem(
                    format!("{base}.overlap"),
                    "the aos portal invalidates the old key the moment it issues a new one, so it cannot keep two keys live: an aos provider is always overlap = \"none\"",
                );
            }
            let max_retry_after = max_retry_after(c, &base, a.max_retry_after.as_ref());
            Some(ProviderConfig::Aos(AosProviderConfig {
                base_url: base_url?,
                management_token: token?,
                account_id: a.account_id,
                timeout,
                requested_by,
                paths,
                tls,
                max_retry_after,
            }))
        }
        raw::RawProvider::Http(h) => {
            let auth = h.auth.and_then(|au| {
                let value = c.secret(&format!("{base}.auth.value"), &au.value)?;
                let header = au.header.unwrap_or_else(|| "Authorization".into());
                c.non_empty(&format!("{base}.auth.header"), &header);
                let prefix = au.prefix.unwrap_or_else(|| default_prefix(&header));
                Some(HttpAuth {
                    header,
                    prefix,
                    value,
                })
            });
            let overlap = overlap(c, &base, h.overlap.as_deref());
            let regenerate = h
                .regenerate
                .map(|r| issuing(c, &format!("{base}.regenerate"), r));
            let create = h.create.map(|r| issuing(c, &format!("{base}.create"), r));
            let revoke = h.revoke.map(|r| revoke(c, &format!("{base}.revoke"), r));
            let list = h.list.map(|l| list(c, &format!("{base}.list"), l));
            let ops = Ops {
                regenerate: regenerate.is_some(),
                create: create.is_some(),
                revoke: revoke.is_some(),
                list: list.is_some(),
            };
            check_overlap(c, &base, overlap, &ops);
            let status = h.status.map(|s| {
                let sb = format!("{base}.status");
                let st = HttpStatus {
                    url: c.url_template(&format!("{sb}.url"), &s.url),
                    key_id_pointer: s.key_id_pointer,
                    last_rotated_pointer: s.last_rotated_pointer,
                    active_pointer: s.active_pointer,
                    account_id_pointer: s.account_id_pointer,
                };
                c.json_pointer(&format!("{sb}.key_id_pointer"), &st.key_id_pointer);
                for (field, p) in [
                    ("last_rotated_pointer", &st.last_rotated_pointer),
                    ("active_pointer", &st.active_pointer),
                    ("account_id_pointer", &st.account_id_pointer),
                ] {
                    if let Some(p) = p {
                        c.json_pointer(&format!("{sb}.{field}"), p);
                    }
                }
                st
            });
            let auth_check = h.auth_check.map(|a| {
                let header = a.header.unwrap_or_else(|| "Authorization".into());
                c.non_empty(&format!("{base}.auth_check.header"), &header);
                HttpAuthCheck {
                    url: c.url_template(&format!("{base}.auth_check.url"), &a.url),
                    prefix: a.prefix.unwrap_or_else(|| default_prefix(&header)),
                    header,
                }
            });
            if let Some(acct) = &h.account_id {
                c.non_empty(&format!("{base}.account_id"), acct);
            }
            let timeout = c.duration(
                &format!("{base}.timeout"),
                h.timeout.as_ref(),
                Duration::from_secs(10),
                false,
            );
            let requested_by = requested_by(c, &base, h.requested_by);
            let tls = c.tls(&base, h.ca_file, h.client_cert, h.client_key);
            let insecure_ok = h.allow_insecure_http.is_some_and(|f| f.0);
            // The management credential travels with regenerate and status; auth_check carries the
            // key itself.
            if auth.is_some() {
                let management = [
                    ("regenerate", regenerate.as_ref().map(|r| &r.url)),
                    ("create", create.as_ref().map(|r| &r.url)),
                    ("revoke", revoke.as_ref().map(|r| &r.url)),
                    ("list", list.as_ref().map(|l| &l.url)),
                ];
                for (section, url) in management {
                    if let Some(url) = url {
                        let path = format!("{base}.{section}.url");
                        c.plaintext_credential(&path, &base, url, insecure_ok);
                    }
                }
                if let Some(st) = &status {
                    c.plaintext_credential(
                        &format!("{base}.status.url"),
                        &base,
                        &st.url,
                        insecure_ok,
                    );
                }
            }
            if let Some(ac) = &auth_check {
                c.plaintext_credential(
                    &format!("{base}.auth_check.url"),
                    &base,
                    &ac.url,
                    insecure_ok,
                );
            }
            let max_retry_after = max_retry_after(c, &base, h.max_retry_after.as_ref());
            Some(ProviderConfig::Http(Box::new(HttpProviderConfig {
                auth,
                overlap,
                regenerate,
                create,
                revoke,
                list,
                status,
                auth_check,
                account_id: h.account_id,
                timeout,
                requested_by,
                tls,
                max_retry_after,
            })))
        }
    }
}

/// `overlap = "none" | "dual"` of the provider at `base`.
fn overlap(c: &mut Check, base: &str, text: Option<&str>) -> Overlap {
    match text.map(str::trim) {
        None | Some("none") => Overlap::None,
        Some("dual") => Overlap::Dual,
        Some(other) => {
            c.problem(
                format!("{base}.overlap"),
                format!("unknown overlap {other:?} (expected none or dual)"),
            );
            Overlap::None
        }
    }
}

/// A call that answers with a new key (`regenerate`, `create`) at `path`.
fn issuing(c: &mut Check, path: &str, r: raw::RawHttpRegenerate) -> HttpRegenerate {
    let method = http_method(c, &format!("{path}.method"), r.method, "POST");
    let call = HttpRegenerate {
        method,
        url: c.url_template(&format!("{path}.url"), &r.url),
        body: r.body,
        secret_pointer: r.secret_pointer,
        key_id_pointer: r.key_id_pointer,
    };
    c.json_pointer(&format!("{path}.secret_pointer"), &call.secret_pointer);
    c.json_pointer(&format!("{path}.key_id_pointer"), &call.key_id_pointer);
    call
}

fn revoke(c: &mut Check, path: &str, r: raw::RawHttpRevoke) -> HttpRevoke {
    let method = http_method(c, &format!("{path}.method"), r.method, "DELETE");
    let url = c.url_template(&format!("{path}.url"), &r.url);
    if !url.contains("{key_id}") {
        c.problem(
            format!("{path}.url"),
            "must contain {key_id}: the id of the key to revoke",
        );
    }
    HttpRevoke { method, url }
}

fn list(c: &mut Check, path: &str, l: raw::RawHttpList) -> HttpList {
    let method = http_method(c, &format!("{path}.method"), l.method, "GET");
    let list = HttpList {
        method,
        url: c.url_template(&format!("{path}.url"), &l.url),
        ids_pointer: l.ids_pointer,
        id_pointer: l.id_pointer,
    };
    c.json_pointer(&format!("{path}.ids_pointer"), &list.ids_pointer);
    if let Some(p) = &list.id_pointer {
        c.json_pointer(&format!("{path}.id_pointer"), p);
    }
    list
}

/// Which of an `http` provider's key calls are configured.
struct Ops {
    regenerate: bool,
    create: bool,
    revoke: bool,
    list: bool,
}

/// An `http` provider's calls fit its `overlap`: `none` replaces the key (`regenerate`), `dual`
/// creates a second one and revokes the first (`create`, `revoke`, optionally `list`).
fn check_overlap(c: &mut Check, base: &str, overlap: Overlap, ops: &Ops) {
    match overlap {
        Overlap::None => {
            if !ops.regenerate {
                c.problem(
                    format!("{base}.regenerate"),
                    "required field is missing (overlap = \"none\" replaces the key with regenerate; a vendor that keeps two keys live is overlap = \"dual\" with create and revoke)",
                );
            }
            for (field, set) in [
                ("create", ops.create),
                ("revoke", ops.revoke),
                ("list", ops.list),
            ] {
                if set {
                    c.problem(
                        format!("{base}.{field}"),
                        "used only with overlap = \"dual\" (set overlap = \"dual\" to rotate with two live keys)",
                    );
                }
            }
        }
        Overlap::Dual => {
            for (field, set, what) in [
                (
                    "create",
                    ops.create,
                    "a second key while the first stays valid",
                ),
                (
                    "revoke",
                    ops.revoke,
                    "the old key retired by id once every dependent uses the new one",
                ),
            ] {
                if !set {
                    c.problem(
                        format!("{base}.{field}"),
                        format!("required with overlap = \"dual\": {what}"),
                    );
                }
            }
            if ops.regenerate {
                c.problem(
                    format!("{base}.regenerate"),
                    "not used with overlap = \"dual\" (create and revoke replace it)",
                );
            }
        }
    }
}

/// `[groups.NAME]`: the schedule (and its time zone, window, jitter, catch-up) the group's keys share.
fn groups(c: &mut Check, raw: BTreeMap<String, raw::RawGroup>) -> BTreeMap<String, GroupSchedule> {
    let mut out = BTreeMap::new();
    for (name, g) in raw {
        let base = format!("groups.{name}");
        if !is_valid_key_name(&name) {
            c.problem(
                &base,
                format!(
                    "{name:?} is not a valid group name: use lowercase letters, digits, '-' and '_'"
                ),
            );
        }
        let schedule = match g.schedule.as_deref().map(str::trim) {
            None => {
                c.problem(
                    format!("{base}.schedule"),
                    "required field is missing (the group's keys rotate together on it)",
                );
                None
            }
            Some(text) => match Schedule::parse(text) {
                Ok(s) => Some(s),
                Err(e) => {
                    c.problem(
                        format!("{base}.schedule"),
                        format!("cannot parse {text:?}: {e}"),
                    );
                    None
                }
            },
        };
        let timezone = timezone(c, &base, g.timezone.as_deref());
        let window =
            g.window
                .as_ref()
                .and_then(|w| match Window::parse(&w.days, &w.start, &w.end) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        c.problem(format!("{base}.window"), e);
                        None
                    }
                });
        let jitter = c.duration(
            &format!("{base}.jitter"),
            g.jitter.as_ref(),
            Duration::ZERO,
            true,
        );
        let catch_up = g.catch_up.is_none_or(|f| f.0);
        out.insert(
            name,
            GroupSchedule {
                schedule,
                timezone,
                window,
                jitter,
                catch_up,
            },
        );
    }
    out
}

/// What a group gives its keys.
struct GroupSchedule {
    schedule: Option<Schedule>,
    timezone: Tz,
    window: Option<Window>,
    jitter: Duration,
    catch_up: bool,
}

fn timezone(c: &mut Check, base: &str, text: Option<&str>) -> Tz {
    match text {
        None => Tz::UTC,
        Some(tz) => Tz::from_str(tz.trim()).unwrap_or_else(|_| {
            c.problem(
                format!("{base}.timezone"),
                format!("{tz:?} is not an IANA time zone (e.g. \"Europe/Zurich\", \"UTC\")"),
            );
            Tz::UTC
        }),
    }
}

/// A key in a group takes the group's schedule; one of its own would be a second, conflicting one.
fn join_group(
    c: &mut Check,
    path: &str,
    k: &mut KeyConfig,
    groups: &BTreeMap<String, GroupSchedule>,
    group_names: &BTreeSet<String>,
) {
    let Some(name) = k.rollout.group.clone() else {
        return;
    };
    let Some(g) = groups.get(&name) else {
        if !group_names.contains(&name) {
            c.problem(
                format!("{path}.group"),
                format!("unknown group {name:?} ({})", known(group_names.iter())),
            );
        }
        return;
    };
    if k.schedule.is_some() || k.window.is_some() {
        c.problem(
            format!("{path}.schedule"),
            format!("a key in group {name:?} rotates on the group's schedule and window: set them in [groups.{name}], not here"),
        );
    }
    k.schedule = g.schedule.clone();
    k.timezone = g.timezone;
    k.window = g.window.clone();
    k.jitter = g.jitter;
    k.catch_up = g.catch_up;
}

/// The rollout settings against the key's provider: canary and confirmation need two live keys.
fn rollout(
    c: &mut Check,
    path: &str,
    k: &mut KeyConfig,
    providers: &BTreeMap<String, ProviderConfig>,
    dual_only: &[String],
) {
    let Some(p) = providers.get(&k.provider) else {
        return;
    };
    k.rollout.overlap = p.overlap();
    if k.rollout.overlap == Overlap::Dual {
        if k.rollout.canary && !k.dependents.iter().any(|d| d.canary) {
            c.problem(
                format!("{path}.rollout"),
                "rollout = \"canary\" needs at least one dependent with canary = true",
            );
        }
        if let Some(after) = k.rollout.revoke_after
            && after < k.rollout.confirm_deadline
        {
            c.problem(
                format!("{path}.revoke_after"),
                "must be at least confirm_deadline: the old key is not revoked before the dependents had their time to confirm",
            );
        }
        return;
    }
    for field in dual_only {
        c.problem(
            format!("{path}.{field}"),
            format!("used only by keys whose provider keeps two keys live (overlap = \"dual\"); provider {:?} is overlap = \"none\"", k.provider),
        );
    }
    if k.rollout.canary {
        c.problem(
            format!("{path}.rollout"),
            format!("rollout = \"canary\" needs a provider that keeps two keys live (overlap = \"dual\"); provider {:?} invalidates the old key the moment the new one exists, so a failing canary could not go back to it", k.provider),
        );
    }
}

/// The fields of a raw key that only a dual key uses, as paths relative to the key.
fn dual_only_fields(k: &raw::RawKey) -> Vec<String> {
    let mut out: Vec<String> = [
        ("confirm_deadline", k.confirm_deadline.is_some()),
        ("revoke_after", k.revoke_after.is_some()),
        ("canary_watch", k.canary_watch.is_some()),
    ]
    .into_iter()
    .filter(|(_, set)| *set)
    .map(|(f, _)| f.to_string())
    .collect();
    for (j, d) in k.dependents.iter().enumerate() {
        if d.confirm.is_some() {
            out.push(format!("dependents[{j}].confirm"));
        }
        if d.canary.is_some_and(|f| f.0) {
            out.push(format!("dependents[{j}].canary"));
        }
    }
    out
}

/// Two keys on one `dual` provider whose `list` is not per key: cleaning up after a lost `create`
/// revokes every listed id the key did not know, which would include the other key's.
fn shared_dual_providers(
    c: &mut Check,
    keys: &[KeyConfig],
    providers: &BTreeMap<String, ProviderConfig>,
) {
    for (name, p) in providers {
        let ProviderConfig::Http(h) = p else { continue };
        let Some(list) = &h.list else { continue };
        let users: Vec<&str> = keys
            .iter()
            .filter(|k| &k.provider == name)
            .map(|k| k.name.as_str())
            .collect();
        if users.len() > 1 && !list.url.contains("{key}") {
            c.problem(
                format!("providers.{name}.list.url"),
                format!("keys {} share this provider: list.url must contain {{key}} so each key lists only its own ids (an unknown id is revoked after a lost create)", users.join(", ")),
            );
        }
    }
}

/// "Bearer " for the Authorization header, nothing for any other header (e.g. `X-Api-Key`).
fn default_prefix(header: &str) -> String {
    if header.eq_ignore_ascii_case("authorization") {
        "Bearer ".into()
    } else {
        String::new()
    }
}

fn http_method(c: &mut Check, path: &str, method: Option<String>, default: &str) -> String {
    let m = method
        .unwrap_or_else(|| default.into())
        .to_ascii_uppercase();
    if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&m.as_str()) {
        c.problem(
            path,
            format!("unknown HTTP method {m:?} (expected GET, POST, PUT, PATCH or DELETE)"),
        );
    }
    m
}

fn requested_by(c: &mut Check, base: &str, value: Option<String>) -> String {
    match value {
        Some(v) => {
            c.non_empty(&format!("{base}.requested_by"), &v);
            v
        }
        None => default_requested_by(),
    }
}

fn store(c: &mut Check, name: &str, s: raw::RawStore) -> Option<StoreConfig> {
    let base = format!("stores.{name}");
    match s {
        raw::RawStore::Vault(v) => {
            let address = c.url(&format!("{base}.address"), &v.address);
            c.plaintext_credential(
                &format!("{base}.address"),
                &base,
                &v.address,
                v.allow_insecure_http.is_some_and(|f| f.0),
            );
            let auth = match (&v.token, v.approle) {
                (Some(t), None) => c.secret(&format!("{base}.token"), t).map(VaultAuth::Token),
                (None, Some(a)) => {
                    let role_id = c.secret(&format!("{base}.approle.role_id"), &a.role_id);
                    let secret_id = c.secret(&format!("{base}.approle.secret_id"), &a.secret_id);
                    let mount = a.mount.unwrap_or_else(|| "approle".into());
                    c.non_empty(&format!("{base}.approle.mount"), &mount);
                    Some(VaultAuth::AppRole {
                        role_id: role_id?,
                        secret_id: secret_id?,
                        mount,
                    })
                }
                (Some(_), Some(_)) => {
                    c.problem(&base, "set either token or approle, not both");
                    None
                }
                (None, None) => {
                    c.problem(
                        format!("{base}.token"),
                        "required: token = { env = \"VAULT_TOKEN\" }, or approle = { role_id = {..}, secret_id = {..} }",
                    );
                    None
                }
            };
            let mount = v.mount.unwrap_or_else(|| "secret".into());
            c.non_empty(&format!("{base}.mount"), &mount);
            if let Some(ns) = &v.namespace {
                c.non_empty(&format!("{base}.namespace"), ns);
            }
            let timeout = c.duration(
                &format!("{base}.timeout"),
                v.timeout.as_ref(),
                Duration::from_secs(10),
                false,
            );
            let token_file = match &v.token {
                Some(RawSecret(SecretRef::File(p))) => Some(match &c.base_dir {
                    Some(dir) if p.is_relative() => dir.join(p),
                    _ => p.clone(),
                }),
                _ => None,
            };
            let tls = c.tls(&base, v.ca_file, v.client_cert, v.client_key);
            Some(StoreConfig::Vault(VaultStoreConfig {
                address: address?,
                auth: auth?,
                mount: mount.trim_matches('/').to_string(),
                namespace: v.namespace,
                timeout,
                token_file,
                tls,
            }))
        }
        raw::RawStore::Aws(a) => {
            let endpoint_url = match &a.endpoint_url {
                Some(u) => Some(c.url(&format!("{base}.endpoint_url"), u)?),
                None => None,
            };
            if let Some(r) = &a.region {
                c.non_empty(&format!("{base}.region"), r);
            }
            let timeout = c.duration(
                &format!("{base}.timeout"),
                a.timeout.as_ref(),
                Duration::from_secs(10),
                false,
            );
            let tls = c.tls(&base, a.ca_file, None, None);
            Some(StoreConfig::Aws(AwsStoreConfig {
                region: a.region,
                endpoint_url,
                timeout,
                ca_file: tls.ca_file,
            }))
        }
        raw::RawStore::File(f) => {
            if f.dir.as_os_str().is_empty() {
                c.problem(format!("{base}.dir"), "must not be empty");
                return None;
            }
            Some(StoreConfig::File(FileStoreConfig { dir: f.dir }))
        }
    }
}

/// `[coordination]`: several replicas sharing the keys through leases on a Vault store
/// (docs/replicas.md).
fn coordination(
    c: &mut Check,
    co: raw::RawCoordination,
    store_kinds: &BTreeMap<String, Option<&'static str>>,
) -> Option<CoordinationConfig> {
    if let Some(kind) = &co.kind
        && kind != "vault"
    {
        c.problem(
            "coordination.kind",
            format!("unknown kind {kind:?} (expected vault)"),
        );
    }
    match store_kinds.get(&co.store) {
        Some(Some("vault")) | Some(None) => {}
        Some(Some(other)) => c.problem(
            "coordination.store",
            format!(
                "store {:?} is a {other} store; coordination needs a vault store",
                co.store
            ),
        ),
        None => c.problem(
            "coordination.store",
            format!(
                "unknown store {:?} ({})",
                co.store,
                known(store_kinds.keys())
            ),
        ),
    }
    let path = co.path.unwrap_or_else(|| "keyrotd/leases".into());
    c.non_empty("coordination.path", &path);
    let ttl = c.duration(
        "coordination.ttl",
        co.ttl.as_ref(),
        Duration::from_secs(30),
        false,
    );
    Some(CoordinationConfig {
        store: co.store,
        path: path.trim_matches('/').to_string(),
        ttl,
    })
}

fn key(c: &mut Check, path: &str, k: raw::RawKey, names: &Names<'_>) -> Option<KeyConfig> {
    let (providers, store_kinds) = (names.providers, names.store_kinds);
    let before = c.problems.len();
    if !providers.contains(&k.provider) {
        c.problem(
            format!("{path}.provider"),
            format!(
                "unknown provider {:?} ({})",
                k.provider,
                known(providers.iter())
            ),
        );
    }
    let timezone = match &k.timezone {
        None => Tz::UTC,
        Some(tz) => match Tz::from_str(tz.trim()) {
            Ok(tz) => tz,
            Err(_) => {
                c.problem(
                    format!("{path}.timezone"),
                    format!("{tz:?} is not an IANA time zone (e.g. \"Europe/Zurich\", \"UTC\")"),
                );
                Tz::UTC
            }
        },
    };
    let schedule = k
        .schedule
        .as_ref()
        .and_then(|s| match c.schedule(s.trim()) {
            Ok(s) => Some(s),
            Err(e) => {
                c.problem(
                    format!("{path}.schedule"),
                    format!("cannot parse {s:?}: {e}"),
                );
                None
            }
        });
    let window = k
        .window
        .as_ref()
        .and_then(|w| match Window::parse(&w.days, &w.start, &w.end) {
            Ok(w) => Some(w),
            Err(e) => {
                c.problem(format!("{path}.window"), e);
                None
            }
        });
    let max_age = k
        .max_age
        .as_ref()
        .map(|m| c.duration(&format!("{path}.max_age"), Some(m), Duration::ZERO, false));
    let jitter = c.duration(
        &format!("{path}.jitter"),
        k.jitter.as_ref(),
        Duration::ZERO,
        true,
    );
    let watch = c.duration(
        &format!("{path}.watch"),
        k.watch.as_ref(),
        Duration::from_secs(300),
        true,
    );
    let watch_interval = c.duration(
        &format!("{path}.watch_interval"),
        k.watch_interval.as_ref(),
        Duration::from_secs(15),
        false,
    );
    let store_deadline = c.duration(
        &format!("{path}.store_deadline"),
        k.store_deadline.as_ref(),
        Duration::from_secs(60),
        false,
    );
    let max_rerotations = c.count(&format!("{path}.max_rerotations"), k.max_rerotations, 3, 0);
    let max_regenerations_per_day = c.count(
        &format!("{path}.max_regenerations_per_day"),
        k.max_regenerations_per_day,
        6,
        1,
    );
    let rollout = key_rollout(c, path, &k);

    let owner = k.owner.and_then(|o| owner(c, path, o)).map(Box::new);
    let approval = k
        .approval
        .and_then(|a| approval(c, &format!("{path}.approval"), a, names.notify));
    let notify = k.notify.unwrap_or_default();
    notify_refs(c, &format!("{path}.notify"), &notify, names.notify);
    let on_first_contact = match k.on_first_contact.as_deref().map(str::trim) {
        None | Some("report") => FirstContact::Report,
        Some("rotate") => FirstContact::Rotate,
        Some(other) => {
            c.problem(
                format!("{path}.on_first_contact"),
                format!("unknown value {other:?} (expected report or rotate)"),
            );
            FirstContact::Report
        }
    };

    if k.destinations.is_empty() {
        c.problem(
            format!("{path}.destinations"),
            "a key needs at least one destination ([[keys.destinations]])",
        );
    }
    // Stores named by the key's destinations, including ones with problems of their own, so that
    // `reads_from` is checked against what the operator wrote.
    let destination_stores: BTreeSet<String> =
        k.destinations.iter().map(|d| d.store.clone()).collect();
    let destinations: Vec<DestinationConfig> = k
        .destinations
        .into_iter()
        .enumerate()
        .filter_map(|(j, d)| destination(c, &format!("{path}.destinations[{j}]"), d, store_kinds))
        .collect();

    let mut dependent_names = BTreeSet::new();
    let mut dependents = Vec::new();
    for (j, d) in k.dependents.into_iter().enumerate() {
        let dp = format!("{path}.dependents[{j}]");
        c.non_empty(&format!("{dp}.name"), &d.name);
        if !dependent_names.insert(d.name.clone()) {
            c.problem(
                format!("{dp}.name"),
                format!("duplicate dependent name {:?} in this key", d.name),
            );
        }
        let reads_from = match d.reads_from {
            None => destination_stores.iter().map(|s| s.to_string()).collect(),
            Some(list) => {
                if list.is_empty() {
                    c.problem(
                        format!("{dp}.reads_from"),
                        "must name at least one store; leave it out to mean every store of the key",
                    );
                }
                for (n, s) in list.iter().enumerate() {
                    if !destination_stores.contains(s) {
                        c.problem(
                            format!("{dp}.reads_from[{n}]"),
                            format!(
                                "{s:?} is not a store this key has a destination on ({})",
                                known(destination_stores.iter())
                            ),
                        );
                    }
                }
                list
            }
        };
        let verify = d.verify.and_then(|v| {
            let url = c.url(&format!("{dp}.verify.url"), &v.url);
            let expect_status = match v.expect_status {
                None => 200,
                Some(Num(n)) if (100..=599).contains(&n) => n as u16,
                Some(Num(n)) => {
                    c.problem(
                        format!("{dp}.verify.expect_status"),
                        format!("{n} is not an HTTP status (100-599)"),
                    );
                    200
                }
            };
            let timeout = c.duration(
                &format!("{dp}.verify.timeout"),
                v.timeout.as_ref(),
                Duration::from_secs(5),
                false,
            );
            let tls = c.tls(
                &format!("{dp}.verify"),
                v.ca_file,
                v.client_cert,
                v.client_key,
            );
            Some(VerifyConfig {
                url: url?,
                expect_status,
                timeout,
                tls,
            })
        });
        let reload = d.reload.and_then(|r| reload(c, &format!("{dp}.reload"), r));
        let confirm = d.confirm.and_then(|cf| {
            let url = c.url(&format!("{dp}.confirm.url"), &cf.url);
            c.json_pointer(
                &format!("{dp}.confirm.fingerprint_pointer"),
                &cf.fingerprint_pointer,
            );
            let timeout = c.duration(
                &format!("{dp}.confirm.timeout"),
                cf.timeout.as_ref(),
                Duration::from_secs(5),
                false,
            );
            Some(ConfirmConfig {
                url: url?,
                fingerprint_pointer: cf.fingerprint_pointer,
                timeout,
            })
        });
        dependents.push(DependentConfig {
            name: d.name,
            reads_from,
            verify,
            reload,
            canary: d.canary.is_some_and(|f| f.0),
            confirm,
        });
    }

    if c.problems.len() != before {
        return None;
    }
    Some(KeyConfig {
        name: k.name,
        provider: k.provider,
        schedule,
        timezone,
        max_age,
        jitter,
        window,
        catch_up: k.catch_up.is_none_or(|f| f.0),
        watch,
        watch_interval,
        store_deadline,
        auto_recover: k.auto_recover.is_none_or(|f| f.0),
        max_rerotations,
        max_regenerations_per_day,
        owner,
        approval,
        notify,
        on_first_contact,
        rollout,
        // Built in place from the raw lists, whose capacity they would keep otherwise.
        destinations: shrunk(destinations),
        dependents: shrunk(dependents),
    })
}

fn owner(c: &mut Check, path: &str, o: raw::RawOwner) -> Option<OwnerConfig> {
    let base = format!("{path}.owner");
    c.non_empty(&format!("{base}.name"), &o.name);
    if let Some(contact) = &o.contact {
        c.non_empty(&format!("{base}.contact"), contact);
    }
    let runbook = match &o.runbook {
        Some(u) => Some(c.url(&format!("{base}.runbook"), u)?),
        None => None,
    };
    Some(OwnerConfig {
        name: o.name.trim().to_string(),
        contact: o.contact,
        runbook,
    })
}

/// `approval`: `required` (default true: the table is there to ask for it), `timeout` (default
/// 30m) and the targets told about a pending approval. `None` when approval is not required.
fn approval(
    c: &mut Check,
    base: &str,
    a: raw::RawApproval,
    known_targets: &BTreeSet<String>,
) -> Option<ApprovalConfig> {
    let timeout = c.duration(
        &format!("{base}.timeout"),
        a.timeout.as_ref(),
        Duration::from_secs(30 * 60),
        false,
    );
    let notify = a.notify.unwrap_or_default();
    notify_refs(c, &format!("{base}.notify"), &notify, known_targets);
    a.required
        .is_none_or(|f| f.0)
        .then_some(ApprovalConfig { timeout, notify })
}

/// Every name in `list` is a `[notify.NAME]` target, each named once.
fn notify_refs(c: &mut Check, path: &str, list: &[String], known_targets: &BTreeSet<String>) {
    let mut seen = BTreeSet::new();
    for (n, name) in list.iter().enumerate() {
        if !known_targets.contains(name) {
            c.problem(
                format!("{path}[{n}]"),
                format!(
                    "unknown notify target {name:?} ({})",
                    known(known_targets.iter())
                ),
            );
        } else if !seen.insert(name) {
            c.problem(format!("{path}[{n}]"), format!("{name:?} is listed twice"));
        }
    }
}

/// A `[notify.NAME]` target.
fn notify_target(c: &mut Check, name: &str, t: raw::RawNotifyTarget) -> Option<NotifyTargetConfig> {
    let base = format!("notify.{name}");
    let (events, retries) = match &t {
        raw::RawNotifyTarget::Webhook(w) => (&w.events, w.retries),
        raw::RawNotifyTarget::Command(cmd) => (&cmd.events, cmd.retries),
    };
    let events = notice_events(c, &format!("{base}.events"), events.as_deref());
    let retries = c.count(&format!("{base}.retries"), retries, 3, 0);
    let kind = match t {
        raw::RawNotifyTarget::Webhook(w) => {
            let url = webhook_url(c, &base, &w.url, w.allow_insecure_http.is_some_and(|f| f.0));
            let timeout = c.duration(
                &format!("{base}.timeout"),
                w.timeout.as_ref(),
                Duration::from_secs(5),
                false,
            );
            let signing_key = w
                .signing_key
                .as_ref()
                .and_then(|s| c.secret(&format!("{base}.signing_key"), s));
            let tls = c.tls(&base, w.ca_file, w.client_cert, w.client_key);
            NotifyKind::Webhook {
                url: url?,
                timeout,
                signing_key,
                tls,
            }
        }
        raw::RawNotifyTarget::Command(cmd) => {
            if cmd.command.first().is_none_or(|p| p.trim().is_empty()) {
                c.problem(
                    format!("{base}.command"),
                    "must name a program: command = [\"program\", \"arg\", ...]",
                );
            }
            let env = cmd.env.unwrap_or_default();
            for var in env.keys() {
                if var.is_empty() || var.contains('=') {
                    c.problem(
                        format!("{base}.env"),
                        format!("{var:?} is not a valid variable name"),
                    );
                }
            }
            let timeout = c.duration(
                &format!("{base}.timeout"),
                cmd.timeout.as_ref(),
                Duration::from_secs(30),
                false,
            );
            NotifyKind::Command {
                command: cmd.command,
                timeout,
                env,
            }
        }
    };
    Some(NotifyTargetConfig {
        events,
        retries,
        kind,
    })
}

/// `events = [...]`: known event names; absent or empty means every event.
fn notice_events(c: &mut Check, path: &str, names: Option<&[String]>) -> BTreeSet<NoticeEvent> {
    let mut events = BTreeSet::new();
    for (n, name) in names.unwrap_or_default().iter().enumerate() {
        match NoticeEvent::ALL.iter().find(|e| e.as_str() == name.trim()) {
            Some(e) => {
                events.insert(*e);
            }
            None => {
                let all: Vec<&str> = NoticeEvent::ALL.iter().map(|e| e.as_str()).collect();
                c.problem(
                    format!("{path}[{n}]"),
                    format!(
                        "unknown event {name:?} (expected one of {})",
                        all.join(", ")
                    ),
                );
            }
        }
    }
    events
}

/// A webhook's `url`: text, or a credential reference whose value is the URL (never echoed).
fn webhook_url(
    c: &mut Check,
    base: &str,
    raw: &raw::RawUrl,
    insecure_ok: bool,
) -> Option<WebhookUrl> {
    let path = format!("{base}.url");
    match raw {
        raw::RawUrl::Text(text) => c.url(&path, text).map(WebhookUrl::Plain),
        raw::RawUrl::Secret(r) => {
            let from = match r {
                crate::secret::SecretRef::Env(name) => format!("env {name}"),
                crate::secret::SecretRef::File(p) => format!("file {}", p.display()),
            };
            let secret = c.secret(&path, &RawSecret(r.clone()))?;
            use secrecy::ExposeSecret;
            let parsed = Url::parse(secret.expose_secret().trim())
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            let Some(parsed) = parsed else {
                c.problem(
                    &path,
                    format!("the value read from {from} is not an http:// or https:// URL"),
                );
                return None;
            };
            // The URL carries a token: it must not travel in plain text off this machine.
            if parsed.scheme() == "http" && !is_loopback_host(&parsed) && !insecure_ok {
                c.problem(
                    &path,
                    format!(
                        "the URL read from {from} is http:// and would send its token in plain text: use https://, or set `allow_insecure_http = true` in [{base}] if the network is trusted"
                    ),
                );
            }
            Some(WebhookUrl::Secret { url: secret, from })
        }
    }
}

/// `rollout`, `confirm_deadline`, `revoke_after`, `canary_watch`, `reload_coalesce` and `group`; the
/// overlap is the provider's, set once providers are known.
fn key_rollout(c: &mut Check, path: &str, k: &raw::RawKey) -> Rollout {
    let d = Rollout::default();
    let canary = match k.rollout.as_deref().map(str::trim) {
        None | Some("all") => false,
        Some("canary") => true,
        Some(other) => {
            c.problem(
                format!("{path}.rollout"),
                format!("unknown rollout {other:?} (expected all or canary)"),
            );
            false
        }
    };
    let field = |f: &str| format!("{path}.{f}");
    let confirm_deadline = c.duration(
        &field("confirm_deadline"),
        k.confirm_deadline.as_ref(),
        d.confirm_deadline,
        false,
    );
    let revoke_after = k
        .revoke_after
        .as_ref()
        .map(|t| c.duration(&field("revoke_after"), Some(t), Duration::ZERO, false));
    let canary_watch = c.duration(
        &field("canary_watch"),
        k.canary_watch.as_ref(),
        d.canary_watch,
        false,
    );
    let coalesce = c.duration(
        &field("reload_coalesce"),
        k.reload_coalesce.as_ref(),
        Duration::ZERO,
        true,
    );
    if let Some(g) = &k.group {
        c.non_empty(&field("group"), g);
    }
    Rollout {
        overlap: Overlap::None,
        canary,
        confirm_deadline,
        revoke_after,
        canary_watch,
        reload_coalesce: (!coalesce.is_zero()).then_some(coalesce),
        group: k.group.clone(),
    }
}

fn destination(
    c: &mut Check,
    path: &str,
    d: raw::RawDestination,
    store_kinds: &BTreeMap<String, Option<&'static str>>,
) -> Option<DestinationConfig> {
    let kind = match store_kinds.get(&d.store) {
        Some(Some(kind)) => *kind,
        // The store's own table is broken; its problem is reported there.
        Some(None) => return None,
        None => {
            c.problem(
                format!("{path}.store"),
                format!(
                    "unknown store {:?} ({})",
                    d.store,
                    known(store_kinds.keys())
                ),
            );
            return None;
        }
    };
    let before = c.problems.len();
    let not_for = |c: &mut Check, field: &str, set: bool, needs: &str| {
        if set {
            c.problem(
                format!("{path}.{field}"),
                format!(
                    "not a field of {} destination (it takes {needs})",
                    article(kind)
                ),
            );
        }
    };
    let required = |c: &mut Check, field: &str, v: Option<String>| -> String {
        match v {
            Some(v) if !v.trim().is_empty() => v,
            Some(_) => {
                c.problem(format!("{path}.{field}"), "must not be empty");
                String::new()
            }
            None => {
                c.problem(
                    format!("{path}.{field}"),
                    format!("required for a destination on {kind} store {:?}", d.store),
                );
                String::new()
            }
        }
    };
    let target = match kind {
        "vault" => {
            let needs = "path and field";
            not_for(c, "secret_id", d.secret_id.is_some(), needs);
            not_for(c, "file", d.file.is_some(), needs);
            let p = required(c, "path", d.path);
            let field = required(c, "field", d.field);
            DestinationTarget::Vault {
                path: p.trim_matches('/').to_string(),
                field,
            }
        }
        "aws" => {
            let needs = "secret_id and optionally field";
            not_for(c, "path", d.path.is_some(), needs);
            not_for(c, "file", d.file.is_some(), needs);
            let secret_id = required(c, "secret_id", d.secret_id);
            if let Some(f) = &d.field {
                c.non_empty(&format!("{path}.field"), f);
            }
            DestinationTarget::Aws {
                secret_id,
                field: d.field,
            }
        }
        _ => {
            let needs = "file";
            not_for(c, "path", d.path.is_some(), needs);
            not_for(c, "field", d.field.is_some(), needs);
            not_for(c, "secret_id", d.secret_id.is_some(), needs);
            let file = required(c, "file", d.file);
            let p = Path::new(&file);
            if !file.is_empty() {
                if p.is_absolute() {
                    c.problem(
                        format!("{path}.file"),
                        format!("{file:?} must be relative to the store's dir"),
                    );
                } else if p
                    .components()
                    .any(|comp| matches!(comp, Component::ParentDir))
                {
                    c.problem(
                        format!("{path}.file"),
                        format!("{file:?} must not contain \"..\""),
                    );
                } else if file.ends_with('/') || p.file_name().is_none() {
                    c.problem(format!("{path}.file"), format!("{file:?} must name a file"));
                }
            }
            DestinationTarget::File { file }
        }
    };
    (c.problems.len() == before).then_some(DestinationConfig {
        store: d.store,
        target,
    })
}

fn reload(c: &mut Check, path: &str, r: raw::RawReload) -> Option<ReloadHook> {
    let retries = c.count(&format!("{path}.retries"), r.retries, 2, 0);
    match (r.url, r.command) {
        (Some(url), None) => {
            if r.env.is_some() {
                c.problem(format!("{path}.env"), "only a command hook takes env");
            }
            let url = c.url(&format!("{path}.url"), &url);
            let method = http_method(c, &format!("{path}.method"), r.method, "POST");
            let timeout = c.duration(
                &format!("{path}.timeout"),
                r.timeout.as_ref(),
                Duration::from_secs(5),
                false,
            );
            let signing_key = r
                .signing_key
                .as_ref()
                .and_then(|s| c.secret(&format!("{path}.signing_key"), s));
            let tls = c.tls(path, r.ca_file, r.client_cert, r.client_key);
            Some(ReloadHook::Http {
                url: url?,
                method,
                timeout,
                signing_key,
                retries,
                tls,
            })
        }
        (None, Some(command)) => {
            if r.method.is_some() {
                c.problem(
                    format!("{path}.method"),
                    "only an HTTP hook (url) takes method",
                );
            }
            if r.signing_key.is_some() {
                c.problem(
                    format!("{path}.signing_key"),
                    "only an HTTP hook (url) takes signing_key",
                );
            }
            for (field, set) in [
                ("ca_file", r.ca_file.is_some()),
                ("client_cert", r.client_cert.is_some()),
                ("client_key", r.client_key.is_some()),
            ] {
                if set {
                    c.problem(
                        format!("{path}.{field}"),
                        format!("only an HTTP hook (url) takes {field}"),
                    );
                }
            }
            if command.first().is_none_or(|p| p.trim().is_empty()) {
                c.problem(
                    format!("{path}.command"),
                    "must name a program: command = [\"program\", \"arg\", ...]",
                );
            }
            let env = r.env.unwrap_or_default();
            for name in env.keys() {
                if name.is_empty() || name.contains('=') {
                    c.problem(
                        format!("{path}.env"),
                        format!("{name:?} is not a valid variable name"),
                    );
                }
            }
            let timeout = c.duration(
                &format!("{path}.timeout"),
                r.timeout.as_ref(),
                Duration::from_secs(30),
                false,
            );
            Some(ReloadHook::Command {
                command,
                timeout,
                env,
                retries,
            })
        }
        (Some(_), Some(_)) => {
            c.problem(
                path.to_string(),
                "set either url (HTTP hook) or command, not both",
            );
            None
        }
        (None, None) => {
            c.problem(
                format!("{path}.url"),
                "required: url = \"http://...\" (HTTP hook) or command = [\"program\", ...]",
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config whose credentials are files in `dir` (the process environment is left alone).
    fn config_text(dir: &Path, extra_daemon: &str) -> String {
        let tok = dir.join("tok");
        std::fs::write(&tok, "token-value\n").unwrap();
        let tok = tok.display();
        format!(
            r#"
[daemon]
{extra_daemon}
[providers.Aos-Prod]
kind = "aos"
base_url = "https://aos.example.com"
management_token = {{ file = "{tok}" }}

[stores.vault-main]
kind = "vault"
address = "http://127.0.0.1:8200"
approle = {{ role_id = {{ file = "{tok}" }}, secret_id = {{ file = "{tok}" }} }}

[stores.aws-main]
kind = "aws"

[[keys]]
name = "billing-api"
provider = "Aos-Prod"
max_age = "30d"
  [[keys.destinations]]
  store = "vault-main"
  path = "/apps/billing/"
  field = "api_key"
  [[keys.destinations]]
  store = "aws-main"
  secret_id = "prod/billing"
  [[keys.dependents]]
  name = "http-hook"
  verify = {{ url = "http://10.0.0.7/health" }}
  reload = {{ url = "http://10.0.0.7/reload" }}
  [[keys.dependents]]
  name = "command-hook"
  reload = {{ command = ["systemctl", "reload", "nginx"] }}
"#
        )
    }

    fn load(text: &str, overrides: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let overrides = overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load_str_with_overrides(text, &overrides)
    }

    /// `n` keys without an owner, each on its own `aos` provider with a file destination.
    fn ownerless_fleet(dir: &Path, n: usize) -> String {
        let tok = dir.join("tok");
        std::fs::write(&tok, "token-value\n").unwrap();
        let mut text = format!(
            "[stores.files]\nkind = \"file\"\ndir = \"{}\"\n",
            dir.display()
        );
        for i in 0..n {
            text.push_str(&format!(
                "[providers.p{i}]\nkind = \"aos\"\nbase_url = \"https://aos.example.com/a/{i}\"\n\
                 management_token = {{ file = \"{}\" }}\n\
                 [[keys]]\nname = \"k{i}\"\nprovider = \"p{i}\"\nmax_age = \"30d\"\n\
                 [[keys.destinations]]\nstore = \"files\"\nfile = \"k{i}.key\"\n",
                tok.display()
            ));
        }
        text
    }

    #[test]
    fn a_few_keys_without_owner_are_named_each_and_a_fleet_in_one_warning() {
        let dir = tempfile::tempdir().unwrap();
        let few = load(&ownerless_fleet(dir.path(), 2), &[]).unwrap();
        let owners: Vec<&String> = few
            .warnings
            .iter()
            .filter(|w| w.contains("owner"))
            .collect();
        assert_eq!(owners.len(), 2, "{owners:?}");
        assert!(
            owners[0].starts_with("key \"k0\": no owner: set owner"),
            "{owners:?}"
        );
        let fleet = load(&ownerless_fleet(dir.path(), 40), &[]).unwrap();
        assert!(
            !fleet
                .warnings
                .iter()
                .any(|w| w.contains("reconcile_interval")),
            "40 keys every 5 minutes is no load: {:?}",
            fleet.warnings
        );
        let busy = load(
            &ownerless_fleet(dir.path(), 40),
            &[("KEYROTD__DAEMON__RECONCILE_INTERVAL", "2s")],
        )
        .unwrap();
        assert!(
            busy.warnings.iter().any(|w| w
                .starts_with("daemon.reconcile_interval: 40 keys every 2s is 20 keys a second")),
            "{:?}",
            busy.warnings
        );
        let owners: Vec<&String> = fleet
            .warnings
            .iter()
            .filter(|w| w.contains("owner"))
            .collect();
        assert_eq!(owners.len(), 1, "{owners:?}");
        assert!(
            owners[0].starts_with(
                "40 keys have no owner (\"k0\", \"k1\", \"k2\" and 37 more): set owner"
            ),
            "{owners:?}"
        );
        // Built in place from the raw lists, the key's lists keep no spare capacity.
        let k = &fleet.keys[0];
        assert_eq!(k.destinations.capacity(), k.destinations.len());
    }

    #[test]
    fn defaults_fill_every_field_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(&config_text(dir.path(), ""), &[]).unwrap();
        assert_eq!(c.daemon.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.daemon.max_concurrent_rotations, 16);
        assert_eq!(c.daemon.reconcile_interval, Some(Duration::from_secs(300)));
        assert_eq!(c.daemon.log_format, LogFormat::Text);
        assert!(c.daemon.admin_token.is_none() && !c.daemon.paused);

        // Names keep their case.
        let ProviderConfig::Aos(p) = &c.providers["Aos-Prod"] else {
            panic!("not aos")
        };
        assert_eq!(p.timeout, Duration::from_secs(10));
        assert!(p.requested_by.starts_with("keyrotd@") && p.requested_by.len() > 8);
        assert_eq!(p.paths.regenerate, "/v1/api-keys/regenerate");

        let StoreConfig::Vault(v) = &c.stores["vault-main"] else {
            panic!("not vault")
        };
        assert_eq!(v.mount, "secret");
        assert!(matches!(&v.auth, VaultAuth::AppRole { mount, .. } if mount == "approle"));

        let k = &c.keys[0];
        assert_eq!(k.timezone, Tz::UTC);
        assert_eq!(k.max_age, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(
            (k.jitter, k.watch),
            (Duration::ZERO, Duration::from_secs(300))
        );
        assert_eq!(k.watch_interval, Duration::from_secs(15));
        assert_eq!(k.store_deadline, Duration::from_secs(60));
        assert!(k.catch_up && k.auto_recover);
        assert_eq!((k.max_rerotations, k.max_regenerations_per_day), (3, 6));
        assert_eq!(
            k.destinations[0].target,
            DestinationTarget::Vault {
                path: "apps/billing".into(),
                field: "api_key".into()
            }
        );
        // reads_from defaults to every store the key writes.
        assert_eq!(k.dependents[0].reads_from, vec!["aws-main", "vault-main"]);
        let verify = k.dependents[0].verify.as_ref().unwrap();
        assert_eq!(
            (verify.expect_status, verify.timeout),
            (200, Duration::from_secs(5))
        );
        match &k.dependents[0].reload {
            Some(ReloadHook::Http {
                method,
                timeout,
                retries,
                signing_key,
                ..
            }) => {
                assert_eq!(
                    (method.as_str(), *timeout, *retries),
                    ("POST", Duration::from_secs(5), 2)
                );
                assert!(signing_key.is_none());
            }
            other => panic!("expected an http hook, got {other:?}"),
        }
        match &k.dependents[1].reload {
            Some(ReloadHook::Command {
                timeout, retries, ..
            }) => {
                assert_eq!((*timeout, *retries), (Duration::from_secs(30), 2));
            }
            other => panic!("expected a command hook, got {other:?}"),
        }
    }

    #[test]
    fn zero_reconcile_interval_disables_reconcile_and_overrides_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(
            dir.path(),
            "reconcile_interval = \"10m\"\nlog_format = \"text\"",
        );
        let c = load(
            &text,
            &[
                ("KEYROTD__DAEMON__RECONCILE_INTERVAL", "0s"),
                ("KEYROTD__DAEMON__LOG_FORMAT", "json"),
                // Not overrides: a single underscore, or the wrong case.
                ("KEYROTD_DAEMON__LISTEN", "x"),
                ("keyrotd__daemon__listen", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.daemon.reconcile_interval, None);
        assert_eq!(c.daemon.log_format, LogFormat::Json);
        assert_eq!(c.daemon.listen.to_string(), "127.0.0.1:9464");
    }

    #[test]
    fn numeric_override_segments_address_array_entries() {
        assert_eq!(
            index_segments("KEYROTD__KEYS__0__WATCH"),
            "KEYROTD__KEYS[0]__WATCH"
        );
        assert_eq!(
            index_segments("KEYROTD__KEYS__1__DESTINATIONS__12__PATH"),
            "KEYROTD__KEYS[1]__DESTINATIONS[12]__PATH"
        );
        assert_eq!(
            index_segments("KEYROTD__DAEMON__LISTEN"),
            "KEYROTD__DAEMON__LISTEN"
        );
    }

    #[test]
    fn tls_files_are_checked_at_load_and_named_by_their_field() {
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(dir.path(), "");
        let base = text.replace(
            "[stores.aws-main]",
            "ca_file = \"missing-ca.pem\"\nclient_cert = \"cert.pem\"\n\n[stores.aws-main]",
        );
        std::fs::write(dir.path().join("cert.pem"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        let Err(ConfigError::Invalid(problems)) = load(&base, &[]) else {
            panic!("expected problems")
        };
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown.len(), 1, "{shown:?}");
        // A relative path is not resolved without a config file: it is read as written.
        assert!(
            shown[0].starts_with("stores.vault-main.ca_file: cannot read ca_file missing-ca.pem"),
            "{shown:?}"
        );

        // Without the CA, the half identity is named at the field that is missing.
        let no_ca = base.replace("ca_file = \"missing-ca.pem\"\n", "");
        let Err(ConfigError::Invalid(problems)) = load(&no_ca, &[]) else {
            panic!("expected problems")
        };
        assert_eq!(
            problems[0].to_string(),
            "stores.vault-main.client_key: client_cert and client_key go together: set both or neither"
        );
    }

    #[test]
    fn a_command_hook_refuses_tls_fields() {
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(dir.path(), "").replace(
            "reload = { command = [\"systemctl\", \"reload\", \"nginx\"] }",
            "reload = { command = [\"true\"], ca_file = \"/x.pem\" }",
        );
        let Err(ConfigError::Invalid(problems)) = load(&text, &[]) else {
            panic!("expected problems")
        };
        assert_eq!(
            problems[0].to_string(),
            "keys[0].dependents[1].reload.ca_file: only an HTTP hook (url) takes ca_file"
        );
    }

    #[test]
    fn key_names_follow_the_documented_pattern() {
        for ok in ["billing-api", "a", "0x_1-b"] {
            assert!(is_valid_key_name(ok), "{ok}");
        }
        for bad in ["", "-a", "_a", "Billing", "a b", "a.b", "é"] {
            assert!(!is_valid_key_name(bad), "{bad}");
        }
    }

    fn problems(r: Result<Config, ConfigError>) -> Vec<Problem> {
        match r {
            Err(ConfigError::Invalid(p)) => p,
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("the config was accepted"),
        }
    }

    #[test]
    fn a_credential_over_plain_http_off_loopback_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(dir.path(), "")
            .replace("https://aos.example.com", "http://aos.example.com")
            .replace("http://127.0.0.1:8200", "http://vault.internal:8200");
        let p = problems(load(&text, &[]));
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["providers.Aos-Prod.base_url", "stores.vault-main.address"],
            "{p:?}"
        );
        assert!(p[0].message.contains("allow_insecure_http"), "{}", p[0]);
        // Each section may opt in; hooks (no credential) never need to.
        let allowed = text
            .replace(
                "kind = \"aos\"\n",
                "kind = \"aos\"\nallow_insecure_http = true\n",
            )
            .replace(
                "kind = \"vault\"\n",
                "kind = \"vault\"\nallow_insecure_http = true\n",
            );
        load(&allowed, &[]).unwrap();
        // Loopback is not a network: no opt-in needed.
        let local =
            config_text(dir.path(), "").replace("https://aos.example.com", "http://localhost:8080");
        load(&local, &[]).unwrap();
    }

    #[test]
    fn an_http_provider_checks_every_url_a_credential_travels_to() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("tok");
        std::fs::write(&tok, "t").unwrap();
        let text = format!(
            r#"
[providers.vx]
kind = "http"
auth = {{ value = {{ file = "{tok}" }} }}
regenerate = {{ url = "http://vx.example/roll", secret_pointer = "/s", key_id_pointer = "/id" }}
status = {{ url = "http://vx.example/status", key_id_pointer = "/id" }}
auth_check = {{ url = "http://vx.example/whoami" }}
"#,
            tok = tok.display()
        );
        let p = problems(load(&text, &[]));
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "providers.vx.regenerate.url",
                "providers.vx.status.url",
                "providers.vx.auth_check.url"
            ],
            "{p:?}"
        );
    }

    #[test]
    fn coordination_names_a_vault_store_and_defaults_its_path_and_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}\n[coordination]\nstore = \"vault-main\"\n",
            config_text(dir.path(), "")
        );
        let c = load(&text, &[]).unwrap();
        let co = c.coordination.expect("coordination");
        assert_eq!(
            (co.store.as_str(), co.path.as_str()),
            ("vault-main", "keyrotd/leases")
        );
        assert_eq!(co.ttl, Duration::from_secs(30));
        let text = format!(
            "{}\n[coordination]\nstore = \"nowhere\"\nttl = \"0s\"\n",
            config_text(dir.path(), "")
        );
        let paths: Vec<String> = problems(load(&text, &[]))
            .into_iter()
            .map(|p| p.path)
            .collect();
        assert_eq!(paths, ["coordination.store", "coordination.ttl"]);
    }

    /// A vendor that keeps two keys live, and a key on it (`extra` goes in the key's table).
    fn dual_text(
        dir: &Path,
        provider_extra: &str,
        key_extra: &str,
        dependent_extra: &str,
    ) -> String {
        let tok = dir.join("tok");
        std::fs::write(&tok, "t").unwrap();
        format!(
            r#"
[providers.vx]
kind = "http"
overlap = "dual"
auth = {{ value = {{ file = "{tok}" }} }}
create = {{ url = "https://vx.example/v1/keys", body = '{{"name": "{{key}}"}}', secret_pointer = "/secret", key_id_pointer = "/id" }}
revoke = {{ url = "https://vx.example/v1/keys/{{key_id}}" }}
list = {{ url = "https://vx.example/v1/keys?name={{key}}", ids_pointer = "/data", id_pointer = "/id" }}
{provider_extra}

[stores.files]
kind = "file"
dir = "{dir}"

[[keys]]
name = "payments"
provider = "vx"
{key_extra}
  [[keys.destinations]]
  store = "files"
  file = "payments.key"
  [[keys.dependents]]
  name = "api"
  verify = {{ url = "http://10.0.0.7/health" }}
  reload = {{ url = "http://10.0.0.7/reload" }}
  {dependent_extra}
"#,
            tok = tok.display(),
            dir = dir.display(),
        )
    }

    fn paths(r: Result<Config, ConfigError>) -> Vec<String> {
        problems(r).into_iter().map(|p| p.path).collect()
    }

    #[test]
    fn a_dual_vendor_loads_with_its_rollout_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let text = dual_text(
            dir.path(),
            "",
            "",
            "confirm = { url = \"http://10.0.0.7/key\", fingerprint_pointer = \"/fingerprint\" }",
        );
        let c = load(&text, &[]).unwrap();
        let ProviderConfig::Http(h) = &c.providers["vx"] else {
            panic!("not http")
        };
        assert_eq!(h.overlap, Overlap::Dual);
        assert!(h.regenerate.is_none() && h.create.is_some() && h.revoke.is_some());
        assert_eq!(h.revoke.as_ref().unwrap().method, "DELETE");
        let k = &c.keys[0];
        assert_eq!(k.rollout.overlap, Overlap::Dual);
        assert!(!k.rollout.canary);
        assert_eq!(k.rollout.confirm_deadline, Duration::from_secs(300));
        assert_eq!(k.rollout.canary_watch, Duration::from_secs(60));
        assert_eq!(
            (k.rollout.revoke_after, k.rollout.reload_coalesce),
            (None, None)
        );
        let confirm = k.dependents[0].confirm.as_ref().expect("confirm");
        assert_eq!(confirm.fingerprint_pointer, "/fingerprint");
    }

    #[test]
    fn check_config_names_the_call_a_dual_vendor_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let full = dual_text(dir.path(), "", "", "");
        let no_revoke = full.replace("revoke = {", "# revoke = {");
        let p = problems(load(&no_revoke, &[]));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "providers.vx.revoke");
        assert!(
            p[0].message.contains("required with overlap = \"dual\""),
            "{}",
            p[0]
        );
        let no_create = full.replace("create = {", "# create = {");
        assert_eq!(paths(load(&no_create, &[])), ["providers.vx.create"]);
        // A key replaced in one call is overlap "none": it needs regenerate, and the dual calls
        // make no sense on it.
        let none = full.replace("overlap = \"dual\"", "overlap = \"none\"");
        assert_eq!(
            paths(load(&none, &[])),
            [
                "providers.vx.regenerate",
                "providers.vx.create",
                "providers.vx.revoke",
                "providers.vx.list"
            ]
        );
    }

    #[test]
    fn an_aos_portal_cannot_be_dual_and_an_overlap_none_key_cannot_canary() {
        let dir = tempfile::tempdir().unwrap();
        let aos = config_text(dir.path(), "")
            .replace("kind = \"aos\"\n", "kind = \"aos\"\noverlap = \"dual\"\n");
        let p = problems(load(&aos, &[]));
        assert_eq!(p[0].path, "providers.Aos-Prod.overlap");
        assert!(p[0].message.contains("invalidates the old key"), "{}", p[0]);

        let canary = config_text(dir.path(), "").replace(
            "max_age = \"30d\"\n",
            "max_age = \"30d\"\nrollout = \"canary\"\nconfirm_deadline = \"1m\"\n",
        );
        let p = problems(load(&canary, &[]));
        let shown: Vec<String> = p.iter().map(|p| p.to_string()).collect();
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(
            shown[0].starts_with(
                "keys[0].confirm_deadline: used only by keys whose provider keeps two keys live"
            ),
            "{shown:?}"
        );
        assert!(
            shown[1].starts_with(
                "keys[0].rollout: rollout = \"canary\" needs a provider that keeps two keys live"
            ),
            "{shown:?}"
        );
        assert!(
            shown[1].contains("the moment the new one exists"),
            "{shown:?}"
        );
    }

    #[test]
    fn a_canary_rollout_needs_a_canary_and_revoke_after_gives_time_to_confirm() {
        let dir = tempfile::tempdir().unwrap();
        let text = dual_text(
            dir.path(),
            "",
            "rollout = \"canary\"\nconfirm_deadline = \"10m\"\nrevoke_after = \"5m\"",
            "",
        );
        assert_eq!(
            paths(load(&text, &[])),
            ["keys[0].rollout", "keys[0].revoke_after"]
        );
        let ok = dual_text(
            dir.path(),
            "",
            "rollout = \"canary\"\nrevoke_after = \"1h\"",
            "canary = true",
        );
        let c = load(&ok, &[]).unwrap();
        assert!(c.keys[0].rollout.canary && c.keys[0].dependents[0].canary);
        assert_eq!(
            c.keys[0].rollout.revoke_after,
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn keys_sharing_a_dual_vendor_list_only_their_own_ids() {
        let dir = tempfile::tempdir().unwrap();
        let second = "\n[[keys]]\nname = \"refunds\"\nprovider = \"vx\"\n  [[keys.destinations]]\n  store = \"files\"\n  file = \"refunds.key\"\n";
        let text = format!("{}{second}", dual_text(dir.path(), "", "", ""));
        load(&text, &[]).unwrap();
        let shared = text.replace("?name={key}", "");
        let p = problems(load(&shared, &[]));
        assert_eq!(p[0].path, "providers.vx.list.url");
        assert!(p[0].message.contains("payments, refunds"), "{}", p[0]);
    }

    #[test]
    fn a_group_gives_its_keys_its_schedule_and_takes_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let group = "\n[groups.billing-set]\nschedule = \"0 3 * * *\"\ntimezone = \"Europe/Zurich\"\njitter = \"5m\"\n";
        let text = format!(
            "{group}{}",
            dual_text(
                dir.path(),
                "",
                "group = \"billing-set\"\nreload_coalesce = \"2s\"",
                ""
            )
        );
        let c = load(&text, &[]).unwrap();
        let k = &c.keys[0];
        assert_eq!(k.rollout.group.as_deref(), Some("billing-set"));
        assert_eq!(
            k.schedule.as_ref().map(|s| s.text.as_str()),
            Some("0 3 * * *")
        );
        assert_eq!(k.timezone, chrono_tz::Europe::Zurich);
        assert_eq!(k.jitter, Duration::from_secs(300));
        assert_eq!(k.rollout.reload_coalesce, Some(Duration::from_secs(2)));

        let own = format!(
            "{group}{}",
            dual_text(
                dir.path(),
                "",
                "group = \"billing-set\"\nschedule = \"@daily\"",
                ""
            )
        );
        assert_eq!(paths(load(&own, &[])), ["keys[0].schedule"]);
        let unknown = dual_text(dir.path(), "", "group = \"nope\"", "");
        let p = problems(load(&unknown, &[]));
        assert_eq!(
            p[0].to_string(),
            "keys[0].group: unknown group \"nope\" (none are configured)"
        );
        let bad = format!(
            "[groups.g]\nschedul = \"@daily\"\n{}",
            dual_text(dir.path(), "", "", "")
        );
        assert_eq!(paths(load(&bad, &[])), ["groups.g.schedul"]);
    }

    #[test]
    fn max_retry_after_defaults_to_five_minutes_and_must_be_positive() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(&config_text(dir.path(), ""), &[]).unwrap();
        let ProviderConfig::Aos(p) = &c.providers["Aos-Prod"] else {
            panic!("not aos")
        };
        assert_eq!(p.max_retry_after, Duration::from_secs(300));
        let text = config_text(dir.path(), "").replace(
            "kind = \"aos\"\n",
            "kind = \"aos\"\nmax_retry_after = \"0s\"\n",
        );
        let p = problems(load(&text, &[]));
        assert!(p[0].path.ends_with("max_retry_after"), "{p:?}");
    }
}
