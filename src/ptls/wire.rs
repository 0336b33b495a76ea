//! Frames and handshake messages on the wire (spec §1–3), as plain encode/parse functions.
//!
//! Parsing follows one rule: short input, trailing bytes and wrong fixed fields are errors,
//! never panics. Every parser takes `&[u8]` from the peer and returns [`Malformed`] on trouble.

use p256::PublicKey;

/// Frame headers (spec §2). Receivers look only at the low nibble.
pub const HDR_DATA_NOT_ENCRYPTED: u8 = 0x00;
pub const HDR_DATA_ENCRYPTED: u8 = 0x01;
pub const HDR_HELLO: u8 = 0x03;
pub const HDR_ALERT: u8 = 0x04;
pub const HDR_SERVER_VERIFY: u8 = 0x05;
pub const HDR_CLIENT_VERIFY_I: u8 = 0x06;
pub const HDR_CLIENT_VERIFY_II: u8 = 0x07;
pub const HDR_INITIALIZED: u8 = 0x08;

pub const PTLS_VERSION: u8 = 0x02;
pub const CLIENT_HELLO_LEN: usize = 152;
pub const SERVER_HELLO_LEN: usize = 100;
pub const POINT_LEN: usize = 65;
pub const HASH_LEN: usize = 32;
pub const AUTH_LEN: usize = 8;
pub const TAG_LEN: usize = 16;
/// Smallest ATT MTU that lets hello and server-verify each fit one value (spec §1 decision).
pub const MIN_ATT_MTU: u16 = 156;
/// Largest client-verify blob the lock reassembles (spec §2 decision).
pub const REASSEMBLY_LIMIT: usize = 1024;

/// The four characteristics of the lock service (spec §1), with their sim-socket short numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// lock → client, notify.
    Notifications,
    /// lock → client, notify: handshake frames and alerts from the lock.
    PtlsTx,
    /// client → lock, write: handshake frames and alerts from the client.
    PtlsRx,
    /// client writes commands; lock answers by indication.
    ApiCommands,
}

impl Channel {
    pub const ALL: [Channel; 4] = [
        Channel::Notifications,
        Channel::PtlsTx,
        Channel::PtlsRx,
        Channel::ApiCommands,
    ];

    /// The short number used by the sim socket (design §4.1).
    pub fn short(self) -> u8 {
        match self {
            Channel::Notifications => 1,
            Channel::PtlsTx => 3,
            Channel::PtlsRx => 4,
            Channel::ApiCommands => 5,
        }
    }

    pub fn from_short(n: u8) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.short() == n)
    }

    pub fn uuid(self) -> &'static str {
        match self {
            Channel::Notifications => crate::ptls::gatt::NOTIFICATIONS_UUID,
            Channel::PtlsTx => crate::ptls::gatt::PTLS_TX_UUID,
            Channel::PtlsRx => crate::ptls::gatt::PTLS_RX_UUID,
            Channel::ApiCommands => crate::ptls::gatt::API_COMMANDS_UUID,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Channel::Notifications => "NOTIFICATIONS",
            Channel::PtlsTx => "PTLS_TX",
            Channel::PtlsRx => "PTLS_RX",
            Channel::ApiCommands => "API_COMMANDS",
        }
    }
}

/// Bytes from the peer that do not form the message they claim to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}")]
pub struct Malformed {
    pub what: &'static str,
}

pub(crate) fn malformed(what: &'static str) -> Malformed {
    Malformed { what }
}

/// A checked cursor over untrusted bytes.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(malformed(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A `u16` length followed by that many bytes.
    pub fn vec16(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn finish(self) -> Result<(), Malformed> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(self.what))
        }
    }
}

pub(crate) fn put_vec16(out: &mut Vec<u8>, bytes: &[u8]) {
    // Callers only pass certificates, DER signatures and hashes, all far below 64 KiB.
    let len = u16::try_from(bytes.len()).expect("vec16 fields are below 64 KiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Split a frame into its header (low nibble only, spec §2) and body.
pub fn split_frame(frame: &[u8]) -> Result<(u8, &[u8]), Malformed> {
    match frame.split_first() {
        Some((h, body)) => Ok((h & 0x0F, body)),
        None => Err(malformed("empty frame")),
    }
}

pub fn frame(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + body.len());
    out.push(header);
    out.extend_from_slice(body);
    out
}

/// Uncompressed SEC1 encoding `04‖X‖Y` of a P-256 public key.
pub fn encode_point(key: &PublicKey) -> [u8; POINT_LEN] {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let point = key.to_encoded_point(false);
    let mut out = [0u8; POINT_LEN];
    out.copy_from_slice(point.as_bytes());
    out
}

pub fn decode_point(bytes: &[u8]) -> Result<PublicKey, Malformed> {
    if bytes.len() != POINT_LEN || bytes[0] != 0x04 {
        return Err(malformed("public key"));
    }
    PublicKey::from_sec1_bytes(bytes).map_err(|_| malformed("public key"))
}

/// Client hello (spec §3.1): 152 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    pub mtu: u8,
    pub random: [u8; 32],
    pub public: [u8; POINT_LEN],
}

impl ClientHello {
    pub fn encode(&self) -> [u8; CLIENT_HELLO_LEN] {
        let mut out = [0u8; CLIENT_HELLO_LEN];
        out[0] = PTLS_VERSION;
        out[1] = self.mtu;
        out[2] = 0;
        out[3..35].copy_from_slice(&self.random);
        out[35..100].copy_from_slice(&self.public);
        // 100..152: resumption cache, all zero.
        out
    }

    /// Parse; `Ok(Err(version))` is a well-formed hello of another version.
    pub fn parse(body: &[u8]) -> Result<Result<ClientHello, u8>, Malformed> {
        if body.len() != CLIENT_HELLO_LEN {
            return Err(malformed("client hello"));
        }
        if body[0] != PTLS_VERSION {
            return Ok(Err(body[0]));
        }
        let mut r = Reader::new(&body[1..], "client hello");
        let mtu = r.u8()?;
        let _reserved = r.u8()?;
        let random = r.array()?;
        let public = r.array()?;
        // The resumption cache is ignored: resumption is not used (spec §3.1).
        Ok(Ok(ClientHello {
            mtu,
            random,
            public,
        }))
    }
}

/// Server hello (spec §3.2): 100 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerHello {
    pub mtu: u8,
    pub random: [u8; 32],
    pub public: [u8; POINT_LEN],
}

impl ServerHello {
    pub fn encode(&self) -> [u8; SERVER_HELLO_LEN] {
        let mut out = [0u8; SERVER_HELLO_LEN];
        out[0] = PTLS_VERSION;
        out[1] = self.mtu;
        out[3..35].copy_from_slice(&self.random);
        out[35..100].copy_from_slice(&self.public);
        out
    }

    pub fn parse(body: &[u8]) -> Result<ServerHello, Malformed> {
        let mut r = Reader::new(body, "server hello");
        if r.u8()? != PTLS_VERSION {
            return Err(malformed("server hello version"));
        }
        let mtu = r.u8()?;
        let _reserved = r.u8()?;
        let random = r.array()?;
        let public = r.array()?;
        r.finish()?;
        Ok(ServerHello {
            mtu,
            random,
            public,
        })
    }
}

/// Server-verify plaintext (spec §3.4): `u16(8) ‖ AUTH ‖ u16(len) ‖ SIG_S ‖ u16(32) ‖ hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerVerify {
    pub auth: [u8; AUTH_LEN],
    pub signature: Vec<u8>,
    /// Kept as received: its length is checked by the client, not by the parser.
    pub hash: Vec<u8>,
}

impl ServerVerify {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + AUTH_LEN + self.signature.len() + self.hash.len());
        put_vec16(&mut out, &self.auth);
        put_vec16(&mut out, &self.signature);
        put_vec16(&mut out, &self.hash);
        out
    }

    pub fn parse(plain: &[u8]) -> Result<ServerVerify, Malformed> {
        let mut r = Reader::new(plain, "server verify");
        let auth = r.vec16()?;
        let auth: [u8; AUTH_LEN] = auth.try_into().map_err(|_| malformed("server verify"))?;
        let signature = r.vec16()?.to_vec();
        let hash = r.vec16()?.to_vec();
        r.finish()?;
        Ok(ServerVerify {
            auth,
            signature,
            hash,
        })
    }
}

/// The bytes SIG_S signs: `CH ‖ SH ‖ u16(8) ‖ AUTH` (spec §3.4).
pub fn server_signed_bytes(ch: &[u8], sh: &[u8], auth: &[u8; AUTH_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ch.len() + sh.len() + 2 + AUTH_LEN);
    out.extend_from_slice(ch);
    out.extend_from_slice(sh);
    put_vec16(&mut out, auth);
    out
}

/// Client-verify plaintext (spec §3.5): `u16(n) ‖ CERT ‖ u16(len) ‖ SIG_C ‖ u16(32) ‖ hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientVerify {
    pub certificate: Vec<u8>,
    pub signature: Vec<u8>,
    pub hash: Vec<u8>,
}

impl ClientVerify {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.certificate.len() + self.signature.len() + 32);
        put_vec16(&mut out, &self.certificate);
        put_vec16(&mut out, &self.signature);
        put_vec16(&mut out, &self.hash);
        out
    }

    pub fn parse(plain: &[u8]) -> Result<ClientVerify, Malformed> {
        let mut r = Reader::new(plain, "client verify");
        let certificate = r.vec16()?.to_vec();
        let signature = r.vec16()?.to_vec();
        let hash = r.vec16()?.to_vec();
        r.finish()?;
        Ok(ClientVerify {
            certificate,
            signature,
            hash,
        })
    }
}

/// The bytes SIG_C signs: `CH ‖ SH ‖ SV ‖ u16(n) ‖ CERT` (spec §3.5).
pub fn client_signed_bytes(ch: &[u8], sh: &[u8], sv: &[u8], cert: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ch.len() + sh.len() + sv.len() + 2 + cert.len());
    out.extend_from_slice(ch);
    out.extend_from_slice(sh);
    out.extend_from_slice(sv);
    put_vec16(&mut out, cert);
    out
}

/// Cut a client-verify blob into PTLS_RX frames of at most `server_mtu` bytes each (spec §2):
/// `0x06 ‖ piece` for all but the last, `0x07 ‖ piece` for the last. Always at least one 0x06
/// and a non-empty 0x07 (spec decision).
pub fn fragment_client_verify(blob: &[u8], server_mtu: usize) -> Vec<Vec<u8>> {
    let piece = server_mtu.saturating_sub(1).max(1);
    let mut pieces: Vec<&[u8]> = blob.chunks(piece).collect();
    if pieces.len() < 2 {
        let (a, b) = blob.split_at(blob.len() / 2);
        pieces = vec![a, b];
    }
    let last = pieces.len() - 1;
    pieces
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let header = if i == last {
                HDR_CLIENT_VERIFY_II
            } else {
                HDR_CLIENT_VERIFY_I
            };
            frame(header, p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_upper_nibble_is_ignored() {
        assert_eq!(
            split_frame(&[0xF3, 1, 2]).unwrap(),
            (HDR_HELLO, &[1u8, 2][..])
        );
        assert!(split_frame(&[]).is_err());
    }

    #[test]
    fn client_verify_fragments_cover_blob_in_order() {
        let blob: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
        let frames = fragment_client_verify(&blob, 244);
        assert_eq!(frames.len(), 3);
        assert!(frames.iter().all(|f| f.len() <= 244));
        assert_eq!(frames[0][0], HDR_CLIENT_VERIFY_I);
        assert_eq!(frames[1][0], HDR_CLIENT_VERIFY_I);
        assert_eq!(frames[2][0], HDR_CLIENT_VERIFY_II);
        let joined: Vec<u8> = frames.iter().flat_map(|f| f[1..].to_vec()).collect();
        assert_eq!(joined, blob);
    }

    #[test]
    fn small_blob_still_has_first_and_last_fragment() {
        let frames = fragment_client_verify(&[1, 2, 3], 244);
        assert_eq!(frames, vec![vec![0x06, 1], vec![0x07, 2, 3]]);
    }

    #[test]
    fn reader_rejects_short_and_trailing() {
        assert!(ServerVerify::parse(&[0, 8, 1]).is_err());
        let sv = ServerVerify {
            auth: [1; 8],
            signature: vec![2; 70],
            hash: vec![3; 32],
        };
        let mut bytes = sv.encode();
        assert_eq!(ServerVerify::parse(&bytes).unwrap(), sv);
        bytes.push(0);
        assert!(ServerVerify::parse(&bytes).is_err());
    }
}
