//! Orderly shutdown: stop taking work, let running requests finish for a
//! grace period, then cancel what is left.

use tokio::sync::watch;

/// Where the agent is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running,
    /// No new connections or requests; running requests may finish.
    Draining,
    /// Running requests are abandoned and answered `cancelled`.
    Cancelling,
}

/// Sets the phase.
#[derive(Debug)]
pub struct ShutdownController {
    tx: watch::Sender<Phase>,
}

/// Observes the phase; cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<Phase>,
}

/// A controller and its first observer.
pub fn channel() -> (ShutdownController, Shutdown) {
    let (tx, rx) = watch::channel(Phase::Running);
    (ShutdownController { tx }, Shutdown { rx })
}

impl ShutdownController {
    /// Move to `phase` (never backwards).
    pub fn advance(&self, phase: Phase) {
        self.tx.send_if_modified(|p| {
            let forward = phase > *p;
            if forward {
                *p = phase;
            }
            forward
        });
    }
}

impl Shutdown {
    /// Resolves once the phase is at least `phase`.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.rx.clone();
        // An error means the controller is gone: the agent is exiting anyway.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.rx.borrow()
    }
}
