//! Every PTLS message parser on its own: frames, both hellos, both verify messages, command
//! responses, signed time, access certificates and points. Whatever parses must re-encode to a
//! form that parses to the same encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;

use lockbridge::ptls::api::{Response, SignedTime};
use lockbridge::ptls::cert::AccessCertificate;
use lockbridge::ptls::wire::{self, ClientHello, ClientVerify, ServerHello, ServerVerify};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 9 {
        0 => {
            // Receivers read only the header's low nibble (spec §2).
            if let Ok((header, rest)) = wire::split_frame(body) {
                assert_eq!(header, body[0] & 0x0F);
                assert_eq!(&wire::frame(header, rest)[1..], &body[1..]);
            }
        }
        1 => {
            if let Ok(Ok(hello)) = ClientHello::parse(body) {
                let again = ClientHello::parse(&hello.encode());
                assert_eq!(
                    again.ok().and_then(Result::ok).map(|h| h.encode()),
                    Some(hello.encode())
                );
            }
        }
        2 => {
            if let Ok(hello) = ServerHello::parse(body) {
                let again = ServerHello::parse(&hello.encode()).expect("re-encoded server hello");
                assert_eq!(again.encode(), hello.encode());
            }
        }
        3 => {
            if let Ok(verify) = ServerVerify::parse(body) {
                let again =
                    ServerVerify::parse(&verify.encode()).expect("re-encoded server verify");
                assert_eq!(again.encode(), verify.encode());
            }
        }
        4 => {
            if let Ok(verify) = ClientVerify::parse(body) {
                let again =
                    ClientVerify::parse(&verify.encode()).expect("re-encoded client verify");
                assert_eq!(again.encode(), verify.encode());
            }
        }
        5 => {
            if let Ok(response) = Response::parse(body) {
                let again = Response::parse(&response.encode()).expect("re-encoded response");
                assert_eq!(again.encode(), response.encode());
            }
        }
        6 => {
            if let Ok(time) = SignedTime::parse_command_params(body) {
                let _ = time.unix_ms();
                let _ = time.command();
            }
        }
        7 => {
            let _ = AccessCertificate::parse(body);
        }
        _ => {
            let _ = wire::decode_point(body);
        }
    }
});
