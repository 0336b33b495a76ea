//! The daemon's configuration (design §8): `/etc/lockbridge/lockbridge.toml` (or `--config`),
//! then `LOCKBRIDGE_SECTION__KEY` environment overrides, loaded with the `config` crate into
//! these structs. Unknown keys are errors; every error names the key and the reason.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::command::Action;
use crate::ptls::gatt;
use crate::sim::wire::ListenAddr;

pub const DEFAULT_PATH: &str = "/etc/lockbridge/lockbridge.toml";

pub use crate::policy::MQTT_ORIGIN;

/// A value the file writes as text, parsed as it is read: an address, a key. `""` (or the key
/// left out) is none. The error names the key and what was expected.
mod text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let text = String::deserialize(d)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        text.trim()
            .parse()
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
    }

    pub fn serialize<S: Serializer, T: Display>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.as_ref().map(ToString::to_string).unwrap_or_default())
    }
}
use crate::policy::{Permission, Policy};

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
    #[serde(default)]
    pub mqtt: Mqtt,
    /// Who may do what: one rule per origin and lock pattern.
    #[serde(default = "crate::policy::default_permissions")]
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
    #[serde(with = "text")]
    pub sim_endpoint: Option<ListenAddr>,
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
            sim_endpoint: None,
            max_connections: 5,
            adapter: String::new(),
            connect_timeout_s: 10,
            att_mtu: 247,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// This project's authority issues certificates and signed time locally.
    Authority,
    /// The operator's backend drops certificates and signed time into the state directory.
    #[default]
    Files,
    /// Tedee's cloud, as real Tedee locks need (`[credentials.tedee]`, docs/tedee.md).
    Tedee,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Credentials {
    pub provider: Provider,
    /// For `authority`: the authority directory (`lockbridge authority init`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority_dir: Option<PathBuf>,
    /// For `authority`: what the issued certificates allow (lock, pull, read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
    /// For `authority`: validity of issued certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validity_days: Option<u64>,
    /// For `tedee`.
    pub tedee: Tedee,
}

impl Credentials {
    pub fn authority_dir(&self) -> PathBuf {
        self.authority_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/lockbridge/authority"))
    }

    pub fn permissions(&self) -> &str {
        self.permissions.as_deref().unwrap_or("lock,pull,read")
    }

    pub fn validity_days(&self) -> u64 {
        self.validity_days.unwrap_or(10)
    }
}

/// `[credentials.tedee]` (tedee-cloud.md Part A §2).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tedee {
    /// Scheme and host only; the provider adds `/api/{api_version}/`.
    pub api_url: String,
    /// Sent as is (`v37`); Tedee retires versions on a published schedule.
    pub api_version: String,
    /// The Personal Access Key, one line, relative to `gateway.state_dir`; mode 0600.
    pub pak_file: PathBuf,
    /// The name this hub registers under; empty = `lockbridge-<hostname>`.
    pub mobile_name: String,
    /// A whole request, connect included.
    pub request_timeout_s: u64,
    /// This hub's own ceiling (the account's 700/h is shared with the owner's apps).
    pub max_requests_per_hour: u32,
    /// Register again by itself when the registration was removed (at most once per 24 h).
    pub auto_reregister: bool,
    /// A PEM trust anchor added to the system's roots (for a test double over TLS); empty =
    /// none. TLS is always verified.
    pub extra_ca_file: String,
}

impl Default for Tedee {
    fn default() -> Self {
        Tedee {
            api_url: "https://api.tedee.com".into(),
            api_version: "v37".into(),
            pak_file: PathBuf::from("tedee.pak"),
            mobile_name: String::new(),
            request_timeout_s: 30,
            max_requests_per_hour: 60,
            auto_reregister: false,
            extra_ca_file: String::new(),
        }
    }
}

/// The Tedee account allows 700 requests an hour, shared by every client of the account.
pub const TEDEE_ACCOUNT_REQUESTS_PER_HOUR: u32 = 700;

impl Tedee {
    /// `api_url` checked (E-05): `https://`, or `http://` on a loopback host (test doubles).
    pub fn check_url(url: &str) -> Result<(), String> {
        const RULE: &str = "must be an https:// URL (http is allowed only on loopback for tests)";
        let (scheme, rest) = url.split_once("://").ok_or_else(|| RULE.to_string())?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "{url:?}: give scheme and host only, like https://api.tedee.com (the provider adds /api/<version>/)"
            ));
        }
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        match scheme {
            "https" => Ok(()),
            "http" if matches!(host, "127.0.0.1" | "::1" | "localhost") => Ok(()),
            _ => Err(format!("{url:?} {RULE}")),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Commands {
    /// Deadline of a command that names none.
    pub default_ttl_s: u64,
    /// Commands waiting per lock behind the one in flight; more are refused `failed: queue-full`.
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
    #[serde(with = "text")]
    pub listen: Option<std::net::SocketAddr>,
    pub handshake_timeout_s: u64,
    /// A peer with no traffic for this long is dropped.
    pub idle_timeout_s: u64,
    pub max_peers: usize,
    /// Handshakes in progress at once; more ClientHellos are dropped.
    pub max_half_open: usize,
    /// Handshakes in progress from one IP address.
    pub max_half_open_per_address: usize,
    /// Sessions from one IP address; one more ends that address's oldest.
    pub max_peers_per_address: usize,
    /// Sessions of one client identity; one more ends that identity's oldest.
    pub max_peers_per_identity: usize,
    /// The gateway's certificate chain (PEM, relative to `gateway.state_dir`), for clients
    /// that authenticate with ECDSA P-256 certificates.
    pub certificate: Option<PathBuf>,
    /// Its private key (PKCS#8 PEM, mode 0600, relative to `gateway.state_dir`).
    pub private_key: Option<PathBuf>,
    /// The CA (PEM) that issues client certificates; clients name it by `certificate_cn`.
    pub client_ca: Option<PathBuf>,
    /// Clients; each identity is a command origin in `[[permissions]]`.
    pub clients: Vec<CoapClient>,
}

impl Default for Coap {
    fn default() -> Self {
        Coap {
            listen: None,
            handshake_timeout_s: 20,
            idle_timeout_s: 300,
            max_peers: 4096,
            max_half_open: 256,
            max_half_open_per_address: 32,
            max_peers_per_address: 512,
            max_peers_per_identity: 256,
            certificate: None,
            private_key: None,
            client_ca: None,
            clients: Vec::new(),
        }
    }
}

/// The MQTT bridge (design §7).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mqtt {
    /// The broker, `HOST:PORT`; empty = no MQTT.
    #[serde(with = "text")]
    pub broker: Option<HostPort>,
    /// `"5"` or `"3.1.1"`.
    pub protocol: MqttProtocol,
    /// Topic root; empty = `lockbridge/<gateway.id>`.
    pub root: String,
    /// Client id; empty = `lockbridge-<gateway.id>`. Unique per hub.
    pub client_id: String,
    pub username: Option<String>,
    /// The password, in a file of mode 0600 (relative to `gateway.state_dir`).
    pub password_file: Option<PathBuf>,
    /// Connect with TLS; the broker's certificate is checked against `ca` (PEM) or, without
    /// it, the system's roots.
    pub tls: bool,
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM) and its key (PEM, mode 0600) for mutual TLS.
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub keep_alive_s: u64,
    /// Deprecated: actions MQTT commands may take on every lock. Write a `[[permissions]]`
    /// rule with `origin = "mqtt"` instead; this key still works, with a warning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<Action>>,
    /// How often `<root>/metrics` is published.
    pub metrics_interval_s: u64,
    /// Reconnect delays: doubling from the first to the cap, with jitter.
    pub reconnect_min_ms: u64,
    pub reconnect_max_s: u64,
    /// Home Assistant MQTT discovery.
    pub home_assistant: bool,
    pub discovery_prefix: String,
    /// Where MQTT 5 response topics may point besides `<root>/responses/`: topic prefixes
    /// ending in `/`, such as `"app/replies/"`.
    pub response_prefixes: Vec<String>,
}

impl Default for Mqtt {
    fn default() -> Self {
        Mqtt {
            broker: None,
            protocol: MqttProtocol::V5,
            root: String::new(),
            client_id: String::new(),
            username: None,
            password_file: None,
            tls: false,
            ca: None,
            client_certificate: None,
            client_key: None,
            keep_alive_s: 30,
            allow: None,
            metrics_interval_s: 60,
            reconnect_min_ms: 500,
            reconnect_max_s: 60,
            home_assistant: true,
            discovery_prefix: "homeassistant".into(),
            response_prefixes: Vec::new(),
        }
    }
}

/// The MQTT protocol version the bridge speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum MqttProtocol {
    #[default]
    V5,
    V311,
}

impl TryFrom<String> for MqttProtocol {
    type Error = String;

    fn try_from(text: String) -> Result<MqttProtocol, String> {
        match text.trim() {
            "5" => Ok(MqttProtocol::V5),
            "3.1.1" => Ok(MqttProtocol::V311),
            _ => Err(format!("{text:?}: use \"5\" or \"3.1.1\"")),
        }
    }
}

impl From<MqttProtocol> for String {
    fn from(p: MqttProtocol) -> String {
        match p {
            MqttProtocol::V5 => "5".into(),
            MqttProtocol::V311 => "3.1.1".into(),
        }
    }
}

/// `HOST:PORT`, the host a name or an address (`[::1]:1883` for IPv6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(text: &str) -> Result<HostPort, String> {
        text.rsplit_once(':')
            .and_then(|(h, p)| {
                let host = h.trim_matches(['[', ']']);
                Some(HostPort {
                    host: (!host.is_empty()).then(|| host.to_string())?,
                    port: p.parse().ok()?,
                })
            })
            .ok_or_else(|| "not HOST:PORT".to_string())
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Config {
    /// The MQTT topic root.
    pub fn mqtt_root(&self) -> String {
        if self.mqtt.root.is_empty() {
            format!("lockbridge/{}", self.gateway.id)
        } else {
            self.mqtt.root.trim_end_matches('/').to_string()
        }
    }

    /// The MQTT client id.
    pub fn mqtt_client_id(&self) -> String {
        if self.mqtt.client_id.is_empty() {
            format!("lockbridge-{}", self.gateway.id)
        } else {
            self.mqtt.client_id.clone()
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
    /// A client certificate issued by `coap.client_ca` with this subject common name.
    #[serde(default)]
    pub certificate_cn: Option<String>,
    /// A pinned client key: SHA-256 of its SubjectPublicKeyInfo (DER), as hex.
    #[serde(default)]
    pub public_key_sha256: Option<String>,
}

/// How a CoAP client proves who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    Psk,
    CertificateCn(String),
    PinnedKey([u8; 32]),
}

/// Check an MQTT topic name lockbridge publishes or subscribes under: not empty, no wildcard
/// (`+`, `#`), no NUL, no empty level (`a//b`, a leading or trailing `/`), not starting with
/// `$` (the broker's own), at most 65,535 bytes.
pub fn check_topic(topic: &str) -> Result<(), String> {
    let why = if topic.is_empty() {
        "must not be empty"
    } else if topic.len() > 65_535 {
        "is longer than MQTT allows"
    } else if topic.contains(['+', '#']) {
        "must not contain the wildcards + or #"
    } else if topic.contains('\0') {
        "must not contain NUL"
    } else if topic.split('/').any(str::is_empty) {
        "must not have an empty level (a leading, trailing or double /)"
    } else if topic.starts_with('$') {
        "must not start with $ (those topics are the broker's)"
    } else {
        return Ok(());
    };
    Err(format!("{topic:?} {why}"))
}

/// Read a file holding a secret (a PSK, a password, a private key) as text, through
/// [`crate::keys::read_secret`]: a regular file, the running user's own, mode 0600 or 0400.
pub fn read_private(path: &Path) -> Result<zeroize::Zeroizing<String>, String> {
    let bytes = crate::keys::read_secret(path).map_err(|e| e.to_string())?;
    std::str::from_utf8(&bytes)
        .map(|s| zeroize::Zeroizing::new(s.to_string()))
        .map_err(|_| format!("{}: not text", path.display()))
}

impl CoapClient {
    /// Which of the ways to authenticate this entry names (exactly one).
    pub fn auth(&self) -> Result<ClientAuth, String> {
        let psk = self.psk_hex.is_some() || self.psk_file.is_some();
        match (psk, &self.certificate_cn, &self.public_key_sha256) {
            (true, None, None) => Ok(ClientAuth::Psk),
            (false, Some(cn), None) if !cn.is_empty() => Ok(ClientAuth::CertificateCn(cn.clone())),
            (false, None, Some(pin)) => {
                let bytes = hex::decode(pin.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok());
                bytes.map(ClientAuth::PinnedKey).ok_or_else(|| {
                    "public_key_sha256 must be 64 hex digits (`openssl pkey -pubin -outform der | sha256sum`)".into()
                })
            }
            _ => Err(
                "give exactly one of psk_hex, psk_file, certificate_cn and public_key_sha256"
                    .into(),
            ),
        }
    }

    /// The key, from `psk_hex` or `psk_file` (refused unless mode 0600).
    pub fn psk(&self, state_dir: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        let text = match (&self.psk_hex, &self.psk_file) {
            (Some(h), None) => zeroize::Zeroizing::new(h.clone()),
            (None, Some(f)) => read_private(&state_dir.join(f))?,
            _ => return Err("give exactly one of psk_hex and psk_file".into()),
        };
        let key = hex::decode(text.trim()).map_err(|_| "the PSK is not hex".to_string())?;
        if key.len() < 16 {
            return Err("the PSK must be at least 16 bytes".into());
        }
        Ok(zeroize::Zeroizing::new(key))
    }
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
    /// The lock's long-term public key (base64 of the 65-byte point). Optional with the
    /// `tedee` provider, which gets it from the cloud; set, it pins the key.
    #[serde(default, with = "text", skip_serializing_if = "Option::is_none")]
    pub public_key: Option<crate::keys::PublicKeyB64>,
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
    /// The lock has a pull spring (a latch it can pull): Home Assistant offers Open for it.
    #[serde(default)]
    pub pull_spring: bool,
    /// On-demand: listen for the lock's advertisement this often between uses, so that its
    /// availability says whether it can be reached; 0 = never.
    #[serde(default = "presence")]
    pub presence_s: u64,
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
fn presence() -> u64 {
    60
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
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            key: "(file)".into(),
            reason: format!("{e}; the service user must be able to read it"),
        })?;
        Self::parse(&name, &text, env)
    }

    /// Parse configuration `text` (named `name` in errors), apply `LOCKBRIDGE_*` overrides from
    /// `env`, check every value.
    pub fn parse(
        name: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("LOCKBRIDGE_") && k.contains("__"))
            .collect();
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("LOCKBRIDGE")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()
            .map_err(|e| from_config_error(name, e))?;
        let cfg: Config = built
            .try_deserialize()
            .map_err(|e| from_config_error(name, e))?;
        cfg.validate(name)?;
        Ok(cfg)
    }

    /// `[credentials.tedee]`: Tedee's cloud (tedee-cloud.md §2).
    fn validate_tedee(&self) -> Result<(), (String, String)> {
        let t = &self.credentials.tedee;
        let key = |k: &str| format!("credentials.tedee.{k}");
        Tedee::check_url(&t.api_url).map_err(|e| (key("api_url"), e))?;
        if t.api_version.is_empty()
            || t.api_version.len() > 16
            || !t
                .api_version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.')
        {
            return Err((
                key("api_version"),
                format!(
                    "{:?}: a version such as \"v37\" (letters, digits and '.')",
                    t.api_version
                ),
            ));
        }
        if t.pak_file.as_os_str().is_empty() {
            return Err((
                key("pak_file"),
                "must name the Personal Access Key file".into(),
            ));
        }
        if t.mobile_name.chars().count() > 64 || t.mobile_name.chars().any(char::is_control) {
            return Err((key("mobile_name"), "at most 64 printable characters".into()));
        }
        if !(1..=300).contains(&t.request_timeout_s) {
            return Err((key("request_timeout_s"), "1 to 300 seconds".into()));
        }
        if !(1..=TEDEE_ACCOUNT_REQUESTS_PER_HOUR).contains(&t.max_requests_per_hour) {
            return Err((
                key("max_requests_per_hour"),
                format!(
                    "1 to {TEDEE_ACCOUNT_REQUESTS_PER_HOUR} (the account's own limit, shared with the owner's apps)"
                ),
            ));
        }
        Ok(())
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
        if self.ble.transport == Transport::Sim && self.ble.sim_endpoint.is_none() {
            return Err(err(
                "ble.sim_endpoint".into(),
                "required with transport = \"sim\": unix:PATH or tcp:127.0.0.1:PORT".into(),
            ));
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
        if self.commands.default_ttl_s == 0
            || self.commands.default_ttl_s > crate::command::MAX_TTL.as_secs()
        {
            return Err(err(
                "commands.default_ttl_s".into(),
                format!("1 to {} seconds", crate::command::MAX_TTL.as_secs()),
            ));
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
            crate::ptls::cert::parse_permissions(self.credentials.permissions())
                .map_err(|e| err("credentials.permissions".into(), e))?;
        }
        self.validate_tedee()
            .map_err(|(key, reason)| err(key, reason))?;
        if self.credentials.provider == Provider::Tedee {
            let c = &self.credentials;
            for (key, set) in [
                ("credentials.authority_dir", c.authority_dir.is_some()),
                ("credentials.permissions", c.permissions.is_some()),
                ("credentials.validity_days", c.validity_days.is_some()),
            ] {
                if set {
                    return Err(err(
                        key.into(),
                        "does not apply with provider = \"tedee\" (Tedee decides what real certificates allow and how long they last); remove it".into(),
                    ));
                }
            }
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
            // Under `tedee` the cloud supplies the lock's key; one set here pins it.
            if l.public_key.is_none() && self.credentials.provider != Provider::Tedee {
                return Err(err(
                    key("public_key"),
                    "required (base64 of the lock's 65-byte public key) unless credentials.provider = \"tedee\"".into(),
                ));
            }
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
        for (key, value) in [
            ("coap.max_peers", self.coap.max_peers),
            ("coap.max_half_open", self.coap.max_half_open),
            (
                "coap.max_half_open_per_address",
                self.coap.max_half_open_per_address,
            ),
            (
                "coap.max_peers_per_address",
                self.coap.max_peers_per_address,
            ),
            (
                "coap.max_peers_per_identity",
                self.coap.max_peers_per_identity,
            ),
        ] {
            if value == 0 {
                return Err(err(key.into(), "must be at least 1".into()));
            }
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
            let key = |f: &str| format!("coap.clients[{i}].{f}");
            match c.auth().map_err(|e| err(key("identity"), e))? {
                ClientAuth::Psk => {
                    c.psk(&self.gateway.state_dir)
                        .map_err(|e| err(key("psk"), e))?;
                }
                ClientAuth::CertificateCn(_) if self.coap.client_ca.is_none() => {
                    return Err(err(
                        key("certificate_cn"),
                        "needs coap.client_ca, the CA that issues client certificates".into(),
                    ));
                }
                ClientAuth::CertificateCn(_) | ClientAuth::PinnedKey(_)
                    if self.coap.certificate.is_none() || self.coap.private_key.is_none() =>
                {
                    return Err(err(
                        "coap.certificate".into(),
                        "certificate clients need the gateway's coap.certificate and coap.private_key".into(),
                    ));
                }
                ClientAuth::CertificateCn(_) | ClientAuth::PinnedKey(_) => {}
            }
        }
        if self.mqtt.broker.is_some() {
            let m = &self.mqtt;
            if self.mqtt.root.is_empty() {
                // The root is lockbridge/<gateway.id>: the id is one topic level.
                check_topic(&self.gateway.id)
                    .and_then(|()| match self.gateway.id.contains('/') {
                        true => Err(format!("{:?} must not contain /", self.gateway.id)),
                        false => Ok(()),
                    })
                    .map_err(|e| {
                        err("gateway.id".into(), format!("{e} (it names the MQTT root)"))
                    })?;
            }
            check_topic(&self.mqtt_root()).map_err(|e| err("mqtt.root".into(), e))?;
            if m.home_assistant {
                check_topic(&m.discovery_prefix)
                    .map_err(|e| err("mqtt.discovery_prefix".into(), e))?;
            }
            for (i, p) in m.response_prefixes.iter().enumerate() {
                let key = format!("mqtt.response_prefixes[{i}]");
                let Some(levels) = p.strip_suffix('/') else {
                    return Err(err(key, format!("{p:?} must end with /")));
                };
                check_topic(levels).map_err(|e| err(key, e))?;
            }
            let client_id = self.mqtt_client_id();
            if client_id.len() > 65_535 || client_id.contains('\0') {
                return Err(err(
                    "mqtt.client_id".into(),
                    "at most 65,535 bytes, without NUL".into(),
                ));
            }
            if m.keep_alive_s < 5 || m.reconnect_min_ms == 0 || m.reconnect_max_s == 0 {
                return Err(err(
                    "mqtt.keep_alive_s".into(),
                    "keep_alive_s must be at least 5 and reconnect delays at least 1".into(),
                ));
            }
            if m.metrics_interval_s == 0 {
                return Err(err(
                    "mqtt.metrics_interval_s".into(),
                    "must be at least 1".into(),
                ));
            }
            if m.client_certificate.is_some() != m.client_key.is_some() {
                return Err(err(
                    "mqtt.client_certificate".into(),
                    "give both client_certificate and client_key, or neither".into(),
                ));
            }
            if (m.client_certificate.is_some() || m.ca.is_some()) && !m.tls {
                return Err(err(
                    "mqtt.tls".into(),
                    "ca and client certificates need tls = true".into(),
                ));
            }
            if let Some(f) = &m.password_file {
                if m.username.is_none() {
                    return Err(err(
                        "mqtt.password_file".into(),
                        "a password needs mqtt.username".into(),
                    ));
                }
                read_private(&self.gateway.state_dir.join(f))
                    .map_err(|e| err("mqtt.password_file".into(), e))?;
            }
            if let Some(f) = &m.client_key {
                read_private(&self.gateway.state_dir.join(f))
                    .map_err(|e| err("mqtt.client_key".into(), e))?;
            }
        }
        if self.coap.clients.iter().any(|c| c.identity == "mqtt") {
            return Err(err(
                "coap.clients".into(),
                "\"mqtt\" is the MQTT bridge's origin; pick another identity".into(),
            ));
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

    /// The access policy these settings make.
    pub fn policy(&self) -> Policy {
        Policy::new(&self.permissions, self.mqtt.allow.as_deref())
    }

    /// What the configuration asks for in a way that is going away, with the new way.
    pub fn deprecations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(actions) = &self.mqtt.allow {
            let list: Vec<String> = actions.iter().map(|a| format!("{:?}", a.name())).collect();
            out.push(format!(
                "mqtt.allow is deprecated: write [[permissions]] origin = \"mqtt\" actions = [{}] instead (it works the same)",
                list.join(", ")
            ));
        }
        out
    }
}

fn from_config_error(name: &str, e: config::ConfigError) -> ConfigError {
    // It writes a key inside an array without its dot (`locks[0]public_key`): put it back.
    let mut text = String::new();
    let raw = e.to_string();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        text.push(c);
        if c == ']' && chars.peek().is_some_and(|n| n.is_ascii_alphabetic()) {
            text.push('.');
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Who;

    /// 2026-11-16 was a Monday.
    fn at(day: u64, hh: u64, mm: u64) -> u64 {
        let monday = 20_773 * 86_400;
        monday + day * 86_400 + hh * 3600 + mm * 60
    }

    #[test]
    fn permissions_check_address_ranges_and_windows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
[[permissions]]
origin = "cloud"
locks = "front-*"
actions = ["read", "unlock"]
from = ["10.1.0.0/16", "::1/128"]
windows = ["mon-fri 07:00-19:00"]

[[permissions]]
origin = "cloud"
actions = ["read"]
"#,
        )
        .unwrap();
        let cfg = Config::load_with_env(&path, []).unwrap();
        let office = Some("10.1.2.3".parse().unwrap());
        let who = |source, now| Who {
            origin: "cloud",
            source,
            now,
        };
        let monday_noon = at(0, 12, 0);
        assert!(
            cfg.policy()
                .allows(&who(office, monday_noon), "front-door", Action::Unlock)
        );
        assert!(cfg.policy().allows(
            &who(Some("::1".parse().unwrap()), monday_noon),
            "front-door",
            Action::Unlock
        ));
        assert!(!cfg.policy().allows(
            &who(Some("10.2.0.1".parse().unwrap()), monday_noon),
            "front-door",
            Action::Unlock
        ));
        assert!(
            !cfg.policy()
                .allows(&who(None, monday_noon), "front-door", Action::Unlock)
        );
        assert!(
            !cfg.policy()
                .allows(&who(office, at(5, 12, 0)), "front-door", Action::Unlock)
        );
        assert!(
            !cfg.policy()
                .allows(&who(office, monday_noon), "back-door", Action::Unlock)
        );
        assert!(
            cfg.policy()
                .allows(&who(None, at(5, 3, 0)), "back-door", Action::Read),
            "second rule"
        );
        let cli = Who {
            origin: "cli",
            source: None,
            now: monday_noon,
        };
        assert!(
            !cfg.policy().allows(&cli, "front-door", Action::Read),
            "explicit rules replace the default"
        );

        std::fs::write(
            &path,
            "[[permissions]]\norigin = \"x\"\nactions = [\"read\"]\nfrom = [\"10.0.0.300/8\"]\n",
        )
        .unwrap();
        let e = Config::load_with_env(&path, []).unwrap_err().to_string();
        assert!(e.contains("from") || e.contains("permissions"), "{e}");
        std::fs::write(
            &path,
            "[[permissions]]\norigin = \"x\"\nactions = [\"read\"]\nwindows = [\"someday\"]\n",
        )
        .unwrap();
        let e = Config::load_with_env(&path, []).unwrap_err().to_string();
        assert!(e.contains("DAYS HH:MM-HH:MM"), "{e}");
    }

    #[test]
    fn mqtt_allow_still_works_and_says_it_is_deprecated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let mqtt = |p: &Policy, action| p.allows(&Who::new(MQTT_ORIGIN, None, 0), "front", action);
        std::fs::write(&path, "[mqtt]\nallow = [\"lock\"]\n").unwrap();
        let old = Config::load_with_env(&path, []).unwrap();
        assert!(mqtt(&old.policy(), Action::Lock) && !mqtt(&old.policy(), Action::Unlock));
        let warned = old.deprecations();
        assert!(
            warned.len() == 1 && warned[0].contains("origin = \"mqtt\" actions = [\"lock\"]"),
            "{warned:?}"
        );
        std::fs::write(
            &path,
            "[[permissions]]\norigin = \"mqtt\"\nactions = [\"lock\"]\n",
        )
        .unwrap();
        let new = Config::load_with_env(&path, []).unwrap();
        assert!(mqtt(&new.policy(), Action::Lock) && !mqtt(&new.policy(), Action::Unlock));
        assert!(new.deprecations().is_empty());
    }

    #[test]
    fn addresses_and_the_mqtt_protocol_are_typed_when_read_and_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Config::load_with_env(&path, [])
        };
        let c = load("[coap]\nlisten = \"127.0.0.1:5684\"\n[mqtt]\nbroker = \"[::1]:1883\"\nprotocol = \"3.1.1\"\n")
            .unwrap();
        assert_eq!(c.coap.listen, Some("127.0.0.1:5684".parse().unwrap()));
        let broker = c.mqtt.broker.clone().unwrap();
        assert_eq!((broker.host.as_str(), broker.port), ("::1", 1883));
        assert_eq!(broker.to_string(), "[::1]:1883");
        assert_eq!(c.mqtt.protocol, MqttProtocol::V311);
        // Empty is off, as it always was.
        let off = load("[coap]\nlisten = \"\"\n[mqtt]\nbroker = \"\"\n").unwrap();
        assert!(off.coap.listen.is_none() && off.mqtt.broker.is_none());
        for (text, key) in [
            ("[coap]\nlisten = \"nowhere\"\n", "coap.listen"),
            ("[mqtt]\nbroker = \"host\"\n", "mqtt.broker"),
            (
                "[mqtt]\nbroker = \"h:1\"\nprotocol = \"4\"\n",
                "mqtt.protocol",
            ),
            (
                "[ble]\ntransport = \"sim\"\nsim_endpoint = \"udp:x\"\n",
                "ble.sim_endpoint",
            ),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        // The environment overrides a typed value too (a number becomes the version).
        std::fs::write(&path, "[mqtt]\nbroker = \"h:1\"\n").unwrap();
        let env = [("LOCKBRIDGE_MQTT__PROTOCOL".to_string(), "5".to_string())];
        assert_eq!(
            Config::load_with_env(&path, env).unwrap().mqtt.protocol,
            MqttProtocol::V5
        );
    }
}
