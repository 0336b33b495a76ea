//! The `lockbridge` command: one binary, one subcommand per job.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, CommandFactory, Parser, Subcommand};

use lockbridge::authority::{Authority, IssueRequest};
use lockbridge::keys;
use lockbridge::ptls::cert;
use lockbridge::sim::config::SimConfig;
use lockbridge::sim::serve::{Listener, SimWorld};
use lockbridge::sim::wire::ListenAddr;

#[derive(Parser)]
#[command(
    name = "lockbridge",
    version,
    about = "Gateway between Bluetooth smart locks and the Internet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway daemon.
    Run {
        #[arg(long, default_value = lockbridge::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Check a configuration file (and LOCKBRIDGE_* overrides); exit non-zero with the reason.
    CheckConfig {
        #[arg(long, default_value = lockbridge::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// The CoAP-over-DTLS client for a gateway's cloud endpoint.
    Ctl {
        /// A ctl.toml: endpoint, identity and psk_file or psk_hex (`demo --setup-only` writes one).
        #[arg(long)]
        config: PathBuf,
        /// Print the JSON the gateway answered instead of text.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        what: CtlCommand,
    },
    /// Talk to the running daemon over its local control socket (origin `cli`).
    Local {
        /// The daemon's control socket (its `control.socket`).
        #[arg(long, default_value = "/run/lockbridge/control.sock")]
        socket: PathBuf,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        what: LocalCommand,
    },
    /// Run simulated locks and the daemon against them, with a scripted unlock and lock.
    Demo {
        /// Where to write the demo's world (default: a new directory under $TMPDIR).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 4)]
        locks: usize,
        /// Only write the world (sim.toml, keys, authority, lockbridge.toml).
        #[arg(long)]
        setup_only: bool,
        /// With --setup-only: print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Exit after the scripted part instead of running until Ctrl-C.
        #[arg(long)]
        once: bool,
        /// BLE connection interval of the simulated links, in ms (0 = instant).
        #[arg(long, default_value_t = 30)]
        connection_interval_ms: u64,
        /// An MQTT broker (HOST:PORT) for the daemon; without it the demo runs its own.
        #[arg(long, value_name = "HOST:PORT")]
        mqtt: Option<String>,
    },
    /// Serve simulated locks over the sim socket, or `sim init` a new world.
    #[command(args_conflicts_with_subcommands = true)]
    Sim {
        #[command(subcommand)]
        init: Option<SimCommand>,
        #[command(flatten)]
        serve: Option<SimServe>,
    },
    /// Gateway keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The certificate and time authority.
    #[command(subcommand)]
    Authority(AuthorityCommand),
    /// Tedee's cloud: check the Personal Access Key, register this hub (docs/tedee.md).
    Tedee {
        #[arg(long, default_value = lockbridge::config::DEFAULT_PATH)]
        config: PathBuf,
        #[command(subcommand)]
        what: TedeeCommand,
    },
    /// Listen for Tedee locks over Bluetooth (BlueZ): serial, address, signal strength, and
    /// whether each is configured.
    Scan {
        /// The configuration whose locks and adapter are used (optional: without the file at
        /// the default path, the default adapter and no configured locks).
        #[arg(long)]
        config: Option<PathBuf>,
        /// How long to listen, 1 to 120 seconds.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=120))]
        seconds: u64,
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), as the package installs it.
    Man,
}

#[derive(Subcommand)]
enum TedeeCommand {
    /// List the account's locks with the key (one request) and check the configured ones.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Register this hub's key as a Tedee mobile (once; a registration on file is checked).
    Register {
        /// The name the owner sees in the Tedee app (default credentials.tedee.mobile_name,
        /// or lockbridge-<hostname>).
        #[arg(long)]
        name: Option<String>,
        /// Register again even though Tedee still knows this hub.
        #[arg(long)]
        force: bool,
    },
    /// Delete this hub's mobile at Tedee and its Tedee state.
    Unregister,
    /// The account's locks (id, serial, name, model, access), with a [[locks]] block to paste
    /// for each one not configured yet.
    Locks {
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon to fetch certificates now (every lock, or these, by id or
    /// serial); a lock parked after refusals tries again.
    Fetch {
        locks: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// The locks this identity may read.
    Locks,
    /// The gateway: id, version, uptime, sessions, DTLS peers.
    Gateway,
    /// One lock's state; --watch follows it (CoAP Observe) until Ctrl-C.
    State {
        lock: String,
        #[arg(long)]
        watch: bool,
    },
    Lock(CtlAction),
    Unlock(CtlAction),
    Pull(CtlAction),
}

#[derive(Args)]
struct CtlAction {
    lock: String,
    /// normal, auto, force or without-pull
    #[arg(long)]
    mode: Option<lockbridge::command::Mode>,
    /// Request id: repeating it returns the first outcome and never actuates twice.
    #[arg(long)]
    id: Option<String>,
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Every lock and its state.
    Locks,
    /// The gateway: id, version, sessions, the command-id store and the Tedee provider.
    Gateway,
    /// Print each lock's view whenever it changes, until Ctrl-C.
    Watch,
    /// One lock's state.
    State {
        lock: String,
    },
    /// Lock, unlock or pull; prints each step and the outcome.
    Lock(LocalAction),
    Unlock(LocalAction),
    Pull(LocalAction),
}

#[derive(Args)]
struct LocalAction {
    lock: String,
    /// normal, auto, force or without-pull
    #[arg(long, default_value = "normal")]
    mode: lockbridge::command::Mode,
    /// Command id: repeating an id returns the first outcome and never actuates twice.
    #[arg(long)]
    id: Option<String>,
    /// Seconds before the command expires if it could not be sent.
    #[arg(long)]
    ttl: Option<u64>,
}

#[derive(Args)]
struct SimServe {
    /// The world file (`sim init` writes one).
    #[arg(long)]
    config: PathBuf,
    /// Serve over the sim socket: unix:PATH or tcp:127.0.0.1:PORT
    #[arg(long, required_unless_present = "ble", conflicts_with = "ble")]
    listen: Option<ListenAddr>,
    /// Serve as BLE peripherals through BlueZ, one lock per adapter.
    #[arg(long)]
    ble: bool,
    /// With --ble: adapters for the locks, in order, comma-separated (default: hci1,hci2,…).
    #[arg(long, requires = "ble")]
    adapter: Option<String>,
}

#[derive(Subcommand)]
enum SimCommand {
    /// Write a ready world: sim.toml, lock keys and an authority the locks trust.
    Init {
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        locks: usize,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a P-256 key (PEM, mode 0600) and print its public key (base64 point).
    Init {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key of a key file.
    Show { file: PathBuf },
}

#[derive(Subcommand)]
enum AuthorityCommand {
    /// Create an authority in DIR.
    Init { dir: PathBuf },
    /// Issue an access certificate (printed as base64).
    Issue {
        #[arg(long)]
        authority: PathBuf,
        #[arg(long)]
        device_id: u32,
        /// The gateway's public key: base64 of the 65-byte point (`keys show`).
        #[arg(long)]
        client_public_key: String,
        /// 16 bytes as hex (default: derived from the public key).
        #[arg(long)]
        client_id: Option<String>,
        #[arg(long, default_value_t = cert::DEFAULT_VALIDITY_DAYS)]
        days: u64,
        #[arg(long, default_value = "lock,pull,read")]
        permissions: String,
    },
    /// Sign a time (default now) for a lock without trusted time.
    SignTime {
        #[arg(long)]
        authority: PathBuf,
        /// Unix milliseconds.
        #[arg(long)]
        at: Option<u64>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Run { config } => return run_daemon(config),
        Command::CheckConfig { config } => return check_config(config),
        _ => {}
    }
    // The demo prints its own story; only warnings and errors go to stderr by default.
    match &cli.command {
        Command::Demo { .. } => lockbridge::telemetry::init_stderr_at("warn"),
        _ => lockbridge::telemetry::init_stderr(),
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockbridge: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// What `run` checks before it starts anything, and `check-config` checks alone: the
/// configuration and the gateway key. Either failing is exit 78 (EX_CONFIG), which the unit
/// does not restart into.
fn checked_config(path: &std::path::Path) -> anyhow::Result<lockbridge::config::Config> {
    let config = lockbridge::config::Config::load(path)?;
    let key_path = config.key_path();
    keys::load(&key_path).map_err(|e| anyhow::anyhow!("gateway key {e}"))?;
    Ok(config)
}

fn config_error(e: anyhow::Error) -> std::process::ExitCode {
    eprintln!("lockbridge: {e:#}");
    std::process::ExitCode::from(lockbridge::daemon::EXIT_CONFIG)
}

/// `lockbridge check-config`: one line saying what was checked, or the reason and exit 78.
fn check_config(path: &std::path::Path) -> std::process::ExitCode {
    let c = match checked_config(path) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    let line = format!(
        "{}: ok ({} locks, transport {:?}, credentials {:?}, gateway key {})",
        path.display(),
        c.locks.len(),
        c.ble.transport,
        c.credentials.provider,
        c.key_path().display()
    );
    for warning in c.deprecations() {
        let _ = writeln!(std::io::stderr(), "warning: {warning}");
    }
    match writeln!(std::io::stdout(), "{line}") {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

/// `lockbridge run`: configuration and key errors exit with EX_CONFIG before anything starts.
fn run_daemon(path: &std::path::Path) -> std::process::ExitCode {
    let config = match checked_config(path) {
        Ok(c) => c,
        Err(e) => return config_error(e),
    };
    lockbridge::telemetry::init_daemon(&config.log.level);
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let daemon = lockbridge::daemon::start(config).await?;
            shutdown_signal().await;
            daemon.stop().await;
            anyhow::Ok(())
        })
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            eprintln!("lockbridge: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Run { .. } | Command::CheckConfig { .. } => unreachable!("handled in main"),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lockbridge", &mut out);
            Ok(())
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
            Ok(())
        }
        Command::Ctl { config, json, what } => {
            runtime()?.block_on(ctl(&config, json, what, &mut out))
        }
        Command::Local { socket, json, what } => {
            runtime()?.block_on(local(&socket, json, what, &mut out))
        }
        Command::Demo {
            dir,
            locks,
            setup_only,
            json,
            once,
            connection_interval_ms,
            mqtt,
        } => {
            drop(out);
            let mut out = std::io::stdout();
            runtime()?.block_on(lockbridge::demo::run(
                lockbridge::demo::DemoOptions {
                    dir,
                    locks,
                    setup_only,
                    json,
                    once,
                    connection_interval_ms,
                    mqtt,
                },
                &mut out,
                shutdown_signal(),
            ))
        }
        Command::Sim {
            init: Some(SimCommand::Init { dir, locks }),
            ..
        } => {
            let summary = lockbridge::sim::init(&dir, locks)?;
            writeln!(out, "{}", serde_json::to_string_pretty(&summary)?)?;
            Ok(())
        }
        Command::Sim { serve: Some(s), .. } => {
            let (config, specs) = SimConfig::load(&s.config)?;
            let world = SimWorld {
                locks: specs,
                faults: config.faults,
                chaos: config.chaos,
                event_log: config.event_log,
                seed: config.seed,
            };
            let rt = runtime()?;
            rt.block_on(async {
                if let Some(listen) = s.listen {
                    let listener = Listener::bind(&listen)
                        .await
                        .with_context(|| format!("listening on {listen}"))?;
                    log::info!(
                        "sim: serving {} locks on {}",
                        world.locks.len(),
                        listener.local_addr()?
                    );
                    lockbridge::sim::serve::serve(world, listener, shutdown_signal()).await?;
                } else {
                    let adapters: Vec<String> = match s.adapter {
                        Some(list) => list.split(',').map(|a| a.trim().to_string()).collect(),
                        None => (1..=world.locks.len()).map(|i| format!("hci{i}")).collect(),
                    };
                    if world.chaos.mean_interval_ms > 0 || world.faults != Default::default() {
                        log::warn!(
                            "sim: [faults] and [chaos] act on the sim socket only; over BLE they are ignored"
                        );
                    }
                    lockbridge::sim::ble::serve_ble(world, &adapters, shutdown_signal()).await?;
                }
                log::info!("sim: stopped");
                anyhow::Ok(())
            })
        }
        Command::Sim { .. } => anyhow::bail!(
            "sim needs --config FILE with --listen ADDR or --ble, or `sim init DIR` (see lockbridge sim --help)"
        ),
        Command::Scan {
            config,
            seconds,
            json,
        } => {
            let default = PathBuf::from(lockbridge::config::DEFAULT_PATH);
            let config = match config {
                Some(path) => Some(lockbridge::config::Config::load(&path)?),
                None if default.exists() => Some(lockbridge::config::Config::load(&default)?),
                None => None,
            };
            runtime()?.block_on(scan(config, seconds, json, &mut out))
        }
        Command::Tedee {
            config,
            what: TedeeCommand::Fetch { locks, json },
        } => {
            let config = lockbridge::config::Config::load(&config)?;
            runtime()?.block_on(tedee_fetch(&config.control.socket, locks, json, &mut out))
        }
        Command::Tedee { config, what } => {
            let config = lockbridge::config::Config::load(&config)?;
            let tedee = lockbridge::tedee::cli::Tedee::open(config)?;
            runtime()?.block_on(async {
                match what {
                    TedeeCommand::Check { json } => {
                        if !lockbridge::tedee::cli::check(&tedee, json, &mut out).await? {
                            anyhow::bail!("tedee check found problems (above)");
                        }
                        Ok(())
                    }
                    TedeeCommand::Register { name, force } => {
                        lockbridge::tedee::cli::register(&tedee, name, force, &mut out).await
                    }
                    TedeeCommand::Unregister => {
                        lockbridge::tedee::cli::unregister(&tedee, &mut out).await
                    }
                    TedeeCommand::Locks { json } => {
                        lockbridge::tedee::cli::locks(&tedee, json, &mut out).await
                    }
                    TedeeCommand::Fetch { .. } => unreachable!("handled above"),
                }
            })
        }
        Command::Keys(KeysCommand::Init { out: path }) => {
            let key = keys::generate(&path)?;
            writeln!(out, "{}", keys::public_b64(key.verifying_key()))?;
            Ok(())
        }
        Command::Keys(KeysCommand::Show { file }) => {
            let key = keys::load(&file)?;
            writeln!(out, "{}", keys::public_b64(key.verifying_key()))?;
            Ok(())
        }
        Command::Authority(AuthorityCommand::Init { dir }) => {
            let a = Authority::init(&dir)?;
            writeln!(out, "{}", keys::public_b64(a.public_key()))?;
            Ok(())
        }
        Command::Authority(AuthorityCommand::Issue {
            authority: dir,
            device_id,
            client_public_key,
            client_id,
            days,
            permissions,
        }) => {
            let a = Authority::load(&dir)?;
            let client_id = client_id
                .map(|h| -> anyhow::Result<[u8; 16]> {
                    let bytes = hex::decode(&h).context("--client-id: not hex")?;
                    bytes.try_into().map_err(|_| {
                        anyhow::anyhow!("--client-id: must be 16 bytes (32 hex digits)")
                    })
                })
                .transpose()?;
            let cert = a.issue(&IssueRequest {
                device_id,
                client_public_key: keys::parse_public_b64(&client_public_key)
                    .context("--client-public-key")?,
                client_id,
                days,
                permissions: cert::parse_permissions(&permissions)
                    .map_err(|e| anyhow::anyhow!("--permissions: {e}"))?,
                now_ms: lockbridge::clock::unix_ms(),
            });
            writeln!(out, "{}", B64.encode(cert))?;
            Ok(())
        }
        Command::Authority(AuthorityCommand::SignTime { authority: dir, at }) => {
            let a = Authority::load(&dir)?;
            let st = a.sign_time(at.unwrap_or_else(lockbridge::clock::unix_ms));
            let json = serde_json::json!({
                "datetime": B64.encode(st.datetime),
                "signature": B64.encode(&st.signature),
            });
            writeln!(out, "{json}")?;
            Ok(())
        }
    }
}

/// One lock's view as a line of text, for `local` and `ctl`.
fn lock_line(v: &serde_json::Value) -> String {
    let mut line = format!(
        "{:<16} {:<15} {:<18} battery {:>4}",
        v["id"].as_str().unwrap_or("?"),
        v["status"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("unknown"),
        v["battery"]
            .as_u64()
            .map(|b| format!("{b}%"))
            .unwrap_or_else(|| "?".into())
    );
    // Only locks with a door sensor say where the door is.
    if let Some(door) = v["door"].as_str().filter(|d| *d != "unknown") {
        line.push_str(&format!("  door {door}"));
    }
    line
}

async fn ctl(
    config: &std::path::Path,
    json: bool,
    what: CtlCommand,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    use coap_lite::RequestType;
    let (cfg, credentials) = lockbridge::ctl::CtlConfig::load(config)?;
    let mut client = lockbridge::ctl::CoapClient::connect(cfg.endpoint, &credentials).await?;
    let show = |out: &mut dyn Write, body: &[u8]| -> anyhow::Result<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
        if json {
            writeln!(out, "{}", String::from_utf8_lossy(body))?;
        }
        Ok(v)
    };
    let line = lock_line;
    let result = match what {
        CtlCommand::Locks | CtlCommand::Gateway | CtlCommand::State { watch: false, .. } => {
            let path = match &what {
                CtlCommand::Locks => "/locks".to_string(),
                CtlCommand::Gateway => "/gateway".to_string(),
                CtlCommand::State { lock, .. } => format!("/locks/{lock}"),
                _ => unreachable!("matched above"),
            };
            let (code, body) = client.request(RequestType::Get, &path, &[]).await?;
            if !code.starts_with("2.") {
                anyhow::bail!("{code} {}", String::from_utf8_lossy(&body));
            }
            let v = show(out, &body)?;
            if !json {
                match v.as_array() {
                    Some(list) => {
                        for l in list {
                            writeln!(out, "{}", line(l))?;
                        }
                    }
                    None if matches!(what, CtlCommand::Gateway) => writeln!(out, "{v:#}")?,
                    None => writeln!(out, "{}", line(&v))?,
                }
            }
            Ok(())
        }
        CtlCommand::State { lock, watch: true } => {
            let path = format!("/locks/{lock}");
            client
                .observe(&path, |body| {
                    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                    let text = if json {
                        String::from_utf8_lossy(body).into_owned()
                    } else {
                        line(&v)
                    };
                    writeln!(out, "{text}").is_ok() && out.flush().is_ok()
                })
                .await
        }
        CtlCommand::Lock(_) | CtlCommand::Unlock(_) | CtlCommand::Pull(_) => {
            let (action, a) = match what {
                CtlCommand::Lock(a) => ("lock", a),
                CtlCommand::Unlock(a) => ("unlock", a),
                CtlCommand::Pull(a) => ("pull", a),
                _ => unreachable!("matched above"),
            };
            let mut body = serde_json::Map::new();
            if let Some(m) = a.mode {
                body.insert("mode".into(), serde_json::to_value(m)?);
            }
            if let Some(id) = &a.id {
                body.insert("request_id".into(), id.clone().into());
            }
            let payload = if body.is_empty() {
                Vec::new()
            } else {
                serde_json::to_vec(&body)?
            };
            let path = format!("/locks/{}/{action}", a.lock);
            let (code, resp) = client.request(RequestType::Post, &path, &payload).await?;
            let v = show(out, &resp)?;
            if !json {
                writeln!(
                    out,
                    "{action} {}: {code} {}",
                    a.lock,
                    String::from_utf8_lossy(&resp)
                )?;
            }
            if v["status"] != "success" {
                anyhow::bail!("the command did not succeed ({code})");
            }
            Ok(())
        }
    };
    client.close().await;
    result
}

async fn local(
    socket: &std::path::Path,
    json: bool,
    what: LocalCommand,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    use lockbridge::control::{ControlClient, Request};
    let mut client = ControlClient::connect(socket).await?;
    let (action, a) = match what {
        LocalCommand::Watch => {
            client.request(&Request::Watch).await?;
            loop {
                let v = client.line().await?;
                if json {
                    writeln!(out, "{v}")?;
                } else {
                    writeln!(
                        out,
                        "{:<16} {:<15} {}",
                        v["id"].as_str().unwrap_or("?"),
                        v["status"].as_str().unwrap_or("?"),
                        v["state"].as_str().unwrap_or("unknown")
                    )?;
                }
                out.flush()?;
            }
        }
        LocalCommand::Gateway => {
            client.request(&Request::Gateway).await?;
            let v = client.line().await?;
            if json {
                writeln!(out, "{v}")?;
            } else {
                writeln!(
                    out,
                    "gateway {} (lockbridge {}): {} of {} locks connected",
                    v["id"].as_str().unwrap_or("?"),
                    v["version"].as_str().unwrap_or("?"),
                    v["sessions"],
                    v["locks"]
                )?;
                let t = &v["tedee"];
                if !t.is_null() {
                    writeln!(
                        out,
                        "tedee: mobile {}, {} request(s) in the last hour{}{}",
                        t["mobile_id"].as_str().unwrap_or("not registered"),
                        t["requests_last_hour"],
                        t["paused_until"]
                            .as_u64()
                            .map(|ms| format!(
                                ", paused until {}",
                                lockbridge::tedee::store::rfc3339(ms)
                            ))
                            .unwrap_or_default(),
                        t["last_error"]
                            .as_str()
                            .map(|e| format!("\n  last error: {e}"))
                            .unwrap_or_default()
                    )?;
                }
            }
            return Ok(());
        }
        LocalCommand::Locks | LocalCommand::State { .. } => {
            let req = match what {
                LocalCommand::State { lock } => Request::State { lock },
                _ => Request::Locks,
            };
            client.request(&req).await?;
            let v = client.line().await?;
            if let Some(e) = v.get("error") {
                anyhow::bail!("{}", e.as_str().unwrap_or("error"));
            }
            if json {
                writeln!(out, "{v}")?;
            } else {
                let list = v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]);
                for l in list {
                    writeln!(
                        out,
                        "{}  {}",
                        lock_line(&l),
                        l["last_error"].as_str().unwrap_or("")
                    )?;
                }
            }
            return Ok(());
        }
        LocalCommand::Lock(a) => (lockbridge::command::Action::Lock, a),
        LocalCommand::Unlock(a) => (lockbridge::command::Action::Unlock, a),
        LocalCommand::Pull(a) => (lockbridge::command::Action::Pull, a),
    };
    let reports = client
        .command(&Request::Command {
            lock: a.lock,
            action,
            mode: a.mode,
            id: a.id,
            ttl_s: a.ttl,
        })
        .await?;
    let mut success = false;
    for r in &reports {
        if json {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        } else {
            match r.outcome() {
                None => writeln!(out, "{} {} {}: {:?}", r.action, r.lock, r.id, r.step)?,
                Some(o) => writeln!(
                    out,
                    "{} {} {}: {}{}",
                    r.action,
                    r.lock,
                    r.id,
                    serde_json::to_string(o)?,
                    if r.repeated { " (remembered)" } else { "" }
                )?,
            }
        }
        success |= matches!(
            r.outcome(),
            Some(lockbridge::command::Outcome::Success { .. })
        );
    }
    if !success {
        anyhow::bail!("the command did not succeed");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `tedee fetch`: the running daemon fetches (it owns the cloud budget and the sessions).
async fn tedee_fetch(
    socket: &std::path::Path,
    locks: Vec<String>,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    use lockbridge::control::{ControlClient, Request};
    let mut client = ControlClient::connect(socket).await?;
    client.request(&Request::TedeeFetch { locks }).await?;
    let v = client.line().await?;
    if let Some(e) = v.get("error") {
        anyhow::bail!("{}", e.as_str().unwrap_or("error"));
    }
    let list = v["locks"].as_array().cloned().unwrap_or_default();
    if json {
        writeln!(out, "{v}")?;
    } else {
        for l in &list {
            let lock = l["lock"].as_str().unwrap_or("?");
            match l["error"].as_str() {
                None => writeln!(
                    out,
                    "{lock}: certificate fetched (expires {}); a parked session tries again",
                    l["cert_expires"]
                        .as_u64()
                        .map(lockbridge::tedee::store::rfc3339)
                        .unwrap_or_else(|| "unknown".into())
                )?,
                Some(e) => writeln!(out, "{lock}: {e}")?,
            }
        }
    }
    let failed = list.iter().filter(|l| !l["error"].is_null()).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} lock(s) not fetched (above)", list.len());
    }
    Ok(())
}

/// `scan`: the Tedee locks BlueZ hears, matched against the configured ones.
async fn scan(
    config: Option<lockbridge::config::Config>,
    seconds: u64,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let adapter = config
        .as_ref()
        .map(|c| c.ble.adapter.clone())
        .unwrap_or_default();
    let locks = config.map(|c| c.locks).unwrap_or_default();
    let connector =
        lockbridge::link::ble::BleConnector::new(&adapter, std::time::Duration::from_secs(10))
            .await?;
    if !json {
        writeln!(out, "listening for {seconds} s…")?;
        out.flush()?;
    }
    let heard = connector
        .scan(std::time::Duration::from_secs(seconds))
        .await?;
    let configured_as = |h: &lockbridge::link::ble::Heard| {
        locks
            .iter()
            .find(|l| Some(&l.serial) == h.serial.as_ref() || l.serial == h.address)
            .map(|l| l.id.clone())
    };
    let missing: Vec<&lockbridge::config::LockEntry> = locks
        .iter()
        .filter(|l| {
            !heard.iter().any(|h| {
                h.rssi.is_some() && (Some(&l.serial) == h.serial.as_ref() || l.serial == h.address)
            })
        })
        .collect();
    if json {
        let list: Vec<serde_json::Value> = heard
            .iter()
            .map(|h| {
                serde_json::json!({
                    "serial": h.serial, "address": h.address, "name": h.name, "rssi": h.rssi,
                    "configured_as": configured_as(h),
                })
            })
            .collect();
        let missing: Vec<serde_json::Value> = missing
            .iter()
            .map(|l| serde_json::json!({"id": l.id, "serial": l.serial}))
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::json!({"seconds": seconds, "locks": list, "configured_not_heard": missing})
        )?;
        return Ok(());
    }
    let in_range = heard.iter().filter(|h| h.rssi.is_some()).count();
    writeln!(out, "{in_range} Tedee lock(s) heard")?;
    if !heard.is_empty() {
        writeln!(
            out,
            "{:<16} {:<18} {:>5}  {:<16} configured as",
            "serial", "address", "rssi", "name"
        )?;
    }
    for h in &heard {
        writeln!(
            out,
            "{:<16} {:<18} {:>5}  {:<16} {}",
            h.serial.as_deref().unwrap_or("?"),
            h.address,
            h.rssi.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            h.name
                .as_deref()
                .unwrap_or("")
                .chars()
                .filter(|c| !c.is_control())
                .take(16)
                .collect::<String>(),
            configured_as(h).unwrap_or_else(|| "-".into())
        )?;
    }
    if heard.iter().any(|h| h.rssi.is_none()) {
        writeln!(out, "(rssi -: known to BlueZ but not heard in this scan)")?;
    }
    for l in missing {
        writeln!(
            out,
            "not heard: configured lock {} (serial {}) — out of range, asleep or off",
            l.id, l.serial
        )?;
    }
    Ok(())
}
