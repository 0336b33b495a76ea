//! The ATT limit as a real lock applies it (ptls-spec §3.2, revised): SERVER_MTU is the lock's
//! own `ATT_MTU − 3`, whatever MTU byte the client announces; lockbridge's client never writes a
//! value longer than `ATT_MTU − 3` at any negotiated MTU from 156 to 247 (on a virtual clock,
//! every frame of a handshake and of actuating commands measured); and the simulator's sim
//! socket refuses a longer write with an ATT error and logs it, as BlueZ and a real lock do.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use lockbridge::command::Action;
use lockbridge::link::sim::SimLink;
use lockbridge::link::{Link, LinkError};
use lockbridge::ptls::api::op;
use lockbridge::ptls::pair::{Endpoint, Fixture, Pair};
use lockbridge::ptls::wire::{self, ClientHello, ServerHello};
use lockbridge::ptls::{Channel, Client, Event, Transmit};
use lockbridge::sim::model::{Behaviour, Lock, LockEndpoint};
use lockbridge::sim::wire::ListenAddr;

use common::World;

/// Wraps an endpoint and records every value it sends: (channel, length).
struct Measured<E> {
    inner: E,
    sent: Vec<(Channel, usize, u8)>,
}

impl<E: Endpoint> Endpoint for Measured<E> {
    fn handle_input(&mut self, now: Instant, channel: Channel, bytes: &[u8]) {
        self.inner.handle_input(now, channel, bytes)
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.inner.handle_timeout(now)
    }
    fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.inner.poll_transmit()?;
        self.sent
            .push((t.channel, t.bytes.len(), t.bytes[0] & 0x0F));
        Some(t)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }
}

#[test]
fn server_mtu_is_the_locks_own_limit_not_the_clients_mtu_byte() {
    let f = Fixture::new(1);
    let now = Instant::now();
    // What a bleak client on BlueZ announces, what the official apps send, and a large link.
    for announced in [23u8, 0, 244] {
        for lock_att_mtu in [156u16, 185, 247] {
            let mut config = f.server_config();
            config.att_mtu = lock_att_mtu;
            let mut server = f.server(config, 2, now);
            let hello = ClientHello {
                mtu: announced,
                random: [3; 32],
                public: wire::encode_point(
                    &p256::SecretKey::from_slice(&[9; 32]).unwrap().public_key(),
                ),
            };
            server.handle_input(
                now,
                Channel::PtlsRx,
                &wire::frame(wire::HDR_HELLO, &hello.encode()),
            );
            let answer = server.poll_transmit().expect("a server hello");
            assert_eq!(answer.bytes[0], wire::HDR_HELLO, "{answer:?}");
            let sh = ServerHello::parse(&answer.bytes[1..]).unwrap();
            assert_eq!(
                u16::from(sh.mtu),
                lock_att_mtu - 3,
                "client announced {announced}, lock ATT MTU {lock_att_mtu}"
            );
        }
    }
}

#[test]
fn no_value_exceeds_att_mtu_minus_3_at_any_mtu_from_156_to_247() {
    let f = Fixture::new(7);
    for att_mtu in 156u16..=247 {
        let now = Instant::now();
        let behaviour = Behaviour {
            motor_time_ms: 300,
            idle_disconnect_ms: 0,
            att_mtu,
            ..Behaviour::default()
        };
        let lock =
            LockEndpoint::new(Lock::for_fixture(&f, behaviour, 3, now), now, att_mtu).unwrap();
        let mut config = f.client_config();
        config.att_mtu = att_mtu;
        let client = f.client(config, u64::from(att_mtu), now);
        let mut p: Pair<Measured<Client>, Measured<LockEndpoint>> = Pair::new(
            Measured {
                inner: client,
                sent: Vec::new(),
            },
            Measured {
                inner: lock,
                sent: Vec::new(),
            },
            now,
            &Default::default(),
        );
        let up = p.drive(Duration::from_secs(30), |p| p.client.inner.is_established());
        assert!(up, "no session at ATT MTU {att_mtu}");
        // Every command kind, each answered, with the state notifications of the motions.
        for command in [
            vec![op::GET_STATE],
            vec![op::UNLOCK, 0],
            vec![op::LOCK, 0],
            vec![op::UNLOCK, 0],
            vec![op::PULL_SPRING],
            vec![op::GET_BATTERY],
        ] {
            let t = p.now;
            p.client.inner.send_command(t, &command).unwrap();
            let answered = p.drive(Duration::from_secs(60), |p| {
                std::iter::from_fn(|| p.client.inner.poll_event())
                    .any(|e| matches!(e, Event::Response(_)))
            });
            assert!(answered, "{command:02x?} unanswered at ATT MTU {att_mtu}");
            // Let the motion finish so its notifications are measured too.
            let until = p.now + Duration::from_secs(5);
            p.drive(Duration::from_secs(5), |p| p.now >= until);
        }
        let limit = usize::from(att_mtu) - 3;
        for (who, sent) in [("client", &p.client.sent), ("lock", &p.lock.sent)] {
            let longest = sent.iter().map(|s| s.1).max().unwrap();
            assert!(
                longest <= limit,
                "{who} sent a {longest}-byte value at ATT MTU {att_mtu}: {sent:?}"
            );
        }
        // Client verify (about 300 bytes) takes at least two pieces at every MTU here.
        let pieces = p
            .client
            .sent
            .iter()
            .filter(|s| s.2 == 0x06 || s.2 == 0x07)
            .count();
        assert!(
            pieces >= 2,
            "{pieces} client-verify pieces at ATT MTU {att_mtu}"
        );
        assert!(
            p.lock.sent.iter().any(|s| s.0 == Channel::Notifications),
            "no notification measured at ATT MTU {att_mtu}"
        );
    }
}

#[tokio::test]
async fn the_sim_socket_refuses_a_value_longer_than_att_mtu_minus_3_and_the_daemon_never_sends_one()
{
    // One lock whose radio takes ATT MTU 156 at most: the smallest lockbridge accepts.
    let world = World::new(1, |sim| {
        common::set_lock(sim, 0, "att_mtu", toml::Value::Integer(156))
    });
    let _sim = world.sim();
    let serial = world.summary["locks"][0]["serial"]
        .as_str()
        .unwrap()
        .to_string();
    let endpoint = world.summary["sim_endpoint"].as_str().unwrap();
    let addr = ListenAddr::Unix(endpoint.strip_prefix("unix:").unwrap().into());

    let mut link = SimLink::connect(&addr, &serial, 247).await.unwrap();
    assert_eq!(link.att_mtu(), 156);
    match link.write(Channel::PtlsRx, &[0x03; 154]).await {
        Err(LinkError::NotDelivered { reason }) => {
            assert!(reason.contains("ATT error 0x0d"), "{reason}");
            assert!(reason.contains("154-byte"), "{reason}");
        }
        other => panic!("a 154-byte write at ATT MTU 156 was not refused: {other:?}"),
    }
    // A value that fits is taken (an unexpected frame: the lock answers with an alert).
    link.write(Channel::PtlsRx, &[0x03; 153]).await.unwrap();
    link.close().await;
    common::wait_for(
        || {
            world
                .sim_log()
                .contains("refused a 154-byte write on PtlsRx: ATT MTU 156 takes at most 153")
        },
        "the simulator's log of the refused write",
    );

    // The daemon at that MTU: a session, and an unlock and a lock, with no value refused.
    let _daemon = world.daemon();
    let lock = "lock-1";
    world
        .wait_status(lock, "connected", Duration::from_secs(60))
        .await;
    world.succeed(lock, Action::Unlock).await;
    world.succeed(lock, Action::Lock).await;
    assert_eq!(world.actuations().len(), 2, "{:?}", world.actuations());
    let refused = world.sim_log().matches("refused a ").count();
    assert_eq!(
        refused,
        1,
        "only the test's own oversized write was refused:\n{}",
        world.sim_log()
    );
}
