//! Crash recovery and lost keys, end to end (spec lifecycle.md: "Ambiguous regenerate", "Recovery after
//! a crash", the re-rotation and regeneration bounds).
//!
//! Each test drives the real daemon against the real stack, crashes it with SIGKILL at a phase
//! boundary where needed, starts it again on the same config and state, and checks that it converges
//! with no operator action: every destination holds the portal's active key, both dependents
//! authenticate, the portal was regenerated exactly as often as the situation requires, and the
//! re-rotation (if any) is counted and audited. Every test ends by checking that no secret the portal
//! ever issued appears in the state directory (journal, audit) or the daemon's logs.
//!
//! Failpoints (set in the daemon's environment as `FAILPOINTS=name=action`, see src/main.rs):
//! - `before_regenerate`: the journal holds the regeneration budget entry, nothing sent yet;
//! - `after_regenerate`: the journal says `storing`, nothing stored yet;
//! - `after_first_store`: the first destination confirmed, the journal says `notify`, hooks not started.
//!
//! They exist only with `--features failpoints`, so this file is compiled only then;
//! tests/crash_guard.rs fails a run without the feature instead of letting these vanish silently.
#![cfg(feature = "failpoints")]

use std::time::Duration;

use crate::support::daemon::{ADMIN_TOKEN, Daemon, KEY, Options, Stack};
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(120);

/// The value of one sample of `name` whose labels include all of `labels`; 0 when absent.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

async fn rerotations(d: &Daemon, reason: &str) -> f64 {
    metric(
        &d.metrics().await,
        "keyrotd_rerotations_total",
        &[("key", KEY), ("reason", reason)],
    )
}

async fn all_rerotations(d: &Daemon) -> f64 {
    metric(
        &d.metrics().await,
        "keyrotd_rerotations_total",
        &[("key", KEY)],
    )
}

async fn rotations(d: &Daemon, outcome: &str) -> f64 {
    metric(
        &d.metrics().await,
        "keyrotd_rotations_total",
        &[("key", KEY), ("outcome", outcome)],
    )
}

/// What every destination holds now (vault, aws, file).
async fn fingerprints(stack: &Stack) -> Vec<Option<String>> {
    stack.destination_fingerprints().await
}

/// [`Stack::assert_consistent`] as a predicate, for `eventually`.
async fn consistent(stack: &Stack, o: &Options) -> bool {
    let want = Some(stack.portal.state().await.fingerprint);
    let fps = fingerprints(stack).await;
    let on = [true, o.with_aws, o.with_file];
    let stored = fps
        .iter()
        .zip(on)
        .filter(|(_, on)| *on)
        .all(|(f, _)| *f == want);
    stored
        && stack.dep_vault.verify().await == 200
        && (!o.with_aws || stack.dep_aws.verify().await == 200)
}

/// The journal's phase, e.g. "idle", "regenerating".
fn phase(stack: &Stack) -> String {
    stack.journal()["phase"].as_str().unwrap_or("").to_string()
}

/// Starts a manual rotation through the API without waiting for it; returns its id.
async fn start_rotation(d: &Daemon, reason: &str) -> String {
    let (status, body) = d
        .post(
            &format!("/v1/keys/{KEY}/rotate"),
            Some(ADMIN_TOKEN),
            json!({ "reason": reason }),
        )
        .await;
    assert_eq!(status, 202, "rotation accepted: {body}");
    body["rotation_id"]
        .as_str()
        .expect("rotation_id")
        .to_string()
}

async fn wait_phase(stack: &Stack, d: &Daemon, want: &str) {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if phase(stack) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the journal never said {want:?} (it says {:?}); log:\n{}",
        phase(stack),
        d.log_text()
    );
}

/// Waits until the daemon settled after recovery: consistent, journal idle, nothing owed.
async fn wait_converged(stack: &Stack, d: &Daemon, o: &Options) {
    let start = std::time::Instant::now();
    while start.elapsed() < CONVERGE {
        let j = stack.journal();
        if j["phase"] == "idle" && j["lost"] == false && consistent(stack, o).await {
            stack.assert_consistent(o).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "did not converge in {CONVERGE:?}: journal {:#}\ndestinations {:?}\nportal {:?}\nlog:\n{}",
        stack.journal(),
        fingerprints(stack).await,
        stack.portal.state().await,
        d.log_text()
    );
}

fn audit_has(stack: &Stack, event: &str, field: &str, value: &str) -> bool {
    stack
        .audit()
        .iter()
        .any(|r| r["event"] == event && r[field] == value)
}

/// No secret the portal ever issued is in the state directory (journal, audit) or the daemon logs.
async fn assert_no_secret_leaked(stack: &Stack) {
    let secrets = stack.portal.issued_secrets().await;
    assert!(!secrets.is_empty());
    let mut files = Vec::new();
    let mut dirs = vec![stack.state_dir()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir)
            .expect("state dir readable")
            .flatten()
        {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    assert!(
        files
            .iter()
            .any(|p| p.ends_with(format!("journal/{KEY}.json"))),
        "the journal exists: {files:?}"
    );
    for e in std::fs::read_dir(stack.dir.path())
        .expect("test dir")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("daemon-") && name.ends_with(".log") {
            files.push(e.path());
        }
    }
    for f in &files {
        let text = String::from_utf8_lossy(&std::fs::read(f).expect("read")).into_owned();
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "{} holds a secret the portal issued",
                f.display()
            );
        }
    }
}

fn journal_regenerations(stack: &Stack) -> usize {
    stack.journal()["regenerations"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_while_regenerating_after_the_portal_rotated_is_rerotated_at_restart() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    let mut d = stack.daemon(&config).await;
    let old_key = stack.portal.state().await.key_id;

    // The simulator rotates first, then holds the response back: the new key exists only in transit.
    stack
        .portal
        .faults(json!({"regenerate": {"delay_ms": 4000}}))
        .await;
    start_rotation(&d, "test: crash while regenerating").await;
    stack
        .eventually(
            Duration::from_secs(60),
            "journal regenerating and the portal rotated",
            || async {
                phase(&stack) == "regenerating" && stack.portal.state().await.regenerations == 1
            },
        )
        .await;
    d.kill9();
    assert_eq!(phase(&stack), "regenerating", "killed before the response");
    assert_eq!(stack.journal()["old_key_id"], old_key.as_str());
    stack
        .portal
        .faults(json!({"regenerate": {"delay_ms": 0}}))
        .await;

    let d = stack.daemon(&config).await;
    wait_converged(&stack, &d, &o).await;
    assert_eq!(
        stack.portal.state().await.regenerations,
        2,
        "one regenerate lost with the process, one re-rotation"
    );
    assert_eq!(rerotations(&d, "crash_recovery").await, 1.0);
    assert!(audit_has(&stack, "recovered", "reason", "crash_recovery"));
    assert!(audit_has(&stack, "rerotation", "detail", "crash_recovery"));
    assert_eq!(stack.journal()["rerotations_in_row"], 0);
    assert_no_secret_leaked(&stack).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_while_storing_before_any_write_is_rerotated_at_restart() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    let mut d = stack
        .daemon_with_env(&config, &[("FAILPOINTS", "after_regenerate=sleep(30000)")])
        .await;

    start_rotation(&d, "test: crash while storing").await;
    wait_phase(&stack, &d, "storing").await;
    d.kill9();
    let new_fp = stack.journal()["new_fingerprint"]
        .as_str()
        .expect("journal has the new fingerprint")
        .to_string();
    assert_eq!(stack.portal.state().await.fingerprint, new_fp);
    assert!(
        fingerprints(&stack)
            .await
            .iter()
            .all(|f| f.as_deref() != Some(new_fp.as_str())),
        "no destination got the new key before the crash"
    );

    let d = stack.daemon(&config).await;
    wait_converged(&stack, &d, &o).await;
    assert_eq!(stack.portal.state().await.regenerations, 2);
    assert_eq!(rerotations(&d, "crash_recovery").await, 1.0);
    assert!(audit_has(&stack, "recovered", "reason", "crash_recovery"));
    assert_no_secret_leaked(&stack).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_notify_copies_the_stored_key_and_notifies_without_regenerating() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    let mut d = stack
        .daemon_with_env(&config, &[("FAILPOINTS", "after_first_store=sleep(30000)")])
        .await;

    start_rotation(&d, "test: crash at notify").await;
    wait_phase(&stack, &d, "notify").await;
    d.kill9();
    let new_fp = stack.journal()["new_fingerprint"]
        .as_str()
        .expect("journal has the new fingerprint")
        .to_string();
    let held = fingerprints(&stack).await;
    let holding = held
        .iter()
        .filter(|f| f.as_deref() == Some(new_fp.as_str()))
        .count();
    eprintln!(
        "destinations holding the new key at the crash: {holding} of {}",
        held.len()
    );
    assert!(
        holding >= 1,
        "the journal says notify only after a confirmed store"
    );
    let reloads_before =
        stack.dep_vault.state().await.reloads + stack.dep_aws.state().await.reloads;

    let d = stack.daemon(&config).await;
    wait_converged(&stack, &d, &o).await;
    let state = stack.portal.state().await;
    assert_eq!(
        state.regenerations, 1,
        "no new regenerate: the key was stored"
    );
    assert_eq!(
        state.fingerprint, new_fp,
        "the key issued before the crash is active"
    );
    assert_eq!(all_rerotations(&d).await, 0.0);
    let reloads_after = stack.dep_vault.state().await.reloads + stack.dep_aws.state().await.reloads;
    assert!(
        reloads_after >= reloads_before + 2,
        "both dependents told again"
    );
    assert!(audit_has(&stack, "recovered", "reason", "crash_recovery"));
    assert_no_secret_leaked(&stack).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_during_the_watch_redoes_notify_and_ends_idle() {
    let stack = Stack::start().await;
    let o = Options {
        watch: "60s".into(),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let mut d = stack.daemon(&config).await;

    let record = d.rotate("test: crash during the watch").await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    assert_eq!(phase(&stack), "watch");
    stack.assert_consistent(&o).await;
    let fp = stack.portal.state().await.fingerprint;
    d.kill9();
    let vault_reloads = stack.dep_vault.state().await.reloads;
    let aws_reloads = stack.dep_aws.state().await.reloads;

    let d = stack.daemon(&config).await;
    wait_converged(&stack, &d, &o).await;
    let state = stack.portal.state().await;
    assert_eq!(state.regenerations, 1);
    assert_eq!(state.fingerprint, fp);
    assert_eq!(all_rerotations(&d).await, 0.0);
    assert!(
        stack.dep_vault.state().await.reloads > vault_reloads,
        "notify redone"
    );
    assert!(
        stack.dep_aws.state().await.reloads > aws_reloads,
        "notify redone"
    );
    assert!(audit_has(&stack, "recovered", "reason", "crash_recovery"));
    assert_no_secret_leaked(&stack).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_lost_in_transit_is_rerotated_at_once() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    let d = stack.daemon(&config).await;

    stack
        .portal
        .faults(json!({"regenerate": {"lose_next": 1}}))
        .await;
    let record = d.rotate("test: lost in transit").await;
    assert_eq!(record["outcome"], "success", "{record:#}\n{}", d.log_text());
    stack.assert_consistent(&o).await;
    assert_eq!(stack.portal.state().await.regenerations, 2);
    assert_eq!(
        journal_regenerations(&stack),
        2,
        "both count against the budget"
    );
    assert_eq!(rerotations(&d, "lost_before_storage").await, 1.0);
    assert_eq!(all_rerotations(&d).await, 1.0);
    assert!(audit_has(
        &stack,
        "rerotation",
        "detail",
        "lost_before_storage"
    ));
    assert_no_secret_leaked(&stack).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_5xx_regenerate_that_did_not_rotate_is_retried_without_rerotation() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    let d = stack.daemon(&config).await;

    stack
        .portal
        .faults(json!({"regenerate": {"fail_next": 1, "status": 503}}))
        .await;
    let record = d.rotate("test: 503 then ok").await;
    assert_eq!(record["outcome"], "success", "{record:#}\n{}", d.log_text());
    stack.assert_consistent(&o).await;
    assert_eq!(stack.portal.state().await.regenerations, 1);
    assert_eq!(
        journal_regenerations(&stack),
        1,
        "a regenerate known not to have rotated is not on the budget"
    );
    assert_eq!(all_rerotations(&d).await, 0.0);
    assert_no_secret_leaked(&stack).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_regeneration_budget_stops_a_misbehaving_portal_across_restarts() {
    let stack = Stack::start().await;
    let o = Options {
        max_regenerations_per_day: 4,
        max_rerotations: 10,
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let mut d = stack.daemon(&config).await;

    stack
        .portal
        .faults(json!({"regenerate": {"lose_next": 100}}))
        .await;
    let record = d.rotate("test: portal loses every key").await;
    assert_eq!(record["outcome"], "failed", "{record:#}");
    assert_eq!(stack.portal.state().await.regenerations, 4);
    // Three re-rotations were attempted; the fourth was stopped by the budget and is not counted.
    assert_eq!(rerotations(&d, "lost_before_storage").await, 3.0);
    let j = stack.journal();
    assert_eq!(j["phase"], "idle", "{j:#}");
    assert_eq!(j["lost"], true, "{j:#}");

    let record = d.rotate("test: operator tries again").await;
    assert_eq!(record["outcome"], "failed", "{record:#}");
    assert_eq!(stack.portal.state().await.regenerations, 4);

    // Left alone, the daemon does not retry into the exhausted budget (the recovery tick is 3s).
    let failed = rotations(&d, "failed").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        rotations(&d, "failed").await,
        failed,
        "no storm of failed rotations"
    );
    assert_eq!(stack.portal.state().await.regenerations, 4);

    // The budget is in the journal: it holds across a crash and restart.
    d.kill9();
    let d = stack.daemon(&config).await;
    let record = d.rotate("test: after a restart").await;
    assert_eq!(record["outcome"], "failed", "{record:#}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(stack.portal.state().await.regenerations, 4);
    assert_eq!(
        all_rerotations(&d).await,
        0.0,
        "nothing regenerated after the restart"
    );
    assert_no_secret_leaked(&stack).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rerotations_in_a_row_are_bounded_by_max_rerotations() {
    let stack = Stack::start().await;
    let o = Options {
        max_regenerations_per_day: 20,
        max_rerotations: 2,
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let d = stack.daemon(&config).await;

    stack
        .portal
        .faults(json!({"regenerate": {"lose_next": 100}}))
        .await;
    let record = d.rotate("test: portal loses every key").await;
    assert_eq!(record["outcome"], "failed", "{record:#}");
    // max_rerotations = 2: the first regenerate, then two re-rotations, then give up.
    assert_eq!(stack.portal.state().await.regenerations, 3);
    assert_eq!(rerotations(&d, "lost_before_storage").await, 2.0);
    let j = stack.journal();
    assert_eq!(j["phase"], "idle", "{j:#}");
    assert_eq!(j["lost"], true, "{j:#}");

    // Giving up means waiting for an operator: no further regenerate on the recovery tick.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(stack.portal.state().await.regenerations, 3);
    assert_eq!(rerotations(&d, "lost_before_storage").await, 2.0);
    assert_no_secret_leaked(&stack).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_before_regenerate_was_sent_changes_nothing_and_rotates_later() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    let mut d = stack
        .daemon_with_env(&config, &[("FAILPOINTS", "before_regenerate=sleep(30000)")])
        .await;
    let before = stack.portal.state().await;

    start_rotation(&d, "test: crash before regenerate").await;
    wait_phase(&stack, &d, "regenerating").await;
    d.kill9();

    // The portal's key is unchanged: recovery clears the journal without regenerating.
    let d = stack.daemon(&config).await;
    stack
        .eventually(Duration::from_secs(60), "journal cleared", || async {
            phase(&stack) == "idle"
        })
        .await;
    let after = stack.portal.state().await;
    assert_eq!(after.regenerations, 0);
    assert_eq!(after.key_id, before.key_id);
    assert_eq!(all_rerotations(&d).await, 0.0);

    // Nothing is owed; an operator's rotation then works normally.
    let record = d.rotate("test: after the crash").await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    stack.assert_consistent(&o).await;
    assert_eq!(stack.portal.state().await.regenerations, 1);
    assert_no_secret_leaked(&stack).await;
}
