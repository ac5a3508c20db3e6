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

/// Starts candidates (with `spawn`) until one is the rendezvous owner, among itself and the replicas
/// `running` (their ids), of at least one of `wanted`; returns it with those keys, or `None` after
/// `attempts` candidates. A candidate that owns none is killed: it held none of them, and its
/// membership (live for one more ttl) changes no wanted key's owner, since each went to a replica
/// still running.
async fn spawn_owner(
    world: &World,
    wanted: &[String],
    running: &[String],
    attempts: usize,
    spawn: impl AsyncFn() -> Replica,
) -> Option<(Replica, Vec<String>)> {
    let (found, rejected) = spawn_until(world, attempts, spawn, |id| {
        let mut all = running.to_vec();
        all.push(id.clone());
        wanted
            .iter()
            .filter(|k| owner(k, &all) == Some(id))
            .cloned()
            .collect()
    })
    .await;
    assert!(
        rejected.iter().all(|r| r.audit().is_empty()),
        "a rejected candidate rotated a key"
    );
    found
}

/// Starts candidates (with `spawn`) until `keys` (given the candidate's id) names at least one key;
/// returns the candidate and those keys (or `None` after `attempts` candidates), and the rejected
/// candidates (killed, kept for their audit logs: a key that hashed to one of them may have been
/// rotated in its short life).
///
/// Give it enough attempts: a candidate must outscore the running replicas, and when one of them
/// scores high on the wanted keys, most candidates do not.
async fn spawn_until(
    world: &World,
    attempts: usize,
    spawn: impl AsyncFn() -> Replica,
    keys: impl Fn(&String) -> Vec<String>,
) -> (Option<(Replica, Vec<String>)>, Vec<Replica>) {
    let mut rejected = Vec::new();
    for _ in 0..attempts {
        let r = spawn().await;
        let id = id_of(world, &r).await;
        let got = keys(&id);
        if !got.is_empty() {
            return (Some((r, got)), rejected);
        }
        r.kill();
        rejected.push(r);
    }
    (None, rejected)
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

/// The two replicas of a failpoint story: `plain`, started first, and `subject`, started with
/// `failpoints` until it is the one key `k0` belongs to. Returns them once the subject holds it.
#[cfg(feature = "failpoints")]
async fn subject_holding_k0(world: &World, failpoints: &str) -> (Replica, Replica) {
    // Rounds of a fresh plain replica and up to 4 candidates: a plain replica that scores high on
    // k0 would reject almost every candidate (16 in a row, one run in 17), while a fresh pair
    // gives each round the same four chances in five. A plain replica given up is killed; its
    // membership lingers for a ttl, which `wait_settled` waits out.
    for _ in 0..8 {
        let plain = world.replica().await;
        let running = [id_of(world, &plain).await];
        let found = spawn_owner(world, &["k0".to_string()], &running, 4, async || {
            world.replica_with_env(&[("FAILPOINTS", failpoints)]).await
        })
        .await;
        if let Some((subject, _)) = found {
            wait_settled(world, &[&subject, &plain]).await;
            return (subject, plain);
        }
        plain.kill();
    }
    panic!("8 rounds of replicas gave no candidate that k0 hashes to");
}

/// Key `k0`'s document: (holder, fencing number, journal phase).
async fn k0_doc(world: &World) -> (String, u64, String) {
    let doc = world.key_doc("k0").await;
    (
        doc["holder"].as_str().unwrap_or_default().to_string(),
        doc["fence"].as_u64().unwrap_or(0),
        doc["journal"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// Waits until `k0`'s document says `what` holds.
async fn wait_k0(
    world: &World,
    rs: &[&Replica],
    what: &str,
    check: impl Fn(&(String, u64, String)) -> bool,
) {
    let start = Instant::now();
    loop {
        let doc = k0_doc(world).await;
        if check(&doc) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "k0's document never showed {what}; it says {doc:?}\n{}",
            logs(rs)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A time field of a JSON document.
fn time(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("not a time: {v}"))
}

/// The take-over of `k0` from `from` happened after `from`'s lease expired and within one renewal
/// interval of it (so within ttl plus one renewal interval of its last renewal), with 2 s of slack for
/// a loaded machine's scheduling; both times as the replicas' own clocks recorded them (the taker's
/// write of the key document; the membership document the old holder last renewed).
async fn assert_taken_over_in_time(world: &World, from: &str) {
    let doc = world.key_doc("k0").await;
    let member = world
        .kv(&format!("{LEASES}/replicas/{from}"))
        .await
        .expect("the old holder's membership document");
    let expired = time(&member["data"]["expires_at"]);
    let taken = time(&doc["updated_at"]);
    assert!(
        taken >= expired,
        "k0 taken at {taken}, before its holder's lease expired at {expired}"
    );
    let late = (taken - expired).to_std().unwrap_or_default();
    assert!(
        late <= RENEW + Duration::from_secs(2),
        "k0 taken over {late:?} after its holder's lease expired (renewal every {RENEW:?})"
    );
}

/// `keyrotd_store_writes_total` of `k0` on replica `r`, every store and outcome.
async fn store_writes(r: &Replica) -> f64 {
    r.daemon
        .metrics()
        .await
        .sum("keyrotd_store_writes_total", &[("key", "k0")])
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_holder_killed_between_regenerate_and_store_is_taken_over_and_recovered() {
    let world = World::start(WorldOptions::default()).await;
    let (holder, other) = subject_holding_k0(&world, "after_regenerate=sleep(60000)").await;
    let (holder_id, other_id) = (id_of(&world, &holder).await, id_of(&world, &other).await);
    let rs = [&holder, &other];

    let (status, answer) = holder.rotate("k0", "test: killed mid-rotation").await;
    assert_eq!(status, 202, "{answer}");
    // The portal rotated and the shared journal says `storing`: the new key exists only in the
    // holder's memory when it dies.
    wait_k0(&world, &rs, "storing", |(_, _, phase)| phase == "storing").await;
    assert_eq!(regenerations(&world, 0).await, 1);
    let (_, fence, _) = k0_doc(&world).await;
    let takeovers = |m: &crate::support::metrics::Scrape| {
        m.get("keyrotd_lease_takeovers_total", &[("key", "k0")])
    };
    let takeovers_before = takeovers(&other.daemon.metrics().await);
    holder.kill();

    wait_k0(&world, &rs, "the other replica holding k0", |(h, f, _)| {
        *h == other_id && *f == fence + 1
    })
    .await;
    assert_taken_over_in_time(&world, &holder_id).await;
    // Recovered as after a crash: the portal rotated to a key no destination holds, so it is
    // re-rotated (crash_recovery), and every destination ends with the portal's active key.
    wait_k0(&world, &rs, "idle", |(_, _, phase)| phase == "idle").await;
    eventually(Duration::from_secs(60), "k0 consistent", || {
        world.consistent(0)
    })
    .await;
    world.assert_consistent(0).await;
    assert_eq!(regenerations(&world, 0).await, 2, "{}", logs(&rs));
    let m = other.daemon.metrics().await;
    assert_eq!(takeovers(&m) - takeovers_before, 1.0);
    assert_eq!(
        m.get(
            "keyrotd_rerotations_total",
            &[("key", "k0"), ("reason", "crash_recovery")]
        ),
        1.0
    );
    // The re-rotation's key is the one the taker audited; the writes carry its fencing number.
    let issued = issued(&world, 0).await;
    let audited = audited_regenerations(&[&other]);
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(issued.last(), Some(&audited[0].new_key_id));
    let meta = world.kv_metadata("apps/k0").await;
    assert_eq!(
        meta["custom_metadata"]["keyrotd_fence"],
        (fence + 1).to_string()
    );
    // `keyrotd status` on either host shows the lease and the journal from the key's document.
    let (code, report, err) = world.status(&holder, "k0");
    assert_eq!(code, 0, "{err}");
    assert_eq!(report["lease"]["holder"], other_id.as_str(), "{report:#}");
    assert_eq!(report["lease"]["fence"], fence + 1, "{report:#}");
    assert_eq!(report["phase"], "idle", "{report:#}");
    assert_eq!(report["drift"], false, "{report:#}");
    let status = vec![("keyrotd status".to_string(), format!("{report}\n{err}"))];
    world.assert_no_secret_in(&rs, status).await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_holder_paused_before_regenerate_past_its_lease_does_not_regenerate_when_resumed() {
    let world = World::start(WorldOptions::default()).await;
    let (paused, other) = subject_holding_k0(&world, "before_regenerate=1*sleep(5000)").await;
    let (paused_id, other_id) = (id_of(&world, &paused).await, id_of(&world, &other).await);
    let rs = [&paused, &other];

    let (status, answer) = paused.rotate("k0", "test: paused before regenerate").await;
    assert_eq!(status, 202, "{answer}");
    let rotation = answer["rotation_id"]
        .as_str()
        .expect("rotation_id")
        .to_string();
    // The journal says `regenerating` (a check-and-set write under its lease); nothing sent yet.
    wait_k0(&world, &rs, "regenerating", |(_, _, phase)| {
        phase == "regenerating"
    })
    .await;
    let (_, fence, _) = k0_doc(&world).await;
    paused.daemon.signal("STOP");
    assert_eq!(regenerations(&world, 0).await, 0);

    // Its lease runs out: the other replica takes k0, finds the portal unchanged (the interrupted
    // regenerate changed nothing) and rotates it.
    wait_k0(&world, &rs, "k0 taken over and cleared", |(h, f, p)| {
        *h == other_id && *f == fence + 1 && p == "idle"
    })
    .await;
    assert_taken_over_in_time(&world, &paused_id).await;
    let (status, answer) = other.rotate("k0", "test: rotated by the new holder").await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["rotation_id"].as_str().expect("rotation_id");
    let record = other
        .daemon
        .wait_rotation(id, Duration::from_secs(60))
        .await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    assert_eq!(regenerations(&world, 0).await, 1);

    // Resumed, the paused replica is past its last journal write, one step from the regenerate.
    // It must stop there: its lease expired. Then its next round drops k0, and the key, which hashes
    // to it, comes back to it with a new fencing number: it has re-checked everything by then.
    paused.daemon.signal("CONT");
    wait_k0(
        &world,
        &rs,
        "k0 back with the resumed replica",
        |(h, f, _)| *h == paused_id && *f == fence + 2,
    )
    .await;
    let record = paused
        .daemon
        .wait_rotation(&rotation, Duration::from_secs(30))
        .await;
    assert_eq!(record["outcome"], "aborted", "{record:#}\n{}", logs(&rs));
    assert_eq!(
        regenerations(&world, 0).await,
        1,
        "the resumed replica sent a regenerate\n{}",
        logs(&rs)
    );
    world.assert_consistent(0).await;
    assert_every_regenerate_accounted(&world, 0, &rs).await;
    world.assert_no_secret_leaked(&rs).await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_holder_paused_with_an_issued_key_past_its_lease_writes_no_stale_key_when_resumed() {
    let world = World::start(WorldOptions::default()).await;
    let (paused, other) = subject_holding_k0(&world, "after_regenerate=1*sleep(5000)").await;
    let (paused_id, other_id) = (id_of(&world, &paused).await, id_of(&world, &other).await);
    let rs = [&paused, &other];

    let (status, answer) = paused.rotate("k0", "test: paused holding a new key").await;
    assert_eq!(status, 202, "{answer}");
    wait_k0(&world, &rs, "storing", |(_, _, phase)| phase == "storing").await;
    let (_, fence, _) = k0_doc(&world).await;
    paused.daemon.signal("STOP");
    assert_eq!(regenerations(&world, 0).await, 1);

    // The other replica takes k0 over: the key the paused one holds is nowhere, so it re-rotates.
    wait_k0(&world, &rs, "k0 taken over", |(h, f, _)| {
        *h == other_id && *f == fence + 1
    })
    .await;
    assert_taken_over_in_time(&world, &paused_id).await;
    wait_k0(&world, &rs, "idle", |(_, _, phase)| phase == "idle").await;
    eventually(Duration::from_secs(60), "k0 consistent", || {
        world.consistent(0)
    })
    .await;
    assert_eq!(regenerations(&world, 0).await, 2);
    let taker_key = world.destinations(0).await;

    // Resumed with a dead key in memory: it must not write it anywhere.
    paused.daemon.signal("CONT");
    wait_k0(
        &world,
        &rs,
        "k0 back with the resumed replica",
        |(h, f, _)| *h == paused_id && *f == fence + 2,
    )
    .await;
    assert_eq!(
        world.destinations(0).await,
        taker_key,
        "a destination changed after the resume\n{}",
        logs(&rs)
    );
    world.assert_consistent(0).await;
    assert_eq!(store_writes(&paused).await, 0.0, "{}", logs(&rs));
    assert_eq!(regenerations(&world, 0).await, 2);
    let meta = world.kv_metadata("apps/k0").await;
    assert_eq!(
        meta["custom_metadata"]["keyrotd_fence"],
        (fence + 1).to_string(),
        "the last write is the taker's"
    );
    world.assert_no_secret_leaked(&rs).await;
}

/// Sleeps until `offset` past the next multiple of the 5-second schedule (due times are on them).
async fn after_next_due_time(offset: Duration) {
    let now = Utc::now();
    let into = now.timestamp_millis().rem_euclid(PERIOD_S * 1000);
    let to_next = Duration::from_millis((PERIOD_S * 1000 - into) as u64);
    tokio::time::sleep(to_next + offset).await;
}

/// Per key, how many keys its portal has issued so far.
async fn issued_counts(world: &World) -> Vec<usize> {
    let mut counts = Vec::new();
    for i in 0..world.o.keys {
        counts.push(issued(world, i).await.len());
    }
    counts
}

/// Every key the portals issued after `since` (per key, counts from [`issued_counts`]) is one the
/// replica `by` audited: nobody else regenerated.
async fn assert_only_regenerated_by(world: &World, since: &[usize], by: &Replica, what: &str) {
    let mut at_portal = Vec::new();
    for (i, from) in since.iter().enumerate() {
        at_portal.push(issued(world, i).await[*from..].to_vec());
    }
    let not_audited = || {
        let audited: Vec<String> = audited_regenerations(&[by])
            .into_iter()
            .map(|a| a.new_key_id)
            .collect();
        at_portal
            .iter()
            .enumerate()
            .flat_map(|(i, ids)| ids.iter().map(move |id| (i, id)))
            .filter(|(_, id)| !audited.contains(id))
            .map(|(i, id)| format!("k{i}: {id}"))
            .collect::<Vec<_>>()
    };
    // A regenerate is audited as soon as its answer is in the journal: one that answered just now
    // is given up to AUDIT_GRACE to be. A key someone else regenerated never is.
    let start = Instant::now();
    while !not_audited().is_empty() && start.elapsed() < AUDIT_GRACE {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let missing = not_audited();
    assert!(
        missing.is_empty(),
        "the portals issued {missing:?}, which {what} did not send\n{}",
        by.log_text()
    );
}

/// How long a regenerate's answer may take to reach the audit log of the replica that sent it.
const AUDIT_GRACE: Duration = Duration::from_secs(10);

/// Waits until `r` answers `/readyz` with 200.
async fn wait_ready(r: &Replica) {
    eventually(Duration::from_secs(60), "/readyz 200", || async {
        r.daemon.get("/readyz").await.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_cut_off_from_openbao_stops_while_another_takes_its_keys_over() {
    // OpenBao holds the leases only: the keys go to AWS and files, which the cut-off replica still
    // reaches, so nothing but the lease stands between it and a regenerate.
    // Eight keys: the cut-off replica gets several, so the third replica below (which must be the
    // owner of one it tried, against two running replicas) is found in a few tries.
    let world = World::start(WorldOptions {
        keys: 8,
        schedule: Some(EVERY_5S.into()),
        with_vault_destination: false,
        ..WorldOptions::default()
    })
    .await;
    let keys = world.keys();
    let host = world.replica().await;
    let running = [id_of(&world, &host).await];
    // Link 0 carries its traffic to OpenBao only; link 1 everything else (portals, moto, its API).
    let ns = Netns::new(2);
    let (cut_off, its_keys) = spawn_owner(&world, &keys, &running, 16, async || {
        world.replica_in(&ns, 0, 1).await
    })
    .await
    .expect("16 candidates in a row owned none of the 8 keys");
    let rs = [&cut_off, &host];
    let ids = wait_settled(&world, &rs).await;
    // From its namespace it does its work: each of its keys rotated on schedule.
    eventually(
        Duration::from_secs(30),
        "its keys rotated by it",
        || async {
            let done = audited_regenerations(&[&cut_off]);
            its_keys.iter().all(|k| done.iter().any(|a| &a.key == k))
        },
    )
    .await;

    // Partition, two seconds after a due time (its rotations have ended): it still reaches the
    // portals, moto and the key files, but not OpenBao.
    after_next_due_time(Duration::from_secs(2)).await;
    let before = issued_counts(&world).await;
    ns.cut(0);
    let cut_at = Utc::now();
    let start = Instant::now();
    for key in &its_keys {
        wait_k(&world, &rs, key, &ids[1]).await;
    }
    let took = start.elapsed();
    // Two due times with the new holder, while the cut-off replica's schedule keeps firing.
    tokio::time::sleep(Duration::from_secs(2 * PERIOD_S as u64 + 1)).await;
    for i in 0..keys.len() {
        eventually(Duration::from_secs(20), "consistent while cut off", || {
            world.consistent(i)
        })
        .await;
    }
    let done = audited_regenerations(&[&host]);
    for key in &its_keys {
        assert!(
            done.iter().any(|a| &a.key == key),
            "{key} rotated by the replica that took it over"
        );
    }
    println!("keys taken over {took:?} after the partition (ttl {TTL:?})");
    // Its schedule kept firing meanwhile: rotations started, and ended without a regenerate. Every
    // key of its tried, if that comes within 30 s (the more keys, the likelier a third replica
    // below is the owner of one).
    let start = Instant::now();
    let mut tried = keys_tried_since(&cut_off, cut_at);
    while tried.len() < its_keys.len() {
        if start.elapsed() > Duration::from_secs(30) {
            assert!(
                !tried.is_empty(),
                "no rotation of the cut-off replica ended\n{}",
                logs(&rs)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        tried = keys_tried_since(&cut_off, cut_at);
    }
    assert_only_regenerated_by(&world, &before, &host, "the replica that took the keys").await;

    // A third replica joins meanwhile, one that a key the cut-off replica tried belongs to: that
    // key will not come back to it, and the journal write it could not make must not keep it
    // unready for good.
    let (cut_id, host_id) = (ids[0].clone(), ids[1].clone());
    let (found, rejected) = spawn_until(
        &world,
        48,
        async || world.replica().await,
        |id| {
            let all = [cut_id.clone(), host_id.clone(), id.clone()];
            tried
                .iter()
                .filter(|k| owner(k, &all) == Some(id))
                .cloned()
                .collect()
        },
    )
    .await;
    let (third, _) = found
        .unwrap_or_else(|| panic!("48 candidates in a row were the owner of none of {tried:?}"));
    let rs = [&cut_off, &host, &third];
    let everyone: Vec<&Replica> = rs.iter().copied().chain(rejected.iter()).collect();

    // Healed: the leases settle again over the three, and each serves its keys.
    ns.heal(0);
    let healed = Utc::now();
    wait_settled(&world, &rs).await;
    for r in &rs {
        wait_ready(r).await;
    }
    eventually(
        Duration::from_secs(30),
        "every key rotated by its holder",
        || async {
            let done = audited_regenerations(&rs);
            keys.iter()
                .all(|k| done.iter().any(|a| &a.key == k && a.started > healed))
        },
    )
    .await;
    for r in &rs {
        r.daemon.admin_post("/v1/pause", 200).await;
    }
    wait_idle(&world, &rs).await;
    for i in 0..keys.len() {
        world.assert_consistent(i).await;
        assert_every_regenerate_accounted(&world, i, &everyone).await;
    }
    world.assert_no_secret_leaked(&everyone).await;
}

/// The keys of `r`'s rotations that started after `since` and have ended (finished or aborted).
fn keys_tried_since(r: &Replica, since: DateTime<Utc>) -> Vec<String> {
    let audit = r.audit();
    let ended = |id: &Value| {
        audit.iter().any(|a| {
            (a["event"] == "finished" || a["event"] == "aborted") && a["rotation_id"] == *id
        })
    };
    let mut keys: Vec<String> = audit
        .iter()
        .filter(|a| a["event"] == "started")
        .filter(|a| {
            serde_json::from_value::<DateTime<Utc>>(a["ts"].clone()).is_ok_and(|t| t > since)
        })
        .filter(|a| ended(&a["rotation_id"]))
        .filter_map(|a| a["key"].as_str().map(String::from))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Waits until `key`'s document names `holder`.
async fn wait_k(world: &World, rs: &[&Replica], key: &str, holder: &str) {
    let start = Instant::now();
    while world.key_doc(key).await["holder"] != holder {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{key} never taken by {holder}: {}\n{}",
            world.key_doc(key).await,
            logs(rs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openbao_restarted_under_three_replicas_no_regenerate_while_down_then_service_resumes() {
    let mut world = World::start(WorldOptions {
        keys: 3,
        schedule: Some(EVERY_5S.into()),
        persistent_openbao: true,
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
    eventually(Duration::from_secs(30), "every key rotated", || async {
        let done = audited_regenerations(&rs);
        world
            .keys()
            .iter()
            .all(|k| done.iter().any(|a| &a.key == k))
    })
    .await;

    after_next_due_time(Duration::from_secs(2)).await;
    world.server.raft().stop();
    let before = issued_counts(&world).await;
    // Down for two lease lifetimes and two due times of every key: nobody regenerates.
    let down = 2 * TTL + Duration::from_secs(2 * PERIOD_S as u64);
    crate::support::holds_for(down, "no regenerate while OpenBao is down", || async {
        issued_counts(&world).await == before
    })
    .await;
    let mut takeovers = Vec::new();
    for r in &rs {
        let m = r.daemon.metrics().await;
        assert!(m.get("keyrotd_lease_renew_failures_total", &[]) > 0.0);
        takeovers.push(m.sum("keyrotd_lease_takeovers_total", &[]));
    }

    world.server.raft().start_again().await;
    let world = world;
    assert_eq!(wait_settled(&world, &rs).await, ids);
    for r in &rs {
        wait_ready(r).await;
    }
    // Nobody died: the leases settle without a take-over.
    for (n, r) in rs.iter().enumerate() {
        let m = r.daemon.metrics().await;
        assert_eq!(
            m.sum("keyrotd_lease_takeovers_total", &[]),
            takeovers[n],
            "replica {n} took a key over after the restart\n{}",
            logs(&rs)
        );
    }
    // Service resumes: each key rotates through its holder; a follower refuses, naming it.
    for key in world.keys().iter() {
        let holder = ids
            .iter()
            .position(|id| Some(id) == owner(key, &ids))
            .expect("holder");
        let follower = (holder + 1) % rs.len();
        let (status, answer) = rs[follower].rotate(key, "test: sent to a follower").await;
        assert_eq!(status, 409, "{answer}");
        assert!(
            answer.to_string().contains(&ids[holder]),
            "the refusal names the holder {}: {answer}",
            ids[holder]
        );
        let (status, answer) = rs[holder].rotate(key, "test: after the restart").await;
        assert_eq!(status, 202, "{answer}");
        let id = answer["rotation_id"].as_str().expect("rotation_id");
        let record = rs[holder]
            .daemon
            .wait_rotation(id, Duration::from_secs(60))
            .await;
        assert_eq!(record["outcome"], "success", "{record:#}");
    }
    for r in &rs {
        r.daemon.admin_post("/v1/pause", 200).await;
    }
    wait_idle(&world, &rs).await;
    for i in 0..world.o.keys {
        if !world.consistent(i).await {
            panic!(
                "k{i} inconsistent: {:?}\n{}",
                world.destinations(i).await,
                logs(&rs)
            );
        }
        assert_every_regenerate_accounted(&world, i, &rs).await;
    }
    world.assert_no_secret_leaked(&rs).await;
}

/// OpenBao's audit log: (time, path) of every request it served.
fn openbao_requests(log: &std::path::Path) -> Vec<(DateTime<Utc>, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "request")
        .filter_map(|v| {
            let t = DateTime::parse_from_rfc3339(v["time"].as_str()?).ok()?;
            Some((
                t.with_timezone(&Utc),
                v["request"]["path"].as_str()?.to_string(),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_traffic_of_three_replicas_with_300_keys_stays_under_20_requests_per_second() {
    // Keys that never rotate, on one portal, written to files only: the OpenBao traffic left is the
    // coordination's. The default ttl (30 s), as documented.
    let world = World::start(WorldOptions {
        keys: 300,
        portal_per_key: false,
        with_aws: false,
        with_vault_destination: false,
        ttl: "30s".into(),
        openbao_audit: true,
        ..WorldOptions::default()
    })
    .await;
    let (a, b, c) = (
        world.replica().await,
        world.replica().await,
        world.replica().await,
    );
    let rs = [&a, &b, &c];
    wait_settled(&world, &rs).await;

    let window = Duration::from_secs(60);
    let from = Utc::now();
    tokio::time::sleep(window).await;
    let to = Utc::now();
    let log = world.dir.path().join("openbao-audit.jsonl");
    let requests: Vec<(DateTime<Utc>, String)> = openbao_requests(&log)
        .into_iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .collect();
    let leases = requests
        .iter()
        .filter(|(_, p)| {
            p.starts_with(&format!("secret/data/{LEASES}/"))
                || p.starts_with(&format!("secret/metadata/{LEASES}"))
        })
        .count();
    let seconds = (to - from).as_seconds_f64();
    let rate = leases as f64 / seconds;
    println!(
        "lease traffic, 3 replicas, 300 keys, ttl 30s, steady state: {leases} requests in {seconds:.0} s = {rate:.2} requests/s (all OpenBao requests: {:.2}/s)",
        requests.len() as f64 / seconds
    );
    assert!(
        leases > 0,
        "OpenBao's audit log shows no lease traffic: {}",
        log.display()
    );
    assert!(rate < 20.0, "{rate:.2} lease requests per second");
    // Still one holder per key.
    let held = held_by(&rs, &world.keys()).await;
    assert!(held.values().all(|h| h.len() == 1));
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_stalled_while_its_key_left_and_came_back_does_not_regenerate() {
    let world = World::start(WorldOptions::default()).await;
    // The subject's first rotation stalls right after preflight, before it records anything.
    let (stalled, other) = subject_holding_k0(&world, "after_preflight=1*sleep(25000)").await;
    let (stalled_id, other_id) = (id_of(&world, &stalled).await, id_of(&world, &other).await);
    let rs = [&stalled, &other];

    let (status, answer) = stalled.rotate("k0", "test: stalled after preflight").await;
    assert_eq!(status, 202, "{answer}");
    let rotation = answer["rotation_id"]
        .as_str()
        .expect("rotation_id")
        .to_string();
    eventually(Duration::from_secs(30), "preflight passed", || async {
        let (_, record) = stalled
            .daemon
            .get(&format!("/v1/rotations/{rotation}"))
            .await;
        record["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["event"] == "preflight_ok"))
    })
    .await;
    let (_, fence, _) = k0_doc(&world).await;
    stalled.daemon.signal("STOP");

    // The other replica takes k0 over and rotates it; resumed, the stalled replica gets it back
    // (it hashes there) while its old rotation is still stalled.
    wait_k0(&world, &rs, "k0 taken over", |(h, f, _)| {
        *h == other_id && *f == fence + 1
    })
    .await;
    let (status, answer) = other.rotate("k0", "test: rotated by the new holder").await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["rotation_id"].as_str().expect("rotation_id");
    let record = other
        .daemon
        .wait_rotation(id, Duration::from_secs(60))
        .await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    stalled.daemon.signal("CONT");
    wait_k0(
        &world,
        &rs,
        "k0 back with the stalled replica",
        |(h, f, _)| *h == stalled_id && *f == fence + 2,
    )
    .await;

    // The old rotation wakes up holding the key again, under a later fencing number: it was started
    // under the first, and the key was rotated by another replica in between. No regenerate.
    let record = stalled
        .daemon
        .wait_rotation(&rotation, Duration::from_secs(40))
        .await;
    assert_eq!(record["outcome"], "aborted", "{record:#}\n{}", logs(&rs));
    assert_eq!(regenerations(&world, 0).await, 1, "{}", logs(&rs));
    world.assert_consistent(0).await;
    assert_every_regenerate_accounted(&world, 0, &rs).await;
    world.assert_no_secret_leaked(&rs).await;
}
