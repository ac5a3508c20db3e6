//! When is a key next due: cron (5, 6 or 7 fields, `@daily`-style macros) in a time zone, a rotation
//! window, jitter, max age and catch-up. Pure functions of their inputs and an injected "now".

use chrono::{DateTime, Utc};

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

#[allow(dead_code)]
fn _now() -> DateTime<Utc> {
    Utc::now()
}
