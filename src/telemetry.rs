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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

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

/// What the current config lets exist: the names label values may take.
#[derive(Debug, Default)]
struct Known {
    keys: BTreeMap<String, KeyShape>,
    providers: BTreeSet<String>,
    /// Every `[stores.*]` name, used by a key or not.
    stores: BTreeSet<String>,
}

/// The names one key's series may carry, from its `[[keys]]` entry.
#[derive(Debug, Default)]
struct KeyShape {
    /// Stores the key has a destination on.
    stores: BTreeSet<String>,
    /// Dependents with a reload hook.
    hooked: BTreeSet<String>,
    /// Dependents with a `verify` probe.
    verified: BTreeSet<String>,
    /// Has a schedule or a max age, so it can have a next rotation.
    scheduled: bool,
    /// Its provider keeps two keys live (`overlap = "dual"`): the overlap series exist.
    dual: bool,
    /// Dual keys: dependents that confirm the new key (with a `verify` or a `confirm`).
    confirmers: BTreeSet<String>,
    /// Dual keys: `revoke_after`.
    revoke_after: Option<Duration>,
}

/// The registry and every keyrotd metric. Share it behind an `Arc`; every method takes `&self`.
pub struct Metrics {
    registry: Registry,
    known: RwLock<Known>,

    rotations: IntCounterVec,
    rotation_duration: HistogramVec,
    invalidation_window: HistogramVec,
    store_writes: IntCounterVec,
    reload_hooks: IntCounterVec,
    checks: IntCounterVec,
    auth_failures: IntCounterVec,
    auth_failing: IntGaugeVec,
    rerotations: IntCounterVec,
    last_success: GaugeVec,
    last_attempt: GaugeVec,
    key_active: IntGaugeVec,
    key_last_rotation: GaugeVec,
    key_next_rotation: GaugeVec,
    key_max_age: GaugeVec,
    key_schedule_period: GaugeVec,
    drift: IntGaugeVec,
    provider_requests: IntCounterVec,
    store_credential_expiry: GaugeVec,
    store_credential_renewal_failing: IntGaugeVec,
    config_reloads: IntCounterVec,
    journal_write_failures: prometheus::IntCounter,
    journal_blocked: IntGaugeVec,
    lease_held: IntGaugeVec,
    lease_takeovers: IntCounterVec,
    lease_renew_failures: prometheus::IntCounter,
    key_overlap: GaugeVec,
    dependents_confirmed: IntGaugeVec,
    dependent_unconfirmed: IntGaugeVec,
    old_key_live_since: GaugeVec,
    revoke_after: GaugeVec,
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

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    let vec = HistogramVec::new(opts, labels).expect("valid histogram definition");
    registry
        .register(Box::new(vec.clone()))
        .expect("metric registered once");
    vec
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

/// Keys present in `vec`'s series.
fn keys_present<T: MetricVecBuilder>(vec: &MetricVec<T>) -> BTreeSet<String> {
    vec.collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .flat_map(|metric| metric.get_label())
        .filter(|pair| pair.name() == "key")
        .map(|pair| pair.value().to_string())
        .collect()
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

impl Metrics {
    /// A registry holding every metric, the process metrics and `keyrotd_build_info`, with no per-key
    /// series yet: call [`Metrics::apply_config`] before recording anything.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let k = &["key"];
        let metrics = Metrics {
            rotations: counter(
                &r,
                "keyrotd_rotations_total",
                "Finished rotations by outcome (success, degraded, aborted, failed).",
                &["key", "outcome"],
            ),
            rotation_duration: histogram(
                &r,
                "keyrotd_rotation_duration_seconds",
                "Rotation duration, from the start of preflight to the end of notify.",
                k,
                ROTATION_DURATION_BUCKETS,
            ),
            invalidation_window: histogram(
                &r,
                "keyrotd_invalidation_window_seconds",
                "Outage window: regenerate response to the last destination written and the last reload hook answered.",
                k,
                INVALIDATION_WINDOW_BUCKETS,
            ),
            store_writes: counter(
                &r,
                "keyrotd_store_writes_total",
                "Destination writes by store and outcome (ok, error).",
                &["key", "store", "outcome"],
            ),
            reload_hooks: counter(
                &r,
                "keyrotd_reload_hooks_total",
                "Reload hook calls by dependent and outcome (ok, error).",
                &["key", "dependent", "outcome"],
            ),
            checks: counter(
                &r,
                "keyrotd_post_rotation_checks_total",
                "Post-rotation watch probes of dependents by result (ok, auth_failure, error).",
                &["key", "dependent", "result"],
            ),
            auth_failures: counter(
                &r,
                "keyrotd_post_rotation_auth_failures_total",
                "Post-rotation watch probes that failed authentication (401/403).",
                &["key", "dependent"],
            ),
            auth_failing: int_gauge(
                &r,
                "keyrotd_post_rotation_auth_failing",
                "1 while the dependent's latest answered probe failed authentication, else 0.",
                &["key", "dependent"],
            ),
            rerotations: counter(
                &r,
                "keyrotd_rerotations_total",
                "Re-rotations by reason (lost_before_storage, crash_recovery, drift).",
                &["key", "reason"],
            ),
            last_success: gauge(
                &r,
                "keyrotd_rotation_last_success_timestamp_seconds",
                "End of the last rotation with outcome success or degraded, Unix seconds.",
                k,
            ),
            last_attempt: gauge(
                &r,
                "keyrotd_rotation_last_attempt_timestamp_seconds",
                "Start of the last rotation, whatever its outcome, Unix seconds.",
                k,
            ),
            key_active: int_gauge(
                &r,
                "keyrotd_key_active",
                "1 when the provider last said the key is Active, 0 when it said otherwise.",
                k,
            ),
            key_last_rotation: gauge(
                &r,
                "keyrotd_key_last_rotation_timestamp_seconds",
                "The provider's Last Rotated for the key, Unix seconds.",
                k,
            ),
            key_next_rotation: gauge(
                &r,
                "keyrotd_key_next_rotation_timestamp_seconds",
                "Next scheduled rotation of the key (window and jitter applied), Unix seconds.",
                k,
            ),
            key_max_age: gauge(
                &r,
                "keyrotd_key_max_age_seconds",
                "The key's configured max_age, in seconds (only keys with a max_age).",
                k,
            ),
            key_schedule_period: gauge(
                &r,
                "keyrotd_key_schedule_period_seconds",
                "Longest gap between the key's upcoming scheduled rotations, in seconds (only scheduled keys).",
                k,
            ),
            drift: int_gauge(
                &r,
                "keyrotd_drift",
                "1 while no destination holds the provider's active key, or destinations disagree.",
                k,
            ),
            provider_requests: counter(
                &r,
                "keyrotd_provider_requests_total",
                "Provider calls by operation (status, regenerate, auth_check) and outcome.",
                &["provider", "operation", "outcome"],
            ),
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
            journal_write_failures: {
                let c = prometheus::IntCounter::new(
                    "keyrotd_journal_write_failures_total",
                    "Journal writes that failed (state_dir full, read-only or gone); retried, and /readyz fails meanwhile.",
                )
                .expect("valid counter definition");
                r.register(Box::new(c.clone()))
                    .expect("metric registered once");
                c
            },
            journal_blocked: int_gauge(
                &r,
                "keyrotd_journal_blocked",
                "1 while the key's journal was unreadable at start: set aside, and the key blocked from automatic rotation until an operator rotates it.",
                k,
            ),
            lease_held: int_gauge(
                &r,
                "keyrotd_lease_held",
                "1 while this replica holds the key's lease (several replicas, [coordination]).",
                k,
            ),
            lease_takeovers: counter(
                &r,
                "keyrotd_lease_takeovers_total",
                "Times this replica took the key over from another replica whose lease had expired.",
                k,
            ),
            lease_renew_failures: {
                let c = prometheus::IntCounter::new(
                    "keyrotd_lease_renew_failures_total",
                    "Renewals of this replica's membership lease that failed (Vault unreachable or refusing).",
                )
                .expect("valid counter definition");
                r.register(Box::new(c.clone()))
                    .expect("metric registered once");
                c
            },
            key_overlap: gauge(
                &r,
                "keyrotd_key_overlap_seconds",
                "Dual keys: how long the old and the new key were both live in the last rotation that retired its old key (creation of the new to revoke of the old), seconds.",
                k,
            ),
            dependents_confirmed: int_gauge(
                &r,
                "keyrotd_dependents_confirmed",
                "Dual keys: dependents that confirmed the key's newest key (healthy, and reporting its fingerprint where they can).",
                k,
            ),
            dependent_unconfirmed: int_gauge(
                &r,
                "keyrotd_dependent_unconfirmed",
                "Dual keys: 1 while the dependent has not confirmed the newest key and the old key is kept live for it.",
                &["key", "dependent"],
            ),
            old_key_live_since: gauge(
                &r,
                "keyrotd_key_old_key_live_since_timestamp_seconds",
                "Dual keys: when the overlap began (the new key's creation) while a rotation has ended with the old key still live, Unix seconds; 0 when no old key is kept.",
                k,
            ),
            revoke_after: gauge(
                &r,
                "keyrotd_key_revoke_after_seconds",
                "Dual keys with revoke_after: how long after the new key's creation the old key is revoked even if a dependent never confirmed, seconds.",
                k,
            ),
            reloads_coalesced: {
                let c = prometheus::IntCounter::new(
                    "keyrotd_reloads_coalesced_total",
                    "Reload requests served by another key's reload of the same target (reload_coalesce, groups).",
                )
                .expect("valid counter definition");
                r.register(Box::new(c.clone()))
                    .expect("metric registered once");
                c
            },
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
            known: RwLock::new(Known::default()),
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

    /// The underlying registry, for a caller that wants to add its own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The whole registry in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        match TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
            // Only reachable for a malformed metric family, which the definitions above exclude; a
            // comment line is still a valid exposition, and scrapes then show `up` = 1 with no data.
            Err(error) => format!("# keyrotd: encoding metrics failed: {error}\n"),
        }
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
        let mut new_known = Known {
            providers: config.providers.keys().cloned().collect(),
            stores: config.stores.keys().cloned().collect(),
            ..Known::default()
        };
        for key in &config.keys {
            let shape = KeyShape {
                stores: key.destinations.iter().map(|d| d.store.clone()).collect(),
                hooked: key
                    .dependents
                    .iter()
                    .filter(|d| d.reload.is_some())
                    .map(|d| d.name.clone())
                    .collect(),
                verified: key
                    .dependents
                    .iter()
                    .filter(|d| d.verify.is_some())
                    .map(|d| d.name.clone())
                    .collect(),
                scheduled: !key.is_manual_only(),
                dual: key.rollout.overlap == crate::config::Overlap::Dual,
                confirmers: key
                    .dependents
                    .iter()
                    .filter(|d| d.verify.is_some() || d.confirm.is_some())
                    .map(|d| d.name.clone())
                    .collect(),
                revoke_after: key.rollout.revoke_after,
            };
            new_known.keys.insert(key.name.clone(), shape);
        }

        // Hold the write lock across pruning and creation, so that no recording call interleaves with
        // a half-applied config (and none recreates a series just pruned).
        let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
        *known = new_known;
        self.prune(&known);

        let next_present = keys_present(&self.key_next_rotation);
        for key in &config.keys {
            let name = key.name.as_str();
            // Cannot panic: `known` was built from these very keys above.
            let shape = &known.keys[name];
            for outcome in Outcome::ALL {
                self.rotations.with_label_values(&[name, outcome.as_str()]);
            }
            self.rotation_duration.with_label_values(&[name]);
            self.invalidation_window.with_label_values(&[name]);
            for store in &shape.stores {
                for outcome in StoreOutcome::ALL {
                    self.store_writes
                        .with_label_values(&[name, store, outcome.as_str()]);
                }
            }
            for dependent in &shape.hooked {
                for outcome in StoreOutcome::ALL {
                    self.reload_hooks
                        .with_label_values(&[name, dependent, outcome.as_str()]);
                }
            }
            for dependent in &shape.verified {
                for result in CheckResult::ALL {
                    self.checks
                        .with_label_values(&[name, dependent, result.as_str()]);
                }
                self.auth_failures.with_label_values(&[name, dependent]);
                // `with_label_values` keeps a current value: a reload does not clear a failing state.
                self.auth_failing.with_label_values(&[name, dependent]);
            }
            for reason in RerotationReason::ALL {
                self.rerotations.with_label_values(&[name, reason.as_str()]);
            }
            self.drift.with_label_values(&[name]);
            self.journal_blocked.with_label_values(&[name]);
            self.apply_dual_locked(name, shape);
            if config.coordination.is_some() {
                self.lease_held.with_label_values(&[name]);
                self.lease_takeovers.with_label_values(&[name]);
            }

            match key.max_age {
                Some(max_age) => self
                    .key_max_age
                    .with_label_values(&[name])
                    .set(max_age.as_secs_f64()),
                None => {
                    let _ = self.key_max_age.remove_label_values(&[name]);
                }
            }
            let runs = if key.schedule.is_some() {
                next_runs(key, now, PERIOD_RUNS)
            } else {
                Vec::new()
            };
            self.set_schedule_period_locked(name, schedule_period(&runs));
            if !next_present.contains(name)
                && let Some(first) = runs.first()
            {
                self.key_next_rotation
                    .with_label_values(&[name])
                    .set(unix_seconds(*first));
            }
        }
        for provider in &known.providers {
            for operation in ProviderOperation::ALL {
                for outcome in ProviderOutcome::ALL {
                    self.provider_requests.with_label_values(&[
                        provider,
                        operation.as_str(),
                        outcome.as_str(),
                    ]);
                }
            }
        }
    }

    /// A dual key's series: created at 0 (a reload keeps their values), `revoke_after` from config.
    fn apply_dual_locked(&self, name: &str, shape: &KeyShape) {
        if !shape.dual {
            return;
        }
        self.key_overlap.with_label_values(&[name]);
        self.dependents_confirmed.with_label_values(&[name]);
        self.old_key_live_since.with_label_values(&[name]);
        for dependent in &shape.confirmers {
            self.dependent_unconfirmed
                .with_label_values(&[name, dependent]);
        }
        match shape.revoke_after {
            Some(after) => self
                .revoke_after
                .with_label_values(&[name])
                .set(after.as_secs_f64()),
            None => {
                let _ = self.revoke_after.remove_label_values(&[name]);
            }
        }
    }

    /// Removes every series whose names `known` does not allow.
    fn prune(&self, known: &Known) {
        let key_known =
            |l: &HashMap<&str, &str>| l.get("key").is_some_and(|k| known.keys.contains_key(*k));
        let shape_has = |l: &HashMap<&str, &str>,
                         pick: fn(&KeyShape) -> &BTreeSet<String>,
                         label: &str| {
            match (l.get("key").and_then(|k| known.keys.get(*k)), l.get(label)) {
                (Some(shape), Some(value)) => pick(shape).contains(*value),
                _ => false,
            }
        };
        prune(&self.rotations, key_known);
        prune(&self.rotation_duration, key_known);
        prune(&self.invalidation_window, key_known);
        prune(&self.rerotations, key_known);
        prune(&self.last_success, key_known);
        prune(&self.last_attempt, key_known);
        prune(&self.key_active, key_known);
        prune(&self.key_last_rotation, key_known);
        prune(&self.drift, key_known);
        prune(&self.journal_blocked, key_known);
        prune(&self.lease_held, key_known);
        prune(&self.lease_takeovers, key_known);
        let dual_known = |l: &HashMap<&str, &str>| {
            l.get("key")
                .and_then(|k| known.keys.get(*k))
                .is_some_and(|shape| shape.dual)
        };
        prune(&self.key_overlap, dual_known);
        prune(&self.dependents_confirmed, dual_known);
        prune(&self.old_key_live_since, dual_known);
        prune(&self.revoke_after, dual_known);
        prune(&self.dependent_unconfirmed, |l| {
            shape_has(l, |s| &s.confirmers, "dependent") && dual_known(l)
        });
        // For known keys, apply_config sets or removes these two from the key's config.
        prune(&self.key_max_age, key_known);
        prune(&self.key_schedule_period, key_known);
        prune(&self.key_next_rotation, |l| {
            l.get("key")
                .and_then(|k| known.keys.get(*k))
                .is_some_and(|shape| shape.scheduled)
        });
        prune(&self.store_writes, |l| shape_has(l, |s| &s.stores, "store"));
        prune(&self.reload_hooks, |l| {
            shape_has(l, |s| &s.hooked, "dependent")
        });
        prune(&self.checks, |l| shape_has(l, |s| &s.verified, "dependent"));
        prune(&self.auth_failures, |l| {
            shape_has(l, |s| &s.verified, "dependent")
        });
        prune(&self.auth_failing, |l| {
            shape_has(l, |s| &s.verified, "dependent")
        });
        let store_known =
            |l: &HashMap<&str, &str>| l.get("store").is_some_and(|s| known.stores.contains(*s));
        prune(&self.store_credential_expiry, store_known);
        prune(&self.store_credential_renewal_failing, store_known);
        prune(&self.provider_requests, |l| {
            l.get("provider")
                .is_some_and(|p| known.providers.contains(*p))
        });
    }

    fn known(&self) -> RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` under the read lock when the current config has `key`; ignores the call otherwise.
    fn with_key(&self, key: &str, f: impl FnOnce(&KeyShape)) {
        let known = self.known();
        if let Some(shape) = known.keys.get(key) {
            f(shape);
        }
    }

    /// A rotation of `key` started (preflight begins): `keyrotd_rotation_last_attempt_timestamp_seconds`.
    pub fn rotation_started(&self, key: &str, at: DateTime<Utc>) {
        self.with_key(key, |_| {
            self.last_attempt
                .with_label_values(&[key])
                .set(unix_seconds(at))
        });
    }

    /// A rotation of `key` finished with `outcome` after `duration` (preflight start to notify end),
    /// at `finished_at`: counts it, observes the duration, and for success/degraded sets
    /// `keyrotd_rotation_last_success_timestamp_seconds`.
    pub fn rotation_finished(
        &self,
        key: &str,
        outcome: Outcome,
        duration: Duration,
        finished_at: DateTime<Utc>,
    ) {
        self.with_key(key, |_| {
            self.rotations
                .with_label_values(&[key, outcome.as_str()])
                .inc();
            self.rotation_duration
                .with_label_values(&[key])
                .observe(duration.as_secs_f64());
            if matches!(outcome, Outcome::Success | Outcome::Degraded) {
                self.last_success
                    .with_label_values(&[key])
                    .set(unix_seconds(finished_at));
            }
        });
    }

    /// Sets `keyrotd_rotation_last_success_timestamp_seconds` without counting a rotation: for the
    /// engine to seed it at start from what the journal or audit log remembers.
    pub fn last_success(&self, key: &str, at: DateTime<Utc>) {
        self.with_key(key, |_| {
            self.last_success
                .with_label_values(&[key])
                .set(unix_seconds(at))
        });
    }

    /// The invalidation window of a rotation of `key`: regenerate response to the last destination
    /// written and the last hook answered.
    pub fn invalidation_window(&self, key: &str, window: Duration) {
        self.with_key(key, |_| {
            self.invalidation_window
                .with_label_values(&[key])
                .observe(window.as_secs_f64())
        });
    }

    /// One write of `key` to a destination on `store` (each attempt counts).
    pub fn store_write(&self, key: &str, store: &str, ok: bool) {
        self.with_key(key, |shape| {
            if shape.stores.contains(store) {
                let outcome = if ok {
                    StoreOutcome::Ok
                } else {
                    StoreOutcome::Error
                };
                self.store_writes
                    .with_label_values(&[key, store, outcome.as_str()])
                    .inc();
            }
        });
    }

    /// One call of `dependent`'s reload hook for `key` (each attempt counts).
    pub fn reload_hook(&self, key: &str, dependent: &str, ok: bool) {
        self.with_key(key, |shape| {
            if shape.hooked.contains(dependent) {
                let outcome = if ok {
                    StoreOutcome::Ok
                } else {
                    StoreOutcome::Error
                };
                self.reload_hooks
                    .with_label_values(&[key, dependent, outcome.as_str()])
                    .inc();
            }
        });
    }

    /// One post-rotation `verify` probe of `dependent`: counts it; an [`CheckResult::AuthFailure`]
    /// also counts in `keyrotd_post_rotation_auth_failures_total` and sets
    /// `keyrotd_post_rotation_auth_failing` to 1, an [`CheckResult::Ok`] sets it to 0, and an
    /// [`CheckResult::Error`] leaves it as it was (a timeout says nothing about the dependent's key).
    pub fn post_rotation_check(&self, key: &str, dependent: &str, result: CheckResult) {
        self.with_key(key, |shape| {
            if !shape.verified.contains(dependent) {
                return;
            }
            self.checks
                .with_label_values(&[key, dependent, result.as_str()])
                .inc();
            let failing = self.auth_failing.with_label_values(&[key, dependent]);
            match result {
                CheckResult::AuthFailure => {
                    self.auth_failures
                        .with_label_values(&[key, dependent])
                        .inc();
                    failing.set(1);
                }
                CheckResult::Ok => failing.set(0),
                CheckResult::Error => {}
            }
        });
    }

    /// A re-rotation of `key` started for `reason`.
    pub fn rerotation(&self, key: &str, reason: RerotationReason) {
        self.with_key(key, |_| {
            self.rerotations
                .with_label_values(&[key, reason.as_str()])
                .inc()
        });
    }

    /// What the provider said about `key`: Active or not, and its Last Rotated when it reports one.
    pub fn key_status(&self, key: &str, active: bool, last_rotated: Option<DateTime<Utc>>) {
        self.with_key(key, |_| {
            self.key_active
                .with_label_values(&[key])
                .set(i64::from(active));
            if let Some(at) = last_rotated {
                self.key_last_rotation
                    .with_label_values(&[key])
                    .set(unix_seconds(at));
            }
        });
    }

    /// The next scheduled rotation of `key` (window and jitter applied); `None` removes the series
    /// (nothing scheduled).
    pub fn next_rotation(&self, key: &str, at: Option<DateTime<Utc>>) {
        self.with_key(key, |_| match at {
            Some(at) => self
                .key_next_rotation
                .with_label_values(&[key])
                .set(unix_seconds(at)),
            None => {
                let _ = self.key_next_rotation.remove_label_values(&[key]);
            }
        });
    }

    /// The period `key` is rotated at (`keyrotd_key_schedule_period_seconds`); `None` removes it.
    /// [`Metrics::apply_config`] sets it from the schedule; the engine may refine it.
    pub fn schedule_period(&self, key: &str, period: Option<Duration>) {
        self.with_key(key, |_| self.set_schedule_period_locked(key, period));
    }

    fn set_schedule_period_locked(&self, key: &str, period: Option<Duration>) {
        match period {
            Some(period) => self
                .key_schedule_period
                .with_label_values(&[key])
                .set(period.as_secs_f64()),
            None => {
                let _ = self.key_schedule_period.remove_label_values(&[key]);
            }
        }
    }

    /// Whether `key` drifts: no destination holds the provider's active key, or destinations disagree.
    pub fn drift(&self, key: &str, drifting: bool) {
        self.with_key(key, |_| {
            self.drift
                .with_label_values(&[key])
                .set(i64::from(drifting))
        });
    }

    /// One call to `provider` (a `[providers.*]` name).
    pub fn provider_request(
        &self,
        provider: &str,
        operation: ProviderOperation,
        outcome: ProviderOutcome,
    ) {
        let known = self.known();
        if known.providers.contains(provider) {
            self.provider_requests
                .with_label_values(&[provider, operation.as_str(), outcome.as_str()])
                .inc();
        }
    }

    /// What `store` (a `[stores.*]` name) knows of its credential's lifetime
    /// ([`crate::store::Store::credential_status`]); `None` removes its series (a store whose
    /// credential does not expire, or one that has not looked yet).
    pub fn store_credential(&self, store: &str, status: Option<&CredentialStatus>) {
        let known = self.known();
        if !known.stores.contains(store) {
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
        let outcome = if ok {
            StoreOutcome::Ok
        } else {
            StoreOutcome::Error
        };
        self.config_reloads
            .with_label_values(&[outcome.as_str()])
            .inc();
    }

    /// A journal write failed.
    pub fn journal_write_failure(&self) {
        self.journal_write_failures.inc();
    }

    /// Whether `key` is blocked because its journal was unreadable.
    pub fn journal_blocked(&self, key: &str, blocked: bool) {
        self.with_key(key, |_| {
            self.journal_blocked
                .with_label_values(&[key])
                .set(i64::from(blocked))
        });
    }

    /// Whether this replica holds `key`'s lease.
    pub fn lease_held(&self, key: &str, held: bool) {
        self.with_key(key, |_| {
            self.lease_held
                .with_label_values(&[key])
                .set(i64::from(held))
        });
    }

    /// This replica took `key` over from another.
    pub fn lease_takeover(&self, key: &str) {
        self.with_key(key, |_| {
            self.lease_takeovers.with_label_values(&[key]).inc()
        });
    }

    /// A membership renewal failed.
    pub fn lease_renew_failure(&self) {
        self.lease_renew_failures.inc();
    }

    /// A dual key's old key was revoked `overlap` after its successor was created.
    pub fn key_overlap(&self, key: &str, overlap: Duration) {
        self.with_key(key, |shape| {
            if shape.dual {
                self.key_overlap
                    .with_label_values(&[key])
                    .set(overlap.as_secs_f64());
            }
        });
    }

    /// How many of a dual key's dependents confirmed its newest key.
    pub fn dependents_confirmed(&self, key: &str, confirmed: usize) {
        self.with_key(key, |shape| {
            if shape.dual {
                self.dependents_confirmed
                    .with_label_values(&[key])
                    .set(i64::try_from(confirmed).unwrap_or(i64::MAX));
            }
        });
    }

    /// Whether `dependent` has not confirmed a dual key's newest key (its old key kept live for it).
    pub fn dependent_unconfirmed(&self, key: &str, dependent: &str, unconfirmed: bool) {
        self.with_key(key, |shape| {
            if shape.dual && shape.confirmers.contains(dependent) {
                self.dependent_unconfirmed
                    .with_label_values(&[key, dependent])
                    .set(i64::from(unconfirmed));
            }
        });
    }

    /// Since when a dual key's old key has been kept live after its rotation ended; `None` = none.
    pub fn old_key_live_since(&self, key: &str, since: Option<DateTime<Utc>>) {
        self.with_key(key, |shape| {
            if shape.dual {
                self.old_key_live_since
                    .with_label_values(&[key])
                    .set(since.map_or(0.0, unix_seconds));
            }
        });
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
