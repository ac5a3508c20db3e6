//! When is a key next due: cron (5, 6 or 7 fields, `@daily`-style macros) in a time zone, a rotation
//! window, jitter, max age and catch-up. Pure functions of their inputs and an injected "now" (and an
//! injected random sample for jitter): nothing here reads the clock except
//! [`all_runs_outside_window`], the validator's convenience wrapper.
//!
//! # Cron dialect
//! keyrotd's cron is Unix cron, optionally with a seconds field in front and a year field at the end:
//! - 5 fields `minute hour day-of-month month day-of-week` (runs at second 0);
//! - 6 fields `second minute hour day-of-month month day-of-week`;
//! - 7 fields `second minute hour day-of-month month day-of-week year` (year 1970-2100);
//! - macros `@yearly`/`@annually`, `@monthly`, `@weekly` (Sunday 00:00), `@daily`/`@midnight`,
//!   `@hourly`.
//!
//! Day-of-week numbers are Unix numbers in every form: 0 or 7 = Sunday, 1 = Monday ... 6 = Saturday;
//! names `Mon`..`Sun` (or full names) work too. (The `cron` crate underneath counts 1 = Sunday, Quartz
//! style; we translate, so `0 9 * * 1` is Monday 09:00.) As in Unix cron, when both day-of-month and
//! day-of-week are restricted (neither starts with `*`), a day matches if *either* matches:
//! `0 9 1 * Mon` runs on the 1st and on every Monday.
//!
//! # Time zones and daylight saving time
//! Occurrences are computed on the key's local wall clock (`timezone`):
//! - a local time that does not exist (02:30 on the spring-forward day in Europe/Zurich) is **skipped**
//!   (the `cron` crate's behaviour, kept on purpose): a daily 02:30 schedule does not run that day, an
//!   hourly one runs at 01:00 and 03:00. `max_age` is the safety net for rare schedules;
//! - a local time that happens twice (02:30 on the fall-back day) runs **once**, at its first
//!   (summer-time) occurrence; an hourly schedule runs at 02:00 CEST and then 03:00 CET.
//!
//! # Window, jitter, catch-up, max age
//! - A due time outside the window waits for the window's next opening ([`Window::next_opening`]).
//! - Jitter is applied *after* moving into the window, and is bounded by what is left of that opening,
//!   so a jittered run never leaves the window and runs at a window's opening are still spread out.
//! - Catch-up: the engine passes when its last schedule-driven run started. A cron occurrence after
//!   that whose due time has already passed was missed (the daemon was down): with `catch_up` it is
//!   due now (moved into the window), several missed occurrences coalescing into one run; without, it is
//!   dropped. A first start (no previous run) catches up nothing.
//! - Max age: due at `last_rotated + max_age` (now if already past), moved into the window, no jitter.
//!   Without a known `last_rotated` there is no age to assess and no max-age due time.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{
    DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, TimeDelta, TimeZone, Timelike, Utc,
    Weekday,
};
use chrono_tz::Tz;

use crate::config::{Config, KeyConfig};

/// Bound on iterations when stepping through cron occurrences (DST skips, runs mapped into the same
/// window opening). Generous: a per-second schedule across a repeated DST hour needs ~7200.
const MAX_STEPS: usize = 20_000;

/// A parsed `schedule` expression. Keeps the operator's text for display.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub text: String,
    /// One cron schedule, or two whose union is meant (Unix day-of-month OR day-of-week). Shared:
    /// a parsed cron schedule holds every allowed value of every field, and keys with the same
    /// expression share one (see `config::load`).
    crons: std::sync::Arc<[cron::Schedule]>,
}

const FIELD_NAMES: [&str; 7] = [
    "second",
    "minute",
    "hour",
    "day-of-month",
    "month",
    "day-of-week",
    "year",
];
const FIELD_HELP: [&str; 7] = [
    "0-59",
    "0-59",
    "0-23",
    "1-31",
    "1-12 or Jan-Dec",
    "0-7 (0 and 7 = Sunday) or Mon-Sun",
    "1970-2100",
];

impl Schedule {
    /// Parses 5-field cron (minute hour day-of-month month day-of-week), 6/7-field cron with seconds
    /// (and year), or a macro (`@yearly @annually @monthly @weekly @daily @midnight @hourly`).
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err("schedule is empty (use a cron expression like \"0 9 * * Mon\" or a macro like \"@daily\")".into());
        }
        let expanded;
        let source = if trimmed.starts_with('@') {
            expanded = expand_macro(trimmed)?;
            expanded.as_str()
        } else {
            trimmed
        };
        let mut fields: Vec<&str> = source.split_whitespace().collect();
        match fields.len() {
            5 => fields.insert(0, "0"),
            6 | 7 => {}
            n => {
                return Err(format!(
                    "schedule \"{trimmed}\" has {n} fields; expected 5 (minute hour day-of-month month \
                     day-of-week), 6 (second first) or 7 (second first, year last)"
                ));
            }
        }
        let fields: Vec<String> = fields.into_iter().map(str::to_owned).collect();
        let (dow, dow_restricted) = translate_day_of_week(&fields[5]).map_err(|e| {
            format!(
                "schedule \"{trimmed}\": day-of-week field \"{}\": {e}",
                fields[5]
            )
        })?;
        let dom_restricted = !(fields[3].starts_with('*') || fields[3] == "?");

        // Each field on its own first, so an error names the field at fault.
        for (i, value) in fields.iter().enumerate() {
            if i == 5 {
                continue;
            }
            let mut probe: Vec<&str> = vec!["0", "0", "0", "*", "*", "*"];
            if i == 6 {
                probe.push(value);
            } else {
                probe[i] = value;
            }
            if let Err(e) = cron::Schedule::from_str(&probe.join(" ")) {
                return Err(format!(
                    "schedule \"{trimmed}\": {} field \"{value}\" is invalid (allowed: {}, `*`, lists \
                     `a,b`, ranges `a-b`, steps `*/n`){}",
                    FIELD_NAMES[i],
                    FIELD_HELP[i],
                    colon_detail(crate_error_text(&e))
                ));
            }
        }

        let build = |dom: &str, dow: &str| -> Result<cron::Schedule, String> {
            let mut parts = vec![
                fields[0].as_str(),
                fields[1].as_str(),
                fields[2].as_str(),
                dom,
                fields[4].as_str(),
                dow,
            ];
            if let Some(year) = fields.get(6) {
                parts.push(year);
            }
            cron::Schedule::from_str(&parts.join(" ")).map_err(|e| {
                format!(
                    "schedule \"{trimmed}\" is invalid{}",
                    colon_detail(crate_error_text(&e))
                )
            })
        };
        let crons = if dom_restricted && dow_restricted {
            vec![build(&fields[3], "*")?, build("*", &dow)?]
        } else {
            vec![build(&fields[3], &dow)?]
        };
        Ok(Schedule {
            text: trimmed.to_owned(),
            crons: crons.into(),
        })
    }

    /// The first occurrence strictly after `after`, on `tz`'s wall clock (DST rules in the module doc).
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        self.crons
            .iter()
            .filter_map(|c| cron_next_after(c, after, tz))
            .min()
    }

    /// The latest occurrence at or before `at`.
    pub fn latest_at_or_before(&self, at: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        self.crons
            .iter()
            .filter_map(|c| cron_latest_at_or_before(c, at, tz))
            .max()
    }

    /// The first occurrence at or after `at`.
    fn first_at_or_after(&self, at: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        self.next_after(at - TimeDelta::nanoseconds(1), tz)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn expand_macro(text: &str) -> Result<String, String> {
    let six = match text.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => "0 0 0 1 1 *",
        "@monthly" => "0 0 0 1 * *",
        "@weekly" => "0 0 0 * * Sun",
        "@daily" | "@midnight" => "0 0 0 * * *",
        "@hourly" => "0 0 * * * *",
        "@reboot" => {
            return Err(
                "schedule \"@reboot\" is not supported: keyrotd rotates on a calendar, not at start"
                    .into(),
            );
        }
        _ => {
            return Err(format!(
                "schedule \"{text}\" is not a known macro (known: @yearly, @annually, @monthly, \
                 @weekly, @daily, @midnight, @hourly)"
            ));
        }
    };
    Ok(six.to_owned())
}

/// The `cron` crate's own detail, flattened to one line, without the echo of the (internal) probe
/// expression it puts before a `^`, and with its off-by-one "less than" wording corrected.
fn crate_error_text(e: &cron::error::Error) -> String {
    let text = e.to_string();
    let detail = text
        .rsplit_once('^')
        .map_or(text.as_str(), |(_, after)| after);
    detail
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("must be less than", "must be at most")
}

/// `text` prefixed with ": " unless empty.
fn colon_detail(text: String) -> String {
    if text.is_empty() {
        text
    } else {
        format!(": {text}")
    }
}

const DAY_NAMES_FROM_SUNDAY: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

/// Parses one day name (`Mon`, `monday`...) into its index from Monday (0 = Monday).
fn weekday_from_name(name: &str) -> Option<Weekday> {
    Weekday::from_str(name).ok()
}

/// Translates a Unix day-of-week field (0/7 = Sunday, names, lists, ranges, steps) into the `cron`
/// crate's terms (names only). Returns the translated field and whether it restricts days (Vixie
/// rule: a field starting with `*` does not, for the day-of-month/day-of-week OR).
fn translate_day_of_week(field: &str) -> Result<(String, bool), String> {
    let restricted = !(field.starts_with('*') || field == "?");
    let mut days = [false; 7]; // indexed from Sunday
    for item in field.split(',') {
        let (base, step) = match item.split_once('/') {
            Some((base, step)) => {
                let step: u32 = step
                    .parse()
                    .ok()
                    .filter(|s| (1..=7).contains(s))
                    .ok_or_else(|| format!("step \"{step}\" must be a number from 1 to 7"))?;
                (base, Some(step))
            }
            None => (item, None),
        };
        let (from, to) = if base == "*" || base == "?" {
            (0, 6)
        } else if let Some((a, b)) = base.split_once('-') {
            let a = day_number(a)?;
            let mut b = day_number(b)?;
            if b == 0 && a > 0 {
                b = 7; // "Fri-Sun", "5-0": Sunday at the end of a range is day 7
            }
            if a > b {
                return Err(format!(
                    "range \"{base}\" runs backwards (use a list, e.g. \"Fri,Sat,Sun,Mon\")"
                ));
            }
            (a, b)
        } else {
            let a = day_number(base)?;
            // "a/n" means "from a to the end, every n" as in Vixie cron.
            (a, if step.is_some() { 6.max(a) } else { a })
        };
        let mut d = from;
        while d <= to {
            days[(d % 7) as usize] = true;
            d += step.unwrap_or(1);
        }
    }
    if days.iter().all(|&d| d) {
        return Ok(("*".into(), restricted));
    }
    let names: Vec<&str> = (0..7)
        .filter(|&i| days[i])
        .map(|i| DAY_NAMES_FROM_SUNDAY[i])
        .collect();
    Ok((names.join(","), restricted))
}

/// A day-of-week number 0-7 (0 and 7 = Sunday) or name, as a number from Sunday (0-7).
fn day_number(text: &str) -> Result<u32, String> {
    if text.is_empty() {
        return Err("a day is missing".into());
    }
    if let Ok(n) = text.parse::<u32>() {
        if n <= 7 {
            return Ok(n);
        }
        return Err(format!(
            "\"{text}\" is not a day of the week (0-7, 0 and 7 = Sunday, or Mon-Sun)"
        ));
    }
    weekday_from_name(text)
        .map(|w| w.num_days_from_sunday())
        .ok_or_else(|| {
            format!("\"{text}\" is not a day of the week (0-7, 0 and 7 = Sunday, or Mon-Sun)")
        })
}

/// True when `t` is the second (standard-time) instance of a wall-clock time that happens twice.
fn is_repeat_of_ambiguous(t: &DateTime<Tz>, tz: Tz) -> bool {
    match tz.from_local_datetime(&t.naive_local()) {
        LocalResult::Ambiguous(first, _) => first != *t,
        _ => false,
    }
}

fn cron_next_after(c: &cron::Schedule, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
    c.after(&after.with_timezone(&tz))
        .take(MAX_STEPS)
        .filter(|o| o.with_timezone(&Utc) > after && !is_repeat_of_ambiguous(o, tz))
        .map(|o| o.with_timezone(&Utc))
        .next()
}

fn cron_latest_at_or_before(
    c: &cron::Schedule,
    at: DateTime<Utc>,
    tz: Tz,
) -> Option<DateTime<Utc>> {
    let start = at.checked_add_signed(TimeDelta::seconds(1))?;
    c.after(&start.with_timezone(&tz))
        .rev()
        .take(MAX_STEPS)
        .filter(|o| o.with_timezone(&Utc) <= at && !is_repeat_of_ambiguous(o, tz))
        .map(|o| o.with_timezone(&Utc))
        .next()
}

/// The instant a local wall-clock time means: the first of two if it happens twice, the end of the
/// gap (the first valid minute after it) if it does not exist.
fn resolve_local(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let mut probe = local;
    for _ in 0..(24 * 60) {
        match tz.from_local_datetime(&probe) {
            LocalResult::Single(t) => return t.with_timezone(&Utc),
            LocalResult::Ambiguous(first, _) => return first.with_timezone(&Utc),
            LocalResult::None => {
                probe = probe
                    .with_second(0)
                    .unwrap_or(probe)
                    .checked_add_signed(TimeDelta::minutes(1))
                    .unwrap_or(probe);
            }
        }
    }
    // No zone has a gap a day long; reading the wall clock as UTC is a harmless last resort.
    local.and_utc()
}

/// A rotation window: days of the week and a daily time range, in the key's time zone. Half-open:
/// it includes `start` and excludes `end`. An opening belongs to the day it starts on, so
/// `Fri 22:00-06:00` is open from Friday 22:00 to Saturday 06:00.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The operator's `days` text, for display.
    pub days: String,
    /// Which days an opening starts on, indexed from Monday.
    day_set: [bool; 7],
    /// Minutes after local midnight, 0..1440.
    start: u32,
    /// Minutes after local midnight, 0..=1440 (1440 = "24:00").
    end: u32,
}

impl Window {
    /// `days` like "Mon-Fri", "Mon,Wed,Sat-Sun", "Fri-Mon" (wraps over the weekend), "*" or "daily";
    /// `start`/`end` "HH:MM" (`end` may be "24:00"). `end` before `start` wraps past midnight.
    pub fn parse(days: &str, start: &str, end: &str) -> Result<Window, String> {
        let day_set = parse_days(days)?;
        let start_min =
            parse_hhmm(start, false).map_err(|e| format!("window start \"{start}\": {e}"))?;
        let end_min = parse_hhmm(end, true).map_err(|e| format!("window end \"{end}\": {e}"))?;
        if start_min == end_min {
            return Err(format!(
                "window start and end are both \"{start}\", so it would never open (for whole days \
                 use start = \"00:00\", end = \"24:00\")"
            ));
        }
        Ok(Window {
            days: days.trim().to_owned(),
            day_set,
            start: start_min,
            end: end_min,
        })
    }

    fn wraps(&self) -> bool {
        self.end < self.start
    }

    fn opens_on(&self, date: NaiveDate) -> bool {
        self.day_set[date.weekday().num_days_from_monday() as usize]
    }

    fn at(date: NaiveDate, minutes: u32) -> NaiveDateTime {
        date.and_time(chrono::NaiveTime::MIN) + TimeDelta::minutes(i64::from(minutes))
    }

    /// The opening (local start, local end) that contains this local wall-clock time, if any.
    fn opening_containing(&self, local: NaiveDateTime) -> Option<(NaiveDateTime, NaiveDateTime)> {
        let date = local.date();
        let secs = local.time().num_seconds_from_midnight();
        let (start, end) = (self.start * 60, self.end * 60);
        if !self.wraps() {
            return (self.opens_on(date) && secs >= start && secs < end)
                .then(|| (Self::at(date, self.start), Self::at(date, self.end)));
        }
        if self.opens_on(date) && secs >= start {
            return Some((
                Self::at(date, self.start),
                Self::at(date + TimeDelta::days(1), self.end),
            ));
        }
        let yesterday = date.pred_opt()?;
        (self.opens_on(yesterday) && secs < end)
            .then(|| (Self::at(yesterday, self.start), Self::at(date, self.end)))
    }

    /// Is this local wall-clock time inside the window?
    pub fn contains(&self, local: NaiveDateTime) -> bool {
        self.opening_containing(local).is_some()
    }

    /// Is this instant inside the window, read on `tz`'s wall clock? (Preflight's window check.)
    pub fn contains_at(&self, at: DateTime<Utc>, tz: Tz) -> bool {
        self.contains(at.with_timezone(&tz).naive_local())
    }

    /// The earliest instant at or after `after` that is inside the window: `after` itself when the
    /// window is open, else the next opening (an opening at a local time skipped by DST opens when
    /// the clock resumes, e.g. 03:00). Every parsed window opens at least weekly; should a DST oddity
    /// leave no opening in the next two weeks, `after` is returned rather than never.
    pub fn next_opening(&self, after: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        let local = after.with_timezone(&tz).naive_local();
        if self.contains(local) {
            return after;
        }
        let today = local.date();
        (-1..=15)
            .filter_map(|d| today.checked_add_signed(TimeDelta::days(d)))
            .filter(|date| self.opens_on(*date))
            .map(|date| resolve_local(tz, Self::at(date, self.start)))
            .filter(|open| *open >= after && self.contains_at(*open, tz))
            .min()
            .unwrap_or(after)
    }

    /// When the opening containing `at` closes (`None` if `at` is outside the window).
    pub fn closes_after(&self, at: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let (_, end) = self.opening_containing(at.with_timezone(&tz).naive_local())?;
        Some(resolve_local(tz, end))
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hhmm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{} {}-{}", self.days, hhmm(self.start), hhmm(self.end))?;
        if self.wraps() {
            f.write_str(" (ends the next day)")?;
        }
        Ok(())
    }
}

fn parse_days(text: &str) -> Result<[bool; 7], String> {
    let trimmed = text.trim();
    if trimmed == "*" || trimmed.eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    if trimmed.is_empty() {
        return Err("window days are empty (e.g. \"Mon-Fri\", \"Mon,Wed,Fri\", \"*\")".into());
    }
    let day = |name: &str| {
        weekday_from_name(name.trim()).ok_or_else(|| {
            format!(
                "window days \"{trimmed}\": \"{}\" is not a day (Mon..Sun)",
                name.trim()
            )
        })
    };
    let mut set = [false; 7];
    for item in trimmed.split(',') {
        match item.split_once('-') {
            Some((a, b)) => {
                // Ranges may wrap: "Fri-Mon" is Fri, Sat, Sun, Mon.
                let (mut d, last) = (day(a)?, day(b)?);
                loop {
                    set[d.num_days_from_monday() as usize] = true;
                    if d == last {
                        break;
                    }
                    d = d.succ();
                }
            }
            None => set[day(item)?.num_days_from_monday() as usize] = true,
        }
    }
    Ok(set)
}

/// "HH:MM" as minutes after midnight; "24:00" only where `allow_24` (a window's end).
fn parse_hhmm(text: &str, allow_24: bool) -> Result<u32, String> {
    let bad = || "expected HH:MM, e.g. \"08:00\"".to_owned();
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if h.is_empty() || h.len() > 2 || m.len() != 2 || !digits(h) || !digits(m) {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if allow_24 && h == 24 && m == 0 {
        return Ok(24 * 60);
    }
    if h > 23 || m > 59 {
        return Err(format!(
            "{h:02}:{m:02} is not a time of day (00:00-23:59{})",
            if allow_24 { ", or 24:00" } else { "" }
        ));
    }
    Ok(h * 60 + m)
}

/// Why a key is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DueReason {
    /// A cron occurrence (jittered, moved into the window).
    Schedule,
    /// The key's Last Rotated is (or will be) older than `max_age`.
    MaxAge,
    /// A cron occurrence was missed while the daemon was down; `catch_up` runs it now.
    CatchUp,
    /// Not a rotation: a dual key's old key, kept for a dependent that never confirmed, reaches its
    /// `revoke_after` and is revoked.
    Revoke,
}

impl DueReason {
    /// Stable lowercase name, for logs, metrics labels and the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            DueReason::Schedule => "schedule",
            DueReason::MaxAge => "max_age",
            DueReason::CatchUp => "catch_up",
            DueReason::Revoke => "revoke",
        }
    }
}

impl fmt::Display for DueReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a key is next due, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub at: DateTime<Utc>,
    pub reason: DueReason,
}

/// `t` plus `jitter × sample`. `sample` is the injected random number in [0, 1); values outside are
/// clamped (NaN counts as 0), and the result is always strictly before `t + jitter` when jitter > 0.
pub fn apply_jitter(t: DateTime<Utc>, jitter: Duration, sample: f64) -> DateTime<Utc> {
    let sample = if sample.is_finite() {
        sample.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let jitter_ms = i64::try_from(jitter.as_millis()).unwrap_or(i64::MAX);
    if jitter_ms == 0 {
        return t;
    }
    // Float rounding could land exactly on jitter_ms for a sample just below 1: keep it below.
    let offset = ((jitter_ms as f64 * sample).floor() as i64).min(jitter_ms - 1);
    t.checked_add_signed(TimeDelta::milliseconds(offset))
        .unwrap_or(t)
}

/// Moves `t` to the window's next opening (unchanged without a window).
fn into_window(key: &KeyConfig, t: DateTime<Utc>) -> DateTime<Utc> {
    match &key.window {
        Some(w) => w.next_opening(t, key.timezone),
        None => t,
    }
}

/// A cron occurrence's due time: into the window, then jitter bounded by what is left of the opening.
fn scheduled_due(key: &KeyConfig, occurrence: DateTime<Utc>, sample: f64) -> DateTime<Utc> {
    let t0 = into_window(key, occurrence);
    let Some(window) = &key.window else {
        return apply_jitter(t0, key.jitter, sample);
    };
    let Some(close) = window.closes_after(t0, key.timezone) else {
        return t0;
    };
    let left = (close - t0).to_std().unwrap_or(Duration::ZERO);
    let jittered = apply_jitter(t0, key.jitter.min(left), sample);
    if window.contains_at(jittered, key.timezone) {
        jittered
    } else {
        t0
    }
}

/// When `key` is next due, the earliest of:
/// - **catch-up / schedule**: the latest cron occurrence after `last_scheduled_run` and at or before
///   `now` is still pending if its due time (window, jitter) is not yet past → that time, `Schedule`;
///   if its due time is past it was missed → now (moved into the window), `CatchUp`, when the key has
///   `catch_up`, else it is dropped. With no such occurrence (or on a first start, `None`), the next
///   occurrence after `now` → `Schedule`.
/// - **max age**: `last_rotated + max_age` (now if already past), moved into the window → `MaxAge`.
///   No `last_rotated` (unknown), no max-age due time.
///
/// `last_scheduled_run` is when the last schedule-driven (or catch-up) rotation *started*; one run
/// covers every occurrence before it. `jitter_sample` in [0, 1): draw it once per pending occurrence
/// so that re-evaluating does not move the time. On a tie the schedule's reason wins. Manual-only keys
/// (and keys whose schedule never fires again) give `None`.
pub fn next_due(
    key: &KeyConfig,
    now: DateTime<Utc>,
    last_scheduled_run: Option<DateTime<Utc>>,
    last_rotated: Option<DateTime<Utc>>,
    jitter_sample: f64,
) -> Option<Due> {
    let scheduled = key.schedule.as_ref().and_then(|schedule| {
        let tz = key.timezone;
        let pending = last_scheduled_run.and_then(|prev| {
            schedule
                .latest_at_or_before(now, tz)
                .filter(|latest| *latest > prev)
        });
        if let Some(occurrence) = pending {
            let at = scheduled_due(key, occurrence, jitter_sample);
            if at >= now {
                return Some(Due {
                    at,
                    reason: DueReason::Schedule,
                });
            }
            if key.catch_up {
                return Some(Due {
                    at: into_window(key, now),
                    reason: DueReason::CatchUp,
                });
            }
        }
        let from = last_scheduled_run.map_or(now, |prev| prev.max(now));
        schedule.next_after(from, tz).map(|o| Due {
            at: scheduled_due(key, o, jitter_sample),
            reason: DueReason::Schedule,
        })
    });

    let aged = key
        .max_age
        .zip(last_rotated)
        .and_then(|(max_age, rotated)| {
            let limit = rotated.checked_add_signed(TimeDelta::from_std(max_age).ok()?)?;
            Some(Due {
                at: into_window(key, limit.max(now)),
                reason: DueReason::MaxAge,
            })
        });

    match (scheduled, aged) {
        (Some(s), Some(a)) => Some(if a.at < s.at { a } else { s }),
        (s, a) => s.or(a),
    }
}

/// The next `count` scheduled run times of a key after `after` (cron in the key's time zone, moved into
/// the window; no jitter). Occurrences that wait for the same window opening count once. Empty for
/// keys without a schedule.
pub fn next_runs(key: &KeyConfig, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
    let Some(schedule) = &key.schedule else {
        return Vec::new();
    };
    // `count` comes from the command line: do not trust it for an allocation.
    let mut runs = Vec::with_capacity(count.min(64));
    let mut cursor = after;
    while runs.len() < count {
        let Some(occurrence) = schedule.next_after(cursor, key.timezone) else {
            break;
        };
        let run = into_window(key, occurrence);
        // Every occurrence before `run` maps to `run` too: continue from it.
        cursor = run.max(occurrence);
        if runs.last().is_none_or(|last| run > *last) {
            runs.push(run);
        }
    }
    runs
}

/// The validator's heuristic for "each run will wait for the window": the key has a schedule and a
/// window, the schedule fires at least once in the year after `from`, and never inside the window.
pub fn all_runs_outside_window_from(key: &KeyConfig, from: DateTime<Utc>) -> bool {
    let (Some(schedule), Some(window)) = (&key.schedule, &key.window) else {
        return false;
    };
    let tz = key.timezone;
    let Some(first) = schedule.next_after(from, tz) else {
        return false;
    };
    let horizon = first + TimeDelta::days(370);
    let first_local = first.with_timezone(&tz).naive_local().date();
    // For every opening in the horizon: does an occurrence fall in [open, close)?
    let any_inside = (-1..=371)
        .filter_map(|d| first_local.checked_add_signed(TimeDelta::days(d)))
        .filter(|date| window.opens_on(*date))
        .map(|date| resolve_local(tz, Window::at(date, window.start)))
        .take_while(|open| *open <= horizon)
        .filter(|open| window.contains_at(*open, tz))
        .any(|open| {
            let close = window.closes_after(open, tz).unwrap_or(open);
            schedule
                .first_at_or_after(open, tz)
                .is_some_and(|o| o < close && window.contains_at(o, tz))
        });
    !any_inside
}

/// [`all_runs_outside_window_from`] from the current time (for the config validator's warning).
pub fn all_runs_outside_window(key: &KeyConfig) -> bool {
    all_runs_outside_window_from(key, Utc::now())
}

fn format_run(t: DateTime<Utc>, tz: Tz) -> String {
    format!(
        "{} ({} UTC)",
        t.with_timezone(&tz).format("%a %Y-%m-%d %H:%M:%S %:z"),
        t.format("%Y-%m-%d %H:%M:%S")
    )
}

fn key_notes(key: &KeyConfig) -> Vec<String> {
    let mut notes = vec![match &key.owner {
        Some(o) => format!("owner {o}"),
        None => "owner: none named".to_string(),
    }];
    if let Some(a) = &key.approval {
        notes.push(format!(
            "needs approval: each run waits up to {} for `keyrotd approve`, else it is skipped",
            humantime::format_duration(a.timeout)
        ));
    }
    if key.is_manual_only() {
        notes.push("manual only: no schedule and no max_age; rotate with `keyrotd rotate`".into());
        return notes;
    }
    if let Some(w) = &key.window {
        notes.push(format!(
            "window {w}: runs outside it wait for its next opening"
        ));
    }
    if !key.jitter.is_zero() {
        notes.push(format!(
            "jitter: each scheduled run is delayed by up to {}",
            humantime::format_duration(key.jitter)
        ));
    }
    if let Some(max_age) = key.max_age {
        notes.push(format!(
            "max_age {}: also due when the portal's Last Rotated is older",
            humantime::format_duration(max_age)
        ));
    }
    if key.schedule.is_none() {
        notes.push("no schedule: rotated by age only".into());
    } else if !key.catch_up {
        notes.push("catch_up off: runs missed while the daemon is down are dropped".into());
    }
    notes
}

/// The `keyrotd plan` table: per key its time zone, schedule and next `count` runs after `now` (local
/// time with offset, and UTC), then notes on window, jitter, max age and manual-only keys.
pub fn plan_table(config: &Config, now: DateTime<Utc>, count: usize) -> String {
    struct Row {
        key: String,
        tz: String,
        schedule: String,
        runs: Vec<String>,
        notes: Vec<String>,
    }
    let rows: Vec<Row> = config
        .keys
        .iter()
        .map(|key| {
            let runs: Vec<String> = next_runs(key, now, count)
                .into_iter()
                .map(|t| format_run(t, key.timezone))
                .collect();
            let runs = if runs.is_empty() && key.schedule.is_some() {
                vec!["none: the schedule never fires again".into()]
            } else if runs.is_empty() {
                vec!["-".into()]
            } else {
                runs
            };
            Row {
                key: key.name.clone(),
                tz: key.timezone.name().to_owned(),
                schedule: key.schedule.as_ref().map_or("-".into(), |s| s.text.clone()),
                runs,
                notes: key_notes(key),
            }
        })
        .collect();
    let width = |header: &str, f: &dyn Fn(&Row) -> usize| {
        rows.iter().map(f).max().unwrap_or(0).max(header.len())
    };
    let wk = width("KEY", &|r| r.key.chars().count());
    let wt = width("TIMEZONE", &|r| r.tz.chars().count());
    let ws = width("SCHEDULE", &|r| r.schedule.chars().count());
    let mut out = String::new();
    let mut line = |a: &str, b: &str, c: &str, d: &str| {
        let text = format!("{a:<wk$}  {b:<wt$}  {c:<ws$}  {d}");
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line("KEY", "TIMEZONE", "SCHEDULE", "NEXT RUNS");
    for row in &rows {
        for (i, run) in row.runs.iter().enumerate() {
            if i == 0 {
                line(&row.key, &row.tz, &row.schedule, run);
            } else {
                line("", "", "", run);
            }
        }
        for note in &row.notes {
            line("", &format!("note: {note}"), "", "");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DaemonConfig, LogFormat};
    use chrono_tz::Europe::Zurich;
    use std::collections::BTreeMap;

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse()
            .unwrap_or_else(|e| panic!("bad test time {text}: {e}"))
    }

    fn key(schedule: Option<&str>) -> KeyConfig {
        KeyConfig {
            name: "billing-api".into(),
            provider: "aos-prod".into(),
            schedule: schedule.map(|s| Schedule::parse(s).unwrap_or_else(|e| panic!("{e}"))),
            timezone: Tz::UTC,
            max_age: None,
            jitter: Duration::ZERO,
            window: None,
            catch_up: true,
            watch: Duration::from_secs(300),
            watch_interval: Duration::from_secs(15),
            store_deadline: Duration::from_secs(60),
            auto_recover: true,
            max_rerotations: 3,
            max_regenerations_per_day: 6,
            owner: None,
            approval: None,
            notify: Vec::new(),
            on_first_contact: Default::default(),
            rollout: Default::default(),
            destinations: Vec::new(),
            dependents: Vec::new(),
        }
    }

    fn window(days: &str, start: &str, end: &str) -> Window {
        Window::parse(days, start, end).unwrap_or_else(|e| panic!("{e}"))
    }

    fn runs(schedule: &str, tz: Tz, after: &str, count: usize) -> Vec<DateTime<Utc>> {
        let key = KeyConfig {
            timezone: tz,
            ..key(Some(schedule))
        };
        next_runs(&key, utc(after), count)
    }

    fn times(list: &[&str]) -> Vec<DateTime<Utc>> {
        list.iter().map(|t| utc(t)).collect()
    }

    // 2027-03-24 is a Wednesday.
    #[test]
    fn cron_forms_give_the_runs_an_operator_expects() {
        let cases: &[(&str, &str, &[&str])] = &[
            // Unix numeric day of week: 1 = Monday, 0 and 7 = Sunday.
            (
                "0 9 * * 1",
                "2027-03-24T00:00:00Z",
                &["2027-03-29T09:00:00Z", "2027-04-05T09:00:00Z"],
            ),
            (
                "0 9 * * Mon",
                "2027-03-24T00:00:00Z",
                &["2027-03-29T09:00:00Z"],
            ),
            (
                "0 9 * * monday",
                "2027-03-24T00:00:00Z",
                &["2027-03-29T09:00:00Z"],
            ),
            (
                "0 9 * * 0",
                "2027-03-24T00:00:00Z",
                &["2027-03-28T09:00:00Z"],
            ),
            (
                "0 9 * * 7",
                "2027-03-24T00:00:00Z",
                &["2027-03-28T09:00:00Z"],
            ),
            (
                "0 9 * * Sun",
                "2027-03-24T00:00:00Z",
                &["2027-03-28T09:00:00Z"],
            ),
            (
                "0 9 * * 1-5",
                "2027-03-26T10:00:00Z",
                &["2027-03-29T09:00:00Z", "2027-03-30T09:00:00Z"],
            ),
            (
                "0 9 * * 5-7",
                "2027-03-29T00:00:00Z",
                &[
                    "2027-04-02T09:00:00Z",
                    "2027-04-03T09:00:00Z",
                    "2027-04-04T09:00:00Z",
                    "2027-04-09T09:00:00Z",
                ],
            ),
            (
                "0 9 * * Fri-Sun",
                "2027-03-29T00:00:00Z",
                &[
                    "2027-04-02T09:00:00Z",
                    "2027-04-03T09:00:00Z",
                    "2027-04-04T09:00:00Z",
                ],
            ),
            (
                "0 9 * * 1,3",
                "2027-03-24T09:00:00Z",
                &["2027-03-29T09:00:00Z", "2027-03-31T09:00:00Z"],
            ),
            (
                "0 9 * * 1-5/2",
                "2027-03-28T00:00:00Z",
                &[
                    "2027-03-29T09:00:00Z",
                    "2027-03-31T09:00:00Z",
                    "2027-04-02T09:00:00Z",
                ],
            ),
            (
                "*/20 9 * * *",
                "2027-03-24T09:00:00Z",
                &[
                    "2027-03-24T09:20:00Z",
                    "2027-03-24T09:40:00Z",
                    "2027-03-25T09:00:00Z",
                ],
            ),
            // Both day fields restricted: either matches (Unix), so the 1st (a Thursday) and Mondays.
            (
                "0 9 1 * Mon",
                "2027-03-24T00:00:00Z",
                &[
                    "2027-03-29T09:00:00Z",
                    "2027-04-01T09:00:00Z",
                    "2027-04-05T09:00:00Z",
                ],
            ),
            // A `*`-led day-of-week does not widen (Vixie): the 1st of the month only when a Sunday.
            (
                "0 9 1 * */7",
                "2027-03-24T00:00:00Z",
                &["2027-08-01T09:00:00Z", "2028-10-01T09:00:00Z"],
            ),
            (
                "0 9 * Jan *",
                "2027-03-24T00:00:00Z",
                &["2028-01-01T09:00:00Z"],
            ),
            // 6 fields: seconds first.
            (
                "30 0 9 * * *",
                "2027-03-24T00:00:00Z",
                &["2027-03-24T09:00:30Z", "2027-03-25T09:00:30Z"],
            ),
            (
                "0 0 9 * * 1",
                "2027-03-24T00:00:00Z",
                &["2027-03-29T09:00:00Z"],
            ),
            // 7 fields: year last.
            (
                "0 0 12 1 1 * 2030",
                "2027-03-24T00:00:00Z",
                &["2030-01-01T12:00:00Z"],
            ),
            ("0 0 12 1 1 * 2020", "2027-03-24T00:00:00Z", &[]),
            // Macros.
            ("@yearly", "2027-03-24T00:00:00Z", &["2028-01-01T00:00:00Z"]),
            (
                "@annually",
                "2027-03-24T00:00:00Z",
                &["2028-01-01T00:00:00Z"],
            ),
            (
                "@monthly",
                "2027-03-24T00:00:00Z",
                &["2027-04-01T00:00:00Z"],
            ),
            (
                "@weekly",
                "2027-03-24T00:00:00Z",
                &["2027-03-28T00:00:00Z", "2027-04-04T00:00:00Z"],
            ),
            ("@daily", "2027-03-24T00:00:00Z", &["2027-03-25T00:00:00Z"]),
            (
                "@midnight",
                "2027-03-24T00:00:00Z",
                &["2027-03-25T00:00:00Z"],
            ),
            (
                "@HOURLY",
                "2027-03-24T00:00:00Z",
                &["2027-03-24T01:00:00Z", "2027-03-24T02:00:00Z"],
            ),
            (
                "  0 9 * * Mon  ",
                "2027-03-24T00:00:00Z",
                &["2027-03-29T09:00:00Z"],
            ),
        ];
        for (expr, after, expected) in cases {
            let got = runs(expr, Tz::UTC, after, expected.len().max(1));
            assert_eq!(got, times(expected), "schedule {expr:?} after {after}");
        }
    }

    #[test]
    fn schedule_keeps_the_operators_text() {
        let s = Schedule::parse(" 0 9 * * 1 ").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.text, "0 9 * * 1");
        assert_eq!(s.to_string(), "0 9 * * 1");
    }

    #[test]
    fn invalid_schedules_say_what_is_wrong() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            ("0 9 * *", "has 4 fields"),
            ("0 0 0 9 * * * 2030", "has 8 fields"),
            (
                "61 9 * * *",
                "minute field \"61\" is invalid (allowed: 0-59",
            ),
            ("0 61 9 * * *", "Minutes must be at most 59"),
            ("0 25 * * *", "hour field \"25\""),
            ("0 9 32 * *", "day-of-month field \"32\""),
            ("0 9 * 13 *", "month field \"13\""),
            ("0 9 * * 8", "day-of-week field \"8\""),
            ("0 9 * * Funday", "\"Funday\" is not a day of the week"),
            ("0 9 * * Fri-Mon", "runs backwards"),
            ("0 9 * * */0", "step \"0\""),
            ("0 9 * * 1-", "a day is missing"),
            ("60 0 9 * * *", "second field \"60\""),
            ("0 0 9 * * * 1969", "year field \"1969\""),
            ("x 9 * * *", "minute field \"x\""),
            ("@fortnightly", "not a known macro"),
            ("@reboot", "not supported"),
        ];
        for (expr, needle) in cases {
            match Schedule::parse(expr) {
                Ok(s) => panic!("{expr:?} parsed as {s:?}"),
                Err(e) => {
                    assert!(
                        e.contains(needle),
                        "{expr:?}: {e:?} should mention {needle:?}"
                    );
                    assert!(
                        !e.contains('^'),
                        "{e:?} echoes the internal probe expression"
                    );
                }
            }
        }
    }

    // Europe/Zurich 2027: spring forward Sun 03-28 02:00 CET -> 03:00 CEST (01:00Z);
    // fall back Sun 10-31 03:00 CEST -> 02:00 CET (01:00Z).
    #[test]
    fn zurich_dst_transitions() {
        let cases: &[(&str, &str, &str, &[&str])] = &[
            (
                "02:30 daily: skipped on the spring-forward day",
                "30 2 * * *",
                "2027-03-26T12:00:00Z",
                &[
                    "2027-03-27T01:30:00Z",
                    "2027-03-29T00:30:00Z",
                    "2027-03-30T00:30:00Z",
                ],
            ),
            (
                "hourly: 01:00 CET then 03:00 CEST, one real hour apart",
                "0 * * * *",
                "2027-03-27T23:30:00Z",
                &[
                    "2027-03-28T00:00:00Z",
                    "2027-03-28T01:00:00Z",
                    "2027-03-28T02:00:00Z",
                ],
            ),
            (
                "09:00 daily: the offset changes, the wall clock does not",
                "0 9 * * *",
                "2027-03-27T12:00:00Z",
                &["2027-03-28T07:00:00Z", "2027-03-29T07:00:00Z"],
            ),
            (
                "02:30 daily: once on the fall-back day, at 02:30 CEST",
                "30 2 * * *",
                "2027-10-30T12:00:00Z",
                &["2027-10-31T00:30:00Z", "2027-11-01T01:30:00Z"],
            ),
            (
                "02:30 daily: from inside the repeated hour, not again that day",
                "30 2 * * *",
                "2027-10-31T00:45:00Z",
                &["2027-11-01T01:30:00Z"],
            ),
            (
                "02:30 daily: from the second 02:10 (CET), not again that day",
                "30 2 * * *",
                "2027-10-31T01:10:00Z",
                &["2027-11-01T01:30:00Z"],
            ),
            (
                "hourly on fall-back: 02:00 CEST once, then 03:00 CET",
                "0 * * * *",
                "2027-10-30T23:30:00Z",
                &[
                    "2027-10-31T00:00:00Z",
                    "2027-10-31T02:00:00Z",
                    "2027-10-31T03:00:00Z",
                ],
            ),
            (
                "hourly from the second 02:10 (CET)",
                "0 * * * *",
                "2027-10-31T01:10:00Z",
                &["2027-10-31T02:00:00Z"],
            ),
        ];
        for (story, expr, after, expected) in cases {
            assert_eq!(
                runs(expr, Zurich, after, expected.len()),
                times(expected),
                "{story}"
            );
        }
    }

    #[test]
    fn latest_occurrence_respects_dst_too() {
        let s = Schedule::parse("30 2 * * *").unwrap_or_else(|e| panic!("{e}"));
        let cases = [
            // On the spring-forward day there is no 02:30: the latest is the day before.
            ("2027-03-28T12:00:00Z", "2027-03-27T01:30:00Z"),
            // On the fall-back day, after the second 02:30 (CET), the latest is still the first one.
            ("2027-10-31T01:45:00Z", "2027-10-31T00:30:00Z"),
            ("2027-10-31T00:30:00Z", "2027-10-31T00:30:00Z"),
        ];
        for (at, expected) in cases {
            assert_eq!(
                s.latest_at_or_before(utc(at), Zurich),
                Some(utc(expected)),
                "at {at}"
            );
        }
    }

    #[test]
    fn window_parsing() {
        let ok = [
            ("Mon-Fri", "08:00", "17:00", "Mon-Fri 08:00-17:00"),
            ("Mon,Wed,Fri", "8:00", "17:30", "Mon,Wed,Fri 08:00-17:30"),
            (
                "Fri-Mon",
                "22:00",
                "06:00",
                "Fri-Mon 22:00-06:00 (ends the next day)",
            ),
            ("*", "00:00", "24:00", "* 00:00-24:00"),
            ("daily", "09:00", "10:00", "daily 09:00-10:00"),
            ("mon, Sat-Sun", "09:00", "10:00", "mon, Sat-Sun 09:00-10:00"),
        ];
        for (days, start, end, shown) in ok {
            assert_eq!(window(days, start, end).to_string(), shown);
        }
        let bad = [
            ("Mon-Fry", "08:00", "17:00", "\"Fry\" is not a day"),
            ("", "08:00", "17:00", "empty"),
            ("Mon-Fri", "25:00", "17:00", "window start \"25:00\""),
            ("Mon-Fri", "08:00", "17:60", "window end \"17:60\""),
            ("Mon-Fri", "08", "17:00", "expected HH:MM"),
            ("Mon-Fri", "+8:00", "17:00", "expected HH:MM"),
            ("Mon-Fri", "24:00", "17:00", "window start \"24:00\""),
            ("Mon-Fri", "08:00", "08:00", "never open"),
        ];
        for (days, start, end, needle) in bad {
            match Window::parse(days, start, end) {
                Ok(w) => panic!("{days} {start}-{end} parsed as {w:?}"),
                Err(e) => assert!(e.contains(needle), "{e:?} should mention {needle:?}"),
            }
        }
    }

    fn local(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M")
            .unwrap_or_else(|e| panic!("bad local time {text}: {e}"))
    }

    // 2027-03-26 is a Friday.
    #[test]
    fn window_containment() {
        let office = window("Mon-Fri", "08:00", "17:00");
        let night = window("Fri", "22:00", "06:00");
        let long_weekend = window("Fri-Mon", "08:00", "17:00");
        let cases = [
            (&office, "2027-03-24 10:00", true),
            (&office, "2027-03-24 08:00", true),
            (&office, "2027-03-24 07:59", false),
            (&office, "2027-03-24 17:00", false),
            (&office, "2027-03-27 10:00", false),
            (&night, "2027-03-26 23:00", true),
            (&night, "2027-03-27 05:59", true),
            (&night, "2027-03-27 06:00", false),
            (&night, "2027-03-27 23:00", false),
            (&night, "2027-03-26 21:59", false),
            (&night, "2027-03-26 03:00", false),
            (&long_weekend, "2027-03-28 10:00", true),
            (&long_weekend, "2027-03-29 10:00", true),
            (&long_weekend, "2027-03-30 10:00", false),
            (&long_weekend, "2027-03-25 10:00", false),
        ];
        for (w, at, inside) in cases {
            assert_eq!(w.contains(local(at)), inside, "{w} contains {at}");
        }
    }

    #[test]
    fn window_next_opening() {
        let office = window("Mon-Fri", "08:00", "17:00");
        let night = window("Fri", "22:00", "06:00");
        let cases = [
            (
                "inside stays",
                &office,
                Tz::UTC,
                "2027-03-24T10:00:00Z",
                "2027-03-24T10:00:00Z",
            ),
            (
                "before opens today",
                &office,
                Tz::UTC,
                "2027-03-24T06:00:00Z",
                "2027-03-24T08:00:00Z",
            ),
            (
                "after opens tomorrow",
                &office,
                Tz::UTC,
                "2027-03-24T18:00:00Z",
                "2027-03-25T08:00:00Z",
            ),
            (
                "friday evening skips the weekend",
                &office,
                Tz::UTC,
                "2027-03-26T17:00:00Z",
                "2027-03-29T08:00:00Z",
            ),
            (
                "saturday waits for monday",
                &office,
                Tz::UTC,
                "2027-03-27T10:00:00Z",
                "2027-03-29T08:00:00Z",
            ),
            (
                "zurich local time",
                &office,
                Zurich,
                "2027-03-27T10:00:00Z",
                "2027-03-29T06:00:00Z",
            ),
            (
                "wrapped part of friday's night",
                &night,
                Tz::UTC,
                "2027-03-27T03:00:00Z",
                "2027-03-27T03:00:00Z",
            ),
            (
                "after the night, next friday",
                &night,
                Tz::UTC,
                "2027-03-27T07:00:00Z",
                "2027-04-02T22:00:00Z",
            ),
        ];
        for (story, w, tz, after, expected) in cases {
            assert_eq!(w.next_opening(utc(after), tz), utc(expected), "{story}");
        }
        // A window opening at 02:30 on the spring-forward day opens when the clock resumes, 03:00 CEST.
        let early = window("Sun", "02:30", "04:00");
        assert_eq!(
            early.next_opening(utc("2027-03-27T12:00:00Z"), Zurich),
            utc("2027-03-28T01:00:00Z")
        );
    }

    #[test]
    fn runs_wait_for_the_window_and_count_once() {
        let cases: &[(&str, &str, &str, &[&str])] = &[
            (
                "hourly, window 08:00-10:00 weekdays, from friday 09:30",
                "0 * * * *",
                "2027-03-26T09:30:00Z",
                &[
                    "2027-03-29T08:00:00Z",
                    "2027-03-29T09:00:00Z",
                    "2027-03-30T08:00:00Z",
                ],
            ),
            (
                "saturdays wait for monday",
                "0 9 * * Sat",
                "2027-03-24T00:00:00Z",
                &["2027-03-29T08:00:00Z", "2027-04-05T08:00:00Z"],
            ),
        ];
        for (story, expr, after, expected) in cases {
            let k = KeyConfig {
                window: Some(window("Mon-Fri", "08:00", "10:00")),
                ..key(Some(expr))
            };
            assert_eq!(
                next_runs(&k, utc(after), expected.len()),
                times(expected),
                "{story}"
            );
        }
        assert!(next_runs(&key(None), utc("2027-03-24T00:00:00Z"), 3).is_empty());
    }

    #[test]
    fn jitter_bounds() {
        let t = utc("2027-03-24T09:00:00Z");
        let ten_min = Duration::from_secs(600);
        let cases: [(f64, Option<&str>); 6] = [
            (0.0, Some("2027-03-24T09:00:00Z")),
            (0.5, Some("2027-03-24T09:05:00Z")),
            (f64::NAN, Some("2027-03-24T09:00:00Z")),
            (-1.0, Some("2027-03-24T09:00:00Z")),
            (1.0 - f64::EPSILON, None),
            (1.0, None),
        ];
        for (sample, expected) in cases {
            let got = apply_jitter(t, ten_min, sample);
            match expected {
                Some(e) => assert_eq!(got, utc(e), "sample {sample}"),
                None => {
                    assert!(got < t + TimeDelta::minutes(10), "sample {sample}: {got}");
                    assert!(got > t + TimeDelta::seconds(599), "sample {sample}: {got}");
                }
            }
        }
        assert_eq!(apply_jitter(t, Duration::ZERO, 0.7), t);
    }

    #[test]
    fn jitter_stays_inside_the_window() {
        let k = KeyConfig {
            jitter: Duration::from_secs(30 * 60),
            window: Some(window("Mon-Fri", "08:00", "17:00")),
            ..key(Some("50 16 * * *"))
        };
        let now = utc("2027-03-24T12:00:00Z");
        for sample in [0.0, 0.3, 0.6, 0.999_999] {
            let due = next_due(&k, now, None, None, sample).unwrap_or_else(|| panic!("no due"));
            assert!(
                due.at >= utc("2027-03-24T16:50:00Z"),
                "sample {sample}: {}",
                due.at
            );
            assert!(
                due.at < utc("2027-03-24T17:00:00Z"),
                "sample {sample}: {}",
                due.at
            );
        }
        // Runs waiting for the opening are still spread over the jitter.
        let early = KeyConfig {
            schedule: Some(Schedule::parse("0 6 * * *").unwrap_or_else(|e| panic!("{e}"))),
            ..k
        };
        let due = next_due(&early, now, None, None, 0.5).unwrap_or_else(|| panic!("no due"));
        assert_eq!(due.at, utc("2027-03-25T08:15:00Z"));
    }

    #[test]
    fn next_due_table() {
        struct Case {
            story: &'static str,
            key: KeyConfig,
            now: &'static str,
            last_run: Option<&'static str>,
            last_rotated: Option<&'static str>,
            sample: f64,
            expected: Option<(&'static str, DueReason)>,
        }
        let daily = key(Some("0 9 * * *"));
        let days = |d: u64| Some(Duration::from_secs(d * 86_400));
        let office = || Some(window("Mon-Fri", "08:00", "17:00"));
        let cases = [
            Case {
                story: "manual-only key is never due",
                key: key(None),
                now: "2027-03-24T10:00:00Z",
                last_run: Some("2027-03-01T09:00:00Z"),
                last_rotated: Some("2027-03-01T09:00:00Z"),
                sample: 0.0,
                expected: None,
            },
            Case {
                story: "first start catches up nothing",
                key: daily.clone(),
                now: "2027-03-24T10:00:00Z",
                last_run: None,
                last_rotated: None,
                sample: 0.0,
                expected: Some(("2027-03-25T09:00:00Z", DueReason::Schedule)),
            },
            Case {
                story: "missed run while down is due now",
                key: daily.clone(),
                now: "2027-03-24T10:00:00Z",
                last_run: Some("2027-03-22T09:00:00Z"),
                last_rotated: None,
                sample: 0.0,
                expected: Some(("2027-03-24T10:00:00Z", DueReason::CatchUp)),
            },
            Case {
                story: "missed run without catch_up waits for the next one",
                key: KeyConfig {
                    catch_up: false,
                    ..daily.clone()
                },
                now: "2027-03-24T10:00:00Z",
                last_run: Some("2027-03-22T09:00:00Z"),
                last_rotated: None,
                sample: 0.0,
                expected: Some(("2027-03-25T09:00:00Z", DueReason::Schedule)),
            },
            Case {
                story: "nothing missed: the next occurrence",
                key: daily.clone(),
                now: "2027-03-24T10:00:00Z",
                last_run: Some("2027-03-24T09:00:00Z"),
                last_rotated: None,
                sample: 0.0,
                expected: Some(("2027-03-25T09:00:00Z", DueReason::Schedule)),
            },
            Case {
                story: "due exactly now is the schedule, not a catch-up",
                key: daily.clone(),
                now: "2027-03-24T09:00:00Z",
                last_run: Some("2027-03-23T09:00:00Z"),
                last_rotated: None,
                sample: 0.0,
                expected: Some(("2027-03-24T09:00:00Z", DueReason::Schedule)),
            },
            Case {
                story: "an occurrence waiting for its jitter is not a missed run",
                key: KeyConfig {
                    jitter: Duration::from_secs(600),
                    ..daily.clone()
                },
                now: "2027-03-24T09:03:00Z",
                last_run: Some("2027-03-23T09:05:00Z"),
                last_rotated: None,
                sample: 0.5,
                expected: Some(("2027-03-24T09:05:00Z", DueReason::Schedule)),
            },
            Case {
                story: "missed friday run, restarted saturday: catch-up waits for monday's window",
                key: KeyConfig {
                    window: office(),
                    ..key(Some("0 9 * * Fri"))
                },
                now: "2027-03-27T10:00:00Z",
                last_run: Some("2027-03-19T09:00:00Z"),
                last_rotated: None,
                sample: 0.0,
                expected: Some(("2027-03-29T08:00:00Z", DueReason::CatchUp)),
            },
            Case {
                story: "a saturday occurrence waits for monday's window",
                key: KeyConfig {
                    window: office(),
                    ..key(Some("0 9 * * Sat"))
                },
                now: "2027-03-27T10:00:00Z",
                last_run: Some("2027-03-20T09:00:00Z"),
                last_rotated: None,
                sample: 0.0,
                expected: Some(("2027-03-29T08:00:00Z", DueReason::Schedule)),
            },
            Case {
                story: "max_age already past: due now",
                key: KeyConfig {
                    max_age: days(30),
                    ..key(None)
                },
                now: "2027-03-24T10:00:00Z",
                last_run: None,
                last_rotated: Some("2027-02-01T10:00:00Z"),
                sample: 0.0,
                expected: Some(("2027-03-24T10:00:00Z", DueReason::MaxAge)),
            },
            Case {
                story: "max_age in the future: last_rotated + max_age",
                key: KeyConfig {
                    max_age: days(30),
                    ..key(None)
                },
                now: "2027-03-24T10:00:00Z",
                last_run: None,
                last_rotated: Some("2027-03-14T10:00:00Z"),
                sample: 0.0,
                expected: Some(("2027-04-13T10:00:00Z", DueReason::MaxAge)),
            },
            Case {
                story: "max_age past on a saturday waits for monday's window",
                key: KeyConfig {
                    max_age: days(30),
                    window: office(),
                    ..key(None)
                },
                now: "2027-03-27T10:00:00Z",
                last_run: None,
                last_rotated: Some("2027-02-01T10:00:00Z"),
                sample: 0.0,
                expected: Some(("2027-03-29T08:00:00Z", DueReason::MaxAge)),
            },
            Case {
                story: "max_age without a known last rotation is not assessed",
                key: KeyConfig {
                    max_age: days(30),
                    ..key(None)
                },
                now: "2027-03-24T10:00:00Z",
                last_run: None,
                last_rotated: None,
                sample: 0.0,
                expected: None,
            },
            Case {
                story: "max_age earlier than the weekly schedule wins",
                key: KeyConfig {
                    max_age: days(30),
                    ..key(Some("0 9 * * Mon"))
                },
                now: "2027-03-24T10:00:00Z",
                last_run: Some("2027-03-22T09:00:00Z"),
                last_rotated: Some("2027-02-23T11:00:00Z"),
                sample: 0.0,
                expected: Some(("2027-03-25T11:00:00Z", DueReason::MaxAge)),
            },
            Case {
                story: "schedule earlier than max_age wins",
                key: KeyConfig {
                    max_age: days(30),
                    ..key(Some("0 9 * * Mon"))
                },
                now: "2027-03-24T10:00:00Z",
                last_run: Some("2027-03-22T09:00:00Z"),
                last_rotated: Some("2027-03-22T09:00:00Z"),
                sample: 0.0,
                expected: Some(("2027-03-29T09:00:00Z", DueReason::Schedule)),
            },
            Case {
                story: "schedule in Zurich: 09:00 local is 08:00Z in winter",
                key: KeyConfig {
                    timezone: Zurich,
                    ..daily.clone()
                },
                now: "2027-03-24T10:00:00Z",
                last_run: None,
                last_rotated: None,
                sample: 0.0,
                expected: Some(("2027-03-25T08:00:00Z", DueReason::Schedule)),
            },
        ];
        for case in cases {
            let got = next_due(
                &case.key,
                utc(case.now),
                case.last_run.map(utc),
                case.last_rotated.map(utc),
                case.sample,
            );
            let expected = case.expected.map(|(at, reason)| Due {
                at: utc(at),
                reason,
            });
            assert_eq!(got, expected, "{}", case.story);
        }
    }

    #[test]
    fn runs_all_outside_the_window_are_detected() {
        let from = utc("2027-03-24T00:00:00Z");
        let office = || Some(window("Mon-Fri", "08:00", "17:00"));
        let cases = [
            (
                "saturday runs, weekday window",
                Some("0 9 * * Sat"),
                office(),
                true,
            ),
            (
                "night runs, office window",
                Some("0 3 * * *"),
                office(),
                true,
            ),
            (
                "daily runs, weekday window",
                Some("0 9 * * *"),
                office(),
                false,
            ),
            (
                "once a year, sometimes a weekday",
                Some("0 9 1 1 *"),
                office(),
                false,
            ),
            ("no window", Some("0 9 * * Sat"), None, false),
            ("no schedule", None, office(), false),
            (
                "schedule that never fires again",
                Some("0 0 9 * * * 2020"),
                office(),
                false,
            ),
            (
                "night run in a night window",
                Some("0 3 * * *"),
                Some(window("Fri", "22:00", "06:00")),
                false,
            ),
            (
                "noon run in a night window",
                Some("0 12 * * *"),
                Some(window("Fri", "22:00", "06:00")),
                true,
            ),
        ];
        for (story, schedule, w, expected) in cases {
            let k = KeyConfig {
                window: w,
                ..key(schedule)
            };
            assert_eq!(all_runs_outside_window_from(&k, from), expected, "{story}");
        }
    }

    #[test]
    fn plan_table_lists_runs_and_notes() {
        let scheduled = KeyConfig {
            timezone: Zurich,
            jitter: Duration::from_secs(600),
            max_age: Some(Duration::from_secs(30 * 86_400)),
            window: Some(window("Mon-Fri", "08:00", "17:00")),
            owner: Some(Box::new(crate::config::OwnerConfig {
                name: "team-payments".into(),
                contact: Some("#payments".into()),
                runbook: None,
            })),
            approval: Some(crate::config::ApprovalConfig {
                timeout: Duration::from_secs(1800),
                notify: Vec::new(),
            }),
            ..key(Some("0 9 * * Mon"))
        };
        let manual = KeyConfig {
            name: "legacy".into(),
            ..key(None)
        };
        let config = Config {
            daemon: DaemonConfig {
                state_dir: "./state".into(),
                listen: ([127, 0, 0, 1], 9464).into(),
                admin_token: None,
                max_concurrent_rotations: 16,
                reconcile_interval: None,
                log_format: LogFormat::Text,
                paused: false,
            },
            providers: BTreeMap::new(),
            stores: BTreeMap::new(),
            keys: vec![scheduled, manual],
            coordination: None,
            limits: Default::default(),
            notify: BTreeMap::new(),
            warnings: Vec::new(),
        };
        let table = plan_table(&config, utc("2027-03-24T00:00:00Z"), 2);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("KEY"), "{table}");
        for column in ["TIMEZONE", "SCHEDULE", "NEXT RUNS"] {
            assert!(lines[0].contains(column), "{table}");
        }
        // Monday 2027-03-29 is after the spring-forward: 09:00 CEST is 07:00 UTC.
        assert!(lines[1].starts_with("billing-api"), "{table}");
        assert!(lines[1].contains("Europe/Zurich"), "{table}");
        assert!(lines[1].contains("0 9 * * Mon"), "{table}");
        assert!(
            lines[1].contains("Mon 2027-03-29 09:00:00 +02:00 (2027-03-29 07:00:00 UTC)"),
            "{table}"
        );
        assert!(
            lines[2].contains("Mon 2027-04-05 09:00:00 +02:00"),
            "{table}"
        );
        assert!(
            !table.contains("2027-04-12"),
            "only 2 runs asked for: {table}"
        );
        assert!(table.contains("window Mon-Fri 08:00-17:00"), "{table}");
        assert!(table.contains("up to 10m"), "{table}");
        assert!(table.contains("max_age 30days"), "{table}");
        let legacy = lines
            .iter()
            .position(|l| l.starts_with("legacy"))
            .unwrap_or_else(|| panic!("no legacy row: {table}"));
        assert!(lines[legacy + 1].contains("owner: none named"), "{table}");
        assert!(lines[legacy + 2].contains("manual only"), "{table}");
        assert!(
            lines[3].contains("note: owner team-payments <#payments>"),
            "{table}"
        );
        assert!(
            table.contains("needs approval: each run waits up to 30m for `keyrotd approve`"),
            "{table}"
        );
        // The NEXT RUNS column lines up under its header.
        let column = lines[0].find("NEXT RUNS").unwrap_or(0);
        assert_eq!(lines[1].find("Mon 2027-03-29"), Some(column), "{table}");
    }
}
