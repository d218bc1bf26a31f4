//! The one consumer loop every worker runs: read, handle, ack, reclaim, dead-letter, trim.
//!
//! A worker implements [`Handler`] for the message family of its stream and calls
//! [`ConsumerLoop::run`] with a shutdown token. The loop:
//!
//! 1. creates the group (`XGROUP CREATE ... 0 MKSTREAM`) if it does not exist;
//! 2. reads batches with `XREADGROUP COUNT <n> BLOCK <ms>` on a connection of its own, and keeps
//!    up to `max_in_flight` entries in the handler at once (so it reads the next batch while the
//!    previous one is being handled);
//! 3. decodes each entry; an entry that does not decode is dead-lettered with the reason;
//! 4. hands the decoded batch to the handler, which answers one [`Outcome`] per entry;
//! 5. acks the batch (one `XACK` with every id); a batch with dead letters writes them first
//!    and acks only the entries whose dead letter was written, so an entry whose dead letter is
//!    refused (a full Redis, a wrong type at the dead-letter key) stays pending and is retried;
//! 6. every `claim_idle / 2` (at most 5 s): renews its claim on entries still being handled,
//!    samples the group's lag, pending count and oldest pending age into gauges, takes over
//!    entries idle past `claim_idle` (dead consumers), as many as it has free handler slots for,
//!    dead-letters those delivered `max_deliveries` times, trims the stream below what every
//!    group acknowledged, and forgets stale consumers. None of this waits for a handler slot,
//!    so claim renewal never stops while the handlers are busy;
//! 7. on shutdown: stops reading, lets the batches in hand finish and ack (renewing their claims
//!    meanwhile), and returns.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::streams::XPendingArgs;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::dlq::{DeadLetter, dead_letter};
use super::entry::{self, StreamEntry, StreamId, parse_entries, parse_id};
use super::groups;
use crate::envelope::{Envelope, Message};

/// What the handler decided for one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Its effects are written: acknowledge it.
    Ack,
    /// Leave it pending; it is delivered again after `claim_idle` (up to `max_deliveries`).
    Retry,
    /// It can never succeed: move it to the dead-letter stream with this reason.
    DeadLetter(String),
}

/// One entry handed to a handler.
#[derive(Clone, Debug)]
pub struct Delivery<M> {
    /// The entry's id in its stream.
    pub entry_id: StreamId,
    /// How many times it has been delivered, this time included (1 on first delivery).
    pub deliveries: u32,
    pub envelope: Envelope<M>,
}

/// The work a consumer does with a batch of decoded entries.
pub trait Handler: Send + Sync + 'static {
    /// The message family on the stream.
    type Msg: Message;

    /// Handles a batch and answers one outcome per delivery, in the same order. A handler that
    /// cannot reach its dependencies answers [`Outcome::Retry`] for what it could not finish.
    fn handle(&self, batch: Vec<Delivery<Self::Msg>>) -> impl Future<Output = Vec<Outcome>> + Send;
}

/// How a consumer loop reads and recovers. See the module docs for what each bound does.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub stream: String,
    pub group: String,
    /// Unique per process: see [`unique_consumer_name`].
    pub consumer: String,
    /// The dead-letter stream.
    pub dlq: String,
    /// Entries per XREADGROUP.
    pub batch: usize,
    /// How long one XREADGROUP blocks; also the longest a shutdown waits for the read in hand.
    pub block: Duration,
    /// Entries in the handler at once, over all batches in hand.
    pub max_in_flight: usize,
    /// An entry pending longer than this is taken from its consumer.
    pub claim_idle: Duration,
    /// Deliveries after which an entry is dead-lettered instead of handled again.
    pub max_deliveries: u32,
    /// Consumers idle longer than this and owning nothing are removed from the group.
    pub stale_consumer: Duration,
    /// Trim the stream below what every group acknowledged.
    pub trim: bool,
}

impl ConsumerConfig {
    /// Defaults suited to a fast worker; override fields as needed.
    pub fn new(stream: String, group: &str, consumer: String, dlq: String) -> Self {
        Self {
            stream,
            group: group.to_owned(),
            consumer,
            dlq,
            batch: 256,
            block: Duration::from_millis(1000),
            max_in_flight: 512,
            claim_idle: Duration::from_secs(30),
            max_deliveries: 5,
            stale_consumer: Duration::from_secs(3600),
            trim: true,
        }
    }
}

/// Maintenance (claim renewal, reclaim, gauges) runs at least this often.
pub const MAX_MAINTENANCE_INTERVAL: Duration = Duration::from_secs(5);

/// A consumer name no other process will use: `<worker>-<host>-<pid>-<random>`.
pub fn unique_consumer_name(worker: &str) -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "host".into());
    let rand: u32 = rand::random();
    format!("{worker}-{host}-{}-{rand:08x}", std::process::id())
}

/// Errors that stop a consumer loop. Transient Redis errors do not: the loop retries them.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot create group `{group}` on `{stream}`: {source}")]
    CreateGroup {
        stream: String,
        group: String,
        #[source]
        source: fred::error::Error,
    },
    #[error("cannot connect the reader: {0}")]
    Connect(#[source] fred::error::Error),
}

/// Entries currently in a handler, with when they were (re)claimed, for claim renewal.
type InFlight = Arc<Mutex<BTreeMap<StreamId, Instant>>>;

/// Takes a batch's entries out of the in-flight set when dropped: when its handler returns, and
/// also when it panics, so that the entries of a panicked handler stop having their claims
/// renewed and are delivered again (then dead-lettered past `max_deliveries`), as those of a
/// consumer that died are, instead of staying pending for good.
struct Landed {
    in_flight: InFlight,
    ids: Vec<StreamId>,
}

impl Drop for Landed {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        for id in &self.ids {
            in_flight.remove(id);
        }
    }
}

/// Logs a batch whose handler panicked (its entries are left pending: see [`Landed`]).
fn joined(stream: &str, batch: Option<Result<(), tokio::task::JoinError>>) {
    if let Some(Err(e)) = batch
        && e.is_panic()
    {
        tracing::error!(stream, error = %e, "a handler panicked; its entries will be delivered again");
    }
}

/// The loop's per-batch metrics, registered once (a lookup by name and labels per batch would
/// cost as much as the rest of a one-entry batch's bookkeeping).
struct BatchMetrics {
    acked: metrics::Counter,
    retried: metrics::Counter,
    dead_lettered: metrics::Counter,
    seconds: metrics::Histogram,
}

impl BatchMetrics {
    fn new(cfg: &ConsumerConfig) -> Self {
        let labels = [("stream", cfg.stream.clone()), ("group", cfg.group.clone())];
        Self {
            acked: metrics::counter!("fleet_stream_entries_acked_total", &labels),
            retried: metrics::counter!("fleet_stream_entries_retried_total", &labels),
            dead_lettered: metrics::counter!("fleet_stream_entries_dead_lettered_total", &labels),
            seconds: metrics::histogram!("fleet_stream_batch_seconds", &labels),
        }
    }
}

/// The consumer loop. Build with [`ConsumerLoop::new`], then [`run`](Self::run) it.
pub struct ConsumerLoop<H: Handler> {
    cfg: Arc<ConsumerConfig>,
    client: Client,
    handler: Arc<H>,
    in_flight: InFlight,
    metrics: Arc<BatchMetrics>,
}

impl<H: Handler> ConsumerLoop<H> {
    /// `client` is used for acks, claims and dead letters; the loop opens its own connection
    /// (a `clone_new` of it) for the blocking reads. Its metrics go to the recorder installed
    /// when it is built ([`crate::admin::prometheus`]).
    pub fn new(cfg: ConsumerConfig, client: Client, handler: H) -> Self {
        Self {
            metrics: Arc::new(BatchMetrics::new(&cfg)),
            cfg: Arc::new(cfg),
            client,
            handler: Arc::new(handler),
            in_flight: Arc::default(),
        }
    }

    /// Runs until `shutdown` is cancelled, then finishes the batches in hand and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let cfg = self.cfg.clone();
        groups::ensure_group(&self.client, &cfg.stream, &cfg.group)
            .await
            .map_err(|source| ConsumerError::CreateGroup {
                stream: cfg.stream.clone(),
                group: cfg.group.clone(),
                source,
            })?;
        let reader = crate::redis::blocking_reader(&self.client, cfg.block);
        reader.init().await.map_err(ConsumerError::Connect)?;
        tracing::info!(stream = %cfg.stream, group = %cfg.group, consumer = %cfg.consumer, "consumer started");

        let permits = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
        let mut batches: JoinSet<()> = JoinSet::new();
        let maintenance_every = (cfg.claim_idle / 2)
            .min(MAX_MAINTENANCE_INTERVAL)
            .max(Duration::from_millis(50));
        let mut next_maintenance = Instant::now();
        let mut maintenance_round: u64 = 0;
        let mut backoff = Duration::from_millis(50);

        while !shutdown.is_cancelled() {
            while let Some(batch) = batches.try_join_next() {
                joined(&cfg.stream, Some(batch));
            }

            if Instant::now() >= next_maintenance {
                next_maintenance = Instant::now() + maintenance_every;
                maintenance_round += 1;
                self.maintain(&permits, &mut batches, maintenance_round)
                    .await;
            }

            let available = permits.available_permits().min(cfg.batch);
            if available == 0 {
                // Full: wait for a batch to finish, but keep maintenance (claim renewal above
                // all) on schedule, or peers would take over the entries held here.
                tokio::select! {
                    batch = batches.join_next() => joined(&cfg.stream, batch),
                    _ = tokio::time::sleep_until(next_maintenance.into()) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            let block_ms = cfg
                .block
                .min(next_maintenance.saturating_duration_since(Instant::now()))
                .as_millis()
                .max(1) as u64;
            let reply = entry::xreadgroup(
                &reader,
                &cfg.group,
                &cfg.consumer,
                Some(available as u64),
                Some(block_ms),
                &cfg.stream,
            )
            .await;
            let entries = match reply {
                Ok(Ok(streams)) => {
                    backoff = Duration::from_millis(50);
                    streams.into_iter().flat_map(|(_, e)| e).collect::<Vec<_>>()
                }
                Ok(Err(shape)) => {
                    tracing::error!(stream = %cfg.stream, error = %shape, "unreadable XREADGROUP reply");
                    Vec::new()
                }
                Err(e) => {
                    if e.details().contains("NOGROUP") {
                        let _ = groups::ensure_group(&self.client, &cfg.stream, &cfg.group).await;
                    } else {
                        tracing::warn!(stream = %cfg.stream, error = %e, "read failed; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            if entries.is_empty() {
                continue;
            }
            let deliveries = vec![1; entries.len()];
            self.spawn_batch(&permits, &mut batches, entries, deliveries);
        }

        tracing::info!(stream = %cfg.stream, consumer = %cfg.consumer, in_hand = batches.len(), "consumer stopping");
        // The batches in hand may take a while (an LLM task, up to the shutdown grace): keep
        // their claims renewed, or a peer would take them over and run them a second time. No
        // reclaim here: a stopping consumer takes on no new work.
        while !batches.is_empty() {
            tokio::select! {
                batch = batches.join_next() => joined(&cfg.stream, batch),
                _ = tokio::time::sleep_until(next_maintenance.into()) => {
                    next_maintenance = Instant::now() + maintenance_every;
                    self.renew_claims().await;
                }
            }
        }
        let _ = reader.quit().await;
        groups::forget_consumer_if_idle(&self.client, &cfg.stream, &cfg.group, &cfg.consumer).await;
        tracing::info!(stream = %cfg.stream, consumer = %cfg.consumer, "consumer stopped");
        Ok(())
    }

    /// Takes permits for `entries` and handles them on a task of their own. Callers take at
    /// most as many entries as there are free permits (only this loop takes permits, so they
    /// are still free here): waiting for permits would stall the loop, claim renewal included.
    fn spawn_batch(
        &self,
        permits: &Arc<Semaphore>,
        batches: &mut JoinSet<()>,
        entries: Vec<StreamEntry>,
        deliveries: Vec<u32>,
    ) {
        let n = entries.len() as u32;
        let Ok(permit) = permits.clone().try_acquire_many_owned(n) else {
            // Not reached (see above); if it were, the entries stay pending and are reclaimed.
            tracing::error!(stream = %self.cfg.stream, count = n, free = permits.available_permits(), "no handler slots for entries taken; leaving them pending");
            return;
        };
        {
            let now = Instant::now();
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            for e in &entries {
                in_flight.insert(e.id, now);
            }
        }
        let cfg = self.cfg.clone();
        let client = self.client.clone();
        let handler = self.handler.clone();
        let landed = Landed {
            in_flight: self.in_flight.clone(),
            ids: entries.iter().map(|e| e.id).collect(),
        };
        let metrics = self.metrics.clone();
        batches.spawn(async move {
            handle_batch(&cfg, &client, &*handler, &metrics, entries, deliveries).await;
            drop(landed);
            drop(permit);
        });
    }

    /// Claim renewal, reclaim of dead consumers' entries, trimming, stale consumer cleanup.
    async fn maintain(&self, permits: &Arc<Semaphore>, batches: &mut JoinSet<()>, round: u64) {
        let cfg = &self.cfg;
        self.renew_claims().await;
        if let Err(e) = groups::sample(&self.client, &cfg.stream, &cfg.group).await {
            tracing::debug!(stream = %cfg.stream, error = %e, "group sample failed");
        }

        // Only as many as there are free handler slots: an entry taken over restarts its idle
        // time, so one taken without a slot would wait here (holding up the loop) or sit idle
        // under this consumer's name while its peers have slots. With none free, the idle
        // entries are left to peers or to a later round.
        let free = permits.available_permits().min(cfg.batch);
        if free > 0 {
            match self.reclaim(free).await {
                Ok((entries, deliveries)) if !entries.is_empty() => {
                    tracing::info!(stream = %cfg.stream, count = entries.len(), "reclaimed entries from idle consumers");
                    metrics::counter!("fleet_stream_entries_reclaimed_total", "stream" => cfg.stream.clone(), "group" => cfg.group.clone())
                        .increment(entries.len() as u64);
                    self.spawn_batch(permits, batches, entries, deliveries);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(stream = %cfg.stream, error = %e, "reclaim failed"),
            }
        }

        if cfg.trim
            && round % 4 == 1
            && let Err(e) = groups::trim_acknowledged(&self.client, &cfg.stream).await
        {
            tracing::debug!(stream = %cfg.stream, error = %e, "trim skipped");
        }
        if round % 20 == 1 {
            groups::forget_stale_consumers(
                &self.client,
                &cfg.stream,
                &cfg.group,
                &cfg.consumer,
                cfg.stale_consumer,
            )
            .await;
        }
    }

    /// Resets the idle time of entries a handler has held for a while, so that no other
    /// consumer takes live work (`XCLAIM ... JUSTID` keeps the delivery count).
    async fn renew_claims(&self) {
        let cfg = &self.cfg;
        let due: Vec<String> = {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            let now = Instant::now();
            let mut due = Vec::new();
            for (id, since) in in_flight.iter_mut() {
                if now.duration_since(*since) >= cfg.claim_idle / 3 {
                    *since = now;
                    due.push(id.to_string());
                }
            }
            due
        };
        if due.is_empty() {
            return;
        }
        let res: Result<Value, _> = self
            .client
            .xclaim(
                cfg.stream.as_str(),
                cfg.group.as_str(),
                cfg.consumer.as_str(),
                0,
                due,
                None,
                None,
                None,
                false,
                true,
            )
            .await;
        if let Err(e) = res {
            tracing::warn!(stream = %cfg.stream, error = %e, "claim renewal failed");
        }
    }

    /// Takes over up to `limit` entries idle past `claim_idle`. Entries already delivered
    /// `max_deliveries` times are dead-lettered here; the rest are returned to be handled, with
    /// their new delivery counts.
    async fn reclaim(
        &self,
        limit: usize,
    ) -> Result<(Vec<StreamEntry>, Vec<u32>), fred::error::Error> {
        let cfg = &self.cfg;
        let idle_ms = cfg.claim_idle.as_millis() as u64;
        let pending: Value = self
            .client
            .xpending(
                cfg.stream.as_str(),
                cfg.group.as_str(),
                XPendingArgs::from((idle_ms, "-", "+", limit as u64)),
            )
            .await?;
        let mut counts: BTreeMap<StreamId, u32> = BTreeMap::new();
        for row in pending.into_array() {
            let mut cols = row.into_array().into_iter();
            let (Some(id), _, _, Some(n)) = (cols.next(), cols.next(), cols.next(), cols.next())
            else {
                continue;
            };
            let Ok(id) = parse_id(id) else { continue };
            counts.insert(id, n.as_u64().unwrap_or(1) as u32);
        }
        {
            let in_flight = self.in_flight.lock().expect("in-flight lock");
            counts.retain(|id, _| !in_flight.contains_key(id));
        }
        if counts.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let ids: Vec<String> = counts.keys().map(|id| id.to_string()).collect();
        let claimed: Value = self
            .client
            .xclaim(
                cfg.stream.as_str(),
                cfg.group.as_str(),
                cfg.consumer.as_str(),
                idle_ms,
                ids,
                None,
                None,
                None,
                false,
                false,
            )
            .await?;
        let claimed = parse_entries(claimed).unwrap_or_default();

        let mut keep = Vec::new();
        let mut deliveries = Vec::new();
        let mut exhausted = Vec::new();
        for e in claimed {
            let n = counts.get(&e.id).copied().unwrap_or(1) + 1;
            if n > cfg.max_deliveries {
                exhausted.push((e, n));
            } else {
                keep.push(e);
                deliveries.push(n);
            }
        }
        if !exhausted.is_empty() {
            let letters: Vec<DeadLetter> = exhausted
                .iter()
                .map(|(e, n)| DeadLetter {
                    entry: e,
                    reason: format!(
                        "delivered {} times without success (max_deliveries {})",
                        n - 1,
                        cfg.max_deliveries
                    ),
                    deliveries: n - 1,
                })
                .collect();
            match dead_letter_and_ack(cfg, &self.client, &letters, &[]).await {
                Ok(written) => self.metrics.dead_lettered.increment(written as u64),
                Err(e) => {
                    tracing::warn!(stream = %cfg.stream, error = %e, "acking dead-lettered entries failed; they will be dead-lettered again")
                }
            }
        }
        Ok((keep, deliveries))
    }
}

/// Decodes, handles, dead-letters and acks one batch.
async fn handle_batch<H: Handler>(
    cfg: &ConsumerConfig,
    client: &Client,
    handler: &H,
    metrics: &BatchMetrics,
    entries: Vec<StreamEntry>,
    deliveries: Vec<u32>,
) {
    let started = Instant::now();
    let mut undecodable: Vec<(usize, String)> = Vec::new();
    let mut batch = Vec::with_capacity(entries.len());
    let mut batch_index = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        match Envelope::<H::Msg>::from_fields(&e.fields) {
            Ok(envelope) => {
                batch.push(Delivery {
                    entry_id: e.id,
                    deliveries: deliveries[i],
                    envelope,
                });
                batch_index.push(i);
            }
            Err(err) => undecodable.push((i, format!("undecodable entry: {err}"))),
        }
    }
    let n_handled = batch.len();
    let outcomes = if batch.is_empty() {
        Vec::new()
    } else {
        handler.handle(batch).await
    };
    if outcomes.len() != n_handled {
        tracing::error!(stream = %cfg.stream, expected = n_handled, got = outcomes.len(), "handler answered the wrong number of outcomes; leaving the batch pending");
        return;
    }

    let mut letters = Vec::new();
    // The entries to ack as handled; those dead-lettered are acked once their letter is written.
    let mut ack = Vec::with_capacity(entries.len());
    let (mut acked, mut retried) = (0u64, 0u64);
    for (i, reason) in undecodable {
        letters.push(DeadLetter {
            entry: &entries[i],
            reason,
            deliveries: deliveries[i],
        });
    }
    for (outcome, i) in outcomes.into_iter().zip(batch_index) {
        match outcome {
            Outcome::Ack => {
                ack.push(entries[i].id);
                acked += 1;
            }
            Outcome::Retry => retried += 1,
            Outcome::DeadLetter(reason) => {
                letters.push(DeadLetter {
                    entry: &entries[i],
                    reason,
                    deliveries: deliveries[i],
                });
            }
        }
    }
    let finished = if letters.is_empty() {
        ack_ids(cfg, client, &ack).await.map(|()| 0)
    } else {
        for letter in &letters {
            tracing::warn!(stream = %cfg.stream, group = %cfg.group, entry = %letter.entry.id, reason = %letter.reason, "dead-lettering entry");
        }
        dead_letter_and_ack(cfg, client, &letters, &ack).await
    };
    let written = match finished {
        Ok(written) => written as u64,
        Err(e) => {
            tracing::warn!(stream = %cfg.stream, error = %e, "ack failed; entries will be redelivered");
            return;
        }
    };
    metrics.acked.increment(acked);
    // A dead letter not written leaves its entry pending, to be delivered again.
    metrics
        .retried
        .increment(retried + (letters.len() as u64 - written));
    metrics.dead_lettered.increment(written);
    metrics.seconds.record(started.elapsed().as_secs_f64());
}

/// Acks `ids` with one plain XACK: the path of every batch without dead letters, kept to one
/// command.
async fn ack_ids(
    cfg: &ConsumerConfig,
    client: &Client,
    ids: &[StreamId],
) -> Result<(), fred::error::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = ids.iter().map(StreamId::to_string).collect();
    let _: i64 = client
        .xack(cfg.stream.as_str(), cfg.group.as_str(), ids)
        .await?;
    Ok(())
}

/// Writes `letters` to the dead-letter stream (one pipeline), then acks `ids` and the entries
/// whose dead letter was written (one XACK), and answers how many were written.
///
/// The XACK waits for the XADDs' replies: sent in one pipeline with them, it would ack an entry
/// whose dead letter Redis refused (OOM under `noeviction`, WRONGTYPE at the dead-letter key),
/// and the entry would be lost. One refused stays pending, is logged with the reason, and comes
/// back through reclaim after `claim_idle` to be dead-lettered again. Only batches with dead
/// letters pay the second round trip.
async fn dead_letter_and_ack(
    cfg: &ConsumerConfig,
    client: &Client,
    letters: &[DeadLetter<'_>],
    ids: &[StreamId],
) -> Result<usize, fred::error::Error> {
    let pipeline = client.pipeline();
    let mut queued = Vec::with_capacity(letters.len());
    for letter in letters {
        match dead_letter(
            &pipeline,
            &cfg.dlq,
            &cfg.stream,
            &cfg.group,
            &cfg.consumer,
            letter,
        )
        .await
        {
            Ok(()) => queued.push(letter),
            Err(e) => {
                tracing::error!(stream = %cfg.stream, dlq = %cfg.dlq, entry = %letter.entry.id, reason = %letter.reason, error = %e, "dead letter not written; the entry stays pending")
            }
        }
    }
    let replies: Vec<Result<Value, fred::error::Error>> = if queued.is_empty() {
        Vec::new()
    } else {
        pipeline.try_all().await
    };
    // One reply per XADD; a pipeline that failed as a whole (connection lost, timeout)
    // answers one error for all of them.
    let whole_failure = (replies.len() != queued.len()).then(|| {
        replies
            .iter()
            .find_map(|r| r.as_ref().err().map(ToString::to_string))
            .unwrap_or_else(|| {
                format!("{} replies to {} dead letters", replies.len(), queued.len())
            })
    });
    let mut ack: Vec<String> = ids.iter().map(StreamId::to_string).collect();
    let mut written = 0;
    for (i, letter) in queued.iter().enumerate() {
        let error = match (&whole_failure, replies.get(i)) {
            (Some(e), _) => e.clone(),
            (None, Some(Err(e))) => e.to_string(),
            (None, _) => {
                ack.push(letter.entry.id.to_string());
                written += 1;
                continue;
            }
        };
        tracing::error!(stream = %cfg.stream, dlq = %cfg.dlq, entry = %letter.entry.id, reason = %letter.reason, %error, "dead letter not written; the entry stays pending");
    }
    if !ack.is_empty() {
        let _: i64 = client
            .xack(cfg.stream.as_str(), cfg.group.as_str(), ack)
            .await?;
    }
    Ok(written)
}
