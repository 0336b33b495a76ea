//! MQTT bridge benchmark (issue 6): a real mosquitto on loopback, the simulator and the daemon
//! in this process (zero-delay sim links), and an MQTT 5 client here as the other side.
//! `cargo bench --bench mqtt` prints a table and one `json:` line.
//!
//! - Lock state change → MQTT publish: from the moment the gateway's registry announces a
//!   changed lock to the moment the subscriber here holds the matching state message (target
//!   p99 ≤ 5 ms), and how many MQTT messages each state change costs.
//! - Command received on MQTT → lock command written: from the command's arrival at this
//!   process, subscribed to the same topic on the same broker as the gateway, to the gateway's
//!   `sent` step, emitted when the command id is on disk and the frame goes to the lock
//!   (target p99 ≤ 2 ms); and from publishing it here, broker hop included.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // benchmark code

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockbridge::command::Step;
use lockbridge::registry::GatewayEvent;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use support::{Proc, Rig, ms, percentile, runtime};

const COMMANDS: usize = 300;

fn mosquitto(dir: &std::path::Path) -> (Proc, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
        ),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto (apt-get install mosquitto; tests/run.sh does)");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "mosquitto did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc(child), port)
}

fn main() {
    runtime().block_on(run());
}

async fn run() {
    let tmp = tempfile::tempdir().unwrap();
    let (_broker, port) = mosquitto(tmp.path());
    let broker = format!("127.0.0.1:{port}");
    // Metrics off the hot path; Home Assistant discovery stays on, as shipped. The bolt's
    // travel is not what is measured here.
    let rig = Rig::new(
        0,
        Some(&broker),
        |t| t.replacen("[mqtt]\n", "[mqtt]\nmetrics_interval_s = 3600\n", 1),
        |locks| locks.iter_mut().for_each(|l| l.behaviour.motor_time_ms = 5),
    )
    .await;
    let daemon = rig.daemon.as_ref().unwrap();
    let registry = daemon.supervisor.registry().clone();
    let mut events = registry.subscribe();

    // The other side: subscribe to every state topic, stamp each message on arrival.
    let mut options = MqttOptions::new("bench", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let (tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>, Instant)>();
    tokio::spawn(async move {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = eventloop.poll().await {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                let _ = tx.send((topic, p.payload.to_vec(), Instant::now()));
            }
        }
    });
    client
        .subscribe("lockbridge/demo/locks/#", QoS::AtMostOnce)
        .await
        .unwrap();

    // Both locks up before anything is timed.
    let t = Instant::now();
    while !registry
        .all()
        .iter()
        .all(|v| v.state.is_some() && v.battery.is_some())
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "locks did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    while events.try_recv().is_ok() {}
    while arrivals.try_recv().is_ok() {}

    // Commands alternate unlock and lock on lock-1 (a persistent lock).
    let mut command_latency = Vec::new();
    let mut sent_at: Vec<(String, Instant)> = Vec::new();
    let mut changes: Vec<(serde_json::Value, Instant)> = Vec::new();
    for i in 0..COMMANDS {
        let action = if i % 2 == 0 { "unlock" } else { "lock" };
        let id = format!("bench-{i}");
        let payload = format!(r#"{{"action":"{action}","id":"{id}"}}"#);
        let t0 = Instant::now();
        client
            .publish(
                "lockbridge/demo/locks/lock-1/set",
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .expect("no gateway event within 10 s")
                .unwrap();
            let now = Instant::now();
            match ev {
                GatewayEvent::LockChanged { lock } => {
                    changes.push((lockbridge::mqtt::payload::state(&lock), now))
                }
                GatewayEvent::Command { report } if report.id == id => match report.step {
                    Step::Sent => {
                        command_latency.push(now - t0);
                        sent_at.push((id.clone(), now));
                    }
                    Step::Done { .. } => break,
                    Step::Accepted => {}
                },
                _ => {}
            }
        }
        // Let the bolt settle so the next command starts from rest.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(GatewayEvent::LockChanged { lock }) = events.try_recv() {
        changes.push((lockbridge::mqtt::payload::state(&lock), Instant::now()));
    }

    // The bridge publishes lock-1's changes in order, one state message each: pair the n-th
    // change with the n-th message and check that they carry the same document.
    let mut received: Vec<(String, Vec<u8>, Instant)> = Vec::new();
    while let Ok(a) = arrivals.try_recv() {
        received.push(a);
    }
    let state_topic = "lockbridge/demo/locks/lock-1/state";
    let messages: Vec<(serde_json::Value, Instant)> = received
        .iter()
        .filter(|(t, _, _)| t == state_topic)
        .map(|(_, p, at)| (serde_json::from_slice(p).unwrap(), *at))
        .collect();
    let lock1: Vec<&(serde_json::Value, Instant)> = changes
        .iter()
        .filter(|(doc, _)| messages.iter().any(|(m, _)| m == doc))
        .collect();
    assert_eq!(lock1.len(), messages.len(), "one state message per change");
    let mut publish_latency = Vec::new();
    let mut early = 0; // the message arrived before this task saw the change: counted as 0
    for ((doc, at), (message, arrived)) in lock1.iter().zip(&messages) {
        assert_eq!(doc, message, "changes and messages in the same order");
        if arrived < at {
            early += 1;
        }
        publish_latency.push(arrived.saturating_duration_since(*at));
    }
    let lock1_changes = lock1.len();
    // The command as the broker delivered it: this process subscribes to the same topics as
    // the gateway, so a command's arrival here stands for its arrival there.
    let mut received_to_sent: Vec<Duration> = sent_at
        .iter()
        .filter_map(|(id, sent)| {
            let needle = format!("\"{id}\"");
            received
                .iter()
                .find(|(t, p, _)| {
                    t.ends_with("/set") && String::from_utf8_lossy(p).contains(&needle)
                })
                .map(|(_, _, at)| sent.saturating_duration_since(*at))
        })
        .collect();
    received_to_sent.sort();
    let lock_messages = received
        .iter()
        .filter(|(t, _, _)| t.starts_with("lockbridge/demo/locks/lock-1/") && !t.ends_with("/set"))
        .filter(|(t, _, _)| !t.ends_with("/result"))
        .count();
    println!("(messages that arrived before the bench saw the change, counted as 0: {early})");
    publish_latency.sort();
    command_latency.sort();
    let per_change = lock_messages as f64 / lock1_changes.max(1) as f64;
    let (p50, p99) = (
        percentile(&publish_latency, 0.5),
        percentile(&publish_latency, 0.99),
    );
    let (c50, c99) = (
        percentile(&command_latency, 0.5),
        percentile(&command_latency, 0.99),
    );
    println!();
    println!("| figure | measured | target |");
    println!("|---|---|---|");
    println!(
        "| state change → state message at a subscriber, {} changes | p50 {:.2} ms, p99 {:.2} ms | p99 ≤ 5 ms |",
        publish_latency.len(),
        ms(p50),
        ms(p99)
    );
    println!("| MQTT messages per lock state change (state + availability) | {per_change:.2} | |");
    let (r50, r99) = (
        percentile(&received_to_sent, 0.5),
        percentile(&received_to_sent, 0.99),
    );
    println!(
        "| command received from the broker → `sent` step, {} commands | p50 {:.2} ms, p99 {:.2} ms | p99 ≤ 2 ms |",
        received_to_sent.len(),
        ms(r50),
        ms(r99)
    );
    println!(
        "| command published → `sent` step (broker hop included) | p50 {:.2} ms, p99 {:.2} ms | |",
        ms(c50),
        ms(c99)
    );
    let json = serde_json::json!({
        "state_publish_p50_ms": ms(p50),
        "state_publish_p99_ms": ms(p99),
        "state_changes": publish_latency.len(),
        "messages_per_state_change": per_change,
        "received_to_sent_p50_ms": ms(r50),
        "received_to_sent_p99_ms": ms(r99),
        "published_to_sent_p50_ms": ms(c50),
        "published_to_sent_p99_ms": ms(c99),
        "commands": command_latency.len(),
    });
    println!("json: {json}");
    rig.stop().await;
}
