//! The end of the soak: the faults stop, the base config is put back, scheduled rotations are paused
//! (recovery and drift repair go on), and the run waits, bounded, until every key holds the portal's
//! active key in every destination or is flagged and nothing more will happen to it by itself. Then
//! the last checks: the budget, every key's end state, and a search of every output, whole, for every
//! secret the portals ever issued.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::checks::{self, LeakSearch};
use super::tally::Summary;
use super::world::{KeyWorld, Variant};
use super::{Soak, control};
use crate::support::metrics::Scrape;

/// keyrotd's default `max_rerotations`: past it, recovery of a lost key waits for an operator.
const MAX_REROTATIONS: u64 = 3;

/// One key at the end.
struct KeyEnd {
    name: String,
    consistent: bool,
    /// `drift` or `lost`, when keyrotd flags the key.
    flag: Option<&'static str>,
    /// A rotation (or recovery) is at work on it.
    busy: bool,
    /// keyrotd would still act on it by itself (a re-rotation owed and allowed).
    may_still_act: bool,
    detail: String,
}

impl KeyEnd {
    fn settled(&self) -> bool {
        !self.busy && (self.consistent || (self.flag.is_some() && !self.may_still_act))
    }
}

pub async fn finish(s: &Arc<Soak>) -> Summary {
    calm(s).await;
    if s.variant() != Variant::Base {
        control::reload(s, Variant::Base).await;
    }
    let paused = s.api_post("/v1/pause", &json!({})).await;
    assert!(matches!(paused, Ok((200, _))), "POST /v1/pause: {paused:?}");
    let bound = if s.minutes <= 5.0 {
        Duration::from_secs(150)
    } else {
        Duration::from_secs(330)
    };
    let (settled_after, ends) = settle(s, bound).await;
    let mut consistent = Vec::new();
    let mut flagged = Vec::new();
    for end in &ends {
        let broken = (!end.consistent && end.flag.is_none()).then(|| end.detail.clone());
        s.tally
            .check("every key ends consistent or flagged", broken);
        if end.consistent {
            consistent.push(end.name.clone());
        } else if let Some(flag) = end.flag {
            flagged.push(format!("{} {flag}", end.name));
        }
    }
    checks::budget(s).await;
    let mut dependents_ok = 0;
    for k in &s.world.keys {
        dependents_ok += usize::from(k.dependent.verify().await == 200);
    }
    let answers = final_api_answers(s).await;
    control::stop(s).await;
    final_search(s, answers).await;
    no_temp_files(s);
    let mut sum = summary(s, settled_after, consistent, flagged).await;
    sum.dependents_ok = dependents_ok;
    sum
}

/// Every fault lifted: portals, dependents and stores behave again.
async fn calm(s: &Soak) {
    s.world.bao.up();
    s.world.moto.up();
    for k in &s.world.keys {
        k.portal
            .faults(json!({
                "regenerate": { "fail_next": 0, "lose_next": 0, "delay_ms": 0 },
                "status": { "fail_next": 0 },
                "rate_limit_next": 0,
            }))
            .await;
        k.dependent
            .faults(
                json!({ "ignore_reload": false, "ignore_reload_next": 0, "fail_reload_next": 0 }),
            )
            .await;
    }
}

/// Looks at every key every 2 s until all have settled twice in a row, or `bound` passes. Returns
/// how long it took (`None`: the bound passed) and the last look.
async fn settle(s: &Soak, bound: Duration) -> (Option<Duration>, Vec<KeyEnd>) {
    let start = Instant::now();
    let mut settled_rounds = 0;
    loop {
        let ends = look(s).await;
        if ends.iter().all(KeyEnd::settled) {
            settled_rounds += 1;
        } else {
            settled_rounds = 0;
        }
        if settled_rounds >= 2 {
            return (Some(start.elapsed()), ends);
        }
        if start.elapsed() >= bound {
            return (None, ends);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn look(s: &Soak) -> Vec<KeyEnd> {
    let metrics = s
        .metrics()
        .await
        .unwrap_or_else(|| Scrape::parse(String::new()));
    let views: Value = match s.api_get("/v1/keys").await {
        Ok((200, text)) => serde_json::from_str(&text).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    let mut ends = Vec::new();
    for k in &s.world.keys {
        ends.push(look_at(s, k, &metrics, &views).await);
    }
    ends
}

async fn look_at(s: &Soak, k: &KeyWorld, metrics: &Scrape, views: &Value) -> KeyEnd {
    let name = k.plan.name.as_str();
    let portal = k.portal.state().await;
    let held = s.world.held(&k.plan).await;
    let consistent = held
        .iter()
        .all(|(_, fp)| fp.as_deref() == Some(portal.fingerprint.as_str()));
    let journal = s.world.journal(name);
    let lost = journal["lost"] == true;
    let drift = metrics.value("keyrotd_drift", &[("key", name)]) == Some(1.0);
    let failed = metrics.sum(
        "keyrotd_rotations_total",
        &[("key", name), ("outcome", "failed")],
    ) > 0.0;
    let flag = flag(s, name, metrics);
    let phase = views
        .as_array()
        .and_then(|keys| keys.iter().find(|v| v["name"] == name))
        .map_or(Value::Null, |v| v["phase"].clone());
    let busy = !matches!(phase.as_str(), Some("idle" | "watching"));
    let in_row = journal["rerotations_in_row"].as_u64().unwrap_or(0);
    let may_still_act = k.plan.auto_recover
        && in_row <= MAX_REROTATIONS
        && portal.regenerations < u64::from(k.plan.budget)
        && (lost || drift);
    let detail = format!(
        "{name}: portal's active key {} (key id {}); destinations hold {held:?}; journal phase {}, lost {lost}, re-rotations in a row {in_row}; keyrotd_drift {drift}, failed rotations in this process {failed}; live phase {phase}; {} regenerations of {}",
        portal.fingerprint, portal.key_id, journal["phase"], portal.regenerations, k.plan.budget,
    );
    KeyEnd {
        name: name.to_string(),
        consistent,
        flag,
        busy,
        may_still_act,
        detail,
    }
}

/// How keyrotd flags a key whose destinations do not hold the portal's active key: `keyrotd_drift` 1,
/// or lost (the journal's `lost` and a `failed` rotation, which `KeyrotdKeyLost` alerts on).
pub fn flag(s: &Soak, name: &str, metrics: &Scrape) -> Option<&'static str> {
    let failed = metrics.sum(
        "keyrotd_rotations_total",
        &[("key", name), ("outcome", "failed")],
    ) > 0.0;
    if metrics.value("keyrotd_drift", &[("key", name)]) == Some(1.0) {
        Some("drift")
    } else if s.world.journal(name)["lost"] == true && failed {
        Some("lost")
    } else {
        None
    }
}

/// The API's answers at the end: metrics, every key's view, and the record of every rotation the
/// daemon still remembers.
async fn final_api_answers(s: &Soak) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut paths = vec!["/metrics".to_string(), "/v1/keys".to_string()];
    for k in &s.world.keys {
        paths.push(format!("/v1/keys/{}", k.plan.name));
    }
    for ids in s.rotations().ids.values() {
        let recent = ids.iter().rev().take(100);
        paths.extend(recent.map(|id| format!("/v1/rotations/{id}")));
    }
    for path in paths {
        if let Ok((_, text)) = s.api_get(&path).await {
            out.push((format!("GET {path}"), text));
        }
    }
    out
}

/// Everything, whole, for every secret issued and every credential; and every log for a panic.
async fn final_search(s: &Soak, mut haystacks: Vec<(String, String)>) {
    let mut issued = Vec::new();
    for k in &s.world.keys {
        issued.extend(k.portal.issued_secrets().await);
        for r in k.dependent.requests().await {
            haystacks.push((
                format!("reload request to {}'s dependent", k.plan.name),
                format!("{} {:?}", r.body, r.headers),
            ));
        }
        haystacks.extend(store_metadata(s, k).await);
    }
    for path in checks::output_files(s) {
        if let Ok(bytes) = std::fs::read(&path) {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if path.to_string_lossy().ends_with(".log") && text.contains("panicked at") {
                let at = checks::around(&text, "panicked at");
                s.tally.check(
                    "no panic in any log",
                    Some(format!("{}: {at}", path.display())),
                );
            }
            haystacks.push((path.display().to_string(), text));
        }
    }
    checks::simulator_panics(s);
    let patterns: Vec<String> = issued.iter().map(|v| regex::escape(v)).collect();
    let search = LeakSearch::exact(&patterns, &s.world.credentials());
    let planted = format!("xx{}yy", issued.last().expect("the portals issued keys"));
    assert!(
        search.find(&planted).is_some(),
        "the search finds a secret where there is one"
    );
    for (place, text) in &haystacks {
        let broken = search.find(text).map(|what| format!("{what} in {place}"));
        s.tally.check("no secret in any output", broken);
    }
}

/// What the stores keep beside the values: Vault's custom metadata, the AWS secret's tags and
/// description.
async fn store_metadata(s: &Soak, k: &KeyWorld) -> Vec<(String, String)> {
    use super::world::StoreKind;
    let mut out = Vec::new();
    let target = k.plan.target();
    if k.plan.has(StoreKind::Vault) {
        let meta = s.world.bao.kv_metadata_opt(&target).await;
        out.push((format!("OpenBao metadata of {target}"), meta.to_string()));
    }
    if k.plan.has(StoreKind::Aws) {
        let client = s.world.moto.client().await;
        if let Ok(d) = client.describe_secret().secret_id(&target).send().await {
            let text = format!("{:?} {:?}", d.tags(), d.description());
            out.push((format!("AWS tags of {target}"), text));
        }
    }
    out
}

/// A file destination's temp file holds the key; after a graceful stop none is left (a crash's are
/// removed at the next start).
fn no_temp_files(s: &Soak) {
    let left: Vec<String> = std::fs::read_dir(s.world.keys_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("keyrotd-tmp"))
        .collect();
    s.tally.check(
        "no temp file holding a key is left behind",
        (!left.is_empty()).then(|| format!("left in the file store: {left:?}")),
    );
}

async fn summary(
    s: &Soak,
    settled_after: Option<Duration>,
    consistent: Vec<String>,
    flagged: Vec<String>,
) -> Summary {
    let (mut regenerations, mut out_of_band) = (0, 0);
    for k in &s.world.keys {
        let st = k.portal.state().await;
        regenerations += st.regenerations;
        out_of_band += st.out_of_band_rotations;
    }
    Summary {
        seed: s.seed,
        minutes: s.minutes,
        keys: s.world.keys.len(),
        rotations: s.rotations(),
        regenerations,
        out_of_band,
        converged_after: settled_after,
        consistent,
        flagged,
        dependents_ok: 0,
    }
}
