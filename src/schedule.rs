//! When is a key next due: cron (5, 6 or 7 fields, `@daily`-style macros) in a time zone, a rotation
//! window, jitter, max age and catch-up. Pure functions of their inputs and an injected "now".

use chrono::{DateTime, Utc};

use crate::config::{Config, KeyConfig};

/// A parsed `schedule` expression. Keeps the operator's text for display.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub text: String,
}

impl Schedule {
    /// Parses 5-field cron (minute hour day-of-month month day-of-week), 6/7-field cron with seconds
    /// (and year), or a macro (`@yearly @annually @monthly @weekly @daily @midnight @hourly`).
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let _ = text;
        Err("schedule parsing is not built yet".into())
    }
}

/// A rotation window: days of the week and a daily time range, in the key's time zone.
#[derive(Debug, Clone)]
pub struct Window {
    pub days: String,
}

impl Window {
    /// `days` like "Mon-Fri" or "Mon,Wed,Sat-Sun"; `start`/`end` "HH:MM". `end` before `start` wraps
    /// past midnight.
    pub fn parse(days: &str, start: &str, end: &str) -> Result<Window, String> {
        let _ = (days, start, end);
        Err("window parsing is not built yet".into())
    }
}

/// Why a key is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DueReason {
    Schedule,
    MaxAge,
    CatchUp,
}

/// The next `count` scheduled run times of a key after `after` (cron in the key's time zone, moved into
/// the window; no jitter). Empty for manual-only keys.
pub fn next_runs(key: &KeyConfig, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
    let _ = (key, after, count);
    Vec::new()
}

/// The `keyrotd plan` table.
pub fn plan_table(config: &Config, now: DateTime<Utc>, count: usize) -> String {
    let _ = (config, now, count);
    String::new()
}

/// When a key is next due, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub at: DateTime<Utc>,
    pub reason: DueReason,
}

pub fn next_due(
    key: &KeyConfig,
    now: DateTime<Utc>,
    last_scheduled_run: Option<DateTime<Utc>>,
    last_rotated: Option<DateTime<Utc>>,
    jitter_sample: f64,
) -> Option<Due> {
    let _ = (key, now, last_scheduled_run, last_rotated, jitter_sample);
    None
}

impl Window {
    pub fn contains(&self, at: DateTime<Utc>, tz: chrono_tz::Tz) -> bool {
        let _ = (at, tz);
        true
    }
}
