//! Back-pressure: a sampler of the dispatchers' backlog on `fleet:tasks`.
//!
//! edge-api and ws-gateway refuse new tasks (429 / `overloaded`) while the number of entries not
//! yet handled by the `dispatchers` group (its lag plus its pending entries) is above a bound,
//! instead of letting Redis memory grow without end. The backlog is sampled in the background
//! (`XINFO GROUPS`), so the check on the request path costs one atomic load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::keys::{GROUP_DISPATCHERS, Keys};
use crate::stream::groups;

/// How often the backlog is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Samples the backlog of the dispatchers until `shutdown`; the returned counter holds it.
pub fn spawn_sampler(client: Client, keys: Keys, shutdown: CancellationToken) -> Arc<AtomicU64> {
    let backlog = Arc::new(AtomicU64::new(0));
    let out = backlog.clone();
    tokio::spawn(async move {
        let stream = keys.tasks();
        loop {
            if let Ok(Some(g)) = groups::group(&client, &stream, GROUP_DISPATCHERS).await {
                let n = g.lag.unwrap_or(0) + g.pending;
                backlog.store(n, Ordering::Relaxed);
                metrics::gauge!("fleet_dispatch_backlog").set(n as f64);
            }
            tokio::select! {
                _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                _ = shutdown.cancelled() => break,
            }
        }
    });
    out
}
