//! The sans-IO cores stay sans-IO: the protocol (`src/ptls/`), the session core and the fault
//! model never read a clock, touch the network or the file system, or reach for tokio. Time
//! and randomness are their inputs. (Their own unit tests, after `#[cfg(test)]`, may.)

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;

const FORBIDDEN: &[&str] = &[
    "Instant::now",
    "SystemTime",
    "tokio",
    "std::net",
    "std::fs",
    "crate::clock",
    "OsRng",
    "thread_rng",
];

fn cores() -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(root.join("src/ptls"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        // The pair harness only takes a base instant for its virtual clock.
        .filter(|p| !p.ends_with("pair.rs"))
        .collect();
    files.push(root.join("src/session/core.rs"));
    files.push(root.join("src/fault.rs"));
    files.push(root.join("src/backoff.rs"));
    files
}

#[test]
fn the_cores_read_no_clock_and_do_no_io() {
    let mut found = Vec::new();
    for file in cores() {
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (n, line) in code.lines().enumerate() {
            let line = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN {
                if line.contains(word) {
                    found.push(format!("{}:{}: {word}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "I/O or clock reads in a sans-IO core:\n{}",
        found.join("\n")
    );
}
