//! One reload per dependent (docs/lifecycle.md, "One reload per dependent"). A dependent is known by
//! its reload target (a hook's URL, or a command line): when several keys it reads are rotated
//! together, it is told once, after all of them are stored.
//!
//! - [`Coalescer`] (`reload_coalesce = "2s"`): the first request for a target opens a window; every
//!   request for the same target within it joins, and one reload goes out when it closes;
//! - [`Batch`] (keys of a `group` rotated together): a target is reloaded once every member that
//!   reads through it has asked (its destinations confirmed) or ended without asking.
//!
//! Either way the one reload carries the first request's hook settings and notice, with every key it
//! serves in `keys`, and its result is every requester's. Keys without either setting never come
//! here: their hooks are called directly, with no lock or wait on the outage path.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::calls::{self, Notice};
use super::{Engine, lock};
use crate::config::{DependentConfig, KeyConfig};

/// One key's request for a reload.
struct Request {
    key: Arc<KeyConfig>,
    dep: DependentConfig,
    notice: Notice,
}

/// The requests for one target waiting for their reload, and where its result is announced.
struct Pending {
    requests: Mutex<Vec<Request>>,
    result: watch::Sender<Option<bool>>,
}

impl Pending {
    fn new() -> Arc<Pending> {
        let (result, _) = watch::channel(None);
        Arc::new(Pending {
            requests: Mutex::new(Vec::new()),
            result,
        })
    }

    /// Adds a request; the receiver sees the reload's result.
    fn join(&self, request: Request) -> watch::Receiver<Option<bool>> {
        lock(&self.requests).push(request);
        self.result.subscribe()
    }

    /// The one reload for every request so far; announces and returns its result.
    async fn fire(&self, engine: &Engine) -> bool {
        let requests = std::mem::take(&mut *lock(&self.requests));
        let Some(first) = requests.first() else {
            return true;
        };
        let keys: Vec<String> = requests.iter().map(|r| r.key.name.clone()).collect();
        let mut notice = first.notice.clone();
        if requests.len() > 1 {
            notice.keys = keys.clone();
            engine.metrics.reloads_coalesced(requests.len() as u64 - 1);
            tracing::info!(dependent = %first.dep.name, keys = %keys.join(","), "One reload for several keys.");
        }
        let ok = calls::call_hook(engine, &first.key, &first.dep, &notice).await;
        // The call counted for the first key; the others were served by it too.
        for r in requests.iter().skip(1) {
            engine.metrics.reload_hook(&r.key.name, &r.dep.name, ok);
        }
        let _ = self.result.send(Some(ok));
        ok
    }
}

/// Waits for a pending reload's result (false if it was dropped unannounced, which is a bug).
async fn outcome(mut rx: watch::Receiver<Option<bool>>) -> bool {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.unwrap_or(false),
        Err(_) => false,
    }
}

/// `reload_coalesce`: a window per reload target.
#[derive(Default)]
pub struct Coalescer {
    open: Mutex<HashMap<String, Arc<Pending>>>,
}

impl Coalescer {
    /// Joins the open window of `dep`'s target, or opens one of `window`; true once the one reload
    /// answered.
    pub async fn reload(
        &self,
        engine: &Arc<Engine>,
        window: Duration,
        key: &Arc<KeyConfig>,
        dep: &DependentConfig,
        notice: Notice,
    ) -> bool {
        let Some(target) = dep.reload_target() else {
            return true;
        };
        let request = Request {
            key: key.clone(),
            dep: dep.clone(),
            notice,
        };
        let (rx, opened) = {
            let mut open = lock(&self.open);
            match open.get(&target) {
                Some(p) => (p.join(request), None),
                None => {
                    let p = Pending::new();
                    let rx = p.join(request);
                    open.insert(target.clone(), p.clone());
                    (rx, Some(p))
                }
            }
        };
        if let Some(p) = opened {
            let engine = engine.clone();
            engine.clone().tasks.spawn(async move {
                tokio::time::sleep(window).await;
                lock(&engine.reloads.open).remove(&target);
                p.fire(&engine).await;
            });
        }
        outcome(rx).await
    }
}

/// The keys of a group rotated together: per target, who still has to ask.
pub struct Batch {
    pub group: String,
    state: Mutex<BatchState>,
}

#[derive(Default)]
struct BatchState {
    /// Per target, the members that read through it and have neither asked nor ended.
    waiting: HashMap<String, HashSet<String>>,
    open: HashMap<String, Arc<Pending>>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl Batch {
    pub fn new(group: &str, members: &[Arc<KeyConfig>]) -> Arc<Batch> {
        let mut waiting: HashMap<String, HashSet<String>> = HashMap::new();
        for key in members {
            for target in key.dependents.iter().filter_map(|d| d.reload_target()) {
                waiting.entry(target).or_default().insert(key.name.clone());
            }
        }
        Arc::new(Batch {
            group: group.to_string(),
            state: Mutex::new(BatchState {
                waiting,
                open: HashMap::new(),
            }),
        })
    }

    /// `key`'s request for `dep`'s reload: answered once every member reading through the same
    /// target has asked or ended.
    pub async fn reload(
        &self,
        engine: &Arc<Engine>,
        key: &Arc<KeyConfig>,
        dep: &DependentConfig,
        notice: Notice,
    ) -> bool {
        let Some(target) = dep.reload_target() else {
            return true;
        };
        let request = Request {
            key: key.clone(),
            dep: dep.clone(),
            notice,
        };
        let (rx, ready) = {
            let mut s = lock(&self.state);
            let pending = s
                .open
                .entry(target.clone())
                .or_insert_with(Pending::new)
                .clone();
            let rx = pending.join(request);
            if let Some(w) = s.waiting.get_mut(&target) {
                w.remove(&key.name);
            }
            (rx, s.take_ready(&target))
        };
        if let Some(p) = ready {
            p.fire(engine).await;
        }
        outcome(rx).await
    }

    /// `key`'s rotation ended: it asks for nothing more, so no target waits for it.
    pub fn leave(&self, engine: &Arc<Engine>, key: &str) {
        let ready: Vec<Arc<Pending>> = {
            let mut s = lock(&self.state);
            let targets: Vec<String> = s
                .waiting
                .iter_mut()
                .filter_map(|(t, w)| w.remove(key).then(|| t.clone()))
                .collect();
            targets.iter().filter_map(|t| s.take_ready(t)).collect()
        };
        for p in ready {
            let engine = engine.clone();
            engine.clone().tasks.spawn(async move {
                p.fire(&engine).await;
            });
        }
    }
}

impl BatchState {
    /// The pending reload of `target` once nobody else is waited for; it leaves the batch (a later
    /// request for the target is reloaded on its own).
    fn take_ready(&mut self, target: &str) -> Option<Arc<Pending>> {
        let done = self.waiting.get(target).is_none_or(HashSet::is_empty);
        if !done {
            return None;
        }
        self.waiting.remove(target);
        self.open.remove(target)
    }
}
