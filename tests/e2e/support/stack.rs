//! A whole world for end-to-end tests: OpenBao, moto, the portal simulator and two dependents (one
//! reading the key from OpenBao, one from AWS), a keyrotd config wired to them, and the real `keyrotd`
//! binary started as a daemon (`keyrotd run`) or as a command.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::bao::Bao;
use super::daemon::Daemon;
use super::eventually;
use super::moto::{Moto, REGION, aws_env};
use super::sim::{Dependent, DependentOptions, DependentSource, Portal};

pub const KEY: &str = "billing";
pub const VAULT_PATH: &str = "apps/billing";
pub const AWS_SECRET: &str = "prod/billing";
pub const ADMIN_TOKEN: &str = "test-admin-token-7f3a";
pub const HOOK_KEY: &str = "test-hook-signing-key-91c2";

/// Knobs of the generated config; `Default` is a key without schedule (manual), fast watch, short
/// deadlines, two dependents with verify and signed HTTP reload hooks.
#[derive(Clone)]
pub struct Options {
    pub schedule: Option<String>,
    pub max_age: Option<String>,
    pub watch: String,
    pub watch_interval: String,
    pub store_deadline: String,
    pub reconcile_interval: String,
    pub max_rerotations: u32,
    pub max_regenerations_per_day: u32,
    pub auto_recover: bool,
    pub with_aws: bool,
    pub with_file: bool,
    pub log_format: String,
    /// `[daemon] paused`.
    pub paused: bool,
    /// Extra TOML appended to the `[[keys]]` table (before destinations), e.g. `jitter = "1s"`.
    pub key_extra: String,
    /// `retries` of the two HTTP reload hooks (keyrotd's default when `None`).
    pub hook_retries: Option<u32>,
    /// A command hook dependent (argv), in addition to the two HTTP ones.
    pub command_hook: Option<Vec<String>>,
    pub admin_token: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            schedule: None,
            max_age: None,
            watch: "0s".into(),
            watch_interval: "1s".into(),
            store_deadline: "10s".into(),
            reconcile_interval: "0s".into(),
            max_rerotations: 3,
            max_regenerations_per_day: 20,
            auto_recover: true,
            with_aws: true,
            with_file: true,
            log_format: "text".into(),
            paused: false,
            key_extra: String::new(),
            hook_retries: None,
            command_hook: None,
            admin_token: true,
        }
    }
}

/// Every outside component a rotation touches, running.
pub struct Stack {
    pub bao: Bao,
    pub moto: Moto,
    pub portal: Portal,
    pub dep_vault: Dependent,
    pub dep_aws: Dependent,
    pub dir: tempfile::TempDir,
    daemons_started: AtomicUsize,
}

impl Stack {
    /// Starts OpenBao, moto (with the AWS secret created), the portal and the two dependents.
    pub async fn start() -> Stack {
        let bao = Bao::start();
        let moto = Moto::start();
        moto.create_secret(AWS_SECRET, "{}").await;
        let portal = Portal::start();
        let dep_vault = Dependent::start_with(
            portal.url(),
            signed(DependentSource::Vault {
                addr: bao.addr.clone(),
                mount: "secret".into(),
                path: VAULT_PATH.into(),
                field: "api_key".into(),
                token: bao.root_token.clone(),
            }),
        );
        let dep_aws = Dependent::start_with(
            portal.url(),
            signed(DependentSource::Aws {
                endpoint: moto.endpoint.clone(),
                secret_id: AWS_SECRET.into(),
                field: Some("api_key".into()),
                region: REGION.into(),
                access_key_id: "test".into(),
                secret_access_key: "test".into(),
            }),
        );
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("keys")).expect("keys dir");
        Stack {
            bao,
            moto,
            portal,
            dep_vault,
            dep_aws,
            dir,
            daemons_started: AtomicUsize::new(0),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The file store's directory.
    pub fn keys_dir(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    pub fn key_file(&self) -> PathBuf {
        self.keys_dir().join("billing.key")
    }

    /// The keyrotd config for this stack. The admin API listens on port 0: each daemon binds a free
    /// port of its own, which [`Daemon`] reads back.
    pub fn config(&self, o: &Options) -> String {
        let mut text = format!(
            "{}\n{}\n{}\n{}",
            self.daemon_section(o),
            self.outside_sections(),
            key_section(o),
            destination_sections(o),
        );
        for (name, dep, store) in [
            ("worker", &self.dep_vault, "vault"),
            ("edge", &self.dep_aws, "aws"),
        ] {
            if store == "aws" && !o.with_aws {
                continue;
            }
            let retries = o
                .hook_retries
                .map_or(String::new(), |r| format!(", retries = {r}"));
            text.push_str(&format!(
                r#"
  [[keys.dependents]]
  name = "{name}"
  reads_from = ["{store}"]
  verify = {{ url = "{verify}", expect_status = 200, timeout = "2s" }}
  reload = {{ url = "{reload}", timeout = "3s", signing_key = {{ env = "KEYROTD_TEST_HOOK_KEY" }}{retries} }}
"#,
                verify = dep.verify_url(),
                reload = dep.reload_url(),
            ));
        }
        if let Some(cmd) = &o.command_hook {
            let argv: Vec<String> = cmd.iter().map(|a| format!("{a:?}")).collect();
            text.push_str(&format!(
                "\n  [[keys.dependents]]\n  name = \"script\"\n  reads_from = [\"local\"]\n  reload = {{ command = [{}], timeout = \"5s\" }}\n",
                argv.join(", ")
            ));
        }
        text
    }

    fn daemon_section(&self, o: &Options) -> String {
        let admin = if o.admin_token {
            "admin_token = { env = \"KEYROTD_TEST_ADMIN_TOKEN\" }"
        } else {
            ""
        };
        format!(
            "[daemon]\nstate_dir = \"{state}\"\nlisten = \"127.0.0.1:0\"\n{admin}\nreconcile_interval = \"{reconcile}\"\nlog_format = \"{log}\"\npaused = {paused}\n",
            state = self.state_dir().display(),
            reconcile = o.reconcile_interval,
            log = o.log_format,
            paused = o.paused,
        )
    }

    /// The provider and the three stores.
    fn outside_sections(&self) -> String {
        format!(
            r#"[providers.portal]
kind = "aos"
base_url = "{portal}"
management_token = {{ env = "KEYROTD_TEST_AOS_TOKEN" }}
account_id = "acct_42"
timeout = "5s"

[stores.vault]
kind = "vault"
address = "{bao}"
token = {{ env = "KEYROTD_TEST_VAULT_TOKEN" }}

[stores.aws]
kind = "aws"
region = "{REGION}"
endpoint_url = "{moto}"

[stores.local]
kind = "file"
dir = "{keys}"
"#,
            portal = self.portal.url(),
            bao = self.bao.addr,
            moto = self.moto.endpoint,
            keys = self.keys_dir().display(),
        )
    }

    /// Writes the config for these options and returns its path.
    pub fn write_config(&self, o: &Options) -> PathBuf {
        self.write_config_text(&self.config(o))
    }

    /// Writes `text` as the config and returns its path.
    pub fn write_config_text(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("keyrotd.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// The environment keyrotd needs for this stack (credentials, AWS).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = aws_env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push((
            "KEYROTD_TEST_AOS_TOKEN".into(),
            self.portal.token().to_string(),
        ));
        env.push((
            "KEYROTD_TEST_VAULT_TOKEN".into(),
            self.bao.root_token.clone(),
        ));
        env.push(("KEYROTD_TEST_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()));
        env.push(("KEYROTD_TEST_HOOK_KEY".into(), HOOK_KEY.into()));
        env.push(("RUST_LOG".into(), "info,keyrotd=debug".into()));
        env
    }

    /// Runs a `keyrotd` command to completion with no daemon to hand over to (the config's admin
    /// port is 0): (exit code, stdout, stderr).
    pub fn command(&self, config: &Path, args: &[&str]) -> (i32, String, String) {
        self.run_command(config, args, &[])
    }

    /// Runs a `keyrotd` command that finds `daemon` where the config says the daemon listens.
    pub fn command_via(
        &self,
        daemon: &Daemon,
        config: &Path,
        args: &[&str],
    ) -> (i32, String, String) {
        self.run_command(
            config,
            args,
            &[("KEYROTD__DAEMON__LISTEN", daemon.addr().as_str())],
        )
    }

    /// Runs a `keyrotd` command (no daemon to hand over to) whose clock reads `at` when it starts,
    /// e.g. `"2026-03-02 10:00:00"` (UTC; see [`fake_clock`]).
    pub fn command_at(&self, at: &str, config: &Path, args: &[&str]) -> (i32, String, String) {
        let clock = fake_clock(&format!("@{at}"));
        let env: Vec<(&str, &str)> = clock.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.run_command(config, args, &env)
    }

    fn run_command(
        &self,
        config: &Path,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
            .arg("-c")
            .arg(config)
            .args(args)
            .envs(self.env())
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run keyrotd");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts `keyrotd run` and waits until `/readyz` answers 200.
    pub async fn daemon(&self, config: &Path) -> Daemon {
        self.daemon_with_env(config, &[]).await
    }

    pub async fn daemon_with_env(&self, config: &Path, extra: &[(&str, &str)]) -> Daemon {
        let d = self.spawn_daemon(config, extra).await;
        d.wait_ready(Duration::from_secs(60)).await;
        d
    }

    /// Starts `keyrotd run` with a clock that reads `at` when it starts (see [`fake_clock`]) and waits
    /// until it is ready.
    pub async fn daemon_at(&self, at: &str, config: &Path) -> Daemon {
        self.daemon_with_clock(&format!("@{at}"), config).await
    }

    async fn daemon_with_clock(&self, faketime: &str, config: &Path) -> Daemon {
        let clock = fake_clock(faketime);
        let env: Vec<(&str, &str)> = clock.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.daemon_with_env(config, &env).await
    }

    /// Starts `keyrotd run` and waits until its admin API listens (not until it is ready). Its log
    /// is `daemon-N.log` in the stack's directory.
    pub async fn spawn_daemon(&self, config: &Path, extra: &[(&str, &str)]) -> Daemon {
        let n = self.daemons_started.fetch_add(1, Ordering::SeqCst);
        let log = self.dir.path().join(format!("daemon-{n}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd"));
        cmd.arg("-c")
            .arg(config)
            .arg("run")
            .envs(self.env())
            .envs(extra.iter().copied());
        Daemon::spawn(cmd, &log).await
    }

    /// Every daemon log written in this stack.
    pub fn daemon_logs(&self) -> Vec<PathBuf> {
        (0..self.daemons_started.load(Ordering::SeqCst))
            .map(|n| self.dir.path().join(format!("daemon-{n}.log")))
            .collect()
    }

    /// What every destination holds now: fingerprints of (OpenBao, AWS, file), `None` when empty or
    /// unreadable.
    pub async fn destination_fingerprints(&self) -> Vec<Option<String>> {
        let file = std::fs::read(self.key_file())
            .ok()
            .map(|b| keyrotd::secret::fingerprint_bytes(&b));
        vec![
            self.vault_fingerprint().await,
            self.aws_fingerprint().await,
            file,
        ]
    }

    /// The fingerprint of the key OpenBao holds; `None` when there is none (read directly, so it
    /// works while OpenBao is down for keyrotd).
    pub async fn vault_fingerprint(&self) -> Option<String> {
        self.bao
            .kv_field(VAULT_PATH, "api_key")
            .await
            .as_deref()
            .map(fp)
    }

    /// The fingerprint of the key AWS holds (read directly).
    pub async fn aws_fingerprint(&self) -> Option<String> {
        let out = self
            .moto
            .client()
            .await
            .get_secret_value()
            .secret_id(AWS_SECRET)
            .send()
            .await
            .ok()?;
        let v: Value = serde_json::from_str(out.secret_string()?).ok()?;
        v["api_key"].as_str().map(fp)
    }

    /// The consistent end state, asserted with a message for each part.
    pub async fn assert_consistent(&self, o: &Options) {
        let state = self.portal.state().await;
        let on = [true, o.with_aws, o.with_file];
        let held: Vec<Option<String>> = self
            .destination_fingerprints()
            .await
            .into_iter()
            .zip(on)
            .filter(|(_, on)| *on)
            .map(|(f, _)| f)
            .collect();
        let expected = vec![Some(state.fingerprint.clone()); held.len()];
        assert_eq!(
            held, expected,
            "every destination holds the portal's active key"
        );
        assert_eq!(
            self.dep_vault.verify().await,
            200,
            "the vault-reading dependent authenticates"
        );
        if o.with_aws {
            assert_eq!(
                self.dep_aws.verify().await,
                200,
                "the aws-reading dependent authenticates"
            );
        }
    }

    /// The key's journal as JSON (phase, ids, budget); `Null` before the first one is written.
    pub fn journal(&self) -> Value {
        let path = self.state_dir().join("journal").join(format!("{KEY}.json"));
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    /// The journal's phase, e.g. "idle", "regenerating".
    pub fn journal_phase(&self) -> String {
        self.journal()["phase"].as_str().unwrap_or("").to_string()
    }

    /// How many regenerations the journal's budget holds.
    pub fn journal_regenerations(&self) -> usize {
        self.journal()["regenerations"]
            .as_array()
            .map_or(0, Vec::len)
    }

    /// Every audit record.
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state_dir().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Is there an audit record of `event` whose `field` is `value`?
    pub fn audit_has(&self, event: &str, field: &str, value: &str) -> bool {
        self.audit()
            .iter()
            .any(|r| r["event"] == event && r[field] == value)
    }

    /// Writes `secret` into every destination (Vault, AWS, file) as an operator would before keyrotd
    /// first starts.
    pub async fn seed_destinations(&self, secret: &str) {
        self.bao
            .kv_put(VAULT_PATH, serde_json::json!({ "api_key": secret }))
            .await;
        self.moto
            .client()
            .await
            .put_secret_value()
            .secret_id(AWS_SECRET)
            .secret_string(serde_json::json!({ "api_key": secret }).to_string())
            .send()
            .await
            .expect("moto PutSecretValue");
        std::fs::write(self.key_file(), secret).expect("write key file");
    }

    /// How many times the portal regenerated (out-of-band rotations included).
    pub async fn regenerations(&self) -> u64 {
        self.portal.state().await.regenerations
    }

    /// Waits until `check` holds; see [`eventually`].
    pub async fn eventually<F, Fut>(&self, timeout: Duration, what: &str, check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        eventually(timeout, what, check).await
    }
}

/// The `[[keys]]` table without destinations and dependents.
fn key_section(o: &Options) -> String {
    let mut when = String::new();
    if let Some(s) = &o.schedule {
        when.push_str(&format!("schedule = {s:?}\n"));
    }
    if let Some(m) = &o.max_age {
        when.push_str(&format!("max_age = {m:?}\n"));
    }
    format!(
        "[[keys]]\nname = \"{KEY}\"\nprovider = \"portal\"\n{when}watch = \"{}\"\nwatch_interval = \"{}\"\nstore_deadline = \"{}\"\nauto_recover = {}\nmax_rerotations = {}\nmax_regenerations_per_day = {}\n{}\n",
        o.watch,
        o.watch_interval,
        o.store_deadline,
        o.auto_recover,
        o.max_rerotations,
        o.max_regenerations_per_day,
        o.key_extra,
    )
}

fn destination_sections(o: &Options) -> String {
    let mut text = format!(
        "  [[keys.destinations]]\n  store = \"vault\"\n  path = \"{VAULT_PATH}\"\n  field = \"api_key\"\n"
    );
    if o.with_aws {
        text.push_str(&format!(
            "\n  [[keys.destinations]]\n  store = \"aws\"\n  secret_id = \"{AWS_SECRET}\"\n  field = \"api_key\"\n"
        ));
    }
    if o.with_file {
        text.push_str("\n  [[keys.destinations]]\n  store = \"local\"\n  file = \"billing.key\"\n");
    }
    text
}

fn signed(source: DependentSource) -> DependentOptions {
    let mut o = DependentOptions::new(source);
    o.signing_key = Some(super::stack::HOOK_KEY.into());
    o.probe_interval = Duration::from_millis(500);
    // The stack's daemons may run on a fixed clock months from the real one (`daemon_at`), and the
    // dependents run on the real clock: their freshness check allows the difference. The 5-minute
    // default is proven by provider.rs's own signed dependent.
    o.max_signature_age = Some(Duration::from_secs(400 * 86_400));
    o
}

/// The environment that sets a keyrotd process's wall clock: `@YYYY-MM-DD HH:MM:SS` (UTC) to read that
/// instant when it starts, `+40d` to run 40 days ahead; either way it then runs on at the normal pace.
/// libfaketime (Debian package `faketime`, installed by scripts/install-tools.sh) is preloaded; only
/// the wall clock moves, the monotonic clock its timers run on is left alone. Tests of calendar rules
/// (windows, schedules, catch-up, max age, plans) use it, so that what they expect never depends on
/// the day or hour they run.
pub fn fake_clock(faketime: &str) -> [(&'static str, String); 4] {
    let lib = libfaketime();
    [
        ("LD_PRELOAD", lib),
        ("FAKETIME", faketime.to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        ("TZ", "UTC".to_string()),
    ]
}

/// Where Debian puts the thread-safe libfaketime (the directory is named after the architecture).
fn libfaketime() -> String {
    let dirs = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime"))
        .chain([PathBuf::from("/usr/lib/faketime")]);
    dirs.map(|d| d.join("libfaketimeMT.so.1"))
        .find(|lib| lib.exists())
        .map(|lib| lib.display().to_string())
        .expect("libfaketime is missing: install the Debian package faketime (scripts/install-tools.sh does)")
}

/// The fingerprint keyrotd shows for a secret.
pub fn fp(secret: &str) -> String {
    keyrotd::secret::fingerprint_bytes(secret.as_bytes())
}
