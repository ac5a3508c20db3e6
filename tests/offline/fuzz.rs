//! The fuzz targets of fuzz/targets/ (the same code libFuzzer runs through `scripts/fuzz.sh`), run by
//! the test command on stable Rust for a bounded time: each target first gets every input kept in its
//! corpus (fuzz/corpus/TARGET/, regression cases included), then random mutations of them — bit flips,
//! byte changes, insertions of tokens that parsers care about, truncations, splices of two inputs.
//! Without coverage feedback this finds less than libFuzzer, but it runs every time, from a seed it
//! prints (set KEYROTD_FUZZ_SEED to replay one; KEYROTD_FUZZ_SECONDS sets the time per target).
//!
//! A failing input is written to target/fuzz-findings/ and named in the failure. An input that runs
//! for more than 10 s aborts the run (a hang) after saving it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "../../fuzz/targets/admin_request.rs"]
mod admin_request;
#[path = "../../fuzz/targets/config_load.rs"]
mod config_load;
#[path = "../../fuzz/targets/journal_load.rs"]
mod journal_load;
#[path = "../../fuzz/targets/provider_responses.rs"]
mod provider_responses;

const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"-1",
    b"1e999",
    b"\\u0000",
    b"\n",
    b"=",
    b"[[keys]]",
    b"{ env = \"X\" }",
    b"{ file = \"/dev/zero\" }",
    b"\xff",
    b"\x00",
    b"Bearer ",
    b"\n\n",
    b"Content-Length: 99999999",
    b"POST /v1/keys/k/rotate",
    b"phase",
    b"\"regenerating\"",
    b"9999999999999999999999",
];

/// xorshift64*: enough randomness for mutations, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut input = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                let at = rng.below(len + 1);
                input.splice(at..at, token.iter().copied());
            }
            3 if len > 0 => input.truncate(rng.below(len)),
            4 => {
                let other = &corpus[rng.below(corpus.len())];
                let (at, from) = (rng.below(len + 1), rng.below(other.len() + 1));
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            _ if len > 1 => {
                let (a, b) = (rng.below(len), rng.below(len));
                let (a, b) = (a.min(b), a.max(b));
                let chunk = input[a..b].to_vec();
                input.splice(a..a, chunk);
            }
            _ => input.push(rng.next() as u8),
        }
        input.truncate(1 << 16);
    }
    input
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect();
    assert!(!inputs.is_empty(), "corpus {} is empty", dir.display());
    inputs.sort();
    inputs
}

fn save(target: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-findings");
    let _ = std::fs::create_dir_all(&dir);
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{target}-{hash:016x}"));
    let _ = std::fs::write(&path, input);
    path
}

/// Runs `run` on the corpus, then on mutations until the time per target is spent.
fn fuzz(target: &'static str, run: fn(&[u8])) {
    let seconds: u64 = std::env::var("KEYROTD_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let seed: u64 = std::env::var("KEYROTD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::random::<u64>() | 1);
    let corpus = corpus(target);
    let current = std::sync::Arc::new(Mutex::new(Vec::<u8>::new()));
    let started = std::sync::Arc::new(AtomicU64::new(0));
    let origin = Instant::now();
    watchdog(target, current.clone(), started.clone(), origin);
    let mut rng = Rng(seed);
    let deadline = origin + Duration::from_secs(seconds);
    let mut runs = 0u64;
    let inputs = corpus.clone().into_iter().chain(std::iter::from_fn(|| {
        (Instant::now() < deadline).then(|| mutate(&mut rng, &corpus))
    }));
    for input in inputs {
        *current.lock().unwrap() = input.clone();
        started.store(origin.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        let outcome = std::panic::catch_unwind(|| run(&input));
        started.store(0, Ordering::SeqCst);
        if let Err(panic) = outcome {
            let path = save(target, &input);
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "{target}: input {} failed (seed {seed}): {what}",
                path.display()
            );
        }
        runs += 1;
    }
    println!("{target}: {runs} inputs in {seconds} s, seed {seed}, no finding");
}

/// Aborts the process when one input runs for more than 10 s, after saving it.
fn watchdog(
    target: &'static str,
    current: std::sync::Arc<Mutex<Vec<u8>>>,
    started: std::sync::Arc<AtomicU64>,
    origin: Instant,
) {
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let at = started.load(Ordering::SeqCst);
            if at != 0 && origin.elapsed().as_millis() as u64 > at + 10_000 {
                let path = save(target, &current.lock().unwrap());
                eprintln!(
                    "{target}: an input ran for more than 10 s: {}",
                    path.display()
                );
                std::process::abort();
            }
        }
    });
}

#[test]
fn config_load_survives_every_input() {
    fuzz("config_load", config_load::run);
}

#[test]
fn provider_responses_survive_every_input() {
    fuzz("provider_responses", provider_responses::run);
}

#[test]
fn admin_requests_survive_every_input() {
    fuzz("admin_request", admin_request::run);
}

#[test]
fn journal_load_survives_every_input() {
    fuzz("journal_load", journal_load::run);
}

#[test]
fn mutations_are_reproducible_from_their_seed() {
    let corpus = vec![b"{\"a\": 1}".to_vec(), b"hello".to_vec()];
    let run = |seed| {
        let mut rng = Rng(seed);
        (0..50)
            .map(|_| mutate(&mut rng, &corpus))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}
