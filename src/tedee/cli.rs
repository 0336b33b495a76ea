//! `lockbridge tedee …`: onboarding from the Tedee account (tedee-cloud.md Part A §4) — check
//! the key and its scopes against the configured locks, list the account's locks with a
//! `[[locks]]` block for each one not configured yet, and register or unregister this hub's
//! key as a Tedee "mobile". Each command makes the fewest calls it can and says what to do
//! about every refusal. (`tedee fetch` asks the running daemon, over the control socket.)

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;

use super::api::{AccountLock, Api, CallError, Pak};
use super::store::{Registration, Store};
use crate::config::Config;

/// What each call needs of the key (Part B §2.1), for the messages of E-04.
const SCOPE_LIST: (&str, &str) = ("Device.Read", "list the account's locks");
const SCOPE_MOBILE: (&str, &str) = ("Mobile.ReadWrite", "register this hub as a mobile");

/// The key, the API and the state, from the daemon's configuration.
pub struct Tedee {
    pub config: Config,
    pub api: Api,
    pub key: Pak,
    pub pak_path: PathBuf,
}

impl Tedee {
    pub fn open(config: Config) -> anyhow::Result<Tedee> {
        let t = &config.credentials.tedee;
        let dir = &config.gateway.state_dir;
        let extra = (!t.extra_ca_file.is_empty()).then(|| dir.join(&t.extra_ca_file));
        let api = Api::new(t, extra.as_deref()).map_err(anyhow::Error::msg)?;
        let pak_path = dir.join(&t.pak_file);
        let key = Pak::read(&pak_path).map_err(anyhow::Error::msg)?;
        Ok(Tedee {
            config,
            api,
            key,
            pak_path,
        })
    }

    /// A refusal in the operator's words (Part A §6).
    // A wildcard on purpose: every other answer says what is wrong itself.
    #[allow(clippy::wildcard_enum_match_arm)]
    fn explain(&self, e: &CallError, scope: (&str, &str)) -> String {
        match e {
            CallError::Unauthorized { .. } => format!(
                "Tedee refused the personal access key `{}…`: it is wrong, expired or revoked. Create a new one and replace {}{}",
                self.key.prefix(),
                self.pak_path.display(),
                e.tail()
            ),
            CallError::Forbidden { .. } => format!(
                "The Tedee key `{}…` lacks scope {}, needed to {}. Edit the key's scopes in the Tedee Portal{}",
                self.key.prefix(),
                scope.0,
                scope.1,
                e.tail()
            ),
            other => other.to_string(),
        }
    }

    /// The gateway key's public point, as Tedee registers it.
    fn public_point(&self) -> anyhow::Result<[u8; 65]> {
        let key = crate::keys::load(&self.config.key_path())
            .map_err(|e| anyhow::anyhow!("gateway key {e}"))?;
        Ok(super::api::point(key.verifying_key()))
    }

    fn mobile_name(&self) -> String {
        let name = &self.config.credentials.tedee.mobile_name;
        if !name.is_empty() {
            return name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("lockbridge-{}", host.trim())
    }
}

/// `tedee check`: the key works, has the scope to list locks, and every configured serial is
/// on the account (E-10) with the configured device id (E-11). Returns whether all is well.
pub async fn check(t: &Tedee, json_out: bool, out: &mut dyn Write) -> anyhow::Result<bool> {
    let locks = match t.api.list_locks(&t.key).await {
        Ok(l) => l,
        Err(e) => {
            let why = t.explain(&e, SCOPE_LIST);
            if json_out {
                writeln!(
                    out,
                    "{}",
                    json!({"ok": false, "error": why, "scope_needed": SCOPE_LIST.0})
                )?;
                return Ok(false);
            }
            anyhow::bail!("{why}");
        }
    };
    let problems = configured_problems(&t.config, &locks);
    if json_out {
        writeln!(
            out,
            "{}",
            json!({
                "ok": problems.is_empty(),
                "key_prefix": t.key.prefix(),
                "locks": locks,
                "problems": problems,
            })
        )?;
    } else {
        writeln!(
            out,
            "Tedee key `{}…`: accepted; {} lock(s) on the account",
            t.key.prefix(),
            locks.len()
        )?;
        print_table(&locks, out)?;
        for p in &problems {
            writeln!(out, "problem: {p}")?;
        }
        if problems.is_empty() && !t.config.locks.is_empty() {
            writeln!(out, "every configured lock is on the account")?;
        }
    }
    Ok(problems.is_empty())
}

/// `tedee locks`: the account's locks (one request), and for each that is not configured yet
/// a `[[locks]]` block to paste into the configuration.
pub async fn locks(t: &Tedee, json_out: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let locks = t
        .api
        .list_locks(&t.key)
        .await
        .map_err(|e| anyhow::anyhow!("{}", t.explain(&e, SCOPE_LIST)))?;
    let mut taken: Vec<String> = t.config.locks.iter().map(|l| l.id.clone()).collect();
    let rows: Vec<(&AccountLock, Option<String>, Option<String>)> = locks
        .iter()
        .map(|l| {
            let configured = t
                .config
                .locks
                .iter()
                .find(|c| c.serial == l.serial)
                .map(|c| c.id.clone());
            let block = configured.is_none().then(|| {
                let id = unique_id(&l.name, l.id, &taken);
                taken.push(id.clone());
                config_block(l, &id)
            });
            (l, configured, block)
        })
        .collect();
    if json_out {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(l, configured, block)| {
                json!({
                    "id": l.id, "serial": l.serial, "name": l.name,
                    "model": l.model_name(), "access": l.access_name(),
                    "configured_as": configured, "config": block,
                })
            })
            .collect();
        writeln!(out, "{}", json!({ "locks": list }))?;
        return Ok(());
    }
    writeln!(out, "{} lock(s) on the Tedee account", locks.len())?;
    if locks.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "{:<10} {:<16} {:<24} {:<9} {:<7} configured as",
        "id", "serial", "name", "model", "access"
    )?;
    for (l, configured, _) in &rows {
        writeln!(
            out,
            "{:<10} {:<16} {:<24} {:<9} {:<7} {}",
            l.id,
            l.serial,
            printable(&l.name).chars().take(24).collect::<String>(),
            l.model_name(),
            l.access_name(),
            configured.as_deref().unwrap_or("-")
        )?;
    }
    let blocks: Vec<&String> = rows.iter().filter_map(|(_, _, b)| b.as_ref()).collect();
    if blocks.is_empty() {
        writeln!(out, "\nevery lock on the account is configured")?;
    } else {
        writeln!(
            out,
            "\nTo add the others, append these blocks to the configuration file and restart lockbridge:\n"
        )?;
        for b in blocks {
            writeln!(out, "{b}")?;
        }
    }
    Ok(())
}

/// A name as one line of text: control characters (a line break above all) become spaces.
fn printable(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A lock id from the lock's name (`Front door` → `front-door`), unique among `taken`.
fn unique_id(name: &str, device_id: u32, taken: &[String]) -> String {
    let mut slug = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
        if slug.len() >= 32 {
            break;
        }
    }
    let slug = slug.trim_end_matches('-');
    let base = if slug.is_empty() {
        format!("lock-{device_id}")
    } else {
        slug.to_string()
    };
    let mut id = base.clone();
    let mut n = 2;
    while taken.contains(&id) {
        id = format!("{base}-{n}");
        n += 1;
    }
    id
}

/// The `[[locks]]` block for an account lock: the device id and key are looked up by serial.
fn config_block(l: &AccountLock, id: &str) -> String {
    let mut entry = toml::Table::new();
    entry.insert("id".into(), toml::Value::String(id.into()));
    entry.insert("serial".into(), toml::Value::String(l.serial.clone()));
    let body = toml::to_string(&entry).unwrap_or_default();
    format!(
        "# {} ({}, {} access)\n[[locks]]\n{body}",
        printable(&l.name).chars().take(64).collect::<String>(),
        l.model_name(),
        l.access_name()
    )
}

/// E-10 and E-11 for the configured locks.
fn configured_problems(config: &Config, locks: &[AccountLock]) -> Vec<String> {
    let on_account = || {
        locks
            .iter()
            .map(|l| format!("{} ({})", l.serial, l.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut problems = Vec::new();
    for entry in &config.locks {
        match locks.iter().find(|l| l.serial == entry.serial) {
            None => problems.push(format!(
                "Lock `{}` (serial {}) is not on the Tedee account of this key. Add it in the Tedee app, or fix its serial. Locks on the account: {}",
                entry.id,
                entry.serial,
                if locks.is_empty() { "none".into() } else { on_account() }
            )),
            Some(l) if entry.device_id.is_some_and(|d| d != l.id) => problems.push(format!(
                "Lock `{}`: device_id {} in the config, but Tedee says serial {} is device {}. Remove device_id or correct it.",
                entry.id,
                entry.device_id.unwrap_or_default(),
                entry.serial,
                l.id
            )),
            Some(_) => {}
        }
    }
    problems
}

fn print_table(locks: &[AccountLock], out: &mut dyn Write) -> anyhow::Result<()> {
    if locks.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "{:<10} {:<16} {:<24} {:<9} access",
        "id", "serial", "name", "model"
    )?;
    for l in locks {
        writeln!(
            out,
            "{:<10} {:<16} {:<24} {:<9} {}",
            l.id,
            l.serial,
            l.name.chars().take(24).collect::<String>(),
            l.model_name(),
            l.access_name()
        )?;
    }
    Ok(())
}

/// `tedee register`: this hub's key as a Tedee mobile, once. A registration on file is
/// checked first; it is replaced only when Tedee no longer knows it, when the key or URL
/// changed since (E-12), or with `force`.
pub async fn register(
    t: &Tedee,
    name: Option<String>,
    force: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let store = Store::open(&t.config.gateway.state_dir).map_err(anyhow::Error::msg)?;
    let point = t.public_point()?;
    let api_url = t.config.credentials.tedee.api_url.clone();
    if let Some(r) = store.registration() {
        let current = r.public_key == B64.encode(point) && r.api_url == api_url;
        if current && !force {
            match t.api.get_mobile(&t.key, &r.mobile_id).await {
                Ok(()) => {
                    writeln!(
                        out,
                        "already registered as mobile {} (\"{}\"); --force registers again",
                        r.mobile_id, r.mobile_name
                    )?;
                    return Ok(());
                }
                Err(CallError::NotFound { .. }) => writeln!(
                    out,
                    "Tedee no longer knows mobile {}: registering again",
                    r.mobile_id
                )?,
                Err(e) => anyhow::bail!("{}", t.explain(&e, SCOPE_MOBILE)),
            }
        } else if !current {
            writeln!(
                out,
                "the gateway key or Tedee URL changed since mobile {} was registered: registering the current key",
                r.mobile_id
            )?;
        }
    }
    let name = name.unwrap_or_else(|| t.mobile_name());
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        anyhow::bail!("--name: at most 64 printable characters");
    }
    let mobile_id = t
        .api
        .register(&t.key, &name, &point)
        .await
        .map_err(|e| anyhow::anyhow!("{}", t.explain(&e, SCOPE_MOBILE)))?;
    store
        .save_registration(&Registration {
            api_url,
            mobile_id: mobile_id.clone(),
            mobile_name: name.clone(),
            public_key: B64.encode(point),
            registered_at: super::store::rfc3339(crate::clock::unix_ms()),
        })
        .map_err(anyhow::Error::msg)?;
    log::info!("tedee: registered as mobile {mobile_id} (\"{name}\")");
    writeln!(out, "registered as mobile {mobile_id} (\"{name}\")")?;
    Ok(())
}

/// `tedee unregister`: delete the mobile at Tedee, then this hub's Tedee state.
pub async fn unregister(t: &Tedee, out: &mut dyn Write) -> anyhow::Result<()> {
    let store = Store::open(&t.config.gateway.state_dir).map_err(anyhow::Error::msg)?;
    let Some(r) = store.registration() else {
        anyhow::bail!(
            "this hub is not registered with Tedee ({} has no registration.json)",
            store.dir().display()
        );
    };
    match t.api.delete_mobile(&t.key, &r.mobile_id).await {
        Ok(()) => {}
        // Already gone at Tedee: the local state goes too.
        Err(CallError::NotFound { .. }) => writeln!(
            out,
            "Tedee no longer knew mobile {}; removing the local registration",
            r.mobile_id
        )?,
        Err(e) => anyhow::bail!("{}", t.explain(&e, SCOPE_MOBILE)),
    }
    store.remove_all().map_err(anyhow::Error::msg)?;
    log::info!("tedee: unregistered mobile {}", r.mobile_id);
    writeln!(
        out,
        "unregistered mobile {} and removed {}",
        r.mobile_id,
        store.dir().display()
    )?;
    Ok(())
}

/// `tedee fetch`: the running daemon fetches (it owns the cloud budget and the sessions).
pub async fn fetch(
    socket: &Path,
    locks: Vec<String>,
    json: bool,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    use crate::control::{ControlClient, Request};
    let mut client = ControlClient::connect(socket).await?;
    client.request(&Request::TedeeFetch { locks }).await?;
    let v = client.line().await?;
    if let Some(e) = v.get("error") {
        anyhow::bail!("{}", e.as_str().unwrap_or("error"));
    }
    let list = v["locks"].as_array().cloned().unwrap_or_default();
    if json {
        writeln!(out, "{v}")?;
    } else {
        for l in &list {
            let lock = l["lock"].as_str().unwrap_or("?");
            match l["error"].as_str() {
                None => writeln!(
                    out,
                    "{lock}: certificate fetched (expires {}); a parked session tries again",
                    l["cert_expires"]
                        .as_u64()
                        .map(crate::tedee::store::rfc3339)
                        .unwrap_or_else(|| "unknown".into())
                )?,
                Some(e) => writeln!(out, "{lock}: {e}")?,
            }
        }
    }
    let failed = list.iter().filter(|l| !l["error"].is_null()).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} lock(s) not fetched (above)", list.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_names_are_valid_config_ids_and_unique() {
        let taken = vec!["front-door".to_string(), "front-door-2".to_string()];
        assert_eq!(unique_id("Front door", 1, &taken), "front-door-3");
        assert_eq!(unique_id("  Garage / Side  ", 1, &[]), "garage-side");
        // Nothing usable in the name: the device id.
        assert_eq!(unique_id("🔒🔒", 42, &[]), "lock-42");
        assert_eq!(unique_id("", 7, &[]), "lock-7");
        let long = unique_id(&"x".repeat(500), 1, &[]);
        assert!(long.len() <= 32, "{long}");
        for id in [unique_id("Ä-ö ü", 3, &[]), long] {
            assert!(
                id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                "{id}"
            );
        }
    }
}
