//! Crash-safe state on disk: one journal file per key, the state-dir lock, and the audit log.
//!
//! The journal is what makes a crash survivable. Every phase change is written *before* the step it
//! announces (temp file, fsync, rename, fsync the directory), so after a crash the last record says
//! exactly which destructive step may have happened. It never holds a secret: key ids, fingerprints and
//! times only. The regeneration budget lives here too, so it holds across restarts and between the CLI
//! and the daemon (which cannot run at once on one `state_dir`: [`StateLock`]).
//!
//! This module is the only place a journal's phase changes: [`KeyJournal`]'s transition methods
//! (`attempt`, `issued`, `first_confirmed`, `concluded`, `failed`...) are pure, typed steps, and the
//! engine's per-key slot (`engine::slot`) is the only caller, one read-modify-write at a time.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::telemetry::{Outcome, RerotationReason};

/// Format version of the journal files. A newer keyrotd reads every older version.
pub const JOURNAL_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("state directory {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("journal {path} is not valid: {reason}")]
    Corrupt { path: String, reason: String },
    #[error(
        "another keyrotd process holds {path} (a daemon or a `keyrotd rotate` on the same state_dir); \
         stop it or point this one at another state_dir"
    )]
    Locked { path: String },
}

fn io_err(path: &Path, e: std::io::Error) -> JournalError {
    JournalError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// The phase a key's rotation is in, as recorded before each step (docs/lifecycle.md). Preflight is
/// not journaled: nothing has changed yet, so a crash there needs no recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No destructive step in flight.
    #[default]
    Idle,
    /// A regenerate may have been sent; `old_key_id` tells whether the portal acted.
    Regenerating,
    /// A new key was issued (`new_key_id`, `new_fingerprint`); no destination has confirmed it yet.
    Storing,
    /// At least one destination holds the new key; dependents are being told.
    Notify,
    /// The outcome is decided; dependents are being watched.
    Watch,
    /// Dual keys: a `create` may have been sent; `old_key_id` stays live, and `known_ids` are the ids
    /// the vendor listed before, so a key the create made can be told from the others.
    Creating,
    /// Dual keys: the new key is stored and the dependents told; each must confirm it before the old
    /// key is revoked.
    Confirming,
    /// Dual keys: `revoke_ids` are being revoked (the old key once every dependent confirmed, or the
    /// new key of a rollout that was rolled back). A revoke of a key already gone is success.
    Revoking,
    /// Dual keys: a canary failed; the old key's value is being put back in the destinations, then
    /// the new key is revoked.
    RollingBack,
}

/// What started a rotation (the audit log's `trigger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    MaxAge,
    CatchUp,
    Manual,
    Api,
    Recovery,
    Reconcile,
}

impl Trigger {
    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::MaxAge => "max_age",
            Trigger::CatchUp => "catch_up",
            Trigger::Manual => "manual",
            Trigger::Api => "api",
            Trigger::Recovery => "recovery",
            Trigger::Reconcile => "reconcile",
        }
    }

    /// Scheduled triggers wait for the window and stop while paused; the others do not.
    pub fn is_scheduled(&self) -> bool {
        matches!(self, Trigger::Schedule | Trigger::MaxAge | Trigger::CatchUp)
    }

    /// An operator asked for it (CLI or admin API).
    pub fn is_operator(&self) -> bool {
        matches!(self, Trigger::Manual | Trigger::Api)
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who asked for a rotation and why: the part of a rotation every record of it repeats.
#[derive(Debug, Clone, PartialEq)]
pub struct RotationMeta {
    pub rotation_id: Uuid,
    pub trigger: Trigger,
    /// The operator's text for manual/API rotations, else the trigger or re-rotation reason.
    pub reason: String,
    pub requested_by: String,
    pub started_at: DateTime<Utc>,
    /// Who approved it, for a rotation that waited for an approval.
    pub approved_by: Option<String>,
}

/// A due rotation waiting for an operator's approval (docs/lifecycle.md, "Approval"). Preflight
/// passed when it was asked for; nothing has been destroyed. Kept in the journal so that a restart
/// neither forgets it nor rotates without it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PendingApproval {
    pub rotation_id: Uuid,
    pub trigger: Trigger,
    pub reason: String,
    pub requested_by: String,
    pub started_at: DateTime<Utc>,
    /// When preflight passed and the approval was asked for.
    pub asked_at: DateTime<Utc>,
    /// When the rotation is skipped if nobody approved it.
    pub until: DateTime<Utc>,
}

impl PendingApproval {
    /// The rotation it belongs to, approved by `by` when it is.
    pub fn meta(&self, approved_by: Option<String>) -> RotationMeta {
        RotationMeta {
            rotation_id: self.rotation_id,
            trigger: self.trigger,
            reason: self.reason.clone(),
            requested_by: self.requested_by.clone(),
            started_at: self.started_at,
            approved_by,
        }
    }
}

/// How many invalidation windows the journal remembers (`keyrotd plan --checklist`'s "during").
pub const WINDOWS_KEPT: usize = 10;

/// How a rotation that distributed nothing usable left the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The portal refused and did not rotate: the old key still works.
    Refused,
    /// The old key is gone and no destination holds a working key: a re-rotation is owed.
    Lost,
    /// A regenerate's outcome is unknown and the portal could not be asked: the journal stays at
    /// `regenerating` so recovery resolves it once the portal answers.
    Unresolved,
    /// The new key was stored but the portal no longer accepts it (someone rotated meanwhile), and
    /// keyrotd may not re-rotate by itself: reported as drift.
    Drift,
}

/// What a key's journal holds. Every field is public information: ids, fingerprints, times.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct KeyJournal {
    pub version: u32,
    pub key: String,
    /// Written only by this module's transitions.
    pub phase: Phase,
    /// The rotation the phase belongs to.
    pub rotation_id: Option<Uuid>,
    pub trigger: Option<Trigger>,
    pub reason: Option<String>,
    pub requested_by: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    /// The provider's key id before the regenerate (phase `regenerating`).
    pub old_key_id: Option<String>,
    /// The key just issued (phases `storing` onwards).
    pub new_key_id: Option<String>,
    pub new_fingerprint: Option<String>,
    /// When the new key was issued (the regenerate response).
    pub issued_at: Option<DateTime<Utc>>,
    /// The active key as keyrotd knows it: issued by it or adopted from a destination.
    pub active_key_id: Option<String>,
    pub active_fingerprint: Option<String>,
    /// The scheduled occurrence (cron time, not wall time) of the last scheduled run: catch-up's anchor.
    pub last_scheduled_run: Option<DateTime<Utc>>,
    pub last_outcome: Option<Outcome>,
    pub last_finished_at: Option<DateTime<Utc>>,
    /// Regenerate calls that may have destroyed a key, in the last 24h (pruned on write).
    pub regenerations: Vec<DateTime<Utc>>,
    /// Re-rotations since the last rotation that ended served (success/degraded).
    pub rerotations_in_row: u32,
    /// The key was lost (no destination confirmed it): a re-rotation is owed once a store is writable.
    pub lost: bool,
    /// A due rotation waiting for an operator's approval.
    pub pending_approval: Option<Box<PendingApproval>>,
    /// The invalidation windows of the last rotations that distributed a key, in milliseconds,
    /// oldest first (at most [`WINDOWS_KEPT`]).
    pub windows_ms: Vec<u64>,
    /// The rotation in flight keeps its old key live until the new one is confirmed (a dual
    /// provider): `storing` then means "the old key still works".
    pub overlap: bool,
    /// Phase `creating`: the key ids the vendor listed before the create.
    pub known_ids: Vec<String>,
    /// Phase `revoking`: the ids being revoked.
    pub revoke_ids: Vec<String>,
    /// Old keys still live after their rotation ended, kept for dependents that did not confirm.
    pub pending_revoke: Vec<String>,
    /// Dependents that had not confirmed the newest key when its rotation ended.
    pub unconfirmed: Vec<String>,
    /// When the newest key was created while an older one stays live (the overlap's start).
    pub overlap_since: Option<DateTime<Utc>>,
    /// `revoke_after`: when `pending_revoke` is revoked even if a dependent never confirmed.
    pub revoke_due: Option<DateTime<Utc>>,
    /// Drift was reported and no look has seen the key in sync since: a restart shows it (metric,
    /// `/v1/keys`) before its first look. Set by a rotation's end (`failed` with drift, or a
    /// conclusion some destination did not confirm) in the same write, otherwise written on its own
    /// only when it changes; absent means false.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub drift: bool,
}

impl Default for KeyJournal {
    fn default() -> Self {
        KeyJournal {
            version: JOURNAL_VERSION,
            key: String::new(),
            phase: Phase::Idle,
            rotation_id: None,
            trigger: None,
            reason: None,
            requested_by: None,
            started_at: None,
            old_key_id: None,
            new_key_id: None,
            new_fingerprint: None,
            issued_at: None,
            active_key_id: None,
            active_fingerprint: None,
            last_scheduled_run: None,
            last_outcome: None,
            last_finished_at: None,
            regenerations: Vec::new(),
            rerotations_in_row: 0,
            lost: false,
            pending_approval: None,
            windows_ms: Vec::new(),
            overlap: false,
            known_ids: Vec::new(),
            revoke_ids: Vec::new(),
            pending_revoke: Vec::new(),
            unconfirmed: Vec::new(),
            overlap_since: None,
            revoke_due: None,
            drift: false,
        }
    }
}

/// The journal's transitions. Each is one typed step of the lifecycle; none does I/O.
impl KeyJournal {
    pub fn new(key: &str) -> Self {
        KeyJournal {
            key: key.to_string(),
            ..Default::default()
        }
    }

    /// Regenerate calls in the 24 hours before `now`.
    pub fn regenerations_since(&self, now: DateTime<Utc>) -> usize {
        let day_ago = now - chrono::Duration::hours(24);
        self.regenerations.iter().filter(|t| **t > day_ago).count()
    }

    /// True when another regenerate would exceed `max_per_day`.
    pub fn budget_spent(&self, now: DateTime<Utc>, max_per_day: u32) -> bool {
        self.regenerations_since(now) >= max_per_day as usize
    }

    fn prune(&mut self, now: DateTime<Utc>) {
        let day_ago = now - chrono::Duration::hours(24);
        self.regenerations.retain(|t| *t > day_ago);
    }

    fn belong_to(&mut self, meta: &RotationMeta) {
        self.rotation_id = Some(meta.rotation_id);
        self.trigger = Some(meta.trigger);
        self.reason = Some(meta.reason.clone());
        self.requested_by = Some(meta.requested_by.clone());
        self.started_at = Some(meta.started_at);
    }

    /// A regenerate is about to be sent (`at`): phase `regenerating` with the old key id, and the call
    /// counted in the budget, both on disk before the request leaves.
    pub fn attempt(&mut self, meta: &RotationMeta, old_key_id: Option<String>, at: DateTime<Utc>) {
        self.belong_to(meta);
        self.phase = Phase::Regenerating;
        self.old_key_id = old_key_id;
        self.new_key_id = None;
        self.new_fingerprint = None;
        self.overlap = false;
        self.regenerations.push(at);
    }

    /// Dual keys: a `create` is about to be sent (`at`), keeping `old_key_id` live; `known_ids` are
    /// the ids the vendor listed before. Counted in the daily budget like a regenerate.
    pub fn creating(
        &mut self,
        meta: &RotationMeta,
        old_key_id: Option<String>,
        known_ids: Vec<String>,
        at: DateTime<Utc>,
    ) {
        self.belong_to(meta);
        self.phase = Phase::Creating;
        self.old_key_id = old_key_id;
        self.new_key_id = None;
        self.new_fingerprint = None;
        self.overlap = true;
        self.known_ids = known_ids;
        self.revoke_ids.clear();
        self.regenerations.push(at);
    }

    /// Dual keys: the vendor created `key_id` at `at` while the old key stays live: phase `storing`.
    pub fn created(&mut self, key_id: &str, fingerprint: &str, at: DateTime<Utc>) {
        self.issued(key_id, fingerprint, at);
        self.overlap = true;
        self.overlap_since.get_or_insert(at);
    }

    /// Dual keys: stored and told; the dependents' confirmations are awaited.
    pub fn confirming(&mut self) {
        self.phase = Phase::Confirming;
    }

    /// Dual keys: `ids` are about to be revoked.
    pub fn revoking(&mut self, ids: Vec<String>) {
        self.phase = Phase::Revoking;
        self.revoke_ids = ids;
    }

    /// Dual keys: `ids` are revoked (or were already gone). Once no old key is left, the overlap is
    /// over.
    pub fn revoked(&mut self, ids: &[String]) {
        self.revoke_ids.retain(|id| !ids.contains(id));
        if self.phase == Phase::Revoking && self.revoke_ids.is_empty() && !self.overlap {
            // A revoke outside any rotation (revoke_after): nothing else is in flight.
            self.phase = Phase::Idle;
        }
        self.pending_revoke.retain(|id| !ids.contains(id));
        if self.pending_revoke.is_empty() {
            self.overlap_since = None;
            self.revoke_due = None;
            self.unconfirmed.clear();
        }
    }

    /// Dual keys: the rotation ended with `old` still live for the `unconfirmed` dependents, to be
    /// revoked at `due` (`revoke_after`) or once a later rotation is confirmed by everyone.
    pub fn kept(&mut self, old: Vec<String>, unconfirmed: Vec<String>, due: Option<DateTime<Utc>>) {
        for id in old {
            if !self.pending_revoke.contains(&id) {
                self.pending_revoke.push(id);
            }
        }
        self.unconfirmed = unconfirmed;
        self.revoke_due = due;
    }

    /// Dual keys: a canary failed; the old value goes back into the destinations.
    pub fn rolling_back(&mut self) {
        self.phase = Phase::RollingBack;
    }

    /// Dual keys: the rollout of `meta` was rolled back: the old key is the active one again, in
    /// every destination, and the new key is revoked.
    pub fn rolled_back(&mut self, meta: &RotationMeta, at: DateTime<Utc>) {
        self.phase = Phase::Idle;
        self.revoke_ids.clear();
        if self.pending_revoke.is_empty() {
            self.overlap_since = None;
        }
        self.finished(Outcome::Aborted, Some(meta.trigger), at);
    }

    /// The regenerate sent at `sent_at` is known not to have destroyed a key (refused, rate limited,
    /// not sent): it comes off the budget.
    pub fn not_sent(&mut self, sent_at: DateTime<Utc>) {
        self.regenerations.retain(|t| *t != sent_at);
    }

    /// One more re-rotation in a row.
    pub fn rerotating(&mut self) {
        self.rerotations_in_row += 1;
    }

    /// The portal issued `key_id` (fingerprint `fingerprint`) at `at`: phase `storing`.
    pub fn issued(&mut self, key_id: &str, fingerprint: &str, at: DateTime<Utc>) {
        self.phase = Phase::Storing;
        self.new_key_id = Some(key_id.to_string());
        self.new_fingerprint = Some(fingerprint.to_string());
        self.issued_at = Some(at);
    }

    /// The first destination confirmed the new key: phase `notify` (a crash now copies, not re-rotates).
    /// A dual rotation stays at `storing` until its dependents are told (`confirming`): its old key
    /// still works, and recovery decides from the destinations.
    pub fn first_confirmed(&mut self) {
        if self.phase == Phase::Storing && !self.overlap {
            self.phase = Phase::Notify;
        }
    }

    /// Recovery or reconcile resumes at `notify` with a key a destination already holds.
    pub fn resumed(&mut self, meta: &RotationMeta, key_id: &str, fingerprint: &str) {
        self.belong_to(meta);
        self.phase = Phase::Notify;
        self.new_key_id = Some(key_id.to_string());
        self.new_fingerprint = Some(fingerprint.to_string());
    }

    fn finished(&mut self, outcome: Outcome, trigger: Option<Trigger>, at: DateTime<Utc>) {
        // The rotation is over: a later revoke (revoke_after) is not part of it.
        self.overlap = false;
        self.last_outcome = Some(outcome);
        self.last_finished_at = Some(at);
        if trigger.is_some_and(|t| t.is_scheduled()) {
            self.last_scheduled_run = Some(at);
        }
    }

    /// A rotation that distributed `key_id` ended with `outcome` (success or degraded): it is the
    /// active key now; phase `watch` while dependents are watched, else `idle`.
    pub fn concluded(
        &mut self,
        outcome: Outcome,
        key_id: &str,
        fingerprint: &str,
        watch: bool,
        at: DateTime<Utc>,
    ) {
        self.phase = if watch { Phase::Watch } else { Phase::Idle };
        self.active_key_id = Some(key_id.to_string());
        self.active_fingerprint = Some(fingerprint.to_string());
        self.rerotations_in_row = 0;
        self.lost = false;
        self.finished(outcome, self.trigger, at);
    }

    /// Preflight stopped the rotation of `meta` before anything was destroyed.
    pub fn aborted(&mut self, meta: &RotationMeta, at: DateTime<Utc>) {
        self.finished(Outcome::Aborted, Some(meta.trigger), at);
    }

    /// The rotation of `meta` ended `failed`, leaving the key as `how` says.
    pub fn failed(&mut self, meta: &RotationMeta, how: Failure, at: DateTime<Utc>) {
        match how {
            Failure::Refused => self.phase = Phase::Idle,
            Failure::Drift => {
                self.phase = Phase::Idle;
                self.drift = true;
            }
            Failure::Lost => {
                self.phase = Phase::Idle;
                self.lost = true;
            }
            Failure::Unresolved => {}
        }
        self.finished(Outcome::Failed, Some(meta.trigger), at);
    }

    /// The watch of `rotation_id` ended; a newer rotation's phase is left alone.
    pub fn watch_over(&mut self, rotation_id: Uuid) {
        if self.phase == Phase::Watch && self.rotation_id == Some(rotation_id) {
            self.phase = Phase::Idle;
        }
    }

    /// Recovery found that an interrupted regenerate (or a dual key's create, whose key if any is
    /// revoked) changed nothing.
    pub fn cleared(&mut self) {
        if matches!(self.phase, Phase::Regenerating | Phase::Creating) {
            self.phase = Phase::Idle;
        }
    }

    /// Recovery revoked the new key of an interrupted dual rotation nobody holds: the old key is
    /// the active one, as before.
    pub fn abandoned(&mut self) {
        let dual = matches!(
            self.phase,
            Phase::Storing | Phase::Confirming | Phase::Creating | Phase::Revoking
        );
        if dual && self.overlap {
            self.phase = Phase::Idle;
            if self.pending_revoke.is_empty() {
                self.overlap_since = None;
            }
        }
    }

    /// A value found in a destination authenticates as the active key: remember it.
    pub fn adopted(&mut self, key_id: Option<String>, fingerprint: &str) {
        self.active_key_id = key_id;
        self.active_fingerprint = Some(fingerprint.to_string());
    }

    /// A due rotation of `meta` passed preflight at `asked_at` and waits for approval until `until`.
    pub fn awaiting_approval(
        &mut self,
        meta: &RotationMeta,
        asked_at: DateTime<Utc>,
        until: DateTime<Utc>,
    ) {
        self.pending_approval = Some(Box::new(PendingApproval {
            rotation_id: meta.rotation_id,
            trigger: meta.trigger,
            reason: meta.reason.clone(),
            requested_by: meta.requested_by.clone(),
            started_at: meta.started_at,
            asked_at,
            until,
        }));
    }

    /// The pending rotation was approved: it runs now (its records name the approver).
    pub fn approved(&mut self) {
        self.pending_approval = None;
    }

    /// The pending rotation ended without rotating at `at`, outcome `skipped`: nobody approved it in
    /// time, or another rotation of the key overtook it. The schedule moves on from it.
    pub fn approval_ended(&mut self, at: DateTime<Utc>) {
        if let Some(p) = self.pending_approval.take() {
            self.finished(Outcome::Skipped, Some(p.trigger), at);
        }
    }

    /// A rotation's invalidation window, remembered for the next rotation's checklist.
    pub fn window_observed(&mut self, window: std::time::Duration) {
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        self.windows_ms.push(ms);
        let excess = self.windows_ms.len().saturating_sub(WINDOWS_KEPT);
        self.windows_ms.drain(..excess);
    }

    /// keyrotd has never issued nor adopted this key (first contact): no active key known, none
    /// issued, nothing owed, nothing in flight.
    pub fn is_first_contact(&self) -> bool {
        self.active_fingerprint.is_none()
            && self.new_key_id.is_none()
            && !self.lost
            && self.phase == Phase::Idle
    }

    /// Why recovery owes this key a re-rotation, if it does: the key was lost.
    pub fn owes_rerotation(&self) -> Option<RerotationReason> {
        (self.phase == Phase::Idle && self.lost).then_some(RerotationReason::LostBeforeStorage)
    }
}

/// Parses a journal file's bytes. Pure: the fuzz target and [`Journal::load`] share it.
pub fn parse(bytes: &[u8]) -> Result<KeyJournal, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// The journal directory of one `state_dir`.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens (creating) `<state_dir>/journal`.
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let dir = state_dir.join("journal");
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        Ok(Journal { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// The key's journal; a fresh one when the key has none yet. A journal that is a link, not a
    /// regular file, or larger than [`MAX_JOURNAL`] is not valid (it is set aside like one that does
    /// not parse): a link placed in the state dir must not make keyrotd act on another file, or read
    /// `/dev/zero` until memory runs out.
    pub fn load(&self, key: &str) -> Result<KeyJournal, JournalError> {
        let path = self.path(key);
        let corrupt = |reason: String| JournalError::Corrupt {
            path: path.display().to_string(),
            reason,
        };
        match read_regular(&path) {
            Ok(Some(bytes)) => parse(&bytes).map_err(corrupt),
            Ok(None) => Ok(KeyJournal::new(key)),
            Err(ReadProblem::NotRegular(why)) => Err(corrupt(why)),
            Err(ReadProblem::Io(e)) => Err(io_err(&path, e)),
        }
    }

    /// Moves an unreadable journal aside (never overwritten: an operator may need it) and returns
    /// where it went.
    pub fn set_aside(&self, key: &str, now: DateTime<Utc>) -> Result<PathBuf, JournalError> {
        let path = self.path(key);
        let aside = self.dir.join(format!(
            "{key}.json.corrupt-{}",
            now.format("%Y%m%dT%H%M%S%.3fZ")
        ));
        std::fs::rename(&path, &aside).map_err(|e| io_err(&path, e))?;
        Ok(aside)
    }

    /// Writes the key's journal durably: temp file, fsync, rename, fsync the directory.
    pub fn store(&self, journal: &KeyJournal, now: DateTime<Utc>) -> Result<(), JournalError> {
        let mut j = journal.clone();
        j.version = JOURNAL_VERSION;
        j.prune(now);
        let bytes = serde_json::to_vec_pretty(&j).map_err(|e| JournalError::Corrupt {
            path: self.path(&j.key).display().to_string(),
            reason: e.to_string(),
        })?;
        write_atomic(&self.path(&j.key), &bytes, 0o600)
    }

    /// Proves a journal can be written now (preflight): creates, fsyncs and removes a probe file.
    pub fn probe_writable(&self) -> Result<(), JournalError> {
        let probe = self
            .dir
            .join(format!(".probe.{}.tmp", Uuid::new_v4().simple()));
        let result = (|| {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)?;
            f.sync_all()?;
            std::fs::remove_file(&probe)
        })();
        result.map_err(|e| io_err(&self.dir, e))
    }
}

/// The largest journal file read. A journal holds ids, fingerprints and a day's regenerate times: a
/// few kilobytes.
pub const MAX_JOURNAL: u64 = 1 << 20;

enum ReadProblem {
    /// A link, a device, a FIFO, a directory or an oversized file: never read as a journal.
    NotRegular(String),
    Io(std::io::Error),
}

/// A regular file's bytes, opened without following a link or blocking on a FIFO, at most
/// [`MAX_JOURNAL`]; `None` when there is no such file.
fn read_regular(path: &Path) -> Result<Option<Vec<u8>>, ReadProblem> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(ReadProblem::NotRegular(
                "it is a symbolic link; keyrotd does not follow links in its state dir".into(),
            ));
        }
        Err(e) => return Err(ReadProblem::Io(e)),
    };
    let md = file.metadata().map_err(ReadProblem::Io)?;
    if !md.is_file() {
        return Err(ReadProblem::NotRegular("it is not a regular file".into()));
    }
    let too_large = || ReadProblem::NotRegular(format!("it is larger than {MAX_JOURNAL} bytes"));
    if md.len() > MAX_JOURNAL {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(md.len() as usize);
    file.take(MAX_JOURNAL + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadProblem::Io)?;
    if bytes.len() as u64 > MAX_JOURNAL {
        return Err(too_large());
    }
    Ok(Some(bytes))
}

/// Durable replace of a file: temp in the same directory, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), JournalError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", Uuid::new_v4().simple()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| io_err(path, e))
}

/// An exclusive lock on a `state_dir`, held for the life of the process (daemon or CLI rotation).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes `<state_dir>/keyrotd.lock` without waiting; [`JournalError::Locked`] when held elsewhere.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, JournalError> {
        std::fs::create_dir_all(state_dir).map_err(|e| io_err(state_dir, e))?;
        let path = state_dir.join("keyrotd.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        match file.try_lock() {
            Ok(()) => {
                let mut f = &file;
                let _ = f.set_len(0);
                let _ = writeln!(f, "{}", std::process::id());
                Ok(StateLock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => Err(JournalError::Locked {
                path: path.display().to_string(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path, e)),
        }
    }
}

/// The audit log's `event` (docs/metrics.md, "Audit log").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditEvent {
    Started,
    Aborted,
    Regenerated,
    Stored,
    Verified,
    Notified,
    Finished,
    Rerotation,
    Drift,
    Recovered,
    PendingApproval,
    Approved,
    /// Dual keys: the vendor created the new key (the old one stays live).
    Created,
    /// Dual keys: a dependent confirmed the new key.
    Confirmed,
    /// Dual keys: a key was revoked (`detail` says why: confirmed by all, `revoke_after`, a
    /// rollback, a key a lost create made).
    Revoked,
    /// Dual keys: a canary failed and the old key was put back.
    RolledBack,
}

/// One line of `audit.jsonl`. No secret: `fingerprint` is the 12-hex-digit prefix. Built only by the
/// named constructors below, so every record of one kind carries the same fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub ts: DateTime<Utc>,
    pub key: String,
    pub rotation_id: Option<Uuid>,
    pub event: AuditEvent,
    pub trigger: Option<Trigger>,
    pub reason: Option<String>,
    pub requested_by: Option<String>,
    pub outcome: Option<Outcome>,
    pub old_key_id: Option<String>,
    pub new_key_id: Option<String>,
    pub fingerprint: Option<String>,
    pub detail: Option<String>,
    /// The key's owner (its `owner.name`), on every record of a key that has one.
    pub owner: Option<String>,
    /// Who approved the rotation, for a rotation that waited for an approval.
    pub approved_by: Option<String>,
}

/// The key ids and fingerprint a record names.
#[derive(Debug, Clone, Default)]
pub struct Keys<'a> {
    pub old_key_id: Option<&'a str>,
    pub new_key_id: Option<&'a str>,
    pub fingerprint: Option<&'a str>,
}

impl AuditRecord {
    fn of(key: &str, meta: Option<&RotationMeta>, event: AuditEvent, at: DateTime<Utc>) -> Self {
        AuditRecord {
            ts: at,
            key: key.to_string(),
            rotation_id: meta.map(|m| m.rotation_id),
            event,
            trigger: meta.map(|m| m.trigger),
            reason: meta.map(|m| m.reason.clone()),
            requested_by: meta.map(|m| m.requested_by.clone()),
            outcome: None,
            old_key_id: None,
            new_key_id: None,
            fingerprint: None,
            detail: None,
            owner: None,
            approved_by: meta.and_then(|m| m.approved_by.clone()),
        }
    }

    fn keys(mut self, keys: Keys<'_>) -> Self {
        self.old_key_id = keys.old_key_id.map(Into::into);
        self.new_key_id = keys.new_key_id.map(Into::into);
        self.fingerprint = keys.fingerprint.map(Into::into);
        self
    }

    fn detail(mut self, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        self.detail = (!detail.is_empty()).then_some(detail);
        self
    }

    pub fn started(key: &str, meta: &RotationMeta) -> Self {
        Self::of(key, Some(meta), AuditEvent::Started, meta.started_at)
    }

    pub fn aborted(
        key: &str,
        meta: &RotationMeta,
        old_key_id: Option<&str>,
        why: &str,
        at: DateTime<Utc>,
    ) -> Self {
        let mut r = Self::of(key, Some(meta), AuditEvent::Aborted, at)
            .keys(Keys {
                old_key_id,
                ..Keys::default()
            })
            .detail(why);
        r.outcome = Some(Outcome::Aborted);
        r
    }

    pub fn rerotation(
        key: &str,
        meta: &RotationMeta,
        old_key_id: Option<&str>,
        reason: RerotationReason,
        at: DateTime<Utc>,
    ) -> Self {
        Self::of(key, Some(meta), AuditEvent::Rerotation, at)
            .keys(Keys {
                old_key_id,
                ..Keys::default()
            })
            .detail(reason.as_str())
    }

    pub fn regenerated(key: &str, meta: &RotationMeta, keys: Keys<'_>, at: DateTime<Utc>) -> Self {
        Self::of(key, Some(meta), AuditEvent::Regenerated, at).keys(keys)
    }

    /// Dual keys: the vendor created the new key; the old one stays live.
    pub fn created(key: &str, meta: &RotationMeta, keys: Keys<'_>, at: DateTime<Utc>) -> Self {
        Self::of(key, Some(meta), AuditEvent::Created, at).keys(keys)
    }

    /// `stored` (one per confirmed destination, `what` names it), `notified` (one per dependent that
    /// answered) or `verified`.
    pub fn step(
        key: &str,
        meta: &RotationMeta,
        event: AuditEvent,
        keys: Keys<'_>,
        what: &str,
        at: DateTime<Utc>,
    ) -> Self {
        Self::of(key, Some(meta), event, at).keys(keys).detail(what)
    }

    pub fn finished(
        key: &str,
        meta: &RotationMeta,
        outcome: Outcome,
        keys: Keys<'_>,
        summary: &str,
        at: DateTime<Utc>,
    ) -> Self {
        let mut r = Self::of(key, Some(meta), AuditEvent::Finished, at)
            .keys(keys)
            .detail(summary);
        r.outcome = Some(outcome);
        r
    }

    /// A rotation resumed from storage (copy and notify) ended with `outcome`.
    pub fn recovered(
        key: &str,
        meta: &RotationMeta,
        outcome: Outcome,
        keys: Keys<'_>,
        summary: &str,
        at: DateTime<Utc>,
    ) -> Self {
        let mut r = Self::of(key, Some(meta), AuditEvent::Recovered, at)
            .keys(keys)
            .detail(summary);
        r.outcome = Some(outcome);
        r
    }

    /// A due rotation passed preflight and waits for an operator's approval until `until`.
    pub fn pending_approval(
        key: &str,
        meta: &RotationMeta,
        old_key_id: Option<&str>,
        until: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Self {
        Self::of(key, Some(meta), AuditEvent::PendingApproval, at)
            .keys(Keys {
                old_key_id,
                ..Keys::default()
            })
            .detail(format!(
                "preflight passed; waiting for an approval until {}",
                until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ))
    }

    /// An operator approved the pending rotation (`meta.approved_by`), for `why`.
    pub fn approved(key: &str, meta: &RotationMeta, why: &str, at: DateTime<Utc>) -> Self {
        Self::of(key, Some(meta), AuditEvent::Approved, at).detail(why)
    }

    /// Recovery found that a journaled rotation's new key died with the process.
    pub fn crash_found(journal: &KeyJournal, reason: RerotationReason, at: DateTime<Utc>) -> Self {
        let mut r = Self::of(&journal.key, None, AuditEvent::Recovered, at)
            .keys(Keys {
                old_key_id: journal.old_key_id.as_deref(),
                new_key_id: journal.new_key_id.as_deref(),
                fingerprint: None,
            })
            .detail(format!(
                "journal phase {}: the new key died with the process",
                phase_name(journal.phase)
            ));
        r.rotation_id = journal.rotation_id;
        r.trigger = Some(Trigger::Recovery);
        r.reason = Some(reason.as_str().into());
        r
    }

    /// Dual keys: `key_id` was revoked, `why` says why. `meta` is the rotation that revoked it, if one
    /// did (a revoke forced by `revoke_after` runs outside any rotation).
    pub fn revoked(
        key: &str,
        meta: Option<&RotationMeta>,
        key_id: &str,
        why: &str,
        at: DateTime<Utc>,
    ) -> Self {
        Self::of(key, meta, AuditEvent::Revoked, at)
            .keys(Keys {
                old_key_id: Some(key_id),
                ..Keys::default()
            })
            .detail(why)
    }

    /// Drift seen by reconcile or the watch (`rotation_id` when a watch saw it).
    pub fn drift(
        key: &str,
        rotation_id: Option<Uuid>,
        active: Keys<'_>,
        detail: &str,
        at: DateTime<Utc>,
    ) -> Self {
        let mut r = Self::of(key, None, AuditEvent::Drift, at)
            .keys(active)
            .detail(detail);
        r.rotation_id = rotation_id;
        r.trigger = Some(Trigger::Reconcile);
        r.reason = Some(RerotationReason::Drift.as_str().into());
        r
    }
}

/// The journal's name of a phase (as written in the file).
pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Idle => "idle",
        Phase::Regenerating => "regenerating",
        Phase::Storing => "storing",
        Phase::Notify => "notify",
        Phase::Watch => "watch",
        Phase::Creating => "creating",
        Phase::Confirming => "confirming",
        Phase::Revoking => "revoking",
        Phase::RollingBack => "rolling_back",
    }
}

/// The append-only audit log, fsynced per record.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: std::sync::Mutex<File>,
}

impl AuditLog {
    pub fn open(state_dir: &Path) -> Result<AuditLog, JournalError> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(state_dir).map_err(|e| io_err(state_dir, e))?;
        let path = state_dir.join("audit.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        Ok(AuditLog {
            path,
            file: std::sync::Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and fsyncs it.
    pub fn append(&self, record: &AuditRecord) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(record).map_err(|e| JournalError::Corrupt {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })?;
        line.push(b'\n');
        // A poisoned lock only means another append panicked; the file handle is still good.
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&line)
            .and_then(|_| f.sync_data())
            .map_err(|e| io_err(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(trigger: Trigger) -> RotationMeta {
        RotationMeta {
            rotation_id: Uuid::new_v4(),
            trigger,
            reason: trigger.as_str().into(),
            requested_by: "test".into(),
            started_at: Utc::now(),
            approved_by: None,
        }
    }

    #[test]
    fn journal_round_trips_and_defaults_for_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let fresh = j.load("billing").unwrap();
        assert_eq!(fresh.phase, Phase::Idle);
        assert_eq!(fresh.key, "billing");

        let mut rec = fresh.clone();
        let now = Utc::now();
        rec.attempt(&meta(Trigger::Manual), Some("ak_1".into()), now);
        rec.issued("ak_2", "0123456789ab", now);
        j.store(&rec, now).unwrap();
        let back = j.load("billing").unwrap();
        assert_eq!(back, rec);
        assert_eq!(back.phase, Phase::Storing);
    }

    #[test]
    fn old_regenerations_are_pruned_and_not_counted() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let now = Utc::now();
        let mut rec = KeyJournal::new("k");
        rec.regenerations = vec![
            now - chrono::Duration::hours(30),
            now - chrono::Duration::hours(2),
            now,
        ];
        assert_eq!(rec.regenerations_since(now), 2);
        assert!(rec.budget_spent(now, 2));
        assert!(!rec.budget_spent(now, 3));
        j.store(&rec, now).unwrap();
        assert_eq!(j.load("k").unwrap().regenerations.len(), 2);
    }

    #[test]
    fn a_corrupt_journal_is_an_error_naming_the_file_and_can_be_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("journal/k.json"), b"{not json").unwrap();
        let e = j.load("k").unwrap_err().to_string();
        assert!(e.contains("k.json"), "{e}");
        let aside = j.set_aside("k", Utc::now()).unwrap();
        assert!(aside.exists());
        assert_eq!(std::fs::read(&aside).unwrap(), b"{not json");
        assert_eq!(j.load("k").unwrap().phase, Phase::Idle);
    }

    #[test]
    fn a_linked_device_or_huge_journal_is_refused_unread_and_can_be_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let file = dir.path().join("journal/k.json");
        // A link to a valid journal elsewhere is still a link: never trusted, never followed.
        let elsewhere = dir.path().join("elsewhere.json");
        std::fs::write(
            &elsewhere,
            serde_json::to_vec(&KeyJournal::new("k")).unwrap(),
        )
        .unwrap();
        for target in [Path::new("/dev/zero"), elsewhere.as_path()] {
            std::os::unix::fs::symlink(target, &file).unwrap();
            let e = j.load("k").unwrap_err().to_string();
            assert!(e.contains("symbolic link"), "{e}");
            let aside = j.set_aside("k", Utc::now()).unwrap();
            assert!(aside.is_symlink(), "the link itself is moved aside");
            std::fs::remove_file(aside).unwrap();
        }
        std::fs::File::create(&file)
            .unwrap()
            .set_len(MAX_JOURNAL + 1)
            .unwrap();
        let e = j.load("k").unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
        std::fs::remove_file(&file).unwrap();
        nix::unistd::mkfifo(&file, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = j.load("k").unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn an_unknown_trigger_or_outcome_makes_a_journal_corrupt_not_silently_empty() {
        for text in [
            r#"{"key":"k","phase":"idle","trigger":"cron"}"#,
            r#"{"key":"k","phase":"idle","last_outcome":"great"}"#,
            r#"{"key":"k","phase":"verify"}"#,
        ] {
            assert!(parse(text.as_bytes()).is_err(), "{text}");
        }
    }

    #[test]
    fn journals_written_by_the_first_release_still_load() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/journal");
        let watch =
            parse(&std::fs::read(fixtures.join("v1-watch-degraded.json")).unwrap()).unwrap();
        assert_eq!(watch.phase, Phase::Watch);
        assert_eq!(watch.trigger, Some(Trigger::Schedule));
        assert_eq!(watch.last_outcome, Some(Outcome::Degraded));
        assert_eq!(watch.active_fingerprint.as_deref(), Some("0123456789ab"));
        assert_eq!(watch.regenerations.len(), 1);

        let lost =
            parse(&std::fs::read(fixtures.join("v1-regenerating-lost.json")).unwrap()).unwrap();
        assert_eq!(lost.phase, Phase::Regenerating);
        assert_eq!(lost.trigger, Some(Trigger::Recovery));
        assert_eq!(lost.last_outcome, Some(Outcome::Failed));
        assert_eq!(lost.rerotations_in_row, 2);
        assert!(lost.lost);
        assert_eq!(lost.old_key_id.as_deref(), Some("ak_1"));
    }

    #[test]
    fn a_journal_without_newer_fields_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        std::fs::write(
            dir.path().join("journal/k.json"),
            br#"{"version":1,"key":"k","phase":"notify"}"#,
        )
        .unwrap();
        assert_eq!(j.load("k").unwrap().phase, Phase::Notify);
    }

    #[test]
    fn transitions_walk_the_lifecycle() {
        let now = Utc::now();
        let m = meta(Trigger::Schedule);
        let mut j = KeyJournal::new("k");
        j.attempt(&m, Some("ak_1".into()), now);
        assert_eq!((j.phase, j.regenerations.len()), (Phase::Regenerating, 1));
        j.not_sent(now);
        assert!(
            j.regenerations.is_empty(),
            "a refused call is off the budget"
        );
        j.attempt(&m, Some("ak_1".into()), now);
        j.issued("ak_2", "fp2", now);
        assert_eq!(j.phase, Phase::Storing);
        j.first_confirmed();
        assert_eq!(j.phase, Phase::Notify);
        j.concluded(Outcome::Success, "ak_2", "fp2", true, now);
        assert_eq!(j.phase, Phase::Watch);
        assert_eq!(j.active_key_id.as_deref(), Some("ak_2"));
        assert_eq!(j.last_scheduled_run, Some(now));
        j.watch_over(Uuid::new_v4());
        assert_eq!(
            j.phase,
            Phase::Watch,
            "another rotation's watch end changes nothing"
        );
        j.watch_over(m.rotation_id);
        assert_eq!(j.phase, Phase::Idle);
    }

    #[test]
    fn failures_leave_the_key_as_they_say() {
        let now = Utc::now();
        let m = meta(Trigger::Manual);
        for (how, phase, lost) in [
            (Failure::Refused, Phase::Idle, false),
            (Failure::Lost, Phase::Idle, true),
            (Failure::Unresolved, Phase::Regenerating, false),
            (Failure::Drift, Phase::Idle, false),
        ] {
            let mut j = KeyJournal::new("k");
            j.attempt(&m, None, now);
            j.failed(&m, how, now);
            assert_eq!((j.phase, j.lost), (phase, lost), "{how:?}");
            assert_eq!(j.last_outcome, Some(Outcome::Failed));
            assert_eq!(
                j.last_scheduled_run, None,
                "a manual rotation is no scheduled run"
            );
        }
    }

    #[test]
    fn a_dual_rotation_walks_its_own_phases_and_keeps_the_old_key_until_revoked() {
        let now = Utc::now();
        let m = meta(Trigger::Schedule);
        let mut j = KeyJournal::new("k");
        j.adopted(Some("rk_1".into()), "fp1");
        j.creating(&m, Some("rk_1".into()), vec!["rk_1".into()], now);
        assert_eq!((j.phase, j.overlap), (Phase::Creating, true));
        assert_eq!(j.regenerations.len(), 1, "a create is on the budget");
        j.created("rk_2", "fp2", now);
        assert_eq!(j.phase, Phase::Storing);
        assert_eq!(j.overlap_since, Some(now));
        j.confirming();
        assert_eq!(j.phase, Phase::Confirming);

        // One dependent never confirmed: the rotation ends with the old key kept.
        j.concluded(Outcome::Degraded, "rk_2", "fp2", false, now);
        j.kept(vec!["rk_1".into()], vec!["slow".into()], Some(now));
        assert_eq!(j.pending_revoke, vec!["rk_1".to_string()]);
        assert_eq!(j.active_key_id.as_deref(), Some("rk_2"));
        j.revoking(j.pending_revoke.clone());
        j.revoked(&["rk_1".to_string()]);
        assert!(j.pending_revoke.is_empty() && j.unconfirmed.is_empty());
        assert_eq!((j.overlap_since, j.revoke_due), (None, None));

        // A rollback leaves the old key active and ends aborted.
        j.creating(&m, Some("rk_2".into()), vec![], now);
        j.created("rk_3", "fp3", now);
        j.rolling_back();
        assert_eq!(j.phase, Phase::RollingBack);
        j.revoking(vec!["rk_3".into()]);
        j.revoked(&["rk_3".to_string()]);
        j.rolled_back(&m, now);
        assert_eq!(j.phase, Phase::Idle);
        assert_eq!(j.active_key_id.as_deref(), Some("rk_2"));
        assert_eq!(j.last_outcome, Some(Outcome::Aborted));
    }

    #[test]
    fn the_state_lock_keeps_a_second_holder_out() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        let second = StateLock::acquire(dir.path());
        assert!(matches!(second, Err(JournalError::Locked { .. })));
        drop(first);
        StateLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn audit_records_append_one_json_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        let m = meta(Trigger::Api);
        log.append(&AuditRecord::started("k", &m)).unwrap();
        log.append(&AuditRecord::finished(
            "k",
            &m,
            Outcome::Success,
            Keys::default(),
            "",
            Utc::now(),
        ))
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["event"], "started");
        assert_eq!(lines[0]["trigger"], "api");
        assert_eq!(lines[1]["event"], "finished");
        assert_eq!(lines[1]["outcome"], Outcome::Success.as_str());
        assert!(lines[1]["detail"].is_null());
    }
}
