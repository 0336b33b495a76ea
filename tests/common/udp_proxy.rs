//! A seeded UDP fault proxy: one upstream socket per client address, so the server sees each
//! client as its own peer. Loss can be changed while it runs (loss bursts in the soak test).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tokio::net::UdpSocket;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dir {
    ToServer,
    ToClient,
}

pub type Filter = Arc<dyn Fn(Dir, &[u8]) -> bool + Send + Sync>;

#[derive(Clone, Default)]
pub struct Faults {
    pub loss: f64,
    pub duplicate: f64,
    /// Held back 20–60 ms, so later datagrams overtake it.
    pub reorder: f64,
    pub seed: u64,
    /// Drop a datagram when this says so (before the random faults).
    pub drop_if: Option<Filter>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    inner: Arc<ProxyInner>,
}

struct ProxyInner {
    front: UdpSocket,
    server: SocketAddr,
    faults: Faults,
    /// The loss probability now (f64 bits): starts at `faults.loss`, see [`Proxy::set_loss`].
    loss: AtomicU64,
    /// Whether [`Proxy::delivered`] keeps datagrams (a long soak turns it off).
    recording: std::sync::atomic::AtomicBool,
    rng: Mutex<ChaCha8Rng>,
    upstreams: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
    /// Every datagram forwarded (after the faults), by client and direction.
    delivered: Mutex<Vec<(SocketAddr, Dir, Vec<u8>)>>,
}

impl ProxyInner {
    fn chance(&self, p: f64) -> bool {
        p > 0.0 && (self.rng.lock().unwrap().next_u32() as f64 / u32::MAX as f64) < p
    }

    /// Forward one datagram with the configured faults.
    fn forward(self: &Arc<Self>, client: SocketAddr, dir: Dir, data: Vec<u8>) {
        if self.faults.drop_if.as_ref().is_some_and(|f| f(dir, &data))
            || self.chance(f64::from_bits(self.loss.load(Ordering::Relaxed)))
        {
            return;
        }
        let copies = if self.chance(self.faults.duplicate) {
            2
        } else {
            1
        };
        let delay = self
            .chance(self.faults.reorder)
            .then(|| Duration::from_millis(20 + (self.rng.lock().unwrap().next_u32() % 40) as u64));
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            for _ in 0..copies {
                me.send(client, dir, &data).await;
            }
        });
    }

    async fn send(&self, client: SocketAddr, dir: Dir, data: &[u8]) {
        // Recorded before it goes out, so the log never lags behind what the other side saw.
        if self.recording.load(Ordering::Relaxed) {
            self.delivered
                .lock()
                .unwrap()
                .push((client, dir, data.to_vec()));
        }
        match dir {
            Dir::ToServer => {
                let up = self.upstreams.lock().unwrap().get(&client).cloned();
                if let Some(up) = up {
                    let _ = up.send(data).await;
                }
            }
            Dir::ToClient => {
                let _ = self.front.send_to(data, client).await;
            }
        }
    }
}

impl Proxy {
    pub async fn start(server: SocketAddr, faults: Faults) -> Proxy {
        let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let inner = Arc::new(ProxyInner {
            front,
            server,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(faults.seed)),
            loss: AtomicU64::new(faults.loss.to_bits()),
            recording: std::sync::atomic::AtomicBool::new(true),
            faults,
            upstreams: Mutex::new(HashMap::new()),
            delivered: Mutex::new(Vec::new()),
        });
        let me = inner.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, client)) = me.front.recv_from(&mut buf).await else {
                    return;
                };
                me.upstream(client).await;
                me.forward(client, Dir::ToServer, buf[..n].to_vec());
            }
        });
        Proxy { addr, inner }
    }

    /// Lose datagrams with probability `p` from now on.
    pub fn set_loss(&self, p: f64) {
        self.inner.loss.store(p.to_bits(), Ordering::Relaxed);
    }

    /// Keep no more datagrams for [`Proxy::delivered`].
    pub fn stop_recording(&self) {
        self.inner.recording.store(false, Ordering::Relaxed);
        self.inner.delivered.lock().unwrap().clear();
    }

    /// Send `data` to the server as if `client` had sent it, without faults.
    pub async fn inject(&self, client: SocketAddr, data: &[u8]) {
        self.inner.send(client, Dir::ToServer, data).await;
    }

    pub fn delivered(&self, client: SocketAddr, dir: Dir) -> Vec<Vec<u8>> {
        let all = self.inner.delivered.lock().unwrap();
        all.iter()
            .filter(|(c, d, _)| *c == client && *d == dir)
            .map(|(_, _, data)| data.clone())
            .collect()
    }
}

impl ProxyInner {
    /// The upstream socket of `client`, made on its first datagram.
    async fn upstream(self: &Arc<Self>, client: SocketAddr) -> Arc<UdpSocket> {
        if let Some(up) = self.upstreams.lock().unwrap().get(&client) {
            return up.clone();
        }
        let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        up.connect(self.server).await.unwrap();
        self.upstreams.lock().unwrap().insert(client, up.clone());
        let me = self.clone();
        let reader = up.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match reader.recv(&mut buf).await {
                    Ok(n) => me.forward(client, Dir::ToClient, buf[..n].to_vec()),
                    // An ICMP port unreachable (the server not bound yet) on this connected
                    // socket: the client retransmits, so keep reading.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(_) => break,
                }
            }
        });
        up
    }
}
