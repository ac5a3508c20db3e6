//! One key's slot: the single owner of its durable state, and its live view.
//!
//! Two locks, each for one job:
//! - the **claim** (busy flag): at most one actor — a rotation, the recovery of a journal, a reconcile
//!   repair — works on a key at a time. Taking it never waits: a second trigger is refused (409). A
//!   recovery or reconcile decision is made while holding it and handed, claim and all, to the
//!   rotation that carries it out, so nothing can slip in between;
//! - the **journal mutex**: every read-modify-write of the journal (the in-memory copy is the
//!   authoritative one; the file mirrors it) happens under it, including the few done outside a
//!   claim (a watch ending, the background fill checking it still owns the key).
//!
//! The **generation** grows with every journal change. Reconcile reads it before its (slow, unlocked)
//! observation and acts only if it is unchanged once the claim is taken: an observation that a
//! rotation overtook is dropped, never acted on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::record::{DestinationView, LivePhase, RotationRecord};
use crate::journal::{KeyJournal, PendingApproval, Phase};
use crate::provider::KeyStatus;
use crate::telemetry::Outcome;

/// How many finished rotations per key the engine remembers for `GET /v1/rotations/{id}`, at most.
pub const RECORDS_PER_KEY: usize = 100;
/// How many records the engine keeps in all: a large fleet keeps fewer per key (never under
/// [`RECORDS_PER_KEY_AT_LEAST`]), so a year of daily rotations of 10,000 keys does not pile up a
/// million records in memory. The audit log keeps every rotation.
pub const RECORDS_IN_ALL: usize = 20_000;
pub const RECORDS_PER_KEY_AT_LEAST: usize = 2;

/// How many records each of `keys` keys keeps (see [`RECORDS_IN_ALL`]).
pub fn records_per_key(keys: usize) -> usize {
    (RECORDS_IN_ALL / keys.max(1)).clamp(RECORDS_PER_KEY_AT_LEAST, RECORDS_PER_KEY)
}

/// The live, in-memory view of a key: rebuilt by observation after a restart, except the fields
/// that mirror the journal (`drift` among them, so a restart does not hide drift already found).
#[derive(Debug, Default)]
pub struct Live {
    /// Mirror of the journal's phase, for readers that must not wait on the journal mutex.
    pub phase: Phase,
    /// The rotation running now (from its start to its end; a watch does not count).
    pub rotating: Option<Uuid>,
    pub watch_cancel: Option<CancellationToken>,
    pub status: Option<KeyStatus>,
    pub destinations: Vec<DestinationView>,
    /// When `destinations` was recorded (an observation, or a rotation's writes).
    pub destinations_at: Option<DateTime<Utc>>,
    pub drift: bool,
    /// No observation has completed since start.
    pub observing: bool,
    pub next_rotation: Option<DateTime<Utc>>,
    pub last_outcome: Option<Outcome>,
    pub records: VecDeque<Arc<Mutex<RotationRecord>>>,
    /// The last journal write failed; the in-memory journal is ahead of the file.
    pub dirty: bool,
    /// Why the key is blocked from automatic regeneration (its journal was unreadable).
    pub blocked: Option<String>,
    /// When recovery may try this key's owed re-rotation again (backoff after an abort).
    pub retry_at: Option<DateTime<Utc>>,
    pub retry_attempt: u32,
    /// Mirror of the journal's pending approval.
    pub pending_approval: Option<Box<PendingApproval>>,
    /// Mirror of the journal: keyrotd has never issued nor adopted this key.
    pub first_contact: bool,
    /// Mirror of the journal: the key is lost (a re-rotation is owed).
    pub lost: bool,
}

/// A key's slot. Shared behind an `Arc`; outlives a config reload that drops the key while a rotation
/// of it still holds a claim, so a key re-added meanwhile finds the same slot (one owner, always).
#[derive(Debug)]
pub struct KeySlot {
    pub name: String,
    busy: AtomicBool,
    generation: AtomicU64,
    journal: tokio::sync::Mutex<KeyJournal>,
    live: Mutex<Live>,
}

impl KeySlot {
    pub fn new(journal: KeyJournal) -> Arc<KeySlot> {
        let live = Live {
            phase: journal.phase,
            last_outcome: journal.last_outcome,
            observing: true,
            pending_approval: journal.pending_approval.clone(),
            first_contact: journal.is_first_contact(),
            lost: journal.lost,
            drift: journal.drift,
            ..Live::default()
        };
        Arc::new(KeySlot {
            name: journal.key.clone(),
            busy: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            journal: tokio::sync::Mutex::new(journal),
            live: Mutex::new(live),
        })
    }

    /// Takes the key's claim, or `None` when another actor holds it.
    pub fn try_claim(self: &Arc<Self>) -> Option<Claim> {
        self.busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| Claim { slot: self.clone() })
    }

    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// Grows with every journal change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// A copy of the journal as it is now.
    pub async fn journal(&self) -> KeyJournal {
        self.journal.lock().await.clone()
    }

    /// The journal mutex, for the engine's commit functions.
    pub(crate) async fn lock_journal(&self) -> tokio::sync::MutexGuard<'_, KeyJournal> {
        self.journal.lock().await
    }

    /// Called under the journal mutex after every change.
    pub(crate) fn changed(&self, journal: &KeyJournal) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut live = self.live();
        live.phase = journal.phase;
        live.pending_approval = journal.pending_approval.clone();
        live.first_contact = journal.is_first_contact();
        live.lost = journal.lost;
    }

    /// Whether periodic recovery has anything to look at: the journal (as mirrored) is mid-rotation
    /// or the key is lost, and nobody holds the key. Reads no journal and takes no claim, so a tick
    /// over a quiet fleet costs one uncontended lock per key and never turns a POST away.
    pub fn may_need_recovery(&self) -> bool {
        if self.is_busy() {
            return false;
        }
        let live = self.live();
        live.lost || !matches!(live.phase, Phase::Idle | Phase::Watch)
    }

    pub fn live(&self) -> MutexGuard<'_, Live> {
        // A poisoned lock means a panic while a view field was assigned: the view is still usable.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The phase `/v1/keys` shows.
    pub fn live_phase(&self) -> LivePhase {
        let live = self.live();
        match LivePhase::of(live.phase, live.rotating.is_some()) {
            LivePhase::Idle if live.pending_approval.is_some() => LivePhase::AwaitingApproval,
            phase => phase,
        }
    }

    /// The record of rotation `id`, while the slot still remembers it.
    pub fn record(&self, id: Uuid) -> Option<Arc<Mutex<RotationRecord>>> {
        // The records are copied out first: a record's lock is never taken under the live view's
        // (the rotation's end takes them the other way round).
        let records: Vec<_> = self.live().records.iter().cloned().collect();
        records
            .into_iter()
            .find(|r| r.lock().unwrap_or_else(|p| p.into_inner()).rotation_id == id)
    }

    /// Remembers a rotation's record, keeping the last `keep` ([`records_per_key`]).
    pub fn remember(&self, record: Arc<Mutex<RotationRecord>>, keep: usize) {
        let mut live = self.live();
        live.records.push_back(record);
        while live.records.len() > keep.max(1) {
            live.records.pop_front();
        }
    }
}

/// The right to act on a key. Dropping it frees the key for the next trigger.
#[derive(Debug)]
pub struct Claim {
    slot: Arc<KeySlot>,
}

impl Claim {
    pub fn slot(&self) -> &Arc<KeySlot> {
        &self.slot
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.slot.busy.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_exclusive_until_dropped() {
        let slot = KeySlot::new(KeyJournal::new("k"));
        let first = slot.try_claim().expect("free");
        assert!(slot.is_busy());
        assert!(slot.try_claim().is_none());
        drop(first);
        assert!(!slot.is_busy());
        assert!(slot.try_claim().is_some());
    }

    #[test]
    fn only_a_free_key_mid_rotation_or_lost_needs_a_recovery_look() {
        let slot = KeySlot::new(KeyJournal::new("k"));
        assert!(!slot.may_need_recovery(), "idle: nothing to recover");
        let mut j = KeyJournal::new("k");
        j.lost = true;
        slot.changed(&j);
        assert!(slot.may_need_recovery(), "lost: a re-rotation is owed");
        let claim = slot.try_claim().expect("free");
        assert!(!slot.may_need_recovery(), "held: its holder acts");
        drop(claim);
        j.lost = false;
        j.phase = Phase::Storing;
        slot.changed(&j);
        assert!(slot.may_need_recovery(), "interrupted mid-rotation");
        j.phase = Phase::Watch;
        slot.changed(&j);
        assert!(
            !slot.may_need_recovery(),
            "a watch is only resumed at start"
        );
    }

    #[test]
    fn only_the_last_records_are_kept() {
        for (keys, kept) in [(1, RECORDS_PER_KEY), (1_000, 20), (10_000, 2), (50_000, 2)] {
            assert_eq!(records_per_key(keys), kept, "{keys} keys");
            let slot = KeySlot::new(KeyJournal::new("k"));
            let ids: Vec<Uuid> = (0..RECORDS_PER_KEY + 5).map(|_| Uuid::new_v4()).collect();
            for id in &ids {
                slot.remember(
                    Arc::new(Mutex::new(RotationRecord::new(
                        "k",
                        *id,
                        crate::journal::Trigger::Api,
                        Utc::now(),
                    ))),
                    records_per_key(keys),
                );
            }
            assert_eq!(slot.live().records.len(), kept, "{keys} keys");
            assert!(
                slot.record(*ids.last().unwrap()).is_some(),
                "the newest is kept"
            );
            assert!(slot.record(ids[0]).is_none(), "the oldest is not");
        }
    }
}
