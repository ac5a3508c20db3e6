//! Checks of the files keyrotd ships, without any outside service: every config under `config/`, the
//! invalid-config fixtures, the alert rules and their promtool unit tests, the Grafana dashboard, the
//! systemd unit, the compose file and the Dockerfile. One test binary (see tests/README.md).

mod sample;

mod alerts;
mod config;
mod dashboard;
mod deploy;
mod fuzz;
