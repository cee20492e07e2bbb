//! A cloneable shutdown signal. Every accept loop and long-lived stream selects
//! on it; once triggered, in-flight work gets a drain deadline.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Fires the shutdown. Dropping the trigger also fires it, so a dropped owner
/// never leaves tasks running.
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<Option<Instant>>,
    drain: Duration,
}

/// Observes the shutdown.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<Option<Instant>>,
}

impl Shutdown {
    /// A trigger/observer pair. After the trigger fires, in-flight streams have
    /// `drain` to finish.
    pub fn new(drain: Duration) -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(None);
        (ShutdownTrigger { tx, drain }, Shutdown { rx })
    }

    /// True once shutdown started.
    pub fn is_triggered(&self) -> bool {
        self.rx.borrow().is_some()
    }

    /// Resolves when shutdown starts.
    pub async fn triggered(&self) {
        let mut rx = self.rx.clone();
        // An error means the trigger is gone, which also means shutdown.
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Resolves when the drain deadline after shutdown has passed: in-flight
    /// streams select on this so they end at the latest then.
    pub async fn drained(&self) {
        let mut rx = self.rx.clone();
        let deadline = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.unwrap_or_else(Instant::now),
            Err(_) => Instant::now(),
        };
        tokio::time::sleep_until(deadline).await;
    }
}

impl ShutdownTrigger {
    /// Starts shutdown now.
    pub fn trigger(&self) {
        let deadline = Instant::now() + self.drain;
        self.tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(deadline);
                true
            } else {
                false
            }
        });
    }
}

impl Drop for ShutdownTrigger {
    fn drop(&mut self) {
        self.trigger();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_deadline_follows_trigger() {
        let (trigger, shutdown) = Shutdown::new(Duration::from_secs(5));
        assert!(!shutdown.is_triggered());
        let start = Instant::now();
        trigger.trigger();
        shutdown.triggered().await;
        shutdown.drained().await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_trigger_shuts_down() {
        let (trigger, shutdown) = Shutdown::new(Duration::ZERO);
        drop(trigger);
        shutdown.triggered().await;
        assert!(shutdown.is_triggered());
    }
}
