//! `lockbridge demo`: the whole lock path on one machine with no setup. It writes a simulator
//! world, serves it over the sim socket in-process, and drives a gateway client through the
//! handshake (with the trusted-time flow on a lock that lost its clock), state, battery,
//! unlock and lock, printing every step and the lock's event log.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::authority::{self, Authority, IssueRequest};
use crate::driver::{Driver, now};
use crate::keys;
use crate::link::sim::SimLink;
use crate::ptls::api::{LockState, notif, op, result};
use crate::ptls::cert::PERM_ALL;
use crate::ptls::{Client, ClientConfig, ClientTiming};
use crate::sim::config::SimConfig;
use crate::sim::serve::{ListenAddr, Listener, SimWorld, serve};

pub struct DemoOptions {
    pub dir: Option<PathBuf>,
}

pub async fn run(opts: DemoOptions, out: &mut dyn Write) -> anyhow::Result<()> {
    let dir = match opts.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("lockbridge-demo-{}", std::process::id())),
    };
    writeln!(out, "lockbridge demo — simulated locks over the sim socket")?;
    writeln!(out, "  world: {}", dir.display())?;
    let summary = crate::sim::init(&dir, 2)?;
    // The second lock has lost its clock, to show the trusted-time flow (spec §7).
    let (mut config, _) = SimConfig::load(&summary.sim_config)?;
    config.locks[1].behaviour.trusted_time = false;
    crate::sim::write_config(&summary.sim_config, &config)?;
    let (config, specs) = SimConfig::load(&summary.sim_config)?;

    let authority = Authority::load(&summary.authority)?;
    let gateway_key_path = dir.join("gateway.key");
    let gateway_key = keys::generate(&gateway_key_path)?;
    writeln!(
        out,
        "  gateway key: {} (public {})",
        gateway_key_path.display(),
        keys::public_b64(gateway_key.verifying_key())
    )?;

    let addr = ListenAddr::Unix(dir.join("sim.sock"));
    let listener = Listener::bind(&addr).await?;
    let locks: Vec<(String, u32, p256::ecdsa::VerifyingKey)> = specs
        .iter()
        .map(|s| (s.serial.clone(), s.device_id, *s.key.verifying_key()))
        .collect();
    let event_log = config.event_log.clone();
    let world = SimWorld {
        locks: specs,
        faults: config.faults.clone(),
        event_log: event_log.clone(),
        seed: config.seed,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sim = tokio::spawn(serve(world, listener, async {
        let _ = stop_rx.await;
    }));
    writeln!(
        out,
        "  simulator: serving {} locks on {addr}\n",
        locks.len()
    )?;

    for (i, (serial, device_id, lock_key)) in locks.iter().enumerate() {
        let certificate = authority.issue(&IssueRequest {
            device_id: *device_id,
            client_public_key: *gateway_key.verifying_key(),
            client_id: None,
            days: 10,
            permissions: PERM_ALL,
            now_ms: authority::unix_ms_now(),
        });
        let started = Instant::now();
        let link = SimLink::connect(&addr, serial, 247).await?;
        let config = ClientConfig {
            signing_key: gateway_key.clone(),
            certificate,
            lock_public_key: *lock_key,
            att_mtu: crate::link::Link::att_mtu(&link),
            timing: ClientTiming::default(),
        };
        let mut client = Client::new(config, Box::new(rand_core::OsRng))?;
        client.start(now(), authority::unix_ms_now());
        let mut driver = Driver::new(link, client);
        let mut time_synced = false;
        let session = driver
            .handshake(|| {
                time_synced = true;
                Some(authority.sign_time(authority::unix_ms_now()))
            })
            .await
            .with_context(|| format!("handshake with {serial}"))?;
        writeln!(
            out,
            "lock {serial}: handshake done in {:.1} ms, session {}{}",
            ms(started.elapsed()),
            hex::encode(session),
            if time_synced {
                " (lock had no trusted time: sent a signed time, then re-handshook)"
            } else {
                ""
            }
        )?;
        let state = driver.command(&[op::GET_STATE]).await?;
        let battery = driver.command(&[op::GET_BATTERY]).await?;
        writeln!(
            out,
            "  state {}, battery {}%",
            LockState::from_byte(state.data.first().copied().unwrap_or(0x09)),
            battery.data.first().copied().unwrap_or(0)
        )?;
        if i == 0 {
            for (name, opcode, target) in [
                ("unlock", op::UNLOCK, LockState::Unlocked),
                ("lock", op::LOCK, LockState::Locked),
            ] {
                let t = Instant::now();
                let r = driver.command(&[opcode, 0x00]).await?;
                if r.result != result::SUCCESS {
                    bail!("{name} answered {}", result::name(r.result));
                }
                write!(out, "  {name}: accepted in {:.1} ms;", ms(t.elapsed()))?;
                loop {
                    let (id, params) = driver.notification(Duration::from_secs(10)).await?;
                    if id != notif::LOCK_STATUS_CHANGE {
                        continue;
                    }
                    let s = LockState::from_byte(params.first().copied().unwrap_or(0x09));
                    write!(out, " → {s}")?;
                    if s.is_stable() {
                        writeln!(out, " ({:.2} s)", t.elapsed().as_secs_f64())?;
                        if s != target {
                            bail!("{name} ended {s}, expected {target}");
                        }
                        break;
                    }
                }
            }
        }
        driver.close().await;
    }
    let _ = stop_tx.send(());
    sim.await??;
    if let Some(log) = event_log {
        writeln!(out, "\nthe lock's event log ({}):", log.display())?;
        write!(out, "{}", std::fs::read_to_string(&log).unwrap_or_default())?;
    }
    writeln!(out, "\nnext: serve this world yourself and try it:")?;
    writeln!(
        out,
        "  lockbridge sim --config {} --listen unix:{}",
        summary.sim_config.display(),
        Path::new(&dir).join("sim.sock").display()
    )?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
