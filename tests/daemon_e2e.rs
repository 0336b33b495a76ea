//! The daemon end to end: `lockbridge sim` and `lockbridge run` as separate processes, commands
//! through the control socket, faults through the simulator's injector, and the lock's event
//! log as the record of what actually moved.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use lockbridge::command::{Action, Mode, Outcome, Reason, Step};
use lockbridge::control::{ControlClient, Request};

use common::{World, outcome, set_faults, set_lock};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_locks_on_three_slots_with_mixed_policies_all_commands_succeed() {
    let w = World::new(8, |_| {});
    let config = std::fs::read_to_string(w.daemon_config()).unwrap();
    assert!(config.contains("max_connections = 3"));
    assert_eq!(config.matches("link = \"on-demand\"").count(), 4);
    let _sim = w.sim();
    let _daemon = w.daemon();
    let mut tasks = Vec::new();
    for n in 1..=8 {
        let control = w.control();
        tasks.push(tokio::spawn(async move {
            let mut c = ControlClient::connect(&control).await.unwrap();
            c.command(&Request::Command {
                lock: format!("lock-{n}"),
                action: Action::Unlock,
                mode: Mode::Normal,
                id: Some(format!("unlock-{n}")),
                ttl_s: Some(60),
            })
            .await
            .unwrap()
        }));
    }
    for t in tasks {
        let reports = t.await.unwrap();
        match outcome(&reports) {
            Outcome::Success { state: Some(s), .. } => {
                assert_eq!(s.state, lockbridge::ptls::api::LockState::Unlocked)
            }
            other => panic!("{}: {other:?}", reports[0].lock),
        }
    }
    let acts = w.actuations();
    assert_eq!(acts.len(), 8, "{acts:?}");
    let mut per_lock: HashMap<String, usize> = HashMap::new();
    for a in &acts {
        *per_lock
            .entry(a["lock"].as_str().unwrap().into())
            .or_default() += 1;
    }
    assert!(per_lock.values().all(|n| *n == 1), "{per_lock:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_percent_loss_gives_one_outcome_per_command_and_never_a_second_actuation() {
    let w = World::new(1, |sim| {
        set_faults(
            sim,
            &[
                ("loss", toml::Value::Float(0.2)),
                ("seed", toml::Value::Integer(5)),
            ],
        );
    });
    let _sim = w.sim();
    let _daemon = w.daemon();
    let mut sent = 0;
    let mut successes = 0;
    for i in 0..8 {
        let action = if i % 2 == 0 {
            Action::Unlock
        } else {
            Action::Lock
        };
        let t = Instant::now();
        let reports = w
            .command("lock-1", action, Some(&format!("c{i}")), Some(60))
            .await;
        let o = outcome(&reports).clone();
        println!("c{i}: {:?} after {:?}", o, t.elapsed());
        sent += usize::from(reports.iter().any(|r| r.step == Step::Sent));
        successes += usize::from(matches!(o, Outcome::Success { .. }));
        // Repeating the id returns the same outcome and sends nothing.
        let again = w
            .command("lock-1", action, Some(&format!("c{i}")), Some(60))
            .await;
        assert_eq!(outcome(&again), &o);
        assert!(again.iter().all(|r| r.step != Step::Sent));
    }
    let acts = w.actuations();
    assert!(
        acts.len() <= sent,
        "{} actuations for {sent} commands sent",
        acts.len()
    );
    assert!(successes <= acts.len());
    assert!(
        successes >= 4,
        "only {successes} of 8 succeeded at 20% loss"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_right_after_a_command_is_ambiguous_with_the_state_read_back() {
    // Values to the gateway: 3 for the handshake, 2 for the first refresh; the 6th — the
    // response to the unlock — is lost with the link.
    let w = World::new(1, |sim| {
        set_faults(
            sim,
            &[
                ("disconnect_after_frames", toml::Value::Integer(5)),
                (
                    "disconnect_direction",
                    toml::Value::String("to-client".into()),
                ),
            ],
        );
    });
    let _sim = w.sim();
    let _daemon = w.daemon();
    w.wait_status("lock-1", "connected", Duration::from_secs(10))
        .await;
    let reports = w
        .command("lock-1", Action::Unlock, Some("amb-1"), Some(30))
        .await;
    match outcome(&reports) {
        Outcome::Ambiguous { state: Some(s), .. } => {
            assert!(
                matches!(
                    s.state,
                    lockbridge::ptls::api::LockState::Unlocking
                        | lockbridge::ptls::api::LockState::Unlocked
                ),
                "{s:?}"
            );
        }
        other => panic!("expected ambiguous with state, got {other:?}"),
    }
    // Once a later read is through, the session has nothing of that command left to do.
    w.barrier("lock-1").await;
    assert_eq!(w.actuations().len(), 1, "one actuation, never re-sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebooting_lock_is_reconnected_and_commands_work_again() {
    let w = World::new(1, |_| {});
    let sim = w.sim();
    let _daemon = w.daemon();
    w.wait_status("lock-1", "connected", Duration::from_secs(10))
        .await;
    drop(sim); // SIGKILL: the lock vanishes mid-session
    let t = Instant::now();
    while w.locks().await[0]["status"] == "connected" {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the lost lock was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _sim = w.sim();
    w.wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let reports = w.command("lock-1", Action::Unlock, None, Some(30)).await;
    assert!(
        matches!(outcome(&reports), Outcome::Success { .. }),
        "{reports:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_without_trusted_time_gets_a_signed_time_and_works() {
    let w = World::new(1, |sim| {
        set_lock(sim, 0, "trusted_time", toml::Value::Boolean(false))
    });
    let _sim = w.sim();
    let _daemon = w.daemon();
    let reports = w.command("lock-1", Action::Unlock, None, Some(30)).await;
    assert!(
        matches!(outcome(&reports), Outcome::Success { .. }),
        "{reports:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_factory_reset_lock_is_reported_not_registered_and_not_retried() {
    let w = World::new(1, |sim| {
        set_lock(sim, 0, "registered", toml::Value::Boolean(false))
    });
    let _sim = w.sim();
    let _daemon = w.daemon();
    w.wait_status("lock-1", "not-registered", Duration::from_secs(10))
        .await;
    let reports = w.command("lock-1", Action::Unlock, None, Some(30)).await;
    assert_eq!(outcome(&reports), &Outcome::failed(Reason::NotRegistered));
    // Still not retrying after longer than the first backoff (2 s), and nothing ever moved:
    // an absence, which only time can show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let locks = w.locks().await;
    assert_eq!(locks[0]["status"], "not-registered");
    assert!(w.actuations().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_with_a_command_in_flight_the_same_id_gets_one_outcome_and_one_actuation() {
    // A slow bolt keeps the command in flight (its outcome waits for the bolt to stop).
    let w = World::new(1, |sim| {
        set_lock(sim, 0, "motor_time_ms", toml::Value::Integer(5000))
    });
    let _sim = w.sim();
    let mut daemon = w.daemon();
    w.wait_status("lock-1", "connected", Duration::from_secs(10))
        .await;
    let control = w.control();
    let first = tokio::spawn(async move {
        let mut c = ControlClient::connect(&control).await.unwrap();
        c.command(&Request::Command {
            lock: "lock-1".into(),
            action: Action::Unlock,
            mode: Mode::Normal,
            id: Some("door-42".into()),
            ttl_s: Some(60),
        })
        .await
    });
    let t = Instant::now();
    while w.actuations().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the unlock never reached the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.signal("-KILL");
    daemon.wait_exit(Duration::from_secs(5));
    assert!(
        first.await.unwrap().is_err(),
        "the first caller lost its connection, no outcome"
    );
    let _daemon = w.daemon();
    let again = w
        .command("lock-1", Action::Unlock, Some("door-42"), Some(60))
        .await;
    let o = outcome(&again).clone();
    assert!(matches!(o, Outcome::Ambiguous { .. }), "{o:?}");
    assert!(again.iter().any(|r| r.repeated));
    let third = w
        .command("lock-1", Action::Unlock, Some("door-42"), Some(60))
        .await;
    assert_eq!(outcome(&third), &o, "the id keeps its one outcome");
    w.barrier("lock-1").await;
    assert_eq!(w.actuations().len(), 1, "{:?}", w.actuations());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_deadline_passed_while_the_lock_was_unreachable_is_never_sent() {
    let w = World::new(1, |_| {});
    let _daemon = w.daemon(); // no simulator yet: the lock is unreachable
    let reports = w
        .command("lock-1", Action::Unlock, Some("stale-1"), Some(2))
        .await;
    assert_eq!(outcome(&reports), &Outcome::Expired);
    assert!(reports.iter().all(|r| r.step != Step::Sent));
    let _sim = w.sim();
    w.wait_status("lock-1", "connected", Duration::from_secs(30))
        .await;
    w.barrier("lock-1").await;
    assert!(w.actuations().is_empty(), "{:?}", w.actuations());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_deny_per_origin_and_action() {
    let w = World::new(1, |_| {});
    // Narrow the demo's rule for the control socket to reading and locking.
    w.edit_daemon_config(|t| {
        let full = "[[permissions]]\norigin = \"cli\"\nactions = [\"read\", \"lock\", \"unlock\", \"pull\"]";
        assert!(t.contains(full), "{t}");
        t.replace(full, "[[permissions]]\norigin = \"cli\"\nlocks = \"lock-*\"\nactions = [\"read\", \"lock\"]")
    });
    let _sim = w.sim();
    let _daemon = w.daemon();
    let reports = w.command("lock-1", Action::Unlock, None, Some(10)).await;
    assert!(
        matches!(outcome(&reports), Outcome::Denied { .. }),
        "{reports:?}"
    );
    let reports = w.command("lock-1", Action::Lock, None, Some(30)).await;
    assert!(
        matches!(outcome(&reports), Outcome::Success { .. }),
        "{reports:?}"
    );
    assert_eq!(w.actuations().len(), 1);
}

#[test]
fn sd_notify_ready_watchdog_stopping_and_sigterm_exits_0() {
    let w = World::new(1, |_| {});
    let sock_path = w.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _sim = w.sim();
    let mut daemon = w.daemon_with_env(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
    ]);
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    let mut next = |seen: &mut Vec<String>| {
        let n = sock.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        seen.push(msg.clone());
        msg
    };
    while !next(&mut seen).contains("READY=1") {}
    while !next(&mut seen).contains("WATCHDOG=1") {}
    daemon.signal("-TERM");
    while !next(&mut seen).contains("STOPPING=1") {}
    let status = daemon.wait_exit(lockbridge::daemon::SHUTDOWN_LIMIT + Duration::from_secs(5));
    assert!(status.success(), "exit {status}; messages {seen:?}");
    assert!(
        !Path::new(&w.control()).exists(),
        "control socket removed on exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_is_refreshed_once_then_reported_invalid_cert() {
    // The authority issues certificates for the configured device id; a wrong one is refused
    // by the lock (ALERT 0x05) even after a fresh certificate.
    let w = World::new(1, |_| {});
    w.edit_daemon_config(|t| t.replace("device_id = 1001", "device_id = 9999"));
    let _sim = w.sim();
    let _daemon = w.daemon();
    w.wait_status("lock-1", "invalid-cert", Duration::from_secs(15))
        .await;
    let reports = w.command("lock-1", Action::Unlock, None, Some(10)).await;
    assert_eq!(outcome(&reports), &Outcome::failed(Reason::InvalidCert));
    assert!(w.actuations().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_answer_is_lost_is_asked_again_on_a_fresh_session() {
    // 5 % of values lost each way: some reads lose their request or answer. A lost record
    // leaves the session out of step with the lock, so the read is asked once more on a new
    // session — it never fails fast on the broken one.
    let w = World::new(1, |sim| {
        set_faults(
            sim,
            &[
                ("loss", toml::Value::Float(0.05)),
                ("seed", toml::Value::Integer(11)),
            ],
        );
    });
    let _sim = w.sim();
    let _daemon = w.daemon_with_env(&[("LOCKBRIDGE_COMMANDS__RESPONSE_TIMEOUT_S", "1")]);
    let (mut ok, mut retried, mut failed) = (0, 0, Vec::new());
    for _ in 0..60 {
        let t = Instant::now();
        let reports = w.command("lock-1", Action::Read, None, Some(30)).await;
        let took = t.elapsed();
        match outcome(&reports) {
            Outcome::Success { .. } => {
                ok += 1;
                retried += usize::from(took >= Duration::from_secs(1));
            }
            other => failed.push((other.clone(), took)),
        }
    }
    println!("60 reads at 5 % loss: {ok} ok ({retried} after a lost answer), failed {failed:?}");
    assert!(
        retried > 0,
        "no read lost anything: the test proves nothing"
    );
    for (o, took) in &failed {
        assert!(
            *took >= Duration::from_secs(2),
            "{o:?} after {took:?}: failed without asking again"
        );
    }
    assert!(ok >= 54, "{ok} of 60 reads succeeded");
}
