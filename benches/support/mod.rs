//! What the benchmarks run against, started as real processes on free ports of 127.0.0.1: OpenBao,
//! moto, the simulators (`keyrotd-sim portal`, `dependent`, `proxy`) and the release `keyrotd` itself.
//! Every process writes its output to a log file in the benchmark's temporary directory and is killed
//! when its handle is dropped, so a benchmark that ends, or panics, leaves nothing running. A component
//! that cannot start fails the benchmark with its log; nothing is skipped.
//!
//! Kept apart from the integration tests' support code on purpose: a benchmark must run the same way
//! while the tests' helpers change shape.
#![allow(dead_code)]

pub mod daemon;
pub mod services;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The project root (where Cargo.toml is).
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `.tools/venv/bin`, where `scripts/install-tools.sh` puts `bao` and `moto_server`.
pub fn tools_bin() -> PathBuf {
    project_root().join(".tools/venv/bin")
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// A child process killed (SIGKILL) and reaped when dropped, its output in `log`.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `<dir>/<name>.log`.
    pub fn spawn(name: &str, dir: &Path, mut cmd: Command) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create a log file");
        let err = out.try_clone().expect("log file handle");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    /// Starts a `keyrotd-sim` subcommand and waits for its `listening on http://ADDR` line; returns
    /// the process and every `http://` URL in that line, the address it listens on first. The rest of
    /// its stdout and its stderr go to its log.
    pub fn spawn_sim(
        name: &str,
        dir: &Path,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> (Proc, Vec<String>) {
        let log = dir.join(format!("{name}.log"));
        let err = std::fs::File::create(&log).expect("create a log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd-sim"));
        cmd.args(args).envs(envs.iter().copied());
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start keyrotd-sim {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let mut proc = Proc {
            name: name.into(),
            child: Some(child),
            log,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| proc.fail("did not announce that it listens"));
        let urls: Vec<String> = line
            .split_whitespace()
            .filter(|w| w.starts_with("http://"))
            .map(|w| w.trim_end_matches([')', ',', ';']).to_string())
            .collect();
        if urls.is_empty() {
            proc.fail(&format!("printed an unexpected readiness line {line:?}"));
        }
        (proc, urls)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Panics with `what` and the tail of the process's log, after killing it.
    pub fn fail(&mut self, what: &str) -> ! {
        self.kill();
        panic!(
            "{} {what}; the end of its log ({}):\n{}",
            self.name,
            self.log.display(),
            self.log_tail(40)
        );
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, then waits up to `timeout` for the exit (SIGKILL after). Returns whether it exited
    /// by itself.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

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

/// Polls `url` until it answers a status for which `ok` holds; panics with the process's log after
/// `timeout`.
pub async fn wait_http(proc: &mut Proc, url: &str, timeout: Duration, ok: fn(u16) -> bool) {
    let http = reqwest::Client::new();
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(r) = http.get(url).timeout(Duration::from_secs(2)).send().await
            && ok(r.status().as_u16())
        {
            return;
        }
        if !proc.running() {
            proc.fail("exited before it answered");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proc.fail(&format!("did not answer {url} within {timeout:?}"));
}

/// What `/proc/<pid>` says about a process now.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// VmRSS, KiB.
    pub rss_kib: u64,
    /// VmHWM (peak resident set since start), KiB.
    pub hwm_kib: u64,
    /// User + system CPU time, seconds.
    pub cpu_s: f64,
    /// Open file descriptors.
    pub fds: usize,
    pub threads: u64,
}

/// Reads `/proc/<pid>/status`, `stat` and `fd`. Panics when the process is gone.
pub fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e} (did the process exit?)"));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces): utime is the
    // 14th field of the line, stime the 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    ProcStats {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu_s: ticks.iter().sum::<u64>() as f64 / clock_ticks_per_second(),
        fds,
        threads: field("Threads:"),
    }
}

/// `getconf CLK_TCK`: the unit of the CPU times in `/proc/<pid>/stat` (100 on Linux almost always).
pub fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The load average line of `/proc/loadavg` (1, 5, 15 minutes), to print beside the figures.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The `p` quantile (0..=1) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A random alphanumeric token of `n` characters.
pub fn token(n: usize) -> String {
    use rand::RngExt;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// The benchmark's temporary directory, removed when dropped unless `KEEP_BENCH_DIR` is set (then
/// its path is printed: every process's log is in it).
pub struct BenchDir {
    pub path: PathBuf,
    keep: bool,
}

impl BenchDir {
    pub fn new(prefix: &str) -> BenchDir {
        let path = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create a temporary directory")
            .keep();
        let keep = std::env::var_os("KEEP_BENCH_DIR").is_some();
        if keep {
            eprintln!("bench: keeping {} (KEEP_BENCH_DIR)", path.display());
        }
        BenchDir { path, keep }
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
