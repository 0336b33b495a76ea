//! Timers as plain values: one table per endpoint, and the flight retransmission backoff.

use std::time::{Duration, Instant};

/// Every wake-up reason of one endpoint, one slot each; `earliest` is what `poll_timeout` returns.
#[derive(Debug, Clone)]
pub struct TimerTable<K: Copy + Eq, const N: usize> {
    slots: [(K, Option<Instant>); N],
}

impl<K: Copy + Eq, const N: usize> TimerTable<K, N> {
    pub fn new(kinds: [K; N]) -> Self {
        TimerTable {
            slots: kinds.map(|k| (k, None)),
        }
    }

    pub fn set(&mut self, kind: K, at: Instant) {
        self.slot(kind).1 = Some(at);
    }

    pub fn stop(&mut self, kind: K) {
        self.slot(kind).1 = None;
    }

    pub fn get(&self, kind: K) -> Option<Instant> {
        self.slots
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|s| s.1)
    }

    /// The earliest armed timer and why.
    pub fn earliest(&self) -> Option<(Instant, K)> {
        self.slots
            .iter()
            .filter_map(|(k, at)| at.map(|at| (at, *k)))
            .min_by_key(|(at, _)| *at)
    }

    /// Disarm and return the timers that are due at `now`, earliest first.
    pub fn take_expired(&mut self, now: Instant) -> Vec<K> {
        let mut due: Vec<(Instant, K)> = self
            .slots
            .iter_mut()
            .filter_map(|(k, at)| match *at {
                Some(t) if t <= now => {
                    *at = None;
                    Some((t, *k))
                }
                _ => None,
            })
            .collect();
        due.sort_by_key(|(t, _)| *t);
        due.into_iter().map(|(_, k)| k).collect()
    }

    fn slot(&mut self, kind: K) -> &mut (K, Option<Instant>) {
        // Every kind is put in the table by `new`.
        self.slots
            .iter_mut()
            .find(|(k, _)| *k == kind)
            .expect("timer kind is in the table")
    }
}

/// Retransmission of one flight: first after `initial`, then doubling, at most `max_retries`
/// times; the expiry after the last retransmission reports exhaustion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    interval: Duration,
    retries: u8,
    max_retries: u8,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackoffStep {
    /// Resend the flight; the next deadline is armed.
    Retransmit,
    /// All retransmissions were spent and the last one went unanswered too.
    Exhausted,
}

impl Backoff {
    pub fn new(now: Instant, initial: Duration, max_retries: u8) -> Backoff {
        Backoff {
            interval: initial,
            retries: 0,
            max_retries,
            deadline: now + initial,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn retries(&self) -> u8 {
        self.retries
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    /// Call when the deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) -> BackoffStep {
        if self.retries >= self.max_retries {
            return BackoffStep::Exhausted;
        }
        self.retries += 1;
        self.interval *= 2;
        self.deadline = now + self.interval;
        BackoffStep::Retransmit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_instants_are_1_3_7_then_exhausted_at_15() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Backoff::new(t0, s(1), 3);
        assert_eq!(b.deadline(), t0 + s(1));
        assert!(!b.is_expired(t0 + Duration::from_millis(999)));
        assert_eq!(b.handle_timeout(t0 + s(1)), BackoffStep::Retransmit);
        assert_eq!(b.deadline(), t0 + s(3));
        assert_eq!(b.handle_timeout(t0 + s(3)), BackoffStep::Retransmit);
        assert_eq!(b.deadline(), t0 + s(7));
        assert_eq!(b.handle_timeout(t0 + s(7)), BackoffStep::Retransmit);
        assert_eq!(b.deadline(), t0 + s(15));
        assert_eq!(b.retries(), 3);
        assert_eq!(b.handle_timeout(t0 + s(15)), BackoffStep::Exhausted);
    }

    #[test]
    fn table_returns_earliest_and_takes_due_in_order() {
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        enum K {
            A,
            B,
            C,
        }
        let t0 = Instant::now();
        let mut t = TimerTable::new([K::A, K::B, K::C]);
        assert_eq!(t.earliest(), None);
        t.set(K::B, t0 + Duration::from_secs(2));
        t.set(K::A, t0 + Duration::from_secs(5));
        t.set(K::C, t0 + Duration::from_secs(1));
        assert_eq!(t.earliest(), Some((t0 + Duration::from_secs(1), K::C)));
        assert_eq!(
            t.take_expired(t0 + Duration::from_secs(2)),
            vec![K::C, K::B]
        );
        assert_eq!(t.earliest(), Some((t0 + Duration::from_secs(5), K::A)));
        t.stop(K::A);
        assert_eq!(t.earliest(), None);
    }
}
