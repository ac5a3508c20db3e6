//! Destinations: where a key's value is written. One [`Store`] per `[stores.*]` entry, built from its
//! config; every operation takes the [`DestinationTarget`] (path, secret id, file) it acts on.
//!
//! The store layer does I/O and classifies errors ([`StoreErrorKind`]); it decides nothing about
//! retries or outcomes — the engine reads the error kind.

pub mod aws;
pub mod file;
pub mod vault;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::config::{DestinationTarget, StoreConfig};
use crate::secret::Secret;

/// What a write carries besides the value: the metadata written beside it (Vault custom metadata, AWS
/// tags, file sidecar) and the idempotency token.
#[derive(Debug, Clone)]
pub struct WriteRequest<'a> {
    /// The key's name (for logs and errors).
    pub key: &'a str,
    pub rotation_id: Uuid,
    pub key_id: &'a str,
    pub secret: &'a Secret,
    /// `secret::fingerprint(secret)`.
    pub fingerprint: &'a str,
    pub rotated_at: DateTime<Utc>,
    /// Several replicas: the writer's fencing number for the key, recorded beside the value (Vault
    /// custom metadata `keyrotd_fence`, AWS tag `keyrotd:fence`, the file sidecar's `fence`) so that a
    /// late write from a replica that lost the key is visible.
    pub fence: Option<u64>,
}

impl WriteRequest<'_> {
    /// AWS `ClientRequestToken`: a UUID derived from (rotation id, new key id), so a retry of one value
    /// is idempotent and a re-rotation's new value gets a new token.
    pub fn idempotency_token(&self) -> Uuid {
        Uuid::new_v5(&self.rotation_id, self.key_id.as_bytes())
    }
}

/// What a store read ahead of a write — in preflight, before the old key is destroyed — so that the
/// write on the outage path is one round trip: the Vault version and data a check-and-set write
/// merges into, the AWS JSON object a field is set in. A hint, never a guarantee: Vault's
/// check-and-set refuses a write based on a version that moved (then the write reads again), and
/// the AWS write is checked after the hooks for a write that came in between (`after_write`).
/// Other fields' values may be secrets: nothing here is printable, and it is wiped when dropped.
#[derive(Default)]
pub struct Prepared {
    pub(crate) inner: Option<PreparedInner>,
}

pub(crate) enum PreparedInner {
    Vault {
        version: u64,
        data: serde_json::Map<String, serde_json::Value>,
    },
    Aws {
        whole: Secret,
        version_id: Option<String>,
    },
}

impl Prepared {
    /// Nothing read ahead: the write reads what it needs.
    pub fn none() -> Prepared {
        Prepared::default()
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(PreparedInner::Vault { data, .. }) = &mut self.inner {
            let mut value = serde_json::Value::Object(std::mem::take(data));
            crate::secret::wipe_json(&mut value);
        }
    }
}

/// What a destination holds now.
#[derive(Debug, Clone)]
pub struct StoredValue {
    /// The value itself: needed to copy it to a stale destination and to adopt it (auth_check).
    pub secret: Secret,
    /// Computed from the value read, never taken from metadata.
    pub fingerprint: String,
    /// From the metadata written beside it (`keyrotd_key_id`, tag `keyrotd:key_id`, sidecar); None
    /// when the value was put there by someone else.
    pub key_id: Option<String>,
    /// Store version: KV v2 version number, AWS VersionId, file mtime (RFC 3339).
    pub version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// Network trouble, 5xx, throttling, timeouts: retry with backoff.
    Transient,
    /// Credential invalid or missing permission: retrying will not help.
    Auth,
    /// The path/secret/dir does not exist (AWS secrets are not created by keyrotd).
    NotFound,
    /// A check-and-set lost against a concurrent writer: re-read and retry.
    Conflict,
    /// Anything else that retrying cannot fix (malformed existing value, bad config).
    Permanent,
}

/// A store failure. The message names the store and target but never a value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{store}: {target}: {message}")]
pub struct StoreError {
    pub kind: StoreErrorKind,
    pub store: String,
    pub target: String,
    pub message: String,
}

impl StoreError {
    /// The error with every occurrence of `secret` in its message replaced by `[redacted]`.
    pub fn redact(mut self, secret: &Secret) -> StoreError {
        use secrecy::ExposeSecret;
        let value = secret.expose_secret();
        if !value.is_empty() && self.message.contains(value) {
            self.message = self.message.replace(value, "[redacted]");
        }
        self
    }

    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Transient | StoreErrorKind::Conflict
        )
    }
}

/// What a store knows of the lifetime of the credential it uses (a Vault token): for preflight
/// findings and the `keyrotd_store_credential_*` gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialStatus {
    /// End of the credential's current lease; `None` when it does not expire (a root token).
    pub expires_at: Option<DateTime<Utc>>,
    /// The end no renewal goes past (an explicit max TTL), when the store can see one.
    pub max_expires_at: Option<DateTime<Utc>>,
    /// keyrotd keeps it valid on its own: it renews the token before `expires_at`, or (AppRole)
    /// logs in again when it ends.
    pub renewable: bool,
    /// The last renewal or login failed: unless that clears, it lapses at `expires_at`.
    pub renew_failed: bool,
}

impl CredentialStatus {
    /// One line for a preflight finding, e.g. "credential expires in 5h 0m (renewed by keyrotd)".
    pub fn summary(&self, now: DateTime<Utc>) -> String {
        let left = |at: DateTime<Utc>| {
            let secs = (at - now).num_seconds();
            if secs <= 0 {
                "has expired".to_string()
            } else {
                format!("expires in {}h {}m", secs / 3600, secs % 3600 / 60)
            }
        };
        let how = match (self.renewable, self.renew_failed) {
            (_, true) => " (renewal failing)",
            (true, false) => " (renewed by keyrotd)",
            (false, false) => " (not renewable)",
        };
        match self.expires_at {
            None => "credential does not expire".to_string(),
            Some(at) => format!("credential {}{how}", left(at)),
        }
    }

    /// When the credential stops working if nothing changes: its lease end when keyrotd cannot
    /// keep it valid (not renewable, or renewal failing), else the end no renewal passes; `None`
    /// when that is never.
    pub fn lapses_at(&self) -> Option<DateTime<Utc>> {
        if self.renewable && !self.renew_failed {
            self.max_expires_at
        } else {
            match (self.expires_at, self.max_expires_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
    }
}

/// A configured store, ready to use.
pub enum Store {
    Vault(vault::VaultStore),
    Aws(aws::AwsStore),
    File(file::FileStore),
    /// In memory, with injectable faults: the engine's tests (feature `testing`).
    #[cfg(feature = "testing")]
    Memory(crate::testing::MemoryStore),
}

impl Store {
    /// Builds the client. Does no network I/O except what the SDK does lazily (Vault AppRole login
    /// happens on first use).
    pub async fn build(name: &str, config: &StoreConfig) -> Result<Store, StoreError> {
        Ok(match config {
            StoreConfig::Vault(c) => Store::Vault(vault::VaultStore::new(name, c)?),
            StoreConfig::Aws(c) => Store::Aws(aws::AwsStore::new(name, c).await?),
            StoreConfig::File(c) => Store::File(file::FileStore::new(name, c)),
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Store::Vault(s) => s.name(),
            Store::Aws(s) => s.name(),
            Store::File(s) => s.name(),
            #[cfg(feature = "testing")]
            Store::Memory(s) => s.name(),
        }
    }

    /// What the store knows of its credential's lifetime; `None` for stores without one that
    /// expires (AWS: the SDK refreshes its own; file) and before a Vault store has looked.
    pub fn credential_status(&self) -> Option<CredentialStatus> {
        match self {
            Store::Vault(s) => s.credential_status(),
            _ => None,
        }
    }

    /// Reachable and writable, proven without changing anything: Vault token valid with create/update
    /// capability on the path; AWS secret exists and is describable; file dir exists and is writable.
    pub async fn preflight(&self, target: &DestinationTarget) -> Result<(), StoreError> {
        match self {
            Store::Vault(s) => s.preflight(target).await,
            Store::Aws(s) => s.preflight(target).await,
            Store::File(s) => s.preflight(target).await,
            #[cfg(feature = "testing")]
            Store::Memory(s) => s.preflight(target).await,
        }
    }

    /// Reads ahead what a write of `target` will need (see [`Prepared`]); part of preflight.
    pub async fn prepare(&self, target: &DestinationTarget) -> Result<Prepared, StoreError> {
        match self {
            Store::Vault(s) => s.prepare(target).await,
            Store::Aws(s) => s.prepare(target).await,
            _ => Ok(Prepared::none()),
        }
    }

    /// Writes the value (its metadata follows in [`Store::after_write`]). Idempotent for the same
    /// request. Returns the new version.
    pub async fn write(
        &self,
        target: &DestinationTarget,
        req: &WriteRequest<'_>,
    ) -> Result<Option<String>, StoreError> {
        self.write_prepared(target, req, &Prepared::none()).await
    }

    /// [`Store::write`] using what [`Store::prepare`] read ahead. Whatever a store's error says, the
    /// value never leaves in it: a last line of defence against a server that echoes the request
    /// body.
    pub async fn write_prepared(
        &self,
        target: &DestinationTarget,
        req: &WriteRequest<'_>,
        prepared: &Prepared,
    ) -> Result<Option<String>, StoreError> {
        let result = match self {
            Store::Vault(s) => s.write(target, req, prepared).await,
            Store::Aws(s) => s.write(target, req, prepared).await,
            Store::File(s) => s.write(target, req).await,
            #[cfg(feature = "testing")]
            Store::Memory(s) => s.write(target, req).await,
        };
        result.map_err(|e| e.redact(req.secret))
    }

    /// What the destination holds now; `Ok(None)` when it holds nothing (no field, no file, no value).
    pub async fn read(
        &self,
        target: &DestinationTarget,
    ) -> Result<Option<StoredValue>, StoreError> {
        match self {
            Store::Vault(s) => s.read(target).await,
            Store::Aws(s) => s.read(target).await,
            Store::File(s) => s.read(target).await,
            #[cfg(feature = "testing")]
            Store::Memory(s) => s.read(target).await,
        }
    }

    /// The fingerprint and version a destination holds now, as cheaply as the store allows (AWS: the
    /// value without its tags). The rotation's read-back confirmation, on the outage path, uses this.
    pub async fn read_back(
        &self,
        target: &DestinationTarget,
    ) -> Result<Option<(String, Option<String>)>, StoreError> {
        match self {
            Store::Aws(s) => Ok(s
                .read_value(target)
                .await?
                .map(|(secret, version)| (crate::secret::fingerprint(&secret), version))),
            _ => Ok(self.read(target).await?.map(|v| (v.fingerprint, v.version))),
        }
    }

    /// How long a re-rotation should wait before writing `target` again: AWS advises against
    /// giving a secret a new value more often than every few minutes (see `aws::WRITES_PER_WINDOW`).
    pub fn wait_before_write(&self, target: &DestinationTarget) -> std::time::Duration {
        match self {
            Store::Aws(s) => s.wait_before_write(target),
            _ => std::time::Duration::ZERO,
        }
    }

    /// Work that follows a write, off the hooks' path: Vault's custom metadata, AWS tags and the
    /// check that no other write came between an AWS field's read-ahead and ours.
    pub async fn after_write(
        &self,
        target: &DestinationTarget,
        req: &WriteRequest<'_>,
        prepared: &Prepared,
    ) -> Result<(), StoreError> {
        match self {
            Store::Vault(s) => s.after_write(target, req).await,
            Store::Aws(s) => s.after_write(target, req, prepared).await,
            _ => Ok(()),
        }
    }
}
