//! Seed corpora for the fuzz targets in `fuzz/`, taken from real traffic: a handshake, commands,
//! responses and notifications between the PTLS client and lock through the pair harness (the
//! same endpoints the test suite drives), sim-socket messages of a session, CoAP requests as
//! clients send them, MQTT command payloads, and the shipped configuration files.
//!
//! `cargo run --example fuzz_seeds -- fuzz/corpus` (tests/run.sh does this before fuzzing).

#![allow(clippy::print_stdout)] // a command-line tool: it reports what it wrote

use std::path::{Path, PathBuf};

use anyhow::Context;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};

use lockbridge::fault::FaultConfig;
use lockbridge::ptls::api::{LockState, Response, notif, op, result};
use lockbridge::ptls::pair::Fixture;
use lockbridge::ptls::{Channel, ServerEvent, Transmit};
use lockbridge::sim::wire::SimMsg;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let mut corpus = Corpus { root, written: 0 };
    ptls_traffic(&mut corpus)?;
    sim_socket(&mut corpus)?;
    coap_requests(&mut corpus)?;
    dtls_datagrams(&mut corpus)?;
    mqtt_commands(&mut corpus)?;
    configs(&mut corpus)?;
    println!("{} seeds in {}", corpus.written, corpus.root.display());
    Ok(())
}

struct Corpus {
    root: PathBuf,
    written: usize,
}

impl Corpus {
    fn add(&mut self, target: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        let path = dir.join(format!("seed-{:04}", self.written));
        std::fs::write(&path, bytes).with_context(|| path.display().to_string())?;
        self.written += 1;
        Ok(())
    }
}

/// Frames in the fuzz targets' input form: `CHANNEL ‖ LEN ‖ BYTES` each.
fn framed(frames: &[Transmit]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in frames {
        let channel = Channel::ALL
            .iter()
            .position(|c| *c == t.channel)
            .expect("every channel is in ALL");
        let bytes = &t.bytes[..t.bytes.len().min(255)];
        out.push(channel as u8);
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
    out
}

/// A whole session through the pair harness: each side's frames per handshake stage, and the
/// plaintexts and records of commands, responses and notifications.
fn ptls_traffic(corpus: &mut Corpus) -> anyhow::Result<()> {
    let f = Fixture::new(301);
    let mut p = f.pair(7, &FaultConfig::default());
    let now = p.now;
    let (mut to_lock, mut to_client) = (Vec::new(), Vec::new());
    while !p.client.is_established() {
        if let Some(t) = p.client.poll_transmit() {
            p.lock.handle_input(now, t.channel, &t.bytes);
            to_lock.push(t);
        } else if let Some(t) = p.lock.poll_transmit() {
            p.client.handle_input(now, t.channel, &t.bytes);
            to_client.push(t);
        } else {
            anyhow::bail!("the fixture's handshake stalled");
        }
    }
    let (handshake_to_lock, handshake_to_client) = (to_lock.len(), to_client.len());
    // A command each way: GET_STATE answered, UNLOCK answered with its notifications.
    let mut plaintexts = Vec::new();
    for command in [vec![op::GET_STATE], vec![op::UNLOCK, 0]] {
        p.client
            .send_command(now, &command)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        while let Some(t) = p.client.poll_transmit() {
            p.lock.handle_input(now, t.channel, &t.bytes);
            to_lock.push(t);
        }
        while let Some(event) = p.lock.poll_event() {
            if let ServerEvent::Command { body, .. } = event {
                let response = Response {
                    opcode: body[0],
                    result: result::SUCCESS,
                    data: vec![LockState::Locked.byte(), 0],
                }
                .encode();
                p.lock
                    .send_response(now, &response)
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                plaintexts.push(response);
            }
        }
        for state in [LockState::Unlocking, LockState::Unlocked] {
            let notification = vec![notif::LOCK_STATUS_CHANGE, state.byte(), 0];
            p.lock
                .send_notification(now, &notification)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            plaintexts.push(notification);
        }
        while let Some(t) = p.lock.poll_transmit() {
            p.client.handle_input(now, t.channel, &t.bytes);
            to_client.push(t);
        }
    }
    // Each stage (see lockbridge_fuzz::stage: nothing delivered, the hello, the server's
    // flight, established) with the frames that side gets next.
    let client_skip = [0, 0, 2, handshake_to_client];
    let lock_skip = [0, 1, 1, handshake_to_lock];
    for selector in 0..4 {
        let mut client_input = vec![selector as u8];
        client_input.extend(framed(&to_client[client_skip[selector]..]));
        corpus.add("ptls_client", &client_input)?;
        let mut lock_input = vec![selector as u8];
        lock_input.extend(framed(&to_lock[lock_skip[selector]..]));
        corpus.add("ptls_server", &lock_input)?;
    }
    // The client's verify flight for the lock's reassembly (`0 ‖ INDEX` picks a real
    // fragment): in order, reversed, and with a repeat.
    for order in [[0u8, 1, 2], [2, 1, 0], [0, 0, 1]] {
        let input: Vec<u8> = order.iter().flat_map(|&i| [0, i]).collect();
        corpus.add("reassembly", &input)?;
    }
    // Plaintexts for the lock to encrypt: even channel index = response, odd = notification.
    let mut api = Vec::new();
    for (i, plain) in plaintexts.iter().enumerate() {
        api.push(if i % 3 == 0 { 0 } else { 1 });
        api.push(plain.len() as u8);
        api.extend_from_slice(plain);
    }
    corpus.add("api_messages", &api)?;
    // Each message kind on its own for the parsers (selector byte first).
    for t in to_lock.iter().chain(&to_client) {
        for which in 0u8..9 {
            let mut input = vec![which];
            input.extend_from_slice(if which == 0 { &t.bytes } else { &t.bytes[1..] });
            corpus.add("ptls_messages", &input)?;
        }
    }
    for plain in &plaintexts {
        corpus.add("ptls_messages", &[&[5u8][..], plain].concat())?;
    }
    Ok(())
}

/// One sim-socket session: connect, subscribe, write, values, disconnect.
fn sim_socket(corpus: &mut Corpus) -> anyhow::Result<()> {
    let session = [
        SimMsg::Connect {
            att_mtu: 247,
            serial: "12345678-901234".into(),
        },
        SimMsg::Connected { att_mtu: 247 },
        SimMsg::Subscribe {
            channel: Channel::PtlsTx,
            on: true,
        },
        SimMsg::Subscribed {
            channel: Channel::PtlsTx,
        },
        SimMsg::Write {
            channel: Channel::PtlsRx,
            with_response: true,
            value: vec![0x03, 0x01, 0x02],
        },
        SimMsg::WriteAck {
            channel: Channel::PtlsRx,
        },
        SimMsg::WriteError {
            channel: Channel::PtlsRx,
            att_error: 0x0D,
        },
        SimMsg::Value {
            channel: Channel::Notifications,
            value: vec![notif::LOCK_STATUS_CHANGE, 2, 0],
        },
        SimMsg::Refused { reason: 2 },
        SimMsg::Disconnect { reason: 1 },
    ];
    let mut stream = Vec::new();
    for msg in &session {
        let bytes = msg.encode();
        corpus.add("sim_socket", &bytes)?;
        stream.extend(bytes);
    }
    corpus.add("sim_socket", &stream)
}

/// The requests `ctl` and libcoap's clients send: every resource, commands with and without a
/// body, Observe, and a block-wise continuation.
fn coap_requests(corpus: &mut Corpus) -> anyhow::Result<()> {
    let requests: [(RequestType, &str, &str, Option<u32>); 7] = [
        (RequestType::Get, ".well-known/core", "", None),
        (RequestType::Get, "gateway", "", None),
        (RequestType::Get, "locks", "", None),
        (RequestType::Get, "locks/lock-1", "", Some(0)),
        (RequestType::Post, "locks/lock-1/unlock", "", None),
        (
            RequestType::Post,
            "locks/lock-1/lock",
            r#"{"mode":"force","request_id":"door-42"}"#,
            None,
        ),
        (RequestType::Delete, "locks", "", None),
    ];
    for (i, (method, path, body, observe)) in requests.into_iter().enumerate() {
        let mut packet = Packet::new();
        packet.header.set_version(1);
        packet.header.set_type(MessageType::Confirmable);
        packet.header.code = MessageClass::Request(method);
        packet.header.message_id = 0x1000 + i as u16;
        packet.set_token(vec![0xA0, i as u8]);
        for segment in path.split('/') {
            packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        if let Some(o) = observe {
            packet.set_observe_value(o);
        }
        packet.payload = body.as_bytes().to_vec();
        let bytes = packet.to_bytes().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        corpus.add("coap_request", &bytes)?;
    }
    // GET /locks asking for its second block of 64 bytes (Block2: NUM 1, SZX 2).
    let mut packet = Packet::new();
    packet.header.set_version(1);
    packet.header.code = MessageClass::Request(RequestType::Get);
    packet.add_option(CoapOption::UriPath, b"locks".to_vec());
    packet.add_option(CoapOption::Block2, vec![0x12]);
    let bytes = packet.to_bytes().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    corpus.add("coap_request", &bytes)
}

/// A DTLS record of `content_type` in `epoch` holding `fragment`.
fn dtls_record(content_type: u8, epoch: u16, seq: u64, fragment: &[u8]) -> Vec<u8> {
    let mut r = vec![content_type, 0xFE, 0xFD];
    r.extend_from_slice(&epoch.to_be_bytes());
    r.extend_from_slice(&seq.to_be_bytes()[2..]);
    r.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
    r.extend_from_slice(fragment);
    r
}

/// A handshake message in one fragment.
fn dtls_message(msg_type: u8, msg_seq: u16, body: &[u8]) -> Vec<u8> {
    let len = (body.len() as u32).to_be_bytes();
    let mut h = vec![msg_type];
    h.extend_from_slice(&len[1..]);
    h.extend_from_slice(&msg_seq.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0]);
    h.extend_from_slice(&len[1..]);
    h.extend_from_slice(body);
    h
}

/// A PSK handshake's datagrams as the endpoint sees them (ClientHello, HelloVerifyRequest,
/// ClientHello with the cookie, ServerHello … ServerHelloDone, ClientKeyExchange with
/// ChangeCipherSpec and an encrypted Finished), in the `dtls_datagrams` input form.
fn dtls_datagrams(corpus: &mut Corpus) -> anyhow::Result<()> {
    let hello = |cookie: &[u8]| {
        let mut b = vec![0xFE, 0xFD];
        b.extend_from_slice(&[7u8; 32]);
        b.push(0);
        b.push(cookie.len() as u8);
        b.extend_from_slice(cookie);
        b.extend_from_slice(&[0, 2, 0x00, 0xA8, 1, 0, 0, 4, 0x00, 0x17, 0, 0]);
        b
    };
    let cookie = [0x5Au8; 20];
    let mut hvr_body = vec![0xFE, 0xFF, cookie.len() as u8];
    hvr_body.extend_from_slice(&cookie);
    let mut server_hello = vec![0xFE, 0xFD];
    server_hello.extend_from_slice(&[9u8; 32]);
    server_hello.extend_from_slice(&[0, 0x00, 0xA8, 0, 0, 4, 0x00, 0x17, 0, 0]);
    let mut flight4 = dtls_record(22, 0, 1, &dtls_message(2, 1, &server_hello));
    flight4.extend(dtls_record(
        22,
        0,
        2,
        &dtls_message(
            12,
            2,
            &[
                0, 10, b'l', b'o', b'c', b'k', b'b', b'r', b'i', b'd', b'g', b'e',
            ],
        ),
    ));
    flight4.extend(dtls_record(22, 0, 3, &dtls_message(14, 3, &[])));
    let mut flight5 = dtls_record(
        22,
        0,
        2,
        &dtls_message(16, 2, &[0, 4, b'f', b'u', b'l', b'l']),
    );
    flight5.extend(dtls_record(20, 0, 3, &[1]));
    flight5.extend(dtls_record(22, 1, 0, &[0x33; 40]));
    let datagrams: [(u8, Vec<u8>); 6] = [
        (1, dtls_record(22, 0, 0, &dtls_message(1, 0, &hello(&[])))),
        (0, dtls_record(22, 0, 0, &dtls_message(3, 0, &hvr_body))),
        (
            1,
            dtls_record(22, 0, 1, &dtls_message(1, 1, &hello(&cookie))),
        ),
        (0, flight4),
        (1, flight5),
        (1, dtls_record(23, 1, 1, &[0x44; 48])),
    ];
    let mut input = Vec::new();
    for (from_client, d) in &datagrams {
        let mut one = vec![*from_client];
        one.extend_from_slice(&(d.len() as u16).to_be_bytes());
        one.extend_from_slice(d);
        corpus.add("dtls_datagrams", &one)?;
        input.extend(one);
    }
    corpus.add("dtls_datagrams", &input)
}

/// What the MQTT tests and Home Assistant publish to `<root>/locks/<lock>/set`.
fn mqtt_commands(corpus: &mut Corpus) -> anyhow::Result<()> {
    for payload in [
        "LOCK",
        "UNLOCK",
        "OPEN",
        r#"{"action":"unlock","id":"door-42"}"#,
        r#"{"action":"lock","mode":"force","id":"a1","ttl_s":30}"#,
        r#"{"action":"pull","ttl_s":0}"#,
        "{\"action\":\"unlock\",\"id\":\"\\u0007\"}",
    ] {
        corpus.add("mqtt_command", payload.as_bytes())?;
    }
    Ok(())
}

/// Every configuration file shipped in etc/.
fn configs(corpus: &mut Corpus) -> anyhow::Result<()> {
    let etc = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc");
    for entry in std::fs::read_dir(&etc)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            corpus.add("config", &std::fs::read(&path)?)?;
        }
    }
    Ok(())
}
