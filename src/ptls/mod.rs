//! PTLS, the lock protocol (`../shared/ptls-spec.md`), as a sans-IO core.
//!
//! Both endpoints — [`Client`] (the gateway) and [`Server`] (the lock, used by the simulator) —
//! are plain state machines. They never read a clock, never touch a socket and never ask the OS
//! for randomness: the caller passes `now` into every input and hands each endpoint a seeded or
//! OS-backed RNG when it is made. That makes every timed behaviour reproducible on a virtual
//! clock (see [`pair`]).
//!
//! The contract, the same on both types:
//! - **inputs**: `handle_input(now, channel, bytes)` for each value received on a
//!   characteristic, `handle_timeout(now)` once `now` reaches `poll_timeout()`;
//! - **mutators**: `start`, `send_command`, `send_response`, `close`, …;
//! - **outputs**: after every input or mutator, drain `poll_transmit()` (frames to write, each
//!   for one characteristic), then `poll_event()`, then re-arm the timer from `poll_timeout()`.
//!
//! Modules: [`wire`] (frames and handshake messages), [`crypto`] (key schedule, records),
//! [`api`] (opcodes, states, alerts), [`cert`] (the access certificate the lock checks),
//! [`timer`] (the timer table and the flight backoff), [`gatt`] (UUIDs).

pub mod api;
pub mod cert;
pub mod client;
pub mod crypto;
pub mod gatt;
pub mod pair;
mod server;
pub mod timer;
pub mod wire;

use std::time::{Duration, Instant};

pub use api::Alert;
pub use client::{Client, ClientConfig, ClientTiming, Event, Unanswered};
pub use server::{DisconnectReason, Server, ServerConfig, ServerEvent};
pub use wire::Channel;

use cert::CertError;
use wire::Malformed;

/// The RNG an endpoint draws randoms, ephemeral keys and session ids from.
pub type Rng = Box<dyn rand_core::CryptoRngCore + Send>;

/// One frame to write on one characteristic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub channel: Channel,
    pub bytes: Vec<u8>,
}

/// A wall-clock reading tied to a monotonic instant, so that Unix time can be derived from
/// `now` without reading a clock inside the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    pub at: Instant,
    pub unix_ms: u64,
}

impl WallClock {
    pub fn unix_ms_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.at);
        self.unix_ms
            .saturating_add(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Why a handshake attempt or a session failed. Each peer fault has its own variant.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("peer sent a {0}")]
    Malformed(#[from] Malformed),
    #[error("unexpected {header:#04x} frame on {channel} while {state}", channel = .channel.name())]
    UnexpectedFrame {
        channel: Channel,
        header: u8,
        state: &'static str,
    },
    #[error("lock's server hello offers MTU {0}, too small to carry client verify")]
    ServerMtuTooSmall(u8),
    #[error("server verify does not authenticate (tag)")]
    ServerVerifyTag,
    #[error("server verify carries a hello hash that differs from ours")]
    HelloHashMismatch,
    #[error("server verify echoes another AUTH than the one sent")]
    AuthMismatch,
    #[error("lock signature SIG_S does not verify under the configured lock public key")]
    BadLockSignature,
    #[error("client verify does not authenticate (tag)")]
    ClientVerifyTag,
    #[error("client verify carries a hash that differs from ours")]
    ClientVerifyHashMismatch,
    #[error("client signature SIG_C does not verify under the certificate's key")]
    BadClientSignature,
    #[error("client verify exceeds the reassembly limit of 1024 bytes")]
    ReassemblyOverflow,
    #[error("client verify fragment out of phase")]
    FragmentOutOfPhase,
    #[error("certificate refused: {0}")]
    Certificate(CertError),
    #[error("record on {} does not authenticate (tag or counter)", .0.name())]
    RecordTag(Channel),
    #[error("encrypted frame without a session")]
    NoSession,
    #[error("record counter space used up")]
    CountersExhausted,
    #[error("session reached its re-handshake age")]
    SessionAged,
    #[error("peer sent ALERT {0}")]
    Alert(Alert),
    #[error("flight unanswered after all retransmissions")]
    FlightUnanswered,
    #[error("handshake deadline passed")]
    HandshakeDeadline,
    #[error("handshake failed after {attempts} attempts; last: {last}")]
    HandshakeFailed { attempts: u8, last: Box<Error> },
    #[error("ATT MTU {0} is below the minimum of 156 (hello must fit one value)")]
    MtuTooSmall(u16),
    #[error("lock refused the signed time (result {0:#04x})")]
    SignedTimeRejected(u8),
    #[error("lock keeps asking for trusted time after it accepted a signed time")]
    TrustedTimeNotKept,
    #[error("closed locally")]
    ClosedLocally,
}

pub(crate) const DEFAULT_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
