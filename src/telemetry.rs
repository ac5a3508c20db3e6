//! Temporary stand-in for the metrics registry (replaced by the real one on merge).
#![allow(dead_code, unused_variables)]
use chrono::{DateTime, Utc};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Degraded,
    Aborted,
    Failed,
}
impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Degraded => "degraded",
            Outcome::Aborted => "aborted",
            Outcome::Failed => "failed",
        }
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    Ok,
    AuthFailure,
    Error,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RerotationReason {
    LostBeforeStorage,
    CrashRecovery,
    Drift,
}
impl RerotationReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::LostBeforeStorage => "lost_before_storage",
            Self::CrashRecovery => "crash_recovery",
            Self::Drift => "drift",
        }
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderOperation {
    Status,
    Regenerate,
    AuthCheck,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderOutcome {
    Ok,
    AuthError,
    RateLimited,
    Transient,
    Ambiguous,
}

pub struct Metrics;
impl Metrics {
    pub fn new() -> Metrics {
        Metrics
    }
    pub fn apply_config(&self, c: &crate::config::Config) {}
    pub fn rotation_started(&self, key: &str, at: DateTime<Utc>) {}
    pub fn rotation_finished(&self, key: &str, o: Outcome, d: Duration) {}
    pub fn invalidation_window(&self, key: &str, secs: f64) {}
    pub fn store_write(&self, key: &str, store: &str, ok: bool) {}
    pub fn reload_hook(&self, key: &str, dep: &str, ok: bool) {}
    pub fn post_rotation_check(&self, key: &str, dep: &str, r: CheckResult) {}
    pub fn rerotation(&self, key: &str, r: RerotationReason) {}
    pub fn key_status(&self, key: &str, active: bool, last_rotated: Option<DateTime<Utc>>) {}
    pub fn next_rotation(&self, key: &str, at: Option<DateTime<Utc>>) {}
    pub fn drift(&self, key: &str, d: bool) {}
    pub fn provider_request(&self, p: &str, op: ProviderOperation, o: ProviderOutcome) {}
    pub fn config_reload(&self, ok: bool) {}
    pub fn paused(&self, p: bool) {}
    pub fn last_success(&self, key: &str, at: DateTime<Utc>) {}
    pub fn encode(&self) -> String {
        String::new()
    }
}
