//! One rotation, phase by phase (spec/lifecycle.md), and the watch that follows it.
//!
//! The order of effects is the point of this file:
//! 1. preflight proves everything that could fail *before* the old key is destroyed;
//! 2. the journal says `regenerating` (with the old key id) before regenerate is called;
//! 3. the journal says `storing` (new key id and fingerprint, never the secret) before any write;
//! 4. every destination is written in parallel and read back; each dependent is told to reload as soon
//!    as the destinations it reads from are confirmed, while verify runs beside, delaying nothing;
//! 5. the outcome is decided, counted and journaled; the watch starts after.
//!
//! Everything between the regenerate response and the last hook's answer is an outage for the key's
//! users (the invalidation window): nothing on that path waits for anything it does not need.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Engine, LivePhase, RotationRecord, RotationRequest, Runtime, Trigger, lock};
use crate::config::{DependentConfig, KeyConfig, ReloadHook, VerifyConfig};
use crate::journal::{AuditRecord, KeyJournal, Phase};
use crate::notify::{Probe, ReloadNotice};
use crate::provider::{KeyStatus, Provider, ProviderError, Regenerated};
use crate::secret::{Secret, fingerprint};
use crate::store::WriteRequest;
use crate::telemetry::Metrics;
use crate::telemetry::{
    CheckResult, Outcome, ProviderOperation, ProviderOutcome, RerotationReason,
};

/// How recovery resumes an interrupted rotation instead of regenerating.
#[derive(Debug, Clone)]
pub enum Resume {
    /// A destination holds the active key: copy it to the others, then notify and finish. Also used by
    /// reconcile to repair stale destinations.
    FromStorage {
        key_id: String,
        secret: Secret,
        rotation_id: Option<Uuid>,
    },
    /// The key is stored everywhere it could be: redo notify (hooks are idempotent) and finish.
    Notify {
        key_id: String,
        fingerprint: String,
        rotation_id: Option<Uuid>,
    },
}

/// Attempts of a regenerate that was refused without rotating (5xx with the key unchanged, 429,
/// connection refused) before the rotation ends `failed` with the old key still working.
const REGENERATE_ATTEMPTS: u32 = 3;
/// Hook calls of the watch before it gives up on resending (spec: at most twice).
const WATCH_RESENDS: u32 = 2;
/// Consecutive auth failures of a dependent in the watch before its reload hook is sent again.
const WATCH_FAILURES_BEFORE_RESEND: u32 = 3;

pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((250u64 << attempt.min(6)).min(10_000))
}

/// Runs one rotation to its outcome. Returns `None` for a dry run.
pub(crate) async fn run(
    engine: &Arc<Engine>,
    rt: &Arc<Runtime>,
    key: &KeyConfig,
    record: &Arc<Mutex<RotationRecord>>,
    req: RotationRequest,
) -> Option<Outcome> {
    let started = Instant::now();
    let rotation_id = lock(record).rotation_id;
    // Ends the rotation with an outcome that distributed nothing (no invalidation window).
    let end = |outcome: Outcome| finish(engine, key, record, &req, outcome, started, None);
    let provider = match rt.provider(key) {
        Ok(p) => p.clone(),
        Err(e) => {
            engine.event(record, "aborted", e.to_string());
            return Some(end(Outcome::Aborted));
        }
    };
    if !req.dry_run {
        engine.metrics.rotation_started(&key.name, Utc::now());
    }
    let audit = |event: &str,
                 outcome: Option<&str>,
                 old: Option<&str>,
                 new: Option<&str>,
                 fp: Option<&str>,
                 detail: &str| {
        engine.audit(AuditRecord {
            ts: Utc::now(),
            key: key.name.clone(),
            rotation_id: Some(rotation_id),
            event: event.into(),
            trigger: Some(req.trigger.as_str().into()),
            reason: Some(req.reason.clone()),
            requested_by: Some(req.requested_by.clone()),
            outcome: outcome.map(Into::into),
            old_key_id: old.map(Into::into),
            new_key_id: new.map(Into::into),
            fingerprint: fp.map(Into::into),
            detail: (!detail.is_empty()).then(|| detail.into()),
        })
    };
    if !req.dry_run {
        audit("started", None, None, None, None, "");
    }
    engine.event(
        record,
        "started",
        format!(
            "trigger {}, reason {:?}, requested by {}",
            req.trigger.as_str(),
            req.reason,
            req.requested_by
        ),
    );

    // Resumed rotations skip preflight and regenerate: the key already exists in a destination.
    if let Some(resume) = req.resume.clone() {
        let (key_id, secret, fp) = match resume {
            Resume::FromStorage { key_id, secret, .. } => {
                let fp = fingerprint(&secret);
                (key_id, Some(secret), fp)
            }
            Resume::Notify {
                key_id,
                fingerprint,
                ..
            } => (key_id, None, fingerprint),
        };
        let mut journal = load_journal(engine, key);
        // A crash during the watch: the outcome was already decided and counted. Redo notify and
        // finish (lifecycle.md, "Recovery after a crash") without starting a second full watch.
        let allow_watch = journal.phase != Phase::Watch;
        journal.phase = Phase::Notify;
        journal.rotation_id = Some(rotation_id);
        journal.new_key_id = Some(key_id.clone());
        journal.new_fingerprint = Some(fp.clone());
        save_journal(engine, &journal);
        let dist = distribute(
            engine,
            rt,
            &provider,
            key,
            record,
            rotation_id,
            &key_id,
            secret.as_ref(),
            &fp,
            Utc::now(),
        )
        .await;
        let outcome = dist.outcome();
        audit(
            "recovered",
            Some(outcome.as_str()),
            None,
            Some(&key_id),
            Some(&fp),
            &dist.summary(),
        );
        return Some(conclude(
            engine,
            rt,
            key,
            record,
            &req,
            journal,
            &key_id,
            &fp,
            outcome,
            started,
            &dist,
            allow_watch,
        ));
    }

    // 1. Preflight.
    let rerotating = req.rerotation.is_some();
    let preflight = preflight(engine, rt, &provider, key, &req).await;
    {
        let mut r = lock(record);
        r.preflight = preflight.findings.clone();
    }
    if req.dry_run {
        let verdict = if preflight.problems.is_empty() {
            "would rotate"
        } else {
            "would abort"
        };
        engine.event(
            record,
            "dry_run",
            format!("{verdict}: {}", preflight.findings.join("; ")),
        );
        lock(record).finished_at = Some(Utc::now());
        return None;
    }
    if !preflight.problems.is_empty() {
        let detail = preflight.problems.join("; ");
        engine.event(record, "aborted", format!("preflight: {detail}"));
        audit(
            "aborted",
            Some("aborted"),
            preflight.status.as_ref().map(|s| s.key_id.as_str()),
            None,
            None,
            &detail,
        );
        return Some(end(Outcome::Aborted));
    }
    engine.event(record, "preflight_ok", preflight.findings.join("; "));

    let mut journal = load_journal(engine, key);
    let mut rerotation = req.rerotation;
    let mut old_status = preflight.status.clone();
    let mut first = true;
    loop {
        if shutdown_before_destructive_step(engine, record) {
            return Some(end(Outcome::Aborted));
        }
        // Re-rotations are bounded in a row and, like every regenerate, by the daily budget.
        //
        // Semantics (config.md: "max_rerotations: re-rotations in a row before giving up"): with
        // `max_rerotations = N`, a rotation whose key keeps getting lost calls regenerate at most
        // 1 + N times (the first regenerate, then N re-rotations); the (N+1)-th re-rotation is not
        // attempted and the rotation ends `failed`. A re-rotation is counted (metric, audit) only when
        // it is actually attempted, i.e. after both bounds allowed it. `rerotations_in_row` is bumped
        // before the check, so after giving up it is > N and recovery defers to an operator.
        if rerotation.is_some() && (!first || rerotating) {
            journal.rerotations_in_row += 1;
        }
        // Giving up after a regenerate destroyed the old key leaves the key lost, not mid-regenerate:
        // a `regenerating` journal would make the recovery tick treat it as a fresh crash and start
        // the same doomed rotation again every few seconds.
        let give_up = |journal: &mut KeyJournal, detail: &str| {
            engine.event(record, "failed", detail);
            if rerotation.is_some() {
                journal.phase = Phase::Idle;
                journal.lost = true;
            }
            save_journal(engine, journal);
            audit("finished", Some("failed"), None, None, None, detail);
            end(Outcome::Failed)
        };
        if rerotation.is_some() && journal.rerotations_in_row > key.max_rerotations {
            let detail = format!(
                "{} re-rotations in a row (max_rerotations = {}); giving up until an operator acts",
                journal.rerotations_in_row - 1,
                key.max_rerotations
            );
            return Some(give_up(&mut journal, &detail));
        }
        first = false;
        let now = Utc::now();
        if journal.regenerations_since(now) >= key.max_regenerations_per_day as usize {
            let detail = format!(
                "regeneration budget exhausted: {} regenerate calls in the last 24h (max_regenerations_per_day = {})",
                journal.regenerations_since(now),
                key.max_regenerations_per_day
            );
            return Some(give_up(&mut journal, &detail));
        }
        if let Some(reason) = rerotation {
            engine.metrics.rerotation(&key.name, reason);
            audit(
                "rerotation",
                None,
                old_status.as_ref().map(|s| s.key_id.as_str()),
                None,
                None,
                reason.as_str(),
            );
            engine.event(record, "rerotation", format!("reason {}", reason.as_str()));
        }

        // 2. Regenerate, journaled first.
        if rerotation.is_some() && old_status.is_none() && provider.has_status() {
            old_status = status(&engine.metrics, &provider).await.ok();
        }
        let old_key_id = old_status
            .as_ref()
            .map(|s| s.key_id.clone())
            .or_else(|| journal.active_key_id.clone());
        engine.set_phase(&key.name, record, LivePhase::Regenerating);
        journal.phase = Phase::Regenerating;
        journal.rotation_id = Some(rotation_id);
        journal.trigger = Some(req.trigger.as_str().into());
        journal.reason = Some(req.reason.clone());
        journal.requested_by = Some(req.requested_by.clone());
        journal.started_at = Some(lock(record).started_at);
        journal.old_key_id = old_key_id.clone();
        journal.new_key_id = None;
        journal.new_fingerprint = None;
        let regen = regenerate(
            engine,
            &provider,
            key,
            record,
            &req,
            &mut journal,
            old_status.as_ref(),
        )
        .await;
        let issued = match regen {
            Regen::Issued(r) => r,
            Regen::Lost(detail) => {
                engine.event(record, "lost", &detail);
                rerotation = Some(RerotationReason::LostBeforeStorage);
                old_status = None;
                continue;
            }
            Regen::Unknown(detail) => {
                // The journal still says `regenerating` with the old key id: the recovery check
                // resolves it once the provider answers again.
                engine.event(record, "failed", &detail);
                audit(
                    "finished",
                    Some("failed"),
                    old_key_id.as_deref(),
                    None,
                    None,
                    &detail,
                );
                return Some(end(Outcome::Failed));
            }
            Regen::Refused(detail) => {
                // Refused by a re-rotation: the old key died with an earlier regenerate, so the
                // key is lost (a re-rotation is owed), not "still working".
                let detail = if rerotation.is_some() {
                    journal.lost = true;
                    format!("regenerate refused during a re-rotation, the key is lost: {detail}")
                } else {
                    format!("regenerate refused, the old key still works: {detail}")
                };
                engine.event(record, "failed", &detail);
                journal.phase = Phase::Idle;
                save_journal(engine, &journal);
                audit(
                    "finished",
                    Some("failed"),
                    old_key_id.as_deref(),
                    None,
                    None,
                    &detail,
                );
                return Some(end(Outcome::Failed));
            }
        };
        let issued_at = Utc::now();
        let fp = fingerprint(&issued.secret);
        let new_key_id = issued.key_id.clone();

        // 3. Store, journaled first (id and fingerprint only).
        journal.phase = Phase::Storing;
        journal.new_key_id = Some(new_key_id.clone());
        journal.new_fingerprint = Some(fp.clone());
        journal.issued_at = Some(issued_at);
        save_journal(engine, &journal);
        fail::fail_point!("after_regenerate");
        audit(
            "regenerated",
            None,
            old_key_id.as_deref(),
            Some(&new_key_id),
            Some(&fp),
            "",
        );
        engine.event(
            record,
            "regenerated",
            format!("new key {new_key_id} (fingerprint {fp})"),
        );

        let dist = distribute(
            engine,
            rt,
            &provider,
            key,
            record,
            rotation_id,
            &new_key_id,
            Some(&issued.secret),
            &fp,
            issued_at,
        )
        .await;
        drop(issued);
        audit_distribution(&audit, key, &dist, old_key_id.as_deref(), &new_key_id, &fp);
        journal = load_journal(engine, key);

        if dist.confirmed_count() == 0 {
            // Lost: nothing holds the new key and the old one is gone.
            let detail = format!("no destination confirmed the new key: {}", dist.summary());
            engine.event(record, "lost", &detail);
            journal.phase = Phase::Idle;
            journal.lost = true;
            journal.last_outcome = Some("failed".into());
            save_journal(engine, &journal);
            audit(
                "finished",
                Some("failed"),
                old_key_id.as_deref(),
                Some(&new_key_id),
                Some(&fp),
                &detail,
            );
            return Some(end(Outcome::Failed));
        }
        if dist.verify == VerifyResult::Drift && key.auto_recover {
            // Someone rotated between our regenerate and our verify: what we distributed is dead.
            engine.event(
                record,
                "drift",
                "the new key does not authenticate: rotated elsewhere meanwhile",
            );
            audit(
                "drift",
                None,
                Some(&new_key_id),
                None,
                Some(&fp),
                "new key refused by the provider",
            );
            rerotation = Some(RerotationReason::Drift);
            old_status = None;
            continue;
        }
        let outcome = dist.outcome();
        return Some(conclude(
            engine,
            rt,
            key,
            record,
            &req,
            journal,
            &new_key_id,
            &fp,
            outcome,
            started,
            &dist,
            true,
        ));
    }
}

/// The audit trail of a distribution: one `stored` record per confirmed destination, one `notified`
/// per reload hook that answered, `verified` when the new key authenticates at the provider.
fn audit_distribution(
    audit: &impl Fn(&str, Option<&str>, Option<&str>, Option<&str>, Option<&str>, &str),
    key: &KeyConfig,
    dist: &Distribution,
    old_key_id: Option<&str>,
    new_key_id: &str,
    fp: &str,
) {
    for (d, ok) in key.destinations.iter().zip(&dist.confirmed) {
        if *ok {
            let detail = format!("{} ({})", d.store, d.target);
            audit(
                "stored",
                None,
                old_key_id,
                Some(new_key_id),
                Some(fp),
                &detail,
            );
        }
    }
    for (dependent, ok) in &dist.hooks {
        if *ok {
            audit(
                "notified",
                None,
                old_key_id,
                Some(new_key_id),
                Some(fp),
                dependent,
            );
        }
    }
    if dist.verify == VerifyResult::Ok {
        let detail = "the new key authenticates at the provider";
        audit(
            "verified",
            None,
            old_key_id,
            Some(new_key_id),
            Some(fp),
            detail,
        );
    }
}

/// Records the outcome of a rotation that distributed a key, and starts its watch.
#[allow(clippy::too_many_arguments)]
fn conclude(
    engine: &Arc<Engine>,
    rt: &Arc<Runtime>,
    key: &KeyConfig,
    record: &Arc<Mutex<RotationRecord>>,
    req: &RotationRequest,
    mut journal: KeyJournal,
    key_id: &str,
    fp: &str,
    outcome: Outcome,
    started: Instant,
    dist: &Distribution,
    allow_watch: bool,
) -> Outcome {
    let rotation_id = lock(record).rotation_id;
    let watch = allow_watch
        && key.watch > Duration::ZERO
        && key.dependents.iter().any(|d| d.verify.is_some());
    journal.phase = if watch { Phase::Watch } else { Phase::Idle };
    journal.active_key_id = Some(key_id.to_string());
    journal.active_fingerprint = Some(fp.to_string());
    journal.rerotations_in_row = 0;
    journal.lost = false;
    journal.last_outcome = Some(outcome.as_str().into());
    journal.last_finished_at = Some(Utc::now());
    if req.trigger.is_scheduled() {
        journal.last_scheduled_run = Some(Utc::now());
    }
    save_journal(engine, &journal);
    engine.set_destinations(
        &key.name,
        dist.views.clone(),
        dist.confirmed_count() < key.destinations.len(),
    );
    engine.audit(AuditRecord {
        ts: Utc::now(),
        key: key.name.clone(),
        rotation_id: Some(rotation_id),
        event: "finished".into(),
        trigger: Some(req.trigger.as_str().into()),
        reason: Some(req.reason.clone()),
        requested_by: Some(req.requested_by.clone()),
        outcome: Some(outcome.as_str().into()),
        old_key_id: journal.old_key_id.clone(),
        new_key_id: Some(key_id.to_string()),
        fingerprint: Some(fp.to_string()),
        detail: Some(dist.summary()),
    });
    finish(engine, key, record, req, outcome, started, dist.window);
    if watch && !engine.shutdown.is_cancelled() {
        let token = engine.shutdown.child_token();
        engine.set_watch(&key.name, Some(token.clone()));
        let engine2 = engine.clone();
        let rt = rt.clone();
        let key = key.clone();
        let record = record.clone();
        let key_id = key_id.to_string();
        use tracing::Instrument;
        let span = tracing::info_span!("watch", key = %key.name, rotation_id = %rotation_id);
        engine.tasks.spawn(
            async move {
                watch_loop(
                    &engine2,
                    &rt,
                    &key,
                    &record,
                    rotation_id,
                    &key_id,
                    token.clone(),
                )
                .await;
                // The watch is over (or cancelled by a newer rotation, which owns the journal now).
                if !token.is_cancelled() {
                    engine2.set_watch(&key.name, None);
                    let mut j = load_journal(&engine2, &key);
                    if j.rotation_id == Some(rotation_id) && j.phase == Phase::Watch {
                        j.phase = Phase::Idle;
                        save_journal(&engine2, &j);
                    }
                }
            }
            .instrument(span),
        );
    }
    outcome
}

/// Counts and records an outcome.
fn finish(
    engine: &Arc<Engine>,
    key: &KeyConfig,
    record: &Arc<Mutex<RotationRecord>>,
    req: &RotationRequest,
    outcome: Outcome,
    started: Instant,
    window: Option<Duration>,
) -> Outcome {
    let now = Utc::now();
    engine
        .metrics
        .rotation_finished(&key.name, outcome, started.elapsed(), now);
    if let Some(w) = window {
        engine.metrics.invalidation_window(&key.name, w);
    }
    if outcome != Outcome::Success && outcome != Outcome::Degraded {
        // Keep the journal's last outcome in step for rotations that ended without conclude().
        let mut j = load_journal(engine, key);
        if j.last_outcome.as_deref() != Some(outcome.as_str()) || j.last_finished_at.is_none() {
            j.last_outcome = Some(outcome.as_str().into());
            j.last_finished_at = Some(now);
            if req.trigger.is_scheduled() {
                j.last_scheduled_run = Some(now);
            }
            save_journal(engine, &j);
        }
    }
    {
        let mut r = lock(record);
        r.outcome = Some(outcome.as_str());
        r.finished_at = Some(now);
        r.phase = LivePhase::Idle;
    }
    let window = window
        .map(|w| format!(", invalidation window {:.3}s", w.as_secs_f64()))
        .unwrap_or_default();
    engine.event(
        record,
        "finished",
        format!("outcome {}{window}", outcome.as_str()),
    );
    outcome
}

fn shutdown_before_destructive_step(engine: &Engine, record: &Arc<Mutex<RotationRecord>>) -> bool {
    if engine.shutdown.is_cancelled() {
        engine.event(
            record,
            "aborted",
            "keyrotd is shutting down; nothing was regenerated",
        );
        true
    } else {
        false
    }
}

pub(crate) fn load_journal(engine: &Engine, key: &KeyConfig) -> KeyJournal {
    match engine.load_journal(&key.name) {
        Ok(j) => j,
        Err(e) => {
            // An unreadable journal is kept aside (never overwritten silently) and a fresh one used.
            tracing::error!(error = %e, "Journal unreadable; starting a fresh one.");
            KeyJournal::new(&key.name)
        }
    }
}

pub(crate) fn save_journal(engine: &Engine, j: &KeyJournal) {
    if let Err(e) = engine.store_journal(j) {
        tracing::error!(error = %e, "Journal write failed.");
    }
}

/// Provider calls, counted.
pub(crate) async fn status(
    metrics: &Metrics,
    provider: &Provider,
) -> Result<KeyStatus, ProviderError> {
    let r = provider.status().await;
    count(
        metrics,
        provider,
        ProviderOperation::Status,
        r.as_ref().err(),
    );
    r
}

pub(crate) async fn auth_check(
    metrics: &Metrics,
    provider: &Provider,
    secret: &Secret,
) -> Result<Option<crate::provider::AuthIdentity>, ProviderError> {
    let r = provider.auth_check(secret).await;
    count(
        metrics,
        provider,
        ProviderOperation::AuthCheck,
        r.as_ref().err(),
    );
    r
}

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

/// Status with a few retries for transient errors and rate limits.
pub(crate) async fn status_retrying(
    metrics: &Metrics,
    provider: &Provider,
) -> Result<KeyStatus, ProviderError> {
    let mut attempt = 0;
    loop {
        match status(metrics, provider).await {
            Ok(s) => return Ok(s),
            Err(ProviderError::RateLimited { retry_after, .. }) if attempt < 4 => {
                tokio::time::sleep(retry_after).await
            }
            Err(ProviderError::Transient { .. }) if attempt < 4 => {
                tokio::time::sleep(backoff(attempt)).await
            }
            Err(e) => return Err(e),
        }
        attempt += 1;
    }
}

struct Preflight {
    status: Option<KeyStatus>,
    findings: Vec<String>,
    problems: Vec<String>,
}

/// Everything that could fail, checked before the old key is destroyed. A re-rotation (the old key is
/// already gone) checks the provider's account and the destinations only.
async fn preflight(
    engine: &Arc<Engine>,
    rt: &Runtime,
    provider: &Provider,
    key: &KeyConfig,
    req: &RotationRequest,
) -> Preflight {
    let mut findings = Vec::new();
    let mut problems = Vec::new();
    let rerotation = req.rerotation.is_some();

    if !req.force && !rerotation {
        if req.trigger.is_scheduled() && engine.is_paused() {
            problems.push("scheduled rotations are paused".to_string());
        }
        if let Some(w) = &key.window
            && !w.contains_at(Utc::now(), key.timezone)
        {
            problems.push("outside the rotation window".to_string());
        }
    }

    let status_fut = async {
        if provider.has_status() {
            Some(status_retrying(&engine.metrics, provider).await)
        } else {
            None
        }
    };
    let stores_fut = futures::future::join_all(key.destinations.iter().map(|d| async move {
        let r = match rt.store(&d.store) {
            Ok(s) => s.preflight(&d.target).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        (d, r)
    }));
    let deps_fut = futures::future::join_all(
        key.dependents
            .iter()
            .filter(|_| !rerotation)
            .filter_map(|d| d.verify.as_ref().map(|v| (d, v)))
            .map(|(d, v)| async move { (d, engine.notifier.probe(v).await) }),
    );
    let (status, stores, deps) = tokio::join!(status_fut, stores_fut, deps_fut);

    let status = match status {
        Some(Ok(s)) => {
            engine.set_status(&key.name, &s);
            if !s.active && !rerotation {
                problems.push(format!("provider reports key {} as not Active", s.key_id));
            }
            if let (Some(want), Some(got)) = (provider.expected_account(), s.account_id.as_deref())
                && want != got
            {
                problems.push(format!("key belongs to account {got}, expected {want}"));
            } else {
                findings.push(format!(
                    "provider: key {} active={} account {:?}",
                    s.key_id, s.active, s.account_id
                ));
            }
            Some(s)
        }
        Some(Err(e)) => {
            problems.push(format!("provider status: {e}"));
            None
        }
        None => {
            findings.push("provider has no status endpoint: account and Active not checked".into());
            None
        }
    };
    for (d, r) in stores {
        match r {
            Ok(()) => findings.push(format!("{} ({}) writable", d.store, d.target)),
            Err(e) => problems.push(format!("destination {e}")),
        }
    }
    for (d, probe) in deps {
        match probe {
            Probe::Unreachable(e) => {
                problems.push(format!("dependent {} unreachable: {e}", d.name))
            }
            p => findings.push(format!("dependent {} reachable ({p:?})", d.name)),
        }
    }
    Preflight {
        status,
        findings,
        problems,
    }
}

enum Regen {
    Issued(Regenerated),
    /// The provider rotated but the secret never reached us.
    Lost(String),
    /// The provider did not rotate and will not now (auth, 4xx, retries spent): the old key works.
    Refused(String),
    /// Ambiguous, and the provider's status could not be read to tell.
    Unknown(String),
}

/// Calls regenerate, classifying the outcome. Each call that may have destroyed a key is recorded in
/// the journal's budget before it is sent; calls refused outright are taken off again.
async fn regenerate(
    engine: &Engine,
    provider: &Provider,
    key: &KeyConfig,
    record: &Arc<Mutex<RotationRecord>>,
    req: &RotationRequest,
    journal: &mut KeyJournal,
    before: Option<&KeyStatus>,
) -> Regen {
    let mut attempt = 0;
    loop {
        if journal.regenerations_since(Utc::now()) >= key.max_regenerations_per_day as usize {
            return Regen::Refused("regeneration budget exhausted".into());
        }
        let sent_at = Utc::now();
        journal.regenerations.push(sent_at);
        save_journal(engine, journal);
        fail::fail_point!("before_regenerate");
        let r = provider
            .regenerate(&req.reason, journal.old_key_id.as_deref())
            .await;
        count(
            &engine.metrics,
            provider,
            ProviderOperation::Regenerate,
            r.as_ref().err(),
        );
        let unsend = |journal: &mut KeyJournal| {
            journal.regenerations.retain(|t| *t != sent_at);
            save_journal(engine, journal);
        };
        match r {
            Ok(issued) => return Regen::Issued(issued),
            Err(ProviderError::Ambiguous { message, .. }) => {
                engine.event(
                    record,
                    "ambiguous",
                    format!("regenerate outcome unknown ({message}); re-reading status"),
                );
                if !provider.has_status() {
                    return Regen::Lost(
                        "ambiguous regenerate and no status endpoint: assuming lost".into(),
                    );
                }
                match status_retrying(&engine.metrics, provider).await {
                    Ok(now) => {
                        let rotated = match before {
                            Some(b) => now.key_id != b.key_id || now.last_rotated != b.last_rotated,
                            None => journal.old_key_id.as_deref() != Some(now.key_id.as_str()),
                        };
                        if rotated {
                            return Regen::Lost(format!(
                                "the provider rotated to {} but the response was lost in transit",
                                now.key_id
                            ));
                        }
                        // Known now not to have destroyed a key: off the budget, like a refusal.
                        unsend(journal);
                        engine.event(
                            record,
                            "retry",
                            "the provider did not rotate; the old key still works",
                        );
                    }
                    Err(e) => {
                        return Regen::Unknown(format!(
                            "regenerate outcome unknown and status unreadable: {e}"
                        ));
                    }
                }
            }
            Err(ProviderError::RateLimited { retry_after, .. }) => {
                unsend(journal);
                engine.event(record, "rate_limited", format!("waiting {retry_after:?}"));
                tokio::time::sleep(retry_after).await;
            }
            Err(ProviderError::Transient { message, .. }) => {
                unsend(journal);
                engine.event(record, "retry", format!("regenerate not sent: {message}"));
            }
            Err(e @ (ProviderError::Auth { .. } | ProviderError::Permanent { .. })) => {
                unsend(journal);
                return Regen::Refused(e.to_string());
            }
        }
        attempt += 1;
        if attempt >= REGENERATE_ATTEMPTS {
            return Regen::Refused(format!("{attempt} attempts, the provider did not rotate"));
        }
        tokio::time::sleep(backoff(attempt)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VerifyResult {
    Ok,
    /// The new secret does not authenticate, or the provider's key id moved on: rotated elsewhere.
    Drift,
    /// Could not tell (provider unreachable, no auth_check) — not a reason to re-rotate.
    Unknown,
    Skipped,
}

/// What the store + notify + verify part of a rotation achieved.
pub(crate) struct Distribution {
    pub confirmed: Vec<bool>,
    pub hooks: Vec<(String, bool)>,
    pub verify: VerifyResult,
    pub window: Option<Duration>,
    pub views: Vec<super::DestinationView>,
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
        let stored = self.confirmed_count();
        let failed_hooks: Vec<&str> = self
            .hooks
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(d, _)| d.as_str())
            .collect();
        let mut s = format!("{stored}/{} destinations confirmed", self.confirmed.len());
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

/// Writes every destination in parallel (each retried until `store_deadline`, then read back until it
/// shows the new fingerprint), calls each dependent's hook as soon as its destinations are confirmed,
/// and verifies the new key beside it. `secret` None = every destination already holds the key (a
/// resumed notify): only the hooks run.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn distribute(
    engine: &Arc<Engine>,
    rt: &Arc<Runtime>,
    provider: &Arc<Provider>,
    key: &KeyConfig,
    record: &Arc<Mutex<RotationRecord>>,
    rotation_id: Uuid,
    key_id: &str,
    secret: Option<&Secret>,
    fp: &str,
    issued_at: DateTime<Utc>,
) -> Distribution {
    let window_start = Instant::now();
    let deadline = tokio::time::Instant::now() + key.store_deadline;
    engine.set_phase(&key.name, record, LivePhase::Storing);

    // Verify runs beside everything else.
    let verify = async {
        let Some(secret) = secret else {
            return VerifyResult::Skipped;
        };
        if !provider.has_auth_check() {
            return VerifyResult::Unknown;
        }
        let mut attempt = 0;
        loop {
            match auth_check(&engine.metrics, provider, secret).await {
                Ok(Some(_)) => {
                    // Confirmation: the provider's metadata shows the key we issued.
                    if provider.has_status()
                        && let Ok(s) = status_retrying(&engine.metrics, provider).await
                    {
                        engine.set_status(&key.name, &s);
                        if s.key_id != key_id {
                            return VerifyResult::Drift;
                        }
                    }
                    return VerifyResult::Ok;
                }
                Ok(None) => return VerifyResult::Drift,
                Err(_) if attempt < 4 => tokio::time::sleep(backoff(attempt)).await,
                Err(_) => return VerifyResult::Unknown,
            }
            attempt += 1;
        }
    };

    // Destinations, each its own future; confirmations stream in as they happen.
    let write_req = secret.map(|s| WriteRequest {
        key: &key.name,
        rotation_id,
        key_id,
        secret: s,
        fingerprint: fp,
        rotated_at: issued_at,
    });
    let mut writes: FuturesUnordered<_> = key
        .destinations
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let write_req = write_req.clone();
            async move {
                let Some(req) = write_req else {
                    return (i, Ok(None));
                };
                let store = match rt.store(&d.store) {
                    Ok(s) => s.clone(),
                    Err(e) => return (i, Err(e.to_string())),
                };
                let mut attempt = 0u32;
                let mut last_err = String::from("deadline passed before the first attempt");
                loop {
                    let r = async {
                        let version = store.write(&d.target, &req).await?;
                        // Read back until the new fingerprint shows (eventually consistent stores).
                        let mut reads = 0;
                        loop {
                            match store.read_back(&d.target).await? {
                                Some((got, v)) if got == fp => return Ok(v.or(version)),
                                _ if reads < 10 => {
                                    tokio::time::sleep(Duration::from_millis(50 << reads.min(4)))
                                        .await
                                }
                                _ => {
                                    return Err(crate::store::StoreError {
                                        kind: crate::store::StoreErrorKind::Transient,
                                        store: d.store.clone(),
                                        target: d.target.to_string(),
                                        message: "read-back does not show the new value yet".into(),
                                    });
                                }
                            }
                            reads += 1;
                        }
                    };
                    match tokio::time::timeout_at(deadline, r).await {
                        Ok(Ok(version)) => {
                            engine.metrics.store_write(&key.name, &d.store, true);
                            return (i, Ok(version));
                        }
                        Ok(Err(e)) => {
                            engine.metrics.store_write(&key.name, &d.store, false);
                            tracing::warn!(store = %d.store, error = %e, "Store write failed.");
                            last_err = e.to_string();
                            if !e.is_retryable() && attempt >= 2 {
                                return (i, Err(last_err));
                            }
                        }
                        Err(_) => return (i, Err(format!("{last_err} (store_deadline reached)"))),
                    }
                    attempt += 1;
                    if tokio::time::timeout_at(deadline, tokio::time::sleep(backoff(attempt)))
                        .await
                        .is_err()
                    {
                        return (i, Err(format!("{last_err} (store_deadline reached)")));
                    }
                }
            }
        })
        .collect();

    let n = key.destinations.len();
    let mut confirmed = vec![false; n];
    let mut versions: Vec<Option<String>> = vec![None; n];
    let mut errors: Vec<Option<String>> = vec![None; n];
    let mut hooks_started: HashSet<usize> = HashSet::new();
    let mut hooks: FuturesUnordered<_> = FuturesUnordered::new();
    let mut last_effect = None::<Instant>;
    let mut journaled_notify = false;
    let notice_key_id = key_id.to_string();

    let deps_ready = |confirmed: &[bool], dep: &DependentConfig| {
        key.destinations
            .iter()
            .enumerate()
            .filter(|(_, d)| dep.reads_from.contains(&d.store))
            .all(|(i, _)| confirmed[i])
    };

    let mut pending_writes = n;
    let mut hook_results: Vec<(String, bool)> = Vec::new();
    let store_and_notify = async {
        // Nothing to write: every hook may go at once.
        if n == 0 || secret.is_none() {
            for c in confirmed.iter_mut() {
                *c = true;
            }
        }
        loop {
            // Start the hooks whose destinations are all confirmed.
            if confirmed.iter().any(|c| *c) && !journaled_notify {
                journaled_notify = true;
                let mut j = load_journal(engine, key);
                if j.phase == Phase::Storing {
                    j.phase = Phase::Notify;
                    save_journal(engine, &j);
                }
                fail::fail_point!("after_first_store");
                engine.set_phase(&key.name, record, LivePhase::Notifying);
            }
            for (di, dep) in key.dependents.iter().enumerate() {
                if dep.reload.is_some()
                    && !hooks_started.contains(&di)
                    && deps_ready(&confirmed, dep)
                {
                    hooks_started.insert(di);
                    let notice_key_id = notice_key_id.clone();
                    hooks.push(async move {
                        let ok =
                            call_hook(engine, key, dep, rotation_id, &notice_key_id, issued_at)
                                .await;
                        (di, ok)
                    });
                }
            }
            tokio::select! {
                Some((i, r)) = writes.next(), if pending_writes > 0 && secret.is_some() => {
                    pending_writes -= 1;
                    match r {
                        Ok(v) => {
                            confirmed[i] = true;
                            versions[i] = v;
                            last_effect = Some(Instant::now());
                            engine.event(record, "stored", format!("{} ({})", key.destinations[i].store, key.destinations[i].target));
                        }
                        Err(e) => {
                            engine.event(record, "store_failed", e.clone());
                            errors[i] = Some(e);
                        }
                    }
                }
                Some((di, ok)) = hooks.next(), if !hooks.is_empty() => {
                    last_effect = Some(Instant::now());
                    let name = &key.dependents[di].name;
                    if ok { engine.event(record, "notified", name.clone()) } else { engine.event(record, "hook_failed", name.clone()) }
                    hook_results.push((name.clone(), ok));
                }
                else => break,
            }
        }
    };
    let (verify, ()) = tokio::join!(verify, store_and_notify);
    // Off the hooks' path (every hook has answered): the stores' follow-up work, e.g. the AWS tags
    // that let a later read tell which key id a value is.
    if let Some(req) = &write_req {
        after_writes(rt, key, &confirmed, req).await;
    }

    // Dependents whose destinations never confirmed were not told: their hook counts as failed.
    for (di, dep) in key.dependents.iter().enumerate() {
        if dep.reload.is_some() && !hooks_started.contains(&di) {
            engine.metrics.reload_hook(&key.name, &dep.name, false);
            hook_results.push((dep.name.clone(), false));
        }
    }
    let window = last_effect.map(|t| t.duration_since(window_start));
    match verify {
        VerifyResult::Ok => engine.event(
            record,
            "verified",
            format!("key {key_id} authenticates at the provider"),
        ),
        VerifyResult::Drift => {
            engine.event(record, "verify_failed", "the new key does not authenticate")
        }
        VerifyResult::Unknown => {
            engine.event(record, "verify_unknown", "could not verify the new key")
        }
        VerifyResult::Skipped => {}
    }

    let views = key
        .destinations
        .iter()
        .enumerate()
        .map(|(i, d)| super::DestinationView {
            store: d.store.clone(),
            target: d.target.to_string(),
            key_id: confirmed[i].then(|| key_id.to_string()),
            fingerprint: confirmed[i].then(|| fp.to_string()),
            version: versions[i].clone(),
            in_sync: confirmed[i],
            error: errors[i].clone(),
        })
        .collect();

    // Stragglers keep being retried in the background (degraded, not abandoned).
    if let Some(secret) = secret
        && confirmed.iter().any(|c| !*c)
        && confirmed.iter().any(|c| *c)
    {
        background_fill(
            engine,
            rt,
            key,
            rotation_id,
            key_id,
            secret.clone(),
            fp,
            issued_at,
            &confirmed,
        );
    }
    Distribution {
        confirmed,
        hooks: hook_results,
        verify,
        window,
        views,
    }
}

/// Runs each confirmed destination's `after_write` (AWS tags). A failure is logged only: the value is
/// stored; what is missing is metadata, which the next write sets again.
async fn after_writes(rt: &Runtime, key: &KeyConfig, confirmed: &[bool], req: &WriteRequest<'_>) {
    futures::future::join_all(
        key.destinations
            .iter()
            .zip(confirmed)
            .filter(|(_, ok)| **ok)
            .map(|(d, _)| async move {
                let Ok(store) = rt.store(&d.store) else {
                    return;
                };
                if let Err(e) = store.after_write(&d.target, req).await {
                    tracing::warn!(store = %d.store, error = %e, "Follow-up after the write failed (value stored; metadata missing).");
                }
            }),
    )
    .await;
}

/// One reload hook with its retries; counted.
async fn call_hook(
    engine: &Engine,
    key: &KeyConfig,
    dep: &DependentConfig,
    rotation_id: Uuid,
    key_id: &str,
    rotated_at: DateTime<Utc>,
) -> bool {
    let Some(hook) = &dep.reload else { return true };
    let retries = match hook {
        ReloadHook::Http { retries, .. } | ReloadHook::Command { retries, .. } => *retries,
    };
    let notice = ReloadNotice {
        key: &key.name,
        rotation_id,
        key_id,
        rotated_at,
    };
    for attempt in 0..=retries {
        match engine.notifier.reload(hook, &notice).await {
            Ok(()) => {
                engine.metrics.reload_hook(&key.name, &dep.name, true);
                return true;
            }
            Err(e) => {
                engine.metrics.reload_hook(&key.name, &dep.name, false);
                tracing::warn!(dependent = %dep.name, attempt, error = %e, "Reload hook failed.");
                if attempt < retries {
                    tokio::time::sleep(backoff(attempt + 1)).await;
                }
            }
        }
    }
    false
}

/// Keeps writing the destinations a degraded rotation could not confirm, then tells the dependents
/// that read from them. Ends when all are written, a newer rotation starts, or after a while (reconcile
/// repairs what is left from a good destination).
#[allow(clippy::too_many_arguments)]
fn background_fill(
    engine: &Arc<Engine>,
    rt: &Arc<Runtime>,
    key: &KeyConfig,
    rotation_id: Uuid,
    key_id: &str,
    secret: Secret,
    fp: &str,
    issued_at: DateTime<Utc>,
    confirmed: &[bool],
) {
    let engine = engine.clone();
    let rt = rt.clone();
    let key = key.clone();
    let key_id = key_id.to_string();
    let fp = fp.to_string();
    let mut confirmed = confirmed.to_vec();
    let token = engine.shutdown.clone();
    use tracing::Instrument;
    let span = tracing::info_span!("background_fill", key = %key.name, rotation_id = %rotation_id);
    engine.tasks.clone().spawn(
        async move {
            let req = WriteRequest {
                key: &key.name,
                rotation_id,
                key_id: &key_id,
                secret: &secret,
                fingerprint: &fp,
                rotated_at: issued_at,
            };
            let give_up = tokio::time::Instant::now() + Duration::from_secs(3600);
            let mut attempt = 0;
            while confirmed.iter().any(|c| !*c) && tokio::time::Instant::now() < give_up {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(backoff(attempt).max(Duration::from_secs(1))) => {}
                }
                attempt = (attempt + 1).min(5);
                // A newer rotation owns the key now.
                let j = load_journal(&engine, &key);
                if j.active_key_id.as_deref() != Some(key_id.as_str()) && j.new_key_id.as_deref() != Some(key_id.as_str()) {
                    return;
                }
                for (i, d) in key.destinations.iter().enumerate() {
                    if confirmed[i] {
                        continue;
                    }
                    let Ok(store) = rt.store(&d.store) else { continue };
                    let ok = match store.write(&d.target, &req).await {
                        Ok(_) => matches!(store.read(&d.target).await, Ok(Some(v)) if v.fingerprint == fp),
                        Err(_) => false,
                    };
                    engine.metrics.store_write(&key.name, &d.store, ok);
                    if ok {
                        confirmed[i] = true;
                        tracing::info!(store = %d.store, "Destination filled after the deadline.");
                        if let Err(e) = store.after_write(&d.target, &req).await {
                            tracing::warn!(store = %d.store, error = %e, "Follow-up after the write failed (value stored; metadata missing).");
                        }
                        // Dependents reading from it that could not be told before are told now.
                        for dep in &key.dependents {
                            let all = key
                                .destinations
                                .iter()
                                .enumerate()
                                .filter(|(_, dd)| dep.reads_from.contains(&dd.store))
                                .all(|(k, _)| confirmed[k]);
                            if all && dep.reads_from.contains(&d.store) {
                                call_hook(&engine, &key, dep, rotation_id, &key_id, issued_at).await;
                            }
                        }
                    }
                }
            }
            if confirmed.iter().all(|c| *c) {
                let views: Vec<_> = key
                    .destinations
                    .iter()
                    .map(|d| super::DestinationView {
                        store: d.store.clone(),
                        target: d.target.to_string(),
                        key_id: Some(key_id.clone()),
                        fingerprint: Some(fp.clone()),
                        version: None,
                        in_sync: true,
                        error: None,
                    })
                    .collect();
                engine.set_destinations(&key.name, views, false);
            }
        }
        .instrument(span),
    );
}

/// The watch: probe each dependent's verify every `watch_interval` for `watch`; resend the reload hook
/// to a dependent still failing auth after 3 probes (at most twice); re-read the provider to catch a
/// rotation by someone else (drift → re-rotation).
async fn watch_loop(
    engine: &Arc<Engine>,
    rt: &Arc<Runtime>,
    key: &KeyConfig,
    record: &Arc<Mutex<RotationRecord>>,
    rotation_id: Uuid,
    key_id: &str,
    cancel: CancellationToken,
) {
    let provider = match rt.provider(key) {
        Ok(p) => p.clone(),
        Err(_) => return,
    };
    let until = tokio::time::Instant::now() + key.watch;
    let deps: Vec<(&DependentConfig, &VerifyConfig)> = key
        .dependents
        .iter()
        .filter_map(|d| d.verify.as_ref().map(|v| (d, v)))
        .collect();
    let mut failing = vec![0u32; deps.len()];
    let mut resent = vec![0u32; deps.len()];
    let issued_at = Utc::now();
    loop {
        let probes =
            futures::future::join_all(deps.iter().map(|(_, v)| engine.notifier.probe(v))).await;
        for (i, ((dep, _), probe)) in deps.iter().zip(probes).enumerate() {
            let result = match &probe {
                Probe::Ok => CheckResult::Ok,
                Probe::AuthFailure(_) => CheckResult::AuthFailure,
                _ => CheckResult::Error,
            };
            engine
                .metrics
                .post_rotation_check(&key.name, &dep.name, result);
            let detail = format!("{}: {probe:?}", dep.name);
            lock(record).events.push(super::RecordEvent {
                ts: Utc::now(),
                event: "probe".into(),
                detail,
            });
            if result == CheckResult::AuthFailure {
                tracing::warn!(dependent = %dep.name, "Dependent fails authentication after rotation.");
                failing[i] += 1;
                if failing[i] >= WATCH_FAILURES_BEFORE_RESEND
                    && resent[i] < WATCH_RESENDS
                    && dep.reload.is_some()
                {
                    resent[i] += 1;
                    failing[i] = 0;
                    let ok = call_hook(engine, key, dep, rotation_id, key_id, issued_at).await;
                    tracing::info!(dependent = %dep.name, ok, "Reload hook sent again.");
                }
            } else {
                failing[i] = 0;
            }
        }
        if provider.has_status()
            && let Ok(s) = status(&engine.metrics, &provider).await
        {
            engine.set_status(&key.name, &s);
            if s.key_id != key_id && s.active {
                tracing::warn!(provider_key_id = %s.key_id, "Provider's key changed during the watch: drift.");
                engine.audit(AuditRecord {
                    ts: Utc::now(),
                    key: key.name.clone(),
                    rotation_id: Some(rotation_id),
                    event: "drift".into(),
                    trigger: Some(Trigger::Reconcile.as_str().into()),
                    detail: Some(format!("provider now reports {}", s.key_id)),
                    ..Default::default()
                });
                engine.metrics.drift(&key.name, true);
                if key.auto_recover {
                    let mut req =
                        RotationRequest::new(Trigger::Recovery, "drift", requested_by(engine));
                    req.rerotation = Some(RerotationReason::Drift);
                    let engine = engine.clone();
                    let name = key.name.clone();
                    // Started from a fresh task: this watch is cancelled by the rotation it starts.
                    tokio::spawn(async move {
                        if let Err(e) = engine.start_rotation(&name, req) {
                            tracing::warn!(error = %e, "Re-rotation after drift not started.");
                        }
                    });
                }
                return;
            }
        }
        let next = tokio::time::Instant::now() + key.watch_interval;
        if next > until {
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

/// `requested_by` for rotations keyrotd starts itself.
pub(crate) fn requested_by(engine: &Engine) -> String {
    let config = engine.config();
    config
        .providers
        .values()
        .map(|p| match p {
            crate::config::ProviderConfig::Aos(a) => a.requested_by.clone(),
            crate::config::ProviderConfig::Http(h) => h.requested_by.clone(),
        })
        .next()
        .unwrap_or_else(|| "keyrotd".into())
}

/// Re-exported for recovery: the engine's own `Trigger::Recovery` request with a re-rotation reason.
pub(crate) fn recovery_request(engine: &Engine, reason: RerotationReason) -> RotationRequest {
    let mut req = RotationRequest::new(Trigger::Recovery, reason.as_str(), requested_by(engine));
    req.rerotation = Some(reason);
    req
}
