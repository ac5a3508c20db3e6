//! Keys being looked at by a periodic loop (reconcile, the recovery tick), across its rounds.
//!
//! A look reads the provider and the destinations, and one key's look can take long: a provider that
//! hangs until its timeout, a `Retry-After` honoured up to its cap. Such a key must not hold up the
//! others, nor the next round: each look runs as a task of its own, at most `concurrency` at once,
//! and a round skips a key whose look from an earlier round is still running.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Looks {
    running: Mutex<HashSet<String>>,
    permits: Arc<Semaphore>,
}

impl Looks {
    pub fn new(concurrency: usize) -> Looks {
        Looks {
            running: Mutex::new(HashSet::new()),
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// Starts `look` for `key` as a task of its own, once one of the `concurrency` slots is free
    /// (this waits for it). `None` when the key's previous look is still running (skipped) or at
    /// shutdown; a look still running at shutdown is dropped (it only reads; a repair it started
    /// is a rotation of its own).
    pub async fn start(
        self: &Arc<Self>,
        key: &str,
        shutdown: &CancellationToken,
        look: impl Future<Output = ()> + Send + 'static,
    ) -> Option<JoinHandle<()>> {
        if !self.lock().insert(key.to_string()) {
            tracing::debug!(
                key,
                "Still being looked at since an earlier round: skipped."
            );
            return None;
        }
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => None,
            p = self.permits.clone().acquire_owned() => p.ok(),
        };
        let Some(permit) = permit else {
            self.lock().remove(key);
            return None;
        };
        let (looks, key, shutdown) = (self.clone(), key.to_string(), shutdown.clone());
        Some(tokio::spawn(async move {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {}
                () = look => {}
            }
            looks.lock().remove(&key);
            drop(permit);
        }))
    }

    /// Whether `key`'s look is running.
    pub fn running(&self, key: &str) -> bool {
        self.lock().contains(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_still_looked_at_is_skipped_and_holds_no_other_up() {
        let looks = Arc::new(Looks::new(2));
        let shutdown = CancellationToken::new();
        let (release, hold) = tokio::sync::oneshot::channel::<()>();
        let stuck = looks
            .start("stuck", &shutdown, async move {
                let _ = hold.await;
            })
            .await
            .expect("started");
        // The next round: the stuck key is skipped, another key's look runs to its end meanwhile.
        assert!(looks.start("stuck", &shutdown, async {}).await.is_none());
        let other = looks
            .start("other", &shutdown, async {})
            .await
            .expect("started");
        other.await.unwrap();
        assert!(!looks.running("other") && looks.running("stuck"));
        let _ = release.send(());
        stuck.await.unwrap();
        assert!(!looks.running("stuck"));
        assert!(looks.start("stuck", &shutdown, async {}).await.is_some());
    }

    #[tokio::test]
    async fn shutdown_ends_a_look_and_frees_its_key() {
        let looks = Arc::new(Looks::new(1));
        let shutdown = CancellationToken::new();
        let hung = looks
            .start("k", &shutdown, std::future::pending())
            .await
            .expect("started");
        shutdown.cancel();
        hung.await.unwrap();
        assert!(!looks.running("k"));
        assert!(looks.start("k", &shutdown, async {}).await.is_none());
    }
}
