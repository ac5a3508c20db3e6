//! Private CAs and client certificates, with a CA and certificates this test generates: a real
//! OpenBao listening on TLS (server-only and mTLS listeners), moto on TLS for the AWS store's
//! `ca_file`; and the `VAULT_*` variables of the environment, which keyrotd must ignore (a
//! subprocess run of the real binary with them set).

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use keyrotd::config::{DestinationTarget, TlsConfig, VaultAuth, VaultStoreConfig};
use keyrotd::secret::{Secret, fingerprint};
use keyrotd::store::vault::VaultStore;
use keyrotd::store::{Store, WriteRequest};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use support::sim::Portal;
use support::{free_port, tools_bin};
use uuid::Uuid;

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
}

/// `bao server -dev` with its plain dev listener plus two TLS listeners from a config file: one
/// that verifies the server only, one that also requires a client certificate from the test CA.
struct TlsBao {
    child: Child,
    http: String,
    https: String,
    mtls: String,
    root: String,
    _config: tempfile::TempDir,
}

impl TlsBao {
    fn start(pki: &Pki) -> TlsBao {
        let config = tempfile::tempdir().unwrap();
        let (http, https, mtls) = (free_port(), free_port(), free_port());
        let p = |n: &str| pki.path(n).display().to_string();
        let hcl = format!(
            r#"
listener "tcp" {{
  address = "127.0.0.1:{https}"
  tls_cert_file = "{cert}"
  tls_key_file = "{key}"
}}
listener "tcp" {{
  address = "127.0.0.1:{mtls}"
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
        let log = std::fs::File::create(config.path().join("bao.log")).unwrap();
        let child = Command::new(tools_bin().join("bao"))
            .args([
                "server",
                "-dev",
                &format!("-dev-root-token-id={root}"),
                &format!("-dev-listen-address=127.0.0.1:{http}"),
                "-dev-no-store-token",
                &format!("-config={}", file.display()),
            ])
            .env("HOME", config.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start OpenBao: run scripts/install-tools.sh");
        let bao = TlsBao {
            child,
            http: format!("http://127.0.0.1:{http}"),
            https: format!("https://127.0.0.1:{https}"),
            mtls: format!("https://127.0.0.1:{mtls}"),
            root,
            _config: config,
        };
        bao.wait(http);
        bao
    }

    fn wait(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                let _ = write!(s, "GET /v1/sys/health HTTP/1.0\r\n\r\n");
                let mut head = [0u8; 12];
                if s.read_exact(&mut head).is_ok() && head.ends_with(b"200") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(self._config.path().join("bao.log")).unwrap_or_default();
        panic!("OpenBao with TLS listeners did not come up; its log:\n{log}");
    }
}

impl Drop for TlsBao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
listen = "127.0.0.1:{listen}"

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
        listen = free_port(),
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

/// moto on TLS with the test's server certificate, killed when dropped.
struct TlsMoto {
    child: Child,
    endpoint: String,
}

impl TlsMoto {
    fn start(pki: &Pki) -> TlsMoto {
        let port = free_port();
        let child = Command::new(tools_bin().join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string(), "-s"])
            .arg("-c")
            .arg(pki.path("server.pem"))
            .arg("-k")
            .arg(pki.path("server.key"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start moto_server: run scripts/install-tools.sh");
        let moto = TlsMoto {
            child,
            endpoint: format!("https://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto on TLS did not come up on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }
}

impl Drop for TlsMoto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
