//! The BlueZ link (design §4): locks reached through BlueZ over D-Bus with `bluer`.
//!
//! Per connection: find the lock by its serial-derived UUID (or address) with an LE discovery
//! filter, connect with a timeout and bounded retries, wait for `ServicesResolved`, find the
//! lock service and its four characteristics, check the MTU, subscribe to PTLS_TX,
//! API_COMMANDS and NOTIFICATIONS, then write with response (`write_ext` with
//! `WriteOp::Request`; bluer's plain `write` is write-without-response). One D-Bus method call
//! per frame written; values arrive as signals.
//!
//! After the first connection the connector remembers the lock's address and its
//! characteristics' object ids: the next connection neither scans nor lists BlueZ's objects
//! (BlueZ keeps the device and its GATT database between connections). Anything that fails on
//! what was remembered forgets it, and the next attempt starts from the scan.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bluer::gatt::WriteOp;
use bluer::gatt::remote::{Characteristic, CharacteristicWriteRequest};
use bluer::{
    Adapter, AdapterEvent, Address, Device, DeviceEvent, DeviceProperty, DiscoveryFilter,
    DiscoveryTransport,
};
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{Link, LinkError, LinkEvent};
use crate::ptls::Channel;
use crate::ptls::gatt;
use crate::ptls::wire::MIN_ATT_MTU;

/// Connection attempts before the device is removed from the adapter and the error reported.
const CONNECT_ATTEMPTS: u32 = 3;
const DISCOVERY_LIMIT: Duration = Duration::from_secs(30);
const RESOLVE_LIMIT: Duration = Duration::from_secs(15);

fn ble(op: &'static str) -> impl FnOnce(bluer::Error) -> LinkError {
    move |e| LinkError::Ble {
        op,
        message: e.to_string(),
    }
}

/// BlueZ's errors that a retry usually cures.
pub fn is_transient(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("le-connection-abort-by-local")
        || m.contains("inprogress")
        || m.contains("in progress")
        || m.contains("software caused connection abort")
        || m.contains("connection attempt failed")
}

/// D-Bus and BlueZ errors that prove a write never left the gateway: the object or the peer
/// was not there to send it to. Anything else (a timeout, an ATT error) may have reached the
/// lock and is treated as such.
pub fn never_sent(message: &str) -> bool {
    [
        "ServiceUnknown",
        "UnknownObject",
        "UnknownMethod",
        "NotConnected",
        "Not connected",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// Opens links through one adapter (by name, or the default adapter).
pub struct BleConnector {
    session: bluer::Session,
    adapter: Option<String>,
    connect_timeout: Duration,
    /// What earlier connections found, by serial.
    known: Mutex<HashMap<String, Known>>,
    /// One LE discovery at a time: BlueZ refuses a new discovery filter while one is active,
    /// so locks looked up together would fail and back off.
    discovery: tokio::sync::Mutex<()>,
}

/// Where a lock is and its characteristics' object ids, from a connection that worked.
#[derive(Clone, Copy, Debug)]
struct Known {
    address: Address,
    service: u16,
    notifications: u16,
    ptls_tx: u16,
    ptls_rx: u16,
    api: u16,
}

impl BleConnector {
    /// Connect to BlueZ on the system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured).
    pub async fn new(adapter: &str, connect_timeout: Duration) -> Result<BleConnector, LinkError> {
        let session = bluer::Session::new().await.map_err(|e| LinkError::Ble {
            op: "connecting to BlueZ on the system D-Bus",
            message: format!("{e}; is bluetoothd running (systemctl status bluetooth)?"),
        })?;
        Ok(BleConnector {
            session,
            adapter: (!adapter.is_empty()).then(|| adapter.to_string()),
            connect_timeout: connect_timeout.max(Duration::from_secs(10)),
            known: Mutex::new(HashMap::new()),
            discovery: tokio::sync::Mutex::new(()),
        })
    }

    fn known(&self, serial: &str) -> Option<Known> {
        self.remembered().get(serial).copied()
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, HashMap<String, Known>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The adapter, looked up on every connection so one that went away and came back is used
    /// again.
    async fn adapter(&self) -> Result<Adapter, LinkError> {
        let adapter = match &self.adapter {
            Some(name) => self
                .session
                .adapter(name)
                .map_err(ble("opening the adapter"))?,
            None => self
                .session
                .default_adapter()
                .await
                .map_err(ble("finding the default adapter"))?,
        };
        if !adapter.is_powered().await.map_err(|e| LinkError::Ble {
            op: "reading the adapter",
            message: format!(
                "{}: {e} (is the adapter present? `bluetoothctl list`)",
                adapter.name()
            ),
        })? {
            adapter
                .set_powered(true)
                .await
                .map_err(ble("powering the adapter on"))?;
        }
        Ok(adapter)
    }

    /// The device remembered from an earlier connection, or one BlueZ knows with the lock's
    /// serial UUID, else discover one with an LE filter.
    async fn find(&self, adapter: &Adapter, serial: &str) -> Result<Device, LinkError> {
        if let Some(known) = self.known(serial) {
            return adapter
                .device(known.address)
                .map_err(ble("opening the device"));
        }
        if let Ok(address) = serial.parse::<Address>() {
            return adapter.device(address).map_err(ble("opening the device"));
        }
        let uuid: Uuid = gatt::serial_uuid(serial)
            .map_err(|e| LinkError::Ble {
                op: "deriving the advertised UUID",
                message: e.to_string(),
            })?
            .parse()
            .map_err(|_| LinkError::Ble {
                op: "deriving the advertised UUID",
                message: serial.to_string(),
            })?;
        // Held to the end of the search; a lookup that waited for another one may find its
        // device known by then.
        let _one_discovery = self.discovery.lock().await;
        for address in adapter
            .device_addresses()
            .await
            .map_err(ble("listing devices"))?
        {
            let device = adapter.device(address).map_err(ble("opening the device"))?;
            if has_uuid(&device, &uuid).await {
                return Ok(device);
            }
        }
        let mut events = le_discovery(adapter, [uuid].into()).await?;
        let search = async {
            while let Some(ev) = events.next().await {
                if let AdapterEvent::DeviceAdded(address) = ev {
                    if let Ok(device) = adapter.device(address) {
                        if has_uuid(&device, &uuid).await {
                            return Some(device);
                        }
                    }
                }
            }
            None
        };
        match tokio::time::timeout(DISCOVERY_LIMIT, search).await {
            Ok(Some(device)) => Ok(device),
            _ => Err(LinkError::NotFound {
                serial: serial.to_string(),
                uuid: uuid.to_string(),
            }),
        }
    }

    async fn connect_device(&self, adapter: &Adapter, device: &Device) -> Result<(), LinkError> {
        // A new link starts from a clean device: one still marked connected is a leftover
        // whose GATT objects may be stale.
        if device.is_connected().await.unwrap_or(false) {
            let _ = device.disconnect().await;
        }
        let mut last = String::new();
        for attempt in 1..=CONNECT_ATTEMPTS {
            match tokio::time::timeout(self.connect_timeout, device.connect()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => {
                    last = e.to_string();
                    if !is_transient(&last) && attempt == CONNECT_ATTEMPTS {
                        break;
                    }
                    log::debug!("connect {} attempt {attempt}: {last}", device.address());
                }
                Err(_) => last = format!("no connection within {:?}", self.connect_timeout),
            }
            tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt))).await;
        }
        // BlueZ sometimes keeps a device stuck after failed attempts; removing it clears that.
        let _ = adapter.remove_device(device.address()).await;
        Err(LinkError::Ble {
            op: "connecting",
            message: format!(
                "{} after {CONNECT_ATTEMPTS} attempts: {last}",
                device.address()
            ),
        })
    }
}

/// An LE discovery session, for advertisements of `uuids` (any when empty): its events until
/// dropped.
async fn le_discovery(
    adapter: &Adapter,
    uuids: std::collections::HashSet<Uuid>,
) -> Result<std::pin::Pin<Box<impl Stream<Item = AdapterEvent>>>, LinkError> {
    adapter
        .set_discovery_filter(DiscoveryFilter {
            transport: DiscoveryTransport::Le,
            uuids,
            ..Default::default()
        })
        .await
        .map_err(ble("setting the LE discovery filter"))?;
    let events = adapter
        .discover_devices()
        .await
        .map_err(ble("starting discovery"))?;
    Ok(Box::pin(events))
}

async fn has_uuid(device: &Device, uuid: &Uuid) -> bool {
    device
        .uuids()
        .await
        .ok()
        .flatten()
        .is_some_and(|u| u.contains(uuid))
}

type DeviceEvents = std::pin::Pin<Box<dyn Stream<Item = DeviceEvent> + Send>>;

/// Wait for BlueZ to say the device's services are resolved: the property changing, not a
/// poll. `events` was subscribed before the property is read, so the change cannot be missed.
// A wildcard on purpose: bluer's property list is open-ended and only two of them matter here.
#[allow(clippy::wildcard_enum_match_arm)]
async fn wait_resolved(device: &Device, events: &mut DeviceEvents) -> Result<(), LinkError> {
    if device
        .is_services_resolved()
        .await
        .map_err(ble("reading ServicesResolved"))?
    {
        return Ok(());
    }
    let resolved = async {
        while let Some(DeviceEvent::PropertyChanged(p)) = events.next().await {
            match p {
                DeviceProperty::ServicesResolved(true) => return Ok(()),
                DeviceProperty::Connected(false) => {
                    return Err(LinkError::Disconnected {
                        reason: "the lock disconnected before its services were resolved".into(),
                    });
                }
                _ => {}
            }
        }
        Err(LinkError::Disconnected {
            reason: "BlueZ stopped reporting the device".into(),
        })
    };
    tokio::time::timeout(RESOLVE_LIMIT, resolved)
        .await
        .map_err(|_| LinkError::Timeout("ServicesResolved"))?
}

/// The lock service's four characteristics.
struct LockChars {
    notifications: Characteristic,
    ptls_tx: Characteristic,
    ptls_rx: Characteristic,
    api: Characteristic,
}

impl LockChars {
    /// The characteristics by the ids an earlier connection found (no D-Bus call).
    async fn recalled(device: &Device, k: &Known) -> Result<LockChars, LinkError> {
        let service = device
            .service(k.service)
            .await
            .map_err(ble("opening the lock service"))?;
        let service = &service;
        let open = move |id| async move {
            service
                .characteristic(id)
                .await
                .map_err(ble("opening a characteristic"))
        };
        Ok(LockChars {
            notifications: open(k.notifications).await?,
            ptls_tx: open(k.ptls_tx).await?,
            ptls_rx: open(k.ptls_rx).await?,
            api: open(k.api).await?,
        })
    }

    fn remember(&self, address: Address) -> Known {
        Known {
            address,
            service: self.ptls_rx.service_id(),
            notifications: self.notifications.id(),
            ptls_tx: self.ptls_tx.id(),
            ptls_rx: self.ptls_rx.id(),
            api: self.api.id(),
        }
    }
}

async fn lock_chars(device: &Device) -> Result<LockChars, LinkError> {
    let service_uuid: Uuid = gatt::SERVICE_UUID
        .parse()
        .map_err(|_| LinkError::Timeout("service UUID"))?;
    let want = |c: Channel| c.uuid().parse::<Uuid>().ok();
    for service in device.services().await.map_err(ble("listing services"))? {
        if service.uuid().await.map_err(ble("reading a service"))? != service_uuid {
            continue;
        }
        let (mut n, mut tx, mut rx, mut api) = (None, None, None, None);
        for c in service
            .characteristics()
            .await
            .map_err(ble("listing characteristics"))?
        {
            let u = c.uuid().await.map_err(ble("reading a characteristic"))?;
            if Some(u) == want(Channel::Notifications) {
                n = Some(c);
            } else if Some(u) == want(Channel::PtlsTx) {
                tx = Some(c);
            } else if Some(u) == want(Channel::PtlsRx) {
                rx = Some(c);
            } else if Some(u) == want(Channel::ApiCommands) {
                api = Some(c);
            }
        }
        if let (Some(notifications), Some(ptls_tx), Some(ptls_rx), Some(api)) = (n, tx, rx, api) {
            return Ok(LockChars {
                notifications,
                ptls_tx,
                ptls_rx,
                api,
            });
        }
    }
    Err(LinkError::Ble {
        op: "finding the lock service",
        message: format!(
            "{} has no service {} with the four lock characteristics",
            device.address(),
            gatt::SERVICE_UUID
        ),
    })
}

/// A Tedee lock BlueZ knows of after a scan.
#[derive(Debug, serde::Serialize)]
pub struct Heard {
    /// From the advertised serial UUID; `None` when only the lock service was advertised.
    pub serial: Option<String>,
    pub address: String,
    pub name: Option<String>,
    /// `None`: known to BlueZ but not heard during the scan (out of range or off).
    pub rssi: Option<i16>,
}

impl BleConnector {
    /// Listen for `window` with an LE scan and report every Tedee lock BlueZ knows of: those
    /// advertising a serial UUID (ptls-spec §1) or the lock service, strongest first.
    pub async fn scan(&self, window: Duration) -> Result<Vec<Heard>, LinkError> {
        let adapter = self.adapter().await?;
        let _one_discovery = self.discovery.lock().await;
        let mut events = le_discovery(&adapter, Default::default()).await?;
        let mut seen = std::collections::BTreeSet::new();
        let listen = async {
            while let Some(ev) = events.next().await {
                if let AdapterEvent::DeviceAdded(address) = ev {
                    seen.insert(address);
                }
            }
        };
        let _ = tokio::time::timeout(window, listen).await;
        drop(events);
        let service: Uuid = gatt::SERVICE_UUID.parse().map_err(|_| LinkError::Ble {
            op: "parsing the service UUID",
            message: gatt::SERVICE_UUID.into(),
        })?;
        let mut heard = Vec::new();
        for address in seen {
            let Ok(device) = adapter.device(address) else {
                continue;
            };
            let uuids = device.uuids().await.ok().flatten().unwrap_or_default();
            let serial = uuids
                .iter()
                .find_map(|u| gatt::serial_from_uuid(&u.to_string()));
            if serial.is_none() && !uuids.contains(&service) {
                continue;
            }
            heard.push(Heard {
                serial,
                address: address.to_string(),
                name: device.name().await.ok().flatten(),
                rssi: device.rssi().await.ok().flatten(),
            });
        }
        heard.sort_by_key(|h| std::cmp::Reverse(h.rssi.unwrap_or(i16::MIN)));
        Ok(heard)
    }
}

/// How long a presence probe listens for the lock's advertisement (Tedee locks advertise
/// several times a second).
const PROBE_WINDOW: Duration = Duration::from_secs(5);

impl super::Connector for BleConnector {
    type Link = BleLink;

    /// The lock is present when BlueZ reports its signal during a short LE scan (BlueZ keeps
    /// a device's RSSI only while it is being heard), or it is connected.
    async fn probe(&self, serial: &str) -> Result<(), LinkError> {
        let adapter = self.adapter().await?;
        let device = self.find(&adapter, serial).await?;
        if device.is_connected().await.unwrap_or(false) {
            return Ok(());
        }
        let _one_discovery = self.discovery.lock().await;
        let events = adapter
            .discover_devices()
            .await
            .map_err(ble("starting discovery"))?;
        let mut events = Box::pin(events);
        let heard = async {
            loop {
                if device.rssi().await.ok().flatten().is_some() {
                    return;
                }
                // Any adapter event (a device seen, a property changed) is a moment to look.
                if events.next().await.is_none() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(PROBE_WINDOW, heard)
            .await
            .map_err(|_| LinkError::NotFound {
                serial: serial.to_string(),
                uuid: format!("no advertisement within {PROBE_WINDOW:?}"),
            })
    }

    async fn connect(&self, serial: &str, att_mtu: u16) -> Result<BleLink, LinkError> {
        let adapter = self.adapter().await?;
        let known = self.known(serial);
        let device = self.find(&adapter, serial).await?;
        if let Err(e) = self.connect_device(&adapter, &device).await {
            self.remembered().remove(serial);
            return Err(e);
        }
        let link = async {
            // Subscribed before ServicesResolved is read, so its change cannot be missed; the
            // same events then tell the link about a disconnect.
            let mut device_events: DeviceEvents =
                Box::pin(device.events().await.map_err(ble("watching the device"))?);
            wait_resolved(&device, &mut device_events).await?;
            let chars = match &known {
                Some(k) => LockChars::recalled(&device, k).await?,
                None => lock_chars(&device).await?,
            };
            let mtu = chars.ptls_rx.mtu().await.map_err(ble("reading the MTU"))?;
            let mtu = u16::try_from(mtu).unwrap_or(u16::MAX).min(att_mtu);
            if mtu < MIN_ATT_MTU {
                return Err(LinkError::MtuTooSmall {
                    serial: serial.to_string(),
                    mtu,
                });
            }
            // Subscribe before hello (spec §1); notify() is the tested path (no AcquireNotify).
            let tx = chars
                .ptls_tx
                .notify()
                .await
                .map_err(ble("subscribing to PTLS_TX"))?;
            let api = chars
                .api
                .notify()
                .await
                .map_err(ble("subscribing to API_COMMANDS"))?;
            let notes = chars
                .notifications
                .notify()
                .await
                .map_err(ble("subscribing to NOTIFICATIONS"))?;
            let (events_tx, events) = mpsc::unbounded_channel();
            let remembered = chars.remember(device.address());
            let forwarder = tokio::spawn(forward(tx, api, notes, device_events, events_tx));
            let rssi = device.rssi().await.ok().flatten();
            self.remembered().insert(serial.to_string(), remembered);
            Ok(BleLink {
                device: device.clone(),
                ptls_rx: chars.ptls_rx,
                api: chars.api,
                att_mtu: mtu,
                events,
                forwarder,
                closed: false,
                rssi,
            })
        };
        match link.await {
            Ok(link) => Ok(link),
            Err(e) => {
                // Set-up failed on a connected device: clear it so the next attempt discovers
                // and resolves it afresh.
                self.remembered().remove(serial);
                let _ = device.disconnect().await;
                let _ = adapter.remove_device(device.address()).await;
                Err(e)
            }
        }
    }
}

/// Merge the three value streams and the device's disconnect into one ordered channel.
async fn forward(
    tx: impl Stream<Item = Vec<u8>> + Send + 'static,
    api: impl Stream<Item = Vec<u8>> + Send + 'static,
    notes: impl Stream<Item = Vec<u8>> + Send + 'static,
    device_events: impl Stream<Item = DeviceEvent> + Send + 'static,
    out: mpsc::UnboundedSender<LinkEvent>,
) {
    let tagged = futures_util::stream::select_all([
        tx.map(|v| (Channel::PtlsTx, v)).boxed(),
        api.map(|v| (Channel::ApiCommands, v)).boxed(),
        notes.map(|v| (Channel::Notifications, v)).boxed(),
    ]);
    let mut tagged = Box::pin(tagged);
    let mut device_events = Box::pin(device_events);
    loop {
        tokio::select! {
            v = tagged.next() => match v {
                Some((channel, value)) => {
                    if out.send(LinkEvent::Value { channel, value }).is_err() {
                        return;
                    }
                }
                None => break,
            },
            ev = device_events.next() => match ev {
                Some(DeviceEvent::PropertyChanged(DeviceProperty::Connected(false))) | None => break,
                Some(_) => {}
            },
        }
    }
    let _ = out.send(LinkEvent::Disconnected {
        reason: "BLE link dropped".into(),
    });
}

pub struct BleLink {
    device: Device,
    ptls_rx: Characteristic,
    api: Characteristic,
    att_mtu: u16,
    events: mpsc::UnboundedReceiver<LinkEvent>,
    forwarder: tokio::task::JoinHandle<()>,
    closed: bool,
    rssi: Option<i16>,
}

impl Link for BleLink {
    fn att_mtu(&self) -> u16 {
        self.att_mtu
    }

    fn rssi(&self) -> Option<i16> {
        self.rssi
    }

    async fn write(&mut self, channel: Channel, value: &[u8]) -> Result<(), LinkError> {
        let target = match channel {
            Channel::PtlsRx => &self.ptls_rx,
            Channel::ApiCommands => &self.api,
            Channel::PtlsTx | Channel::Notifications => {
                return Err(LinkError::Ble {
                    op: "writing",
                    message: format!("{} is not writable", channel.name()),
                });
            }
        };
        let request = CharacteristicWriteRequest {
            op_type: WriteOp::Request,
            ..Default::default()
        };
        target.write_ext(value, &request).await.map_err(|e| {
            let reason = format!("write to {} failed: {e}", channel.name());
            if never_sent(&e.to_string()) {
                LinkError::NotDelivered { reason }
            } else {
                LinkError::Disconnected { reason }
            }
        })
    }

    async fn recv(&mut self) -> LinkEvent {
        if self.closed {
            return LinkEvent::Disconnected {
                reason: "closed".into(),
            };
        }
        match self.events.recv().await {
            Some(e) => {
                if matches!(e, LinkEvent::Disconnected { .. }) {
                    self.closed = true;
                }
                e
            }
            None => {
                self.closed = true;
                LinkEvent::Disconnected {
                    reason: "BLE link dropped".into(),
                }
            }
        }
    }

    async fn close(&mut self) {
        self.forwarder.abort();
        if !self.closed {
            self.closed = true;
            let _ = self.device.disconnect().await;
        }
    }
}

impl Drop for BleLink {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

/// `scan`: the Tedee locks BlueZ hears, matched against the configured ones.
pub async fn scan_report(
    config: Option<crate::config::Config>,
    seconds: u64,
    json: bool,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let adapter = config
        .as_ref()
        .map(|c| c.ble.adapter.clone())
        .unwrap_or_default();
    let locks = config.map(|c| c.locks).unwrap_or_default();
    let connector = BleConnector::new(&adapter, std::time::Duration::from_secs(10)).await?;
    if !json {
        writeln!(out, "listening for {seconds} s…")?;
        out.flush()?;
    }
    let heard = connector
        .scan(std::time::Duration::from_secs(seconds))
        .await?;
    let configured_as = |h: &Heard| {
        locks
            .iter()
            .find(|l| Some(&l.serial) == h.serial.as_ref() || l.serial == h.address)
            .map(|l| l.id.clone())
    };
    let missing: Vec<&crate::config::LockEntry> = locks
        .iter()
        .filter(|l| {
            !heard.iter().any(|h| {
                h.rssi.is_some() && (Some(&l.serial) == h.serial.as_ref() || l.serial == h.address)
            })
        })
        .collect();
    if json {
        let list: Vec<serde_json::Value> = heard
            .iter()
            .map(|h| {
                serde_json::json!({
                    "serial": h.serial, "address": h.address, "name": h.name, "rssi": h.rssi,
                    "configured_as": configured_as(h),
                })
            })
            .collect();
        let missing: Vec<serde_json::Value> = missing
            .iter()
            .map(|l| serde_json::json!({"id": l.id, "serial": l.serial}))
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::json!({"seconds": seconds, "locks": list, "configured_not_heard": missing})
        )?;
        return Ok(());
    }
    let in_range = heard.iter().filter(|h| h.rssi.is_some()).count();
    writeln!(out, "{in_range} Tedee lock(s) heard")?;
    if !heard.is_empty() {
        writeln!(
            out,
            "{:<16} {:<18} {:>5}  {:<16} configured as",
            "serial", "address", "rssi", "name"
        )?;
    }
    for h in &heard {
        writeln!(
            out,
            "{:<16} {:<18} {:>5}  {:<16} {}",
            h.serial.as_deref().unwrap_or("?"),
            h.address,
            h.rssi.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            h.name
                .as_deref()
                .unwrap_or("")
                .chars()
                .filter(|c| !c.is_control())
                .take(16)
                .collect::<String>(),
            configured_as(h).unwrap_or_else(|| "-".into())
        )?;
    }
    if heard.iter().any(|h| h.rssi.is_none()) {
        writeln!(out, "(rssi -: known to BlueZ but not heard in this scan)")?;
    }
    for l in missing {
        writeln!(
            out,
            "not heard: configured lock {} (serial {}) — out of range, asleep or off",
            l.id, l.serial
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_bluez_errors_are_recognised() {
        assert!(is_transient("le-connection-abort-by-local"));
        assert!(is_transient("Operation already in progress"));
        assert!(is_transient("org.bluez.Error.InProgress"));
        assert!(is_transient("Software caused connection abort"));
        assert!(!is_transient("org.bluez.Error.NotAvailable"));
    }

    #[test]
    fn undeliverable_writes_are_recognised() {
        assert!(never_sent(
            "D-Bus error org.freedesktop.DBus.Error.ServiceUnknown: The name :1.5"
        ));
        assert!(never_sent("org.bluez.Error.NotConnected"));
        assert!(!never_sent("org.bluez.Error.Failed: Operation timed out"));
    }
}
