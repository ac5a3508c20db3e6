//! An in-memory store with injectable faults.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use secrecy::ExposeSecret;

use crate::config::DestinationTarget;
use crate::secret::{Secret, fingerprint};
use crate::store::{StoreError, StoreErrorKind, StoredValue, WriteRequest};

/// A fault a store operation can be made to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    Transient,
    Auth,
    NotFound,
    Conflict,
    Permanent,
}

/// A store operation, for [`MemoryStore::fail_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOp {
    Preflight,
    Write,
    Read,
}

#[derive(Default)]
struct State {
    values: HashMap<String, (String, Option<String>, u64)>,
    /// Faults of the next writes, one per write.
    write_faults: VecDeque<StoreFault>,
    /// Errors of the next calls of each operation: what a real store client returned for a fault.
    injected: HashMap<StoreOp, VecDeque<StoreError>>,
    down: bool,
    read_only: bool,
    write_delay: Duration,
    read_delay: Duration,
    writes: u32,
    /// Every value ever written (for leak checks).
    written: Vec<String>,
}

/// A store that keeps values in memory.
pub struct MemoryStore {
    name: String,
    state: Mutex<State>,
}

impl MemoryStore {
    pub fn new(name: &str) -> MemoryStore {
        MemoryStore {
            name: name.to_string(),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every operation fails as if the server were unreachable, until [`MemoryStore::up`].
    pub fn down(&self) {
        self.state().down = true;
    }

    pub fn up(&self) {
        self.state().down = false;
    }

    /// Preflight reports it not writable, and writes fail (auth), reads still work.
    pub fn read_only(&self, on: bool) {
        self.state().read_only = on;
    }

    /// Every write takes this long (tokio time: virtual under a paused clock).
    pub fn delay_writes(&self, by: Duration) {
        self.state().write_delay = by;
    }

    /// Every read takes this long (tokio time).
    pub fn delay_reads(&self, by: Duration) {
        self.state().read_delay = by;
    }

    /// Clears injected write faults.
    pub fn heal(&self) {
        let mut s = self.state();
        s.write_faults.clear();
        s.down = false;
        s.read_only = false;
    }

    /// The next `n` writes fail with `fault`.
    pub fn fail_writes(&self, n: usize, fault: StoreFault) {
        let mut s = self.state();
        for _ in 0..n {
            s.write_faults.push_back(fault);
        }
    }

    /// The next `n` calls of `op` return `error` (its store and target as the call names them).
    pub fn fail_with(&self, op: StoreOp, n: usize, error: StoreError) {
        let mut s = self.state();
        let q = s.injected.entry(op).or_default();
        for _ in 0..n {
            q.push_back(error.clone());
        }
    }

    /// The next injected error of `op`, as a call on `target` returns it.
    fn injected(&self, op: StoreOp, target: &DestinationTarget) -> Option<StoreError> {
        let mut s = self.state();
        let mut e = s.injected.get_mut(&op)?.pop_front()?;
        e.store = self.name.clone();
        e.target = target.to_string();
        Some(e)
    }

    /// Puts a value there as someone else would (no key id metadata).
    pub fn put(&self, target: &str, value: &str) {
        let mut s = self.state();
        let version = s.values.get(target).map(|v| v.2 + 1).unwrap_or(1);
        s.values
            .insert(target.to_string(), (value.to_string(), None, version));
    }

    /// The value at `target`, if any.
    pub fn get(&self, target: &str) -> Option<String> {
        self.state().values.get(target).map(|v| v.0.clone())
    }

    /// The fingerprint of the value at `target`, if any.
    pub fn fingerprint(&self, target: &str) -> Option<String> {
        self.get(target).map(|v| fingerprint(&Secret::from(v)))
    }

    /// Write attempts so far (successful or not).
    pub fn writes(&self) -> u32 {
        self.state().writes
    }

    pub fn written(&self) -> Vec<String> {
        self.state().written.clone()
    }

    fn unreachable(&self, target: &DestinationTarget) -> StoreError {
        self.error(target, StoreErrorKind::Transient, "connection refused")
    }

    fn error(&self, target: &DestinationTarget, kind: StoreErrorKind, message: &str) -> StoreError {
        StoreError {
            kind,
            store: self.name.clone(),
            target: target.to_string(),
            message: message.to_string(),
        }
    }

    pub async fn preflight(&self, target: &DestinationTarget) -> Result<(), StoreError> {
        if let Some(e) = self.injected(StoreOp::Preflight, target) {
            return Err(e);
        }
        let s = self.state();
        if s.down {
            return Err(self.unreachable(target));
        }
        if s.read_only {
            return Err(self.error(target, StoreErrorKind::Auth, "not writable"));
        }
        Ok(())
    }

    pub async fn write(
        &self,
        target: &DestinationTarget,
        req: &WriteRequest<'_>,
    ) -> Result<Option<String>, StoreError> {
        let delay = {
            let mut s = self.state();
            s.writes += 1;
            s.write_delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(e) = self.injected(StoreOp::Write, target) {
            return Err(e);
        }
        let mut s = self.state();
        if s.down {
            return Err(self.unreachable(target));
        }
        if s.read_only {
            return Err(self.error(target, StoreErrorKind::Auth, "permission denied"));
        }
        if let Some(fault) = s.write_faults.pop_front() {
            let kind = match fault {
                StoreFault::Transient => StoreErrorKind::Transient,
                StoreFault::Auth => StoreErrorKind::Auth,
                StoreFault::NotFound => StoreErrorKind::NotFound,
                StoreFault::Conflict => StoreErrorKind::Conflict,
                StoreFault::Permanent => StoreErrorKind::Permanent,
            };
            return Err(self.error(target, kind, "injected fault"));
        }
        let key = target.to_string();
        let version = s.values.get(&key).map(|v| v.2 + 1).unwrap_or(1);
        let value = req.secret.expose_secret().to_string();
        s.written.push(value.clone());
        s.values
            .insert(key, (value, Some(req.key_id.to_string()), version));
        Ok(Some(version.to_string()))
    }

    pub async fn read(
        &self,
        target: &DestinationTarget,
    ) -> Result<Option<StoredValue>, StoreError> {
        let delay = self.state().read_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(e) = self.injected(StoreOp::Read, target) {
            return Err(e);
        }
        let s = self.state();
        if s.down {
            return Err(self.unreachable(target));
        }
        Ok(s.values
            .get(&target.to_string())
            .map(|(v, key_id, version)| {
                let secret = Secret::from(v.clone());
                StoredValue {
                    fingerprint: fingerprint(&secret),
                    secret,
                    key_id: key_id.clone(),
                    version: Some(version.to_string()),
                }
            }))
    }
}
