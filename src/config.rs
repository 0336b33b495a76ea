//! The daemon's configuration (design §8): `/etc/lockbridge/lockbridge.toml` (or `--config`),
//! then `LOCKBRIDGE_SECTION__KEY` environment overrides, loaded with the `config` crate into
//! these structs. Unknown keys are errors; every error names the key and the reason.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::command::Action;
use crate::ptls::gatt;
use crate::sim::serve::ListenAddr;

pub const DEFAULT_PATH: &str = "/etc/lockbridge/lockbridge.toml";

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub gateway: Gateway,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub ble: Ble,
    #[serde(default)]
    pub credentials: Credentials,
    #[serde(default)]
    pub commands: Commands,
    #[serde(default)]
    pub control: Control,
    #[serde(default)]
    pub liveness: Liveness,
    #[serde(default)]
    pub coap: Coap,
    /// Who may do what: one rule per origin and lock pattern.
    #[serde(default = "default_permissions")]
    pub permissions: Vec<Permission>,
    #[serde(default)]
    pub locks: Vec<LockEntry>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gateway {
    /// This hub's name; used in logs and, later, in the MQTT root.
    pub id: String,
    /// Keys, certificates and the command-id store live here.
    pub state_dir: PathBuf,
    /// The gateway's long-term key, relative to `state_dir` (mode 0600).
    pub key_file: PathBuf,
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway {
            id: "lockbridge".into(),
            state_dir: PathBuf::from("/var/lib/lockbridge"),
            key_file: PathBuf::from("gateway.key"),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// error, warn, info, debug or trace (`LOCKBRIDGE_LOG` overrides).
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// BlueZ over D-Bus.
    Ble,
    /// The simulator's socket.
    Sim,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ble {
    pub transport: Transport,
    /// For `transport = "sim"`: `unix:PATH` or `tcp:127.0.0.1:PORT`.
    pub sim_endpoint: String,
    /// Simultaneous links the adapter may hold (typically 5–7).
    pub max_connections: usize,
    /// Adapter name such as `hci0`; empty = the default adapter.
    pub adapter: String,
    pub connect_timeout_s: u64,
    pub att_mtu: u16,
}

impl Default for Ble {
    fn default() -> Self {
        Ble {
            transport: Transport::Ble,
            sim_endpoint: String::new(),
            max_connections: 5,
            adapter: String::new(),
            connect_timeout_s: 10,
            att_mtu: 247,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// This project's authority issues certificates and signed time locally.
    Authority,
    /// The operator's backend drops certificates and signed time into the state directory.
    Files,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Credentials {
    pub provider: Provider,
    /// For `authority`: the authority directory (`lockbridge authority init`).
    pub authority_dir: PathBuf,
    /// For `authority`: what the issued certificates allow (lock, pull, read).
    pub permissions: String,
    /// For `authority`: validity of issued certificates.
    pub validity_days: u64,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            provider: Provider::Files,
            authority_dir: PathBuf::from("/var/lib/lockbridge/authority"),
            permissions: "lock,pull,read".into(),
            validity_days: 10,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Commands {
    /// Deadline of a command that names none.
    pub default_ttl_s: u64,
    /// Commands waiting per lock; more are refused `failed: busy`.
    pub queue_depth: usize,
    /// How long command ids are remembered (at least 24 h).
    pub remember_ids_h: u64,
    /// How long a sent command waits for the lock's response.
    pub response_timeout_s: u64,
}

impl Default for Commands {
    fn default() -> Self {
        Commands {
            default_ttl_s: 30,
            queue_depth: 8,
            remember_ids_h: 24,
            response_timeout_s: 5,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Control {
    /// The local control socket that `lockbridge local …` talks to (origin `cli`).
    pub socket: PathBuf,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            socket: PathBuf::from("/run/lockbridge/control.sock"),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Liveness {
    /// A lock expected to be reachable that made no progress for this long is reported.
    pub stall_after_s: u64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness { stall_after_s: 300 }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Coap {
    /// UDP address for CoAP over DTLS, such as `0.0.0.0:5684`; empty = off.
    pub listen: String,
    pub handshake_timeout_s: u64,
    /// A peer with no traffic for this long is dropped.
    pub idle_timeout_s: u64,
    pub max_peers: usize,
    /// Handshakes in progress at once; more ClientHellos are dropped.
    pub max_half_open: usize,
    /// PSK clients; each identity is a command origin in `[[permissions]]`.
    pub clients: Vec<CoapClient>,
}

impl Default for Coap {
    fn default() -> Self {
        Coap {
            listen: String::new(),
            handshake_timeout_s: 10,
            idle_timeout_s: 300,
            max_peers: 4096,
            max_half_open: 256,
            clients: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoapClient {
    pub identity: String,
    /// The key as hex. Prefer `psk_file` so the config holds no secret.
    #[serde(default, skip_serializing)]
    pub psk_hex: Option<String>,
    /// A file holding the key as hex (mode 0600, relative to `gateway.state_dir`).
    #[serde(default)]
    pub psk_file: Option<PathBuf>,
}

impl CoapClient {
    /// The key, from `psk_hex` or `psk_file` (refused unless mode 0600).
    pub fn psk(&self, state_dir: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        use std::os::unix::fs::PermissionsExt;
        let text = match (&self.psk_hex, &self.psk_file) {
            (Some(h), None) => zeroize::Zeroizing::new(h.clone()),
            (None, Some(f)) => {
                let path = state_dir.join(f);
                let meta =
                    std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(format!(
                        "{}: mode {mode:04o} lets group or others read the key; fix with `chmod 600 {}`",
                        path.display(),
                        path.display()
                    ));
                }
                zeroize::Zeroizing::new(
                    std::fs::read_to_string(&path)
                        .map_err(|e| format!("{}: {e}", path.display()))?,
                )
            }
            _ => return Err("give exactly one of psk_hex and psk_file".into()),
        };
        let key = hex::decode(text.trim()).map_err(|_| "the PSK is not hex".to_string())?;
        if key.len() < 16 {
            return Err("the PSK must be at least 16 bytes".into());
        }
        Ok(zeroize::Zeroizing::new(key))
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Permission {
    /// `cli` (the control socket); later `mqtt` and DTLS identities.
    pub origin: String,
    /// Lock ids this rule covers; `*` and `?` wildcards.
    #[serde(default = "star")]
    pub locks: String,
    pub actions: Vec<Action>,
}

fn star() -> String {
    "*".into()
}

fn default_permissions() -> Vec<Permission> {
    vec![Permission {
        origin: "cli".into(),
        locks: star(),
        actions: Action::ALL.to_vec(),
    }]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkPolicy {
    /// Keep a warm session: fastest commands.
    Persistent,
    /// Connect for a command or refresh, disconnect when idle: saves the lock's battery.
    OnDemand,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockEntry {
    /// The name commands use (`front-door`).
    pub id: String,
    /// 14 digits, `12345678-901234`.
    pub serial: String,
    /// The lock's device id, for certificates from the authority.
    #[serde(default)]
    pub device_id: Option<u32>,
    /// The lock's long-term public key (base64 of the 65-byte point).
    pub public_key: String,
    #[serde(default = "persistent")]
    pub link: LinkPolicy,
    /// Persistent: GET_STATE this often to keep the link warm.
    #[serde(default = "keepalive")]
    pub keepalive_s: u64,
    /// On-demand: drop the link after this long without a command.
    #[serde(default = "idle")]
    pub idle_disconnect_s: u64,
    /// On-demand: refresh state and battery this often.
    #[serde(default = "refresh")]
    pub refresh_s: u64,
}

fn persistent() -> LinkPolicy {
    LinkPolicy::Persistent
}
fn keepalive() -> u64 {
    45
}
fn idle() -> u64 {
    20
}
fn refresh() -> u64 {
    600
}

/// A configuration error: which key and why.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {key}: {reason}")]
pub struct ConfigError {
    pub source_name: String,
    pub key: String,
    pub reason: String,
}

impl Config {
    /// Read `path`, apply `LOCKBRIDGE_*` overrides, check every value.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        if !path.exists() {
            return Err(ConfigError {
                source_name: name,
                key: "(file)".into(),
                reason: "not found; pass --config or create it from etc/lockbridge.toml".into(),
            });
        }
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("LOCKBRIDGE_") && k.contains("__"))
            .collect();
        let built = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("LOCKBRIDGE")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()
            .map_err(|e| from_config_error(&name, e))?;
        let cfg: Config = built
            .try_deserialize()
            .map_err(|e| from_config_error(&name, e))?;
        cfg.validate(&name)?;
        Ok(cfg)
    }

    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let err = |key: String, reason: String| ConfigError {
            source_name: name.to_string(),
            key,
            reason,
        };
        if self.gateway.id.trim().is_empty() {
            return Err(err("gateway.id".into(), "must not be empty".into()));
        }
        if self.ble.transport == Transport::Sim {
            self.ble
                .sim_endpoint
                .parse::<ListenAddr>()
                .map_err(|e| err("ble.sim_endpoint".into(), e))?;
        }
        if self.ble.max_connections == 0 {
            return Err(err(
                "ble.max_connections".into(),
                "must be at least 1".into(),
            ));
        }
        if self.ble.att_mtu < crate::ptls::wire::MIN_ATT_MTU {
            return Err(err("ble.att_mtu".into(), "must be at least 156".into()));
        }
        if self.commands.queue_depth == 0 {
            return Err(err(
                "commands.queue_depth".into(),
                "must be at least 1".into(),
            ));
        }
        if self.commands.remember_ids_h < 24 {
            return Err(err(
                "commands.remember_ids_h".into(),
                "must be at least 24 (ids are remembered for a day)".into(),
            ));
        }
        if self.credentials.provider == Provider::Authority {
            crate::ptls::cert::parse_permissions(&self.credentials.permissions)
                .map_err(|e| err("credentials.permissions".into(), e))?;
        }
        let mut ids = BTreeSet::new();
        let mut serials = BTreeSet::new();
        for (i, l) in self.locks.iter().enumerate() {
            let key = |field: &str| format!("locks[{i}].{field}");
            if l.id.is_empty()
                || !l
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(err(
                    key("id"),
                    format!("{:?}: use letters, digits, '-', '_' or '.'", l.id),
                ));
            }
            if !ids.insert(l.id.clone()) {
                return Err(err(key("id"), format!("{:?} appears twice", l.id)));
            }
            gatt::serial_digits(&l.serial).map_err(|e| err(key("serial"), e.to_string()))?;
            if !serials.insert(l.serial.clone()) {
                return Err(err(key("serial"), format!("{} appears twice", l.serial)));
            }
            crate::keys::parse_public_b64(&l.public_key)
                .map_err(|e| err(key("public_key"), e.to_string()))?;
            if self.credentials.provider == Provider::Authority && l.device_id.is_none() {
                return Err(err(
                    key("device_id"),
                    "required with credentials.provider = \"authority\"".into(),
                ));
            }
            if l.keepalive_s == 0 || l.idle_disconnect_s == 0 || l.refresh_s == 0 {
                return Err(err(
                    key("keepalive_s"),
                    "timers must be at least 1 s".into(),
                ));
            }
        }
        if !self.coap.listen.is_empty() {
            self.coap
                .listen
                .parse::<std::net::SocketAddr>()
                .map_err(|_| {
                    err(
                        "coap.listen".into(),
                        format!("{:?} is not HOST:PORT", self.coap.listen),
                    )
                })?;
        }
        let mut identities = BTreeSet::new();
        for (i, c) in self.coap.clients.iter().enumerate() {
            if c.identity.is_empty() || !identities.insert(c.identity.clone()) {
                return Err(err(
                    format!("coap.clients[{i}].identity"),
                    "must be unique and not empty".into(),
                ));
            }
            if c.identity == "cli" {
                return Err(err(
                    format!("coap.clients[{i}].identity"),
                    "\"cli\" is the control socket's origin".into(),
                ));
            }
            c.psk(&self.gateway.state_dir)
                .map_err(|e| err(format!("coap.clients[{i}].psk"), e))?;
        }
        for (i, p) in self.permissions.iter().enumerate() {
            if p.origin.is_empty() {
                return Err(err(
                    format!("permissions[{i}].origin"),
                    "must not be empty".into(),
                ));
            }
        }
        Ok(())
    }

    pub fn key_path(&self) -> PathBuf {
        self.gateway.state_dir.join(&self.gateway.key_file)
    }

    pub fn response_timeout(&self) -> Duration {
        Duration::from_secs(self.commands.response_timeout_s)
    }

    /// Whether `origin` may do `action` on lock `lock`.
    pub fn allows(&self, origin: &str, lock: &str, action: Action) -> bool {
        self.permissions
            .iter()
            .any(|p| p.origin == origin && glob(&p.locks, lock) && p.actions.contains(&action))
    }
}

fn from_config_error(name: &str, e: config::ConfigError) -> ConfigError {
    let text = e.to_string();
    // The config crate says "… for key `a.b`" or "… in `a.b`"; pull the key out when it does.
    let key = text
        .split('`')
        .nth(1)
        .filter(|_| text.contains("key `") || text.contains("in `"))
        .map(str::to_string)
        .unwrap_or_else(|| "(file)".into());
    ConfigError {
        source_name: name.to_string(),
        key,
        reason: text,
    }
}

/// `*` matches any run of characters, `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", "front-door"));
        assert!(glob("front-*", "front-door"));
        assert!(glob("?ack", "back"));
        assert!(!glob("front-*", "back-door"));
    }
}
