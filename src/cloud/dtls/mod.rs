//! DTLS 1.2 over one UDP port, with webrtc-dtls for the state machine and lockbridge's own
//! layer around it (design §6). The demultiplexer sees every datagram before the crate does,
//! and each peer's [`PeerConn`] screens what reaches its state machine, because webrtc-dtls
//! alone lets a datagram anybody can forge do harm:
//!
//! 1. its listener runs each handshake inline — here every handshake runs in its own task,
//!    with a deadline, so one silent or spoofed ClientHello blocks nobody;
//! 2. it never forgets a peer — here peers that end are removed, idle ones are evicted, and
//!    half-open handshakes (globally and per source address) and peers (globally, per source
//!    address and per identity) are capped;
//! 3. it never resends its final flight — here [`PeerConn`] keeps the server's last flight and
//!    resends it when the client repeats its own (RFC 6347 §4.2.4), at most once a second;
//! 4. it ends a live session on one forged datagram — here an established peer's state machine
//!    never sees an epoch-0 record other than the repeated flight, and, for a PSK suite, an
//!    epoch-1 record whose tag does not verify (§4.1.2.7: invalid records are discarded);
//! 5. a new ClientHello from a known address would replace the live peer — here it starts a
//!    second handshake beside it, which replaces the old peer only once it completes (§4.2.8);
//! 6. it lets a ClientHello with any cookie end a handshake, and does not check the client's
//!    Finished — here only the cookie of the HelloVerifyRequest this endpoint sent is passed
//!    on (and counts as proof of the address), and [`verify`] checks the Finished.
//!
//! Only a first ClientHello creates state, and under a flood only one its client repeated
//! ([`Admission`]); anything else from an unknown address is dropped without an answer.

pub mod record;
pub mod verify;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use record::{
    CT_APPLICATION_DATA, CT_CHANGE_CIPHER_SPEC, CT_HANDSHAKE, Hello, client_hello, fragments,
    hello_verify_cookie, records,
};
use verify::{FinishedError, RecordKeys, Transcript};

/// The largest datagram taken: what webrtc-dtls's own read buffer holds (a ClientHello with
/// many suites and extensions is a few KiB). A larger one is dropped and counted.
pub const MAX_DATAGRAM: usize = 8192;

/// Limits of the endpoint.
#[derive(Clone, Debug)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_peers: usize,
    pub max_half_open: usize,
    /// Half-open handshakes from one IP address.
    pub max_half_open_per_address: usize,
    /// Established peers from one IP address; a new one evicts that address's oldest.
    pub max_peers_per_address: usize,
    /// Established peers of one identity; a new one evicts that identity's oldest.
    pub max_peers_per_identity: usize,
    /// Datagrams queued per peer before more are dropped.
    pub inbox: usize,
    /// Addresses whose first ClientHello was held back, remembered to admit their repeat.
    pub remembered_addresses: usize,
    /// Bytes a handshake may receive before it completes (a real one needs a few KiB, its
    /// retransmissions included); webrtc-dtls would buffer up to 2 MB of fragments per peer.
    pub handshake_budget: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(300),
            max_peers: 4096,
            max_half_open: 256,
            max_half_open_per_address: 32,
            max_peers_per_address: 512,
            max_peers_per_identity: 256,
            inbox: 32,
            remembered_addresses: 32_768,
            handshake_budget: 64 * 1024,
        }
    }
}

/// Handshake messages a client sends in one DTLS 1.2 handshake have message_seq 0 to 6; a
/// fragment beyond this is not part of one.
const MAX_CLIENT_MESSAGE_SEQ: u16 = 8;

/// The client repeating its last flight is answered at most this often.
const RESEND_INTERVAL: Duration = Duration::from_secs(1);

const HANDSHAKING: u8 = 0;
const ESTABLISHED: u8 = 1;
const CLOSED: u8 = 2;

/// A peer's state, shared between the demultiplexer and the peer's task. Leaving the
/// handshaking state counts the peer out of the half-open handshakes it was counted in.
pub struct PeerState {
    state: AtomicU8,
    half_open: Vec<Arc<AtomicUsize>>,
}

impl PeerState {
    fn new(half_open: Vec<Arc<AtomicUsize>>) -> PeerState {
        for c in &half_open {
            c.fetch_add(1, Ordering::SeqCst);
        }
        PeerState {
            state: AtomicU8::new(HANDSHAKING),
            half_open,
        }
    }

    fn leave_handshaking(&self, to: u8) -> bool {
        let left = self
            .state
            .compare_exchange(HANDSHAKING, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if left {
            for c in &self.half_open {
                c.fetch_sub(1, Ordering::SeqCst);
            }
        }
        left
    }

    pub fn set_established(&self) {
        self.leave_handshaking(ESTABLISHED);
    }

    fn get(&self) -> u8 {
        self.state.load(Ordering::SeqCst)
    }

    fn set_closed(&self) {
        if !self.leave_handshaking(CLOSED) {
            self.state.store(CLOSED, Ordering::SeqCst);
        }
    }
}

/// What a peer's socket view knows about its handshake and session.
#[derive(Default)]
struct ConnState {
    /// The server's datagrams sent since the last one received: its last flight.
    flight: Vec<Vec<u8>>,
    received_since_send: bool,
    /// The handshake is over: the final flight is kept as it was, and only records that may
    /// belong to the session pass.
    established: bool,
    /// The cookie of the HelloVerifyRequest sent to this peer.
    cookie: Option<Vec<u8>>,
    /// Handshake messages both ways, until the client's Finished is checked.
    transcript: Option<Transcript>,
    /// Handshake bytes passed to the state machine so far.
    received: usize,
    /// The client's record keys: set for PSK suites, whose failed decryption is fatal in
    /// webrtc-dtls.
    keys: Option<RecordKeys>,
    last_resend: Option<Instant>,
}

/// What [`PeerConn`] does with a datagram from its peer.
enum Screened {
    /// Give these bytes (all or some of its records) to the state machine.
    Pass(Vec<u8>),
    /// The client repeated its flight: send ours again.
    Resend(Vec<Vec<u8>>),
    Drop,
}

/// One peer's view of the shared UDP socket: what webrtc-dtls reads and writes.
pub struct PeerConn {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    peer: SocketAddr,
    inbox: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    state: Mutex<ConnState>,
    budget: usize,
    /// Set when the peer ends. webrtc-dtls runs parts of a connection in tasks of its own,
    /// which dropping `DTLSConn::new` at the deadline does not stop at once; once closed,
    /// nothing more goes out to the peer and their sends fail.
    closed: AtomicBool,
    stats: Arc<Stats>,
}

impl PeerConn {
    /// Send nothing more to this peer.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cookie this endpoint sent the peer, once its HelloVerifyRequest went out.
    fn cookie_matches(&self, cookie: &[u8]) -> bool {
        self.lock()
            .cookie
            .as_deref()
            .is_some_and(|c| !c.is_empty() && c == cookie)
    }

    /// This peer's HelloVerifyRequest went out (so its client could have answered).
    fn sent_hello_verify(&self) -> bool {
        self.lock().cookie.is_some()
    }

    /// The handshake has finished in webrtc-dtls: check the client's Finished against the
    /// transcript with the session's `master` secret, and from now on keep the final flight
    /// and screen records (with the client's keys when `psk`: see [`verify`]).
    pub fn established(&self, master: &[u8], psk: bool) -> Result<(), FinishedError> {
        let mut s = self.lock();
        s.established = true;
        let transcript = s.transcript.take().unwrap_or_default();
        let keys = verify::check_finished(master, &transcript)?;
        if psk {
            s.keys = Some(keys);
        }
        Ok(())
    }

    fn screen(&self, datagram: &[u8]) -> Screened {
        let mut s = self.lock();
        if s.established {
            let mut keep = Vec::new();
            let mut repeat = false;
            for r in records(datagram) {
                let genuine = || s.keys.as_ref().is_none_or(|k| k.opens(&r));
                match (r.epoch, r.content_type) {
                    // The client's last flight again: ClientKeyExchange and ChangeCipherSpec
                    // in epoch 0, its Finished in epoch 1.
                    (0, CT_HANDSHAKE | CT_CHANGE_CIPHER_SPEC) => repeat = true,
                    (1, CT_HANDSHAKE) if genuine() => repeat = true,
                    (1, ct) if ct != CT_CHANGE_CIPHER_SPEC && genuine() => {
                        keep.extend_from_slice(r.raw);
                    }
                    // Epoch 0 after the handshake, a record that does not decrypt, a later
                    // epoch: not the peer's session. Discarded silently.
                    _ => {
                        self.stats.dropped_forged.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if repeat {
                // The client repeats its last flight: our final flight was lost.
                let now = Instant::now();
                let due = s
                    .last_resend
                    .is_none_or(|t| now.duration_since(t) >= RESEND_INTERVAL);
                if due && !s.flight.is_empty() {
                    s.last_resend = Some(now);
                    return Screened::Resend(s.flight.clone());
                }
            }
            return if keep.is_empty() {
                Screened::Drop
            } else {
                Screened::Pass(keep)
            };
        }
        // Handshaking: a bounded number of bytes, and nothing that cannot be part of it.
        if s.received + datagram.len() > self.budget {
            self.stats.dropped_budget.fetch_add(1, Ordering::Relaxed);
            return Screened::Drop;
        }
        let mut keep = Vec::with_capacity(datagram.len());
        for r in records(datagram) {
            let stray = match (r.epoch, r.content_type) {
                (0, CT_APPLICATION_DATA) => true,
                (0, CT_HANDSHAKE) => {
                    fragments(r.fragment).any(|f| f.message_seq > MAX_CLIENT_MESSAGE_SEQ)
                }
                _ => false,
            };
            if !stray {
                keep.extend_from_slice(r.raw);
            }
        }
        if keep.is_empty() {
            return Screened::Drop;
        }
        s.received += keep.len();
        s.received_since_send = true;
        s.transcript
            .get_or_insert_with(Transcript::default)
            .from_client(&keep);
        Screened::Pass(keep)
    }

    fn note_sent(&self, datagram: &[u8]) {
        let mut s = self.lock();
        if s.established {
            return;
        }
        if s.received_since_send {
            s.flight.clear();
            s.received_since_send = false;
        }
        s.flight.push(datagram.to_vec());
        if let Some(cookie) = hello_verify_cookie(datagram) {
            s.cookie = Some(cookie.to_vec());
        }
        s.transcript
            .get_or_insert_with(Transcript::default)
            .from_server(datagram);
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
            let Some(datagram) = self.inbox.lock().await.recv().await else {
                // The peer is gone. webrtc-dtls's reader loops on errors, so an error here
                // would spin until the connection is dropped: wait for that instead.
                return std::future::pending().await;
            };
            if datagram.len() > buf.len() {
                continue;
            }
            match self.screen(&datagram) {
                Screened::Pass(bytes) => {
                    buf[..bytes.len()].copy_from_slice(&bytes);
                    return Ok(bytes.len());
                }
                Screened::Resend(flight) => {
                    for d in &flight {
                        let _ = self.socket.send_to(d, self.peer).await;
                    }
                }
                Screened::Drop => {}
            }
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

/// What a peer's task tells the demultiplexer.
#[derive(Clone, Copy, Debug)]
pub enum Notice {
    /// The handshake of (address, generation) completed: a successor replaces the old peer.
    Established(SocketAddr, u64),
    /// The peer ended, or must go (evicted by a per-address or per-identity cap).
    Gone(SocketAddr, u64),
}

/// What the demultiplexer gives a new peer's task.
pub struct NewPeer {
    /// Cipher suites of the client's first ClientHello.
    pub suites: Vec<u16>,
    pub conn: Arc<PeerConn>,
    pub state: Arc<PeerState>,
    pub addr: SocketAddr,
    pub generation: u64,
    /// Where the task reports its handshake and evicts other peers.
    pub notices: mpsc::UnboundedSender<Notice>,
}

struct Entry {
    tx: mpsc::Sender<Vec<u8>>,
    conn: Arc<PeerConn>,
    state: Arc<PeerState>,
    generation: u64,
    /// The client answered the HelloVerifyRequest with the cookie it carried: its address is
    /// real. Spoofed ClientHellos never get there.
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

/// The peers of one address: the current one and, while it re-handshakes, its successor.
struct Slot {
    current: Entry,
    successor: Option<Entry>,
}

impl Slot {
    fn entry(&mut self, which: Which) -> Option<&mut Entry> {
        match which {
            Which::Current => Some(&mut self.current),
            Which::Successor => self.successor.as_mut(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Current,
    Successor,
}

/// Where a datagram from a known address goes.
enum Route {
    To(Which),
    /// A first ClientHello from an established peer's address: a handshake beside it.
    NewSuccessor,
    /// Not for any handshake or session of this address (a forged cookie, or records for a
    /// handshake that never proved its address).
    Forged,
}

fn route(slot: &mut Slot, hello: Option<&Hello>) -> Route {
    let current_handshaking = slot.current.state.get() == HANDSHAKING;
    let half_open = if current_handshaking {
        Some(Which::Current)
    } else {
        slot.successor.as_ref().map(|_| Which::Successor)
    };
    match hello {
        Some(h) if h.cookie.is_empty() => match half_open {
            Some(w) => Route::To(w),
            None => Route::NewSuccessor,
        },
        Some(h) => {
            // Only the cookie this endpoint sent proves the address; any other would end a
            // real client's handshake in webrtc-dtls.
            let Some(w) = half_open else {
                return Route::Forged;
            };
            let Some(e) = slot.entry(w) else {
                return Route::Forged;
            };
            if !e.conn.cookie_matches(h.cookie) {
                return Route::Forged;
            }
            e.verified = true;
            Route::To(w)
        }
        None => {
            if slot.successor.as_ref().is_some_and(|s| s.verified) {
                // The client at this address is re-handshaking: its flights, and soon its
                // data, are for the new session.
                Route::To(Which::Successor)
            } else if current_handshaking && !slot.current.verified {
                Route::Forged
            } else {
                Route::To(Which::Current)
            }
        }
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
    pub held_back: AtomicU64,
    pub dropped_unknown: AtomicU64,
    pub dropped_half_open_cap: AtomicU64,
    /// First ClientHellos refused because their address has its fill of half-open handshakes.
    pub dropped_address_cap: AtomicU64,
    pub dropped_peer_cap: AtomicU64,
    /// Datagrams over [`MAX_DATAGRAM`].
    pub dropped_oversized: AtomicU64,
    /// Records no handshake or session of their address could take: a ClientHello with a
    /// cookie this endpoint did not send, epoch-0 records after a handshake, records that do
    /// not decrypt.
    pub dropped_forged: AtomicU64,
    /// Datagrams beyond a handshake's byte budget.
    pub dropped_budget: AtomicU64,
    /// Handshakes that never sent a second datagram, evicted to make room.
    pub evicted_unverified: AtomicU64,
    /// Peers evicted because their address or identity reached its cap.
    pub evicted_by_cap: AtomicU64,
    /// Peers replaced by a completed re-handshake from their address.
    pub replaced: AtomicU64,
    /// Handshakes refused because the client's Finished did not verify.
    pub bad_finished: AtomicU64,
    pub peers: AtomicU64,
}

/// The half-open handshakes of each source address.
#[derive(Default)]
struct PerAddress(HashMap<IpAddr, Arc<AtomicUsize>>);

impl PerAddress {
    fn counter(&mut self, ip: IpAddr) -> Arc<AtomicUsize> {
        self.0.entry(ip).or_default().clone()
    }

    fn count(&self, ip: IpAddr) -> usize {
        self.0.get(&ip).map_or(0, |c| c.load(Ordering::SeqCst))
    }

    /// Forget addresses with nothing half-open and no peer holding their counter.
    fn prune(&mut self) {
        self.0
            .retain(|_, c| c.load(Ordering::SeqCst) > 0 || Arc::strong_count(c) > 1);
    }
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
    shutdown: CancellationToken,
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
    let mut d = Demux {
        socket: socket.clone(),
        local,
        limits: limits.clone(),
        stats: stats.clone(),
        peers: HashMap::new(),
        half_open: Arc::new(AtomicUsize::new(0)),
        per_address: PerAddress::default(),
        unverified: VecDeque::new(),
        admission: Admission::new(limits.remembered_addresses),
        notices: mpsc::unbounded_channel(),
        generation: 0,
    };
    // One byte more than the largest datagram taken, to tell a larger one.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
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
            Some(notice) = d.notices.1.recv() => {
                d.on_notice(notice);
                continue;
            }
            _ = sweep.tick() => {
                d.sweep();
                continue;
            }
            _ = shutdown.cancelled() => break,
        };
        if n > MAX_DATAGRAM {
            stats.dropped_oversized.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        d.on_datagram(addr, &buf[..n], &spawn_peer);
    }
    // Shutting down: every peer saw the same token and is closing its session (close_notify);
    // let them finish before their entries go (dropping one aborts its task), at most
    // CLOSE_LIMIT in all.
    let all = async {
        for slot in d.peers.values_mut() {
            let _ = (&mut slot.current.task).await;
            if let Some(next) = slot.successor.as_mut() {
                let _ = (&mut next.task).await;
            }
        }
    };
    if tokio::time::timeout(CLOSE_LIMIT, all).await.is_err() {
        log::warn!("coap: some DTLS sessions did not close within {CLOSE_LIMIT:?}");
    }
}

/// How long shutdown waits for the DTLS sessions to send close_notify.
const CLOSE_LIMIT: Duration = Duration::from_secs(2);

/// The demultiplexer's state, owned by its task.
struct Demux {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    limits: Limits,
    stats: Arc<Stats>,
    peers: HashMap<SocketAddr, Slot>,
    half_open: Arc<AtomicUsize>,
    per_address: PerAddress,
    /// Unverified handshakes in the order they came, for eviction.
    unverified: VecDeque<(SocketAddr, u64)>,
    admission: Admission,
    notices: (
        mpsc::UnboundedSender<Notice>,
        mpsc::UnboundedReceiver<Notice>,
    ),
    generation: u64,
}

impl Demux {
    fn count_peers(&self) {
        self.stats
            .peers
            .store(self.peers.len() as u64, Ordering::Relaxed);
    }

    fn on_notice(&mut self, notice: Notice) {
        match notice {
            Notice::Established(addr, g) => {
                let Some(slot) = self.peers.get_mut(&addr) else {
                    return;
                };
                if slot.successor.as_ref().is_some_and(|s| s.generation == g) {
                    if let Some(new) = slot.successor.take() {
                        // Dropping the old entry ends its task and everything it started.
                        slot.current = new;
                        self.stats.replaced.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Notice::Gone(addr, g) => {
                let Some(slot) = self.peers.get_mut(&addr) else {
                    return;
                };
                if slot.successor.as_ref().is_some_and(|s| s.generation == g) {
                    slot.successor = None;
                } else if slot.current.generation == g {
                    match slot.successor.take() {
                        Some(next) => slot.current = next,
                        None => {
                            self.peers.remove(&addr);
                        }
                    }
                }
            }
        }
        self.count_peers();
    }

    fn sweep(&mut self) {
        let live = |e: &Entry| e.state.get() != CLOSED && !e.task.is_finished();
        self.peers.retain(|_, slot| {
            if slot.successor.as_ref().is_some_and(|s| !live(s)) {
                slot.successor = None;
            }
            if !live(&slot.current) {
                match slot.successor.take() {
                    Some(next) => slot.current = next,
                    None => return false,
                }
            }
            true
        });
        let peers = &self.peers;
        self.unverified.retain(|(a, g)| {
            peers.get(a).is_some_and(|slot| {
                [Some(&slot.current), slot.successor.as_ref()]
                    .into_iter()
                    .flatten()
                    .any(|e| e.generation == *g && !e.verified)
            })
        });
        self.per_address.prune();
        self.count_peers();
    }

    fn on_datagram<F, Fut>(&mut self, addr: SocketAddr, datagram: &[u8], spawn_peer: &F)
    where
        F: Fn(NewPeer) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let hello = client_hello(datagram);
        if let Some(slot) = self.peers.get_mut(&addr) {
            if slot.current.state.get() != CLOSED {
                match route(slot, hello.as_ref()) {
                    Route::To(which) => {
                        if let Some(e) = slot.entry(which) {
                            // A full inbox drops the datagram: DTLS retransmits what matters.
                            let _ = e.tx.try_send(datagram.to_vec());
                        }
                    }
                    Route::Forged => {
                        self.stats.dropped_forged.fetch_add(1, Ordering::Relaxed);
                    }
                    Route::NewSuccessor => {
                        let suites = hello.map(|h| h.suites).unwrap_or_default();
                        if let Some(e) = self.new_handshake(addr, datagram, suites, spawn_peer) {
                            if let Some(slot) = self.peers.get_mut(&addr) {
                                slot.successor = Some(e);
                            }
                        }
                    }
                }
                return;
            }
            // The peer's task ended and its notice is on the way: a fresh start.
            self.peers.remove(&addr);
        }
        // Only a first ClientHello (no cookie) starts a handshake: one with a cookie belongs
        // to a handshake this endpoint no longer has, whose cookie nothing here can check.
        let Some(hello) = hello.filter(|h| h.cookie.is_empty()) else {
            self.stats.dropped_unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let under_pressure = self.half_open.load(Ordering::SeqCst) * 2 >= self.limits.max_half_open;
        if !self.admission.admit(addr, under_pressure) {
            self.stats.held_back.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.peers.len() >= self.limits.max_peers {
            self.stats.dropped_peer_cap.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(e) = self.new_handshake(addr, datagram, hello.suites, spawn_peer) {
            self.peers.insert(
                addr,
                Slot {
                    current: e,
                    successor: None,
                },
            );
            self.count_peers();
        }
    }

    /// Make room for one more half-open handshake by evicting the oldest unverified one that
    /// sent its cookie; false when there is none.
    fn evict_unverified(&mut self) -> bool {
        let mut looked = 0;
        while looked < 64 {
            let Some((a, g)) = self.unverified.pop_front() else {
                return false;
            };
            let Some(slot) = self.peers.get_mut(&a) else {
                continue;
            };
            let which = if slot.current.generation == g {
                Which::Current
            } else if slot.successor.as_ref().is_some_and(|s| s.generation == g) {
                Which::Successor
            } else {
                continue;
            };
            let Some(e) = slot.entry(which) else { continue };
            if e.verified || e.state.get() != HANDSHAKING {
                continue;
            }
            looked += 1;
            if !e.conn.sent_hello_verify() {
                self.unverified.push_back((a, g)); // its answer has not gone out yet
                continue;
            }
            match which {
                Which::Successor => slot.successor = None,
                Which::Current => {
                    self.peers.remove(&a);
                }
            }
            self.stats
                .evicted_unverified
                .fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Start a handshake task for `addr`, within the half-open caps.
    fn new_handshake<F, Fut>(
        &mut self,
        addr: SocketAddr,
        datagram: &[u8],
        suites: Vec<u16>,
        spawn_peer: &F,
    ) -> Option<Entry>
    where
        F: Fn(NewPeer) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        if self.per_address.count(addr.ip()) >= self.limits.max_half_open_per_address {
            self.stats
                .dropped_address_cap
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self.half_open.load(Ordering::SeqCst) >= self.limits.max_half_open
            && !self.evict_unverified()
        {
            self.stats
                .dropped_half_open_cap
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.generation += 1;
        let generation = self.generation;
        let (tx, rx) = mpsc::channel(self.limits.inbox);
        let _ = tx.try_send(datagram.to_vec());
        let state = Arc::new(PeerState::new(vec![
            self.half_open.clone(),
            self.per_address.counter(addr.ip()),
        ]));
        let conn = Arc::new(PeerConn {
            socket: self.socket.clone(),
            local: self.local,
            peer: addr,
            inbox: tokio::sync::Mutex::new(rx),
            state: Mutex::new(ConnState::default()),
            budget: self.limits.handshake_budget,
            closed: AtomicBool::new(false),
            stats: self.stats.clone(),
        });
        let fut = spawn_peer(NewPeer {
            suites,
            conn: conn.clone(),
            state: state.clone(),
            addr,
            generation,
            notices: self.notices.0.clone(),
        });
        let notices = self.notices.0.clone();
        let st = state.clone();
        let task = tokio::spawn(async move {
            fut.await;
            st.set_closed();
            let _ = notices.send(Notice::Gone(addr, generation));
        });
        self.unverified.push_back((addr, generation));
        Some(Entry {
            tx,
            conn,
            state,
            generation,
            verified: false,
            task,
        })
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
}
