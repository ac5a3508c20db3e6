//! The soak's world: about twenty keys, each on a portal simulator of its own (an AOS account has one
//! key), with destinations in OpenBao, moto and a file store, and one dependent simulator per key whose
//! signed HTTP reload hook keyrotd calls. The layout is fixed by each key's index, so a seed only
//! changes the faults, never the world; the config keyrotd runs with comes in a few variants that a
//! SIGHUP switches between.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::support::bao::Bao;
use crate::support::daemon::Daemon;
use crate::support::moto::{Moto, REGION, aws_env};
use crate::support::sim::{Dependent, DependentOptions, DependentSource, Portal};

pub const ADMIN_TOKEN: &str = "soak-admin-token-5d1e8a";
pub const HOOK_KEY: &str = "soak-hook-signing-key-c7f2";
/// Every key's destination field (Vault field, AWS JSON field).
const FIELD: &str = "api_key";
/// The portal's request timeout: a regenerate delayed longer than this is lost in transit.
pub const PROVIDER_TIMEOUT_S: u64 = 4;
pub const STORE_DEADLINE_S: u64 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Vault,
    Aws,
    File,
}

impl StoreKind {
    /// The store's name in the config.
    pub fn store(self) -> &'static str {
        match self {
            StoreKind::Vault => "vault",
            StoreKind::Aws => "aws",
            StoreKind::File => "local",
        }
    }
}

/// When a key is due.
#[derive(Clone, Copy, Debug)]
pub enum When {
    /// A 6-field cron: every `period` seconds from second `offset` of each minute.
    Cron { period: u32, offset: u32 },
    /// `max_age` in seconds (the portal's Last Rotated decides).
    MaxAge(u32),
}

/// One key of the world, fixed by its index.
#[derive(Clone, Debug)]
pub struct KeyPlan {
    pub name: String,
    pub stores: Vec<StoreKind>,
    /// Where its dependent reads the key.
    pub source: StoreKind,
    pub when: When,
    pub budget: u32,
    pub watch: bool,
    pub auto_recover: bool,
}

impl KeyPlan {
    /// Key `i` of a soak lasting `minutes`. Every third key has a budget it spends before the end, so
    /// the budget is tested and not only respected.
    pub fn new(i: usize, minutes: u64) -> KeyPlan {
        use StoreKind::*;
        let stores = match i % 4 {
            0 => vec![Vault, Aws, File],
            1 => vec![Vault, File],
            2 => vec![Aws, File],
            _ => vec![Vault, Aws],
        };
        let source = stores[(i / 4) % stores.len()];
        let period = 5 + (i % 6) as u32;
        let when = if i % 10 == 9 {
            When::MaxAge(period * 3)
        } else {
            When::Cron {
                period,
                offset: (i as u32 * 3) % period,
            }
        };
        // Scheduled runs over the whole soak, and 60% of them for the keys that must spend their budget.
        let runs = (minutes * 60 / u64::from(period)) as u32;
        let budget = if i.is_multiple_of(3) {
            (runs * 3 / 5).max(6)
        } else {
            10_000
        };
        KeyPlan {
            name: format!("k{i:02}"),
            stores,
            source,
            when,
            budget,
            watch: i % 5 == 1,
            auto_recover: i != 7,
        }
    }

    pub fn has(&self, kind: StoreKind) -> bool {
        self.stores.contains(&kind)
    }

    /// The Vault path and the AWS secret id.
    pub fn target(&self) -> String {
        format!("soak/{}", self.name)
    }

    pub fn file_name(&self) -> String {
        format!("{}.key", self.name)
    }

    fn portal_env(&self) -> String {
        format!("KEYROTD_SOAK_PORTAL_{}", self.name.to_uppercase())
    }
}

/// One key's outside world.
pub struct KeyWorld {
    pub plan: KeyPlan,
    pub portal: Portal,
    pub dependent: Dependent,
}

/// Which config keyrotd is told to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The world as planned.
    Base,
    /// Other schedules, and the last key removed (a key may be removed mid-rotation).
    Changed,
    /// A config the loader refuses: a reload keeps the one in force.
    Invalid,
}

pub struct World {
    pub bao: Bao,
    pub moto: Moto,
    pub keys: Vec<KeyWorld>,
    pub dir: tempfile::TempDir,
    daemons_started: std::sync::atomic::AtomicUsize,
}

impl World {
    /// Starts OpenBao, moto, a portal per key, seeds every destination with its portal's first key (so
    /// keyrotd adopts it), and starts the dependents, each holding that key.
    pub async fn start(plans: Vec<KeyPlan>) -> World {
        let bao = Bao::start();
        let moto = Moto::start();
        // SOAK_KEEP=1 keeps the logs, journals and audit log for a look after the run.
        let dir = tempfile::Builder::new()
            .prefix("keyrotd-soak-")
            .disable_cleanup(std::env::var_os("SOAK_KEEP").is_some())
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("keys")).expect("keys dir");
        let mut keys = Vec::new();
        for plan in plans {
            let portal = Portal::start();
            seed(&bao, &moto, &dir.path().join("keys"), &plan, &portal).await;
            let dependent = Dependent::start_with(
                portal.url(),
                dependent_options(&bao, &moto, dir.path(), &plan),
            );
            keys.push(KeyWorld {
                plan,
                portal,
                dependent,
            });
        }
        World {
            bao,
            moto,
            keys,
            dir,
            daemons_started: Default::default(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("keyrotd.toml")
    }

    /// Writes the config of `variant` where keyrotd reads it (atomically: a restart never reads half
    /// a file).
    pub fn write_config(&self, variant: Variant) {
        let text = self.config(variant);
        let tmp = self.dir.path().join(".keyrotd.toml.new");
        std::fs::write(&tmp, text).expect("write the config");
        std::fs::rename(&tmp, self.config_path()).expect("install the config");
    }

    /// The keys a variant manages.
    pub fn managed(&self, variant: Variant) -> impl Iterator<Item = &KeyWorld> {
        let n = self.keys.len();
        let last_dropped = variant == Variant::Changed;
        self.keys
            .iter()
            .enumerate()
            .filter(move |(i, _)| !(last_dropped && *i == n - 1))
            .map(|(_, k)| k)
    }

    pub fn config(&self, variant: Variant) -> String {
        let mut text = self.daemon_and_stores();
        for k in self.managed(variant) {
            text.push_str(&provider_section(k));
        }
        for k in self.managed(variant) {
            text.push_str(&key_section(k, variant == Variant::Changed));
            text.push_str(&destinations(&k.plan));
            text.push_str(&dependent_section(k));
        }
        if variant == Variant::Invalid {
            text.push_str("\n[stores.broken]\nkind = \"vualt\"\n");
        }
        text
    }

    fn daemon_and_stores(&self) -> String {
        format!(
            r#"[daemon]
state_dir = "{state}"
listen = "127.0.0.1:0"
admin_token = {{ env = "KEYROTD_SOAK_ADMIN_TOKEN" }}
reconcile_interval = "15s"
log_format = "text"

[stores.vault]
kind = "vault"
address = "{bao}"
token = {{ env = "KEYROTD_SOAK_VAULT_TOKEN" }}

[stores.aws]
kind = "aws"
region = "{REGION}"
endpoint_url = "{moto}"

[stores.local]
kind = "file"
dir = "{keys}"
"#,
            state = self.state_dir().display(),
            bao = self.bao.addr,
            moto = self.moto.endpoint,
            keys = self.keys_dir().display(),
        )
    }

    /// keyrotd's environment: AWS, and every credential the config refers to.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = aws_env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.extend(self.credentials());
        env.push(("RUST_LOG".into(), "info,keyrotd=debug".into()));
        env
    }

    /// Every credential keyrotd is given, by the variable that carries it.
    pub fn credentials(&self) -> Vec<(String, String)> {
        let mut c: Vec<(String, String)> = self
            .keys
            .iter()
            .map(|k| (k.plan.portal_env(), k.portal.token().to_string()))
            .collect();
        c.push((
            "KEYROTD_SOAK_VAULT_TOKEN".into(),
            self.bao.root_token.clone(),
        ));
        c.push(("KEYROTD_SOAK_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()));
        c.push(("KEYROTD_SOAK_HOOK_KEY".into(), HOOK_KEY.into()));
        c
    }

    /// Starts `keyrotd run` on the config file as it is now; returns once its admin API listens.
    pub async fn spawn_daemon(&self) -> Daemon {
        let n = self
            .daemons_started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = self.dir.path().join(format!("daemon-{n}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd"));
        cmd.arg("-c")
            .arg(self.config_path())
            .arg("run")
            .envs(self.env());
        Daemon::spawn(cmd, &log).await
    }

    /// Every daemon log written so far.
    pub fn daemon_logs(&self) -> Vec<PathBuf> {
        let n = self
            .daemons_started
            .load(std::sync::atomic::Ordering::SeqCst);
        (0..n)
            .map(|i| self.dir.path().join(format!("daemon-{i}.log")))
            .collect()
    }

    /// Fingerprints of what each of the key's destinations holds (read directly, past the gates);
    /// `None` when empty or unreadable.
    pub async fn held(&self, plan: &KeyPlan) -> Vec<(StoreKind, Option<String>)> {
        let mut out = Vec::new();
        for kind in &plan.stores {
            let value = match kind {
                StoreKind::Vault => self.bao.kv_field(&plan.target(), FIELD).await,
                StoreKind::Aws => self.aws_field(&plan.target()).await,
                StoreKind::File => {
                    std::fs::read_to_string(self.keys_dir().join(plan.file_name())).ok()
                }
            };
            out.push((*kind, value.map(|v| crate::support::stack::fp(&v))));
        }
        out
    }

    async fn aws_field(&self, secret_id: &str) -> Option<String> {
        let out = self
            .moto
            .client()
            .await
            .get_secret_value()
            .secret_id(secret_id)
            .send()
            .await
            .ok()?;
        let v: Value = serde_json::from_str(out.secret_string()?).ok()?;
        v[FIELD].as_str().map(String::from)
    }

    /// The key's journal as JSON; `Null` when there is none.
    pub fn journal(&self, key: &str) -> Value {
        std::fs::read(self.state_dir().join("journal").join(format!("{key}.json")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }
}

/// Writes the portal's first key into every destination of `plan`, as an operator would before
/// keyrotd's first start.
async fn seed(bao: &Bao, moto: &Moto, keys_dir: &Path, plan: &KeyPlan, portal: &Portal) {
    let secret = portal.current_secret().await;
    let object = json!({ FIELD: secret }).to_string();
    for kind in &plan.stores {
        match kind {
            StoreKind::Vault => {
                bao.kv_put(&plan.target(), json!({ FIELD: secret })).await;
            }
            StoreKind::Aws => moto.create_secret(&plan.target(), &object).await,
            StoreKind::File => {
                std::fs::write(keys_dir.join(plan.file_name()), &secret).expect("seed the key file")
            }
        }
    }
}

fn dependent_options(bao: &Bao, moto: &Moto, dir: &Path, plan: &KeyPlan) -> DependentOptions {
    let source = match plan.source {
        StoreKind::Vault => DependentSource::Vault {
            addr: bao.addr.clone(),
            mount: "secret".into(),
            path: plan.target(),
            field: FIELD.into(),
            token: bao.root_token.clone(),
        },
        StoreKind::Aws => DependentSource::Aws {
            endpoint: moto.endpoint.clone(),
            secret_id: plan.target(),
            field: Some(FIELD.into()),
            region: REGION.into(),
            access_key_id: "test".into(),
            secret_access_key: "test".into(),
        },
        StoreKind::File => DependentSource::File(dir.join("keys").join(plan.file_name())),
    };
    let mut o = DependentOptions::new(source);
    o.signing_key = Some(HOOK_KEY.into());
    o.probe_interval = std::time::Duration::from_secs(2);
    o
}

fn provider_section(k: &KeyWorld) -> String {
    format!(
        "[providers.p-{name}]\nkind = \"aos\"\nbase_url = \"{url}\"\nmanagement_token = {{ env = \"{env}\" }}\naccount_id = \"acct_42\"\ntimeout = \"{PROVIDER_TIMEOUT_S}s\"\n\n",
        name = k.plan.name,
        url = k.portal.url(),
        env = k.plan.portal_env(),
    )
}

/// The `[[keys]]` table; `changed` moves every schedule (another period and offset).
fn key_section(k: &KeyWorld, changed: bool) -> String {
    let p = &k.plan;
    let when = match p.when {
        When::Cron { period, offset } => {
            let (period, offset) = if changed {
                (period + 2, (offset + 1) % (period + 2))
            } else {
                (period, offset)
            };
            format!("schedule = \"{offset}/{period} * * * * *\"")
        }
        When::MaxAge(s) => format!("max_age = \"{}s\"", if changed { s + 5 } else { s }),
    };
    let watch = if p.watch {
        "watch = \"15s\"\nwatch_interval = \"3s\""
    } else {
        "watch = \"0s\""
    };
    format!(
        "[[keys]]\nname = \"{name}\"\nprovider = \"p-{name}\"\n{when}\n{watch}\nstore_deadline = \"{STORE_DEADLINE_S}s\"\nauto_recover = {ar}\nmax_regenerations_per_day = {budget}\n",
        name = p.name,
        ar = p.auto_recover,
        budget = p.budget,
    )
}

fn destinations(p: &KeyPlan) -> String {
    let mut text = String::new();
    for kind in &p.stores {
        let target = match kind {
            StoreKind::Vault => format!("path = \"{}\"\n  field = \"{FIELD}\"", p.target()),
            StoreKind::Aws => format!("secret_id = \"{}\"\n  field = \"{FIELD}\"", p.target()),
            StoreKind::File => format!("file = \"{}\"", p.file_name()),
        };
        text.push_str(&format!(
            "\n  [[keys.destinations]]\n  store = \"{}\"\n  {target}\n",
            kind.store()
        ));
    }
    text
}

fn dependent_section(k: &KeyWorld) -> String {
    format!(
        r#"
  [[keys.dependents]]
  name = "svc"
  reads_from = ["{store}"]
  verify = {{ url = "{verify}", expect_status = 200, timeout = "2s" }}
  reload = {{ url = "{reload}", timeout = "3s", signing_key = {{ env = "KEYROTD_SOAK_HOOK_KEY" }} }}

"#,
        store = k.plan.source.store(),
        verify = k.dependent.verify_url(),
        reload = k.dependent.reload_url(),
    )
}
