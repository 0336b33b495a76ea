//! The client end of the sim socket (design §4.1).

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

use super::{Link, LinkError, LinkEvent};
use crate::ptls::Channel;
use crate::ptls::wire::MIN_ATT_MTU;
use crate::sim::wire::{self, SimMsg, read_msg, write_msg};
use crate::sim::wire::{ListenAddr, Stream};

const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SimLink {
    serial: String,
    att_mtu: u16,
    writer: WriteHalf<Box<dyn Stream>>,
    incoming: mpsc::UnboundedReceiver<SimMsg>,
    /// Values that arrived while a write waited for its acknowledgement.
    pending: VecDeque<LinkEvent>,
    closed: bool,
}

/// Open a stream to the simulator.
async fn open(addr: &ListenAddr) -> Result<Box<dyn Stream>, LinkError> {
    Ok(match addr {
        ListenAddr::Unix(p) => Box::new(UnixStream::connect(p).await?),
        ListenAddr::Tcp(a) => {
            let s = TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
    })
}

/// Whether the simulator's lock `serial` is on the air: what a BLE scan for its advertisement
/// would say, without connecting (PROBE, docs/sim-socket.md).
pub async fn probe(addr: &ListenAddr, serial: &str) -> Result<(), LinkError> {
    let mut stream = open(addr).await?;
    write_msg(
        &mut stream,
        &SimMsg::Probe {
            serial: serial.to_string(),
        },
    )
    .await?;
    match read_msg(&mut stream).await? {
        Some(SimMsg::Seen) => Ok(()),
        Some(SimMsg::Refused { reason }) => Err(LinkError::Refused {
            serial: serial.to_string(),
            reason: match reason {
                wire::REFUSED_UNKNOWN_LOCK => "unknown lock",
                _ => "not advertising (out of range or restarting)",
            },
        }),
        _ => Err(LinkError::Disconnected {
            reason: "unexpected reply to PROBE".into(),
        }),
    }
}

impl SimLink {
    /// Connect to `serial` at the simulator, request `att_mtu`, discover the lock's
    /// characteristics and subscribe to the three the client listens on (spec §1: before
    /// hello).
    pub async fn connect(
        addr: &ListenAddr,
        serial: &str,
        att_mtu: u16,
    ) -> Result<SimLink, LinkError> {
        SimLink::open(addr, serial, att_mtu, false).await
    }

    /// [`SimLink::connect`]; with `handles_cached` the client knows the characteristics from an
    /// earlier connection and skips discovery, as BlueZ does with its GATT cache.
    // A wildcard on purpose: `buffer` sorts every message that is not the awaited reply.
    #[allow(clippy::wildcard_enum_match_arm)]
    pub async fn open(
        addr: &ListenAddr,
        serial: &str,
        att_mtu: u16,
        handles_cached: bool,
    ) -> Result<SimLink, LinkError> {
        let stream = open(addr).await?;
        let (mut reader, writer) = tokio::io::split(stream);
        let (tx, incoming) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = read_msg(&mut reader).await {
                if tx.send(msg).is_err() {
                    break;
                }
            }
        });
        let mut link = SimLink {
            serial: serial.to_string(),
            att_mtu: 0,
            writer,
            incoming,
            pending: VecDeque::new(),
            closed: false,
        };
        link.send(&SimMsg::Connect {
            att_mtu,
            serial: serial.to_string(),
        })
        .await?;
        match link.reply("CONNECTED").await? {
            SimMsg::Connected { att_mtu } => link.att_mtu = att_mtu,
            SimMsg::Refused { reason } => {
                return Err(LinkError::Refused {
                    serial: serial.to_string(),
                    reason: match reason {
                        wire::REFUSED_UNKNOWN_LOCK => "unknown lock",
                        wire::REFUSED_TOO_MANY => "too many connections",
                        _ => "lock busy or out of range",
                    },
                });
            }
            SimMsg::Connect { .. }
            | SimMsg::Probe { .. }
            | SimMsg::Seen
            | SimMsg::Discover
            | SimMsg::Discovered
            | SimMsg::Write { .. }
            | SimMsg::WriteAck { .. }
            | SimMsg::WriteError { .. }
            | SimMsg::Subscribe { .. }
            | SimMsg::Subscribed { .. }
            | SimMsg::Value { .. }
            | SimMsg::Disconnect { .. } => {
                return Err(LinkError::Disconnected {
                    reason: "unexpected reply to CONNECT".into(),
                });
            }
        }
        if link.att_mtu < MIN_ATT_MTU {
            link.close().await;
            return Err(LinkError::MtuTooSmall {
                serial: serial.to_string(),
                mtu: link.att_mtu,
            });
        }
        if !handles_cached {
            link.send(&SimMsg::Discover).await?;
            loop {
                match link.reply("DISCOVERED").await? {
                    SimMsg::Discovered => break,
                    other => link.buffer(other)?,
                }
            }
        }
        // All three before hello (spec §1), PTLS_TX first.
        for channel in [
            Channel::PtlsTx,
            Channel::ApiCommands,
            Channel::Notifications,
        ] {
            link.send(&SimMsg::Subscribe { channel, on: true }).await?;
            loop {
                match link.reply("SUBSCRIBED").await? {
                    SimMsg::Subscribed { channel: c } if c == channel => break,
                    other => link.buffer(other)?,
                }
            }
        }
        Ok(link)
    }

    pub fn serial(&self) -> &str {
        &self.serial
    }

    async fn send(&mut self, msg: &SimMsg) -> Result<(), LinkError> {
        if self.closed {
            return Err(LinkError::Disconnected {
                reason: "closed".into(),
            });
        }
        if let Err(e) = write_msg(&mut self.writer, msg).await {
            self.closed = true;
            let reason = self.stated_reason().await.unwrap_or_else(|| e.to_string());
            return Err(LinkError::Disconnected { reason });
        }
        Ok(())
    }

    /// After a failed write: the simulator usually said why it closed before closing, and that
    /// message may be waiting in the queue. Values before it are kept for `recv`.
    async fn stated_reason(&mut self) -> Option<String> {
        let wait = Duration::from_millis(200);
        while let Ok(Some(msg)) = tokio::time::timeout(wait, self.incoming.recv()).await {
            if let SimMsg::Disconnect { reason } = msg {
                return Some(disconnect_reason(reason).to_string());
            }
            let _ = self.buffer(msg);
        }
        None
    }

    async fn reply(&mut self, what: &'static str) -> Result<SimMsg, LinkError> {
        match tokio::time::timeout(REPLY_TIMEOUT, self.incoming.recv()).await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(LinkError::Disconnected {
                reason: "socket closed".into(),
            }),
            Err(_) => Err(LinkError::Timeout(what)),
        }
    }

    /// Keep a value (or a disconnect) that arrived while waiting for something else.
    fn buffer(&mut self, msg: SimMsg) -> Result<(), LinkError> {
        match msg {
            SimMsg::Value { channel, value } => {
                self.pending.push_back(LinkEvent::Value { channel, value });
                Ok(())
            }
            SimMsg::Disconnect { reason } => {
                self.closed = true;
                let reason = disconnect_reason(reason).to_string();
                self.pending.push_back(LinkEvent::Disconnected {
                    reason: reason.clone(),
                });
                Err(LinkError::Disconnected { reason })
            }
            // A reply out of turn (a late ack after a timeout): nothing waits for it.
            SimMsg::Connect { .. }
            | SimMsg::Connected { .. }
            | SimMsg::Refused { .. }
            | SimMsg::Probe { .. }
            | SimMsg::Seen
            | SimMsg::Discover
            | SimMsg::Discovered
            | SimMsg::Write { .. }
            | SimMsg::WriteAck { .. }
            | SimMsg::WriteError { .. }
            | SimMsg::Subscribe { .. }
            | SimMsg::Subscribed { .. } => Ok(()),
        }
    }
}

fn disconnect_reason(reason: u8) -> &'static str {
    match reason {
        wire::DISCONNECT_NORMAL => "normal",
        wire::DISCONNECT_IDLE => "idle",
        wire::DISCONNECT_HELLO_TIMEOUT => "hello timeout",
        wire::DISCONNECT_FAULT => "link fault",
        _ => "unknown",
    }
}

impl Link for SimLink {
    fn att_mtu(&self) -> u16 {
        self.att_mtu
    }

    // A wildcard on purpose: `buffer` sorts every message that is not the awaited reply.

    #[allow(clippy::wildcard_enum_match_arm)]
    async fn write(&mut self, channel: Channel, value: &[u8]) -> Result<(), LinkError> {
        self.send(&SimMsg::Write {
            channel,
            with_response: true,
            value: value.to_vec(),
        })
        .await?;
        loop {
            match self.reply("WRITE_ACK").await? {
                SimMsg::WriteAck { channel: c } if c == channel => return Ok(()),
                SimMsg::WriteError {
                    channel: c,
                    att_error,
                } if c == channel => {
                    return Err(LinkError::NotDelivered {
                        reason: format!(
                            "the lock refused a {}-byte value on {channel:?} (ATT error 0x{att_error:02x}; ATT MTU {})",
                            value.len(),
                            self.att_mtu
                        ),
                    });
                }
                other => self.buffer(other)?,
            }
        }
    }

    async fn recv(&mut self) -> LinkEvent {
        if let Some(e) = self.pending.pop_front() {
            return e;
        }
        if self.closed {
            return LinkEvent::Disconnected {
                reason: "closed".into(),
            };
        }
        loop {
            match self.incoming.recv().await {
                Some(SimMsg::Value { channel, value }) => {
                    return LinkEvent::Value { channel, value };
                }
                Some(SimMsg::Disconnect { reason }) => {
                    self.closed = true;
                    return LinkEvent::Disconnected {
                        reason: disconnect_reason(reason).to_string(),
                    };
                }
                Some(_) => continue,
                None => {
                    self.closed = true;
                    return LinkEvent::Disconnected {
                        reason: "socket closed".into(),
                    };
                }
            }
        }
    }

    async fn close(&mut self) {
        if !self.closed {
            let _ = self
                .send(&SimMsg::Disconnect {
                    reason: wire::DISCONNECT_NORMAL,
                })
                .await;
            let _ = self.writer.shutdown().await;
            self.closed = true;
        }
    }
}

/// Opens [`SimLink`]s to the simulator at `addr`, discovering each lock's characteristics on
/// its first connection only (the handle cache a BLE host keeps).
pub struct SimConnector {
    addr: ListenAddr,
    /// Serials whose characteristics are known from an earlier connection.
    discovered: Mutex<HashSet<String>>,
}

impl SimConnector {
    pub fn new(addr: ListenAddr) -> SimConnector {
        SimConnector {
            addr,
            discovered: Mutex::new(HashSet::new()),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.discovered.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl super::Connector for SimConnector {
    type Link = SimLink;
    async fn connect(&self, serial: &str, att_mtu: u16) -> Result<SimLink, LinkError> {
        let cached = self.known().contains(serial);
        let link = SimLink::open(&self.addr, serial, att_mtu, cached).await;
        match &link {
            Ok(_) => {
                self.known().insert(serial.to_string());
            }
            // Not connected at all: what was known still holds.
            Err(LinkError::Refused { .. }) => {}
            // A set-up that failed part way starts from discovery next time.
            Err(_) => {
                self.known().remove(serial);
            }
        }
        link
    }

    async fn probe(&self, serial: &str) -> Result<(), LinkError> {
        probe(&self.addr, serial).await
    }
}
