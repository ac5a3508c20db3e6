//! The compose stack's simulators, as the real `keyrotd-sim` parses and serves them: each service's
//! own command line (listening on a loopback port of its choosing instead of `0.0.0.0:PORT`) starts,
//! and serves every path `config/compose.toml` calls on it; the portal's account and token are the
//! ones keyrotd's config expects.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_norway::Value;

use crate::support::process::{Proc, http_status};
use crate::support::project_root;

fn read(path: impl AsRef<Path>) -> String {
    let path = project_root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn compose() -> Value {
    let mut doc: Value =
        serde_norway::from_str(&read("docker-compose.yml")).expect("docker-compose.yml is YAML");
    doc.apply_merge().expect("YAML merge keys resolve");
    doc
}

fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc.get("services")
        .and_then(|s| s.get(name))
        .unwrap_or_else(|| panic!("docker-compose.yml has no service {name}"))
}

/// A service's `entrypoint` or `command` list.
fn string_list(svc: &Value, field: &str) -> Vec<String> {
    svc.get(field)
        .and_then(Value::as_sequence)
        .unwrap_or_else(|| panic!("{field} is a list: {svc:?}"))
        .iter()
        .map(|v| {
            v.as_str()
                .unwrap_or_else(|| panic!("{field} holds strings: {v:?}"))
                .to_owned()
        })
        .collect()
}

/// Starts `keyrotd-sim` with `args` and only `env` (plus PATH) and waits until it serves; returns it
/// and its address.
fn start_sim(args: &[String], env: &[(String, String)]) -> (Proc, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyrotd-sim"));
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    let mut sim = Proc::spawn(&format!("keyrotd-sim {}", args[0]), cmd);
    let port = sim.wait_port(Duration::from_secs(30), |p| {
        http_status(p, "/_sim/state") == Some(200)
    });
    (sim, format!("127.0.0.1:{port}"))
}

#[tokio::test]
async fn the_stacks_simulators_run_with_the_real_keyrotd_sim_and_serve_what_keyrotd_calls() {
    let doc = compose();
    let config = read("config/compose.toml");
    let dockerfile = read("Dockerfile");
    let http = reqwest::Client::new();

    for name in ["portal", "dependent"] {
        let svc = service(&doc, name);
        let entrypoint = string_list(svc, "entrypoint");
        assert_eq!(
            entrypoint,
            ["/usr/local/bin/keyrotd-sim"],
            "services.{name} runs the simulator"
        );
        assert!(
            dockerfile.contains("/src/target/release/keyrotd-sim /usr/local/bin/"),
            "the image installs keyrotd-sim where services.{name}.entrypoint expects it"
        );

        // The service's own command, listening on a free loopback port instead of 0.0.0.0:PORT.
        let mut args = string_list(svc, "command");
        assert_eq!(args[0], name, "services.{name}.command: {args:?}");
        let listen_at = args
            .iter()
            .position(|a| a == "--listen")
            .unwrap_or_else(|| panic!("services.{name}.command has --listen: {args:?}"))
            + 1;
        let port = args[listen_at]
            .strip_prefix("0.0.0.0:")
            .unwrap_or_else(|| panic!("services.{name} listens on 0.0.0.0:PORT: {args:?}"))
            .to_owned();
        args[listen_at] = "127.0.0.1:0".into();
        let env: Vec<(String, String)> = svc
            .get("environment")
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                (
                    k.as_str().expect("variable name").to_owned(),
                    v.as_str().expect("variable value").to_owned(),
                )
            })
            .collect();
        let (_sim, addr) = start_sim(&args, &env);

        // keyrotd reaches the service on the port it listens on, at paths the simulator serves.
        let base = format!("http://{name}:{port}");
        assert!(
            config.contains(&base),
            "config/compose.toml calls {name} at {base}"
        );
        let paths: Vec<&str> = config
            .split(&base)
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .collect();
        if name == "dependent" {
            assert!(
                paths.contains(&"/-/reload") && paths.contains(&"/health/upstream"),
                "the config reloads and verifies the dependent: {paths:?}"
            );
        }
        for path in paths.into_iter().filter(|p| !p.is_empty()) {
            let url = format!("http://{addr}{path}");
            let method = if path == "/-/reload" { "POST" } else { "GET" };
            let request = if method == "POST" {
                http.post(&url).json(&serde_json::json!({}))
            } else {
                http.get(&url)
            };
            let status = request
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
                .status()
                .as_u16();
            assert!(
                status != 404 && status != 405,
                "{method} {path} exists on keyrotd-sim {name}: got {status}"
            );
        }
    }
    // The portal the config talks to uses the token and account the stack's portal is started with.
    let portal = string_list(service(&doc, "portal"), "command");
    let account = portal
        .windows(2)
        .find(|w| w[0] == "--account-id")
        .map(|w| w[1].clone())
        .expect("the portal's --account-id");
    assert!(
        config.contains(&format!("account_id = \"{account}\"")),
        "config/compose.toml expects account {account}"
    );
    let token_env = portal
        .windows(2)
        .find(|w| w[0] == "--token-env")
        .map(|w| w[1].clone())
        .expect("the portal's --token-env");
    let token = |svc: &str| {
        service(&doc, svc)
            .get("environment")
            .and_then(|e| e.get(token_env.as_str()))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    assert!(
        token("portal").is_some(),
        "{token_env} is set for the portal"
    );
    assert!(
        config.contains(&format!("management_token = {{ env = \"{token_env}\" }}")),
        "keyrotd reads the management token from {token_env}"
    );
    assert_eq!(
        token("keyrotd"),
        token("portal"),
        "keyrotd and the portal share the management token"
    );
}
