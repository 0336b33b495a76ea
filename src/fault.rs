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

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
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
    /// many milliseconds (0 = off, and with it every cost below). Applied after delay and
    /// jitter.
    pub connection_interval_ms: u64,
    /// How often the lock advertises: a connection (or a probe) first waits for the hub to hear
    /// it, a uniform `[0, advertising_interval_ms)`.
    pub advertising_interval_ms: u64,
    /// Connection events from the connect request to the link's first event (the transmit
    /// window: at most one interval).
    pub connect_events: u32,
    /// Request/response pairs of the ATT MTU exchange, from the first connection event.
    pub mtu_exchange_round_trips: u32,
    /// Request/response pairs of GATT discovery (primary services, characteristics,
    /// descriptors); a client with the handles cached skips it.
    pub discovery_round_trips: u32,
    /// Request/response pairs of each CCCD write (one subscription).
    pub cccd_round_trips: u32,
    pub seed: u64,
}

impl Default for FaultConfig {
    fn default() -> FaultConfig {
        FaultConfig {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay_ms: 0,
            delay_ms: 0,
            jitter_ms: 0,
            disconnect_after_frames: None,
            disconnect_direction: Direction::Both,
            connection_interval_ms: 0,
            advertising_interval_ms: 150,
            connect_events: 1,
            mtu_exchange_round_trips: 1,
            discovery_round_trips: 6,
            cccd_round_trips: 1,
            seed: 0,
        }
    }
}

/// The connection events of one BLE link: `epoch + k × interval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Events {
    pub epoch: Instant,
    pub interval: Duration,
}

impl Events {
    /// The first event strictly after `at`: a value produced during an event goes out in the
    /// next one.
    pub fn after(&self, at: Instant) -> Instant {
        let since = at.saturating_duration_since(self.epoch);
        let events = since.as_nanos() / self.interval.as_nanos().max(1) + 1;
        self.epoch + self.interval * u32::try_from(events).unwrap_or(u32::MAX)
    }

    /// When the answer to the last of `pairs` back-to-back request/response pairs begun at `at`
    /// arrives: each request goes at the next event and its answer at the one after.
    pub fn round_trips(&self, at: Instant, pairs: u32) -> Instant {
        if pairs == 0 {
            return at;
        }
        self.after(at) + self.interval * (2 * pairs - 1)
    }
}

impl FaultConfig {
    /// The BLE timing model's connection interval, when it is on.
    pub fn interval(&self) -> Option<Duration> {
        (self.connection_interval_ms > 0)
            .then(|| Duration::from_millis(self.connection_interval_ms))
    }

    /// A connection requested at `now`, the lock heard after `heard`: its connection events,
    /// and when the MTU exchange that opens it is done. `None` with the timing model off.
    pub fn connection(&self, now: Instant, heard: Duration) -> Option<(Events, Instant)> {
        let interval = self.interval()?;
        let epoch = now + heard + interval * self.connect_events;
        let events = Events { epoch, interval };
        // The first request goes in the first event itself.
        let ready = match self.mtu_exchange_round_trips {
            0 => epoch,
            n => epoch + interval * (2 * n - 1),
        };
        Some((events, ready))
    }

    /// How long until the hub hears the lock, for a uniform `draw`.
    pub fn advertising_wait(&self, draw: u64) -> Duration {
        match self.advertising_interval_ms {
            0 => Duration::ZERO,
            ms => Duration::from_micros(draw % (ms * 1000)),
        }
    }
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
        // The BLE timing model within what BLE allows (intervals up to 4 s, advertising up to
        // 10.24 s), and counts small enough that no instant computed from them overflows.
        for (name, value, max) in [
            ("connection_interval_ms", self.connection_interval_ms, 4_000),
            (
                "advertising_interval_ms",
                self.advertising_interval_ms,
                10_240,
            ),
            ("connect_events", u64::from(self.connect_events), 16),
            (
                "mtu_exchange_round_trips",
                u64::from(self.mtu_exchange_round_trips),
                16,
            ),
            (
                "discovery_round_trips",
                u64::from(self.discovery_round_trips),
                256,
            ),
            ("cccd_round_trips", u64::from(self.cccd_round_trips), 16),
        ] {
            if value > max {
                return Err(format!("faults.{name}: {value} is more than {max}"));
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
        Events {
            epoch,
            interval: Duration::from_millis(interval),
        }
        .after(at)
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
    fn a_connection_costs_its_events() {
        let cfg = FaultConfig {
            connection_interval_ms: 30,
            ..FaultConfig::default()
        };
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Heard after 40 ms; the first event one interval later; MTU request in it, answer in
        // the next.
        let (events, ready) = cfg.connection(t0, ms(40)).unwrap();
        assert_eq!(events.epoch, t0 + ms(70));
        assert_eq!(ready, t0 + ms(100));
        // Discovery begun at the MTU answer: 6 pairs, the first request at the next event.
        assert_eq!(events.round_trips(ready, 6), t0 + ms(100 + 30 * 12));
        assert_eq!(events.round_trips(ready, 0), ready);
        // A request between events waits for the next one.
        assert_eq!(events.round_trips(t0 + ms(101), 1), t0 + ms(160));
        assert_eq!(
            cfg.advertising_wait(149_999),
            Duration::from_micros(149_999)
        );
        assert_eq!(cfg.advertising_wait(150_000), Duration::ZERO);
        assert!(
            FaultConfig::default().connection(t0, ms(1)).is_none(),
            "model off"
        );
    }

    #[test]
    fn timing_beyond_what_ble_allows_is_refused_by_name() {
        assert!(FaultConfig::default().validate().is_ok());
        let huge = FaultConfig {
            connect_events: u32::MAX,
            ..FaultConfig::default()
        };
        assert!(
            huge.validate()
                .unwrap_err()
                .contains("faults.connect_events")
        );
        let huge = FaultConfig {
            advertising_interval_ms: u64::MAX,
            ..FaultConfig::default()
        };
        assert!(
            huge.validate()
                .unwrap_err()
                .contains("faults.advertising_interval_ms")
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
