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
