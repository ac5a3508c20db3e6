//! The deployment artefacts hold together: the systemd unit passes `systemd-analyze verify` and scores
//! "OK" or better in `systemd-analyze security`, its user and directories can be created by
//! systemd-sysusers/systemd-tmpfiles, and the compose stack is accepted by docker-compose and refers
//! only to files that exist in the repository, at the paths its configs expect inside the containers.
//!
//! Needs `systemd-analyze`, `systemd-sysusers`, `systemd-tmpfiles`, `docker-compose` and `promtool` on
//! PATH (scripts/install-tools.sh); a missing tool fails the test, naming it. Runs as root (the
//! tmpfiles test creates root- and keyrotd-owned directories in a temporary root).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_norway::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: impl AsRef<Path>) -> String {
    let path = root().join(path);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Runs a tool; a tool that cannot be started fails the test with its name.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (scripts/install-tools.sh installs it): {e}")
        })
}

fn text(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---------------------------------------------------------------------------------------------------
// systemd

const UNIT: &str = "systemd/keyrotd.service";
const UNIT_BINARY: &str = "/usr/local/bin/keyrotd";

/// The unit's `Key=value` lines (comments and section headers dropped), in order.
fn unit_settings() -> Vec<(String, String)> {
    read(UNIT)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn unit_values(key: &str) -> Vec<String> {
    unit_settings()
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect()
}

fn unit_value(key: &str) -> String {
    let values = unit_values(key);
    assert_eq!(
        values.len(),
        1,
        "{UNIT} sets {key}= exactly once: {values:?}"
    );
    values[0].clone()
}

#[test]
fn the_unit_forbids_core_dumps_and_leaves_room_for_a_fleet_of_sockets() {
    // A core dump would hold every key in memory at the moment of the crash.
    assert_eq!(unit_value("LimitCORE"), "0");
    // A fleet's concurrent connections to portals, stores and hooks outgrow the default 1,024.
    let nofile: u64 = unit_value("LimitNOFILE")
        .parse()
        .expect("LimitNOFILE is a number");
    assert!(nofile >= 16_384, "LimitNOFILE={nofile}");
}

/// The unit as installed, with ExecStart pointing at the binary cargo just built, in a temp dir.
fn unit_with_built_binary() -> (tempfile::TempDir, PathBuf) {
    let unit = read(UNIT);
    let exec_start = format!("ExecStart={UNIT_BINARY} ");
    assert_eq!(
        unit.matches(&exec_start).count(),
        1,
        "{UNIT} starts {UNIT_BINARY} (the path docs/install.md installs to)"
    );
    let built = env!("CARGO_BIN_EXE_keyrotd");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("keyrotd.service");
    let unit = unit.replace(&exec_start, &format!("ExecStart=\"{built}\" "));
    fs::write(&path, unit).expect("write the unit copy");
    (dir, path)
}

#[test]
fn systemd_analyze_verify_finds_nothing_wrong_with_the_unit() {
    let (_dir, unit) = unit_with_built_binary();
    let out = run(
        "systemd-analyze",
        &["verify", unit.to_str().expect("UTF-8 temp path")],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify reports nothing: {}",
        text(&out)
    );
}

#[test]
fn systemd_analyze_verify_would_notice_a_missing_binary() {
    // The check above is meaningful: with the binary path absent, verify complains.
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = dir.path().join("keyrotd.service");
    let missing = dir.path().join("no-such-keyrotd");
    fs::write(
        &unit,
        read(UNIT).replace(UNIT_BINARY, missing.to_str().expect("UTF-8 temp path")),
    )
    .expect("write the unit copy");
    let out = run(
        "systemd-analyze",
        &["verify", unit.to_str().expect("UTF-8 temp path")],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-keyrotd"),
        "{}",
        text(&out)
    );
}

#[test]
fn systemd_analyze_security_rates_the_unit_ok_or_better() {
    let out = run(
        "systemd-analyze",
        &["security", "--no-pager", "--offline=true", UNIT],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // "→ Overall exposure level for keyrotd.service: 1.2 OK 🙂"
    let overall = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for keyrotd.service:"))
        .unwrap_or_else(|| panic!("no overall exposure line: {}", text(&out)));
    let score: f64 = overall
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in {overall:?}"));
    assert!(
        score <= 2.0,
        "exposure {score} is above 2.0 (\"OK\"):\n{stdout}"
    );
}

#[test]
fn the_unit_speaks_the_notify_protocol_and_outwaits_the_store_deadline() {
    assert_eq!(unit_value("Type"), "notify");
    assert_eq!(unit_value("NotifyAccess"), "main");
    let watchdog = humantime::parse_duration(&unit_value("WatchdogSec")).expect("WatchdogSec");
    assert!(watchdog >= Duration::from_secs(10), "{watchdog:?}");
    assert_eq!(unit_value("ExecReload"), "/bin/kill -HUP $MAINPID");

    // Graceful shutdown waits for a rotation past regenerate, bounded by the longest store_deadline
    // (default 60s) plus 15 s (src/daemon.rs): systemd must not SIGKILL the daemon before that.
    let default_store_deadline = Duration::from_secs(60);
    let shutdown_bound = default_store_deadline + Duration::from_secs(15);
    let stop = humantime::parse_duration(&unit_value("TimeoutStopSec")).expect("TimeoutStopSec");
    assert!(stop > shutdown_bound, "TimeoutStopSec={stop:?}");

    // keyrotd's default state_dir is $STATE_DIRECTORY, which StateDirectory= sets.
    assert_eq!(unit_value("StateDirectory"), "keyrotd");
    // Credentials arrive under /run/credentials/keyrotd.service/, where the config refers to them.
    let creds = unit_values("LoadCredential");
    assert!(!creds.is_empty(), "the unit loads credentials");
    for cred in &creds {
        let (id, path) = cred
            .split_once(':')
            .unwrap_or_else(|| panic!("LoadCredential={cred} names ID:PATH"));
        assert_eq!(
            path,
            format!("/etc/keyrotd/credentials/{id}"),
            "credentials come from the directory keyrotd.tmpfiles.conf creates"
        );
    }
    // Command hooks inherit no way to gain privileges: polkit over D-Bus is the route (docs).
    assert_eq!(unit_value("NoNewPrivileges"), "yes");
    assert_eq!(unit_value("CapabilityBoundingSet"), "");
}

/// The `u NAME ...` entry of the sysusers file.
fn sysusers_user() -> String {
    read("systemd/keyrotd.sysusers.conf")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            (fields.next() == Some("u")).then(|| fields.next().map(str::to_owned))?
        })
        .expect("keyrotd.sysusers.conf declares a user")
}

#[test]
fn sysusers_and_tmpfiles_create_the_user_and_directories_the_unit_uses() {
    let user = sysusers_user();
    assert_eq!(
        unit_value("User"),
        user,
        "the unit runs as the sysusers user"
    );
    assert_eq!(unit_value("Group"), user);

    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path();
    fs::create_dir_all(image.join("etc")).expect("etc in the temp root");
    let image_arg = format!("--root={}", image.display());

    // Absolute paths: with --root, the tools resolve relative config paths inside the root.
    let sysusers = root().join("systemd/keyrotd.sysusers.conf");
    let tmpfiles = root().join("systemd/keyrotd.tmpfiles.conf");
    let out = run(
        "systemd-sysusers",
        &[&image_arg, sysusers.to_str().expect("UTF-8 repo path")],
    );
    assert!(out.status.success(), "{}", text(&out));
    let passwd = fs::read_to_string(image.join("etc/passwd")).expect("passwd in the temp root");
    let entry: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{user}:")))
        .unwrap_or_else(|| panic!("no {user} in passwd: {passwd}"))
        .split(':')
        .collect();
    let uid: u32 = entry[2].parse().expect("numeric uid");
    assert!(uid > 0 && uid < 1000, "a system user: {entry:?}");
    assert_eq!(entry[6], "/usr/sbin/nologin", "{entry:?}");

    let out = run(
        "systemd-tmpfiles",
        &[
            &image_arg,
            "--create",
            tmpfiles.to_str().expect("UTF-8 repo path"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    // (path, mode, owner uid)
    let expected = [
        ("etc/keyrotd", 0o750, 0),
        ("etc/keyrotd/credentials", 0o700, 0),
        ("etc/keyrotd/keys", 0o750, uid),
    ];
    for (path, mode, owner) in expected {
        let meta = fs::metadata(image.join(path)).unwrap_or_else(|e| panic!("/{path}: {e}"));
        assert!(meta.is_dir(), "/{path} is a directory");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "/{path} mode");
        assert_eq!(meta.uid(), owner, "/{path} owner");
    }
    // The one file-store directory the tmpfiles entry creates is the one the unit makes writable.
    assert_eq!(unit_value("ReadWritePaths"), "-/etc/keyrotd/keys");
}

// ---------------------------------------------------------------------------------------------------
// docker-compose

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

/// The named volumes declared at the top level.
fn declared_volumes(doc: &Value) -> BTreeSet<String> {
    doc.get("volumes")
        .and_then(Value::as_mapping)
        .map(|m| {
            m.keys()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// A service's bind mounts as (host path relative to the repo, container path).
fn bind_mounts(name: &str, svc: &Value, named_volumes: &BTreeSet<String>) -> Vec<(String, String)> {
    let mut binds = Vec::new();
    for volume in svc
        .get("volumes")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        let (source, target) = match volume {
            Value::String(short) => {
                let mut parts = short.split(':');
                let source = parts.next().unwrap_or_default().to_owned();
                let target = parts.next().unwrap_or_default().to_owned();
                (source, target)
            }
            long => {
                let field = |k: &str| long.get(k).and_then(Value::as_str).unwrap_or_default();
                (field("source").to_owned(), field("target").to_owned())
            }
        };
        assert!(
            !target.is_empty(),
            "services.{name}.volumes: {volume:?} has a container path"
        );
        if source.starts_with("./") || source.starts_with("../") {
            binds.push((source.trim_start_matches("./").to_owned(), target));
        } else {
            assert!(
                named_volumes.contains(&source),
                "services.{name}.volumes: {source:?} is neither a repo path (./...) nor a declared volume; \
                 the stack must not depend on host paths outside the repository"
            );
        }
    }
    binds
}

#[test]
fn docker_compose_accepts_the_file() {
    let out = run(
        "docker-compose",
        &["-f", "docker-compose.yml", "config", "-q"],
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn every_file_the_compose_stack_builds_or_mounts_exists_in_the_repo() {
    let doc = compose();
    let named_volumes = declared_volumes(&doc);
    let services = doc
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has services");

    let mut checked = BTreeSet::new();
    for (name, svc) in services {
        let name = name.as_str().expect("service names are strings");
        if let Some(build) = svc.get("build") {
            let (context, dockerfile) = match build {
                Value::String(context) => (context.clone(), "Dockerfile".to_owned()),
                build => (
                    build
                        .get("context")
                        .and_then(Value::as_str)
                        .unwrap_or(".")
                        .to_owned(),
                    build
                        .get("dockerfile")
                        .and_then(Value::as_str)
                        .unwrap_or("Dockerfile")
                        .to_owned(),
                ),
            };
            let context = root().join(&context);
            assert!(
                context.is_dir(),
                "services.{name}.build.context {} exists",
                context.display()
            );
            let dockerfile = context.join(dockerfile);
            assert!(
                dockerfile.is_file(),
                "services.{name}.build.dockerfile {} exists",
                dockerfile.display()
            );
            checked.insert(
                dockerfile
                    .strip_prefix(root())
                    .unwrap_or(&dockerfile)
                    .display()
                    .to_string(),
            );
        }
        for (source, target) in bind_mounts(name, svc, &named_volumes) {
            let path = root().join(&source);
            assert!(
                path.exists(),
                "services.{name}.volumes: {source} (mounted at {target}) does not exist in the repository"
            );
            checked.insert(source);
        }
    }

    // The stack's own parts are among what was checked (a compose file that lost a mount fails here).
    for expected in [
        "Dockerfile",
        "config/compose.toml",
        "prometheus/prometheus.compose.yml",
        "prometheus/alerts.yml",
        "prometheus/grafana/keyrotd-dashboard.json",
        "prometheus/grafana/provisioning/datasources",
        "prometheus/grafana/provisioning/dashboards",
    ] {
        assert!(
            checked.contains(expected),
            "{expected} is built or mounted; checked: {checked:?}"
        );
    }
}

#[test]
fn container_paths_in_the_stacks_configs_are_where_compose_mounts_the_files() {
    let doc = compose();
    let volumes = declared_volumes(&doc);
    let mounts = |name: &str| bind_mounts(name, service(&doc, name), &volumes);

    // keyrotd reads the config its command names, which is config/compose.toml.
    let keyrotd = service(&doc, "keyrotd");
    let command: Vec<&str> = keyrotd
        .get("command")
        .and_then(Value::as_sequence)
        .expect("services.keyrotd.command is a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let config_at = command
        .windows(2)
        .find(|w| w[0] == "-c" || w[0] == "--config")
        .map(|w| w[1])
        .expect("keyrotd run -c PATH");
    assert!(
        mounts("keyrotd").contains(&("config/compose.toml".into(), config_at.into())),
        "config/compose.toml is mounted at {config_at}"
    );

    // Prometheus loads its config and the alert rules from where they are mounted.
    let prom = mounts("prometheus");
    let prom_command = format!("{:?}", service(&doc, "prometheus").get("command"));
    let prom_config = prom
        .iter()
        .find(|(source, _)| source == "prometheus/prometheus.compose.yml")
        .map(|(_, target)| target.clone())
        .expect("prometheus.compose.yml is mounted");
    assert!(
        prom_command.contains(&format!("--config.file={prom_config}")),
        "{prom_command}"
    );
    let scrape: Value =
        serde_norway::from_str(&read("prometheus/prometheus.compose.yml")).expect("YAML");
    let rule_files: Vec<&str> = scrape
        .get("rule_files")
        .and_then(Value::as_sequence)
        .expect("rule_files")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(!rule_files.is_empty());
    for rules in rule_files {
        assert!(
            prom.contains(&("prometheus/alerts.yml".into(), rules.into())),
            "rule file {rules} is prometheus/alerts.yml as mounted: {prom:?}"
        );
    }
    // ...and scrapes keyrotd where it listens: on loopback, from inside keyrotd's network namespace.
    let listen_port = read("config/compose.toml")
        .lines()
        .find_map(|l| l.trim().strip_prefix("listen = \"127.0.0.1:"))
        .and_then(|rest| rest.split('"').next().map(str::to_owned))
        .expect("config/compose.toml listens on 127.0.0.1:PORT");
    assert!(
        read("prometheus/prometheus.compose.yml").contains(&format!("\"127.0.0.1:{listen_port}\"")),
        "Prometheus scrapes 127.0.0.1:{listen_port}"
    );
    assert_eq!(
        service(&doc, "prometheus")
            .get("network_mode")
            .and_then(Value::as_str),
        Some("service:keyrotd"),
        "Prometheus shares keyrotd's network namespace, so the admin API stays on loopback"
    );

    // Grafana's dashboard provider reads the directory the dashboard is mounted into.
    let provider: Value = serde_norway::from_str(&read(
        "prometheus/grafana/provisioning/dashboards/keyrotd.yml",
    ))
    .expect("YAML");
    let dashboards_dir = provider["providers"][0]["options"]["path"]
        .as_str()
        .expect("providers[0].options.path");
    let grafana = mounts("grafana");
    let dashboard_at = grafana
        .iter()
        .find(|(source, _)| source == "prometheus/grafana/keyrotd-dashboard.json")
        .map(|(_, target)| target.clone())
        .expect("the dashboard is mounted");
    assert_eq!(
        Path::new(&dashboard_at).parent(),
        Some(Path::new(dashboards_dir)),
        "the dashboard is mounted into the provider's directory"
    );
    for dir in ["datasources", "dashboards"] {
        assert!(
            grafana.contains(&(
                format!("prometheus/grafana/provisioning/{dir}"),
                format!("/etc/grafana/provisioning/{dir}")
            )),
            "provisioning/{dir} is where Grafana looks: {grafana:?}"
        );
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("prometheus/grafana/keyrotd-dashboard.json"))
            .expect("the dashboard is JSON");
    assert!(
        dashboard.get("title").is_some(),
        "the dashboard has a title"
    );
}

#[test]
fn the_stacks_keyrotd_config_names_only_compose_services_and_the_secret_aws_init_creates() {
    let doc = compose();
    let config = read("config/compose.toml");
    let services: BTreeSet<&str> = doc
        .get("services")
        .and_then(Value::as_mapping)
        .expect("services")
        .keys()
        .filter_map(Value::as_str)
        .collect();

    let hosts: BTreeSet<&str> = config
        .split("http://")
        .skip(1)
        .filter_map(|rest| rest.split([':', '/', '"']).next())
        .collect();
    assert!(hosts.len() >= 3, "the config talks to the stack: {hosts:?}");
    for host in &hosts {
        assert!(
            services.contains(host),
            "{host} in config/compose.toml is a compose service ({services:?})"
        );
    }

    // keyrotd never creates an AWS secret: the init service must create each one the config writes.
    let init = format!("{:?}", service(&doc, "aws-init").get("command"));
    let secret_ids: Vec<&str> = config
        .lines()
        .filter_map(|l| l.trim().strip_prefix("secret_id = \""))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(!secret_ids.is_empty(), "the stack writes to AWS");
    for id in secret_ids {
        assert!(
            init.contains(&format!("create-secret --name {id} ")),
            "aws-init creates {id}: {init}"
        );
    }

    // Every credential reference in the config is set in keyrotd's environment.
    let env = service(&doc, "keyrotd")
        .get("environment")
        .expect("services.keyrotd.environment");
    for var in config
        .split("{ env = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
    {
        assert!(env.get(var).is_some(), "{var} is set for keyrotd");
    }
}

#[test]
fn promtool_accepts_the_stacks_prometheus_config_and_rules() {
    // Point the rule path at the repository's file, as the container mount does.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("prometheus.yml");
    let alerts = root().join("prometheus/alerts.yml");
    fs::write(
        &config,
        read("prometheus/prometheus.compose.yml").replace(
            "/etc/prometheus/alerts.yml",
            alerts.to_str().expect("UTF-8 repo path"),
        ),
    )
    .expect("write the config copy");
    let out = run(
        "promtool",
        &["check", "config", config.to_str().expect("UTF-8 temp path")],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 rule files found"),
        "{}",
        text(&out)
    );
}

// ---------------------------------------------------------------------------------------------------
// Dockerfile

#[test]
fn the_image_builds_like_ci_and_runs_as_a_non_root_user() {
    let dockerfile = read("Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let stages: Vec<usize> = (0..instructions.len())
        .filter(|&i| instructions[i].starts_with("FROM "))
        .collect();
    assert_eq!(
        stages.len(),
        2,
        "a build stage and a runtime stage: {stages:?}"
    );
    let (build, runtime) = instructions.split_at(stages[1]);

    assert!(build[0].starts_with("FROM rust:1"), "{}", build[0]);
    let cargo: Vec<&&str> = build.iter().filter(|l| l.contains("cargo")).collect();
    assert_eq!(
        cargo,
        [&"RUN cargo build --release --locked"],
        "the build stage runs exactly the command CI runs"
    );

    assert_eq!(runtime[0], "FROM debian:bookworm-slim");
    assert!(
        runtime.iter().any(|l| l.contains("ca-certificates")),
        "TLS needs CA certificates"
    );
    let user = runtime
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "USER {user}"
    );

    let ignored: BTreeSet<&str> = include_str!("../../.dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for dir in ["target", ".tools", "state"] {
        assert!(
            ignored.contains(dir),
            ".dockerignore leaves out {dir}: {ignored:?}"
        );
    }
}
