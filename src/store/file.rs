//! Local file destinations: one file per key under the store's `dir`, holding exactly the secret's
//! bytes (no trailing newline), mode 0600, replaced atomically; beside it a sidecar
//! `<file>.meta.json` with the key id, fingerprint, rotation id and time, for operators and replicas.
//!
//! Atomic means: a reader sees the old file or the new one, never a partial one, and a crash leaves
//! one of the two. Each file is written to a temp file in the same directory (created 0600, so the
//! secret is never readable by others even for a moment), fsynced, renamed over the target, and the
//! directory is fsynced so the rename itself survives a power cut.
//!
//! The value is written before its sidecar: a crash between the two leaves a sidecar describing the
//! previous value, which [`FileStore::read`] detects (its fingerprint no longer matches) and ignores.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::{StoreError, StoreErrorKind, StoredValue, WriteRequest};
use crate::config::{DestinationTarget, FileStoreConfig};
use crate::secret::{Secret, fingerprint_bytes};

/// The sidecar's content. Holds no secret: the fingerprint is a truncated hash.
#[derive(Debug, Serialize, Deserialize)]
struct Sidecar {
    key_id: String,
    fingerprint: String,
    rotated_at: DateTime<Utc>,
    rotation_id: String,
    /// Several replicas: the writer's fencing number for the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fence: Option<u64>,
}

pub struct FileStore {
    name: String,
    dir: PathBuf,
}

impl FileStore {
    pub fn new(name: &str, c: &FileStoreConfig) -> Self {
        Self {
            name: name.into(),
            dir: c.dir.clone(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, kind: StoreErrorKind, target: &str, message: impl Into<String>) -> StoreError {
        StoreError {
            kind,
            store: self.name.clone(),
            target: target.to_string(),
            message: message.into(),
        }
    }

    /// The absolute path of a target. Refuses anything that would leave `dir` (absolute paths, `..`):
    /// config validation should have caught it, but a file store must never write elsewhere.
    fn resolve(&self, t: &DestinationTarget) -> Result<(String, PathBuf), StoreError> {
        let DestinationTarget::File { file } = t else {
            return Err(self.err(
                StoreErrorKind::Permanent,
                &t.to_string(),
                "not a file destination (config error: the destination's kind does not match the store)",
            ));
        };
        let rel = Path::new(file);
        let safe = !file.is_empty()
            && rel
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !safe {
            return Err(self.err(
                StoreErrorKind::Permanent,
                file,
                "file must be a relative path inside the store's dir (no '..', not absolute)",
            ));
        }
        Ok((file.clone(), self.dir.join(rel)))
    }

    /// The directory exists and a file can be created in it (a probe file is created and removed).
    pub async fn preflight(&self, t: &DestinationTarget) -> Result<(), StoreError> {
        let (label, path) = self.resolve(t)?;
        let parent = parent_of(&path);
        let result = tokio::task::spawn_blocking(move || probe_dir(&parent))
            .await
            .map_err(|e| self.join_err(&label, e))?;
        result.map_err(|(kind, msg)| self.err(kind, &label, msg))
    }

    /// Writes the value atomically, then its sidecar. Returns the file's mtime (RFC 3339) as version.
    /// Idempotent: writing the same request again leaves the same bytes.
    pub async fn write(
        &self,
        t: &DestinationTarget,
        r: &WriteRequest<'_>,
    ) -> Result<Option<String>, StoreError> {
        let (label, path) = self.resolve(t)?;
        let sidecar = Sidecar {
            key_id: r.key_id.to_string(),
            fingerprint: r.fingerprint.to_string(),
            rotated_at: r.rotated_at,
            rotation_id: r.rotation_id.to_string(),
            fence: r.fence,
        };
        let meta = serde_json::to_vec_pretty(&sidecar).map_err(|e| {
            self.err(
                StoreErrorKind::Permanent,
                &label,
                format!("cannot encode sidecar: {e}"),
            )
        })?;
        let secret: Secret = r.secret.clone();
        let result = tokio::task::spawn_blocking(move || {
            atomic_write(&path, secret.expose_secret().as_bytes())?;
            atomic_write(&sidecar_path(&path), &meta)?;
            let mtime = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(|e| io_err("cannot stat the written file", &e))?;
            Ok(rfc3339(mtime))
        })
        .await
        .map_err(|e| self.join_err(&label, e))?;
        result
            .map(Some)
            .map_err(|(kind, msg)| self.err(kind, &label, msg))
    }

    /// The file's contents and fingerprint; the key id from the sidecar when the sidecar describes
    /// this very value (same fingerprint); `Ok(None)` when the file does not exist.
    pub async fn read(&self, t: &DestinationTarget) -> Result<Option<StoredValue>, StoreError> {
        let (label, path) = self.resolve(t)?;
        let result = tokio::task::spawn_blocking(move || read_blocking(&path))
            .await
            .map_err(|e| self.join_err(&label, e))?;
        result.map_err(|(kind, msg)| self.err(kind, &label, msg))
    }

    fn join_err(&self, target: &str, e: tokio::task::JoinError) -> StoreError {
        self.err(
            StoreErrorKind::Transient,
            target,
            format!("file task failed: {e}"),
        )
    }
}

type BlockingResult<T> = Result<T, (StoreErrorKind, String)>;

fn parent_of(path: &Path) -> PathBuf {
    path.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn sidecar_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".meta.json");
    PathBuf::from(s)
}

fn rfc3339(t: std::time::SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// Classifies an I/O error. The message names what was being done and the OS reason; never content.
fn io_err(what: &str, e: &std::io::Error) -> (StoreErrorKind, String) {
    use std::io::ErrorKind as K;
    let kind = match e.kind() {
        K::NotFound => StoreErrorKind::NotFound,
        K::PermissionDenied | K::ReadOnlyFilesystem => StoreErrorKind::Auth,
        // A full disk or an interrupted call may clear up; retrying is cheap.
        K::StorageFull | K::Interrupted | K::WouldBlock | K::TimedOut => StoreErrorKind::Transient,
        _ => StoreErrorKind::Permanent,
    };
    (kind, format!("{what}: {e}"))
}

/// A temp name in the same directory as `path` (same filesystem, so the rename is atomic).
fn temp_path(path: &Path) -> PathBuf {
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{base}.keyrotd-tmp-{}", uuid::Uuid::new_v4()))
}

fn open_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn atomic_write(path: &Path, bytes: &[u8]) -> BlockingResult<()> {
    let dir = parent_of(path);
    let tmp = temp_path(path);
    let written = (|| {
        let mut f = open_private(&tmp).map_err(|e| io_err("cannot create temp file", &e))?;
        f.write_all(bytes)
            .map_err(|e| io_err("cannot write temp file", &e))?;
        f.sync_all()
            .map_err(|e| io_err("cannot fsync temp file", &e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err("cannot rename temp file into place", &e))
    })();
    if written.is_err() {
        // Best effort: a leftover temp file holds a secret, so do not leave it behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    fsync_dir(&dir).map_err(|e| io_err("cannot fsync directory", &e))
}

fn probe_dir(dir: &Path) -> BlockingResult<()> {
    let md = std::fs::metadata(dir).map_err(|e| {
        let (kind, _) = io_err("", &e);
        (
            kind,
            format!("directory {} is not accessible: {e}", dir.display()),
        )
    })?;
    if !md.is_dir() {
        return Err((
            StoreErrorKind::Permanent,
            format!("{} is not a directory", dir.display()),
        ));
    }
    let probe = dir.join(format!(".keyrotd-preflight-{}", uuid::Uuid::new_v4()));
    match open_private(&probe) {
        Ok(_) => {
            std::fs::remove_file(&probe).map_err(|e| {
                io_err(&format!("cannot remove probe file {}", probe.display()), &e)
            })?;
            Ok(())
        }
        Err(e) => {
            let (kind, _) = io_err("", &e);
            Err((
                kind,
                format!("directory {} is not writable: {e}", dir.display()),
            ))
        }
    }
}

fn read_blocking(path: &Path) -> BlockingResult<Option<StoredValue>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("cannot read file", &e)),
    };
    let fingerprint = fingerprint_bytes(&bytes);
    let text = String::from_utf8(bytes).map_err(|_| {
        (
            StoreErrorKind::Permanent,
            "file does not hold UTF-8 text".to_string(),
        )
    })?;
    let version = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map(rfc3339)
        .ok();
    // A missing, unreadable or stale sidecar only means we do not know who wrote the value.
    let key_id = std::fs::read(sidecar_path(path))
        .ok()
        .and_then(|b| serde_json::from_slice::<Sidecar>(&b).ok())
        .filter(|s| s.fingerprint == fingerprint)
        .map(|s| s.key_id);
    Ok(Some(StoredValue {
        secret: Secret::from(text),
        fingerprint,
        key_id,
        version,
    }))
}
