//! Long-term P-256 key files: PEM (PKCS#8), mode 0600, refused when group or others can read
//! them, and public keys as base64 of the 65-byte uncompressed point (the format locks and
//! Tedee's cloud use).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::{SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use zeroize::Zeroizing;

use crate::ptls::wire::{decode_point, encode_point};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: already exists; refusing to overwrite a key (move it away first)")]
    Exists { path: PathBuf },
    #[error(
        "{path}: mode {mode:04o} lets group or others read the key; fix with `chmod 600 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: not found; create it with `lockbridge keys init --out {path}` as the user that reads it"
    )]
    NotFound { path: PathBuf },
    #[error("{path}: not a PEM PKCS#8 P-256 private key")]
    NotAKey { path: PathBuf },
    #[error("public key: {0}")]
    BadPublicKey(&'static str),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Create a new key file with mode 0600; never overwrites an existing file.
pub fn write_new(path: &Path, key: &SigningKey) -> Result<(), KeyError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let pem = p256::SecretKey::from(key)
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|_| KeyError::NotAKey {
            path: path.to_path_buf(),
        })?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io_err(path)(e)
            }
        })?;
    file.write_all(pem.as_bytes()).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(())
}

/// Generate and write a new key.
pub fn generate(path: &Path) -> Result<SigningKey, KeyError> {
    let key = SigningKey::random(&mut rand_core::OsRng);
    write_new(path, &key)?;
    Ok(key)
}

/// Load a key file, refusing one that group or others can read.
pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
    let meta = fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => KeyError::NotFound {
            path: path.to_path_buf(),
        },
        _ => io_err(path)(source),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let pem = Zeroizing::new(fs::read_to_string(path).map_err(io_err(path))?);
    let secret = p256::SecretKey::from_pkcs8_pem(&pem).map_err(|_| KeyError::NotAKey {
        path: path.to_path_buf(),
    })?;
    Ok(SigningKey::from(secret))
}

pub fn public_b64(key: &VerifyingKey) -> String {
    B64.encode(encode_point(&p256::PublicKey::from(key)))
}

pub fn parse_public_b64(text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = B64
        .decode(text.trim())
        .map_err(|_| KeyError::BadPublicKey("not base64"))?;
    decode_point(&bytes)
        .map(VerifyingKey::from)
        .map_err(|_| KeyError::BadPublicKey("not a 65-byte uncompressed P-256 point"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_0600_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let key = generate(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load(&path).unwrap(), key);
        assert!(matches!(generate(&path), Err(KeyError::Exists { .. })));
    }

    #[test]
    fn readable_key_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        generate(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = load(&path).unwrap_err();
        assert!(matches!(err, KeyError::TooOpen { mode: 0o640, .. }));
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn public_key_base64_round_trips() {
        let key = SigningKey::from_bytes(&[3u8; 32].into()).unwrap();
        let text = public_b64(key.verifying_key());
        assert_eq!(B64.decode(&text).unwrap().len(), 65);
        assert_eq!(&parse_public_b64(&text).unwrap(), key.verifying_key());
        assert!(parse_public_b64("AAAA").is_err());
    }
}
