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

/// Why a command failed: one value per cause, written as the same kebab-case word on every
/// surface (control socket, CoAP, MQTT, the id store).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// What the lock answered: `busy`, `no-permission`, `not-calibrated`, … (`unknown-result`
    /// for a code this gateway has no name for).
    Lock(u8),
    /// The lock took the command but the bolt stopped part way.
    Jammed,
    Unreachable,
    NotRegistered,
    InvalidCert,
    /// The lock's queue here was full: the command never left the gateway.
    QueueFull,
    UnknownLock,
    ShuttingDown,
    /// The request was malformed or out of bounds (`detail` says what).
    BadRequest,
    /// The id already names another command of this origin.
    IdConflict,
    /// The id could not be recorded, so the command was not sent.
    StateStore,
    /// The lock's session failed (a bug) before the command was sent.
    InternalError,
}

impl Reason {
    const GATEWAY: [Reason; 11] = [
        Reason::Jammed,
        Reason::Unreachable,
        Reason::NotRegistered,
        Reason::InvalidCert,
        Reason::QueueFull,
        Reason::UnknownLock,
        Reason::ShuttingDown,
        Reason::BadRequest,
        Reason::IdConflict,
        Reason::StateStore,
        Reason::InternalError,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::Lock(code) => crate::ptls::api::result::name(code),
            Reason::Jammed => "jammed",
            Reason::Unreachable => "unreachable",
            Reason::NotRegistered => "not-registered",
            Reason::InvalidCert => "invalid-cert",
            Reason::QueueFull => "queue-full",
            Reason::UnknownLock => "unknown-lock",
            Reason::ShuttingDown => "shutting-down",
            Reason::BadRequest => "bad-request",
            Reason::IdConflict => "id-conflict",
            Reason::StateStore => "state-store",
            Reason::InternalError => "internal-error",
        }
    }

    /// The reason a name stands for: the gateway's own first, then the lock's result codes.
    pub fn parse(name: &str) -> Option<Reason> {
        Reason::GATEWAY
            .into_iter()
            .find(|r| r.name() == name)
            .or_else(|| {
                (0..=u8::MAX)
                    .map(Reason::Lock)
                    .find(|r| r.name() == name && *r != Reason::Lock(0))
            })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Reason, D::Error> {
        let name = String::deserialize(d)?;
        Reason::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown failure reason {name:?}")))
    }
}

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

impl From<crate::ptls::api::LockStatus> for StateReading {
    fn from(s: crate::ptls::api::LockStatus) -> StateReading {
        StateReading {
            state: s.state,
            jammed: s.jammed,
        }
    }
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
    /// Why, as a [`Reason`]; for `jammed`, `state` says where the bolt stopped.
    Failed {
        reason: Reason,
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
    pub fn failed(reason: Reason) -> Outcome {
        Outcome::Failed {
            reason,
            state: None,
            detail: None,
        }
    }

    /// `failed: bad-request`, saying what is wrong with the request.
    pub fn bad_request(detail: impl Into<String>) -> Outcome {
        Outcome::Failed {
            reason: Reason::BadRequest,
            state: None,
            detail: Some(detail.into()),
        }
    }

    /// `failed: id-conflict`: the id already names another command of this origin.
    pub fn id_conflict(first: &str) -> Outcome {
        Outcome::Failed {
            reason: Reason::IdConflict,
            state: None,
            detail: Some(format!(
                "this id already names {first}; use a new id for a new command"
            )),
        }
    }

    /// The `reason` of a `failed` outcome, as every surface writes it.
    pub fn failure(&self) -> Option<&'static str> {
        self.reason().map(Reason::name)
    }

    pub fn reason(&self) -> Option<Reason> {
        let Outcome::Failed { reason, .. } = self else {
            return None;
        };
        Some(*reason)
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

    #[test]
    fn failure_reasons_are_the_same_words_as_before_and_read_back() {
        let words = [
            (Reason::Lock(crate::ptls::api::result::BUSY), "busy"),
            (
                Reason::Lock(crate::ptls::api::result::NO_PERMISSION),
                "no-permission",
            ),
            (Reason::Jammed, "jammed"),
            (Reason::Unreachable, "unreachable"),
            (Reason::NotRegistered, "not-registered"),
            (Reason::InvalidCert, "invalid-cert"),
            (Reason::QueueFull, "queue-full"),
            (Reason::UnknownLock, "unknown-lock"),
            (Reason::ShuttingDown, "shutting-down"),
            (Reason::BadRequest, "bad-request"),
            (Reason::IdConflict, "id-conflict"),
            (Reason::StateStore, "state-store"),
            (Reason::InternalError, "internal-error"),
        ];
        for (reason, word) in words {
            let json = serde_json::to_string(&Outcome::failed(reason)).unwrap();
            assert_eq!(json, format!(r#"{{"status":"failed","reason":"{word}"}}"#));
            assert_eq!(
                serde_json::from_str::<Outcome>(&json).unwrap().reason(),
                Some(reason)
            );
        }
        // A code without a name keeps the word it always had.
        assert_eq!(Reason::Lock(0x42).name(), "unknown-result");
        assert!(Reason::parse("unknown-result").is_some());
        assert!(serde_json::from_str::<Outcome>(r#"{"status":"failed","reason":"nope"}"#).is_err());
    }
}
