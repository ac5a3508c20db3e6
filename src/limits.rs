//! Bounded pressure on what keyrotd calls: each provider and each store is wrapped in a [`Limited`]
//! that lets at most N requests run at once (`max_concurrent_requests`), and (providers) holds every
//! request back while a 429's `Retry-After` runs. With a thousand keys due at once, a portal, a
//! Vault or an AWS account sees a bounded number of requests, and a provider that asks to slow down
//! slows only the keys that use it.

use std::ops::Deref;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

/// Requests at once to one provider, unless its config says otherwise.
pub const DEFAULT_PROVIDER_REQUESTS: usize = 8;
/// Requests at once to one store, unless its config says otherwise.
pub const DEFAULT_STORE_REQUESTS: usize = 32;

/// A client with a concurrency limit and a cool-down.
pub struct Limited<T> {
    inner: T,
    permits: Semaphore,
    cooldown: Mutex<Option<Instant>>,
}

impl<T> Limited<T> {
    pub fn new(inner: T, max_concurrent: usize) -> Limited<T> {
        Limited {
            inner,
            permits: Semaphore::new(max_concurrent.max(1)),
            cooldown: Mutex::new(None),
        }
    }

    /// Waits for the cool-down to end and for a free slot; the request runs while the permit lives.
    pub async fn enter(&self) -> Option<SemaphorePermit<'_>> {
        loop {
            let until = *self.cooldown.lock().unwrap_or_else(|p| p.into_inner());
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => break,
            }
        }
        self.permits.acquire().await.ok()
    }

    /// Holds every request back for `d` (a 429's `Retry-After`, already capped by the client).
    pub fn cool_down(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut cooldown = self.cooldown.lock().unwrap_or_else(|p| p.into_inner());
        if cooldown.is_none_or(|t| t < until) {
            *cooldown = Some(until);
        }
    }
}

impl<T> Deref for Limited<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_most_n_at_once_and_nothing_during_a_cool_down() {
        let l = std::sync::Arc::new(Limited::new((), 2));
        let a = l.enter().await;
        let _b = l.enter().await;
        let third = tokio::time::timeout(Duration::from_millis(10), l.enter()).await;
        assert!(third.is_err(), "a third request ran beside two");
        drop(a);
        assert!(l.enter().await.is_some());

        let l = Limited::new((), 4);
        l.cool_down(Duration::from_secs(5));
        let start = Instant::now();
        let _p = l.enter().await;
        assert!(start.elapsed() >= Duration::from_secs(5));
    }
}
