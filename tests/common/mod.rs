//! Helpers shared by the end-to-end suites: a demo world on disk, the simulator and the daemon
//! as processes, the control socket, and — for the BlueZ path — a private D-Bus with BlueZoo.

#![allow(dead_code, clippy::unwrap_used)] // each suite uses a different subset

pub mod driver;
pub mod dtls_raw;
pub mod mqtt;
pub mod tedee;
pub mod udp_proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use lockbridge::command::{Action, Mode, Outcome, Report};
use lockbridge::control::{ControlClient, Request};

/// How a test starts lockbridge: this build's binary, or another build of it (the packaged
/// arm64 binary runs under qemu-aarch64).
#[derive(Clone)]
pub struct Binary(Vec<std::ffi::OsString>);

impl Binary {
    pub fn this_build() -> Binary {
        Binary(vec![env!("CARGO_BIN_EXE_lockbridge").into()])
    }

    /// An aarch64 binary, run by qemu's user-mode emulator with Debian's arm64 libraries.
    pub fn arm64(path: &Path) -> Binary {
        Binary(vec!["qemu-aarch64".into(), path.into()])
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.0[0]);
        cmd.args(&self.0[1..]);
        cmd
    }

    /// Run to completion; its standard output, or a panic with its standard error.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self
            .command()
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{:?}: {e}", self.0[0]));
        assert!(
            out.status.success(),
            "lockbridge {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// The package packaging/build-deb made for `arch` ("amd64" or "arm64") from this version.
pub fn deb(arch: &str) -> PathBuf {
    let build = match arch {
        "amd64" => "packaging/build-deb",
        _ => "packaging/build-deb --target aarch64-unknown-linux-gnu",
    };
    let name = format!("lockbridge_{}-1_{arch}.deb", env!("CARGO_PKG_VERSION"));
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/debian")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `{build}` (tests/run.sh does)",
        path.display()
    );
    path
}

pub struct World {
    _dir: tempfile::TempDir,
    pub dir: PathBuf,
    pub summary: Value,
    pub bin: Binary,
}

impl World {
    /// A demo world with `locks` locks, instant links and short motor time; `edit` changes
    /// sim.toml (as a TOML table) before anything runs.
    pub fn new(locks: usize, edit: impl FnOnce(&mut toml::Table)) -> World {
        World::with_binary(Binary::this_build(), locks, edit)
    }

    /// [`World::new`], with every lockbridge process started from `bin`.
    pub fn with_binary(bin: Binary, locks: usize, edit: impl FnOnce(&mut toml::Table)) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("w");
        let out = bin.run(&[
            "demo",
            "--setup-only",
            "--json",
            "--dir",
            dir.to_str().unwrap(),
            "--locks",
            &locks.to_string(),
            "--connection-interval-ms",
            "0",
        ]);
        let summary: Value = serde_json::from_str(&out).unwrap();
        let sim_path = PathBuf::from(summary["sim_config"].as_str().unwrap());
        let mut sim: toml::Table = std::fs::read_to_string(&sim_path).unwrap().parse().unwrap();
        for lock in sim["lock"].as_array_mut().unwrap() {
            let b = lock
                .as_table_mut()
                .unwrap()
                .entry("behaviour")
                .or_insert(toml::Value::Table(Default::default()));
            b.as_table_mut()
                .unwrap()
                .insert("motor_time_ms".into(), toml::Value::Integer(300));
        }
        edit(&mut sim);
        std::fs::write(&sim_path, toml::to_string(&sim).unwrap()).unwrap();
        World {
            _dir: tmp,
            dir,
            summary,
            bin,
        }
    }

    pub fn daemon_config(&self) -> PathBuf {
        PathBuf::from(self.summary["daemon_config"].as_str().unwrap())
    }

    pub fn edit_daemon_config(&self, f: impl FnOnce(String) -> String) {
        let path = self.daemon_config();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, f(text)).unwrap();
    }

    pub fn control(&self) -> PathBuf {
        PathBuf::from(self.summary["control_socket"].as_str().unwrap())
    }

    /// Make the daemon reach its locks through BlueZ on `adapter`.
    pub fn use_ble(&self, adapter: &str) {
        self.edit_daemon_config(|t| {
            t.replace(
                "transport = \"sim\"",
                &format!("transport = \"ble\"\nadapter = \"{adapter}\""),
            )
        });
    }

    /// Serve the locks as BLE peripherals on `adapters` (one each) of the emulator.
    pub fn sim_ble(&self, emu: &Emulator, adapters: &str) -> Proc {
        let log_path = self.dir.join(format!("sim-ble-{}.log", unique()));
        let child = self
            .bin
            .command()
            .args([
                "sim",
                "--config",
                self.summary["sim_config"].as_str().unwrap(),
                "--ble",
                "--adapter",
                adapters,
            ])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &emu.address)
            .env("LOCKBRIDGE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        let locks = self.summary["locks"].as_array().unwrap().len();
        wait_for(
            || {
                std::fs::read_to_string(&log_path)
                    .unwrap_or_default()
                    .matches("served on")
                    .count()
                    >= locks
            },
            "the BLE simulator to advertise",
        );
        Proc(child)
    }

    pub fn sim(&self) -> Proc {
        let endpoint = self.summary["sim_endpoint"].as_str().unwrap();
        let socket = PathBuf::from(endpoint.strip_prefix("unix:").unwrap());
        let _ = std::fs::remove_file(&socket);
        let child = self
            .bin
            .command()
            .args([
                "sim",
                "--config",
                self.summary["sim_config"].as_str().unwrap(),
                "--listen",
                endpoint,
            ])
            .env("LOCKBRIDGE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("sim-{}.log", unique()))).unwrap())
            .spawn()
            .unwrap();
        wait_for(|| socket.exists(), "the simulator socket");
        Proc(child)
    }

    pub fn daemon_with_env(&self, env: &[(&str, &str)]) -> Proc {
        let log = std::fs::File::create(self.dir.join(format!(
            "daemon-{}.log",
            Instant::now().elapsed().as_nanos()
        )))
        .unwrap();
        let mut cmd = self.bin.command();
        cmd.args(["run", "--config", self.daemon_config().to_str().unwrap()])
            .env("LOCKBRIDGE_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let control = self.control();
        wait_for(
            || std::os::unix::net::UnixStream::connect(&control).is_ok(),
            "the daemon's control socket",
        );
        Proc(child)
    }

    pub fn daemon(&self) -> Proc {
        self.daemon_with_env(&[])
    }

    /// Replace the demo's CoAP section and permissions: CoAP on a free loopback port (returned),
    /// `full` (key [`PSK`]) may do everything, `reader` (key [`READER_PSK`]) may only read;
    /// `extra` goes into `[coap]`.
    pub fn serve_coap(&self, extra: &str) -> u16 {
        let port = free_udp_port();
        self.edit_daemon_config(|t| {
            let t = t.split("\n[coap]").next().unwrap_or_default().to_string();
            format!(
                "{t}\n[coap]\nlisten = \"127.0.0.1:{port}\"\n{extra}\n\
                 [[coap.clients]]\nidentity = \"full\"\npsk_hex = \"{}\"\n\
                 [[coap.clients]]\nidentity = \"reader\"\npsk_hex = \"{}\"\n\
                 [[permissions]]\norigin = \"cli\"\nactions = [\"read\", \"lock\", \"unlock\", \"pull\"]\n\
                 [[permissions]]\norigin = \"full\"\nactions = [\"read\", \"lock\", \"unlock\", \"pull\"]\n\
                 [[permissions]]\norigin = \"reader\"\nactions = [\"read\"]\n",
                hex(PSK),
                hex(READER_PSK)
            )
        });
        port
    }

    /// Everything the daemons of this world wrote to their logs.
    pub fn daemon_log(&self) -> String {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("daemon-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    }

    /// Wait until the daemons' logs hold `needle` at least `times` times.
    pub fn wait_log(&self, needle: &str, times: usize) {
        wait_for(
            || self.daemon_log().matches(needle).count() >= times,
            &format!("{times} × {needle:?} in the daemon's log"),
        );
    }

    /// A read of `lock` through the control socket, to its outcome (whichever): everything the
    /// lock's session had to do before it is done, since commands run one at a time per lock.
    pub async fn barrier(&self, lock: &str) {
        let reports = self.command(lock, Action::Read, None, Some(60)).await;
        outcome(&reports);
    }

    /// Everything the simulators of this world (over the sim socket) wrote to their logs.
    pub fn sim_log(&self) -> String {
        let mut logs: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("sim-"))
            .map(|e| e.path())
            .collect();
        logs.sort();
        logs.iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// The lock's record of every actuating command it received.
    pub fn actuations(&self) -> Vec<Value> {
        let path = self.dir.join("events.jsonl");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub async fn command(
        &self,
        lock: &str,
        action: Action,
        id: Option<&str>,
        ttl_s: Option<u64>,
    ) -> Vec<Report> {
        let mut c = ControlClient::connect(&self.control()).await.unwrap();
        c.command(&Request::Command {
            lock: lock.into(),
            action,
            mode: Mode::Normal,
            id: id.map(str::to_string),
            ttl_s,
        })
        .await
        .unwrap()
    }

    /// `action` on `lock` through the control socket (30 s to live), which must succeed.
    pub async fn succeed(&self, lock: &str, action: Action) {
        let reports = self.command(lock, action, None, Some(30)).await;
        assert!(
            matches!(outcome(&reports), Outcome::Success { .. }),
            "{action:?} {lock}: {reports:?}"
        );
    }

    pub async fn locks(&self) -> Vec<Value> {
        let mut c = ControlClient::connect(&self.control()).await.unwrap();
        c.request(&Request::Locks).await.unwrap();
        c.line().await.unwrap().as_array().unwrap().clone()
    }

    /// [`World::wait_status`] for tests without a runtime of their own.
    pub fn wait_status_blocking(&self, lock: &str, status: &str, limit: Duration) {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(self.wait_status(lock, status, limit));
    }

    pub async fn wait_status(&self, lock: &str, status: &str, limit: Duration) {
        let t = Instant::now();
        loop {
            let locks = self.locks().await;
            let v = locks.iter().find(|v| v["id"] == lock).unwrap();
            // "connected" in a test means the first refresh is in: GET_STATE and GET_BATTERY.
            let refreshed = !v["state"].is_null() && !v["battery"].is_null();
            if v["status"] == status && (status != "connected" || refreshed) {
                return;
            }
            assert!(t.elapsed() < limit, "{lock} never reached {status}: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The daemon and simulator of a world with CoAP on loopback (the identities of
/// [`World::serve_coap`]).
pub struct Gateway {
    pub world: World,
    pub addr: std::net::SocketAddr,
    pub sim: Proc,
    pub daemon: Proc,
}

impl Gateway {
    /// `locks` locks; `coap` goes into `[coap]`, `more` at the end of the daemon's config
    /// (further clients and permissions).
    pub fn start(locks: usize, coap: &str, more: &str) -> Gateway {
        let world = World::new(locks, |_| {});
        let port = world.serve_coap(coap);
        if !more.is_empty() {
            world.edit_daemon_config(|t| format!("{t}\n{more}\n"));
        }
        let sim = world.sim();
        let daemon = world.daemon();
        Gateway {
            world,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            sim,
            daemon,
        }
    }
}

/// A webrtc-dtls client configuration for a PSK identity (TLS_PSK_WITH_AES_128_GCM_SHA256,
/// extended master secret).
pub fn psk_dtls_config(identity: &str, key: &'static str) -> webrtc_dtls::config::Config {
    use webrtc_dtls::cipher_suite::CipherSuiteId;
    use webrtc_dtls::config::{Config, ExtendedMasterSecretType};
    Config {
        psk: Some(std::sync::Arc::new(move |_: &[u8]| {
            Ok(key.as_bytes().to_vec())
        })),
        psk_identity_hint: Some(identity.as_bytes().to_vec()),
        cipher_suites: vec![CipherSuiteId::Tls_Psk_With_Aes_128_Gcm_Sha256],
        extended_master_secret: ExtendedMasterSecretType::Require,
        server_name: "lockbridge".into(),
        ..Default::default()
    }
}

/// The test certificates of `tests/certs/gen_certs.py` (Python `cryptography`, from the
/// `.venv` tests/run.sh makes) written into `dir`, which is returned.
pub fn gen_certs(dir: &Path) -> PathBuf {
    let python = std::env::var_os("LOCKBRIDGE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3"));
    let status = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/certs/gen_certs.py"))
        .arg(dir)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run tests/run.sh (it makes .venv)",
                python.display()
            )
        });
    assert!(status.success(), "gen_certs.py");
    dir.to_path_buf()
}

/// Keys of the CoAP clients [`World::serve_coap`] configures (printable, as libcoap wants).
pub const PSK: &str = "lockbridge-test-psk-0001";
pub const READER_PSK: &str = "lockbridge-reader-psk-01";

pub fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Proc(pub Child);

impl Proc {
    pub fn signal(&self, sig: &str) {
        assert!(
            Command::new("kill")
                .args([sig, &self.0.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < limit, "process did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn lockbridge(args: &[&str]) -> String {
    Binary::this_build().run(args)
}

pub fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn outcome(reports: &[Report]) -> &Outcome {
    let done: Vec<&Outcome> = reports.iter().filter_map(Report::outcome).collect();
    assert_eq!(done.len(), 1, "exactly one terminal outcome: {reports:?}");
    done[0]
}

pub fn set_lock(sim: &mut toml::Table, index: usize, key: &str, value: toml::Value) {
    let lock = sim["lock"].as_array_mut().unwrap()[index]
        .as_table_mut()
        .unwrap();
    lock["behaviour"]
        .as_table_mut()
        .unwrap()
        .insert(key.into(), value);
}

pub fn set_faults(sim: &mut toml::Table, values: &[(&str, toml::Value)]) {
    let faults = sim
        .entry("faults")
        .or_insert(toml::Value::Table(Default::default()));
    for (k, v) in values {
        faults
            .as_table_mut()
            .unwrap()
            .insert(k.to_string(), v.clone());
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A private system bus with BlueZoo (a user-space BlueZ with virtual adapters that see each
/// other): `hci0`, `hci1`, … Everything is stopped when this is dropped.
pub struct Emulator {
    _dir: tempfile::TempDir,
    pub address: String,
    _bluezoo: Proc,
    _dbus: Proc,
}

impl Emulator {
    pub fn start(adapters: usize) -> Emulator {
        // BlueZoo through tests/bluezoo_gatt_cache.py: a device's GATT objects are kept across
        // its connections, as BlueZ keeps them (BlueZoo alone cannot connect a device twice).
        let python = std::env::var_os("LOCKBRIDGE_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3"));
        let shim = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bluezoo_gatt_cache.py");
        let has_bluezoo = Command::new(&python)
            .args(["-c", "import bluezoo"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            has_bluezoo,
            "BlueZoo not importable by {}: run tests/run.sh (it installs bluezoo into .venv), or `pip install bluezoo` and set LOCKBRIDGE_PYTHON",
            python.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("system_bus_socket");
        let conf = dir.path().join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/>
    <allow send_type="method_call"/><allow send_type="signal"/>
    <allow send_type="method_return"/><allow send_type="error"/>
    <allow receive_type="method_call"/><allow receive_type="signal"/>
    <allow receive_type="method_return"/><allow receive_type="error"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .unwrap();
        let dbus = Command::new("dbus-daemon")
            .args(["--nofork", "--config-file", conf.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "dbus-daemon: {e}; install it with `apt-get install dbus` (tests/run.sh does)"
                )
            });
        let dbus = Proc(dbus);
        wait_for(|| socket.exists(), "the private D-Bus socket");
        let address = format!("unix:path={}", socket.display());
        let log_path = dir.path().join("bluezoo.log");
        let mut cmd = Command::new(&python);
        cmd.arg(&shim)
            .args(["--auto-enable", "--scan-interval", "1"]);
        for i in 0..adapters {
            cmd.args(["-a", &format!("00:AA:00:00:00:{:02X}", i + 1)]);
        }
        let child = cmd
            .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        let bluezoo = Proc(child);
        wait_for(
            || {
                std::fs::read_to_string(&log_path)
                    .unwrap_or_default()
                    .matches("Adding adapter")
                    .count()
                    >= adapters
            },
            "BlueZoo's adapters",
        );
        // Adapters are powered right after they are added: wait until each says so.
        for i in 0..adapters {
            let path = format!("/org/bluez/hci{i}");
            wait_for(
                || {
                    Command::new("busctl")
                        .args(["--address", &address, "get-property", "org.bluez", &path])
                        .args(["org.bluez.Adapter1", "Powered"])
                        .output()
                        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "b true")
                },
                "BlueZoo's adapters to be powered",
            );
        }
        Emulator {
            _dir: dir,
            address,
            _bluezoo: bluezoo,
            _dbus: dbus,
        }
    }
}

/// Every message on a bus, one line each (`dbus-monitor --profile`): what each process asked
/// of BlueZ, counted by the tests and the BLE benchmark.
pub struct BusLog {
    _monitor: Proc,
    path: PathBuf,
}

/// One method call seen on the bus.
pub struct Call {
    pub at: f64,
    pub sender: String,
    pub path: String,
    /// `Interface.Member`, the interface without its namespace: `Device1.Connect`.
    pub member: String,
}

impl BusLog {
    pub fn start(address: &str, path: &Path) -> BusLog {
        let child = Command::new("dbus-monitor")
            .args(["--address", address, "--profile"])
            .stdout(std::fs::File::create(path).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("dbus-monitor: {e}; tests/run.sh installs it (package dbus-bin)")
            });
        BusLog {
            _monitor: Proc(child),
            path: path.to_path_buf(),
        }
    }

    /// Method calls (`mc` lines: type, time, serial, sender, destination, path, interface,
    /// member).
    pub fn calls(&self) -> Vec<Call> {
        std::fs::read_to_string(&self.path)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() >= 8 && f[0] == "mc").then(|| Call {
                    at: f[1].parse().unwrap(),
                    sender: f[3].to_string(),
                    path: f[5].to_string(),
                    member: format!("{}.{}", f[6].rsplit('.').next().unwrap(), f[7]),
                })
            })
            .collect()
    }

    /// The daemon's connection: the one that asks BlueZ to connect a device.
    pub fn daemon(&self) -> Option<String> {
        self.calls()
            .into_iter()
            .find(|c| c.member == "Device1.Connect")
            .map(|c| c.sender)
    }
}

/// Now as Unix seconds, the clock `dbus-monitor` stamps messages with.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
