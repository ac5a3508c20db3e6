//! Every metric keyrotd exports, defined once (docs/metrics.md), and the typed calls that record
//! them.
//!
//! This module owns the metric names, types, HELP texts, label names and label value sets. The engine,
//! the scheduler and the admin API never name a metric: they call a method of [`Metrics`]
//! (`rotation_finished`, `store_write`, `post_rotation_check`...) and the admin API serves
//! [`Metrics::encode`].
//!
//! Invariants, written as absences:
//! - no label value comes from anything but a name in the current [`Config`] (key, store, dependent,
//!   provider) or one of the fixed enums below ([`Outcome`], [`CheckResult`]...). Nothing here takes a
//!   secret, an error or a response body, so none can reach `/metrics`;
//! - no series outlives its name in the config: [`Metrics::apply_config`] removes the series of keys,
//!   stores, dependents and providers that a reload dropped, and recording calls for names the current
//!   config does not know are ignored (a rotation of a key removed mid-flight cannot resurrect it);
//! - no I/O: encoding is a pure function of the in-memory registry (the process metrics read `/proc`
//!   when gathered, which is the one exception and is the `prometheus` crate's own).
//!
//! Every label combination known from the config is created at 0 by [`Metrics::apply_config`] so that
//! `rate()`/`increase()` and the alert rules in `prometheus/alerts.yml` work before the first event.
//! Series whose value is unknown until something happens (`keyrotd_key_active`, the last-rotation,
//! last-success and last-attempt timestamps) appear on their first recording: exporting `0` for them
//! would claim "inactive" or "never rotated" when keyrotd simply has not asked yet.
//!
//! Two gauges exist for the alert rules alone (docs/metrics.md#two-gauges-for-the-alert-rules):
//! `keyrotd_key_max_age_seconds{key}` and `keyrotd_key_schedule_period_seconds{key}`.

mod keyed;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use keyed::{Gauge, KeySeries, Table};

use crate::config::{Config, KeyConfig};
use crate::store::CredentialStatus;

/// The `Content-Type` of [`Metrics::encode`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Buckets of `keyrotd_invalidation_window_seconds`: the outage between regenerate and the last
/// destination written and hook answered, from a few milliseconds (all local) to ten minutes (a store
/// retried until its deadline).
pub const INVALIDATION_WINDOW_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Buckets of `keyrotd_rotation_duration_seconds`: preflight to end of notify, tens of milliseconds to
/// half an hour.
pub const ROTATION_DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Defines a fixed label value set: an enum, its `ALL` values and `as_str()` (the exported text).
macro_rules! label_set {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
            serde::Serialize, serde::Deserialize,
        )]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every value, in the order docs/metrics.md lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// Its position in [`Self::ALL`].
            pub fn index(self) -> usize {
                self as usize
            }

            /// The label value as exported.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_set! {
    /// How a rotation ended (docs/lifecycle.md#6-outcome).
    Outcome {
        /// Every destination and dependent served with the new key.
        Success => "success",
        /// The new key works and is stored somewhere, but a destination or dependent lagged.
        Degraded => "degraded",
        /// Stopped before regenerate; nothing changed, the old key still works.
        Aborted => "aborted",
        /// Regenerate refused, or the key was lost and could not be re-rotated yet.
        Failed => "failed",
        /// A rotation that needed an operator's approval got none in time (or another rotation of
        /// the key overtook it): nothing changed, the next due time follows the schedule.
        Skipped => "skipped",
    }
}

label_set! {
    /// How a notification to a `[notify.NAME]` target ended, after its retries.
    NotifyOutcome {
        /// Delivered (a 2xx answer, or the command exited 0), possibly after retries.
        Ok => "ok",
        /// Every attempt failed: the notification was dropped (the rotation was not affected).
        Failed => "failed",
    }
}

label_set! {
    /// Result of one destination write, one reload hook call or one config reload.
    StoreOutcome {
        Ok => "ok",
        Error => "error",
    }
}

label_set! {
    /// Result of one post-rotation `verify` probe of a dependent.
    CheckResult {
        /// The dependent answered with its expected status.
        Ok => "ok",
        /// 401 or 403: the dependent still holds a key the provider no longer accepts.
        AuthFailure => "auth_failure",
        /// Any other failure (timeout, refused, unexpected status): says nothing about its key.
        Error => "error",
    }
}

label_set! {
    /// Why a key had to be regenerated again (docs/lifecycle.md#ambiguous-regenerate, and the
    /// recovery and reconcile sections after it).
    RerotationReason {
        /// An ambiguous regenerate rotated the key but its secret never arrived.
        LostBeforeStorage => "lost_before_storage",
        /// The process died between regenerate and storage.
        CrashRecovery => "crash_recovery",
        /// No destination holds the provider's active key (someone rotated elsewhere, or it was lost).
        Drift => "drift",
    }
}

label_set! {
    /// The provider calls keyrotd makes.
    ProviderOperation {
        Status => "status",
        Regenerate => "regenerate",
        AuthCheck => "auth_check",
        /// A dual provider's second key (`overlap = "dual"`).
        Create => "create",
        Revoke => "revoke",
        List => "list",
    }
}

label_set! {
    /// How a provider call ended, by the kind of its error.
    ProviderOutcome {
        Ok => "ok",
        AuthError => "auth_error",
        RateLimited => "rate_limited",
        Transient => "transient",
        /// Sent, but whether the portal acted is unknown (timeout/reset/5xx after the request).
        Ambiguous => "ambiguous",
    }
}

/// The names of the current config that the registry's labelled families may carry.
#[derive(Debug, Default)]
struct Known {
    /// Every `[stores.*]` name, used by a key or not.
    stores: BTreeSet<String>,
    /// Every `[notify.*]` target name.
    notify_targets: BTreeSet<String>,
}

/// The registry, the per-key table and every keyrotd metric. Share it behind an `Arc`; every method
/// takes `&self`.
pub struct Metrics {
    registry: Registry,
    /// Every per-key and per-provider series ([`keyed`]); its key and provider names are the ones the
    /// current config has, and recording calls for other names are ignored.
    table: RwLock<Table>,
    /// The `[stores.*]` and `[notify.*]` names of the current config.
    known: RwLock<Known>,

    store_credential_expiry: GaugeVec,
    store_credential_renewal_failing: IntGaugeVec,
    config_reloads: IntCounterVec,
    journal_write_failures: prometheus::IntCounter,
    lease_renew_failures: prometheus::IntCounter,
    notifications: IntCounterVec,
    /// Dual keys' dependents that confirm (few series: kept in the registry).
    dependent_unconfirmed: IntGaugeVec,
    /// Per dual key, the dependents `dependent_unconfirmed` may name.
    confirmers: RwLock<BTreeMap<String, BTreeSet<String>>>,
    reloads_coalesced: prometheus::IntCounter,
    paused: IntGauge,
    build_info: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

// Metric construction and registration fail only for an invalid name, label name or bucket list, or a
// name registered twice: all of them constants of this file, exercised by every test that calls
// `Metrics::new()`. Hence the `expect`s below, which never see outside input.
fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter definition");
    registry
        .register(Box::new(vec.clone()))
        .expect("metric registered once");
    vec
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let vec = GaugeVec::new(Opts::new(name, help), labels).expect("valid gauge definition");
    registry
        .register(Box::new(vec.clone()))
        .expect("metric registered once");
    vec
}

fn int_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge definition");
    registry
        .register(Box::new(vec.clone()))
        .expect("metric registered once");
    vec
}

fn int_counter(registry: &Registry, name: &str, help: &str) -> prometheus::IntCounter {
    let c = prometheus::IntCounter::new(name, help).expect("valid counter definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn unix_seconds(at: DateTime<Utc>) -> f64 {
    at.timestamp_millis() as f64 / 1000.0
}

/// Removes every series of `vec` whose labels `keep` rejects.
fn prune<T: MetricVecBuilder>(vec: &MetricVec<T>, keep: impl Fn(&HashMap<&str, &str>) -> bool) {
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|pair| (pair.name(), pair.value()))
                .collect();
            if !keep(&labels) {
                // Cannot fail: the label names come from this very vector.
                let _ = vec.remove(&labels);
            }
        }
    }
}

/// The longest gap between consecutive runs among the next few: the period a key is rotated at. The
/// longest, not the first, so that "weekdays at 03:00" counts the weekend gap and an alert on 2×
/// period does not fire every Monday.
fn schedule_period(runs: &[DateTime<Utc>]) -> Option<Duration> {
    runs.windows(2)
        .filter_map(|pair| (pair[1] - pair[0]).to_std().ok())
        .max()
}

/// How many upcoming runs [`Metrics::apply_config`] looks at to find a key's schedule period.
const PERIOD_RUNS: usize = 8;

/// How many keys (or providers) one chunk of a scrape holds: [`Metrics::next_chunk`].
const KEYS_PER_CHUNK: usize = 256;

/// Where a scrape is: [`Metrics::next_chunk`].
#[derive(Debug, Default)]
pub struct Scrape {
    registry_done: bool,
    family: usize,
    after: Option<Box<str>>,
    /// The current family's HELP and TYPE lines are still to be written.
    header_written: bool,
}

impl Metrics {
    /// A registry holding the process metrics, `keyrotd_build_info` and the families with few series,
    /// and an empty per-key table: call [`Metrics::apply_config`] before recording anything.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let metrics = Metrics {
            store_credential_expiry: gauge(
                &r,
                "keyrotd_store_credential_expiry_timestamp_seconds",
                "When the store's credential (a Vault token) stops working unless someone acts, Unix seconds; +Inf while keyrotd keeps it valid.",
                &["store"],
            ),
            store_credential_renewal_failing: int_gauge(
                &r,
                "keyrotd_store_credential_renewal_failing",
                "1 while the last renewal (or AppRole login) of the store's credential failed, else 0.",
                &["store"],
            ),
            config_reloads: counter(
                &r,
                "keyrotd_config_reloads_total",
                "SIGHUP configuration reloads by outcome (ok, error).",
                &["outcome"],
            ),
            journal_write_failures: int_counter(
                &r,
                "keyrotd_journal_write_failures_total",
                "Journal writes that failed (state_dir full, read-only or gone); retried, and /readyz fails meanwhile.",
            ),
            lease_renew_failures: int_counter(
                &r,
                "keyrotd_lease_renew_failures_total",
                "Renewals of this replica's membership lease that failed (Vault unreachable or refusing).",
            ),
            dependent_unconfirmed: int_gauge(
                &r,
                "keyrotd_dependent_unconfirmed",
                "Dual keys: 1 while the dependent has not confirmed the newest key and the old key is kept live for it.",
                &["key", "dependent"],
            ),
            reloads_coalesced: int_counter(
                &r,
                "keyrotd_reloads_coalesced_total",
                "Reload requests served by another key's reload of the same target (reload_coalesce, groups).",
            ),
            paused: {
                let g = IntGauge::new("keyrotd_paused", "1 while scheduled rotations are paused.")
                    .expect("valid gauge definition");
                r.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            build_info: int_gauge(
                &r,
                "keyrotd_build_info",
                "Always 1; the version label tells which keyrotd runs.",
                &["version"],
            ),
            notifications: counter(
                &r,
                "keyrotd_notifications_total",
                "Notifications to [notify.*] targets by outcome after retries (ok, failed).",
                &["target", "outcome"],
            ),
            table: RwLock::new(Table::default()),
            known: RwLock::new(Known::default()),
            confirmers: RwLock::new(BTreeMap::new()),
            registry: r,
        };
        metrics
            .registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registered once");
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for outcome in StoreOutcome::ALL {
            metrics
                .config_reloads
                .with_label_values(&[outcome.as_str()]);
        }
        metrics.paused.set(0);
        metrics
    }

    /// The underlying registry, for a caller that wants to add its own collectors. The per-key
    /// families are not in it: see [`keyed`].
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every metric in the Prometheus text format ([`CONTENT_TYPE`]), as one string. A scrape uses
    /// [`Metrics::encode_chunks`] instead, which never holds the whole text.
    pub fn encode(&self) -> String {
        self.encode_chunks().collect()
    }

    /// Every metric in the Prometheus text format, in pieces of at most a few hundred keys' series:
    /// see [`Metrics::next_chunk`].
    pub fn encode_chunks(&self) -> impl Iterator<Item = String> + '_ {
        let mut cursor = Scrape::default();
        std::iter::from_fn(move || self.next_chunk(&mut cursor))
    }

    /// The next piece of a scrape, `None` when it is complete: the registry's families first, then the
    /// per-key ones, a few hundred keys at a time. Each piece is written under the table's read lock,
    /// released before the next, so a long scrape never holds up a rotation and never holds the whole
    /// text; a config reload between two pieces shows the later pieces with the new config.
    pub fn next_chunk(&self, cursor: &mut Scrape) -> Option<String> {
        if !cursor.registry_done {
            cursor.registry_done = true;
            let mut buf = Vec::new();
            return Some(
                match TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
                    Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
                    // Only reachable for a malformed metric family, which the definitions above exclude;
                    // a comment line is still a valid exposition.
                    Err(error) => format!("# keyrotd: encoding metrics failed: {error}\n"),
                },
            );
        }
        let family = *keyed::Family::ALL.get(cursor.family)?;
        let mut out = String::new();
        let mut header = !cursor.header_written;
        let table = self.table();
        match table.render(
            family,
            cursor.after.as_deref(),
            KEYS_PER_CHUNK,
            &mut header,
            &mut out,
        ) {
            Some(last) => {
                cursor.after = Some(last);
                cursor.header_written = !header;
            }
            None => {
                cursor.after = None;
                cursor.header_written = false;
                cursor.family += 1;
            }
        }
        Some(out)
    }

    fn known(&self) -> RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn table(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the series match `config`, as of now: see [`Metrics::apply_config_at`].
    pub fn apply_config(&self, config: &Config) {
        self.apply_config_at(config, Utc::now());
    }

    /// Makes the series match `config`: creates at 0 every label combination the config makes
    /// possible, removes every series of a key, store, dependent or provider the config no longer has,
    /// and sets the per-key configuration gauges. Call it at start and after every successful reload.
    /// Counters and gauges of names that stay keep their values.
    ///
    /// Created per key: `rotations_total` × every [`Outcome`]; both histograms; `store_writes_total` ×
    /// every store the key has a destination on × ok/error; `reload_hooks_total` × every dependent with
    /// a reload hook × ok/error; `post_rotation_checks_total` × every [`CheckResult`],
    /// `post_rotation_auth_failures_total` and `post_rotation_auth_failing` (0) for every dependent with
    /// a `verify`; `rerotations_total` × every [`RerotationReason`]; `drift` (0);
    /// `key_max_age_seconds` when the key has a `max_age`; `key_schedule_period_seconds` and (until the
    /// engine sets the jittered one) `key_next_rotation_timestamp_seconds` when its schedule yields runs.
    /// Per provider: `provider_requests_total` × every [`ProviderOperation`] × [`ProviderOutcome`].
    pub fn apply_config_at(&self, config: &Config, now: DateTime<Utc>) {
        self.apply_config_with(config, now, crate::schedule::next_runs);
    }

    /// [`Metrics::apply_config_at`] with the schedule injected (tests use a fixed one).
    fn apply_config_with(
        &self,
        config: &Config,
        now: DateTime<Utc>,
        next_runs: impl Fn(&KeyConfig, DateTime<Utc>, usize) -> Vec<DateTime<Utc>>,
    ) {
        // Hold the write lock while the new table replaces the old, so that no recording call lands in
        // the old one after its values were copied.
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        let mut keys = BTreeMap::new();
        let mut names = keyed::Names::default();
        for key in &config.keys {
            let shape = keyed::Shape {
                stores: key.destinations.iter().map(|d| d.store.clone()).collect(),
                hooked: names_of(key, |d| d.reload.is_some()),
                verified: names_of(key, |d| d.verify.is_some()),
                coordinated: config.coordination.is_some(),
                owner: key.owner_name().unwrap_or_default().to_string(),
                dual: key.rollout.overlap == crate::config::Overlap::Dual,
                revoke_after: key.rollout.revoke_after.map(|a| a.as_secs_f64()),
            };
            let series = KeySeries::new(&shape, &mut names, table.keys.get(key.name.as_str()));
            series.set(Gauge::MaxAge, key.max_age.map(|m| m.as_secs_f64()));
            let runs = if key.schedule.is_some() {
                next_runs(key, now, PERIOD_RUNS)
            } else {
                Vec::new()
            };
            series.set(
                Gauge::SchedulePeriod,
                schedule_period(&runs).map(|p| p.as_secs_f64()),
            );
            if key.is_manual_only() {
                series.set(Gauge::NextRotation, None);
            } else if series.gauge(Gauge::NextRotation).is_none()
                && let Some(first) = runs.first()
            {
                series.set(Gauge::NextRotation, Some(unix_seconds(*first)));
            }
            keys.insert(Box::from(key.name.as_str()), series);
        }
        let providers = config
            .providers
            .keys()
            .map(|p| {
                let old = table.providers.get(p.as_str()).map(|c| &**c);
                (Box::from(p.as_str()), Table::provider_cells(old))
            })
            .collect();
        *table = Table { keys, providers };

        drop(table);
        self.apply_confirmers(config);

        let known = Known {
            stores: config.stores.keys().cloned().collect(),
            notify_targets: config.notify.keys().cloned().collect(),
        };
        let store_known =
            |l: &HashMap<&str, &str>| l.get("store").is_some_and(|s| known.stores.contains(*s));
        prune(&self.store_credential_expiry, store_known);
        prune(&self.store_credential_renewal_failing, store_known);
        prune(&self.notifications, |l| {
            l.get("target")
                .is_some_and(|t| known.notify_targets.contains(*t))
        });
        for target in &known.notify_targets {
            for outcome in NotifyOutcome::ALL {
                self.notifications
                    .with_label_values(&[target, outcome.as_str()]);
            }
        }
        *self.known.write().unwrap_or_else(PoisonError::into_inner) = known;
    }

    /// The dual keys' dependents that confirm: created at 0, and the series of any other removed.
    fn apply_confirmers(&self, config: &Config) {
        let confirmers: BTreeMap<String, BTreeSet<String>> = config
            .keys
            .iter()
            .filter(|k| k.rollout.overlap == crate::config::Overlap::Dual)
            .map(|k| {
                let deps = names_of(k, |d| d.verify.is_some() || d.confirm.is_some());
                (k.name.clone(), deps)
            })
            .collect();
        let mut known = self
            .confirmers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        prune(&self.dependent_unconfirmed, |l| {
            match (
                l.get("key").and_then(|k| confirmers.get(*k)),
                l.get("dependent"),
            ) {
                (Some(deps), Some(d)) => deps.contains(*d),
                _ => false,
            }
        });
        for (key, deps) in &confirmers {
            for d in deps {
                self.dependent_unconfirmed.with_label_values(&[key, d]);
            }
        }
        *known = confirmers;
    }

    /// Runs `f` on `key`'s series under the read lock when the current config has `key`; ignores the
    /// call otherwise.
    fn with_key(&self, key: &str, f: impl FnOnce(&KeySeries)) {
        if let Some(series) = self.table().keys.get(key) {
            f(series);
        }
    }

    /// A rotation of `key` started (preflight begins): `keyrotd_rotation_last_attempt_timestamp_seconds`.
    pub fn rotation_started(&self, key: &str, at: DateTime<Utc>) {
        self.with_key(key, |s| s.set(Gauge::LastAttempt, Some(unix_seconds(at))));
    }

    /// A rotation of `key` finished with `outcome` after `duration` (preflight start to notify end),
    /// at `finished_at`: counts it, observes the duration (not for `skipped`: it waited for an
    /// approval that never came, which says nothing about how long rotating takes), and for
    /// success/degraded sets `keyrotd_rotation_last_success_timestamp_seconds`.
    pub fn rotation_finished(
        &self,
        key: &str,
        outcome: Outcome,
        duration: Duration,
        finished_at: DateTime<Utc>,
    ) {
        self.with_key(key, |s| {
            // A skipped rotation waited for an approval that never came, which says nothing about how
            // long rotating takes.
            let ran = (outcome != Outcome::Skipped).then_some(duration.as_secs_f64());
            s.rotation(outcome, ran);
            if matches!(outcome, Outcome::Success | Outcome::Degraded) {
                s.set(Gauge::LastSuccess, Some(unix_seconds(finished_at)));
            }
        });
    }

    /// Sets `keyrotd_rotation_last_success_timestamp_seconds` without counting a rotation: for the
    /// engine to seed it at start from what the journal or audit log remembers.
    pub fn last_success(&self, key: &str, at: DateTime<Utc>) {
        self.with_key(key, |s| s.set(Gauge::LastSuccess, Some(unix_seconds(at))));
    }

    /// The invalidation window of a rotation of `key`: regenerate response to the last destination
    /// written and the last hook answered.
    pub fn invalidation_window(&self, key: &str, window: Duration) {
        self.with_key(key, |s| s.window(window.as_secs_f64()));
    }

    /// One write of `key` to a destination on `store` (each attempt counts).
    pub fn store_write(&self, key: &str, store: &str, ok: bool) {
        self.with_key(key, |s| s.store_write(store, StoreOutcome::of(ok)));
    }

    /// One call of `dependent`'s reload hook for `key` (each attempt counts).
    pub fn reload_hook(&self, key: &str, dependent: &str, ok: bool) {
        self.with_key(key, |s| s.reload_hook(dependent, StoreOutcome::of(ok)));
    }

    /// One post-rotation `verify` probe of `dependent`: counts it; an [`CheckResult::AuthFailure`]
    /// also counts in `keyrotd_post_rotation_auth_failures_total` and sets
    /// `keyrotd_post_rotation_auth_failing` to 1, an [`CheckResult::Ok`] sets it to 0, and an
    /// [`CheckResult::Error`] leaves it as it was (a timeout says nothing about the dependent's key).
    pub fn post_rotation_check(&self, key: &str, dependent: &str, result: CheckResult) {
        self.with_key(key, |s| s.check(dependent, result));
    }

    /// A re-rotation of `key` started for `reason`.
    pub fn rerotation(&self, key: &str, reason: RerotationReason) {
        self.with_key(key, |s| s.rerotation(reason));
    }

    /// What the provider said about `key`: Active or not, and its Last Rotated when it reports one.
    pub fn key_status(&self, key: &str, active: bool, last_rotated: Option<DateTime<Utc>>) {
        self.with_key(key, |s| {
            s.set(Gauge::Active, Some(f64::from(u8::from(active))));
            if let Some(at) = last_rotated {
                s.set(Gauge::LastRotation, Some(unix_seconds(at)));
            }
        });
    }

    /// The next scheduled rotation of `key` (window and jitter applied); `None` removes the series
    /// (nothing scheduled).
    pub fn next_rotation(&self, key: &str, at: Option<DateTime<Utc>>) {
        self.with_key(key, |s| s.set(Gauge::NextRotation, at.map(unix_seconds)));
    }

    /// The period `key` is rotated at (`keyrotd_key_schedule_period_seconds`); `None` removes it.
    /// [`Metrics::apply_config`] sets it from the schedule; the engine may refine it.
    pub fn schedule_period(&self, key: &str, period: Option<Duration>) {
        self.with_key(key, |s| {
            s.set(Gauge::SchedulePeriod, period.map(|p| p.as_secs_f64()))
        });
    }

    /// Whether `key` drifts: no destination holds the provider's active key, or destinations disagree.
    pub fn drift(&self, key: &str, drifting: bool) {
        self.with_key(key, |s| {
            s.set(Gauge::Drift, Some(f64::from(u8::from(drifting))))
        });
    }

    /// One call to `provider` (a `[providers.*]` name).
    pub fn provider_request(
        &self,
        provider: &str,
        operation: ProviderOperation,
        outcome: ProviderOutcome,
    ) {
        self.table().provider_request(provider, operation, outcome);
    }

    /// What `store` (a `[stores.*]` name) knows of its credential's lifetime
    /// ([`crate::store::Store::credential_status`]); `None` removes its series (a store whose
    /// credential does not expire, or one that has not looked yet).
    pub fn store_credential(&self, store: &str, status: Option<&CredentialStatus>) {
        if !self.known().stores.contains(store) {
            return;
        }
        match status {
            Some(s) => {
                let lapses = s.lapses_at().map_or(f64::INFINITY, unix_seconds);
                self.store_credential_expiry
                    .with_label_values(&[store])
                    .set(lapses);
                self.store_credential_renewal_failing
                    .with_label_values(&[store])
                    .set(i64::from(s.renew_failed));
            }
            None => {
                let _ = self.store_credential_expiry.remove_label_values(&[store]);
                let _ = self
                    .store_credential_renewal_failing
                    .remove_label_values(&[store]);
            }
        }
    }

    /// One SIGHUP reload, applied (`ok`) or refused.
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[StoreOutcome::of(ok).as_str()])
            .inc();
    }

    /// A journal write failed.
    pub fn journal_write_failure(&self) {
        self.journal_write_failures.inc();
    }

    /// Whether `key` is blocked because its journal was unreadable.
    pub fn journal_blocked(&self, key: &str, blocked: bool) {
        self.with_key(key, |s| {
            s.set(Gauge::JournalBlocked, Some(f64::from(u8::from(blocked))))
        });
    }

    /// Whether this replica holds `key`'s lease (ignored without `[coordination]`).
    pub fn lease_held(&self, key: &str, held: bool) {
        self.with_key(key, |s| {
            if s.gauge(Gauge::LeaseHeld).is_some() {
                s.set(Gauge::LeaseHeld, Some(f64::from(u8::from(held))));
            }
        });
    }

    /// This replica took `key` over from another.
    pub fn lease_takeover(&self, key: &str) {
        self.with_key(key, KeySeries::lease_takeover);
    }

    /// A membership renewal failed.
    pub fn lease_renew_failure(&self) {
        self.lease_renew_failures.inc();
    }

    /// Whether a due rotation of `key` waits for an operator's approval.
    pub fn rotation_pending(&self, key: &str, pending: bool) {
        self.with_key(key, |s| {
            s.set(Gauge::Pending, Some(f64::from(u8::from(pending))))
        });
    }

    /// A notification to `target` (a `[notify.*]` name) ended with `outcome`.
    pub fn notification(&self, target: &str, outcome: NotifyOutcome) {
        if self.known().notify_targets.contains(target) {
            self.notifications
                .with_label_values(&[target, outcome.as_str()])
                .inc();
        }
    }

    /// A dual key's old key was revoked `overlap` after its successor was created.
    pub fn key_overlap(&self, key: &str, overlap: Duration) {
        self.set_dual(key, Gauge::Overlap, overlap.as_secs_f64());
    }

    /// How many of a dual key's dependents confirmed its newest key.
    pub fn dependents_confirmed(&self, key: &str, confirmed: usize) {
        self.set_dual(key, Gauge::DependentsConfirmed, confirmed as f64);
    }

    /// Since when a dual key's old key has been kept live after its rotation ended; `None` = none.
    pub fn old_key_live_since(&self, key: &str, since: Option<DateTime<Utc>>) {
        self.set_dual(key, Gauge::OldKeyLiveSince, since.map_or(0.0, unix_seconds));
    }

    /// Sets a dual key's gauge (ignored for another key: the gauge has no series there).
    fn set_dual(&self, key: &str, g: Gauge, value: f64) {
        self.with_key(key, |s| {
            if s.gauge(g).is_some() {
                s.set(g, Some(value));
            }
        });
    }

    /// Whether `dependent` has not confirmed a dual key's newest key (its old key kept live for it).
    pub fn dependent_unconfirmed(&self, key: &str, dependent: &str, unconfirmed: bool) {
        let known = self
            .confirmers
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if known.get(key).is_some_and(|d| d.contains(dependent)) {
            self.dependent_unconfirmed
                .with_label_values(&[key, dependent])
                .set(i64::from(unconfirmed));
        }
    }

    /// `n` reload requests were served by one reload of a target another key asked for too.
    pub fn reloads_coalesced(&self, n: u64) {
        self.reloads_coalesced.inc_by(n);
    }

    /// Whether scheduled rotations are paused.
    pub fn paused(&self, paused: bool) {
        self.paused.set(i64::from(paused));
    }
}

/// The names of `key`'s dependents that `pick` selects.
fn names_of(
    key: &KeyConfig,
    pick: impl Fn(&crate::config::DependentConfig) -> bool,
) -> BTreeSet<String> {
    key.dependents
        .iter()
        .filter(|d| pick(d))
        .map(|d| d.name.clone())
        .collect()
}

impl StoreOutcome {
    fn of(ok: bool) -> StoreOutcome {
        if ok {
            StoreOutcome::Ok
        } else {
            StoreOutcome::Error
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        AosPaths, AosProviderConfig, DaemonConfig, DependentConfig, DestinationConfig,
        DestinationTarget, FileStoreConfig, LogFormat, ProviderConfig, ReloadHook, StoreConfig,
        VerifyConfig,
    };
    use crate::schedule::Schedule;
    use chrono::TimeZone;

    fn dependent(name: &str, verify: bool, reload: bool) -> DependentConfig {
        DependentConfig {
            name: name.into(),
            reads_from: vec![],
            verify: verify.then(|| VerifyConfig {
                url: "http://127.0.0.1:1/health".parse().unwrap(),
                expect_status: 200,
                timeout: Duration::from_secs(5),
                tls: Default::default(),
            }),
            reload: reload.then(|| ReloadHook::Command {
                command: vec!["/bin/true".into()],
                timeout: Duration::from_secs(30),
                env: BTreeMap::new(),
                retries: 2,
            }),
            canary: false,
            confirm: None,
        }
    }

    fn key(name: &str, stores: &[&str], dependents: Vec<DependentConfig>) -> KeyConfig {
        KeyConfig {
            name: name.into(),
            provider: "aos".into(),
            schedule: Some(Schedule::parse("@daily").expect("valid schedule")),
            timezone: chrono_tz::UTC,
            max_age: Some(Duration::from_secs(90 * 86400)),
            jitter: Duration::ZERO,
            window: None,
            catch_up: false,
            watch: Duration::from_secs(600),
            watch_interval: Duration::from_secs(30),
            store_deadline: Duration::from_secs(60),
            auto_recover: true,
            max_rerotations: 3,
            max_regenerations_per_day: 6,
            owner: None,
            approval: None,
            notify: Vec::new(),
            on_first_contact: Default::default(),
            rollout: Default::default(),
            destinations: stores
                .iter()
                .map(|s| DestinationConfig {
                    store: (*s).into(),
                    target: DestinationTarget::File {
                        file: format!("{name}.key"),
                    },
                })
                .collect(),
            dependents,
        }
    }

    fn config(keys: Vec<KeyConfig>) -> Config {
        let mut providers = BTreeMap::new();
        providers.insert(
            "aos".to_string(),
            ProviderConfig::Aos(AosProviderConfig {
                base_url: "http://127.0.0.1:1/".parse().unwrap(),
                management_token: "management-token-not-exported".to_string().into(),
                account_id: None,
                timeout: Duration::from_secs(10),
                requested_by: "keyrotd@test".into(),
                paths: AosPaths::default(),
                tls: Default::default(),
                max_retry_after: crate::backoff::DEFAULT_MAX_RETRY_AFTER,
            }),
        );
        let mut stores = BTreeMap::new();
        for name in ["files", "backup"] {
            stores.insert(
                name.to_string(),
                StoreConfig::File(FileStoreConfig { dir: "/tmp".into() }),
            );
        }
        Config {
            daemon: DaemonConfig {
                state_dir: "/tmp/state".into(),
                listen: "127.0.0.1:9464".parse().unwrap(),
                admin_token: None,
                max_concurrent_rotations: 16,
                reconcile_interval: None,
                log_format: LogFormat::Text,
                paused: false,
            },
            providers,
            stores,
            keys,
            coordination: None,
            limits: Default::default(),
            notify: BTreeMap::new(),
            warnings: vec![],
        }
    }

    /// Two keys: `billing` (files + backup, a dependent with hook and verify, one with hook only) and
    /// `search` (files, one verified dependent without a hook).
    fn two_keys() -> Config {
        config(vec![
            key(
                "billing",
                &["files", "backup"],
                vec![
                    dependent("api", true, true),
                    dependent("worker", false, true),
                ],
            ),
            key(
                "search",
                &["files"],
                vec![dependent("indexer", true, false)],
            ),
        ])
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 7, 12, 0, 0).unwrap()
    }

    /// A schedule stand-in: daily at 03:00 on weekdays only.
    fn weekday_runs(_: &KeyConfig, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        use chrono::{Datelike, Weekday};
        let mut runs = Vec::new();
        let mut day = after.date_naive();
        while runs.len() < count {
            day = day.succ_opt().unwrap();
            if !matches!(day.weekday(), Weekday::Sat | Weekday::Sun) {
                runs.push(day.and_hms_opt(3, 0, 0).unwrap().and_utc());
            }
        }
        runs
    }

    /// The value of the series of `name` whose labels are exactly `labels`, from the text output.
    /// Labels may be given in any order: the text format sorts them by name.
    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut labels = labels.to_vec();
        labels.sort();
        let wanted: String = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect::<Vec<_>>()
            .join(",");
        let prefix = if labels.is_empty() {
            format!("{name} ")
        } else {
            format!("{name}{{{wanted}}} ")
        };
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    fn series_with(text: &str, needle: &str) -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn every_spec_metric_is_exported_with_its_labels_after_apply_config() {
        let m = Metrics::new();
        m.apply_config_with(&two_keys(), t0(), weekday_runs);
        let text = m.encode();
        // Each metric of docs/metrics.md with one series it must have from start, labels in its order.
        let expected: &[(&str, &[(&str, &str)])] = &[
            (
                "keyrotd_rotations_total",
                &[("key", "billing"), ("outcome", Outcome::Failed.as_str())],
            ),
            (
                "keyrotd_rotation_duration_seconds_count",
                &[("key", "billing")],
            ),
            (
                "keyrotd_invalidation_window_seconds_count",
                &[("key", "search")],
            ),
            (
                "keyrotd_store_writes_total",
                &[
                    ("key", "billing"),
                    ("store", "backup"),
                    ("outcome", "error"),
                ],
            ),
            (
                "keyrotd_reload_hooks_total",
                &[
                    ("dependent", "worker"),
                    ("key", "billing"),
                    ("outcome", "error"),
                ],
            ),
            (
                "keyrotd_post_rotation_checks_total",
                &[
                    ("dependent", "indexer"),
                    ("key", "search"),
                    ("result", "auth_failure"),
                ],
            ),
            (
                "keyrotd_post_rotation_auth_failures_total",
                &[("dependent", "api"), ("key", "billing")],
            ),
            (
                "keyrotd_post_rotation_auth_failing",
                &[("dependent", "api"), ("key", "billing")],
            ),
            (
                "keyrotd_rerotations_total",
                &[("key", "search"), ("reason", "lost_before_storage")],
            ),
            ("keyrotd_drift", &[("key", "billing")]),
            (
                "keyrotd_provider_requests_total",
                &[
                    ("operation", "regenerate"),
                    ("outcome", "ambiguous"),
                    ("provider", "aos"),
                ],
            ),
            ("keyrotd_config_reloads_total", &[("outcome", "error")]),
            ("keyrotd_paused", &[]),
            (
                "keyrotd_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))],
            ),
        ];
        for (name, labels) in expected {
            assert_eq!(
                value(&text, name, labels),
                Some(if *name == "keyrotd_build_info" {
                    1.0
                } else {
                    0.0
                }),
                "{name}{labels:?} missing or not at its start value in:\n{text}"
            );
        }
        // Configuration gauges.
        assert_eq!(
            value(&text, "keyrotd_key_max_age_seconds", &[("key", "billing")]),
            Some(90.0 * 86400.0)
        );
        // Monday noon: next runs Tue..Fri, then the weekend gap of 3 days is the period.
        assert_eq!(
            value(
                &text,
                "keyrotd_key_schedule_period_seconds",
                &[("key", "search")]
            ),
            Some(3.0 * 86400.0)
        );
        let tuesday = Utc.with_ymd_and_hms(2030, 1, 8, 3, 0, 0).unwrap();
        assert_eq!(
            value(
                &text,
                "keyrotd_key_next_rotation_timestamp_seconds",
                &[("key", "search")]
            ),
            Some(tuesday.timestamp() as f64)
        );
        // HELP for every keyrotd metric, and the process metrics.
        for family in m.registry.gather() {
            assert!(
                text.contains(&format!("# HELP {} ", family.name())),
                "no HELP for {}",
                family.name()
            );
        }
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_start_time_seconds"), "{text}");
    }

    #[test]
    fn every_key_has_a_zero_series_for_every_outcome_and_reason() {
        let m = Metrics::new();
        m.apply_config_with(&two_keys(), t0(), weekday_runs);
        let text = m.encode();
        for key in ["billing", "search"] {
            for outcome in Outcome::ALL {
                assert_eq!(
                    value(
                        &text,
                        "keyrotd_rotations_total",
                        &[("key", key), ("outcome", outcome.as_str())]
                    ),
                    Some(0.0),
                    "{key} {outcome}"
                );
            }
            for reason in RerotationReason::ALL {
                assert_eq!(
                    value(
                        &text,
                        "keyrotd_rerotations_total",
                        &[("key", key), ("reason", reason.as_str())]
                    ),
                    Some(0.0),
                    "{key} {reason}"
                );
            }
        }
        // Only the combinations the config makes possible: search has no destination on `backup`, its
        // `indexer` has no hook, billing's `worker` has no verify.
        assert!(
            series_with(&text, "key=\"search\"")
                .iter()
                .all(|l| !l.contains("store=\"backup\"")),
            "{text}"
        );
        assert_eq!(
            series_with(&text, "store=\"backup\"").len(),
            2,
            "billing's ok and error"
        );
        assert!(series_with(&text, "keyrotd_reload_hooks_total{dependent=\"indexer\"").is_empty());
        assert!(
            series_with(
                &text,
                "keyrotd_post_rotation_checks_total{dependent=\"worker\""
            )
            .is_empty()
        );
        // Unknown until asked: not exported as 0.
        assert!(series_with(&text, "keyrotd_key_active").is_empty());
        assert!(series_with(&text, "keyrotd_rotation_last_success_timestamp_seconds{").is_empty());
    }

    #[test]
    fn a_reload_without_a_key_removes_all_its_series_and_keeps_the_others_values() {
        let m = Metrics::new();
        m.apply_config_with(&two_keys(), t0(), weekday_runs);
        m.rotation_finished("search", Outcome::Success, Duration::from_secs(3), t0());
        m.rotation_finished("billing", Outcome::Degraded, Duration::from_secs(4), t0());
        m.key_status("search", true, Some(t0()));
        m.post_rotation_check("search", "indexer", CheckResult::AuthFailure);
        assert!(!series_with(&m.encode(), "key=\"search\"").is_empty());

        // billing loses its `backup` destination and its `api` dependent; search goes away.
        let smaller = config(vec![key(
            "billing",
            &["files"],
            vec![dependent("worker", false, true)],
        )]);
        m.apply_config_with(&smaller, t0(), weekday_runs);
        let text = m.encode();
        assert_eq!(series_with(&text, "key=\"search\""), Vec::<String>::new());
        assert_eq!(series_with(&text, "store=\"backup\""), Vec::<String>::new());
        assert_eq!(
            series_with(&text, "dependent=\"api\""),
            Vec::<String>::new()
        );
        assert_eq!(
            value(
                &text,
                "keyrotd_rotations_total",
                &[("key", "billing"), ("outcome", Outcome::Degraded.as_str())]
            ),
            Some(1.0),
            "a key that stays keeps its counts"
        );

        // A late event of the removed key (a rotation finishing after the reload) creates nothing.
        m.rotation_finished("search", Outcome::Failed, Duration::from_secs(1), t0());
        m.store_write("billing", "backup", false);
        m.post_rotation_check("billing", "api", CheckResult::AuthFailure);
        let text = m.encode();
        assert_eq!(series_with(&text, "key=\"search\""), Vec::<String>::new());
        assert_eq!(series_with(&text, "store=\"backup\""), Vec::<String>::new());
        assert_eq!(
            series_with(&text, "dependent=\"api\""),
            Vec::<String>::new()
        );
    }

    #[test]
    fn post_rotation_check_sets_and_clears_the_auth_failing_gauge() {
        let m = Metrics::new();
        m.apply_config_with(&two_keys(), t0(), weekday_runs);
        let labels = [("dependent", "api"), ("key", "billing")];
        let failing =
            |m: &Metrics| value(&m.encode(), "keyrotd_post_rotation_auth_failing", &labels);
        let failures = |m: &Metrics| {
            value(
                &m.encode(),
                "keyrotd_post_rotation_auth_failures_total",
                &labels,
            )
        };

        assert_eq!(failing(&m), Some(0.0));
        m.post_rotation_check("billing", "api", CheckResult::AuthFailure);
        assert_eq!((failing(&m), failures(&m)), (Some(1.0), Some(1.0)));
        m.post_rotation_check("billing", "api", CheckResult::Error);
        assert_eq!(
            failing(&m),
            Some(1.0),
            "an unanswered probe keeps the last auth state"
        );
        m.post_rotation_check("billing", "api", CheckResult::AuthFailure);
        assert_eq!((failing(&m), failures(&m)), (Some(1.0), Some(2.0)));
        m.post_rotation_check("billing", "api", CheckResult::Ok);
        assert_eq!((failing(&m), failures(&m)), (Some(0.0), Some(2.0)));
        let text = m.encode();
        for (result, count) in [("ok", 1.0), ("auth_failure", 2.0), ("error", 1.0)] {
            assert_eq!(
                value(
                    &text,
                    "keyrotd_post_rotation_checks_total",
                    &[("dependent", "api"), ("key", "billing"), ("result", result)]
                ),
                Some(count),
                "{result}"
            );
        }
        assert_eq!(
            value(
                &text,
                "keyrotd_post_rotation_auth_failing",
                &[("dependent", "indexer"), ("key", "search")]
            ),
            Some(0.0),
            "another dependent is untouched"
        );
    }

    #[test]
    fn recording_calls_land_in_their_series() {
        let m = Metrics::new();
        m.apply_config_with(&two_keys(), t0(), weekday_runs);
        m.rotation_started("billing", t0());
        m.rotation_finished(
            "billing",
            Outcome::Aborted,
            Duration::from_millis(1500),
            t0(),
        );
        assert!(
            series_with(
                &m.encode(),
                "keyrotd_rotation_last_success_timestamp_seconds{"
            )
            .is_empty(),
            "an aborted rotation is no success"
        );
        let end = t0() + chrono::Duration::milliseconds(2500);
        m.rotation_finished("billing", Outcome::Success, Duration::from_secs(2), end);
        m.invalidation_window("billing", Duration::from_millis(30));
        m.store_write("billing", "backup", false);
        m.store_write("billing", "backup", true);
        m.reload_hook("billing", "worker", false);
        m.rerotation("billing", RerotationReason::CrashRecovery);
        m.key_status("billing", false, None);
        m.drift("billing", true);
        m.provider_request(
            "aos",
            ProviderOperation::Regenerate,
            ProviderOutcome::Ambiguous,
        );
        m.provider_request("elsewhere", ProviderOperation::Status, ProviderOutcome::Ok);
        m.config_reload(false);
        m.paused(true);
        m.next_rotation("search", None);

        let text = m.encode();
        let b = ("key", "billing");
        assert_eq!(
            value(
                &text,
                "keyrotd_rotation_last_attempt_timestamp_seconds",
                &[b]
            ),
            Some(t0().timestamp() as f64)
        );
        assert_eq!(
            value(
                &text,
                "keyrotd_rotation_last_success_timestamp_seconds",
                &[b]
            ),
            Some(t0().timestamp() as f64 + 2.5)
        );
        assert_eq!(
            value(&text, "keyrotd_rotation_duration_seconds_count", &[b]),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "keyrotd_rotation_duration_seconds_sum", &[b]),
            Some(3.5)
        );
        assert_eq!(
            value(
                &text,
                "keyrotd_invalidation_window_seconds_bucket",
                &[b, ("le", "0.025")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &text,
                "keyrotd_invalidation_window_seconds_bucket",
                &[b, ("le", "0.05")]
            ),
            Some(1.0)
        );
        for outcome in ["ok", "error"] {
            assert_eq!(
                value(
                    &text,
                    "keyrotd_store_writes_total",
                    &[b, ("store", "backup"), ("outcome", outcome)]
                ),
                Some(1.0)
            );
        }
        assert_eq!(
            value(
                &text,
                "keyrotd_reload_hooks_total",
                &[("dependent", "worker"), b, ("outcome", "error")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "keyrotd_rerotations_total",
                &[b, ("reason", "crash_recovery")]
            ),
            Some(1.0)
        );
        assert_eq!(value(&text, "keyrotd_key_active", &[b]), Some(0.0));
        assert_eq!(value(&text, "keyrotd_drift", &[b]), Some(1.0));
        assert_eq!(
            value(
                &text,
                "keyrotd_provider_requests_total",
                &[
                    ("operation", "regenerate"),
                    ("outcome", "ambiguous"),
                    ("provider", "aos")
                ]
            ),
            Some(1.0)
        );
        assert!(
            !text.contains("elsewhere"),
            "a provider the config lacks gets no series"
        );
        assert_eq!(
            value(
                &text,
                "keyrotd_config_reloads_total",
                &[("outcome", "error")]
            ),
            Some(1.0)
        );
        assert_eq!(value(&text, "keyrotd_paused", &[]), Some(1.0));
        assert_eq!(
            value(
                &text,
                "keyrotd_key_next_rotation_timestamp_seconds",
                &[("key", "search")]
            ),
            None
        );
    }

    #[test]
    fn reload_keeps_the_engines_next_rotation_and_drops_gauges_of_unscheduled_keys() {
        let m = Metrics::new();
        m.apply_config_with(&two_keys(), t0(), weekday_runs);
        let jittered = t0() + chrono::Duration::hours(20);
        m.next_rotation("billing", Some(jittered));
        m.apply_config_with(&two_keys(), t0(), weekday_runs);
        let text = m.encode();
        assert_eq!(
            value(
                &text,
                "keyrotd_key_next_rotation_timestamp_seconds",
                &[("key", "billing")]
            ),
            Some(jittered.timestamp() as f64)
        );

        let mut manual = key("billing", &["files"], vec![]);
        manual.schedule = None;
        manual.max_age = None;
        m.apply_config_with(&config(vec![manual]), t0(), weekday_runs);
        let text = m.encode();
        for name in [
            "keyrotd_key_next_rotation_timestamp_seconds",
            "keyrotd_key_schedule_period_seconds",
            "keyrotd_key_max_age_seconds",
        ] {
            assert_eq!(value(&text, name, &[("key", "billing")]), None, "{name}");
        }
    }

    #[test]
    fn a_store_credential_exports_when_it_lapses_and_whether_renewal_fails() {
        let m = Metrics::new();
        m.apply_config_with(&two_keys(), t0(), weekday_runs);
        let name = "keyrotd_store_credential_expiry_timestamp_seconds";
        let failing = "keyrotd_store_credential_renewal_failing";
        let files = [("store", "files")];
        let end = t0() + chrono::Duration::hours(10);
        // Kept valid by renewal: it never lapses on its own.
        let mut status = CredentialStatus {
            expires_at: Some(end),
            max_expires_at: None,
            renewable: true,
            renew_failed: false,
        };
        m.store_credential("files", Some(&status));
        assert_eq!(value(&m.encode(), name, &files), Some(f64::INFINITY));
        assert_eq!(value(&m.encode(), failing, &files), Some(0.0));
        // Renewal failing: it lapses at the end of its lease.
        status.renew_failed = true;
        m.store_credential("files", Some(&status));
        assert_eq!(
            value(&m.encode(), name, &files),
            Some(end.timestamp() as f64)
        );
        assert_eq!(value(&m.encode(), failing, &files), Some(1.0));
        // Not renewable: the same.
        status.renew_failed = false;
        status.renewable = false;
        m.store_credential("files", Some(&status));
        assert_eq!(
            value(&m.encode(), name, &files),
            Some(end.timestamp() as f64)
        );
        // Unknown stores are ignored; a store dropped by a reload loses its series.
        m.store_credential("nope", Some(&status));
        assert!(series_with(&m.encode(), "nope").is_empty());
        let mut fewer = two_keys();
        fewer.stores.remove("files");
        m.apply_config_with(&fewer, t0(), weekday_runs);
        assert_eq!(value(&m.encode(), name, &files), None);
    }

    #[test]
    fn a_credential_status_reads_as_one_line() {
        let now = t0();
        let mut s = CredentialStatus {
            expires_at: Some(now + chrono::Duration::minutes(300)),
            max_expires_at: None,
            renewable: true,
            renew_failed: false,
        };
        assert_eq!(
            s.summary(now),
            "credential expires in 5h 0m (renewed by keyrotd)"
        );
        s.renew_failed = true;
        assert_eq!(
            s.summary(now),
            "credential expires in 5h 0m (renewal failing)"
        );
        s.expires_at = None;
        assert_eq!(s.summary(now), "credential does not expire");
    }

    #[test]
    fn a_scrape_in_pieces_writes_each_family_once_and_every_key_in_it() {
        let keys: Vec<KeyConfig> = (0..(KEYS_PER_CHUNK * 2 + 7))
            .map(|i| key(&format!("k{i:04}"), &["files"], Vec::new()))
            .collect();
        let n = keys.len();
        let m = Metrics::new();
        m.apply_config_with(&config(keys), t0(), weekday_runs);
        m.rotation_finished("k0300", Outcome::Failed, Duration::from_secs(2), t0());
        let chunks: Vec<String> = m.encode_chunks().collect();
        assert!(chunks.len() > 3, "{} pieces", chunks.len());
        let text = chunks.concat();
        // Each family's lines are together, under one HELP and one TYPE line.
        let mut seen = BTreeSet::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(name.clone()), "{name} written twice");
                current = name;
            } else if !line.starts_with('#') {
                assert!(
                    line.starts_with(&current),
                    "{line} outside its family {current}"
                );
            }
        }
        let rotations = series_with(&text, "keyrotd_rotations_total{");
        assert_eq!(rotations.len(), n * Outcome::ALL.len());
        let lines: BTreeSet<&String> = rotations.iter().collect();
        assert_eq!(lines.len(), rotations.len(), "a series written twice");
        assert_eq!(
            value(
                &text,
                "keyrotd_rotations_total",
                &[("key", "k0300"), ("outcome", "failed")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "keyrotd_rotation_duration_seconds_bucket",
                &[("key", "k0300"), ("le", "2.5")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "keyrotd_rotation_duration_seconds_bucket",
                &[("key", "k0300"), ("le", "1")]
            ),
            Some(0.0)
        );
        // A family without series (no key is coordinated) writes nothing, not even its HELP line.
        assert!(!text.contains("keyrotd_lease_held"));
    }

    #[test]
    fn a_reload_that_changes_a_keys_stores_and_dependents_keeps_the_values_of_those_that_stay() {
        let m = Metrics::new();
        let before = key(
            "billing",
            &["a", "b"],
            vec![dependent("api", true, true), dependent("old", true, true)],
        );
        m.apply_config_with(&config(vec![before]), t0(), weekday_runs);
        m.store_write("billing", "b", false);
        m.store_write("billing", "a", true);
        m.post_rotation_check("billing", "api", CheckResult::AuthFailure);
        m.reload_hook("billing", "api", true);
        m.rotation_finished("billing", Outcome::Success, Duration::from_millis(70), t0());

        let after = key(
            "billing",
            &["b", "c"],
            vec![dependent("new", true, true), dependent("api", true, true)],
        );
        m.apply_config_with(&config(vec![after]), t0(), weekday_runs);
        let text = m.encode();
        let v = |name: &str, labels: &[(&str, &str)]| value(&text, name, labels);
        let k = ("key", "billing");
        let writes = "keyrotd_store_writes_total";
        assert_eq!(
            v(writes, &[k, ("store", "b"), ("outcome", "error")]),
            Some(1.0)
        );
        assert_eq!(
            v(writes, &[k, ("store", "c"), ("outcome", "error")]),
            Some(0.0)
        );
        assert_eq!(v(writes, &[k, ("store", "a"), ("outcome", "ok")]), None);
        let failing = "keyrotd_post_rotation_auth_failing";
        assert_eq!(v(failing, &[k, ("dependent", "api")]), Some(1.0));
        assert_eq!(v(failing, &[k, ("dependent", "new")]), Some(0.0));
        assert_eq!(v(failing, &[k, ("dependent", "old")]), None);
        let hooks = "keyrotd_reload_hooks_total";
        assert_eq!(
            v(hooks, &[k, ("dependent", "api"), ("outcome", "ok")]),
            Some(1.0)
        );
        let duration = "keyrotd_rotation_duration_seconds_bucket";
        assert_eq!(v(duration, &[k, ("le", "0.1")]), Some(1.0));
        assert_eq!(v(duration, &[k, ("le", "0.05")]), Some(0.0));
    }

    #[test]
    fn metrics_can_be_shared_between_tasks() {
        fn shared<T: Send + Sync + 'static>() {}
        shared::<Metrics>();
        shared::<std::sync::Arc<Metrics>>();
    }

    #[test]
    fn no_secret_of_the_config_reaches_the_output() {
        let m = Metrics::new();
        m.apply_config_with(&two_keys(), t0(), weekday_runs);
        assert!(!m.encode().contains("management-token-not-exported"));
    }
}
