//! keyrotd rotates third-party API keys without outages: it regenerates a key at its issuing portal,
//! writes the new value to every destination in parallel, tells dependents to reload, and watches them.
//!
//! Layout, in pipeline order:
//! - [`config`]: TOML -> validated [`config::Config`] (all problems at once, with field paths);
//! - [`secret`]: the `Secret` type and `{env}`/`{file}` references, the only place credentials are read;
//! - [`schedule`]: cron + time zone + window + jitter -> next due time (pure, takes a clock);
//! - [`clock`]: the wall clock the engine reads, injected (system, or virtual in tests);
//! - [`provider`]: the issuing portals (`aos`, `http`), errors that know if they are retryable/ambiguous;
//! - [`store`]: destinations (`vault` KV v2, `aws` Secrets Manager, `file`);
//! - [`notify`]: dependents' reload hooks (HTTP, command) and verify probes;
//! - [`journal`]: crash-safe per-key state, the state-dir lock, the audit log;
//! - [`engine`]: one owner per key; the rotation as a pipeline of phases; recovery and reconcile
//!   (decide, then act); the scheduler's one timer;
//! - [`telemetry`]: every metric, defined once;
//! - [`admin`]: the HTTP API (metrics, health, status, the few POSTs);
//! - [`daemon`]: `keyrotd run`: wires it all, signals, the calls to [`systemd`];
//! - [`systemd`]: the sd_notify protocol (READY, WATCHDOG, RELOADING, STOPPING);
//! - [`cli`]: the commands, parsed and printed; [`commands`]: the async bodies of `status` and `rotate`;
//! - [`sim`]: the portal and dependent simulators used by the tests and the demo, and the delaying
//!   proxy the benchmarks use;
//! - [`testing`] (feature `testing`): the in-process seam — an in-memory store, a scripted provider
//!   and scripted dependents — that the engine's tests run on.
//!
//! What each part promises its operators is in `docs/` (docs/README.md lists the pages).
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod journal;
pub mod notify;
pub mod provider;
pub mod schedule;
pub mod secret;
pub mod sim;
pub mod store;
pub mod systemd;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
