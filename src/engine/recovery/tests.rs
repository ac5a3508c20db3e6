//! The recovery decision table: every journal phase × what the provider's status says × what the
//! destinations hold.

use chrono::{TimeZone, Utc};

use super::*;
use crate::journal::KeyJournal;

fn key(auto_recover: bool) -> KeyConfig {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let text = format!(
        r#"
        [daemon]
        state_dir = "{state}"
        [providers.p]
        kind = "aos"
        base_url = "http://127.0.0.1:1"
        management_token = {{ file = "{token}" }}
        [stores.a]
        kind = "file"
        dir = "{state}"
        [stores.b]
        kind = "file"
        dir = "{state}"
        [[keys]]
        name = "k"
        provider = "p"
        auto_recover = {auto_recover}
        max_rerotations = 3
        max_regenerations_per_day = 6
        [[keys.destinations]]
        store = "a"
        file = "k.key"
        [[keys.destinations]]
        store = "b"
        file = "k2.key"
        "#,
        state = dir.path().display(),
        token = token.display(),
    );
    let config = crate::config::load_str(&text).unwrap();
    config.keys[0].clone()
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 3, 0, 0).unwrap()
}

/// A journal in `phase`, walked there by its transitions: old key `old`, new key `new` (fingerprint
/// `fp-new`) from storing on.
fn journal(phase: &str) -> KeyJournal {
    let meta = crate::journal::RotationMeta {
        rotation_id: uuid::Uuid::nil(),
        trigger: crate::journal::Trigger::Schedule,
        reason: "schedule".into(),
        requested_by: "test".into(),
        started_at: now(),
        approved_by: None,
    };
    let mut j = KeyJournal::new("k");
    j.adopted(Some("old".into()), "fp-old");
    if phase == "lost" {
        j.attempt(&meta, Some("old".into()), now());
        j.failed(&meta, crate::journal::Failure::Lost, now());
        j.regenerations.clear();
        return j;
    }
    if phase == "idle" {
        return j;
    }
    j.attempt(&meta, Some("old".into()), now());
    j.regenerations.clear();
    if phase == "regenerating" {
        return j;
    }
    j.issued("new", "fp-new", now());
    if phase == "storing" {
        return j;
    }
    j.first_confirmed();
    if phase == "watch" {
        // A crash in the watch: the outcome was decided and the new key is the active one.
        j.concluded(
            crate::telemetry::Outcome::Success,
            "new",
            "fp-new",
            true,
            now(),
        );
        j.old_key_id = Some("old".into());
    }
    assert_eq!(crate::journal::phase_name(j.phase), phase);
    j
}

fn status(which: &str) -> Seen<KeyStatus> {
    let read = |id: &str| {
        Seen::Read(KeyStatus {
            active: true,
            key_id: id.into(),
            account_id: None,
            first_generated: None,
            last_rotated: None,
            generated_by: None,
        })
    };
    match which {
        "old" => read("old"),
        "new" => read("new"),
        "other" => read("someone-elses"),
        _ => Seen::Unreadable("HTTP 503".into()),
    }
}

fn held(which: &str) -> Vec<Holding> {
    let v = |fp: &str| Holding::Value(fp.into());
    match which {
        "none" => vec![Holding::Empty, Holding::Empty],
        "some" => vec![Holding::Empty, v("fp-new")],
        "all" => vec![v("fp-new"), v("fp-new")],
        "another" => vec![v("fp-other"), v("fp-other")],
        _ => vec![Holding::Unreadable, Holding::Empty],
    }
}

fn short(d: &Decision) -> String {
    match d {
        Decision::Nothing => "nothing".into(),
        Decision::Clear => "clear".into(),
        Decision::Notify => "notify".into(),
        Decision::Copy { from } => format!("copy{from}"),
        Decision::Rerotate(RerotationReason::CrashRecovery) => "crash".into(),
        Decision::Rerotate(RerotationReason::LostBeforeStorage) => "lost".into(),
        Decision::Rerotate(RerotationReason::Drift) => "drift".into(),
        Decision::Defer(_) => "defer".into(),
        Decision::Recreate { revoke: Some(id) } => format!("recreate-revoking-{id}"),
        Decision::Recreate { revoke: None } => "recreate-orphans".into(),
        Decision::Confirm { from: None } => "confirm".into(),
        Decision::Confirm { from: Some(i) } => format!("confirm-copy{i}"),
        Decision::Revoke => "revoke".into(),
        Decision::Rollback { from } => format!("rollback-copy{from}"),
    }
}

/// A dual key's journal in `phase`: old key `old` (fingerprint `fp-old`) stays live, new key `new`
/// (`fp-new`) from storing on.
fn dual_journal(phase: &str) -> KeyJournal {
    let meta = crate::journal::RotationMeta {
        rotation_id: uuid::Uuid::nil(),
        trigger: crate::journal::Trigger::Schedule,
        reason: "schedule".into(),
        requested_by: "test".into(),
        started_at: now(),
        approved_by: None,
    };
    let mut j = KeyJournal::new("k");
    j.adopted(Some("old".into()), "fp-old");
    j.creating(&meta, Some("old".into()), vec!["old".into()], now());
    j.regenerations.clear();
    if phase == "creating" {
        return j;
    }
    j.created("new", "fp-new", now());
    match phase {
        "storing" => {}
        "confirming" => j.confirming(),
        "revoking" => {
            j.confirming();
            j.revoking(vec!["old".into()]);
        }
        "rolling_back" => j.rolling_back(),
        other => panic!("no dual phase {other}"),
    }
    assert_eq!(crate::journal::phase_name(j.phase), phase);
    j
}

fn dual_held(which: &str) -> Vec<Holding> {
    let v = |fp: &str| Holding::Value(fp.into());
    match which {
        "old" => vec![v("fp-old"), v("fp-old")],
        "some" => vec![v("fp-old"), v("fp-new")],
        "all" => vec![v("fp-new"), v("fp-new")],
        "none" => vec![Holding::Empty, Holding::Empty],
        _ => vec![Holding::Unreadable, v("fp-new")],
    }
}

/// Dual phases × holdings (old key everywhere, new in some, new in all, empty, one unreadable). The
/// provider's status plays no part: a dual vendor's status may name either live key.
const DUAL: &[(&str, [&str; 5])] = &[
    // The create may have made a key nobody knows: revoke what the vendor lists that it did not
    // list before, and rotate again. The old key is untouched.
    ("creating", ["recreate-orphans"; 5]),
    // Stored somewhere: finish (copy, tell, confirm, revoke). Nowhere: the new key is nobody's,
    // revoke it and start again. Unreadable and not proven elsewhere: wait.
    (
        "storing",
        [
            "recreate-revoking-new",
            "confirm-copy1",
            "confirm",
            "recreate-revoking-new",
            "confirm-copy1",
        ],
    ),
    (
        "confirming",
        [
            "recreate-revoking-new",
            "confirm-copy1",
            "confirm",
            "recreate-revoking-new",
            "confirm-copy1",
        ],
    ),
    // A revoke is sent again (idempotent), whatever the destinations hold.
    ("revoking", ["revoke"; 5]),
    // A rollback puts the old key back from a destination that still holds it.
    (
        "rolling_back",
        [
            "rollback-copy0",
            "rollback-copy0",
            "defer",
            "defer",
            "defer",
        ],
    ),
];

#[test]
fn every_dual_phase_and_holding_has_its_decision() {
    let key = key(true);
    for (phase, want) in DUAL {
        for (hi, h) in ["old", "some", "all", "none", "unreadable"]
            .iter()
            .enumerate()
        {
            for s in ["old", "new", "unreadable"] {
                let got = decide(
                    &dual_journal(phase),
                    &status(s),
                    &dual_held(h),
                    &key,
                    true,
                    now(),
                );
                assert_eq!(
                    short(&got),
                    want[hi],
                    "phase {phase}, holdings {h}, status {s}"
                );
            }
        }
    }
}

#[test]
fn a_dual_key_without_a_destination_proven_empty_of_the_new_key_is_not_abandoned() {
    // Storing, nothing holds the new key for sure, one destination cannot be read: it may hold the
    // new key, which a dependent may use; revoking it could take the only key that dependent has.
    let held = vec![Holding::Unreadable, Holding::Value("fp-old".into())];
    let d = decide(
        &dual_journal("storing"),
        &status("old"),
        &held,
        &key(true),
        true,
        now(),
    );
    assert!(matches!(d, Decision::Defer(_)), "{d:?}");
}

/// Rows: phase, then per status (old, new, other, unreadable) the decisions for holdings
/// none / some / all / another / unreadable, at start.
const TABLE: &[(&str, [&str; 4])] = &[
    // Nothing owed, nothing interrupted: no status or destination read changes that.
    ("idle", ["nothing"; 4]),
    // A lost key is owed a re-rotation whatever the portal or the destinations say now.
    ("lost", ["lost"; 4]),
    // Regenerating: the portal's key id tells whether the call rotated; holdings are not read.
    ("regenerating", ["clear", "crash", "crash", "defer"]),
    ("storing", ["-", "-", "-", "-"]),
    ("notify", ["-", "-", "-", "-"]),
    ("watch", ["-", "-", "-", "-"]),
];

/// For storing/notify/watch the holdings decide: per status, per holdings (none, some, all, another,
/// unreadable).
const STORED: [(&str, [&str; 5]); 4] = [
    // The portal still shows the old key or someone else's: the journal's new key is dead.
    ("old", ["crash", "crash", "crash", "crash", "crash"]),
    // The portal shows the journal's new key: find it in a destination.
    ("new", ["crash", "copy1", "notify", "crash", "defer"]),
    ("other", ["crash", "crash", "crash", "crash", "crash"]),
    // Unreadable portal: a holder is copied (the copy checks the value authenticates first).
    ("unreadable", ["crash", "copy1", "notify", "crash", "defer"]),
];

#[test]
fn every_phase_status_and_holding_has_its_decision() {
    let key = key(true);
    let mut cases = 0;
    for (phase, by_status) in TABLE {
        for (si, s) in ["old", "new", "other", "unreadable"].iter().enumerate() {
            for (hi, h) in ["none", "some", "all", "another", "unreadable"]
                .iter()
                .enumerate()
            {
                let want = match by_status[si] {
                    "-" => STORED[si].1[hi],
                    w => w,
                };
                let got = decide(&journal(phase), &status(s), &held(h), &key, true, now());
                assert_eq!(short(&got), want, "phase {phase}, status {s}, holdings {h}");
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 6 * 4 * 5);
}

#[test]
fn outside_start_a_watching_key_is_left_to_its_watch() {
    let key = key(true);
    for h in ["none", "some", "all"] {
        let d = decide(
            &journal("watch"),
            &status("new"),
            &held(h),
            &key,
            false,
            now(),
        );
        assert_eq!(d, Decision::Nothing, "{h}");
    }
}

#[test]
fn without_a_status_endpoint_an_interrupted_regenerate_is_assumed_lost() {
    let d = decide(
        &journal("regenerating"),
        &Seen::NoEndpoint,
        &[],
        &key(true),
        true,
        now(),
    );
    assert_eq!(d, Decision::Rerotate(RerotationReason::CrashRecovery));
}

#[test]
fn an_owed_rerotation_waits_for_its_bounds_and_for_auto_recover() {
    let mut j = journal("lost");
    let owed =
        |j: &KeyJournal, key: &KeyConfig| short(&decide(j, &status("old"), &[], key, false, now()));
    assert_eq!(owed(&j, &key(false)), "defer", "auto_recover off");
    j.rerotations_in_row = 4;
    assert_eq!(owed(&j, &key(true)), "defer", "max_rerotations reached");
    j.rerotations_in_row = 0;
    j.regenerations = vec![now(); 6];
    assert_eq!(owed(&j, &key(true)), "defer", "budget spent");
    j.regenerations = vec![now() - chrono::Duration::hours(25); 6];
    assert_eq!(
        owed(&j, &key(true)),
        "lost",
        "yesterday's calls do not count"
    );
}

#[test]
fn a_journal_past_storing_without_the_new_key_is_not_acted_on() {
    let mut j = journal("notify");
    j.new_key_id = None;
    let d = decide(&j, &status("new"), &held("all"), &key(true), true, now());
    assert_eq!(d, Decision::Nothing);
}

#[test]
fn retry_waits_grow_to_their_cap_with_jitter() {
    for attempt in 0..12 {
        let full = RETRY_FIRST
            .saturating_mul(1 << attempt.min(10))
            .min(RETRY_CAP);
        let w = retry_wait(attempt);
        assert!(w >= full / 2 && w <= full, "attempt {attempt}: {w:?}");
    }
    assert!(retry_wait(20) <= RETRY_CAP);
}
