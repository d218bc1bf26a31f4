//! The fan-out readers: one task per `<prefix>:fanout:<shard>` stream, each on its own Redis
//! connection (a blocking read holds its connection), handing entries to the [`Registry`].
//!
//! Each reader runs `XREAD COUNT 512 BLOCK 1000 STREAMS <shard> <last id>`. It starts after the
//! shard's newest entry when the gateway starts ([`start_ids`], taken before the HTTP listener
//! serves, so no entry written after a client's replay can be skipped): anything earlier reaches
//! clients through their replay of the session log. Entries of sessions without a client here
//! are skipped without being decoded further than their session id.
//!
//! A reader that fails (Redis restarting) retries with backoff from the id it last read.
//!
//! The shards are capped (`MAXLEN ~`): a reader that falls a whole shard behind (a long Redis
//! outage, a stalled process) finds the entries after its position trimmed, and XREAD silently
//! starts from the oldest entry left. The gap rule of [`crate::connection`] would catch up a
//! session only when its next entry arrives, if one ever does; so the reader checks, and when the
//! shard has lost entries to trimming and its oldest entry left is after the position the reader
//! read from, has every client of the shard read its session log to the end
//! ([`Registry::resync`]); a client whose log lost events too gets `events_lost` first. The
//! check (one `XINFO STREAM`) runs only after a read that could have skipped entries: the first
//! read after connecting or after fred reconnected (fred retries a read cut by a dropped
//! connection, so it succeeds across an outage), a read after a failed one, and a full read
//! ([`READ_COUNT`] entries). Any other read returned fewer entries than a shard keeps (at least
//! its `MAXLEN`, far more than [`READ_COUNT`]), so nothing after its position had been trimmed.
//! Delivering an entry costs no Redis call.

use std::sync::Arc;
use std::time::Duration;

use fleet::session_log::FanoutEntry;
use fleet::stream::entry::{StreamId, xread};
use fleet::stream::groups;
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
        ids.push(fleet::stream::entry::newest_id(client, key).await?);
    }
    Ok(ids)
}

/// When entries of stream `key` after `from` may have been trimmed: the id of its oldest entry
/// left. Trimming removes the oldest entries, so that is when the oldest left is after `from`
/// and the stream ever lost an entry (`entries-added` above `length`: without it, a reader that
/// started on an empty shard, at `0-0`, would take every first read for a loss).
async fn trimmed_past(
    client: &Client,
    key: &str,
    from: StreamId,
) -> Result<Option<StreamId>, Error> {
    // Nothing was ever written, or the stream is gone with everything in it.
    let Some(info) = groups::stream_info(client, key).await? else {
        return Ok(None);
    };
    // A Redis without `entries-added` (before 7.0) cannot tell: the oldest entry decides.
    let ever_trimmed = info.entries_added.is_none_or(|added| added > info.length);
    Ok(info.first_entry.filter(|&o| ever_trimmed && o > from))
}

/// The shard number of fan-out stream `key` (`<prefix>:fanout:<n>`); `None` when it does not
/// end in one.
fn shard_of(key: &str) -> Option<u32> {
    key.rsplit_once(':')?.1.parse().ok()
}

/// Whether `reconnects` heard of a reconnection since last asked (fred retries a command cut by
/// a dropped connection on the new one, so a read can succeed across an outage). Never waits.
fn reconnected<T: Clone>(reconnects: &mut tokio::sync::broadcast::Receiver<T>) -> bool {
    use tokio::sync::broadcast::error::TryRecvError;
    let mut any = false;
    loop {
        match reconnects.try_recv() {
            Ok(_) | Err(TryRecvError::Lagged(_)) => any = true,
            Err(TryRecvError::Empty | TryRecvError::Closed) => return any,
        }
    }
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
    let shard = shard_of(&key);
    let mut reconnects = reader.reconnect_rx();
    // The position after which the shard may have lost entries unread: set by a read that could
    // have skipped some (see the module docs), cleared by the check. The first read is one.
    let mut unchecked = Some(after);
    loop {
        let before = after;
        let reply = tokio::select! {
            r = xread(&reader, Some(READ_COUNT), Some(BLOCK_MS), &key, after) => r,
            () = stop.cancelled() => break,
        };
        let streams = match reply {
            Ok(Ok(streams)) => streams,
            Ok(Err(shape)) => {
                tracing::error!(stream = %key, error = %shape, "unreadable XREAD reply");
                unchecked.get_or_insert(before);
                if pause(&stop, &mut backoff).await {
                    break;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(stream = %key, error = %e, "fan-out read failed; retrying");
                unchecked.get_or_insert(before);
                if pause(&stop, &mut backoff).await {
                    break;
                }
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        let read: usize = streams.iter().map(|(_, entries)| entries.len()).sum();
        // Asked every time, so that a reconnection is not counted again at a later read.
        let reconnected = reconnected(&mut reconnects);
        if read as u64 >= READ_COUNT || reconnected {
            unchecked.get_or_insert(before);
        }
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
        if let Some(from) = unchecked {
            let trimmed = tokio::select! {
                r = trimmed_past(&reader, &key, from) => r,
                () = stop.cancelled() => break,
            };
            match trimmed {
                Ok(trimmed) => {
                    unchecked = None;
                    if let Some(oldest) = trimmed {
                        let clients = registry.resync(shard);
                        metrics::counter!("fleet_ws_fanout_trimmed_total").increment(1);
                        tracing::warn!(
                            stream = %key,
                            read_after = %from,
                            oldest = %oldest,
                            clients,
                            "fan-out shard trimmed past this reader; its clients catch up from \
                             their session logs"
                        );
                    }
                }
                // Checked after the next read, from the same position.
                Err(e) => {
                    tracing::warn!(stream = %key, error = %e, "cannot check the fan-out shard")
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

#[cfg(test)]
mod tests {
    use fleet::Keys;
    use fleet::session_log::FanoutConfig;

    use super::*;

    #[test]
    fn a_read_that_skipped_trimmed_entries_is_a_full_one() {
        // Only full reads are checked: a read after entries were trimmed past its position
        // finds at least a shard's MAXLEN entries after it.
        assert!(FanoutConfig::default().maxlen >= READ_COUNT);
    }

    #[test]
    fn the_shard_is_read_from_the_key() {
        let keys = Keys::new("fleet:test");
        assert_eq!(shard_of(&keys.fanout(0)), Some(0));
        assert_eq!(shard_of(&keys.fanout(17)), Some(17));
        assert_eq!(shard_of("fanout"), None);
    }

    #[test]
    fn every_reconnection_since_the_last_look_counts_once() {
        let (tx, mut rx) = tokio::sync::broadcast::channel(2);
        assert!(!reconnected(&mut rx));
        tx.send(()).unwrap();
        assert!(reconnected(&mut rx));
        assert!(!reconnected(&mut rx));
        for _ in 0..5 {
            tx.send(()).unwrap(); // more than the channel holds: lagged still counts
        }
        assert!(reconnected(&mut rx));
        assert!(!reconnected(&mut rx));
    }
}
