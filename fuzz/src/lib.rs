//! What the fuzz targets share: turning the fuzzer's bytes into frames, and driving a sans-IO
//! PTLS endpoint until it has nothing more to say (timers included, on its own clock).

use std::time::Instant;

use lockbridge::ptls::pair::Fixture;
use lockbridge::ptls::{Channel, Client, Server};

/// Frames from fuzz input: each is `CHANNEL(1) ‖ LEN(1) ‖ LEN bytes` (the last one takes what
/// is left), so the fuzzer controls how many frames arrive, on which characteristic, and their
/// sizes.
pub fn frames(data: &[u8]) -> Vec<(Channel, &[u8])> {
    let mut out = Vec::new();
    let mut rest = data;
    while let [channel, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        out.push((
            Channel::ALL[usize::from(*channel) % Channel::ALL.len()],
            &tail[..n],
        ));
        rest = &tail[n..];
    }
    out
}

/// A client and a lock `frames` frames into their handshake (see
/// [`Fixture::endpoints_after`]); the keys are made once per process.
pub fn endpoints_after(frames: usize) -> (Client, Server, Instant) {
    static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FIXTURE
        .get_or_init(|| Fixture::new(301))
        .endpoints_after(7, frames)
}

/// How far into the handshake a target starts, chosen by the input's first byte: nothing yet,
/// after the client's hello, after the server's flight, or established.
pub fn stage(selector: u8) -> usize {
    [0, 1, 3, usize::MAX][usize::from(selector % 4)]
}

/// Poll the client empty, then let its timers fire a few times.
pub fn settle_client(client: &mut Client, mut now: Instant) {
    for _ in 0..8 {
        while client.poll_transmit().is_some() || client.poll_event().is_some() {}
        let Some(at) = client.poll_timeout() else {
            return;
        };
        now = now.max(at);
        client.handle_timeout(now);
    }
}

/// Poll the lock empty, then let its timers fire a few times.
pub fn settle_server(server: &mut Server, mut now: Instant) {
    for _ in 0..8 {
        while server.poll_transmit().is_some() || server.poll_event().is_some() {}
        let Some(at) = server.poll_timeout() else {
            return;
        };
        now = now.max(at);
        server.handle_timeout(now);
    }
}
