//! Long-lived front-end tasks (the control socket, the CoAP endpoint, the MQTT bridge) run
//! under [`supervise`]: a task that panics — a bug, never bad input, but a front end must not
//! die silently while the daemon runs on — is logged as an error with its panic message and
//! started again after a short, growing pause.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::registry::{GatewayEvent, Registry};

/// The pause before restart `n` (1-based): 1 s doubling to 30 s.
fn pause(n: u64) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// Run `make()` as a task; when it panics, log it, publish [`GatewayEvent::TaskFailed`] and
/// run a fresh `make()`. Ends when a run ends without panicking; dropped (the daemon's task
/// set aborted), it takes the run with it. The caller spawns it.
pub async fn supervise<F, Fut>(name: &'static str, registry: Arc<Registry>, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut failures = 0u64;
    loop {
        let run = tokio::spawn(make());
        // Aborting the supervisor drops this future, which must not leave the run behind.
        let _run = AbortOnDrop(run.abort_handle());
        let result = run.await;
        let panic = match result {
            Ok(()) => return,
            Err(e) if e.is_panic() => e.into_panic(),
            Err(_) => return, // cancelled
        };
        failures += 1;
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        let wait = pause(failures);
        log::error!(
            "{name} failed ({message}); restarting it in {wait:?} (restart {failures}). This is a bug: please report it with this log"
        );
        registry.publish(GatewayEvent::TaskFailed {
            task: name.to_string(),
            message,
        });
        tokio::time::sleep(wait).await;
    }
}

/// Aborts a task when dropped.
pub struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[test]
    fn pauses_grow_to_their_cap() {
        let secs: Vec<u64> = (1..=8).map(|n| pause(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_is_started_again_and_one_that_ends_is_not() {
        let runs = Arc::new(AtomicU64::new(0));
        let registry = Arc::new(Registry::new([]));
        let mut events = registry.subscribe();
        let r = runs.clone();
        let task = tokio::spawn(supervise("test task", registry.clone(), move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    panic!("run {n} fails");
                }
            }
        }));
        task.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(registry.counters().task_failures, 2);
        match events.recv().await.unwrap() {
            GatewayEvent::TaskFailed { task, message } => {
                assert_eq!(
                    (task.as_str(), message.as_str()),
                    ("test task", "run 0 fails")
                )
            }
            e => panic!("{e:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn aborting_the_supervisor_ends_the_task_it_runs() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let task = tokio::spawn(supervise(
            "test task",
            Arc::new(Registry::new([])),
            move || {
                let tx = tx.clone();
                async move {
                    let _keep = tx;
                    std::future::pending::<()>().await;
                }
            },
        ));
        tokio::task::yield_now().await;
        task.abort();
        // The run's sender is dropped with it: the channel closes.
        assert!(rx.recv().await.is_none());
    }
}
