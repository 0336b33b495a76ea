//! Certificate clients of the cloud endpoint, end to end: ECDHE-ECDSA with a client certificate
//! from the configured CA or a pinned key, on the same port as PSK clients. Independent
//! clients (`openssl s_client`, `gnutls-cli`) and `lockbridge ctl`; the certificates come from
//! `tests/certs/gen_certs.py` (Python `cryptography`), including one from another CA and an
//! expired one, which must be refused.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use common::World;

const PSK_HEX: &str = "6c6f636b6272696467652d746573742d70736b2d30303031";

struct CertWorld {
    world: World,
    port: u16,
    certs: PathBuf,
    _sim: common::Proc,
    _daemon: common::Proc,
}

/// One lock; `full` (PSK) may do everything, `ops` (certificate from the CA) may read and
/// unlock, `tablet` (pinned self-signed key) may only read.
fn cert_world() -> CertWorld {
    let world = World::new(1, |_| {});
    let certs = common::gen_certs(&world.dir.join("certs"));
    let pin = std::fs::read_to_string(certs.join("pinned.sha256")).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = certs.display();
    world.edit_daemon_config(|t| {
        let t = t.split("\n[coap]").next().unwrap_or_default().to_string();
        format!(
            "{t}\n[coap]\nlisten = \"127.0.0.1:{port}\"\n\
             certificate = \"{c}/server.pem\"\nprivate_key = \"{c}/server.key\"\nclient_ca = \"{c}/ca.pem\"\n\
             [[coap.clients]]\nidentity = \"full\"\npsk_hex = \"{PSK_HEX}\"\n\
             [[coap.clients]]\nidentity = \"ops\"\ncertificate_cn = \"ops\"\n\
             [[coap.clients]]\nidentity = \"tablet\"\npublic_key_sha256 = \"{}\"\n\
             [[permissions]]\norigin = \"full\"\nactions = [\"read\", \"lock\", \"unlock\", \"pull\"]\n\
             [[permissions]]\norigin = \"ops\"\nactions = [\"read\", \"unlock\"]\n\
             [[permissions]]\norigin = \"tablet\"\nactions = [\"read\"]\n",
            pin.trim()
        )
    });
    let sim = world.sim();
    let daemon = world.daemon();
    CertWorld {
        world,
        port,
        certs,
        _sim: sim,
        _daemon: daemon,
    }
}

impl CertWorld {
    fn s_client(&self, stem: Option<&str>, cipher: &str) -> String {
        let endpoint = format!("127.0.0.1:{}", self.port);
        let ca = self.certs.join("ca.pem");
        let mut cmd = Command::new("timeout");
        cmd.args([
            "8", "openssl", "s_client", "-dtls1_2", "-connect", &endpoint, "-brief",
        ])
        .args(["-cipher", cipher, "-CAfile"])
        .arg(&ca)
        .args(["-verify_return_error", "-verify_hostname", "lockbridge"]);
        if let Some(stem) = stem {
            cmd.arg("-cert")
                .arg(self.certs.join(format!("{stem}.pem")))
                .arg("-key")
                .arg(self.certs.join(format!("{stem}.key")));
        }
        let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `lockbridge ctl` with the client certificate `stem`.
    fn ctl(&self, stem: &str, args: &[&str]) -> std::process::Output {
        let cfg = self.world.dir.join(format!("ctl-{stem}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "endpoint = \"127.0.0.1:{}\"\ncertificate = \"certs/{stem}.pem\"\n\
                 private_key = \"certs/{stem}.key\"\nserver_ca = \"certs/ca.pem\"\n",
                self.port
            ),
        )
        .unwrap();
        Command::new(env!("CARGO_BIN_EXE_lockbridge"))
            .args(["ctl", "--config"])
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap()
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn openssl_completes_ecdhe_ecdsa_with_a_client_certificate_on_the_psk_port() {
    let w = cert_world();
    for cipher in ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-CCM8"] {
        let out = w.s_client(Some("client"), cipher);
        assert!(out.contains("CONNECTION ESTABLISHED"), "{cipher}: {out}");
        assert!(
            out.contains(&format!("Ciphersuite: {cipher}")),
            "{cipher}: {out}"
        );
        assert!(
            out.contains("Verification: OK"),
            "the gateway's certificate checks out: {out}"
        );
    }
    // The pinned self-signed key is accepted too.
    let out = w.s_client(Some("pinned"), "ECDHE-ECDSA-AES128-GCM-SHA256");
    assert!(out.contains("CONNECTION ESTABLISHED"), "{out}");
    // gnutls-cli, mutual TLS.
    let c = |f: &str| w.certs.join(f).display().to_string();
    let out = Command::new("timeout")
        .args(["8", "gnutls-cli", "--udp", "--port", &w.port.to_string()])
        .args([
            "--x509cafile",
            &c("ca.pem"),
            "--x509certfile",
            &c("client.pem"),
        ])
        .args([
            "--x509keyfile",
            &c("client.key"),
            "--sni-hostname",
            "lockbridge",
        ])
        .args(["--verify-hostname", "lockbridge"])
        .args([
            "--priority",
            "NORMAL:-VERS-ALL:+VERS-DTLS1.2:-KX-ALL:+ECDHE-ECDSA",
        ])
        .arg("127.0.0.1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let out = text(&out);
    assert!(out.contains("Handshake was completed"), "{out}");
    // PSK clients still work on the same port.
    let out = Command::new("timeout")
        .args(["8", "openssl", "s_client", "-dtls1_2", "-brief"])
        .args(["-connect", &format!("127.0.0.1:{}", w.port)])
        .args([
            "-psk_identity",
            "full",
            "-psk",
            PSK_HEX,
            "-cipher",
            "PSK-AES128-GCM-SHA256",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        text(&out).contains("CONNECTION ESTABLISHED"),
        "{}",
        text(&out)
    );
}

#[test]
fn other_ca_expired_and_missing_client_certificates_are_refused() {
    let w = cert_world();
    for (stem, why) in [
        (Some("other"), "from another CA"),
        (Some("expired"), "expired"),
        (None, "no client certificate"),
    ] {
        let out = w.s_client(stem, "ECDHE-ECDSA-AES128-GCM-SHA256");
        assert!(!out.contains("CONNECTION ESTABLISHED"), "{why}: {out}");
    }
    for stem in ["other", "expired"] {
        let out = w.ctl(stem, &["locks"]);
        assert!(!out.status.success(), "{stem}: {}", text(&out));
        assert!(
            text(&out).contains("handshake refused"),
            "{stem}: {}",
            text(&out)
        );
    }
    // The daemon's log names the cause.
    let log = w.world.daemon_log();
    assert!(log.contains("outside its validity"), "{log}");
    assert!(
        log.contains("invalid peer certificate"),
        "another CA: {log}"
    );
}

#[test]
fn certificate_clients_are_origins_for_permissions() {
    let w = cert_world();
    let out = w.ctl("client", &["--json", "locks"]);
    assert!(out.status.success(), "{}", text(&out));
    let locks: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(locks[0]["id"], "lock-1");
    // ops (CA certificate) may unlock but not lock.
    let out = w.ctl("client", &["--json", "unlock", "lock-1"]);
    assert!(out.status.success(), "{}", text(&out));
    let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["status"], "success");
    let out = w.ctl("client", &["lock", "lock-1"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("4.03"), "{}", text(&out));
    // tablet (pinned key) may only read.
    assert!(w.ctl("pinned", &["state", "lock-1"]).status.success());
    let out = w.ctl("pinned", &["unlock", "lock-1"]);
    assert!(text(&out).contains("4.03"), "{}", text(&out));
    assert_eq!(w.world.actuations().len(), 1);
}
