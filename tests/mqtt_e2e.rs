//! The MQTT bridge end to end: the real daemon and simulator, a real mosquitto started here on
//! a free loopback port, and mosquitto's own clients (`mosquitto_sub`, `mosquitto_pub`) as the
//! other side: state, availability, the last will, commands in every form with their results,
//! permissions, retained commands, duplicates, and a broker outage.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test code: a failed unwrap is a failed test; figures are printed

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::mqtt::{Broker, Msg, Watch};
use common::{Proc, World, free_tcp_port};

const ROOT: &str = "lockbridge/demo";

/// A world whose daemon bridges to `broker`; `mqtt` adds keys to `[mqtt]`.
fn bridged(locks: usize, broker: &Broker, mqtt: &str) -> World {
    bridged_with(locks, broker, mqtt, |_| {})
}

fn bridged_with(
    locks: usize,
    broker: &Broker,
    mqtt: &str,
    sim: impl FnOnce(&mut toml::Table),
) -> World {
    let world = World::new(locks, sim);
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
    // Availability goes out when it changes, not with every state update: an unlock changes
    // lock-1's state (several messages) but not its availability. (Counted around the unlock:
    // before it, how many states and availabilities went out depends on whether the bridge
    // came up before or after the lock's session.)
    let count = |topic: &str| watch.all().iter().filter(|m| m.topic == topic).count();
    let (state_topic, availability_topic) = (
        lock_topic("lock-1", "state"),
        lock_topic("lock-1", "availability"),
    );
    let (states_before, availability_before) = (count(&state_topic), count(&availability_topic));
    let control = world.control();
    common::lockbridge(&[
        "local",
        "--socket",
        control.to_str().unwrap(),
        "unlock",
        "lock-1",
    ]);
    watch.wait("lock-1 unlocked", Duration::from_secs(10), |m| {
        m.topic == state_topic && m.json()["state"] == "unlocked"
    });
    let (states, availability) = (count(&state_topic), count(&availability_topic));
    assert!(
        states > states_before && availability == availability_before,
        "states {states_before} → {states}, availability {availability_before} → {availability}"
    );
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
    let world = bridged(1, &broker, "response_prefixes = [\"client/\"]");
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
        m.topic == result && m.payload.contains("bad-request")
    });
    assert!(bad.payload.contains("unknown field"), "{}", bad.payload);

    // A retained command: denied at once and never executed — and not after a reconnect
    // either, when the broker hands it over again.
    broker.publish(&set, r#"{"action":"lock","id":"m-5"}"#, &["-r"]);
    let refused = watch.outcome(&result, "m-5");
    assert_eq!(refused["status"], "denied", "{refused}");
    assert!(refused["reason"].as_str().unwrap().contains("retained"));
    drop(_daemon);
    // While the gateway is away: a QoS 1 command nobody receives. With a clean session the
    // broker keeps nothing for the gateway, so it never runs.
    broker.publish(&set, r#"{"action":"lock","id":"m-6"}"#, &[]);
    let _daemon = world.daemon();
    let refusals = || {
        watch
            .all()
            .iter()
            .filter(|m| {
                m.topic == result
                    && m.json()["id"] == "m-5"
                    && m.json()["outcome"]["status"] == "denied"
                    && !m.retained
            })
            .count()
    };
    watch.wait(
        "a second refusal after the restart",
        Duration::from_secs(15),
        |_| refusals() == 2,
    );
    // A later command's result is out only after everything before it was read.
    broker.publish(&set, r#"{"action":"read","id":"m-7"}"#, &[]);
    watch.outcome(&result, "m-7");
    assert_eq!(refusals(), 2, "one refusal per delivery");
    broker.publish(&set, "", &["-r"]); // clear it
    assert_eq!(world.actuations().len(), 3, "{:?}", world.actuations());
    assert!(
        !watch
            .all()
            .iter()
            .any(|m| m.topic == result && m.payload.contains("\"m-6\"")),
        "the command sent while the gateway was away never ran"
    );
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
        world
            .succeed(lock, lockbridge::command::Action::Unlock)
            .await;
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

// Home Assistant's MQTT platforms: the configuration variables each accepts (full names), from
// its lock, sensor and binary_sensor schemas, and the device block's.
const COMMON_KEYS: &[&str] = &[
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "device",
    "enabled_by_default",
    "encoding",
    "entity_category",
    "entity_picture",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "name",
    "origin",
    "payload_available",
    "payload_not_available",
    "platform",
    "qos",
    "unique_id",
    "value_template",
];
const LOCK_KEYS: &[&str] = &[
    "code_format",
    "command_template",
    "command_topic",
    "optimistic",
    "payload_lock",
    "payload_open",
    "payload_reset",
    "payload_unlock",
    "retain",
    "state_jammed",
    "state_locked",
    "state_locking",
    "state_open",
    "state_opening",
    "state_topic",
    "state_unlocked",
    "state_unlocking",
];
const SENSOR_KEYS: &[&str] = &[
    "device_class",
    "expire_after",
    "force_update",
    "last_reset_value_template",
    "options",
    "state_class",
    "state_topic",
    "suggested_display_precision",
    "unit_of_measurement",
];
const BINARY_SENSOR_KEYS: &[&str] = &[
    "device_class",
    "expire_after",
    "force_update",
    "off_delay",
    "payload_off",
    "payload_on",
    "state_topic",
];
const DEVICE_KEYS: &[&str] = &[
    "configuration_url",
    "connections",
    "hw_version",
    "identifiers",
    "manufacturer",
    "model",
    "model_id",
    "name",
    "serial_number",
    "suggested_area",
    "sw_version",
    "via_device",
];

fn check_keys(topic: &str, doc: &Value, platform: &[&str]) {
    for key in doc.as_object().unwrap().keys() {
        assert!(
            COMMON_KEYS.contains(&key.as_str()) || platform.contains(&key.as_str()),
            "{topic}: {key} is not in Home Assistant's schema"
        );
    }
    for key in doc["device"].as_object().unwrap().keys() {
        assert!(DEVICE_KEYS.contains(&key.as_str()), "{topic}: device.{key}");
    }
    assert!(doc["unique_id"].as_str().is_some_and(|u| !u.is_empty()));
    for a in doc["availability"].as_array().into_iter().flatten() {
        assert!(a["topic"].as_str().is_some(), "{topic}: availability {a}");
    }
}

#[test]
fn home_assistant_discovery_matches_its_schemas_and_is_announced_again() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "discovery");
    let world = bridged_with(
        2,
        &broker,
        "allow = [\"lock\", \"unlock\", \"pull\"]",
        |sim| common::set_lock(sim, 0, "pull_spring", toml::Value::Boolean(true)),
    );
    // lock-1 has a pull spring, and the gateway is told so.
    world.edit_daemon_config(|t| {
        t.replacen(
            "id = \"lock-1\"\n",
            "id = \"lock-1\"\npull_spring = true\n",
            1,
        )
    });
    let _sim = world.sim();
    let _daemon = world.daemon();
    let lock_config = "homeassistant/lock/lockbridge_demo/lock-1/config";
    watch.wait("lock discovery", Duration::from_secs(10), |m| {
        m.topic == lock_config
    });
    let state = watch
        .wait("the lock's full state", Duration::from_secs(10), |m| {
            m.topic == lock_topic("lock-1", "state") && !m.json()["battery"].is_null()
        })
        .json();

    let docs: Vec<Msg> = watch
        .all()
        .into_iter()
        .filter(|m| m.topic.starts_with("homeassistant/"))
        .collect();
    let mut unique = std::collections::HashSet::new();
    let gateway = docs
        .iter()
        .find(|m| m.topic == "homeassistant/binary_sensor/lockbridge_demo/status/config")
        .expect("the gateway's device")
        .json();
    check_keys("gateway", &gateway, BINARY_SENSOR_KEYS);
    assert_eq!(gateway["state_topic"], format!("{ROOT}/status"));
    assert_eq!(gateway["device_class"], "connectivity");
    let gateway_id = gateway["device"]["identifiers"][0].clone();
    for m in &docs {
        assert!(m.retained, "{} is retained", m.topic);
        assert!(unique.insert(m.json()["unique_id"].to_string()) || m.topic == lock_config);
    }
    for lock in ["lock-1", "lock-2"] {
        let find = |kind: &str, object: &str| {
            let topic = format!("homeassistant/{kind}/lockbridge_demo/{object}/config");
            docs.iter()
                .find(|m| m.topic == topic)
                .unwrap_or_else(|| panic!("no {topic}"))
                .json()
        };
        let l = find("lock", lock);
        check_keys(lock, &l, LOCK_KEYS);
        assert_eq!(l["command_topic"], lock_topic(lock, "set"));
        assert_eq!(l["state_topic"], lock_topic(lock, "state"));
        assert_eq!(l["payload_lock"], "LOCK");
        assert_eq!(l["payload_unlock"], "UNLOCK");
        if lock == "lock-1" {
            assert_eq!(l["payload_open"], "OPEN", "a pull spring, and pull allowed");
        } else {
            assert!(
                l.get("payload_open").is_none(),
                "no pull spring, no Open: {l}"
            );
        }
        assert_eq!(l["origin"]["name"], "lockbridge");
        assert_eq!(l["availability_mode"], "all");
        let topics: Vec<&str> = l["availability"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["topic"].as_str().unwrap())
            .collect();
        assert_eq!(
            topics,
            [format!("{ROOT}/status"), lock_topic(lock, "availability")]
        );
        assert_eq!(l["device"]["via_device"], gateway_id);
        // Home Assistant 2024.1 refuses a whole discovery document whose device block has a
        // serial_number (checked with Home Assistant Core 2024.1.6): the serial is in the
        // state and the device's identifiers instead.
        assert!(l["device"].get("serial_number").is_none(), "{l}");
        assert!(state.as_object().unwrap().contains_key("serial"));
        assert_eq!(l["device"]["manufacturer"], "Tedee");
        for (object, class, unit, field) in [
            (format!("{lock}_battery"), "battery", "%", "battery"),
            (format!("{lock}_rssi"), "signal_strength", "dBm", "rssi"),
        ] {
            let s = find("sensor", &object);
            check_keys(&object, &s, SENSOR_KEYS);
            // Regression: `"name": null` named every sensor after the device ("lock-1",
            // sensor.lock_1_2), and a device block without its name made Home Assistant log
            // "MQTT device information always needs to include a name".
            assert!(
                s.get("name").is_none(),
                "{object}: named by its device class"
            );
            assert_eq!(s["device"], l["device"], "{object}: the whole device block");
            assert_eq!(s["device"]["name"], lock);
            assert_eq!(s["device_class"], class);
            assert_eq!(s["unit_of_measurement"], unit);
            assert_eq!(s["state_class"], "measurement");
            assert_eq!(s["state_topic"], lock_topic(lock, "state"));
            assert_eq!(s["value_template"], format!("{{{{ value_json.{field} }}}}"));
            assert!(
                state.as_object().unwrap().contains_key(field),
                "the state has {field}"
            );
        }
    }

    // Home Assistant restarted: its birth message brings every announcement again.
    let announced = |w: &Watch| w.all().iter().filter(|m| m.topic == lock_config).count();
    assert_eq!(announced(&watch), 1);
    broker.publish("homeassistant/status", "online", &[]);
    watch.wait("the re-announcement", Duration::from_secs(5), |_| {
        announced(&watch) == 2
    });

    // Home Assistant's Open, Unlock and Open again. Regression: Open was a pull, which a
    // locked lock refuses (`failed: error`); Unlock pulled the latch too.
    let result = lock_topic("lock-1", "result");
    let done = |action: &'static str| {
        let result = result.clone();
        move |m: &Msg| {
            m.topic == result && m.json()["step"] == "done" && m.json()["action"] == action
        }
    };
    let success = |m: Msg| assert_eq!(m.json()["outcome"]["status"], "success", "{}", m.payload);
    let set = lock_topic("lock-1", "set");
    // Locked: Open unlocks, and the lock pulls the latch on its way.
    broker.publish(&set, "OPEN", &[]);
    success(watch.wait("OPEN from locked", Duration::from_secs(15), done("unlock")));
    broker.publish(&set, "LOCK", &[]);
    success(watch.wait("LOCK", Duration::from_secs(15), done("lock")));
    broker.publish(&set, "UNLOCK", &[]);
    let unlocks = |w: &Watch| w.all().iter().filter(|m| done("unlock")(m)).count();
    watch.wait("UNLOCK", Duration::from_secs(15), |_| unlocks(&watch) == 2);
    // Unlocked: Open pulls.
    broker.publish(&set, "OPEN", &[]);
    success(watch.wait("OPEN from unlocked", Duration::from_secs(15), done("pull")));
    let acts: Vec<(String, u64)> = world
        .actuations()
        .iter()
        .map(|a| {
            (
                a["command"].as_str().unwrap().to_string(),
                a["mode"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64)> = [
        ("unlock", 0),
        ("lock", 0),
        ("unlock", 3),
        ("pull_spring", 0),
    ]
    .iter()
    .map(|(c, m)| (c.to_string(), *m))
    .collect();
    assert_eq!(
        acts, expected,
        "Open unlocks with the pull, Unlock without it"
    );
    // A lock without a pull spring has no Open to give.
    broker.publish(&lock_topic("lock-2", "set"), "OPEN", &[]);
    let refused = watch.wait("OPEN on lock-2", Duration::from_secs(15), |m| {
        m.topic == lock_topic("lock-2", "result") && m.json()["step"] == "done"
    });
    assert_eq!(
        refused.json()["outcome"]["reason"],
        "bad-request",
        "{}",
        refused.payload
    );
    assert_eq!(world.actuations().len(), 4);
}

#[test]
fn a_command_to_an_unreachable_lock_ends_and_never_fires_late() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "unreachable");
    let world = bridged(1, &broker, "");
    // No simulator yet: the lock cannot be reached.
    let _daemon = world.daemon();
    watch.wait("online", Duration::from_secs(10), |m| {
        m.topic == format!("{ROOT}/status") && m.payload == "online"
    });
    let set = lock_topic("lock-1", "set");
    let result = lock_topic("lock-1", "result");
    broker.publish(&set, r#"{"action":"unlock","id":"late-1","ttl_s":2}"#, &[]);
    let outcome = watch.outcome(&result, "late-1");
    let status = outcome["status"].as_str().unwrap();
    assert!(
        status == "expired" || (status == "failed" && outcome["reason"] == "unreachable"),
        "{outcome}"
    );
    // The lock comes back: the command must not run now.
    let _sim = world.sim();
    watch.wait("the lock connected", Duration::from_secs(15), |m| {
        m.topic == lock_topic("lock-1", "state") && m.json()["status"] == "connected"
    });
    // Once a later read of the lock is through, the session has nothing queued for it.
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(world.barrier("lock-1"));
    assert!(world.actuations().is_empty(), "{:?}", world.actuations());
    let reports = watch
        .all()
        .iter()
        .filter(|m| m.topic == result && m.json()["step"] == "done")
        .count();
    assert_eq!(reports, 1, "exactly one outcome");
}

#[test]
fn tls_and_mutual_tls_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let certs = common::gen_certs(&dir.path().join("certs"));
    let c = certs.display();
    let (tls, mutual) = (free_tcp_port(), free_tcp_port());
    // The broker runs as root here so that it can read the keys in the test's directory.
    let broker = Broker::start_with(
        dir.path(),
        &format!(
            "user root\n\
             listener {tls} 127.0.0.1\ncafile {c}/ca.pem\ncertfile {c}/broker.pem\nkeyfile {c}/broker.key\n\
             listener {mutual} 127.0.0.1\ncafile {c}/ca.pem\ncertfile {c}/broker.pem\nkeyfile {c}/broker.key\n\
             require_certificate true\n"
        ),
    );
    let watch = Watch::start(&broker, dir.path(), "tls");
    let online = |w: &Watch, root: &str| {
        let topic = format!("{root}/status");
        w.wait(&format!("{root} online"), Duration::from_secs(15), |m| {
            m.topic == topic && m.payload == "online"
        });
    };
    let run = |root: &str, port: u16, ca: &str, more: &str| {
        let world = World::new(1, |_| {});
        world.edit_daemon_config(|t| {
            format!(
                "{t}\n[mqtt]\nbroker = \"localhost:{port}\"\nroot = \"{root}\"\nclient_id = \"{root}\"\n\
                 tls = true\nca = \"{c}/{ca}\"\nreconnect_min_ms = 200\nreconnect_max_s = 1\n{more}\n"
            )
        });
        let sim = world.sim();
        let daemon = world.daemon();
        (world, sim, daemon)
    };

    // TLS: the broker's certificate checked against the test CA.
    let (_w1, _s1, _d1) = run("hub-tls", tls, "ca.pem", "");
    online(&watch, "hub-tls");
    // Mutual TLS with the client certificate.
    let (w2, _s2, _d2) = run(
        "hub-mtls",
        mutual,
        "ca.pem",
        &format!("client_certificate = \"{c}/client.pem\"\nclient_key = \"{c}/client.key\""),
    );
    online(&watch, "hub-mtls");
    broker.publish(
        "hub-mtls/locks/lock-1/set",
        r#"{"action":"unlock","id":"t-1"}"#,
        &[],
    );
    assert_eq!(
        watch.outcome("hub-mtls/locks/lock-1/result", "t-1")["status"],
        "success"
    );
    assert_eq!(w2.actuations().len(), 1);

    // Without a client certificate the mutual-TLS listener refuses, and the log says so.
    let (w3, _s3, _d3) = run("hub-nocert", mutual, "ca.pem", "");
    // A broker whose certificate the configured CA did not issue: refused by the gateway.
    let (w4, _s4, _d4) = run("hub-wrongca", tls, "pinned.pem", "");
    for w in [&w3, &w4] {
        common::wait_for(
            || w.daemon_log().contains("mqtt: cannot reach"),
            "the refused connection in the log",
        );
    }
    println!(
        "{}",
        w4.daemon_log()
            .lines()
            .find(|l| l.contains("cannot reach"))
            .unwrap()
    );
    for root in ["hub-nocert", "hub-wrongca"] {
        assert!(
            !watch
                .all()
                .iter()
                .any(|m| m.topic == format!("{root}/status")),
            "{root} must not connect"
        );
    }
}

#[test]
fn the_demo_runs_its_own_broker_or_points_at_one() {
    // `demo --once`: the whole scripted demo, with its embedded broker, then a clean exit.
    let dir = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args([
            "demo",
            "--once",
            "--locks",
            "2",
            "--connection-interval-ms",
            "0",
        ])
        .arg("--dir")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    assert!(run.status.success(), "{out}\n{err}");
    // The daemon reached the embedded broker (a failure is logged as a warning).
    assert!(!err.contains("mqtt:"), "{err}");
    assert!(
        out.contains("MQTT: the demo's own broker on 127.0.0.1:"),
        "{out}"
    );
    assert!(out.contains("mosquitto_sub -h 127.0.0.1 -p "), "{out}");
    assert!(out.contains("success, bolt unlocked"), "{out}");

    // `--setup-only --json --mqtt`: the daemon's config names the broker, the summary says so,
    // and a daemon run from it publishes there.
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "demo");
    let world_dir = dir.path().join("world");
    let out = common::lockbridge(&[
        "demo",
        "--setup-only",
        "--json",
        "--locks",
        "1",
        "--connection-interval-ms",
        "0",
        "--dir",
        world_dir.to_str().unwrap(),
        "--mqtt",
        &broker.addr(),
    ]);
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["mqtt"]["broker"], broker.addr());
    assert_eq!(summary["mqtt"]["root"], ROOT);
    let _sim = Proc(
        Command::new(env!("CARGO_BIN_EXE_lockbridge"))
            .args(["sim", "--config", summary["sim_config"].as_str().unwrap()])
            .args(["--listen", summary["sim_endpoint"].as_str().unwrap()])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _daemon = Proc(
        Command::new(env!("CARGO_BIN_EXE_lockbridge"))
            .args([
                "run",
                "--config",
                summary["daemon_config"].as_str().unwrap(),
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    watch.wait("the demo lock's state", Duration::from_secs(15), |m| {
        m.topic == lock_topic("lock-1", "state") && m.json()["state"] == "locked"
    });
    // Without --mqtt the summary has no broker (setup-only runs nothing).
    let plain = World::new(1, |_| {});
    assert!(plain.summary.get("mqtt").is_none(), "{}", plain.summary);
}

// Regression: an on-demand lock stayed available with its BLE side gone until a command to
// it failed. Between uses it is now listened for, and its availability follows.
#[test]
fn an_on_demand_lock_s_availability_follows_whether_it_is_on_the_air() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "presence");
    let world = bridged(2, &broker, "");
    // lock-2 is on demand; listen for it every second, and let its link go after 1 s.
    world.edit_daemon_config(|t| {
        let more = "presence_s = 1\nidle_disconnect_s = 1\n";
        t.replacen("id = \"lock-2\"\n", &format!("id = \"lock-2\"\n{more}"), 1)
    });
    let mut sim = world.sim();
    let _daemon = world.daemon();
    let availability = lock_topic("lock-2", "availability");
    let count = |payload: &str| {
        watch
            .all()
            .iter()
            .filter(|m| m.topic == availability && m.payload == payload)
            .count()
    };
    watch.wait("lock-2 online", Duration::from_secs(20), |_| {
        count("online") >= 1
    });
    // The lock's side goes away while lock-2 is idle.
    world.wait_status_blocking("lock-2", "idle", Duration::from_secs(30));
    drop(sim);
    watch.wait("lock-2 offline", Duration::from_secs(20), |_| {
        count("offline") >= 1
    });
    let state = watch
        .wait("lock-2's state says why", Duration::from_secs(5), |m| {
            m.topic == lock_topic("lock-2", "state") && m.json()["available"] == false
        })
        .json();
    assert!(
        state["last_error"]
            .as_str()
            .unwrap()
            .contains("not on the air"),
        "{state}"
    );
    // Back on the air: available again, without a command.
    sim = world.sim();
    watch.wait("lock-2 online again", Duration::from_secs(20), |_| {
        count("online") >= 2
    });
    drop(sim);
}

/// A lock with a door sensor, its door opened and closed and its button pressed by the
/// simulator's chaos schedule: the door, the trigger and the access id of the last change reach
/// the control socket, CoAP, the MQTT state and a Home Assistant door binary_sensor; the lock's
/// own record shows the button's actuations as the button's.
#[test]
fn door_state_and_the_trigger_of_a_change_reach_every_surface() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "door");
    let world = World::new(1, |sim| {
        common::set_lock(sim, 0, "door_sensor", toml::Value::Boolean(true));
        let chaos: toml::Table = toml::from_str(
            "mean_interval_ms = 400\nloss_burst = 0.0\ndisconnect = 0.0\nreboot = 0.0\n\
             lose_time = 0.0\ndoor = 1.0\nbutton = 1.0\nseed = 5\n",
        )
        .unwrap();
        sim.insert("chaos".into(), toml::Value::Table(chaos));
    });
    let port = world.serve_coap("");
    world.edit_daemon_config(|t| {
        format!(
            "{t}\n[mqtt]\nbroker = \"{}\"\nreconnect_min_ms = 200\nreconnect_max_s = 2\n",
            broker.addr()
        )
    });
    let _sim = world.sim();
    let _daemon = world.daemon();
    let state_topic = lock_topic("lock-1", "state");
    let by = |trigger: &'static str| {
        let topic = state_topic.clone();
        move |m: &Msg| m.topic == topic && m.json()["last_trigger"] == trigger
    };
    let door = watch
        .wait("a door change", Duration::from_secs(60), by("door-sensor"))
        .json();
    assert!(
        ["open", "closed"].contains(&door["door"].as_str().unwrap()),
        "{door}"
    );
    assert_eq!(door["last_access_id"], 0, "{door}");
    let button = watch
        .wait("a button press", Duration::from_secs(60), by("button"))
        .json();
    assert_eq!(button["last_access_id"], 0, "{button}");

    // Home Assistant learns of the door as soon as the lock shows it has a sensor.
    let config = watch
        .wait("the door's discovery", Duration::from_secs(10), |m| {
            m.topic == "homeassistant/binary_sensor/lockbridge_demo/lock-1_door/config"
        })
        .json();
    check_keys("door", &config, BINARY_SENSOR_KEYS);
    assert_eq!(config["device_class"], "door");
    assert_eq!(config["state_topic"], lock_topic("lock-1", "state"));
    assert_eq!(config["device"]["name"], "lock-1");
    let announced = watch
        .all()
        .iter()
        .filter(|m| m.topic.ends_with("lock-1_door/config"))
        .count();
    assert_eq!(announced, 1, "the door is announced once");

    // The control socket and CoAP carry the same fields.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let view = rt.block_on(world.locks())[0].clone();
    assert!(
        ["open", "closed"].contains(&view["door"].as_str().unwrap()),
        "{view}"
    );
    assert!(view["last_trigger"].is_string(), "{view}");
    let out = std::process::Command::new("coap-client-openssl")
        .args(["-B", "8", "-m", "get", "-u", "full", "-k", common::PSK])
        .arg(format!("coaps://127.0.0.1:{port}/locks/lock-1"))
        .output()
        .unwrap();
    let body: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert!(
        ["open", "closed"].contains(&body["door"].as_str().unwrap()),
        "{body}"
    );
    assert!(body["last_trigger"].is_string(), "{body}");

    // The lock's own record: the button's movements are the button's, none without a cause.
    let actuations = world.actuations();
    assert!(
        actuations.iter().any(|a| a["trigger"] == "button"),
        "{actuations:?}"
    );
    assert!(
        actuations.iter().all(|a| a["trigger"] == "button"),
        "{actuations:?}"
    );
}
