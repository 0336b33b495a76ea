//! Serving simulated locks over the sim socket (design §4.1).
//!
//! One task owns the world — every [`Lock`] and every socket's binding and fault pipes — and
//! runs on the real clock; each socket has a small reader/writer task. The world applies the
//! configured faults to values in both directions and appends every actuation to the event log.
//!
//! On the BLE timing model (`connection_interval_ms` > 0) opening a link costs what it costs on
//! the air: the wait until the lock is heard, the connection set-up and MTU exchange (CONNECTED),
//! GATT discovery (DISCOVERED) and each CCCD write (SUBSCRIBED), every answer on the link's
//! connection events.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::time::Instant;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;

use super::chaos::{Chaos, ChaosConfig, Fault};
use super::model::{ConnId, Happening, Lock, LockSpec, Output, Refusal};
use super::wire::{self, ListenAddr, SimMsg, Stream, read_msg, write_msg};
use crate::fault::{Direction, Events, Fate, FaultConfig, FaultyPipe};
use crate::ptls::{Channel, WallClock};

pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Unix(path) => {
                // A socket file left by an earlier run would make bind fail.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    std::fs::remove_file(path)?;
                }
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await?)),
        }
    }

    /// The address actually bound (the port is filled in for `tcp:…:0`).
    pub fn local_addr(&self) -> std::io::Result<ListenAddr> {
        match self {
            Listener::Unix(_, p) => Ok(ListenAddr::Unix(p.clone())),
            Listener::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?)),
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn Stream>> {
        match self {
            Listener::Unix(l, _) => Ok(Box::new(l.accept().await?.0)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok(Box::new(s))
            }
        }
    }
}

/// Everything the world needs: the locks, the faults, the event log and a seed.
pub struct SimWorld {
    pub locks: Vec<LockSpec>,
    pub faults: FaultConfig,
    pub chaos: ChaosConfig,
    pub event_log: Option<PathBuf>,
    pub seed: u64,
}

enum Incoming {
    Msg(SimMsg),
    Closed,
}

struct Sock {
    tx: mpsc::UnboundedSender<SimMsg>,
    binding: Option<(String, ConnId)>,
    to_lock: FaultyPipe<(Channel, Vec<u8>)>,
    to_client: FaultyPipe<(Channel, Vec<u8>)>,
    /// The bound link's connection events (BLE timing model only).
    events: Option<Events>,
    /// Answers that wait for their connection event, in order.
    later: Vec<(Instant, SimMsg)>,
}

impl Sock {
    /// Send `msg` at `at`, or at once.
    fn answer(&mut self, now: Instant, at: Option<Instant>, msg: SimMsg) {
        match at.filter(|at| *at > now) {
            Some(at) => {
                let pos = self.later.partition_point(|(t, _)| *t <= at);
                self.later.insert(pos, (at, msg));
            }
            None => {
                let _ = self.tx.send(msg);
            }
        }
    }

    /// The link ended: nothing in flight on it arrives any more.
    fn unbound(&mut self) -> Option<(String, ConnId)> {
        self.to_lock.clear();
        self.to_client.clear();
        self.later.clear();
        self.events = None;
        self.binding.take()
    }
}

struct World {
    locks: BTreeMap<String, Lock>,
    sockets: HashMap<u64, Sock>,
    by_conn: HashMap<(String, ConnId), u64>,
    faults: FaultConfig,
    event_log: super::EventLog,
    chaos: Chaos,
    /// Locks in a loss burst, and until when: every value to and from them is lost. An entry
    /// that has passed is harmless and is replaced by the lock's next burst.
    blackout: HashMap<String, Instant>,
    /// When each advertisement is heard (BLE timing model).
    air: ChaCha8Rng,
}

fn in_blackout(blackout: &HashMap<String, Instant>, serial: &str, now: Instant) -> bool {
    blackout.get(serial).is_some_and(|until| now < *until)
}

/// Serve until `shutdown` completes.
pub async fn serve(
    world: SimWorld,
    listener: Listener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let now = Instant::now();
    let wall = WallClock {
        at: now,
        unix_ms: crate::clock::unix_ms(),
    };
    let event_log = super::EventLog::open(world.event_log.as_deref())?;
    let chaos = Chaos::new(world.chaos, world.locks.len(), now);
    let locks = world
        .locks
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            let seed = world.seed.wrapping_add(i as u64);
            (spec.serial.clone(), Lock::new(spec, seed, wall))
        })
        .collect();
    let mut air = ChaCha8Rng::seed_from_u64(world.faults.seed);
    air.set_stream(u64::MAX);
    let mut w = World {
        air,
        locks,
        sockets: HashMap::new(),
        by_conn: HashMap::new(),
        faults: world.faults,
        event_log,
        chaos,
        blackout: HashMap::new(),
    };
    let (inbox_tx, mut inbox) = mpsc::unbounded_channel::<(u64, Incoming)>();
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let now = Instant::now();
        w.run(now);
        let deadline = w.next_deadline().map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(stream) => {
                    next_id += 1;
                    let (tx, rx) = mpsc::unbounded_channel();
                    let mut to_lock =
                        FaultyPipe::new(&w.faults.for_direction(Direction::ToLock), next_id * 2);
                    let mut to_client =
                        FaultyPipe::new(&w.faults.for_direction(Direction::ToClient), next_id * 2 + 1);
                    to_lock.align(Instant::now());
                    to_client.align(Instant::now());
                    w.sockets.insert(next_id, Sock {
                        tx,
                        binding: None,
                        to_lock,
                        to_client,
                        events: None,
                        later: Vec::new(),
                    });
                    tokio::spawn(socket_task(next_id, stream, inbox_tx.clone(), rx));
                }
                Err(e) => log::warn!("sim: accept failed: {e}"),
            },
            Some((id, incoming)) = inbox.recv() => w.on_incoming(Instant::now(), id, incoming),
            _ = crate::clock::sleep_until(deadline) => {}
        }
    }
    // Leave cleanly: every client sees DISCONNECT.
    for sock in w.sockets.values() {
        let _ = sock.tx.send(SimMsg::Disconnect {
            reason: wire::DISCONNECT_NORMAL,
        });
    }
    Ok(())
}

async fn socket_task(
    id: u64,
    stream: Box<dyn Stream>,
    to_world: mpsc::UnboundedSender<(u64, Incoming)>,
    mut from_world: mpsc::UnboundedReceiver<SimMsg>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let reader = async {
        while let Ok(Some(msg)) = read_msg(&mut rd).await {
            if to_world.send((id, Incoming::Msg(msg))).is_err() {
                break;
            }
        }
    };
    let writer = async {
        while let Some(msg) = from_world.recv().await {
            if write_msg(&mut wr, &msg).await.is_err() {
                break;
            }
            if matches!(msg, SimMsg::Disconnect { .. }) {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
    let _ = to_world.send((id, Incoming::Closed));
}

impl World {
    fn on_incoming(&mut self, now: Instant, id: u64, incoming: Incoming) {
        let msg = match incoming {
            Incoming::Closed => {
                self.unbind(id);
                self.sockets.remove(&id);
                return;
            }
            Incoming::Msg(m) => m,
        };
        let Some(sock) = self.sockets.get_mut(&id) else {
            return;
        };
        match msg {
            SimMsg::Connect { att_mtu, serial } => {
                if sock.binding.is_some() {
                    let _ = sock.tx.send(SimMsg::Refused {
                        reason: wire::REFUSED_BUSY,
                    });
                    return;
                }
                let (reply, at) = match self.locks.get_mut(&serial) {
                    None => (
                        SimMsg::Refused {
                            reason: Refusal::UnknownLock as u8,
                        },
                        None,
                    ),
                    Some(lock) => match lock.connect(now, att_mtu) {
                        Ok((conn, mtu)) => {
                            log::info!("sim: {serial}: connection {conn} (ATT MTU {mtu})");
                            sock.binding = Some((serial.clone(), conn));
                            self.by_conn.insert((serial, conn), id);
                            let heard = self.faults.advertising_wait(self.air.next_u64());
                            let opened = self.faults.connection(now, heard);
                            if let Some((events, _)) = opened {
                                // Both directions share the link's connection events.
                                sock.to_lock.align(events.epoch);
                                sock.to_client.align(events.epoch);
                                sock.events = Some(events);
                            }
                            (
                                SimMsg::Connected { att_mtu: mtu },
                                opened.map(|(_, ready)| ready),
                            )
                        }
                        Err(r) => (SimMsg::Refused { reason: r as u8 }, None),
                    },
                };
                sock.answer(now, at, reply);
            }
            SimMsg::Probe { serial } => {
                let reply = match self.locks.get(&serial) {
                    None => SimMsg::Refused {
                        reason: Refusal::UnknownLock as u8,
                    },
                    Some(lock) if lock.on_air(now) => SimMsg::Seen,
                    Some(_) => SimMsg::Refused {
                        reason: Refusal::Busy as u8,
                    },
                };
                // Heard at the lock's next advertisement.
                let at = self
                    .faults
                    .interval()
                    .map(|_| now + self.faults.advertising_wait(self.air.next_u64()));
                sock.answer(now, at, reply);
            }
            SimMsg::Discover => {
                let pairs = self.faults.discovery_round_trips;
                let at = sock.events.map(|e| e.round_trips(now, pairs));
                sock.answer(now, at, SimMsg::Discovered);
            }
            SimMsg::Subscribe { channel, on } => {
                if let Some((serial, conn)) = &sock.binding {
                    if let Some(lock) = self.locks.get_mut(serial) {
                        lock.subscribe(*conn, channel, on);
                    }
                }
                let pairs = self.faults.cccd_round_trips;
                let at = sock.events.map(|e| e.round_trips(now, pairs));
                sock.answer(now, at, SimMsg::Subscribed { channel });
            }
            SimMsg::Write {
                channel,
                with_response,
                value,
            } => {
                let Some((serial, conn)) = &sock.binding else {
                    return;
                };
                // The ATT server refuses a value its link cannot carry (spec §3.2), as BlueZ
                // and a real lock do: with response an error answer, without it dropped.
                let limit = self.locks.get(serial).and_then(|l| l.value_limit(*conn));
                if let Some(limit) = limit.filter(|&l| value.len() > l) {
                    log::warn!(
                        "sim: {serial}: refused a {}-byte write on {channel:?}: ATT MTU {} takes at most {limit}",
                        value.len(),
                        limit + 3
                    );
                    if with_response {
                        let _ = sock.tx.send(SimMsg::WriteError {
                            channel,
                            att_error: wire::ATT_INVALID_VALUE_LENGTH,
                        });
                    }
                    return;
                }
                if with_response {
                    let _ = sock.tx.send(SimMsg::WriteAck { channel });
                }
                if sock
                    .binding
                    .as_ref()
                    .is_some_and(|(serial, _)| in_blackout(&self.blackout, serial, now))
                {
                    return;
                }
                if sock.to_lock.push(now, (channel, value)) == Fate::Disconnect {
                    self.cut(id, wire::DISCONNECT_FAULT);
                }
            }
            SimMsg::Disconnect { .. } => self.unbind(id),
            // Messages only the simulator sends are ignored.
            SimMsg::Connected { .. }
            | SimMsg::Refused { .. }
            | SimMsg::WriteAck { .. }
            | SimMsg::WriteError { .. }
            | SimMsg::Subscribed { .. }
            | SimMsg::Seen
            | SimMsg::Discovered
            | SimMsg::Value { .. } => {}
        }
    }

    /// Do everything due at `now`.
    fn run(&mut self, now: Instant) {
        while let Some((index, fault)) = self.chaos.poll(now) {
            self.inflict(now, index, fault);
        }
        loop {
            let mut progressed = false;
            for lock in self.locks.values_mut() {
                if lock.poll_timeout().is_some_and(|t| t <= now) {
                    lock.handle_timeout(now);
                    progressed = true;
                }
            }
            let ids: Vec<u64> = self.sockets.keys().copied().collect();
            for id in ids {
                progressed |= self.deliver(now, id);
            }
            let serials: Vec<String> = self.locks.keys().cloned().collect();
            for serial in serials {
                progressed |= self.drain_lock(now, &serial);
            }
            if !progressed {
                break;
            }
        }
    }

    fn deliver(&mut self, now: Instant, id: u64) -> bool {
        let mut progressed = false;
        let Some(sock) = self.sockets.get_mut(&id) else {
            return false;
        };
        while sock.later.first().is_some_and(|(at, _)| *at <= now) {
            let (_, msg) = sock.later.remove(0);
            let _ = sock.tx.send(msg);
            progressed = true;
        }
        while let Some((channel, value)) = sock.to_client.pop_due(now) {
            let _ = sock.tx.send(SimMsg::Value { channel, value });
            progressed = true;
        }
        while let Some((channel, value)) = sock.to_lock.pop_due(now) {
            progressed = true;
            if let Some((serial, conn)) = &sock.binding {
                if let Some(lock) = self.locks.get_mut(serial) {
                    lock.write(now, *conn, channel, &value);
                }
            }
        }
        progressed
    }

    fn drain_lock(&mut self, now: Instant, serial: &str) -> bool {
        let Some(lock) = self.locks.get_mut(serial) else {
            return false;
        };
        let mut outputs = Vec::new();
        while let Some(o) = lock.poll_output() {
            outputs.push(o);
        }
        let actuations = lock.take_actuations();
        let progressed = !outputs.is_empty();
        self.event_log.write(&actuations);
        for o in outputs {
            match o {
                Output::Value {
                    conn,
                    channel,
                    bytes,
                } => {
                    let Some(&id) = self.by_conn.get(&(serial.to_string(), conn)) else {
                        continue;
                    };
                    let Some(sock) = self.sockets.get_mut(&id) else {
                        continue;
                    };
                    if in_blackout(&self.blackout, serial, now) {
                        continue;
                    }
                    if sock.to_client.push(now, (channel, bytes)) == Fate::Disconnect {
                        self.cut(id, wire::DISCONNECT_FAULT);
                    }
                }
                Output::Disconnect { conn, reason } => {
                    if let Some(id) = self.by_conn.remove(&(serial.to_string(), conn)) {
                        if let Some(sock) = self.sockets.get_mut(&id) {
                            log::info!(
                                "sim: {serial}: connection {conn} dropped (reason {reason})"
                            );
                            sock.unbound();
                            let _ = sock.tx.send(SimMsg::Disconnect { reason });
                        }
                    }
                }
            }
        }
        progressed
    }

    /// Carry out one fault of the chaos schedule.
    fn inflict(&mut self, now: Instant, index: usize, fault: Fault) {
        let Some(lock) = self.locks.values_mut().nth(index) else {
            return;
        };
        let serial = lock.serial().to_string();
        log::info!("sim: chaos: {serial}: {}", fault.name());
        match fault {
            Fault::LossBurst(d) => {
                self.blackout.insert(serial, now + d);
            }
            Fault::Disconnect => lock.drop_links(wire::DISCONNECT_FAULT),
            Fault::Reboot(d) => lock.reboot(now, d),
            Fault::LoseTime => lock.lose_trusted_time(now),
            Fault::Door => {
                let open = lock.door() != crate::ptls::api::DoorState::Open;
                lock.happen(
                    now,
                    if open {
                        Happening::OpenDoor
                    } else {
                        Happening::CloseDoor
                    },
                );
            }
            Fault::Button => lock.happen(now, Happening::PressButton),
        }
    }

    /// The fault injector cut the link.
    fn cut(&mut self, id: u64, reason: u8) {
        self.unbind(id);
        if let Some(sock) = self.sockets.get(&id) {
            let _ = sock.tx.send(SimMsg::Disconnect { reason });
        }
    }

    fn unbind(&mut self, id: u64) {
        let Some(sock) = self.sockets.get_mut(&id) else {
            return;
        };
        if let Some((serial, conn)) = sock.unbound() {
            if let Some(lock) = self.locks.get_mut(&serial) {
                lock.disconnect(conn);
            }
            self.by_conn.remove(&(serial, conn));
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let locks = self
            .locks
            .values()
            .filter_map(Lock::poll_timeout)
            .chain(self.chaos.next_at());
        let pipes = self
            .sockets
            .values()
            .flat_map(|s| {
                [
                    s.to_lock.next_due(),
                    s.to_client.next_due(),
                    s.later.first().map(|(at, _)| *at),
                ]
            })
            .flatten();
        locks.chain(pipes).min()
    }
}
