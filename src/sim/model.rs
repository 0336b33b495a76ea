//! The simulated lock: a bolt with motor timing, jams, battery and pull spring, trusted time,
//! registration and up to three BLE connections, each with its own [`ptls::Server`].
//!
//! Sans-IO like the protocol core: the caller feeds connects, writes and time, and drains
//! [`Output`]s. Every actuating command the lock receives is recorded as an [`Actuation`].

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::ptls::api::{
    self, Cause, DoorState, LockState, SignedTime, StatusChange, mode, notif, op, result, trigger,
};
use crate::ptls::cert::{PERM_LOCK_UNLOCK, PERM_PULL_SPRING, PERM_READ};
use crate::ptls::pair::Endpoint;
use crate::ptls::{
    Channel, DisconnectReason, Server, ServerConfig, ServerEvent, Transmit, WallClock,
};

/// How a simulated lock behaves; every field has the default a real lock would show.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Behaviour {
    /// Time for the bolt to travel between locked and unlocked.
    pub motor_time_ms: u64,
    /// Probability that a movement jams (ends PARTIALLY_UNLOCKED, status JAMMED).
    pub jam_probability: f64,
    pub pull_spring: bool,
    /// How long the latch is held open by the pull spring.
    pub pull_time_ms: u64,
    /// Battery level at start, 0–100.
    pub battery: u8,
    /// Battery percentage used by each movement.
    pub battery_drain_per_move: f64,
    pub initial_state: InitialState,
    pub trusted_time: bool,
    pub registered: bool,
    pub max_connections: usize,
    pub att_mtu: u16,
    pub hello_timeout_ms: u64,
    /// Drop a link with no traffic for this long (a real lock: roughly 25–90 s); 0 = never.
    pub idle_disconnect_ms: u64,
    pub session_lifetime_ms: u64,
    /// A door sensor is fitted: LOCK_STATUS_CHANGE reports the door (closed at start);
    /// without one it reports `unknown`, as a real lock does.
    pub door_sensor: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            motor_time_ms: 1_500,
            jam_probability: 0.0,
            pull_spring: false,
            pull_time_ms: 2_000,
            battery: 90,
            battery_drain_per_move: 0.1,
            initial_state: InitialState::Locked,
            trusted_time: true,
            registered: true,
            max_connections: 3,
            att_mtu: 247,
            hello_timeout_ms: 10_000,
            idle_disconnect_ms: 60_000,
            session_lifetime_ms: 24 * 3_600_000,
            door_sensor: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InitialState {
    Locked,
    Unlocked,
    Uncalibrated,
}

/// Identity and behaviour of one simulated lock.
pub struct LockSpec {
    pub serial: String,
    pub device_id: u32,
    pub key: SigningKey,
    pub authority: VerifyingKey,
    pub behaviour: Behaviour,
    /// Things that happen to the lock at set times after the simulator starts.
    pub script: Vec<ScriptStep>,
}

/// One entry of a lock's script (`[[lock.script]]` in sim.toml).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptStep {
    /// When, counted from the simulator's start (at most [`MAX_SCRIPT_MS`]).
    pub after_ms: u64,
    pub event: Happening,
}

/// The longest a script reaches: 30 days.
pub const MAX_SCRIPT_MS: u64 = 30 * 86_400_000;
/// The most steps one lock's script may hold.
pub const MAX_SCRIPT_STEPS: usize = 1_000;

/// Something that happens to a lock from outside: the door, or a person at the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Happening {
    OpenDoor,
    CloseDoor,
    PressButton,
}

pub type ConnId = u64;

/// Why a connection attempt was refused (sim socket reason bytes, design §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    UnknownLock = 1,
    TooManyConnections = 2,
    Busy = 3,
}

/// What the lock does on its links.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A notification or indication on a characteristic the client subscribed to.
    Value {
        conn: ConnId,
        channel: Channel,
        bytes: Vec<u8>,
    },
    /// The lock drops this link (reason byte of design §4.1: 1 idle, 2 hello timeout).
    Disconnect { conn: ConnId, reason: u8 },
}

/// One actuating command as the lock received it: the event log's line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actuation {
    pub t_ms: u64,
    pub lock: String,
    pub conn: ConnId,
    pub command: String,
    pub mode: u8,
    pub result: String,
    /// The state right after the command was accepted (or the unchanged state if refused).
    pub state: LockState,
    /// What moved it: `remote` (a command over a connection) or `button` (on the lock).
    #[serde(default = "remote")]
    pub trigger: String,
}

fn remote() -> String {
    "remote".into()
}

struct Conn {
    server: Server,
    subscribed: [bool; 4],
    permissions: u32,
    /// Who this connection's certificate says it is: the access id its commands are reported
    /// with (the first four bytes of the certificate's client id).
    access_id: u32,
    /// The negotiated ATT MTU: no value either way may exceed `att_mtu − 3` (spec §3.2).
    att_mtu: u16,
}

pub struct Lock {
    spec: LockSpec,
    rng: ChaCha8Rng,
    wall: WallClock,
    state: LockState,
    jammed: bool,
    door: DoorState,
    /// What caused the current (or last) movement: (trigger, access id), as LOCK_STATUS_CHANGE
    /// reports it.
    cause: (u8, u32),
    battery: f64,
    charging: bool,
    /// The script's steps still to come, earliest first.
    script: VecDeque<(Instant, Happening)>,
    /// Upcoming state changes of the current movement.
    motion: VecDeque<(Instant, LockState, bool)>,
    /// State changes applied by the current command, notified after its response.
    pending_notifications: Vec<(LockState, bool)>,
    force_jam_next: bool,
    trusted: Option<WallClock>,
    /// A rebooting lock is off the air until then.
    offline_until: Option<Instant>,
    last_signed_ms: u64,
    registered: bool,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    out: VecDeque<Output>,
    actuations: Vec<Actuation>,
}

fn channel_index(c: Channel) -> usize {
    match c {
        Channel::Notifications => 0,
        Channel::PtlsTx => 1,
        Channel::PtlsRx => 2,
        Channel::ApiCommands => 3,
    }
}

impl Lock {
    /// `wall` maps `now` to Unix time: the host clock, used while the lock trusts time and for
    /// event-log timestamps.
    pub fn new(spec: LockSpec, seed: u64, wall: WallClock) -> Lock {
        let b = &spec.behaviour;
        let state = match b.initial_state {
            InitialState::Locked => LockState::Locked,
            InitialState::Unlocked => LockState::Unlocked,
            InitialState::Uncalibrated => LockState::Uncalibrated,
        };
        Lock {
            rng: ChaCha8Rng::seed_from_u64(seed),
            wall,
            state,
            jammed: false,
            door: if b.door_sensor {
                DoorState::Closed
            } else {
                DoorState::Unknown
            },
            cause: (trigger::REMOTE, 0),
            script: {
                let mut steps: Vec<(Instant, Happening)> = spec
                    .script
                    .iter()
                    .filter_map(|s| {
                        let after = Duration::from_millis(s.after_ms.min(MAX_SCRIPT_MS));
                        Some((wall.at.checked_add(after)?, s.event))
                    })
                    .collect();
                steps.sort_by_key(|s| s.0);
                steps.into()
            },
            battery: f64::from(b.battery.min(100)),
            charging: false,
            motion: VecDeque::new(),
            pending_notifications: Vec::new(),
            force_jam_next: false,
            trusted: b.trusted_time.then_some(wall),
            offline_until: None,
            last_signed_ms: 0,
            registered: b.registered,
            conns: BTreeMap::new(),
            next_conn: 1,
            out: VecDeque::new(),
            actuations: Vec::new(),
            spec,
        }
    }

    // --- getters ---

    pub fn serial(&self) -> &str {
        &self.spec.serial
    }

    pub fn state(&self) -> LockState {
        self.state
    }

    pub fn is_jammed(&self) -> bool {
        self.jammed
    }

    pub fn door(&self) -> DoorState {
        self.door
    }

    pub fn battery(&self) -> u8 {
        self.battery.round() as u8
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    pub fn has_trusted_time(&self) -> bool {
        self.trusted.is_some()
    }

    /// Every actuating command received so far.
    pub fn actuations(&self) -> &[Actuation] {
        &self.actuations
    }

    /// Take the actuations recorded since the last call (for the event-log writer).
    pub fn take_actuations(&mut self) -> Vec<Actuation> {
        std::mem::take(&mut self.actuations)
    }

    // --- fault and scenario controls ---

    /// The next movement jams.
    pub fn force_jam(&mut self) {
        self.force_jam_next = true;
    }

    /// A scripted or chaos happening; logged with what the lock made of it.
    pub fn happen(&mut self, now: Instant, happening: Happening) {
        let noticed = match happening {
            Happening::OpenDoor => self.set_door(now, true),
            Happening::CloseDoor => self.set_door(now, false),
            Happening::PressButton => self.press_button(now),
        };
        log::info!(
            "sim: {}: {happening:?}{}",
            self.spec.serial,
            if noticed {
                ""
            } else {
                " (no effect: no door sensor, or the lock is busy)"
            }
        );
    }

    /// The door opens or closes. Only a lock with a door sensor notices: it reports the door
    /// with trigger `door-sensor` (access id 0). Returns whether it noticed.
    pub fn set_door(&mut self, now: Instant, open: bool) -> bool {
        if !self.spec.behaviour.door_sensor {
            return false;
        }
        self.door = if open {
            DoorState::Open
        } else {
            DoorState::Closed
        };
        // The door's own change; the current movement keeps its cause.
        let movement = std::mem::replace(&mut self.cause, (trigger::DOOR_SENSOR, 0));
        self.notify_state(now, self.state, self.jammed);
        self.cause = movement;
        true
    }

    /// Someone presses the lock's button: a locked (or jammed half-way) lock unlocks, an
    /// unlocked one locks, reported with trigger `button` and access id 0 and recorded in the
    /// event log like a command. A lock that is moving or uncalibrated ignores it.
    pub fn press_button(&mut self, now: Instant) -> bool {
        let opcode = match self.state {
            LockState::Unlocked => op::LOCK,
            LockState::Locked | LockState::PartiallyUnlocked => op::UNLOCK,
            LockState::Uncalibrated
            | LockState::Calibration
            | LockState::Unlocking
            | LockState::Locking
            | LockState::PullSpring
            | LockState::Pulling
            | LockState::Unknown => return false,
        };
        if !self.motion.is_empty() {
            return false;
        }
        self.cause = (trigger::BUTTON, 0);
        let code = self.actuate(now, opcode, mode::NORMAL);
        self.actuations.push(Actuation {
            t_ms: self.wall.unix_ms_at(now),
            lock: self.spec.serial.clone(),
            conn: 0,
            command: op::name(opcode).to_ascii_lowercase(),
            mode: mode::NORMAL,
            result: result::name(code).to_string(),
            state: self.state,
            trigger: "button".into(),
        });
        let pending: Vec<(LockState, bool)> = self.pending_notifications.drain(..).collect();
        for (state, jammed) in pending {
            self.notify_state(now, state, jammed);
        }
        code == result::SUCCESS
    }

    pub fn set_registered(&mut self, registered: bool) {
        self.registered = registered;
        for c in self.conns.values_mut() {
            c.server.set_registered(registered);
        }
    }

    /// Every link drops at once, as when the lock goes out of range.
    pub fn drop_links(&mut self, reason: u8) {
        for conn in std::mem::take(&mut self.conns).into_keys() {
            self.out.push_back(Output::Disconnect { conn, reason });
        }
    }

    /// The lock restarts: every link and session is gone, the clock is lost, and it accepts no
    /// connection until `off_for` has passed. The bolt stays where it is.
    pub fn reboot(&mut self, now: Instant, off_for: Duration) {
        self.drop_links(super::wire::DISCONNECT_FAULT);
        self.trusted = None;
        self.offline_until = Some(now + off_for);
    }

    /// The lock forgets its clock (as after a battery change) and asks connected clients.
    pub fn lose_trusted_time(&mut self, now: Instant) {
        self.trusted = None;
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                c.server.set_trusted_time(None);
                let _ = c.server.send_notification(now, &[notif::NEED_DATE_TIME]);
            }
            self.pump(now, id);
        }
    }

    // --- link inputs ---

    /// A client connects, asking for `att_mtu`. Returns the connection and the negotiated MTU.
    /// Whether the lock advertises now (a rebooting lock is off the air).
    pub fn on_air(&self, now: Instant) -> bool {
        self.offline_until.is_none_or(|t| now >= t)
    }

    pub fn connect(&mut self, now: Instant, att_mtu: u16) -> Result<(ConnId, u16), Refusal> {
        if !self.on_air(now) {
            return Err(Refusal::Busy);
        }
        let b = &self.spec.behaviour;
        if self.conns.len() >= b.max_connections {
            return Err(Refusal::TooManyConnections);
        }
        let mtu = att_mtu.min(b.att_mtu);
        let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
        let config = ServerConfig {
            lock_key: self.spec.key.clone(),
            authority: self.spec.authority,
            device_id: self.spec.device_id,
            att_mtu: mtu,
            hello_timeout: ms(b.hello_timeout_ms),
            idle_timeout: ms(b.idle_disconnect_ms),
            session_lifetime: Duration::from_millis(b.session_lifetime_ms),
            max_records: crate::ptls::crypto::MAX_RECORDS,
        };
        let seed = self.rng.next_u64();
        let mut server = Server::new(config, Box::new(ChaCha8Rng::seed_from_u64(seed)), now);
        server.set_trusted_time(self.trusted);
        server.set_registered(self.registered);
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                server,
                subscribed: [false; 4],
                permissions: 0,
                access_id: 0,
                att_mtu: mtu,
            },
        );
        Ok((id, mtu))
    }

    /// The CCCD write: enable or disable notifications/indications on a characteristic.
    pub fn subscribe(&mut self, conn: ConnId, channel: Channel, on: bool) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.subscribed[channel_index(channel)] = on;
        }
    }

    /// The client wrote a value on PTLS_RX or API_COMMANDS.
    pub fn write(&mut self, now: Instant, conn: ConnId, channel: Channel, value: &[u8]) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.server.handle_input(now, channel, value);
        self.pump(now, conn);
    }

    /// The largest value the connection's ATT link carries, `ATT_MTU − 3` (spec §3.2): the
    /// transports refuse longer writes before they reach the lock.
    pub fn value_limit(&self, conn: ConnId) -> Option<usize> {
        self.conns
            .get(&conn)
            .map(|c| usize::from(c.att_mtu).saturating_sub(3))
    }

    /// The link is gone (either side): the session is wiped with it.
    pub fn disconnect(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, happening)) = self.script.front() {
            if at > now {
                break;
            }
            self.script.pop_front();
            self.happen(now, happening);
        }
        while let Some(&(at, state, jammed)) = self.motion.front() {
            if at > now {
                break;
            }
            self.motion.pop_front();
            self.set_state(now, state, jammed);
            if self.motion.is_empty() {
                self.finish_movement(now);
            }
        }
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                if c.server.poll_timeout().is_some_and(|t| t <= now) {
                    c.server.handle_timeout(now);
                }
            }
            self.pump(now, id);
        }
    }

    // --- outputs ---

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let motion = self.motion.front().map(|m| m.0);
        let script = self.script.front().map(|s| s.0);
        self.conns
            .values()
            .filter_map(|c| c.server.poll_timeout())
            .chain(motion)
            .chain(script)
            .min()
    }

    // --- internals ---

    /// Move a connection's transmits out and act on its server's events.
    fn pump(&mut self, now: Instant, conn: ConnId) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            let mut progressed = false;
            while let Some(Transmit { channel, bytes }) = c.server.poll_transmit() {
                progressed = true;
                // The lock never sends on a characteristic whose subscription is off, nor a
                // value its ATT link cannot carry.
                let limit = usize::from(c.att_mtu).saturating_sub(3);
                if bytes.len() > limit {
                    log::error!(
                        "sim: {}: a {}-byte value on {channel:?} does not fit ATT MTU {}; not sent",
                        self.spec.serial,
                        bytes.len(),
                        c.att_mtu
                    );
                } else if c.subscribed[channel_index(channel)] {
                    self.out.push_back(Output::Value {
                        conn,
                        channel,
                        bytes,
                    });
                }
            }
            let Some(event) = c.server.poll_event() else {
                if !progressed {
                    return;
                }
                continue;
            };
            match event {
                ServerEvent::Established { certificate, .. } => {
                    let cert = certificate.certificate();
                    c.permissions = cert.permissions;
                    let id = &cert.client_id;
                    c.access_id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
                }
                ServerEvent::Command { body, encrypted } => {
                    self.on_command(now, conn, &body, encrypted)
                }
                ServerEvent::Disconnect(reason) => {
                    let reason = match reason {
                        DisconnectReason::Idle => 1,
                        DisconnectReason::HelloTimeout => 2,
                    };
                    self.conns.remove(&conn);
                    self.out.push_back(Output::Disconnect { conn, reason });
                    return;
                }
                ServerEvent::SessionEnded => c.permissions = 0,
                ServerEvent::AlertSent { .. } | ServerEvent::AlertReceived(_) => {}
            }
        }
    }

    fn on_command(&mut self, now: Instant, conn: ConnId, body: &[u8], encrypted: bool) {
        let Some((&opcode, params)) = body.split_first() else {
            return;
        };
        if opcode == op::SET_SIGNED_DATETIME {
            return self.on_signed_time(now, conn, params, encrypted);
        }
        if !encrypted {
            // Only trusted time may be set without a session.
            return self.reply_plain(conn, &[opcode, result::NO_PERMISSION]);
        }
        let permissions = self.conns.get(&conn).map_or(0, |c| c.permissions);
        let allowed = |bit| permissions & bit != 0;
        let reply: Vec<u8> = match opcode {
            op::GET_STATE if allowed(PERM_READ) => {
                let status = if self.jammed {
                    api::STATUS_JAMMED
                } else {
                    api::STATUS_OK
                };
                vec![opcode, result::SUCCESS, self.state.byte(), status]
            }
            op::GET_BATTERY if allowed(PERM_READ) => {
                vec![
                    opcode,
                    result::SUCCESS,
                    self.battery(),
                    u8::from(self.charging),
                ]
            }
            op::LOCK | op::UNLOCK | op::PULL_SPRING => {
                let needed = if opcode == op::PULL_SPRING {
                    PERM_PULL_SPRING
                } else {
                    PERM_LOCK_UNLOCK
                };
                let mode = params.first().copied().unwrap_or(mode::NORMAL);
                let access_id = self.conns.get(&conn).map_or(0, |c| c.access_id);
                let code = if allowed(needed) {
                    self.cause = (trigger::REMOTE, access_id);
                    self.actuate(now, opcode, mode)
                } else {
                    result::NO_PERMISSION
                };
                self.actuations.push(Actuation {
                    t_ms: self.wall.unix_ms_at(now),
                    lock: self.spec.serial.clone(),
                    conn,
                    command: op::name(opcode).to_ascii_lowercase(),
                    mode,
                    result: result::name(code).to_string(),
                    state: self.state,
                    trigger: remote(),
                });
                vec![opcode, code]
            }
            op::GET_STATE | op::GET_BATTERY => vec![opcode, result::NO_PERMISSION],
            _ => vec![opcode, result::INVALID_PARAM],
        };
        // Respond before the movement's first notification goes out, as a real lock does.
        self.respond_then_flush(now, conn, &reply);
    }

    fn respond_then_flush(&mut self, now: Instant, conn: ConnId, reply: &[u8]) {
        let pending: Vec<(LockState, bool)> = self.pending_notifications.drain(..).collect();
        if let Some(c) = self.conns.get_mut(&conn) {
            let _ = c.server.send_response(now, reply);
        }
        self.pump(now, conn);
        for (state, jammed) in pending {
            self.notify_state(now, state, jammed);
        }
    }

    /// Start a movement; returns the result code.
    fn actuate(&mut self, now: Instant, opcode: u8, mode: u8) -> u8 {
        if self.state == LockState::Uncalibrated {
            return result::NOT_CALIBRATED;
        }
        if !self.motion.is_empty() {
            return result::BUSY;
        }
        let valid_mode = match opcode {
            op::LOCK => matches!(mode, mode::NORMAL | mode::FORCE),
            op::UNLOCK => mode <= mode::WITHOUT_PULL,
            _ => true,
        };
        if !valid_mode {
            return result::INVALID_PARAM;
        }
        let b = self.spec.behaviour.clone();
        let motor = Duration::from_millis(b.motor_time_ms);
        let pull_motor = motor / 2;
        let pull_hold = Duration::from_millis(b.pull_time_ms);
        let pull = b.pull_spring && mode != mode::WITHOUT_PULL;
        let jam = self.force_jam_next || self.chance(b.jam_probability);
        let mut steps: Vec<(Duration, LockState, bool)> = Vec::new();
        match (opcode, self.state) {
            (op::LOCK, LockState::Locked) => {}
            (op::LOCK, _) => {
                steps.push((Duration::ZERO, LockState::Locking, false));
                steps.push(self.end_of_travel(motor, LockState::Locked, jam));
            }
            (op::UNLOCK, LockState::Unlocked) if pull => {
                steps.extend(Self::pull_steps(Duration::ZERO, pull_motor, pull_hold));
            }
            (op::UNLOCK, LockState::Unlocked) => {}
            (op::UNLOCK, _) => {
                steps.push((Duration::ZERO, LockState::Unlocking, false));
                let end = self.end_of_travel(motor, LockState::Unlocked, jam);
                let jammed = end.2;
                steps.push(end);
                if pull && !jammed {
                    steps.pop();
                    steps.extend(Self::pull_steps(motor, pull_motor, pull_hold));
                }
            }
            (op::PULL_SPRING, _) if !b.pull_spring => return result::NOT_CONFIGURED,
            (op::PULL_SPRING, LockState::Unlocked) => {
                steps.extend(Self::pull_steps(Duration::ZERO, pull_motor, pull_hold));
            }
            (op::PULL_SPRING, _) => return result::ERROR,
            _ => return result::INVALID_PARAM,
        }
        if steps.iter().any(|s| s.2) {
            self.force_jam_next = false;
        }
        for (offset, state, jammed) in steps {
            if offset.is_zero() {
                // Applied now; notified after the response.
                self.state = state;
                self.jammed = jammed;
                self.pending_notifications.push((state, jammed));
            } else {
                self.motion.push_back((now + offset, state, jammed));
            }
        }
        result::SUCCESS
    }

    fn end_of_travel(
        &self,
        motor: Duration,
        target: LockState,
        jam: bool,
    ) -> (Duration, LockState, bool) {
        if jam {
            (motor, LockState::PartiallyUnlocked, true)
        } else {
            (motor, target, false)
        }
    }

    fn pull_steps(
        start: Duration,
        pull_motor: Duration,
        hold: Duration,
    ) -> [(Duration, LockState, bool); 3] {
        [
            (start, LockState::Pulling, false),
            (
                start + pull_motor.max(Duration::from_millis(1)),
                LockState::PullSpring,
                false,
            ),
            (
                start + pull_motor.max(Duration::from_millis(1)) + hold,
                LockState::Unlocked,
                false,
            ),
        ]
    }

    fn finish_movement(&mut self, now: Instant) {
        let before = self.battery();
        self.battery = (self.battery - self.spec.behaviour.battery_drain_per_move).max(0.0);
        if self.battery() != before {
            let body = [
                notif::BATTERY_STATE,
                self.battery(),
                u8::from(self.charging),
            ];
            self.notify_all(now, &body);
        }
    }

    fn set_state(&mut self, now: Instant, state: LockState, jammed: bool) {
        self.state = state;
        self.jammed = jammed;
        self.notify_state(now, state, jammed);
    }

    /// LOCK_STATUS_CHANGE in the long form real locks send (spec §5.3).
    fn notify_state(&mut self, now: Instant, state: LockState, jammed: bool) {
        let (trigger, access_id) = self.cause;
        let change = StatusChange {
            state,
            jammed,
            cause: Some(Cause {
                trigger,
                access_id,
                door: self.door,
            }),
        };
        self.notify_all(now, &change.encode());
    }

    fn notify_all(&mut self, now: Instant, body: &[u8]) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                if c.server.is_established() {
                    let _ = c.server.send_notification(now, body);
                }
            }
            self.pump(now, id);
        }
    }

    fn on_signed_time(&mut self, now: Instant, conn: ConnId, params: &[u8], encrypted: bool) {
        let code = match SignedTime::parse_command_params(params) {
            Err(_) => result::INVALID_PARAM,
            Ok(signed) => {
                let valid = Signature::from_der(&signed.signature)
                    .ok()
                    .is_some_and(|sig| self.spec.authority.verify(&signed.datetime, &sig).is_ok());
                if !valid || signed.unix_ms() < self.last_signed_ms {
                    result::ERROR
                } else {
                    self.last_signed_ms = signed.unix_ms();
                    let clock = WallClock {
                        at: now,
                        unix_ms: signed.unix_ms(),
                    };
                    self.trusted = Some(clock);
                    for c in self.conns.values_mut() {
                        c.server.set_trusted_time(Some(clock));
                    }
                    result::SUCCESS
                }
            }
        };
        let reply = [op::SET_SIGNED_DATETIME, code];
        if encrypted {
            if let Some(c) = self.conns.get_mut(&conn) {
                let _ = c.server.send_response(now, &reply);
            }
        } else {
            self.reply_plain(conn, &reply);
        }
        let status = u8::from(code != result::SUCCESS);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.server
                .send_plain(Channel::Notifications, &[notif::SIGNED_DATETIME, status]);
        }
        self.pump(now, conn);
    }

    fn reply_plain(&mut self, conn: ConnId, body: &[u8]) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.server.send_plain(Channel::ApiCommands, body);
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

impl LockSpec {
    /// A lock with the fixture's keys and device id, for tests and benchmarks.
    pub fn for_fixture(f: &crate::ptls::pair::Fixture, behaviour: Behaviour) -> LockSpec {
        LockSpec {
            serial: "10000000-000001".into(),
            device_id: f.device_id,
            key: f.lock_key.clone(),
            authority: *f.authority.verifying_key(),
            behaviour,
            script: Vec::new(),
        }
    }
}

impl Lock {
    /// The fixture's lock, its wall clock at the fixture's time.
    pub fn for_fixture(
        f: &crate::ptls::pair::Fixture,
        behaviour: Behaviour,
        seed: u64,
        now: Instant,
    ) -> Lock {
        let wall = WallClock {
            at: now,
            unix_ms: f.unix_ms,
        };
        Lock::new(LockSpec::for_fixture(f, behaviour), seed, wall)
    }
}

/// One lock with one connection, subscribed to everything: for the pair harness.
pub struct LockEndpoint {
    pub lock: Lock,
    pub conn: ConnId,
    /// Set when the lock dropped the link.
    pub disconnected: Option<u8>,
}

impl LockEndpoint {
    /// The fixture's lock with one connection at ATT MTU 247.
    pub fn for_fixture(
        f: &crate::ptls::pair::Fixture,
        behaviour: Behaviour,
        seed: u64,
        now: Instant,
    ) -> LockEndpoint {
        LockEndpoint::new(Lock::for_fixture(f, behaviour, seed, now), now, 247)
            .expect("a new lock accepts its first connection")
    }

    pub fn new(mut lock: Lock, now: Instant, att_mtu: u16) -> Result<LockEndpoint, Refusal> {
        let (conn, _) = lock.connect(now, att_mtu)?;
        for c in Channel::ALL {
            lock.subscribe(conn, c, true);
        }
        Ok(LockEndpoint {
            lock,
            conn,
            disconnected: None,
        })
    }
}

impl Endpoint for LockEndpoint {
    fn handle_input(&mut self, now: Instant, channel: Channel, bytes: &[u8]) {
        self.lock.write(now, self.conn, channel, bytes);
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.lock.handle_timeout(now);
    }
    fn poll_transmit(&mut self) -> Option<Transmit> {
        loop {
            match self.lock.poll_output()? {
                Output::Value { channel, bytes, .. } => return Some(Transmit { channel, bytes }),
                Output::Disconnect { reason, .. } => self.disconnected = Some(reason),
            }
        }
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.lock.poll_timeout()
    }
}
