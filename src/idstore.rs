//! Command ids remembered across daemon restarts (design §3): a repeated id returns the first
//! outcome and never actuates twice.
//!
//! An append-only JSON-lines file in the state directory. Before an actuating command is
//! written to a lock its id is appended as `sent` and flushed to disk (fsync); the terminal
//! outcome is appended when it is known. After a crash, an id that was `sent` but never `done`
//! is settled as `ambiguous` — it is never sent again. A torn last line is ignored. The file is
//! compacted at start, dropping ids older than the retention.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::command::{Action, Outcome};

pub const FILE_NAME: &str = "commands.jsonl";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub lock: String,
    pub action: Action,
    /// Unix ms when the id was first recorded.
    pub t_ms: u64,
    /// `None` while the command is in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

pub struct IdStore {
    path: PathBuf,
    file: File,
    entries: HashMap<String, Entry>,
    retention_ms: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("command-id store {path}: {source}")]
pub struct StoreError {
    path: PathBuf,
    source: std::io::Error,
}

impl IdStore {
    /// Open (or create) the store in `dir`, settle what a crash left in flight, and compact.
    pub fn open(dir: &Path, retention_ms: u64, now_ms: u64) -> Result<IdStore, StoreError> {
        let path = dir.join(FILE_NAME);
        let err = |source| StoreError {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(err)?;
        let mut entries: HashMap<String, Entry> = HashMap::new();
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                // A torn last line (crash mid-write) does not parse and is dropped.
                let Ok(e) = serde_json::from_str::<Entry>(&line) else {
                    continue;
                };
                match entries.get_mut(&e.id) {
                    Some(old) if old.outcome.is_none() => old.outcome = e.outcome,
                    Some(_) => {}
                    None => {
                        entries.insert(e.id.clone(), e);
                    }
                }
            }
        }
        entries.retain(|_, e| now_ms.saturating_sub(e.t_ms) < retention_ms);
        let mut settled = 0;
        for e in entries.values_mut() {
            if e.outcome.is_none() {
                e.outcome = Some(Outcome::Ambiguous {
                    state: None,
                    reason: "the daemon stopped while the command was in flight".into(),
                });
                settled += 1;
            }
        }
        if settled > 0 {
            log::warn!(
                "{settled} command(s) were in flight when the daemon stopped: settled as ambiguous"
            );
        }
        // Compact: write the live entries to a new file and rename it over the old one.
        let tmp = dir.join(format!("{FILE_NAME}.tmp"));
        {
            let mut f = File::create(&tmp).map_err(err)?;
            let mut sorted: Vec<&Entry> = entries.values().collect();
            sorted.sort_by_key(|e| e.t_ms);
            for e in sorted {
                let line = serde_json::to_string(e).map_err(|e| err(e.into()))?;
                writeln!(f, "{line}").map_err(err)?;
            }
            f.sync_all().map_err(err)?;
        }
        fs::rename(&tmp, &path).map_err(err)?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        let file = OpenOptions::new().append(true).open(&path).map_err(err)?;
        Ok(IdStore {
            path,
            file,
            entries,
            retention_ms,
        })
    }

    pub fn get(&self, id: &str, now_ms: u64) -> Option<&Entry> {
        self.entries
            .get(id)
            .filter(|e| now_ms.saturating_sub(e.t_ms) < self.retention_ms)
    }

    /// Record that `id` is about to be written to the lock; durable before it returns.
    pub fn record_sent(
        &mut self,
        id: &str,
        lock: &str,
        action: Action,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let e = Entry {
            id: id.to_string(),
            lock: lock.to_string(),
            action,
            t_ms: now_ms,
            outcome: None,
        };
        self.append(&e)?;
        self.entries.insert(e.id.clone(), e);
        Ok(())
    }

    /// Record the terminal outcome of `id`.
    pub fn record_done(
        &mut self,
        id: &str,
        lock: &str,
        action: Action,
        outcome: &Outcome,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let t_ms = self.entries.get(id).map_or(now_ms, |e| e.t_ms);
        let e = Entry {
            id: id.to_string(),
            lock: lock.to_string(),
            action,
            t_ms,
            outcome: Some(outcome.clone()),
        };
        self.append(&e)?;
        self.entries.insert(e.id.clone(), e);
        Ok(())
    }

    fn append(&mut self, e: &Entry) -> Result<(), StoreError> {
        let err = |source| StoreError {
            path: self.path.clone(),
            source,
        };
        let line = serde_json::to_string(e).map_err(|e| err(e.into()))?;
        self.file
            .write_all(format!("{line}\n").as_bytes())
            .map_err(err)?;
        self.file.sync_data().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    #[test]
    fn outcomes_survive_a_restart_and_in_flight_ids_settle_ambiguous() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = IdStore::open(dir.path(), DAY, 1_000).unwrap();
            s.record_sent("a", "front", Action::Unlock, 1_000).unwrap();
            s.record_done("a", "front", Action::Unlock, &Outcome::Expired, 1_100)
                .unwrap();
            s.record_sent("b", "front", Action::Lock, 1_200).unwrap();
            // crash: no outcome for b
        }
        let s = IdStore::open(dir.path(), DAY, 2_000).unwrap();
        assert_eq!(s.get("a", 2_000).unwrap().outcome, Some(Outcome::Expired));
        assert!(matches!(
            s.get("b", 2_000).unwrap().outcome,
            Some(Outcome::Ambiguous { .. })
        ));
        assert!(s.get("c", 2_000).is_none());
    }

    #[test]
    fn torn_last_line_is_ignored_and_old_ids_expire() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = IdStore::open(dir.path(), DAY, 1_000).unwrap();
            s.record_sent("old", "x", Action::Lock, 1_000).unwrap();
            s.record_done("old", "x", Action::Lock, &Outcome::Expired, 1_000)
                .unwrap();
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE_NAME))
            .unwrap();
        f.write_all(b"{\"id\":\"torn\",\"lo").unwrap();
        let s = IdStore::open(dir.path(), DAY, 1_000 + DAY - 1).unwrap();
        assert!(
            s.get("old", 1_000 + DAY - 1).is_some(),
            "kept for a full day"
        );
        assert!(s.get("torn", 1_000).is_none());
        let s = IdStore::open(dir.path(), DAY, 1_000 + DAY + 1).unwrap();
        assert!(s.get("old", 1_000 + DAY + 1).is_none());
    }
}
