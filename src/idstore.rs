//! Command ids remembered across daemon restarts (design §3): a repeated id returns the first
//! outcome and never actuates twice.
//!
//! An append-only JSON-lines file in the state directory. Before an actuating command is
//! written to a lock its id is appended as `sent` and flushed to disk (fsync); the terminal
//! outcome is appended when it is known (flushed too for an actuating command; a read's outcome
//! is written but not flushed: it survives a daemon crash in the page cache, and one lost with
//! the power only lets a repeat of that read run again, which moves nothing). After a crash, an
//! id that was `sent` but never `done` is settled as `ambiguous` — it is never sent again.
//!
//! The file is compacted at start (ids older than the retention dropped) and begins with a
//! header that counts the entries written by that compaction, so a file cut short is noticed.
//! Damage never costs a good line: a line that does not parse is skipped, counted and named in
//! a warning, every other line is kept, and a damaged file is copied aside before compaction
//! rewrites it. A torn last line (a crash mid-append) is reported but loses nothing: its
//! command had not been sent, or its `sent` line came first.
//!
//! The entries in memory are the truth for this run: they are updated before the disk is, so
//! an id whose record could not be written is still known until the daemon stops.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::command::{Action, Mode, Outcome};

pub const FILE_NAME: &str = "commands.jsonl";

/// The first line of a compacted store.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    lockbridge_command_ids: u32,
    /// Entry lines the compaction wrote after this one.
    entries: usize,
}

const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    /// Who sent it. Missing in stores written before ids were scoped: such an entry answers
    /// for its id whatever the origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    pub lock: String,
    pub action: Action,
    /// Missing in older stores: then any mode matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Unix ms when the id was first recorded.
    pub t_ms: u64,
    /// `None` while the command is in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

impl Entry {
    /// Whether `lock`, `action` and `mode` are the command this entry recorded.
    pub fn same_command(&self, lock: &str, action: Action, mode: Mode) -> bool {
        self.lock == lock && self.action == action && self.mode.is_none_or(|m| m == mode)
    }
}

/// What opening the store found wrong with the file (all empty for a healthy one).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Health {
    /// 1-based numbers of lines that did not parse and were skipped.
    pub bad_lines: Vec<usize>,
    /// The last line was cut mid-write (a crash while appending).
    pub torn_tail: bool,
    /// Why the file looks cut short (fewer entries than its header counts, or no header).
    pub truncated: Option<String>,
    /// Where the damaged file was copied before compaction.
    pub moved_aside: Option<PathBuf>,
    /// Appends that failed since start (disk full, I/O error).
    pub write_failures: u64,
}

pub struct IdStore {
    path: PathBuf,
    file: File,
    /// Bytes of the file that hold whole lines: a failed append is cut back to here.
    len: u64,
    entries: HashMap<(String, String), Entry>,
    retention_ms: u64,
    health: Health,
}

#[derive(Debug, thiserror::Error)]
#[error("command-id store {path}: {source}")]
pub struct StoreError {
    path: PathBuf,
    source: std::io::Error,
}

/// The key of an entry: its origin (`*` for one from before ids were scoped) and its id.
fn key(origin: Option<&str>, id: &str) -> (String, String) {
    (origin.unwrap_or("*").to_string(), id.to_string())
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
        let (mut entries, mut health) = match fs::read(&path) {
            Ok(bytes) => read_lines(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (HashMap::new(), Health::default())
            }
            Err(e) => return Err(err(e)),
        };
        report(&path, &health);
        if !health.bad_lines.is_empty() || health.truncated.is_some() {
            let aside = dir.join(format!("{FILE_NAME}.damaged-{now_ms}"));
            fs::copy(&path, &aside).map_err(err)?;
            log::warn!(
                "command-id store {}: the damaged file was copied to {} before compaction",
                path.display(),
                aside.display()
            );
            health.moved_aside = Some(aside);
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
        compact(dir, &path, &entries).map_err(err)?;
        let file = OpenOptions::new().append(true).open(&path).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        Ok(IdStore {
            path,
            file,
            len,
            entries,
            retention_ms,
            health,
        })
    }

    /// The entry for `id` from `origin`, within the retention.
    pub fn get(&self, origin: &str, id: &str, now_ms: u64) -> Option<&Entry> {
        self.entries
            .get(&key(Some(origin), id))
            .or_else(|| self.entries.get(&key(None, id)))
            .filter(|e| now_ms.saturating_sub(e.t_ms) < self.retention_ms)
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Record that a command is about to be written to the lock; durable before it returns
    /// `Ok`. The entry is remembered in memory even when the disk refuses it.
    pub fn record_sent(&mut self, e: Entry) -> Result<(), StoreError> {
        debug_assert!(e.outcome.is_none());
        self.record(e)
    }

    /// Record a command's terminal outcome (in memory even when the disk refuses it).
    pub fn record_done(&mut self, mut e: Entry) -> Result<(), StoreError> {
        let k = key(e.origin.as_deref(), &e.id);
        if let Some(old) = self.entries.get(&k) {
            e.t_ms = old.t_ms;
        }
        self.record(e)
    }

    fn record(&mut self, e: Entry) -> Result<(), StoreError> {
        let line = serde_json::to_string(&e).map_err(|source| StoreError {
            path: self.path.clone(),
            source: source.into(),
        });
        // Only an actuation needs its line on the disk before going on (module docs).
        let flush = e.action.is_actuating();
        self.entries.insert(key(e.origin.as_deref(), &e.id), e);
        let result = line.and_then(|line| self.append(&line, flush));
        if result.is_err() {
            self.health.write_failures += 1;
        }
        result
    }

    fn append(&mut self, line: &str, flush: bool) -> Result<(), StoreError> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| if flush { self.file.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(source) => {
                // Cut a partial line back off, so the next append starts a line of its own.
                let _ = self.file.set_len(self.len);
                Err(StoreError {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }
}

/// Every entry the bytes hold, and what was wrong with them.
fn read_lines(bytes: &[u8]) -> (HashMap<(String, String), Entry>, Health) {
    let mut entries: HashMap<(String, String), Entry> = HashMap::new();
    let mut health = Health::default();
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    // The text after the last newline: empty for a file that ends cleanly.
    let tail = lines.pop().unwrap_or_default();
    let mut counted: Option<usize> = None;
    let mut good = 0usize;
    for (i, line) in lines.iter().enumerate() {
        if line.is_empty() {
            continue;
        }
        if i == 0 {
            if let Ok(h) = serde_json::from_slice::<Header>(line) {
                counted = Some(h.entries);
                continue;
            }
        }
        let Ok(e) = serde_json::from_slice::<Entry>(line) else {
            health.bad_lines.push(i + 1);
            continue;
        };
        good += 1;
        match entries.get_mut(&key(e.origin.as_deref(), &e.id)) {
            Some(old) if old.outcome.is_none() => old.outcome = e.outcome,
            Some(_) => {}
            None => {
                entries.insert(key(e.origin.as_deref(), &e.id), e);
            }
        }
    }
    if !tail.is_empty() {
        health.torn_tail = true;
    }
    match counted {
        Some(n) if good + health.bad_lines.len() < n => {
            health.truncated = Some(format!(
                "its header counts {n} entries but only {} lines follow",
                good + health.bad_lines.len()
            ));
        }
        Some(_) => {}
        // A store this version wrote always starts with its header; an older one has none
        // but holds entries.
        None if good == 0 => {
            health.truncated = Some("the file has no header and no entry".into());
        }
        None => {}
    }
    (entries, health)
}

fn report(path: &Path, health: &Health) {
    let p = path.display();
    if !health.bad_lines.is_empty() {
        let shown: Vec<String> = health
            .bad_lines
            .iter()
            .take(10)
            .map(usize::to_string)
            .collect();
        log::warn!(
            "command-id store {p}: {} line(s) could not be read and were skipped (line {}{}); every other id is kept",
            health.bad_lines.len(),
            shown.join(", "),
            if health.bad_lines.len() > 10 {
                ", …"
            } else {
                ""
            }
        );
    }
    if let Some(why) = &health.truncated {
        log::error!(
            "command-id store {p} was cut short: {why}. Ids recorded in the lost part are forgotten: a client repeating one of them may actuate again"
        );
    }
    if health.torn_tail {
        log::warn!(
            "command-id store {p}: the last line was cut mid-write (the daemon stopped while appending); nothing sent is lost"
        );
    }
}

/// Write the header and `entries` to a new file and rename it over `path`.
fn compact(
    dir: &Path,
    path: &Path,
    entries: &HashMap<(String, String), Entry>,
) -> std::io::Result<()> {
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        let mut sorted: Vec<&Entry> = entries.values().collect();
        sorted.sort_by_key(|e| e.t_ms);
        let header = Header {
            lockbridge_command_ids: FORMAT,
            entries: sorted.len(),
        };
        let mut text = serde_json::to_string(&header)?;
        text.push('\n');
        for e in sorted {
            text.push_str(&serde_json::to_string(e)?);
            text.push('\n');
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    fn entry(origin: &str, id: &str, action: Action, t_ms: u64, outcome: Option<Outcome>) -> Entry {
        Entry {
            id: id.into(),
            origin: Some(origin.into()),
            lock: "front".into(),
            action,
            mode: Some(Mode::Normal),
            t_ms,
            outcome,
        }
    }

    #[test]
    fn outcomes_survive_a_restart_and_in_flight_ids_settle_ambiguous() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = IdStore::open(dir.path(), DAY, 1_000).unwrap();
            s.record_sent(entry("cli", "a", Action::Unlock, 1_000, None))
                .unwrap();
            s.record_done(entry(
                "cli",
                "a",
                Action::Unlock,
                1_100,
                Some(Outcome::Expired),
            ))
            .unwrap();
            s.record_sent(entry("cli", "b", Action::Lock, 1_200, None))
                .unwrap();
            // crash: no outcome for b
        }
        let s = IdStore::open(dir.path(), DAY, 2_000).unwrap();
        assert_eq!(s.health(), &Health::default());
        let a = s.get("cli", "a", 2_000).unwrap();
        assert_eq!((a.outcome.clone(), a.t_ms), (Some(Outcome::Expired), 1_000));
        assert!(matches!(
            s.get("cli", "b", 2_000).unwrap().outcome,
            Some(Outcome::Ambiguous { .. })
        ));
        assert!(s.get("cli", "c", 2_000).is_none());
        assert!(
            s.get("mqtt", "a", 2_000).is_none(),
            "ids are scoped to their origin"
        );
    }

    #[test]
    fn torn_last_line_is_reported_and_old_ids_expire() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = IdStore::open(dir.path(), DAY, 1_000).unwrap();
            s.record_done(entry(
                "cli",
                "old",
                Action::Lock,
                1_000,
                Some(Outcome::Expired),
            ))
            .unwrap();
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE_NAME))
            .unwrap();
        f.write_all(b"{\"id\":\"torn\",\"lo").unwrap();
        let s = IdStore::open(dir.path(), DAY, 1_000 + DAY - 1).unwrap();
        assert!(s.health().torn_tail && s.health().moved_aside.is_none());
        assert!(
            s.get("cli", "old", 1_000 + DAY - 1).is_some(),
            "kept for a full day"
        );
        assert!(s.get("cli", "torn", 1_000).is_none());
        let s = IdStore::open(dir.path(), DAY, 1_000 + DAY + 1).unwrap();
        assert!(s.get("cli", "old", 1_000 + DAY + 1).is_none());
        assert_eq!(s.health(), &Health::default());
    }

    // Regression: a line of invalid UTF-8 stopped the reader, and compaction then rewrote the
    // file without every later id.
    #[test]
    fn a_bad_line_is_skipped_named_and_kept_aside_and_every_good_line_survives() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = IdStore::open(dir.path(), DAY, 1_000).unwrap();
            for (i, id) in ["a", "b", "c"].iter().enumerate() {
                s.record_done(entry(
                    "cli",
                    id,
                    Action::Unlock,
                    1_000 + i as u64,
                    Some(Outcome::Expired),
                ))
                .unwrap();
            }
        }
        let path = dir.path().join(FILE_NAME);
        let text = fs::read(&path).unwrap();
        let mut lines: Vec<Vec<u8>> = text.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
        // header, a, b, c, "" — damage the line of "a" and insert garbage after it
        lines[1] = vec![0xFF, 0xFE, b'{'];
        lines.insert(2, b"not json".to_vec());
        fs::write(&path, lines.join(&b'\n')).unwrap();
        let s = IdStore::open(dir.path(), DAY, 2_000).unwrap();
        let h = s.health().clone();
        assert_eq!(h.bad_lines, vec![2, 3]);
        assert!(h.truncated.is_none(), "{h:?}");
        let aside = h.moved_aside.expect("the damaged file is kept");
        assert!(fs::read(&aside).unwrap().starts_with(&text[..10]));
        assert!(s.get("cli", "a", 2_000).is_none());
        assert!(s.get("cli", "b", 2_000).is_some() && s.get("cli", "c", 2_000).is_some());
        drop(s);
        // The compacted file is healthy again and still holds b and c.
        let s = IdStore::open(dir.path(), DAY, 3_000).unwrap();
        assert_eq!(s.health(), &Health::default());
        assert!(s.get("cli", "b", 3_000).is_some() && s.get("cli", "c", 3_000).is_some());
    }

    #[test]
    fn a_store_cut_short_is_reported_not_treated_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = IdStore::open(dir.path(), DAY, 1_000).unwrap();
            for id in ["a", "b", "c"] {
                s.record_done(entry(
                    "cli",
                    id,
                    Action::Lock,
                    1_000,
                    Some(Outcome::Expired),
                ))
                .unwrap();
            }
        }
        // Compacted: header counting 3, then a, b, c. Keep the header and one entry.
        IdStore::open(dir.path(), DAY, 1_500).unwrap();
        let path = dir.path().join(FILE_NAME);
        let text = fs::read_to_string(&path).unwrap();
        let cut: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
        fs::write(&path, cut).unwrap();
        let s = IdStore::open(dir.path(), DAY, 2_000).unwrap();
        let why = s.health().truncated.clone().expect("reported");
        assert!(why.contains("counts 3"), "{why}");
        assert!(s.health().moved_aside.is_some());
        // An empty file is cut short too.
        drop(s);
        fs::write(&path, b"").unwrap();
        let s = IdStore::open(dir.path(), DAY, 2_000).unwrap();
        assert!(s.health().truncated.is_some());
    }

    #[test]
    fn stores_without_origins_or_modes_still_answer_for_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(FILE_NAME),
            "{\"id\":\"x\",\"lock\":\"front\",\"action\":\"unlock\",\"t_ms\":1000,\"outcome\":{\"status\":\"expired\"}}\n",
        )
        .unwrap();
        let s = IdStore::open(dir.path(), DAY, 2_000).unwrap();
        assert_eq!(s.health(), &Health::default());
        for origin in ["cli", "mqtt"] {
            let e = s.get(origin, "x", 2_000).unwrap();
            assert!(e.same_command("front", Action::Unlock, Mode::Force));
            assert!(!e.same_command("front", Action::Lock, Mode::Normal));
        }
    }
}
