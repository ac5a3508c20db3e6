//! Stage 2: the error a real client returned (stage 1) is injected into the in-process engine at the
//! row's phase, and the row's end is asserted: the outcome, the journal on disk, the regenerations,
//! what each destination holds, and that the old key still works or the new one is stored.
//!
//! The fixture (tests/engine/fixture.rs): one key on a scripted portal, destinations `a` and `b`, one
//! dependent `api` reading `a` (verify probe and reload hook). The component under test is played by
//! the portal, by store `a`, by `api`'s hook or probe, or is the engine's own state dir. A fault lasts:
//! the component answers every call that way for the whole row.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyrotd::engine::{RunResult, reconcile, recovery};
use keyrotd::journal::{KeyJournal, Phase as JPhase};
use keyrotd::telemetry::Outcome;
use keyrotd::testing::{Fault as SFault, Op as SOp, StoreOp};

use super::clients::Reported;
use super::model::{Component, Fault, Phase, portal_rotates};
use super::server::Mount;
use crate::fixture::{Fx, Holds, KEY, Spec, fp, target};

/// "For the whole row": more calls than any row makes.
const LASTING: usize = 10_000;

/// What a row ends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    pub outcome: Option<Outcome>,
    /// The journal's phase on disk.
    pub phase: JPhase,
    pub lost: bool,
    pub regenerations: u32,
    pub a: Holds,
    pub b: Holds,
}

const fn want(outcome: Option<Outcome>, regenerations: u32, a: Holds, b: Holds) -> Want {
    Want {
        outcome,
        phase: JPhase::Idle,
        lost: false,
        regenerations,
        a,
        b,
    }
}

use Holds::{Active, Original};
use Outcome::{Aborted, Degraded, Failed, Success};

/// Nothing destroyed: the rotation stopped in preflight and the old key works everywhere.
const UNTOUCHED: Want = want(Some(Aborted), 0, Active, Active);
const ROTATED: Want = want(Some(Success), 1, Active, Active);
/// Regenerate refused without rotating: the old key still works.
const REFUSED: Want = want(Some(Failed), 0, Active, Active);
/// Every regenerate rotated and lost its answer: 1 + max_rerotations (3) keys, then the key is
/// flagged lost and left to an operator.
const LOST_FOR_GOOD: Want = Want {
    lost: true,
    ..want(Some(Failed), 4, Original, Original)
};

/// The end each row must reach. Written out per component and phase from docs/lifecycle.md, never
/// computed from the engine's code.
pub fn expected(c: Component, f: Fault, p: Phase, r: &Reported) -> Want {
    match c {
        Component::PortalStatus | Component::PortalRegenerate | Component::PortalAuthCheck => {
            expected_at_portal(c, f, p, r)
        }
        _ => expected_elsewhere(c, f, p, r),
    }
}

fn expected_at_portal(c: Component, f: Fault, p: Phase, r: &Reported) -> Want {
    use Component as C;
    use Phase as P;
    let answered = matches!(r, Reported::Answered(_));
    match (c, p) {
        // The status cannot be read: preflight cannot prove the key Active, nothing is destroyed.
        (C::PortalStatus, P::Preflight) => UNTOUCHED,
        // Ambiguous regenerate, status unreadable: failed, journal kept at `regenerating` for
        // recovery; the portal did not rotate, so the old key still works.
        (C::PortalStatus, P::Regenerate) => Want {
            phase: JPhase::Regenerating,
            ..REFUSED
        },
        // Verify that cannot read the status, and a watch that cannot: no reason to re-rotate.
        (C::PortalStatus, P::Verify | P::Watch) => ROTATED,
        // An interrupted regenerate with the status unreadable: decided later, nothing done now.
        (C::PortalStatus, P::Recovery) => Want {
            phase: JPhase::Regenerating,
            ..want(None, 0, Active, Active)
        },
        (C::PortalStatus, P::Reconcile) => want(None, 0, Active, Active),
        (C::PortalRegenerate, P::Regenerate) if portal_rotates(f) => LOST_FOR_GOOD,
        (C::PortalRegenerate, P::Regenerate) => REFUSED,
        // A lost key's re-rotation: its first regenerate is already a re-rotation, so 3 in all.
        (C::PortalRegenerate, P::Recovery) if portal_rotates(f) => Want {
            regenerations: 3,
            ..LOST_FOR_GOOD
        },
        (C::PortalRegenerate, P::Recovery) => Want {
            lost: true,
            ..want(Some(Failed), 0, Original, Original)
        },
        // 200 is the answer, whatever the body: the new key authenticates.
        (C::PortalAuthCheck, _) if answered && f != Fault::Unauthorized => match p {
            P::Verify => ROTATED,
            _ => want(Some(Success), 0, Active, Active),
        },
        // Verify cannot tell: no reason to re-rotate.
        (C::PortalAuthCheck, P::Verify) if !answered => ROTATED,
        // The new key refused while the status shows it active: the auth check itself is broken.
        (C::PortalAuthCheck, P::Verify) => ROTATED,
        // A destination holds the new key; it is copied only once it authenticates, so the resume
        // stops (the journal keeps `storing` for the next recovery tick) and b keeps a dead value.
        (C::PortalAuthCheck, P::Recovery) => Want {
            phase: JPhase::Storing,
            ..want(Some(Aborted), 0, Active, Original)
        },
        (c, p) => panic!("no expectation for {c:?} at {p:?}"),
    }
}

fn expected_elsewhere(c: Component, f: Fault, p: Phase, r: &Reported) -> Want {
    use Component as C;
    use Phase as P;
    let answered = matches!(r, Reported::Answered(_));
    match (c, p) {
        (C::Vault | C::Aws | C::File, P::Preflight) if answered => ROTATED,
        (C::Vault | C::Aws | C::File, P::Preflight) => UNTOUCHED,
        (C::Vault | C::Aws | C::File, P::Store) if answered => ROTATED,
        // `a` keeps failing: the key is served from `b`, `a` is filled in the background; `api`
        // reads `a`, so it is not told and its hook counts as failed.
        (C::Vault | C::Aws | C::File, P::Store) => want(Some(Degraded), 1, Original, Active),
        // A crash left `storing`; nobody holds the new key. A readable `a` shows it: re-rotate.
        (C::Vault | C::Aws | C::File, P::Recovery) if answered => ROTATED,
        // `a` cannot be read and may hold the new key: no re-rotation yet.
        (C::Vault | C::Aws | C::File, P::Recovery) => Want {
            phase: JPhase::Storing,
            ..want(None, 0, Original, Original)
        },
        (C::HttpHook | C::CommandHook, P::Notify) if answered => ROTATED,
        (C::HttpHook | C::CommandHook, P::Notify) => want(Some(Degraded), 1, Active, Active),
        (C::Probe, P::Preflight) => match r {
            Reported::Probe(keyrotd::notify::Probe::Unreachable(_)) => UNTOUCHED,
            // Any HTTP answer: reachable; a 401 means it is already broken.
            _ => ROTATED,
        },
        (C::Probe, P::Watch) => ROTATED,
        (C::StateDir, P::BeforeRegenerate) => UNTOUCHED,
        // The key must reach its destinations whatever the journal: the last record on disk is the
        // attempt, rewritten once the disk works again.
        (C::StateDir, P::AfterRegenerate) => Want {
            phase: JPhase::Regenerating,
            ..ROTATED
        },
        // A journal that is a link is set aside and the key blocked: nothing is regenerated.
        (C::StateDir, P::Recovery) if f == Fault::Symlink => want(None, 0, Active, Active),
        // The crash's re-rotation cannot record its regenerate: none is sent, the key stays lost
        // (in memory; the disk still says `regenerating`, so a restart decides it again).
        (C::StateDir, P::Recovery) => Want {
            phase: JPhase::Regenerating,
            ..want(Some(Failed), 0, Original, Original)
        },
        (c, p) => panic!("no expectation for {c:?} at {p:?}"),
    }
}

/// One row's run: what it ended with and what else it showed.
pub struct Ran {
    pub got: Want,
    pub problems: Vec<String>,
}

/// Runs one row under tokio's paused clock.
pub async fn run(c: Component, f: Fault, p: Phase, r: &Reported) -> Ran {
    let mut spec = Spec::default();
    if p == Phase::Watch {
        spec = spec.key("watch = \"60s\"\nwatch_interval = \"10s\"");
    }
    let fx = Fx::new(spec);
    let mounts: Arc<Mutex<Vec<Mount>>> = Arc::default();
    arrange(&fx, c, f, p, r, &mounts);
    let recovering = p == Phase::Recovery;
    let fx = if recovering {
        fx.start_unready()
    } else {
        fx.start()
    };
    arm(&fx, c, p, r);
    let outcome = act(&fx, c, p).await;
    if matches!(p, Phase::Watch | Phase::AfterRegenerate) {
        // The watch (60 s, longer while a 429 cools the provider down for up to 5 minutes) ends,
        // and journal writes settle.
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
    let j = fx.journal();
    let got = Want {
        outcome,
        phase: j.phase,
        lost: j.lost,
        regenerations: fx.portal().regenerations(),
        a: fx.holds("a"),
        b: fx.holds("b"),
    };
    let mut problems = alive_or_stored(&fx, &got, &j);
    problems.extend(state_dir_checks(&fx, c, f, p, &mounts).await);
    for secret in fx.secrets() {
        if fx.outputs().contains(&secret) {
            problems.push("a secret reached an output".into());
        }
    }
    fx.engine().shutdown.cancel();
    fx.engine().tasks.close();
    fx.engine().tasks.wait().await;
    drop(mounts);
    Ran { got, problems }
}

/// The promise itself: the key keyrotd started with still works, or the portal's active key is in a
/// destination, or the key is flagged lost for an operator (or, undecided, kept for recovery).
fn alive_or_stored(fx: &Fx, got: &Want, j: &KeyJournal) -> Vec<String> {
    let old_alive = fx.portal().secret() == fx.original;
    let new_stored = got.a == Holds::Active || got.b == Holds::Active;
    // A journal that cannot be written keeps `/readyz` failing: that flags it too.
    let flagged = got.lost || fx.engine().readiness().is_err();
    let pending = j.phase != JPhase::Idle;
    if old_alive || new_stored || flagged || pending {
        Vec::new()
    } else {
        vec!["the old key is dead, the new one is in no destination, and nothing says so".into()]
    }
}

/// How each row sets the world up before the engine starts.
fn arrange(
    fx: &Fx,
    c: Component,
    f: Fault,
    p: Phase,
    r: &Reported,
    mounts: &Arc<Mutex<Vec<Mount>>>,
) {
    use Component as C;
    use Phase as P;
    match (c, p) {
        (C::PortalStatus, P::Preflight | P::Reconcile) => portal(fx, SOp::Status, r, false),
        (C::PortalStatus, P::Regenerate) => {
            fx.portal().pass(SOp::Status, 1);
            portal(fx, SOp::Status, r, false);
            fx.portal().fail(SOp::Regenerate, 1, SFault::Ambiguous);
        }
        // Preflight's read, and verify's (and the watch's first) answer.
        (C::PortalStatus, P::Verify) => {
            fx.portal().pass(SOp::Status, 1);
            portal(fx, SOp::Status, r, false);
        }
        (C::PortalStatus, P::Watch) => {
            fx.portal().pass(SOp::Status, 2);
            portal(fx, SOp::Status, r, false);
        }
        (C::PortalStatus, P::Recovery) => {
            let mut j = fx.journal();
            j.phase = JPhase::Regenerating;
            j.old_key_id = Some(fx.portal().key_id());
            fx.write_journal(&j);
            portal(fx, SOp::Status, r, false);
        }
        (C::PortalRegenerate, P::Regenerate) => portal(fx, SOp::Regenerate, r, portal_rotates(f)),
        (C::PortalRegenerate, P::Recovery) => {
            lost(fx);
            portal(fx, SOp::Regenerate, r, portal_rotates(f));
        }
        (C::PortalAuthCheck, P::Verify) => portal(fx, SOp::AuthCheck, r, false),
        (C::PortalAuthCheck, P::Recovery) => {
            let secret = interrupted(fx, JPhase::Storing);
            fx.store("a").put(&target().to_string(), &secret);
            portal(fx, SOp::AuthCheck, r, false);
        }
        (C::Vault | C::Aws | C::File, P::Preflight) => store(fx, StoreOp::Preflight, r),
        (C::Vault | C::Aws | C::File, P::Store) => store(fx, StoreOp::Write, r),
        (C::Vault | C::Aws | C::File, P::Recovery) => {
            interrupted(fx, JPhase::Storing);
            store(fx, StoreOp::Read, r);
        }
        (C::StateDir, _) => state_dir(fx, f, p, mounts),
        // Dependents exist once the engine is built: see `arm`.
        _ => {}
    }
}

/// Faults placed after the engine was built (the scripted dependents exist from then on).
fn arm(fx: &Fx, c: Component, p: Phase, r: &Reported) {
    let dep = fx.dependent("api");
    match (c, r) {
        (Component::HttpHook | Component::CommandHook, Reported::Hook(e)) => {
            dep.fail_reloads_with(LASTING, e.clone())
        }
        (Component::Probe, Reported::Probe(probe)) => {
            if p == Phase::Watch {
                // Preflight's probe answers; the watch's meet the fault.
                dep.probe_with(1, keyrotd::notify::Probe::Ok);
            }
            dep.probe_with(LASTING, probe.clone());
        }
        _ => {}
    }
}

async fn act(fx: &Fx, c: Component, p: Phase) -> Option<Outcome> {
    match p {
        Phase::Recovery => {
            recovery::recover_all(fx.engine()).await;
            fx.settle().await;
            fx.last_outcome()
        }
        Phase::Reconcile => {
            reconcile::reconcile_all(fx.engine()).await;
            fx.settle().await;
            fx.last_outcome()
        }
        _ => match fx.engine().rotate(KEY, fx.request()).await {
            Ok((_, RunResult::Finished(o))) => Some(o),
            Ok((_, other)) => panic!("{c:?} at {p:?}: {other:?}"),
            Err(e) => panic!("{c:?} at {p:?}: refused: {e}"),
        },
    }
}

/// The portal's `op` answers as the real client did, for the whole row.
fn portal(fx: &Fx, op: SOp, r: &Reported, rotates: bool) {
    match r {
        Reported::Provider(e) => fx.portal().fail_with(op, LASTING, e.clone(), rotates),
        Reported::Answered("refused the secret") => fx.portal().fail(op, LASTING, SFault::Refuses),
        Reported::Answered(_) => {}
        other => panic!("not a provider answer: {other:?}"),
    }
}

/// Store `a`'s `op` answers as the real client did, for the whole row.
fn store(fx: &Fx, op: StoreOp, r: &Reported) {
    match r {
        Reported::Store(e) => fx.store("a").fail_with(op, LASTING, e.clone()),
        Reported::Answered(_) => {}
        other => panic!("not a store answer: {other:?}"),
    }
}

/// A journal left by a crash in `phase`, the portal having moved to a key it issued then; returns
/// that key's secret.
fn interrupted(fx: &Fx, phase: JPhase) -> String {
    let old_id = fx.portal().key_id();
    let secret = fx.portal().rotate_out_of_band();
    let mut j = fx.journal();
    j.phase = phase;
    j.old_key_id = Some(old_id);
    if phase != JPhase::Regenerating {
        j.new_key_id = Some(fx.portal().key_id());
        j.new_fingerprint = Some(fp(&secret));
    }
    fx.write_journal(&j);
    secret
}

/// A key lost before storage: the portal moved on, the journal says lost.
fn lost(fx: &Fx) {
    fx.portal().rotate_out_of_band();
    let mut j = fx.journal();
    j.lost = true;
    fx.write_journal(&j);
}

/// The engine's journal directory on a tmpfs of its own (the journal copied in), then the fault: at
/// once before the regenerate, at the regenerate call after it.
fn state_dir(fx: &Fx, f: Fault, p: Phase, mounts: &Arc<Mutex<Vec<Mount>>>) {
    let dir = fx.state_dir().join("journal");
    let file = dir.join(format!("{KEY}.json"));
    if f == Fault::Symlink {
        // Another state dir's journal: a regenerate in flight, of a key id the portal never had.
        let decoy = fx.state_dir().join("decoy.json");
        let mut j = fx.journal();
        j.phase = JPhase::Regenerating;
        j.old_key_id = Some("ak_of_another_world".into());
        std::fs::write(&decoy, serde_json::to_vec(&j).unwrap()).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&decoy, &file).unwrap();
        return;
    }
    if p == Phase::Recovery {
        interrupted(fx, JPhase::Regenerating);
    }
    let bytes = std::fs::read(&file).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let tmpfs = Mount::tmpfs(&dir, "256k");
    std::fs::write(&file, bytes).unwrap();
    mounts.lock().unwrap().push(tmpfs);
    let break_it = move |mounts: &Mutex<Vec<Mount>>| {
        let mut m = mounts.lock().unwrap();
        match f {
            Fault::DiskFull => m[0].fill(),
            _ => m.push(Mount::read_only(&dir)),
        }
    };
    if p == Phase::AfterRegenerate {
        // The cue runs inside the regenerate call: the `regenerating` record is on disk by then.
        let (mounts, once) = (mounts.clone(), std::sync::Once::new());
        fx.portal().on_call(SOp::Regenerate, move || {
            once.call_once(|| break_it(&mounts))
        });
    } else {
        break_it(mounts);
    }
}

/// Checks only the state dir's rows make: a fault after the regenerate keeps `/readyz` failing until
/// the journal is written again; a linked journal is set aside and blocks the key.
async fn state_dir_checks(
    fx: &Fx,
    c: Component,
    f: Fault,
    p: Phase,
    mounts: &Mutex<Vec<Mount>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if c != Component::StateDir {
        return problems;
    }
    if f == Fault::Symlink {
        let view = fx.engine().key_views().into_iter().find(|k| k.name == KEY);
        if view.and_then(|v| v.blocked).is_none() {
            problems.push("a linked journal did not block the key".into());
        }
        return problems;
    }
    if p == Phase::AfterRegenerate {
        if fx.engine().readiness().is_ok() {
            problems.push("ready while the journal cannot be written".into());
        }
        heal(fx, mounts);
        fx.engine().flush_journals().await;
        let j = fx.journal();
        if j.phase != JPhase::Idle || fx.engine().readiness().is_err() {
            problems.push(format!(
                "after the disk healed: journal {:?}, ready {:?}",
                j.phase,
                fx.engine().readiness()
            ));
        }
    }
    problems
}

/// The state dir works again: the filler removed, the read-only mount lifted.
fn heal(fx: &Fx, mounts: &Mutex<Vec<Mount>>) {
    let mut m = mounts.lock().unwrap();
    while m.len() > 1 {
        m.pop();
    }
    let _ = std::fs::remove_file(fx.state_dir().join("journal").join(".filler"));
}
