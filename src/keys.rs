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
    #[error("{path}: {kind}, not a regular file; a secret must be a file of its own")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error(
        "{path}: owned by uid {owner}, not by the user lockbridge runs as (uid {user}), who alone may hold its secrets; fix with `chown {user} {path}`"
    )]
    NotOwner {
        path: PathBuf,
        owner: u32,
        user: u32,
    },
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

/// Read a file that holds a secret (a key, a PSK, a password). It must be a regular file —
/// a FIFO, device, socket or directory at the path is refused, never read from — owned by the
/// user lockbridge runs as, and readable by that user alone.
// A wildcard on purpose: io::ErrorKind is open-ended: every other kind is reported as it is.
#[allow(clippy::wildcard_enum_match_arm)]
pub fn read_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let check = |meta: &fs::Metadata| -> Result<(), KeyError> {
        let p = path.to_path_buf();
        let t = meta.file_type();
        if !t.is_file() {
            use std::os::unix::fs::FileTypeExt;
            let kind = if t.is_dir() {
                "a directory"
            } else if t.is_fifo() {
                "a FIFO"
            } else if t.is_char_device() || t.is_block_device() {
                "a device"
            } else if t.is_socket() {
                "a socket"
            } else {
                "not a file"
            };
            return Err(KeyError::NotAFile { path: p, kind });
        }
        let user = rustix::process::geteuid().as_raw();
        if meta.uid() != user {
            return Err(KeyError::NotOwner {
                path: p,
                owner: meta.uid(),
                user,
            });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen { path: p, mode });
        }
        Ok(())
    };
    let meta = fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => KeyError::NotFound {
            path: path.to_path_buf(),
        },
        _ => io_err(path)(source),
    })?;
    check(&meta)?;
    // Checked again on what was opened, in case the path changed in between; non-blocking,
    // so that a FIFO put there meanwhile cannot hang the open.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err(path))?;
    check(&file.metadata().map_err(io_err(path))?)?;
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes).map_err(io_err(path))?;
    Ok(bytes)
}

/// Load a key file through [`read_secret`].
pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
    let bytes = read_secret(path)?;
    let not_a_key = || KeyError::NotAKey {
        path: path.to_path_buf(),
    };
    let pem = std::str::from_utf8(&bytes).map_err(|_| not_a_key())?;
    let secret = p256::SecretKey::from_pkcs8_pem(pem).map_err(|_| not_a_key())?;
    Ok(SigningKey::from(secret))
}

pub fn public_b64(key: &VerifyingKey) -> String {
    B64.encode(encode_point(&p256::PublicKey::from(key)))
}

/// A P-256 public key as the configuration writes it: base64 of the 65-byte uncompressed point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublicKeyB64(pub VerifyingKey);

impl std::str::FromStr for PublicKeyB64 {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<PublicKeyB64, KeyError> {
        parse_public_b64(text).map(PublicKeyB64)
    }
}

impl std::fmt::Display for PublicKeyB64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&public_b64(&self.0))
    }
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
    fn a_secret_must_be_a_regular_file_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        // A FIFO is refused without being opened (which would wait for a writer).
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        fs::set_permissions(&fifo, fs::Permissions::from_mode(0o600)).unwrap();
        let err = read_secret(&fifo).unwrap_err();
        assert!(
            matches!(err, KeyError::NotAFile { kind: "a FIFO", .. }),
            "{err}"
        );
        assert!(matches!(
            read_secret(Path::new("/dev/null")),
            Err(KeyError::NotAFile {
                kind: "a device",
                ..
            })
        ));
        assert!(matches!(
            read_secret(dir.path()),
            Err(KeyError::NotAFile {
                kind: "a directory",
                ..
            })
        ));
        let file = dir.path().join("psk");
        fs::write(&file, "00112233445566778899aabbccddeeff").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&file).unwrap().len(), 32);
        // A symlink to a good file is fine: what counts is the file.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(read_secret(&link).is_ok());
    }

    // Regression: key and PSK files owned by another user were read.
    #[test]
    fn a_secret_another_user_owns_is_refused() {
        if rustix::process::geteuid().as_raw() != 0 {
            // Only root can give a file away; tests/run.sh runs the suite as root.
            panic!("this test needs root (run tests/run.sh as root)");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        generate(&path).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = load(&path).unwrap_err();
        assert!(
            matches!(
                err,
                KeyError::NotOwner {
                    owner: 65534,
                    user: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("chown 0"), "{err}");
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
