//! The per-key and per-provider series, stored as plain atomics and written straight into the text
//! format.
//!
//! The contract exports every label combination the config makes possible from start (about forty
//! series per key, most of them zero forever). The `prometheus` crate keeps each series as its own
//! object with a copy of its family's description and its label pairs as protobuf strings, about
//! half a kilobyte each, and gathers every series into protobuf messages on each scrape: at 10,000
//! keys that is most of the daemon's memory. Here one key's series are one small struct of
//! counters, gauge cells and two histograms (under a kilobyte), and a scrape is written key by key in
//! chunks ([`Table::render`]), so it never holds the whole exposition at once. The families keep the
//! names, types, HELP texts and labels of docs/metrics.md; only the storage differs. The `prometheus`
//! registry still holds the process metrics and the families with few series.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use super::{
    CheckResult, INVALIDATION_WINDOW_BUCKETS, Outcome, ProviderOperation, ProviderOutcome,
    ROTATION_DURATION_BUCKETS, RerotationReason, StoreOutcome,
};

/// A gauge cell with no series: the value has not been learned yet, or does not apply to the key.
const ABSENT: u64 = u64::MAX;

/// The per-key gauges, each one cell of [`KeySeries::gauges`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gauge {
    LastSuccess,
    LastAttempt,
    Active,
    LastRotation,
    NextRotation,
    MaxAge,
    SchedulePeriod,
    Drift,
    JournalBlocked,
    LeaseHeld,
    Pending,
    /// Dual keys only (absent on the others), like the three after it.
    Overlap,
    DependentsConfirmed,
    OldKeyLiveSince,
    RevokeAfter,
}

const GAUGES: usize = Gauge::RevokeAfter as usize + 1;

/// The gauges only a dual key (`overlap = "dual"`) has; all but `RevokeAfter` start at 0.
const DUAL_GAUGES: [Gauge; 3] = [
    Gauge::Overlap,
    Gauge::DependentsConfirmed,
    Gauge::OldKeyLiveSince,
];

fn zeros(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

fn copy(from: &[AtomicU64], to: &[AtomicU64]) {
    for (f, t) in from.iter().zip(to) {
        t.store(f.load(Relaxed), Relaxed);
    }
}

/// A histogram over fixed bounds: per-bucket (not cumulative) counts, the total count and the sum.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: zeros(bounds.len()),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        // Cannot fail: the closure always returns Some.
        let _ = self.sum.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }

    fn copy_from(&self, other: &Histogram) {
        copy(&other.buckets, &self.buckets);
        self.count.store(other.count.load(Relaxed), Relaxed);
        self.sum.store(other.sum.load(Relaxed), Relaxed);
    }
}

/// A key's two histograms, allocated at its first rotation: until then both are all zeros, and most
/// keys of a large fleet are idle most of the time.
#[derive(Debug)]
struct Histograms {
    duration: Histogram,
    window: Histogram,
}

impl Histograms {
    fn new() -> Box<Histograms> {
        Box::new(Histograms {
            duration: Histogram::new(ROTATION_DURATION_BUCKETS),
            window: Histogram::new(INVALIDATION_WINDOW_BUCKETS),
        })
    }
}

/// Where the extra series of a verified dependent live, after one cell per [`CheckResult`].
const AUTH_FAILURES: usize = 0;
const AUTH_FAILING: usize = 1;
const PER_VERIFIED: usize = CheckResult::ALL.len() + 2;

/// Cells of a key before its per-store and per-dependent ones: its rotations by outcome, re-rotations
/// by reason, gauges, and lease take-overs.
fn fixed_cells() -> usize {
    Outcome::ALL.len() + RerotationReason::ALL.len() + GAUGES + 1
}

/// Every series of one key: one run of atomic cells and, from its first rotation, two histograms.
///
/// Cells, in order: rotations by [`Outcome`], re-rotations by [`RerotationReason`], the [`Gauge`]s
/// (`f64` bits, or [`ABSENT`]), lease take-overs ([`ABSENT`] without `[coordination]`), then ok/error
/// per store, ok/error per hooked dependent, and per verified dependent one cell per [`CheckResult`],
/// its auth failures and its failing gauge (0/1).
#[derive(Debug)]
pub(super) struct KeySeries {
    cells: Box<[AtomicU64]>,
    /// Stores the key has a destination on.
    stores: Box<[Arc<str>]>,
    /// Dependents with a reload hook.
    hooked: Box<[Arc<str>]>,
    /// Dependents with a verify.
    verified: Box<[Arc<str>]>,
    /// The owner's name, `""` without one: the `owner` label of `keyrotd_key_info`.
    owner: Arc<str>,
    histograms: OnceLock<Box<Histograms>>,
}

/// What one key's series look like, from its `[[keys]]` entry.
#[derive(Debug, Default)]
pub(super) struct Shape {
    pub stores: BTreeSet<String>,
    pub hooked: BTreeSet<String>,
    pub verified: BTreeSet<String>,
    pub coordinated: bool,
    pub owner: String,
    /// The provider keeps two keys live: the dual gauges exist.
    pub dual: bool,
    /// A dual key's `revoke_after`, in seconds.
    pub revoke_after: Option<f64>,
}

/// One shared copy of each store and dependent name, for every key that uses it.
#[derive(Debug, Default)]
pub(super) struct Names(BTreeSet<Arc<str>>);

impl Names {
    fn one(&mut self, name: &str) -> Arc<str> {
        match self.0.get(name) {
            Some(shared) => shared.clone(),
            None => {
                let shared: Arc<str> = name.into();
                self.0.insert(shared.clone());
                shared
            }
        }
    }

    fn all(&mut self, names: &BTreeSet<String>) -> Box<[Arc<str>]> {
        names.iter().map(|n| self.one(n)).collect()
    }
}

impl KeySeries {
    /// The series of a key of `shape`, with the values of `old` (the same key before a reload) for
    /// every series both have.
    pub(super) fn new(shape: &Shape, names: &mut Names, old: Option<&KeySeries>) -> KeySeries {
        let (stores, hooked, verified) = (
            names.all(&shape.stores),
            names.all(&shape.hooked),
            names.all(&shape.verified),
        );
        let len = fixed_cells() + 2 * (stores.len() + hooked.len()) + PER_VERIFIED * verified.len();
        let k = KeySeries {
            cells: zeros(len),
            stores,
            hooked,
            verified,
            owner: names.one(&shape.owner),
            histograms: OnceLock::new(),
        };
        for g in 0..GAUGES {
            k.cells[Self::gauge_cell(g)].store(ABSENT, Relaxed);
        }
        k.cells[Self::takeovers_cell()].store(ABSENT, Relaxed);
        if let Some(old) = old {
            k.copy_from(old);
        }
        for always in [Gauge::Drift, Gauge::JournalBlocked, Gauge::Pending] {
            if k.gauge(always).is_none() {
                k.set(always, Some(0.0));
            }
        }
        for g in DUAL_GAUGES {
            match (shape.dual, k.gauge(g)) {
                (true, None) => k.set(g, Some(0.0)),
                (true, Some(_)) => {}
                (false, _) => k.set(g, None),
            }
        }
        k.set(
            Gauge::RevokeAfter,
            shape.revoke_after.filter(|_| shape.dual),
        );
        let takeovers = &k.cells[Self::takeovers_cell()];
        if shape.coordinated {
            if k.gauge(Gauge::LeaseHeld).is_none() {
                k.set(Gauge::LeaseHeld, Some(0.0));
            }
            let _ = takeovers.compare_exchange(ABSENT, 0, Relaxed, Relaxed);
        } else {
            k.set(Gauge::LeaseHeld, None);
            takeovers.store(ABSENT, Relaxed);
        }
        k
    }

    /// Takes `old`'s values for every series this key still has.
    fn copy_from(&self, old: &KeySeries) {
        copy(&old.cells[..fixed_cells()], &self.cells[..fixed_cells()]);
        let pairs = [
            (
                &old.stores,
                &self.stores,
                old.store_cells(),
                self.store_cells(),
                2,
            ),
            (
                &old.hooked,
                &self.hooked,
                old.hook_cells(),
                self.hook_cells(),
                2,
            ),
            (
                &old.verified,
                &self.verified,
                old.verified_cells(),
                self.verified_cells(),
                PER_VERIFIED,
            ),
        ];
        for (old_names, new_names, old_at, new_at, width) in pairs {
            for (i, name) in new_names.iter().enumerate() {
                if let Some(j) = old_names.iter().position(|n| n == name) {
                    let from = &old.cells[old_at + width * j..][..width];
                    copy(from, &self.cells[new_at + width * i..][..width]);
                }
            }
        }
        if let Some(h) = old.histograms.get() {
            self.histograms().duration.copy_from(&h.duration);
            self.histograms().window.copy_from(&h.window);
        }
    }

    fn gauge_cell(g: usize) -> usize {
        Outcome::ALL.len() + RerotationReason::ALL.len() + g
    }

    fn takeovers_cell() -> usize {
        fixed_cells() - 1
    }

    fn store_cells(&self) -> usize {
        fixed_cells()
    }

    fn hook_cells(&self) -> usize {
        self.store_cells() + 2 * self.stores.len()
    }

    fn verified_cells(&self) -> usize {
        self.hook_cells() + 2 * self.hooked.len()
    }

    fn histograms(&self) -> &Histograms {
        self.histograms.get_or_init(Histograms::new)
    }

    pub(super) fn gauge(&self, g: Gauge) -> Option<f64> {
        match self.cells[Self::gauge_cell(g as usize)].load(Relaxed) {
            ABSENT => None,
            bits => Some(f64::from_bits(bits)),
        }
    }

    pub(super) fn set(&self, g: Gauge, value: Option<f64>) {
        self.cells[Self::gauge_cell(g as usize)].store(value.map_or(ABSENT, f64::to_bits), Relaxed);
    }

    /// A finished rotation; `duration` is `None` for one that never ran (skipped).
    pub(super) fn rotation(&self, outcome: Outcome, duration: Option<f64>) {
        self.cells[outcome.index()].fetch_add(1, Relaxed);
        if let Some(d) = duration {
            self.histograms().duration.observe(d);
        }
    }

    pub(super) fn window(&self, seconds: f64) {
        self.histograms().window.observe(seconds);
    }

    pub(super) fn rerotation(&self, reason: RerotationReason) {
        self.cells[Outcome::ALL.len() + reason.index()].fetch_add(1, Relaxed);
    }

    pub(super) fn lease_takeover(&self) {
        let _ = self.cells[Self::takeovers_cell()]
            .fetch_update(Relaxed, Relaxed, |v| (v != ABSENT).then_some(v + 1));
    }

    pub(super) fn store_write(&self, store: &str, outcome: StoreOutcome) {
        if let Some(i) = self.stores.iter().position(|s| &**s == store) {
            self.cells[self.store_cells() + 2 * i + outcome.index()].fetch_add(1, Relaxed);
        }
    }

    pub(super) fn reload_hook(&self, dependent: &str, outcome: StoreOutcome) {
        if let Some(i) = self.hooked.iter().position(|d| &**d == dependent) {
            self.cells[self.hook_cells() + 2 * i + outcome.index()].fetch_add(1, Relaxed);
        }
    }

    pub(super) fn check(&self, dependent: &str, result: CheckResult) {
        let Some(i) = self.verified.iter().position(|d| &**d == dependent) else {
            return;
        };
        let cells = &self.cells[self.verified_cells() + PER_VERIFIED * i..][..PER_VERIFIED];
        let extra = CheckResult::ALL.len();
        cells[result.index()].fetch_add(1, Relaxed);
        match result {
            CheckResult::AuthFailure => {
                cells[extra + AUTH_FAILURES].fetch_add(1, Relaxed);
                cells[extra + AUTH_FAILING].store(1, Relaxed);
            }
            CheckResult::Ok => cells[extra + AUTH_FAILING].store(0, Relaxed),
            CheckResult::Error => {}
        }
    }

    /// The cells of verified dependent `i`.
    fn verified_of(&self, i: usize) -> &[AtomicU64] {
        &self.cells[self.verified_cells() + PER_VERIFIED * i..][..PER_VERIFIED]
    }
}

/// Every per-key and per-provider series of the current config.
#[derive(Debug, Default)]
pub(super) struct Table {
    pub keys: BTreeMap<Box<str>, KeySeries>,
    /// One counter per [`ProviderOperation`] × [`ProviderOutcome`].
    pub providers: BTreeMap<Box<str>, Box<[AtomicU64]>>,
}

impl Table {
    pub(super) fn provider_cells(old: Option<&[AtomicU64]>) -> Box<[AtomicU64]> {
        let cells = zeros(ProviderOperation::ALL.len() * ProviderOutcome::ALL.len());
        if let Some(old) = old {
            copy(old, &cells);
        }
        cells
    }

    pub(super) fn provider_request(
        &self,
        provider: &str,
        operation: ProviderOperation,
        outcome: ProviderOutcome,
    ) {
        if let Some(cells) = self.providers.get(provider) {
            cells[operation.index() * ProviderOutcome::ALL.len() + outcome.index()]
                .fetch_add(1, Relaxed);
        }
    }

    /// Writes up to `limit` keys' (or providers') series of `family`, starting after `after`, to
    /// `out`, with the family's HELP and TYPE lines before its first sample while `header` is true
    /// (then sets it false; a family without samples writes nothing, as the `prometheus` crate does).
    /// Returns the last name visited, or `None` when the family is done.
    pub(super) fn render(
        &self,
        family: Family,
        after: Option<&str>,
        limit: usize,
        header: &mut bool,
        out: &mut String,
    ) -> Option<Box<str>> {
        let range = (
            after.map_or(Bound::Unbounded, Bound::Excluded),
            Bound::Unbounded,
        );
        let mut last = None;
        let mut headed = |out: &mut String, from: usize| {
            if *header && out.len() > from {
                let (name, kind, help) = family.describe();
                out.insert_str(
                    from,
                    &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"),
                );
                *header = false;
            }
        };
        if family == Family::ProviderRequests {
            for (name, cells) in self.providers.range::<str, _>(range).take(limit) {
                let from = out.len();
                write_provider(name, cells, out);
                headed(out, from);
                last = Some(name.clone());
            }
        } else {
            for (name, series) in self.keys.range::<str, _>(range).take(limit) {
                let from = out.len();
                family.write_key(name, series, out);
                headed(out, from);
                last = Some(name.clone());
            }
        }
        last
    }
}

/// The families [`Table`] holds, in the order a scrape writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    Rotations,
    Duration,
    Window,
    StoreWrites,
    ReloadHooks,
    Checks,
    AuthFailures,
    AuthFailing,
    Rerotations,
    LeaseTakeovers,
    KeyInfo,
    Gauge(Gauge),
    ProviderRequests,
}

impl Family {
    pub(super) const ALL: &'static [Family] = &[
        Family::Rotations,
        Family::Duration,
        Family::Window,
        Family::StoreWrites,
        Family::ReloadHooks,
        Family::Checks,
        Family::AuthFailures,
        Family::AuthFailing,
        Family::Rerotations,
        Family::Gauge(Gauge::LastSuccess),
        Family::Gauge(Gauge::LastAttempt),
        Family::Gauge(Gauge::Active),
        Family::Gauge(Gauge::LastRotation),
        Family::Gauge(Gauge::NextRotation),
        Family::Gauge(Gauge::MaxAge),
        Family::Gauge(Gauge::SchedulePeriod),
        Family::Gauge(Gauge::Drift),
        Family::Gauge(Gauge::JournalBlocked),
        Family::Gauge(Gauge::LeaseHeld),
        Family::Gauge(Gauge::Pending),
        Family::Gauge(Gauge::Overlap),
        Family::Gauge(Gauge::DependentsConfirmed),
        Family::Gauge(Gauge::OldKeyLiveSince),
        Family::Gauge(Gauge::RevokeAfter),
        Family::LeaseTakeovers,
        Family::KeyInfo,
        Family::ProviderRequests,
    ];

    /// Name, type and HELP text (docs/metrics.md).
    fn describe(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Family::Rotations => (
                "keyrotd_rotations_total",
                "counter",
                "Finished rotations by outcome (success, degraded, aborted, failed).",
            ),
            Family::Duration => (
                "keyrotd_rotation_duration_seconds",
                "histogram",
                "Rotation duration, from the start of preflight to the end of notify.",
            ),
            Family::Window => (
                "keyrotd_invalidation_window_seconds",
                "histogram",
                "Outage window: regenerate response to the last destination written and the last reload hook answered.",
            ),
            Family::StoreWrites => (
                "keyrotd_store_writes_total",
                "counter",
                "Destination writes by store and outcome (ok, error).",
            ),
            Family::ReloadHooks => (
                "keyrotd_reload_hooks_total",
                "counter",
                "Reload hook calls by dependent and outcome (ok, error).",
            ),
            Family::Checks => (
                "keyrotd_post_rotation_checks_total",
                "counter",
                "Post-rotation watch probes of dependents by result (ok, auth_failure, error).",
            ),
            Family::AuthFailures => (
                "keyrotd_post_rotation_auth_failures_total",
                "counter",
                "Post-rotation watch probes that failed authentication (401/403).",
            ),
            Family::AuthFailing => (
                "keyrotd_post_rotation_auth_failing",
                "gauge",
                "1 while the dependent's latest answered probe failed authentication, else 0.",
            ),
            Family::Rerotations => (
                "keyrotd_rerotations_total",
                "counter",
                "Re-rotations by reason (lost_before_storage, crash_recovery, drift).",
            ),
            Family::LeaseTakeovers => (
                "keyrotd_lease_takeovers_total",
                "counter",
                "Times this replica took the key over from another replica whose lease had expired.",
            ),
            Family::KeyInfo => (
                "keyrotd_key_info",
                "gauge",
                "Always 1; the owner label names the key's owner (empty when it has none), for joining onto alerts.",
            ),
            Family::ProviderRequests => (
                "keyrotd_provider_requests_total",
                "counter",
                "Provider calls by operation (status, regenerate, auth_check, create, revoke, list) and outcome.",
            ),
            Family::Gauge(g) => gauge_description(g),
        }
    }

    fn write_key(self, key: &str, s: &KeySeries, out: &mut String) {
        let (name, _, _) = self.describe();
        let extra = CheckResult::ALL.len();
        match self {
            Family::Rotations => {
                for o in Outcome::ALL {
                    let v = s.cells[o.index()].load(Relaxed);
                    sample(
                        out,
                        name,
                        "",
                        &[("key", key), ("outcome", o.as_str())],
                        v as f64,
                    );
                }
            }
            Family::Duration => {
                let h = s.histograms.get().map(|h| &h.duration);
                write_histogram(out, name, key, ROTATION_DURATION_BUCKETS, h);
            }
            Family::Window => {
                let h = s.histograms.get().map(|h| &h.window);
                write_histogram(out, name, key, INVALIDATION_WINDOW_BUCKETS, h);
            }
            Family::StoreWrites => {
                let cells = &s.cells[s.store_cells()..s.hook_cells()];
                write_labelled(out, name, key, "store", &s.stores, cells);
            }
            Family::ReloadHooks => {
                let cells = &s.cells[s.hook_cells()..s.verified_cells()];
                write_labelled(out, name, key, "dependent", &s.hooked, cells);
            }
            Family::Checks => {
                for (i, d) in s.verified.iter().enumerate() {
                    for r in CheckResult::ALL {
                        let v = s.verified_of(i)[r.index()].load(Relaxed) as f64;
                        let labels = [("key", key), ("dependent", &**d), ("result", r.as_str())];
                        sample(out, name, "", &labels, v);
                    }
                }
            }
            Family::AuthFailures | Family::AuthFailing => {
                let at = extra
                    + if self == Family::AuthFailures {
                        AUTH_FAILURES
                    } else {
                        AUTH_FAILING
                    };
                for (i, d) in s.verified.iter().enumerate() {
                    let v = s.verified_of(i)[at].load(Relaxed) as f64;
                    sample(out, name, "", &[("key", key), ("dependent", d)], v);
                }
            }
            Family::Rerotations => {
                for r in RerotationReason::ALL {
                    let v = s.cells[Outcome::ALL.len() + r.index()].load(Relaxed) as f64;
                    sample(out, name, "", &[("key", key), ("reason", r.as_str())], v);
                }
            }
            Family::LeaseTakeovers => match s.cells[KeySeries::takeovers_cell()].load(Relaxed) {
                ABSENT => {}
                v => sample(out, name, "", &[("key", key)], v as f64),
            },
            Family::KeyInfo => sample(out, name, "", &[("key", key), ("owner", &s.owner)], 1.0),
            Family::Gauge(g) => {
                if let Some(v) = s.gauge(g) {
                    sample(out, name, "", &[("key", key)], v);
                }
            }
            Family::ProviderRequests => {}
        }
    }
}

fn gauge_description(g: Gauge) -> (&'static str, &'static str, &'static str) {
    let (name, help) = match g {
        Gauge::LastSuccess => (
            "keyrotd_rotation_last_success_timestamp_seconds",
            "End of the last rotation with outcome success or degraded, Unix seconds.",
        ),
        Gauge::LastAttempt => (
            "keyrotd_rotation_last_attempt_timestamp_seconds",
            "Start of the last rotation, whatever its outcome, Unix seconds.",
        ),
        Gauge::Active => (
            "keyrotd_key_active",
            "1 when the provider last said the key is Active, 0 when it said otherwise.",
        ),
        Gauge::LastRotation => (
            "keyrotd_key_last_rotation_timestamp_seconds",
            "The provider's Last Rotated for the key, Unix seconds.",
        ),
        Gauge::NextRotation => (
            "keyrotd_key_next_rotation_timestamp_seconds",
            "Next scheduled rotation of the key (window and jitter applied), Unix seconds.",
        ),
        Gauge::MaxAge => (
            "keyrotd_key_max_age_seconds",
            "The key's configured max_age, in seconds (only keys with a max_age).",
        ),
        Gauge::SchedulePeriod => (
            "keyrotd_key_schedule_period_seconds",
            "Longest gap between the key's upcoming scheduled rotations, in seconds (only scheduled keys).",
        ),
        Gauge::Drift => (
            "keyrotd_drift",
            "1 while no destination holds the provider's active key, or destinations disagree.",
        ),
        Gauge::JournalBlocked => (
            "keyrotd_journal_blocked",
            "1 while the key's journal was unreadable at start: set aside, and the key blocked from automatic rotation until an operator rotates it.",
        ),
        Gauge::LeaseHeld => (
            "keyrotd_lease_held",
            "1 while this replica holds the key's lease (several replicas, [coordination]).",
        ),
        Gauge::Pending => (
            "keyrotd_rotation_pending",
            "1 while a due rotation of the key waits for an operator's approval.",
        ),
        Gauge::Overlap => (
            "keyrotd_key_overlap_seconds",
            "Dual keys: how long the old and the new key were both live in the last rotation that retired its old key (creation of the new to revoke of the old), seconds.",
        ),
        Gauge::DependentsConfirmed => (
            "keyrotd_dependents_confirmed",
            "Dual keys: dependents that confirmed the key's newest key (healthy, and reporting its fingerprint where they can).",
        ),
        Gauge::OldKeyLiveSince => (
            "keyrotd_key_old_key_live_since_timestamp_seconds",
            "Dual keys: when the overlap began (the new key's creation) while a rotation has ended with the old key still live, Unix seconds; 0 when no old key is kept.",
        ),
        Gauge::RevokeAfter => (
            "keyrotd_key_revoke_after_seconds",
            "Dual keys with revoke_after: how long after the new key's creation the old key is revoked even if a dependent never confirmed, seconds.",
        ),
    };
    (name, "gauge", help)
}

fn write_labelled(
    out: &mut String,
    name: &str,
    key: &str,
    label: &str,
    names: &[Arc<str>],
    cells: &[AtomicU64],
) {
    for (i, n) in names.iter().enumerate() {
        for o in StoreOutcome::ALL {
            let v = cells[2 * i + o.index()].load(Relaxed) as f64;
            let labels = [("key", key), (label, &**n), ("outcome", o.as_str())];
            sample(out, name, "", &labels, v);
        }
    }
}

/// A histogram's series; `None` (no rotation yet) writes zeros.
fn write_histogram(out: &mut String, name: &str, key: &str, bounds: &[f64], h: Option<&Histogram>) {
    let mut cumulative = 0;
    for (i, bound) in bounds.iter().enumerate() {
        cumulative += h.map_or(0, |h| h.buckets[i].load(Relaxed));
        let le = bound.to_string();
        sample(
            out,
            name,
            "_bucket",
            &[("key", key), ("le", &le)],
            cumulative as f64,
        );
    }
    // Read after the buckets: a concurrent observation may have counted in a bucket already.
    let count = h.map_or(0, |h| h.count.load(Relaxed)).max(cumulative);
    sample(
        out,
        name,
        "_bucket",
        &[("key", key), ("le", "+Inf")],
        count as f64,
    );
    let sum = h.map_or(0.0, |h| f64::from_bits(h.sum.load(Relaxed)));
    sample(out, name, "_sum", &[("key", key)], sum);
    sample(out, name, "_count", &[("key", key)], count as f64);
}

fn write_provider(provider: &str, cells: &[AtomicU64], out: &mut String) {
    let (name, _, _) = Family::ProviderRequests.describe();
    for op in ProviderOperation::ALL {
        for o in ProviderOutcome::ALL {
            let v = cells[op.index() * ProviderOutcome::ALL.len() + o.index()].load(Relaxed);
            let labels = [
                ("provider", provider),
                ("operation", op.as_str()),
                ("outcome", o.as_str()),
            ];
            sample(out, name, "", &labels, v as f64);
        }
    }
}

/// One sample line of the text format: labels sorted by name, as the `prometheus` crate writes
/// them, and their values escaped.
fn sample(out: &mut String, name: &str, suffix: &str, labels: &[(&str, &str)], value: f64) {
    let mut sorted = [("", ""); 4];
    let sorted = &mut sorted[..labels.len()];
    sorted.copy_from_slice(labels);
    sorted.sort_unstable_by_key(|(label, _)| *label);
    out.push_str(name);
    out.push_str(suffix);
    out.push('{');
    for (i, (label, value)) in sorted.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(label);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push_str("} ");
    if value.is_nan() {
        out.push_str("NaN");
    } else if value.is_infinite() {
        out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{value}");
    }
    out.push('\n');
}
