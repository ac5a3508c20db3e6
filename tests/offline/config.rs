//! The configuration as an operator meets it: through `keyrotd check-config`, the real binary.
//!
//! - every file under `config/` loads (its `# env:` header lists the credential variables it
//!   references; the test sets dummy values for them);
//! - every fixture under `tests/fixtures/invalid/` exits 2 and names each field listed in its
//!   `# expect:` lines;
//! - `KEYROTD__*` variables override fields, other `KEYROTD_*` variables are never fields;
//! - problems are all reported at once, and no credential value ever appears in the output.
//!
//! Note: configs with a `schedule` or `window` need `schedule.rs`; until it is built, the tests that load
//! `config/` fail with "schedule parsing is not built yet". The other tests use schedule-less configs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The binary with a clean environment: only what a test sets reaches it.
fn keyrotd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyrotd"));
    c.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        c.env("PATH", path);
    }
    c
}

fn run(mut c: Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().expect("cannot start keyrotd");
    (
        status.code().expect("keyrotd was killed by a signal"),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn check_config(path: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = keyrotd();
    c.arg("-c").arg(path).arg("check-config");
    for (k, v) in env {
        c.env(k, v);
    }
    run(c)
}

/// Values of `# NAME: ...` header comments, e.g. `# expect: keys[0].name`.
fn header_values(text: &str, name: &str) -> Vec<String> {
    let tag = format!("# {name}:");
    text.lines()
        .filter_map(|l| l.strip_prefix(&tag))
        .flat_map(|rest| {
            rest.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// A valid config without schedules (so it does not depend on `schedule.rs`), in a temp dir.
const MINIMAL: &str = r#"
[daemon]
admin_token = { env = "KEYROTD_TEST_ADMIN" }

[providers.aos-prod]
kind = "aos"
base_url = "https://aos.example.com"
management_token = { env = "KEYROTD_TEST_TOKEN" }

[providers.vendor-x]
kind = "http"
[providers.vendor-x.regenerate]
url = "https://api.vendor-x.com/v2/keys/{key_id}/roll"
secret_pointer = "/secret"
key_id_pointer = "/id"

[stores.vault-main]
kind = "vault"
address = "https://vault.example.com:8200"
token = { env = "KEYROTD_TEST_TOKEN" }

[stores.local]
kind = "file"
dir = "/etc/keyrotd/keys"

[[keys]]
name = "billing-api"
provider = "aos-prod"
max_age = "30d"
  [[keys.destinations]]
  store = "vault-main"
  path = "apps/billing/aos"
  field = "api_key"
  [[keys.destinations]]
  store = "local"
  file = "billing-api.key"
  [[keys.dependents]]
  name = "billing-worker"
  reads_from = ["vault-main"]
  reload = { url = "http://10.0.0.7:8080/-/reload" }

[[keys]]
name = "search-api"
provider = "vendor-x"
  [[keys.destinations]]
  store = "local"
  file = "search-api.key"
"#;

const MINIMAL_ENV: &[(&str, &str)] =
    &[("KEYROTD_TEST_ADMIN", "adm"), ("KEYROTD_TEST_TOKEN", "tok")];

fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("keyrotd.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

#[test]
fn every_config_under_config_dir_is_valid() {
    let files = toml_files(&root().join("config"));
    assert!(!files.is_empty(), "config/ holds no .toml file");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read config");
        let names = header_values(&text, "env");
        let env: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "dummy-value")).collect();
        let (code, out, err) = check_config(&file, &env);
        assert_eq!(code, 0, "{} should be valid:\n{err}", file.display());
        assert!(out.contains("is valid"), "{}: {out}", file.display());
    }
}

#[test]
fn every_invalid_fixture_exits_2_and_names_its_fields() {
    let files = toml_files(&root().join("tests/fixtures/invalid"));
    assert!(files.len() >= 15, "only {} invalid fixtures", files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read fixture");
        let expected = header_values(&text, "expect");
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            file.display()
        );
        let (code, out, err) = check_config(&file, &[("KEYROTD_TEST_TOKEN", "tok")]);
        assert_eq!(
            code,
            2,
            "{} should be invalid; stdout:\n{out}",
            file.display()
        );
        for path in expected {
            let line_start = format!("{path}: ");
            assert!(
                err.lines().any(|l| l.starts_with(&line_start)),
                "{}: no problem for `{path}` in:\n{err}",
                file.display()
            );
        }
    }
}

#[test]
fn check_config_summarises_keys_stores_providers_and_warnings() {
    let (_dir, path) = write_config(MINIMAL);
    let (code, out, err) = check_config(&path, MINIMAL_ENV);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "billing-api  (provider aos-prod)",
        "destination:  vault-main -> apps/billing/aos#api_key",
        "destination:  local -> billing-api.key",
        "dependent:    billing-worker (reads from vault-main;",
        "max age 30days",
        "search-api  (provider vendor-x)",
        "vault-main  vault  https://vault.example.com:8200/",
        "aos-prod  aos  https://aos.example.com/",
        "listen 127.0.0.1:9464",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    // search-api has no schedule and no max_age; vendor-x has no [status].
    assert!(
        out.contains("key \"search-api\": neither schedule nor max_age: manual-only"),
        "{out}"
    );
    assert!(out.contains("providers.vendor-x: no [status]"), "{out}");
    assert!(!out.contains("key \"billing-api\": neither"), "{out}");
    // Neither key names an owner: both are warned about, and the summary says so.
    for key in ["billing-api", "search-api"] {
        assert!(
            out.contains(&format!("warning: key \"{key}\": no owner: set owner")),
            "{out}"
        );
    }
    assert!(out.contains("    owner:        none"), "{out}");

    // An owner, an approval and a notify target are summarised; the owner's warning goes.
    let text = MINIMAL
        .replace(
            "name = \"billing-api\"\nprovider = \"aos-prod\"\n",
            "name = \"billing-api\"\nprovider = \"aos-prod\"\nowner = { name = \"team-payments\", contact = \"#payments\" }\napproval = { timeout = \"45m\" }\nnotify = [\"mail\"]\n",
        )
        .replace(
            "[[keys]]\nname = \"billing-api\"",
            "[notify.mail]\nkind = \"command\"\ncommand = [\"/etc/keyrotd/notify/email.sh\", \"ops@example.com\"]\nevents = [\"failed\"]\n\n[[keys]]\nname = \"billing-api\"",
        );
    let (_dir, path) = write_config(&text);
    let (code, out, err) = check_config(&path, MINIMAL_ENV);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "    owner:        team-payments <#payments>",
        "    approval:     scheduled rotations wait up to 45m for `keyrotd approve`",
        "    notify:       mail",
        "  mail  command `/etc/keyrotd/notify/email.sh ops@example.com`; failed; 3 retries",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    assert!(!out.contains("key \"billing-api\": no owner"), "{out}");
}

#[test]
fn environment_overrides_fields_including_numbers_flags_and_array_entries() {
    let (_dir, path) = write_config(MINIMAL);
    let mut env = MINIMAL_ENV.to_vec();
    env.extend([
        ("KEYROTD__DAEMON__LISTEN", "127.0.0.1:7777"),
        ("KEYROTD__DAEMON__PAUSED", "true"),
        ("KEYROTD__DAEMON__MAX_CONCURRENT_ROTATIONS", "4"),
        ("KEYROTD__KEYS__1__WATCH", "42m"),
        // A string that looks like a number stays a string.
        ("KEYROTD__PROVIDERS__AOS-PROD__ACCOUNT_ID", "12345"),
    ]);
    let (code, out, err) = check_config(&path, &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("listen 127.0.0.1:7777"), "{out}");
    assert!(out.contains("starts PAUSED"), "{out}");
    assert!(out.contains("watch 42m"), "{out}");

    // An override is checked like the file: a bad value names the field.
    let mut env = MINIMAL_ENV.to_vec();
    env.push(("KEYROTD__DAEMON__MAX_CONCURRENT_ROTATIONS", "many"));
    let (code, _, err) = check_config(&path, &env);
    assert_eq!(code, 2);
    assert!(err.contains("daemon.max_concurrent_rotations: "), "{err}");
}

#[test]
fn only_double_underscore_variables_are_fields() {
    let (_dir, path) = write_config(MINIMAL);
    // KEYROTD_CONFIG picks the file (no -c); KEYROTD_ADMIN_TOKEN is a credential, not a field; a
    // lowercase lookalike is not an override.
    let mut c = keyrotd();
    c.arg("check-config")
        .env("KEYROTD_CONFIG", &path)
        .env("KEYROTD_ADMIN_TOKEN", "adm-token-value")
        .env("KEYROTD_SOMETHING", "1")
        .env("keyrotd__daemon__listen", "not an address");
    for (k, v) in MINIMAL_ENV {
        c.env(k, v);
    }
    let (code, out, err) = run(c);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("listen 127.0.0.1:9464"), "{out}");

    // But a misspelt override is an unknown field, like in the file.
    let mut env = MINIMAL_ENV.to_vec();
    env.push(("KEYROTD__DAEMON__LSTEN", "127.0.0.1:1"));
    let (code, _, err) = check_config(&path, &env);
    assert_eq!(code, 2);
    assert!(
        err.lines()
            .any(|l| l.starts_with("daemon.lsten: unknown field")),
        "{err}"
    );
}

#[test]
fn an_inline_credential_is_refused_with_the_form_to_use() {
    let text = MINIMAL.replace(
        "management_token = { env = \"KEYROTD_TEST_TOKEN\" }",
        "management_token = \"aos_sk_live_inline\"",
    );
    let (_dir, path) = write_config(&text);
    let (code, out, err) = check_config(&path, MINIMAL_ENV);
    assert_eq!(code, 2);
    assert!(
        err.lines().any(|l| l
            == "providers.aos-prod.management_token: inline credentials are not allowed; \
                write management_token = { env = \"NAME\" } or { file = \"/path\" }"),
        "{err}"
    );
    assert!(!format!("{out}{err}").contains("aos_sk_live_inline"));
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = MINIMAL
        .replace("[daemon]\n", "[daemon]\nlog_format = \"yaml\"\n")
        .replace(
            "store = \"vault-main\"\n  path",
            "store = \"vualt\"\n  path",
        )
        .replace("name = \"search-api\"", "name = \"Search API\"")
        .replace("max_age = \"30d\"", "max_age = \"30 days-ish\"")
        .replace(
            "dir = \"/etc/keyrotd/keys\"",
            "dir = \"/etc/keyrotd/keys\"\nmode = \"0600\"",
        );
    let (_dir, path) = write_config(&text);
    let (code, _, err) = check_config(&path, MINIMAL_ENV);
    assert_eq!(code, 2);
    let expected = [
        "daemon.log_format: ",
        "keys[0].destinations[0].store: unknown store \"vualt\" (known: local, vault-main)",
        // The dependent still reads from vault-main, which no destination of the key names now.
        "keys[0].dependents[0].reads_from[0]: ",
        "keys[1].name: ",
        "keys[0].max_age: ",
        "stores.local.mode: unknown field",
    ];
    for e in expected {
        assert!(
            err.lines().any(|l| l.starts_with(e)),
            "missing {e:?} in:\n{err}"
        );
    }
    assert!(
        err.contains(&format!("({} problems)", expected.len())),
        "{err}"
    );
}

#[test]
fn no_credential_value_appears_in_any_output() {
    const RESOLVED: &str = "sk_live_RESOLVED_9f3c1a";
    const INLINE: &str = "sk_live_INLINE_77ab02";
    const OVERRIDE: &str = "sk_live_OVERRIDE_5d2e90";
    const UNQUOTED: &str = "sk_live_UNQUOTED_c0ffee";
    // A resolved credential, an inline one, one set by an override, and an invalid field elsewhere.
    let text = MINIMAL
        .replace(
            "token = { env = \"KEYROTD_TEST_TOKEN\" }\n\n[stores.local]",
            &format!("token = \"{INLINE}\"\n\n[stores.local]"),
        )
        .replace(
            "field = \"api_key\"",
            "field = \"api_key\"\n  feild = \"typo\"",
        );
    let (_dir, path) = write_config(&text);
    let env = [
        ("KEYROTD_TEST_ADMIN", "adm"),
        ("KEYROTD_TEST_TOKEN", RESOLVED),
        ("KEYROTD__PROVIDERS__VENDOR-X__AUTH__VALUE", OVERRIDE),
    ];
    let (code, out, err) = check_config(&path, &env);
    assert_eq!(code, 2);
    assert!(
        err.contains("stores.vault-main.token: inline credentials"),
        "{err}"
    );
    assert!(
        err.contains("providers.vendor-x.auth.value: inline credentials"),
        "{err}"
    );
    for secret in [RESOLVED, INLINE, OVERRIDE] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret} leaked:\n{out}{err}"
        );
    }

    // A syntax error on a line holding an unquoted credential does not quote the line.
    let (_dir, path) = write_config(&format!("[daemon]\nadmin_token = {UNQUOTED}\n"));
    let (code, out, err) = check_config(&path, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("not valid TOML"), "{err}");
    assert!(
        !out.contains(UNQUOTED) && !err.contains(UNQUOTED),
        "leaked:\n{err}"
    );

    // A successful summary does not show credentials either.
    let (_dir, path) = write_config(MINIMAL);
    let (code, out, err) = check_config(
        &path,
        &[
            ("KEYROTD_TEST_ADMIN", RESOLVED),
            ("KEYROTD_TEST_TOKEN", RESOLVED),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(RESOLVED) && !err.contains(RESOLVED));
}

#[test]
fn an_unreadable_config_exits_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nope.toml");
    let (code, _, err) = check_config(&missing, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read the configuration") && err.contains("nope.toml"),
        "{err}"
    );
}

#[test]
fn every_command_shows_an_example_in_its_help() {
    for command in ["run", "check-config", "plan", "status", "rotate", "approve"] {
        let mut c = keyrotd();
        c.args([command, "--help"]);
        let (code, out, _) = run(c);
        assert_eq!(code, 0, "{command} --help");
        assert!(
            out.contains("Example") && out.contains("keyrotd "),
            "{command}:\n{out}"
        );
    }
    // A usage error is exit 2 as well.
    let mut c = keyrotd();
    c.args(["rotate", "billing-api"]);
    let (code, _, err) = run(c);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn every_shipped_config_binds_the_admin_api_to_loopback() {
    for file in toml_files(&root().join("config")) {
        let text = std::fs::read_to_string(&file).expect("read config");
        let listen: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("listen = \""))
            .filter_map(|rest| rest.split('"').next())
            .collect();
        // Absent means the default, 127.0.0.1:9464.
        for addr in listen {
            let addr: std::net::SocketAddr = addr.parse().expect("listen is a socket address");
            assert!(
                addr.ip().is_loopback(),
                "{}: listen = {addr} is not loopback",
                file.display()
            );
        }
    }
}
