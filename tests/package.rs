//! The Debian package on this machine: installing it (`apt-get install ./….deb`, as an
//! operator does) creates the service user and, once, the gateway key (0600, owned by the service user); `check-config` passes as that user; an
//! upgrade and a reinstall keep the configuration, key, certificates and command-id store;
//! `dpkg -r` then `dpkg -P` leave nothing behind; lintian reports no errors for either
//! architecture. tests/run.sh builds both packages first (packaging/build-deb).

#![allow(clippy::unwrap_used, clippy::print_stdout)] // test code; lintian's findings are printed

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::deb;

const STATE: &str = "/var/lib/lockbridge";
const KEY: &str = "/var/lib/lockbridge/gateway.key";
const CONFIG: &str = "/etc/lockbridge/lockbridge.toml";
const ENABLED: &str = "/etc/systemd/system/multi-user.target.wants/lockbridge.service";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}; tests/run.sh installs it"))
}

/// Run and require success; its standard output.
fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The files (not directories) a package installs, as absolute paths.
fn files_of(deb: &Path) -> Vec<String> {
    ok("dpkg-deb", &["--contents", deb.to_str().unwrap()])
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect()
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn id(args: &[&str]) -> u32 {
    ok("id", args).trim().parse().unwrap()
}

/// What the package must keep across upgrade, reinstall and remove: path → contents.
fn kept_state() -> Vec<(String, Vec<u8>)> {
    [
        KEY,
        CONFIG,
        "/var/lib/lockbridge/certs/12345678-901234.cert",
        "/var/lib/lockbridge/signed-time.json",
        "/var/lib/lockbridge/commands.jsonl",
    ]
    .iter()
    .map(|p| (p.to_string(), std::fs::read(p).unwrap()))
    .collect()
}

fn assert_state_kept(before: &[(String, Vec<u8>)], when: &str) {
    for (path, contents) in before {
        let now = std::fs::read(path).unwrap_or_else(|e| panic!("{when}: {path}: {e}"));
        assert!(&now == contents, "{when}: {path} changed");
    }
}

/// dpkg's status and version of lockbridge, when dpkg knows it at all (installed, or removed
/// with its configuration kept).
fn dpkg_status() -> Option<String> {
    let out = run(
        "dpkg-query",
        &["-W", "-f=${Status} ${Version}", "lockbridge"],
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.contains("not-installed")).then_some(text)
}

fn installed_version() -> Option<String> {
    dpkg_status()?
        .strip_prefix("install ok installed ")
        .map(str::to_string)
}

/// The same package under another Debian revision, as an upgrade would bring it.
fn with_revision(deb: &Path, revision: &str, dir: &Path) -> PathBuf {
    let root = dir.join("root");
    ok(
        "dpkg-deb",
        &["-R", deb.to_str().unwrap(), root.to_str().unwrap()],
    );
    let control = root.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let version = format!("Version: {}-{revision}", env!("CARGO_PKG_VERSION"));
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("Version:") {
                version.clone()
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&control, text.join("\n") + "\n").unwrap();
    let out = dir.join(format!("lockbridge-{revision}.deb"));
    ok(
        "dpkg-deb",
        &[
            "--root-owner-group",
            "-b",
            root.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    out
}

/// A failed run must not leave the package installed: the next run would refuse to start.
/// (The test only begins when lockbridge was not installed, so purging is safe.)
struct PurgeOnDrop;

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        if dpkg_status().is_some() || Path::new(STATE).exists() {
            let _ = run("dpkg", &["-P", "lockbridge"]);
        }
    }
}

#[test]
fn the_packages_hold_the_same_files_for_both_architectures() {
    let amd64 = deb("amd64");
    let arm64 = deb("arm64");
    for (deb, arch) in [(&amd64, "amd64"), (&arm64, "arm64")] {
        let field = |f: &str| ok("dpkg-deb", &["-f", deb.to_str().unwrap(), f]);
        assert_eq!(field("Architecture").trim(), arch);
        assert_eq!(field("Package").trim(), "lockbridge");
        let depends = field("Depends");
        assert!(
            depends.contains("libdbus-1-3") && depends.contains("systemd"),
            "{arch}: {depends}"
        );
        // docs/install.md promises glibc 2.34 (Raspberry Pi OS Bookworm has 2.36).
        let glibc: Vec<u32> = depends
            .split("libc6 (>= ")
            .nth(1)
            .and_then(|v| v.split(')').next())
            .unwrap_or_else(|| panic!("{arch}: no libc6 version in {depends}"))
            .split('.')
            .map(|n| n.parse().unwrap())
            .collect();
        assert!(glibc <= vec![2, 34], "{arch} needs glibc {glibc:?}");
        let control = ok("dpkg-deb", &["-I", deb.to_str().unwrap(), "conffiles"]);
        assert_eq!(control.trim(), CONFIG, "{arch}: the config is the conffile");
    }
    let files = files_of(&amd64);
    for wanted in [
        "/usr/bin/lockbridge",
        CONFIG,
        "/usr/lib/sysusers.d/lockbridge.conf",
        "/usr/share/man/man1/lockbridge.1.gz",
        "/usr/share/bash-completion/completions/lockbridge",
        "/usr/share/zsh/vendor-completions/_lockbridge",
        "/usr/share/fish/vendor_completions.d/lockbridge.fish",
        "/usr/share/doc/lockbridge/copyright",
        "/usr/share/doc/lockbridge/changelog.Debian.gz",
    ] {
        assert!(
            files.iter().any(|f| f == wanted),
            "{wanted} not in {files:?}"
        );
    }
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("/systemd/system/lockbridge.service")),
        "{files:?}"
    );
    assert!(
        !files.iter().any(|f| f.starts_with("/var/lib")),
        "state is made on the machine, never shipped: {files:?}"
    );
    assert_eq!(files, files_of(&arm64));
}

#[test]
fn lintian_reports_no_errors() {
    for arch in ["amd64", "arm64"] {
        let deb = deb(arch);
        let out = run(
            "lintian",
            &["--tag-display-limit", "0", deb.to_str().unwrap()],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        println!(
            "lintian {arch}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E:")).collect();
        assert!(errors.is_empty(), "lintian errors for {arch}: {errors:#?}");
        assert!(
            out.status.success(),
            "lintian {arch} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn install_check_upgrade_remove_and_purge() {
    assert_eq!(
        id(&["-u"]),
        0,
        "the package test installs and purges lockbridge: run it as root (tests/run.sh does)"
    );
    // Never purge a real installation: its key could not be recovered.
    assert!(
        dpkg_status().is_none() && !Path::new(STATE).exists(),
        "lockbridge is installed here (or {STATE} exists); this test would purge it — run it on a \
         test machine, or `dpkg -P lockbridge` first"
    );
    let deb = deb("amd64");
    let tmp = tempfile::tempdir().unwrap();
    let _purge = PurgeOnDrop;

    // First install, as an operator does it: the user, the state directory and a new key.
    let out = ok("apt-get", &["install", "-y", deb.to_str().unwrap()]);
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    let public = out
        .lines()
        .find_map(|l| l.split("its public key, for access certificates: ").nth(1))
        .unwrap_or_else(|| panic!("postinst names the new key's public key:\n{out}"))
        .trim()
        .to_string();
    let passwd = ok("getent", &["passwd", "lockbridge"]);
    assert!(
        passwd
            .trim_end()
            .ends_with(":/var/lib/lockbridge:/usr/sbin/nologin"),
        "{passwd}"
    );
    let groups = ok("id", &["-nG", "lockbridge"]);
    assert!(
        groups.split_whitespace().any(|g| g == "bluetooth"),
        "{groups}"
    );
    let (uid, gid) = (id(&["-u", "lockbridge"]), id(&["-g", "lockbridge"]));
    let key = std::fs::metadata(KEY).unwrap();
    assert_eq!((mode(KEY), key.uid(), key.gid()), (0o600, uid, gid));
    let state = std::fs::metadata(STATE).unwrap();
    assert_eq!((mode(STATE), state.uid()), (0o700, uid));
    let config = std::fs::metadata(CONFIG).unwrap();
    assert_eq!((mode(CONFIG), config.uid(), config.gid()), (0o640, 0, gid));
    assert_eq!(
        ok("lockbridge", &["--version"]).trim(),
        format!("lockbridge {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(
        Path::new(ENABLED).exists(),
        "the service is enabled on install"
    );
    let man = ok(
        "sh",
        &["-c", "gzip -dc /usr/share/man/man1/lockbridge.1.gz"],
    );
    assert!(man.contains(".TH lockbridge"), "{man}");
    ok(
        "bash",
        &[
            "-c",
            "source /usr/share/bash-completion/completions/lockbridge && complete -p lockbridge",
        ],
    );

    // The service user can check the installed configuration and read its key; others
    // cannot read the configuration.
    let checked = ok(
        "runuser",
        &["-u", "lockbridge", "--", "lockbridge", "check-config"],
    );
    assert!(
        checked.contains(&format!("{CONFIG}: ok")) && checked.contains(KEY),
        "{checked}"
    );
    let shown = ok(
        "runuser",
        &["-u", "lockbridge", "--", "lockbridge", "keys", "show", KEY],
    );
    assert_eq!(shown.trim(), public);
    let other = run(
        "runuser",
        &["-u", "nobody", "--", "lockbridge", "check-config"],
    );
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && err.contains(CONFIG),
        "nobody may not read {CONFIG}: {err}"
    );

    // What a running hub accumulates: certificates, signed time, command ids, an edited config.
    std::fs::create_dir_all(format!("{STATE}/certs")).unwrap();
    for (path, text) in [
        ("certs/12345678-901234.cert", "AAAA\n"),
        ("signed-time.json", "{}\n"),
        ("commands.jsonl", "{\"id\":\"door-42\"}\n"),
    ] {
        let path = format!("{STATE}/{path}");
        std::fs::write(&path, text).unwrap();
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
    }
    let edited = std::fs::read_to_string(CONFIG)
        .unwrap()
        .replace("id = \"hub-1\"", "id = \"hub-upgrade-test\"");
    std::fs::write(CONFIG, edited).unwrap();
    let before = kept_state();

    // Upgrade: everything kept, no conffile prompt or copy, still valid for the service user.
    let upgrade = with_revision(&deb, "2", tmp.path());
    let out = ok("dpkg", &["-i", upgrade.to_str().unwrap()]);
    assert!(!out.contains("created the gateway key"), "{out}");
    assert_eq!(
        installed_version().as_deref(),
        Some(format!("{}-2", env!("CARGO_PKG_VERSION")).as_str())
    );
    assert_state_kept(&before, "after the upgrade");
    let leftovers: Vec<_> = std::fs::read_dir("/etc/lockbridge")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(leftovers, ["lockbridge.toml"]);
    ok(
        "runuser",
        &["-u", "lockbridge", "--", "lockbridge", "check-config"],
    );

    // Remove keeps configuration and state; installing again picks them up unchanged.
    ok("dpkg", &["-r", "lockbridge"]);
    let status = dpkg_status().unwrap();
    assert!(status.starts_with("deinstall ok config-files"), "{status}");
    assert!(!Path::new("/usr/bin/lockbridge").exists());
    assert_state_kept(&before, "after remove");
    ok("dpkg", &["-i", upgrade.to_str().unwrap()]);
    assert_state_kept(&before, "after reinstalling");
    ok("dpkg", &["-r", "lockbridge"]);

    // Purge: nothing of the package, and no file of its user, is left.
    ok("dpkg", &["-P", "lockbridge"]);
    assert_eq!(dpkg_status(), None);
    // symlink_metadata: a dangling enable or mask link counts as left behind.
    for path in files_of(&deb).iter().map(String::as_str).chain([
        STATE,
        "/etc/lockbridge",
        "/run/lockbridge",
        ENABLED,
        "/etc/systemd/system/lockbridge.service",
    ]) {
        assert!(
            std::fs::symlink_metadata(path).is_err(),
            "{path} is left after purge"
        );
    }
    let (uid, gid) = (uid.to_string(), gid.to_string());
    let mut args: Vec<&str> = ["/etc", "/var", "/usr", "/run", "/srv", "/opt", "/home"]
        .into_iter()
        .filter(|d| Path::new(d).exists())
        .collect();
    args.extend([
        "-xdev", "(", "-uid", &uid, "-o", "-gid", &gid, ")", "-print",
    ]);
    let owned = ok("find", &args);
    assert!(
        owned.is_empty(),
        "files of the lockbridge user left: {owned}"
    );
}
