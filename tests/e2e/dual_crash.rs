//! A dual rotation killed (SIGKILL) at each of its journal's phase boundaries converges on restart:
//! one live key at the vendor in the end, and every destination holding it.
//!
//! Failpoints (`FAILPOINTS=name=sleep(30000)` in the daemon's environment, src/main.rs):
//! - `dual_after_create`: the vendor created the new key, the journal says `storing`, nothing stored;
//! - `dual_after_store`: stored and told, the journal says `confirming`;
//! - `dual_after_confirm`: every dependent confirmed, the journal says `revoking`, no revoke sent;
//! - `dual_after_revoke`: the old key is revoked, the journal still says `revoking`.
#![cfg(feature = "failpoints")]

use std::time::{Duration, Instant};

use crate::support::dual::{DualOptions, DualStack, KEY};
use crate::support::secrets::Haystacks;

/// One live key, held by every destination, and both dependents authenticate with it.
async fn converged(stack: &DualStack) -> bool {
    let live = stack.vendor.live_fingerprints(KEY).await;
    live.len() == 1
        && stack.destination_fingerprints().await == vec![Some(live[0].clone()); 3]
        && stack.journal(KEY)["phase"] == "idle"
        && stack.worker.verify().await == 200
        && stack.edge.verify().await == 200
}

/// Kills the daemon once it sleeps at `failpoint`: the journal says `phase` and the old key is
/// `revoked` (or not) at the vendor.
async fn crash_at(failpoint: &str, phase: &str, revoked: bool) {
    let stack = DualStack::start().await;
    let config = stack.config(&DualOptions::default());
    let action = format!("{failpoint}=sleep(30000)");
    let mut d = stack
        .daemon(&config, &[("FAILPOINTS", action.as_str())])
        .await;
    let original = stack.vendor.live(KEY).await;
    d.start_rotate_key(KEY, "test: crash").await;
    let start = Instant::now();
    while stack.journal(KEY)["phase"] != phase
        || stack.vendor.live(KEY).await.contains(&original[0]) == revoked
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never reached {failpoint} ({phase}); journal {:#}\n{}",
            stack.journal(KEY),
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.kill9();

    let d = stack.daemon(&config, &[]).await;
    let start = Instant::now();
    // Recovery may first retire what the crash left (a key nobody holds) and only then rotate again:
    // the old key alone, still in every destination, looks converged for that moment. The end state
    // is one live key that is not the old one.
    while !converged(&stack).await || stack.vendor.live(KEY).await.contains(&original[0]) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{failpoint}: did not converge: vendor {:?}, destinations {:?}, journal {:#}\n{}",
            stack.vendor.state().await,
            stack.destination_fingerprints().await,
            stack.journal(KEY),
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        !stack.vendor.live(KEY).await.contains(&original[0]),
        "{failpoint}: the old key is revoked in the end"
    );
    for dep in [&stack.worker, &stack.edge] {
        assert_eq!(dep.state().await.auth_failed, 0, "{failpoint}: no outage");
    }
    stack.assert_no_secret_leaked(Haystacks::default()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_create_converges() {
    crash_at("dual_after_create", "storing", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_store_converges() {
    crash_at("dual_after_store", "confirming", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_every_dependent_confirmed_converges() {
    crash_at("dual_after_confirm", "revoking", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_revoke_converges() {
    crash_at("dual_after_revoke", "revoking", true).await;
}
