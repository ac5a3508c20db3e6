//! Preflight: everything that could fail, checked before the old key is destroyed (docs/lifecycle.md,
//! phase 1). It changes nothing and decides nothing: it returns findings (what was proven) and
//! problems (what would make the rotation abort).
//!
//! A re-rotation (the old key is already gone) checks the provider's account and that the new key can
//! be kept: one writable destination is enough, since waiting for all of them only lengthens an outage
//! that has already begun. An operator's `--force --allow-partial` asks for the same.

use super::calls;
use super::rotation::Rotation;
use crate::config::{DependentConfig, DestinationConfig};
use crate::notify::Probe;
use crate::provider::{KeyStatus, ProviderError};
use crate::store::Prepared;

pub struct Preflight {
    pub status: Option<KeyStatus>,
    pub findings: Vec<String>,
    pub problems: Vec<String>,
    /// Per destination, what its store read ahead for the write (one round trip on the outage path).
    pub prepared: Vec<Prepared>,
}

/// How many of the key's destinations must be writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    All,
    AtLeastOne,
}

pub async fn run(r: &Rotation) -> Preflight {
    let rerotation = r.req.rerotation.is_some();
    let mut p = Preflight {
        status: None,
        findings: Vec::new(),
        problems: Vec::new(),
        prepared: Vec::new(),
    };
    if !r.req.force && !rerotation {
        gates(r, &mut p);
    }
    if let Err(e) = r.engine.journal_writable() {
        p.problems.push(format!(
            "the journal cannot be written, nothing may be destroyed: {e}"
        ));
    }
    let (status, stores, deps) = tokio::join!(
        read_status(r),
        check_destinations(r),
        probe_dependents(r, rerotation)
    );
    judge_status(r, status, rerotation, &mut p);
    let need = if rerotation || (r.req.force && r.req.allow_partial) {
        Need::AtLeastOne
    } else {
        Need::All
    };
    judge_destinations(stores, need, &mut p);
    judge_dependents(deps, &mut p);
    p
}

/// Pause and window, which an operator's `--force` overrides.
fn gates(r: &Rotation, p: &mut Preflight) {
    if r.req.trigger.is_scheduled() && r.engine.is_paused() {
        p.problems
            .push("scheduled rotations are paused".to_string());
    }
    if let Some(w) = &r.key.window
        && !w.contains_at(r.engine.clock.now(), r.key.timezone)
    {
        p.problems.push("outside the rotation window".to_string());
    }
}

async fn read_status(r: &Rotation) -> Option<Result<KeyStatus, ProviderError>> {
    if r.provider.has_status() {
        Some(calls::status_retrying(&r.engine.metrics, &r.provider).await)
    } else {
        None
    }
}

/// Each destination's preflight, then its store's read-ahead for the write; a writable one's
/// finding says how long its credential lasts.
async fn check_destinations(r: &Rotation) -> Vec<(&DestinationConfig, Checked)> {
    let now = r.engine.clock.now();
    futures::future::join_all(r.key.destinations.iter().map(|d| async move {
        let result = match r.rt.store(&d.store) {
            Ok(s) => match async {
                let _permit = s.enter().await;
                s.preflight(&d.target).await
            }
            .await
            {
                Ok(()) => {
                    let credential = s
                        .credential_status()
                        .map(|c| format!(", {}", c.summary(now)))
                        .unwrap_or_default();
                    // A read-ahead that fails is no problem: the write then reads for itself.
                    let _permit = s.enter().await;
                    let prepared = s.prepare(&d.target).await.unwrap_or_default();
                    Ok((credential, prepared))
                }
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        (d, result)
    }))
    .await
}

/// A destination's preflight: its finding's credential note and read-ahead, or its problem.
type Checked = Result<(String, Prepared), String>;

async fn probe_dependents(r: &Rotation, rerotation: bool) -> Vec<(&DependentConfig, Probe)> {
    if rerotation {
        return Vec::new();
    }
    let probes = r
        .key
        .dependents
        .iter()
        .filter_map(|d| d.verify.as_ref().map(|v| (d, v)))
        .map(|(d, v)| async move { (d, r.engine.dependents.probe(v).await) });
    futures::future::join_all(probes).await
}

fn judge_status(
    r: &Rotation,
    status: Option<Result<KeyStatus, ProviderError>>,
    rerotation: bool,
    p: &mut Preflight,
) {
    match status {
        Some(Ok(s)) => {
            r.engine.set_status(&r.slot, &s);
            if !s.active && !rerotation {
                p.problems
                    .push(format!("provider reports key {} as not Active", s.key_id));
            }
            let account = s.account_id.as_deref().unwrap_or("-");
            match (r.provider.expected_account(), s.account_id.as_deref()) {
                (Some(want), Some(got)) if want != got => p
                    .problems
                    .push(format!("key belongs to account {got}, expected {want}")),
                _ => p.findings.push(format!(
                    "provider: key {} {} account {account}",
                    s.key_id,
                    if s.active { "Active" } else { "not Active" },
                )),
            }
            p.status = Some(s);
        }
        Some(Err(e)) => p.problems.push(format!("provider status: {e}")),
        None => p
            .findings
            .push("provider has no status endpoint: account and Active not checked".into()),
    }
}

fn judge_destinations(stores: Vec<(&DestinationConfig, Checked)>, need: Need, p: &mut Preflight) {
    let writable = stores.iter().filter(|(_, r)| r.is_ok()).count();
    for (d, result) in stores {
        let prepared = match result {
            Ok((credential, prepared)) => {
                p.findings
                    .push(format!("{} ({}) writable{credential}", d.store, d.target));
                prepared
            }
            Err(e) if need == Need::AtLeastOne => {
                p.findings.push(format!(
                    "destination {e} (filled later: one writable destination is enough)"
                ));
                Prepared::none()
            }
            Err(e) => {
                p.problems.push(format!("destination {e}"));
                Prepared::none()
            }
        };
        p.prepared.push(prepared);
    }
    if need == Need::AtLeastOne && writable == 0 {
        p.problems
            .push("no destination is writable: the new key would be lost".into());
    }
}

fn judge_dependents(deps: Vec<(&DependentConfig, Probe)>, p: &mut Preflight) {
    for (d, probe) in deps {
        match probe {
            Probe::Unreachable(e) => p
                .problems
                .push(format!("dependent {} unreachable: {e}", d.name)),
            // A 401/403 means it is already broken: no reason to keep an exposed key alive for it.
            Probe::AuthFailure(code) => p.findings.push(format!(
                "dependent {} reachable (HTTP {code}: its key is already refused)",
                d.name
            )),
            Probe::Unexpected(code) => p
                .findings
                .push(format!("dependent {} reachable (HTTP {code})", d.name)),
            Probe::Ok => p.findings.push(format!("dependent {} reachable", d.name)),
        }
    }
}
