//! One type for every long-running child the tests start: OpenBao, moto, Prometheus, the simulators
//! and `keyrotd run` itself.
//!
//! Ports: a child is told to listen on port 0, so the kernel picks a free port at the moment the child
//! binds it. The test then reads which port that was from the kernel's socket table
//! ([`Proc::listening_ports`]: the child's open sockets in `/proc/PID/fd`, matched against the
//! listening sockets in `/proc/PID/net/tcp`). No port is ever chosen by the test and handed over, so
//! two tests running at once can never race for one.
//!
//! A child's stdout and stderr go to one log file, shown when it fails to come up. It is killed
//! (SIGKILL) when its [`Proc`] is dropped, so a failing test leaves nothing running.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running child process.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    /// Keeps a temporary log file alive (and removes it at the end) when the caller gave no path.
    _temp_log: Option<tempfile::TempPath>,
}

impl Proc {
    /// Starts `cmd` with its output in a temporary log file. Panics, naming `name`, when it cannot
    /// be started at all.
    pub fn spawn(name: &str, cmd: Command) -> Proc {
        let temp = tempfile::Builder::new()
            .prefix(&format!("keyrotd-test-{}-", name.replace(' ', "-")))
            .suffix(".log")
            .tempfile()
            .expect("cannot create a temp file for a child's log")
            .into_temp_path();
        let path = temp.to_path_buf();
        let mut p = Proc::spawn_logging_to(name, cmd, &path);
        p._temp_log = Some(temp);
        p
    }

    /// Starts `cmd` with its output appended to `log`.
    pub fn spawn_logging_to(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open the {name} log {}: {e}", log.display()));
        let err = out.try_clone().expect("a second handle on the log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", cmd.get_program()));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
            _temp_log: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Everything the child has printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status, once the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// The TCP ports the child listens on now (IPv4).
    pub fn listening_ports(&self) -> Vec<u16> {
        let pid = self.pid();
        let inodes = socket_inodes(pid);
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
        let mut ports: Vec<u16> = table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
                if *state != "0A" || !inodes.contains(*inode) {
                    return None;
                }
                u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
            })
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Waits until the child listens on a port that passes `ready` (e.g. answers a health check) and
    /// returns it. Panics with the child's log when it exits first or `timeout` passes.
    pub fn wait_port(&mut self, timeout: Duration, mut ready: impl FnMut(u16) -> bool) -> u16 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before it was ready; its log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if let Some(port) = self.listening_ports().into_iter().find(|p| ready(*p)) {
                return port;
            }
            assert!(
                Instant::now() < deadline,
                "{} was not ready within {timeout:?} (listening on {:?}); its log:\n{}",
                self.name,
                self.listening_ports(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, `HUP`...).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -{sig} {} failed", self.name);
    }

    /// Waits for the child to exit by itself; `None` when it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap: a crash, nothing runs after it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The inodes of the sockets process `pid` holds open (`/proc/PID/fd/N -> socket:[INODE]`).
fn socket_inodes(pid: u32) -> HashSet<String> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            t.strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
                .map(String::from)
        })
        .collect()
}

/// The HTTP status of `GET path` on 127.0.0.1:port, or `None` when nothing answers HTTP there. Plain
/// TCP, so it needs no runtime and can be used while waiting for a child.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 32];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let line = std::str::from_utf8(&head[..n]).ok()?;
    line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

/// A loopback port that refuses connections for as long as the returned socket lives: it is bound
/// (so nothing else can take it) but never listens, so a connection attempt gets a reset at once.
pub fn refusing_port() -> (std::net::SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().expect("a bound socket has an address");
    (addr, socket)
}
