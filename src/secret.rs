//! Secrets as a type, and the one place credentials are read from the environment or files.
//!
//! A [`Secret`] is a `secrecy::SecretString`: it has no `Display`, its `Debug` prints a redaction, it is
//! zeroized on drop, and the only way to its bytes is `expose_secret()` — so `grep expose_secret` lists
//! every place a secret is used. Values are identified everywhere else by their [`fingerprint`].

use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// A secret value: an API key, a management token, a hook signing key.
pub type Secret = SecretString;

/// The largest credential file read. Tokens are far smaller; a bigger file is a mistake (or
/// `/dev/zero`), and reading it would take the daemon's memory.
pub const MAX_CREDENTIAL_FILE: u64 = 64 * 1024;

/// Where a credential comes from. Written in TOML as `{ env = "NAME" }` or `{ file = "/path" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SecretRef {
    /// An environment variable of the keyrotd process.
    Env(String),
    /// A file (e.g. under `$CREDENTIALS_DIRECTORY`); its contents, one trailing newline stripped.
    File(PathBuf),
}

/// Why a [`SecretRef`] could not be resolved. Never holds the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretRefError {
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("environment variable {0} is empty")]
    EnvEmpty(String),
    #[error("cannot read credential file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("credential file {0} is empty")]
    FileEmpty(String),
}

/// An environment variable's name as an error may show it. A name that is not a valid variable name
/// (letters, digits and `_`, not starting with a digit) may be a credential written where its name
/// belongs (`token = { env = "hvs.…" }`): it is not quoted.
fn shown_env_name(name: &str) -> String {
    let valid = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        name.to_string()
    } else {
        "(name not shown: not a valid variable name; is a credential written where its name belongs?)"
            .to_string()
    }
}

impl SecretRef {
    /// Reads the credential now. Called at config load only.
    pub fn resolve(&self) -> Result<Secret, SecretRefError> {
        self.resolve_in(None)
    }

    /// [`resolve`](Self::resolve), reading a relative `file` from `base` (the config file's directory).
    pub fn resolve_in(&self, base: Option<&std::path::Path>) -> Result<Secret, SecretRefError> {
        match self {
            SecretRef::Env(name) => match std::env::var(name) {
                Ok(v) if v.is_empty() => Err(SecretRefError::EnvEmpty(shown_env_name(name))),
                Ok(v) => Ok(Secret::from(v)),
                Err(_) => Err(SecretRefError::EnvMissing(shown_env_name(name))),
            },
            SecretRef::File(path) => {
                let joined;
                let path = match base {
                    Some(base) if path.is_relative() => {
                        joined = base.join(path);
                        &joined
                    }
                    _ => path,
                };
                let bytes = read_credential_file(path).map_err(|reason| SecretRefError::File {
                    path: path.display().to_string(),
                    reason,
                })?;
                let text = std::str::from_utf8(&bytes).map_err(|_| SecretRefError::File {
                    path: path.display().to_string(),
                    reason: "not UTF-8 text".into(),
                })?;
                // One trailing newline (LF or CRLF) is the file's, not the credential's.
                let text = match text.strip_suffix('\n') {
                    Some(t) => t.strip_suffix('\r').unwrap_or(t),
                    None => text,
                };
                if text.is_empty() {
                    return Err(SecretRefError::FileEmpty(path.display().to_string()));
                }
                Ok(Secret::from(text.to_string()))
            }
        }
    }
}

/// Reads a credential file: a regular file (a link to one is followed, as Kubernetes and systemd
/// mount credentials through links) of at most [`MAX_CREDENTIAL_FILE`] bytes, into a buffer wiped on
/// drop. A FIFO or device is refused without blocking on it. The error is a reason, never content.
fn read_credential_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.kind().to_string())?;
    let md = file.metadata().map_err(|e| e.kind().to_string())?;
    if !md.is_file() {
        return Err("not a regular file".into());
    }
    let too_big = || format!("larger than {MAX_CREDENTIAL_FILE} bytes");
    if md.len() > MAX_CREDENTIAL_FILE {
        return Err(too_big());
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(md.len() as usize));
    file.take(MAX_CREDENTIAL_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.kind().to_string())?;
    if bytes.len() as u64 > MAX_CREDENTIAL_FILE {
        return Err(too_big());
    }
    Ok(bytes)
}

/// Marks the process non-dumpable (`PR_SET_DUMPABLE` 0): no core dump, and no ptrace attach or
/// `/proc/<pid>/mem` read by other processes of the same user, since memory holds keys. Called first
/// thing at start; an error (e.g. a seccomp filter refusing `prctl`) is returned for the caller to log.
pub fn protect_process_memory() -> Result<(), String> {
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("prctl(PR_SET_DUMPABLE, 0): {e}"))
}

/// Wipes every string in a parsed JSON value before it is freed (a regenerate answer or an AWS
/// secret's JSON object holds keys in them; serde_json's own drop does not wipe).
pub fn wipe_json(v: &mut serde_json::Value) {
    use serde_json::Value;
    use zeroize::Zeroize;
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(a) => a.iter_mut().for_each(wipe_json),
        Value::Object(o) => o.values_mut().for_each(wipe_json),
        _ => {}
    }
}

/// The short public identity of a secret value: the first 12 hex digits of its SHA-256.
pub fn fingerprint(secret: &Secret) -> String {
    fingerprint_bytes(secret.expose_secret().as_bytes())
}

/// [`fingerprint`] of raw bytes (a value read back from a store before it is wrapped).
pub fn fingerprint_bytes(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..6])
}

#[cfg(test)]
mod env_name_tests {
    use super::*;

    #[test]
    fn an_env_name_that_looks_like_a_credential_is_not_quoted() {
        let missing = SecretRef::Env("KEYROTD_TEST_SURELY_UNSET_1".into()).resolve();
        assert!(
            missing
                .unwrap_err()
                .to_string()
                .contains("KEYROTD_TEST_SURELY_UNSET_1")
        );
        let misplaced = SecretRef::Env("hvs.CAESI-secret-token".into()).resolve();
        let shown = misplaced.unwrap_err().to_string();
        assert!(!shown.contains("hvs.CAESI"), "{shown}");
        assert!(shown.contains("not a valid variable name"), "{shown}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_twelve_hex_digits_of_sha256() {
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(
            fingerprint(&Secret::from("abc".to_string())),
            "ba7816bf8f01"
        );
    }

    #[test]
    fn debug_of_a_secret_does_not_show_it() {
        let s = Secret::from("aos_sk_live_topsecret".to_string());
        assert!(!format!("{s:?}").contains("topsecret"));
    }

    #[test]
    fn file_reference_strips_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok");
        std::fs::write(&path, "tok-123\n").unwrap();
        let s = SecretRef::File(path).resolve().unwrap();
        assert_eq!(s.expose_secret(), "tok-123");
    }

    #[test]
    fn missing_sources_are_named() {
        let e = SecretRef::Env("KEYROTD_TEST_SURELY_UNSET_VAR".into())
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("KEYROTD_TEST_SURELY_UNSET_VAR"));
        let e = SecretRef::File("/nonexistent/keyrotd/tok".into())
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/keyrotd/tok"));
    }

    #[test]
    fn credential_files_must_be_small_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        // A link to /dev/zero would be read until memory runs out.
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let e = SecretRef::File(zero).resolve().unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");

        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; MAX_CREDENTIAL_FILE as usize + 1]).unwrap();
        let e = SecretRef::File(big).resolve().unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");

        // A link to a regular file is followed (Kubernetes secret volumes are links).
        let real = dir.path().join("real");
        std::fs::write(&real, "tok-9\r\n").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(
            SecretRef::File(link).resolve().unwrap().expose_secret(),
            "tok-9"
        );
    }

    #[test]
    fn the_process_can_be_made_non_dumpable() {
        protect_process_memory().unwrap();
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
    }
}
