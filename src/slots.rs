//! Connection slots (design §4): an adapter holds a limited number of links at once. Sessions
//! take a slot before connecting; commands are served before background refreshes; a session
//! holding an idle link gives it up when someone is waiting, so more locks than slots all work.

use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// A command is waiting for this lock.
    Command = 0,
    /// Keep-alive, refresh, a persistent link coming back.
    Background = 1,
}

struct Inner {
    free: usize,
    seq: u64,
    waiters: Vec<(Priority, u64, oneshot::Sender<()>)>,
}

#[derive(Clone)]
pub struct Slots {
    inner: Arc<Mutex<Inner>>,
    /// How many sessions wait for a slot (0 = none).
    waiting: Arc<watch::Sender<usize>>,
    total: usize,
}

/// A held slot; dropping it hands the slot to the best waiter.
pub struct SlotGuard {
    slots: Slots,
}

impl Slots {
    pub fn new(total: usize) -> Slots {
        Slots {
            inner: Arc::new(Mutex::new(Inner {
                free: total,
                seq: 0,
                waiters: Vec::new(),
            })),
            waiting: Arc::new(watch::channel(0).0),
            total,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn in_use(&self) -> usize {
        self.total - self.lock().free
    }

    /// Watch the number of waiters; a holder with an idle link yields when it is above zero.
    pub fn waiting(&self) -> watch::Receiver<usize> {
        self.waiting.subscribe()
    }

    pub async fn acquire(&self, priority: Priority) -> SlotGuard {
        let rx = {
            let mut inner = self.lock();
            if inner.free > 0 && inner.waiters.is_empty() {
                inner.free -= 1;
                return SlotGuard {
                    slots: self.clone(),
                };
            }
            let (tx, rx) = oneshot::channel();
            inner.waiters.retain(|w| !w.2.is_closed());
            inner.seq += 1;
            let seq = inner.seq;
            inner.waiters.push((priority, seq, tx));
            self.waiting.send_replace(inner.waiters.len());
            rx
        };
        // The sender is only dropped after a hand-over or when this waiter is cancelled.
        let _ = rx.await;
        SlotGuard {
            slots: self.clone(),
        }
    }

    fn release(&self) {
        let mut inner = self.lock();
        loop {
            let best = inner
                .waiters
                .iter()
                .enumerate()
                .min_by_key(|(_, (p, seq, _))| (*p, *seq))
                .map(|(i, _)| i);
            let Some(i) = best else {
                inner.free += 1;
                break;
            };
            let (_, _, tx) = inner.waiters.swap_remove(i);
            if tx.send(()).is_ok() {
                break; // the slot moved to that waiter
            }
        }
        self.waiting.send_replace(inner.waiters.len());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // No code panics while holding this lock.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_go_ahead_of_background_waiters() {
        let slots = Slots::new(1);
        let held = slots.acquire(Priority::Background).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, p) in [("bg", Priority::Background), ("cmd", Priority::Command)] {
            let (s, o) = (slots.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _g = s.acquire(p).await;
                o.lock().unwrap().push(name);
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(*slots.waiting().borrow(), 2);
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec!["cmd", "bg"]);
        assert_eq!(slots.in_use(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_swallow_the_slot() {
        let slots = Slots::new(1);
        let held = slots.acquire(Priority::Background).await;
        let s = slots.clone();
        let waiter = tokio::spawn(async move { s.acquire(Priority::Command).await });
        tokio::task::yield_now().await;
        waiter.abort();
        let _ = waiter.await;
        drop(held);
        let _again = slots.acquire(Priority::Background).await;
        assert_eq!(slots.in_use(), 1);
    }
}
