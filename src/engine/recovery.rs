//! Making things right without an operator: what a journal left by a crash means (at start), the
//! re-rotation owed for a lost key (once a destination is writable again), and reconcile — comparing
//! the provider's active key with what every destination holds (drift detection and repair).
//!
//! Every decision here ends in one of: nothing to do, resume an interrupted rotation from a destination
//! that holds the key, or a re-rotation. Re-rotations go through the same lifecycle and the same bounds
//! (`max_rerotations` in a row, `max_regenerations_per_day`) as any rotation.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;

use super::rotation::{Resume, load_journal, recovery_request, save_journal, status_retrying};
use super::{DestinationView, Engine, RotationRequest, Runtime, Trigger};
use crate::config::KeyConfig;
use crate::journal::{AuditRecord, KeyJournal, Phase};
use crate::provider::KeyStatus;
use crate::secret::Secret;
use crate::store::StoredValue;
use crate::telemetry::Metrics;
use crate::telemetry::RerotationReason;

/// What the recovery scan decided for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// The journal's interrupted rotation needs no action (nothing was regenerated).
    Cleared,
    Resumed,
    Rerotate(RerotationReason),
    /// Undecidable now (provider unreachable); retried by the periodic check.
    Deferred(String),
}

/// At start, before scheduling anything: decide every key's journal. Recovery rotations are started
/// in the background; this returns once every key is decided.
pub async fn recover_all(engine: &Arc<Engine>) -> BTreeMap<String, Decision> {
    let rt = engine.runtime();
    let decisions = futures::future::join_all(rt.config.keys.iter().map(|k| {
        let rt = rt.clone();
        async move {
            let d = recover_key(engine, &rt, k, true).await;
            (k.name.clone(), d)
        }
    }))
    .await;
    // Keys with nothing to recover get their live view now (recovery rotations refresh theirs).
    futures::future::join_all(
        rt.config
            .keys
            .iter()
            .zip(&decisions)
            .filter(|(_, (_, d))| *d == Decision::Nothing)
            .map(|(k, _)| look(engine, &rt, k)),
    )
    .await;
    engine.set_ready();
    decisions.into_iter().collect()
}

/// The periodic part of recovery: owed re-rotations of lost keys and ambiguous regenerates that could
/// not be resolved yet.
pub async fn recovery_tick(engine: &Arc<Engine>) {
    let rt = engine.runtime();
    for k in &rt.config.keys {
        if engine.is_busy(&k.name) {
            continue;
        }
        let j = load_journal(engine, k);
        if j.lost || j.phase == Phase::Regenerating {
            recover_key(engine, &rt, k, false).await;
        }
    }
}

async fn recover_key(
    engine: &Arc<Engine>,
    rt: &Arc<Runtime>,
    key: &KeyConfig,
    at_start: bool,
) -> Decision {
    let Ok(provider) = rt.provider(key) else {
        return Decision::Nothing;
    };
    let provider = provider.clone();
    let mut journal = load_journal(engine, key);
    let status = if provider.has_status() {
        status_retrying(&engine.metrics, &provider).await.ok()
    } else {
        None
    };
    if let Some(s) = &status {
        engine.set_status(&key.name, s);
    }
    let decision = match journal.phase {
        Phase::Idle if journal.lost => {
            if !key.auto_recover {
                Decision::Deferred("key lost; auto_recover is off".into())
            } else if journal.rerotations_in_row > key.max_rerotations {
                Decision::Deferred(
                    "key lost; max_rerotations reached, waiting for an operator".into(),
                )
            } else if journal.regenerations_since(Utc::now())
                >= key.max_regenerations_per_day as usize
            {
                // The rotation would only fail on the budget again (every few seconds).
                Decision::Deferred("key lost; regeneration budget exhausted".into())
            } else if any_destination_writable(rt, key).await {
                Decision::Rerotate(RerotationReason::LostBeforeStorage)
            } else {
                Decision::Deferred("key lost; no destination writable yet".into())
            }
        }
        Phase::Idle => Decision::Nothing,
        Phase::Regenerating => match (&status, provider.has_status()) {
            (Some(s), _) if Some(s.key_id.as_str()) != journal.old_key_id.as_deref() => {
                Decision::Rerotate(RerotationReason::CrashRecovery)
            }
            (Some(_), _) => {
                journal.phase = Phase::Idle;
                save_journal(engine, &journal);
                Decision::Cleared
            }
            // Without a status endpoint there is no telling: re-rotate (config.md says so).
            (None, false) => Decision::Rerotate(RerotationReason::CrashRecovery),
            (None, true) => Decision::Deferred("provider status unreadable".into()),
        },
        Phase::Storing => {
            // Does a destination hold the key the provider has now? Copy it from there.
            let (_, good) = holders(rt, key, &journal, status.as_ref()).await;
            match (good, journal.new_key_id.clone()) {
                (Some(secret), Some(key_id)) => {
                    start_resume(
                        engine,
                        key,
                        Resume::FromStorage {
                            key_id,
                            secret,
                            rotation_id: journal.rotation_id,
                        },
                    );
                    Decision::Resumed
                }
                _ => Decision::Rerotate(RerotationReason::CrashRecovery),
            }
        }
        // The new key reached at least one destination before the crash (the journal says `notify`
        // only after the first confirmation), but not necessarily all of them: look before resuming.
        // Every destination holds it → redo notify only; some → copy from a good one to the others,
        // then notify; none (or the provider moved on) → the key is lost: re-rotation.
        Phase::Notify | Phase::Verify | Phase::Watch if at_start => {
            match (journal.new_key_id.clone(), journal.new_fingerprint.clone()) {
                (Some(key_id), Some(fingerprint)) => {
                    let (held, good) = holders(rt, key, &journal, status.as_ref()).await;
                    let resume = match good {
                        Some(_) if held.iter().all(|h| *h) => Some(Resume::Notify {
                            key_id,
                            fingerprint,
                            rotation_id: journal.rotation_id,
                        }),
                        Some(secret) => Some(Resume::FromStorage {
                            key_id,
                            secret,
                            rotation_id: journal.rotation_id,
                        }),
                        None => None,
                    };
                    match resume {
                        Some(resume) => {
                            start_resume(engine, key, resume);
                            Decision::Resumed
                        }
                        None => Decision::Rerotate(RerotationReason::CrashRecovery),
                    }
                }
                // A journal past `storing` without the new key's identity is not ours to act on.
                _ => Decision::Nothing,
            }
        }
        Phase::Notify | Phase::Verify | Phase::Watch => Decision::Nothing,
    };
    if let Decision::Rerotate(reason) = decision {
        if matches!(reason, RerotationReason::CrashRecovery) {
            engine.audit(AuditRecord {
                ts: Utc::now(),
                key: key.name.clone(),
                rotation_id: journal.rotation_id,
                event: "recovered".into(),
                trigger: Some(Trigger::Recovery.as_str().into()),
                reason: Some(reason.as_str().into()),
                old_key_id: journal.old_key_id.clone(),
                new_key_id: journal.new_key_id.clone(),
                detail: Some(format!(
                    "journal phase {:?}: the new key died with the process",
                    journal.phase
                )),
                ..Default::default()
            });
        }
        if let Err(e) = engine.start_rotation(&key.name, recovery_request(engine, reason)) {
            tracing::warn!(key = %key.name, error = %e, "Recovery rotation not started.");
        }
    }
    if decision != Decision::Nothing {
        tracing::info!(key = %key.name, decision = ?decision, "Recovery decided.");
    }
    decision
}

/// Which destinations hold the journal's new key (by fingerprint), and its secret read from one that
/// does. Nothing counts as held when the provider's status shows another key than the journal's new
/// one: that value no longer authenticates. Unreadable destinations count as not holding it (a resume
/// writes them).
async fn holders(
    rt: &Runtime,
    key: &KeyConfig,
    journal: &KeyJournal,
    status: Option<&KeyStatus>,
) -> (Vec<bool>, Option<Secret>) {
    let provider_has_it = match (status, &journal.new_key_id) {
        (Some(s), Some(new)) => &s.key_id == new,
        (None, _) => true,
        _ => false,
    };
    let wanted = journal.new_fingerprint.as_ref();
    let values = read_all(rt, key).await;
    let held: Vec<bool> = values
        .iter()
        .map(|(_, v)| provider_has_it && matches!(v, Ok(Some(v)) if Some(&v.fingerprint) == wanted))
        .collect();
    let good = values
        .into_iter()
        .zip(&held)
        .find_map(|((_, v), h)| match v {
            Ok(Some(v)) if *h => Some(v.secret),
            _ => None,
        });
    (held, good)
}

fn start_resume(engine: &Arc<Engine>, key: &KeyConfig, resume: Resume) {
    let mut req = RotationRequest::new(
        Trigger::Recovery,
        "crash_recovery",
        super::rotation::requested_by(engine),
    );
    req.resume = Some(resume);
    if let Err(e) = engine.start_rotation(&key.name, req) {
        tracing::warn!(key = %key.name, error = %e, "Resumed rotation not started.");
    }
}

async fn any_destination_writable(rt: &Runtime, key: &KeyConfig) -> bool {
    let checks = futures::future::join_all(key.destinations.iter().map(|d| async move {
        match rt.store(&d.store) {
            Ok(s) => s.preflight(&d.target).await.is_ok(),
            Err(_) => false,
        }
    }))
    .await;
    checks.into_iter().any(|ok| ok)
}

type Read = Result<Option<StoredValue>, String>;

async fn read_all(rt: &Runtime, key: &KeyConfig) -> Vec<(usize, Read)> {
    futures::future::join_all(
        key.destinations
            .iter()
            .enumerate()
            .map(|(i, d)| async move {
                let r = match rt.store(&d.store) {
                    Ok(s) => s.read(&d.target).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                (i, r)
            }),
    )
    .await
}

/// What reconcile found for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    InSync,
    /// Some destinations hold the active key, others not: copied from a good one.
    Repaired,
    /// No destination holds the active key.
    Drift {
        rerotating: bool,
    },
    NotActive,
    Skipped(String),
}

/// Reconcile every key once.
pub async fn reconcile_all(engine: &Arc<Engine>) -> Vec<(String, Reconciled)> {
    let rt = engine.runtime();
    let mut out = Vec::new();
    for k in &rt.config.keys {
        out.push((k.name.clone(), reconcile_key(engine, &rt, k).await));
    }
    out
}

/// What the provider and every destination say about a key, read live. Read-only: the caller decides
/// whether to persist an adoption (see [`Observation::adopted`]).
pub struct Observation {
    pub status: Option<KeyStatus>,
    /// Why `status` is missing (provider unreachable), if it is.
    pub status_error: Option<String>,
    pub active_key_id: Option<String>,
    pub active_fingerprint: Option<String>,
    /// The active key's fingerprint was learned now from a destination's value (auth_check).
    pub adopted: bool,
    pub values: Vec<(usize, Read)>,
    pub views: Vec<DestinationView>,
}

/// Reads the provider's status and every destination, and works out which values are the active key:
/// known from the journal, or adopted from a destination whose value authenticates at the provider.
pub async fn observe(
    metrics: &Metrics,
    rt: &Runtime,
    key: &KeyConfig,
    journal: &KeyJournal,
) -> Observation {
    let provider = rt.provider(key).ok().cloned();
    let (status, status_error) = match &provider {
        Some(p) if p.has_status() => match status_retrying(metrics, p).await {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        },
        Some(_) => (None, None),
        None => (None, Some("provider not configured".into())),
    };
    let values = read_all(rt, key).await;
    let active_key_id = status
        .as_ref()
        .map(|s| s.key_id.clone())
        .or_else(|| journal.active_key_id.clone());
    let mut active_fingerprint = match (&journal.active_key_id, &active_key_id) {
        (Some(j), Some(a)) if j == a => journal.active_fingerprint.clone(),
        _ => None,
    };
    let mut adopted = false;
    if let Some(p) = provider.as_ref().filter(|p| p.has_auth_check())
        && active_fingerprint.is_none()
        && (status.is_some() || !p.has_status())
    {
        let mut tried: Vec<&str> = Vec::new();
        for (_, v) in &values {
            let Ok(Some(v)) = v else { continue };
            if tried.contains(&v.fingerprint.as_str()) {
                continue;
            }
            tried.push(&v.fingerprint);
            if let Ok(Some(identity)) = super::rotation::auth_check(metrics, p, &v.secret).await
                && (identity.key_id.is_none()
                    || active_key_id.is_none()
                    || identity.key_id == active_key_id)
            {
                active_fingerprint = Some(v.fingerprint.clone());
                adopted = true;
                break;
            }
        }
    }
    let views = key
        .destinations
        .iter()
        .zip(&values)
        .map(|(d, (_, v))| {
            let (key_id, fp, version, error) = match v {
                Ok(Some(v)) => (
                    v.key_id.clone(),
                    Some(v.fingerprint.clone()),
                    v.version.clone(),
                    None,
                ),
                Ok(None) => (None, None, None, None),
                Err(e) => (None, None, None, Some(e.clone())),
            };
            DestinationView {
                store: d.store.clone(),
                target: d.target.to_string(),
                in_sync: fp.is_some() && fp == active_fingerprint,
                key_id,
                fingerprint: fp,
                version,
                error,
            }
        })
        .collect();
    Observation {
        status,
        status_error,
        active_key_id,
        active_fingerprint,
        adopted,
        values,
        views,
    }
}

/// Compares the provider's active key with each destination (lifecycle.md, "Reconcile").
pub async fn reconcile_key(engine: &Arc<Engine>, rt: &Arc<Runtime>, key: &KeyConfig) -> Reconciled {
    reconcile(engine, rt, key, true).await
}

/// Reconcile's look without its action: refreshes the key's live view (portal status, what each
/// destination holds, drift; an adoption is remembered) and starts nothing. Run once at start, so
/// `/v1/keys` and the drift gauge are right before the first reconcile interval has passed.
pub async fn look(engine: &Arc<Engine>, rt: &Arc<Runtime>, key: &KeyConfig) -> Reconciled {
    reconcile(engine, rt, key, false).await
}

async fn reconcile(
    engine: &Arc<Engine>,
    rt: &Arc<Runtime>,
    key: &KeyConfig,
    act: bool,
) -> Reconciled {
    if engine.is_busy(&key.name) {
        return Reconciled::Skipped("a rotation is running".into());
    }
    let mut journal = load_journal(engine, key);
    let obs = observe(&engine.metrics, rt, key, &journal).await;
    if let Some(e) = &obs.status_error {
        return Reconciled::Skipped(format!("provider status: {e}"));
    }
    if let Some(s) = &obs.status {
        engine.set_status(&key.name, s);
    }
    if obs.adopted {
        journal.active_key_id = obs.active_key_id.clone();
        journal.active_fingerprint = obs.active_fingerprint.clone();
        save_journal(engine, &journal);
        tracing::info!(key = %key.name, fingerprint = ?obs.active_fingerprint, "Adopted the value found in a destination.");
    }
    let Observation {
        status,
        active_key_id: active_id,
        active_fingerprint: active_fp,
        values,
        views,
        ..
    } = obs;
    let good: Option<Secret> = values.iter().find_map(|(_, v)| match v {
        Ok(Some(v)) if Some(&v.fingerprint) == active_fp.as_ref() => Some(v.secret.clone()),
        _ => None,
    });
    // A store that could not be read is not evidence of drift; a value that differs, or none, is.
    let stale = views.iter().any(|v| !v.in_sync && v.error.is_none());
    let all_in_sync = views.iter().all(|v| v.in_sync);
    let readable = views.iter().any(|v| v.error.is_none());

    if let Some(s) = &status
        && !s.active
    {
        engine.set_destinations(&key.name, views, !all_in_sync);
        tracing::warn!(key = %key.name, "Provider reports the key as not Active; not rotating.");
        return Reconciled::NotActive;
    }
    if all_in_sync {
        engine.set_destinations(&key.name, views, false);
        return Reconciled::InSync;
    }
    if !stale || !readable {
        engine.set_destinations(&key.name, views, false);
        return Reconciled::Skipped("some destinations unreadable".into());
    }
    engine.set_destinations(&key.name, views, true);
    if !act {
        return Reconciled::Drift { rerotating: false };
    }
    let audit_drift = |detail: &str| {
        engine.audit(AuditRecord {
            ts: Utc::now(),
            key: key.name.clone(),
            event: "drift".into(),
            trigger: Some(Trigger::Reconcile.as_str().into()),
            reason: Some("drift".into()),
            new_key_id: active_id.clone(),
            fingerprint: active_fp.clone(),
            detail: Some(detail.into()),
            ..Default::default()
        })
    };
    match (good, active_id.clone()) {
        (Some(secret), Some(key_id)) => {
            audit_drift("some destinations hold an old value: copying the active key to them");
            let mut req = RotationRequest::new(
                Trigger::Reconcile,
                "drift",
                super::rotation::requested_by(engine),
            );
            req.resume = Some(Resume::FromStorage {
                key_id,
                secret,
                rotation_id: None,
            });
            if let Err(e) = engine.start_rotation(&key.name, req) {
                tracing::warn!(key = %key.name, error = %e, "Drift repair not started.");
            }
            Reconciled::Repaired
        }
        _ => {
            audit_drift("no destination holds the provider's active key");
            let rerotating = key.auto_recover && journal.rerotations_in_row <= key.max_rerotations;
            if rerotating {
                let mut req = recovery_request(engine, RerotationReason::Drift);
                req.trigger = Trigger::Reconcile;
                if let Err(e) = engine.start_rotation(&key.name, req) {
                    tracing::warn!(key = %key.name, error = %e, "Re-rotation after drift not started.");
                }
            }
            Reconciled::Drift { rerotating }
        }
    }
}
