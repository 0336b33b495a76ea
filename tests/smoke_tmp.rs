use std::time::Duration;
use lockbridge::fault::FaultConfig;
use lockbridge::ptls::{Event, pair::Fixture};

#[test]
fn handshake_clean() {
    let f = Fixture::new(1);
    let mut p = f.pair(1, &FaultConfig::default());
    let mut events = vec![];
    let ok = p.drive(Duration::from_secs(30), |p| {
        while let Some(e) = p.client.poll_event() { events.push(e); }
        p.client.is_established()
    });
    println!("{events:?} {:?}", p.elapsed());
    while let Some(e) = p.lock.poll_event() { println!("server {e:?}"); }
    assert!(ok);
}
