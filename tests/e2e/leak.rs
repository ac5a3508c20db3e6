//! No secret reaches any output. A run through most paths, the failing ones included, then every
//! secret the portal ever issued and every test credential is searched for in everything keyrotd wrote
//! or answered.
//!
//! The paths: rotations; a lost regenerate and its re-rotation; a watch with a dependent ignoring
//! reloads and the hook resent; an abort because OpenBao is down; a degraded rotation because OpenBao
//! went down mid-rotation, then the background fill; a degraded rotation because a reload hook keeps
//! failing; portal errors answered as HTML pages that quote the management token back (a 5xx on
//! status and on regenerate, a 429, and a status that keeps failing until the rotation aborts); a dry
//! run; the CLI handing a rotation to the daemon, `status` and
//! an in-process `rotate` with a command hook; JSON and text logs.
//!
//! The outputs: daemon logs, the audit log, the journals, the key files' sidecars, the Vault custom
//! metadata, the AWS tags, `/metrics`, `/v1/keys`, every `/v1/rotations/{id}`, the CLI's output,
//! every reload request the dependents received, the command hook's environment, and every
//! notification (the webhook receiver's bodies and headers, the notify command's stdin and environment).

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::daemon::Daemon;
use crate::support::receiver::Receiver;
use crate::support::secrets::{Haystacks, secrets_of};
use crate::support::stack::{ADMIN_TOKEN, KEY, Options, Stack};

const LONG: Duration = Duration::from_secs(60);

async fn api_snapshot(daemon: &Daemon, ids: &[String], label: &str, out: &mut Haystacks) {
    out.add(format!("{label} /metrics"), daemon.metrics().await.text());
    out.add(
        format!("{label} /v1/keys"),
        daemon.get("/v1/keys").await.1.to_string(),
    );
    out.add(
        format!("{label} /v1/keys/{KEY}"),
        daemon.key().await.to_string(),
    );
    for id in ids {
        let (status, r) = daemon.get(&format!("/v1/rotations/{id}")).await;
        assert_eq!(status, 200, "rotation {id} remembered");
        out.add(format!("{label} /v1/rotations/{id}"), r.to_string());
    }
}

/// Runs a rotation through the API; its outcome must be `want`. Returns the record.
async fn rotate_expecting(
    daemon: &Daemon,
    reason: &str,
    want: &str,
    ids: &mut Vec<String>,
) -> Value {
    let record = daemon.rotate(reason).await;
    assert_eq!(
        record["outcome"],
        want,
        "{reason}: {record:#}\n{}",
        daemon.log_text()
    );
    ids.push(record["rotation_id"].as_str().unwrap().to_string());
    record
}

/// The watch sees the worker fail, resends the hook; the worker ignores the rotation's hook and the
/// first resend, and reloads on the second.
async fn ignored_reloads(stack: &Stack, daemon: &Daemon, ids: &mut Vec<String>) {
    stack
        .dep_vault
        .faults(json!({ "ignore_reload_next": 2 }))
        .await;
    rotate_expecting(daemon, "leak test: ignored reload", "success", ids).await;
    let worker = [("key", KEY), ("dependent", "worker")];
    stack
        .eventually(LONG, "the worker reloads on the second resend", || async {
            let m = daemon.metrics().await;
            m.get("keyrotd_post_rotation_auth_failures_total", &worker) >= 6.0
                && m.get("keyrotd_post_rotation_auth_failing", &worker) == 0.0
        })
        .await;
}

/// OpenBao down: first at preflight (aborted), then mid-rotation (degraded, filled when it is back).
async fn openbao_outages(stack: &Stack, daemon: &Daemon, ids: &mut Vec<String>) {
    stack.bao.down();
    rotate_expecting(daemon, "leak test: openbao down", "aborted", ids).await;
    stack.bao.up();

    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 1500 } }))
        .await;
    let id = daemon
        .start_rotate("leak test: openbao gone mid-rotation")
        .await;
    daemon.wait_phase("regenerating", LONG).await;
    stack.bao.down();
    let record = daemon.wait_rotation(&id, LONG).await;
    assert_eq!(record["outcome"], "degraded", "{record:#}");
    ids.push(id);
    stack
        .portal
        .faults(json!({ "regenerate": { "delay_ms": 0 } }))
        .await;
    stack.bao.up();
    let active = stack.portal.state().await.fingerprint;
    stack
        .eventually(LONG, "the background fill writes OpenBao", || async {
            stack.vault_fingerprint().await.as_deref() == Some(active.as_str())
        })
        .await;
}

/// Portal errors as HTML pages quoting the management token, and a reload hook that keeps failing.
async fn provider_and_hook_errors(stack: &Stack, daemon: &Daemon, ids: &mut Vec<String>) {
    stack
        .portal
        .faults(json!({
            "html_errors": true,
            "status": { "fail_next": 1, "status": 500 },
            "regenerate": { "fail_next": 1, "status": 502 },
        }))
        .await;
    rotate_expecting(daemon, "leak test: portal 5xx pages", "success", ids).await;
    stack.portal.faults(json!({ "rate_limit_next": 1 })).await;
    rotate_expecting(daemon, "leak test: portal 429 page", "success", ids).await;
    let m = daemon.metrics().await;
    for (op, outcome) in [("status", "transient"), ("regenerate", "ambiguous")] {
        assert!(
            m.get(
                "keyrotd_provider_requests_total",
                &[
                    ("provider", "portal"),
                    ("operation", op),
                    ("outcome", outcome)
                ]
            ) >= 1.0,
            "a {outcome} {op} was counted\n{m}"
        );
    }
    assert!(
        m.sum(
            "keyrotd_provider_requests_total",
            &[("provider", "portal"), ("outcome", "rate_limited")]
        ) >= 1.0,
        "the 429 was counted\n{m}"
    );
    // The portal's status keeps failing: the rotation aborts, and the reason (in the record, the
    // audit log and the logs) speaks of the error page without quoting it.
    stack
        .portal
        .faults(json!({ "status": { "fail_next": 5, "status": 500 } }))
        .await;
    let record = rotate_expecting(daemon, "leak test: portal status down", "aborted", ids).await;
    assert!(record.to_string().contains("HTTP 500"), "{record:#}");
    stack.portal.faults(json!({ "html_errors": false })).await;

    stack.dep_aws.faults(json!({ "fail_reload_next": 3 })).await;
    rotate_expecting(daemon, "leak test: hook failing", "degraded", ids).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_any_output() {
    let stack = Stack::start().await;
    let hook_env = stack.dir.path().join("hook-env.txt");
    // Every notification goes to a webhook receiver and to a command target that keeps its stdin
    // and environment: both are searched like every other output.
    let receiver = Receiver::start().await;
    let notify_out = stack.dir.path().join("notify-command.txt");
    let o = Options {
        watch: "30s".into(),
        watch_interval: "1s".into(),
        store_deadline: "3s".into(),
        log_format: "json".into(),
        command_hook: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "env >> '{}'; echo --- >> '{}'",
                hook_env.display(),
                hook_env.display()
            ),
        ]),
        key_extra: "owner = { name = \"team-payments\" }\nnotify = [\"chat\", \"mail\"]\n".into(),
        notify_targets: format!(
            "\n[notify.chat]\nkind = \"webhook\"\nurl = \"{url}\"\nsigning_key = {{ env = \"KEYROTD_TEST_HOOK_KEY\" }}\n\n[notify.mail]\nkind = \"command\"\ncommand = [\"/bin/sh\", \"-c\", \"cat >> '{out}'; env >> '{out}'; echo --- >> '{out}'\"]\n",
            url = receiver.url(),
            out = notify_out.display()
        ),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let mut outputs = Haystacks::default();
    let mut ids: Vec<String> = Vec::new();

    // --- A daemon with JSON logs, every target at TRACE.
    let mut daemon = stack
        .daemon_with_env(&config, &[("RUST_LOG", "trace")])
        .await;
    rotate_expecting(&daemon, "leak test: first", "success", &mut ids).await;
    stack.assert_consistent(&o).await;

    // A regenerate whose answer is lost: the key is re-rotated.
    stack
        .portal
        .faults(json!({ "regenerate": { "lose_next": 1 } }))
        .await;
    rotate_expecting(&daemon, "leak test: lost answer", "success", &mut ids).await;
    assert_eq!(
        daemon.metrics().await.get(
            "keyrotd_rerotations_total",
            &[("key", KEY), ("reason", "lost_before_storage")]
        ),
        1.0,
        "the lost key was re-rotated"
    );

    ignored_reloads(&stack, &daemon, &mut ids).await;
    openbao_outages(&stack, &daemon, &mut ids).await;
    provider_and_hook_errors(&stack, &daemon, &mut ids).await;

    // A dry run.
    let (status, body) = daemon
        .post(
            &format!("/v1/keys/{KEY}/rotate"),
            Some(ADMIN_TOKEN),
            json!({"reason": "leak test: dry", "dry_run": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    outputs.add("dry run answer", body.to_string());
    ids.push(body["rotation_id"].as_str().unwrap().to_string());

    // The CLI hands a rotation to the running daemon.
    let (code, out, err) = tokio::task::block_in_place(|| {
        stack.command_via(
            &daemon,
            &config,
            &["rotate", KEY, "--reason", "leak test: cli via daemon"],
        )
    });
    assert_eq!(code, 0, "{out}\n{err}");
    outputs.add("cli rotate (daemon) stdout", out);
    outputs.add("cli rotate (daemon) stderr", err);

    api_snapshot(&daemon, &ids, "json daemon", &mut outputs).await;
    daemon.terminate(Duration::from_secs(30));
    let json_log = daemon.log_text();
    assert!(
        json_log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "JSON log lines"
    );

    // --- The CLI without a daemon: status, status --json, rotate in this process.
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["status", KEY],
        vec!["rotate", KEY, "--reason", "leak test: cli in-process"],
    ] {
        let (code, out, err) = tokio::task::block_in_place(|| stack.command(&config, &args));
        assert_eq!(code, 0, "keyrotd {args:?}:\n{out}\n{err}");
        outputs.add(format!("cli {args:?} stdout"), out);
        outputs.add(format!("cli {args:?} stderr"), err);
    }
    stack.assert_consistent(&o).await;

    // --- A daemon with text logs.
    let o_text = Options {
        log_format: "text".into(),
        ..o.clone()
    };
    let config = stack.write_config(&o_text);
    let mut daemon = stack.daemon(&config).await;
    let mut text_ids = Vec::new();
    rotate_expecting(&daemon, "leak test: text logs", "success", &mut text_ids).await;
    api_snapshot(&daemon, &text_ids, "text daemon", &mut outputs).await;
    daemon.terminate(Duration::from_secs(30));

    // Logs, state, sidecars, Vault metadata, AWS tags.
    outputs.gather_standard(&stack).await;
    let places = outputs.places().join("\n");
    for must in [
        "audit.jsonl",
        "journal",
        "billing.key.meta.json",
        "daemon-0.log",
        "daemon-1.log",
        "OpenBao metadata",
        "AWS tags",
    ] {
        assert!(places.contains(must), "{must} among the outputs:\n{places}");
    }

    // Every reload request the dependents received (the signature is an HMAC of the body).
    for (name, dep) in [("worker", &stack.dep_vault), ("edge", &stack.dep_aws)] {
        let requests = dep.requests().await;
        assert!(requests.len() >= 8, "{name} got the hooks");
        for (i, r) in requests.into_iter().enumerate() {
            outputs.add(format!("{name} reload #{i} body"), r.body.to_string());
            for (h, v) in r.headers {
                if h.eq_ignore_ascii_case("x-keyrotd-signature") {
                    continue;
                }
                outputs.add(format!("{name} reload #{i} header {h}"), v);
            }
        }
    }
    let env = std::fs::read_to_string(&hook_env).expect("the command hook ran");
    assert!(
        env.contains("KEYROTD_ROTATION_ID="),
        "hook env captured: {env}"
    );
    outputs.add("command hook environment", env);

    // Every notification the receiver got (the signature is an HMAC of the body), and everything the
    // notify command was given.
    let notices = receiver.received().await;
    assert!(
        notices.len() >= 20,
        "the receiver got the notifications: {}",
        notices.len()
    );
    for (i, r) in notices.into_iter().enumerate() {
        outputs.add(
            format!("notification #{i} body"),
            String::from_utf8_lossy(&r.raw).into_owned(),
        );
        for (h, v) in r.headers {
            if !h.eq_ignore_ascii_case("x-keyrotd-signature") {
                outputs.add(format!("notification #{i} header {h}"), v);
            }
        }
    }
    let mail = std::fs::read_to_string(&notify_out).expect("the notify command ran");
    assert!(mail.contains("KEYROTD_EVENT="), "{mail}");
    outputs.add("notify command stdin and environment", mail);

    let secrets = secrets_of(&stack).await;
    assert!(
        secrets.len() >= 12,
        "the run issued keys: {}",
        secrets.len()
    );
    assert_eq!(
        secrets
            .iter()
            .filter(|(k, _)| k.starts_with("KEYROTD_TEST_"))
            .count(),
        4
    );
    assert!(
        outputs.total_len() > 50_000,
        "the outputs were gathered ({} bytes)",
        outputs.total_len()
    );
    outputs.assert_none_of(&secrets);
}
