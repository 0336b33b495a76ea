//! The gateway side of PTLS.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use p256::SecretKey;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use subtle::ConstantTimeEq;

use super::api::{self, Alert, Response, SignedTime};
use super::crypto::{self, RecordKey, SharedSecret, TrafficSecret, Transcript};
use super::timer::{Backoff, BackoffStep, TimerTable};
use super::wire::{self, Channel, ClientHello, ClientVerify, ServerHello, ServerVerify};
use super::{Error, Rng, Transmit, WallClock};

/// Timers and limits of spec §9, with its defaults.
#[derive(Clone, Debug)]
pub struct ClientTiming {
    pub retransmit_initial: Duration,
    pub max_retransmits: u8,
    pub handshake_deadline: Duration,
    /// Fresh hellos after a failed attempt before the failure is reported.
    pub max_restarts: u8,
    pub command_timeout: Duration,
    /// Proactive re-handshake this long after INITIALIZED (the lock ends sessions at 24 h).
    pub rehandshake_after: Duration,
    /// Re-handshake once either direction has used this many records.
    pub rekey_at_records: u32,
}

impl Default for ClientTiming {
    fn default() -> Self {
        ClientTiming {
            retransmit_initial: Duration::from_secs(1),
            max_retransmits: 3,
            handshake_deadline: super::DEFAULT_HANDSHAKE_DEADLINE,
            max_restarts: 2,
            command_timeout: Duration::from_secs(5),
            rehandshake_after: Duration::from_secs(23 * 3600 + 30 * 60),
            rekey_at_records: 0xFF00,
        }
    }
}

#[derive(Clone)]
pub struct ClientConfig {
    /// The gateway's long-term key (the "mobile key"); signs SIG_C.
    pub signing_key: SigningKey,
    /// The access certificate for this key and this lock, opaque to the client.
    pub certificate: Vec<u8>,
    /// The lock's long-term public key, which must have made SIG_S.
    pub lock_public_key: VerifyingKey,
    /// The negotiated ATT MTU of the link.
    pub att_mtu: u16,
    pub timing: ClientTiming,
}

/// Why a command got no response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unanswered {
    /// The command deadline passed.
    Timeout,
    /// The session ended (alert, bad record, re-handshake) before the response came.
    SessionEnded,
}

/// What the client reports; drain with [`Client::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The session is up; commands may be sent.
    Established { session_id: [u8; 4] },
    /// A live session ended and a fresh handshake started (age, counters, lock's alert or
    /// a bad record).
    SessionEnded { reason: Error },
    /// A handshake attempt failed and a fresh hello went out.
    HandshakeRetry { attempt: u8, reason: Error },
    /// The lock has no trusted time: obtain a signed time and call
    /// [`Client::send_signed_time`].
    NeedSignedTime,
    /// The lock accepted the signed time; the handshake restarts on the same link.
    SignedTimeAccepted,
    /// The response to the outstanding command.
    Response(Response),
    /// A response whose command was already reported unanswered: it did reach the lock.
    LateResponse(Response),
    /// The outstanding command got no response; an actuating one is never re-sent.
    CommandUnanswered { opcode: u8, why: Unanswered },
    /// An encrypted notification (`NOTIF_ID ‖ PARAMS`).
    Notification { id: u8, params: Vec<u8> },
    /// A plaintext notification, such as SIGNED_DATETIME.
    PlainNotification { id: u8, params: Vec<u8> },
    /// Any alert the lock sent, for metrics; the reaction is reported separately.
    AlertReceived(Alert),
    /// Terminal: the client is done. Drop the link; a new client is needed to try again.
    Closed(Error),
}

/// Why a command could not be sent now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("no session (handshake in progress or closed)")]
    NotEstablished,
    #[error("another command is outstanding")]
    Busy,
    #[error("command of {0} bytes does not fit one value")]
    TooLarge(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    Retransmit,
    HandshakeDeadline,
    Command,
    Rehandshake,
}

const TIMERS: [Timer; 4] = [
    Timer::Retransmit,
    Timer::HandshakeDeadline,
    Timer::Command,
    Timer::Rehandshake,
];

struct ExpectServerHello {
    ch: [u8; wire::CLIENT_HELLO_LEN],
    ephemeral: SecretKey,
}

struct ExpectServerVerify {
    ch: [u8; wire::CLIENT_HELLO_LEN],
    sh: [u8; wire::SERVER_HELLO_LEN],
    z: SharedSecret,
    hello_hash: [u8; 32],
    auth: [u8; wire::AUTH_LEN],
    client_hs: TrafficSecret,
    server_hs: TrafficSecret,
    piece_mtu: usize,
}

struct ExpectInitialized {
    tx: RecordKey,
    rx: RecordKey,
}

struct Session {
    tx: RecordKey,
    rx: RecordKey,
    session_id: [u8; 4],
    established_at: Instant,
    outstanding: Option<u8>,
    rehandshake_due: bool,
}

enum State {
    Idle,
    ExpectServerHello(ExpectServerHello),
    ExpectServerVerify(Box<ExpectServerVerify>),
    ExpectInitialized(ExpectInitialized),
    /// ALERT 0x02 came: waiting for the caller to supply a signed time.
    AwaitSignedTime,
    /// The signed time went out; waiting for the lock's plaintext result.
    AwaitTimeResult,
    Established(Session),
    Closed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::ExpectServerHello(_) => "expecting server hello",
            State::ExpectServerVerify(_) => "expecting server verify",
            State::ExpectInitialized(_) => "expecting initialized",
            State::AwaitSignedTime => "awaiting signed time",
            State::AwaitTimeResult => "awaiting signed time result",
            State::Established(_) => "established",
            State::Closed => "closed",
        }
    }
}

/// The gateway side of one PTLS connection over one BLE link.
///
/// # Contract
/// - **Getters**: [`is_established`](Self::is_established), [`session_id`](Self::session_id),
///   [`state_name`](Self::state_name), [`established_at`](Self::established_at).
/// - **Inputs**: [`handle_input`](Self::handle_input) with every value received on PTLS_TX,
///   API_COMMANDS or NOTIFICATIONS; [`handle_timeout`](Self::handle_timeout) once `now` reaches
///   [`poll_timeout`](Self::poll_timeout).
/// - **Mutators**: [`start`](Self::start) (after subscribing to the three characteristics),
///   [`send_command`](Self::send_command), [`send_signed_time`](Self::send_signed_time),
///   [`close`](Self::close).
/// - **Outputs**: after each call above, write every [`poll_transmit`](Self::poll_transmit)
///   frame (with response) in order, handle every [`poll_event`](Self::poll_event), then sleep
///   until [`poll_timeout`](Self::poll_timeout).
///
/// Handshake flights are retransmitted byte-identically (1 s doubling, 3 times); an attempt that
/// fails or passes its deadline restarts from a fresh hello at most `max_restarts` times, then
/// [`Event::Closed`] reports why. Data records are never retransmitted: a command without a
/// response is reported [`Event::CommandUnanswered`] and left to the caller, who must not
/// re-send an actuating command.
pub struct Client {
    config: ClientConfig,
    rng: Rng,
    state: State,
    timers: TimerTable<Timer, 4>,
    clock: Option<WallClock>,
    /// The current flight on PTLS_RX and its retransmission schedule.
    flight: Vec<Vec<u8>>,
    backoff: Option<Backoff>,
    /// PTLS_TX frames accepted since the last hello: byte-identical copies are duplicates.
    accepted_tx: Vec<Vec<u8>>,
    restarts: u8,
    time_syncs: u8,
    /// A command that timed out or lost its session; a late response to it is reported.
    unanswered: Option<u8>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

impl Client {
    pub fn new(config: ClientConfig, rng: Rng) -> Result<Client, Error> {
        if config.att_mtu < wire::MIN_ATT_MTU {
            return Err(Error::MtuTooSmall(config.att_mtu));
        }
        Ok(Client {
            config,
            rng,
            state: State::Idle,
            timers: TimerTable::new(TIMERS),
            clock: None,
            flight: Vec::new(),
            backoff: None,
            accepted_tx: Vec::new(),
            restarts: 0,
            time_syncs: 0,
            unanswered: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        })
    }

    // --- getters ---

    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    pub fn session_id(&self) -> Option<[u8; 4]> {
        let State::Established(s) = &self.state else {
            return None;
        };
        Some(s.session_id)
    }

    pub fn established_at(&self) -> Option<Instant> {
        let State::Established(s) = &self.state else {
            return None;
        };
        Some(s.established_at)
    }

    /// Records sealed and opened in the current session.
    pub fn record_counters(&self) -> Option<(u32, u32)> {
        let State::Established(s) = &self.state else {
            return None;
        };
        Some((s.tx.counter(), s.rx.counter()))
    }

    pub fn state_name(&self) -> &'static str {
        self.state.name()
    }

    // --- mutators ---

    /// Send the first hello. `unix_ms` is the wall clock at `now`; AUTH is derived from it.
    pub fn start(&mut self, now: Instant, unix_ms: u64) {
        if !matches!(self.state, State::Idle) {
            return;
        }
        self.clock = Some(WallClock { at: now, unix_ms });
        self.send_hello(now);
    }

    /// Seal and send one command (`OPCODE ‖ PARAMS`). One command may be outstanding.
    pub fn send_command(&mut self, now: Instant, plaintext: &[u8]) -> Result<(), CommandError> {
        let limit = usize::from(self.config.att_mtu) - 3 - 1 - wire::TAG_LEN;
        if plaintext.len() > limit || plaintext.is_empty() {
            return Err(CommandError::TooLarge(plaintext.len()));
        }
        let State::Established(session) = &mut self.state else {
            return Err(CommandError::NotEstablished);
        };
        if session.outstanding.is_some() {
            return Err(CommandError::Busy);
        }
        if session.rehandshake_due {
            self.begin_rehandshake(now, Error::CountersExhausted);
            return Err(CommandError::NotEstablished);
        }
        let Some(sealed) = session.tx.seal(plaintext) else {
            self.begin_rehandshake(now, Error::CountersExhausted);
            return Err(CommandError::NotEstablished);
        };
        session.outstanding = Some(plaintext[0]);
        self.unanswered = None;
        self.transmits.push_back(Transmit {
            channel: Channel::ApiCommands,
            bytes: wire::frame(wire::HDR_DATA_ENCRYPTED, &sealed),
        });
        self.timers
            .set(Timer::Command, now + self.config.timing.command_timeout);
        Ok(())
    }

    /// Answer [`Event::NeedSignedTime`]: send SET_SIGNED_DATETIME in plaintext (spec §7), which
    /// the lock accepts with or without a session.
    pub fn send_signed_time(&mut self, now: Instant, signed: &SignedTime) {
        match self.state {
            State::AwaitSignedTime => {
                self.state = State::AwaitTimeResult;
                self.timers.set(
                    Timer::HandshakeDeadline,
                    now + self.config.timing.command_timeout,
                );
            }
            State::Established(_) => {}
            State::Idle
            | State::ExpectServerHello(_)
            | State::ExpectServerVerify(_)
            | State::ExpectInitialized(_)
            | State::AwaitTimeResult
            | State::Closed => return,
        }
        self.transmits.push_back(Transmit {
            channel: Channel::ApiCommands,
            bytes: wire::frame(wire::HDR_DATA_NOT_ENCRYPTED, &signed.command()),
        });
    }

    /// Leave on purpose: ALERT 0x04 to the lock, keys wiped.
    pub fn close(&mut self, _now: Instant) {
        if matches!(self.state, State::Closed) {
            return;
        }
        self.transmits.push_back(Transmit {
            channel: Channel::PtlsRx,
            bytes: vec![wire::HDR_ALERT, Alert::Disconnected.byte()],
        });
        self.fail_outstanding();
        self.enter_closed(Error::ClosedLocally);
    }

    // --- inputs ---

    pub fn handle_input(&mut self, now: Instant, channel: Channel, bytes: &[u8]) {
        if matches!(self.state, State::Closed) {
            return;
        }
        let Ok((header, body)) = wire::split_frame(bytes) else {
            return;
        };
        match channel {
            Channel::PtlsTx => self.on_ptls_frame(now, header, bytes, body),
            Channel::ApiCommands | Channel::Notifications => {
                self.on_data_frame(now, channel, header, body)
            }
            Channel::PtlsRx => {}
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for timer in self.timers.take_expired(now) {
            match timer {
                Timer::Retransmit => self.on_retransmit_timer(now),
                Timer::HandshakeDeadline => {
                    if !matches!(self.state, State::Established(_) | State::Closed) {
                        self.fail_attempt(now, Error::HandshakeDeadline);
                    }
                }
                Timer::Command => self.on_command_timeout(now),
                Timer::Rehandshake => {
                    if let State::Established(s) = &mut self.state {
                        s.rehandshake_due = true;
                        if s.outstanding.is_none() {
                            self.begin_rehandshake(now, Error::SessionAged);
                        }
                    }
                }
            }
        }
    }

    // --- outputs ---

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.earliest().map(|(at, _)| at)
    }

    // --- handshake ---

    fn send_hello(&mut self, now: Instant) {
        let mut random = [0u8; 32];
        self.rng.fill_bytes(&mut random);
        let ephemeral = SecretKey::random(&mut self.rng);
        let hello = ClientHello {
            mtu: u8::try_from(self.config.att_mtu - 3).unwrap_or(u8::MAX),
            random,
            public: wire::encode_point(&ephemeral.public_key()),
        };
        let ch = hello.encode();
        self.accepted_tx.clear();
        self.state = State::ExpectServerHello(ExpectServerHello { ch, ephemeral });
        self.timers.set(
            Timer::HandshakeDeadline,
            now + self.config.timing.handshake_deadline,
        );
        self.send_flight(now, vec![wire::frame(wire::HDR_HELLO, &ch)]);
    }

    fn send_flight(&mut self, now: Instant, frames: Vec<Vec<u8>>) {
        for f in &frames {
            self.transmits.push_back(Transmit {
                channel: Channel::PtlsRx,
                bytes: f.clone(),
            });
        }
        self.flight = frames;
        let t = &self.config.timing;
        let backoff = Backoff::new(now, t.retransmit_initial, t.max_retransmits);
        self.timers.set(Timer::Retransmit, backoff.deadline());
        self.backoff = Some(backoff);
    }

    fn stop_flight(&mut self) {
        self.flight.clear();
        self.backoff = None;
        self.timers.stop(Timer::Retransmit);
    }

    fn on_retransmit_timer(&mut self, now: Instant) {
        let Some(backoff) = self.backoff.as_mut() else {
            return;
        };
        match backoff.handle_timeout(now) {
            BackoffStep::Retransmit => {
                let deadline = backoff.deadline();
                for f in &self.flight {
                    self.transmits.push_back(Transmit {
                        channel: Channel::PtlsRx,
                        bytes: f.clone(),
                    });
                }
                self.timers.set(Timer::Retransmit, deadline);
            }
            BackoffStep::Exhausted => self.fail_attempt(now, Error::FlightUnanswered),
        }
    }

    fn on_ptls_frame(&mut self, now: Instant, header: u8, frame: &[u8], body: &[u8]) {
        if header == wire::HDR_ALERT {
            let code = body.first().copied().unwrap_or(0);
            self.on_alert(now, Alert::from_byte(code));
            return;
        }
        if self.accepted_tx.iter().any(|f| f == frame) {
            return; // a duplicate of a frame already handled
        }
        let state = std::mem::replace(&mut self.state, State::Idle);
        let result = match (state, header) {
            (State::ExpectServerHello(s), wire::HDR_HELLO) => self.on_server_hello(now, s, body),
            (State::ExpectServerVerify(s), wire::HDR_SERVER_VERIFY) => {
                self.on_server_verify(now, *s, body)
            }
            (State::ExpectInitialized(s), wire::HDR_INITIALIZED) => {
                self.on_initialized(now, s, body)
            }
            (state, header) => {
                let error = Error::UnexpectedFrame {
                    channel: Channel::PtlsTx,
                    header,
                    state: state.name(),
                };
                self.state = state;
                Err(error)
            }
        };
        match result {
            Ok(()) => self.accepted_tx.push(frame.to_vec()),
            Err(error) => self.fail_attempt(now, error),
        }
    }

    fn on_server_hello(
        &mut self,
        now: Instant,
        s: ExpectServerHello,
        body: &[u8],
    ) -> Result<(), Error> {
        let restore = |this: &mut Self, s| this.state = State::ExpectServerHello(s);
        let sh = match ServerHello::parse(body) {
            Ok(sh) => sh,
            Err(e) => {
                restore(self, s);
                return Err(e.into());
            }
        };
        let piece_mtu = usize::from(sh.mtu).min(usize::from(self.config.att_mtu) - 3);
        if piece_mtu < 2 {
            restore(self, s);
            return Err(Error::ServerMtuTooSmall(sh.mtu));
        }
        let server_public = match wire::decode_point(&sh.public) {
            Ok(p) => p,
            Err(e) => {
                restore(self, s);
                return Err(e.into());
            }
        };
        let sh_bytes = sh.encode();
        let z = SharedSecret::new(&s.ephemeral, &server_public);
        let mut transcript = Transcript::default();
        transcript.add(&s.ch);
        transcript.add(&sh_bytes);
        let hello_hash = transcript.hash();
        let auth = self.unix_ms(now).to_be_bytes();
        let next = ExpectServerVerify {
            ch: s.ch,
            sh: sh_bytes,
            client_hs: TrafficSecret::derive(&z, crypto::LABEL_CLIENT_HS, &hello_hash),
            server_hs: TrafficSecret::derive(&z, crypto::LABEL_SERVER_HS, &hello_hash),
            z,
            hello_hash,
            auth,
            piece_mtu,
        };
        self.state = State::ExpectServerVerify(Box::new(next));
        self.send_flight(now, vec![wire::frame(wire::HDR_SERVER_VERIFY, &auth)]);
        Ok(())
    }

    fn on_server_verify(
        &mut self,
        now: Instant,
        s: ExpectServerVerify,
        body: &[u8],
    ) -> Result<(), Error> {
        // Every check is fatal for this attempt; the state is not restored.
        let sv_plain =
            crypto::open_handshake(&s.server_hs, body).map_err(|_| Error::ServerVerifyTag)?;
        let sv = ServerVerify::parse(&sv_plain)?;
        if sv.hash.len() != 32 || !bool::from(sv.hash.ct_eq(&s.hello_hash)) {
            return Err(Error::HelloHashMismatch);
        }
        if !bool::from(sv.auth.ct_eq(&s.auth)) {
            return Err(Error::AuthMismatch);
        }
        let signature = Signature::from_der(&sv.signature).map_err(|_| Error::BadLockSignature)?;
        self.config
            .lock_public_key
            .verify(
                &wire::server_signed_bytes(&s.ch, &s.sh, &s.auth),
                &signature,
            )
            .map_err(|_| Error::BadLockSignature)?;

        let cert = &self.config.certificate;
        let sig_c: Signature = self
            .config
            .signing_key
            .sign(&wire::client_signed_bytes(&s.ch, &s.sh, &sv_plain, cert));
        let mut transcript = Transcript::default();
        transcript.add(&s.ch);
        transcript.add(&s.sh);
        transcript.add(&sv_plain);
        let hello_verify_hash = transcript.hash();
        let cv = ClientVerify {
            certificate: cert.clone(),
            signature: sig_c.to_der().as_bytes().to_vec(),
            hash: hello_verify_hash.to_vec(),
        }
        .encode();
        transcript.add(&cv);
        let hs_hash = transcript.hash();
        let blob = crypto::seal_handshake(&s.client_hs, &cv);
        let next = ExpectInitialized {
            tx: RecordKey::new(&TrafficSecret::derive(
                &s.z,
                crypto::LABEL_CLIENT_AP,
                &hs_hash,
            )),
            rx: RecordKey::new(&TrafficSecret::derive(
                &s.z,
                crypto::LABEL_SERVER_AP,
                &hs_hash,
            )),
        };
        self.state = State::ExpectInitialized(next);
        self.send_flight(now, wire::fragment_client_verify(&blob, s.piece_mtu));
        Ok(())
    }

    fn on_initialized(
        &mut self,
        now: Instant,
        s: ExpectInitialized,
        body: &[u8],
    ) -> Result<(), Error> {
        let Ok(session_id) = <[u8; 4]>::try_from(body) else {
            self.state = State::ExpectInitialized(s);
            return Err(wire::malformed("initialized").into());
        };
        self.stop_flight();
        self.timers.stop(Timer::HandshakeDeadline);
        self.timers.set(
            Timer::Rehandshake,
            now + self.config.timing.rehandshake_after,
        );
        self.restarts = 0;
        self.time_syncs = 0;
        self.state = State::Established(Session {
            tx: s.tx,
            rx: s.rx,
            session_id,
            established_at: now,
            outstanding: None,
            rehandshake_due: false,
        });
        self.events.push_back(Event::Established { session_id });
        Ok(())
    }

    fn on_alert(&mut self, now: Instant, alert: Alert) {
        self.events.push_back(Event::AlertReceived(alert));
        match alert {
            Alert::NoTrustedTime => {
                self.fail_outstanding();
                self.time_syncs += 1;
                if self.time_syncs > 2 {
                    self.enter_closed(Error::TrustedTimeNotKept);
                    return;
                }
                self.stop_flight();
                self.timers.stop(Timer::HandshakeDeadline);
                self.timers.stop(Timer::Rehandshake);
                self.state = State::AwaitSignedTime;
                self.events.push_back(Event::NeedSignedTime);
            }
            Alert::Disconnected | Alert::InvalidCert | Alert::NotRegistered => {
                self.fail_outstanding();
                self.enter_closed(Error::Alert(alert));
            }
            Alert::Error | Alert::Timeout | Alert::Other(_) => {
                if matches!(self.state, State::Established(_)) {
                    self.begin_rehandshake(now, Error::Alert(alert));
                } else {
                    self.fail_attempt(now, Error::Alert(alert));
                }
            }
        }
    }

    /// A handshake attempt failed: restart from a fresh hello, or give up.
    fn fail_attempt(&mut self, now: Instant, reason: Error) {
        if matches!(self.state, State::Established(_)) {
            self.begin_rehandshake(now, reason);
            return;
        }
        if self.restarts >= self.config.timing.max_restarts {
            let attempts = self.restarts + 1;
            self.enter_closed(Error::HandshakeFailed {
                attempts,
                last: Box::new(reason),
            });
            return;
        }
        self.restarts += 1;
        self.events.push_back(Event::HandshakeRetry {
            attempt: self.restarts + 1,
            reason,
        });
        self.send_hello(now);
    }

    fn begin_rehandshake(&mut self, now: Instant, reason: Error) {
        self.fail_outstanding();
        self.timers.stop(Timer::Rehandshake);
        self.restarts = 0;
        self.events.push_back(Event::SessionEnded { reason });
        self.send_hello(now); // replaces (and so drops and zeroizes) the session keys
    }

    fn enter_closed(&mut self, error: Error) {
        self.state = State::Closed;
        self.flight.clear();
        self.backoff = None;
        for t in TIMERS {
            self.timers.stop(t);
        }
        self.events.push_back(Event::Closed(error));
    }

    // --- data ---

    fn on_data_frame(&mut self, now: Instant, channel: Channel, header: u8, body: &[u8]) {
        match header {
            wire::HDR_DATA_NOT_ENCRYPTED => self.on_plain_frame(now, channel, body),
            wire::HDR_DATA_ENCRYPTED => self.on_record(now, channel, body),
            _ => {}
        }
    }

    fn on_plain_frame(&mut self, now: Instant, channel: Channel, body: &[u8]) {
        let Some((&id, params)) = body.split_first() else {
            return;
        };
        if channel == Channel::Notifications {
            self.events.push_back(Event::PlainNotification {
                id,
                params: params.to_vec(),
            });
            return;
        }
        if id != api::op::SET_SIGNED_DATETIME {
            return;
        }
        let result = params
            .first()
            .copied()
            .unwrap_or(api::result::INVALID_PARAM);
        let awaiting = matches!(self.state, State::AwaitTimeResult);
        if result != api::result::SUCCESS {
            if awaiting {
                self.enter_closed(Error::SignedTimeRejected(result));
            }
            return;
        }
        self.events.push_back(Event::SignedTimeAccepted);
        if awaiting {
            self.restarts = 0;
            self.send_hello(now);
        }
    }

    fn on_record(&mut self, now: Instant, channel: Channel, body: &[u8]) {
        let State::Established(session) = &mut self.state else {
            return; // stale data from a previous session; the new one will not open it anyway
        };
        let Ok(plain) = session.rx.open(body) else {
            self.begin_rehandshake(now, Error::RecordTag(channel));
            return;
        };
        let rekey = self.config.timing.rekey_at_records;
        if session.rx.counter() >= rekey {
            session.rehandshake_due = true;
        }
        if channel == Channel::Notifications {
            if let Some((&id, params)) = plain.split_first() {
                self.events.push_back(Event::Notification {
                    id,
                    params: params.to_vec(),
                });
            }
        } else {
            match Response::parse(&plain) {
                Ok(r) if session.outstanding == Some(r.opcode) => {
                    session.outstanding = None;
                    self.timers.stop(Timer::Command);
                    self.events.push_back(Event::Response(r));
                }
                Ok(r) if self.unanswered == Some(r.opcode) => {
                    self.unanswered = None;
                    self.events.push_back(Event::LateResponse(r));
                }
                _ => {}
            }
        }
        self.rehandshake_if_due(now);
    }

    fn on_command_timeout(&mut self, now: Instant) {
        let State::Established(session) = &mut self.state else {
            return;
        };
        if let Some(opcode) = session.outstanding.take() {
            self.unanswered = Some(opcode);
            self.events.push_back(Event::CommandUnanswered {
                opcode,
                why: Unanswered::Timeout,
            });
        }
        self.rehandshake_if_due(now);
    }

    fn rehandshake_if_due(&mut self, now: Instant) {
        if let State::Established(s) = &mut self.state {
            let rekey = self.config.timing.rekey_at_records;
            if s.tx.counter() >= rekey {
                s.rehandshake_due = true;
            }
            if s.rehandshake_due && s.outstanding.is_none() {
                let reason = if s.tx.counter() >= rekey || s.rx.counter() >= rekey {
                    Error::CountersExhausted
                } else {
                    Error::SessionAged
                };
                self.begin_rehandshake(now, reason);
            }
        }
    }

    /// A session is going away with a command outstanding: report it unanswered.
    fn fail_outstanding(&mut self) {
        if let State::Established(s) = &mut self.state {
            if let Some(opcode) = s.outstanding.take() {
                self.timers.stop(Timer::Command);
                self.events.push_back(Event::CommandUnanswered {
                    opcode,
                    why: Unanswered::SessionEnded,
                });
            }
        }
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        self.clock.map(|c| c.unix_ms_at(now)).unwrap_or(0)
    }
}
