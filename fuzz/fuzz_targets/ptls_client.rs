//! The gateway's PTLS client fed frames from the fuzzer on every characteristic, at each point
//! of the handshake and once established; its timers run too. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

use lockbridge_fuzz::{endpoints_after, frames, settle_client, stage};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (mut client, _lock, now) = endpoints_after(stage(selector));
    for (channel, bytes) in frames(rest) {
        client.handle_input(now, channel, bytes);
        settle_client(&mut client, now);
    }
});
