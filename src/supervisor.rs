//! The supervisor owns every session: it keeps the lock registry, checks permissions, turns
//! requests into commands with ids and deadlines, de-duplicates ids, routes commands to the
//! lock's bounded queue, restarts a session task that dies, and shuts everything down
//! gracefully.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use p256::ecdsa::SigningKey;
use rand_core::{OsRng, RngCore};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::now;
use crate::clock::unix_ms;
use crate::command::{Action, Command, MAX_TTL, Mode, Outcome, Reason, Report, Step, check_id};
use crate::config::Config;
use crate::credentials::CredentialProvider;
use crate::ledger::{Begin, Ledger};
use crate::link::Connector;
use crate::registry::{LinkStatus, LockView, Registry};
use crate::session::{Job, Session, SessionParams};

use crate::slots::Slots;

/// A command as a front end asks for it.
#[derive(Clone, Debug)]
pub struct Request {
    /// The client's id for idempotency; one is made up when absent.
    pub id: Option<String>,
    pub lock: String,
    pub action: Action,
    pub mode: Mode,
    /// Time to live; the configured default when absent.
    pub ttl: Option<Duration>,
    pub origin: String,
    /// Where a network client came from, for `[[permissions]]` address ranges.
    pub source: Option<std::net::IpAddr>,
}

pub struct Supervisor {
    config: Arc<Config>,
    policy: crate::policy::Policy,
    registry: Arc<Registry>,
    ledger: Arc<Ledger>,
    credentials: Arc<dyn CredentialProvider>,
    queues: HashMap<String, Arc<std::sync::Mutex<mpsc::Sender<Job>>>>,
    /// Commands each session holds behind the one it runs.
    queued: HashMap<String, Arc<AtomicUsize>>,
    heartbeats: HashMap<String, Arc<AtomicU64>>,
    accepting: AtomicBool,
    /// Cancelled at shutdown: every session finishes what it holds and closes its link.
    stop: CancellationToken,
    tasks: tokio::sync::Mutex<JoinSet<()>>,
}

pub fn initial_view(entry: &crate::config::LockEntry) -> LockView {
    LockView {
        id: entry.id.clone(),
        serial: entry.serial.clone(),
        link: entry.link,
        status: LinkStatus::Idle,
        state: None,
        jammed: false,
        door: None,
        last_trigger: None,
        last_access_id: None,
        battery: None,
        charging: false,
        rssi: None,
        available: true,
        session_established_ms: None,
        session_expires_ms: None,
        updated_ms: unix_ms(),
        progress_ms: unix_ms(),
        last_error: None,
        credentials: None,
    }
}

impl Supervisor {
    /// Start one session per configured lock.
    pub fn start<C: Connector>(
        config: Arc<Config>,
        gateway_key: SigningKey,
        credentials: Arc<dyn CredentialProvider>,
        connector: Arc<C>,
        registry: Arc<Registry>,
        ledger: Arc<Ledger>,
        stop: CancellationToken,
    ) -> Supervisor {
        let slots = Slots::new(config.ble.max_connections);
        let persistent = config
            .locks
            .iter()
            .filter(|l| l.link == crate::config::LinkPolicy::Persistent)
            .count();
        if persistent > config.ble.max_connections {
            log::warn!(
                "{persistent} persistent locks but ble.max_connections = {}: they will take turns; make some on-demand",
                config.ble.max_connections
            );
        }
        let mut tasks = JoinSet::new();
        let mut queues = HashMap::new();
        let mut heartbeats = HashMap::new();
        let mut queued = HashMap::new();
        for entry in &config.locks {
            // None only under a provider that supplies the key.
            let lock_key = entry.public_key.map(|k| k.0);
            let (tx, rx) = mpsc::channel(config.commands.queue_depth);
            let heartbeat = Arc::new(AtomicU64::new(unix_ms()));
            let queue = Arc::new(std::sync::Mutex::new(tx));
            queues.insert(entry.id.clone(), queue.clone());
            heartbeats.insert(entry.id.clone(), heartbeat.clone());
            let waiting = Arc::new(AtomicUsize::new(0));
            queued.insert(entry.id.clone(), waiting.clone());
            let params = SessionParams {
                entry: entry.clone(),
                lock_key,
                gateway_key: gateway_key.clone(),
                credentials: credentials.clone(),
                slots: slots.clone(),
                registry: registry.clone(),
                ledger: ledger.clone(),
                att_mtu: config.ble.att_mtu,
                connect_timeout: Duration::from_secs(config.ble.connect_timeout_s),
                response_timeout: config.response_timeout(),
                queue_depth: config.commands.queue_depth,
                queued: waiting,
                heartbeat,
            };
            tasks.spawn(keep_running(
                params,
                connector.clone(),
                rx,
                queue,
                config.commands.queue_depth,
                stop.clone(),
            ));
        }
        Supervisor {
            policy: config.policy(),
            config,
            registry,
            ledger,
            credentials,
            queues,
            queued,
            heartbeats,
            accepting: AtomicBool::new(true),
            stop,
            tasks: tokio::sync::Mutex::new(tasks),
        }
    }

    /// Commands waiting in each lock's queue.
    pub fn queue_depths(&self) -> std::collections::BTreeMap<String, usize> {
        self.queues
            .iter()
            .map(|(id, q)| {
                let q = q.lock().unwrap_or_else(|p| p.into_inner());
                let held = self.queued.get(id).map_or(0, |n| n.load(Ordering::Relaxed));
                (id.clone(), q.max_capacity() - q.capacity() + held)
            })
            .collect()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Who may do what: the one policy every front end asks.
    pub fn policy(&self) -> &crate::policy::Policy {
        &self.policy
    }

    /// The oldest heartbeat among session tasks (Unix ms): the liveness check's input.
    pub fn oldest_heartbeat_ms(&self) -> u64 {
        self.heartbeats
            .values()
            .map(|h| h.load(Ordering::Relaxed))
            .min()
            .unwrap_or_else(unix_ms)
    }

    /// Submit a command; the receiver gets `accepted`, `sent` and exactly one `done` — or,
    /// for a repeated id, the first command's remaining steps or outcome, marked `repeated`.
    pub fn submit(&self, req: Request) -> mpsc::UnboundedReceiver<Report> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = req
            .id
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(new_id);
        let reply = |step: Step, repeated: bool| Report {
            id: id.clone(),
            lock: req.lock.clone(),
            action: req.action,
            step,
            repeated,
        };
        let done = |outcome: Outcome| {
            let _ = tx.send(reply(Step::Done { outcome }, false));
        };
        // Every surface bounds these when it parses; this is the last gate for all of them.
        if let Err(e) = check_id(&id) {
            done(Outcome::bad_request(e));
            return rx;
        }
        let ttl = req
            .ttl
            .unwrap_or(Duration::from_secs(self.config.commands.default_ttl_s));
        let Some(deadline) = (ttl <= MAX_TTL).then(|| now().checked_add(ttl)).flatten() else {
            done(Outcome::bad_request(format!(
                "ttl_s: at most {} seconds",
                MAX_TTL.as_secs()
            )));
            return rx;
        };
        let cmd = Command {
            id: id.clone(),
            lock: req.lock.clone(),
            action: req.action,
            mode: req.mode,
            deadline,
            origin: req.origin.clone(),
        };
        if !self.accepting.load(Ordering::SeqCst) {
            done(Outcome::failed(Reason::ShuttingDown));
            return rx;
        }
        if !self.registry.contains(&cmd.lock) {
            done(Outcome::failed(Reason::UnknownLock));
            return rx;
        }
        let who = crate::policy::Who::new(&cmd.origin, req.source, unix_ms() / 1000);
        if !self.policy.allows(&who, &cmd.lock, cmd.action) {
            log::warn!(
                "command {}: origin {} may not {} lock {}: denied",
                cmd.id,
                cmd.origin,
                cmd.action,
                cmd.lock
            );
            done(Outcome::Denied {
                reason: format!("{} may not {} {}", cmd.origin, cmd.action, cmd.lock),
            });
            return rx;
        }
        match self.ledger.begin(&cmd, tx.clone()) {
            Begin::Done(outcome) => {
                let _ = tx.send(reply(Step::Done { outcome }, true));
                return rx;
            }
            Begin::Conflict(outcome) => {
                log::warn!(
                    "command {} from {}: {} {} refused: the id names another command",
                    cmd.id,
                    cmd.origin,
                    cmd.action,
                    cmd.lock
                );
                done(outcome);
                return rx;
            }
            Begin::InFlight => return rx,
            Begin::New => {}
        }
        self.ledger.step(&cmd, Step::Accepted);
        let Some(queue) = self.queues.get(&cmd.lock) else {
            self.ledger
                .finish(&cmd, Outcome::failed(Reason::UnknownLock));
            return rx;
        };
        let queue = queue.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Err(e) = queue.try_send(Job {
            command: cmd.clone(),
            retried: false,
        }) {
            let reason = match e {
                // Never left the gateway (a lock that is busy says `busy` itself).
                mpsc::error::TrySendError::Full(_) => Reason::QueueFull,
                mpsc::error::TrySendError::Closed(_) => Reason::ShuttingDown,
            };
            self.ledger.finish(&cmd, Outcome::failed(reason));
        }
        rx
    }

    /// The gateway's own status, as every front end reports it: id, version, locks and
    /// sessions, what opening the command-id store found (and appends that failed since), and
    /// the credentials provider's state (the tedee provider: registration, requests this hour,
    /// a 429's pause, the last error).
    pub fn status(&self) -> serde_json::Value {
        let all = self.registry.all();
        serde_json::json!({
            "id": self.config.gateway.id,
            "version": env!("CARGO_PKG_VERSION"),
            "locks": all.len(),
            "sessions": all.iter().filter(|v| v.status == crate::registry::LinkStatus::Connected).count(),
            "id_store": self.ledger.store_health(),
            "tedee": self.credentials.gateway_status(),
        })
    }

    /// The ledger, for what the id store reports.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The credentials provider, for its status.
    pub fn credentials(&self) -> &Arc<dyn CredentialProvider> {
        &self.credentials
    }

    /// Stop taking commands, let sessions finish in-flight ones (or time out), close every link
    /// with ALERT 0x04, and wait for the tasks, at most `limit`.
    pub async fn shutdown(&self, limit: Duration) {
        self.accepting.store(false, Ordering::SeqCst);
        self.stop.cancel();
        let mut tasks = self.tasks.lock().await;
        let all = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(limit, all).await.is_err() {
            log::warn!("sessions did not stop within {limit:?}; leaving anyway");
        }
    }
}

/// Run a lock's session; if the task dies (a bug), settle the commands it held, give the lock a
/// fresh queue and session, and go on — the daemon never needs a restart for one lock.
async fn keep_running<C: Connector>(
    params: SessionParams,
    connector: Arc<C>,
    mut rx: mpsc::Receiver<Job>,
    queue: Arc<std::sync::Mutex<mpsc::Sender<Job>>>,
    depth: usize,
    stop: CancellationToken,
) {
    let mut restarts = 0u32;
    loop {
        let session = Session::new(params.clone(), connector.clone(), rx, stop.clone());
        let result = tokio::spawn(session.run()).await;
        let Err(e) = result else {
            return; // stopped normally
        };
        if stop.is_cancelled() {
            return;
        }
        restarts += 1;
        let lock = params.entry.id.clone();
        log::error!(LOCK_ID = lock.as_str(); "lock {lock}: session task failed ({e}); restarting it (restart {restarts})");
        params.ledger.abandon(&lock);
        let (tx, new_rx) = mpsc::channel(depth);
        *queue.lock().unwrap_or_else(|p| p.into_inner()) = tx;
        rx = new_rx;
        let backoff = Duration::from_secs(u64::from(restarts.min(30)));
        tokio::time::sleep(backoff).await;
    }
}

fn new_id() -> String {
    let mut b = [0u8; 8];
    OsRng.fill_bytes(&mut b);
    hex::encode(b)
}
