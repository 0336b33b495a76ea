//! Command responses and notifications as the gateway receives them: an established lock
//! encrypts the fuzzer's plaintexts as responses (after a command) or notifications, and the
//! client decrypts and parses them. A response that parses must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

use lockbridge::ptls::Event;
use lockbridge::ptls::api::{Response, op};
use lockbridge_fuzz::{endpoints_after, frames, settle_server};

fuzz_target!(|data: &[u8]| {
    let (mut client, mut lock, now) = endpoints_after(usize::MAX);
    if !client.is_established() {
        return;
    }
    for (channel, plaintext) in frames(data) {
        let as_response = channel.short() % 2 == 0;
        if as_response {
            let _ = client.send_command(now, &[op::GET_STATE]);
            while let Some(t) = client.poll_transmit() {
                lock.handle_input(now, t.channel, &t.bytes);
            }
            settle_server(&mut lock, now);
            let _ = lock.send_response(now, plaintext);
        } else {
            let _ = lock.send_notification(now, plaintext);
        }
        while let Some(t) = lock.poll_transmit() {
            client.handle_input(now, t.channel, &t.bytes);
        }
        while let Some(event) = client.poll_event() {
            if let Event::Response(r) = event {
                let bytes = r.encode();
                assert_eq!(
                    Response::parse(&bytes).map(|again| again.encode()).ok(),
                    Some(bytes)
                );
            }
        }
        while client.poll_transmit().is_some() {}
    }
});
