//! The lock registry: the current view of every lock, the one source front ends read, and the
//! stream of gateway events (state changes, sessions, alerts, stalls, command reports).

use std::collections::BTreeMap;
use std::sync::RwLock;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::command::Report;
use crate::config::LinkPolicy;
use crate::ptls::api::{DoorState, LockState};

/// How the gateway is doing with a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkStatus {
    /// Not connected and not trying (on-demand between uses).
    Idle,
    WaitingForSlot,
    Connecting,
    Connected,
    /// Connection or handshake failed; retrying with backoff.
    Unreachable,
    /// The lock answered NOT_REGISTERED: it must be re-added; no retries.
    NotRegistered,
    /// The lock refused our certificate twice: credentials must be fixed; no retries.
    InvalidCert,
    Stopped,
}

#[derive(Clone, Debug, Serialize)]
pub struct LockView {
    pub id: String,
    pub serial: String,
    pub link: LinkPolicy,
    pub status: LinkStatus,
    pub state: Option<LockState>,
    pub jammed: bool,
    /// The door sensor's reading, from the long LOCK_STATUS_CHANGE (spec §5.3); `None` until
    /// the lock has sent one.
    pub door: Option<DoorState>,
    /// What caused the last state change (`button`, `remote`, `auto-lock`, `door-sensor`,
    /// `other-0xNN`) and who (the access id; 0 for the lock itself), when the lock says.
    pub last_trigger: Option<String>,
    pub last_access_id: Option<u32>,
    pub battery: Option<u8>,
    pub charging: bool,
    /// Signal strength when the link last came up (BLE).
    pub rssi: Option<i16>,
    /// The gateway can reach the lock now or on demand.
    pub available: bool,
    pub session_established_ms: Option<u64>,
    pub session_expires_ms: Option<u64>,
    pub updated_ms: u64,
    /// Last time anything went right with this lock (handshake, response, notification).
    pub progress_ms: u64,
    pub last_error: Option<String>,
    /// What the credentials provider says of this lock's certificate (the `tedee` provider:
    /// `provider`, `cert_expires`, `cert_refresh_at`, `last_fetch_ok`, `last_error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum GatewayEvent {
    LockChanged {
        lock: LockView,
    },
    SessionUp {
        lock: String,
        session_id: String,
    },
    SessionDown {
        lock: String,
        reason: String,
    },
    Alert {
        lock: String,
        code: u8,
        name: String,
    },
    /// A lock expected to be reachable made no progress for a while.
    Stalled {
        lock: String,
        since_ms: u64,
    },
    Command {
        report: Report,
    },
    /// A front-end task panicked (a bug) and was started again.
    TaskFailed {
        task: String,
        message: String,
    },
    /// A lock's certificate was renewed.
    CertificateRenewed {
        lock: String,
        expires_ms: Option<u64>,
    },
    /// A lock's certificate expires within a day and cannot be renewed (hourly).
    CertificateExpiring {
        lock: String,
        hours_left: u64,
        error: String,
    },
}

/// Counts of what went through the event stream, for metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    /// Terminal outcomes by status (a repeated id's remembered outcome is not counted again).
    pub commands: BTreeMap<&'static str, u64>,
    /// PTLS sessions established.
    pub handshakes: u64,
    pub session_drops: u64,
    /// Lock alerts by code (`"0x04 …"`, with the alert's name).
    pub alerts: BTreeMap<String, u64>,
    pub stalls: u64,
    /// Front-end tasks that panicked and were restarted.
    pub task_failures: u64,
}

impl Counters {
    fn count(&mut self, event: &GatewayEvent) {
        match event {
            GatewayEvent::Command { report } if !report.repeated => {
                if let Some(outcome) = report.outcome() {
                    *self.commands.entry(outcome.status()).or_default() += 1;
                }
            }
            GatewayEvent::SessionUp { .. } => self.handshakes += 1,
            GatewayEvent::SessionDown { .. } => self.session_drops += 1,
            GatewayEvent::Alert { code, name, .. } => {
                *self
                    .alerts
                    .entry(format!("0x{code:02x} {name}"))
                    .or_default() += 1
            }
            GatewayEvent::Stalled { .. } => self.stalls += 1,
            GatewayEvent::TaskFailed { .. } => self.task_failures += 1,
            GatewayEvent::LockChanged { .. }
            | GatewayEvent::Command { .. }
            | GatewayEvent::CertificateRenewed { .. }
            | GatewayEvent::CertificateExpiring { .. } => {}
        }
    }
}

pub struct Registry {
    locks: RwLock<BTreeMap<String, LockView>>,
    events: broadcast::Sender<GatewayEvent>,
    counters: std::sync::Mutex<Counters>,
}

impl Registry {
    pub fn new(views: impl IntoIterator<Item = LockView>) -> Registry {
        Registry {
            locks: RwLock::new(views.into_iter().map(|v| (v.id.clone(), v)).collect()),
            events: broadcast::channel(1024).0,
            counters: std::sync::Mutex::new(Counters::default()),
        }
    }

    pub fn counters(&self) -> Counters {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<GatewayEvent> {
        self.events.subscribe()
    }

    pub fn publish(&self, event: GatewayEvent) {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count(&event);
        let _ = self.events.send(event);
    }

    pub fn get(&self, id: &str) -> Option<LockView> {
        self.read().get(id).cloned()
    }

    pub fn all(&self) -> Vec<LockView> {
        self.read().values().cloned().collect()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.read().contains_key(id)
    }

    /// Change a lock's view; publishes `LockChanged` when something a reader sees changed.
    pub fn update(&self, id: &str, now_ms: u64, f: impl FnOnce(&mut LockView)) {
        let changed = {
            let mut map = self.locks.write().unwrap_or_else(|p| p.into_inner());
            let Some(view) = map.get_mut(id) else {
                return;
            };
            let before = serde_json::to_value(&*view).ok();
            f(view);
            let after = serde_json::to_value(&*view).ok();
            if before != after {
                view.updated_ms = now_ms;
                Some(view.clone())
            } else {
                None
            }
        };
        if let Some(lock) = changed {
            self.publish(GatewayEvent::LockChanged { lock });
        }
    }

    /// Mark progress without publishing a change.
    pub fn progress(&self, id: &str, now_ms: u64) {
        let mut map = self.locks.write().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = map.get_mut(id) {
            v.progress_ms = now_ms;
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, LockView>> {
        self.locks.read().unwrap_or_else(|p| p.into_inner())
    }
}
