//! CoAP requests as the cloud endpoint receives them after DTLS: the datagram read as a CoAP
//! message it can answer, triaged (type, method, options, path), block-wise options handled,
//! the method, path and JSON body read into a route (or a refusal), the Observe option read,
//! and a response encoded.
#![no_main]

use coap_lite::{BlockHandler, BlockHandlerConfig, CoapRequest};
use libfuzzer_sys::fuzz_target;

use lockbridge::cloud::coap::{Route, Triage, read_message, triage};

fuzz_target!(|data: &[u8]| {
    let Some(packet) = read_message(data) else {
        return;
    };
    let Triage::Request { method, segments } = triage(&packet) else {
        return;
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let source: std::net::SocketAddr = ([127, 0, 0, 1], 5684).into();
    let mut request = CoapRequest::from_packet(packet, source);
    let mut blocks: BlockHandler<std::net::SocketAddr> =
        BlockHandler::new(BlockHandlerConfig::default());
    let _ = blocks.intercept_request(&mut request);
    let route = Route::parse(method, &segments, &request.message.payload);
    let _ = request.get_observe_flag();
    if let Some(response) = request.response.as_mut() {
        response.message.payload = format!("{route:?}").into_bytes();
        let _ = response.message.to_bytes();
    }
    let _ = blocks.intercept_response(&mut request);
});
