//! The MQTT bridge end to end: the real daemon and simulator, a real mosquitto started here on
//! a free loopback port, and mosquitto's own clients (`mosquitto_sub`, `mosquitto_pub`) as the
//! other side: state, availability, the last will, commands in every form with their results,
//! permissions, retained commands, duplicates, and a broker outage.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test code: a failed unwrap is a failed test; figures are printed

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{Proc, World};

/// A mosquitto broker on a free loopback port, without persistence.
struct Broker {
    port: u16,
    conf: std::path::PathBuf,
    proc: Option<Proc>,
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    fn start(dir: &std::path::Path) -> Broker {
        let port = free_tcp_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let mut b = Broker {
            port,
            conf,
            proc: None,
        };
        b.resume();
        b
    }

    /// Start (again) on the same port.
    fn resume(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("mosquitto: {e}; install mosquitto (tests/run.sh does)"));
        self.proc = Some(Proc(child));
        let port = self.port;
        common::wait_for(
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            "mosquitto",
        );
    }

    fn stop(&mut self) {
        self.proc = None;
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `mosquitto_pub` one message; `args` adds flags such as `-r` or MQTT 5 properties.
    fn publish(&self, topic: &str, payload: &str, args: &[&str]) {
        let status = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q", "1"])
            .args(["-t", topic, "-m", payload])
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_pub {topic}");
    }
}

/// A `mosquitto_sub` on `#` (MQTT 5, retain flags as published) writing
/// `retain|topic|correlation|payload` lines.
struct Watch {
    _proc: Proc,
    path: std::path::PathBuf,
}

#[derive(Debug, Clone)]
struct Msg {
    retained: bool,
    topic: String,
    correlation: String,
    payload: String,
}

impl Msg {
    fn json(&self) -> Value {
        serde_json::from_str(&self.payload)
            .unwrap_or_else(|e| panic!("{}: {e}: {}", self.topic, self.payload))
    }
}

impl Watch {
    fn start(broker: &Broker, dir: &std::path::Path, name: &str) -> Watch {
        let path = dir.join(format!("watch-{name}.txt"));
        let out = std::fs::File::create(&path).unwrap();
        let child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-V", "5"])
            .args(["-t", "#", "--retain-as-published", "-F", "%r|%t|%D|%p"])
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        Watch {
            _proc: Proc(child),
            path,
        }
    }

    fn all(&self) -> Vec<Msg> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(4, '|');
                Some(Msg {
                    retained: parts.next()? == "1",
                    topic: parts.next()?.to_string(),
                    correlation: parts.next()?.to_string(),
                    payload: parts.next()?.to_string(),
                })
            })
            .collect()
    }

    /// Wait for a message matching `f`; the messages so far in the panic message otherwise.
    fn wait(&self, what: &str, limit: Duration, f: impl Fn(&Msg) -> bool) -> Msg {
        let t = Instant::now();
        loop {
            if let Some(m) = self.all().into_iter().find(|m| f(m)) {
                return m;
            }
            if t.elapsed() > limit {
                let seen: Vec<String> = self
                    .all()
                    .iter()
                    .map(|m| format!("{} {}", m.topic, m.payload))
                    .collect();
                panic!("no {what} within {limit:?}; seen:\n{}", seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The terminal report of command `id` on `topic`.
    fn outcome(&self, topic: &str, id: &str) -> Value {
        self.wait(
            &format!("the outcome of {id}"),
            Duration::from_secs(15),
            |m| {
                m.topic == topic
                    && serde_json::from_str::<Value>(&m.payload)
                        .is_ok_and(|v| v["id"] == id && v["step"] == "done")
            },
        )
        .json()["outcome"]
            .clone()
    }
}

const ROOT: &str = "lockbridge/demo";

/// A world whose daemon bridges to `broker`; `mqtt` adds keys to `[mqtt]`.
fn bridged(locks: usize, broker: &Broker, mqtt: &str) -> World {
    let world = World::new(locks, |_| {});
    world.edit_daemon_config(|t| {
        format!(
            "{t}\n[mqtt]\nbroker = \"{}\"\nreconnect_min_ms = 200\nreconnect_max_s = 2\nmetrics_interval_s = 1\n{mqtt}\n",
            broker.addr()
        )
    });
    world
}

fn lock_topic(lock: &str, leaf: &str) -> String {
    format!("{ROOT}/locks/{lock}/{leaf}")
}

#[test]
fn state_availability_metrics_and_the_last_will() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "state");
    let world = bridged(2, &broker, "");
    let _sim = world.sim();
    let mut daemon = world.daemon();

    let status = format!("{ROOT}/status");
    watch.wait("online", Duration::from_secs(10), |m| {
        m.topic == status && m.payload == "online" && m.retained
    });
    for lock in ["lock-1", "lock-2"] {
        // Bolt, battery and session arrive one by one; the last state has them all.
        let state = watch.wait("a full lock state", Duration::from_secs(10), |m| {
            if m.topic != lock_topic(lock, "state") {
                return false;
            }
            let s = m.json();
            s["state"] == "locked"
                && !s["battery"].is_null()
                && !s["session"]["expires_at"].is_null()
        });
        let s = state.json();
        assert!(state.retained);
        assert_eq!(s["status"], "connected", "{s}");
        assert_eq!(s["available"], true);
        assert!(s["battery"].as_u64().is_some(), "{s}");
        assert!(s["session"]["expires_at"].as_u64().is_some(), "{s}");
        watch.wait("availability", Duration::from_secs(5), |m| {
            m.topic == lock_topic(lock, "availability") && m.payload == "online" && m.retained
        });
    }
    let metrics = watch.wait("metrics", Duration::from_secs(5), |m| {
        m.topic == format!("{ROOT}/metrics") && m.json()["handshakes"].as_u64() >= Some(2)
    });
    let metrics = metrics.json();
    assert_eq!(metrics["queue_depths"]["lock-1"], 0, "{metrics}");
    assert!(metrics["mqtt_reconnects"].is_u64(), "{metrics}");

    // A crash: the broker publishes the last will.
    daemon.signal("-9");
    daemon.wait_exit(Duration::from_secs(5));
    watch.wait("the last will", Duration::from_secs(10), |m| {
        m.topic == status && m.payload == "offline"
    });
}

#[test]
fn commands_in_every_form_get_one_outcome_each() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "commands");
    let world = bridged(1, &broker, "");
    let _sim = world.sim();
    let _daemon = world.daemon();
    let set = lock_topic("lock-1", "set");
    let result = lock_topic("lock-1", "result");
    watch.wait("the lock's state", Duration::from_secs(10), |m| {
        m.topic == lock_topic("lock-1", "state") && m.json()["state"] == "locked"
    });

    // JSON with an id: accepted, sent, success; the state follows.
    broker.publish(&set, r#"{"action":"unlock","id":"m-1","ttl_s":20}"#, &[]);
    let outcome = watch.outcome(&result, "m-1");
    assert_eq!(outcome["status"], "success", "{outcome}");
    let steps: Vec<String> = watch
        .all()
        .iter()
        .filter(|m| m.topic == result && m.json()["id"] == "m-1")
        .map(|m| m.json()["step"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(steps, ["accepted", "sent", "done"]);
    watch.wait("unlocked", Duration::from_secs(5), |m| {
        m.topic == lock_topic("lock-1", "state") && m.json()["state"] == "unlocked"
    });
    assert_eq!(world.actuations().len(), 1);

    // The same id again (a QoS 1 redelivery or a client retry): the first outcome, no actuation.
    broker.publish(&set, r#"{"action":"unlock","id":"m-1"}"#, &[]);
    watch.wait("the repeated outcome", Duration::from_secs(10), |m| {
        m.topic == result && m.json()["id"] == "m-1" && m.json()["repeated"] == true
    });
    assert_eq!(world.actuations().len(), 1);

    // Home Assistant's plain form.
    let before = watch.all().len();
    broker.publish(&set, "LOCK", &[]);
    let done = watch.wait("the LOCK outcome", Duration::from_secs(15), |m| {
        m.topic == result && m.json()["step"] == "done" && m.json()["action"] == "lock"
    });
    assert_eq!(
        done.json()["outcome"]["status"],
        "success",
        "{}",
        done.payload
    );
    assert!(watch.all().len() > before);
    assert_eq!(world.actuations().len(), 2);

    // MQTT 5 request/response: the reports also go to the response topic, with the
    // correlation data.
    broker.publish(
        &set,
        r#"{"action":"unlock","id":"m-2"}"#,
        &[
            "-V",
            "5",
            "-D",
            "publish",
            "response-topic",
            "client/replies",
            "-D",
            "publish",
            "correlation-data",
            "req-42",
        ],
    );
    let reply = watch.wait("the response", Duration::from_secs(15), |m| {
        m.topic == "client/replies" && m.json()["step"] == "done"
    });
    assert_eq!(reply.correlation, "req-42");
    assert_eq!(reply.json()["id"], "m-2");
    assert_eq!(reply.json()["outcome"]["status"], "success");
    assert_eq!(world.actuations().len(), 3);

    // Not allowed by default: pull (OPEN). Denied, nothing actuated.
    broker.publish(&set, r#"{"action":"pull","id":"m-3"}"#, &[]);
    assert_eq!(watch.outcome(&result, "m-3")["status"], "denied");
    // A bad payload: failed, saying why.
    broker.publish(&set, r#"{"action":"unlock","ttl":5,"id":"m-4"}"#, &[]);
    let bad = watch.wait("the bad command's outcome", Duration::from_secs(5), |m| {
        m.topic == result && m.payload.contains("invalid-command")
    });
    assert!(bad.payload.contains("unknown field"), "{}", bad.payload);

    // A retained command: denied at once and never executed — and not after a reconnect
    // either, when the broker hands it over again.
    broker.publish(&set, r#"{"action":"lock","id":"m-5"}"#, &["-r"]);
    let refused = watch.outcome(&result, "m-5");
    assert_eq!(refused["status"], "denied", "{refused}");
    assert!(refused["reason"].as_str().unwrap().contains("retained"));
    drop(_daemon);
    let _daemon = world.daemon();
    watch.wait(
        "a second refusal after the restart",
        Duration::from_secs(15),
        |m| {
            m.topic == result
                && m.json()["id"] == "m-5"
                && m.json()["outcome"]["status"] == "denied"
                && !m.retained
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        watch
            .all()
            .iter()
            .filter(|m| m.topic == result && m.json()["id"] == "m-5")
            .count(),
        2,
        "one refusal per delivery"
    );
    broker.publish(&set, "", &["-r"]); // clear it
    assert_eq!(world.actuations().len(), 3, "{:?}", world.actuations());
}

#[test]
fn a_lock_only_bridge_refuses_unlock() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "lock-only");
    let world = bridged(1, &broker, "allow = [\"lock\"]\nprotocol = \"3.1.1\"");
    let _sim = world.sim();
    let _daemon = world.daemon();
    watch.wait("the lock's state", Duration::from_secs(10), |m| {
        m.topic == lock_topic("lock-1", "state") && m.json()["state"] == "locked"
    });
    let set = lock_topic("lock-1", "set");
    let result = lock_topic("lock-1", "result");
    broker.publish(&set, r#"{"action":"unlock","id":"u-1"}"#, &[]);
    let outcome = watch.outcome(&result, "u-1");
    assert_eq!(outcome["status"], "denied", "{outcome}");
    broker.publish(&set, r#"{"action":"lock","id":"l-1"}"#, &[]);
    assert_eq!(watch.outcome(&result, "l-1")["status"], "success");
    let actions: Vec<Value> = world.actuations();
    assert_eq!(actions.len(), 1, "{actions:?}");
}

/// Read a process's CPU time (user + system) in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_no_state_and_replays_no_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let world = bridged(2, &broker, "");
    let _sim = world.sim();
    let daemon = world.daemon();
    {
        let watch = Watch::start(&broker, dir.path(), "before");
        for lock in ["lock-1", "lock-2"] {
            watch.wait("the lock's state", Duration::from_secs(10), |m| {
                m.topic == lock_topic(lock, "state") && m.json()["state"] == "locked"
            });
        }
    }
    broker.stop();
    let ticks_before = cpu_ticks(daemon.0.id());
    let t = Instant::now();
    // The locks change while the broker is away.
    for lock in ["lock-1", "lock-2"] {
        let reports = world
            .command(lock, lockbridge::command::Action::Unlock, None, Some(20))
            .await;
        assert!(matches!(
            common::outcome(&reports),
            lockbridge::command::Outcome::Success { .. }
        ));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let outage = t.elapsed();
    let ticks = cpu_ticks(daemon.0.id()) - ticks_before;
    let hz = 100.0; // USER_HZ on Linux
    let cpu = ticks as f64 / hz / outage.as_secs_f64();
    println!(
        "daemon CPU during a {outage:?} outage: {:.1} %",
        cpu * 100.0
    );
    assert!(
        cpu < 0.05,
        "{:.1} % CPU while the broker was away",
        cpu * 100.0
    );

    // A fresh broker (no persistence: every retained message is gone) on the same port.
    broker.resume();
    let t = Instant::now();
    let watch = Watch::start(&broker, dir.path(), "after");
    for lock in ["lock-1", "lock-2"] {
        let m = watch.wait("the current state", Duration::from_secs(10), |m| {
            m.topic == lock_topic(lock, "state") && m.json()["state"] == "unlocked"
        });
        assert!(m.retained || t.elapsed() < Duration::from_secs(10));
    }
    watch.wait("online again", Duration::from_secs(5), |m| {
        m.topic == format!("{ROOT}/status") && m.payload == "online"
    });
    println!("state current {:?} after the broker came back", t.elapsed());
    let log = world.daemon_log();
    assert!(
        log.contains("mqtt: cannot reach") || log.contains("mqtt: lost"),
        "{log}"
    );
    // Two unlocks through the control socket, nothing else.
    assert_eq!(world.actuations().len(), 2);
}
