//! Regenerate (docs/lifecycle.md, phase 2, and "Ambiguous regenerate"): the destructive call.
//!
//! Each attempt is on disk before it is sent: the journal says `regenerating` with the old key id and
//! the call is in the daily budget (one write, all or nothing — if it cannot be written, nothing is
//! sent). An answer that does not say whether the portal rotated is resolved by re-reading its status.
//! A call known not to have destroyed a key comes off the budget again. No new attempt starts once
//! shutdown has begun.

use tokio::time::Instant;

use super::calls::{self, backoff};
use super::distribute::Ident;
use super::record::EventKind;
use super::rotation::Rotation;
use crate::provider::{KeyStatus, ProviderError, Regenerated};
use crate::secret::{Secret, fingerprint};

/// Attempts of a regenerate that was refused without rotating (5xx with the key unchanged, 429,
/// connection refused) before the rotation ends `failed` with the old key still working.
pub const REGENERATE_ATTEMPTS: u32 = 3;

/// How long shutdown waits for a regenerate that is in flight to answer.
const REGENERATE_IN_FLIGHT: std::time::Duration = std::time::Duration::from_secs(30);

/// A key the portal issued: the secret (held only in memory, zeroized on drop) and its identity.
pub struct Issued {
    pub secret: Secret,
    pub ident: Ident,
}

pub enum Regen {
    Issued(Issued),
    /// The provider rotated but the secret never reached us.
    Lost(String),
    /// The provider did not rotate and will not now (auth, 4xx, retries or budget spent).
    Refused(String),
    /// Ambiguous, and the provider's status could not be read to tell.
    Unknown(String),
    /// Nothing was sent: shutdown began, or the journal could not record the attempt.
    NotSent(String),
}

/// What one attempt's answer means.
enum Step {
    Done(Regen),
    Retry,
}

pub async fn run(r: &Rotation, before: Option<&KeyStatus>) -> Regen {
    let journal = r.slot.journal().await;
    let old_key_id = before
        .map(|s| s.key_id.clone())
        .or_else(|| journal.active_key_id.clone());
    fail::fail_point!("after_preflight");
    r.lease_settled().await;
    let mut attempt = 0;
    loop {
        if r.engine.shutdown.is_cancelled() {
            return Regen::NotSent("keyrotd is shutting down; no regenerate was sent".into());
        }
        let sent_at = r.engine.clock.now();
        if let Some(refusal) = over_budget(r, sent_at).await {
            return refusal;
        }
        // Several replicas: only with a valid lease (the journal's check-and-set write below then
        // proves at the store that no other replica took the key).
        if let Some(c) = &r.engine.coordination
            && let Err(e) = c.may_regenerate_as(&r.key.name, r.tenure)
        {
            return Regen::NotSent(format!("no regenerate without the key's lease: {e}"));
        }
        let meta = &r.meta;
        let recorded = r
            .engine
            .commit_strict(&r.slot, |j| j.attempt(meta, old_key_id.clone(), sent_at))
            .await;
        if let Err(e) = recorded {
            return Regen::NotSent(format!(
                "the journal could not record the regenerate, so it was not sent: {e}"
            ));
        }
        r.show_phase();
        // From here a key may be issued: shutdown waits for this rotation (the bound moves to the
        // response's store_deadline when it answers).
        let provisional = Instant::now() + REGENERATE_IN_FLIGHT + r.key.store_deadline;
        r.engine
            .hold_shutdown(r.meta.rotation_id, Some(provisional));
        fail::fail_point!("before_regenerate");
        // Several replicas: the journal write may have been slow, or this process paused after it
        // (a long GC pause, SIGSTOP) while another replica took the key over. The lease is checked
        // again at the last moment before the request leaves.
        if let Some(c) = &r.engine.coordination
            && let Err(e) = c.may_regenerate_as(&r.key.name, r.tenure)
        {
            not_sent(r, sent_at).await;
            return Regen::NotSent(format!("no regenerate without the key's lease: {e}"));
        }
        let answer = calls::regenerate(
            &r.engine.metrics,
            &r.provider,
            &r.req.reason,
            old_key_id.as_deref(),
        )
        .await;
        let responded = Instant::now();
        match classify(r, answer, before, old_key_id.as_deref(), sent_at, responded).await {
            Step::Done(regen) => return regen,
            Step::Retry => {}
        }
        attempt += 1;
        if attempt >= REGENERATE_ATTEMPTS {
            return Regen::Refused(format!("{attempt} attempts, the provider did not rotate"));
        }
        tokio::select! {
            _ = r.engine.shutdown.cancelled() => {}
            _ = tokio::time::sleep(backoff(attempt)) => {}
        }
    }
}

async fn over_budget(r: &Rotation, now: chrono::DateTime<chrono::Utc>) -> Option<Regen> {
    let j = r.slot.journal().await;
    j.budget_spent(now, r.key.max_regenerations_per_day)
        .then(|| {
            Regen::Refused(format!(
                "regeneration budget exhausted: {} regenerate calls in the last 24h (max_regenerations_per_day = {})",
                j.regenerations_since(now),
                r.key.max_regenerations_per_day
            ))
        })
}

/// The attempt sent at `sent_at` did not destroy a key: off the budget again.
async fn not_sent(r: &Rotation, sent_at: chrono::DateTime<chrono::Utc>) {
    let _ = r.engine.commit(&r.slot, |j| j.not_sent(sent_at)).await;
}

async fn classify(
    r: &Rotation,
    answer: Result<Regenerated, ProviderError>,
    before: Option<&KeyStatus>,
    old_key_id: Option<&str>,
    sent_at: chrono::DateTime<chrono::Utc>,
    responded: Instant,
) -> Step {
    match answer {
        Ok(issued) => Step::Done(Regen::Issued(
            issued_key(r, issued, old_key_id, responded).await,
        )),
        Err(ProviderError::Ambiguous { message, .. }) => {
            r.event(
                EventKind::Ambiguous,
                format!("regenerate outcome unknown ({message}); re-reading status"),
            );
            resolve_ambiguity(r, before, old_key_id, sent_at).await
        }
        Err(ProviderError::RateLimited { retry_after, .. }) => {
            not_sent(r, sent_at).await;
            // The provider's client has already capped it (`max_retry_after`).
            let wait = retry_after;
            r.event(EventKind::RateLimited, format!("waiting {wait:?}"));
            tokio::select! {
                _ = r.engine.shutdown.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            Step::Retry
        }
        Err(ProviderError::Transient { message, .. }) => {
            not_sent(r, sent_at).await;
            r.event(EventKind::Retry, format!("regenerate not sent: {message}"));
            Step::Retry
        }
        Err(e @ (ProviderError::Auth { .. } | ProviderError::Permanent { .. })) => {
            not_sent(r, sent_at).await;
            Step::Done(Regen::Refused(e.to_string()))
        }
    }
}

/// An answer that does not say whether the portal rotated: ask its status.
async fn resolve_ambiguity(
    r: &Rotation,
    before: Option<&KeyStatus>,
    old_key_id: Option<&str>,
    sent_at: chrono::DateTime<chrono::Utc>,
) -> Step {
    if !r.provider.has_status() {
        return Step::Done(Regen::Lost(
            "ambiguous regenerate and no status endpoint: assuming lost".into(),
        ));
    }
    match calls::status_retrying(&r.engine.metrics, &r.provider).await {
        Ok(now) => {
            let rotated = match before {
                Some(b) => now.key_id != b.key_id || now.last_rotated != b.last_rotated,
                None => old_key_id != Some(now.key_id.as_str()),
            };
            r.engine.set_status(&r.slot, &now);
            if rotated {
                return Step::Done(Regen::Lost(format!(
                    "the provider rotated to {} but the response was lost in transit",
                    now.key_id
                )));
            }
            not_sent(r, sent_at).await;
            r.event(
                EventKind::Retry,
                "the provider did not rotate; the old key still works",
            );
            Step::Retry
        }
        Err(e) => Step::Done(Regen::Unknown(format!(
            "regenerate outcome unknown and status unreadable: {e}"
        ))),
    }
}

/// The regenerate answered with a new key: journal `storing` (id and fingerprint only), audit, and
/// remember when the portal says it rotated (the max-age clock restarts now, whatever verify says).
async fn issued_key(
    r: &Rotation,
    issued: Regenerated,
    old_key_id: Option<&str>,
    responded: Instant,
) -> Issued {
    let now = r.engine.clock.now();
    let fp = fingerprint(&issued.secret);
    r.engine.dependents.mask(&issued.secret);
    let ident = Ident {
        key_id: issued.key_id.clone(),
        fingerprint: fp.clone(),
        issued_at: now,
        responded,
    };
    let _ = r
        .engine
        .commit(&r.slot, |j| j.issued(&ident.key_id, &fp, now))
        .await;
    r.show_phase();
    fail::fail_point!("after_regenerate");
    remember_rotation(r, &issued, now);
    let _ = old_key_id; // audited with the distribution, off the outage path
    r.event(
        EventKind::Regenerated,
        format!("new key {} (fingerprint {fp})", ident.key_id),
    );
    Issued {
        secret: issued.secret,
        ident,
    }
}

/// The cached provider status learns the new key id and Last Rotated from the response itself (or the
/// moment of it), so a `max_age` key is not due again because a later status read failed.
fn remember_rotation(r: &Rotation, issued: &Regenerated, now: chrono::DateTime<chrono::Utc>) {
    let last_rotated = issued.last_rotated.unwrap_or(now);
    let mut status = r.slot.live().status.clone().unwrap_or_else(|| KeyStatus {
        active: true,
        key_id: issued.key_id.clone(),
        account_id: None,
        first_generated: None,
        last_rotated: None,
        generated_by: None,
    });
    status.key_id = issued.key_id.clone();
    status.last_rotated = Some(last_rotated);
    if issued.generated_by.is_some() {
        status.generated_by = issued.generated_by.clone();
    }
    r.engine.set_status(&r.slot, &status);
}
