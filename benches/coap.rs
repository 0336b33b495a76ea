//! Cloud endpoint benchmark (issue 5): CoAP over DTLS against a real `lockbridge run` (release
//! build) and simulator, with the load generator (webrtc-dtls clients) in this process on the
//! same machine. `cargo bench --bench coap` prints a table and one `json:` line.
//!
//! - Handshakes per second, PSK and ECDHE-ECDSA with a client certificate, 16 at a time.
//! - CoAP `GET /gateway` requests per second over 1,000 established sessions, each session one
//!   request in flight (target ≥ 15,000/s on 2 cores, load generator included).
//! - Daemon RSS before and with 1,000 idle peers (target ≤ 32 KiB per peer).
//! - A flood of 10,000 spoofed ClientHellos per second, each from a new address, and the handshake
//!   time of a real client meanwhile (target ≤ 2 s).
//! - The same handshake and GET loads against libcoap's `coap-server-openssl` and handshakes
//!   against `openssl s_server`, run here in the same process, for the ratios.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // benchmark code

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

mod support;
use support::{Proc, demo_world, rss_kib, runtime, sim_and_daemon};
use webrtc_dtls::cipher_suite::CipherSuiteId;
use webrtc_dtls::config::{Config as DtlsConfig, ExtendedMasterSecretType};
use webrtc_dtls::conn::DTLSConn;

const PSK: &[u8] = b"lockbridge-bench-psk-0001";

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Client-side credentials for a handshake.
#[derive(Clone)]
enum Auth {
    Psk { identity: &'static str },
    Cert(Box<webrtc_dtls::crypto::Certificate>),
}

fn client_config(auth: &Auth) -> DtlsConfig {
    match auth {
        Auth::Psk { identity } => DtlsConfig {
            psk: Some(Arc::new(|_: &[u8]| Ok(PSK.to_vec()))),
            psk_identity_hint: Some(identity.as_bytes().to_vec()),
            cipher_suites: vec![CipherSuiteId::Tls_Psk_With_Aes_128_Gcm_Sha256],
            extended_master_secret: ExtendedMasterSecretType::Require,
            server_name: "lockbridge".into(),
            ..Default::default()
        },
        Auth::Cert(cert) => DtlsConfig {
            certificates: vec![(**cert).clone()],
            cipher_suites: vec![CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256],
            extended_master_secret: ExtendedMasterSecretType::Require,
            // The bench's server certificate is self-signed; the handshake cost is the same.
            insecure_skip_verify: true,
            ..Default::default()
        },
    }
}

async fn handshake(server: SocketAddr, auth: &Auth) -> Option<DTLSConn> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    socket.connect(server).await.ok()?;
    let hs = DTLSConn::new(Arc::new(socket), client_config(auth), true, None);
    tokio::time::timeout(Duration::from_secs(10), hs)
        .await
        .ok()?
        .ok()
}

/// `total` handshakes, `parallel` at a time: handshakes per second.
async fn handshake_rate(server: SocketAddr, auth: &Auth, total: usize, parallel: usize) -> f64 {
    let left = Arc::new(AtomicU64::new(total as u64));
    let done = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let tasks: Vec<_> = (0..parallel)
        .map(|_| {
            let (left, done, auth) = (left.clone(), done.clone(), auth.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    if let Some(c) = handshake(server, &auth).await {
                        done.fetch_add(1, Ordering::SeqCst);
                        let _ = c.close().await;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::SeqCst) as f64 / t.elapsed().as_secs_f64()
}

/// `n` sessions, opened 32 at a time.
async fn open_sessions(server: SocketAddr, auth: &Auth, n: usize) -> Vec<Arc<DTLSConn>> {
    let mut out = Vec::new();
    while out.len() < n {
        let batch: Vec<_> = (0..32.min(n - out.len()))
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move { handshake(server, &auth).await })
            })
            .collect();
        for b in batch {
            if let Some(c) = b.await.unwrap() {
                out.push(Arc::new(c));
            }
        }
    }
    out
}

fn get(path: &str, mid: u16) -> Vec<u8> {
    let mut p = coap_lite::Packet::new();
    p.header.set_type(coap_lite::MessageType::Confirmable);
    p.header.code = coap_lite::MessageClass::Request(coap_lite::RequestType::Get);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(coap_lite::CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p.to_bytes().unwrap()
}

/// GET `path` on every session in a closed loop for `length`: requests answered per second.
async fn get_rate(sessions: &[Arc<DTLSConn>], path: &'static str, length: Duration) -> f64 {
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + length;
    let tasks: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (c, answered) = (c.clone(), answered.clone());
            tokio::spawn(async move {
                let mut mid = (i as u16).wrapping_mul(64);
                let mut buf = vec![0u8; 2048];
                while Instant::now() < stop {
                    mid = mid.wrapping_add(1);
                    if c.write(&get(path, mid), None).await.is_err() {
                        return;
                    }
                    // A lost datagram is not retried here: the session simply stops counting.
                    match c.read(&mut buf, Some(Duration::from_secs(2))).await {
                        Ok(n) => {
                            // Count only real answers: 2.05 Content with this message id.
                            let ok = coap_lite::Packet::from_bytes(&buf[..n]).is_ok_and(|p| {
                                p.header.message_id == mid
                                    && p.header.code
                                        == coap_lite::MessageClass::Response(
                                            coap_lite::ResponseType::Content,
                                        )
                            });
                            if ok {
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    let t = Instant::now();
    for task in tasks {
        let _ = task.await;
    }
    answered.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

/// A first ClientHello (no cookie) offering PSK-AES128-GCM.
fn spoofed_hello() -> Vec<u8> {
    let mut hello = vec![22u8, 0xFE, 0xFD, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut body = vec![0xFE, 0xFD];
    body.extend_from_slice(&[3; 32]);
    body.extend_from_slice(&[0, 0, 0, 2, 0x00, 0xA8, 1, 0, 0, 4, 0x00, 0x17, 0, 0]);
    let len = body.len() as u32;
    let mut hs = vec![1u8];
    hs.extend_from_slice(&len.to_be_bytes()[1..]);
    hs.extend_from_slice(&[0, 0, 0, 0, 0]);
    hs.extend_from_slice(&len.to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    hello.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    hello.extend_from_slice(&hs);
    hello
}

/// 10,000 spoofed first ClientHellos per second, until `stop`, each from a source address and
/// port never used before (127.0.0.0/8, written with a raw socket, so this needs root): what
/// an attacker forging source addresses sends. Returns how many were sent.
fn flood(server: SocketAddr, stop: Arc<std::sync::atomic::AtomicBool>) -> u64 {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let SocketAddr::V4(server) = server else {
        panic!("the flood is IPv4")
    };
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))
        .expect("the spoof flood writes IP headers with a raw socket: run the benchmark as root");
    let hello = spoofed_hello();
    let mut packet = vec![0u8; 28 + hello.len()];
    // IPv4 header: the kernel fills in the checksum and the total length (IP_HDRINCL).
    packet[0] = 0x45;
    packet[8] = 64; // TTL
    packet[9] = 17; // UDP
    packet[16..20].copy_from_slice(&server.ip().octets());
    // UDP header, checksum 0 (none, allowed over IPv4).
    packet[22..24].copy_from_slice(&server.port().to_be_bytes());
    packet[24..26].copy_from_slice(&((8 + hello.len()) as u16).to_be_bytes());
    packet[28..].copy_from_slice(&hello);
    let to = SockAddr::from(SocketAddr::V4(server));
    let t = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::SeqCst) {
        // 10 per millisecond, paced against the clock.
        let due = (t.elapsed().as_micros() / 100) as u64;
        while sent < due {
            let n = sent as u32;
            let source = [127, 1 + ((n >> 16) % 254) as u8, (n >> 8) as u8, n as u8];
            packet[12..16].copy_from_slice(&source);
            let port = 1024 + (n.wrapping_mul(2_654_435_761) >> 16) as u16 % 60_000;
            packet[20..22].copy_from_slice(&port.to_be_bytes());
            let _ = raw.send_to(&packet, &to);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    sent
}

/// What a spoofed ClientHello flood did to a real client's handshakes.
struct FloodEffect {
    rate: f64,
    ok: usize,
    p50: Duration,
    max: Duration,
}

/// Flood `server` with spoofed ClientHellos and time ten real handshakes meanwhile.
async fn flood_effect(server: SocketAddr, auth: &Auth) -> FloodEffect {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = {
        let stop = stop.clone();
        std::thread::spawn(move || flood(server, stop))
    };
    let t_flood = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut real = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let ok = handshake(server, auth).await.is_some();
        real.push((ok, t.elapsed()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let sent = flooding.join().unwrap();
    let mut times: Vec<_> = real.iter().map(|(_, t)| *t).collect();
    times.sort();
    FloodEffect {
        rate: sent as f64 / t_flood.elapsed().as_secs_f64(),
        ok: real.iter().filter(|(ok, _)| *ok).count(),
        p50: times[times.len() / 2],
        max: times[times.len() - 1],
    }
}

/// The daemon, its simulator and its CoAP endpoint with PSK and certificate clients.
struct Gateway {
    addr: SocketAddr,
    client_cert: webrtc_dtls::crypto::Certificate,
    daemon: Proc,
    _sim: Proc,
    _dir: tempfile::TempDir,
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

async fn gateway() -> Gateway {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w");
    let summary = demo_world(&dir, 2);
    // Certificates: a self-signed gateway certificate and a pinned client key.
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let server_key = rcgen::KeyPair::generate_for(alg).unwrap();
    let server = rcgen::CertificateParams::new(vec!["lockbridge".to_string()])
        .unwrap()
        .self_signed(&server_key)
        .unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    write_private(&dir.join("server.key"), &server_key.serialize_pem());
    let client_key = rcgen::KeyPair::generate_for(alg).unwrap();
    let client = rcgen::CertificateParams::new(vec!["bench-client".to_string()])
        .unwrap()
        .self_signed(&client_key)
        .unwrap();
    let pin = hex::encode(lockbridge::cloud::certs::key_fingerprint(client.der()).unwrap());
    let client_cert = webrtc_dtls::crypto::Certificate {
        certificate: vec![client.der().clone()],
        private_key: webrtc_dtls::crypto::CryptoPrivateKey::from_key_pair(&client_key).unwrap(),
    };
    let port = free_port();
    let config = Path::new(summary["daemon_config"].as_str().unwrap()).to_path_buf();
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.split("\n[coap]").next().unwrap().to_string();
    let d = dir.display();
    std::fs::write(
        &config,
        format!(
            "{text}\n[coap]\nlisten = \"127.0.0.1:{port}\"\nmax_peers = 4096\n\
             certificate = \"{d}/server.pem\"\nprivate_key = \"{d}/server.key\"\n\
             [[coap.clients]]\nidentity = \"bench\"\npsk_hex = \"{}\"\n\
             [[coap.clients]]\nidentity = \"bench-cert\"\npublic_key_sha256 = \"{pin}\"\n\
             [[permissions]]\norigin = \"bench\"\nactions = [\"read\"]\n\
             [[permissions]]\norigin = \"bench-cert\"\nactions = [\"read\"]\n",
            hex::encode(PSK)
        ),
    )
    .unwrap();
    let (sim, daemon) = sim_and_daemon(&summary).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t = Instant::now();
    while handshake(addr, &Auth::Psk { identity: "bench" })
        .await
        .is_none()
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the endpoint did not come up"
        );
    }
    Gateway {
        addr,
        client_cert,
        daemon,
        _sim: sim,
        _dir: tmp,
    }
}

/// A peer server for the ratios, started quietly; `None` when it is not installed.
fn peer_server(mut command: Command, port: u16) -> Option<(Proc, SocketAddr)> {
    let child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    Some((Proc(child), format!("127.0.0.1:{port}").parse().unwrap()))
}

/// libcoap's server with the same PSK, if installed (tests/run.sh installs libcoap3-bin). Its
/// `-p` is the CoAP port; CoAP over DTLS listens on the next one.
fn coap_server_openssl() -> Option<(Proc, SocketAddr)> {
    let port = free_port();
    let mut command = Command::new("coap-server-openssl");
    command
        .args(["-A", "127.0.0.1", "-p", &(port - 1).to_string()])
        .args(["-k", std::str::from_utf8(PSK).unwrap(), "-v", "0"]);
    peer_server(command, port)
}

/// `openssl s_server` in DTLS PSK mode (one handshake at a time, by its design).
fn openssl_s_server() -> Option<(Proc, SocketAddr)> {
    let port = free_port();
    let mut command = Command::new("openssl");
    command
        .args(["s_server", "-dtls1_2", "-nocert", "-psk", &hex::encode(PSK)])
        .args(["-cipher", "PSK-AES128-GCM-SHA256", "-quiet"])
        .args(["-accept", &port.to_string()]);
    peer_server(command, port)
}

fn main() {
    runtime().block_on(async {
        let gw = gateway().await;
        let psk = Auth::Psk { identity: "bench" };
        if std::env::args().any(|a| a == "flood") {
            // `cargo bench --bench coap -- flood`: only the flood, e.g. to profile the daemon.
            let f = flood_effect(gw.addr, &psk).await;
            println!(
                "spoof flood {:.0} ClientHello/s: real client {}/10 ok, p50 {:?}, max {:?}",
                f.rate, f.ok, f.p50, f.max
            );
            return;
        }
        let cert = Auth::Cert(Box::new(gw.client_cert.clone()));

        let psk_rate = handshake_rate(gw.addr, &psk, 600, 16).await;
        let ecdsa_rate = handshake_rate(gw.addr, &cert, 300, 16).await;
        let psk_serial = handshake_rate(gw.addr, &psk, 100, 1).await;

        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_before = rss_kib(gw.daemon.0.id()).0;
        let sessions = open_sessions(gw.addr, &psk, 1000).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_1000 = rss_kib(gw.daemon.0.id()).0;
        let per_peer = (rss_1000.saturating_sub(rss_before)) as f64 / sessions.len() as f64;
        let gets = get_rate(&sessions, "/gateway", Duration::from_secs(5)).await;
        for s in &sessions {
            let _ = s.close().await;
        }
        drop(sessions);

        tokio::time::sleep(Duration::from_secs(1)).await;
        let flood = flood_effect(gw.addr, &psk).await;
        let (flood_rate, real_ok, real_p50, real_max) =
            (flood.rate, flood.ok, flood.p50, flood.max);
        let alive = gw.daemon.0.id() > 0 && rss_kib(gw.daemon.0.id()).0 > 0;

        // Peers on this machine, same load generator.
        let mut peer = serde_json::Map::new();
        if let Some((_server, addr)) = coap_server_openssl() {
            let hs = handshake_rate(addr, &Auth::Psk { identity: "bench" }, 600, 16).await;
            let sessions = open_sessions(addr, &Auth::Psk { identity: "bench" }, 1000).await;
            let g = get_rate(&sessions, "/", Duration::from_secs(5)).await;
            peer.insert("coap_server_openssl_handshakes_per_s".into(), hs.into());
            peer.insert("coap_server_openssl_get_per_s".into(), g.into());
            println!("coap-server-openssl: {hs:.0} PSK handshakes/s, {g:.0} GET/s over {} sessions", sessions.len());
        }
        if let Some((_server, addr)) = openssl_s_server() {
            let hs = handshake_rate(addr, &Auth::Psk { identity: "bench" }, 100, 1).await;
            peer.insert("openssl_s_server_handshakes_per_s_serial".into(), hs.into());
            println!("openssl s_server: {hs:.0} PSK handshakes/s, one at a time");
        }

        println!();
        println!("| figure | lockbridge | target |");
        println!("|---|---|---|");
        println!("| PSK handshakes/s (16 at a time) | {psk_rate:.0} | |");
        println!("| PSK handshakes/s (one at a time) | {psk_serial:.0} | |");
        println!("| ECDHE-ECDSA + client certificate handshakes/s (16 at a time) | {ecdsa_rate:.0} | |");
        println!("| GET /gateway per second over 1,000 sessions | {gets:.0} | ≥ 15,000 |");
        println!("| RSS: {rss_before} KiB → {rss_1000} KiB with 1,000 peers | {per_peer:.1} KiB/peer | ≤ 32 |");
        println!("| spoof flood | {flood_rate:.0} ClientHello/s | 10,000 |");
        println!("| real client during the flood | {real_ok}/10 ok, p50 {real_p50:?}, max {real_max:?} | ≤ 2 s |");
        println!("| daemon alive after | {alive} | |");
        let mut json = serde_json::json!({
            "psk_handshakes_per_s": psk_rate,
            "psk_handshakes_per_s_serial": psk_serial,
            "ecdsa_handshakes_per_s": ecdsa_rate,
            "get_per_s_1000_sessions": gets,
            "rss_kib_before": rss_before,
            "rss_kib_1000_peers": rss_1000,
            "kib_per_peer": per_peer,
            "flood_hellos_per_s": flood_rate,
            "flood_real_client_ok": real_ok,
            "flood_real_client_max_ms": real_max.as_secs_f64() * 1000.0,
        });
        if let Some(o) = json.as_object_mut() {
            o.extend(peer);
        }
        println!("json: {json}");
    });
}
