//! Distribute (docs/lifecycle.md, phases 3–5): store, notify and verify, all inside the invalidation
//! window.
//!
//! - every destination is written **in parallel**, each retried until `store_deadline`, then read back
//!   until it shows the new fingerprint ([`write_and_confirm`], shared with the background fill);
//! - each dependent's hook fires **as soon as the destinations it reads from are confirmed**;
//! - verify runs **beside** both and never delays a hook;
//! - the stores' follow-up work (AWS tags) runs after the last hook answered, off the window.
//!
//! Destinations that missed the deadline are filled in the background ([`super::fill`]) when at least
//! one confirmed. This module decides nothing about the outcome: `rotation::judge` does.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;

use super::calls::{self, Notice, backoff};
use super::fill;
use super::record::{DestinationView, EventKind};
use super::rotation::Rotation;
use crate::config::{DependentConfig, DestinationConfig, KeyConfig, Overlap};
use crate::limits::Limited;
use crate::secret::Secret;
use crate::store::{Prepared, Store, StoreError, StoreErrorKind, WriteRequest};
use crate::telemetry::{Metrics, Outcome};

/// The identity of the key being distributed.
#[derive(Debug, Clone)]
pub struct Ident {
    pub key_id: String,
    pub fingerprint: String,
    pub issued_at: DateTime<Utc>,
    /// The regenerate response (or the resume's start): the invalidation window's start.
    pub responded: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyResult {
    Ok,
    /// The new secret does not authenticate, or the provider's key id moved on: rotated elsewhere.
    Drift,
    /// Could not tell (provider unreachable, no auth_check): not a reason to re-rotate.
    Unknown,
    /// Nothing to verify (a resumed notify has no secret in hand).
    Skipped,
}

/// What the store + notify + verify part of a rotation achieved.
#[derive(Debug)]
pub struct Distribution {
    pub confirmed: Vec<bool>,
    pub hooks: Vec<(String, bool)>,
    pub verify: VerifyResult,
    /// Response to the last destination confirmed and the last hook answered.
    pub window: Option<Duration>,
    pub views: Vec<DestinationView>,
}

impl Distribution {
    pub fn confirmed_count(&self) -> usize {
        self.confirmed.iter().filter(|c| **c).count()
    }

    pub fn outcome(&self) -> Outcome {
        if self.confirmed.iter().all(|c| *c) && self.hooks.iter().all(|(_, ok)| *ok) {
            Outcome::Success
        } else {
            Outcome::Degraded
        }
    }

    pub fn summary(&self) -> String {
        let failed_hooks: Vec<&str> = self
            .hooks
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(d, _)| d.as_str())
            .collect();
        let mut s = format!(
            "{}/{} destinations confirmed",
            self.confirmed_count(),
            self.confirmed.len()
        );
        if !self.hooks.is_empty() {
            s.push_str(&format!(
                ", {}/{} reload hooks ok",
                self.hooks.len() - failed_hooks.len(),
                self.hooks.len()
            ));
        }
        if !failed_hooks.is_empty() {
            s.push_str(&format!(" (failed: {})", failed_hooks.join(", ")));
        }
        s
    }
}

/// Where one write's attempts are counted, and (several replicas) the lease they need.
pub struct WriteCount<'a> {
    pub metrics: &'a Metrics,
    pub key: &'a str,
    pub coordination: Option<&'a crate::coordination::Coordinator>,
}

/// Writes one destination and reads it back until it shows the new fingerprint (some stores are
/// eventually consistent: a dependent must never reload into the old value), retrying with backoff
/// until `deadline`. Every attempt is counted. Returns the store's version of the value.
pub async fn write_and_confirm(
    store: &Limited<Store>,
    d: &DestinationConfig,
    req: &WriteRequest<'_>,
    prepared: &Prepared,
    deadline: Instant,
    count: &WriteCount<'_>,
) -> Result<Option<String>, String> {
    let mut attempt = 0u32;
    let mut last_err = String::from("deadline passed before the first attempt");
    loop {
        if let Some(c) = count.coordination
            && let Err(e) = c.fence(count.key, crate::coordination::Step::Write).await
        {
            return Err(format!("not written: {e}"));
        }
        let attempt_once = async {
            let _permit = store.enter().await;
            write_once(store, d, req, prepared).await
        };
        match tokio::time::timeout_at(deadline, attempt_once).await {
            Ok(Ok(version)) => {
                count.metrics.store_write(count.key, &d.store, true);
                return Ok(version);
            }
            Ok(Err(e)) => {
                count.metrics.store_write(count.key, &d.store, false);
                tracing::warn!(store = %d.store, error = %e, "Store write failed.");
                last_err = e.to_string();
                if !e.is_retryable() && attempt >= 2 {
                    return Err(last_err);
                }
            }
            Err(_) => return Err(format!("{last_err} (store_deadline reached)")),
        }
        attempt += 1;
        if tokio::time::timeout_at(deadline, tokio::time::sleep(backoff(attempt)))
            .await
            .is_err()
        {
            return Err(format!("{last_err} (store_deadline reached)"));
        }
    }
}

async fn write_once(
    store: &Store,
    d: &DestinationConfig,
    req: &WriteRequest<'_>,
    prepared: &Prepared,
) -> Result<Option<String>, StoreError> {
    let version = store.write_prepared(&d.target, req, prepared).await?;
    let mut reads = 0;
    loop {
        match store.read_back(&d.target).await? {
            Some((got, v)) if got == req.fingerprint => return Ok(v.or(version)),
            _ if reads < 10 => tokio::time::sleep(Duration::from_millis(50 << reads.min(4))).await,
            _ => {
                return Err(StoreError {
                    kind: StoreErrorKind::Transient,
                    store: d.store.clone(),
                    target: d.target.to_string(),
                    message: "read-back does not show the new value yet".into(),
                });
            }
        }
        reads += 1;
    }
}

/// Which dependents a distribution tells (a canary rollout tells the canaries first, the others
/// once they stayed healthy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    All,
    Canaries,
    Others,
}

impl Audience {
    pub fn includes(self, dep: &DependentConfig) -> bool {
        match self {
            Audience::All => true,
            Audience::Canaries => dep.canary,
            Audience::Others => !dep.canary,
        }
    }
}

/// Store, notify and verify. `secret` None = every destination already holds the key (a resumed
/// notify): only the hooks run. Only the `audience`'s hooks are called.
pub async fn run(
    r: &Rotation,
    secret: Option<&Secret>,
    ident: &Ident,
    prepared: &[Prepared],
    audience: Audience,
) -> Distribution {
    r.show_phase();
    let deadline = Instant::now() + r.key.store_deadline;
    // Shutdown waits for the key to reach its destinations (and the hooks a little longer).
    let drain = ident.responded + r.key.store_deadline + Duration::from_secs(15);
    r.engine.hold_shutdown(r.meta.rotation_id, Some(drain));
    let write_req = secret.map(|s| write_request(r, s, ident));
    let (verify, mut progress) = tokio::join!(
        verify(r, secret, ident),
        store_and_notify(r, write_req.as_ref(), ident, deadline, prepared, audience)
    );
    if let Some(req) = &write_req {
        after_writes(r, &progress.confirmed, req, prepared).await;
    }
    progress.untold_hooks_failed(r, audience);
    report_verify(r, verify, ident);
    let views = progress.views(&r.key, ident);
    if let Some(secret) = secret
        && progress.confirmed.iter().any(|c| !*c)
        && progress.confirmed.iter().any(|c| *c)
    {
        fill::spawn(r, secret.clone(), ident, &progress.confirmed);
    }
    Distribution {
        confirmed: progress.confirmed,
        hooks: progress.hooks,
        verify,
        window: progress
            .last_effect
            .map(|t| t.duration_since(ident.responded)),
        views,
    }
}

pub fn write_request<'a>(
    r: &'a Rotation,
    secret: &'a Secret,
    ident: &'a Ident,
) -> WriteRequest<'a> {
    WriteRequest {
        key: &r.key.name,
        rotation_id: r.meta.rotation_id,
        key_id: &ident.key_id,
        secret,
        fingerprint: &ident.fingerprint,
        rotated_at: ident.issued_at,
        fence: r
            .engine
            .coordination
            .as_ref()
            .and_then(|c| c.fence_of(&r.key.name)),
    }
}

/// The new key authenticates at the provider, and the provider's key id is the one just issued.
async fn verify(r: &Rotation, secret: Option<&Secret>, ident: &Ident) -> VerifyResult {
    let Some(secret) = secret else {
        return VerifyResult::Skipped;
    };
    if !r.provider.has_auth_check() {
        return VerifyResult::Unknown;
    }
    let metrics = &r.engine.metrics;
    for attempt in 0..5 {
        match calls::auth_check(metrics, &r.provider, secret).await {
            Ok(Some(_)) => {
                // A dual vendor's status may name either live key: only the auth check counts.
                if r.provider.has_status()
                    && r.provider.overlap() == Overlap::None
                    && let Ok(s) = calls::status_retrying(metrics, &r.provider).await
                {
                    r.engine.set_status(&r.slot, &s);
                    if s.key_id != ident.key_id {
                        return VerifyResult::Drift;
                    }
                }
                return VerifyResult::Ok;
            }
            Ok(None) => return refused(r, ident).await,
            Err(_) if attempt < 4 => tokio::time::sleep(backoff(attempt)).await,
            Err(_) => {}
        }
    }
    VerifyResult::Unknown
}

/// The provider's auth check refused the new key. That is drift — someone rotated in between —
/// unless the provider's status names the very key just issued as its active one: then it is the
/// auth check that is wrong, and a re-rotation would only destroy another good key.
async fn refused(r: &Rotation, ident: &Ident) -> VerifyResult {
    if r.provider.has_status()
        && let Ok(s) = calls::status_retrying(&r.engine.metrics, &r.provider).await
    {
        r.engine.set_status(&r.slot, &s);
        if s.key_id == ident.key_id {
            tracing::warn!(key_id = %ident.key_id, "The provider's auth check refuses the key its status names as active: not treated as drift.");
            return VerifyResult::Unknown;
        }
    }
    VerifyResult::Drift
}

fn report_verify(r: &Rotation, verify: VerifyResult, ident: &Ident) {
    match verify {
        VerifyResult::Ok => r.event(
            EventKind::Verified,
            format!("key {} authenticates at the provider", ident.key_id),
        ),
        VerifyResult::Drift => {
            r.event(EventKind::VerifyFailed, "the new key does not authenticate")
        }
        VerifyResult::Unknown => r.event(EventKind::VerifyUnknown, "could not verify the new key"),
        VerifyResult::Skipped => {}
    }
}

/// True when every destination `dep` reads from is confirmed.
pub fn can_tell(key: &KeyConfig, dep: &DependentConfig, confirmed: &[bool]) -> bool {
    key.destinations
        .iter()
        .zip(confirmed)
        .filter(|(d, _)| dep.reads_from.contains(&d.store))
        .all(|(_, ok)| *ok)
}

/// The running state of store + notify.
struct Progress {
    confirmed: Vec<bool>,
    versions: Vec<Option<String>>,
    errors: Vec<Option<String>>,
    hook_started: Vec<bool>,
    hooks: Vec<(String, bool)>,
    last_effect: Option<Instant>,
}

impl Progress {
    fn record_write(&mut self, r: &Rotation, i: usize, result: Result<Option<String>, String>) {
        let d = &r.key.destinations[i];
        match result {
            Ok(version) => {
                self.confirmed[i] = true;
                self.versions[i] = version;
                self.last_effect = Some(Instant::now());
                r.event(EventKind::Stored, format!("{} ({})", d.store, d.target));
            }
            Err(e) => {
                r.event(EventKind::StoreFailed, e.clone());
                self.errors[i] = Some(e);
            }
        }
    }

    fn record_hook(&mut self, r: &Rotation, di: usize, ok: bool) {
        self.last_effect = Some(Instant::now());
        let name = r.key.dependents[di].name.clone();
        let kind = if ok {
            EventKind::Notified
        } else {
            EventKind::HookFailed
        };
        r.event(kind, name.clone());
        self.hooks.push((name, ok));
    }

    /// Dependents whose destinations never confirmed were not told: their hook counts as failed.
    fn untold_hooks_failed(&mut self, r: &Rotation, audience: Audience) {
        for (di, dep) in r.key.dependents.iter().enumerate() {
            if dep.reload.is_some() && audience.includes(dep) && !self.hook_started[di] {
                r.engine.metrics.reload_hook(&r.key.name, &dep.name, false);
                self.hooks.push((dep.name.clone(), false));
            }
        }
    }

    fn views(&self, key: &KeyConfig, ident: &Ident) -> Vec<DestinationView> {
        key.destinations
            .iter()
            .enumerate()
            .map(|(i, d)| DestinationView {
                store: d.store.clone(),
                target: d.target.to_string(),
                key_id: self.confirmed[i].then(|| ident.key_id.clone()),
                fingerprint: self.confirmed[i].then(|| ident.fingerprint.clone()),
                version: self.versions[i].clone(),
                in_sync: self.confirmed[i],
                error: self.errors[i].clone(),
            })
            .collect()
    }
}

async fn store_and_notify(
    r: &Rotation,
    req: Option<&WriteRequest<'_>>,
    ident: &Ident,
    deadline: Instant,
    prepared: &[Prepared],
    audience: Audience,
) -> Progress {
    let n = r.key.destinations.len();
    let mut p = Progress {
        // Nothing to write (a resumed notify): every hook may go at once.
        confirmed: vec![req.is_none(); n],
        versions: vec![None; n],
        errors: vec![None; n],
        hook_started: vec![false; r.key.dependents.len()],
        hooks: Vec::new(),
        last_effect: None,
    };
    let count = WriteCount {
        metrics: &r.engine.metrics,
        key: &r.key.name,
        coordination: r.engine.coordination.as_deref(),
    };
    let none = Prepared::none();
    let mut writes: FuturesUnordered<_> = FuturesUnordered::new();
    if let Some(req) = req {
        for (i, d) in r.key.destinations.iter().enumerate() {
            let count = &count;
            let prepared = prepared.get(i).unwrap_or(&none);
            writes.push(async move {
                let result = match r.rt.store(&d.store) {
                    Ok(store) => write_and_confirm(store, d, req, prepared, deadline, count).await,
                    Err(e) => Err(e.to_string()),
                };
                (i, result)
            });
        }
    }
    let notice = Notice {
        rotation_id: r.meta.rotation_id,
        key_id: ident.key_id.clone(),
        rotated_at: ident.issued_at,
        keys: Vec::new(),
    };
    let mut hooks = FuturesUnordered::new();
    // The journal's `notify` record is written beside the hooks, not before them: a crash before it
    // lands leaves `storing`, which recovery resolves the same way (copy from a holder, notify).
    let mut journal = FuturesUnordered::new();
    let mut journaled = false;
    loop {
        if !journaled && p.confirmed.iter().any(|c| *c) {
            journaled = true;
            journal.push(async {
                let _ = r.engine.commit(&r.slot, |j| j.first_confirmed()).await;
                fail::fail_point!("after_first_store");
                r.show_phase();
            });
        }
        for (di, dep) in r.key.dependents.iter().enumerate() {
            if dep.reload.is_some()
                && audience.includes(dep)
                && !p.hook_started[di]
                && can_tell(&r.key, dep, &p.confirmed)
            {
                p.hook_started[di] = true;
                let notice = &notice;
                hooks.push(async move { (di, r.reload(dep, notice).await) });
            }
        }
        tokio::select! {
            Some((i, result)) = writes.next(), if !writes.is_empty() => p.record_write(r, i, result),
            Some((di, ok)) = hooks.next(), if !hooks.is_empty() => p.record_hook(r, di, ok),
            Some(()) = journal.next(), if !journal.is_empty() => {}
            else => break,
        }
    }
    p
}

/// Each confirmed destination's follow-up (AWS tags). A failure is logged only: the value is stored;
/// what is missing is metadata, which the next write sets again.
pub async fn after_writes(
    r: &Rotation,
    confirmed: &[bool],
    req: &WriteRequest<'_>,
    prepared: &[Prepared],
) {
    let none = Prepared::none();
    let follow_ups = r
        .key
        .destinations
        .iter()
        .zip(confirmed)
        .enumerate()
        .filter(|(_, (_, ok))| **ok)
        .map(|(i, (d, _))| {
            let prepared = prepared.get(i).unwrap_or(&none);
            async move {
                let Ok(store) = r.rt.store(&d.store) else { return };
                let _permit = store.enter().await;
                if let Err(e) = store.after_write(&d.target, req, prepared).await
                {
                    tracing::warn!(store = %d.store, error = %e, "Follow-up after the write failed (value stored; metadata missing).");
                }
            }
        });
    futures::future::join_all(follow_ups).await;
}
