//! Benchmark: the invalidation window (regenerate response → last destination confirmed and last
//! reload hook answered) of real rotations through the release daemon, beside the FLOOR: the same work
//! done as raw requests from one warm client, in the same run, against the same OpenBao, moto and
//! hooks. Prints figures; asserts nothing about speed.
//!
//! The rotation: one key with two destinations, a field of an OpenBao KV v2 secret kept beside another
//! field, and a field of a JSON AWS secret (moto) kept beside another; three dependents whose signed
//! HTTP reload hooks (the dependent simulator, checking the signature and answering 200 without
//! reading the key) wait for both stores. The floor, from a new secret in hand: one write and one
//! read-back per store (KV v2 with check-and-set, `PutSecretValue` then `GetSecretValue`), the two
//! stores in parallel, then the three hooks in parallel, signed. keyrotd and the floor alternate, one
//! rotation each, after two warm-up rounds that are not counted.
//!
//! With `DELAY_MS=5`, every store and hook is reached through a `keyrotd-sim proxy` adding 5 ms per
//! direction (keyrotd and the floor each through their own proxies, so the requests each sent are
//! counted apart; keyrotd reaches the portal through one too, without delay, to time its regenerates);
//! the benchmark then prints the window divided by the round-trip time, how many round trips each
//! spends, and keyrotd's requests per rotation before the regenerate, inside the window and after the
//! last hook. `DELAY_MS=0` gives the same counts on loopback (through the proxies, no delay).
//!
//!     cargo bench --bench invalidation_window                 # loopback, 30 rotations
//!     ROTATIONS=100 cargo bench --bench invalidation_window
//!     DELAY_MS=5 cargo bench --bench invalidation_window      # 5 ms per direction to stores and hooks

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::join_all;
use keyrotd::sim::proxy::LoggedRequest;
use serde_json::{Value, json};
use support::daemon::{Daemon, env_with, write_config};
use support::services::{Bao, Hook, Moto, Portal, Proxy, REGION};
use support::{BenchDir, free_port, loadavg, percentile, token};

const PATH_KEYROTD: &str = "bench/keyrotd";
const PATH_FLOOR: &str = "bench/floor";
const WARMUP: usize = 2;

/// Where one party (keyrotd or the floor) reaches the stores and hooks: directly, or through its own
/// delaying proxies.
struct Route {
    vault: String,
    aws: String,
    hooks: Vec<String>,
    /// Vault, AWS, then one per hook; none when reached directly.
    proxies: Vec<Proxy>,
    /// keyrotd's way to the portal (not delayed), when it goes through proxies.
    portal: Option<Proxy>,
}

impl Route {
    fn new(dir: &std::path::Path, party: &str, w: &World, delay_ms: Option<u64>) -> Route {
        let Some(delay) = delay_ms else {
            return Route {
                vault: w.bao.addr.clone(),
                aws: w.moto.endpoint.clone(),
                hooks: w.hooks.iter().map(Hook::reload_url).collect(),
                proxies: Vec::new(),
                portal: None,
            };
        };
        let portal =
            (party == "keyrotd").then(|| Proxy::start(dir, "portal-proxy", &w.portal.url, 0));
        let mut proxies = vec![
            Proxy::start(dir, &format!("{party}-vault-proxy"), &w.bao.addr, delay),
            Proxy::start(dir, &format!("{party}-aws-proxy"), &w.moto.endpoint, delay),
        ];
        for (i, h) in w.hooks.iter().enumerate() {
            proxies.push(Proxy::start(
                dir,
                &format!("{party}-hook{i}-proxy"),
                &h.url,
                delay,
            ));
        }
        Route {
            vault: proxies[0].url.clone(),
            aws: proxies[1].url.clone(),
            hooks: proxies[2..]
                .iter()
                .map(|p| format!("{}/-/reload", p.url))
                .collect(),
            proxies,
            portal,
        }
    }

    fn portal_url<'a>(&'a self, w: &'a World) -> &'a str {
        self.portal
            .as_ref()
            .map_or(w.portal.url.as_str(), |p| p.url.as_str())
    }

    async fn reset(&self) {
        for p in self.proxies.iter().chain(&self.portal) {
            p.reset().await;
        }
    }

    /// Requests per round through each proxy, `(vault, aws, hooks)`, each with the new connections.
    async fn requests_per(&self, rounds: usize) -> Option<(String, String, String)> {
        if self.proxies.is_empty() {
            return None;
        }
        let vault = self.proxies[0].counters().await;
        let aws = self.proxies[1].counters().await;
        let (mut hooks, mut hook_connections) = (0, 0);
        for p in &self.proxies[2..] {
            let c = p.counters().await;
            hooks += c.requests;
            hook_connections += c.connections;
        }
        let per = |n: u64| n as f64 / rounds as f64;
        let routes = |m: &std::collections::BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {:.2}", per(*v)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Some((
            format!(
                "{:.2} ({}) on {:.2} new connections",
                per(vault.requests),
                routes(&vault.by_request),
                per(vault.connections)
            ),
            format!(
                "{:.2} ({}) on {:.2} new connections",
                per(aws.requests),
                routes(&aws.by_target),
                per(aws.connections)
            ),
            format!(
                "{:.2} on {:.2} new connections",
                per(hooks),
                per(hook_connections)
            ),
        ))
    }
}

struct World {
    bao: Bao,
    moto: Moto,
    portal: Portal,
    hooks: Vec<Hook>,
    hook_key: String,
}

#[tokio::main]
async fn main() {
    let n: usize = env_number("ROTATIONS").unwrap_or(30);
    // Unset: direct on loopback. Set (even to 0): through the proxies.
    let delay_ms = env_number("DELAY_MS").map(|d| d as u64);
    let dir = BenchDir::new("keyrotd-bench-window-");
    let world = World::start(&dir.path).await;
    world.seed().await;
    let keyrotd_route = Route::new(&dir.path, "keyrotd", &world, delay_ms);
    let floor_route = Route::new(&dir.path, "floor", &world, delay_ms);
    let admin_token = token(32);
    let listen = format!("127.0.0.1:{}", free_port());
    let state = dir.path.join("state");
    let config = write_config(&dir.path, &world.config(&keyrotd_route, &state, &listen, n));
    let env = env_with(&[
        ("BENCH_ADMIN_TOKEN", &admin_token),
        ("BENCH_PORTAL_TOKEN", &world.portal.token),
        ("BENCH_VAULT_TOKEN", &world.bao.root_token),
        ("BENCH_HOOK_KEY", &world.hook_key),
    ]);
    let mut daemon = Daemon::spawn(&dir.path, &config, &listen, &admin_token, &env);
    daemon.wait_ready(Duration::from_secs(60)).await;
    daemon
        .wait_observed(Duration::from_millis(100), Duration::from_secs(60))
        .await;
    let mut floor = Floor::new(&world, &floor_route).await;

    let mut keyrotd_ms = Vec::with_capacity(n);
    let mut floor_ms = Vec::with_capacity(n);
    let mut warmup = Vec::new();
    let mut posted = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let at = Utc::now();
        let k = keyrotd_window(&mut daemon, i).await;
        let f = floor.once(&world).await;
        if i < WARMUP {
            warmup.push((k, f));
            if i + 1 == WARMUP {
                keyrotd_route.reset().await;
                floor_route.reset().await;
            }
        } else {
            keyrotd_ms.push(k);
            floor_ms.push(f);
            posted.push(at);
        }
    }
    world.check(WARMUP + n, 2 * (WARMUP + n)).await;
    let clean = daemon.stop();
    report(n, delay_ms, &keyrotd_ms, &floor_ms, &warmup, clean);
    if let Some(d) = delay_ms {
        report_requests(n, &keyrotd_route, &floor_route).await;
        report_phases(&keyrotd_route, &posted, &keyrotd_ms).await;
        if d > 0 {
            report_round_trips(d, &world, &floor_route, &keyrotd_ms, &floor_ms).await;
        }
    }
    println!("load average at the end: {}", loadavg());
}

fn env_number(name: &str) -> Option<usize> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

impl World {
    async fn start(dir: &std::path::Path) -> World {
        let bao = Bao::start(dir).await;
        let moto = Moto::start(dir).await;
        let portal = Portal::start(dir, None);
        let hook_key = token(32);
        let mut hooks = Vec::new();
        for i in 0..3 {
            hooks.push(Hook::start(dir, &format!("hook{i}"), &portal.url, &hook_key).await);
        }
        World {
            bao,
            moto,
            portal,
            hooks,
            hook_key,
        }
    }

    /// keyrotd's destinations hold the portal's key, the floor's a random one; each beside a field
    /// that every write must keep.
    async fn seed(&self) {
        let current = self.portal.initial_secret(&self.portal.url).await;
        let aws = self.moto.client().await;
        for (path, secret) in [(PATH_KEYROTD, current), (PATH_FLOOR, token(40))] {
            let value = json!({ "api_key": secret, "other": "kept" });
            self.bao.kv_put(path, value.clone()).await;
            Moto::create_secret(&aws, path, &value.to_string()).await;
        }
    }

    fn config(&self, route: &Route, state: &std::path::Path, listen: &str, n: usize) -> String {
        let mut text = format!(
            r#"[daemon]
state_dir = {state:?}
listen = "{listen}"
admin_token = {{ env = "BENCH_ADMIN_TOKEN" }}
reconcile_interval = "0s"

[providers.portal]
kind = "aos"
base_url = "{portal}"
management_token = {{ env = "BENCH_PORTAL_TOKEN" }}
account_id = "acct_42"

[stores.vault]
kind = "vault"
address = "{vault}"
token = {{ env = "BENCH_VAULT_TOKEN" }}

[stores.aws]
kind = "aws"
region = "{REGION}"
endpoint_url = "{aws}"

[[keys]]
name = "billing"
provider = "portal"
watch = "0s"
max_regenerations_per_day = {max_regen}

  [[keys.destinations]]
  store = "vault"
  path = "{PATH_KEYROTD}"
  field = "api_key"

  [[keys.destinations]]
  store = "aws"
  secret_id = "{PATH_KEYROTD}"
  field = "api_key"
"#,
            portal = route.portal_url(self),
            vault = route.vault,
            aws = route.aws,
            max_regen = n + WARMUP + 10,
        );
        for (i, url) in route.hooks.iter().enumerate() {
            text.push_str(&format!(
                "\n  [[keys.dependents]]\n  name = \"hook{i}\"\n  \
                 reload = {{ url = \"{url}\", timeout = \"5s\", signing_key = {{ env = \"BENCH_HOOK_KEY\" }} }}\n"
            ));
        }
        text
    }

    /// The end state: keyrotd's destinations hold the portal's active key, both beside the kept
    /// field; every hook answered every reload (keyrotd's and the floor's).
    async fn check(&self, rotations: usize, reloads_each: usize) {
        let active = self.portal.state(&self.portal.url).await;
        assert_eq!(
            active.regenerations as usize, rotations,
            "one regenerate per rotation"
        );
        let aws = self.moto.client().await;
        let vault = self.bao.kv_get(PATH_KEYROTD).await;
        let aws = Moto::json_value(&aws, PATH_KEYROTD).await;
        for (store, v) in [("OpenBao", vault), ("AWS", aws)] {
            let held = v["api_key"]
                .as_str()
                .map(|s| keyrotd::secret::fingerprint_bytes(s.as_bytes()));
            assert_eq!(
                held,
                Some(active.fingerprint.clone()),
                "{store} holds the active key"
            );
            assert_eq!(v["other"], "kept", "{store} kept the other field");
        }
        for h in &self.hooks {
            assert_eq!(
                h.reloads().await as usize,
                reloads_each,
                "every reload answered 200"
            );
        }
    }
}

/// Rotates once through the admin API and returns keyrotd's own invalidation window, in ms.
async fn keyrotd_window(daemon: &mut Daemon, i: usize) -> f64 {
    let id = daemon
        .start_rotation("billing", &format!("bench {i}"))
        .await
        .unwrap_or_else(|(s, b)| panic!("rotation refused: HTTP {s}: {b}"));
    let record = daemon.wait_rotation(&id, Duration::from_secs(60)).await;
    assert_eq!(record["outcome"], "success", "{record:#}");
    let window = record["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["detail"].as_str())
        .find_map(|d| d.split("invalidation window ").nth(1))
        .and_then(|w| w.trim_end_matches('s').parse::<f64>().ok())
        .expect("the finished event carries the invalidation window");
    window * 1000.0
}

/// The floor: the rotation's work as raw requests from one warm client per protocol.
struct Floor {
    http: reqwest::Client,
    aws: aws_sdk_secretsmanager::Client,
    vault: String,
    vault_token: String,
    hooks: Vec<String>,
    hook_key: String,
    /// The KV v2 version the next check-and-set write expects.
    version: u64,
}

impl Floor {
    async fn new(w: &World, route: &Route) -> Floor {
        let http = reqwest::Client::new();
        let meta: Value = http
            .get(format!("{}/v1/secret/data/{PATH_FLOOR}", route.vault))
            .header("X-Vault-Token", &w.bao.root_token)
            .send()
            .await
            .expect("OpenBao read")
            .json()
            .await
            .expect("OpenBao answers JSON");
        Floor {
            version: meta["data"]["metadata"]["version"]
                .as_u64()
                .expect("a KV v2 version"),
            http,
            aws: Moto::client_for(&route.aws).await,
            vault: route.vault.clone(),
            vault_token: w.bao.root_token.clone(),
            hooks: route.hooks.clone(),
            hook_key: w.hook_key.clone(),
        }
    }

    /// One round: a new secret written to both stores and read back (in parallel), then the three
    /// hooks (in parallel). Returns its duration in ms.
    async fn once(&mut self, _: &World) -> f64 {
        let secret = token(40);
        let start = Instant::now();
        let (version, ()) =
            tokio::join!(self.vault_write_read(&secret), self.aws_write_read(&secret));
        self.version = version;
        let body = json!({
            "key": "floor",
            "rotation_id": uuid::Uuid::new_v4(),
            "key_id": format!("ak_floor{}", token(18)),
            "rotated_at": chrono::Utc::now(),
        })
        .to_string();
        let now = chrono::Utc::now().timestamp();
        let signature = keyrotd::notify::signature(self.hook_key.as_bytes(), now, body.as_bytes());
        let calls = self.hooks.iter().map(|url| {
            self.http
                .post(url)
                .header("Content-Type", "application/json")
                .header(keyrotd::notify::TIMESTAMP_HEADER, now.to_string())
                .header(keyrotd::notify::SIGNATURE_HEADER, &signature)
                .body(body.clone())
                .send()
        });
        for r in join_all(calls).await {
            let status = r.expect("hook answers").status();
            assert!(status.is_success(), "hook answered {status}");
        }
        start.elapsed().as_secs_f64() * 1000.0
    }

    /// KV v2 write with check-and-set, the other field written as it is, then a read-back. Returns
    /// the new version.
    async fn vault_write_read(&self, secret: &str) -> u64 {
        let url = format!("{}/v1/secret/data/{PATH_FLOOR}", self.vault);
        let body = json!({ "options": { "cas": self.version }, "data": { "api_key": secret, "other": "kept" } });
        let written: Value = self
            .http
            .post(&url)
            .header("X-Vault-Token", &self.vault_token)
            .json(&body)
            .send()
            .await
            .expect("OpenBao write")
            .json()
            .await
            .expect("OpenBao write answers JSON");
        let read: Value = self
            .http
            .get(&url)
            .header("X-Vault-Token", &self.vault_token)
            .send()
            .await
            .expect("OpenBao read")
            .json()
            .await
            .expect("OpenBao read answers JSON");
        assert_eq!(read["data"]["data"]["api_key"], secret, "OpenBao read-back");
        written["data"]["version"]
            .as_u64()
            .expect("the written version")
    }

    /// `PutSecretValue` of the whole JSON (idempotent with a request token), then `GetSecretValue`.
    async fn aws_write_read(&self, secret: &str) {
        let value = json!({ "api_key": secret, "other": "kept" }).to_string();
        self.aws
            .put_secret_value()
            .secret_id(PATH_FLOOR)
            .secret_string(&value)
            .client_request_token(uuid::Uuid::new_v4().to_string())
            .send()
            .await
            .expect("moto PutSecretValue");
        let read = self
            .aws
            .get_secret_value()
            .secret_id(PATH_FLOOR)
            .send()
            .await
            .expect("moto GetSecretValue");
        assert_eq!(read.secret_string(), Some(value.as_str()), "AWS read-back");
    }
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn report(
    n: usize,
    delay_ms: Option<u64>,
    keyrotd: &[f64],
    floor: &[f64],
    warmup: &[(f64, f64)],
    clean: bool,
) {
    let (k, f) = (sorted(keyrotd), sorted(floor));
    let link = match delay_ms {
        None => "loopback".to_string(),
        Some(0) => "loopback through keyrotd-sim proxy (no delay)".to_string(),
        Some(d) => format!("{d} ms per direction to every store and hook (keyrotd-sim proxy)"),
    };
    println!(
        "invalidation window, {n} rotations each, {link}: 2 destinations (OpenBao KV v2 field, AWS JSON field), \
         3 signed HTTP hooks; release build, load average {}",
        loadavg()
    );
    let line = |name: &str, v: &[f64]| {
        println!(
            "  {name:<8} ms: p50 {:7.1}  p90 {:7.1}  max {:7.1}",
            percentile(v, 0.5),
            percentile(v, 0.9),
            v[v.len() - 1]
        );
    };
    line("floor", &f);
    line("keyrotd", &k);
    println!(
        "  keyrotd / floor: p50 {:.2}x  p90 {:.2}x",
        percentile(&k, 0.5) / percentile(&f, 0.5),
        percentile(&k, 0.9) / percentile(&f, 0.9)
    );
    let w: Vec<String> = warmup
        .iter()
        .map(|(k, f)| format!("keyrotd {k:.1} / floor {f:.1}"))
        .collect();
    println!("  warm-up rounds (not counted), ms: {}", w.join("; "));
    if !clean {
        println!("  (keyrotd did not exit on SIGTERM within 60 s and was killed)");
    }
}

async fn report_requests(n: usize, keyrotd: &Route, floor: &Route) {
    for (name, route) in [("keyrotd", keyrotd), ("floor", floor)] {
        if let Some((vault, aws, hooks)) = route.requests_per(n).await {
            println!("  {name} requests per rotation: OpenBao {vault}; AWS {aws}; hooks {hooks}");
        }
    }
}

/// The window in round trips: against the nominal round trip (twice the delay) and against the one
/// measured through a hook's proxy (the timer rounds each delay up to the next millisecond).
async fn report_round_trips(
    delay_ms: u64,
    w: &World,
    floor: &Route,
    keyrotd: &[f64],
    floor_ms: &[f64],
) {
    let http = reqwest::Client::new();
    let direct = format!("{}/_sim/state", w.hooks[0].url);
    let proxied = format!("{}/_sim/state", floor.proxies[2].url);
    let mut times = [Vec::new(), Vec::new()];
    for _ in 0..21 {
        for (i, url) in [&direct, &proxied].into_iter().enumerate() {
            let t = Instant::now();
            http.get(url)
                .send()
                .await
                .expect("hook state")
                .bytes()
                .await
                .expect("hook state body");
            times[i].push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let [direct, proxied] = times.map(|v| percentile(&sorted(&v[1..]), 0.5));
    let measured = proxied - direct;
    let nominal = 2.0 * delay_ms as f64;
    let (k, f) = (sorted(keyrotd), sorted(floor_ms));
    println!(
        "  round trip: nominal {nominal:.1} ms; measured through a proxy {measured:.1} ms (p50 of 20, warm)"
    );
    for (name, v) in [("floor", &f), ("keyrotd", &k)] {
        println!(
            "  {name:<8} window / RTT: p50 {:.2} ({:.2} measured)  p90 {:.2} ({:.2} measured)",
            percentile(v, 0.5) / nominal,
            percentile(v, 0.5) / measured,
            percentile(v, 0.9) / nominal,
            percentile(v, 0.9) / measured,
        );
    }
    println!(
        "  keyrotd - floor at p50: {:.1} ms = {:.2} round trips",
        percentile(&k, 0.5) - percentile(&f, 0.5),
        (percentile(&k, 0.5) - percentile(&f, 0.5)) / nominal
    );
}

/// One rotation's requests as the proxies saw them: its regenerate, its last hook request, and every
/// request from the rotation's API request to the next one, in time order.
struct Timeline {
    regen: DateTime<Utc>,
    end: DateTime<Utc>,
    requests: Vec<(&'static str, DateTime<Utc>, String)>,
}

impl Timeline {
    /// The rotation requested at `start` (the next one at `next`) in `logs` (`(where, log)`, the
    /// portal's first and the hooks' last).
    fn of(
        logs: &[(&'static str, Vec<LoggedRequest>)],
        start: DateTime<Utc>,
        next: DateTime<Utc>,
    ) -> Option<Timeline> {
        let within = |r: &&LoggedRequest| r.at >= start && r.at < next;
        let regen = logs[0]
            .1
            .iter()
            .filter(within)
            .find(|r| r.request.ends_with("/regenerate"))?
            .at;
        let end = logs[logs.len() - 1]
            .1
            .iter()
            .filter(within)
            .map(|r| r.at)
            .max()?;
        let mut requests: Vec<_> = logs
            .iter()
            .flat_map(|(place, log)| {
                log.iter().filter(within).map(|r| {
                    let what = r.target.clone().unwrap_or_else(|| r.request.clone());
                    (*place, r.at, what)
                })
            })
            .collect();
        requests.sort_by_key(|(_, at, _)| *at);
        Some(Timeline {
            regen,
            end,
            requests,
        })
    }

    fn phase(&self, at: DateTime<Utc>) -> &'static str {
        match at {
            t if t < self.regen => "before the regenerate",
            t if t <= self.end => "in the window",
            _ => "after the last hook",
        }
    }
}

/// When each request keyrotd sent fell, per rotation: before the regenerate, inside the invalidation
/// window (regenerate request to the last hook request), or after the last hook (until the next
/// rotation was requested); then the requests of the median rotation with their times from its
/// regenerate. Times are the proxies' arrival times; `posted` is when each counted rotation was
/// requested, `windows` its window as keyrotd reported it.
async fn report_phases(route: &Route, posted: &[DateTime<Utc>], windows: &[f64]) {
    let Some(portal) = &route.portal else { return };
    let mut hooks_log = Vec::new();
    for p in &route.proxies[2..] {
        hooks_log.extend(p.log().await);
    }
    let logs = [
        ("portal", portal.log().await),
        ("OpenBao", route.proxies[0].log().await),
        ("AWS", route.proxies[1].log().await),
        ("hooks", hooks_log),
    ];
    let timelines: Vec<Option<Timeline>> = (0..posted.len())
        .map(|j| {
            let next = posted
                .get(j + 1)
                .copied()
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            Timeline::of(&logs, posted[j], next)
        })
        .collect();
    let mut phases: BTreeMap<(usize, &str, String), u64> = BTreeMap::new();
    let order = [
        "before the regenerate",
        "in the window",
        "after the last hook",
    ];
    for t in timelines.iter().flatten() {
        for (place, at, what) in &t.requests {
            let phase = order.iter().position(|p| *p == t.phase(*at)).unwrap_or(0);
            *phases.entry((phase, place, what.clone())).or_default() += 1;
        }
    }
    println!("  keyrotd's requests per rotation, by when they were sent:");
    let n = posted.len().max(1) as f64;
    let mut last = usize::MAX;
    for ((phase, place, what), count) in &phases {
        if *phase != last {
            println!("    {}:", order[*phase]);
            last = *phase;
        }
        println!("      {place:<8} {:.2}  {what}", *count as f64 / n);
    }
    let mut by_window: Vec<usize> = (0..windows.len()).collect();
    by_window.sort_by(|a, b| windows[*a].total_cmp(&windows[*b]));
    let median = by_window[by_window.len() / 2];
    if let Some(t) = &timelines[median] {
        println!(
            "  the median rotation ({:.1} ms), each request's arrival after its regenerate:",
            windows[median]
        );
        for (place, at, what) in &t.requests {
            let ms = (*at - t.regen).num_microseconds().unwrap_or(0) as f64 / 1000.0;
            println!("    {ms:+8.1} ms  {place:<8} {what}");
        }
    }
}
