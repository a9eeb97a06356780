//! When to send a failed request again, how long to wait first, and how many requests a run
//! may make in all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Exponential backoff with full jitter ("Exponential Backoff And Jitter", AWS Architecture
/// Blog, 2015): before retry `n` (1-based) wait a uniform random time in
/// `[0, min(max_delay, base_delay · 2^(n-1))]`, unless the endpoint said how long with
/// `Retry-After: SECONDS`, which is then waited exactly (up to [`RetryPolicy::max_retry_after`]).
/// Full jitter spreads the retries of many workers hit by one rate limit instead of sending
/// them back together.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Backoff scale of the first retry.
    pub base_delay: Duration,
    /// Upper bound of a computed backoff.
    pub max_delay: Duration,
    /// Upper bound of a `Retry-After` wait, so a confused server cannot stall a run for hours.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The ceiling of the jittered wait before retry `retry` (1-based).
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32
            .checked_shl(retry.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// The wait before retry `retry` (1-based); `unit` is a uniform draw in `[0, 1)`.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        match retry_after {
            Some(wait) => wait.min(self.max_retry_after),
            None => self.backoff_ceiling(retry).mul_f64(unit.clamp(0.0, 1.0)),
        }
    }
}

/// Parses a `Retry-After` header given in seconds; the HTTP-date form is not honoured (the
/// computed backoff applies instead).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A shared upper bound on the HTTP requests of a run, retries included: every attempt takes
/// one request from it before it is sent.
#[derive(Debug)]
pub struct Budget {
    limit: Option<u64>,
    used: AtomicU64,
}

impl Budget {
    /// A budget of `limit` requests; `None` is unlimited.
    pub fn new(limit: Option<u64>) -> Budget {
        Budget {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// Takes one request; `false` (and nothing taken) once `limit` are used.
    pub fn take(&self) -> bool {
        match self.limit {
            None => {
                self.used.fetch_add(1, Ordering::SeqCst);
                true
            }
            Some(limit) => self
                .used
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                    (used < limit).then_some(used + 1)
                })
                .is_ok(),
        }
    }

    /// Requests taken so far.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// The limit, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Whether no request is left.
    pub fn is_spent(&self) -> bool {
        self.limit.is_some_and(|limit| self.used() >= limit)
    }
}

/// A uniform draw in `[0, 1)` for the jitter: SplitMix64 over the clock and a process-wide
/// counter. Jitter needs spread between workers, not cryptographic quality.
pub(crate) fn jitter_unit() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z = nanos
        ^ COUNTER
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_and_stops_at_the_maximum() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            max_retry_after: Duration::from_secs(5),
        };
        let ceilings: Vec<u128> = (1..=6)
            .map(|n| policy.backoff_ceiling(n).as_millis())
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.backoff_ceiling(200), Duration::from_millis(1000));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay(3, None, 0.0), Duration::ZERO);
        assert_eq!(policy.delay(3, None, 0.5), Duration::from_millis(1000));
        for _ in 0..1000 {
            let u = jitter_unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }

    #[test]
    fn retry_after_is_honoured_exactly_up_to_its_cap() {
        let policy = RetryPolicy::default();
        let wait = Some(Duration::from_secs(7));
        assert_eq!(policy.delay(1, wait, 0.0), Duration::from_secs(7));
        assert_eq!(
            policy.delay(1, Some(Duration::from_secs(10_000)), 0.3),
            policy.max_retry_after
        );
        assert_eq!(parse_retry_after(" 12 "), Some(Duration::from_secs(12)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn a_budget_refuses_once_spent_even_under_contention() {
        let budget = Budget::new(Some(50));
        let taken = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..20 {
                        if budget.take() {
                            taken.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(taken.load(Ordering::SeqCst), 50);
        assert_eq!(budget.used(), 50);
        assert!(budget.is_spent());
        let unlimited = Budget::new(None);
        assert!((0..1000).all(|_| unlimited.take()));
        assert!(!unlimited.is_spent());
    }
}
