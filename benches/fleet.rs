//! Benchmark: keyrotd with a fleet of keys. For each fleet size it starts a multi-account portal
//! simulator (`keyrotd-sim portal --accounts N`, one account and one key per `aos` provider), and for
//! fleets with stores OpenBao and moto behind counting proxies (`keyrotd-sim proxy`, no delay); seeds
//! every destination with the key the portal issued, as an operator would; then runs the release
//! `keyrotd` and prints:
//!
//! - `check-config` time (median of 3);
//! - start-up: spawn to `/readyz` 200, and to the first observation of every key (`observing` false);
//! - resident memory (VmRSS) once ready, once observed, and settled (after the idle window, when
//!   start-up's transient memory has been given back), and the peak (VmHWM) after the rotations;
//! - idle CPU over `IDLE_SECS` (30 s) with no rotation due (every key `@yearly`);
//! - every key rotated at once through the admin API (`POST /v1/keys/{name}/rotate` for all): the time
//!   from the first request to the last `finished_at`, and the outcomes;
//! - CPU seconds per rotation, and portal, Vault and AWS requests per rotation (by route);
//! - that every destination holds its portal's active key afterwards, and each key was regenerated
//!   exactly once.
//!
//! Prints figures; asserts nothing about speed.
//!
//! ```sh
//! scripts/bench-fleet.sh                          # 1,000 keys (Vault, AWS, file) and 10,000 (file)
//! FLEET="200" cargo bench --bench fleet           # one size; ":file" = file destinations only
//! FLEET="1000 10000:file" IDLE_SECS=30 FLEET_DAEMON_EXTRA='max_concurrent_rotations = 64' cargo bench --bench fleet
//! ```
//! `FLEET_DAEMON_EXTRA` / `FLEET_KEY_EXTRA` are TOML lines added to `[daemon]` / every `[[keys]]`;
//! `KEYROTD_NOFILE=1024` runs keyrotd with that open-files limit (systemd's default soft limit);
//! `KEEP_BENCH_DIR=1` keeps the temporary directory (config, state, every process's log).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use keyrotd::sim::FleetCounters;
use keyrotd::sim::proxy::ProxyCounters;
use serde_json::{Value, json};
use support::daemon::{Daemon, check_config, env_with, write_config};
use support::services::{Bao, Moto, Portal, Proxy, REGION};
use support::{BenchDir, ProcStats, free_port, loadavg, token};

/// One fleet to measure: how many keys, and whether they have Vault and AWS destinations besides
/// the file.
#[derive(Clone, Copy)]
struct Shape {
    keys: usize,
    stores: bool,
}

impl Shape {
    fn parse(word: &str) -> Shape {
        let (n, stores) = match word.strip_suffix(":file") {
            Some(n) => (n, false),
            None => (word, true),
        };
        let keys = n.replace([',', '_'], "").parse().unwrap_or_else(|_| {
            panic!("FLEET: {word:?} is not a key count (e.g. 1000 or 10000:file)")
        });
        Shape { keys, stores }
    }

    fn label(&self) -> String {
        let dest = if self.stores {
            "Vault + AWS + file"
        } else {
            "file only"
        };
        format!("{} keys ({dest})", self.keys)
    }
}

/// The requests the portal and the stores saw.
#[derive(Clone, Default)]
struct Requests {
    portal: FleetCounters,
    vault: ProxyCounters,
    aws: ProxyCounters,
}

/// Everything one fleet run measured.
struct Figures {
    shape: Shape,
    check_config: Duration,
    ready: Duration,
    observed: Duration,
    at_ready: ProcStats,
    at_observed: ProcStats,
    /// After the idle window: what the daemon keeps once start-up's transient memory is given back.
    settled: ProcStats,
    startup_requests: Requests,
    idle_secs: u64,
    idle_cpu_pct: f64,
    idle_requests: Requests,
    rotate_all: Duration,
    outcomes: BTreeMap<String, usize>,
    refused: BTreeMap<String, usize>,
    after_rotations: ProcStats,
    cpu_per_rotation: f64,
    rotation_requests: Requests,
    rotated: usize,
    in_sync: usize,
    regenerated_once: usize,
    clean_exit: bool,
}

/// The running world of one fleet run.
struct World {
    dir: BenchDir,
    portal: Portal,
    stores: Option<Stores>,
}

struct Stores {
    bao: Bao,
    moto: Moto,
    vault_proxy: Proxy,
    aws_proxy: Proxy,
}

#[tokio::main]
async fn main() {
    let fleet = std::env::var("FLEET").unwrap_or_else(|_| "1000 10000:file".into());
    let shapes: Vec<Shape> = fleet.split_whitespace().map(Shape::parse).collect();
    let idle_secs: u64 = std::env::var("IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    println!(
        "keyrotd fleet benchmark: release build, {} CPUs, load average {} at start",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    let mut all = Vec::new();
    for shape in shapes {
        let figures = run(shape, idle_secs).await;
        print_figures(&figures);
        all.push(figures);
    }
    print_table(&all);
    println!("load average at the end: {}", loadavg());
}

async fn run(shape: Shape, idle_secs: u64) -> Figures {
    println!("\n== {}", shape.label());
    let world = World::start(shape).await;
    let t = Instant::now();
    world.seed(shape.keys).await;
    println!(
        "  seeded every destination with its portal's key in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let admin_token = token(32);
    let listen = format!("127.0.0.1:{}", free_port());
    let config = write_config(&world.dir.path, &world.config(shape, &listen));
    let env = world.env(&admin_token);
    let mut checks: Vec<Duration> = (0..3).map(|_| check_config(&config, &env)).collect();
    checks.sort();

    let spawned = Instant::now();
    let mut daemon = Daemon::spawn(&world.dir.path, &config, &listen, &admin_token, &env);
    let ready = daemon.wait_ready(Duration::from_secs(1800)).await - spawned;
    let at_ready = daemon.stats();
    // Polling the whole key list costs keyrotd too: every 100 ms for small fleets, up to every second.
    let every = Duration::from_micros(100 * shape.keys as u64)
        .clamp(Duration::from_millis(100), Duration::from_secs(1));
    daemon.wait_observed(every, Duration::from_secs(1800)).await;
    let observed = spawned.elapsed();
    let at_observed = daemon.stats();
    let startup_requests = world.requests().await;
    println!(
        "  ready after {:.2} s, every key observed after {:.1} s",
        ready.as_secs_f64(),
        observed.as_secs_f64()
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_cpu_pct, idle_requests) = world.idle(&daemon, idle_secs).await;
    let settled = daemon.stats();
    let rotation = world.rotate_all(&mut daemon, shape.keys).await;
    let (in_sync, regenerated_once) = world.verify(shape).await;
    let clean_exit = daemon.stop();
    Figures {
        shape,
        check_config: checks[1],
        ready,
        observed,
        at_ready,
        at_observed,
        settled,
        startup_requests,
        idle_secs,
        idle_cpu_pct,
        idle_requests,
        rotate_all: rotation.took,
        outcomes: rotation.outcomes,
        refused: rotation.refused,
        after_rotations: rotation.after,
        cpu_per_rotation: rotation.cpu_s / rotation.rotated.max(1) as f64,
        rotation_requests: rotation.requests,
        rotated: rotation.rotated,
        in_sync,
        regenerated_once,
        clean_exit,
    }
}

impl World {
    async fn start(shape: Shape) -> World {
        let dir = BenchDir::new("keyrotd-bench-fleet-");
        std::fs::create_dir_all(dir.path.join("keys")).expect("keys dir");
        let portal = Portal::start(&dir.path, Some(shape.keys));
        let stores = match shape.stores {
            false => None,
            true => {
                let bao = Bao::start(&dir.path).await;
                let moto = Moto::start(&dir.path).await;
                let vault_proxy = Proxy::start(&dir.path, "vault-proxy", &bao.addr, 0);
                let aws_proxy = Proxy::start(&dir.path, "aws-proxy", &moto.endpoint, 0);
                Some(Stores {
                    bao,
                    moto,
                    vault_proxy,
                    aws_proxy,
                })
            }
        };
        World {
            dir,
            portal,
            stores,
        }
    }

    /// Writes every key's current secret to its destinations (Vault and AWS beside a field that must
    /// be kept), directly, not through the counting proxies.
    async fn seed(&self, keys: usize) {
        let aws = match &self.stores {
            Some(s) => Some(s.moto.client().await),
            None => None,
        };
        let aws = &aws;
        futures::stream::iter(0..keys)
            .for_each_concurrent(32, |i| async move {
                let secret = self
                    .portal
                    .initial_secret(&self.portal.account_url(i))
                    .await;
                std::fs::write(self.dir.path.join(format!("keys/k{i}.key")), &secret)
                    .expect("write key file");
                if let (Some(s), Some(aws)) = (&self.stores, aws) {
                    let value = json!({ "api_key": secret, "other": "kept" });
                    s.bao.kv_put(&format!("fleet/k{i}"), value.clone()).await;
                    Moto::create_secret(aws, &format!("fleet/k{i}"), &value.to_string()).await;
                }
            })
            .await;
    }

    fn env(&self, admin_token: &str) -> Vec<(String, String)> {
        let vault_token = self
            .stores
            .as_ref()
            .map_or("", |s| s.bao.root_token.as_str());
        env_with(&[
            ("BENCH_ADMIN_TOKEN", admin_token),
            ("BENCH_PORTAL_TOKEN", &self.portal.token),
            ("BENCH_VAULT_TOKEN", vault_token),
            ("RUST_LOG", "info"),
        ])
    }

    /// The keyrotd config: one `aos` provider per key (account `i` of the portal), every key
    /// `@yearly` (nothing due while measured) with no watch, destinations in Vault, AWS (both through
    /// the counting proxies) and a file, or in a file only.
    fn config(&self, shape: Shape, listen: &str) -> String {
        let daemon_extra = std::env::var("FLEET_DAEMON_EXTRA").unwrap_or_default();
        let key_extra = std::env::var("FLEET_KEY_EXTRA").unwrap_or_default();
        let state = self.dir.path.join("state");
        let keys = self.dir.path.join("keys");
        let mut text = format!(
            "[daemon]\nstate_dir = {state:?}\nlisten = \"{listen}\"\n\
             admin_token = {{ env = \"BENCH_ADMIN_TOKEN\" }}\n{daemon_extra}\n\n\
             [stores.local]\nkind = \"file\"\ndir = {keys:?}\n"
        );
        if let Some(s) = &self.stores {
            text.push_str(&format!(
                "\n[stores.vault]\nkind = \"vault\"\naddress = \"{}\"\ntoken = {{ env = \"BENCH_VAULT_TOKEN\" }}\n\
                 \n[stores.aws]\nkind = \"aws\"\nregion = \"{REGION}\"\nendpoint_url = \"{}\"\n",
                s.vault_proxy.url, s.aws_proxy.url
            ));
        }
        for i in 0..shape.keys {
            text.push_str(&format!(
                "\n[providers.p{i}]\nkind = \"aos\"\nbase_url = \"{}\"\n\
                 management_token = {{ env = \"BENCH_PORTAL_TOKEN\" }}\naccount_id = \"acct_{i}\"\n\
                 \n[[keys]]\nname = \"k{i}\"\nprovider = \"p{i}\"\nschedule = \"@yearly\"\nwatch = \"0s\"\n{key_extra}\n",
                self.portal.account_url(i)
            ));
            if shape.stores {
                text.push_str(&format!(
                    "  [[keys.destinations]]\n  store = \"vault\"\n  path = \"fleet/k{i}\"\n  field = \"api_key\"\n\
                     \n  [[keys.destinations]]\n  store = \"aws\"\n  secret_id = \"fleet/k{i}\"\n  field = \"api_key\"\n\n"
                ));
            }
            text.push_str(&format!(
                "  [[keys.destinations]]\n  store = \"local\"\n  file = \"k{i}.key\"\n"
            ));
        }
        text
    }

    async fn requests(&self) -> Requests {
        let portal = self.portal.fleet_counters().await;
        let (vault, aws) = match &self.stores {
            Some(s) => (s.vault_proxy.counters().await, s.aws_proxy.counters().await),
            None => Default::default(),
        };
        Requests { portal, vault, aws }
    }

    /// CPU used, as a percentage of one CPU, and the requests sent, over `secs` with nothing due.
    async fn idle(&self, daemon: &Daemon, secs: u64) -> (f64, Requests) {
        let before = (daemon.stats(), self.requests().await);
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let after = (daemon.stats(), self.requests().await);
        let pct = (after.0.cpu_s - before.0.cpu_s) / secs as f64 * 100.0;
        (pct, after.1.minus(&before.1))
    }
}

/// What rotating every key at once gave.
struct Rotation {
    took: Duration,
    rotated: usize,
    outcomes: BTreeMap<String, usize>,
    refused: BTreeMap<String, usize>,
    cpu_s: f64,
    after: ProcStats,
    requests: Requests,
}

impl World {
    /// Starts a rotation of every key through the admin API (64 requests in flight), waits until
    /// every started one has an outcome, and reads each rotation's record.
    async fn rotate_all(&self, daemon: &mut Daemon, keys: usize) -> Rotation {
        let before = (daemon.stats(), self.requests().await);
        let t0: DateTime<Utc> = Utc::now();
        let started = Instant::now();
        let daemon_ref = &*daemon;
        let answers: Vec<Result<String, (u16, Value)>> = futures::stream::iter(0..keys)
            .map(|i| async move {
                daemon_ref
                    .start_rotation(&format!("k{i}"), "fleet benchmark")
                    .await
            })
            .buffer_unordered(64)
            .collect()
            .await;
        let mut refused = BTreeMap::new();
        let mut ids = Vec::new();
        for a in answers {
            match a {
                Ok(id) => ids.push(id),
                Err((status, body)) => {
                    // One line per kind of refusal, whichever key it named.
                    let error = fold_key_names(&body["error"].to_string());
                    let why = match status {
                        0 => format!("no answer: {error}"),
                        _ => format!("HTTP {status}: {error}"),
                    };
                    *refused.entry(why).or_default() += 1
                }
            }
        }
        println!(
            "  {} rotations started in {:.2} s ({} refused: {refused:?})",
            ids.len(),
            started.elapsed().as_secs_f64(),
            keys - ids.len()
        );
        wait_all(daemon, ids.len()).await;
        // Counted as soon as the last rotation ended: a reconcile pass may follow.
        let after = (daemon.stats(), self.requests().await);
        let records = rotation_records(daemon, &ids).await;
        let mut outcomes = BTreeMap::new();
        let mut last = t0;
        for r in &records {
            *outcomes
                .entry(r["outcome"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
            if let Some(f) = r["finished_at"]
                .as_str()
                .and_then(|f| f.parse::<DateTime<Utc>>().ok())
            {
                last = last.max(f);
            }
        }
        Rotation {
            took: (last - t0).to_std().unwrap_or_default(),
            rotated: ids.len(),
            outcomes,
            refused,
            cpu_s: after.0.cpu_s - before.0.cpu_s,
            after: after.0,
            requests: after.1.minus(&before.1),
        }
    }

    /// Each destination's fingerprint against its portal account's active key (and the field kept
    /// beside it), and each account regenerated exactly once. Returns (keys whose every destination
    /// is in sync, accounts regenerated exactly once).
    async fn verify(&self, shape: Shape) -> (usize, usize) {
        let aws = match &self.stores {
            Some(s) => Some(s.moto.client().await),
            None => None,
        };
        let aws = &aws;
        let in_sync = futures::stream::iter(0..shape.keys)
            .map(|i| async move {
                let active = self
                    .portal
                    .state(&self.portal.account_url(i))
                    .await
                    .fingerprint;
                let file =
                    std::fs::read(self.dir.path.join(format!("keys/k{i}.key"))).unwrap_or_default();
                let mut ok = keyrotd::secret::fingerprint_bytes(&file) == active;
                if let (Some(s), Some(aws)) = (&self.stores, aws) {
                    let vault = s.bao.kv_get(&format!("fleet/k{i}")).await;
                    let aws = Moto::json_value(aws, &format!("fleet/k{i}")).await;
                    for v in [vault, aws] {
                        let held = v["api_key"]
                            .as_str()
                            .map(|s| keyrotd::secret::fingerprint_bytes(s.as_bytes()));
                        ok &= held.as_deref() == Some(active.as_str()) && v["other"] == "kept";
                    }
                }
                ok
            })
            .buffer_unordered(32)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await;
        let once = self
            .portal
            .fleet_accounts()
            .await
            .iter()
            .filter(|a| a.regenerations == 1)
            .count();
        (in_sync, once)
    }
}

/// `text` with every key name (`k` and digits) written `kN`.
fn fold_key_names(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut prev_alnum = false;
    while let Some(c) = chars.next() {
        if c == 'k' && !prev_alnum && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
            out.push_str("kN");
            prev_alnum = true;
            continue;
        }
        prev_alnum = c.is_ascii_alphanumeric();
        out.push(c);
    }
    out
}

/// Polls `/v1/keys` every second until `started` keys have an outcome and none is in a rotation (the
/// state directory is new: no key had an outcome before).
async fn wait_all(daemon: &Daemon, started: usize) {
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let keys = daemon.keys().await;
        let done = keys.iter().filter(|k| !k["last_outcome"].is_null()).count();
        let busy = keys.iter().filter(|k| k["phase"] != "idle").count();
        if (done >= started && busy == 0) || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every rotation's record (`GET /v1/rotations/{id}`).
async fn rotation_records(daemon: &Daemon, ids: &[String]) -> Vec<Value> {
    futures::stream::iter(ids)
        .map(|id| async move { daemon.get(&format!("/v1/rotations/{id}")).await.1 })
        .buffer_unordered(32)
        .collect()
        .await
}

impl Requests {
    fn minus(&self, before: &Requests) -> Requests {
        let p = |a: u64, b: u64| a.saturating_sub(b);
        let mut portal = self.portal;
        portal.requests.status = p(self.portal.requests.status, before.portal.requests.status);
        portal.requests.regenerate = p(
            self.portal.requests.regenerate,
            before.portal.requests.regenerate,
        );
        portal.requests.auth_check = p(
            self.portal.requests.auth_check,
            before.portal.requests.auth_check,
        );
        portal.regenerations = p(self.portal.regenerations, before.portal.regenerations);
        Requests {
            portal,
            vault: proxy_minus(&self.vault, &before.vault),
            aws: proxy_minus(&self.aws, &before.aws),
        }
    }
}

fn proxy_minus(after: &ProxyCounters, before: &ProxyCounters) -> ProxyCounters {
    let map = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
        a.iter()
            .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect()
    };
    ProxyCounters {
        connections: after.connections - before.connections,
        requests: after.requests - before.requests,
        by_request: map(&after.by_request, &before.by_request),
        by_target: map(&after.by_target, &before.by_target),
        bytes_up: after.bytes_up - before.bytes_up,
        bytes_down: after.bytes_down - before.bytes_down,
    }
}

/// Vault requests by route with the key's own path part folded (`/v1/secret/data/fleet/k17` →
/// `/v1/secret/data/fleet/*`), per rotation.
fn vault_routes(c: &ProxyCounters, per: usize) -> String {
    let mut folded: BTreeMap<String, u64> = BTreeMap::new();
    for (route, n) in &c.by_request {
        let route = match route.rsplit_once("/k") {
            Some((head, tail)) if tail.chars().all(|c| c.is_ascii_digit()) => format!("{head}/*"),
            _ => route.clone(),
        };
        *folded.entry(route).or_default() += n;
    }
    per_each(&folded, per)
}

fn per_each(map: &BTreeMap<String, u64>, per: usize) -> String {
    map.iter()
        .map(|(k, v)| format!("{k} {:.2}", *v as f64 / per.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_requests(what: &str, r: &Requests, per: usize, unit: &str) {
    let per_f = per.max(1) as f64;
    let p = &r.portal.requests;
    println!(
        "  {what}: portal {:.2} {unit} (status {:.2}, regenerate {:.2}, auth check {:.2}); \
         Vault {:.2}; AWS {:.2}",
        p.total() as f64 / per_f,
        p.status as f64 / per_f,
        p.regenerate as f64 / per_f,
        p.auth_check as f64 / per_f,
        r.vault.requests as f64 / per_f,
        r.aws.requests as f64 / per_f,
    );
    if r.vault.requests > 0 {
        println!(
            "    Vault by route, {unit}: {}",
            vault_routes(&r.vault, per)
        );
    }
    if r.aws.requests > 0 {
        println!(
            "    AWS by operation, {unit}: {}",
            per_each(&r.aws.by_target, per)
        );
    }
}

fn print_figures(f: &Figures) {
    let n = f.shape.keys;
    println!(
        "  check-config (median of 3): {:.3} s",
        f.check_config.as_secs_f64()
    );
    println!(
        "  start-up: /readyz 200 after {:.2} s; every key observed after {:.1} s",
        f.ready.as_secs_f64(),
        f.observed.as_secs_f64()
    );
    println!(
        "  memory: VmRSS {:.1} MiB at ready, {:.1} MiB once observed, {:.1} MiB after the idle \
         window (settled); peak VmHWM {:.1} MiB after the rotations; {} threads, {} open fds once \
         observed, {} after the rotations",
        mib(f.at_ready.rss_kib),
        mib(f.at_observed.rss_kib),
        mib(f.settled.rss_kib),
        mib(f.after_rotations.hwm_kib),
        f.at_observed.threads,
        f.at_observed.fds,
        f.after_rotations.fds,
    );
    print_requests("start-up requests", &f.startup_requests, n, "per key");
    println!(
        "  idle CPU over {} s: {:.3} % of one CPU",
        f.idle_secs, f.idle_cpu_pct
    );
    print_requests(
        &format!("idle requests over {} s", f.idle_secs),
        &f.idle_requests,
        1,
        "in all",
    );
    println!(
        "  all {n} keys rotated at once through the admin API: {:.1} s (first request to last finished_at); \
         outcomes {:?}; refused {:?}",
        f.rotate_all.as_secs_f64(),
        f.outcomes,
        f.refused
    );
    println!("  CPU per rotation: {:.4} s", f.cpu_per_rotation);
    print_requests(
        "per rotation",
        &f.rotation_requests,
        f.rotated,
        "per rotation",
    );
    println!(
        "  afterwards: {}/{n} keys with every destination holding the portal's active key; \
         {}/{n} accounts regenerated exactly once; keyrotd {} on SIGTERM",
        f.in_sync,
        f.regenerated_once,
        if f.clean_exit {
            "exited"
        } else {
            "had to be killed"
        }
    );
}

fn print_table(all: &[Figures]) {
    println!(
        "\n| figure | {} |",
        all.iter()
            .map(|f| f.shape.label())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("| --- |{}", " --- |".repeat(all.len()));
    let row = |name: &str, cell: &dyn Fn(&Figures) -> String| {
        println!(
            "| {name} | {} |",
            all.iter().map(cell).collect::<Vec<_>>().join(" | ")
        );
    };
    row("all keys rotated at once (admin API)", &|f| {
        let ok = f.outcomes.get("success").copied().unwrap_or(0);
        format!(
            "{:.1} s, {ok}/{} `success`",
            f.rotate_all.as_secs_f64(),
            f.shape.keys
        )
    });
    row("VmRSS once ready / once observed / settled", &|f| {
        format!(
            "{:.1} / {:.1} / {:.1} MiB",
            mib(f.at_ready.rss_kib),
            mib(f.at_observed.rss_kib),
            mib(f.settled.rss_kib)
        )
    });
    row("peak VmHWM", &|f| {
        format!("{:.1} MiB", mib(f.after_rotations.hwm_kib))
    });
    row("start-up to `/readyz` 200", &|f| {
        format!("{:.2} s", f.ready.as_secs_f64())
    });
    row("start-up to every key observed", &|f| {
        format!("{:.1} s", f.observed.as_secs_f64())
    });
    row("idle CPU (nothing due)", &|f| {
        format!("{:.3} % over {} s", f.idle_cpu_pct, f.idle_secs)
    });
    row("CPU per rotation", &|f| {
        format!("{:.4} s", f.cpu_per_rotation)
    });
    row("portal requests per rotation", &|f| {
        let p = &f.rotation_requests.portal.requests;
        let per = f.rotated.max(1) as f64;
        format!(
            "{:.2} (status {:.2}, regenerate {:.2}, auth check {:.2})",
            p.total() as f64 / per,
            p.status as f64 / per,
            p.regenerate as f64 / per,
            p.auth_check as f64 / per
        )
    });
    row(
        "Vault / AWS requests per rotation",
        &|f| match f.shape.stores {
            false => "—".into(),
            true => {
                let per = f.rotated.max(1) as f64;
                let r = &f.rotation_requests;
                format!(
                    "{:.2} / {:.2}",
                    r.vault.requests as f64 / per,
                    r.aws.requests as f64 / per
                )
            }
        },
    );
    row("`check-config`", &|f| {
        format!("{:.3} s", f.check_config.as_secs_f64())
    });
    print_memory_slopes(all);
}

/// What one more key costs in resident memory once observed, between two measured fleets with the
/// same destinations (e.g. `FLEET="100 1000"`).
fn print_memory_slopes(all: &[Figures]) {
    for (i, a) in all.iter().enumerate() {
        let Some(b) = all[i + 1..]
            .iter()
            .find(|b| b.shape.stores == a.shape.stores && b.shape.keys != a.shape.keys)
        else {
            continue;
        };
        let slope = (b.settled.rss_kib as f64 - a.settled.rss_kib as f64)
            / (b.shape.keys as f64 - a.shape.keys as f64);
        println!(
            "memory per key between {} and {} keys ({}): {slope:.1} KiB (VmRSS settled)",
            a.shape.keys,
            b.shape.keys,
            if a.shape.stores {
                "Vault + AWS + file"
            } else {
                "file only"
            }
        );
    }
}
