//! `lockbridge tedee check|register|unregister` against the project's own test double of
//! Tedee's cloud (tests/tedee_fake.py, written from tedee-cloud.md Part B), over HTTPS with its
//! own CA given through `extra_ca_file`, and over plain HTTP on loopback. The double checks
//! every request (path and version, `Authorization: PersonalKey`, headers, the registration
//! body) and logs it, so each test says exactly which calls were made; the key never appears
//! in anything lockbridge prints or writes.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use serde_json::{Value, json};

use common::World;
use common::tedee::{ALL_SCOPES, Fake, account_lock, demo_locks, state_dir, tedee, world_for};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_lists_the_account_with_one_request_and_names_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start(dir.path(), true, json!([]), ALL_SCOPES);
    let world = world_for(&fake, true);
    let locks = demo_locks(&world);
    // lock-1 is on the account under another device id; lock-2 is missing; a third is extra.
    fake.edit(|v| {
        v["locks"] = json!([
            account_lock(locks[0].0 + 1, &locks[0].1, "Front door"),
            account_lock(77, "99999999-000001", "Garage"),
        ])
    });
    let out = tedee(&world, &["check"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("Tedee key `tstkey…`: accepted; 2 lock(s) on the account"),
        "{t}"
    );
    assert!(
        t.contains("Front door") && t.contains("Lock GO") && t.contains("owner"),
        "{t}"
    );
    assert!(
        t.contains(&format!(
            "Lock `lock-1`: device_id {} in the config, but Tedee says serial {} is device {}",
            locks[0].0,
            locks[0].1,
            locks[0].0 + 1
        )),
        "E-11: {t}"
    );
    assert!(
        t.contains(&format!(
            "Lock `lock-2` (serial {}) is not on the Tedee account of this key",
            locks[1].1
        )),
        "E-10: {t}"
    );
    assert!(
        t.contains("99999999-000001 (Garage)"),
        "E-10 lists the account's locks: {t}"
    );
    assert_eq!(fake.calls(), [("GET".into(), "my/lock".into())]);

    // All well: exit 0, and --json says so.
    fake.edit(|v| {
        v["locks"] = json!([
            account_lock(locks[0].0, &locks[0].1, "Front door"),
            account_lock(locks[1].0, &locks[1].1, "Back door"),
        ])
    });
    let out = tedee(&world, &["check", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["locks"].as_array().unwrap().len(), 2);
    assert_eq!(v["key_prefix"], "tstkey");
    assert_eq!(fake.calls().len(), 2);
}

#[test]
fn locks_lists_the_account_and_gives_a_block_to_paste_for_each_lock_not_configured() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start(dir.path(), false, json!([]), ALL_SCOPES);
    let world = world_for(&fake, false);
    let locks = demo_locks(&world);
    // lock-1 is configured; two are not, one named like a configured id, one with a name that
    // tries to break out of its comment.
    fake.edit(|v| {
        v["locks"] = json!([
            account_lock(locks[0].0, &locks[0].1, "Front door"),
            account_lock(locks[1].0 + 10, "99999999-000001", "Lock 1"),
            account_lock(
                78,
                "99999999-000002",
                "Garage\n[gateway]\nid = \"evil\"\u{1b}[2J"
            ),
        ])
    });
    let out = tedee(&world, &["locks"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("3 lock(s) on the Tedee account"), "{t}");
    let row = t.lines().find(|l| l.contains(&locks[0].1)).unwrap();
    assert!(
        row.trim_end().ends_with("lock-1"),
        "configured as lock-1: {row}"
    );
    // One block each for the other two, with fresh, valid ids; the name stays in its comment.
    assert_eq!(t.matches("[[locks]]").count(), 2, "{t}");
    assert!(
        t.contains("id = \"lock-1-2\"\nserial = \"99999999-000001\""),
        "{t}"
    );
    assert!(t.contains("id = \"garage-gateway-id-evil-2j\""), "{t}");
    assert!(
        !t.contains("\n[gateway]"),
        "the name broke out of its comment: {t}"
    );
    assert!(
        !t.contains('\u{1b}'),
        "a terminal escape from the cloud was printed: {t}"
    );
    assert_eq!(fake.calls(), [("GET".into(), "my/lock".into())]);

    // Pasted into the config, the blocks make a configuration check-config accepts, and every
    // lock is then configured.
    let blocks = &t[t.find("# Lock 1").unwrap()..];
    // (Locks without device_id and public_key: the tedee provider looks them up.)
    world.edit_daemon_config(|c| {
        format!(
            "{}\n{blocks}",
            c.replace("provider = \"authority\"", "provider = \"tedee\"")
                .lines()
                .filter(|l| !l.starts_with("authority_dir"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    common::lockbridge(&[
        "check-config",
        "--config",
        world.daemon_config().to_str().unwrap(),
    ]);
    let out = tedee(&world, &["locks", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = v["locks"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list[1]["configured_as"], "lock-1-2", "{v}");
    assert_eq!(list[2]["configured_as"], "garage-gateway-id-evil-2j", "{v}");
    assert!(list.iter().all(|l| l["config"].is_null()), "{v}");
    assert_eq!(list[0]["model"], "Lock GO");
    assert_eq!(list[0]["access"], "owner");
}

#[test]
fn every_refusal_names_its_cause_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start(dir.path(), false, json!([]), &["Mobile.ReadWrite"]);
    let world = world_for(&fake, false);
    // Missing scope (E-04).
    let t = text(&tedee(&world, &["check"]));
    assert!(
        t.contains(
            "The Tedee key `tstkey…` lacks scope Device.Read, needed to list the account's locks"
        ) && t.contains("(Tedee HTTP 403, correlation id "),
        "{t}"
    );
    // 429 with Retry-After (E-07), an HTML 502 and an empty 500 (E-08).
    fake.fault(json!([
        {"path": "my/lock", "status": 429, "retry_after": 42, "body": "json"},
        {"path": "my/lock", "status": 502, "body": "html"},
        {"path": "my/lock", "status": 500, "body": "empty"},
    ]));
    let t = text(&tedee(&world, &["check"]));
    assert!(
        t.contains("Tedee's rate limit for this account is reached")
            && t.contains("next try in 42 s"),
        "{t}"
    );
    let t = text(&tedee(&world, &["check"]));
    assert!(
        t.contains("Tedee cloud unreachable (HTTP 502, an HTML page)"),
        "{t}"
    );
    let t = text(&tedee(&world, &["check"]));
    assert!(
        t.contains("Tedee cloud unreachable (HTTP 500, an empty answer)"),
        "{t}"
    );
    // A wrong key (E-03): only its prefix is shown.
    fake.edit(|v| v["keys"] = json!({"other.key": ALL_SCOPES}));
    let t = text(&tedee(&world, &["check"]));
    assert!(
        t.contains(
            "Tedee refused the personal access key `tstkey…`: it is wrong, expired or revoked"
        ),
        "{t}"
    );
    // Nothing listens: unreachable, with the cause.
    drop(fake);
    let t = text(&tedee(&world, &["check"]));
    assert!(
        t.contains("Tedee cloud unreachable (could not connect"),
        "{t}"
    );

    // The key file: missing (E-01) and readable by others (E-02).
    let pak = state_dir(&world).join("tedee.pak");
    std::fs::set_permissions(&pak, std::fs::Permissions::from_mode(0o644)).unwrap();
    let t = text(&tedee(&world, &["check"]));
    assert!(
        t.contains("lets group or others read") && t.contains("chmod 600"),
        "E-02: {t}"
    );
    std::fs::remove_file(&pak).unwrap();
    let t = text(&tedee(&world, &["check"]));
    assert!(
        t.contains("not found. Create a Personal Access Key in the Tedee Portal"),
        "E-01: {t}"
    );
}

#[test]
fn tls_is_verified_against_the_system_roots_and_extra_ca_file_only() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start(dir.path(), true, json!([]), ALL_SCOPES);
    let world = world_for(&fake, false);
    let t = text(&tedee(&world, &["check"]));
    assert!(
        t.contains("Tedee cloud unreachable") && t.contains("extra_ca_file"),
        "an unknown CA is refused and the fix named: {t}"
    );
    assert!(fake.requests().is_empty(), "no request got through");
}

#[test]
fn register_once_then_check_it_and_unregister() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start(dir.path(), true, json!([]), ALL_SCOPES);
    let world = world_for(&fake, true);
    let out = tedee(&world, &["register", "--name", "hub-test"]);
    assert!(out.status.success(), "{}", text(&out));
    let requests = fake.requests();
    assert_eq!(fake.calls(), [("POST".into(), "my/mobile".into())]);
    let registered = &requests[0]["registered"];
    assert_eq!(registered["name"], "hub-test");
    // The gateway's own key, as `keys show` prints it.
    let key_file = state_dir(&world).join("gateway.key");
    let shown = common::lockbridge(&["keys", "show", key_file.to_str().unwrap()]);
    assert!(
        shown.contains(registered["publicKey"].as_str().unwrap()),
        "{shown} vs {registered}"
    );
    let registration = state_dir(&world).join("tedee/registration.json");
    let mode = std::fs::metadata(&registration)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&registration).unwrap()).unwrap();
    assert_eq!(r["mobile_id"], registered["id"]);
    assert_eq!(r["api_url"], fake.url.as_str());
    let dir_mode = std::fs::metadata(state_dir(&world).join("tedee"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let written = std::fs::read_to_string(&registration).unwrap();
    assert!(
        !written.contains("tstkey"),
        "the key is never written: {written}"
    );

    // Again: checked, not repeated.
    let t = text(&tedee(&world, &["register"]));
    assert!(t.contains("already registered as mobile"), "{t}");
    assert_eq!(
        fake.calls().last().unwrap(),
        &(
            "GET".into(),
            format!("my/mobile/{}", r["mobile_id"].as_str().unwrap())
        )
    );
    assert_eq!(fake.calls().iter().filter(|c| c.0 == "POST").count(), 1);

    // --force registers again.
    assert!(tedee(&world, &["register", "--force"]).status.success());
    assert_eq!(fake.calls().iter().filter(|c| c.0 == "POST").count(), 2);
    let r2: Value = serde_json::from_str(&std::fs::read_to_string(&registration).unwrap()).unwrap();
    assert_ne!(r2["mobile_id"], r["mobile_id"]);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(
        r2["mobile_name"],
        format!("lockbridge-{}", host.trim()),
        "the default name"
    );

    // Unregister: DELETE, 204, and the state goes.
    let out = tedee(&world, &["unregister"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        fake.calls().last().unwrap(),
        &(
            "DELETE".into(),
            format!("my/mobile/{}", r2["mobile_id"].as_str().unwrap())
        )
    );
    assert!(!state_dir(&world).join("tedee").exists());
    let t = text(&tedee(&world, &["unregister"]));
    assert!(t.contains("this hub is not registered with Tedee"), "{t}");

    // A registration Tedee forgot (removed in the app) is made again by `register`.
    assert!(tedee(&world, &["register"]).status.success());
    let r3: Value = serde_json::from_str(&std::fs::read_to_string(&registration).unwrap()).unwrap();
    drop(fake);
    let fake = Fake::start(&dir.path().join("again"), true, json!([]), ALL_SCOPES);
    world.edit_daemon_config(|t| {
        let old = t
            .lines()
            .find(|l| l.starts_with("api_url"))
            .unwrap()
            .to_string();
        let ca = dir.path().join("again/certs/ca.pem");
        let old_ca = t
            .lines()
            .find(|l| l.starts_with("extra_ca_file"))
            .unwrap()
            .to_string();
        t.replace(&old, &format!("api_url = \"{}\"", fake.url))
            .replace(&old_ca, &format!("extra_ca_file = \"{}\"", ca.display()))
    });
    let t = text(&tedee(&world, &["register"]));
    // The URL changed (E-12's cause): the current key is registered.
    assert!(
        t.contains("changed since mobile") && t.contains("registered as mobile"),
        "{t}"
    );
    let r4: Value = serde_json::from_str(&std::fs::read_to_string(&registration).unwrap()).unwrap();
    assert_ne!(r4["mobile_id"], r3["mobile_id"]);
}

#[test]
fn check_config_refuses_plain_http_to_anything_but_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start(dir.path(), false, json!([]), ALL_SCOPES);
    let world = world_for(&fake, false);
    let check = |world: &World| {
        Command::new(env!("CARGO_BIN_EXE_lockbridge"))
            .args([
                "check-config",
                "--config",
                world.daemon_config().to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    assert!(check(&world).status.success(), "{}", text(&check(&world)));
    world.edit_daemon_config(|t| t.replace(&fake.url, "http://api.tedee.com"));
    let out = check(&world);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("credentials.tedee.api_url")
            && text(&out)
                .contains("must be an https:// URL (http is allowed only on loopback for tests)"),
        "{}",
        text(&out)
    );
}
