//! The background fill: keeps writing the destinations a degraded rotation could not confirm in time,
//! with the same [`write_and_confirm`] as the rotation, then tells the dependents that were waiting for
//! them. Ends when every destination holds the key, a newer rotation owns the key, shutdown begins, or
//! after an hour (reconcile repairs what is left, copying from a good destination).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::calls::{self, Notice, backoff};
use super::distribute::{Ident, WriteCount, can_tell, write_and_confirm};
use super::record::DestinationView;
use super::rotation::Rotation;
use super::slot::KeySlot;
use super::{Engine, Runtime};
use crate::config::KeyConfig;
use crate::secret::Secret;
use crate::store::{Prepared, WriteRequest};

/// How long the fill keeps trying before leaving the rest to reconcile.
const GIVE_UP_AFTER: Duration = Duration::from_secs(3600);

struct Fill {
    engine: Arc<Engine>,
    rt: Arc<Runtime>,
    key: Arc<KeyConfig>,
    slot: Arc<KeySlot>,
    rotation_id: uuid::Uuid,
    secret: Secret,
    ident: Ident,
    confirmed: Vec<bool>,
}

pub fn spawn(r: &Rotation, secret: Secret, ident: &Ident, confirmed: &[bool]) {
    let fill = Fill {
        engine: r.engine.clone(),
        rt: r.rt.clone(),
        key: r.key.clone(),
        slot: r.slot.clone(),
        rotation_id: r.meta.rotation_id,
        secret,
        ident: ident.clone(),
        confirmed: confirmed.to_vec(),
    };
    use tracing::Instrument;
    let span = tracing::info_span!("background_fill", key = %r.key.name, rotation_id = %r.meta.rotation_id);
    r.engine.tasks.spawn(fill.run().instrument(span));
}

impl Fill {
    async fn run(mut self) {
        let give_up = Instant::now() + GIVE_UP_AFTER;
        let mut attempt = 0;
        while self.confirmed.iter().any(|c| !*c) && Instant::now() < give_up {
            tokio::select! {
                _ = self.engine.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff(attempt).max(Duration::from_secs(1))) => {}
            }
            attempt = (attempt + 1).min(5);
            if !self.still_owns_key().await {
                return;
            }
            self.round().await;
        }
        if self.confirmed.iter().all(|c| *c) {
            self.all_in_sync().await;
        }
    }

    /// A newer rotation (or an adoption) owns the key now: its value must not be overwritten.
    async fn still_owns_key(&self) -> bool {
        let j = self.slot.journal().await;
        let id = Some(self.ident.key_id.as_str());
        j.active_key_id.as_deref() == id || j.new_key_id.as_deref() == id
    }

    /// One attempt at every destination still missing; dependents waiting for one are told.
    async fn round(&mut self) {
        let req = WriteRequest {
            key: &self.key.name,
            rotation_id: self.rotation_id,
            key_id: &self.ident.key_id,
            secret: &self.secret,
            fingerprint: &self.ident.fingerprint,
            rotated_at: self.ident.issued_at,
            fence: self
                .engine
                .coordination
                .as_ref()
                .and_then(|c| c.fence_of(&self.key.name)),
        };
        let count = WriteCount {
            metrics: &self.engine.metrics,
            key: &self.key.name,
            coordination: self.engine.coordination.as_deref(),
        };
        for (i, d) in self.key.destinations.iter().enumerate() {
            if self.confirmed[i] {
                continue;
            }
            let Ok(store) = self.rt.store(&d.store) else {
                continue;
            };
            let deadline = Instant::now() + self.key.store_deadline;
            let none = Prepared::none();
            if write_and_confirm(store, d, &req, &none, deadline, &count)
                .await
                .is_err()
            {
                continue;
            }
            self.confirmed[i] = true;
            tracing::info!(store = %d.store, "Destination filled after the deadline.");
            if let Err(e) = store.after_write(&d.target, &req, &none).await {
                tracing::warn!(store = %d.store, error = %e, "Follow-up after the write failed (value stored; metadata missing).");
            }
            self.tell_waiting(&d.store).await;
        }
    }

    /// Dependents reading from `store` whose destinations are now all confirmed.
    async fn tell_waiting(&self, store: &str) {
        let notice = Notice {
            rotation_id: self.rotation_id,
            key_id: self.ident.key_id.clone(),
            rotated_at: self.ident.issued_at,
            keys: Vec::new(),
        };
        for dep in &self.key.dependents {
            if dep.reads_from.iter().any(|s| s == store)
                && can_tell(&self.key, dep, &self.confirmed)
            {
                calls::call_hook(&self.engine, &self.key, dep, &notice).await;
            }
        }
    }

    async fn all_in_sync(&self) {
        let views = self
            .key
            .destinations
            .iter()
            .map(|d| DestinationView {
                store: d.store.clone(),
                target: d.target.to_string(),
                key_id: Some(self.ident.key_id.clone()),
                fingerprint: Some(self.ident.fingerprint.clone()),
                version: None,
                in_sync: true,
                error: None,
            })
            .collect();
        self.engine.set_destinations(&self.slot, views);
        self.engine.set_drift(&self.slot, false).await;
    }
}
