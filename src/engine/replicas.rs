//! Several replicas (docs/replicas.md): each round of the coordinator renews this replica's lease and
//! moves keys; a key taken here is recovered from its journal exactly as after a restart, a key that
//! went elsewhere stops being worked on here.

use std::sync::Arc;

use super::{Engine, recovery};
use crate::coordination::Change;

/// One coordination round. Returns the keys gained and lost.
pub async fn round(engine: &Arc<Engine>) -> (Vec<String>, Vec<String>) {
    let Some(c) = engine.coordination.clone() else {
        return (Vec::new(), Vec::new());
    };
    let keys = engine.key_names();
    let changes = c.tick(&keys, |k| engine.is_busy(k)).await;
    let (mut gained, mut lost) = (Vec::new(), Vec::new());
    for change in changes {
        match change {
            Change::Gained { key, journal, from } => {
                engine.gain(&key, *journal).await;
                if let Some(from) = &from {
                    tracing::warn!(key = %key, from = %from, "Took the key over from a replica whose lease expired.");
                }
                gained.push(key);
            }
            Change::Lost { key } => {
                engine.lose(&key);
                lost.push(key);
            }
        }
    }
    // Once the start-up scan is over, a key taken now is recovered at once (before, the scan does it).
    if engine.is_started() {
        for key in &gained {
            let (engine, key) = (engine.clone(), key.clone());
            engine.clone().tasks.spawn(async move {
                let config = engine.config();
                if let Some(k) = config.key(&key) {
                    recovery::recover_key(&engine, k, true).await;
                }
            });
        }
    }
    (gained, lost)
}

/// Runs rounds every renewal interval until shutdown.
pub async fn run(engine: Arc<Engine>) {
    let Some(c) = engine.coordination.clone() else {
        return;
    };
    loop {
        tokio::select! {
            _ = engine.shutdown.cancelled() => return,
            _ = tokio::time::sleep(c.renew_interval()) => {}
        }
        round(&engine).await;
    }
}
