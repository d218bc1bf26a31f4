//! The callback-worker's handler: one atomic `apply` per session per batch for task callbacks;
//! deliberation callbacks (`proposal`, `selection`) go to the deliberation store instead, in
//! stream order per deliberation.

use std::pin::pin;

use fleet::deliberation::Engine;
use fleet::deliberation::engine::Handled;
use fleet::envelope::Callback;
use fleet::events::{ServerMessage, message_type};
use fleet::planning::notifier::PlanningNotifier;
use fleet::session_log::{PublishOrder, SessionLog};
use fleet::stream::{Delivery, Handler, Outcome};
use fleet::task::{Applied, OpStatus, TaskOp, TaskStore};
use fleet::time::now_ms;
use serde_json::json;
use tracing::Instrument;

/// Handles the callbacks of `fleet:callbacks`.
pub struct CallbackHandler {
    pub tasks: TaskStore,
    pub log: SessionLog,
    /// The order of each session's fan-out entries, shared with the sweeper.
    pub order: PublishOrder,
    /// Deliberation steps.
    pub engine: Engine,
    /// Planning notifications, when configured.
    pub planning: Option<PlanningNotifier>,
}

/// Why a deliberation callback can never apply, if it cannot.
pub fn invalid_deliberation_callback(cb: &Callback) -> Option<String> {
    let valid = fleet::agent::valid_name;
    match cb {
        Callback::Proposal(p)
            if !valid(&p.deliberation_id) || !valid(&p.member) || p.round == 0 =>
        {
            Some("invalid proposal: deliberation_id and member must be names and round >= 1".into())
        }
        Callback::Selection(s) if !valid(&s.deliberation_id) || !valid(&s.member) => {
            Some("invalid selection: deliberation_id and member must be names".into())
        }
        _ => None,
    }
}

/// Why a task callback can never apply, if it cannot: its `session_id` and `task_id` name the
/// keys the `apply` script writes. A callback with an empty or malformed one would fail that
/// script, and with it every valid callback of the same session in the batch (retried, then
/// dead-lettered together, their tasks left `running` until their deadline); it is
/// dead-lettered on its own at once instead.
pub fn invalid_task_callback(cb: &Callback) -> Option<String> {
    let valid = fleet::agent::valid_name;
    cb.unbatched().iter().find_map(|c| {
        let (sid, tid, _, _) = c.position();
        let (field, id) = if !valid(sid) {
            ("session_id", sid)
        } else if !valid(tid) {
            ("task_id", tid)
        } else {
            return None;
        };
        Some(format!(
            "invalid {} callback: {field} {:?} is not an id (1 to 128 of A-Z a-z 0-9 - _ . :)",
            fleet::envelope::Message::kind(c),
            id.chars().take(64).collect::<String>(),
        ))
    })
}

/// The task op (with its rendered client event) a task callback asks for; `None` for
/// deliberation callbacks, which do not touch task state, and for a batch, whose callbacks
/// each ask for their own ([`Callback::unbatched`]).
pub fn op_for(cb: &Callback) -> Option<TaskOp> {
    Some(match cb {
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
        Callback::Proposal(_) | Callback::Selection(_) | Callback::Batch(_) => return None,
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
    })
}

/// `ops` with a `restart` op before the first op of each attempt after the first: an executor
/// that runs a task again from the start (one that took it over from an executor that died or
/// stalled, and whose output may differ) numbers its callbacks as a later attempt, which takes
/// the task over from the earlier one ([`TaskOp::restart`]). Restarting to an attempt that
/// already holds the task is a no-op, so each of its callbacks can carry one.
pub fn with_restarts(
    sid: &str,
    kinds: Vec<&'static str>,
    ops: Vec<TaskOp>,
) -> (Vec<&'static str>, Vec<TaskOp>) {
    let mut seen: Vec<(String, u32)> = Vec::new();
    let mut out = (
        Vec::with_capacity(kinds.len() + 1),
        Vec::with_capacity(ops.len() + 1),
    );
    for (kind, op) in kinds.into_iter().zip(ops) {
        if let Some(a) = op.attempt.filter(|&a| a > 1)
            && !seen.iter().any(|(t, s)| *t == op.task_id && *s == a)
        {
            seen.push((op.task_id.clone(), a));
            let ev = ServerMessage::task_restarted(sid, &op.task_id, a);
            out.0.push("restart");
            out.1.push(TaskOp::restart(&op.task_id, a, ev.to_json()));
        }
        out.0.push(kind);
        out.1.push(op);
    }
    out
}

/// The once-key of the `i`th callback of the entry whose envelope id is `id` (see
/// [`TaskOp::once`]); never a number, which `apply` would read as a seq.
pub fn once_key(id: uuid::Uuid, i: usize) -> String {
    format!("{}/{i}", id.hyphenated())
}

/// Applies `ops` to session `sid`, tells `planning` (when set) of the planning subtasks that
/// ended, and fans out their events (a nudge when `nudge` and nothing new was logged), in the
/// session's line of `order`. Planning is told before the fan-out: a failed fan-out is retried
/// by a redelivery whose apply ends nothing, which would not report them.
pub(crate) async fn apply_in_order(
    tasks: &TaskStore,
    log: &SessionLog,
    order: &PublishOrder,
    planning: Option<&PlanningNotifier>,
    sid: &str,
    ops: &[TaskOp],
    nudge: bool,
) -> anyhow::Result<Applied> {
    // Each future pinned where it is made, in a scope of its own: they are large, and moving
    // them, or keeping the first beside the second, would copy them.
    let (turn, applied) = {
        let apply = pin!(tasks.apply(sid, ops));
        order.send(sid, apply).await
    };
    let applied = applied?;
    if let Some(p) = planning {
        p.tasks_ended(tasks, sid, &applied.ended);
    }
    {
        let publish = pin!(log.publish_applied(sid, &applied, nudge));
        order.publish(turn, publish).await?;
    }
    Ok(applied)
}

impl Handler for CallbackHandler {
    type Msg = Callback;

    async fn handle(&self, batch: Vec<Delivery<Callback>>) -> Vec<Outcome> {
        let mut outcomes = vec![Outcome::Ack; batch.len()];
        // Group task callbacks by session and deliberation callbacks by deliberation, keeping
        // stream order inside each group.
        let mut sessions: Vec<(String, Vec<usize>)> = Vec::new();
        let mut deliberations: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            let (groups, key) = match d.envelope.msg.deliberation_id() {
                Some(id) => {
                    if let Some(reason) = invalid_deliberation_callback(&d.envelope.msg) {
                        outcomes[i] = Outcome::DeadLetter(reason);
                        continue;
                    }
                    (&mut deliberations, id)
                }
                None => {
                    if let Some(reason) = invalid_task_callback(&d.envelope.msg) {
                        outcomes[i] = Outcome::DeadLetter(reason);
                        continue;
                    }
                    (&mut sessions, d.envelope.msg.position().0)
                }
            };
            match groups.iter_mut().find(|(k, _)| k == key) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((key.to_owned(), vec![i])),
            }
        }
        // Boxed: each session's future is about 11 KB, and unboxed `join_all` copied it three
        // times on its way into the list; now once, into the box (docs/performance.md).
        let session_results = futures::future::join_all(sessions.iter().map(|(sid, idx)| {
            Box::pin(self.apply_session(sid, idx.iter().map(|&i| &batch[i]).collect()))
        }));
        let deliberation_results = futures::future::join_all(
            deliberations
                .iter()
                .map(|(_, idx)| self.apply_deliberation(idx.iter().map(|&i| &batch[i]).collect())),
        );
        let (session_results, deliberation_results) =
            futures::future::join(session_results, deliberation_results).await;
        for ((_, idx), ok) in sessions.iter().zip(session_results) {
            if !ok {
                for &i in idx {
                    outcomes[i] = Outcome::Retry;
                }
            }
        }
        for ((_, idx), oks) in deliberations.iter().zip(deliberation_results) {
            for (&i, ok) in idx.iter().zip(oks) {
                if !ok {
                    outcomes[i] = Outcome::Retry;
                }
            }
        }
        outcomes
    }
}

impl CallbackHandler {
    /// Applies the callbacks of one deliberation, in order. Returns, for each, whether its
    /// effects are written (a failure leaves it and those after it pending).
    async fn apply_deliberation(&self, deliveries: Vec<&Delivery<Callback>>) -> Vec<bool> {
        let mut oks = Vec::with_capacity(deliveries.len());
        let mut failed = false;
        for d in deliveries {
            if failed {
                oks.push(false);
                continue;
            }
            let msg = &d.envelope.msg;
            let kind = fleet::envelope::Message::kind(msg);
            let id = msg.deliberation_id().unwrap_or_default();
            let span = tracing::info_span!(
                "deliberation_callback",
                otel.name = %format!("fleet:callbacks process {kind}"),
                otel.kind = "consumer",
                messaging.system = "redis",
                messaging.operation = "process",
                fleet.deliberation_id = %id,
                fleet.deliveries = d.deliveries,
            );
            fleet::telemetry::continue_from(&span, d.envelope.tp.as_deref(), d.deliveries > 1);
            let redelivered = d.deliveries > 1;
            let result = async {
                match msg {
                    Callback::Proposal(p) => self.engine.on_proposal(p, redelivered).await,
                    Callback::Selection(s) => self.engine.on_selection(s).await,
                    _ => Ok(Handled::Dropped("not a deliberation callback")),
                }
            }
            .instrument(span)
            .await;
            match result {
                Ok(handled) => {
                    let status = match handled {
                        Handled::Applied(s) | Handled::Dropped(s) => s,
                    };
                    metrics::counter!("fleet_callbacks_total", "kind" => kind, "status" => status)
                        .increment(1);
                    if matches!(handled, Handled::Dropped(_)) {
                        tracing::debug!(deliberation_id = %id, kind, status, "deliberation callback dropped");
                    }
                    oks.push(true);
                }
                Err(e) => {
                    tracing::warn!(deliberation_id = %id, error = %e, "deliberation callback failed; will retry");
                    failed = true;
                    oks.push(false);
                }
            }
        }
        oks
    }

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
        // A child of the first callback's writer (usually the batch is one task's callbacks,
        // all from one executor span); links to the writers of the others.
        if let Some((first, rest)) = deliveries.split_first() {
            fleet::telemetry::continue_from(
                &span,
                first.envelope.tp.as_deref(),
                first.deliveries > 1,
            );
            for d in rest {
                if d.envelope.tp != first.envelope.tp {
                    fleet::telemetry::link_to(&span, d.envelope.tp.as_deref());
                }
            }
        }
        // One op per task callback, a batch's included; the kind of each for its metrics.
        let (mut kinds, mut ops): (Vec<&'static str>, Vec<TaskOp>) = deliveries
            .iter()
            .flat_map(|d| {
                let unbatched = d.envelope.msg.unbatched().iter().enumerate();
                unbatched.map(move |(i, cb)| (d.envelope.id, i, cb))
            })
            .filter_map(|(id, i, cb)| {
                let mut op = op_for(cb)?;
                if op.seq == Some(0) {
                    // Unordered: only the entry's id tells a redelivery from a new callback.
                    op.once = Some(once_key(id, i));
                }
                Some((fleet::envelope::Message::kind(cb), op))
            })
            .unzip();
        if ops.iter().any(|op| op.attempt > Some(1)) {
            (kinds, ops) = with_restarts(sid, kinds, ops);
        }
        let result = apply_in_order(
            &self.tasks,
            &self.log,
            &self.order,
            self.planning.as_ref(),
            sid,
            &ops,
            redelivered,
        )
        .instrument(span)
        .await;
        match result {
            Ok(applied) => {
                for (&kind, status) in kinds.iter().zip(&applied.statuses) {
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
