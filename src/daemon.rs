//! `keyrotd run`: the daemon. Takes the state-dir lock, serves the admin API, runs the recovery scan,
//! then the per-key schedulers, the reconcile loop and the recovery tick, until a signal says stop.
//!
//! Signals: SIGHUP reloads the config (a bad one is refused and the old one kept); SIGTERM/SIGINT shut
//! down gracefully — no new rotation starts, watches end, and a rotation between regenerate and the end
//! of store is waited for (bounded by the longest `store_deadline` + 15 s); a second signal exits at once.
//! Under systemd (`Type=notify`) it reports READY after recovery, WATCHDOG from the main loop,
//! RELOADING/READY around reloads and STOPPING on shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{self, Config};
use crate::engine::{Engine, Runtime, reconcile, recovery, replicas, scheduler};
use crate::journal::StateLock;
use crate::systemd::SystemdNotifier;
use crate::telemetry::Metrics;

/// How often owed re-rotations (lost keys) and unresolved ambiguous regenerates are looked at.
const RECOVERY_TICK: Duration = Duration::from_secs(3);

/// How long shutdown waits for work that holds no issued key (watches and fills end at once,
/// rotations in preflight stop before regenerate).
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Runs the daemon until shutdown. `config_path` is re-read on SIGHUP.
pub async fn run(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    let sd = SystemdNotifier::from_env();
    raise_open_files_limit();
    let _lock = StateLock::acquire(&config.daemon.state_dir)?;
    // Under the lock no write of ours is in flight: a temp file now is a crash's leftover (a secret).
    for path in crate::store::file::clean_stale_temp_files(&config) {
        tracing::warn!(path = %path.display(), "Removed a temp file left by an interrupted write.");
    }
    let listen = config.daemon.listen;
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::new(Arc::new(config), metrics).await?;

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("daemon.listen: cannot listen on {listen}"))?;
    tracing::info!(%listen, "Admin API listening.");
    let admin = tokio::spawn(crate::admin::serve(listener, engine.clone()));

    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    // Several replicas: take this replica's share of the keys first, so the scan recovers them.
    replicas::round(&engine).await;
    // Recovery first: nothing is scheduled before every journal is decided.
    let decisions = recovery::recover_all(&engine).await;
    tracing::info!(keys = decisions.len(), "Recovery scan done.");
    sd.ready();

    tokio::spawn(scheduler::run(engine.clone()));
    tokio::spawn(replicas::run(engine.clone()));
    spawn_loops(&engine);

    let watchdog = sd.watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = watchdog_tick.tick() => if watchdog.is_some() { sd.watchdog() },
            _ = hup.recv() => {
                sd.reloading();
                reload(&engine, &config_path).await;
                sd.ready();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    sd.stopping();
    tracing::info!(
        "Shutting down: no new rotations; waiting for rotations between regenerate and store."
    );
    engine.shutdown.cancel();
    engine.tasks.close();
    // Rotations that have not regenerated stop at once; one holding an issued key is waited for until
    // its store_deadline, counted from the regenerate response (a regenerate still in flight when the
    // signal came registers its own bound when it answers).
    loop {
        let bound = engine.drain_deadline(DRAIN_GRACE);
        tokio::select! {
            _ = engine.tasks.wait() => {
                tracing::info!("All rotations ended.");
                break;
            }
            _ = tokio::time::sleep_until(bound) => {
                if engine.drain_deadline(DRAIN_GRACE) <= tokio::time::Instant::now() {
                    tracing::warn!("Shutdown bound reached with rotations still running.");
                    break;
                }
            }
            _ = term.recv() => {
                tracing::warn!("Second signal: exiting now.");
                break;
            }
            _ = int.recv() => {
                tracing::warn!("Second signal: exiting now.");
                break;
            }
        }
    }
    // Notifications of the last endings get a moment to go out; they never hold shutdown long.
    engine.notices.flush(DRAIN_GRACE).await;
    admin.abort();
    Ok(())
}

/// The soft open-files limit up to the hard one (at most 65,536): a fleet's connections to many
/// portals, stores and hooks at once would otherwise meet the usual soft limit of 1,024 as "too many
/// open files" in the middle of a rotation. A refusal only costs the headroom; it is logged.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const WANTED: u64 = 65_536;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let target = hard.min(WANTED);
    if soft >= target {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => tracing::debug!(from = soft, to = target, "Raised the open-files limit."),
        Err(e) => tracing::warn!(
            soft,
            hard,
            error = %e,
            "Could not raise the open-files limit; a large fleet may run out of sockets."
        ),
    }
}

fn spawn_loops(engine: &Arc<Engine>) {
    let e = engine.clone();
    tokio::spawn(async move {
        loop {
            // Each key once per interval, spread over it; the next round starts when it ends.
            // Disabled ("0s"): look again now and then, in case a reload enables it.
            match e.config().daemon.reconcile_interval {
                Some(interval) => reconcile::reconcile_spread(&e, interval).await,
                None => tokio::select! {
                    _ = e.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                },
            }
            if e.shutdown.is_cancelled() {
                return;
            }
        }
    });
    let e = engine.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = e.shutdown.cancelled() => return,
                _ = tokio::time::sleep(RECOVERY_TICK) => {}
            }
            // The looks run on their own: a key that hangs holds up no later tick.
            let _ = recovery::recovery_tick(&e).await;
        }
    });
}

/// SIGHUP: load and validate the file again; keep the old config if the new one is bad.
async fn reload(engine: &Arc<Engine>, path: &std::path::Path) {
    let result = match config::load_file(path) {
        Ok(c) => Runtime::build(Arc::new(c)).await.map_err(|e| e.to_string()),
        Err(config::ConfigError::Invalid(problems)) => Err(problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ")),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(rt) => {
            if rt.config.daemon.state_dir != engine.config().daemon.state_dir {
                tracing::warn!(
                    "daemon.state_dir changed: it takes effect at the next start, not on reload."
                );
            }
            engine.replace_runtime(rt);
            engine.metrics.config_reload(true);
            tracing::info!("Configuration reloaded.");
        }
        Err(e) => {
            engine.metrics.config_reload(false);
            tracing::error!(error = %e, "Configuration reload refused; keeping the old configuration.");
        }
    }
}
