//! End to end through processes: `lockbridge sim init`, `keys init`, `authority issue` and
//! `sim --listen` run as a user would run them; a gateway client connects over the sim socket,
//! handshakes, reads state, unlocks, receives the notifications, and the lock's event log
//! shows exactly one actuation.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test and benchmark code: a failed unwrap is a failed run

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;

use common::driver::Driver;
use lockbridge::clock::now;
use lockbridge::link::Link;
use lockbridge::link::sim::SimLink;
use lockbridge::ptls::api::{LockState, notif, op, result};
use lockbridge::ptls::{Client, ClientConfig, ClientTiming};
use lockbridge::sim::wire::ListenAddr;

fn lockbridge(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args(args)
        .output()
        .expect("run lockbridge");
    assert!(
        out.status.success(),
        "lockbridge {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(path: &Path) {
    let t = std::time::Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "simulator did not create {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_process_serves_a_full_session_and_logs_one_actuation() {
    let dir = tempfile::tempdir().unwrap();
    let world = dir.path().join("world");
    let summary: Value =
        serde_json::from_str(&lockbridge(&["sim", "init", p(&world), "--locks", "2"])).unwrap();
    let lock = &summary["locks"][0];
    let serial = lock["serial"].as_str().unwrap().to_string();
    let device_id = lock["device_id"].as_u64().unwrap().to_string();
    let lock_public =
        lockbridge::keys::parse_public_b64(lock["public_key"].as_str().unwrap()).unwrap();
    let authority = PathBuf::from(summary["authority"].as_str().unwrap());
    assert_eq!(summary["locks"].as_array().unwrap().len(), 2);

    let key_path = dir.path().join("gateway.key");
    let gateway_public = lockbridge(&["keys", "init", "--out", p(&key_path)]);
    assert_eq!(lockbridge(&["keys", "show", p(&key_path)]), gateway_public);
    let cert_b64 = lockbridge(&[
        "authority",
        "issue",
        "--authority",
        p(&authority),
        "--device-id",
        &device_id,
        "--client-public-key",
        gateway_public.trim(),
        "--permissions",
        "lock,pull,read",
    ]);
    let certificate = B64.decode(cert_b64.trim()).unwrap();
    let signed: Value = serde_json::from_str(&lockbridge(&[
        "authority",
        "sign-time",
        "--authority",
        p(&authority),
        "--at",
        "1795219200000",
    ]))
    .unwrap();
    assert_eq!(
        B64.decode(signed["datetime"].as_str().unwrap()).unwrap(),
        1_795_219_200_000u64.to_be_bytes()
    );

    let socket = dir.path().join("sim.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args([
            "sim",
            "--config",
            summary["sim_config"].as_str().unwrap(),
            "--listen",
            &format!("unix:{}", p(&socket)),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start lockbridge sim");
    let mut sim = KillOnDrop(child);
    wait_for_socket(&socket);

    let addr = ListenAddr::Unix(socket.clone());
    let link = SimLink::connect(&addr, &serial, 247).await.unwrap();
    assert_eq!(link.att_mtu(), 247);
    let config = ClientConfig {
        signing_key: lockbridge::keys::load(&key_path).unwrap(),
        certificate,
        lock_public_key: lock_public,
        att_mtu: link.att_mtu(),
        timing: ClientTiming::default(),
    };
    let mut client = Client::new(config, Box::new(rand_core::OsRng)).unwrap();
    client.start(now(), lockbridge::clock::unix_ms());
    let mut driver = Driver::new(link, client);
    driver.handshake(|| None).await.expect("handshake");

    let state = driver.command(&[op::GET_STATE]).await.unwrap();
    assert_eq!(
        (state.result, state.data.clone()),
        (result::SUCCESS, vec![LockState::Locked.byte(), 0])
    );
    let unlock = driver.command(&[op::UNLOCK, 0]).await.unwrap();
    assert_eq!(unlock.result, result::SUCCESS);
    let mut states = Vec::new();
    while states.last() != Some(&LockState::Unlocked) {
        let (id, params) = driver.notification(Duration::from_secs(5)).await.unwrap();
        if id == notif::LOCK_STATUS_CHANGE {
            states.push(LockState::from_byte(params[0]));
        }
    }
    assert_eq!(states, vec![LockState::Unlocking, LockState::Unlocked]);
    driver.close().await;

    // A lock that is not in the world is refused with its reason.
    let err = SimLink::connect(&addr, "99999999-999999", 247)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("unknown lock"), "{err}");

    // SIGTERM stops the simulator cleanly.
    let pid = sim.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = sim.0.wait().unwrap();
    assert!(status.success(), "sim exited {status}");

    let log = std::fs::read_to_string(world.join("events.jsonl")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "exactly one actuation: {log}");
    assert_eq!(lines[0]["lock"], serial.as_str());
    assert_eq!(lines[0]["command"], "unlock");
    assert_eq!(lines[0]["result"], "success");
}

#[test]
fn sim_refuses_a_world_with_a_readable_lock_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let world = dir.path().join("w");
    let summary: Value = serde_json::from_str(&lockbridge(&["sim", "init", p(&world)])).unwrap();
    let serial = summary["locks"][0]["serial"].as_str().unwrap();
    let key = world.join("locks").join(format!("{serial}.key"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args([
            "sim",
            "--config",
            p(&world.join("sim.toml")),
            "--listen",
            "tcp:127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lock[0].key_file") && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn sim_init_refuses_to_overwrite_a_world() {
    let dir = tempfile::tempdir().unwrap();
    let world = dir.path().join("w");
    lockbridge(&["sim", "init", p(&world)]);
    let out = Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args(["sim", "init", p(&world)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a simulator world"));
}

/// Serve `world` in-process with `faults` on a unix socket; return the address and a stopper.
async fn serve_with_faults(
    dir: &Path,
    faults: lockbridge::fault::FaultConfig,
) -> (ListenAddr, Value, tokio::sync::oneshot::Sender<()>) {
    use lockbridge::sim::config::SimConfig;
    use lockbridge::sim::serve::{Listener, SimWorld, serve};
    let summary = lockbridge::sim::init(&dir.join("w"), 1).unwrap();
    let summary: Value = serde_json::to_value(&summary).unwrap();
    let (config, specs) =
        SimConfig::load(Path::new(summary["sim_config"].as_str().unwrap())).unwrap();
    let addr = ListenAddr::Unix(dir.join("sim.sock"));
    let listener = Listener::bind(&addr).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let world = SimWorld {
        locks: specs,
        faults,
        chaos: Default::default(),
        event_log: config.event_log,
        seed: 1,
    };
    tokio::spawn(serve(world, listener, async {
        let _ = stopped.await;
    }));
    (addr, summary, stop)
}

async fn client_for(
    addr: &ListenAddr,
    summary: &Value,
    dir: &Path,
) -> Result<(), common::driver::DriveError> {
    use lockbridge::authority::{Authority, IssueRequest};
    let authority = Authority::load(Path::new(summary["authority"].as_str().unwrap())).unwrap();
    let lock = &summary["locks"][0];
    let key = lockbridge::keys::generate(&dir.join(format!(
        "gw-{}.key",
        rand_core::RngCore::next_u32(&mut rand_core::OsRng)
    )))
    .unwrap();
    let certificate = authority.issue(&IssueRequest {
        device_id: u32::try_from(lock["device_id"].as_u64().unwrap()).unwrap(),
        client_public_key: *key.verifying_key(),
        client_id: None,
        days: 10,
        permissions: lockbridge::ptls::cert::PERM_ALL,
        now_ms: lockbridge::clock::unix_ms(),
    });
    let link = SimLink::connect(addr, lock["serial"].as_str().unwrap(), 247).await?;
    let config = ClientConfig {
        signing_key: key,
        certificate,
        lock_public_key: lockbridge::keys::parse_public_b64(lock["public_key"].as_str().unwrap())
            .unwrap(),
        att_mtu: link.att_mtu(),
        timing: ClientTiming::default(),
    };
    let mut client = Client::new(config, Box::new(rand_core::OsRng)).unwrap();
    client.start(now(), lockbridge::clock::unix_ms());
    let mut driver = Driver::new(link, client);
    driver.handshake(|| None).await?;
    let state = driver.command(&[op::GET_STATE]).await?;
    assert_eq!(state.result, result::SUCCESS);
    driver.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_socket_fault_injection_cuts_the_link_after_n_frames() {
    let dir = tempfile::tempdir().unwrap();
    let faults = lockbridge::fault::FaultConfig {
        disconnect_after_frames: Some(2),
        ..Default::default()
    };
    let (addr, summary, _stop) = serve_with_faults(dir.path(), faults).await;
    let err = client_for(&addr, &summary, dir.path()).await.unwrap_err();
    assert!(
        matches!(err, common::driver::DriveError::Disconnected(ref r) if r == "link fault"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_completes_over_a_lossy_duplicating_sim_socket() {
    let dir = tempfile::tempdir().unwrap();
    // Seeded: loss hits this session's frames, retransmission recovers on the real clock.
    let faults = lockbridge::fault::FaultConfig {
        loss: 0.15,
        duplicate: 0.1,
        jitter_ms: 5,
        seed: 3,
        ..Default::default()
    };
    let (addr, summary, _stop) = serve_with_faults(dir.path(), faults).await;
    let mut ok = 0;
    for _ in 0..3 {
        if client_for(&addr, &summary, dir.path()).await.is_ok() {
            ok += 1;
        }
    }
    assert!(ok >= 2, "{ok} of 3 sessions completed over the lossy link");
}

/// One raw request on the sim socket and the message that answers it, skipping nothing.
async fn ask(
    stream: &mut tokio::net::UnixStream,
    msg: lockbridge::sim::wire::SimMsg,
) -> (lockbridge::sim::wire::SimMsg, std::time::Instant) {
    use lockbridge::sim::wire::{read_msg, write_msg};
    write_msg(stream, &msg).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), read_msg(stream))
        .await
        .expect("an answer")
        .unwrap()
        .expect("not closed");
    (answer, std::time::Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_ble_model_opening_a_link_costs_its_connection_events() {
    use lockbridge::ptls::Channel;
    use lockbridge::sim::wire::SimMsg;
    let dir = tempfile::tempdir().unwrap();
    // 20 ms events; heard at once; the first event one interval after the request; MTU 1 pair,
    // discovery 2 pairs, each CCCD 1 pair.
    let faults = lockbridge::fault::FaultConfig {
        connection_interval_ms: 20,
        advertising_interval_ms: 0,
        connect_events: 1,
        mtu_exchange_round_trips: 1,
        discovery_round_trips: 2,
        cccd_round_trips: 1,
        ..Default::default()
    };
    let (addr, summary, _stop) = serve_with_faults(dir.path(), faults).await;
    let ListenAddr::Unix(path) = &addr else {
        unreachable!()
    };
    let serial = summary["locks"][0]["serial"].as_str().unwrap().to_string();
    let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
    let ms = Duration::from_millis;
    let t0 = std::time::Instant::now();
    let (answer, connected) = ask(
        &mut s,
        SimMsg::Connect {
            att_mtu: 247,
            serial,
        },
    )
    .await;
    assert_eq!(answer, SimMsg::Connected { att_mtu: 247 });
    // Set-up (1 event) and the MTU pair (answered an event later): never sooner.
    assert!(
        connected - t0 >= ms(40),
        "CONNECTED after {:?}",
        connected - t0
    );
    let (answer, discovered) = ask(&mut s, SimMsg::Discover).await;
    assert_eq!(answer, SimMsg::Discovered);
    // Two pairs, the first request at the next event: at least three intervals more.
    assert!(
        discovered - connected >= ms(60),
        "DISCOVERED {:?} after CONNECTED",
        discovered - connected
    );
    let (answer, subscribed) = ask(
        &mut s,
        SimMsg::Subscribe {
            channel: Channel::PtlsTx,
            on: true,
        },
    )
    .await;
    assert_eq!(
        answer,
        SimMsg::Subscribed {
            channel: Channel::PtlsTx
        }
    );
    assert!(
        subscribed - discovered >= ms(20),
        "SUBSCRIBED {:?} after DISCOVERED",
        subscribed - discovered
    );
}

/// A stand-in simulator that answers the link set-up and records what kinds it was sent.
async fn recording_sim(path: PathBuf) -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use lockbridge::sim::wire::{SimMsg, read_msg, write_msg};
    let kinds = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let seen = kinds.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok(Some(msg)) = read_msg(&mut s).await {
                    seen.lock().unwrap().push(msg.encode()[0]);
                    let answer = match msg {
                        SimMsg::Connect { att_mtu, .. } => SimMsg::Connected { att_mtu },
                        SimMsg::Discover => SimMsg::Discovered,
                        SimMsg::Subscribe { channel, .. } => SimMsg::Subscribed { channel },
                        _ => continue,
                    };
                    write_msg(&mut s, &answer).await.unwrap();
                }
            });
        }
    });
    kinds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sim_connector_discovers_a_lock_once_and_recalls_its_handles_after() {
    use lockbridge::link::Connector;
    use lockbridge::link::sim::SimConnector;
    use lockbridge::sim::wire::{CONNECT, DISCONNECT, DISCOVER, SUBSCRIBE};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim.sock");
    let kinds = recording_sim(path.clone()).await;
    let connector = SimConnector::new(ListenAddr::Unix(path));
    for _ in 0..2 {
        let mut link = connector.connect("10000000-000001", 247).await.unwrap();
        link.close().await;
    }
    // The stand-in records in arrival order; the second link's close may still be on its way.
    let t = std::time::Instant::now();
    while kinds
        .lock()
        .unwrap()
        .iter()
        .filter(|k| **k == DISCONNECT)
        .count()
        < 2
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{:?}",
            kinds.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let link = [CONNECT, SUBSCRIBE, SUBSCRIBE, SUBSCRIBE, DISCONNECT];
    let mut first = vec![CONNECT, DISCOVER];
    first.extend_from_slice(&link[1..]);
    let want: Vec<u8> = first.into_iter().chain(link).collect();
    assert_eq!(*kinds.lock().unwrap(), want);
}
