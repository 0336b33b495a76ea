//! CoAP (RFC 7252, 7641, 7959) as a careless or hostile client speaks it, against the real
//! daemon: unknown critical options, proxies, pings, unknown methods, paths with `/` inside a
//! segment, duplicated non-confirmable commands, resets of notifications, observations that
//! outlive their permission, and per-peer caps on observations and block-wise bodies. Every
//! message is built by the test and sent over a hand-built DTLS session.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test code

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

use common::dtls_raw::{Finished, Raw, Session};
use common::{Gateway, PSK};
use lockbridge::command::Action;

/// One lock (two with `locks`), CoAP on loopback with the identities of
/// [`common::World::serve_coap`] and `extra` in its config after them.
fn gateway(locks: usize, extra: &str) -> Gateway {
    Gateway::start(locks, "", extra)
}

async fn session(addr: SocketAddr, identity: &str, key: &str) -> Session {
    Session::handshake(
        Raw::new(addr).await,
        identity,
        key.as_bytes(),
        Finished::Correct,
    )
    .await
    .unwrap()
}

fn request(t: MessageType, code: MessageClass, mid: u16, path: &[&str]) -> Packet {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(t);
    p.header.code = code;
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    for s in path {
        p.add_option(CoapOption::UriPath, s.as_bytes().to_vec());
    }
    p
}

fn con(method: RequestType, mid: u16, path: &[&str]) -> Packet {
    request(
        MessageType::Confirmable,
        MessageClass::Request(method),
        mid,
        path,
    )
}

/// Send `p`; the message that answers it (same message id, or same token for a separate
/// response), if one comes within 5 s.
async fn ask(s: &mut Session, p: &Packet) -> Option<Packet> {
    s.send_app(&p.to_bytes().unwrap()).await;
    let (mid, token) = (p.header.message_id, p.get_token().to_vec());
    let matches = move |b: &Vec<u8>| {
        Packet::from_bytes(b).is_ok_and(|a| {
            a.header.message_id == mid
                || (!token.is_empty()
                    && a.get_token() == token.as_slice()
                    && a.header.code != MessageClass::Empty)
        })
    };
    let got = s
        .recv_app_until(Duration::from_secs(5), |all| all.iter().any(&matches))
        .await;
    got.into_iter()
        .find(|b| matches(b))
        .map(|b| Packet::from_bytes(&b).unwrap())
}

fn code(p: &Option<Packet>) -> Option<MessageClass> {
    p.as_ref().map(|p| p.header.code)
}

fn response(t: ResponseType) -> Option<MessageClass> {
    Some(MessageClass::Response(t))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_methods_paths_and_pings_get_their_rfc_answers() {
    let gw = gateway(1, "");
    gw.world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let mut s = session(gw.addr, "full", PSK).await;

    // Regression: a POST unlock with critical option 9 actuated. Now 4.02, and a
    // non-confirmable one is rejected with a reset; nothing moves.
    let mut unlock = con(RequestType::Post, 1, &["locks", "lock-1", "unlock"]);
    unlock.add_option(CoapOption::from(9u16), b"x".to_vec());
    assert_eq!(
        code(&ask(&mut s, &unlock).await),
        response(ResponseType::BadOption)
    );
    let mut non = unlock.clone();
    non.header.set_type(MessageType::NonConfirmable);
    non.header.message_id = 2;
    let reset = ask(&mut s, &non).await.expect("a reset");
    assert_eq!(reset.header.get_type(), MessageType::Reset);
    assert!(gw.world.actuations().is_empty());

    let mut proxied = con(RequestType::Get, 3, &[]);
    proxied.add_option(CoapOption::ProxyUri, b"coap://elsewhere/x".to_vec());
    assert_eq!(
        code(&ask(&mut s, &proxied).await),
        response(ResponseType::ProxyingNotSupported)
    );
    let ping = request(MessageType::Confirmable, MessageClass::Empty, 4, &[]);
    let mut ping = ping.clone();
    ping.set_token(Vec::new());
    let pong = ask(&mut s, &ping).await.expect("an empty CON is answered");
    assert_eq!(pong.header.get_type(), MessageType::Reset);
    let unknown_method = request(
        MessageType::Confirmable,
        MessageClass::Reserved(0x08),
        5,
        &["locks"],
    );
    assert_eq!(
        code(&ask(&mut s, &unknown_method).await),
        response(ResponseType::MethodNotAllowed)
    );
    // Regression: one Uri-Path segment holding '/' was taken as two.
    assert_eq!(
        code(&ask(&mut s, &con(RequestType::Get, 6, &["locks/lock-1"])).await),
        response(ResponseType::NotFound)
    );
    let mut long_id = con(RequestType::Post, 7, &["locks", "lock-1", "unlock"]);
    long_id.payload = format!(r#"{{"request_id":"{}"}}"#, "i".repeat(65)).into_bytes();
    assert_eq!(
        code(&ask(&mut s, &long_id).await),
        response(ResponseType::BadRequest)
    );
    assert!(gw.world.actuations().is_empty());
    // The same command without the unknown option works.
    let ok = ask(
        &mut s,
        &con(RequestType::Post, 8, &["locks", "lock-1", "unlock"]),
    )
    .await;
    assert_eq!(code(&ok), response(ResponseType::Changed), "{ok:?}");
    assert_eq!(gw.world.actuations().len(), 1);
}

// Regression: non-confirmable requests were not de-duplicated, and confirmable ones only among
// the last 32 answers: a duplicate command without a request id ran twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_commands_run_once_whatever_their_type_and_rate() {
    let gw = gateway(1, "");
    gw.world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let mut s = session(gw.addr, "full", PSK).await;
    let non = request(
        MessageType::NonConfirmable,
        MessageClass::Request(RequestType::Post),
        100,
        &["locks", "lock-1", "unlock"],
    );
    assert_eq!(
        code(&ask(&mut s, &non).await),
        response(ResponseType::Changed)
    );
    // The network duplicates it: silently ignored, nothing moves.
    s.send_app(&non.to_bytes().unwrap()).await;
    let lock = con(RequestType::Post, 200, &["locks", "lock-1", "lock"]);
    let first = ask(&mut s, &lock).await;
    assert_eq!(code(&first), response(ResponseType::Changed));
    // Forty other requests, then the lock again with its message id: its first answer.
    for mid in 300..340u16 {
        assert!(
            ask(&mut s, &con(RequestType::Get, mid, &["gateway"]))
                .await
                .is_some()
        );
    }
    let again = ask(&mut s, &lock).await;
    assert_eq!(again.map(|p| p.payload), first.map(|p| p.payload));
    assert_eq!(
        gw.world.actuations().len(),
        2,
        "{:?}",
        gw.world.actuations()
    );
}

fn observe_request(mid: u16, token: &[u8], lock: &str) -> Packet {
    let mut p = con(RequestType::Get, mid, &["locks", lock]);
    p.set_token(token.to_vec());
    p.set_observe_value(0);
    p
}

/// Notifications for `token` among decoded messages.
fn notifications<'a>(all: &'a [Vec<u8>], token: &'a [u8]) -> impl Iterator<Item = Packet> + 'a {
    all.iter()
        .filter_map(|b| Packet::from_bytes(b).ok())
        .filter(move |p| {
            p.get_token() == token && p.header.get_type() == MessageType::NonConfirmable
        })
}

// Regression: a reset of a notification did not end its observation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_of_a_notification_ends_its_observation() {
    let gw = gateway(1, "");
    gw.world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let mut s = session(gw.addr, "full", PSK).await;
    for (mid, token) in [(1, b"keep"), (2, b"drop")] {
        let r = ask(&mut s, &observe_request(mid, token, "lock-1"))
            .await
            .unwrap();
        assert!(r.get_observe_value().is_some());
    }
    gw.world.succeed("lock-1", Action::Unlock).await;
    let state_is = |p: &Packet, state: &str| {
        serde_json::from_slice::<serde_json::Value>(&p.payload).is_ok_and(|v| v["state"] == state)
    };
    let got = s
        .recv_app_until(Duration::from_secs(10), |all| {
            notifications(all, b"drop").any(|p| state_is(&p, "unlocked"))
        })
        .await;
    let n = notifications(&got, b"drop").last().expect("a notification");
    let mut reset = Packet::new();
    reset.header.set_version(1);
    reset.header.set_type(MessageType::Reset);
    reset.header.message_id = n.header.message_id;
    s.send_app(&reset.to_bytes().unwrap()).await;
    // A peer's messages are taken in order: once this is answered, the reset was taken.
    assert!(
        ask(&mut s, &con(RequestType::Get, 3, &["gateway"]))
            .await
            .is_some()
    );
    // The other observation reports the next change; the reset one does not.
    gw.world.succeed("lock-1", Action::Lock).await;
    let later = s
        .recv_app_until(Duration::from_secs(10), |all| {
            notifications(all, b"keep").any(|p| state_is(&p, "locked"))
        })
        .await;
    assert!(notifications(&later, b"keep").any(|p| state_is(&p, "locked")));
    let moved = |p: &Packet| state_is(p, "locking") || state_is(p, "locked");
    assert_eq!(
        notifications(&later, b"drop").filter(moved).count(),
        0,
        "the reset observation went on"
    );
}

// Regression: 2,000 observations of one peer were accepted (one unlock then sent 4,000
// notifications), and 1,500 block-wise bodies on distinct paths were each held for 120 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observations_and_block_wise_bodies_per_peer_are_capped() {
    let gw = gateway(1, "");
    gw.world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let mut s = session(gw.addr, "full", PSK).await;
    let mut observed = 0;
    for i in 0..200u16 {
        let token = i.to_be_bytes();
        let r = ask(&mut s, &observe_request(1000 + i, &token, "lock-1"))
            .await
            .unwrap();
        if r.get_observe_value().is_some() {
            observed += 1;
        }
    }
    assert_eq!(observed, 16, "observations accepted of 200 asked");
    gw.world.succeed("lock-1", Action::Unlock).await;
    let got = s
        .recv_app_until(Duration::from_secs(10), |all| {
            all.iter()
                .filter_map(|b| Packet::from_bytes(b).ok())
                .any(|p| {
                    serde_json::from_slice::<serde_json::Value>(&p.payload)
                        .is_ok_and(|v| v["state"] == "unlocked")
                })
        })
        .await;
    let tokens: std::collections::BTreeSet<Vec<u8>> = got
        .iter()
        .filter_map(|b| Packet::from_bytes(b).ok())
        .filter(|p| p.header.get_type() == MessageType::NonConfirmable)
        .map(|p| p.get_token().to_vec())
        .collect();
    assert!(tokens.len() <= 16, "{} observations notified", tokens.len());

    // Block-wise bodies: on paths that name nothing, refused without state; on a command
    // path, bounded in size.
    let mut continues = 0;
    for i in 0..300u16 {
        let path = format!("x{i}");
        let mut p = con(RequestType::Post, 5000 + i, &["locks", "lock-1", &path]);
        p.add_option(CoapOption::Block1, vec![0x0C]); // block 0, more, 256 bytes
        p.payload = vec![b'{'; 256];
        match code(&ask(&mut s, &p).await) {
            Some(MessageClass::Response(ResponseType::Continue)) => continues += 1,
            Some(MessageClass::Response(ResponseType::NotFound)) => {}
            other => panic!("block-wise POST to {path}: {other:?}"),
        }
    }
    assert_eq!(
        continues, 0,
        "block-wise state was kept for paths that name nothing"
    );
    let mut big = con(RequestType::Post, 6000, &["locks", "lock-1", "unlock"]);
    big.add_option(CoapOption::Block1, vec![0x1C]); // block 1, more, 256 bytes
    big.payload = vec![b' '; 256];
    let mut far = big.clone();
    far.header.message_id = 6001;
    far.set_option(CoapOption::Block1, [vec![0x4C]].into()); // block 4: past 1,024 bytes
    assert_eq!(
        code(&ask(&mut s, &far).await),
        response(ResponseType::RequestEntityTooLarge)
    );
    assert_eq!(gw.world.actuations().len(), 1);
}

// Regression: 4.03 for a lock the identity may not see told it the lock exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_an_identity_may_not_see_does_not_exist_for_it() {
    let gw = gateway(
        2,
        "[[coap.clients]]\nidentity = \"second\"\npsk_hex = \"7365636f6e642d6f6e6c792d6b65792d30303031\"\n\
         [[permissions]]\norigin = \"second\"\nlocks = \"lock-2\"\nactions = [\"read\", \"unlock\"]\n",
    );
    gw.world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let mut s = session(gw.addr, "second", "second-only-key-0001").await;
    let hidden = ask(&mut s, &con(RequestType::Get, 1, &["locks", "lock-1"])).await;
    let missing = ask(&mut s, &con(RequestType::Get, 2, &["locks", "lock-9"])).await;
    assert_eq!(code(&hidden), response(ResponseType::NotFound));
    assert_eq!(
        hidden.map(|p| p.payload),
        missing.map(|p| p.payload),
        "indistinguishable"
    );
    let command = ask(
        &mut s,
        &con(RequestType::Post, 3, &["locks", "lock-1", "unlock"]),
    )
    .await;
    assert_eq!(code(&command), response(ResponseType::NotFound));
    // Its own lock: readable; an action it may not take there: 4.03.
    assert_eq!(
        code(&ask(&mut s, &con(RequestType::Get, 4, &["locks", "lock-2"])).await),
        response(ResponseType::Content)
    );
    assert_eq!(
        code(
            &ask(
                &mut s,
                &con(RequestType::Post, 5, &["locks", "lock-2", "lock"])
            )
            .await
        ),
        response(ResponseType::Forbidden)
    );
    assert!(gw.world.actuations().is_empty());
}

/// The window `HH:MM-HH:MM` (UTC) from the current minute to the next, and how long until it
/// closes; waits first if fewer than 15 s of it remain.
async fn window_of_this_minute() -> (String, Duration) {
    loop {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let now = now_ms / 1000;
        let into = now % 60;
        if into <= 45 {
            let minute = (now / 60) % (24 * 60);
            let end = (minute + 1) % (24 * 60);
            if end == 0 {
                // 23:59 → 00:00 wraps to the next day; wait it out.
                tokio::time::sleep(Duration::from_secs(61 - into)).await;
                continue;
            }
            let hhmm = |m: u64| format!("{:02}:{:02}", m / 60, m % 60);
            return (
                format!("{}-{}", hhmm(minute), hhmm(end)),
                Duration::from_millis(60_000 - now_ms % 60_000),
            );
        }
        tokio::time::sleep(Duration::from_secs(61 - into)).await;
    }
}

// Regression: an observation made inside a time window kept delivering after it closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observation_ends_when_its_permission_does() {
    let (window, left) = window_of_this_minute().await;
    let closes = tokio::time::Instant::now() + left;
    let gw = gateway(
        1,
        &format!(
            "[[coap.clients]]\nidentity = \"timed\"\npsk_hex = \"74696d65642d6b65792d303030303030303031\"\n\
             [[permissions]]\norigin = \"timed\"\nactions = [\"read\"]\nwindows = [\"{window}\"]\n"
        ),
    );
    gw.world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let mut s = session(gw.addr, "timed", "timed-key-000000001").await;
    let r = ask(&mut s, &observe_request(1, b"obs", "lock-1"))
        .await
        .unwrap();
    assert!(
        r.get_observe_value().is_some(),
        "observed inside the window {window}"
    );
    // While the window is open the observation may carry changes (battery, signal): read
    // them away. Whatever arrives from its close on counts.
    let open_for = closes.saturating_duration_since(tokio::time::Instant::now());
    let _while_open = s.recv_app_until(open_for, |_| false).await;
    let mut got = s.recv_app_until(Duration::from_secs(1), |_| false).await;
    gw.world.succeed("lock-1", Action::Unlock).await;
    gw.world.succeed("lock-1", Action::Lock).await;
    got.extend(
        s.recv_app_until(Duration::from_secs(10), |all| {
            notifications(all, b"obs")
                .any(|p| p.header.code != MessageClass::Response(ResponseType::Content))
        })
        .await,
    );
    let codes: Vec<MessageClass> = notifications(&got, b"obs").map(|p| p.header.code).collect();
    assert_eq!(
        codes,
        vec![MessageClass::Response(ResponseType::Forbidden)],
        "one 4.03 ends the observation, nothing after"
    );
}
