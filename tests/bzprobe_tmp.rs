#![allow(clippy::unwrap_used, clippy::print_stdout)]
use bluer::gatt::WriteOp;
use bluer::gatt::local::*;
use bluer::gatt::remote::CharacteristicWriteRequest as RemoteWrite;
use futures_util::{FutureExt, StreamExt};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn probe() {
    let session = bluer::Session::new().await.unwrap();
    println!("adapters {:?}", session.adapter_names().await.unwrap());
    let server = session.adapter("hci1").unwrap();
    let client = session.adapter("hci0").unwrap();
    server.set_powered(true).await.unwrap();
    client.set_powered(true).await.unwrap();
    let svc: uuid::Uuid = "00000002-4899-489f-a301-fbee544b1db0".parse().unwrap();
    let tx_uuid: uuid::Uuid = "00000301-4899-489f-a301-fbee544b1db0".parse().unwrap();
    let rx_uuid: uuid::Uuid = "00000401-4899-489f-a301-fbee544b1db0".parse().unwrap();
    let serial: uuid::Uuid = "10000000-0000-0000-0100-000000000000".parse().unwrap();
    let (tx_notif_sender, mut tx_notif_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let notifier_slot: std::sync::Arc<tokio::sync::Mutex<Option<CharacteristicNotifier>>> =
        Default::default();
    let slot2 = notifier_slot.clone();
    let app = Application {
        services: vec![Service {
            uuid: svc,
            primary: true,
            characteristics: vec![
                Characteristic {
                    uuid: tx_uuid,
                    notify: Some(CharacteristicNotify {
                        notify: true,
                        method: CharacteristicNotifyMethod::Fun(Box::new(move |n| {
                            let s = slot2.clone();
                            async move {
                                println!("server: client subscribed");
                                *s.lock().await = Some(n);
                            }
                            .boxed()
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Characteristic {
                    uuid: rx_uuid,
                    write: Some(CharacteristicWrite {
                        write: true,
                        write_without_response: true,
                        method: CharacteristicWriteMethod::Fun(Box::new(move |v, req| {
                            let t = tx_notif_sender.clone();
                            async move {
                                println!(
                                    "server: write {:?} from {} op {:?} mtu {}",
                                    v, req.device_address, req.op_type, req.mtu
                                );
                                t.send(v).unwrap();
                                Ok(())
                            }
                            .boxed()
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    };
    let _app = server.serve_gatt_application(app).await.unwrap();
    let _adv = server
        .advertise(bluer::adv::Advertisement {
            service_uuids: [serial].into(),
            local_name: Some("Lock-0001".into()),
            discoverable: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    let echo = tokio::spawn(async move {
        while let Some(v) = tx_notif_rx.recv().await {
            if let Some(n) = notifier_slot.lock().await.as_mut() {
                n.notify(v).await.unwrap();
            }
        }
    });
    client
        .set_discovery_filter(bluer::DiscoveryFilter {
            transport: bluer::DiscoveryTransport::Le,
            uuids: [serial].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let events = client.discover_devices().await.unwrap();
    let mut events = Box::pin(events);
    let mut found = None;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(15), events.next()).await {
        if let bluer::AdapterEvent::DeviceAdded(addr) = ev {
            let d = client.device(addr).unwrap();
            let uuids = d.uuids().await.unwrap().unwrap_or_default();
            println!(
                "found {addr} uuids {uuids:?} name {:?} rssi {:?} after {:?}",
                d.name().await.unwrap(),
                d.rssi().await.unwrap(),
                t.elapsed()
            );
            if uuids.contains(&serial) {
                found = Some(d);
                break;
            }
        }
    }
    drop(events);
    let dev = found.expect("found by serial uuid");
    dev.connect().await.unwrap();
    println!(
        "connected after {:?}; resolved {}",
        t.elapsed(),
        dev.is_services_resolved().await.unwrap()
    );
    for _ in 0..50 {
        if dev.is_services_resolved().await.unwrap() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut tx = None;
    let mut rx = None;
    for s in dev.services().await.unwrap() {
        if s.uuid().await.unwrap() != svc {
            continue;
        }
        for c in s.characteristics().await.unwrap() {
            let u = c.uuid().await.unwrap();
            println!(
                "char {u} flags {:?} mtu {:?}",
                c.flags().await.unwrap(),
                c.mtu().await
            );
            if u == tx_uuid {
                tx = Some(c)
            } else if u == rx_uuid {
                rx = Some(c)
            }
        }
    }
    let (tx, rx) = (tx.unwrap(), rx.unwrap());
    let mut notes = Box::pin(tx.notify().await.unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t2 = std::time::Instant::now();
    rx.write_ext(
        &[3, 1, 2, 3],
        &RemoteWrite {
            op_type: WriteOp::Request,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    println!("write acked after {:?}", t2.elapsed());
    let v = tokio::time::timeout(Duration::from_secs(5), notes.next())
        .await
        .unwrap()
        .unwrap();
    println!("notified {v:?} after {:?}", t2.elapsed());
    assert_eq!(v, vec![3, 1, 2, 3]);
    let seen: Vec<_> = server.device_addresses().await.unwrap();
    println!("server adapter sees devices {seen:?}");
    for a in seen {
        let d = server.device(a).unwrap();
        println!("  {a} connected {:?}", d.is_connected().await);
    }
    let mut sev = Box::pin(
        server
            .device(client.address().await.unwrap())
            .unwrap()
            .events()
            .await
            .unwrap(),
    );
    dev.disconnect().await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(3), sev.next()).await;
    println!("server-side event after client disconnect: {e:?}");
    echo.abort();
}
