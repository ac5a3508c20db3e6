//! Recovery (docs/lifecycle.md, "Recovery after a crash"): what a journal left by a crash means, and
//! the re-rotation owed for a lost key.
//!
//! Decide, then act. [`decide`] is a pure function of the journal, what the provider's status says and
//! what each destination holds; [`recover_key`] reads those (under the key's claim, so no rotation can
//! start meanwhile) and hands the decision, claim and all, to [`act`]. Re-rotations go through the
//! same lifecycle and bounds (`max_rerotations` in a row, `max_regenerations_per_day`) as any rotation.
//! A lost key whose re-rotation could not run backs off exponentially, with jitter, up to a cap.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::calls;
use super::slot::{Claim, KeySlot};
use super::{Engine, Resume, RotationRequest, RunResult, Trigger};
use crate::config::KeyConfig;
use crate::journal::{AuditRecord, KeyJournal, Phase};
use crate::limits::Limited;
use crate::provider::{KeyStatus, Provider};
use crate::store::StoredValue;
use crate::telemetry::{Outcome, RerotationReason};

/// How many keys recovery and reconcile look at concurrently.
pub const CONCURRENCY: usize = 64;

/// First and longest wait before an owed re-rotation that could not run is tried again.
const RETRY_FIRST: Duration = Duration::from_secs(3);
const RETRY_CAP: Duration = Duration::from_secs(300);

/// What was learned from an outside read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen<T> {
    Read(T),
    Unreadable(String),
    /// The provider has no status endpoint (`http` without `status`).
    NoEndpoint,
}

/// What a destination holds, as a decision needs it: the fingerprint, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holding {
    Unreadable,
    Empty,
    Value(String),
}

/// What recovery decided for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No interrupted rotation and nothing owed.
    Nothing,
    /// An interrupted regenerate changed nothing: the journal is cleared.
    Clear,
    /// Every destination holds the journal's new key: redo notify (hooks are idempotent) and finish.
    Notify,
    /// Destination `from` holds the journal's new key: copy it to the others, then notify.
    Copy {
        from: usize,
    },
    Rerotate(RerotationReason),
    /// Undecidable or not allowed now; tried again later (or left to an operator, as it says).
    Defer(String),
    /// Dual keys: the new key is held nowhere (or its create's answer was lost): revoke it (`revoke`,
    /// or what `list` shows the create made) and rotate again. The old key was never touched.
    Recreate {
        revoke: Option<String>,
    },
    /// Dual keys: the new key is in the destinations (`from` holds it when some lack it): tell every
    /// dependent, confirm, revoke the old key.
    Confirm {
        from: Option<usize>,
    },
    /// Dual keys: send the interrupted revoke again.
    Revoke,
    /// Dual keys: a rollback was interrupted; destination `from` holds the old key's value.
    Rollback {
        from: usize,
    },
}

/// The decision for one key. Pure: a table test covers every phase × status × holdings.
pub fn decide(
    j: &KeyJournal,
    status: &Seen<KeyStatus>,
    held: &[Holding],
    key: &KeyConfig,
    at_start: bool,
    now: DateTime<Utc>,
) -> Decision {
    if j.overlap
        || matches!(
            j.phase,
            Phase::Creating | Phase::Confirming | Phase::Revoking | Phase::RollingBack
        )
    {
        let d = super::dual::decide(j, held);
        if d != Decision::Nothing {
            return d;
        }
    }
    match j.phase {
        Phase::Idle if j.lost => owed(j, key, now),
        Phase::Idle => Decision::Nothing,
        Phase::Regenerating => match status {
            Seen::Read(s) if Some(s.key_id.as_str()) != j.old_key_id.as_deref() => {
                Decision::Rerotate(RerotationReason::CrashRecovery)
            }
            Seen::Read(_) => Decision::Clear,
            Seen::Unreadable(e) => Decision::Defer(format!("provider status unreadable: {e}")),
            // No telling without a status endpoint: re-rotate (docs/config.md says so).
            Seen::NoEndpoint => Decision::Rerotate(RerotationReason::CrashRecovery),
        },
        Phase::Watch if !at_start => Decision::Nothing,
        Phase::Storing | Phase::Notify | Phase::Watch => stored(j, status, held),
        Phase::Creating | Phase::Confirming | Phase::Revoking | Phase::RollingBack => {
            Decision::Nothing
        }
    }
}

/// The re-rotation owed for a lost key, within its bounds.
fn owed(j: &KeyJournal, key: &KeyConfig, now: DateTime<Utc>) -> Decision {
    if !key.auto_recover {
        Decision::Defer("key lost; auto_recover is off".into())
    } else if j.rerotations_in_row > key.max_rerotations {
        Decision::Defer("key lost; max_rerotations reached, waiting for an operator".into())
    } else if j.budget_spent(now, key.max_regenerations_per_day) {
        Decision::Defer("key lost; regeneration budget exhausted".into())
    } else {
        Decision::Rerotate(RerotationReason::LostBeforeStorage)
    }
}

/// A new key was issued before the crash: where is it now?
fn stored(j: &KeyJournal, status: &Seen<KeyStatus>, held: &[Holding]) -> Decision {
    let (Some(new_id), Some(new_fp)) = (&j.new_key_id, &j.new_fingerprint) else {
        // A journal past `regenerating` without the new key's identity is not ours to act on.
        return match j.phase {
            Phase::Storing => Decision::Rerotate(RerotationReason::CrashRecovery),
            _ => Decision::Nothing,
        };
    };
    // When the provider cannot be read, a destination's value is checked (auth_check) before it is
    // copied anywhere, so a holder still counts.
    let provider_has_it = match status {
        Seen::Read(s) => &s.key_id == new_id,
        Seen::Unreadable(_) | Seen::NoEndpoint => true,
    };
    let holders: Vec<usize> = held
        .iter()
        .enumerate()
        .filter(|(_, h)| provider_has_it && matches!(h, Holding::Value(fp) if fp == new_fp))
        .map(|(i, _)| i)
        .collect();
    if holders.len() == held.len() && !held.is_empty() {
        return Decision::Notify;
    }
    if let Some(&from) = holders.first() {
        return Decision::Copy { from };
    }
    if provider_has_it && held.contains(&Holding::Unreadable) {
        return Decision::Defer(
            "a destination is unreadable and may hold the new key; not re-rotating yet".into(),
        );
    }
    Decision::Rerotate(RerotationReason::CrashRecovery)
}

/// At start, before scheduling anything: decide every key's journal (64 at a time). Recovery
/// rotations start in the background; this returns once every key is decided, and the engine is
/// ready. The first look at each key (provider status, destinations) follows in the background:
/// `/v1/keys` says `observing` until it is done.
pub async fn recover_all(engine: &Arc<Engine>) -> Vec<(String, Decision)> {
    let config = engine.config();
    let decisions: Vec<(String, Decision)> = futures::stream::iter(0..config.keys.len())
        .map(|i| {
            let (engine, config) = (engine.clone(), config.clone());
            async move {
                let k = &config.keys[i];
                (k.name.clone(), recover_key(&engine, k, true).await)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    engine.set_ready();
    let quiet: Vec<String> = decisions
        .iter()
        .filter(|(_, d)| *d == Decision::Nothing)
        .map(|(k, _)| k.clone())
        .collect();
    let (e, config) = (engine.clone(), engine.config());
    engine.tasks.spawn(async move {
        let quiet: std::collections::HashSet<String> = quiet.into_iter().collect();
        let indices: Vec<usize> = (0..config.keys.len())
            .filter(|i| quiet.contains(&config.keys[*i].name))
            .collect();
        futures::stream::iter(indices)
            .for_each_concurrent(CONCURRENCY, |i| {
                let (e, config) = (e.clone(), config.clone());
                async move {
                    super::reconcile::reconcile_key(&e, &config.keys[i], false).await;
                }
            })
            .await;
    });
    decisions
}

/// The periodic part of recovery: owed re-rotations of lost keys, and interrupted rotations nobody
/// is running (an ambiguous regenerate not resolved yet). Also retries failed journal writes.
///
/// Each key's look is a task of its own ([`Looks`](super::looks::Looks), 64 at a time): the tick
/// returns once they are started, and a key whose look from an earlier tick still runs (its provider
/// hanging) is skipped, so it holds up no other key and no later tick. The returned [`Started`] lets
/// a caller wait for this tick's looks to end.
pub async fn recovery_tick(engine: &Arc<Engine>) -> Started {
    engine.flush_journals().await;
    let config = engine.config();
    let mut started = Vec::new();
    // Only keys whose journal says a rotation was interrupted or a re-rotation is owed: the rest
    // (nearly all of a fleet, nearly always) are neither claimed nor read.
    for i in 0..config.keys.len() {
        let key = &config.keys[i].name;
        if !engine.slot(key).is_some_and(|s| s.may_need_recovery()) {
            continue;
        }
        let (e, c) = (engine.clone(), config.clone());
        let look = async move {
            recover_key(&e, &c.keys[i], false).await;
        };
        if let Some(task) = engine.recovering.start(key, &engine.shutdown, look).await {
            started.push(task);
        }
    }
    Started(started)
}

/// The looks a [`recovery_tick`] started.
#[must_use = "the looks run on their own; `finished` waits for them"]
pub struct Started(Vec<tokio::task::JoinHandle<()>>);

impl Started {
    /// Waits until every look of the tick has ended.
    pub async fn finished(self) {
        for task in self.0 {
            let _ = task.await;
        }
    }
}

/// Reads what [`decide`] needs, under the key's claim, and acts on the decision.
pub async fn recover_key(engine: &Arc<Engine>, key: &KeyConfig, at_start: bool) -> Decision {
    let Some(slot) = engine.slot(&key.name) else {
        return Decision::Nothing;
    };
    if !engine.acts_on(&key.name) {
        return Decision::Nothing;
    }
    let Some(claim) = slot.try_claim() else {
        return Decision::Defer("another actor holds the key".into());
    };
    let j = slot.journal().await;
    let idle = j.phase == Phase::Idle && !j.lost;
    if idle || (j.phase == Phase::Watch && !at_start) {
        return Decision::Nothing;
    }
    let now = engine.clock.now();
    if let Some(at) = slot.live().retry_at
        && at > now
    {
        return Decision::Defer("backing off after a re-rotation that could not run".into());
    }
    let Ok(provider) = engine.runtime().provider(key).cloned() else {
        return Decision::Nothing;
    };
    let status = seen_status(engine, &slot, &provider).await;
    let needs_values = matches!(
        j.phase,
        Phase::Storing | Phase::Notify | Phase::Watch | Phase::Confirming | Phase::RollingBack
    );
    let values = if needs_values {
        read_values(engine, key).await
    } else {
        Vec::new()
    };
    let held = holdings(&values);
    let decision = decide(&j, &status, &held, key, at_start, now);
    if decision != Decision::Nothing {
        tracing::info!(key = %key.name, decision = ?decision, "Recovery decided.");
    }
    act(engine, claim, &j, &decision, values).await;
    decision
}

async fn seen_status(
    engine: &Engine,
    slot: &KeySlot,
    provider: &Limited<Provider>,
) -> Seen<KeyStatus> {
    if !provider.has_status() {
        return Seen::NoEndpoint;
    }
    match calls::status_retrying(&engine.metrics, provider).await {
        Ok(s) => {
            engine.set_status(slot, &s);
            Seen::Read(s)
        }
        Err(e) => Seen::Unreadable(e.to_string()),
    }
}

pub type Read = Result<Option<StoredValue>, String>;

/// Every destination's value (or why it could not be read), in config order.
pub async fn read_values(engine: &Engine, key: &KeyConfig) -> Vec<Read> {
    let rt = engine.runtime();
    read_all(&rt, key).await
}

pub async fn read_all(rt: &super::Runtime, key: &KeyConfig) -> Vec<Read> {
    futures::future::join_all(key.destinations.iter().map(|d| async move {
        match rt.store(&d.store) {
            Ok(s) => {
                let _permit = s.enter().await;
                s.read(&d.target).await.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    }))
    .await
}

pub fn holdings(values: &[Read]) -> Vec<Holding> {
    values
        .iter()
        .map(|v| match v {
            Err(_) => Holding::Unreadable,
            Ok(None) => Holding::Empty,
            Ok(Some(v)) => Holding::Value(v.fingerprint.clone()),
        })
        .collect()
}

/// Carries out a decision with the claim it was made under.
async fn act(
    engine: &Arc<Engine>,
    claim: Claim,
    j: &KeyJournal,
    decision: &Decision,
    mut values: Vec<Read>,
) {
    let requested_by = engine.requested_by();
    let req = match decision {
        Decision::Nothing | Decision::Defer(_) => return,
        Decision::Clear => {
            let slot = claim.slot().clone();
            let _ = engine.commit(&slot, |j| j.cleared()).await;
            return;
        }
        Decision::Notify => resume_request(
            Resume::Notify {
                key_id: j.new_key_id.clone().unwrap_or_default(),
                fingerprint: j.new_fingerprint.clone().unwrap_or_default(),
            },
            requested_by,
        ),
        Decision::Copy { from } => {
            if *from >= values.len() {
                return;
            }
            let Ok(Some(value)) = values.swap_remove(*from) else {
                return;
            };
            resume_request(
                Resume::FromStorage {
                    key_id: j.new_key_id.clone().unwrap_or_default(),
                    secret: value.secret,
                },
                requested_by,
            )
        }
        Decision::Rerotate(reason) => {
            if *reason == RerotationReason::CrashRecovery {
                engine.audit(AuditRecord::crash_found(j, *reason, engine.clock.now()));
            }
            RotationRequest::rerotation(Trigger::Recovery, *reason, requested_by)
        }
        dual => match dual_resume(j, dual, &mut values) {
            Some(resume) => resume_request(Resume::Dual(resume), requested_by),
            None => return,
        },
    };
    let slot = claim.slot().clone();
    match engine.start_claimed(claim, req) {
        Ok((_, handle)) => back_off_on_failure(engine, slot, handle),
        Err(e) => tracing::warn!(key = %slot.name, error = %e, "Recovery rotation not started."),
    }
}

/// A dual key's decision as the resume that carries it out (`None`: the holder's value is gone).
fn dual_resume(
    j: &KeyJournal,
    decision: &Decision,
    values: &mut [Read],
) -> Option<super::dual::Resume> {
    use super::dual::Resume as R;
    let mut take = |from: usize| match values.get_mut(from).map(|v| std::mem::replace(v, Ok(None)))
    {
        Some(Ok(Some(v))) => Some(v.secret),
        _ => None,
    };
    Some(match decision {
        Decision::Recreate { revoke } => R::Recreate {
            revoke: revoke.clone(),
        },
        Decision::Confirm { from } => R::Confirm {
            key_id: j.new_key_id.clone()?,
            fingerprint: j.new_fingerprint.clone()?,
            secret: match from {
                Some(i) => Some(take(*i)?),
                None => None,
            },
        },
        Decision::Revoke => R::Revoke,
        Decision::Rollback { from } => R::Rollback {
            secret: take(*from)?,
        },
        _ => return None,
    })
}

fn resume_request(resume: Resume, requested_by: String) -> RotationRequest {
    let mut req = RotationRequest::new(Trigger::Recovery, "crash_recovery", requested_by);
    req.resume = Some(resume);
    req
}

/// After a recovery rotation ends: a key still lost is tried again after an exponential, jittered,
/// capped wait; one served again resets the wait.
fn back_off_on_failure(
    engine: &Arc<Engine>,
    slot: Arc<KeySlot>,
    handle: tokio::task::JoinHandle<RunResult>,
) {
    let engine = engine.clone();
    tokio::spawn(async move {
        let result = handle.await.unwrap_or(RunResult::Panicked);
        let served = matches!(
            result,
            RunResult::Finished(Outcome::Success | Outcome::Degraded)
        );
        let mut live = slot.live();
        if served {
            live.retry_attempt = 0;
            live.retry_at = None;
        } else {
            let wait = retry_wait(live.retry_attempt);
            live.retry_attempt = live.retry_attempt.saturating_add(1);
            live.retry_at =
                Some(engine.clock.now() + chrono::Duration::from_std(wait).unwrap_or_default());
            tracing::warn!(key = %slot.name, wait = ?wait, "Recovery rotation did not serve the key; trying again later.");
        }
    });
}

/// Exponential from [`RETRY_FIRST`] to [`RETRY_CAP`], with equal jitter.
pub fn retry_wait(attempt: u32) -> Duration {
    let full = RETRY_FIRST
        .saturating_mul(1u32 << attempt.min(10))
        .min(RETRY_CAP);
    let half = full / 2;
    half + half.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests;
