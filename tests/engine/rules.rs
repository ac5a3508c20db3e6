//! Engine rules beyond the table: how long things wait, what shutdown and reloads do mid-rotation, and
//! what happens when the journal cannot be written.

use std::time::Duration;

use keyrotd::engine::{
    RotationRequest, RunResult, Trigger, TriggerError, reconcile, recovery, scheduler,
};
use keyrotd::journal::Phase;
use keyrotd::telemetry::Outcome;
use keyrotd::testing::{Fault, Op, StoreFault};

use crate::fixture::{Fx, Holds, KEY, Spec, dep, t0, target};

const SUCCESS: RunResult = RunResult::Finished(Outcome::Success);

#[tokio::test(start_paused = true)]
async fn a_429_retry_after_is_honoured_by_the_engine_and_capped() {
    for (retry_after, at_least, at_most) in [(2, 2, 10), (86_400, 300, 330)] {
        let fx = Fx::new(Spec::default());
        fx.portal().fail(
            Op::Regenerate,
            1,
            Fault::RateLimited(Duration::from_secs(retry_after)),
        );
        let fx = fx.start();
        let start = tokio::time::Instant::now();
        assert_eq!(fx.rotate().await, SUCCESS);
        let waited = start.elapsed().as_secs();
        assert!(
            (at_least..at_most).contains(&waited),
            "Retry-After {retry_after}s: waited {waited}s"
        );
        assert_eq!(fx.portal().calls(Op::Regenerate), 2);
    }
}

#[tokio::test(start_paused = true)]
async fn a_journal_write_failing_after_regenerate_does_not_stop_the_distribution() {
    let fx = Fx::new(Spec::default());
    fx.portal()
        .fail(Op::Regenerate, 1, Fault::Delay(Duration::from_secs(2)));
    let fx = fx.start();
    // While the regenerate is in flight, the journal file's place is taken: every write after it fails.
    let file = fx.state_dir().join("journal").join(format!("{KEY}.json"));
    let blocker = file.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        std::fs::remove_file(&blocker).unwrap();
        std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    });
    assert_eq!(fx.rotate().await, SUCCESS);
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active)
    );
    assert!(fx.metric("keyrotd_journal_write_failures_total", &[]) >= 1.0);
    let not_ready = fx.engine().readiness().unwrap_err();
    assert!(not_ready.contains("journal"), "{not_ready}");

    // Once the state dir is writable again the journal is written through, and /readyz recovers.
    std::fs::remove_dir_all(&file).unwrap();
    fx.engine().flush_journals().await;
    assert_eq!(fx.engine().readiness(), Ok(()));
    let j = fx.journal();
    assert_eq!(j.phase, Phase::Idle);
    assert_eq!(j.active_key_id, Some(fx.portal().key_id()));
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_journal_blocks_automatic_rotation_until_an_operator_rotates() {
    let fx = Fx::new(Spec::default());
    let path = fx.state_dir().join("journal").join(format!("{KEY}.json"));
    std::fs::write(&path, b"{not json").unwrap();
    let fx = fx.start();
    let view = fx.engine().key_views().remove(0);
    assert!(
        view.blocked.as_deref().unwrap_or("").contains("corrupt"),
        "{view:?}"
    );
    assert_eq!(fx.metric("keyrotd_journal_blocked", &[("key", KEY)]), 1.0);
    let aside = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains(".corrupt-"));
    assert!(aside, "the unreadable journal was not kept aside");

    let scheduled = RotationRequest::new(Trigger::Schedule, "schedule", "keyrotd");
    let refused = fx.engine().rotate(KEY, scheduled).await;
    assert!(
        matches!(refused, Err(TriggerError::Blocked { .. })),
        "{:?}",
        refused.map(|r| r.1)
    );
    assert_eq!(fx.portal().regenerations(), 0);

    assert_eq!(fx.rotate().await, SUCCESS, "an operator may rotate");
    assert!(fx.engine().key_views()[0].blocked.is_none());
    assert_eq!(fx.metric("keyrotd_journal_blocked", &[("key", KEY)]), 0.0);
}

#[tokio::test(start_paused = true)]
async fn a_key_removed_by_a_reload_mid_rotation_keeps_its_claim() {
    let fx = Fx::new(Spec::default());
    fx.store("b").delay_writes(Duration::from_secs(3));
    let fx = fx.start();
    let engine = fx.engine().clone();
    let first = tokio::spawn(async move {
        let req = RotationRequest::new(Trigger::Manual, "first", "tester");
        engine.rotate(KEY, req).await.map(|r| r.1)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    fx.reload_as("another-key");
    fx.reload_as(KEY);
    let second = fx.engine().rotate(KEY, fx.request()).await;
    assert!(
        matches!(second, Err(TriggerError::Busy(_))),
        "{:?}",
        second.map(|r| r.1)
    );
    assert!(matches!(first.await.unwrap(), Ok(RunResult::Finished(_))));
    assert_eq!(fx.portal().regenerations(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_watch_catches_a_rotation_by_someone_else() {
    let spec = Spec::default().key("watch = \"2m\"\nwatch_interval = \"15s\"");
    let fx = Fx::new(spec).start();
    assert_eq!(fx.rotate().await, SUCCESS);
    tokio::time::sleep(Duration::from_secs(20)).await;
    fx.portal().rotate_out_of_band();
    tokio::time::sleep(Duration::from_secs(30)).await;
    fx.settle().await;
    assert_eq!(fx.portal().regenerations(), 2, "the drift was re-rotated");
    let drift = fx.metric(
        "keyrotd_rerotations_total",
        &[("key", KEY), ("reason", "drift")],
    );
    assert_eq!(drift, 1.0);
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active)
    );
}

#[tokio::test(start_paused = true)]
async fn a_rerotation_skips_the_active_and_dependent_checks() {
    let fx = Fx::new(Spec::default());
    fx.portal().rotate_out_of_band();
    let mut j = fx.journal();
    j.lost = true;
    fx.write_journal(&j);
    fx.portal().set_active(false);
    let fx = fx.start_unready();
    fx.dependent("api").set_unreachable(true);
    recovery::recover_all(fx.engine()).await;
    fx.settle().await;
    assert_eq!(
        fx.portal().regenerations(),
        1,
        "the lost key was re-rotated"
    );
    assert_eq!(fx.holds("a"), Holds::Active);
    assert_eq!(
        fx.last_outcome(),
        Some(Outcome::Degraded),
        "the unreachable hook lags"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_key_that_cannot_be_rerotated_backs_off() {
    let fx = Fx::new(Spec::default());
    fx.portal().rotate_out_of_band();
    let mut j = fx.journal();
    j.lost = true;
    fx.write_journal(&j);
    fx.store("a").down();
    fx.store("b").down();
    let fx = fx.start_unready();
    recovery::recover_all(fx.engine()).await;
    fx.settle().await;
    assert_eq!(fx.last_outcome(), Some(Outcome::Failed));
    let tries = |fx: &Fx| {
        fx.metric(
            "keyrotd_rotations_total",
            &[("key", KEY), ("outcome", "failed")],
        )
    };
    assert_eq!(tries(&fx), 1.0);
    // Ticks every 3 s for a minute: the wait doubles (3 s, 6 s, 12 s, 24 s, with jitter), so far fewer
    // than 20 attempts, each audited; none regenerates.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        recovery::recovery_tick(fx.engine()).await.finished().await;
        fx.settle().await;
    }
    let attempts = tries(&fx);
    assert!(
        (3.0..=8.0).contains(&attempts),
        "{attempts} attempts in a minute"
    );
    assert_eq!(fx.portal().regenerations(), 0);
    assert!(fx.journal().lost);
}

#[tokio::test(start_paused = true)]
async fn shutdown_after_regenerate_still_stores_the_key_and_sends_no_other_regenerate() {
    // The first regenerate's answer is lost (the portal rotated); shutdown begins meanwhile.
    let fx = Fx::new(Spec::default());
    fx.portal()
        .fail(Op::Regenerate, 1, Fault::Delay(Duration::from_secs(2)));
    let fx = fx.start();
    let shutdown = fx.engine().shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.cancel();
    });
    assert_eq!(
        fx.rotate().await,
        SUCCESS,
        "an issued key reaches its destinations"
    );
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active)
    );

    let fx = Fx::new(Spec::default());
    fx.portal().fail(Op::Regenerate, 1, Fault::Lose);
    fx.portal()
        .fail(Op::Status, 2, Fault::Delay(Duration::from_secs(1)));
    let fx = fx.start();
    let shutdown = fx.engine().shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        shutdown.cancel();
    });
    let result = fx.rotate().await;
    assert_eq!(
        result,
        RunResult::Finished(Outcome::Failed),
        "never aborted after a regenerate"
    );
    assert_eq!(
        fx.portal().regenerations(),
        1,
        "no regenerate after the signal"
    );
    assert!(
        fx.journal().lost,
        "the lost key is owed a re-rotation at the next start"
    );
}

#[tokio::test(start_paused = true)]
async fn pause_stops_scheduled_rotations_not_forced_or_recovery_ones() {
    let fx = Fx::new(Spec::default()).start();
    fx.engine().set_paused(true);
    let scheduled = RotationRequest::new(Trigger::Schedule, "schedule", "keyrotd");
    assert!(matches!(
        fx.engine().check_trigger(KEY, &scheduled),
        Err(TriggerError::Paused)
    ));
    assert!(matches!(
        fx.engine().check_trigger(KEY, &fx.request()),
        Err(TriggerError::Paused)
    ));
    let mut forced = fx.request();
    forced.force = true;
    assert_eq!(fx.rotate_with(forced).await, SUCCESS);
    let recovery = RotationRequest::rerotation(
        Trigger::Recovery,
        keyrotd::telemetry::RerotationReason::LostBeforeStorage,
        "keyrotd".into(),
    );
    assert!(fx.engine().check_trigger(KEY, &recovery).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_max_age_key_is_not_due_again_right_after_its_rotation() {
    let spec = Spec::default().key("max_age = \"30d\"");
    let fx = Fx::new(spec).start();
    // The status read that follows verify fails: Last Rotated comes from the regenerate response.
    fx.portal()
        .fail(Op::Status, 1, Fault::Delay(Duration::ZERO));
    fx.portal().fail(Op::Status, 10, Fault::Transient);
    assert_eq!(fx.rotate().await, SUCCESS);
    let config = fx.engine().config();
    let key = &config.keys[0];
    let now = fx.clock.now();
    let due =
        scheduler::next_due(key, &fx.journal(), None, now, 0.0).expect("a max_age key is due");
    assert!(
        due.at >= t0() + chrono::Duration::days(29),
        "due again at {}",
        due.at
    );
}

#[tokio::test(start_paused = true)]
async fn an_emergency_rotation_with_a_store_down_needs_allow_partial() {
    let fx = Fx::new(Spec::default());
    fx.store("b").down();
    let fx = fx.start();
    let mut forced = fx.request();
    forced.force = true;
    assert_eq!(
        fx.rotate_with(forced.clone()).await,
        RunResult::Finished(Outcome::Aborted)
    );
    forced.allow_partial = true;
    assert_eq!(
        fx.rotate_with(forced).await,
        RunResult::Finished(Outcome::Degraded)
    );
    assert_eq!(fx.holds("a"), Holds::Active);
    let audit = std::fs::read_to_string(fx.state_dir().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("partial destinations allowed"),
        "the choice is audited"
    );
    // b is filled by the background fill once it is back.
    fx.store("b").up();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(fx.holds("b"), Holds::Active);
    let _ = (StoreFault::Transient, dep("x", &["a"]), target());
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_an_issued_key_from_its_regenerate_response() {
    let fx = Fx::new(Spec::default());
    fx.store("b").delay_writes(Duration::from_secs(3));
    let fx = fx.start();
    let grace = Duration::from_secs(5);
    let idle = fx.engine().drain_deadline(grace);
    assert!(idle <= tokio::time::Instant::now() + grace);
    let engine = fx.engine().clone();
    let rotation = tokio::spawn(async move {
        let req = RotationRequest::new(Trigger::Manual, "t", "tester");
        engine.rotate(KEY, req).await.map(|r| r.1)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    fx.engine().shutdown.cancel();
    // store_deadline (10 s) counted from the response, not from the signal, plus time for the hooks.
    let bound = fx.engine().drain_deadline(grace);
    assert!(
        bound >= tokio::time::Instant::now() + Duration::from_secs(20),
        "shutdown would wait only {:?}",
        bound - tokio::time::Instant::now()
    );
    assert!(matches!(
        rotation.await.unwrap(),
        Ok(RunResult::Finished(Outcome::Success))
    ));
    assert!(fx.engine().drain_deadline(grace) <= tokio::time::Instant::now() + grace);
}

/// A verify that fails with `auto_recover = false` (the key was rotated elsewhere while keyrotd
/// stored its own) ends `failed` with drift flagged, never `success` with a dead key taken as active.
#[tokio::test(start_paused = true)]
async fn a_failed_verify_without_auto_recover_ends_failed_with_drift_flagged() {
    let fx = Fx::new(Spec::default().key("auto_recover = false"));
    fx.portal()
        .fail(Op::AuthCheck, 1, Fault::Delay(Duration::from_secs(1)));
    fx.store("b").delay_writes(Duration::from_millis(1500));
    let fx = fx.start();
    let provider = fx.provider.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let keyrotd::provider::Provider::Scripted(p) = &**provider {
            p.rotate_out_of_band();
        }
    });
    assert_eq!(fx.rotate().await, RunResult::Finished(Outcome::Failed));
    fx.settle().await;
    assert_eq!(fx.metric("keyrotd_drift", &[("key", KEY)]), 1.0);
    assert_eq!(fx.portal().regenerations(), 1, "nothing re-rotated");
    let j = fx.journal();
    assert_ne!(
        j.active_key_id.as_deref(),
        Some(fx.portal().key_id().as_str()),
        "the journal does not take the portal's key for one keyrotd stored"
    );
}

/// Drift that reconcile found stays flagged through a look that cannot read the provider: only a look
/// that sees the key in sync clears it.
#[tokio::test(start_paused = true)]
async fn a_look_that_cannot_read_the_provider_keeps_the_drift_flag() {
    let fx = Fx::new(Spec::default().key("auto_recover = false")).start();
    fx.settle().await;
    fx.portal().rotate_out_of_band();
    reconcile::reconcile_all(fx.engine()).await;
    assert_eq!(fx.metric("keyrotd_drift", &[("key", KEY)]), 1.0);
    fx.portal().fail(Op::Status, 10, Fault::Transient);
    reconcile::reconcile_all(fx.engine()).await;
    assert_eq!(
        fx.metric("keyrotd_drift", &[("key", KEY)]),
        1.0,
        "a look that could not read the provider clears nothing"
    );
    assert_eq!(fx.portal().regenerations(), 0);
}

#[tokio::test(start_paused = true)]
async fn drift_found_before_a_restart_is_shown_after_it_until_a_look_sees_the_key_in_sync() {
    let fx = Fx::new(Spec::default().key("auto_recover = false")).start();
    fx.settle().await;
    assert!(!fx.journal().drift);
    fx.portal().rotate_out_of_band();
    reconcile::reconcile_all(fx.engine()).await;
    assert_eq!(fx.metric("keyrotd_drift", &[("key", KEY)]), 1.0);
    assert!(fx.journal().drift, "the journal keeps the drift found");
    // Restarted: the new process shows the drift before it has looked at the key at all.
    let fx = fx.restart().await;
    assert_eq!(
        fx.metric("keyrotd_drift", &[("key", KEY)]),
        1.0,
        "a restart does not hide drift already found"
    );
    let view = fx.engine().key_views().into_iter().find(|v| v.name == KEY);
    assert!(view.is_some_and(|v| v.drift));
    // The owner puts the portal's key in every destination: the next look clears the flag, in the
    // journal too.
    let active = fx.portal().secret();
    for store in crate::fixture::STORES {
        fx.store(store)
            .put(&crate::fixture::target().to_string(), &active);
    }
    reconcile::reconcile_all(fx.engine()).await;
    assert_eq!(fx.metric("keyrotd_drift", &[("key", KEY)]), 0.0);
    assert!(!fx.journal().drift);
    assert_eq!(fx.portal().regenerations(), 0);
}
