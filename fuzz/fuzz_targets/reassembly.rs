//! The lock's reassembly of the client-verify flight: a lock waiting for it gets fragments
//! from the fuzzer (each a header of CLIENT_VERIFY_I or _II and a body), including the real
//! flight's fragments reordered, repeated or mixed with forged ones. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

use lockbridge::ptls::Channel;
use lockbridge::ptls::wire;
use lockbridge_fuzz::{endpoints_after, settle_server};

fuzz_target!(|data: &[u8]| {
    // After hello, server hello and server verify, the client's flight is next.
    let (mut client, mut lock, now) = endpoints_after(3);
    let mut real = Vec::new();
    while let Some(t) = client.poll_transmit() {
        real.push(t.bytes);
    }
    // `0 ‖ INDEX` delivers a fragment of the real flight; `1 ‖ LEN ‖ BODY` a forged last
    // fragment and `2|3 ‖ LEN ‖ BODY` a forged middle one.
    let mut rest = data;
    while let [op, arg, tail @ ..] = rest {
        let (frame, used) = match op % 4 {
            0 => match real.get(usize::from(*arg) % real.len().max(1)) {
                Some(fragment) => (fragment.clone(), 0),
                None => return,
            },
            1 => {
                let n = usize::from(*arg).min(tail.len());
                (wire::frame(wire::HDR_CLIENT_VERIFY_II, &tail[..n]), n)
            }
            _ => {
                let n = usize::from(*arg).min(tail.len());
                (wire::frame(wire::HDR_CLIENT_VERIFY_I, &tail[..n]), n)
            }
        };
        lock.handle_input(now, Channel::PtlsRx, &frame);
        settle_server(&mut lock, now);
        rest = &tail[used..];
    }
});
