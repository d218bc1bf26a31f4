//! The callback-worker's handler: one atomic `apply` per session per batch.

use fleet::envelope::Callback;
use fleet::events::{ServerMessage, message_type};
use fleet::session_log::SessionLog;
use fleet::stream::{Delivery, Handler, Outcome};
use fleet::task::{OpStatus, TaskOp, TaskStore};
use fleet::time::now_ms;
use fred::prelude::*;
use serde_json::json;
use tracing::Instrument;

/// Handles the callbacks of `fleet:callbacks`.
pub struct CallbackHandler {
    pub tasks: TaskStore,
    pub log: SessionLog,
}

/// The task op (with its rendered client event) a callback asks for.
pub fn op_for(cb: &Callback) -> TaskOp {
    match cb {
        Callback::Started(c) => {
            TaskOp::ordered("started", &c.task_id, c.attempt, c.seq, String::new())
        }
        Callback::Chunk(c) => {
            let ev =
                ServerMessage::streaming(&c.session_id, &c.task_id, c.seq, &c.content, c.index);
            TaskOp::ordered("chunk", &c.task_id, c.attempt, c.seq, ev.to_json())
        }
        Callback::Progress(c) => {
            let ev = ServerMessage::new(
                message_type::TASK_PROGRESS,
                &c.session_id,
                Some(&c.task_id),
                json!({"percent": c.percent, "step": c.step}),
            )
            .with_seq(c.seq);
            TaskOp::ordered("progress", &c.task_id, c.attempt, c.seq, ev.to_json())
        }
        Callback::Result(c) => {
            let ev =
                ServerMessage::response(&c.session_id, &c.task_id, c.seq, &c.content, &c.metadata);
            let mut op = TaskOp::ordered("result", &c.task_id, c.attempt, c.seq, ev.to_json());
            op.content = Some(c.content.clone());
            op
        }
        Callback::Error(c) => {
            let ev = ServerMessage::chat_error(
                &c.session_id,
                &c.task_id,
                Some(c.seq),
                &c.error_type,
                &c.message,
                &c.details,
            );
            let mut op = TaskOp::ordered("error", &c.task_id, c.attempt, c.seq, ev.to_json());
            op.error_type = Some(c.error_type.clone());
            op.error_message = Some(c.message.clone());
            op
        }
    }
}

impl Handler for CallbackHandler {
    type Msg = Callback;

    async fn handle(&self, batch: Vec<Delivery<Callback>>) -> Vec<Outcome> {
        // Group by session, keeping stream order inside each group.
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            let sid = d.envelope.msg.position().0;
            match groups.iter_mut().find(|(s, _)| s == sid) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((sid.to_owned(), vec![i])),
            }
        }
        let results =
            futures::future::join_all(groups.iter().map(|(sid, idx)| {
                self.apply_session(sid, idx.iter().map(|&i| &batch[i]).collect())
            }))
            .await;
        let mut outcomes = vec![Outcome::Ack; batch.len()];
        for ((_, idx), ok) in groups.iter().zip(results) {
            if !ok {
                for &i in idx {
                    outcomes[i] = Outcome::Retry;
                }
            }
        }
        outcomes
    }
}

impl CallbackHandler {
    /// Applies the callbacks of one session. Returns whether their effects are written.
    async fn apply_session(&self, sid: &str, deliveries: Vec<&Delivery<Callback>>) -> bool {
        let span = tracing::info_span!(
            "callbacks",
            otel.name = "fleet:callbacks process",
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.operation = "process",
            messaging.destination.name = %self.tasks.keys().callbacks(),
            messaging.batch.message_count = deliveries.len(),
            fleet.session_id = %sid,
        );
        let redelivered = deliveries.iter().any(|d| d.deliveries > 1);
        for d in &deliveries {
            fleet::telemetry::continue_from(&span, d.envelope.tp.as_deref(), d.deliveries > 1);
        }
        let ops: Vec<TaskOp> = deliveries.iter().map(|d| op_for(&d.envelope.msg)).collect();
        let result = async {
            let applied = self.tasks.apply(sid, &ops).await?;
            let pipeline = self.tasks.client().pipeline();
            if self
                .log
                .queue_applied(&pipeline, sid, &applied, redelivered)
                .await?
            {
                let _: Vec<Value> = pipeline.all().await?;
            }
            Ok::<_, anyhow::Error>(applied)
        }
        .instrument(span)
        .await;
        match result {
            Ok(applied) => {
                for (d, status) in deliveries.iter().zip(&applied.statuses) {
                    let kind = fleet::envelope::Message::kind(&d.envelope.msg);
                    metrics::counter!("fleet_callbacks_total", "kind" => kind, "status" => status.as_str())
                        .increment(1);
                    if matches!(status, OpStatus::Stale | OpStatus::Missing) {
                        tracing::debug!(kind, status = status.as_str(), "callback dropped");
                    }
                }
                let now = now_ms();
                for t in &applied.ended {
                    metrics::histogram!("fleet_task_duration_seconds", "state" => t.state.as_str())
                        .record((now - t.created_ms).max(0) as f64 / 1000.0);
                }
                true
            }
            Err(e) => {
                tracing::warn!(session_id = %sid, error = %e, "applying callbacks failed; will retry");
                false
            }
        }
    }
}
