//! The portal's rotation checklist as data (`keyrotd plan KEY --checklist`): for one key, what to
//! check **before** a rotation (every destination, every dependent with its reload and verify, the
//! owner, the approval), what to expect **during** it (the invalidation window, from the last
//! rotations keyrotd recorded), and what watches it **after** (probes, reconcile, alerts,
//! notifications). Built from the configuration and the key's journal; pure, so a test reads it.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, KeyConfig, NotifyKind, OwnerView, ReloadHook};
use crate::journal::KeyJournal;

/// One key's checklist.
#[derive(Debug, Clone, Serialize)]
pub struct Checklist {
    pub key: String,
    pub provider: String,
    pub before: Before,
    pub during: During,
    pub after: After,
}

#[derive(Debug, Clone, Serialize)]
pub struct Before {
    /// Who must be there (`null`: nobody is named; say who before rotating).
    pub owner: Option<OwnerView>,
    /// Scheduled rotations wait this long for `keyrotd approve` (`null`: they do not wait).
    pub approval_timeout: Option<String>,
    pub destinations: Vec<Destination>,
    pub dependents: Vec<Dependent>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Destination {
    pub store: String,
    /// vault, aws or file.
    pub kind: String,
    pub target: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dependent {
    pub name: String,
    pub reads_from: Vec<String>,
    /// How it is told to reload (`POST http://...`, `command systemctl reload nginx`), or `null`.
    pub reload: Option<String>,
    /// What proves it works (`GET http://... expects 200`), or `null`.
    pub verify: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct During {
    /// The invalidation window of the last rotations keyrotd recorded (`null`: none yet).
    pub expected_window: Option<Window>,
    /// The longest it can last: every destination retried until `store_deadline`, then the slowest
    /// hook with its retries.
    pub window_bound_seconds: f64,
}

/// Figures of the last rotations' invalidation windows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Window {
    pub rotations: usize,
    pub median_seconds: f64,
    pub max_seconds: f64,
    pub last_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct After {
    /// Dependents probed after the rotation, how long and how often (`null`: no watch).
    pub watch: Option<Watch>,
    /// How often reconcile compares the portal with every destination (`null`: off).
    pub reconcile_every: Option<String>,
    /// The alert rules (prometheus/alerts.yml) that watch this key, each with what it catches.
    pub alerts: Vec<Alert>,
    /// The `[notify.*]` targets told about it.
    pub notify: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Watch {
    pub period: String,
    pub every: String,
    pub probes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub name: &'static str,
    pub catches: &'static str,
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The checklist of `key`, from `config` and what its journal remembers.
pub fn build(config: &Config, key: &KeyConfig, journal: &KeyJournal) -> Checklist {
    Checklist {
        key: key.name.clone(),
        provider: key.provider.clone(),
        before: before(config, key),
        during: During {
            expected_window: window(&journal.windows_ms),
            window_bound_seconds: window_bound(key).as_secs_f64(),
        },
        after: after(config, key),
    }
}

fn before(config: &Config, key: &KeyConfig) -> Before {
    let destinations = key
        .destinations
        .iter()
        .map(|d| Destination {
            store: d.store.clone(),
            kind: config
                .stores
                .get(&d.store)
                .map_or("?", |s| s.kind())
                .to_string(),
            target: d.target.to_string(),
        })
        .collect();
    let dependents = key
        .dependents
        .iter()
        .map(|d| Dependent {
            name: d.name.clone(),
            reads_from: d.reads_from.clone(),
            reload: d.reload.as_ref().map(|r| match r {
                ReloadHook::Http { url, method, .. } => format!("{method} {url}"),
                ReloadHook::Command { command, .. } => format!("command {}", command.join(" ")),
            }),
            verify: d
                .verify
                .as_ref()
                .map(|v| format!("GET {} expects {}", v.url, v.expect_status)),
        })
        .collect();
    Before {
        owner: key.owner.as_ref().map(|o| o.view()),
        approval_timeout: key.approval.as_ref().map(|a| human(a.timeout)),
        destinations,
        dependents,
    }
}

/// Median, maximum and last of the recorded windows (milliseconds).
fn window(windows_ms: &[u64]) -> Option<Window> {
    let last = *windows_ms.last()?;
    let mut sorted = windows_ms.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2] as f64
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) as f64 / 2.0
    };
    let ms = |v: f64| v / 1000.0;
    Some(Window {
        rotations: n,
        median_seconds: ms(median),
        max_seconds: ms(*sorted.last()? as f64),
        last_seconds: ms(last as f64),
    })
}

/// `store_deadline`, then the slowest reload hook with all its attempts.
fn window_bound(key: &KeyConfig) -> Duration {
    let hooks = key
        .dependents
        .iter()
        .filter_map(|d| d.reload.as_ref())
        .map(|r| match r {
            ReloadHook::Http {
                timeout, retries, ..
            }
            | ReloadHook::Command {
                timeout, retries, ..
            } => timeout.saturating_mul(retries.saturating_add(1)),
        })
        .max()
        .unwrap_or_default();
    key.store_deadline.saturating_add(hooks)
}

fn after(config: &Config, key: &KeyConfig) -> After {
    let probes: Vec<String> = key
        .dependents
        .iter()
        .filter(|d| d.verify.is_some())
        .map(|d| d.name.clone())
        .collect();
    let watch = (!key.watch.is_zero() && !probes.is_empty()).then(|| Watch {
        period: human(key.watch),
        every: human(key.watch_interval),
        probes: probes.clone(),
    });
    let mut notify = key.notify.clone();
    if let Some(a) = &key.approval {
        notify.extend(a.notify.iter().filter(|n| !key.notify.contains(n)).cloned());
    }
    After {
        watch,
        reconcile_every: config.daemon.reconcile_interval.map(human),
        alerts: alerts(config, key, !probes.is_empty()),
        notify,
    }
}

/// The alert rules of prometheus/alerts.yml, what each catches, and whether it can fire for a key
/// (a test checks that each exists).
type Rule = (
    &'static str,
    &'static str,
    fn(&Config, &KeyConfig, bool) -> bool,
);

const ALERTS: &[Rule] = &[
    (
        "KeyrotdRotationFailed",
        "a rotation ended failed",
        |_, _, _| true,
    ),
    (
        "KeyrotdRotationDegraded",
        "a destination or a reload hook lagged",
        |_, _, _| true,
    ),
    (
        "KeyrotdKeyLost",
        "the old key is gone and re-rotation fails",
        |_, _, _| true,
    ),
    (
        "KeyrotdDrift",
        "no destination holds the portal's active key (first contact included)",
        |_, _, _| true,
    ),
    (
        "KeyrotdKeyNotActive",
        "the portal says the key is not Active",
        |_, _, _| true,
    ),
    (
        "KeyrotdJournalBlocked",
        "the key's journal was unreadable at start",
        |_, _, _| true,
    ),
    (
        "KeyrotdPostRotationAuthFailures",
        "a dependent still fails authentication after the rotation",
        |_, _, probed| probed,
    ),
    (
        "KeyrotdPostRotationAuthFailuresSeen",
        "a dependent failed authentication and recovered",
        |_, _, probed| probed,
    ),
    (
        "KeyrotdKeyOlderThanMaxAge",
        "the key outlived its max_age",
        |_, k, _| k.max_age.is_some(),
    ),
    (
        "KeyrotdNoRecentSuccess",
        "no success in twice the schedule period",
        |_, k, _| k.schedule.is_some(),
    ),
    (
        "KeyrotdRotationAwaitingApproval",
        "a due rotation waits for `keyrotd approve`",
        |_, k, _| k.approval.is_some(),
    ),
    (
        "KeyrotdRotationSkipped",
        "a due rotation got no approval in time",
        |_, k, _| k.approval.is_some(),
    ),
    (
        "KeyrotdNotificationsFailing",
        "notifications to the owner cannot be delivered",
        |_, k, _| !k.notify.is_empty(),
    ),
    (
        "KeyrotdKeyWithoutHolder",
        "no replica holds the key's lease",
        |c, _, _| c.coordination.is_some(),
    ),
];

/// The alert rules that can fire for `key` (`probed`: a dependent of it has a `verify`).
pub fn alerts(config: &Config, key: &KeyConfig, probed: bool) -> Vec<Alert> {
    ALERTS
        .iter()
        .filter(|(_, _, applies)| applies(config, key, probed))
        .map(|(name, catches, _)| Alert { name, catches })
        .collect()
}

/// The checklist for people.
pub fn text(c: &Checklist, config: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Checklist for {} (provider {})", c.key, c.provider);
    before_text(&mut out, c);
    during_text(&mut out, &c.during);
    after_text(&mut out, &c.after, config);
    out
}

fn before_text(out: &mut String, c: &Checklist) {
    let _ = writeln!(out, "\nBefore: identify every service that uses the key");
    match &c.before.owner {
        Some(o) => {
            let mut line = format!("  owner:       {}", o.name);
            if let Some(contact) = &o.contact {
                line.push_str(&format!(" <{contact}>"));
            }
            if let Some(r) = &o.runbook {
                line.push_str(&format!(", runbook {r}"));
            }
            let _ = writeln!(out, "{line}");
        }
        None => {
            let _ = writeln!(
                out,
                "  owner:       NONE: name one (owner = {{ name = ... }})"
            );
        }
    }
    match &c.before.approval_timeout {
        Some(t) => {
            let _ = writeln!(
                out,
                "  approval:    scheduled rotations wait up to {t} for `keyrotd approve {}`",
                c.key
            );
        }
        None => {
            let _ = writeln!(out, "  approval:    not required");
        }
    }
    for d in &c.before.destinations {
        let _ = writeln!(
            out,
            "  destination: {} ({}) -> {}",
            d.store, d.kind, d.target
        );
    }
    if c.before.dependents.is_empty() {
        let _ = writeln!(
            out,
            "  dependents:  none declared: every service using the key must read a destination"
        );
    }
    for d in &c.before.dependents {
        let _ = writeln!(
            out,
            "  dependent:   {} reads {}; reload {}; verify {}",
            d.name,
            d.reads_from.join(", "),
            d.reload.as_deref().unwrap_or("none"),
            d.verify.as_deref().unwrap_or("none"),
        );
    }
}

fn during_text(out: &mut String, d: &During) {
    let _ = writeln!(
        out,
        "\nDuring: regenerate and update every destination in the same window"
    );
    match &d.expected_window {
        Some(w) => {
            let _ = writeln!(
                out,
                "  invalidation window: median {:.3}s, max {:.3}s, last {:.3}s (last {} rotations)",
                w.median_seconds, w.max_seconds, w.last_seconds, w.rotations
            );
        }
        None => {
            let _ = writeln!(out, "  invalidation window: no rotation recorded yet");
        }
    }
    let _ = writeln!(
        out,
        "  at most {:.0}s (store_deadline, then the slowest reload hook with its retries)",
        d.window_bound_seconds
    );
}

fn after_text(out: &mut String, a: &After, config: &Config) {
    let _ = writeln!(
        out,
        "\nAfter: restart dependents and monitor authentication failures"
    );
    match &a.watch {
        Some(w) => {
            let _ = writeln!(
                out,
                "  watch:       {} every {}, probing {}",
                w.period,
                w.every,
                w.probes.join(", ")
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  watch:       none (no dependent has a verify, or watch = \"0s\")"
            );
        }
    }
    let _ = writeln!(
        out,
        "  reconcile:   {}",
        a.reconcile_every
            .as_deref()
            .map_or("off".to_string(), |e| format!("every {e}"))
    );
    for alert in &a.alerts {
        let _ = writeln!(out, "  alert:       {}: {}", alert.name, alert.catches);
    }
    for n in &a.notify {
        let kind = match config.notify.get(n).map(|t| &t.kind) {
            Some(NotifyKind::Webhook { .. }) => "webhook",
            Some(NotifyKind::Command { .. }) => "command",
            None => "?",
        };
        let _ = writeln!(out, "  notify:      {n} ({kind})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_figures_come_from_the_recorded_rotations() {
        assert_eq!(window(&[]), None);
        assert_eq!(
            window(&[120, 80, 400]),
            Some(Window {
                rotations: 3,
                median_seconds: 0.12,
                max_seconds: 0.4,
                last_seconds: 0.4,
            })
        );
        assert_eq!(window(&[100, 300]).unwrap().median_seconds, 0.2);
    }
}
