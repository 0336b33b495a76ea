//! Every configuration file shipped in etc/ parses, unknown keys are rejected with their path,
//! bad values name their key, and environment overrides apply.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use lockbridge::config::Config;

fn etc(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("etc").join(name)
}

fn load_text(text: &str, env: &[(&str, &str)]) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lockbridge.toml");
    std::fs::write(&path, text).unwrap();
    Config::load_with_env(
        &path,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .map_err(|e| e.to_string())
}

#[test]
fn every_daemon_config_in_etc_parses_and_rejects_unknown_keys() {
    let mut seen = 0;
    for entry in std::fs::read_dir(etc("")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".toml") || name.starts_with("sim") {
            continue;
        }
        seen += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let c = load_text(&text, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!c.locks.is_empty());
        let err = load_text(&format!("{text}\n[ble.extra]\nx = 1\n"), &[]).unwrap_err();
        assert!(err.contains("extra"), "{name}: {err}");
        let err = load_text(&text.replace("[gateway]", "[gateway]\ncolour = 1"), &[]).unwrap_err();
        assert!(err.contains("colour"), "{name}: {err}");
    }
    assert!(seen >= 1, "etc/ holds the daemon config example");
}

#[test]
fn bad_values_name_their_key() {
    let text = std::fs::read_to_string(etc("lockbridge.toml")).unwrap();
    let cases = [
        (
            text.replace("max_connections = 5", "max_connections = 0"),
            "ble.max_connections",
        ),
        (
            text.replace("serial = \"12345678-901234\"", "serial = \"1234\""),
            "locks[0].serial",
        ),
        (
            text.replace("id = \"back-door\"", "id = \"front-door\""),
            "locks[1].id",
        ),
        (
            text.replace("remember_ids_h = 24", "remember_ids_h = 2"),
            "commands.remember_ids_h",
        ),
        (
            text.replace("link = \"on-demand\"", "link = \"sometimes\""),
            "sometimes",
        ),
        (
            text.replace("transport = \"ble\"", "transport = \"sim\""),
            "ble.sim_endpoint",
        ),
        (
            text.replacen("public_key = \"BFfp", "public_key = \"AAAA", 1),
            "locks[0].public_key",
        ),
    ];
    for (bad, key) in cases {
        let err = load_text(&bad, &[]).unwrap_err();
        assert!(err.contains(key), "expected {key} in: {err}");
    }
}

#[test]
fn environment_overrides_apply() {
    let text = std::fs::read_to_string(etc("lockbridge.toml")).unwrap();
    let c = load_text(
        &text,
        &[
            ("LOCKBRIDGE_BLE__MAX_CONNECTIONS", "7"),
            ("LOCKBRIDGE_LOG__LEVEL", "debug"),
            ("OTHER__X", "1"),
        ],
    )
    .unwrap();
    assert_eq!(c.ble.max_connections, 7);
    assert_eq!(c.log.level, "debug");
    let err = load_text(&text, &[("LOCKBRIDGE_BLE__MAX_CONNECTIONS", "lots")]).unwrap_err();
    assert!(err.contains("max_connections"), "{err}");
}

#[test]
fn check_config_exits_non_zero_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[ble]\nmax_connections = 0\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args(["check-config", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ble.max_connections"), "{err}");

    // The shipped config passes once its state directory holds a gateway key of mode 0600;
    // `run` makes the same checks first and exits the same way.
    let with_shipped = |command: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lockbridge"))
            .args([
                command,
                "--config",
                etc("lockbridge.toml").to_str().unwrap(),
            ])
            .env("LOCKBRIDGE_GATEWAY__STATE_DIR", dir.path())
            .output()
            .unwrap()
    };
    let check_shipped = || with_shipped("check-config");
    for out in [check_shipped(), with_shipped("run")] {
        assert_eq!(out.status.code(), Some(78), "EX_CONFIG");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("gateway.key: not found; create it with `lockbridge keys init"),
            "{err}"
        );
    }
    let key = dir.path().join("gateway.key");
    lockbridge::keys::generate(&key).unwrap();
    let out = check_shipped();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = check_shipped();
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
}

// Regression: `discovery_prefix = "home#"` passed check-config, and the bridge then silently
// never subscribed. Every key that forms a topic is checked.
#[test]
fn every_key_that_forms_an_mqtt_topic_is_checked() {
    let text = std::fs::read_to_string(etc("lockbridge.toml"))
        .unwrap()
        .replace("broker = \"\"", "broker = \"127.0.0.1:1883\"");
    assert!(load_text(&text, &[]).is_ok());
    // The example sets every one of these keys: replace its value.
    let set = |key: &str, value: &str| {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .map(str::to_string);
        match line {
            Some(l) => text.replace(&l, &format!("{key} = {value}")),
            None => text.replace("[mqtt]\n", &format!("[mqtt]\n{key} = {value}\n")),
        }
    };
    for (bad, key) in [
        (
            set("discovery_prefix", "\"home#\""),
            "mqtt.discovery_prefix",
        ),
        (
            set("discovery_prefix", "\"home/+\""),
            "mqtt.discovery_prefix",
        ),
        (set("root", "\"site//hub\""), "mqtt.root"),
        (set("root", "\"$SYS/hub\""), "mqtt.root"),
        (set("root", "\"/hub\""), "mqtt.root"),
        (
            set("response_prefixes", "[\"app/replies\"]"),
            "mqtt.response_prefixes[0]",
        ),
        (
            set("response_prefixes", "[\"app/#/\"]"),
            "mqtt.response_prefixes[0]",
        ),
        (
            text.replace("id = \"hub-1\"", "id = \"hub/7\""),
            "gateway.id",
        ),
    ] {
        let err = load_text(&bad, &[]).unwrap_err();
        assert!(err.contains(key), "expected {key} in: {err}");
    }
    assert!(load_text(&set("response_prefixes", "[\"app/replies/\"]"), &[]).is_ok());
}
