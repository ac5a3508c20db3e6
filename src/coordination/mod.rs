//! Several replicas on a Vault/OpenBao lease (docs/replicas.md).
//!
//! Each replica renews one **membership** document, `<path>/replicas/<id>`, every ttl/3 with
//! check-and-set: lease traffic grows with replicas, not keys. Keys are spread over the live members
//! by rendezvous hashing. Each key has one **key document**, `<path>/keys/<key>`, holding its holder,
//! its **fencing number** (grows with every take-over) and its journal, written with check-and-set by
//! the holder only. A replica takes a key over when the key hashes to it and its recorded holder is no
//! longer a live member; it then recovers the key from the journal exactly as a restart would.
//!
//! Fencing, before every destructive step:
//! - regenerate: the local lease must be valid (expiry minus a margin for clock drift), and the
//!   journal's `regenerating` record is itself a check-and-set write of the key document — a replica
//!   that lost the key cannot write it, so it never regenerates;
//! - store write and reload: the local lease is checked; when it has lapsed, the key document is read:
//!   another holder (or fence) stops the replica; an unreachable Vault does not (a key already issued
//!   and held in memory is never thrown away).

pub mod kv;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::config::CoordinationConfig;
use crate::journal::{JournalError, KeyJournal};
use crate::telemetry::Metrics;
use kv::{Doc, Kv, KvError};

/// Who this replica is: host, process and start, as its membership document names it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Replica {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub started: DateTime<Utc>,
}

impl Replica {
    pub fn this_process(now: DateTime<Utc>) -> Replica {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let pid = std::process::id();
        Replica::named(&host, pid, now)
    }

    pub fn named(host: &str, pid: u32, started: DateTime<Utc>) -> Replica {
        let clean: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Replica {
            id: format!("{clean}-{pid}-{}", started.timestamp_millis()),
            host: host.to_string(),
            pid,
            started,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemberDoc {
    replica: Replica,
    expires_at: DateTime<Utc>,
}

/// A key's document: who holds it, its fencing number, and its journal (no secret).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct KeyDoc {
    pub holder: Option<String>,
    pub fence: u64,
    pub journal: Option<KeyJournal>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// What a tick changed for this replica.
#[derive(Debug)]
pub enum Change {
    /// The key is this replica's now: recover it from `journal`. `from` held it before (a take-over).
    Gained {
        key: String,
        journal: Box<KeyJournal>,
        from: Option<String>,
    },
    /// Another replica holds the key now (or it was released to the member it hashes to).
    Lost { key: String },
}

/// A destructive step that needs the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Regenerate,
    Write,
    Reload,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FenceError {
    #[error("this replica does not hold the key (holder: {holder})")]
    NotHeld { holder: String },
    #[error("the key was taken over by {holder} (fencing number {fence})")]
    Lost { holder: String, fence: u64 },
    #[error("the lease cannot be renewed ({0}): no regenerate until it can")]
    Unrenewed(String),
    #[error(
        "the key changed hands since this rotation started (fencing number {was}, now {now}): \
         another replica may have rotated it meanwhile"
    )]
    Changed { was: u64, now: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Held {
    fence: u64,
    version: u64,
}

/// A time this replica could not reach the store: from its first failed renewal, until one ttl after
/// it reached the store again.
#[derive(Debug, Clone, Copy)]
struct Outage {
    from: DateTime<Utc>,
    back: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct State {
    member_version: u64,
    /// My membership's expiry as last renewed.
    lease_until: Option<DateTime<Utc>>,
    /// My lease lapsed before a renewal: every held key is re-read before it is trusted again.
    lapsed: bool,
    /// When this replica last failed to reach the store, and when it reached it again (see
    /// [`Coordinator::counts_as_live`]).
    outage: Option<Outage>,
    live: Vec<String>,
    members: BTreeMap<String, Replica>,
    /// Holders seen in key documents since the last round (a key that hashes here but another live
    /// replica still holds; a key lost to another replica). Cleared every round: older sightings
    /// may be stale, and rendezvous over the live members names the holder in steady state.
    holders: HashMap<String, String>,
    held: HashMap<String, Held>,
    /// Keys found lost outside a tick (a journal write that found another holder).
    lost: Vec<String>,
}

pub struct Coordinator {
    pub replica: Replica,
    kv: Kv,
    path: String,
    ttl: Duration,
    margin: Duration,
    clock: Clock,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

/// The member `key` belongs to among `live`: the highest rendezvous score.
pub fn owner<'a>(key: &str, live: &'a [String]) -> Option<&'a String> {
    live.iter().max_by_key(|r| {
        let digest = Sha256::new()
            .chain_update(key.as_bytes())
            .chain_update([0u8])
            .chain_update(r.as_bytes())
            .finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(&digest[..8]);
        (u64::from_be_bytes(b), (*r).clone())
    })
}

fn chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or_default()
}

impl Coordinator {
    pub fn new(
        replica: Replica,
        kv: Kv,
        config: &CoordinationConfig,
        clock: Clock,
        metrics: Arc<Metrics>,
    ) -> Coordinator {
        Coordinator {
            replica,
            kv,
            path: config.path.trim_matches('/').to_string(),
            ttl: config.ttl,
            margin: config.ttl / 6,
            clock,
            metrics,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How often the membership is renewed and the keys rebalanced.
    pub fn renew_interval(&self) -> Duration {
        self.ttl / 3
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn member_path(&self, id: &str) -> String {
        format!("{}/replicas/{id}", self.path)
    }

    fn key_path(&self, key: &str) -> String {
        format!("{}/keys/{key}", self.path)
    }

    pub fn holds(&self, key: &str) -> bool {
        self.lock().held.contains_key(key)
    }

    /// The fencing number this replica holds `key` with.
    pub fn fence_of(&self, key: &str) -> Option<u64> {
        self.lock().held.get(key).map(|h| h.fence)
    }

    /// The replica that holds `key`, as this replica knows it: itself; else the holder a key
    /// document named since the last round; else the live member the key belongs to (rendezvous),
    /// which holds it in steady state or is about to take it. `None` before the first round.
    pub fn holder(&self, key: &str) -> Option<String> {
        let s = self.lock();
        if s.held.contains_key(key) {
            return Some(self.replica.id.clone());
        }
        if let Some(h) = s.holders.get(key) {
            return Some(h.clone());
        }
        owner(key, &s.live).cloned()
    }

    /// The live members, as last seen.
    pub fn members(&self) -> Vec<Replica> {
        let s = self.lock();
        s.live
            .iter()
            .filter_map(|id| s.members.get(id).cloned())
            .collect()
    }

    /// The local view of the lease: valid until its expiry minus the clock-drift margin.
    fn lease_valid(&self, s: &State) -> bool {
        s.lease_until
            .is_some_and(|t| self.clock.now() + chrono(self.margin) < t)
            && !s.lapsed
    }

    /// Whether a regenerate may be sent now (the journal's check-and-set write then proves the key is
    /// still held at the store).
    pub fn may_regenerate(&self, key: &str) -> Result<(), FenceError> {
        let s = self.lock();
        if !s.held.contains_key(key) {
            return Err(FenceError::NotHeld {
                holder: s
                    .holders
                    .get(key)
                    .or_else(|| owner(key, &s.live))
                    .cloned()
                    .unwrap_or_else(|| "none".into()),
            });
        }
        if !self.lease_valid(&s) {
            return Err(FenceError::Unrenewed(
                "this replica's lease has expired or lapsed".into(),
            ));
        }
        Ok(())
    }

    /// [`Coordinator::may_regenerate`] for a rotation that started when this replica held the key
    /// under fencing number `tenure`: if the key went to another replica and came back since, that
    /// replica may have rotated it for the same trigger, and this rotation is stale.
    pub fn may_regenerate_as(&self, key: &str, tenure: Option<u64>) -> Result<(), FenceError> {
        self.may_regenerate(key)?;
        match (tenure, self.fence_of(key)) {
            (Some(was), Some(now)) if was != now => Err(FenceError::Changed { was, now }),
            _ => Ok(()),
        }
    }

    /// Waits, up to one ttl, while this replica holds `key` but its lease is not valid: renewed just
    /// after an outage and being re-checked, or about to be renewed. A rotation accepted as the
    /// store came back then goes on once the lease is trusted again instead of aborting for a
    /// moment's state; through a real outage it still ends without a regenerate, one ttl later.
    pub async fn lease_settled(&self, key: &str, tenure: Option<u64>) {
        let until = tokio::time::Instant::now() + self.ttl;
        while matches!(
            self.may_regenerate_as(key, tenure),
            Err(FenceError::Unrenewed(_))
        ) && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Before a store write or a reload: the local lease, or else the key document.
    pub async fn fence(&self, key: &str, step: Step) -> Result<(), FenceError> {
        if step == Step::Regenerate {
            return self.may_regenerate(key);
        }
        let mine = {
            let s = self.lock();
            if self.lease_valid(&s) && s.held.contains_key(key) {
                return Ok(());
            }
            s.held.get(key).copied()
        };
        match self.kv.read(&self.key_path(key)).await {
            Ok(doc) => {
                let doc = doc.map(|d| parse_key(&d.value)).unwrap_or_default();
                let still = mine.is_some_and(|h| doc.fence == h.fence)
                    && doc.holder.as_deref() == Some(self.replica.id.as_str());
                if still {
                    Ok(())
                } else {
                    let holder = doc.holder.unwrap_or_else(|| "none".into());
                    self.drop_key(key, &holder);
                    Err(FenceError::Lost {
                        holder,
                        fence: doc.fence,
                    })
                }
            }
            // Vault unreachable: a key in hand is still written (never thrown away).
            Err(_) => Ok(()),
        }
    }

    fn drop_key(&self, key: &str, holder: &str) {
        let mut s = self.lock();
        if s.held.remove(key).is_some() {
            s.lost.push(key.to_string());
            self.metrics.lease_held(key, false);
            tracing::warn!(
                key,
                holder,
                "Lease lost: another replica holds the key now."
            );
        }
        // "none": handed back to the member it belongs to, which `holder` names.
        if holder == "none" {
            s.holders.remove(key);
        } else {
            s.holders.insert(key.to_string(), holder.to_string());
        }
    }

    /// Writes the key's journal into its document, with check-and-set under this replica's fence.
    pub async fn write_journal(&self, key: &str, journal: &KeyJournal) -> Result<(), JournalError> {
        let path = self.key_path(key);
        let err = |reason: String| JournalError::Io {
            path: path.clone(),
            reason,
        };
        for _ in 0..3 {
            let Some(held) = self.lock().held.get(key).copied() else {
                return Err(err("this replica no longer holds the key".into()));
            };
            let doc = KeyDoc {
                holder: Some(self.replica.id.clone()),
                fence: held.fence,
                journal: Some(journal.clone()),
                updated_at: Some(self.clock.now()),
            };
            let value = serde_json::to_value(&doc).map_err(|e| err(e.to_string()))?;
            match self.kv.write(&path, &value, held.version).await {
                Ok(version) => {
                    if let Some(h) = self.lock().held.get_mut(key) {
                        h.version = version;
                    }
                    return Ok(());
                }
                Err(KvError::Conflict) => self.reconcile_version(key).await.map_err(err)?,
                Err(KvError::Unavailable(e)) => return Err(err(e)),
            }
        }
        Err(err("check-and-set kept losing".into()))
    }

    /// After a lost check-and-set: still ours (same holder and fence) → take the newer version; else
    /// the key is lost.
    async fn reconcile_version(&self, key: &str) -> Result<(), String> {
        let doc = self
            .kv
            .read(&self.key_path(key))
            .await
            .map_err(|e| e.to_string())?;
        let (version, parsed) = match doc {
            Some(d) => (d.version, parse_key(&d.value)),
            None => (0, KeyDoc::default()),
        };
        let mut s = self.lock();
        match s.held.get_mut(key) {
            Some(h)
                if parsed.fence == h.fence
                    && parsed.holder.as_deref() == Some(self.replica.id.as_str()) =>
            {
                h.version = version;
                Ok(())
            }
            _ => {
                drop(s);
                let holder = parsed.holder.unwrap_or_else(|| "none".into());
                self.drop_key(key, &holder);
                Err(format!("the key was taken over by {holder}"))
            }
        }
    }

    /// The journal in a key's document (for `keyrotd status` with coordination).
    pub async fn read_journal(&self, key: &str) -> Result<Option<KeyJournal>, KvError> {
        Ok(self
            .kv
            .read(&self.key_path(key))
            .await?
            .and_then(|d| parse_key(&d.value).journal))
    }

    /// One round: renew this replica's membership, read the others, then claim the keys that hash to
    /// it and release (when `busy` says they are idle) those that hash elsewhere.
    pub async fn tick(&self, keys: &[String], busy: impl Fn(&str) -> bool) -> Vec<Change> {
        let mut changes: Vec<Change> = std::mem::take(&mut self.lock().lost)
            .into_iter()
            .map(|key| Change::Lost { key })
            .collect();
        if let Err(e) = self.renew().await {
            self.metrics.lease_renew_failure();
            self.unreachable();
            tracing::warn!(error = %e, "Lease renewal failed.");
            return changes;
        }
        if let Err(e) = self.read_members().await {
            self.unreachable();
            tracing::warn!(error = %e, "Reading the replicas failed.");
            return changes;
        }
        if self.lock().lapsed {
            changes.extend(self.verify_held().await);
        }
        let live = {
            let mut s = self.lock();
            s.holders.clear();
            s.live.clone()
        };
        for key in keys {
            let mine = owner(key, &live).is_some_and(|o| *o == self.replica.id);
            let held = self.holds(key);
            if mine && !held {
                if let Some(change) = self.claim(key, &live).await {
                    changes.push(change);
                }
            } else if !mine
                && held
                && !busy(key)
                && let Some(change) = self.release(key).await
            {
                changes.push(change);
            }
        }
        changes
    }

    async fn renew(&self) -> Result<(), KvError> {
        let now = self.clock.now();
        let doc = MemberDoc {
            replica: self.replica.clone(),
            expires_at: now + chrono(self.ttl),
        };
        let value = serde_json::to_value(&doc).unwrap_or(Value::Null);
        let path = self.member_path(&self.replica.id);
        let version = self.lock().member_version;
        let written = match self.kv.write(&path, &value, version).await {
            // Someone removed or rewrote our record (a long pause): start it again.
            Err(KvError::Conflict) => {
                let current = self.kv.read(&path).await?.map(|d| d.version).unwrap_or(0);
                self.kv.write(&path, &value, current).await
            }
            other => other,
        }?;
        let mut s = self.lock();
        if s.lease_until.is_some_and(|t| t <= now) && !s.held.is_empty() {
            tracing::warn!("This replica's lease had expired: re-checking every key it held.");
            s.lapsed = true;
        }
        s.member_version = written;
        s.lease_until = Some(doc.expires_at);
        Ok(())
    }

    /// The store could not be reached: an outage starts (or goes on).
    fn unreachable(&self) {
        let now = self.clock.now();
        let mut s = self.lock();
        let outage = s.outage.get_or_insert(Outage {
            from: now,
            back: None,
        });
        outage.back = None;
    }

    /// Whether a member whose lease expires at `expires` counts as live now. After an outage of this
    /// replica's own (the store down for everyone, or this replica cut off from it), every other
    /// replica gets one full ttl of reachable store to renew before it is judged gone: their leases
    /// expired because nobody could renew, not because they died, and taking their keys over would
    /// move every key for nothing (and race their rotations). A member whose lease ran out before
    /// the outage began is not spared.
    fn counts_as_live(&self, s: &State, expires: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        if expires > now {
            return true;
        }
        s.outage
            .is_some_and(|o| expires > o.from && o.back.is_none_or(|b| now < b + chrono(self.ttl)))
    }

    async fn read_members(&self) -> Result<(), KvError> {
        let now = self.clock.now();
        {
            // Reached again: the grace of `counts_as_live` runs from now; once over, forget it.
            let mut s = self.lock();
            if let Some(o) = &mut s.outage {
                let back = *o.back.get_or_insert(now);
                if now >= back + chrono(self.ttl) {
                    s.outage = None;
                }
            }
        }
        let ids = self.kv.list(&format!("{}/replicas", self.path)).await?;
        let mut live = vec![self.replica.id.clone()];
        let mut members = BTreeMap::from([(self.replica.id.clone(), self.replica.clone())]);
        for id in ids.iter().filter(|id| **id != self.replica.id) {
            let Some(doc) = self.kv.read(&self.member_path(id)).await? else {
                continue;
            };
            let Ok(member) = serde_json::from_value::<MemberDoc>(doc.value) else {
                continue;
            };
            let live_now = self.counts_as_live(&self.lock(), member.expires_at, now);
            if live_now {
                live.push(id.clone());
                members.insert(id.clone(), member.replica);
            } else if member.expires_at + chrono(self.ttl * 10) < now {
                // Long gone: tidy up so the list stays short.
                let _ = self.kv.delete(&self.member_path(id)).await;
            }
        }
        let mut s = self.lock();
        s.live = live;
        s.members = members;
        Ok(())
    }

    /// After a lapse: keep the keys whose documents still name this replica with our fence.
    async fn verify_held(&self) -> Vec<Change> {
        let held: Vec<(String, Held)> = self
            .lock()
            .held
            .iter()
            .map(|(k, h)| (k.clone(), *h))
            .collect();
        let mut changes = Vec::new();
        for (key, h) in held {
            match self.kv.read(&self.key_path(&key)).await {
                Ok(doc) => {
                    let version = doc.as_ref().map(|d| d.version).unwrap_or(0);
                    let parsed = doc.map(|d| parse_key(&d.value)).unwrap_or_default();
                    if parsed.fence == h.fence
                        && parsed.holder.as_deref() == Some(self.replica.id.as_str())
                    {
                        if let Some(h) = self.lock().held.get_mut(&key) {
                            h.version = version;
                        }
                    } else {
                        let holder = parsed.holder.unwrap_or_else(|| "none".into());
                        self.drop_key(&key, &holder);
                        self.lock().lost.retain(|k| *k != key);
                        changes.push(Change::Lost { key });
                    }
                }
                Err(_) => return changes,
            }
        }
        self.lock().lapsed = false;
        changes
    }

    /// Takes `key` when its recorded holder is gone (or none).
    async fn claim(&self, key: &str, live: &[String]) -> Option<Change> {
        let path = self.key_path(key);
        let doc = self.kv.read(&path).await.ok()?;
        let (version, current) = match doc {
            Some(Doc { value, version }) => (version, parse_key(&value)),
            None => (0, KeyDoc::default()),
        };
        if let Some(h) = &current.holder
            && h != &self.replica.id
            && live.contains(h)
        {
            // Still held by a live replica: it releases the key when it is idle.
            self.lock().holders.insert(key.to_string(), h.clone());
            return None;
        }
        let next = KeyDoc {
            holder: Some(self.replica.id.clone()),
            fence: current.fence + 1,
            journal: current.journal.clone(),
            updated_at: Some(self.clock.now()),
        };
        let value = serde_json::to_value(&next).ok()?;
        let version = self.kv.write(&path, &value, version).await.ok()?;
        self.lock().held.insert(
            key.to_string(),
            Held {
                fence: next.fence,
                version,
            },
        );
        self.metrics.lease_held(key, true);
        let from = current.holder.filter(|h| h != &self.replica.id);
        if from.is_some() {
            self.metrics.lease_takeover(key);
        }
        tracing::info!(key, fence = next.fence, from = ?from, "Lease taken.");
        Some(Change::Gained {
            key: key.to_string(),
            journal: Box::new(current.journal.unwrap_or_else(|| KeyJournal::new(key))),
            from,
        })
    }

    /// Hands `key` back (it hashes to another member now): the document keeps its journal and fence.
    async fn release(&self, key: &str) -> Option<Change> {
        let held = self.lock().held.get(key).copied()?;
        let path = self.key_path(key);
        let doc = self.kv.read(&path).await.ok()??;
        let mut parsed = parse_key(&doc.value);
        if parsed.fence != held.fence {
            self.drop_key(key, parsed.holder.as_deref().unwrap_or("none"));
            self.lock().lost.retain(|k| k != key);
            return Some(Change::Lost { key: key.into() });
        }
        parsed.holder = None;
        parsed.updated_at = Some(self.clock.now());
        let value = serde_json::to_value(&parsed).ok()?;
        self.kv.write(&path, &value, doc.version).await.ok()?;
        self.drop_key(key, "none");
        self.lock().lost.retain(|k| k != key);
        tracing::info!(key, "Lease released to the replica the key belongs to now.");
        Some(Change::Lost { key: key.into() })
    }
}

/// A key's document as any process (`keyrotd status`) may read it, without holding anything.
pub async fn read_key_doc(
    kv: &Kv,
    config: &CoordinationConfig,
    key: &str,
) -> Result<Option<KeyDoc>, KvError> {
    let path = format!("{}/keys/{key}", config.path.trim_matches('/'));
    Ok(kv.read(&path).await?.map(|d| parse_key(&d.value)))
}

fn parse_key(value: &Value) -> KeyDoc {
    serde_json::from_value(value.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_spreads_keys_and_moves_only_the_keys_of_a_departed_member() {
        let three: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let two: Vec<String> = ["a", "c"].iter().map(|s| s.to_string()).collect();
        let keys: Vec<String> = (0..300).map(|i| format!("key-{i}")).collect();
        let mut per: HashMap<&String, usize> = HashMap::new();
        for k in &keys {
            *per.entry(owner(k, &three).unwrap()).or_default() += 1;
        }
        for (r, n) in &per {
            assert!((60..140).contains(n), "{r} owns {n} of 300");
        }
        for k in &keys {
            let before = owner(k, &three).unwrap();
            let after = owner(k, &two).unwrap();
            if before != "b" {
                assert_eq!(before, after, "{k} moved although its owner stayed");
            }
        }
    }

    #[test]
    fn a_replica_id_names_host_pid_and_start() {
        let t = DateTime::parse_from_rfc3339("2027-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let r = Replica::named("host a/1", 42, t);
        assert_eq!(r.id, format!("host_a_1-42-{}", t.timestamp_millis()));
    }
}

#[cfg(all(test, feature = "testing"))]
mod replica_tests;
