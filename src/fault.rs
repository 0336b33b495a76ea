//! A seeded link fault model: loss, duplication, reordering, delay and a cut after frame N.
//!
//! Sans-IO like the protocol core: [`FaultyPipe::push`] a frame at `now`, take it out with
//! [`FaultyPipe::pop_due`] once its delivery instant has come. The same model sits in the pair
//! harness (virtual clock) and in the simulator's socket server (real clock), so a fault
//! schedule means the same thing in both.

use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::Deserialize;

#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// Probability that a frame is lost.
    pub loss: f64,
    /// Probability that a frame is delivered twice.
    pub duplicate: f64,
    /// Probability that a frame is held back by `reorder_delay_ms`, letting later ones pass.
    pub reorder: f64,
    pub reorder_delay_ms: u64,
    /// Fixed delay plus uniform jitter in `[0, jitter_ms)` added to every frame.
    pub delay_ms: u64,
    pub jitter_ms: u64,
    /// Cut the link when this many frames have passed (counted per pipe).
    pub disconnect_after_frames: Option<u64>,
    /// Which direction's count cuts the link.
    pub disconnect_direction: Direction,
    /// BLE timing model: a value goes over the air only at a connection event, every this
    /// many milliseconds (0 = off). Applied after delay and jitter.
    pub connection_interval_ms: u64,
    pub seed: u64,
}

impl FaultConfig {
    /// Check that probabilities are probabilities.
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [
            ("loss", self.loss),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("faults.{name}: {p} is not a probability in 0..=1"));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    #[default]
    Both,
    ToLock,
    ToClient,
}

impl FaultConfig {
    /// The faults of one direction: the cut only applies where `disconnect_direction` says.
    pub fn for_direction(&self, direction: Direction) -> FaultConfig {
        let mut c = self.clone();
        if self.disconnect_direction != Direction::Both && self.disconnect_direction != direction {
            c.disconnect_after_frames = None;
        }
        c
    }
}

/// What happened to a pushed frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Queued,
    Duplicated,
    Dropped,
    /// The frame limit was reached: the link is cut and this frame is lost.
    Disconnect,
}

/// One direction of a faulty link.
pub struct FaultyPipe<T> {
    config: FaultConfig,
    rng: ChaCha8Rng,
    /// Sorted by delivery instant, then by push order.
    queue: Vec<(Instant, u64, T)>,
    seq: u64,
    frames: u64,
    /// Connection events happen at `epoch + k × interval`.
    epoch: Option<Instant>,
}

impl<T: Clone> FaultyPipe<T> {
    /// `stream` separates pipes made from one seed (each direction, each connection).
    pub fn new(config: &FaultConfig, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(stream);
        FaultyPipe {
            config: config.clone(),
            rng,
            queue: Vec::new(),
            seq: 0,
            frames: 0,
            epoch: None,
        }
    }

    pub fn push(&mut self, now: Instant, item: T) -> Fate {
        self.frames += 1;
        if self
            .config
            .disconnect_after_frames
            .is_some_and(|n| self.frames > n)
        {
            return Fate::Disconnect;
        }
        if self.chance(self.config.loss) {
            return Fate::Dropped;
        }
        let duplicate = self.chance(self.config.duplicate);
        let delay = self.delay();
        let at = self.on_air(now, now + delay);
        self.insert(at, item.clone());
        if duplicate {
            let delay = self.delay();
            let at = self.on_air(now, now + delay);
            self.insert(at, item);
            return Fate::Duplicated;
        }
        Fate::Queued
    }

    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.queue.first().is_some_and(|(at, _, _)| *at <= now) {
            Some(self.queue.remove(0).2)
        } else {
            None
        }
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.queue.first().map(|(at, _, _)| *at)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }

    /// The next connection event at or after `at` (the BLE timing model).
    fn on_air(&mut self, now: Instant, at: Instant) -> Instant {
        let interval = self.config.connection_interval_ms;
        if interval == 0 {
            return at;
        }
        let epoch = *self.epoch.get_or_insert(now);
        let interval = Duration::from_millis(interval);
        let since = at.saturating_duration_since(epoch);
        // The first event strictly after `at`: a value produced during an event goes out in
        // the next one.
        let events = since.as_nanos() / interval.as_nanos() + 1;
        epoch + interval * u32::try_from(events).unwrap_or(u32::MAX)
    }

    /// Put this pipe's connection events on a shared clock (both directions of one link share
    /// the same events, as in BLE).
    pub fn align(&mut self, epoch: Instant) {
        self.epoch = Some(epoch);
    }

    fn insert(&mut self, at: Instant, item: T) {
        self.seq += 1;
        let pos = self.queue.partition_point(|(t, _, _)| *t <= at);
        self.queue.insert(pos, (at, self.seq, item));
    }

    fn delay(&mut self) -> Duration {
        let mut ms = self.config.delay_ms;
        if self.config.jitter_ms > 0 {
            ms += self.rng.next_u64() % self.config.jitter_ms;
        }
        if self.chance(self.config.reorder) {
            ms += self.config.reorder_delay_ms.max(1);
        }
        Duration::from_millis(ms)
    }

    fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        // 53 random bits give a uniform float in [0, 1).
        let x = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        x < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_pipe_delivers_in_order_at_once() {
        let t0 = Instant::now();
        let mut p = FaultyPipe::new(&FaultConfig::default(), 0);
        for i in 0..5 {
            assert_eq!(p.push(t0, i), Fate::Queued);
        }
        let got: Vec<i32> = std::iter::from_fn(|| p.pop_due(t0)).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn same_seed_same_schedule_and_rates_are_near_configured() {
        let cfg = FaultConfig {
            loss: 0.2,
            duplicate: 0.05,
            jitter_ms: 10,
            seed: 7,
            ..FaultConfig::default()
        };
        let t0 = Instant::now();
        let run = || {
            let mut p = FaultyPipe::new(&cfg, 1);
            (0..10_000).map(|i| p.push(t0, i)).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        let lost = a.iter().filter(|f| **f == Fate::Dropped).count();
        let dup = a.iter().filter(|f| **f == Fate::Duplicated).count();
        assert!((1800..2200).contains(&lost), "lost {lost}");
        assert!((300..500).contains(&dup), "duplicated {dup}");
    }

    #[test]
    fn ble_timing_delivers_at_connection_events() {
        let cfg = FaultConfig {
            connection_interval_ms: 30,
            ..FaultConfig::default()
        };
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = FaultyPipe::new(&cfg, 0);
        p.push(t0, 1);
        assert_eq!(p.next_due(), Some(t0 + ms(30)));
        assert_eq!(p.pop_due(t0 + ms(30)), Some(1));
        p.push(t0 + ms(31), 2);
        assert_eq!(p.next_due(), Some(t0 + ms(60)));
        p.push(t0 + ms(59), 3);
        let _ = p.pop_due(t0 + ms(60));
        assert_eq!(
            p.pop_due(t0 + ms(60)),
            Some(3),
            "both go in the event at 60 ms"
        );
    }

    #[test]
    fn cut_after_n_frames() {
        let cfg = FaultConfig {
            disconnect_after_frames: Some(2),
            ..FaultConfig::default()
        };
        let t0 = Instant::now();
        let mut p = FaultyPipe::new(&cfg, 0);
        assert_eq!(p.push(t0, 1), Fate::Queued);
        assert_eq!(p.push(t0, 2), Fate::Queued);
        assert_eq!(p.push(t0, 3), Fate::Disconnect);
    }

    #[test]
    fn reorder_lets_later_frames_pass() {
        let cfg = FaultConfig {
            reorder: 1.0,
            reorder_delay_ms: 50,
            ..FaultConfig::default()
        };
        let t0 = Instant::now();
        let mut p = FaultyPipe::new(&cfg, 0);
        p.push(t0, "held");
        assert_eq!(p.pop_due(t0), None);
        assert_eq!(p.next_due(), Some(t0 + Duration::from_millis(50)));
        // A frame pushed later on a pipe without reordering arrives first.
        let mut clean = FaultyPipe::new(&FaultConfig::default(), 0);
        clean.push(t0 + Duration::from_millis(10), "later");
        assert!(clean.next_due().unwrap() < p.next_due().unwrap());
    }
}
