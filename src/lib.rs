//! keyrotd rotates third-party API keys without outages: it regenerates a key at its issuing portal,
//! writes the new value to every destination in parallel, tells dependents to reload, and watches them.
//!
//! Layout, in pipeline order:
//! - [`config`]: TOML -> validated [`config::Config`] (all problems at once, with field paths);
//! - [`secret`]: the `Secret` type and `{env}`/`{file}` references, the only place credentials are read;
//! - [`backoff`]: pauses between attempts (exponential, jittered) and the `Retry-After` cap;
//! - [`schedule`]: cron + time zone + window + jitter -> next due time (pure, takes a clock);
//! - [`provider`]: the issuing portals (`aos`, `http`), errors that know if they are retryable/ambiguous;
//! - [`store`]: destinations (`vault` KV v2, `aws` Secrets Manager, `file`);
//! - [`notify`]: dependents' reload hooks (HTTP, command) and verify probes;
//! - [`journal`]: crash-safe per-key state, the state-dir lock, the audit log;
//! - [`engine`]: the rotation lifecycle, recovery, re-rotation, reconcile, the scheduler loop;
//! - [`telemetry`]: every metric, defined once;
//! - [`admin`]: the HTTP API (metrics, health, status, the few POSTs);
//! - [`daemon`]: `keyrotd run`: wires it all, signals, systemd notify;
//! - [`cli`]: the commands;
//! - [`sim`]: the portal and dependent simulators used by the tests and the demo.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod cli;
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
