//! Several replicas on an OpenBao lease, end to end (docs/replicas.md): real `keyrotd run` processes
//! sharing keys through the membership and key documents on a real OpenBao, rotating on the portal
//! simulators, writing to OpenBao, moto and files.
//!
//! Each story checks the two promises of the lease against the ground truth outside keyrotd: the
//! portal's own list of the keys it issued (a regenerate no replica audited, or two for one due time,
//! shows there) and what every destination holds (a stale key written late shows there).
//!
//! - steady state: three replicas, six keys due every 5 s, for two minutes;
//! - a holder SIGKILLed between regenerate and store: another replica takes the key over and recovers;
//! - a holder stopped (SIGSTOP, a long pause) right before regenerate, or holding an issued key, past
//!   its lease: another takes over and rotates; resumed, the stopped one neither regenerates nor writes;
//! - a replica in its own network namespace cut off from OpenBao while it still reaches the portal;
//! - OpenBao restarted under three replicas;
//! - the leases' own OpenBao traffic with three replicas and 300 keys, counted by OpenBao's audit log.
//!
//! Which replica a key belongs to is decided by rendezvous hashing over the replica ids, and an id
//! names the process id, which no test can choose. A story that needs a particular replica to hold a
//! key starts candidates until one does (see [`spawn_owner`]); each has an even chance.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use keyrotd::coordination::owner;
use serde_json::Value;

use crate::support::eventually;
use crate::support::netns::Netns;
use crate::support::replicas::{LEASES, Replica, World, WorldOptions, logs};

/// `[coordination] ttl` of every story but the traffic one (renewed every 2 s).
const TTL: Duration = Duration::from_secs(6);
const RENEW: Duration = Duration::from_secs(2);
/// Every 5 s, on the second.
const EVERY_5S: &str = "*/5 * * * * *";
const PERIOD_S: i64 = 5;

/// The live replica ids, as the replicas themselves see them: every membership document whose lease
/// has not expired.
async fn live_ids(world: &World) -> Vec<String> {
    let now = Utc::now();
    let mut ids = Vec::new();
    for id in world.member_ids().await {
        let Some(doc) = world.kv(&format!("{LEASES}/replicas/{id}")).await else {
            continue;
        };
        let expires = doc["data"]["expires_at"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
        if expires.is_some_and(|t| t > now) {
            ids.push(id);
        }
    }
    ids
}

/// The id of replica `r`, from its membership document (written before it reports ready).
async fn id_of(world: &World, r: &Replica) -> String {
    let start = Instant::now();
    loop {
        if let Some(id) = world.replica_id(r.pid()).await {
            return id;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no membership document for pid {}; log:\n{}",
            r.pid(),
            r.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts candidates (with `spawn`) until one is the rendezvous owner, among the live replicas, of
/// at least one key `wanted` accepts; returns it with those keys. A candidate that owns none holds
/// none: it is killed, and its membership (live for one more ttl) changes no key's owner, since it
/// lost every key to a replica still running.
async fn spawn_owner(
    world: &World,
    wanted: &[String],
    spawn: impl AsyncFn() -> Replica,
) -> (Replica, Vec<String>) {
    for _ in 0..16 {
        let mut r = spawn().await;
        let id = id_of(world, &r).await;
        let live = live_ids(world).await;
        let owned: Vec<String> = wanted
            .iter()
            .filter(|k| owner(k, &live) == Some(&id))
            .cloned()
            .collect();
        if !owned.is_empty() {
            return (r, owned);
        }
        r.kill();
    }
    panic!("16 candidates in a row owned none of {wanted:?}");
}

/// Waits until every key is held by exactly one of `rs` (its `keyrotd_lease_held`), the one
/// rendezvous hashing gives it among their ids, and its document in OpenBao names that replica.
/// Returns the replicas' ids, in the order of `rs`.
async fn wait_settled(world: &World, rs: &[&Replica]) -> Vec<String> {
    let mut ids = Vec::new();
    for r in rs {
        ids.push(id_of(world, r).await);
    }
    let keys = world.keys();
    let start = Instant::now();
    loop {
        let mut wrong = Vec::new();
        let held = held_by(rs, &keys).await;
        for key in &keys {
            let want = owner(key, &ids).expect("some replica").clone();
            let doc = world.key_doc(key).await;
            let holders: Vec<&String> = held[key].iter().map(|i| &ids[*i]).collect();
            if holders != [&want] || doc["holder"] != want.as_str() {
                wrong.push(format!(
                    "{key}: held by {holders:?}, document says {}, belongs to {want}",
                    doc["holder"]
                ));
            }
        }
        if wrong.is_empty() {
            return ids;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the leases did not settle: {wrong:#?}\n{}",
            logs(rs)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// For every key, the indices (in `rs`) of the replicas that say they hold it.
async fn held_by(rs: &[&Replica], keys: &[String]) -> HashMap<String, Vec<usize>> {
    let mut held: HashMap<String, Vec<usize>> = keys.iter().map(|k| (k.clone(), vec![])).collect();
    for (i, r) in rs.iter().enumerate() {
        for k in r.held(keys).await {
            held.entry(k).or_default().push(i);
        }
    }
    held
}

/// A regenerate a replica audited.
#[derive(Debug, Clone)]
struct Audited {
    replica: usize,
    key: String,
    new_key_id: String,
    trigger: String,
    /// When its rotation started (the replica's `started` record).
    started: DateTime<Utc>,
}

/// Every `regenerated` record of every replica, with the trigger and start of its rotation.
fn audited_regenerations(rs: &[&Replica]) -> Vec<Audited> {
    let mut out = Vec::new();
    for (i, r) in rs.iter().enumerate() {
        let audit = r.audit();
        let started: HashMap<&str, &Value> = audit
            .iter()
            .filter(|a| a["event"] == "started")
            .filter_map(|a| Some((a["rotation_id"].as_str()?, a)))
            .collect();
        for a in audit.iter().filter(|a| a["event"] == "regenerated") {
            let s = a["rotation_id"].as_str().and_then(|id| started.get(id));
            out.push(Audited {
                replica: i,
                key: a["key"].as_str().unwrap_or_default().to_string(),
                new_key_id: a["new_key_id"].as_str().unwrap_or_default().to_string(),
                trigger: s
                    .map_or("?", |s| s["trigger"].as_str().unwrap_or("?"))
                    .into(),
                started: s
                    .and_then(|s| serde_json::from_value(s["ts"].clone()).ok())
                    .unwrap_or_default(),
            });
        }
    }
    out
}

/// Every key id portal `i` issued after its initial key, oldest first.
async fn issued(world: &World, i: usize) -> Vec<String> {
    world.portal(i).issued_key_ids().await[1..].to_vec()
}

/// The portal's ground truth: every key it issued for `k<i>` was audited by exactly one replica,
/// and every audited regenerate reached it. A regenerate no replica owns up to, or one two replicas
/// sent, fails here.
async fn assert_every_regenerate_accounted(world: &World, i: usize, rs: &[&Replica]) {
    let key = format!("k{i}");
    let mut at_portal = issued(world, i).await;
    let mut audited: Vec<String> = audited_regenerations(rs)
        .into_iter()
        .filter(|a| a.key == key)
        .map(|a| a.new_key_id)
        .collect();
    at_portal.sort();
    audited.sort();
    assert_eq!(
        at_portal, audited,
        "{key}: the keys the portal issued are exactly the regenerates the replicas audited"
    );
}

/// The portal's regenerate count for `k<i>`.
async fn regenerations(world: &World, i: usize) -> u64 {
    world.portal(i).state().await.regenerations
}

/// Waits until no replica has a rotation of any key running (every key's phase idle everywhere).
async fn wait_idle(world: &World, rs: &[&Replica]) {
    eventually(
        Duration::from_secs(60),
        "every key idle on every replica",
        || async {
            for r in rs {
                let (_, views) = r.daemon.get("/v1/keys").await;
                let busy = views
                    .as_array()
                    .is_none_or(|v| v.iter().any(|k| k["phase"] != "idle"));
                if busy {
                    return false;
                }
            }
            let _ = world;
            true
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_rotate_six_keys_once_per_due_time_each_held_by_one() {
    let world = World::start(WorldOptions {
        keys: 6,
        schedule: Some(EVERY_5S.into()),
        ..WorldOptions::default()
    })
    .await;
    let (a, b, c) = (
        world.replica().await,
        world.replica().await,
        world.replica().await,
    );
    let rs = [&a, &b, &c];
    let ids = wait_settled(&world, &rs).await;
    let keys = world.keys();

    // Two minutes of service. Every second: each key held by exactly one replica, and every replica
    // names that one as its holder (`/v1/keys`), followers included.
    let from = Utc::now();
    let run = Instant::now();
    while run.elapsed() < Duration::from_secs(120) {
        let held = held_by(&rs, &keys).await;
        for key in &keys {
            assert_eq!(
                held[key].len(),
                1,
                "{key} held by replicas {:?} after {:?}\n{}",
                held[key],
                run.elapsed(),
                logs(&rs)
            );
        }
        for (n, r) in rs.iter().enumerate() {
            let (_, views) = r.daemon.get("/v1/keys").await;
            for v in views.as_array().expect("/v1/keys is a list") {
                let key = v["name"].as_str().expect("name");
                let holder = &ids[held[key][0]];
                assert_eq!(
                    v["holder"],
                    holder.as_str(),
                    "replica {n} names the holder of {key}"
                );
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let to = Utc::now();

    // Pause everywhere and let the last rotations end: then every destination must hold its
    // portal's active key.
    for r in &rs {
        r.daemon.admin_post("/v1/pause", 200).await;
    }
    wait_idle(&world, &rs).await;
    for i in 0..keys.len() {
        world.assert_consistent(i).await;
        assert_every_regenerate_accounted(&world, i, &rs).await;
    }

    // One regenerate per due time: rotations grouped by the 5-second occurrence they started in.
    // Every occurrence strictly inside the two minutes has exactly one, on the key's holder, and
    // none anywhere has two.
    let audited = audited_regenerations(&rs);
    let first = from.timestamp() / PERIOD_S + 1;
    let last = to.timestamp() / PERIOD_S - 1;
    for (i, key) in keys.iter().enumerate() {
        let mut per: BTreeMap<i64, Vec<&Audited>> = BTreeMap::new();
        for a in audited.iter().filter(|a| &a.key == key) {
            per.entry(a.started.timestamp() / PERIOD_S)
                .or_default()
                .push(a);
        }
        for (occurrence, rot) in &per {
            assert_eq!(
                rot.len(),
                1,
                "{key}: two regenerates for one due time: {rot:#?}"
            );
            if (first..=last).contains(occurrence) {
                assert_eq!(rot[0].trigger, "schedule", "{key}: {rot:?}");
                assert_eq!(
                    ids[rot[0].replica],
                    *owner(key, &ids).expect("owner"),
                    "{key} rotated by its holder"
                );
            }
        }
        let missing: Vec<i64> = (first..=last).filter(|o| !per.contains_key(o)).collect();
        assert!(
            missing.is_empty(),
            "{key}: no regenerate for the due times at {:?} (unix seconds)\n{}",
            missing.iter().map(|o| o * PERIOD_S).collect::<Vec<_>>(),
            logs(&rs)
        );
        println!(
            "{key}: {} regenerates at the portal, {} due times in the window",
            regenerations(&world, i).await,
            last - first + 1
        );
    }
    world.assert_no_secret_leaked(&rs).await;
}
