//! The daemon as the soak drives it: started, killed, stopped gracefully, told to reload. The admin URL
//! is withdrawn before any signal that ends the process and published again once the new process
//! listens, so the `/healthz` watch knows which silences are the soak's own restarts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Soak;
use super::world::{PROVIDER_TIMEOUT_S, STORE_DEADLINE_S, Variant};

/// How long a started daemon may take to become ready (its recovery scan reads every portal, some of
/// which may be failing on purpose).
const READY_BOUND: Duration = Duration::from_secs(90);

/// How long SIGTERM may take: a rotation holding an issued key is waited for until its store deadline
/// counted from the regenerate response (which a delayed portal may give up to the provider timeout
/// late), plus 15 s for the hooks, plus the daemon's 5 s grace for work without a key, plus slack for
/// a loaded machine.
pub const TERM_BOUND: Duration =
    Duration::from_secs(PROVIDER_TIMEOUT_S * 2 + STORE_DEADLINE_S + 15 + 5 + 15);

/// Starts `keyrotd run` on the config file as it is, publishes its admin URL and waits until it is
/// ready. A daemon that does not come up is a violation, and the start is tried again (three times).
pub async fn start_daemon(s: &Arc<Soak>) {
    for _ in 0..3 {
        let world = s.clone();
        match tokio::spawn(async move { world.world.spawn_daemon().await }).await {
            Ok(d) => {
                let base = d.base.clone();
                *s.daemon.lock().await = Some(d);
                s.admin.send_replace(Some(base));
                wait_ready(s).await;
                return;
            }
            Err(e) => s.tally.check(
                "the daemon starts and becomes ready",
                Some(format!("keyrotd run did not come up: {e}")),
            ),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    panic!("keyrotd run did not start three times in a row; the soak cannot go on");
}

async fn wait_ready(s: &Soak) {
    let start = Instant::now();
    while start.elapsed() < READY_BOUND {
        if matches!(s.api_get("/readyz").await, Ok((200, _))) {
            s.tally.check("the daemon starts and becomes ready", None);
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.tally.check(
        "the daemon starts and becomes ready",
        Some(format!("not ready within {READY_BOUND:?}")),
    );
}

/// SIGKILL (a crash), a pause of `down`, and a new daemon.
pub async fn kill_and_restart(s: &Arc<Soak>, down: Duration) {
    s.admin.send_replace(None);
    if let Some(mut d) = s.daemon.lock().await.take() {
        d.signal("KILL");
        if tokio::task::block_in_place(|| d.exit_within(Duration::from_secs(20))).is_none() {
            s.tally.check(
                "the daemon exits when told",
                Some("still running 20 s after SIGKILL".into()),
            );
        }
    }
    tokio::time::sleep(down).await;
    start_daemon(s).await;
}

/// SIGTERM: the daemon must end by itself, with status 0, within [`TERM_BOUND`]. Then, after `down`,
/// a new daemon.
pub async fn stop_and_restart(s: &Arc<Soak>, down: Duration) {
    stop(s).await;
    tokio::time::sleep(down).await;
    start_daemon(s).await;
}

/// SIGTERM and the graceful exit, checked.
pub async fn stop(s: &Soak) {
    s.admin.send_replace(None);
    let Some(mut d) = s.daemon.lock().await.take() else {
        return;
    };
    d.signal("TERM");
    let exit = tokio::task::block_in_place(|| d.exit_within(TERM_BOUND));
    let broken = match exit {
        Some(status) if status.code() == Some(0) => None,
        Some(status) => Some(format!("SIGTERM ended it with {status}")),
        None => {
            d.signal("KILL");
            let _ = tokio::task::block_in_place(|| d.exit_within(Duration::from_secs(20)));
            Some(format!("still running {TERM_BOUND:?} after SIGTERM"))
        }
    };
    s.tally
        .check("SIGTERM ends the daemon with 0 in its bound", broken);
}

/// Writes `variant`'s config and sends SIGHUP; the reload must be accepted (or, for the invalid
/// config, refused with the old one kept). A refused config is then replaced on disk by the one in
/// force, so a later restart starts on a valid file.
pub async fn reload(s: &Soak, variant: Variant) {
    let outcome = if variant == Variant::Invalid {
        "error"
    } else {
        "ok"
    };
    let reloads = |m: &crate::support::metrics::Scrape| {
        m.value("keyrotd_config_reloads_total", &[("outcome", outcome)])
            .unwrap_or(0.0)
    };
    let Some(before) = s.metrics().await.map(|m| reloads(&m)) else {
        return;
    };
    s.world.write_config(variant);
    if let Some(d) = s.daemon.lock().await.as_ref() {
        d.signal("HUP");
    }
    let start = Instant::now();
    let mut answered = false;
    while start.elapsed() < Duration::from_secs(20) && !answered {
        tokio::time::sleep(Duration::from_millis(100)).await;
        answered = s.metrics().await.is_some_and(|m| reloads(&m) > before);
    }
    s.tally.check(
        "SIGHUP reloads a good config and refuses a bad one",
        (!answered).then(|| format!("no reload with outcome {outcome} counted within 20 s")),
    );
    if variant == Variant::Invalid {
        s.world.write_config(s.variant());
    } else {
        s.set_variant(variant);
    }
}
