//! Graceful shutdown: SIGINT or SIGTERM cancels one [`CancellationToken`] that is passed down to
//! every loop and server of the process.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;

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

/// Runs a process's long-lived `workers` until `shutdown`, then gives them `grace` to finish.
///
/// A worker that ends before shutdown was asked for is a failure: the others are stopped and
/// its error is returned, so the process exits non-zero and its supervisor restarts it.
pub async fn supervise(
    mut workers: JoinSet<(&'static str, anyhow::Result<()>)>,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let early = tokio::select! {
        done = workers.join_next() => done,
        _ = shutdown.cancelled() => None,
    };
    let mut failure = None;
    match early {
        // A worker may see the shutdown before this select does: that is a normal stop.
        Some(Ok((name, Err(e)))) if shutdown.is_cancelled() => {
            tracing::error!(worker = name, error = %e, "worker failed while stopping");
            failure = Some(e);
        }
        Some(_) if shutdown.is_cancelled() => {}
        Some(done) => {
            shutdown.cancel();
            let (name, result) =
                done.unwrap_or(("worker", Err(anyhow::anyhow!("worker panicked"))));
            drain(
                async { while workers.join_next().await.is_some() {} },
                grace,
            )
            .await;
            return match result {
                Err(e) => Err(e.context(format!("{name} stopped"))),
                Ok(()) => Err(anyhow::anyhow!("{name} stopped before shutdown")),
            };
        }
        None => {}
    }
    let finished = drain(
        async {
            while let Some(done) = workers.join_next().await {
                if let Ok((name, Err(e))) = done {
                    tracing::error!(worker = name, error = %e, "worker failed while stopping");
                    failure.get_or_insert(e);
                }
            }
        },
        grace,
    )
    .await;
    if !finished {
        workers.abort_all();
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
