//! The lock simulator: [`model::Lock`] (a sans-IO lock behind `ptls::Server`), served in-process
//! or over the sim socket ([`serve`], format in [`wire`]), configured by `sim.toml`
//! ([`config`]), and [`init`] to write a ready world.

pub mod ble;
pub mod chaos;
pub mod config;
pub mod model;
pub mod serve;
pub mod wire;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::authority::Authority;
use crate::keys::{self, KeyError};
use config::{LockConfig, SimConfig};
use model::Behaviour;

/// The JSON-lines event log of actuations (or nothing when no file is configured).
pub struct EventLog(Option<std::fs::File>);

impl EventLog {
    pub fn open(path: Option<&Path>) -> std::io::Result<EventLog> {
        let file = match path {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => None,
        };
        Ok(EventLog(file))
    }

    /// Append each actuation as one line and flush. A log that cannot be written is reported,
    /// not fatal: the locks go on.
    pub fn write(&mut self, actuations: &[model::Actuation]) {
        use std::io::Write;
        for a in actuations {
            log::info!(
                "sim: {}: {} mode {} -> {} ({})",
                a.lock,
                a.command,
                a.mode,
                a.result,
                a.state
            );
            if let Some(f) = self.0.as_mut() {
                let line = serde_json::to_string(a).unwrap_or_default();
                if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
                    log::error!("sim: event log: {e}");
                }
            }
        }
    }
}

/// What `lockbridge sim init` prints.
#[derive(Debug, Serialize)]
pub struct InitSummary {
    pub sim_config: PathBuf,
    pub authority: PathBuf,
    pub locks: Vec<InitLock>,
}

#[derive(Debug, Serialize)]
pub struct InitLock {
    pub serial: String,
    pub device_id: u32,
    pub public_key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: already holds a simulator world (sim.toml); choose an empty directory")]
    Exists(PathBuf),
}

/// The serial of the n-th simulated lock (0-based): `10000000-000001`, `10000000-000002`, ….
pub fn serial_for(n: usize) -> String {
    format!("10000000-{:06}", n + 1)
}

/// Write a ready world into `dir`: an authority, `locks` lock keys and `sim.toml`. Locks start
/// calibrated, locked, registered and with trusted time.
pub fn init(dir: &Path, locks: usize) -> Result<InitSummary, InitError> {
    let sim_config = dir.join("sim.toml");
    if sim_config.exists() {
        return Err(InitError::Exists(dir.to_path_buf()));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InitError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let authority_dir = dir.join("authority");
    let authority = Authority::init(&authority_dir)?;
    let authority_public = keys::public_b64(authority.public_key());
    let mut config = SimConfig {
        event_log: Some(PathBuf::from("events.jsonl")),
        seed: 1,
        faults: Default::default(),
        chaos: Default::default(),
        locks: Vec::new(),
    };
    let mut summary = InitSummary {
        sim_config: sim_config.clone(),
        authority: authority_dir,
        locks: Vec::new(),
    };
    for n in 0..locks {
        let serial = serial_for(n);
        let key_file = PathBuf::from("locks").join(format!("{serial}.key"));
        let key = keys::generate(&dir.join(&key_file))?;
        let device_id = 1001 + u32::try_from(n).unwrap_or(u32::MAX - 1001);
        summary.locks.push(InitLock {
            serial: serial.clone(),
            device_id,
            public_key: keys::public_b64(key.verifying_key()),
        });
        config.locks.push(LockConfig {
            serial,
            device_id,
            key_file,
            authority_public_key: authority_public.clone(),
            behaviour: Behaviour::default(),
            script: Vec::new(),
        });
    }
    write_config(&sim_config, &config)?;
    Ok(summary)
}

/// Write `sim.toml` with a header that says what it is.
pub fn write_config(path: &Path, config: &SimConfig) -> Result<(), InitError> {
    let body = toml::to_string_pretty(config).map_err(|e| InitError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    let text = format!(
        "# lockbridge simulator world (see docs/simulator.md for every key).\n\
         # Serve it with: lockbridge sim --config {} --listen unix:/tmp/lockbridge-sim.sock\n\n{body}",
        path.display()
    );
    std::fs::write(path, text).map_err(|source| InitError::Io {
        path: path.to_path_buf(),
        source,
    })
}
