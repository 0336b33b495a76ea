//! Properties of the protocol core over thousands of seeded fault schedules on the pair harness:
//! handshakes finish under loss or report failure (never hang), an actuating command is
//! executed at most once, and no bytes from a peer make either side panic.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test and benchmark code: a failed unwrap is a failed run

use std::time::{Duration, Instant};

use proptest::prelude::*;

use lockbridge::fault::FaultConfig;
use lockbridge::ptls::api::{op, result};
use lockbridge::ptls::pair::{Endpoint, Fixture, Pair};
use lockbridge::ptls::wire;
use lockbridge::ptls::{Channel, Client, Event, Server};
use lockbridge::sim::model::{Behaviour, LockEndpoint};

struct LossReport {
    finished: u32,
    failed: u32,
    hung: u32,
    dropped_to_lock: [u32; 16],
    dropped_to_client: [u32; 16],
    duplicated: u32,
}

/// 1000 seeds of the handshake over a link with `loss`, `duplicate` and reordering.
fn handshakes_under(loss: f64, duplicate: f64, reorder: f64) -> LossReport {
    let f = Fixture::new(100);
    let mut r = LossReport {
        finished: 0,
        failed: 0,
        hung: 0,
        dropped_to_lock: [0; 16],
        dropped_to_client: [0; 16],
        duplicated: 0,
    };
    for seed in 0..1000u64 {
        let faults = FaultConfig {
            loss,
            duplicate,
            reorder,
            reorder_delay_ms: 40,
            delay_ms: 15,
            jitter_ms: 20,
            seed,
            ..FaultConfig::default()
        };
        let mut p = f.pair(seed, &faults);
        let mut closed = false;
        p.drive(Duration::from_secs(120), |p| {
            while let Some(e) = p.client.poll_event() {
                closed |= matches!(e, Event::Closed(_));
            }
            while p.lock.poll_event().is_some() {}
            p.client.is_established() || closed
        });
        if p.client.is_established() && p.elapsed() <= Duration::from_secs(30) {
            r.finished += 1;
        } else if closed && p.elapsed() <= Duration::from_secs(31) {
            r.failed += 1;
        } else {
            r.hung += 1;
        }
        for h in 0..16 {
            r.dropped_to_lock[h] += p.stats.dropped_to_lock[h];
            r.dropped_to_client[h] += p.stats.dropped_to_client[h];
        }
        r.duplicated += p.stats.duplicated;
    }
    r
}

fn assert_loss_hit_every_frame_kind(r: &LossReport) {
    for h in [
        wire::HDR_HELLO,
        wire::HDR_SERVER_VERIFY,
        wire::HDR_CLIENT_VERIFY_I,
        wire::HDR_CLIENT_VERIFY_II,
    ] {
        assert!(
            r.dropped_to_lock[h as usize] > 0,
            "client frame {h:#04x} was never lost"
        );
    }
    for h in [
        wire::HDR_HELLO,
        wire::HDR_SERVER_VERIFY,
        wire::HDR_INITIALIZED,
    ] {
        assert!(
            r.dropped_to_client[h as usize] > 0,
            "lock frame {h:#04x} was never lost"
        );
    }
}

#[test]
fn handshake_at_10_percent_loss_5_percent_duplication_and_reordering() {
    let r = handshakes_under(0.10, 0.05, 0.05);
    assert!(
        r.finished >= 999,
        "finished {} of 1000 within 30 s",
        r.finished
    );
    assert_eq!(r.hung, 0, "every other seed reports failure");
    assert_eq!(r.finished + r.failed, 1000);
    assert!(r.duplicated > 0);
    assert_loss_hit_every_frame_kind(&r);
}

#[test]
fn handshake_at_20_percent_loss() {
    let r = handshakes_under(0.20, 0.0, 0.0);
    assert!(
        r.finished >= 990,
        "finished {} of 1000 within 30 s",
        r.finished
    );
    assert_eq!(r.hung, 0, "every other seed reports failure");
    assert_loss_hit_every_frame_kind(&r);
}

fn sim_lock(f: &Fixture, now: Instant, seed: u64) -> LockEndpoint {
    let behaviour = Behaviour {
        motor_time_ms: 300,
        idle_disconnect_ms: 0,
        ..Behaviour::default()
    };
    LockEndpoint::for_fixture(f, behaviour, seed, now)
}

/// Handshake, then send `commands` actuating commands one after another, each waiting for its
/// response, its timeout or the end of its session. Returns (commands sent, successes seen,
/// actuations the lock recorded).
fn actuate_under(faults: &FaultConfig, seed: u64, commands: usize) -> (usize, usize, usize) {
    let f = Fixture::new(200);
    let now = Instant::now();
    let lock = sim_lock(&f, now, seed);
    let client = f.client(f.client_config(), seed, now);
    let mut p: Pair<Client, LockEndpoint> = Pair::new(client, lock, now, faults);
    let mut sent = 0;
    let mut successes = 0;
    let mut closed = false;
    while sent < commands && !closed {
        let up = p.drive(Duration::from_secs(60), |p| {
            while let Some(e) = p.client.poll_event() {
                closed |= matches!(e, Event::Closed(_));
            }
            p.client.is_established() || closed
        });
        if !up || closed {
            break;
        }
        let opcode = if sent % 2 == 0 { op::UNLOCK } else { op::LOCK };
        let t = p.now;
        if p.client.send_command(t, &[opcode, 0]).is_err() {
            continue;
        }
        sent += 1;
        let mut done = false;
        p.drive(Duration::from_secs(30), |p| {
            while let Some(e) = p.client.poll_event() {
                match e {
                    Event::Response(r) => {
                        successes += usize::from(r.result == result::SUCCESS);
                        done = true;
                    }
                    Event::CommandUnanswered { .. } => done = true,
                    Event::Closed(_) => {
                        closed = true;
                        done = true;
                    }
                    _ => {}
                }
            }
            done
        });
    }
    // Let everything still in flight land: duplicates, reordered frames, retransmissions.
    p.drive(Duration::from_secs(60), |_| false);
    let actuations = p.lock.lock.actuations().len();
    (sent, successes, actuations)
}

#[test]
fn an_actuating_command_is_executed_at_most_once_over_thousands_of_fault_schedules() {
    let mut total_sent = 0;
    let mut total_actuations = 0;
    for seed in 0..2000u64 {
        let faults = FaultConfig {
            loss: (seed % 4) as f64 * 0.08,
            duplicate: (seed % 3) as f64 * 0.10,
            reorder: (seed % 5) as f64 * 0.05,
            reorder_delay_ms: 30,
            delay_ms: 10,
            jitter_ms: 25,
            seed,
            ..FaultConfig::default()
        };
        let (sent, successes, actuations) = actuate_under(&faults, seed, 3);
        assert!(
            actuations <= sent,
            "seed {seed}: {actuations} actuations for {sent} commands sent once each"
        );
        assert!(
            successes <= actuations,
            "seed {seed}: a success without an actuation"
        );
        total_sent += sent;
        total_actuations += actuations;
    }
    // The schedules are hostile but not hopeless: most commands do get through.
    assert!(
        total_actuations * 10 >= total_sent * 7,
        "{total_actuations} of {total_sent}"
    );
}

/// Valid frames from a clean handshake and a command exchange, to mutate.
fn valid_frames() -> Vec<(Channel, Vec<u8>)> {
    let f = Fixture::new(300);
    let mut p = f.pair(1, &FaultConfig::default());
    let mut frames = Vec::new();
    let now = p.now;
    loop {
        while let Some(t) = p.client.poll_transmit() {
            frames.push((t.channel, t.bytes.clone()));
            p.lock.handle_input(now, t.channel, &t.bytes);
        }
        while let Some(t) = p.lock.poll_transmit() {
            frames.push((t.channel, t.bytes.clone()));
            p.client.handle_input(now, t.channel, &t.bytes);
        }
        if p.client.is_established() {
            break;
        }
    }
    p.client.send_command(now, &[op::GET_STATE]).unwrap();
    let cmd = p.client.poll_transmit().unwrap();
    frames.push((cmd.channel, cmd.bytes));
    p.lock
        .send_response(now, &[op::GET_STATE, 0, 6, 0])
        .unwrap();
    p.lock.send_notification(now, &[0xBA, 6, 0]).unwrap();
    while let Some(t) = p.lock.poll_transmit() {
        frames.push((t.channel, t.bytes));
    }
    frames
}

/// A client and a lock taken to `stage` (0 fresh, 1 after hellos, 2 established).
fn endpoints_at(stage: u8) -> (Client, Server, Instant) {
    let frames = [1usize, 3, usize::MAX][usize::from(stage.min(2))];
    Fixture::new(301).endpoints_after(7, frames)
}

fn channel_of(n: u8) -> Channel {
    Channel::ALL[usize::from(n % 4)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(stage in 0u8..3, inputs in prop::collection::vec((0u8..4, prop::collection::vec(any::<u8>(), 0..300)), 1..8)) {
        let (mut client, mut lock, now) = endpoints_at(stage);
        for (ch, bytes) in &inputs {
            client.handle_input(now, channel_of(*ch), bytes);
            lock.handle_input(now, channel_of(*ch), bytes);
            // Random bytes with a valid header in front reach the deeper parsers.
            for header in [0x00, 0x01, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08] {
                let framed = wire::frame(header, bytes);
                client.handle_input(now, channel_of(*ch), &framed);
                lock.handle_input(now, channel_of(*ch), &framed);
            }
        }
        while client.poll_transmit().is_some() || client.poll_event().is_some() {}
        while lock.poll_transmit().is_some() || lock.poll_event().is_some() {}
        client.handle_timeout(now + Duration::from_secs(100_000));
        lock.handle_timeout(now + Duration::from_secs(100_000));
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        stage in 0u8..3,
        pick in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        cut in any::<prop::sample::Index>(),
        extend in prop::collection::vec(any::<u8>(), 0..20),
    ) {
        let frames = valid_frames();
        let (channel, mut bytes) = frames[pick.index(frames.len())].clone();
        for (at, x) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        bytes.truncate(cut.index(bytes.len() + 1).max(1));
        bytes.extend(extend);
        let (mut client, mut lock, now) = endpoints_at(stage);
        for ch in [channel, Channel::PtlsTx, Channel::PtlsRx, Channel::ApiCommands, Channel::Notifications] {
            client.handle_input(now, ch, &bytes);
            lock.handle_input(now, ch, &bytes);
        }
        while client.poll_transmit().is_some() || client.poll_event().is_some() {}
        while lock.poll_transmit().is_some() || lock.poll_event().is_some() {}
    }

    #[test]
    fn lock_model_never_panics_on_random_commands(bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 1..12)) {
        let f = Fixture::new(302);
        let now = Instant::now();
        let lock = sim_lock(&f, now, 1);
        let client = f.client(f.client_config(), 1, now);
        let mut p: Pair<Client, LockEndpoint> = Pair::new(client, lock, now, &FaultConfig::default());
        prop_assert!(p.drive(Duration::from_secs(30), |p| p.client.is_established()));
        for body in bodies {
            let t = p.now;
            if p.client.send_command(t, &body).is_ok() {
                p.drive(Duration::from_secs(10), |p| {
                    std::iter::from_fn(|| p.client.poll_event())
                        .any(|e| matches!(e, Event::Response(_) | Event::CommandUnanswered { .. }))
                });
            }
            // Plaintext frames too, which need no session.
            let t = p.now;
            p.lock.handle_input(t, Channel::ApiCommands, &wire::frame(0x00, &body));
        }
        p.drive(Duration::from_secs(10), |_| false);
    }
}
