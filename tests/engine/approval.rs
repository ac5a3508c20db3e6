//! The approval gate, through the real scheduler under tokio's paused clock: a due rotation of a key
//! with `approval` runs preflight, waits (claim free, journal, gauge, notification) and rotates only
//! once approved; without an approval it ends `skipped`; an emergency rotation overtakes it; a restart
//! keeps it; and re-rotations never wait.

use std::time::Duration;

use keyrotd::engine::{LivePhase, RotationRequest, RunResult, Trigger, TriggerError, recovery};
use keyrotd::notify::targets::NoticeEvent;
use keyrotd::telemetry::{Outcome, RerotationReason};

use crate::fixture::{Fx, Holds, KEY, Spec, t0};

/// A key due at 11:00 (the fixture's clock starts at 10:00) that needs an approval within 30 minutes.
fn gated() -> Spec {
    Spec::default().key("schedule = \"0 11 * * *\"\napproval = { timeout = \"30m\" }")
}

/// Runs the scheduler until the 11:00 rotation waits for its approval.
async fn until_pending(fx: &Fx) {
    fx.run_scheduler();
    tokio::time::sleep(Duration::from_secs(3600 + 5)).await;
    assert!(
        fx.journal().pending_approval.is_some(),
        "the 11:00 rotation waits for an approval: {:?}",
        fx.journal()
    );
}

fn phase(fx: &Fx) -> LivePhase {
    fx.engine().key_views()[0].phase
}

fn pending_gauge(fx: &Fx) -> f64 {
    fx.metric("keyrotd_rotation_pending", &[("key", KEY)])
}

fn outcomes(fx: &Fx, outcome: Outcome) -> f64 {
    fx.metric(
        "keyrotd_rotations_total",
        &[("key", KEY), ("outcome", outcome.as_str())],
    )
}

#[tokio::test(start_paused = true)]
async fn a_due_rotation_waits_for_an_approval_and_then_rotates_naming_the_approver() {
    let fx = Fx::new(gated()).start();
    until_pending(&fx).await;
    // Nothing destroyed, and everyone can see it waits.
    assert_eq!(fx.portal().regenerations(), 0);
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active)
    );
    assert_eq!(pending_gauge(&fx), 1.0);
    assert_eq!(phase(&fx), LivePhase::AwaitingApproval);
    assert!(
        !fx.engine().is_busy(KEY),
        "the claim is free while it waits"
    );
    let view = fx.engine().key_views().remove(0);
    let pending = view.pending_approval.expect("the key view shows the wait");
    assert_eq!(
        pending.until - pending.asked_at,
        chrono::Duration::minutes(30)
    );
    let asked = fx.sent();
    let ask = asked
        .iter()
        .find(|n| n.event == NoticeEvent::PendingApproval)
        .expect("the owner was asked");
    assert_eq!(ask.approval_until, Some(pending.until));
    assert_eq!(
        ask.owner.as_ref().map(|o| o.name.as_str()),
        Some("team-payments")
    );
    assert!(
        !fx.notice_events().contains(&NoticeEvent::Started),
        "not started before the approval: {:?}",
        fx.notice_events()
    );

    let id = fx
        .engine()
        .approve(KEY, "alice@ops".into(), "change window open".into())
        .await
        .expect("approved");
    assert_eq!(
        id, pending.rotation_id,
        "the approval continues the same rotation"
    );
    fx.settle().await;
    assert_eq!(fx.portal().regenerations(), 1);
    assert_eq!(fx.last_outcome(), Some(Outcome::Success));
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active)
    );
    assert_eq!(pending_gauge(&fx), 0.0);
    assert!(fx.journal().pending_approval.is_none());
    // The audit log tells the story of one rotation, and names the approver and the owner.
    let audit = fx.audit();
    let of_it: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|r| r["rotation_id"] == id.to_string())
        .collect();
    let events: Vec<&str> = of_it.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events.first().copied(), Some("started"), "{events:?}");
    for want in ["pending_approval", "approved", "regenerated", "finished"] {
        assert!(events.contains(&want), "{want} missing from {events:?}");
    }
    let approved = of_it.iter().find(|r| r["event"] == "approved").unwrap();
    assert_eq!(approved["approved_by"], "alice@ops");
    assert_eq!(approved["detail"], "change window open");
    let finished = of_it.iter().find(|r| r["event"] == "finished").unwrap();
    assert_eq!(finished["approved_by"], "alice@ops");
    assert!(
        audit.iter().all(|r| r["owner"] == "team-payments"),
        "every record names the owner: {audit:#?}"
    );
    assert!(fx.notice_events().contains(&NoticeEvent::Started));
    // The next run is tomorrow's.
    let next = fx.engine().key_views()[0].next_rotation.unwrap();
    assert_eq!(next, t0() + chrono::Duration::hours(25));
}

#[tokio::test(start_paused = true)]
async fn without_an_approval_in_time_the_rotation_is_skipped_and_the_schedule_moves_on() {
    let fx = Fx::new(gated()).start();
    until_pending(&fx).await;
    tokio::time::sleep(Duration::from_secs(30 * 60)).await;
    assert_eq!(fx.portal().regenerations(), 0, "nothing was regenerated");
    assert_eq!(fx.last_outcome(), Some(Outcome::Skipped));
    assert_eq!(outcomes(&fx, Outcome::Skipped), 1.0);
    assert_eq!(pending_gauge(&fx), 0.0);
    assert_eq!(phase(&fx), LivePhase::Idle);
    let finished = fx
        .sent()
        .into_iter()
        .find(|n| n.event == NoticeEvent::Finished)
        .expect("the owner hears it was skipped");
    assert_eq!(finished.outcome, Some(Outcome::Skipped));
    assert!(
        finished
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("no approval"),
        "{finished:?}"
    );
    // Too late now; and the next due time is tomorrow's run.
    let late = fx
        .engine()
        .approve(KEY, "bob".into(), "sorry, late".into())
        .await;
    assert!(
        matches!(late, Err(TriggerError::NothingToApprove(_))),
        "{late:?}"
    );
    let next = fx.engine().key_views()[0].next_rotation.unwrap();
    assert_eq!(next, t0() + chrono::Duration::hours(25));
    assert_eq!(fx.portal().regenerations(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_emergency_rotation_is_accepted_at_once_while_waiting_and_overtakes_it() {
    let fx = Fx::new(gated()).start();
    until_pending(&fx).await;
    let mut forced = fx.request();
    forced.force = true;
    assert!(fx.engine().check_trigger(KEY, &forced).is_ok());
    assert_eq!(
        fx.rotate_with(forced).await,
        RunResult::Finished(Outcome::Success)
    );
    assert_eq!(fx.portal().regenerations(), 1);
    assert!(fx.journal().pending_approval.is_none());
    assert_eq!(pending_gauge(&fx), 0.0);
    assert_eq!(
        outcomes(&fx, Outcome::Skipped),
        1.0,
        "the waiting one was overtaken"
    );
    assert_eq!(outcomes(&fx, Outcome::Success), 1.0);
    let audit = fx.audit();
    assert!(
        audit.iter().any(|r| r["event"] == "finished"
            && r["outcome"] == "skipped"
            && r["detail"].as_str().unwrap_or("").contains("overtaken")),
        "{audit:#?}"
    );
    // Nothing is left to approve, and the timeout passing later changes nothing.
    tokio::time::sleep(Duration::from_secs(40 * 60)).await;
    assert_eq!(fx.portal().regenerations(), 1);
    assert_eq!(fx.last_outcome(), Some(Outcome::Success));
}

#[tokio::test(start_paused = true)]
async fn a_restart_keeps_the_pending_approval_and_never_rotates_without_it() {
    let fx = Fx::new(gated()).start();
    until_pending(&fx).await;
    let before = fx.journal().pending_approval.clone().unwrap();
    let fx = fx.restart().await;
    fx.run_scheduler();
    assert_eq!(pending_gauge(&fx), 1.0, "the new process knows it waits");
    assert_eq!(phase(&fx), LivePhase::AwaitingApproval);
    assert_eq!(fx.journal().pending_approval, Some(before.clone()));
    tokio::time::sleep(Duration::from_secs(10 * 60)).await;
    assert_eq!(
        fx.portal().regenerations(),
        0,
        "no rotation without its approval"
    );
    // Approved after the restart: the same rotation goes on, with preflight run again (ten
    // minutes passed).
    let probes = fx.dependent("api").probes();
    let id = fx
        .engine()
        .approve(KEY, "carol".into(), "after restart".into())
        .await
        .unwrap();
    assert_eq!(id, before.rotation_id);
    fx.settle().await;
    assert_eq!(fx.portal().regenerations(), 1);
    assert_eq!(fx.last_outcome(), Some(Outcome::Success));
    assert!(
        fx.dependent("api").probes() > probes,
        "preflight ran again after a long wait"
    );
}

#[tokio::test(start_paused = true)]
async fn a_restart_past_the_timeout_skips_it() {
    let fx = Fx::new(gated()).start();
    until_pending(&fx).await;
    let fx = fx.restart().await;
    // The new process's scheduler ends the wait at its timeout.
    fx.run_scheduler();
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(fx.portal().regenerations(), 0);
    assert_eq!(fx.last_outcome(), Some(Outcome::Skipped));
    assert!(fx.journal().pending_approval.is_none());
}

#[tokio::test(start_paused = true)]
async fn an_approval_soon_after_the_announcement_reuses_its_preflight_and_a_late_one_does_not() {
    // Soon: preflight is not repeated (no second probe of the dependent).
    let fx = Fx::new(gated()).start();
    until_pending(&fx).await;
    let probes = fx.dependent("api").probes();
    fx.engine()
        .approve(KEY, "alice".into(), "now".into())
        .await
        .unwrap();
    fx.settle().await;
    assert_eq!(fx.last_outcome(), Some(Outcome::Success));
    assert_eq!(fx.dependent("api").probes(), probes, "preflight reused");

    // Late: a store went down meanwhile; preflight runs again and stops the rotation.
    let fx = Fx::new(gated()).start();
    until_pending(&fx).await;
    tokio::time::sleep(Duration::from_secs(10 * 60)).await;
    fx.store("b").down();
    fx.engine()
        .approve(KEY, "alice".into(), "late".into())
        .await
        .unwrap();
    fx.settle().await;
    assert_eq!(fx.last_outcome(), Some(Outcome::Aborted));
    assert_eq!(fx.portal().regenerations(), 0, "nothing destroyed");
}

#[tokio::test(start_paused = true)]
async fn re_rotations_of_a_lost_key_and_drift_repairs_never_wait() {
    // A lost key (the old one is already dead): re-rotated at once.
    let fx = Fx::new(gated());
    let mut j = fx.journal();
    j.lost = true;
    fx.write_journal(&j);
    let fx = fx.start();
    recovery::recovery_tick(fx.engine()).await.finished().await;
    fx.settle().await;
    assert_eq!(fx.portal().regenerations(), 1);
    assert_eq!(fx.last_outcome(), Some(Outcome::Success));
    assert!(fx.journal().pending_approval.is_none());
    assert!(!fx.notice_events().contains(&NoticeEvent::PendingApproval));

    // Drift (someone rotated in the portal): the repair re-rotates without asking.
    let fx = Fx::new(gated()).start();
    fx.portal().rotate_out_of_band();
    let config = fx.engine().config();
    keyrotd::engine::reconcile::reconcile_key(fx.engine(), &config.keys[0], true).await;
    fx.settle().await;
    assert_eq!(
        fx.portal().regenerations(),
        1,
        "keyrotd's, after the out-of-band one"
    );
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active)
    );
    assert!(fx.journal().pending_approval.is_none());
    let drift = fx
        .sent()
        .into_iter()
        .find(|n| n.event == NoticeEvent::DriftDetected)
        .expect("the owner hears of the drift");
    assert_eq!(
        drift.generated_by.as_deref(),
        Some("user:someone"),
        "with who rotated in the portal"
    );

    // An explicit re-rotation request is never held either.
    let fx = Fx::new(gated()).start();
    let req = RotationRequest::rerotation(
        Trigger::Recovery,
        RerotationReason::LostBeforeStorage,
        "keyrotd".into(),
    );
    assert_eq!(
        fx.rotate_with(req).await,
        RunResult::Finished(Outcome::Success)
    );
    assert!(fx.journal().pending_approval.is_none());
}

#[tokio::test(start_paused = true)]
async fn an_approval_for_a_key_another_replica_holds_answers_naming_the_holder() {
    use keyrotd::coordination::kv::{Kv, memory::MemoryKv};
    use keyrotd::coordination::{Coordinator, Replica};
    use std::sync::Arc;

    let fx = Fx::new(gated());
    let kv = Arc::new(MemoryKv::default());
    let config = keyrotd::config::CoordinationConfig {
        store: "a".into(),
        path: "keyrotd/leases".into(),
        ttl: Duration::from_secs(30),
    };
    let replica = |name: &str| {
        Arc::new(Coordinator::new(
            Replica::named(name, 1, t0()),
            Kv::Memory(kv.clone()),
            &config,
            fx.clock.clone(),
            Arc::new(keyrotd::telemetry::Metrics::new()),
        ))
    };
    let (x, y) = (replica("host-x"), replica("host-y"));
    let keys = vec![KEY.to_string()];
    for _ in 0..3 {
        x.tick(&keys, |_| false).await;
        y.tick(&keys, |_| false).await;
    }
    let (holder, follower) = if x.holds(KEY) { (x, y) } else { (y, x) };
    assert!(holder.holds(KEY) && !follower.holds(KEY));
    let fx = fx.start_replica(follower);
    let refused = fx
        .engine()
        .approve(KEY, "alice".into(), "wrong host".into())
        .await;
    // Refused as a rotation request would be, naming the holder as this replica knows it.
    let rotate = fx.engine().check_trigger(KEY, &fx.request());
    match (refused, rotate) {
        (
            Err(TriggerError::HeldElsewhere { holder: named, .. }),
            Err(TriggerError::HeldElsewhere {
                holder: by_rotate, ..
            }),
        ) => assert_eq!(named, by_rotate),
        other => panic!("expected both refused as held elsewhere: {other:?}"),
    }
    assert_eq!(fx.portal().regenerations(), 0);
}
