//! What the soak counts while it runs (faults injected, checks made, answers seen, invariants broken)
//! and the report it prints at the end.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// At most this many violations are kept word for word; the rest are only counted.
const KEEP_VIOLATIONS: usize = 60;

#[derive(Default)]
struct Counts {
    faults: BTreeMap<String, u64>,
    checks: BTreeMap<&'static str, u64>,
    manual: BTreeMap<String, u64>,
    violations: Vec<String>,
    violation_count: u64,
    healthz_slowest: Duration,
}

/// The soak's counters, shared by its tasks.
pub struct Tally {
    started: Instant,
    counts: Mutex<Counts>,
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            started: Instant::now(),
            counts: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn fault(&self, kind: &str) {
        *self.lock().faults.entry(kind.to_string()).or_default() += 1;
    }

    pub fn manual(&self, answer: &str) {
        *self.lock().manual.entry(answer.to_string()).or_default() += 1;
    }

    /// One check of `invariant` was made; `broken` says what was wrong, if anything.
    pub fn check(&self, invariant: &'static str, broken: Option<String>) {
        let mut c = self.lock();
        *c.checks.entry(invariant).or_default() += 1;
        if let Some(what) = broken {
            c.violation_count += 1;
            let line = format!(
                "[{:>6.1}s] {invariant}: {what}",
                self.elapsed().as_secs_f64()
            );
            // Shown as it happens, so a long run that breaks something early says so at once.
            let _ = writeln!(std::io::stderr(), "soak: VIOLATION {line}");
            if c.violations.len() < KEEP_VIOLATIONS {
                c.violations.push(line);
            }
        }
    }

    pub fn healthz_latency(&self, d: Duration) {
        let mut c = self.lock();
        c.healthz_slowest = c.healthz_slowest.max(d);
    }

    pub fn violations(&self) -> u64 {
        self.lock().violation_count
    }

    pub fn faults_total(&self) -> u64 {
        self.lock().faults.values().sum()
    }

    pub fn checks_total(&self) -> u64 {
        self.lock().checks.values().sum()
    }
}

/// Rotations as the audit log tells them (it survives restarts, unlike the metrics).
#[derive(Default)]
pub struct Rotations {
    pub by_outcome: BTreeMap<String, u64>,
    pub by_trigger: BTreeMap<String, u64>,
    pub rerotations: BTreeMap<String, u64>,
    /// Rotation ids per key, oldest first.
    pub ids: BTreeMap<String, Vec<String>>,
}

impl Rotations {
    /// Reads `audit.jsonl`: one outcome per rotation (`finished`, `aborted`, or a resumed rotation's
    /// `recovered`), its trigger from `started`, and every `rerotation` by reason.
    pub fn from_audit(text: &str) -> Rotations {
        let mut r = Rotations::default();
        let mut seen = std::collections::HashSet::new();
        for rec in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            let field = |name: &str| rec[name].as_str().unwrap_or("").to_string();
            let (event, id) = (field("event"), field("rotation_id"));
            match event.as_str() {
                "started" => {
                    *r.by_trigger.entry(field("trigger")).or_default() += 1;
                    r.ids.entry(field("key")).or_default().push(id);
                }
                // Its `reason` is the rotation's; `detail` is why it regenerates again.
                "rerotation" => *r.rerotations.entry(field("detail")).or_default() += 1,
                "finished" | "aborted" | "recovered"
                    if !rec["outcome"].is_null() && seen.insert(id.clone()) =>
                {
                    *r.by_outcome.entry(field("outcome")).or_default() += 1;
                }
                _ => {}
            }
        }
        r
    }

    pub fn total(&self) -> u64 {
        self.by_outcome.values().sum()
    }
}

fn list(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The end of the run, in numbers.
pub struct Summary {
    pub seed: u64,
    pub minutes: f64,
    pub keys: usize,
    pub rotations: Rotations,
    pub regenerations: u64,
    pub out_of_band: u64,
    pub converged_after: Option<Duration>,
    pub consistent: Vec<String>,
    pub flagged: Vec<String>,
    /// Dependents whose key authenticates at the end (not an invariant: a dependent whose reload
    /// failed keeps a dead key until its next rotation, which the degraded outcome reports).
    pub dependents_ok: usize,
}

impl Tally {
    /// The report, to stderr written directly: the test harness does not capture it, so it shows in
    /// the test command's output as well as in `scripts/soak.sh`'s.
    pub fn print_report(&self, s: &Summary) {
        let c = self.lock();
        let mut out = vec![
            "== keyrotd chaos soak ==".to_string(),
            format!("seed: {}", s.seed),
            format!(
                "minutes: {} of faults ({:.1} min in all, convergence included)",
                s.minutes,
                self.elapsed().as_secs_f64() / 60.0
            ),
            format!("keys: {}", s.keys),
        ];
        out.extend(rotation_lines(s, &c));
        out.push(format!(
            "faults injected: {}",
            c.faults.values().sum::<u64>()
        ));
        out.extend(c.faults.iter().map(|(k, v)| format!("  {k:<44} {v}")));
        out.push(format!(
            "invariant checks: {}",
            c.checks.values().sum::<u64>()
        ));
        out.extend(c.checks.iter().map(|(k, v)| format!("  {k:<44} {v}")));
        out.push(format!(
            "  slowest /healthz answer: {} ms",
            c.healthz_slowest.as_millis()
        ));
        out.extend(end_lines(s, &c));
        let _ = std::io::stderr().write_all((out.join("\n") + "\n").as_bytes());
    }
}

fn rotation_lines(s: &Summary, c: &Counts) -> Vec<String> {
    vec![
        format!(
            "rotations: {} ({})",
            s.rotations.total(),
            list(&s.rotations.by_outcome)
        ),
        format!("  by trigger: {}", list(&s.rotations.by_trigger)),
        format!(
            "  re-rotations: {} ({})",
            s.rotations.rerotations.values().sum::<u64>(),
            list(&s.rotations.rerotations)
        ),
        format!(
            "  regenerations counted at the portals: {} (and {} out-of-band rotations)",
            s.regenerations, s.out_of_band
        ),
        format!(
            "  manual rotations requested through the API: {} (answers: {})",
            c.manual.values().sum::<u64>(),
            list(&c.manual)
        ),
    ]
}

fn end_lines(s: &Summary, c: &Counts) -> Vec<String> {
    let flagged = if s.flagged.is_empty() {
        String::new()
    } else {
        format!(" ({})", s.flagged.join(", "))
    };
    let settled = match s.converged_after {
        Some(d) => format!("settled {:.0} s after the faults stopped", d.as_secs_f64()),
        None => "not settled within the bound".into(),
    };
    let mut out = vec![
        format!(
            "end state: {} keys hold the portal's active key everywhere, {} flagged{flagged}; {settled}",
            s.consistent.len(),
            s.flagged.len(),
        ),
        format!(
            "  dependents authenticating at the end: {} of {}",
            s.dependents_ok, s.keys
        ),
    ];
    if c.violation_count == 0 {
        out.push("result: PASS (no invariant broken)".into());
    } else {
        out.push(format!("result: FAIL ({} violations)", c.violation_count));
        out.extend(c.violations.iter().map(|v| format!("  {v}")));
    }
    out
}
