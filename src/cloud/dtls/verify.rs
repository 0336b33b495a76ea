//! What webrtc-dtls leaves unchecked, checked here (sans-IO).
//!
//! - **The client's Finished.** webrtc-dtls's server never compares the client's verify_data
//!   (a Finished of twelve zero bytes completes its handshake). [`Transcript`] keeps the
//!   handshake messages both ways as they cross the peer's socket, and [`check_finished`]
//!   decrypts the client's Finished with keys derived from the master secret and compares its
//!   verify_data with `PRF(master_secret, "client finished", SHA-256(messages))` (RFC 5246
//!   §7.4.9, RFC 6347 §4.2.6), in constant time.
//! - **Records that do not decrypt.** For a PSK suite, webrtc-dtls answers a record that fails
//!   to decrypt with a fatal alert and ends the session, so one forged datagram from a client's
//!   address and port would end it (RFC 6347 §4.1.2.7 says: discard it). [`RecordKeys::opens`]
//!   lets the peer's socket drop such a record before the crate sees it.
//!
//! The master secret comes from `DTLSConn::connection_state().marshal_binary()`, the crate's
//! public session-export format; a good handshake that fails [`check_finished`] would mean that
//! format changed, and every test of a real client would fail with it.

use std::collections::BTreeMap;

use aes::Aes128;
use aes_gcm::Aes128Gcm;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use ccm::Ccm;
use ccm::consts::{U8, U12, U16};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::record::{
    CT_CHANGE_CIPHER_SPEC, CT_HANDSHAKE, Fragment, HS_CLIENT_HELLO, HS_FINISHED,
    HS_HELLO_VERIFY_REQUEST, HS_SERVER_HELLO, Record, fragments, records,
};

/// Largest handshake message kept (a client certificate chain fits easily).
const MAX_MESSAGE: u32 = 32 * 1024;
/// Handshake messages per direction: DTLS 1.2 needs at most seven.
const MAX_MESSAGES: u16 = 16;
/// Epoch-1 handshake records kept as candidates for the client's Finished (retransmissions).
const MAX_FINISHED_CANDIDATES: usize = 4;

/// One handshake message being put together from its fragments.
struct Message {
    msg_type: u8,
    body: Vec<u8>,
    /// Byte ranges received, merged, in order.
    have: Vec<(u32, u32)>,
}

impl Message {
    fn complete(&self) -> bool {
        match self.have.as_slice() {
            [] => self.body.is_empty(),
            [(0, end)] => *end as usize == self.body.len(),
            _ => false,
        }
    }

    fn add(&mut self, f: &Fragment) {
        let start = f.offset;
        let end = start.saturating_add(f.body.len() as u32);
        if end as usize > self.body.len() {
            return;
        }
        self.body[start as usize..end as usize].copy_from_slice(f.body);
        self.have.push((start, end));
        self.have.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.have.len());
        for (s, e) in self.have.drain(..) {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.have = merged;
    }

    /// The message as the handshake hash takes it: as if sent in one fragment.
    fn hashed(&self, seq: u16, out: &mut Vec<u8>) {
        let len = (self.body.len() as u32).to_be_bytes();
        out.push(self.msg_type);
        out.extend_from_slice(&len[1..]);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&len[1..]);
        out.extend_from_slice(&self.body);
    }
}

#[derive(Default)]
struct Messages(BTreeMap<u16, Message>);

impl Messages {
    fn add(&mut self, f: &Fragment) {
        if f.message_seq >= MAX_MESSAGES || f.length > MAX_MESSAGE {
            return;
        }
        let m = self.0.entry(f.message_seq).or_insert_with(|| Message {
            msg_type: f.msg_type,
            body: vec![0; f.length as usize],
            have: Vec::new(),
        });
        // A fragment that disagrees with the first one about the message is not this message.
        if m.msg_type == f.msg_type && m.body.len() == f.length as usize && !m.complete() {
            m.add(f);
        }
    }

    fn get(&self, seq: u16) -> Option<&Message> {
        self.0.get(&seq).filter(|m| m.complete())
    }
}

/// The handshake messages of one peer's handshake, both ways, and the client's encrypted
/// Finished.
#[derive(Default)]
pub struct Transcript {
    client: Messages,
    server: Messages,
    finished: Vec<Vec<u8>>,
}

impl Transcript {
    /// A datagram from the client, as the state machine receives it.
    pub fn from_client(&mut self, datagram: &[u8]) {
        for r in records(datagram).filter(|r| r.content_type == CT_HANDSHAKE) {
            if r.epoch == 0 {
                fragments(r.fragment).for_each(|f| self.client.add(&f));
            } else if r.epoch == 1 && self.finished.len() < MAX_FINISHED_CANDIDATES {
                self.finished.push(r.raw.to_vec());
            }
        }
    }

    /// A datagram the server sends.
    pub fn from_server(&mut self, datagram: &[u8]) {
        for r in records(datagram).filter(|r| r.content_type == CT_HANDSHAKE && r.epoch == 0) {
            fragments(r.fragment).for_each(|f| self.server.add(&f));
        }
    }

    /// The sequence number of the ClientHello the handshake went on from (after a cookie
    /// exchange, the second one: the first and the HelloVerifyRequest are not hashed).
    fn hello_seq(&self) -> Option<u16> {
        self.client
            .0
            .iter()
            .filter(|(_, m)| m.msg_type == HS_CLIENT_HELLO && m.complete())
            .map(|(seq, _)| *seq)
            .max()
    }

    /// The messages the client's Finished covers, concatenated; `None` if one is missing.
    fn covered(&self) -> Option<Vec<u8>> {
        let hello = self.hello_seq()?;
        let mut out = Vec::new();
        self.client.get(hello)?.hashed(hello, &mut out);
        let server: Vec<(&u16, &Message)> = self
            .server
            .0
            .iter()
            .filter(|(_, m)| m.msg_type != HS_HELLO_VERIFY_REQUEST)
            .collect();
        if server.is_empty() || server.iter().any(|(_, m)| !m.complete()) {
            return None;
        }
        for (seq, m) in server {
            m.hashed(*seq, &mut out);
        }
        for (seq, m) in self.client.0.range(hello + 1..) {
            if m.msg_type == HS_FINISHED {
                break;
            }
            if !m.complete() {
                return None;
            }
            m.hashed(*seq, &mut out);
        }
        Some(out)
    }

    fn random(m: &Message) -> Option<&[u8]> {
        m.body.get(2..34)
    }

    fn client_random(&self) -> Option<&[u8]> {
        Transcript::random(self.client.get(self.hello_seq()?)?)
    }

    /// The server's random and chosen cipher suite, from its ServerHello.
    fn server_hello(&self) -> Option<(&[u8], u16)> {
        let sh = self
            .server
            .0
            .values()
            .find(|m| m.msg_type == HS_SERVER_HELLO)?;
        if !sh.complete() {
            return None;
        }
        let random = Transcript::random(sh)?;
        let session_id = *sh.body.get(34)? as usize;
        let at = 35 + session_id;
        let suite = u16::from_be_bytes([*sh.body.get(at)?, *sh.body.get(at + 1)?]);
        Some((random, suite))
    }
}

/// Why a handshake is refused after webrtc-dtls finished it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FinishedError {
    #[error("the handshake messages could not all be read")]
    Incomplete,
    #[error("cipher suite {0:#06x} is not one lockbridge offers")]
    UnknownSuite(u16),
    #[error("the session's master secret could not be read (webrtc-dtls's export format changed?)")]
    NoMasterSecret,
    #[error("the client's Finished does not decrypt")]
    Undecryptable,
    #[error("the client's Finished does not verify")]
    Mismatch,
}

/// The record protection of a cipher suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aead {
    Gcm,
    Ccm,
    Ccm8,
}

impl Aead {
    fn of(suite: u16) -> Option<Aead> {
        match suite {
            // TLS_PSK_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            0x00A8 | 0xC02B => Some(Aead::Gcm),
            // TLS_PSK_WITH_AES_128_CCM, TLS_ECDHE_ECDSA_WITH_AES_128_CCM
            0xC0A4 | 0xC0AC => Some(Aead::Ccm),
            // TLS_PSK_WITH_AES_128_CCM_8, TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8
            0xC0A8 | 0xC0AE => Some(Aead::Ccm8),
            _ => None,
        }
    }

    fn tag(self) -> usize {
        match self {
            Aead::Gcm | Aead::Ccm => 16,
            Aead::Ccm8 => 8,
        }
    }
}

/// The client's record keys: what [`RecordKeys::opens`] checks epoch-1 records with.
pub struct RecordKeys {
    aead: Aead,
    key: Zeroizing<[u8; 16]>,
    iv: Zeroizing<[u8; 4]>,
}

/// Explicit nonce of an AEAD record (RFC 5288 §3, RFC 6655 §3).
const EXPLICIT_NONCE: usize = 8;

impl RecordKeys {
    /// The plaintext of an epoch-1 record from the client, if it decrypts.
    fn open(&self, r: &Record) -> Option<Vec<u8>> {
        let body = r.fragment;
        let tag = self.aead.tag();
        if body.len() < EXPLICIT_NONCE + tag {
            return None;
        }
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&*self.iv);
        nonce[4..].copy_from_slice(&body[..EXPLICIT_NONCE]);
        let plain_len = body.len() - EXPLICIT_NONCE - tag;
        // additional_data: seq_num (epoch ‖ sequence) ‖ type ‖ version ‖ length
        let mut aad = [0u8; 13];
        aad[..8].copy_from_slice(&r.header[3..11]);
        aad[8..11].copy_from_slice(&r.header[..3]);
        aad[11..].copy_from_slice(&(plain_len as u16).to_be_bytes());
        let mut buf = body[EXPLICIT_NONCE..].to_vec();
        let key = (*self.key).into();
        let nonce = nonce.into();
        let opened = match self.aead {
            Aead::Gcm => Aes128Gcm::new(&key).decrypt_in_place(&nonce, &aad, &mut buf),
            Aead::Ccm => {
                Ccm::<Aes128, U16, U12>::new(&key).decrypt_in_place(&nonce, &aad, &mut buf)
            }
            Aead::Ccm8 => {
                Ccm::<Aes128, U8, U12>::new(&key).decrypt_in_place(&nonce, &aad, &mut buf)
            }
        };
        opened.ok().map(|()| buf)
    }

    /// Whether an epoch-1 record from the client is genuine (its tag verifies). A
    /// ChangeCipherSpec is never encrypted and never valid after the handshake.
    pub fn opens(&self, r: &Record) -> bool {
        r.content_type != CT_CHANGE_CIPHER_SPEC && self.open(r).is_some()
    }
}

type HmacSha256 = Hmac<Sha256>;

/// TLS 1.2's PRF with SHA-256 (RFC 5246 §5).
fn prf(secret: &[u8], label: &[u8], seed: &[u8], len: usize) -> Zeroizing<Vec<u8>> {
    let mac = |parts: &[&[u8]]| {
        let mut m = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes()
    };
    let mut out = Zeroizing::new(Vec::with_capacity(len + 32));
    let mut a = mac(&[label, seed]);
    while out.len() < len {
        out.extend_from_slice(&mac(&[&a, label, seed]));
        a = mac(&[&a]);
    }
    out.truncate(len);
    out
}

/// The master secret from webrtc-dtls's exported connection state (bincode of its
/// `SerializedState`: two u16 epochs, two 32-byte randoms, the u16 suite, then the master
/// secret as a u64-length-prefixed byte string).
pub fn master_secret(exported: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    const AT: usize = 2 + 2 + 32 + 32 + 2;
    let len = u64::from_le_bytes(exported.get(AT..AT + 8)?.try_into().ok()?);
    if len != 48 {
        return None;
    }
    Some(Zeroizing::new(exported.get(AT + 8..AT + 8 + 48)?.to_vec()))
}

/// Check the client's Finished; on success, the client's record keys.
pub fn check_finished(master: &[u8], t: &Transcript) -> Result<RecordKeys, FinishedError> {
    let covered = t.covered().ok_or(FinishedError::Incomplete)?;
    let client_random = t.client_random().ok_or(FinishedError::Incomplete)?;
    let (server_random, suite) = t.server_hello().ok_or(FinishedError::Incomplete)?;
    let aead = Aead::of(suite).ok_or(FinishedError::UnknownSuite(suite))?;
    // key_block: client and server MAC keys (none for AEAD), client key, server key, client IV…
    let seed = [server_random, client_random].concat();
    let block = prf(master, b"key expansion", &seed, 16 + 16 + 4 + 4);
    let keys = RecordKeys {
        aead,
        key: Zeroizing::new(block[..16].try_into().expect("16 bytes")),
        iv: Zeroizing::new(block[32..36].try_into().expect("4 bytes")),
    };
    let expected = prf(master, b"client finished", &Sha256::digest(&covered), 12);
    let mut decrypted = false;
    for raw in &t.finished {
        let Some(r) = records(raw).next() else {
            continue;
        };
        let Some(plain) = keys.open(&r) else { continue };
        decrypted = true;
        let verifies = fragments(&plain).next().is_some_and(|f| {
            f.msg_type == HS_FINISHED
                && f.offset == 0
                && f.length == 12
                && bool::from(f.body.ct_eq(&expected))
        });
        if verifies {
            return Ok(keys);
        }
    }
    Err(if decrypted {
        FinishedError::Mismatch
    } else {
        FinishedError::Undecryptable
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 5246's PRF with SHA-256: the test vector published with it on the IETF TLS list
    // (secret 9bbe436ba940f017b17652849a71db35, label "test label").
    #[test]
    fn prf_matches_the_published_sha256_vector() {
        let secret = hex::decode("9bbe436ba940f017b17652849a71db35").unwrap();
        let seed = hex::decode("a0ba9f936cda311827a6f796ffd5198c").unwrap();
        let out = prf(&secret, b"test label", &seed, 100);
        assert_eq!(
            hex::encode(&out[..]),
            "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff70187347b66"
        );
    }

    #[test]
    fn a_master_secret_is_read_from_the_export_only_when_well_formed() {
        let mut exported = vec![0u8; 70];
        exported.extend_from_slice(&48u64.to_le_bytes());
        exported.extend_from_slice(&[7u8; 48]);
        exported.extend_from_slice(&[1, 2, 3]);
        assert_eq!(master_secret(&exported).unwrap().as_slice(), &[7u8; 48]);
        assert!(master_secret(&exported[..100]).is_none());
        exported[70] = 47;
        assert!(master_secret(&exported).is_none());
    }

    #[test]
    fn messages_are_reassembled_from_fragments_in_any_order() {
        use super::super::record::tests::{handshake, record};
        let body: Vec<u8> = (0..100u8).collect();
        let mut t = Transcript::default();
        let parts = [(60u32, 40usize), (0, 30), (20, 50)];
        for (offset, len) in parts {
            let f = handshake(
                11,
                2,
                offset,
                100,
                &body[offset as usize..offset as usize + len],
            );
            t.from_client(&record(CT_HANDSHAKE, 0, 0, &f));
        }
        let m = t.client.get(2).expect("complete");
        assert_eq!(m.body, body);
        // Out of range, oversized and disagreeing fragments are ignored, never a panic.
        for f in [
            handshake(11, 3, 90, 100, &[1; 20]),
            handshake(11, 4, 0, MAX_MESSAGE + 1, &[1; 4]),
            handshake(12, 2, 0, 100, &[0; 100]),
            handshake(11, MAX_MESSAGES, 0, 4, &[1; 4]),
        ] {
            t.from_client(&record(CT_HANDSHAKE, 0, 0, &f));
        }
        assert!(t.client.get(3).is_none() && t.client.get(4).is_none());
        assert_eq!(t.client.get(2).unwrap().body, body);
        assert!(t.client.0.len() <= MAX_MESSAGES as usize);
    }
}
