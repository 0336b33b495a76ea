//! The DTLS endpoint under forged and hostile datagrams, against the real daemon: each test
//! pins one way a datagram anybody can send used to end a session, lock real clients out,
//! leak a task or hold memory. Records are built by hand (`common::dtls_raw`), so every byte
//! is the attacker's choice; real clients are webrtc-dtls's and libcoap's.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test code

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use webrtc_dtls::conn::DTLSConn;

use common::dtls_raw::{
    CT_ALERT, CT_APP_DATA, CT_HANDSHAKE, Finished, Raw, Session, client_hello, coap_get, handshake,
    record,
};
use common::{Gateway, PSK, READER_PSK};

/// The daemon and simulator with CoAP on loopback; `extra` goes into `[coap]`.
fn gateway(extra: &str) -> Gateway {
    Gateway::start(1, extra, "")
}

/// A webrtc-dtls PSK session from `socket`.
async fn session_from(
    socket: UdpSocket,
    server: SocketAddr,
    identity: &str,
    key: &'static str,
) -> Result<DTLSConn, String> {
    socket.connect(server).await.unwrap();
    let hs = DTLSConn::new(
        Arc::new(socket),
        common::psk_dtls_config(identity, key),
        true,
        None,
    );
    match tokio::time::timeout(Duration::from_secs(5), hs).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no handshake within 5 s".into()),
    }
}

async fn session(
    server: SocketAddr,
    ip: &str,
    identity: &str,
    key: &'static str,
) -> Result<DTLSConn, String> {
    session_from(
        UdpSocket::bind((ip, 0)).await.unwrap(),
        server,
        identity,
        key,
    )
    .await
}

/// GET `path` on a webrtc-dtls session; the CoAP response, if one comes within 3 s.
async fn get(conn: &DTLSConn, path: &str, mid: u16) -> Option<coap_lite::Packet> {
    conn.write(&coap_get(path, mid), None).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let left = end.checked_duration_since(Instant::now())?;
        let n = conn.read(&mut buf, Some(left)).await.ok()?;
        let p = coap_lite::Packet::from_bytes(&buf[..n]).ok()?;
        if p.header.message_id == mid {
            return Some(p);
        }
    }
}

/// `GET /gateway` from a fresh session: the endpoint's own figures.
async fn gateway_figures(addr: SocketAddr) -> serde_json::Value {
    // From an address of its own, so no per-address cap a test fills applies to it.
    let c = session(addr, "127.0.0.9", "full", PSK).await.unwrap();
    let p = get(&c, "/gateway", 1).await.expect("GET /gateway answered");
    let _ = c.close().await;
    serde_json::from_slice(&p.payload).unwrap()
}

// Regression: webrtc-dtls's server never checked the client's Finished — twelve zero bytes
// completed the handshake and the session was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_finished_is_refused_and_the_right_one_accepted() {
    let gw = gateway("");
    // The hand-built client is right: with the correct Finished it gets its answers.
    let raw = Raw::new(gw.addr).await;
    let mut good = Session::handshake(raw, "full", PSK.as_bytes(), Finished::Correct)
        .await
        .unwrap();
    let answer = good
        .exchange(&coap_get("/gateway", 11), Duration::from_secs(3))
        .await
        .expect("a session with the right Finished is served");
    assert!(coap_lite::Packet::from_bytes(&answer).is_ok());
    // The same client with a zero verify_data: webrtc-dtls completes the handshake, lockbridge
    // refuses it before serving anything.
    let raw = Raw::new(gw.addr).await;
    let mut bad = Session::handshake(raw, "full", PSK.as_bytes(), Finished::Zero)
        .await
        .expect("webrtc-dtls itself answers a zero Finished with its own");
    let answer = bad
        .exchange(&coap_get("/gateway", 12), Duration::from_secs(2))
        .await;
    assert!(
        answer.is_none(),
        "a session with a wrong Finished was served"
    );
    let figures = gateway_figures(gw.addr).await;
    assert_eq!(figures["dtls_bad_finished"], 1, "{figures}");
    assert!(
        gw.world
            .daemon_log()
            .contains("the client's Finished does not verify")
    );
}

// Regression: one datagram from an established client's address and port ended its session:
// a ClientHello without or with a garbage cookie, an epoch-0 fatal alert, close_notify or
// application data, or an epoch-1 record that does not decrypt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_datagrams_from_a_client_s_address_never_end_its_session() {
    let gw = gateway("");
    let raw = Raw::new(gw.addr).await;
    let mut s = Session::handshake(raw, "full", PSK.as_bytes(), Finished::Correct)
        .await
        .unwrap();
    type Forge = Box<dyn Fn(u64) -> Vec<u8>>;
    let forgeries: Vec<(&str, Forge)> = vec![
        (
            "a ClientHello without a cookie",
            Box::new(|seq| client_hello(0, seq, 0, &[])),
        ),
        (
            "a ClientHello with a garbage cookie",
            Box::new(|seq| client_hello(0, seq, 1, &[0xAB; 20])),
        ),
        (
            "an epoch-0 fatal alert",
            Box::new(|seq| record(CT_ALERT, 0, seq, &[2, 40])),
        ),
        (
            "an epoch-0 close_notify",
            Box::new(|seq| record(CT_ALERT, 0, seq, &[1, 0])),
        ),
        (
            "epoch-0 application data",
            Box::new(|seq| record(CT_APP_DATA, 0, seq, &coap_get("/gateway", 99))),
        ),
        (
            "an epoch-1 record that does not decrypt",
            Box::new(|seq| record(CT_APP_DATA, 1, seq + 1000, &[0x5A; 64])),
        ),
        (
            "an epoch-1 alert that does not decrypt",
            Box::new(|seq| record(CT_ALERT, 1, seq + 2000, &[0x11; 40])),
        ),
        (
            "a handshake record in epoch 1",
            Box::new(|seq| handshake(1, seq + 3000, 20, 3, &[0; 12])),
        ),
    ];
    for (i, (what, forge)) in forgeries.iter().enumerate() {
        s.raw.send(forge).await;
        let mid = 100 + i as u16;
        let answer = s
            .exchange(&coap_get("/gateway", mid), Duration::from_secs(3))
            .await;
        let packet = answer.map(|a| coap_lite::Packet::from_bytes(&a).unwrap());
        assert!(
            packet.is_some_and(|p| p.header.message_id == mid),
            "the session ended after {what}"
        );
    }
    let figures = gateway_figures(gw.addr).await;
    assert!(
        figures["dtls_dropped_forged"].as_u64().unwrap() >= 5,
        "{figures}"
    );
    assert_eq!(
        figures["dtls_replaced"], 0,
        "no forged ClientHello replaced the session"
    );
}

// Regression: any non-empty cookie marked a handshake verified, so 272 forged addresses
// sending ClientHello, its repeat and one with a garbage cookie — 41 datagrams a second —
// filled every half-open slot with handshakes that could never be evicted, and locked every
// real client out for 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_cookies_cannot_lock_real_clients_out() {
    let gw = gateway("");
    let server = gw.addr;
    // Paced at a datagram a millisecond (the attack needs only 41 a second): a burst would
    // mostly be dropped by the kernel's socket buffer, which measures nothing.
    let flood = tokio::spawn(async move {
        let mut forgers = Vec::new();
        for n in 0..272u32 {
            let ip = format!("127.4.{}.{}", n >> 8, n & 0xFF);
            forgers.push(Raw::from(server, &ip).await);
        }
        // The garbage cookie comes in a ClientHello with message_seq 0, which webrtc-dtls has
        // already taken and never parses again: only the cookie check can tell it is forged.
        for cookie in [&[][..], &[], &[0x42; 20]] {
            for f in &mut forgers {
                f.send(|s| client_hello(0, s, 0, cookie)).await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        forgers
    });
    let _forgers = flood.await.unwrap();
    // Every real client gets in, each within a second or two (one ClientHello retransmission).
    for i in 0..5 {
        let t = Instant::now();
        let c = session(server, "127.0.0.1", "full", PSK).await;
        let took = t.elapsed();
        assert!(
            c.is_ok(),
            "real client {i} locked out: {:?}",
            c.as_ref().err()
        );
        assert!(
            took < Duration::from_secs(4),
            "real client {i} took {took:?}"
        );
        let _ = c.unwrap().close().await;
    }
    let figures = gateway_figures(gw.addr).await;
    println!("after the forged-cookie flood: {figures}");
    assert!(
        figures["dtls_dropped_forged"].as_u64().unwrap() >= 200,
        "{figures}"
    );
}

// Real clients from one address (one host, 256 sockets, each past the cookie exchange and
// then silent) must not lock out a client from another address; nor may one identity's
// sessions push out another identity's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_or_identity_cannot_take_every_slot() {
    let gw = gateway("max_peers_per_identity = 3");
    // Each sends its ClientHello twice (as a real client retransmits), then answers the
    // cookie it got, then says nothing more.
    let mut stalled = Vec::new();
    for _ in 0..256 {
        let mut r = Raw::from(gw.addr, "127.0.0.1").await;
        r.send(|s| client_hello(0, s, 0, &[])).await;
        r.send(|s| client_hello(0, s, 0, &[])).await;
        stalled.push(r);
    }
    let cookies = futures_util::future::join_all(stalled.iter().map(|r| {
        r.receive_until(Duration::from_secs(3), |d| {
            common::dtls_raw::cookie(d).is_some()
        })
    }))
    .await;
    for (r, hvr) in stalled.iter_mut().zip(cookies) {
        if let Some(cookie) = common::dtls_raw::cookie(&hvr) {
            r.send(|s| client_hello(0, s, 1, &cookie)).await;
        }
    }
    let t = Instant::now();
    let other = session(gw.addr, "127.0.0.6", "full", PSK).await;
    assert!(
        other.is_ok(),
        "a client from another address was locked out: {:?}",
        other.as_ref().err()
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    let figures = gateway_figures(gw.addr).await;
    assert!(
        figures["dtls_dropped_address_cap"].as_u64().unwrap() >= 200,
        "{figures}"
    );
    drop(stalled);

    // Per identity: a fourth session of `reader` ends its oldest; `full` is untouched.
    let full = other.unwrap();
    let mut readers = Vec::new();
    for _ in 0..4 {
        readers.push(
            session(gw.addr, "127.0.0.7", "reader", READER_PSK)
                .await
                .unwrap(),
        );
    }
    // The eviction follows the fourth session's completion, in the endpoint's own time: wait
    // for it (a loaded machine may answer the oldest once more before it is gone).
    let t = Instant::now();
    let mut mid = 100;
    while get(&readers[0], "/locks", mid).await.is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the oldest reader session was never evicted"
        );
        mid += 1;
    }
    for (i, r) in readers.iter().enumerate().skip(1) {
        assert!(get(r, "/locks", 2).await.is_some(), "reader session {i}");
    }
    assert!(
        get(&full, "/locks", 3).await.is_some(),
        "another identity's session"
    );
}

/// CPU seconds `pid` has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

// Regression: a client that re-handshakes from the same port while observing a lock left its
// old session's observation running, holding a connection whose reader spun at one core until
// the lock next changed. A forged ClientHello from its address did the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_handshaking_while_observing_leaves_no_task_behind() {
    let gw = gateway("");
    gw.world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let before = gateway_figures(gw.addr).await["tasks"].as_u64().unwrap();
    let raw = Raw::new(gw.addr).await;
    let mut first = Session::handshake(raw, "full", PSK.as_bytes(), Finished::Correct)
        .await
        .unwrap();
    let mut observe = coap_lite::Packet::new();
    observe.header.set_type(coap_lite::MessageType::Confirmable);
    observe.header.code = coap_lite::MessageClass::Request(coap_lite::RequestType::Get);
    observe.header.message_id = 5;
    observe.set_token(vec![1, 2, 3, 4]);
    observe.set_observe_value(0);
    observe.add_option(coap_lite::CoapOption::UriPath, b"locks".to_vec());
    observe.add_option(coap_lite::CoapOption::UriPath, b"lock-1".to_vec());
    let registered = first
        .exchange(&observe.to_bytes().unwrap(), Duration::from_secs(3))
        .await
        .expect("the observation is registered");
    assert!(
        coap_lite::Packet::from_bytes(&registered)
            .unwrap()
            .get_observe_value()
            .is_some()
    );
    // The client restarts: the same address and port, a new handshake, no close_notify.
    let mut second = Session::handshake(first.raw, "full", PSK.as_bytes(), Finished::Correct)
        .await
        .unwrap();
    assert!(
        second
            .exchange(&coap_get("/gateway", 9), Duration::from_secs(3))
            .await
            .is_some()
    );
    second.close().await;
    let figures = gateway_figures(gw.addr).await;
    assert_eq!(
        figures["dtls_replaced"], 1,
        "the new session replaced the old: {figures}"
    );
    // Back to where it was: no task of the old session lives on, and nothing spins.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tasks = u64::MAX;
    while Instant::now() < deadline {
        tasks = gateway_figures(gw.addr).await["tasks"].as_u64().unwrap();
        if tasks <= before + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(tasks <= before + 1, "tasks {before} before, {tasks} after");
    let pid = gw.daemon.0.id();
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    while t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let used = cpu_seconds(pid) - cpu0;
    assert!(
        used < 0.5,
        "the daemon used {used:.2} s of CPU in 2 s while idle"
    );
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

// Regression: a half-open handshake buffered every fragment it was sent (8,000 × 1.9 KB were
// accepted), and a valid 2,677-byte ClientHello was never answered (a 2,048-byte read buffer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_hold_bounded_memory_and_large_client_hellos_are_answered() {
    let gw = gateway("");
    let pid = gw.daemon.0.id();
    let _ = gateway_figures(gw.addr).await;
    let before = rss_kib(pid);
    // Eight handshakes past the cookie, each sent 1,200 fragments of a 16 MB message.
    let mut clients = Vec::new();
    for i in 0..8 {
        let mut r = Raw::from(gw.addr, &format!("127.0.5.{}", i + 1)).await;
        let flight4 = r.start_handshake().await;
        assert!(!flight4.is_empty());
        clients.push(r);
    }
    // Paced (a millisecond per eight datagrams) so that the daemon takes them all in rather
    // than the socket dropping them: this measures what a handshake keeps, not the kernel.
    let piece = vec![0x33u8; 1900];
    for k in 0..1200u32 {
        for r in &mut clients {
            let mut h = vec![11u8, 0xFF, 0xFF, 0xFF, 0, 2];
            h.extend_from_slice(&(k * 1900).to_be_bytes()[1..]);
            h.extend_from_slice(&(1900u32).to_be_bytes()[1..]);
            h.extend_from_slice(&piece);
            r.send(|s| record(CT_HANDSHAKE, 0, s, &h)).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Everything sent has been taken in once the drop count stops moving.
    let mut figures = gateway_figures(gw.addr).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = gateway_figures(gw.addr).await;
        if now["dtls_dropped_budget"] == figures["dtls_dropped_budget"] {
            break;
        }
        figures = now;
    }
    let grown = rss_kib(pid).saturating_sub(before);
    println!("RSS grew {grown} KiB after 8 × 1,200 fragments: {figures}");
    assert!(grown < 6 * 1024, "RSS grew {grown} KiB");
    assert!(
        figures["dtls_dropped_budget"].as_u64().unwrap() > 0,
        "{figures}"
    );

    // A ClientHello of 2,677 bytes (a padding extension) gets its HelloVerifyRequest.
    let r = Raw::new(gw.addr).await;
    let body = common::dtls_raw::client_hello_body(&[1; 32], &[], 2600);
    let hello = handshake(0, 0, 1, 0, &body);
    assert_eq!(hello.len(), 2677);
    r.socket.send(&hello).await.unwrap();
    let answer = r
        .receive_until(Duration::from_secs(3), |d| !d.is_empty())
        .await;
    assert!(
        common::dtls_raw::cookie(&answer).is_some(),
        "no HelloVerifyRequest: {answer:?}"
    );
}

// Shutting down ends every DTLS session with an encrypted close_notify, as TLS asks, rather
// than letting clients find out from silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_closes_every_dtls_session_with_close_notify() {
    let mut gw = gateway("");
    let raw = Raw::new(gw.addr).await;
    let mut s = Session::handshake(raw, "full", PSK.as_bytes(), Finished::Correct)
        .await
        .unwrap();
    s.exchange(&coap_get("/gateway", 21), Duration::from_secs(3))
        .await
        .expect("served");
    gw.daemon.signal("-TERM");
    let alert = s.recv_alert(Duration::from_secs(20)).await;
    assert_eq!(
        alert.as_deref(),
        Some(&[1u8, 0][..]),
        "warning, close_notify"
    );
    assert!(gw.daemon.wait_exit(Duration::from_secs(30)).success());
}
