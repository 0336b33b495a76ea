//! The shipped systemd unit: `systemd-analyze security --offline=true` must rate its exposure
//! 2.0 or lower, it keeps only what the daemon needs, and every hardening line says why.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test code; the figure is printed

use std::path::Path;
use std::process::Command;

fn unit() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/lockbridge.service")
}

#[test]
fn exposure_is_at_most_2() {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(unit())
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze: {e}; install systemd (tests/run.sh does)"));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable: {line}"));
    println!("{line}");
    assert!(level <= 2.0, "exposure {level} is above 2.0: {line}");
}

#[test]
fn the_unit_keeps_only_what_the_daemon_needs() {
    let text = std::fs::read_to_string(unit()).unwrap();
    let settings: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    let has = |s: &str| settings.contains(&s);
    assert!(has("CapabilityBoundingSet="), "no capabilities");
    assert!(has("AmbientCapabilities="));
    assert!(has("RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"));
    assert!(has("User=lockbridge") && has("SupplementaryGroups=bluetooth"));
    assert!(has("NoNewPrivileges=yes"));
}

#[test]
fn every_hardening_line_says_why() {
    let text = std::fs::read_to_string(unit()).unwrap();
    let hardening = text
        .split("# --- hardening")
        .nth(1)
        .expect("a hardening section")
        .split("[Install]")
        .next()
        .unwrap();
    // A comment covers the settings right below it, up to the next blank line.
    let mut covered = false;
    for line in hardening.lines().skip(1).map(str::trim) {
        if line.is_empty() {
            covered = false;
        } else if line.starts_with('#') {
            covered = true;
        } else {
            assert!(covered, "{line}: no comment says why");
        }
    }
}
