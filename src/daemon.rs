//! `lockbridge run`: the daemon. Start-up order: configuration, gateway key, credentials,
//! command-id store, sessions, CoAP, MQTT, control socket — then READY=1. SIGTERM/SIGINT: STOPPING=1, stop
//! taking commands, let in-flight ones finish or time out, ALERT 0x04 on every link, exit 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::clock::unix_ms;
use crate::config::{Config, Provider, Transport};
use crate::credentials::{AuthorityProvider, CredentialError, CredentialProvider, FilesProvider};
use crate::idstore::IdStore;
use crate::ledger::Ledger;
use crate::link::sim::SimConnector;
use crate::registry::{GatewayEvent, LinkStatus, Registry};
use crate::supervisor::{Supervisor, initial_view};
use crate::tedee::provider::TedeeProvider;
use crate::{control, keys, systemd, tasks};

/// How long shutdown waits for in-flight commands.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(15);

/// Exit code for a configuration or credential error found before anything started.
pub const EXIT_CONFIG: u8 = 78; // EX_CONFIG

/// Everything that is up once [`start`] returns.
pub struct Daemon {
    pub supervisor: Arc<Supervisor>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    mqtt: Option<crate::mqtt::Bridge>,
}

/// Bring the daemon up: the caller then waits for its shutdown signal and calls
/// [`Daemon::stop`].
pub async fn start(config: Config) -> anyhow::Result<Daemon> {
    // rustls (MQTT over TLS) uses ring, the provider webrtc-dtls already brings; installing it
    // explicitly keeps rustls from looking for a default. Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Arc::new(config);
    let key_path = config.key_path();
    let gateway_key = keys::load(&key_path).context("gateway key")?;
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
                Arc::new(SimConnector { addr }),
                registry.clone(),
                ledger,
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
            ))
        }
    };
    let mut tasks = Vec::new();
    let coap = crate::cloud::start(&config, supervisor.clone()).await?;
    let dtls_stats = coap.as_ref().map(|c| c.stats.clone());
    if let Some(c) = coap {
        tasks.push(c.task);
    }
    let mqtt = crate::mqtt::start(&config, supervisor.clone(), dtls_stats)?;
    // The control socket last: once it answers, every front end is up.
    let listener = control::bind(&config.control.socket)
        .with_context(|| format!("control socket {}", config.control.socket.display()))?;
    let listener = Arc::new(listener);
    tasks.push({
        let sup = supervisor.clone();
        tasks::supervise("the control socket", registry.clone(), move || {
            control::serve(listener.clone(), sup.clone())
        })
    });
    tasks.push(tokio::spawn(liveness(supervisor.clone())));
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
        tasks.push(tokio::spawn(watchdog(supervisor.clone(), interval)));
    }
    Ok(Daemon {
        supervisor,
        tasks,
        mqtt,
    })
}

impl Daemon {
    pub async fn stop(self) {
        systemd::notify("STOPPING=1");
        log::info!("stopping: no new commands; finishing in-flight ones");
        self.supervisor.shutdown(SHUTDOWN_LIMIT).await;
        if let Some(bridge) = self.mqtt {
            bridge.stop().await;
        }
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.supervisor.config().control.socket);
        log::info!("stopped");
    }
}

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
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let daemon = start(config).await?;
    shutdown.await;
    daemon.stop().await;
    Ok(())
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
