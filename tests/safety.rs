//! The safety promise under hostile input and faults, end to end: command ids scoped to their
//! origin, a full disk between `sent` and `done`, a damaged id store, durations that overflow,
//! and a motion that ends jammed — each checked against the lock's own record of what moved.
//! The real daemon and simulator, a real mosquitto, libcoap's client.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use lockbridge::command::{Action, Mode, Outcome, Step};
use lockbridge::control::{ControlClient, Request};

use common::mqtt::{Broker, Watch};
use common::{PSK, World, outcome};

const ROOT: &str = "lockbridge/demo";

/// `coap-client-openssl` with identity `full` (which may do everything); the JSON answer.
fn coap_post(port: u16, path: &str, body: &str) -> Value {
    let out = Command::new("coap-client-openssl")
        .args(["-B", "8", "-m", "post", "-u", "full", "-k", PSK, "-t", "50"])
        .args(["-e", body])
        .arg(format!("coaps://127.0.0.1:{port}{path}"))
        .output()
        .unwrap_or_else(|e| {
            panic!("coap-client-openssl: {e}; install libcoap3-bin (tests/run.sh does)")
        });
    // libcoap prints a success's payload on stdout, an error's code and payload on stderr.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = text
        .find('{')
        .zip(text.rfind('}'))
        .map(|(a, b)| &text[a..=b])
        .unwrap_or_else(|| panic!("POST {path}: no JSON answer: {text:?}"));
    serde_json::from_str(json).unwrap_or_else(|e| panic!("POST {path}: {e}: {text:?}"))
}

/// A world with CoAP (identities `full` and `reader`) and the MQTT bridge on `broker`.
fn world_with_everything(
    locks: usize,
    broker: &Broker,
    sim: impl FnOnce(&mut toml::Table),
) -> (World, u16) {
    let world = World::new(locks, sim);
    let port = world.serve_coap("");
    world.edit_daemon_config(|t| {
        format!(
            "{t}\n[mqtt]\nbroker = \"{}\"\nreconnect_min_ms = 200\nreconnect_max_s = 2\nallow = [\"lock\", \"unlock\", \"read\"]\n",
            broker.addr()
        )
    });
    (world, port)
}

async fn cli(
    world: &World,
    lock: &str,
    action: Action,
    id: &str,
) -> Vec<lockbridge::command::Report> {
    world.command(lock, action, Some(id), Some(30)).await
}

/// The reason of a `failed` outcome.
fn failure(reports: &[lockbridge::command::Report]) -> Option<String> {
    let o = serde_json::to_value(outcome(reports)).unwrap();
    (o["status"] == "failed").then(|| o["reason"].as_str().unwrap_or_default().to_string())
}

// Regression: ids were one namespace. `lock` with the id of a finished `unlock` was answered
// `success` without moving (the door stayed unlocked), the same id on another lock or from
// another origin returned the first command's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_names_one_command_of_one_origin() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "ids");
    let (world, port) = world_with_everything(2, &broker, |_| {});
    let _sim = world.sim();
    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;

    let first = cli(&world, "lock-1", Action::Unlock, "x").await;
    assert!(
        matches!(outcome(&first), Outcome::Success { .. }),
        "{first:?}"
    );
    // The same id for another action, or another lock: refused, nothing moves.
    let lock = cli(&world, "lock-1", Action::Lock, "x").await;
    assert_eq!(failure(&lock).as_deref(), Some("id-conflict"), "{lock:?}");
    let other_lock = cli(&world, "lock-2", Action::Unlock, "x").await;
    assert_eq!(
        failure(&other_lock).as_deref(),
        Some("id-conflict"),
        "{other_lock:?}"
    );
    assert_eq!(world.actuations().len(), 1);
    let state = world.locks().await;
    assert_eq!(
        state[0]["state"], "unlocked",
        "the door is where the client was told"
    );
    // A true repeat: the first outcome, marked, and no second actuation.
    let repeat = cli(&world, "lock-1", Action::Unlock, "x").await;
    assert!(repeat.iter().all(|r| r.repeated), "{repeat:?}");
    assert!(matches!(outcome(&repeat), Outcome::Success { .. }));
    assert_eq!(world.actuations().len(), 1);

    // Another origin's "x" is its own command: CoAP locks, then MQTT unlocks, both move.
    let coap = coap_post(port, "/locks/lock-1/lock", r#"{"request_id":"x"}"#);
    assert_eq!(coap["status"], "success", "{coap}");
    assert!(coap.get("repeated").is_none(), "{coap}");
    let set = format!("{ROOT}/locks/lock-1/set");
    let result = format!("{ROOT}/locks/lock-1/result");
    broker.publish(&set, r#"{"action":"unlock","id":"x"}"#, &[]);
    assert_eq!(watch.outcome(&result, "x")["status"], "success");
    assert_eq!(world.actuations().len(), 3);
    // CoAP's repeat is marked too, and its conflict refused with 4.09's reason.
    let again = coap_post(port, "/locks/lock-1/lock", r#"{"request_id":"x"}"#);
    assert_eq!(
        (again["status"].as_str(), again["repeated"].as_bool()),
        (Some("success"), Some(true)),
        "{again}"
    );
    let conflict = coap_post(port, "/locks/lock-1/unlock", r#"{"request_id":"x"}"#);
    assert_eq!(conflict["reason"], "id-conflict", "{conflict}");
    // MQTT's repeat is marked on the result topic.
    broker.publish(&set, r#"{"action":"unlock","id":"x"}"#, &[]);
    watch.wait("a repeated result", Duration::from_secs(15), |m| {
        m.topic == result && m.payload.contains("\"repeated\":true")
    });
    assert_eq!(world.actuations().len(), 3, "{:?}", world.actuations());
}

/// A tmpfs of `kib` KiB mounted over `dir` (its files copied in), unmounted when dropped.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, kib: usize) -> SmallDisk {
        let saved = dir.with_extension("saved");
        std::fs::rename(dir, &saved).unwrap();
        std::fs::create_dir(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount -t tmpfs failed: this test fills a small disk and needs root (run tests/run.sh as root)"
        );
        let copied = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", saved.display()))
            .arg(dir)
            .status()
            .unwrap();
        assert!(copied.success());
        SmallDisk {
            dir: dir.to_path_buf(),
        }
    }

    /// Fill every free byte: a filler file, then the slack of `store`'s last page (tmpfs
    /// allocates whole pages, so a short append would still fit) with empty lines, which the
    /// store skips.
    fn fill(&self, store: &Path) {
        use std::io::Write;
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=4k"])
            .arg(format!("of={}", self.dir.join("filler").display()))
            .stderr(std::process::Stdio::null())
            .status();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(store)
            .unwrap();
        while f.write_all(b"\n").and_then(|()| f.sync_data()).is_ok() {}
        let out = Command::new("df")
            .arg("--output=avail")
            .arg(&self.dir)
            .output()
            .unwrap();
        let avail = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            avail.split_whitespace().nth(1),
            Some("0"),
            "the disk is full: {avail}"
        );
    }

    fn free(&self) {
        std::fs::remove_file(self.dir.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

// Regression: with the disk full between `sent` and `done`, the outcome never reached the
// store and a repeat of the id in the same run actuated again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_lets_an_id_actuate_twice() {
    let world = World::new(1, |sim| {
        common::set_lock(sim, 0, "motor_time_ms", toml::Value::Integer(1500))
    });
    let state_dir = world.dir.join("state");
    let disk = SmallDisk::mount(&state_dir, 512);
    let _sim = world.sim();
    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;

    // Fill the disk once the command is durably `sent`, while the bolt is moving.
    let mut c = ControlClient::connect(&world.control()).await.unwrap();
    c.request(&Request::Command {
        lock: "lock-1".into(),
        action: Action::Unlock,
        mode: Mode::Normal,
        id: Some("full-1".into()),
        ttl_s: Some(30),
    })
    .await
    .unwrap();
    loop {
        let step = c.line().await.unwrap();
        if step["step"] == "sent" {
            break;
        }
        assert_eq!(step["step"], "accepted", "{step}");
    }
    let store = state_dir.join("commands.jsonl");
    disk.fill(&store);
    let done = c.line().await.unwrap();
    assert_eq!(done["outcome"]["status"], "success", "{done}");
    assert!(world.daemon_log().contains("could not record its outcome"));

    // The repeat gets that outcome and nothing moves again.
    let repeat = cli(&world, "lock-1", Action::Unlock, "full-1").await;
    assert!(
        matches!(outcome(&repeat), Outcome::Success { .. }),
        "{repeat:?}"
    );
    assert!(repeat.iter().all(|r| r.repeated), "{repeat:?}");
    assert_eq!(world.actuations().len(), 1);

    // A new actuating command cannot be recorded as sent: it is not sent. (The failed append
    // was cut back off, which gave the page's slack back: fill it again.)
    disk.fill(&store);
    let refused = cli(&world, "lock-1", Action::Lock, "full-2").await;
    assert_eq!(
        failure(&refused).as_deref(),
        Some("state-store"),
        "{refused:?}"
    );
    assert!(!refused.iter().any(|r| r.step == Step::Sent), "{refused:?}");
    assert_eq!(world.actuations().len(), 1);

    // With space again, commands work; the refused id keeps its one outcome.
    disk.free();
    let again = cli(&world, "lock-1", Action::Lock, "full-2").await;
    assert_eq!(failure(&again).as_deref(), Some("state-store"), "{again:?}");
    let fresh = cli(&world, "lock-1", Action::Lock, "full-3").await;
    assert!(
        matches!(outcome(&fresh), Outcome::Success { .. }),
        "{fresh:?}"
    );
    assert_eq!(world.actuations().len(), 2);
}

// Regression: invalid UTF-8 on one line stopped the reader, and compaction then rewrote the
// store without every later id: two re-actuations, no warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_id_store_keeps_every_good_id_and_says_which_line_it_skipped() {
    let world = World::new(1, |_| {});
    let _sim = world.sim();
    let mut daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    for (id, action) in [
        ("d-1", Action::Unlock),
        ("d-2", Action::Lock),
        ("d-3", Action::Unlock),
    ] {
        let r = cli(&world, "lock-1", action, id).await;
        assert!(matches!(outcome(&r), Outcome::Success { .. }), "{r:?}");
    }
    daemon.signal("-TERM");
    daemon.wait_exit(Duration::from_secs(20));
    drop(daemon);

    // Damage the line of d-1 with bytes that are not UTF-8.
    let store = world.dir.join("state/commands.jsonl");
    let text = std::fs::read(&store).unwrap();
    let at = text.windows(5).position(|w| w == b"\"d-1\"").unwrap();
    let mut damaged = text.clone();
    damaged[at + 1] = 0xFF;
    std::fs::write(&store, &damaged).unwrap();
    let line = damaged[..at].iter().filter(|b| **b == b'\n').count() + 1;

    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let log = world.daemon_log();
    assert!(
        log.contains(&format!("(line {line})")),
        "the warning names the line: {log}"
    );
    let aside: Vec<_> = std::fs::read_dir(world.dir.join("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("commands.jsonl.damaged-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept");
    assert_eq!(std::fs::read(aside[0].path()).unwrap(), damaged);
    // And GET /gateway says so.
    let ctl = Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args([
            "ctl",
            "--config",
            world.summary["coap"]["client_config"].as_str().unwrap(),
        ])
        .args(["--json", "gateway"])
        .output()
        .unwrap();
    let gateway: Value = serde_json::from_slice(&ctl.stdout).unwrap();
    assert_eq!(
        gateway["id_store"]["bad_lines"],
        serde_json::json!([line]),
        "{gateway}"
    );
    assert!(gateway["id_store"]["moved_aside"].is_string(), "{gateway}");
    for (id, action) in [("d-2", Action::Lock), ("d-3", Action::Unlock)] {
        let r = cli(&world, "lock-1", action, id).await;
        assert!(r.iter().all(|r| r.repeated), "{id} is remembered: {r:?}");
    }
    assert_eq!(world.actuations().len(), 3, "{:?}", world.actuations());
}

// Regression: `ttl_s` 2^64-1 overflowed `Instant + Duration`: the MQTT bridge panicked and
// stayed dead (offline, no commands) while the daemon ran on; the control socket overflowed
// the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_from_outside_are_bounded_and_every_front_end_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "ttl");
    let (world, _port) = world_with_everything(1, &broker, |_| {});
    let _sim = world.sim();
    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let set = format!("{ROOT}/locks/lock-1/set");
    let result = format!("{ROOT}/locks/lock-1/result");
    watch.wait("online", Duration::from_secs(15), |m| {
        m.topic == format!("{ROOT}/status") && m.payload == "online"
    });

    broker.publish(
        &set,
        r#"{"action":"lock","id":"t-1","ttl_s":18446744073709551615}"#,
        &[],
    );
    let refused = watch.outcome(&result, "t-1");
    assert_eq!(
        (refused["status"].as_str(), refused["reason"].as_str()),
        (Some("failed"), Some("bad-request")),
        "{refused}"
    );
    assert!(
        refused["detail"].as_str().unwrap().contains("ttl_s"),
        "{refused}"
    );
    // The bridge still takes commands.
    broker.publish(&set, r#"{"action":"unlock","id":"t-2","ttl_s":3600}"#, &[]);
    assert_eq!(watch.outcome(&result, "t-2")["status"], "success");

    // The control socket: the same ttl, and an id over 64 bytes.
    let r = world
        .command("lock-1", Action::Lock, Some("t-3"), Some(u64::MAX))
        .await;
    assert_eq!(failure(&r).as_deref(), Some("bad-request"), "{r:?}");
    let long = "i".repeat(65);
    let r = world
        .command("lock-1", Action::Lock, Some(&long), Some(30))
        .await;
    assert_eq!(failure(&r).as_deref(), Some("bad-request"), "{r:?}");
    let r = world
        .command("lock-1", Action::Lock, Some("t-4"), Some(30))
        .await;
    assert!(matches!(outcome(&r), Outcome::Success { .. }), "{r:?}");
    assert_eq!(world.actuations().len(), 2);
    assert!(
        !world.daemon_log().contains("panicked"),
        "{}",
        world.daemon_log()
    );
}

// A jammed unlock was reported `success` with the jammed state inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jammed_motion_is_failed_jammed_on_every_surface() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "jam");
    let (world, port) = world_with_everything(1, &broker, |sim| {
        common::set_lock(sim, 0, "jam_probability", toml::Value::Float(1.0))
    });
    let _sim = world.sim();
    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let check = |o: &Value| {
        assert_eq!(
            (o["status"].as_str(), o["reason"].as_str()),
            (Some("failed"), Some("jammed")),
            "{o}"
        );
        assert_eq!(o["state"]["jammed"], true, "{o}");
        assert_eq!(o["state"]["state"], "partially_unlocked", "{o}");
    };
    let r = cli(&world, "lock-1", Action::Unlock, "j-1").await;
    check(&serde_json::to_value(outcome(&r)).unwrap());
    check(&coap_post(
        port,
        "/locks/lock-1/lock",
        r#"{"request_id":"j-2"}"#,
    ));
    broker.publish(
        &format!("{ROOT}/locks/lock-1/set"),
        r#"{"action":"unlock","id":"j-3"}"#,
        &[],
    );
    check(&watch.outcome(&format!("{ROOT}/locks/lock-1/result"), "j-3"));
    assert_eq!(world.actuations().len(), 3);
}

/// `lockbridge check-config` on the world's daemon config, with a deadline: its exit code and
/// standard error.
fn check_config(world: &World) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args([
            "check-config",
            "--config",
            world.daemon_config().to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("check-config hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// Regression: a PSK file owned by another user was read like the service's own, and a key
// path that was a FIFO was opened — and waited on forever.
#[test]
fn secret_files_of_another_user_or_that_are_not_files_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let world = World::new(1, |_| {});
    let psk = world.dir.join("state/psk/demo.hex");
    assert_eq!(check_config(&world).0, Some(0));
    std::os::unix::fs::chown(&psk, Some(65534), None).unwrap();
    let (code, err) = check_config(&world);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("coap.clients[0].psk") && err.contains("owned by uid 65534"),
        "{err}"
    );
    assert!(err.contains("chown"), "the fix is named: {err}");
    std::os::unix::fs::chown(&psk, Some(0), None).unwrap();

    let key = world.dir.join("state/gateway.key");
    std::fs::rename(&key, world.dir.join("gateway.key.real")).unwrap();
    assert!(Command::new("mkfifo").arg(&key).status().unwrap().success());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, err) = check_config(&world);
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("a FIFO, not a regular file"), "{err}");
}

// Regression: a regular file at the control socket's path was silently deleted.
#[test]
fn a_file_at_the_control_socket_path_is_kept_and_named() {
    let world = World::new(1, |_| {});
    let _sim = world.sim();
    std::fs::write(world.control(), "an operator's notes\n").unwrap();
    let mut daemon = common::Proc(
        Command::new(env!("CARGO_BIN_EXE_lockbridge"))
            .args(["run", "--config", world.daemon_config().to_str().unwrap()])
            .stderr(std::fs::File::create(world.dir.join("daemon-refused.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    let log = std::fs::read_to_string(world.dir.join("daemon-refused.log")).unwrap();
    assert!(log.contains("exists and is not a socket"), "{log}");
    assert_eq!(
        std::fs::read_to_string(world.control()).unwrap(),
        "an operator's notes\n"
    );
}

// Regression: control socket lines had no length limit (a client could make the daemon read
// one line into memory for as long as it liked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_lines_are_length_limited() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let world = World::new(1, |_| {});
    let _sim = world.sim();
    let _daemon = world.daemon();
    let stream = tokio::net::UnixStream::connect(world.control())
        .await
        .unwrap();
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let mut long = format!(r#"{{"op":"state","lock":"{}"}}"#, "x".repeat(1 << 20));
    long.push('\n');
    wr.write_all(long.as_bytes()).await.unwrap();
    let answer = lines.next_line().await.unwrap().unwrap();
    assert!(answer.contains("at most 4096 bytes"), "{answer}");
    // The same connection goes on working.
    wr.write_all(b"{\"op\":\"locks\"}\n").await.unwrap();
    let answer = lines.next_line().await.unwrap().unwrap();
    assert!(answer.contains("lock-1"), "{answer}");
}

// `failed: busy` meant two things: the lock said it was busy (the command reached it) or the
// gateway's queue was full (it never left). A full queue is now `queue-full`, and such a
// command never actuates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_queue_full_and_never_reaches_the_lock() {
    let world = World::new(1, |sim| {
        common::set_lock(sim, 0, "motor_time_ms", toml::Value::Integer(1500))
    });
    world.edit_daemon_config(|t| format!("{t}\n[commands]\nqueue_depth = 1\n"));
    let _sim = world.sim();
    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(20))
        .await;
    let mut tasks = Vec::new();
    for n in 0..8 {
        let control = world.control();
        let action = if n % 2 == 0 {
            Action::Unlock
        } else {
            Action::Lock
        };
        tasks.push(tokio::spawn(async move {
            let mut c = ControlClient::connect(&control).await.unwrap();
            c.command(&Request::Command {
                lock: "lock-1".into(),
                action,
                mode: Mode::Normal,
                id: Some(format!("q-{n}")),
                ttl_s: Some(60),
            })
            .await
            .unwrap()
        }));
    }
    let mut full = 0;
    let mut reached = 0;
    for t in tasks {
        let reports = t.await.unwrap();
        match failure(&reports).as_deref() {
            Some("queue-full") => {
                full += 1;
                assert!(
                    !reports.iter().any(|r| matches!(r.step, Step::Sent)),
                    "a queue-full command was sent: {reports:?}"
                );
            }
            _ => reached += 1,
        }
    }
    assert!(
        full >= 1,
        "eight commands at once never filled a queue of one"
    );
    assert!(
        world.actuations().len() <= reached,
        "{} actuations for {reached} commands that left the gateway",
        world.actuations().len()
    );
}
