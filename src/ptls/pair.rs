//! The deterministic pair harness: two endpoints joined by a seeded faulty link on a virtual
//! clock. [`Pair::step`] does everything due at the current instant, then jumps the clock to the
//! next deadline, so thousands of handshakes with seconds of timeouts run in well under a second.

use std::time::{Duration, Instant};

use super::{Channel, Client, Server, Transmit};
use crate::fault::{Fate, FaultConfig, FaultyPipe};

/// Anything the harness can drive: both PTLS endpoints and the simulator's lock.
pub trait Endpoint {
    fn handle_input(&mut self, now: Instant, channel: Channel, bytes: &[u8]);
    fn handle_timeout(&mut self, now: Instant);
    fn poll_transmit(&mut self) -> Option<Transmit>;
    fn poll_timeout(&self) -> Option<Instant>;
}

impl Endpoint for Client {
    fn handle_input(&mut self, now: Instant, channel: Channel, bytes: &[u8]) {
        Client::handle_input(self, now, channel, bytes)
    }
    fn handle_timeout(&mut self, now: Instant) {
        Client::handle_timeout(self, now)
    }
    fn poll_transmit(&mut self) -> Option<Transmit> {
        Client::poll_transmit(self)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Client::poll_timeout(self)
    }
}

impl Endpoint for Server {
    fn handle_input(&mut self, now: Instant, channel: Channel, bytes: &[u8]) {
        Server::handle_input(self, now, channel, bytes)
    }
    fn handle_timeout(&mut self, now: Instant) {
        Server::handle_timeout(self, now)
    }
    fn poll_transmit(&mut self) -> Option<Transmit> {
        Server::poll_transmit(self)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        Server::poll_timeout(self)
    }
}

/// Frames lost or duplicated by the link, by direction and frame header.
#[derive(Clone, Debug, Default)]
pub struct LinkStats {
    /// `[header & 0x0F]` counts for client→lock and lock→client.
    pub dropped_to_lock: [u32; 16],
    pub dropped_to_client: [u32; 16],
    pub duplicated: u32,
    pub delivered: u32,
}

pub struct Pair<C: Endpoint, S: Endpoint> {
    pub client: C,
    pub lock: S,
    pub now: Instant,
    pub start: Instant,
    to_lock: FaultyPipe<Transmit>,
    to_client: FaultyPipe<Transmit>,
    pub stats: LinkStats,
}

impl<C: Endpoint, S: Endpoint> Pair<C, S> {
    /// Both directions get the same fault model on independent random streams.
    pub fn new(client: C, lock: S, now: Instant, faults: &FaultConfig) -> Self {
        Pair {
            client,
            lock,
            now,
            start: now,
            to_lock: FaultyPipe::new(faults, 1),
            to_client: FaultyPipe::new(faults, 2),
            stats: LinkStats::default(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Do everything due now; if nothing was, advance the clock to the next deadline.
    /// Returns `false` when nothing is pending at all.
    pub fn step(&mut self) -> bool {
        self.step_until(None)
    }

    /// As [`Pair::step`], but never moves the clock past `limit`.
    fn step_until(&mut self, limit: Option<Instant>) -> bool {
        if self.run_now() {
            return true;
        }
        let next = [
            self.to_lock.next_due(),
            self.to_client.next_due(),
            self.client.poll_timeout(),
            self.lock.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        match (next, limit) {
            (Some(t), Some(limit)) if t > limit => {
                self.now = self.now.max(limit);
                false
            }
            (Some(t), _) => {
                self.now = self.now.max(t);
                true
            }
            (None, _) => false,
        }
    }

    /// Step until `done` says so or `limit` of virtual time has passed since the call; the
    /// clock ends at most `limit` later. `done` may poll and react to either endpoint's events.
    pub fn drive(&mut self, limit: Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let until = self.now + limit;
        loop {
            if done(self) {
                return true;
            }
            if !self.step_until(Some(until)) {
                return done(self);
            }
        }
    }

    fn run_now(&mut self) -> bool {
        let now = self.now;
        let mut progressed = false;
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
            progressed = true;
        }
        if self.lock.poll_timeout().is_some_and(|t| t <= now) {
            self.lock.handle_timeout(now);
            progressed = true;
        }
        while let Some(t) = self.client.poll_transmit() {
            let header = t.bytes.first().copied().unwrap_or(0) & 0x0F;
            match self.to_lock.push(now, t) {
                Fate::Dropped | Fate::Disconnect => {
                    self.stats.dropped_to_lock[header as usize] += 1
                }
                Fate::Duplicated => self.stats.duplicated += 1,
                Fate::Queued => {}
            }
            progressed = true;
        }
        while let Some(t) = self.lock.poll_transmit() {
            let header = t.bytes.first().copied().unwrap_or(0) & 0x0F;
            match self.to_client.push(now, t) {
                Fate::Dropped | Fate::Disconnect => {
                    self.stats.dropped_to_client[header as usize] += 1
                }
                Fate::Duplicated => self.stats.duplicated += 1,
                Fate::Queued => {}
            }
            progressed = true;
        }
        if let Some(t) = self.to_lock.pop_due(now) {
            self.stats.delivered += 1;
            self.lock.handle_input(now, t.channel, &t.bytes);
            progressed = true;
        }
        if let Some(t) = self.to_client.pop_due(now) {
            self.stats.delivered += 1;
            self.client.handle_input(now, t.channel, &t.bytes);
            progressed = true;
        }
        progressed
    }
}

/// Keys, a certificate and configured endpoints made from one seed, for tests and benchmarks.
pub struct Fixture {
    pub authority: p256::ecdsa::SigningKey,
    pub lock_key: p256::ecdsa::SigningKey,
    pub client_key: p256::ecdsa::SigningKey,
    pub device_id: u32,
    /// The wall clock at the harness's start instant.
    pub unix_ms: u64,
}

/// 2026-11-21T00:00:00Z, a fixed wall clock for reproducible certificates and AUTH values.
pub const FIXTURE_UNIX_MS: u64 = 1_795_219_200_000;

impl Fixture {
    pub fn new(seed: u64) -> Fixture {
        use rand_core::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Fixture {
            authority: p256::ecdsa::SigningKey::random(&mut rng),
            lock_key: p256::ecdsa::SigningKey::random(&mut rng),
            client_key: p256::ecdsa::SigningKey::random(&mut rng),
            device_id: 4242,
            unix_ms: FIXTURE_UNIX_MS,
        }
    }

    pub fn certificate(&self, permissions: u32) -> Vec<u8> {
        use super::cert::AccessCertificate;
        AccessCertificate {
            device_id: self.device_id,
            not_before_ms: self.unix_ms - 3_600_000,
            not_after_ms: self.unix_ms + super::cert::DEFAULT_VALIDITY_DAYS * 86_400_000,
            permissions,
            client_id: [0x11; 16],
            client_public_key: AccessCertificate::client_key_point(self.client_key.verifying_key()),
        }
        .sign(&self.authority)
    }

    pub fn client_config(&self) -> super::ClientConfig {
        super::ClientConfig {
            signing_key: self.client_key.clone(),
            certificate: self.certificate(super::cert::PERM_ALL),
            lock_public_key: *self.lock_key.verifying_key(),
            att_mtu: 247,
            timing: super::ClientTiming::default(),
        }
    }

    pub fn server_config(&self) -> super::ServerConfig {
        super::ServerConfig::new(
            self.lock_key.clone(),
            *self.authority.verifying_key(),
            self.device_id,
        )
    }

    pub fn rng(seed: u64) -> super::Rng {
        use rand_core::SeedableRng;
        Box::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }

    /// A lock with trusted time at `now`, registered.
    pub fn server(&self, config: super::ServerConfig, seed: u64, now: Instant) -> Server {
        let mut server = Server::new(config, Self::rng(seed), now);
        server.set_trusted_time(Some(super::WallClock {
            at: now,
            unix_ms: self.unix_ms,
        }));
        server
    }

    /// A started client.
    pub fn client(&self, config: super::ClientConfig, seed: u64, now: Instant) -> Client {
        let mut client = Client::new(config, Self::rng(seed)).expect("fixture MTU is valid");
        client.start(now, self.unix_ms);
        client
    }

    /// A client and a lock joined by `faults`, the client already started.
    pub fn pair(&self, seed: u64, faults: &FaultConfig) -> Pair<Client, Server> {
        let now = Instant::now();
        let lock = self.server(self.server_config(), seed.wrapping_mul(2) + 1, now);
        let client = self.client(self.client_config(), seed.wrapping_mul(2), now);
        Pair::new(client, lock, now, faults)
    }

    /// A client and a lock stopped part-way through their handshake: `frames` frames delivered
    /// (hello, server hello, server verify, …), or fewer if it ends first. Tests and fuzz
    /// targets feed bad bytes to either side at that point.
    pub fn endpoints_after(&self, seed: u64, frames: usize) -> (Client, Server, Instant) {
        let mut p = self.pair(seed, &FaultConfig::default());
        let now = p.now;
        let mut delivered = 0;
        while delivered < frames && !p.client.is_established() {
            if let Some(t) = p.client.poll_transmit() {
                p.lock.handle_input(now, t.channel, &t.bytes);
            } else if let Some(t) = p.lock.poll_transmit() {
                p.client.handle_input(now, t.channel, &t.bytes);
            } else {
                break;
            }
            delivered += 1;
        }
        let Pair { client, lock, .. } = p;
        (client, lock, now)
    }
}
