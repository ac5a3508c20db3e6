//! The invalidation window's shape, from the engine's own event timestamps: destinations are written
//! in parallel; each hook fires as soon as its own `reads_from` stores confirm; verify never delays a
//! hook.

use std::time::Duration;

use keyrotd::engine::{EventKind, RotationRecord, RunResult};
use keyrotd::telemetry::Outcome;
use keyrotd::testing::{Fault, Op};

use crate::fixture::{Fx, KEY, Spec, dep};

fn at(r: &RotationRecord, kind: EventKind, detail: &str) -> chrono::DateTime<chrono::Utc> {
    r.events
        .iter()
        .find(|e| e.event == kind && e.detail.starts_with(detail))
        .unwrap_or_else(|| panic!("no {kind} {detail:?} in {:#?}", r.events))
        .ts
}

#[tokio::test(start_paused = true)]
async fn stores_run_in_parallel_and_each_hook_goes_when_its_stores_confirm() {
    let spec = Spec::default().dependents(vec![dep("fast", &["a"]), dep("slow", &["b"])]);
    let fx = Fx::new(spec);
    fx.store("a").delay_writes(Duration::from_millis(400));
    fx.store("b").delay_writes(Duration::from_millis(500));
    // The provider's auth check (verify) answers only after two seconds.
    fx.portal()
        .fail(Op::AuthCheck, 1, Fault::Delay(Duration::from_secs(2)));
    let fx = fx.start();

    let (id, result) = fx.engine().rotate(KEY, fx.request()).await.unwrap();
    assert_eq!(result, RunResult::Finished(Outcome::Success));
    let r = fx.engine().rotation(id).unwrap();
    let start = at(&r, EventKind::Regenerated, "");
    let ms = |t: chrono::DateTime<chrono::Utc>| (t - start).num_milliseconds();
    let (stored_a, stored_b) = (
        ms(at(&r, EventKind::Stored, "a ")),
        ms(at(&r, EventKind::Stored, "b ")),
    );
    let (fast, slow) = (
        ms(at(&r, EventKind::Notified, "fast")),
        ms(at(&r, EventKind::Notified, "slow")),
    );
    let verified = ms(at(&r, EventKind::Verified, ""));

    // In parallel: b confirms 500 ms in (one after the other it would take 900 ms).
    assert!(
        (400..500).contains(&stored_a),
        "a confirmed at {stored_a} ms"
    );
    assert!(
        (500..900).contains(&stored_b),
        "b confirmed at {stored_b} ms: not in parallel"
    );
    // The hook of the dependent reading from a went before the slowest store confirmed.
    assert!(
        fast >= stored_a && fast < stored_b,
        "fast told at {fast} ms (a {stored_a}, b {stored_b})"
    );
    assert!(
        slow >= stored_b,
        "slow told at {slow} ms, before b confirmed at {stored_b}"
    );
    // Verify took two seconds and delayed no hook.
    assert!(verified >= 2000, "verified at {verified} ms");
    assert!(
        slow < 1000,
        "a hook waited for verify: slow told at {slow} ms"
    );
    let window = fx.metric("keyrotd_invalidation_window_seconds_sum", &[("key", KEY)]);
    assert!(
        (0.5..1.0).contains(&window),
        "invalidation window {window} s"
    );
}
