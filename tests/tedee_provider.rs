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
use common::tedee::{ALL_SCOPES, Fake, KEY, demo_locks, state_dir, world_for};
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
    assert!(creds["cert_expires"].as_u64().unwrap() > lockbridge::authority::unix_ms_now());
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
    fake.fault(json!([{"path": "getformobile", "status": 500, "body": "empty"}]));
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
