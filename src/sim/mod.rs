//! Simulators of the portal ([`portal`]), of a vendor that keeps two keys live ([`vendor`]) and of a
//! dependent service ([`dependent`]), for the tests and the demo, and a TCP proxy that adds latency and
//! counts requests ([`proxy`]), for the benchmarks. They are test equipment, not part of the daemon: the daemon never links to them at run
//! time, and the portal simulator deliberately hands out the secrets it issued (`/_sim/issued-secrets`)
//! so leak tests can search logs and files for them.
//!
//! This module owns what both share: the connection loop (served with hyper directly, so a handler
//! can drop its own connection mid-request — the portal's `lose_next` fault), the loopback guard on
//! `/_sim/` routes, and the JSON shapes of the `/_sim/state` answers, which tests deserialize.

pub mod dependent;
pub mod portal;
pub mod proxy;
pub mod vendor;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// `GET /_sim/state` of the portal simulator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortalState {
    pub key_id: String,
    /// [`crate::secret::fingerprint`] of the active secret.
    pub fingerprint: String,
    /// Regenerates through the API that rotated the key (including `lose_next` ones).
    pub regenerations: u64,
    /// `POST /_sim/rotate` calls (rotations "by a person in the portal UI").
    pub out_of_band_rotations: u64,
    /// `/v1/auth/check` calls that passed / failed: the ground truth for auth failures.
    pub auth_ok: u64,
    pub auth_failed: u64,
}

/// `GET /_sim/counters` of the portal simulator (of one account in a fleet): requests that reached each
/// contract route since start or the last reset, whatever they were answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortalCounters {
    /// `GET /v1/api-keys/current`.
    pub status: u64,
    /// `POST /v1/api-keys/regenerate`, including refused and failed ones.
    pub regenerate: u64,
    /// `GET /v1/auth/check`.
    pub auth_check: u64,
}

impl PortalCounters {
    pub fn total(&self) -> u64 {
        self.status + self.regenerate + self.auth_check
    }

    pub fn add(&mut self, other: &PortalCounters) {
        self.status += other.status;
        self.regenerate += other.regenerate;
        self.auth_check += other.auth_check;
    }
}

/// `GET /_sim/counters` of a fleet of accounts (`keyrotd-sim portal --accounts N`): every account's
/// counters summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetCounters {
    pub accounts: usize,
    pub requests: PortalCounters,
    /// Regenerates that rotated a key (as [`PortalState::regenerations`]), summed.
    pub regenerations: u64,
    pub out_of_band_rotations: u64,
    pub auth_ok: u64,
    pub auth_failed: u64,
}

/// `GET /_sim/state` of the dual-key vendor simulator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VendorState {
    /// Every live key, oldest first.
    pub live: Vec<VendorKey>,
    /// Creates that made a key (`lose_next` ones included), and revokes that retired one.
    pub creates: u64,
    pub revokes: u64,
    /// `/v1/auth/check` calls that passed / failed.
    pub auth_ok: u64,
    pub auth_failed: u64,
}

/// One entry of `GET /_sim/accounts` of a fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetAccount {
    /// Its index: its routes are under `/a/<account>`.
    pub account: usize,
    pub key_id: String,
    pub regenerations: u64,
    pub requests: PortalCounters,
}

/// One live key of the vendor simulator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VendorKey {
    pub id: String,
    pub name: String,
    pub fingerprint: String,
}

/// `GET /_sim/state` of the dependent simulator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DependentState {
    /// Reload requests answered 200.
    pub reloads: u64,
    /// Fingerprint of the key it uses now; `None` before it ever read one.
    pub fingerprint: Option<String>,
    /// Its own calls to the portal's auth check (probe loop and `/health/upstream`).
    pub auth_ok: u64,
    pub auth_failed: u64,
    /// The last reload request's body (JSON if it parsed, else a string).
    pub last_reload_body: Option<serde_json::Value>,
}

/// One reload request the dependent simulator received (`GET /_sim/requests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub body: serde_json::Value,
    pub headers: std::collections::BTreeMap<String, String>,
    /// What the simulator answered.
    pub status: u16,
}

/// Per-connection facts a handler can extract: who is calling, and a way to drop the connection.
#[derive(Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    drop: Arc<Notify>,
}

impl Conn {
    /// Closes this connection with a TCP reset, without sending anything further. The caller should
    /// then never complete (`std::future::pending`).
    pub fn drop_connection(&self) {
        self.drop.notify_one();
    }
}

/// Serves `router` on `listener` until the process ends, one task per connection (HTTP/1.1).
pub async fn serve(listener: TcpListener, router: Router) -> std::io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            // A second handle on the socket: dropping hyper's side alone would close gracefully (FIN);
            // with this one we can set SO_LINGER 0 and close with a reset.
            let Ok(std_stream) = stream.into_std() else {
                return;
            };
            let Ok(keep) = std_stream.try_clone() else {
                return;
            };
            let Ok(stream) = tokio::net::TcpStream::from_std(std_stream) else {
                return;
            };
            let drop = Arc::new(Notify::new());
            let conn = Conn {
                peer,
                drop: drop.clone(),
            };
            let service = TowerToHyperService::new(router.layer(axum::Extension(conn)));
            let serving = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = serving => {}
                _ = drop.notified() => {
                    if let Ok(keep) = tokio::net::TcpStream::from_std(keep) {
                        let _ = keep.set_zero_linger();
                        // `serving` (hyper's handle) is dropped at the end of the select; `keep`
                        // here: the last handle goes with linger 0, i.e. a RST.
                    }
                }
            }
        });
    }
}

/// Middleware for `/_sim/` routes: loopback callers only.
pub async fn loopback_only(req: Request, next: Next) -> Response {
    let local = req
        .extensions()
        .get::<Conn>()
        .is_some_and(|c| c.peer.ip().is_loopback());
    if local {
        next.run(req).await
    } else {
        (StatusCode::FORBIDDEN, "/_sim/ is loopback only\n").into_response()
    }
}

/// Binds `addr` and prints `listening on http://<addr>` (the real port when `addr` has port 0) to
/// stdout: the readiness line test support waits for.
pub async fn bind_and_announce(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    use std::io::Write;
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "keyrotd-sim {what} listening on http://{local}")?;
    out.flush()?;
    Ok(listener)
}
