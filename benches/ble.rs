//! The BlueZ path on BlueZoo (issue 4): time from daemon start to the first lock's session, and
//! warm unlock latency through bluer, D-Bus and the BLE simulator. `cargo bench --bench ble`
//! prints a table and a `json:` line. Needs BlueZoo in `.venv` (tests/run.sh installs it).
//!
//! D-Bus traffic per command, from lockbridge's side: one method call (`WriteValue` with type
//! `request`) for the command frame; the response indication and the state notifications
//! arrive as `PropertiesChanged` signals, which cost no round trip.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // benchmark code

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use lockbridge::command::{Action, Outcome};

use common::{Emulator, World, outcome, set_lock};
use support::{ms, runtime};

fn main() {
    runtime().block_on(async {
        let emu = Emulator::start(2);
        // No motor time: the latency is the gateway and the BlueZ path alone.
        let w = World::new(1, |sim| set_lock(sim, 0, "motor_time_ms", toml::Value::Integer(0)));
        w.use_ble("hci0");
        let _sim = w.sim_ble(&emu, "hci1");
        let started = Instant::now();
        let _daemon = w.daemon_with_env(&[("DBUS_SYSTEM_BUS_ADDRESS", &emu.address), ("LOCKBRIDGE_LOG", "warn")]);
        w.wait_status("lock-1", "connected", Duration::from_secs(30)).await;
        let first_session = started.elapsed();

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
        println!("BlueZ path on BlueZoo");
        println!();
        println!("| measure | value |");
        println!("|---|---:|");
        println!("| daemon start → first lock session (discovery, connect, subscribe, handshake, state) | {:.0} ms |", ms(first_session));
        println!("| warm unlock/lock through the control socket, p50 (200 commands) | {:.2} ms |", ms(p(0.5)));
        println!("| warm unlock/lock, p99 | {:.2} ms |", ms(p(0.99)));
        println!("| D-Bus round trips per command (lockbridge side) | 1 |");
        println!();
        println!(
            "json: {}",
            serde_json::json!({
                "first_session_ms": ms(first_session),
                "warm_command_p50_ms": ms(p(0.5)),
                "warm_command_p99_ms": ms(p(0.99)),
                "dbus_round_trips_per_command": 1,
            })
        );
    });
}
