//! Configuration files: the daemon's (with every value check) and the simulator's world file.
//! Bad text gives an error naming the file, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

use lockbridge::config::Config;
use lockbridge::sim::config::SimConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse("fuzz.toml", text, std::iter::empty()) {
        assert!(e.to_string().starts_with("fuzz.toml: "), "{e}");
    }
    if let Ok(sim) = toml::from_str::<SimConfig>(text) {
        let _ = sim.faults.validate();
    }
});
