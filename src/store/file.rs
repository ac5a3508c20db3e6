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
//! A crash between creating a temp file and renaming it leaves the secret in the temp file:
//! [`clean_stale_temp_files`] removes such files when the daemon starts.
//!
//! Links are never followed: a destination path (or a directory under `dir` on the way to it) that is
//! a symbolic link is refused, and files are opened with `O_NOFOLLOW`. Otherwise a link placed in the
//! directory would make keyrotd read any file it can (and, on adoption, send it to the portal as a
//! key), or read `/dev/zero` until memory runs out. Reads are capped at [`MAX_FILE`] bytes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use nix::libc;
use zeroize::Zeroizing;

use super::{StoreError, StoreErrorKind, StoredValue, WriteRequest};
use crate::config::{Config, DestinationTarget, FileStoreConfig, StoreConfig};
use crate::secret::{Secret, fingerprint_bytes};

/// The largest destination or sidecar file read. A key is a few dozen bytes.
pub const MAX_FILE: u64 = 1 << 20;
/// The infix of a value's temp file name (`.<file>.keyrotd-tmp-<uuid>`).
const TEMP_INFIX: &str = ".keyrotd-tmp-";
/// The prefix of a preflight probe file's name.
const PROBE_PREFIX: &str = ".keyrotd-preflight-";
/// What the preflight probe writes: more than a key and its sidecar take.
const PROBE_BYTES: usize = 4096;

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

    /// [`Self::resolve`], then refuses a path of which any part below `dir` is a symbolic link.
    fn resolve_no_links(&self, t: &DestinationTarget) -> Result<(String, PathBuf), StoreError> {
        let (label, path) = self.resolve(t)?;
        if let Some(link) = first_link_below(&self.dir, &path) {
            return Err(self.err(
                StoreErrorKind::Permanent,
                &label,
                format!(
                    "{} is a symbolic link: keyrotd does not follow links in a file store; replace it with a regular file or directory",
                    link.display()
                ),
            ));
        }
        Ok((label, path))
    }

    /// The directory exists and a file can be created in it (a probe file is created and removed).
    pub async fn preflight(&self, t: &DestinationTarget) -> Result<(), StoreError> {
        let (label, path) = self.resolve_no_links(t)?;
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
        let (label, path) = self.resolve_no_links(t)?;
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
        let (label, path) = self.resolve_no_links(t)?;
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
    parent_of(path).join(format!(".{base}{TEMP_INFIX}{}", uuid::Uuid::new_v4()))
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
    let probe = dir.join(format!("{PROBE_PREFIX}{}", uuid::Uuid::new_v4()));
    // A block of zeros, written through: an empty file can still be created on a full disk, and the
    // write that follows the regenerate must not be the first to find out.
    let written = open_private(&probe).and_then(|mut f| {
        let filled = f.write_all(&[0u8; PROBE_BYTES]).and_then(|()| f.sync_all());
        if filled.is_err() {
            let _ = std::fs::remove_file(&probe);
        }
        filled
    });
    match written {
        Ok(()) => {
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

/// The first path from `dir` (exclusive) down to `path` (inclusive) that is a symbolic link.
fn first_link_below(dir: &Path, path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix(dir).ok()?;
    let mut here = dir.to_path_buf();
    for c in rel.components() {
        here.push(c);
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => return Some(here),
            Ok(_) => {}
            Err(_) => return None, // missing from here on: nothing to follow
        }
    }
    None
}

/// Opens an existing file for reading without following a link and without blocking on a FIFO,
/// checks that it is a regular file, and reads at most [`MAX_FILE`] bytes into a buffer wiped on drop.
/// `Ok(None)` when the file does not exist.
pub(crate) fn read_regular_capped(path: &Path) -> BlockingResult<Option<Zeroizing<Vec<u8>>>> {
    use std::io::Read;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err((
                StoreErrorKind::Permanent,
                "the file is a symbolic link: keyrotd does not follow links in a file store".into(),
            ));
        }
        Err(e) => return Err(io_err("cannot open file", &e)),
    };
    let md = file
        .metadata()
        .map_err(|e| io_err("cannot stat file", &e))?;
    if !md.is_file() {
        return Err((
            StoreErrorKind::Permanent,
            "not a regular file (a device, FIFO or directory is never read as a key)".into(),
        ));
    }
    if md.len() > MAX_FILE {
        return Err((
            StoreErrorKind::Permanent,
            format!("file is larger than {MAX_FILE} bytes: not a key"),
        ));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(md.len() as usize));
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_err("cannot read file", &e))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err((
            StoreErrorKind::Permanent,
            format!("file is larger than {MAX_FILE} bytes: not a key"),
        ));
    }
    Ok(Some(bytes))
}

fn read_blocking(path: &Path) -> BlockingResult<Option<StoredValue>> {
    let Some(bytes) = read_regular_capped(path)? else {
        return Ok(None);
    };
    let fingerprint = fingerprint_bytes(&bytes);
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        (
            StoreErrorKind::Permanent,
            "file does not hold UTF-8 text".to_string(),
        )
    })?;
    let secret = Secret::from(text.to_string());
    let version = std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .map(rfc3339)
        .ok();
    // A missing, unreadable, linked or stale sidecar only means we do not know who wrote the value.
    let key_id = read_regular_capped(&sidecar_path(path))
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice::<Sidecar>(&b).ok())
        .filter(|s| s.fingerprint == fingerprint)
        .map(|s| s.key_id);
    Ok(Some(StoredValue {
        secret,
        fingerprint,
        key_id,
        version,
    }))
}

/// Removes the temp files a crash left between creating and renaming them (each may hold a secret),
/// and stray preflight probes, from the directories of every file destination in `config`. Run at
/// daemon start, under the state-dir lock, before any rotation: no write of ours is in flight.
/// Returns the files removed; failures to remove are logged and otherwise ignored.
pub fn clean_stale_temp_files(config: &Config) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for k in &config.keys {
        for d in &k.destinations {
            let (Some(StoreConfig::File(fs)), DestinationTarget::File { file }) =
                (config.stores.get(&d.store), &d.target)
            else {
                continue;
            };
            let dir = parent_of(&fs.dir.join(file));
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs.iter().flat_map(|d| clean_dir(d)).collect()
}

fn is_leftover(name: &str) -> bool {
    (name.starts_with('.') && name.contains(TEMP_INFIX)) || name.starts_with(PROBE_PREFIX)
}

fn clean_dir(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if !is_file || !is_leftover(&name.to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Cannot remove a stale temp file.")
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn store(dir: &Path) -> FileStore {
        FileStore::new(
            "local",
            &FileStoreConfig {
                dir: dir.to_path_buf(),
            },
        )
    }

    fn target(file: &str) -> DestinationTarget {
        DestinationTarget::File { file: file.into() }
    }

    fn request<'a>(secret: &'a Secret, fingerprint: &'a str) -> WriteRequest<'a> {
        WriteRequest {
            key: "billing",
            rotation_id: uuid::Uuid::nil(),
            key_id: "ak_2",
            secret,
            fingerprint,
            rotated_at: Utc::now(),
            fence: None,
        }
    }

    #[tokio::test]
    async fn a_destination_that_is_a_link_is_neither_read_nor_written() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let elsewhere = outside.path().join("other-secret");
        std::fs::write(&elsewhere, "someone-elses-secret").unwrap();
        symlink(&elsewhere, dir.path().join("key")).unwrap();
        symlink("/dev/zero", dir.path().join("zero")).unwrap();
        let s = store(dir.path());

        let e = s.read(&target("key")).await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Permanent);
        assert!(e.message.contains("symbolic link"), "{e}");
        assert!(!e.to_string().contains("someone-elses-secret"));
        // Would read forever without the link check.
        assert!(s.read(&target("zero")).await.is_err());
        assert!(s.preflight(&target("key")).await.is_err());

        let secret = Secret::from("new-key".to_string());
        let fp = crate::secret::fingerprint(&secret);
        assert!(
            s.write(&target("key"), &request(&secret, &fp))
                .await
                .is_err()
        );
        assert_eq!(
            std::fs::read_to_string(&elsewhere).unwrap(),
            "someone-elses-secret"
        );
    }

    #[tokio::test]
    async fn a_linked_directory_under_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("key"), "outside").unwrap();
        symlink(outside.path(), dir.path().join("sub")).unwrap();
        let e = store(dir.path())
            .read(&target("sub/key"))
            .await
            .unwrap_err();
        assert!(e.message.contains("symbolic link"), "{e}");
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_FILE as usize + 1]).unwrap();
        let (kind, msg) = read_regular_capped(&big).unwrap_err();
        assert_eq!(kind, StoreErrorKind::Permanent);
        assert!(msg.contains("larger than"), "{msg}");

        // A FIFO: opening it would block until a writer came; it is refused at once instead.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let (_, msg) = read_regular_capped(&fifo).unwrap_err();
        assert!(msg.contains("not a regular file"), "{msg}");

        assert!(
            read_regular_capped(&dir.path().join("none"))
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_regular_destination_still_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let secret = Secret::from("v1-key".to_string());
        let fp = crate::secret::fingerprint(&secret);
        s.write(&target("key"), &request(&secret, &fp))
            .await
            .unwrap();
        let v = s.read(&target("key")).await.unwrap().unwrap();
        assert_eq!(v.secret.expose_secret(), "v1-key");
        assert_eq!(v.key_id.as_deref(), Some("ak_2"));
    }

    #[test]
    fn temp_files_left_by_a_crash_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        let tok = dir.path().join("tok");
        std::fs::write(&tok, "t").unwrap();
        let leftover = keys.join(format!(".api{TEMP_INFIX}0b8f"));
        let probe = keys.join(format!("{PROBE_PREFIX}1234"));
        std::fs::write(&leftover, "secret-from-before-the-crash").unwrap();
        std::fs::write(&probe, "").unwrap();
        std::fs::write(keys.join("api"), "current").unwrap();
        std::fs::write(keys.join(".hidden-but-ours-not"), "x").unwrap();
        let config = crate::config::load_str(&format!(
            r#"
[providers.p]
kind = "aos"
base_url = "https://aos.example.com"
management_token = {{ file = "{tok}" }}
[stores.local]
kind = "file"
dir = "{keys}"
[[keys]]
name = "k"
provider = "p"
  [[keys.destinations]]
  store = "local"
  file = "api"
"#,
            tok = tok.display(),
            keys = keys.display()
        ))
        .unwrap();
        let mut removed = clean_stale_temp_files(&config);
        removed.sort();
        let mut want = vec![leftover.clone(), probe.clone()];
        want.sort();
        assert_eq!(removed, want);
        assert!(!leftover.exists() && !probe.exists());
        assert!(keys.join("api").exists() && keys.join(".hidden-but-ours-not").exists());
    }
}
