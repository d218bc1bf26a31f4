//! Back-pressure: a sampler of the backlog of work not yet taken.
//!
//! edge-api and ws-gateway refuse new tasks (429 / `overloaded`) while the number of entries not
//! yet handled is above a bound, instead of letting Redis memory grow without end. That is the
//! `dispatchers` group's lag plus its pending entries on `fleet:tasks`, plus the same of the
//! `executors` group on each pool's `fleet:exec:<pool>` this process has sent a task to (a submit
//! sends its executor's request itself, see [`crate::session::ChatLimits::direct_dispatch`]);
//! before a group exists (no consumer has started yet), every entry of its stream counts.
//! The backlog is sampled in the background (`XINFO GROUPS`), so the check on the request path
//! costs one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::keys::{GROUP_DISPATCHERS, GROUP_EXECUTORS, Keys};
use crate::stream::groups;

/// How often the backlog is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The pools whose executors' backlog counts.
#[derive(Clone, Default)]
pub struct Pools(Arc<RwLock<Vec<String>>>);

impl Pools {
    /// Counts `pool` from the next sample on (once; later calls cost a read lock).
    pub fn watch(&self, pool: &str) {
        if self.0.read().expect("pools lock").iter().any(|p| p == pool) {
            return;
        }
        let mut pools = self.0.write().expect("pools lock");
        if !pools.iter().any(|p| p == pool) {
            pools.push(pool.to_owned());
        }
    }

    fn list(&self) -> Vec<String> {
        self.0.read().expect("pools lock").clone()
    }
}

/// What [`spawn_sampler`] keeps up to date.
pub struct Sampler {
    /// The last sample: entries not yet handled, in every stream watched.
    pub backlog: Arc<AtomicU64>,
    /// The pools watched besides `fleet:tasks`.
    pub pools: Pools,
}

/// Entries of `stream` that `group` has not handled yet: its lag plus its pending entries, or,
/// while the group does not exist (no consumer has started yet), every entry of the stream,
/// since the group starts from the stream's first entry ([`groups::ensure_group`]).
pub async fn group_backlog(client: &Client, stream: &str, group: &str) -> Result<u64, Error> {
    match groups::group(client, stream, group).await? {
        Some(g) => Ok(g.lag.unwrap_or(0) + g.pending),
        None => client.xlen(stream).await,
    }
}

/// One sample of every stream watched, or `None` when one could not be read.
async fn sample(client: &Client, keys: &Keys, pools: &Pools) -> Option<u64> {
    let dispatch = group_backlog(client, &keys.tasks(), GROUP_DISPATCHERS)
        .await
        .ok()?;
    metrics::gauge!("fleet_dispatch_backlog").set(dispatch as f64);
    let mut n = dispatch;
    for pool in pools.list() {
        let exec = group_backlog(client, &keys.exec(&pool), GROUP_EXECUTORS)
            .await
            .ok()?;
        metrics::gauge!("fleet_exec_backlog", "pool" => pool).set(exec as f64);
        n += exec;
    }
    Some(n)
}

/// Samples the backlog until `shutdown`; a sample Redis did not answer keeps the one before.
pub fn spawn_sampler(client: Client, keys: Keys, shutdown: CancellationToken) -> Sampler {
    let sampler = Sampler {
        backlog: Arc::new(AtomicU64::new(0)),
        pools: Pools::default(),
    };
    let (backlog, pools) = (sampler.backlog.clone(), sampler.pools.clone());
    tokio::spawn(async move {
        loop {
            if let Some(n) = sample(&client, &keys, &pools).await {
                backlog.store(n, Ordering::Relaxed);
            }
            tokio::select! {
                _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                _ = shutdown.cancelled() => break,
            }
        }
    });
    sampler
}
