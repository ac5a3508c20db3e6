//! The scheduler: one timer for every key. It keeps each key's next due time (schedule, max age,
//! catch-up — `crate::schedule` decides, this loop only waits) in one ordered queue, sleeps until the
//! earliest, and starts the rotations that are due. A key's due time is computed again only when
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
    if let (Some(Outcome::Failed | Outcome::Aborted), Some(finished)) =
        (j.last_outcome, j.last_finished_at)
    {
        let not_before =
            finished + chrono::Duration::from_std(RETRY_AFTER_FAILURE).unwrap_or_default();
        due.at = due.at.max(not_before);
    }
    Some(due)
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
    due: HashMap<String, Due>,
    queue: BTreeSet<(DateTime<Utc>, String)>,
    samples: HashMap<String, f64>,
}

impl Plan {
    fn set(&mut self, key: &str, due: Option<Due>) {
        if let Some(old) = self.due.remove(key) {
            self.queue.remove(&(old.at, key.to_string()));
        }
        if let Some(d) = due {
            self.queue.insert((d.at, key.to_string()));
            self.due.insert(key.to_string(), d);
        }
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
        due: HashMap::new(),
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
            .queue
            .first()
            .map(|(at, _)| (*at - now).to_std().unwrap_or(Duration::ZERO))
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
            .due
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
        let last_rotated = slot.live().status.as_ref().and_then(|s| s.last_rotated);
        // The keys of a group share one jittered due time, so they start together.
        let sample = plan.sample(key.rollout.group.as_deref().unwrap_or(&key.name));
        let due = next_due(key, &j, last_rotated, now, sample);
        plan.set(&key.name, earliest(due, revoke_due(&j)));
        engine.set_next_rotation(&key.name, due.map(|d| d.at));
    }
}

/// Starts every rotation whose time has come. A started key leaves the queue until its rotation ends
/// (the rotation signals it back); a key that could not start is tried again shortly. While paused,
/// only revokes (`revoke_after`) fire: they finish rotations that already happened.
fn fire_due(engine: &Arc<Engine>, plan: &mut Plan, now: DateTime<Utc>, paused: bool) {
    let ready: Vec<String> = plan
        .queue
        .iter()
        .take_while(|(at, _)| *at <= now)
        .map(|(_, key)| key.clone())
        .collect();
    for key in ready {
        let Some(due) = plan.due.get(&key).copied() else {
            continue;
        };
        if paused && due.reason != DueReason::Revoke {
            continue;
        }
        plan.set(&key, None);
        let trigger = match due.reason {
            DueReason::Schedule => Trigger::Schedule,
            DueReason::MaxAge => Trigger::MaxAge,
            DueReason::CatchUp => Trigger::CatchUp,
            DueReason::Revoke => {
                engine
                    .tasks
                    .spawn(super::dual::revoke_due(engine.clone(), key.clone()));
                continue;
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
                | TriggerError::HeldElsewhere { .. }),
            ) => {
                tracing::info!(key = %key, error = %e, "Scheduled rotation dropped.");
            }
            Err(e) => {
                tracing::info!(key = %key, error = %e, "Scheduled rotation not started; retrying shortly.");
                let retry = now + chrono::Duration::from_std(BUSY_RETRY).unwrap_or_default();
                plan.set(
                    &key,
                    Some(Due {
                        at: retry,
                        reason: due.reason,
                    }),
                );
            }
        }
    }
}
