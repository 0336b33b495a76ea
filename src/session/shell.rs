//! The session's only async code: one loop that feeds the [`Core`] what happens — commands,
//! link values and disconnects, the client's and the core's timers, slots, shutdown — and
//! carries out what it asks, on the link ([`Link`]), the lock's [`Client`], the ledger, the
//! registry and the credentials provider. It decides nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::{now, unix_ms};
use crate::command::Step;
use crate::link::{Connector, Link, LinkError, LinkEvent};
use crate::ptls::{Client, ClientConfig, ClientTiming};
use crate::slots::{Priority, SlotGuard};

use super::core::{Action, CertificateChoice, Core, LinkChange, Now, Settings, SlotChange};
use super::{Job, SessionParams};

/// How often the loop wakes with nothing to do: the liveness heartbeat and the operator's
/// request to try a parked lock again are looked at then.
const TICK: Duration = Duration::from_secs(5);

/// A link with its protocol client.
struct Live<L: Link> {
    link: L,
    client: Client,
    /// The next flush carries the command just handed to the client: a write the link
    /// provably did not deliver means the command never reached the lock.
    command_unflushed: bool,
}

struct Certificate {
    bytes: Vec<u8>,
    refresh_at: Instant,
}

type Acquire = Pin<Box<dyn Future<Output = SlotGuard> + Send>>;

/// One wake-up instant, kept across turns of the loop and moved only when it changes.
struct Timer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    at: Option<Instant>,
}

impl Default for Timer {
    fn default() -> Timer {
        Timer {
            sleep: Box::pin(tokio::time::sleep(TICK)),
            at: None,
        }
    }
}

impl Timer {
    fn set(&mut self, at: Option<Instant>) {
        if at != self.at {
            self.at = at;
            if let Some(at) = at {
                self.sleep
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(at));
            }
        }
    }

    /// Resolves at the instant set; only polled while one is.
    async fn wait(&mut self) {
        (&mut self.sleep).await;
        // Fired: the next `set` of the same instant must arm it again.
        self.at = None;
    }
}

/// What woke the loop.
enum Wake {
    Job(Option<Job>),
    Link(LinkEvent),
    ClientTimer,
    CoreTimer,
    Slot(SlotGuard),
    Waiters(usize),
    /// Look at the stop flag, the heartbeat and a parked lock's retry generation.
    Look,
}

pub struct Session<C: Connector> {
    p: SessionParams,
    connector: Arc<C>,
    jobs: mpsc::Receiver<Job>,
    stop: CancellationToken,
    core: Core,
    live: Option<Live<C::Link>>,
    slot: Option<SlotGuard>,
    /// The slot being waited for, at this priority.
    acquiring: Option<(Priority, Acquire)>,
    certificate: Option<Certificate>,
    parked_generation: u64,
}

fn stamp() -> Now {
    Now {
        at: now(),
        unix_ms: unix_ms(),
    }
}

impl<C: Connector> Session<C> {
    pub fn new(
        p: SessionParams,
        connector: Arc<C>,
        jobs: mpsc::Receiver<Job>,
        stop: CancellationToken,
    ) -> Self {
        let core = Core::new(
            Settings::from_entry(&p.entry, p.queue_depth),
            stamp(),
            OsRng.next_u64(),
        );
        Session {
            p,
            connector,
            jobs,
            stop,
            core,
            live: None,
            slot: None,
            acquiring: None,
            certificate: None,
            parked_generation: 0,
        }
    }

    fn id(&self) -> &str {
        &self.p.entry.id
    }

    pub async fn run(mut self) {
        let mut waiting = self.p.slots.waiting();
        let mut jobs_open = true;
        let mut stopping = false;
        let mut client_timer = Timer::default();
        let mut core_timer = Timer::default();
        let tick = tokio::time::sleep(TICK);
        tokio::pin!(tick);
        loop {
            self.p.heartbeat.store(unix_ms(), Ordering::Relaxed);
            if !stopping && (self.stop.is_cancelled() || !jobs_open) {
                stopping = true;
                self.core.handle_stop(stamp());
            }
            self.unpark_if_asked();
            self.carry_out().await;
            if self.core.is_stopped() {
                break;
            }
            if self.flush().await || self.drain_events() {
                continue;
            }
            self.p.queued.store(self.core.queued(), Ordering::Relaxed);
            self.want_slot();
            // The timers are kept and moved, not made anew each turn: a command takes several.
            let client_at = self.live.as_ref().and_then(|l| l.client.poll_timeout());
            let core_at = self.core.poll_timeout();
            client_timer.set(client_at);
            core_timer.set(core_at);
            if tick.is_elapsed() {
                tick.as_mut().reset(tokio::time::Instant::now() + TICK);
            }
            let wake = {
                let acquiring = &mut self.acquiring;
                let live = &mut self.live;
                let acquire = async {
                    match acquiring.as_mut() {
                        Some((_, f)) => f.await,
                        None => std::future::pending().await,
                    }
                };
                let recv = async {
                    match live.as_mut() {
                        Some(l) => l.link.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    job = self.jobs.recv(), if jobs_open => Wake::Job(job),
                    ev = recv => Wake::Link(ev),
                    _ = client_timer.wait(), if client_at.is_some() => Wake::ClientTimer,
                    _ = core_timer.wait(), if core_at.is_some() => Wake::CoreTimer,
                    guard = acquire => Wake::Slot(guard),
                    _ = waiting.changed() => Wake::Waiters(*waiting.borrow_and_update()),
                    _ = self.stop.cancelled(), if !stopping => Wake::Look,
                    _ = &mut tick => Wake::Look,
                }
            };
            match wake {
                Wake::Job(Some(job)) => {
                    self.unpark_if_asked();
                    self.core.handle_job(stamp(), job);
                }
                Wake::Job(None) => jobs_open = false,
                Wake::Link(LinkEvent::Value { channel, value }) => {
                    if let Some(l) = self.live.as_mut() {
                        l.client.handle_input(now(), channel, &value);
                    }
                }
                Wake::Link(LinkEvent::Disconnected { reason }) => {
                    self.core.handle_link(stamp(), LinkChange::Down { reason });
                }
                Wake::ClientTimer => {
                    if let Some(l) = self.live.as_mut() {
                        l.client.handle_timeout(now());
                    }
                }
                Wake::CoreTimer => self.core.handle_timeout(stamp()),
                Wake::Slot(guard) => {
                    self.acquiring = None;
                    self.slot = Some(guard);
                    self.core.handle_slot(stamp(), SlotChange::Granted);
                }
                Wake::Waiters(n) => self.core.handle_slot(stamp(), SlotChange::Waiters(n)),
                Wake::Look => {}
            }
        }
        self.close().await;
    }

    /// Wait for a slot while the core wants one, at the priority it wants.
    fn want_slot(&mut self) {
        match self.core.wants_slot() {
            None => self.acquiring = None,
            Some(priority) => {
                if self.acquiring.as_ref().is_none_or(|(p, _)| *p != priority) {
                    let slots = self.p.slots.clone();
                    self.acquiring = Some((
                        priority,
                        Box::pin(async move { slots.acquire(priority).await }),
                    ));
                }
                if self.p.slots.in_use() >= self.p.slots.total() {
                    self.core.handle_slot(stamp(), SlotChange::Full);
                }
            }
        }
    }

    /// A parked lock tries again once the provider's retry generation moved on (`lockbridge
    /// tedee fetch`).
    fn unpark_if_asked(&mut self) {
        if self.core.is_parked()
            && self.p.credentials.retry_generation(&self.p.entry) != self.parked_generation
        {
            // The core asks for the certificate again (CertificateChoice::Reload).
            self.core.handle_retry(stamp());
        }
    }

    /// Carry out every action the core has, including those its answers lead to.
    async fn carry_out(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Connect { certificate } => {
                    let change = self.connect(certificate).await;
                    if !matches!(change, LinkChange::Up { .. }) {
                        self.slot = None;
                    }
                    self.core.handle_link(stamp(), change);
                }
                Action::Record(cmd) => {
                    let recorded = self.p.ledger.sent(&cmd).map_err(|e| e.to_string());
                    self.core.handle_recorded(stamp(), recorded);
                }
                Action::Send { body, command } => {
                    let Some(l) = self.live.as_mut() else {
                        self.core.handle_not_sent(stamp(), "no link".into());
                        continue;
                    };
                    match l.client.send_command(now(), &body) {
                        Ok(()) => {
                            l.command_unflushed = command.is_some();
                            if let Some(cmd) = command.filter(|c| !c.action.is_actuating()) {
                                // An actuating command's `sent` step came with its record.
                                self.p.ledger.step(&cmd, Step::Sent);
                            }
                        }
                        Err(e) => self.core.handle_not_sent(stamp(), e.to_string()),
                    }
                }
                Action::SignedTime => self.send_signed_time(),
                Action::Close => self.close().await,
                Action::Probe => {
                    let heard = tokio::time::timeout(
                        self.p.connect_timeout,
                        self.connector.probe(&self.p.entry.serial),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(LinkError::Disconnected {
                            reason: "no answer to the presence probe".into(),
                        })
                    });
                    self.core
                        .handle_probe(stamp(), heard.map_err(|e| e.to_string()));
                }
                Action::Diagnose => {
                    let why = self.p.credentials.diagnose(&self.p.entry);
                    self.core.handle_diagnosis(stamp(), why);
                }
                Action::Park => {
                    self.parked_generation = self.p.credentials.retry_generation(&self.p.entry);
                }
                Action::Finish { command, outcome } => self.p.ledger.finish(&command, outcome),
                Action::View { at_ms, change } => {
                    self.p
                        .registry
                        .update(&self.p.entry.id, at_ms, |v| change.apply(v));
                }
                Action::Progress { at_ms } => self.p.registry.progress(&self.p.entry.id, at_ms),
                Action::Publish(event) => self.p.registry.publish(event),
            }
        }
    }

    fn send_signed_time(&mut self) {
        let Some(l) = self.live.as_mut() else {
            return;
        };
        match self.p.credentials.signed_time(&self.p.entry) {
            Ok(st) => l.client.send_signed_time(now(), &st),
            Err(e) => {
                let pending = e.is_pending();
                self.core
                    .handle_no_signed_time(stamp(), e.to_string(), pending);
            }
        }
    }

    /// Write what the client has queued. Returns whether the core was told something.
    async fn flush(&mut self) -> bool {
        let Some(l) = self.live.as_mut() else {
            return false;
        };
        while let Some(t) = l.client.poll_transmit() {
            let carried_command = std::mem::take(&mut l.command_unflushed);
            let change = match l.link.write(t.channel, &t.bytes).await {
                Ok(()) => continue,
                Err(LinkError::NotDelivered { reason }) if carried_command => {
                    LinkChange::NotDelivered { reason }
                }
                Err(LinkError::Disconnected { reason }) => LinkChange::Down { reason },
                Err(e) => LinkChange::Down {
                    reason: e.to_string(),
                },
            };
            self.core.handle_link(stamp(), change);
            return true;
        }
        false
    }

    /// Hand the client's events to the core. Returns whether there were any.
    fn drain_events(&mut self) -> bool {
        let mut any = false;
        while let Some(e) = self.live.as_mut().and_then(|l| l.client.poll_event()) {
            any = true;
            self.core.handle_event(stamp(), e);
        }
        any
    }

    /// Open the link and start the handshake, with the credentials the provider has.
    async fn connect(&mut self, choice: CertificateChoice) -> LinkChange {
        let certificate = match self.certificate_for(choice) {
            Ok(c) => c,
            Err(change) => return change,
        };
        let Some(lock_key) = self
            .p
            .credentials
            .lock_key(&self.p.entry)
            .or(self.p.lock_key)
        else {
            return LinkChange::Failed {
                reason: format!(
                    "lock {}: no public key for it yet (the credentials provider has not supplied one)",
                    self.id()
                ),
                pending: false,
            };
        };
        let link = tokio::time::timeout(
            self.p.connect_timeout,
            self.connector.connect(&self.p.entry.serial, self.p.att_mtu),
        )
        .await;
        let link = match link {
            Err(_) => {
                return LinkChange::Failed {
                    reason: format!("connect timed out after {:?}", self.p.connect_timeout),
                    pending: false,
                };
            }
            Ok(Err(e)) => {
                return LinkChange::Failed {
                    reason: e.to_string(),
                    pending: false,
                };
            }
            Ok(Ok(link)) => link,
        };
        let config = ClientConfig {
            signing_key: self.p.gateway_key.clone(),
            certificate,
            lock_public_key: lock_key,
            att_mtu: link.att_mtu(),
            timing: ClientTiming {
                command_timeout: self.p.response_timeout,
                ..ClientTiming::default()
            },
        };
        let mut client = match Client::new(config, Box::new(OsRng)) {
            Ok(c) => c,
            Err(e) => {
                let mut link = link;
                link.close().await;
                return LinkChange::Failed {
                    reason: e.to_string(),
                    pending: false,
                };
            }
        };
        client.start(now(), unix_ms());
        let rssi = link.rssi();
        self.live = Some(Live {
            link,
            client,
            command_unflushed: false,
        });
        LinkChange::Up { rssi }
    }

    fn certificate_for(&mut self, choice: CertificateChoice) -> Result<Vec<u8>, LinkChange> {
        let t = now();
        match choice {
            CertificateChoice::Cached => {
                if let Some(c) = self.certificate.as_ref().filter(|c| c.refresh_at > t) {
                    return Ok(c.bytes.clone());
                }
            }
            CertificateChoice::Reload | CertificateChoice::Fresh => self.certificate = None,
        }
        // Fresh only after the lock refused one (ALERT 0x05); renewal before expiry is the
        // provider's own business.
        let fresh = choice == CertificateChoice::Fresh;
        let bytes = self
            .p
            .credentials
            .certificate(&self.p.entry, fresh)
            .map_err(|e| LinkChange::Failed {
                reason: e.to_string(),
                pending: e.is_pending(),
            })?;
        let refresh = self.p.credentials.refresh_after(&self.p.entry, &bytes);
        self.certificate = Some(Certificate {
            bytes: bytes.clone(),
            refresh_at: t + refresh,
        });
        Ok(bytes)
    }

    /// Leave on purpose: ALERT 0x04, disconnect, give the slot back.
    async fn close(&mut self) {
        if let Some(mut l) = self.live.take() {
            l.client.close(now());
            while let Some(t) = l.client.poll_transmit() {
                if l.link.write(t.channel, &t.bytes).await.is_err() {
                    break;
                }
            }
            l.link.close().await;
        }
        self.slot = None;
    }
}
