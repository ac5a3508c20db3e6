//! What the engine shows of a rotation while and after it runs: the live phase, the record that
//! `GET /v1/rotations/{id}` and `keyrotd rotate` follow, and its events. Public information only.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::journal::{Phase, Trigger};
use crate::telemetry::Outcome;

/// A key's phase as `/v1/keys` shows it. One explicit mapping from the journal's [`Phase`]
/// ([`LivePhase::of`]) plus `preflight`, which is not journaled because nothing has changed yet.
/// Verify runs beside notify and never has a phase of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LivePhase {
    #[default]
    Idle,
    Preflight,
    Regenerating,
    Storing,
    Notifying,
    Watching,
    /// A due rotation passed preflight and waits for an operator's approval; nothing is held.
    AwaitingApproval,
    /// Dual keys: the vendor is creating the new key (the old one stays live).
    Creating,
    /// Dual keys: waiting for the dependents to confirm the new key.
    Confirming,
    /// Dual keys: retiring a key by id.
    Revoking,
    /// Dual keys: a canary failed; the old key goes back into the destinations.
    RollingBack,
}

impl LivePhase {
    /// The live phase of a key whose journal says `phase`, while a rotation of it is running or not.
    pub fn of(phase: Phase, rotating: bool) -> LivePhase {
        match (phase, rotating) {
            (Phase::Regenerating, _) => LivePhase::Regenerating,
            (Phase::Storing, _) => LivePhase::Storing,
            (Phase::Notify, _) => LivePhase::Notifying,
            // A new rotation cancelled the previous one's watch; it is in preflight until it acts.
            (Phase::Idle | Phase::Watch, true) => LivePhase::Preflight,
            (Phase::Watch, false) => LivePhase::Watching,
            (Phase::Idle, false) => LivePhase::Idle,
            (Phase::Creating, _) => LivePhase::Creating,
            (Phase::Confirming, _) => LivePhase::Confirming,
            (Phase::Revoking, _) => LivePhase::Revoking,
            (Phase::RollingBack, _) => LivePhase::RollingBack,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LivePhase::Idle => "idle",
            LivePhase::Preflight => "preflight",
            LivePhase::Regenerating => "regenerating",
            LivePhase::Storing => "storing",
            LivePhase::Notifying => "notifying",
            LivePhase::Watching => "watching",
            LivePhase::AwaitingApproval => "awaiting_approval",
            LivePhase::Creating => "creating",
            LivePhase::Confirming => "confirming",
            LivePhase::Revoking => "revoking",
            LivePhase::RollingBack => "rolling_back",
        }
    }
}

/// What happened in a rotation, as its record lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    PreflightOk,
    DryRun,
    Aborted,
    Rerotation,
    Regenerated,
    Ambiguous,
    Retry,
    RateLimited,
    Lost,
    Stored,
    StoreFailed,
    Notified,
    HookFailed,
    Verified,
    VerifyFailed,
    VerifyUnknown,
    Drift,
    Failed,
    Finished,
    Probe,
    Resumed,
    PendingApproval,
    Approved,
    /// Dual keys.
    Created,
    Confirmed,
    Unconfirmed,
    Revoked,
    CanaryFailed,
    RolledBack,
    /// A reload was coalesced with other keys' reloads of the same target.
    Coalesced,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::PreflightOk => "preflight_ok",
            EventKind::DryRun => "dry_run",
            EventKind::Aborted => "aborted",
            EventKind::Rerotation => "rerotation",
            EventKind::Regenerated => "regenerated",
            EventKind::Ambiguous => "ambiguous",
            EventKind::Retry => "retry",
            EventKind::RateLimited => "rate_limited",
            EventKind::Lost => "lost",
            EventKind::Stored => "stored",
            EventKind::StoreFailed => "store_failed",
            EventKind::Notified => "notified",
            EventKind::HookFailed => "hook_failed",
            EventKind::Verified => "verified",
            EventKind::VerifyFailed => "verify_failed",
            EventKind::VerifyUnknown => "verify_unknown",
            EventKind::Drift => "drift",
            EventKind::Failed => "failed",
            EventKind::Finished => "finished",
            EventKind::Probe => "probe",
            EventKind::Resumed => "resumed",
            EventKind::PendingApproval => "pending_approval",
            EventKind::Approved => "approved",
            EventKind::Created => "created",
            EventKind::Confirmed => "confirmed",
            EventKind::Unconfirmed => "unconfirmed",
            EventKind::Revoked => "revoked",
            EventKind::CanaryFailed => "canary_failed",
            EventKind::RolledBack => "rolled_back",
            EventKind::Coalesced => "coalesced",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event in a rotation's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordEvent {
    pub ts: DateTime<Utc>,
    pub event: EventKind,
    pub detail: String,
}

/// What the engine remembers of one rotation.
#[derive(Debug, Clone, Serialize)]
pub struct RotationRecord {
    pub rotation_id: Uuid,
    pub key: String,
    pub trigger: Trigger,
    pub phase: LivePhase,
    pub outcome: Option<Outcome>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub events: Vec<RecordEvent>,
    /// Preflight findings (dry runs and aborts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub preflight: Vec<String>,
}

impl RotationRecord {
    pub fn new(key: &str, rotation_id: Uuid, trigger: Trigger, at: DateTime<Utc>) -> Self {
        RotationRecord {
            rotation_id,
            key: key.to_string(),
            trigger,
            phase: LivePhase::Preflight,
            outcome: None,
            started_at: at,
            finished_at: None,
            events: Vec::new(),
            preflight: Vec::new(),
        }
    }

    /// The first event of `kind`, if any.
    pub fn event(&self, kind: EventKind) -> Option<&RecordEvent> {
        self.events.iter().find(|e| e.event == kind)
    }
}

/// What one destination holds, as last seen.
#[derive(Debug, Clone, Serialize)]
pub struct DestinationView {
    pub store: String,
    pub target: String,
    pub key_id: Option<String>,
    pub fingerprint: Option<String>,
    pub version: Option<String>,
    pub in_sync: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_phase_maps_every_journal_phase() {
        use LivePhase as L;
        use Phase as P;
        let table = [
            (P::Idle, false, L::Idle),
            (P::Idle, true, L::Preflight),
            (P::Regenerating, true, L::Regenerating),
            (P::Regenerating, false, L::Regenerating),
            (P::Storing, true, L::Storing),
            (P::Notify, true, L::Notifying),
            (P::Watch, false, L::Watching),
            (P::Watch, true, L::Preflight),
        ];
        for (phase, rotating, want) in table {
            assert_eq!(LivePhase::of(phase, rotating), want, "{phase:?} {rotating}");
        }
    }

    #[test]
    fn event_names_are_their_serde_names() {
        for kind in [
            EventKind::PreflightOk,
            EventKind::StoreFailed,
            EventKind::Finished,
        ] {
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json, kind.as_str());
        }
    }
}
