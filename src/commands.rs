//! The async bodies of `keyrotd status`, `keyrotd rotate`, `keyrotd approve` and `keyrotd plan
//! --checklist` (cli.rs parses and prints exit codes).
//!
//! `rotate` and `approve` hand their request to a running daemon (admin API on `daemon.listen`,
//! bearer token from `daemon.admin_token`) and follow the rotation through `GET /v1/rotations/{id}`;
//! otherwise they take the state-dir lock and run the rotation in this process with the same journal,
//! budget and lifecycle as the daemon. Either way the phases are printed as they pass.
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
use crate::config::{Config, FirstContact, OwnerView};
use crate::coordination::kv::Kv;
use crate::coordination::read_key_doc;
use crate::engine::reconcile::observe;
use crate::engine::recovery::Seen;
use crate::engine::{
    DestinationView, Engine, LivePhase, RecordEvent, RotationRequest, RunResult, Runtime, Trigger,
    Verdict,
};
use crate::journal::{Journal, KeyJournal, PendingApproval, Phase, StateLock};
use crate::provider::KeyStatus;
use crate::telemetry::Metrics;
use crate::telemetry::Outcome;

/// One key in `keyrotd status`. Never a secret.
#[derive(Debug, Serialize)]
pub struct KeyReport {
    pub name: String,
    pub provider: String,
    /// Who the key belongs to.
    pub owner: Option<OwnerView>,
    /// Scheduled rotations of the key wait for an operator's approval.
    pub approval_required: bool,
    /// A due rotation waiting for an approval.
    pub pending_approval: Option<PendingApproval>,
    /// keyrotd has never issued nor adopted this key and no destination holds a value the portal
    /// accepts: it regenerates nothing by itself until an operator rotates it.
    pub first_contact: bool,
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
pub(crate) async fn journal_of(
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

/// `keyrotd plan KEY --checklist`: the key's checklist from the configuration and its journal (read
/// only; with several replicas, from its lease document).
pub async fn checklist(config: Config, key: &str) -> anyhow::Result<crate::checklist::Checklist> {
    let config = Arc::new(config);
    let k = config
        .key(key)
        .ok_or_else(|| UsageError(format!("unknown key {key:?}")))?;
    let journal = Journal::open(&config.daemon.state_dir)?;
    let leases = match &config.coordination {
        Some(co) => {
            let rt = Runtime::build(config.clone()).await?;
            Some((Kv::Vault(rt.store(&co.store)?.clone()), co.clone()))
        }
        None => None,
    };
    let (j, _, _) = journal_of(&journal, leases.as_ref(), key).await;
    Ok(crate::checklist::build(&config, k, &j))
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
            let first_contact = drift
                && j.is_first_contact()
                && obs.active_fingerprint.is_none()
                && k.on_first_contact == FirstContact::Report;
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
                owner: k.owner.as_ref().map(|o| o.view()),
                approval_required: k.approval.is_some(),
                pending_approval: j.pending_approval.as_deref().cloned(),
                first_contact,
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

/// The human form of `status`. A destination that could not be read says so in its row, and the
/// error itself follows the table (one outage must not make the table hundreds of columns wide).
pub fn status_table(reports: &[KeyReport]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for r in reports {
        let _ = writeln!(out, "{} (provider {})", r.name, r.provider);
        let _ = writeln!(out, "  owner:   {}", owner_line(r.owner.as_ref()));
        portal_lines(&mut out, r);
        destination_table(&mut out, r);
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
        attention_lines(&mut out, r);
        let _ = writeln!(
            out,
            "  drift: {}  last outcome: {}  phase: {}  next rotation: {}{}\n",
            if r.drift { "YES" } else { "no" },
            opt(&r.last_outcome),
            crate::journal::phase_name(r.phase),
            opt(&r.next_rotation.map(|t| t.to_rfc3339())),
            if r.approval_required {
                " (needs approval)"
            } else {
                ""
            },
        );
    }
    out
}

/// `name <contact>, runbook URL`, or how to name one.
fn owner_line(owner: Option<&OwnerView>) -> String {
    match owner {
        Some(o) => {
            let mut line = o.name.clone();
            if let Some(c) = &o.contact {
                line.push_str(&format!(" <{c}>"));
            }
            if let Some(u) = &o.runbook {
                line.push_str(&format!(", runbook {u}"));
            }
            line
        }
        None => "none (set owner = { name = \"...\" } in the key's configuration)".into(),
    }
}

fn portal_lines(out: &mut String, r: &KeyReport) {
    use std::fmt::Write as _;
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
}

/// The destinations as a table; read errors are numbered in it and printed below it.
fn destination_table(out: &mut String, r: &KeyReport) {
    use std::fmt::Write as _;
    let mut rows = vec![[
        "STORE".to_string(),
        "TARGET".into(),
        "IN SYNC".into(),
        "FINGERPRINT".into(),
        "KEY ID".into(),
        "VERSION".into(),
    ]];
    let mut errors = Vec::new();
    for d in &r.destinations {
        let sync = match (&d.error, d.in_sync) {
            (Some(e), _) => {
                errors.push((d, e));
                format!("error [{}]", errors.len())
            }
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
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "  {}", line.join("  ").trim_end());
    }
    for (n, (d, e)) in errors.iter().enumerate() {
        let _ = writeln!(out, "  [{}] {} ({}): {e}", n + 1, d.store, d.target);
    }
}

/// What needs someone: a rotation waiting for an approval, a key met for the first time.
fn attention_lines(out: &mut String, r: &KeyReport) {
    use std::fmt::Write as _;
    if let Some(p) = &r.pending_approval {
        let _ = writeln!(
            out,
            "  AWAITING APPROVAL: the {} rotation {} passed preflight at {} and is skipped at {} unless \
             approved: `keyrotd approve {} --reason ...`",
            p.trigger,
            p.rotation_id,
            p.asked_at.to_rfc3339(),
            p.until.to_rfc3339(),
            r.name
        );
    }
    if r.first_contact {
        let _ = writeln!(
            out,
            "  FIRST CONTACT: keyrotd has never issued nor adopted this key, and no destination holds a \
             value the portal accepts, so it regenerates nothing by itself. Identify every service using \
             the key; once they read it from the destinations above, populate them with \
             `keyrotd rotate {} --reason \"first rotation\"` (or set on_first_contact = \"rotate\" on the key).",
            r.name
        );
    }
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

/// The exit code of a rotation's outcome (docs/cli.md, "Exit codes"). `skipped` (an approval that
/// never came, or another rotation overtook it) changed nothing the caller asked for: 1.
fn outcome_exit(outcome: Option<Outcome>) -> Exit {
    match outcome {
        Some(Outcome::Success) => Exit::Success,
        Some(Outcome::Degraded) => Exit::Degraded,
        Some(Outcome::Aborted | Outcome::Failed | Outcome::Skipped) | None => Exit::Failed,
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

/// A running daemon to hand a request to: the state-dir lock is held and `GET /healthz` answers on
/// `listen`. `None` means "do it in this process" (which takes the lock, or says who holds it).
async fn running_daemon(config: &Config) -> anyhow::Result<Option<(reqwest::Client, String)>> {
    if !state_dir_is_locked(config) {
        // No daemon: nothing on `listen` is ours, so it is not asked (nor sent the admin token).
        return Ok(None);
    }
    let base = format!("http://{}", config.daemon.listen);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let up = matches!(http.get(format!("{base}/healthz")).send().await, Ok(r) if r.status().is_success());
    Ok(up.then_some((http, base)))
}

/// `keyrotd rotate`.
pub async fn rotate(config: Config, args: RotateArgs) -> anyhow::Result<Exit> {
    match running_daemon(&config).await? {
        Some((http, base)) => {
            println!(
                "A daemon answers on {}: handing the rotation to it.",
                config.daemon.listen
            );
            rotate_remote(&config, &http, &base, args).await
        }
        None => rotate_local(config, args).await,
    }
}

fn admin_token(config: &Config) -> anyhow::Result<&crate::secret::Secret> {
    config.daemon.admin_token.as_ref().ok_or_else(|| {
        UsageError(
            "a daemon is running but daemon.admin_token is not configured: it refuses operator requests"
                .into(),
        )
        .into()
    })
}

async fn rotate_remote(
    config: &Config,
    http: &reqwest::Client,
    base: &str,
    args: RotateArgs,
) -> anyhow::Result<Exit> {
    let token = admin_token(config)?;
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
    if status.as_u16() == 200 && args.dry_run {
        for f in answer["preflight"].as_array().into_iter().flatten() {
            println!("  {}", f.as_str().unwrap_or_default());
        }
        let would = answer["would_rotate"].as_bool().unwrap_or(false);
        println!("dry run: {}", Verdict::of(would));
        return Ok(if would { Exit::Success } else { Exit::Failed });
    }
    let id = accepted(status, &answer)?;
    let outcome = follow_remote(http, base, &id, &args.key, args.watch).await?;
    Ok(outcome_exit(outcome))
}

/// The rotation id of a 202; any other answer is the daemon's refusal, printed as an error.
fn accepted(status: reqwest::StatusCode, answer: &serde_json::Value) -> anyhow::Result<String> {
    let message = answer["error"].as_str().unwrap_or("").to_string();
    match status.as_u16() {
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
    Ok(id)
}

/// Prints a rotation's events as the daemon records them, until its outcome (and with `watch`, the
/// end of its watch). Returns the outcome.
async fn follow_remote(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    key: &str,
    watch: bool,
) -> anyhow::Result<Option<Outcome>> {
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
            if !watch {
                break;
            }
            let k: serde_json::Value = http
                .get(format!("{base}/v1/keys/{key}"))
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
    Ok(outcome)
}

/// The engine of an in-process command: this process holds the state-dir lock (no daemon runs), so
/// it is the only actor on the state_dir and takes triggers at once.
async fn local_engine(config: Config) -> anyhow::Result<(StateLock, Arc<Engine>)> {
    let lock = StateLock::acquire(&config.daemon.state_dir)?;
    let engine = Engine::new(Arc::new(config), Arc::new(Metrics::new())).await?;
    engine.mark_ready();
    Ok((lock, engine))
}

async fn rotate_local(config: Config, args: RotateArgs) -> anyhow::Result<Exit> {
    let (_lock, engine) = local_engine(config).await?;
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
    let outcome = follow_local(&engine, id, &args.key, args.watch).await;
    Ok(outcome_exit(Some(outcome)))
}

/// Prints an in-process rotation's events until its outcome (and with `watch`, the end of its
/// watch), then lets the engine's work end and its notifications go out (bounded).
async fn follow_local(engine: &Arc<Engine>, id: uuid::Uuid, key: &str, watch: bool) -> Outcome {
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
                .any(|k| k.name == key && k.phase == LivePhase::Watching);
            if let Some(o) = r.outcome
                && (!watch || !watching)
            {
                break o;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    engine.shutdown.cancel();
    engine.tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(30), engine.tasks.wait()).await;
    engine.notices.flush(NOTICE_FLUSH).await;
    println!("outcome: {outcome}");
    if outcome == Outcome::Degraded {
        // The background fill ended with this process: say who finishes the job.
        println!(
            "the destinations this rotation could not confirm are filled by the daemon's reconcile \
             (`keyrotd run`), copied from a destination that holds the new key; nothing is \
             regenerated for them"
        );
    }
    outcome
}

/// How long a command waits for its notifications to be delivered before it exits.
const NOTICE_FLUSH: Duration = Duration::from_secs(15);

pub struct ApproveArgs {
    pub key: String,
    pub reason: String,
    /// The approver; defaults to `$SUDO_USER` (or `$USER`) `@` the host name.
    pub by: Option<String>,
}

/// `keyrotd approve`: the rotation of the key that waits for an approval runs now, through the
/// daemon when one runs, else in this process. Exits with the rotation's outcome.
pub async fn approve(config: Config, args: ApproveArgs) -> anyhow::Result<Exit> {
    let by = args.by.clone().unwrap_or_else(requested_by);
    match running_daemon(&config).await? {
        Some((http, base)) => {
            println!(
                "A daemon answers on {}: handing the approval to it.",
                config.daemon.listen
            );
            let token = admin_token(&config)?;
            let resp = http
                .post(format!("{base}/v1/keys/{}/approve", args.key))
                .bearer_auth(token.expose_secret())
                .json(&json!({ "reason": args.reason, "requested_by": by }))
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .context("sending the approval to the daemon")?;
            let status = resp.status();
            let answer: serde_json::Value = resp.json().await.unwrap_or_default();
            let id = accepted(status, &answer)?;
            let outcome = follow_remote(&http, &base, &id, &args.key, false).await?;
            Ok(outcome_exit(outcome))
        }
        None => {
            let (_lock, engine) = local_engine(config).await?;
            let id = engine
                .approve(&args.key, by, args.reason)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            println!("rotation {id}");
            let outcome = follow_local(&engine, id, &args.key, false).await;
            Ok(outcome_exit(Some(outcome)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(error: Option<&str>) -> KeyReport {
        let view = |store: &str, in_sync: bool, error: Option<&str>| DestinationView {
            store: store.into(),
            target: "apps/billing#api_key".into(),
            key_id: error.is_none().then(|| "ak_2".to_string()),
            fingerprint: error.is_none().then(|| "3f9c2a7b1d04".to_string()),
            version: None,
            in_sync,
            error: error.map(str::to_string),
        };
        KeyReport {
            name: "billing".into(),
            provider: "aos-prod".into(),
            owner: Some(OwnerView {
                name: "team-payments".into(),
                contact: Some("#payments".into()),
                runbook: Some("https://wiki.example/billing".into()),
            }),
            approval_required: true,
            pending_approval: None,
            first_contact: false,
            portal: None,
            portal_error: None,
            destinations: vec![view("aws", true, None), view("vault", false, error)],
            drift: false,
            last_outcome: Some(Outcome::Success),
            last_finished_at: None,
            next_rotation: None,
            phase: Phase::Idle,
            journal_error: None,
            lease: None,
        }
    }

    #[test]
    fn every_outcome_has_its_exit_code() {
        let table = [
            (Some(Outcome::Success), Exit::Success),
            (Some(Outcome::Degraded), Exit::Degraded),
            (Some(Outcome::Aborted), Exit::Failed),
            (Some(Outcome::Failed), Exit::Failed),
            (Some(Outcome::Skipped), Exit::Failed),
            (None, Exit::Failed),
        ];
        for (outcome, exit) in table {
            assert_eq!(outcome_exit(outcome), exit, "{outcome:?}");
        }
        assert_eq!(
            Outcome::ALL.len(),
            5,
            "a new outcome needs its exit code here"
        );
    }

    #[test]
    fn a_destination_error_goes_below_the_table_not_into_it() {
        let long = format!(
            "vault: request failed: error sending request: {}",
            "connection refused (os error 111) ".repeat(8)
        );
        let table = status_table(&[report(Some(&long))]);
        let rows: Vec<&str> = table
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("STORE"))
            .take(3)
            .collect();
        assert!(rows[2].contains("error [1]"), "{table}");
        let widest = rows.iter().map(|l| l.len()).max().unwrap();
        assert!(widest < 100, "the table stays narrow ({widest}):\n{table}");
        assert!(
            table.contains(&format!("  [1] vault (apps/billing#api_key): {long}")),
            "{table}"
        );
        // Without an error there is no footnote.
        let clean = status_table(&[report(None)]);
        assert!(!clean.contains("[1]"), "{clean}");
    }

    #[test]
    fn the_owner_an_approval_and_a_first_contact_each_get_a_line() {
        let mut r = report(None);
        let table = status_table(std::slice::from_ref(&r));
        assert!(
            table.contains(
                "  owner:   team-payments <#payments>, runbook https://wiki.example/billing"
            ),
            "{table}"
        );
        assert!(table.contains("(needs approval)"), "{table}");
        r.owner = None;
        r.first_contact = true;
        let table = status_table(&[r]);
        assert!(table.contains("  owner:   none (set owner"), "{table}");
        assert!(
            table.contains("FIRST CONTACT")
                && table.contains("`keyrotd rotate billing --reason \"first rotation\"`"),
            "{table}"
        );
    }
}
