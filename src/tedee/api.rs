//! Tedee's cloud API as the provider uses it (tedee-cloud.md Part B), one call at a time: the
//! URL and headers, the envelope, error answers in any shape (JSON, empty, HTML), correlation
//! ids, the clock check and the per-call debug line. When to call and when to retry is
//! [`super::policy`]'s; this module only says how a call ended, in [`CallError`]'s words.
//!
//! Every answer is hostile until checked: bodies are read up to [`MAX_BODY`], strings and
//! lists are bounded, and a success answer missing a documented field is refused whole (E-20).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;
use zeroize::Zeroizing;

use super::policy::Outcome;
use crate::config::Tedee;

/// The most of an answer read; Tedee's largest (a lock list) is a few KiB per lock.
pub const MAX_BODY: usize = 1024 * 1024;
/// The most locks one account listing is taken with.
pub const MAX_LOCKS: usize = 1000;
const MAX_STRING: usize = 4096;
/// A hub clock further than this from Tedee's `Date` is warned about (E-09).
const CLOCK_SKEW_WARNING: Duration = Duration::from_secs(300);

/// The Personal Access Key: zeroized when dropped, never printed.
pub struct Pak(Zeroizing<String>);

impl std::fmt::Debug for Pak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pak({}…)", self.prefix())
    }
}

impl Pak {
    /// One line from `path`, trimmed; the file must be this user's and 0600 (E-01, E-02).
    // A wildcard on purpose: any other key error says what is wrong itself.
    #[allow(clippy::wildcard_enum_match_arm)]
    pub fn read(path: &Path) -> Result<Pak, String> {
        let bytes = crate::keys::read_secret(path).map_err(|e| match e {
            crate::keys::KeyError::NotFound { .. } => {
                format!(
                    "{}: not found. Create a Personal Access Key in the Tedee Portal (Personal Access Keys) with scopes Device.Read, DeviceCertificate.Operate, Mobile.ReadWrite, and save it there with mode 0600.",
                    path.display()
                )
            }
            other => other.to_string(),
        })?;
        let text = Zeroizing::new(
            String::from_utf8(bytes.to_vec())
                .map_err(|_| format!("{}: the Tedee key is not text", path.display()))?,
        );
        let key = text.trim();
        if key.is_empty() || key.contains(char::is_whitespace) || key.len() > 512 {
            return Err(format!(
                "{}: expected one line holding the Personal Access Key",
                path.display()
            ));
        }
        Ok(Pak(Zeroizing::new(key.to_string())))
    }

    /// The part before the first `.`: the only part of the key a log may show.
    pub fn prefix(&self) -> &str {
        let prefix = self.0.split('.').next().unwrap_or_default();
        if prefix.len() == self.0.len() || prefix.len() > 16 {
            ""
        } else {
            prefix
        }
    }

    /// The same key as another read of the file.
    pub fn same(&self, other: &Pak) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

/// How a call failed. Every variant carries what the operator needs to act.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// 429: the account's hourly limit (E-07).
    RateLimited {
        retry_after: Option<Duration>,
        correlation: String,
    },
    /// 401 (E-03 once the re-read key did not help).
    Unauthorized { correlation: String },
    /// 403: a scope is missing (E-04), or access to a lock was removed (E-14).
    Forbidden {
        messages: Vec<String>,
        correlation: String,
    },
    NotFound {
        messages: Vec<String>,
        correlation: String,
    },
    /// Tedee does not take this API version (E-06).
    VersionRefused {
        status: u16,
        offered: String,
        correlation: String,
    },
    /// Another 4xx.
    Refused {
        status: u16,
        messages: Vec<String>,
        correlation: String,
    },
    /// 5xx, in whatever shape (E-08).
    Server {
        status: u16,
        body: String,
        correlation: String,
    },
    /// Timeout, DNS, connection or TLS failure (E-08): the cause, as the HTTP stack says it.
    Network(String),
    /// A success that does not have the documented shape (E-20).
    Protocol { call: &'static str, what: String },
}

impl CallError {
    /// What the retry policy makes of it.
    pub fn outcome(&self) -> Outcome {
        match self {
            CallError::RateLimited { retry_after, .. } => Outcome::RateLimited(*retry_after),
            CallError::Unauthorized { .. } => Outcome::Unauthorized,
            CallError::Server { .. } | CallError::Network(_) => Outcome::Transient,
            CallError::Forbidden { .. }
            | CallError::NotFound { .. }
            | CallError::VersionRefused { .. }
            | CallError::Refused { .. }
            | CallError::Protocol { .. } => Outcome::Refused,
        }
    }

    /// `(Tedee HTTP 403, correlation id …)`, for the messages of Part A §6.
    pub fn tail(&self) -> String {
        let (status, correlation) = match self {
            CallError::RateLimited { correlation, .. } => (429, correlation),
            CallError::Unauthorized { correlation } => (401, correlation),
            CallError::Forbidden { correlation, .. } => (403, correlation),
            CallError::NotFound { correlation, .. } => (404, correlation),
            CallError::VersionRefused {
                status,
                correlation,
                ..
            }
            | CallError::Refused {
                status,
                correlation,
                ..
            }
            | CallError::Server {
                status,
                correlation,
                ..
            } => (*status, correlation),
            CallError::Network(_) | CallError::Protocol { .. } => return String::new(),
        };
        if correlation.is_empty() {
            format!(" (Tedee HTTP {status})")
        } else {
            format!(" (Tedee HTTP {status}, correlation id {correlation})")
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let joined = |m: &[String]| {
            if m.is_empty() {
                String::new()
            } else {
                format!(": {}", m.join(" | "))
            }
        };
        match self {
            CallError::RateLimited { retry_after, .. } => write!(
                f,
                "Tedee's rate limit for this account is reached (700 requests per hour, shared with the owner's apps); next try in {} s",
                retry_after
                    .unwrap_or(super::policy::DEFAULT_RETRY_AFTER)
                    .as_secs()
            )?,
            CallError::Unauthorized { .. } => {
                f.write_str("Tedee refused the personal access key")?
            }
            CallError::Forbidden { messages, .. } => {
                write!(f, "Tedee refused the call{}", joined(messages))?
            }
            CallError::NotFound { messages, .. } => {
                write!(f, "Tedee does not know it{}", joined(messages))?
            }
            CallError::VersionRefused { offered, .. } => write!(
                f,
                "Tedee does not accept this API version (it offers: {}). Set credentials.tedee.api_version",
                if offered.is_empty() {
                    "not said"
                } else {
                    offered
                }
            )?,
            CallError::Refused {
                status, messages, ..
            } => write!(
                f,
                "Tedee refused the call (HTTP {status}){}",
                joined(messages)
            )?,
            CallError::Server { status, body, .. } => {
                write!(f, "Tedee cloud unreachable (HTTP {status}, {body})")?
            }
            CallError::Network(cause) => write!(f, "Tedee cloud unreachable ({cause})")?,
            CallError::Protocol { call, what } => write!(
                f,
                "Unexpected answer from Tedee for {call} ({what}); the API may have changed: check credentials.tedee.api_version"
            )?,
        }
        f.write_str(&self.tail())
    }
}

/// A key's 65-byte uncompressed point, as Tedee takes and gives keys.
pub fn point(key: &p256::ecdsa::VerifyingKey) -> [u8; 65] {
    key.to_encoded_point(false)
        .as_bytes()
        .try_into()
        .expect("an uncompressed P-256 point is 65 bytes")
}

/// One lock of the account (`GET my/lock`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AccountLock {
    pub id: u32,
    pub serial: String,
    pub name: String,
    /// Device type: 2 Lock PRO, 4 Lock GO, …
    pub model: u32,
    /// 0 Guest, 1 Admin, 2 Owner, 3 None.
    pub access_level: u32,
}

impl AccountLock {
    pub fn model_name(&self) -> &'static str {
        match self.model {
            2 => "Lock PRO",
            4 => "Lock GO",
            _ => "other",
        }
    }

    pub fn access_name(&self) -> &'static str {
        match self.access_level {
            0 => "guest",
            1 => "admin",
            2 => "owner",
            3 => "none",
            _ => "unknown",
        }
    }
}

/// `getformobile`'s answer, decoded and checked (Part A §5.4) but for the mobile key, which
/// the caller compares with its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateAnswer {
    pub certificate: Vec<u8>,
    /// The string as Tedee sent it, and as parsed (`None`: unreadable, E-21).
    pub expiration: String,
    pub expiration_ms: Option<u64>,
    pub device_public_key: [u8; 65],
    pub mobile_public_key: Vec<u8>,
}

/// The HTTP side: one client for every call, TLS configured by lockbridge.
pub struct Api {
    http: reqwest::Client,
    /// `{api_url}/api/{api_version}/`
    base: String,
    version: String,
}

/// The trust anchors: the system's roots plus `extra_ca_file`.
pub fn roots(extra_ca: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let system = PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
    let mut roots = rustls::RootCertStore::empty();
    if system.exists() {
        for cert in crate::cloud::certs::read_certificates(&system).map_err(|e| e.to_string())? {
            // One unusable system root does not stop the others.
            let _ = roots.add(cert);
        }
    }
    if let Some(extra) = extra_ca {
        let certs = crate::cloud::certs::read_certificates(extra)
            .map_err(|e| format!("credentials.tedee.extra_ca_file: {e}"))?;
        for cert in certs {
            roots.add(cert).map_err(|e| {
                format!("credentials.tedee.extra_ca_file: {}: {e}", extra.display())
            })?;
        }
    }
    if roots.is_empty() {
        return Err(format!(
            "no trust anchors for Tedee's TLS: {} is missing (install ca-certificates) and no credentials.tedee.extra_ca_file is set",
            system.display()
        ));
    }
    Ok(roots)
}

impl Api {
    /// `extra_ca` resolved against the state directory by the caller.
    pub fn new(config: &Tedee, extra_ca: Option<&Path>) -> Result<Api, String> {
        Tedee::check_url(&config.api_url).map_err(|e| format!("credentials.tedee.api_url: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots(extra_ca)?)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(config.request_timeout_s))
            .connect_timeout(Duration::from_secs(config.request_timeout_s))
            .user_agent(concat!("lockbridge/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("the HTTP client: {e}"))?;
        Ok(Api {
            http,
            base: format!(
                "{}/api/{}/",
                config.api_url.trim_end_matches('/'),
                config.api_version
            ),
            version: config.api_version.clone(),
        })
    }

    /// `GET my/lock`: the account's locks (Device.Read).
    pub async fn list_locks(&self, key: &Pak) -> Result<Vec<AccountLock>, CallError> {
        const CALL: &str = "GET my/lock";
        let result = self
            .call(key, reqwest::Method::GET, "my/lock", None)
            .await?;
        let protocol = |what: String| CallError::Protocol { call: CALL, what };
        let items = result
            .as_array()
            .ok_or_else(|| protocol("result is not a list".into()))?;
        if items.len() > MAX_LOCKS {
            return Err(protocol(format!(
                "{} locks; at most {MAX_LOCKS}",
                items.len()
            )));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let id = v["id"]
                    .as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| protocol(format!("lock {i} has no numeric id")))?;
                let serial = bounded(&v["serialNumber"])
                    .map(one_line)
                    .ok_or_else(|| protocol(format!("lock {id} has no serialNumber")))?;
                let small = |k: &str| v[k].as_u64().and_then(|n| u32::try_from(n).ok());
                Ok(AccountLock {
                    id,
                    serial,
                    name: bounded(&v["name"]).map(one_line).unwrap_or_default(),
                    model: small("type").unwrap_or(0),
                    access_level: small("accessLevel").unwrap_or(3),
                })
            })
            .collect()
    }

    /// `POST my/mobile` (Mobile.ReadWrite): register `public_key` (the 65-byte point); the
    /// mobile id.
    pub async fn register(
        &self,
        key: &Pak,
        name: &str,
        public_key: &[u8; 65],
    ) -> Result<String, CallError> {
        let body = serde_json::json!({
            "name": name,
            "operatingSystem": 3,
            "publicKey": B64.encode(public_key),
        });
        let result = self
            .call(key, reqwest::Method::POST, "my/mobile", Some(body))
            .await?;
        result["id"]
            .as_str()
            .filter(|id| is_uuid(id))
            .map(str::to_string)
            .ok_or_else(|| CallError::Protocol {
                call: "POST my/mobile",
                what: "result.id is not a UUID".into(),
            })
    }

    /// `GET my/mobile/{id}`: does the registration still exist? (404 = gone.)
    pub async fn get_mobile(&self, key: &Pak, mobile_id: &str) -> Result<(), CallError> {
        let path = format!("my/mobile/{}", checked_uuid(mobile_id)?);
        self.call(key, reqwest::Method::GET, &path, None)
            .await
            .map(|_| ())
    }

    /// `DELETE my/mobile/{id}`: a 204 is success whether or not it has a body.
    pub async fn delete_mobile(&self, key: &Pak, mobile_id: &str) -> Result<(), CallError> {
        let path = format!("my/mobile/{}", checked_uuid(mobile_id)?);
        self.call(key, reqwest::Method::DELETE, &path, None)
            .await
            .map(|_| ())
    }

    /// `GET my/devicecertificate/getformobile` (DeviceCertificate.Operate).
    pub async fn certificate(
        &self,
        key: &Pak,
        mobile_id: &str,
        device_id: u32,
    ) -> Result<CertificateAnswer, CallError> {
        const CALL: &str = "GET my/devicecertificate/getformobile";
        let path = format!(
            "my/devicecertificate/getformobile?mobileId={}&deviceId={device_id}",
            checked_uuid(mobile_id)?
        );
        let result = self.call(key, reqwest::Method::GET, &path, None).await?;
        let protocol = |what: &str| CallError::Protocol {
            call: CALL,
            what: what.into(),
        };
        let b64 = |k: &str| -> Result<Vec<u8>, CallError> {
            let text = bounded(&result[k]).ok_or_else(|| protocol(&format!("no {k}")))?;
            let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            B64.decode(compact)
                .map_err(|_| protocol(&format!("{k} is not Base64")))
        };
        let certificate = b64("certificate")?;
        if certificate.is_empty() {
            return Err(protocol("certificate is empty"));
        }
        let expiration =
            bounded(&result["expirationDate"]).ok_or_else(|| protocol("no expirationDate"))?;
        let device_public_key: [u8; 65] = b64("devicePublicKey")?
            .try_into()
            .map_err(|_| protocol("devicePublicKey is not a 65-byte point"))?;
        crate::ptls::wire::decode_point(&device_public_key)
            .map_err(|_| protocol("devicePublicKey is not a P-256 point"))?;
        Ok(CertificateAnswer {
            certificate,
            expiration_ms: parse_date_ms(&expiration),
            expiration,
            device_public_key,
            mobile_public_key: b64("mobilePublicKey")?,
        })
    }

    /// `GET datetime/getsignedtime` (Device.Read): 8 bytes of Unix ms and a DER signature.
    pub async fn signed_time(&self, key: &Pak) -> Result<crate::ptls::api::SignedTime, CallError> {
        const CALL: &str = "GET datetime/getsignedtime";
        let result = self
            .call(key, reqwest::Method::GET, "datetime/getsignedtime", None)
            .await?;
        let protocol = |what: &str| CallError::Protocol {
            call: CALL,
            what: what.into(),
        };
        let b64 = |k: &str| {
            bounded(&result[k])
                .and_then(|s| B64.decode(s.trim()).ok())
                .ok_or_else(|| protocol(&format!("{k} is not Base64")))
        };
        let datetime: [u8; 8] = b64("datetime")?
            .try_into()
            .map_err(|_| protocol("datetime is not 8 bytes"))?;
        let signature = b64("signature")?;
        if signature.first() != Some(&0x30) || signature.len() > 80 {
            return Err(protocol("signature is not a DER sequence"));
        }
        Ok(crate::ptls::api::SignedTime {
            datetime,
            signature,
        })
    }

    /// One call: the envelope's `result` (Null for a 204), or how it failed. Logged once at
    /// debug level; the key never is.
    async fn call(
        &self,
        key: &Pak,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Value>,
    ) -> Result<Value, CallError> {
        let started = Instant::now();
        let url = format!("{}{path_and_query}", self.base);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .header("Authorization", format!("PersonalKey {}", key.0.as_str()))
            .header("Accept", "application/json");
        if let Some(body) = &body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.to_string());
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| CallError::Network(cause(&e)))?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.chars().take(200).collect::<String>())
                .unwrap_or_default()
        };
        let correlation = header("x-correlation-id");
        let supported = header("api-supported-versions");
        let retry_after = header("retry-after").trim().parse::<u64>().ok();
        let date = header("date");
        let mut bytes = Vec::new();
        if status != 204 {
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| CallError::Network(cause(&e)))?
            {
                if bytes.len() + chunk.len() > MAX_BODY {
                    return Err(CallError::Protocol {
                        call: "a call",
                        what: format!("{method} {path_and_query}: answer over {MAX_BODY} bytes"),
                    });
                }
                bytes.extend_from_slice(&chunk);
            }
        }
        log::debug!(
            "tedee: {method} {path_and_query} -> {status} in {} ms (correlation id {correlation}; api-supported-versions {supported})",
            started.elapsed().as_millis()
        );
        check_clock(&date);
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        let messages = json
            .as_ref()
            .and_then(|v| v["errorMessages"].as_array())
            .map(|m| {
                m.iter()
                    .filter_map(|s| s.as_str())
                    .take(8)
                    .map(|s| s.chars().take(300).collect())
                    .collect::<Vec<String>>()
            })
            .unwrap_or_default();
        match status {
            204 => Ok(Value::Null),
            200..=299 => {
                let v = json.ok_or_else(|| CallError::Protocol {
                    call: "a call",
                    what: format!("{method} {path_and_query}: the answer is not JSON"),
                })?;
                if v["success"] != Value::Bool(true) {
                    return Err(CallError::Protocol {
                        call: "a call",
                        what: format!("{method} {path_and_query}: success is not true"),
                    });
                }
                Ok(v["result"].clone())
            }
            429 => Err(CallError::RateLimited {
                retry_after: retry_after.map(Duration::from_secs),
                correlation,
            }),
            401 => Err(CallError::Unauthorized { correlation }),
            400 | 404 | 410 if names_version(&messages, &supported, &self.version) => {
                Err(CallError::VersionRefused {
                    status,
                    offered: supported,
                    correlation,
                })
            }
            403 => Err(CallError::Forbidden {
                messages,
                correlation,
            }),
            404 => Err(CallError::NotFound {
                messages,
                correlation,
            }),
            400..=499 => Err(CallError::Refused {
                status,
                messages,
                correlation,
            }),
            _ => Err(CallError::Server {
                status,
                body: describe_body(&bytes, json.is_some()),
                correlation,
            }),
        }
    }
}

/// A string field, bounded.
/// Text shown to a person as one line: control characters (line breaks, terminal escapes)
/// become spaces.
fn one_line(s: String) -> String {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    } else {
        s
    }
}

fn bounded(v: &Value) -> Option<String> {
    v.as_str()
        .filter(|s| !s.is_empty() && s.len() <= MAX_STRING)
        .map(str::to_string)
}

pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

fn checked_uuid(id: &str) -> Result<&str, CallError> {
    if is_uuid(id) {
        Ok(id)
    } else {
        Err(CallError::Protocol {
            call: "my/mobile",
            what: format!(
                "the stored mobile id {:?} is not a UUID",
                id.chars().take(40).collect::<String>()
            ),
        })
    }
}

/// The version is refused when Tedee says so in words, or lists what it offers without it.
fn names_version(messages: &[String], supported: &str, version: &str) -> bool {
    let bare = version.trim_start_matches('v');
    messages
        .iter()
        .any(|m| m.to_ascii_lowercase().contains("version"))
        || (!supported.is_empty()
            && !supported
                .split(',')
                .any(|v| v.trim().trim_start_matches('v') == bare))
}

/// What a 5xx answer held, for the message: never the body itself.
fn describe_body(bytes: &[u8], json: bool) -> String {
    if bytes.is_empty() {
        "an empty answer".into()
    } else if json {
        "a JSON error".into()
    } else if bytes.windows(5).any(|w| w.eq_ignore_ascii_case(b"<html")) {
        "an HTML page".into()
    } else {
        format!("{} bytes of text", bytes.len())
    }
}

/// The HTTP stack's error, with its causes (TLS verification errors name the certificate).
fn cause(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "could not connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    if text.contains("certificate") || text.contains("UnknownIssuer") {
        text.push_str(" — Tedee's certificate did not verify; for a test double set credentials.tedee.extra_ca_file");
    }
    text
}

/// E-09: the hub's clock against Tedee's `Date` header.
fn check_clock(date: &str) {
    let Some(tedee_ms) = parse_http_date_ms(date) else {
        return;
    };
    let ours = crate::clock::unix_ms();
    let skew = ours.abs_diff(tedee_ms);
    if skew > CLOCK_SKEW_WARNING.as_millis() as u64 {
        log::warn!(
            "tedee: This hub's clock is {} s off Tedee's; certificate expiry and lock time checks depend on it. Fix time sync (e.g. systemd-timesyncd).",
            skew / 1000
        );
    }
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 IMF-fixdate) in Unix ms.
pub fn parse_http_date_ms(s: &str) -> Option<u64> {
    let mut parts = s.split_whitespace();
    let _weekday = parts.next()?;
    let day: u32 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let h: u32 = hms.next()?.parse().ok()?;
    let m: u32 = hms.next()?.parse().ok()?;
    let sec: u32 = hms.next()?.parse().ok()?;
    if parts.next()? != "GMT" {
        return None;
    }
    to_unix_ms(year, month, day, h, m, sec, 0, 0)
}

/// Tedee's dates (Part B §6.3): RFC 3339 / ISO 8601 with 0–7 fractional digits and `Z` or
/// `±hh:mm`; no zone means UTC. `None` for anything else (E-21).
pub fn parse_date_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let (date, time) = s.split_once(['T', 't', ' '])?;
    let mut d = date.split('-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    if d.next().is_some() {
        return None;
    }
    // Split off the zone: Z, +hh:mm or -hh:mm after the seconds.
    let (clock, offset_min): (&str, i64) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else if let Some(i) = time.rfind(['+', '-']) {
        let (c, z) = time.split_at(i);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (zh, zm) = z[1..].split_once(':').unwrap_or((&z[1..], "0"));
        let (zh, zm): (i64, i64) = (zh.parse().ok()?, zm.parse().ok()?);
        if zh > 23 || zm > 59 {
            return None;
        }
        (c, sign * (zh * 60 + zm))
    } else {
        (time, 0)
    };
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    if fraction.len() > 7 || !fraction.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut t = hms.split(':');
    let h: u32 = t.next()?.parse().ok()?;
    let m: u32 = t.next()?.parse().ok()?;
    let sec: u32 = t.next().unwrap_or("0").parse().ok()?;
    if t.next().is_some() {
        return None;
    }
    let ms: u32 = format!("{fraction:0<3}")[..3].parse().ok()?;
    to_unix_ms(year, month, day, h, m, sec, ms, offset_min)
}

#[allow(clippy::too_many_arguments)]
fn to_unix_ms(
    year: i64,
    month: u32,
    day: u32,
    h: u32,
    m: u32,
    s: u32,
    ms: u32,
    offset_min: i64,
) -> Option<u64> {
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || h > 23
        || m > 59
        || s > 60
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs =
        days * 86_400 + i64::from(h) * 3600 + i64::from(m) * 60 + i64::from(s) - offset_min * 60;
    u64::try_from(secs * 1000 + i64::from(ms)).ok()
}

/// Unix ms now, for state files.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tedees_dates_in_every_documented_shape() {
        // The docs' sample: 6 fractional digits and Z.
        assert_eq!(
            parse_date_ms("2021-12-12T00:00:00.000000Z"),
            Some(1_639_267_200_000)
        );
        // No zone is UTC; 3 digits; 7 digits; none.
        assert_eq!(
            parse_date_ms("2020-11-20T13:59:26.212"),
            Some(1_605_880_766_212)
        );
        assert_eq!(
            parse_date_ms("2021-12-12T00:00:00.1234567Z"),
            Some(1_639_267_200_123)
        );
        assert_eq!(
            parse_date_ms("2021-12-12T00:00:00Z"),
            Some(1_639_267_200_000)
        );
        // Offsets.
        assert_eq!(
            parse_date_ms("2021-12-12T02:00:00+02:00"),
            Some(1_639_267_200_000)
        );
        assert_eq!(
            parse_date_ms("2021-12-11T22:30:00-01:30"),
            Some(1_639_267_200_000)
        );
        for bad in [
            "",
            "tomorrow",
            "2021-13-01T00:00:00Z",
            "2021-12-12T00:00:00.12345678Z",
            "2021-12-12T25:00:00Z",
            "2021-12-12",
            "2021-12-12T00:00:00+99:00",
        ] {
            assert_eq!(parse_date_ms(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_http_date_ms("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777_000)
        );
        assert_eq!(parse_http_date_ms("yesterday"), None);
    }

    #[test]
    fn the_key_shows_only_its_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tedee.pak");
        std::fs::write(
            &path,
            "smnxaz.IWA6u00VLQmA8tlfioDXcH+bSiI6u8LgTG9cv3Evh/E\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key = Pak::read(&path).unwrap();
        assert_eq!(key.prefix(), "smnxaz");
        let shown = format!("{key:?}");
        assert_eq!(shown, "Pak(smnxaz…)");
        assert!(!shown.contains("IWA6"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Pak::read(&path).unwrap_err();
        assert!(err.contains("chmod 600"), "{err}");
        let missing = Pak::read(&dir.path().join("none.pak")).unwrap_err();
        assert!(
            missing.contains("Create a Personal Access Key"),
            "{missing}"
        );
    }

    #[test]
    fn version_refusals_are_told_apart() {
        assert!(names_version(
            &["API version v99 is not supported".into()],
            "",
            "v99"
        ));
        assert!(names_version(&[], "1.36, 37", "v38"));
        assert!(!names_version(&[], "1.36, 37", "v37"));
        assert!(!names_version(
            &["mobile device not found".into()],
            "",
            "v37"
        ));
    }
}
