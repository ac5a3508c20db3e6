//! The approval gate (docs/lifecycle.md, "Approval"): a state of a key between "due" and
//! "rotating".
//!
//! A key with `approval` whose scheduled or `max_age` rotation comes due runs preflight first (the
//! old key is still alive), then announces the pending rotation (audit, `keyrotd_rotation_pending`,
//! the `pending_approval` notification) and records it in the journal, so that a restart neither
//! forgets it nor rotates without it. The key's claim is free while it waits: an emergency
//! `rotate --force` is accepted at once, and overtakes the pending rotation (which ends `skipped`).
//! An approval (`keyrotd approve`, `POST /v1/keys/{name}/approve`) continues the same rotation; no
//! approval by the timeout ends it `skipped`, and the next due time follows the schedule.
//!
//! Operators' rotations, re-rotations of a lost key and drift repairs never wait: the operator is
//! present, or the old key is already dead and waiting only lengthens the outage.
//!
//! [`needed`] and [`answer`] decide; the engine's [`Engine::approve`] and [`Engine::end_pending`]
//! carry it out under the key's claim and journal mutex.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::preflight::Preflight;
use super::record::{EventKind, RecordEvent};
use super::rotation::Rotation;
use super::{Engine, RotationRequest, RunResult, TriggerError, lock};
use crate::config::KeyConfig;
use crate::journal::{AuditRecord, Keys, PendingApproval};
use crate::notify::targets::{Notice, NoticeEvent};
use crate::telemetry::Outcome;

/// An approval that comes within this long of the preflight that preceded the announcement reuses
/// it; after a longer wait preflight runs again before anything is destroyed (a store may have gone
/// down meanwhile).
pub const PREFLIGHT_FRESH: Duration = Duration::from_secs(60);

/// The approval a continued rotation carries.
#[derive(Debug, Clone)]
pub struct Approval {
    /// Who approved it (`--as`, or the API body's `requested_by`).
    pub by: String,
    /// Why (`--reason`).
    pub reason: String,
    /// The pending rotation it continues.
    pub pending: PendingApproval,
    /// Preflight is older than [`PREFLIGHT_FRESH`]: run it again.
    pub preflight_again: bool,
}

/// Whether a rotation asked for by `req` must wait for an approval: the key requires one and the
/// rotation is a scheduled one (schedule, max_age, catch-up) that nobody forced or approved yet.
/// Pure.
pub fn needed(key: &KeyConfig, req: &RotationRequest) -> bool {
    key.approval.is_some()
        && req.trigger.is_scheduled()
        && !req.force
        && !req.dry_run
        && req.rerotation.is_none()
        && req.resume.is_none()
        && req.approval.is_none()
}

/// What an approval request gets, at `now`. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Rotate now; preflight again when the one before the announcement is stale.
    Rotate { preflight_again: bool },
    /// The timeout passed: too late, the rotation is (or is about to be) skipped.
    TooLate { until: DateTime<Utc> },
    /// Nothing of the key waits for an approval.
    NothingPending,
}

/// Decides an approval request. Pure: a table test covers it.
pub fn answer(pending: Option<&PendingApproval>, now: DateTime<Utc>) -> Answer {
    let Some(p) = pending else {
        return Answer::NothingPending;
    };
    if timed_out(p, now) {
        return Answer::TooLate { until: p.until };
    }
    let fresh = chrono::Duration::from_std(PREFLIGHT_FRESH).unwrap_or_default();
    Answer::Rotate {
        preflight_again: now - p.asked_at > fresh,
    }
}

/// Whether the pending rotation's time is up at `now` (the timeout is inclusive: at `until` it is
/// skipped). Pure.
pub fn timed_out(p: &PendingApproval, now: DateTime<Utc>) -> bool {
    now >= p.until
}

/// How a pending rotation ends without rotating.
#[derive(Debug, Clone)]
pub enum PendingEnd {
    /// Nobody approved it by its timeout.
    TimedOut,
    /// Another rotation of the key (id, trigger) started to regenerate it.
    Overtaken {
        by: Uuid,
        trigger: crate::journal::Trigger,
    },
}

impl Engine {
    /// An operator (`by`) approves the rotation of `key` that waits for an approval, and it runs now
    /// (same rotation id). Refused like a trigger: unknown key, not ready, held by another replica,
    /// busy; and when nothing waits or its time is up.
    pub async fn approve(
        self: &Arc<Self>,
        key: &str,
        by: String,
        reason: String,
    ) -> Result<Uuid, TriggerError> {
        self.check_approver(key)?;
        let slot = self
            .slot(key)
            .ok_or_else(|| TriggerError::UnknownKey(key.to_string()))?;
        let claim = slot
            .try_claim()
            .ok_or_else(|| TriggerError::Busy(key.to_string()))?;
        let now = self.clock.now();
        let pending = {
            let mut j = slot.lock_journal().await;
            let pending = j.pending_approval.clone();
            match answer(pending.as_deref(), now) {
                Answer::Rotate { preflight_again } => {
                    j.approved();
                    self.journal_changed(&slot, &j);
                    let written = self.persist(&j).await;
                    self.written(&slot, &written);
                    pending.map(|p| (p, preflight_again))
                }
                Answer::TooLate { until } => {
                    drop(j);
                    drop(claim);
                    self.end_pending(key, PendingEnd::TimedOut).await;
                    return Err(TriggerError::ApprovalTooLate {
                        key: key.to_string(),
                        until,
                    });
                }
                Answer::NothingPending => None,
            }
        };
        let Some((pending, preflight_again)) = pending else {
            return Err(TriggerError::NothingToApprove(key.to_string()));
        };
        let mut req = RotationRequest::new(
            pending.trigger,
            pending.reason.clone(),
            pending.requested_by.clone(),
        );
        req.approval = Some(Approval {
            by,
            reason,
            pending: *pending,
            preflight_again,
        });
        let (id, _handle) = self.start_claimed(claim, req)?;
        Ok(id)
    }

    /// The refusals an approval shares with a trigger (no window or pause: the rotation passed them
    /// when it came due, and the approval is the operator's go).
    fn check_approver(&self, key: &str) -> Result<(), TriggerError> {
        if self.shutdown.is_cancelled() {
            return Err(TriggerError::ShuttingDown);
        }
        if self.config().key(key).is_none() {
            return Err(TriggerError::UnknownKey(key.to_string()));
        }
        if !self.is_started() {
            return Err(TriggerError::NotReady);
        }
        if let Some(c) = &self.coordination
            && !c.holds(key)
        {
            return Err(TriggerError::HeldElsewhere {
                key: key.to_string(),
                holder: c
                    .holder(key)
                    .unwrap_or_else(|| "none (being taken over)".into()),
            });
        }
        Ok(())
    }

    /// Ends the rotation of `key` that waits for an approval, without rotating: outcome `skipped`
    /// (journal, audit, metrics, record, notification), and the scheduler computes the next due time.
    /// A timeout that has not passed yet (an approval came first) changes nothing.
    pub(crate) async fn end_pending(self: &Arc<Self>, key: &str, how: PendingEnd) {
        // Only the replica holding the key decides about its wait (the journal is its lease's).
        if !self.acts_on(key) {
            return;
        }
        let Some(slot) = self.slot(key) else { return };
        let now = self.clock.now();
        let ended = {
            let mut j = slot.lock_journal().await;
            let due = match (&j.pending_approval, &how) {
                (Some(p), PendingEnd::TimedOut) => timed_out(p, now),
                (Some(_), PendingEnd::Overtaken { .. }) => true,
                (None, _) => false,
            };
            if !due {
                return;
            }
            let pending = j.pending_approval.clone();
            j.approval_ended(now);
            self.journal_changed(&slot, &j);
            let written = self.persist(&j).await;
            self.written(&slot, &written);
            pending
        };
        let Some(p) = ended else { return };
        let why = match &how {
            PendingEnd::TimedOut => format!(
                "skipped: no approval by {}",
                p.until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            PendingEnd::Overtaken { by, trigger } => {
                format!("skipped: overtaken by the {trigger} rotation {by}")
            }
        };
        tracing::warn!(key, rotation_id = %p.rotation_id, "{why}");
        self.finish_skipped(&slot, &p, &why, now);
    }

    /// The records of a pending rotation that ended `skipped`.
    fn finish_skipped(
        &self,
        slot: &super::slot::KeySlot,
        p: &PendingApproval,
        why: &str,
        now: DateTime<Utc>,
    ) {
        let meta = p.meta(None);
        let key = &slot.name;
        let elapsed = (now - p.started_at).to_std().unwrap_or_default();
        self.metrics
            .rotation_finished(key, Outcome::Skipped, elapsed, now);
        self.audit(AuditRecord::finished(
            key,
            &meta,
            Outcome::Skipped,
            Keys::default(),
            why,
            now,
        ));
        slot.live().last_outcome = Some(Outcome::Skipped);
        if let Some(record) = slot.record(p.rotation_id) {
            let phase = slot.live_phase();
            let mut r = lock(&record);
            r.events.push(RecordEvent {
                ts: now,
                event: EventKind::Finished,
                detail: format!("outcome skipped ({why})"),
            });
            r.outcome = Some(Outcome::Skipped);
            r.finished_at = Some(now);
            r.phase = phase;
        }
        if let Some(k) = self.config().key(key) {
            let mut n = Notice::new(NoticeEvent::Finished, k, now);
            n.rotation_id = Some(p.rotation_id);
            n.trigger = Some(p.trigger);
            n.outcome = Some(Outcome::Skipped);
            n.reason = Some(why.to_string());
            self.notify(n);
        }
        self.schedule.key(key);
    }
}

impl Rotation {
    /// Preflight passed and the key needs an approval: announce it, record it in the journal, and
    /// let go of the key (its claim is free while it waits).
    pub(crate) async fn await_approval(self, pre: Preflight) -> RunResult {
        let timeout = self
            .key
            .approval
            .as_ref()
            .map_or(Duration::ZERO, |a| a.timeout);
        let now = self.engine.clock.now();
        let until = now + chrono::Duration::from_std(timeout).unwrap_or_default();
        let meta = self.meta.clone();
        let _ = self
            .engine
            .commit(&self.slot, |j| j.awaiting_approval(&meta, now, until))
            .await;
        let old_key_id = pre.status.as_ref().map(|s| s.key_id.clone());
        self.engine.audit(AuditRecord::pending_approval(
            &self.key.name,
            &self.meta,
            old_key_id.as_deref(),
            until,
            now,
        ));
        let shown = until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        self.event(
            EventKind::PendingApproval,
            format!(
                "waiting for an approval until {shown}: `keyrotd approve {} --reason ...`",
                self.key.name
            ),
        );
        let mut n = self.notice(NoticeEvent::PendingApproval);
        n.approval_until = Some(until);
        n.old_key_id = old_key_id;
        self.tell(n);
        self.slot.live().rotating = None;
        let phase = self.slot.live_phase();
        lock(&self.record).phase = phase;
        // The scheduler keeps the key's timeout instead of its next due time.
        self.engine.schedule.key(&self.key.name);
        RunResult::AwaitingApproval
    }

    /// An approved rotation goes on: the approval is audited and the owner told it started.
    pub(crate) fn begin_approved(&self, a: &Approval) {
        let now = self.engine.clock.now();
        self.engine.audit(AuditRecord::approved(
            &self.key.name,
            &self.meta,
            &a.reason,
            now,
        ));
        self.event(
            EventKind::Approved,
            format!("approved by {}: {:?}", a.by, a.reason),
        );
        self.tell(self.notice(NoticeEvent::Started));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Trigger;

    fn at(minutes: i64) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2027-03-10T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
            + chrono::Duration::minutes(minutes)
    }

    /// Asked at 10:00, skipped at 10:30 without an approval.
    fn pending() -> PendingApproval {
        PendingApproval {
            rotation_id: Uuid::nil(),
            trigger: Trigger::Schedule,
            reason: "schedule".into(),
            requested_by: "keyrotd@test".into(),
            started_at: at(0),
            asked_at: at(0),
            until: at(30),
        }
    }

    #[test]
    fn answer_table() {
        let p = pending();
        let seconds = |s: i64| at(0) + chrono::Duration::seconds(s);
        let table: &[(Option<&PendingApproval>, DateTime<Utc>, Answer)] = &[
            (None, at(5), Answer::NothingPending),
            // Within a minute of preflight: it is reused.
            (
                Some(&p),
                seconds(59),
                Answer::Rotate {
                    preflight_again: false,
                },
            ),
            (
                Some(&p),
                seconds(60),
                Answer::Rotate {
                    preflight_again: false,
                },
            ),
            // A long wait: preflight runs again before anything is destroyed.
            (
                Some(&p),
                seconds(61),
                Answer::Rotate {
                    preflight_again: true,
                },
            ),
            (
                Some(&p),
                at(29),
                Answer::Rotate {
                    preflight_again: true,
                },
            ),
            // The timeout is inclusive.
            (Some(&p), at(30), Answer::TooLate { until: at(30) }),
            (Some(&p), at(45), Answer::TooLate { until: at(30) }),
        ];
        for (pending, now, want) in table {
            assert_eq!(&answer(*pending, *now), want, "at {now}");
        }
    }

    #[test]
    fn the_wait_ends_at_the_timeout() {
        let p = pending();
        for (minutes, over) in [(0, false), (29, false), (30, true), (31, true)] {
            assert_eq!(timed_out(&p, at(minutes)), over, "{minutes} min");
        }
    }

    #[test]
    fn only_scheduled_rotations_nobody_forced_wait() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "t").unwrap();
        let text = |approval: &str| {
            format!(
                r#"
                [providers.p]
                kind = "aos"
                base_url = "http://127.0.0.1:1"
                management_token = {{ file = "{d}/t" }}
                [stores.a]
                kind = "file"
                dir = "{d}"
                [[keys]]
                name = "k"
                provider = "p"
                max_age = "30d"
                {approval}
                [[keys.destinations]]
                store = "a"
                file = "k"
                "#,
                d = dir.path().display()
            )
        };
        let gated = crate::config::load_str(&text("approval = { timeout = \"30m\" }"))
            .unwrap()
            .keys
            .remove(0);
        let free = crate::config::load_str(&text("approval = { required = false }"))
            .unwrap()
            .keys
            .remove(0);
        let req = |trigger: Trigger| RotationRequest::new(trigger, "r", "someone");
        let forced = {
            let mut r = req(Trigger::Schedule);
            r.force = true;
            r
        };
        let lost = RotationRequest::rerotation(
            Trigger::Recovery,
            crate::telemetry::RerotationReason::LostBeforeStorage,
            "keyrotd".into(),
        );
        let drift = RotationRequest::rerotation(
            Trigger::Reconcile,
            crate::telemetry::RerotationReason::Drift,
            "keyrotd".into(),
        );
        let table: &[(&KeyConfig, RotationRequest, bool)] = &[
            (&gated, req(Trigger::Schedule), true),
            (&gated, req(Trigger::MaxAge), true),
            (&gated, req(Trigger::CatchUp), true),
            (&gated, req(Trigger::Manual), false),
            (&gated, req(Trigger::Api), false),
            (&gated, forced, false),
            (&gated, lost, false),
            (&gated, drift, false),
            (&free, req(Trigger::Schedule), false),
        ];
        for (key, req, want) in table {
            assert_eq!(
                needed(key, req),
                *want,
                "{:?} force {} approval {:?}",
                req.trigger,
                req.force,
                key.approval
            );
        }
    }
}
