//! What `keyrotd run` does to itself and its file destinations before anything else: it is not
//! dumpable (no core dump, no ptrace by its own user, so memory with keys stays private), and it
//! removes the temp files an interrupted write left (each may hold a secret).

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::eventually;
use crate::support::process::{Proc, refusing_port};

const NOBODY: u32 = 65534;

/// A config with one key on a file store in `dir/keys`, a portal at `portal` (a port that refuses
/// connections), and the admin API on a port the daemon picks.
fn write_config(dir: &Path, portal: SocketAddr) -> std::path::PathBuf {
    std::fs::write(dir.join("tok"), "portal-token").unwrap();
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let config = dir.join("keyrotd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[daemon]
state_dir = "{d}/state"
listen = "127.0.0.1:0"
reconcile_interval = "0s"
[providers.p]
kind = "aos"
base_url = "http://{portal}"
management_token = {{ file = "{d}/tok" }}
timeout = "1s"
[stores.local]
kind = "file"
dir = "{d}/keys"
[[keys]]
name = "k"
provider = "p"
  [[keys.destinations]]
  store = "local"
  file = "api-key"
"#,
            d = dir.display()
        ),
    )
    .unwrap();
    config
}

/// Starts `keyrotd run` as `nobody` (so that who owns `/proc/PID` tells whether it is dumpable).
/// `setpriv` execs keyrotd, so the child's pid is keyrotd's.
fn start_as_nobody(dir: &Path, config: &Path) -> Proc {
    for entry in ["", "tok", "keys", "state", "keyrotd.toml"] {
        std::os::unix::fs::chown(dir.join(entry), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_keyrotd"))
        .arg("-c")
        .arg(config)
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    Proc::spawn("keyrotd run as nobody (setpriv, from util-linux)", cmd)
}

#[tokio::test]
async fn the_daemon_is_not_dumpable_and_removes_temp_files_left_by_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (portal, _held) = refusing_port();
    let config = write_config(dir, portal);
    let leftover = dir.join("keys/.api-key.keyrotd-tmp-6f1c2c7e");
    std::fs::write(&leftover, "aos_sk_live_LEFT_BY_A_CRASH").unwrap();
    let unrelated = dir.join("keys/notes.txt");
    std::fs::write(&unrelated, "kept").unwrap();

    let mut daemon = start_as_nobody(dir, &config);
    // The temp file goes right after the state-dir lock is taken.
    eventually(
        Duration::from_secs(20),
        "the leftover temp file is removed",
        || async { !leftover.exists() },
    )
    .await;
    assert!(unrelated.exists(), "only keyrotd's temp files are removed");
    assert!(
        daemon.exited().is_none(),
        "keyrotd run exited; its log:\n{}",
        daemon.log_text()
    );

    // A dumpable process's /proc/PID/environ belongs to its own user; a non-dumpable one's to root.
    let environ = format!("/proc/{}/environ", daemon.pid());
    let owner = std::fs::metadata(&environ).unwrap().uid();
    assert_eq!(
        owner, 0,
        "{environ} belongs to uid {owner}: the daemon is dumpable"
    );
}
