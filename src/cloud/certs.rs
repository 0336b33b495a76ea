//! Certificates for the cloud endpoint: the gateway's own (ECDSA P-256, PEM files) and the
//! check of client certificates, against the configured CA (identity = subject common name) or
//! a pinned key (identity = the client entry whose SHA-256 of SubjectPublicKeyInfo matches).
//!
//! webrtc-dtls has already verified the client's CertificateVerify signature with the leaf's
//! key when [`ClientCerts::identify`] runs; this decides whether that key is one we trust.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use sha2::{Digest, Sha256};
use webrtc_dtls::crypto::{Certificate, CryptoPrivateKey};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{ClientAuth, Config};

/// Certificates (PEM) in a file, in order.
pub fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let text = std::fs::read(path).with_context(|| path.display().to_string())?;
    let certs: Vec<_> = pem::parse_many(&text)
        .with_context(|| format!("{}: not PEM", path.display()))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    if certs.is_empty() {
        bail!("{}: no CERTIFICATE in it", path.display());
    }
    Ok(certs)
}

/// A certificate chain and its PKCS#8 private key (mode 0600) as webrtc-dtls wants them.
pub fn load_identity(cert_path: &Path, key_path: &Path) -> anyhow::Result<Certificate> {
    let certificate = read_certificates(cert_path)?;
    let key = zeroize::Zeroizing::new(read_private_key(key_path)?);
    let rustls::pki_types::PrivateKeyDer::Pkcs8(der) = &*key else {
        bail!(
            "{}: not PKCS#8; convert it with `openssl pkcs8 -topk8 -nocrypt`",
            key_path.display()
        );
    };
    let pair = rcgen::KeyPair::try_from(der.secret_pkcs8_der())
        .map_err(|e| anyhow!("{}: {e}", key_path.display()))?;
    if !pair.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256) {
        bail!("{}: not an ECDSA P-256 key", key_path.display());
    }
    let private_key = CryptoPrivateKey::from_key_pair(&pair)
        .map_err(|e| anyhow!("{}: {e}", key_path.display()))?;
    Ok(Certificate {
        certificate,
        private_key,
    })
}

/// A PEM private key (mode 0600) for rustls: PKCS#8, SEC1 (EC) or PKCS#1 (RSA).
pub fn read_private_key(path: &Path) -> anyhow::Result<rustls::pki_types::PrivateKeyDer<'static>> {
    use rustls::pki_types::{
        PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
    };
    let text = crate::config::read_private(path).map_err(|e| anyhow!(e))?;
    let block = pem::parse(text.as_bytes())
        .map_err(|e| anyhow!("{}: not a PEM private key: {e}", path.display()))?;
    let tag = block.tag().to_string();
    let der = block.into_contents();
    Ok(match tag.as_str() {
        "PRIVATE KEY" => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)),
        "EC PRIVATE KEY" => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der)),
        "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)),
        other => bail!("{}: a {other:?} block, not a private key", path.display()),
    })
}

/// A root store from a PEM file of CA certificates.
pub fn load_roots(path: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certificates(path)? {
        roots
            .add(cert)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo: what `public_key_sha256` pins.
pub fn key_fingerprint(der: &[u8]) -> anyhow::Result<[u8; 32]> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| anyhow!("bad certificate: {e}"))?;
    Ok(Sha256::digest(cert.public_key().raw).into())
}

/// Who a client certificate belongs to.
pub struct ClientCerts {
    pins: HashMap<[u8; 32], String>,
    by_cn: HashMap<String, String>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl ClientCerts {
    pub fn from_config(config: &Config) -> anyhow::Result<ClientCerts> {
        let mut pins = HashMap::new();
        let mut by_cn = HashMap::new();
        for c in &config.coap.clients {
            match c
                .auth()
                .map_err(|e| anyhow!("coap.clients ({}): {e}", c.identity))?
            {
                ClientAuth::Psk => {}
                ClientAuth::CertificateCn(cn) => {
                    by_cn.insert(cn, c.identity.clone());
                }
                ClientAuth::PinnedKey(pin) => {
                    pins.insert(pin, c.identity.clone());
                }
            }
        }
        let verifier = match &config.coap.client_ca {
            None => None,
            Some(ca) => {
                let path = config.gateway.state_dir.join(ca);
                let roots = Arc::new(load_roots(&path).context("coap.client_ca")?);
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                Some(
                    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| anyhow!("coap.client_ca: {e}"))?,
                )
            }
        };
        Ok(ClientCerts {
            pins,
            by_cn,
            verifier,
        })
    }

    /// Whether any client authenticates with a certificate.
    pub fn any(&self) -> bool {
        !self.pins.is_empty() || !self.by_cn.is_empty()
    }

    /// The identity of the client presenting `chain` (leaf first), or why it is refused.
    pub fn identify(&self, chain: &[Vec<u8>]) -> Result<String, String> {
        let leaf = chain.first().ok_or("no client certificate")?;
        let (_, cert) =
            X509Certificate::from_der(leaf).map_err(|e| format!("bad client certificate: {e}"))?;
        if !cert.validity().is_valid() {
            return Err(format!(
                "client certificate {} is outside its validity ({} to {})",
                cert.subject(),
                cert.validity().not_before,
                cert.validity().not_after
            ));
        }
        let pin: [u8; 32] = Sha256::digest(cert.public_key().raw).into();
        if let Some(identity) = self.pins.get(&pin) {
            return Ok(identity.clone());
        }
        let Some(verifier) = &self.verifier else {
            return Err(format!(
                "client key {} is not pinned by any coap.clients entry",
                hex::encode(pin)
            ));
        };
        let end_entity = CertificateDer::from(leaf.as_slice());
        let intermediates: Vec<_> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        verifier
            .verify_client_cert(&end_entity, &intermediates, UnixTime::now())
            .map_err(|e| format!("client certificate {}: {e}", cert.subject()))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| format!("client certificate {} has no common name", cert.subject()))?;
        self.by_cn
            .get(cn)
            .cloned()
            .ok_or_else(|| format!("no coap.clients entry has certificate_cn = {cn:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_key(dir: &Path, name: &str, pem: &str, mode: u32) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn private_keys_by_kind_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["lockbridge".into()])
            .unwrap()
            .self_signed(&pair)
            .unwrap();
        let cert_path = dir.path().join("c.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        let pkcs8 = write_key(dir.path(), "k.pem", &pair.serialize_pem(), 0o600);
        assert!(load_identity(&cert_path, &pkcs8).is_ok());
        assert!(matches!(
            read_private_key(&pkcs8).unwrap(),
            rustls::pki_types::PrivateKeyDer::Pkcs8(_)
        ));
        // SEC1 is fine for rustls (MQTT) but webrtc-dtls needs PKCS#8: the error says how.
        let sec1_pem = pem::encode(&pem::Pem::new("EC PRIVATE KEY", vec![1, 2, 3]));
        let sec1 = write_key(dir.path(), "sec1.pem", &sec1_pem, 0o600);
        assert!(matches!(
            read_private_key(&sec1).unwrap(),
            rustls::pki_types::PrivateKeyDer::Sec1(_)
        ));
        let e = load_identity(&cert_path, &sec1).unwrap_err().to_string();
        assert!(e.contains("openssl pkcs8 -topk8 -nocrypt"), "{e}");
        // Readable by others: refused, naming the fix.
        let open = write_key(dir.path(), "open.pem", &pair.serialize_pem(), 0o644);
        let e = read_private_key(&open).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        // Not a key at all.
        let cert_as_key = write_key(dir.path(), "cert.key", &cert.pem(), 0o600);
        assert!(read_private_key(&cert_as_key).is_err());
    }
}
