//! What the benchmarks share: a world with its simulator and daemon either as processes or in
//! the bench's own process, child processes that die with the bench, and the small figures
//! helpers.

#![allow(dead_code, clippy::unwrap_used)] // each benchmark uses a different subset

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockbridge::config::Config;
use lockbridge::fault::FaultConfig;
use lockbridge::sim::config::SimConfig;
use lockbridge::sim::model::LockSpec;
use lockbridge::sim::serve::{Listener, SimWorld, serve};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_lockbridge")
}

/// A child process, killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The multi-threaded runtime every benchmark runs on: two workers, like the target machine.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// VmRSS and VmHWM of a process, in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `lockbridge demo --setup-only --json` for `locks` instant-link locks in `dir`: the summary.
pub fn demo_world(dir: &Path, locks: usize) -> serde_json::Value {
    let out = Command::new(bin())
        .args([
            "demo",
            "--setup-only",
            "--json",
            "--connection-interval-ms",
            "0",
        ])
        .args([
            "--locks",
            &locks.to_string(),
            "--dir",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "demo --setup-only");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `lockbridge sim` and `lockbridge run` for a world's summary, as processes; returns once the
/// simulator's socket is there (the daemon is still starting).
pub async fn sim_and_daemon(summary: &serde_json::Value) -> (Proc, Proc) {
    let endpoint = summary["sim_endpoint"].as_str().unwrap();
    let sim = Proc(
        Command::new(bin())
            .args(["sim", "--config", summary["sim_config"].as_str().unwrap()])
            .args(["--listen", endpoint])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let sock = Path::new(endpoint.strip_prefix("unix:").unwrap()).to_path_buf();
    while !sock.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let daemon = Proc(
        Command::new(bin())
            .args([
                "run",
                "--config",
                summary["daemon_config"].as_str().unwrap(),
            ])
            .env("LOCKBRIDGE_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    (sim, daemon)
}

/// A two-lock world, its simulator and the daemon, all in this process.
pub struct Rig {
    _dir: tempfile::TempDir,
    /// The simulator's record of every actuation (docs/simulator.md).
    pub event_log: std::path::PathBuf,
    pub daemon: Option<lockbridge::daemon::Daemon>,
    stop_sim: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Rig {
    /// `interval_ms`: the simulated BLE connection interval; `mqtt`: a broker for the daemon;
    /// `config` edits the daemon's config text, `locks` the simulated locks.
    pub async fn new(
        interval_ms: u64,
        mqtt: Option<&str>,
        config: impl FnOnce(String) -> String,
        locks: impl FnOnce(&mut [LockSpec]),
    ) -> Rig {
        Rig::with_loss(interval_ms, 0.0, mqtt, config, locks).await
    }

    /// [`Rig::new`] with `loss` of the values on every sim link, each way.
    pub async fn with_loss(
        interval_ms: u64,
        loss: f64,
        mqtt: Option<&str>,
        config: impl FnOnce(String) -> String,
        locks: impl FnOnce(&mut [LockSpec]),
    ) -> Rig {
        Rig::with_faults(interval_ms, |f| f.loss = loss, mqtt, config, locks).await
    }

    /// [`Rig::new`] with the sim links' faults and BLE timing edited by `faults`.
    pub async fn with_faults(
        interval_ms: u64,
        faults: impl FnOnce(&mut FaultConfig),
        mqtt: Option<&str>,
        config: impl FnOnce(String) -> String,
        locks: impl FnOnce(&mut [LockSpec]),
    ) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("w");
        let broker = mqtt.map(|addr| lockbridge::demo::DemoBroker {
            addr: addr.to_string(),
            protocol: "5",
        });
        let summary = lockbridge::demo::setup(&dir, 2, interval_ms, broker.as_ref()).unwrap();
        let text = std::fs::read_to_string(&summary.daemon_config).unwrap();
        std::fs::write(&summary.daemon_config, config(text)).unwrap();
        let (mut sim, mut specs) = SimConfig::load(&summary.world.sim_config).unwrap();
        faults(&mut sim.faults);
        locks(&mut specs);
        let event_log = sim.event_log.clone().unwrap();
        let listener = Listener::bind(&summary.sim_endpoint.parse().unwrap())
            .await
            .unwrap();
        let (stop_sim, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(
            SimWorld {
                locks: specs,
                faults: sim.faults,
                chaos: Default::default(),
                event_log: Some(event_log.clone()),
                seed: 1,
            },
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        let config = Config::load(&summary.daemon_config).unwrap();
        let key = lockbridge::keys::load(&config.key_path()).unwrap();
        let daemon = lockbridge::daemon::start(config, key).await.unwrap();
        Rig {
            _dir: tmp,
            event_log,
            daemon: Some(daemon),
            stop_sim: Some(stop_sim),
        }
    }

    pub fn sup(&self) -> std::sync::Arc<lockbridge::supervisor::Supervisor> {
        self.daemon.as_ref().unwrap().supervisor.clone()
    }

    /// Wait until `lock`'s view satisfies `f` (30 s at most).
    pub async fn wait(&self, lock: &str, f: impl Fn(&lockbridge::registry::LockView) -> bool) {
        let t = Instant::now();
        while !self.sup().registry().get(lock).is_some_and(|v| f(&v)) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{lock} did not get ready"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn stop(mut self) {
        self.daemon.take().unwrap().stop().await;
        let _ = self.stop_sim.take().unwrap().send(());
    }
}
