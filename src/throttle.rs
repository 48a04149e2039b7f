//! Rate limits for warnings that repeat while something stays broken (etcd unreachable, a watch
//! that keeps failing): the first occurrence is logged at once, then at most one line per
//! interval, saying how many were left out meanwhile. A leaf module: it imports nothing of the crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One rate-limited warning site.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Throttle {
    /// A throttle letting one line through per `every`.
    pub const fn new(every: Duration) -> Self {
        Throttle { every, last: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` when this occurrence should be logged, `n` being how many were left out since the
    /// last logged one; `None` when it should be left out (and is counted).
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(at) if now.duration_since(at) < self.every => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }

    /// Forgets the past: the next occurrence is logged at once (call it when the trouble ended).
    pub fn reset(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.suppressed.store(0, Ordering::Relaxed);
    }
}

/// The pause before retry number `attempt` (0-based) of a background task: `first`, doubling, at
/// most `max`.
pub fn backoff(attempt: u32, first: Duration, max: Duration) -> Duration {
    first.saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        t.reset();
        assert_eq!(t.allow(), Some(0));
        let t = Throttle::new(Duration::ZERO);
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), Some(0));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(30));
        let waits: Vec<u64> = (0..8).map(|a| backoff(a, first, max).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX, first, max), max);
    }
}
