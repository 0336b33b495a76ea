//! The command ledger: de-duplication by id, the durable id store, and delivery of every
//! progress step and outcome to whoever waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::authority::unix_ms_now;
use crate::command::{Command, Outcome, Report, Step};
use crate::idstore::{IdStore, StoreError};
use crate::registry::{GatewayEvent, Registry};

/// What [`Ledger::begin`] found for an id.
pub enum Begin {
    /// A new command: send it to its session.
    New,
    /// Seen before and finished: this is its outcome.
    Done(Outcome),
    /// Seen before and still running: the receiver gets its remaining steps.
    InFlight,
}

/// A command in flight and everyone waiting for its steps.
type InFlight = (Command, Vec<mpsc::UnboundedSender<Report>>);

pub struct Ledger {
    store: Mutex<IdStore>,
    /// Commands in flight by id.
    waiting: Mutex<HashMap<String, InFlight>>,
    registry: Arc<Registry>,
}

impl Ledger {
    pub fn new(store: IdStore, registry: Arc<Registry>) -> Ledger {
        Ledger {
            store: Mutex::new(store),
            waiting: Mutex::new(HashMap::new()),
            registry,
        }
    }

    /// Register interest in `cmd`'s id; `tx` receives its steps from now on.
    pub fn begin(&self, cmd: &Command, tx: mpsc::UnboundedSender<Report>) -> Begin {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, list)) = waiting.get_mut(&cmd.id) {
            list.push(tx);
            return Begin::InFlight;
        }
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(outcome)) = store.get(&cmd.id, unix_ms_now()).map(|e| e.outcome.clone()) {
            return Begin::Done(outcome);
        }
        waiting.insert(cmd.id.clone(), (cmd.clone(), vec![tx]));
        Begin::New
    }

    /// Make the id durable before the command may reach the lock.
    pub fn sent(&self, cmd: &Command) -> Result<(), StoreError> {
        self.store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record_sent(&cmd.id, &cmd.lock, cmd.action, unix_ms_now())?;
        self.step(cmd, Step::Sent);
        Ok(())
    }

    pub fn step(&self, cmd: &Command, step: Step) {
        let report = Report {
            id: cmd.id.clone(),
            lock: cmd.lock.clone(),
            action: cmd.action,
            step,
            repeated: false,
        };
        if let Some((_, list)) = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&cmd.id)
        {
            list.retain(|tx| tx.send(report.clone()).is_ok());
        }
        self.registry.publish(GatewayEvent::Command { report });
    }

    /// A lock's session task died: give every command it held its one outcome. One that may
    /// have been written is `ambiguous`; the others were never sent.
    pub fn abandon(&self, lock: &str) {
        let held: Vec<Command> = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|(c, _)| c.lock == lock)
            .map(|(c, _)| c.clone())
            .collect();
        for cmd in held {
            let sent = self
                .store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&cmd.id, unix_ms_now())
                .is_some_and(|e| e.outcome.is_none());
            let outcome = if sent {
                Outcome::Ambiguous {
                    state: None,
                    reason: "the lock's session failed while the command was in flight".into(),
                }
            } else {
                Outcome::failed("internal-error")
            };
            self.finish(&cmd, outcome);
        }
    }

    /// The terminal outcome: stored, delivered, and the id no longer in flight.
    pub fn finish(&self, cmd: &Command, outcome: Outcome) {
        if let Err(e) = self
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record_done(&cmd.id, &cmd.lock, cmd.action, &outcome, unix_ms_now())
        {
            // The outcome is still delivered; a later repeat of this id would see `ambiguous`.
            log::error!("command {}: could not record its outcome: {e}", cmd.id);
        }
        log::info!(
            LOCK_ID = cmd.lock.as_str(), COMMAND_ID = cmd.id.as_str();
            "command {} ({} {} from {}): {}",
            cmd.id,
            cmd.action,
            cmd.lock,
            cmd.origin,
            serde_json::to_string(&outcome).unwrap_or_default()
        );
        self.step(cmd, Step::Done { outcome });
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cmd.id);
    }
}
