//! Test support: starts the real outside components (OpenBao, moto, the simulators) on free ports and
//! stops them when dropped. A component that cannot start fails the test loudly; nothing is skipped.
#![allow(dead_code)]

pub mod bao;
pub mod daemon;
pub mod moto;
pub mod sim;

use std::path::PathBuf;

/// The project root (where Cargo.toml is).
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `.tools/venv/bin`, where `scripts/install-tools.sh` puts `bao` and `moto_server`.
pub fn tools_bin() -> PathBuf {
    project_root().join(".tools/venv/bin")
}

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}
