//! The dispatcher's handler of `fleet:tasks` commands.

use std::sync::Arc;

use fleet::agent::AgentStore;
use fleet::deliberation::{DeliberationSpec, Engine};
use fleet::envelope::{
    AgentAction, AgentMessage, AgentRequest, Envelope, ExecMessage, ExecRequest, NatsPublish,
    Outbound, PlanningEvent, SessionClose, TaskCancel, TaskCommand, TaskSubmit,
};
use fleet::events::{ServerMessage, message_type};
use fleet::keys::Keys;
use fleet::planning::notifier::PlanningNotifier;
use fleet::planning::{self, AgentRequestPayload, PlanningRules, Subtask};
use fleet::session_log::SessionLog;
use fleet::stream::{Delivery, Handler, Outcome, producer};
use fleet::task::{Applied, Created, Dispatched, NewTask, OpStatus, TaskOp, TaskStore};
use fleet::time::now_ms;
use fred::prelude::*;
use serde_json::{Value as Json, json};
use tracing::Instrument;
use uuid::Uuid;

use crate::hydrate::{ContextHydrator, PHASE_DELIBERATION};

/// Handles the commands of `fleet:tasks`.
pub struct Dispatcher {
    pub tasks: TaskStore,
    pub agents: AgentStore,
    pub log: SessionLog,
    pub keys: Keys,
    /// Deliberation steps.
    pub engine: Engine,
    /// Subtask derivation rules for planning events.
    pub planning: Arc<PlanningRules>,
    /// Context hydration, when configured.
    pub context: Option<ContextHydrator>,
    /// Told of the planning subtasks its cancels and closes end, when configured (the engine
    /// has it too, for the council subtasks they cancel).
    pub notifier: Option<PlanningNotifier>,
}

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// It can never be carried out: dead-letter it with this reason.
    #[error("{0}")]
    Invalid(String),
    /// A dependency failed: retry it.
    #[error(transparent)]
    Transient(#[from] anyhow::Error),
}

macro_rules! transient_from {
    ($($t:ty),*) => {$(
        impl From<$t> for DispatchError {
            fn from(e: $t) -> Self { DispatchError::Transient(e.into()) }
        }
    )*};
}
transient_from!(
    fred::error::Error,
    fleet::task::TaskError,
    fleet::agent::AgentError,
    fleet::stream::producer::ProduceError,
    fleet::deliberation::engine::EngineError,
    fleet::planning::PlanningError
);

type Result<T> = std::result::Result<T, DispatchError>;

/// A planning event for a case whose planning session is closed: nothing is derived, and the
/// event is dead-lettered with this reason (replayable once the session has expired).
fn session_closed(sid: &str) -> DispatchError {
    DispatchError::Invalid(format!(
        "the planning session {sid} is closed: no subtask derived (replay the event once the session has expired)"
    ))
}

impl Handler for Dispatcher {
    type Msg = TaskCommand;

    async fn handle(&self, batch: Vec<Delivery<TaskCommand>>) -> Vec<Outcome> {
        futures::future::join_all(batch.into_iter().map(|d| self.handle_one(d))).await
    }
}

impl Dispatcher {
    async fn handle_one(&self, d: Delivery<TaskCommand>) -> Outcome {
        let kind = fleet::envelope::Message::kind(&d.envelope.msg);
        let (sid, tid) = match &d.envelope.msg {
            TaskCommand::Submit(s) => (s.session_id.as_str(), s.task_id.as_str()),
            TaskCommand::Cancel(c) => (c.session_id.as_str(), c.task_id.as_str()),
            TaskCommand::SessionClose(c) => (c.session_id.as_str(), ""),
            TaskCommand::PlanningEvent(e) => ("", e.case_id.as_str()),
            TaskCommand::Deliberate(spec) => ("", spec.deliberation_id.as_str()),
        };
        let span = tracing::info_span!(
            "dispatch",
            otel.name = %format!("fleet:tasks process {kind}"),
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.operation = "process",
            messaging.destination.name = %self.keys.tasks(),
            messaging.message.id = %d.envelope.id,
            fleet.session_id = %sid,
            fleet.task_id = %tid,
            fleet.deliveries = d.deliveries,
        );
        fleet::telemetry::continue_from(&span, d.envelope.tp.as_deref(), d.deliveries > 1);
        let redelivered = d.deliveries > 1;
        let result = async {
            // Only `submit` is inline: a future is as large as its largest branch, and `join_all`
            // copies each command's future as it collects them (13 KB per task before the
            // rarer commands and paths were boxed; docs/performance.md).
            match d.envelope.msg {
                TaskCommand::Submit(s) => self.submit(s, redelivered).await,
                TaskCommand::Cancel(c) => Box::pin(self.cancel(c, redelivered)).await,
                TaskCommand::SessionClose(c) => Box::pin(self.close(c, redelivered)).await,
                TaskCommand::PlanningEvent(e) => {
                    Box::pin(self.planning_event(e, redelivered)).await
                }
                TaskCommand::Deliberate(spec) => Box::pin(self.deliberate(spec, redelivered)).await,
            }
        }
        .instrument(span)
        .await;
        metrics::counter!("fleet_dispatcher_commands_total", "kind" => kind, "ok" => if result.is_ok() { "true" } else { "false" }).increment(1);
        match result {
            Ok(()) => Outcome::Ack,
            Err(DispatchError::Invalid(reason)) => {
                tracing::warn!(%reason, kind, "command can never be carried out");
                Outcome::DeadLetter(reason)
            }
            Err(e) => {
                tracing::warn!(error = %e, kind, "command failed; will be retried");
                Outcome::Retry
            }
        }
    }

    /// Starts a deliberation: members, round 1 requests (see [`Engine::dispatch`]).
    async fn deliberate(&self, spec: DeliberationSpec, redelivered: bool) -> Result<()> {
        spec.validate()
            .map_err(|e| DispatchError::Invalid(format!("invalid deliberation: {e}")))?;
        let context = match &self.context {
            Some(c) => {
                let story = if spec.story_id.is_empty() {
                    &spec.case_id
                } else {
                    &spec.story_id
                };
                c.context(story, &spec.role, PHASE_DELIBERATION).await
            }
            None => String::new(),
        };
        let handled = self.engine.dispatch(&spec, &context, redelivered).await?;
        tracing::debug!(?handled, "deliberation dispatched");
        Ok(())
    }

    /// Derives the subtasks of a planning event and sends each one, once per transition: a copy
    /// of the event derives the same ids (nothing new), a later transition into the same state
    /// fresh ones ([`planning::transition_id`]).
    async fn planning_event(&self, e: PlanningEvent, redelivered: bool) -> Result<()> {
        planning::validate_event(&e)
            .map_err(|err| DispatchError::Invalid(format!("invalid planning event: {err}")))?;
        let subtasks = self.planning.derive(&e, &[], &[]);
        if !redelivered {
            let _: i64 = self
                .tasks
                .client()
                .hincrby(
                    self.keys.stats(),
                    fleet::deliberation::engine::STAT_PLANNING_EVENTS_TOTAL,
                    1,
                )
                .await?;
        }
        if subtasks.is_empty() {
            tracing::info!(case_id = %e.case_id, to_state = %e.to_state, "no rule for this transition; nothing to derive");
            return Ok(());
        }
        let (sid, state) = planning::ensure_session(
            self.tasks.client(),
            &self.keys,
            &e.case_id,
            self.tasks.retention().session_ttl_ms,
        )
        .await?;
        if state != "open" {
            // A copy of a transition derived before the close lost nothing; anything else would.
            for s in &subtasks {
                let exists = if s.council > 0 {
                    let d = self.engine.store.get(&s.task_id).await;
                    d.map_err(anyhow::Error::from)?.is_some()
                } else {
                    self.tasks.get(&sid, &s.task_id).await?.is_some()
                };
                if !exists {
                    return Err(session_closed(&sid));
                }
            }
            tracing::info!(session_id = %sid, "a copy of a transition derived before its planning session closed");
            return Ok(());
        }
        let (mut derived, mut sent) = (0, 0);
        for s in &subtasks {
            let (new, dispatched) = if s.council > 0 {
                self.council_subtask(s, redelivered).await?
            } else {
                self.subtask(&e, s, redelivered).await?
            };
            derived += usize::from(new);
            sent += usize::from(dispatched);
        }
        metrics::counter!("fleet_subtasks_derived_total").increment(derived as u64);
        let transition = subtasks.first().map_or("", |s| s.transition_id.as_str());
        tracing::info!(case_id = %e.case_id, to_state = %e.to_state, transition, derived, sent, of = subtasks.len(), "planning event handled");
        Ok(())
    }

    /// Runs subtask `s` as a deliberation of `s.council` members (id: the subtask id), once.
    /// Returns (created now, started now).
    async fn council_subtask(&self, s: &Subtask, redelivered: bool) -> Result<(bool, bool)> {
        let spec = s.deliberation_spec(now_ms());
        let sid = &s.session_id;
        let store = &self.engine.store;
        let existed = store
            .get(&spec.deliberation_id)
            .await
            .map_err(anyhow::Error::from)?
            .is_some();
        // Registered with its session before it exists, so that a close finds every council
        // that runs; refused once the session is closed, like a subtask's task.
        let state = store
            .register_council(sid, &spec.deliberation_id)
            .await
            .map_err(anyhow::Error::from)?;
        match state.as_str() {
            "open" => {}
            "missing" => {
                return Err(
                    anyhow::anyhow!("planning session {sid} expired while deriving").into(),
                );
            }
            _ if existed => return Ok((false, false)),
            _ => return Err(session_closed(sid)),
        }
        let context = match &self.context {
            Some(c) => c.context(&s.case_id, &s.role, &s.action).await,
            None => String::new(),
        };
        let handled = self.engine.dispatch(&spec, &context, redelivered).await?;
        // A close between the registration and the start may have found no deliberation to
        // cancel yet: cancel it here then.
        let state = store
            .session_state(sid)
            .await
            .map_err(anyhow::Error::from)?;
        if matches!(state.as_deref(), Some(st) if st != "open") {
            self.cancel_council(sid, &spec.deliberation_id, "the session was closed", false)
                .await?;
        }
        Ok((
            !existed,
            matches!(handled, fleet::deliberation::engine::Handled::Applied(_)),
        ))
    }

    /// Creates subtask `s` as a task of its planning session (unless it exists) and sends it to
    /// its role's agents and to NATS `agent.requests` when this call moved it to `dispatched`.
    /// Returns (created now, sent now).
    async fn subtask(
        &self,
        e: &PlanningEvent,
        s: &Subtask,
        redelivered: bool,
    ) -> Result<(bool, bool)> {
        let sid = &s.session_id;
        let tid = &s.task_id;
        let pool = planning::subtask_pool(&s.role);
        let deadline_ms = now_ms() + (s.timeout_secs * 1000) as i64;
        let created = self
            .tasks
            .create(NewTask {
                session_id: sid,
                task_id: tid,
                message: &s.description,
                metadata: &planning::task_metadata(s, &e.event_id),
                deadline_ms,
                source: "planning",
                idempotency_key: None,
                pool: None,
            })
            .await?;
        let new = matches!(created, Created::New { .. });
        let resend = match created {
            Created::New { .. } => false,
            Created::Exists { state } if state == "queued" => false,
            Created::Exists { state } if state == "dispatched" && redelivered => true,
            // Closed, or expired, since `ensure_session`: not derived, so not acked as if it were.
            Created::SessionClosed => return Err(session_closed(sid)),
            Created::NoSession => {
                return Err(
                    anyhow::anyhow!("planning session {sid} expired while deriving").into(),
                );
            }
            other => {
                tracing::debug!(task_id = %tid, ?other, "subtask derived before");
                return Ok((false, false));
            }
        };
        let send = match self.tasks.dispatch(sid, tid, 1, &pool).await? {
            Dispatched::Moved => true,
            Dispatched::NotQueued(state) => resend && state == "dispatched",
            _ => false,
        };
        if !send {
            return Ok((new, false));
        }
        let deadline_ms = self
            .tasks
            .get(sid, tid)
            .await?
            .map_or(deadline_ms, |t| t.deadline_ms);
        let context = match &self.context {
            Some(c) => c.context(&s.case_id, &s.role, &s.action).await,
            None => String::new(),
        };
        let request = AgentRequest {
            action: AgentAction::Subtask,
            role: s.role.clone(),
            member: String::new(),
            deliberation_id: String::new(),
            round: 0,
            rounds: 0,
            description: s.description.clone(),
            requirements: s.constraints.clone(),
            rubric: Default::default(),
            metadata: [
                ("case_id", s.case_id.clone()),
                ("plan_id", s.plan_id.clone()),
                ("to_state", s.to_state.clone()),
                ("event_id", e.event_id.clone()),
                ("transition_id", s.transition_id.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            context: context.clone(),
            peers: Vec::new(),
            session_id: sid.clone(),
            task_id: tid.clone(),
            attempt: 1,
            task_action: s.action.clone(),
            dependencies: s.dependencies.clone(),
            priority: s.priority,
            deadline_ms,
        };
        let payload = AgentRequestPayload {
            task_id: tid.clone(),
            session_id: sid.clone(),
            attempt: 1,
            role: s.role.clone(),
            action: s.action.clone(),
            description: s.description.clone(),
            dependencies: s.dependencies.clone(),
            constraints: s.constraints.clone(),
            priority: s.priority,
            context,
            deadline_ms,
            case_id: s.case_id.clone(),
            plan_id: s.plan_id.clone(),
            event_id: e.event_id.clone(),
        };
        let pipeline = self.tasks.client().pipeline();
        producer::queue(
            &pipeline,
            &self.keys.agents(&s.role),
            None,
            &Envelope::new(AgentMessage::Request(request)),
        )
        .await?;
        // A deterministic id: JetStream drops a re-sent duplicate (Nats-Msg-Id).
        let nats = Envelope::with_id(
            Uuid::new_v5(
                &planning::SUBTASK_NAMESPACE,
                format!("agent.requests:{tid}:1").as_bytes(),
            ),
            Outbound::Publish(NatsPublish {
                subject: fleet::deliberation::engine::SUBJECT_AGENT_REQUESTS.into(),
                payload: serde_json::to_string(&payload).expect("a payload serializes"),
                headers: Default::default(),
            }),
        );
        producer::queue(&pipeline, &self.keys.outbound(), None, &nats).await?;
        let _: Vec<Value> = pipeline.all().await?;
        metrics::counter!("fleet_tasks_dispatched_total", "pool" => pool).increment(1);
        Ok((new, true))
    }

    /// Ends a submitted task whose agent no longer exists. A redelivered submit's task may be
    /// in a pool already (the earlier delivery dispatched it, then died), so the executors of
    /// the pool of a task ended here are told to stop it.
    async fn fail_agent_gone(&self, s: &TaskSubmit, redelivered: bool) -> Result<()> {
        let (sid, tid) = (&s.session_id, &s.task_id);
        let message = format!("agent `{}` does not exist (any more)", s.agent_id);
        let ev =
            ServerMessage::chat_error(sid, tid, None, "agent_not_found", &message, &Json::Null);
        let op = TaskOp::end("fail", tid, "agent_not_found", &message, ev.to_json());
        let applied = self.tasks.apply(sid, &[op]).await?;
        self.publish(sid, &applied, redelivered).await?;
        for t in applied.ended.iter().filter(|t| !t.pool.is_empty()) {
            self.tasks
                .cancel_on_executors(&t.pool, sid, tid, &message)
                .await?;
        }
        Ok(())
    }

    async fn submit(&self, s: TaskSubmit, redelivered: bool) -> Result<()> {
        let sid = &s.session_id;
        let tid = &s.task_id;
        let Some(agent) = self.agents.get_cached(&s.agent_id).await? else {
            // Boxed, like the rarer commands in `handle_one`.
            return Box::pin(self.fail_agent_gone(&s, redelivered)).await;
        };
        let send = match self
            .tasks
            .dispatch(sid, tid, s.attempt, &agent.pool)
            .await?
        {
            Dispatched::Moved => true,
            Dispatched::NotQueued(state) if state == "dispatched" && redelivered => {
                tracing::info!("re-sending a task an earlier delivery dispatched");
                true
            }
            other => {
                tracing::debug!(?other, "nothing to dispatch");
                false
            }
        };
        if send {
            let request = Envelope::new(ExecMessage::Request(ExecRequest {
                session_id: s.session_id.clone(),
                task_id: s.task_id.clone(),
                attempt: s.attempt,
                agent_id: agent.id.clone(),
                message: s.message,
                metadata: s.metadata,
                params: agent.params.clone(),
                deadline_ms: s.deadline_ms,
            }));
            producer::send(
                self.tasks.client(),
                &self.keys.exec(&agent.pool),
                None,
                &request,
            )
            .await?;
            metrics::counter!("fleet_tasks_dispatched_total", "pool" => agent.pool).increment(1);
        }
        Ok(())
    }

    async fn cancel(&self, c: TaskCancel, redelivered: bool) -> Result<()> {
        let reason = if c.reason.is_empty() {
            "cancelled by the client"
        } else {
            c.reason.as_str()
        };
        let applied = self
            .tasks
            .apply(
                &c.session_id,
                &[TaskOp::cancel(&c.session_id, &c.task_id, reason)],
            )
            .await?;
        if applied.statuses.first() == Some(&OpStatus::Missing)
            && c.session_id.starts_with(planning::SESSION_PREFIX)
        {
            // No such task: a council subtask of a planning session is a deliberation.
            return Box::pin(self.cancel_council(&c.session_id, &c.task_id, reason, redelivered))
                .await;
        }
        self.publish(&c.session_id, &applied, redelivered).await?;
        let mut pools: Vec<String> = applied.ended.iter().map(|t| t.pool.clone()).collect();
        if redelivered && applied.statuses.first() == Some(&OpStatus::Terminal) {
            // An earlier delivery may have ended it and died before telling the executor.
            if let Some(t) = self.tasks.get(&c.session_id, &c.task_id).await?
                && t.state == "cancelled"
            {
                pools.extend(t.pool);
            }
        }
        for pool in pools.into_iter().filter(|p| !p.is_empty()) {
            self.tasks
                .cancel_on_executors(&pool, &c.session_id, &c.task_id, reason)
                .await?;
        }
        Ok(())
    }

    /// Cancels the deliberation of council subtask `id` of planning session `sid` (nothing when
    /// `id` names none, or it has ended: [`Engine::cancel_deliberation`]).
    async fn cancel_council(
        &self,
        sid: &str,
        id: &str,
        reason: &str,
        redelivered: bool,
    ) -> Result<()> {
        if self.engine.council_of(sid, id).await?.is_none() {
            tracing::debug!(task_id = %id, "no task or council subtask to cancel");
            return Ok(());
        }
        let outcome = self
            .engine
            .cancel_deliberation(id, reason, redelivered)
            .await?;
        tracing::info!(deliberation_id = %id, ?outcome, "council subtask cancel");
        Ok(())
    }

    /// Cancels the council subtasks of planning session `sid` that still run (registered on the
    /// session when they were derived, [`fleet::deliberation::DeliberationStore::register_council`]).
    async fn close_councils(&self, sid: &str, redelivered: bool) -> Result<()> {
        let ids = self
            .engine
            .store
            .session_councils(sid)
            .await
            .map_err(anyhow::Error::from)?;
        for id in ids {
            self.cancel_council(sid, &id, "the session was closed", redelivered)
                .await?;
        }
        Ok(())
    }

    async fn close(&self, c: SessionClose, redelivered: bool) -> Result<()> {
        let sid = &c.session_id;
        let reason = if c.reason.is_empty() {
            "closed by the client"
        } else {
            c.reason.as_str()
        };
        let cancel_ops = |tids: Vec<String>| -> Vec<TaskOp> {
            tids.iter()
                .map(|tid| TaskOp::cancel(sid, tid, "the session was closed"))
                .collect()
        };
        // Cancel what is open, then close (no task can be created after that), then cancel
        // anything created in between.
        let open = self.tasks.open_tasks(sid).await?;
        let mut ops = cancel_ops(open);
        let closed = ServerMessage::new(
            message_type::SESSION_CLOSED,
            sid,
            None,
            json!({"reason": reason}),
        );
        ops.push(TaskOp::session("close", closed.to_json()));
        let first = self.tasks.apply(sid, &ops).await?;
        self.publish(sid, &first, redelivered).await?;
        let late = self.tasks.open_tasks(sid).await?;
        let mut stop: Vec<(String, String)> = Vec::new();
        if redelivered && first.statuses.last() == Some(&OpStatus::Terminal) {
            // An earlier delivery closed it and may have died before telling the executors.
            stop = self.tasks.close_cancelled(sid).await?;
        }
        let mut ended = first.ended;
        if !late.is_empty() {
            let second = self.tasks.apply(sid, &cancel_ops(late)).await?;
            self.publish(sid, &second, false).await?;
            ended.extend(second.ended);
        }
        stop.extend(ended.into_iter().map(|t| (t.task_id, t.pool)));
        for (tid, pool) in stop.iter().filter(|(_, pool)| !pool.is_empty()) {
            self.tasks
                .cancel_on_executors(pool, sid, tid, "the session was closed")
                .await?;
        }
        if sid.starts_with(planning::SESSION_PREFIX) {
            // After the close: no council is registered with the session from now on, and one
            // registered before it is found here (or by its planning event, which checks the
            // session again once it has started it).
            self.close_councils(sid, redelivered).await?;
        }
        Ok(())
    }

    /// Tells Planning of the planning subtasks an apply ended (in the background), fans out its
    /// events and drops ended tasks from the deadline set. Every apply of this handler comes
    /// here, so every end it makes (a cancel, a close, a failed submit) is reported, once: a
    /// redelivery's apply ends nothing. Told first, so a failed fan-out (retried, ending
    /// nothing then) does not lose the report.
    async fn publish(&self, sid: &str, applied: &Applied, redelivered: bool) -> Result<()> {
        if let Some(n) = &self.notifier {
            n.tasks_ended(&self.tasks, sid, &applied.ended);
        }
        self.log.publish_applied(sid, applied, redelivered).await?;
        Ok(())
    }
}
