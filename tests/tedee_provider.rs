//! The daemon with `provider = "tedee"` against the test double of Tedee's cloud
//! (tests/tedee_fake.py), which signs certificates and signed time with the simulator world's
//! authority so that real sessions come up against `lockbridge sim` (tedee-cloud.md Part A §7):
//! the first run's exact requests, none on a restart, refresh near half-life, ALERT 0x05 with
//! exactly one forced fetch, a certificate the lock keeps refusing parked with E-17, one
//! signed time for a lock without time, access to one lock revoked (E-14), and the key never
//! in a log, a state file or the status.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use lockbridge::command::Action;

use common::mqtt::{Broker, Watch};
use common::tedee::{ALL_SCOPES, Fake, KEY, demo_locks, state_dir, tedee, world_for};
use common::{Proc, World, wait_for};

/// The fake's account holding the world's locks, with their real keys, signed by the world's
/// authority; the daemon switched to the tedee provider. `edit` changes the account.
fn tedee_world(
    dir: &std::path::Path,
    sim: impl FnOnce(&mut toml::Table),
    account: impl FnOnce(&mut Value),
) -> (Fake, World) {
    let fake = Fake::start(dir, false, json!([]), ALL_SCOPES);
    let world = world_for_sim(&fake, sim);
    let authority =
        PathBuf::from(world.summary["authority"].as_str().unwrap()).join("authority.key");
    let locks: Vec<Value> = world.summary["locks"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, l)| {
            json!({
                "id": l["device_id"], "serialNumber": l["serial"], "name": format!("Door {}", i + 1),
                "type": 4, "accessLevel": 2, "devicePublicKey": l["public_key"],
            })
        })
        .collect();
    fake.edit(|v| {
        v["locks"] = Value::Array(locks);
        v["authority_key"] = json!(authority.to_str().unwrap());
        account(v);
    });
    // The tedee provider: no authority, and lock-2 with neither device_id nor public_key (looked
    // up and fetched); lock-1 keeps both (the id checked against the account, the key pinned).
    world.edit_daemon_config(|t| {
        let start = t.find("[credentials]\n").unwrap();
        let end = start + t[start..].find("\n\n").unwrap();
        let mut t = format!(
            "{}[credentials]\nprovider = \"tedee\"{}",
            &t[..start],
            &t[end..]
        );
        let l2 = t.find("id = \"lock-2\"").unwrap();
        let block_end = l2 + t[l2..].find("link = ").unwrap();
        let block: String = t[l2..block_end]
            .lines()
            .filter(|l| !l.starts_with("device_id") && !l.starts_with("public_key"))
            .map(|l| format!("{l}\n"))
            .collect();
        t.replace_range(l2..block_end, &block);
        t
    });
    (fake, world)
}

fn world_for_sim(fake: &Fake, sim: impl FnOnce(&mut toml::Table)) -> World {
    // world_for makes the world, the key file and [credentials.tedee]; the sim edit is applied
    // to its sim.toml afterwards.
    let world = world_for(fake, false);
    let path = PathBuf::from(world.summary["sim_config"].as_str().unwrap());
    let mut table: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    sim(&mut table);
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
    world
}

/// The lock a certificate request asked for (the query's deviceId, a number in a string).
fn device_of(request: &Value) -> Option<u64> {
    request["query"]["deviceid"].as_str()?.parse().ok()
}

fn certificate_calls(fake: &Fake) -> Vec<Value> {
    fake.requests()
        .into_iter()
        .filter(|r| r["path"] == "my/devicecertificate/getformobile")
        .collect()
}

/// The times (the fake's clock, s) of each certificate request for this lock.
fn certificate_times(fake: &Fake, device: u64) -> Vec<f64> {
    certificate_calls(fake)
        .iter()
        .filter(|r| device_of(r) == Some(device))
        .map(|r| r["t"].as_f64().unwrap())
        .collect()
}

/// Poll `ok` until it holds, or fail naming `what` after `limit`.
async fn until(limit: Duration, what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let t = Instant::now();
    while !ok().await {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The gateway's status from the control socket (`lockbridge local gateway --json`).
async fn gateway(world: &World) -> Value {
    let mut c = lockbridge::control::ControlClient::connect(&world.control())
        .await
        .unwrap();
    c.request(&lockbridge::control::Request::Gateway)
        .await
        .unwrap();
    c.line().await.unwrap()
}

fn output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn no_key_anywhere(world: &World, extra: &[String]) {
    let secret = KEY.split_once('.').unwrap().1;
    let mut texts = vec![world.daemon_log(), world.sim_log()];
    texts.extend_from_slice(extra);
    for dir in [
        state_dir(world).join("tedee"),
        state_dir(world).join("tedee/locks"),
    ] {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                texts.push(std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    for t in texts {
        assert!(!t.contains(secret), "the key appeared: {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_run_registers_and_fetches_exactly_once_and_a_restart_asks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, world) = tedee_world(dir.path(), |_| {}, |_| {});
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "tedee");
    world.edit_daemon_config(|t| format!("{t}\n[mqtt]\nbroker = \"{}\"\n", broker.addr()));
    let _sim = world.sim();
    let daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(60))
        .await;
    world.succeed("lock-1", Action::Unlock).await;
    world.succeed("lock-2", Action::Unlock).await;

    // Exactly: one listing, one registration, one certificate per lock, in lock order.
    let calls = fake.calls();
    assert_eq!(
        calls.iter().map(|c| c.1.as_str()).collect::<Vec<_>>(),
        [
            "my/lock",
            "my/mobile",
            "my/devicecertificate/getformobile",
            "my/devicecertificate/getformobile"
        ],
        "{calls:?}"
    );
    let requests = fake.requests();
    let mobile = requests[1]["registered"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let ids: Vec<u64> = demo_locks(&world).iter().map(|l| l.0).collect();
    for (i, r) in requests[2..].iter().enumerate() {
        assert_eq!(r["query"]["mobileid"], mobile.as_str());
        assert_eq!(r["query"]["deviceid"], ids[i].to_string());
    }
    // The state, private and without the key; the lock's view shows its certificate.
    let locks = world.locks().await;
    let creds = &locks.iter().find(|v| v["id"] == "lock-2").unwrap()["credentials"];
    assert_eq!(creds["provider"], "tedee", "{creds}");
    assert!(creds["cert_expires"].as_u64().unwrap() > lockbridge::clock::unix_ms());
    assert!(creds["cert_refresh_at"].as_u64().unwrap() < creds["cert_expires"].as_u64().unwrap());
    let record = state_dir(&world).join(format!(
        "tedee/locks/{}.json",
        world.summary["locks"][1]["serial"].as_str().unwrap()
    ));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&record).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // MQTT: the certificate in the lock's state, and a timestamp sensor for Home Assistant.
    let state = watch
        .wait(
            "lock-2's certificate in its state",
            Duration::from_secs(20),
            |m| {
                m.topic == "lockbridge/demo/locks/lock-2/state"
                    && m.json()["credentials"]["cert_expires"].is_u64()
            },
        )
        .json();
    let sensor = watch
        .wait("the certificate sensor", Duration::from_secs(20), |m| {
            m.topic == "homeassistant/sensor/lockbridge_demo/lock-2_certificate/config"
        })
        .json();
    assert_eq!(sensor["device_class"], "timestamp", "{sensor}");
    assert_eq!(sensor["name"], "Certificate expires");
    let mqtt_texts: Vec<String> = watch.all().iter().map(|m| m.payload.clone()).collect();
    let mut everything = vec![serde_json::to_string(&locks).unwrap(), state.to_string()];
    everything.extend(mqtt_texts);
    no_key_anywhere(&world, &everything);

    // A restart with valid cached certificates makes no request.
    drop(daemon);
    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(60))
        .await;
    world.succeed("lock-1", Action::Lock).await;
    world.succeed("lock-2", Action::Lock).await;
    assert_eq!(fake.calls().len(), 4, "{:?}", fake.calls());
    assert_eq!(world.actuations().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_costs_one_forced_fetch_and_one_the_lock_keeps_refusing_is_parked() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, world) = tedee_world(dir.path(), |_| {}, |_| {});
    let ids: Vec<u64> = demo_locks(&world).iter().map(|l| l.0).collect();
    // lock-1's first certificate is already expired (Tedee's date says it is not); lock-2's
    // are always for another lock.
    fake.edit(|v| {
        v["stale_once"] = json!([ids[0]]);
        v["wrong_device"] = json!([ids[1]]);
    });
    let _sim = world.sim();
    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(60))
        .await;
    world.succeed("lock-1", Action::Unlock).await;
    let for_lock = |id: u64| {
        certificate_calls(&fake)
            .iter()
            .filter(|r| device_of(r) == Some(id))
            .count()
    };
    assert_eq!(
        for_lock(ids[0]),
        2,
        "one fetch, then exactly one forced fetch"
    );

    // lock-2: refused, one forced fetch, refused again: parked with E-17, no loop.
    world
        .command("lock-2", Action::Unlock, None, Some(30))
        .await;
    world
        .wait_status("lock-2", "invalid-cert", Duration::from_secs(60))
        .await;
    let view = world
        .locks()
        .await
        .into_iter()
        .find(|v| v["id"] == "lock-2")
        .unwrap();
    assert!(
        view["last_error"]
            .as_str()
            .unwrap()
            .contains("refuses a certificate Tedee issued seconds ago"),
        "{view}"
    );
    assert_eq!(for_lock(ids[1]), 2, "{:?}", certificate_calls(&fake));
    assert!(
        world
            .actuations()
            .iter()
            .all(|a| a["lock"] != world.summary["locks"][1]["serial"])
    );
    assert!(
        view["last_error"]
            .as_str()
            .unwrap()
            .contains("`lockbridge tedee fetch lock-2` retries"),
        "{view}"
    );

    // The account is put right; `tedee fetch lock-2` fetches once and the parked lock comes up.
    fake.edit(|v| v["wrong_device"] = json!([]));
    let out = tedee(&world, &["fetch", "lock-2"]);
    assert!(out.status.success(), "{}", output(&out));
    assert!(
        output(&out).contains("lock-2: certificate fetched"),
        "{}",
        output(&out)
    );
    assert_eq!(for_lock(ids[1]), 3, "{:?}", certificate_calls(&fake));
    assert_eq!(for_lock(ids[0]), 2, "only the lock asked for");
    world.succeed("lock-2", Action::Unlock).await;
    // An unknown lock is refused by name, with the configured ones.
    let out = tedee(&world, &["fetch", "back-door"]);
    assert!(!out.status.success());
    assert!(
        output(&out).contains("unknown lock \"back-door\"; configured: lock-1, lock-2"),
        "{}",
        output(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_without_trusted_time_gets_one_fresh_signed_time() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, world) = tedee_world(
        dir.path(),
        |sim| common::set_lock(sim, 0, "trusted_time", toml::Value::Boolean(false)),
        |_| {},
    );
    let _sim = world.sim();
    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(60))
        .await;
    world.succeed("lock-1", Action::Unlock).await;
    let signed = fake
        .calls()
        .iter()
        .filter(|c| c.1 == "datetime/getsignedtime")
        .count();
    assert_eq!(signed, 1, "{:?}", fake.calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_refreshed_near_half_life_and_the_old_one_serves_while_refresh_fails() {
    let dir = tempfile::tempdir().unwrap();
    // 20 s certificates: a refresh about 10 s after each fetch.
    let (fake, world) = tedee_world(dir.path(), |_| {}, |v| v["validity_s"] = json!(20));
    let broker = Broker::start(dir.path());
    let watch = Watch::start(&broker, dir.path(), "events");
    world.edit_daemon_config(|t| format!("{t}\n[mqtt]\nbroker = \"{}\"\n", broker.addr()));
    let _sim = world.sim();
    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(60))
        .await;
    let lock1 = world.summary["locks"][0]["device_id"]
        .as_u64()
        .unwrap()
        .to_string();
    let fetched = || -> Vec<f64> {
        certificate_calls(&fake)
            .iter()
            .filter(|r| r["query"]["deviceid"] == lock1)
            .map(|r| r["t"].as_f64().unwrap())
            .collect()
    };
    wait_for(|| fetched().len() >= 2, "a refresh of lock-1's certificate");
    let t = fetched();
    let gap = t[1] - t[0];
    // Half of 20 s, ±5 %, plus the time the call takes.
    assert!(
        (9.4..=12.0).contains(&gap),
        "refreshed {gap:.1} s after the fetch"
    );
    // The next refresh fails (500): the current certificate keeps serving.
    fake.fault(json!([{"path": "getformobile", "device": lock1, "status": 500, "body": "empty"}]));
    wait_for(
        || fake.requests().iter().any(|r| r["status"] == 500),
        "the failed refresh",
    );
    world.succeed("lock-1", Action::Unlock).await;
    let log = world.daemon_log();
    assert!(
        log.contains("Tedee cloud unreachable (HTTP 500, an empty answer)"),
        "{log}"
    );
    assert!(
        log.contains("Locks keep working with their current certificates until"),
        "{log}"
    );
    // Each renewal is an event; a certificate within a day of expiry that cannot be renewed is
    // a warning (E-22) in the log and as an event, with the hours left and the cloud's error.
    let lock_1_event = |event: &'static str| {
        move |m: &common::mqtt::Msg| {
            m.topic == "lockbridge/demo/events"
                && m.json()["event"] == event
                && m.json()["lock"] == "lock-1"
        }
    };
    watch.wait(
        "a certificate-renewed event",
        Duration::from_secs(20),
        lock_1_event("certificate-renewed"),
    );
    let warning = watch
        .wait(
            "a certificate-expiring event",
            Duration::from_secs(20),
            lock_1_event("certificate-expiring"),
        )
        .json();
    assert_eq!(warning["hours_left"], 0, "{warning}");
    assert!(
        warning["error"]
            .as_str()
            .unwrap()
            .contains("Tedee cloud unreachable (HTTP 500"),
        "{warning}"
    );
    assert!(
        world
            .daemon_log()
            .contains("Lock `lock-1`'s certificate expires in 0 h and cannot be renewed: Tedee cloud unreachable (HTTP 500"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_removed_from_one_lock_is_that_lock_s_problem_only() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, world) = tedee_world(dir.path(), |_| {}, |_| {});
    let lock2 = world.summary["locks"][1]["device_id"].as_u64().unwrap();
    fake.edit(|v| v["revoked"] = json!([lock2]));
    let _sim = world.sim();
    let _daemon: Proc = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(60))
        .await;
    world.succeed("lock-1", Action::Unlock).await;
    let t = Instant::now();
    loop {
        let view = world
            .locks()
            .await
            .into_iter()
            .find(|v| v["id"] == "lock-2")
            .unwrap();
        let err = view["credentials"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if err.contains("no longer has access to lock `lock-2`") {
            assert!(err.contains("lockbridge retries hourly"), "{err}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no E-14 for lock-2: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One refused call, not a loop.
    let calls = certificate_calls(&fake)
        .iter()
        .filter(|r| device_of(r) == Some(lock2))
        .count();
    assert_eq!(calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_holds_every_call_until_its_retry_after_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, world) = tedee_world(dir.path(), |_| {}, |_| {});
    fake.fault(json!([{"path": "my/lock", "status": 429, "body": "json", "retry_after": 4}]));
    let _sim = world.sim();
    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(60))
        .await;
    let requests = fake.requests();
    assert_eq!(requests[0]["status"], 429, "{requests:?}");
    let first = requests[0]["t"].as_f64().unwrap();
    let next = requests[1]["t"].as_f64().unwrap();
    assert!(
        next - first >= 4.0,
        "a request {:.2} s after a 429 with Retry-After: 4",
        next - first
    );
    // Then the first run's sequence, once.
    let paths: Vec<&str> = requests[1..]
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "my/lock",
            "my/mobile",
            "my/devicecertificate/getformobile",
            "my/devicecertificate/getformobile"
        ]
    );
    assert!(
        world
            .daemon_log()
            .contains("Tedee's rate limit for this account is reached"),
        "E-07 logged"
    );
}

/// Each lock's first certificate request fails as `fault`s say; the next comes no sooner than
/// the backoff allows (30 s, −20 %), once, and then the session comes up.
async fn one_failure_per_lock_backs_off(faults: [Value; 2], timeout_s: u64, message: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (fake, world) = tedee_world(dir.path(), |_| {}, |_| {});
    world.edit_daemon_config(|t| {
        t.replace(
            "[credentials.tedee]\n",
            &format!("[credentials.tedee]\nrequest_timeout_s = {timeout_s}\n"),
        )
    });
    let ids: Vec<u64> = demo_locks(&world).iter().map(|l| l.0).collect();
    let mut list = Vec::new();
    for (fault, id) in faults.into_iter().zip(&ids) {
        let mut f = fault;
        f["path"] = json!("getformobile");
        f["device"] = json!(id);
        list.push(f);
    }
    fake.fault(Value::Array(list));
    let _sim = world.sim();
    let _daemon = world.daemon();
    for lock in ["lock-1", "lock-2"] {
        world
            .wait_status(lock, "connected", Duration::from_secs(120))
            .await;
    }
    for id in &ids {
        let t = certificate_times(&fake, *id);
        assert_eq!(t.len(), 2, "one failure, one retry: {t:?}");
        assert!(
            t[1] - t[0] >= 24.0,
            "retried {:.1} s after the failure",
            t[1] - t[0]
        );
    }
    world.succeed("lock-1", Action::Unlock).await;
    world.succeed("lock-2", Action::Unlock).await;
    let log = world.daemon_log();
    for m in message {
        assert!(log.contains(m), "{m:?} not in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_and_an_html_502_back_off_without_a_burst() {
    one_failure_per_lock_backs_off(
        [
            json!({"status": 500, "body": "json"}),
            json!({"status": 502, "body": "html"}),
        ],
        30,
        &[
            "Tedee cloud unreachable (HTTP 500",
            "Tedee cloud unreachable (HTTP 502",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_and_a_slow_answer_back_off_without_a_burst() {
    one_failure_per_lock_backs_off(
        [json!({"drop": true}), json!({"delay_s": 6})],
        2,
        &["Tedee cloud unreachable ("],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_stops_every_call_until_the_file_holds_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, world) = tedee_world(dir.path(), |_| {}, |_| {});
    // The file holds a key Tedee does not know.
    let pak = state_dir(&world).join("tedee.pak");
    let revoked = "oldkey.UmV2b2tlZEtleVJldm9rZWRLZXlSZXZva2Vk";
    std::fs::write(&pak, format!("{revoked}\n")).unwrap();
    let _sim = world.sim();
    let _daemon = world.daemon();
    until(
        Duration::from_secs(30),
        "E-03 in the gateway status",
        async || {
            gateway(&world).await["tedee"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("Tedee refused the personal access key `oldkey…`"))
        },
    )
    .await;
    let status = gateway(&world).await;
    let e = status["tedee"]["last_error"].as_str().unwrap();
    assert!(e.contains("lockbridge picks it up within a minute"), "{e}");
    assert!(!e.contains("UmV2b2tl"), "the key's secret part shown: {e}");
    // Longer than the key file's re-check period: nothing more goes to Tedee.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(fake.calls().len(), 1, "{:?}", fake.calls());
    let view = &world.locks().await[0];
    assert!(view["status"] != "connected", "{view}");

    // The operator replaces the key: calls resume and the locks come up.
    std::fs::write(&pak, format!("{KEY}\n")).unwrap();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(60))
        .await;
    world.succeed("lock-2", Action::Unlock).await;
    assert!(world.daemon_log().contains("holds a new key"));
    let status = gateway(&world).await;
    assert!(status["tedee"]["last_error"].is_null(), "{status}");
    // Neither key's secret part in the logs, the state files or the status.
    assert!(
        !world
            .daemon_log()
            .contains("UmV2b2tlZEtleVJldm9rZWRLZXlSZXZva2Vk")
    );
    no_key_anywhere(&world, &[status.to_string(), e.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_removed_at_tedee_is_reported_and_not_undone() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, world) = tedee_world(dir.path(), |_| {}, |_| {});
    let _sim = world.sim();
    let daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(60))
        .await;
    // The owner removes the hub in the Tedee app; the next fetch finds out.
    fake.edit(|v| v["forget_mobiles"] = json!(true));
    let out = tedee(&world, &["fetch", "--json"]);
    assert!(!out.status.success());
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = answer["locks"][0]["error"].as_str().unwrap().to_string();
    assert!(
        e.contains("registration (mobile") && e.contains("was removed from the account"),
        "E-13: {answer}"
    );
    assert!(e.contains("run `lockbridge tedee register`"), "{e}");
    let posts = |fake: &Fake| fake.calls().iter().filter(|c| c.1 == "my/mobile").count();
    assert_eq!(posts(&fake), 1, "no registration behind the owner's back");
    assert_eq!(
        gateway(&world).await["tedee"]["last_error"].as_str(),
        Some(e.as_str())
    );
    // The locks keep working on their certificates, and nothing more is asked for them.
    let before = fake.calls().len();
    world.succeed("lock-1", Action::Unlock).await;
    world.succeed("lock-2", Action::Unlock).await;
    let out = tedee(&world, &["fetch"]);
    assert!(output(&out).contains("was removed from the account"));
    assert_eq!(fake.calls().len(), before, "{:?}", fake.calls());

    // With auto_reregister, the same key is registered again once, and certificates follow.
    drop(daemon);
    world.edit_daemon_config(|t| {
        t.replace(
            "[credentials.tedee]\n",
            "[credentials.tedee]\nauto_reregister = true\n",
        )
    });
    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(60))
        .await;
    let out = tedee(&world, &["fetch"]);
    assert!(out.status.success(), "{}", output(&out));
    assert_eq!(posts(&fake), 2, "{:?}", fake.calls());
    let again = fake
        .requests()
        .into_iter()
        .filter(|r| r["path"] == "my/mobile")
        .nth(1)
        .unwrap();
    let first = fake
        .requests()
        .into_iter()
        .find(|r| r["path"] == "my/mobile")
        .unwrap();
    assert_eq!(
        again["registered"]["publicKey"], first["registered"]["publicKey"],
        "the same key"
    );
    assert!(world.daemon_log().contains("registered this hub as mobile"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hourly_budget_holds_over_a_run_of_constant_refreshes() {
    let dir = tempfile::tempdir().unwrap();
    // 6-second certificates would be refreshed every ~3 s per lock: the ceiling of 10 requests
    // an hour is what stops them.
    let (fake, world) = tedee_world(dir.path(), |_| {}, |v| v["validity_s"] = json!(6));
    world.edit_daemon_config(|t| {
        t.replace(
            "[credentials.tedee]\n",
            "[credentials.tedee]\nmax_requests_per_hour = 10\n",
        )
    });
    let _sim = world.sim();
    let _daemon = world.daemon();
    until(Duration::from_secs(60), "the ceiling reached", async || {
        gateway(&world).await["tedee"]["requests_last_hour"] == 10
    })
    .await;
    // Well past the point where refreshes would have gone on: not one more request.
    let at_ceiling = fake.calls().len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(at_ceiling, 10, "{:?}", fake.calls());
    assert_eq!(fake.calls().len(), 10, "{:?}", fake.calls());
    assert!(
        world
            .daemon_log()
            .contains("this hub's ceiling of 10 requests per hour is reached"),
        "the hold is logged"
    );
    // The operator's fetch is held by the ceiling too, and says so.
    let out = tedee(&world, &["fetch", "lock-1"]);
    assert!(
        output(&out).contains("this hub's ceiling of 10 requests per hour is reached"),
        "{}",
        output(&out)
    );
}
