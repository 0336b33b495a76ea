//! The simulator's world file, `sim.toml`: which locks exist, their keys, the authority they
//! trust, how they behave, the link faults and the event log.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::chaos::ChaosConfig;
use super::model::{Behaviour, LockSpec, MAX_SCRIPT_MS, MAX_SCRIPT_STEPS, ScriptStep};
use crate::fault::FaultConfig;
use crate::keys;
use crate::ptls::gatt;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// JSON-lines file that records every actuating command (relative to this file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_log: Option<PathBuf>,
    /// Seed for jams and other random behaviour.
    #[serde(default)]
    pub seed: u64,
    /// Faults applied to every link (values in both directions).
    #[serde(default)]
    pub faults: FaultConfig,
    /// Faults at random times: loss bursts, disconnects, reboots, lost clocks (sim socket only).
    #[serde(default, skip_serializing_if = "is_off")]
    pub chaos: ChaosConfig,
    #[serde(rename = "lock")]
    pub locks: Vec<LockConfig>,
}

fn is_off(chaos: &ChaosConfig) -> bool {
    *chaos == ChaosConfig::default()
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockConfig {
    /// 14 digits, `12345678-901234`.
    pub serial: String,
    pub device_id: u32,
    /// The lock's long-term key (PEM, mode 0600), relative to this file.
    pub key_file: PathBuf,
    /// The authority whose certificates and signed times the lock trusts (base64 point).
    pub authority_public_key: String,
    #[serde(default)]
    pub behaviour: Behaviour,
    /// Door openings and button presses at set times (`[[lock.script]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub script: Vec<ScriptStep>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: lock[{index}].{field}: {message}")]
    Lock {
        path: PathBuf,
        index: usize,
        field: &'static str,
        message: String,
    },
}

impl SimConfig {
    pub fn load(path: &Path) -> Result<(SimConfig, Vec<LockSpec>), SimConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: SimConfig = toml::from_str(&text).map_err(|e| SimConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config
            .faults
            .validate()
            .map_err(|message| SimConfigError::Parse {
                path: path.to_path_buf(),
                message,
            })?;
        config
            .chaos
            .validate()
            .map_err(|message| SimConfigError::Parse {
                path: path.to_path_buf(),
                message,
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(log) = &config.event_log {
            config.event_log = Some(base.join(log));
        }
        let specs = config.lock_specs(path, base)?;
        Ok((config, specs))
    }

    fn lock_specs(&self, path: &Path, base: &Path) -> Result<Vec<LockSpec>, SimConfigError> {
        let mut seen = BTreeSet::new();
        let mut specs = Vec::new();
        for (index, l) in self.locks.iter().enumerate() {
            let err = |field, message: String| SimConfigError::Lock {
                path: path.to_path_buf(),
                index,
                field,
                message,
            };
            gatt::serial_digits(&l.serial).map_err(|e| err("serial", e.to_string()))?;
            if !seen.insert(l.serial.clone()) {
                return Err(err("serial", format!("{} appears twice", l.serial)));
            }
            let key =
                keys::load(&base.join(&l.key_file)).map_err(|e| err("key_file", e.to_string()))?;
            let authority = keys::parse_public_b64(&l.authority_public_key)
                .map_err(|e| err("authority_public_key", e.to_string()))?;
            if !(0.0..=1.0).contains(&l.behaviour.jam_probability) {
                return Err(err("behaviour.jam_probability", "must be in 0..=1".into()));
            }
            if l.behaviour.att_mtu < crate::ptls::wire::MIN_ATT_MTU {
                return Err(err("behaviour.att_mtu", "must be at least 156".into()));
            }
            if l.script.len() > MAX_SCRIPT_STEPS {
                return Err(err(
                    "script",
                    format!("{} steps; at most {MAX_SCRIPT_STEPS}", l.script.len()),
                ));
            }
            if let Some(step) = l.script.iter().find(|s| s.after_ms > MAX_SCRIPT_MS) {
                return Err(err(
                    "script.after_ms",
                    format!("{} is more than 30 days ({MAX_SCRIPT_MS})", step.after_ms),
                ));
            }
            specs.push(LockSpec {
                serial: l.serial.clone(),
                device_id: l.device_id,
                key,
                authority,
                behaviour: l.behaviour.clone(),
                script: l.script.clone(),
            });
        }
        Ok(specs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc_files() -> Vec<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("etc/ exists")
            .map(|e| e.expect("readable entry").path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("sim"))
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn every_shipped_simulator_world_parses_and_unknown_keys_are_rejected() {
        let files = etc_files();
        assert!(!files.is_empty());
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            let config: SimConfig =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!config.locks.is_empty());
            keys::parse_public_b64(&config.locks[0].authority_public_key).unwrap();
            for (table, extra) in [("", "colour = 1\n"), ("[lock.behaviour]", "colour = 1\n")] {
                let bad = if table.is_empty() {
                    format!("{extra}{text}")
                } else {
                    format!("{text}{extra}")
                };
                let err = toml::from_str::<SimConfig>(&bad).unwrap_err().to_string();
                assert!(err.contains("colour"), "{}: {err}", path.display());
            }
        }
    }
}
