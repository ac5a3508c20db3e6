//! No secret reaches any output. A full run through most paths (rotations, a lost regenerate and its
//! re-rotation, a watch with a dependent ignoring reloads and the hook resent, a dry run, the CLI's
//! status and in-process rotate with a command hook, JSON and text logs), then every secret the portal
//! ever issued and every test credential is searched for in everything keyrotd wrote or answered:
//! daemon logs, the audit log, the journals, `/metrics`, `/v1/keys`, `/v1/rotations/{id}`, the CLI's
//! output, every reload request the dependents received and the command hook's environment.

use std::path::Path;
use std::time::Duration;

use crate::support::daemon::{ADMIN_TOKEN, Daemon, KEY, Options, Stack, metric_value};
use serde_json::{Value, json};

/// Every `(place, secret name)` where a secret occurs in a haystack.
fn leaks(haystacks: &[(String, String)], secrets: &[(String, String)]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (place, text) in haystacks {
        for (name, secret) in secrets {
            if text.contains(secret.as_str()) {
                found.push((place.clone(), name.clone()));
            }
        }
    }
    found
}

/// Every file under `dir`, recursively: (path, contents).
fn files_under(dir: &Path, out: &mut Vec<(String, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            files_under(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((
                path.display().to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
}

async fn api_snapshot(
    daemon: &Daemon,
    ids: &[String],
    label: &str,
    out: &mut Vec<(String, String)>,
) {
    out.push((format!("{label} /metrics"), daemon.metrics().await));
    out.push((
        format!("{label} /v1/keys"),
        daemon.get("/v1/keys").await.1.to_string(),
    ));
    out.push((
        format!("{label} /v1/keys/{KEY}"),
        daemon.key().await.to_string(),
    ));
    for id in ids {
        let (status, r) = daemon.get(&format!("/v1/rotations/{id}")).await;
        assert_eq!(status, 200, "rotation {id} remembered");
        out.push((format!("{label} /v1/rotations/{id}"), r.to_string()));
    }
}

async fn rotate_ok(daemon: &Daemon, reason: &str, ids: &mut Vec<String>) -> Value {
    let record = daemon.rotate(reason).await;
    assert_eq!(
        record["outcome"],
        "success",
        "{record:#}\n{}",
        daemon.log_text()
    );
    ids.push(record["rotation_id"].as_str().unwrap().to_string());
    record
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_any_output() {
    let stack = Stack::start().await;
    let hook_env = stack.dir.path().join("hook-env.txt");
    let o = Options {
        watch: "30s".into(),
        watch_interval: "1s".into(),
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
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let mut haystacks: Vec<(String, String)> = Vec::new();
    let mut ids: Vec<String> = Vec::new();

    // --- A daemon with JSON logs.
    let mut daemon = stack.daemon(&config).await;
    rotate_ok(&daemon, "leak test: first", &mut ids).await;
    stack.assert_consistent(&o).await;

    // A regenerate whose answer is lost: the key is re-rotated.
    stack
        .portal
        .faults(json!({ "regenerate": { "lose_next": 1 } }))
        .await;
    rotate_ok(&daemon, "leak test: lost answer", &mut ids).await;
    let m = daemon.metrics().await;
    assert!(
        metric_value(
            &m,
            "keyrotd_rerotations_total",
            &[("key", KEY), ("reason", "lost_before_storage")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "the lost key was re-rotated"
    );
    assert!(stack.portal.state().await.regenerations >= 3);

    // A dependent ignoring reloads: the watch sees it fail and resends the hook.
    stack
        .dep_vault
        .faults(json!({ "ignore_reload": true }))
        .await;
    rotate_ok(&daemon, "leak test: ignored reload", &mut ids).await;
    let worker = [("key", KEY), ("dependent", "worker")];
    stack
        .eventually(Duration::from_secs(60), "the hook resent", || async {
            let m = daemon.metrics().await;
            metric_value(&m, "keyrotd_post_rotation_auth_failures_total", &worker).unwrap_or(0.0)
                >= 3.0
                && metric_value(
                    &m,
                    "keyrotd_reload_hooks_total",
                    &[("key", KEY), ("dependent", "worker"), ("outcome", "ok")],
                )
                .unwrap_or(0.0)
                    >= 4.0
        })
        .await;
    stack
        .dep_vault
        .faults(json!({ "ignore_reload": false }))
        .await;
    stack
        .eventually(Duration::from_secs(60), "the worker reloaded", || async {
            metric_value(
                &daemon.metrics().await,
                "keyrotd_post_rotation_auth_failing",
                &worker,
            ) == Some(0.0)
        })
        .await;

    // A dry run.
    let (status, body) = daemon
        .post(
            &format!("/v1/keys/{KEY}/rotate"),
            Some(ADMIN_TOKEN),
            json!({"reason": "leak test: dry", "dry_run": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    haystacks.push(("dry run answer".into(), body.to_string()));
    ids.push(body["rotation_id"].as_str().unwrap().to_string());

    // The CLI hands a rotation to the running daemon.
    let (code, out, err) = stack.command(
        &config,
        &["rotate", KEY, "--reason", "leak test: cli via daemon"],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    haystacks.push(("cli rotate (daemon) stdout".into(), out));
    haystacks.push(("cli rotate (daemon) stderr".into(), err));

    api_snapshot(&daemon, &ids, "json daemon", &mut haystacks).await;
    daemon.terminate(Duration::from_secs(30));
    let json_log = daemon.log_text();
    assert!(
        json_log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "JSON log lines"
    );
    haystacks.push(("daemon log (json)".into(), json_log));

    // --- The CLI without a daemon: status, status --json, rotate in this process.
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["status", KEY],
        vec!["rotate", KEY, "--reason", "leak test: cli in-process"],
    ] {
        let (code, out, err) = stack.command(&config, &args);
        assert_eq!(code, 0, "keyrotd {args:?}:\n{out}\n{err}");
        haystacks.push((format!("cli {args:?} stdout"), out));
        haystacks.push((format!("cli {args:?} stderr"), err));
    }
    stack.assert_consistent(&o).await;

    // --- A daemon with text logs.
    let o_text = Options {
        log_format: "text".into(),
        ..o.clone()
    };
    let config = stack.write_config(&o_text);
    let mut daemon = stack.daemon(&config).await;
    rotate_ok(&daemon, "leak test: text logs", &mut ids).await;
    let text_ids: Vec<String> = ids.last().cloned().into_iter().collect();
    api_snapshot(&daemon, &text_ids, "text daemon", &mut haystacks).await;
    daemon.terminate(Duration::from_secs(30));
    haystacks.push(("daemon log (text)".into(), daemon.log_text()));

    // Everything keyrotd keeps on disk (journals, audit log, lock).
    let mut state_files = Vec::new();
    files_under(&stack.state_dir(), &mut state_files);
    assert!(
        state_files.iter().any(|(p, _)| p.ends_with("audit.jsonl")),
        "audit log present"
    );
    assert!(
        state_files.iter().any(|(p, _)| p.contains("journal")),
        "journal present"
    );
    haystacks.extend(state_files);

    // Every reload request the dependents received (the signature is an HMAC of the body).
    for (name, dep) in [("worker", &stack.dep_vault), ("edge", &stack.dep_aws)] {
        let requests = dep.requests().await;
        assert!(requests.len() >= 5, "{name} got the hooks");
        for (i, r) in requests.into_iter().enumerate() {
            haystacks.push((format!("{name} reload #{i} body"), r.body.to_string()));
            for (h, v) in r.headers {
                if h.eq_ignore_ascii_case("x-keyrotd-signature") {
                    continue;
                }
                haystacks.push((format!("{name} reload #{i} header {h}"), v));
            }
        }
    }
    let env = std::fs::read_to_string(&hook_env).expect("the command hook ran");
    assert!(
        env.contains("KEYROTD_ROTATION_ID="),
        "hook env captured: {env}"
    );
    haystacks.push(("command hook environment".into(), env));

    // The secrets: every key the portal issued, and every credential the test gave keyrotd.
    let issued = stack.portal.issued_secrets().await;
    assert!(issued.len() >= 7, "the run issued keys: {}", issued.len());
    let mut secrets: Vec<(String, String)> = issued
        .into_iter()
        .enumerate()
        .map(|(i, s)| (format!("issued secret #{i}"), s))
        .collect();
    for (k, v) in stack.env() {
        if k.starts_with("KEYROTD_TEST_") {
            secrets.push((k, v));
        }
    }
    assert!(
        secrets.iter().all(|(_, s)| s.len() >= 16),
        "secrets long enough to be unique"
    );
    assert_eq!(
        secrets
            .iter()
            .filter(|(k, _)| k.starts_with("KEYROTD_TEST_"))
            .count(),
        4
    );

    // The search finds a secret where there is one.
    let (name, secret) = &secrets[1];
    let control = vec![("control".to_string(), format!("xx{secret}yy"))];
    assert_eq!(
        leaks(&control, &secrets),
        vec![("control".to_string(), name.clone())]
    );

    let total: usize = haystacks.iter().map(|(_, t)| t.len()).sum();
    assert!(total > 50_000, "the outputs were gathered ({total} bytes)");
    let found = leaks(&haystacks, &secrets);
    assert!(found.is_empty(), "secrets leaked: {found:#?}");
}
