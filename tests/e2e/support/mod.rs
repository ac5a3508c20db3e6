//! Test support: starts the real outside components (OpenBao, moto, the simulators, Prometheus) and
//! keyrotd itself on loopback ports they pick themselves, and stops them when dropped. A component
//! that cannot start fails the test loudly; nothing is skipped.

pub mod bao;
#[cfg(feature = "failpoints")]
pub mod crash;
pub mod daemon;
pub mod dual;
pub mod gate;
pub mod metrics;
pub mod moto;
pub mod netns;
pub mod process;
pub mod raft_bao;
pub mod receiver;
pub mod replicas;
pub mod secrets;
pub mod sim;
pub mod stack;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The project root (where Cargo.toml is).
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `.tools/venv/bin`, where `scripts/install-tools.sh` puts `bao` and `moto_server`.
pub fn tools_bin() -> PathBuf {
    project_root().join(".tools/venv/bin")
}

/// Waits (polling) until `check` holds; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {timeout:?} waiting for: {what}");
}

/// That something does *not* happen can only be observed for a while: this checks `holds` over
/// `period` (polling) and panics, naming `what`, the first time it is false. Callers choose `period`
/// from the daemon's own cadence (e.g. two recovery ticks) and say so where they call it.
pub async fn holds_for<F, Fut>(period: Duration, what: &str, mut holds: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        assert!(
            holds().await,
            "{what} stopped holding after {:?} (observed for up to {period:?})",
            start.elapsed()
        );
        if start.elapsed() >= period {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A directory made read-only for everyone, root included (the tests run as root, which ignores
/// permission bits): a read-only bind mount of the directory on itself, undone when dropped.
pub struct ReadOnlyDir {
    path: PathBuf,
}

impl ReadOnlyDir {
    pub fn new(path: &std::path::Path) -> ReadOnlyDir {
        let p = path.to_str().expect("a UTF-8 temp path");
        let mount = |args: &[&str]| {
            let out = std::process::Command::new("mount")
                .args(args)
                .output()
                .expect("mount(8) runs");
            assert!(
                out.status.success(),
                "mount {args:?} {}: {} (the tests need root to make a directory read-only)",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        mount(&["--bind", p, p]);
        let ro = ReadOnlyDir {
            path: path.to_path_buf(),
        };
        mount(&["-o", "remount,bind,ro", p]);
        assert!(
            std::fs::write(path.join(".probe-by-test"), "x").is_err(),
            "{} is still writable",
            path.display()
        );
        ro
    }
}

impl Drop for ReadOnlyDir {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}
