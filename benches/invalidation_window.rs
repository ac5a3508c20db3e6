//! Benchmark: the invalidation window (regenerate response → last destination confirmed and last
//! reload hook answered) of real rotations, through the real daemon, against real OpenBao, moto, the
//! portal simulator and two dependents on loopback. Prints figures; asserts nothing about speed.
//!
//!     cargo bench --bench invalidation_window            # 30 rotations
//!     ROTATIONS=100 cargo bench --bench invalidation_window

// The end-to-end tests' support code; the benchmark uses a small part of it (the stack and the
// daemon), so the rest is unused here.
#[path = "../tests/e2e/support/mod.rs"]
#[allow(dead_code, unused_imports)]
mod support;

use std::time::Instant;

use support::stack::{Options, Stack};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("ROTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let stack = Stack::start().await;
    let o = Options {
        max_regenerations_per_day: (n as u32 + 10).max(20),
        ..Options::default()
    };
    let config = stack.write_config(&o);
    let daemon = stack.daemon(&config).await;

    let mut windows = Vec::with_capacity(n);
    let mut totals = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let record = daemon.rotate(&format!("bench {i}")).await;
        totals.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(record["outcome"], "success", "{record:#}");
        let window = record["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["detail"].as_str())
            .find_map(|d| d.split("invalidation window ").nth(1))
            .and_then(|w| w.trim_end_matches('s').parse::<f64>().ok())
            .expect("the finished event carries the invalidation window");
        windows.push(window * 1000.0);
    }
    stack.assert_consistent(&o).await;
    windows.sort_by(f64::total_cmp);
    totals.sort_by(f64::total_cmp);
    println!(
        "keyrotd invalidation window, {n} rotations, 3 destinations (OpenBao, moto, file), 2 signed HTTP hooks"
    );
    println!(
        "  invalidation window ms: p50 {:.1}  p90 {:.1}  max {:.1}",
        percentile(&windows, 0.5),
        percentile(&windows, 0.9),
        windows[windows.len() - 1]
    );
    println!(
        "  whole rotation (API request to outcome, incl. preflight) ms: p50 {:.1}  p90 {:.1}  max {:.1}",
        percentile(&totals, 0.5),
        percentile(&totals, 0.9),
        totals[totals.len() - 1]
    );
}
