//! `lockbridge demo`: the whole gateway on one machine with no setup.
//!
//! It writes a world (simulated locks, an authority, a gateway key, a daemon config), serves the
//! locks over the sim socket with a BLE timing model, starts the daemon against them, prints
//! every lock's state changes, runs a short scripted unlock and lock, and keeps running until
//! Ctrl-C. `--setup-only` just writes the world so its parts can be run as separate processes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::command::{Action, Mode, Outcome, Step};
use crate::config::LinkPolicy;
use crate::keys;
use crate::registry::{GatewayEvent, LinkStatus};
use crate::sim::config::SimConfig;
use crate::sim::serve::{Listener, SimWorld, serve};
use crate::sim::wire::ListenAddr;
use crate::supervisor::Request;

pub struct DemoOptions {
    pub dir: Option<PathBuf>,
    pub locks: usize,
    pub setup_only: bool,
    pub json: bool,
    /// Exit after the scripted part instead of waiting for Ctrl-C.
    pub once: bool,
    /// BLE connection interval of the simulated links (0 = instant).
    pub connection_interval_ms: u64,
    /// An MQTT broker (`HOST:PORT`) for the daemon; without one the demo runs its own.
    pub mqtt: Option<String>,
}

/// What `demo --setup-only --json` prints: `sim init`'s summary plus the daemon's config and
/// the simulator's endpoint.
#[derive(Debug, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub world: crate::sim::InitSummary,
    pub daemon_config: PathBuf,
    pub sim_endpoint: String,
    pub control_socket: PathBuf,
    pub coap: CoapSummary,
    /// Present when the daemon's config names a broker (`--mqtt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttSummary>,
}

/// Where the daemon publishes.
#[derive(Debug, Serialize)]
pub struct MqttSummary {
    pub broker: String,
    pub root: String,
}

/// A broker the demo's daemon bridges to.
pub struct DemoBroker {
    /// `HOST:PORT`.
    pub addr: String,
    /// `mqtt.protocol`: `"5"` or `"3.1.1"`.
    pub protocol: &'static str,
}

/// The topic root of the demo's gateway.
const DEMO_ROOT: &str = "lockbridge/demo";

/// A CoAP/DTLS client allowed every action on every lock.
#[derive(Debug, Serialize)]
pub struct CoapSummary {
    pub endpoint: String,
    pub identity: String,
    pub psk_hex: String,
    /// A `ctl.toml` for `lockbridge ctl --config`.
    pub client_config: PathBuf,
    /// The same key as text: the demo's key is printable ASCII so `coap-client -k` takes it.
    #[serde(skip)]
    pub psk_text: String,
}

/// A random key of printable ASCII letters and digits.
fn printable_psk() -> String {
    use rand_core::RngCore;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut bytes = [0u8; 24];
    rand_core::OsRng.fill_bytes(&mut bytes);
    bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Write the world: `sim init` plus the gateway key, the daemon config and the BLE timing.
pub fn setup(
    dir: &Path,
    locks: usize,
    connection_interval_ms: u64,
    mqtt: Option<&DemoBroker>,
) -> anyhow::Result<Summary> {
    let world = crate::sim::init(dir, locks)?;
    let (mut sim, _) = SimConfig::load(&world.sim_config)?;
    sim.faults.connection_interval_ms = connection_interval_ms;
    crate::sim::write_config(&world.sim_config, &sim)?;

    let state_dir = dir.join("state");
    keys::generate(&state_dir.join("gateway.key"))?;
    let sim_endpoint = format!("unix:{}", dir.join("sim.sock").display());
    let control_socket = dir.join("control.sock");
    let mut toml = format!(
        "# lockbridge daemon config for the demo world in {dir} (see etc/lockbridge.toml).\n\
         # Run: lockbridge sim --config {dir}/sim.toml --listen {sim_endpoint}\n\
         #      lockbridge run --config {dir}/lockbridge.toml\n\n\
         [gateway]\nid = \"demo\"\nstate_dir = {state:?}\nkey_file = \"gateway.key\"\n\n\
         [ble]\ntransport = \"sim\"\nsim_endpoint = {sim_endpoint:?}\nmax_connections = 3\n\n\
         [credentials]\nprovider = \"authority\"\nauthority_dir = {authority:?}\n\n\
         [control]\nsocket = {control:?}\n",
        dir = dir.display(),
        state = state_dir.display().to_string(),
        authority = world.authority.display().to_string(),
        control = control_socket.display().to_string(),
    );
    for (i, l) in world.locks.iter().enumerate() {
        // Odd locks stay connected; even ones connect on demand, to show both policies.
        let link = if i % 2 == 0 {
            "persistent"
        } else {
            "on-demand"
        };
        toml.push_str(&format!(
            "\n[[locks]]\nid = \"lock-{n}\"\nserial = \"{serial}\"\ndevice_id = {device}\npublic_key = \"{key}\"\nlink = \"{link}\"\n",
            n = i + 1,
            serial = l.serial,
            device = l.device_id,
            key = l.public_key,
        ));
    }
    let psk_text = printable_psk();
    let psk_hex = hex::encode(psk_text.as_bytes());
    let psk_file = state_dir.join("psk").join("demo.hex");
    std::fs::create_dir_all(psk_file.parent().unwrap_or(&state_dir))?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&psk_file)
            .with_context(|| psk_file.display().to_string())?;
        f.write_all(psk_hex.as_bytes())?;
    }
    let coap_endpoint = format!("127.0.0.1:{}", free_udp_port()?);
    toml.push_str(&format!(
        "\n[coap]\nlisten = \"{coap_endpoint}\"\n\n[[coap.clients]]\nidentity = \"demo\"\npsk_file = \"psk/demo.hex\"\n\n\
         [[permissions]]\norigin = \"cli\"\nactions = [\"read\", \"lock\", \"unlock\", \"pull\"]\n\n\
         [[permissions]]\norigin = \"demo\"\nactions = [\"read\", \"lock\", \"unlock\", \"pull\"]\n"
    ));
    if let Some(DemoBroker { addr, protocol }) = mqtt {
        // The MQTT origin may do everything here, so Home Assistant also offers OPEN.
        toml.push_str(&format!(
            "\n[mqtt]\nbroker = {addr:?}\nprotocol = {protocol:?}\n\n\
             [[permissions]]\norigin = \"mqtt\"\nactions = [\"lock\", \"unlock\", \"pull\"]\n"
        ));
    }
    let daemon_config = dir.join("lockbridge.toml");
    std::fs::write(&daemon_config, toml).with_context(|| daemon_config.display().to_string())?;
    let client_config = dir.join("ctl.toml");
    std::fs::write(
        &client_config,
        format!("endpoint = \"{coap_endpoint}\"\nidentity = \"demo\"\npsk_file = \"state/psk/demo.hex\"\n"),
    )
    .with_context(|| client_config.display().to_string())?;
    Ok(Summary {
        world,
        daemon_config,
        sim_endpoint,
        control_socket,
        coap: CoapSummary {
            endpoint: coap_endpoint,
            identity: "demo".into(),
            psk_hex,
            client_config,
            psk_text,
        },
        mqtt: mqtt.map(|broker| MqttSummary {
            broker: broker.addr.clone(),
            root: DEMO_ROOT.into(),
        }),
    })
}

/// An MQTT broker (rumqttd, MQTT 3.1.1) on a free loopback port, in threads of its own for
/// the life of the process. Returns its address.
fn embedded_broker() -> anyhow::Result<String> {
    use std::collections::HashMap;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let server = rumqttd::ServerSettings {
        name: "demo".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 1 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("demo".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                log::error!("demo MQTT broker: {e}");
            }
        })?;
    let t = Instant::now();
    while std::net::TcpStream::connect(listen).is_err() {
        if t.elapsed() > Duration::from_secs(5) {
            anyhow::bail!("the demo's MQTT broker did not start on {listen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(listen.to_string())
}

pub async fn run(
    opts: DemoOptions,
    out: &mut (dyn Write + Send),
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let dir = match opts.dir.clone() {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("lockbridge-demo-{}", std::process::id())),
    };
    // The demo runs a broker of its own unless told to use one (setup-only runs nothing).
    let embedded = opts.mqtt.is_none() && !opts.setup_only;
    let broker = match &opts.mqtt {
        Some(addr) => Some(DemoBroker {
            addr: addr.clone(),
            protocol: "5",
        }),
        // rumqttd serves MQTT 3.1.1 here.
        None if embedded => Some(DemoBroker {
            addr: embedded_broker()?,
            protocol: "3.1.1",
        }),
        None => None,
    };
    let summary = setup(
        &dir,
        opts.locks,
        opts.connection_interval_ms,
        broker.as_ref(),
    )?;
    if opts.setup_only {
        if opts.json {
            writeln!(out, "{}", serde_json::to_string_pretty(&summary)?)?;
        } else {
            writeln!(out, "world written to {}", dir.display())?;
            writeln!(
                out,
                "  lockbridge sim --config {} --listen {}",
                summary.world.sim_config.display(),
                summary.sim_endpoint
            )?;
            writeln!(
                out,
                "  lockbridge run --config {}",
                summary.daemon_config.display()
            )?;
        }
        return Ok(());
    }

    writeln!(
        out,
        "lockbridge demo — {} simulated locks, BLE connection interval {} ms",
        opts.locks, opts.connection_interval_ms
    )?;
    writeln!(out, "  world: {}", dir.display())?;
    let (sim_config, specs) = SimConfig::load(&summary.world.sim_config)?;
    let addr: ListenAddr = summary
        .sim_endpoint
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let listener = Listener::bind(&addr).await?;
    let (stop_sim, sim_stopped) = tokio::sync::oneshot::channel::<()>();
    let sim = tokio::spawn(serve(
        SimWorld {
            locks: specs,
            faults: sim_config.faults.clone(),
            chaos: sim_config.chaos.clone(),
            event_log: sim_config.event_log.clone(),
            seed: sim_config.seed,
        },
        listener,
        async {
            let _ = sim_stopped.await;
        },
    ));
    writeln!(out, "  simulator on {addr}")?;

    let config = crate::config::Config::load(&summary.daemon_config)?;
    let policies: Vec<(String, LinkPolicy)> = config
        .locks
        .iter()
        .map(|l| (l.id.clone(), l.link))
        .collect();
    let gateway_key = crate::keys::load(&config.key_path()).context("gateway key")?;
    let daemon = crate::daemon::start(config, gateway_key).await?;
    let sup = daemon.supervisor.clone();
    writeln!(
        out,
        "  daemon up; control socket {}",
        summary.control_socket.display()
    )?;
    writeln!(
        out,
        "  CoAP over DTLS on udp {} (PSK identity {:?})",
        summary.coap.endpoint, summary.coap.identity
    )?;
    if let Some(m) = &summary.mqtt {
        let whose = if embedded { "the demo's own" } else { "the" };
        writeln!(
            out,
            "  MQTT: {whose} broker on {} under {}",
            m.broker, m.root
        )?;
    }
    writeln!(out)?;
    let mut events = sup.registry().subscribe();
    let started = Instant::now();

    // Wait until the persistent locks have their sessions.
    let persistent: Vec<String> = policies
        .iter()
        .filter(|p| p.1 == LinkPolicy::Persistent)
        .map(|p| p.0.clone())
        .collect();
    let ready = async {
        loop {
            let all_up = persistent.iter().all(|id| {
                sup.registry()
                    .get(id)
                    .is_some_and(|v| v.status == LinkStatus::Connected && v.state.is_some())
            });
            if all_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .context("persistent locks did not come up within 30 s")?;
    let name = |v: serde_json::Value| v.as_str().unwrap_or("?").to_string();
    for v in sup.registry().all() {
        writeln!(
            out,
            "{:<8} {:<10} {:<16} state {:<10} battery {}",
            v.id,
            name(serde_json::to_value(v.link)?),
            name(serde_json::to_value(v.status)?),
            v.state.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
            v.battery
                .map(|b| format!("{b}%"))
                .unwrap_or_else(|| "?".into())
        )?;
    }
    writeln!(
        out,
        "  (sessions up after {:.2} s)\n",
        started.elapsed().as_secs_f64()
    )?;

    // The scripted part: a warm unlock and lock on a persistent lock, a cold one on demand.
    let mut script: Vec<(String, Action)> = Vec::new();
    if let Some(p) = persistent.first() {
        script.push((p.clone(), Action::Unlock));
        script.push((p.clone(), Action::Lock));
    }
    if let Some((od, _)) = policies.iter().find(|p| p.1 == LinkPolicy::OnDemand) {
        script.push((od.clone(), Action::Unlock));
    }
    for (lock, action) in script {
        let t = Instant::now();
        let mut rx = sup.submit(Request {
            id: None,
            lock: lock.clone(),
            action,
            mode: Mode::Normal,
            ttl: None,
            origin: crate::control::ORIGIN.into(),
            source: None,
        });
        while let Some(r) = rx.recv().await {
            match &r.step {
                Step::Done { outcome } => {
                    let detail = match outcome {
                        Outcome::Success { state: Some(s), .. } => {
                            format!("success, bolt {}", s.state)
                        }
                        other @ (Outcome::Success { .. }
                        | Outcome::Failed { .. }
                        | Outcome::Denied { .. }
                        | Outcome::Expired
                        | Outcome::Ambiguous { .. }) => serde_json::to_string(other)?,
                    };
                    writeln!(
                        out,
                        "{action:<6} {lock}: {detail} after {:.0} ms (id {})",
                        t.elapsed().as_secs_f64() * 1000.0,
                        r.id
                    )?;
                    break;
                }
                step @ (Step::Accepted | Step::Sent) => writeln!(
                    out,
                    "{action:<6} {lock}: {step:?} at {:.0} ms",
                    t.elapsed().as_secs_f64() * 1000.0
                )?,
            }
        }
    }
    // State changes that happened during the script.
    let mut changes = 0;
    while let Ok(ev) = events.try_recv() {
        if let GatewayEvent::LockChanged { lock } = ev {
            changes += 1;
            if changes <= 12 {
                writeln!(
                    out,
                    "  event: {} {:?} {}",
                    lock.id,
                    lock.status,
                    lock.state.map(|s| s.to_string()).unwrap_or_default()
                )?;
            }
        }
    }
    if let Some(log) = &sim_config.event_log {
        writeln!(out, "\nthe locks' event log ({}):", log.display())?;
        write!(out, "{}", std::fs::read_to_string(log).unwrap_or_default())?;
    }
    writeln!(out, "\ntry it yourself while this runs:")?;
    writeln!(
        out,
        "  lockbridge local --socket {} locks",
        summary.control_socket.display()
    )?;
    writeln!(
        out,
        "  lockbridge local --socket {} unlock lock-2 --id my-first-command",
        summary.control_socket.display()
    )?;
    writeln!(
        out,
        "  lockbridge ctl --config {} state lock-1 --watch",
        summary.coap.client_config.display()
    )?;
    for (method, path) in [("get", "/locks"), ("post", "/locks/lock-1/unlock")] {
        writeln!(
            out,
            "  coap-client-openssl -m {method} -u {} -k {} coaps://{}{path}",
            summary.coap.identity, summary.coap.psk_text, summary.coap.endpoint
        )?;
    }
    if let Some(m) = &summary.mqtt {
        let (host, port) = m.broker.rsplit_once(':').unwrap_or((&m.broker, "1883"));
        writeln!(
            out,
            "  mosquitto_sub -h {host} -p {port} -t '{}/#' -v",
            m.root
        )?;
        writeln!(
            out,
            "  mosquitto_pub -h {host} -p {port} -t {}/locks/lock-1/set -m UNLOCK",
            m.root
        )?;
    }
    if !opts.once {
        writeln!(out, "\nrunning; state changes follow. Ctrl-C to stop.")?;
        out.flush()?;
        let follow = async {
            while let Ok(ev) = events.recv().await {
                if let GatewayEvent::LockChanged { lock } = ev {
                    let _ = writeln!(
                        out,
                        "  {} {:?} {}",
                        lock.id,
                        lock.status,
                        lock.state.map(|s| s.to_string()).unwrap_or_default()
                    );
                    let _ = out.flush();
                }
            }
        };
        tokio::select! {
            _ = shutdown => {}
            _ = follow => {}
        }
    }
    daemon.stop().await;
    let _ = stop_sim.send(());
    sim.await??;
    Ok(())
}
