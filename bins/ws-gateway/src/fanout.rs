//! The fan-out readers: one task per `<prefix>:fanout:<shard>` stream, each on its own Redis
//! connection (a blocking read holds its connection), handing entries to the [`Registry`].
//!
//! Each reader runs `XREAD COUNT 512 BLOCK 1000 STREAMS <shard> <last id>`. It starts after the
//! shard's newest entry when the gateway starts ([`start_ids`], taken before the HTTP listener
//! serves, so no entry written after a client's replay can be skipped): anything earlier reaches
//! clients through their replay of the session log. Entries of sessions without a client here
//! are skipped without being decoded further than their session id.
//!
//! A reader that fails (Redis restarting) retries with backoff from the id it last read; entries
//! trimmed meanwhile are caught up by the gap rule of [`crate::connection`].

use std::sync::Arc;
use std::time::Duration;

use fleet::session_log::FanoutEntry;
use fleet::stream::entry::{StreamId, parse_entries, xread};
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::registry::{Live, Registry};

/// Entries read per XREAD.
pub const READ_COUNT: u64 = 512;
/// Milliseconds one XREAD blocks waiting for entries.
pub const BLOCK_MS: u64 = 1000;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The id of the newest entry of each stream in `keys` (`0-0` for an empty or missing one).
pub async fn start_ids(client: &Client, keys: &[String]) -> Result<Vec<StreamId>, Error> {
    let mut ids = Vec::with_capacity(keys.len());
    for key in keys {
        let reply: Value = client.xrevrange(key.as_str(), "+", "-", Some(1)).await?;
        let newest = parse_entries(reply)
            .ok()
            .and_then(|e| e.first().map(|e| e.id))
            .unwrap_or(StreamId::ZERO);
        ids.push(newest);
    }
    Ok(ids)
}

/// Reads fan-out stream `key` after `after` until `stop`, dispatching to `registry`.
pub async fn read_shard(
    client: Client,
    key: String,
    mut after: StreamId,
    registry: Arc<Registry>,
    stop: CancellationToken,
) {
    let reader = fleet::redis::blocking_reader(&client, Duration::from_millis(BLOCK_MS));
    let mut backoff = BACKOFF_MIN;
    loop {
        let connected = tokio::select! {
            r = reader.init() => r,
            () = stop.cancelled() => return,
        };
        match connected {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(stream = %key, error = %e, "fan-out reader cannot connect; retrying");
                if pause(&stop, &mut backoff).await {
                    return;
                }
            }
        }
    }
    tracing::info!(stream = %key, after = %after, "fan-out reader started");
    backoff = BACKOFF_MIN;
    loop {
        let reply = tokio::select! {
            r = xread(&reader, Some(READ_COUNT), Some(BLOCK_MS), &key, after) => r,
            () = stop.cancelled() => break,
        };
        let streams = match reply {
            Ok(Ok(streams)) => streams,
            Ok(Err(shape)) => {
                tracing::error!(stream = %key, error = %shape, "unreadable XREAD reply");
                if pause(&stop, &mut backoff).await {
                    break;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(stream = %key, error = %e, "fan-out read failed; retrying");
                if pause(&stop, &mut backoff).await {
                    break;
                }
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        for (_, entries) in streams {
            for entry in entries {
                after = after.max(entry.id);
                let Some(sid) = entry.get_str("s") else {
                    continue;
                };
                let queued = registry.dispatch(sid, || {
                    FanoutEntry::parse_all(&entry)
                        .into_iter()
                        .map(Live::from)
                        .collect()
                });
                if queued > 0
                    && let Some(tp) = entry.get_str("tp")
                {
                    delivered_span(&key, sid, tp, queued);
                }
            }
        }
    }
    let _ = reader.quit().await;
    tracing::info!(stream = %key, "fan-out reader stopped");
}

/// Records the hand-over of a traced event to this gateway's clients: a consumer span, child
/// of the callback span that logged the event, so the delivery closes the task's trace.
fn delivered_span(stream: &str, sid: &str, tp: &str, clients: usize) {
    let span = tracing::info_span!(
        "fanout_deliver",
        otel.name = %format!("{stream} deliver"),
        otel.kind = "consumer",
        messaging.system = "redis",
        messaging.operation = "receive",
        messaging.destination.name = %stream,
        fleet.session_id = %sid,
        fleet.clients = clients,
    );
    fleet::telemetry::continue_from(&span, Some(tp), false);
}

/// Sleeps `backoff` (doubling it up to a bound); `true` when `stop` came first.
async fn pause(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        () = stop.cancelled() => true,
    }
}
