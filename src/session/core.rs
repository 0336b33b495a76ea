//! The per-lock session as a state machine (design §3, §4), with the contract of
//! [`ptls::Client`]: inputs are `handle_*` calls with the time they happen at, outputs are
//! [`Action`]s drained with [`Core::poll_action`] and one wake-up, [`Core::poll_timeout`]. No
//! tokio, no sockets, no clock reads: the shell ([`super::shell`]) carries the actions out.
//!
//! The rules that make a command safe live here, each proven by the tests below:
//!
//! - a command whose deadline passes before it could be written is `expired`, never written
//!   (`a_deadline_passing_before_the_slot_comes_is_expired_and_never_sent`);
//! - an actuating command is made durable ([`Action::Record`]) before it is written, written
//!   once, and a missing record stops it (`a_record_that_cannot_be_written_is_state_store`);
//! - an actuating command without a response is `ambiguous` with the state read back, on this
//!   link or the next, and never written again (`a_lost_response_is_ambiguous_with_the_state_read_back`,
//!   `a_link_lost_after_sending_reads_the_state_back_on_the_next_link`);
//! - a read without an answer is asked once more on a fresh session, then `unreachable`;
//! - one command at a time, the next behind it (`a_second_command_waits_for_the_first`);
//! - every command gets exactly one terminal outcome, shutting down included
//!   (`shutdown_finishes_what_is_in_flight_and_fails_what_never_left`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::backoff::Backoff;
use crate::command::{Outcome, Reason, StateReading};
use crate::config::{LinkPolicy, LockEntry};
use crate::ptls::api::{self, Battery, LockStatus, Notification, StatusChange, op, result};
use crate::ptls::timer::TimerTable;
use crate::ptls::{self, Alert, Event};
use crate::registry::{GatewayEvent, LinkStatus, LockView};
use crate::slots::Priority;

use super::Job;

/// Reconnecting after a failed attempt: 1 s doubling to 60 s, each wait drawn in its upper half.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How soon to try again while the credentials provider fetches what the handshake needs.
const PENDING_RETRY: Duration = Duration::from_secs(1);
/// A session holding a slot keeps it at least this long before yielding to a waiter.
const MIN_HOLD: Duration = Duration::from_secs(2);
/// How long after an accepted movement to wait for the bolt to stop.
const MOTION_LIMIT: Duration = Duration::from_secs(30);
/// How long to wait for a first state notification after an accepted movement.
const MOTION_GRACE: Duration = Duration::from_millis(800);
/// How long an ambiguous command may wait for a new link to read the state back.
const READBACK_LIMIT: Duration = Duration::from_secs(30);
/// How long a session that is re-handshaking may take to come back.
const REESTABLISH_LIMIT: Duration = Duration::from_secs(35);
/// A certificate's lifetime as lockbridge records it in the view (the lock enforces its own).
const SESSION_LIFETIME_MS: u64 = 24 * 3_600_000;

/// The instant an input happens at: monotonic for timers, wall clock for what is shown.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub at: Instant,
    pub unix_ms: u64,
}

/// What the core needs to know of its lock's configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub id: String,
    pub policy: LinkPolicy,
    pub keepalive: Duration,
    pub idle: Duration,
    pub refresh: Duration,
    /// On-demand locks between uses: listen for the advertisement this often (`None`: off).
    pub presence: Option<Duration>,
    /// Commands that may wait behind the one in flight.
    pub queue_depth: usize,
}

impl Settings {
    pub fn from_entry(entry: &LockEntry, queue_depth: usize) -> Settings {
        let presence = (entry.link == LinkPolicy::OnDemand && entry.presence_s > 0)
            .then(|| Duration::from_secs(entry.presence_s));
        Settings {
            id: entry.id.clone(),
            policy: entry.link,
            keepalive: Duration::from_secs(entry.keepalive_s),
            idle: Duration::from_secs(entry.idle_disconnect_s),
            refresh: Duration::from_secs(entry.refresh_s),
            presence,
            queue_depth,
        }
    }
}

/// Which certificate the next connection presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateChoice {
    /// The one held, unless the provider says it is due for renewal.
    Cached,
    /// Ask the provider again (after the operator asked to try again).
    Reload,
    /// A freshly fetched one: the lock refused the last (ALERT 0x05).
    Fresh,
}

/// What the shell does for the core, in order.
#[derive(Clone, Debug)]
pub enum Action {
    /// A slot is held: connect, start a handshake, answer with [`Core::handle_link`].
    Connect {
        certificate: CertificateChoice,
    },
    /// Make this actuating command's id durable, then answer with [`Core::handle_recorded`];
    /// it is written only after that.
    Record(crate::command::Command),
    /// Write `OPCODE ‖ PARAMS` on the session; `command` is the user's command it carries
    /// (`None` for the gateway's own reads). If the client refuses it, [`Core::handle_not_sent`].
    Send {
        body: Vec<u8>,
        command: Option<crate::command::Command>,
    },
    /// Obtain a signed time and send it; if there is none, [`Core::handle_no_signed_time`].
    SignedTime,
    /// Leave on purpose (ALERT 0x04), drop the link and give the slot back.
    Close,
    /// Listen for the lock's advertisement; answer with [`Core::handle_probe`].
    Probe,
    /// Ask the credentials provider why the lock refused its certificate; answer with
    /// [`Core::handle_diagnosis`].
    Diagnose,
    /// No more attempts until the operator asks ([`Core::handle_retry`]): note where the
    /// provider's retry generation stands.
    Park,
    /// A command's one terminal outcome.
    Finish {
        command: crate::command::Command,
        outcome: Outcome,
    },
    /// A change to the lock's view, at this wall-clock instant.
    View {
        at_ms: u64,
        change: ViewChange,
    },
    /// Something went right with the lock (the stall detector's input).
    Progress {
        at_ms: u64,
    },
    Publish(GatewayEvent),
}

/// One change to a lock's view.
#[derive(Clone, Debug, PartialEq)]
pub enum ViewChange {
    Status {
        status: LinkStatus,
        error: Option<String>,
    },
    SessionUp {
        rssi: Option<i16>,
        at_ms: u64,
    },
    State(LockStatus),
    StatusChange(StatusChange),
    Battery(Battery),
    Charging(bool),
}

impl ViewChange {
    pub fn apply(&self, v: &mut LockView) {
        match self {
            ViewChange::Status { status, error } => {
                v.status = *status;
                v.available = !matches!(
                    status,
                    LinkStatus::Unreachable
                        | LinkStatus::NotRegistered
                        | LinkStatus::InvalidCert
                        | LinkStatus::Stopped
                );
                if *status != LinkStatus::Connected {
                    v.session_established_ms = None;
                    v.session_expires_ms = None;
                }
                if error.is_some() {
                    v.last_error.clone_from(error);
                }
            }
            ViewChange::SessionUp { rssi, at_ms } => {
                if rssi.is_some() {
                    v.rssi = *rssi;
                }
                v.status = LinkStatus::Connected;
                v.available = true;
                v.last_error = None;
                v.session_established_ms = Some(*at_ms);
                v.session_expires_ms = Some(at_ms.saturating_add(SESSION_LIFETIME_MS));
            }
            ViewChange::State(s) => {
                v.state = Some(s.state);
                v.jammed = s.jammed;
            }
            ViewChange::StatusChange(change) => {
                v.state = Some(change.state);
                v.jammed = change.jammed;
                if let Some(cause) = change.cause {
                    v.door = Some(cause.door);
                    v.last_trigger = Some(api::trigger::name(cause.trigger));
                    v.last_access_id = Some(cause.access_id);
                }
            }
            ViewChange::Battery(b) => {
                v.battery = Some(b.level);
                v.charging = b.charging;
            }
            ViewChange::Charging(on) => v.charging = *on,
        }
    }
}

/// What happened to the link the shell holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// Connected; the handshake has started.
    Up { rssi: Option<i16> },
    /// No link: the connection could not be made (`pending`: the credentials provider is
    /// fetching what it needs, so the next try comes soon).
    Failed { reason: String, pending: bool },
    /// The link went away.
    Down { reason: String },
    /// The write that carried the command just sent provably never reached the lock.
    NotDelivered { reason: String },
}

/// A connection slot, as the shell sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotChange {
    /// Every slot is taken: this lock waits for one.
    Full,
    Granted,
    /// How many other locks wait for a slot.
    Waiters(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    /// The earliest deadline of a waiting command or read-back.
    Deadline,
    /// The next connection attempt after a failure.
    Retry,
    /// On-demand between uses: the next refresh.
    Refresh,
    /// On-demand between uses: the next presence probe.
    Probe,
    /// Persistent: the next keep-alive GET_STATE.
    Keepalive,
    /// On-demand: drop the link when nothing happened for `idle`.
    Idle,
    /// Another lock waits for a slot: give this one up.
    Yield,
    /// After an accepted movement: how long to wait for the bolt to stop.
    Settle,
    /// A re-handshaking session that does not come back in time.
    Reestablish,
}

const TIMERS: [Timer; 9] = [
    Timer::Deadline,
    Timer::Retry,
    Timer::Refresh,
    Timer::Probe,
    Timer::Keepalive,
    Timer::Idle,
    Timer::Yield,
    Timer::Settle,
    Timer::Reestablish,
];

/// Why the gateway asked the lock something.
#[derive(Debug)]
enum Purpose {
    /// The user's command itself.
    Command(Job),
    /// GET_STATE after an actuating command got no response.
    AfterUnanswered(Job, String),
    /// GET_STATE on a new link for a command left ambiguous on the last.
    ReadBack(Job, String),
    /// GET_STATE after an accepted movement whose stop was not reported.
    Settled(Job),
    RefreshState,
    RefreshBattery,
    Keepalive,
}

#[derive(Debug)]
enum Busy {
    Free,
    /// Waiting for [`Core::handle_recorded`].
    Recording(Job),
    /// A request is out; its response or its absence is awaited.
    Asking {
        opcode: u8,
        purpose: Purpose,
    },
    /// The lock accepted a movement: waiting for LOCK_STATUS_CHANGE to a stable state.
    Settling {
        job: Job,
        started: Instant,
    },
}

#[derive(Debug)]
enum Phase {
    /// No link.
    Offline,
    /// [`Action::Connect`] is out.
    Connecting,
    /// The link is up; the handshake runs.
    Handshaking {
        rssi: Option<i16>,
    },
    /// A session came up on this link; `established` is false while it re-handshakes.
    Ready {
        held_since: Instant,
        established: bool,
        busy: Busy,
    },
    Stopped,
}

/// Work the session owes once it is free, set by timers.
#[derive(Debug, Default)]
struct Due {
    refresh: bool,
    keepalive: bool,
    idle: bool,
    yield_slot: bool,
}

/// A command written before its link went away, waiting for a link to read the state back.
#[derive(Debug)]
struct ReadBack {
    job: Job,
    until: Instant,
    reason: String,
}

pub struct Core {
    s: Settings,
    phase: Phase,
    timers: TimerTable<Timer, 9>,
    actions: VecDeque<Action>,
    pending: VecDeque<Job>,
    readback: Option<ReadBack>,
    due: Due,
    stopping: bool,
    /// Set after NOT_REGISTERED or a second INVALID_CERT: no retries until the operator asks.
    parked: Option<Reason>,
    /// The lock refused a certificate once; the next connection presents a fresh one.
    cert_refused: bool,
    reload_certificate: bool,
    backoff: Backoff,
    rng: ChaCha8Rng,
    next_refresh: Instant,
    /// Why an on-demand lock between uses is thought unreachable; `None` while it is heard.
    absent: Option<String>,
    /// `next_refresh` has come (as of the last input).
    refresh_wanted: bool,
    state_known: bool,
    battery: Option<u8>,
    waiters: usize,
    /// The status last put in the view, so it is set once per change.
    shown: Option<(LinkStatus, Option<String>)>,
}

impl Core {
    /// `seed` spreads the reconnection waits (any random number; fixed in tests).
    pub fn new(settings: Settings, now: Now, seed: u64) -> Core {
        let mut core = Core {
            s: settings,
            phase: Phase::Offline,
            timers: TimerTable::new(TIMERS),
            actions: VecDeque::new(),
            pending: VecDeque::new(),
            readback: None,
            due: Due::default(),
            stopping: false,
            parked: None,
            cert_refused: false,
            reload_certificate: false,
            backoff: Backoff::new(BACKOFF_MIN, BACKOFF_MAX),
            rng: ChaCha8Rng::seed_from_u64(seed),
            next_refresh: now.at,
            absent: None,
            refresh_wanted: true,
            state_known: false,
            battery: None,
            waiters: 0,
            shown: None,
        };
        core.advance(now);
        core
    }

    fn id(&self) -> &str {
        &self.s.id
    }

    // --- outputs ---

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.earliest().map(|(at, _)| at)
    }

    /// Whether the core waits for a connection slot, and at what priority.
    pub fn wants_slot(&self) -> Option<Priority> {
        if !matches!(self.phase, Phase::Offline)
            || self.parked.is_some()
            || self.stopping
            || self.timers.get(Timer::Retry).is_some()
            || !self.needs_link()
        {
            return None;
        }
        Some(if self.pending.is_empty() && self.readback.is_none() {
            Priority::Background
        } else {
            Priority::Command
        })
    }

    /// Commands waiting behind the one in flight.
    pub fn queued(&self) -> usize {
        self.pending.len()
    }

    pub fn is_parked(&self) -> bool {
        self.parked.is_some()
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    // --- inputs ---

    pub fn handle_job(&mut self, now: Now, job: Job) {
        match (&self.phase, self.parked) {
            (Phase::Stopped, _) => self.finish(job, Outcome::failed(Reason::ShuttingDown)),
            (_, Some(reason)) => self.finish(job, Outcome::failed(reason)),
            // Never left the gateway (a lock that is busy says `busy` itself).
            _ if self.pending.len() >= self.s.queue_depth => {
                self.finish(job, Outcome::failed(Reason::QueueFull))
            }
            _ => self.pending.push_back(job),
        }
        self.advance(now);
    }

    pub fn handle_slot(&mut self, now: Now, change: SlotChange) {
        match change {
            SlotChange::Full => {
                if self.wants_slot().is_some() {
                    self.show(now, LinkStatus::WaitingForSlot, None);
                }
            }
            SlotChange::Granted => {
                if self.wants_slot().is_none() {
                    // Not needed any more (its commands expired meanwhile): give it back.
                    self.actions.push_back(Action::Close);
                } else {
                    self.show(now, LinkStatus::Connecting, None);
                    let certificate = if self.cert_refused {
                        CertificateChoice::Fresh
                    } else if std::mem::take(&mut self.reload_certificate) {
                        CertificateChoice::Reload
                    } else {
                        CertificateChoice::Cached
                    };
                    self.phase = Phase::Connecting;
                    self.actions.push_back(Action::Connect { certificate });
                }
            }
            SlotChange::Waiters(n) => {
                self.waiters = n;
                self.arm_yield(now);
            }
        }
        self.advance(now);
    }

    pub fn handle_link(&mut self, now: Now, change: LinkChange) {
        match (&self.phase, change) {
            (Phase::Connecting, LinkChange::Up { rssi }) => {
                self.phase = Phase::Handshaking { rssi };
                if self.stopping {
                    self.close_link();
                }
            }
            (Phase::Connecting, LinkChange::Failed { reason, pending }) => {
                self.phase = Phase::Offline;
                self.retry_later(now, reason, pending);
            }
            (Phase::Handshaking { .. }, LinkChange::Down { reason })
            | (Phase::Handshaking { .. }, LinkChange::NotDelivered { reason }) => {
                self.close_link();
                self.retry_later(now, format!("handshake failed: link lost: {reason}"), false);
            }
            (Phase::Ready { .. }, LinkChange::Down { reason }) => {
                self.link_lost(now, format!("link lost: {reason}"));
            }
            (Phase::Ready { .. }, LinkChange::NotDelivered { reason }) => {
                match self.take_busy() {
                    Busy::Asking {
                        purpose: Purpose::Command(job),
                        ..
                    } => {
                        // Provably never reached the lock: unreachable, not ambiguous.
                        self.finish(job, Outcome::failed(Reason::Unreachable));
                    }
                    // Anything else in progress is settled by the link loss, as for any other.
                    other @ (Busy::Free
                    | Busy::Recording(_)
                    | Busy::Asking { .. }
                    | Busy::Settling { .. }) => self.set_busy(other),
                }
                self.link_lost(now, format!("write not delivered: {reason}"));
            }
            (phase, change) => {
                log::debug!(LOCK_ID = self.id(); "lock {}: {change:?} while {phase:?}; ignored", self.id());
            }
        }
        self.advance(now);
    }

    /// What the session's [`ptls::Client`] reported.
    pub fn handle_event(&mut self, now: Now, event: Event) {
        match event {
            Event::Established { session_id } => self.on_established(now, session_id),
            Event::SessionEnded { reason } => {
                log::info!(LOCK_ID = self.id(); "lock {}: session ended ({reason}); re-handshaking", self.id());
                if let Phase::Ready { established, .. } = &mut self.phase {
                    *established = false;
                    self.timers
                        .set(Timer::Reestablish, now.at + REESTABLISH_LIMIT);
                }
            }
            Event::HandshakeRetry { attempt, reason } => {
                log::debug!(LOCK_ID = self.id(); "lock {}: handshake attempt {attempt} failed ({reason}); trying again", self.id());
            }
            Event::NeedSignedTime => {
                if matches!(self.phase, Phase::Handshaking { .. }) {
                    log::info!(LOCK_ID = self.id(); "lock {}: no trusted time; sending a signed time", self.id());
                }
                self.actions.push_back(Action::SignedTime);
            }
            Event::SignedTimeAccepted => {
                log::info!(LOCK_ID = self.id(); "lock {}: the lock accepted the signed time", self.id());
            }
            Event::Response(r) => match &self.phase {
                Phase::Ready {
                    busy: Busy::Asking { opcode, .. },
                    ..
                } if *opcode == r.opcode => self.on_answer(now, Ok(r)),
                Phase::Offline
                | Phase::Connecting
                | Phase::Handshaking { .. }
                | Phase::Ready { .. }
                | Phase::Stopped => {
                    log::debug!(LOCK_ID = self.id(); "lock {}: a response to {:#04x} nobody waits for; ignored", self.id(), r.opcode);
                }
            },
            Event::LateResponse(r) => {
                log::warn!(LOCK_ID = self.id(); "lock {}: {} answered {} after it was given up: it did reach the lock",
                    self.id(), op::name(r.opcode), result::name(r.result));
            }
            Event::CommandUnanswered { opcode, why } => {
                let asking = matches!(&self.phase, Phase::Ready { busy: Busy::Asking { opcode: o, .. }, .. } if *o == opcode);
                if asking {
                    self.on_answer(now, Err(format!("no response ({why:?})")));
                }
            }
            Event::Notification { id, params } => self.on_notification(now, id, &params),
            Event::PlainNotification { id, .. } => {
                log::debug!(LOCK_ID = self.id(); "lock {}: plaintext notification {id:#04x}", self.id());
            }
            Event::AlertReceived(alert) => {
                self.actions.push_back(Action::Publish(GatewayEvent::Alert {
                    lock: self.id().to_string(),
                    code: alert.byte(),
                    name: alert.to_string(),
                }))
            }
            Event::Closed(e) => match self.phase {
                Phase::Handshaking { .. } => self.handshake_closed(now, e),
                Phase::Ready { .. } => self.link_lost(now, e.to_string()),
                Phase::Offline | Phase::Connecting | Phase::Stopped => {}
            },
        }
        self.advance(now);
    }

    /// [`Action::Record`] done: `Err` says why the id could not be made durable.
    pub fn handle_recorded(&mut self, now: Now, recorded: Result<(), String>) {
        match self.take_busy() {
            Busy::Recording(job) => match recorded {
                Ok(()) => self.send(Purpose::Command(job)),
                Err(e) => {
                    // Not sent: without its record, a repeat after a restart could send it.
                    log::error!(LOCK_ID = self.id(); "lock {}: {e}; command {} not sent", self.id(), job.command.id);
                    self.finish(
                        job,
                        Outcome::Failed {
                            reason: Reason::StateStore,
                            state: None,
                            detail: Some(format!("{e}; free space in the state directory")),
                        },
                    );
                }
            },
            other @ (Busy::Free | Busy::Asking { .. } | Busy::Settling { .. }) => {
                self.set_busy(other)
            }
        }
        self.advance(now);
    }

    /// The client refused [`Action::Send`]: nothing was written.
    pub fn handle_not_sent(&mut self, now: Now, why: String) {
        match self.take_busy() {
            Busy::Asking {
                purpose: Purpose::Command(job),
                ..
            } => {
                log::warn!(LOCK_ID = self.id(); "lock {}: command {} not sent: {why}", self.id(), job.command.id);
                self.finish(job, Outcome::failed(Reason::Unreachable));
            }
            Busy::Asking { purpose, .. } => self.unanswered(now, purpose, why),
            other @ (Busy::Free | Busy::Recording(_) | Busy::Settling { .. }) => {
                self.set_busy(other)
            }
        }
        self.advance(now);
    }

    /// [`Action::SignedTime`] found none (`pending`: the provider is fetching one).
    pub fn handle_no_signed_time(&mut self, now: Now, why: String, pending: bool) {
        match self.phase {
            Phase::Handshaking { .. } => {
                self.close_link();
                if pending {
                    log::info!(LOCK_ID = self.id(); "lock {}: {why}", self.id());
                    let reason = format!("lock {}: waiting for a signed time", self.id());
                    self.retry_later(now, reason, true);
                } else {
                    log::error!(LOCK_ID = self.id(); "lock {}: {why}", self.id());
                    let reason =
                        "handshake failed: lock needs trusted time and no signed time is available";
                    self.retry_later(now, reason.into(), false);
                }
            }
            // Mid-session the lock asks again when it reconnects (ALERT 0x02).
            Phase::Offline | Phase::Connecting | Phase::Ready { .. } | Phase::Stopped => {
                if pending {
                    log::info!("lock {} needs trusted time: {why}", self.id());
                } else {
                    log::error!("lock {} needs trusted time: {why}", self.id());
                }
            }
        }
        self.advance(now);
    }

    /// [`Action::Probe`]'s answer: `Err` says why the lock was not heard.
    pub fn handle_probe(&mut self, now: Now, heard: Result<(), String>) {
        match heard {
            Ok(()) => {
                if self.absent.take().is_some() {
                    log::info!(LOCK_ID = self.id(); "lock {}: on the air again", self.id());
                }
            }
            Err(e) => {
                if self.absent.is_none() {
                    log::warn!(LOCK_ID = self.id(); "lock {}: not on the air ({e}); it shows unavailable until it is heard again", self.id());
                }
                self.absent = Some(format!("not on the air: {e}"));
            }
        }
        self.advance(now);
    }

    /// [`Action::Diagnose`]'s answer: what the provider says of the refused certificate.
    pub fn handle_diagnosis(&mut self, now: Now, why: Option<String>) {
        log::error!(LOCK_ID = self.id(); "lock {}: INVALID_CERT again with a fresh certificate — {}",
            self.id(),
            why.as_deref().unwrap_or("check the credentials provider and the lock's device id")
        );
        self.park(Reason::InvalidCert);
        self.show(
            now,
            LinkStatus::InvalidCert,
            Some(why.unwrap_or_else(|| "certificate refused".into())),
        );
        self.advance(now);
    }

    /// The operator asked to try a parked lock again (`lockbridge tedee fetch`).
    pub fn handle_retry(&mut self, now: Now) {
        if self.parked.take().is_some() {
            log::info!(LOCK_ID = self.id(); "lock {}: trying again, as the operator asked", self.id());
            self.cert_refused = false;
            self.reload_certificate = true;
            self.show(now, LinkStatus::Idle, None);
        }
        self.advance(now);
    }

    /// Shut down: what is on a live session finishes, what never left is `shutting-down`.
    pub fn handle_stop(&mut self, now: Now) {
        self.stopping = true;
        if matches!(self.phase, Phase::Handshaking { .. }) {
            self.close_link();
        }
        self.advance(now);
    }

    pub fn handle_timeout(&mut self, now: Now) {
        for timer in self.timers.take_expired(now.at) {
            match timer {
                // `advance` expires what is due.
                Timer::Deadline | Timer::Retry | Timer::Refresh => {}
                Timer::Probe => {
                    if let Some(every) = self.s.presence {
                        self.timers.set(Timer::Probe, now.at + every);
                        self.actions.push_back(Action::Probe);
                    }
                }
                Timer::Keepalive => {
                    self.due.keepalive = true;
                    self.timers.set(Timer::Keepalive, now.at + self.s.keepalive);
                }
                Timer::Idle => self.due.idle = true,
                Timer::Yield => self.due.yield_slot = true,
                Timer::Settle => match self.take_busy() {
                    // No movement reported (already there) or the stop was missed: ask.
                    Busy::Settling { job, .. } => self.send(Purpose::Settled(job)),
                    other @ (Busy::Free | Busy::Recording(_) | Busy::Asking { .. }) => {
                        self.set_busy(other)
                    }
                },
                Timer::Reestablish => {
                    if matches!(
                        self.phase,
                        Phase::Ready {
                            established: false,
                            ..
                        }
                    ) {
                        self.link_lost(
                            now,
                            "timed out waiting for the session to come back".into(),
                        );
                    }
                }
            }
        }
        self.advance(now);
    }

    // --- what happens next ---

    fn needs_link(&self) -> bool {
        self.s.policy == LinkPolicy::Persistent
            || !self.pending.is_empty()
            || self.readback.is_some()
            || self.refresh_wanted
    }

    /// After every input: expire what waited too long, then start what is next.
    fn advance(&mut self, now: Now) {
        self.expire(now.at);
        self.refresh_wanted = now.at >= self.next_refresh;
        if let Some(reason) = self.parked {
            self.fail_waiting(reason);
        }
        match &mut self.phase {
            Phase::Offline => {
                if self.stopping {
                    self.fail_waiting(Reason::ShuttingDown);
                    self.show(now, LinkStatus::Stopped, None);
                    self.phase = Phase::Stopped;
                    self.timers = TimerTable::new(TIMERS);
                    return;
                }
                if self.parked.is_some() {
                    return;
                }
                if self.s.policy == LinkPolicy::OnDemand
                    && self.timers.get(Timer::Refresh).is_none()
                    && now.at < self.next_refresh
                {
                    self.timers.set(Timer::Refresh, self.next_refresh);
                }
                if !self.needs_link() {
                    match self.absent.clone() {
                        None => self.show(now, LinkStatus::Idle, None),
                        Some(why) => self.show(now, LinkStatus::Unreachable, Some(why)),
                    }
                    if let Some(every) = self.s.presence {
                        if self.timers.get(Timer::Probe).is_none() {
                            self.timers.set(Timer::Probe, now.at + every);
                        }
                    }
                } else {
                    self.timers.stop(Timer::Probe);
                }
            }
            Phase::Ready {
                established: true,
                busy: Busy::Free,
                ..
            } => self.next_work(now),
            Phase::Connecting
            | Phase::Handshaking { .. }
            | Phase::Ready { .. }
            | Phase::Stopped => {}
        }
    }

    /// A free, established session: read-back first, then commands, then the gateway's own
    /// reads, then leave if it is time to.
    fn next_work(&mut self, now: Now) {
        if let Some(rb) = self.readback.take() {
            self.send(Purpose::ReadBack(rb.job, rb.reason));
        } else if let Some(job) = self.pending.pop_front() {
            self.start_command(now, job);
        } else if std::mem::take(&mut self.due.refresh) {
            self.send(Purpose::RefreshState);
        } else if std::mem::take(&mut self.due.keepalive) {
            self.send(Purpose::Keepalive);
        } else if self.stopping {
            log::info!(LOCK_ID = self.id(); "lock {}: session closed (ALERT 0x04)", self.id());
            self.close_link();
            self.advance(now);
        } else if std::mem::take(&mut self.due.yield_slot) {
            log::debug!(LOCK_ID = self.id(); "lock {}: link given up for a waiting lock", self.id());
            self.close_link();
            self.show(now, LinkStatus::WaitingForSlot, None);
            self.advance(now);
        } else if std::mem::take(&mut self.due.idle) {
            log::debug!(LOCK_ID = self.id(); "lock {}: idle, link dropped", self.id());
            self.close_link();
            self.show(now, LinkStatus::Idle, None);
            self.advance(now);
        }
    }

    fn start_command(&mut self, now: Now, job: Job) {
        if now.at >= job.command.deadline {
            self.finish(job, Outcome::Expired);
            return self.advance(now);
        }
        if job.command.action.is_actuating() {
            self.actions.push_back(Action::Record(job.command.clone()));
            self.set_busy(Busy::Recording(job));
        } else {
            self.send(Purpose::Command(job));
        }
    }

    /// Put a request on the session.
    fn send(&mut self, purpose: Purpose) {
        let (body, command) = match &purpose {
            Purpose::Command(job) => (job.command.body(), Some(job.command.clone())),
            Purpose::RefreshBattery => (vec![op::GET_BATTERY], None),
            Purpose::AfterUnanswered(..)
            | Purpose::ReadBack(..)
            | Purpose::Settled(_)
            | Purpose::RefreshState
            | Purpose::Keepalive => (vec![op::GET_STATE], None),
        };
        let opcode = body[0];
        self.actions.push_back(Action::Send { body, command });
        self.set_busy(Busy::Asking { opcode, purpose });
    }

    /// What is in progress, leaving the session free; a caller that finds work that is not
    /// its own puts it back with [`Core::set_busy`], so nothing in flight is ever dropped.
    fn take_busy(&mut self) -> Busy {
        match &mut self.phase {
            Phase::Ready { busy, .. } => std::mem::replace(busy, Busy::Free),
            Phase::Offline | Phase::Connecting | Phase::Handshaking { .. } | Phase::Stopped => {
                Busy::Free
            }
        }
    }

    fn set_busy(&mut self, next: Busy) {
        if let Phase::Ready { busy, .. } = &mut self.phase {
            *busy = next;
        }
    }

    /// The answer to what was asked: the response, or why none came.
    fn on_answer(&mut self, now: Now, answer: Result<api::Response, String>) {
        let purpose = match self.take_busy() {
            Busy::Asking { purpose, .. } => purpose,
            other @ (Busy::Free | Busy::Recording(_) | Busy::Settling { .. }) => {
                return self.set_busy(other);
            }
        };
        let r = match answer {
            Ok(r) => r,
            Err(why) => return self.unanswered(now, purpose, why),
        };
        self.progress(now);
        // A state reading, where the answer is one.
        let reading = (r.result == result::SUCCESS)
            .then(|| LockStatus::parse(&r.data).ok())
            .flatten();
        match purpose {
            Purpose::Command(job) if r.result != result::SUCCESS => {
                self.finish(job, Outcome::failed(Reason::Lock(r.result)));
            }
            Purpose::Command(job) if job.command.action.is_actuating() => {
                self.timers.set(Timer::Settle, now.at + MOTION_GRACE);
                self.set_busy(Busy::Settling {
                    job,
                    started: now.at,
                });
            }
            Purpose::Command(job) => {
                let outcome = Outcome::Success {
                    state: reading.map(StateReading::from),
                    battery: self.battery,
                };
                self.finish(job, outcome);
            }
            Purpose::AfterUnanswered(job, reason) => match reading {
                Some(s) => {
                    self.show_state(now, s);
                    let state = Some(StateReading::from(s));
                    self.finish(job, Outcome::Ambiguous { state, reason });
                }
                None => {
                    self.keep_for_readback(now, job, reason);
                    self.link_lost(
                        now,
                        "no answer to GET_STATE after an unanswered command".into(),
                    );
                }
            },
            Purpose::ReadBack(job, reason) => {
                if let Some(s) = reading {
                    self.show_state(now, s);
                }
                let state = reading.map(StateReading::from);
                self.finish(job, Outcome::Ambiguous { state, reason });
            }
            Purpose::Settled(job) => {
                if let Some(s) = reading {
                    self.show_state(now, s);
                }
                self.finish_movement(job, reading);
            }
            Purpose::RefreshState | Purpose::Keepalive => match reading {
                Some(s) => {
                    self.show_state(now, s);
                    if matches!(purpose, Purpose::RefreshState) {
                        self.send(Purpose::RefreshBattery);
                    }
                }
                None => self.link_lost(
                    now,
                    "timed out waiting for a usable GET_STATE answer".into(),
                ),
            },
            Purpose::RefreshBattery => {
                if let (result::SUCCESS, Ok(b)) = (r.result, Battery::parse(&r.data)) {
                    self.battery = Some(b.level);
                    self.view(now, ViewChange::Battery(b));
                }
                self.next_refresh = now.at + self.s.refresh;
            }
        }
        self.rearm_idle(now);
    }

    /// What was asked got no response.
    fn unanswered(&mut self, now: Now, purpose: Purpose, why: String) {
        match purpose {
            Purpose::Command(job) if job.command.action.is_actuating() => {
                // It may have reached the lock: read the state back, never write it again.
                self.send(Purpose::AfterUnanswered(job, why));
            }
            Purpose::Command(mut job) => {
                // A read changes nothing, so it is asked once more, on a fresh session: records
                // are never retransmitted, so the session that lost one is out of step with
                // the lock, and the next command on it would fail too.
                if job.retried {
                    self.finish(job, Outcome::failed(Reason::Unreachable));
                } else {
                    job.retried = true;
                    self.pending.push_front(job);
                }
                self.link_lost(now, why);
            }
            Purpose::AfterUnanswered(job, reason) => {
                self.keep_for_readback(now, job, reason);
                self.link_lost(
                    now,
                    "no answer to GET_STATE after an unanswered command".into(),
                );
            }
            Purpose::ReadBack(job, reason) => {
                self.finish(
                    job,
                    Outcome::Ambiguous {
                        state: None,
                        reason,
                    },
                );
                self.link_lost(now, format!("GET_STATE: {why}"));
            }
            Purpose::Settled(job) => {
                self.finish_movement(job, None);
                self.link_lost(now, format!("GET_STATE: {why}"));
            }
            Purpose::RefreshState | Purpose::Keepalive => {
                self.link_lost(now, format!("GET_STATE: {why}"));
            }
            Purpose::RefreshBattery => self.link_lost(now, format!("GET_BATTERY: {why}")),
        }
    }

    /// An accepted movement ends where the bolt stopped; part way is `jammed`.
    fn finish_movement(&mut self, job: Job, stopped: Option<LockStatus>) {
        self.timers.stop(Timer::Settle);
        let outcome = match stopped {
            Some(s) if s.jammed => Outcome::Failed {
                reason: Reason::Jammed,
                state: Some(StateReading::from(s)),
                detail: None,
            },
            s => Outcome::Success {
                state: s.map(StateReading::from),
                battery: None,
            },
        };
        self.finish(job, outcome);
    }

    fn keep_for_readback(&mut self, now: Now, job: Job, reason: String) {
        self.readback = Some(ReadBack {
            job,
            until: now.at + READBACK_LIMIT,
            reason,
        });
    }

    fn on_notification(&mut self, now: Now, id: u8, params: &[u8]) {
        self.progress(now);
        let n = match Notification::parse(id, params) {
            Ok(n) => n,
            Err(e) => {
                log::warn!(LOCK_ID = self.id(); "lock {}: {e}; ignored", self.id());
                return;
            }
        };
        match n {
            Notification::StatusChange(change) => {
                self.state_known = true;
                self.view(now, ViewChange::StatusChange(change));
                match self.take_busy() {
                    Busy::Settling { job, .. } if change.state.is_stable() => {
                        let stopped = LockStatus {
                            state: change.state,
                            jammed: change.jammed,
                        };
                        self.finish_movement(job, Some(stopped));
                        self.rearm_idle(now);
                    }
                    Busy::Settling { job, started } => {
                        // Moving: wait for the stop up to the motion limit.
                        self.timers.set(Timer::Settle, started + MOTION_LIMIT);
                        self.set_busy(Busy::Settling { job, started });
                    }
                    other @ (Busy::Free | Busy::Recording(_) | Busy::Asking { .. }) => {
                        self.set_busy(other)
                    }
                }
            }
            Notification::Battery(b) => {
                self.battery = Some(b.level);
                self.view(now, ViewChange::Battery(b));
            }
            Notification::StartCharging => self.view(now, ViewChange::Charging(true)),
            Notification::StopCharging => self.view(now, ViewChange::Charging(false)),
            Notification::NeedDateTime => self.actions.push_back(Action::SignedTime),
            Notification::FullyCharged | Notification::Other(_) => {}
        }
    }

    fn on_established(&mut self, now: Now, session_id: [u8; 4]) {
        let sid = hex::encode(session_id);
        log::info!(LOCK_ID = self.id(); "lock {}: session {sid} up", self.id());
        self.progress(now);
        match &mut self.phase {
            Phase::Handshaking { rssi } => {
                let rssi = *rssi;
                self.view(
                    now,
                    ViewChange::SessionUp {
                        rssi,
                        at_ms: now.unix_ms,
                    },
                );
                self.shown = Some((LinkStatus::Connected, None));
                self.actions
                    .push_back(Action::Publish(GatewayEvent::SessionUp {
                        lock: self.id().to_string(),
                        session_id: sid,
                    }));
                self.absent = None;
                self.backoff.reset();
                self.cert_refused = false;
                self.due = Due {
                    refresh: !self.state_known || now.at >= self.next_refresh,
                    ..Due::default()
                };
                self.phase = Phase::Ready {
                    held_since: now.at,
                    established: true,
                    busy: Busy::Free,
                };
                self.timers.stop(Timer::Refresh);
                self.timers.stop(Timer::Probe);
                if self.s.policy == LinkPolicy::Persistent {
                    self.timers.set(Timer::Keepalive, now.at + self.s.keepalive);
                }
                self.rearm_idle(now);
                self.arm_yield(now);
            }
            Phase::Ready { established, .. } => {
                *established = true;
                self.timers.stop(Timer::Reestablish);
            }
            Phase::Offline | Phase::Connecting | Phase::Stopped => {}
        }
    }

    /// The handshake ended without a session.
    // A wildcard on purpose: every other way a handshake fails is retried alike.
    #[allow(clippy::wildcard_enum_match_arm)]
    fn handshake_closed(&mut self, now: Now, e: ptls::Error) {
        self.close_link();
        match e {
            ptls::Error::Alert(Alert::NotRegistered) => {
                log::error!(LOCK_ID = self.id(); "lock {}: NOT_REGISTERED — the lock was reset or removed; re-add it, then restart lockbridge", self.id());
                self.park(Reason::NotRegistered);
                self.show(
                    now,
                    LinkStatus::NotRegistered,
                    Some("lock is not registered".into()),
                );
            }
            ptls::Error::Alert(Alert::InvalidCert) if !self.cert_refused => {
                log::warn!(LOCK_ID = self.id(); "lock {}: INVALID_CERT — fetching a fresh certificate once", self.id());
                self.cert_refused = true;
            }
            ptls::Error::Alert(Alert::InvalidCert) => self.actions.push_back(Action::Diagnose),
            e => self.retry_later(now, format!("handshake failed: {e}"), false),
        }
    }

    /// No link this time: try again after the backoff (or soon, while the provider fetches).
    fn retry_later(&mut self, now: Now, reason: String, pending: bool) {
        let wait = if pending {
            log::info!(LOCK_ID = self.id(); "{reason}; trying again in {PENDING_RETRY:?}");
            PENDING_RETRY
        } else {
            let wait = self.backoff.next(self.rng.next_u64());
            log::warn!(LOCK_ID = self.id(); "lock {}: {reason}; retrying in about {wait:?}", self.id());
            wait
        };
        self.show(now, LinkStatus::Unreachable, Some(reason));
        self.timers.set(Timer::Retry, now.at + wait);
    }

    /// The live link failed: settle what was in flight by the outcome rules, then reconnect.
    fn link_lost(&mut self, now: Now, reason: String) {
        if matches!(self.phase, Phase::Ready { .. }) {
            match self.take_busy() {
                Busy::Free => {}
                Busy::Recording(job) => self.pending.push_front(job),
                Busy::Asking { purpose, .. } => match purpose {
                    Purpose::Command(job) if job.command.action.is_actuating() => {
                        let why = format!("link lost after sending: {reason}");
                        self.keep_for_readback(now, job, why);
                    }
                    Purpose::Command(job) => self.finish(job, Outcome::failed(Reason::Unreachable)),
                    Purpose::AfterUnanswered(job, why) => self.keep_for_readback(now, job, why),
                    Purpose::ReadBack(job, why) => self.finish(
                        job,
                        Outcome::Ambiguous {
                            state: None,
                            reason: why,
                        },
                    ),
                    Purpose::Settled(job) => self.finish_movement(job, None),
                    Purpose::RefreshState | Purpose::RefreshBattery | Purpose::Keepalive => {}
                },
                // The lock took it; where the bolt stopped is not known.
                Busy::Settling { job, .. } => self.finish_movement(job, None),
            }
        } else {
            return;
        }
        log::warn!(LOCK_ID = self.id(); "lock {}: link lost: {reason}", self.id());
        self.actions
            .push_back(Action::Publish(GatewayEvent::SessionDown {
                lock: self.id().to_string(),
                reason: reason.clone(),
            }));
        self.close_link();
        self.show(now, LinkStatus::Connecting, Some(reason));
    }

    /// Give the link and its slot back; the session's own timers go with it.
    fn close_link(&mut self) {
        if matches!(self.phase, Phase::Handshaking { .. } | Phase::Ready { .. }) {
            self.actions.push_back(Action::Close);
        }
        self.phase = Phase::Offline;
        for t in [
            Timer::Keepalive,
            Timer::Idle,
            Timer::Yield,
            Timer::Settle,
            Timer::Reestablish,
        ] {
            self.timers.stop(t);
        }
        self.due = Due::default();
    }

    fn park(&mut self, reason: Reason) {
        self.parked = Some(reason);
        self.actions.push_back(Action::Park);
    }

    /// Commands whose deadline passed before they were sent: expired, never sent; a read-back
    /// that waited too long: ambiguous without a state.
    fn expire(&mut self, now: Instant) {
        if self.pending.iter().any(|j| j.command.deadline <= now) {
            let (late, keep): (Vec<Job>, Vec<Job>) = self
                .pending
                .drain(..)
                .partition(|j| j.command.deadline <= now);
            self.pending = keep.into();
            for job in late {
                self.finish(job, Outcome::Expired);
            }
        }
        if self.readback.as_ref().is_some_and(|rb| rb.until <= now) {
            if let Some(rb) = self.readback.take() {
                let outcome = Outcome::Ambiguous {
                    state: None,
                    reason: rb.reason,
                };
                self.finish(rb.job, outcome);
            }
        }
        let earliest = self
            .pending
            .iter()
            .map(|j| j.command.deadline)
            .chain(self.readback.as_ref().map(|rb| rb.until))
            .min();
        match earliest {
            Some(at) => self.timers.set(Timer::Deadline, at),
            None => self.timers.stop(Timer::Deadline),
        }
    }

    /// What waits and never left: `reason`; a read-back that cannot happen: ambiguous.
    fn fail_waiting(&mut self, reason: Reason) {
        for job in std::mem::take(&mut self.pending) {
            self.finish(job, Outcome::failed(reason));
        }
        if let Some(rb) = self.readback.take() {
            let outcome = Outcome::Ambiguous {
                state: None,
                reason: rb.reason,
            };
            self.finish(rb.job, outcome);
        }
        self.timers.stop(Timer::Deadline);
    }

    fn rearm_idle(&mut self, now: Now) {
        if self.s.policy == LinkPolicy::OnDemand && matches!(self.phase, Phase::Ready { .. }) {
            self.due.idle = false;
            self.timers.set(Timer::Idle, now.at + self.s.idle);
        }
    }

    fn arm_yield(&mut self, now: Now) {
        match &self.phase {
            Phase::Ready { held_since, .. } if self.waiters > 0 => {
                let at = (*held_since + MIN_HOLD).max(now.at);
                if self.timers.get(Timer::Yield).is_none() {
                    self.timers.set(Timer::Yield, at);
                }
            }
            Phase::Offline
            | Phase::Connecting
            | Phase::Handshaking { .. }
            | Phase::Ready { .. }
            | Phase::Stopped => {
                self.timers.stop(Timer::Yield);
                self.due.yield_slot = false;
            }
        }
    }

    fn finish(&mut self, job: Job, outcome: Outcome) {
        self.actions.push_back(Action::Finish {
            command: job.command,
            outcome,
        });
    }

    fn show(&mut self, now: Now, status: LinkStatus, error: Option<String>) {
        let next = (status, error);
        if self.shown.as_ref() == Some(&next) {
            return;
        }
        self.shown = Some(next.clone());
        self.actions.push_back(Action::View {
            at_ms: now.unix_ms,
            change: ViewChange::Status {
                status: next.0,
                error: next.1,
            },
        });
    }

    fn show_state(&mut self, now: Now, s: LockStatus) {
        self.state_known = true;
        self.view(now, ViewChange::State(s));
    }

    fn view(&mut self, now: Now, change: ViewChange) {
        self.actions.push_back(Action::View {
            at_ms: now.unix_ms,
            change,
        });
    }

    fn progress(&mut self, now: Now) {
        self.actions
            .push_back(Action::Progress { at_ms: now.unix_ms });
    }
}

#[cfg(test)]
mod tests {
    //! The outcome rules on a virtual clock: every instant is written out, the lock's side is
    //! played by hand with the events a `ptls::Client` reports.

    use super::*;
    use crate::command::{Action as Act, Command, Mode};
    use crate::ptls::api::{LockState, Response};

    const UNIX0: u64 = 1_800_000_000_000;

    struct T {
        core: Core,
        t0: Instant,
        /// Every action so far.
        log: Vec<Action>,
    }

    fn settings(policy: LinkPolicy) -> Settings {
        Settings {
            id: "front".into(),
            policy,
            keepalive: Duration::from_secs(30),
            idle: Duration::from_secs(10),
            refresh: Duration::from_secs(600),
            presence: None,
            queue_depth: 2,
        }
    }

    impl T {
        fn new(policy: LinkPolicy) -> T {
            let t0 = Instant::now();
            let now = Now {
                at: t0,
                unix_ms: UNIX0,
            };
            let mut t = T {
                core: Core::new(settings(policy), now, 7),
                t0,
                log: Vec::new(),
            };
            t.take();
            t
        }

        fn at(&self, ms: u64) -> Now {
            Now {
                at: self.t0 + Duration::from_millis(ms),
                unix_ms: UNIX0 + ms,
            }
        }

        fn take(&mut self) -> Vec<Action> {
            let mut out = Vec::new();
            while let Some(a) = self.core.poll_action() {
                out.push(a);
            }
            self.log.extend(out.iter().cloned());
            out
        }

        fn job(&self, id: &str, action: Act, ttl_ms: u64) -> Job {
            Job {
                command: Command {
                    id: id.into(),
                    lock: "front".into(),
                    action,
                    mode: Mode::Normal,
                    deadline: self.t0 + Duration::from_millis(ttl_ms),
                    origin: "cli".into(),
                },
                retried: false,
            }
        }

        fn submit(&mut self, ms: u64, job: Job) -> Vec<Action> {
            self.core.handle_job(self.at(ms), job);
            self.take()
        }

        fn event(&mut self, ms: u64, e: Event) -> Vec<Action> {
            self.core.handle_event(self.at(ms), e);
            self.take()
        }

        fn answer(&mut self, ms: u64, opcode: u8, result: u8, data: &[u8]) -> Vec<Action> {
            let r = Response {
                opcode,
                result,
                data: data.to_vec(),
            };
            self.event(ms, Event::Response(r))
        }

        /// Take the slot, connect, handshake and answer the first refresh: the lock is locked.
        fn ready(&mut self, ms: u64) {
            assert!(self.core.wants_slot().is_some());
            self.core.handle_slot(self.at(ms), SlotChange::Granted);
            let a = self.take();
            assert!(
                a.iter().any(|a| matches!(a, Action::Connect { .. })),
                "{a:?}"
            );
            self.core
                .handle_link(self.at(ms), LinkChange::Up { rssi: Some(-60) });
            let a = self.event(ms, Event::Established { session_id: [1; 4] });
            if sends(&a) == [vec![op::GET_STATE]] {
                self.answer(
                    ms,
                    op::GET_STATE,
                    result::SUCCESS,
                    &[LockState::Locked.byte(), 0],
                );
                self.answer(ms, op::GET_BATTERY, result::SUCCESS, &[80, 0]);
            }
        }

        /// The command was recorded and written.
        fn record(&mut self, ms: u64) -> Vec<Action> {
            self.core.handle_recorded(self.at(ms), Ok(()));
            self.take()
        }

        fn written(&self, body: &[u8]) -> usize {
            sends(&self.log)
                .iter()
                .filter(|b| b.as_slice() == body)
                .count()
        }

        fn outcomes(&self) -> Vec<(String, Outcome)> {
            outcomes(&self.log)
        }
    }

    fn sends(actions: &[Action]) -> Vec<Vec<u8>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { body, .. } => Some(body.clone()),
                _ => None,
            })
            .collect()
    }

    fn outcomes(actions: &[Action]) -> Vec<(String, Outcome)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Finish { command, outcome } => Some((command.id.clone(), outcome.clone())),
                _ => None,
            })
            .collect()
    }

    const UNLOCK: [u8; 2] = [op::UNLOCK, 0];
    const LOCK: [u8; 2] = [op::LOCK, 0];

    fn unlocked() -> [u8; 2] {
        [LockState::Unlocked.byte(), 0]
    }

    fn stable_unlocked() -> Event {
        Event::Notification {
            id: api::notif::LOCK_STATUS_CHANGE,
            params: unlocked().to_vec(),
        }
    }

    #[test]
    fn a_deadline_passing_before_the_slot_comes_is_expired_and_never_sent() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.core.handle_slot(t.at(0), SlotChange::Full);
        t.submit(100, t.job("c1", Act::Unlock, 5_000));
        // The deadline is the session's next wake-up.
        assert_eq!(
            t.core.poll_timeout(),
            Some(t.t0 + Duration::from_millis(5_000))
        );
        t.core.handle_timeout(t.at(5_000));
        t.take();
        assert_eq!(t.outcomes(), [("c1".into(), Outcome::Expired)]);
        // The slot comes later: the link comes up, the command is not written.
        t.ready(6_000);
        assert_eq!(t.written(&UNLOCK), 0);
        assert!(!t.log.iter().any(|a| matches!(a, Action::Record(_))));
    }

    #[test]
    fn a_lost_response_is_ambiguous_with_the_state_read_back() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        let a = t.submit(1_000, t.job("c1", Act::Unlock, 60_000));
        // Durable first, written only after.
        assert!(
            matches!(a.as_slice(), [Action::Record(c)] if c.id == "c1"),
            "{a:?}"
        );
        assert_eq!(sends(&t.record(1_000)), [UNLOCK.to_vec()]);
        let a = t.event(
            6_000,
            Event::CommandUnanswered {
                opcode: op::UNLOCK,
                why: ptls::Unanswered::Timeout,
            },
        );
        // Read back, never re-sent.
        assert_eq!(sends(&a), [vec![op::GET_STATE]]);
        t.answer(6_100, op::GET_STATE, result::SUCCESS, &unlocked());
        let o = t.outcomes();
        assert!(
            matches!(&o[..], [(id, Outcome::Ambiguous { state: Some(s), .. })] if id == "c1" && s.state == LockState::Unlocked),
            "{o:?}"
        );
        assert_eq!(t.written(&UNLOCK), 1);
    }

    #[test]
    fn a_link_lost_after_sending_reads_the_state_back_on_the_next_link() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        t.submit(1_000, t.job("c1", Act::Unlock, 60_000));
        t.record(1_000);
        t.core.handle_link(
            t.at(1_500),
            LinkChange::Down {
                reason: "supervision timeout".into(),
            },
        );
        let a = t.take();
        assert!(a.iter().any(|a| matches!(a, Action::Close)), "{a:?}");
        assert!(t.outcomes().is_empty(), "no outcome before the read-back");
        // The next link reads the state first.
        assert_eq!(t.core.wants_slot(), Some(Priority::Command));
        t.core.handle_slot(t.at(2_000), SlotChange::Granted);
        t.core
            .handle_link(t.at(2_000), LinkChange::Up { rssi: None });
        t.take();
        let a = t.event(2_100, Event::Established { session_id: [2; 4] });
        assert_eq!(sends(&a), [vec![op::GET_STATE]]);
        t.answer(2_200, op::GET_STATE, result::SUCCESS, &unlocked());
        let o = t.outcomes();
        assert!(
            matches!(&o[..], [(_, Outcome::Ambiguous { state: Some(_), reason })] if reason.contains("link lost after sending")),
            "{o:?}"
        );
        assert_eq!(t.written(&UNLOCK), 1);
    }

    #[test]
    fn a_read_back_that_never_comes_is_ambiguous_at_its_limit() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        t.submit(1_000, t.job("c1", Act::Unlock, 60_000));
        t.record(1_000);
        let down = LinkChange::Down {
            reason: "gone".into(),
        };
        t.core.handle_link(t.at(1_500), down);
        // No link comes back: 30 s later it is ambiguous without a state.
        assert_eq!(
            t.core.poll_timeout(),
            Some(t.t0 + Duration::from_millis(31_500))
        );
        t.core.handle_timeout(t.at(31_500));
        t.take();
        let o = t.outcomes();
        assert!(
            matches!(&o[..], [(_, Outcome::Ambiguous { state: None, .. })]),
            "{o:?}"
        );
    }

    #[test]
    fn a_second_command_waits_for_the_first() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        t.submit(1_000, t.job("a", Act::Unlock, 60_000));
        t.record(1_000);
        let a = t.submit(1_001, t.job("b", Act::Lock, 60_000));
        assert!(a.is_empty(), "b waits while a is out: {a:?}");
        t.answer(1_200, op::UNLOCK, result::SUCCESS, &[]);
        assert!(t.outcomes().is_empty(), "a settles first");
        let a = t.event(3_000, stable_unlocked());
        let o = outcomes(&a);
        assert!(
            matches!(&o[..], [(id, Outcome::Success { state: Some(s), .. })] if id == "a" && s.state == LockState::Unlocked),
            "{o:?}"
        );
        // Then b, recorded before it is written.
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Record(c) if c.id == "b")),
            "{a:?}"
        );
        assert_eq!(sends(&t.record(3_000)), [LOCK.to_vec()]);
    }

    #[test]
    fn beyond_the_queue_depth_a_command_is_queue_full_and_never_sent() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        t.submit(1_000, t.job("a", Act::Unlock, 60_000));
        t.record(1_000);
        t.submit(1_001, t.job("b", Act::Lock, 60_000));
        t.submit(1_002, t.job("c", Act::Unlock, 60_000));
        let a = t.submit(1_003, t.job("d", Act::Lock, 60_000));
        assert_eq!(
            outcomes(&a),
            [("d".into(), Outcome::failed(Reason::QueueFull))]
        );
        assert_eq!(t.core.queued(), 2);
    }

    #[test]
    fn a_movement_without_a_reported_stop_is_read_after_the_grace() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        t.submit(1_000, t.job("a", Act::Unlock, 60_000));
        t.record(1_000);
        t.answer(1_100, op::UNLOCK, result::SUCCESS, &[]);
        assert_eq!(
            t.core.poll_timeout(),
            Some(t.t0 + Duration::from_millis(1_900))
        );
        t.core.handle_timeout(t.at(1_900));
        assert_eq!(sends(&t.take()), [vec![op::GET_STATE]]);
        t.answer(
            2_000,
            op::GET_STATE,
            result::SUCCESS,
            &[LockState::Unlocked.byte(), 1],
        );
        let o = t.outcomes();
        assert!(
            matches!(&o[..], [(_, Outcome::Failed { reason, state: Some(_), .. })] if *reason == Reason::Jammed),
            "a bolt stopped part way is failed: jammed: {o:?}"
        );
    }

    #[test]
    fn a_read_without_an_answer_is_asked_once_more_on_a_fresh_session_then_unreachable() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        let a = t.submit(1_000, t.job("r", Act::Read, 60_000));
        assert_eq!(sends(&a), [vec![op::GET_STATE]]);
        let silence = Event::CommandUnanswered {
            opcode: op::GET_STATE,
            why: ptls::Unanswered::Timeout,
        };
        let a = t.event(6_000, silence.clone());
        assert!(
            a.iter().any(|x| matches!(x, Action::Close)),
            "a fresh session: {a:?}"
        );
        assert!(t.outcomes().is_empty());
        t.core.handle_slot(t.at(6_100), SlotChange::Granted);
        t.core
            .handle_link(t.at(6_100), LinkChange::Up { rssi: None });
        let a = t.event(6_200, Event::Established { session_id: [3; 4] });
        assert_eq!(sends(&a), [vec![op::GET_STATE]], "asked once more");
        t.event(11_200, silence);
        assert_eq!(
            t.outcomes(),
            [("r".into(), Outcome::failed(Reason::Unreachable))]
        );
    }

    #[test]
    fn a_record_that_cannot_be_written_is_state_store_and_never_sent() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        t.submit(1_000, t.job("a", Act::Unlock, 60_000));
        t.core
            .handle_recorded(t.at(1_000), Err("No space left on device".into()));
        t.take();
        let o = t.outcomes();
        assert!(
            matches!(&o[..], [(_, Outcome::Failed { reason, .. })] if *reason == Reason::StateStore),
            "{o:?}"
        );
        assert_eq!(t.written(&UNLOCK), 0);
    }

    #[test]
    fn a_write_the_link_never_delivered_is_unreachable_not_ambiguous() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        t.submit(1_000, t.job("a", Act::Unlock, 60_000));
        t.record(1_000);
        t.core.handle_link(
            t.at(1_010),
            LinkChange::NotDelivered {
                reason: "no route".into(),
            },
        );
        t.take();
        assert_eq!(
            t.outcomes(),
            [("a".into(), Outcome::failed(Reason::Unreachable))]
        );
    }

    // Regression: a write error while the gateway's own read was out dropped the command the
    // read was for, which then never got an outcome.
    #[test]
    fn a_link_failure_during_a_read_back_keeps_the_command_for_the_next_link() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        t.submit(1_000, t.job("c1", Act::Unlock, 60_000));
        t.record(1_000);
        let silence = Event::CommandUnanswered {
            opcode: op::UNLOCK,
            why: ptls::Unanswered::Timeout,
        };
        assert_eq!(sends(&t.event(6_000, silence)), [vec![op::GET_STATE]]);
        t.core.handle_link(
            t.at(6_010),
            LinkChange::NotDelivered {
                reason: "no route".into(),
            },
        );
        t.take();
        assert!(t.outcomes().is_empty(), "still owed its read-back");
        t.core.handle_slot(t.at(7_000), SlotChange::Granted);
        t.core
            .handle_link(t.at(7_000), LinkChange::Up { rssi: None });
        let a = t.event(7_100, Event::Established { session_id: [4; 4] });
        assert_eq!(sends(&a), [vec![op::GET_STATE]]);
        t.answer(7_200, op::GET_STATE, result::SUCCESS, &unlocked());
        let o = t.outcomes();
        assert!(
            matches!(&o[..], [(_, Outcome::Ambiguous { state: Some(_), .. })]),
            "{o:?}"
        );
        assert_eq!(t.written(&UNLOCK), 1);
    }

    #[test]
    fn shutdown_finishes_what_is_in_flight_and_fails_what_never_left() {
        // On a live session the command out finishes, then the link closes.
        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        t.submit(1_000, t.job("a", Act::Unlock, 60_000));
        t.record(1_000);
        t.core.handle_stop(t.at(1_050));
        assert!(t.take().is_empty(), "a is out: wait for it");
        t.answer(1_100, op::UNLOCK, result::SUCCESS, &[]);
        let a = t.event(2_500, stable_unlocked());
        assert!(
            matches!(outcomes(&a)[..], [(_, Outcome::Success { .. })]),
            "{a:?}"
        );
        assert!(a.iter().any(|x| matches!(x, Action::Close)), "{a:?}");
        assert!(t.core.is_stopped());

        // Without a link, what waits never left: shutting-down.
        let mut t = T::new(LinkPolicy::OnDemand);
        t.core.handle_slot(t.at(0), SlotChange::Full);
        t.submit(100, t.job("b", Act::Lock, 60_000));
        t.core.handle_stop(t.at(200));
        t.take();
        assert_eq!(
            t.outcomes(),
            [("b".into(), Outcome::failed(Reason::ShuttingDown))]
        );
        assert!(t.core.is_stopped());
        // And a command after that gets its outcome too.
        let a = t.submit(300, t.job("c", Act::Lock, 60_000));
        assert_eq!(
            outcomes(&a),
            [("c".into(), Outcome::failed(Reason::ShuttingDown))]
        );
    }

    #[test]
    fn not_registered_parks_the_lock_until_the_operator_asks() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.core.handle_slot(t.at(0), SlotChange::Granted);
        t.core.handle_link(t.at(0), LinkChange::Up { rssi: None });
        let a = t.event(100, Event::Closed(ptls::Error::Alert(Alert::NotRegistered)));
        assert!(a.iter().any(|x| matches!(x, Action::Park)), "{a:?}");
        assert_eq!(t.core.wants_slot(), None, "no retries while parked");
        let a = t.submit(200, t.job("a", Act::Unlock, 60_000));
        assert_eq!(
            outcomes(&a),
            [("a".into(), Outcome::failed(Reason::NotRegistered))]
        );
        t.core.handle_retry(t.at(300));
        assert!(t.core.wants_slot().is_some());
    }

    #[test]
    fn a_refused_certificate_is_fetched_fresh_once_then_the_lock_is_parked() {
        let mut t = T::new(LinkPolicy::Persistent);
        let refused = || Event::Closed(ptls::Error::Alert(Alert::InvalidCert));
        t.core.handle_slot(t.at(0), SlotChange::Granted);
        t.core.handle_link(t.at(0), LinkChange::Up { rssi: None });
        t.event(100, refused());
        t.core.handle_slot(t.at(200), SlotChange::Granted);
        let a = t.take();
        assert!(
            a.iter().any(|x| matches!(
                x,
                Action::Connect {
                    certificate: CertificateChoice::Fresh
                }
            )),
            "{a:?}"
        );
        t.core.handle_link(t.at(200), LinkChange::Up { rssi: None });
        let a = t.event(300, refused());
        assert!(a.iter().any(|x| matches!(x, Action::Diagnose)), "{a:?}");
        t.core
            .handle_diagnosis(t.at(300), Some("device id 7 is not this lock".into()));
        assert!(t.core.is_parked());
    }

    #[test]
    fn failed_connections_back_off_doubling_to_a_minute() {
        let mut t = T::new(LinkPolicy::Persistent);
        let mut ms = 0;
        let mut waits = Vec::new();
        for _ in 0..9 {
            t.core.handle_slot(t.at(ms), SlotChange::Granted);
            let failed = LinkChange::Failed {
                reason: "not found".into(),
                pending: false,
            };
            t.core.handle_link(t.at(ms), failed);
            let retry = t.core.poll_timeout().unwrap();
            let wait = retry - t.at(ms).at;
            waits.push(wait.as_millis() as u64);
            assert_eq!(t.core.wants_slot(), None, "waits for the retry");
            ms += wait.as_millis() as u64;
            t.core.handle_timeout(t.at(ms));
        }
        let ceilings = [1, 2, 4, 8, 16, 32, 60, 60, 60];
        for (w, c) in waits.iter().zip(ceilings) {
            assert!(*w >= c * 500 && *w <= c * 1000, "{waits:?}");
        }
    }

    #[test]
    fn an_on_demand_link_is_dropped_when_idle_and_a_persistent_one_is_kept_alive() {
        let mut t = T::new(LinkPolicy::OnDemand);
        t.ready(0);
        assert_eq!(t.core.poll_timeout(), Some(t.t0 + Duration::from_secs(10)));
        t.core.handle_timeout(t.at(10_000));
        assert!(t.take().iter().any(|x| matches!(x, Action::Close)));
        assert_eq!(
            t.core.wants_slot(),
            None,
            "nothing to do until the next refresh"
        );

        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        t.core.handle_timeout(t.at(30_000));
        assert_eq!(sends(&t.take()), [vec![op::GET_STATE]]);
    }

    #[test]
    fn a_waiting_lock_gets_the_slot_after_the_minimum_hold() {
        let mut t = T::new(LinkPolicy::Persistent);
        t.ready(0);
        t.core.handle_slot(t.at(500), SlotChange::Waiters(1));
        assert_eq!(t.core.poll_timeout(), Some(t.t0 + MIN_HOLD));
        t.core.handle_timeout(t.at(2_000));
        let a = t.take();
        assert!(a.iter().any(|x| matches!(x, Action::Close)), "{a:?}");
        assert_eq!(t.core.wants_slot(), Some(Priority::Background));
    }
}
