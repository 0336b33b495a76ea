//! PTLS core benchmark: handshake CPU time per side, the P-256 operations it contains measured in
//! the same run, the protocol's own overhead as a ratio, and the cost of sealing one command.
//!
//! `cargo bench --bench ptls` prints a table and one JSON line (prefixed `json:`).
//! Targets (issue 2): handshake ≤ 1.5 × its P-256 operations; a sealed command record < 5 µs.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test and benchmark code: a failed unwrap is a failed run

use std::hint::black_box;
use std::time::{Duration, Instant};

use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey};
use rand_core::SeedableRng;

use lockbridge::fault::FaultConfig;
use lockbridge::ptls::api::op;
use lockbridge::ptls::crypto::{RecordKey, TrafficSecret};
use lockbridge::ptls::pair::Fixture;

const HANDSHAKES: u32 = 300;
const OPS: u32 = 300;
const RECORDS: u32 = 200_000;

/// Mean time of `f` over `n` runs.
fn mean(n: u32, mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed() / n
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Run one clean handshake by hand, timing the client's and the lock's calls separately.
fn timed_handshake(f: &Fixture, seed: u64) -> (Duration, Duration) {
    let mut p = f.pair(seed, &FaultConfig::default());
    let now = p.now;
    let mut client_time = Duration::ZERO;
    let mut lock_time = Duration::ZERO;
    // The client's hello was built in `pair`; time a fresh client's start separately below.
    loop {
        let mut moved = false;
        loop {
            let t = Instant::now();
            let tx = p.client.poll_transmit();
            client_time += t.elapsed();
            let Some(tx) = tx else { break };
            let t = Instant::now();
            p.lock.handle_input(now, tx.channel, &tx.bytes);
            lock_time += t.elapsed();
            moved = true;
        }
        loop {
            let t = Instant::now();
            let tx = p.lock.poll_transmit();
            lock_time += t.elapsed();
            let Some(tx) = tx else { break };
            let t = Instant::now();
            p.client.handle_input(now, tx.channel, &tx.bytes);
            client_time += t.elapsed();
            moved = true;
        }
        if p.client.is_established() || !moved {
            break;
        }
    }
    assert!(p.client.is_established(), "benchmark handshake completes");
    (client_time, lock_time)
}

fn main() {
    let f = Fixture::new(1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);

    // Warm up caches and lazy tables.
    for s in 0..20 {
        timed_handshake(&f, s);
    }

    // The client's hello (key generation) happens in `start`, outside `timed_handshake`.
    let config = f.client_config();
    let client_start = mean(HANDSHAKES, || {
        let now = Instant::now();
        black_box(f.client(config.clone(), 5, now));
    });
    let mut client_total = Duration::ZERO;
    let mut lock_total = Duration::ZERO;
    for s in 0..u64::from(HANDSHAKES) {
        let (c, l) = timed_handshake(&f, s);
        client_total += c;
        lock_total += l;
    }
    let client_hs = client_total / HANDSHAKES + client_start;
    let lock_hs = lock_total / HANDSHAKES;

    // The P-256 operations a handshake contains, measured in the same run.
    // Key generation as the handshake does it: a scalar and its public point.
    let keygen = mean(OPS, || {
        let k = p256::SecretKey::random(&mut rng);
        black_box(k.public_key());
    });
    let a = p256::SecretKey::random(&mut rng);
    let b = p256::SecretKey::random(&mut rng).public_key();
    let ecdh = mean(OPS, || {
        black_box(p256::ecdh::diffie_hellman(
            a.to_nonzero_scalar(),
            b.as_affine(),
        ));
    });
    let signer = SigningKey::random(&mut rng);
    let msg = vec![0x5Au8; 400];
    let sign = mean(OPS, || {
        let s: Signature = signer.sign(black_box(&msg));
        black_box(s.to_der());
    });
    let sig: Signature = signer.sign(&msg);
    let der = sig.to_der();
    let verify = mean(OPS, || {
        let s = Signature::from_der(der.as_bytes()).unwrap();
        black_box(signer.verifying_key().verify(&msg, &s)).unwrap();
    });
    // Client: ephemeral key, ECDH, verify SIG_S, sign SIG_C.
    let client_p256 = keygen + ecdh + verify + sign;
    // Lock: ephemeral key, ECDH, sign SIG_S, verify the certificate, verify SIG_C.
    let lock_p256 = keygen + ecdh + sign + verify * 2;
    let client_ratio = client_hs.as_secs_f64() / client_p256.as_secs_f64();
    let lock_ratio = lock_hs.as_secs_f64() / lock_p256.as_secs_f64();

    // One sealed command record: the AEAD alone, and the whole client path.
    let secret = TrafficSecret {
        key: [7; 16],
        base_iv: [9; 12],
    };
    let mut key = RecordKey::new(&secret);
    let mut n = 0u32;
    let seal = mean(RECORDS, || {
        if n == 60_000 {
            key = RecordKey::new(&secret);
            n = 0;
        }
        n += 1;
        black_box(key.seal(black_box(&[op::UNLOCK, 0])));
    });
    // The client's whole path for one command: seal and frame it, then open and parse the
    // response. The lock's calls in between are not timed.
    let mut p = f.pair(77, &FaultConfig::default());
    p.drive(Duration::from_secs(5), |p| p.client.is_established());
    let now = p.now;
    let mut client_time = Duration::ZERO;
    let rounds = 50_000u32;
    for _ in 0..rounds {
        let t = Instant::now();
        p.client.send_command(now, &[op::GET_STATE]).unwrap();
        let tx = p.client.poll_transmit().unwrap();
        client_time += t.elapsed();
        p.lock.handle_input(now, tx.channel, &tx.bytes);
        let _ = p.lock.poll_event();
        p.lock
            .send_response(now, &[op::GET_STATE, 0, 6, 0])
            .unwrap();
        let rx = p.lock.poll_transmit().unwrap();
        let t = Instant::now();
        p.client.handle_input(now, rx.channel, &rx.bytes);
        black_box(p.client.poll_event());
        client_time += t.elapsed();
    }
    let client_round_trip = client_time / rounds;

    println!("PTLS core benchmark ({HANDSHAKES} handshakes, {OPS} runs per P-256 operation)");
    println!();
    println!("| measure                                   |      µs | target       |");
    println!("|-------------------------------------------|--------:|--------------|");
    println!(
        "| client handshake CPU                      | {:7.1} |              |",
        us(client_hs)
    );
    println!(
        "| lock handshake CPU                        | {:7.1} |              |",
        us(lock_hs)
    );
    println!(
        "| P-256 key generation                      | {:7.1} |              |",
        us(keygen)
    );
    println!(
        "| P-256 ECDH                                | {:7.1} |              |",
        us(ecdh)
    );
    println!(
        "| P-256 ECDSA sign (DER)                    | {:7.1} |              |",
        us(sign)
    );
    println!(
        "| P-256 ECDSA verify (DER)                  | {:7.1} |              |",
        us(verify)
    );
    println!(
        "| client P-256 ops (4: key, ECDH, verify, sign) | {:5.1} |           |",
        us(client_p256)
    );
    println!(
        "| lock P-256 ops (5: key, ECDH, sign, 2 verify) | {:5.1} |           |",
        us(lock_p256)
    );
    println!("| client handshake / its P-256 ops          | {client_ratio:7.3} | ≤ 1.5        |");
    println!("| lock handshake / its P-256 ops            | {lock_ratio:7.3} | ≤ 1.5        |");
    println!(
        "| seal one command record (AES-128-GCM)     | {:7.3} | < 5          |",
        us(seal)
    );
    println!(
        "| client command round trip, client share   | {:7.3} |              |",
        us(client_round_trip)
    );
    println!();
    println!(
        "json: {}",
        serde_json::json!({
            "handshakes": HANDSHAKES,
            "client_handshake_us": us(client_hs),
            "lock_handshake_us": us(lock_hs),
            "p256_keygen_us": us(keygen),
            "p256_ecdh_us": us(ecdh),
            "p256_sign_us": us(sign),
            "p256_verify_us": us(verify),
            "p256_ops_per_handshake": {"client": 4, "lock": 5},
            "client_ratio": client_ratio,
            "lock_ratio": lock_ratio,
            "seal_record_us": us(seal),
            "client_command_round_trip_us": us(client_round_trip),
        })
    );
    let ok = client_ratio <= 1.5 && lock_ratio <= 1.5 && us(seal) < 5.0;
    println!("targets: {}", if ok { "met" } else { "NOT met" });
}
