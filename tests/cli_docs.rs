//! The man page and shell completions the package ships come from the clap definitions:
//! they name every subcommand and stay in step with the binary.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

fn lockbridge(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "lockbridge {args:?}");
    String::from_utf8(out.stdout).unwrap()
}

const SUBCOMMANDS: &[&str] = &[
    "run",
    "check-config",
    "ctl",
    "local",
    "demo",
    "sim",
    "keys",
    "authority",
    "tedee",
    "completions",
];

#[test]
fn the_man_page_describes_every_subcommand() {
    let man = lockbridge(&["man"]);
    assert!(man.contains(".TH lockbridge 1"), "{man}");
    assert!(man.contains(env!("CARGO_PKG_VERSION")));
    for sub in SUBCOMMANDS {
        assert!(
            man.contains(&format!("lockbridge\\-{}", sub.replace('-', "\\-"))),
            "the man page lacks {sub}"
        );
    }
}

#[test]
fn completions_cover_every_subcommand_in_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let script = lockbridge(&["completions", shell]);
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} completions lack {sub}");
        }
    }
    // bash can load it.
    let script = lockbridge(&["completions", "bash"]);
    let status = Command::new("bash")
        .args(["-c", &format!("{script}\ncomplete -p lockbridge")])
        .status()
        .unwrap();
    assert!(status.success());
}
