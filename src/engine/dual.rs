//! Two live keys (docs/lifecycle.md, "Two live keys"): the rotation of a key whose provider keeps the
//! old key valid while a new one exists (`overlap = "dual"`).
//!
//! create (journal `creating`, then `storing` with the new id) → store and notify (shared with the
//! single-key path; canaries first with `rollout = "canary"`) → confirm (journal `confirming`: every
//! dependent healthy and, where it can say, on the new fingerprint) → revoke the old key (journal
//! `revoking`) → outcome and watch. The old key works until its revoke, so nothing here is an outage.
//!
//! Rules, each with a test:
//! - the old key is revoked only once every dependent confirmed the new one; one that does not by
//!   `confirm_deadline` keeps it live (outcome `degraded`) until `revoke_after` forces the revoke;
//! - a key is revoked only when no destination holds it ([`may_revoke`]): a new key no destination
//!   took is revoked, never the old one, so a rotation can never leave no working key;
//! - a failing canary rolls back: the old value back in every destination, the canaries told, the new
//!   key revoked; outcome `aborted`.

use std::time::Duration;

use tokio::time::Instant;

use super::calls::{self, backoff};
use super::distribute::{self, Audience, Distribution, Ident, VerifyResult};
use super::preflight::Preflight;
use super::record::EventKind;
use super::recovery::{self, Holding};
use super::regenerate::{Issued, REGENERATE_ATTEMPTS};
use super::rotation::{End, Rotation};
use super::{Engine, RunResult};
use crate::config::DependentConfig;
use crate::journal::{AuditEvent, AuditRecord, Failure, KeyJournal, Keys, Phase};
use crate::notify::Probe;
use crate::provider::{ProviderError, Regenerated, Revoked};
use crate::secret::{Secret, fingerprint};
use crate::store::Prepared;
use crate::telemetry::{CheckResult, Metrics, Outcome};

/// How often the dependents are asked whether they use the new key.
const CONFIRM_POLL: Duration = Duration::from_millis(500);

/// How an interrupted dual rotation goes on (recovery's decision, carried out by a rotation).
#[derive(Debug, Clone)]
pub enum Resume {
    /// Revoke the new key (`revoke`), or whatever a lost create made (ids the vendor lists that it
    /// did not list before), then rotate again from preflight. The old key was never touched.
    Recreate { revoke: Option<String> },
    /// The new key is in a destination: copy it from `secret` to the others (when some lack it),
    /// tell every dependent, then confirm and revoke.
    Confirm {
        key_id: String,
        fingerprint: String,
        secret: Option<Secret>,
    },
    /// Revoke the journal's `revoke_ids`, then finish (a rolled-back rollout's new key: `aborted`).
    Revoke,
    /// Put the old key's value back in every destination, tell the dependents, revoke the new key.
    Rollback { secret: Secret },
}

/// The key the rotation keeps live until it is replaced: its id and, when a destination holds it,
/// its value (a rollback puts it back).
struct Old {
    key_id: Option<String>,
    fingerprint: Option<String>,
    value: Option<Secret>,
}

/// A dual rotation after a clean preflight.
pub async fn run(r: Rotation, pre: Preflight, prepared: Vec<Prepared>) -> RunResult {
    if let Some(reason) = r.req.rerotation
        && let Err(why) = r.may_rerotate(reason).await
    {
        return r.failed(Failure::Refused, why, None).await;
    }
    let j = r.slot.journal().await;
    let old = old_key(&r, &j, pre.status.map(|s| s.key_id)).await;
    if r.key.rollout.canary && old.value.is_none() {
        let why = "rollout = \"canary\" rolls back to the old key's value, and no destination holds it (or it no longer authenticates): run a rotation without canary first".to_string();
        return r.end(aborted(why, &old)).await;
    }
    let known = match known_ids(&r).await {
        Ok(ids) => ids,
        Err(why) => return r.end(aborted(why, &old)).await,
    };
    let issued = match create(&r, &old, &known).await {
        Ok(issued) => issued,
        Err(end) => return r.end(end).await,
    };
    let audience = if r.key.rollout.canary {
        Audience::Canaries
    } else {
        Audience::All
    };
    let dist = distribute::run(&r, Some(&issued.secret), &issued.ident, &prepared, audience).await;
    let old_id = old.key_id.as_deref();
    r.audit_distribution(&dist, &issued.ident, old_id);
    if dist.confirmed_count() == 0 {
        return unheld(r, issued.ident, &old).await;
    }
    if let Some(why) = rollout_trouble(&r, &dist, audience).await {
        return match &old.value {
            Some(value) => rollback(r, &issued.ident, &old, value.clone(), why, audience).await,
            None => finish(r, issued.ident, dist, &old, false).await,
        };
    }
    let dist = tell_the_others(&r, &issued.ident, dist, audience).await;
    finish(r, issued.ident, dist, &old, false).await
}

/// A rotation that changed nothing (nothing created, or the journal could not record the create).
fn aborted(why: String, old: &Old) -> End {
    End::Aborted {
        why,
        old_key_id: old.key_id.clone(),
    }
}

/// The key in use now: keyrotd's active key (else the provider's status), and its value from a
/// destination when one holds it and it authenticates.
async fn old_key(r: &Rotation, j: &KeyJournal, status_id: Option<String>) -> Old {
    let key_id = j.active_key_id.clone().or(status_id);
    let values = recovery::read_all(&r.rt, &r.key).await;
    let mut found = None;
    for v in values.into_iter().flatten().flatten() {
        let wanted = j.active_fingerprint.as_deref();
        if wanted.is_none_or(|fp| fp == v.fingerprint) && r.authenticates(&v.secret).await.is_ok() {
            found = Some(v);
            break;
        }
    }
    Old {
        key_id,
        fingerprint: found
            .as_ref()
            .map(|v| v.fingerprint.clone())
            .or_else(|| j.active_fingerprint.clone()),
        value: found.map(|v| v.secret),
    }
}

/// The ids the vendor lists before the create, so that a key a lost create made can be told apart
/// (empty without `list`). A list that fails stops the rotation: nothing has changed yet.
async fn known_ids(r: &Rotation) -> Result<Vec<String>, String> {
    if !r.provider.has_list() {
        return Ok(Vec::new());
    }
    calls::list(&r.engine.metrics, &r.provider, &r.key.name)
        .await
        .map_err(|e| format!("cannot list the provider's keys before creating one: {e}"))
}

/// The create, journaled before it is sent and counted in the daily budget. An answer that does
/// not say whether a key was made is resolved with `list` (a key nobody knew is revoked) and the
/// create is tried again; without `list` it is simply tried again.
async fn create(r: &Rotation, old: &Old, known: &[String]) -> Result<Issued, End> {
    r.lease_settled().await;
    let mut attempt = 0;
    loop {
        let sent_at = r.engine.clock.now();
        if let Some(end) = may_create(r, old, sent_at).await {
            return Err(end);
        }
        let (meta, old_id) = (&r.meta, old.key_id.clone());
        let recorded = r
            .engine
            .commit_strict(&r.slot, |j| {
                j.creating(meta, old_id, known.to_vec(), sent_at)
            })
            .await;
        if let Err(e) = recorded {
            let why = format!("the journal could not record the create, so it was not sent: {e}");
            return Err(aborted(why, old));
        }
        r.show_phase();
        fail::fail_point!("dual_before_create");
        match calls::create(&r.engine.metrics, &r.provider, &r.key.name).await {
            Ok(k) => return Ok(created(r, k, old).await),
            Err(ProviderError::Ambiguous { message, .. }) => {
                r.event(
                    EventKind::Ambiguous,
                    format!("create outcome unknown ({message})"),
                );
                revoke_orphans(r, known, old.key_id.as_deref()).await;
            }
            Err(ProviderError::RateLimited { retry_after, .. }) => {
                not_sent(r, sent_at).await;
                r.event(EventKind::RateLimited, format!("waiting {retry_after:?}"));
                pause(r, retry_after).await;
            }
            Err(ProviderError::Transient { message, .. }) => {
                not_sent(r, sent_at).await;
                r.event(EventKind::Retry, format!("create not sent: {message}"));
            }
            Err(e) => {
                not_sent(r, sent_at).await;
                let why = format!("create refused, the old key still works: {e}");
                return Err(refused(why));
            }
        }
        attempt += 1;
        if attempt >= REGENERATE_ATTEMPTS {
            let why = format!("{attempt} attempts, no key created; the old key still works");
            return Err(refused(why));
        }
        pause(r, backoff(attempt)).await;
    }
}

fn refused(why: String) -> End {
    End::Failed {
        how: Failure::Refused,
        why,
        new: None,
    }
}

/// Shutdown, the budget and (several replicas) the lease, checked before each create. The journal
/// is put back to idle first, so an attempt that is not sent leaves nothing to recover.
async fn may_create(r: &Rotation, old: &Old, now: chrono::DateTime<chrono::Utc>) -> Option<End> {
    let j = r.slot.journal().await;
    let why = if r.engine.shutdown.is_cancelled() {
        "keyrotd is shutting down; no create was sent".to_string()
    } else if j.budget_spent(now, r.key.max_regenerations_per_day) {
        return Some(refused(format!(
            "regeneration budget exhausted: {} calls that issued a key in the last 24h (max_regenerations_per_day = {})",
            j.regenerations_since(now),
            r.key.max_regenerations_per_day
        )));
    } else if let Some(Err(e)) = r
        .engine
        .coordination
        .as_ref()
        .map(|c| c.may_regenerate_as(&r.key.name, r.tenure))
    {
        format!("no create without the key's lease: {e}")
    } else {
        return None;
    };
    let _ = r.engine.commit(&r.slot, |j| j.cleared()).await;
    Some(aborted(why, old))
}

async fn not_sent(r: &Rotation, sent_at: chrono::DateTime<chrono::Utc>) {
    let _ = r.engine.commit(&r.slot, |j| j.not_sent(sent_at)).await;
}

/// Waits `d`, or less when shutdown begins.
async fn pause(r: &Rotation, d: Duration) {
    tokio::select! {
        _ = r.engine.shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// The vendor made the new key: journal `storing` (id and fingerprint, never the secret).
async fn created(r: &Rotation, k: Regenerated, old: &Old) -> Issued {
    let now = r.engine.clock.now();
    let fp = fingerprint(&k.secret);
    r.engine.dependents.mask(&k.secret);
    let ident = Ident {
        key_id: k.key_id,
        fingerprint: fp.clone(),
        issued_at: now,
        responded: Instant::now(),
    };
    let _ = r
        .engine
        .commit(&r.slot, |j| j.created(&ident.key_id, &fp, now))
        .await;
    r.show_phase();
    fail::fail_point!("dual_after_create");
    r.event(
        EventKind::Created,
        format!(
            "new key {} (fingerprint {fp}); {} stays live",
            ident.key_id,
            old.key_id.as_deref().unwrap_or("the old key")
        ),
    );
    let keys = Keys {
        old_key_id: old.key_id.as_deref(),
        new_key_id: Some(&ident.key_id),
        fingerprint: Some(&fp),
    };
    r.engine
        .audit(AuditRecord::created(&r.key.name, &r.meta, keys, now));
    Issued {
        secret: k.secret,
        ident,
    }
}

/// After an ambiguous create: every id the vendor lists now that it did not list before (and that
/// is not one keyrotd keeps) was made by it; each is revoked. Without `list` nothing can be found.
async fn revoke_orphans(r: &Rotation, known: &[String], old_id: Option<&str>) -> usize {
    if !r.provider.has_list() {
        tracing::warn!(
            "A create's answer was lost and the provider has no list: an unknown key may remain at the vendor."
        );
        return 0;
    }
    let Ok(live) = calls::list(&r.engine.metrics, &r.provider, &r.key.name).await else {
        return 0;
    };
    let j = r.slot.journal().await;
    let orphans = orphans(&live, known, old_id, &j);
    for id in &orphans {
        let revoked = calls::revoke(&r.engine.metrics, &r.provider, &r.key.name, id).await;
        let why = "made by a create whose answer was lost; nobody holds it";
        r.event(EventKind::Revoked, format!("{id}: {why}"));
        if revoked.is_ok() {
            let at = r.engine.clock.now();
            let record = AuditRecord::revoked(&r.key.name, Some(&r.meta), id, why, at);
            r.engine.audit(record);
        }
    }
    orphans.len()
}

/// Ids listed now that were not listed before the create and are none of the keys keyrotd keeps.
/// Pure.
pub fn orphans(
    live: &[String],
    known: &[String],
    old_id: Option<&str>,
    j: &KeyJournal,
) -> Vec<String> {
    live.iter()
        .filter(|id| !known.contains(id))
        .filter(|id| Some(id.as_str()) != old_id)
        .filter(|id| j.active_key_id.as_deref() != Some(id.as_str()))
        .filter(|id| !j.pending_revoke.contains(id))
        .cloned()
        .collect()
}

/// Whether the key with fingerprint `fp` (`None`: unknown) may be revoked, given what each
/// destination holds: never while a destination holds it or cannot be read. A key whose fingerprint
/// is unknown is revoked only once every destination holds `newest`. Pure.
pub fn may_revoke(fp: Option<&str>, newest: &str, held: &[Holding]) -> bool {
    !held.is_empty()
        && held.iter().all(|h| match (h, fp) {
            (Holding::Unreadable, _) => false,
            (Holding::Empty, known) => known.is_some(),
            (Holding::Value(v), Some(f)) => v != f,
            (Holding::Value(v), None) => v == newest,
        })
}

/// What the destinations hold now (fingerprints only).
async fn holdings(r: &Rotation) -> Vec<Holding> {
    recovery::holdings(&recovery::read_all(&r.rt, &r.key).await)
}

/// No destination took the new key: it is revoked (nobody can be using it) and the old key, which
/// every destination still holds, stays. Outcome `failed`, the key not lost.
async fn unheld(r: Rotation, ident: Ident, old: &Old) -> RunResult {
    let held = holdings(&r).await;
    let mut why = "no destination confirmed the new key".to_string();
    if may_revoke(Some(&ident.fingerprint), &ident.fingerprint, &held) {
        let ids = vec![ident.key_id.clone()];
        let done = revoke(&r, &ids, "no destination holds it").await;
        if done.len() == ids.len() {
            why.push_str(&format!("; {} revoked, ", ident.key_id));
        } else {
            keep(&r, ids, Vec::new(), Some(r.engine.clock.now())).await;
            why.push_str(&format!(
                "; {} could not be revoked yet (retried), ",
                ident.key_id
            ));
        }
    } else {
        why.push_str("; the new key may be in a destination, so it stays live; ");
    }
    why.push_str(&format!(
        "the old key {} still works",
        old.key_id.as_deref().unwrap_or("")
    ));
    r.failed(Failure::Refused, why, Some(ident)).await
}

/// Revokes `ids` under the journal's `revoking`; returns those revoked (or already gone).
async fn revoke(r: &Rotation, ids: &[String], why: &str) -> Vec<String> {
    let list = ids.to_vec();
    let _ = r.engine.commit(&r.slot, |j| j.revoking(list)).await;
    r.show_phase();
    fail::fail_point!("dual_after_confirm");
    let mut done = Vec::new();
    for id in ids {
        match calls::revoke(&r.engine.metrics, &r.provider, &r.key.name, id).await {
            Ok(found) => {
                let gone = if found == Revoked::AlreadyGone {
                    " (already gone)"
                } else {
                    ""
                };
                r.event(EventKind::Revoked, format!("{id}{gone}: {why}"));
                let at = r.engine.clock.now();
                let record = AuditRecord::revoked(&r.key.name, Some(&r.meta), id, why, at);
                r.engine.audit(record);
                done.push(id.clone());
            }
            Err(e) => r.event(EventKind::Failed, format!("revoke of {id} failed: {e}")),
        }
    }
    fail::fail_point!("dual_after_revoke");
    let revoked = done.clone();
    let _ = r.engine.commit(&r.slot, |j| j.revoked(&revoked)).await;
    done
}

/// Keys left live for later: revoked at `due` by the scheduler, or by the next rotation everyone
/// confirmed.
async fn keep(
    r: &Rotation,
    ids: Vec<String>,
    unconfirmed: Vec<String>,
    due: Option<chrono::DateTime<chrono::Utc>>,
) {
    let _ = r
        .engine
        .commit(&r.slot, |j| j.kept(ids, unconfirmed, due))
        .await;
}

/// Why the rollout must stop: a canary's reload failed or it went unhealthy, or the new key does
/// not authenticate. `None`: go on.
async fn rollout_trouble(r: &Rotation, dist: &Distribution, audience: Audience) -> Option<String> {
    if dist.verify == VerifyResult::Drift {
        return Some("the new key does not authenticate at the provider".into());
    }
    if audience != Audience::Canaries {
        return None;
    }
    if let Some((name, _)) = dist.hooks.iter().find(|(_, ok)| !ok) {
        return Some(format!("canary {name} did not reload"));
    }
    watch_canaries(r).await.err()
}

/// Probes the canaries' `verify` every `watch_interval` (at most every `canary_watch`) for
/// `canary_watch`; the first probe that is not healthy (an auth failure above all) fails the canary.
async fn watch_canaries(r: &Rotation) -> Result<(), String> {
    let canaries: Vec<&DependentConfig> = r
        .key
        .dependents
        .iter()
        .filter(|d| d.canary && d.verify.is_some())
        .collect();
    let watch = r.key.rollout.canary_watch;
    let interval = r.key.watch_interval.min(watch);
    let until = Instant::now() + watch;
    loop {
        for d in &canaries {
            let Some(v) = &d.verify else { continue };
            let probe = r.engine.dependents.probe(v).await;
            let result = match &probe {
                Probe::Ok => CheckResult::Ok,
                Probe::AuthFailure(_) => CheckResult::AuthFailure,
                _ => CheckResult::Error,
            };
            r.engine
                .metrics
                .post_rotation_check(&r.key.name, &d.name, result);
            if probe != Probe::Ok {
                let what = super::watch::describe(&probe);
                return Err(format!("canary {} is unhealthy: {what}", d.name));
            }
        }
        if Instant::now() + interval > until {
            r.event(EventKind::Probe, format!("canaries healthy for {watch:?}"));
            return Ok(());
        }
        pause(r, interval).await;
        if r.engine.shutdown.is_cancelled() {
            return Err("keyrotd is shutting down before the canaries were watched".into());
        }
    }
}

/// A canary rollout's second step: the other dependents are told (the destinations already hold
/// the key). Their hooks join the distribution's.
async fn tell_the_others(
    r: &Rotation,
    ident: &Ident,
    mut dist: Distribution,
    audience: Audience,
) -> Distribution {
    if audience != Audience::Canaries {
        return dist;
    }
    let others = distribute::run(r, None, ident, &[], Audience::Others).await;
    dist.hooks.extend(others.hooks);
    dist
}

/// Confirm, then revoke the old key (and any kept before) or keep it for the dependents that did not
/// confirm; the outcome, and the watch.
async fn finish(
    r: Rotation,
    ident: Ident,
    dist: Distribution,
    old: &Old,
    resumed: bool,
) -> RunResult {
    let _ = r.engine.commit(&r.slot, |j| j.confirming()).await;
    r.show_phase();
    fail::fail_point!("dual_after_store");
    let unconfirmed = confirm(&r, &ident).await;
    let j = r.slot.journal().await;
    let mut ids: Vec<String> = old.key_id.iter().cloned().collect();
    for id in &j.pending_revoke {
        if !ids.contains(id) {
            ids.push(id.clone());
        }
    }
    ids.retain(|id| *id != ident.key_id);
    let mut outcome = dist.outcome();
    if unconfirmed.is_empty() {
        let done = revoke_old(&r, &ident, &ids, old).await;
        let left: Vec<String> = ids
            .iter()
            .filter(|id| !done.contains(id))
            .cloned()
            .collect();
        if !left.is_empty() {
            outcome = Outcome::Degraded;
            keep(&r, left, Vec::new(), Some(r.engine.clock.now())).await;
        }
        report_overlap(
            &r.engine.metrics,
            &r.key.name,
            j.overlap_since.or(Some(ident.issued_at)),
            left_none(&r).await,
            r.engine.clock.now(),
        );
    } else {
        outcome = Outcome::Degraded;
        let due = r.key.rollout.revoke_after.and_then(|a| {
            let since = j.overlap_since.unwrap_or(ident.issued_at);
            chrono::Duration::from_std(a).ok().map(|a| since + a)
        });
        r.event(
            EventKind::Unconfirmed,
            format!(
                "not confirmed by {}: the old key stays live",
                unconfirmed.join(", ")
            ),
        );
        keep(&r, ids, unconfirmed, due).await;
        r.engine
            .metrics
            .old_key_live_since(&r.key.name, j.overlap_since.or(Some(ident.issued_at)));
    }
    let watch_allowed = !resumed;
    r.end(End::Concluded {
        outcome,
        ident,
        dist,
        resumed,
        watch_allowed,
    })
    .await
}

/// True when the journal keeps no old key any more.
async fn left_none(r: &Rotation) -> bool {
    r.slot.journal().await.pending_revoke.is_empty()
}

/// Every dependent confirmed: the old keys go, each only if no destination holds it.
async fn revoke_old(r: &Rotation, ident: &Ident, ids: &[String], old: &Old) -> Vec<String> {
    let held = holdings(r).await;
    let allowed: Vec<String> = ids
        .iter()
        .filter(|id| {
            let fp = (old.key_id.as_deref() == Some(id.as_str()))
                .then_some(old.fingerprint.as_deref())
                .flatten();
            may_revoke(fp, &ident.fingerprint, &held)
        })
        .cloned()
        .collect();
    if allowed.len() < ids.len() {
        r.event(
            EventKind::Unconfirmed,
            "a destination may still hold an old key: it stays live",
        );
    }
    if allowed.is_empty() {
        return Vec::new();
    }
    revoke(r, &allowed, "every dependent confirmed the new key").await
}

/// The overlap metrics once a rotation ends: how long both keys were live (when the old key is
/// gone now), and since when an old key is kept.
fn report_overlap(
    metrics: &Metrics,
    key: &str,
    since: Option<chrono::DateTime<chrono::Utc>>,
    all_gone: bool,
    now: chrono::DateTime<chrono::Utc>,
) {
    if all_gone {
        if let Some(since) = since {
            metrics.key_overlap(key, (now - since).to_std().unwrap_or_default());
        }
        metrics.old_key_live_since(key, None);
    } else {
        metrics.old_key_live_since(key, since);
    }
}

/// Polls every dependent with a `verify` or a `confirm` until each is healthy and on `ident`'s
/// fingerprint, or `confirm_deadline` passed. Returns those that did not confirm.
async fn confirm(r: &Rotation, ident: &Ident) -> Vec<String> {
    let deps: Vec<&DependentConfig> = r
        .key
        .dependents
        .iter()
        .filter(|d| d.verify.is_some() || d.confirm.is_some())
        .collect();
    let deadline = Instant::now() + r.key.rollout.confirm_deadline;
    let mut done = vec![false; deps.len()];
    loop {
        let checks = futures::future::join_all(
            deps.iter()
                .zip(&done)
                .map(|(d, ok)| async move { *ok || confirms(r, d, &ident.fingerprint).await }),
        )
        .await;
        for (i, ok) in checks.into_iter().enumerate() {
            if ok && !done[i] {
                done[i] = true;
                confirmed(r, deps[i], ident);
            }
        }
        let count = done.iter().filter(|d| **d).count();
        r.engine.metrics.dependents_confirmed(&r.key.name, count);
        if count == deps.len() || Instant::now() >= deadline || r.engine.shutdown.is_cancelled() {
            break;
        }
        pause(r, CONFIRM_POLL.min(deadline - Instant::now())).await;
    }
    let unconfirmed: Vec<String> = deps
        .iter()
        .zip(&done)
        .filter(|(_, ok)| !**ok)
        .map(|(d, _)| d.name.clone())
        .collect();
    for d in &unconfirmed {
        r.engine.metrics.dependent_unconfirmed(&r.key.name, d, true);
    }
    unconfirmed
}

/// One dependent's answer: its `verify` is healthy, and its `confirm` reports `fp`.
async fn confirms(r: &Rotation, d: &DependentConfig, fp: &str) -> bool {
    let healthy = match &d.verify {
        Some(v) => r.engine.dependents.probe(v).await == Probe::Ok,
        None => true,
    };
    if !healthy {
        return false;
    }
    match &d.confirm {
        Some(c) => {
            r.engine
                .dependents
                .confirm(c)
                .await
                .ok()
                .flatten()
                .as_deref()
                == Some(fp)
        }
        None => true,
    }
}

fn confirmed(r: &Rotation, d: &DependentConfig, ident: &Ident) {
    r.engine
        .metrics
        .dependent_unconfirmed(&r.key.name, &d.name, false);
    r.event(EventKind::Confirmed, d.name.clone());
    let keys = Keys {
        old_key_id: None,
        new_key_id: Some(&ident.key_id),
        fingerprint: Some(&ident.fingerprint),
    };
    let at = r.engine.clock.now();
    let record = AuditRecord::step(
        &r.key.name,
        &r.meta,
        AuditEvent::Confirmed,
        keys,
        &d.name,
        at,
    );
    r.engine.audit(record);
}

/// The rollout failed: the old value back into every destination, the dependents that were `told`
/// told again, then the new key revoked. A destination that will not take the old value keeps the journal at
/// `rolling_back`, and recovery finishes the rollback.
async fn rollback(
    r: Rotation,
    new: &Ident,
    old: &Old,
    value: Secret,
    why: String,
    told: Audience,
) -> RunResult {
    let _ = r.engine.commit(&r.slot, |j| j.rolling_back()).await;
    r.show_phase();
    r.event(EventKind::CanaryFailed, &why);
    let restored = restore(&r, old, &value).await;
    if !restored {
        let why =
            format!("{why}; the old key could not be put back in every destination yet (retried)");
        return r.failed(Failure::Unresolved, why, Some(new.clone())).await;
    }
    for d in r
        .key
        .dependents
        .iter()
        .filter(|d| d.reload.is_some() && told.includes(d))
    {
        let notice = calls::Notice {
            rotation_id: r.meta.rotation_id,
            key_id: old.key_id.clone().unwrap_or_default(),
            rotated_at: r.engine.clock.now(),
            keys: Vec::new(),
        };
        calls::call_hook(&r.engine, &r.key, d, &notice).await;
    }
    let held = holdings(&r).await;
    let ids = vec![new.key_id.clone()];
    if may_revoke(Some(&new.fingerprint), &new.fingerprint, &held) {
        revoke(&r, &ids, "rolled back").await;
    }
    let meta = r.meta.clone();
    let now = r.engine.clock.now();
    let _ = r
        .engine
        .commit(&r.slot, |j| j.rolled_back(&meta, now))
        .await;
    let record = AuditRecord::step(
        &r.key.name,
        &r.meta,
        AuditEvent::RolledBack,
        Keys::default(),
        &why,
        now,
    );
    r.engine.audit(record);
    r.event(
        EventKind::RolledBack,
        "the old key is back in every destination",
    );
    let why = format!(
        "{why}: rolled back; the new key {} revoked, the old key still works",
        new.key_id
    );
    r.end(aborted(why, old)).await
}

/// Writes the old value to every destination; true once each confirmed it.
async fn restore(r: &Rotation, old: &Old, value: &Secret) -> bool {
    let ident = Ident {
        key_id: old.key_id.clone().unwrap_or_default(),
        fingerprint: fingerprint(value),
        issued_at: r.engine.clock.now(),
        responded: Instant::now(),
    };
    let req = distribute::write_request(r, value, &ident);
    let count = distribute::WriteCount {
        metrics: &r.engine.metrics,
        key: &r.key.name,
        coordination: r.engine.coordination.as_deref(),
    };
    let deadline = Instant::now() + r.key.store_deadline;
    let none = Prepared::none();
    let writes = r.key.destinations.iter().map(|d| {
        let (req, count, none) = (&req, &count, &none);
        async move {
            let Ok(store) = r.rt.store(&d.store) else {
                return false;
            };
            distribute::write_and_confirm(store, d, req, none, deadline, count)
                .await
                .is_ok()
        }
    });
    futures::future::join_all(writes)
        .await
        .into_iter()
        .all(|ok| ok)
}

impl Rotation {
    /// A dependent's reload: with its group's other keys (one reload once all are stored), in a
    /// `reload_coalesce` window, or (neither set) directly.
    pub(crate) async fn reload(&self, dep: &DependentConfig, notice: &calls::Notice) -> bool {
        if let Some(batch) = &self.req.batch {
            return batch
                .reload(&self.engine, &self.key, dep, notice.clone())
                .await;
        }
        if let Some(window) = self.key.rollout.reload_coalesce {
            return self
                .engine
                .reloads
                .reload(&self.engine, window, &self.key, dep, notice.clone())
                .await;
        }
        calls::call_hook(&self.engine, &self.key, dep, notice).await
    }
}

/// An interrupted dual rotation, as recovery decided.
pub async fn resume(r: Rotation, resume: Resume) -> RunResult {
    let j = r.slot.journal().await;
    let old = Old {
        key_id: j.old_key_id.clone(),
        fingerprint: j.active_fingerprint.clone(),
        value: None,
    };
    match resume {
        Resume::Recreate { revoke } => recreate(r, revoke, &j).await,
        Resume::Confirm {
            key_id,
            fingerprint,
            secret,
        } => {
            let ident = Ident {
                key_id,
                fingerprint,
                issued_at: j.issued_at.unwrap_or_else(|| r.engine.clock.now()),
                responded: Instant::now(),
            };
            resume_confirm(r, ident, secret, &old).await
        }
        Resume::Revoke => resume_revoke(r, &j).await,
        Resume::Rollback { secret } => {
            let new = Ident {
                key_id: j.new_key_id.clone().unwrap_or_default(),
                fingerprint: j.new_fingerprint.clone().unwrap_or_default(),
                issued_at: r.engine.clock.now(),
                responded: Instant::now(),
            };
            let old = Old {
                value: Some(secret.clone()),
                ..old
            };
            let why = "recovery finishes a rollback interrupted by a crash".to_string();
            // Who was told before the crash is not journaled: every dependent reloads (idempotent).
            rollback(r, &new, &old, secret, why, Audience::All).await
        }
    }
}

/// The new key nobody holds (or whatever a lost create made) is revoked, then a fresh rotation.
async fn recreate(r: Rotation, revoke_id: Option<String>, j: &KeyJournal) -> RunResult {
    match revoke_id {
        Some(id) => {
            let done = revoke(
                &r,
                std::slice::from_ref(&id),
                "made before a crash; nobody holds it",
            )
            .await;
            if done.is_empty() {
                keep(&r, vec![id], Vec::new(), Some(r.engine.clock.now())).await;
            }
        }
        None => {
            revoke_orphans(&r, &j.known_ids, j.old_key_id.as_deref()).await;
        }
    }
    let _ = r.engine.commit(&r.slot, |j| j.abandoned()).await;
    r.event(
        EventKind::Resumed,
        "the interrupted create is cleaned up; rotating again",
    );
    // Boxed as a trait object: the fresh rotation's future contains this one's caller.
    let fresh: std::pin::Pin<Box<dyn std::future::Future<Output = RunResult> + Send>> =
        Box::pin(r.fresh());
    fresh.await
}

/// The new key is stored somewhere: copy it where it is missing (once it authenticates), tell every
/// dependent, then confirm and revoke as a rotation would.
async fn resume_confirm(r: Rotation, ident: Ident, secret: Option<Secret>, old: &Old) -> RunResult {
    if let Some(s) = &secret
        && let Err(why) = r.authenticates(s).await
    {
        return r.end(aborted(why, old)).await;
    }
    r.event(
        EventKind::Resumed,
        format!("key {} (fingerprint {})", ident.key_id, ident.fingerprint),
    );
    let dist = distribute::run(&r, secret.as_ref(), &ident, &[], Audience::All).await;
    finish(r, ident, dist, old, true).await
}

/// A revoke interrupted by a crash is sent again (a key already gone is success).
async fn resume_revoke(r: Rotation, j: &KeyJournal) -> RunResult {
    let ids = j.revoke_ids.clone();
    let rollback = j.new_key_id.as_ref().is_some_and(|n| ids.contains(n));
    let done = revoke(&r, &ids, "a revoke interrupted by a crash, sent again").await;
    let left: Vec<String> = ids
        .iter()
        .filter(|id| !done.contains(id))
        .cloned()
        .collect();
    let degraded = !left.is_empty();
    if degraded {
        keep(&r, left, Vec::new(), Some(r.engine.clock.now())).await;
    }
    let old = Old {
        key_id: j.old_key_id.clone(),
        fingerprint: None,
        value: None,
    };
    if rollback {
        let (meta, now) = (r.meta.clone(), r.engine.clock.now());
        let _ = r
            .engine
            .commit(&r.slot, |j| j.rolled_back(&meta, now))
            .await;
        return r
            .end(aborted(
                "a rolled-back rollout's new key revoked after a crash".into(),
                &old,
            ))
            .await;
    }
    let ident = Ident {
        key_id: j.new_key_id.clone().unwrap_or_default(),
        fingerprint: j.new_fingerprint.clone().unwrap_or_default(),
        issued_at: j.issued_at.unwrap_or_else(|| r.engine.clock.now()),
        responded: Instant::now(),
    };
    report_overlap(
        &r.engine.metrics,
        &r.key.name,
        j.overlap_since,
        left_none(&r).await,
        r.engine.clock.now(),
    );
    let dist = Distribution::settled(r.key.destinations.len());
    r.end(End::Concluded {
        outcome: if degraded {
            Outcome::Degraded
        } else {
            Outcome::Success
        },
        ident,
        dist,
        resumed: true,
        watch_allowed: false,
    })
    .await
}

/// The revoke `revoke_after` forces: the key's kept old keys go even though a dependent never
/// confirmed, logged and audited. Runs under the key's claim, outside any rotation; a key that is
/// busy, or a destination not yet on the newest key, puts it off a minute.
pub async fn revoke_due(engine: std::sync::Arc<Engine>, key: String) {
    let Some(slot) = engine.slot(&key) else {
        return;
    };
    let Some(_claim) = slot.try_claim() else {
        return put_off(&engine, &slot).await;
    };
    let (config, rt) = (engine.config(), engine.runtime());
    let Some(k) = config.key(&key) else { return };
    let Ok(provider) = rt.provider(k).cloned() else {
        return;
    };
    let j = slot.journal().await;
    let ids = j.pending_revoke.clone();
    let (Some(newest), false) = (j.active_fingerprint.clone(), ids.is_empty()) else {
        return;
    };
    let held = recovery::holdings(&recovery::read_values(&engine, k).await);
    if !may_revoke(None, &newest, &held) {
        tracing::warn!(key = %key, "revoke_after reached, but a destination does not hold the newest key yet: the old key stays live a while longer.");
        return put_off(&engine, &slot).await;
    }
    let why = format!(
        "revoke_after reached: {} never confirmed the new key",
        if j.unconfirmed.is_empty() {
            "a dependent".to_string()
        } else {
            j.unconfirmed.join(", ")
        }
    );
    tracing::warn!(key = %key, ids = %ids.join(","), "{why}; revoking the old key now.");
    let list = ids.clone();
    let _ = engine.commit(&slot, |j| j.revoking(list)).await;
    let mut done = Vec::new();
    for id in &ids {
        if calls::revoke(&engine.metrics, &provider, &key, id)
            .await
            .is_ok()
        {
            engine.audit(AuditRecord::revoked(
                &key,
                None,
                id,
                &why,
                engine.clock.now(),
            ));
            done.push(id.clone());
        }
    }
    let _ = engine.commit(&slot, |j| j.revoked(&done)).await;
    for d in &j.unconfirmed {
        engine.metrics.dependent_unconfirmed(&key, d, false);
    }
    let gone = slot.journal().await.pending_revoke.is_empty();
    report_overlap(
        &engine.metrics,
        &key,
        j.overlap_since,
        gone,
        engine.clock.now(),
    );
    if !gone {
        put_off(&engine, &slot).await;
    }
    engine.schedule.key(&key);
}

/// Tries a due revoke again in a minute.
async fn put_off(engine: &Engine, slot: &super::slot::KeySlot) {
    let later = engine.clock.now() + chrono::Duration::minutes(1);
    let _ = engine
        .commit(slot, |j| {
            let (ids, unconfirmed) = (j.pending_revoke.clone(), j.unconfirmed.clone());
            j.kept(ids, unconfirmed, Some(later));
        })
        .await;
    engine.schedule.key(&slot.name);
}

/// At start: the overlap series from the journal, so an old key kept live before a restart still
/// alerts.
pub fn seed_metrics(metrics: &Metrics, j: &KeyJournal) {
    if j.pending_revoke.is_empty() {
        return;
    }
    metrics.old_key_live_since(&j.key, j.overlap_since);
    for d in &j.unconfirmed {
        metrics.dependent_unconfirmed(&j.key, d, true);
    }
}

/// What recovery decides for a dual key's journal in one of the dual phases, from what each
/// destination holds. Pure; the table test is in `recovery/tests.rs`.
pub fn decide(j: &KeyJournal, held: &[Holding]) -> super::recovery::Decision {
    use super::recovery::Decision;
    let holders = |fp: Option<&String>| -> Vec<usize> {
        held.iter()
            .enumerate()
            .filter(|(_, h)| fp.is_some_and(|f| matches!(h, Holding::Value(v) if v == f)))
            .map(|(i, _)| i)
            .collect()
    };
    let unreadable = held.contains(&Holding::Unreadable);
    match j.phase {
        Phase::Creating => Decision::Recreate { revoke: None },
        Phase::Revoking => Decision::Revoke,
        Phase::Storing | Phase::Confirming => {
            let with_new = holders(j.new_fingerprint.as_ref());
            if !with_new.is_empty() && with_new.len() == held.len() {
                Decision::Confirm { from: None }
            } else if let Some(&from) = with_new.first() {
                Decision::Confirm { from: Some(from) }
            } else if unreadable {
                Decision::Defer("a destination is unreadable and may hold the new key".into())
            } else {
                Decision::Recreate {
                    revoke: j.new_key_id.clone(),
                }
            }
        }
        Phase::RollingBack => match holders(j.active_fingerprint.as_ref()).first() {
            Some(&from) => Decision::Rollback { from },
            None if unreadable => Decision::Defer("a destination is unreadable and may hold the old key".into()),
            None => Decision::Defer(
                "rolling back, and no destination holds the old key's value any more: an operator decides (keyrotd rotate)".into(),
            ),
        },
        _ => Decision::Nothing,
    }
}

impl Distribution {
    /// A distribution with nothing left to do: every destination already holds the key.
    pub fn settled(destinations: usize) -> Distribution {
        Distribution {
            confirmed: vec![true; destinations],
            hooks: Vec::new(),
            verify: VerifyResult::Skipped,
            window: None,
            views: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(list: &[&str]) -> Vec<Holding> {
        list.iter()
            .map(|h| match *h {
                "-" => Holding::Empty,
                "?" => Holding::Unreadable,
                fp => Holding::Value(fp.into()),
            })
            .collect()
    }

    #[test]
    fn a_key_is_revoked_only_when_no_destination_holds_it() {
        // (fingerprint of the key to revoke, newest fingerprint, holdings, may revoke)
        let table: &[(Option<&str>, &str, &[&str], bool)] = &[
            // Every destination moved to the new key: the old one goes.
            (Some("old"), "new", &["new", "new"], true),
            (Some("old"), "new", &["new", "-"], true),
            // One still holds the old key, or cannot be read: it stays.
            (Some("old"), "new", &["new", "old"], false),
            (Some("old"), "new", &["new", "?"], false),
            // A key whose fingerprint is unknown (kept from an earlier rotation) goes only once every
            // destination holds the newest key.
            (None, "new", &["new", "new"], true),
            (None, "new", &["new", "-"], false),
            (None, "new", &["new", "other"], false),
            // No destination at all proves nothing.
            (Some("old"), "new", &[], false),
        ];
        for (fp, newest, h, want) in table {
            assert_eq!(
                may_revoke(*fp, newest, &held(h)),
                *want,
                "{fp:?} newest {newest} held {h:?}"
            );
        }
    }

    /// A re-rotation of a key whose destinations lost it: the new key reached no destination. The
    /// only key that works anywhere is the old one (the dependents hold it in memory): it is never
    /// revoked, and the new key, held by nobody, is.
    #[test]
    fn a_rerotation_after_a_lost_key_never_revokes_the_only_working_key() {
        let after_failed_store = held(&["-", "-"]);
        assert!(
            may_revoke(Some("fp-new"), "fp-new", &after_failed_store),
            "the new key nobody holds is revoked"
        );
        // The old key's id is never among the candidates of that path, and were it asked about,
        // the rule would refuse it while nothing holds the newest key.
        assert!(!may_revoke(None, "fp-new", &after_failed_store));
        // A store that took the new key without confirming it (the read-back failed) may be read by
        // a dependent: the new key stays too.
        assert!(!may_revoke(
            Some("fp-new"),
            "fp-new",
            &held(&["fp-new", "-"])
        ));
    }

    #[test]
    fn orphans_are_the_listed_ids_nobody_knew() {
        let mut j = KeyJournal::new("k");
        j.adopted(Some("rk_1".into()), "fp1");
        j.pending_revoke = vec!["rk_0".into()];
        let live: Vec<String> = ["rk_0", "rk_1", "rk_other", "rk_made"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let known = vec!["rk_other".to_string()];
        assert_eq!(orphans(&live, &known, Some("rk_1"), &j), vec!["rk_made"]);
    }
}
