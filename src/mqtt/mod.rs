//! The MQTT bridge (design §7): lock state, availability, events and metrics out; commands in,
//! with every progress step and the outcome on `<root>/locks/<lock>/result`.
//!
//! One task owns the bridge: it reads the registry's event stream and what [`client::drive`]
//! receives, and publishes without ever waiting on the broker (a full queue marks the state
//! dirty and it is published again from the registry, the outbox, a second later). Each
//! command's reports go out from a task of their own. On every ConnAck it subscribes again and
//! publishes `online`, discovery and the latest state of every lock, so a reconnect leaves the
//! retained topics current. Commands are subscribed with a clean session, so nothing queued
//! while the gateway was away fires later; a retained command is answered `denied` and never
//! executed.

pub mod client;
pub mod payload;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};

use crate::command::{Outcome, Report, Step};
use crate::config::Config;
use crate::policy::{MQTT_ORIGIN, Policy, Who};
use crate::registry::{GatewayEvent, LockView};
use crate::supervisor::{Request, Supervisor};
use client::{Client, EventLoop, Incoming, Message, Out};

/// The running bridge.
pub struct Bridge {
    /// The connection in use, replaced when the bridge is restarted after a panic.
    current: Arc<std::sync::Mutex<Current>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    status_topic: String,
    supervised: tokio::task::JoinHandle<()>,
}

/// The client of the bridge's current run, and its task.
struct Current {
    client: Client,
    task: Option<tokio::task::AbortHandle>,
}

impl Bridge {
    /// Publish `offline` and disconnect (the last will covers a crash).
    pub async fn stop(self) {
        let out = Out {
            topic: &self.status_topic,
            retain: true,
            correlation: None,
        };
        self.stopping.store(true, Ordering::SeqCst);
        let client = {
            let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(task) = current.task.take() {
                task.abort();
            }
            current.client.clone()
        };
        let mut supervised = self.supervised;
        let flushed = tokio::time::timeout(Duration::from_secs(1), async {
            client.publish(out, b"offline".to_vec()).await;
            client.disconnect().await;
            // The event loop writes both, then ends when the connection closes.
            let _ = (&mut supervised).await;
        })
        .await;
        if flushed.is_err() {
            supervised.abort();
        }
    }
}

/// What survives a restart of the bridge: counters and the parts every run is built from.
#[derive(Clone)]
struct Shared {
    config: Arc<Config>,
    supervisor: Arc<Supervisor>,
    dtls_peers: Option<Arc<crate::cloud::dtls::Stats>>,
    reconnects: Arc<AtomicU64>,
    retained_refused: Arc<AtomicU64>,
    started: std::time::Instant,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    current: Arc<std::sync::Mutex<Current>>,
}

/// Connect to the configured broker (in the background) and bridge until stopped. `dtls_peers`
/// reports the CoAP endpoint's peers in the metrics. The bridge runs under
/// [`crate::tasks::supervise`]: if it panics, it is logged and started again with a fresh
/// connection.
pub fn start(
    config: &Config,
    supervisor: Arc<Supervisor>,
    dtls_peers: Option<Arc<crate::cloud::dtls::Stats>>,
) -> anyhow::Result<Option<Bridge>> {
    let Some(broker) = config.mqtt.broker.clone() else {
        return Ok(None);
    };
    let root = config.mqtt_root();
    let topics = Topics::new(
        &root,
        &config.mqtt.discovery_prefix,
        &config.mqtt.response_prefixes,
    );
    // Built once here so that a bad setting stops the daemon at start, with its reason.
    let (client, eventloop) = connection(config, &topics).context("mqtt")?;
    let current = Arc::new(std::sync::Mutex::new(Current { client, task: None }));
    let shared = Shared {
        config: Arc::new(config.clone()),
        supervisor: supervisor.clone(),
        dtls_peers,
        reconnects: Arc::new(AtomicU64::new(0)),
        retained_refused: Arc::new(AtomicU64::new(0)),
        started: std::time::Instant::now(),
        stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        current: current.clone(),
    };
    let stopping = shared.stopping.clone();
    let first = std::sync::Mutex::new(Some(eventloop));
    let supervised = tokio::spawn(crate::tasks::supervise(
        "the MQTT bridge",
        supervisor.registry().clone(),
        move || {
            let eventloop = first.lock().unwrap_or_else(|p| p.into_inner()).take();
            run_bridge(shared.clone(), eventloop)
        },
    ));
    log::info!("mqtt: bridging to {broker} under {root}");
    Ok(Some(Bridge {
        current,
        stopping,
        status_topic: topics.status,
        supervised,
    }))
}

/// One run of the bridge: the event loop's driver and the bridge's task, until both end. A
/// panic in either ends the other and is passed on to the supervisor.
async fn run_bridge(shared: Shared, eventloop: Option<EventLoop>) {
    let config = &shared.config;
    let topics = Topics::new(
        &config.mqtt_root(),
        &config.mqtt.discovery_prefix,
        &config.mqtt.response_prefixes,
    );
    let (client, eventloop) = match eventloop {
        Some(e) => {
            let client = shared
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .client
                .clone();
            (client, e)
        }
        None => match connection(config, &topics) {
            Ok(c) => c,
            Err(e) => {
                // The same settings worked at start; nothing changed them since.
                log::error!("mqtt: {e:#}; the bridge stays down");
                return;
            }
        },
    };
    let (tx, rx) = mpsc::channel(256);
    let backoff = client::Backoff::new(
        Duration::from_millis(config.mqtt.reconnect_min_ms),
        Duration::from_secs(config.mqtt.reconnect_max_s),
    );
    let mut driver = tokio::spawn(client::drive(
        eventloop,
        tx,
        backoff,
        shared.reconnects.clone(),
        config
            .mqtt
            .broker
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        shared.stopping.clone(),
    ));
    let _driver = crate::tasks::AbortOnDrop(driver.abort_handle());
    let events = shared.supervisor.registry().subscribe();
    let bridge = Task {
        client: client.clone(),
        topics,
        supervisor: shared.supervisor.clone(),
        reconnects: shared.reconnects.clone(),
        dtls_peers: shared.dtls_peers.clone(),
        connected: false,
        dirty: false,
        started: shared.started,
        retained_refused: shared.retained_refused.clone(),
        availability: Default::default(),
        doors_announced: Default::default(),
        certificates_announced: Default::default(),
        announced: None,
        announce_due: None,
    };
    let mut task = tokio::spawn(bridge.run(rx, events));
    let _task = crate::tasks::AbortOnDrop(task.abort_handle());
    *shared.current.lock().unwrap_or_else(|p| p.into_inner()) = Current {
        client,
        task: Some(task.abort_handle()),
    };
    // Whichever ends first; then the other. A panic in either is the supervisor's.
    let (first, other) = tokio::select! {
        r = &mut task => (r, driver),
        r = &mut driver => (r, task),
    };
    let passed_on = |r: Result<(), tokio::task::JoinError>| match r {
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        _ => {}
    };
    passed_on(first);
    passed_on(other.await);
}

/// The topics of one gateway.
struct Topics {
    root: String,
    /// `<root>/responses/`: where MQTT 5 response topics may always point.
    responses: String,
    /// Further prefixes the operator allowed for response topics.
    response_prefixes: Vec<String>,
    status: String,
    events: String,
    metrics: String,
    set_filter: String,
    ha_status: String,
    discovery_prefix: String,
}

impl Topics {
    fn new(root: &str, discovery_prefix: &str, response_prefixes: &[String]) -> Topics {
        Topics {
            root: root.to_string(),
            responses: format!("{root}/responses/"),
            response_prefixes: response_prefixes.to_vec(),
            status: format!("{root}/status"),
            events: format!("{root}/events"),
            metrics: format!("{root}/metrics"),
            set_filter: format!("{root}/locks/+/set"),
            ha_status: format!("{discovery_prefix}/status"),
            discovery_prefix: discovery_prefix.to_string(),
        }
    }

    fn lock(&self, id: &str, leaf: &str) -> String {
        format!("{}/locks/{id}/{leaf}", self.root)
    }

    /// Whether an MQTT 5 response topic may be published to: a topic name (no wildcards)
    /// under `<root>/responses/` or a configured prefix.
    fn response_allowed(&self, topic: &str) -> bool {
        crate::config::check_topic(topic).is_ok()
            && std::iter::once(&self.responses)
                .chain(&self.response_prefixes)
                .any(|p| topic.len() > p.len() && topic.starts_with(p.as_str()))
    }

    /// The lock a `<root>/locks/<lock>/set` topic names.
    fn set_lock<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let rest = topic.strip_prefix(&self.root)?.strip_prefix("/locks/")?;
        let lock = rest.strip_suffix("/set")?;
        (!lock.is_empty() && !lock.contains('/')).then_some(lock)
    }
}

/// rumqttc's client and event loop for the configured protocol, TLS and credentials, with the
/// last will `offline` on the status topic and a clean session.
fn connection(config: &Config, topics: &Topics) -> anyhow::Result<(Client, EventLoop)> {
    let m = &config.mqtt;
    let crate::config::HostPort { host, port } =
        m.broker.clone().context("mqtt.broker is not set")?;
    // User name and password (empty without a password file).
    let credentials = match (&m.username, &m.password_file) {
        (Some(user), Some(f)) => {
            let pass = crate::config::read_private(&config.gateway.state_dir.join(f))
                .map_err(|e| anyhow::anyhow!("mqtt.password_file: {e}"))?;
            Some((user.clone(), pass.trim().to_string()))
        }
        (Some(user), None) => Some((user.clone(), String::new())),
        (None, _) => None,
    };
    let transport = if m.tls {
        Some(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(config)?)),
        ))
    } else {
        None
    };
    let keep_alive = Duration::from_secs(m.keep_alive_s);
    // Small messages, latency matters: no Nagle delay (which costs tens of milliseconds
    // against delayed ACKs).
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    const QUEUE: usize = 1024;
    if m.protocol == crate::config::MqttProtocol::V311 {
        let mut o = rumqttc::MqttOptions::new(config.mqtt_client_id(), host, port);
        // MQTT 3.1.1 cannot tell the broker a limit: anything larger than this ends the
        // connection, so it is large (rumqttc's default of 10 KiB let any big publish to a
        // set topic drop the bridge). Brokers should cap it too (docs/mqtt.md).
        o.set_max_packet_size(MAX_PACKET_V311, MAX_PACKET_V311)
            .set_keep_alive(keep_alive)
            .set_clean_session(true)
            .set_last_will(rumqttc::LastWill::new(
                &topics.status,
                "offline",
                rumqttc::QoS::AtLeastOnce,
                true,
            ));
        if let Some((user, pass)) = credentials {
            o.set_credentials(user, pass);
        }
        if let Some(t) = transport {
            o.set_transport(t);
        }
        let (c, mut e) = rumqttc::AsyncClient::new(o, QUEUE);
        e.set_network_options(network);
        Ok((Client::V311(c), EventLoop::V311(Box::new(e))))
    } else {
        let mut o = rumqttc::v5::MqttOptions::new(config.mqtt_client_id(), host, port);
        // Announced in CONNECT: the broker does not send the bridge anything larger.
        o.set_max_packet_size(Some(MAX_PACKET_V5))
            .set_keep_alive(keep_alive)
            .set_clean_start(true)
            .set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                &topics.status,
                "offline",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                true,
                None,
            ));
        if let Some((user, pass)) = credentials {
            o.set_credentials(user, pass);
        }
        if let Some(t) = transport {
            o.set_transport(t);
        }
        o.set_network_options(network);
        let (c, e) = rumqttc::v5::AsyncClient::new(o, QUEUE);
        Ok((Client::V5(c), EventLoop::V5(Box::new(e))))
    }
}

/// The largest MQTT packet the bridge takes under MQTT 5, announced to the broker.
const MAX_PACKET_V5: u32 = 1024 * 1024;
/// The largest under MQTT 3.1.1, which has no way to announce one.
const MAX_PACKET_V311: usize = 16 * 1024 * 1024;

/// rustls for the broker: its certificate checked against `mqtt.ca` or the system's roots,
/// and a client certificate when configured.
fn tls_config(config: &Config) -> anyhow::Result<rustls::ClientConfig> {
    let m = &config.mqtt;
    let dir = &config.gateway.state_dir;
    let ca =
        m.ca.as_ref()
            .map(|p| dir.join(p))
            .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
    let roots = crate::cloud::certs::load_roots(&ca).context("mqtt.ca")?;
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match (&m.client_certificate, &m.client_key) {
        (Some(cert), Some(key)) => {
            let chain = crate::cloud::certs::read_certificates(&dir.join(cert))
                .context("mqtt.client_certificate")?;
            let key =
                crate::cloud::certs::read_private_key(&dir.join(key)).context("mqtt.client_key")?;
            builder
                .with_client_auth_cert(chain, key)
                .context("mqtt.client_certificate / mqtt.client_key")
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// The bridge's own state, owned by its task.
struct Task {
    client: Client,
    topics: Topics,
    supervisor: Arc<Supervisor>,
    reconnects: Arc<AtomicU64>,
    dtls_peers: Option<Arc<crate::cloud::dtls::Stats>>,
    connected: bool,
    /// A publish did not fit in the queue: publish every lock's state again.
    dirty: bool,
    started: std::time::Instant,
    retained_refused: Arc<AtomicU64>,
    /// Availability as last published per lock: it is sent only when it changes.
    availability: std::collections::HashMap<String, &'static str>,
    /// Locks whose door entity Home Assistant has been told of (a door shows up with the
    /// lock's first report of its door sensor).
    doors_announced: std::collections::HashSet<String>,
    /// Likewise for a certificate-expiry sensor (the provider reports it once it starts).
    certificates_announced: std::collections::HashSet<String>,
    /// When discovery was last announced for a Home Assistant birth, and when the next one is
    /// due (a birth arrived within [`ANNOUNCE_INTERVAL`] of the last announcement).
    announced: Option<tokio::time::Instant>,
    announce_due: Option<tokio::time::Instant>,
}

/// Births of Home Assistant within this of an announcement are answered by one more, at its
/// end: a flood of `online` costs two announcements, not one per message.
const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(5);

impl Task {
    async fn run(
        mut self,
        mut incoming: mpsc::Receiver<Incoming>,
        mut events: broadcast::Receiver<GatewayEvent>,
    ) {
        let config = self.supervisor.config().clone();
        let mut metrics =
            tokio::time::interval(Duration::from_secs(config.mqtt.metrics_interval_s));
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                i = incoming.recv() => match i {
                    Some(Incoming::Connected) => self.on_connect(),
                    Some(Incoming::Disconnected) => self.connected = false,
                    Some(Incoming::Message(m)) => self.on_message(m),
                    None => return,
                },
                e = events.recv() => match e {
                    Ok(event) => self.on_event(event),
                    // Missed events: the registry still has the latest state of every lock.
                    Err(broadcast::error::RecvError::Lagged(_)) => self.dirty = true,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = metrics.tick() => self.publish_metrics(),
                _ = crate::clock::sleep_until(self.announce_due) => {
                    self.announce(tokio::time::Instant::now());
                }
                _ = retry.tick() => {
                    if self.dirty && self.connected {
                        self.dirty = false;
                        self.availability.clear();
                        self.publish_all_states();
                    }
                }
            }
        }
    }

    fn publish(&mut self, topic: &str, retain: bool, payload: Vec<u8>) {
        let out = Out {
            topic,
            retain,
            correlation: None,
        };
        if !self.client.try_publish(out, payload) {
            self.dirty = true;
        }
    }

    fn on_connect(&mut self) {
        self.connected = true;
        self.availability.clear(); // a new broker may have none of it
        let config = self.supervisor.config().clone();
        let mut filters = vec![self.topics.set_filter.clone()];
        if config.mqtt.home_assistant {
            filters.push(self.topics.ha_status.clone());
        }
        if !self.client.try_subscribe(&filters) {
            log::warn!("mqtt: could not queue the subscriptions");
        }
        let status = self.topics.status.clone();
        self.publish(&status, true, b"online".to_vec());
        if config.mqtt.home_assistant {
            self.publish_discovery();
        }
        self.publish_all_states();
    }

    fn publish_all_states(&mut self) {
        for view in self.supervisor.registry().all() {
            self.publish_state(&view);
        }
    }

    fn publish_state(&mut self, view: &LockView) {
        let state = payload::state(view).to_string().into_bytes();
        let topic = self.topics.lock(&view.id, "state");
        self.publish(&topic, true, state);
        let available = payload::availability(view);
        if self.availability.get(&view.id) != Some(&available) {
            self.availability.insert(view.id.clone(), available);
            let topic = self.topics.lock(&view.id, "availability");
            self.publish(&topic, true, available.as_bytes().to_vec());
        }
    }

    fn publish_discovery(&mut self) {
        let config = self.supervisor.config().clone();
        let d = self.discovery_base(&config);
        let (topic, doc) = payload::gateway_discovery(&d);
        self.publish(&topic, true, doc.to_string().into_bytes());
        for view in self.supervisor.registry().all() {
            self.publish_lock_discovery(&config, &view);
        }
    }

    fn discovery_base<'a>(&'a self, config: &'a Config) -> payload::Discovery<'a> {
        payload::Discovery {
            prefix: &self.topics.discovery_prefix,
            root: &self.topics.root,
            gateway: &config.gateway.id,
            version: env!("CARGO_PKG_VERSION"),
            open: false,
        }
    }

    fn publish_lock_discovery(&mut self, config: &Config, view: &LockView) {
        let mut d = self.discovery_base(config);
        d.open = has_pull_spring(config, &view.id) && may_pull(self.supervisor.policy(), &view.id);
        let docs = payload::discovery(&d, view);
        if payload::has_door_sensor(view) {
            self.doors_announced.insert(view.id.clone());
        }
        if payload::has_certificate_expiry(view) {
            self.certificates_announced.insert(view.id.clone());
        }
        for (topic, doc) in docs {
            self.publish(&topic, true, doc.to_string().into_bytes());
        }
    }

    fn on_event(&mut self, event: GatewayEvent) {
        match &event {
            GatewayEvent::LockChanged { lock } => {
                if self.connected {
                    let config = self.supervisor.config().clone();
                    let new_door =
                        payload::has_door_sensor(lock) && !self.doors_announced.contains(&lock.id);
                    let new_certificate = payload::has_certificate_expiry(lock)
                        && !self.certificates_announced.contains(&lock.id);
                    if config.mqtt.home_assistant && (new_door || new_certificate) {
                        self.publish_lock_discovery(&config, lock);
                    }
                    self.publish_state(lock);
                } else {
                    self.dirty = true;
                }
                return;
            }
            // Each step of every command, whoever sent it; MQTT's own also go to `result`.
            GatewayEvent::Command { report } if report.outcome().is_none() => return,
            GatewayEvent::SessionUp { .. }
            | GatewayEvent::SessionDown { .. }
            | GatewayEvent::Alert { .. }
            | GatewayEvent::Stalled { .. }
            | GatewayEvent::Command { .. }
            | GatewayEvent::TaskFailed { .. }
            | GatewayEvent::CertificateRenewed { .. }
            | GatewayEvent::CertificateExpiring { .. } => {}
        }
        if let Ok(json) = serde_json::to_vec(&event) {
            let topic = self.topics.events.clone();
            // Events are not retained and not re-sent: a full queue drops one.
            let _ = self.client.try_publish(
                Out {
                    topic: &topic,
                    retain: false,
                    correlation: None,
                },
                json,
            );
        }
    }

    fn on_message(&mut self, m: Message) {
        if m.topic == self.topics.ha_status {
            if m.payload.as_ref() == b"online" {
                self.home_assistant_online();
            }
            return;
        }
        let Some(lock) = self.topics.set_lock(&m.topic).map(str::to_string) else {
            return;
        };
        let oversized = m.payload.len() > payload::MAX_COMMAND_BYTES;
        let parsed = if oversized {
            Err(format!(
                "a command is at most {} bytes; this one has {}",
                payload::MAX_COMMAND_BYTES,
                m.payload.len()
            ))
        } else {
            payload::parse_set(&m.payload)
        };
        let (id, action) = match &parsed {
            Ok(c) => (c.id.clone(), Some(c.action)),
            Err(_) if oversized => (None, None),
            Err(_) => payload::id_and_action(&m.payload),
        };
        // An MQTT 5 response topic must be the gateway's own or one the operator allowed:
        // reports never go to another lock's commands, the status or discovery.
        let refused_topic = m
            .response_topic
            .as_ref()
            .filter(|t| !self.topics.response_allowed(t));
        if let Some(t) = refused_topic {
            log::warn!(
                "mqtt: command for {lock} refused: response topic {t:?} is not under {} or mqtt.response_prefixes",
                self.topics.responses
            );
        }
        let response_refused = refused_topic.is_some();
        let response_topic = m.response_topic.filter(|_| !response_refused);
        let early = if m.retain {
            // A retained command would fire again on every reconnect: never execute one.
            self.retained_refused.fetch_add(1, Ordering::Relaxed);
            let reason = "retained command; publish commands without the retain flag";
            log::warn!("mqtt: command for {lock} refused: {reason}");
            Some(Outcome::Denied {
                reason: reason.into(),
            })
        } else if response_refused {
            Some(Outcome::bad_request(format!(
                "response topic not allowed: use one under {} or set mqtt.response_prefixes",
                self.topics.responses
            )))
        } else {
            match &parsed {
                Err(e) => {
                    log::warn!("mqtt: bad command for {lock}: {e}");
                    Some(Outcome::bad_request(e.clone()))
                }
                Ok(_) => None,
            }
        };
        let reply = Reply {
            client: self.client.clone(),
            result_topic: self.topics.lock(&lock, "result"),
            response_topic,
            correlation: m.correlation,
        };
        if let Some(outcome) = early {
            let report = Report {
                id: id.unwrap_or_else(|| "-".into()),
                lock,
                action: action.unwrap_or(crate::command::Action::Read),
                step: Step::Done { outcome },
                repeated: false,
            };
            tokio::spawn(async move { reply.send(&report).await });
            return;
        }
        let Ok(mut cmd) = parsed else { return };
        if cmd.open {
            let config = self.supervisor.config();
            if !has_pull_spring(config, &lock) {
                let report = Report {
                    id: cmd.id.unwrap_or_else(|| "-".into()),
                    lock: lock.clone(),
                    action: crate::command::Action::Pull,
                    step: Step::Done {
                        outcome: Outcome::bad_request(format!(
                            "{lock} has no pull spring to open; set pull_spring = true in its [[locks]] entry if it has one"
                        )),
                    },
                    repeated: false,
                };
                tokio::spawn(async move { reply.send(&report).await });
                return;
            }
            let state = self.supervisor.registry().get(&lock).and_then(|v| v.state);
            (cmd.action, cmd.mode) = payload::open(state);
        }
        let mut reports = self.supervisor.submit(Request {
            id: cmd.id,
            lock,
            action: cmd.action,
            mode: cmd.mode,
            ttl: cmd.ttl,
            origin: MQTT_ORIGIN.into(),
            source: None,
        });
        tokio::spawn(async move {
            while let Some(report) = reports.recv().await {
                let done = report.outcome().is_some();
                reply.send(&report).await;
                if done {
                    break;
                }
            }
        });
    }

    /// Home Assistant came (back) online: announce discovery and states again — at once, and
    /// then at most once per [`ANNOUNCE_INTERVAL`] however many births arrive.
    fn home_assistant_online(&mut self) {
        let now = tokio::time::Instant::now();
        match self.announced {
            Some(at) if now < at + ANNOUNCE_INTERVAL => {
                self.announce_due = Some(at + ANNOUNCE_INTERVAL);
            }
            _ => self.announce(now),
        }
    }

    fn announce(&mut self, now: tokio::time::Instant) {
        log::info!("mqtt: Home Assistant is online; announcing the locks again");
        self.announced = Some(now);
        self.announce_due = None;
        self.publish_discovery();
        self.publish_all_states();
    }

    fn publish_metrics(&mut self) {
        let counters = self.supervisor.registry().counters();
        let doc = serde_json::json!({
            "uptime_s": self.started.elapsed().as_secs(),
            "commands": counters.commands,
            "handshakes": counters.handshakes,
            "session_drops": counters.session_drops,
            "alerts": counters.alerts,
            "stalls": counters.stalls,
            "mqtt_reconnects": self.reconnects.load(Ordering::Relaxed),
            "mqtt_retained_commands_refused": self.retained_refused.load(Ordering::Relaxed),
            "task_failures": counters.task_failures,
            "id_store_write_failures": self.supervisor.ledger().store_health().write_failures,
            "dtls_peers": self.dtls_peers.as_ref().map(|s| s.peers.load(Ordering::Relaxed)),
            "queue_depths": self.supervisor.queue_depths(),
            "tedee": self.supervisor.credentials().gateway_status(),
        });
        let topic = self.topics.metrics.clone();
        let _ = self.client.try_publish(
            Out {
                topic: &topic,
                retain: false,
                correlation: None,
            },
            doc.to_string().into_bytes(),
        );
    }
}

/// Whether `lock` is configured with a pull spring (`pull_spring = true`).
fn has_pull_spring(config: &Config, lock: &str) -> bool {
    config.locks.iter().any(|l| l.id == lock && l.pull_spring)
}

/// Whether the MQTT origin may pull `lock` (Home Assistant then offers OPEN).
fn may_pull(policy: &Policy, lock: &str) -> bool {
    let who = Who::new(MQTT_ORIGIN, None, crate::clock::unix_ms() / 1000);
    policy.allows(&who, lock, crate::command::Action::Pull)
}

/// Where a command's reports go: its lock's result topic and, under MQTT 5, the response
/// topic the command named, with its correlation data.
struct Reply {
    client: Client,
    result_topic: String,
    response_topic: Option<String>,
    correlation: Option<Bytes>,
}

impl Reply {
    async fn send(&self, report: &Report) {
        let Ok(json) = serde_json::to_vec(report) else {
            return;
        };
        let out = Out {
            topic: &self.result_topic,
            retain: false,
            correlation: self.correlation.clone(),
        };
        self.client.publish(out, json.clone()).await;
        if let Some(topic) = &self.response_topic {
            let out = Out {
                topic,
                retain: false,
                correlation: self.correlation.clone(),
            };
            self.client.publish(out, json).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_topics_name_one_lock() {
        let t = Topics::new(
            "lockbridge/hub-1",
            "homeassistant",
            &["app/replies/".into()],
        );
        assert_eq!(
            t.set_lock("lockbridge/hub-1/locks/front/set"),
            Some("front")
        );
        assert_eq!(t.set_lock("lockbridge/hub-1/locks/front/state"), None);
        assert_eq!(t.set_lock("lockbridge/hub-1/locks//set"), None);
        assert_eq!(t.set_lock("lockbridge/hub-1/locks/a/b/set"), None);
        assert_eq!(t.set_lock("lockbridge/hub-2/locks/front/set"), None);
        assert_eq!(
            t.lock("front", "result"),
            "lockbridge/hub-1/locks/front/result"
        );
        // Response topics: the gateway's own space or a configured prefix, nothing else.
        assert!(t.response_allowed("lockbridge/hub-1/responses/app-7"));
        assert!(t.response_allowed("app/replies/x"));
        for refused in [
            "lockbridge/hub-1/status",
            "lockbridge/hub-1/locks/back/set",
            "homeassistant/lock/x/config",
            "lockbridge/hub-1/responses/",
            "lockbridge/hub-1/responses/#",
            "app/replies/+",
            "app/repliesX",
        ] {
            assert!(!t.response_allowed(refused), "{refused}");
        }
    }
}
