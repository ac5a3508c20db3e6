//! Reconcile (docs/lifecycle.md, "Reconcile"): compare the provider's active key with what every
//! destination holds, and repair drift.
//!
//! Observe, judge, act. [`observe`] reads the provider and every destination (and adopts a value that
//! authenticates, when the journal does not know the active key); [`judge`] is a pure function of that
//! observation; acting needs the key's claim, and happens only if the key's generation did not move
//! while it was observed — a rotation that finished meanwhile makes the observation stale, and a stale
//! observation is dropped, never acted on. A value is copied only after it is shown to authenticate
//! (the resumed rotation checks it).

use std::sync::Arc;

use futures::StreamExt;

use super::calls;
use super::record::DestinationView;
use super::recovery::{CONCURRENCY, Read, Seen, read_all};
use super::slot::KeySlot;
use super::{Engine, Resume, RotationRequest, Runtime, Trigger};
use crate::config::{FirstContact, KeyConfig};
use crate::journal::{AuditRecord, KeyJournal, Keys};
use crate::notify::targets::{Notice, NoticeEvent};
use crate::provider::KeyStatus;
use crate::telemetry::{Metrics, RerotationReason};

/// What the provider and every destination say about a key, read live.
pub struct Observation {
    pub status: Seen<KeyStatus>,
    pub active_key_id: Option<String>,
    pub active_fingerprint: Option<String>,
    /// The active key's fingerprint was learned now from a destination's value (auth_check).
    pub adopted: bool,
    pub values: Vec<Read>,
    pub views: Vec<DestinationView>,
}

/// What reconcile should do about a key. Decided by [`judge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    InSync,
    /// Some destinations hold the active key, others not: copy from `from` and notify.
    Copy {
        from: usize,
    },
    /// No destination holds the active key: re-rotate (reason `drift`).
    Rerotate,
    /// No destination holds the active key, and keyrotd may not re-rotate: report only.
    Report,
    /// No destination holds the active key of a key keyrotd has never issued nor adopted (first
    /// contact): report it and regenerate nothing until an operator rotates it.
    FirstContact,
    /// The provider says the key is not Active: report, never rotate.
    NotActive,
    Skip(String),
}

impl Repair {
    /// Whether `keyrotd_drift` is 1 for this finding.
    pub fn drift(&self, views: &[DestinationView]) -> bool {
        match self {
            Repair::InSync | Repair::Skip(_) => false,
            Repair::NotActive => !views.iter().all(|v| v.in_sync),
            Repair::Copy { .. } | Repair::Rerotate | Repair::Report | Repair::FirstContact => true,
        }
    }
}

/// What reconcile found for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    InSync,
    /// Some destinations held an old value: the active key is being copied to them.
    Repaired,
    /// No destination holds the active key.
    Drift {
        rerotating: bool,
    },
    /// First contact: reported, nothing regenerated.
    FirstContact,
    NotActive,
    Skipped(String),
}

/// Decides what an observation means. Pure.
pub fn judge(obs: &Observation, j: &KeyJournal, key: &KeyConfig) -> Repair {
    if let Seen::Unreadable(e) = &obs.status {
        return Repair::Skip(format!("provider status: {e}"));
    }
    if let Seen::Read(s) = &obs.status
        && !s.active
    {
        return Repair::NotActive;
    }
    if obs.views.iter().all(|v| v.in_sync) {
        return Repair::InSync;
    }
    // A store that could not be read is not evidence of drift; a value that differs, or none, is.
    let stale = obs.views.iter().any(|v| !v.in_sync && v.error.is_none());
    if !stale {
        // No destination can be read, yet the portal's active key is not the one keyrotd last held:
        // someone rotated it elsewhere. Whether the destinations followed is unknown, so nothing is
        // repaired, but it is flagged: silence here could be an outage nobody sees.
        let unread = obs.views.iter().all(|v| v.error.is_some());
        if let (Seen::Read(s), Some(held)) = (&obs.status, &j.active_key_id)
            && unread
            && !j.lost
            && s.key_id != *held
        {
            return Repair::Report;
        }
        return Repair::Skip("some destinations unreadable".into());
    }
    let good = obs.views.iter().position(|v| v.in_sync);
    match (good, &obs.active_key_id) {
        (Some(from), Some(_)) => Repair::Copy { from },
        // The value in use today may live outside every destination: regenerating would be an
        // outage nobody asked for.
        _ if j.is_first_contact() && key.on_first_contact == FirstContact::Report => {
            Repair::FirstContact
        }
        _ if key.auto_recover && j.rerotations_in_row <= key.max_rerotations => Repair::Rerotate,
        _ => Repair::Report,
    }
}

/// Reads the provider's status and every destination, and works out which values are the active key:
/// known from the journal, or adopted from a destination whose value authenticates at the provider.
pub async fn observe(
    metrics: &Metrics,
    rt: &Runtime,
    key: &KeyConfig,
    journal: &KeyJournal,
) -> Observation {
    let provider = rt.provider(key).ok().cloned();
    let status = match &provider {
        Some(p) if p.has_status() => match calls::status_retrying(metrics, p).await {
            Ok(s) => Seen::Read(s),
            Err(e) => Seen::Unreadable(e.to_string()),
        },
        Some(_) => Seen::NoEndpoint,
        None => Seen::Unreadable("provider not configured".into()),
    };
    let values = read_all(rt, key).await;
    let active_key_id = match &status {
        Seen::Read(s) => Some(s.key_id.clone()),
        _ => journal.active_key_id.clone(),
    };
    let mut active_fingerprint = match (&journal.active_key_id, &active_key_id) {
        (Some(j), Some(a)) if j == a => journal.active_fingerprint.clone(),
        _ => None,
    };
    let mut adopted = false;
    if let Some(p) = provider.as_ref().filter(|p| p.has_auth_check())
        && active_fingerprint.is_none()
        && !matches!(status, Seen::Unreadable(_))
        && let Some(fp) = adopt(metrics, p, &values, active_key_id.as_deref()).await
    {
        active_fingerprint = Some(fp);
        adopted = true;
    }
    let views = views(key, &values, active_fingerprint.as_deref());
    Observation {
        status,
        active_key_id,
        active_fingerprint,
        adopted,
        values,
        views,
    }
}

/// The fingerprint of the first distinct value that authenticates as the active key.
async fn adopt(
    metrics: &Metrics,
    provider: &crate::limits::Limited<crate::provider::Provider>,
    values: &[Read],
    active_key_id: Option<&str>,
) -> Option<String> {
    let mut tried: Vec<&str> = Vec::new();
    for v in values {
        let Ok(Some(v)) = v else { continue };
        if tried.contains(&v.fingerprint.as_str()) {
            continue;
        }
        tried.push(&v.fingerprint);
        if let Ok(Some(identity)) = calls::auth_check(metrics, provider, &v.secret).await
            && (identity.key_id.is_none()
                || active_key_id.is_none()
                || identity.key_id.as_deref() == active_key_id)
        {
            return Some(v.fingerprint.clone());
        }
    }
    None
}

fn views(key: &KeyConfig, values: &[Read], active_fp: Option<&str>) -> Vec<DestinationView> {
    key.destinations
        .iter()
        .zip(values)
        .map(|(d, v)| {
            let (key_id, fp, version, error) = match v {
                Ok(Some(v)) => (
                    v.key_id.clone(),
                    Some(v.fingerprint.clone()),
                    v.version.clone(),
                    None,
                ),
                Ok(None) => (None, None, None, None),
                Err(e) => (None, None, None, Some(e.clone())),
            };
            DestinationView {
                store: d.store.clone(),
                target: d.target.to_string(),
                in_sync: fp.is_some() && fp.as_deref() == active_fp,
                key_id,
                fingerprint: fp,
                version,
                error,
            }
        })
        .collect()
}

/// One periodic round: every key reconciled once, spread evenly over `interval` (key `i` of `n` at
/// `(i+1)/n` of it, so a lone key is looked at when the interval has passed), at most 64 at a time.
/// A fleet's reads then reach the portal and the stores as a steady trickle rather than a burst every
/// interval, and the process wakes for them only as often as they are due. Each look is a task of
/// its own ([`Looks`](super::looks::Looks)): a key whose provider hangs is skipped by the next round
/// while its look runs, and holds up neither the other keys nor the next round. Ends after
/// `interval` (or at shutdown).
pub async fn reconcile_spread(engine: &Arc<Engine>, interval: std::time::Duration) {
    let config = engine.config();
    let n = config.keys.len().max(1) as u32;
    let start = tokio::time::Instant::now();
    for i in 0..config.keys.len() {
        let at = start + interval.mul_f64(f64::from(i as u32 + 1) / f64::from(n));
        tokio::select! {
            () = engine.shutdown.cancelled() => return,
            () = tokio::time::sleep_until(at) => {}
        }
        let (e, c) = (engine.clone(), config.clone());
        let look = async move {
            reconcile_key(&e, &c.keys[i], true).await;
        };
        let _ = engine
            .reconciling
            .start(&config.keys[i].name, &engine.shutdown, look)
            .await;
    }
    tokio::select! {
        () = engine.shutdown.cancelled() => {}
        () = tokio::time::sleep_until(start + interval) => {}
    }
}

/// Reconcile every key once (64 at a time, so one slow key does not hold up the rest).
pub async fn reconcile_all(engine: &Arc<Engine>) -> Vec<(String, Reconciled)> {
    let config = engine.config();
    futures::stream::iter(0..config.keys.len())
        .map(|i| {
            let (engine, config) = (engine.clone(), config.clone());
            async move {
                let k = &config.keys[i];
                (k.name.clone(), reconcile_key(&engine, k, true).await)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

/// Observes one key, refreshes its live view, and (with `act`) repairs what it found. Without `act`
/// (the first look at start) it only refreshes the view and remembers an adoption.
pub async fn reconcile_key(engine: &Arc<Engine>, key: &KeyConfig, act: bool) -> Reconciled {
    let Some(slot) = engine.slot(&key.name) else {
        return Reconciled::Skipped("unknown key".into());
    };
    if slot.is_busy() {
        return Reconciled::Skipped("a rotation is running".into());
    }
    // Another replica's key is observed (for this replica's /v1/keys), never repaired from here.
    let act = act && engine.acts_on(&key.name);
    let generation = slot.generation();
    let journal = slot.journal().await;
    let rt = engine.runtime();
    let obs = observe(&engine.metrics, &rt, key, &journal).await;
    if let Seen::Read(s) = &obs.status {
        engine.set_status(&slot, s);
    }
    let repair = judge(&obs, &journal, key);
    let was_drifting = slot.live().drift;
    // A look that could not decide (the provider or the destinations out of reach) neither raises
    // nor clears the flag: drift found earlier stays shown until a look sees the key in sync.
    let drift = match &repair {
        Repair::Skip(_) => was_drifting,
        found => found.drift(&obs.views),
    };
    engine.set_destinations(&slot, obs.views.clone());
    engine.set_drift(&slot, drift).await;
    // The replica holding the key tells its owner; the others only show it.
    if drift && !was_drifting && engine.acts_on(&key.name) {
        drift_found(engine, key, &repair, &obs);
    }
    let acts = act && matches!(repair, Repair::Copy { .. } | Repair::Rerotate);
    if !obs.adopted && !acts {
        return reported(&key.name, &repair, false);
    }
    let Some(claim) = slot.try_claim() else {
        return Reconciled::Skipped("a rotation started while the key was observed".into());
    };
    if slot.generation() != generation {
        return Reconciled::Skipped("the key changed while it was observed".into());
    }
    if obs.adopted
        && let Some(fp) = &obs.active_fingerprint
    {
        let id = obs.active_key_id.clone();
        let _ = engine.commit(&slot, |j| j.adopted(id, fp)).await;
        tracing::info!(key = %key.name, fingerprint = %fp, "Adopted the value found in a destination.");
        // A key held for the first time may now be scheduled.
        engine.schedule.key(&key.name);
    }
    if !acts {
        return reported(&key.name, &repair, false);
    }
    repair_key(engine, claim, &slot, key, &repair, obs)
}

/// Drift was just found (it was not there at the last look): the owner is told, once, with the
/// portal's Generated By so they see who rotated.
fn drift_found(engine: &Engine, key: &KeyConfig, repair: &Repair, obs: &Observation) {
    let why = match repair {
        Repair::FirstContact => {
            "first contact: keyrotd has never issued nor adopted this key, and no destination holds a \
             value the portal accepts; nothing is regenerated until an operator runs `keyrotd rotate`"
        }
        Repair::Rerotate => "no destination holds the portal's active key: re-rotating",
        Repair::Report => "no destination holds the portal's active key (not re-rotated by itself)",
        Repair::Copy { .. } => {
            "some destinations hold an old value: copying the active key to them"
        }
        Repair::NotActive => "the portal says the key is not Active",
        Repair::InSync | Repair::Skip(_) => return,
    };
    if *repair == Repair::FirstContact {
        tracing::warn!(key = %key.name, "{why}");
    }
    let mut n = Notice::new(NoticeEvent::DriftDetected, key, engine.clock.now());
    n.reason = Some(why.to_string());
    if let Seen::Read(s) = &obs.status {
        n.new_key_id = Some(s.key_id.clone());
        n.generated_by = s.generated_by.clone();
    }
    n.fingerprint = obs.active_fingerprint.clone();
    engine.notify(n);
}

fn reported(key: &str, repair: &Repair, rerotating: bool) -> Reconciled {
    match repair {
        Repair::InSync => Reconciled::InSync,
        Repair::NotActive => {
            tracing::warn!(key, "Provider reports the key as not Active; not rotating.");
            Reconciled::NotActive
        }
        Repair::Skip(why) => Reconciled::Skipped(why.clone()),
        Repair::Copy { .. } => Reconciled::Repaired,
        Repair::FirstContact => Reconciled::FirstContact,
        Repair::Rerotate | Repair::Report => Reconciled::Drift { rerotating },
    }
}

/// Starts the repair with the claim the decision was made under.
fn repair_key(
    engine: &Arc<Engine>,
    claim: super::slot::Claim,
    slot: &KeySlot,
    key: &KeyConfig,
    repair: &Repair,
    mut obs: Observation,
) -> Reconciled {
    let now = engine.clock.now();
    let active = Keys {
        new_key_id: obs.active_key_id.as_deref(),
        fingerprint: obs.active_fingerprint.as_deref(),
        ..Keys::default()
    };
    let requested_by = engine.requested_by();
    let req = match repair {
        Repair::Copy { from } => {
            let detail = "some destinations hold an old value: copying the active key to them";
            engine.audit(AuditRecord::drift(&key.name, None, active, detail, now));
            let Ok(Some(value)) = obs.values.swap_remove(*from) else {
                return Reconciled::Skipped("the good value vanished".into());
            };
            let mut req = RotationRequest::new(Trigger::Reconcile, "drift", requested_by);
            req.resume = Some(Resume::FromStorage {
                key_id: obs.active_key_id.clone().unwrap_or_default(),
                secret: value.secret,
            });
            req
        }
        _ => {
            let detail = "no destination holds the provider's active key";
            engine.audit(AuditRecord::drift(&key.name, None, active, detail, now));
            RotationRequest::rerotation(Trigger::Reconcile, RerotationReason::Drift, requested_by)
        }
    };
    if let Err(e) = engine.start_claimed(claim, req) {
        tracing::warn!(key = %slot.name, error = %e, "Drift repair not started.");
    }
    reported(&key.name, repair, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(auto_recover: bool) -> KeyConfig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "t").unwrap();
        let text = format!(
            r#"
            [daemon]
            state_dir = "{d}"
            [providers.p]
            kind = "aos"
            base_url = "http://127.0.0.1:1"
            management_token = {{ file = "{d}/t" }}
            [stores.a]
            kind = "file"
            dir = "{d}"
            [[keys]]
            name = "k"
            provider = "p"
            auto_recover = {auto_recover}
            [[keys.destinations]]
            store = "a"
            file = "k1"
            [[keys.destinations]]
            store = "a"
            file = "k2"
            "#,
            d = dir.path().display()
        );
        crate::config::load_str(&text).unwrap().keys[0].clone()
    }

    /// A destination as observed: `s` in sync, `o` another value or none, `e` unreadable.
    fn view(c: char) -> DestinationView {
        DestinationView {
            store: "a".into(),
            target: "t".into(),
            key_id: None,
            fingerprint: None,
            version: None,
            in_sync: c == 's',
            error: (c == 'e').then(|| "unreachable".into()),
        }
    }

    fn obs(status: &str, views: &str) -> Observation {
        let status = match status {
            "active" | "inactive" => Seen::Read(KeyStatus {
                active: status == "active",
                key_id: "k1".into(),
                account_id: None,
                first_generated: None,
                last_rotated: None,
                generated_by: None,
            }),
            "none" => Seen::NoEndpoint,
            _ => Seen::Unreadable("HTTP 503".into()),
        };
        Observation {
            active_key_id: Some("k1".into()),
            active_fingerprint: Some("fp".into()),
            adopted: false,
            status,
            values: Vec::new(),
            views: views.chars().map(view).collect(),
        }
    }

    #[test]
    fn judge_table() {
        // A key keyrotd rotated before (the journal knows its active key).
        let mut j = KeyJournal::new("k");
        j.adopted(Some("k0".into()), "fp0");
        let mut tired = j.clone();
        tired.rerotations_in_row = 4;
        // The journal holds the portal's active key (k1).
        let mut held = KeyJournal::new("k");
        held.adopted(Some("k1".into()), "fp");
        // First contact: never issued nor adopted.
        let fresh = KeyJournal::new("k");
        let mut lost_at_first = KeyJournal::new("k");
        lost_at_first.lost = true;
        let (on, off) = (key(true), key(false));
        let mut rotate_first = key(true);
        rotate_first.on_first_contact = FirstContact::Rotate;
        let table: &[(&str, &str, &KeyConfig, &KeyJournal, Repair)] = &[
            ("active", "ss", &on, &j, Repair::InSync),
            ("active", "so", &on, &j, Repair::Copy { from: 0 }),
            ("active", "os", &on, &j, Repair::Copy { from: 1 }),
            ("active", "oo", &on, &j, Repair::Rerotate),
            ("active", "oo", &off, &j, Repair::Report),
            ("active", "oo", &on, &tired, Repair::Report),
            (
                "active",
                "se",
                &on,
                &j,
                Repair::Skip("some destinations unreadable".into()),
            ),
            // Nothing readable, and the portal's key (k1) is not the one keyrotd held (k0): rotated
            // elsewhere, flagged and left alone.
            ("active", "ee", &on, &j, Repair::Report),
            // Nothing readable, the portal's key is keyrotd's own: nothing known to be wrong.
            (
                "active",
                "ee",
                &on,
                &held,
                Repair::Skip("some destinations unreadable".into()),
            ),
            ("active", "oe", &on, &j, Repair::Rerotate),
            ("inactive", "oo", &on, &j, Repair::NotActive),
            ("inactive", "ss", &on, &j, Repair::NotActive),
            (
                "down",
                "oo",
                &on,
                &j,
                Repair::Skip("provider status: HTTP 503".into()),
            ),
            ("none", "so", &on, &j, Repair::Copy { from: 0 }),
            // First contact reports, whether the destinations are empty or hold a refused value.
            ("active", "oo", &on, &fresh, Repair::FirstContact),
            ("active", "oe", &on, &fresh, Repair::FirstContact),
            ("active", "oo", &off, &fresh, Repair::FirstContact),
            ("none", "oo", &on, &fresh, Repair::FirstContact),
            ("active", "ss", &on, &fresh, Repair::InSync),
            ("inactive", "oo", &on, &fresh, Repair::NotActive),
            // ... unless the key asks to be rotated on first contact, or keyrotd lost it itself.
            ("active", "oo", &rotate_first, &fresh, Repair::Rerotate),
            ("active", "oo", &on, &lost_at_first, Repair::Rerotate),
        ];
        for (status, views, key, journal, want) in table {
            let got = judge(&obs(status, views), journal, key);
            assert_eq!(&got, want, "status {status}, destinations {views}");
        }
    }

    #[test]
    fn drift_is_reported_for_what_needs_repair_or_report() {
        let views: Vec<DestinationView> = "so".chars().map(view).collect();
        assert!(Repair::Copy { from: 0 }.drift(&views));
        assert!(Repair::Report.drift(&views));
        assert!(Repair::NotActive.drift(&views));
        assert!(Repair::FirstContact.drift(&views));
        assert!(!Repair::InSync.drift(&views));
        assert!(!Repair::Skip(String::new()).drift(&views));
    }
}
