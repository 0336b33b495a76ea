//! DTLS 1.2 by hand: records, handshake messages, and a PSK client
//! (TLS_PSK_WITH_AES_128_GCM_SHA256 with the extended master secret, RFC 4279, 5288, 7627)
//! whose every byte the test chooses — a wrong Finished, forged records from its own address.

use std::net::SocketAddr;
use std::time::Duration;

use aes_gcm::Aes128Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;

pub const CT_CCS: u8 = 20;
pub const CT_ALERT: u8 = 21;
pub const CT_HANDSHAKE: u8 = 22;
pub const CT_APP_DATA: u8 = 23;

/// (content type, epoch, fragment) of every record in a datagram.
pub fn records(datagram: &[u8]) -> Vec<(u8, u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= 13 {
        let len = u16::from_be_bytes([rest[11], rest[12]]) as usize;
        let Some(fragment) = rest.get(13..13 + len) else {
            break;
        };
        out.push((rest[0], u16::from_be_bytes([rest[3], rest[4]]), fragment));
        rest = &rest[13 + len..];
    }
    out
}

pub fn record(content_type: u8, epoch: u16, seq: u64, fragment: &[u8]) -> Vec<u8> {
    let mut r = vec![content_type, 0xFE, 0xFD];
    r.extend_from_slice(&epoch.to_be_bytes());
    r.extend_from_slice(&seq.to_be_bytes()[2..]);
    r.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
    r.extend_from_slice(fragment);
    r
}

fn u24(n: usize) -> [u8; 3] {
    let b = (n as u32).to_be_bytes();
    [b[1], b[2], b[3]]
}

/// A handshake message in one fragment: its 12-byte header and body.
pub fn message(msg_type: u8, msg_seq: u16, body: &[u8]) -> Vec<u8> {
    let mut h = vec![msg_type];
    h.extend_from_slice(&u24(body.len()));
    h.extend_from_slice(&msg_seq.to_be_bytes());
    h.extend_from_slice(&u24(0));
    h.extend_from_slice(&u24(body.len()));
    h.extend_from_slice(body);
    h
}

pub fn handshake(epoch: u16, seq: u64, msg_type: u8, msg_seq: u16, body: &[u8]) -> Vec<u8> {
    record(CT_HANDSHAKE, epoch, seq, &message(msg_type, msg_seq, body))
}

/// A PSK ClientHello body (TLS_PSK_WITH_AES_128_GCM_SHA256, extended master secret), with
/// `padding` bytes of a padding extension (RFC 7685) to make it as large as wanted.
pub fn client_hello_body(random: &[u8; 32], cookie: &[u8], padding: usize) -> Vec<u8> {
    let mut b = vec![0xFE, 0xFD];
    b.extend_from_slice(random);
    b.push(0);
    b.push(cookie.len() as u8);
    b.extend_from_slice(cookie);
    b.extend_from_slice(&[0, 2, 0x00, 0xA8, 1, 0]);
    let mut ext = vec![0x00, 0x17, 0, 0];
    if padding > 0 {
        ext.extend_from_slice(&[0x00, 0x15]);
        ext.extend_from_slice(&(padding as u16).to_be_bytes());
        ext.extend(std::iter::repeat_n(0u8, padding));
    }
    b.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    b.extend_from_slice(&ext);
    b
}

/// A ClientHello record (random of sevens).
pub fn client_hello(epoch: u16, seq: u64, msg_seq: u16, cookie: &[u8]) -> Vec<u8> {
    handshake(
        epoch,
        seq,
        1,
        msg_seq,
        &client_hello_body(&[7u8; 32], cookie, 0),
    )
}

/// The cookie of the HelloVerifyRequest among `datagrams`.
pub fn cookie(datagrams: &[Vec<u8>]) -> Option<Vec<u8>> {
    datagrams
        .iter()
        .flat_map(|d| records(d))
        .find(|(ct, _, f)| *ct == CT_HANDSHAKE && f.first() == Some(&3))
        .map(|(_, _, f)| {
            let len = f[14] as usize;
            f[15..15 + len].to_vec()
        })
}

/// Content types of every record in `datagrams`.
pub fn types(datagrams: &[Vec<u8>]) -> Vec<u8> {
    datagrams
        .iter()
        .flat_map(|d| records(d).into_iter().map(|(ct, _, _)| ct))
        .collect()
}

/// A raw client on its own socket that speaks records by hand.
pub struct Raw {
    pub socket: UdpSocket,
    pub seq: u64,
}

impl Raw {
    pub async fn new(server: SocketAddr) -> Raw {
        Raw::from(server, "127.0.0.1").await
    }

    /// A raw client on a socket bound to `ip` (any loopback address).
    pub async fn from(server: SocketAddr, ip: &str) -> Raw {
        let socket = UdpSocket::bind((ip, 0)).await.unwrap();
        socket.connect(server).await.unwrap();
        Raw { socket, seq: 0 }
    }

    pub async fn send(&mut self, make: impl FnOnce(u64) -> Vec<u8>) {
        let d = make(self.seq);
        self.seq += 1;
        self.socket.send(&d).await.unwrap();
    }

    /// Every datagram that arrives within `wait`.
    pub async fn receive(&self, wait: Duration) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        let end = tokio::time::Instant::now() + wait;
        while let Ok(Ok(n)) = tokio::time::timeout_at(end, self.socket.recv(&mut buf)).await {
            out.push(buf[..n].to_vec());
        }
        out
    }

    /// Datagrams until `done` says the ones so far are enough, or `limit` passes.
    pub async fn receive_until(
        &self,
        limit: Duration,
        done: impl Fn(&[Vec<u8>]) -> bool,
    ) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        let end = tokio::time::Instant::now() + limit;
        while !done(&out) {
            match tokio::time::timeout_at(end, self.socket.recv(&mut buf)).await {
                Ok(Ok(n)) => out.push(buf[..n].to_vec()),
                _ => break,
            }
        }
        out
    }

    /// ClientHello, HelloVerifyRequest, ClientHello with the cookie: returns the server's
    /// flight 4 (ServerHello … ServerHelloDone).
    pub async fn start_handshake(&mut self) -> Vec<Vec<u8>> {
        self.send(|s| client_hello(0, s, 0, &[])).await;
        let hvr = self
            .receive_until(Duration::from_secs(5), |d| cookie(d).is_some())
            .await;
        let cookie = cookie(&hvr).expect("a HelloVerifyRequest");
        self.send(|s| client_hello(0, s, 1, &cookie)).await;
        self.receive_until(Duration::from_secs(5), |d| {
            records_of(d)
                .iter()
                .any(|(ct, _, f)| *ct == CT_HANDSHAKE && f.first() == Some(&14))
        })
        .await
    }
}

fn records_of(datagrams: &[Vec<u8>]) -> Vec<(u8, u16, Vec<u8>)> {
    datagrams
        .iter()
        .flat_map(|d| records(d).into_iter().map(|(c, e, f)| (c, e, f.to_vec())))
        .collect()
}

type HmacSha256 = Hmac<Sha256>;

/// TLS 1.2's PRF with SHA-256.
pub fn prf(secret: &[u8], label: &[u8], seed: &[u8], len: usize) -> Vec<u8> {
    let mac = |parts: &[&[u8]]| {
        let mut m = <HmacSha256 as Mac>::new_from_slice(secret).unwrap();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().to_vec()
    };
    let mut out = Vec::new();
    let mut a = mac(&[label, seed]);
    while out.len() < len {
        out.extend_from_slice(&mac(&[&a, label, seed]));
        a = mac(&[&a]);
    }
    out.truncate(len);
    out
}

/// One direction's AES-128-GCM record keys.
struct Keys {
    key: [u8; 16],
    iv: [u8; 4],
}

impl Keys {
    fn aad(epoch: u16, seq: u64, ct: u8, len: usize) -> Vec<u8> {
        let mut a = epoch.to_be_bytes().to_vec();
        a.extend_from_slice(&seq.to_be_bytes()[2..]);
        a.extend_from_slice(&[ct, 0xFE, 0xFD]);
        a.extend_from_slice(&(len as u16).to_be_bytes());
        a
    }

    fn seal(&self, ct: u8, epoch: u16, seq: u64, plain: &[u8]) -> Vec<u8> {
        let mut explicit = epoch.to_be_bytes().to_vec();
        explicit.extend_from_slice(&seq.to_be_bytes()[2..]);
        let mut nonce = self.iv.to_vec();
        nonce.extend_from_slice(&explicit);
        let sealed = Aes128Gcm::new(&self.key.into())
            .encrypt(
                nonce.as_slice().into(),
                Payload {
                    msg: plain,
                    aad: &Keys::aad(epoch, seq, ct, plain.len()),
                },
            )
            .unwrap();
        let mut body = explicit;
        body.extend_from_slice(&sealed);
        record(ct, epoch, seq, &body)
    }

    fn open(&self, raw: &[u8]) -> Option<(u8, Vec<u8>)> {
        let ct = raw[0];
        let epoch = u16::from_be_bytes([raw[3], raw[4]]);
        let mut seq = [0u8; 8];
        seq[2..].copy_from_slice(&raw[5..11]);
        let body = &raw[13..];
        if body.len() < 24 {
            return None;
        }
        let mut nonce = self.iv.to_vec();
        nonce.extend_from_slice(&body[..8]);
        let plain_len = body.len() - 24;
        Aes128Gcm::new(&self.key.into())
            .decrypt(
                nonce.as_slice().into(),
                Payload {
                    msg: &body[8..],
                    aad: &Keys::aad(epoch, u64::from_be_bytes(seq), ct, plain_len),
                },
            )
            .ok()
            .map(|p| (ct, p))
    }
}

/// How the client ends its handshake.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Finished {
    /// The verify_data RFC 5246 asks for.
    Correct,
    /// Twelve zero bytes.
    Zero,
}

/// An established (from the client's side) PSK session.
pub struct Session {
    pub raw: Raw,
    client: Keys,
    server: Keys,
    epoch1_seq: u64,
}

fn full_records(datagrams: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for d in datagrams {
        let mut rest = d.as_slice();
        while rest.len() >= 13 {
            let len = u16::from_be_bytes([rest[11], rest[12]]) as usize;
            if rest.len() < 13 + len {
                break;
            }
            out.push(rest[..13 + len].to_vec());
            rest = &rest[13 + len..];
        }
    }
    out
}

impl Session {
    /// A full PSK handshake as `identity` with `psk`, ending with `finished`. `Ok` once the
    /// server's Finished arrived and decrypts.
    pub async fn handshake(
        mut raw: Raw,
        identity: &str,
        psk: &[u8],
        finished: Finished,
    ) -> Result<Session, String> {
        let client_random: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37));
        raw.send(|s| handshake(0, s, 1, 0, &client_hello_body(&client_random, &[], 0)))
            .await;
        let hvr = raw
            .receive_until(Duration::from_secs(5), |d| cookie(d).is_some())
            .await;
        let cookie = cookie(&hvr).ok_or("no HelloVerifyRequest")?;
        let ch2 = message(1, 1, &client_hello_body(&client_random, &cookie, 0));
        raw.send(|s| record(CT_HANDSHAKE, 0, s, &ch2)).await;
        let flight4 = raw
            .receive_until(Duration::from_secs(5), |d| {
                records_of(d)
                    .iter()
                    .any(|(ct, _, f)| *ct == CT_HANDSHAKE && f.first() == Some(&14))
            })
            .await;
        // ServerHello, ServerKeyExchange (the PSK hint), ServerHelloDone, unfragmented.
        let mut server_msgs: Vec<Vec<u8>> = records_of(&flight4)
            .into_iter()
            .filter(|(ct, e, _)| *ct == CT_HANDSHAKE && *e == 0)
            .map(|(_, _, f)| f)
            .collect();
        server_msgs.sort_by_key(|m| u16::from_be_bytes([m[4], m[5]]));
        server_msgs.dedup();
        let sh = server_msgs
            .iter()
            .find(|m| m[0] == 2)
            .ok_or("no ServerHello")?;
        let server_random = sh[12 + 2..12 + 34].to_vec();
        let mut cke_body = (identity.len() as u16).to_be_bytes().to_vec();
        cke_body.extend_from_slice(identity.as_bytes());
        let cke = message(16, 2, &cke_body);
        let mut transcript = ch2.clone();
        for m in &server_msgs {
            transcript.extend_from_slice(m);
        }
        transcript.extend_from_slice(&cke);
        let n = psk.len() as u16;
        let mut premaster = n.to_be_bytes().to_vec();
        premaster.extend(std::iter::repeat_n(0u8, psk.len()));
        premaster.extend_from_slice(&n.to_be_bytes());
        premaster.extend_from_slice(psk);
        let hash = Sha256::digest(&transcript);
        let master = prf(&premaster, b"extended master secret", &hash, 48);
        let block = prf(
            &master,
            b"key expansion",
            &[server_random.as_slice(), &client_random].concat(),
            40,
        );
        let client = Keys {
            key: block[..16].try_into().unwrap(),
            iv: block[32..36].try_into().unwrap(),
        };
        let server = Keys {
            key: block[16..32].try_into().unwrap(),
            iv: block[36..40].try_into().unwrap(),
        };
        let verify_data = match finished {
            Finished::Correct => prf(&master, b"client finished", &hash, 12),
            Finished::Zero => vec![0u8; 12],
        };
        let fin = message(20, 3, &verify_data);
        let mut flight5 = record(CT_HANDSHAKE, 0, raw.seq, &cke);
        flight5.extend(record(CT_CCS, 0, raw.seq + 1, &[1]));
        flight5.extend(client.seal(CT_HANDSHAKE, 1, 0, &fin));
        raw.seq += 2;
        raw.socket.send(&flight5).await.unwrap();
        let flight6 = raw
            .receive_until(Duration::from_secs(5), |d| {
                full_records(d).iter().any(|r| r[3..5] == [0, 1])
            })
            .await;
        let server_finished = full_records(&flight6)
            .into_iter()
            .filter(|r| r[3..5] == [0, 1])
            .find_map(|r| server.open(&r))
            .ok_or("no server Finished")?;
        if server_finished.0 != CT_HANDSHAKE {
            return Err(format!("epoch 1 from the server: {server_finished:?}"));
        }
        Ok(Session {
            raw,
            client,
            server,
            epoch1_seq: 1,
        })
    }

    /// An application-data record of the session (the next sequence number).
    pub fn seal(&mut self, plain: &[u8]) -> Vec<u8> {
        let r = self.client.seal(CT_APP_DATA, 1, self.epoch1_seq, plain);
        self.epoch1_seq += 1;
        r
    }

    /// End the session with an encrypted close_notify.
    pub async fn close(&mut self) {
        let r = self.client.seal(CT_ALERT, 1, self.epoch1_seq, &[1, 0]);
        self.epoch1_seq += 1;
        self.raw.socket.send(&r).await.unwrap();
    }

    /// Send `plain` as application data.
    pub async fn send_app(&mut self, plain: &[u8]) {
        let r = self.seal(plain);
        self.raw.socket.send(&r).await.unwrap();
    }

    /// The application data that arrives until `done` says the plaintexts so far are enough,
    /// or `limit` passes.
    pub async fn recv_app_until(
        &self,
        limit: Duration,
        done: impl Fn(&[Vec<u8>]) -> bool,
    ) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut buf = vec![0u8; 65536];
        let end = tokio::time::Instant::now() + limit;
        while !done(&out) {
            match tokio::time::timeout_at(end, self.raw.socket.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    for r in full_records(&[buf[..n].to_vec()]) {
                        if r[0] == CT_APP_DATA {
                            if let Some((_, p)) = self.server.open(&r) {
                                out.push(p);
                            }
                        }
                    }
                }
                _ => break,
            }
        }
        out
    }

    /// The first alert the server sends within `limit`, decrypted: `[level, description]`.
    pub async fn recv_alert(&self, limit: Duration) -> Option<Vec<u8>> {
        self.first_opened(CT_ALERT, limit).await
    }

    /// The first record of `content_type` that arrives within `wait` and opens, decrypted.
    async fn first_opened(&self, content_type: u8, wait: Duration) -> Option<Vec<u8>> {
        let server = &self.server;
        let opens = |r: &Vec<u8>| r[0] == content_type && server.open(r).is_some();
        let got = self
            .raw
            .receive_until(wait, |d| full_records(d).iter().any(opens))
            .await;
        full_records(&got)
            .iter()
            .filter(|r| r[0] == content_type)
            .find_map(|r| server.open(r))
            .map(|(_, p)| p)
    }

    /// Send `plain` as application data; the application data that comes back within
    /// `wait`.
    pub async fn exchange(&mut self, plain: &[u8], wait: Duration) -> Option<Vec<u8>> {
        let r = self.seal(plain);
        self.raw.socket.send(&r).await.unwrap();
        self.first_opened(CT_APP_DATA, wait).await
    }
}

/// A confirmable CoAP GET of `path` with message id `mid`.
pub fn coap_get(path: &str, mid: u16) -> Vec<u8> {
    let mut p = coap_lite::Packet::new();
    p.header.set_type(coap_lite::MessageType::Confirmable);
    p.header.code = coap_lite::MessageClass::Request(coap_lite::RequestType::Get);
    p.header.message_id = mid;
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(coap_lite::CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    p.to_bytes().unwrap()
}
