//! Crash recovery and lost keys, end to end (docs/lifecycle.md: "Ambiguous regenerate", "Recovery after
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

use serde_json::json;

use crate::support::daemon::Daemon;
use crate::support::secrets::assert_no_secret_leaked;
use crate::support::stack::{KEY, Options, Stack};

async fn rerotations(d: &Daemon, reason: &str) -> f64 {
    d.metrics().await.get(
        "keyrotd_rerotations_total",
        &[("key", KEY), ("reason", reason)],
    )
}

async fn all_rerotations(d: &Daemon) -> f64 {
    d.metrics()
        .await
        .sum("keyrotd_rerotations_total", &[("key", KEY)])
}

async fn rotations(d: &Daemon, outcome: &str) -> f64 {
    d.metrics().await.get(
        "keyrotd_rotations_total",
        &[("key", KEY), ("outcome", outcome)],
    )
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
    d.start_rotate("test: crash while regenerating").await;
    stack
        .eventually(
            Duration::from_secs(60),
            "journal regenerating and the portal rotated",
            || async {
                stack.journal_phase() == "regenerating"
                    && stack.portal.state().await.regenerations == 1
            },
        )
        .await;
    d.kill9();
    assert_eq!(
        stack.journal_phase(),
        "regenerating",
        "killed before the response"
    );
    assert_eq!(stack.journal()["old_key_id"], old_key.as_str());
    stack
        .portal
        .faults(json!({"regenerate": {"delay_ms": 0}}))
        .await;

    let d = stack.daemon(&config).await;
    stack.wait_converged(&d, &o).await;
    assert_eq!(
        stack.portal.state().await.regenerations,
        2,
        "one regenerate lost with the process, one re-rotation"
    );
    assert_eq!(rerotations(&d, "crash_recovery").await, 1.0);
    assert!(stack.audit_has("recovered", "reason", "crash_recovery"));
    assert!(stack.audit_has("rerotation", "detail", "crash_recovery"));
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

    d.start_rotate("test: crash while storing").await;
    stack.wait_journal_phase(&d, "storing").await;
    d.kill9();
    let new_fp = stack.journal()["new_fingerprint"]
        .as_str()
        .expect("journal has the new fingerprint")
        .to_string();
    assert_eq!(stack.portal.state().await.fingerprint, new_fp);
    assert!(
        stack
            .destination_fingerprints()
            .await
            .iter()
            .all(|f| f.as_deref() != Some(new_fp.as_str())),
        "no destination got the new key before the crash"
    );

    let d = stack.daemon(&config).await;
    stack.wait_converged(&d, &o).await;
    assert_eq!(stack.portal.state().await.regenerations, 2);
    assert_eq!(rerotations(&d, "crash_recovery").await, 1.0);
    assert!(stack.audit_has("recovered", "reason", "crash_recovery"));
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

    // OpenBao goes away while the portal is answering the regenerate: the key can reach AWS and the
    // file, never OpenBao, before the crash. Whatever OpenBao holds after recovery was copied there.
    stack
        .portal
        .faults(json!({"regenerate": {"delay_ms": 2000}}))
        .await;
    d.start_rotate("test: crash at notify").await;
    d.wait_phase("regenerating", Duration::from_secs(30)).await;
    stack.bao.down();
    stack.wait_journal_phase(&d, "notify").await;
    d.kill9();
    let new_fp = stack.journal()["new_fingerprint"]
        .as_str()
        .expect("journal has the new fingerprint")
        .to_string();
    let held = stack.destination_fingerprints().await;
    assert_eq!(held[0], None, "OpenBao never got the key: {held:?}");
    assert!(
        held[1..].contains(&Some(new_fp.clone())),
        "the journal says notify only after a confirmed store: {held:?}"
    );
    let vault_reloads = stack.dep_vault.state().await.reloads;

    stack.bao.up();
    stack
        .portal
        .faults(json!({"regenerate": {"delay_ms": 0}}))
        .await;
    let d = stack.daemon(&config).await;
    stack.wait_converged(&d, &o).await;
    let state = stack.portal.state().await;
    assert_eq!(
        state.regenerations, 1,
        "no new regenerate: the key was stored"
    );
    assert_eq!(
        state.fingerprint, new_fp,
        "the key issued before the crash is active"
    );
    assert_eq!(
        stack.vault_fingerprint().await.as_deref(),
        Some(new_fp.as_str()),
        "recovery copied the stored key to OpenBao"
    );
    assert_eq!(all_rerotations(&d).await, 0.0);
    assert!(
        stack.dep_vault.state().await.reloads > vault_reloads,
        "the OpenBao-reading dependent was told"
    );
    assert!(stack.audit_has("recovered", "reason", "crash_recovery"));
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
    assert_eq!(stack.journal_phase(), "watch");
    stack.assert_consistent(&o).await;
    let fp = stack.portal.state().await.fingerprint;
    d.kill9();
    let vault_reloads = stack.dep_vault.state().await.reloads;
    let aws_reloads = stack.dep_aws.state().await.reloads;

    let d = stack.daemon(&config).await;
    stack.wait_converged(&d, &o).await;
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
    assert!(stack.audit_has("recovered", "reason", "crash_recovery"));
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
        stack.journal_regenerations(),
        2,
        "both count against the budget"
    );
    assert_eq!(rerotations(&d, "lost_before_storage").await, 1.0);
    assert_eq!(all_rerotations(&d).await, 1.0);
    assert!(stack.audit_has("rerotation", "detail", "lost_before_storage"));
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
        stack.journal_regenerations(),
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

    // Left alone, the daemon does not retry into the exhausted budget: observed over two recovery
    // ticks (each reads the portal's status for the lost key, then defers).
    let failed = rotations(&d, "failed").await;
    d.holds_for_rounds(2, "no further regenerate, no failed rotation", || async {
        rotations(&d, "failed").await == failed && stack.regenerations().await == 4
    })
    .await;

    // The budget is in the journal: it holds across a crash and restart.
    d.kill9();
    let mut d = stack.daemon(&config).await;
    let record = d.rotate("test: after a restart").await;
    assert_eq!(record["outcome"], "failed", "{record:#}");
    d.holds_for_rounds(2, "nothing regenerated after the restart", || async {
        stack.regenerations().await == 4 && all_rerotations(&d).await == 0.0
    })
    .await;

    // And between the daemon and the command line: `keyrotd rotate` without a daemon reads the same
    // budget from the journal and refuses too.
    d.terminate(Duration::from_secs(30));
    let (code, out, err) = tokio::task::block_in_place(|| {
        stack.command(&config, &["rotate", KEY, "--reason", "test: the CLI tries"])
    });
    assert_eq!(code, 1, "refused by the budget:\n{out}\n{err}");
    assert!(out.contains("outcome: failed"), "{out}\n{err}");
    assert_eq!(stack.regenerations().await, 4, "the CLI did not regenerate");
    assert_eq!(stack.journal_regenerations(), 4);
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

    // Giving up means waiting for an operator: no further regenerate, observed over two recovery
    // ticks (each reads the portal's status for the lost key, then defers).
    d.holds_for_rounds(2, "no regenerate after giving up", || async {
        stack.regenerations().await == 3 && rerotations(&d, "lost_before_storage").await == 2.0
    })
    .await;
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

    d.start_rotate("test: crash before regenerate").await;
    stack.wait_journal_phase(&d, "regenerating").await;
    d.kill9();

    // The portal's key is unchanged: recovery clears the journal without regenerating.
    let d = stack.daemon(&config).await;
    stack
        .eventually(Duration::from_secs(60), "journal cleared", || async {
            stack.journal_phase() == "idle"
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
