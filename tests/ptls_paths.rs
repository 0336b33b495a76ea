//! Every alert path and check of the protocol core, and its timers, on a virtual clock.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test and benchmark code: a failed unwrap is a failed run

use std::time::{Duration, Instant};

use lockbridge::fault::FaultConfig;
use lockbridge::ptls::api::{Alert, SignedTime, op};
use lockbridge::ptls::cert::{AccessCertificate, CertError, PERM_ALL};
use lockbridge::ptls::crypto::{self, SharedSecret, TrafficSecret, Transcript};
use lockbridge::ptls::pair::{Fixture, Pair};
use lockbridge::ptls::wire::{self, ServerHello, ServerVerify};
use lockbridge::ptls::{
    Channel, Client, ClientTiming, Error, Event, Server, ServerEvent, Transmit, Unanswered,
};
use p256::ecdsa::Signature;
use p256::ecdsa::signature::Signer;

fn clean() -> FaultConfig {
    FaultConfig::default()
}

fn client_events(p: &mut Pair<Client, Server>) -> Vec<Event> {
    std::iter::from_fn(|| p.client.poll_event()).collect()
}

fn server_events(p: &mut Pair<Client, Server>) -> Vec<ServerEvent> {
    std::iter::from_fn(|| p.lock.poll_event()).collect()
}

fn establish(p: &mut Pair<Client, Server>) {
    assert!(p.drive(Duration::from_secs(30), |p| p.client.is_established()));
    client_events(p);
    server_events(p);
}

/// Drive until the client closes; return why.
fn closed_reason(p: &mut Pair<Client, Server>) -> (Error, Vec<Event>) {
    let mut seen = Vec::new();
    let mut reason = None;
    p.drive(Duration::from_secs(120), |p| {
        while let Some(e) = p.client.poll_event() {
            if let Event::Closed(r) = &e {
                reason = Some(r.clone());
            }
            seen.push(e);
        }
        reason.is_some()
    });
    (reason.expect("client closed"), seen)
}

fn sent(c: &mut Client) -> Vec<Transmit> {
    std::iter::from_fn(|| c.poll_transmit()).collect()
}

/// A lock played by hand, to send server-verify messages a correct lock never would.
struct RogueLock {
    fixture: Fixture,
    ch: Vec<u8>,
    sh: Vec<u8>,
    server_hs: TrafficSecret,
    hello_hash: [u8; 32],
}

impl RogueLock {
    fn answer_hello(fixture: Fixture, client: &mut Client, now: Instant) -> RogueLock {
        let hello = sent(client).remove(0);
        let ch = hello.bytes[1..].to_vec();
        let client_public = wire::decode_point(&ch[35..100]).unwrap();
        let eph = p256::SecretKey::from_slice(&[0x21; 32]).unwrap();
        let sh = ServerHello {
            mtu: 244,
            random: [7; 32],
            public: wire::encode_point(&eph.public_key()),
        }
        .encode()
        .to_vec();
        let z = SharedSecret::new(&eph, &client_public);
        let mut t = Transcript::default();
        t.add(&ch);
        t.add(&sh);
        let hello_hash = t.hash();
        client.handle_input(now, Channel::PtlsTx, &wire::frame(wire::HDR_HELLO, &sh));
        RogueLock {
            server_hs: TrafficSecret::derive(&z, crypto::LABEL_SERVER_HS, &hello_hash),
            fixture,
            ch,
            sh,
            hello_hash,
        }
    }

    /// A correct server verify for the challenge the client sent, changed by `tamper`.
    fn server_verify(&self, client: &mut Client, tamper: impl Fn(&mut ServerVerify)) -> Vec<u8> {
        let challenge = sent(client).remove(0);
        let auth: [u8; 8] = challenge.bytes[1..].try_into().unwrap();
        let sig: Signature = self
            .fixture
            .lock_key
            .sign(&wire::server_signed_bytes(&self.ch, &self.sh, &auth));
        let mut sv = ServerVerify {
            auth,
            signature: sig.to_der().as_bytes().to_vec(),
            hash: self.hello_hash.to_vec(),
        };
        tamper(&mut sv);
        let sealed = crypto::seal_handshake(&self.server_hs, &sv.encode());
        wire::frame(wire::HDR_SERVER_VERIFY, &sealed)
    }
}

/// Run one attempt against a rogue lock; return the reason the attempt failed.
fn rogue_attempt(tamper: impl Fn(&mut ServerVerify), flip_tag: bool) -> Error {
    let fixture = Fixture::new(3);
    let now = Instant::now();
    let mut client = fixture.client(fixture.client_config(), 1, now);
    let rogue = RogueLock::answer_hello(Fixture::new(3), &mut client, now);
    let mut frame = rogue.server_verify(&mut client, tamper);
    if flip_tag {
        let last = frame.len() - 1;
        frame[last] ^= 0x01;
    }
    client.handle_input(now, Channel::PtlsTx, &frame);
    let events: Vec<Event> = std::iter::from_fn(|| client.poll_event()).collect();
    match events.as_slice() {
        [Event::HandshakeRetry { attempt: 2, reason }] => {
            // The attempt was abandoned for a fresh hello, never continued.
            let out = sent(&mut client);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].bytes[0], wire::HDR_HELLO);
            reason.clone()
        }
        other => panic!("expected one retry, got {other:?}"),
    }
}

#[test]
fn rogue_server_verify_without_tampering_is_accepted() {
    let fixture = Fixture::new(3);
    let now = Instant::now();
    let mut client = fixture.client(fixture.client_config(), 1, now);
    let rogue = RogueLock::answer_hello(Fixture::new(3), &mut client, now);
    let frame = rogue.server_verify(&mut client, |_| {});
    client.handle_input(now, Channel::PtlsTx, &frame);
    assert_eq!(client.poll_event(), None);
    let cv = sent(&mut client);
    assert!(
        cv.len() >= 2,
        "client verify fragments follow a good server verify"
    );
    assert_eq!(cv.last().unwrap().bytes[0], wire::HDR_CLIENT_VERIFY_II);
}

#[test]
fn wrong_hello_hash_is_fatal_for_the_attempt() {
    assert_eq!(
        rogue_attempt(|sv| sv.hash[0] ^= 1, false),
        Error::HelloHashMismatch
    );
    assert_eq!(
        rogue_attempt(|sv| sv.hash.truncate(31), false),
        Error::HelloHashMismatch
    );
}

#[test]
fn wrong_echoed_auth_is_fatal_for_the_attempt() {
    assert_eq!(
        rogue_attempt(|sv| sv.auth[7] ^= 1, false),
        Error::AuthMismatch
    );
}

#[test]
fn bad_lock_signature_is_fatal_for_the_attempt() {
    assert_eq!(
        rogue_attempt(|sv| sv.signature[10] ^= 1, false),
        Error::BadLockSignature
    );
    assert_eq!(
        rogue_attempt(|sv| sv.signature.clear(), false),
        Error::BadLockSignature
    );
}

#[test]
fn tampered_server_verify_tag_is_fatal_for_the_attempt() {
    assert_eq!(rogue_attempt(|_| {}, true), Error::ServerVerifyTag);
}

#[test]
fn lock_signing_with_another_key_fails_after_all_attempts() {
    let f = Fixture::new(4);
    let mut config = f.client_config();
    config.lock_public_key = *Fixture::new(5).lock_key.verifying_key();
    let now = Instant::now();
    let lock = f.server(f.server_config(), 9, now);
    let client = f.client(config, 8, now);
    let mut p = Pair::new(client, lock, now, &clean());
    let (reason, events) = closed_reason(&mut p);
    assert_eq!(
        reason,
        Error::HandshakeFailed {
            attempts: 3,
            last: Box::new(Error::BadLockSignature)
        }
    );
    let retries = events
        .iter()
        .filter(|e| matches!(e, Event::HandshakeRetry { .. }))
        .count();
    assert_eq!(retries, 2, "at most two restarts");
}

fn cert_failure(make: impl Fn(&Fixture) -> Vec<u8>) -> (Error, Vec<ServerEvent>) {
    let f = Fixture::new(6);
    let mut config = f.client_config();
    config.certificate = make(&f);
    let now = Instant::now();
    let lock = f.server(f.server_config(), 2, now);
    let client = f.client(config, 3, now);
    let mut p = Pair::new(client, lock, now, &clean());
    let (reason, _) = closed_reason(&mut p);
    (reason, server_events(&mut p))
}

fn lock_cert_error(events: &[ServerEvent]) -> CertError {
    events
        .iter()
        .find_map(|e| match e {
            ServerEvent::AlertSent {
                alert: Alert::InvalidCert,
                cause: Error::Certificate(c),
            } => Some(*c),
            _ => None,
        })
        .expect("lock sent ALERT 0x05 for the certificate")
}

fn cert_with(f: &Fixture, edit: impl Fn(&mut AccessCertificate)) -> Vec<u8> {
    let mut c = AccessCertificate {
        device_id: f.device_id,
        not_before_ms: f.unix_ms - 1000,
        not_after_ms: f.unix_ms + 1000,
        permissions: PERM_ALL,
        client_id: [1; 16],
        client_public_key: AccessCertificate::client_key_point(f.client_key.verifying_key()),
    };
    edit(&mut c);
    c.sign(&f.authority)
}

#[test]
fn expired_certificate_gets_alert_invalid_cert() {
    let (reason, events) = cert_failure(|f| {
        cert_with(f, |c| {
            c.not_before_ms = f.unix_ms - 20 * 86_400_000;
            c.not_after_ms = f.unix_ms - 10 * 86_400_000;
        })
    });
    assert_eq!(reason, Error::Alert(Alert::InvalidCert));
    assert!(matches!(
        lock_cert_error(&events),
        CertError::OutsideValidity { .. }
    ));
}

#[test]
fn certificate_for_another_device_gets_alert_invalid_cert() {
    let (reason, events) = cert_failure(|f| cert_with(f, |c| c.device_id = 99));
    assert_eq!(reason, Error::Alert(Alert::InvalidCert));
    assert_eq!(
        lock_cert_error(&events),
        CertError::WrongDevice {
            cert: 99,
            lock: 4242
        }
    );
}

#[test]
fn certificate_signed_by_another_authority_gets_alert_invalid_cert() {
    let (reason, events) = cert_failure(|f| {
        let mut other = Fixture::new(7);
        other.client_key = f.client_key.clone();
        other.device_id = f.device_id;
        other.unix_ms = f.unix_ms;
        other.certificate(PERM_ALL)
    });
    assert_eq!(reason, Error::Alert(Alert::InvalidCert));
    assert_eq!(lock_cert_error(&events), CertError::BadSignature);
}

#[test]
fn unregistered_lock_answers_alert_not_registered_and_client_stops() {
    let f = Fixture::new(8);
    let mut p = f.pair(1, &clean());
    p.lock.set_registered(false);
    let (reason, events) = closed_reason(&mut p);
    assert_eq!(reason, Error::Alert(Alert::NotRegistered));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::HandshakeRetry { .. })),
        "no retry loop"
    );
}

#[test]
fn no_trusted_time_then_signed_time_then_handshake() {
    use lockbridge::sim::model::{Behaviour, LockEndpoint};
    let f = Fixture::new(9);
    let now = Instant::now();
    let lock = LockEndpoint::for_fixture(
        &f,
        Behaviour {
            trusted_time: false,
            ..Behaviour::default()
        },
        1,
        now,
    );
    let client = f.client(f.client_config(), 2, now);
    let mut p = Pair::new(client, lock, now, &clean());
    let sign_time = |ms: u64| {
        let datetime = ms.to_be_bytes();
        let sig: Signature = f.authority.sign(&datetime);
        SignedTime {
            datetime,
            signature: sig.to_der().as_bytes().to_vec(),
        }
    };
    let mut seen = Vec::new();
    let ok = p.drive(Duration::from_secs(30), |p| {
        while let Some(e) = p.client.poll_event() {
            if e == Event::NeedSignedTime {
                let now = p.now;
                p.client.send_signed_time(now, &sign_time(f.unix_ms));
            }
            seen.push(e);
        }
        p.client.is_established()
    });
    assert!(ok, "{seen:?}");
    assert_eq!(seen[0], Event::AlertReceived(Alert::NoTrustedTime));
    assert_eq!(seen[1], Event::NeedSignedTime);
    assert_eq!(seen[2], Event::SignedTimeAccepted);
    assert!(p.lock.lock.has_trusted_time());
}

#[test]
fn signed_time_older_than_the_last_accepted_is_rejected() {
    use lockbridge::sim::model::{Behaviour, LockEndpoint};
    let f = Fixture::new(10);
    let now = Instant::now();
    let mut lock = LockEndpoint::for_fixture(
        &f,
        Behaviour {
            trusted_time: false,
            ..Behaviour::default()
        },
        1,
        now,
    );
    let signed = |ms: u64| {
        let datetime = ms.to_be_bytes();
        let sig: Signature = f.authority.sign(&datetime);
        SignedTime {
            datetime,
            signature: sig.to_der().as_bytes().to_vec(),
        }
    };
    use lockbridge::ptls::pair::Endpoint;
    let send = |lock: &mut LockEndpoint, st: &SignedTime| {
        lock.handle_input(now, Channel::ApiCommands, &wire::frame(0x00, &st.command()));
        std::iter::from_fn(|| lock.poll_transmit()).collect::<Vec<_>>()
    };
    let out = send(&mut lock, &signed(f.unix_ms));
    assert_eq!(out[0].bytes, vec![0x00, op::SET_SIGNED_DATETIME, 0x00]);
    assert_eq!(out[1].bytes, vec![0x00, 0x7B, 0x00]);
    let out = send(&mut lock, &signed(f.unix_ms - 1));
    assert_eq!(out[0].bytes, vec![0x00, op::SET_SIGNED_DATETIME, 0x02]);
    assert_eq!(out[1].bytes, vec![0x00, 0x7B, 0x01]);
}

#[test]
fn replayed_and_skipped_records_end_the_session_on_both_sides() {
    // Lock side: a replayed command record gets ALERT 0x01 and the session is dropped.
    let f = Fixture::new(11);
    let mut p = f.pair(1, &clean());
    establish(&mut p);
    let now = p.now;
    p.client.send_command(now, &[op::GET_STATE]).unwrap();
    let record = p.client.poll_transmit().unwrap();
    p.lock
        .handle_input(now, Channel::ApiCommands, &record.bytes);
    assert!(matches!(
        p.lock.poll_event(),
        Some(ServerEvent::Command { .. })
    ));
    p.lock
        .handle_input(now, Channel::ApiCommands, &record.bytes);
    let events = server_events(&mut p);
    assert!(events.iter().any(|e| matches!(
        e,
        ServerEvent::AlertSent {
            alert: Alert::Error,
            cause: Error::RecordTag(Channel::ApiCommands)
        }
    )));
    assert!(!p.lock.is_established());

    // Client side: a replayed response and a skipped counter each end the session.
    for skip in [false, true] {
        let mut p = f.pair(2, &clean());
        establish(&mut p);
        let now = p.now;
        p.client.send_command(now, &[op::GET_STATE]).unwrap();
        let _ = p.client.poll_transmit();
        p.lock
            .send_response(now, &[op::GET_STATE, 0, 6, 0])
            .unwrap();
        p.lock
            .send_response(now, &[op::GET_STATE, 0, 6, 0])
            .unwrap();
        let first = p.lock.poll_transmit().unwrap();
        let second = p.lock.poll_transmit().unwrap();
        if skip {
            p.client
                .handle_input(now, Channel::ApiCommands, &second.bytes);
        } else {
            p.client
                .handle_input(now, Channel::ApiCommands, &first.bytes);
            assert!(matches!(p.client.poll_event(), Some(Event::Response(_))));
            p.client
                .handle_input(now, Channel::ApiCommands, &first.bytes);
        }
        let events: Vec<Event> = std::iter::from_fn(|| p.client.poll_event()).collect();
        assert!(
            events.contains(&Event::SessionEnded {
                reason: Error::RecordTag(Channel::ApiCommands)
            }),
            "skip={skip}: {events:?}"
        );
        assert!(!p.client.is_established());
        assert_eq!(
            p.client.poll_transmit().unwrap().bytes[0],
            wire::HDR_HELLO,
            "re-handshake"
        );
    }
}

#[test]
fn out_of_phase_fragment_gets_alert_error() {
    let f = Fixture::new(12);
    let now = Instant::now();
    let mut lock = f.server(f.server_config(), 1, now);
    lock.handle_input(now, Channel::PtlsRx, &[wire::HDR_CLIENT_VERIFY_II, 1, 2, 3]);
    assert_eq!(
        lock.poll_transmit().unwrap().bytes,
        vec![wire::HDR_ALERT, 0x01]
    );
    assert!(matches!(
        lock.poll_event(),
        Some(ServerEvent::AlertSent {
            alert: Alert::Error,
            cause: Error::FragmentOutOfPhase
        })
    ));
    // Also after the hello, before the challenge.
    let mut p = f.pair(3, &clean());
    let hello = p.client.poll_transmit().unwrap();
    p.lock.handle_input(now, Channel::PtlsRx, &hello.bytes);
    let _sh = p.lock.poll_transmit().unwrap();
    p.lock
        .handle_input(now, Channel::PtlsRx, &[wire::HDR_CLIENT_VERIFY_I, 9]);
    assert_eq!(
        p.lock.poll_transmit().unwrap().bytes,
        vec![wire::HDR_ALERT, 0x01]
    );
}

#[test]
fn reassembly_over_1024_bytes_gets_alert_error() {
    let f = Fixture::new(13);
    let mut p = f.pair(1, &clean());
    let now = p.now;
    let hello = p.client.poll_transmit().unwrap();
    p.lock.handle_input(now, Channel::PtlsRx, &hello.bytes);
    let sh = p.lock.poll_transmit().unwrap();
    p.client.handle_input(now, Channel::PtlsTx, &sh.bytes);
    let ch = p.client.poll_transmit().unwrap();
    p.lock.handle_input(now, Channel::PtlsRx, &ch.bytes);
    let _sv = p.lock.poll_transmit().unwrap();
    for _ in 0..5 {
        p.lock.handle_input(
            now,
            Channel::PtlsRx,
            &[vec![wire::HDR_CLIENT_VERIFY_I], vec![0; 243]].concat(),
        );
    }
    assert_eq!(
        p.lock.poll_transmit().unwrap().bytes,
        vec![wire::HDR_ALERT, 0x01]
    );
    assert!(server_events(&mut p).iter().any(|e| matches!(
        e,
        ServerEvent::AlertSent {
            cause: Error::ReassemblyOverflow,
            ..
        }
    )));
}

#[test]
fn unanswered_flight_is_resent_identically_at_1_3_7_s_then_restarted_from_a_fresh_hello() {
    let f = Fixture::new(14);
    let t0 = Instant::now();
    let mut client = f.client(f.client_config(), 1, t0);
    let mut log: Vec<(Duration, Vec<u8>)> = sent(&mut client)
        .into_iter()
        .map(|t| (Duration::ZERO, t.bytes))
        .collect();
    let mut closed = None;
    while closed.is_none() {
        let at = client
            .poll_timeout()
            .expect("a timer is armed until the client closes");
        client.handle_timeout(at);
        log.extend(sent(&mut client).into_iter().map(|t| (at - t0, t.bytes)));
        while let Some(e) = client.poll_event() {
            if let Event::Closed(r) = e {
                closed = Some((at - t0, r));
            }
        }
    }
    let s = Duration::from_secs;
    let times: Vec<Duration> = log.iter().map(|(t, _)| *t).collect();
    // Three attempts, each: hello at +0, +1, +3, +7, restarted by the 10 s deadline.
    assert_eq!(
        times,
        vec![
            s(0),
            s(1),
            s(3),
            s(7),
            s(10),
            s(11),
            s(13),
            s(17),
            s(20),
            s(21),
            s(23),
            s(27)
        ]
    );
    for attempt in log.chunks(4) {
        assert!(
            attempt.iter().all(|(_, b)| b == &attempt[0].1),
            "retransmissions are byte-identical"
        );
    }
    assert_ne!(log[0].1, log[4].1, "a restart sends a fresh hello");
    assert_ne!(log[4].1, log[8].1);
    let (at, reason) = closed.unwrap();
    assert_eq!(at, s(30));
    assert_eq!(
        reason,
        Error::HandshakeFailed {
            attempts: 3,
            last: Box::new(Error::HandshakeDeadline)
        }
    );
}

#[test]
fn without_a_deadline_the_exhausted_backoff_restarts_at_15_s() {
    let f = Fixture::new(15);
    let mut config = f.client_config();
    config.timing.handshake_deadline = Duration::from_secs(3600);
    let t0 = Instant::now();
    let mut client = f.client(config, 1, t0);
    let _ = sent(&mut client);
    let mut retry_at = None;
    while retry_at.is_none() {
        let at = client.poll_timeout().unwrap();
        client.handle_timeout(at);
        let _ = sent(&mut client);
        if let Some(Event::HandshakeRetry { reason, .. }) = client.poll_event() {
            assert_eq!(reason, Error::FlightUnanswered);
            retry_at = Some(at - t0);
        }
    }
    assert_eq!(retry_at, Some(Duration::from_secs(15)));
}

#[test]
fn lock_resends_its_last_flight_when_the_client_repeats_its_own() {
    let f = Fixture::new(16);
    let mut p = f.pair(1, &clean());
    let now = p.now;
    let hello = p.client.poll_transmit().unwrap();
    p.lock.handle_input(now, Channel::PtlsRx, &hello.bytes);
    let sh = p.lock.poll_transmit().unwrap();
    p.lock.handle_input(now, Channel::PtlsRx, &hello.bytes);
    assert_eq!(
        p.lock.poll_transmit().unwrap(),
        sh,
        "server hello resent byte-identically"
    );
    p.client.handle_input(now, Channel::PtlsTx, &sh.bytes);
    let challenge = p.client.poll_transmit().unwrap();
    p.lock.handle_input(now, Channel::PtlsRx, &challenge.bytes);
    let sv = p.lock.poll_transmit().unwrap();
    p.lock.handle_input(now, Channel::PtlsRx, &challenge.bytes);
    assert_eq!(p.lock.poll_transmit().unwrap(), sv, "server verify resent");
    // A stale copy of the hello now is ignored rather than restarting the handshake.
    p.lock.handle_input(now, Channel::PtlsRx, &hello.bytes);
    assert_eq!(p.lock.poll_transmit(), None);
    p.client.handle_input(now, Channel::PtlsTx, &sv.bytes);
    let cv = sent(&mut p.client);
    for t in &cv {
        p.lock.handle_input(now, Channel::PtlsRx, &t.bytes);
    }
    let init = p.lock.poll_transmit().unwrap();
    assert_eq!(init.bytes[0], wire::HDR_INITIALIZED);
    for t in &cv {
        p.lock.handle_input(now, Channel::PtlsRx, &t.bytes);
    }
    assert_eq!(
        p.lock.poll_transmit().unwrap(),
        init,
        "INITIALIZED resent for a repeated client verify"
    );
    assert!(p.lock.is_established());
}

#[test]
fn lost_first_fragment_is_completed_by_the_retransmission() {
    let f = Fixture::new(17);
    let mut p = f.pair(1, &clean());
    let now = p.now;
    let hello = p.client.poll_transmit().unwrap();
    p.lock.handle_input(now, Channel::PtlsRx, &hello.bytes);
    p.client
        .handle_input(now, Channel::PtlsTx, &p.lock.poll_transmit().unwrap().bytes);
    p.lock.handle_input(
        now,
        Channel::PtlsRx,
        &p.client.poll_transmit().unwrap().bytes,
    );
    p.client
        .handle_input(now, Channel::PtlsTx, &p.lock.poll_transmit().unwrap().bytes);
    let cv = sent(&mut p.client);
    assert!(cv.len() >= 2);
    // First transmission: the first fragment is lost.
    for t in &cv[1..] {
        p.lock.handle_input(now, Channel::PtlsRx, &t.bytes);
    }
    assert_eq!(
        p.lock.poll_transmit(),
        None,
        "a partial flight gets no alert"
    );
    // The retransmission after 1 s completes the handshake.
    let later = now + Duration::from_secs(1);
    p.client.handle_timeout(later);
    for t in sent(&mut p.client) {
        p.lock.handle_input(later, Channel::PtlsRx, &t.bytes);
    }
    assert_eq!(
        p.lock.poll_transmit().unwrap().bytes[0],
        wire::HDR_INITIALIZED
    );
}

#[test]
fn data_records_are_never_retransmitted() {
    let f = Fixture::new(18);
    let mut p = f.pair(1, &clean());
    establish(&mut p);
    let t = p.now;
    p.client.send_command(t, &[op::UNLOCK, 0]).unwrap();
    let first = sent(&mut p.client);
    assert_eq!(first.len(), 1);
    // Nothing reaches the lock; run a minute of virtual time on the client alone.
    let mut later = Vec::new();
    let mut unanswered_at = None;
    while let Some(at) = p
        .client
        .poll_timeout()
        .filter(|at| *at < t + Duration::from_secs(60))
    {
        p.client.handle_timeout(at);
        later.extend(sent(&mut p.client));
        while let Some(e) = p.client.poll_event() {
            if let Event::CommandUnanswered { opcode, why } = e {
                assert_eq!((opcode, why), (op::UNLOCK, Unanswered::Timeout));
                unanswered_at = Some(at - t);
            }
        }
    }
    assert!(
        later.iter().all(|tx| tx.channel != Channel::ApiCommands),
        "command never resent"
    );
    assert_eq!(unanswered_at, Some(Duration::from_secs(5)));
}

#[test]
fn late_response_is_reported_as_such() {
    let f = Fixture::new(19);
    let mut p = f.pair(1, &clean());
    establish(&mut p);
    let t = p.now;
    p.client.send_command(t, &[op::UNLOCK, 0]).unwrap();
    let cmd = p.client.poll_transmit().unwrap();
    p.client.handle_timeout(t + Duration::from_secs(5));
    assert!(matches!(
        p.client.poll_event(),
        Some(Event::CommandUnanswered { .. })
    ));
    p.lock.handle_input(t, Channel::ApiCommands, &cmd.bytes);
    p.lock.send_response(t, &[op::UNLOCK, 0]).unwrap();
    let resp = p.lock.poll_transmit().unwrap();
    p.client.handle_input(
        t + Duration::from_secs(6),
        Channel::ApiCommands,
        &resp.bytes,
    );
    assert!(
        matches!(p.client.poll_event(), Some(Event::LateResponse(r)) if r.opcode == op::UNLOCK)
    );
}

#[test]
fn lock_ends_a_session_at_24_h_with_alert_timeout_and_the_client_rehandshakes() {
    let f = Fixture::new(20);
    let now = Instant::now();
    let mut config = f.client_config();
    config.timing = ClientTiming {
        rehandshake_after: Duration::from_secs(25 * 3600),
        ..ClientTiming::default()
    };
    let lock = f.server(f.server_config(), 1, now);
    let client = f.client(config, 2, now);
    let mut p = Pair::new(client, lock, now, &clean());
    establish(&mut p);
    let established = p.now;
    let mut ended_at = None;
    p.drive(Duration::from_secs(25 * 3600), |p| {
        for e in std::iter::from_fn(|| p.client.poll_event()) {
            if e == (Event::SessionEnded {
                reason: Error::Alert(Alert::Timeout),
            }) {
                ended_at = Some(p.now);
            }
        }
        ended_at.is_some() && p.client.is_established()
    });
    assert_eq!(
        ended_at.map(|t| t - established),
        Some(Duration::from_secs(24 * 3600))
    );
    assert!(p.client.is_established(), "a new session follows");
}

#[test]
fn client_rehandshakes_proactively_at_23_h_30_min_before_the_lock_would_expire_it() {
    let f = Fixture::new(21);
    let mut p = f.pair(1, &clean());
    establish(&mut p);
    let established = p.now;
    let mut ended = None;
    p.drive(Duration::from_secs(48 * 3600), |p| {
        for e in std::iter::from_fn(|| p.client.poll_event()) {
            if let Event::SessionEnded { reason } = e {
                ended.get_or_insert((p.now, reason));
            }
        }
        ended.is_some() && p.client.is_established()
    });
    let (at, reason) = ended.unwrap();
    assert_eq!(reason, Error::SessionAged);
    assert_eq!(at - established, Duration::from_secs(23 * 3600 + 30 * 60));
    assert!(
        !server_events(&mut p)
            .iter()
            .any(|e| matches!(e, ServerEvent::AlertSent { .. }))
    );
}

#[test]
fn rehandshake_is_deferred_until_the_outstanding_command_is_answered() {
    let f = Fixture::new(22);
    let mut p = f.pair(1, &clean());
    establish(&mut p);
    let due = p.now + Duration::from_secs(23 * 3600 + 30 * 60);
    let before = due - Duration::from_millis(1);
    p.client.send_command(before, &[op::UNLOCK, 0]).unwrap();
    let cmd = p.client.poll_transmit().unwrap();
    p.client.handle_timeout(due);
    assert!(p.client.is_established(), "waits for the response");
    assert_eq!(p.client.poll_transmit(), None);
    p.lock.handle_input(due, Channel::ApiCommands, &cmd.bytes);
    p.lock.send_response(due, &[op::UNLOCK, 0]).unwrap();
    let resp = p.lock.poll_transmit().unwrap();
    p.client
        .handle_input(due, Channel::ApiCommands, &resp.bytes);
    let events: Vec<Event> = std::iter::from_fn(|| p.client.poll_event()).collect();
    assert!(matches!(events[0], Event::Response(_)));
    assert_eq!(
        events[1],
        Event::SessionEnded {
            reason: Error::SessionAged
        }
    );
    assert_eq!(p.client.poll_transmit().unwrap().bytes[0], wire::HDR_HELLO);
}

#[test]
fn client_rehandshakes_before_counter_exhaustion() {
    let f = Fixture::new(23);
    let mut p = f.pair(1, &clean());
    establish(&mut p);
    let now = p.now;
    let mut exchanges = 0u32;
    while p.client.send_command(now, &[op::GET_STATE]).is_ok() {
        let cmd = p.client.poll_transmit().unwrap();
        p.lock.handle_input(now, Channel::ApiCommands, &cmd.bytes);
        let _ = p.lock.poll_event();
        p.lock
            .send_response(now, &[op::GET_STATE, 0, 6, 0])
            .unwrap();
        let resp = p.lock.poll_transmit().unwrap();
        p.client
            .handle_input(now, Channel::ApiCommands, &resp.bytes);
        exchanges += 1;
        if !p.client.is_established() {
            break;
        }
        let _ = p.client.poll_event();
    }
    assert_eq!(exchanges, 0xFF00);
    let events: Vec<Event> = std::iter::from_fn(|| p.client.poll_event()).collect();
    assert!(
        events.contains(&Event::SessionEnded {
            reason: Error::CountersExhausted
        }),
        "{events:?}"
    );
    assert!(
        p.drive(Duration::from_secs(30), |p| p.client.is_established()),
        "a fresh session follows"
    );
}

#[test]
fn lock_ends_the_session_when_its_counters_run_out() {
    let f = Fixture::new(24);
    let now = Instant::now();
    let mut config = f.server_config();
    config.max_records = 3;
    let lock = f.server(config, 1, now);
    let client = f.client(f.client_config(), 2, now);
    let mut p = Pair::new(client, lock, now, &clean());
    establish(&mut p);
    for _ in 0..3 {
        assert!(p.lock.send_notification(now, &[0xBA, 6, 0]).is_ok());
    }
    assert!(p.lock.send_notification(now, &[0xBA, 6, 0]).is_err());
    assert!(!p.lock.is_established());
    let alert = std::iter::from_fn(|| p.lock.poll_transmit())
        .last()
        .unwrap();
    assert_eq!(alert.bytes, vec![wire::HDR_ALERT, 0x03]);
}

#[test]
fn lock_drops_a_client_that_sends_no_hello_within_10_s() {
    let f = Fixture::new(25);
    let t0 = Instant::now();
    let mut lock = f.server(f.server_config(), 1, t0);
    assert_eq!(lock.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    lock.handle_timeout(t0 + Duration::from_secs(10));
    assert!(matches!(
        lock.poll_event(),
        Some(ServerEvent::Disconnect(
            lockbridge::ptls::DisconnectReason::HelloTimeout
        ))
    ));
}

#[test]
fn lock_accepts_at_most_three_connections() {
    use lockbridge::sim::model::{Behaviour, Lock, Refusal};
    let f = Fixture::new(26);
    let now = Instant::now();
    let mut lock = Lock::for_fixture(&f, Behaviour::default(), 1, now);
    let ids: Vec<_> = (0..3).map(|_| lock.connect(now, 247).unwrap().0).collect();
    assert_eq!(lock.connect(now, 247), Err(Refusal::TooManyConnections));
    lock.disconnect(ids[0]);
    assert!(
        lock.connect(now, 247).is_ok(),
        "a freed slot can be used again"
    );
}

#[test]
fn client_refuses_an_att_mtu_below_156() {
    let f = Fixture::new(27);
    let mut config = f.client_config();
    config.att_mtu = 155;
    assert_eq!(
        Client::new(config, Fixture::rng(1)).err(),
        Some(Error::MtuTooSmall(155))
    );
}

#[test]
fn client_sends_alert_disconnected_when_closing() {
    let f = Fixture::new(28);
    let mut p = f.pair(1, &clean());
    establish(&mut p);
    let now = p.now;
    p.client.close(now);
    assert_eq!(
        p.client.poll_transmit().unwrap().bytes,
        vec![wire::HDR_ALERT, 0x04]
    );
    assert_eq!(
        p.client.poll_event(),
        Some(Event::Closed(Error::ClosedLocally))
    );
}
