//! What the Tedee provider keeps under `gateway.state_dir/tedee/` (tedee-cloud.md Part A §3):
//! the registration and one file per lock, so that a restart with valid certificates costs no
//! request. Every write goes to a temporary file, is synced and renamed (a crash never leaves
//! half a file); a file that does not parse is moved aside to `<name>.bad-<unix-ms>` and
//! treated as absent. The key is never written here.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// `registration.json`: this hub as a Tedee "mobile".
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub api_url: String,
    pub mobile_id: String,
    pub mobile_name: String,
    /// Base64 of the gateway key's 65-byte point.
    pub public_key: String,
    /// RFC 3339.
    pub registered_at: String,
}

/// `locks/<serial>.json`: a lock's current certificate and key.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockRecord {
    pub serial: String,
    pub device_id: u32,
    pub mobile_id: String,
    /// Base64, as received.
    pub certificate: String,
    /// The string as received, and as parsed (`None`: unreadable, refreshed daily).
    pub expiration: String,
    pub expiration_ms: Option<u64>,
    /// Base64 of the lock's 65-byte point.
    pub device_public_key: String,
    pub fetched_at_ms: u64,
    pub refresh_at_ms: u64,
}

pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// `state_dir/tedee` (0700) and its `locks/`, made if missing.
    pub fn open(state_dir: &Path) -> Result<Store, String> {
        let dir = state_dir.join("tedee");
        for d in [&dir, &dir.join("locks")] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| format!("{}: {e}", d.display()))?;
            // An existing directory keeps whatever mode it had; these hold credentials.
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("{}: {e}", d.display()))?;
        }
        Ok(Store { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn registration_path(&self) -> PathBuf {
        self.dir.join("registration.json")
    }

    fn lock_path(&self, serial: &str) -> PathBuf {
        // Serials are checked (14 digits and a dash) before they get here.
        self.dir.join("locks").join(format!("{serial}.json"))
    }

    pub fn registration(&self) -> Option<Registration> {
        read_json(&self.registration_path())
    }

    pub fn save_registration(&self, r: &Registration) -> Result<(), String> {
        write_json(&self.registration_path(), r)
    }

    pub fn lock(&self, serial: &str) -> Option<LockRecord> {
        read_json(&self.lock_path(serial)).filter(|r: &LockRecord| r.serial == serial)
    }

    pub fn save_lock(&self, r: &LockRecord) -> Result<(), String> {
        write_json(&self.lock_path(&r.serial), r)
    }

    /// Everything, for `tedee unregister`.
    pub fn remove_all(&self) -> Result<(), String> {
        std::fs::remove_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!(
                "tedee: {}: {e}; acting as if it were absent",
                path.display()
            );
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            let aside = path.with_extension(format!("json.bad-{}", crate::clock::unix_ms()));
            match std::fs::rename(path, &aside) {
                Ok(()) => log::warn!(
                    "tedee: {}: unreadable ({e}); moved aside to {} and acting as if it were absent",
                    path.display(),
                    aside.display()
                ),
                Err(re) => log::warn!(
                    "tedee: {}: unreadable ({e}) and could not be moved aside ({re}); acting as if it were absent",
                    path.display()
                ),
            }
            None
        }
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    write_atomic(path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Temporary file (0600), synced, renamed over `path`, directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub use crate::clock::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    fn record(serial: &str) -> LockRecord {
        LockRecord {
            serial: serial.into(),
            device_id: 42,
            mobile_id: "2f7a4c1e-0000-4000-8000-000000000001".into(),
            certificate: "AAEC".into(),
            expiration: "2026-12-12T00:00:00Z".into(),
            expiration_ms: Some(1_796_947_200_000),
            device_public_key: "BA==".into(),
            fetched_at_ms: 1,
            refresh_at_ms: 2,
        }
    }

    #[test]
    fn files_are_private_atomic_and_a_damaged_one_is_moved_aside() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(store.dir()), 0o700);
        assert_eq!(mode(&store.dir().join("locks")), 0o700);
        assert!(store.registration().is_none());
        let r = record("12345678-901234");
        store.save_lock(&r).unwrap();
        let path = store.lock_path(&r.serial);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(store.lock(&r.serial), Some(r.clone()));
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(store.dir().join("locks"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["12345678-901234.json"]);
        // Damaged: moved aside, treated as absent, the next write starts afresh.
        std::fs::write(&path, b"{\"serial\": \"12345678-9").unwrap();
        assert!(store.lock(&r.serial).is_none());
        assert!(!path.exists());
        let aside: Vec<_> = std::fs::read_dir(store.dir().join("locks"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("12345678-901234.json.bad-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        store.save_lock(&r).unwrap();
        assert_eq!(store.lock(&r.serial), Some(r));
    }

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_219_200_000), "2026-11-21T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        let ms = 1_639_267_200_000 + 3_723_000;
        assert_eq!(rfc3339(ms), "2021-12-12T01:02:03Z");
        assert_eq!(super::super::api::parse_date_ms(&rfc3339(ms)), Some(ms));
    }
}
