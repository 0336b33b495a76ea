//! The DTLS layer under hostile and lossy networks, against the real daemon and simulator:
//!
//! - the webrtc-dtls listener faults lockbridge's layer fixes, each checked against lockbridge
//!   **and** against a plain `DTLSListener`, where the same check must fail — so these tests
//!   can tell a fixed layer from a broken one;
//! - negative protocol tests from the DTLS state-fuzzing literature (Fiterau-Brostean et al.,
//!   USENIX Security 2020): records out of order or after the end of a session never crash the
//!   server and never yield application data;
//! - 200 handshakes and commands through a seeded UDP fault proxy dropping 20 % of datagrams
//!   each way, with duplicates and reordering.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test code

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use webrtc_dtls::cipher_suite::CipherSuiteId;
use webrtc_dtls::config::{Config as DtlsConfig, ExtendedMasterSecretType};
use webrtc_dtls::conn::DTLSConn;
use webrtc_util::conn::Listener;

use common::dtls_raw::{
    CT_ALERT, CT_APP_DATA, CT_CCS, CT_HANDSHAKE, Raw, client_hello, handshake, record, records,
    types,
};
use common::udp_proxy::{Dir, Faults, Filter, Proxy};
use common::{Gateway, PSK};

// ---------------------------------------------------------------------------------------------
// Clients and servers.

/// A webrtc-dtls PSK handshake from `socket` to `server`, given up after `limit`.
async fn handshake_from(
    socket: UdpSocket,
    server: SocketAddr,
    key: &'static str,
    limit: Duration,
) -> Result<DTLSConn, String> {
    socket.connect(server).await.unwrap();
    let hs = DTLSConn::new(
        Arc::new(socket),
        common::psk_dtls_config("full", key),
        true,
        None,
    );
    match tokio::time::timeout(limit, hs).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no handshake within {limit:?}")),
    }
}

async fn handshake_to(server: SocketAddr, limit: Duration) -> Result<DTLSConn, String> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    handshake_from(socket, server, PSK, limit).await
}

/// webrtc-dtls's own listener, as a server without lockbridge's layer, accepting in a loop.
async fn plain_listener() -> SocketAddr {
    let port = common::free_udp_port();
    let config = DtlsConfig {
        psk: Some(Arc::new(|_: &[u8]| Ok(PSK.as_bytes().to_vec()))),
        psk_identity_hint: Some(b"lockbridge".to_vec()),
        cipher_suites: vec![CipherSuiteId::Tls_Psk_With_Aes_128_Gcm_Sha256],
        extended_master_secret: ExtendedMasterSecretType::Require,
        ..Default::default()
    };
    let listener = webrtc_dtls::listener::listen(("127.0.0.1", port), config)
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut kept = Vec::new();
        loop {
            if let Ok((conn, _)) = listener.accept().await {
                kept.push(conn);
            }
        }
    });
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn gateway(locks: usize) -> Gateway {
    Gateway::start(locks, "", "")
}

impl Gateway {
    /// A real client still gets a CoAP answer quickly, and the daemon is alive and well.
    /// Returns what `GET /gateway` said.
    async fn still_serves(&mut self) -> serde_json::Value {
        let t = Instant::now();
        let credentials = lockbridge::ctl::Credentials::Psk {
            identity: "full".into(),
            key: zeroize::Zeroizing::new(PSK.as_bytes().to_vec()),
        };
        let mut c = lockbridge::ctl::CoapClient::connect(self.addr, &credentials)
            .await
            .unwrap();
        let (code, body) = c
            .request(coap_lite::RequestType::Get, "/gateway", &[])
            .await
            .unwrap();
        assert_eq!(code, "2.05");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        c.close().await;
        assert!(
            self.daemon.0.try_wait().unwrap().is_none(),
            "the daemon died"
        );
        serde_json::from_slice(&body).unwrap()
    }
}

/// DTLS peers `GET /gateway` counts, not counting the session that asks.
async fn peers_besides_the_asker(server: SocketAddr) -> u64 {
    let credentials = lockbridge::ctl::Credentials::Psk {
        identity: "full".into(),
        key: zeroize::Zeroizing::new(PSK.as_bytes().to_vec()),
    };
    let mut c = lockbridge::ctl::CoapClient::connect(server, &credentials)
        .await
        .unwrap();
    let (_, body) = c
        .request(coap_lite::RequestType::Get, "/gateway", &[])
        .await
        .unwrap();
    c.close().await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["dtls_peers"].as_u64().unwrap() - 1
}

// ---------------------------------------------------------------------------------------------
// The listener faults, each shown fixed here and present in a plain DTLSListener.

/// Fault 1: a ClientHello that is never continued. Returns how long a real client then took.
async fn silent_hello_then_real_client(server: SocketAddr) -> Result<Duration, String> {
    // Sent first to the same socket, so it is read first.
    let mut spoof = Raw::new(server).await;
    spoof.send(|s| client_hello(0, s, 0, &[])).await;
    let t = Instant::now();
    handshake_to(server, Duration::from_secs(3)).await?;
    Ok(t.elapsed())
}

/// Fault 2: a client that ends its session and comes back from the same address and port.
async fn reconnect_from_the_same_port(server: SocketAddr) -> Result<(), String> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = socket.local_addr().unwrap();
    socket.set_nonblocking(true).unwrap();
    let first = handshake_from(
        UdpSocket::from_std(socket).unwrap(),
        server,
        PSK,
        Duration::from_secs(3),
    )
    .await?;
    first.close().await.map_err(|e| e.to_string())?;
    drop(first);
    // The port is free once webrtc-dtls's own tasks have let go of the socket.
    let t = Instant::now();
    let again = loop {
        match std::net::UdpSocket::bind(local) {
            Ok(s) => break s,
            Err(e) if t.elapsed() > Duration::from_secs(10) => {
                return Err(format!("rebind {local}: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    again.set_nonblocking(true).unwrap();
    handshake_from(
        UdpSocket::from_std(again).unwrap(),
        server,
        PSK,
        Duration::from_secs(3),
    )
    .await
    .map(|_| ())
}

/// Fault 3: the server's final flight (ChangeCipherSpec, Finished) is lost once. The client
/// repeats its flight after 1 s; the server must resend.
async fn final_flight_lost_once(server: SocketAddr) -> Result<Duration, String> {
    let dropping_since: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let d = dropping_since.clone();
    let drop_if: Filter = Arc::new(move |dir, data| {
        let final_flight = records(data)
            .iter()
            .any(|(ct, epoch, _)| *ct == CT_CCS || *epoch > 0);
        if dir != Dir::ToClient || !final_flight {
            return false;
        }
        let mut since = d.lock().unwrap();
        let first = *since.get_or_insert_with(Instant::now);
        first.elapsed() < Duration::from_millis(300)
    });
    let proxy = Proxy::start(
        server,
        Faults {
            drop_if: Some(drop_if),
            ..Faults::default()
        },
    )
    .await;
    let t = Instant::now();
    let conn = handshake_to(proxy.addr, Duration::from_secs(5)).await?;
    assert!(
        dropping_since.lock().unwrap().is_some(),
        "the final flight was dropped"
    );
    let _ = conn.close().await;
    Ok(t.elapsed())
}

/// Fault 4: a client that stops after its ClientHello with the cookie. Returns how many
/// datagrams the server still sends it within 3 s once `gone` says the handshake has ended
/// (lockbridge's peer count; the plain listener's never ends, so for it `gone` is the
/// deadline itself having passed).
async fn datagrams_to_an_abandoned_handshake<F, Fut>(server: SocketAddr, gone: F) -> usize
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut raw = Raw::new(server).await;
    let flight4 = raw.start_handshake().await;
    assert!(!flight4.is_empty(), "the server answered the cookie");
    let t = Instant::now();
    while !gone().await {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the handshake never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    raw.receive(Duration::ZERO).await; // what was sent before, still queued in the socket
    raw.receive(Duration::from_secs(3)).await.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_handshake_ends_at_its_deadline_here_and_never_in_a_plain_listener() {
    let mut gw = Gateway::start(1, "handshake_timeout_s = 2", "");
    let plain = plain_listener().await;
    let addr = gw.addr;
    let started = Instant::now();
    let (here, there) = tokio::join!(
        datagrams_to_an_abandoned_handshake(addr, || async move {
            // Only the asking client is left.
            peers_besides_the_asker(addr).await == 0
        }),
        datagrams_to_an_abandoned_handshake(plain, || async move {
            started.elapsed() > Duration::from_millis(2500)
        })
    );
    println!("datagrams 3-6 s after the client went quiet: lockbridge {here}, plain {there}");
    assert_eq!(
        here, 0,
        "lockbridge dropped the handshake at its 2 s deadline"
    );
    assert!(
        there >= 2,
        "a plain listener retransmits forever: {there} datagrams"
    );
    gw.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_faults_are_fixed_here_and_present_in_a_plain_listener() {
    let mut gw = gateway(1);
    let plain = plain_listener().await;

    let took = silent_hello_then_real_client(gw.addr).await.unwrap();
    assert!(took < Duration::from_secs(2), "real client took {took:?}");
    let plain_result = silent_hello_then_real_client(plain).await;
    assert!(
        plain_result.is_err(),
        "a plain listener is blocked: {plain_result:?}"
    );

    reconnect_from_the_same_port(gw.addr).await.unwrap();
    let plain = plain_listener().await;
    let plain_result = reconnect_from_the_same_port(plain).await;
    assert!(
        plain_result.is_err(),
        "a plain listener never forgets a peer: {plain_result:?}"
    );

    let took = final_flight_lost_once(gw.addr).await.unwrap();
    println!("final flight lost once: handshake in {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let plain = plain_listener().await;
    let plain_result = final_flight_lost_once(plain).await;
    assert!(
        plain_result.is_err(),
        "a plain listener never resends: {plain_result:?}"
    );

    gw.still_serves().await;
}

/// Beyond the four faults: a flood of first ClientHellos, each from an address never used
/// before (as when source addresses are forged), is held back instead of costing a handshake
/// each, and a real client meanwhile gets through within 2 s (one retransmission).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_client_hello_flood_is_held_back_and_a_real_client_gets_through() {
    let mut gw = gateway(1);
    let server = gw.addr;
    const FLOOD: u32 = 4000;
    // About 4,000 ClientHellos per second, each from its own loopback address.
    let flood = std::thread::spawn(move || {
        let hello = client_hello(0, 0, 0, &[]);
        for n in 0..FLOOD {
            let ip = std::net::Ipv4Addr::new(127, 2 + (n >> 16) as u8, (n >> 8) as u8, n as u8);
            let socket = std::net::UdpSocket::bind((ip, 0)).unwrap();
            socket.send_to(&hello, server).unwrap();
            if n % 4 == 3 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let real = handshake_to(server, Duration::from_secs(5)).await;
    let took = t.elapsed();
    flood.join().unwrap();
    real.unwrap();
    println!("real client during the flood: {took:?}");
    assert!(took < Duration::from_secs(2), "real client took {took:?}");

    let gateway = gw.still_serves().await;
    println!("after the flood: {gateway}");
    let held = gateway["dtls_hellos_held_back"].as_u64().unwrap();
    // At most half the half-open slots (256) fill before ClientHellos are held back.
    assert!(
        held >= u64::from(FLOOD) - 256,
        "only {held} of {FLOOD} forged ClientHellos were held back"
    );
}

// ---------------------------------------------------------------------------------------------
// State fuzzing: records out of order. None may crash the server or yield application data.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_records_never_crash_or_yield_access() {
    let mut gw = gateway(1);
    let coap_get = {
        let mut p = coap_lite::Packet::new();
        p.header.set_type(coap_lite::MessageType::Confirmable);
        p.header.code = coap_lite::MessageClass::Request(coap_lite::RequestType::Get);
        p.add_option(coap_lite::CoapOption::UriPath, b"locks".to_vec());
        p.to_bytes().unwrap()
    };

    // Application data before the handshake ends (plaintext in epoch 0, garbage in epoch 1).
    let mut c = Raw::new(gw.addr).await;
    let flight4 = c.start_handshake().await;
    assert!(
        types(&flight4).contains(&CT_HANDSHAKE),
        "the handshake started"
    );
    c.send(|s| record(CT_APP_DATA, 0, s, &coap_get)).await;
    c.send(|s| record(CT_APP_DATA, 1, s, &[0x5A; 48])).await;
    let answer = c.receive(Duration::from_millis(600)).await;
    assert!(
        !types(&answer).contains(&CT_APP_DATA),
        "application data before the handshake"
    );

    // ChangeCipherSpec before the handshake, and before the key exchange.
    let mut c = Raw::new(gw.addr).await;
    c.send(|s| client_hello(0, s, 0, &[])).await;
    c.send(|s| record(CT_CCS, 0, s, &[1])).await;
    let _ = c.receive(Duration::from_millis(300)).await;
    let mut c = Raw::new(gw.addr).await;
    c.start_handshake().await;
    c.send(|s| record(CT_CCS, 0, s, &[1])).await;
    c.send(|s| record(CT_HANDSHAKE, 1, s, &[0xA5; 40])).await;
    let answer = c.receive(Duration::from_millis(600)).await;
    assert!(
        !types(&answer).contains(&CT_CCS),
        "an early CCS finished a handshake"
    );
    assert!(!types(&answer).contains(&CT_APP_DATA));

    // Finished before ChangeCipherSpec (a PSK ClientKeyExchange, then Finished in epoch 0).
    let mut c = Raw::new(gw.addr).await;
    c.start_handshake().await;
    c.send(|s| handshake(0, s, 16, 2, &[0, 4, b'f', b'u', b'l', b'l']))
        .await;
    c.send(|s| handshake(0, s, 20, 3, &[0u8; 12])).await;
    let answer = c.receive(Duration::from_millis(600)).await;
    assert!(
        !types(&answer).contains(&CT_CCS),
        "Finished without CCS finished a handshake"
    );
    assert!(!types(&answer).contains(&CT_APP_DATA));

    // A ClientHello in epoch 1 from a new address: no state, no answer at all.
    let mut c = Raw::new(gw.addr).await;
    c.send(|s| client_hello(1, s, 0, &[])).await;
    assert!(c.receive(Duration::from_millis(400)).await.is_empty());

    // A second ClientHello in the middle of a handshake.
    let mut c = Raw::new(gw.addr).await;
    c.start_handshake().await;
    c.send(|s| client_hello(0, s, 2, &[])).await;
    c.send(|s| client_hello(0, s, 0, &[])).await;
    let answer = c.receive(Duration::from_millis(600)).await;
    assert!(!types(&answer).contains(&CT_APP_DATA));
    assert!(!types(&answer).contains(&CT_CCS));

    gw.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_after_close_notify_or_a_fatal_alert_is_ignored() {
    let mut gw = gateway(1);
    let proxy = Proxy::start(gw.addr, Faults::default()).await;

    // A real session, then close_notify; its recorded request replayed afterwards.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = socket.local_addr().unwrap();
    // Generous deadlines: the suite runs on a loaded machine.
    let conn = handshake_from(socket, proxy.addr, PSK, Duration::from_secs(20))
        .await
        .unwrap();
    let mut get = coap_lite::Packet::new();
    get.header.set_type(coap_lite::MessageType::Confirmable);
    get.header.code = coap_lite::MessageClass::Request(coap_lite::RequestType::Get);
    get.header.message_id = 7;
    get.add_option(coap_lite::CoapOption::UriPath, b"gateway".to_vec());
    conn.write(&get.to_bytes().unwrap(), None).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let n = conn
        .read(&mut buf, Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(
        coap_lite::Packet::from_bytes(&buf[..n]).is_ok(),
        "the session works"
    );
    let request = proxy
        .delivered(me, Dir::ToServer)
        .into_iter()
        .rev()
        .find(|d| records(d).iter().any(|(ct, _, _)| *ct == CT_APP_DATA))
        .unwrap();
    conn.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proxy.delivered(me, Dir::ToClient).len();
    proxy.inject(me, &request).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = proxy.delivered(me, Dir::ToClient);
    assert!(
        !types(&after[before..]).contains(&CT_APP_DATA),
        "a request after close_notify was answered"
    );

    // A handshake that ends in a fatal alert (wrong key), then application data.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = socket.local_addr().unwrap();
    let refused = handshake_from(
        socket,
        proxy.addr,
        "not-the-key-not-the-key!",
        Duration::from_secs(20),
    )
    .await;
    assert!(refused.is_err());
    // The server's fatal alert, once the proxy has carried it.
    let t = std::time::Instant::now();
    while !types(&proxy.delivered(me, Dir::ToClient)).contains(&CT_ALERT) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the server sent no alert: {:?}",
            types(&proxy.delivered(me, Dir::ToClient))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = proxy.delivered(me, Dir::ToClient).len();
    proxy
        .inject(me, &record(CT_APP_DATA, 1, 9, &[0x33; 64]))
        .await;
    proxy
        .inject(me, &record(CT_APP_DATA, 0, 10, &get.to_bytes().unwrap()))
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = proxy.delivered(me, Dir::ToClient);
    assert!(!types(&after[before..]).contains(&CT_APP_DATA));

    gw.still_serves().await;
}

// ---------------------------------------------------------------------------------------------
// Loss: 20 % each way, duplicates and reordering.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_and_commands_survive_20_percent_loss() {
    let mut gw = gateway(4);
    let proxy = Proxy::start(
        gw.addr,
        Faults {
            loss: 0.2,
            duplicate: 0.05,
            reorder: 0.1,
            seed: 2026,
            drop_if: None,
        },
    )
    .await;

    // 200 handshakes, 50 at a time.
    let mut times = Vec::new();
    let mut failed = Vec::new();
    for _ in 0..4 {
        let batch: Vec<_> = (0..50)
            .map(|_| {
                let addr = proxy.addr;
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = handshake_to(addr, Duration::from_secs(30)).await;
                    if let Ok(c) = &r {
                        let _ = c.close().await;
                    }
                    (r.map(|_| ()), t.elapsed())
                })
            })
            .collect();
        for h in batch {
            match h.await.unwrap() {
                (Ok(()), t) => times.push(t),
                (Err(e), _) => failed.push(e),
            }
        }
    }
    times.sort();
    println!(
        "200 handshakes at 20 % loss: {} done within 30 s, p50 {:?}, p99 {:?}, max {:?}; failed: {failed:?}",
        times.len(),
        times[times.len() / 2],
        times[times.len() * 99 / 100],
        times.last().unwrap()
    );
    assert!(
        times.len() >= 198,
        "{} of 200 within 30 s: {failed:?}",
        times.len()
    );

    // Commands: each lock gets 4 commands from its own client; a command without an answer is
    // asked again with the same request id. Every one gets exactly one outcome.
    let tasks: Vec<_> = (1..=4)
        .map(|lock| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let credentials = lockbridge::ctl::Credentials::Psk {
                    identity: "full".into(),
                    key: zeroize::Zeroizing::new(PSK.as_bytes().to_vec()),
                };
                let mut outcomes = Vec::new();
                let mut client = None;
                for (i, action) in ["unlock", "lock", "unlock", "lock"].iter().enumerate() {
                    let id = format!("loss-{lock}-{i}");
                    let body = format!(r#"{{"request_id":"{id}"}}"#);
                    let path = format!("/locks/lock-{lock}/{action}");
                    let mut answer = None;
                    for _attempt in 0..5 {
                        if client.is_none() {
                            client = lockbridge::ctl::CoapClient::connect(addr, &credentials)
                                .await
                                .ok();
                        }
                        let Some(c) = client.as_mut() else { continue };
                        match c
                            .request(coap_lite::RequestType::Post, &path, body.as_bytes())
                            .await
                        {
                            Ok(a) => {
                                answer = Some(a);
                                break;
                            }
                            // No answer: ask again, same id, on a new session.
                            Err(_) => client = None,
                        }
                    }
                    let (code, payload) = answer.unwrap_or_else(|| panic!("{id}: no answer"));
                    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    assert_eq!(v["id"], id.as_str());
                    outcomes.push((id, code, v["status"].as_str().unwrap().to_string()));
                }
                outcomes
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    println!("outcomes at 20 % loss: {all:?}");
    assert_eq!(all.len(), 16);
    let acts = gw.world.actuations();
    let mut per_lock: HashMap<String, usize> = HashMap::new();
    for a in &acts {
        *per_lock.entry(a["lock"].to_string()).or_default() += 1;
    }
    assert!(
        acts.len() <= 16,
        "{} actuations for 16 commands",
        acts.len()
    );
    assert!(per_lock.values().all(|n| *n <= 4), "{per_lock:?}");
    let successes = all.iter().filter(|(_, _, s)| s == "success").count();
    assert_eq!(
        acts.len(),
        successes,
        "every success actuated once, nothing else did: {all:?}"
    );
    gw.still_serves().await;
}
