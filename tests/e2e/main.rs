//! keyrotd end to end: the real `keyrotd` and `keyrotd-sim` binaries against real OpenBao, moto and
//! Prometheus, each started on a loopback port it chose itself. One test binary, so the AWS SDK and the
//! support code are linked once; each module is one story (see tests/README.md for what goes where).

mod support;

mod admin_api;
mod cli;
mod compose;
mod crash;
mod drift;
mod dual;
mod dual_crash;
mod faults;
mod faults_cli;
mod faults_startup;
mod hooks;
mod leak;
mod observability;
mod outage;
mod owner;
mod pause;
mod preflight;
mod prometheus;
mod provider;
mod replicas;
mod rerotation;
mod rotation;
mod signals;
mod soak;
mod stores;
mod systemd;
mod tls;
mod triggers;
mod vault_leak;
mod vault_lifetime;
