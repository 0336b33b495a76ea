//! DTLS 1.2 over one UDP port, with webrtc-dtls for the state machine and lockbridge's own
//! layer around it (design §6), because its `DTLSListener` has four faults that must not reach
//! users:
//!
//! 1. it runs each handshake inline — here every handshake runs in its own task, so one silent
//!    or spoofed ClientHello blocks nobody;
//! 2. it never forgets a peer — here a fresh ClientHello from a known address replaces the old
//!    peer, peers that end are removed, idle ones are evicted, and both half-open handshakes and
//!    peers are capped;
//! 3. it never resends its final flight — here each peer's [`PeerConn`] records the server's
//!    last flight and resends it when the client repeats its own (RFC 6347 §4.2.4);
//! 4. it has no handshake deadline — here a handshake that does not finish in time is dropped.
//!
//! Only a first ClientHello creates state, and under a flood only one its client repeated
//! ([`Admission`]); anything else from an unknown address is dropped without an answer.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// DTLS record content types.
const CT_CHANGE_CIPHER_SPEC: u8 = 20;
const CT_HANDSHAKE: u8 = 22;
const HS_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER: usize = 13;

/// Limits of the endpoint.
#[derive(Clone, Debug)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_peers: usize,
    pub max_half_open: usize,
    /// Datagrams queued per peer before more are dropped.
    pub inbox: usize,
    /// Addresses whose first ClientHello was held back, remembered to admit their repeat.
    pub remembered_addresses: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(300),
            max_peers: 4096,
            max_half_open: 256,
            inbox: 32,
            remembered_addresses: 32_768,
        }
    }
}

/// The first record of a datagram is a ClientHello in epoch 0.
pub fn is_client_hello(datagram: &[u8]) -> bool {
    datagram.len() > RECORD_HEADER
        && datagram[0] == CT_HANDSHAKE
        && datagram[3] == 0
        && datagram[4] == 0
        && datagram[RECORD_HEADER] == HS_CLIENT_HELLO
}

/// The cipher suites a ClientHello offers (empty when the datagram is not an unfragmented
/// ClientHello). The endpoint picks the PSK or the certificate configuration from them.
pub fn offered_suites(datagram: &[u8]) -> Vec<u16> {
    fn parse(d: &[u8]) -> Option<Vec<u16>> {
        let body = d.get(RECORD_HEADER..)?;
        // handshake header: type, length(3), message_seq(2), fragment_offset(3), fragment_length(3)
        if *body.first()? != HS_CLIENT_HELLO || body.get(6..9)? != [0, 0, 0] {
            return None;
        }
        let mut at = 12 + 2 + 32; // header, client_version, random
        let session_id = *body.get(at)? as usize;
        at += 1 + session_id;
        let cookie = *body.get(at)? as usize;
        at += 1 + cookie;
        let len = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]) as usize;
        let list = body.get(at + 2..at + 2 + len)?;
        Some(
            list.chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect(),
        )
    }
    if !is_client_hello(datagram) {
        return Vec::new();
    }
    parse(datagram).unwrap_or_default()
}

/// The cookie of a ClientHello (empty in a first one, which anybody can send from any address).
fn hello_cookie(datagram: &[u8]) -> &[u8] {
    let body = &datagram[RECORD_HEADER..];
    let at = 12 + 2 + 32;
    let Some(&session_id) = body.get(at) else {
        return &[];
    };
    let at = at + 1 + session_id as usize;
    let Some(&len) = body.get(at) else {
        return &[];
    };
    body.get(at + 1..at + 1 + len as usize).unwrap_or(&[])
}

fn hello_cookie_is_empty(datagram: &[u8]) -> bool {
    hello_cookie(datagram).is_empty()
}

/// The server's datagram is a HelloVerifyRequest.
fn is_hello_verify_request(datagram: &[u8]) -> bool {
    const HS_HELLO_VERIFY_REQUEST: u8 = 3;
    datagram.len() > RECORD_HEADER
        && datagram[0] == CT_HANDSHAKE
        && datagram[RECORD_HEADER] == HS_HELLO_VERIFY_REQUEST
}

/// A datagram that belongs to the handshake: the client repeating a flight.
fn is_handshake_flight(datagram: &[u8]) -> bool {
    datagram
        .first()
        .is_some_and(|ct| *ct == CT_HANDSHAKE || *ct == CT_CHANGE_CIPHER_SPEC)
}

const HANDSHAKING: u8 = 0;
const ESTABLISHED: u8 = 1;
const CLOSED: u8 = 2;

/// A peer's state, shared between the demultiplexer and the peer's task. Leaving the
/// handshaking state counts the peer out of the endpoint's half-open handshakes.
pub struct PeerState {
    state: AtomicU8,
    half_open: Arc<AtomicUsize>,
}

impl PeerState {
    fn new(half_open: Arc<AtomicUsize>) -> PeerState {
        half_open.fetch_add(1, Ordering::SeqCst);
        PeerState {
            state: AtomicU8::new(HANDSHAKING),
            half_open,
        }
    }

    pub fn set_established(&self) {
        if self
            .state
            .compare_exchange(HANDSHAKING, ESTABLISHED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.half_open.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn get(&self) -> u8 {
        self.state.load(Ordering::SeqCst)
    }

    fn set_closed(&self) {
        if self.state.swap(CLOSED, Ordering::SeqCst) == HANDSHAKING {
            self.half_open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The server's flights as they go out: datagrams sent since the last one received.
#[derive(Default)]
struct Flights {
    last: Vec<Vec<u8>>,
    received_since_send: bool,
    /// After the handshake the final flight is kept as it was.
    frozen: bool,
}

/// One peer's view of the shared UDP socket: what webrtc-dtls reads and writes.
pub struct PeerConn {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    peer: SocketAddr,
    inbox: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    flights: Mutex<Flights>,
    /// Set when the peer ends. webrtc-dtls runs parts of a connection in tasks of its own,
    /// which dropping `DTLSConn::new` at the deadline does not stop at once; once closed,
    /// nothing more goes out to the peer and their sends fail.
    closed: std::sync::atomic::AtomicBool,
}

impl PeerConn {
    /// Send nothing more to this peer.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// This peer's HelloVerifyRequest went out (so its client could have answered).
    fn sent_hello_verify(&self) -> bool {
        let f = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        f.last.iter().any(|d| is_hello_verify_request(d))
    }

    /// Keep the final flight for resending; called when the handshake has finished.
    pub fn freeze_flight(&self) {
        self.flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .frozen = true;
    }

    fn note_received(&self, datagram: &[u8]) -> Option<Vec<Vec<u8>>> {
        let mut f = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if f.frozen {
            // The client repeats its last flight: our final flight was lost. Resend it.
            return is_handshake_flight(datagram).then(|| f.last.clone());
        }
        f.received_since_send = true;
        None
    }

    fn note_sent(&self, datagram: &[u8]) {
        let mut f = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if f.frozen {
            return;
        }
        if f.received_since_send {
            f.last.clear();
            f.received_since_send = false;
        }
        f.last.push(datagram.to_vec());
    }
}

#[async_trait::async_trait]
impl webrtc_util::Conn for PeerConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other(
            "a peer connection is already bound".into(),
        ))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        loop {
            let datagram = self
                .inbox
                .lock()
                .await
                .recv()
                .await
                .ok_or(webrtc_util::Error::ErrClosedListener)?;
            if let Some(flight) = self.note_received(&datagram) {
                for d in &flight {
                    let _ = self.socket.send_to(d, self.peer).await;
                }
                continue; // the repeat itself is stale: nothing for the state machine
            }
            let n = datagram.len().min(buf.len());
            buf[..n].copy_from_slice(&datagram[..n]);
            return Ok(n);
        }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        Ok((self.recv(buf).await?, self.peer))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        if self.is_closed() {
            return Err(webrtc_util::Error::ErrClosedListener);
        }
        self.note_sent(buf);
        Ok(self.socket.send_to(buf, self.peer).await?)
    }

    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> webrtc_util::Result<usize> {
        self.send(buf).await
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        PeerConn::close(self);
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// What the demultiplexer gives a new peer's task.
pub struct NewPeer {
    /// Cipher suites of the client's first ClientHello.
    pub suites: Vec<u16>,
    pub conn: Arc<PeerConn>,
    pub state: Arc<PeerState>,
    pub addr: SocketAddr,
}

struct Entry {
    tx: mpsc::Sender<Vec<u8>>,
    conn: Arc<PeerConn>,
    state: Arc<PeerState>,
    generation: u64,
    /// The client answered the HelloVerifyRequest with a ClientHello carrying a cookie: its
    /// address is real (a wrong cookie ends the handshake). Spoofed ClientHellos never get there.
    verified: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.conn.close();
        self.task.abort();
        self.state.set_closed();
    }
}

/// Which first ClientHellos start a handshake.
///
/// Every handshake webrtc-dtls starts costs key generation before the client has proved its
/// address, and a ClientHello is one datagram anybody can send from any source address. So
/// while at least half of the half-open slots are taken — a flood, or an unusual burst — a
/// ClientHello from an address not seen before is held back and the address remembered; the
/// client's retransmission (every DTLS client repeats an unanswered ClientHello, after about
/// 1 s) starts the handshake. A flood forging a new source address per datagram never repeats
/// one, so it costs a hash lookup per datagram while real clients wait one retransmission.
pub struct Admission {
    held: HashMap<SocketAddr, u64>,
    order: VecDeque<(SocketAddr, u64)>,
    capacity: usize,
    next: u64,
}

impl Admission {
    /// Remember at most `capacity` held-back addresses (the oldest are forgotten first).
    pub fn new(capacity: usize) -> Admission {
        Admission {
            held: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            next: 0,
        }
    }

    /// Whether a first ClientHello from `addr` starts a handshake, given whether the
    /// half-open slots are under pressure.
    pub fn admit(&mut self, addr: SocketAddr, under_pressure: bool) -> bool {
        if self.held.remove(&addr).is_some() {
            return true; // the client repeated it: a real address
        }
        if !under_pressure {
            return true;
        }
        self.next += 1;
        self.held.insert(addr, self.next);
        self.order.push_back((addr, self.next));
        while self.order.len() > self.capacity {
            if let Some((a, n)) = self.order.pop_front() {
                if self.held.get(&a) == Some(&n) {
                    self.held.remove(&a);
                }
            }
        }
        false
    }
}

/// Counters for metrics and benchmarks.
#[derive(Default, Debug)]
pub struct Stats {
    /// First ClientHellos held back until their client repeats them ([`Admission`]).
    pub held_back: std::sync::atomic::AtomicU64,
    pub dropped_unknown: std::sync::atomic::AtomicU64,
    pub dropped_half_open_cap: std::sync::atomic::AtomicU64,
    pub dropped_peer_cap: std::sync::atomic::AtomicU64,
    /// Handshakes that never sent a second datagram, evicted to make room.
    pub evicted_unverified: std::sync::atomic::AtomicU64,
    pub replaced: std::sync::atomic::AtomicU64,
    pub peers: std::sync::atomic::AtomicU64,
}

/// Receive on `socket` forever, creating a task per peer with `spawn_peer`.
///
/// Which first ClientHellos start a handshake is [`Admission`]'s decision. A handshake whose
/// client has not yet returned the cookie is *unverified* (a forged ClientHello comes from an
/// address that never sees the HelloVerifyRequest). When the half-open cap is reached, the
/// oldest unverified handshake that has sent its HelloVerifyRequest makes room for the new
/// one, while a real client, whose ClientHello with the cookie follows within a round trip,
/// keeps its place. (A handshake's cookie is webrtc-dtls's own and random, so an evicted
/// client cannot resume with it; the admission keeps the churn low enough that none is.)
pub async fn demultiplex<F, Fut>(
    socket: Arc<UdpSocket>,
    limits: Limits,
    stats: Arc<Stats>,
    spawn_peer: F,
) where
    F: Fn(NewPeer) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => {
            log::error!("coap: {e}");
            return;
        }
    };
    let mut peers: HashMap<SocketAddr, Entry> = HashMap::new();
    let half_open = Arc::new(AtomicUsize::new(0));
    // Unverified handshakes in the order they came, for eviction.
    let mut unverified: VecDeque<(SocketAddr, u64)> = VecDeque::new();
    let mut admission = Admission::new(limits.remembered_addresses);
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut generation = 0u64;
    let mut buf = vec![0u8; 2048];
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        let (n, addr) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    log::debug!("coap: recv: {e}");
                    continue;
                }
            },
            Some((addr, g)) = ended.recv() => {
                if peers.get(&addr).is_some_and(|e| e.generation == g) {
                    peers.remove(&addr);
                }
                stats.peers.store(peers.len() as u64, Ordering::Relaxed);
                continue;
            }
            _ = sweep.tick() => {
                peers.retain(|_, e| e.state.get() != CLOSED && !e.task.is_finished());
                unverified.retain(|(a, g)| {
                    peers.get(a).is_some_and(|e| e.generation == *g && !e.verified)
                });
                stats.peers.store(peers.len() as u64, Ordering::Relaxed);
                continue;
            }
        };
        let datagram = &buf[..n];
        let hello = is_client_hello(datagram);
        let mut replaced = false;
        if let Some(e) = peers.get_mut(&addr) {
            let replace = hello && e.state.get() == ESTABLISHED;
            if !replace && e.state.get() != CLOSED {
                // Only the cookie proves the address; a wrong one ends the handshake at once.
                e.verified |= hello && !hello_cookie_is_empty(datagram);
                // A full inbox drops the datagram: DTLS retransmits what matters.
                let _ = e.tx.try_send(datagram.to_vec());
                continue;
            }
            // A fresh ClientHello from an address with a finished session: the client
            // reconnected from the same port. The new handshake replaces the old peer.
            if peers.remove(&addr).is_some() && replace {
                stats.replaced.fetch_add(1, Ordering::Relaxed);
                replaced = true;
            }
        }
        // Only a first ClientHello (no cookie) starts a handshake: one with a cookie belongs
        // to a handshake this endpoint no longer has, whose cookie nothing here can check.
        if !hello || !hello_cookie_is_empty(datagram) {
            stats.dropped_unknown.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // A client with an established session proved its address already.
        let under_pressure = half_open.load(Ordering::SeqCst) * 2 >= limits.max_half_open;
        if !replaced && !admission.admit(addr, under_pressure) {
            stats.held_back.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if half_open.load(Ordering::SeqCst) >= limits.max_half_open {
            // Make room by evicting the oldest unverified handshake that sent its cookie.
            let mut evicted = false;
            let mut looked = 0;
            while looked < 64 {
                let Some((a, g)) = unverified.pop_front() else {
                    break;
                };
                let Some(e) = peers.get(&a) else { continue };
                if e.generation != g || e.verified || e.state.get() != HANDSHAKING {
                    continue;
                }
                looked += 1;
                if !e.conn.sent_hello_verify() {
                    unverified.push_back((a, g)); // its answer has not gone out yet
                    continue;
                }
                peers.remove(&a);
                stats.evicted_unverified.fetch_add(1, Ordering::Relaxed);
                evicted = true;
                break;
            }
            if !evicted {
                stats.dropped_half_open_cap.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        if peers.len() >= limits.max_peers {
            stats.dropped_peer_cap.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        generation += 1;
        let (tx, rx) = mpsc::channel(limits.inbox);
        let _ = tx.try_send(datagram.to_vec());
        let state = Arc::new(PeerState::new(half_open.clone()));
        let conn = Arc::new(PeerConn {
            socket: socket.clone(),
            local,
            peer: addr,
            inbox: tokio::sync::Mutex::new(rx),
            flights: Mutex::new(Flights::default()),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let fut = spawn_peer(NewPeer {
            suites: offered_suites(datagram),
            conn: conn.clone(),
            state: state.clone(),
            addr,
        });
        let ended_tx = ended_tx.clone();
        let g = generation;
        let st = state.clone();
        let task = tokio::spawn(async move {
            fut.await;
            st.set_closed();
            let _ = ended_tx.send((addr, g));
        });
        peers.insert(
            addr,
            Entry {
                tx,
                conn,
                state,
                generation: g,
                verified: false,
                task,
            },
        );
        unverified.push_back((addr, g));
        stats.peers.store(peers.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u32) -> SocketAddr {
        SocketAddr::from((std::net::Ipv4Addr::from(0x7F00_0000 + n), 5684))
    }

    #[test]
    fn admission_holds_back_new_addresses_only_under_pressure() {
        let mut a = Admission::new(4);
        // No pressure: everyone starts at once and nothing is remembered.
        assert!(a.admit(addr(1), false));
        assert!(a.admit(addr(1), false));
        // Under pressure: a new address is held back, its repeat admitted, once.
        assert!(!a.admit(addr(2), true));
        assert!(a.admit(addr(2), true));
        assert!(!a.admit(addr(2), true));
        // A repeat is admitted when the pressure is gone too (and forgotten then).
        assert!(a.admit(addr(2), false));
        assert!(!a.admit(addr(2), true));
    }

    #[test]
    fn admission_remembers_a_bounded_number_of_addresses() {
        let mut a = Admission::new(4);
        for n in 10..20 {
            assert!(!a.admit(addr(n), true));
        }
        assert_eq!(a.held.len(), 4);
        assert_eq!(a.order.len(), 4);
        // The oldest were forgotten: their repeat counts as new; the newest are admitted.
        assert!(!a.admit(addr(10), true));
        assert!(a.admit(addr(19), true));
        // Memory stays bounded however many addresses a flood forges.
        for n in 0..100_000 {
            a.admit(addr(1000 + n), true);
        }
        assert!(a.held.len() <= 4 && a.order.len() <= 4);
    }

    #[test]
    fn client_hello_is_recognised_only_in_epoch_0() {
        let mut d = vec![22, 0xFE, 0xFD, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 1, 0, 0];
        assert!(is_client_hello(&d));
        d[4] = 1; // epoch 1
        assert!(!is_client_hello(&d));
        d[4] = 0;
        d[13] = 2; // ServerHello
        assert!(!is_client_hello(&d));
        assert!(!is_client_hello(&[23, 0xFE, 0xFD]));
    }

    /// A ClientHello record with `cookie`, offering `suites`.
    fn hello(cookie: &[u8], suites: &[u16]) -> Vec<u8> {
        let mut body = vec![0xFE, 0xFD];
        body.extend_from_slice(&[9; 32]);
        body.push(0);
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
        for s in suites {
            body.extend_from_slice(&s.to_be_bytes());
        }
        body.extend_from_slice(&[1, 0]);
        let len = body.len() as u32;
        let mut hs = vec![HS_CLIENT_HELLO];
        hs.extend_from_slice(&len.to_be_bytes()[1..]);
        hs.extend_from_slice(&[0, 0, 0, 0, 0]);
        hs.extend_from_slice(&len.to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut d = vec![CT_HANDSHAKE, 0xFE, 0xFD, 0, 0, 0, 0, 0, 0, 0, 0];
        d.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        d.extend_from_slice(&hs);
        d
    }

    #[test]
    fn suites_and_cookie_are_read_from_a_client_hello() {
        let first = hello(&[], &[0xC02B, 0x00A8]);
        assert_eq!(offered_suites(&first), vec![0xC02B, 0x00A8]);
        assert!(hello_cookie_is_empty(&first));
        let second = hello(&[1; 20], &[0xC0AE]);
        assert_eq!(offered_suites(&second), vec![0xC0AE]);
        assert!(!hello_cookie_is_empty(&second));
        // Truncated or fragmented: no suites, never a panic.
        for cut in 0..first.len() {
            let _ = offered_suites(&first[..cut]);
            if is_client_hello(&first[..cut]) {
                let _ = hello_cookie_is_empty(&first[..cut]);
            }
        }
        // A HelloVerifyRequest: a handshake is evictable once it went out.
        let mut hvr = vec![CT_HANDSHAKE, 0xFE, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15];
        hvr.extend_from_slice(&[3, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 3, 0xFE, 0xFF, 0]);
        assert!(is_hello_verify_request(&hvr));
        assert!(!is_hello_verify_request(&first));
        assert!(!is_hello_verify_request(&hvr[..RECORD_HEADER]));
        assert_eq!(hello_cookie(&second), &[1; 20]);
        let mut fragment = first.clone();
        fragment[RECORD_HEADER + 8] = 1; // fragment_offset != 0
        assert!(offered_suites(&fragment).is_empty());
    }
}
