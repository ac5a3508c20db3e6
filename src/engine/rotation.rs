//! One rotation, as the pipeline docs/lifecycle.md describes: preflight, regenerate, distribute (store,
//! notify, verify), then the outcome and the watch. [`Rotation::run`] reads as that sequence; each phase
//! lives in its own module and decides nothing about how the rotation ends: [`judge`] does, and
//! [`Rotation::end`] is the one way a rotation ends (journal, audit, metrics, record, watch).
//!
//! Everything between the regenerate response and the last hook's answer is an outage for the key's
//! users (the invalidation window): nothing on that path waits for anything it does not need.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::distribute::{self, Audience, Distribution, Ident, VerifyResult};
use super::record::{EventKind, LivePhase, RecordEvent, RotationRecord};
use super::regenerate::{self, Regen};
use super::slot::{Claim, KeySlot};
use super::{
    Engine, RotationRequest, RunResult, Runtime, TriggerError, calls, dual, lock, preflight, watch,
};
use crate::config::{KeyConfig, Overlap};
use crate::journal::{AuditEvent, AuditRecord, Failure, Keys, RotationMeta};
use crate::limits::Limited;
use crate::notify::targets::{Notice, NoticeEvent};
use crate::provider::Provider;
use crate::secret::{Secret, fingerprint};
use crate::telemetry::{Outcome, RerotationReason};

/// How recovery or reconcile resumes at notify instead of regenerating.
#[derive(Debug, Clone)]
pub enum Resume {
    /// A destination holds the active key: copy it to the others (once it is shown to authenticate),
    /// then notify and finish.
    FromStorage { key_id: String, secret: Secret },
    /// The key is stored everywhere it could be: redo notify (hooks are idempotent) and finish.
    Notify { key_id: String, fingerprint: String },
    /// A dual key's interrupted rotation (docs/lifecycle.md, "Two live keys").
    Dual(dual::Resume),
}

/// One rotation's context: what every phase reads.
pub struct Rotation {
    pub engine: Arc<Engine>,
    pub rt: Arc<Runtime>,
    pub key: Arc<KeyConfig>,
    pub provider: Arc<Limited<Provider>>,
    pub req: RotationRequest,
    pub meta: RotationMeta,
    pub slot: Arc<KeySlot>,
    pub record: Arc<Mutex<RotationRecord>>,
    /// Several replicas: the fencing number this replica held the key under when the rotation
    /// started; a regenerate is sent only under the same one.
    pub tenure: Option<u64>,
    /// None for a dry run, which changes nothing and so needs no claim.
    _claim: Option<Claim>,
    started: Instant,
}

/// How a rotation ends.
pub(super) enum End {
    /// Stopped before anything was destroyed.
    Aborted {
        why: String,
        old_key_id: Option<String>,
    },
    Failed {
        how: Failure,
        why: String,
        new: Option<Ident>,
    },
    /// A key was distributed (success or degraded).
    Concluded {
        outcome: Outcome,
        ident: Ident,
        dist: Distribution,
        /// A resumed rotation: audited as `recovered`; no second watch after a crash in the watch.
        resumed: bool,
        watch_allowed: bool,
    },
}

/// What a distribution means for the rotation.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    Done(Outcome),
    /// No destination confirmed: the key is lost.
    Lost(String),
    /// The new key does not authenticate: someone rotated in between.
    Drift(String),
}

/// Decides what a distribution means. Pure.
pub(crate) fn judge(dist: &Distribution) -> Next {
    if dist.confirmed_count() == 0 {
        return Next::Lost(format!(
            "no destination confirmed the new key: {}",
            dist.summary()
        ));
    }
    if dist.verify == VerifyResult::Drift {
        return Next::Drift(
            "the new key does not authenticate: rotated elsewhere meanwhile".into(),
        );
    }
    Next::Done(dist.outcome())
}

impl Rotation {
    pub(crate) fn new(
        engine: &Arc<Engine>,
        key: &str,
        claim: Option<Claim>,
        req: RotationRequest,
    ) -> Result<Rotation, TriggerError> {
        let unknown = || TriggerError::UnknownKey(key.to_string());
        let rt = engine.runtime();
        let key = Arc::new(rt.config.key(key).ok_or_else(unknown)?.clone());
        let provider = rt.provider(&key).map_err(|_| unknown())?.clone();
        let slot = engine.slot(&key.name).ok_or_else(unknown)?;
        let now = engine.clock.now();
        // An approved rotation continues the one that waited: same id, same record.
        let meta = match &req.approval {
            Some(a) => a.pending.meta(Some(a.by.clone())),
            None => RotationMeta {
                rotation_id: Uuid::new_v4(),
                trigger: req.trigger,
                reason: req.reason.clone(),
                requested_by: req.requested_by.clone(),
                started_at: now,
                approved_by: None,
            },
        };
        let record = match slot.record(meta.rotation_id) {
            Some(r) => r,
            None => {
                let r = Arc::new(Mutex::new(RotationRecord::new(
                    &key.name,
                    meta.rotation_id,
                    meta.trigger,
                    meta.started_at,
                )));
                slot.remember(
                    r.clone(),
                    super::slot::records_per_key(rt.config.keys.len()),
                );
                r
            }
        };
        if claim.is_some() {
            let mut live = slot.live();
            live.rotating = Some(meta.rotation_id);
            if let Some(watch) = live.watch_cancel.take() {
                watch.cancel();
            }
        }
        let tenure = engine
            .coordination
            .as_ref()
            .and_then(|c| c.fence_of(&key.name));
        Ok(Rotation {
            engine: engine.clone(),
            rt,
            key,
            provider,
            req,
            meta,
            slot,
            record,
            tenure,
            _claim: claim,
            started: Instant::now(),
        })
    }

    /// The rotation, phase by phase.
    pub async fn run(mut self) -> RunResult {
        self.begin().await;
        match self.req.resume.take() {
            Some(Resume::Dual(resume)) => return Box::pin(dual::resume(self, resume)).await,
            Some(resume) => return self.resume(resume).await,
            None => {}
        }
        self.fresh().await
    }

    /// A rotation from preflight on (not a resume).
    pub(super) async fn fresh(self) -> RunResult {
        let mut pre = self.preflight().await;
        let prepared = std::mem::take(&mut pre.prepared);
        if self.req.dry_run {
            return self.dry_run(pre);
        }
        if !pre.problems.is_empty() {
            return self.refused_by_preflight(pre).await;
        }
        self.event(EventKind::PreflightOk, pre.findings.join("; "));
        if super::approval::needed(&self.key, &self.req) {
            return self.await_approval(pre).await;
        }
        if self.provider.overlap() == Overlap::Dual {
            // Boxed: a dual rotation's state is large and rare, and the single-key path stays as it was.
            return Box::pin(dual::run(self, pre, prepared)).await;
        }
        let (mut cause, mut before) = (self.req.rerotation, pre.status);
        loop {
            if let Some(reason) = cause
                && let Err(why) = self.may_rerotate(reason).await
            {
                return self.failed(Failure::Lost, why, None).await;
            }
            let issued = match regenerate::run(&self, before.as_ref()).await {
                Regen::Issued(issued) => issued,
                Regen::Lost(why) => {
                    self.event(EventKind::Lost, &why);
                    (cause, before) = (Some(RerotationReason::LostBeforeStorage), None);
                    continue;
                }
                other => return self.not_issued(other, cause.is_some(), before).await,
            };
            let dist = distribute::run(
                &self,
                Some(&issued.secret),
                &issued.ident,
                &prepared,
                Audience::All,
            )
            .await;
            let old_key_id = before.as_ref().map(|s| s.key_id.as_str());
            self.audit_regenerated(&issued.ident, old_key_id);
            self.audit_distribution(&dist, &issued.ident, old_key_id);
            match judge(&dist) {
                Next::Done(outcome) => return self.conclude(outcome, issued.ident, dist).await,
                Next::Lost(why) => {
                    return self.failed(Failure::Lost, why, Some(issued.ident)).await;
                }
                Next::Drift(why) => {
                    self.drift_seen(&issued.ident, &why);
                    if !self.key.auto_recover {
                        return self.failed(Failure::Drift, why, Some(issued.ident)).await;
                    }
                    (cause, before) = (Some(RerotationReason::Drift), None);
                }
            }
        }
    }

    /// Preflight found problems. A re-rotation's old key is already gone: "aborted, the old key still
    /// works" would be false, so it ends failed and the key stays lost.
    async fn refused_by_preflight(self, pre: preflight::Preflight) -> RunResult {
        let why = format!("preflight: {}", pre.problems.join("; "));
        if self.req.rerotation.is_some() {
            let why = format!("the key stays lost, its re-rotation cannot run yet: {why}");
            return self.failed(Failure::Lost, why, None).await;
        }
        let old_key_id = pre.status.map(|s| s.key_id);
        self.end(End::Aborted { why, old_key_id }).await
    }

    /// Regenerate issued no key. `rerotating`: the old key died earlier, so the key is lost.
    async fn not_issued(
        self,
        regen: Regen,
        rerotating: bool,
        before: Option<crate::provider::KeyStatus>,
    ) -> RunResult {
        match regen {
            Regen::Refused(why) if rerotating => {
                let why =
                    format!("regenerate refused during a re-rotation, the key is lost: {why}");
                self.failed(Failure::Lost, why, None).await
            }
            Regen::Refused(why) => {
                let why = format!("regenerate refused, the old key still works: {why}");
                self.failed(Failure::Refused, why, None).await
            }
            Regen::Unknown(why) => self.failed(Failure::Unresolved, why, None).await,
            Regen::NotSent(why) if rerotating => self.failed(Failure::Lost, why, None).await,
            Regen::NotSent(why) => {
                let old_key_id = before.map(|s| s.key_id);
                self.end(End::Aborted { why, old_key_id }).await
            }
            // Handled by the caller; reaching here would be a bug, and failing closed keeps the key
            // owed a re-rotation rather than silently served.
            Regen::Issued(_) | Regen::Lost(_) => {
                let why = "internal: regenerate result handled twice".to_string();
                self.failed(Failure::Lost, why, None).await
            }
        }
    }

    /// How a rotation starts: counted, audited (an approved one: `approved`), the owner told, and a
    /// rotation waiting for an approval overtaken when this one is about to regenerate the key.
    async fn begin(&self) {
        if let Some(a) = &self.req.approval {
            return self.begin_approved(a);
        }
        if !self.req.dry_run && self.req.resume.is_none() {
            let pending = self.slot.live().pending_approval.clone();
            if pending.is_some_and(|p| p.rotation_id != self.meta.rotation_id) {
                let how = super::approval::PendingEnd::Overtaken {
                    by: self.meta.rotation_id,
                    trigger: self.meta.trigger,
                };
                self.engine.end_pending(&self.key.name, how).await;
            }
        }
        let detail = format!(
            "trigger {}, reason {:?}, requested by {}{}",
            self.meta.trigger,
            self.meta.reason,
            self.meta.requested_by,
            if self.req.force && self.req.allow_partial {
                " (forced, partial destinations allowed)"
            } else if self.req.force {
                " (forced)"
            } else {
                ""
            }
        );
        if !self.req.dry_run {
            self.engine
                .metrics
                .rotation_started(&self.key.name, self.meta.started_at);
            let mut record = AuditRecord::started(&self.key.name, &self.meta);
            if self.req.force && self.req.allow_partial {
                record.detail = Some("forced with partial destinations allowed".into());
            }
            self.engine.audit(record);
            // A rotation that is going to wait for an approval is not "started" for its owner yet.
            if !super::approval::needed(&self.key, &self.req) {
                self.tell(self.notice(NoticeEvent::Started));
            }
        }
        self.event(EventKind::Started, detail);
    }

    /// Preflight, or for an approved rotation whose preflight is fresh, the one that preceded the
    /// approval (docs/lifecycle.md, "Approval").
    async fn preflight(&self) -> preflight::Preflight {
        // A dual rotation always reads again: what the destinations hold now is what a rollback
        // would put back.
        let reuse = self
            .req
            .approval
            .as_ref()
            .filter(|a| !a.preflight_again && self.provider.overlap() != Overlap::Dual);
        if let Some(a) = reuse {
            let earlier = lock(&self.record).preflight.clone();
            let mut findings = earlier;
            findings.push(format!(
                "preflight passed at {} (within {}s of the approval): not repeated",
                a.pending
                    .asked_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                super::approval::PREFLIGHT_FRESH.as_secs()
            ));
            // Nothing read ahead: each write reads what it needs itself (one round trip more).
            return preflight::Preflight {
                status: None,
                findings,
                problems: Vec::new(),
                prepared: Vec::new(),
            };
        }
        let pre = preflight::run(self).await;
        lock(&self.record).preflight = pre.findings.clone();
        pre
    }

    /// A notice about this rotation.
    pub(crate) fn notice(&self, event: NoticeEvent) -> Notice {
        let mut n = Notice::new(event, &self.key, self.engine.clock.now());
        n.rotation_id = Some(self.meta.rotation_id);
        n.trigger = Some(self.meta.trigger);
        n
    }

    /// Sends a notice to the key's targets (in the background).
    pub(crate) fn tell(&self, notice: Notice) {
        self.engine.notify(notice);
    }

    /// Re-rotations are bounded in a row and, like every regenerate, by the daily budget.
    ///
    /// With `max_rerotations = N`, a rotation whose key keeps getting lost calls regenerate at most
    /// 1 + N times; the (N+1)-th re-rotation is not attempted and the rotation ends `failed`. A
    /// re-rotation is counted (metric, audit) only when it is attempted. `rerotations_in_row` is
    /// bumped before the check, so after giving up it is > N and recovery defers to an operator.
    pub(super) async fn may_rerotate(&self, reason: RerotationReason) -> Result<(), String> {
        let _ = self.engine.commit(&self.slot, |j| j.rerotating()).await;
        let j = self.slot.journal().await;
        let now = self.engine.clock.now();
        if j.rerotations_in_row > self.key.max_rerotations {
            return Err(format!(
                "{} re-rotations in a row (max_rerotations = {}); giving up until an operator acts",
                j.rerotations_in_row - 1,
                self.key.max_rerotations
            ));
        }
        if j.budget_spent(now, self.key.max_regenerations_per_day) {
            return Err(format!(
                "regeneration budget exhausted: {} regenerate calls in the last 24h (max_regenerations_per_day = {})",
                j.regenerations_since(now),
                self.key.max_regenerations_per_day
            ));
        }
        // A drift loop gives the destinations a new value every round: from its second round on it
        // waits for a store that asks for few values per secret. The first repair of drift goes at
        // once: the destinations hold a dead key, and waiting would only lengthen that outage. A
        // lost key's last round gave no destination a value (lost in transit, or none confirmed it)
        // and no working key exists anywhere meanwhile, so it never waits.
        if matches!(reason, RerotationReason::Drift) && j.rerotations_in_row > 1 {
            self.respect_write_rates().await;
        }
        self.engine.metrics.rerotation(&self.key.name, reason);
        self.engine.audit(AuditRecord::rerotation(
            &self.key.name,
            &self.meta,
            j.active_key_id.as_deref(),
            reason,
            now,
        ));
        self.event(EventKind::Rerotation, format!("reason {reason}"));
        Ok(())
    }

    /// A drift loop must not hammer a store that asks for few writes per secret (AWS): wait
    /// until every destination may take another value, saying why. Shutdown ends the wait.
    async fn respect_write_rates(&self) {
        let wait = self
            .key
            .destinations
            .iter()
            .filter_map(|d| Some(self.rt.store(&d.store).ok()?.wait_before_write(&d.target)))
            .max()
            .unwrap_or_default();
        if wait.is_zero() {
            return;
        }
        tracing::warn!(wait = ?wait, "Re-rotation waits: a destination has had several new values in the last 10 minutes (AWS advises at most one PutSecretValue per secret per 10 minutes).");
        self.event(
            EventKind::Retry,
            format!("waiting {wait:?} before re-rotating: a destination's write rate limit"),
        );
        tokio::select! {
            _ = self.engine.shutdown.cancelled() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }

    /// Recovery or reconcile resumes at notify with a key a destination holds.
    async fn resume(self, resume: Resume) -> RunResult {
        let (key_id, secret, fp) = match resume {
            Resume::FromStorage { key_id, secret } => {
                let fp = fingerprint(&secret);
                (key_id, Some(secret), fp)
            }
            Resume::Notify {
                key_id,
                fingerprint,
            } => (key_id, None, fingerprint),
            Resume::Dual(resume) => return Box::pin(dual::resume(self, resume)).await,
        };
        // Never copy a value over the others without proof it is the live key: a copy of a dead key
        // to every destination, followed by every hook, would be a full outage.
        if let Some(secret) = &secret
            && let Err(why) = self.authenticates(secret).await
        {
            return self
                .end(End::Aborted {
                    why,
                    old_key_id: None,
                })
                .await;
        }
        let was_watching = self.slot.journal().await.phase == crate::journal::Phase::Watch;
        let meta = self.meta.clone();
        let _ = self
            .engine
            .commit(&self.slot, |j| j.resumed(&meta, &key_id, &fp))
            .await;
        self.event(
            EventKind::Resumed,
            format!("key {key_id} (fingerprint {fp})"),
        );
        let ident = Ident {
            key_id,
            fingerprint: fp,
            issued_at: self.engine.clock.now(),
            responded: Instant::now(),
        };
        let dist = distribute::run(&self, secret.as_ref(), &ident, &[], Audience::All).await;
        let outcome = dist.outcome();
        let end = End::Concluded {
            outcome,
            ident,
            dist,
            resumed: true,
            watch_allowed: !was_watching,
        };
        self.end(end).await
    }

    pub(super) async fn authenticates(&self, secret: &Secret) -> Result<(), String> {
        if !self.provider.has_auth_check() {
            return Ok(());
        }
        match calls::auth_check(&self.engine.metrics, &self.provider, secret).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => {
                Err("the value found in a destination no longer authenticates: not copied".into())
            }
            Err(e) => Err(format!(
                "cannot confirm that the stored value authenticates ({e}): not copied"
            )),
        }
    }

    fn dry_run(self, pre: preflight::Preflight) -> RunResult {
        let would_rotate = pre.problems.is_empty();
        let verdict = super::Verdict::of(would_rotate);
        let mut lines = pre.findings.clone();
        lines.extend(pre.problems.iter().cloned());
        self.event(
            EventKind::DryRun,
            format!("{verdict}: {}", lines.join("; ")),
        );
        let mut record = lock(&self.record);
        record.finished_at = Some(self.engine.clock.now());
        record.phase = LivePhase::Idle;
        RunResult::DryRun {
            would_rotate,
            findings: pre.findings,
            problems: pre.problems,
        }
    }

    /// Several replicas: a lease being re-checked after an outage is waited for (at most one
    /// ttl, or until shutdown), not taken for a refusal. Called before the first regenerate or
    /// create is sent; without `[coordination]` it returns at once.
    pub(super) async fn lease_settled(&self) {
        if let Some(c) = &self.engine.coordination {
            tokio::select! {
                () = c.lease_settled(&self.key.name, self.tenure) => {}
                () = self.engine.shutdown.cancelled() => {}
            }
        }
    }

    fn drift_seen(&self, ident: &Ident, why: &str) {
        self.event(EventKind::Drift, why);
        let mut n = self.notice(NoticeEvent::DriftDetected);
        n.reason = Some(why.to_string());
        n.old_key_id = Some(ident.key_id.clone());
        n.generated_by = self
            .slot
            .live()
            .status
            .as_ref()
            .and_then(|s| s.generated_by.clone());
        self.tell(n);
        let keys = Keys {
            old_key_id: Some(&ident.key_id),
            new_key_id: None,
            fingerprint: Some(&ident.fingerprint),
        };
        let now = self.engine.clock.now();
        let mut record =
            AuditRecord::drift(&self.key.name, Some(self.meta.rotation_id), keys, why, now);
        record.trigger = Some(self.meta.trigger);
        self.engine.audit(record);
    }

    /// The `regenerated` audit record, written once the window is over (every audit record is fsynced).
    pub(super) fn audit_regenerated(&self, ident: &Ident, old_key_id: Option<&str>) {
        self.engine.audit(AuditRecord::regenerated(
            &self.key.name,
            &self.meta,
            Keys {
                old_key_id,
                new_key_id: Some(&ident.key_id),
                fingerprint: Some(&ident.fingerprint),
            },
            ident.issued_at,
        ));
    }

    /// The audit trail of a distribution: `stored` per confirmed destination, `notified` per hook that
    /// answered, `verified` when the new key authenticates at the provider. Written after the window.
    pub(super) fn audit_distribution(
        &self,
        dist: &Distribution,
        ident: &Ident,
        old_key_id: Option<&str>,
    ) {
        let now = self.engine.clock.now();
        let keys = || Keys {
            old_key_id,
            new_key_id: Some(&ident.key_id),
            fingerprint: Some(&ident.fingerprint),
        };
        let step = |event, what: &str| {
            self.engine.audit(AuditRecord::step(
                &self.key.name,
                &self.meta,
                event,
                keys(),
                what,
                now,
            ));
        };
        for (d, ok) in self.key.destinations.iter().zip(&dist.confirmed) {
            if *ok {
                step(AuditEvent::Stored, &format!("{} ({})", d.store, d.target));
            }
        }
        for (dependent, ok) in &dist.hooks {
            if *ok {
                step(AuditEvent::Notified, dependent);
            }
        }
        if dist.verify == VerifyResult::Ok {
            step(
                AuditEvent::Verified,
                "the new key authenticates at the provider",
            );
        }
    }

    pub(super) async fn failed(self, how: Failure, why: String, new: Option<Ident>) -> RunResult {
        self.end(End::Failed { how, why, new }).await
    }

    async fn conclude(self, outcome: Outcome, ident: Ident, dist: Distribution) -> RunResult {
        let end = End::Concluded {
            outcome,
            ident,
            dist,
            resumed: false,
            watch_allowed: true,
        };
        self.end(end).await
    }

    /// The one way a rotation ends: the journal's last word, the audit record, the metrics, the
    /// record's outcome, the scheduler told, and (after a distribution) the watch started.
    pub(super) async fn end(self, end: End) -> RunResult {
        let now = self.engine.clock.now();
        let (outcome, window) = match &end {
            End::Aborted { why, old_key_id } => {
                self.end_aborted(why, old_key_id.as_deref(), now).await;
                (Outcome::Aborted, None)
            }
            End::Failed { how, why, new } => {
                self.end_failed(*how, why, new.as_ref(), now).await;
                (Outcome::Failed, None)
            }
            End::Concluded { outcome, dist, .. } => {
                self.end_concluded(&end, now).await;
                (*outcome, dist.window)
            }
        };
        self.tell_end(&end, outcome);
        let metrics = &self.engine.metrics;
        metrics.rotation_finished(&self.key.name, outcome, self.started.elapsed(), now);
        if let Some(w) = window {
            metrics.invalidation_window(&self.key.name, w);
        }
        {
            let mut live = self.slot.live();
            live.last_outcome = Some(outcome);
            live.rotating = None;
        }
        let window = window
            .map(|w| format!(", invalidation window {:.3}s", w.as_secs_f64()))
            .unwrap_or_default();
        self.event(EventKind::Finished, format!("outcome {outcome}{window}"));
        {
            // The live view is read before the record is locked: never one lock under the other.
            let phase = self.slot.live_phase();
            let mut record = lock(&self.record);
            record.outcome = Some(outcome);
            record.finished_at = Some(now);
            record.phase = phase;
        }
        self.engine.schedule.key(&self.key.name);
        RunResult::Finished(outcome)
    }

    /// The owner's notices of how the rotation ended: `finished` always, and `degraded`, `failed` or
    /// `key_lost` with the reason.
    fn tell_end(&self, end: &End, outcome: Outcome) {
        let mut finished = self.notice(NoticeEvent::Finished);
        finished.outcome = Some(outcome);
        let (why, extra) = match end {
            End::Aborted { why, old_key_id } => {
                finished.old_key_id = old_key_id.clone();
                (why.clone(), None)
            }
            End::Failed { how, why, new } => {
                if let Some(i) = new {
                    finished.new_key_id = Some(i.key_id.clone());
                    finished.fingerprint = Some(i.fingerprint.clone());
                }
                let extra = match how {
                    Failure::Lost => NoticeEvent::KeyLost,
                    _ => NoticeEvent::Failed,
                };
                (why.clone(), Some(extra))
            }
            End::Concluded { ident, dist, .. } => {
                finished.new_key_id = Some(ident.key_id.clone());
                finished.fingerprint = Some(ident.fingerprint.clone());
                let extra = (outcome == Outcome::Degraded).then_some(NoticeEvent::Degraded);
                (dist.summary(), extra)
            }
        };
        finished.reason = Some(why.clone());
        if let Some(event) = extra {
            let mut n = finished.clone();
            n.event = event;
            self.tell(n);
            if event == NoticeEvent::KeyLost {
                // A lost key is a failed rotation too, for targets that only follow failures.
                let mut failed = finished.clone();
                failed.event = NoticeEvent::Failed;
                self.tell(failed);
            }
        }
        self.tell(finished);
    }

    async fn end_aborted(
        &self,
        why: &str,
        old_key_id: Option<&str>,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        let meta = &self.meta;
        let _ = self
            .engine
            .commit(&self.slot, |j| j.aborted(meta, now))
            .await;
        self.event(EventKind::Aborted, why);
        self.engine.audit(AuditRecord::aborted(
            &self.key.name,
            meta,
            old_key_id,
            why,
            now,
        ));
    }

    async fn end_failed(
        &self,
        how: Failure,
        why: &str,
        new: Option<&Ident>,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        let meta = &self.meta;
        let _ = self
            .engine
            .commit(&self.slot, |j| j.failed(meta, how, now))
            .await;
        self.event(
            if how == Failure::Lost {
                EventKind::Lost
            } else {
                EventKind::Failed
            },
            why,
        );
        if how == Failure::Drift {
            // The journal's `failed` transition already keeps the flag: this only shows it.
            self.engine.set_drift(&self.slot, true).await;
        }
        let keys = Keys {
            old_key_id: None,
            new_key_id: new.map(|i| i.key_id.as_str()),
            fingerprint: new.map(|i| i.fingerprint.as_str()),
        };
        self.engine.audit(AuditRecord::finished(
            &self.key.name,
            meta,
            Outcome::Failed,
            keys,
            why,
            now,
        ));
    }

    async fn end_concluded(&self, end: &End, now: chrono::DateTime<chrono::Utc>) {
        let End::Concluded {
            outcome,
            ident,
            dist,
            resumed,
            watch_allowed,
        } = end
        else {
            return;
        };
        let watch = *watch_allowed
            && self.req.watch
            && self.key.watch > Duration::ZERO
            && self.key.dependents.iter().any(|d| d.verify.is_some())
            && !self.engine.shutdown.is_cancelled();
        let old_key_id = self.slot.journal().await.old_key_id;
        let window = dist.window;
        let lagging = dist.confirmed_count() < self.key.destinations.len();
        // The drift flag goes in the same write as the conclusion (`set_drift` below then only
        // shows it).
        let _ = self
            .engine
            .commit(&self.slot, |j| {
                j.concluded(*outcome, &ident.key_id, &ident.fingerprint, watch, now);
                if let Some(w) = window {
                    j.window_observed(w);
                }
                j.drift = lagging;
            })
            .await;
        // An operator's rotation after a journal was set aside ends the block: the key has a journal
        // again, written by this rotation.
        if self.slot.live().blocked.take().is_some() {
            self.engine.metrics.journal_blocked(&self.key.name, false);
            tracing::info!("Key unblocked: its journal was written anew by this rotation.");
        }
        self.engine.set_destinations(&self.slot, dist.views.clone());
        self.engine.set_drift(&self.slot, lagging).await;
        let keys = || Keys {
            old_key_id: if *resumed {
                None
            } else {
                old_key_id.as_deref()
            },
            new_key_id: Some(&ident.key_id),
            fingerprint: Some(&ident.fingerprint),
        };
        let summary = dist.summary();
        if *resumed {
            let r =
                AuditRecord::recovered(&self.key.name, &self.meta, *outcome, keys(), &summary, now);
            self.engine.audit(r);
        }
        let r = AuditRecord::finished(&self.key.name, &self.meta, *outcome, keys(), &summary, now);
        self.engine.audit(r);
        if watch {
            watch::spawn(self, &ident.key_id);
        }
    }

    /// Adds an event to the rotation's record and logs it (with the rotation span's key and id).
    pub(crate) fn event(&self, event: EventKind, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::info!(event = event.as_str(), "{detail}");
        lock(&self.record).events.push(RecordEvent {
            ts: self.engine.clock.now(),
            event,
            detail,
        });
    }

    /// Mirrors the journal's phase into the record (the key's live phase is the slot's).
    pub(crate) fn show_phase(&self) {
        lock(&self.record).phase = self.slot.live_phase();
    }
}

impl Drop for Rotation {
    fn drop(&mut self) {
        self.engine.hold_shutdown(self.meta.rotation_id, None);
        // A group's other keys no longer wait for this one's reloads.
        if let Some(batch) = &self.req.batch {
            batch.leave(&self.engine, &self.key.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dist(confirmed: &[bool], hooks: &[bool], verify: VerifyResult) -> Distribution {
        Distribution {
            confirmed: confirmed.to_vec(),
            hooks: hooks
                .iter()
                .enumerate()
                .map(|(i, ok)| (format!("dep{i}"), *ok))
                .collect(),
            verify,
            window: None,
            views: Vec::new(),
        }
    }

    #[test]
    fn judge_reads_a_distribution() {
        use VerifyResult as V;
        let (ok, lagging) = (Some(Outcome::Success), Some(Outcome::Degraded));
        // None = not done: `lost` or `drift` as the last column says.
        type Row<'a> = (
            &'a [bool],
            &'a [bool],
            VerifyResult,
            Option<Outcome>,
            &'a str,
        );
        let table: &[Row] = &[
            (&[true, true], &[true], V::Ok, ok, ""),
            (&[true, true], &[true], V::Unknown, ok, ""),
            (&[true, false], &[true], V::Ok, lagging, ""),
            (&[true, true], &[false], V::Ok, lagging, ""),
            (&[false, false], &[], V::Ok, None, "lost"),
            (&[false, false], &[], V::Drift, None, "lost"),
            (&[true, false], &[true], V::Drift, None, "drift"),
            (&[], &[], V::Skipped, None, "lost"),
        ];
        for (confirmed, hooks, verify, outcome, other) in table {
            let got = match judge(&dist(confirmed, hooks, *verify)) {
                Next::Done(o) => (Some(o), ""),
                Next::Lost(_) => (None, "lost"),
                Next::Drift(_) => (None, "drift"),
            };
            assert_eq!(
                got,
                (*outcome, *other),
                "{confirmed:?} {hooks:?} {verify:?}"
            );
        }
    }
}
