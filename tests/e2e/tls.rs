//! Private CAs and client certificates, with a CA and certificates this test generates: a real
//! OpenBao listening on TLS (server-only and mTLS listeners), moto on TLS for the AWS store's
//! `ca_file`; and the `VAULT_*` variables of the environment, which keyrotd must ignore (a
//! subprocess run of the real binary with them set).
//!
//! Every listener is opened on port 0 and found afterwards among the ports the child holds: OpenBao
//! takes `address = "127.0.0.1:0"` (and `cluster_address`) in a listener stanza, moto takes `-p 0`.
//! Which port is which is told by what answers there: plain HTTP, TLS with the test CA, TLS that
//! needs the client certificate.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::process::{Proc, http_status};
use crate::support::sim::Portal;
use crate::support::tools_bin;
use chrono::Utc;
use keyrotd::config::{DestinationTarget, TlsConfig, VaultAuth, VaultStoreConfig};
use keyrotd::secret::{Secret, fingerprint};
use keyrotd::store::vault::VaultStore;
use keyrotd::store::{Store, WriteRequest};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use uuid::Uuid;

/// How long OpenBao and moto get to answer on every listener after starting.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "keyrotd test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        std::fs::write(
            dir.path().join("ca.pem"),
            ca.self_signed(&ca_key).unwrap().pem(),
        )
        .unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        };
        leaf(
            "server",
            vec!["127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        leaf("client", vec![], ExtendedKeyUsagePurpose::ClientAuth);
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The HTTP status of `GET https://127.0.0.1:PORT{path}` trusting only the test CA, presenting
    /// the client certificate when `client_cert`; `None` when no TLS server of this CA answers
    /// there (plain HTTP, another certificate, a refused handshake). Blocking, so that it can tell
    /// [`Proc::wait_port`] which port is which: the request runs on a runtime of its own thread.
    fn https_status(&self, port: u16, path: &str, client_cert: bool) -> Option<u16> {
        let read = |name: &str| std::fs::read(self.path(name)).expect("the test PKI files");
        let mut builder = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&read("ca.pem")).expect("the test CA")])
            .timeout(Duration::from_secs(2));
        if client_cert {
            let mut pem = read("client.pem");
            pem.extend(read("client.key"));
            builder = builder.identity(reqwest::Identity::from_pem(&pem).expect("client identity"));
        }
        let client = builder.build().expect("a TLS client for the test CA");
        let url = format!("https://127.0.0.1:{port}{path}");
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for one probe");
                rt.block_on(async { Some(client.get(&url).send().await.ok()?.status().as_u16()) })
            })
            .join()
            .expect("the probe thread")
        })
    }
}

/// `bao server -dev` with its plain dev listener plus two TLS listeners from a config file: one
/// that verifies the server only, one that also requires a client certificate from the test CA.
/// All three (and their cluster listeners) bind port 0.
struct TlsBao {
    http: String,
    https: String,
    mtls: String,
    root: String,
    _proc: Proc,
    _config: tempfile::TempDir,
}

impl TlsBao {
    fn start(pki: &Pki) -> TlsBao {
        let config = tempfile::tempdir().unwrap();
        let p = |n: &str| pki.path(n).display().to_string();
        let hcl = format!(
            r#"
listener "tcp" {{
  address = "127.0.0.1:0"
  cluster_address = "127.0.0.1:0"
  tls_cert_file = "{cert}"
  tls_key_file = "{key}"
}}
listener "tcp" {{
  address = "127.0.0.1:0"
  cluster_address = "127.0.0.1:0"
  tls_cert_file = "{cert}"
  tls_key_file = "{key}"
  tls_require_and_verify_client_cert = "true"
  tls_client_ca_file = "{ca}"
}}
"#,
            cert = p("server.pem"),
            key = p("server.key"),
            ca = p("ca.pem"),
        );
        let file = config.path().join("tls.hcl");
        std::fs::write(&file, hcl).unwrap();
        let root = format!("root-{}", Uuid::new_v4().simple());
        let bin = tools_bin().join("bao");
        assert!(
            bin.exists(),
            "OpenBao binary not found at {}: run scripts/install-tools.sh",
            bin.display()
        );
        let mut cmd = Command::new(bin);
        cmd.args([
            "server",
            "-dev",
            &format!("-dev-root-token-id={root}"),
            "-dev-listen-address=127.0.0.1:0",
            "-dev-no-store-token",
            &format!("-config={}", file.display()),
        ])
        .env("HOME", config.path());
        let mut proc = Proc::spawn("OpenBao with TLS listeners", cmd);
        let health = "/v1/sys/health";
        // The dev listener speaks plain HTTP; the cluster listeners present OpenBao's own
        // certificate, so no probe with the test CA passes there.
        let http = proc.wait_port(READY_TIMEOUT, |p| http_status(p, health) == Some(200));
        let https = proc.wait_port(READY_TIMEOUT, |p| {
            pki.https_status(p, health, false) == Some(200)
        });
        let mtls = proc.wait_port(READY_TIMEOUT, |p| {
            pki.https_status(p, health, false).is_none()
                && pki.https_status(p, health, true) == Some(200)
        });
        TlsBao {
            http: format!("http://127.0.0.1:{http}"),
            https: format!("https://127.0.0.1:{https}"),
            mtls: format!("https://127.0.0.1:{mtls}"),
            root,
            _proc: proc,
            _config: config,
        }
    }
}

fn store(address: &str, token: &str, tls: TlsConfig) -> Store {
    let c = VaultStoreConfig {
        address: address.parse().unwrap(),
        auth: VaultAuth::Token(Secret::from(token.to_string())),
        mount: "secret".into(),
        namespace: None,
        timeout: Duration::from_secs(5),
        token_file: None,
        tls,
    };
    Store::Vault(VaultStore::new("vault-tls", &c).unwrap())
}

fn target() -> DestinationTarget {
    DestinationTarget::Vault {
        path: "apps/billing".into(),
        field: "api_key".into(),
    }
}

async fn write(store: &Store) -> Result<Option<String>, keyrotd::store::StoreError> {
    let secret = Secret::from(format!("aos_sk_live_{}", Uuid::new_v4().simple()));
    let fp = fingerprint(&secret);
    let req = WriteRequest {
        key: "billing",
        rotation_id: Uuid::new_v4(),
        key_id: "key_1",
        secret: &secret,
        fingerprint: &fp,
        rotated_at: Utc::now(),
        fence: None,
    };
    store.write(&target(), &req).await
}

#[tokio::test]
async fn openbao_on_tls_works_with_the_ca_file_and_fails_clearly_without_it() {
    let pki = Pki::new();
    let bao = TlsBao::start(&pki);
    let with_ca = TlsConfig {
        ca_file: Some(pki.path("ca.pem")),
        ..TlsConfig::default()
    };
    let good = store(&bao.https, &bao.root, with_ca);
    good.preflight(&target())
        .await
        .expect("trusted via ca_file");
    assert_eq!(write(&good).await.unwrap().as_deref(), Some("1"));

    let bad = store(&bao.https, &bao.root, TlsConfig::default());
    let e = bad.preflight(&target()).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("vault-tls:") && text.contains("certificate"),
        "the error names the store and the certificate problem: {text}"
    );
}

#[tokio::test]
async fn a_client_certificate_is_presented_where_the_listener_requires_one() {
    let pki = Pki::new();
    let bao = TlsBao::start(&pki);
    let mtls = TlsConfig {
        ca_file: Some(pki.path("ca.pem")),
        client_cert: Some(pki.path("client.pem")),
        client_key: Some(pki.path("client.key")),
    };
    let good = store(&bao.mtls, &bao.root, mtls);
    good.preflight(&target())
        .await
        .expect("client certificate accepted");
    write(&good).await.expect("write over mTLS");

    let no_cert = TlsConfig {
        ca_file: Some(pki.path("ca.pem")),
        ..TlsConfig::default()
    };
    let bad = store(&bao.mtls, &bao.root, no_cert);
    let e = bad.preflight(&target()).await.unwrap_err();
    assert!(e.to_string().starts_with("vault-tls:"), "{e}");
}

/// A plain-HTTP server that records every request head and answers like a Vault that refuses
/// everything (403).
fn recorder() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = Vec::new();
            let mut byte = [0u8; 1];
            while !buf.ends_with(b"\r\n\r\n") && s.read(&mut byte).map(|n| n == 1).unwrap_or(false)
            {
                buf.push(byte[0]);
            }
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf).into_owned());
            let body = r#"{"errors":["permission denied"]}"#;
            let _ = write!(
                s,
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (addr, heads)
}

fn write_config(dir: &Path, portal: &Portal, tls_addr: &str, recorder: &str) -> PathBuf {
    let text = format!(
        r#"[daemon]
state_dir = "{state}"
listen = "127.0.0.1:0"

[providers.portal]
kind = "aos"
base_url = "{portal}"
management_token = {{ env = "KEYROTD_TEST_AOS_TOKEN" }}

[stores.vault-tls]
kind = "vault"
address = "{tls_addr}"
token = {{ env = "KEYROTD_TEST_VAULT_TOKEN" }}

[stores.vault-approle]
kind = "vault"
address = "{recorder}"
approle = {{ role_id = {{ env = "KEYROTD_TEST_ROLE_ID" }}, secret_id = {{ env = "KEYROTD_TEST_SECRET_ID" }} }}

[stores.vault-token]
kind = "vault"
address = "{recorder}"
token = {{ env = "KEYROTD_TEST_CONFIGURED_TOKEN" }}

[[keys]]
name = "billing"
provider = "portal"
  [[keys.destinations]]
  store = "vault-tls"
  path = "apps/billing"
  field = "api_key"
  [[keys.destinations]]
  store = "vault-approle"
  path = "apps/billing"
  field = "api_key"
  [[keys.destinations]]
  store = "vault-token"
  path = "apps/billing"
  field = "api_key"
"#,
        state = dir.join("state").display(),
        portal = portal.url(),
    );
    let path = dir.join("keyrotd.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn vault_variables_in_the_environment_neither_weaken_tls_nor_lend_their_token() {
    let pki = Pki::new();
    let bao = TlsBao::start(&pki);
    let portal = Portal::start();
    let (recorder, heads) = recorder();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &portal, &bao.https, &recorder);
    let ambient = format!("ambient-{}", Uuid::new_v4().simple());
    let out = Command::new(env!("CARGO_BIN_EXE_keyrotd"))
        .arg("-c")
        .arg(&config)
        .args([
            "rotate",
            "billing",
            "--reason",
            "ambient check",
            "--dry-run",
        ])
        .env("KEYROTD_TEST_AOS_TOKEN", portal.token())
        .env("KEYROTD_TEST_VAULT_TOKEN", &bao.root)
        .env("KEYROTD_TEST_ROLE_ID", "role")
        .env("KEYROTD_TEST_SECRET_ID", "secret")
        .env("KEYROTD_TEST_CONFIGURED_TOKEN", "configured-token")
        // Each of these would make a vaultrs client trust anything, or send this token.
        .env("VAULT_SKIP_VERIFY", "1")
        .env("VAULT_CACERT", pki.path("ca.pem"))
        .env("VAULT_TOKEN", &ambient)
        .env("VAULT_ADDR", &bao.http)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .output()
        .expect("run keyrotd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "the dry run must find problems:\n{text}"
    );
    // Verification stayed on, and the store's error says why.
    assert!(
        text.lines()
            .any(|l| l.contains("vault-tls:") && l.contains("certificate")),
        "no error named the TLS store and its certificate:\n{text}"
    );
    let heads = heads.lock().unwrap().clone();
    assert!(
        heads.iter().any(|h| h.contains("/v1/auth/approle/login")),
        "the AppRole store logged in at its own address: {heads:?}"
    );
    for head in &heads {
        assert!(!head.contains(&ambient), "VAULT_TOKEN was sent: {head}");
        let lower = head.to_ascii_lowercase();
        if head.contains("/v1/auth/approle/login") {
            assert!(
                !lower.contains("x-vault-token"),
                "a login carries no token: {head}"
            );
        } else if lower.contains("x-vault-token") {
            assert!(head.contains("configured-token"), "{head}");
        }
    }
}

/// moto on TLS with the test's server certificate, on a port it picks itself; killed when dropped.
struct TlsMoto {
    endpoint: String,
    _proc: Proc,
}

impl TlsMoto {
    fn start(pki: &Pki) -> TlsMoto {
        let bin = tools_bin().join("moto_server");
        assert!(
            bin.exists(),
            "moto_server not found at {}: run scripts/install-tools.sh",
            bin.display()
        );
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", "0", "-s"])
            .arg("-c")
            .arg(pki.path("server.pem"))
            .arg("-k")
            .arg(pki.path("server.key"));
        let mut proc = Proc::spawn("moto on TLS", cmd);
        let port = proc.wait_port(READY_TIMEOUT, |p| {
            pki.https_status(p, "/moto-api/", false).is_some()
        });
        TlsMoto {
            endpoint: format!("https://127.0.0.1:{port}"),
            _proc: proc,
        }
    }
}

#[tokio::test]
async fn the_aws_store_trusts_its_ca_file_and_only_then() {
    use aws_config::BehaviorVersion;
    use aws_sdk_secretsmanager::config::{Credentials, Region};
    use keyrotd::config::AwsStoreConfig;
    use keyrotd::store::StoreErrorKind;
    use keyrotd::store::aws::AwsStore;
    let pki = Pki::new();
    let moto = TlsMoto::start(&pki);
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "keyrotd-tests",
        ))
        .region(Region::new("eu-central-2"))
        .load()
        .await;
    let mut c = AwsStoreConfig {
        region: Some("eu-central-2".into()),
        endpoint_url: Some(moto.endpoint.parse().unwrap()),
        timeout: Duration::from_secs(5),
        ca_file: Some(pki.path("ca.pem")),
    };
    let missing = DestinationTarget::Aws {
        secret_id: "prod/none".into(),
        field: None,
    };
    // Through TLS, moto answers: the secret does not exist.
    let trusted = AwsStore::with_sdk_config("aws-tls", &c, &sdk).unwrap();
    let e = trusted.preflight(&missing).await.unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::NotFound, "{e}");
    c.ca_file = None;
    let untrusted = AwsStore::with_sdk_config("aws-tls", &c, &sdk).unwrap();
    let e = untrusted.preflight(&missing).await.unwrap_err();
    assert_eq!(e.kind, StoreErrorKind::Transient, "{e}");
    assert!(
        e.to_string().starts_with("aws-tls:") && e.to_string().contains("certificate"),
        "{e}"
    );
}
