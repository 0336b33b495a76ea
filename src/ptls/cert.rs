//! The access certificate of spec §8 (this project's format; real Tedee certificates are opaque
//! to the client, which never parses CERT). The lock side parses and checks it.
//!
//! TLV list, 1-byte tag and 1-byte length, in this order:
//! `01` version · `02` device id (u32) · `03` not-before (u64 ms) · `04` not-after (u64 ms) ·
//! `05` permissions (u32) · `06` client id (16) · `7E` client public key (65) · `7F` signature.

use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{DerSignature, Signature, SigningKey, VerifyingKey};

use super::wire::{POINT_LEN, Reader, decode_point, encode_point};

const TAG_VERSION: u8 = 0x01;
const TAG_DEVICE_ID: u8 = 0x02;
const TAG_NOT_BEFORE: u8 = 0x03;
const TAG_NOT_AFTER: u8 = 0x04;
const TAG_PERMISSIONS: u8 = 0x05;
const TAG_CLIENT_ID: u8 = 0x06;
const TAG_CLIENT_KEY: u8 = 0x7E;
const TAG_SIGNATURE: u8 = 0x7F;
const CERT_VERSION: u8 = 0x01;

/// Permission bits (spec §8).
pub const PERM_LOCK_UNLOCK: u32 = 1 << 0;
pub const PERM_PULL_SPRING: u32 = 1 << 1;
pub const PERM_READ: u32 = 1 << 2;
pub const PERM_ALL: u32 = PERM_LOCK_UNLOCK | PERM_PULL_SPRING | PERM_READ;

/// Certificates are valid for 10 days by default (spec §8).
pub const DEFAULT_VALIDITY_DAYS: u64 = 10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessCertificate {
    pub device_id: u32,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    pub permissions: u32,
    pub client_id: [u8; 16],
    pub client_public_key: [u8; POINT_LEN],
}

/// Why a lock refuses a certificate (answered with ALERT 0x05).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate TLV is malformed")]
    Malformed,
    #[error("certificate signature does not verify under the authority key")]
    BadSignature,
    #[error("certificate is for device {cert}, this lock is {lock}")]
    WrongDevice { cert: u32, lock: u32 },
    #[error("certificate is not valid at {now_ms} (valid {not_before_ms}..{not_after_ms})")]
    OutsideValidity {
        now_ms: u64,
        not_before_ms: u64,
        not_after_ms: u64,
    },
}

/// Proof that a certificate was checked: only [`AccessCertificate::verify`] makes one.
#[derive(Clone, Debug)]
pub struct VerifiedCertificate {
    cert: AccessCertificate,
    client_key: VerifyingKey,
}

impl VerifiedCertificate {
    pub fn certificate(&self) -> &AccessCertificate {
        &self.cert
    }

    pub fn client_key(&self) -> &VerifyingKey {
        &self.client_key
    }
}

impl AccessCertificate {
    fn encode_unsigned(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(200);
        tlv(&mut out, TAG_VERSION, &[CERT_VERSION]);
        tlv(&mut out, TAG_DEVICE_ID, &self.device_id.to_be_bytes());
        tlv(&mut out, TAG_NOT_BEFORE, &self.not_before_ms.to_be_bytes());
        tlv(&mut out, TAG_NOT_AFTER, &self.not_after_ms.to_be_bytes());
        tlv(&mut out, TAG_PERMISSIONS, &self.permissions.to_be_bytes());
        tlv(&mut out, TAG_CLIENT_ID, &self.client_id);
        tlv(&mut out, TAG_CLIENT_KEY, &self.client_public_key);
        out
    }

    /// The certificate bytes, signed by the authority.
    pub fn sign(&self, authority: &SigningKey) -> Vec<u8> {
        let mut out = self.encode_unsigned();
        let sig: Signature = authority.sign(&out);
        let der: DerSignature = sig.to_der();
        tlv(&mut out, TAG_SIGNATURE, der.as_bytes());
        out
    }

    /// Parse and check everything the lock checks (spec §8).
    pub fn verify(
        bytes: &[u8],
        authority: &VerifyingKey,
        device_id: u32,
        now_ms: u64,
    ) -> Result<VerifiedCertificate, CertError> {
        let (cert, signed_len, sig) = Self::parse(bytes)?;
        let sig = Signature::from_der(sig).map_err(|_| CertError::BadSignature)?;
        authority
            .verify(&bytes[..signed_len], &sig)
            .map_err(|_| CertError::BadSignature)?;
        if cert.device_id != device_id {
            return Err(CertError::WrongDevice {
                cert: cert.device_id,
                lock: device_id,
            });
        }
        if now_ms < cert.not_before_ms || now_ms > cert.not_after_ms {
            return Err(CertError::OutsideValidity {
                now_ms,
                not_before_ms: cert.not_before_ms,
                not_after_ms: cert.not_after_ms,
            });
        }
        let client_key = decode_point(&cert.client_public_key)
            .map(VerifyingKey::from)
            .map_err(|_| CertError::Malformed)?;
        Ok(VerifiedCertificate { cert, client_key })
    }

    /// Parse without checking the signature: returns the fields, the length of the signed part
    /// and the DER signature.
    pub fn parse(bytes: &[u8]) -> Result<(AccessCertificate, usize, &[u8]), CertError> {
        let mut r = Reader::new(bytes, "certificate");
        let m = |_| CertError::Malformed;
        let version = field(&mut r, TAG_VERSION)?;
        if version != [CERT_VERSION] {
            return Err(CertError::Malformed);
        }
        let device_id = u32::from_be_bytes(field(&mut r, TAG_DEVICE_ID)?.try_into().map_err(m)?);
        let not_before_ms =
            u64::from_be_bytes(field(&mut r, TAG_NOT_BEFORE)?.try_into().map_err(m)?);
        let not_after_ms = u64::from_be_bytes(field(&mut r, TAG_NOT_AFTER)?.try_into().map_err(m)?);
        let permissions =
            u32::from_be_bytes(field(&mut r, TAG_PERMISSIONS)?.try_into().map_err(m)?);
        let client_id = field(&mut r, TAG_CLIENT_ID)?.try_into().map_err(m)?;
        let client_public_key = field(&mut r, TAG_CLIENT_KEY)?.try_into().map_err(m)?;
        let signed_len = bytes.len() - r.remaining();
        let sig = field(&mut r, TAG_SIGNATURE)?;
        r.finish().map_err(|_| CertError::Malformed)?;
        Ok((
            AccessCertificate {
                device_id,
                not_before_ms,
                not_after_ms,
                permissions,
                client_id,
                client_public_key,
            },
            signed_len,
            sig,
        ))
    }

    pub fn client_key_point(key: &VerifyingKey) -> [u8; POINT_LEN] {
        encode_point(&p256::PublicKey::from(key))
    }
}

fn tlv(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    // Every field of this format is at most 72 bytes.
    out.push(u8::try_from(value.len()).expect("certificate fields are short"));
    out.extend_from_slice(value);
}

fn field<'a>(r: &mut Reader<'a>, tag: u8) -> Result<&'a [u8], CertError> {
    let got = r.u8().map_err(|_| CertError::Malformed)?;
    if got != tag {
        return Err(CertError::Malformed);
    }
    let len = r.u8().map_err(|_| CertError::Malformed)?;
    r.take(len as usize).map_err(|_| CertError::Malformed)
}

/// Parse a permission list such as `lock,pull,read` into the bitmask.
pub fn parse_permissions(list: &str) -> Result<u32, String> {
    let mut bits = 0;
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        bits |= match word {
            "lock" | "unlock" => PERM_LOCK_UNLOCK,
            "pull" => PERM_PULL_SPRING,
            "read" => PERM_READ,
            other => {
                return Err(format!(
                    "unknown permission {other:?}; use lock, pull and read"
                ));
            }
        };
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32].into()).unwrap()
    }

    fn cert() -> AccessCertificate {
        AccessCertificate {
            device_id: 42,
            not_before_ms: 1_000,
            not_after_ms: 2_000,
            permissions: PERM_ALL,
            client_id: [5; 16],
            client_public_key: AccessCertificate::client_key_point(key(3).verifying_key()),
        }
    }

    #[test]
    fn signed_certificate_verifies_and_checks_fail_specifically() {
        let auth = key(1);
        let bytes = cert().sign(&auth);
        let ok = AccessCertificate::verify(&bytes, auth.verifying_key(), 42, 1_500).unwrap();
        assert_eq!(ok.certificate(), &cert());
        assert_eq!(
            AccessCertificate::verify(&bytes, auth.verifying_key(), 43, 1_500).unwrap_err(),
            CertError::WrongDevice { cert: 42, lock: 43 }
        );
        assert!(matches!(
            AccessCertificate::verify(&bytes, auth.verifying_key(), 42, 2_001),
            Err(CertError::OutsideValidity { .. })
        ));
        assert_eq!(
            AccessCertificate::verify(&bytes, key(2).verifying_key(), 42, 1_500).unwrap_err(),
            CertError::BadSignature
        );
        let mut tampered = bytes.clone();
        tampered[7] ^= 1; // a byte of the device id value
        assert_eq!(
            AccessCertificate::verify(&tampered, auth.verifying_key(), 42, 1_500).unwrap_err(),
            CertError::BadSignature
        );
        assert_eq!(
            AccessCertificate::verify(&bytes[..20], auth.verifying_key(), 42, 1_500).unwrap_err(),
            CertError::Malformed
        );
    }

    #[test]
    fn permissions_parse() {
        assert_eq!(parse_permissions("lock,pull,read").unwrap(), PERM_ALL);
        assert_eq!(parse_permissions("read").unwrap(), PERM_READ);
        assert!(parse_permissions("fly").is_err());
    }
}
