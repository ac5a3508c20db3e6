//! The engine's calls to the outside, each counted in the metrics and retried by one policy: provider
//! status and auth checks, reload hooks and verify probes. The provider, store and notify modules do the
//! I/O; this module decides how often to try again.

#[cfg(feature = "testing")]
use std::sync::Arc;

use uuid::Uuid;

use crate::config::{ConfirmConfig, DependentConfig, KeyConfig, ReloadHook, VerifyConfig};
use crate::limits::Limited;
use crate::notify::{HookError, Notifier, Probe, ReloadNotice};
use crate::provider::{AuthIdentity, KeyStatus, Provider, ProviderError, Regenerated, Revoked};
use crate::secret::Secret;
use crate::telemetry::{Metrics, ProviderOperation, ProviderOutcome};

pub use crate::backoff::backoff;

fn count(
    metrics: &Metrics,
    provider: &Provider,
    op: ProviderOperation,
    err: Option<&ProviderError>,
) {
    let outcome = match err {
        None => ProviderOutcome::Ok,
        Some(ProviderError::Auth { .. }) => ProviderOutcome::AuthError,
        Some(ProviderError::RateLimited { .. }) => ProviderOutcome::RateLimited,
        Some(ProviderError::Ambiguous { .. }) => ProviderOutcome::Ambiguous,
        Some(_) => ProviderOutcome::Transient,
    };
    metrics.provider_request(provider.name(), op, outcome);
}

pub async fn status(
    metrics: &Metrics,
    provider: &Limited<Provider>,
) -> Result<KeyStatus, ProviderError> {
    let _permit = provider.enter().await;
    let r = provider.status().await;
    settle(
        metrics,
        provider,
        ProviderOperation::Status,
        r.as_ref().err(),
    );
    r
}

/// Status with a few retries for transient errors and rate limits.
pub async fn status_retrying(
    metrics: &Metrics,
    provider: &Limited<Provider>,
) -> Result<KeyStatus, ProviderError> {
    let mut attempt = 0;
    loop {
        match status(metrics, provider).await {
            Ok(s) => return Ok(s),
            // The provider's cool-down (set by `settle`) holds the next attempt back.
            Err(ProviderError::RateLimited { .. }) if attempt < 4 => {}
            Err(ProviderError::Transient { .. }) if attempt < 4 => {
                tokio::time::sleep(backoff(attempt)).await
            }
            Err(e) => return Err(e),
        }
        attempt += 1;
    }
}

/// `Ok(Some)` when the secret is the provider's active key, `Ok(None)` when refused.
pub async fn auth_check(
    metrics: &Metrics,
    provider: &Limited<Provider>,
    secret: &Secret,
) -> Result<Option<AuthIdentity>, ProviderError> {
    let _permit = provider.enter().await;
    let r = provider.auth_check(secret).await;
    settle(
        metrics,
        provider,
        ProviderOperation::AuthCheck,
        r.as_ref().err(),
    );
    r
}

pub async fn regenerate(
    metrics: &Metrics,
    provider: &Limited<Provider>,
    reason: &str,
    current_key_id: Option<&str>,
) -> Result<Regenerated, ProviderError> {
    let _permit = provider.enter().await;
    let r = provider.regenerate(reason, current_key_id).await;
    settle(
        metrics,
        provider,
        ProviderOperation::Regenerate,
        r.as_ref().err(),
    );
    r
}

/// A dual provider's new key for `key` (the old one stays valid).
pub async fn create(
    metrics: &Metrics,
    provider: &Limited<Provider>,
    key: &str,
) -> Result<Regenerated, ProviderError> {
    let _permit = provider.enter().await;
    let r = provider.create(key).await;
    settle(
        metrics,
        provider,
        ProviderOperation::Create,
        r.as_ref().err(),
    );
    r
}

/// Retires `key_id`, retrying transient failures and rate limits a few times (a revoke is
/// idempotent: a key already gone is success).
pub async fn revoke(
    metrics: &Metrics,
    provider: &Limited<Provider>,
    key: &str,
    key_id: &str,
) -> Result<Revoked, ProviderError> {
    let mut attempt = 0;
    loop {
        let r = {
            let _permit = provider.enter().await;
            provider.revoke(key, key_id).await
        };
        settle(
            metrics,
            provider,
            ProviderOperation::Revoke,
            r.as_ref().err(),
        );
        match r {
            Err(ProviderError::RateLimited { .. }) if attempt < 4 => {}
            Err(ProviderError::Transient { .. }) if attempt < 4 => {
                tokio::time::sleep(backoff(attempt)).await
            }
            other => return other,
        }
        attempt += 1;
    }
}

/// The live ids of `key` at a dual provider, with a few retries.
pub async fn list(
    metrics: &Metrics,
    provider: &Limited<Provider>,
    key: &str,
) -> Result<Vec<String>, ProviderError> {
    let mut attempt = 0;
    loop {
        let r = {
            let _permit = provider.enter().await;
            provider.list(key).await
        };
        settle(metrics, provider, ProviderOperation::List, r.as_ref().err());
        match r {
            Err(ProviderError::RateLimited { .. }) if attempt < 4 => {}
            Err(ProviderError::Transient { .. }) if attempt < 4 => {
                tokio::time::sleep(backoff(attempt)).await
            }
            other => return other,
        }
        attempt += 1;
    }
}

/// Counts a call and, when the provider asked to slow down (429), holds back every request to it —
/// and only to it — for the `Retry-After` its client allowed (`max_retry_after`).
fn settle(
    metrics: &Metrics,
    provider: &Limited<Provider>,
    op: ProviderOperation,
    err: Option<&ProviderError>,
) {
    if let Some(ProviderError::RateLimited { retry_after, .. }) = err {
        provider.cool_down(*retry_after);
    }
    count(metrics, provider, op, err);
}

/// How dependents are reached: over the network, or (tests) scripted in memory.
#[derive(Clone)]
pub enum Dependents {
    Real(Notifier),
    #[cfg(feature = "testing")]
    Scripted(Arc<crate::testing::ScriptedDependents>),
}

impl Default for Dependents {
    fn default() -> Self {
        Dependents::Real(Notifier::new())
    }
}

impl Dependents {
    /// Keeps `secret` out of every command hook's output excerpt from now on.
    pub fn mask(&self, secret: &crate::secret::Secret) {
        match self {
            Dependents::Real(n) => n.mask_also(secret),
            #[cfg(feature = "testing")]
            Dependents::Scripted(_) => {}
        }
    }

    pub async fn reload(
        &self,
        hook: &ReloadHook,
        notice: &ReloadNotice<'_>,
    ) -> Result<(), HookError> {
        match self {
            Dependents::Real(n) => n.reload(hook, notice).await,
            #[cfg(feature = "testing")]
            Dependents::Scripted(s) => s.reload(hook, notice).await,
        }
    }

    pub async fn probe(&self, verify: &VerifyConfig) -> Probe {
        match self {
            Dependents::Real(n) => n.probe(verify).await,
            #[cfg(feature = "testing")]
            Dependents::Scripted(s) => s.probe(verify).await,
        }
    }

    /// The fingerprint of the key the dependent reports using (`confirm`).
    pub async fn confirm(&self, confirm: &ConfirmConfig) -> Result<Option<String>, String> {
        match self {
            Dependents::Real(n) => n.confirm(confirm).await,
            #[cfg(feature = "testing")]
            Dependents::Scripted(s) => s.confirm(confirm).await,
        }
    }
}

/// What a reload hook is told about a key.
#[derive(Debug, Clone)]
pub struct Notice {
    pub rotation_id: Uuid,
    pub key_id: String,
    pub rotated_at: chrono::DateTime<chrono::Utc>,
    /// A coalesced reload: every key it serves. Empty for a reload of one key.
    pub keys: Vec<String>,
}

/// One dependent's reload hook with its retries, each attempt counted. True once it answered.
pub async fn call_hook(
    engine: &super::Engine,
    key: &KeyConfig,
    dep: &DependentConfig,
    notice: &Notice,
) -> bool {
    let (dependents, metrics) = (&engine.dependents, &engine.metrics);
    let Some(hook) = &dep.reload else { return true };
    let retries = match hook {
        ReloadHook::Http { retries, .. } | ReloadHook::Command { retries, .. } => *retries,
    };
    let notice = ReloadNotice {
        key: &key.name,
        rotation_id: notice.rotation_id,
        key_id: &notice.key_id,
        rotated_at: notice.rotated_at,
        keys: &notice.keys,
    };
    for attempt in 0..=retries {
        if let Some(c) = &engine.coordination
            && let Err(e) = c.fence(&key.name, crate::coordination::Step::Reload).await
        {
            tracing::warn!(dependent = %dep.name, error = %e, "Reload hook not sent: the key's lease is gone.");
            return false;
        }
        match dependents.reload(hook, &notice).await {
            Ok(()) => {
                metrics.reload_hook(&key.name, &dep.name, true);
                return true;
            }
            Err(e) => {
                metrics.reload_hook(&key.name, &dep.name, false);
                tracing::warn!(dependent = %dep.name, attempt, error = %e, "Reload hook failed.");
                if attempt < retries {
                    tokio::time::sleep(backoff(attempt + 1)).await;
                }
            }
        }
    }
    false
}
