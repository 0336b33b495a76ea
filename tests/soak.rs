//! The soak: the whole gateway under every fault at once, for a bounded time.
//!
//! Sixteen simulated locks with the simulator's chaos schedule (loss bursts, disconnects,
//! reboots, lost clocks), DTLS clients that connect through a lossy UDP proxy, command and
//! leave, MQTT commands through a real mosquitto, while the test restarts the broker, the
//! simulator process (every lock reboots at once) and hits the DTLS path with loss bursts.
//! At the end, from the simulator's event log and the outcomes the clients saw:
//!
//! - every command has exactly one terminal outcome (asking again with its id gives the same);
//! - every actuation belongs to a distinct command that could have reached the lock, on the same
//!   lock with the same action, before that command's deadline; every command that succeeded
//!   has its actuation;
//! - the daemon's RSS grows less than 5 % from the first to the last quarter, its task count
//!   stays flat, and it ran the whole time as one process.
//!
//! `LOCKBRIDGE_SOAK_SECONDS` sets the length (default 90; CI runs the default).

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test code: a failed unwrap is a failed test; figures are printed

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde_json::Value;

use common::mqtt::{Broker, Watch};
use common::udp_proxy::{Faults, Proxy};
use common::{PSK, World};

const LOCKS: u64 = 16;
const DTLS_CLIENTS: u64 = 4;
/// The daemon's default time to live, which CoAP commands get.
const COAP_TTL_MS: u64 = 30_000;
/// Background loss on the DTLS path, and during a loss burst.
const DTLS_LOSS: f64 = 0.02;
const DTLS_BURST_LOSS: f64 = 0.5;
const ROOT: &str = "lockbridge/demo";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One command as its sender saw it.
#[derive(Clone, Debug)]
struct Issued {
    id: String,
    lock: String,
    action: &'static str,
    /// The last time it was sent (Unix ms): its deadline is this plus its time to live.
    last_sent_ms: u64,
    first_sent_ms: u64,
    ttl_ms: u64,
    /// Every terminal outcome seen for it (each answer to each time it was asked).
    outcomes: Vec<Value>,
}

type Ledger = Arc<Mutex<Vec<Issued>>>;

fn pick(rng: &mut ChaCha8Rng) -> (String, &'static str) {
    let lock = format!("lock-{}", 1 + rng.next_u64() % LOCKS);
    let action = if rng.next_u32() % 2 == 0 {
        "unlock"
    } else {
        "lock"
    };
    (lock, action)
}

// ---------------------------------------------------------------------------------------------
// The actors.

/// A DTLS client: connect (through the proxy), one to three commands, leave; again until `end`.
/// A command without an answer is asked again with the same id on a new session.
async fn dtls_client(n: u64, proxy: SocketAddr, end: Instant, ledger: Ledger) -> (u64, u64) {
    let credentials = lockbridge::ctl::Credentials::Psk {
        identity: "full".into(),
        key: zeroize::Zeroizing::new(PSK.as_bytes().to_vec()),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(100 + n);
    let (mut sessions, mut seq) = (0, 0);
    while Instant::now() < end {
        let Ok(mut client) = lockbridge::ctl::CoapClient::connect(proxy, &credentials).await else {
            continue;
        };
        sessions += 1;
        for _ in 0..1 + rng.next_u32() % 3 {
            seq += 1;
            let (lock, action) = pick(&mut rng);
            let id = format!("dtls-{n}-{seq}");
            let path = format!("/locks/{lock}/{action}");
            let body = format!(r#"{{"request_id":"{id}"}}"#);
            let index = {
                let mut l = ledger.lock().unwrap();
                let now = unix_ms();
                l.push(Issued {
                    id: id.clone(),
                    lock,
                    action,
                    last_sent_ms: now,
                    first_sent_ms: now,
                    ttl_ms: COAP_TTL_MS,
                    outcomes: Vec::new(),
                });
                l.len() - 1
            };
            let asked = Instant::now();
            loop {
                match client
                    .request(coap_lite::RequestType::Post, &path, body.as_bytes())
                    .await
                {
                    Ok((_, payload)) => {
                        let v: Value = serde_json::from_slice(&payload).unwrap();
                        assert_eq!(v["id"], id.as_str(), "{v}");
                        ledger.lock().unwrap()[index].outcomes.push(v);
                        break;
                    }
                    Err(_) => {
                        assert!(
                            asked.elapsed() < Duration::from_secs(120),
                            "{id}: no answer in two minutes"
                        );
                        // A new session, the same id.
                        client = loop {
                            if let Ok(c) =
                                lockbridge::ctl::CoapClient::connect(proxy, &credentials).await
                            {
                                break c;
                            }
                            assert!(
                                asked.elapsed() < Duration::from_secs(120),
                                "{id}: no DTLS session in two minutes"
                            );
                        };
                        sessions += 1;
                        ledger.lock().unwrap()[index].last_sent_ms = unix_ms();
                    }
                }
            }
        }
        client.close().await;
        tokio::time::sleep(Duration::from_millis(u64::from(rng.next_u32() % 1_500))).await;
    }
    (sessions, seq)
}

/// MQTT commands with ids and a time to live, published while the broker is up.
fn mqtt_commander(broker_port: u16, up: Arc<AtomicBool>, end: Instant, ledger: Ledger) {
    let mut rng = ChaCha8Rng::seed_from_u64(200);
    let mut seq = 0;
    while Instant::now() < end {
        if !up.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        seq += 1;
        let (lock, action) = pick(&mut rng);
        let id = format!("mqtt-{seq}");
        let ttl_s = 5 + u64::from(rng.next_u32() % 16);
        let now = unix_ms();
        publish_command(broker_port, &lock, action, &id, ttl_s);
        ledger.lock().unwrap().push(Issued {
            id,
            lock,
            action,
            last_sent_ms: now,
            first_sent_ms: now,
            ttl_ms: ttl_s * 1_000,
            outcomes: Vec::new(),
        });
        std::thread::sleep(Duration::from_millis(
            300 + u64::from(rng.next_u32() % 1_200),
        ));
    }
}

/// `mosquitto_pub` a command (QoS 1). Whether the broker took it does not matter here: a
/// command that never arrived is asked again at the end.
fn publish_command(port: u16, lock: &str, action: &str, id: &str, ttl_s: u64) {
    let _ = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", &format!("{ROOT}/locks/{lock}/set")])
        .args([
            "-m",
            &format!(r#"{{"action":"{action}","id":"{id}","ttl_s":{ttl_s}}}"#),
        ])
        .stderr(std::process::Stdio::null())
        .status();
}

/// Every terminal outcome on a result topic, by command id.
fn mqtt_outcomes(watch: &Watch) -> HashMap<String, Vec<Value>> {
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    for m in watch.all() {
        if !m.topic.ends_with("/result") {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&m.payload) else {
            continue;
        };
        if v["step"] == "done" {
            if let Some(id) = v["id"].as_str() {
                by_id
                    .entry(id.to_string())
                    .or_default()
                    .push(v["outcome"].clone());
            }
        }
    }
    by_id
}

/// The daemon's resident set and live tasks over time.
#[derive(Clone, Copy, Debug)]
struct Sample {
    rss_kib: u64,
    tasks: u64,
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `GET /gateway` straight to the daemon (not through the lossy proxy).
async fn gateway_status(addr: SocketAddr) -> Option<Value> {
    let credentials = lockbridge::ctl::Credentials::Psk {
        identity: "full".into(),
        key: zeroize::Zeroizing::new(PSK.as_bytes().to_vec()),
    };
    let mut c = lockbridge::ctl::CoapClient::connect(addr, &credentials)
        .await
        .ok()?;
    let answer = c
        .request(coap_lite::RequestType::Get, "/gateway", &[])
        .await;
    c.close().await;
    serde_json::from_slice(&answer.ok()?.1).ok()
}

/// Turn the simulator's chaos schedule on or off in its world file (read when it starts).
fn set_chaos(world: &World, on: bool) {
    let path = world.summary["sim_config"].as_str().unwrap();
    let mut sim: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
    if on {
        sim.insert(
            "chaos".into(),
            toml::toml! {
                mean_interval_ms = 1_500
                loss_burst_ms = 2_000
                reboot_ms = 1_500
                seed = 2026
            }
            .into(),
        );
    } else {
        sim.remove("chaos");
    }
    std::fs::write(path, toml::to_string(&sim).unwrap()).unwrap();
}

/// `/gateway` once the daemon is quiet — every lock reached, the persistent ones connected,
/// the on-demand ones idle, no DTLS peer but the query's own — with the fewest live tasks of
/// five readings a second apart.
async fn quiet_tasks(world: &World, addr: SocketAddr) -> Value {
    let t = Instant::now();
    loop {
        let locks = world.locks().await;
        let settled = locks.iter().all(|l| {
            let persistent = l["link"] == "persistent";
            !l["state"].is_null() && l["status"] == if persistent { "connected" } else { "idle" }
        });
        let peers = gateway_status(addr).await.unwrap()["dtls_peers"].as_u64();
        if settled && peers <= Some(1) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never quiet: {peers:?} DTLS peers, locks {locks:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut fewest: Option<Value> = None;
    for _ in 0..5 {
        let status = gateway_status(addr).await.unwrap();
        if fewest
            .as_ref()
            .is_none_or(|f| status["tasks"].as_u64() < f["tasks"].as_u64())
        {
            fewest = Some(status);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    fewest.unwrap()
}

fn mean(v: &[u64]) -> f64 {
    v.iter().sum::<u64>() as f64 / v.len().max(1) as f64
}

// ---------------------------------------------------------------------------------------------
// The checks.

/// Match every actuation to a distinct command that may have caused it; returns the
/// violations.
/// `serials[n - 1]` is the serial of lock-N (the order of `lockbridge sim init`).
fn match_actuations(
    issued: &[Issued],
    actuations: &[Value],
    serials: &[String],
    slack_ms: u64,
) -> Vec<String> {
    let serial_of = |lock: &str| {
        let n: usize = lock.strip_prefix("lock-").unwrap().parse().unwrap();
        &serials[n - 1]
    };
    let mut problems = Vec::new();
    // Only a command the gateway may have sent can have actuated.
    let may_have_reached = |c: &Issued| {
        let status = c.outcomes[0]["status"].as_str().unwrap_or_default();
        match status {
            "success" | "ambiguous" => true,
            // The gateway's own reasons for never sending it; anything else is the lock's
            // result.
            "failed" => !matches!(
                c.outcomes[0]["reason"].as_str().unwrap_or_default(),
                "unreachable"
                    | "queue-full"
                    | "shutting-down"
                    | "not-registered"
                    | "invalid-cert"
                    | "unknown-lock"
                    | "internal-error"
                    | "state-store-unwritable"
            ),
            _ => false,
        }
    };
    // The lock accepted these, so each must have exactly its one actuation.
    let must_have_reached = |c: &Issued| c.outcomes[0]["status"] == "success";
    let mut used = vec![false; issued.len()];
    let mut acts: Vec<&Value> = actuations.iter().collect();
    acts.sort_by_key(|a| a["t_ms"].as_u64());
    for a in acts {
        let (lock, command, t) = (
            a["lock"].as_str().unwrap(),
            a["command"].as_str().unwrap(),
            a["t_ms"].as_u64().unwrap(),
        );
        let candidates = issued.iter().enumerate().filter(|(i, c)| {
            !used[*i]
                && serial_of(&c.lock) == lock
                && c.action == command
                && !c.outcomes.is_empty()
                && may_have_reached(c)
                && c.first_sent_ms <= t + slack_ms
                && t <= c.last_sent_ms + c.ttl_ms + slack_ms
        });
        // Prefer a command that must have reached the lock, then the earliest deadline.
        let best =
            candidates.min_by_key(|(_, c)| (!must_have_reached(c), c.last_sent_ms + c.ttl_ms));
        match best {
            Some((i, _)) => used[i] = true,
            None => problems.push(format!("an actuation no command explains: {a}")),
        }
    }
    for (i, c) in issued.iter().enumerate() {
        if !c.outcomes.is_empty() && must_have_reached(c) && !used[i] {
            problems.push(format!(
                "{} ({} {}) succeeded but never actuated the lock: {}",
                c.id, c.action, c.lock, c.outcomes[0]
            ));
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_keeps_its_promises_under_every_fault_at_once() {
    let seconds: u64 = std::env::var("LOCKBRIDGE_SOAK_SECONDS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("LOCKBRIDGE_SOAK_SECONDS: a number of seconds")
        })
        .unwrap_or(90);
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "soak");
    let world = World::new(LOCKS as usize, |_| {});
    let serials: Vec<String> = world.summary["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["serial"].as_str().unwrap().to_string())
        .collect();
    // Peers whose close_notify was lost go after 10 s idle (default 300), so that the end
    // of the soak can see the daemon quiet again.
    let port = world.serve_coap("idle_timeout_s = 10");
    // Half the locks keep their link, the others connect on demand and drop it after 3 s;
    // twelve connection slots: the eight persistent links and four for the rest to share.
    world.edit_daemon_config(|t| {
        format!(
            "{}\n[mqtt]\nbroker = \"{}\"\nreconnect_min_ms = 200\nreconnect_max_s = 2\n",
            t.replace(
                "link = \"on-demand\"",
                "link = \"on-demand\"\nidle_disconnect_s = 3"
            )
            .replace("max_connections = 3", "max_connections = 12"),
            broker.addr()
        )
    });
    let direct = SocketAddr::from(([127, 0, 0, 1], port));
    let mut sim = world.sim();
    let mut daemon = world.daemon();
    let pid = daemon.0.id();
    // Quiet, before any fault: the daemon's live tasks to compare with the end.
    let quiet_before = quiet_tasks(&world, direct).await;
    // Now the chaos schedule: the simulator restarts with it.
    set_chaos(&world, true);
    sim.signal("-9");
    sim.wait_exit(Duration::from_secs(5));
    sim = world.sim();
    let proxy = Proxy::start(
        direct,
        Faults {
            loss: DTLS_LOSS,
            duplicate: 0.02,
            reorder: 0.05,
            seed: 2026,
            drop_if: None,
        },
    )
    .await;
    proxy.stop_recording();

    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let ledger: Ledger = Arc::default();
    let broker_up = Arc::new(AtomicBool::new(true));

    let clients: Vec<_> = (1..=DTLS_CLIENTS)
        .map(|n| tokio::spawn(dtls_client(n, proxy.addr, end, ledger.clone())))
        .collect();
    let commander = {
        let (up, ledger, port) = (broker_up.clone(), ledger.clone(), broker.port);
        tokio::task::spawn_blocking(move || mqtt_commander(port, up, end, ledger))
    };
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let sampler = {
        let samples = samples.clone();
        tokio::spawn(async move {
            while Instant::now() < end {
                let status = gateway_status(direct).await;
                let tasks = status
                    .as_ref()
                    .and_then(|s| s["tasks"].as_u64())
                    .unwrap_or(0);
                samples.lock().unwrap().push(Sample {
                    rss_kib: rss_kib(pid),
                    tasks,
                });
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    // The test's own faults in turn, one every 6–12 s.
    let mut rng = ChaCha8Rng::seed_from_u64(300);
    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    for turn in 0.. {
        let gap = Duration::from_millis(6_000 + rng.next_u64() % 6_000);
        if Instant::now() + gap >= end {
            break;
        }
        tokio::time::sleep(gap).await;
        let down = Duration::from_millis(500 + rng.next_u64() % 2_500);
        let fault = match turn % 3 {
            0 => {
                broker_up.store(false, Ordering::SeqCst);
                broker.stop();
                tokio::time::sleep(down).await;
                broker.resume();
                broker_up.store(true, Ordering::SeqCst);
                "broker restart"
            }
            1 => {
                proxy.set_loss(DTLS_BURST_LOSS);
                tokio::time::sleep(down * 2).await;
                proxy.set_loss(DTLS_LOSS);
                "DTLS loss burst"
            }
            _ => {
                sim.signal("-9");
                sim.wait_exit(Duration::from_secs(5));
                tokio::time::sleep(down).await;
                sim = world.sim();
                "simulator killed and restarted"
            }
        };
        *faults.entry(fault).or_default() += 1;
        assert!(
            daemon.0.try_wait().unwrap().is_none(),
            "the daemon exited after a {fault}"
        );
    }

    // Settle: the clients finish their last commands; MQTT commands without an outcome are
    // asked again with the same id until each has one.
    let mut sessions = 0;
    for c in clients {
        sessions += c.await.unwrap().0;
    }
    commander.await.unwrap();
    sampler.await.unwrap();
    let settle = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let seen = mqtt_outcomes(&watch);
        let mut l = ledger.lock().unwrap();
        let missing: Vec<&mut Issued> = l
            .iter_mut()
            .filter(|c| c.id.starts_with("mqtt-") && !seen.contains_key(&c.id))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            settle.elapsed() < Duration::from_secs(90),
            "no MQTT outcome for {:?}",
            missing.iter().map(|c| &c.id).collect::<Vec<_>>()
        );
        // Only ask again once its time to live has surely run out, so a first copy still on
        // its way and a second one cannot both be new.
        let now = unix_ms();
        for c in missing {
            if now > c.last_sent_ms + c.ttl_ms + 5_000 {
                c.last_sent_ms = now;
                publish_command(broker.port, &c.lock, c.action, &c.id, c.ttl_ms / 1_000);
            }
        }
    }
    // Quiet again: the simulator without chaos, every client gone.
    set_chaos(&world, false);
    sim.signal("-9");
    sim.wait_exit(Duration::from_secs(5));
    sim = world.sim();
    let quiet_after = quiet_tasks(&world, direct).await;
    let seen = mqtt_outcomes(&watch);
    let mut issued = ledger.lock().unwrap().clone();
    for c in issued.iter_mut().filter(|c| c.id.starts_with("mqtt-")) {
        c.outcomes = seen[&c.id].clone();
    }

    // Every command: exactly one terminal outcome, however often it was asked or seen.
    let mut problems = Vec::new();
    let mut by_status: BTreeMap<String, u32> = BTreeMap::new();
    for c in &issued {
        if c.outcomes.is_empty() {
            problems.push(format!("{}: no outcome", c.id));
            continue;
        }
        let first = strip_id(&c.outcomes[0]);
        if c.outcomes.iter().any(|o| strip_id(o) != first) {
            problems.push(format!("{}: different outcomes {:?}", c.id, c.outcomes));
        }
        *by_status
            .entry(first["status"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    // Every actuation: one command, the right lock and action, within its deadline.
    let actuations = world.actuations();
    problems.extend(match_actuations(&issued, &actuations, &serials, 1_000));

    // The daemon: one process all along, memory and tasks flat.
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon exited: {}",
        world.daemon_log()
    );
    let log = world.daemon_log();
    let samples = samples.lock().unwrap().clone();
    let quarter = samples.len() / 4;
    let (first, last) = (&samples[..quarter], &samples[samples.len() - quarter..]);
    let rss = |s: &[Sample]| mean(&s.iter().map(|s| s.rss_kib).collect::<Vec<_>>());
    let tasks = |s: &[Sample]| {
        mean(
            &s.iter()
                .map(|s| s.tasks)
                .filter(|t| *t > 0)
                .collect::<Vec<_>>(),
        )
    };
    let rss_growth = rss(last) / rss(first) - 1.0;
    let (tasks_before, tasks_after) = (
        quiet_before["tasks"].as_u64().unwrap(),
        quiet_after["tasks"].as_u64().unwrap(),
    );
    let chaos = world.sim_log();
    let chaos_count = |name: &str| {
        chaos
            .lines()
            .filter(|l| l.contains("sim: chaos: ") && l.ends_with(name))
            .count()
    };
    println!(
        "soak {seconds} s: {} commands ({} over DTLS in {sessions} sessions, {} over MQTT), outcomes {by_status:?}; \
         {} actuations; lock faults: {} loss bursts, {} disconnects, {} reboots, {} lost clocks; \
         test faults {faults:?}; RSS {:.0} → {:.0} KiB ({:+.1} %), tasks under load {:.0} → {:.0}, quiet {tasks_before} → {tasks_after} \
         ({} → {} DTLS peers), {} samples",
        issued.len(),
        issued.iter().filter(|c| c.id.starts_with("dtls-")).count(),
        issued.iter().filter(|c| c.id.starts_with("mqtt-")).count(),
        actuations.len(),
        chaos_count("loss-burst"),
        chaos_count("disconnect"),
        chaos_count("reboot"),
        chaos_count("lose-time"),
        rss(first),
        rss(last),
        rss_growth * 100.0,
        tasks(first),
        tasks(last),
        quiet_before["dtls_peers"],
        quiet_after["dtls_peers"],
        samples.len(),
    );
    assert!(
        problems.is_empty(),
        "{} violations:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(rss_growth < 0.05, "RSS grew {:.1} %", rss_growth * 100.0);
    // Under load the task count follows the clients and commands in flight; quiet, it must be
    // back where it started.
    assert!(
        tasks_after <= tasks_before,
        "tasks {tasks_before} → {tasks_after} with the daemon quiet: {quiet_after}"
    );
    assert_eq!(log.matches(" up: gateway ").count(), 1, "started once");
    // The faults really happened, and the commands really ran.
    for fault in ["loss-burst", "disconnect", "reboot", "lose-time"] {
        assert!(chaos_count(fault) > 0, "no {fault} in {seconds} s");
    }
    assert!(by_status.get("success").copied().unwrap_or(0) >= issued.len() as u32 / 4);
    assert!(faults.len() == 3 || seconds < 40, "{faults:?}");
    daemon.signal("-TERM");
    daemon.wait_exit(Duration::from_secs(20));
    drop(sim);
}

/// An outcome without the fields that name the command or the time it was reported.
fn strip_id(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        for k in ["id", "step", "at", "ts", "t_ms"] {
            o.remove(k);
        }
    }
    v
}

/// The checker itself: each broken promise is caught.
#[test]
fn the_checks_catch_double_late_and_unexplained_actuations() {
    let serials = ["S1".to_string(), "S2".to_string()];
    let command = |id: &str, lock: &str, action, sent, status: &str| Issued {
        id: id.into(),
        lock: lock.into(),
        action,
        first_sent_ms: sent,
        last_sent_ms: sent,
        ttl_ms: 10_000,
        outcomes: vec![serde_json::json!({ "status": status })],
    };
    let act = |lock: &str, command: &str, t: u64| serde_json::json!({ "lock": lock, "command": command, "t_ms": t });
    let issued = vec![
        command("a", "lock-1", "unlock", 1_000, "success"),
        command("b", "lock-2", "lock", 1_000, "ambiguous"),
        command("c", "lock-1", "lock", 1_000, "expired"),
    ];
    // All well: a's one actuation; b may or may not have fired.
    assert!(match_actuations(&issued, &[act("S1", "unlock", 1_050)], &serials, 0).is_empty());
    assert!(
        match_actuations(
            &issued,
            &[act("S1", "unlock", 1_050), act("S2", "lock", 1_100)],
            &serials,
            0
        )
        .is_empty()
    );
    let broken = [
        // Twice.
        vec![act("S1", "unlock", 1_050), act("S1", "unlock", 1_060)],
        // After its deadline.
        vec![act("S1", "unlock", 11_001)],
        // Before it was sent.
        vec![act("S1", "unlock", 999)],
        // The wrong lock or action.
        vec![act("S2", "unlock", 1_050)],
        // An expired command fired.
        vec![act("S1", "unlock", 1_050), act("S1", "lock", 1_070)],
        // A success that never reached the lock.
        vec![],
    ];
    for acts in broken {
        assert!(
            !match_actuations(&issued, &acts, &serials, 0).is_empty(),
            "{acts:?}"
        );
    }
}
