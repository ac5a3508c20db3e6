//! The systemd notify protocol, as `keyrotd run` speaks it under `Type=notify` (systemd/keyrotd.service):
//! `READY=1` once recovery has decided every key, `WATCHDOG=1` every half `WATCHDOG_USEC`,
//! `RELOADING=1` + `MONOTONIC_USEC=` ... `READY=1` around a SIGHUP reload, and `STOPPING=1` when
//! shutdown begins.
//!
//! This module owns reading `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, and sending the
//! datagrams. It decides nothing about *when* to send: the daemon calls it (the watchdog pings come
//! from the daemon's main loop, so a wedged loop stops them). Outside systemd (no `NOTIFY_SOCKET`)
//! every call is a no-op. A failed notification is logged as a warning and never stops the daemon:
//! a lost `READY=1` or watchdog ping shows up in systemd's own logs, which is the right place to
//! notice it, and must not cost a rotation.
//!
//! Messages are formatted by the `sd-notify` crate ([`NotifyState`]); the socket is ours, so that a
//! notifier can be pointed at any socket (tests do) without touching the process environment, and so
//! that abstract sockets (`NOTIFY_SOCKET=@name`) work.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

/// Where notifications go: a socket path, or a Linux abstract socket name (`@name` in `NOTIFY_SOCKET`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// Sends systemd notifications for this process; a no-op when not started by systemd with
/// `Type=notify`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemdNotifier {
    /// `None`: not under a notify-aware service manager; every call does nothing.
    target: Option<Target>,
    /// The full watchdog timeout systemd enforces (`WatchdogSec=`), when it applies to this process.
    watchdog_timeout: Option<Duration>,
}

impl SystemdNotifier {
    /// The notifier systemd set up for this process: `NOTIFY_SOCKET`, and the watchdog from
    /// `WATCHDOG_USEC` when `WATCHDOG_PID` is absent or names this process (as `sd_watchdog_enabled`
    /// does). Without `NOTIFY_SOCKET` it does nothing. Call it once, early, in the main process.
    pub fn from_env() -> Self {
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        Self::from_env_values(
            std::env::var_os("NOTIFY_SOCKET").as_deref(),
            usec.as_deref(),
            pid.as_deref(),
            std::process::id(),
        )
    }

    /// [`from_env`](Self::from_env) with the variables passed in: `NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID` and this process's id. Malformed values disable the part they configure, with a
    /// warning naming the variable.
    pub fn from_env_values(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        own_pid: u32,
    ) -> Self {
        let target = notify_socket.and_then(parse_target);
        let watchdog_timeout =
            watchdog_usec.and_then(|usec| parse_watchdog(usec, watchdog_pid, own_pid));
        SystemdNotifier {
            target,
            watchdog_timeout,
        }
    }

    /// A notifier that sends nothing (not under systemd).
    pub fn disabled() -> Self {
        SystemdNotifier {
            target: None,
            watchdog_timeout: None,
        }
    }

    /// A notifier sending to `socket`: a filesystem path, or `@name` for an abstract socket — the same
    /// forms `NOTIFY_SOCKET` takes. No watchdog; add one with [`with_watchdog`](Self::with_watchdog).
    pub fn with_socket(socket: impl AsRef<OsStr>) -> Self {
        SystemdNotifier {
            target: parse_target(socket.as_ref()),
            watchdog_timeout: None,
        }
    }

    /// Sets the watchdog timeout (what `WATCHDOG_USEC` says); pings are due every half of it.
    pub fn with_watchdog(mut self, timeout: Duration) -> Self {
        self.watchdog_timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// True when notifications go somewhere (the process runs under a notify-aware service manager).
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1`: startup (recovery) or a reload is complete.
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=<now>`: a SIGHUP reload begins. systemd ≥ 253 requires the
    /// timestamp (and fails the reload without it); older versions ignore it. Follow with
    /// [`ready`](Self::ready) when the reload is over, whether the new config was taken or refused.
    pub fn reloading(&self) {
        if self.target.is_none() {
            return;
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(error) => {
                warn!(%error, "Cannot read the monotonic clock for MONOTONIC_USEC; sending RELOADING=1 alone.");
                self.send(&[NotifyState::Reloading]);
            }
        }
    }

    /// `STOPPING=1`: graceful shutdown has begun.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// How often to send [`watchdog`](Self::watchdog): half the watchdog timeout, as systemd recommends.
    /// `None` when systemd runs no watchdog for this process (or there is nowhere to send pings).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.target.as_ref()?;
        self.watchdog_timeout.map(|timeout| timeout / 2)
    }

    /// `WATCHDOG=1`: the daemon is alive.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// Sends one datagram with `states`, one per line. Errors are logged, never returned.
    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(target) = &self.target else {
            return;
        };
        let message: String = states.iter().map(|state| format!("{state}\n")).collect();
        if let Err(error) = send_datagram(target, message.as_bytes()) {
            // The first line's name (`READY`, `WATCHDOG`...) says which notification was lost.
            let kind = message.lines().next().unwrap_or_default();
            let kind = kind.split('=').next().unwrap_or_default();
            warn!(%error, notification = kind, "Sending a systemd notification failed.");
        }
    }
}

fn send_datagram(target: &Target, message: &[u8]) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let sent = match target {
        Target::Path(path) => socket.send_to(message, path)?,
        Target::Abstract(name) => {
            socket.send_to_addr(message, &SocketAddr::from_abstract_name(name)?)?
        }
    };
    if sent == message.len() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", message.len()),
        ))
    }
}

/// `NOTIFY_SOCKET` as sd_notify(3) reads it: an absolute path, or `@name` for an abstract socket.
fn parse_target(value: &OsStr) -> Option<Target> {
    let bytes = value.as_bytes();
    match bytes.first() {
        None => None,
        Some(b'/') => Some(Target::Path(PathBuf::from(value))),
        Some(b'@') if bytes.len() > 1 => Some(Target::Abstract(bytes[1..].to_vec())),
        Some(_) => {
            warn!(
                notify_socket = %value.to_string_lossy(),
                "NOTIFY_SOCKET is neither an absolute path nor @abstract-name; systemd notifications are off."
            );
            None
        }
    }
}

/// `WATCHDOG_USEC` (and `WATCHDOG_PID`) as sd_watchdog_enabled(3) reads them.
fn parse_watchdog(usec: &str, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec = match usec.trim().parse::<u64>() {
        Ok(0) => return None,
        Ok(usec) => usec,
        Err(_) => {
            warn!(
                watchdog_usec = usec,
                "WATCHDOG_USEC is not a number of microseconds; no watchdog pings."
            );
            return None;
        }
    };
    if let Some(pid) = pid {
        match pid.trim().parse::<u32>() {
            Ok(pid) if pid == own_pid => {}
            // The watchdog belongs to another process (we were started by the main process).
            Ok(_) => return None,
            Err(_) => {
                warn!(
                    watchdog_pid = pid,
                    "WATCHDOG_PID is not a process id; no watchdog pings."
                );
                return None;
            }
        }
    }
    Some(Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket standing in for systemd's, in its own temp dir.
    struct FakeSystemd {
        _dir: tempfile::TempDir,
        path: PathBuf,
        socket: UnixDatagram,
    }

    impl FakeSystemd {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("notify");
            let socket = UnixDatagram::bind(&path).expect("bind the fake notify socket");
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("read timeout");
            FakeSystemd {
                _dir: dir,
                path,
                socket,
            }
        }

        fn notifier(&self) -> SystemdNotifier {
            SystemdNotifier::with_socket(&self.path)
        }

        /// The next datagram, as text; fails the test after 5 s.
        fn recv(&self) -> String {
            let mut buf = [0u8; 4096];
            let len = self
                .socket
                .recv(&mut buf)
                .expect("a notification within 5s");
            String::from_utf8(buf[..len].to_vec()).expect("notifications are UTF-8")
        }

        fn assert_nothing_pending(&self) {
            self.socket.set_nonblocking(true).expect("nonblocking");
            let mut buf = [0u8; 64];
            let got = self.socket.recv(&mut buf);
            assert!(
                got.is_err(),
                "unexpected notification: {:?}",
                got.map(|len| String::from_utf8_lossy(&buf[..len]).into_owned())
            );
        }
    }

    fn monotonic_usec() -> i128 {
        match NotifyState::monotonic_usec_now().expect("monotonic clock") {
            NotifyState::MonotonicUsec(usec) => usec,
            other => panic!("monotonic_usec_now returned {other:?}"),
        }
    }

    #[test]
    fn the_lifecycle_messages_reach_the_socket_one_datagram_each() {
        let systemd = FakeSystemd::new();
        let notifier = systemd.notifier();
        assert!(notifier.is_enabled());

        notifier.ready();
        assert_eq!(systemd.recv(), "READY=1\n");
        notifier.watchdog();
        assert_eq!(systemd.recv(), "WATCHDOG=1\n");
        notifier.stopping();
        assert_eq!(systemd.recv(), "STOPPING=1\n");
        systemd.assert_nothing_pending();
    }

    #[test]
    fn reloading_carries_the_current_monotonic_time_in_the_same_datagram() {
        let systemd = FakeSystemd::new();
        let before = monotonic_usec();
        systemd.notifier().reloading();
        let after = monotonic_usec();

        let message = systemd.recv();
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(lines.len(), 2, "one datagram with two lines: {message:?}");
        assert_eq!(lines[0], "RELOADING=1");
        let usec: i128 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("second line is MONOTONIC_USEC=: {message:?}"))
            .parse()
            .expect("MONOTONIC_USEC is a number");
        assert!(
            (before..=after).contains(&usec),
            "{usec} not between {before} and {after}"
        );
    }

    #[test]
    fn abstract_sockets_named_with_an_at_sign_are_reached() {
        let name = format!("keyrotd-test-{}-{}", std::process::id(), line!());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind an abstract socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");

        SystemdNotifier::with_socket(format!("@{name}")).ready();

        let mut buf = [0u8; 64];
        let len = socket.recv(&mut buf).expect("a notification within 5s");
        assert_eq!(&buf[..len], b"READY=1\n");
    }

    #[test]
    fn without_notify_socket_everything_is_a_quiet_no_op() {
        let notifier = SystemdNotifier::from_env_values(None, Some("30000000"), None, 42);
        assert!(!notifier.is_enabled());
        assert_eq!(
            notifier.watchdog_interval(),
            None,
            "no socket: nothing to ping"
        );
        notifier.ready();
        notifier.reloading();
        notifier.watchdog();
        notifier.stopping();
        assert_eq!(
            notifier,
            SystemdNotifier::disabled().with_watchdog(Duration::from_secs(30))
        );
    }

    /// Collects what `tracing` writes while a closure runs on this thread.
    #[derive(Clone, Default)]
    struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for CapturedLogs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl CapturedLogs {
        fn during(f: impl FnOnce()) -> String {
            let logs = CapturedLogs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            tracing::subscriber::with_default(subscriber, f);
            let bytes = logs.0.lock().expect("log buffer").clone();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    #[test]
    fn a_vanished_socket_is_logged_not_fatal() {
        let systemd = FakeSystemd::new();
        let notifier = systemd.notifier();
        std::fs::remove_file(&systemd.path).expect("remove the socket file");

        // Each of these fails to send; none may panic or hand an error to the daemon.
        let logs = CapturedLogs::during(|| {
            notifier.ready();
            notifier.watchdog();
            notifier.stopping();
        });
        let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(
            warnings.len(),
            3,
            "one warning per failed notification: {logs}"
        );
        for (line, kind) in warnings.iter().zip(["READY", "WATCHDOG", "STOPPING"]) {
            assert!(
                line.contains("Sending a systemd notification failed."),
                "{line}"
            );
            assert!(line.contains(&format!("notification=\"{kind}\"")), "{line}");
        }
    }

    #[test]
    fn notify_socket_values_are_read_like_sd_notify_does() {
        let path =
            |s: &str| SystemdNotifier::from_env_values(Some(OsStr::new(s)), None, None, 1).target;
        assert_eq!(
            path("/run/systemd/notify"),
            Some(Target::Path(PathBuf::from("/run/systemd/notify")))
        );
        assert_eq!(
            path("@sd-notify"),
            Some(Target::Abstract(b"sd-notify".to_vec()))
        );
        assert_eq!(path(""), None);
        assert_eq!(path("@"), None);
        assert_eq!(path("relative/notify"), None);
    }

    #[test]
    fn the_watchdog_interval_is_half_the_timeout_and_only_for_the_named_process() {
        let socket = Some(OsStr::new("/run/systemd/notify"));
        let interval = |usec: Option<&str>, pid: Option<&str>| {
            SystemdNotifier::from_env_values(socket, usec, pid, 4242).watchdog_interval()
        };
        // (WATCHDOG_USEC, WATCHDOG_PID) -> ping interval
        let cases: [(Option<&str>, Option<&str>, Option<Duration>); 8] = [
            (Some("30000000"), None, Some(Duration::from_secs(15))),
            (
                Some("30000000"),
                Some("4242"),
                Some(Duration::from_secs(15)),
            ),
            (
                Some("1000001"),
                None,
                Some(Duration::from_nanos(500_000_500)),
            ),
            (Some("30000000"), Some("4243"), None),
            (Some("30000000"), Some("init"), None),
            (Some("0"), None, None),
            (Some("30s"), None, None),
            (None, Some("4242"), None),
        ];
        for (usec, pid, want) in cases {
            assert_eq!(
                interval(usec, pid),
                want,
                "WATCHDOG_USEC={usec:?} WATCHDOG_PID={pid:?}"
            );
        }
    }
}
