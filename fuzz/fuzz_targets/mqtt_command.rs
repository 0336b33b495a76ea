//! Payloads published to `<root>/locks/<lock>/set`: JSON commands and Home Assistant's plain
//! LOCK/UNLOCK/OPEN. Parsing either gives a command or a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

use lockbridge::mqtt::payload::parse_set;

fuzz_target!(|data: &[u8]| {
    if let Ok(command) = parse_set(data) {
        if let Some(id) = &command.id {
            assert!(
                !id.is_empty() && !id.chars().any(char::is_control),
                "{command:?}"
            );
        }
        assert!(command.ttl.is_none_or(|t| t.as_secs() >= 1), "{command:?}");
    }
});
