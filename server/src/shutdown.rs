//! Graceful shutdown. On SIGTERM or SIGINT the server drains: `/health` and new requests answer
//! 503, in-flight requests get the grace period to finish, then the ones still running are cut
//! (streams end with an error event, others with 503), and only then does the listener close.
//!
//! The listener stays open while draining, on purpose: a load balancer keeps sending a little
//! traffic until it sees `/health` fail, and those requests should get a 503 to retry elsewhere,
//! not a refused connection.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// How long requests cut at the end of the grace period get to send their last event.
const CUT_WAIT: Duration = Duration::from_secs(5);

/// The server's shutdown state: shared by the state, the middleware and every in-flight request.
#[derive(Debug)]
pub struct Shutdown {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    // A watch, not a Notify: a request that starts listening after the cut must still see it.
    cut: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            cut: watch::Sender::new(false),
        }
    }
}

/// Counts one request as in flight until dropped (when its response body ends or is abandoned).
#[derive(Debug)]
pub struct InFlight(Arc<Shutdown>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Shutdown {
    /// Stops admitting: from now on `/health` and new requests answer 503.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether the server is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Counts a request in flight until the guard drops.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Resolves once no request is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a last guard dropped in between still wakes us.
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Ends the grace period: requests still running end now.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Resolves when [`Shutdown::cut`] has been called (at once if it already was).
    pub fn on_cut(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.cut.subscribe();
        async move {
            if rx.wait_for(|cut| *cut).await.is_err() {
                // The sender is gone with the server: there will be no cut.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Drains: stop admitting, wait up to `grace` for in-flight requests, then cut the rest and
    /// give them a moment to send their last event.
    pub async fn drain(&self, grace: Duration) {
        self.begin_drain();
        tracing::info!(in_flight = self.in_flight(), grace_s = grace.as_secs_f64(), "draining");
        if tokio::time::timeout(grace, self.idle()).await.is_err() {
            tracing::warn!(in_flight = self.in_flight(), "grace period over: ending the requests still running");
            self.cut();
            let _ = tokio::time::timeout(CUT_WAIT, self.idle()).await;
        }
        tracing::info!("drained");
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_in_flight_requests_then_cuts_them() {
        let shutdown = Arc::new(Shutdown::default());
        let guard = shutdown.track();
        let cut = shutdown.on_cut();
        let s = shutdown.clone();
        let drain = tokio::spawn(async move { s.drain(Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(shutdown.is_draining() && !drain.is_finished());
        // The request sees the cut at the end of the grace period and ends.
        cut.await;
        drop(guard);
        drain.await.unwrap();
        assert_eq!(shutdown.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_returns_as_soon_as_the_last_request_ends() {
        let shutdown = Arc::new(Shutdown::default());
        let guard = shutdown.track();
        let s = shutdown.clone();
        let drain = tokio::spawn(async move { s.drain(Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(guard);
        tokio::time::timeout(Duration::from_millis(10), drain).await.expect("drained at once").unwrap();
        // No cut happened: a request starting to listen now would wait forever.
        let late = shutdown.on_cut();
        assert!(tokio::time::timeout(Duration::from_secs(60), late).await.is_err());
    }
}
