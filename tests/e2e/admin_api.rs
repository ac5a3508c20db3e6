//! The admin API's table (docs/admin-api.md), every status code, against the real daemon; and the
//! memory of `GET /v1/rotations/{id}` (the last 100 rotations of each key).

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::stack::{ADMIN_TOKEN, KEY, Options, Stack};

const ROTATE: &str = "/v1/keys/billing/rotate";

fn assert_key_view(k: &Value) {
    let obj = k.as_object().expect("a key view is an object");
    for f in [
        "name",
        "provider",
        "active",
        "key_id",
        "first_generated",
        "last_rotated",
        "generated_by",
        "account_id",
        "next_rotation",
        "last_outcome",
        "phase",
        "destinations",
        "drift",
    ] {
        assert!(obj.contains_key(f), "key view without {f}: {k:#}");
    }
    assert!(k["drift"].is_boolean());
    let phases = [
        "idle",
        "preflight",
        "regenerating",
        "storing",
        "notifying",
        "verifying",
        "watching",
    ];
    assert!(
        phases.contains(&k["phase"].as_str().unwrap_or("")),
        "phase {}",
        k["phase"]
    );
    if !k["last_outcome"].is_null() {
        assert!(
            ["success", "degraded", "aborted", "failed"]
                .contains(&k["last_outcome"].as_str().unwrap_or("")),
            "last_outcome {}",
            k["last_outcome"]
        );
    }
    for d in k["destinations"].as_array().expect("destinations array") {
        for f in ["store", "key_id", "fingerprint", "in_sync"] {
            assert!(d.get(f).is_some(), "destination without {f}: {d}");
        }
        assert!(d["in_sync"].is_boolean());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_status_code_of_the_admin_api() {
    let stack = Stack::start().await;
    let o = Options::default();
    let config = stack.write_config(&o);
    // Readiness waits for the recovery scan. A journal left at `regenerating` (a crash before the
    // answer) makes recovery read the provider's status to decide: make that read slow.
    let key_id = stack.portal.state().await.key_id;
    let journal = stack.state_dir().join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    std::fs::write(
        journal.join(format!("{KEY}.json")),
        json!({ "key": KEY, "phase": "regenerating", "old_key_id": key_id }).to_string(),
    )
    .unwrap();
    stack
        .portal
        .faults(json!({ "status": { "fail_next": 3 } }))
        .await;
    let daemon = stack.spawn_daemon(&config, &[]).await;
    let http = reqwest::Client::new();
    let mut saw_503 = None;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(r) = http.get(format!("{}/readyz", daemon.base)).send().await {
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            if status == 503 {
                saw_503 = Some(body);
            } else if status == 200 {
                assert_eq!(body["ready"], true, "{body}");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.wait_ready(Duration::from_secs(5)).await;
    let not_ready = saw_503.unwrap_or_else(|| {
        panic!(
            "never saw /readyz 503 during recovery; log:\n{}",
            daemon.log_text()
        )
    });
    assert_eq!(not_ready["ready"], false, "{not_ready}");
    assert!(not_ready["reason"].is_string(), "{not_ready}");

    let (status, _) = daemon.get("/healthz").await;
    assert_eq!(status, 200);

    // /v1/keys: one object per key with every field; the provider's metadata known after recovery.
    let (status, keys) = daemon.get("/v1/keys").await;
    assert_eq!(status, 200);
    let keys = keys.as_array().expect("array").clone();
    assert_eq!(keys.len(), 1);
    assert_key_view(&keys[0]);
    let portal = stack.portal.state().await;
    assert_eq!(keys[0]["name"], KEY);
    assert_eq!(keys[0]["provider"], "portal");
    assert_eq!(keys[0]["active"], true);
    assert_eq!(keys[0]["key_id"], portal.key_id.as_str());
    assert_eq!(keys[0]["account_id"], "acct_42");
    assert!(keys[0]["next_rotation"].is_null(), "manual-only key");
    let (status, one) = daemon.get("/v1/keys/billing").await;
    assert_eq!(status, 200);
    assert_eq!(one, keys[0]);
    let (status, body) = daemon.get("/v1/keys/nope").await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string());

    // Auth: missing, wrong, wrong scheme → 401; nothing happens.
    for token in [None, Some("wrong-token"), Some("")] {
        let (status, _) = daemon.post(ROTATE, token, json!({"reason": "x"})).await;
        assert_eq!(status, 401, "token {token:?}");
    }
    let r = http
        .post(format!("{}{ROTATE}", daemon.base))
        .header("Authorization", format!("Basic {ADMIN_TOKEN}"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    for path in ["/v1/pause", "/v1/resume"] {
        assert_eq!(daemon.post(path, None, Value::Null).await.0, 401);
        assert_eq!(daemon.post(path, Some("nope"), Value::Null).await.0, 401);
    }
    assert_eq!(stack.portal.state().await.regenerations, 0);

    // Unknown key → 404.
    let (status, _) = daemon
        .post("/v1/keys/nope/rotate", Some(ADMIN_TOKEN), json!({}))
        .await;
    assert_eq!(status, 404);

    // Dry run → 200 with the preflight report; nothing changed.
    let (status, body) = daemon
        .post(
            ROTATE,
            Some(ADMIN_TOKEN),
            json!({"reason": "dry", "dry_run": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["rotation_id"].is_string(), "{body}");
    assert_eq!(body["would_rotate"], true, "{body}");
    let after = stack.portal.state().await;
    assert_eq!(after.regenerations, 0, "a dry run regenerates nothing");
    assert_eq!(after.key_id, portal.key_id);
    assert!(!stack.key_file().exists(), "a dry run writes nothing");

    // 202 with a rotation id; while it runs → 409.
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 2500 } }))
        .await;
    let (status, body) = daemon
        .post(
            ROTATE,
            Some(ADMIN_TOKEN),
            json!({"reason": "api test", "requested_by": "alice"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["rotation_id"]
        .as_str()
        .expect("rotation_id")
        .to_string();
    let (status, body) = daemon
        .post(ROTATE, Some(ADMIN_TOKEN), json!({"reason": "second"}))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].is_string());
    let busy = daemon.key().await;
    assert_ne!(busy["phase"], "idle", "{busy}");
    let record = daemon.wait_rotation(&id, Duration::from_secs(60)).await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 0 } }))
        .await;

    // The rotation's record.
    for f in [
        "rotation_id",
        "key",
        "trigger",
        "phase",
        "outcome",
        "started_at",
        "finished_at",
        "events",
    ] {
        assert!(record.get(f).is_some(), "record without {f}: {record:#}");
    }
    assert_eq!(record["rotation_id"], id.as_str());
    assert_eq!(record["key"], KEY);
    assert_eq!(record["trigger"], "api");
    assert!(record["finished_at"].is_string());
    let events = record["events"].as_array().unwrap();
    assert!(events.len() >= 3);
    for e in events {
        for f in ["ts", "event", "detail"] {
            assert!(e.get(f).is_some(), "event without {f}: {e}");
        }
    }
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names.first(), Some(&"started"));
    assert_eq!(names.last(), Some(&"finished"));
    let audit = stack.audit();
    let started = audit
        .iter()
        .find(|r| r["rotation_id"] == id.as_str() && r["event"] == "started")
        .expect("audit started");
    assert_eq!(started["requested_by"], "alice");
    assert_eq!(started["reason"], "api test");
    let (status, _) = daemon
        .get("/v1/rotations/00000000-0000-4000-8000-000000000000")
        .await;
    assert_eq!(status, 404);
    let (status, _) = daemon.get("/v1/rotations/not-an-id").await;
    assert_eq!(status, 404);

    // After the rotation the key view shows the destinations in sync.
    let view = daemon.key().await;
    assert_key_view(&view);
    assert_eq!(view["last_outcome"], "success");
    assert_eq!(view["phase"], "idle");
    let state = stack.portal.state().await;
    assert_eq!(view["key_id"], state.key_id.as_str());
    let dests = view["destinations"].as_array().unwrap();
    assert_eq!(dests.len(), 3);
    for d in dests {
        assert_eq!(d["in_sync"], true, "{d}");
        assert_eq!(d["key_id"], state.key_id.as_str());
        assert_eq!(d["fingerprint"], state.fingerprint.as_str());
    }

    // Paused: 423 without force, 202 with it.
    let (status, body) = daemon
        .post("/v1/pause", Some(ADMIN_TOKEN), Value::Null)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = daemon
        .post(ROTATE, Some(ADMIN_TOKEN), json!({"reason": "paused"}))
        .await;
    assert_eq!(status, 423, "{body}");
    assert_eq!(stack.portal.state().await.regenerations, 1);
    let (status, body) = daemon
        .post(
            ROTATE,
            Some(ADMIN_TOKEN),
            json!({"reason": "forced", "force": true}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let record = daemon
        .wait_rotation(
            body["rotation_id"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    let (status, _) = daemon
        .post("/v1/resume", Some(ADMIN_TOKEN), Value::Null)
        .await;
    assert_eq!(status, 200);
    // Resumed: an ordinary request is accepted again.
    let record = daemon.rotate("after resume").await;
    assert_eq!(record["outcome"], "success", "{record:#}");

    // A body that is not JSON, or has unknown fields, is a client error, not a rotation.
    let r = http
        .post(format!("{}{ROTATE}", daemon.base))
        .bearer_auth(ADMIN_TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(stack.portal.state().await.regenerations, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn outside_its_window_a_rotation_needs_force() {
    let stack = Stack::start().await;
    // A window open on Tuesdays only; the daemon's clock says Monday morning.
    let o = Options {
        key_extra: "window = { days = \"Tue\", start = \"00:00\", end = \"23:59\" }\n".into(),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let daemon = stack.daemon_at("2026-03-02 10:00:00", &config).await;
    let (status, body) = daemon
        .post(ROTATE, Some(ADMIN_TOKEN), json!({"reason": "outside"}))
        .await;
    assert_eq!(status, 423, "{body}");
    assert_eq!(stack.portal.state().await.regenerations, 0);
    let (status, body) = daemon
        .post(
            ROTATE,
            Some(ADMIN_TOKEN),
            json!({"reason": "outside, forced", "force": true}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let record = daemon
        .wait_rotation(
            body["rotation_id"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(record["outcome"], "success", "{record:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_admin_token_every_post_is_forbidden() {
    let stack = Stack::start().await;
    let o = Options {
        admin_token: false,
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;
    for path in [ROTATE, "/v1/keys/nope/rotate", "/v1/pause", "/v1/resume"] {
        for token in [None, Some(ADMIN_TOKEN)] {
            let (status, body) = daemon.post(path, token, json!({"reason": "x"})).await;
            assert_eq!(status, 403, "{path} with {token:?}: {body}");
        }
    }
    // GETs still answer.
    assert_eq!(daemon.get("/v1/keys").await.0, 200);
    assert_eq!(daemon.get("/metrics").await.0, 200);
    assert_eq!(stack.portal.state().await.regenerations, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_remembers_the_last_100_rotations_of_a_key() {
    let stack = Stack::start().await;
    let daemon = stack.daemon(&stack.write_config(&Options::default())).await;
    // Dry runs are rotations too (recorded, preflight only) and change nothing: cheap to make many.
    let mut ids = Vec::new();
    for i in 0..101 {
        let (status, body) = daemon
            .post(
                ROTATE,
                Some(ADMIN_TOKEN),
                json!({"reason": format!("dry {i}"), "dry_run": true}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        ids.push(
            body["rotation_id"]
                .as_str()
                .expect("rotation_id")
                .to_string(),
        );
    }
    let (status, _) = daemon.get(&format!("/v1/rotations/{}", ids[0])).await;
    assert_eq!(status, 404, "the 101st rotation pushed the first one out");
    for id in &ids[1..] {
        let (status, r) = daemon.get(&format!("/v1/rotations/{id}")).await;
        assert_eq!(status, 200, "rotation {id} is among the last 100");
        assert_eq!(r["rotation_id"], id.as_str());
    }
    assert_eq!(
        stack.regenerations().await,
        0,
        "dry runs regenerate nothing"
    );
}
