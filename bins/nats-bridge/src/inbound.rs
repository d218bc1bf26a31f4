//! Inbound: JetStream durable pull consumers -> Fleet streams.
//!
//! One [`Inbound`] loop per subject (`agile.events` -> `fleet:tasks`, `agent.responses` ->
//! `fleet:callbacks`):
//!
//! 1. waits for the NATS connection, then finds or creates the stream and the durable consumer
//!    (a new durable starts as its route's [`Deliver`] says; an existing one where it was);
//! 2. pulls batches (`--nats-batch` messages, each pull request expiring after
//!    `--nats-pull-expires-ms`) and handles what has arrived as one chunk;
//! 3. parses each message ([`crate::wire`]); a message that does not parse becomes a dead letter
//!    on `fleet:dlq` (with its subject and the reason) and is terminated (`AckKind::Term`), so
//!    it is never delivered again;
//! 4. writes every entry of the chunk with the [`WRITE_ONCE`] script (pipelined), and acks
//!    each message only after its entry is written;
//! 5. while Redis cannot be written it keeps the chunk, retries with backoff, tells JetStream
//!    the messages are in progress (`AckKind::Progress`, which resets `ack_wait` without
//!    spending a delivery) and pulls nothing new; on shutdown meanwhile it hands them back
//!    (`AckKind::Nak`);
//! 6. on a NATS error it starts over from 1 with backoff; on shutdown it finishes the pull
//!    request in hand, acks, and returns;
//! 7. meanwhile it listens for JetStream's max-deliveries advisories of its durable (queue
//!    group, so one bridge takes each): a message JetStream stopped delivering without an ack
//!    (e.g. every bridge that took it crashed) is read back from the stream and dead-lettered,
//!    unless its entry was written after all.
//!
//! **Idempotency.** Each NATS message has a key: its `Nats-Msg-Id` when the publisher set one
//! (`<stream>/id/<Nats-Msg-Id>`), else its place in the stream
//! (`<stream>/<sequence>/<stored at, ns>`, unique even if the stream is recreated). The entry's
//! envelope id is the UUIDv5 of that key, and the `planning.event`'s `event_id` is the
//! `Nats-Msg-Id` or `<stream>:<sequence>:<stored at, ns>`. A redelivered message has the same
//! key. The script writes the entry and a marker (`{<stream key>}:nats-seen:<envelope id>`,
//! TTL `--nats-dedup-ttl-secs`) atomically, and writes nothing when the marker exists, so a
//! message whose ack was lost (bridge killed between the write and the ack) is not written
//! twice: effectively once, as long as the marker lives.

use std::future::Future;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use bytes::Bytes;
use fleet::admin::Components;
use fleet::envelope::{Envelope, EnvelopeError, Message};
use fleet::stream::dlq::{DLQ_MAXLEN, ORIGINAL_FIELD_PREFIX};
use fleet::telemetry::{continue_from, parse_traceparent};
use fleet::time::now_ms;
use fred::interfaces::LuaInterface;
use fred::prelude::*;
use fred::types::scripts::Script;
use futures::StreamExt;
use serde_json::{Map, Value as Json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::nats::{Deliver, NatsLink, ProvisionError, StreamSpec, back_off};
use crate::stats::Stats;
use crate::wire::{self, EventTypes, Rejected};

/// The script that writes an entry once per NATS message (see `write_once.lua`).
pub static WRITE_ONCE: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("write_once.lua")));

/// Namespace of the UUIDv5 envelope ids the bridge derives from NATS message keys.
pub const NAMESPACE: Uuid = Uuid::from_u128(0x5b0e_2f4c_9a61_4d8e_b3f7_1c2d_8e9a_0f41);

/// Component name of Redis writes in the health routes.
pub const COMPONENT_REDIS: &str = "redis";

/// The NATS header carrying the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The NATS header carrying the publisher's message id.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// Subject prefix of JetStream's advisory that a consumer stopped delivering a message
/// (`.<stream>.<consumer>` follows).
pub const MAX_DELIVERIES_ADVISORY: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES";

/// Queue group of the bridges on advisories, so one bridge handles each.
pub const ADVISORY_QUEUE: &str = "fleet-nats-bridge";

/// JetStream's max-deliveries advisory (the fields the bridge reads).
#[derive(Debug, serde::Deserialize)]
struct MaxDeliveries {
    stream: String,
    consumer: String,
    stream_seq: u64,
    deliveries: i64,
}

/// What a subject's messages become.
#[derive(Clone, Debug)]
pub enum RouteKind {
    /// `planning.event` commands on `fleet:tasks`; only these event types are accepted.
    Planning(EventTypes),
    /// Callbacks on `fleet:callbacks`.
    Responses,
}

/// One subject the bridge reads and where its messages go.
#[derive(Clone, Debug)]
pub struct Route {
    pub kind: RouteKind,
    /// The stream to use for the subject (found by subject, or created as configured).
    pub spec: StreamSpec,
    /// The durable consumer every bridge shares.
    pub durable: String,
    /// Where the durable starts when the bridge creates it.
    pub deliver: Deliver,
    /// The Fleet stream written to.
    pub target: String,
    /// Health component of this consumer.
    pub component: &'static str,
}

/// How the consumer pulls and how long redelivery protection lasts.
#[derive(Clone, Debug)]
pub struct PullSettings {
    pub batch: usize,
    pub expires: Duration,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub dedup_ttl: Duration,
}

/// Why a pull loop started over.
#[derive(Debug, thiserror::Error)]
enum PullError {
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error("pull request failed: {0}")]
    Request(#[source] async_nats::Error),
    #[error("JetStream: {0}")]
    Status(#[source] async_nats::Error),
    #[error("NATS connection lost")]
    Disconnected,
}

/// One inbound subject's loop. Build with [`Inbound::new`], then [`run`](Self::run) it.
pub struct Inbound {
    route: Route,
    nats: NatsLink,
    redis: Client,
    dlq: String,
    settings: PullSettings,
    components: Components,
    stats: Stats,
    instance: String,
    redis_down: AtomicBool,
    /// This loop found no stream storing its subject and created one: until the durable
    /// exists (its creation may fail and be retried), everything in the stream is new.
    stream_created: AtomicBool,
}

/// Where a message ends and how it is acked after.
struct Planned {
    msg: jetstream::Message,
    keys: Vec<String>,
    args: Vec<Value>,
    ack: AckKind,
    dead_letter: bool,
}

/// A NATS message's identity.
struct Identity {
    stream: String,
    seq: u64,
    delivered: i64,
    event_id: String,
    key: String,
}

impl Inbound {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        route: Route,
        nats: NatsLink,
        redis: Client,
        dlq: String,
        settings: PullSettings,
        components: Components,
        stats: Stats,
        instance: String,
    ) -> Self {
        components.set(route.component, false, "starting");
        Self {
            route,
            nats,
            redis,
            dlq,
            settings,
            components,
            stats,
            instance,
            redis_down: AtomicBool::new(false),
            stream_created: AtomicBool::new(false),
        }
    }

    fn subject(&self) -> &str {
        &self.route.spec.subject
    }

    /// Pulls and writes until `shutdown`, starting over with backoff after NATS errors; and
    /// dead-letters the messages JetStream gives up on.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tokio::join!(self.pull_loop(&shutdown), self.advisories(&shutdown));
        // Acks are fire-and-forget publishes: send what is buffered before stopping.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.nats.client.flush()).await;
        tracing::info!(subject = %self.subject(), "inbound stopped");
        Ok(())
    }

    async fn pull_loop(&self, shutdown: &CancellationToken) {
        let shutdown = shutdown.clone();
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            if !self.nats.wait_connected(&shutdown).await {
                break;
            }
            let result = match self.provision().await {
                Ok(consumer) => {
                    backoff = Duration::from_millis(100);
                    self.components.set(
                        self.route.component,
                        true,
                        format!(
                            "pulling `{}` from {}/{}",
                            self.subject(),
                            consumer.cached_info().stream_name,
                            self.route.durable
                        ),
                    );
                    tracing::info!(subject = %self.subject(), durable = %self.route.durable, "pulling");
                    self.pull(&consumer, &shutdown).await
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = result {
                self.components
                    .set(self.route.component, false, e.to_string());
                tracing::warn!(subject = %self.subject(), error = %e, "inbound consumer interrupted; starting over");
                if !back_off(&mut backoff, &shutdown).await {
                    break;
                }
            }
        }
    }

    /// Listens (one bridge of the queue group per advisory) for the messages of this route's
    /// durable that JetStream stopped delivering (`max_deliver` reached without an ack) and
    /// dead-letters each one that was not written after all. Advisories are core NATS
    /// messages: one sent while no bridge is connected is not seen.
    async fn advisories(&self, shutdown: &CancellationToken) {
        let subject = format!("{MAX_DELIVERIES_ADVISORY}.*.{}", self.route.durable);
        let mut backoff = Duration::from_millis(100);
        let mut sub = loop {
            match self
                .nats
                .client
                .queue_subscribe(subject.clone(), ADVISORY_QUEUE.to_owned())
                .await
            {
                Ok(sub) => break sub,
                Err(e) => {
                    tracing::warn!(%subject, error = %e, "cannot subscribe to max-deliveries advisories; retrying");
                    if !back_off(&mut backoff, shutdown).await {
                        return;
                    }
                }
            }
        };
        loop {
            let advisory = tokio::select! {
                m = sub.next() => m,
                _ = shutdown.cancelled() => break,
            };
            let Some(advisory) = advisory else { break };
            self.on_max_deliveries(&advisory.payload, shutdown).await;
        }
        let _ = sub.unsubscribe().await;
    }

    async fn on_max_deliveries(&self, payload: &[u8], shutdown: &CancellationToken) {
        let Ok(adv) = serde_json::from_slice::<MaxDeliveries>(payload) else {
            tracing::warn!("unreadable max-deliveries advisory");
            return;
        };
        if adv.consumer != self.route.durable {
            return;
        }
        let raw = match self.nats.js.get_stream_no_info(&adv.stream).await {
            Ok(stream) => stream
                .get_raw_message(adv.stream_seq)
                .await
                .map_err(Into::into),
            Err(e) => Err(async_nats::Error::from(e)),
        };
        let raw = match raw {
            Ok(raw) => raw,
            Err(e) => {
                tracing::error!(stream = %adv.stream, seq = adv.stream_seq, error = %e,
                    "JetStream gave up on a message that cannot be read back; it is not dead-lettered");
                return;
            }
        };
        let id = identity_of(
            &adv.stream,
            adv.stream_seq,
            raw.time.unix_timestamp_nanos(),
            adv.deliveries,
            Some(&raw.headers),
        );
        let envelope_id = Uuid::new_v5(&NAMESPACE, id.key.as_bytes());
        let reason = format!(
            "JetStream stopped delivering it after {} deliveries (max_deliver) without an ack",
            adv.deliveries
        );
        let fields =
            self.dead_letter_fields(&raw.subject, &raw.payload, Some(&raw.headers), &id, &reason);
        let written_marker = marker(&self.route.target, envelope_id);
        let keys = vec![self.dlq.clone(), marker(&self.dlq, envelope_id)];
        let ttl_ms = self.settings.dedup_ttl.as_millis().max(1) as u64;
        let args = script_args(ttl_ms, DLQ_MAXLEN, fields);
        let mut backoff = Duration::from_millis(50);
        loop {
            let attempt = async {
                // Written after all (only its acks were lost): nothing to dead-letter.
                if self.redis.exists::<i64, _>(&written_marker).await? > 0 {
                    return Ok(None);
                }
                WRITE_ONCE
                    .evalsha_with_reload::<Value, _, _>(&self.redis, keys.clone(), args.clone())
                    .await
                    .map(Some)
            };
            match attempt.await {
                Ok(None) => {
                    tracing::info!(event_id = %id.event_id, "JetStream gave up on a message that was written; nothing lost");
                    return;
                }
                Ok(Some(v)) => {
                    if !v.is_null() {
                        tracing::warn!(subject = %raw.subject, event_id = %id.event_id, deliveries = adv.deliveries,
                            "dead-lettered a message JetStream stopped delivering");
                        self.stats.add_dead_lettered();
                        self.count(1, "dead_lettered");
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot dead-letter a message JetStream gave up on; retrying");
                    if !back_off(&mut backoff, shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    async fn provision(&self) -> Result<PullConsumer, ProvisionError> {
        let ensured = self.nats.ensure_stream(&self.route.spec).await?;
        if ensured.created {
            self.stream_created.store(true, Ordering::Relaxed);
        }
        let fresh = self.stream_created.load(Ordering::Relaxed);
        self.nats
            .ensure_consumer(
                &ensured.stream,
                &self.route.durable,
                self.subject(),
                self.route.deliver.policy(fresh),
                self.settings.ack_wait,
                self.settings.max_deliver,
            )
            .await
    }

    /// Pull requests one after the other until shutdown (`Ok`) or a NATS error.
    async fn pull(
        &self,
        consumer: &PullConsumer,
        shutdown: &CancellationToken,
    ) -> Result<(), PullError> {
        let n = self.settings.batch.max(1);
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if !self.nats.is_connected() {
                return Err(PullError::Disconnected);
            }
            let batch = consumer
                .batch()
                .max_messages(n)
                .expires(self.settings.expires)
                .messages()
                .await
                .map_err(|e| PullError::Request(e.into()))?;
            let mut chunks = batch.ready_chunks(n);
            loop {
                let chunk = tokio::select! {
                    chunk = chunks.next() => chunk,
                    _ = self.nats.disconnected() => return Err(PullError::Disconnected),
                    _ = shutdown.cancelled() => break,
                };
                let Some(chunk) = chunk else { break };
                self.handle_chunk(chunk, shutdown).await?;
            }
            if shutdown.is_cancelled() {
                // Finish what the pull request in hand still brings (it expires soon).
                let deadline = tokio::time::Instant::now() + self.settings.expires;
                while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, chunks.next()).await {
                    self.handle_chunk(chunk, shutdown).await?;
                }
                return Ok(());
            }
        }
    }

    async fn handle_chunk(
        &self,
        chunk: Vec<Result<jetstream::Message, async_nats::Error>>,
        shutdown: &CancellationToken,
    ) -> Result<(), PullError> {
        let mut msgs = Vec::with_capacity(chunk.len());
        let mut failure = None;
        for m in chunk {
            match m {
                Ok(m) => msgs.push(m),
                Err(e) => failure = Some(e),
            }
        }
        if !msgs.is_empty() {
            self.handle(msgs, shutdown).await;
        }
        match failure {
            Some(e) => Err(PullError::Status(e)),
            None => Ok(()),
        }
    }

    /// Writes the chunk's entries (retrying while Redis fails), then acks each message.
    async fn handle(&self, msgs: Vec<jetstream::Message>, shutdown: &CancellationToken) {
        let mut pending: Vec<Planned> = msgs.into_iter().filter_map(|m| self.plan(m)).collect();
        let mut backoff = Duration::from_millis(50);
        while !pending.is_empty() {
            let results = self.holding(&pending, self.write(&pending)).await;
            let mut failed = Vec::new();
            let mut error = None;
            let mut noscript = false;
            for (p, r) in pending.into_iter().zip(results) {
                match r {
                    Ok(written) => self.finish(p, written).await,
                    Err(e) => {
                        noscript |= e.details().starts_with("NOSCRIPT");
                        error.get_or_insert_with(|| e.to_string());
                        failed.push(p);
                    }
                }
            }
            pending = failed;
            if pending.is_empty() {
                if self.redis_down.swap(false, Ordering::Relaxed) {
                    self.components.set(COMPONENT_REDIS, true, "writing");
                    tracing::info!(subject = %self.subject(), "Redis writes work again");
                }
                break;
            }
            if noscript && WRITE_ONCE.load(&self.redis).await.is_ok() {
                continue;
            }
            let error = error.unwrap_or_default();
            if !self.redis_down.swap(true, Ordering::Relaxed) {
                tracing::warn!(subject = %self.subject(), %error, held = pending.len(),
                    "cannot write to Redis; holding the messages and retrying");
            }
            self.components
                .set(COMPONENT_REDIS, false, format!("writes fail: {error}"));
            if !self
                .holding(&pending, back_off(&mut backoff, shutdown))
                .await
            {
                // Shutting down: hand them back so that another bridge takes them at once.
                for p in &pending {
                    let _ = p.msg.ack_with(AckKind::Nak(None)).await;
                }
                self.count(pending.len(), "nak");
                break;
            }
        }
    }

    /// Runs `work` while telling JetStream, every third of `ack_wait`, that `held` is in
    /// progress (so they are not delivered to another bridge meanwhile).
    async fn holding<F: Future>(&self, held: &[Planned], work: F) -> F::Output {
        let every = (self.settings.ack_wait / 3).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = tick.tick() => {
                    for p in held {
                        let _ = p.msg.ack_with(AckKind::Progress).await;
                    }
                }
            }
        }
    }

    /// One `WRITE_ONCE` per message, issued together (the client pipelines them on its
    /// connection, in order). `Ok(true)`: written; `Ok(false)`: an earlier delivery wrote it.
    async fn write(&self, planned: &[Planned]) -> Vec<Result<bool, fred::error::Error>> {
        let sha = WRITE_ONCE.sha1();
        futures::future::join_all(planned.iter().map(|p| {
            self.redis
                .evalsha::<Value, _, _, _>(sha.clone(), p.keys.clone(), p.args.clone())
        }))
        .await
        .into_iter()
        .map(|r| r.map(|v| !v.is_null()))
        .collect()
    }

    async fn finish(&self, p: Planned, written: bool) {
        if let Err(e) = p.msg.ack_with(p.ack).await {
            tracing::debug!(subject = %self.subject(), error = %e, "ack not sent; the message will be redelivered and found written");
        }
        let outcome = match (p.dead_letter, written) {
            (true, _) => {
                self.stats.add_dead_lettered();
                "dead_lettered"
            }
            (false, true) => {
                self.stats.add_written();
                "written"
            }
            (false, false) => {
                self.stats.add_duplicate();
                "duplicate"
            }
        };
        self.count(1, outcome);
    }

    fn count(&self, n: usize, outcome: &'static str) {
        metrics::counter!("fleet_nats_messages_in_total", "subject" => self.subject().to_owned(), "outcome" => outcome)
            .increment(n as u64);
    }

    /// Parses `msg` and plans its write: the entry on the route's target, or a dead letter.
    fn plan(&self, msg: jetstream::Message) -> Option<Planned> {
        let Some(id) = identity(&msg) else {
            tracing::warn!(subject = %msg.subject, "a message without JetStream metadata; ignored");
            return None;
        };
        let tp_in =
            header(msg.headers.as_ref(), TRACEPARENT).filter(|tp| parse_traceparent(tp).is_some());
        let envelope_id = Uuid::new_v5(&NAMESPACE, id.key.as_bytes());
        let span = tracing::info_span!(
            "nats_in",
            otel.name = %format!("{} process", msg.subject),
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation = "process",
            messaging.destination.name = %msg.subject,
            messaging.message.id = %id.event_id,
            fleet.nats.stream = %id.stream,
            fleet.nats.sequence = id.seq,
            fleet.deliveries = id.delivered,
            fleet.entry_id = %envelope_id,
        );
        // The bridge only relays: its span is a child of the publisher's even on a redelivery,
        // so the entry carries the same trace as the NATS message.
        continue_from(&span, tp_in, false);
        let fields = span.in_scope(|| self.entry_fields(&msg, &id, envelope_id, tp_in));
        let ttl_ms = self.settings.dedup_ttl.as_millis().max(1) as u64;
        match fields {
            Ok(fields) => Some(Planned {
                keys: vec![
                    self.route.target.clone(),
                    marker(&self.route.target, envelope_id),
                ],
                args: script_args(ttl_ms, 0, fields),
                msg,
                ack: AckKind::Ack,
                dead_letter: false,
            }),
            Err(reason) => {
                span.in_scope(|| {
                    tracing::warn!(subject = %msg.subject, %reason, "dead-lettering a NATS message")
                });
                let fields = self.dead_letter_fields(
                    &msg.subject,
                    &msg.payload,
                    msg.headers.as_ref(),
                    &id,
                    &reason.0,
                );
                Some(Planned {
                    keys: vec![self.dlq.clone(), marker(&self.dlq, envelope_id)],
                    args: script_args(ttl_ms, DLQ_MAXLEN, fields),
                    msg,
                    ack: AckKind::Term,
                    dead_letter: true,
                })
            }
        }
    }

    /// The envelope fields of the message's entry, or why it has none.
    fn entry_fields(
        &self,
        msg: &jetstream::Message,
        id: &Identity,
        envelope_id: Uuid,
        tp_in: Option<&str>,
    ) -> Result<Vec<(Bytes, Bytes)>, Rejected> {
        let fields = match &self.route.kind {
            RouteKind::Planning(types) => {
                let cmd = wire::planning_event(&msg.payload, &id.event_id, types)?;
                envelope_fields(envelope_id, cmd, tp_in)
            }
            RouteKind::Responses => {
                let cb = wire::callback(&msg.payload)?;
                envelope_fields(envelope_id, cb, tp_in)
            }
        };
        fields.map_err(|e| Rejected(format!("cannot encode the entry: {e}")))
    }

    /// A dead letter in `fleet:dlq`'s layout, with the NATS message in `orig.data` (its bytes)
    /// and `orig.headers` (JSON).
    fn dead_letter_fields(
        &self,
        subject: &str,
        payload: &Bytes,
        headers: Option<&HeaderMap>,
        id: &Identity,
        reason: &str,
    ) -> Vec<(Bytes, Bytes)> {
        let text = |s: &str| Bytes::from(s.to_owned());
        let mut fields = vec![
            (text("source"), text("nats")),
            (text("stream"), Bytes::from(format!("nats:{subject}"))),
            (text("subject"), text(subject)),
            (text("nats_stream"), text(&id.stream)),
            (text("nats_seq"), Bytes::from(id.seq.to_string())),
            (text("group"), text(&self.route.durable)),
            (
                text("entry_id"),
                Bytes::from(format!("{}:{}", id.stream, id.seq)),
            ),
            (text("event_id"), text(&id.event_id)),
            (text("reason"), text(reason)),
            (text("deliveries"), Bytes::from(id.delivered.to_string())),
            (text("consumer"), text(&self.instance)),
            (text("ts"), Bytes::from(now_ms().to_string())),
            (
                Bytes::from(format!("{ORIGINAL_FIELD_PREFIX}data")),
                payload.clone(),
            ),
        ];
        if let Some(h) = headers.filter(|h| !h.is_empty()) {
            let map: Map<String, Json> = h
                .iter()
                .map(|(k, v)| {
                    let name: &str = k.as_ref();
                    let values: Vec<Json> = v
                        .iter()
                        .map(|v| Json::from(v.as_str().to_owned()))
                        .collect();
                    (name.to_owned(), Json::Array(values))
                })
                .collect();
            fields.push((
                Bytes::from(format!("{ORIGINAL_FIELD_PREFIX}headers")),
                Bytes::from(Json::Object(map).to_string()),
            ));
        }
        fields
    }
}

/// Envelope fields of `msg` with id `id`. The trace context is the current span's; when
/// tracing is off, the publisher's `traceparent` is passed on as it came.
fn envelope_fields<M: Message>(
    id: Uuid,
    msg: M,
    tp_in: Option<&str>,
) -> Result<Vec<(Bytes, Bytes)>, EnvelopeError> {
    let mut env = Envelope::with_id(id, msg);
    if env.tp.is_none() {
        env.tp = tp_in.map(str::to_owned);
    }
    Ok(env
        .to_fields()?
        .into_iter()
        .map(|(k, v)| (Bytes::from_static(k.as_bytes()), v))
        .collect())
}

fn script_args(ttl_ms: u64, maxlen: u64, fields: Vec<(Bytes, Bytes)>) -> Vec<Value> {
    let mut args = Vec::with_capacity(2 + fields.len() * 2);
    args.push(Value::from(ttl_ms as i64));
    args.push(Value::from(maxlen as i64));
    for (k, v) in fields {
        args.push(Value::Bytes(k));
        args.push(Value::Bytes(v));
    }
    args
}

/// The marker of entry `id` on `stream`, in `stream`'s hash slot (so the script may touch both
/// on Redis Cluster): `{<stream>}:nats-seen:<id>`, or `<stream>:nats-seen:<id>` when the stream
/// key already has a hash tag.
pub fn marker(stream: &str, id: Uuid) -> String {
    let tagged = stream
        .find('{')
        .and_then(|open| stream[open + 1..].find('}').map(|len| len > 0))
        .unwrap_or(false);
    if tagged {
        format!("{stream}:nats-seen:{id}")
    } else {
        format!("{{{stream}}}:nats-seen:{id}")
    }
}

/// The first value of header `name` (case-insensitive).
fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?
        .iter()
        .find(|(k, _)| {
            let k: &str = k.as_ref();
            k.eq_ignore_ascii_case(name)
        })
        .and_then(|(_, v)| v.first())
        .map(|v| v.as_str())
        .filter(|v| !v.is_empty())
}

/// The identity of message `seq` of `stream`, stored at `stored_ns`.
fn identity_of(
    stream: &str,
    seq: u64,
    stored_ns: i128,
    delivered: i64,
    headers: Option<&HeaderMap>,
) -> Identity {
    let (event_id, key) = match header(headers, NATS_MSG_ID) {
        Some(msg_id) => (msg_id.to_owned(), format!("{stream}/id/{msg_id}")),
        None => (
            format!("{stream}:{seq}:{stored_ns}"),
            format!("{stream}/{seq}/{stored_ns}"),
        ),
    };
    Identity {
        stream: stream.to_owned(),
        seq,
        delivered,
        event_id,
        key,
    }
}

fn identity(msg: &jetstream::Message) -> Option<Identity> {
    let info = msg.info().ok()?;
    Some(identity_of(
        info.stream,
        info.stream_sequence,
        info.published.unix_timestamp_nanos(),
        info.delivered,
        msg.headers.as_ref(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_share_the_stream_hash_slot() {
        let id = Uuid::nil();
        assert_eq!(
            marker("fleet:tasks", id),
            format!("{{fleet:tasks}}:nats-seen:{id}")
        );
        assert_eq!(
            marker("{fleet}:tasks", id),
            format!("{{fleet}}:tasks:nats-seen:{id}")
        );
        assert!(marker("fl{}eet:tasks", id).starts_with("{fl{}eet:tasks}"));
    }

    #[test]
    fn script_args_put_ttl_and_cap_first() {
        let args = script_args(
            5,
            0,
            vec![(Bytes::from_static(b"k"), Bytes::from_static(b"v"))],
        );
        assert_eq!(args.len(), 4);
        assert_eq!(args[0], Value::from(5i64));
        assert_eq!(args[2], Value::Bytes(Bytes::from_static(b"k")));
    }
}
