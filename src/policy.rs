//! Who may do what: the access policy every front end asks (the control socket, CoAP, MQTT).
//!
//! A rule names an origin (`cli`, a CoAP client identity, `mqtt`), a lock glob, actions, and
//! optionally source address ranges and weekly UTC time windows. The time is an argument
//! (`Who::now`, the instant asked about), so the rules are tested to the minute.

use serde::{Deserialize, Serialize};

use crate::command::Action;

/// The command origin of the MQTT bridge.
pub const MQTT_ORIGIN: &str = "mqtt";

/// The rules in force: `[[permissions]]`, with the MQTT bridge's default (or its deprecated
/// `mqtt.allow`) folded in.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    rules: Vec<Permission>,
}

impl Policy {
    /// `rules` as configured; `mqtt_allow` is the deprecated `mqtt.allow`: a rule for the
    /// `mqtt` origin on every lock. Without it and without any `mqtt` rule, MQTT may lock and
    /// unlock every lock (the default it always had).
    pub fn new(rules: &[Permission], mqtt_allow: Option<&[Action]>) -> Policy {
        let mut rules = rules.to_vec();
        let mqtt_rule = |actions: Vec<Action>| Permission {
            origin: MQTT_ORIGIN.into(),
            locks: star(),
            actions,
            from: Vec::new(),
            windows: Vec::new(),
        };
        match mqtt_allow {
            Some(actions) => rules.push(mqtt_rule(actions.to_vec())),
            None if !rules.iter().any(|r| r.origin == MQTT_ORIGIN) => {
                rules.push(mqtt_rule(vec![Action::Lock, Action::Unlock]));
            }
            None => {}
        }
        Policy { rules }
    }

    /// Whether `who` may do `action` on lock `lock`.
    pub fn allows(&self, who: &Who, lock: &str, action: Action) -> bool {
        self.rules.iter().any(|p| p.matches(who, lock, action))
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Permission {
    /// `cli` (the control socket), a CoAP client identity; later `mqtt`.
    pub origin: String,
    /// Lock ids this rule covers; `*` and `?` wildcards.
    #[serde(default = "star")]
    pub locks: String,
    pub actions: Vec<Action>,
    /// Source address ranges (CIDR) the client must come from; empty = anywhere. A rule with
    /// ranges never matches an origin without an address (the control socket).
    #[serde(default)]
    pub from: Vec<ipnet::IpNet>,
    /// Times of the week (UTC) the rule applies, such as `"mon-fri 07:00-19:00"`; empty = always.
    #[serde(default)]
    pub windows: Vec<Window>,
}

impl Permission {
    fn matches(&self, who: &Who, lock: &str, action: Action) -> bool {
        self.origin == who.origin
            && glob(&self.locks, lock)
            && self.actions.contains(&action)
            && (self.from.is_empty()
                || who
                    .source
                    .is_some_and(|ip| self.from.iter().any(|net| net.contains(&ip))))
            && (self.windows.is_empty() || self.windows.iter().any(|w| w.contains(who.now)))
    }
}

/// Who asks, from where and when: what a [`Permission`] is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Who<'a> {
    pub origin: &'a str,
    pub source: Option<std::net::IpAddr>,
    /// Seconds since the Unix epoch.
    pub now: u64,
}

impl<'a> Who<'a> {
    /// `origin` asking at `now` (Unix seconds), from `source` if it came over the network.
    pub fn new(origin: &'a str, source: Option<std::net::IpAddr>, now: u64) -> Who<'a> {
        Who {
            origin,
            source,
            now,
        }
    }
}

/// A weekly time window in UTC: days (Monday first) and minutes of the day. A window whose end
/// is before its start runs past midnight into the next day.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Window {
    text: String,
    /// Bit 0 = Monday.
    days: u8,
    start: u32,
    end: u32,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Window {
    /// Whether the instant `unix` (seconds) falls in the window.
    pub fn contains(&self, unix: u64) -> bool {
        let day = ((unix / 86_400 + 3) % 7) as u8; // 1970-01-01 was a Thursday
        let minute = ((unix % 86_400) / 60) as u32;
        let on = |d: u8| self.days & (1 << d) != 0;
        if self.start <= self.end {
            on(day) && minute >= self.start && minute < self.end
        } else {
            (on(day) && minute >= self.start) || (on((day + 6) % 7) && minute < self.end)
        }
    }
}

impl TryFrom<String> for Window {
    type Error = String;

    fn try_from(text: String) -> Result<Window, String> {
        let bad =
            || format!("{text:?}: expected DAYS HH:MM-HH:MM, such as \"mon-fri 07:00-19:00\"");
        let (days_text, hours) = match text.trim().split_once(' ') {
            Some((d, h)) => (d, h.trim()),
            None => ("mon-sun", text.trim()),
        };
        let day = |name: &str| DAYS.iter().position(|d| *d == name).ok_or_else(bad);
        let mut days = 0u8;
        for part in days_text.split(',') {
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (day(a)?, day(b)?),
                None => (day(part)?, day(part)?),
            };
            let mut d = first;
            loop {
                days |= 1 << d;
                if d == last {
                    break;
                }
                d = (d + 1) % 7;
            }
        }
        let minute = |hm: &str| -> Result<u32, String> {
            let (h, m) = hm.split_once(':').ok_or_else(bad)?;
            let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if m > 59 || h > 24 || (h == 24 && m != 0) {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        let (start, end) = hours.split_once('-').ok_or_else(bad)?;
        let (start, end) = (minute(start)?, minute(end)?);
        if start == end {
            return Err(bad());
        }
        Ok(Window {
            text,
            days,
            start,
            end,
        })
    }
}

impl From<Window> for String {
    fn from(w: Window) -> String {
        w.text
    }
}

fn star() -> String {
    "*".into()
}

/// Without any `[[permissions]]`, the control socket may do everything.
pub fn default_permissions() -> Vec<Permission> {
    vec![Permission {
        origin: "cli".into(),
        locks: star(),
        actions: Action::ALL.to_vec(),
        from: Vec::new(),
        windows: Vec::new(),
    }]
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

    /// 2026-11-16 was a Monday.
    fn at(day: u64, hh: u64, mm: u64) -> u64 {
        let monday = 20_773 * 86_400;
        monday + day * 86_400 + hh * 3600 + mm * 60
    }

    #[test]
    fn windows_cover_days_and_hours_in_utc() {
        assert_eq!(
            (at(0, 0, 0) / 86_400 + 3) % 7,
            0,
            "the reference day is a Monday"
        );
        let w = Window::try_from("mon-fri 07:00-19:00".to_string()).unwrap();
        assert!(w.contains(at(0, 7, 0)));
        assert!(w.contains(at(4, 18, 59)));
        assert!(!w.contains(at(4, 19, 0)));
        assert!(!w.contains(at(5, 12, 0)), "Saturday");
        assert!(!w.contains(at(2, 6, 59)));
        let night = Window::try_from("sat,sun 22:00-06:00".to_string()).unwrap();
        assert!(night.contains(at(5, 23, 0)), "Saturday night");
        assert!(
            night.contains(at(6, 5, 59)),
            "early Sunday, from Saturday's window"
        );
        assert!(
            night.contains(at(7, 5, 0)),
            "early Monday, from Sunday's window"
        );
        assert!(!night.contains(at(7, 6, 0)));
        assert!(!night.contains(at(4, 23, 0)), "Friday night");
        let wrap = Window::try_from("fri-mon 00:00-24:00".to_string()).unwrap();
        assert!(wrap.contains(at(6, 12, 0)) && wrap.contains(at(0, 12, 0)));
        assert!(!wrap.contains(at(1, 12, 0)));
        let daily = Window::try_from("09:00-10:00".to_string()).unwrap();
        assert!(daily.contains(at(3, 9, 30)));
        for bad in [
            "mon-fri",
            "mon 7-19",
            "xyz 07:00-08:00",
            "mon 07:00-07:00",
            "25:00-26:00",
        ] {
            assert!(Window::try_from(bad.to_string()).is_err(), "{bad}");
        }
    }

    fn rule(origin: &str, locks: &str, actions: &[Action]) -> Permission {
        Permission {
            origin: origin.into(),
            locks: locks.into(),
            actions: actions.to_vec(),
            from: Vec::new(),
            windows: Vec::new(),
        }
    }

    #[test]
    fn mqtt_may_lock_and_unlock_by_default_and_its_rules_replace_that() {
        let any =
            |p: &Policy, lock, action| p.allows(&Who::new(MQTT_ORIGIN, None, 0), lock, action);
        let default = Policy::new(&default_permissions(), None);
        assert!(any(&default, "front", Action::Unlock) && any(&default, "back", Action::Lock));
        assert!(!any(&default, "front", Action::Pull));
        // The deprecated key is one rule for every lock.
        let old = Policy::new(&default_permissions(), Some(&[Action::Lock]));
        assert!(any(&old, "front", Action::Lock) && !any(&old, "front", Action::Unlock));
        // Rules of its own: only those.
        let own = Policy::new(&[rule(MQTT_ORIGIN, "garage-*", &[Action::Pull])], None);
        assert!(any(&own, "garage-1", Action::Pull));
        assert!(!any(&own, "front", Action::Unlock));
        // The control socket's default is not the MQTT bridge's.
        assert!(default.allows(&Who::new("cli", None, 0), "front", Action::Pull));
        assert!(!own.allows(&Who::new("cli", None, 0), "front", Action::Read));
    }
}
