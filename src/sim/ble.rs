//! The simulator as a BLE peripheral: each lock is a GATT application with the service and
//! characteristics of spec §1, advertised with its serial UUID, service UUID and name
//! `Lock-XXXX`, on its own adapter (one peripheral address per lock, as real locks have).
//!
//! The same sans-IO [`Lock`] model runs behind it. A client is identified by its address:
//! its first write opens a lock connection; its disconnect (seen on the lock's adapter) ends
//! it. BlueZ delivers notifications of a local characteristic to every subscribed client, so a
//! BLE-served lock talks to one gateway at a time.

use std::collections::HashMap;
use std::time::Instant;

use bluer::adv::Advertisement;
use bluer::gatt::local::{
    Application, Characteristic, CharacteristicNotifier, CharacteristicNotify,
    CharacteristicNotifyMethod, CharacteristicWrite, CharacteristicWriteMethod, ReqError, Service,
};
use bluer::{Address, DeviceEvent, DeviceProperty};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::EventLog;
use super::model::{ConnId, Lock, Output};
use super::serve::SimWorld;
use crate::ptls::{Channel, WallClock, gatt};

enum Input {
    Write {
        lock: usize,
        device: Address,
        channel: Channel,
        value: Vec<u8>,
        mtu: u16,
        /// The ATT answer: a value longer than the link carries is refused (spec §3.2).
        answer: tokio::sync::oneshot::Sender<Result<(), ReqError>>,
    },
    Subscribed {
        lock: usize,
        channel: Channel,
        notifier: CharacteristicNotifier,
    },
    Gone {
        lock: usize,
        device: Address,
    },
}

fn uuid(s: &str) -> Uuid {
    // The UUIDs are constants of this crate, checked by the unit test below.
    s.parse().expect("valid UUID constant")
}

fn write_char(lock: usize, channel: Channel, tx: mpsc::UnboundedSender<Input>) -> Characteristic {
    // API_COMMANDS answers by indication.
    let notify =
        (channel == Channel::ApiCommands).then(|| notify_method(lock, channel, tx.clone(), true));
    Characteristic {
        uuid: uuid(channel.uuid()),
        write: Some(CharacteristicWrite {
            write: true,
            write_without_response: true,
            method: CharacteristicWriteMethod::Fun(Box::new(move |value, req| {
                let tx = tx.clone();
                async move {
                    let (answer, answered) = tokio::sync::oneshot::channel();
                    tx.send(Input::Write {
                        lock,
                        device: req.device_address,
                        channel,
                        value,
                        mtu: req.mtu,
                        answer,
                    })
                    .map_err(|_| ReqError::Failed)?;
                    answered.await.unwrap_or(Err(ReqError::Failed))
                }
                .boxed()
            })),
            ..Default::default()
        }),
        notify,
        ..Default::default()
    }
}

fn notify_method(
    lock: usize,
    channel: Channel,
    tx: mpsc::UnboundedSender<Input>,
    indicate: bool,
) -> CharacteristicNotify {
    CharacteristicNotify {
        notify: !indicate,
        indicate,
        method: CharacteristicNotifyMethod::Fun(Box::new(move |notifier| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Input::Subscribed {
                    lock,
                    channel,
                    notifier,
                });
            }
            .boxed()
        })),
        ..Default::default()
    }
}

fn notify_char(lock: usize, channel: Channel, tx: mpsc::UnboundedSender<Input>) -> Characteristic {
    Characteristic {
        uuid: uuid(channel.uuid()),
        notify: Some(notify_method(lock, channel, tx, false)),
        ..Default::default()
    }
}

/// Serve every lock of `world` on its own adapter (`adapters[i]` for lock `i`) until
/// `shutdown` completes.
pub async fn serve_ble(
    world: SimWorld,
    adapters: &[String],
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    if adapters.len() < world.locks.len() {
        anyhow::bail!(
            "{} locks need {} adapters (one peripheral address per lock); --adapter names {}",
            world.locks.len(),
            world.locks.len(),
            adapters.len()
        );
    }
    let session = bluer::Session::new().await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    let now = Instant::now();
    let wall = WallClock {
        at: now,
        unix_ms: crate::clock::unix_ms(),
    };
    let mut locks = Vec::new();
    let mut apps = Vec::new();
    let mut advs = Vec::new();
    let mut lock_adapters = Vec::new();
    for (i, spec) in world.locks.into_iter().enumerate() {
        let adapter = session.adapter(&adapters[i])?;
        adapter.set_powered(true).await?;
        let app = Application {
            services: vec![Service {
                uuid: uuid(gatt::SERVICE_UUID),
                primary: true,
                characteristics: vec![
                    notify_char(i, Channel::Notifications, tx.clone()),
                    notify_char(i, Channel::PtlsTx, tx.clone()),
                    write_char(i, Channel::PtlsRx, tx.clone()),
                    write_char(i, Channel::ApiCommands, tx.clone()),
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        let serial_uuid = uuid(&gatt::serial_uuid(&spec.serial)?);
        let name = format!("Lock-{}", &spec.serial[spec.serial.len() - 4..]);
        apps.push(adapter.serve_gatt_application(app).await?);
        advs.push(
            adapter
                .advertise(Advertisement {
                    service_uuids: [serial_uuid, uuid(gatt::SERVICE_UUID)].into(),
                    local_name: Some(name.clone()),
                    discoverable: Some(true),
                    ..Default::default()
                })
                .await?,
        );
        log::info!(
            "sim: {} served on {} ({}) as {name}",
            spec.serial,
            adapter.name(),
            adapter.address().await?
        );
        lock_adapters.push(adapter);
        locks.push(Lock::new(spec, world.seed.wrapping_add(i as u64), wall));
    }
    let mut log = EventLog::open(world.event_log.as_deref())?;
    // Per lock: client address → connection, which characteristics have a subscriber, and one
    // ordered output queue. The lock seals responses and notifications under one counter in
    // send order, so they must leave in that order across characteristics.
    let mut conns: Vec<HashMap<Address, ConnId>> = vec![HashMap::new(); locks.len()];
    let mut subscribed: Vec<Vec<Channel>> = vec![Vec::new(); locks.len()];
    let outputs: Vec<mpsc::UnboundedSender<Outgoing>> = (0..locks.len())
        .map(|_| {
            let (otx, orx) = mpsc::unbounded_channel();
            tokio::spawn(send_values(orx));
            otx
        })
        .collect();
    tokio::pin!(shutdown);
    loop {
        let deadline = locks
            .iter()
            .filter_map(Lock::poll_timeout)
            .min()
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = &mut shutdown => break,
            Some(input) = rx.recv() => {
                let now = Instant::now();
                match input {
                    Input::Subscribed { lock, channel, notifier } => {
                        let _ = outputs[lock].send(Outgoing::Notifier(channel, notifier));
                        if !subscribed[lock].contains(&channel) {
                            subscribed[lock].push(channel);
                        }
                        for conn in conns[lock].values() {
                            locks[lock].subscribe(*conn, channel, true);
                        }
                    }
                    Input::Write { lock, device, channel, value, mtu, answer } => {
                        let conn = match conns[lock].get(&device) {
                            Some(c) => *c,
                            None => match locks[lock].connect(now, mtu.saturating_add(3)) {
                                Ok((c, _)) => {
                                    for ch in &subscribed[lock] {
                                        locks[lock].subscribe(c, *ch, true);
                                    }
                                    conns[lock].insert(device, c);
                                    watch_device(&lock_adapters[lock], lock, device, tx.clone());
                                    log::info!("sim: {}: connection {c} from {device}", locks[lock].serial());
                                    c
                                }
                                Err(r) => {
                                    log::warn!("sim: {}: refused {device}: {r:?}", locks[lock].serial());
                                    // As before: the write is taken, the lock never hears it.
                                    let _ = answer.send(Ok(()));
                                    continue;
                                }
                            },
                        };
                        if let Some(limit) = locks[lock].value_limit(conn).filter(|&l| value.len() > l) {
                            log::warn!(
                                "sim: {}: refused a {}-byte write on {channel:?} from {device}: ATT MTU {} takes at most {limit}",
                                locks[lock].serial(),
                                value.len(),
                                limit + 3
                            );
                            let _ = answer.send(Err(ReqError::InvalidValueLength));
                            continue;
                        }
                        let _ = answer.send(Ok(()));
                        locks[lock].write(now, conn, channel, &value);
                    }
                    Input::Gone { lock, device } => {
                        if let Some(conn) = conns[lock].remove(&device) {
                            log::info!("sim: {}: {device} disconnected", locks[lock].serial());
                            locks[lock].disconnect(conn);
                        }
                    }
                }
            }
            _ = crate::clock::sleep_until(deadline) => {}
        }
        let now = Instant::now();
        for (i, lock) in locks.iter_mut().enumerate() {
            if lock.poll_timeout().is_some_and(|t| t <= now) {
                lock.handle_timeout(now);
            }
            while let Some(out) = lock.poll_output() {
                match out {
                    Output::Value { channel, bytes, .. } => {
                        let _ = outputs[i].send(Outgoing::Value(channel, bytes));
                    }
                    Output::Disconnect { conn, reason } => {
                        let device = conns[i].iter().find(|(_, c)| **c == conn).map(|(d, _)| *d);
                        if let Some(device) = device {
                            conns[i].remove(&device);
                            log::info!(
                                "sim: {}: dropping {device} (reason {reason})",
                                lock.serial()
                            );
                            if let Ok(d) = lock_adapters[i].device(device) {
                                tokio::spawn(async move {
                                    let _ = d.disconnect().await;
                                });
                            }
                        }
                    }
                }
            }
            log.write(&lock.take_actuations());
        }
    }
    // Dropping the handles unregisters the applications and advertisements.
    drop(advs);
    drop(apps);
    Ok(())
}

enum Outgoing {
    Notifier(Channel, CharacteristicNotifier),
    Value(Channel, Vec<u8>),
}

/// One lock's values go out one at a time in the order the lock produced them; an indication
/// waits for its confirmation before the next value.
async fn send_values(mut queue: mpsc::UnboundedReceiver<Outgoing>) {
    let mut notifiers: HashMap<Channel, CharacteristicNotifier> = HashMap::new();
    while let Some(item) = queue.recv().await {
        match item {
            Outgoing::Notifier(channel, n) => {
                notifiers.insert(channel, n);
            }
            Outgoing::Value(channel, v) => {
                if let Some(n) = notifiers.get_mut(&channel) {
                    if n.notify(v).await.is_err() {
                        notifiers.remove(&channel);
                    }
                }
            }
        }
    }
}

/// Tell the world when a client's link drops (seen on the lock's adapter).
fn watch_device(
    adapter: &bluer::Adapter,
    lock: usize,
    device: Address,
    tx: mpsc::UnboundedSender<Input>,
) {
    let Ok(d) = adapter.device(device) else {
        return;
    };
    tokio::spawn(async move {
        let Ok(events) = d.events().await else {
            return;
        };
        let mut events = Box::pin(events);
        while let Some(ev) = events.next().await {
            if let DeviceEvent::PropertyChanged(DeviceProperty::Connected(false)) = ev {
                break;
            }
        }
        let _ = tx.send(Input::Gone { lock, device });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_constants_parse() {
        for c in Channel::ALL {
            uuid(c.uuid());
        }
        uuid(gatt::SERVICE_UUID);
    }
}
