//! DTLS datagrams as the endpoint's own layer reads them before webrtc-dtls does: records and
//! handshake fragments, the ClientHello's cookie and suites, a HelloVerifyRequest's cookie, the
//! handshake transcript both ways, and the check of the client's Finished. Input: datagrams,
//! each `FROM_CLIENT(1) ‖ u16 LEN ‖ BYTES`.
#![no_main]

use libfuzzer_sys::fuzz_target;

use lockbridge::cloud::dtls::record::{client_hello, fragments, hello_verify_cookie, records};
use lockbridge::cloud::dtls::verify::{Transcript, check_finished, master_secret};

fuzz_target!(|data: &[u8]| {
    let mut transcript = Transcript::default();
    let mut rest = data;
    while rest.len() >= 3 {
        let from_client = rest[0] & 1 == 1;
        let len = (u16::from_be_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let datagram = &rest[3..3 + len];
        rest = &rest[3 + len..];
        for r in records(datagram) {
            for f in fragments(r.fragment) {
                let _ = (f.msg_type, f.length, f.offset, f.body.len());
            }
        }
        let _ = client_hello(datagram);
        let _ = hello_verify_cookie(datagram);
        if from_client {
            transcript.from_client(datagram);
        } else {
            transcript.from_server(datagram);
        }
    }
    let _ = master_secret(data);
    let _ = check_finished(&[7u8; 48], &transcript);
});
