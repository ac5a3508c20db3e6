//! keyrotd under a stand-in for systemd: a `NotifySocket` takes the place of systemd's notify socket
//! and records what arrives. The first tests listen to the library's `SystemdNotifier` directly; the
//! end-to-end ones start the real `keyrotd run` with `NOTIFY_SOCKET` and `WATCHDOG_USEC` pointing at
//! it, and check READY after recovery, WATCHDOG pings, RELOADING/READY around SIGHUP (also when the new
//! config is refused), STOPPING and exit 0 on SIGTERM, and that SIGTERM during a regenerate waits for
//! the rotation to reach every destination.

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::daemon::Daemon;
use crate::support::stack::{ADMIN_TOKEN, KEY, Options, Stack};
use keyrotd::systemd::SystemdNotifier;
use serde_json::json;

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
    notifier.ready();
    notifier.watchdog();
    notifier.reloading();
    notifier.ready();
    notifier.stopping();

    let ready = systemd
        .wait_for("READY=1", WAIT)
        .expect("READY=1 after recovery");
    assert_eq!(ready, ["READY=1"]);

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
    SystemdNotifier::with_socket(systemd.path()).stopping();

    let error = systemd
        .wait_for("READY=1", Duration::from_millis(300))
        .expect_err("READY=1 was never sent");
    assert!(error.contains("\"READY=1\""), "{error}");
    assert!(error.contains("STOPPING=1"), "{error}");
}

// ---------------------------------------------------------------------------------------------------
// The real daemon

/// A `NotifySocket` read on its own thread, so that the daemon never waits on a full socket queue
/// (`net.unix.max_dgram_qlen` is often 10, and a blocked send would stall the daemon's main loop) while
/// the test does HTTP calls. Datagrams are kept in arrival order.
struct Recorder {
    path: String,
    seen: Arc<Mutex<Vec<Vec<String>>>>,
    /// How many times the reader found the socket empty (a receive timed out).
    idle: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    fn start() -> Recorder {
        let mut socket = NotifySocket::bind();
        let path = socket.path().to_str().expect("UTF-8 temp path").to_owned();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let idle = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, idle, stop) = (seen.clone(), idle.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match socket.recv(Duration::from_millis(100)) {
                        Ok(datagram) => seen.lock().unwrap().push(datagram),
                        Err(_) => {
                            idle.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        };
        Recorder {
            path,
            seen,
            idle,
            stop,
            thread: Some(thread),
        }
    }

    /// `NOTIFY_SOCKET` and a 2 s `WATCHDOG_USEC` for the daemon (pings due every second).
    fn env(&self) -> [(&str, &str); 2] {
        [
            ("NOTIFY_SOCKET", self.path.as_str()),
            ("WATCHDOG_USEC", "2000000"),
        ]
    }

    fn seen(&self) -> Vec<Vec<String>> {
        self.seen.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Waits until the reader has found the socket empty once more: everything sent before this
    /// call has been received. The reader looks every 100 ms, so an empty socket shows within
    /// [`DRAIN_TIMEOUT`]; past it the reader has stopped or datagrams keep coming, and the test fails
    /// naming what was received.
    async fn wait_drained(&self) {
        let from = self.idle.load(Ordering::SeqCst);
        let start = Instant::now();
        while self.idle.load(Ordering::SeqCst) <= from {
            assert!(
                start.elapsed() < DRAIN_TIMEOUT,
                "the notify socket was not found empty within {DRAIN_TIMEOUT:?} (reader stopped, \
                 or datagrams kept arriving); received: {:?}",
                self.seen()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The index of the first datagram at or after `from` holding `line`; fails the test after
    /// `timeout`, naming everything received and the daemon's log.
    async fn wait_for(&self, from: usize, line: &str, timeout: Duration, daemon: &Daemon) -> usize {
        let start = Instant::now();
        loop {
            let found = self
                .seen()
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, d)| d.iter().any(|l| l == line))
                .map(|(i, _)| i);
            if let Some(i) = found {
                return i;
            }
            if start.elapsed() > timeout {
                panic!(
                    "no {line:?} (from datagram {from} on) within {timeout:?}; received: {:?}\nlog:\n{}",
                    self.seen(),
                    daemon.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `keyrotd_config_reloads_total{outcome}`.
async fn reloads(daemon: &Daemon, outcome: &str) -> f64 {
    daemon
        .metrics()
        .await
        .get("keyrotd_config_reloads_total", &[("outcome", outcome)])
}

/// SIGHUP, and the RELOADING=1 then READY=1 that systemd must hear whatever the outcome. Returns the
/// index of that READY=1.
async fn reload(systemd: &Recorder, daemon: &Daemon) -> usize {
    let before = systemd.len();
    daemon.signal("HUP");
    let reloading = systemd.wait_for(before, "RELOADING=1", LONG, daemon).await;
    let datagram = &systemd.seen()[reloading];
    assert_eq!(datagram.len(), 2, "{datagram:?}");
    assert!(datagram[1].starts_with("MONOTONIC_USEC="), "{datagram:?}");
    systemd
        .wait_for(reloading + 1, "READY=1", LONG, daemon)
        .await
}

const LONG: Duration = Duration::from_secs(60);
/// How long [`Recorder::wait_drained`] waits for the reader to find the socket empty (it looks every
/// 100 ms).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The stack's config with a 30 s provider timeout (instead of 5 s), so that the portal can be told to
/// hold a regenerate's answer back for several seconds without keyrotd giving up on it.
fn write_slow_portal_config(stack: &Stack, o: &Options) -> PathBuf {
    let text = stack.config(o);
    let provider_timeout = "account_id = \"acct_42\"\ntimeout = \"5s\"\n";
    assert_eq!(text.matches(provider_timeout).count(), 1, "{text}");
    let path = stack.write_config(o);
    std::fs::write(
        &path,
        text.replace(
            provider_timeout,
            "account_id = \"acct_42\"\ntimeout = \"30s\"\n",
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn keyrotd_run_notifies_ready_watchdog_reload_and_stopping() {
    let stack = Stack::start().await;
    let config = stack.write_config(&Options::default());
    let systemd = Recorder::start();
    // A journal left at `regenerating` makes the recovery scan read the portal's status, which fails
    // four times: recovery retries it with backoff (a few seconds), long enough to watch the daemon
    // answer /readyz 503 before it is ready.
    let key_id = stack.portal.state().await.key_id;
    let journal = stack.state_dir().join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    std::fs::write(
        journal.join(format!("{KEY}.json")),
        json!({ "key": KEY, "phase": "regenerating", "old_key_id": key_id }).to_string(),
    )
    .unwrap();
    stack
        .portal
        .faults(json!({ "status": { "fail_next": 4, "status": 503 } }))
        .await;
    let mut daemon = stack.spawn_daemon(&config, &systemd.env()).await;

    // READY=1 comes after the recovery scan: whenever READY=1 has arrived, /readyz already says ready.
    let start = Instant::now();
    let mut saw_recovering = false;
    loop {
        let ready_sent = systemd
            .seen()
            .iter()
            .any(|d| d.iter().any(|l| l == "READY=1"));
        match reqwest::get(format!("{}/readyz", daemon.base)).await {
            Ok(r) if r.status().as_u16() == 200 => {}
            Ok(r) => {
                assert!(
                    !ready_sent,
                    "READY=1 sent while /readyz answers {}",
                    r.status()
                );
                saw_recovering = true;
            }
            Err(_) => assert!(!ready_sent, "READY=1 sent before the admin API is up"),
        }
        if ready_sent {
            break;
        }
        assert!(
            start.elapsed() < LONG,
            "no READY=1; received {:?}\n{}",
            systemd.seen(),
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        saw_recovering,
        "the recovery scan was observable (/readyz 503) before READY=1"
    );
    let ready = systemd.wait_for(0, "READY=1", LONG, &daemon).await;
    assert_eq!(systemd.seen()[ready], ["READY=1"]);
    assert_eq!(ready, 0, "nothing before READY=1: {:?}", systemd.seen());

    // WATCHDOG_USEC=2s: pings every second, and they keep coming.
    let mut at = ready + 1;
    for _ in 0..3 {
        at = systemd.wait_for(at, "WATCHDOG=1", LONG, &daemon).await + 1;
    }

    // SIGHUP with a good config: RELOADING=1 (with MONOTONIC_USEC=) then READY=1.
    let good = std::fs::read_to_string(&config).unwrap();
    reload(&systemd, &daemon).await;
    assert_eq!(reloads(&daemon, "ok").await, 1.0);
    assert_eq!(reloads(&daemon, "error").await, 0.0);

    // SIGHUP with a file that is not TOML: refused, but systemd still hears RELOADING=1 and READY=1
    // (otherwise `systemctl reload` would hang or fail the unit), and the daemon carries on.
    std::fs::write(&config, "[daemon\nlisten = not toml at all\n").unwrap();
    reload(&systemd, &daemon).await;
    assert_eq!(reloads(&daemon, "error").await, 1.0);
    assert_eq!(reloads(&daemon, "ok").await, 1.0);

    // SIGHUP with valid TOML that fails validation (a destination on a store that does not exist):
    // refused the same way, naming the field.
    assert_eq!(good.matches("store = \"vault\"").count(), 1, "{good}");
    std::fs::write(
        &config,
        good.replace("store = \"vault\"", "store = \"vualt\""),
    )
    .unwrap();
    let ready = reload(&systemd, &daemon).await;
    assert_eq!(reloads(&daemon, "error").await, 2.0);
    assert_eq!(reloads(&daemon, "ok").await, 1.0);
    let log = daemon.log_text();
    assert_eq!(
        log.matches("Configuration reload refused").count(),
        2,
        "{log}"
    );
    assert!(log.contains("keys[0].destinations[0].store"), "{log}");

    let (status, _) = daemon.get("/healthz").await;
    assert_eq!(status, 200, "still serving after refused reloads");
    let (status, _) = daemon.get("/readyz").await;
    assert_eq!(status, 200);
    let (status, key) = daemon.get(&format!("/v1/keys/{KEY}")).await;
    assert_eq!(status, 200, "the old config's key is still served: {key}");
    let record = daemon.rotate("test: after refused reloads").await;
    assert_eq!(
        record["outcome"], "success",
        "the old config still rotates: {record:#}"
    );
    // The watchdog survives the refused reload.
    systemd
        .wait_for(ready + 1, "WATCHDOG=1", LONG, &daemon)
        .await;

    // SIGTERM: STOPPING=1, exit 0, and no watchdog ping after STOPPING=1.
    let before = systemd.len();
    let exit = tokio::task::block_in_place(|| daemon.terminate(LONG));
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", daemon.log_text());
    let stopping = systemd.wait_for(before, "STOPPING=1", LONG, &daemon).await;
    // The process is gone: whatever it sent is in the socket; let the reader drain it.
    systemd.wait_drained().await;
    let seen = systemd.seen();
    assert_eq!(seen[stopping], ["STOPPING=1"]);
    assert!(
        seen[stopping + 1..].is_empty(),
        "nothing after STOPPING=1: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_regenerating_waits_for_the_rotation_to_reach_every_destination() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = write_slow_portal_config(&stack, &o);
    let systemd = Recorder::start();
    let mut daemon = stack.spawn_daemon(&config, &systemd.env()).await;
    daemon.wait_ready(LONG).await;
    let initial = stack.portal.state().await;

    // The portal rotates at once, then holds its answer back for 6 s: a wide window for SIGTERM to
    // land inside regenerate even on a loaded machine.
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 6000 } }))
        .await;
    let (status, body) = daemon
        .post(
            &format!("/v1/keys/{KEY}/rotate"),
            Some(ADMIN_TOKEN),
            json!({ "reason": "test: shutdown during regenerate" }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let rotation_id = body["rotation_id"]
        .as_str()
        .expect("rotation_id")
        .to_owned();
    stack
        .eventually(LONG, "the portal regenerated the key", || async {
            stack.portal.state().await.regenerations > initial.regenerations
        })
        .await;
    // keyrotd is inside regenerate now: the old key is already dead, the new one not yet in hand.
    let (_, record) = daemon.get(&format!("/v1/rotations/{rotation_id}")).await;
    assert!(
        record["outcome"].is_null(),
        "the rotation is still running when SIGTERM arrives: {record:#}"
    );
    let before = systemd.len();
    let exit = tokio::task::block_in_place(|| daemon.terminate(Duration::from_secs(120)));
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", daemon.log_text());
    systemd.wait_for(before, "STOPPING=1", LONG, &daemon).await;

    // The rotation was not cut: every destination holds the portal's new key, the journal is back to
    // idle, and the audit log records the success.
    let state = stack.portal.state().await;
    assert_ne!(
        state.fingerprint, initial.fingerprint,
        "the key was rotated"
    );
    assert_eq!(
        state.regenerations,
        initial.regenerations + 1,
        "exactly one regenerate"
    );
    let held = stack.destination_fingerprints().await;
    assert_eq!(
        held,
        vec![Some(state.fingerprint.clone()); 3],
        "every destination holds the new key\n{}",
        daemon.log_text()
    );
    assert_eq!(stack.journal()["phase"], "idle", "{:#}", stack.journal());
    let outcomes: Vec<_> = stack
        .audit()
        .into_iter()
        .filter(|r| r["rotation_id"] == rotation_id.as_str())
        .map(|r| r["outcome"].clone())
        .collect();
    assert!(
        outcomes.iter().any(|o| o == "success"),
        "audit: {outcomes:?}\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    let shutdown_at = log.find("Shutting down").expect("the shutdown was logged");
    let ended_at = log
        .find("All rotations ended")
        .expect("the wait ended normally");
    assert!(shutdown_at < ended_at, "{log}");

    // Started again, the daemon finds nothing to recover and the dependents work with the new key.
    let daemon = stack.daemon(&config).await;
    stack.assert_consistent(&o).await;
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_exits_at_once_and_the_next_start_rerotates_the_lost_key() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = write_slow_portal_config(&stack, &o);
    let systemd = Recorder::start();
    let mut daemon = stack.spawn_daemon(&config, &systemd.env()).await;
    daemon.wait_ready(LONG).await;
    let initial = stack.portal.state().await;

    // A regenerate whose answer takes 20 s: the daemon would wait for it on a single SIGTERM.
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 20000 } }))
        .await;
    let (status, body) = daemon
        .post(
            &format!("/v1/keys/{KEY}/rotate"),
            Some(ADMIN_TOKEN),
            json!({ "reason": "test: impatient shutdown" }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    stack
        .eventually(LONG, "the portal regenerated the key", || async {
            stack.portal.state().await.regenerations > initial.regenerations
        })
        .await;
    // First signal: STOPPING=1, then the daemon waits for the rotation. The second one is sent only
    // once the first has been taken (two signals sent back to back may be delivered as one).
    daemon.signal("TERM");
    systemd.wait_for(0, "STOPPING=1", LONG, &daemon).await;
    let exit = tokio::task::block_in_place(|| daemon.terminate(LONG));
    assert_eq!(exit.code(), Some(0), "{exit:?}\n{}", daemon.log_text());
    assert!(
        daemon.log_text().contains("Second signal: exiting now."),
        "{}",
        daemon.log_text()
    );
    // It left inside regenerate: the journal says so, and the new key reached no destination.
    assert_eq!(
        stack.journal()["phase"],
        "regenerating",
        "{:#}",
        stack.journal()
    );

    // The next start finds the portal on a key it never received and re-rotates.
    stack.portal.reset().await;
    let daemon = stack.daemon(&config).await;
    stack
        .eventually(LONG, "the lost key is re-rotated and stored", || async {
            stack.journal()["phase"] == "idle"
                && stack.portal.state().await.regenerations >= 1
                && stack.destination_fingerprints().await
                    == vec![Some(stack.portal.state().await.fingerprint); 3]
        })
        .await;
    stack.assert_consistent(&o).await;
    drop(daemon);
}
