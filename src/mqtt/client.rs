//! One MQTT connection in either protocol version, on rumqttc: the bridge sees one [`Client`]
//! to publish with and one stream of [`Incoming`] events, whichever version is configured.
//! [`drive`] polls rumqttc's event loop and waits with [`Backoff`] between failed attempts
//! (rumqttc itself would retry at once, in a tight loop).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rumqttc::v5;
use tokio::sync::mpsc;

pub use crate::backoff::Backoff;

/// A message received on a subscription.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// Retained at the broker (MQTT 5 also for live messages: retain-as-published).
    pub retain: bool,
    /// MQTT 5 request/response: where to answer and what to echo.
    pub response_topic: Option<String>,
    pub correlation: Option<Bytes>,
}

#[derive(Debug)]
pub enum Incoming {
    /// The broker accepted the connection (again): subscribe and publish everything.
    Connected,
    /// The connection is gone; publishing waits for the next `Connected`.
    Disconnected,
    Message(Message),
}

/// The publishing side; cheap to clone.
#[derive(Clone)]
pub enum Client {
    V5(v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

/// Where a message goes: a topic, and for an MQTT 5 response the correlation data.
pub struct Out<'a> {
    pub topic: &'a str,
    pub retain: bool,
    pub correlation: Option<Bytes>,
}

impl Client {
    /// Queue a QoS 1 message without waiting; false when the queue is full.
    pub fn try_publish(&self, out: Out, payload: Vec<u8>) -> bool {
        match self {
            Client::V5(c) => c
                .try_publish_with_properties(
                    out.topic,
                    v5::mqttbytes::QoS::AtLeastOnce,
                    out.retain,
                    payload,
                    properties(out.correlation),
                )
                .is_ok(),
            Client::V311(c) => c
                .try_publish(out.topic, rumqttc::QoS::AtLeastOnce, out.retain, payload)
                .is_ok(),
        }
    }

    /// Queue a QoS 1 message, waiting for room in the queue.
    pub async fn publish(&self, out: Out<'_>, payload: Vec<u8>) -> bool {
        match self {
            Client::V5(c) => c
                .publish_with_properties(
                    out.topic,
                    v5::mqttbytes::QoS::AtLeastOnce,
                    out.retain,
                    payload,
                    properties(out.correlation),
                )
                .await
                .is_ok(),
            Client::V311(c) => c
                .publish(out.topic, rumqttc::QoS::AtLeastOnce, out.retain, payload)
                .await
                .is_ok(),
        }
    }

    /// Subscribe at QoS 1. Under MQTT 5 the retain flag is kept as published, so a retained
    /// command is recognised even when it arrives live.
    pub fn try_subscribe(&self, filters: &[String]) -> bool {
        match self {
            Client::V5(c) => {
                let filters = filters.iter().map(|f| v5::mqttbytes::v5::Filter {
                    preserve_retain: true,
                    ..v5::mqttbytes::v5::Filter::new(f, v5::mqttbytes::QoS::AtLeastOnce)
                });
                c.try_subscribe_many(filters).is_ok()
            }
            Client::V311(c) => c
                .try_subscribe_many(
                    filters.iter().map(|f| {
                        rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::AtLeastOnce)
                    }),
                )
                .is_ok(),
        }
    }

    pub async fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.disconnect().await.is_ok(),
            Client::V311(c) => c.disconnect().await.is_ok(),
        };
    }
}

fn properties(correlation: Option<Bytes>) -> v5::mqttbytes::v5::PublishProperties {
    v5::mqttbytes::v5::PublishProperties {
        correlation_data: correlation,
        ..Default::default()
    }
}

/// rumqttc's event loop in either version.
pub enum EventLoop {
    V5(Box<v5::EventLoop>),
    V311(Box<rumqttc::EventLoop>),
}

/// Poll `eventloop` until `incoming` closes or, once `stopping` is set, the connection ends,
/// sending what the bridge needs. Failed connections wait out `backoff`; `reconnects` counts
/// them.
pub async fn drive(
    mut eventloop: EventLoop,
    incoming: mpsc::Sender<Incoming>,
    mut backoff: Backoff,
    reconnects: Arc<AtomicU64>,
    broker: String,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut was_up = false;
    loop {
        let event = match &mut eventloop {
            EventLoop::V5(e) => e.poll().await.map(from_v5).map_err(|e| e.to_string()),
            EventLoop::V311(e) => e.poll().await.map(from_v311).map_err(|e| e.to_string()),
        };
        match event {
            Ok(Some(Incoming::Connected)) => {
                backoff.reset();
                log::info!("mqtt: connected to {broker}");
                was_up = true;
                if incoming.send(Incoming::Connected).await.is_err() {
                    return;
                }
            }
            Ok(Some(message)) => {
                if incoming.send(message).await.is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(_) if stopping.load(Ordering::SeqCst) => return, // our own disconnect
            Err(e) => {
                reconnects.fetch_add(1, Ordering::Relaxed);
                let delay = backoff.next(rand_core::RngCore::next_u64(&mut rand_core::OsRng));
                if was_up {
                    log::warn!("mqtt: lost {broker}: {e}; reconnecting in {delay:?}");
                    if incoming.send(Incoming::Disconnected).await.is_err() {
                        return;
                    }
                } else {
                    log::warn!("mqtt: cannot reach {broker}: {e}; retrying in {delay:?}");
                }
                was_up = false;
                if incoming.is_closed() {
                    return;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn from_v5(event: v5::Event) -> Option<Incoming> {
    use v5::mqttbytes::v5::Packet;
    match event {
        v5::Event::Incoming(Packet::ConnAck(_)) => Some(Incoming::Connected),
        v5::Event::Incoming(Packet::Publish(p)) => {
            let (response_topic, correlation) = p
                .properties
                .map(|pr| (pr.response_topic, pr.correlation_data))
                .unwrap_or_default();
            Some(Incoming::Message(Message {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload,
                retain: p.retain,
                response_topic,
                correlation,
            }))
        }
        // Acks, pings and what the client sends: nothing for the bridge.
        v5::Event::Incoming(_) | v5::Event::Outgoing(_) => None,
    }
}

fn from_v311(event: rumqttc::Event) -> Option<Incoming> {
    match event {
        rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => Some(Incoming::Connected),
        rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => Some(Incoming::Message(Message {
            topic: p.topic,
            payload: p.payload,
            retain: p.retain,
            response_topic: None,
            correlation: None,
        })),
        rumqttc::Event::Incoming(_) | rumqttc::Event::Outgoing(_) => None,
    }
}
