//! Waiting between attempts: exponential backoff with jitter, and the cap on a server's `Retry-After`.
//!
//! Every retry loop in keyrotd (provider calls, store writes, hooks, re-rotations) takes its pause from
//! here, so that many keys failing at once against one portal spread their retries out instead of
//! arriving in lock-step, and no answer from outside can make keyrotd wait longer than configured.

use std::time::Duration;

/// The first pause, before jitter.
pub const BASE: Duration = Duration::from_millis(250);
/// The longest pause [`backoff`] returns.
pub const CAP: Duration = Duration::from_secs(10);
/// The default ceiling on a `Retry-After` (`max_retry_after`): a portal asking for more is waited on
/// this long at most, and the engine's rule for the call decides what happens next.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The pause before retry number `attempt` (0 = the first retry): `BASE * 2^attempt`, capped at
/// [`CAP`], with equal jitter (a uniformly random point in the upper half), so a pause is never zero
/// and never longer than the cap.
pub fn backoff(attempt: u32) -> Duration {
    backoff_between(attempt, BASE, CAP)
}

/// [`backoff`] with another base and cap (e.g. seconds to minutes for a key waiting to be re-rotated).
pub fn backoff_between(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(20)).min(cap);
    equal_jitter(exp, rand::random::<f64>())
}

/// `d/2 + sample * d/2`, `sample` in `[0, 1)`. Pure, so the bounds can be tested.
pub fn equal_jitter(d: Duration, sample: f64) -> Duration {
    let half = d / 2;
    half + half.mul_f64(sample.clamp(0.0, 1.0))
}

/// A server's `Retry-After`, never longer than `max`.
pub fn cap_retry_after(asked: Duration, max: Duration) -> Duration {
    asked.min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_stay_within_the_cap_and_are_never_zero() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= CAP, "attempt {attempt}: {d:?}");
            assert!(d >= BASE / 2, "attempt {attempt}: {d:?}");
        }
        // Attempt 3 is 2 s before jitter: between 1 s and 2 s after it.
        for _ in 0..100 {
            let d = backoff(3);
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }

    #[test]
    fn pauses_are_jittered() {
        let seen: std::collections::HashSet<Duration> = (0..50).map(|_| backoff(5)).collect();
        assert!(seen.len() > 10, "backoff(5) gave only {seen:?}");
    }

    #[test]
    fn equal_jitter_spans_the_upper_half() {
        let d = Duration::from_secs(8);
        assert_eq!(equal_jitter(d, 0.0), Duration::from_secs(4));
        assert_eq!(equal_jitter(d, 0.5), Duration::from_secs(6));
        assert!(equal_jitter(d, 0.999_999) <= d);
        assert_eq!(equal_jitter(d, 7.0), d);
    }

    #[test]
    fn a_long_retry_after_is_cut_to_the_maximum() {
        assert_eq!(
            cap_retry_after(Duration::from_secs(86_400), DEFAULT_MAX_RETRY_AFTER),
            Duration::from_secs(300)
        );
        assert_eq!(
            cap_retry_after(Duration::from_secs(7), DEFAULT_MAX_RETRY_AFTER),
            Duration::from_secs(7)
        );
    }
}
