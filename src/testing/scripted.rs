//! A scripted provider: an in-memory portal that keeps the portal's contract (one active key; the old
//! one dies at regenerate; the secret is shown once) and fails on cue. Switched to
//! [`ScriptedProvider::set_dual`], it is a vendor that keeps several keys live: `create` adds one,
//! `revoke` retires one by id, every live key authenticates.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use secrecy::ExposeSecret;

use crate::clock::Clock;
use crate::config::Overlap;
use crate::provider::{AuthIdentity, KeyStatus, ProviderError, Regenerated, Revoked};
use crate::secret::Secret;

/// A provider operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Status,
    Regenerate,
    AuthCheck,
    Create,
    Revoke,
    List,
}

/// What the next call of an operation does instead of answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Refused before it could act (connection refused).
    Transient,
    /// A regenerate whose outcome is unknown (timeout, 5xx): the portal did NOT rotate.
    Ambiguous,
    /// The portal rotates, then the response is lost (a reset after commit).
    Lose,
    /// 429 with this Retry-After.
    RateLimited(Duration),
    /// 401 on the management credential.
    Auth,
    /// A 4xx retrying will not fix.
    Permanent,
    /// Answers normally after this long (tokio time), with the state as it is then.
    Delay(Duration),
    /// An auth check answers 401/403: the secret does not authenticate (whatever it is).
    Refuses,
    /// Answers with the state as it is now, delivered this much later (a slow network): the answer
    /// may be stale by the time it arrives.
    Late(Duration),
}

/// What the next call of an operation does: a scripted fault, or an error a real client returned.
#[derive(Debug, Clone)]
enum Injected {
    Fault(Fault),
    /// Returns this very error; `rotates`: the portal rotated before the answer went wrong (a
    /// regenerate whose response was lost, cut off or unreadable after the portal committed).
    Error {
        error: ProviderError,
        rotates: bool,
    },
}

/// Runs when an operation is called, before it answers (a test changes the world at that moment).
type Cue = Box<dyn Fn() + Send + Sync>;

struct State {
    key_id: String,
    secret: String,
    seq: u32,
    active: bool,
    account_id: Option<String>,
    last_rotated: Option<chrono::DateTime<chrono::Utc>>,
    generated_by: Option<String>,
    faults: HashMap<Op, VecDeque<Injected>>,
    cues: HashMap<Op, Cue>,
    calls: HashMap<Op, u32>,
    /// Regenerate calls that rotated the key (whether the answer arrived or not).
    regenerations: u32,
    /// Rotations done out of band (in the portal's UI).
    out_of_band: u32,
    issued: Vec<String>,
    has_status: bool,
    has_auth_check: bool,
    /// A vendor with two live keys: `live` holds every key not revoked, oldest first.
    dual: bool,
    has_list: bool,
    live: Vec<(String, String)>,
    revoked: Vec<String>,
}

pub struct ScriptedProvider {
    name: String,
    expected_account: Option<String>,
    clock: Clock,
    state: Mutex<State>,
}

impl ScriptedProvider {
    /// A portal whose active key is `<name>-secret-0` (id `<name>-key-0`), account `acct`.
    pub fn new(name: &str, clock: Clock) -> ScriptedProvider {
        ScriptedProvider {
            name: name.to_string(),
            expected_account: Some("acct".into()),
            clock,
            state: Mutex::new(State {
                key_id: format!("{name}-key-0"),
                secret: format!("{name}-secret-0"),
                seq: 0,
                active: true,
                account_id: Some("acct".into()),
                last_rotated: None,
                generated_by: Some("role:test".into()),
                faults: HashMap::new(),
                cues: HashMap::new(),
                calls: HashMap::new(),
                regenerations: 0,
                out_of_band: 0,
                issued: vec![format!("{name}-secret-0")],
                has_status: true,
                has_auth_check: true,
                dual: false,
                has_list: true,
                live: vec![(format!("{name}-key-0"), format!("{name}-secret-0"))],
                revoked: Vec::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn expected_account(&self) -> Option<&str> {
        self.expected_account.as_deref()
    }

    /// The next `n` calls of `op` fail with `fault`.
    pub fn fail(&self, op: Op, n: usize, fault: Fault) {
        let mut s = self.state();
        let q = s.faults.entry(op).or_default();
        for _ in 0..n {
            q.push_back(Injected::Fault(fault));
        }
    }

    /// From now on a vendor that keeps several keys live (`overlap = "dual"`).
    pub fn set_dual(&self) {
        self.state().dual = true;
    }

    pub fn without_list(&self) {
        self.state().has_list = false;
    }

    /// Ids of the keys not revoked, oldest first (dual only).
    pub fn live_ids(&self) -> Vec<String> {
        self.state().live.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Ids revoked so far, in order (dual only).
    pub fn revoked(&self) -> Vec<String> {
        self.state().revoked.clone()
    }

    /// Whether `secret` authenticates now: the active key, or (dual) any live one.
    pub fn accepts(&self, secret: &str) -> bool {
        let s = self.state();
        if s.dual {
            s.live.iter().any(|(_, v)| v == secret)
        } else {
            s.secret == secret
        }
    }

    /// The next `n` calls of `op` return `error` (an error a real client returned for a fault);
    /// with `rotates`, a regenerate rotates the key before failing.
    pub fn fail_with(&self, op: Op, n: usize, error: ProviderError, rotates: bool) {
        let mut s = self.state();
        let q = s.faults.entry(op).or_default();
        for _ in 0..n {
            q.push_back(Injected::Error {
                error: error.clone(),
                rotates,
            });
        }
    }

    /// The next `n` calls of `op` answer normally (ahead of faults queued after them).
    pub fn pass(&self, op: Op, n: usize) {
        self.fail(op, n, Fault::Delay(Duration::ZERO));
    }

    /// `cue` runs at every call of `op`, before it answers.
    pub fn on_call(&self, op: Op, cue: impl Fn() + Send + Sync + 'static) {
        self.state().cues.insert(op, Box::new(cue));
    }

    pub fn without_status(&self) {
        self.state().has_status = false;
    }

    pub fn without_auth_check(&self) {
        self.state().has_auth_check = false;
    }

    pub fn set_active(&self, active: bool) {
        self.state().active = active;
    }

    pub fn set_account(&self, account: &str) {
        self.state().account_id = Some(account.to_string());
    }

    /// Someone rotates in the portal's UI: the key keyrotd knows dies.
    pub fn rotate_out_of_band(&self) -> String {
        let mut s = self.state();
        Self::rotate(&mut s, &self.name, self.clock.now());
        s.regenerations -= 1;
        s.out_of_band += 1;
        s.generated_by = Some("user:someone".into());
        s.secret.clone()
    }

    fn rotate(s: &mut State, name: &str, now: chrono::DateTime<chrono::Utc>) {
        s.seq += 1;
        s.key_id = format!("{name}-key-{}", s.seq);
        s.secret = format!("{name}-secret-{}-{}", s.seq, uuid::Uuid::new_v4().simple());
        s.last_rotated = Some(now);
        s.regenerations += 1;
        s.issued.push(s.secret.clone());
        let (id, secret) = (s.key_id.clone(), s.secret.clone());
        if s.dual {
            s.live.push((id, secret));
        } else {
            s.live = vec![(id, secret)];
        }
    }

    /// Rotations done out of band.
    pub fn out_of_band(&self) -> u32 {
        self.state().out_of_band
    }

    pub fn key_id(&self) -> String {
        self.state().key_id.clone()
    }

    pub fn secret(&self) -> String {
        self.state().secret.clone()
    }

    /// Regenerates that rotated the key.
    pub fn regenerations(&self) -> u32 {
        self.state().regenerations
    }

    /// Calls of `op` so far.
    pub fn calls(&self, op: Op) -> u32 {
        self.state().calls.get(&op).copied().unwrap_or(0)
    }

    /// Every secret this portal ever issued (for leak checks).
    pub fn issued(&self) -> Vec<String> {
        self.state().issued.clone()
    }

    pub fn has_status(&self) -> bool {
        self.state().has_status
    }

    pub fn has_auth_check(&self) -> bool {
        self.state().has_auth_check
    }

    /// Counts the call and takes its next fault; a `Delay` is waited here. A `Late` comes back as
    /// the time to wait after answering.
    async fn enter(&self, op: Op) -> (Option<Injected>, Duration) {
        let injected = {
            let mut s = self.state();
            *s.calls.entry(op).or_default() += 1;
            s.faults.get_mut(&op).and_then(|q| q.pop_front())
        };
        // The cue runs outside the lock: it may call back into this provider.
        let cue = self.state().cues.remove(&op);
        if let Some(cue) = cue {
            cue();
            self.state().cues.entry(op).or_insert(cue);
        }
        match injected {
            Some(Injected::Fault(Fault::Delay(d))) => {
                tokio::time::sleep(d).await;
                (None, Duration::ZERO)
            }
            Some(Injected::Fault(Fault::Late(d))) => (None, d),
            f => (f, Duration::ZERO),
        }
    }

    /// The error an injected fault answers with.
    fn injected_error(&self, op: Op, injected: Injected) -> ProviderError {
        match injected {
            Injected::Fault(f) => self.error(op, f),
            Injected::Error { error, .. } => error,
        }
    }

    async fn deliver<T>(answer: T, late: Duration) -> T {
        if !late.is_zero() {
            tokio::time::sleep(late).await;
        }
        answer
    }

    fn error(&self, op: Op, fault: Fault) -> ProviderError {
        let provider = self.name.clone();
        let operation = match op {
            Op::Status => "status",
            Op::Regenerate => "regenerate",
            Op::AuthCheck => "auth_check",
            Op::Create => "create",
            Op::Revoke => "revoke",
            Op::List => "list",
        };
        match fault {
            Fault::Auth => ProviderError::Auth {
                provider,
                operation,
                status: 401,
            },
            // As the real clients do, with the default `max_retry_after`.
            Fault::RateLimited(retry_after) => ProviderError::RateLimited {
                provider,
                operation,
                retry_after: crate::backoff::cap_retry_after(
                    retry_after,
                    crate::backoff::DEFAULT_MAX_RETRY_AFTER,
                ),
            },
            Fault::Permanent => ProviderError::Permanent {
                provider,
                operation,
                message: "HTTP 400".into(),
            },
            Fault::Ambiguous | Fault::Lose if matches!(op, Op::Regenerate | Op::Create) => {
                ProviderError::Ambiguous {
                    provider,
                    operation,
                    message: "connection reset".into(),
                }
            }
            _ => ProviderError::Transient {
                provider,
                operation,
                message: "connection refused".into(),
            },
        }
    }

    pub async fn status(&self) -> Result<KeyStatus, ProviderError> {
        let (fault, late) = self.enter(Op::Status).await;
        if let Some(f) = fault {
            return Err(self.injected_error(Op::Status, f));
        }
        let answer = {
            let s = self.state();
            KeyStatus {
                active: s.active,
                key_id: s.key_id.clone(),
                account_id: s.account_id.clone(),
                first_generated: None,
                last_rotated: s.last_rotated,
                generated_by: s.generated_by.clone(),
            }
        };
        Ok(Self::deliver(answer, late).await)
    }

    pub async fn regenerate(&self) -> Result<Regenerated, ProviderError> {
        let (fault, late) = self.enter(Op::Regenerate).await;
        match fault {
            Some(Injected::Fault(Fault::Lose)) => {
                let mut s = self.state();
                Self::rotate(&mut s, &self.name, self.clock.now());
                return Err(self.error(Op::Regenerate, Fault::Lose));
            }
            Some(Injected::Error {
                error,
                rotates: true,
            }) => {
                let mut s = self.state();
                Self::rotate(&mut s, &self.name, self.clock.now());
                return Err(error);
            }
            Some(f) => return Err(self.injected_error(Op::Regenerate, f)),
            None => {}
        }
        let answer = {
            let mut s = self.state();
            Self::rotate(&mut s, &self.name, self.clock.now());
            s.generated_by = Some("role:rotation-bot".into());
            Regenerated {
                key_id: s.key_id.clone(),
                secret: Secret::from(s.secret.clone()),
                last_rotated: s.last_rotated,
                generated_by: s.generated_by.clone(),
            }
        };
        Ok(Self::deliver(answer, late).await)
    }

    pub async fn auth_check(&self, secret: &Secret) -> Result<Option<AuthIdentity>, ProviderError> {
        let (fault, late) = self.enter(Op::AuthCheck).await;
        match fault {
            Some(Injected::Fault(Fault::Refuses)) => return Ok(None),
            Some(f) => return Err(self.injected_error(Op::AuthCheck, f)),
            None => {}
        }
        let answer = {
            let s = self.state();
            let value = secret.expose_secret();
            let key_id = if s.dual {
                s.live.iter().find(|(_, v)| v == value).map(|(id, _)| id)
            } else {
                (value == s.secret).then_some(&s.key_id)
            };
            key_id.map(|id| AuthIdentity {
                account_id: s.account_id.clone(),
                key_id: Some(id.clone()),
            })
        };
        Ok(Self::deliver(answer, late).await)
    }

    pub fn overlap(&self) -> Overlap {
        if self.state().dual {
            Overlap::Dual
        } else {
            Overlap::None
        }
    }

    pub fn has_list(&self) -> bool {
        let s = self.state();
        s.dual && s.has_list
    }

    /// A second live key; the old ones stay valid. `Lose` creates it and loses the answer.
    pub async fn create(&self) -> Result<Regenerated, ProviderError> {
        let (fault, late) = self.enter(Op::Create).await;
        match fault {
            Some(Injected::Fault(Fault::Lose)) => {
                let mut s = self.state();
                Self::rotate(&mut s, &self.name, self.clock.now());
                return Err(self.error(Op::Create, Fault::Lose));
            }
            Some(Injected::Error {
                error,
                rotates: true,
            }) => {
                let mut s = self.state();
                Self::rotate(&mut s, &self.name, self.clock.now());
                return Err(error);
            }
            Some(f) => return Err(self.injected_error(Op::Create, f)),
            None => {}
        }
        let answer = {
            let mut s = self.state();
            Self::rotate(&mut s, &self.name, self.clock.now());
            Regenerated {
                key_id: s.key_id.clone(),
                secret: Secret::from(s.secret.clone()),
                last_rotated: s.last_rotated,
                generated_by: None,
            }
        };
        Ok(Self::deliver(answer, late).await)
    }

    /// Retires `key_id`; the newest remaining key is the one the status reports.
    pub async fn revoke(&self, key_id: &str) -> Result<Revoked, ProviderError> {
        let (fault, late) = self.enter(Op::Revoke).await;
        if let Some(f) = fault {
            return Err(self.injected_error(Op::Revoke, f));
        }
        let answer = {
            let mut s = self.state();
            let before = s.live.len();
            s.live.retain(|(id, _)| id != key_id);
            if s.live.len() == before {
                Revoked::AlreadyGone
            } else {
                s.revoked.push(key_id.to_string());
                if let Some((id, secret)) = s.live.last().cloned() {
                    (s.key_id, s.secret) = (id, secret);
                }
                Revoked::Now
            }
        };
        Ok(Self::deliver(answer, late).await)
    }

    pub async fn list(&self) -> Result<Vec<String>, ProviderError> {
        let (fault, late) = self.enter(Op::List).await;
        if let Some(f) = fault {
            return Err(self.injected_error(Op::List, f));
        }
        let answer = self.live_ids();
        Ok(Self::deliver(answer, late).await)
    }
}
