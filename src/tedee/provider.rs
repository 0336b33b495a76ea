//! The `tedee` credentials provider (tedee-cloud.md Part A §1, §3, §5): certificates, the lock's
//! key and signed time from Tedee's cloud.
//!
//! Sessions never wait on the cloud. They read what the provider holds (a certificate cached on
//! disk or fetched by the worker); what they need and it does not hold yet — a certificate on
//! first start, a fresh one after ALERT 0x05, a signed time — they ask for, get a
//! [`CredentialError::Pending`] and retry with their own backoff, by which time the worker task
//! has made the call. The worker alone talks to Tedee, under [`super::policy::Policy`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::VerifyingKey;
use rand_core::{OsRng, RngCore};
use tokio::sync::{mpsc, oneshot};

use super::api::{AccountLock, Api, CallError, CertificateAnswer, Pak};
use super::policy::{Outcome, Policy, Purpose, Wait};
use super::store::{LockRecord, Registration, Store};
use crate::config::{Config, LockEntry};
use crate::credentials::{CredentialError, CredentialProvider};
use crate::ptls::api::SignedTime;

/// At most one forced fetch per lock in this long (Part A §5.4).
const FORCED_EVERY: Duration = Duration::from_secs(600);
/// Locks that ask for a signed time within this share one answer (§5.5).
const SIGNED_TIME_SHARED: Duration = Duration::from_secs(30);
/// A refused call that no retry can cure is tried again at most this often for its lock.
const REFUSED_RETRY: Duration = Duration::from_secs(3600);
/// Certificates whose expiry is unreadable are refreshed this often (E-21).
const UNREADABLE_EXPIRY_REFRESH: Duration = Duration::from_secs(86_400);
/// Warn hourly (E-22) once a certificate that cannot be renewed is this close to expiry.
const EXPIRY_WARNING: Duration = Duration::from_secs(86_400);
/// How often a refused key's file is looked at again (it costs nothing).
const KEY_RECHECK: Duration = Duration::from_secs(10);

/// What the provider knows of one lock.
#[derive(Default)]
struct LockCreds {
    /// The config's lock id, for messages and the registry.
    id: String,
    /// From the config, else looked up from the account by serial.
    device_id: Option<u32>,
    /// A configured `public_key` pins the cloud's (E-16).
    pinned: Option<[u8; 65]>,
    record: Option<LockRecord>,
    certificate: Vec<u8>,
    key: Option<VerifyingKey>,
    /// A lock-level refusal (E-10, E-11, E-14, E-15, E-16): the message.
    problem: Option<String>,
    last_error: Option<String>,
    last_fetch_ok_ms: Option<u64>,
    /// The last forced fetch was asked then; it is still to be made while `forced_pending`.
    forced_at: Option<Instant>,
    forced_pending: bool,
    /// When a certificate was last fetched (for E-17: refused seconds after).
    fetched_at: Option<Instant>,
    /// When the worker next calls for this lock.
    next_try: Option<Instant>,
    expiry_warned_at: Option<Instant>,
    access_removed: bool,
    /// Moves on each `lockbridge tedee fetch` of this lock: a parked session tries again.
    generation: u64,
}

#[derive(Default)]
struct State {
    locks: HashMap<String, LockCreds>,
    signed: Option<(Instant, SignedTime)>,
    signed_asked: bool,
    mobile_id: Option<String>,
    registration_gone: bool,
    last_error: Option<String>,
    requests_last_hour: usize,
    paused_until_ms: Option<u64>,
}

/// What a session, or the operator, asks the worker for.
enum Ask {
    Forced(String),
    SignedTime,
    /// `lockbridge tedee fetch`: these serials (all when empty) now, one answer per lock.
    Operator(Vec<String>, oneshot::Sender<Vec<serde_json::Value>>),
}

pub struct TedeeProvider {
    state: Arc<Mutex<State>>,
    asks: mpsc::UnboundedSender<Ask>,
}

impl TedeeProvider {
    /// Load the key (E-01, E-02), the API (E-05) and the state; refuse a registration made for
    /// another key or URL (E-12); then start the worker. Errors here stop the daemon.
    pub fn start(
        config: Arc<Config>,
        gateway_key: &VerifyingKey,
        registry: Arc<crate::registry::Registry>,
    ) -> Result<TedeeProvider, CredentialError> {
        let t = &config.credentials.tedee;
        let dir = &config.gateway.state_dir;
        let fail = |m: String| CredentialError::Tedee(m);
        let extra = (!t.extra_ca_file.is_empty()).then(|| dir.join(&t.extra_ca_file));
        let api = Api::new(t, extra.as_deref()).map_err(fail)?;
        let pak_path = dir.join(&t.pak_file);
        let key = Pak::read(&pak_path).map_err(fail)?;
        let store = Store::open(dir).map_err(fail)?;
        let point = super::api::point(gateway_key);
        let registration = store.registration();
        if let Some(r) = &registration {
            if r.public_key != B64.encode(point) || r.api_url != t.api_url {
                return Err(fail(format!(
                    "The gateway key (or Tedee URL) changed since this hub was registered as mobile {}. Run `lockbridge tedee register` to register the new key, or restore the old key.",
                    r.mobile_id
                )));
            }
        }
        let mut state = State {
            mobile_id: registration.as_ref().map(|r| r.mobile_id.clone()),
            ..State::default()
        };
        for entry in &config.locks {
            let mut creds = LockCreds {
                id: entry.id.clone(),
                device_id: entry.device_id,
                pinned: entry.public_key.map(|k| super::api::point(&k.0)),
                ..LockCreds::default()
            };
            // A cached certificate is used only for the registration it was fetched under.
            if let Some(record) = store.lock(&entry.serial).filter(|r| {
                Some(&r.mobile_id) == state.mobile_id.as_ref()
                    && entry.device_id.is_none_or(|d| d == r.device_id)
            }) {
                if let Err(e) = install(&mut creds, &record) {
                    log::warn!(
                        "tedee: lock {}: the cached certificate is not usable ({e}); fetching a new one",
                        entry.id
                    );
                } else {
                    creds.device_id = Some(record.device_id);
                }
            }
            state.locks.insert(entry.serial.clone(), creds);
        }
        let state = Arc::new(Mutex::new(state));
        let (asks, rx) = mpsc::unbounded_channel();
        let worker = Worker {
            config: config.clone(),
            api,
            key,
            pak_path,
            store,
            policy: Policy::new(t.max_requests_per_hour),
            state: state.clone(),
            registration,
            point,
            registry,
            reregistered_at: None,
        };
        tokio::spawn(worker.run(rx));
        Ok(TedeeProvider { state, asks })
    }

    fn with_lock<T>(&self, serial: &str, f: impl FnOnce(&mut LockCreds) -> T) -> Option<T> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.locks.get_mut(serial).map(f)
    }
}

/// Decode a stored record into the lock's usable certificate and key.
fn install(creds: &mut LockCreds, record: &LockRecord) -> Result<(), String> {
    let certificate = B64
        .decode(&record.certificate)
        .map_err(|_| "certificate is not Base64".to_string())?;
    let point: [u8; 65] = B64
        .decode(&record.device_public_key)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("device_public_key is not a 65-byte point")?;
    let key = crate::ptls::wire::decode_point(&point)
        .map(VerifyingKey::from)
        .map_err(|_| "device_public_key is not a P-256 point".to_string())?;
    if let Some(pinned) = creds.pinned {
        if pinned != point {
            return Err(format!(
                "Tedee reports a different public key for lock `{}` than the one pinned in the config. If the lock was reset and added again, remove or update public_key.",
                creds.id
            ));
        }
    }
    creds.certificate = certificate;
    creds.key = Some(key);
    creds.record = Some(record.clone());
    Ok(())
}

fn now_ms() -> u64 {
    crate::clock::unix_ms()
}

impl CredentialProvider for TedeeProvider {
    fn certificate(&self, lock: &LockEntry, fresh: bool) -> Result<Vec<u8>, CredentialError> {
        let now = Instant::now();
        let mut ask = false;
        let result = self
            .with_lock(&lock.serial, |c| {
                if let Some(problem) = &c.problem {
                    return Err(CredentialError::Tedee(problem.clone()));
                }
                if fresh {
                    let recent = c.forced_at.is_some_and(|t| now < t + FORCED_EVERY);
                    if !recent {
                        c.forced_at = Some(now);
                        c.forced_pending = true;
                        ask = true;
                    }
                    if c.forced_pending {
                        return Err(CredentialError::Pending(format!(
                            "lock {}: fetching a fresh certificate from Tedee",
                            c.id
                        )));
                    }
                }
                let expired = c
                    .record
                    .as_ref()
                    .and_then(|r| r.expiration_ms)
                    .is_some_and(|e| e <= now_ms());
                match (&c.record, expired) {
                    (Some(_), false) => Ok(c.certificate.clone()),
                    (Some(r), true) => Err(CredentialError::Tedee(format!(
                        "lock {}: its certificate expired at {} and could not be renewed: {}",
                        c.id,
                        r.expiration,
                        c.last_error.as_deref().unwrap_or("no answer yet")
                    ))),
                    (None, _) => Err(CredentialError::Pending(format!(
                        "lock {}: no certificate from Tedee yet{}",
                        c.id,
                        c.last_error
                            .as_deref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    ))),
                }
            })
            .unwrap_or_else(|| {
                Err(CredentialError::Tedee(format!(
                    "lock {} is not configured",
                    lock.id
                )))
            });
        if ask {
            let _ = self.asks.send(Ask::Forced(lock.serial.clone()));
        }
        result
    }

    fn signed_time(&self, _lock: &LockEntry) -> Result<SignedTime, CredentialError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, st)) = &s.signed {
            if at.elapsed() < SIGNED_TIME_SHARED {
                return Ok(st.clone());
            }
        }
        if !s.signed_asked {
            s.signed_asked = true;
            let _ = self.asks.send(Ask::SignedTime);
        }
        Err(CredentialError::Pending(
            "asked Tedee for a signed time".into(),
        ))
    }

    fn lock_key(&self, lock: &LockEntry) -> Option<VerifyingKey> {
        self.with_lock(&lock.serial, |c| c.key).flatten()
    }

    fn refresh_after(&self, lock: &LockEntry, _certificate: &[u8]) -> Duration {
        let at = self
            .with_lock(&lock.serial, |c| c.record.as_ref().map(|r| r.refresh_at_ms))
            .flatten();
        match at {
            // Read the provider's copy again soon after it has been renewed.
            Some(ms) => {
                Duration::from_millis(ms.saturating_sub(now_ms())).max(Duration::from_secs(1))
            }
            None => Duration::from_secs(1),
        }
    }

    fn diagnose(&self, lock: &LockEntry) -> Option<String> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let c = s.locks.get(&lock.serial)?;
        if c.access_removed {
            return c.problem.clone();
        }
        if s.registration_gone {
            return s.last_error.clone();
        }
        if c.fetched_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return Some(format!(
                "Lock `{}` refuses a certificate Tedee issued seconds ago. Likely causes: the lock's clock, restricted access (guest time window), or the lock was re-added. Parked; `lockbridge tedee fetch {}` retries.",
                c.id, c.id
            ));
        }
        None
    }

    fn status(&self, lock: &LockEntry) -> Option<serde_json::Value> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let c = s.locks.get(&lock.serial)?;
        Some(lock_status(c))
    }

    fn gateway_status(&self) -> Option<serde_json::Value> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Some(serde_json::json!({
            "mobile_id": s.mobile_id,
            "requests_last_hour": s.requests_last_hour,
            "paused_until": s.paused_until_ms,
            "last_error": s.last_error,
        }))
    }

    fn retry_generation(&self, lock: &LockEntry) -> u64 {
        self.with_lock(&lock.serial, |c| c.generation)
            .unwrap_or_default()
    }

    fn fetch_now(&self, serials: Vec<String>) -> Option<oneshot::Receiver<Vec<serde_json::Value>>> {
        let (tx, rx) = oneshot::channel();
        self.asks.send(Ask::Operator(serials, tx)).ok()?;
        Some(rx)
    }
}

fn lock_status(c: &LockCreds) -> serde_json::Value {
    serde_json::json!({
        "provider": "tedee",
        "cert_expires": c.record.as_ref().and_then(|r| r.expiration_ms),
        "cert_refresh_at": c.record.as_ref().map(|r| r.refresh_at_ms),
        "last_fetch_ok": c.last_fetch_ok_ms,
        "last_error": c.problem.as_ref().or(c.last_error.as_ref()),
    })
}

/// The task that alone calls Tedee.
struct Worker {
    config: Arc<Config>,
    api: Api,
    key: Pak,
    pak_path: std::path::PathBuf,
    store: Store,
    policy: Policy,
    state: Arc<Mutex<State>>,
    registration: Option<Registration>,
    point: [u8; 65],
    registry: Arc<crate::registry::Registry>,
    reregistered_at: Option<Instant>,
}

/// A call that could not go yet, or failed: when to try again.
enum Step {
    Done,
    RetryAt(Instant),
    /// Nothing can go until the key file changes.
    KeyRefused,
}

/// Why a call gave nothing: `error` is `None` when the policy held it back (it never went).
struct Fail {
    step: Step,
    error: Option<CallError>,
}

impl Worker {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(mut self, mut asks: mpsc::UnboundedReceiver<Ask>) {
        // What the cache holds, on every lock's view from the start.
        let views: Vec<(String, serde_json::Value)> = self
            .state()
            .locks
            .values()
            .map(|c| (c.id.clone(), lock_status(c)))
            .collect();
        for (id, status) in views {
            self.registry
                .update(&id, now_ms(), |v| v.credentials = Some(status));
        }
        let mut signed_wanted = false;
        let mut forced: Vec<String> = Vec::new();
        let mut operator: Vec<(Vec<String>, oneshot::Sender<Vec<serde_json::Value>>)> = Vec::new();
        let mut setup_done = false;
        let mut next_setup = Instant::now();
        loop {
            let now = Instant::now();
            if self.policy.key_refused() {
                self.recheck_key();
            }
            for (serials, answer) in std::mem::take(&mut operator) {
                // The operator's request clears the waits a lock's own failures set (never the
                // budget, a 429 pause or a refused key), and lists the account again when a lock
                // is not mapped to a device yet.
                if !self.policy.key_refused() && (!setup_done || self.unmapped(&serials)) {
                    if let Step::Done = self.setup().await {
                        setup_done = true;
                    }
                }
                let results = self.operator_fetch(serials).await;
                let _ = answer.send(results);
            }
            if !self.policy.key_refused() {
                if !setup_done && now >= next_setup {
                    match self.setup().await {
                        Step::Done => setup_done = true,
                        Step::RetryAt(t) => next_setup = t,
                        Step::KeyRefused => {}
                    }
                }
                if setup_done {
                    for serial in std::mem::take(&mut forced) {
                        self.fetch(&serial, true).await;
                    }
                    self.fetch_due().await;
                }
                if signed_wanted {
                    match self.fetch_signed_time().await {
                        Step::Done | Step::KeyRefused => signed_wanted = false,
                        Step::RetryAt(_) => {}
                    }
                }
            }
            self.publish_status();
            let wake = self.next_wake(setup_done, next_setup, signed_wanted);
            tokio::select! {
                ask = asks.recv() => match ask {
                    Some(Ask::Forced(serial)) => forced.push(serial),
                    Some(Ask::SignedTime) => signed_wanted = true,
                    Some(Ask::Operator(serials, answer)) => operator.push((serials, answer)),
                    None => return,
                },
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
            }
        }
    }

    fn next_wake(&mut self, setup_done: bool, next_setup: Instant, signed: bool) -> Instant {
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(3600);
        if self.policy.key_refused() {
            return now + KEY_RECHECK;
        }
        if !setup_done {
            wake = wake.min(next_setup);
        }
        if signed {
            wake = wake.min(
                self.policy
                    .retry_at(&Purpose::SignedTime)
                    .unwrap_or(now + Duration::from_secs(1)),
            );
        }
        let s = self.state();
        let unix_now = now_ms();
        for c in s.locks.values() {
            match (c.next_try, &c.record) {
                (Some(t), _) => wake = wake.min(t),
                (None, Some(r)) if c.problem.is_none() => {
                    let left = Duration::from_millis(r.refresh_at_ms.saturating_sub(unix_now));
                    wake = wake.min(now + left);
                }
                _ => {}
            }
        }
        drop(s);
        // Nothing can go before a 429's pause ends.
        if let Some(p) = self.policy.paused_until(now) {
            wake = wake.max(p);
        }
        wake.max(now + Duration::from_millis(10))
    }

    /// After a 401: is there a new key in the file?
    fn recheck_key(&mut self) {
        if let Ok(key) = Pak::read(&self.pak_path) {
            if !key.same(&self.key) {
                log::info!(
                    "tedee: {} holds a new key (`{}…`); calls resume",
                    self.pak_path.display(),
                    key.prefix()
                );
                self.key = key;
                self.policy.key_replaced();
                self.state().last_error = None;
            }
        }
    }

    /// One call, under the policy. `Err(step)` when it could not go or failed.
    async fn call<T, F>(&mut self, purpose: Purpose, what: &str, f: F) -> Result<T, Fail>
    where
        F: AsyncFn(&Api, &Pak) -> Result<T, CallError>,
    {
        let now = Instant::now();
        if let Err(wait) = self.policy.check(now, &purpose) {
            let step = match wait {
                Wait::Until(t, reason) => {
                    if reason == super::policy::Reason::Budget {
                        log::info!(
                            "tedee: {what} waits {} s: this hub's ceiling of {} requests per hour is reached",
                            (t - now).as_secs(),
                            self.config.credentials.tedee.max_requests_per_hour
                        );
                    }
                    Step::RetryAt(t)
                }
                Wait::KeyRefused => Step::KeyRefused,
            };
            return Err(Fail { step, error: None });
        }
        self.policy.note_sent(now);
        let result = f(&self.api, &self.key).await;
        match result {
            Ok(v) => {
                self.policy
                    .note_outcome(Instant::now(), &purpose, Outcome::Success, 0);
                Ok(v)
            }
            Err(CallError::Unauthorized { correlation }) => {
                // Re-read the key once: an operator may have replaced it.
                let changed = Pak::read(&self.pak_path)
                    .ok()
                    .filter(|k| !k.same(&self.key));
                if let Some(key) = changed {
                    self.key = key;
                    self.policy.note_sent(Instant::now());
                    if let Ok(v) = f(&self.api, &self.key).await {
                        return Ok(v);
                    }
                }
                self.policy
                    .note_outcome(Instant::now(), &purpose, Outcome::Unauthorized, 0);
                let message = format!(
                    "Tedee refused the personal access key `{}…`: it is wrong, expired or revoked. Create a new one and replace {}; lockbridge picks it up within a minute.{}",
                    self.key.prefix(),
                    self.pak_path.display(),
                    CallError::Unauthorized {
                        correlation: correlation.clone()
                    }
                    .tail()
                );
                log::error!("tedee: {message}");
                self.state().last_error = Some(message);
                Err(Fail {
                    step: Step::KeyRefused,
                    error: Some(CallError::Unauthorized { correlation }),
                })
            }
            Err(e) => {
                let outcome = e.outcome();
                self.policy
                    .note_outcome(Instant::now(), &purpose, outcome, OsRng.next_u64());
                let retry = match outcome {
                    Outcome::RateLimited(_) => self.policy.paused_until(Instant::now()),
                    Outcome::Transient => self.policy.retry_at(&purpose),
                    Outcome::Success | Outcome::Unauthorized | Outcome::Refused => {
                        Some(Instant::now() + REFUSED_RETRY)
                    }
                }
                .unwrap_or(Instant::now() + REFUSED_RETRY);
                let secs = retry.saturating_duration_since(Instant::now()).as_secs();
                let message = match &e {
                    CallError::Server { .. } | CallError::Network(_) => format!(
                        "{e}; retrying in {secs} s. Locks keep working with their current certificates{}",
                        self.earliest_expiry()
                            .map(|t| format!(" until {t}"))
                            .unwrap_or_default()
                    ),
                    CallError::RateLimited { .. }
                    | CallError::Unauthorized { .. }
                    | CallError::Forbidden { .. }
                    | CallError::NotFound { .. }
                    | CallError::VersionRefused { .. }
                    | CallError::Refused { .. }
                    | CallError::Protocol { .. } => e.to_string(),
                };
                log::warn!("tedee: {what}: {message}");
                self.state().last_error = Some(message);
                Err(Fail {
                    step: Step::RetryAt(retry),
                    error: Some(e),
                })
            }
        }
    }

    fn earliest_expiry(&self) -> Option<String> {
        let s = self.state();
        s.locks
            .values()
            .filter_map(|c| c.record.as_ref())
            .filter_map(|r| r.expiration_ms.map(|ms| (ms, r.expiration.clone())))
            .min()
            .map(|(_, text)| text)
    }

    /// §5.3: list the account once when anything must be fetched, then register if needed.
    async fn setup(&mut self) -> Step {
        let needs_fetch = {
            let s = self.state();
            self.registration.is_none()
                || s.locks
                    .values()
                    .any(|c| c.record.is_none() || c.device_id.is_none())
        };
        if !needs_fetch {
            return Step::Done;
        }
        let locks = match self
            .call(
                Purpose::ListLocks,
                "listing the account's locks",
                async |api, key| api.list_locks(key).await,
            )
            .await
        {
            Ok(l) => l,
            Err(Fail {
                step,
                error: Some(CallError::Forbidden { .. }),
            }) => {
                let m = format!(
                    "The Tedee key `{}…` lacks scope Device.Read, needed to list the account's locks. Edit the key's scopes in the Tedee Portal.",
                    self.key.prefix()
                );
                log::error!("tedee: {m}");
                self.state().last_error = Some(m);
                return step;
            }
            Err(f) => return f.step,
        };
        self.map_serials(&locks);
        if self.registration.is_none() {
            if let Err(step) = self.register().await {
                return step;
            }
        }
        Step::Done
    }

    /// Serial → device id; E-10 and E-11 for the locks they concern.
    fn map_serials(&mut self, locks: &[AccountLock]) {
        let on_account = locks
            .iter()
            .map(|l| format!("{} ({})", l.serial, l.name))
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = self.state();
        for (serial, c) in s.locks.iter_mut() {
            match locks.iter().find(|l| &l.serial == serial) {
                None => {
                    let m = format!(
                        "Lock `{}` (serial {serial}) is not on the Tedee account of this key. Add it in the Tedee app, or fix its serial. Locks on the account: {}",
                        c.id,
                        if on_account.is_empty() {
                            "none"
                        } else {
                            &on_account
                        }
                    );
                    log::error!("tedee: {m}");
                    c.problem = Some(m);
                }
                Some(l) if c.device_id.is_some_and(|d| d != l.id) => {
                    let m = format!(
                        "Lock `{}`: device_id {} in the config, but Tedee says serial {serial} is device {}. Remove device_id or correct it.",
                        c.id,
                        c.device_id.unwrap_or_default(),
                        l.id
                    );
                    log::error!("tedee: {m}");
                    c.problem = Some(m);
                }
                Some(l) => {
                    c.device_id = Some(l.id);
                    c.problem = None;
                    if c.record.is_none() {
                        c.next_try = Some(Instant::now());
                    }
                }
            }
        }
    }

    async fn register(&mut self) -> Result<(), Step> {
        let name = {
            let n = &self.config.credentials.tedee.mobile_name;
            if n.is_empty() {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                format!("lockbridge-{}", host.trim())
            } else {
                n.clone()
            }
        };
        let point = self.point;
        let n = name.clone();
        let id = self
            .call(
                Purpose::Register,
                "registering this hub",
                async move |api, key| api.register(key, &n, &point).await,
            )
            .await
            .map_err(|f| f.step)?;
        let r = Registration {
            api_url: self.config.credentials.tedee.api_url.clone(),
            mobile_id: id.clone(),
            mobile_name: name.clone(),
            public_key: B64.encode(self.point),
            registered_at: super::store::rfc3339(now_ms()),
        };
        if let Err(e) = self.store.save_registration(&r) {
            log::error!("tedee: {e}; the registration (mobile {id}) is kept in memory only");
        }
        log::info!("tedee: registered this hub as mobile {id} (\"{name}\")");
        self.registration = Some(r);
        let mut s = self.state();
        s.mobile_id = Some(id);
        if s.registration_gone {
            // E-13 is over.
            s.registration_gone = false;
            s.last_error = None;
        }
        Ok(())
    }

    /// Is any of these locks (all when empty) without a device id, or refused by the
    /// account listing (E-10, E-11)? Then the account is listed again first.
    fn unmapped(&self, wanted: &[String]) -> bool {
        self.state().locks.iter().any(|(serial, c)| {
            (wanted.is_empty() || wanted.contains(serial))
                && (c.device_id.is_none() || (c.problem.is_some() && !c.access_removed))
        })
    }

    /// `lockbridge tedee fetch`: each lock's certificate now, whatever its schedule or an
    /// earlier refusal (E-14 and the like) said, and its parked session let go; one answer
    /// per lock with what happened.
    async fn operator_fetch(&mut self, wanted: Vec<String>) -> Vec<serde_json::Value> {
        let serials: Vec<String> = {
            let s = self.state();
            self.config
                .locks
                .iter()
                .filter(|l| wanted.is_empty() || wanted.contains(&l.serial))
                .filter(|l| s.locks.contains_key(&l.serial))
                .map(|l| l.serial.clone())
                .collect()
        };
        let mut results = Vec::new();
        for serial in serials {
            let before = {
                let mut s = self.state();
                let Some(c) = s.locks.get_mut(&serial) else {
                    continue;
                };
                if c.access_removed {
                    c.problem = None;
                    c.access_removed = false;
                }
                c.next_try = None;
                (c.last_fetch_ok_ms, c.problem.clone())
            };
            let (before, problem) = before;
            let purpose = Purpose::Certificate(serial.clone());
            self.policy.clear_backoff(&purpose);
            let held = match self.policy.check(Instant::now(), &purpose) {
                // E-10, E-11, E-15, E-16: the account or the config must change first.
                _ if problem.is_some() => problem,
                Err(Wait::Until(t, reason)) => Some(format!(
                    "not fetched: {} for {} s more",
                    match reason {
                        super::policy::Reason::Budget => format!(
                            "this hub's ceiling of {} requests per hour is reached",
                            self.config.credentials.tedee.max_requests_per_hour
                        ),
                        super::policy::Reason::RateLimited =>
                            "Tedee's rate limit for this account holds every call".to_string(),
                        super::policy::Reason::Backoff => "the cloud is backing off".to_string(),
                    },
                    t.saturating_duration_since(Instant::now()).as_secs() + 1
                )),
                Err(Wait::KeyRefused) => self.state().last_error.clone(),
                Ok(()) => None,
            };
            if held.is_none() {
                let mobile = self.registration.as_ref().map(|r| r.mobile_id.clone());
                self.fetch(&serial, false).await;
                // The registration was found gone and made again (auto_reregister): once more.
                let now_mobile = self.registration.as_ref().map(|r| r.mobile_id.clone());
                if now_mobile.is_some() && now_mobile != mobile {
                    self.fetch(&serial, false).await;
                }
            }
            let mut s = self.state();
            let gateway_error = s.last_error.clone();
            let Some(c) = s.locks.get_mut(&serial) else {
                continue;
            };
            // Only now, with the new certificate in place, does a parked session try again.
            c.generation += 1;
            let fetched = c.last_fetch_ok_ms != before && c.last_fetch_ok_ms.is_some();
            let error = if fetched {
                None
            } else {
                held.or_else(|| c.problem.clone())
                    .or_else(|| c.last_error.clone())
                    .or(gateway_error)
                    .or_else(|| {
                        Some(match (c.device_id, &self.registration) {
                            (None, _) => "not fetched: the lock's device id is not known yet (the account was not listed)".to_string(),
                            (_, None) => "not fetched: this hub is not registered with Tedee yet".to_string(),
                            _ => "not fetched".to_string(),
                        })
                    })
            };
            results.push(serde_json::json!({
                "lock": c.id,
                "serial": serial,
                "fetched": fetched,
                "cert_expires": c.record.as_ref().and_then(|r| r.expiration_ms),
                "error": error,
            }));
        }
        results
    }

    /// Every lock whose certificate is missing or past its refresh time, in lock order.
    async fn fetch_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = {
            let s = self.state();
            let mut due: Vec<(&String, &LockCreds)> = s
                .locks
                .iter()
                .filter(|(_, c)| c.problem.is_none() || c.access_removed)
                .filter(|(_, c)| match (&c.record, c.next_try) {
                    (_, Some(t)) => t <= now,
                    (None, None) => true,
                    (Some(r), None) => r.refresh_at_ms <= now_ms(),
                })
                .collect();
            due.sort_by_key(|(_, c)| self.config.locks.iter().position(|l| l.id == c.id));
            due.into_iter().map(|(s, _)| s.clone()).collect()
        };
        for serial in due {
            if let Step::KeyRefused = self.fetch(&serial, false).await {
                return;
            }
        }
        self.warn_expiring();
    }

    /// One lock's certificate (Part A §5.4).
    async fn fetch(&mut self, serial: &str, forced: bool) -> Step {
        let (device_id, id) = {
            let s = self.state();
            match s.locks.get(serial) {
                Some(c) => (c.device_id, c.id.clone()),
                None => return Step::Done,
            }
        };
        let (Some(device_id), Some(mobile_id)) = (
            device_id,
            self.registration.as_ref().map(|r| r.mobile_id.clone()),
        ) else {
            return Step::Done;
        };
        if self.state().registration_gone && !self.config.credentials.tedee.auto_reregister {
            return Step::Done;
        }
        let purpose = Purpose::Certificate(serial.to_string());
        let m = mobile_id.clone();
        let result = self
            .call(
                purpose,
                &format!("lock {id}'s certificate"),
                async move |api, key| api.certificate(key, &m, device_id).await,
            )
            .await;
        match result {
            Ok(answer) => {
                self.accept(serial, &mobile_id, device_id, answer);
                Step::Done
            }
            Err(Fail { step, error: None }) => {
                // Held back by the policy: the lock waits its turn.
                if let Step::RetryAt(t) = step {
                    if let Some(c) = self.state().locks.get_mut(serial) {
                        c.next_try = Some(t);
                    }
                }
                step
            }
            Err(Fail {
                step,
                error: Some(e),
            }) => {
                let retry = match &step {
                    Step::RetryAt(t) => Some(*t),
                    Step::Done | Step::KeyRefused => None,
                };
                self.failed(serial, &e, retry, forced).await;
                step
            }
        }
    }

    fn accept(&mut self, serial: &str, mobile_id: &str, device_id: u32, a: CertificateAnswer) {
        let mut s = self.state();
        let Some(c) = s.locks.get_mut(serial) else {
            return;
        };
        if a.mobile_public_key != self.point {
            let m = format!(
                "Tedee issued lock `{}`'s certificate for another key than this hub's (mobile {mobile_id}). Not used. Run `lockbridge tedee register --force`.",
                c.id
            );
            log::error!("tedee: {m}");
            c.problem = Some(m);
            c.forced_pending = false;
            return;
        }
        let now = now_ms();
        let refresh_at = match a.expiration_ms {
            Some(e) if e > now => {
                let half = (e - now) / 2;
                // ±5 % of the half-life, so that locks fetched together spread their refreshes.
                let spread = half / 20;
                let jitter = if spread == 0 {
                    0
                } else {
                    OsRng.next_u64() % (2 * spread + 1)
                };
                now + half - spread + jitter
            }
            Some(_) => now + 60_000,
            None => {
                log::warn!(
                    "tedee: Lock `{}`: Tedee's expiry `{}` is unreadable; refreshing daily.",
                    c.id,
                    a.expiration
                );
                now + UNREADABLE_EXPIRY_REFRESH.as_millis() as u64
            }
        };
        let old_key = c.record.as_ref().map(|r| r.device_public_key.clone());
        let record = LockRecord {
            serial: serial.to_string(),
            device_id,
            mobile_id: mobile_id.to_string(),
            certificate: B64.encode(&a.certificate),
            expiration: a.expiration.clone(),
            expiration_ms: a.expiration_ms,
            device_public_key: B64.encode(a.device_public_key),
            fetched_at_ms: now,
            refresh_at_ms: refresh_at,
        };
        if old_key
            .as_ref()
            .is_some_and(|k| *k != record.device_public_key)
        {
            log::warn!(
                "tedee: lock {}: Tedee reports a new public key for it: the lock was probably reset and added again",
                c.id
            );
        }
        if let Err(e) = install(c, &record) {
            log::error!("tedee: {e}");
            c.problem = Some(e);
            c.forced_pending = false;
            return;
        }
        let renewed = old_key.is_some();
        c.last_fetch_ok_ms = Some(now);
        c.last_error = None;
        c.problem = None;
        c.access_removed = false;
        c.forced_pending = false;
        c.fetched_at = Some(Instant::now());
        c.next_try = None;
        c.expiry_warned_at = None;
        let id = c.id.clone();
        let status = lock_status(c);
        drop(s);
        if let Err(e) = self.store.save_lock(&record) {
            log::error!("tedee: lock {id}: {e}; the certificate is kept in memory only");
        }
        log::info!(
            "tedee: lock {id}: certificate {} (expires {}, refresh at {})",
            if renewed { "renewed" } else { "fetched" },
            record.expiration,
            super::store::rfc3339(refresh_at)
        );
        self.registry
            .update(&id, now, |v| v.credentials = Some(status));
        if renewed {
            self.registry
                .publish(crate::registry::GatewayEvent::CertificateRenewed {
                    lock: id,
                    expires_ms: record.expiration_ms,
                });
        }
    }

    async fn failed(&mut self, serial: &str, e: &CallError, retry: Option<Instant>, forced: bool) {
        let id = self
            .state()
            .locks
            .get(serial)
            .map(|c| c.id.clone())
            .unwrap_or_default();
        // A refusal naming the mobile, or a 404: is the registration gone?
        let mobile_suspect = matches!(e, CallError::NotFound { .. })
            || matches!(e, CallError::Refused { messages, .. } if messages.iter().any(|m| m.to_lowercase().contains("mobile")));
        if mobile_suspect {
            if let Some(r) = self.registration.clone() {
                let mid = r.mobile_id.clone();
                let gone = self
                    .call(
                        Purpose::Mobile,
                        "checking the registration",
                        async move |api, key| api.get_mobile(key, &mid).await,
                    )
                    .await;
                if let Err(Fail {
                    error: Some(CallError::NotFound { .. }),
                    ..
                }) = gone
                {
                    self.registration_gone(&r).await;
                    return;
                }
            }
        }
        let message = match e {
            CallError::Forbidden { .. } => Some(format!(
                "The Tedee account no longer has access to lock `{id}` (serial {serial}). Restore its access in the Tedee app; lockbridge retries hourly.{}",
                e.tail()
            )),
            CallError::RateLimited { .. }
            | CallError::Unauthorized { .. }
            | CallError::NotFound { .. }
            | CallError::VersionRefused { .. }
            | CallError::Refused { .. }
            | CallError::Server { .. }
            | CallError::Network(_)
            | CallError::Protocol { .. } => None,
        };
        let mut s = self.state();
        let Some(c) = s.locks.get_mut(serial) else {
            return;
        };
        if let Some(m) = message {
            log::error!("tedee: {m}");
            c.access_removed = true;
            c.problem = Some(m);
            c.next_try = Some(Instant::now() + REFUSED_RETRY);
        } else {
            c.last_error = Some(e.to_string());
            c.next_try = retry;
        }
        if forced {
            // The forced fetch did not happen; the session gets the old certificate back.
            c.forced_pending = false;
        }
        let status = lock_status(c);
        drop(s);
        self.registry
            .update(&id, now_ms(), |v| v.credentials = Some(status));
    }

    async fn registration_gone(&mut self, r: &Registration) {
        let expiry = self.earliest_expiry().unwrap_or_else(|| "now".into());
        let message = format!(
            "This hub's Tedee registration (mobile {}, name {}) was removed from the account, so certificates are no longer renewed; they expire at {expiry}. If that was not intended, run `lockbridge tedee register`.",
            r.mobile_id, r.mobile_name
        );
        log::error!("tedee: {message}");
        {
            let mut s = self.state();
            s.registration_gone = true;
            s.last_error = Some(message);
        }
        if self.config.credentials.tedee.auto_reregister
            && self
                .reregistered_at
                .is_none_or(|t| t.elapsed() > Duration::from_secs(86_400))
        {
            self.reregistered_at = Some(Instant::now());
            self.registration = None;
            if self.register().await.is_ok() {
                let mut s = self.state();
                for c in s.locks.values_mut() {
                    c.next_try = Some(Instant::now());
                }
            }
        }
    }

    /// §5.5: one fresh signed time, shared by the locks that ask within 30 s.
    async fn fetch_signed_time(&mut self) -> Step {
        match self
            .call(Purpose::SignedTime, "a signed time", async |api, key| {
                api.signed_time(key).await
            })
            .await
        {
            Ok(st) => {
                let mut s = self.state();
                s.signed = Some((Instant::now(), st));
                s.signed_asked = false;
                log::info!("tedee: fetched a signed time");
                Step::Done
            }
            Err(Fail { step, error }) => {
                if let Some(e @ CallError::Protocol { .. }) = &error {
                    log::warn!(
                        "tedee: Tedee's signed time was unusable ({e}); retrying with a fresh one"
                    );
                }
                if let Step::KeyRefused = step {
                    self.state().signed_asked = false;
                }
                step
            }
        }
    }

    /// E-22: hourly, for certificates within a day of expiry that cannot be renewed.
    fn warn_expiring(&mut self) {
        let now = now_ms();
        let mut events = Vec::new();
        {
            let mut s = self.state();
            for c in s.locks.values_mut() {
                let (Some(r), Some(err)) = (&c.record, &c.last_error) else {
                    continue;
                };
                let Some(e) = r.expiration_ms else { continue };
                if e <= now || e - now > EXPIRY_WARNING.as_millis() as u64 {
                    continue;
                }
                if c.expiry_warned_at
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(3600))
                {
                    continue;
                }
                c.expiry_warned_at = Some(Instant::now());
                let hours = (e - now) / 3_600_000;
                log::warn!(
                    "tedee: Lock `{}`'s certificate expires in {hours} h and cannot be renewed: {err}",
                    c.id
                );
                events.push((c.id.clone(), hours, err.clone()));
            }
        }
        for (lock, hours_left, error) in events {
            self.registry
                .publish(crate::registry::GatewayEvent::CertificateExpiring {
                    lock,
                    hours_left,
                    error,
                });
        }
    }

    fn publish_status(&mut self) {
        let now = Instant::now();
        let requests = self.policy.requests_last_hour(now);
        let paused = self
            .policy
            .paused_until(now)
            .map(|t| now_ms() + t.saturating_duration_since(now).as_millis() as u64);
        let mut s = self.state();
        s.requests_last_hour = requests;
        s.paused_until_ms = paused;
    }
}
