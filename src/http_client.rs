//! The one place keyrotd builds HTTP clients: providers, Vault stores, reload hooks and verify
//! probes all get theirs from [`client`].
//!
//! Every client has the same policy: no redirects (a redirect would replay a regenerate as a GET
//! elsewhere, or carry a credential to another host), a `keyrotd/<version>` user agent, the
//! timeouts its caller asks for, and TLS from the system's roots plus the caller's [`TlsConfig`]
//! (a private CA, a client certificate for mTLS). Credentials go into headers marked sensitive
//! ([`sensitive_header`]), so that no `Debug` of a request shows them.
//!
//! Clients are shared: identical settings, including the *contents* of the TLS files, give the same
//! `reqwest::Client` (a cheap handle on one connection pool). A thousand keys on one portal or one
//! Vault use one pool, and a reload that changes nothing builds nothing; a reload after a CA file
//! was replaced builds a new client because the file's bytes are part of the cache key.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use reqwest::header::HeaderValue;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::config::TlsConfig;
use crate::secret::Secret;

/// What a client is built from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ClientSettings {
    /// Whole request, connect to last body byte; `None` = the caller sets one per request.
    pub timeout: Option<Duration>,
    /// TCP + TLS handshake; `None` = no limit of its own (the request timeout still applies).
    pub connect_timeout: Option<Duration>,
    pub tls: TlsConfig,
}

/// Why a client could not be built. Names the file and what is wrong with it, never its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read {field} {path}: {reason}")]
    Read {
        field: &'static str,
        path: String,
        reason: String,
    },
    #[error("{field} {path} holds no PEM certificate")]
    NoCertificate { field: &'static str, path: String },
    #[error(
        "client_cert and client_key {cert} / {key} are not a PEM certificate and its private key"
    )]
    BadIdentity { cert: String, key: String },
    #[error("client_cert and client_key go together: set both or neither")]
    HalfIdentity,
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

/// The TLS material of a [`TlsConfig`], read and parsed.
struct Material {
    roots: Vec<reqwest::Certificate>,
    identity: Option<reqwest::Identity>,
    /// SHA-256 of every file's bytes, in a fixed order: the part of the cache key that notices a
    /// replaced file. A digest, so that the key material is not kept in the cache.
    digest: [u8; 32],
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::Read {
        field,
        path: path.display().to_string(),
        reason: e.kind().to_string(),
    })
}

/// Reads and parses the files of `tls`. Config validation calls this too, so a bad file is a load
/// error naming the field rather than a failure at the first rotation.
fn material(tls: &TlsConfig) -> Result<Material, ClientError> {
    let mut digest = Sha256::new();
    let mut roots = Vec::new();
    if let Some(path) = &tls.ca_file {
        let pem = read("ca_file", path)?;
        digest.update(&pem);
        roots = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|certs| !certs.is_empty())
            .ok_or_else(|| ClientError::NoCertificate {
                field: "ca_file",
                path: path.display().to_string(),
            })?;
    }
    digest.update([0]);
    let identity = match (&tls.client_cert, &tls.client_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let mut pem = read("client_cert", cert)?;
            pem.push(b'\n');
            pem.extend(read("client_key", key)?);
            digest.update(&pem);
            let bad = || ClientError::BadIdentity {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
            };
            // `from_pem` accepts a key alone; a client certificate without its certificate would
            // only fail at the first handshake, so check both are there.
            let text = String::from_utf8_lossy(&pem);
            if !text.contains("CERTIFICATE-----") || !text.contains("PRIVATE KEY-----") {
                return Err(bad());
            }
            let identity = reqwest::Identity::from_pem(&pem).map_err(|_| bad())?;
            pem.iter_mut().for_each(|b| *b = 0);
            Some(identity)
        }
        _ => return Err(ClientError::HalfIdentity),
    };
    Ok(Material {
        roots,
        identity,
        digest: digest.finalize().into(),
    })
}

/// Clients by their settings and the digest of their TLS files.
type Cache = HashMap<(ClientSettings, [u8; 32]), reqwest::Client>;

/// Checks that the files of `tls` can be read and hold what they should.
pub fn check_tls(tls: &TlsConfig) -> Result<(), ClientError> {
    material(tls).map(|_| ())
}

/// The shared client for `settings`: built on first use, then the same handle for every caller
/// with the same settings and the same TLS file contents.
pub fn client(settings: &ClientSettings) -> Result<reqwest::Client, ClientError> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let material = material(&settings.tls)?;
    let key = (settings.clone(), material.digest);
    let cache = CACHE.get_or_init(Default::default);
    // A poisoned lock only means another thread panicked while holding it; the map is still a
    // valid cache.
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(client) = cache.get(&key) {
        return Ok(client.clone());
    }
    let client = build(settings, material)?;
    cache.insert(key, client.clone());
    Ok(client)
}

fn build(settings: &ClientSettings, material: Material) -> Result<reqwest::Client, ClientError> {
    // Idle connections kept per host: as many as rotations run at once (a fleet's keys on one
    // portal or one Vault share one pool), closed after 30 s unused.
    let mut b = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .pool_idle_timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("keyrotd/", env!("CARGO_PKG_VERSION")));
    if let Some(t) = settings.timeout {
        b = b.timeout(t);
    }
    if let Some(t) = settings.connect_timeout {
        b = b.connect_timeout(t);
    }
    if !material.roots.is_empty() {
        b = b.tls_certs_merge(material.roots);
    }
    if let Some(identity) = material.identity {
        b = b.identity(identity);
    }
    b.build().map_err(|e| ClientError::Build(chain(&e)))
}

/// `prefix + secret` as a header value marked sensitive: left out of `Debug` of requests and
/// headers, and never indexed by HTTP/2 header compression. `None` when the secret holds bytes a
/// header cannot carry.
pub fn sensitive_header(prefix: &str, secret: &Secret) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("{prefix}{}", secret.expose_secret())).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// An error and its sources, joined: reqwest's top-level message alone ("error sending request")
/// hides the cause ("connection refused", "invalid peer certificate: UnknownIssuer"). Transport
/// errors carry the URL and the cause, never a body.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(timeout: u64) -> ClientSettings {
        ClientSettings {
            timeout: Some(Duration::from_secs(timeout)),
            connect_timeout: None,
            tls: TlsConfig::default(),
        }
    }

    /// Two clients are one pool when a request made through one reuses the connection the other
    /// opened; reqwest offers no identity check, so count the connections a server accepts.
    async fn connections_after_two_requests(a: &reqwest::Client, b: &reqwest::Client) -> usize {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(String::from("ok")))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let url = format!("http://{addr}/");
        a.get(&url).send().await.unwrap().text().await.unwrap();
        b.get(&url).send().await.unwrap().text().await.unwrap();
        accepted.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn identical_settings_share_one_connection_pool_and_different_ones_do_not() {
        let a = client(&settings(7)).unwrap();
        let b = client(&settings(7)).unwrap();
        assert_eq!(connections_after_two_requests(&a, &b).await, 1);
        let c = client(&settings(8)).unwrap();
        assert_eq!(connections_after_two_requests(&a, &c).await, 2);
    }

    #[test]
    fn a_missing_or_empty_tls_file_is_named_and_half_an_identity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("ca.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = check_tls(&TlsConfig {
            ca_file: Some(empty.clone()),
            ..TlsConfig::default()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("ca_file {} holds no PEM certificate", empty.display())
        );
        let missing = dir.path().join("nope.pem");
        let e = check_tls(&TlsConfig {
            ca_file: Some(missing.clone()),
            ..TlsConfig::default()
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot read ca_file {}", missing.display()))
        );
        let e = check_tls(&TlsConfig {
            client_cert: Some(empty),
            ..TlsConfig::default()
        })
        .unwrap_err();
        assert_eq!(e, ClientError::HalfIdentity);
    }

    #[test]
    fn a_token_header_is_marked_sensitive() {
        let v = sensitive_header("Bearer ", &Secret::from("tok-canary".to_string())).unwrap();
        assert!(v.is_sensitive());
        assert!(!format!("{v:?}").contains("tok-canary"));
        assert!(sensitive_header("", &Secret::from("bad\nvalue".to_string())).is_none());
    }
}
