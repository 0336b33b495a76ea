//! `lockbridge run`: the daemon. Start-up order: configuration, gateway key (loaded once, by
//! the caller), credentials, command-id store, sessions, CoAP, MQTT, control socket — then
//! READY=1. SIGTERM/SIGINT: STOPPING=1, stop taking commands, let in-flight ones finish or
//! time out, ALERT 0x04 on every link, close_notify on every DTLS session, exit 0. One
//! [`CancellationToken`] reaches every task; one [`JoinSet`] holds them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use p256::ecdsa::SigningKey;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::unix_ms;
use crate::config::{Config, Provider, Transport};
use crate::credentials::{AuthorityProvider, CredentialError, CredentialProvider, FilesProvider};
use crate::idstore::IdStore;
use crate::ledger::Ledger;
use crate::link::sim::SimConnector;
use crate::registry::{GatewayEvent, LinkStatus, Registry};
use crate::supervisor::{Supervisor, initial_view};
use crate::tedee::provider::TedeeProvider;
use crate::{control, systemd, tasks};

/// How long shutdown waits for in-flight commands.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(15);

/// Exit code for a configuration or credential error found before anything started.
pub const EXIT_CONFIG: u8 = 78; // EX_CONFIG

/// Everything that is up once [`start`] returns. One token stops it all and one set holds
/// every task it started.
pub struct Daemon {
    pub supervisor: Arc<Supervisor>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    mqtt: Option<crate::mqtt::Bridge>,
}

/// Bring the daemon up with its configuration and the gateway key (loaded once, by the
/// caller, which refuses to start without it): the caller then waits for its shutdown signal
/// and calls [`Daemon::stop`].
pub async fn start(config: Config, gateway_key: SigningKey) -> anyhow::Result<Daemon> {
    // rustls (MQTT over TLS) uses ring, the provider webrtc-dtls already brings; installing it
    // explicitly keeps rustls from looking for a default. Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Arc::new(config);
    let cancel = CancellationToken::new();
    let registry = Arc::new(Registry::new(config.locks.iter().map(initial_view)));
    let credentials = credentials_provider(&config, *gateway_key.verifying_key(), registry.clone())
        .context("credentials")?;
    let store = IdStore::open(
        &config.gateway.state_dir,
        config.commands.remember_ids_h * 3_600_000,
        unix_ms(),
    )?;
    let ledger = Arc::new(Ledger::new(store, registry.clone()));
    let supervisor = match config.ble.transport {
        Transport::Sim => {
            let addr = config
                .ble
                .sim_endpoint
                .clone()
                .context("ble.sim_endpoint: required with transport = \"sim\"")?;
            Arc::new(Supervisor::start(
                config.clone(),
                gateway_key,
                credentials,
                Arc::new(SimConnector::new(addr)),
                registry.clone(),
                ledger,
                cancel.child_token(),
            ))
        }
        Transport::Ble => {
            let connector = crate::link::ble::BleConnector::new(
                &config.ble.adapter,
                Duration::from_secs(config.ble.connect_timeout_s),
            )
            .await
            .context("ble")?;
            Arc::new(Supervisor::start(
                config.clone(),
                gateway_key,
                credentials,
                Arc::new(connector),
                registry.clone(),
                ledger,
                cancel.child_token(),
            ))
        }
    };
    let mut tasks = JoinSet::new();
    let coap = crate::cloud::start(&config, supervisor.clone(), cancel.child_token()).await?;
    let dtls_stats = coap.as_ref().map(|c| c.stats.clone());
    if let Some(c) = coap {
        tasks.spawn(c.serve);
    }
    let mqtt = crate::mqtt::start(&config, supervisor.clone(), dtls_stats)?;
    // The control socket last: once it answers, every front end is up.
    let listener = control::bind(&config.control.socket)
        .with_context(|| format!("control socket {}", config.control.socket.display()))?;
    let listener = Arc::new(listener);
    let control = {
        let sup = supervisor.clone();
        tasks::supervise("the control socket", registry.clone(), move || {
            control::serve(listener.clone(), sup.clone())
        })
    };
    tasks.spawn(until(cancel.clone(), control));
    tasks.spawn(until(cancel.clone(), liveness(supervisor.clone())));
    for warning in config.deprecations() {
        log::warn!("{warning}");
    }
    log::info!(
        "lockbridge {} up: gateway {}, {} locks, {} connection slots, control socket {}",
        env!("CARGO_PKG_VERSION"),
        config.gateway.id,
        config.locks.len(),
        config.ble.max_connections,
        config.control.socket.display()
    );
    systemd::notify(&format!(
        "READY=1\nSTATUS=serving {} locks",
        config.locks.len()
    ));
    if let Some(interval) = systemd::watchdog_interval() {
        tasks.spawn(until(
            cancel.clone(),
            watchdog(supervisor.clone(), interval),
        ));
    }
    Ok(Daemon {
        supervisor,
        cancel,
        tasks,
        mqtt,
    })
}

/// Run `task` until the daemon stops.
async fn until(cancel: CancellationToken, task: impl Future<Output = ()>) {
    cancel.run_until_cancelled(task).await;
}

impl Daemon {
    /// Stop taking commands, let the sessions finish what they hold (at most
    /// [`SHUTDOWN_LIMIT`]), close every lock link (ALERT 0x04), every DTLS session
    /// (close_notify) and the MQTT session (`offline`), then end every task.
    pub async fn stop(mut self) {
        systemd::notify("STOPPING=1");
        log::info!("stopping: no new commands; finishing in-flight ones");
        self.supervisor.shutdown(SHUTDOWN_LIMIT).await;
        self.cancel.cancel();
        if let Some(bridge) = self.mqtt {
            bridge.stop().await;
        }
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(TASKS_LIMIT, all).await.is_err() {
            log::warn!("some tasks did not end within {TASKS_LIMIT:?}; ending them");
            self.tasks.shutdown().await;
        }
        let _ = std::fs::remove_file(&self.supervisor.config().control.socket);
        log::info!("stopped");
    }
}

/// How long the front ends may take to close their sessions once the sessions are done.
const TASKS_LIMIT: Duration = Duration::from_secs(5);

/// The configured credentials provider; `registry` shows the locks' credentials.
fn credentials_provider(
    config: &Arc<Config>,
    client_key: p256::ecdsa::VerifyingKey,
    registry: Arc<Registry>,
) -> Result<Arc<dyn CredentialProvider>, CredentialError> {
    Ok(match config.credentials.provider {
        Provider::Authority => Arc::new(AuthorityProvider::load(config, client_key)?),
        Provider::Files => Arc::new(FilesProvider::new(config.gateway.state_dir.clone())),
        Provider::Tedee => Arc::new(TedeeProvider::start(config.clone(), &client_key, registry)?),
    })
}

/// Run until `shutdown` completes.
pub async fn run(
    config: Config,
    gateway_key: SigningKey,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let daemon = start(config, gateway_key).await?;
    shutdown.await;
    daemon.stop().await;
    Ok(())
}

/// Resolves at SIGTERM or SIGINT (never, if the handlers cannot be installed).
pub async fn shutdown_signal() {
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

/// Feed the systemd watchdog only while every session task's loop is turning.
async fn watchdog(supervisor: Arc<Supervisor>, interval: Duration) {
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        let age = unix_ms().saturating_sub(supervisor.oldest_heartbeat_ms());
        if age < interval.as_millis() as u64 {
            systemd::notify("WATCHDOG=1");
        } else {
            log::error!("a session task has not run for {age} ms; not feeding the watchdog");
        }
    }
}

/// Report locks that should be reachable but make no progress (log and event).
async fn liveness(supervisor: Arc<Supervisor>) {
    let stall_ms = supervisor.config().liveness.stall_after_s * 1000;
    let mut reported = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let now = unix_ms();
        for v in supervisor.registry().all() {
            let expected = matches!(
                v.status,
                LinkStatus::Connected | LinkStatus::Connecting | LinkStatus::Unreachable
            );
            let stalled = expected && now.saturating_sub(v.progress_ms) > stall_ms;
            if stalled && reported.insert(v.id.clone()) {
                log::warn!(
                    "lock {} has made no progress for {} s ({:?}{})",
                    v.id,
                    now.saturating_sub(v.progress_ms) / 1000,
                    v.status,
                    v.last_error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
                supervisor.registry().publish(GatewayEvent::Stalled {
                    lock: v.id.clone(),
                    since_ms: v.progress_ms,
                });
            } else if !stalled {
                reported.remove(&v.id);
            }
        }
    }
}
