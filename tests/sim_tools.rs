//! The benchmarks' simulator tools as programs: `keyrotd-sim portal --accounts N` and
//! `keyrotd-sim proxy` in front of it. A request to one account through the proxy reaches that account
//! only, and both count it; the readiness lines carry the addresses the benchmarks read.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keyrotd::sim::proxy::{LoggedRequest, ProxyCounters};
use keyrotd::sim::{FleetAccount, FleetCounters};

/// A `keyrotd-sim` process, killed when dropped.
struct Sim(Child);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `keyrotd-sim args` and returns it with the `http://` words of its readiness line.
fn start(args: &[&str]) -> (Sim, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyrotd-sim"))
        .args(args)
        .env("SIM_TOKEN", "mgmt-token")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start keyrotd-sim");
    let stdout = child.stdout.take().expect("piped stdout");
    let sim = Sim(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("keyrotd-sim announces that it listens");
    let urls = line
        .split_whitespace()
        .filter(|w| w.starts_with("http://"))
        .map(|w| w.trim_end_matches(')').to_string())
        .collect();
    (sim, urls)
}

async fn get<T: serde::de::DeserializeOwned>(url: &str) -> T {
    reqwest::get(url)
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON")
}

#[tokio::test]
async fn a_request_to_one_account_through_the_proxy_is_counted_by_both() {
    let (_portal, urls) = start(&[
        "portal",
        "--listen",
        "127.0.0.1:0",
        "--token-env",
        "SIM_TOKEN",
        "--accounts",
        "3",
    ]);
    let portal = urls[0].clone();
    let upstream = portal.trim_start_matches("http://");
    let (_proxy, urls) = start(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
        "--delay-ms",
        "2",
    ]);
    let [proxy, counters] = &urls[..] else {
        panic!("the proxy names its address and its counters' address: {urls:?}");
    };
    let control = counters
        .strip_suffix("/_sim/counters")
        .expect("the counters' URL");

    let status: serde_json::Value = reqwest::Client::new()
        .get(format!("{proxy}/a/2/v1/api-keys/current"))
        .bearer_auth("mgmt-token")
        .send()
        .await
        .expect("status through the proxy")
        .json()
        .await
        .expect("status is JSON");
    assert_eq!(status["account_id"], "acct_2");

    let accounts: Vec<FleetAccount> = get(&format!("{portal}/_sim/accounts")).await;
    let statuses: Vec<u64> = accounts.iter().map(|a| a.requests.status).collect();
    assert_eq!(statuses, [0, 0, 1], "only account 2 was asked");
    let totals: FleetCounters = get(&format!("{portal}/_sim/counters")).await;
    assert_eq!((totals.accounts, totals.requests.total()), (3, 1));
    let seen: ProxyCounters = get(&format!("{control}/_sim/counters")).await;
    assert_eq!(seen.requests, 1);
    assert_eq!(
        seen.by_request.get("GET /a/2/v1/api-keys/current"),
        Some(&1)
    );
    let log: Vec<LoggedRequest> = get(&format!("{control}/_sim/requests")).await;
    assert_eq!(log.len(), 1);
}

#[test]
fn a_fleet_has_no_single_account_id_or_seed() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyrotd-sim"))
        .args([
            "portal",
            "--listen",
            "127.0.0.1:0",
            "--token-env",
            "SIM_TOKEN",
            "--accounts",
            "3",
            "--account-id",
            "acct_1",
        ])
        .env("SIM_TOKEN", "t")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keyrotd-sim");
    // Refused at once; a simulator that accepted the flags would serve until killed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keyrotd-sim accepted --accounts with --account-id and kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr)
        .expect("read stderr");
    assert_eq!(status.code(), Some(2), "a usage error: {stderr}");
    assert!(stderr.contains("--account-id"), "{stderr}");
}
