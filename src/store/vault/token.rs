//! The store's Vault token over the daemon's lifetime: where it comes from, when it is replaced,
//! and the renewal that keeps it valid.
//!
//! - A configured token is used as it is. When it came from `{ file = ... }` (a Vault Agent sink),
//!   the file is checked before every request and read again when it changed, and read again after
//!   a 403 in case the agent has just written a new one.
//! - AppRole logs in on first use, and logs in again only when the token is dead: after a 403,
//!   `lookup-self` tells a dead token (403 again) from a policy refusal on one path (it answers).
//!   A policy 403 therefore never spends a `secret_id` use.
//! - [`maintain`] runs in a task the store owns: it looks the token up, renews a renewable one
//!   (`renew-self`) at about 2/3 of its TTL, and keeps the [`CredentialStatus`] the store reports.
//!   It holds only a `Weak` to the store and a cancellation token the store cancels on drop, so a
//!   configuration reload that drops the store ends it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::wire::{self, LookupSelf, RenewSelf, RenewedLease, TokenLookup, Wire};
use crate::config::VaultAuth;
use crate::http_client::sensitive_header;
use crate::secret::{Secret, SecretRef};
use crate::store::{CredentialStatus, StoreError, StoreErrorKind};

/// Longest sleep of the maintenance task: a token that needs nothing is still looked at this often
/// (a replaced token file, a status to refresh).
const IDLE: Duration = Duration::from_secs(300);
/// How often a token file is looked at when nothing else is due.
const FILE_CHECK: Duration = Duration::from_secs(30);
/// Retry delay after a failed renewal or lookup, at most.
const RETRY: Duration = Duration::from_secs(30);

/// How the store authenticates.
enum Method {
    /// A token from config; `file` when it came from `{ file = ... }`.
    Token { file: Option<PathBuf> },
    AppRole {
        role_id: Secret,
        secret_id: Secret,
        mount: String,
    },
}

/// A token file as last seen: a change in any of these means "read it again".
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

struct Held {
    /// Bumped at every new token, so concurrent callers that all saw a 403 replace it only once
    /// and the maintenance task knows to look the new one up.
    generation: u64,
    token: Option<Secret>,
    stamp: Option<FileStamp>,
}

/// The token in force, how to get a new one, and what is known of its lifetime.
pub struct Credential {
    store: String,
    method: Method,
    held: tokio::sync::Mutex<Held>,
    status: Mutex<Option<CredentialStatus>>,
    /// Woken when a new token is in place, so the maintenance task looks it up at once.
    pub changed: Arc<Notify>,
}

impl Credential {
    pub fn new(store: &str, auth: &VaultAuth, token_file: Option<PathBuf>) -> Credential {
        let (method, token) = match auth {
            VaultAuth::Token(t) => (Method::Token { file: token_file }, Some(t.clone())),
            VaultAuth::AppRole {
                role_id,
                secret_id,
                mount,
            } => (
                Method::AppRole {
                    role_id: role_id.clone(),
                    secret_id: secret_id.clone(),
                    mount: mount.trim_matches('/').to_string(),
                },
                None,
            ),
        };
        let stamp = match &method {
            Method::Token { file: Some(f) } => stamp(f),
            _ => None,
        };
        Credential {
            store: store.to_string(),
            method,
            held: tokio::sync::Mutex::new(Held {
                generation: 1,
                token,
                stamp,
            }),
            status: Mutex::new(None),
            changed: Arc::new(Notify::new()),
        }
    }

    pub fn status(&self) -> Option<CredentialStatus> {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_status(&self, f: impl FnOnce(&mut Option<CredentialStatus>)) {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn replaceable(&self) -> bool {
        matches!(self.method, Method::AppRole { .. })
    }

    fn err(&self, kind: StoreErrorKind, target: &str, message: String) -> StoreError {
        StoreError {
            kind,
            store: self.store.clone(),
            target: target.to_string(),
            message,
        }
    }

    /// The token to send now (generation, token): the token file's new content if it changed, an
    /// AppRole login if there is no token yet.
    pub async fn token(&self, wire: &Wire, target: &str) -> Result<(u64, Secret), StoreError> {
        let mut held = self.held.lock().await;
        self.reread_file(&mut held, target, false)?;
        if let Some(t) = &held.token {
            return Ok((held.generation, t.clone()));
        }
        self.login(wire, target, &mut held).await
    }

    /// The current token without logging in (the maintenance task must not spend a `secret_id`
    /// use on an idle store).
    async fn peek(&self, target: &str) -> Option<(u64, Secret)> {
        let mut held = self.held.lock().await;
        let _ = self.reread_file(&mut held, target, false);
        let token = held.token.clone()?;
        Some((held.generation, token))
    }

    /// After a 403 with the token of generation `seen`: a token worth one more try, or `None` when
    /// the 403 stands (a policy refusal, or no way to get another token).
    pub async fn after_forbidden(
        &self,
        wire: &Wire,
        target: &str,
        seen: u64,
    ) -> Result<Option<(u64, Secret)>, StoreError> {
        let mut held = self.held.lock().await;
        if held.generation != seen
            && let Some(t) = &held.token
        {
            return Ok(Some((held.generation, t.clone())));
        }
        match &self.method {
            Method::Token { file: Some(_) } => {
                let before = held.generation;
                self.reread_file(&mut held, target, true)?;
                Ok((held.generation != before)
                    .then(|| held.token.clone().map(|t| (held.generation, t)))
                    .flatten())
            }
            Method::Token { file: None } => Ok(None),
            Method::AppRole { .. } => {
                let Some(token) = held.token.clone() else {
                    return self.login(wire, target, &mut held).await.map(Some);
                };
                match self.lookup(wire, target, &token).await {
                    // The token is alive: the 403 is about the path. Logging in would not help and
                    // would spend a `secret_id` use.
                    Ok(_) => Ok(None),
                    Err(e) if e.kind == StoreErrorKind::Auth => {
                        tracing::info!(store = %self.store, "Vault token expired or revoked; logging in again with AppRole.");
                        self.login(wire, target, &mut held).await.map(Some)
                    }
                    Err(_) => Ok(None),
                }
            }
        }
    }

    /// Reads the token file again when it changed (or always, with `force`); a new token bumps the
    /// generation.
    fn reread_file(&self, held: &mut Held, target: &str, force: bool) -> Result<(), StoreError> {
        let Method::Token { file: Some(path) } = &self.method else {
            return Ok(());
        };
        let now = stamp(path);
        if !force && now == held.stamp {
            return Ok(());
        }
        held.stamp = now;
        let token = SecretRef::File(path.clone())
            .resolve()
            .map_err(|e| self.err(StoreErrorKind::Auth, target, format!("token file: {e}")))?;
        let same = held.token.as_ref().is_some_and(|t| {
            use secrecy::ExposeSecret;
            t.expose_secret() == token.expose_secret()
        });
        if !same {
            if sensitive_header("", &token).is_none() {
                return Err(self.err(
                    StoreErrorKind::Auth,
                    target,
                    format!(
                        "token file {} holds characters an HTTP header cannot carry",
                        path.display()
                    ),
                ));
            }
            tracing::info!(store = %self.store, file = %path.display(), "Vault token file changed; using the new token.");
            held.token = Some(token);
            held.generation += 1;
            self.changed.notify_one();
        }
        Ok(())
    }

    async fn login(
        &self,
        wire: &Wire,
        target: &str,
        held: &mut Held,
    ) -> Result<(u64, Secret), StoreError> {
        let Method::AppRole {
            role_id,
            secret_id,
            mount,
        } = &self.method
        else {
            return Err(self.err(
                StoreErrorKind::Auth,
                target,
                "no Vault token configured".into(),
            ));
        };
        let what = format!("AppRole login at auth/{mount}");
        let result = self.login_once(wire, mount, role_id, secret_id).await;
        let (token, lease) = match result {
            Ok(Some(got)) => got,
            Ok(None) => {
                let e = self.err(
                    StoreErrorKind::Auth,
                    target,
                    format!("{what} returned no client token"),
                );
                return Err(self.login_failed(e));
            }
            Err(e) => {
                let mut e = wire.error(target, &what, &e);
                if matches!(e.kind, StoreErrorKind::Permanent | StoreErrorKind::NotFound) {
                    // A rejected role_id/secret_id answers 400; retrying will not fix credentials.
                    e.kind = StoreErrorKind::Auth;
                }
                return Err(self.login_failed(e));
            }
        };
        if sensitive_header("", &token).is_none() {
            let e = self.err(
                StoreErrorKind::Auth,
                target,
                format!("{what} returned a token an HTTP header cannot carry"),
            );
            return Err(self.login_failed(e));
        }
        held.token = Some(token.clone());
        held.generation += 1;
        self.set_status(|s| *s = Some(lease_status(&lease, true, None)));
        self.changed.notify_one();
        Ok((held.generation, token))
    }

    async fn login_once(
        &self,
        wire: &Wire,
        mount: &str,
        role_id: &Secret,
        secret_id: &Secret,
    ) -> Result<Option<(Secret, RenewedLease)>, rustify::errors::ClientError> {
        use secrecy::ExposeSecret;
        let endpoint = vaultrs::api::auth::approle::requests::LoginWithApproleRequest {
            mount: mount.to_string(),
            role_id: role_id.expose_secret().to_string(),
            secret_id: secret_id.expose_secret().to_string(),
        };
        let result = wire.send(&endpoint, None).await?;
        drop(endpoint);
        wire::login_token(&result)
    }

    fn login_failed(&self, e: StoreError) -> StoreError {
        self.set_status(|s| {
            if let Some(s) = s {
                s.renew_failed = true;
            }
        });
        e
    }

    /// `lookup-self` with `token`; the answer updates the reported status.
    pub async fn lookup(
        &self,
        wire: &Wire,
        target: &str,
        token: &Secret,
    ) -> Result<TokenLookup, StoreError> {
        let what = "token lookup-self";
        let result = wire
            .send(&LookupSelf, Some(token))
            .await
            .and_then(|r| wire::data(&r))
            .map_err(|e| wire.error(target, what, &e))?;
        let lookup = result.ok_or_else(|| {
            self.err(
                StoreErrorKind::Permanent,
                target,
                format!("{what}: Vault's answer has no data"),
            )
        })?;
        let replaceable = self.replaceable();
        self.set_status(|s| *s = Some(lookup_status(&lookup, replaceable)));
        Ok(lookup)
    }
}

impl Credential {
    /// Records what a `lookup-self` made elsewhere (the preflight) said of the token.
    pub fn observed(&self, lookup: &TokenLookup) {
        let replaceable = self.replaceable();
        self.set_status(|s| *s = Some(lookup_status(lookup, replaceable)));
    }
}

/// The status of a token as `lookup-self` describes it.
fn lookup_status(l: &TokenLookup, replaceable: bool) -> CredentialStatus {
    let now = Utc::now();
    let max_expires_at = (l.explicit_max_ttl > 0)
        .then(|| DateTime::from_timestamp(l.creation_time as i64 + l.explicit_max_ttl as i64, 0))
        .flatten();
    CredentialStatus {
        expires_at: (l.ttl > 0).then(|| now + chrono::Duration::seconds(l.ttl as i64)),
        max_expires_at,
        renewable: replaceable || (l.ttl > 0 && l.renewable.unwrap_or(false)),
        renew_failed: false,
    }
}

fn lease_status(
    lease: &RenewedLease,
    replaceable: bool,
    max_expires_at: Option<DateTime<Utc>>,
) -> CredentialStatus {
    CredentialStatus {
        expires_at: (lease.lease_duration > 0)
            .then(|| Utc::now() + chrono::Duration::seconds(lease.lease_duration as i64)),
        max_expires_at,
        renewable: replaceable || lease.renewable,
        renew_failed: false,
    }
}

/// What the maintenance task knows of the token in force.
struct Lease {
    generation: u64,
    obtained: Instant,
    ttl: Duration,
    /// What a renewal should give back: the period or creation TTL. Less means a max TTL caps it.
    renew_to: u64,
    renewable: bool,
    max_expires_at: Option<DateTime<Utc>>,
}

/// The maintenance task: runs until `stop` is cancelled or the store is gone.
pub async fn maintain(store: Weak<super::Inner>, changed: Arc<Notify>, stop: CancellationToken) {
    let mut lease: Option<Lease> = None;
    loop {
        let wait = {
            let Some(inner) = store.upgrade() else { return };
            tokio::select! {
                _ = stop.cancelled() => return,
                wait = step(&inner.credential, &inner.wire, &mut lease) => wait,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = changed.notified() => {}
        }
    }
}

/// One look at the token: a lookup when it is new to us, a renewal when one is due. Returns how
/// long to wait before the next look.
async fn step(cred: &Credential, wire: &Wire, lease: &mut Option<Lease>) -> Duration {
    let target = "auth/token";
    let Some((generation, token)) = cred.peek(target).await else {
        return IDLE;
    };
    let idle = match cred.method {
        Method::Token { file: Some(_) } => FILE_CHECK,
        _ => IDLE,
    };
    if lease.as_ref().is_none_or(|l| l.generation != generation) {
        match cred.lookup(wire, target, &token).await {
            Ok(l) => {
                *lease = Some(Lease {
                    generation,
                    obtained: Instant::now(),
                    ttl: Duration::from_secs(l.ttl),
                    renew_to: l.period.filter(|p| *p > 0).unwrap_or(l.creation_ttl),
                    renewable: l.renewable.unwrap_or(false),
                    max_expires_at: cred.status().and_then(|s| s.max_expires_at),
                });
            }
            Err(e) => return token_trouble(cred, wire, target, generation, &e).await,
        }
    }
    let Some(l) = lease.as_mut() else {
        return RETRY;
    };
    if l.ttl.is_zero() {
        return idle;
    }
    let due = l.obtained + l.ttl * 2 / 3;
    let now = Instant::now();
    if now < due {
        return (due - now).min(idle);
    }
    if !l.renewable {
        // Nothing to do but report it; look again when it has expired.
        let end = l.obtained + l.ttl;
        return end
            .saturating_duration_since(now)
            .max(Duration::from_secs(1))
            .min(idle);
    }
    renew(cred, wire, target, &token, l).await.min(idle)
}

async fn renew(
    cred: &Credential,
    wire: &Wire,
    target: &str,
    token: &Secret,
    l: &mut Lease,
) -> Duration {
    let result = wire
        .send(&RenewSelf, Some(token))
        .await
        .and_then(|r| r.parse());
    match result {
        Ok(r) => {
            l.obtained = Instant::now();
            l.ttl = Duration::from_secs(r.auth.lease_duration);
            // Vault grants less than asked once a max TTL is near: the end is then final.
            let capped = r.auth.lease_duration + 2 < l.renew_to;
            l.renewable = r.auth.renewable && !capped;
            let replaceable = cred.replaceable();
            let lease = RenewedLease {
                lease_duration: r.auth.lease_duration,
                renewable: l.renewable,
            };
            cred.set_status(|s| *s = Some(lease_status(&lease, replaceable, l.max_expires_at)));
            tracing::debug!(store = %cred.store, ttl_seconds = r.auth.lease_duration, capped, "Vault token renewed.");
            if l.ttl.is_zero() { IDLE } else { l.ttl * 2 / 3 }
        }
        Err(e) => {
            let e = wire.error(target, "token renew-self", &e);
            let generation = l.generation;
            let remaining = (l.obtained + l.ttl).saturating_duration_since(Instant::now());
            let wait = token_trouble(cred, wire, target, generation, &e).await;
            wait.min(remaining / 4).max(Duration::from_secs(1))
        }
    }
}

/// A lookup or renewal failed. A dead AppRole token is dropped, so the next request logs in; any
/// other failure is reported (status and a warning) and retried soon.
async fn token_trouble(
    cred: &Credential,
    _wire: &Wire,
    _target: &str,
    generation: u64,
    e: &StoreError,
) -> Duration {
    if e.kind == StoreErrorKind::Auth && cred.replaceable() {
        let mut held = cred.held.lock().await;
        if held.generation == generation {
            held.token = None;
            held.generation += 1;
        }
        return IDLE;
    }
    // A refused token no longer works at all: it has lapsed now.
    let dead = (e.kind == StoreErrorKind::Auth).then(Utc::now);
    cred.set_status(|s| {
        let s = s.get_or_insert(CredentialStatus {
            expires_at: None,
            max_expires_at: None,
            renewable: false,
            renew_failed: true,
        });
        s.renew_failed = true;
        if dead.is_some() {
            s.expires_at = dead;
        }
    });
    tracing::warn!(store = %cred.store, error = %e, "Vault token could not be looked up or renewed; it lapses at its expiry unless this clears.");
    RETRY
}
