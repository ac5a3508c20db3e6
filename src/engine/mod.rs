//! The rotation engine: what keyrotd exists for.
//!
//! - [`rotation`]: one rotation as a pipeline of phases around one [`rotation::Rotation`] context:
//!   [`preflight`], [`regenerate`], [`distribute`] (store + notify + verify), then [`watch`];
//! - [`approval`]: the gate between "due" and "rotating" for keys that need an operator's approval;
//! - [`recovery`]: what a journal left by a crash means, and the re-rotation owed for a lost key;
//! - [`reconcile`]: comparing the provider's active key with every destination (drift);
//! - [`scheduler`]: one timer for every key's next due time;
//! - [`slot`]: each key's single owner (claim + journal mutex) and live view;
//! - [`calls`]: provider and dependent calls, counted, with their retries.
//!
//! Invariants: at most one actor (rotation, recovery, reconcile repair) works on a key at a time
//! ([`slot::Claim`]); every journal change is one typed transition of `journal.rs`, made under the
//! key's journal mutex by [`Engine::commit`] or [`Engine::commit_strict`]; the journal is written before
//! each destructive step; no secret is ever put into a record, an event, a log line or a metric label.

pub mod approval;
pub mod calls;
pub mod coalesce;
pub mod distribute;
pub mod dual;
pub mod fill;
pub mod looks;
pub mod preflight;
pub mod reconcile;
pub mod record;
pub mod recovery;
pub mod regenerate;
pub mod replicas;
pub mod rotation;
pub mod scheduler;
pub mod slot;
pub mod watch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

pub use crate::journal::Trigger;
pub use approval::Approval;
pub use calls::Dependents;
pub use record::{DestinationView, EventKind, LivePhase, RecordEvent, RotationRecord};
pub use rotation::Resume;

use crate::clock::Clock;
use crate::config::{Config, FirstContact, KeyConfig, OwnerView};
use crate::coordination::kv::Kv;
use crate::coordination::{Coordinator, Replica};
use crate::journal::{AuditEvent, AuditLog, AuditRecord, Journal, JournalError, KeyJournal};
use crate::limits::{DEFAULT_PROVIDER_REQUESTS, DEFAULT_STORE_REQUESTS, Limited};
use crate::notify::targets::{Notice, NoticeEvent, Notifications, Sink};
use crate::provider::{KeyStatus, Provider};
use crate::store::Store;
use crate::telemetry::{Metrics, Outcome, RerotationReason};
use slot::{Claim, KeySlot};

/// A request to rotate a key.
#[derive(Debug, Clone)]
pub struct RotationRequest {
    pub trigger: Trigger,
    /// The operator's text for manual/API rotations, else the trigger or re-rotation reason.
    pub reason: String,
    pub requested_by: String,
    /// Overrides window and pause, never the rest of preflight.
    pub force: bool,
    /// With `force`: rotate when at least one destination is writable (an exposed key must die even
    /// while a store is down); the rest are filled later.
    pub allow_partial: bool,
    /// Preflight only.
    pub dry_run: bool,
    /// Watch the dependents after the outcome (the CLI's in-process `rotate` without `--watch` leaves
    /// the watch to the daemon).
    pub watch: bool,
    /// Set for a recovery rotation: the old key is already gone, so preflight checks only the
    /// provider's account and that a destination is writable.
    pub rerotation: Option<RerotationReason>,
    /// Set when recovery or reconcile resumes at notify instead of regenerating.
    pub resume: Option<Resume>,
    /// Set when an operator approved a rotation that waited for it: this continues it.
    pub approval: Option<Approval>,
    /// The key's group is rotated together: its reloads wait for the other members'.
    pub batch: Option<Arc<coalesce::Batch>>,
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
            allow_partial: false,
            dry_run: false,
            watch: true,
            rerotation: None,
            resume: None,
            approval: None,
            batch: None,
        }
    }

    /// keyrotd's own re-rotation of a key whose old value is gone.
    pub fn rerotation(trigger: Trigger, reason: RerotationReason, requested_by: String) -> Self {
        let mut req = RotationRequest::new(trigger, reason.as_str(), requested_by);
        req.rerotation = Some(reason);
        req
    }

    /// Started by keyrotd itself rather than by a schedule or an operator.
    fn is_repair(&self) -> bool {
        self.rerotation.is_some() || self.resume.is_some()
    }
}

/// How a rotation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    /// Preflight only: what would happen.
    DryRun {
        would_rotate: bool,
        findings: Vec<String>,
        problems: Vec<String>,
    },
    Finished(Outcome),
    /// Preflight passed and the rotation waits for an operator's approval (the key's claim is free
    /// meanwhile); an approval continues it, a timeout ends it `skipped`.
    AwaitingApproval,
    /// The rotation's task panicked (a bug): its journal says where it stopped, and recovery picks it
    /// up as after a crash.
    Panicked,
}

/// What a dry run says would happen, in the words `keyrotd rotate --dry-run` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Verdict {
    #[serde(rename = "would rotate")]
    WouldRotate,
    #[serde(rename = "would abort")]
    WouldAbort,
}

impl Verdict {
    pub fn of(would_rotate: bool) -> Verdict {
        if would_rotate {
            Verdict::WouldRotate
        } else {
            Verdict::WouldAbort
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::WouldRotate => "would rotate",
            Verdict::WouldAbort => "would abort",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
    #[error("the recovery scan of the journals is still running; try again shortly")]
    NotReady,
    #[error("{key}: blocked from automatic rotation: {why}")]
    Blocked { key: String, why: String },
    #[error("{key} is held by replica {holder}; send the request there")]
    HeldElsewhere { key: String, holder: String },
    #[error(
        "{key}: first contact: keyrotd has never issued nor adopted this key, so it is not rotated by itself \
         until an operator rotates it (or the key sets on_first_contact = \"rotate\")"
    )]
    FirstContact { key: String },
    #[error("no rotation of {0} waits for an approval")]
    NothingToApprove(String),
    #[error("{key}: too late: the rotation waited for an approval until {until} and is skipped")]
    ApprovalTooLate { key: String, until: DateTime<Utc> },
}

/// The configuration in force with the clients built from it. Swapped whole on reload; a running
/// rotation keeps the one it started with.
pub struct Runtime {
    pub config: Arc<Config>,
    pub providers: HashMap<String, Arc<Limited<Provider>>>,
    pub stores: HashMap<String, Arc<Limited<Store>>>,
}

impl Runtime {
    pub async fn build(config: Arc<Config>) -> anyhow::Result<Runtime> {
        let mut providers = HashMap::new();
        let limit_of = |name: &str, default| config.limits.get(name).copied().unwrap_or(default);
        for (name, pc) in &config.providers {
            let limit = limit_of(name, DEFAULT_PROVIDER_REQUESTS);
            let provider = Limited::new(Provider::build(name, pc)?, limit);
            providers.insert(name.clone(), Arc::new(provider));
        }
        let mut stores = HashMap::new();
        for (name, sc) in &config.stores {
            let limit = limit_of(name, DEFAULT_STORE_REQUESTS);
            let store = Limited::new(Store::build(name, sc).await?, limit);
            stores.insert(name.clone(), Arc::new(store));
        }
        Ok(Runtime {
            config,
            providers,
            stores,
        })
    }

    pub fn provider(&self, key: &KeyConfig) -> anyhow::Result<&Arc<Limited<Provider>>> {
        // Validation guarantees the name exists; a miss is a bug worth a clear error, not a panic.
        self.providers.get(&key.provider).ok_or_else(|| {
            anyhow::anyhow!("{}: provider {} is not configured", key.name, key.provider)
        })
    }

    pub fn store(&self, name: &str) -> anyhow::Result<&Arc<Limited<Store>>> {
        self.stores
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("store {name} is not configured"))
    }
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
    pub last_outcome: Option<Outcome>,
    pub phase: LivePhase,
    pub destinations: Vec<ObservedDestination>,
    pub drift: bool,
    /// Who the key belongs to (`null` when the configuration names nobody).
    pub owner: Option<OwnerView>,
    /// Whether scheduled rotations of the key wait for an operator's approval.
    pub approval_required: bool,
    /// A due rotation waiting for an approval, if one does.
    pub pending_approval: Option<PendingView>,
    /// keyrotd has never issued nor adopted this key, and with `on_first_contact = "report"` it
    /// regenerates nothing by itself until an operator rotates it.
    pub first_contact: bool,
    /// No observation of the provider and destinations has completed since start.
    pub observing: bool,
    /// Why the key is blocked from automatic rotation, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked: Option<String>,
    /// With several replicas: the replica that holds the key's lease (`null` while none does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<Option<String>>,
}

/// A destination in `/v1/keys`: what it held when last looked at, and when that was (a stale
/// observation shows as stale).
#[derive(Debug, Clone, Serialize)]
pub struct ObservedDestination {
    #[serde(flatten)]
    pub view: DestinationView,
    pub observed_at: Option<DateTime<Utc>>,
}

/// A rotation waiting for an approval, as `/v1/keys` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PendingView {
    pub rotation_id: Uuid,
    pub trigger: Trigger,
    /// When preflight passed and the approval was asked for.
    pub asked_at: DateTime<Utc>,
    /// When it is skipped without an approval.
    pub until: DateTime<Utc>,
}

/// How the engine is built beyond its config: the clock and how dependents are reached.
#[derive(Default)]
pub struct EngineOptions {
    pub clock: Clock,
    pub dependents: Dependents,
    /// Where notifications go (the engine's tests record them).
    pub notices: Sink,
    /// Several replicas: this replica's coordinator (built from `[coordination]` by [`Engine::new`]).
    pub coordination: Option<Arc<Coordinator>>,
}

/// The engine shared by the daemon's tasks, the admin API and the CLI.
pub struct Engine {
    runtime: RwLock<Arc<Runtime>>,
    journal: Journal,
    audit: AuditLog,
    pub metrics: Arc<Metrics>,
    pub(crate) dependents: Dependents,
    /// Notifications to the keys' `[notify.*]` targets, sent in the background.
    pub notices: Notifications,
    pub clock: Clock,
    /// Several replicas: which keys this replica holds, and the fencing of its destructive steps.
    pub coordination: Option<Arc<Coordinator>>,
    slots: RwLock<HashMap<String, Arc<KeySlot>>>,
    permits: Arc<tokio::sync::Semaphore>,
    paused: AtomicBool,
    ready: AtomicBool,
    /// Cancelled on shutdown: no new rotations, the scheduler stops, watches end.
    pub shutdown: CancellationToken,
    /// Every rotation and watch task, so shutdown can wait for the ones it must not abandon.
    pub tasks: TaskTracker,
    /// Tells the scheduler which keys' due times to compute again.
    pub(crate) schedule: scheduler::Signal,
    /// Rotations holding (or about to hold) an issued key, with the time until which shutdown waits
    /// for them: their store_deadline counted from the regenerate response.
    inflight: Mutex<HashMap<Uuid, tokio::time::Instant>>,
    /// `reload_coalesce` windows, per reload target.
    pub(crate) reloads: coalesce::Coalescer,
    /// Keys being reconciled, and being looked at by the recovery tick, across rounds.
    pub(crate) reconciling: Arc<looks::Looks>,
    pub(crate) recovering: Arc<looks::Looks>,
}

impl Engine {
    /// Builds the engine on a validated config, with real clients. The caller holds the state-dir lock.
    pub async fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Engine>> {
        let runtime = Runtime::build(config.clone()).await?;
        let mut options = EngineOptions::default();
        if let Some(co) = &config.coordination {
            let store = runtime.store(&co.store)?.clone();
            let replica = Replica::this_process(options.clock.now());
            options.coordination = Some(Arc::new(Coordinator::new(
                replica,
                Kv::Vault(store),
                co,
                options.clock.clone(),
                metrics.clone(),
            )));
        }
        Engine::with_runtime(runtime, metrics, options)
    }

    /// Builds the engine on a runtime whose clients are already built (tests give in-memory ones).
    pub fn with_runtime(
        runtime: Runtime,
        metrics: Arc<Metrics>,
        options: EngineOptions,
    ) -> anyhow::Result<Arc<Engine>> {
        let config = runtime.config.clone();
        let journal = Journal::open(&config.daemon.state_dir)?;
        let audit = AuditLog::open(&config.daemon.state_dir)?;
        metrics.apply_config_at(&config, options.clock.now());
        metrics.paused(config.daemon.paused);
        let engine = Arc::new(Engine {
            permits: Arc::new(tokio::sync::Semaphore::new(
                config.daemon.max_concurrent_rotations.max(1),
            )),
            paused: AtomicBool::new(config.daemon.paused),
            runtime: RwLock::new(Arc::new(runtime)),
            journal,
            audit,
            notices: Notifications::new(metrics.clone(), options.notices),
            metrics,
            dependents: options.dependents,
            clock: options.clock,
            coordination: options.coordination,
            slots: RwLock::new(HashMap::new()),
            ready: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            schedule: scheduler::Signal::default(),
            inflight: Mutex::new(HashMap::new()),
            reloads: coalesce::Coalescer::default(),
            reconciling: Arc::new(looks::Looks::new(recovery::CONCURRENCY)),
            recovering: Arc::new(looks::Looks::new(recovery::CONCURRENCY)),
        });
        let journaled = engine.open_slots(&config);
        engine.seed_last_successes(&config, journaled);
        Ok(engine)
    }

    /// Loads the journal of every configured key that has no slot yet. An unreadable journal is set
    /// aside (never overwritten: an operator may need it) and the key blocked from automatic rotation.
    /// Returns, per newly opened key, when its journal says it last ended served (success/degraded).
    fn open_slots(&self, config: &Config) -> HashMap<String, DateTime<Utc>> {
        let mut served = HashMap::new();
        let now = self.clock.now();
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        for k in &config.keys {
            if slots.contains_key(&k.name) {
                continue;
            }
            // With several replicas a key's journal lives in its lease document, read when the key
            // is taken.
            let local = match self.coordination {
                Some(_) => Ok(KeyJournal::new(&k.name)),
                None => self.journal.load(&k.name),
            };
            let (journal, blocked) = match local {
                Ok(j) => (j, None),
                Err(e) => {
                    let aside = self.journal.set_aside(&k.name, now);
                    let why = match aside {
                        Ok(p) => format!("{e}; moved to {}", p.display()),
                        Err(e2) => format!("{e}; could not be moved aside: {e2}"),
                    };
                    tracing::error!(key = %k.name, error = %why, "Journal unreadable: key blocked from automatic rotation.");
                    (KeyJournal::new(&k.name), Some(why))
                }
            };
            if matches!(
                journal.last_outcome,
                Some(Outcome::Success | Outcome::Degraded)
            ) && let Some(at) = journal.last_finished_at
            {
                served.insert(k.name.clone(), at);
            }
            self.metrics
                .rotation_pending(&k.name, journal.pending_approval.is_some());
            dual::seed_metrics(&self.metrics, &journal);
            self.metrics.drift(&k.name, journal.drift);
            let slot = KeySlot::new(journal);
            self.metrics.journal_blocked(&k.name, blocked.is_some());
            slot.live().blocked = blocked;
            slots.insert(k.name.clone(), slot);
        }
        served
    }

    /// A restart must not forget the last success: the "no recent success" alert reads it.
    fn seed_last_successes(&self, config: &Config, journaled: HashMap<String, DateTime<Utc>>) {
        let audited = last_successes(self.audit.path());
        for k in &config.keys {
            let last = audited
                .get(&k.name)
                .copied()
                .max(journaled.get(&k.name).copied());
            if let Some(at) = last {
                self.metrics.last_success(&k.name, at);
            }
        }
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

    /// Swaps in a new configuration (SIGHUP). Keys that disappeared lose their series and, once no
    /// rotation holds them, their slot; a key removed while its rotation runs keeps its slot (and its
    /// claim) until the rotation ends.
    pub fn replace_runtime(&self, runtime: Runtime) {
        let config = runtime.config.clone();
        self.metrics.apply_config_at(&config, self.clock.now());
        {
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            slots.retain(|name, slot| {
                let keep = config.key(name).is_some() || slot.is_busy();
                if config.key(name).is_none()
                    && let Some(c) = slot.live().watch_cancel.take()
                {
                    c.cancel();
                }
                keep
            });
        }
        *self.runtime.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(runtime);
        let _ = self.open_slots(&config);
        self.schedule.all();
    }

    pub(crate) fn slot(&self, key: &str) -> Option<Arc<KeySlot>> {
        self.slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.metrics.paused(paused);
        self.schedule.all();
    }

    /// Ready once the recovery scan decided every key, and while every journal is written through.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::SeqCst) {
            return Err("recovery scan of the journals still running".into());
        }
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let dirty: Vec<&str> = slots
            .values()
            .filter(|s| s.live().dirty && self.acts_on(&s.name))
            .map(|s| s.name.as_str())
            .collect();
        if dirty.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "journal writes failing for {} (state_dir {}): retrying",
                dirty.join(", "),
                self.journal.dir().display()
            ))
        }
    }

    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// The start-up recovery scan is over.
    pub fn is_started(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// For a process that is the only actor on its state_dir and runs no recovery scan (the CLI's
    /// in-process `rotate`): triggers are accepted at once.
    pub fn mark_ready(&self) {
        self.set_ready();
    }

    /// True while an actor (rotation, recovery, repair) holds the key.
    pub fn is_busy(&self, key: &str) -> bool {
        self.slot(key).is_some_and(|s| s.is_busy())
    }

    /// Applies one journal transition under the key's journal mutex and writes it through. The
    /// in-memory journal moves on even if the write fails: after a regenerate, the key must still
    /// reach its destinations. A failed write is counted, logged, keeps `/readyz` failing and is
    /// retried by [`Engine::flush_journals`] and by every later write of the key.
    pub(crate) async fn commit(
        &self,
        slot: &KeySlot,
        f: impl FnOnce(&mut KeyJournal),
    ) -> Result<(), JournalError> {
        let mut j = slot.lock_journal().await;
        f(&mut j);
        self.journal_changed(slot, &j);
        let written = self.persist(&j).await;
        self.written(slot, &written);
        written
    }

    /// Called under the journal mutex after every change: the slot's mirror and the gauges that
    /// follow the journal.
    fn journal_changed(&self, slot: &KeySlot, j: &KeyJournal) {
        slot.changed(j);
        self.metrics
            .rotation_pending(&slot.name, j.pending_approval.is_some());
    }

    /// Writes a journal where it lives: the state dir, or (several replicas) the key's lease document.
    async fn persist(&self, j: &KeyJournal) -> Result<(), JournalError> {
        match &self.coordination {
            Some(c) => c.write_journal(&j.key, j).await,
            // The fsyncs run on the blocking pool, so a rotation's other work goes on meanwhile.
            None => {
                let (journal, j, now) = (self.journal.clone(), j.clone(), self.clock.now());
                tokio::task::spawn_blocking(move || journal.store(&j, now))
                    .await
                    .unwrap_or_else(|e| {
                        Err(JournalError::Io {
                            path: "journal".into(),
                            reason: e.to_string(),
                        })
                    })
            }
        }
    }

    /// Like [`Engine::commit`], but all or nothing: when the write fails the journal is unchanged.
    /// For the steps that must be on disk before they happen (a regenerate).
    pub(crate) async fn commit_strict(
        &self,
        slot: &KeySlot,
        f: impl FnOnce(&mut KeyJournal),
    ) -> Result<(), JournalError> {
        let mut j = slot.lock_journal().await;
        let mut next = j.clone();
        f(&mut next);
        let written = self.persist(&next).await;
        self.written(slot, &written);
        written?;
        *j = next;
        self.journal_changed(slot, &j);
        Ok(())
    }

    fn written(&self, slot: &KeySlot, result: &Result<(), JournalError>) {
        match result {
            Ok(()) => slot.live().dirty = false,
            // Several replicas: the journal of a key another replica holds is that replica's to
            // write (this copy is replaced by the stored one when this replica takes the key), so a
            // refused write is not a journal failure.
            Err(e) if !self.acts_on(&slot.name) => {
                slot.live().dirty = false;
                tracing::debug!(key = %slot.name, error = %e, "Journal not written: another replica holds the key.");
            }
            Err(e) => {
                slot.live().dirty = true;
                self.metrics.journal_write_failure();
                tracing::error!(key = %slot.name, error = %e, "Journal write failed.");
            }
        }
    }

    /// Writes again every journal whose last write failed.
    pub async fn flush_journals(&self) {
        let slots: Vec<Arc<KeySlot>> = self
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.live().dirty && self.acts_on(&s.name))
            .cloned()
            .collect();
        for slot in slots {
            let j = slot.lock_journal().await;
            let written = self.persist(&j).await;
            self.written(&slot, &written);
            if written.is_ok() {
                tracing::info!(key = %slot.name, "Journal written again after a failure.");
            }
        }
    }

    /// Proves the journal directory is writable (preflight).
    pub(crate) fn journal_writable(&self) -> Result<(), JournalError> {
        self.journal.probe_writable()
    }

    /// Appends to the audit log; a failing audit write is logged loudly but never stops a rotation
    /// halfway (that would be the outage keyrotd exists to prevent).
    pub(crate) fn audit(&self, mut record: AuditRecord) {
        // Every record of a key names its owner, from the configuration in force.
        record.owner = self
            .config()
            .key(&record.key)
            .and_then(|k| k.owner_name().map(str::to_string));
        if let Err(e) = self.audit.append(&record) {
            tracing::error!(error = %e, "Audit log write failed.");
        }
    }

    /// Sends a notification about its key to the key's `[notify.*]` targets (for a pending approval,
    /// also to `approval.notify`), in the background: it never waits and never fails.
    pub(crate) fn notify(&self, notice: Notice) {
        let config = self.config();
        let Some(key) = config.key(&notice.key) else {
            return;
        };
        let mut names = key.notify.clone();
        if notice.event == NoticeEvent::PendingApproval
            && let Some(a) = &key.approval
        {
            names.extend(a.notify.iter().filter(|n| !key.notify.contains(n)).cloned());
        }
        self.notices.emit(&config.notify, &names, notice.finish());
    }

    pub(crate) fn set_status(&self, slot: &KeySlot, status: &KeyStatus) {
        self.metrics
            .key_status(&slot.name, status.active, status.last_rotated);
        slot.live().status = Some(status.clone());
    }

    pub(crate) fn set_destinations(&self, slot: &KeySlot, views: Vec<DestinationView>) {
        let mut live = slot.live();
        live.destinations = views;
        live.destinations_at = Some(self.clock.now());
        live.observing = false;
    }

    /// Shows drift at once (metric, `/v1/keys`) and keeps it in the journal, so a restart shows it
    /// before its first look. The journal is written only when the flag changes, only by the
    /// replica holding the key, and never for a key blocked by an unreadable journal (only an
    /// operator's rotation writes that one anew). It is not a change of the key's rotation state:
    /// the slot's generation (which reconcile compares) is left alone.
    pub(crate) async fn set_drift(&self, slot: &KeySlot, drift: bool) {
        self.metrics.drift(&slot.name, drift);
        let blocked = {
            let mut live = slot.live();
            live.drift = drift;
            live.blocked.is_some()
        };
        if blocked || !self.acts_on(&slot.name) {
            return;
        }
        let mut j = slot.lock_journal().await;
        if j.drift == drift {
            return;
        }
        j.drift = drift;
        let written = self.persist(&j).await;
        self.written(slot, &written);
    }

    pub(crate) fn set_next_rotation(&self, key: &str, at: Option<DateTime<Utc>>) {
        self.metrics.next_rotation(key, at);
        if let Some(slot) = self.slot(key) {
            slot.live().next_rotation = at;
        }
    }

    /// The record of a rotation the engine still remembers.
    pub fn rotation(&self, id: Uuid) -> Option<RotationRecord> {
        let slots: Vec<Arc<KeySlot>> = self
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        slots
            .iter()
            .find_map(|s| s.record(id).map(|r| lock(&r).clone()))
    }

    /// The live view of every key, in config order.
    pub fn key_views(&self) -> Vec<KeyView> {
        let config = self.config();
        config
            .keys
            .iter()
            .filter_map(|k| {
                self.slot(&k.name).map(|s| {
                    let mut view = key_view(k, &s);
                    view.holder = self.coordination.as_ref().map(|c| c.holder(&k.name));
                    // Another replica's key: its journal lives with the holder, which knows.
                    view.first_contact &= self.acts_on(&k.name);
                    view
                })
            })
            .collect()
    }

    /// Refusals a trigger gets before anything runs: not ready, unknown key, busy, blocked, pause and
    /// window (unless forced). The admin API answers 503/404/409/423 from them.
    pub fn check_trigger(&self, key: &str, req: &RotationRequest) -> Result<(), TriggerError> {
        if self.shutdown.is_cancelled() {
            return Err(TriggerError::ShuttingDown);
        }
        let config = self.config();
        let k = config
            .key(key)
            .ok_or_else(|| TriggerError::UnknownKey(key.to_string()))?;
        let slot = self
            .slot(key)
            .ok_or_else(|| TriggerError::UnknownKey(key.to_string()))?;
        if !self.ready.load(Ordering::SeqCst) && !req.is_repair() && !req.dry_run {
            return Err(TriggerError::NotReady);
        }
        if let Some(c) = &self.coordination
            && !c.holds(key)
        {
            return Err(TriggerError::HeldElsewhere {
                key: key.to_string(),
                holder: c
                    .holder(key)
                    .unwrap_or_else(|| "none (being taken over)".into()),
            });
        }
        if slot.is_busy() && !req.dry_run {
            return Err(TriggerError::Busy(key.to_string()));
        }
        if let Some(why) = slot.live().blocked.clone()
            && !req.trigger.is_operator()
        {
            return Err(TriggerError::Blocked {
                key: key.to_string(),
                why,
            });
        }
        // First contact: nothing keyrotd itself schedules may regenerate a key it never held (the
        // key in use today may live outside every destination). Operators may, and say so.
        if req.trigger.is_scheduled()
            && k.on_first_contact == FirstContact::Report
            && slot.live().first_contact
            && !req.dry_run
        {
            return Err(TriggerError::FirstContact {
                key: key.to_string(),
            });
        }
        if req.force || req.is_repair() || req.approval.is_some() {
            return Ok(());
        }
        if self.is_paused() && (req.trigger.is_scheduled() || req.trigger.is_operator()) {
            return Err(TriggerError::Paused);
        }
        if let Some(w) = &k.window
            && !w.contains_at(self.clock.now(), k.timezone)
        {
            return Err(TriggerError::OutsideWindow(key.to_string()));
        }
        Ok(())
    }

    /// Starts a rotation in the background and returns its id at once. A key in a group starts its
    /// whole group (its keys always rotate together); the id is this key's rotation's.
    pub fn start_rotation(
        self: &Arc<Self>,
        key: &str,
        req: RotationRequest,
    ) -> Result<Uuid, TriggerError> {
        if let Some(group) = self.group_of(key, &req) {
            let started = self.start_group(&group, req)?;
            return started
                .into_iter()
                .find(|(k, _, _)| k == key)
                .map(|(_, id, _)| id)
                .ok_or_else(|| TriggerError::UnknownKey(key.to_string()));
        }
        let (id, fut) = self.prepare(key, None, req)?;
        self.tasks.spawn(fut);
        Ok(id)
    }

    /// The group `key` rotates with, for a request that starts a rotation of it (not a repair, a
    /// resume or a dry run, which concern the key alone).
    fn group_of(&self, key: &str, req: &RotationRequest) -> Option<String> {
        if req.is_repair() || req.dry_run || req.batch.is_some() {
            return None;
        }
        self.config().key(key)?.rollout.group.clone()
    }

    /// Starts every key of `group`, each with its claim, sharing one reload batch: a dependent that
    /// reads several of them is reloaded once. All or nothing: a key that is busy or refused stops
    /// the whole group. Returns (key, rotation id, task) per key.
    pub fn start_group(
        self: &Arc<Self>,
        group: &str,
        req: RotationRequest,
    ) -> Result<Vec<(String, Uuid, tokio::task::JoinHandle<RunResult>)>, TriggerError> {
        let config = self.config();
        let members: Vec<Arc<KeyConfig>> = config
            .keys
            .iter()
            .filter(|k| k.rollout.group.as_deref() == Some(group))
            .map(|k| Arc::new(k.clone()))
            .collect();
        let mut claims = Vec::new();
        for k in &members {
            self.check_trigger(&k.name, &req)?;
            let slot = self
                .slot(&k.name)
                .ok_or_else(|| TriggerError::UnknownKey(k.name.clone()))?;
            claims.push(
                slot.try_claim()
                    .ok_or_else(|| TriggerError::Busy(k.name.clone()))?,
            );
        }
        let batch = coalesce::Batch::new(group, &members);
        let mut started = Vec::new();
        for (k, claim) in members.iter().zip(claims) {
            let mut r = req.clone();
            r.batch = Some(batch.clone());
            let (id, fut) = self.prepare(&k.name, Some(claim), r)?;
            started.push((k.name.clone(), id, self.tasks.spawn(fut)));
        }
        tracing::info!(group, keys = started.len(), "Group rotation started.");
        Ok(started)
    }

    /// Starts a rotation with a claim its caller already holds (recovery and reconcile decide under
    /// the claim and hand it over, so nothing can start in between).
    pub(crate) fn start_claimed(
        self: &Arc<Self>,
        claim: Claim,
        req: RotationRequest,
    ) -> Result<(Uuid, tokio::task::JoinHandle<RunResult>), TriggerError> {
        let key = claim.slot().name.clone();
        let (id, fut) = self.prepare(&key, Some(claim), req)?;
        Ok((id, self.tasks.spawn(fut)))
    }

    /// Runs a rotation to its end in this task (the CLI's in-process `rotate`, dry runs).
    pub async fn rotate(
        self: &Arc<Self>,
        key: &str,
        req: RotationRequest,
    ) -> Result<(Uuid, RunResult), TriggerError> {
        if let Some(group) = self.group_of(key, &req) {
            let mut mine = None;
            for (k, id, handle) in self.start_group(&group, req)? {
                let result = handle.await.unwrap_or(RunResult::Panicked);
                if k == key {
                    mine = Some((id, result));
                }
            }
            return mine.ok_or_else(|| TriggerError::UnknownKey(key.to_string()));
        }
        let (id, fut) = self.prepare(key, None, req)?;
        let result = self.tasks.spawn(fut).await.unwrap_or_else(|e| {
            tracing::error!(key, error = %e, "Rotation task panicked; recovery takes it from its journal.");
            RunResult::Panicked
        });
        Ok((id, result))
    }

    fn prepare(
        self: &Arc<Self>,
        key: &str,
        claim: Option<Claim>,
        req: RotationRequest,
    ) -> Result<
        (
            Uuid,
            impl std::future::Future<Output = RunResult> + Send + 'static,
        ),
        TriggerError,
    > {
        let claim = match claim {
            Some(c) => Some(c),
            None => {
                self.check_trigger(key, &req)?;
                let slot = self
                    .slot(key)
                    .ok_or_else(|| TriggerError::UnknownKey(key.to_string()))?;
                match req.dry_run {
                    true => None,
                    false => Some(
                        slot.try_claim()
                            .ok_or_else(|| TriggerError::Busy(key.to_string()))?,
                    ),
                }
            }
        };
        let rotation = rotation::Rotation::new(self, key, claim, req)?;
        let id = rotation.meta.rotation_id;
        let permits = self.permits.clone();
        let fut = async move {
            use tracing::Instrument;
            let span = tracing::info_span!("rotation", key = %rotation.key.name, rotation_id = %id);
            let _permit = permits.acquire_owned().await.ok();
            rotation.run().instrument(span).await
        };
        Ok((id, fut))
    }

    /// `requested_by` for rotations keyrotd starts itself.
    pub(crate) fn requested_by(&self) -> String {
        let config = self.config();
        config
            .providers
            .values()
            .map(|p| match p {
                crate::config::ProviderConfig::Aos(a) => a.requested_by.clone(),
                crate::config::ProviderConfig::Http(h) => h.requested_by.clone(),
            })
            .next()
            .unwrap_or_else(|| "keyrotd".into())
    }

    /// Shutdown waits for rotation `id` until `until` (it holds an issued key, or a regenerate is in
    /// flight); `None` when it no longer needs waiting for.
    pub(crate) fn hold_shutdown(&self, id: Uuid, until: Option<tokio::time::Instant>) {
        let mut inflight = lock(&self.inflight);
        match until {
            Some(t) => inflight.insert(id, t),
            None => inflight.remove(&id),
        };
    }

    /// Until when shutdown waits: the latest bound of a rotation holding an issued key, or `grace`
    /// from now when none does.
    pub fn drain_deadline(&self, grace: std::time::Duration) -> tokio::time::Instant {
        let grace = tokio::time::Instant::now() + grace;
        lock(&self.inflight)
            .values()
            .copied()
            .max()
            .map_or(grace, |t| t.max(grace))
    }

    /// Whether this process acts on `key` (always, unless another replica holds its lease).
    pub fn acts_on(&self, key: &str) -> bool {
        self.coordination.as_ref().is_none_or(|c| c.holds(key))
    }

    /// This replica took `key`'s lease: its journal (from the lease document) replaces the slot's,
    /// and the key is recovered exactly as after a restart.
    pub async fn gain(self: &Arc<Self>, key: &str, journal: KeyJournal) {
        let Some(slot) = self.slot(key) else { return };
        {
            let mut j = slot.lock_journal().await;
            *j = journal;
            self.journal_changed(&slot, &j);
        }
        // The journal is now exactly the stored one: nothing of the old copy is owed a write.
        slot.live().dirty = false;
        slot.live().last_outcome = slot.journal().await.last_outcome;
        self.schedule.key(key);
    }

    /// Another replica holds `key` now: its watch ends here; a rotation in flight stops at its next
    /// destructive step (fencing).
    pub fn lose(&self, key: &str) {
        if let Some(slot) = self.slot(key)
            && let Some(watch) = slot.live().watch_cancel.take()
        {
            watch.cancel();
        }
        self.schedule.key(key);
    }

    /// Keys' names in config order.
    pub fn key_names(&self) -> Vec<String> {
        self.config().keys.iter().map(|k| k.name.clone()).collect()
    }
}

fn key_view(k: &KeyConfig, slot: &KeySlot) -> KeyView {
    let phase = slot.live_phase();
    let live = slot.live();
    let st = live.status.as_ref();
    let destinations = live
        .destinations
        .iter()
        .map(|view| ObservedDestination {
            view: view.clone(),
            observed_at: live.destinations_at,
        })
        .collect();
    let pending_approval = live.pending_approval.as_ref().map(|p| PendingView {
        rotation_id: p.rotation_id,
        trigger: p.trigger,
        asked_at: p.asked_at,
        until: p.until,
    });
    KeyView {
        name: k.name.clone(),
        provider: k.provider.clone(),
        active: st.map(|s| s.active),
        key_id: st.map(|s| s.key_id.clone()),
        first_generated: st.and_then(|s| s.first_generated),
        last_rotated: st.and_then(|s| s.last_rotated),
        generated_by: st.and_then(|s| s.generated_by.clone()),
        account_id: st.and_then(|s| s.account_id.clone()),
        next_rotation: live.next_rotation,
        last_outcome: live.last_outcome,
        phase,
        destinations,
        drift: live.drift,
        owner: k.owner.as_ref().map(|o| o.view()),
        approval_required: k.approval.is_some(),
        pending_approval,
        first_contact: live.first_contact && k.on_first_contact == FirstContact::Report,
        observing: live.observing,
        blocked: live.blocked.clone(),
        holder: None,
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
        if r.event == AuditEvent::Finished
            && matches!(r.outcome, Some(Outcome::Success | Outcome::Degraded))
        {
            let at = out.entry(r.key).or_insert(r.ts);
            *at = (*at).max(r.ts);
        }
    }
    out
}

/// Locks a record; a poisoned lock only means a panic elsewhere while it was held, the record is whole.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
