//! Crash-safe state on disk: one journal file per key, the state-dir lock, and the audit log.
//!
//! The journal is what makes a crash survivable. Every phase change is written *before* the step it
//! announces (temp file, fsync, rename, fsync the directory), so after a crash the last record says
//! exactly which destructive step may have happened. It never holds a secret: key ids, fingerprints and
//! times only. The regeneration budget lives here too, so it holds across restarts and between the CLI
//! and the daemon (which cannot run at once on one `state_dir`: [`StateLock`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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

/// The phase a key's rotation is in, as recorded before each step (lifecycle.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Idle,
    Regenerating,
    Storing,
    Notify,
    Verify,
    Watch,
}

/// What a key's journal holds. Every field is public information: ids, fingerprints, times.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct KeyJournal {
    pub version: u32,
    pub key: String,
    pub phase: Phase,
    /// The rotation the phase belongs to.
    pub rotation_id: Option<Uuid>,
    pub trigger: Option<String>,
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
    pub last_outcome: Option<String>,
    pub last_finished_at: Option<DateTime<Utc>>,
    /// Regenerate calls that may have destroyed a key, in the last 24h (pruned on write).
    pub regenerations: Vec<DateTime<Utc>>,
    /// Re-rotations since the last rotation that ended served (success/degraded).
    pub rerotations_in_row: u32,
    /// The key was lost (no destination confirmed it): a re-rotation is owed once a store is writable.
    pub lost: bool,
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
        }
    }
}

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

    fn prune(&mut self, now: DateTime<Utc>) {
        let day_ago = now - chrono::Duration::hours(24);
        self.regenerations.retain(|t| *t > day_ago);
    }
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

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// The key's journal; a fresh one when the key has none yet.
    pub fn load(&self, key: &str) -> Result<KeyJournal, JournalError> {
        let path = self.path(key);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let j: KeyJournal =
                    serde_json::from_slice(&bytes).map_err(|e| JournalError::Corrupt {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                Ok(j)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeyJournal::new(key)),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    /// Writes the key's journal durably: temp file, fsync, rename, fsync the directory.
    pub fn store(&self, journal: &KeyJournal) -> Result<(), JournalError> {
        let mut j = journal.clone();
        j.version = JOURNAL_VERSION;
        j.prune(Utc::now());
        let bytes = serde_json::to_vec_pretty(&j).map_err(|e| JournalError::Corrupt {
            path: self.path(&j.key).display().to_string(),
            reason: e.to_string(),
        })?;
        write_atomic(&self.path(&j.key), &bytes, 0o600)
    }
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

/// One line of `audit.jsonl` (observability.md). No secret: `fingerprint` is the 12-hex-digit prefix.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct AuditRecord {
    pub ts: DateTime<Utc>,
    pub key: String,
    pub rotation_id: Option<Uuid>,
    pub event: String,
    pub trigger: Option<String>,
    pub reason: Option<String>,
    pub requested_by: Option<String>,
    pub outcome: Option<String>,
    pub old_key_id: Option<String>,
    pub new_key_id: Option<String>,
    pub fingerprint: Option<String>,
    pub detail: Option<String>,
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

    #[test]
    fn journal_round_trips_and_defaults_for_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let fresh = j.load("billing").unwrap();
        assert_eq!(fresh.phase, Phase::Idle);
        assert_eq!(fresh.key, "billing");

        let mut rec = fresh.clone();
        rec.phase = Phase::Storing;
        rec.new_key_id = Some("ak_2".into());
        rec.regenerations.push(Utc::now());
        j.store(&rec).unwrap();
        let back = j.load("billing").unwrap();
        assert_eq!(back, rec);
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
        j.store(&rec).unwrap();
        assert_eq!(j.load("k").unwrap().regenerations.len(), 2);
    }

    #[test]
    fn a_corrupt_journal_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("journal/k.json"), b"{not json").unwrap();
        let e = j.load("k").unwrap_err().to_string();
        assert!(e.contains("k.json"), "{e}");
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
        for event in ["started", "finished"] {
            log.append(&AuditRecord {
                ts: Utc::now(),
                key: "k".into(),
                event: event.into(),
                ..Default::default()
            })
            .unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let events: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap().event)
            .collect();
        assert_eq!(events, ["started", "finished"]);
    }
}
