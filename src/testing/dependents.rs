//! Scripted dependents: services that read the key from a store when told to reload, and whose verify
//! probe fails authentication while the key they hold is not the provider's active one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::ExposeSecret;

use crate::config::{ConfirmConfig, DestinationTarget, ReloadHook, VerifyConfig};
use crate::limits::Limited;
use crate::notify::{HookError, Probe, ReloadNotice};
use crate::provider::Provider;
use crate::store::Store;

#[derive(Default)]
struct State {
    held: Option<String>,
    failing_reloads: u32,
    /// Errors of the next reload calls: what a real hook call returned for a fault.
    reload_errors: std::collections::VecDeque<HookError>,
    /// Answers of the next probes: what a real probe returned for a fault.
    probe_answers: std::collections::VecDeque<Probe>,
    reload_delay: Duration,
    unreachable: bool,
    /// Every reload call, answered or not, with the tokio time it was made.
    calls: Vec<tokio::time::Instant>,
    /// Reloads answered, with the tokio time of the answer.
    answered: Vec<tokio::time::Instant>,
    probes: u32,
    /// Answers reloads without reading anything: keeps the key it has.
    ignore_reloads: bool,
    /// After its next reload its verify answers 401 (a new key it cannot use).
    fail_after_reload: bool,
    failing: bool,
    confirms: u32,
}

/// One scripted dependent.
pub struct DependentScript {
    reads: Option<(Arc<Limited<Store>>, DestinationTarget)>,
    checks: Option<Arc<Limited<Provider>>>,
    state: Mutex<State>,
}

impl DependentScript {
    /// Reads `target` of `store` on reload; probes authenticate its key at `provider` (a scripted
    /// one). It starts holding the provider's current key.
    pub fn new(
        store: Arc<Limited<Store>>,
        target: DestinationTarget,
        provider: Arc<Limited<Provider>>,
    ) -> Self {
        let held = active_secret(&provider);
        DependentScript {
            reads: Some((store, target)),
            checks: Some(provider),
            state: Mutex::new(State {
                held,
                ..State::default()
            }),
        }
    }

    /// Answers every reload and every probe with 200, reading nothing.
    pub fn healthy() -> Self {
        DependentScript {
            reads: None,
            checks: None,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `n` reload calls fail (HTTP 500).
    pub fn fail_reloads(&self, n: u32) {
        self.state().failing_reloads = n;
    }

    /// The next `n` reload calls fail with `error`.
    pub fn fail_reloads_with(&self, n: usize, error: HookError) {
        let mut s = self.state();
        for _ in 0..n {
            s.reload_errors.push_back(error.clone());
        }
    }

    /// The next `n` probes answer `probe`.
    pub fn probe_with(&self, n: usize, probe: Probe) {
        let mut s = self.state();
        for _ in 0..n {
            s.probe_answers.push_back(probe.clone());
        }
    }

    pub fn delay_reloads(&self, by: Duration) {
        self.state().reload_delay = by;
    }

    /// No answer at all (reloads and probes).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.state().unreachable = unreachable;
    }

    /// Forgets its key, as a dependent that kept an old one.
    pub fn hold(&self, value: &str) {
        self.state().held = Some(value.to_string());
    }

    pub fn held(&self) -> Option<String> {
        self.state().held.clone()
    }

    pub fn reload_calls(&self) -> Vec<tokio::time::Instant> {
        self.state().calls.clone()
    }

    pub fn reloads_answered(&self) -> Vec<tokio::time::Instant> {
        self.state().answered.clone()
    }

    pub fn probes(&self) -> u32 {
        self.state().probes
    }

    /// Never picks up a new key: reloads are answered, the key it holds stays.
    pub fn ignore_reloads(&self, on: bool) {
        self.state().ignore_reloads = on;
    }

    /// After its next reload, its verify fails authentication (as a canary that cannot use the new
    /// key would).
    pub fn fail_after_reload(&self) {
        self.state().fail_after_reload = true;
    }

    /// Confirm calls answered so far.
    pub fn confirms(&self) -> u32 {
        self.state().confirms
    }

    fn confirm(&self) -> Result<Option<String>, String> {
        let mut s = self.state();
        if s.unreachable {
            return Err("connection refused".into());
        }
        s.confirms += 1;
        Ok(s.held
            .as_ref()
            .map(|v| crate::secret::fingerprint(&crate::secret::Secret::from(v.clone()))))
    }

    async fn reload(&self) -> Result<(), HookError> {
        let delay = {
            let mut s = self.state();
            s.calls.push(tokio::time::Instant::now());
            if s.unreachable {
                return Err(HookError::Request("connection refused".into()));
            }
            if let Some(e) = s.reload_errors.pop_front() {
                return Err(e);
            }
            s.reload_delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        {
            let mut s = self.state();
            if s.failing_reloads > 0 {
                s.failing_reloads -= 1;
                return Err(HookError::Status(500));
            }
            if s.fail_after_reload {
                s.failing = true;
            }
            if s.ignore_reloads {
                s.answered.push(tokio::time::Instant::now());
                return Ok(());
            }
        }
        let read = match &self.reads {
            Some((store, target)) => Some(store.read(target).await),
            None => None,
        };
        let mut s = self.state();
        match read {
            Some(Ok(v)) => s.held = v.map(|v| v.secret.expose_secret().to_string()),
            Some(Err(_)) => return Err(HookError::Status(503)),
            None => {}
        }
        s.answered.push(tokio::time::Instant::now());
        Ok(())
    }

    fn probe(&self) -> Probe {
        let mut s = self.state();
        s.probes += 1;
        if let Some(p) = s.probe_answers.pop_front() {
            return p;
        }
        if s.unreachable {
            return Probe::Unreachable("connection refused".into());
        }
        if s.failing {
            return Probe::AuthFailure(401);
        }
        match &self.checks {
            Some(p) if !accepted(p, s.held.as_deref()) => Probe::AuthFailure(401),
            _ => Probe::Ok,
        }
    }
}

/// The scripted provider's active secret (None for any other provider).
fn active_secret(provider: &Provider) -> Option<String> {
    match provider {
        Provider::Scripted(p) => Some(p.secret()),
        _ => None,
    }
}

/// Whether the scripted provider accepts `held` (any other provider accepts everything).
fn accepted(provider: &Provider, held: Option<&str>) -> bool {
    match (provider, held) {
        (Provider::Scripted(p), Some(v)) => p.accepts(v),
        (Provider::Scripted(_), None) => false,
        _ => true,
    }
}

/// Every scripted dependent, found by the URL of its reload hook or verify endpoint.
#[derive(Default)]
pub struct ScriptedDependents {
    by_url: Mutex<HashMap<String, Arc<DependentScript>>>,
}

impl ScriptedDependents {
    /// Registers `script` under its reload and verify URLs (as written in the key's config).
    pub fn add(
        &self,
        reload_url: &str,
        verify_url: &str,
        script: DependentScript,
    ) -> Arc<DependentScript> {
        let script = Arc::new(script);
        self.alias(reload_url, &script);
        self.alias(verify_url, &script);
        script
    }

    /// Makes `script` answer at `url` too (its `confirm` endpoint, a second key's hook URL).
    pub fn alias(&self, url: &str, script: &Arc<DependentScript>) {
        let mut by_url = self.by_url.lock().unwrap_or_else(|p| p.into_inner());
        by_url.insert(normalize(url), script.clone());
    }

    fn find(&self, url: &str) -> Option<Arc<DependentScript>> {
        let by_url = self.by_url.lock().unwrap_or_else(|p| p.into_inner());
        by_url.get(&normalize(url)).cloned()
    }

    pub async fn reload(
        &self,
        hook: &ReloadHook,
        _notice: &ReloadNotice<'_>,
    ) -> Result<(), HookError> {
        let url = match hook {
            ReloadHook::Http { url, .. } => url.to_string(),
            ReloadHook::Command { command, .. } => command.join(" "),
        };
        match self.find(&url) {
            Some(d) => d.reload().await,
            None => Err(HookError::Request(format!(
                "no scripted dependent at {url}"
            ))),
        }
    }

    pub async fn probe(&self, verify: &VerifyConfig) -> Probe {
        match self.find(verify.url.as_str()) {
            Some(d) => d.probe(),
            None => Probe::Unreachable("no scripted dependent".into()),
        }
    }

    /// The fingerprint of the key the dependent at `confirm.url` holds.
    pub async fn confirm(&self, confirm: &ConfirmConfig) -> Result<Option<String>, String> {
        match self.find(confirm.url.as_str()) {
            Some(d) => d.confirm(),
            None => Err("no scripted dependent".into()),
        }
    }
}

fn normalize(url: &str) -> String {
    url::Url::parse(url)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| url.to_string())
}
