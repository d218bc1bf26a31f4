//! Outbound: `fleet:outbound` (group `bridge`) -> JetStream.
//!
//! [`Publisher`] is the [`Handler`] the shared consumer loop runs on `fleet:outbound`. For each
//! `nats.publish` entry it:
//!
//! 1. checks the subject and the payload (JSON; on the requests subject an object with
//!    `task_id` and `session_id`, or `deliberation_id` and `member`, see [`crate::wire`]); a bad
//!    entry is dead-lettered;
//! 2. waits while NATS is disconnected (the loop keeps renewing its claim, so the entry waits
//!    here instead of being counted as a failed delivery);
//! 3. publishes with `Nats-Msg-Id` = the envelope id (so JetStream stores a retried publish
//!    once, within the stream's duplicate window), `traceparent` = the trace context, and the
//!    entry's own headers;
//! 4. answers [`Outcome::Ack`] only once JetStream acknowledged the publish. A failed publish is
//!    retried a few times in place; after that the entry is left pending ([`Outcome::Retry`])
//!    and delivered again later, and dead-lettered on its last allowed delivery. A message
//!    larger than the server or its stream takes is dead-lettered at once: no retry can fit it.
//!
//! The streams of the outbound subjects (`agent.requests`, `orchestrator.events`) are found or
//! created at start ([`OutputStreams`]), and again when a publish finds no stream.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use fleet::admin::Components;
use fleet::envelope::{NatsPublish, Outbound};
use fleet::stream::{Delivery, Handler, Outcome};
use fleet::telemetry::{continue_from, current_traceparent};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::inbound::{NATS_MSG_ID, TRACEPARENT};
use crate::nats::{NatsLink, ProvisionError, StreamSpec, back_off, subject_matches};
use crate::stats::Stats;
use crate::wire;
use fleet::deliberation::engine::{SUBJECT_AGENT_REQUESTS, SUBJECT_ORCHESTRATOR_EVENTS};

/// Health component of the outbound streams.
pub const COMPONENT_OUTPUT_STREAMS: &str = "nats-output-streams";

/// Publish attempts within one delivery of an entry (while NATS is connected).
pub const ATTEMPTS_PER_DELIVERY: u32 = 3;

/// The streams of the subjects the bridge publishes to.
pub struct OutputStreams {
    specs: Vec<StreamSpec>,
    ready: AtomicBool,
    lock: tokio::sync::Mutex<()>,
    components: Components,
}

impl OutputStreams {
    pub fn new(specs: Vec<StreamSpec>, components: Components) -> Self {
        components.set(COMPONENT_OUTPUT_STREAMS, true, "not checked yet");
        Self {
            specs,
            ready: AtomicBool::new(false),
            lock: tokio::sync::Mutex::new(()),
            components,
        }
    }

    /// Finds or creates every output stream, unless that was done already.
    pub async fn ensure(&self, nats: &NatsLink) -> Result<(), ProvisionError> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_at_a_time = self.lock.lock().await;
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        for spec in &self.specs {
            if let Err(e) = nats.ensure_stream(spec).await {
                self.components
                    .set(COMPONENT_OUTPUT_STREAMS, false, e.to_string());
                return Err(e);
            }
        }
        self.components.set(COMPONENT_OUTPUT_STREAMS, true, "ready");
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether `subject` is one of the output streams' subjects.
    fn covers(&self, subject: &str) -> bool {
        self.specs
            .iter()
            .any(|s| subject_matches(&s.subject, subject))
    }

    /// Checks the streams again on the next [`ensure`](Self::ensure) (e.g. the server lost them).
    fn recheck(&self) {
        self.ready.store(false, Ordering::Release);
    }

    /// Ensures the streams at start, retrying with backoff until done or `shutdown`.
    pub async fn ensure_at_start(&self, nats: &NatsLink, shutdown: &CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if !nats.wait_connected(shutdown).await {
                return;
            }
            match self.ensure(nats).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "output streams not ready; retrying");
                    if !back_off(&mut backoff, shutdown).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Publishes `fleet:outbound` entries to JetStream.
pub struct Publisher {
    pub nats: NatsLink,
    pub streams: std::sync::Arc<OutputStreams>,
    /// The agent requests subject, whose payloads must be [`wire::AgentRequest`]s.
    pub requests_subject: String,
    /// The subject of the fleet's orchestrator events.
    pub orchestrator_subject: String,
    /// The consumer loop's `max_deliveries`: on that delivery a failing entry is dead-lettered.
    pub max_deliveries: u32,
    pub stats: Stats,
    pub shutdown: CancellationToken,
}

impl Handler for Publisher {
    type Msg = Outbound;

    async fn handle(&self, batch: Vec<Delivery<Outbound>>) -> Vec<Outcome> {
        futures::future::join_all(batch.iter().map(|d| self.publish_one(d))).await
    }
}

impl Publisher {
    /// Where an entry for `subject` is published. The fleet writes its two outputs under their
    /// default names ([`SUBJECT_AGENT_REQUESTS`], [`SUBJECT_ORCHESTRATOR_EVENTS`]); they go to the
    /// subjects this bridge is configured with (`--nats-requests-subject`,
    /// `--nats-orchestrator-subject`), so that renaming them here is all it takes.
    fn subject<'a>(&'a self, subject: &'a str) -> &'a str {
        // A configured pattern (`agent.requests.>`) names no one subject to publish to.
        let concrete = |s: &str| !s.split('.').any(|t| t == "*" || t == ">");
        match subject {
            SUBJECT_AGENT_REQUESTS if concrete(&self.requests_subject) => &self.requests_subject,
            SUBJECT_ORCHESTRATOR_EVENTS if concrete(&self.orchestrator_subject) => {
                &self.orchestrator_subject
            }
            other => other,
        }
    }

    async fn publish_one(&self, d: &Delivery<Outbound>) -> Outcome {
        let Outbound::Publish(p) = &d.envelope.msg;
        let subject = self.subject(&p.subject);
        if let Err(reason) = wire::check_subject(subject).and_then(|()| {
            wire::check_outbound(&p.payload, subject_matches(&self.requests_subject, subject))
        }) {
            self.count(subject, "dead_lettered");
            return Outcome::DeadLetter(reason.0);
        }
        let span = tracing::info_span!(
            "nats_out",
            otel.name = %format!("{subject} publish"),
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.operation = "publish",
            messaging.destination.name = %subject,
            messaging.message.id = %d.envelope.id,
            fleet.entry_id = %d.entry_id,
            fleet.deliveries = d.deliveries,
        );
        // Same trace on both sides: the publish is a child of whoever wrote the entry.
        continue_from(&span, d.envelope.tp.as_deref(), false);
        let tp = span
            .in_scope(current_traceparent)
            .or_else(|| d.envelope.tp.clone());
        let headers = headers(p, &d.envelope.id.to_string(), tp.as_deref());

        let mut attempts = 0;
        let mut backoff = Duration::from_millis(100);
        loop {
            if !self.nats.wait_connected(&self.shutdown).await {
                return Outcome::Retry;
            }
            if self.streams.ensure(&self.nats).await.is_err() && self.streams.covers(subject) {
                tracing::debug!(subject = %subject, "publishing before its stream is ready");
            }
            let publish = async {
                let ack = self
                    .nats
                    .js
                    .publish_with_headers(
                        subject.to_owned(),
                        headers.clone(),
                        p.payload.clone().into(),
                    )
                    .await?;
                ack.await
            };
            // In the span, so that what the client logs while publishing belongs to this hop.
            let result = publish.instrument(span.clone()).await;
            let e = match result {
                Ok(ack) => {
                    self.stats.add_published(ack.duplicate);
                    self.count(
                        subject,
                        if ack.duplicate {
                            "duplicate"
                        } else {
                            "published"
                        },
                    );
                    span.in_scope(|| {
                        tracing::debug!(stream = %ack.stream, seq = ack.sequence, duplicate = ack.duplicate, "published")
                    });
                    return Outcome::Ack;
                }
                Err(e) => e,
            };
            if too_large(&e) {
                // No later delivery can succeed: the message does not fit the server or the
                // stream. Dead-letter it now instead of retrying it `max_deliveries` times.
                self.count(subject, "dead_lettered");
                return Outcome::DeadLetter(format!(
                    "cannot publish to `{subject}`: {e} ({} bytes of payload)",
                    p.payload.len()
                ));
            }
            if e.kind() == PublishErrorKind::StreamNotFound {
                // The server may have lost the stream (a new server without our store).
                self.streams.recheck();
            }
            if self.nats.is_connected() {
                attempts += 1;
            }
            span.in_scope(
                || tracing::warn!(subject = %subject, error = %e, attempts, "publish failed"),
            );
            if attempts >= ATTEMPTS_PER_DELIVERY || self.shutdown.is_cancelled() {
                if d.deliveries >= self.max_deliveries {
                    self.count(subject, "dead_lettered");
                    return Outcome::DeadLetter(format!(
                        "publishing to `{}` failed on {} deliveries; last error: {e}",
                        subject, d.deliveries
                    ));
                }
                self.count(subject, "retry");
                return Outcome::Retry;
            }
            if !back_off(&mut backoff, &self.shutdown).await {
                return Outcome::Retry;
            }
        }
    }

    fn count(&self, subject: &str, outcome: &'static str) {
        metrics::counter!("fleet_nats_messages_out_total", "subject" => subject.to_owned(), "outcome" => outcome)
            .increment(1);
    }
}

/// Whether a publish failed because the message is larger than NATS takes: the server's
/// `max_payload`, or the `max_msg_size` of the stream that stores the subject (JetStream's
/// error 10054, which the client reports only as `Other` with the server's error as source).
fn too_large(e: &PublishError) -> bool {
    e.kind() == PublishErrorKind::MaxPayloadExceeded
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
            .is_some_and(|j| j.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
}

/// The NATS headers of a publish: the entry's own, then `Nats-Msg-Id` and `traceparent` (which
/// the entry cannot override).
fn headers(p: &NatsPublish, msg_id: &str, tp: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    let reserved =
        |k: &str| k.eq_ignore_ascii_case(NATS_MSG_ID) || k.eq_ignore_ascii_case(TRACEPARENT);
    let own: &BTreeMap<String, String> = &p.headers;
    for (k, v) in own.iter().filter(|(k, _)| !reserved(k)) {
        match (k.parse::<HeaderName>(), v.parse::<HeaderValue>()) {
            (Ok(name), Ok(value)) if !k.is_empty() => h.insert(name, value),
            _ => tracing::debug!(header = %k, "skipping a header NATS cannot carry"),
        }
    }
    h.insert(NATS_MSG_ID, msg_id);
    if let Some(tp) = tp {
        h.insert(TRACEPARENT, tp);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bridge_sets_msg_id_and_traceparent_over_the_entry_headers() {
        let p = NatsPublish {
            subject: "agent.requests".into(),
            payload: "{}".into(),
            headers: [
                ("nats-msg-id".to_owned(), "mine".to_owned()),
                ("x-tenant".to_owned(), "acme".to_owned()),
                ("bad header".to_owned(), "x".to_owned()),
            ]
            .into(),
        };
        let h = headers(&p, "id-1", Some("00-aa-bb-01"));
        assert_eq!(h.get(NATS_MSG_ID).map(|v| v.as_str()), Some("id-1"));
        assert_eq!(h.get(TRACEPARENT).map(|v| v.as_str()), Some("00-aa-bb-01"));
        assert_eq!(h.get("x-tenant").map(|v| v.as_str()), Some("acme"));
        assert_eq!(
            h.len(),
            3,
            "the entry's msg id and the bad header are dropped"
        );
    }
}
