//! The lock side's PTLS server fed frames from the fuzzer on every characteristic, at each
//! point of the handshake and once established; its timers run too. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

use lockbridge_fuzz::{endpoints_after, frames, settle_server, stage};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (_client, mut lock, now) = endpoints_after(stage(selector));
    for (channel, bytes) in frames(rest) {
        lock.handle_input(now, channel, bytes);
        settle_server(&mut lock, now);
    }
});
