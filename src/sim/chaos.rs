//! Seeded faults at random times: the simulator's chaos schedule (the `[chaos]` table).
//!
//! Sans-IO like the link fault model: [`Chaos::poll`] at `now` says which fault hits which lock
//! once its instant has come, and [`Chaos::next_at`] says when to ask again. The socket server
//! carries the faults out; the soak test runs the whole gateway under them.

use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChaosConfig {
    /// Mean time between two faults anywhere in the world; 0 turns chaos off. Each gap is
    /// drawn uniformly from half to one and a half times this.
    pub mean_interval_ms: u64,
    /// Relative weights of the faults (0 leaves one out). `door` opens a closed door and
    /// closes an open one (locks with a door sensor); `button` presses the lock's button.
    /// Both are off by default: they move locks without a command.
    pub loss_burst: f64,
    pub disconnect: f64,
    pub reboot: f64,
    pub lose_time: f64,
    pub door: f64,
    pub button: f64,
    /// How long a loss burst drops every value to and from its lock.
    pub loss_burst_ms: u64,
    /// How long a rebooting lock refuses connections.
    pub reboot_ms: u64,
    pub seed: u64,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig {
            mean_interval_ms: 0,
            loss_burst: 1.0,
            disconnect: 1.0,
            reboot: 1.0,
            lose_time: 1.0,
            door: 0.0,
            button: 0.0,
            loss_burst_ms: 2_000,
            reboot_ms: 1_500,
            seed: 0,
        }
    }
}

impl ChaosConfig {
    pub fn validate(&self) -> Result<(), String> {
        let weights = [
            self.loss_burst,
            self.disconnect,
            self.reboot,
            self.lose_time,
            self.door,
            self.button,
        ];
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err("chaos: weights must be 0 or more".into());
        }
        if self.mean_interval_ms > 0 && weights.iter().sum::<f64>() <= 0.0 {
            return Err("chaos: mean_interval_ms is set but every weight is 0".into());
        }
        Ok(())
    }
}

/// One fault of the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every value to and from the lock is lost for this long.
    LossBurst(Duration),
    /// Every link of the lock drops (a supervision timeout).
    Disconnect,
    /// The lock restarts: links and sessions gone, clock lost, off the air for this long.
    Reboot(Duration),
    /// The lock forgets its clock and asks connected clients for the time.
    LoseTime,
    /// The door opens if closed, closes if open.
    Door,
    /// Someone presses the lock's button.
    Button,
}

impl Fault {
    pub fn name(&self) -> &'static str {
        match self {
            Fault::LossBurst(_) => "loss-burst",
            Fault::Disconnect => "disconnect",
            Fault::Reboot(_) => "reboot",
            Fault::LoseTime => "lose-time",
            Fault::Door => "door",
            Fault::Button => "button",
        }
    }
}

pub struct Chaos {
    config: ChaosConfig,
    locks: usize,
    rng: ChaCha8Rng,
    next: Option<Instant>,
}

impl Chaos {
    /// A schedule over `locks` locks starting at `now`; it never fires if chaos is off.
    pub fn new(config: ChaosConfig, locks: usize, now: Instant) -> Chaos {
        let mut c = Chaos {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            config,
            locks,
            next: None,
        };
        c.next = c.gap().map(|g| now + g);
        c
    }

    fn gap(&mut self) -> Option<Duration> {
        let mean = self.config.mean_interval_ms;
        if mean == 0 || self.locks == 0 {
            return None;
        }
        let ms = mean / 2 + self.rng.next_u64() % (mean + 1);
        Some(Duration::from_millis(ms.max(1)))
    }

    /// When the next fault is due.
    pub fn next_at(&self) -> Option<Instant> {
        self.next
    }

    /// The fault due at `now` and the index of the lock it hits.
    pub fn poll(&mut self, now: Instant) -> Option<(usize, Fault)> {
        self.next.filter(|at| *at <= now)?;
        self.next = self.gap().map(|g| now + g);
        let c = &self.config;
        let weights = [
            c.loss_burst,
            c.disconnect,
            c.reboot,
            c.lose_time,
            c.door,
            c.button,
        ];
        let total: f64 = weights.iter().sum();
        let mut pick = (self.rng.next_u64() as f64 / u64::MAX as f64) * total;
        let mut kind = 0;
        for (i, w) in weights.iter().enumerate() {
            if *w > 0.0 {
                kind = i;
                if pick < *w {
                    break;
                }
                pick -= w;
            }
        }
        let fault = match kind {
            0 => Fault::LossBurst(Duration::from_millis(c.loss_burst_ms)),
            1 => Fault::Disconnect,
            2 => Fault::Reboot(Duration::from_millis(c.reboot_ms)),
            3 => Fault::LoseTime,
            4 => Fault::Door,
            _ => Fault::Button,
        };
        let lock = (self.rng.next_u64() % self.locks as u64) as usize;
        Some((lock, fault))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(
        config: ChaosConfig,
        locks: usize,
        span: Duration,
    ) -> Vec<(Duration, usize, Fault)> {
        let t0 = Instant::now();
        let mut chaos = Chaos::new(config, locks, t0);
        let mut out = Vec::new();
        while let Some(at) = chaos.next_at().filter(|at| *at < t0 + span) {
            let (lock, fault) = chaos.poll(at).unwrap();
            out.push((at - t0, lock, fault));
        }
        out
    }

    #[test]
    fn off_by_default_and_seeded_when_on() {
        assert!(schedule(ChaosConfig::default(), 4, Duration::from_secs(60)).is_empty());
        let on = ChaosConfig {
            mean_interval_ms: 1_000,
            seed: 7,
            ..Default::default()
        };
        let a = schedule(on.clone(), 4, Duration::from_secs(60));
        assert_eq!(a, schedule(on, 4, Duration::from_secs(60)));
        // About one a second, every gap within half to one and a half means.
        assert!((45..=75).contains(&a.len()), "{}", a.len());
        for w in a.windows(2) {
            let gap = w[1].0 - w[0].0;
            assert!(gap >= Duration::from_millis(500) && gap <= Duration::from_millis(1_500));
        }
        // Every lock and every kind of fault comes up.
        for lock in 0..4 {
            assert!(a.iter().any(|f| f.1 == lock));
        }
        for name in ["loss-burst", "disconnect", "reboot", "lose-time"] {
            assert!(a.iter().any(|f| f.2.name() == name), "{name}");
        }
    }

    #[test]
    fn weights_choose_the_faults() {
        let only_reboots = ChaosConfig {
            mean_interval_ms: 100,
            loss_burst: 0.0,
            disconnect: 0.0,
            lose_time: 0.0,
            reboot_ms: 900,
            ..Default::default()
        };
        let a = schedule(only_reboots, 2, Duration::from_secs(10));
        assert!(!a.is_empty());
        assert!(
            a.iter()
                .all(|f| f.2 == Fault::Reboot(Duration::from_millis(900)))
        );
        let none = ChaosConfig {
            mean_interval_ms: 100,
            loss_burst: 0.0,
            disconnect: 0.0,
            reboot: 0.0,
            lose_time: 0.0,
            ..Default::default()
        };
        assert!(none.validate().is_err());
        let negative = ChaosConfig {
            reboot: -1.0,
            ..Default::default()
        };
        assert!(negative.validate().is_err());
    }

    #[test]
    fn a_late_poll_does_not_fire_a_backlog() {
        let t0 = Instant::now();
        let mut chaos = Chaos::new(
            ChaosConfig {
                mean_interval_ms: 100,
                ..Default::default()
            },
            1,
            t0,
        );
        // Asked a minute late (a stalled process): one fault now, the next a gap later.
        let late = t0 + Duration::from_secs(60);
        assert!(chaos.poll(late).is_some());
        assert!(chaos.poll(late).is_none());
        assert!(chaos.next_at().unwrap() > late);
    }
}
