//! The BlueZ path end to end: a private D-Bus with BlueZoo, `lockbridge sim --ble` serving each
//! lock on its own adapter, and `lockbridge run` with `transport = "ble"` on `hci0`, through the
//! real `bluer` code: discovery by serial UUID, connect, subscribe, handshake, GET_STATE, unlock
//! and its notifications, trusted time, several locks at once, a simulator that dies and comes
//! back, and a clean shutdown.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use lockbridge::command::{Action, Outcome};
use lockbridge::ptls::api::LockState;

use common::{Emulator, World, outcome, set_lock};

fn unlocked(o: &Outcome) -> bool {
    matches!(o, Outcome::Success { state: Some(s), .. } if s.state == LockState::Unlocked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_over_bluez_handshakes_reads_unlocks_and_follows_notifications() {
    let emu = Emulator::start(2);
    let w = World::new(1, |sim| {
        set_lock(sim, 0, "motor_time_ms", toml::Value::Integer(500))
    });
    w.use_ble("hci0");
    let _sim = w.sim_ble(&emu, "hci1");
    let _daemon = w.daemon_with_env(&[("DBUS_SYSTEM_BUS_ADDRESS", &emu.address)]);
    w.wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let view = &w.locks().await[0];
    assert_eq!(view["state"], "locked", "state read with GET_STATE: {view}");
    assert!(
        !view["battery"].is_null(),
        "battery read with GET_BATTERY: {view}"
    );
    assert!(!view["rssi"].is_null(), "RSSI reported: {view}");
    let reports = w
        .command("lock-1", Action::Unlock, Some("ble-1"), Some(30))
        .await;
    assert!(unlocked(outcome(&reports)), "{reports:?}");
    // The registry followed the lock's notifications to the end of the movement.
    assert_eq!(w.locks().await[0]["state"], "unlocked");
    let acts = w.actuations();
    assert_eq!(acts.len(), 1, "{acts:?}");
    assert_eq!(acts[0]["command"], "unlock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_without_trusted_time_gets_a_signed_time_over_bluez() {
    let emu = Emulator::start(2);
    let w = World::new(1, |sim| {
        set_lock(sim, 0, "trusted_time", toml::Value::Boolean(false))
    });
    w.use_ble("hci0");
    let _sim = w.sim_ble(&emu, "hci1");
    let _daemon = w.daemon_with_env(&[("DBUS_SYSTEM_BUS_ADDRESS", &emu.address)]);
    let reports = w.command("lock-1", Action::Unlock, None, Some(30)).await;
    assert!(unlocked(outcome(&reports)), "{reports:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_locks_at_once_over_bluez() {
    let emu = Emulator::start(4);
    let w = World::new(3, |_| {});
    w.use_ble("hci0");
    let _sim = w.sim_ble(&emu, "hci1,hci2,hci3");
    let _daemon = w.daemon_with_env(&[("DBUS_SYSTEM_BUS_ADDRESS", &emu.address)]);
    let mut tasks = Vec::new();
    for n in 1..=3 {
        let control = w.control();
        tasks.push(tokio::spawn(async move {
            let mut c = lockbridge::control::ControlClient::connect(&control)
                .await
                .unwrap();
            c.command(&lockbridge::control::Request::Command {
                lock: format!("lock-{n}"),
                action: Action::Unlock,
                mode: lockbridge::command::Mode::Normal,
                id: None,
                ttl_s: Some(60),
            })
            .await
            .unwrap()
        }));
    }
    for t in tasks {
        let reports = t.await.unwrap();
        assert!(unlocked(outcome(&reports)), "{reports:?}");
    }
    assert_eq!(w.actuations().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulator_that_dies_is_noticed_and_reconnected_when_it_returns() {
    // The simulator comes back on another adapter (a new peripheral address): BlueZoo keeps a
    // dead peripheral's GATT objects on the client side, so a return on the same adapter
    // collides there. lockbridge finds the lock again by its serial UUID.
    let emu = Emulator::start(3);
    let w = World::new(1, |_| {});
    w.use_ble("hci0");
    // A short keep-alive makes the loss visible quickly.
    w.edit_daemon_config(|t| {
        t.replace(
            "link = \"persistent\"",
            "link = \"persistent\"\nkeepalive_s = 1",
        )
    });
    let sim = w.sim_ble(&emu, "hci1");
    let _daemon = w.daemon_with_env(&[("DBUS_SYSTEM_BUS_ADDRESS", &emu.address)]);
    w.wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    drop(sim); // SIGKILL mid-session
    let t = Instant::now();
    loop {
        let v = &w.locks().await[0];
        if v["status"] != "connected" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the lost link was never noticed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _sim = w.sim_ble(&emu, "hci2");
    w.wait_status("lock-1", "connected", Duration::from_secs(60))
        .await;
    let reports = w.command("lock-1", Action::Unlock, None, Some(30)).await;
    assert!(unlocked(outcome(&reports)), "{reports:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_shuts_down_cleanly_over_bluez() {
    let emu = Emulator::start(2);
    let w = World::new(1, |_| {});
    w.use_ble("hci0");
    let _sim = w.sim_ble(&emu, "hci1");
    let mut daemon = w.daemon_with_env(&[("DBUS_SYSTEM_BUS_ADDRESS", &emu.address)]);
    w.wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    daemon.signal("-TERM");
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit {status}");
    // The lock saw the gateway leave: its adapter reported the link down.
    let t = Instant::now();
    loop {
        let logs: String = std::fs::read_dir(&w.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("sim-ble-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect();
        if logs.contains("disconnected") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the simulator never saw the link close:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn bluezoo_call(emu: &Emulator, args: &[&str]) {
    let out = std::process::Command::new("dbus-send")
        .arg(format!("--bus={}", emu.address))
        .args(["--print-reply", "--dest=org.bluez", "/org/bluezoo"])
        .args(args)
        .output()
        .expect("dbus-send (package dbus; tests/run.sh installs it)");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_adapter_is_noticed_reported_and_commands_still_get_an_outcome() {
    // BlueZoo cannot bring the same adapter back cleanly (it keeps the old link's GATT objects),
    // so this checks the loss; the adapter is looked up again on every connection attempt.
    let emu = Emulator::start(2);
    let w = World::new(1, |_| {});
    w.use_ble("hci0");
    w.edit_daemon_config(|t| {
        t.replace(
            "link = \"persistent\"",
            "link = \"persistent\"\nkeepalive_s = 1",
        )
    });
    let _sim = w.sim_ble(&emu, "hci1");
    let _daemon = w.daemon_with_env(&[("DBUS_SYSTEM_BUS_ADDRESS", &emu.address)]);
    w.wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    bluezoo_call(&emu, &["org.bluezoo.Manager1.RemoveAdapter", "byte:0"]);
    let t = Instant::now();
    let view = loop {
        let v = w.locks().await[0].clone();
        if v["status"] == "unreachable"
            && v["last_error"].as_str().is_some_and(|e| e.contains("hci0"))
        {
            break v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the lost adapter was never reported: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        view["last_error"]
            .as_str()
            .unwrap()
            .contains("bluetoothctl list"),
        "{view}"
    );
    let reports = w.command("lock-1", Action::Unlock, None, Some(3)).await;
    assert_eq!(outcome(&reports), &Outcome::Expired, "{reports:?}");
    assert!(w.actuations().is_empty());
}

/// `busctl` against the emulator's bus: (success, stdout + stderr).
fn busctl(emu: &Emulator, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("busctl")
        .args(["--address", &emu.address])
        .args(args)
        .output()
        .expect("busctl (package systemd; tests/run.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The ATT limit over BlueZ (ptls-spec §3.2, revised), with busctl as an independent GATT
/// client: `lockbridge sim --ble` refuses a value one byte longer than `ATT_MTU − 3` with
/// BlueZ's InvalidValueLength ("Invalid value length") and logs it; a value that fits is taken.
#[test]
fn over_bluez_a_value_longer_than_att_mtu_minus_3_is_refused_and_logged() {
    let emu = Emulator::start(2);
    let w = World::new(1, |_| {});
    let _sim = w.sim_ble(&emu, "hci1");
    // The simulator's adapter as hci0 sees it.
    let device = "/org/bluez/hci0/dev_00_AA_00_00_00_02";
    let (ok, text) = busctl(
        &emu,
        &[
            "call",
            "org.bluez",
            "/org/bluez/hci0",
            "org.bluez.Adapter1",
            "StartDiscovery",
        ],
    );
    assert!(ok, "{text}");
    common::wait_for(
        || {
            busctl(&emu, &["tree", "--list", "org.bluez"])
                .1
                .contains(device)
        },
        "the simulated lock's advertisement",
    );
    let (ok, text) = busctl(
        &emu,
        &["call", "org.bluez", device, "org.bluez.Device1", "Connect"],
    );
    assert!(ok, "{text}");
    // PTLS_RX among the characteristics BlueZ resolved.
    let mut ptls_rx = None;
    common::wait_for(
        || {
            let tree = busctl(&emu, &["tree", "--list", "org.bluez"]).1;
            ptls_rx = tree
                .lines()
                .map(str::trim)
                .filter(|p| p.starts_with(device) && p.contains("/char") && !p.contains("/desc"))
                .map(str::to_string)
                .find(|path| {
                    busctl(
                        &emu,
                        &[
                            "get-property",
                            "org.bluez",
                            path,
                            "org.bluez.GattCharacteristic1",
                            "UUID",
                        ],
                    )
                    .1
                    .contains(lockbridge::ptls::gatt::PTLS_RX_UUID)
                });
            ptls_rx.is_some()
        },
        "PTLS_RX resolved over BlueZ",
    );
    let ptls_rx = ptls_rx.unwrap();
    let (ok, mtu) = busctl(
        &emu,
        &[
            "get-property",
            "org.bluez",
            &ptls_rx,
            "org.bluez.GattCharacteristic1",
            "MTU",
        ],
    );
    assert!(ok, "{mtu}");
    let write = |len: usize| {
        let mut args: Vec<String> = [
            "call",
            "org.bluez",
            &ptls_rx,
            "org.bluez.GattCharacteristic1",
            "WriteValue",
            "aya{sv}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(len.to_string());
        args.extend(std::iter::repeat_n("3".to_string(), len));
        args.extend(["1", "type", "s", "request"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        busctl(&emu, &args)
    };
    // The lock's radio takes ATT MTU 247: values up to 244 bytes.
    let (ok, text) = write(245);
    // BlueZ's org.bluez.Error.InvalidValueLength, which busctl shows by its message.
    assert!(
        !ok && text.contains("Invalid value length"),
        "a 245-byte write was not refused: {text}"
    );
    let (ok, text) = write(244);
    assert!(ok, "a 244-byte write was refused: {text} (MTU {mtu})");
    common::wait_for(
        || w.sim_log().contains("refused a 245-byte write on PtlsRx"),
        "the simulator's log of the refused write",
    );
    assert_eq!(
        w.sim_log().matches("refused a ").count(),
        1,
        "{}",
        w.sim_log()
    );
}

/// `lockbridge scan` through BlueZ: both simulated locks heard with their serials (read from
/// the advertised serial UUID), addresses and signal strength, matched to the configured
/// locks; a configured lock that is not on the air is named.
#[test]
fn scan_finds_the_locks_on_the_air_and_names_a_configured_one_that_is_not() {
    let emu = Emulator::start(3);
    let w = World::new(2, |_| {});
    w.use_ble("hci0");
    let serials: Vec<String> = w.summary["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["serial"].as_str().unwrap().to_string())
        .collect();
    let _sim = w.sim_ble(&emu, "hci1,hci2");
    // A third configured lock that nothing simulates (lock-2's key: any valid key will do).
    let key = w.summary["locks"][1]["public_key"].as_str().unwrap();
    w.edit_daemon_config(|t| {
        format!(
            "{t}\n[[locks]]\nid = \"shed\"\nserial = \"99999999-000009\"\ndevice_id = 9\npublic_key = \"{key}\"\n"
        )
    });
    let scan = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockbridge"))
            .args(["scan", "--config", w.daemon_config().to_str().unwrap()])
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &emu.address)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        (out.stdout, text)
    };
    let (stdout, text) = scan(&["--seconds", "3", "--json"]);
    let v: serde_json::Value =
        serde_json::from_slice(&stdout).unwrap_or_else(|e| panic!("{e}: {text}"));
    let heard = v["locks"].as_array().unwrap();
    for (i, serial) in serials.iter().enumerate() {
        let l = heard
            .iter()
            .find(|l| l["serial"] == serial.as_str())
            .unwrap_or_else(|| panic!("{serial} not heard: {v}"));
        assert_eq!(l["configured_as"], format!("lock-{}", i + 1), "{v}");
        assert!(l["rssi"].is_i64(), "RSSI of a lock on the air: {v}");
        assert!(l["address"].as_str().unwrap().contains(':'), "{v}");
    }
    assert_eq!(
        v["configured_not_heard"],
        serde_json::json!([{"id": "shed", "serial": "99999999-000009"}]),
        "{v}"
    );
    // The text form says the same to a person.
    let (_, text) = scan(&["--seconds", "2"]);
    assert!(text.contains("2 Tedee lock(s) heard"), "{text}");
    assert!(
        text.contains(&serials[0]) && text.contains("lock-1"),
        "{text}"
    );
    assert!(
        text.contains("not heard: configured lock shed (serial 99999999-000009)"),
        "{text}"
    );
    // The window is bounded.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args(["scan", "--seconds", "1000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1..=120")
            || String::from_utf8_lossy(&out.stderr).contains("120")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_lock_is_reached_again_without_a_scan_or_a_discovery() {
    let emu = Emulator::start(2);
    let bus = tempfile::tempdir().unwrap();
    let log = common::BusLog::start(&emu.address, &bus.path().join("bus.tsv"));
    let w = World::new(1, |_| {});
    w.use_ble("hci0");
    w.edit_daemon_config(|t| {
        t.replace(
            "link = \"persistent\"",
            "link = \"on-demand\"\nidle_disconnect_s = 1\nrefresh_s = 3600",
        )
    });
    let _sim = w.sim_ble(&emu, "hci1");
    let _daemon = w.daemon_with_env(&[("DBUS_SYSTEM_BUS_ADDRESS", &emu.address)]);
    // The first connection (the state read at start) finds the lock and its characteristics.
    w.wait_status("lock-1", "idle", Duration::from_secs(30))
        .await;
    let mut windows = Vec::new();
    for action in [Action::Unlock, Action::Lock] {
        w.wait_status("lock-1", "idle", Duration::from_secs(30))
            .await;
        let from = common::unix_now();
        let reports = w.command("lock-1", action, None, Some(30)).await;
        windows.push((from, common::unix_now()));
        assert!(
            matches!(outcome(&reports), Outcome::Success { .. }),
            "{reports:?}"
        );
    }
    assert_eq!(w.actuations().len(), 2, "each command actuated once");
    // The link dropped after the last command: its calls are all on the bus log by now.
    w.wait_status("lock-1", "idle", Duration::from_secs(30))
        .await;
    let daemon = log.daemon().expect("the daemon asked BlueZ to connect");
    let calls = log.calls();
    for (from, to) in windows {
        let made: Vec<&str> = calls
            .iter()
            .filter(|c| c.sender == daemon && c.at >= from && c.at <= to)
            .map(|c| c.member.as_str())
            .collect();
        let n = |m: &str| made.iter().filter(|c| **c == m).count();
        assert_eq!(n("Device1.Connect"), 1, "{made:?}");
        assert_eq!(n("GattCharacteristic1.StartNotify"), 3, "{made:?}");
        for never in [
            "Adapter1.SetDiscoveryFilter",
            "Adapter1.StartDiscovery",
            "ObjectManager.GetManagedObjects",
        ] {
            assert_eq!(n(never), 0, "{never} on a lock already known: {made:?}");
        }
    }
}
