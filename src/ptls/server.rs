//! The lock side of PTLS, used by the simulator.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use p256::SecretKey;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use subtle::ConstantTimeEq;

use super::api::Alert;
use super::cert::{AccessCertificate, CertError, VerifiedCertificate};
use super::crypto::{self, RecordKey, SharedSecret, TrafficSecret, Transcript};
use super::timer::TimerTable;
use super::wire::{self, Channel, ClientHello, ClientVerify, ServerHello, ServerVerify};
use super::{Error, Rng, Transmit, WallClock};

pub struct ServerConfig {
    /// The lock's long-term key; signs SIG_S.
    pub lock_key: SigningKey,
    /// The authority whose certificates and signed times the lock trusts.
    pub authority: VerifyingKey,
    pub device_id: u32,
    /// The negotiated ATT MTU of this connection.
    pub att_mtu: u16,
    /// Disconnect a client that sends no hello this long after connecting (spec §1: 10 s).
    pub hello_timeout: Option<Duration>,
    /// Disconnect after this long without a received frame.
    pub idle_timeout: Option<Duration>,
    /// A session lives at most this long (spec §6: 24 h), then ALERT 0x03.
    pub session_lifetime: Duration,
    /// Counter limit per direction; the session ends with ALERT 0x03 when reached.
    pub max_records: u32,
}

impl ServerConfig {
    pub fn new(lock_key: SigningKey, authority: VerifyingKey, device_id: u32) -> Self {
        ServerConfig {
            lock_key,
            authority,
            device_id,
            att_mtu: 247,
            hello_timeout: Some(Duration::from_secs(10)),
            idle_timeout: None,
            session_lifetime: Duration::from_secs(24 * 3600),
            max_records: crypto::MAX_RECORDS,
        }
    }
}

/// Why the lock drops the BLE link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    HelloTimeout,
    Idle,
}

#[derive(Clone, Debug)]
pub enum ServerEvent {
    Established {
        session_id: [u8; 4],
        certificate: Box<VerifiedCertificate>,
    },
    /// A command, `OPCODE ‖ PARAMS`: from an encrypted record, or a plaintext frame.
    Command {
        body: Vec<u8>,
        encrypted: bool,
    },
    /// The lock sent this alert because of this fault.
    AlertSent {
        alert: Alert,
        cause: Error,
    },
    AlertReceived(Alert),
    SessionEnded,
    /// Drop the link now.
    Disconnect(DisconnectReason),
}

/// Why the lock could not send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("no session")]
    NoSession,
    #[error("record counters exhausted; the session ended")]
    Exhausted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    Hello,
    Idle,
    SessionLifetime,
}

struct Handshake {
    ch_frame: Vec<u8>,
    ch: [u8; wire::CLIENT_HELLO_LEN],
    sh: [u8; wire::SERVER_HELLO_LEN],
    sh_frame: Vec<u8>,
    z: SharedSecret,
    hello_hash: [u8; 32],
    client_hs: TrafficSecret,
    server_hs: TrafficSecret,
}

struct AwaitClientVerify {
    hs: Handshake,
    challenge_frame: Vec<u8>,
    sv_plain: Vec<u8>,
    sv_frame: Vec<u8>,
    /// Client-verify fragments received so far, as whole frames.
    pieces: Vec<Vec<u8>>,
}

struct Session {
    tx: RecordKey,
    rx: RecordKey,
    /// The frames of the handshake, to recognise the client's retransmissions.
    ch_frame: Vec<u8>,
    challenge_frame: Vec<u8>,
    cv_frames: Vec<Vec<u8>>,
    initialized_frame: Vec<u8>,
}

enum State {
    ExpectHello,
    ExpectChallenge(Box<Handshake>),
    ExpectClientVerify(Box<AwaitClientVerify>),
    Established(Box<Session>),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::ExpectHello => "expecting hello",
            State::ExpectChallenge(_) => "expecting server-verify challenge",
            State::ExpectClientVerify(_) => "expecting client verify",
            State::Established(_) => "established",
        }
    }
}

/// The lock side of one PTLS connection over one BLE link.
///
/// # Contract
/// - **Getters**: [`is_established`](Self::is_established).
/// - **Inputs**: [`handle_input`](Self::handle_input) with every value the client wrote on
///   PTLS_RX or API_COMMANDS; [`handle_timeout`](Self::handle_timeout) at
///   [`poll_timeout`](Self::poll_timeout).
/// - **Mutators**: [`set_trusted_time`](Self::set_trusted_time),
///   [`set_registered`](Self::set_registered), [`send_response`](Self::send_response),
///   [`send_notification`](Self::send_notification), [`send_plain`](Self::send_plain),
///   [`end_session`](Self::end_session).
/// - **Outputs**: [`poll_transmit`](Self::poll_transmit) (PTLS_TX, API_COMMANDS indications,
///   NOTIFICATIONS), [`poll_event`](Self::poll_event), [`poll_timeout`](Self::poll_timeout).
///
/// A byte-identical repeat of the client's previous flight is answered by resending the
/// lock's last flight (RFC 6347 §4.2.4); a stale copy of an earlier flight is ignored; any other
/// hello starts a new handshake. A client verify that does not authenticate is dropped without
/// an alert, because with lost fragments it may be a partial flight: the client's retransmission
/// completes it. Suffixes of the received fragments are tried longest first, so a stale partial
/// flight before a complete retransmission does not spoil it.
pub struct Server {
    config: ServerConfig,
    rng: Rng,
    state: State,
    registered: bool,
    trusted_time: Option<WallClock>,
    timers: TimerTable<Timer, 3>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<ServerEvent>,
}

impl Server {
    pub fn new(config: ServerConfig, rng: Rng, now: Instant) -> Server {
        let mut timers = TimerTable::new([Timer::Hello, Timer::Idle, Timer::SessionLifetime]);
        if let Some(t) = config.hello_timeout {
            timers.set(Timer::Hello, now + t);
        }
        if let Some(t) = config.idle_timeout {
            timers.set(Timer::Idle, now + t);
        }
        Server {
            config,
            rng,
            state: State::ExpectHello,
            registered: true,
            trusted_time: None,
            timers,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    // --- getters ---

    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    // --- mutators ---

    /// The lock's trusted clock; `None` means it has no trusted time (hello gets ALERT 0x02).
    pub fn set_trusted_time(&mut self, clock: Option<WallClock>) {
        self.trusted_time = clock;
    }

    /// An unregistered lock answers every hello with ALERT 0x06.
    pub fn set_registered(&mut self, registered: bool) {
        self.registered = registered;
    }

    /// Seal and indicate a command response on API_COMMANDS.
    /// `now` is part of the contract; sealing itself needs no time.
    pub fn send_response(&mut self, _now: Instant, plaintext: &[u8]) -> Result<(), SendError> {
        self.send_record(Channel::ApiCommands, plaintext)
    }

    /// Seal and notify on NOTIFICATIONS (same counter as responses, spec §4).
    pub fn send_notification(&mut self, _now: Instant, plaintext: &[u8]) -> Result<(), SendError> {
        self.send_record(Channel::Notifications, plaintext)
    }

    /// A plaintext frame (`0x00 ‖ body`), such as the answer to SET_SIGNED_DATETIME.
    pub fn send_plain(&mut self, channel: Channel, body: &[u8]) {
        self.transmits.push_back(Transmit {
            channel,
            bytes: wire::frame(wire::HDR_DATA_NOT_ENCRYPTED, body),
        });
    }

    /// End the session with an alert (0x03 at expiry, 0x04 when the lock leaves).
    pub fn end_session(&mut self, alert: Alert) {
        self.send_alert(alert);
        self.drop_session();
    }

    // --- inputs ---

    pub fn handle_input(&mut self, now: Instant, channel: Channel, bytes: &[u8]) {
        if let Some(t) = self.config.idle_timeout {
            self.timers.set(Timer::Idle, now + t);
        }
        let Ok((header, body)) = wire::split_frame(bytes) else {
            return;
        };
        match channel {
            Channel::PtlsRx => self.on_ptls_frame(now, header, bytes, body),
            Channel::ApiCommands => match header {
                wire::HDR_DATA_NOT_ENCRYPTED if !body.is_empty() => {
                    self.events.push_back(ServerEvent::Command {
                        body: body.to_vec(),
                        encrypted: false,
                    });
                }
                wire::HDR_DATA_ENCRYPTED => self.on_record(body),
                _ => {}
            },
            Channel::PtlsTx | Channel::Notifications => {}
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for timer in self.timers.take_expired(now) {
            match timer {
                Timer::Hello => {
                    self.events
                        .push_back(ServerEvent::Disconnect(DisconnectReason::HelloTimeout));
                }
                Timer::Idle => {
                    self.events
                        .push_back(ServerEvent::Disconnect(DisconnectReason::Idle));
                }
                Timer::SessionLifetime => {
                    if self.is_established() {
                        self.end_session(Alert::Timeout);
                    }
                }
            }
        }
    }

    // --- outputs ---

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.earliest().map(|(at, _)| at)
    }

    // --- handshake ---

    fn on_ptls_frame(&mut self, now: Instant, header: u8, frame: &[u8], body: &[u8]) {
        if header == wire::HDR_ALERT {
            let alert = Alert::from_byte(body.first().copied().unwrap_or(0));
            self.events.push_back(ServerEvent::AlertReceived(alert));
            self.drop_session();
            return;
        }
        if let Some(resend) = self.repeat_answer(frame) {
            if let Some(bytes) = resend {
                self.transmits.push_back(Transmit {
                    channel: Channel::PtlsTx,
                    bytes,
                });
            }
            return;
        }
        match header {
            wire::HDR_HELLO => self.on_hello(body, frame),
            wire::HDR_SERVER_VERIFY => self.on_challenge(body, frame),
            wire::HDR_CLIENT_VERIFY_I | wire::HDR_CLIENT_VERIFY_II => {
                self.on_fragment(now, header, frame)
            }
            other => self.fail(
                Alert::Error,
                Error::UnexpectedFrame {
                    channel: Channel::PtlsRx,
                    header: other,
                    state: self.state.name(),
                },
            ),
        }
    }

    /// `Some(Some(frame))`: a repeat of the client's last flight, answered with our last
    /// flight. `Some(None)`: a stale copy of an earlier flight, ignored. `None`: new input.
    fn repeat_answer(&self, frame: &[u8]) -> Option<Option<Vec<u8>>> {
        match &self.state {
            State::ExpectHello => None,
            State::ExpectChallenge(hs) => (frame == hs.ch_frame).then(|| Some(hs.sh_frame.clone())),
            State::ExpectClientVerify(a) => {
                if frame == a.challenge_frame {
                    Some(a.pieces.is_empty().then(|| a.sv_frame.clone()))
                } else if frame == a.hs.ch_frame {
                    Some(None)
                } else {
                    None
                }
            }
            State::Established(s) => {
                if s.cv_frames.last().is_some_and(|f| f == frame) {
                    Some(Some(s.initialized_frame.clone()))
                } else if frame == s.ch_frame
                    || frame == s.challenge_frame
                    || s.cv_frames.iter().any(|f| f == frame)
                {
                    Some(None)
                } else {
                    None
                }
            }
        }
    }

    fn on_hello(&mut self, body: &[u8], frame: &[u8]) {
        self.timers.stop(Timer::Hello);
        self.drop_session();
        let ch = match ClientHello::parse(body) {
            Ok(Ok(ch)) => ch,
            Ok(Err(_version)) => {
                return self.fail(Alert::Error, wire::malformed("hello version").into());
            }
            Err(e) => return self.fail(Alert::Error, e.into()),
        };
        if !self.registered {
            return self.fail(Alert::NotRegistered, Error::Alert(Alert::NotRegistered));
        }
        if self.trusted_time.is_none() {
            return self.fail(Alert::NoTrustedTime, Error::Alert(Alert::NoTrustedTime));
        }
        let client_public = match wire::decode_point(&ch.public) {
            Ok(p) => p,
            Err(e) => return self.fail(Alert::Error, e.into()),
        };
        // SERVER_MTU is the lock's own limit (spec §3.2, revised): the client's MTU byte is not
        // a cap, as real locks show — clients announce 23 and still send 150-byte pieces.
        let mtu = u8::try_from(self.config.att_mtu.saturating_sub(3)).unwrap_or(u8::MAX);
        let mut random = [0u8; 32];
        self.rng.fill_bytes(&mut random);
        let ephemeral = SecretKey::random(&mut self.rng);
        let sh = ServerHello {
            mtu,
            random,
            public: wire::encode_point(&ephemeral.public_key()),
        }
        .encode();
        let ch_bytes = ch.encode();
        let z = SharedSecret::new(&ephemeral, &client_public);
        let mut transcript = Transcript::default();
        transcript.add(&ch_bytes);
        transcript.add(&sh);
        let hello_hash = transcript.hash();
        let sh_frame = wire::frame(wire::HDR_HELLO, &sh);
        self.transmits.push_back(Transmit {
            channel: Channel::PtlsTx,
            bytes: sh_frame.clone(),
        });
        self.state = State::ExpectChallenge(Box::new(Handshake {
            ch_frame: frame.to_vec(),
            ch: ch_bytes,
            sh,
            sh_frame,
            client_hs: TrafficSecret::derive(&z, crypto::LABEL_CLIENT_HS, &hello_hash),
            server_hs: TrafficSecret::derive(&z, crypto::LABEL_SERVER_HS, &hello_hash),
            z,
            hello_hash,
        }));
    }

    fn on_challenge(&mut self, body: &[u8], frame: &[u8]) {
        let state = std::mem::replace(&mut self.state, State::ExpectHello);
        let State::ExpectChallenge(hs) = state else {
            self.state = state;
            return self.fail(
                Alert::Error,
                Error::UnexpectedFrame {
                    channel: Channel::PtlsRx,
                    header: wire::HDR_SERVER_VERIFY,
                    state: self.state.name(),
                },
            );
        };
        let Ok(auth) = <[u8; wire::AUTH_LEN]>::try_from(body) else {
            return self.fail(
                Alert::Error,
                wire::malformed("server verify challenge").into(),
            );
        };
        let signature: Signature = self
            .config
            .lock_key
            .sign(&wire::server_signed_bytes(&hs.ch, &hs.sh, &auth));
        let sv_plain = ServerVerify {
            auth,
            signature: signature.to_der().as_bytes().to_vec(),
            hash: hs.hello_hash.to_vec(),
        }
        .encode();
        let sv_frame = wire::frame(
            wire::HDR_SERVER_VERIFY,
            &crypto::seal_handshake(&hs.server_hs, &sv_plain),
        );
        self.transmits.push_back(Transmit {
            channel: Channel::PtlsTx,
            bytes: sv_frame.clone(),
        });
        self.state = State::ExpectClientVerify(Box::new(AwaitClientVerify {
            hs: *hs,
            challenge_frame: frame.to_vec(),
            sv_plain,
            sv_frame,
            pieces: Vec::new(),
        }));
    }

    fn on_fragment(&mut self, now: Instant, header: u8, frame: &[u8]) {
        let State::ExpectClientVerify(a) = &mut self.state else {
            return self.fail(Alert::Error, Error::FragmentOutOfPhase);
        };
        a.pieces.push(frame.to_vec());
        let total: usize = a.pieces.iter().map(|p| p.len() - 1).sum();
        if total > wire::REASSEMBLY_LIMIT {
            return self.fail(Alert::Error, Error::ReassemblyOverflow);
        }
        if header != wire::HDR_CLIENT_VERIFY_II {
            return;
        }
        // The last fragment: the flight is the longest suffix of pieces that authenticates.
        let opened = (0..a.pieces.len()).find_map(|start| {
            let blob: Vec<u8> = a.pieces[start..]
                .iter()
                .flat_map(|p| p[1..].iter().copied())
                .collect();
            crypto::open_handshake(&a.hs.client_hs, &blob)
                .ok()
                .map(|plain| (start, plain))
        });
        let Some((start, cv_plain)) = opened else {
            a.pieces.clear(); // a damaged or partial flight: wait for the retransmission
            return;
        };
        let cv_frames = a.pieces.split_off(start);
        let state = std::mem::replace(&mut self.state, State::ExpectHello);
        let State::ExpectClientVerify(a) = state else {
            unreachable!("matched above");
        };
        if let Err((alert, cause)) = self.finish_handshake(now, *a, &cv_plain, cv_frames) {
            self.fail(alert, cause);
        }
    }

    fn finish_handshake(
        &mut self,
        now: Instant,
        a: AwaitClientVerify,
        cv_plain: &[u8],
        cv_frames: Vec<Vec<u8>>,
    ) -> Result<(), (Alert, Error)> {
        let hs = &a.hs;
        let cv = ClientVerify::parse(cv_plain).map_err(|e| (Alert::Error, e.into()))?;
        let mut transcript = Transcript::default();
        transcript.add(&hs.ch);
        transcript.add(&hs.sh);
        transcript.add(&a.sv_plain);
        let hello_verify_hash = transcript.hash();
        if cv.hash.len() != 32 || !bool::from(cv.hash.ct_eq(&hello_verify_hash)) {
            return Err((Alert::Error, Error::ClientVerifyHashMismatch));
        }
        let Some(clock) = self.trusted_time else {
            return Err((Alert::NoTrustedTime, Error::Alert(Alert::NoTrustedTime)));
        };
        let verified = AccessCertificate::verify(
            &cv.certificate,
            &self.config.authority,
            self.config.device_id,
            clock.unix_ms_at(now),
        )
        .map_err(|e: CertError| (Alert::InvalidCert, Error::Certificate(e)))?;
        let signature = Signature::from_der(&cv.signature)
            .map_err(|_| (Alert::Error, Error::BadClientSignature))?;
        let client_key: &VerifyingKey = verified.client_key();
        client_key
            .verify(
                &wire::client_signed_bytes(&hs.ch, &hs.sh, &a.sv_plain, &cv.certificate),
                &signature,
            )
            .map_err(|_| (Alert::Error, Error::BadClientSignature))?;
        transcript.add(cv_plain);
        let hs_hash = transcript.hash();
        let mut session_id = [0u8; 4];
        self.rng.fill_bytes(&mut session_id);
        let initialized_frame = wire::frame(wire::HDR_INITIALIZED, &session_id);
        self.transmits.push_back(Transmit {
            channel: Channel::PtlsTx,
            bytes: initialized_frame.clone(),
        });
        self.state = State::Established(Box::new(Session {
            tx: RecordKey::new(&TrafficSecret::derive(
                &hs.z,
                crypto::LABEL_SERVER_AP,
                &hs_hash,
            )),
            rx: RecordKey::new(&TrafficSecret::derive(
                &hs.z,
                crypto::LABEL_CLIENT_AP,
                &hs_hash,
            )),
            ch_frame: hs.ch_frame.clone(),
            challenge_frame: a.challenge_frame.clone(),
            cv_frames,
            initialized_frame,
        }));
        self.timers
            .set(Timer::SessionLifetime, now + self.config.session_lifetime);
        self.events.push_back(ServerEvent::Established {
            session_id,
            certificate: Box::new(verified),
        });
        Ok(())
    }

    // --- records ---

    fn on_record(&mut self, body: &[u8]) {
        let max = self.config.max_records;
        let State::Established(s) = &mut self.state else {
            return self.fail(Alert::Error, Error::NoSession);
        };
        if s.rx.counter() >= max {
            return self.fail(Alert::Timeout, Error::CountersExhausted);
        }
        match s.rx.open(body) {
            Ok(plain) if !plain.is_empty() => self.events.push_back(ServerEvent::Command {
                body: plain.to_vec(),
                encrypted: true,
            }),
            Ok(_) => {}
            Err(_) => self.fail(Alert::Error, Error::RecordTag(Channel::ApiCommands)),
        }
    }

    fn send_record(&mut self, channel: Channel, plaintext: &[u8]) -> Result<(), SendError> {
        let max = self.config.max_records;
        let State::Established(s) = &mut self.state else {
            return Err(SendError::NoSession);
        };
        let sealed = match s.tx.seal(plaintext) {
            Some(sealed) if s.tx.counter() <= max => sealed,
            _ => {
                self.fail(Alert::Timeout, Error::CountersExhausted);
                return Err(SendError::Exhausted);
            }
        };
        self.transmits.push_back(Transmit {
            channel,
            bytes: wire::frame(wire::HDR_DATA_ENCRYPTED, &sealed),
        });
        Ok(())
    }

    // --- helpers ---

    /// Send an alert for a fault and drop whatever handshake or session there was.
    fn fail(&mut self, alert: Alert, cause: Error) {
        self.send_alert(alert);
        self.events
            .push_back(ServerEvent::AlertSent { alert, cause });
        self.drop_session();
    }

    fn send_alert(&mut self, alert: Alert) {
        self.transmits.push_back(Transmit {
            channel: Channel::PtlsTx,
            bytes: vec![wire::HDR_ALERT, alert.byte()],
        });
    }

    fn drop_session(&mut self) {
        if self.is_established() {
            self.events.push_back(ServerEvent::SessionEnded);
        }
        self.timers.stop(Timer::SessionLifetime);
        self.state = State::ExpectHello;
    }
}
