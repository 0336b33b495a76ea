//! Credentials (design §5): the gateway key, and per lock the access certificate and signed
//! time, from a provider behind one interface — this project's `authority`, or `files`
//! delivered by the operator's backend, or `tedee`, Tedee's cloud ([`crate::tedee`]). The daemon
//! picks the configured one.

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use crate::authority::{Authority, IssueRequest};
use crate::config::{Config, LockEntry};
use crate::ptls::api::SignedTime;
use crate::ptls::cert::{self, AccessCertificate};

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{0}")]
    Key(#[from] crate::keys::KeyError),
    #[error("no certificate for lock {serial}: {path} is missing or unreadable ({reason})")]
    MissingCertificate {
        serial: String,
        path: PathBuf,
        reason: String,
    },
    #[error("no signed time: {path} is missing or malformed ({reason})")]
    MissingSignedTime { path: PathBuf, reason: String },
    #[error("lock {0} has no device_id; the authority needs it to issue a certificate")]
    NoDeviceId(String),
    /// Asked for: the provider's worker is getting it; try again shortly.
    #[error("{0}")]
    Pending(String),
    /// Tedee's cloud said no, or the provider cannot start (the message says why and what to do).
    #[error("{0}")]
    Tedee(String),
}

impl CredentialError {
    /// The provider is getting what was asked for: retry soon, it is not a failure.
    pub fn is_pending(&self) -> bool {
        matches!(self, CredentialError::Pending(_))
    }
}

/// Where certificates and signed time come from.
pub trait CredentialProvider: Send + Sync {
    /// The access certificate for this gateway key and this lock. `fresh` asks for a new one
    /// (the lock refused the last with ALERT 0x05) rather than a cached one.
    fn certificate(&self, lock: &LockEntry, fresh: bool) -> Result<Vec<u8>, CredentialError>;
    /// A signed time for a lock that lost its clock.
    fn signed_time(&self, lock: &LockEntry) -> Result<SignedTime, CredentialError>;

    /// The key SIG_S is checked with, when the provider supplies it (Tedee's cloud does);
    /// `None`: the configured `public_key`.
    fn lock_key(&self, _lock: &LockEntry) -> Option<p256::ecdsa::VerifyingKey> {
        None
    }

    /// When to ask for the certificate again.
    fn refresh_after(&self, _lock: &LockEntry, certificate: &[u8]) -> std::time::Duration {
        std::time::Duration::from_millis(refresh_after_ms(certificate, crate::clock::unix_ms()))
    }

    /// Why a lock keeps refusing certificates, from what the provider knows.
    fn diagnose(&self, _lock: &LockEntry) -> Option<String> {
        None
    }

    /// The lock's credentials as its state shows them.
    fn status(&self, _lock: &LockEntry) -> Option<serde_json::Value> {
        None
    }

    /// The provider's own state, for the gateway's status.
    fn gateway_status(&self) -> Option<serde_json::Value> {
        None
    }

    /// Counts the operator's requests to try this lock again (`lockbridge tedee fetch`): a
    /// session parked after refusals tries again when it changes.
    fn retry_generation(&self, _lock: &LockEntry) -> u64 {
        0
    }

    /// Fetch the certificates of these locks (serials; all when empty) now, for the operator;
    /// the answer is one JSON value per lock. `None`: this provider fetches nothing.
    fn fetch_now(
        &self,
        _serials: Vec<String>,
    ) -> Option<tokio::sync::oneshot::Receiver<Vec<serde_json::Value>>> {
        None
    }
}

/// Certificates issued locally by this project's authority.
pub struct AuthorityProvider {
    authority: Authority,
    client_key: p256::ecdsa::VerifyingKey,
    permissions: u32,
    days: u64,
}

impl AuthorityProvider {
    /// The authority of `[credentials]`, issuing for `client_key`.
    pub fn load(
        config: &Config,
        client_key: p256::ecdsa::VerifyingKey,
    ) -> Result<AuthorityProvider, CredentialError> {
        Ok(AuthorityProvider {
            authority: Authority::load(&config.credentials.authority_dir())?,
            client_key,
            permissions: cert::parse_permissions(config.credentials.permissions())
                .unwrap_or(cert::PERM_ALL),
            days: config.credentials.validity_days(),
        })
    }
}

impl CredentialProvider for AuthorityProvider {
    fn certificate(&self, lock: &LockEntry, _fresh: bool) -> Result<Vec<u8>, CredentialError> {
        let device_id = lock
            .device_id
            .ok_or_else(|| CredentialError::NoDeviceId(lock.id.clone()))?;
        Ok(self.authority.issue(&IssueRequest {
            device_id,
            client_public_key: self.client_key,
            client_id: None,
            days: self.days,
            permissions: self.permissions,
            now_ms: crate::clock::unix_ms(),
        }))
    }

    fn signed_time(&self, _lock: &LockEntry) -> Result<SignedTime, CredentialError> {
        Ok(self.authority.sign_time(crate::clock::unix_ms()))
    }
}

/// Certificates and signed time delivered as files: `STATE/certs/SERIAL.cert` (base64 of the
/// certificate) and `STATE/signed-time.json` (`{"datetime": B64, "signature": B64}`, the shape
/// of `authority sign-time` and of Tedee's API).
pub struct FilesProvider {
    dir: PathBuf,
}

impl FilesProvider {
    /// Files under the state directory `dir`.
    pub fn new(dir: PathBuf) -> FilesProvider {
        FilesProvider { dir }
    }

    pub fn cert_path(&self, serial: &str) -> PathBuf {
        self.dir.join("certs").join(format!("{serial}.cert"))
    }
}

impl CredentialProvider for FilesProvider {
    fn certificate(&self, lock: &LockEntry, _fresh: bool) -> Result<Vec<u8>, CredentialError> {
        let path = self.cert_path(&lock.serial);
        let missing = |reason: String| CredentialError::MissingCertificate {
            serial: lock.serial.clone(),
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| missing(e.to_string()))?;
        B64.decode(text.trim())
            .map_err(|e| missing(format!("not base64: {e}")))
    }

    fn signed_time(&self, _lock: &LockEntry) -> Result<SignedTime, CredentialError> {
        let path = self.dir.join("signed-time.json");
        let bad = |reason: String| CredentialError::MissingSignedTime {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let field = |k: &str| {
            v[k].as_str()
                .and_then(|s| B64.decode(s).ok())
                .ok_or_else(|| bad(format!("{k} is not base64")))
        };
        let datetime: [u8; 8] = field("datetime")?
            .try_into()
            .map_err(|_| bad("datetime is not 8 bytes".into()))?;
        Ok(SignedTime {
            datetime,
            signature: field("signature")?,
        })
    }
}

/// When a certificate should be refreshed: at half its remaining life (design §5). Opaque
/// certificates (real Tedee ones) that do not parse are refreshed daily.
pub fn refresh_after_ms(certificate: &[u8], now_ms: u64) -> u64 {
    match AccessCertificate::parse(certificate) {
        Ok((c, _, _)) if c.not_after_ms > now_ms => (c.not_after_ms - now_ms) / 2,
        Ok(_) => 0,
        Err(_) => 86_400_000,
    }
}
