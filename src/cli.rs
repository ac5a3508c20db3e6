//! The command line: clap definitions and one function per command. Commands print for people on
//! stdout; errors and problems go to stderr; logs (tracing) go to stderr too.
//!
//! Exit codes ([`Exit`]): 0 success; 1 the operation failed (or a rotation ended `failed`/`aborted`);
//! 2 usage or configuration error (including an unreadable or invalid config file); 3 the rotation
//! finished `degraded`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chrono::Utc;
use clap::{Parser, Subcommand};

use crate::config::{
    self, Config, ConfigError, LogFormat, ProviderConfig, ReloadHook, StoreConfig, VaultAuth,
};
use crate::schedule;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/keyrotd/keyrotd.toml";

#[derive(Debug, Parser)]
#[command(
    name = "keyrotd",
    version,
    about = "Rotates production API keys without outages: regenerate at the portal, write every destination, reload dependents, watch.",
    after_help = "Examples:\n  keyrotd -c /etc/keyrotd/keyrotd.toml check-config\n  keyrotd plan --count 5\n  keyrotd plan billing-api --checklist\n  keyrotd rotate billing-api --reason \"key exposed in a log\"\n  keyrotd approve billing-api --reason \"change window open\"\n\nExit codes: 0 success, 1 operation failed, 2 usage or configuration error, 3 rotation degraded."
)]
pub struct Cli {
    /// The configuration file. `KEYROTD__SECTION__FIELD` variables override its fields.
    #[arg(
        short = 'c',
        long = "config",
        global = true,
        env = "KEYROTD_CONFIG",
        default_value = DEFAULT_CONFIG,
        value_name = "PATH"
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: recovery, scheduler, reconcile loop, admin API.
    #[command(
        after_help = "Example:\n  keyrotd -c /etc/keyrotd/keyrotd.toml run\n\nUnder systemd: Type=notify; SIGHUP reloads the configuration, SIGTERM shuts down gracefully."
    )]
    Run,

    /// Load and validate the configuration; print a summary, warnings and every problem.
    #[command(
        after_help = "Example:\n  keyrotd -c ./keyrotd.toml check-config\n\nOn success prints a summary and any warnings on stdout and exits 0. Otherwise prints every\nproblem on stderr, one per line as `field.path: what is wrong`, and exits 2 (also when the file\ncannot be read)."
    )]
    CheckConfig,

    /// Print the next rotation times of each key (window and time zone applied), its owner and
    /// whether it needs approval; with --checklist, one key's rotation checklist.
    #[command(
        after_help = "Examples:\n  keyrotd plan --count 5\n  keyrotd plan billing-api --checklist\n  keyrotd plan billing-api --checklist --json\n\nThe checklist: before (destinations, dependents with their reload and verify, owner, approval),\nduring (the invalidation window of the last rotations), after (probes, reconcile, alerts, notifications)."
    )]
    Plan {
        /// How many upcoming rotations per key.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
        count: u32,
        /// Only this key (required with --checklist).
        key: Option<String>,
        /// The key's before/during/after rotation checklist, from the configuration and its journal.
        #[arg(long, requires = "key")]
        checklist: bool,
        /// The checklist as JSON.
        #[arg(long, requires = "checklist")]
        json: bool,
    },

    /// Per key: the portal's metadata, what each destination holds, drift, last outcome, next rotation.
    #[command(after_help = "Examples:\n  keyrotd status\n  keyrotd status --json billing-api")]
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Only this key.
        key: Option<String>,
    },

    /// Rotate a key now (through the running daemon if one answers, else in this process).
    #[command(
        after_help = "Examples:\n  keyrotd rotate billing-api --reason \"key exposed in a log\"\n  keyrotd rotate billing-api --reason \"test\" --dry-run"
    )]
    Rotate {
        /// The key's name, as in `[[keys]] name`.
        key: String,
        /// Why; recorded in the audit log and sent to the portal.
        #[arg(long)]
        reason: String,
        /// Rotate even when paused or outside the key's window.
        #[arg(long)]
        force: bool,
        /// With --force: rotate when the provider passes preflight and at least one destination is
        /// writable (an exposed key must die even while a store is down). The outcome is degraded and
        /// the other destinations are filled when they come back.
        #[arg(long, requires = "force")]
        allow_partial: bool,
        /// Run preflight only and print what would happen.
        #[arg(long)]
        dry_run: bool,
        /// Stay through the watch period and print each probe.
        #[arg(long)]
        watch: bool,
    },

    /// Approve the rotation of a key that waits for an approval: it runs now (through the running
    /// daemon if one answers, else in this process).
    #[command(
        after_help = "Examples:\n  keyrotd approve billing-api --reason \"change window open, owner present\"\n  keyrotd approve billing-api --as alice@ops\n\nThe approver (--as, default user@host) and the reason go into the audit log. Exits with the\nrotation's outcome, like `keyrotd rotate`; 1 when nothing waits or its time is up."
    )]
    Approve {
        /// The key's name, as in `[[keys]] name`.
        key: String,
        /// Why; recorded in the audit log.
        #[arg(long, default_value = "approved")]
        reason: String,
        /// Who approves (default: $SUDO_USER or $USER @ the host name).
        #[arg(long = "as", value_name = "NAME")]
        approver: Option<String>,
    },
}

/// How a command ended; [`From<Exit> for ExitCode`] gives the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0
    Success,
    /// 1: the operation failed (or the rotation's outcome was `failed`/`aborted`).
    Failed,
    /// 2: usage or configuration error.
    Usage,
    /// 3: the rotation finished `degraded`.
    Degraded,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::Degraded => 3,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

/// A usage or configuration error: its message is printed and the process exits 2. Any other error
/// a command returns exits 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs the parsed command. `init_tracing` is called exactly once, with the log format to use (`run`
/// takes it from the configuration; the other commands log as text).
pub fn execute(cli: Cli, init_tracing: fn(LogFormat)) -> Exit {
    let result = match cli.command {
        Command::Run => run(&cli.config, init_tracing),
        command => {
            init_tracing(LogFormat::Text);
            match command {
                Command::Run => unreachable!("handled above"),
                Command::CheckConfig => check_config(&cli.config),
                Command::Plan {
                    count,
                    key,
                    checklist,
                    json,
                } => plan(&cli.config, count as usize, key.as_deref(), checklist, json),
                Command::Status { json, key } => status(&cli.config, json, key.as_deref()),
                Command::Approve {
                    key,
                    reason,
                    approver,
                } => approve(
                    &cli.config,
                    crate::commands::ApproveArgs {
                        key,
                        reason,
                        by: approver,
                    },
                ),
                Command::Rotate {
                    key,
                    reason,
                    force,
                    allow_partial,
                    dry_run,
                    watch,
                } => rotate(
                    &cli.config,
                    crate::commands::RotateArgs {
                        key,
                        reason,
                        force,
                        dry_run,
                        watch,
                        allow_partial,
                    },
                ),
            }
        }
    };
    match result {
        Ok(exit) => exit,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("error: {e}");
            Exit::Usage
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            Exit::Failed
        }
    }
}

/// Loads the configuration for a command; an unreadable or invalid file is a [`UsageError`] listing
/// every problem, one per line.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    match config::load_file(path) {
        Ok(c) => Ok(c),
        Err(ConfigError::Read { path, reason }) => {
            Err(UsageError(format!("cannot read the configuration {path}: {reason}")).into())
        }
        Err(ConfigError::Invalid(problems)) => {
            let mut text = format!(
                "{} is invalid ({} problem{}):",
                path.display(),
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            );
            for p in &problems {
                text.push('\n');
                text.push_str(&p.to_string());
            }
            Err(UsageError(text).into())
        }
    }
}

/// `keyrotd run`.
pub fn run(config_path: &Path, init_tracing: fn(LogFormat)) -> anyhow::Result<Exit> {
    let config = load_config(config_path)?;
    init_tracing(config.daemon.log_format);
    runtime()?.block_on(crate::daemon::run(config_path.to_path_buf(), config))?;
    Ok(Exit::Success)
}

/// The daemon's runtime. Blocking threads (file stores, journal and audit writes) are capped at 32
/// rather than tokio's 512: a fleet's bursts of file reads would otherwise start hundreds of threads,
/// each with its own stack and allocator cache, for work that takes microseconds.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(32)
        .build()?)
}

/// `keyrotd check-config`: the same loader as `run`, then a summary for people.
pub fn check_config(config_path: &Path) -> anyhow::Result<Exit> {
    let config = load_config(config_path)?;
    print!("{}", summary(config_path, &config));
    Ok(Exit::Success)
}

/// `keyrotd plan`: the next runs of every key (or one); with `checklist`, one key's checklist.
pub fn plan(
    config_path: &Path,
    count: usize,
    key: Option<&str>,
    checklist: bool,
    json: bool,
) -> anyhow::Result<Exit> {
    let mut config = load_config(config_path)?;
    if let Some(k) = key {
        known_key(&config, k)?;
    }
    if checklist {
        let key = key.unwrap_or_default();
        let list = runtime()?.block_on(crate::commands::checklist(config.clone(), key))?;
        if json {
            println!("{}", serde_json::to_string_pretty(&list)?);
        } else {
            print!("{}", crate::checklist::text(&list, &config));
        }
        return Ok(Exit::Success);
    }
    if let Some(k) = key {
        config.keys.retain(|c| c.name == k);
    }
    print!("{}", schedule::plan_table(&config, Utc::now(), count));
    Ok(Exit::Success)
}

/// `keyrotd approve`: the rotation waiting for an approval runs now.
pub fn approve(config_path: &Path, args: crate::commands::ApproveArgs) -> anyhow::Result<Exit> {
    let config = load_config(config_path)?;
    known_key(&config, &args.key)?;
    runtime()?.block_on(crate::commands::approve(config, args))
}

/// `keyrotd status`: the providers and stores, read live, side by side.
pub fn status(config_path: &Path, json: bool, key: Option<&str>) -> anyhow::Result<Exit> {
    let config = load_config(config_path)?;
    if let Some(k) = key {
        known_key(&config, k)?;
    }
    let reports = runtime()?.block_on(crate::commands::status(config, key))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", crate::commands::status_table(&reports));
    }
    Ok(Exit::Success)
}

/// `keyrotd rotate`: through the daemon when one answers on `listen`, else in this process.
pub fn rotate(config_path: &Path, args: crate::commands::RotateArgs) -> anyhow::Result<Exit> {
    let config = load_config(config_path)?;
    known_key(&config, &args.key)?;
    runtime()?.block_on(crate::commands::rotate(config, args))
}

/// A key named on the command line must exist.
fn known_key(config: &Config, key: &str) -> anyhow::Result<()> {
    if config.key(key).is_none() {
        let names: Vec<&str> = config.keys.iter().map(|k| k.name.as_str()).collect();
        return Err(
            UsageError(format!("unknown key {key:?} (known: {})", names.join(", "))).into(),
        );
    }
    Ok(())
}

fn human(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The `check-config` report: keys, stores, providers, coordination, warnings.
pub fn summary(config_path: &Path, config: &Config) -> String {
    let now = Utc::now();
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{} is valid.", config_path.display());
    let d = &config.daemon;
    let _ = writeln!(
        out,
        "\nDaemon: listen {}, state in {}, reconcile {}, log {}, admin API POSTs {}{}",
        d.listen,
        d.state_dir.display(),
        d.reconcile_interval.map_or("off".into(), human),
        match d.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        },
        if d.admin_token.is_some() {
            "enabled"
        } else {
            "refused (no admin_token)"
        },
        if d.paused { ", starts PAUSED" } else { "" },
    );

    let _ = writeln!(out, "\nKeys ({}):", config.keys.len());
    for k in &config.keys {
        let _ = writeln!(out, "  {}  (provider {})", k.name, k.provider);
        let _ = writeln!(
            out,
            "    owner:        {}",
            k.owner
                .as_ref()
                .map_or("none".to_string(), |o| o.to_string())
        );
        let mut when = Vec::new();
        if let Some(s) = &k.schedule {
            when.push(format!("schedule \"{}\" {}", s.text, k.timezone));
        }
        if k.window.is_some() {
            when.push("within its window".into());
        }
        if let Some(m) = k.max_age {
            when.push(format!("max age {}", human(m)));
        }
        if k.is_manual_only() {
            when.push("manual-only (no schedule, no max_age)".into());
        }
        let _ = writeln!(out, "    when:         {}", when.join(", "));
        if k.schedule.is_some() {
            let next =
                schedule::next_runs(k, now, 1)
                    .first()
                    .map_or("(not computed)".to_string(), |t| {
                        format!(
                            "{} ({})",
                            t.format("%Y-%m-%d %H:%M:%S UTC"),
                            t.with_timezone(&k.timezone).format("%Y-%m-%d %H:%M %Z")
                        )
                    });
            let _ = writeln!(out, "    next:         {next}");
        }
        for dest in &k.destinations {
            let _ = writeln!(out, "    destination:  {} -> {}", dest.store, dest.target);
        }
        for dep in &k.dependents {
            let how = match &dep.reload {
                Some(ReloadHook::Http { url, method, .. }) => format!("reload {method} {url}"),
                Some(ReloadHook::Command { command, .. }) => {
                    format!("reload `{}`", command.join(" "))
                }
                None => "no reload hook".into(),
            };
            let verify = dep
                .verify
                .as_ref()
                .map_or(String::new(), |v| format!(", verify {}", v.url));
            let _ = writeln!(
                out,
                "    dependent:    {} (reads from {}; {how}{verify})",
                dep.name,
                dep.reads_from.join(", ")
            );
        }
        key_people(&mut out, k);
        let _ = writeln!(
            out,
            "    watch {}, auto-recover {}, at most {} regenerations/day",
            if k.watch.is_zero() {
                "off".into()
            } else {
                human(k.watch)
            },
            if k.auto_recover { "on" } else { "off" },
            k.max_regenerations_per_day
        );
    }

    let _ = writeln!(out, "\nStores ({}):", config.stores.len());
    for (name, s) in &config.stores {
        let detail = match s {
            StoreConfig::Vault(v) => format!(
                "{} mount {}{}, auth {}",
                v.address,
                v.mount,
                v.namespace
                    .as_ref()
                    .map_or(String::new(), |n| format!(", namespace {n}")),
                match v.auth {
                    VaultAuth::Token(_) => "token",
                    VaultAuth::AppRole { .. } => "approle",
                }
            ),
            StoreConfig::Aws(a) => format!(
                "region {}{}",
                a.region.as_deref().unwrap_or("(from the AWS chain)"),
                a.endpoint_url
                    .as_ref()
                    .map_or(String::new(), |u| format!(", endpoint {u}"))
            ),
            StoreConfig::File(f) => format!("dir {}", f.dir.display()),
        };
        let _ = writeln!(out, "  {name}  {}  {detail}", s.kind());
    }

    let _ = writeln!(out, "\nProviders ({}):", config.providers.len());
    for (name, p) in &config.providers {
        let detail = match p {
            ProviderConfig::Aos(a) => format!("aos  {}", a.base_url),
            ProviderConfig::Http(h) => {
                let issue = match (&h.regenerate, &h.create) {
                    (Some(r), _) => format!("regenerate {} {}", r.method, r.url),
                    (None, Some(c)) => format!(
                        "overlap dual: create {} {}, revoke, {}",
                        c.method,
                        c.url,
                        if h.list.is_some() { "list" } else { "no list" }
                    ),
                    (None, None) => String::new(),
                };
                let status = if h.status.is_some() {
                    ""
                } else {
                    " (no status)"
                };
                format!("http  {issue}{status}")
            }
        };
        let _ = writeln!(out, "  {name}  {detail}");
    }

    notify_targets(&mut out, config);

    match &config.coordination {
        Some(c) => {
            let _ = writeln!(
                out,
                "\nCoordination: several replicas share the keys through leases on vault store {} \
                 at {} (ttl {}, renewed every {}); each replica needs its own state_dir",
                c.store,
                c.path,
                human(c.ttl),
                human(c.ttl / 3)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "\nCoordination: none (single process; the state_dir lock keeps a second one out)"
            );
        }
    }

    if !config.warnings.is_empty() {
        let _ = writeln!(out, "\nWarnings ({}):", config.warnings.len());
        for w in &config.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
    }
    out
}

/// A key's approval, notify targets and first-contact choice, in `check-config`'s summary.
fn key_people(out: &mut String, k: &config::KeyConfig) {
    if let Some(a) = &k.approval {
        let _ = writeln!(
            out,
            "    approval:     scheduled rotations wait up to {} for `keyrotd approve`{}",
            human(a.timeout),
            if a.notify.is_empty() {
                String::new()
            } else {
                format!(" (asking {})", a.notify.join(", "))
            }
        );
    }
    if !k.notify.is_empty() {
        let _ = writeln!(out, "    notify:       {}", k.notify.join(", "));
    }
    if k.on_first_contact == config::FirstContact::Rotate {
        let _ = writeln!(
            out,
            "    first contact: rotated by itself (on_first_contact = \"rotate\")"
        );
    }
}

/// The `[notify.*]` targets of `check-config`'s summary.
fn notify_targets(out: &mut String, config: &Config) {
    if !config.notify.is_empty() {
        let _ = writeln!(out, "\nNotify targets ({}):", config.notify.len());
        for (name, t) in &config.notify {
            let how = match &t.kind {
                config::NotifyKind::Webhook {
                    url, signing_key, ..
                } => format!(
                    "webhook POST {url}{}",
                    if signing_key.is_some() {
                        ", signed"
                    } else {
                        ""
                    }
                ),
                config::NotifyKind::Command { command, .. } => {
                    format!("command `{}`", command.join(" "))
                }
            };
            let events = if t.events.is_empty() {
                "every event".to_string()
            } else {
                t.events
                    .iter()
                    .map(|e| e.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(out, "  {name}  {how}; {events}; {} retries", t.retries);
        }
    }
}
