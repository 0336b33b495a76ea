//! One session task per lock (design §1, §3, §4): connect within a slot, handshake (with the
//! trusted-time flow), track state from notifications, run commands one at a time with their
//! outcome rules, keep the link warm or drop it by policy, and reconnect with backoff.
//!
//! The at-most-once rule lives here: an actuating command's id is made durable, then the
//! command is written once. If no response comes, the outcome is `ambiguous` with the state
//! read back afterwards — on this link if it is still up, else on the next one — and the
//! command is never written again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use p256::ecdsa::{SigningKey, VerifyingKey};
use rand_core::{OsRng, RngCore};
use tokio::sync::{mpsc, watch};

use crate::clock::unix_ms;
use crate::clock::{now, sleep_until};
use crate::command::{Command, Outcome, StateReading, Step};
use crate::config::{LinkPolicy, LockEntry};
use crate::credentials::CredentialProvider;
use crate::driver::{DriveError, Driver};
use crate::ledger::Ledger;
use crate::link::{Connector, Link, LinkError};
use crate::ptls::api::{self, LockState, notif, op, result};
use crate::ptls::{self, Alert, Client, ClientConfig, ClientTiming, Event};
use crate::registry::{GatewayEvent, LinkStatus, Registry};
use crate::slots::{Priority, SlotGuard, Slots};

/// A command for this session's lock.
pub struct Job {
    pub command: Command,
    /// A read already asked once on a session that lost its answer.
    pub retried: bool,
}

/// Everything a session needs, given by the supervisor.
#[derive(Clone)]
pub struct SessionParams {
    pub entry: LockEntry,
    /// The configured key; `None` when the credentials provider supplies it.
    pub lock_key: Option<VerifyingKey>,
    pub gateway_key: SigningKey,
    pub credentials: Arc<dyn CredentialProvider>,
    pub slots: Slots,
    pub registry: Arc<Registry>,
    pub ledger: Arc<Ledger>,
    pub att_mtu: u16,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Unix ms of this task's last loop iteration, for the liveness check.
    pub heartbeat: Arc<AtomicU64>,
}

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A session holding a slot keeps it at least this long before yielding to a waiter.
const MIN_HOLD: Duration = Duration::from_secs(2);
/// How long after an accepted movement to wait for the bolt to stop.
const MOTION_LIMIT: Duration = Duration::from_secs(30);
/// How long to wait for a first state notification after a response.
const MOTION_GRACE: Duration = Duration::from_millis(800);
/// How long an ambiguous command may wait for a new link to read the state back.
const READBACK_LIMIT: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_secs(5);

enum ConnectError {
    NotRegistered,
    InvalidCert,
    /// The credentials provider is getting what the handshake needs: try again shortly.
    Pending(String),
    Other(String),
}

/// How soon a session tries again while its credentials provider fetches.
const PENDING_RETRY: Duration = Duration::from_secs(1);

enum Answer {
    Response(api::Response),
    Unanswered(String),
    LinkLost(String),
    /// The command's write provably never reached the lock.
    NotDelivered(String),
}

struct Certificate {
    bytes: Vec<u8>,
    refresh_at: Instant,
}

pub struct Session<C: Connector> {
    p: SessionParams,
    connector: Arc<C>,
    jobs: mpsc::Receiver<Job>,
    stop: watch::Receiver<bool>,
    pending: VecDeque<Job>,
    certificate: Option<Certificate>,
    cert_retry_used: bool,
    /// Set after NOT_REGISTERED or a second INVALID_CERT: no more retries until the provider's
    /// retry generation moves past `parked_generation` (the operator asked).
    parked: Option<&'static str>,
    parked_generation: u64,
    readback: Option<(Job, Instant, String)>,
    backoff: Duration,
    next_refresh: Instant,
    /// Why an on-demand lock between uses is thought unreachable (its last presence probe
    /// failed); `None` while it is heard.
    absent: Option<String>,
    next_probe: Instant,
}

impl<C: Connector> Session<C> {
    pub fn new(
        p: SessionParams,
        connector: Arc<C>,
        jobs: mpsc::Receiver<Job>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Session {
            p,
            connector,
            jobs,
            stop,
            pending: VecDeque::new(),
            certificate: None,
            cert_retry_used: false,
            parked: None,
            parked_generation: 0,
            readback: None,
            backoff: BACKOFF_MIN,
            next_refresh: now(),
            absent: None,
            next_probe: now(),
        }
    }

    fn id(&self) -> &str {
        &self.p.entry.id
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    fn beat(&self) {
        self.p.heartbeat.store(unix_ms(), Ordering::Relaxed);
    }

    fn status(&self, status: LinkStatus, error: Option<String>) {
        let available = !matches!(
            status,
            LinkStatus::Unreachable
                | LinkStatus::NotRegistered
                | LinkStatus::InvalidCert
                | LinkStatus::Stopped
        );
        self.p.registry.update(&self.p.entry.id, unix_ms(), |v| {
            v.status = status;
            v.available = available;
            if status != LinkStatus::Connected {
                v.session_established_ms = None;
                v.session_expires_ms = None;
            }
            if error.is_some() {
                v.last_error = error;
            }
        });
    }

    fn finish(&self, job: &Job, outcome: Outcome) {
        self.p.ledger.finish(&job.command, outcome);
    }

    /// The earliest deadline among waiting commands.
    fn earliest_deadline(&self) -> Option<Instant> {
        let readback = self.readback.as_ref().map(|r| r.1);
        self.pending
            .iter()
            .map(|j| j.command.deadline)
            .chain(readback)
            .min()
    }

    /// Commands whose deadline passed before they were sent: expired, never sent.
    fn expire_pending(&mut self) {
        let t = now();
        let (late, keep): (Vec<Job>, Vec<Job>) = self
            .pending
            .drain(..)
            .partition(|j| j.command.deadline <= t);
        self.pending = keep.into();
        for job in late {
            self.finish(&job, Outcome::Expired);
        }
        if let Some((_, deadline, _)) = &self.readback {
            if *deadline <= t {
                if let Some((job, _, reason)) = self.readback.take() {
                    self.finish(
                        &job,
                        Outcome::Ambiguous {
                            state: None,
                            reason,
                        },
                    );
                }
            }
        }
    }

    /// A parked lock tries again once the provider's retry generation moved on (`lockbridge
    /// tedee fetch`). Returns whether it did.
    fn unpark_if_asked(&mut self) -> bool {
        if self.p.credentials.retry_generation(&self.p.entry) == self.parked_generation {
            return false;
        }
        log::info!(LOCK_ID = self.id(); "lock {}: trying again, as the operator asked", self.id());
        self.parked = None;
        self.cert_retry_used = false;
        self.certificate = None;
        self.status(LinkStatus::Idle, None);
        true
    }

    fn park(&mut self, reason: &'static str) {
        self.parked = Some(reason);
        self.parked_generation = self.p.credentials.retry_generation(&self.p.entry);
    }

    fn fail_pending(&mut self, reason: &str) {
        for job in std::mem::take(&mut self.pending) {
            self.finish(&job, Outcome::failed(reason));
        }
        if let Some((job, _, why)) = self.readback.take() {
            self.finish(
                &job,
                Outcome::Ambiguous {
                    state: None,
                    reason: why,
                },
            );
        }
    }

    pub async fn run(mut self) {
        loop {
            self.beat();
            if self.stopping() {
                break;
            }
            self.expire_pending();
            if let Some(reason) = self.parked {
                if self.unpark_if_asked() {
                    continue;
                }
                self.fail_pending(reason);
                tokio::select! {
                    job = self.jobs.recv() => match job {
                        // The operator may have asked for another try since the last look.
                        Some(job) if self.unpark_if_asked() => self.pending.push_back(job),
                        Some(job) => self.finish(&job, Outcome::failed(reason)),
                        None => break,
                    },
                    _ = self.stop.changed() => {}
                    _ = tokio::time::sleep(TICK) => {}
                }
                continue;
            }
            let need = self.p.entry.link == LinkPolicy::Persistent
                || !self.pending.is_empty()
                || self.readback.is_some()
                || now() >= self.next_refresh;
            if !need {
                match self.absent.clone() {
                    None => self.status(LinkStatus::Idle, None),
                    Some(why) => self.status(LinkStatus::Unreachable, Some(why)),
                }
                let refresh = tokio::time::Instant::from_std(self.next_refresh);
                let probe = self
                    .probes()
                    .then(|| tokio::time::Instant::from_std(self.next_probe));
                tokio::select! {
                    job = self.jobs.recv() => match job {
                        Some(job) => self.pending.push_back(job),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(refresh) => {}
                    _ = sleep_until(probe) => self.probe().await,
                    _ = self.stop.changed() => {}
                    _ = tokio::time::sleep(TICK) => {}
                }
                continue;
            }
            let priority = if self.pending.is_empty() && self.readback.is_none() {
                Priority::Background
            } else {
                Priority::Command
            };
            if self.p.slots.in_use() >= self.p.slots.total() {
                self.status(LinkStatus::WaitingForSlot, None);
            }
            let deadline = self.earliest_deadline().map(tokio::time::Instant::from_std);
            let slots = self.p.slots.clone();
            let guard = tokio::select! {
                g = slots.acquire(priority) => g,
                job = self.jobs.recv() => {
                    match job {
                        Some(job) => self.pending.push_back(job),
                        None => break,
                    }
                    continue;
                }
                _ = sleep_until(deadline) => continue,
                _ = self.stop.changed() => continue,
                _ = tokio::time::sleep(TICK) => continue,
            };
            self.status(LinkStatus::Connecting, None);
            match self.connect().await {
                Ok(driver) => {
                    self.absent = None;
                    self.backoff = BACKOFF_MIN;
                    self.cert_retry_used = false;
                    self.serve(driver, guard).await;
                }
                Err(e) => {
                    drop(guard);
                    self.on_connect_error(e).await;
                }
            }
        }
        self.fail_pending("shutting-down");
        self.status(LinkStatus::Stopped, None);
    }

    /// An on-demand lock between uses is listened for, so that its availability says whether
    /// it can be reached (`presence_s`; 0 turns it off).
    fn probes(&self) -> bool {
        self.p.entry.link == LinkPolicy::OnDemand && self.p.entry.presence_s > 0
    }

    /// Is the lock on the air? Not connecting: a scan for its advertisement.
    async fn probe(&mut self) {
        self.next_probe = now() + Duration::from_secs(self.p.entry.presence_s);
        let serial = self.p.entry.serial.clone();
        let heard = tokio::time::timeout(self.p.connect_timeout, self.connector.probe(&serial))
            .await
            .unwrap_or_else(|_| {
                Err(LinkError::Disconnected {
                    reason: "no answer to the presence probe".into(),
                })
            });
        match heard {
            Ok(()) => {
                if self.absent.take().is_some() {
                    log::info!(LOCK_ID = self.id(); "lock {}: on the air again", self.id());
                }
            }
            Err(e) => {
                if self.absent.is_none() {
                    log::warn!(LOCK_ID = self.id(); "lock {}: not on the air ({e}); it shows unavailable until it is heard again",
                        self.id()
                    );
                }
                self.absent = Some(format!("not on the air: {e}"));
            }
        }
    }

    async fn on_connect_error(&mut self, e: ConnectError) {
        match e {
            ConnectError::NotRegistered => {
                log::error!(LOCK_ID = self.id(); "lock {}: NOT_REGISTERED — the lock was reset or removed; re-add it, then restart lockbridge",
                    self.id()
                );
                self.park("not-registered");
                self.status(
                    LinkStatus::NotRegistered,
                    Some("lock is not registered".into()),
                );
            }
            ConnectError::InvalidCert if !self.cert_retry_used => {
                log::warn!(LOCK_ID = self.id(); "lock {}: INVALID_CERT — fetching a fresh certificate once",
                    self.id()
                );
                self.cert_retry_used = true;
                self.certificate = None;
            }
            ConnectError::InvalidCert => {
                let why = self.p.credentials.diagnose(&self.p.entry);
                log::error!(LOCK_ID = self.id(); "lock {}: INVALID_CERT again with a fresh certificate — {}",
                    self.id(),
                    why.as_deref().unwrap_or("check the credentials provider and the lock's device id")
                );
                self.park("invalid-cert");
                self.status(
                    LinkStatus::InvalidCert,
                    Some(why.unwrap_or_else(|| "certificate refused".into())),
                );
            }
            ConnectError::Pending(reason) => {
                log::info!(LOCK_ID = self.id(); "{reason}; trying again in {PENDING_RETRY:?}");
                self.status(LinkStatus::Unreachable, Some(reason));
                self.wait_until(tokio::time::Instant::now() + PENDING_RETRY)
                    .await;
            }
            ConnectError::Other(reason) => {
                log::warn!(LOCK_ID = self.id(); "lock {}: {reason}; retrying in about {:?}",
                    self.id(),
                    self.backoff
                );
                self.status(LinkStatus::Unreachable, Some(reason));
                // Jitter: wait between half and all of the backoff.
                let half = self.backoff / 2;
                let jitter =
                    Duration::from_millis(OsRng.next_u64() % (half.as_millis() as u64 + 1));
                let until = tokio::time::Instant::now() + half + jitter;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                self.wait_until(until).await;
            }
        }
    }

    /// Wait until `until` for a retry, taking jobs and expiring them meanwhile.
    async fn wait_until(&mut self, until: tokio::time::Instant) {
        loop {
            self.expire_pending();
            let deadline = self.earliest_deadline().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                job = self.jobs.recv() => match job {
                    Some(job) => self.pending.push_back(job),
                    None => break,
                },
                _ = sleep_until(deadline) => {}
                _ = self.stop.changed() => break,
            }
        }
    }

    fn current_certificate(&mut self) -> Result<Vec<u8>, ConnectError> {
        let t = now();
        if let Some(c) = &self.certificate {
            if c.refresh_at > t {
                return Ok(c.bytes.clone());
            }
        }
        // Fresh only after the lock refused one (ALERT 0x05); renewal before expiry is the
        // provider's own business.
        let fresh = self.cert_retry_used;
        let bytes = self
            .p
            .credentials
            .certificate(&self.p.entry, fresh)
            .map_err(|e| {
                if e.is_pending() {
                    ConnectError::Pending(e.to_string())
                } else {
                    ConnectError::Other(e.to_string())
                }
            })?;
        let refresh = self.p.credentials.refresh_after(&self.p.entry, &bytes);
        self.certificate = Some(Certificate {
            bytes: bytes.clone(),
            refresh_at: t + refresh,
        });
        Ok(bytes)
    }

    async fn connect(&mut self) -> Result<Driver<C::Link>, ConnectError> {
        let certificate = self.current_certificate()?;
        let lock_key = self
            .p
            .credentials
            .lock_key(&self.p.entry)
            .or(self.p.lock_key)
            .ok_or_else(|| {
                ConnectError::Other(format!(
                    "lock {}: no public key for it yet (the credentials provider has not supplied one)",
                    self.id()
                ))
            })?;
        let serial = self.p.entry.serial.clone();
        let link = tokio::time::timeout(
            self.p.connect_timeout,
            self.connector.connect(&serial, self.p.att_mtu),
        )
        .await
        .map_err(|_| {
            ConnectError::Other(format!(
                "connect timed out after {:?}",
                self.p.connect_timeout
            ))
        })?
        .map_err(|e| ConnectError::Other(e.to_string()))?;
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
        let mut client =
            Client::new(config, Box::new(OsRng)).map_err(|e| ConnectError::Other(e.to_string()))?;
        client.start(now(), unix_ms());
        let mut driver = Driver::new(link, client);
        let credentials = self.p.credentials.clone();
        let entry = self.p.entry.clone();
        let id = self.id().to_string();
        // The provider may be fetching the signed time: then this attempt ends and the next
        // comes soon, as for a certificate.
        let time_pending = std::sync::atomic::AtomicBool::new(false);
        let handshake = driver.handshake(|| {
            log::info!(LOCK_ID = id.as_str(); "lock {id}: no trusted time; sending a signed time");
            credentials
                .signed_time(&entry)
                .map_err(|e| {
                    if e.is_pending() {
                        time_pending.store(true, Ordering::Relaxed);
                        log::info!(LOCK_ID = id.as_str(); "lock {id}: {e}");
                    } else {
                        log::error!(LOCK_ID = id.as_str(); "lock {id}: {e}");
                    }
                })
                .ok()
        });
        match handshake.await {
            Ok(session_id) => {
                let at = unix_ms();
                let rssi = driver.link().rssi();
                self.p.registry.update(self.id(), at, |v| {
                    if rssi.is_some() {
                        v.rssi = rssi;
                    }
                    v.status = LinkStatus::Connected;
                    v.available = true;
                    v.last_error = None;
                    v.session_established_ms = Some(at);
                    v.session_expires_ms = Some(at + 24 * 3_600_000);
                });
                self.p.registry.progress(self.id(), at);
                self.p.registry.publish(GatewayEvent::SessionUp {
                    lock: self.id().to_string(),
                    session_id: hex::encode(session_id),
                });
                log::info!(LOCK_ID = self.id(); "lock {}: session {} up", self.id(), hex::encode(session_id));
                Ok(driver)
            }
            Err(DriveError::Closed(ptls::Error::Alert(Alert::NotRegistered))) => {
                Err(ConnectError::NotRegistered)
            }
            Err(DriveError::Closed(ptls::Error::Alert(Alert::InvalidCert))) => {
                Err(ConnectError::InvalidCert)
            }
            Err(DriveError::NoSignedTime) if time_pending.load(Ordering::Relaxed) => {
                driver.close().await;
                Err(ConnectError::Pending(format!(
                    "lock {}: waiting for a signed time",
                    self.id()
                )))
            }
            Err(e) => {
                driver.close().await;
                Err(ConnectError::Other(format!("handshake failed: {e}")))
            }
        }
    }

    /// Hold the link: run commands, follow notifications, keep alive or drop by policy.
    async fn serve(&mut self, mut driver: Driver<C::Link>, guard: SlotGuard) {
        let held_since = now();
        let policy = self.p.entry.link;
        let keepalive = Duration::from_secs(self.p.entry.keepalive_s);
        let idle = Duration::from_secs(self.p.entry.idle_disconnect_s);
        let mut keepalive_at = now() + keepalive;
        let mut idle_at = now() + idle;
        let mut waiting = self.p.slots.waiting();

        // Commands first: the ambiguous one's read-back, then what waits; refreshes after.
        if let Some((job, _, reason)) = self.readback.take() {
            let state = self.read_state(&mut driver).await.ok();
            self.finish(&job, Outcome::Ambiguous { state, reason });
        }
        while let Some(job) = self.pending.pop_front() {
            if let Err(reason) = self.execute(&mut driver, job).await {
                return self.link_down(driver, guard, reason).await;
            }
        }
        let unknown = self
            .p
            .registry
            .get(self.id())
            .is_none_or(|v| v.state.is_none());
        if unknown || now() >= self.next_refresh {
            if let Err(reason) = self.refresh(&mut driver).await {
                return self.link_down(driver, guard, reason).await;
            }
        }
        loop {
            self.beat();
            self.expire_pending();
            while let Some(job) = self.pending.pop_front() {
                if let Err(reason) = self.execute(&mut driver, job).await {
                    return self.link_down(driver, guard, reason).await;
                }
                idle_at = now() + idle;
            }
            if self.stopping() {
                driver.close().await;
                log::info!(LOCK_ID = self.id(); "lock {}: session closed (ALERT 0x04)", self.id());
                return;
            }
            if let Err(e) = driver.flush().await {
                return self.link_down(driver, guard, e.to_string()).await;
            }
            if let Err(reason) = self.handle_events(&mut driver) {
                return self.link_down(driver, guard, reason).await;
            }
            let yield_at = (*waiting.borrow() > 0)
                .then(|| tokio::time::Instant::from_std((held_since + MIN_HOLD).max(now())));
            let persistent = policy == LinkPolicy::Persistent;
            tokio::select! {
                job = self.jobs.recv() => match job {
                    Some(job) => self.pending.push_back(job),
                    None => {
                        driver.close().await;
                        return;
                    }
                },
                r = driver.step() => {
                    if let Err(e) = r {
                        return self.link_down(driver, guard, e.to_string()).await;
                    }
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(keepalive_at)), if persistent => {
                    keepalive_at = now() + keepalive;
                    if let Err(e) = self.read_state(&mut driver).await {
                        return self.link_down(driver, guard, e.to_string()).await;
                    }
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(idle_at)), if !persistent => {
                    driver.close().await;
                    log::debug!(LOCK_ID = self.id(); "lock {}: idle, link dropped", self.id());
                    self.status(LinkStatus::Idle, None);
                    return;
                }
                _ = waiting.changed() => {}
                _ = sleep_until(yield_at) => {
                    driver.close().await;
                    log::debug!(LOCK_ID = self.id(); "lock {}: link given up for a waiting lock", self.id());
                    self.status(LinkStatus::WaitingForSlot, None);
                    return;
                }
                _ = self.stop.changed() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    async fn link_down(&mut self, driver: Driver<C::Link>, guard: SlotGuard, reason: String) {
        log::warn!(LOCK_ID = self.id(); "lock {}: link lost: {reason}", self.id());
        self.p.registry.publish(GatewayEvent::SessionDown {
            lock: self.id().to_string(),
            reason: reason.clone(),
        });
        self.status(LinkStatus::Connecting, Some(reason));
        driver.close().await;
        drop(guard);
    }

    /// React to what the client reported outside a command.
    fn handle_events(&mut self, driver: &mut Driver<C::Link>) -> Result<(), String> {
        for (id, params) in driver.take_notifications() {
            self.apply_notification(driver, id, &params);
        }
        while let Some(e) = driver.client_mut().poll_event() {
            match e {
                Event::Notification { id, params } => self.apply_notification(driver, id, &params),
                Event::AlertReceived(alert) => self.p.registry.publish(GatewayEvent::Alert {
                    lock: self.id().to_string(),
                    code: alert.byte(),
                    name: alert.to_string(),
                }),
                Event::NeedSignedTime => self.send_signed_time(driver),
                Event::SessionEnded { reason } => {
                    log::info!(LOCK_ID = self.id(); "lock {}: session ended ({reason}); re-handshaking",
                        self.id()
                    );
                }
                Event::Established { session_id } => {
                    log::info!(LOCK_ID = self.id(); "lock {}: session {} up", self.id(), hex::encode(session_id));
                    self.p.registry.progress(self.id(), unix_ms());
                }
                Event::Closed(e) => return Err(e.to_string()),
                _ => {}
            }
        }
        Ok(())
    }

    fn send_signed_time(&self, driver: &mut Driver<C::Link>) {
        match self.p.credentials.signed_time(&self.p.entry) {
            Ok(st) => driver.client_mut().send_signed_time(now(), &st),
            // Fetched meanwhile; the lock asks again when it reconnects (ALERT 0x02).
            Err(e) if e.is_pending() => log::info!("lock {} needs trusted time: {e}", self.id()),
            Err(e) => log::error!("lock {} needs trusted time: {e}", self.id()),
        }
    }

    fn apply_notification(&self, driver: &mut Driver<C::Link>, id: u8, params: &[u8]) {
        let at = unix_ms();
        self.p.registry.progress(self.id(), at);
        match (id, params) {
            (notif::LOCK_STATUS_CHANGE, _) => match api::StatusChange::parse(params) {
                Ok(change) => self.p.registry.update(self.id(), at, |v| {
                    v.state = Some(change.state);
                    v.jammed = change.jammed;
                    if let Some(cause) = change.cause {
                        v.door = Some(cause.door);
                        v.last_trigger = Some(api::trigger::name(cause.trigger));
                        v.last_access_id = Some(cause.access_id);
                    }
                }),
                Err(e) => log::warn!(LOCK_ID = self.id(); "lock {}: {e}; ignored", self.id()),
            },
            (notif::BATTERY_STATE, [level, charging, ..]) => {
                self.p.registry.update(self.id(), at, |v| {
                    v.battery = Some(*level);
                    v.charging = *charging != 0;
                });
            }
            (notif::BATTERY_START_CHARGING, _) => {
                self.p.registry.update(self.id(), at, |v| v.charging = true)
            }
            (notif::BATTERY_STOP_CHARGING, _) => self
                .p
                .registry
                .update(self.id(), at, |v| v.charging = false),
            (notif::NEED_DATE_TIME, _) => self.send_signed_time(driver),
            _ => {}
        }
    }

    /// GET_STATE and GET_BATTERY into the registry.
    async fn refresh(&mut self, driver: &mut Driver<C::Link>) -> Result<(), String> {
        self.read_state(driver).await.map_err(|e| e.to_string())?;
        let battery = driver
            .command(&[op::GET_BATTERY])
            .await
            .map_err(|e| e.to_string())?;
        if let (result::SUCCESS, [level, charging, ..]) = (battery.result, battery.data.as_slice())
        {
            self.p.registry.update(self.id(), unix_ms(), |v| {
                v.battery = Some(*level);
                v.charging = *charging != 0;
            });
        }
        self.next_refresh = now() + Duration::from_secs(self.p.entry.refresh_s);
        self.handle_events(driver)
    }

    async fn read_state(
        &mut self,
        driver: &mut Driver<C::Link>,
    ) -> Result<StateReading, DriveError> {
        self.until_established(driver).await?;
        let r = driver.command(&[op::GET_STATE]).await?;
        let reading = match (r.result, r.data.as_slice()) {
            (result::SUCCESS, [state, status, ..]) => StateReading {
                state: LockState::from_byte(*state),
                jammed: *status == api::STATUS_JAMMED,
            },
            _ => return Err(DriveError::Timeout("a usable GET_STATE answer")),
        };
        let at = unix_ms();
        self.p.registry.progress(self.id(), at);
        self.p.registry.update(self.id(), at, |v| {
            v.state = Some(reading.state);
            v.jammed = reading.jammed;
        });
        for (id, params) in driver.take_notifications() {
            self.apply_notification(driver, id, &params);
        }
        Ok(reading)
    }

    /// After a mid-session re-handshake, wait until commands may be sent again.
    async fn until_established(&mut self, driver: &mut Driver<C::Link>) -> Result<(), DriveError> {
        let limit = tokio::time::Instant::now() + Duration::from_secs(35);
        while !driver.client().is_established() {
            if tokio::time::Instant::now() > limit {
                return Err(DriveError::Timeout("the session to come back"));
            }
            match driver.next_event().await? {
                Event::Closed(e) => return Err(DriveError::Closed(e)),
                Event::NeedSignedTime => self.send_signed_time(driver),
                Event::Notification { id, params } => self.apply_notification(driver, id, &params),
                _ => {}
            }
        }
        Ok(())
    }

    /// Run one command to its outcome. `Err` means the link is gone.
    async fn execute(&mut self, driver: &mut Driver<C::Link>, mut job: Job) -> Result<(), String> {
        let cmd = job.command.clone();
        if now() >= cmd.deadline {
            self.finish(&job, Outcome::Expired);
            return Ok(());
        }
        if let Err(e) = self.until_established(driver).await {
            // Not sent: it goes back to wait for the next link (its deadline still applies).
            self.pending.push_front(job);
            return Err(e.to_string());
        }
        if now() >= cmd.deadline {
            self.finish(&job, Outcome::Expired);
            return Ok(());
        }
        if cmd.action.is_actuating() {
            if let Err(e) = self.p.ledger.sent(&cmd) {
                // Not sent: without its record, a repeat after a restart could send it again.
                log::error!(LOCK_ID = self.id(); "lock {}: {e}; command {} not sent", self.id(), cmd.id);
                self.finish(
                    &job,
                    Outcome::Failed {
                        reason: "state-store".into(),
                        state: None,
                        detail: Some(format!("{e}; free space in the state directory")),
                    },
                );
                return Ok(());
            }
        } else {
            self.p.ledger.step(&cmd, Step::Sent);
        }
        if driver
            .client_mut()
            .send_command(now(), &cmd.body())
            .is_err()
        {
            // Nothing was written.
            self.finish(&job, Outcome::failed("unreachable"));
            return Ok(());
        }
        match self.await_response(driver, cmd.action.opcode()).await {
            Answer::Response(r) if r.result == result::SUCCESS => {
                let outcome = if cmd.action.is_actuating() {
                    match self.await_stable(driver).await {
                        // The lock took the command but the bolt stopped part way.
                        Some(state) if state.jammed => Outcome::Failed {
                            reason: "jammed".into(),
                            state: Some(state),
                            detail: None,
                        },
                        state => Outcome::Success {
                            state,
                            battery: None,
                        },
                    }
                } else {
                    let state = match r.data.as_slice() {
                        [s, st, ..] => Some(StateReading {
                            state: LockState::from_byte(*s),
                            jammed: *st == api::STATUS_JAMMED,
                        }),
                        _ => None,
                    };
                    let battery = self.p.registry.get(self.id()).and_then(|v| v.battery);
                    Outcome::Success { state, battery }
                };
                self.p.registry.progress(self.id(), unix_ms());
                self.finish(&job, outcome);
                Ok(())
            }
            Answer::Response(r) => {
                self.finish(&job, Outcome::failed(result::name(r.result)));
                Ok(())
            }
            Answer::Unanswered(reason) if cmd.action.is_actuating() => {
                // May have reached the lock: read the state back, never re-send.
                let state = self.read_state(driver).await.ok();
                if state.is_some() {
                    self.finish(&job, Outcome::Ambiguous { state, reason });
                    Ok(())
                } else {
                    self.readback = Some((job, now() + READBACK_LIMIT, reason));
                    Err("no answer to GET_STATE after an unanswered command".into())
                }
            }
            Answer::Unanswered(reason) => {
                // A read changes nothing, so it is asked once more, on a fresh session: records
                // are never retransmitted, so the session that lost one is out of step with
                // the lock, and the next command on it would fail too.
                if job.retried {
                    self.finish(&job, Outcome::failed("unreachable"));
                } else {
                    job.retried = true;
                    self.pending.push_front(job);
                }
                Err(reason)
            }
            Answer::NotDelivered(reason) => {
                self.finish(&job, Outcome::failed("unreachable"));
                Err(reason)
            }
            Answer::LinkLost(reason) if cmd.action.is_actuating() => {
                self.readback = Some((
                    job,
                    now() + READBACK_LIMIT,
                    format!("link lost after sending: {reason}"),
                ));
                Err(reason)
            }
            Answer::LinkLost(reason) => {
                self.finish(&job, Outcome::failed("unreachable"));
                Err(reason)
            }
        }
    }

    async fn await_response(&mut self, driver: &mut Driver<C::Link>, opcode: u8) -> Answer {
        // Only the first flush writes the command itself.
        let mut first = true;
        loop {
            match driver.flush().await {
                Ok(()) => {}
                Err(DriveError::NotDelivered(reason)) if first => {
                    return Answer::NotDelivered(reason);
                }
                Err(e) => return Answer::LinkLost(e.to_string()),
            }
            first = false;
            while let Some(e) = driver.client_mut().poll_event() {
                match e {
                    Event::Response(r) if r.opcode == opcode => return Answer::Response(r),
                    Event::CommandUnanswered { why, .. } => {
                        return Answer::Unanswered(format!("no response ({why:?})"));
                    }
                    Event::Closed(e) => return Answer::LinkLost(e.to_string()),
                    Event::Notification { id, params } => {
                        self.apply_notification(driver, id, &params)
                    }
                    Event::NeedSignedTime => self.send_signed_time(driver),
                    _ => {}
                }
            }
            self.beat();
            if let Err(e) = driver.step().await {
                return Answer::LinkLost(e.to_string());
            }
        }
    }

    /// After an accepted movement: the state where the bolt stops.
    async fn await_stable(&mut self, driver: &mut Driver<C::Link>) -> Option<StateReading> {
        let started = tokio::time::Instant::now();
        let mut moving = false;
        loop {
            let limit = if moving { MOTION_LIMIT } else { MOTION_GRACE };
            if started.elapsed() > limit {
                break;
            }
            let remaining = limit.saturating_sub(started.elapsed());
            let event = tokio::time::timeout(remaining, driver.next_event()).await;
            match event {
                Err(_) => break,
                Ok(Err(_)) => return None,
                Ok(Ok(Event::Notification { id, params })) => {
                    self.apply_notification(driver, id, &params);
                    if let (notif::LOCK_STATUS_CHANGE, Ok(change)) =
                        (id, api::StatusChange::parse(&params))
                    {
                        if change.state.is_stable() {
                            return Some(StateReading {
                                state: change.state,
                                jammed: change.jammed,
                            });
                        }
                        moving = true;
                    }
                }
                Ok(Ok(Event::NeedSignedTime)) => self.send_signed_time(driver),
                Ok(Ok(_)) => {}
            }
        }
        // No movement reported (already there) or the stop was missed: ask.
        self.read_state(driver).await.ok()
    }
}
