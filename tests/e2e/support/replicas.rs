//! Several keyrotd replicas sharing keys through leases on OpenBao (docs/replicas.md), for
//! tests/e2e/replicas.rs. A [`World`] is OpenBao, moto, one portal simulator per key (or one for
//! every key), a key file directory, and the configs of the replicas: the same keys and
//! `[coordination]` for each, a `state_dir` and admin port of its own. Each [`Replica`] is the real
//! `keyrotd run`, on the host or inside a [`Netns`] (reaching the host's services through gates on its
//! links).
//!
//! Keys are `k0`, `k1`, ..., each on provider `p<i>`, written to OpenBao (`apps/k<i>`, field
//! `api_key`), to AWS (`prod/k<i>`, field `api_key`) when moto runs, and to the file `k<i>.key`.
//! What the replicas share is read straight from OpenBao: the membership documents under
//! `keyrotd/leases/replicas/` and each key's document (holder, fencing number, journal) under
//! `keyrotd/leases/keys/`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::bao::Bao;
use super::daemon::Daemon;
use super::gate::Gate;
use super::moto::{Moto, REGION, aws_env};
use super::netns::Netns;
use super::raft_bao::RaftBao;
use super::secrets::Haystacks;
use super::sim::Portal;
use super::stack::{ADMIN_TOKEN, fp};

/// The coordination path of every world (`[coordination] path`).
pub const LEASES: &str = "keyrotd/leases";

#[derive(Clone)]
pub struct WorldOptions {
    pub keys: usize,
    /// One portal simulator per key (keys that rotate), or one shared by every key (keys that are
    /// never rotated: two keys on one portal account would invalidate each other).
    pub portal_per_key: bool,
    pub schedule: Option<String>,
    /// `[coordination] ttl`.
    pub ttl: String,
    pub with_aws: bool,
    pub with_vault_destination: bool,
    pub store_deadline: String,
    /// OpenBao on raft storage, which survives a restart ([`RaftBao`]), instead of a dev server.
    pub persistent_openbao: bool,
    /// OpenBao's file audit device: its own record of every request it served.
    pub openbao_audit: bool,
}

impl Default for WorldOptions {
    fn default() -> Self {
        WorldOptions {
            keys: 1,
            portal_per_key: true,
            schedule: None,
            ttl: "6s".into(),
            with_aws: true,
            with_vault_destination: true,
            store_deadline: "10s".into(),
            persistent_openbao: false,
            openbao_audit: false,
        }
    }
}

/// The OpenBao the world runs.
pub enum Server {
    Dev(Bao),
    Raft(RaftBao),
}

impl Server {
    /// The gate's URL: what keyrotd is given.
    pub fn addr(&self) -> &str {
        match self {
            Server::Dev(b) => &b.addr,
            Server::Raft(b) => &b.addr,
        }
    }

    pub fn token(&self) -> &str {
        match self {
            Server::Dev(b) => &b.root_token,
            Server::Raft(b) => &b.root_token,
        }
    }

    fn direct(&self) -> &str {
        match self {
            Server::Dev(b) => b.direct_url(),
            Server::Raft(b) => b.direct_url(),
        }
    }

    /// The persistent server, for a test that restarts it.
    pub fn raft(&mut self) -> &mut RaftBao {
        match self {
            Server::Raft(b) => b,
            Server::Dev(_) => panic!("this world runs a dev OpenBao; set persistent_openbao"),
        }
    }
}

/// How a replica reaches the world: its admin API's address and every service's URL.
pub struct Reach {
    listen: IpAddr,
    portals: Vec<String>,
    vault: String,
    moto: Option<String>,
    /// Off loopback, a credential over plain HTTP must be allowed explicitly.
    insecure: bool,
    /// Relays on a namespace's links (kept alive with the replica).
    _gates: Vec<Gate>,
}

pub struct World {
    pub server: Server,
    pub moto: Option<Moto>,
    pub portals: Vec<Portal>,
    pub dir: tempfile::TempDir,
    pub o: WorldOptions,
    started: AtomicUsize,
    http: reqwest::Client,
}

/// A running replica: the real `keyrotd run`, with its own state directory and log.
pub struct Replica {
    pub daemon: Daemon,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    _reach: Reach,
}

impl World {
    pub async fn start(o: WorldOptions) -> World {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("keys")).expect("keys dir");
        let server = if o.persistent_openbao {
            Server::Raft(RaftBao::start().await)
        } else if o.openbao_audit {
            Server::Dev(Bao::start_with_audit(
                &dir.path().join("openbao-audit.jsonl"),
            ))
        } else {
            Server::Dev(Bao::start())
        };
        let moto = o.with_aws.then(Moto::start);
        if let Some(m) = &moto {
            for i in 0..o.keys {
                m.create_secret(&format!("prod/k{i}"), "{}").await;
            }
        }
        let portals = (0..if o.portal_per_key { o.keys } else { 1 })
            .map(|_| Portal::start())
            .collect();
        World {
            server,
            moto,
            portals,
            dir,
            o,
            started: AtomicUsize::new(0),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("reqwest client"),
        }
    }

    pub fn keys(&self) -> Vec<String> {
        (0..self.o.keys).map(|i| format!("k{i}")).collect()
    }

    /// The portal key `k<i>` is rotated on.
    pub fn portal(&self, i: usize) -> &Portal {
        &self.portals[if self.o.portal_per_key { i } else { 0 }]
    }

    fn keys_dir(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    /// Replicas on the host reach everything on loopback.
    fn reach_host(&self) -> Reach {
        Reach {
            listen: [127, 0, 0, 1].into(),
            portals: self.portals.iter().map(|p| p.url().to_string()).collect(),
            vault: self.server.addr().to_string(),
            moto: self.moto.as_ref().map(|m| m.endpoint.clone()),
            insecure: false,
            _gates: Vec::new(),
        }
    }

    /// A replica in `ns` reaches OpenBao over link `vault_link` and everything else (portals, moto,
    /// and its own admin API) over link `other_link`, each through a gate on the link's host end.
    fn reach_from(&self, ns: &Netns, vault_link: usize, other_link: usize) -> Reach {
        let other = ns.link(other_link).host_ip;
        let mut gates = Vec::new();
        let mut relay = |ip: IpAddr, url: &str| -> String {
            let upstream: SocketAddr = url
                .trim_start_matches("http://")
                .parse()
                .expect("a service URL is http://IP:PORT");
            let gate = Gate::on(ip, upstream);
            let url = gate.url();
            gates.push(gate);
            url
        };
        let portals = self.portals.iter().map(|p| relay(other, p.url())).collect();
        let vault = relay(ns.link(vault_link).host_ip, self.server.addr());
        let moto = self.moto.as_ref().map(|m| relay(other, &m.endpoint));
        Reach {
            listen: ns.link(other_link).ns_ip,
            portals,
            vault,
            moto,
            insecure: true,
            _gates: gates,
        }
    }

    /// The config of replica `n`: the shared keys and coordination, its own state_dir and port.
    fn config(&self, n: usize, reach: &Reach) -> String {
        let o = &self.o;
        let insecure = if reach.insecure {
            "allow_insecure_http = true\n"
        } else {
            ""
        };
        let mut text = format!(
            "[daemon]\nstate_dir = \"{state}\"\nlisten = \"{listen}:0\"\nadmin_token = {{ env = \"KEYROTD_TEST_ADMIN_TOKEN\" }}\nreconcile_interval = \"0s\"\n\n[coordination]\nstore = \"vault\"\npath = \"{LEASES}\"\nttl = \"{ttl}\"\n\n[stores.vault]\nkind = \"vault\"\naddress = \"{vault}\"\ntoken = {{ env = \"KEYROTD_TEST_VAULT_TOKEN\" }}\n{insecure}\n[stores.local]\nkind = \"file\"\ndir = \"{keys}\"\n",
            state = self.replica_dir(n).join("state").display(),
            listen = reach.listen,
            ttl = o.ttl,
            vault = reach.vault,
            keys = self.keys_dir().display(),
        );
        if let Some(m) = &reach.moto {
            text.push_str(&format!(
                "\n[stores.aws]\nkind = \"aws\"\nregion = \"{REGION}\"\nendpoint_url = \"{m}\"\n"
            ));
        }
        for i in 0..o.keys {
            let portal = &reach.portals[if o.portal_per_key { i } else { 0 }];
            text.push_str(&format!(
                "\n[providers.p{i}]\nkind = \"aos\"\nbase_url = \"{portal}\"\nmanagement_token = {{ env = \"KEYROTD_TEST_AOS_TOKEN_{t}\" }}\naccount_id = \"acct_42\"\ntimeout = \"5s\"\n{insecure}",
                t = if o.portal_per_key { i } else { 0 },
            ));
        }
        for i in 0..o.keys {
            text.push_str(&self.key_section(i));
        }
        text
    }

    fn key_section(&self, i: usize) -> String {
        let o = &self.o;
        let schedule = o
            .schedule
            .as_ref()
            .map_or(String::new(), |s| format!("schedule = {s:?}\n"));
        let mut text = format!(
            "\n[[keys]]\nname = \"k{i}\"\nprovider = \"p{i}\"\n{schedule}on_first_contact = \"rotate\"\nwatch = \"0s\"\nstore_deadline = \"{}\"\nmax_regenerations_per_day = 1000\n",
            o.store_deadline
        );
        if o.with_vault_destination {
            text.push_str(&format!(
                "  [[keys.destinations]]\n  store = \"vault\"\n  path = \"apps/k{i}\"\n  field = \"api_key\"\n"
            ));
        }
        if o.with_aws {
            text.push_str(&format!(
                "  [[keys.destinations]]\n  store = \"aws\"\n  secret_id = \"prod/k{i}\"\n  field = \"api_key\"\n"
            ));
        }
        text.push_str(&format!(
            "  [[keys.destinations]]\n  store = \"local\"\n  file = \"k{i}.key\"\n"
        ));
        text
    }

    fn replica_dir(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("replica-{n}"))
    }

    /// The environment of every replica: credentials, AWS, logs.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = aws_env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (i, p) in self.portals.iter().enumerate() {
            env.push((format!("KEYROTD_TEST_AOS_TOKEN_{i}"), p.token().to_string()));
        }
        env.push((
            "KEYROTD_TEST_VAULT_TOKEN".into(),
            self.server.token().to_string(),
        ));
        env.push(("KEYROTD_TEST_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()));
        env.push(("RUST_LOG".into(), "info,keyrotd=debug".into()));
        env
    }

    /// Starts a replica on the host and waits until it is ready.
    pub async fn replica(&self) -> Replica {
        self.replica_with_env(&[]).await
    }

    /// Starts a replica on the host with `extra` in its environment (e.g. `FAILPOINTS`).
    pub async fn replica_with_env(&self, extra: &[(&str, &str)]) -> Replica {
        let r = self.spawn(self.reach_host(), None, extra).await;
        r.daemon.wait_ready(Duration::from_secs(60)).await;
        r
    }

    /// Starts a replica inside `ns` (see [`World::reach_from`]) and waits until it is ready.
    pub async fn replica_in(&self, ns: &Netns, vault_link: usize, other_link: usize) -> Replica {
        let reach = self.reach_from(ns, vault_link, other_link);
        let r = self.spawn(reach, Some(ns), &[]).await;
        r.daemon.wait_ready(Duration::from_secs(60)).await;
        r
    }

    async fn spawn(&self, reach: Reach, ns: Option<&Netns>, extra: &[(&str, &str)]) -> Replica {
        let n = self.started.fetch_add(1, Ordering::SeqCst);
        let dir = self.replica_dir(n);
        std::fs::create_dir_all(&dir).expect("replica dir");
        let config = dir.join("keyrotd.toml");
        std::fs::write(&config, self.config(n, &reach)).expect("write config");
        let log = dir.join("daemon.log");
        let bin = env!("CARGO_BIN_EXE_keyrotd");
        let mut cmd = match ns {
            Some(ns) => ns.command(bin),
            None => Command::new(bin),
        };
        cmd.arg("-c")
            .arg(&config)
            .arg("run")
            .envs(self.env())
            .envs(extra.iter().copied());
        let mut daemon = Daemon::spawn(cmd, &log).await;
        if ns.is_some() {
            // Its admin API listens on its own link address, on the port it bound.
            let port = daemon
                .base
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_string();
            daemon.base = format!("http://{}:{port}", reach.listen);
        }
        Replica {
            daemon,
            config,
            state_dir: dir.join("state"),
            log,
            _reach: reach,
        }
    }

    /// `keyrotd status --json <key>` run on replica `r`'s host with its config: (exit code, the
    /// report of the key, stderr).
    pub fn status(&self, r: &Replica, key: &str) -> (i32, Value, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
            .arg("-c")
            .arg(&r.config)
            .args(["status", "--json", key])
            .envs(self.env())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run keyrotd status");
        let reports: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (
            out.status.code().unwrap_or(-1),
            reports[0].clone(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The JSON document at `path` under `secret/` (its `data`), read straight from OpenBao; `None`
    /// when there is none or OpenBao does not answer.
    pub async fn kv(&self, path: &str) -> Option<Value> {
        let resp = self
            .http
            .get(format!("{}/v1/secret/data/{path}", self.server.direct()))
            .header("X-Vault-Token", self.server.token())
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let v: Value = resp.json().await.ok()?;
        Some(v["data"].clone())
    }

    /// KV v2 metadata at `path` (custom metadata, versions), `Null` when none.
    pub async fn kv_metadata(&self, path: &str) -> Value {
        let resp = self
            .http
            .get(format!(
                "{}/v1/secret/metadata/{path}",
                self.server.direct()
            ))
            .header("X-Vault-Token", self.server.token())
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => {
                r.json::<Value>().await.unwrap_or_default()["data"].clone()
            }
            _ => Value::Null,
        }
    }

    /// Key `key`'s document: `{"holder", "fence", "journal", "updated_at"}`; `Null` before any.
    pub async fn key_doc(&self, key: &str) -> Value {
        self.kv(&format!("{LEASES}/keys/{key}"))
            .await
            .map(|d| d["data"].clone())
            .unwrap_or(Value::Null)
    }

    /// Every replica id with a membership document (live or not).
    pub async fn member_ids(&self) -> Vec<String> {
        let resp = self
            .http
            .request(
                reqwest::Method::from_bytes(b"LIST").expect("LIST"),
                format!(
                    "{}/v1/secret/metadata/{LEASES}/replicas",
                    self.server.direct()
                ),
            )
            .header("X-Vault-Token", self.server.token())
            .send()
            .await;
        let Ok(resp) = resp else { return Vec::new() };
        let v: Value = resp.json().await.unwrap_or_default();
        v["data"]["keys"]
            .as_array()
            .map(|ids| {
                ids.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The replica id of the process with this pid, from its membership document.
    pub async fn replica_id(&self, pid: u32) -> Option<String> {
        for id in self.member_ids().await {
            let doc = self.kv(&format!("{LEASES}/replicas/{id}")).await?;
            if doc["data"]["replica"]["pid"] == pid {
                return Some(id);
            }
        }
        None
    }

    /// What key `k<i>`'s destinations hold: fingerprints of (OpenBao, AWS, file) for those configured.
    pub async fn destinations(&self, i: usize) -> Vec<Option<String>> {
        let mut held = Vec::new();
        if self.o.with_vault_destination {
            let v = self.kv(&format!("apps/k{i}")).await;
            held.push(
                v.as_ref()
                    .and_then(|d| d["data"]["api_key"].as_str())
                    .map(fp),
            );
        }
        if let Some(m) = &self.moto {
            held.push(aws_field(m, &format!("prod/k{i}")).await.as_deref().map(fp));
        }
        let file = std::fs::read(self.keys_dir().join(format!("k{i}.key"))).ok();
        held.push(file.map(|b| keyrotd::secret::fingerprint_bytes(&b)));
        held
    }

    /// Every destination of `k<i>` holds the portal's active key.
    pub async fn consistent(&self, i: usize) -> bool {
        let want = Some(self.portal(i).state().await.fingerprint);
        self.destinations(i).await.iter().all(|f| *f == want)
    }

    /// Asserts [`World::consistent`] for key `k<i>`, naming what each destination holds.
    pub async fn assert_consistent(&self, i: usize) {
        let want = Some(self.portal(i).state().await.fingerprint);
        let held = self.destinations(i).await;
        assert!(
            held.iter().all(|f| *f == want),
            "k{i}: every destination holds the portal's active key {want:?}; they hold {held:?}"
        );
    }

    /// No secret any portal issued, and no credential the replicas were given, is in what they
    /// wrote: their state directories (audit log), logs, the key files' sidecars, the shared lease
    /// documents (journals), the Vault metadata and the AWS tags.
    pub async fn assert_no_secret_leaked(&self, replicas: &[&Replica]) {
        self.assert_no_secret_in(replicas, Vec::new()).await;
    }

    /// [`World::assert_no_secret_leaked`], also searching `extra` (place, text): e.g. CLI output.
    pub async fn assert_no_secret_in(&self, replicas: &[&Replica], extra: Vec<(String, String)>) {
        let mut out = Haystacks::default();
        for (place, text) in extra {
            out.add(place, text);
        }
        for r in replicas {
            out.add_files_under(&r.state_dir, &|_| true);
            out.add_files_under(r.log.parent().expect("log dir"), &|p| {
                p.extension().is_some_and(|e| e == "log")
            });
        }
        out.add_files_under(&self.keys_dir(), &|p| {
            p.to_string_lossy().ends_with(".meta.json")
        });
        for key in self.keys() {
            out.add(
                format!("lease document of {key}"),
                self.key_doc(&key).await.to_string(),
            );
            let i: usize = key[1..].parse().expect("k<i>");
            if self.o.with_vault_destination {
                out.add(
                    format!("OpenBao metadata of {key}"),
                    self.kv_metadata(&format!("apps/k{i}")).await.to_string(),
                );
            }
            if let Some(m) = &self.moto
                && let Ok(d) = m
                    .client()
                    .await
                    .describe_secret()
                    .secret_id(format!("prod/k{i}"))
                    .send()
                    .await
            {
                out.add(format!("AWS tags of {key}"), format!("{:?}", d.tags()));
            }
        }
        let mut secrets = Vec::new();
        for (p, portal) in self.portals.iter().enumerate() {
            for (n, s) in portal.issued_secrets().await.into_iter().enumerate() {
                secrets.push((format!("portal {p} secret #{n}"), s));
            }
        }
        for (k, v) in self.env() {
            if k.starts_with("KEYROTD_TEST_") {
                secrets.push((k, v));
            }
        }
        out.assert_none_of(&secrets);
    }
}

async fn aws_field(m: &Moto, secret_id: &str) -> Option<String> {
    let out = m
        .client()
        .await
        .get_secret_value()
        .secret_id(secret_id)
        .send()
        .await
        .ok()?;
    let v: Value = serde_json::from_str(out.secret_string()?).ok()?;
    v["api_key"].as_str().map(String::from)
}

impl Replica {
    pub fn pid(&self) -> u32 {
        self.daemon.proc.pid()
    }

    /// The keys this replica says it holds.
    pub async fn held(&self, keys: &[String]) -> Vec<String> {
        let scrape = self.daemon.metrics().await;
        keys.iter()
            .filter(|k| scrape.get("keyrotd_lease_held", &[("key", k.as_str())]) == 1.0)
            .cloned()
            .collect()
    }

    /// Every record of its audit log.
    pub fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state_dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// POST `/v1/keys/<key>/rotate` with the admin token: (status, answer).
    pub async fn rotate(&self, key: &str, reason: &str) -> (u16, Value) {
        self.daemon
            .post(
                &format!("/v1/keys/{key}/rotate"),
                Some(ADMIN_TOKEN),
                serde_json::json!({ "reason": reason }),
            )
            .await
    }

    /// SIGKILL: the process ends at once, nothing runs after it (reaped when dropped).
    pub fn kill(&self) {
        self.daemon.signal("KILL");
    }

    /// The log, for failure messages.
    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

/// The log of every replica, for a failure message.
pub fn logs(replicas: &[&Replica]) -> String {
    replicas
        .iter()
        .enumerate()
        .map(|(i, r)| format!("--- replica {i} (pid {}) ---\n{}", r.pid(), r.log_text()))
        .collect::<Vec<_>>()
        .join("\n")
}
