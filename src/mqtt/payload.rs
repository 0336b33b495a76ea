//! What goes over MQTT, as pure functions: command payloads in, state, availability and Home
//! Assistant discovery documents out. The topic layout is design §7.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::command::{Action, Mode, check_id, ttl_from_secs};
use crate::ptls::api::DoorState;
use crate::registry::LockView;

/// A command as it arrived on `<root>/locks/<lock>/set`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetCommand {
    pub action: Action,
    pub mode: Mode,
    pub id: Option<String>,
    pub ttl: Option<Duration>,
    /// Home Assistant's `OPEN`: unlock and pull when locked, pull when unlocked. The bridge
    /// picks the action from the lock's state ([`open`]); `action` is `Unlock` until then.
    pub open: bool,
}

/// What Home Assistant's `OPEN` does to a lock with a pull spring in `state`: an unlock of a
/// locked (or part-way) lock pulls the latch when it gets there (spec §5.2); an unlocked one is
/// pulled. An unknown state is treated as locked: unlocking an unlocked lock with a pull
/// spring pulls it too.
pub fn open(state: Option<crate::ptls::api::LockState>) -> (Action, Mode) {
    match state {
        Some(crate::ptls::api::LockState::Unlocked) => (Action::Pull, Mode::Normal),
        _ => (Action::Unlock, Mode::Normal),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonCommand {
    action: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    ttl_s: Option<u64>,
}

/// The longest command payload taken; a longer one is refused with a result (a command is a
/// hundred bytes or so).
pub const MAX_COMMAND_BYTES: usize = 1024;

/// Parse a command: JSON `{"action","mode","id","ttl_s"}` or Home Assistant's plain
/// `LOCK`, `UNLOCK` (without pulling the latch) and `OPEN` (see [`open`]). The error says what
/// is wrong.
pub fn parse_set(payload: &[u8]) -> Result<SetCommand, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "the payload is not UTF-8".to_string())?;
    let text = text.trim();
    let plain = match text.to_ascii_uppercase().as_str() {
        "LOCK" => Some((Action::Lock, Mode::Normal, false)),
        // Home Assistant's Unlock never pulls the latch: that is its Open.
        "UNLOCK" => Some((Action::Unlock, Mode::WithoutPull, false)),
        "OPEN" => Some((Action::Unlock, Mode::Normal, true)),
        _ => None,
    };
    if let Some((action, mode, open)) = plain {
        return Ok(SetCommand {
            action,
            mode,
            id: None,
            ttl: None,
            open,
        });
    }
    if !text.starts_with('{') {
        return Err(format!(
            "{:?}: send LOCK, UNLOCK, OPEN or JSON {{\"action\": \"unlock\", \"id\": \"…\"}}",
            truncate(text, 40)
        ));
    }
    let c: JsonCommand = serde_json::from_str(text).map_err(|e| format!("JSON: {e}"))?;
    let action: Action = c.action.parse()?;
    let mode = match c.mode.as_deref() {
        None => Mode::Normal,
        Some(m) => m.parse()?,
    };
    if let Some(id) = &c.id {
        check_id(id)?;
    }
    let ttl = c.ttl_s.map(ttl_from_secs).transpose()?;
    Ok(SetCommand {
        action,
        mode,
        id: c.id,
        ttl,
        open: false,
    })
}

/// The id and action of a command that did not parse, where they can be read, so that its
/// refusal can name them.
pub fn id_and_action(payload: &[u8]) -> (Option<String>, Option<Action>) {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return (None, None);
    };
    let id = v["id"]
        .as_str()
        .filter(|id| check_id(id).is_ok())
        .map(str::to_string);
    let action = v["action"].as_str().and_then(|a| a.parse().ok());
    (id, action)
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The retained `<root>/locks/<lock>/state` document.
pub fn state(view: &LockView) -> Value {
    let secs = |ms: u64| ms / 1000;
    json!({
        "serial": view.serial,
        "state": view.state,
        "jammed": view.jammed,
        "door": view.door,
        "last_trigger": view.last_trigger,
        "last_access_id": view.last_access_id,
        "status": view.status,
        "battery": view.battery,
        "charging": view.charging,
        "rssi": view.rssi,
        "available": view.available,
        "session": {
            "established_at": view.session_established_ms.map(secs),
            "expires_at": view.session_expires_ms.map(secs),
        },
        "updated_at": secs(view.updated_ms),
        "last_error": view.last_error,
        "credentials": view.credentials,
    })
}

/// `online` or `offline` for `<root>/locks/<lock>/availability`.
pub fn availability(view: &LockView) -> &'static str {
    if view.available { "online" } else { "offline" }
}

/// What Home Assistant discovery needs to know beyond a lock's view.
pub struct Discovery<'a> {
    pub prefix: &'a str,
    pub root: &'a str,
    pub gateway: &'a str,
    pub version: &'a str,
    /// Offer `OPEN`: the lock has a pull spring and the MQTT origin may pull it.
    pub open: bool,
}

/// The gateway's own device, which every lock names as `via_device`. Home Assistant takes
/// only letters, digits, `_` and `-` in the node id of a discovery topic.
fn gateway_device_id(gateway: &str) -> String {
    let id: String = gateway
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("lockbridge_{id}")
}

/// Who published a discovery document (Home Assistant logs and shows it).
fn origin(version: &str) -> Value {
    json!({
        "name": "lockbridge",
        "sw_version": version,
    })
}

/// Discovery documents for one lock: (topic, retained payload) for the lock entity and its
/// battery and signal-strength sensors. The lock is the device's main feature (named after
/// the device); the sensors are named by Home Assistant after their device class ("Battery",
/// "Signal strength"). Every document carries the whole device block, name included.
pub fn discovery(d: &Discovery, view: &LockView) -> Vec<(String, Value)> {
    let node = gateway_device_id(d.gateway);
    let object = view.id.replace('.', "_");
    let lock_topic = format!("{}/locks/{}", d.root, view.id);
    // No serial_number: Home Assistant before 2024.2 refuses the whole document for it. The
    // lock's serial is in its state (`<root>/locks/<lock>/state`) and its second identifier.
    let device = json!({
        "identifiers": [format!("{node}_{object}"), format!("tedee_{}", view.serial)],
        "name": view.id,
        "manufacturer": "Tedee",
        "model": "Lock",
        "via_device": node,
    });
    // Gateway and lock must both be online.
    let availability = json!([
        {"topic": format!("{}/status", d.root)},
        {"topic": format!("{lock_topic}/availability")},
    ]);
    let state_topic = format!("{lock_topic}/state");
    let mut lock = json!({
        "name": null,
        "unique_id": format!("{node}_{object}_lock"),
        "device": device,
        "origin": origin(d.version),
        "availability": availability,
        "availability_mode": "all",
        "command_topic": format!("{lock_topic}/set"),
        "state_topic": state_topic,
        "value_template": LOCK_STATE_TEMPLATE,
        "payload_lock": "LOCK",
        "payload_unlock": "UNLOCK",
        "state_locked": "LOCKED",
        "state_unlocked": "UNLOCKED",
        "state_locking": "LOCKING",
        "state_unlocking": "UNLOCKING",
        "state_jammed": "JAMMED",
        "state_open": "OPEN",
        "state_opening": "OPENING",
        "json_attributes_topic": state_topic,
        "json_attributes_template": "{{ {'status': value_json.status, 'charging': value_json.charging, 'last_trigger': value_json.last_trigger, 'last_access_id': value_json.last_access_id} | tojson }}",
        "optimistic": false,
        "qos": 1,
    });
    if d.open {
        lock["payload_open"] = json!("OPEN");
    }
    let sensor = |kind: &str, class: &str, unit: &str, field: &str| {
        json!({
            "unique_id": format!("{node}_{object}_{kind}"),
            "device": device,
            "origin": origin(d.version),
            "availability": availability,
            "availability_mode": "all",
            "state_topic": state_topic,
            "value_template": format!("{{{{ value_json.{field} }}}}"),
            "device_class": class,
            "unit_of_measurement": unit,
            "state_class": "measurement",
            "entity_category": "diagnostic",
        })
    };
    let mut docs = vec![
        (format!("{}/lock/{node}/{object}/config", d.prefix), lock),
        (
            format!("{}/sensor/{node}/{object}_battery/config", d.prefix),
            sensor("battery", "battery", "%", "battery"),
        ),
        (
            format!("{}/sensor/{node}/{object}_rssi/config", d.prefix),
            sensor("rssi", "signal_strength", "dBm", "rssi"),
        ),
    ];
    // The certificate's expiry, for locks whose provider says (Tedee's certificates).
    if has_certificate_expiry(view) {
        docs.push((
            format!("{}/sensor/{node}/{object}_certificate/config", d.prefix),
            json!({
                "name": "Certificate expires",
                "unique_id": format!("{node}_{object}_certificate"),
                "device": device,
                "origin": origin(d.version),
                "availability": [{"topic": format!("{}/status", d.root)}],
                "state_topic": state_topic,
                "value_template": CERTIFICATE_TEMPLATE,
                "device_class": "timestamp",
                "entity_category": "diagnostic",
            }),
        ));
    }
    // The door, once the lock has shown it has a door sensor (named "Door" by its class).
    if has_door_sensor(view) {
        docs.push((
            format!("{}/binary_sensor/{node}/{object}_door/config", d.prefix),
            json!({
                "unique_id": format!("{node}_{object}_door"),
                "device": device,
                "origin": origin(d.version),
                "availability": availability,
                "availability_mode": "all",
                "state_topic": state_topic,
                "value_template": DOOR_TEMPLATE,
                "payload_on": "ON",
                "payload_off": "OFF",
                "device_class": "door",
            }),
        ));
    }
    docs
}

/// Whether the lock has reported a door it can see (a lock without a door sensor reports
/// `unknown`, and gets no door entity).
pub fn has_door_sensor(view: &LockView) -> bool {
    matches!(view.door, Some(DoorState::Open | DoorState::Closed))
}

/// Whether the credentials provider reports the lock's certificate expiry.
pub fn has_certificate_expiry(view: &LockView) -> bool {
    view.credentials
        .as_ref()
        .is_some_and(|c| c.get("cert_expires").is_some())
}

/// Unix ms to the ISO 8601 time Home Assistant's timestamp sensors take; unknown until known.
const CERTIFICATE_TEMPLATE: &str = "{% if value_json.credentials and value_json.credentials.cert_expires %}{{ (value_json.credentials.cert_expires / 1000) | timestamp_custom('%Y-%m-%dT%H:%M:%S+00:00', false) }}{% else %}None{% endif %}";

/// Open is ON for a door binary sensor; anything else is unknown.
const DOOR_TEMPLATE: &str = "{{ {'open': 'ON', 'closed': 'OFF'}.get(value_json.door, 'None') }}";

/// The gateway's device and its connectivity sensor (from `<root>/status`), named after its
/// device class ("Connectivity").
pub fn gateway_discovery(d: &Discovery) -> (String, Value) {
    let node = gateway_device_id(d.gateway);
    (
        format!("{}/binary_sensor/{node}/status/config", d.prefix),
        json!({
            "unique_id": format!("{node}_status"),
            "device": {
                "identifiers": [node],
                "name": format!("lockbridge {}", d.gateway),
                "manufacturer": "lockbridge",
                "model": "Gateway",
                "sw_version": d.version,
            },
            "origin": origin(d.version),
            "state_topic": format!("{}/status", d.root),
            "payload_on": "online",
            "payload_off": "offline",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
        }),
    )
}

/// The lock's state in Home Assistant's words; `None` (unknown) for calibration and the like.
const LOCK_STATE_TEMPLATE: &str = "{% if value_json.jammed %}JAMMED{% else %}{{ {'locked': 'LOCKED', 'unlocked': 'UNLOCKED', 'partially_unlocked': 'UNLOCKED', 'locking': 'LOCKING', 'unlocking': 'UNLOCKING', 'pulling': 'OPENING', 'pull_spring': 'OPEN'}.get(value_json.state, 'None') }}{% endif %}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ptls::api::LockState;

    fn open_action(state: Option<LockState>) -> (Action, Mode) {
        open(state)
    }

    #[test]
    fn plain_and_json_commands_parse() {
        assert_eq!(parse_set(b"LOCK").unwrap().action, Action::Lock);
        assert_eq!(parse_set(b"unlock\n").unwrap().action, Action::Unlock);
        let open = parse_set(b"OPEN").unwrap();
        assert!(open.open && open.action == Action::Unlock);
        assert_eq!(parse_set(b"UNLOCK").unwrap().mode, Mode::WithoutPull);
        assert_eq!(
            parse_set(br#"{"action":"unlock"}"#).unwrap().mode,
            Mode::Normal
        );
        assert_eq!(
            open_action(Some(LockState::Unlocked)),
            (Action::Pull, Mode::Normal)
        );
        for locked in [
            None,
            Some(LockState::Locked),
            Some(LockState::PartiallyUnlocked),
        ] {
            assert_eq!(open_action(locked), (Action::Unlock, Mode::Normal));
        }
        let c = parse_set(br#"{"action":"unlock","mode":"force","id":"a-1","ttl_s":30}"#).unwrap();
        assert_eq!(
            c,
            SetCommand {
                action: Action::Unlock,
                mode: Mode::Force,
                id: Some("a-1".into()),
                ttl: Some(Duration::from_secs(30)),
                open: false,
            }
        );
        let c = parse_set(br#"{"action":"lock"}"#).unwrap();
        assert_eq!((c.mode, c.id, c.ttl), (Mode::Normal, None, None));
    }

    #[test]
    fn bad_commands_say_what_is_wrong() {
        for (payload, says) in [
            (&b"OPEN SESAME"[..], "send LOCK, UNLOCK, OPEN"),
            (br#"{"action":"explode"}"#, "unknown action"),
            (br#"{"action":"lock","ttl":5}"#, "unknown field"),
            (br#"{"action":"lock","mode":"fast"}"#, "unknown mode"),
            (br#"{"action":"lock","ttl_s":0}"#, "ttl_s"),
            // Regression: this ttl overflowed `Instant + Duration` and panicked the bridge.
            (
                br#"{"action":"lock","ttl_s":18446744073709551615}"#,
                "ttl_s: 1 to 3600",
            ),
            (br#"{"action":"lock","ttl_s":3601}"#, "ttl_s"),
            (br#"{"action":"lock","ttl_s":-1}"#, "JSON"),
            (br#"{"action":"lock","id":""}"#, "id:"),
            (br#"{"action":"lock""#, "JSON"),
            (&[0xFF, 0xFE][..], "UTF-8"),
        ] {
            let e = parse_set(payload).unwrap_err();
            assert!(e.contains(says), "{e:?} should say {says:?}");
        }
        let long = format!(r#"{{"action":"lock","id":"{}"}}"#, "x".repeat(65));
        assert!(
            parse_set(long.as_bytes())
                .unwrap_err()
                .contains("1 to 64 bytes")
        );
        let longest = format!(
            r#"{{"action":"lock","id":"{}","ttl_s":3600}}"#,
            "x".repeat(64)
        );
        assert!(parse_set(longest.as_bytes()).is_ok());
    }
}
