//! Notifications to the key's owner: how every ending of a rotation is told (with its reason), that a
//! dependent failing authentication is told once per run of failures, and that no notice ever holds a
//! secret.

use std::time::Duration;

use keyrotd::engine::RunResult;
use keyrotd::notify::targets::NoticeEvent;
use keyrotd::telemetry::Outcome;
use keyrotd::testing::StoreFault;

use crate::fixture::{Fx, Spec};

use NoticeEvent::*;

#[tokio::test(start_paused = true)]
async fn every_ending_of_a_rotation_is_told_with_its_reason() {
    type Setup = fn(&Fx);
    let cases: &[(&str, Setup, Outcome, &[NoticeEvent])] = &[
        ("success", |_| {}, Outcome::Success, &[Started, Finished]),
        (
            "a store lags",
            |fx| fx.store("b").fail_writes(1000, StoreFault::Transient),
            Outcome::Degraded,
            &[Started, Degraded, Finished],
        ),
        (
            "no store keeps the key",
            |fx| {
                fx.store("a").fail_writes(1000, StoreFault::Transient);
                fx.store("b").fail_writes(1000, StoreFault::Transient);
            },
            Outcome::Failed,
            &[Started, KeyLost, Failed, Finished],
        ),
        (
            "preflight refuses",
            |fx| fx.store("b").down(),
            Outcome::Aborted,
            &[Started, Finished],
        ),
    ];
    for (name, setup, outcome, events) in cases {
        let fx = Fx::new(Spec::default());
        setup(&fx);
        let fx = fx.start();
        assert_eq!(fx.rotate().await, RunResult::Finished(*outcome), "{name}");
        assert_eq!(&fx.notice_events(), events, "{name}");
        let sent = fx.sent();
        for n in &sent {
            assert_eq!(n.key, "billing");
            assert_eq!(
                n.owner.as_ref().map(|o| o.name.as_str()),
                Some("team-payments")
            );
            assert!(
                n.rotation_id.is_some() && !n.text.is_empty(),
                "{name}: {n:?}"
            );
        }
        let finished = sent.iter().find(|n| n.event == Finished).unwrap();
        assert_eq!(finished.outcome, Some(*outcome), "{name}");
        if *outcome != Outcome::Success {
            let reason = finished.reason.as_deref().unwrap_or("");
            assert!(!reason.is_empty(), "{name}: the reason is told");
            for n in sent.iter().filter(|n| n.event != Started) {
                assert_eq!(n.reason.as_deref(), Some(reason), "{name}: {n:?}");
            }
        }
        if *outcome == Outcome::Success || *outcome == Outcome::Degraded {
            assert_eq!(finished.new_key_id, Some(fx.portal().key_id()), "{name}");
        }
        let outputs = fx.outputs();
        for secret in fx.secrets() {
            assert!(
                !outputs.contains(&secret),
                "{name}: a secret in the outputs"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_dependent_failing_authentication_is_told_once_per_run_of_failures() {
    let spec = Spec::default().key("watch = \"2m\"\nwatch_interval = \"10s\"");
    let fx = Fx::new(spec).start();
    // The rotation's hook and its two retries fail: the dependent keeps the old key until the
    // watch sends the hook again.
    fx.dependent("api").fail_reloads(3);
    assert_eq!(fx.rotate().await, RunResult::Finished(Outcome::Degraded));
    tokio::time::sleep(Duration::from_secs(150)).await;
    assert!(
        fx.metric(
            "keyrotd_post_rotation_auth_failures_total",
            &[("dependent", "api")]
        ) >= 3.0
    );
    let told: Vec<_> = fx
        .sent()
        .into_iter()
        .filter(|n| n.event == AuthFailures)
        .collect();
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].dependent.as_deref(), Some("api"));
    assert_eq!(told[0].new_key_id, Some(fx.portal().key_id()));
}

#[tokio::test(start_paused = true)]
async fn preflight_findings_read_as_values_not_as_rust_debug() {
    let fx = Fx::new(Spec::default()).start();
    let mut req = fx.request();
    req.dry_run = true;
    let RunResult::DryRun { findings, .. } = fx.rotate_with(req).await else {
        panic!("a dry run reports its findings")
    };
    let lines = findings.join("\n");
    assert!(
        lines.contains(&format!(
            "provider: key {} Active account acct",
            fx.portal().key_id()
        )),
        "{lines}"
    );
    for debug in ["Some(", "None", "\\\""] {
        assert!(!lines.contains(debug), "{debug} in the findings:\n{lines}");
    }
}
