//! The invariants checked while the soak runs: `/healthz` every second, and every few seconds the
//! budget at each portal, a search of everything keyrotd wrote or answered for secrets, and a search of
//! every log for a panic.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use regex::Regex;

use super::Soak;

/// A file longer than this is read from where the last search stopped (logs, the audit log grow by
/// appending); shorter ones (journals, sidecars: rewritten whole) are read whole every time.
const WHOLE_BELOW: u64 = 64 * 1024;
/// Re-read before the last position, so a secret written across two searches is still found whole.
const OVERLAP: u64 = 256;
const PERIOD: Duration = Duration::from_secs(5);

/// What a secret looks like in keyrotd's outputs: any portal key (`aos_sk_live_` and at least 8 of
/// its characters, so a cut-off key counts too), or any credential keyrotd was given. The names, not
/// the values, are what a violation shows.
pub struct LeakSearch {
    re: Regex,
    credentials: Vec<(String, String)>,
}

impl LeakSearch {
    pub fn new(credentials: &[(String, String)]) -> LeakSearch {
        LeakSearch::exact(&["aos_sk_live_[A-Za-z0-9]{8}".to_string()], credentials)
    }

    /// A search for `patterns` (regular expressions) and the credentials (literally).
    pub fn exact(patterns: &[String], credentials: &[(String, String)]) -> LeakSearch {
        let alternatives: Vec<String> = patterns
            .iter()
            .cloned()
            .chain(credentials.iter().map(|(_, v)| regex::escape(v)))
            .collect();
        LeakSearch {
            re: Regex::new(&alternatives.join("|")).expect("the secrets make a regex"),
            credentials: credentials.to_vec(),
        }
    }

    /// What leaked in `text`, named without its value.
    pub fn find(&self, text: &str) -> Option<String> {
        let m = self.re.find(text)?;
        let what = self
            .credentials
            .iter()
            .find(|(_, v)| v == m.as_str())
            .map_or("a portal key (aos_sk_live_...)".to_string(), |(name, _)| {
                format!("credential ${name}")
            });
        Some(what)
    }
}

impl Soak {
    /// No secret in `text`, which came from `place`.
    pub fn leak_check(&self, place: &str, text: &str) {
        let broken = self
            .leaks
            .find(text)
            .map(|what| format!("{what} in {place}"));
        self.tally.check("no secret in any output", broken);
    }
}

/// `/healthz` every second. A failure while the soak has withdrawn the admin URL (or withdrew it
/// during the request) is the soak's own restart; any other is a violation.
pub async fn healthz_monitor(s: Arc<Soak>) {
    while !s.stop.is_cancelled() {
        tokio::select! {
            _ = s.stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let Some(base) = s.admin_url() else { continue };
        let start = Instant::now();
        let answer = s.http.get(format!("{base}/healthz")).send().await;
        let ok = matches!(&answer, Ok(r) if r.status().as_u16() == 200);
        if ok {
            s.tally.healthz_latency(start.elapsed());
            s.tally.check("/healthz answers (outside restarts)", None);
        } else if s.admin_url().as_deref() == Some(base.as_str()) {
            let why = match answer {
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => format!("no answer: {e}"),
            };
            s.tally
                .check("/healthz answers (outside restarts)", Some(why));
        }
    }
}

/// Every [`PERIOD`]: the budget at each portal, secrets in the files and the API's answers, panics in
/// the logs.
pub async fn periodic(s: Arc<Soak>) {
    let mut files = FileScan::default();
    let mut unheld = Unheld::default();
    let mut round = 0u64;
    while !s.stop.is_cancelled() {
        tokio::select! {
            _ = s.stop.cancelled() => return,
            _ = tokio::time::sleep(PERIOD) => {}
        }
        round += 1;
        budget(&s).await;
        unheld.check(&s).await;
        scan_files(&s, &mut files);
        api_answers(&s).await;
        if round.is_multiple_of(6) {
            simulator_panics(&s);
        }
    }
}

/// Regenerations counted at each portal stay within the key's budget (the soak is shorter than a day,
/// so every regenerate of the run is in the last 24 hours).
pub async fn budget(s: &Soak) {
    for k in &s.world.keys {
        let done = k.portal.state().await.regenerations;
        let broken = (done > u64::from(k.plan.budget)).then(|| {
            format!(
                "{}: {done} regenerations, max_regenerations_per_day = {}",
                k.plan.name, k.plan.budget
            )
        });
        s.tally
            .check("regenerations within max_regenerations_per_day", broken);
    }
}

/// How long a key may have its portal's active key in no destination before keyrotd must flag it:
/// longer than any rotation takes (a regenerate answered at the provider timeout, then the store
/// deadline), and than reconcile takes to notice someone else's rotation.
const UNHELD_BOUND: Duration = Duration::from_secs(60);

/// Since when each key's active key has been in none of its destinations (a lost key, or drift).
#[derive(Default)]
struct Unheld {
    since: HashMap<String, Instant>,
    reported: std::collections::HashSet<String>,
}

impl Unheld {
    /// A key is never lost unnoticed: once its portal's active key has been in none of its
    /// destinations for [`UNHELD_BOUND`], keyrotd flags it (`keyrotd_drift` 1, or the journal's `lost`
    /// with a failed rotation). Looked at only while the daemon runs, and once it has looked at the
    /// key (its metrics start afresh at each start, and its first look at the key sets
    /// `keyrotd_drift`).
    async fn check(&mut self, s: &Soak) {
        let Some(metrics) = s.metrics().await else {
            return;
        };
        for k in s.world.managed(s.variant()) {
            let name = k.plan.name.clone();
            let active = k.portal.state().await.fingerprint;
            let held = s.world.held(&k.plan).await;
            if held
                .iter()
                .any(|(_, fp)| fp.as_deref() == Some(active.as_str()))
            {
                self.since.remove(&name);
                self.reported.remove(&name);
                continue;
            }
            let since = *self.since.entry(name.clone()).or_insert_with(Instant::now);
            if since.elapsed() < UNHELD_BOUND || self.reported.contains(&name) {
                continue;
            }
            let flagged = super::settle::flag(s, &name, &metrics).is_some();
            // A daemon just (re)started has not looked at the key yet (`observing`): its drift flag
            // is set by that first look, so the key is judged once it has been.
            if !flagged && s.observing(&name).await {
                continue;
            }
            let broken = (!flagged).then(|| {
                format!(
                    "{name}: no destination has held the portal's active key for {:.0} s, and keyrotd flags nothing (journal {})",
                    since.elapsed().as_secs_f64(),
                    s.world.journal(&name)
                )
            });
            if broken.is_some() {
                self.reported.insert(name);
            }
            s.tally.check("a lost key is flagged within 60 s", broken);
        }
    }
}

/// What new was written to keyrotd's files since the last look: searched for secrets, and the daemon
/// logs for panics.
fn scan_files(s: &Soak, files: &mut FileScan) {
    for (path, text) in files.read_new(&output_files(s)) {
        let place = path.display().to_string();
        s.leak_check(&place, &text);
        if place.ends_with(".log") {
            let broken = text
                .contains("panicked at")
                .then(|| format!("{place}: {}", around(&text, "panicked at")));
            s.tally.check("no panic in any log", broken);
        }
    }
}

/// Every file keyrotd writes that must not hold a secret: the state directory (journals, audit log,
/// lock, journals set aside), the daemon logs, and the key files' sidecars. (The key files hold the
/// key by design, and so do the temp files of a write in progress.)
pub fn output_files(s: &Soak) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(&s.world.state_dir(), &mut out);
    out.extend(s.world.daemon_logs());
    let mut keys = Vec::new();
    walk(&s.world.keys_dir(), &mut keys);
    out.extend(
        keys.into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".meta.json")),
    );
    out
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// The line around the first `needle` in `text`.
pub fn around(text: &str, needle: &str) -> String {
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect()
}

/// Where each file was read up to.
#[derive(Default)]
pub struct FileScan {
    offsets: HashMap<PathBuf, u64>,
}

impl FileScan {
    /// The text of each file written since the last call (small files whole).
    pub fn read_new(&mut self, paths: &[PathBuf]) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        for path in paths {
            let Ok(mut f) = std::fs::File::open(path) else {
                continue;
            };
            let len = f.metadata().map_or(0, |m| m.len());
            let seen = self.offsets.get(path).copied().unwrap_or(0);
            let from = if len < WHOLE_BELOW || len < seen {
                0
            } else {
                seen.saturating_sub(OVERLAP)
            };
            if len == seen && len >= WHOLE_BELOW {
                continue;
            }
            let mut bytes = Vec::new();
            if f.seek(SeekFrom::Start(from)).is_ok() && f.read_to_end(&mut bytes).is_ok() {
                self.offsets.insert(path.clone(), from + bytes.len() as u64);
                out.push((path.clone(), String::from_utf8_lossy(&bytes).into_owned()));
            }
        }
        out
    }
}

/// The API's answers a user would read: `/metrics` (searched inside `metrics()`), every key's view.
async fn api_answers(s: &Soak) {
    let _ = s.metrics().await;
    if let Ok((_, text)) = s.api_get("/v1/keys").await {
        s.leak_check("GET /v1/keys", &text);
    }
}

/// The simulators are Rust too: none may have panicked either.
pub fn simulator_panics(s: &Soak) {
    for k in &s.world.keys {
        for (what, log) in [
            ("portal", k.portal.log_text()),
            ("dependent", k.dependent.log_text()),
        ] {
            let broken = log
                .contains("panicked at")
                .then(|| format!("{what} of {}: {}", k.plan.name, around(&log, "panicked at")));
            s.tally.check("no panic in any log", broken);
        }
    }
}

/// One line of progress (the 30-minute run would otherwise be silent).
pub fn progress(s: &Soak) {
    let r = s.rotations();
    let line = format!(
        "soak: {:.0} s: {} rotations ({:?}), {} faults, {} checks, {} violations\n",
        s.tally.elapsed().as_secs_f64(),
        r.total(),
        r.by_outcome,
        s.tally.faults_total(),
        s.tally.checks_total(),
        s.tally.violations()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}
