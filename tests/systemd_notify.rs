//! keyrotd under a stand-in for systemd: a `NotifySocket` takes the place of systemd's notify socket
//! and records what arrives. Here it listens to the library's `SystemdNotifier` directly; the
//! end-to-end test of `keyrotd run` (READY after recovery, WATCHDOG pings, RELOADING/READY around
//! SIGHUP, STOPPING on SIGTERM) uses the same helper by passing `NotifySocket::env` to the child.

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keyrotd::systemd::SystemdNotifier;

/// A datagram socket in a temp dir playing systemd's `NOTIFY_SOCKET`. Each received datagram is kept
/// as its lines (`["RELOADING=1", "MONOTONIC_USEC=123"]`).
pub struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    socket: UnixDatagram,
    /// Every datagram received so far, in order.
    seen: Vec<Vec<String>>,
}

impl NotifySocket {
    pub fn bind() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for the notify socket");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path)
            .unwrap_or_else(|e| panic!("cannot bind the notify socket {}: {e}", path.display()));
        NotifySocket {
            _dir: dir,
            path,
            socket,
            seen: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The environment systemd would give the service: `NOTIFY_SOCKET`, and `WATCHDOG_USEC` when a
    /// watchdog is wanted. (`WATCHDOG_PID` is left out: the child's pid is not known before it runs,
    /// and without it the watchdog applies to whichever process reads it, as with systemd.)
    pub fn env(&self, watchdog: Option<Duration>) -> Vec<(&'static str, OsString)> {
        let mut env = vec![("NOTIFY_SOCKET", self.path.clone().into_os_string())];
        if let Some(timeout) = watchdog {
            env.push(("WATCHDOG_USEC", timeout.as_micros().to_string().into()));
        }
        env
    }

    /// Every datagram received so far.
    pub fn seen(&self) -> &[Vec<String>] {
        &self.seen
    }

    /// Waits for the next datagram and returns its lines.
    pub fn recv(&mut self, timeout: Duration) -> Result<Vec<String>, String> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|e| format!("setting the read timeout: {e}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        let len = self.socket.recv(&mut buf).map_err(|e| {
            format!(
                "no notification within {timeout:?} ({e}); seen so far: {:?}",
                self.seen
            )
        })?;
        let text = String::from_utf8(buf[..len].to_vec())
            .map_err(|e| format!("a notification that is not UTF-8: {e}"))?;
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        self.seen.push(lines.clone());
        Ok(lines)
    }

    /// Receives datagrams until one holds `line` (e.g. `"READY=1"`) and returns that datagram. Fails
    /// after `timeout`, naming everything seen, so a daemon that never got ready explains itself.
    pub fn wait_for(&mut self, line: &str, timeout: Duration) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no {line:?} within {timeout:?}; seen: {:?}",
                    self.seen
                ));
            }
            match self.recv(left) {
                Ok(datagram) if datagram.iter().any(|l| l == line) => return Ok(datagram),
                Ok(_) => continue,
                Err(_) => {
                    return Err(format!(
                        "no {line:?} within {timeout:?}; seen: {:?}",
                        self.seen
                    ));
                }
            }
        }
    }
}

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn the_notify_socket_follows_a_start_reload_stop_cycle() {
    let mut systemd = NotifySocket::bind();
    let env = systemd.env(Some(Duration::from_secs(30)));
    assert_eq!(env[0], ("NOTIFY_SOCKET", systemd.path().into()));
    assert_eq!(env[1], ("WATCHDOG_USEC", "30000000".into()));

    // What the daemon does, in order: recovery, ready, a ping, a SIGHUP reload, shutdown.
    let notifier =
        SystemdNotifier::with_socket(systemd.path()).with_watchdog(Duration::from_secs(30));
    assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(15)));
    notifier.status("recovery: 2 keys");
    notifier.ready();
    notifier.watchdog();
    notifier.reloading();
    notifier.ready();
    notifier.stopping();

    let ready = systemd
        .wait_for("READY=1", WAIT)
        .expect("READY=1 after recovery");
    assert_eq!(ready, ["READY=1"]);
    assert_eq!(systemd.seen()[0], ["STATUS=recovery: 2 keys"]);

    let reload = systemd.wait_for("RELOADING=1", WAIT).expect("RELOADING=1");
    assert_eq!(
        reload.len(),
        2,
        "RELOADING=1 travels with MONOTONIC_USEC: {reload:?}"
    );
    assert!(reload[1].starts_with("MONOTONIC_USEC="), "{reload:?}");
    systemd
        .wait_for("READY=1", WAIT)
        .expect("READY=1 after the reload");
    systemd.wait_for("STOPPING=1", WAIT).expect("STOPPING=1");

    let first_lines: Vec<&str> = systemd.seen().iter().map(|d| d[0].as_str()).collect();
    assert_eq!(
        first_lines,
        [
            "STATUS=recovery: 2 keys",
            "READY=1",
            "WATCHDOG=1",
            "RELOADING=1",
            "READY=1",
            "STOPPING=1"
        ]
    );
}

#[test]
fn waiting_for_a_notification_that_never_comes_names_what_came() {
    let mut systemd = NotifySocket::bind();
    SystemdNotifier::with_socket(systemd.path()).status("recovering billing-api");

    let error = systemd
        .wait_for("READY=1", Duration::from_millis(300))
        .expect_err("READY=1 was never sent");
    assert!(error.contains("\"READY=1\""), "{error}");
    assert!(error.contains("STATUS=recovering billing-api"), "{error}");
}
