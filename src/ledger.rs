//! The command ledger: de-duplication by id, the durable id store, and delivery of every
//! progress step and outcome to whoever waits for it.
//!
//! An id belongs to its origin: the same id from another CoAP identity, the MQTT bridge or the
//! control socket is another command. Within one origin an id names one command: repeated
//! with the same lock, action and mode it is a repeat — it joins the command in flight, or
//! gets its remembered outcome, marked `repeated`, and nothing is sent again; repeated with
//! anything else it is refused `failed: id-conflict` and never answered with another
//! command's result.
//!
//! What the ledger holds in memory is the truth for this run: an id that was sent is never
//! sent again, whether or not its outcome reached the disk, and a command whose `sent` record
//! cannot be written is not sent ([`Ledger::sent`] fails and the command ends
//! `failed: state-store`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use crate::clock::unix_ms;
use crate::command::{Command, Outcome, Reason, Report, Step};
use crate::idstore::{Entry, Health, IdStore, StoreError};
use crate::registry::{GatewayEvent, Registry};

/// What [`Ledger::begin`] found for a command's id.
pub enum Begin {
    /// A new command: send it to its session.
    New,
    /// A repeat of a finished command: its outcome, to be reported as repeated.
    Done(Outcome),
    /// A repeat of a command still running: the receiver gets its remaining steps.
    InFlight,
    /// The id already names another command of this origin.
    Conflict(Outcome),
}

/// Someone waiting for a command's steps.
struct Waiter {
    tx: mpsc::UnboundedSender<Report>,
    /// Joined by a repeat of the id: its reports say so.
    repeated: bool,
}

/// A command in flight.
struct InFlight {
    cmd: Command,
    /// Its `sent` record was written: it may have reached the lock.
    sent: bool,
    waiters: Vec<Waiter>,
}

type Key = (String, String);

fn key(cmd: &Command) -> Key {
    (cmd.origin.clone(), cmd.id.clone())
}

struct Inner {
    store: IdStore,
    in_flight: HashMap<Key, InFlight>,
}

pub struct Ledger {
    inner: Mutex<Inner>,
    registry: Arc<Registry>,
}

impl Ledger {
    pub fn new(store: IdStore, registry: Arc<Registry>) -> Ledger {
        Ledger {
            inner: Mutex::new(Inner {
                store,
                in_flight: HashMap::new(),
            }),
            registry,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What opening the id store found, and appends that failed since.
    pub fn store_health(&self) -> Health {
        self.inner().store.health().clone()
    }

    /// Register interest in `cmd`'s id; `tx` receives its steps from now on.
    pub fn begin(&self, cmd: &Command, tx: mpsc::UnboundedSender<Report>) -> Begin {
        let mut inner = self.inner();
        if let Some(f) = inner.in_flight.get_mut(&key(cmd)) {
            if !same_command(&f.cmd, cmd) {
                return Begin::Conflict(Outcome::id_conflict(&describe(&f.cmd)));
            }
            f.waiters.push(Waiter { tx, repeated: true });
            return Begin::InFlight;
        }
        if let Some(e) = inner.store.get(&cmd.origin, &cmd.id, unix_ms()) {
            if !e.same_command(&cmd.lock, cmd.action, cmd.mode) {
                return Begin::Conflict(Outcome::id_conflict(&format!(
                    "{} {} from {}",
                    e.action,
                    e.lock,
                    e.origin.as_deref().unwrap_or(&cmd.origin)
                )));
            }
            // Everything the store holds is finished: what a crash left in flight was settled
            // when it was opened, and this run's commands are in flight until they finish.
            if let Some(outcome) = e.outcome.clone() {
                return Begin::Done(outcome);
            }
        }
        inner.in_flight.insert(
            key(cmd),
            InFlight {
                cmd: cmd.clone(),
                sent: false,
                waiters: vec![Waiter {
                    tx,
                    repeated: false,
                }],
            },
        );
        Begin::New
    }

    /// Make the id durable before the command may reach the lock. On `Err` the command must
    /// not be sent; the caller ends it `failed: state-store`.
    pub fn sent(&self, cmd: &Command) -> Result<(), StoreError> {
        {
            let mut inner = self.inner();
            let written = inner.store.record_sent(entry(cmd, None));
            if let Some(f) = inner.in_flight.get_mut(&key(cmd)) {
                // Known as possibly sent even if the disk refused the record: the caller
                // does not send then, but nothing may ever make this id new again.
                f.sent = written.is_ok();
            }
            written?;
        }
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
        if let Some(f) = self.inner().in_flight.get_mut(&key(cmd)) {
            f.waiters.retain(|w| {
                let mut r = report.clone();
                r.repeated = w.repeated;
                w.tx.send(r).is_ok()
            });
        }
        self.registry.publish(GatewayEvent::Command { report });
    }

    /// A lock's session task died: give every command it held its one outcome. One that may
    /// have been written is `ambiguous`; the others were never sent.
    pub fn abandon(&self, lock: &str) {
        let held: Vec<(Command, bool)> = self
            .inner()
            .in_flight
            .values()
            .filter(|f| f.cmd.lock == lock)
            .map(|f| (f.cmd.clone(), f.sent))
            .collect();
        for (cmd, sent) in held {
            let outcome = if sent {
                Outcome::Ambiguous {
                    state: None,
                    reason: "the lock's session failed while the command was in flight".into(),
                }
            } else {
                Outcome::failed(Reason::InternalError)
            };
            self.finish(&cmd, outcome);
        }
    }

    /// The terminal outcome: remembered, stored, delivered, and the id no longer in flight.
    pub fn finish(&self, cmd: &Command, outcome: Outcome) {
        let recorded = self
            .inner()
            .store
            .record_done(entry(cmd, Some(outcome.clone())));
        if let Err(e) = recorded {
            // Remembered in memory for this run; after a restart a repeat of this id sees
            // `ambiguous` if it was sent, or runs if it never was.
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
        self.inner().in_flight.remove(&key(cmd));
    }
}

fn same_command(a: &Command, b: &Command) -> bool {
    a.lock == b.lock && a.action == b.action && a.mode == b.mode
}

fn describe(cmd: &Command) -> String {
    format!("{} {} from {}", cmd.action, cmd.lock, cmd.origin)
}

fn entry(cmd: &Command, outcome: Option<Outcome>) -> Entry {
    Entry {
        id: cmd.id.clone(),
        origin: Some(cmd.origin.clone()),
        lock: cmd.lock.clone(),
        action: cmd.action,
        mode: Some(cmd.mode),
        t_ms: unix_ms(),
        outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Action, Mode};

    const DAY: u64 = 86_400_000;

    fn ledger(dir: &std::path::Path) -> Ledger {
        let store = IdStore::open(dir, DAY, unix_ms()).unwrap();
        Ledger::new(store, Arc::new(Registry::new([])))
    }

    fn command(origin: &str, id: &str, lock: &str, action: Action) -> Command {
        Command {
            id: id.into(),
            lock: lock.into(),
            action,
            mode: Mode::Normal,
            deadline: std::time::Instant::now(),
            origin: origin.into(),
        }
    }

    fn channel() -> (
        mpsc::UnboundedSender<Report>,
        mpsc::UnboundedReceiver<Report>,
    ) {
        mpsc::unbounded_channel()
    }

    // Regression: ids were one namespace, so `lock` with the id of a finished `unlock` was
    // answered `success` and never sent, and one identity received another's outcome.
    #[test]
    fn an_id_is_scoped_to_its_origin_and_never_answers_for_another_command() {
        let dir = tempfile::tempdir().unwrap();
        let l = ledger(dir.path());
        let unlock = command("alice", "x", "front", Action::Unlock);
        assert!(matches!(l.begin(&unlock, channel().0), Begin::New));
        l.finish(
            &unlock,
            Outcome::Success {
                state: None,
                battery: None,
            },
        );

        // The same id from the same origin for another action or lock: refused.
        for other in [
            command("alice", "x", "front", Action::Lock),
            command("alice", "x", "back", Action::Unlock),
            Command {
                mode: Mode::Force,
                ..unlock.clone()
            },
        ] {
            match l.begin(&other, channel().0) {
                Begin::Conflict(o) => assert_eq!(o.failure(), Some("id-conflict")),
                _ => panic!("{other:?} must conflict"),
            }
        }
        // A true repeat gets the first outcome.
        assert!(matches!(
            l.begin(&unlock, channel().0),
            Begin::Done(Outcome::Success { .. })
        ));
        // Another origin's id is its own command, in flight or not.
        let bob = command("bob", "x", "front", Action::Lock);
        let (tx, mut bob_rx) = channel();
        assert!(matches!(l.begin(&bob, tx), Begin::New));
        let mqtt = command("mqtt", "x", "front", Action::Lock);
        assert!(matches!(l.begin(&mqtt, channel().0), Begin::New));
        l.finish(&mqtt, Outcome::Expired);
        l.finish(
            &bob,
            Outcome::failed(Reason::Lock(crate::ptls::api::result::BUSY)),
        );
        let got = bob_rx.try_recv().unwrap();
        assert_eq!(got.outcome().and_then(Outcome::failure), Some("busy"));
    }

    #[test]
    fn a_repeat_in_flight_gets_the_remaining_steps_marked_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let l = ledger(dir.path());
        let cmd = command("cli", "r", "front", Action::Unlock);
        let (tx1, mut first) = channel();
        let (tx2, mut second) = channel();
        assert!(matches!(l.begin(&cmd, tx1), Begin::New));
        assert!(matches!(l.begin(&cmd, tx2), Begin::InFlight));
        l.sent(&cmd).unwrap();
        l.finish(&cmd, Outcome::Expired);
        for (rx, repeated) in [(&mut first, false), (&mut second, true)] {
            let steps: Vec<Report> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            assert_eq!(steps.len(), 2);
            assert!(steps.iter().all(|r| r.repeated == repeated), "{steps:?}");
        }
    }

    #[test]
    fn ids_survive_a_restart_scoped_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = ledger(dir.path());
            let cmd = command("cli", "d", "front", Action::Lock);
            assert!(matches!(l.begin(&cmd, channel().0), Begin::New));
            l.sent(&cmd).unwrap();
            // the daemon stops before the outcome
        }
        let l = ledger(dir.path());
        let cmd = command("cli", "d", "front", Action::Lock);
        assert!(matches!(
            l.begin(&cmd, channel().0),
            Begin::Done(Outcome::Ambiguous { .. })
        ));
        let other = command("cli", "d", "front", Action::Unlock);
        assert!(matches!(l.begin(&other, channel().0), Begin::Conflict(_)));
        assert!(matches!(
            l.begin(&command("coap", "d", "front", Action::Unlock), channel().0),
            Begin::New
        ));
    }
}
