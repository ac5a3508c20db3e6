//! The two races of the first engine, reproduced deterministically (paused clock, answers delayed on
//! cue) and shown fixed: one actor per key, and no action on an observation a rotation overtook.

use std::time::Duration;

use keyrotd::engine::{TriggerError, reconcile, recovery};
use keyrotd::journal::Phase;
use keyrotd::telemetry::Outcome;
use keyrotd::testing::{Fault, Op};

use crate::fixture::{Fx, Holds, KEY, Spec, target};

/// Recovery used to load the journal, wait for the provider's status, and save its old copy: a
/// rotation started meanwhile had its `regenerating` record and budget entry overwritten. Now
/// recovery holds the key's claim while it decides, so the rotation is refused until it is done.
#[tokio::test(start_paused = true)]
async fn a_rotation_cannot_start_while_recovery_decides_the_key() {
    let fx = Fx::new(Spec::default());
    let mut j = fx.journal();
    j.phase = Phase::Regenerating;
    j.old_key_id = Some(fx.portal().key_id());
    fx.write_journal(&j);
    fx.portal()
        .fail(Op::Status, 1, Fault::Delay(Duration::from_secs(2)));
    let fx = fx.start();

    let engine = fx.engine().clone();
    let tick = tokio::spawn(async move { recovery::recovery_tick(&engine).await.finished().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = fx.engine().rotate(KEY, fx.request()).await;
    assert!(
        matches!(during, Err(TriggerError::Busy(_))),
        "a rotation started while recovery held the key: {:?}",
        during.map(|(_, r)| r)
    );
    tick.await.unwrap();
    assert_eq!(
        fx.journal().phase,
        Phase::Idle,
        "recovery cleared the journal"
    );

    let after = fx.rotate().await;
    assert_eq!(
        after,
        keyrotd::engine::RunResult::Finished(Outcome::Success)
    );
    let j = fx.journal();
    assert_eq!(
        j.regenerations.len(),
        1,
        "the rotation's budget entry is kept"
    );
    assert_eq!(
        j.active_key_id.as_deref(),
        Some(fx.portal().key_id().as_str())
    );
}

/// Before the recovery scan has decided every key, no operator rotation starts (503).
#[tokio::test(start_paused = true)]
async fn triggers_wait_for_the_recovery_scan() {
    let fx = Fx::new(Spec::default()).start_unready();
    let early = fx.engine().rotate(KEY, fx.request()).await;
    assert!(
        matches!(early, Err(TriggerError::NotReady)),
        "{:?}",
        early.map(|(_, r)| r)
    );
    recovery::recover_all(fx.engine()).await;
    assert!(fx.engine().rotate(KEY, fx.request()).await.is_ok());
}

/// Reconcile used to observe (provider K0, destination a = K0, b stale), then act: if a rotation to
/// K1 finished in between, it copied the dead K0 over every destination and fired every hook, a full
/// outage. Now it acts only if the key's generation did not move while it observed.
#[tokio::test(start_paused = true)]
async fn reconcile_never_acts_on_an_observation_a_rotation_overtook() {
    let fx = Fx::new(Spec::default());
    // The journal does not know the active key's fingerprint: reconcile adopts it by auth_check,
    // whose answer (true when the portal computed it) arrives two seconds later.
    let mut j = fx.journal();
    j.active_key_id = None;
    j.active_fingerprint = None;
    fx.write_journal(&j);
    fx.store("b").put(&target().to_string(), "an-old-value");
    fx.portal()
        .fail(Op::AuthCheck, 1, Fault::Late(Duration::from_secs(2)));
    let fx = fx.start();

    let engine = fx.engine().clone();
    let config = engine.config();
    let reconcile = tokio::spawn(async move {
        let key = &config.keys[0];
        reconcile::reconcile_key(&engine, key, true).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fx.rotate().await,
        keyrotd::engine::RunResult::Finished(Outcome::Success)
    );
    let found = reconcile.await.unwrap();
    fx.settle().await;

    assert!(
        matches!(found, reconcile::Reconciled::Skipped(_)),
        "reconcile acted on a stale observation: {found:?}"
    );
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active)
    );
    assert_eq!(fx.portal().regenerations(), 1);
    let hooks = fx.dependent("api").reloads_answered().len();
    assert_eq!(hooks, 1, "only the rotation told the dependent to reload");
}
