//! The application layer after INITIALIZED (spec §5–7): opcodes, result codes, lock states,
//! notifications and alerts, named once.

use std::fmt;

use super::wire::{Malformed, Reader};

pub mod op {
    pub const GET_BATTERY: u8 = 0x0C;
    pub const LOCK: u8 = 0x50;
    pub const UNLOCK: u8 = 0x51;
    pub const PULL_SPRING: u8 = 0x52;
    pub const GET_STATE: u8 = 0x5A;
    pub const SET_SIGNED_DATETIME: u8 = 0x71;

    /// Commands that move the bolt: never re-sent after they may have reached the lock.
    pub fn is_actuating(opcode: u8) -> bool {
        matches!(opcode, LOCK | UNLOCK | PULL_SPRING)
    }

    pub fn name(opcode: u8) -> &'static str {
        match opcode {
            GET_BATTERY => "GET_BATTERY",
            LOCK => "LOCK",
            UNLOCK => "UNLOCK",
            PULL_SPRING => "PULL_SPRING",
            GET_STATE => "GET_STATE",
            SET_SIGNED_DATETIME => "SET_SIGNED_DATETIME",
            _ => "UNKNOWN",
        }
    }
}

pub mod result {
    pub const SUCCESS: u8 = 0x00;
    pub const INVALID_PARAM: u8 = 0x01;
    pub const ERROR: u8 = 0x02;
    pub const BUSY: u8 = 0x03;
    pub const NOT_FOUND: u8 = 0x04;
    pub const NOT_CALIBRATED: u8 = 0x05;
    pub const ALREADY_CALLED_BY_AUTOUNLOCK: u8 = 0x06;
    pub const NO_PERMISSION: u8 = 0x07;
    pub const NOT_CONFIGURED: u8 = 0x08;
    pub const DISMOUNTED: u8 = 0x09;
    pub const ALREADY_CALLED_BY_OTHER_OPERATION: u8 = 0x0A;

    pub fn name(code: u8) -> &'static str {
        match code {
            SUCCESS => "success",
            INVALID_PARAM => "invalid-param",
            ERROR => "error",
            BUSY => "busy",
            NOT_FOUND => "not-found",
            NOT_CALIBRATED => "not-calibrated",
            ALREADY_CALLED_BY_AUTOUNLOCK => "already-called-by-autounlock",
            NO_PERMISSION => "no-permission",
            NOT_CONFIGURED => "not-configured",
            DISMOUNTED => "dismounted",
            ALREADY_CALLED_BY_OTHER_OPERATION => "already-called-by-other-operation",
            _ => "unknown-result",
        }
    }
}

pub mod notif {
    pub const LOCK_STATUS_CHANGE: u8 = 0xBA;
    pub const BATTERY_STATE: u8 = 0xA0;
    pub const BATTERY_START_CHARGING: u8 = 0xBC;
    pub const BATTERY_STOP_CHARGING: u8 = 0xBD;
    pub const BATTERY_FULLY_CHARGED: u8 = 0xBE;
    pub const NEED_DATE_TIME: u8 = 0xA4;
    /// Plaintext.
    pub const SIGNED_DATETIME: u8 = 0x7B;
}

pub mod mode {
    pub const NORMAL: u8 = 0x00;
    pub const AUTO: u8 = 0x01;
    pub const FORCE: u8 = 0x02;
    pub const WITHOUT_PULL: u8 = 0x03;
}

/// Bolt state (spec §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockState {
    Uncalibrated,
    Calibration,
    Unlocked,
    PartiallyUnlocked,
    Unlocking,
    Locking,
    Locked,
    PullSpring,
    Pulling,
    Unknown,
}

impl LockState {
    pub fn from_byte(b: u8) -> LockState {
        match b {
            0x00 => LockState::Uncalibrated,
            0x01 => LockState::Calibration,
            0x02 => LockState::Unlocked,
            0x03 => LockState::PartiallyUnlocked,
            0x04 => LockState::Unlocking,
            0x05 => LockState::Locking,
            0x06 => LockState::Locked,
            0x07 => LockState::PullSpring,
            0x08 => LockState::Pulling,
            _ => LockState::Unknown,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            LockState::Uncalibrated => 0x00,
            LockState::Calibration => 0x01,
            LockState::Unlocked => 0x02,
            LockState::PartiallyUnlocked => 0x03,
            LockState::Unlocking => 0x04,
            LockState::Locking => 0x05,
            LockState::Locked => 0x06,
            LockState::PullSpring => 0x07,
            LockState::Pulling => 0x08,
            LockState::Unknown => 0x09,
        }
    }

    /// The bolt is at rest in this state (spec §5.2).
    pub fn is_stable(self) -> bool {
        matches!(
            self,
            LockState::Uncalibrated
                | LockState::Locked
                | LockState::Unlocked
                | LockState::PartiallyUnlocked
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            LockState::Uncalibrated => "uncalibrated",
            LockState::Calibration => "calibration",
            LockState::Unlocked => "unlocked",
            LockState::PartiallyUnlocked => "partially_unlocked",
            LockState::Unlocking => "unlocking",
            LockState::Locking => "locking",
            LockState::Locked => "locked",
            LockState::PullSpring => "pull_spring",
            LockState::Pulling => "pulling",
            LockState::Unknown => "unknown",
        }
    }
}

impl fmt::Display for LockState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub const STATUS_OK: u8 = 0x00;
pub const STATUS_JAMMED: u8 = 0x01;

/// The door as the lock's door sensor sees it (spec §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DoorState {
    /// No door sensor, or it does not know.
    Unknown,
    Open,
    Closed,
}

impl DoorState {
    pub fn from_byte(b: u8) -> DoorState {
        match b {
            0x02 => DoorState::Open,
            0x03 => DoorState::Closed,
            _ => DoorState::Unknown,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            DoorState::Unknown => 0x00,
            DoorState::Open => 0x02,
            DoorState::Closed => 0x03,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DoorState::Unknown => "unknown",
            DoorState::Open => "open",
            DoorState::Closed => "closed",
        }
    }
}

/// What caused a state change (spec §5.3); locks may send values not listed.
pub mod trigger {
    pub const BUTTON: u8 = 0x01;
    pub const REMOTE: u8 = 0x02;
    pub const AUTO_LOCK: u8 = 0x04;
    pub const DOOR_SENSOR: u8 = 0x10;

    /// The name front ends show; an unlisted value keeps its number.
    pub fn name(t: u8) -> String {
        match t {
            BUTTON => "button".into(),
            REMOTE => "remote".into(),
            AUTO_LOCK => "auto-lock".into(),
            DOOR_SENSOR => "door-sensor".into(),
            other => format!("other-0x{other:02x}"),
        }
    }
}

/// 0xBA LOCK_STATUS_CHANGE's parameters (spec §5.3): the short form the docs list (state,
/// status) or the long form real locks send (…, trigger, access id, door state).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusChange {
    pub state: LockState,
    pub jammed: bool,
    /// Only in the long form.
    pub cause: Option<Cause>,
}

/// The long form's tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cause {
    pub trigger: u8,
    /// Who caused it: non-zero for a user's action.
    pub access_id: u32,
    pub door: DoorState,
}

impl StatusChange {
    /// State and status are required; the long form's tail is read when all of it is there
    /// (8 parameter bytes). Bytes past it are ignored, as a later firmware may add fields; a
    /// partial tail is not guessed at.
    pub fn parse(params: &[u8]) -> Result<StatusChange, Malformed> {
        let [state, status, rest @ ..] = params else {
            return Err(super::wire::malformed(
                "LOCK_STATUS_CHANGE (state and status)",
            ));
        };
        let cause = match rest {
            [trigger, a0, a1, a2, a3, door, ..] => Some(Cause {
                trigger: *trigger,
                access_id: u32::from_be_bytes([*a0, *a1, *a2, *a3]),
                door: DoorState::from_byte(*door),
            }),
            _ => None,
        };
        Ok(StatusChange {
            state: LockState::from_byte(*state),
            jammed: *status == STATUS_JAMMED,
            cause,
        })
    }

    /// The notification body, `0xBA ‖ params`, in the form this value has.
    pub fn encode(&self) -> Vec<u8> {
        let status = if self.jammed {
            STATUS_JAMMED
        } else {
            STATUS_OK
        };
        let mut out = vec![notif::LOCK_STATUS_CHANGE, self.state.byte(), status];
        if let Some(c) = self.cause {
            out.push(c.trigger);
            out.extend_from_slice(&c.access_id.to_be_bytes());
            out.push(c.door.byte());
        }
        out
    }
}

/// GET_STATE's answer (spec §5.2): the state and whether the bolt is jammed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockStatus {
    pub state: LockState,
    pub jammed: bool,
}

impl LockStatus {
    /// A SUCCESS response's data, `state ‖ status ‖ …` (later bytes are ignored).
    pub fn parse(data: &[u8]) -> Result<LockStatus, Malformed> {
        let [state, status, ..] = data else {
            return Err(super::wire::malformed(
                "GET_STATE answer (state and status)",
            ));
        };
        Ok(LockStatus {
            state: LockState::from_byte(*state),
            jammed: *status == STATUS_JAMMED,
        })
    }
}

/// GET_BATTERY's answer and the BATTERY_STATE notification: level in percent, charging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Battery {
    pub level: u8,
    pub charging: bool,
}

impl Battery {
    pub fn parse(data: &[u8]) -> Result<Battery, Malformed> {
        let [level, charging, ..] = data else {
            return Err(super::wire::malformed("battery (level and charging)"));
        };
        Ok(Battery {
            level: *level,
            charging: *charging != 0,
        })
    }
}

/// An encrypted notification, parsed once (spec §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notification {
    StatusChange(StatusChange),
    Battery(Battery),
    StartCharging,
    StopCharging,
    FullyCharged,
    /// The lock lost its trusted time and asks for a signed one.
    NeedDateTime,
    /// A notification this gateway does not act on, by id.
    Other(u8),
}

impl Notification {
    pub fn parse(id: u8, params: &[u8]) -> Result<Notification, Malformed> {
        Ok(match id {
            notif::LOCK_STATUS_CHANGE => Notification::StatusChange(StatusChange::parse(params)?),
            notif::BATTERY_STATE => Notification::Battery(Battery::parse(params)?),
            notif::BATTERY_START_CHARGING => Notification::StartCharging,
            notif::BATTERY_STOP_CHARGING => Notification::StopCharging,
            notif::BATTERY_FULLY_CHARGED => Notification::FullyCharged,
            notif::NEED_DATE_TIME => Notification::NeedDateTime,
            other => Notification::Other(other),
        })
    }
}

/// PTLS alert codes (spec §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alert {
    Error,
    NoTrustedTime,
    Timeout,
    Disconnected,
    InvalidCert,
    NotRegistered,
    Other(u8),
}

impl Alert {
    pub fn from_byte(b: u8) -> Alert {
        match b {
            0x01 => Alert::Error,
            0x02 => Alert::NoTrustedTime,
            0x03 => Alert::Timeout,
            0x04 => Alert::Disconnected,
            0x05 => Alert::InvalidCert,
            0x06 => Alert::NotRegistered,
            other => Alert::Other(other),
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            Alert::Error => 0x01,
            Alert::NoTrustedTime => 0x02,
            Alert::Timeout => 0x03,
            Alert::Disconnected => 0x04,
            Alert::InvalidCert => 0x05,
            Alert::NotRegistered => 0x06,
            Alert::Other(b) => b,
        }
    }
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Alert::Error => "ERROR",
            Alert::NoTrustedTime => "NO_TRUSTED_TIME",
            Alert::Timeout => "TIMEOUT",
            Alert::Disconnected => "DISCONNECTED",
            Alert::InvalidCert => "INVALID_CERT",
            Alert::NotRegistered => "NOT_REGISTERED",
            Alert::Other(_) => "UNKNOWN",
        };
        write!(f, "0x{:02X} {name}", self.byte())
    }
}

/// A command response: `OPCODE ‖ RESULT ‖ OUTPUT` (spec §5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub opcode: u8,
    pub result: u8,
    pub data: Vec<u8>,
}

impl Response {
    pub fn parse(plain: &[u8]) -> Result<Response, Malformed> {
        let mut r = Reader::new(plain, "command response");
        let opcode = r.u8()?;
        let result = r.u8()?;
        let data = r.rest().to_vec();
        Ok(Response {
            opcode,
            result,
            data,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.opcode, self.result];
        out.extend_from_slice(&self.data);
        out
    }
}

/// A signed time as the authority (or Tedee's cloud) hands it out (spec §7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedTime {
    /// u64 Unix milliseconds, big-endian.
    pub datetime: [u8; 8],
    /// DER ECDSA-P256-SHA256 over `datetime` by the time authority.
    pub signature: Vec<u8>,
}

impl SignedTime {
    pub fn unix_ms(&self) -> u64 {
        u64::from_be_bytes(self.datetime)
    }

    /// `OPCODE ‖ datetime ‖ signature`: the command body of SET_SIGNED_DATETIME.
    pub fn command(&self) -> Vec<u8> {
        let mut out = vec![op::SET_SIGNED_DATETIME];
        out.extend_from_slice(&self.datetime);
        out.extend_from_slice(&self.signature);
        out
    }

    pub fn parse_command_params(params: &[u8]) -> Result<SignedTime, Malformed> {
        let mut r = Reader::new(params, "signed datetime");
        let datetime = r.array()?;
        let signature = r.rest().to_vec();
        if signature.is_empty() {
            return Err(super::wire::malformed("signed datetime"));
        }
        Ok(SignedTime {
            datetime,
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_change_reads_both_forms_and_refuses_less() {
        let short = StatusChange::parse(&[0x06, 0x00]).unwrap();
        assert_eq!(
            (short.state, short.jammed, short.cause),
            (LockState::Locked, false, None)
        );
        // As a Tedee GO 2 sends it: unlocked by a user's app (access id 0x01020304), door open.
        let long = StatusChange::parse(&[0x02, 0x00, 0x02, 1, 2, 3, 4, 0x02]).unwrap();
        assert_eq!(
            long.cause,
            Some(Cause {
                trigger: trigger::REMOTE,
                access_id: 0x0102_0304,
                door: DoorState::Open
            })
        );
        assert_eq!(long.encode()[1..], [0x02, 0x00, 0x02, 1, 2, 3, 4, 0x02]);
        assert_eq!(short.encode(), [0xBA, 0x06, 0x00]);
        // A partial tail is not guessed at; extra bytes after the long form are ignored.
        assert_eq!(
            StatusChange::parse(&[0x03, 0x01, 0x01]).unwrap().cause,
            None
        );
        let longer = StatusChange::parse(&[0x06, 0x00, 0x04, 0, 0, 0, 0, 0x03, 0xFF]).unwrap();
        assert_eq!(longer.cause.unwrap().door, DoorState::Closed);
        assert!(StatusChange::parse(&[0x06]).is_err());
        assert!(StatusChange::parse(&[]).is_err());
        assert_eq!(trigger::name(0x10), "door-sensor");
        assert_eq!(trigger::name(0x20), "other-0x20");
    }

    #[test]
    fn state_battery_and_notifications_are_read_once_and_short_ones_refused() {
        let s = LockStatus::parse(&[0x02, STATUS_JAMMED, 0xFF]).unwrap();
        assert_eq!((s.state, s.jammed), (LockState::Unlocked, true));
        assert!(LockStatus::parse(&[0x02]).is_err());
        let b = Battery::parse(&[87, 1]).unwrap();
        assert_eq!((b.level, b.charging), (87, true));
        assert!(Battery::parse(&[87]).is_err());
        assert!(matches!(
            Notification::parse(notif::BATTERY_STATE, &[40, 0]),
            Ok(Notification::Battery(Battery {
                level: 40,
                charging: false
            }))
        ));
        assert!(Notification::parse(notif::LOCK_STATUS_CHANGE, &[0x06]).is_err());
        assert_eq!(
            Notification::parse(notif::NEED_DATE_TIME, &[]).unwrap(),
            Notification::NeedDateTime
        );
        assert_eq!(
            Notification::parse(0x42, &[1, 2]).unwrap(),
            Notification::Other(0x42)
        );
    }
}
