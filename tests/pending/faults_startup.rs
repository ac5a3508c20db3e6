//! What `keyrotd run` does to itself and its file destinations before anything else: it is not
//! dumpable (no core dump, no ptrace by its own user, so memory with keys stays private), and it
//! removes the temp files an interrupted write left (each may hold a secret).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A config with one key on a file store in `dir/keys`, a portal that refuses connections, and the
/// admin API on a free port.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
listen = "127.0.0.1:{port}"
reconcile_interval = "0s"
[providers.p]
kind = "aos"
base_url = "http://127.0.0.1:1"
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
fn start_as_nobody(dir: &Path, config: &Path) -> Daemon {
    for entry in ["", "tok", "keys", "state", "keyrotd.toml"] {
        std::os::unix::fs::chown(dir.join(entry), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_keyrotd"))
        .arg("-c")
        .arg(config)
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("setpriv runs keyrotd (util-linux must be installed)");
    Daemon(child)
}

fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_daemon_is_not_dumpable_and_removes_temp_files_left_by_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = write_config(dir);
    let leftover = dir.join("keys/.api-key.keyrotd-tmp-6f1c2c7e");
    std::fs::write(&leftover, "aos_sk_live_LEFT_BY_A_CRASH").unwrap();
    let unrelated = dir.join("keys/notes.txt");
    std::fs::write(&unrelated, "kept").unwrap();

    let daemon = start_as_nobody(dir, &config);
    let pid = daemon.0.id();
    // The temp file goes right after the state-dir lock is taken.
    eventually("the leftover temp file is removed", || !leftover.exists());
    assert!(unrelated.exists(), "only keyrotd's temp files are removed");

    // A dumpable process's /proc/PID/environ belongs to its own user; a non-dumpable one's to root.
    let environ = format!("/proc/{pid}/environ");
    let owner = std::fs::metadata(&environ).unwrap().uid();
    assert_eq!(
        owner, 0,
        "{environ} belongs to uid {owner}: the daemon is dumpable"
    );
}
