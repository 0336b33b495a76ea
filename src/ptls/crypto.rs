//! Key schedule and record protection (spec §4).
//!
//! ```text
//! derive(label, h): m = HMAC-SHA256(key = Z, msg = label ‖ h); key = m[0..16], iv = m[16..28]
//! nonce(n)        : iv with iv[10] ^= n >> 8, iv[11] ^= n & 0xFF
//! ```
//! Records are AES-128-GCM with no associated data and the tag appended. Every secret here is
//! zeroized when dropped.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use hmac::{Hmac, Mac};
use p256::{PublicKey, SecretKey};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub const LABEL_CLIENT_HS: &[u8; 16] = b"ptlsc hs traffic";
pub const LABEL_SERVER_HS: &[u8; 16] = b"ptlss hs traffic";
pub const LABEL_CLIENT_AP: &[u8; 16] = b"ptlsc ap traffic";
pub const LABEL_SERVER_AP: &[u8; 16] = b"ptlss ap traffic";

/// Largest counter value: at 0xFFFF records in one direction the session must end (spec §4).
pub const MAX_RECORDS: u32 = 0xFFFF;

/// The ECDH shared secret `Z`: the raw X coordinate, no KDF (spec §3.2).
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SharedSecret([u8; 32]);

impl SharedSecret {
    pub fn new(ephemeral: &SecretKey, peer: &PublicKey) -> SharedSecret {
        let shared = p256::ecdh::diffie_hellman(ephemeral.to_nonzero_scalar(), peer.as_affine());
        let mut z = [0u8; 32];
        z.copy_from_slice(shared.raw_secret_bytes());
        SharedSecret(z)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// One direction's key and base IV.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct TrafficSecret {
    pub key: [u8; 16],
    pub base_iv: [u8; 12],
}

impl TrafficSecret {
    pub fn derive(z: &SharedSecret, label: &[u8; 16], hash: &[u8; 32]) -> TrafficSecret {
        // HMAC accepts keys of any length; a 32-byte key cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(z.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(label);
        mac.update(hash);
        let m = Zeroizing::new(mac.finalize().into_bytes());
        let mut key = [0u8; 16];
        let mut base_iv = [0u8; 12];
        key.copy_from_slice(&m[0..16]);
        base_iv.copy_from_slice(&m[16..28]);
        TrafficSecret { key, base_iv }
    }
}

pub fn nonce(base_iv: &[u8; 12], counter: u16) -> [u8; 12] {
    let mut iv = *base_iv;
    iv[10] ^= (counter >> 8) as u8;
    iv[11] ^= (counter & 0xFF) as u8;
    iv
}

/// A record opened with the wrong key, counter or a damaged tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("record does not authenticate")]
pub struct BadTag;

/// One direction of record protection with its counter.
pub struct RecordKey {
    cipher: Aes128Gcm,
    base_iv: [u8; 12],
    counter: u32,
}

impl Drop for RecordKey {
    fn drop(&mut self) {
        self.base_iv.zeroize();
    }
}

impl RecordKey {
    pub fn new(secret: &TrafficSecret) -> RecordKey {
        RecordKey {
            cipher: Aes128Gcm::new((&secret.key).into()),
            base_iv: secret.base_iv,
            counter: 0,
        }
    }

    /// Records processed so far in this direction: the next counter value.
    pub fn counter(&self) -> u32 {
        self.counter
    }

    /// `None` once the counter space is used up; the session must end then.
    pub fn seal(&mut self, plaintext: &[u8]) -> Option<Vec<u8>> {
        let n = u16::try_from(self.counter)
            .ok()
            .filter(|&n| u32::from(n) < MAX_RECORDS)?;
        let nonce = nonce(&self.base_iv, n);
        // AES-GCM sealing only fails for inputs above 64 GiB.
        let out = self
            .cipher
            .encrypt(&Nonce::from(nonce), plaintext)
            .expect("AES-GCM seals any frame-sized input");
        self.counter += 1;
        Some(out)
    }

    /// Opens with the current counter and advances it only on success.
    pub fn open(&mut self, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, BadTag> {
        let n = u16::try_from(self.counter)
            .ok()
            .filter(|&n| u32::from(n) < MAX_RECORDS)
            .ok_or(BadTag)?;
        let nonce = nonce(&self.base_iv, n);
        let plain = self
            .cipher
            .decrypt(&Nonce::from(nonce), ciphertext)
            .map_err(|_| BadTag)?;
        self.counter += 1;
        Ok(Zeroizing::new(plain))
    }
}

/// Handshake messages are each sealed once, with counter 0 (spec §4).
pub fn seal_handshake(secret: &TrafficSecret, plaintext: &[u8]) -> Vec<u8> {
    RecordKey::new(secret)
        .seal(plaintext)
        .expect("a fresh key has counter 0")
}

pub fn open_handshake(
    secret: &TrafficSecret,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, BadTag> {
    RecordKey::new(secret).open(ciphertext)
}

/// A running SHA-256 over the handshake transcript (plaintexts only).
#[derive(Clone, Default)]
pub struct Transcript(Sha256);

impl Transcript {
    pub fn add(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn hash(&self) -> [u8; 32] {
        self.0.clone().finalize().into()
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_xors_counter_into_last_two_bytes() {
        let iv = [0xAA; 12];
        let n = nonce(&iv, 0x0102);
        assert_eq!(&n[..10], &[0xAA; 10]);
        assert_eq!(n[10], 0xAA ^ 0x01);
        assert_eq!(n[11], 0xAA ^ 0x02);
    }

    #[test]
    fn counters_advance_only_on_success() {
        let secret = TrafficSecret {
            key: [7; 16],
            base_iv: [9; 12],
        };
        let mut tx = RecordKey::new(&secret);
        let mut rx = RecordKey::new(&secret);
        let a = tx.seal(b"one").unwrap();
        let b = tx.seal(b"two").unwrap();
        // Skipping a record fails and leaves the counter where it was.
        assert_eq!(rx.open(&b), Err(BadTag));
        assert_eq!(rx.counter(), 0);
        assert_eq!(&rx.open(&a).unwrap()[..], b"one");
        // A replay fails.
        assert_eq!(rx.open(&a), Err(BadTag));
        assert_eq!(&rx.open(&b).unwrap()[..], b"two");
    }

    #[test]
    fn sealing_stops_at_counter_exhaustion() {
        let secret = TrafficSecret {
            key: [1; 16],
            base_iv: [2; 12],
        };
        let mut tx = RecordKey::new(&secret);
        tx.counter = MAX_RECORDS - 1;
        assert!(tx.seal(b"x").is_some());
        assert!(tx.seal(b"x").is_none());
    }
}
