//! The TOML file's shape, as serde sees it. No I/O, no validation beyond types.
//!
//! Every struct denies unknown fields, so a typo is an error naming its path instead of a setting that
//! silently does nothing. Values that need more than a type check (durations, URLs, names that refer to
//! other sections, schedules) stay strings here and are checked by [`super::load`], which can then report
//! every problem at once.
//!
//! Two details exist because values may come from `KEYROTD__*` environment variables, which are always
//! strings: numbers ([`Num`]) and booleans ([`Flag`]) also accept a string that parses. Strings are never
//! guessed into numbers, so `account_id = "12345"` stays a string whether it comes from the file or the
//! environment.
//!
//! [`from_value`] turns the merged document into a [`RawConfig`] piece by piece (each provider, store,
//! key, destination and dependent on its own), so that one typo does not hide the next.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::load::Problem;
use crate::secret::SecretRef;

/// The start of the message for a credential written inline; [`super::load`] completes it with the
/// field's name and the right form.
pub const INLINE_CREDENTIAL: &str = "inline credentials are not allowed";

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub daemon: RawDaemon,
    #[serde(default)]
    pub providers: BTreeMap<String, RawProvider>,
    #[serde(default)]
    pub stores: BTreeMap<String, RawStore>,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    pub coordination: Option<RawCoordination>,
    #[serde(default)]
    pub notify: BTreeMap<String, RawNotifyTarget>,
    /// `[groups.NAME]`: keys that rotate together on one schedule.
    #[serde(default)]
    pub groups: BTreeMap<String, RawGroup>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    pub state_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub admin_token: Option<RawSecret>,
    pub max_concurrent_rotations: Option<Num>,
    pub reconcile_interval: Option<String>,
    pub log_format: Option<String>,
    pub paused: Option<Flag>,
}

/// A `[providers.NAME]` table, chosen by `kind`.
// A handful per config, read once: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawProvider {
    Aos(RawAosProvider),
    Http(RawHttpProvider),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAosProvider {
    pub base_url: String,
    pub management_token: RawSecret,
    pub account_id: Option<String>,
    pub timeout: Option<String>,
    pub requested_by: Option<String>,
    pub paths: Option<RawAosPaths>,
    /// Only "none": the portal invalidates the old key when it issues the new one.
    pub overlap: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub max_retry_after: Option<String>,
    pub allow_insecure_http: Option<Flag>,
    pub max_concurrent_requests: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAosPaths {
    pub status: Option<String>,
    pub regenerate: Option<String>,
    pub auth_check: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpProvider {
    pub auth: Option<RawHttpAuth>,
    /// "none" (default: `regenerate` replaces the key) or "dual" (`create` a second key, `revoke` the
    /// old one later).
    pub overlap: Option<String>,
    pub regenerate: Option<RawHttpRegenerate>,
    pub create: Option<RawHttpRegenerate>,
    pub revoke: Option<RawHttpRevoke>,
    pub list: Option<RawHttpList>,
    pub status: Option<RawHttpStatus>,
    pub auth_check: Option<RawHttpAuthCheck>,
    pub account_id: Option<String>,
    pub timeout: Option<String>,
    pub requested_by: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub max_retry_after: Option<String>,
    pub allow_insecure_http: Option<Flag>,
    pub max_concurrent_requests: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpAuth {
    pub header: Option<String>,
    pub prefix: Option<String>,
    pub value: RawSecret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpRegenerate {
    pub method: Option<String>,
    pub url: String,
    pub body: Option<String>,
    pub secret_pointer: String,
    pub key_id_pointer: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpRevoke {
    pub method: Option<String>,
    pub url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpList {
    pub method: Option<String>,
    pub url: String,
    pub ids_pointer: String,
    pub id_pointer: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpStatus {
    pub url: String,
    pub key_id_pointer: String,
    pub last_rotated_pointer: Option<String>,
    pub active_pointer: Option<String>,
    pub account_id_pointer: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpAuthCheck {
    pub url: String,
    pub header: Option<String>,
    pub prefix: Option<String>,
}

/// A `[stores.NAME]` table, chosen by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawStore {
    Vault(RawVaultStore),
    Aws(RawAwsStore),
    File(RawFileStore),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVaultStore {
    pub address: String,
    pub token: Option<RawSecret>,
    pub approle: Option<RawAppRole>,
    pub mount: Option<String>,
    pub namespace: Option<String>,
    pub timeout: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub allow_insecure_http: Option<Flag>,
    pub max_concurrent_requests: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAppRole {
    pub role_id: RawSecret,
    pub secret_id: RawSecret,
    pub mount: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAwsStore {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub timeout: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub max_concurrent_requests: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileStore {
    pub dir: PathBuf,
    pub max_concurrent_requests: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCoordination {
    pub kind: Option<String>,
    pub store: String,
    pub path: Option<String>,
    pub ttl: Option<String>,
}

impl RawProvider {
    pub fn max_concurrent_requests(&self) -> Option<usize> {
        match self {
            RawProvider::Aos(p) => p.max_concurrent_requests,
            RawProvider::Http(p) => p.max_concurrent_requests,
        }
    }
}

impl RawStore {
    pub fn max_concurrent_requests(&self) -> Option<usize> {
        match self {
            RawStore::Vault(s) => s.max_concurrent_requests,
            RawStore::Aws(s) => s.max_concurrent_requests,
            RawStore::File(s) => s.max_concurrent_requests,
        }
    }
}

/// One `[[keys]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub name: String,
    pub provider: String,
    pub schedule: Option<String>,
    pub timezone: Option<String>,
    pub max_age: Option<String>,
    pub jitter: Option<String>,
    pub window: Option<RawWindow>,
    pub catch_up: Option<Flag>,
    pub watch: Option<String>,
    pub watch_interval: Option<String>,
    pub store_deadline: Option<String>,
    pub auto_recover: Option<Flag>,
    pub max_rerotations: Option<Num>,
    pub max_regenerations_per_day: Option<Num>,
    pub owner: Option<RawOwner>,
    pub approval: Option<RawApproval>,
    pub notify: Option<Vec<String>>,
    pub on_first_contact: Option<String>,
    pub rollout: Option<String>,
    pub confirm_deadline: Option<String>,
    pub revoke_after: Option<String>,
    pub canary_watch: Option<String>,
    pub reload_coalesce: Option<String>,
    pub group: Option<String>,
    #[serde(default)]
    pub destinations: Vec<RawDestination>,
    #[serde(default)]
    pub dependents: Vec<RawDependent>,
}

/// `owner = { name, contact, runbook }`: who a key belongs to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOwner {
    pub name: String,
    pub contact: Option<String>,
    pub runbook: Option<String>,
}

/// `approval = { required, timeout, notify }`: scheduled rotations wait for an operator's approval.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApproval {
    pub required: Option<Flag>,
    pub timeout: Option<String>,
    pub notify: Option<Vec<String>>,
}

/// A `[notify.NAME]` table, chosen by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawNotifyTarget {
    Webhook(RawWebhook),
    Command(RawNotifyCommand),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: RawUrl,
    pub timeout: Option<String>,
    pub signing_key: Option<RawSecret>,
    pub retries: Option<Num>,
    pub events: Option<Vec<String>>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub allow_insecure_http: Option<Flag>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotifyCommand {
    pub command: Vec<String>,
    pub timeout: Option<String>,
    pub env: Option<BTreeMap<String, String>>,
    pub retries: Option<Num>,
    pub events: Option<Vec<String>>,
}

/// A URL written as text, or read from a credential reference when the URL itself carries a token
/// (chat incoming webhooks put theirs in the path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawUrl {
    Text(String),
    Secret(SecretRef),
}

impl<'de> Deserialize<'de> for RawUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawUrl;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a URL, or a reference { env = \"NAME\" } or { file = \"/path\" }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawUrl, E> {
                Ok(RawUrl::Text(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawUrl, A::Error> {
                SecretRef::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawUrl::Secret)
            }
        }
        d.deserialize_any(V)
    }
}

/// A `[groups.NAME]` table: the schedule its keys share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    pub schedule: Option<String>,
    pub timezone: Option<String>,
    pub jitter: Option<String>,
    pub window: Option<RawWindow>,
    pub catch_up: Option<Flag>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    pub days: String,
    pub start: String,
    pub end: String,
}

/// A destination: `store` plus the fields its store kind needs (checked in [`super::load`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestination {
    pub store: String,
    /// vault
    pub path: Option<String>,
    /// vault (required), aws (optional)
    pub field: Option<String>,
    /// aws
    pub secret_id: Option<String>,
    /// file
    pub file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDependent {
    pub name: String,
    pub reads_from: Option<Vec<String>>,
    pub verify: Option<RawVerify>,
    pub reload: Option<RawReload>,
    pub canary: Option<Flag>,
    pub confirm: Option<RawConfirm>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfirm {
    pub url: String,
    pub fingerprint_pointer: String,
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVerify {
    pub url: String,
    pub expect_status: Option<Num>,
    pub timeout: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// A reload hook: `url` (HTTP) or `command` (argv), exactly one; checked in [`super::load`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReload {
    pub url: Option<String>,
    pub method: Option<String>,
    pub signing_key: Option<RawSecret>,
    pub command: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub timeout: Option<String>,
    pub retries: Option<Num>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// A credential field: only `{ env = "NAME" }` or `{ file = "/path" }`. Anything else is refused
/// without echoing what was written (it may be the secret itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSecret(pub SecretRef);

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn refuse<E: de::Error>() -> E {
            E::custom(INLINE_CREDENTIAL)
        }
        fn not_a_reference<E: de::Error>() -> E {
            E::custom("expected a reference { env = \"NAME\" } or { file = \"/path\" }")
        }
        impl<'de> Visitor<'de> for V {
            type Value = RawSecret;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a reference { env = \"NAME\" } or { file = \"/path\" }")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<RawSecret, E> {
                Err(refuse())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<RawSecret, E> {
                Err(refuse())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawSecret, E> {
                Err(refuse())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawSecret, E> {
                Err(refuse())
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<RawSecret, E> {
                Err(not_a_reference())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<RawSecret, A::Error> {
                Err(not_a_reference())
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawSecret, A::Error> {
                SecretRef::deserialize(de::value::MapAccessDeserializer::new(map)).map(RawSecret)
            }
        }
        d.deserialize_any(V)
    }
}

/// A non-negative integer; also accepts a string of digits (environment overrides are strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Num(pub u64);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num, E> {
                Ok(Num(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num, E> {
                u64::try_from(v)
                    .map(Num)
                    .map_err(|_| E::custom(format!("expected a non-negative integer, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Num, E> {
                v.trim()
                    .parse()
                    .map(Num)
                    .map_err(|_| E::custom(format!("expected a non-negative integer, got {v:?}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A boolean; also accepts "true"/"false" (environment overrides are strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true or false")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Flag, E> {
                match v.trim().to_ascii_lowercase().as_str() {
                    "true" => Ok(Flag(true)),
                    "false" => Ok(Flag(false)),
                    _ => Err(E::custom(format!("expected true or false, got {v:?}"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// What [`read`] made of the document: every piece that has the right shape, and a problem for each
/// piece that does not. Names of broken entries are kept so that validation does not also call them
/// unknown.
#[derive(Debug, Default)]
pub struct Parsed {
    pub raw: RawConfig,
    /// The position in the file of each entry of `raw.keys` (broken keys are left out of `raw.keys`).
    pub key_indices: Vec<usize>,
    /// Every `[providers.NAME]` in the file, well-formed or not.
    pub provider_names: BTreeSet<String>,
    /// Every `[stores.NAME]` in the file, with its kind when that could be read.
    pub store_kinds: BTreeMap<String, Option<&'static str>>,
    /// Every `[notify.NAME]` in the file, well-formed or not.
    pub notify_names: BTreeSet<String>,
    /// Every `[groups.NAME]` in the file, well-formed or not.
    pub group_names: BTreeSet<String>,
    pub problems: Vec<Problem>,
}

/// [`read`], for callers that only want a complete [`RawConfig`].
pub fn from_value(root: &Value) -> Result<RawConfig, Vec<Problem>> {
    let parsed = read(root);
    if parsed.problems.is_empty() {
        Ok(parsed.raw)
    } else {
        Err(parsed.problems)
    }
}

/// Reads the merged document (file + environment overrides) piece by piece: each provider, store,
/// key, destination and dependent on its own, so that every shape problem is found, each with its path.
pub fn read(root: &Value) -> Parsed {
    let mut out = Parsed::default();
    let problems = &mut out.problems;
    let Some(table) = root.as_object() else {
        problems.push(Problem::new("", "the configuration must be a TOML table"));
        return out;
    };
    for field in table.keys() {
        if ![
            "daemon",
            "providers",
            "stores",
            "keys",
            "coordination",
            "notify",
            "groups",
        ]
        .contains(&field.as_str())
        {
            problems.push(Problem::new(
                field,
                "unknown field (expected one of daemon, providers, stores, keys, coordination, notify, groups)",
            ));
        }
    }
    let raw = &mut out.raw;
    if let Some(v) = table.get("daemon") {
        raw.daemon = piece(v, "daemon", problems).unwrap_or_default();
    }
    if let Some(v) = table.get("providers") {
        for (name, v) in entries(v, "providers", problems) {
            out.provider_names.insert(name.clone());
            let path = format!("providers.{name}");
            let provider = match kind_and_rest(v, &path, &["aos", "http"], problems) {
                Some(("aos", rest)) => piece(&rest, &path, problems).map(RawProvider::Aos),
                Some((_, rest)) => piece(&rest, &path, problems).map(RawProvider::Http),
                None => None,
            };
            if let Some(p) = provider {
                raw.providers.insert(name.clone(), p);
            }
        }
    }
    if let Some(v) = table.get("stores") {
        for (name, v) in entries(v, "stores", problems) {
            let path = format!("stores.{name}");
            let kind = kind_and_rest(v, &path, &["vault", "aws", "file"], problems);
            out.store_kinds
                .insert(name.clone(), kind.as_ref().map(|(k, _)| *k));
            let store = match kind {
                Some(("vault", rest)) => piece(&rest, &path, problems).map(RawStore::Vault),
                Some(("aws", rest)) => piece(&rest, &path, problems).map(RawStore::Aws),
                Some((_, rest)) => piece(&rest, &path, problems).map(RawStore::File),
                None => None,
            };
            if let Some(s) = store {
                raw.stores.insert(name.clone(), s);
            }
        }
    }
    if let Some(v) = table.get("keys") {
        match v.as_array() {
            Some(keys) => {
                for (i, v) in keys.iter().enumerate() {
                    if let Some(k) = key(v, &format!("keys[{i}]"), problems) {
                        raw.keys.push(k);
                        out.key_indices.push(i);
                    }
                }
            }
            None => problems.push(Problem::new(
                "keys",
                "expected an array of tables: write each key as [[keys]]",
            )),
        }
    }
    if let Some(v) = table.get("coordination") {
        raw.coordination = piece(v, "coordination", problems);
    }
    if let Some(v) = table.get("notify") {
        for (name, v) in entries(v, "notify", problems) {
            out.notify_names.insert(name.clone());
            let path = format!("notify.{name}");
            let target = match kind_and_rest(v, &path, &["webhook", "command"], problems) {
                Some(("webhook", rest)) => {
                    piece(&rest, &path, problems).map(RawNotifyTarget::Webhook)
                }
                Some((_, rest)) => piece(&rest, &path, problems).map(RawNotifyTarget::Command),
                None => None,
            };
            if let Some(t) = target {
                raw.notify.insert(name.clone(), t);
            }
        }
    }
    if let Some(v) = table.get("groups") {
        for (name, v) in entries(v, "groups", problems) {
            out.group_names.insert(name.clone());
            if let Some(g) = piece(v, &format!("groups.{name}"), problems) {
                raw.groups.insert(name.clone(), g);
            }
        }
    }
    out
}

/// A `[[keys]]` entry, its destinations and dependents each checked on their own.
fn key(v: &Value, path: &str, problems: &mut Vec<Problem>) -> Option<RawKey> {
    let Some(table) = v.as_object() else {
        problems.push(Problem::new(path, "expected a table"));
        return None;
    };
    let mut head = table.clone();
    let destinations = head.remove("destinations");
    let dependents = head.remove("dependents");
    let mut key: Option<RawKey> = piece(&Value::Object(head), path, problems);
    let destinations: Vec<Option<RawDestination>> = list(
        destinations.as_ref(),
        &format!("{path}.destinations"),
        problems,
    );
    let dependents: Vec<Option<RawDependent>> =
        list(dependents.as_ref(), &format!("{path}.dependents"), problems);
    if let Some(k) = key.as_mut() {
        if destinations.iter().any(Option::is_none) || dependents.iter().any(Option::is_none) {
            return None;
        }
        k.destinations = destinations.into_iter().flatten().collect();
        k.dependents = dependents.into_iter().flatten().collect();
    }
    key
}

fn list<T: DeserializeOwned>(
    v: Option<&Value>,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Vec<Option<T>> {
    match v {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| piece(item, &format!("{path}[{i}]"), problems))
            .collect(),
        Some(_) => {
            problems.push(Problem::new(path, "expected an array of tables"));
            vec![None]
        }
    }
}

fn entries<'a>(
    v: &'a Value,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Vec<(&'a String, &'a Value)> {
    match v.as_object() {
        Some(map) => map.iter().collect(),
        None => {
            problems.push(Problem::new(path, "expected a table of named entries"));
            Vec::new()
        }
    }
}

/// Splits a `kind`-tagged table into its kind and the remaining fields.
fn kind_and_rest(
    v: &Value,
    path: &str,
    kinds: &[&'static str],
    problems: &mut Vec<Problem>,
) -> Option<(&'static str, Value)> {
    let Some(table) = v.as_object() else {
        problems.push(Problem::new(path, "expected a table"));
        return None;
    };
    let expected = kinds.join(", ");
    let kind = match table.get("kind") {
        None => {
            problems.push(Problem::new(
                format!("{path}.kind"),
                format!("required field is missing (one of: {expected})"),
            ));
            return None;
        }
        Some(Value::String(s)) => s,
        Some(_) => {
            problems.push(Problem::new(
                format!("{path}.kind"),
                format!("expected a string (one of: {expected})"),
            ));
            return None;
        }
    };
    let Some(kind) = kinds.iter().find(|k| **k == kind) else {
        problems.push(Problem::new(
            format!("{path}.kind"),
            format!("unknown kind {kind:?} (expected one of: {expected})"),
        ));
        return None;
    };
    let mut rest = table.clone();
    rest.remove("kind");
    Some((kind, Value::Object(rest)))
}

/// Deserializes one piece, turning a failure into a [`Problem`] whose path is `base` + serde's path.
fn piece<T: DeserializeOwned>(v: &Value, base: &str, problems: &mut Vec<Problem>) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(v) {
        Ok(t) => Some(t),
        Err(e) => {
            let inner = e.path().to_string();
            let mut path = match (base.is_empty(), inner.as_str()) {
                (_, ".") => base.to_string(),
                (true, _) => inner,
                (false, _) => format!("{base}.{inner}"),
            };
            let message = e.into_inner().to_string();
            let message = if let Some(field) = quoted_after(&message, "missing field ") {
                path = format!("{path}.{field}");
                "required field is missing".to_string()
            } else if let Some(field) = quoted_after(&message, "unknown field ") {
                if !path.ends_with(&format!(".{field}")) && path != field {
                    path = if path.is_empty() {
                        field.to_string()
                    } else {
                        format!("{path}.{field}")
                    };
                }
                match message.split_once(", expected ") {
                    Some((_, expected)) => {
                        format!("unknown field (expected {})", expected.replace('`', ""))
                    }
                    None => "unknown field".to_string(),
                }
            } else if message == INLINE_CREDENTIAL {
                let field = path.rsplit('.').next().unwrap_or("field");
                format!(
                    "{INLINE_CREDENTIAL}; write {field} = {{ env = \"NAME\" }} or {{ file = \"/path\" }}"
                )
            } else {
                message
            };
            problems.push(Problem::new(path, message));
            None
        }
    }
}

/// `missing field `x`` -> `x`.
fn quoted_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?.strip_prefix('`')?;
    rest.split_once('`').map(|(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(v: Value) -> Vec<String> {
        from_value(&v)
            .expect_err("expected problems")
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn unknown_fields_are_named_by_their_path_even_inside_kind_tagged_tables() {
        let p = problems(json!({
            "daemon": { "lisen": "127.0.0.1:1" },
            "providers": { "Aos-Prod": { "kind": "aos", "base_url": "https://x", "management_token": {"env": "T"}, "timout": "1s" } },
            "keys": [ { "name": "a", "provider": "Aos-Prod", "destinations": [ { "store": "s", "paht": "x" } ] } ],
        }));
        assert!(
            p.iter()
                .any(|m| m.starts_with("daemon.lisen: unknown field")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("providers.Aos-Prod.timout: unknown field")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("keys[0].destinations[0].paht: unknown field")),
            "{p:?}"
        );
    }

    #[test]
    fn an_inline_credential_is_refused_without_echoing_it() {
        let p = problems(json!({
            "providers": { "p": { "kind": "aos", "base_url": "https://x", "management_token": "sk_live_leaked" } },
        }));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            p[0],
            "providers.p.management_token: inline credentials are not allowed; \
             write management_token = { env = \"NAME\" } or { file = \"/path\" }"
        );
        assert!(!p[0].contains("sk_live_leaked"));
    }

    #[test]
    fn numbers_and_flags_accept_strings_but_strings_stay_strings() {
        let raw = from_value(&json!({
            "daemon": { "max_concurrent_rotations": "4", "paused": "true" },
            "providers": { "p": { "kind": "aos", "base_url": "https://x", "management_token": {"env": "T"}, "account_id": "12345" } },
        }))
        .unwrap();
        assert_eq!(raw.daemon.max_concurrent_rotations, Some(Num(4)));
        assert_eq!(raw.daemon.paused, Some(Flag(true)));
        let RawProvider::Aos(p) = &raw.providers["p"] else {
            panic!("not aos")
        };
        assert_eq!(p.account_id.as_deref(), Some("12345"));
    }

    #[test]
    fn missing_and_unknown_kinds_are_named() {
        let p = problems(json!({
            "stores": { "a": { "dir": "/x" }, "b": { "kind": "valt" } },
        }));
        assert!(
            p.iter()
                .any(|m| m.starts_with("stores.a.kind: required field is missing")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|m| m.starts_with("stores.b.kind: unknown kind \"valt\"")),
            "{p:?}"
        );
    }

    #[test]
    fn the_piecewise_reader_and_the_serde_shape_agree() {
        let doc = json!({
            "daemon": { "listen": "127.0.0.1:1" },
            "providers": { "p": { "kind": "http", "regenerate": { "url": "https://x", "secret_pointer": "/s", "key_id_pointer": "/id" } } },
            "stores": { "v": { "kind": "vault", "address": "https://v", "token": { "env": "T" } } },
            "keys": [ { "name": "a", "provider": "p", "destinations": [ { "store": "v", "path": "p", "field": "f" } ],
                        "dependents": [ { "name": "d", "reload": { "command": ["true"] } } ] } ],
        });
        let piecewise = from_value(&doc).unwrap();
        let whole: RawConfig = serde_json::from_value(doc).unwrap();
        assert_eq!(format!("{piecewise:?}"), format!("{whole:?}"));
    }
}
