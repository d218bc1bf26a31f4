//! Graceful shutdown: SIGINT or SIGTERM cancels one [`CancellationToken`] that is passed down to
//! every loop and server of the process.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT or SIGTERM.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        t.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Waits for `work` after shutdown began, at most `grace`. Returns whether it finished in time.
pub async fn drain<F: Future<Output = ()>>(work: F, grace: Duration) -> bool {
    match tokio::time::timeout(grace, work).await {
        Ok(()) => true,
        Err(_) => {
            tracing::warn!(
                grace_secs = grace.as_secs_f32(),
                "grace period over; exiting with work in hand"
            );
            false
        }
    }
}
