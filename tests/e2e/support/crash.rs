//! What the crash-recovery tests (tests/e2e/crash.rs, built only with the `failpoints` feature) do
//! with the stack and the daemon: crash it, and wait for recovery to settle.

use std::time::Duration;

use super::daemon::Daemon;
use super::stack::{Options, Stack};

/// How long a daemon started by recovery may take to settle (re-rotations included).
pub const CONVERGE: Duration = Duration::from_secs(120);

impl Daemon {
    /// SIGKILL: a crash, nothing runs after it.
    pub fn kill9(&mut self) {
        self.proc.kill();
    }
}

impl Stack {
    /// Does every configured destination hold the portal's active key, and does each dependent
    /// authenticate with it?
    pub async fn consistent(&self, o: &Options) -> bool {
        let want = Some(self.portal.state().await.fingerprint);
        let fps = self.destination_fingerprints().await;
        let stored = fps
            .iter()
            .zip([true, o.with_aws, o.with_file])
            .filter(|(_, on)| *on)
            .all(|(f, _)| *f == want);
        stored
            && self.dep_vault.verify().await == 200
            && (!o.with_aws || self.dep_aws.verify().await == 200)
    }

    /// Waits until the daemon has settled (after recovery): consistent, journal idle, nothing owed.
    pub async fn wait_converged(&self, d: &Daemon, o: &Options) {
        let start = std::time::Instant::now();
        while start.elapsed() < CONVERGE {
            let j = self.journal();
            if j["phase"] == "idle" && j["lost"] == false && self.consistent(o).await {
                self.assert_consistent(o).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "did not converge in {CONVERGE:?}: journal {:#}\ndestinations {:?}\nportal {:?}\nlog:\n{}",
            self.journal(),
            self.destination_fingerprints().await,
            self.portal.state().await,
            d.log_text()
        );
    }

    /// Waits until the journal's phase is `want`.
    pub async fn wait_journal_phase(&self, d: &Daemon, want: &str) {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if self.journal_phase() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the journal never said {want:?} (it says {:?}); log:\n{}",
            self.journal_phase(),
            d.log_text()
        );
    }
}
