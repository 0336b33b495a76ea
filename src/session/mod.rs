//! One session per lock (design §1, §3, §4): connect within a slot, handshake (with the
//! trusted-time flow), track state from notifications, run commands one at a time with their
//! outcome rules, keep the link warm or drop it by policy, and reconnect with backoff.
//!
//! [`core`] decides all of it, sans-IO, on explicit time; [`shell`] is the one async loop that
//! feeds it and carries out what it asks. The at-most-once rule lives in the core: an
//! actuating command's id is made durable, then the command is written once; without a
//! response the outcome is `ambiguous` with the state read back afterwards — on this link if
//! it is still up, else on the next one — and the command is never written again.

pub mod core;
mod shell;

pub use shell::Session;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use p256::ecdsa::{SigningKey, VerifyingKey};

use crate::command::Command;
use crate::config::LockEntry;
use crate::credentials::CredentialProvider;
use crate::ledger::Ledger;
use crate::registry::Registry;
use crate::slots::Slots;

/// A command for this session's lock.
#[derive(Debug)]
pub struct Job {
    pub command: Command,
    /// A read already asked once on a session that lost its answer.
    pub retried: bool,
}

/// Everything a session needs, given by the supervisor.
#[derive(Clone)]
pub struct SessionParams {
    pub entry: LockEntry,
    /// The configured key; `None` when the credentials provider supplies it.
    pub lock_key: Option<VerifyingKey>,
    pub gateway_key: SigningKey,
    pub credentials: Arc<dyn CredentialProvider>,
    pub slots: Slots,
    pub registry: Arc<Registry>,
    pub ledger: Arc<Ledger>,
    pub att_mtu: u16,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Commands that may wait behind the one in flight; more are `failed: queue-full`.
    pub queue_depth: usize,
    /// How many wait now, for the metrics.
    pub queued: Arc<AtomicUsize>,
    /// Unix ms of this task's last loop iteration, for the liveness check.
    pub heartbeat: Arc<AtomicU64>,
}
