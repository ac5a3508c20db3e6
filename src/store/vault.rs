//! HashiCorp Vault / OpenBao KV v2 destinations.
//!
//! Owns the KV v2 protocol as keyrotd uses it: a read-modify-write of one field with check-and-set
//! (the other fields at the path are kept; a lost race is retried a few times, then reported as
//! [`StoreErrorKind::Conflict`]), custom metadata `keyrotd_key_id`, `keyrotd_rotation_id`,
//! `keyrotd_rotated_at`, `keyrotd_fingerprint` written after the data, token and AppRole auth (login
//! on first use, one re-login on 403), namespaces, and the preflight (`lookup-self` and
//! `sys/capabilities-self`).
//!
//! It speaks the HTTP API directly over `reqwest` rather than through `vaultrs`: the handful of
//! endpoints is small, `vaultrs` has no `capabilities-self`, keeps the token as a plain `String`, and
//! its parse errors carry the response body (a KV read's body is the secret) in their `Debug`. Here the
//! token stays a [`Secret`] until the header is built, and a [`StoreError`] is built only from the
//! status, Vault's `errors` strings and transport errors — never from a body or the value.
//!
//! Custom metadata belongs to the path, not the field: when two keys share a path, the metadata
//! describes the last one written. [`VaultStore::read`] therefore reports `keyrotd_key_id` only when
//! `keyrotd_fingerprint` matches the field's value.

use std::time::Duration;

use reqwest::Method;
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;

use super::{StoreError, StoreErrorKind, StoredValue, WriteRequest};
use crate::config::{DestinationTarget, VaultAuth, VaultStoreConfig};
use crate::secret::{Secret, fingerprint_bytes};

/// Read-modify-write rounds before a check-and-set race is reported as a conflict.
const CAS_ATTEMPTS: u32 = 5;
/// Longest Vault error text kept in a [`StoreError`] message.
const MAX_ERROR_TEXT: usize = 300;

pub struct VaultStore {
    name: String,
    /// `address` without a trailing slash; the API is under `<base>/v1/`.
    base: String,
    mount: String,
    namespace: Option<String>,
    auth: VaultAuth,
    http: reqwest::Client,
    /// The token in use with a generation number. For token auth it is the configured token; for
    /// AppRole it is `None` until the first login, and the generation lets concurrent callers that
    /// all saw a 403 re-login only once.
    token: Mutex<(u64, Option<Secret>)>,
}

/// An HTTP answer from Vault: status and JSON body (`Null` when empty or not JSON).
struct Reply {
    status: u16,
    body: Value,
}

impl Reply {
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Vault's `errors` strings, joined and shortened. They describe the request's fault, not its
    /// data; the caller still redacts the value (see [`VaultStore::redact`]).
    fn errors(&self) -> String {
        let text = self
            .body
            .get("errors")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        if text.chars().count() > MAX_ERROR_TEXT {
            let cut: String = text.chars().take(MAX_ERROR_TEXT).collect();
            format!("{cut}...")
        } else {
            text
        }
    }

    fn is_cas_mismatch(&self) -> bool {
        self.status == 400 && self.errors().contains("check-and-set")
    }
}

/// The state of a KV v2 path as the read half of a read-modify-write sees it.
struct Current {
    /// Current version; 0 when the path has never been written (check-and-set 0 = create only).
    version: u64,
    /// The fields of the current version; empty when missing or deleted.
    data: Map<String, Value>,
    custom_metadata: Map<String, Value>,
}

impl VaultStore {
    pub fn new(name: &str, c: &VaultStoreConfig) -> Result<Self, StoreError> {
        let http = reqwest::Client::builder()
            .timeout(c.timeout)
            .connect_timeout(c.timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError {
                kind: StoreErrorKind::Permanent,
                store: name.into(),
                target: c.address.to_string(),
                message: format!("cannot build HTTP client: {}", chain(&e)),
            })?;
        let token = match &c.auth {
            VaultAuth::Token(t) => Some(t.clone()),
            VaultAuth::AppRole { .. } => None,
        };
        Ok(Self {
            name: name.into(),
            base: c.address.as_str().trim_end_matches('/').to_string(),
            mount: c.mount.trim_matches('/').to_string(),
            namespace: c.namespace.clone().filter(|n| !n.is_empty()),
            auth: c.auth.clone(),
            http,
            token: Mutex::new((0, token)),
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

    fn target<'t>(&self, t: &'t DestinationTarget) -> Result<(&'t str, &'t str), StoreError> {
        match t {
            DestinationTarget::Vault { path, field } => {
                let path = path.trim_matches('/');
                if path.is_empty() || path.split('/').any(|s| s.is_empty() || s == "..") {
                    return Err(self.err(
                        StoreErrorKind::Permanent,
                        &t.to_string(),
                        "invalid KV path (empty segment or '..')",
                    ));
                }
                Ok((path, field.as_str()))
            }
            other => Err(self.err(
                StoreErrorKind::Permanent,
                &other.to_string(),
                "not a vault destination (config error: the destination's kind does not match the store)",
            )),
        }
    }

    fn data_path(&self, path: &str) -> String {
        format!("{}/data/{path}", self.mount)
    }

    fn metadata_path(&self, path: &str) -> String {
        format!("{}/metadata/{path}", self.mount)
    }

    // ---- transport and auth -------------------------------------------------------------------

    /// One HTTP request. Any HTTP status is `Ok`; only transport failures are errors (Transient).
    async fn send(
        &self,
        label: &str,
        method: Method,
        api_path: &str,
        body: Option<&Value>,
        token: Option<&Secret>,
    ) -> Result<Reply, StoreError> {
        let url = format!("{}/v1/{api_path}", self.base);
        let mut req = self
            .http
            .request(method, &url)
            .header("X-Vault-Request", "true");
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(token) = token {
            req = req.header("X-Vault-Token", token.expose_secret());
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| {
            self.err(
                StoreErrorKind::Transient,
                label,
                format!("cannot reach Vault at {}: {}", self.base, chain(&e)),
            )
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| {
            self.err(
                StoreErrorKind::Transient,
                label,
                format!("Vault answer interrupted: {}", chain(&e)),
            )
        })?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply { status, body })
    }

    /// The current token, logging in with AppRole first if there is none yet.
    async fn current_token(&self, label: &str) -> Result<(u64, Secret), StoreError> {
        let mut guard = self.token.lock().await;
        if let Some(t) = &guard.1 {
            return Ok((guard.0, t.clone()));
        }
        let t = self.login(label).await?;
        guard.0 += 1;
        guard.1 = Some(t.clone());
        Ok((guard.0, t))
    }

    /// After a 403 with an AppRole token: log in again, unless someone else already did since `seen`.
    async fn relogin(&self, label: &str, seen: u64) -> Result<(u64, Secret), StoreError> {
        let mut guard = self.token.lock().await;
        if guard.0 != seen
            && let Some(t) = &guard.1
        {
            return Ok((guard.0, t.clone()));
        }
        let t = self.login(label).await?;
        guard.0 += 1;
        guard.1 = Some(t.clone());
        Ok((guard.0, t))
    }

    async fn login(&self, label: &str) -> Result<Secret, StoreError> {
        let VaultAuth::AppRole {
            role_id,
            secret_id,
            mount,
        } = &self.auth
        else {
            return Err(self.err(StoreErrorKind::Auth, label, "no Vault token configured"));
        };
        let body = json!({
            "role_id": role_id.expose_secret(),
            "secret_id": secret_id.expose_secret(),
        });
        let mount = mount.trim_matches('/');
        let reply = self
            .send(
                label,
                Method::POST,
                &format!("auth/{mount}/login"),
                Some(&body),
                None,
            )
            .await?;
        if !reply.ok() {
            let mut e = self.classify(label, &format!("AppRole login at auth/{mount}"), &reply);
            if matches!(e.kind, StoreErrorKind::Permanent | StoreErrorKind::NotFound) {
                // A rejected role_id/secret_id answers 400; retrying will not fix credentials.
                e.kind = StoreErrorKind::Auth;
            }
            return Err(e);
        }
        reply
            .body
            .pointer("/auth/client_token")
            .and_then(Value::as_str)
            .map(|t| Secret::from(t.to_string()))
            .ok_or_else(|| {
                self.err(
                    StoreErrorKind::Auth,
                    label,
                    format!("AppRole login at auth/{mount} returned no client token"),
                )
            })
    }

    /// An authenticated request; with AppRole, a 403 triggers one re-login and one resend (the
    /// login token may have expired).
    async fn call(
        &self,
        label: &str,
        method: Method,
        api_path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, StoreError> {
        let (generation, token) = self.current_token(label).await?;
        let reply = self
            .send(label, method.clone(), api_path, body, Some(&token))
            .await?;
        if reply.status == 403 && matches!(self.auth, VaultAuth::AppRole { .. }) {
            let (_, token) = self.relogin(label, generation).await?;
            return self.send(label, method, api_path, body, Some(&token)).await;
        }
        Ok(reply)
    }

    /// A non-2xx answer as a [`StoreError`] of the right kind.
    fn classify(&self, label: &str, what: &str, reply: &Reply) -> StoreError {
        let kind = match reply.status {
            401 | 403 => StoreErrorKind::Auth,
            404 => StoreErrorKind::NotFound,
            400 if reply.is_cas_mismatch() => StoreErrorKind::Conflict,
            // 412: a performance standby has not caught up yet; 429: rate limited; 5xx: sealed,
            // standby, overloaded or broken — all may clear on their own.
            412 | 429 | 500..=599 => StoreErrorKind::Transient,
            _ => StoreErrorKind::Permanent,
        };
        let errors = reply.errors();
        let detail = if errors.is_empty() {
            String::new()
        } else {
            format!(": {errors}")
        };
        let hint = match kind {
            StoreErrorKind::Auth => " (token invalid, expired, or lacking permission)",
            _ => "",
        };
        self.err(
            kind,
            label,
            format!("{what} failed with HTTP {}{detail}{hint}", reply.status),
        )
    }

    // ---- KV v2 --------------------------------------------------------------------------------

    /// Reads the path for a read-modify-write (or a read). A path that does not exist is version 0;
    /// a path whose latest version is deleted keeps its version number (Vault answers 404 with the
    /// metadata) so check-and-set still matches.
    async fn read_current(&self, label: &str, path: &str) -> Result<Current, StoreError> {
        let reply = self
            .call(label, Method::GET, &self.data_path(path), None)
            .await?;
        if !(reply.ok() || reply.status == 404) {
            return Err(self.classify(label, &format!("read {}", self.data_path(path)), &reply));
        }
        let meta = reply.body.pointer("/data/metadata");
        let version = meta
            .and_then(|m| m.get("version"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let custom_metadata = meta
            .and_then(|m| m.get("custom_metadata"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let data = if reply.ok() {
            reply
                .body
                .pointer("/data/data")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default()
        } else {
            Map::new()
        };
        Ok(Current {
            version,
            data,
            custom_metadata,
        })
    }

    /// The token is valid, and may read the path and create/update both its data and its metadata.
    /// Changes nothing.
    pub async fn preflight(&self, t: &DestinationTarget) -> Result<(), StoreError> {
        let label = t.to_string();
        let (path, _) = self.target(t)?;
        let reply = self
            .call(&label, Method::GET, "auth/token/lookup-self", None)
            .await?;
        if !reply.ok() {
            return Err(self.classify(&label, "token lookup-self", &reply));
        }
        let data_path = self.data_path(path);
        let meta_path = self.metadata_path(path);
        let body = json!({ "paths": [data_path, meta_path] });
        let reply = self
            .call(&label, Method::POST, "sys/capabilities-self", Some(&body))
            .await?;
        if !reply.ok() {
            return Err(self.classify(&label, "sys/capabilities-self", &reply));
        }
        let caps = |p: &str| -> Vec<String> {
            reply
                .body
                .pointer("/data")
                .and_then(|d| d.get(p))
                .or_else(|| reply.body.get(p))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let data_caps = caps(&data_path);
        let meta_caps = caps(&meta_path);
        let has = |caps: &[String], c: &str| caps.iter().any(|x| x == c || x == "root");
        let mut missing = Vec::new();
        if !has(&data_caps, "read") {
            missing.push(format!("read capability on {data_path}"));
        }
        if !has(&data_caps, "create") && !has(&data_caps, "update") {
            missing.push(format!("create/update capability on {data_path}"));
        }
        if !has(&meta_caps, "create") && !has(&meta_caps, "update") {
            missing.push(format!(
                "create/update capability on {meta_path} (for keyrotd's custom metadata)"
            ));
        }
        if missing.is_empty() {
            return Ok(());
        }
        let show = |c: &[String]| {
            if c.is_empty() {
                "none".to_string()
            } else {
                c.join(", ")
            }
        };
        Err(self.err(
            StoreErrorKind::Auth,
            &label,
            format!(
                "token lacks {} (has: {} on {data_path}; {} on {meta_path})",
                missing.join(" and "),
                show(&data_caps),
                show(&meta_caps),
            ),
        ))
    }

    /// Sets the field with check-and-set, keeping the other fields, then the custom metadata.
    /// Returns the KV version holding the value. When the field already holds the value (a retry
    /// after a write whose answer was lost) no new version is made.
    pub async fn write(
        &self,
        t: &DestinationTarget,
        r: &WriteRequest<'_>,
    ) -> Result<Option<String>, StoreError> {
        let label = t.to_string();
        let (path, field) = self.target(t)?;
        let data_path = self.data_path(path);
        let value = r.secret.expose_secret();
        for attempt in 0..CAS_ATTEMPTS {
            let mut cur = self.read_current(&label, path).await?;
            let version = if cur.data.get(field).and_then(Value::as_str) == Some(value) {
                cur.version
            } else {
                cur.data
                    .insert(field.to_string(), Value::String(value.to_string()));
                let body = json!({ "options": { "cas": cur.version }, "data": cur.data });
                let reply = self
                    .call(&label, Method::POST, &data_path, Some(&body))
                    .await?;
                drop(body);
                if reply.is_cas_mismatch() {
                    // Someone wrote the path between our read and write: read again. A short
                    // random pause keeps two keyrotd writers from colliding in lockstep.
                    let pause = 10 + rand::random::<u64>() % (25 * u64::from(attempt + 1));
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    continue;
                }
                if !reply.ok() {
                    return Err(self.classify(&label, &format!("write {data_path}"), &reply));
                }
                reply
                    .body
                    .pointer("/data/version")
                    .and_then(Value::as_u64)
                    .unwrap_or(cur.version + 1)
            };
            self.write_metadata(&label, path, cur.custom_metadata, r)
                .await?;
            return Ok(Some(version.to_string()));
        }
        Err(self.err(
            StoreErrorKind::Conflict,
            &label,
            format!(
                "check-and-set on {data_path} lost {CAS_ATTEMPTS} times in a row to concurrent writers"
            ),
        ))
    }

    /// Merges keyrotd's custom metadata into the path's existing custom metadata. A metadata POST
    /// changes only the parameters it names, so max_versions, cas_required etc. are left alone.
    async fn write_metadata(
        &self,
        label: &str,
        path: &str,
        mut custom: Map<String, Value>,
        r: &WriteRequest<'_>,
    ) -> Result<(), StoreError> {
        for (k, v) in [
            ("keyrotd_key_id", r.key_id.to_string()),
            ("keyrotd_rotation_id", r.rotation_id.to_string()),
            ("keyrotd_rotated_at", r.rotated_at.to_rfc3339()),
            ("keyrotd_fingerprint", r.fingerprint.to_string()),
        ] {
            custom.insert(k.to_string(), Value::String(v));
        }
        let meta_path = self.metadata_path(path);
        let body = json!({ "custom_metadata": custom });
        let reply = self
            .call(label, Method::POST, &meta_path, Some(&body))
            .await?;
        if !reply.ok() {
            return Err(self.classify(
                label,
                &format!("write custom metadata {meta_path}"),
                &reply,
            ));
        }
        Ok(())
    }

    /// The field's value; `Ok(None)` when the path, its latest version or the field is missing.
    pub async fn read(&self, t: &DestinationTarget) -> Result<Option<StoredValue>, StoreError> {
        let label = t.to_string();
        let (path, field) = self.target(t)?;
        let cur = self.read_current(&label, path).await?;
        let Some(v) = cur.data.get(field) else {
            return Ok(None);
        };
        let Some(text) = v.as_str() else {
            return Err(self.err(
                StoreErrorKind::Permanent,
                &label,
                format!("field {field} is not a string"),
            ));
        };
        let fingerprint = fingerprint_bytes(text.as_bytes());
        let meta = |k: &str| cur.custom_metadata.get(k).and_then(Value::as_str);
        let key_id = match (meta("keyrotd_key_id"), meta("keyrotd_fingerprint")) {
            (Some(id), Some(fp)) if fp == fingerprint => Some(id.to_string()),
            _ => None,
        };
        Ok(Some(StoredValue {
            secret: Secret::from(text.to_string()),
            fingerprint,
            key_id,
            version: Some(cur.version.to_string()),
        }))
    }

    // ---- documents for the coordination of replicas (src/coordination/) -----------------------

    /// A whole KV v2 document and its version; `None` when the path has never been written. A path
    /// whose latest version is deleted answers a `null` value with its version, so that the next
    /// check-and-set names it.
    pub async fn doc_read(
        &self,
        path: &str,
    ) -> Result<Option<crate::coordination::kv::Doc>, crate::coordination::kv::KvError> {
        let label = "coordination";
        let current = self
            .read_current(label, path)
            .await
            .map_err(|e| crate::coordination::kv::KvError::Unavailable(e.to_string()))?;
        if current.version == 0 {
            return Ok(None);
        }
        let value = if current.data.is_empty() {
            Value::Null
        } else {
            Value::Object(current.data)
        };
        Ok(Some(crate::coordination::kv::Doc {
            value,
            version: current.version,
        }))
    }

    /// Writes a whole document with check-and-set `cas` (0: must not exist). Returns the new version.
    pub async fn doc_write(
        &self,
        path: &str,
        value: &Value,
        cas: u64,
    ) -> Result<u64, crate::coordination::kv::KvError> {
        use crate::coordination::kv::KvError;
        let label = "coordination";
        let body = json!({ "options": { "cas": cas }, "data": value });
        let reply = self
            .call(label, Method::POST, &self.data_path(path), Some(&body))
            .await
            .map_err(|e| KvError::Unavailable(e.to_string()))?;
        if reply.ok() {
            return Ok(reply
                .body
                .pointer("/data/version")
                .and_then(Value::as_u64)
                .unwrap_or(cas + 1));
        }
        let e = self.classify(label, &format!("write {}", self.data_path(path)), &reply);
        match e.kind {
            StoreErrorKind::Conflict => Err(KvError::Conflict),
            _ => Err(KvError::Unavailable(e.to_string())),
        }
    }

    /// The names directly under `dir` (KV v2 LIST).
    pub async fn doc_list(
        &self,
        dir: &str,
    ) -> Result<Vec<String>, crate::coordination::kv::KvError> {
        use crate::coordination::kv::KvError;
        let label = "coordination";
        let method = Method::from_bytes(b"LIST").unwrap_or(Method::GET);
        let reply = self
            .call(label, method, &self.metadata_path(dir), None)
            .await
            .map_err(|e| KvError::Unavailable(e.to_string()))?;
        if reply.status == 404 {
            return Ok(Vec::new());
        }
        if !reply.ok() {
            let e = self.classify(label, &format!("list {}", self.metadata_path(dir)), &reply);
            return Err(KvError::Unavailable(e.to_string()));
        }
        Ok(reply
            .body
            .pointer("/data/keys")
            .and_then(Value::as_array)
            .map(|keys| {
                keys.iter()
                    .filter_map(Value::as_str)
                    .filter(|k| !k.ends_with('/'))
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Removes a document and all its versions.
    pub async fn doc_delete(&self, path: &str) -> Result<(), crate::coordination::kv::KvError> {
        use crate::coordination::kv::KvError;
        let label = "coordination";
        let reply = self
            .call(label, Method::DELETE, &self.metadata_path(path), None)
            .await
            .map_err(|e| KvError::Unavailable(e.to_string()))?;
        if reply.ok() || reply.status == 404 {
            Ok(())
        } else {
            let e = self.classify(
                label,
                &format!("delete {}", self.metadata_path(path)),
                &reply,
            );
            Err(KvError::Unavailable(e.to_string()))
        }
    }
}

/// An error and its sources, joined: reqwest's top-level message alone ("error sending request")
/// hides the cause ("connection refused"). Transport errors carry the URL, never the body.
fn chain(e: &dyn std::error::Error) -> String {
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
    //! Behaviour that a healthy OpenBao will not show on demand (endless CAS races, expired AppRole
    //! tokens, 5xx) against a scripted server; the real-server tests are in `tests/stores.rs`.
    use super::*;
    use chrono::Utc;
    use uuid::Uuid;
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    fn store(server: &MockServer, auth: VaultAuth) -> VaultStore {
        let c = VaultStoreConfig {
            address: server.uri().parse().unwrap(),
            auth,
            mount: "secret".into(),
            namespace: None,
            timeout: Duration::from_secs(5),
        };
        VaultStore::new("vault-main", &c).unwrap()
    }

    fn target() -> DestinationTarget {
        DestinationTarget::Vault {
            path: "apps/x".into(),
            field: "api_key".into(),
        }
    }

    fn current(version: u64) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(json!({
            "data": { "data": { "other": "kept" }, "metadata": { "version": version } }
        }))
    }

    async fn write_with(store: &VaultStore) -> Result<Option<String>, StoreError> {
        let secret = Secret::from("aos_sk_live_unit".to_string());
        let fp = crate::secret::fingerprint(&secret);
        let req = WriteRequest {
            key: "k",
            rotation_id: Uuid::new_v4(),
            key_id: "key_1",
            secret: &secret,
            fingerprint: &fp,
            rotated_at: Utc::now(),
        };
        store.write(&target(), &req).await
    }

    #[tokio::test]
    async fn a_check_and_set_lost_every_time_ends_as_conflict() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/data/apps/x"))
            .respond_with(current(3))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1/secret/data/apps/x"))
            .respond_with(ResponseTemplate::new(400).set_body_json(json!({
                "errors": ["check-and-set parameter did not match the current version"]
            })))
            .expect(u64::from(CAS_ATTEMPTS))
            .mount(&server)
            .await;
        let s = store(&server, VaultAuth::Token(Secret::from("t".to_string())));
        let e = write_with(&s).await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Conflict, "{e}");
        assert!(e.is_retryable());
        assert!(!e.to_string().contains("aos_sk_live_unit"));
    }

    #[tokio::test]
    async fn a_sealed_or_broken_server_is_transient_and_a_403_is_auth() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/data/apps/x"))
            .and(header("X-Vault-Token", "sealed"))
            .respond_with(
                ResponseTemplate::new(503).set_body_json(json!({ "errors": ["Vault is sealed"] })),
            )
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/data/apps/x"))
            .and(header("X-Vault-Token", "denied"))
            .respond_with(ResponseTemplate::new(403).set_body_json(
                json!({ "errors": ["1 error occurred:\n\t* permission denied\n\n"] }),
            ))
            .mount(&server)
            .await;
        let e = write_with(&store(
            &server,
            VaultAuth::Token(Secret::from("sealed".to_string())),
        ))
        .await
        .unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Transient, "{e}");
        assert!(e.message.contains("Vault is sealed"), "{e}");
        let e = write_with(&store(
            &server,
            VaultAuth::Token(Secret::from("denied".to_string())),
        ))
        .await
        .unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Auth, "{e}");
        assert!(e.message.contains("permission denied"), "{e}");
    }

    #[tokio::test]
    async fn an_expired_approle_token_is_replaced_by_one_new_login() {
        let server = MockServer::start().await;
        let login = |token: &str| {
            ResponseTemplate::new(200).set_body_json(json!({ "auth": { "client_token": token } }))
        };
        Mock::given(method("POST"))
            .and(path("/v1/auth/approle/login"))
            .respond_with(login("first"))
            .up_to_n_times(1)
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1/auth/approle/login"))
            .respond_with(login("second"))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/data/apps/x"))
            .and(header("X-Vault-Token", "first"))
            .respond_with(
                ResponseTemplate::new(403)
                    .set_body_json(json!({ "errors": ["permission denied"] })),
            )
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/secret/data/apps/x"))
            .and(header("X-Vault-Token", "second"))
            .respond_with(current(1))
            .mount(&server)
            .await;
        let s = store(
            &server,
            VaultAuth::AppRole {
                role_id: Secret::from("r".to_string()),
                secret_id: Secret::from("s".to_string()),
                mount: "approle".into(),
            },
        );
        let got = s
            .read(&DestinationTarget::Vault {
                path: "apps/x".into(),
                field: "other".into(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.secret.expose_secret(), "kept");
        assert_eq!(got.version.as_deref(), Some("1"));
    }
}
