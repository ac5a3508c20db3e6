//! The scheduler: one timer for every key. It keeps each key's next due time (schedule, max age,
//! catch-up — `crate::schedule` decides, this loop only waits) in one ordered queue, sleeps until the
//! earliest, and starts the rotations that are due. A key whose rotation waits for an approval is
//! due for nothing else: its wake is the approval's timeout, which ends the rotation `skipped`
//! (paused or not: a pause holds rotations back, not the end of a wait). A key's due time is computed again only when
//! something that moves it changes ([`Signal`]: its rotation ended, a reload, pause), and every key's
//! when the wall clock jumps (a clock step, or a DST change seen as a jump). Idle, it wakes once a
//! minute whatever the number of keys.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Engine, RotationRequest, Trigger, TriggerError};
use crate::config::KeyConfig;
use crate::journal::KeyJournal;
use crate::schedule::{self, Due, DueReason};
use crate::telemetry::Outcome;

/// A scheduled rotation that failed or aborted is not retried by the schedule before this long (the
/// regeneration budget bounds the rest). Keeps a broken dependency from turning into a busy loop.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(300);

/// A `max_age` rotation that was skipped for want of an approval is asked for again after this (the
/// key stays older than its max age meanwhile, and `KeyrotdKeyOlderThanMaxAge` says so). Scheduled
/// runs simply move on to their next occurrence.
pub const RETRY_AFTER_SKIP: Duration = Duration::from_secs(3600);

/// Longest single sleep: the wall clock is compared with the monotonic one at least this often.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// A due key whose rotation could not start (another actor held it) is tried again after this.
const BUSY_RETRY: Duration = Duration::from_secs(5);

/// Tells the scheduler which keys' due times to compute again.
#[derive(Default)]
pub struct Signal {
    dirty: Mutex<Dirty>,
    notify: tokio::sync::Notify,
}

#[derive(Default)]
struct Dirty {
    all: bool,
    keys: HashSet<String>,
}

impl Signal {
    pub fn key(&self, name: &str) {
        self.lock().keys.insert(name.to_string());
        self.notify.notify_one();
    }

    pub fn all(&self) {
        self.lock().all = true;
        self.notify.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Dirty> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Dirty {
        std::mem::take(&mut *self.lock())
    }
}

/// When a key is next due: pure, from its config, its journal and what is known of the provider.
pub fn next_due(
    key: &KeyConfig,
    j: &KeyJournal,
    provider_last_rotated: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    sample: f64,
) -> Option<Due> {
    // Last Rotated as the provider said it, or as keyrotd issued it (whichever is later): a failed
    // status read after a rotation must not make a max_age key due again at once.
    let issued = j
        .issued_at
        .filter(|_| j.active_key_id.is_some() && j.active_key_id == j.new_key_id);
    let last_rotated = provider_last_rotated.max(issued);
    let mut due = schedule::next_due(key, now, j.last_scheduled_run, last_rotated, sample)?;
    let wait = match j.last_outcome {
        Some(Outcome::Failed | Outcome::Aborted) => Some(RETRY_AFTER_FAILURE),
        Some(Outcome::Skipped) if due.reason == DueReason::MaxAge => Some(RETRY_AFTER_SKIP),
        _ => None,
    };
    if let (Some(wait), Some(finished)) = (wait, j.last_finished_at) {
        let not_before = finished + chrono::Duration::from_std(wait).unwrap_or_default();
        due.at = due.at.max(not_before);
    }
    Some(due)
}

/// What the scheduler wakes up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Start the key's rotation.
    Rotate(Due),
    /// The key's rotation waited for an approval until then: end it `skipped`.
    ApprovalEnds(DateTime<Utc>),
}

impl Wake {
    fn at(&self) -> DateTime<Utc> {
        match self {
            Wake::Rotate(d) => d.at,
            Wake::ApprovalEnds(at) => *at,
        }
    }

    /// Whether it may act now: a pause holds rotations back, not the end of an approval's wait nor a
    /// revoke (`revoke_after`), which finishes a rotation that already happened.
    fn acts(&self, paused: bool) -> bool {
        !paused
            || matches!(
                self,
                Wake::ApprovalEnds(_)
                    | Wake::Rotate(Due {
                        reason: DueReason::Revoke,
                        ..
                    })
            )
    }
}

/// When a dual key's old key, kept for a dependent that never confirmed, is revoked anyway
/// (`revoke_after`). Pure.
pub fn revoke_due(j: &KeyJournal) -> Option<Due> {
    j.revoke_due
        .filter(|_| !j.pending_revoke.is_empty())
        .map(|at| Due {
            at,
            reason: DueReason::Revoke,
        })
}

/// The earlier of a rotation and a revoke.
fn earliest(rotation: Option<Due>, revoke: Option<Due>) -> Option<Due> {
    match (rotation, revoke) {
        (Some(d), Some(r)) if r.at <= d.at => Some(r),
        (d, r) => d.or(r),
    }
}

struct Plan {
    wakes: HashMap<String, Wake>,
    queue: BTreeSet<(DateTime<Utc>, String)>,
    samples: HashMap<String, f64>,
}

impl Plan {
    fn set(&mut self, key: &str, wake: Option<Wake>) {
        if let Some(old) = self.wakes.remove(key) {
            self.queue.remove(&(old.at(), key.to_string()));
        }
        if let Some(w) = wake {
            self.queue.insert((w.at(), key.to_string()));
            self.wakes.insert(key.to_string(), w);
        }
    }

    /// The earliest wake that may act (a paused scheduler sleeps past rotations that are due).
    fn next(&self, paused: bool) -> Option<DateTime<Utc>> {
        self.queue
            .iter()
            .find(|(_, key)| self.wakes.get(key).is_some_and(|w| w.acts(paused)))
            .map(|(at, _)| *at)
    }

    fn sample(&mut self, key: &str) -> f64 {
        *self
            .samples
            .entry(key.to_string())
            .or_insert_with(rand::random)
    }
}

/// Runs until shutdown.
pub async fn run(engine: Arc<Engine>) {
    let mut plan = Plan {
        wakes: HashMap::new(),
        queue: BTreeSet::new(),
        samples: HashMap::new(),
    };
    engine.schedule.all();
    let mut wall = engine.clock.now();
    let mut mono = tokio::time::Instant::now();
    loop {
        let dirty = engine.schedule.take();
        recompute(&engine, &mut plan, dirty).await;
        let now = engine.clock.now();
        let wait = plan
            .next(engine.is_paused())
            .map(|at| (at - now).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(MAX_SLEEP)
            .min(MAX_SLEEP);
        tokio::select! {
            _ = engine.shutdown.cancelled() => return,
            _ = engine.schedule.notify.notified() => continue,
            _ = tokio::time::sleep(wait) => {}
        }
        let (now, elapsed) = (engine.clock.now(), mono.elapsed());
        let drift = (now - wall).num_milliseconds() - elapsed.as_millis() as i64;
        if drift.abs() > 2_000 {
            tracing::info!(
                jump_ms = drift,
                "Wall clock jumped; computing every due time again."
            );
            engine.schedule.all();
        }
        (wall, mono) = (now, tokio::time::Instant::now());
        fire_due(&engine, &mut plan, now, engine.is_paused());
    }
}

/// The other keys of `key`'s group.
fn group_members(engine: &Engine, key: &str) -> Vec<String> {
    let config = engine.config();
    let Some(group) = config.key(key).and_then(|k| k.rollout.group.clone()) else {
        return Vec::new();
    };
    config
        .keys
        .iter()
        .filter(|k| k.rollout.group.as_deref() == Some(group.as_str()) && k.name != key)
        .map(|k| k.name.clone())
        .collect()
}

async fn recompute(engine: &Arc<Engine>, plan: &mut Plan, dirty: Dirty) {
    let config = engine.config();
    let keys: Vec<&KeyConfig> = if dirty.all {
        let known: HashSet<&str> = config.keys.iter().map(|k| k.name.as_str()).collect();
        let gone: Vec<String> = plan
            .wakes
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .cloned()
            .collect();
        for k in gone {
            plan.set(&k, None);
        }
        config.keys.iter().collect()
    } else {
        config
            .keys
            .iter()
            .filter(|k| dirty.keys.contains(&k.name))
            .collect()
    };
    let now = engine.clock.now();
    for key in keys {
        let Some(slot) = engine.slot(&key.name) else {
            continue;
        };
        let j = slot.journal().await;
        if let Some(p) = &j.pending_approval {
            plan.set(&key.name, Some(Wake::ApprovalEnds(p.until)));
            continue;
        }
        let last_rotated = slot.live().status.as_ref().and_then(|s| s.last_rotated);
        // The keys of a group share one jittered due time, so they start together. A key without
        // jitter needs no sample (and a fleet of them keeps no map of unused ones).
        let sample = if key.jitter.is_zero() {
            0.0
        } else {
            plan.sample(key.rollout.group.as_deref().unwrap_or(&key.name))
        };
        let due = next_due(key, &j, last_rotated, now, sample);
        plan.set(&key.name, earliest(due, revoke_due(&j)).map(Wake::Rotate));
        engine.set_next_rotation(&key.name, due.map(|d| d.at));
    }
}

/// Starts every rotation whose time has come, and ends the approvals whose time is up. A started key
/// leaves the queue until its rotation ends (the rotation signals it back); a key that could not
/// start is tried again shortly. While paused, due rotations stay in the queue.
fn fire_due(engine: &Arc<Engine>, plan: &mut Plan, now: DateTime<Utc>, paused: bool) {
    let ready: Vec<(String, Wake)> = plan
        .queue
        .iter()
        .take_while(|(at, _)| *at <= now)
        .filter_map(|(_, key)| plan.wakes.get(key).map(|w| (key.clone(), *w)))
        .filter(|(_, w)| w.acts(paused))
        .collect();
    for (key, wake) in ready {
        plan.set(&key, None);
        match wake {
            Wake::Rotate(due) => start_due(engine, plan, now, key, due),
            Wake::ApprovalEnds(_) => {
                let engine = engine.clone();
                tokio::spawn(async move {
                    engine
                        .end_pending(&key, super::approval::PendingEnd::TimedOut)
                        .await;
                });
            }
        }
    }
}

/// Starts one due rotation; a key that could not start is tried again shortly.
fn start_due(engine: &Arc<Engine>, plan: &mut Plan, now: DateTime<Utc>, key: String, due: Due) {
    let trigger = match due.reason {
        DueReason::Schedule => Trigger::Schedule,
        DueReason::MaxAge => Trigger::MaxAge,
        DueReason::CatchUp => Trigger::CatchUp,
        DueReason::Revoke => {
            engine
                .tasks
                .spawn(super::dual::revoke_due(engine.clone(), key));
            return;
        }
    };
    let req = RotationRequest::new(trigger, trigger.as_str(), engine.requested_by());
    match engine.start_rotation(&key, req) {
        Ok(_) => {
            plan.samples.remove(&key);
            if let Some(group) = engine
                .config()
                .key(&key)
                .and_then(|k| k.rollout.group.clone())
            {
                plan.samples.remove(&group);
            }
            // A group started every key of it: none of them is due any more.
            for member in group_members(engine, &key) {
                plan.set(&member, None);
            }
        }
        Err(
            e @ (TriggerError::UnknownKey(_)
            | TriggerError::ShuttingDown
            | TriggerError::Blocked { .. }
            | TriggerError::HeldElsewhere { .. }
            | TriggerError::FirstContact { .. }),
        ) => {
            tracing::info!(key = %key, error = %e, "Scheduled rotation dropped.");
        }
        Err(e) => {
            tracing::info!(key = %key, error = %e, "Scheduled rotation not started; retrying shortly.");
            let retry = now + chrono::Duration::from_std(BUSY_RETRY).unwrap_or_default();
            plan.set(
                &key,
                Some(Wake::Rotate(Due {
                    at: retry,
                    reason: due.reason,
                })),
            );
        }
    }
}
