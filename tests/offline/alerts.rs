//! The shipped alert rules and the metrics they watch, checked by Prometheus' own `promtool`:
//! `prometheus/alerts.yml` is valid, its unit tests (`prometheus/alerts.test.yml`) pass, every alert
//! tells the on-call what it is and what to do, every alert has a firing and a silent test case, and
//! keyrotd's `/metrics` output passes `promtool check metrics`.
//!
//! `promtool` must be on PATH (`scripts/install-tools.sh` installs it); the tests fail if it is not.

use crate::sample::config;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use keyrotd::telemetry::{CheckResult, Metrics, Outcome, RerotationReason};
use serde::Deserialize;

fn prometheus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("prometheus")
}

/// Runs promtool with `args` (and `stdin` when given) in `prometheus/`.
fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(prometheus_dir())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): it must be on PATH; run scripts/install-tools.sh")
        });
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was piped");
        pipe.write_all(text.as_bytes())
            .expect("writing promtool's stdin");
    }
    child.wait_with_output().expect("waiting for promtool")
}

fn assert_success(what: &str, output: &Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let output = promtool(&["check", "rules", "alerts.yml"], None);
    assert_success("promtool check rules prometheus/alerts.yml", &output);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("SUCCESS"),
        "{output:?}"
    );
}

#[test]
fn the_alert_rules_pass_their_promtool_unit_tests() {
    let output = promtool(&["test", "rules", "alerts.test.yml"], None);
    assert_success("promtool test rules prometheus/alerts.test.yml", &output);
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn alert_rules() -> Vec<(String, Rule)> {
    let text = std::fs::read_to_string(prometheus_dir().join("alerts.yml"))
        .expect("reading prometheus/alerts.yml");
    let file: RuleFile = serde_norway::from_str(&text).expect("prometheus/alerts.yml is YAML");
    let rules: Vec<(String, Rule)> = file
        .groups
        .into_iter()
        .flat_map(|g| {
            let group = g.name;
            g.rules.into_iter().map(move |r| (group.clone(), r))
        })
        .filter(|(_, r)| r.record.is_none())
        .map(|(_, r)| (r.alert.clone().unwrap_or_default(), r))
        .collect();
    assert!(!rules.is_empty(), "no alert in prometheus/alerts.yml");
    rules
}

#[test]
fn every_alert_says_how_bad_it_is_what_happened_and_what_to_do_first() {
    for (name, rule) in alert_rules() {
        assert!(
            name.starts_with("Keyrotd"),
            "alert {name:?} should be named Keyrotd..."
        );
        let severity = rule.labels.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("page" | "critical" | "warning")),
            "{name}: severity label is {severity:?}, want page, critical or warning"
        );
        let summary = rule.annotations.get("summary").map(|s| s.trim());
        assert!(
            summary.is_some_and(|s| !s.is_empty()),
            "{name}: no summary annotation"
        );
        let description = rule
            .annotations
            .get("description")
            .map(|s| s.trim())
            .unwrap_or_default();
        assert!(
            description.contains("First"),
            "{name}: the description must tell the on-call what to do first: {description:?}"
        );
        // Per-key alerts point at the per-key runbook command, naming the key.
        if rule.expr.contains("keyrotd_") && description.contains("$labels.key") {
            assert!(
                description.contains("`keyrotd status {{ $labels.key }}`"),
                "{name}: a per-key alert's runbook starts from `keyrotd status KEY`: {description:?}"
            );
        }
    }
}

#[test]
fn the_key_lost_and_auth_failure_alerts_carry_the_rotation_checklist() {
    let rules: BTreeMap<String, Rule> = alert_rules().into_iter().collect();
    let lost = &rules["KeyrotdKeyLost"].annotations["description"];
    for step in [
        "already invalid",
        "check every store",
        "keyrotd rotate {{ $labels.key }} --reason",
        "restart or redeploy every dependent",
        "authentication failures",
    ] {
        assert!(lost.contains(step), "KeyrotdKeyLost lacks {step:?}: {lost}");
    }
    let auth = &rules["KeyrotdPostRotationAuthFailures"].annotations["description"];
    for step in [
        "restart or redeploy {{ $labels.dependent }}",
        "identify any other service",
    ] {
        assert!(
            auth.contains(step),
            "KeyrotdPostRotationAuthFailures lacks {step:?}: {auth}"
        );
    }
}

#[derive(Debug, Deserialize)]
struct TestFile {
    rule_files: Vec<String>,
    tests: Vec<TestGroup>,
}

#[derive(Debug, Deserialize)]
struct TestGroup {
    #[serde(default)]
    alert_rule_test: Vec<AlertTest>,
}

#[derive(Debug, Deserialize)]
struct AlertTest {
    alertname: String,
    #[serde(default)]
    exp_alerts: Vec<serde_norway::Value>,
}

#[test]
fn every_alert_has_a_firing_and_a_silent_unit_test() {
    let text = std::fs::read_to_string(prometheus_dir().join("alerts.test.yml"))
        .expect("reading prometheus/alerts.test.yml");
    let file: TestFile = serde_norway::from_str(&text).expect("alerts.test.yml is YAML");
    assert_eq!(file.rule_files, vec!["alerts.yml".to_string()]);
    let cases: Vec<&AlertTest> = file.tests.iter().flat_map(|g| &g.alert_rule_test).collect();
    let fires: BTreeSet<&str> = cases
        .iter()
        .filter(|c| !c.exp_alerts.is_empty())
        .map(|c| c.alertname.as_str())
        .collect();
    let silent: BTreeSet<&str> = cases
        .iter()
        .filter(|c| c.exp_alerts.is_empty())
        .map(|c| c.alertname.as_str())
        .collect();
    for (name, _) in alert_rules() {
        assert!(
            fires.contains(name.as_str()),
            "{name}: no test case where it fires"
        );
        assert!(
            silent.contains(name.as_str()),
            "{name}: no test case where it stays silent"
        );
    }
}

#[test]
fn promtool_accepts_keyrotds_metrics_output() {
    let metrics = Metrics::new();
    metrics.apply_config(&config());
    let at = Utc.with_ymd_and_hms(2030, 1, 7, 3, 0, 0).unwrap();
    metrics.rotation_started("billing", at);
    metrics.rotation_finished("billing", Outcome::Success, Duration::from_secs(4), at);
    metrics.invalidation_window("billing", Duration::from_millis(120));
    metrics.rerotation("billing", RerotationReason::Drift);
    metrics.post_rotation_check("billing", "api", CheckResult::AuthFailure);
    metrics.key_status("billing", true, Some(at));
    metrics.next_rotation("billing", Some(at + chrono::Duration::days(7)));
    metrics.schedule_period("billing", Some(Duration::from_secs(7 * 86400)));
    let text = metrics.encode();
    assert!(text.contains("keyrotd_rotations_total{key=\"billing\",outcome=\"success\"} 1"));

    let output = promtool(&["check", "metrics"], Some(&text));
    assert_success(
        &format!("promtool check metrics on keyrotd's output\n{text}"),
        &output,
    );
}

#[test]
fn every_alert_about_a_key_names_its_owner() {
    for (name, rule) in alert_rules() {
        let about_a_key = rule
            .annotations
            .get("summary")
            .is_some_and(|s| s.contains("$labels.key"));
        if !about_a_key {
            continue;
        }
        assert!(
            rule.expr.contains("group_left (owner)") && rule.expr.contains("keyrotd_key_info"),
            "{name}: the owner label is joined from keyrotd_key_info: {}",
            rule.expr
        );
        assert_eq!(
            rule.annotations.get("owner").map(String::as_str),
            Some("{{ $labels.owner }}"),
            "{name}: the owner annotation"
        );
    }
}

#[test]
fn every_alert_a_checklist_names_is_a_rule() {
    let names: BTreeSet<String> = alert_rules().into_iter().map(|(n, _)| n).collect();
    let mut config = config();
    config.coordination = Some(keyrotd::config::CoordinationConfig {
        store: "files".into(),
        path: "keyrotd/leases".into(),
        ttl: Duration::from_secs(30),
    });
    let key = config.keys[0].clone();
    let listed = keyrotd::checklist::alerts(&config, &key, true);
    assert!(listed.len() >= 14, "{listed:?}");
    for a in listed {
        assert!(
            names.contains(a.name),
            "the checklist names {} which alerts.yml lacks",
            a.name
        );
    }
}
