//! keyrotd rotates third-party API keys without outages: it regenerates a key at its issuing portal,
//! writes the new value to every destination in parallel, tells dependents to reload, and watches them.
//!
//! Layout, in pipeline order:
//! - [`config`]: TOML -> validated [`config::Config`] (all problems at once, with field paths);
//! - [`secret`]: the `Secret` type and `{env}`/`{file}` references, the only place credentials are read;
//! - [`backoff`]: pauses between attempts (exponential, jittered) and the `Retry-After` cap;
//! - [`schedule`]: cron + time zone + window + jitter -> next due time (pure, takes a clock);
//! - [`clock`]: the wall clock the engine reads, injected (system, or virtual in tests);
//! - [`provider`]: the issuing portals (`aos`, `http`), errors that know if they are retryable/ambiguous;
//! - [`store`]: destinations (`vault` KV v2, `aws` Secrets Manager, `file`);
//! - [`http_client`]: every HTTP client, built one way and shared between identical settings;
//! - [`limits`]: at most N requests at once per provider and per store, and a provider's cool-down;
//! - [`notify`]: dependents' reload hooks (HTTP, command) and verify probes; notifications to owners;
//! - [`journal`]: crash-safe per-key state, the state-dir lock, the audit log;
//! - [`coordination`]: several replicas on a Vault lease (membership, rendezvous, fencing);
//! - [`engine`]: one owner per key; the rotation as a pipeline of phases; recovery and reconcile
//!   (decide, then act); the scheduler's one timer;
//! - [`telemetry`]: every metric, defined once;
//! - [`admin`]: the HTTP API (metrics, health, status, the few POSTs);
//! - [`daemon`]: `keyrotd run`: wires it all, signals, the calls to [`systemd`];
//! - [`systemd`]: the sd_notify protocol (READY, WATCHDOG, RELOADING, STOPPING);
//! - [`cli`]: the commands, parsed and printed; [`commands`]: the async bodies of `status`, `rotate`
//!   and `approve`; [`checklist`]: the rotation checklist of one key as data (`plan --checklist`);
//! - [`sim`]: the portal and dependent simulators used by the tests and the demo, and the delaying
//!   proxy the benchmarks use;
//! - [`testing`] (feature `testing`): the in-process seam — an in-memory store, a scripted provider
//!   and scripted dependents — that the engine's tests run on.
//!
//! What each part promises its operators is in `docs/` (docs/README.md lists the pages).
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod checklist;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod config;
pub mod coordination;
pub mod daemon;
pub mod engine;
pub mod http_client;
pub mod journal;
pub mod limits;
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
