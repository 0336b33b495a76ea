//! `lockbridge ctl`: the CoAP-over-DTLS client for the cloud endpoint (PSK or certificate).
//!
//! Confirmable requests with retransmission (2 s doubling, 4 times), separate responses,
//! block-wise responses (Block2) and Observe for `state --watch`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use coap_lite::{CoapOption, ContentFormat, MessageClass, MessageType, Packet, RequestType};
use serde::Deserialize;
use tokio::net::UdpSocket;
use webrtc_dtls::cipher_suite::CipherSuiteId;
use webrtc_dtls::config::{Config as DtlsConfig, ExtendedMasterSecretType};
use webrtc_dtls::conn::DTLSConn;
use zeroize::Zeroizing;

/// `ctl.toml`: where the endpoint is and who we are (a PSK, or a certificate and its key).
/// Relative paths are relative to the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlConfig {
    pub endpoint: SocketAddr,
    /// The PSK identity.
    #[serde(default)]
    pub identity: String,
    /// The key as hex, or `psk_file` (hex, mode 0600).
    #[serde(default)]
    pub psk_hex: Option<String>,
    #[serde(default)]
    pub psk_file: Option<std::path::PathBuf>,
    /// Our certificate chain (PEM) and its PKCS#8 key (mode 0600), instead of a PSK.
    #[serde(default)]
    pub certificate: Option<std::path::PathBuf>,
    #[serde(default)]
    pub private_key: Option<std::path::PathBuf>,
    /// With a certificate: the CA (PEM) that issued the gateway's certificate, and the name
    /// it must carry.
    #[serde(default)]
    pub server_ca: Option<std::path::PathBuf>,
    #[serde(default)]
    pub server_name: Option<String>,
}

/// How `ctl` authenticates.
pub enum Credentials {
    Psk {
        identity: String,
        key: Zeroizing<Vec<u8>>,
    },
    Certificate {
        certificate: Box<webrtc_dtls::crypto::Certificate>,
        server_ca: rustls::RootCertStore,
        server_name: String,
    },
}

impl CtlConfig {
    pub fn load(path: &Path) -> anyhow::Result<(CtlConfig, Credentials)> {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        let cfg: CtlConfig = toml::from_str(&text).with_context(|| path.display().to_string())?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let credentials = match (&cfg.certificate, &cfg.private_key) {
            (Some(cert), Some(key)) => {
                let certificate =
                    crate::cloud::certs::load_identity(&dir.join(cert), &dir.join(key))?;
                let ca = cfg.server_ca.as_ref().ok_or_else(|| {
                    anyhow!(
                        "{}: a certificate needs server_ca to check the gateway",
                        path.display()
                    )
                })?;
                Credentials::Certificate {
                    certificate: Box::new(certificate),
                    server_ca: crate::cloud::certs::load_roots(&dir.join(ca))?,
                    server_name: cfg
                        .server_name
                        .clone()
                        .unwrap_or_else(|| "lockbridge".into()),
                }
            }
            (None, None) => {
                let client = crate::config::CoapClient {
                    identity: cfg.identity.clone(),
                    psk_hex: cfg.psk_hex.clone(),
                    psk_file: cfg.psk_file.clone(),
                    certificate_cn: None,
                    public_key_sha256: None,
                };
                let key = client
                    .psk(dir)
                    .map_err(|e| anyhow!("{}: {e}", path.display()))?;
                Credentials::Psk {
                    identity: cfg.identity.clone(),
                    key,
                }
            }
            _ => bail!("{}: give both certificate and private_key", path.display()),
        };
        Ok((cfg, credentials))
    }
}

pub struct CoapClient {
    dtls: Arc<DTLSConn>,
    next_mid: u16,
    next_token: u32,
}

const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RETRANSMIT: u32 = 4;
/// How long a separate response may take after the empty ACK.
const SEPARATE_LIMIT: Duration = Duration::from_secs(60);

impl CoapClient {
    pub async fn connect(
        endpoint: SocketAddr,
        credentials: &Credentials,
    ) -> anyhow::Result<CoapClient> {
        let bind = if endpoint.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(endpoint).await?;
        let config = match credentials {
            Credentials::Psk { identity, key } => {
                let key = key.clone();
                DtlsConfig {
                    psk: Some(Arc::new(move |_hint: &[u8]| Ok(key.to_vec()))),
                    psk_identity_hint: Some(identity.as_bytes().to_vec()),
                    cipher_suites: vec![CipherSuiteId::Tls_Psk_With_Aes_128_Gcm_Sha256],
                    extended_master_secret: ExtendedMasterSecretType::Require,
                    // PSK has no certificate to match a name against; webrtc-dtls wants one set.
                    server_name: "lockbridge".into(),
                    ..Default::default()
                }
            }
            Credentials::Certificate {
                certificate,
                server_ca,
                server_name,
            } => DtlsConfig {
                certificates: vec![(**certificate).clone()],
                roots_cas: server_ca.clone(),
                server_name: server_name.clone(),
                cipher_suites: vec![CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256],
                extended_master_secret: ExtendedMasterSecretType::Require,
                ..Default::default()
            },
        };
        let handshake = DTLSConn::new(Arc::new(socket), config, true, None);
        let dtls = tokio::time::timeout(Duration::from_secs(15), handshake)
            .await
            .map_err(|_| {
                anyhow!("{endpoint}: no DTLS handshake within 15 s (is the endpoint up?)")
            })?
            .map_err(|e| {
                anyhow!("{endpoint}: DTLS handshake refused: {e} (check identity and key)")
            })?;
        Ok(CoapClient {
            dtls: Arc::new(dtls),
            next_mid: rand_core::RngCore::next_u32(&mut rand_core::OsRng) as u16,
            next_token: 1,
        })
    }

    fn packet(&mut self, method: RequestType, path: &str, payload: &[u8]) -> Packet {
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(method);
        self.next_mid = self.next_mid.wrapping_add(1);
        p.header.message_id = self.next_mid;
        self.next_token = self.next_token.wrapping_add(1);
        p.set_token(self.next_token.to_be_bytes().to_vec());
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        if !payload.is_empty() {
            p.set_content_format(ContentFormat::ApplicationJSON);
            p.payload = payload.to_vec();
        }
        p
    }

    /// Send a confirmable request and return the response, following separate responses.
    async fn exchange(&mut self, request: &Packet) -> anyhow::Result<Packet> {
        let bytes = request
            .to_bytes()
            .map_err(|e| anyhow!("encoding the request: {e:?}"))?;
        let mid = request.header.message_id;
        let token = request.get_token().to_vec();
        let mut timeout = ACK_TIMEOUT;
        let mut acknowledged = false;
        let mut buf = vec![0u8; 2048];
        for attempt in 0..=MAX_RETRANSMIT {
            if !acknowledged {
                self.dtls.write(&bytes, None).await?;
            }
            let wait = if acknowledged {
                SEPARATE_LIMIT
            } else {
                timeout
            };
            let mut deadline = tokio::time::Instant::now() + wait;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                let n = match tokio::time::timeout(left, self.dtls.read(&mut buf, None)).await {
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => bail!("connection lost: {e}"),
                    Err(_) => break,
                };
                let Ok(p) = Packet::from_bytes(&buf[..n]) else {
                    continue;
                };
                if p.header.get_type() == MessageType::Acknowledgement && p.header.message_id == mid
                {
                    if p.header.code == MessageClass::Empty {
                        // The answer follows as a separate response.
                        acknowledged = true;
                        deadline = tokio::time::Instant::now() + SEPARATE_LIMIT;
                        continue;
                    }
                    return Ok(p);
                }
                if p.get_token() == token.as_slice()
                    && matches!(p.header.code, MessageClass::Response(_))
                {
                    if p.header.get_type() == MessageType::Confirmable {
                        self.ack(p.header.message_id).await;
                    }
                    return Ok(p);
                }
            }
            if acknowledged {
                bail!("no separate response within {SEPARATE_LIMIT:?}");
            }
            if attempt < MAX_RETRANSMIT {
                timeout *= 2;
            }
        }
        bail!("no answer after {} transmissions", MAX_RETRANSMIT + 1)
    }

    async fn ack(&self, mid: u16) {
        let mut ack = Packet::new();
        ack.header.set_version(1);
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.code = MessageClass::Empty;
        ack.header.message_id = mid;
        if let Ok(b) = ack.to_bytes() {
            let _ = self.dtls.write(&b, None).await;
        }
    }

    /// A request with its whole answer: the code and the payload joined over Block2.
    pub async fn request(
        &mut self,
        method: RequestType,
        path: &str,
        payload: &[u8],
    ) -> anyhow::Result<(String, Vec<u8>)> {
        let first = self.packet(method, path, payload);
        let mut response = self.exchange(&first).await?;
        let code = code_text(&response);
        let mut body = std::mem::take(&mut response.payload);
        let mut block = block2(&response);
        while let Some((num, true, szx)) = block {
            let mut next = self.packet(method, path, payload);
            next.add_option(
                CoapOption::Block2,
                uint_bytes(((u32::from(num) + 1) << 4) | u32::from(szx)),
            );
            let mut r = self.exchange(&next).await?;
            body.append(&mut r.payload);
            block = block2(&r);
        }
        Ok((code, body))
    }

    /// Observe a resource: `each` gets every representation until it returns false.
    pub async fn observe(
        &mut self,
        path: &str,
        mut each: impl FnMut(&[u8]) -> bool,
    ) -> anyhow::Result<()> {
        let mut request = self.packet(RequestType::Get, path, &[]);
        request.set_observe_value(0);
        let first = self.exchange(&request).await?;
        if !code_text(&first).starts_with("2.") {
            bail!(
                "{} {}",
                code_text(&first),
                String::from_utf8_lossy(&first.payload)
            );
        }
        if !each(&first.payload) {
            return Ok(());
        }
        let token = request.get_token().to_vec();
        let mut buf = vec![0u8; 2048];
        loop {
            let n = self.dtls.read(&mut buf, None).await?;
            let Ok(p) = Packet::from_bytes(&buf[..n]) else {
                continue;
            };
            if p.get_token() != token.as_slice() {
                continue;
            }
            if p.header.get_type() == MessageType::Confirmable {
                self.ack(p.header.message_id).await;
            }
            if !each(&p.payload) {
                return Ok(());
            }
        }
    }

    pub async fn close(self) {
        let _ = self.dtls.close().await;
    }
}

fn code_text(p: &Packet) -> String {
    let raw: u8 = p.header.code.into();
    format!("{}.{:02}", raw >> 5, raw & 0x1F)
}

fn block2(p: &Packet) -> Option<(u16, bool, u8)> {
    let raw = p.get_option(CoapOption::Block2)?.front()?;
    let v = raw.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
    Some(((v >> 4) as u16, (v >> 3) & 1 == 1, (v & 7) as u8))
}

fn uint_bytes(v: u32) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

/// What `lockbridge ctl` asks the endpoint.
pub enum Ask {
    Locks,
    Gateway,
    /// One lock's state; `watch` follows it (CoAP Observe).
    State {
        lock: String,
        watch: bool,
    },
    /// Lock, unlock or pull; `id` is the request id (a repeat never actuates twice).
    Command {
        action: crate::command::Action,
        lock: String,
        mode: Option<crate::command::Mode>,
        id: Option<String>,
    },
}

/// `lockbridge ctl --config FILE`: ask the endpoint, print the answer (`--json`: as it came).
/// `Err` when the request or the command did not succeed.
pub async fn run(
    config: &Path,
    json: bool,
    what: Ask,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let (cfg, credentials) = CtlConfig::load(config)?;
    let mut client = CoapClient::connect(cfg.endpoint, &credentials).await?;
    let show = |out: &mut dyn std::io::Write, body: &[u8]| -> anyhow::Result<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
        if json {
            writeln!(out, "{}", String::from_utf8_lossy(body))?;
        }
        Ok(v)
    };
    let line = crate::control::lock_line;
    let result = match what {
        Ask::Locks | Ask::Gateway | Ask::State { watch: false, .. } => {
            let path = match &what {
                Ask::State { lock, .. } => format!("/locks/{lock}"),
                Ask::Gateway => "/gateway".to_string(),
                Ask::Locks | Ask::Command { .. } => "/locks".to_string(),
            };
            let (code, body) = client.request(RequestType::Get, &path, &[]).await?;
            if !code.starts_with("2.") {
                anyhow::bail!("{code} {}", String::from_utf8_lossy(&body));
            }
            let v = show(out, &body)?;
            if !json {
                match v.as_array() {
                    Some(list) => {
                        for l in list {
                            writeln!(out, "{}", line(l))?;
                        }
                    }
                    None if matches!(what, Ask::Gateway) => writeln!(out, "{v:#}")?,
                    None => writeln!(out, "{}", line(&v))?,
                }
            }
            Ok(())
        }
        Ask::State { lock, watch: true } => {
            let path = format!("/locks/{lock}");
            client
                .observe(&path, |body| {
                    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                    let text = if json {
                        String::from_utf8_lossy(body).into_owned()
                    } else {
                        line(&v)
                    };
                    writeln!(out, "{text}").is_ok() && out.flush().is_ok()
                })
                .await
        }
        Ask::Command {
            action,
            lock,
            mode,
            id,
        } => {
            let action = action.name();
            let mut body = serde_json::Map::new();
            if let Some(m) = mode {
                body.insert("mode".into(), serde_json::to_value(m)?);
            }
            if let Some(id) = &id {
                body.insert("request_id".into(), id.clone().into());
            }
            let payload = if body.is_empty() {
                Vec::new()
            } else {
                serde_json::to_vec(&body)?
            };
            let path = format!("/locks/{lock}/{action}");
            let (code, resp) = client.request(RequestType::Post, &path, &payload).await?;
            let v = show(out, &resp)?;
            if !json {
                writeln!(
                    out,
                    "{action} {lock}: {code} {}",
                    String::from_utf8_lossy(&resp)
                )?;
            }
            if v["status"] != "success" {
                anyhow::bail!("the command did not succeed ({code})");
            }
            Ok(())
        }
    };
    client.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block2_values_round_trip() {
        let mut p = Packet::new();
        p.add_option(CoapOption::Block2, uint_bytes((3 << 4) | (1 << 3) | 6));
        assert_eq!(block2(&p), Some((3, true, 6)));
        assert_eq!(uint_bytes(0), Vec::<u8>::new());
        assert_eq!(uint_bytes(0x1E), vec![0x1E]);
    }
}
