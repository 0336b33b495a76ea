//! The arm64 package's own binary (for a Raspberry Pi), run under qemu-aarch64: `--version`,
//! `check-config`, and the whole gateway over the sim socket — setup, simulator and daemon
//! all arm64 — unlocking and locking with one actuation each.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use lockbridge::command::Action;

use common::{Binary, World, deb};

/// The binary inside the arm64 package, unpacked into `dir`.
fn packaged_binary(dir: &Path) -> Binary {
    let out = std::process::Command::new("dpkg-deb")
        .args(["-x", deb("arm64").to_str().unwrap(), dir.to_str().unwrap()])
        .output()
        .expect("dpkg-deb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join("usr/bin/lockbridge");
    // ELF e_machine 183 (EM_AARCH64): the package really carries an arm64 build.
    let elf = std::fs::read(&path).unwrap();
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 183);
    Binary::arm64(&path)
}

#[test]
fn the_arm64_binary_reports_its_version_and_checks_a_config() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = packaged_binary(&tmp.path().join("pkg"));
    assert_eq!(
        bin.run(&["--version"]).trim(),
        format!("lockbridge {}", env!("CARGO_PKG_VERSION"))
    );
    let state = tmp.path().join("state");
    let key = state.join("gateway.key");
    bin.run(&["keys", "init", "--out", key.to_str().unwrap()]);
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/lockbridge.toml");
    let out = bin
        .command()
        .args(["check-config", "--config", config.to_str().unwrap()])
        .env("LOCKBRIDGE_GATEWAY__STATE_DIR", &state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(": ok (2 locks"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_arm64_gateway_unlocks_and_locks_over_the_sim_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let w = World::with_binary(packaged_binary(tmp.path()), 2, |_| {});
    let _sim = w.sim();
    let _daemon = w.daemon();
    w.wait_status("lock-1", "connected", Duration::from_secs(120))
        .await;
    w.succeed("lock-1", Action::Unlock).await;
    w.succeed("lock-1", Action::Lock).await;
    let acts = w.actuations();
    let commands: Vec<&str> = acts
        .iter()
        .map(|a| a["command"].as_str().unwrap())
        .collect();
    assert_eq!(commands, ["unlock", "lock"], "{acts:?}");
}
