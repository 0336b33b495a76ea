//! When the Tedee provider may call the cloud (tedee-cloud.md Part A §5.2), sans-IO: time and
//! randomness are inputs, so every rule is tested on a virtual clock.
//!
//! - the hub's own ceiling, `max_requests_per_hour`, over a sliding hour, never exceeded;
//! - after a 429, nothing goes to Tedee until `Retry-After` has passed (the limit is the
//!   account's: every call would fail);
//! - after a 5xx, a timeout or a connection or TLS error, that purpose waits 30 s doubling to
//!   1 h, ±20 %, until it succeeds;
//! - after a 401 that a re-read key did not cure, nothing at all until the key file changes.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::backoff::Backoff;

const HOUR: Duration = Duration::from_secs(3600);
/// A 429 without `Retry-After` waits this long; a longer `Retry-After` is capped.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
const BACKOFF_MIN: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_secs(3600);
const BACKOFF_JITTER_PERCENT: u32 = 20;

/// What a call is for: each has its own backoff.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    ListLocks,
    Register,
    Mobile,
    /// A lock's certificate, by serial.
    Certificate(String),
    SignedTime,
}

/// How a call ended, as far as the policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// 429, with `Retry-After` if Tedee sent one.
    RateLimited(Option<Duration>),
    /// 5xx, timeout, connection or TLS failure: worth retrying later.
    Transient,
    /// 401 with a key that was re-read and did not change.
    Unauthorized,
    /// Any other refusal: retried only at the next scheduled time (the caller decides).
    Refused,
}

/// Why a call may not go now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Not before this instant (budget, 429 or backoff, whichever is latest).
    Until(Instant, Reason),
    /// Not until the key file changes (E-03).
    KeyRefused,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Budget,
    RateLimited,
    Backoff,
}

pub struct Policy {
    max_per_hour: usize,
    /// When each call of the last hour went out, oldest first.
    sent: VecDeque<Instant>,
    paused_until: Option<Instant>,
    key_refused: bool,
    backoff: HashMap<Purpose, (Backoff, Instant)>,
}

impl Policy {
    pub fn new(max_per_hour: u32) -> Policy {
        Policy {
            max_per_hour: max_per_hour.max(1) as usize,
            sent: VecDeque::new(),
            paused_until: None,
            key_refused: false,
            backoff: HashMap::new(),
        }
    }

    /// May a call for `purpose` go at `now`? `Ok` means yes; the caller then calls
    /// [`Policy::note_sent`] before sending.
    pub fn check(&mut self, now: Instant, purpose: &Purpose) -> Result<(), Wait> {
        if self.key_refused {
            return Err(Wait::KeyRefused);
        }
        self.forget_old(now);
        let mut until: Option<(Instant, Reason)> = None;
        let mut later = |t: Instant, r: Reason| {
            if t > now && until.is_none_or(|(u, _)| t > u) {
                until = Some((t, r));
            }
        };
        if self.sent.len() >= self.max_per_hour {
            if let Some(oldest) = self.sent.front() {
                later(*oldest + HOUR, Reason::Budget);
            }
        }
        if let Some(t) = self.paused_until {
            later(t, Reason::RateLimited);
        }
        if let Some((_, t)) = self.backoff.get(purpose) {
            later(*t, Reason::Backoff);
        }
        match until {
            Some((t, r)) => Err(Wait::Until(t, r)),
            None => Ok(()),
        }
    }

    /// A call goes out now: it counts against the budget.
    pub fn note_sent(&mut self, now: Instant) {
        self.forget_old(now);
        self.sent.push_back(now);
    }

    /// How the call for `purpose` ended; `random` spreads a backoff.
    pub fn note_outcome(&mut self, now: Instant, purpose: &Purpose, outcome: Outcome, random: u64) {
        match outcome {
            Outcome::Success => {
                self.backoff.remove(purpose);
            }
            Outcome::RateLimited(after) => {
                let wait = after.unwrap_or(DEFAULT_RETRY_AFTER).min(MAX_RETRY_AFTER);
                let until = now + wait;
                if self.paused_until.is_none_or(|t| until > t) {
                    self.paused_until = Some(until);
                }
            }
            Outcome::Transient => {
                let (backoff, at) = self.backoff.entry(purpose.clone()).or_insert_with(|| {
                    (
                        Backoff::around(BACKOFF_MIN, BACKOFF_MAX, BACKOFF_JITTER_PERCENT),
                        now,
                    )
                });
                *at = now + backoff.next(random);
            }
            Outcome::Unauthorized => self.key_refused = true,
            Outcome::Refused => {}
        }
    }

    /// The operator asked for `purpose` now: its own backoff is forgotten (the budget, a 429
    /// pause and a refused key still hold).
    pub fn clear_backoff(&mut self, purpose: &Purpose) {
        self.backoff.remove(purpose);
    }

    /// The key file changed: calls may go again.
    pub fn key_replaced(&mut self) {
        self.key_refused = false;
    }

    pub fn key_refused(&self) -> bool {
        self.key_refused
    }

    /// Calls made in the hour before `now`.
    pub fn requests_last_hour(&mut self, now: Instant) -> usize {
        self.forget_old(now);
        self.sent.len()
    }

    /// Until when a 429 pauses every call, if it still does at `now`.
    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.paused_until.filter(|t| *t > now)
    }

    /// The next instant `purpose` may retry after failures, if it is backing off.
    pub fn retry_at(&self, purpose: &Purpose) -> Option<Instant> {
        self.backoff.get(purpose).map(|(_, t)| *t)
    }

    fn forget_old(&mut self, now: Instant) {
        while self.sent.front().is_some_and(|t| *t + HOUR <= now) {
            self.sent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn the_hourly_budget_is_a_sliding_hour_and_never_exceeded() {
        let t0 = Instant::now();
        let mut p = Policy::new(3);
        let purpose = Purpose::SignedTime;
        for i in 0..3 {
            let now = t0 + s(i * 60);
            assert_eq!(p.check(now, &purpose), Ok(()));
            p.note_sent(now);
        }
        // The fourth waits until the first is an hour old.
        assert_eq!(
            p.check(t0 + s(200), &purpose),
            Err(Wait::Until(t0 + s(3600), Reason::Budget))
        );
        assert_eq!(p.check(t0 + s(3600), &purpose), Ok(()));
        assert_eq!(p.requests_last_hour(t0 + s(3600)), 2);
        // Over a long run at full demand: never more than 3 in any hour.
        let mut p = Policy::new(3);
        let mut sent = Vec::new();
        let mut now = t0;
        while now < t0 + s(10 * 3600) {
            match p.check(now, &purpose) {
                Ok(()) => {
                    p.note_sent(now);
                    sent.push(now);
                }
                Err(Wait::Until(t, _)) => now = t,
                Err(Wait::KeyRefused) => unreachable!(),
            }
        }
        for (i, t) in sent.iter().enumerate() {
            let in_hour = sent[i..].iter().take_while(|u| **u < *t + HOUR).count();
            assert!(
                in_hour <= 3,
                "{in_hour} calls in the hour from {:?}",
                *t - t0
            );
        }
        assert_eq!(sent.len(), 30);
    }

    #[test]
    fn a_429_pauses_every_purpose_for_retry_after_capped_at_an_hour() {
        let t0 = Instant::now();
        let mut p = Policy::new(60);
        let cert = Purpose::Certificate("12345678-901234".into());
        p.note_outcome(t0, &cert, Outcome::RateLimited(Some(s(120))), 0);
        for purpose in [&cert, &Purpose::SignedTime, &Purpose::ListLocks] {
            assert_eq!(
                p.check(t0 + s(119), purpose),
                Err(Wait::Until(t0 + s(120), Reason::RateLimited))
            );
        }
        assert_eq!(p.check(t0 + s(120), &cert), Ok(()));
        p.note_outcome(t0, &cert, Outcome::RateLimited(Some(s(86_400))), 0);
        assert_eq!(p.paused_until(t0), Some(t0 + s(3600)));
        let mut q = Policy::new(60);
        q.note_outcome(t0, &cert, Outcome::RateLimited(None), 0);
        assert_eq!(q.paused_until(t0), Some(t0 + s(60)));
    }

    #[test]
    fn transient_failures_back_off_per_purpose_and_a_success_resets() {
        let t0 = Instant::now();
        let mut p = Policy::new(60);
        let a = Purpose::Certificate("a".into());
        let b = Purpose::Certificate("b".into());
        let mut now = t0;
        let mut gaps = Vec::new();
        for _ in 0..10 {
            p.note_outcome(now, &a, Outcome::Transient, 0);
            let Err(Wait::Until(next, Reason::Backoff)) = p.check(now, &a) else {
                panic!("no backoff");
            };
            gaps.push((next - now).as_secs());
            now = next;
        }
        // 30 s doubling to 1 h, at the band's low edge (−20 %).
        assert_eq!(gaps, [24, 48, 96, 192, 384, 768, 1536, 2880, 2880, 2880]);
        // Another purpose is not held back.
        assert_eq!(p.check(now, &b), Ok(()));
        p.note_outcome(now, &a, Outcome::Success, 0);
        assert_eq!(p.check(now, &a), Ok(()));
        p.note_outcome(now, &a, Outcome::Transient, u64::MAX);
        assert!(p.retry_at(&a).unwrap() - now <= s(36));
    }

    #[test]
    fn an_unauthorized_key_stops_everything_until_it_is_replaced() {
        let t0 = Instant::now();
        let mut p = Policy::new(60);
        p.note_outcome(t0, &Purpose::ListLocks, Outcome::Unauthorized, 0);
        assert_eq!(
            p.check(t0 + s(86_400), &Purpose::SignedTime),
            Err(Wait::KeyRefused)
        );
        p.key_replaced();
        assert_eq!(p.check(t0 + s(86_400), &Purpose::SignedTime), Ok(()));
        // Other refusals change nothing here.
        p.note_outcome(t0, &Purpose::Mobile, Outcome::Refused, 0);
        assert_eq!(p.check(t0, &Purpose::Mobile), Ok(()));
    }
}
