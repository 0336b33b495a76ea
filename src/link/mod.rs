//! Lock links: byte pipes only, no protocol logic. A link carries values tagged with their
//! characteristic, reports disconnects and knows the negotiated ATT MTU. Implementations:
//! [`sim::SimLink`] (the sim socket) and [`ble::BleLink`] (BlueZ through `bluer`), each opened
//! by its [`Connector`].

pub mod ble;
pub mod sim;

use std::future::Future;

use crate::ptls::Channel;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A notification or indication.
    Value { channel: Channel, value: Vec<u8> },
    /// The link is gone (the lock's reason when it gave one).
    Disconnected { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("lock {serial} refused the connection: {reason}")]
    Refused {
        serial: String,
        reason: &'static str,
    },
    #[error("link to {serial}: ATT MTU {mtu} is below the minimum of 156 (mtu-too-small)")]
    MtuTooSmall { serial: String, mtu: u16 },
    #[error("link disconnected: {reason}")]
    Disconnected { reason: String },
    /// The write provably did not reach the lock (the stack could not route it).
    #[error("write not delivered: {reason}")]
    NotDelivered { reason: String },
    #[error("link timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("link I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("BlueZ: {op}: {message}")]
    Ble { op: &'static str, message: String },
    #[error("lock {serial} not found: nothing advertises {uuid} (is it in range and awake?)")]
    NotFound { serial: String, uuid: String },
}

/// One BLE connection to one lock, subscribed to PTLS_TX, API_COMMANDS and NOTIFICATIONS.
pub trait Link: Send {
    fn att_mtu(&self) -> u16;
    /// Signal strength when the link came up, where the transport knows it.
    fn rssi(&self) -> Option<i16> {
        None
    }
    /// Write with response; resolves when the lock acknowledged the write.
    fn write(
        &mut self,
        channel: Channel,
        value: &[u8],
    ) -> impl Future<Output = Result<(), LinkError>> + Send;
    /// The next value or the disconnect. Cancel-safe: nothing is lost if the future is dropped.
    fn recv(&mut self) -> impl Future<Output = LinkEvent> + Send;
    /// Disconnect on purpose.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// Opens links to locks — the sim socket or BlueZ — behind one interface.
pub trait Connector: Send + Sync + 'static {
    type Link: Link + 'static;
    fn connect(
        &self,
        serial: &str,
        att_mtu: u16,
    ) -> impl Future<Output = Result<Self::Link, LinkError>> + Send;

    /// Whether the lock is on the air now — its advertisement is heard — without connecting.
    fn probe(&self, serial: &str) -> impl Future<Output = Result<(), LinkError>> + Send;
}
