//! The BlueZ path on BlueZoo (issues 4 and 18): time from daemon start to the first lock's
//! session, warm unlock latency through bluer, D-Bus and the BLE simulator, and an on-demand
//! unlock from idle with every D-Bus method call lockbridge makes for it, counted.
//! `cargo bench --bench ble` prints a table and a `json:` line. Needs BlueZoo in `.venv` and
//! `dbus-monitor` (tests/run.sh installs both).
//!
//! D-Bus traffic per warm command, from lockbridge's side: one method call (`WriteValue` with
//! type `request`) for the command frame; the response indication and the state notifications
//! arrive as `PropertiesChanged` signals, which cost no round trip. From idle, the calls are
//! read off the bus itself (`dbus-monitor --profile`): every method call whose sender is the
//! daemon, from the command's submission to its outcome.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // benchmark code

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lockbridge::command::{Action, Outcome};

use common::{BusLog, Call, Emulator, World, outcome, set_lock, unix_now};
use support::{ms, runtime};

fn main() {
    runtime().block_on(async {
        let emu = Emulator::start(3);
        let bus = tempfile::tempdir().unwrap();
        let log = BusLog::start(&emu.address, &bus.path().join("bus.tsv"));
        // No motor time: the latency is the gateway and the BlueZ path alone. lock-1 holds a
        // persistent session, lock-2 connects on demand and drops its link after a second idle.
        let w = World::new(2, |sim| {
            set_lock(sim, 0, "motor_time_ms", toml::Value::Integer(0));
            set_lock(sim, 1, "motor_time_ms", toml::Value::Integer(0));
        });
        w.use_ble("hci0");
        w.edit_daemon_config(|t| {
            t.replace("link = \"on-demand\"", "link = \"on-demand\"\nidle_disconnect_s = 1\nrefresh_s = 3600")
        });
        let _sim = w.sim_ble(&emu, "hci1,hci2");
        let started = Instant::now();
        let start_unix = unix_now();
        let _daemon = w.daemon_with_env(&[("DBUS_SYSTEM_BUS_ADDRESS", &emu.address), ("LOCKBRIDGE_LOG", "info")]);
        w.wait_status("lock-1", "connected", Duration::from_secs(30)).await;
        let first_session = started.elapsed();
        // lock-2's first connection, at start: found, connected, discovered, its state read.
        w.wait_status("lock-2", "idle", Duration::from_secs(30)).await;
        let first_window = (start_unix, unix_now());

        let mut samples = Vec::new();
        for i in 0..200 {
            let action = if i % 2 == 0 { Action::Unlock } else { Action::Lock };
            let t = Instant::now();
            let reports = w.command("lock-1", action, None, Some(30)).await;
            let d = t.elapsed();
            assert!(matches!(outcome(&reports), Outcome::Success { .. }), "{reports:?}");
            samples.push(d);
        }
        samples.sort();
        let p = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];

        // On demand from idle, every later connection.
        let mut idle = Vec::new();
        let mut windows = Vec::new();
        for i in 0..10 {
            w.wait_status("lock-2", "idle", Duration::from_secs(30)).await;
            let action = if i % 2 == 0 { Action::Unlock } else { Action::Lock };
            let (from, t) = (unix_now(), Instant::now());
            let reports = w.command("lock-2", action, None, Some(30)).await;
            idle.push(t.elapsed());
            windows.push((from, unix_now()));
            assert!(matches!(outcome(&reports), Outcome::Success { .. }), "{reports:?}\n{}", w.daemon_log());
        }
        // The bus log is written as it happens; the last call is in it once dbus-monitor has
        // flushed, which the idle disconnect after it proves.
        w.wait_status("lock-2", "idle", Duration::from_secs(30)).await;
        let daemon = log.daemon().expect("the daemon's Device1.Connect on the bus");
        let calls = log.calls();
        // lock-1 (served on hci1) shares the daemon's connection: its calls are not lock-2's.
        let lock_1 = "dev_00_AA_00_00_00_02";
        let count = |(from, to): (f64, f64)| {
            let mut m = BTreeMap::new();
            let mine = |c: &&Call| c.sender == daemon && c.at >= from && c.at <= to && !c.path.contains(lock_1);
            for c in calls.iter().filter(mine) {
                *m.entry(c.member.clone()).or_insert(0) += 1;
            }
            m
        };
        // The window with the fewest calls is the one reported (an adapter-wide call for
        // lock-1, such as a keep-alive's, may fall into another).
        let later: Vec<BTreeMap<String, usize>> = windows.iter().map(|w| count(*w)).collect();
        let total = |m: &BTreeMap<String, usize>| m.values().sum::<usize>();
        let later_totals: Vec<usize> = later.iter().map(total).collect();
        let fewest = (0..later.len()).min_by_key(|i| later_totals[*i]).unwrap();
        let first = count(first_window);
        let mut idle_later = idle.clone();
        idle_later.sort();
        let q = |v: &[Duration], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        let describe = |m: &BTreeMap<String, usize>| {
            m.iter().map(|(k, n)| format!("{k} ×{n}")).collect::<Vec<_>>().join(", ")
        };

        println!("BlueZ path on BlueZoo");
        println!();
        println!("| measure | value |");
        println!("|---|---:|");
        println!("| daemon start → first lock session (discovery, connect, subscribe, handshake, state) | {:.0} ms |", ms(first_session));
        println!("| warm unlock/lock through the control socket, p50 (200 commands) | {:.2} ms |", ms(p(0.5)));
        println!("| warm unlock/lock, p99 | {:.2} ms |", ms(p(0.99)));
        println!("| D-Bus round trips per command (lockbridge side) | 1 |");
        println!("| on-demand unlock from idle, p50 / max (10) | {:.1} / {:.1} ms |", ms(q(&idle_later, 0.5)), ms(*idle_later.last().unwrap()));
        println!("| D-Bus method calls for one on-demand unlock from idle | {} ({}) |", later_totals[fewest], describe(&later[fewest]));
        println!("| same, each of the 10 | {later_totals:?} |");
        println!("| lock-2's first connection at start (scan, connect, discovery, state) | {} ({}) |", total(&first), describe(&first));
        println!();
        println!(
            "json: {}",
            serde_json::json!({
                "first_session_ms": ms(first_session),
                "warm_command_p50_ms": ms(p(0.5)),
                "warm_command_p99_ms": ms(p(0.99)),
                "dbus_round_trips_per_command": 1,
                "idle_unlock_p50_ms": ms(q(&idle_later, 0.5)),
                "idle_unlock_max_ms": ms(*idle_later.last().unwrap()),
                "idle_dbus_calls": later_totals[fewest],
                "idle_dbus_calls_by_member": later[fewest],
                "idle_dbus_calls_all": later_totals,
                "first_connection_dbus_calls": total(&first),
                "first_connection_dbus_calls_by_member": first,
            })
        );
    });
}
