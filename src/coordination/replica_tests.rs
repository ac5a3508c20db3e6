//! Several coordinators on one in-memory KV, on a hand-moved clock: membership, rendezvous, take-over,
//! fencing, lapses and an unreachable store.

use super::kv::memory::MemoryKv;
use super::*;

const TTL: Duration = Duration::from_secs(30);

struct Cluster {
    kv: Arc<MemoryKv>,
    now: Arc<Mutex<DateTime<Utc>>>,
    keys: Vec<String>,
}

impl Cluster {
    fn new(keys: usize) -> Cluster {
        let start = DateTime::parse_from_rfc3339("2027-03-10T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        Cluster {
            kv: Arc::new(MemoryKv::default()),
            now: Arc::new(Mutex::new(start)),
            keys: (0..keys).map(|i| format!("key-{i}")).collect(),
        }
    }

    fn replica(&self, name: &str) -> Coordinator {
        let config = CoordinationConfig {
            store: "vault".into(),
            path: "keyrotd/leases".into(),
            ttl: TTL,
        };
        let clock = Clock::Manual(self.now.clone());
        let replica = Replica::named(name, 1, *self.now.lock().unwrap());
        Coordinator::new(
            replica,
            Kv::Memory(self.kv.clone()),
            &config,
            clock,
            Arc::new(Metrics::new()),
        )
    }

    fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap();
        *now += chrono(by);
    }

    async fn tick(&self, c: &Coordinator) -> Vec<Change> {
        c.tick(&self.keys, |_| false).await
    }

    fn held_by(&self, cs: &[&Coordinator], key: &str) -> Vec<String> {
        cs.iter()
            .filter(|c| c.holds(key))
            .map(|c| c.replica.id.clone())
            .collect()
    }
}

fn gained(changes: &[Change]) -> Vec<&str> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Gained { key, .. } => Some(key.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn every_key_has_exactly_one_holder_its_rendezvous_owner() {
    let cluster = Cluster::new(30);
    let (a, b, c) = (
        cluster.replica("a"),
        cluster.replica("b"),
        cluster.replica("c"),
    );
    for _ in 0..3 {
        for r in [&a, &b, &c] {
            cluster.tick(r).await;
        }
    }
    let live: Vec<String> = [&a, &b, &c].iter().map(|r| r.replica.id.clone()).collect();
    for key in &cluster.keys {
        let holders = cluster.held_by(&[&a, &b, &c], key);
        assert_eq!(holders.len(), 1, "{key}: {holders:?}");
        assert_eq!(Some(&holders[0]), owner(key, &live), "{key}");
    }
}

#[tokio::test]
async fn every_replica_names_the_holder_of_every_key_after_a_hand_over() {
    let cluster = Cluster::new(30);
    let a = cluster.replica("a");
    cluster.tick(&a).await;
    // b and c join: a hands their keys over, and forgets who it handed them to.
    let (b, c) = (cluster.replica("b"), cluster.replica("c"));
    for _ in 0..3 {
        for r in [&a, &b, &c] {
            cluster.tick(r).await;
        }
    }
    for key in &cluster.keys {
        let holders = cluster.held_by(&[&a, &b, &c], key);
        assert_eq!(holders.len(), 1, "{key}: {holders:?}");
        for r in [&a, &b, &c] {
            assert_eq!(
                r.holder(key).as_ref(),
                Some(&holders[0]),
                "{} names the holder of {key}",
                r.replica.id
            );
        }
    }
}

#[tokio::test]
async fn a_dead_replicas_keys_are_taken_over_within_ttl_and_one_renewal() {
    let cluster = Cluster::new(30);
    let (a, b) = (cluster.replica("a"), cluster.replica("b"));
    for _ in 0..2 {
        cluster.tick(&a).await;
        cluster.tick(&b).await;
    }
    let of_a: Vec<String> = cluster
        .keys
        .iter()
        .filter(|k| a.holds(k))
        .cloned()
        .collect();
    assert!(!of_a.is_empty());
    // a dies right after renewing; b renews every ttl/3.
    let mut waited = Duration::ZERO;
    let mut taken = Vec::new();
    while taken.len() < of_a.len() {
        cluster.advance(b.renew_interval());
        waited += b.renew_interval();
        let changes = cluster.tick(&b).await;
        for g in gained(&changes) {
            if waited < TTL {
                panic!("{g} taken over after {waited:?}, before a's lease expired");
            }
            taken.push(g.to_string());
        }
        assert!(
            waited <= TTL + b.renew_interval(),
            "not taken over after {waited:?}"
        );
    }
    for key in &of_a {
        let doc = parse_key(
            &cluster
                .kv
                .get(&format!("keyrotd/leases/keys/{key}"))
                .unwrap(),
        );
        assert_eq!(doc.holder.as_deref(), Some(b.replica.id.as_str()));
        assert_eq!(
            doc.fence, 2,
            "{key}: the fencing number grows with the take-over"
        );
    }
}

#[tokio::test]
async fn a_paused_replica_stops_before_its_next_destructive_step() {
    let cluster = Cluster::new(1);
    let key = cluster.keys[0].clone();
    let (a, b) = (cluster.replica("a"), cluster.replica("b"));
    cluster.tick(&a).await;
    assert!(a.holds(&key));
    cluster.tick(&b).await;
    // a is paused (SIGSTOP) past its lease; b takes the key over.
    while !b.holds(&key) {
        cluster.advance(b.renew_interval());
        cluster.tick(&b).await;
    }
    // a resumes in the middle of a rotation: no regenerate, no store write, no reload.
    assert!(matches!(
        a.may_regenerate(&key),
        Err(FenceError::Unrenewed(_))
    ));
    assert!(matches!(
        a.fence(&key, Step::Write).await,
        Err(FenceError::Lost { .. })
    ));
    assert!(!a.holds(&key), "a dropped the key it lost");
    assert!(a.fence(&key, Step::Reload).await.is_err());
    // Its journal write is refused too (check-and-set under a stale fence).
    assert!(a.write_journal(&key, &KeyJournal::new(&key)).await.is_err());
    // And its next round reports the loss and does not take the key back.
    let changes = cluster.tick(&a).await;
    assert!(gained(&changes).is_empty());
    assert!(b.holds(&key));
}

#[tokio::test]
async fn a_replica_that_lapsed_rechecks_its_keys_even_after_renewing() {
    let cluster = Cluster::new(1);
    let key = cluster.keys[0].clone();
    let (a, b) = (cluster.replica("a"), cluster.replica("b"));
    cluster.tick(&a).await;
    cluster.tick(&b).await;
    cluster.advance(TTL + Duration::from_secs(1));
    cluster.tick(&b).await;
    assert!(b.holds(&key), "b took the key over");
    // a renews first thing after its pause: its lease looks valid again, yet the key is not its own.
    let changes = cluster.tick(&a).await;
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Change::Lost { key: k } if *k == key))
    );
    assert!(a.fence(&key, Step::Write).await.is_err());
}

#[tokio::test]
async fn with_the_store_down_no_regenerate_but_a_key_in_hand_is_still_written() {
    let cluster = Cluster::new(1);
    let key = cluster.keys[0].clone();
    let a = cluster.replica("a");
    cluster.tick(&a).await;
    assert!(a.may_regenerate(&key).is_ok());
    cluster.kv.set_down(true);
    cluster.advance(TTL);
    cluster.tick(&a).await;
    assert!(matches!(
        a.may_regenerate(&key),
        Err(FenceError::Unrenewed(_))
    ));
    assert!(
        a.fence(&key, Step::Write).await.is_ok(),
        "never throw away a live key"
    );
    cluster.kv.set_down(false);
    cluster.tick(&a).await;
    cluster.tick(&a).await;
    assert!(
        a.holds(&key),
        "the lease settles again when the store is back"
    );
    assert!(a.may_regenerate(&key).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_rotation_waits_for_a_lease_being_rechecked_but_not_past_one_ttl() {
    let cluster = Cluster::new(1);
    let key = cluster.keys[0].clone();
    let a = Arc::new(cluster.replica("a"));
    cluster.tick(&a).await;
    cluster.kv.set_down(true);
    cluster.advance(TTL);
    cluster.tick(&a).await;
    // Still down: the wait ends after one ttl (tokio's paused clock), the lease still not valid.
    let start = tokio::time::Instant::now();
    a.lease_settled(&key, None).await;
    assert!(start.elapsed() >= TTL);
    assert!(matches!(
        a.may_regenerate(&key),
        Err(FenceError::Unrenewed(_))
    ));
    // Back: the wait ends as soon as a tick has renewed the lease and re-checked the key.
    cluster.kv.set_down(false);
    let waiting = {
        let (a, key) = (a.clone(), key.clone());
        tokio::spawn(async move {
            a.lease_settled(&key, None).await;
            a.may_regenerate(&key).is_ok()
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "nothing renewed the lease yet");
    cluster.tick(&a).await;
    assert!(waiting.await.unwrap(), "the lease is valid once re-checked");
}

#[tokio::test]
async fn a_new_replica_gets_its_share_without_a_key_ever_held_twice() {
    let cluster = Cluster::new(40);
    let a = cluster.replica("a");
    cluster.tick(&a).await;
    assert!(cluster.keys.iter().all(|k| a.holds(k)));
    let b = cluster.replica("b");
    for _ in 0..4 {
        cluster.tick(&b).await;
        for key in &cluster.keys {
            assert!(
                cluster.held_by(&[&a, &b], key).len() <= 1,
                "{key} held twice"
            );
        }
        cluster.tick(&a).await;
        for key in &cluster.keys {
            assert!(
                cluster.held_by(&[&a, &b], key).len() <= 1,
                "{key} held twice"
            );
        }
    }
    let of_b = cluster.keys.iter().filter(|k| b.holds(k)).count();
    assert!((8..32).contains(&of_b), "b holds {of_b} of 40");
    assert!(cluster.keys.iter().all(|k| a.holds(k) || b.holds(k)));
}

#[tokio::test]
async fn lease_traffic_grows_with_replicas_not_keys() {
    let cluster = Cluster::new(300);
    let rs: Vec<Coordinator> = ["a", "b", "c"].iter().map(|n| cluster.replica(n)).collect();
    for _ in 0..3 {
        for r in &rs {
            cluster.tick(r).await;
        }
    }
    let before = cluster.kv.requests();
    let rounds = 30;
    for _ in 0..rounds {
        cluster.advance(rs[0].renew_interval());
        for r in &rs {
            cluster.tick(r).await;
        }
    }
    let seconds = (rs[0].renew_interval() * rounds).as_secs_f64();
    let rate = (cluster.kv.requests() - before) as f64 / seconds;
    println!("lease traffic, 3 replicas, 300 keys, steady state: {rate:.2} requests/s");
    assert!(rate < 20.0, "{rate} requests/s");
}

/// Every key's (holder, fencing number) as the documents say.
fn documents(cluster: &Cluster) -> Vec<(Option<String>, u64)> {
    cluster
        .keys
        .iter()
        .map(|k| {
            let doc = parse_key(
                &cluster
                    .kv
                    .get(&format!("keyrotd/leases/keys/{k}"))
                    .unwrap_or_default(),
            );
            (doc.holder, doc.fence)
        })
        .collect()
}

#[tokio::test]
async fn a_store_outage_longer_than_the_ttl_moves_no_key_when_the_store_is_back() {
    let cluster = Cluster::new(20);
    let (a, b) = (cluster.replica("a"), cluster.replica("b"));
    for _ in 0..3 {
        cluster.tick(&a).await;
        cluster.tick(&b).await;
    }
    let before = documents(&cluster);
    assert!(before.iter().all(|(h, _)| h.is_some()));
    // The store is down for three ttls: every lease expires, nobody can renew.
    cluster.kv.set_down(true);
    for _ in 0..9 {
        cluster.advance(a.renew_interval());
        cluster.tick(&a).await;
        cluster.tick(&b).await;
    }
    cluster.kv.set_down(false);
    // a comes back first and finds b's lease long expired: b is alive, it just could not renew.
    for _ in 0..6 {
        cluster.tick(&a).await;
        assert_eq!(documents(&cluster), before, "a key changed hands");
        cluster.tick(&b).await;
        assert_eq!(documents(&cluster), before, "a key changed hands");
        cluster.advance(a.renew_interval());
    }
    for key in &cluster.keys {
        assert_eq!(cluster.held_by(&[&a, &b], key).len(), 1, "{key}");
    }
}

#[tokio::test]
async fn a_replica_that_died_during_an_outage_loses_its_keys_one_ttl_after_the_store_is_back() {
    let cluster = Cluster::new(20);
    let (a, b) = (cluster.replica("a"), cluster.replica("b"));
    for _ in 0..3 {
        cluster.tick(&a).await;
        cluster.tick(&b).await;
    }
    let of_b: Vec<String> = cluster
        .keys
        .iter()
        .filter(|k| b.holds(k))
        .cloned()
        .collect();
    assert!(!of_b.is_empty());
    // b dies while the store is down.
    cluster.kv.set_down(true);
    for _ in 0..9 {
        cluster.advance(a.renew_interval());
        cluster.tick(&a).await;
    }
    cluster.kv.set_down(false);
    let mut waited = Duration::ZERO;
    while !of_b.iter().all(|k| a.holds(k)) {
        let changes = cluster.tick(&a).await;
        assert!(
            gained(&changes).is_empty() || waited >= TTL,
            "b's keys taken {waited:?} after the store came back, before b had a ttl to renew"
        );
        assert!(
            waited <= TTL + a.renew_interval(),
            "not taken after {waited:?}"
        );
        cluster.advance(a.renew_interval());
        waited += a.renew_interval();
    }
}

#[tokio::test]
async fn a_rotation_started_before_the_key_left_and_came_back_may_not_regenerate() {
    let cluster = Cluster::new(1);
    let key = cluster.keys[0].clone();
    let (a, b) = (cluster.replica("a"), cluster.replica("b"));
    cluster.tick(&a).await;
    cluster.tick(&b).await;
    let owner_is_a =
        owner(&key, &[a.replica.id.clone(), b.replica.id.clone()]) == Some(&a.replica.id);
    let (first, second) = if owner_is_a { (&a, &b) } else { (&b, &a) };
    for _ in 0..2 {
        cluster.tick(second).await;
        cluster.tick(first).await;
    }
    assert!(
        first.holds(&key),
        "the key settled with the replica it hashes to"
    );
    // A rotation starts under this fencing number, then its replica pauses past its lease.
    let tenure = first.fence_of(&key);
    assert!(first.may_regenerate_as(&key, tenure).is_ok());
    while !second.holds(&key) {
        cluster.advance(second.renew_interval());
        cluster.tick(second).await;
    }
    // Resumed: it drops the key, the other hands it back (it hashes to the first), it takes it again.
    for _ in 0..3 {
        cluster.tick(first).await;
        cluster.tick(second).await;
    }
    cluster.tick(first).await;
    assert!(first.holds(&key), "the key came back");
    assert!(matches!(
        first.may_regenerate_as(&key, tenure),
        Err(FenceError::Changed { .. })
    ));
    assert!(
        first.may_regenerate_as(&key, first.fence_of(&key)).is_ok(),
        "a rotation started now may"
    );
}
