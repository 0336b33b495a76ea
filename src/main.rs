//! The `lockbridge` command: one binary, one subcommand per job.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Parser, Subcommand};

use lockbridge::authority::{self, Authority, IssueRequest};
use lockbridge::keys;
use lockbridge::ptls::cert;
use lockbridge::sim::config::SimConfig;
use lockbridge::sim::serve::{ListenAddr, Listener, SimWorld};

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
    /// Run simulated locks, a gateway client and every step from handshake to unlock.
    Demo {
        /// Where to write the demo's world (default: a new directory under $TMPDIR).
        #[arg(long)]
        dir: Option<PathBuf>,
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
}

#[derive(Args)]
struct SimServe {
    /// The world file (`sim init` writes one).
    #[arg(long)]
    config: PathBuf,
    /// unix:PATH or tcp:127.0.0.1:PORT
    #[arg(long)]
    listen: ListenAddr,
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
    lockbridge::telemetry::init_stderr();
    let cli = Cli::parse();
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

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Demo { dir } => runtime()?.block_on(lockbridge::demo::run(
            lockbridge::demo::DemoOptions { dir },
            &mut out,
        )),
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
            let rt = runtime()?;
            rt.block_on(async {
                let listener = Listener::bind(&s.listen)
                    .await
                    .with_context(|| format!("listening on {}", s.listen))?;
                log::info!(
                    "sim: serving {} locks on {}",
                    specs.len(),
                    listener.local_addr()?
                );
                let world = SimWorld {
                    locks: specs,
                    faults: config.faults,
                    event_log: config.event_log,
                    seed: config.seed,
                };
                lockbridge::sim::serve::serve(world, listener, shutdown_signal()).await?;
                log::info!("sim: stopped");
                Ok(())
            })
        }
        Command::Sim { .. } => anyhow::bail!(
            "sim needs --config FILE --listen ADDR, or `sim init DIR` (see lockbridge sim --help)"
        ),
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
                now_ms: authority::unix_ms_now(),
            });
            writeln!(out, "{}", B64.encode(cert))?;
            Ok(())
        }
        Command::Authority(AuthorityCommand::SignTime { authority: dir, at }) => {
            let a = Authority::load(&dir)?;
            let st = a.sign_time(at.unwrap_or_else(authority::unix_ms_now));
            let json = serde_json::json!({
                "datetime": B64.encode(st.datetime),
                "signature": B64.encode(&st.signature),
            });
            writeln!(out, "{json}")?;
            Ok(())
        }
    }
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
