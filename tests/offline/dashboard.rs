//! The Grafana dashboard (`prometheus/grafana/keyrotd-dashboard.json`) and the alert rules only use
//! metrics keyrotd really exports: every metric name in a panel query or an alert expression is looked
//! up in the `/metrics` output of a configured [`Metrics`]. The dashboard's queries are valid PromQL
//! (`promtool check rules` on them as recording rules), its variables are the ones the panels use, and
//! it shows every keyrotd metric.

use crate::sample::config;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use keyrotd::telemetry::{CheckResult, Metrics, Outcome};
use serde_json::Value;

fn prometheus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("prometheus")
}

fn dashboard() -> Value {
    let path = prometheus_dir().join("grafana/keyrotd-dashboard.json");
    let text = std::fs::read_to_string(&path).expect("reading the dashboard");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

/// Every non-row panel, nested rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            if panel["type"] == "row" {
                walk(&panel["panels"], out);
            } else {
                out.push(panel);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// (panel title, refId, expr) of every panel query.
fn queries(dashboard: &Value) -> Vec<(String, String, String)> {
    panels(dashboard)
        .into_iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or_default().to_string();
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |target| {
                    (
                        title.clone(),
                        target["refId"].as_str().unwrap_or_default().to_string(),
                        target["expr"].as_str().unwrap_or_default().to_string(),
                    )
                })
        })
        .collect()
}

/// Metric names in a PromQL expression: identifiers starting with `keyrotd_` or `process_`, outside
/// quoted strings (label values and regexes) and outside `[...]` ranges.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.chars().peekable();
    let mut word = String::new();
    let mut flush = |word: &mut String| {
        if word.starts_with("keyrotd_") || word.starts_with("process_") {
            names.insert(word.clone());
        }
        word.clear();
    };
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                flush(&mut word);
                // Skip to the closing quote, honouring backslash escapes.
                while let Some(inner) = chars.next() {
                    if inner == '\\' {
                        chars.next();
                    } else if inner == c {
                        break;
                    }
                }
            }
            c if c.is_ascii_alphanumeric() || c == '_' || c == ':' => word.push(c),
            _ => flush(&mut word),
        }
    }
    flush(&mut word);
    names
}

#[test]
fn metric_names_are_found_outside_strings_only() {
    let names = metric_names(
        r#"sum by (key) (increase(keyrotd_rotations_total{key=~"keyrotd_fake", outcome="failed"}[5m])) / process_start_time_seconds"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["keyrotd_rotations_total", "process_start_time_seconds"]
    );
}

/// What keyrotd exports once configured and past its first rotation: metric family name -> type.
fn exported() -> (BTreeMap<String, String>, String) {
    let metrics = Metrics::new();
    // With several replicas: the lease series exist too.
    let mut configured = config();
    configured.coordination = Some(keyrotd::config::CoordinationConfig {
        store: "files".into(),
        path: "keyrotd/leases".into(),
        ttl: Duration::from_secs(30),
    });
    metrics.apply_config(&configured);
    let at = Utc.with_ymd_and_hms(2030, 1, 7, 3, 0, 0).unwrap();
    metrics.rotation_started("billing", at);
    metrics.rotation_finished("billing", Outcome::Success, Duration::from_secs(2), at);
    metrics.post_rotation_check("billing", "api", CheckResult::Ok);
    metrics.key_status("billing", true, Some(at));
    metrics.next_rotation("billing", Some(at + chrono::Duration::days(7)));
    // The schedule module computes the period in apply_config; set it here so this test does not
    // depend on it.
    metrics.schedule_period("billing", Some(Duration::from_secs(7 * 86400)));
    metrics.store_credential(
        "files",
        Some(&keyrotd::store::CredentialStatus {
            expires_at: Some(at + chrono::Duration::hours(8)),
            max_expires_at: None,
            renewable: false,
            renew_failed: false,
        }),
    );
    let text = metrics.encode();
    let families = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect();
    (families, text)
}

/// Checks that every metric in `exprs` is exported with at least one series; returns the families used.
fn assert_exported(what: &str, exprs: &[(String, String)]) -> BTreeSet<String> {
    let (families, text) = exported();
    let mut used = BTreeSet::new();
    for (place, expr) in exprs {
        for name in metric_names(expr) {
            let family = if families.contains_key(&name) {
                name.clone()
            } else {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|base| families.get(*base).is_some_and(|k| k == "histogram"))
                    .map(str::to_string)
                    .unwrap_or_else(|| {
                        panic!("{what} {place}: {name} is not a metric keyrotd exports:\n{expr}")
                    })
            };
            let has_series = text
                .lines()
                .any(|l| !l.starts_with('#') && l.starts_with(name.as_str()));
            assert!(has_series, "{what} {place}: {name} has no series");
            used.insert(family);
        }
    }
    used
}

#[test]
fn the_dashboard_only_queries_metrics_keyrotd_exports_and_shows_them_all() {
    let dashboard = dashboard();
    let exprs: Vec<(String, String)> = queries(&dashboard)
        .into_iter()
        .map(|(title, ref_id, expr)| (format!("panel {title:?} {ref_id}"), expr))
        .collect();
    assert!(exprs.len() >= 12, "only {} queries", exprs.len());
    let used = assert_exported("dashboard", &exprs);
    let (families, _) = exported();
    let unshown: Vec<&String> = families
        .keys()
        .filter(|name| name.starts_with("keyrotd_") && !used.contains(*name))
        .collect();
    assert!(
        unshown.is_empty(),
        "keyrotd metrics no panel shows: {unshown:?}"
    );
}

#[test]
fn the_alert_rules_only_use_metrics_keyrotd_exports() {
    let text = std::fs::read_to_string(prometheus_dir().join("alerts.yml"))
        .expect("reading prometheus/alerts.yml");
    let file: serde_norway::Value = serde_norway::from_str(&text).expect("alerts.yml is YAML");
    let mut exprs = Vec::new();
    for group in file["groups"].as_sequence().into_iter().flatten() {
        for rule in group["rules"].as_sequence().into_iter().flatten() {
            let name = rule["alert"].as_str().unwrap_or("?").to_string();
            let expr = rule["expr"].as_str().unwrap_or_default().to_string();
            assert!(!expr.trim().is_empty(), "{name} has no expr");
            exprs.push((name, expr));
        }
    }
    let used = assert_exported("alert", &exprs);
    for needed in [
        "keyrotd_rotations_total",
        "keyrotd_post_rotation_auth_failing",
        "keyrotd_drift",
        "keyrotd_key_max_age_seconds",
        "keyrotd_key_schedule_period_seconds",
    ] {
        assert!(used.contains(needed), "no alert uses {needed}");
    }
}

#[test]
fn the_dashboard_has_a_prometheus_datasource_and_a_key_variable_that_panels_use() {
    let dashboard = dashboard();
    let schema = dashboard["schemaVersion"].as_i64().unwrap_or_default();
    assert!(
        (36..=41).contains(&schema),
        "schemaVersion {schema} is not a current Grafana one"
    );
    assert_eq!(dashboard["uid"], "keyrotd");
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no {name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let key = var("key");
    assert_eq!(
        key["definition"],
        "label_values(keyrotd_rotations_total, key)"
    );
    assert_eq!(key["datasource"]["uid"], "${datasource}");

    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without title: {panel}");
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title:?} does not use the datasource variable"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title:?}");
            let expr = target["expr"].as_str().unwrap_or_default();
            // Per-key panels follow the key selector.
            if expr.contains("{key") || expr.contains("keyrotd_drift") {
                assert!(expr.contains("key=~\"$key\""), "{title:?}: {expr}");
            }
        }
    }
}

#[test]
fn the_dashboard_panels_do_not_overlap() {
    let dashboard = dashboard();
    let mut cells = BTreeMap::new();
    let list = dashboard["panels"].as_array().expect("panels");
    for panel in list {
        let g = &panel["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().expect("x"),
            g["y"].as_u64().expect("y"),
            g["w"].as_u64().expect("w"),
            g["h"].as_u64().expect("h"),
        );
        assert!(x + w <= 24, "{} is wider than the grid", panel["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), panel["title"].clone()) {
                    panic!("{} overlaps {other}", panel["title"]);
                }
            }
        }
    }
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    // Grafana substitutes its variables before querying; do the same, then let promtool parse each
    // query as a recording rule.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, ref_id, expr)) in queries(&dashboard()).into_iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1d")
            .replace("$__interval", "1m")
            .replace("$key", ".*");
        assert!(
            !expr.contains('$'),
            "{title:?} {ref_id}: unknown variable in {expr}"
        );
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).expect("a string serializes")
        ));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, &rules).expect("writing the rules");
    let output = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): it must be on PATH; run scripts/install-tools.sh")
        });
    assert!(
        output.status.success(),
        "promtool rejects a dashboard query:\n{}{}\n{rules}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
