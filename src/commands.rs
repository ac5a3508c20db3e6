//! The async bodies of `keyrotd status` and `keyrotd rotate` (cli.rs parses and prints exit codes).
//!
//! `rotate` hands the rotation to a running daemon (admin API on `daemon.listen`, bearer token from
//! `daemon.admin_token`) and follows it through `GET /v1/rotations/{id}`; otherwise it takes the
//! state-dir lock and runs the rotation in this process with the same journal, budget and lifecycle as
//! the daemon. Either way the phases are printed as they pass.
//!
//! A daemon is "running" only when the state-dir lock is held by another process: whatever answers on
//! `listen` while the lock is free is not our daemon, and is never sent the admin token.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::json;

use crate::cli::{Exit, UsageError};
use crate::config::Config;
use crate::coordination::kv::Kv;
use crate::coordination::read_key_doc;
use crate::engine::reconcile::observe;
use crate::engine::recovery::Seen;
use crate::engine::{
    DestinationView, Engine, LivePhase, RecordEvent, RotationRequest, RunResult, Runtime, Trigger,
    Verdict,
};
use crate::journal::{Journal, KeyJournal, Phase, StateLock};
use crate::provider::KeyStatus;
use crate::telemetry::Metrics;
use crate::telemetry::Outcome;

/// One key in `keyrotd status`. Never a secret.
#[derive(Debug, Serialize)]
pub struct KeyReport {
    pub name: String,
    pub provider: String,
    pub portal: Option<KeyStatus>,
    pub portal_error: Option<String>,
    pub destinations: Vec<DestinationView>,
    pub drift: bool,
    pub last_outcome: Option<Outcome>,
    pub last_finished_at: Option<DateTime<Utc>>,
    pub next_rotation: Option<DateTime<Utc>>,
    pub phase: Phase,
    /// The journal could not be read: the daemon sets it aside and blocks the key until an operator
    /// rotates it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_error: Option<String>,
    /// Several replicas: who holds the key's lease, under which fencing number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseView>,
}

/// A key's lease as `keyrotd status` shows it.
#[derive(Debug, Serialize)]
pub struct LeaseView {
    pub holder: Option<String>,
    pub fence: u64,
}

/// A key's journal (from the state dir, or with several replicas from its lease document), why it
/// could not be read, and its lease.
async fn journal_of(
    journal: &Journal,
    leases: Option<&(Kv, crate::config::CoordinationConfig)>,
    key: &str,
) -> (KeyJournal, Option<String>, Option<LeaseView>) {
    let Some((kv, co)) = leases else {
        return match journal.load(key) {
            Ok(j) => (j, None, None),
            Err(e) => (KeyJournal::new(key), Some(e.to_string()), None),
        };
    };
    match read_key_doc(kv, co, key).await {
        Ok(doc) => {
            let doc = doc.unwrap_or_default();
            let lease = LeaseView {
                holder: doc.holder,
                fence: doc.fence,
            };
            let j = doc.journal.unwrap_or_else(|| KeyJournal::new(key));
            (j, None, Some(lease))
        }
        Err(e) => (
            KeyJournal::new(key),
            Some(format!("lease document unreadable: {e}")),
            None,
        ),
    }
}

/// Reads every key's provider status and destinations live (read-only: nothing is adopted, repaired
/// or written).
pub async fn status(config: Config, only: Option<&str>) -> anyhow::Result<Vec<KeyReport>> {
    let config = Arc::new(config);
    let journal = Journal::open(&config.daemon.state_dir)?;
    let rt = Runtime::build(config.clone()).await?;
    let metrics = Metrics::new();
    // Several replicas: each key's journal and holder live in its lease document.
    let leases = match &config.coordination {
        Some(co) => Some((Kv::Vault(rt.store(&co.store)?.clone()), co.clone())),
        None => None,
    };
    let keys: Vec<_> = config
        .keys
        .iter()
        .filter(|k| only.is_none_or(|o| o == k.name))
        .collect();
    let reports = futures::future::join_all(keys.into_iter().map(|k| {
        let rt = &rt;
        let metrics = &metrics;
        let journal = &journal;
        let leases = &leases;
        async move {
            let (j, journal_error, lease) = journal_of(journal, leases.as_ref(), &k.name).await;
            let obs = observe(metrics, rt, k, &j).await;
            let drift = obs.views.iter().any(|v| !v.in_sync && v.error.is_none());
            let (portal, portal_error) = match obs.status {
                Seen::Read(s) => (Some(s), None),
                Seen::Unreadable(e) => (None, Some(e)),
                Seen::NoEndpoint => (None, None),
            };
            let provider_last_rotated = portal.as_ref().and_then(|s| s.last_rotated);
            let next =
                crate::engine::scheduler::next_due(k, &j, provider_last_rotated, Utc::now(), 0.0)
                    .map(|d| d.at);
            KeyReport {
                name: k.name.clone(),
                provider: k.provider.clone(),
                portal,
                portal_error,
                destinations: obs.views,
                drift,
                last_outcome: j.last_outcome,
                last_finished_at: j.last_finished_at,
                next_rotation: next,
                journal_error,
                lease,
                phase: j.phase,
            }
        }
    }))
    .await;
    Ok(reports)
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into())
}

/// The human form of `status`.
pub fn status_table(reports: &[KeyReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for r in reports {
        let _ = writeln!(out, "{} (provider {})", r.name, r.provider);
        match (&r.portal, &r.portal_error) {
            (Some(p), _) => {
                let _ = writeln!(
                    out,
                    "  portal:  key {}  Active {}  account {}\n           First Generated {}  Last Rotated {}  Generated By {}",
                    p.key_id,
                    if p.active { "yes" } else { "NO" },
                    opt(&p.account_id),
                    opt(&p.first_generated.map(|t| t.to_rfc3339())),
                    opt(&p.last_rotated.map(|t| t.to_rfc3339())),
                    opt(&p.generated_by),
                );
            }
            (None, Some(e)) => {
                let _ = writeln!(out, "  portal:  unreadable: {e}");
            }
            (None, None) => {
                let _ = writeln!(out, "  portal:  no status endpoint");
            }
        }
        let mut rows = vec![[
            "STORE".to_string(),
            "TARGET".into(),
            "IN SYNC".into(),
            "FINGERPRINT".into(),
            "KEY ID".into(),
            "VERSION".into(),
        ]];
        for d in &r.destinations {
            let sync = match (&d.error, d.in_sync) {
                (Some(e), _) => format!("error: {e}"),
                (None, true) => "yes".into(),
                (None, false) => "NO".into(),
            };
            rows.push([
                d.store.clone(),
                d.target.clone(),
                sync,
                opt(&d.fingerprint),
                opt(&d.key_id),
                opt(&d.version),
            ]);
        }
        let widths: Vec<usize> = (0..6)
            .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            let _ = writeln!(out, "  {}", line.join("  ").trim_end());
        }
        if let Some(l) = &r.lease {
            let _ = writeln!(
                out,
                "  lease: held by {} (fencing number {})",
                l.holder.as_deref().unwrap_or("no replica"),
                l.fence
            );
        }
        if let Some(e) = &r.journal_error {
            let _ = writeln!(
                out,
                "  JOURNAL UNREADABLE: {e}\n  keyrotd sets it aside and will not rotate this key by itself; \
                 compare the portal with the destinations above, then `keyrotd rotate {} --reason ...`",
                r.name
            );
        }
        let _ = writeln!(
            out,
            "  drift: {}  last outcome: {}  phase: {}  next rotation: {}\n",
            if r.drift { "YES" } else { "no" },
            opt(&r.last_outcome),
            crate::journal::phase_name(r.phase),
            opt(&r.next_rotation.map(|t| t.to_rfc3339())),
        );
    }
    out
}

pub struct RotateArgs {
    pub key: String,
    pub reason: String,
    pub force: bool,
    pub dry_run: bool,
    pub watch: bool,
    /// With `force`: rotate when at least one destination is writable.
    pub allow_partial: bool,
}

fn requested_by() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "operator".into());
    format!("{user}@{}", gethostname::gethostname().to_string_lossy())
}

fn outcome_exit(outcome: Option<Outcome>) -> Exit {
    match outcome {
        Some(Outcome::Success) => Exit::Success,
        Some(Outcome::Degraded) => Exit::Degraded,
        _ => Exit::Failed,
    }
}

fn print_event(e: &RecordEvent) {
    println!(
        "{}  {:<14} {}",
        e.ts.format("%H:%M:%S%.3f"),
        e.event,
        e.detail
    );
}

/// True when another process holds the state-dir lock: a daemon (or another in-process rotation) runs.
/// Taking the lock for an instant is the only way to ask; a free lock is released at once.
fn state_dir_is_locked(config: &Config) -> bool {
    matches!(
        StateLock::acquire(&config.daemon.state_dir),
        Err(crate::journal::JournalError::Locked { .. })
    )
}

/// `keyrotd rotate`.
pub async fn rotate(config: Config, args: RotateArgs) -> anyhow::Result<Exit> {
    if !state_dir_is_locked(&config) {
        // No daemon: nothing on `listen` is ours, so it is not asked (nor sent the admin token).
        return rotate_local(config, args).await;
    }
    let base = format!("http://{}", config.daemon.listen);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let daemon_up = matches!(http.get(format!("{base}/healthz")).send().await, Ok(r) if r.status().is_success());
    if daemon_up {
        println!(
            "A daemon answers on {}: handing the rotation to it.",
            config.daemon.listen
        );
        rotate_remote(&config, &http, &base, args).await
    } else {
        rotate_local(config, args).await
    }
}

async fn rotate_remote(
    config: &Config,
    http: &reqwest::Client,
    base: &str,
    args: RotateArgs,
) -> anyhow::Result<Exit> {
    let Some(token) = &config.daemon.admin_token else {
        return Err(UsageError(
            "a daemon is running but daemon.admin_token is not configured: it refuses rotation requests".into(),
        )
        .into());
    };
    let body = json!({ "reason": args.reason, "requested_by": requested_by(), "force": args.force, "allow_partial": args.allow_partial, "dry_run": args.dry_run });
    let resp = http
        .post(format!("{base}/v1/keys/{}/rotate", args.key))
        .bearer_auth(token.expose_secret())
        .json(&body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .context("sending the rotation request to the daemon")?;
    let status = resp.status();
    let answer: serde_json::Value = resp.json().await.unwrap_or_default();
    let message = answer["error"].as_str().unwrap_or("").to_string();
    match status.as_u16() {
        200 if args.dry_run => {
            for f in answer["preflight"].as_array().into_iter().flatten() {
                println!("  {}", f.as_str().unwrap_or_default());
            }
            let would = answer["would_rotate"].as_bool().unwrap_or(false);
            println!("dry run: {}", Verdict::of(would));
            return Ok(if would { Exit::Success } else { Exit::Failed });
        }
        202 => {}
        401 | 403 => {
            return Err(anyhow::anyhow!(
                "the daemon refused the request (HTTP {status}): {message}"
            ));
        }
        _ => {
            return Err(anyhow::anyhow!(
                "the daemon answered HTTP {status}: {message}"
            ));
        }
    }
    let id = answer["rotation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!("rotation {id}");
    let mut seen = 0;
    let mut outcome: Option<Outcome> = None;
    loop {
        let r: serde_json::Value = http
            .get(format!("{base}/v1/rotations/{id}"))
            .send()
            .await?
            .json()
            .await?;
        let events: Vec<RecordEvent> =
            serde_json::from_value(r["events"].clone()).unwrap_or_default();
        for e in events.iter().skip(seen) {
            print_event(e);
        }
        seen = events.len();
        if outcome.is_none() {
            outcome = serde_json::from_value(r["outcome"].clone()).unwrap_or_default();
        }
        if outcome.is_some() {
            if !args.watch {
                break;
            }
            let k: serde_json::Value = http
                .get(format!("{base}/v1/keys/{}", args.key))
                .send()
                .await?
                .json()
                .await?;
            let phase: Option<LivePhase> = serde_json::from_value(k["phase"].clone()).ok();
            if phase != Some(LivePhase::Watching) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match outcome {
        Some(o) => println!("outcome: {o}"),
        None => println!("outcome: unknown"),
    }
    Ok(outcome_exit(outcome))
}

async fn rotate_local(config: Config, args: RotateArgs) -> anyhow::Result<Exit> {
    let _lock = StateLock::acquire(&config.daemon.state_dir)?;
    let engine = Engine::new(Arc::new(config), Arc::new(Metrics::new())).await?;
    // No daemon runs (the lock says so): this process is the only actor on the state_dir.
    engine.mark_ready();
    let mut req = RotationRequest::new(Trigger::Manual, args.reason.clone(), requested_by());
    req.force = args.force;
    req.allow_partial = args.allow_partial;
    req.dry_run = args.dry_run;
    // Without --watch the watch is the daemon's business: the journal ends idle, so a later start
    // does not redo this rotation's notify.
    req.watch = args.watch;
    if args.dry_run {
        let (_, result) = engine
            .rotate(&args.key, req)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let RunResult::DryRun {
            would_rotate,
            findings,
            problems,
        } = result
        else {
            anyhow::bail!("the dry run did not report what it would do");
        };
        for f in findings.iter().chain(&problems) {
            println!("  {f}");
        }
        println!("dry run: {}", Verdict::of(would_rotate));
        return Ok(if would_rotate {
            Exit::Success
        } else {
            Exit::Failed
        });
    }
    let id = engine
        .start_rotation(&args.key, req)
        .map_err(|e| anyhow::anyhow!(e))?;
    println!("rotation {id}");
    let mut seen = 0;
    let outcome = loop {
        if let Some(r) = engine.rotation(id) {
            for e in r.events.iter().skip(seen) {
                print_event(e);
            }
            seen = r.events.len();
            let watching = engine
                .key_views()
                .iter()
                .any(|k| k.name == args.key && k.phase == LivePhase::Watching);
            if let Some(o) = r.outcome
                && (!args.watch || !watching)
            {
                break o;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    engine.shutdown.cancel();
    engine.tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(30), engine.tasks.wait()).await;
    println!("outcome: {outcome}");
    Ok(outcome_exit(Some(outcome)))
}
