//! One loop per key: compute when it is next due (schedule, max age, catch-up — `crate::schedule`
//! decides, this loop only waits), wait for it, start the rotation. The wait is re-evaluated when the
//! config is reloaded, when pause changes, after any rotation of the key, and at least every minute (so
//! a wall-clock jump or DST change cannot make it oversleep).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::rotation::{load_journal, requested_by};
use super::{Engine, RotationRequest, Trigger};
use crate::schedule::{self, DueReason};

/// A scheduled rotation that failed or aborted is not retried by the schedule before this long (the
/// regeneration budget bounds the rest). Keeps a broken dependency from turning into a busy loop.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(300);

/// Longest single sleep before the due time is computed again.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Runs until shutdown, or until the key disappears from the config.
pub async fn run_key(engine: Arc<Engine>, key_name: String) {
    let mut sample: f64 = rand::random();
    loop {
        if engine.shutdown.is_cancelled() {
            return;
        }
        let changed = engine.changed.notified();
        tokio::pin!(changed);
        let config = engine.config();
        let Some(key) = config.key(&key_name) else {
            engine.set_next_rotation(&key_name, None);
            return;
        };
        let now = Utc::now();
        let journal = load_journal(&engine, key);
        let last_rotated = engine.cached_status(&key_name).and_then(|s| s.last_rotated);
        let mut due =
            schedule::next_due(key, now, journal.last_scheduled_run, last_rotated, sample);
        if let (Some(d), Some(outcome), Some(finished)) = (
            due.as_mut(),
            journal.last_outcome.as_deref(),
            journal.last_finished_at,
        ) {
            let not_before =
                finished + chrono::Duration::from_std(RETRY_AFTER_FAILURE).unwrap_or_default();
            if matches!(outcome, "failed" | "aborted") && d.at < not_before {
                d.at = not_before;
            }
        }
        engine.set_next_rotation(&key_name, due.as_ref().map(|d| d.at));
        let Some(due) = due else {
            // Manual-only: nothing to wait for but a change.
            tokio::select! {
                _ = engine.shutdown.cancelled() => return,
                _ = &mut changed => continue,
            }
        };
        let wait = (due.at - now).to_std().unwrap_or(Duration::ZERO);
        if wait > Duration::ZERO {
            tokio::select! {
                _ = engine.shutdown.cancelled() => return,
                _ = &mut changed => continue,
                _ = tokio::time::sleep(wait.min(MAX_SLEEP)) => {}
            }
            // Slept the whole wait: this due time has come. Computing it again now would give the
            // *next* occurrence (this one is no longer in the future), so it would never fire.
            if wait > MAX_SLEEP {
                continue;
            }
        }
        if engine.is_paused() {
            tokio::select! {
                _ = engine.shutdown.cancelled() => return,
                _ = &mut changed => continue,
            }
        }
        let trigger = match due.reason {
            DueReason::Schedule => Trigger::Schedule,
            DueReason::MaxAge => Trigger::MaxAge,
            DueReason::CatchUp => Trigger::CatchUp,
        };
        let req = RotationRequest::new(trigger, trigger.as_str(), requested_by(&engine));
        match engine.rotate(&key_name, req).await {
            Ok(_) => sample = rand::random(),
            Err(e) => {
                tracing::info!(key = %key_name, error = %e, "Scheduled rotation not started; retrying shortly.");
                tokio::select! {
                    _ = engine.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    }
}
