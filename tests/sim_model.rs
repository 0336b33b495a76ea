//! The simulated lock's behaviour (spec §5.2, §8) through a real client on the pair harness:
//! motor timing, notifications on every state change, jams, pull spring, battery, busy,
//! permissions from the certificate and idle disconnect.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test and benchmark code: a failed unwrap is a failed run

use std::time::{Duration, Instant};

use lockbridge::fault::FaultConfig;
use lockbridge::ptls::api::{LockState, notif, op, result};
use lockbridge::ptls::cert::{PERM_LOCK_UNLOCK, PERM_READ};
use lockbridge::ptls::pair::{Fixture, Pair};
use lockbridge::ptls::{Client, Event};
use lockbridge::sim::model::{Behaviour, InitialState, LockEndpoint};

struct Rig {
    p: Pair<Client, LockEndpoint>,
}

impl Rig {
    fn new(behaviour: Behaviour, permissions: u32) -> Rig {
        let f = Fixture::new(500);
        let now = Instant::now();
        let lock = LockEndpoint::for_fixture(&f, behaviour, 1, now);
        let mut config = f.client_config();
        config.certificate = f.certificate(permissions);
        let client = f.client(config, 1, now);
        let mut p = Pair::new(client, lock, now, &FaultConfig::default());
        assert!(p.drive(Duration::from_secs(10), |p| p.client.is_established()));
        while p.client.poll_event().is_some() {}
        Rig { p }
    }

    /// Send a command, return its response's result and data.
    fn command(&mut self, body: &[u8]) -> (u8, Vec<u8>) {
        let t = self.p.now;
        self.p.client.send_command(t, body).unwrap();
        let mut got = None;
        self.p.drive(Duration::from_secs(5), |p| {
            while let Some(e) = p.client.poll_event() {
                match e {
                    Event::Response(r) => got = Some((r.result, r.data)),
                    Event::Notification { .. } => {} // collected by `states` from the log below
                    _ => {}
                }
            }
            got.is_some()
        });
        got.expect("response")
    }

    /// Run `d` of virtual time and return the state notifications with their offsets.
    fn states_for(&mut self, body: &[u8], d: Duration) -> (u8, Vec<(Duration, LockState, u8)>) {
        let t0 = self.p.now;
        self.p.client.send_command(t0, body).unwrap();
        let mut code = None;
        let mut states = Vec::new();
        self.p.drive(d, |p| {
            while let Some(e) = p.client.poll_event() {
                match e {
                    Event::Response(r) => code = Some(r.result),
                    Event::Notification { id, params } if id == notif::LOCK_STATUS_CHANGE => {
                        states.push((p.now - t0, LockState::from_byte(params[0]), params[1]));
                    }
                    _ => {}
                }
            }
            false
        });
        (code.expect("response"), states)
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn unlock_and_lock_notify_every_state_change_with_motor_time() {
    let mut r = Rig::new(Behaviour::default(), lockbridge::ptls::cert::PERM_ALL);
    assert_eq!(
        r.command(&[op::GET_STATE]),
        (result::SUCCESS, vec![0x06, 0x00])
    );
    let (code, states) = r.states_for(&[op::UNLOCK, 0], Duration::from_secs(3));
    assert_eq!(code, result::SUCCESS);
    assert_eq!(
        states,
        vec![
            (ms(0), LockState::Unlocking, 0),
            (ms(1500), LockState::Unlocked, 0)
        ]
    );
    let (_, states) = r.states_for(&[op::LOCK, 0], Duration::from_secs(3));
    assert_eq!(
        states.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![LockState::Locking, LockState::Locked]
    );
    let log = r.p.lock.lock.actuations();
    assert_eq!(log.len(), 2);
    assert_eq!(
        (log[0].command.as_str(), log[0].result.as_str()),
        ("unlock", "success")
    );
    assert_eq!(log[1].command, "lock");
}

#[test]
fn a_busy_lock_answers_busy_and_a_forced_jam_ends_partially_unlocked() {
    let mut r = Rig::new(Behaviour::default(), lockbridge::ptls::cert::PERM_ALL);
    let t = r.p.now;
    r.p.client.send_command(t, &[op::UNLOCK, 0]).unwrap();
    r.p.drive(ms(100), |_| false);
    while r.p.client.poll_event().is_some() {}
    assert_eq!(r.command(&[op::LOCK, 0]).0, result::BUSY);
    r.p.drive(Duration::from_secs(3), |_| false);
    r.p.lock.lock.force_jam();
    let (_, states) = r.states_for(&[op::LOCK, 0], Duration::from_secs(3));
    assert_eq!(states.last().unwrap().1, LockState::PartiallyUnlocked);
    assert_eq!(states.last().unwrap().2, 0x01, "status JAMMED");
    assert_eq!(
        r.command(&[op::GET_STATE]),
        (result::SUCCESS, vec![0x03, 0x01])
    );
}

#[test]
fn pull_spring_runs_after_unlock_and_can_be_off() {
    let behaviour = Behaviour {
        pull_spring: true,
        pull_time_ms: 2000,
        ..Behaviour::default()
    };
    let mut r = Rig::new(behaviour, lockbridge::ptls::cert::PERM_ALL);
    let (code, states) = r.states_for(&[op::UNLOCK, 0], Duration::from_secs(6));
    assert_eq!(code, result::SUCCESS);
    assert_eq!(
        states,
        vec![
            (ms(0), LockState::Unlocking, 0),
            (ms(1500), LockState::Pulling, 0),
            (ms(2250), LockState::PullSpring, 0),
            (ms(4250), LockState::Unlocked, 0),
        ]
    );
    let (_, states) = r.states_for(&[op::PULL_SPRING], Duration::from_secs(5));
    assert_eq!(states.first().unwrap().1, LockState::Pulling);
    assert_eq!(states.last().unwrap().1, LockState::Unlocked);

    let mut off = Rig::new(Behaviour::default(), lockbridge::ptls::cert::PERM_ALL);
    assert_eq!(off.command(&[op::PULL_SPRING]).0, result::NOT_CONFIGURED);
}

#[test]
fn battery_drains_per_movement_and_is_notified() {
    let behaviour = Behaviour {
        battery: 50,
        battery_drain_per_move: 1.0,
        ..Behaviour::default()
    };
    let mut r = Rig::new(behaviour, lockbridge::ptls::cert::PERM_ALL);
    assert_eq!(
        r.command(&[op::GET_BATTERY]),
        (result::SUCCESS, vec![50, 0])
    );
    let t0 = r.p.now;
    r.p.client.send_command(t0, &[op::UNLOCK, 0]).unwrap();
    let mut battery_notes = Vec::new();
    r.p.drive(Duration::from_secs(3), |p| {
        while let Some(e) = p.client.poll_event() {
            if let Event::Notification {
                id: notif::BATTERY_STATE,
                params,
            } = e
            {
                battery_notes.push(params);
            }
        }
        false
    });
    assert_eq!(battery_notes, vec![vec![49, 0]]);
    assert_eq!(
        r.command(&[op::GET_BATTERY]),
        (result::SUCCESS, vec![49, 0])
    );
}

#[test]
fn certificate_permissions_are_enforced_with_no_permission() {
    let mut r = Rig::new(Behaviour::default(), PERM_READ);
    assert_eq!(r.command(&[op::UNLOCK, 0]).0, result::NO_PERMISSION);
    assert_eq!(r.command(&[op::GET_STATE]).0, result::SUCCESS);
    assert_eq!(r.p.lock.lock.state(), LockState::Locked, "nothing moved");
    let mut r = Rig::new(Behaviour::default(), PERM_LOCK_UNLOCK);
    assert_eq!(r.command(&[op::GET_STATE]).0, result::NO_PERMISSION);
    assert_eq!(r.command(&[op::PULL_SPRING]).0, result::NO_PERMISSION);
}

#[test]
fn uncalibrated_lock_refuses_to_move_and_unknown_opcodes_get_invalid_param() {
    let behaviour = Behaviour {
        initial_state: InitialState::Uncalibrated,
        ..Behaviour::default()
    };
    let mut r = Rig::new(behaviour, lockbridge::ptls::cert::PERM_ALL);
    assert_eq!(r.command(&[op::UNLOCK, 0]).0, result::NOT_CALIBRATED);
    assert_eq!(r.command(&[0x2D]).0, result::INVALID_PARAM);
    assert_eq!(r.command(&[op::LOCK, 0x07]).0, result::NOT_CALIBRATED);
}

#[test]
fn invalid_modes_get_invalid_param() {
    let mut r = Rig::new(Behaviour::default(), lockbridge::ptls::cert::PERM_ALL);
    assert_eq!(r.command(&[op::UNLOCK, 0x09]).0, result::INVALID_PARAM);
    assert_eq!(r.command(&[op::LOCK, 0x01]).0, result::INVALID_PARAM);
}

#[test]
fn idle_link_is_dropped_after_the_configured_time() {
    let behaviour = Behaviour {
        idle_disconnect_ms: 30_000,
        ..Behaviour::default()
    };
    let mut r = Rig::new(behaviour, lockbridge::ptls::cert::PERM_ALL);
    let t0 = r.p.now;
    r.p.drive(Duration::from_secs(60), |p| p.lock.disconnected.is_some());
    assert_eq!(r.p.lock.disconnected, Some(1), "reason idle");
    assert!(r.p.now - t0 <= Duration::from_secs(30));
}

#[test]
fn lock_that_loses_trusted_time_asks_connected_clients() {
    let mut r = Rig::new(Behaviour::default(), lockbridge::ptls::cert::PERM_ALL);
    let t = r.p.now;
    r.p.lock.lock.lose_trusted_time(t);
    let mut asked = false;
    r.p.drive(Duration::from_secs(1), |p| {
        while let Some(e) = p.client.poll_event() {
            asked |= matches!(
                e,
                Event::Notification {
                    id: notif::NEED_DATE_TIME,
                    ..
                }
            );
        }
        asked
    });
    assert!(asked);
    assert!(!r.p.lock.lock.has_trusted_time());
}

#[test]
fn a_rebooting_lock_drops_its_links_forgets_its_clock_and_is_off_the_air_for_a_while() {
    let mut r = Rig::new(Behaviour::default(), lockbridge::ptls::cert::PERM_ALL);
    let t = r.p.now;
    r.p.lock.lock.reboot(t, Duration::from_millis(1_500));
    r.p.drive(Duration::from_secs(1), |p| p.lock.disconnected.is_some());
    assert_eq!(r.p.lock.disconnected, Some(3), "reason fault");
    assert_eq!(r.p.lock.lock.connections(), 0);
    assert!(!r.p.lock.lock.has_trusted_time());
    assert_eq!(r.p.lock.lock.state(), LockState::Locked, "the bolt stays");
    let lock = &mut r.p.lock.lock;
    assert!(lock.connect(t + Duration::from_millis(1_400), 247).is_err());
    assert!(lock.connect(t + Duration::from_millis(1_500), 247).is_ok());
}

#[test]
fn status_changes_come_in_the_long_form_with_trigger_access_id_and_door() {
    use lockbridge::ptls::WallClock;
    use lockbridge::ptls::api::{DoorState, StatusChange, trigger};
    use lockbridge::sim::model::{Happening, Lock, LockSpec, ScriptStep};
    let f = Fixture::new(501);
    let now = Instant::now();
    let behaviour = Behaviour {
        door_sensor: true,
        ..Behaviour::default()
    };
    let mut spec = LockSpec::for_fixture(&f, behaviour);
    // After the session is up (it takes well under a second of virtual time): the door opens,
    // someone presses the button (unlocked by the command → locks), the door closes.
    spec.script = vec![
        ScriptStep {
            after_ms: 5_000,
            event: Happening::OpenDoor,
        },
        ScriptStep {
            after_ms: 6_000,
            event: Happening::PressButton,
        },
        ScriptStep {
            after_ms: 9_000,
            event: Happening::CloseDoor,
        },
    ];
    let wall = WallClock {
        at: now,
        unix_ms: f.unix_ms,
    };
    let lock = LockEndpoint::new(Lock::new(spec, 1, wall), now, 247).unwrap();
    let client = f.client(f.client_config(), 1, now);
    let mut p = Pair::new(client, lock, now, &FaultConfig::default());
    assert!(p.drive(Duration::from_secs(4), |p| p.client.is_established()));
    let t = p.now;
    p.client.send_command(t, &[op::UNLOCK, 0]).unwrap();
    let mut changes = Vec::new();
    p.drive(Duration::from_secs(12), |p| {
        while let Some(e) = p.client.poll_event() {
            if let Event::Notification {
                id: notif::LOCK_STATUS_CHANGE,
                params,
            } = e
            {
                changes.push(StatusChange::parse(&params).unwrap());
            }
        }
        false
    });
    let seen: Vec<_> = changes
        .iter()
        .map(|c| {
            let cause = c.cause.expect("the long form");
            (c.state, cause.trigger, cause.access_id, cause.door)
        })
        .collect();
    // The fixture's certificate carries client id 0x11…: its commands report access id 0x11111111.
    let remote = (trigger::REMOTE, 0x1111_1111);
    assert_eq!(
        seen,
        vec![
            (LockState::Unlocking, remote.0, remote.1, DoorState::Closed),
            (LockState::Unlocked, remote.0, remote.1, DoorState::Closed),
            (
                LockState::Unlocked,
                trigger::DOOR_SENSOR,
                0,
                DoorState::Open
            ),
            (LockState::Locking, trigger::BUTTON, 0, DoorState::Open),
            (LockState::Locked, trigger::BUTTON, 0, DoorState::Open),
            (
                LockState::Locked,
                trigger::DOOR_SENSOR,
                0,
                DoorState::Closed
            ),
        ]
    );
    let log = p.lock.lock.actuations();
    assert_eq!(
        log.iter()
            .map(|a| (a.command.as_str(), a.trigger.as_str()))
            .collect::<Vec<_>>(),
        vec![("unlock", "remote"), ("lock", "button")]
    );

    // Without a door sensor the door is unknown and door events change nothing.
    let mut plain = Lock::for_fixture(&f, Behaviour::default(), 2, now);
    plain.happen(now, Happening::OpenDoor);
    assert_eq!(plain.door(), DoorState::Unknown);
}
