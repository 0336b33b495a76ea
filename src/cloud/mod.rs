//! The cloud endpoint (design §6): CoAP (RFC 7252) over DTLS 1.2 on one UDP port.
//!
//! [`dtls`] is the hardened layer around webrtc-dtls (own demultiplexer, a task and a deadline
//! per handshake, caps, eviction, final-flight resend); [`coap`] serves the resources to each
//! authenticated peer, with the client's identity as the command origin for permissions.

pub mod certs;
pub mod coap;
pub mod dtls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use webrtc_dtls::cipher_suite::CipherSuiteId;
use webrtc_dtls::config::{ClientAuthType, Config as DtlsConfig, ExtendedMasterSecretType};
use zeroize::Zeroizing;

use crate::config::Config;
use crate::supervisor::Supervisor;

/// PSKs by identity, held zeroized.
pub struct Psks(HashMap<String, Zeroizing<Vec<u8>>>);

impl Psks {
    pub fn from_config(config: &Config) -> anyhow::Result<Psks> {
        let mut map = HashMap::new();
        for (i, c) in config.coap.clients.iter().enumerate() {
            if c.auth() != Ok(crate::config::ClientAuth::Psk) {
                continue;
            }
            let key = c
                .psk(&config.gateway.state_dir)
                .map_err(|e| anyhow::anyhow!("coap.clients[{i}] ({}): {e}", c.identity))?;
            map.insert(c.identity.clone(), key);
        }
        Ok(Psks(map))
    }

    fn get(&self, identity: &[u8]) -> Option<Vec<u8>> {
        let id = std::str::from_utf8(identity).ok()?;
        self.0.get(id).map(|k| k.to_vec())
    }
}

/// Everything a peer task needs.
pub struct Endpoint {
    /// Cancelled when the daemon stops: every session closes with close_notify.
    pub shutdown: CancellationToken,
    pub supervisor: Arc<Supervisor>,
    pub psks: Arc<Psks>,
    /// The gateway's certificate and the client check, when certificate clients are configured.
    pub certs: Option<(webrtc_dtls::crypto::Certificate, Arc<certs::ClientCerts>)>,
    pub limits: dtls::Limits,
    pub stats: Arc<dtls::Stats>,
    pub started: std::time::Instant,
    /// Established peers by source address and by identity, oldest first, for the caps.
    pub groups: Mutex<Groups>,
    /// A root store for webrtc-dtls's server-certificate verifier, which it builds for every
    /// connection, a server's too. Given an empty store it generates a self-signed certificate
    /// (a P-256 key and a signature) per connection, so per spoofed ClientHello; this one is
    /// made once. A server never uses it.
    pub unused_roots: rustls::RootCertStore,
}

/// What a peer is counted in for the per-address and per-identity caps.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Group {
    Address(std::net::IpAddr),
    Identity(String),
}

/// Established peers of each group, oldest first.
#[derive(Default)]
pub struct Groups(HashMap<Group, std::collections::VecDeque<(std::net::SocketAddr, u64)>>);

impl Groups {
    /// Count a peer in; the peers its groups must give up to stay within `caps`.
    fn join(
        &mut self,
        peer: (std::net::SocketAddr, u64),
        groups: [(Group, usize); 2],
    ) -> Vec<(std::net::SocketAddr, u64)> {
        let mut evict = Vec::new();
        for (group, cap) in groups {
            let members = self.0.entry(group).or_default();
            members.push_back(peer);
            while members.len() > cap.max(1) {
                if let Some(old) = members.pop_front() {
                    evict.push(old);
                }
            }
        }
        evict
    }

    fn leave(&mut self, peer: (std::net::SocketAddr, u64), groups: &[Group]) {
        for group in groups {
            if let Some(members) = self.0.get_mut(group) {
                members.retain(|p| *p != peer);
                if members.is_empty() {
                    self.0.remove(group);
                }
            }
        }
    }
}

/// A peer's place in [`Groups`], given up when its task ends (or is aborted).
pub struct Membership {
    endpoint: Arc<Endpoint>,
    peer: (std::net::SocketAddr, u64),
    groups: [Group; 2],
}

impl Membership {
    /// Count `peer` in under its address and `identity`, and send every peer that pushes out
    /// of a group over its cap to the demultiplexer to be dropped.
    pub fn join(endpoint: &Arc<Endpoint>, peer: &dtls::NewPeer, identity: &str) -> Membership {
        let key = (peer.addr, peer.generation);
        let groups = [
            Group::Address(peer.addr.ip()),
            Group::Identity(identity.to_string()),
        ];
        let limits = &endpoint.limits;
        let evicted = endpoint
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join(
                key,
                [
                    (groups[0].clone(), limits.max_peers_per_address),
                    (groups[1].clone(), limits.max_peers_per_identity),
                ],
            );
        for old in evicted {
            if old != key {
                log::info!(
                    "coap: {}: evicted, {identity:?} or its address has its fill of sessions",
                    old.0
                );
                endpoint
                    .stats
                    .evicted_by_cap
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = peer.notices.send(dtls::Notice::Gone(old.0, old.1));
            }
        }
        Membership {
            endpoint: endpoint.clone(),
            peer: key,
            groups,
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.endpoint
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .leave(self.peer, &self.groups);
    }
}

/// A root store holding one throwaway self-signed certificate; see [`Endpoint::unused_roots`].
pub fn unused_roots() -> anyhow::Result<rustls::RootCertStore> {
    let cert = rcgen::generate_simple_self_signed(Vec::<String>::new())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone())?;
    Ok(roots)
}

impl Endpoint {
    /// Whether the peer may do `action` on `lock` now (its permissions, source and windows).
    fn may(&self, peer: &coap::Peer, lock: &str, action: crate::command::Action) -> bool {
        let now = crate::clock::unix_ms() / 1000;
        let who = crate::policy::Who::new(&peer.identity, Some(peer.source), now);
        self.supervisor.policy().allows(&who, lock, action)
    }

    /// Whether the peer may know that `lock` exists: it is configured and the peer may do
    /// something with it now. A lock it may not see is answered like one that does not exist.
    fn may_see(&self, peer: &coap::Peer, lock: &str) -> bool {
        self.supervisor.registry().contains(lock)
            && crate::command::Action::ALL
                .into_iter()
                .any(|a| self.may(peer, lock, a))
    }

    /// The DTLS server configuration for a client offering `suites`: the certificate one when
    /// it offers ECDHE-ECDSA and no PSK suite, else the PSK one. The client's identity (PSK
    /// identity or certificate client) is written into `identity` when it is known.
    pub fn dtls_config(&self, suites: &[u16], identity: Arc<Mutex<Option<String>>>) -> DtlsConfig {
        let offers = |list: &[CipherSuiteId]| list.iter().any(|s| suites.contains(&(*s as u16)));
        if let Some((certificate, clients)) = &self.certs {
            if offers(&ECDSA_SUITES) && !offers(&PSK_SUITES) {
                return DtlsConfig {
                    roots_cas: self.unused_roots.clone(),
                    ..certificate_config(certificate.clone(), clients.clone(), identity)
                };
            }
        }
        let psks = self.psks.clone();
        DtlsConfig {
            psk: Some(Arc::new(move |id: &[u8]| {
                let key = psks.get(id).ok_or_else(|| {
                    webrtc_dtls::Error::Other(format!(
                        "unknown PSK identity {:?}",
                        String::from_utf8_lossy(id)
                    ))
                })?;
                *identity.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(String::from_utf8_lossy(id).into_owned());
                Ok(key)
            })),
            psk_identity_hint: Some(b"lockbridge".to_vec()),
            cipher_suites: PSK_SUITES.to_vec(),
            extended_master_secret: ExtendedMasterSecretType::Require,
            roots_cas: self.unused_roots.clone(),
            ..Default::default()
        }
    }
}

const PSK_SUITES: [CipherSuiteId; 3] = [
    CipherSuiteId::Tls_Psk_With_Aes_128_Gcm_Sha256,
    CipherSuiteId::Tls_Psk_With_Aes_128_Ccm_8,
    CipherSuiteId::Tls_Psk_With_Aes_128_Ccm,
];

const ECDSA_SUITES: [CipherSuiteId; 3] = [
    CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256,
    CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Ccm_8,
    CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Ccm,
];

/// ECDHE-ECDSA with a client certificate required: webrtc-dtls checks the client's
/// CertificateVerify signature, [`certs::ClientCerts`] decides whose key it is.
fn certificate_config(
    certificate: webrtc_dtls::crypto::Certificate,
    clients: Arc<certs::ClientCerts>,
    identity: Arc<Mutex<Option<String>>>,
) -> DtlsConfig {
    DtlsConfig {
        certificates: vec![certificate],
        cipher_suites: ECDSA_SUITES.to_vec(),
        client_auth: ClientAuthType::RequireAnyClientCert,
        verify_peer_certificate: Some(Arc::new(move |chain: &[Vec<u8>], _| {
            let id = clients.identify(chain).map_err(webrtc_dtls::Error::Other)?;
            *identity.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
            Ok(())
        })),
        extended_master_secret: ExtendedMasterSecretType::Require,
        ..Default::default()
    }
}

/// The running endpoint.
pub struct Started {
    pub addr: std::net::SocketAddr,
    /// The endpoint: spawn it. It ends when `shutdown` is cancelled, once every DTLS session
    /// has sent close_notify (or after a short limit).
    pub serve: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    pub stats: Arc<dtls::Stats>,
}

/// Bind the UDP port; the endpoint serves until `shutdown` is cancelled.
pub async fn start(
    config: &Config,
    supervisor: Arc<Supervisor>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<Started>> {
    let Some(listen) = config.coap.listen else {
        return Ok(None);
    };
    let psks = Arc::new(Psks::from_config(config)?);
    let clients = Arc::new(certs::ClientCerts::from_config(config)?);
    let certs = match (&config.coap.certificate, &config.coap.private_key) {
        (Some(cert), Some(key)) => {
            let dir = &config.gateway.state_dir;
            let identity = certs::load_identity(&dir.join(cert), &dir.join(key))
                .context("coap.certificate / coap.private_key")?;
            Some((identity, clients))
        }
        _ if clients.any() => {
            anyhow::bail!("certificate clients need coap.certificate and coap.private_key")
        }
        _ => None,
    };
    let socket = UdpSocket::bind(listen)
        .await
        .with_context(|| format!("coap.listen {listen}"))?;
    let addr = socket.local_addr()?;
    let endpoint = Arc::new(Endpoint {
        shutdown,
        supervisor,
        psks,
        certs,
        limits: dtls::Limits {
            handshake_timeout: Duration::from_secs(config.coap.handshake_timeout_s),
            idle_timeout: Duration::from_secs(config.coap.idle_timeout_s),
            max_peers: config.coap.max_peers,
            max_half_open: config.coap.max_half_open,
            max_half_open_per_address: config.coap.max_half_open_per_address,
            max_peers_per_address: config.coap.max_peers_per_address,
            max_peers_per_identity: config.coap.max_peers_per_identity,
            ..dtls::Limits::default()
        },
        stats: Arc::new(dtls::Stats::default()),
        groups: Mutex::new(Groups::default()),
        started: std::time::Instant::now(),
        unused_roots: unused_roots()?,
    });
    let socket = Arc::new(socket);
    let stats = endpoint.stats.clone();
    let registry = endpoint.supervisor.registry().clone();
    let serve = crate::tasks::supervise("the CoAP endpoint", registry, move || {
        let endpoint = endpoint.clone();
        dtls::demultiplex(
            socket.clone(),
            endpoint.limits.clone(),
            endpoint.stats.clone(),
            endpoint.shutdown.clone(),
            move |peer| coap::serve_peer(peer, endpoint.clone()),
        )
    });
    log::info!("coap: CoAP over DTLS on udp {addr}");
    Ok(Some(Started {
        addr,
        serve: Box::pin(serve),
        stats,
    }))
}
