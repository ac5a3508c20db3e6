//! Two live keys, in process: a scripted vendor that keeps the old key valid while a new one exists
//! (`overlap = "dual"`), in-memory destinations and scripted dependents that report the fingerprint
//! of the key they hold. The old key goes only once every dependent confirmed the new one; a
//! dependent that never does keeps it live; a failing canary rolls the rollout back; a crash at any
//! of the new journal phases is finished by recovery.

use std::time::Duration;

use keyrotd::engine::{EventKind, RunResult, recovery, scheduler};
use keyrotd::journal::{KeyJournal, Phase, RotationMeta, Trigger};
use keyrotd::telemetry::Outcome;
use keyrotd::testing::{Fault, Op, StoreFault};

use crate::fixture::{Fx, Holds, KEY, Spec, dep, fp};

fn spec() -> Spec {
    Spec::default()
        .dual()
        .dependents(vec![dep("api", &["a"]), dep("batch", &["b"])])
        .key("confirm_deadline = \"30s\"")
}

fn events(fx: &Fx, id: uuid::Uuid) -> Vec<(EventKind, String)> {
    let record = fx.engine().rotation(id).expect("the rotation's record");
    record
        .events
        .into_iter()
        .map(|e| (e.event, e.detail))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_old_key_is_revoked_only_after_every_dependent_confirmed_the_new_one() {
    let fx = Fx::new(spec()).start();
    // One dependent takes a while: the two keys overlap at least that long.
    fx.dependent("api").delay_reloads(Duration::from_secs(2));
    let old_id = fx.portal().key_id();
    let (id, result) = fx
        .engine()
        .rotate(KEY, fx.request())
        .await
        .expect("started");
    assert_eq!(result, RunResult::Finished(Outcome::Success));

    let new_id = fx.portal().key_id();
    assert_ne!(new_id, old_id);
    assert_eq!(fx.portal().live_ids(), vec![new_id.clone()], "one live key");
    assert_eq!(fx.portal().revoked(), vec![old_id.clone()]);
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active)
    );
    for d in ["api", "batch"] {
        assert_eq!(fx.dependent(d).held(), Some(fx.portal().secret()), "{d}");
    }

    // The record tells the order: both confirmations, then the revoke.
    let ev = events(&fx, id);
    let at = |kind: EventKind, what: &str| {
        ev.iter()
            .position(|(k, d)| *k == kind && d.contains(what))
            .unwrap_or_else(|| panic!("no {kind} {what} in {ev:?}"))
    };
    let revoked = at(EventKind::Revoked, &old_id);
    assert!(at(EventKind::Confirmed, "api") < revoked, "{ev:?}");
    assert!(at(EventKind::Confirmed, "batch") < revoked, "{ev:?}");

    let j = fx.journal();
    assert_eq!(j.phase, Phase::Idle);
    assert_eq!(j.active_key_id.as_deref(), Some(new_id.as_str()));
    assert!(j.pending_revoke.is_empty() && !j.lost);
    assert_eq!(
        fx.metric("keyrotd_dependents_confirmed", &[("key", KEY)]),
        2.0
    );
    assert!(fx.metric("keyrotd_key_overlap_seconds", &[("key", KEY)]) >= 2.0);
    assert_eq!(
        fx.metric(
            "keyrotd_key_old_key_live_since_timestamp_seconds",
            &[("key", KEY)]
        ),
        0.0
    );
    assert_eq!(fx.portal().calls(Op::Regenerate), 0, "nothing regenerated");
}

#[tokio::test(start_paused = true)]
async fn a_dependent_that_never_picks_up_the_new_key_keeps_the_old_one_live() {
    let fx = Fx::new(spec()).start();
    fx.dependent("batch").ignore_reloads(true);
    let old_id = fx.portal().key_id();
    assert_eq!(
        fx.rotate().await,
        RunResult::Finished(Outcome::Degraded),
        "not confirmed by its deadline"
    );
    let live = fx.portal().live_ids();
    assert_eq!(live.len(), 2, "{live:?}");
    assert!(live.contains(&old_id));
    assert!(fx.portal().revoked().is_empty());
    // The dependent that kept its key still authenticates.
    assert!(fx.portal().accepts(&fx.original));

    let j = fx.journal();
    assert_eq!(j.pending_revoke, vec![old_id]);
    assert_eq!(j.unconfirmed, vec!["batch".to_string()]);
    assert_eq!(
        j.revoke_due, None,
        "no revoke_after: kept until someone acts"
    );
    let unconfirmed = |d| {
        fx.metric(
            "keyrotd_dependent_unconfirmed",
            &[("key", KEY), ("dependent", d)],
        )
    };
    assert_eq!((unconfirmed("batch"), unconfirmed("api")), (1.0, 0.0));
    assert!(
        fx.metric(
            "keyrotd_key_old_key_live_since_timestamp_seconds",
            &[("key", KEY)]
        ) > 0.0
    );
    assert_eq!(
        fx.metric("keyrotd_dependents_confirmed", &[("key", KEY)]),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn revoke_after_retires_the_kept_key_later_and_says_why() {
    let fx = Fx::new(spec().key("revoke_after = \"10m\"")).start();
    fx.dependent("batch").ignore_reloads(true);
    let old_id = fx.portal().key_id();
    tokio::spawn(scheduler::run(fx.engine().clone()));
    assert_eq!(fx.rotate().await, RunResult::Finished(Outcome::Degraded));
    assert_eq!(fx.portal().live_ids().len(), 2);

    tokio::time::sleep(Duration::from_secs(5 * 60)).await;
    assert_eq!(fx.portal().live_ids().len(), 2, "not before revoke_after");
    tokio::time::sleep(Duration::from_secs(6 * 60)).await;
    assert_eq!(fx.portal().revoked(), vec![old_id.clone()]);
    assert_eq!(fx.portal().live_ids(), vec![fx.portal().key_id()]);

    let j = fx.journal();
    assert!(j.pending_revoke.is_empty() && j.revoke_due.is_none());
    assert_eq!(j.phase, Phase::Idle);
    let audit = std::fs::read_to_string(fx.state_dir().join("audit.jsonl")).unwrap();
    let revoked: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &serde_json::Value| r["event"] == "revoked")
        .collect();
    assert_eq!(revoked.len(), 1, "{audit}");
    assert_eq!(revoked[0]["old_key_id"], old_id.as_str());
    let why = revoked[0]["detail"].as_str().unwrap_or_default();
    assert!(
        why.contains("revoke_after") && why.contains("batch"),
        "{why}"
    );
    assert_eq!(
        fx.metric(
            "keyrotd_dependent_unconfirmed",
            &[("key", KEY), ("dependent", "batch")]
        ),
        0.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_canary_rolls_back_and_the_others_are_never_told() {
    let spec = Spec::default()
        .dual()
        .dependents(vec![dep("canary", &["a"]), dep("api", &["b"])])
        .key("rollout = \"canary\"\ncanary_watch = \"20s\"\nwatch_interval = \"2s\"")
        .dep_lines("canary", "canary = true");
    let fx = Fx::new(spec).start();
    fx.dependent("canary").fail_after_reload();
    let old_id = fx.portal().key_id();

    let (id, result) = fx.engine().rotate(KEY, fx.request()).await.unwrap();
    assert_eq!(result, RunResult::Finished(Outcome::Aborted));

    assert!(
        fx.dependent("api").reload_calls().is_empty(),
        "the other dependents are never told"
    );
    assert_eq!(fx.portal().live_ids(), vec![old_id.clone()], "old key live");
    assert_eq!(fx.portal().revoked().len(), 1, "the new key was revoked");
    assert_ne!(fx.portal().revoked()[0], old_id);
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active),
        "the old value is back in every destination"
    );
    assert_eq!(fx.portal().secret(), fx.original);
    assert_eq!(
        fx.dependent("canary").held(),
        Some(fx.original.clone()),
        "the canary was told to reload the old value"
    );
    let ev = events(&fx, id);
    assert!(
        ev.iter()
            .any(|(k, d)| *k == EventKind::CanaryFailed && d.contains("canary")),
        "{ev:?}"
    );
    let j = fx.journal();
    assert_eq!(j.phase, Phase::Idle);
    assert_eq!(j.last_outcome, Some(Outcome::Aborted));
    assert_eq!(j.active_fingerprint, Some(fp(&fx.original)));
}

#[tokio::test(start_paused = true)]
async fn a_healthy_canary_is_watched_before_the_others_are_told() {
    let spec = Spec::default()
        .dual()
        .dependents(vec![dep("canary", &["a"]), dep("api", &["b"])])
        .key("rollout = \"canary\"\ncanary_watch = \"20s\"\nwatch_interval = \"2s\"")
        .dep_lines("canary", "canary = true");
    let fx = Fx::new(spec).start();
    assert_eq!(fx.rotate().await, RunResult::Finished(Outcome::Success));
    let canary = fx.dependent("canary").reload_calls();
    let api = fx.dependent("api").reload_calls();
    assert_eq!((canary.len(), api.len()), (1, 1));
    assert!(
        api[0] - canary[0] >= Duration::from_secs(20),
        "told {:?} after the canary",
        api[0] - canary[0]
    );
    assert_eq!(fx.portal().live_ids().len(), 1);
}

/// Re-rotation after a lost key never revokes the only working key: here no destination takes the
/// new key, so the new key (held by nobody) is revoked and the old one, which every destination and
/// dependent still has, stays. The key is not lost and nothing is owed.
#[tokio::test(start_paused = true)]
async fn a_new_key_no_destination_takes_is_revoked_never_the_old_one() {
    let fx = Fx::new(spec().key("store_deadline = \"5s\"")).start();
    // Both stores pass preflight, then refuse every write until the deadline.
    fx.store("a").fail_writes(1000, StoreFault::Transient);
    fx.store("b").fail_writes(1000, StoreFault::Transient);
    let old_id = fx.portal().key_id();
    assert_eq!(fx.rotate().await, RunResult::Finished(Outcome::Failed));
    assert_eq!(fx.portal().live_ids(), vec![old_id.clone()]);
    assert_eq!(fx.portal().revoked().len(), 1);
    assert_ne!(fx.portal().revoked()[0], old_id);
    let j = fx.journal();
    assert!(!j.lost, "the old key works: nothing is lost");
    assert_eq!(j.phase, Phase::Idle);
    assert_eq!(j.active_key_id.as_deref(), Some(old_id.as_str()));
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active)
    );
}

#[tokio::test(start_paused = true)]
async fn a_create_whose_answer_was_lost_is_found_revoked_and_made_again() {
    let fx = Fx::new(spec()).start();
    fx.portal().fail(Op::Create, 1, Fault::Lose);
    let old_id = fx.portal().key_id();
    assert_eq!(fx.rotate().await, RunResult::Finished(Outcome::Success));
    assert_eq!(fx.portal().calls(Op::Create), 2);
    let revoked = fx.portal().revoked();
    assert_eq!(revoked.len(), 2, "the orphan and the old key: {revoked:?}");
    assert!(revoked.contains(&old_id));
    assert_eq!(fx.portal().live_ids(), vec![fx.portal().key_id()]);
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active)
    );
}

/// A journal left at a dual phase, as a crash would leave it, and the vendor's keys to match.
async fn crashed_at(phase: Phase, stored: bool) -> Fx {
    let fx = Fx::new(spec());
    let meta = RotationMeta {
        rotation_id: uuid::Uuid::new_v4(),
        trigger: Trigger::Manual,
        reason: "test".into(),
        requested_by: "tester".into(),
        started_at: crate::fixture::t0(),
        approved_by: None,
    };
    let old_id = fx.portal().key_id();
    let mut j = fx.journal();
    j.creating(
        &meta,
        Some(old_id.clone()),
        vec![old_id.clone()],
        meta.started_at,
    );
    if phase != Phase::Creating {
        let new = fx.portal().create().await.expect("create");
        let new_secret = secrecy::ExposeSecret::expose_secret(&new.secret).to_string();
        j.created(&new.key_id, &fp(&new_secret), meta.started_at);
        if stored {
            for s in ["a", "b"] {
                fx.store(s)
                    .put(&crate::fixture::target().to_string(), &new_secret);
            }
        }
        match phase {
            Phase::Confirming => j.confirming(),
            Phase::Revoking => {
                j.confirming();
                j.revoking(vec![old_id]);
            }
            _ => {}
        }
    } else {
        // The create went through; its answer died with the process.
        fx.portal().create().await.expect("create");
    }
    fx.write_journal(&j);
    fx.start_unready()
}

async fn converged(fx: &Fx) -> KeyJournal {
    recovery::recover_all(fx.engine()).await;
    fx.settle().await;
    let live = fx.portal().live_ids();
    assert_eq!(live.len(), 1, "one live key in the end: {live:?}");
    assert_eq!(live[0], fx.portal().key_id());
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active),
        "every destination holds it"
    );
    let j = fx.journal();
    assert_eq!(j.phase, Phase::Idle, "{j:?}");
    j
}

#[tokio::test(start_paused = true)]
async fn a_crash_at_each_dual_phase_converges_on_one_live_key() {
    // (phase, the new key already in the destinations, creates recovery may make)
    for (phase, stored, creates) in [
        (Phase::Creating, false, 1),
        (Phase::Storing, false, 1),
        (Phase::Storing, true, 0),
        (Phase::Confirming, true, 0),
        (Phase::Revoking, true, 0),
    ] {
        let fx = crashed_at(phase, stored).await;
        let before = fx.portal().calls(Op::Create);
        converged(&fx).await;
        assert_eq!(
            fx.portal().calls(Op::Create) - before,
            creates,
            "{phase:?} stored {stored}"
        );
        assert!(
            !fx.portal().accepts(&fx.original),
            "{phase:?}: old key revoked"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn no_secret_of_a_dual_rotation_reaches_an_output() {
    let fx = Fx::new(spec()).start();
    fx.dependent("batch").ignore_reloads(true);
    assert_eq!(fx.rotate().await, RunResult::Finished(Outcome::Degraded));
    let out = fx.outputs();
    for s in fx.secrets() {
        assert!(!out.contains(&s), "a secret leaked");
    }
}

#[tokio::test(start_paused = true)]
async fn a_dual_create_waits_for_a_lease_being_rechecked_after_a_store_outage() {
    use keyrotd::coordination::kv::{Kv, memory::MemoryKv};
    use keyrotd::coordination::{Coordinator, FenceError, Replica};
    use std::sync::Arc;

    let fx = Fx::new(spec());
    let kv = Arc::new(MemoryKv::default());
    let ttl = Duration::from_secs(30);
    let config = keyrotd::config::CoordinationConfig {
        store: "a".into(),
        path: "keyrotd/leases".into(),
        ttl,
    };
    let replica = Arc::new(Coordinator::new(
        Replica::named("host-x", 1, crate::fixture::t0()),
        Kv::Memory(kv.clone()),
        &config,
        fx.clock.clone(),
        Arc::new(keyrotd::telemetry::Metrics::new()),
    ));
    let keys = vec![KEY.to_string()];
    replica.tick(&keys, |_| false).await;
    assert!(replica.holds(KEY));
    // The lease store goes away for a ttl: the key stays held, the lease unrenewed.
    kv.set_down(true);
    tokio::time::advance(ttl).await;
    replica.tick(&keys, |_| false).await;
    assert!(matches!(
        replica.may_regenerate(KEY),
        Err(FenceError::Unrenewed(_))
    ));
    let fx = fx.start_replica(replica.clone());
    let rotation = {
        let engine = fx.engine().clone();
        let req = fx.request();
        tokio::spawn(async move { engine.rotate(KEY, req).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!rotation.is_finished(), "the create waits for the lease");
    assert_eq!(fx.portal().calls(Op::Create), 0);
    // The store is back: the next ticks renew the lease and re-check the key, and the create goes.
    kv.set_down(false);
    replica.tick(&keys, |_| false).await;
    replica.tick(&keys, |_| false).await;
    let (_, result) = rotation.await.expect("the rotation task").expect("started");
    assert_eq!(result, RunResult::Finished(Outcome::Success));
    assert_eq!(fx.portal().calls(Op::Create), 1);
}
