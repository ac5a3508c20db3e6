//! The watch (docs/lifecycle.md, phase 6): after the outcome is decided, probe each dependent's verify
//! every `watch_interval` for `watch`. A 401/403 is an auth failure, counted; a dependent still failing
//! after 3 probes is sent its reload hook again (at most twice). The provider is re-read to catch a
//! rotation by someone else (drift → re-rotation when `auto_recover`). A newer rotation of the key
//! cancels the watch.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::calls::{self, Notice};
use super::record::{EventKind, RecordEvent, RotationRecord};
use super::slot::KeySlot;
use super::{Engine, RotationRequest, Trigger, lock};
use crate::config::{DependentConfig, KeyConfig, VerifyConfig};
use crate::journal::{AuditRecord, Keys};
use crate::limits::Limited;
use crate::notify::Probe;
use crate::notify::targets::{Notice as OwnerNotice, NoticeEvent};
use crate::provider::Provider;
use crate::telemetry::{CheckResult, RerotationReason};

/// Hook calls of the watch before it gives up on resending.
const WATCH_RESENDS: u32 = 2;
/// Consecutive auth failures of a dependent before its reload hook is sent again.
const WATCH_FAILURES_BEFORE_RESEND: u32 = 3;

struct Watch {
    engine: Arc<Engine>,
    key: Arc<KeyConfig>,
    provider: Arc<Limited<Provider>>,
    slot: Arc<KeySlot>,
    record: Arc<Mutex<RotationRecord>>,
    rotation_id: Uuid,
    key_id: String,
    cancel: CancellationToken,
}

pub fn spawn(r: &super::rotation::Rotation, key_id: &str) {
    let cancel = r.engine.shutdown.child_token();
    r.slot.live().watch_cancel = Some(cancel.clone());
    let watch = Watch {
        engine: r.engine.clone(),
        key: r.key.clone(),
        provider: r.provider.clone(),
        slot: r.slot.clone(),
        record: r.record.clone(),
        rotation_id: r.meta.rotation_id,
        key_id: key_id.to_string(),
        cancel,
    };
    use tracing::Instrument;
    let span = tracing::info_span!("watch", key = %r.key.name, rotation_id = %r.meta.rotation_id);
    r.engine.tasks.spawn(watch.run().instrument(span));
}

impl Watch {
    async fn run(self) {
        self.probe_until_over().await;
        // Cancelled = a newer rotation owns the key (and its journal) now.
        if !self.cancel.is_cancelled() {
            self.slot.live().watch_cancel = None;
            let id = self.rotation_id;
            let _ = self.engine.commit(&self.slot, |j| j.watch_over(id)).await;
        }
    }

    async fn probe_until_over(&self) {
        let until = tokio::time::Instant::now() + self.key.watch;
        let deps: Vec<(&DependentConfig, &VerifyConfig)> = self
            .key
            .dependents
            .iter()
            .filter_map(|d| d.verify.as_ref().map(|v| (d, v)))
            .collect();
        let mut failing = vec![0u32; deps.len()];
        let mut resent = vec![0u32; deps.len()];
        loop {
            let probes = futures::future::join_all(
                deps.iter().map(|(_, v)| self.engine.dependents.probe(v)),
            )
            .await;
            for (i, ((dep, _), probe)) in deps.iter().zip(probes).enumerate() {
                self.judge_probe(dep, &probe, &mut failing[i], &mut resent[i])
                    .await;
            }
            if self.drift_seen().await {
                return;
            }
            let next = tokio::time::Instant::now() + self.key.watch_interval;
            if next > until {
                return;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }

    async fn judge_probe(
        &self,
        dep: &DependentConfig,
        probe: &Probe,
        failing: &mut u32,
        resent: &mut u32,
    ) {
        let result = match probe {
            Probe::Ok => CheckResult::Ok,
            Probe::AuthFailure(_) => CheckResult::AuthFailure,
            _ => CheckResult::Error,
        };
        self.engine
            .metrics
            .post_rotation_check(&self.key.name, &dep.name, result);
        lock(&self.record).events.push(RecordEvent {
            ts: self.engine.clock.now(),
            event: EventKind::Probe,
            detail: format!("{}: {}", dep.name, describe(probe)),
        });
        if result != CheckResult::AuthFailure {
            *failing = 0;
            return;
        }
        tracing::warn!(dependent = %dep.name, "Dependent fails authentication after rotation.");
        *failing += 1;
        if *failing == 1 {
            // The first failure of a run of them: the owner hears of it once, not at every probe.
            let mut n = self.notice(NoticeEvent::AuthFailures);
            n.dependent = Some(dep.name.clone());
            n.new_key_id = Some(self.key_id.clone());
            n.reason = Some(format!("{}: {}", dep.name, describe(probe)));
            self.engine.notify(n);
        }
        if *failing >= WATCH_FAILURES_BEFORE_RESEND
            && *resent < WATCH_RESENDS
            && dep.reload.is_some()
        {
            *resent += 1;
            *failing = 0;
            let notice = Notice {
                rotation_id: self.rotation_id,
                key_id: self.key_id.clone(),
                rotated_at: self.engine.clock.now(),
                keys: Vec::new(),
            };
            let ok = calls::call_hook(&self.engine, &self.key, dep, &notice).await;
            tracing::info!(dependent = %dep.name, ok, "Reload hook sent again.");
        }
    }

    fn notice(&self, event: NoticeEvent) -> OwnerNotice {
        let mut n = OwnerNotice::new(event, &self.key, self.engine.clock.now());
        n.rotation_id = Some(self.rotation_id);
        n
    }

    /// Re-reads the provider; true when its key moved on (someone rotated elsewhere).
    async fn drift_seen(&self) -> bool {
        if !self.provider.has_status() {
            return false;
        }
        let Ok(s) = calls::status(&self.engine.metrics, &self.provider).await else {
            return false;
        };
        self.engine.set_status(&self.slot, &s);
        if s.key_id == self.key_id || !s.active {
            return false;
        }
        tracing::warn!(provider_key_id = %s.key_id, "Provider's key changed during the watch: drift.");
        let active = Keys {
            new_key_id: Some(&s.key_id),
            ..Keys::default()
        };
        let detail = format!("provider now reports {}", s.key_id);
        let now = self.engine.clock.now();
        self.engine.audit(AuditRecord::drift(
            &self.key.name,
            Some(self.rotation_id),
            active,
            &detail,
            now,
        ));
        self.engine.set_drift(&self.slot, true).await;
        let mut n = self.notice(NoticeEvent::DriftDetected);
        n.reason = Some(format!(
            "the provider's active key changed during the watch: {detail}"
        ));
        n.old_key_id = Some(self.key_id.clone());
        n.new_key_id = Some(s.key_id.clone());
        n.generated_by = s.generated_by.clone();
        self.engine.notify(n);
        if self.key.auto_recover {
            let req = RotationRequest::rerotation(
                Trigger::Recovery,
                RerotationReason::Drift,
                self.engine.requested_by(),
            );
            let engine = self.engine.clone();
            let name = self.key.name.clone();
            // From a fresh task: this watch is cancelled by the rotation it starts.
            tokio::spawn(async move {
                if let Err(e) = engine.start_rotation(&name, req) {
                    tracing::warn!(error = %e, "Re-rotation after drift not started.");
                }
            });
        }
        true
    }
}

/// A probe result in words (never a body).
pub fn describe(probe: &Probe) -> String {
    match probe {
        Probe::Ok => "ok".into(),
        Probe::AuthFailure(code) => format!("auth failure (HTTP {code})"),
        Probe::Unexpected(code) => format!("unexpected HTTP {code}"),
        Probe::Unreachable(e) => format!("unreachable: {e}"),
    }
}
