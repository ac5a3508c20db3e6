//! The rotation engine: what keyrotd exists for.
//!
//! - [`rotation`]: one rotation, phase by phase (preflight, regenerate, store, notify, verify), and the
//!   watch that follows it;
//! - [`recovery`]: what a journal left by a crash means, the owed re-rotation of a lost key, and the
//!   reconcile loop (drift detection);
//! - [`scheduler`]: one loop per key that waits for the next due time and starts a rotation.
//!
//! This module holds the shared state: the running configuration ([`Runtime`]), each key's live view
//! (phase, last provider status, what destinations hold, drift), and the last rotations' records that
//! the admin API and `keyrotd rotate` follow. Invariants: at most one rotation of a key runs at a time
//! ([`Engine::start_rotation`] refuses a second); the journal is written before each destructive step;
//! no secret is ever put into a record, an event, a log line or a metric label.

pub mod recovery;
pub mod rotation;
pub mod scheduler;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::{Config, KeyConfig};
use crate::journal::{AuditLog, AuditRecord, Journal, JournalError};
use crate::notify::Notifier;
use crate::provider::{KeyStatus, Provider};
use crate::store::Store;
use crate::telemetry::{Metrics, Outcome, RerotationReason};

/// How many finished rotations per key the engine remembers for `GET /v1/rotations/{id}`.
const RECORDS_PER_KEY: usize = 100;

/// What started a rotation (the audit log's `trigger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Schedule,
    MaxAge,
    CatchUp,
    Manual,
    Api,
    Recovery,
    Reconcile,
}

impl Trigger {
    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::MaxAge => "max_age",
            Trigger::CatchUp => "catch_up",
            Trigger::Manual => "manual",
            Trigger::Api => "api",
            Trigger::Recovery => "recovery",
            Trigger::Reconcile => "reconcile",
        }
    }

    /// Scheduled triggers wait for the window and stop while paused; the others do not.
    pub fn is_scheduled(&self) -> bool {
        matches!(self, Trigger::Schedule | Trigger::MaxAge | Trigger::CatchUp)
    }
}

/// The live phase of a key (`/v1/keys`'s `phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LivePhase {
    #[default]
    Idle,
    Preflight,
    Regenerating,
    Storing,
    Notifying,
    Verifying,
    Watching,
}

/// A request to rotate a key.
#[derive(Debug, Clone)]
pub struct RotationRequest {
    pub trigger: Trigger,
    /// The operator's text for manual/API rotations, else the trigger or re-rotation reason.
    pub reason: String,
    pub requested_by: String,
    /// Overrides window and pause, never the rest of preflight.
    pub force: bool,
    /// Preflight only.
    pub dry_run: bool,
    /// Set for a recovery rotation: the old key is already gone, so preflight checks only the
    /// provider's account and the destinations.
    pub rerotation: Option<RerotationReason>,
    /// Set when recovery resumes an interrupted rotation instead of starting one.
    pub resume: Option<rotation::Resume>,
}

impl RotationRequest {
    pub fn new(
        trigger: Trigger,
        reason: impl Into<String>,
        requested_by: impl Into<String>,
    ) -> Self {
        RotationRequest {
            trigger,
            reason: reason.into(),
            requested_by: requested_by.into(),
            force: false,
            dry_run: false,
            rerotation: None,
            resume: None,
        }
    }
}

/// One event in a rotation's record, as `GET /v1/rotations/{id}` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RecordEvent {
    pub ts: DateTime<Utc>,
    pub event: String,
    pub detail: String,
}

/// What the engine remembers of one rotation. Public information only.
#[derive(Debug, Clone, Serialize)]
pub struct RotationRecord {
    pub rotation_id: Uuid,
    pub key: String,
    pub trigger: Trigger,
    pub phase: LivePhase,
    pub outcome: Option<&'static str>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub events: Vec<RecordEvent>,
    /// Preflight findings (dry runs and aborts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub preflight: Vec<String>,
}

/// What one destination holds, as last seen.
#[derive(Debug, Clone, Serialize)]
pub struct DestinationView {
    pub store: String,
    pub target: String,
    pub key_id: Option<String>,
    pub fingerprint: Option<String>,
    pub version: Option<String>,
    pub in_sync: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A key's live state.
#[derive(Debug, Default)]
struct KeyState {
    /// A rotation is between preflight and the end of verify (a watch does not count).
    busy: bool,
    phase: LivePhase,
    watch_cancel: Option<CancellationToken>,
    status: Option<KeyStatus>,
    destinations: Vec<DestinationView>,
    drift: bool,
    next_rotation: Option<DateTime<Utc>>,
    last_outcome: Option<&'static str>,
    records: VecDeque<Arc<Mutex<RotationRecord>>>,
}

/// `GET /v1/keys`'s object for one key. Never a secret.
#[derive(Debug, Clone, Serialize)]
pub struct KeyView {
    pub name: String,
    pub provider: String,
    pub active: Option<bool>,
    pub key_id: Option<String>,
    pub first_generated: Option<DateTime<Utc>>,
    pub last_rotated: Option<DateTime<Utc>>,
    pub generated_by: Option<String>,
    pub account_id: Option<String>,
    pub next_rotation: Option<DateTime<Utc>>,
    pub last_outcome: Option<&'static str>,
    pub phase: LivePhase,
    pub destinations: Vec<DestinationView>,
    pub drift: bool,
}

/// Why a rotation could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    #[error("a rotation of {0} is already running")]
    Busy(String),
    #[error("scheduled rotations are paused (use --force / \"force\": true to override)")]
    Paused,
    #[error("{0}: outside its rotation window (use --force / \"force\": true to override)")]
    OutsideWindow(String),
    #[error("keyrotd is shutting down")]
    ShuttingDown,
}

/// The configuration in force with the clients built from it. Swapped whole on reload; a running
/// rotation keeps the one it started with.
pub struct Runtime {
    pub config: Arc<Config>,
    pub providers: HashMap<String, Arc<Provider>>,
    pub stores: HashMap<String, Arc<Store>>,
}

impl Runtime {
    pub async fn build(config: Arc<Config>) -> anyhow::Result<Runtime> {
        let mut providers = HashMap::new();
        for (name, pc) in &config.providers {
            providers.insert(name.clone(), Arc::new(Provider::build(name, pc)?));
        }
        let mut stores = HashMap::new();
        for (name, sc) in &config.stores {
            stores.insert(name.clone(), Arc::new(Store::build(name, sc).await?));
        }
        Ok(Runtime {
            config,
            providers,
            stores,
        })
    }

    pub fn provider(&self, key: &KeyConfig) -> anyhow::Result<&Arc<Provider>> {
        // Validation guarantees the name exists; a miss is a bug worth a clear error, not a panic.
        self.providers.get(&key.provider).ok_or_else(|| {
            anyhow::anyhow!("{}: provider {} is not configured", key.name, key.provider)
        })
    }

    pub fn store(&self, name: &str) -> anyhow::Result<&Arc<Store>> {
        self.stores
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("store {name} is not configured"))
    }
}

/// The engine shared by the daemon's tasks, the admin API and the CLI.
pub struct Engine {
    runtime: RwLock<Arc<Runtime>>,
    pub(crate) journal: Journal,
    audit: AuditLog,
    pub metrics: Arc<Metrics>,
    pub(crate) notifier: Notifier,
    keys: Mutex<HashMap<String, KeyState>>,
    permits: Arc<tokio::sync::Semaphore>,
    paused: AtomicBool,
    ready: AtomicBool,
    /// Cancelled on shutdown: no new rotations, schedulers stop, watches end.
    pub shutdown: CancellationToken,
    /// Every rotation and watch task, so shutdown can wait for the ones it must not abandon.
    pub tasks: TaskTracker,
    /// Wakes the schedulers when something that moves due times changes (reload, pause, a rotation).
    pub(crate) changed: tokio::sync::Notify,
}

impl Engine {
    /// Builds the engine on a validated config. The caller holds the state-dir lock.
    pub async fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Engine>> {
        let journal = Journal::open(&config.daemon.state_dir)?;
        let audit = AuditLog::open(&config.daemon.state_dir)?;
        let runtime = Runtime::build(config.clone()).await?;
        metrics.apply_config(&config);
        metrics.paused(config.daemon.paused);
        let mut keys = HashMap::new();
        for k in &config.keys {
            keys.insert(k.name.clone(), KeyState::default());
        }
        let engine = Engine {
            permits: Arc::new(tokio::sync::Semaphore::new(
                config.daemon.max_concurrent_rotations.max(1),
            )),
            paused: AtomicBool::new(config.daemon.paused),
            runtime: RwLock::new(Arc::new(runtime)),
            journal,
            audit,
            metrics,
            notifier: Notifier::new(),
            keys: Mutex::new(keys),
            ready: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            changed: tokio::sync::Notify::new(),
        };
        let engine = Arc::new(engine);
        let audited = last_successes(&config.daemon.state_dir.join("audit.jsonl"));
        for k in &config.keys {
            let mut last_success = audited.get(&k.name).copied();
            if let Ok(j) = engine.journal.load(&k.name) {
                engine.with_key(&k.name, |s| {
                    s.last_outcome = j.last_outcome.as_deref().and_then(outcome_str)
                });
                if matches!(j.last_outcome.as_deref(), Some("success" | "degraded"))
                    && let Some(at) = j.last_finished_at
                {
                    last_success = last_success.max(Some(at));
                }
            }
            // A restart must not forget the last success: the "no recent success" alert reads it.
            if let Some(at) = last_success {
                engine.metrics.last_success(&k.name, at);
            }
        }
        Ok(engine)
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        // A poisoned lock means a panic while swapping an Arc: the value is still whole.
        self.runtime
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn config(&self) -> Arc<Config> {
        self.runtime().config.clone()
    }

    /// Swaps in a new configuration (SIGHUP). Keys that disappeared lose their state and series.
    pub fn replace_runtime(&self, runtime: Runtime) {
        let config = runtime.config.clone();
        self.metrics.apply_config(&config);
        {
            let mut keys = self.lock_keys();
            keys.retain(|name, state| {
                let keep = config.key(name).is_some();
                if !keep && let Some(c) = &state.watch_cancel {
                    c.cancel();
                }
                keep
            });
            for k in &config.keys {
                keys.entry(k.name.clone()).or_default();
            }
        }
        *self.runtime.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(runtime);
        self.changed.notify_waiters();
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyState>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_key<R>(&self, key: &str, f: impl FnOnce(&mut KeyState) -> R) -> Option<R> {
        self.lock_keys().get_mut(key).map(f)
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.metrics.paused(paused);
        self.changed.notify_waiters();
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// True while a rotation of the key is between preflight and the end of verify.
    pub fn is_busy(&self, key: &str) -> bool {
        self.with_key(key, |s| s.busy).unwrap_or(false)
    }

    pub(crate) fn set_phase(
        &self,
        key: &str,
        rotation: &Arc<Mutex<RotationRecord>>,
        phase: LivePhase,
    ) {
        self.with_key(key, |s| s.phase = phase);
        lock(rotation).phase = phase;
    }

    pub(crate) fn set_status(&self, key: &str, status: &KeyStatus) {
        self.metrics
            .key_status(key, status.active, status.last_rotated);
        self.with_key(key, |s| s.status = Some(status.clone()));
    }

    pub(crate) fn cached_status(&self, key: &str) -> Option<KeyStatus> {
        self.with_key(key, |s| s.status.clone()).flatten()
    }

    pub(crate) fn set_destinations(&self, key: &str, views: Vec<DestinationView>, drift: bool) {
        self.metrics.drift(key, drift);
        self.with_key(key, |s| {
            s.destinations = views;
            s.drift = drift;
        });
    }

    pub(crate) fn set_next_rotation(&self, key: &str, at: Option<DateTime<Utc>>) {
        self.metrics.next_rotation(key, at);
        self.with_key(key, |s| s.next_rotation = at);
    }

    /// The record of a rotation the engine still remembers.
    pub fn rotation(&self, id: Uuid) -> Option<RotationRecord> {
        let keys = self.lock_keys();
        keys.values()
            .flat_map(|s| s.records.iter())
            .find(|r| lock(r).rotation_id == id)
            .map(|r| lock(r).clone())
    }

    /// The live view of every key, in config order.
    pub fn key_views(&self) -> Vec<KeyView> {
        let config = self.config();
        let keys = self.lock_keys();
        config
            .keys
            .iter()
            .map(|k| {
                let empty = KeyState::default();
                let s = keys.get(&k.name).unwrap_or(&empty);
                let st = s.status.as_ref();
                KeyView {
                    name: k.name.clone(),
                    provider: k.provider.clone(),
                    active: st.map(|s| s.active),
                    key_id: st.map(|s| s.key_id.clone()),
                    first_generated: st.and_then(|s| s.first_generated),
                    last_rotated: st.and_then(|s| s.last_rotated),
                    generated_by: st.and_then(|s| s.generated_by.clone()),
                    account_id: st.and_then(|s| s.account_id.clone()),
                    next_rotation: s.next_rotation,
                    last_outcome: s.last_outcome,
                    phase: s.phase,
                    destinations: s.destinations.clone(),
                    drift: s.drift,
                }
            })
            .collect()
    }

    /// Checks that a rotation may start, marks the key busy and records it. Cancels the key's watch.
    fn begin(
        &self,
        key: &KeyConfig,
        req: &RotationRequest,
    ) -> Result<Arc<Mutex<RotationRecord>>, TriggerError> {
        if self.shutdown.is_cancelled() {
            return Err(TriggerError::ShuttingDown);
        }
        let mut keys = self.lock_keys();
        let state = keys
            .get_mut(&key.name)
            .ok_or_else(|| TriggerError::UnknownKey(key.name.clone()))?;
        if state.busy {
            return Err(TriggerError::Busy(key.name.clone()));
        }
        if !req.dry_run {
            state.busy = true;
            state.phase = LivePhase::Preflight;
            if let Some(c) = state.watch_cancel.take() {
                c.cancel();
            }
        }
        let record = Arc::new(Mutex::new(RotationRecord {
            rotation_id: Uuid::new_v4(),
            key: key.name.clone(),
            trigger: req.trigger,
            phase: LivePhase::Preflight,
            outcome: None,
            started_at: Utc::now(),
            finished_at: None,
            events: Vec::new(),
            preflight: Vec::new(),
        }));
        state.records.push_back(record.clone());
        while state.records.len() > RECORDS_PER_KEY {
            state.records.pop_front();
        }
        Ok(record)
    }

    pub(crate) fn end(&self, key: &str, outcome: Option<Outcome>, dry_run: bool) {
        self.with_key(key, |s| {
            if !dry_run {
                s.busy = false;
                s.phase = LivePhase::Idle;
            }
            if let Some(o) = outcome {
                s.last_outcome = Some(o.as_str());
            }
        });
        self.changed.notify_waiters();
    }

    pub(crate) fn set_watch(&self, key: &str, token: Option<CancellationToken>) {
        self.with_key(key, |s| {
            s.watch_cancel = token;
            s.phase = if s.watch_cancel.is_some() {
                LivePhase::Watching
            } else {
                LivePhase::Idle
            };
        });
    }

    /// Refusals an operator's trigger gets before anything runs: unknown key, busy, pause and window
    /// (unless forced). Used by the admin API to answer 404/409/423.
    pub fn check_trigger(&self, key: &str, req: &RotationRequest) -> Result<(), TriggerError> {
        let config = self.config();
        let k = config
            .key(key)
            .ok_or_else(|| TriggerError::UnknownKey(key.to_string()))?;
        if self.is_busy(key) && !req.dry_run {
            return Err(TriggerError::Busy(key.to_string()));
        }
        if !req.force && req.rerotation.is_none() && req.resume.is_none() {
            if self.is_paused()
                && (req.trigger.is_scheduled()
                    || matches!(req.trigger, Trigger::Api | Trigger::Manual))
            {
                return Err(TriggerError::Paused);
            }
            if let Some(w) = &k.window
                && !w.contains_at(Utc::now(), k.timezone)
            {
                return Err(TriggerError::OutsideWindow(key.to_string()));
            }
        }
        Ok(())
    }

    /// Starts a rotation in the background and returns its id at once.
    pub fn start_rotation(
        self: &Arc<Self>,
        key: &str,
        req: RotationRequest,
    ) -> Result<Uuid, TriggerError> {
        let (id, fut) = self.prepare_rotation(key, req)?;
        self.tasks.spawn(fut);
        Ok(id)
    }

    /// Runs a rotation to its outcome in this task (the CLI's in-process `rotate`, recovery, the
    /// scheduler). `None` outcome = dry run.
    pub async fn rotate(
        self: &Arc<Self>,
        key: &str,
        req: RotationRequest,
    ) -> Result<(Uuid, Option<Outcome>), TriggerError> {
        let (id, fut) = self.prepare_rotation(key, req)?;
        let outcome = self.tasks.spawn(fut).await.unwrap_or(None);
        Ok((id, outcome))
    }

    fn prepare_rotation(
        self: &Arc<Self>,
        key: &str,
        req: RotationRequest,
    ) -> Result<
        (
            Uuid,
            impl std::future::Future<Output = Option<Outcome>> + Send + 'static,
        ),
        TriggerError,
    > {
        self.check_trigger(key, &req)?;
        let rt = self.runtime();
        let k = rt
            .config
            .key(key)
            .ok_or_else(|| TriggerError::UnknownKey(key.to_string()))?
            .clone();
        let record = self.begin(&k, &req)?;
        let id = lock(&record).rotation_id;
        let engine = self.clone();
        let fut = async move {
            use tracing::Instrument;
            let span = tracing::info_span!("rotation", key = %k.name, rotation_id = %id);
            let dry_run = req.dry_run;
            let permit = engine.permits.clone().acquire_owned().await.ok();
            let outcome = rotation::run(&engine, &rt, &k, &record, req)
                .instrument(span)
                .await;
            drop(permit);
            engine.end(&k.name, outcome, dry_run);
            outcome
        };
        Ok((id, fut))
    }

    /// Adds an event to a rotation's record and logs it (with the rotation span's key and id).
    pub(crate) fn event(
        &self,
        record: &Arc<Mutex<RotationRecord>>,
        event: &str,
        detail: impl Into<String>,
    ) {
        let detail = detail.into();
        tracing::info!(event, "{detail}");
        lock(record).events.push(RecordEvent {
            ts: Utc::now(),
            event: event.to_string(),
            detail,
        });
    }

    /// Appends to the audit log; a failing audit write is logged loudly but never stops a rotation
    /// halfway (that would be the outage keyrotd exists to prevent).
    pub(crate) fn audit(&self, record: AuditRecord) {
        if let Err(e) = self.audit.append(&record) {
            tracing::error!(error = %e, "Audit log write failed.");
        }
    }

    pub(crate) fn load_journal(
        &self,
        key: &str,
    ) -> Result<crate::journal::KeyJournal, JournalError> {
        self.journal.load(key)
    }

    pub(crate) fn store_journal(&self, j: &crate::journal::KeyJournal) -> Result<(), JournalError> {
        self.journal.store(j)
    }

    /// Keys' names in config order.
    pub fn key_names(&self) -> Vec<String> {
        self.config().keys.iter().map(|k| k.name.clone()).collect()
    }
}

/// Per key, the time of the last `finished` audit record with outcome success or degraded. An
/// unreadable log or line is skipped: this only seeds a metric.
fn last_successes(audit_path: &std::path::Path) -> HashMap<String, DateTime<Utc>> {
    use std::io::BufRead;
    let mut out: HashMap<String, DateTime<Utc>> = HashMap::new();
    let Ok(file) = std::fs::File::open(audit_path) else {
        return out;
    };
    for line in std::io::BufReader::new(file).lines().map_while(Result::ok) {
        let Ok(r) = serde_json::from_str::<AuditRecord>(&line) else {
            continue;
        };
        if r.event == "finished" && matches!(r.outcome.as_deref(), Some("success" | "degraded")) {
            let at = out.entry(r.key).or_insert(r.ts);
            *at = (*at).max(r.ts);
        }
    }
    out
}

/// The outcome label a journal's text names, if it names one.
pub(crate) fn outcome_str(s: &str) -> Option<&'static str> {
    Outcome::ALL.iter().map(|o| o.as_str()).find(|o| *o == s)
}

/// Locks a record; a poisoned lock only means a panic elsewhere while it was held, the record is whole.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
