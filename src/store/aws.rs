//! AWS Secrets Manager destinations.
//!
//! Owns how keyrotd writes a secret's value: `PutSecretValue` with `ClientRequestToken` =
//! [`WriteRequest::idempotency_token`], so a retried write of one value makes no second version, and
//! without `VersionStages`, so the new version takes `AWSCURRENT`. A destination is either the whole
//! `SecretString` (no `field`) or one field of a JSON object (the other fields kept). Tags
//! `keyrotd:key_id`, `keyrotd:fingerprint`, `keyrotd:rotated_at` are set by
//! [`AwsStore::after_write`], off the hooks' path. keyrotd never creates secrets: a missing one is a
//! preflight failure.
//!
//! Limitation, JSON-field mode: Secrets Manager has no check-and-set, so the read-modify-write of a
//! JSON object can lose a concurrent change to *another* field made between our `GetSecretValue` and
//! `PutSecretValue` (last writer wins). Keys sharing one AWS secret should not be rotated by two
//! writers at once; the read-back of the store phase catches the case where our own field was lost.
//!
//! Responses larger than [`MAX_RESPONSE`] are refused: by their Content-Length before the SDK reads
//! them, and as they arrive when they have none (a chunked body is cut off at the cap); JSON objects
//! read from a secret are wiped once used.
//!
//! Credentials come from the standard AWS chain ([`AwsStore::new`]); tests and embedders that hold
//! an `SdkConfig` of their own use [`AwsStore::with_sdk_config`].

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::config::http::HttpResponse;
use aws_sdk_secretsmanager::config::interceptors::{
    BeforeDeserializationInterceptorContextMut, BeforeDeserializationInterceptorContextRef,
};
use aws_sdk_secretsmanager::config::timeout::TimeoutConfig;
use aws_sdk_secretsmanager::config::{ConfigBag, Intercept, Region, RuntimeComponents};
use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::types::Tag;
use aws_smithy_types::body::SdkBody;
use secrecy::ExposeSecret;
use serde_json::{Map, Value};

use tokio::time::Instant;

use super::{Prepared, PreparedInner, StoreError, StoreErrorKind, StoredValue, WriteRequest};
use crate::config::{AwsStoreConfig, DestinationTarget};
use crate::secret::{Secret, fingerprint_bytes};

pub const TAG_KEY_ID: &str = "keyrotd:key_id";
pub const TAG_FINGERPRINT: &str = "keyrotd:fingerprint";
pub const TAG_ROTATED_AT: &str = "keyrotd:rotated_at";
/// Several replicas: the writer's fencing number for the key.
pub const TAG_FENCE: &str = "keyrotd:fence";

pub struct AwsStore {
    name: String,
    client: Client,
    /// When each secret was last given a new value by keyrotd (the most recent few).
    writes:
        std::sync::Mutex<std::collections::HashMap<String, std::collections::VecDeque<Instant>>>,
}

/// AWS advises about one `PutSecretValue` per secret per 10 minutes at most: keyrotd allows a few
/// (a rotation and a re-rotation or two) before a re-rotation waits.
pub const WRITES_PER_WINDOW: usize = 3;
pub const WRITE_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// The largest response accepted from Secrets Manager. A secret value is at most 64 KiB; with its
/// JSON envelope an answer stays far below this.
pub const MAX_RESPONSE: u64 = 1 << 20;

/// Refuses a response whose declared length is over [`MAX_RESPONSE`] before its body is read, and
/// caps the body of one that declares none: the SDK reads bodies whole, so a chunked answer would
/// otherwise be read to its end, however long.
#[derive(Debug)]
struct ResponseCap;

impl Intercept for ResponseCap {
    fn name(&self) -> &'static str {
        "keyrotd-response-cap"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let response = context.response();
        let declared = response
            .headers()
            .get("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .or_else(|| response.body().content_length());
        match declared {
            Some(n) if n > MAX_RESPONSE => {
                Err(format!("response body larger than {MAX_RESPONSE} bytes ({n})").into())
            }
            _ => Ok(()),
        }
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let response = context.response_mut();
        let body = response.take_body();
        *response.body_mut() = body.map(|b| {
            SdkBody::from_body_1_x(http_body_util::Limited::new(b, MAX_RESPONSE as usize))
        });
        Ok(())
    }
}

impl AwsStore {
    /// A client from the standard AWS chain (env, profile, IMDS...), with the config's region and
    /// endpoint override. Loads the chain's settings; credentials are resolved lazily on first call.
    pub async fn new(name: &str, c: &AwsStoreConfig) -> Result<Self, StoreError> {
        let sdk = aws_config::defaults(BehaviorVersion::latest()).load().await;
        Self::with_sdk_config(name, c, &sdk)
    }

    /// Like [`AwsStore::new`] on a given `SdkConfig` (its credentials, region, HTTP client); the store
    /// config's region, endpoint and timeout take precedence.
    pub fn with_sdk_config(
        name: &str,
        c: &AwsStoreConfig,
        sdk: &SdkConfig,
    ) -> Result<Self, StoreError> {
        let mut b = aws_sdk_secretsmanager::config::Builder::from(sdk)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(c.timeout)
                    .operation_attempt_timeout(c.timeout)
                    .build(),
            )
            .interceptor(ResponseCap);
        if let Some(region) = &c.region {
            b = b.region(Region::new(region.clone()));
        }
        if let Some(url) = &c.endpoint_url {
            b = b.endpoint_url(url.as_str().trim_end_matches('/'));
        }
        if let Some(ca_file) = &c.ca_file {
            b = b.http_client(https_client_trusting(name, ca_file)?);
        }
        let conf = b.build();
        if conf.region().is_none() {
            return Err(StoreError {
                kind: StoreErrorKind::Permanent,
                store: name.into(),
                target: String::new(),
                message: "no AWS region: set `region` in the store or AWS_REGION".into(),
            });
        }
        Ok(Self {
            name: name.into(),
            client: Client::from_conf(conf),
            writes: Default::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, kind: StoreErrorKind, target: &str, message: impl Into<String>) -> StoreError {
        StoreError {
            kind,
            store: self.name.clone(),
            target: target.to_string(),
            message: message.into(),
        }
    }

    fn target<'t>(
        &self,
        t: &'t DestinationTarget,
    ) -> Result<(&'t str, Option<&'t str>), StoreError> {
        match t {
            DestinationTarget::Aws { secret_id, field } => {
                Ok((secret_id.as_str(), field.as_deref()))
            }
            other => Err(self.err(
                StoreErrorKind::Permanent,
                &other.to_string(),
                "not an aws destination (config error: the destination's kind does not match the store)",
            )),
        }
    }

    /// An SDK failure as a [`StoreError`] of the right kind. Built from the error code, AWS's message
    /// and transport errors; request parameters (the value) are not part of any of them.
    fn classify<E>(
        &self,
        label: &str,
        secret_id: &str,
        what: &str,
        e: &SdkError<E, HttpResponse>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let transport = |kind| {
            self.err(
                kind,
                label,
                format!("{what} failed: {}", DisplayErrorContext(e)),
            )
        };
        match e {
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => {
                return transport(StoreErrorKind::Transient);
            }
            SdkError::ConstructionFailure(_) => return transport(StoreErrorKind::Permanent),
            _ => {}
        }
        let code = e.code().unwrap_or("unknown error");
        let message = e.message().unwrap_or("");
        let status = e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
        let (kind, hint) = match code {
            "ResourceNotFoundException" => (
                StoreErrorKind::NotFound,
                format!(
                    "secret {secret_id} does not exist; keyrotd does not create secrets — create it first"
                ),
            ),
            "AccessDeniedException"
            | "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "InvalidSignatureException"
            | "IncompleteSignature"
            | "MissingAuthenticationToken"
            | "ExpiredTokenException"
            | "ExpiredToken" => (
                StoreErrorKind::Auth,
                "AWS credentials invalid or lacking permission".to_string(),
            ),
            "ThrottlingException"
            | "Throttling"
            | "TooManyRequestsException"
            | "RequestLimitExceeded"
            | "InternalServiceError"
            | "InternalFailure"
            | "ServiceUnavailable" => (StoreErrorKind::Transient, String::new()),
            "ResourceExistsException" => (
                StoreErrorKind::Permanent,
                "a version with this request token exists with different content (the secret changed after keyrotd wrote it)".to_string(),
            ),
            _ if status >= 500 || status == 429 => (StoreErrorKind::Transient, String::new()),
            // Refused without an AWS error code (a proxy or gateway in front): still a credential
            // or permission problem, which retrying will not fix.
            _ if status == 401 || status == 403 => (
                StoreErrorKind::Auth,
                format!("HTTP {status}: credentials or permission refused"),
            ),
            _ => (StoreErrorKind::Permanent, String::new()),
        };
        let mut text = format!("{what} failed: {code}");
        if !message.is_empty() {
            text.push_str(&format!(": {message}"));
        }
        if !hint.is_empty() {
            text.push_str(&format!(" ({hint})"));
        }
        self.err(kind, label, text)
    }

    /// The secret exists and can be described. Changes nothing.
    pub async fn preflight(&self, t: &DestinationTarget) -> Result<(), StoreError> {
        let label = t.to_string();
        let (secret_id, _) = self.target(t)?;
        let out = self
            .client
            .describe_secret()
            .secret_id(secret_id)
            .send()
            .await
            .map_err(|e| self.classify(&label, secret_id, "DescribeSecret", &e))?;
        if out.deleted_date().is_some() {
            return Err(self.err(
                StoreErrorKind::Permanent,
                &label,
                format!("secret {secret_id} is scheduled for deletion; restore it first"),
            ));
        }
        Ok(())
    }

    /// The current value (`AWSCURRENT`) and its version id; `None` when the secret has no current
    /// string value.
    async fn get_current(
        &self,
        label: &str,
        secret_id: &str,
    ) -> Result<Option<(Secret, Option<String>)>, StoreError> {
        let out = self
            .client
            .get_secret_value()
            .secret_id(secret_id)
            .version_stage("AWSCURRENT")
            .send()
            .await;
        match out {
            // The string is moved into a Secret, not copied: no plain copy is left to be freed.
            Ok(mut o) => Ok(o
                .secret_string
                .take()
                .map(|s| (Secret::from(s), o.version_id().map(str::to_string)))),
            // A secret created without a value has no AWSCURRENT version yet.
            Err(e)
                if e.code() == Some("ResourceNotFoundException")
                    && self.exists(label, secret_id).await? =>
            {
                Ok(None)
            }
            Err(e) => Err(self.classify(label, secret_id, "GetSecretValue", &e)),
        }
    }

    async fn exists(&self, label: &str, secret_id: &str) -> Result<bool, StoreError> {
        match self
            .client
            .describe_secret()
            .secret_id(secret_id)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(false),
            Err(e) => Err(self.classify(label, secret_id, "DescribeSecret", &e)),
        }
    }

    /// Reads ahead, in preflight, the JSON object a field will be set in (nothing for a whole-value
    /// destination): the write on the outage path is then one `PutSecretValue`.
    pub async fn prepare(&self, t: &DestinationTarget) -> Result<Prepared, StoreError> {
        let label = t.to_string();
        let (secret_id, field) = self.target(t)?;
        if field.is_none() {
            return Ok(Prepared::none());
        }
        Ok(match self.get_current(&label, secret_id).await? {
            Some((whole, version_id)) => Prepared {
                inner: Some(PreparedInner::Aws { whole, version_id }),
            },
            None => Prepared::none(),
        })
    }

    /// `PutSecretValue` of the value (or of the JSON object with the field set: the object read
    /// ahead when there is one, else read now). Returns the new VersionId. The same request twice
    /// yields the same version (request token); in JSON mode, a field that already holds the value
    /// is not written again.
    pub async fn write(
        &self,
        t: &DestinationTarget,
        r: &WriteRequest<'_>,
        prepared: &Prepared,
    ) -> Result<Option<String>, StoreError> {
        let label = t.to_string();
        let (secret_id, field) = self.target(t)?;
        let new_string: Secret = match field {
            None => r.secret.clone(),
            Some(field) => {
                let current = match &prepared.inner {
                    Some(PreparedInner::Aws { whole, version_id }) => {
                        Some((whole.clone(), version_id.clone()))
                    }
                    _ => self.get_current(&label, secret_id).await?,
                };
                match self.merged(&label, secret_id, field, current.as_ref(), r.secret)? {
                    Merged::Already => return Ok(current.and_then(|(_, v)| v)),
                    Merged::Write(text) => text,
                }
            }
        };
        self.put(&label, secret_id, &new_string, r.idempotency_token())
            .await
    }

    /// The JSON object `current` (or a new one) with `field` set to `value`.
    fn merged(
        &self,
        label: &str,
        secret_id: &str,
        field: &str,
        current: Option<&(Secret, Option<String>)>,
        value: &Secret,
    ) -> Result<Merged, StoreError> {
        let mut obj = match current {
            None => Map::new(),
            Some((s, _)) => parse_object(s).map_err(|why| {
                self.err(
                    StoreErrorKind::Permanent,
                    label,
                    format!(
                        "secret {secret_id} holds {why}, so field {field} cannot be set; \
                         fix the secret or drop `field` to store the key as the whole value"
                    ),
                )
            })?,
        };
        if obj.get(field).and_then(Value::as_str) == Some(value.expose_secret()) {
            wipe_object(obj);
            return Ok(Merged::Already);
        }
        obj.insert(
            field.to_string(),
            Value::String(value.expose_secret().to_string()),
        );
        let text = serde_json::to_string(&obj);
        wipe_object(obj);
        let text = text.map_err(|e| {
            self.err(
                StoreErrorKind::Permanent,
                label,
                format!("cannot encode JSON: {e}"),
            )
        })?;
        Ok(Merged::Write(Secret::from(text)))
    }

    /// How long a re-rotation should wait before giving `t` yet another value, so that keyrotd
    /// writes a secret at most [`WRITES_PER_WINDOW`] times per [`WRITE_WINDOW`]. Zero most of the time.
    pub fn wait_before_write(&self, t: &DestinationTarget) -> std::time::Duration {
        let Ok((secret_id, _)) = self.target(t) else {
            return std::time::Duration::ZERO;
        };
        let writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        match writes.get(secret_id) {
            Some(w) if w.len() >= WRITES_PER_WINDOW => {
                let oldest = w[w.len() - WRITES_PER_WINDOW];
                (oldest + WRITE_WINDOW).saturating_duration_since(Instant::now())
            }
            _ => std::time::Duration::ZERO,
        }
    }

    fn record_write(&self, secret_id: &str) {
        let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let w = writes.entry(secret_id.to_string()).or_default();
        w.push_back(Instant::now());
        while w.len() > WRITES_PER_WINDOW {
            w.pop_front();
        }
    }

    async fn put(
        &self,
        label: &str,
        secret_id: &str,
        value: &Secret,
        token: uuid::Uuid,
    ) -> Result<Option<String>, StoreError> {
        self.record_write(secret_id);
        let out = self
            .client
            .put_secret_value()
            .secret_id(secret_id)
            .secret_string(value.expose_secret())
            .client_request_token(token.to_string())
            .send()
            .await
            .map_err(|e| self.classify(label, secret_id, "PutSecretValue", &e))?;
        Ok(out.version_id().map(str::to_string))
    }

    /// After the hooks: when a JSON field was set in an object read ahead, checks that no one wrote
    /// the secret between that read and our write (the version our write replaced is the one read
    /// ahead); if someone did, sets the field again in their object, so no field of theirs is lost.
    /// Then tags the secret with the key id, fingerprint, rotation time and fence (replacing
    /// keyrotd's previous tags, leaving others alone).
    pub async fn after_write(
        &self,
        t: &DestinationTarget,
        r: &WriteRequest<'_>,
        prepared: &Prepared,
    ) -> Result<(), StoreError> {
        let label = t.to_string();
        let (secret_id, field) = self.target(t)?;
        if let (Some(field), Some(PreparedInner::Aws { version_id, .. })) = (field, &prepared.inner)
        {
            self.keep_concurrent_fields(&label, secret_id, field, version_id.as_deref(), r)
                .await?;
        }
        self.tag(&label, secret_id, r).await
    }

    async fn keep_concurrent_fields(
        &self,
        label: &str,
        secret_id: &str,
        field: &str,
        read_ahead: Option<&str>,
        r: &WriteRequest<'_>,
    ) -> Result<(), StoreError> {
        let previous = self
            .client
            .get_secret_value()
            .secret_id(secret_id)
            .version_stage("AWSPREVIOUS")
            .send()
            .await;
        let Ok(mut previous) = previous else {
            return Ok(()); // no previous version: nothing came in between
        };
        if previous.version_id() == read_ahead {
            return Ok(());
        }
        tracing::warn!(
            secret_id,
            "The secret was written between keyrotd's read-ahead and its write: setting the field again in that version."
        );
        let theirs = previous
            .secret_string
            .take()
            .map(|s| (Secret::from(s), previous.version_id().map(str::to_string)));
        if let Merged::Write(text) =
            self.merged(label, secret_id, field, theirs.as_ref(), r.secret)?
        {
            let token = uuid::Uuid::new_v5(&r.idempotency_token(), b"merge");
            self.put(label, secret_id, &text, token).await?;
        }
        Ok(())
    }

    async fn tag(
        &self,
        label: &str,
        secret_id: &str,
        r: &WriteRequest<'_>,
    ) -> Result<(), StoreError> {
        let tag = |k: &str, v: String| Tag::builder().key(k).value(v).build();
        let mut tags = vec![
            tag(TAG_KEY_ID, r.key_id.to_string()),
            tag(TAG_FINGERPRINT, r.fingerprint.to_string()),
            tag(TAG_ROTATED_AT, r.rotated_at.to_rfc3339()),
        ];
        if let Some(fence) = r.fence {
            tags.push(tag(TAG_FENCE, fence.to_string()));
        }
        self.client
            .tag_resource()
            .secret_id(secret_id)
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| self.classify(label, secret_id, "TagResource", &e))?;
        Ok(())
    }

    /// The current value (or the field of it), its fingerprint and VersionId; the key id from the
    /// `keyrotd:key_id` tag when `keyrotd:fingerprint` matches this value. `Ok(None)` when there is
    /// no current value or no such field.
    /// The value (AWSCURRENT) and its version, without the tags: one `GetSecretValue`. The rotation's
    /// read-back uses this, so confirming a write costs one round trip.
    pub async fn read_value(
        &self,
        t: &DestinationTarget,
    ) -> Result<Option<(Secret, Option<String>)>, StoreError> {
        let label = t.to_string();
        let (secret_id, field) = self.target(t)?;
        let Some((whole, version)) = self.get_current(&label, secret_id).await? else {
            return Ok(None);
        };
        let secret = match field {
            None => whole,
            Some(field) => {
                let mut obj = parse_object(&whole).map_err(|why| {
                    self.err(
                        StoreErrorKind::Permanent,
                        &label,
                        format!("secret {secret_id} holds {why}, so field {field} cannot be read"),
                    )
                })?;
                let value = obj.remove(field);
                wipe_object(obj);
                match value {
                    None => return Ok(None),
                    // Moved into the Secret; the other fields were wiped above.
                    Some(Value::String(s)) => Secret::from(s),
                    Some(mut other) => {
                        crate::secret::wipe_json(&mut other);
                        return Err(self.err(
                            StoreErrorKind::Permanent,
                            &label,
                            format!("field {field} of secret {secret_id} is not a string"),
                        ));
                    }
                }
            }
        };
        Ok(Some((secret, version)))
    }

    pub async fn read(&self, t: &DestinationTarget) -> Result<Option<StoredValue>, StoreError> {
        let label = t.to_string();
        let (secret_id, _) = self.target(t)?;
        let Some((secret, version)) = self.read_value(t).await? else {
            return Ok(None);
        };
        let fingerprint = fingerprint_bytes(secret.expose_secret().as_bytes());
        let described = self
            .client
            .describe_secret()
            .secret_id(secret_id)
            .send()
            .await
            .map_err(|e| self.classify(&label, secret_id, "DescribeSecret", &e))?;
        let tag = |k: &str| {
            described
                .tags()
                .iter()
                .find(|t| t.key() == Some(k))
                .and_then(|t| t.value())
        };
        let key_id = match (tag(TAG_KEY_ID), tag(TAG_FINGERPRINT)) {
            (Some(id), Some(fp)) if fp == fingerprint => Some(id.to_string()),
            _ => None,
        };
        Ok(Some(StoredValue {
            secret,
            fingerprint,
            key_id,
            version,
        }))
    }
}

/// The SDK's HTTPS client (rustls, the system's roots) also trusting the CA certificates in
/// `ca_file`. The file was checked at config load; it is read again here, at each build.
fn https_client_trusting(
    store: &str,
    ca_file: &std::path::Path,
) -> Result<aws_sdk_secretsmanager::config::SharedHttpClient, StoreError> {
    use aws_smithy_http_client::tls;
    let fail = |message: String| StoreError {
        kind: StoreErrorKind::Permanent,
        store: store.into(),
        target: String::new(),
        message,
    };
    let pem = std::fs::read(ca_file).map_err(|e| {
        fail(format!(
            "cannot read ca_file {}: {}",
            ca_file.display(),
            e.kind()
        ))
    })?;
    let context = tls::TlsContext::builder()
        .with_trust_store(tls::TrustStore::default().with_pem_certificate(pem))
        .build()
        .map_err(|_| {
            fail(format!(
                "ca_file {} cannot be used as a trust store",
                ca_file.display()
            ))
        })?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(context)
        .build_https())
}

/// The object to write, or nothing to write (the field already holds the value).
enum Merged {
    Already,
    Write(Secret),
}

/// Wipes the values of a secret's JSON object (other keys' secrets may be among them) as it is freed.
fn wipe_object(obj: Map<String, Value>) {
    crate::secret::wipe_json(&mut Value::Object(obj));
}

/// The secret's JSON object, or a description of what it holds instead (never the content).
fn parse_object(s: &Secret) -> Result<Map<String, Value>, &'static str> {
    match serde_json::from_str::<Value>(s.expose_secret()) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("JSON that is not an object"),
        Err(_) => Err("a value that is not JSON"),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A Secrets Manager stand-in that answers every request with a `GetSecretValue` body whose
    /// value is `size` bytes long.
    async fn server(size: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = format!(
            r#"{{"ARN":"arn:aws:secretsmanager:us-east-1:1:secret:s","Name":"s","SecretString":"{}","VersionId":"v1","VersionStages":["AWSCURRENT"]}}"#,
            "k".repeat(size)
        );
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    let _ = sock.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(body.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    async fn store(endpoint: &str) -> AwsStore {
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .credentials_provider(aws_sdk_secretsmanager::config::Credentials::new(
                "AKIDTEST", "secret", None, None, "test",
            ))
            .region(Region::new("us-east-1"))
            .load()
            .await;
        let c = AwsStoreConfig {
            region: None,
            endpoint_url: Some(endpoint.parse().unwrap()),
            timeout: std::time::Duration::from_secs(5),
            ca_file: None,
        };
        AwsStore::with_sdk_config("aws", &c, &sdk).unwrap()
    }

    fn target() -> DestinationTarget {
        DestinationTarget::Aws {
            secret_id: "s".into(),
            field: None,
        }
    }

    #[tokio::test]
    async fn a_response_larger_than_the_cap_is_refused() {
        let s = store(&server(2 * MAX_RESPONSE as usize).await).await;
        let e = s.read_value(&target()).await.unwrap_err();
        assert!(e.message.contains("larger than"), "{e}");
        assert!(!e.message.contains("kkkkkkkk"), "{e}");
    }

    #[tokio::test]
    async fn a_normal_response_is_read() {
        let s = store(&server(40).await).await;
        let (secret, version) = s.read_value(&target()).await.unwrap().unwrap();
        assert_eq!(secret.expose_secret(), "k".repeat(40));
        assert_eq!(version.as_deref(), Some("v1"));
    }
}

#[cfg(test)]
mod write_rate {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_secret_takes_a_few_new_values_then_asks_re_rotations_to_wait() {
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .credentials_provider(aws_sdk_secretsmanager::config::Credentials::new(
                "AKIDTEST", "secret", None, None, "test",
            ))
            .region(Region::new("us-east-1"))
            .load()
            .await;
        let c = AwsStoreConfig {
            region: None,
            endpoint_url: Some("http://127.0.0.1:1".parse().unwrap()),
            timeout: std::time::Duration::from_secs(1),
            ca_file: None,
        };
        let store = AwsStore::with_sdk_config("aws", &c, &sdk).unwrap();
        let target = |id: &str| DestinationTarget::Aws {
            secret_id: id.into(),
            field: None,
        };
        for _ in 0..WRITES_PER_WINDOW {
            assert!(store.wait_before_write(&target("a")).is_zero());
            store.record_write("a");
        }
        let wait = store.wait_before_write(&target("a"));
        assert!(
            wait > WRITE_WINDOW - std::time::Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(
            store.wait_before_write(&target("b")).is_zero(),
            "per secret"
        );
        tokio::time::advance(WRITE_WINDOW).await;
        assert!(store.wait_before_write(&target("a")).is_zero());
    }
}
