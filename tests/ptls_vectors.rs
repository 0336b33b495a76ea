//! Known-answer tests against vectors computed independently in Python
//! (tests/vectors/gen_ptls_vectors.py): hello layouts, transcript hashes, the four derived keys
//! and IVs, nonces, SIG_S/SIG_C inputs and signatures, sealed records, fragmentation, and the
//! real client and server run against the other side's transcript.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test and benchmark code: a failed unwrap is a failed run

use std::time::Instant;

use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use serde_json::Value;

use lockbridge::ptls::api::Response;
use lockbridge::ptls::cert::AccessCertificate;
use lockbridge::ptls::crypto::{self, RecordKey, SharedSecret, TrafficSecret, Transcript};
use lockbridge::ptls::wire::{self, ClientHello, ClientVerify, ServerHello, ServerVerify};
use lockbridge::ptls::{
    Channel, Client, ClientConfig, ClientTiming, Event, Server, ServerConfig, ServerEvent,
    WallClock,
};

fn vectors() -> Value {
    let text = include_str!("vectors/ptls_vectors.json");
    serde_json::from_str(text).expect("vectors file is JSON")
}

fn hx(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("valid hex")
}

fn arr<const N: usize>(v: &Value) -> [u8; N] {
    hx(v).try_into().expect("right length")
}

fn scalar_key(v: &Value) -> SigningKey {
    SigningKey::from_slice(&hx(v)).expect("valid scalar")
}

/// An RNG that hands out scripted bytes, so an endpoint draws exactly the vectors' randoms and
/// ephemeral scalars (p256 draws a scalar as 32 big-endian bytes).
struct Scripted(Vec<u8>);

impl rand_core::RngCore for Scripted {
    fn next_u32(&mut self) -> u32 {
        panic!("the protocol core draws bytes only")
    }
    fn next_u64(&mut self) -> u64 {
        panic!("the protocol core draws bytes only")
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        assert!(self.0.len() >= dest.len(), "script ran out of bytes");
        let rest = self.0.split_off(dest.len());
        dest.copy_from_slice(&self.0);
        self.0 = rest;
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl rand_core::CryptoRng for Scripted {}

#[test]
fn hellos_hashes_keys_and_ivs_match() {
    let v = vectors();
    let i = &v["inputs"];
    let ce = p256::SecretKey::from_slice(&hx(&i["client_ephemeral_scalar"])).unwrap();
    let se = p256::SecretKey::from_slice(&hx(&i["server_ephemeral_scalar"])).unwrap();
    let ch = ClientHello {
        mtu: 244,
        random: arr(&i["client_random"]),
        public: wire::encode_point(&ce.public_key()),
    }
    .encode();
    assert_eq!(ch.to_vec(), hx(&v["client_hello"]));
    let sh = ServerHello {
        mtu: 244,
        random: arr(&i["server_random"]),
        public: wire::encode_point(&se.public_key()),
    }
    .encode();
    assert_eq!(sh.to_vec(), hx(&v["server_hello"]));
    assert_eq!(
        ClientHello::parse(&ch).unwrap().unwrap().public.to_vec(),
        hx(&v["client_ephemeral_public"])
    );
    assert_eq!(ServerHello::parse(&sh).unwrap().encode(), sh);

    let z = SharedSecret::new(&ce, &se.public_key());
    assert_eq!(z.as_bytes().to_vec(), hx(&v["z"]));
    assert_eq!(
        SharedSecret::new(&se, &ce.public_key()).as_bytes(),
        z.as_bytes()
    );
    let hello_hash = crypto::sha256(&[ch.as_slice(), sh.as_slice()].concat());
    assert_eq!(hello_hash.to_vec(), hx(&v["hello_hash"]));

    let check = |label: &[u8; 16], h: &[u8; 32], key: &str, iv: &str| {
        let t = TrafficSecret::derive(&z, label, h);
        assert_eq!(t.key.to_vec(), hx(&v[key]), "{key}");
        assert_eq!(t.base_iv.to_vec(), hx(&v[iv]), "{iv}");
    };
    check(
        crypto::LABEL_CLIENT_HS,
        &hello_hash,
        "client_hs_key",
        "client_hs_iv",
    );
    check(
        crypto::LABEL_SERVER_HS,
        &hello_hash,
        "server_hs_key",
        "server_hs_iv",
    );
    let hs_hash: [u8; 32] = arr(&v["hs_hash"]);
    check(
        crypto::LABEL_CLIENT_AP,
        &hs_hash,
        "client_ap_key",
        "client_ap_iv",
    );
    check(
        crypto::LABEL_SERVER_AP,
        &hs_hash,
        "server_ap_key",
        "server_ap_iv",
    );

    for ex in v["nonce_examples"].as_array().unwrap() {
        let iv: [u8; 12] = arr(&ex["iv"]);
        let n = u16::try_from(ex["counter"].as_u64().unwrap()).unwrap();
        assert_eq!(
            crypto::nonce(&iv, n).to_vec(),
            hx(&ex["nonce"]),
            "counter {n}"
        );
    }
}

#[test]
fn signature_inputs_signatures_and_verify_messages_match() {
    let v = vectors();
    let i = &v["inputs"];
    let ch = hx(&v["client_hello"]);
    let sh = hx(&v["server_hello"]);
    let auth: [u8; 8] = i["auth_unix_ms"].as_u64().unwrap().to_be_bytes();
    let lock = scalar_key(&i["lock_long_term_scalar"]);
    let client = scalar_key(&i["client_long_term_scalar"]);
    let authority = scalar_key(&i["authority_scalar"]);

    let sig_s_input = wire::server_signed_bytes(&ch, &sh, &auth);
    assert_eq!(sig_s_input, hx(&v["sig_s_input"]));
    let sig_s: Signature = lock.sign(&sig_s_input);
    assert_eq!(
        sig_s.to_der().as_bytes(),
        hx(&v["sig_s"]).as_slice(),
        "RFC 6979 SIG_S"
    );

    let sv = ServerVerify {
        auth,
        signature: hx(&v["sig_s"]),
        hash: hx(&v["hello_hash"]),
    }
    .encode();
    assert_eq!(sv, hx(&v["server_verify_plain"]));
    let s_hs = TrafficSecret {
        key: arr(&v["server_hs_key"]),
        base_iv: arr(&v["server_hs_iv"]),
    };
    assert_eq!(
        crypto::seal_handshake(&s_hs, &sv),
        hx(&v["server_verify_sealed"])
    );
    let mut t = Transcript::default();
    for part in [&ch, &sh, &sv] {
        t.add(part);
    }
    assert_eq!(t.hash().to_vec(), hx(&v["hello_verify_hash"]));

    let cert = AccessCertificate {
        device_id: u32::try_from(i["device_id"].as_u64().unwrap()).unwrap(),
        not_before_ms: i["cert_not_before"].as_u64().unwrap(),
        not_after_ms: i["cert_not_after"].as_u64().unwrap(),
        permissions: u32::try_from(i["cert_permissions"].as_u64().unwrap()).unwrap(),
        client_id: arr(&i["cert_client_id"]),
        client_public_key: arr(&v["client_long_term_public"]),
    };
    assert_eq!(
        cert.sign(&authority),
        hx(&v["certificate"]),
        "certificate TLV"
    );

    let sig_c_input = wire::client_signed_bytes(&ch, &sh, &sv, &hx(&v["certificate"]));
    assert_eq!(sig_c_input, hx(&v["sig_c_input"]));
    let sig_c: Signature = client.sign(&sig_c_input);
    assert_eq!(
        sig_c.to_der().as_bytes(),
        hx(&v["sig_c"]).as_slice(),
        "RFC 6979 SIG_C"
    );
    let cv = ClientVerify {
        certificate: hx(&v["certificate"]),
        signature: hx(&v["sig_c"]),
        hash: hx(&v["hello_verify_hash"]),
    }
    .encode();
    assert_eq!(cv, hx(&v["client_verify_plain"]));
    let c_hs = TrafficSecret {
        key: arr(&v["client_hs_key"]),
        base_iv: arr(&v["client_hs_iv"]),
    };
    let sealed = crypto::seal_handshake(&c_hs, &cv);
    assert_eq!(sealed, hx(&v["client_verify_sealed"]));
    let frames: Vec<Vec<u8>> = v["client_verify_frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(hx)
        .collect();
    assert_eq!(wire::fragment_client_verify(&sealed, 244), frames);
    t.add(&cv);
    assert_eq!(t.hash().to_vec(), hx(&v["hs_hash"]));

    let st = &v["signed_time"];
    let sig: Signature = authority.sign(&hx(&st["datetime"]));
    assert_eq!(sig.to_der().as_bytes(), hx(&st["signature"]).as_slice());
}

#[test]
fn records_seal_with_per_direction_counters() {
    let v = vectors();
    let c_ap = TrafficSecret {
        key: arr(&v["client_ap_key"]),
        base_iv: arr(&v["client_ap_iv"]),
    };
    let s_ap = TrafficSecret {
        key: arr(&v["server_ap_key"]),
        base_iv: arr(&v["server_ap_iv"]),
    };
    let f = &v["frames"];
    let p = &v["plaintexts"];
    let mut client_tx = RecordKey::new(&c_ap);
    let mut lock_tx = RecordKey::new(&s_ap);
    let framed = |sealed: Vec<u8>| wire::frame(wire::HDR_DATA_ENCRYPTED, &sealed);
    assert_eq!(
        framed(client_tx.seal(&hx(&p["get_state"])).unwrap()),
        hx(&f["get_state"])
    );
    // One lock→client counter for responses and notifications, in send order.
    assert_eq!(
        framed(lock_tx.seal(&hx(&p["get_state_response"])).unwrap()),
        hx(&f["get_state_response"])
    );
    assert_eq!(
        framed(lock_tx.seal(&hx(&p["notification"])).unwrap()),
        hx(&f["notification"])
    );
    assert_eq!(
        framed(client_tx.seal(&hx(&p["unlock"])).unwrap()),
        hx(&f["unlock"])
    );
}

#[test]
fn client_completes_the_python_lock_transcript() {
    let v = vectors();
    let i = &v["inputs"];
    let f = &v["frames"];
    let mut script = hx(&i["client_random"]);
    script.extend(hx(&i["client_ephemeral_scalar"]));
    let config = ClientConfig {
        signing_key: scalar_key(&i["client_long_term_scalar"]),
        certificate: hx(&v["certificate"]),
        lock_public_key: *scalar_key(&i["lock_long_term_scalar"]).verifying_key(),
        att_mtu: 247,
        timing: ClientTiming::default(),
    };
    let mut client = Client::new(config, Box::new(Scripted(script))).unwrap();
    let now = Instant::now();
    client.start(now, i["auth_unix_ms"].as_u64().unwrap());
    let sent = |c: &mut Client| std::iter::from_fn(|| c.poll_transmit()).collect::<Vec<_>>();

    let out = sent(&mut client);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].channel, Channel::PtlsRx);
    assert_eq!(out[0].bytes, hx(&f["client_hello"]));

    client.handle_input(now, Channel::PtlsTx, &hx(&f["server_hello"]));
    assert_eq!(sent(&mut client)[0].bytes, hx(&f["challenge"]));

    client.handle_input(now, Channel::PtlsTx, &hx(&f["server_verify"]));
    let cv: Vec<Vec<u8>> = sent(&mut client).into_iter().map(|t| t.bytes).collect();
    let want: Vec<Vec<u8>> = v["client_verify_frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(hx)
        .collect();
    assert_eq!(cv, want);

    client.handle_input(now, Channel::PtlsTx, &hx(&f["initialized"]));
    assert_eq!(
        client.poll_event(),
        Some(Event::Established {
            session_id: arr(&i["session_id"])
        })
    );
    client
        .send_command(now, &hx(&v["plaintexts"]["get_state"]))
        .unwrap();
    assert_eq!(sent(&mut client)[0].bytes, hx(&f["get_state"]));
    client.handle_input(now, Channel::ApiCommands, &hx(&f["get_state_response"]));
    assert_eq!(
        client.poll_event(),
        Some(Event::Response(
            Response::parse(&hx(&v["plaintexts"]["get_state_response"])).unwrap()
        ))
    );
    client.handle_input(now, Channel::Notifications, &hx(&f["notification"]));
    assert_eq!(
        client.poll_event(),
        Some(Event::Notification {
            id: 0xBA,
            params: vec![0x04, 0x00]
        })
    );
    client
        .send_command(now, &hx(&v["plaintexts"]["unlock"]))
        .unwrap();
    assert_eq!(sent(&mut client)[0].bytes, hx(&f["unlock"]));
}

#[test]
fn server_completes_the_python_client_transcript() {
    let v = vectors();
    let i = &v["inputs"];
    let f = &v["frames"];
    let mut script = hx(&i["server_random"]);
    script.extend(hx(&i["server_ephemeral_scalar"]));
    script.extend(hx(&i["session_id"]));
    let now = Instant::now();
    let config = ServerConfig::new(
        scalar_key(&i["lock_long_term_scalar"]),
        *scalar_key(&i["authority_scalar"]).verifying_key(),
        u32::try_from(i["device_id"].as_u64().unwrap()).unwrap(),
    );
    let mut server = Server::new(config, Box::new(Scripted(script)), now);
    server.set_trusted_time(Some(WallClock {
        at: now,
        unix_ms: i["auth_unix_ms"].as_u64().unwrap(),
    }));
    let sent = |s: &mut Server| std::iter::from_fn(|| s.poll_transmit()).collect::<Vec<_>>();

    server.handle_input(now, Channel::PtlsRx, &hx(&f["client_hello"]));
    let out = sent(&mut server);
    assert_eq!(out[0].channel, Channel::PtlsTx);
    assert_eq!(out[0].bytes, hx(&f["server_hello"]));
    server.handle_input(now, Channel::PtlsRx, &hx(&f["challenge"]));
    assert_eq!(sent(&mut server)[0].bytes, hx(&f["server_verify"]));
    for frame in v["client_verify_frames"].as_array().unwrap() {
        server.handle_input(now, Channel::PtlsRx, &hx(frame));
    }
    assert_eq!(sent(&mut server)[0].bytes, hx(&f["initialized"]));
    assert!(matches!(
        server.poll_event(),
        Some(ServerEvent::Established { .. })
    ));

    server.handle_input(now, Channel::ApiCommands, &hx(&f["get_state"]));
    match server.poll_event() {
        Some(ServerEvent::Command { body, encrypted }) => {
            assert!(encrypted);
            assert_eq!(body, hx(&v["plaintexts"]["get_state"]));
        }
        other => panic!("expected the command, got {other:?}"),
    }
    server
        .send_response(now, &hx(&v["plaintexts"]["get_state_response"]))
        .unwrap();
    server
        .send_notification(now, &hx(&v["plaintexts"]["notification"]))
        .unwrap();
    let out = sent(&mut server);
    assert_eq!(out[0].channel, Channel::ApiCommands);
    assert_eq!(out[0].bytes, hx(&f["get_state_response"]));
    assert_eq!(out[1].channel, Channel::Notifications);
    assert_eq!(out[1].bytes, hx(&f["notification"]));
}
