//! Commands and their outcomes (design §3, the safety core).
//!
//! Every command — from the control socket, and later CoAP and MQTT — becomes one [`Command`]
//! and gets exactly one terminal [`Outcome`], after the progress steps `accepted` and `sent`.

use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ptls::api::{LockState, mode, op};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Read state and battery.
    Read,
    Lock,
    Unlock,
    /// Pull the latch (pull spring).
    Pull,
}

impl Action {
    pub const ALL: [Action; 4] = [Action::Read, Action::Lock, Action::Unlock, Action::Pull];

    pub fn is_actuating(self) -> bool {
        !matches!(self, Action::Read)
    }

    pub fn opcode(self) -> u8 {
        match self {
            Action::Read => op::GET_STATE,
            Action::Lock => op::LOCK,
            Action::Unlock => op::UNLOCK,
            Action::Pull => op::PULL_SPRING,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Lock => "lock",
            Action::Unlock => "unlock",
            Action::Pull => "pull",
        }
    }

    /// The stable state a successful movement should end in.
    pub fn target(self) -> Option<LockState> {
        match self {
            Action::Lock => Some(LockState::Locked),
            Action::Unlock | Action::Pull => Some(LockState::Unlocked),
            Action::Read => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| format!("unknown action {s:?}; use read, lock, unlock or pull"))
    }
}

/// The mode byte of LOCK and UNLOCK (spec §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Normal,
    Auto,
    Force,
    WithoutPull,
}

impl Mode {
    pub fn byte(self) -> u8 {
        match self {
            Mode::Normal => mode::NORMAL,
            Mode::Auto => mode::AUTO,
            Mode::Force => mode::FORCE,
            Mode::WithoutPull => mode::WITHOUT_PULL,
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "normal" => Ok(Mode::Normal),
            "auto" => Ok(Mode::Auto),
            "force" => Ok(Mode::Force),
            "without-pull" => Ok(Mode::WithoutPull),
            _ => Err(format!(
                "unknown mode {s:?}; use normal, auto, force or without-pull"
            )),
        }
    }
}

/// The reason of a request refused before it became a command.
pub const BAD_REQUEST: &str = "bad-request";
/// The reason of a repeated id that names another command.
pub const ID_CONFLICT: &str = "id-conflict";

/// Longest command id, in bytes, on every surface: ids are kept for a day, so a client cannot
/// fill the store with huge keys.
pub const MAX_ID_BYTES: usize = 64;

/// Longest time to live a command may ask for. A command is never sent after its deadline,
/// and a door that opens an hour after it was asked to is not what anybody meant.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// Check a client's command id: 1 to [`MAX_ID_BYTES`] bytes, no control characters.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_BYTES || id.chars().any(char::is_control) {
        return Err(format!(
            "id: 1 to {MAX_ID_BYTES} bytes without control characters"
        ));
    }
    Ok(())
}

/// A time to live in whole seconds from a client: 1 s to [`MAX_TTL`].
pub fn ttl_from_secs(secs: u64) -> Result<Duration, String> {
    if secs == 0 || secs > MAX_TTL.as_secs() {
        return Err(format!("ttl_s: 1 to {} seconds", MAX_TTL.as_secs()));
    }
    Ok(Duration::from_secs(secs))
}

/// One command on its way to a lock.
#[derive(Clone, Debug)]
pub struct Command {
    pub id: String,
    /// The lock's configured id.
    pub lock: String,
    pub action: Action,
    pub mode: Mode,
    /// Never sent after this instant.
    pub deadline: Instant,
    /// Who asked: `cli`, `mqtt`, or a DTLS identity.
    pub origin: String,
}

impl Command {
    /// `OPCODE ‖ PARAMS` for the lock.
    pub fn body(&self) -> Vec<u8> {
        match self.action {
            Action::Read => vec![op::GET_STATE],
            Action::Pull => vec![op::PULL_SPRING],
            Action::Lock | Action::Unlock => vec![self.action.opcode(), self.mode.byte()],
        }
    }
}

/// What the lock looked like when an outcome was decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReading {
    pub state: LockState,
    pub jammed: bool,
}

/// The one terminal outcome of a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// The lock accepted it; for motion, `state` is where the bolt stopped (maybe jammed).
    Success {
        #[serde(skip_serializing_if = "Option::is_none")]
        state: Option<StateReading>,
        #[serde(skip_serializing_if = "Option::is_none")]
        battery: Option<u8>,
    },
    /// `reason`: a lock result (`busy`, `no-permission`, …), `jammed` (the bolt stopped part
    /// way; `state` says where), `unreachable`, `not-registered`, `invalid-cert`,
    /// `unknown-lock`, `busy` (the lock's queue here is full), `shutting-down`, `bad-request`
    /// (`detail` says what is wrong), `id-conflict` (the id names another command),
    /// `state-store` (its record could not be written, so it was not sent).
    Failed {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<StateReading>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// Not allowed for this origin, or the command was retained/stale by policy.
    Denied { reason: String },
    /// The deadline passed before it was sent; it was never sent.
    Expired,
    /// It may have reached the lock but no response came; `state` was read back afterwards.
    Ambiguous {
        #[serde(skip_serializing_if = "Option::is_none")]
        state: Option<StateReading>,
        reason: String,
    },
}

impl Outcome {
    pub fn failed(reason: impl Into<String>) -> Outcome {
        Outcome::Failed {
            reason: reason.into(),
            state: None,
            detail: None,
        }
    }

    /// `failed: bad-request`, saying what is wrong with the request.
    pub fn bad_request(detail: impl Into<String>) -> Outcome {
        Outcome::Failed {
            reason: BAD_REQUEST.into(),
            state: None,
            detail: Some(detail.into()),
        }
    }

    /// `failed: id-conflict`: the id already names another command of this origin.
    pub fn id_conflict(first: &str) -> Outcome {
        Outcome::Failed {
            reason: ID_CONFLICT.into(),
            state: None,
            detail: Some(format!(
                "this id already names {first}; use a new id for a new command"
            )),
        }
    }

    /// The `reason` of a `failed` outcome.
    pub fn failure(&self) -> Option<&str> {
        let Outcome::Failed { reason, .. } = self else {
            return None;
        };
        Some(reason)
    }

    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Success { .. } => "success",
            Outcome::Failed { .. } => "failed",
            Outcome::Denied { .. } => "denied",
            Outcome::Expired => "expired",
            Outcome::Ambiguous { .. } => "ambiguous",
        }
    }
}

/// A progress step or the terminal outcome, as reported to whoever sent the command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    Accepted,
    /// Written to the lock (or about to be: the id is on disk first).
    Sent,
    Done {
        outcome: Outcome,
    },
}

/// A step for one command id, with enough context to be logged or published on its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub id: String,
    pub lock: String,
    pub action: Action,
    #[serde(flatten)]
    pub step: Step,
    /// Set when this command repeats an earlier one with the same id and origin: the steps and
    /// outcome are that command's, and nothing was sent again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub repeated: bool,
}

impl Report {
    pub fn outcome(&self) -> Option<&Outcome> {
        let Step::Done { outcome } = &self.step else {
            return None;
        };
        Some(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_json_is_flat_and_readable() {
        let r = Report {
            id: "a1".into(),
            lock: "front".into(),
            action: Action::Unlock,
            step: Step::Done {
                outcome: Outcome::Success {
                    state: Some(StateReading {
                        state: LockState::Unlocked,
                        jammed: false,
                    }),
                    battery: None,
                },
            },
            repeated: false,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"id":"a1","lock":"front","action":"unlock","step":"done","outcome":{"status":"success","state":{"state":"unlocked","jammed":false}}}"#
        );
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }
}
