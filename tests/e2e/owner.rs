//! The operational owner, end to end: a key names its owner (shown by `status`, `/v1/keys`, the audit
//! log and `plan --checklist`); a scheduled rotation of a key that needs an approval waits for
//! `keyrotd approve` (and is skipped without one); notifications reach a webhook receiver with the
//! documented JSON shape, never holding a secret, and one that is down changes nothing; and a key
//! keyrotd never held is reported, not regenerated, until its owner rotates it.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::daemon::Daemon;
use crate::support::process::refusing_port;
use crate::support::receiver::Receiver;
use crate::support::secrets::{Haystacks, secrets_of};
use crate::support::stack::{HOOK_KEY, KEY, Options, Stack};
use crate::support::{eventually, holds_for};

const LONG: Duration = Duration::from_secs(90);

/// The owner every test's key names.
const OWNER: &str = "owner = { name = \"team-payments\", contact = \"#payments-oncall\", runbook = \"https://wiki.example/billing\" }\n";

/// A signed webhook target named `chat` pointing at `url`.
fn chat_target(url: &str) -> String {
    format!(
        "\n[notify.chat]\nkind = \"webhook\"\nurl = \"{url}\"\nsigning_key = {{ env = \"KEYROTD_TEST_HOOK_KEY\" }}\nretries = 2\n"
    )
}

/// Every field of a notification, as docs/config.md lists them.
const NOTICE_FIELDS: [&str; 15] = [
    "event",
    "key",
    "ts",
    "owner",
    "rotation_id",
    "trigger",
    "outcome",
    "reason",
    "old_key_id",
    "new_key_id",
    "fingerprint",
    "generated_by",
    "approval_until",
    "dependent",
    "text",
];

async fn gauge(daemon: &Daemon, name: &str) -> f64 {
    daemon.metrics().await.get(name, &[("key", KEY)])
}

/// The daemon over destinations that hold the portal's key, once it adopted them at start (so the
/// key is not met for the first time, and no adoption holds the key when the test asks for more).
async fn seeded(stack: &Stack, o: &Options) -> Daemon {
    stack
        .seed_destinations(&stack.portal.current_secret().await)
        .await;
    let config = stack.write_config(o);
    let daemon = stack.daemon(&config).await;
    eventually(LONG, "the destinations adopted", || async {
        let k = daemon.key().await;
        k["observing"] == false
            && k["destinations"]
                .as_array()
                .is_some_and(|d| !d.is_empty() && d.iter().all(|d| d["in_sync"] == true))
    })
    .await;
    daemon
}

/// A key due every 5 seconds that needs an approval within `timeout`, telling `chat`.
fn gated(receiver: &Receiver, timeout: &str) -> Options {
    Options {
        schedule: Some("*/5 * * * * *".into()),
        key_extra: format!(
            "{OWNER}notify = [\"chat\"]\napproval = {{ timeout = \"{timeout}\" }}\n"
        ),
        notify_targets: chat_target(&receiver.url()),
        ..Options::default()
    }
}

fn records_of<'a>(audit: &'a [Value], id: &str) -> Vec<&'a Value> {
    audit.iter().filter(|r| r["rotation_id"] == id).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approval_gated_key_waits_then_rotates_once_approved_naming_the_approver() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let o = gated(&receiver, "1h");
    let daemon = seeded(&stack, &o).await;
    daemon.wait_phase("awaiting_approval", LONG).await;
    let key = daemon.key().await;
    let id = key["pending_approval"]["rotation_id"]
        .as_str()
        .expect("the pending rotation's id")
        .to_string();
    assert_eq!(gauge(&daemon, "keyrotd_rotation_pending").await, 1.0);
    // Longer than a schedule period: nothing else starts, nothing is regenerated.
    holds_for(
        Duration::from_secs(7),
        "nothing regenerated before the approval",
        || async {
            stack.regenerations().await == 0 && daemon.key().await["phase"] == "awaiting_approval"
        },
    )
    .await;
    let asked = receiver.of("pending_approval").await;
    assert_eq!(asked.len(), 1, "asked once: {asked:#?}");
    assert_eq!(asked[0]["rotation_id"], id.as_str());
    assert_eq!(asked[0]["owner"]["name"], "team-payments");
    assert_eq!(asked[0]["approval_until"], key["pending_approval"]["until"]);
    assert!(
        receiver.of("started").await.is_empty(),
        "not started before its approval"
    );

    // The portal loses the approved rotation's first answer: it is re-rotated at once, without a
    // second approval.
    stack
        .portal
        .faults(json!({ "regenerate": { "lose_next": 1 } }))
        .await;
    let config = stack.dir.path().join("keyrotd.toml");
    let (code, out, err) = tokio::task::block_in_place(|| {
        stack.command_via(
            &daemon,
            &config,
            &[
                "approve",
                KEY,
                "--reason",
                "owner present",
                "--as",
                "alice@ops",
            ],
        )
    });
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains(&format!("rotation {id}")), "{out}");
    assert!(out.contains("outcome: success"), "{out}");
    assert_eq!(
        stack.regenerations().await,
        2,
        "the lost one and its re-rotation"
    );
    assert_eq!(
        daemon.metrics().await.get(
            "keyrotd_rerotations_total",
            &[("key", KEY), ("reason", "lost_before_storage")]
        ),
        1.0
    );
    stack.assert_consistent(&o).await;

    let audit = stack.audit();
    let story = records_of(&audit, &id);
    let events: Vec<&str> = story.iter().filter_map(|r| r["event"].as_str()).collect();
    for want in [
        "started",
        "pending_approval",
        "approved",
        "rerotation",
        "regenerated",
        "finished",
    ] {
        assert!(events.contains(&want), "{want} missing: {events:?}");
    }
    assert_eq!(
        events.iter().filter(|e| **e == "pending_approval").count(),
        1
    );
    let approved = story.iter().find(|r| r["event"] == "approved").unwrap();
    assert_eq!(approved["approved_by"], "alice@ops");
    assert_eq!(approved["detail"], "owner present");
    let finished = story.iter().find(|r| r["event"] == "finished").unwrap();
    assert_eq!(finished["outcome"], "success");
    assert_eq!(finished["approved_by"], "alice@ops");
    stack
        .eventually(LONG, "the owner told it started and finished", || async {
            receiver
                .of("finished")
                .await
                .iter()
                .any(|n| n["rotation_id"] == id.as_str() && n["outcome"] == "success")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_approval_in_time_the_rotation_is_skipped_and_nothing_regenerated() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let o = gated(&receiver, "3s");
    let daemon = seeded(&stack, &o).await;
    stack
        .eventually(
            LONG,
            "a rotation skipped for want of an approval",
            || async {
                stack
                    .audit()
                    .iter()
                    .any(|r| r["event"] == "finished" && r["outcome"] == "skipped")
            },
        )
        .await;
    assert_eq!(stack.regenerations().await, 0, "nothing was regenerated");
    assert!(
        daemon.metrics().await.get(
            "keyrotd_rotations_total",
            &[("key", KEY), ("outcome", "skipped")]
        ) >= 1.0
    );
    stack
        .eventually(LONG, "the owner hears it was skipped", || async {
            receiver
                .of("finished")
                .await
                .iter()
                .any(|n| n["outcome"] == "skipped")
        })
        .await;
    let skipped = receiver.of("finished").await;
    let reason = skipped[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("no approval"), "{reason}");
    // The key in use was never touched.
    let active = stack.portal.state().await.fingerprint;
    assert_eq!(
        stack.destination_fingerprints().await,
        vec![Some(active); 3],
        "every destination still holds the key in use"
    );
    assert_eq!(stack.regenerations().await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_is_down_changes_nothing_and_is_counted() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let (down, _held) = refusing_port();
    let o = Options {
        key_extra: format!("{OWNER}notify = [\"chat\", \"down\"]\n"),
        notify_targets: format!(
            "{}\n[notify.down]\nkind = \"webhook\"\nurl = \"http://{down}/hook\"\nretries = 1\n",
            chat_target(&receiver.url())
        ),
        ..Options::default()
    };
    let daemon = seeded(&stack, &o).await;
    let record = daemon.rotate("test: receiver down").await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    stack.assert_consistent(&o).await;
    let counted = |target: &'static str, outcome: &'static str| {
        let daemon = &daemon;
        async move {
            daemon.metrics().await.get(
                "keyrotd_notifications_total",
                &[("target", target), ("outcome", outcome)],
            )
        }
    };
    stack
        .eventually(LONG, "the failures counted after their retries", || async {
            counted("down", "failed").await >= 2.0
        })
        .await;
    assert_eq!(counted("down", "ok").await, 0.0);
    assert!(
        counted("chat", "ok").await >= 2.0,
        "the other target still got them"
    );
    assert_eq!(receiver.events().await, ["started", "finished"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_reaches_the_receiver_with_the_documented_shape_and_no_secret() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let o = Options {
        watch: "10s".into(),
        watch_interval: "1s".into(),
        reconcile_interval: "2s".into(),
        key_extra: format!("{OWNER}notify = [\"chat\"]\n"),
        notify_targets: chat_target(&receiver.url()),
        ..Options::default()
    };
    let daemon = seeded(&stack, &o).await;
    // started, finished (success).
    let record = daemon.rotate("test: notices").await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    // auth_failures: the worker ignores the rotation's hook and the watch's first resend.
    stack
        .dep_vault
        .faults(json!({ "ignore_reload_next": 2 }))
        .await;
    daemon.rotate("test: auth failures").await;
    stack
        .eventually(LONG, "auth_failures told", || async {
            !receiver.of("auth_failures").await.is_empty()
        })
        .await;
    wait_watch_over(&daemon).await;
    // degraded: the edge's hook keeps failing.
    stack.dep_aws.faults(json!({ "fail_reload_next": 3 })).await;
    let record = daemon.rotate("test: degraded").await;
    assert_eq!(record["outcome"], "degraded", "{record:#}");
    wait_watch_over(&daemon).await;
    // drift_detected: someone rotates in the portal; reconcile sees it (and re-rotates).
    let oob = stack.portal.rotate_out_of_band().await;
    stack
        .eventually(LONG, "drift told", || async {
            !receiver.of("drift_detected").await.is_empty()
        })
        .await;
    stack
        .eventually(LONG, "the drift repaired", || async {
            stack.portal.state().await.key_id != oob && daemon.key().await["drift"] == false
        })
        .await;
    wait_watch_over(&daemon).await;
    // failed and key_lost: every answer of the portal is lost, past max_rerotations.
    stack
        .portal
        .faults(json!({ "regenerate": { "lose_next": 4 } }))
        .await;
    let record = daemon.rotate("test: lost").await;
    assert_eq!(record["outcome"], "failed", "{record:#}");

    stack
        .eventually(LONG, "every event received", || async {
            let events = receiver.events().await;
            [
                "started",
                "finished",
                "degraded",
                "failed",
                "key_lost",
                "drift_detected",
                "auth_failures",
            ]
            .iter()
            .all(|e| events.iter().any(|got| got == e))
        })
        .await;
    let drift = &receiver.of("drift_detected").await[0];
    assert_eq!(
        drift["generated_by"], "user:portal-ui",
        "who rotated out of band"
    );
    assert_eq!(drift["new_key_id"], oob.as_str());
    let auth = &receiver.of("auth_failures").await[0];
    assert_eq!(auth["dependent"], "worker");
    let lost = &receiver.of("key_lost").await[0];
    assert!(
        lost["reason"]
            .as_str()
            .unwrap_or("")
            .contains("re-rotations"),
        "{lost}"
    );

    let mut bodies = Haystacks::default();
    for (i, r) in receiver.received().await.into_iter().enumerate() {
        let body = r.body.as_object().expect("a JSON object");
        let fields: Vec<&str> = body.keys().map(String::as_str).collect();
        assert_eq!(fields.len(), NOTICE_FIELDS.len(), "{fields:?}");
        for f in NOTICE_FIELDS {
            assert!(body.contains_key(f), "{f} missing: {}", r.body);
        }
        assert_eq!(r.body["key"], KEY);
        assert_eq!(r.body["owner"]["contact"], "#payments-oncall");
        assert!(
            r.body["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("keyrotd: "))
        );
        assert!(
            chrono::DateTime::parse_from_rfc3339(r.body["ts"].as_str().unwrap_or("")).is_ok(),
            "{}",
            r.body
        );
        let now = chrono::Utc::now().timestamp();
        assert_eq!(
            keyrotd::notify::verify_signature(
                HOOK_KEY.as_bytes(),
                r.header("x-keyrotd-timestamp"),
                r.header("x-keyrotd-signature"),
                &r.raw,
                now
            ),
            Ok(()),
            "signed like a reload hook"
        );
        bodies.add(
            format!("notification #{i}"),
            String::from_utf8_lossy(&r.raw).into_owned(),
        );
        for (h, v) in &r.headers {
            if !h.eq_ignore_ascii_case("x-keyrotd-signature") {
                bodies.add(format!("notification #{i} header {h}"), v.clone());
            }
        }
    }
    bodies.assert_none_of(&secrets_of(&stack).await);
}

/// Waits until the key's watch (if any) is over, so the next step starts from an idle key.
async fn wait_watch_over(daemon: &Daemon) {
    eventually(LONG, "the key idle", || async {
        daemon.key().await["phase"] == "idle"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_owner_shows_in_status_the_api_the_audit_log_and_the_checklist() {
    let stack = Stack::start().await;
    let o = Options {
        key_extra: OWNER.into(),
        ..Options::default()
    };
    let daemon = seeded(&stack, &o).await;
    let record = daemon.rotate("test: owner").await;
    assert_eq!(record["outcome"], "success", "{record:#}");

    let key = daemon.key().await;
    assert_eq!(
        key["owner"],
        json!({ "name": "team-payments", "contact": "#payments-oncall", "runbook": "https://wiki.example/billing" })
    );
    for d in key["destinations"].as_array().expect("destinations") {
        let at = d["observed_at"].as_str().expect("observed_at");
        assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{d}");
    }
    let audit = stack.audit();
    assert!(!audit.is_empty());
    assert!(
        audit.iter().all(|r| r["owner"] == "team-payments"),
        "every record names the owner: {audit:#?}"
    );
    let m = daemon.metrics().await;
    assert_eq!(
        m.get(
            "keyrotd_key_info",
            &[("key", KEY), ("owner", "team-payments")]
        ),
        1.0
    );

    let config = stack.dir.path().join("keyrotd.toml");
    let run = |args: &[&str]| {
        let (code, out, err) = tokio::task::block_in_place(|| stack.command(&config, args));
        assert_eq!(code, 0, "keyrotd {args:?}: {out}\n{err}");
        out
    };
    let status = run(&["status", KEY]);
    assert!(
        status.contains(
            "  owner:   team-payments <#payments-oncall>, runbook https://wiki.example/billing"
        ),
        "{status}"
    );
    let checklist = run(&["plan", KEY, "--checklist"]);
    for want in [
        "Before: identify every service that uses the key",
        "  owner:       team-payments <#payments-oncall>",
        "  destination: vault (vault) -> apps/billing#api_key",
        "  dependent:   worker reads vault; reload POST http",
        "During:",
        "  invalidation window: median",
        "(last 1 rotations)",
        "After:",
        "  alert:       KeyrotdRotationFailed",
        "  alert:       KeyrotdPostRotationAuthFailures",
    ] {
        assert!(checklist.contains(want), "{want:?} missing:\n{checklist}");
    }
    let json: Value = serde_json::from_str(&run(&["plan", KEY, "--checklist", "--json"]))
        .expect("the checklist as JSON");
    assert_eq!(json["before"]["owner"]["name"], "team-payments");
    assert_eq!(
        json["before"]["destinations"].as_array().map(Vec::len),
        Some(3)
    );
    assert_eq!(json["during"]["expected_window"]["rotations"], 1);
    assert!(
        json["after"]["alerts"]
            .as_array()
            .is_some_and(|a| a.len() >= 8)
    );
    let plan = run(&["plan"]);
    assert!(
        plan.contains("note: owner team-payments <#payments-oncall>"),
        "{plan}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn first_contact_regenerates_nothing_until_the_owner_rotates() {
    let stack = Stack::start().await;
    let receiver = Receiver::start().await;
    let o = Options {
        reconcile_interval: "2s".into(),
        key_extra: format!("{OWNER}notify = [\"chat\"]\n"),
        notify_targets: chat_target(&receiver.url()),
        ..Options::default()
    };
    // An old set-up left a value the portal no longer accepts in every destination.
    stack
        .seed_destinations("aos_sk_live_from_an_old_setup_0000")
        .await;
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    stack
        .eventually(LONG, "drift reported as first contact", || async {
            let k = daemon.key().await;
            k["first_contact"] == true
                && k["drift"] == true
                && gauge(&daemon, "keyrotd_drift").await == 1.0
        })
        .await;
    // A minute of reconcile rounds every 2 seconds: nothing regenerated, still reported.
    holds_for(
        Duration::from_secs(60),
        "no regenerate on first contact",
        || async {
            stack.regenerations().await == 0 && gauge(&daemon, "keyrotd_drift").await == 1.0
        },
    )
    .await;
    let told = receiver.of("drift_detected").await;
    assert_eq!(told.len(), 1, "told once: {told:#?}");
    assert!(
        told[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("first contact"),
        "{}",
        told[0]
    );
    assert_eq!(told[0]["generated_by"], "role:admin");
    let (code, status, err) =
        tokio::task::block_in_place(|| stack.command_via(&daemon, &config, &["status", KEY]));
    assert_eq!(code, 0, "{err}");
    assert!(status.contains("FIRST CONTACT"), "{status}");

    // The owner's first rotation populates every destination.
    let (code, out, err) = tokio::task::block_in_place(|| {
        stack.command_via(
            &daemon,
            &config,
            &["rotate", KEY, "--reason", "first rotation"],
        )
    });
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(stack.regenerations().await, 1);
    stack.assert_consistent(&o).await;
    stack
        .eventually(LONG, "no drift, no first contact any more", || async {
            let k = daemon.key().await;
            k["first_contact"] == false && gauge(&daemon, "keyrotd_drift").await == 0.0
        })
        .await;
}
