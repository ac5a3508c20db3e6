//! HashiCorp Vault / OpenBao KV v2 destinations, on `vaultrs`.
//!
//! Owns the KV v2 protocol as keyrotd uses it: a read-modify-write of one field with check-and-set
//! (the other fields at the path are kept; a lost race is retried a few times, then reported as
//! [`StoreErrorKind::Conflict`]), custom metadata `keyrotd_key_id`, `keyrotd_rotation_id`,
//! `keyrotd_rotated_at`, `keyrotd_fingerprint` written after the data, namespaces, and the preflight
//! (`lookup-self` and `sys/capabilities-self`).
//!
//! The requests are vaultrs's KV v2 and AppRole endpoint types (`ReadSecretRequest`, which keeps
//! `metadata.version` and `custom_metadata`; `SetSecretRequest` with its `cas` option;
//! `SetSecretMetadataRequest`; `LoginWithApproleRequest`) plus three small endpoints of our own
//! ([`wire`]); they travel through keyrotd's HTTP client with the token in a sensitive header, and
//! every failure becomes a [`StoreError`] in one place ([`wire::Wire::error`]) that never carries a
//! response body. Nothing is taken from `VAULT_*` environment variables.
//!
//! The token's life ([`token`]): a renewable token is renewed at 2/3 of its TTL by a task the store
//! owns, a `{ file = ... }` token is read again when the file changes, AppRole logs in again only
//! when its token is dead. [`VaultStore::credential_status`] reports what is known of it.
//!
//! Custom metadata belongs to the path, not the field: when two keys share a path, the metadata
//! describes the last one written. [`VaultStore::read`] therefore reports `keyrotd_key_id` only when
//! `keyrotd_fingerprint` matches the field's value.

mod token;
mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Once};
use std::time::Duration;

use rustify::endpoint::{Endpoint, EndpointResult};
use rustify::errors::ClientError as RestError;
use secrecy::ExposeSecret;
use serde_json::{Map, Value};
use tokio_util::sync::{CancellationToken, DropGuard};
use vaultrs::api::kv2::requests::{
    DeleteSecretMetadataRequest, ListSecretsRequest, ReadSecretMetadataRequest, ReadSecretRequest,
    SetSecretMetadataRequest, SetSecretRequest, SetSecretRequestOptions,
};
use vaultrs::api::kv2::responses::{
    ListSecretsResponse, ReadSecretMetadataResponse, ReadSecretResponse, SecretVersionMetadata,
};

use super::{
    CredentialStatus, Prepared, PreparedInner, StoreError, StoreErrorKind, StoredValue,
    WriteRequest,
};
use crate::config::{DestinationTarget, VaultStoreConfig};
use crate::coordination::kv::{Doc, KvError};
use crate::http_client::ClientSettings;
use crate::secret::{Secret, fingerprint_bytes};
use token::Credential;
use wire::{CapabilitiesSelf, Wire};

/// Read-modify-write rounds before a check-and-set race is reported as a conflict.
const CAS_ATTEMPTS: u32 = 5;

/// The label of coordination requests in errors (they name no destination).
const COORDINATION: &str = "coordination";

/// Log targets of the Vault client libraries. Their events and spans carry Vault's `errors`
/// strings (which can echo a request) and report every non-2xx answer, a routine lost
/// check-and-set included, at ERROR; keyrotd logs what matters about each call itself.
pub const QUIET_LOG_TARGETS: &[&str] = &["vaultrs", "rustify"];

/// A filter for the process's subscriber that drops every event and span of
/// [`QUIET_LOG_TARGETS`], whatever `RUST_LOG` says.
pub fn quiet_client_logs() -> tracing_subscriber::filter::FilterFn {
    tracing_subscriber::filter::filter_fn(|meta| {
        let target = meta.target();
        !QUIET_LOG_TARGETS.iter().any(|quiet| {
            target
                .strip_prefix(quiet)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
    })
}

pub struct VaultStore {
    inner: Arc<Inner>,
    /// Starts the token maintenance task once (at construction inside a runtime, else at first use).
    started: Once,
    stop: CancellationToken,
    /// Cancels the maintenance task when the store is dropped (a reload replaced it).
    _stop_on_drop: DropGuard,
}

/// What the store and its maintenance task share.
struct Inner {
    name: String,
    mount: String,
    wire: Wire,
    credential: Credential,
}

impl std::fmt::Debug for VaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultStore")
            .field("name", &self.inner.name)
            .field("mount", &self.inner.mount)
            .field("wire", &self.inner.wire)
            .field("token", &"[redacted]")
            .finish()
    }
}

/// The state of a KV v2 path as the read half of a read-modify-write sees it.
struct Current {
    /// Current version; 0 when the path has never been written (check-and-set 0 = create only).
    version: u64,
    /// The fields of the current version; empty when missing or deleted.
    data: Map<String, Value>,
    custom_metadata: HashMap<String, String>,
}

impl VaultStore {
    /// Builds the client with every setting explicit (nothing from `VAULT_*` variables). Does no
    /// network I/O; inside a Tokio runtime it starts the token maintenance task.
    pub fn new(name: &str, c: &VaultStoreConfig) -> Result<Self, StoreError> {
        let http = crate::http_client::client(&ClientSettings {
            timeout: Some(c.timeout),
            connect_timeout: Some(c.timeout.min(Duration::from_secs(5))),
            tls: c.tls.clone(),
        })
        .map_err(|e| StoreError {
            kind: StoreErrorKind::Permanent,
            store: name.into(),
            target: c.address.to_string(),
            message: e.to_string(),
        })?;
        let namespace = c.namespace.clone().filter(|n| !n.is_empty());
        let stop = CancellationToken::new();
        let store = Self {
            inner: Arc::new(Inner {
                name: name.into(),
                mount: c.mount.trim_matches('/').to_string(),
                wire: Wire::new(name, &c.address, namespace, http),
                credential: Credential::new(name, &c.auth, c.token_file.clone()),
            }),
            started: Once::new(),
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            store.start_maintenance();
        }
        Ok(store)
    }

    fn start_maintenance(&self) {
        self.started.call_once(|| {
            tokio::spawn(token::maintain(
                Arc::downgrade(&self.inner),
                self.inner.credential.changed.clone(),
                self.stop.clone(),
            ));
        });
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// What is known of the token's lifetime: from the last lookup, login or renewal.
    pub fn credential_status(&self) -> Option<CredentialStatus> {
        self.inner.credential.status()
    }

    fn err(&self, kind: StoreErrorKind, target: &str, message: impl Into<String>) -> StoreError {
        StoreError {
            kind,
            store: self.inner.name.clone(),
            target: target.to_string(),
            message: message.into(),
        }
    }

    fn target<'t>(&self, t: &'t DestinationTarget) -> Result<(&'t str, &'t str), StoreError> {
        match t {
            DestinationTarget::Vault { path, field } => {
                let path = path.trim_matches('/');
                if path.is_empty() || path.split('/').any(|s| s.is_empty() || s == "..") {
                    return Err(self.err(
                        StoreErrorKind::Permanent,
                        &t.to_string(),
                        "invalid KV path (empty segment or '..')",
                    ));
                }
                Ok((path, field.as_str()))
            }
            other => Err(self.err(
                StoreErrorKind::Permanent,
                &other.to_string(),
                "not a vault destination (config error: the destination's kind does not match the store)",
            )),
        }
    }

    fn data_path(&self, path: &str) -> String {
        format!("{}/data/{path}", self.inner.mount)
    }

    fn metadata_path(&self, path: &str) -> String {
        format!("{}/metadata/{path}", self.inner.mount)
    }

    /// An authenticated request. The outer error is a token that could not be had; the inner
    /// result is Vault's answer. After a 403, the credential decides whether another token is
    /// worth one more try ([`Credential::after_forbidden`]).
    async fn call<E: Endpoint>(
        &self,
        target: &str,
        endpoint: &E,
    ) -> Result<Result<EndpointResult<E::Response>, RestError>, StoreError> {
        self.start_maintenance();
        let inner = &self.inner;
        let (generation, token) = inner.credential.token(&inner.wire, target).await?;
        let result = inner.wire.send(endpoint, Some(&token)).await;
        if wire::status_of(&result) != Some(403) {
            return Ok(result);
        }
        match inner
            .credential
            .after_forbidden(&inner.wire, target, generation)
            .await?
        {
            Some((_, fresh)) => Ok(inner.wire.send(endpoint, Some(&fresh)).await),
            None => Ok(result),
        }
    }

    /// [`call`](Self::call) of an endpoint whose answer is Vault's envelope around `T`.
    async fn call_data<E: Endpoint<Response = T>, T>(
        &self,
        target: &str,
        what: &str,
        endpoint: &E,
    ) -> Result<Option<T>, StoreError>
    where
        T: serde::de::DeserializeOwned + Send + Sync,
    {
        self.call(target, endpoint)
            .await?
            .and_then(|r| wire::data(&r))
            .map_err(|e| self.inner.wire.error(target, what, &e))
    }

    // ---- KV v2 --------------------------------------------------------------------------------

    /// Reads the path for a read-modify-write (or a read). A path that does not exist is version 0;
    /// a path whose latest version is deleted keeps its version number, so check-and-set still
    /// matches: Vault's 404 for it carries the metadata, and the metadata endpoint is asked when
    /// it does not.
    async fn read_current(&self, target: &str, path: &str) -> Result<Current, StoreError> {
        let endpoint = ReadSecretRequest {
            mount: self.inner.mount.clone(),
            path: path.to_string(),
            version: None,
        };
        let what = format!("read {}", self.data_path(path));
        match self.call(target, &endpoint).await? {
            Ok(r) => Ok(self
                .current(target, &what, &r)?
                .unwrap_or_else(Current::empty)),
            Err(e) if wire::status(&e) == Some(404) => match wire::deleted_version(&e) {
                Some(m) => Ok(Current {
                    version: m.version,
                    data: Map::new(),
                    custom_metadata: m.custom_metadata.unwrap_or_default(),
                }),
                None => self.read_after_404(target, path).await,
            },
            Err(e) => Err(self.inner.wire.error(target, &what, &e)),
        }
    }

    /// A data read's answer as the version, data and custom metadata it holds; `None` for no data.
    fn current(
        &self,
        target: &str,
        what: &str,
        r: &EndpointResult<ReadSecretResponse>,
    ) -> Result<Option<Current>, StoreError> {
        let got: Option<ReadSecretResponse> =
            wire::data(r).map_err(|e| self.inner.wire.error(target, what, &e))?;
        Ok(got.map(|resp| Current {
            version: resp.metadata.version,
            data: match resp.data {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            custom_metadata: resp.metadata.custom_metadata.unwrap_or_default(),
        }))
    }

    /// The data read answered 404 without metadata: ask the metadata endpoint for the version. A
    /// version found there may be newer than the 404 (someone created the path in between): then the
    /// data is read again, so a version is never paired with data older than it — a check-and-set
    /// write based on such a pair would drop the fields of the version it names.
    async fn read_after_404(&self, target: &str, path: &str) -> Result<Current, StoreError> {
        let meta = self.read_metadata(target, path).await?;
        if meta.version == 0 {
            return Ok(meta);
        }
        let endpoint = ReadSecretRequest {
            mount: self.inner.mount.clone(),
            path: path.to_string(),
            version: None,
        };
        let what = format!("read {}", self.data_path(path));
        match self.call(target, &endpoint).await? {
            Ok(r) => Ok(self.current(target, &what, &r)?.unwrap_or(meta)),
            // Still nothing to read: the latest version is deleted; its number is the metadata's
            // (a write since would make a check-and-set on it fail, never succeed).
            Err(e) if wire::status(&e) == Some(404) => Ok(meta),
            Err(e) => Err(self.inner.wire.error(target, &what, &e)),
        }
    }

    /// The version and custom metadata from the metadata endpoint; version 0 when there is none
    /// (or it may not be read: then check-and-set 0 fails and says so).
    async fn read_metadata(&self, target: &str, path: &str) -> Result<Current, StoreError> {
        let endpoint = ReadSecretMetadataRequest {
            mount: self.inner.mount.clone(),
            path: path.to_string(),
        };
        let what = format!("read {}", self.metadata_path(path));
        match self.call(target, &endpoint).await? {
            Ok(r) => {
                let got: Option<ReadSecretMetadataResponse> =
                    wire::data(&r).map_err(|e| self.inner.wire.error(target, &what, &e))?;
                Ok(got.map_or_else(Current::empty, |m| Current {
                    version: m.current_version,
                    data: Map::new(),
                    custom_metadata: m.custom_metadata.unwrap_or_default(),
                }))
            }
            Err(e) if matches!(wire::status(&e), Some(403 | 404)) => Ok(Current::empty()),
            Err(e) => Err(self.inner.wire.error(target, &what, &e)),
        }
    }

    /// The token is valid, and may read the path and create/update both its data and its metadata.
    /// Changes nothing. The lookup refreshes [`credential_status`](Self::credential_status).
    pub async fn preflight(&self, t: &DestinationTarget) -> Result<(), StoreError> {
        let label = t.to_string();
        let (path, _) = self.target(t)?;
        let lookup = self
            .call_data(&label, "token lookup-self", &wire::LookupSelf)
            .await?
            .ok_or_else(|| {
                self.err(
                    StoreErrorKind::Permanent,
                    &label,
                    "token lookup-self: Vault's answer has no data",
                )
            })?;
        self.inner.credential.observed(&lookup);
        let data_path = self.data_path(path);
        let meta_path = self.metadata_path(path);
        let endpoint = CapabilitiesSelf {
            paths: vec![data_path.clone(), meta_path.clone()],
        };
        let caps = self
            .call_data(&label, "sys/capabilities-self", &endpoint)
            .await?
            .unwrap_or_default();
        let caps_of = |p: &str| -> Vec<String> {
            caps.get(p)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let missing = missing_capabilities(
            &data_path,
            &caps_of(&data_path),
            &meta_path,
            &caps_of(&meta_path),
        );
        match missing {
            None => Ok(()),
            Some(text) => {
                Err(self.err(StoreErrorKind::Auth, &label, format!("token lacks {text}")))
            }
        }
    }

    /// Reads the path ahead of a write (preflight): the version and data a check-and-set write will
    /// name and merge into, so that the write on the outage path is one round trip.
    pub async fn prepare(&self, t: &DestinationTarget) -> Result<Prepared, StoreError> {
        let label = t.to_string();
        let (path, _) = self.target(t)?;
        let cur = self.read_current(&label, path).await?;
        Ok(Prepared {
            inner: Some(PreparedInner::Vault {
                version: cur.version,
                data: cur.data,
            }),
        })
    }

    /// Writes the field with check-and-set, keeping the path's other fields. With what `prepare` read,
    /// that is one round trip; when the path changed since (check-and-set refused), or nothing was
    /// read ahead, it reads and writes again until it wins or loses too often. A field that already
    /// holds the value is not written again. Returns the version holding it.
    pub async fn write(
        &self,
        t: &DestinationTarget,
        r: &WriteRequest<'_>,
        prepared: &Prepared,
    ) -> Result<Option<String>, StoreError> {
        let label = t.to_string();
        let (path, field) = self.target(t)?;
        // When the check-and-set on what was read ahead loses (the path moved since), read again.
        if let Some(PreparedInner::Vault { version, data }) = &prepared.inner
            && let Some(version) = self
                .set_field(&label, path, field, r, data, *version)
                .await?
        {
            return Ok(Some(version.to_string()));
        }
        for attempt in 0..CAS_ATTEMPTS {
            let cur = self.read_current(&label, path).await?;
            match self
                .set_field(&label, path, field, r, &cur.data, cur.version)
                .await?
            {
                Some(version) => return Ok(Some(version.to_string())),
                None => {
                    // Someone wrote the path between our read and write: read again. A short random
                    // pause keeps two keyrotd writers from colliding in lockstep.
                    let pause = 10 + rand::random::<u64>() % (25 * u64::from(attempt + 1));
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
        Err(self.err(
            StoreErrorKind::Conflict,
            &label,
            format!(
                "check-and-set on {} lost {CAS_ATTEMPTS} times in a row to concurrent writers",
                self.data_path(path)
            ),
        ))
    }

    /// One check-and-set write of `data` with `field` set, against `version`. `Ok(None)`: the
    /// check-and-set lost. A field that already holds the value is left alone (its version is kept).
    async fn set_field(
        &self,
        label: &str,
        path: &str,
        field: &str,
        r: &WriteRequest<'_>,
        data: &Map<String, Value>,
        version: u64,
    ) -> Result<Option<u64>, StoreError> {
        let value = r.secret.expose_secret();
        if data.get(field).and_then(Value::as_str) == Some(value) {
            return Ok(Some(version));
        }
        let cas = u32::try_from(version).map_err(|_| {
            self.err(
                StoreErrorKind::Permanent,
                label,
                format!("version {version} is beyond what check-and-set can name"),
            )
        })?;
        let mut merged = data.clone();
        merged.insert(field.to_string(), Value::String(value.to_string()));
        let mut endpoint = SetSecretRequest {
            mount: self.inner.mount.clone(),
            path: path.to_string(),
            data: Value::Object(merged),
            options: Some(SetSecretRequestOptions { cas }),
        };
        let result = self.call(label, &endpoint).await;
        crate::secret::wipe_json(&mut endpoint.data);
        let what = format!("write {}", self.data_path(path));
        match result?.and_then(|reply| wire::data::<SecretVersionMetadata>(&reply)) {
            Err(e) if wire::is_cas_mismatch(&e) => Ok(None),
            Err(e) => Err(self.inner.wire.error(label, &what, &e)),
            Ok(m) => Ok(Some(m.map_or(version + 1, |m| m.version))),
        }
    }

    /// keyrotd's custom metadata beside the value (key id, rotation id, time, fingerprint, fence),
    /// merged into what the path has: written after the hooks, off the outage path.
    pub async fn after_write(
        &self,
        t: &DestinationTarget,
        r: &WriteRequest<'_>,
    ) -> Result<(), StoreError> {
        let label = t.to_string();
        let (path, _) = self.target(t)?;
        let cur = self.read_metadata(&label, path).await?;
        self.write_metadata(&label, path, cur.custom_metadata, r)
            .await
    }

    /// Merges keyrotd's custom metadata into the path's existing custom metadata. A metadata POST
    /// changes only the parameters it names, so max_versions, cas_required etc. are left alone.
    async fn write_metadata(
        &self,
        label: &str,
        path: &str,
        mut custom: HashMap<String, String>,
        r: &WriteRequest<'_>,
    ) -> Result<(), StoreError> {
        for (k, v) in [
            ("keyrotd_key_id", r.key_id.to_string()),
            ("keyrotd_rotation_id", r.rotation_id.to_string()),
            ("keyrotd_rotated_at", r.rotated_at.to_rfc3339()),
            ("keyrotd_fingerprint", r.fingerprint.to_string()),
        ] {
            custom.insert(k.to_string(), v);
        }
        if let Some(fence) = r.fence {
            custom.insert("keyrotd_fence".to_string(), fence.to_string());
        }
        let endpoint = SetSecretMetadataRequest {
            mount: self.inner.mount.clone(),
            path: path.to_string(),
            custom_metadata: Some(custom),
            ..Default::default()
        };
        let what = format!("write custom metadata {}", self.metadata_path(path));
        self.call(label, &endpoint)
            .await?
            .map(|_| ())
            .map_err(|e| self.inner.wire.error(label, &what, &e))
    }

    /// The field's value; `Ok(None)` when the path, its latest version or the field is missing.
    pub async fn read(&self, t: &DestinationTarget) -> Result<Option<StoredValue>, StoreError> {
        let label = t.to_string();
        let (path, field) = self.target(t)?;
        let cur = self.read_current(&label, path).await?;
        let Some(v) = cur.data.get(field) else {
            return Ok(None);
        };
        let Some(text) = v.as_str() else {
            return Err(self.err(
                StoreErrorKind::Permanent,
                &label,
                format!("field {field} is not a string"),
            ));
        };
        let fingerprint = fingerprint_bytes(text.as_bytes());
        let meta = |k: &str| cur.custom_metadata.get(k).map(String::as_str);
        let key_id = match (meta("keyrotd_key_id"), meta("keyrotd_fingerprint")) {
            (Some(id), Some(fp)) if fp == fingerprint => Some(id.to_string()),
            _ => None,
        };
        Ok(Some(StoredValue {
            secret: Secret::from(text.to_string()),
            fingerprint,
            key_id,
            version: Some(cur.version.to_string()),
        }))
    }

    // ---- documents for the coordination of replicas (src/coordination/) -----------------------

    /// A whole KV v2 document and its version; `None` when the path has never been written. A path
    /// whose latest version is deleted answers a `null` value with its version, so that the next
    /// check-and-set names it.
    pub async fn doc_read(&self, path: &str) -> Result<Option<Doc>, KvError> {
        let current = self
            .read_current(COORDINATION, path)
            .await
            .map_err(|e| KvError::Unavailable(e.to_string()))?;
        if current.version == 0 {
            return Ok(None);
        }
        let value = if current.data.is_empty() {
            Value::Null
        } else {
            Value::Object(current.data)
        };
        Ok(Some(Doc {
            value,
            version: current.version,
        }))
    }

    /// Writes a whole document with check-and-set `cas` (0: must not exist). Returns the new version.
    pub async fn doc_write(&self, path: &str, value: &Value, cas: u64) -> Result<u64, KvError> {
        let cas32 = u32::try_from(cas)
            .map_err(|_| KvError::Unavailable(format!("version {cas} is beyond check-and-set")))?;
        let endpoint = SetSecretRequest {
            mount: self.inner.mount.clone(),
            path: path.to_string(),
            data: value.clone(),
            options: Some(SetSecretRequestOptions { cas: cas32 }),
        };
        let what = format!("write {}", self.data_path(path));
        let result = self
            .call(COORDINATION, &endpoint)
            .await
            .map_err(|e| KvError::Unavailable(e.to_string()))?;
        match result.and_then(|reply| wire::data::<SecretVersionMetadata>(&reply)) {
            Ok(m) => Ok(m.map_or(cas + 1, |m| m.version)),
            Err(e) if wire::is_cas_mismatch(&e) => Err(KvError::Conflict),
            Err(e) => Err(KvError::Unavailable(
                self.inner.wire.error(COORDINATION, &what, &e).to_string(),
            )),
        }
    }

    /// The names directly under `dir` (KV v2 LIST on its metadata).
    pub async fn doc_list(&self, dir: &str) -> Result<Vec<String>, KvError> {
        let endpoint = ListSecretsRequest {
            mount: self.inner.mount.clone(),
            path: dir.trim_end_matches('/').to_string(),
        };
        let what = format!("list {}", self.metadata_path(dir));
        let result = self
            .call(COORDINATION, &endpoint)
            .await
            .map_err(|e| KvError::Unavailable(e.to_string()))?;
        match result.and_then(|reply| wire::data::<ListSecretsResponse>(&reply)) {
            Ok(list) => Ok(list
                .map(|l| l.keys)
                .unwrap_or_default()
                .into_iter()
                .filter(|k| !k.ends_with('/'))
                .collect()),
            Err(e) if wire::status(&e) == Some(404) => Ok(Vec::new()),
            Err(e) => Err(KvError::Unavailable(
                self.inner.wire.error(COORDINATION, &what, &e).to_string(),
            )),
        }
    }

    /// Removes a document and all its versions.
    pub async fn doc_delete(&self, path: &str) -> Result<(), KvError> {
        let endpoint = DeleteSecretMetadataRequest {
            mount: self.inner.mount.clone(),
            path: path.to_string(),
        };
        let what = format!("delete {}", self.metadata_path(path));
        match self
            .call(COORDINATION, &endpoint)
            .await
            .map_err(|e| KvError::Unavailable(e.to_string()))?
        {
            Ok(_) => Ok(()),
            Err(e) if wire::status(&e) == Some(404) => Ok(()),
            Err(e) => Err(KvError::Unavailable(
                self.inner.wire.error(COORDINATION, &what, &e).to_string(),
            )),
        }
    }
}

impl Current {
    fn empty() -> Current {
        Current {
            version: 0,
            data: Map::new(),
            custom_metadata: HashMap::new(),
        }
    }
}

/// What the token lacks for keyrotd to work on a path, in words; `None` when it lacks nothing.
fn missing_capabilities(
    data_path: &str,
    data: &[String],
    meta_path: &str,
    meta: &[String],
) -> Option<String> {
    let has = |caps: &[String], c: &str| caps.iter().any(|x| x == c || x == "root");
    let mut missing = Vec::new();
    if !has(data, "read") {
        missing.push(format!("read capability on {data_path}"));
    }
    if !has(data, "create") && !has(data, "update") {
        missing.push(format!("create/update capability on {data_path}"));
    }
    if !has(meta, "create") && !has(meta, "update") {
        missing.push(format!(
            "create/update capability on {meta_path} (for keyrotd's custom metadata)"
        ));
    }
    if missing.is_empty() {
        return None;
    }
    let show = |c: &[String]| {
        if c.is_empty() {
            "none".to_string()
        } else {
            c.join(", ")
        }
    };
    Some(format!(
        "{} (has: {} on {data_path}; {} on {meta_path})",
        missing.join(" and "),
        show(data),
        show(meta)
    ))
}

#[cfg(test)]
mod tests {
    //! Behaviour that a healthy OpenBao will not show on demand (endless CAS races, expired AppRole
    //! tokens, 5xx, answers that do not parse) against a scripted server; the real-server tests are
    //! in `tests/stores.rs` and `tests/vault_*.rs`.
    use super::*;
    use crate::config::VaultAuth;
    use chrono::Utc;
    use serde_json::json;
    use uuid::Uuid;
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    fn config(server: &MockServer, auth: VaultAuth) -> VaultStoreConfig {
        VaultStoreConfig {
            address: server.uri().parse().unwrap(),
            auth,
            mount: "secret".into(),
            namespace: None,
            timeout: Duration::from_secs(5),
            token_file: None,
            tls: Default::default(),
        }
    }

    fn store(server: &MockServer, auth: VaultAuth) -> VaultStore {
        VaultStore::new("vault-main", &config(server, auth)).unwrap()
    }

    fn token(t: &str) -> VaultAuth {
        VaultAuth::Token(Secret::from(t.to_string()))
    }

    fn approle() -> VaultAuth {
        VaultAuth::AppRole {
            role_id: Secret::from("r".to_string()),
            secret_id: Secret::from("s".to_string()),
            mount: "approle".into(),
        }
    }

    fn target() -> DestinationTarget {
        DestinationTarget::Vault {
            path: "apps/x".into(),
            field: "api_key".into(),
        }
    }

    /// Vault's response envelope around `data`.
    pub(super) fn envelope(data: Value) -> Value {
        json!({ "request_id": "r", "lease_id": "", "lease_duration": 0, "renewable": false,
                "data": data, "warnings": null, "wrap_info": null, "auth": null })
    }

    fn current(version: u64) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(envelope(json!({
            "data": { "other": "kept" },
            "metadata": { "version": version, "created_time": "2026-01-01T00:00:00Z",
                          "deletion_time": "", "destroyed": false, "custom_metadata": null }
        })))
    }

    fn login(token: &str) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(json!({
            "request_id": "r", "lease_id": "", "lease_duration": 0, "renewable": false,
            "data": null, "warnings": null, "wrap_info": null,
            "auth": { "client_token": token, "accessor": "a", "policies": ["p"],
                      "token_policies": ["p"], "metadata": null, "lease_duration": 600,
                      "renewable": true, "entity_id": "e", "token_type": "service", "orphan": true }
        }))
    }

    fn lookup(ttl: u64, renewable: bool, period: Option<u64>) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(envelope(json!({
            "ttl": ttl, "renewable": renewable, "creation_ttl": ttl, "period": period,
            "explicit_max_ttl": 0, "creation_time": 1_700_000_000u64, "id": "must-not-be-needed"
        })))
    }

    fn forbidden() -> ResponseTemplate {
        ResponseTemplate::new(403).set_body_json(json!({ "errors": ["permission denied"] }))
    }

    async fn write_with(store: &VaultStore) -> Result<Option<String>, StoreError> {
        let secret = Secret::from("aos_sk_live_unit".to_string());
        let fp = crate::secret::fingerprint(&secret);
        let req = WriteRequest {
            key: "k",
            rotation_id: Uuid::new_v4(),
            key_id: "key_1",
            secret: &secret,
            fingerprint: &fp,
            rotated_at: Utc::now(),
            fence: None,
        };
        // As a rotation does: the value, then (off the outage path) the custom metadata.
        let version = store.write(&target(), &req, &Prepared::none()).await?;
        store.after_write(&target(), &req).await?;
        Ok(version)
    }

    async fn count(server: &MockServer, m: &str, p: &str) -> usize {
        server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| r.method.as_str() == m && r.url.path() == p)
            .count()
    }

    #[tokio::test]
    async fn a_check_and_set_lost_every_time_ends_as_conflict() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/data/apps/x"))
            .respond_with(current(3))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1/secret/data/apps/x"))
            .respond_with(ResponseTemplate::new(400).set_body_json(json!({
                "errors": ["check-and-set parameter did not match the current version"]
            })))
            .expect(u64::from(CAS_ATTEMPTS))
            .mount(&server)
            .await;
        let s = store(&server, token("t"));
        let e = write_with(&s).await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Conflict, "{e}");
        assert!(e.is_retryable());
        assert!(!e.to_string().contains("aos_sk_live_unit"));
    }

    /// What preflight read ahead makes the write one round trip: no read before it, and the
    /// check-and-set names the version read ahead, with the other fields kept. When the path moved
    /// since, check-and-set refuses and the write reads again.
    #[tokio::test]
    async fn a_write_prepared_in_preflight_is_one_round_trip_and_falls_back_when_the_path_moved() {
        use wiremock::matchers::body_partial_json;
        let secret = Secret::from("aos_sk_live_unit".to_string());
        let fp = crate::secret::fingerprint(&secret);
        let req = WriteRequest {
            key: "k",
            rotation_id: Uuid::new_v4(),
            key_id: "key_1",
            secret: &secret,
            fingerprint: &fp,
            rotated_at: Utc::now(),
            fence: None,
        };
        for moved in [false, true] {
            let server = MockServer::start().await;
            let reads = Mock::given(method("GET"))
                .and(path("/v1/secret/data/apps/x"))
                .respond_with(current(if moved { 4 } else { 3 }));
            reads.mount(&server).await;
            let s = store(&server, token("t"));
            let prepared = s.prepare(&target()).await.unwrap();
            server.reset().await;
            Mock::given(method("GET"))
                .and(path("/v1/secret/data/apps/x"))
                .respond_with(current(5))
                .expect(u64::from(moved))
                .mount(&server)
                .await;
            let cas = if moved { 5 } else { 3 };
            Mock::given(method("POST"))
                .and(path("/v1/secret/data/apps/x"))
                .and(body_partial_json(
                    json!({ "options": { "cas": cas }, "data": { "other": "kept" } }),
                ))
                .respond_with(ResponseTemplate::new(200).set_body_json(envelope(json!({
                    "version": cas + 1, "created_time": "", "deletion_time": "", "destroyed": false
                }))))
                .expect(1)
                .mount(&server)
                .await;
            if moved {
                // The version read ahead (4) is stale: Vault refuses it.
                Mock::given(method("POST"))
                    .and(path("/v1/secret/data/apps/x"))
                    .and(body_partial_json(json!({ "options": { "cas": 4 } })))
                    .respond_with(ResponseTemplate::new(400).set_body_json(json!({
                        "errors": ["check-and-set parameter did not match the current version"]
                    })))
                    .expect(1)
                    .mount(&server)
                    .await;
            }
            let version = s.write(&target(), &req, &prepared).await.unwrap();
            assert_eq!(version, Some((cas + 1).to_string()), "moved: {moved}");
        }
    }

    #[tokio::test]
    async fn a_deleted_latest_version_without_metadata_in_its_404_takes_cas_from_the_metadata() {
        use wiremock::matchers::body_partial_json;
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/data/apps/x"))
            .respond_with(ResponseTemplate::new(404).set_body_json(json!({ "errors": [] })))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/metadata/apps/x"))
            .respond_with(ResponseTemplate::new(200).set_body_json(envelope(json!({
                "cas_required": false, "created_time": "", "current_version": 7,
                "delete_version_after": "0s", "max_versions": 0, "oldest_version": 1,
                "updated_time": "", "custom_metadata": { "owner": "ops" }, "versions": {}
            }))))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1/secret/data/apps/x"))
            .and(body_partial_json(json!({ "options": { "cas": 7 } })))
            .respond_with(ResponseTemplate::new(200).set_body_json(envelope(json!({
                "version": 8, "created_time": "", "deletion_time": "", "destroyed": false
            }))))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1/secret/metadata/apps/x"))
            .and(body_partial_json(
                json!({ "custom_metadata": { "owner": "ops" } }),
            ))
            .respond_with(ResponseTemplate::new(204))
            .expect(1)
            .mount(&server)
            .await;
        let s = store(&server, token("t"));
        assert_eq!(write_with(&s).await.unwrap().as_deref(), Some("8"));
    }

    #[tokio::test]
    async fn a_sealed_or_broken_server_is_transient_and_a_403_is_auth() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/data/apps/x"))
            .and(header("X-Vault-Token", "sealed"))
            .respond_with(
                ResponseTemplate::new(503).set_body_json(json!({ "errors": ["Vault is sealed"] })),
            )
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/data/apps/x"))
            .and(header("X-Vault-Token", "denied"))
            .respond_with(ResponseTemplate::new(403).set_body_json(
                json!({ "errors": ["1 error occurred:\n\t* permission denied\n\n"] }),
            ))
            .mount(&server)
            .await;
        let e = write_with(&store(&server, token("sealed")))
            .await
            .unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Transient, "{e}");
        assert!(e.message.contains("Vault is sealed"), "{e}");
        let e = write_with(&store(&server, token("denied")))
            .await
            .unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Auth, "{e}");
        assert!(e.message.contains("permission denied"), "{e}");
    }

    #[tokio::test]
    async fn vaults_error_strings_are_recognised_but_never_repeated() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/data/apps/x"))
            .respond_with(
                ResponseTemplate::new(400).set_body_json(
                    json!({ "errors": ["invalid value aos_sk_live_echoed in field"] }),
                ),
            )
            .mount(&server)
            .await;
        let e = write_with(&store(&server, token("t"))).await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Permanent, "{e}");
        assert!(e.message.ends_with("failed with HTTP 400"), "{e}");
        assert!(!format!("{e} {e:?}").contains("echoed"), "{e:?}");
    }

    #[tokio::test]
    async fn an_expired_approle_token_is_replaced_by_one_new_login() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/auth/approle/login"))
            .respond_with(login("first"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1/auth/approle/login"))
            .respond_with(login("second"))
            .mount(&server)
            .await;
        // "first" has expired: every request with it, lookup-self included, is refused.
        Mock::given(header("X-Vault-Token", "first"))
            .respond_with(forbidden())
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/data/apps/x"))
            .and(header("X-Vault-Token", "second"))
            .respond_with(current(1))
            .mount(&server)
            .await;
        let s = store(&server, approle());
        let got = s
            .read(&DestinationTarget::Vault {
                path: "apps/x".into(),
                field: "other".into(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.secret.expose_secret(), "kept");
        assert_eq!(got.version.as_deref(), Some("1"));
        assert_eq!(count(&server, "POST", "/v1/auth/approle/login").await, 2);
    }

    #[tokio::test]
    async fn a_policy_403_with_a_live_approle_token_does_not_log_in_again() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/auth/approle/login"))
            .respond_with(login("alive"))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/auth/token/lookup-self"))
            .respond_with(lookup(600, true, None))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/data/apps/x"))
            .respond_with(forbidden())
            .mount(&server)
            .await;
        let s = store(&server, approle());
        for _ in 0..3 {
            let e = s.read(&target()).await.unwrap_err();
            assert_eq!(e.kind, StoreErrorKind::Auth, "{e}");
        }
        assert_eq!(count(&server, "POST", "/v1/auth/approle/login").await, 1);
    }

    #[tokio::test]
    async fn a_renewable_token_is_renewed_before_it_expires_and_its_end_is_reported() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/auth/token/lookup-self"))
            .respond_with(lookup(3, true, Some(3)))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1/auth/token/renew-self"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({ "auth": { "lease_duration": 3, "renewable": true } })),
            )
            .mount(&server)
            .await;
        let s = store(&server, token("periodic"));
        tokio::time::sleep(Duration::from_millis(4500)).await;
        // Renewed at 2/3 of 3 s: at about 2 s and 4 s.
        let renewals = count(&server, "POST", "/v1/auth/token/renew-self").await;
        assert!((1..=3).contains(&renewals), "{renewals} renewals");
        let status = s
            .credential_status()
            .expect("status known after the lookup");
        assert!(status.renewable && !status.renew_failed, "{status:?}");
        let left = status.expires_at.unwrap() - Utc::now();
        assert!(left > chrono::Duration::zero() && left <= chrono::Duration::seconds(3));
        assert_eq!(
            status.lapses_at(),
            None,
            "a periodic token kept renewed never lapses"
        );
    }

    #[tokio::test]
    async fn a_failed_renewal_is_reported_with_the_end_of_the_lease() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/auth/token/lookup-self"))
            .respond_with(lookup(3, true, None))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1/auth/token/renew-self"))
            .respond_with(ResponseTemplate::new(500))
            .mount(&server)
            .await;
        let s = store(&server, token("t"));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let status = s.credential_status().expect("status known");
        assert!(status.renew_failed, "{status:?}");
        assert!(status.lapses_at().is_some(), "{status:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn dropping_the_store_ends_its_token_task() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/auth/token/lookup-self"))
            .respond_with(lookup(0, false, None))
            .mount(&server)
            .await;
        let metrics = tokio::runtime::Handle::current().metrics();
        let s = store(&server, token("root"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(count(&server, "GET", "/v1/auth/token/lookup-self").await, 1);
        // The shared client keeps its idle connection (a task of its own) after the store goes.
        let during = metrics.num_alive_tasks();
        drop(s);
        for _ in 0..50 {
            if metrics.num_alive_tasks() == during - 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the token task outlived its store");
    }

    #[test]
    fn the_client_libraries_log_targets_are_silenced_even_at_trace() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || writer.clone())
                    .with_filter(tracing_subscriber::EnvFilter::new("trace")),
            )
            .with(quiet_client_logs());
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "vaultrs::api", "from-vaultrs");
            tracing::error!(target: "rustify::client", "from-rustify");
            tracing::error!(target: "rustify", "from-rustify-root");
            tracing::trace!(target: "keyrotd::store::vault", "from-keyrotd");
            tracing::trace!(target: "vaultrs_like", "from-a-neighbour");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            !text.contains("from-vaultrs") && !text.contains("from-rustify"),
            "{text}"
        );
        assert!(
            text.contains("from-keyrotd") && text.contains("from-a-neighbour"),
            "{text}"
        );
    }
}
