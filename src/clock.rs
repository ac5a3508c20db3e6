//! The wall clock the engine reads, injected so that schedule, window, budget and watch decisions can
//! be tested at any instant and in virtual time.
//!
//! Production reads the system clock. Tests use [`Clock::virtual_at`]: a fixed start instant that
//! advances with tokio's clock, so `tokio::time::pause()` / `advance()` move wall time and timers
//! together and nothing depends on when the test runs.

use std::sync::Arc;

use chrono::{DateTime, Utc};

#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// `Utc::now()`.
    #[default]
    System,
    /// `base` plus the tokio time elapsed since `since` (virtual under `tokio::time::pause`).
    Virtual {
        base: DateTime<Utc>,
        since: tokio::time::Instant,
    },
    /// Whatever the shared cell says (a test moves it by hand).
    Manual(Arc<std::sync::Mutex<DateTime<Utc>>>),
}

impl Clock {
    /// A clock that reads `base` now and advances with tokio's (possibly paused) clock.
    pub fn virtual_at(base: DateTime<Utc>) -> Clock {
        Clock::Virtual {
            base,
            since: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Virtual { base, since } => {
                let elapsed = tokio::time::Instant::now().saturating_duration_since(*since);
                *base + chrono::Duration::from_std(elapsed).unwrap_or_default()
            }
            Clock::Manual(cell) => *cell.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[tokio::test(start_paused = true)]
    async fn a_virtual_clock_moves_with_tokio_time() {
        let base = Utc.with_ymd_and_hms(2027, 3, 28, 0, 59, 0).unwrap();
        let clock = Clock::virtual_at(base);
        assert_eq!(clock.now(), base);
        tokio::time::advance(std::time::Duration::from_secs(90)).await;
        assert_eq!(clock.now(), base + chrono::Duration::seconds(90));
    }
}
