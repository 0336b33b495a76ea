//! CoAP over DTLS end to end with an independent client (libcoap's `coap-client-openssl`)
//! against the real daemon and simulator: resources, commands, PSK refusals, access control,
//! and regression tests for the webrtc-dtls listener faults lockbridge's own layer fixes.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::World;

use common::{PSK, READER_PSK, free_udp_port, hex};

struct Coap {
    world: World,
    port: u16,
}

/// A one-lock world with CoAP on loopback: `full` may do everything, `reader` may only read.
fn coap_world(extra: &str) -> (Coap, common::Proc, common::Proc) {
    coap_world_with(extra, |_| {})
}

fn coap_world_with(
    extra: &str,
    sim: impl FnOnce(&mut toml::Table),
) -> (Coap, common::Proc, common::Proc) {
    let world = World::new(1, sim);
    let port = world.serve_coap(extra);
    let sim = world.sim();
    let daemon = world.daemon();
    (Coap { world, port }, sim, daemon)
}

impl Coap {
    /// Run coap-client-openssl; returns (stdout, stderr).
    fn client(&self, args: &[&str], path: &str) -> (String, String) {
        self.client_with("coap-client-openssl", args, path)
    }

    /// Run one of libcoap's clients (`coap-client-openssl`, `coap-client-gnutls`).
    fn client_with(&self, program: &str, args: &[&str], path: &str) -> (String, String) {
        let out = Command::new(program)
            .args(["-B", "8"])
            .args(args)
            .arg(format!("coaps://127.0.0.1:{}{path}", self.port))
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}; install libcoap3-bin (tests/run.sh does)"));
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn get_json(&self, identity: &str, key: &str, path: &str) -> Value {
        let (out, err) = self.client(&["-m", "get", "-u", identity, "-k", key], path);
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("GET {path}: {e}: stdout {out:?} stderr {err:?}"))
    }
}

/// A datagram that looks like a ClientHello and is never followed up.
fn silent_client_hello(to: u16) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut d = vec![22, 0xFE, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let body = [1u8, 0, 0, 40, 0, 0, 0, 0, 0, 0, 0, 0, 40];
    d[11] = 0;
    d[12] = (body.len() + 40) as u8;
    d.extend_from_slice(&body);
    d.extend_from_slice(&[0u8; 40]);
    s.send_to(&d, ("127.0.0.1", to)).unwrap();
    s
}

#[test]
fn resources_and_commands_work_for_an_independent_client() {
    let (c, _sim, _daemon) = coap_world("");
    // Regression (a flake): /locks was asked before the session was up and said null.
    c.world
        .wait_status_blocking("lock-1", "connected", Duration::from_secs(30));
    let locks = c.get_json("full", PSK, "/locks");
    assert_eq!(locks[0]["id"], "lock-1");
    assert_eq!(locks[0]["state"], "locked");
    let one = c.get_json("full", PSK, "/locks/lock-1");
    assert_eq!(one["serial"], "10000000-000001");
    let gw = c.get_json("full", PSK, "/gateway");
    assert_eq!(gw["locks"], 1);
    let (core, _) = c.client(&["-m", "get", "-u", "full", "-k", PSK], "/.well-known/core");
    assert!(core.contains("</locks/lock-1>"), "{core}");
    let post_with_id = [
        "-m",
        "post",
        "-u",
        "full",
        "-k",
        PSK,
        "-t",
        "50",
        "-e",
        r#"{"request_id":"coap-1"}"#,
    ];
    let t = Instant::now();
    let (out, err) = c.client(&post_with_id, "/locks/lock-1/unlock");
    let outcome: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?} {err:?}"));
    assert_eq!(outcome["status"], "success", "{outcome}");
    assert_eq!(outcome["id"], "coap-1");
    assert_eq!(outcome["state"]["state"], "unlocked");
    assert!(t.elapsed() < Duration::from_secs(8));
    // The same request id again: the first outcome, no second actuation.
    let (again, _) = c.client(&post_with_id, "/locks/lock-1/unlock");
    assert!(again.contains("\"success\""), "{again}");
    assert_eq!(c.world.actuations().len(), 1);
}

/// A lock slower than the ACK timeout: an empty ACK at once, then the outcome as a confirmable
/// separate response that libcoap acknowledges; ctl follows it too. One actuation each.
#[test]
fn a_slow_lock_answers_with_a_confirmable_separate_response() {
    let (c, _sim, _daemon) = coap_world_with("", |sim| {
        common::set_lock(sim, 0, "motor_time_ms", toml::Value::Integer(3000))
    });
    let t = Instant::now();
    let (out, err) = c.client(
        &["-m", "post", "-u", "full", "-k", PSK, "-v", "7"],
        "/locks/lock-1/unlock",
    );
    // libcoap's trace: our empty ACK, our confirmable 2.04 with the outcome, its ACK of it.
    let trace = format!("{out}{err}");
    assert!(trace.contains("t:CON c:2.04"), "{trace}");
    assert!(trace.contains(r#""status":"success""#), "{trace}");
    assert_eq!(trace.matches("t:ACK c:0.00").count(), 2, "{trace}");
    assert!(t.elapsed() >= Duration::from_secs(3), "the motor takes 3 s");
    let cfg = c.world.dir.join("ctl-full.toml");
    std::fs::write(
        &cfg,
        format!(
            "endpoint = \"127.0.0.1:{}\"\nidentity = \"full\"\npsk_hex = \"{}\"\n",
            c.port,
            hex(PSK)
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args([
            "ctl",
            "--config",
            cfg.to_str().unwrap(),
            "--json",
            "lock",
            "lock-1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["state"]["state"], "locked", "{outcome}");
    assert_eq!(c.world.actuations().len(), 2);
    // Both separate responses were acknowledged (libcoap's and ctl's).
    c.world.wait_log("acknowledged", 2);
    assert!(!c.world.daemon_log().contains("never acknowledged"));
}

#[test]
fn wrong_key_and_unknown_identity_are_refused_and_acl_denies_with_4_03() {
    let (c, _sim, _daemon) = coap_world("");
    let (out, _) = c.client(
        &["-m", "get", "-u", "full", "-k", "not-the-right-key-0000"],
        "/locks",
    );
    assert!(!out.contains("lock-1"), "wrong PSK answered: {out}");
    let (out, _) = c.client(&["-m", "get", "-u", "stranger", "-k", PSK], "/locks");
    assert!(!out.contains("lock-1"), "unknown identity answered: {out}");
    // The reader may read but not unlock.
    let locks = c.get_json("reader", READER_PSK, "/locks");
    assert_eq!(locks[0]["id"], "lock-1");
    let (out, err) = c.client(
        &["-m", "post", "-u", "reader", "-k", READER_PSK],
        "/locks/lock-1/unlock",
    );
    // libcoap prints an error response's code and payload on stderr.
    let both = format!("{out}{err}");
    assert!(
        both.contains("4.03") && both.contains("\"denied\""),
        "{both}"
    );
    assert!(c.world.actuations().is_empty());
}

#[test]
fn a_silent_client_hello_does_not_delay_a_real_client() {
    // Fault 1 of the plain listener: a ClientHello that is never continued blocked everyone.
    let (c, _sim, _daemon) = coap_world("");
    let _spoofers: Vec<UdpSocket> = (0..20).map(|_| silent_client_hello(c.port)).collect();
    let t = Instant::now();
    let locks = c.get_json("full", PSK, "/locks");
    assert_eq!(locks[0]["id"], "lock-1");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "real client took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_handshake_that_never_finishes_is_dropped_at_its_deadline() {
    // Fault 4: no handshake deadline. Here half-open peers go away after handshake_timeout_s.
    let (c, _sim, _daemon) = coap_world("handshake_timeout_s = 1");
    let _spoofers: Vec<UdpSocket> = (0..5).map(|_| silent_client_hello(c.port)).collect();
    // They are gone once only the asking client is left (each ask is a session of its own).
    let t = Instant::now();
    loop {
        let gw = c.get_json("full", PSK, "/gateway");
        if gw["dtls_peers"] == 1 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "half-open peers stay: {gw}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_client_reconnecting_from_the_same_port_handshakes_again() {
    // Fault 2: a peer was never forgotten, so the same address and port could not handshake.
    let (c, _sim, _daemon) = coap_world("");
    let port = free_udp_port().to_string();
    for round in 0..3 {
        let (out, err) = c.client(
            &["-p", &port, "-m", "get", "-u", "full", "-k", PSK],
            "/locks",
        );
        assert!(out.contains("lock-1"), "round {round}: {out} {err}");
    }
}

#[test]
fn the_demo_world_s_coap_client_works_as_printed() {
    // Four locks make /locks larger than one CoAP message: it must arrive block-wise.
    let world = World::new(4, |_| {});
    let coap = world.summary["coap"].clone();
    let endpoint = coap["endpoint"].as_str().unwrap().to_string();
    let identity = coap["identity"].as_str().unwrap().to_string();
    let key_bytes: Vec<u8> = (0..coap["psk_hex"].as_str().unwrap().len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&coap["psk_hex"].as_str().unwrap()[i..i + 2], 16).unwrap())
        .collect();
    let key = String::from_utf8(key_bytes).expect("the demo's key is printable ASCII");
    assert!(key.chars().all(|c| c.is_ascii_alphanumeric()), "{key}");
    let _sim = world.sim();
    let _daemon = world.daemon();
    let out = Command::new("coap-client-openssl")
        .args([
            "-B",
            "8",
            "-m",
            "get",
            "-u",
            &identity,
            "-k",
            &key,
            &format!("coaps://{endpoint}/locks"),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("\"lock-1\""),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_pushes_every_state_change_of_a_lock() {
    let (c, _sim, _daemon) = coap_world("");
    c.world
        .wait_status("lock-1", "connected", Duration::from_secs(10))
        .await;
    let port = c.port;
    let observer = std::thread::spawn(move || {
        Command::new("coap-client-openssl")
            .args(["-s", "10", "-B", "8", "-m", "get", "-u", "full", "-k", PSK])
            .arg(format!("coaps://127.0.0.1:{port}/locks/lock-1"))
            .output()
            .unwrap()
    });
    // The lock moves once the observation is registered.
    c.world.wait_log("coap: full observes lock-1", 1);
    c.world
        .succeed("lock-1", lockbridge::command::Action::Unlock)
        .await;
    let out = observer.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let states = observed_states(&text);
    assert_eq!(states, vec!["locked", "unlocking", "unlocked"], "{text}");
}

/// The same through libcoap built on GnuTLS, a second DTLS stack independent of OpenSSL's and
/// webrtc-dtls's: GET /locks, an Observe of the lock, and POST unlock seen by the observer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coap_client_gnutls_reads_observes_and_unlocks() {
    const GNUTLS: &str = "coap-client-gnutls";
    let (c, _sim, _daemon) = coap_world("");
    c.world
        .wait_status("lock-1", "connected", Duration::from_secs(10))
        .await;
    let (out, err) = c.client_with(GNUTLS, &["-m", "get", "-u", "full", "-k", PSK], "/locks");
    let locks: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?} {err:?}"));
    assert_eq!(locks[0]["id"], "lock-1");
    assert_eq!(locks[0]["state"], "locked");

    let c = std::sync::Arc::new(c);
    let observing = c.clone();
    let observer = std::thread::spawn(move || {
        observing.client_with(
            GNUTLS,
            &["-s", "10", "-m", "get", "-u", "full", "-k", PSK],
            "/locks/lock-1",
        )
    });
    c.world.wait_log("coap: full observes lock-1", 1);
    let (out, err) = c.client_with(
        GNUTLS,
        &[
            "-m",
            "post",
            "-u",
            "full",
            "-k",
            PSK,
            "-e",
            r#"{"request_id":"gnutls-1"}"#,
        ],
        "/locks/lock-1/unlock",
    );
    let outcome: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?} {err:?}"));
    assert_eq!(outcome["status"], "success", "{outcome}");
    assert_eq!(outcome["id"], "gnutls-1");

    let (text, err) = observer.join().unwrap();
    let states = observed_states(&text);
    assert_eq!(
        states,
        vec!["locked", "unlocking", "unlocked"],
        "{text} {err}"
    );
    assert_eq!(c.world.actuations().len(), 1);
}

/// The lock states an observer printed, each run of repeats counted once.
fn observed_states(text: &str) -> Vec<&str> {
    let mut states: Vec<&str> = Vec::new();
    for part in text.split("\"state\":\"").skip(1) {
        let s = part.split('"').next().unwrap_or("");
        if states.last() != Some(&s) {
            states.push(s);
        }
    }
    states
}

fn ctl(world: &World, args: &[&str]) -> std::process::Output {
    let config = world.summary["coap"]["client_config"]
        .as_str()
        .unwrap()
        .to_string();
    Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args(["ctl", "--config", &config])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn ctl_reads_commands_and_repeats_ids_safely() {
    let world = World::new(4, |_| {});
    let _sim = world.sim();
    let _daemon = world.daemon();
    let out = ctl(&world, &["--json", "locks"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let locks: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        locks.as_array().unwrap().len(),
        4,
        "block-wise list: {locks}"
    );
    let gw: Value = serde_json::from_slice(&ctl(&world, &["--json", "gateway"]).stdout).unwrap();
    assert_eq!(gw["locks"], 4);
    let first = ctl(&world, &["--json", "unlock", "lock-1", "--id", "ctl-42"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let again = ctl(&world, &["--json", "unlock", "lock-1", "--id", "ctl-42"]);
    let outcome: Value = serde_json::from_slice(&first.stdout).unwrap();
    let mut repeat: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(repeat["repeated"], true, "a repeat says so: {repeat}");
    repeat.as_object_mut().unwrap().remove("repeated");
    assert_eq!(outcome, repeat, "the same id answers the same outcome");
    assert_eq!(outcome["status"], "success");
    assert_eq!(outcome["state"]["state"], "unlocked");
    assert_eq!(world.actuations().len(), 1);
    let denied = ctl(&world, &["state", "no-such-lock"]);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("4.04"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_state_watch_follows_the_lock() {
    let world = World::new(1, |_| {});
    let _sim = world.sim();
    let _daemon = world.daemon();
    world
        .wait_status("lock-1", "connected", Duration::from_secs(10))
        .await;
    let config = world.summary["coap"]["client_config"]
        .as_str()
        .unwrap()
        .to_string();
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_lockbridge"))
        .args([
            "ctl", "--config", &config, "--json", "state", "lock-1", "--watch",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its lines as they come, so that the test waits for the one it needs.
    let lines = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let lines = lines.clone();
        let stdout = watch.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let mut all = lines.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        })
    };
    world.wait_log("coap: demo observes lock-1", 1);
    world
        .succeed("lock-1", lockbridge::command::Action::Unlock)
        .await;
    common::wait_for(
        || lines.lock().unwrap().contains("\"state\":\"unlocked\""),
        "ctl to print the unlocked state",
    );
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = reader.join();
    let text = lines.lock().unwrap().clone();
    let states: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["state"].as_str().map(str::to_string))
        .fold(Vec::new(), |mut acc, s| {
            if acc.last() != Some(&s) {
                acc.push(s);
            }
            acc
        });
    assert_eq!(states, vec!["locked", "unlocking", "unlocked"], "{text}");
}

fn run_with_empty_stdin(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}; tests/run.sh installs openssl and gnutls-bin"));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `openssl s_client` handshakes as `full` with `key` (hex) and `cipher`; what it printed.
fn openssl_psk(endpoint: &str, key: &str, cipher: &str) -> String {
    run_with_empty_stdin(Command::new("timeout").args([
        "8",
        "openssl",
        "s_client",
        "-dtls1_2",
        "-connect",
        endpoint,
        "-psk_identity",
        "full",
        "-psk",
        key,
        "-cipher",
        cipher,
        "-brief",
    ]))
}

#[test]
fn openssl_and_gnutls_complete_psk_handshakes_with_gcm_and_ccm_8() {
    let (c, _sim, _daemon) = coap_world("");
    let endpoint = format!("127.0.0.1:{}", c.port);
    for cipher in ["PSK-AES128-GCM-SHA256", "PSK-AES128-CCM8"] {
        let text = openssl_psk(&endpoint, &hex(PSK), cipher);
        assert!(text.contains("CONNECTION ESTABLISHED"), "{cipher}: {text}");
        assert!(
            text.contains(&format!("Ciphersuite: {cipher}")),
            "{cipher}: {text}"
        );
    }
    let text = run_with_empty_stdin(Command::new("timeout").args([
        "8",
        "gnutls-cli",
        "--udp",
        "--port",
        &c.port.to_string(),
        "--pskusername",
        "full",
        "--pskkey",
        &hex(PSK),
        "--priority",
        "NORMAL:-VERS-ALL:+VERS-DTLS1.2:-KX-ALL:+PSK:-CIPHER-ALL:+AES-128-GCM",
        "127.0.0.1",
    ]));
    assert!(text.contains("Handshake was completed"), "{text}");
    // A wrong key is refused by both.
    let text = openssl_psk(
        &endpoint,
        "00112233445566778899aabbccddeeff",
        "PSK-AES128-GCM-SHA256",
    );
    assert!(!text.contains("CONNECTION ESTABLISHED"), "{text}");
}
