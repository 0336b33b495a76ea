//! The `lockbridge` command: one binary, one subcommand per job. This file is the command line
//! (clap) and its dispatch; what each subcommand does lives in the library.

#![cfg_attr(not(test), warn(clippy::wildcard_enum_match_arm))]

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
    if let Command::Run { config } = &cli.command {
        return run_daemon(config);
    }
    if let Command::CheckConfig { config } = &cli.command {
        return check_config(config);
    }
    // The demo prints its own story; only warnings and errors go to stderr by default.
    if matches!(cli.command, Command::Demo { .. }) {
        lockbridge::telemetry::init_stderr_at("warn");
    } else {
        lockbridge::telemetry::init_stderr();
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
/// The configuration and the gateway key it names, loaded once: either wrong is EX_CONFIG.
fn checked_config(
    path: &std::path::Path,
) -> anyhow::Result<(lockbridge::config::Config, p256::ecdsa::SigningKey)> {
    let config = lockbridge::config::Config::load(path)?;
    let key_path = config.key_path();
    let key = keys::load(&key_path).map_err(|e| anyhow::anyhow!("gateway key {e}"))?;
    Ok((config, key))
}

fn config_error(e: anyhow::Error) -> std::process::ExitCode {
    eprintln!("lockbridge: {e:#}");
    std::process::ExitCode::from(lockbridge::daemon::EXIT_CONFIG)
}

/// `lockbridge check-config`: one line saying what was checked, or the reason and exit 78.
fn check_config(path: &std::path::Path) -> std::process::ExitCode {
    let c = match checked_config(path) {
        Ok((c, _key)) => c,
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
    let (config, gateway_key) = match checked_config(path) {
        Ok(loaded) => loaded,
        Err(e) => return config_error(e),
    };
    lockbridge::telemetry::init_daemon(&config.log.level);
    let result = runtime().and_then(|rt| {
        rt.block_on(lockbridge::daemon::run(
            config,
            gateway_key,
            lockbridge::daemon::shutdown_signal(),
        ))
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
            runtime()?.block_on(lockbridge::ctl::run(&config, json, what.into(), &mut out))
        }
        Command::Local { socket, json, what } => runtime()?.block_on(lockbridge::control::local(
            &socket,
            json,
            what.into(),
            &mut out,
        )),
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
                lockbridge::daemon::shutdown_signal(),
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
                    lockbridge::sim::serve::serve(world, listener, lockbridge::daemon::shutdown_signal()).await?;
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
                    lockbridge::sim::ble::serve_ble(world, &adapters, lockbridge::daemon::shutdown_signal()).await?;
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
            runtime()?.block_on(lockbridge::link::ble::scan_report(
                config, seconds, json, &mut out,
            ))
        }
        Command::Tedee {
            config,
            what: TedeeCommand::Fetch { locks, json },
        } => {
            let config = lockbridge::config::Config::load(&config)?;
            runtime()?.block_on(lockbridge::tedee::cli::fetch(
                &config.control.socket,
                locks,
                json,
                &mut out,
            ))
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

/// The clap definitions become the library's requests.
impl From<CtlCommand> for lockbridge::ctl::Ask {
    fn from(c: CtlCommand) -> Self {
        use lockbridge::command::Action;
        use lockbridge::ctl::Ask;
        let command = |action, a: CtlAction| Ask::Command {
            action,
            lock: a.lock,
            mode: a.mode,
            id: a.id,
        };
        match c {
            CtlCommand::Locks => Ask::Locks,
            CtlCommand::Gateway => Ask::Gateway,
            CtlCommand::State { lock, watch } => Ask::State { lock, watch },
            CtlCommand::Lock(a) => command(Action::Lock, a),
            CtlCommand::Unlock(a) => command(Action::Unlock, a),
            CtlCommand::Pull(a) => command(Action::Pull, a),
        }
    }
}

impl From<LocalCommand> for lockbridge::control::LocalAsk {
    fn from(c: LocalCommand) -> Self {
        use lockbridge::command::Action;
        use lockbridge::control::{LocalAsk, Request};
        let command = |action, a: LocalAction| {
            LocalAsk::Command(Request::Command {
                lock: a.lock,
                action,
                mode: a.mode,
                id: a.id,
                ttl_s: a.ttl,
            })
        };
        match c {
            LocalCommand::Locks => LocalAsk::Locks,
            LocalCommand::Gateway => LocalAsk::Gateway,
            LocalCommand::Watch => LocalAsk::Watch,
            LocalCommand::State { lock } => LocalAsk::State { lock },
            LocalCommand::Lock(a) => command(Action::Lock, a),
            LocalCommand::Unlock(a) => command(Action::Unlock, a),
            LocalCommand::Pull(a) => command(Action::Pull, a),
        }
    }
}
