//! One key ("billing") on a scripted portal, two in-memory destinations ("a", "b") and scripted
//! dependents, driven by the real engine under tokio's paused clock. Nothing listens on a socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use keyrotd::clock::Clock;
use keyrotd::config::DestinationTarget;
use keyrotd::engine::{
    Dependents, Engine, EngineOptions, RotationRequest, RunResult, Runtime, Trigger,
};
use keyrotd::journal::{KeyJournal, Phase};
use keyrotd::limits::Limited;
use keyrotd::notify::targets::{Notice, NoticeEvent, Sink};
use keyrotd::provider::Provider;
use keyrotd::secret::{Secret, fingerprint};
use keyrotd::store::Store;
use keyrotd::telemetry::{Metrics, Outcome};
use keyrotd::testing::{DependentScript, MemoryStore, ScriptedDependents, ScriptedProvider};

pub const KEY: &str = "billing";
pub const STORES: [&str; 2] = ["a", "b"];

/// A Wednesday morning, far from any midnight, week or DST boundary.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2027, 3, 10, 10, 0, 0).unwrap()
}

/// A dependent of the key.
#[derive(Clone)]
pub struct Dep {
    pub name: &'static str,
    pub reads_from: &'static [&'static str],
    pub verify: bool,
    pub reload: bool,
}

pub fn dep(name: &'static str, reads_from: &'static [&'static str]) -> Dep {
    Dep {
        name,
        reads_from,
        verify: true,
        reload: true,
    }
}

/// What the fixture is built from.
#[derive(Clone)]
pub struct Spec {
    /// Extra lines of the `[[keys]]` table (`watch = "0s"`, `auto_recover = false`...).
    pub key: String,
    pub dependents: Vec<Dep>,
    /// The destinations hold the portal's key and the journal knows it (keyrotd rotated it before).
    pub known: bool,
    /// The portal keeps two keys live (`overlap = "dual"`: create, revoke, list).
    pub dual: bool,
    /// Extra lines of a dependent's table, by its name (`canary = true`, `confirm = {...}`).
    pub dep_extra: Vec<(&'static str, String)>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            key: "watch = \"0s\"\nstore_deadline = \"10s\"\nowner = { name = \"team-payments\", contact = \"#payments\" }\nnotify = [\"owner\"]".into(),
            dependents: vec![dep("api", &["a"])],
            known: true,
            dual: false,
            dep_extra: Vec::new(),
        }
    }
}

impl Spec {
    /// Sets fields of the `[[keys]]` table (a field given again replaces the default).
    pub fn key(mut self, lines: &str) -> Self {
        let field = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
        let new: Vec<String> = lines.lines().map(field).collect();
        let kept: Vec<&str> = self
            .key
            .lines()
            .filter(|l| !new.contains(&field(l)))
            .collect();
        self.key = format!("{}\n{lines}", kept.join("\n"));
        self
    }

    pub fn dependents(mut self, deps: Vec<Dep>) -> Self {
        self.dependents = deps;
        self
    }

    /// A vendor that keeps two keys live; each dependent also reports the fingerprint it uses at
    /// `http://NAME.invalid/key`.
    pub fn dual(mut self) -> Self {
        self.dual = true;
        self
    }

    /// Adds `lines` to dependent `name`'s table.
    pub fn dep_lines(mut self, name: &'static str, lines: &str) -> Self {
        self.dep_extra.push((name, lines.to_string()));
        self
    }
}

pub struct Fx {
    pub dir: tempfile::TempDir,
    pub spec: Spec,
    pub clock: Clock,
    pub provider: Arc<Limited<Provider>>,
    pub stores: HashMap<String, Arc<Limited<Store>>>,
    pub deps: Arc<ScriptedDependents>,
    pub dependents: HashMap<String, Arc<DependentScript>>,
    pub metrics: Arc<Metrics>,
    /// Every notification the engine sent: (target, notice).
    pub notices: Arc<Mutex<Vec<(String, Notice)>>>,
    /// The portal's key before the test did anything.
    pub original: String,
    engine: Option<Arc<Engine>>,
    coordinator: Option<Arc<keyrotd::coordination::Coordinator>>,
}

/// What a destination holds, relative to the portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holds {
    /// The portal's active key now.
    Active,
    /// The key from before the test.
    Original,
    Nothing,
    /// Any other value (a dead key).
    Other,
}

impl Fx {
    /// Everything but the engine: a test may still write the journal, seed stores or move the portal.
    pub fn new(spec: Spec) -> Fx {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = Clock::virtual_at(t0());
        let portal = ScriptedProvider::new("portal", clock.clone());
        if spec.dual {
            portal.set_dual();
        }
        let original = portal.secret();
        let provider = Arc::new(Limited::new(Provider::Scripted(portal), 8));
        let stores: HashMap<String, Arc<Limited<Store>>> = STORES
            .iter()
            .map(|n| {
                let store = Limited::new(Store::Memory(MemoryStore::new(n)), 32);
                (n.to_string(), Arc::new(store))
            })
            .collect();
        let fx = Fx {
            dir,
            spec,
            clock,
            provider,
            stores,
            deps: Arc::new(ScriptedDependents::default()),
            dependents: HashMap::new(),
            metrics: Arc::new(Metrics::new()),
            notices: Arc::default(),
            original,
            engine: None,
            coordinator: None,
        };
        if fx.spec.known {
            for s in STORES {
                fx.store(s).put(&target().to_string(), &fx.original);
            }
            let mut j = KeyJournal::new(KEY);
            j.active_key_id = Some(fx.portal().key_id());
            j.active_fingerprint = Some(fp(&fx.original));
            fx.write_journal(&j);
        }
        fx
    }

    /// Builds the engine (it loads the journal now) and marks it ready.
    pub fn start(mut self) -> Fx {
        self.build_engine();
        self.engine().mark_ready();
        self
    }

    /// [`Fx::start`] as one of several replicas, coordinated by `coordinator`.
    pub fn start_replica(mut self, coordinator: Arc<keyrotd::coordination::Coordinator>) -> Fx {
        self.coordinator = Some(coordinator);
        self.start()
    }

    /// Builds the engine without marking it ready (a test of the recovery scan).
    pub fn start_unready(mut self) -> Fx {
        self.build_engine();
        self
    }

    fn build_engine(&mut self) {
        let config = keyrotd::config::load_str(&self.config_text(KEY))
            .unwrap_or_else(|e| panic!("fixture config: {e:?}"));
        for d in &self.spec.dependents {
            let store = self.stores[d.reads_from[0]].clone();
            let script = DependentScript::new(store, target(), self.provider.clone());
            let script = self.deps.add(
                &format!("http://{}.invalid/reload", d.name),
                &format!("http://{}.invalid/health", d.name),
                script,
            );
            if self.spec.dual {
                self.deps
                    .alias(&format!("http://{}.invalid/key", d.name), &script);
            }
            self.dependents.insert(d.name.to_string(), script);
        }
        let runtime = Runtime {
            config: Arc::new(config),
            providers: HashMap::from([("portal".to_string(), self.provider.clone())]),
            stores: self.stores.clone(),
        };
        let options = EngineOptions {
            clock: self.clock.clone(),
            dependents: Dependents::Scripted(self.deps.clone()),
            notices: Sink::Recorded(self.notices.clone()),
            coordination: self.coordinator.clone(),
        };
        let engine = Engine::with_runtime(runtime, self.metrics.clone(), options)
            .unwrap_or_else(|e| panic!("engine: {e:#}"));
        self.engine = Some(engine);
    }

    /// A restart: this engine shuts down and a new one (metrics, slots, records all new) loads the
    /// journals from the same state directory, runs the recovery scan and is ready.
    pub async fn restart(mut self) -> Fx {
        if let Some(old) = self.engine.take() {
            old.shutdown.cancel();
        }
        self.metrics = Arc::new(Metrics::new());
        self.dependents.clear();
        self.deps = Arc::new(ScriptedDependents::default());
        self.build_engine();
        keyrotd::engine::recovery::recover_all(self.engine()).await;
        self
    }

    /// Runs the daemon's scheduler for this engine (it stops at shutdown).
    pub fn run_scheduler(&self) {
        tokio::spawn(keyrotd::engine::scheduler::run(self.engine().clone()));
    }

    /// The events of every notification sent so far, in order.
    pub fn notice_events(&self) -> Vec<NoticeEvent> {
        self.sent().into_iter().map(|n| n.event).collect()
    }

    /// Every notification sent so far.
    pub fn sent(&self) -> Vec<Notice> {
        self.notices
            .lock()
            .unwrap()
            .iter()
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// The audit log's records, as JSON.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state_dir().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
            .collect()
    }

    /// A reload (SIGHUP) to the fixture's config with the key named `name` (another name drops it).
    pub fn reload_as(&self, name: &str) {
        let config = keyrotd::config::load_str(&self.config_text(name))
            .unwrap_or_else(|e| panic!("fixture config: {e}"));
        let runtime = Runtime {
            config: Arc::new(config),
            providers: HashMap::from([("portal".to_string(), self.provider.clone())]),
            stores: self.stores.clone(),
        };
        self.engine().replace_runtime(runtime);
    }

    fn config_text(&self, name: &str) -> String {
        let dir = self.dir.path();
        std::fs::write(dir.join("token"), "management-token").unwrap();
        let mut deps = String::new();
        for d in &self.spec.dependents {
            let reads: Vec<String> = d.reads_from.iter().map(|s| format!("{s:?}")).collect();
            deps.push_str(&format!(
                "\n  [[keys.dependents]]\n  name = \"{}\"\n  reads_from = [{}]\n",
                d.name,
                reads.join(", ")
            ));
            if d.verify {
                deps.push_str(&format!(
                    "  verify = {{ url = \"http://{}.invalid/health\" }}\n",
                    d.name
                ));
            }
            if d.reload {
                deps.push_str(&format!(
                    "  reload = {{ url = \"http://{}.invalid/reload\", retries = 2 }}\n",
                    d.name
                ));
            }
            if self.spec.dual {
                deps.push_str(&format!(
                    "  confirm = {{ url = \"http://{}.invalid/key\", fingerprint_pointer = \"/fingerprint\" }}\n",
                    d.name
                ));
            }
            for (_, lines) in self.spec.dep_extra.iter().filter(|(n, _)| *n == d.name) {
                deps.push_str(&format!("  {lines}\n"));
            }
        }
        let provider = if self.spec.dual {
            DUAL_PROVIDER
        } else {
            AOS_PROVIDER
        };
        format!(
            r#"
[daemon]
state_dir = "{state}"
reconcile_interval = "0s"

{provider}

[stores.a]
kind = "file"
dir = "{dir}/a"

[stores.b]
kind = "file"
dir = "{dir}/b"

[notify.owner]
kind = "webhook"
url = "https://owner.invalid/hook"

[[keys]]
name = "{name}"
provider = "portal"
{key}

  [[keys.destinations]]
  store = "a"
  file = "billing.key"

  [[keys.destinations]]
  store = "b"
  file = "billing.key"
{deps}"#,
            state = self.state_dir().display(),
            dir = dir.display(),
            key = self.spec.key,
            provider = provider.replace("{dir}", &dir.display().to_string()),
        )
    }

    pub fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    pub fn engine(&self) -> &Arc<Engine> {
        self.engine.as_ref().expect("Fx::start() first")
    }

    pub fn portal(&self) -> &ScriptedProvider {
        match &**self.provider {
            Provider::Scripted(p) => p,
            _ => unreachable!("the fixture's provider is scripted"),
        }
    }

    pub fn store(&self, name: &str) -> &MemoryStore {
        match &**self.stores[name] {
            Store::Memory(s) => s,
            _ => unreachable!("the fixture's stores are in memory"),
        }
    }

    pub fn dependent(&self, name: &str) -> &DependentScript {
        &self.dependents[name]
    }

    /// The key's journal as written on disk.
    pub fn journal(&self) -> KeyJournal {
        let path = self.state_dir().join("journal").join(format!("{KEY}.json"));
        match std::fs::read(&path) {
            Ok(bytes) => keyrotd::journal::parse(&bytes).expect("journal parses"),
            Err(_) => KeyJournal::new(KEY),
        }
    }

    pub fn write_journal(&self, j: &KeyJournal) {
        let dir = self.state_dir().join("journal");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("{KEY}.json")),
            serde_json::to_vec_pretty(j).unwrap(),
        )
        .unwrap();
    }

    pub fn holds(&self, store: &str) -> Holds {
        match self.store(store).get(&target().to_string()) {
            None => Holds::Nothing,
            Some(v) if v == self.portal().secret() => Holds::Active,
            Some(v) if v == self.original => Holds::Original,
            Some(_) => Holds::Other,
        }
    }

    pub fn request(&self) -> RotationRequest {
        RotationRequest::new(Trigger::Manual, "test", "tester")
    }

    /// A manual rotation, run to its end.
    pub async fn rotate(&self) -> RunResult {
        self.rotate_with(self.request()).await
    }

    pub async fn rotate_with(&self, req: RotationRequest) -> RunResult {
        match self.engine().rotate(KEY, req).await {
            Ok((_, result)) => result,
            Err(e) => panic!("rotation refused: {e}"),
        }
    }

    /// Waits (virtual time, bounded) until no actor holds the key and background work settled.
    pub async fn settle(&self) {
        let until = tokio::time::Instant::now() + Duration::from_secs(3600);
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if !self.engine().is_busy(KEY) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if !self.engine().is_busy(KEY) {
                    return;
                }
            }
            assert!(tokio::time::Instant::now() < until, "the key never settled");
        }
    }

    /// The outcome of the key's last finished rotation.
    pub fn last_outcome(&self) -> Option<Outcome> {
        self.engine()
            .key_views()
            .into_iter()
            .find(|k| k.name == KEY)
            .and_then(|k| k.last_outcome)
    }

    /// The value of one sample of `name` with all of `labels` (0 when absent).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics
            .encode()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, rest) = series.split_once('{').unwrap_or((series, ""));
                (n == name
                    && labels
                        .iter()
                        .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())
                .flatten()
            })
            .sum()
    }

    /// Every output a secret could leak into: the state dir's files, the metrics, the key views,
    /// every rotation record and every notification.
    pub fn outputs(&self) -> String {
        let mut out = self.metrics.encode();
        out.push_str(&serde_json::to_string(&self.engine().key_views()).unwrap());
        out.push_str(&serde_json::to_string(&self.sent()).unwrap());
        for entry in walk(&self.state_dir()) {
            out.push_str(&String::from_utf8_lossy(
                &std::fs::read(entry).unwrap_or_default(),
            ));
        }
        out
    }

    /// Every secret the portal ever issued.
    pub fn secrets(&self) -> Vec<String> {
        self.portal().issued()
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                files.extend(walk(&p));
            } else {
                files.push(p);
            }
        }
    }
    files
}

const AOS_PROVIDER: &str = r#"[providers.portal]
kind = "aos"
base_url = "https://portal.invalid"
management_token = { file = "{dir}/token" }
account_id = "acct""#;

const DUAL_PROVIDER: &str = r#"[providers.portal]
kind = "http"
overlap = "dual"
account_id = "acct"
create = { url = "https://portal.invalid/v1/keys", secret_pointer = "/secret", key_id_pointer = "/id" }
revoke = { url = "https://portal.invalid/v1/keys/{key_id}" }
list = { url = "https://portal.invalid/v1/keys", ids_pointer = "/data" }
status = { url = "https://portal.invalid/v1/keys/current", key_id_pointer = "/id" }
auth_check = { url = "https://portal.invalid/v1/auth/check", header = "X-Api-Key" }"#;

pub fn target() -> DestinationTarget {
    DestinationTarget::File {
        file: "billing.key".into(),
    }
}

pub fn fp(secret: &str) -> String {
    fingerprint(&Secret::from(secret.to_string()))
}

/// The journal phase names used in tables.
pub fn phase_name(p: Phase) -> &'static str {
    keyrotd::journal::phase_name(p)
}
