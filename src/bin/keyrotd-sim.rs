//! `keyrotd-sim`: the portal and dependent simulators and the delaying proxy (library: `keyrotd::sim`)
//! as a program, for the integration tests, the benchmarks and the demo. Prints one line,
//! `keyrotd-sim <what> listening on http://ADDR`, once it accepts connections (with
//! `--listen 127.0.0.1:0` that line carries the real port); never prints a secret (the portal's issued
//! secrets are at `GET /_sim/issued-secrets`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use keyrotd::secret::{Secret, SecretRef};
use keyrotd::sim::{self, dependent, portal, proxy, vendor};
use url::Url;

#[derive(Parser)]
#[command(
    name = "keyrotd-sim",
    about = "Simulators of the AOS portal, of a vendor that keeps two keys live and of a dependent service, and a delaying TCP proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// The portal: the aos contract plus /_sim/ controls.
    Portal {
        /// Address to listen on (port 0: any free port, printed on stdout).
        #[arg(long)]
        listen: SocketAddr,
        /// Environment variable holding the management token.
        #[arg(long)]
        token_env: String,
        /// The account the key belongs to.
        #[arg(long, default_value = "acct_42")]
        account_id: String,
        /// File holding the initial key's secret (one trailing newline stripped); random otherwise.
        #[arg(long)]
        seed_secret_file: Option<PathBuf>,
        /// Serve N independent accounts (one random key each), account i (0..N) reporting `acct_<i>`
        /// under /a/<i>/v1/... and /a/<i>/_sim/..., with totals at /_sim/counters.
        #[arg(long, conflicts_with_all = ["account_id", "seed_secret_file"])]
        accounts: Option<usize>,
    },
    /// A TCP proxy that delays each direction and counts the HTTP/1 requests passing through it.
    Proxy {
        /// Address to listen on (port 0: any free port, printed on stdout).
        #[arg(long)]
        listen: SocketAddr,
        /// Where connections are forwarded (HOST:PORT).
        #[arg(long)]
        upstream: String,
        /// Delay added to each direction, in milliseconds (a round trip costs twice this).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Address of the counters' HTTP endpoint (GET /_sim/counters, POST /_sim/reset).
        #[arg(long, default_value = "127.0.0.1:0")]
        control: SocketAddr,
    },
    /// A vendor that keeps every key live until it is revoked (create, list, revoke).
    Vendor {
        /// Address to listen on (port 0: any free port, printed on stdout).
        #[arg(long)]
        listen: SocketAddr,
        /// Environment variable holding the management token.
        #[arg(long)]
        token_env: String,
        /// A key live at start: NAME=FILE (the file holds its secret; one trailing newline stripped).
        /// Repeatable.
        #[arg(long = "seed", value_parser = vendor::parse_seed)]
        seeds: Vec<(String, PathBuf)>,
    },
    /// A service that reads the key on reload and authenticates with it at the portal.
    Dependent {
        #[arg(long)]
        listen: SocketAddr,
        /// The portal's base URL.
        #[arg(long)]
        portal: Url,
        /// Where the key is read from on reload.
        #[arg(long, value_enum)]
        source: SourceKind,
        /// --source file: the file holding the key.
        #[arg(long)]
        file: Option<PathBuf>,
        /// --source vault: the server's address.
        #[arg(long)]
        vault_addr: Option<Url>,
        /// --source vault: the KV v2 mount.
        #[arg(long, default_value = "secret")]
        vault_mount: String,
        /// --source vault: the secret's path under the mount.
        #[arg(long)]
        vault_path: Option<String>,
        /// --source vault: the field holding the key.
        #[arg(long)]
        vault_field: Option<String>,
        /// --source vault: environment variable holding the Vault token.
        #[arg(long, default_value = "VAULT_TOKEN")]
        vault_token_env: String,
        /// --source aws: endpoint override (e.g. a moto server); region and credentials come from the
        /// standard AWS environment.
        #[arg(long)]
        aws_endpoint: Option<String>,
        /// --source aws: the secret's name or ARN.
        #[arg(long)]
        aws_secret_id: Option<String>,
        /// --source aws: a field of a JSON SecretString; the whole string when absent.
        #[arg(long)]
        aws_field: Option<String>,
        /// How often it calls the portal's auth check once it has a key.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        probe_interval: Duration,
        /// Environment variable holding the HMAC key reloads must be signed with.
        #[arg(long)]
        signing_key_env: Option<String>,
        /// How far a signed reload's timestamp may be from this process's clock.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        max_signature_age: Duration,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SourceKind {
    File,
    Vault,
    Aws,
}

fn env_secret(name: &str) -> Result<Secret> {
    SecretRef::Env(name.to_string())
        .resolve()
        .with_context(|| format!("reading --{name}"))
}

/// The single-account portal.
fn portal_router(
    management_token: Secret,
    account_id: String,
    seed_secret_file: Option<PathBuf>,
) -> Result<axum::Router> {
    let seed_secret = match seed_secret_file {
        Some(path) => Some(
            SecretRef::File(path)
                .resolve()
                .context("the seed secret (--seed-secret-file)")?,
        ),
        None => None,
    };
    let p = portal::Portal::new(portal::PortalOptions {
        management_token,
        account_id,
        seed_secret,
    });
    Ok(p.router())
}

/// `--accounts N`: N accounts under `/a/<i>`.
fn fleet_router(management_token: Secret, accounts: usize) -> Result<axum::Router> {
    if accounts == 0 {
        bail!("--accounts must be at least 1");
    }
    let fleet = portal::Fleet::new(portal::FleetOptions {
        management_token,
        accounts,
    });
    Ok(fleet.router())
}

/// The proxy on `listen`, its counters on `control`, until the process ends.
async fn run_proxy(
    listen: SocketAddr,
    upstream: String,
    delay: Duration,
    control: SocketAddr,
) -> Result<()> {
    let p = proxy::Proxy::new(upstream, delay);
    let control = tokio::net::TcpListener::bind(control)
        .await
        .with_context(|| format!("listening on {control} (--control)"))?;
    let control_addr = control.local_addr()?;
    tokio::spawn(sim::serve(control, p.control_router()));
    let listener = proxy::bind_and_announce(listen, control_addr)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    p.serve(listener).await;
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Portal {
            listen,
            token_env,
            account_id,
            seed_secret_file,
            accounts,
        } => {
            let management_token = SecretRef::Env(token_env.clone())
                .resolve()
                .with_context(|| format!("the management token (--token-env {token_env})"))?;
            let router = match accounts {
                Some(accounts) => fleet_router(management_token, accounts)?,
                None => portal_router(management_token, account_id, seed_secret_file)?,
            };
            let listener = sim::bind_and_announce(listen, "portal")
                .await
                .with_context(|| format!("listening on {listen}"))?;
            sim::serve(listener, router).await?;
        }
        Command::Proxy {
            listen,
            upstream,
            delay_ms,
            control,
        } => run_proxy(listen, upstream, Duration::from_millis(delay_ms), control).await?,
        Command::Vendor {
            listen,
            token_env,
            seeds,
        } => {
            let management_token = SecretRef::Env(token_env.clone())
                .resolve()
                .with_context(|| format!("the management token (--token-env {token_env})"))?;
            let seeds = seeds
                .into_iter()
                .map(|(name, path)| {
                    let secret = SecretRef::File(path.clone())
                        .resolve()
                        .with_context(|| format!("--seed {name}={}", path.display()))?;
                    Ok((name, secret))
                })
                .collect::<Result<Vec<_>>>()?;
            let v = vendor::Vendor::new(vendor::VendorOptions {
                management_token,
                seeds,
            });
            let listener = sim::bind_and_announce(listen, "vendor")
                .await
                .with_context(|| format!("listening on {listen}"))?;
            sim::serve(listener, v.router()).await?;
        }
        Command::Dependent {
            listen,
            portal,
            source,
            file,
            vault_addr,
            vault_mount,
            vault_path,
            vault_field,
            vault_token_env,
            aws_endpoint,
            aws_secret_id,
            aws_field,
            probe_interval,
            signing_key_env,
            max_signature_age,
        } => {
            let source = match source {
                SourceKind::File => {
                    dependent::Source::File(file.context("--source file needs --file PATH")?)
                }
                SourceKind::Vault => {
                    let (Some(addr), Some(path), Some(field)) =
                        (vault_addr, vault_path, vault_field)
                    else {
                        bail!("--source vault needs --vault-addr, --vault-path and --vault-field");
                    };
                    dependent::Source::Vault {
                        addr,
                        mount: vault_mount,
                        path,
                        field,
                        token: env_secret(&vault_token_env)?,
                    }
                }
                SourceKind::Aws => dependent::Source::Aws {
                    endpoint: aws_endpoint,
                    secret_id: aws_secret_id.context("--source aws needs --aws-secret-id")?,
                    field: aws_field,
                },
            };
            if probe_interval.is_zero() {
                bail!("--probe-interval must be positive");
            }
            let signing_key = match signing_key_env {
                Some(name) => Some(env_secret(&name)?),
                None => None,
            };
            let d = dependent::Dependent::new(dependent::DependentOptions {
                portal,
                source,
                probe_interval,
                signing_key,
                max_signature_age,
            })
            .map_err(anyhow::Error::msg)?;
            d.start_background().await;
            let listener = sim::bind_and_announce(listen, "dependent")
                .await
                .with_context(|| format!("listening on {listen}"))?;
            sim::serve(listener, d.router()).await?;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyrotd-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
