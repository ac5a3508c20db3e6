//! The `keyrotd` binary: parse the command line, set up logging, run the command, map its result to
//! the exit code. Everything else lives in the library (`keyrotd::cli`).
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::OnceLock;

use clap::Parser;
use keyrotd::cli::{self, Cli};
use keyrotd::config::LogFormat;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// jemalloc rather than the C library's allocator: its background thread hands freed pages back to
/// the system within seconds. Reading a large config takes about ten times the memory the daemon then
/// keeps; with glibc's allocator a 10,000-key daemon stayed near that start-up peak.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// What marking the process non-dumpable gave, for [`init_tracing`] to report.
static PROTECTION: OnceLock<Result<(), String>> = OnceLock::new();

fn main() -> ExitCode {
    // Before anything reads a credential: no core dump or same-user ptrace may see a key. A failure
    // is logged once logging is set up.
    let _ = PROTECTION.set(keyrotd::secret::protect_process_memory());
    // Usage errors (bad flags) exit 2 through clap; `--help`/`--version` exit 0.
    let cli = Cli::parse();
    // Test builds only (`--features failpoints`): the `FAILPOINTS` environment variable configures the
    // engine's named failpoints (`after_preflight`, `before_regenerate`, `after_regenerate`,
    // `after_first_store`), e.g. `FAILPOINTS=after_regenerate=sleep(30000)`, so the crash tests can
    // SIGKILL (or stop) the daemon at a phase boundary. Without the feature, `fail_point!` compiles
    // to nothing and this is absent.
    #[cfg(feature = "failpoints")]
    let scenario = fail::FailScenario::setup();
    let code = cli::execute(cli, init_tracing);
    #[cfg(feature = "failpoints")]
    scenario.teardown();
    code.into()
}

/// Logs to stderr: a human format or one JSON object per line. `RUST_LOG` filters (default `info`).
/// Colours only on a terminal: journald, log files and shippers get plain text, so that a line reads
/// `rotation{key=billing rotation_id=...}: ...` for grep and parsers alike. The Vault client
/// libraries' own logs are dropped whatever `RUST_LOG` says (`store::vault::quiet_client_logs`).
fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let quiet = keyrotd::store::vault::quiet_client_logs();
    // `try_init` only fails if a subscriber is already set, which leaves logging working.
    let _ = match format {
        LogFormat::Text => builder.finish().with(quiet).try_init(),
        LogFormat::Json => builder.json().finish().with(quiet).try_init(),
    };
    if let Some(Err(e)) = PROTECTION.get() {
        tracing::warn!(error = %e, "Cannot mark the process non-dumpable: a core dump could hold keys.");
    }
}
