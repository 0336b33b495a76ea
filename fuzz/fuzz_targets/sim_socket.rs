//! The sim socket's framing (`KIND(1) ‖ u16 LEN ‖ PAYLOAD`) read from a byte stream until it
//! ends or fails, and each message decoded on its own. A decoded message re-encodes to the
//! bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;

use lockbridge::sim::wire::{SimMsg, read_msg};

fuzz_target!(|data: &[u8]| {
    if let [kind, payload @ ..] = data
        && let Ok(msg) = SimMsg::decode(*kind, payload)
    {
        let bytes = msg.encode();
        assert_eq!(bytes[0], *kind);
        assert_eq!(&bytes[3..], payload, "{msg:?}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        let mut stream = data;
        while let Ok(Some(_)) = read_msg(&mut stream).await {}
    });
});
