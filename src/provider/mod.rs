//! Providers: the systems that issue keys and can regenerate them. `aos` (the AOS portal contract, built
//! in) and `http` (a generic, fully described HTTP API). The provider layer does I/O and classifies
//! errors ([`ProviderError`]); what to do about them is the engine's decision.

pub mod aos;
pub mod http;

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::{Overlap, ProviderConfig};
use crate::secret::Secret;

/// The portal's metadata for the current key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyStatus {
    pub active: bool,
    pub key_id: String,
    pub account_id: Option<String>,
    pub first_generated: Option<DateTime<Utc>>,
    pub last_rotated: Option<DateTime<Utc>>,
    pub generated_by: Option<String>,
}

/// A regenerate response. The only time the secret is ever seen.
#[derive(Debug)]
pub struct Regenerated {
    pub key_id: String,
    pub secret: Secret,
    pub last_rotated: Option<DateTime<Utc>>,
    pub generated_by: Option<String>,
}

/// What a revoke found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// The key was live and is revoked now.
    Now,
    /// The vendor no longer knows the key (404): revoked before, by keyrotd or someone else.
    AlreadyGone,
}

/// Who a secret authenticates as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthIdentity {
    pub account_id: Option<String>,
    pub key_id: Option<String>,
}

/// Why a provider call failed. Never carries a secret or a response body verbatim beyond a short,
/// sanitized excerpt of error text.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// 401/403 on a management call: the management credential is bad. Not retryable; nothing happened.
    #[error("{provider}: {operation}: management credential refused (HTTP {status})")]
    Auth {
        provider: String,
        operation: &'static str,
        status: u16,
    },
    /// 429: wait at least `retry_after`.
    #[error("{provider}: {operation}: rate limited, retry after {retry_after:?}")]
    RateLimited {
        provider: String,
        operation: &'static str,
        retry_after: Duration,
    },
    /// Failed before the request could have had an effect, or on a read-only call: retry.
    #[error("{provider}: {operation}: {message}")]
    Transient {
        provider: String,
        operation: &'static str,
        message: String,
    },
    /// A regenerate (or a dual provider's create) was sent and its outcome is unknown (timeout,
    /// reset, 5xx, unparseable body): the portal may have acted. Only ever returned by `regenerate`
    /// and `create`.
    #[error("{provider}: {operation} outcome unknown: {message}")]
    Ambiguous {
        provider: String,
        operation: &'static str,
        message: String,
    },
    /// Anything retrying will not fix (4xx other than 401/403/429, a feature the provider lacks).
    #[error("{provider}: {operation}: {message}")]
    Permanent {
        provider: String,
        operation: &'static str,
        message: String,
    },
}

/// A configured provider, ready to use. The test-only scripted provider is the largest; the common
/// `aos` stays inline.
#[allow(clippy::large_enum_variant)]
pub enum Provider {
    Aos(aos::AosProvider),
    /// Boxed: a fleet's providers are mostly `aos`, and this one is several times their size.
    Http(Box<http::HttpProvider>),
    /// An in-memory portal with injectable faults: the engine's tests (feature `testing`).
    #[cfg(feature = "testing")]
    Scripted(crate::testing::ScriptedProvider),
}

impl Provider {
    pub fn build(name: &str, config: &ProviderConfig) -> Result<Provider, ProviderError> {
        Ok(match config {
            ProviderConfig::Aos(c) => Provider::Aos(aos::AosProvider::new(name, c)?),
            ProviderConfig::Http(c) => Provider::Http(Box::new(http::HttpProvider::new(name, c)?)),
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Provider::Aos(p) => p.name(),
            Provider::Http(p) => p.name(),
            #[cfg(feature = "testing")]
            Provider::Scripted(p) => p.name(),
        }
    }

    /// The expected business account from config, if any.
    pub fn expected_account(&self) -> Option<&str> {
        match self {
            Provider::Aos(p) => p.expected_account(),
            Provider::Http(p) => p.expected_account(),
            #[cfg(feature = "testing")]
            Provider::Scripted(p) => p.expected_account(),
        }
    }

    /// False for an `http` provider without a `status` section.
    pub fn has_status(&self) -> bool {
        match self {
            Provider::Aos(_) => true,
            Provider::Http(p) => p.has_status(),
            #[cfg(feature = "testing")]
            Provider::Scripted(p) => p.has_status(),
        }
    }

    /// False for an `http` provider without an `auth_check` section.
    pub fn has_auth_check(&self) -> bool {
        match self {
            Provider::Aos(_) => true,
            Provider::Http(p) => p.has_auth_check(),
            #[cfg(feature = "testing")]
            Provider::Scripted(p) => p.has_auth_check(),
        }
    }

    pub async fn status(&self) -> Result<KeyStatus, ProviderError> {
        match self {
            Provider::Aos(p) => p.status().await,
            Provider::Http(p) => p.status().await,
            #[cfg(feature = "testing")]
            Provider::Scripted(p) => p.status().await,
        }
    }

    /// `current_key_id` fills `{key_id}` in the `http` provider's URL.
    pub async fn regenerate(
        &self,
        reason: &str,
        current_key_id: Option<&str>,
    ) -> Result<Regenerated, ProviderError> {
        match self {
            Provider::Aos(p) => p.regenerate(reason).await,
            Provider::Http(p) => p.regenerate(reason, current_key_id).await,
            #[cfg(feature = "testing")]
            Provider::Scripted(p) => p.regenerate().await,
        }
    }

    /// `Ok(Some)` when the secret is the active key, `Ok(None)` when it is refused (401/403).
    pub async fn auth_check(&self, secret: &Secret) -> Result<Option<AuthIdentity>, ProviderError> {
        match self {
            Provider::Aos(p) => p.auth_check(secret).await,
            Provider::Http(p) => p.auth_check(secret).await,
            #[cfg(feature = "testing")]
            Provider::Scripted(p) => p.auth_check(secret).await,
        }
    }

    /// Whether the provider can keep two keys live (`create`, then `revoke` the old one). The
    /// `aos` portal cannot: its regenerate invalidates the old key at once.
    pub fn overlap(&self) -> Overlap {
        match self {
            Provider::Aos(_) => Overlap::None,
            Provider::Http(p) => p.overlap(),
            #[cfg(feature = "testing")]
            Provider::Scripted(p) => p.overlap(),
        }
    }

    /// False without a `list` call: a key whose create answer was lost cannot be found.
    pub fn has_list(&self) -> bool {
        match self {
            Provider::Aos(_) => false,
            Provider::Http(p) => p.has_list(),
            #[cfg(feature = "testing")]
            Provider::Scripted(p) => p.has_list(),
        }
    }

    /// A new key of `key` (the `[[keys]]` name) while the current one stays valid. Errors are
    /// classified as for regenerate; an ambiguous create loses nothing (the old key still works).
    pub async fn create(&self, key: &str) -> Result<Regenerated, ProviderError> {
        match self {
            Provider::Aos(p) => Err(no_overlap(p.name(), "create")),
            Provider::Http(p) => p.create(key).await,
            #[cfg(feature = "testing")]
            Provider::Scripted(p) => p.create().await,
        }
    }

    /// Retires `key_id`. Idempotent: a key the vendor no longer knows is [`Revoked::AlreadyGone`].
    pub async fn revoke(&self, key: &str, key_id: &str) -> Result<Revoked, ProviderError> {
        match self {
            Provider::Aos(p) => Err(no_overlap(p.name(), "revoke")),
            Provider::Http(p) => p.revoke(key, key_id).await,
            #[cfg(feature = "testing")]
            Provider::Scripted(p) => p.revoke(key_id).await,
        }
    }

    /// The ids of `key`'s live keys at the vendor.
    pub async fn list(&self, key: &str) -> Result<Vec<String>, ProviderError> {
        match self {
            Provider::Aos(p) => Err(no_overlap(p.name(), "list")),
            Provider::Http(p) => p.list(key).await,
            #[cfg(feature = "testing")]
            Provider::Scripted(p) => p.list().await,
        }
    }
}

/// The answer of a key call a provider without overlap does not have.
fn no_overlap(provider: &str, operation: &'static str) -> ProviderError {
    ProviderError::Permanent {
        provider: provider.to_string(),
        operation,
        message: "provider has no overlap (overlap = \"none\")".into(),
    }
}
