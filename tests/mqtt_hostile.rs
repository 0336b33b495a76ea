//! The MQTT bridge against oversized, misdirected and repeated publishes, through a real
//! mosquitto: a large publish to a `set` topic, MQTT 5 response topics that point at the
//! gateway's own topics, and a flood of Home Assistant births.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test code

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::World;
use common::mqtt::{Broker, Watch};

const ROOT: &str = "lockbridge/demo";

fn bridged(broker: &Broker, mqtt: &str) -> World {
    let world = World::new(2, |_| {});
    world.edit_daemon_config(|t| {
        format!(
            "{t}\n[mqtt]\nbroker = \"{}\"\nreconnect_min_ms = 200\nreconnect_max_s = 2\nmetrics_interval_s = 1\n{mqtt}\n",
            broker.addr()
        )
    });
    world
}

fn topic(lock: &str, leaf: &str) -> String {
    format!("{ROOT}/locks/{lock}/{leaf}")
}

/// `mosquitto_pub -l`: every line of `lines` as one message, over one connection.
fn publish_lines(broker: &Broker, topic: &str, lines: &str, args: &[&str]) {
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1"])
        .args(["-t", topic, "-l"])
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "mosquitto_pub -l {topic}");
}

/// How many times the bridge connected to the broker, from its log.
fn connections(world: &World) -> usize {
    world.daemon_log().matches("mqtt: connected to").count()
}

// Regression: any publish over 10 KiB to a `set` topic dropped the broker connection
// (rumqttc's default maximum packet size), and a valid command 50 ms later was lost.
fn oversized(protocol: &str) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "big");
    let world = bridged(&broker, &format!("protocol = \"{protocol}\""));
    let _sim = world.sim();
    let _daemon = world.daemon();
    watch.wait("the lock's state", Duration::from_secs(15), |m| {
        m.topic == topic("lock-1", "state") && m.json()["state"] == "locked"
    });
    let big = format!(
        r#"{{"action":"unlock","id":"big","pad":"{}"}}"#,
        "x".repeat(20 * 1024)
    );
    // Both in one connection, one right after the other.
    publish_lines(
        &broker,
        &topic("lock-1", "set"),
        &format!("{big}\n{{\"action\":\"unlock\",\"id\":\"after\"}}\n"),
        &[],
    );
    let refused = watch.wait("the big command's refusal", Duration::from_secs(15), |m| {
        m.topic == topic("lock-1", "result") && m.payload.contains("bad-request")
    });
    assert!(
        refused.payload.contains("at most 1024 bytes"),
        "{}",
        refused.payload
    );
    assert_eq!(
        watch.outcome(&topic("lock-1", "result"), "after")["status"],
        "success"
    );
    assert_eq!(world.actuations().len(), 1);
    assert_eq!(connections(&world), 1, "the bridge kept its connection");
}

#[test]
fn an_oversized_command_is_refused_and_the_connection_kept_mqtt_5() {
    oversized("5");
}

#[test]
fn an_oversized_command_is_refused_and_the_connection_kept_mqtt_3_1_1() {
    oversized("3.1.1");
}

fn request_with_response_topic(broker: &Broker, lock: &str, id: &str, response: &str) {
    broker.publish(
        &topic(lock, "set"),
        &format!(r#"{{"action":"unlock","id":"{id}"}}"#),
        &["-V", "5", "-D", "publish", "response-topic", response],
    );
}

// Regression: the gateway published its reports to any MQTT 5 response topic: its own status,
// another lock's `set`, a discovery topic.
#[test]
fn response_topics_stay_in_the_gateway_s_space_or_allowed_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "responses");
    let world = bridged(&broker, "response_prefixes = [\"app/replies/\"]");
    let _sim = world.sim();
    let _daemon = world.daemon();
    watch.wait("online", Duration::from_secs(15), |m| {
        m.topic == format!("{ROOT}/status") && m.payload == "online"
    });
    for (n, misdirected) in [
        format!("{ROOT}/status"),
        topic("lock-2", "set"),
        "homeassistant/lock/lockbridge_demo/lock-2/config".to_string(),
        format!("{ROOT}/responses/#"),
    ]
    .iter()
    .enumerate()
    {
        let id = format!("bad-{n}");
        request_with_response_topic(&broker, "lock-1", &id, misdirected);
        let o = watch.outcome(&topic("lock-1", "result"), &id);
        assert_eq!(o["reason"], "bad-request", "{misdirected}: {o}");
        assert!(
            !watch
                .all()
                .iter()
                .any(|m| m.topic == *misdirected && m.payload.contains(&id)),
            "a report went to {misdirected}"
        );
    }
    assert!(world.actuations().is_empty(), "{:?}", world.actuations());
    // The gateway's own space and an allowed prefix get their replies.
    for (id, response) in [
        ("own", format!("{ROOT}/responses/app-1")),
        ("allowed", "app/replies/x".to_string()),
    ] {
        request_with_response_topic(&broker, "lock-1", id, &response);
        let reply = watch.wait("the response", Duration::from_secs(15), |m| {
            m.topic == response && m.json()["step"] == "done"
        });
        assert_eq!(reply.json()["id"], id);
    }
    assert_eq!(world.actuations().len(), 2);
    let status = watch
        .all()
        .into_iter()
        .filter(|m| m.topic == format!("{ROOT}/status"))
        .map(|m| m.payload)
        .collect::<Vec<_>>();
    assert!(status.iter().all(|p| p == "online"), "{status:?}");
}

// Regression: every `online` birth of Home Assistant republished everything: 100 births sent
// about 1,200 messages.
#[test]
fn a_flood_of_home_assistant_births_is_debounced() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "births");
    let world = bridged(&broker, "");
    let _sim = world.sim();
    let _daemon = world.daemon();
    let config = "homeassistant/lock/lockbridge_demo/lock-1/config";
    watch.wait("discovery", Duration::from_secs(15), |m| m.topic == config);
    let announced = || watch.all().iter().filter(|m| m.topic == config).count();
    let first = announced();
    publish_lines(
        &broker,
        "homeassistant/status",
        &"online\n".repeat(100),
        &[],
    );
    // A command after the births: once its result is out, every birth has been read.
    broker.publish(
        &topic("lock-1", "set"),
        r#"{"action":"unlock","id":"marker"}"#,
        &[],
    );
    watch.outcome(&topic("lock-1", "result"), "marker");
    let burst = announced() - first;
    assert!(burst <= 1, "{burst} announcements during the flood");
    // One more follows at the end of the interval, for births that came during it.
    watch.wait("the trailing announcement", Duration::from_secs(15), |_| {
        announced() == first + burst + 1
    });
    broker.publish(
        &topic("lock-1", "set"),
        r#"{"action":"lock","id":"marker-2"}"#,
        &[],
    );
    watch.outcome(&topic("lock-1", "result"), "marker-2");
    let total = announced() - first;
    println!("100 births: {total} announcements");
    assert!(total <= 2, "{total} announcements for 100 births");
}
