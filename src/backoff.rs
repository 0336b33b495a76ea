//! Waiting longer after each failure: one type for every retry loop that talks to something
//! outside (the MQTT broker, Tedee's cloud). Sans-IO: the random number that spreads each delay
//! is an input, so tests are exact.

use std::time::Duration;

/// Delays doubling from `min` to `max`, each drawn within a band around its ceiling so that a
/// fleet of hubs does not retry in step.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
    /// The band, in percent of the ceiling: each delay is drawn from `[low, high]`.
    low: u32,
    high: u32,
}

impl Backoff {
    /// Each delay drawn between half its ceiling and all of it.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff::banded(min, max, 50, 100)
    }

    /// Each delay drawn within ±`percent` of its ceiling (Tedee's "±20 % jitter").
    pub fn around(min: Duration, max: Duration, percent: u32) -> Backoff {
        let percent = percent.min(100);
        Backoff::banded(min, max, 100 - percent, 100 + percent)
    }

    fn banded(min: Duration, max: Duration, low: u32, high: u32) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
            low,
            high,
        }
    }

    /// The next delay; `random` is any random number.
    pub fn next(&mut self, random: u64) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let ms = ceiling.as_millis().min(u128::from(u64::MAX / 1000)) as u64;
        let low = ms.saturating_mul(u64::from(self.low)) / 100;
        let high = ms.saturating_mul(u64::from(self.high)) / 100;
        let span = high - low;
        Duration::from_millis(low + if span == 0 { 0 } else { random % (span + 1) })
    }

    /// Failures so far (0 after a success).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        // The largest draw each time: 0.5, 1, 2, 4, 4 s.
        let top: Vec<_> = (0..5).map(|_| b.next(u64::MAX - 1)).collect();
        let expect = [500, 1000, 2000, 4000, 4000];
        for (d, e) in top.iter().zip(expect) {
            assert!(d.as_millis() <= e && d.as_millis() >= e / 2, "{d:?} vs {e}");
        }
        b.reset();
        // The smallest draw: half the ceiling.
        assert_eq!(b.next(0), Duration::from_millis(250));
        assert_eq!(b.next(0), Duration::from_millis(500));
        // Every draw stays within [ceiling/2, ceiling].
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        for i in 0..40u64 {
            let d = b.next(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            assert!(d <= Duration::from_secs(60) && d >= Duration::from_millis(250));
        }
    }

    #[test]
    fn around_spreads_both_ways() {
        // Tedee's: 30 s doubling to 1 h, ±20 %.
        let mut b = Backoff::around(Duration::from_secs(30), Duration::from_secs(3600), 20);
        assert_eq!(b.next(0), Duration::from_secs(24));
        assert_eq!(
            b.next(u64::MAX),
            Duration::from_millis(60_000 - 12_000 + (u64::MAX % 24_001))
        );
        // 120, 240, … 1920 s, then capped at 1 h: every draw within ±20 % of its ceiling.
        for i in 0..20u32 {
            let ceiling = Duration::from_secs(120 << i.min(5)).min(Duration::from_secs(3600));
            let d = b.next(12_345_678_901);
            assert!(
                d >= ceiling * 4 / 5 && d <= ceiling * 6 / 5,
                "{d:?} vs {ceiling:?}"
            );
        }
        assert_eq!(b.failures(), 22);
        b.reset();
        assert_eq!(b.failures(), 0);
    }
}
