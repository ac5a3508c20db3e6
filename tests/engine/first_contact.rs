//! First contact: a key keyrotd has never issued nor adopted is reported, not regenerated, until an
//! operator rotates it (or the key sets `on_first_contact = "rotate"`). Once keyrotd holds it,
//! scheduled rotations and drift repair work as for any key.

use keyrotd::engine::reconcile::{Reconciled, reconcile_key};
use keyrotd::engine::{RotationRequest, RunResult, Trigger, TriggerError};
use keyrotd::notify::targets::NoticeEvent;
use keyrotd::telemetry::Outcome;

use crate::fixture::{Fx, Holds, KEY, Spec, target};

/// A key keyrotd never saw, whose destinations hold a value the portal refuses (a key from an old
/// set-up) or nothing.
fn first_contact(spec: Spec, old_value: Option<&str>) -> Fx {
    let fx = Fx::new(Spec {
        known: false,
        ..spec
    });
    if let Some(v) = old_value {
        for s in ["a", "b"] {
            fx.store(s).put(&target().to_string(), v);
        }
    }
    fx.start()
}

async fn reconcile(fx: &Fx) -> Reconciled {
    let config = fx.engine().config();
    reconcile_key(fx.engine(), &config.keys[0], true).await
}

fn scheduled() -> RotationRequest {
    RotationRequest::new(Trigger::Schedule, "schedule", "keyrotd")
}

#[tokio::test(start_paused = true)]
async fn a_key_never_held_is_reported_and_left_alone_until_an_operator_rotates_it() {
    for old_value in [Some("a-value-the-portal-refuses"), None] {
        let fx = first_contact(Spec::default().key("schedule = \"@hourly\""), old_value);
        for _ in 0..5 {
            assert_eq!(reconcile(&fx).await, Reconciled::FirstContact);
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
        assert_eq!(
            fx.portal().regenerations(),
            0,
            "nothing regenerated ({old_value:?})"
        );
        assert_eq!(fx.metric("keyrotd_drift", &[("key", KEY)]), 1.0);
        let view = fx.engine().key_views().remove(0);
        assert!(view.first_contact && view.drift, "{view:?}");
        let told: Vec<_> = fx
            .sent()
            .into_iter()
            .filter(|n| n.event == NoticeEvent::DriftDetected)
            .collect();
        assert_eq!(told.len(), 1, "told once, not at every round: {told:?}");
        assert!(
            told[0]
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("first contact"),
            "{told:?}"
        );
        assert_eq!(told[0].generated_by.as_deref(), Some("role:test"));
        // Its schedule does not regenerate it either.
        assert!(matches!(
            fx.engine().check_trigger(KEY, &scheduled()),
            Err(TriggerError::FirstContact { .. })
        ));

        // The owner's first rotation populates every destination; from then on it is a key like
        // any other.
        assert_eq!(fx.rotate().await, RunResult::Finished(Outcome::Success));
        assert_eq!(
            (fx.holds("a"), fx.holds("b")),
            (Holds::Active, Holds::Active)
        );
        assert_eq!(reconcile(&fx).await, Reconciled::InSync);
        assert_eq!(fx.metric("keyrotd_drift", &[("key", KEY)]), 0.0);
        assert!(!fx.engine().key_views()[0].first_contact);
        assert!(fx.engine().check_trigger(KEY, &scheduled()).is_ok());
        fx.portal().rotate_out_of_band();
        assert_eq!(
            reconcile(&fx).await,
            Reconciled::Drift { rerotating: true },
            "drift repair as before"
        );
        fx.settle().await;
        assert_eq!(fx.portal().regenerations(), 2);
    }
}

#[tokio::test(start_paused = true)]
async fn on_first_contact_rotate_populates_the_key_by_itself() {
    let spec = Spec::default().key("on_first_contact = \"rotate\"");
    let fx = first_contact(spec, Some("a-value-the-portal-refuses"));
    assert!(!fx.engine().key_views()[0].first_contact);
    assert!(fx.engine().check_trigger(KEY, &scheduled()).is_ok());
    assert_eq!(reconcile(&fx).await, Reconciled::Drift { rerotating: true });
    fx.settle().await;
    assert_eq!(fx.portal().regenerations(), 1);
    assert_eq!(
        (fx.holds("a"), fx.holds("b")),
        (Holds::Active, Holds::Active)
    );
}

#[tokio::test(start_paused = true)]
async fn a_destination_holding_the_working_key_is_adopted_and_ends_first_contact() {
    let fx = Fx::new(Spec {
        known: false,
        ..Spec::default()
    });
    fx.store("a").put(&target().to_string(), &fx.original);
    let fx = fx.start();
    // The first look at start (no action) adopts it; b is then stale and copied from a.
    let config = fx.engine().config();
    reconcile_key(fx.engine(), &config.keys[0], false).await;
    assert!(fx.journal().active_fingerprint.is_some());
    assert!(fx.engine().check_trigger(KEY, &scheduled()).is_ok());
    assert_eq!(reconcile(&fx).await, Reconciled::Repaired);
    fx.settle().await;
    assert_eq!(fx.portal().regenerations(), 0);
    assert_eq!(fx.holds("b"), Holds::Active, "copied, not regenerated");
}
