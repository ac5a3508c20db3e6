//! The engine's lifecycle table: each fault, placed at each phase, gives an outcome, a journal end
//! state, a number of regenerations at the portal, and what each destination holds. Every row runs the
//! real engine against the scripted portal and in-memory stores under tokio's paused clock.

use std::time::Duration;

use keyrotd::engine::{RunResult, reconcile, recovery};
use keyrotd::journal::{KeyJournal, Phase};
use keyrotd::telemetry::Outcome;
use keyrotd::testing::{Fault, Op, StoreFault};

use crate::fixture::{Dep, Fx, Holds, KEY, Spec, fp, phase_name, t0, target};

#[derive(Clone, Copy, Debug)]
enum Act {
    /// An operator's rotation.
    Rotate,
    /// The recovery scan at start.
    Recover,
    /// One reconcile pass.
    Reconcile,
}

struct Want {
    outcome: Option<Outcome>,
    phase: Phase,
    lost: bool,
    regenerations: u32,
    a: Holds,
    b: Holds,
}

struct Case {
    name: &'static str,
    spec: Spec,
    /// Before the engine starts: portal, stores, journal.
    before: fn(&Fx),
    /// After the engine started, before the act.
    after: fn(&Fx),
    act: Act,
    want: Want,
}

fn nothing(_: &Fx) {}

const fn want(outcome: Option<Outcome>, regenerations: u32, a: Holds, b: Holds) -> Want {
    Want {
        outcome,
        phase: Phase::Idle,
        lost: false,
        regenerations,
        a,
        b,
    }
}

use Holds::{Active, Original, Other};
use Outcome::{Aborted, Degraded, Failed, Success};

const UNTOUCHED: Want = want(Some(Aborted), 0, Active, Active);

fn case(name: &'static str, act: Act, before: fn(&Fx), after: fn(&Fx), want: Want) -> Case {
    Case {
        name,
        spec: Spec::default(),
        before,
        after,
        act,
        want,
    }
}

fn with_spec(mut c: Case, spec: Spec) -> Case {
    c.spec = spec;
    c
}

/// A journal of the key in `phase`, the portal's key having moved to a new one it issued.
fn interrupted(fx: &Fx, phase: Phase) -> String {
    let old_id = fx.portal().key_id();
    let secret = fx.portal().rotate_out_of_band();
    let mut j = fx.journal();
    if phase == Phase::Regenerating {
        j.phase = Phase::Regenerating;
        j.old_key_id = Some(old_id);
    } else {
        j.phase = phase;
        j.old_key_id = Some(old_id);
        j.new_key_id = Some(fx.portal().key_id());
        j.new_fingerprint = Some(fp(&secret));
    }
    fx.write_journal(&j);
    secret
}

fn lost(fx: &Fx) {
    fx.portal().rotate_out_of_band();
    let mut j = fx.journal();
    j.lost = true;
    fx.write_journal(&j);
}

fn cases() -> Vec<Case> {
    use Act::*;
    vec![
        // ---- preflight: nothing is destroyed
        case(
            "preflight: provider status failing",
            Rotate,
            |fx| fx.portal().fail(Op::Status, 5, Fault::Transient),
            nothing,
            UNTOUCHED,
        ),
        case(
            "preflight: management credential refused",
            Rotate,
            |fx| fx.portal().fail(Op::Status, 1, Fault::Auth),
            nothing,
            UNTOUCHED,
        ),
        case(
            "preflight: key not Active",
            Rotate,
            |fx| fx.portal().set_active(false),
            nothing,
            UNTOUCHED,
        ),
        case(
            "preflight: key of another account",
            Rotate,
            |fx| fx.portal().set_account("other"),
            nothing,
            UNTOUCHED,
        ),
        case(
            "preflight: store a down",
            Rotate,
            |fx| fx.store("a").down(),
            nothing,
            UNTOUCHED,
        ),
        case(
            "preflight: store b read-only",
            Rotate,
            |fx| fx.store("b").read_only(true),
            nothing,
            UNTOUCHED,
        ),
        case(
            "preflight: dependent unreachable",
            Rotate,
            nothing,
            |fx| fx.dependent("api").set_unreachable(true),
            UNTOUCHED,
        ),
        case(
            "preflight: dependent already failing auth (401) is no reason to wait",
            Rotate,
            nothing,
            |fx| fx.dependent("api").hold("stale"),
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "preflight: journal directory replaced by a file",
            Rotate,
            nothing,
            |fx| {
                let dir = fx.state_dir().join("journal");
                std::fs::remove_dir_all(&dir).unwrap();
                std::fs::write(&dir, b"not a directory").unwrap();
            },
            UNTOUCHED,
        ),
        case(
            "regenerate: journal cannot record the attempt",
            Rotate,
            nothing,
            |fx| {
                let file = fx.state_dir().join("journal").join(format!("{KEY}.json"));
                std::fs::remove_file(&file).unwrap();
                std::fs::create_dir_all(file.join("in-the-way")).unwrap();
            },
            UNTOUCHED,
        ),
        case(
            "preflight: status rate limited once",
            Rotate,
            |fx| {
                fx.portal()
                    .fail(Op::Status, 1, Fault::RateLimited(Duration::from_secs(2)))
            },
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "preflight: shutdown begins during preflight",
            Rotate,
            |fx| {
                fx.portal()
                    .fail(Op::Status, 1, Fault::Delay(Duration::from_secs(5)))
            },
            |fx| {
                let shutdown = fx.engine().shutdown.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    shutdown.cancel();
                });
            },
            UNTOUCHED,
        ),
        // ---- regenerate
        case(
            "regenerate: refused once, then issued",
            Rotate,
            |fx| fx.portal().fail(Op::Regenerate, 1, Fault::Transient),
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "regenerate: refused three times",
            Rotate,
            |fx| fx.portal().fail(Op::Regenerate, 3, Fault::Transient),
            nothing,
            want(Some(Failed), 0, Active, Active),
        ),
        case(
            "regenerate: ambiguous, the portal did not rotate",
            Rotate,
            |fx| fx.portal().fail(Op::Regenerate, 1, Fault::Ambiguous),
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "regenerate: answer lost after the portal rotated",
            Rotate,
            |fx| fx.portal().fail(Op::Regenerate, 1, Fault::Lose),
            nothing,
            want(Some(Success), 2, Active, Active),
        ),
        with_spec(
            case(
                "regenerate: lost twice with max_rerotations = 1",
                Rotate,
                |fx| fx.portal().fail(Op::Regenerate, 2, Fault::Lose),
                nothing,
                Want {
                    lost: true,
                    ..want(Some(Failed), 2, Original, Original)
                },
            ),
            Spec::default().key("max_rerotations = 1"),
        ),
        case(
            "regenerate: management credential refused",
            Rotate,
            |fx| fx.portal().fail(Op::Regenerate, 1, Fault::Auth),
            nothing,
            want(Some(Failed), 0, Active, Active),
        ),
        case(
            "regenerate: refused with a 4xx",
            Rotate,
            |fx| fx.portal().fail(Op::Regenerate, 1, Fault::Permanent),
            nothing,
            want(Some(Failed), 0, Active, Active),
        ),
        case(
            "regenerate: rate limited (Retry-After 2s)",
            Rotate,
            |fx| {
                fx.portal().fail(
                    Op::Regenerate,
                    1,
                    Fault::RateLimited(Duration::from_secs(2)),
                )
            },
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "regenerate: rate limited for a day (Retry-After capped)",
            Rotate,
            |fx| {
                fx.portal().fail(
                    Op::Regenerate,
                    1,
                    Fault::RateLimited(Duration::from_secs(86_400)),
                )
            },
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "regenerate: ambiguous and status unreadable",
            Rotate,
            |fx| {
                fx.portal().fail(Op::Regenerate, 1, Fault::Ambiguous);
                fx.portal()
                    .fail(Op::Status, 1, Fault::Delay(Duration::ZERO));
                fx.portal().fail(Op::Status, 5, Fault::Transient);
            },
            nothing,
            Want {
                phase: Phase::Regenerating,
                ..want(Some(Failed), 0, Active, Active)
            },
        ),
        case(
            "regenerate: daily budget spent",
            Rotate,
            |fx| {
                let mut j = fx.journal();
                j.regenerations = vec![t0() - chrono::Duration::hours(1); 6];
                fx.write_journal(&j);
            },
            nothing,
            want(Some(Failed), 0, Active, Active),
        ),
        // ---- store, notify, verify
        case(
            "store: a refuses once, then stores",
            Rotate,
            |fx| fx.store("a").fail_writes(1, StoreFault::Transient),
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "store: a loses a check-and-set once",
            Rotate,
            |fx| fx.store("a").fail_writes(1, StoreFault::Conflict),
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "store: b failing past the deadline",
            Rotate,
            |fx| fx.store("b").fail_writes(10_000, StoreFault::Transient),
            nothing,
            want(Some(Degraded), 1, Active, Original),
        ),
        case(
            "store: b permission denied",
            Rotate,
            |fx| fx.store("b").fail_writes(10_000, StoreFault::Auth),
            nothing,
            want(Some(Degraded), 1, Active, Original),
        ),
        case(
            "store: b slower than store_deadline",
            Rotate,
            |fx| fx.store("b").delay_writes(Duration::from_secs(30)),
            nothing,
            want(Some(Degraded), 1, Active, Original),
        ),
        case(
            "store: every destination failing, the key is lost",
            Rotate,
            |fx| {
                fx.store("a").fail_writes(10_000, StoreFault::Transient);
                fx.store("b").fail_writes(10_000, StoreFault::Transient);
            },
            nothing,
            Want {
                lost: true,
                ..want(Some(Failed), 1, Original, Original)
            },
        ),
        case(
            "notify: hook fails once, then answers",
            Rotate,
            nothing,
            |fx| fx.dependent("api").fail_reloads(1),
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "notify: hook keeps failing",
            Rotate,
            nothing,
            |fx| fx.dependent("api").fail_reloads(3),
            want(Some(Degraded), 1, Active, Active),
        ),
        with_spec(
            case(
                "notify: dependent without verify unreachable",
                Rotate,
                nothing,
                |fx| fx.dependent("api").set_unreachable(true),
                want(Some(Degraded), 1, Active, Active),
            ),
            Spec::default().dependents(vec![Dep {
                verify: false,
                ..crate::fixture::dep("api", &["a"])
            }]),
        ),
        case(
            "verify: provider's auth check unreachable",
            Rotate,
            |fx| fx.portal().fail(Op::AuthCheck, 5, Fault::Transient),
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "verify: rotated elsewhere meanwhile, re-rotated",
            Rotate,
            |fx| {
                fx.portal()
                    .fail(Op::AuthCheck, 1, Fault::Delay(Duration::from_secs(1)));
                fx.store("b").delay_writes(Duration::from_millis(1500));
            },
            rotate_out_of_band_soon,
            want(Some(Success), 2, Active, Active),
        ),
        with_spec(
            case(
                "verify: rotated elsewhere meanwhile, auto_recover off",
                Rotate,
                |fx| {
                    fx.portal()
                        .fail(Op::AuthCheck, 1, Fault::Delay(Duration::from_secs(1)));
                    fx.store("b").delay_writes(Duration::from_millis(1500));
                },
                rotate_out_of_band_soon,
                want(Some(Failed), 1, Other, Other),
            ),
            Spec::default().key("auto_recover = false"),
        ),
        // ---- recovery at start, from the journal a crash left
        case(
            "recover: crash while regenerating, portal unchanged",
            Recover,
            |fx| {
                let mut j = fx.journal();
                j.phase = Phase::Regenerating;
                j.old_key_id = Some(fx.portal().key_id());
                fx.write_journal(&j);
            },
            nothing,
            want(None, 0, Active, Active),
        ),
        case(
            "recover: crash while regenerating, portal rotated",
            Recover,
            |fx| {
                interrupted(fx, Phase::Regenerating);
            },
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "recover: crash while regenerating, status unreadable",
            Recover,
            |fx| {
                interrupted(fx, Phase::Regenerating);
                fx.portal().fail(Op::Status, 5, Fault::Transient);
            },
            nothing,
            Want {
                phase: Phase::Regenerating,
                ..want(None, 0, Original, Original)
            },
        ),
        case(
            "recover: crash while storing, nothing stored",
            Recover,
            |fx| {
                interrupted(fx, Phase::Storing);
            },
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "recover: crash while storing, a holds the new key",
            Recover,
            |fx| {
                let secret = interrupted(fx, Phase::Storing);
                fx.store("a").put(&target().to_string(), &secret);
            },
            nothing,
            want(Some(Success), 0, Active, Active),
        ),
        case(
            "recover: crash in notify, every destination holds it",
            Recover,
            |fx| {
                let secret = interrupted(fx, Phase::Notify);
                fx.store("a").put(&target().to_string(), &secret);
                fx.store("b").put(&target().to_string(), &secret);
            },
            nothing,
            want(Some(Success), 0, Active, Active),
        ),
        case(
            "recover: crash in notify, b down",
            Recover,
            |fx| {
                let secret = interrupted(fx, Phase::Notify);
                fx.store("a").put(&target().to_string(), &secret);
                fx.store("b").down();
            },
            nothing,
            want(Some(Degraded), 0, Active, Original),
        ),
        case(
            "recover: crash in watch, every destination holds it",
            Recover,
            |fx| {
                let secret = interrupted(fx, Phase::Watch);
                fx.store("a").put(&target().to_string(), &secret);
                fx.store("b").put(&target().to_string(), &secret);
            },
            nothing,
            want(Some(Success), 0, Active, Active),
        ),
        case(
            "recover: crash in notify, the portal moved on",
            Recover,
            |fx| {
                let secret = interrupted(fx, Phase::Notify);
                fx.store("a").put(&target().to_string(), &secret);
                fx.portal().rotate_out_of_band();
            },
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "recover: lost key, stores writable",
            Recover,
            lost,
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        case(
            "recover: lost key, b down (one destination is enough)",
            Recover,
            |fx| {
                lost(fx);
                fx.store("b").down();
            },
            nothing,
            want(Some(Degraded), 1, Active, Original),
        ),
        case(
            "recover: lost key, every store down",
            Recover,
            |fx| {
                lost(fx);
                fx.store("a").down();
                fx.store("b").down();
            },
            nothing,
            Want {
                lost: true,
                ..want(Some(Failed), 0, Original, Original)
            },
        ),
        with_spec(
            case(
                "recover: lost key, auto_recover off",
                Recover,
                lost,
                nothing,
                Want {
                    lost: true,
                    ..want(None, 0, Original, Original)
                },
            ),
            Spec::default().key("auto_recover = false"),
        ),
        case(
            "recover: lost key, daily budget spent",
            Recover,
            |fx| {
                lost(fx);
                let mut j = fx.journal();
                j.regenerations = vec![t0() - chrono::Duration::hours(1); 6];
                fx.write_journal(&j);
            },
            nothing,
            Want {
                lost: true,
                ..want(None, 0, Original, Original)
            },
        ),
        case(
            "recover: unreadable journal is set aside, nothing regenerated",
            Recover,
            |fx| {
                let path = fx.state_dir().join("journal").join(format!("{KEY}.json"));
                std::fs::write(path, b"{not json").unwrap();
            },
            nothing,
            want(None, 0, Active, Active),
        ),
        // ---- reconcile
        case(
            "reconcile: every destination in sync",
            Reconcile,
            nothing,
            nothing,
            want(None, 0, Active, Active),
        ),
        case(
            "reconcile: b holds an old value",
            Reconcile,
            |fx| fx.store("b").put(&target().to_string(), "an-old-value"),
            nothing,
            want(Some(Success), 0, Active, Active),
        ),
        case(
            "reconcile: rotated in the portal by someone else",
            Reconcile,
            |fx| {
                fx.portal().rotate_out_of_band();
            },
            nothing,
            want(Some(Success), 1, Active, Active),
        ),
        with_spec(
            case(
                "reconcile: rotated elsewhere, auto_recover off",
                Reconcile,
                |fx| {
                    fx.portal().rotate_out_of_band();
                },
                nothing,
                want(None, 0, Original, Original),
            ),
            Spec::default().key("auto_recover = false"),
        ),
        case(
            "reconcile: key not Active",
            Reconcile,
            |fx| {
                fx.portal().set_active(false);
                fx.store("b").put(&target().to_string(), "an-old-value");
            },
            nothing,
            want(None, 0, Active, Other),
        ),
        case(
            "reconcile: provider unreadable",
            Reconcile,
            |fx| {
                fx.portal().rotate_out_of_band();
                fx.portal().fail(Op::Status, 5, Fault::Transient);
            },
            nothing,
            want(None, 0, Original, Original),
        ),
    ]
}

/// Someone rotates in the portal half a second into the act.
fn rotate_out_of_band_soon(fx: &Fx) {
    let provider = fx.provider.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let keyrotd::provider::Provider::Scripted(p) = &**provider {
            p.rotate_out_of_band();
        }
    });
}

async fn run(case: &Case) -> (Option<Outcome>, KeyJournal, u32, Holds, Holds, Fx) {
    let fx = Fx::new(case.spec.clone());
    (case.before)(&fx);
    let fx = match case.act {
        Act::Recover => fx.start_unready(),
        _ => fx.start(),
    };
    (case.after)(&fx);
    let outcome = match case.act {
        Act::Rotate => match fx.engine().rotate(KEY, fx.request()).await {
            Ok((_, RunResult::Finished(o))) => Some(o),
            Ok((_, other)) => panic!("{}: {other:?}", case.name),
            Err(e) => panic!("{}: refused: {e}", case.name),
        },
        Act::Recover => {
            recovery::recover_all(fx.engine()).await;
            fx.settle().await;
            fx.last_outcome()
        }
        Act::Reconcile => {
            reconcile::reconcile_all(fx.engine()).await;
            fx.settle().await;
            fx.last_outcome()
        }
    };
    let j = fx.journal();
    let regenerations = fx.portal().regenerations();
    let (a, b) = (fx.holds("a"), fx.holds("b"));
    (outcome, j, regenerations, a, b, fx)
}

fn outcome_name(o: Option<Outcome>) -> &'static str {
    o.map(|o| o.as_str()).unwrap_or("-")
}

#[tokio::test(start_paused = true)]
async fn every_fault_at_every_phase_ends_defined() {
    let cases = cases();
    let mut failures = Vec::new();
    let mut table = String::from(
        "| case | outcome | journal | lost | regenerations | a | b |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for case in &cases {
        let (outcome, j, regenerations, a, b, fx) = run(case).await;
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:?} | {:?} |\n",
            case.name,
            outcome_name(outcome),
            phase_name(j.phase),
            j.lost,
            regenerations,
            a,
            b
        ));
        let w = &case.want;
        let got = (outcome, j.phase, j.lost, regenerations, a, b);
        let wanted = (w.outcome, w.phase, w.lost, w.regenerations, w.a, w.b);
        if got != wanted {
            failures.push(format!("{}:\n   got {got:?}\n  want {wanted:?}", case.name));
        }
        for secret in fx.secrets() {
            if fx.outputs().contains(&secret) {
                failures.push(format!("{}: a secret reached an output", case.name));
            }
        }
    }
    println!("{table}");
    assert!(cases.len() >= 40, "{} cases", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
