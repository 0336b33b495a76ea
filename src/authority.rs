//! This project's certificate and time authority (design §5): it issues the access
//! certificates of spec §8 and signs time for locks that lost their clock (spec §7).
//!
//! On disk: `DIR/authority.key` (PEM, 0600) and `DIR/authority.pub` (base64 point).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

use crate::keys::{self, KeyError};
use crate::ptls::api::SignedTime;
use crate::ptls::cert::AccessCertificate;
use crate::ptls::crypto::sha256;

pub const KEY_FILE: &str = "authority.key";
pub const PUBLIC_FILE: &str = "authority.pub";

pub struct Authority {
    key: SigningKey,
}

/// What `authority issue` certifies.
pub struct IssueRequest {
    pub device_id: u32,
    pub client_public_key: VerifyingKey,
    /// Defaults to the first 16 bytes of SHA-256 of the client's public point.
    pub client_id: Option<[u8; 16]>,
    pub days: u64,
    pub permissions: u32,
    pub now_ms: u64,
}

impl Authority {
    /// Create a new authority in `dir` (created with mode 0700 if missing).
    pub fn init(dir: &Path) -> Result<Authority, KeyError> {
        let io = |source| KeyError::Io {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        let key = keys::generate(&dir.join(KEY_FILE))?;
        let public = dir.join(PUBLIC_FILE);
        fs::write(
            &public,
            format!("{}\n", keys::public_b64(key.verifying_key())),
        )
        .map_err(|source| KeyError::Io {
            path: public.clone(),
            source,
        })?;
        Ok(Authority { key })
    }

    pub fn load(dir: &Path) -> Result<Authority, KeyError> {
        Ok(Authority {
            key: keys::load(&dir.join(KEY_FILE))?,
        })
    }

    pub fn key_path(dir: &Path) -> PathBuf {
        dir.join(KEY_FILE)
    }

    pub fn public_key(&self) -> &VerifyingKey {
        self.key.verifying_key()
    }

    pub fn issue(&self, req: &IssueRequest) -> Vec<u8> {
        let point = AccessCertificate::client_key_point(&req.client_public_key);
        let client_id = req.client_id.unwrap_or_else(|| {
            let mut id = [0u8; 16];
            id.copy_from_slice(&sha256(&point)[..16]);
            id
        });
        AccessCertificate {
            device_id: req.device_id,
            not_before_ms: req.now_ms,
            not_after_ms: req
                .now_ms
                .saturating_add(req.days.saturating_mul(86_400_000)),
            permissions: req.permissions,
            client_id,
            client_public_key: point,
        }
        .sign(&self.key)
    }

    pub fn sign_time(&self, unix_ms: u64) -> SignedTime {
        let datetime = unix_ms.to_be_bytes();
        let sig: Signature = self.key.sign(&datetime);
        SignedTime {
            datetime,
            signature: sig.to_der().as_bytes().to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ptls::cert::PERM_ALL;

    #[test]
    fn issued_certificate_verifies_for_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authority::init(&dir.path().join("ca")).unwrap();
        let loaded = Authority::load(&dir.path().join("ca")).unwrap();
        assert_eq!(auth.public_key(), loaded.public_key());
        let client = SigningKey::from_bytes(&[9u8; 32].into()).unwrap();
        let cert = loaded.issue(&IssueRequest {
            device_id: 7,
            client_public_key: *client.verifying_key(),
            client_id: None,
            days: 10,
            permissions: PERM_ALL,
            now_ms: 1_000,
        });
        let v = AccessCertificate::verify(&cert, auth.public_key(), 7, 5_000).unwrap();
        assert_eq!(v.certificate().not_after_ms, 1_000 + 10 * 86_400_000);
        assert_eq!(v.client_key(), client.verifying_key());
    }
}
