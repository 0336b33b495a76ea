//! The sim socket (design §4.1): a BLE link over a local stream socket.
//!
//! Each message is `KIND(1) ‖ u16 LEN ‖ PAYLOAD`. One socket connection is one BLE connection.
//! The format is documented in `docs/sim-socket.md` so other tools can drive the simulator.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ptls::Channel;
use crate::ptls::wire::{Malformed, Reader, malformed};

/// Where the sim socket listens: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            return addr
                .parse()
                .map(ListenAddr::Tcp)
                .map_err(|_| format!("{addr:?} is not HOST:PORT (for example 127.0.0.1:7400)"));
        }
        Err(format!("{s:?}: expected unix:PATH or tcp:127.0.0.1:PORT"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A stream the sim socket runs over (Unix or TCP).
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

pub const CONNECT: u8 = 0x01;
pub const CONNECTED: u8 = 0x02;
pub const REFUSED: u8 = 0x03;
pub const PROBE: u8 = 0x04;
pub const SEEN: u8 = 0x05;
pub const DISCOVER: u8 = 0x06;
pub const DISCOVERED: u8 = 0x07;
pub const WRITE: u8 = 0x10;
pub const WRITE_ACK: u8 = 0x11;
pub const WRITE_ERROR: u8 = 0x14;
pub const SUBSCRIBE: u8 = 0x12;
pub const SUBSCRIBED: u8 = 0x13;
pub const VALUE: u8 = 0x20;
pub const DISCONNECT: u8 = 0x30;

/// Reasons carried by REFUSED.
pub const REFUSED_UNKNOWN_LOCK: u8 = 1;
pub const REFUSED_TOO_MANY: u8 = 2;
pub const REFUSED_BUSY: u8 = 3;
/// The ATT error WRITE_ERROR carries for a value longer than `ATT_MTU − 3`.
pub const ATT_INVALID_VALUE_LENGTH: u8 = 0x0D;
/// Reasons carried by DISCONNECT.
pub const DISCONNECT_NORMAL: u8 = 0;
pub const DISCONNECT_IDLE: u8 = 1;
pub const DISCONNECT_HELLO_TIMEOUT: u8 = 2;
pub const DISCONNECT_FAULT: u8 = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimMsg {
    Connect {
        att_mtu: u16,
        serial: String,
    },
    Connected {
        att_mtu: u16,
    },
    Refused {
        reason: u8,
    },
    /// Is the lock on the air? The advertisement a scan would see, without a connection.
    Probe {
        serial: String,
    },
    /// The lock advertises (answers PROBE; REFUSED says it does not).
    Seen,
    /// GATT discovery: find the lock's characteristics (a client that cached them skips it).
    Discover,
    Discovered,
    Write {
        channel: Channel,
        with_response: bool,
        value: Vec<u8>,
    },
    WriteAck {
        channel: Channel,
    },
    /// A write with response the lock's ATT server refused (the value never reached the lock).
    WriteError {
        channel: Channel,
        att_error: u8,
    },
    Subscribe {
        channel: Channel,
        on: bool,
    },
    Subscribed {
        channel: Channel,
    },
    Value {
        channel: Channel,
        value: Vec<u8>,
    },
    Disconnect {
        reason: u8,
    },
}

impl SimMsg {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, Vec<u8>) = match self {
            SimMsg::Connect { att_mtu, serial } => {
                let mut p = att_mtu.to_be_bytes().to_vec();
                p.extend_from_slice(serial.as_bytes());
                (CONNECT, p)
            }
            SimMsg::Connected { att_mtu } => (CONNECTED, att_mtu.to_be_bytes().to_vec()),
            SimMsg::Refused { reason } => (REFUSED, vec![*reason]),
            SimMsg::Probe { serial } => (PROBE, serial.as_bytes().to_vec()),
            SimMsg::Seen => (SEEN, Vec::new()),
            SimMsg::Discover => (DISCOVER, Vec::new()),
            SimMsg::Discovered => (DISCOVERED, Vec::new()),
            SimMsg::Write {
                channel,
                with_response,
                value,
            } => {
                let mut p = vec![channel.short(), u8::from(*with_response)];
                p.extend_from_slice(value);
                (WRITE, p)
            }
            SimMsg::WriteAck { channel } => (WRITE_ACK, vec![channel.short()]),
            SimMsg::WriteError { channel, att_error } => {
                (WRITE_ERROR, vec![channel.short(), *att_error])
            }
            SimMsg::Subscribe { channel, on } => (SUBSCRIBE, vec![channel.short(), u8::from(*on)]),
            SimMsg::Subscribed { channel } => (SUBSCRIBED, vec![channel.short()]),
            SimMsg::Value { channel, value } => {
                let mut p = vec![channel.short()];
                p.extend_from_slice(value);
                (VALUE, p)
            }
            SimMsg::Disconnect { reason } => (DISCONNECT, vec![*reason]),
        };
        // Values are at most an ATT MTU (≤ 517 bytes); serials are 15 characters.
        let len = u16::try_from(payload.len()).expect("sim messages are small");
        let mut out = Vec::with_capacity(3 + payload.len());
        out.push(kind);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    pub fn decode(kind: u8, payload: &[u8]) -> Result<SimMsg, Malformed> {
        let mut r = Reader::new(payload, "sim socket message");
        let channel = |r: &mut Reader| -> Result<Channel, Malformed> {
            Channel::from_short(r.u8()?).ok_or(malformed("sim socket characteristic"))
        };
        // WITH_RESPONSE and ON are 0 or 1; anything else is a broken peer, not "yes".
        let flag = |r: &mut Reader| -> Result<bool, Malformed> {
            match r.u8()? {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(malformed("sim socket flag (0 or 1)")),
            }
        };
        let msg = match kind {
            CONNECT => {
                let att_mtu = r.u16()?;
                let serial = std::str::from_utf8(r.rest())
                    .map_err(|_| malformed("sim socket serial"))?
                    .to_string();
                SimMsg::Connect { att_mtu, serial }
            }
            CONNECTED => SimMsg::Connected { att_mtu: r.u16()? },
            REFUSED => SimMsg::Refused { reason: r.u8()? },
            PROBE => SimMsg::Probe {
                serial: std::str::from_utf8(r.rest())
                    .map_err(|_| malformed("sim socket serial"))?
                    .to_string(),
            },
            SEEN => SimMsg::Seen,
            DISCOVER => SimMsg::Discover,
            DISCOVERED => SimMsg::Discovered,
            WRITE => {
                let channel = channel(&mut r)?;
                let with_response = flag(&mut r)?;
                SimMsg::Write {
                    channel,
                    with_response,
                    value: r.rest().to_vec(),
                }
            }
            WRITE_ACK => SimMsg::WriteAck {
                channel: channel(&mut r)?,
            },
            WRITE_ERROR => SimMsg::WriteError {
                channel: channel(&mut r)?,
                att_error: r.u8()?,
            },
            SUBSCRIBE => {
                let channel = channel(&mut r)?;
                SimMsg::Subscribe {
                    channel,
                    on: flag(&mut r)?,
                }
            }
            SUBSCRIBED => SimMsg::Subscribed {
                channel: channel(&mut r)?,
            },
            VALUE => {
                let channel = channel(&mut r)?;
                SimMsg::Value {
                    channel,
                    value: r.rest().to_vec(),
                }
            }
            DISCONNECT => SimMsg::Disconnect { reason: r.u8()? },
            _ => return Err(malformed("sim socket message kind")),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Read one message; `Ok(None)` at a clean end of stream.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<SimMsg>> {
    let mut head = [0u8; 3];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    SimMsg::decode(head[0], &payload)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &SimMsg) -> io::Result<()> {
    w.write_all(&msg.encode()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    // Found by fuzzing (sim_socket): a flag byte of 53 decoded as true and re-encoded as 1.
    #[test]
    fn flags_other_than_0_or_1_are_malformed() {
        assert!(SimMsg::decode(WRITE, &[4, 53, 0x03]).is_err());
        assert!(SimMsg::decode(SUBSCRIBE, &[3, 2]).is_err());
        assert_eq!(
            SimMsg::decode(WRITE, &[4, 1, 0x03]).unwrap(),
            SimMsg::Write {
                channel: Channel::PtlsRx,
                with_response: true,
                value: vec![0x03],
            }
        );
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = [
            SimMsg::Connect {
                att_mtu: 247,
                serial: "12345678-901234".into(),
            },
            SimMsg::Connected { att_mtu: 185 },
            SimMsg::Refused { reason: 2 },
            SimMsg::Discover,
            SimMsg::Discovered,
            SimMsg::Write {
                channel: Channel::PtlsRx,
                with_response: true,
                value: vec![3, 1, 2],
            },
            SimMsg::WriteAck {
                channel: Channel::ApiCommands,
            },
            SimMsg::Subscribe {
                channel: Channel::Notifications,
                on: true,
            },
            SimMsg::Subscribed {
                channel: Channel::PtlsTx,
            },
            SimMsg::Value {
                channel: Channel::PtlsTx,
                value: vec![8, 0, 0, 0, 1],
            },
            SimMsg::Disconnect { reason: 1 },
        ];
        for m in msgs {
            let bytes = m.encode();
            let len = u16::from_be_bytes([bytes[1], bytes[2]]) as usize;
            assert_eq!(len, bytes.len() - 3);
            assert_eq!(SimMsg::decode(bytes[0], &bytes[3..]).unwrap(), m);
        }
    }

    #[test]
    fn connect_example_bytes() {
        // CONNECT, length 17, MTU 247, serial.
        let m = SimMsg::Connect {
            att_mtu: 247,
            serial: "12345678-901234".into(),
        };
        let mut want = vec![0x01, 0x00, 0x11, 0x00, 0xF7];
        want.extend_from_slice(b"12345678-901234");
        assert_eq!(m.encode(), want);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(SimMsg::decode(0x99, &[]).is_err());
        assert!(SimMsg::decode(WRITE, &[2, 1]).is_err()); // characteristic 2 does not exist
        assert!(SimMsg::decode(CONNECTED, &[1]).is_err());
        assert!(SimMsg::decode(REFUSED, &[1, 2]).is_err());
    }
}
