//! The test double of Tedee's cloud (tests/tedee_fake.py) as the suites start it, and a demo
//! world pointed at it.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

use super::{Proc, World};

pub const KEY: &str = "tstkey.Zm9vYmFyYmF6cXV4K3Nl/Y3JldHNlY3JldA";
pub const ALL_SCOPES: &[&str] = &[
    "Device.Read",
    "DeviceCertificate.Operate",
    "Mobile.ReadWrite",
];

pub struct Fake {
    _proc: Proc,
    pub state: PathBuf,
    pub url: String,
}

impl Fake {
    /// The double on a free port, with `locks` on the account of [`KEY`] (with `scopes`).
    pub fn start(dir: &Path, tls: bool, locks: Value, scopes: &[&str]) -> Fake {
        std::fs::create_dir_all(dir).unwrap();
        let state = dir.join("tedee-account.json");
        std::fs::write(
            &state,
            json!({"keys": {KEY: scopes}, "locks": locks}).to_string(),
        )
        .unwrap();
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3");
        let mut cmd = Command::new(&python);
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tedee_fake.py"))
            .args(["--state", state.to_str().unwrap()]);
        if tls {
            let certs = super::gen_certs(&dir.join("certs"));
            cmd.arg("--tls")
                .arg(certs.join("broker.pem"))
                .arg(certs.join("broker.key"));
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; run tests/run.sh (it makes .venv)",
                    python.display()
                )
            });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{line:?}"));
        let scheme = if tls {
            "https://localhost"
        } else {
            "http://127.0.0.1"
        };
        Fake {
            _proc: Proc(child),
            url: format!("{scheme}:{port}"),
            state,
        }
    }

    pub fn requests(&self) -> Vec<Value> {
        let path = format!("{}.requests", self.state.display());
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// (method, path) of every request, each checked for violations of the documented rules.
    pub fn calls(&self) -> Vec<(String, String)> {
        self.requests()
            .iter()
            .map(|r| {
                assert!(
                    r.get("violations").is_none(),
                    "request broke Tedee's rules: {r}"
                );
                (
                    r["method"].as_str().unwrap().into(),
                    r["path"].as_str().unwrap().into(),
                )
            })
            .collect()
    }

    pub fn fault(&self, faults: Value) {
        std::fs::write(
            format!("{}.faults", self.state.display()),
            faults.to_string(),
        )
        .unwrap();
    }

    pub fn edit(&self, f: impl FnOnce(&mut Value)) {
        let mut v: Value =
            serde_json::from_str(&std::fs::read_to_string(&self.state).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&self.state, v.to_string()).unwrap();
    }
}

pub fn state_dir(world: &World) -> PathBuf {
    let text = std::fs::read_to_string(world.daemon_config()).unwrap();
    let config: toml::Table = text.parse().unwrap();
    PathBuf::from(config["gateway"]["state_dir"].as_str().unwrap())
}

/// A demo world whose daemon config points at `fake`, with the key in `tedee.pak` (0600).
pub fn world_for(fake: &Fake, tls: bool) -> World {
    let world = World::new(2, |_| {});
    let dir = state_dir(&world);
    let pak = dir.join("tedee.pak");
    std::fs::write(&pak, format!("{KEY}\n")).unwrap();
    std::fs::set_permissions(&pak, std::fs::Permissions::from_mode(0o600)).unwrap();
    let extra = if tls {
        format!(
            "extra_ca_file = \"{}\"\n",
            fake.state.parent().unwrap().join("certs/ca.pem").display()
        )
    } else {
        String::new()
    };
    world.edit_daemon_config(|t| {
        format!(
            "{t}\n[credentials.tedee]\napi_url = \"{}\"\n{extra}",
            fake.url
        )
    });
    world
}

/// The demo world's locks, as Tedee would list them: (id, serial) of lock-1 and lock-2.
pub fn demo_locks(world: &World) -> Vec<(u64, String)> {
    world.summary["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["device_id"].as_u64().unwrap(),
                l["serial"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub fn account_lock(id: u64, serial: &str, name: &str) -> Value {
    json!({"id": id, "serialNumber": serial, "name": name, "type": 4, "accessLevel": 2})
}

/// `lockbridge tedee ARGS` with the world's config; whatever it prints must not hold the key.
pub fn tedee(world: &World, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args(["tedee", "--config", world.daemon_config().to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = KEY.split_once('.').unwrap().1;
    assert!(
        !all.contains(secret),
        "the key's secret part was printed: {all}"
    );
    out
}
