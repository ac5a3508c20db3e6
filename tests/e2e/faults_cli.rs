//! `keyrotd rotate` sends the admin token only to a daemon that holds the state-dir lock. Something
//! else answering on `daemon.listen` (a leftover process, a service started by another user while the
//! daemon is down) must learn nothing: the CLI rotates in-process instead.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::process::refusing_port;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const ADMIN_TOKEN: &str = "admin-token-must-stay-home";

/// A config whose `listen` is `listen`, with an admin token, a portal at `portal` (a port that
/// refuses connections) and one file destination.
fn write_config(dir: &Path, listen: SocketAddr, portal: SocketAddr) -> std::path::PathBuf {
    let tok = dir.join("tok");
    std::fs::write(&tok, "portal-token").unwrap();
    let admin = dir.join("admin");
    std::fs::write(&admin, ADMIN_TOKEN).unwrap();
    let state = dir.join("state");
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let config = dir.join("keyrotd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[daemon]
state_dir = "{state}"
listen = "{listen}"
admin_token = {{ file = "{admin}" }}
[providers.p]
kind = "aos"
base_url = "http://{portal}"
management_token = {{ file = "{tok}" }}
timeout = "1s"
[stores.local]
kind = "file"
dir = "{keys}"
[[keys]]
name = "k"
provider = "p"
  [[keys.destinations]]
  store = "local"
  file = "k"
"#,
            state = state.display(),
            admin = admin.display(),
            tok = tok.display(),
            keys = keys.display(),
        ),
    )
    .unwrap();
    config
}

fn keyrotd(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
        .arg("-c")
        .arg(config)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .output()
        .expect("run keyrotd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Something that answers like a daemon would: healthy, accepts the rotation, reports it done.
async fn impostor() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/healthz"))
        .respond_with(ResponseTemplate::new(200).set_body_string("ok\n"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/keys/k/rotate"))
        .respond_with(ResponseTemplate::new(202).set_body_json(
            serde_json::json!({"rotation_id": "00000000-0000-0000-0000-000000000001"}),
        ))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/rotations/00000000-0000-0000-0000-000000000001"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"events": [], "outcome": "success"})),
        )
        .mount(&server)
        .await;
    server
}

fn saw_the_token(requests: &[wiremock::Request]) -> bool {
    requests.iter().any(|r| {
        r.headers
            .get("authorization")
            .is_some_and(|v| v.to_str().unwrap_or("").contains(ADMIN_TOKEN))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_daemon_holding_the_lock_nothing_on_listen_is_asked() {
    let server = impostor().await;
    let (portal, _held) = refusing_port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), *server.address(), portal);
    let (code, out, err) =
        tokio::task::block_in_place(|| keyrotd(&config, &["rotate", "k", "--reason", "t"]));
    // Rotated in-process: the portal is unreachable, so preflight aborts (exit 1).
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(!out.contains("handing the rotation"), "{out}");
    let requests = server.received_requests().await.unwrap();
    assert!(
        !saw_the_token(&requests),
        "the admin token went to the impostor"
    );
    assert!(requests.is_empty(), "the impostor was asked: {requests:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_lock_held_the_rotation_is_handed_over() {
    let server = impostor().await;
    let (portal, _held) = refusing_port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), *server.address(), portal);
    // This test process plays the daemon's part of holding the lock.
    let _lock = keyrotd::journal::StateLock::acquire(&dir.path().join("state")).unwrap();
    let (code, out, err) =
        tokio::task::block_in_place(|| keyrotd(&config, &["rotate", "k", "--reason", "t"]));
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("handing the rotation"), "{out}");
    assert!(saw_the_token(&server.received_requests().await.unwrap()));
}
