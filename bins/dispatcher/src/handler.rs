//! The dispatcher's handler of `fleet:tasks` commands.

use fleet::agent::AgentStore;
use fleet::envelope::{
    Envelope, ExecMessage, ExecRequest, SessionClose, TaskCancel, TaskCommand, TaskSubmit,
};
use fleet::events::{ServerMessage, message_type};
use fleet::keys::Keys;
use fleet::session_log::SessionLog;
use fleet::stream::{Delivery, Handler, Outcome, producer};
use fleet::task::{Applied, Dispatched, OpStatus, TaskOp, TaskStore};
use fred::prelude::*;
use serde_json::{Value as Json, json};
use tracing::Instrument;

/// Handles the commands of `fleet:tasks`.
pub struct Dispatcher {
    pub tasks: TaskStore,
    pub agents: AgentStore,
    pub log: SessionLog,
    pub keys: Keys,
}

type Result<T> = std::result::Result<T, anyhow::Error>;

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
            TaskCommand::PlanningEvent(_) => {
                return Outcome::DeadLetter(
                    "planning events need subtask derivation, which this dispatcher does not have"
                        .into(),
                );
            }
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
            match d.envelope.msg {
                TaskCommand::Submit(s) => self.submit(s, redelivered).await,
                TaskCommand::Cancel(c) => self.cancel(c, redelivered).await,
                TaskCommand::SessionClose(c) => self.close(c, redelivered).await,
                TaskCommand::PlanningEvent(_) => Ok(()),
            }
        }
        .instrument(span)
        .await;
        metrics::counter!("fleet_dispatcher_commands_total", "kind" => kind, "ok" => if result.is_ok() { "true" } else { "false" }).increment(1);
        match result {
            Ok(()) => Outcome::Ack,
            Err(e) => {
                tracing::warn!(error = %e, kind, "command failed; will be retried");
                Outcome::Retry
            }
        }
    }

    async fn submit(&self, s: TaskSubmit, redelivered: bool) -> Result<()> {
        let sid = &s.session_id;
        let tid = &s.task_id;
        let Some(agent) = self.agents.get_cached(&s.agent_id).await? else {
            let message = format!("agent `{}` does not exist (any more)", s.agent_id);
            let ev =
                ServerMessage::chat_error(sid, tid, None, "agent_not_found", &message, &Json::Null);
            let applied = self
                .tasks
                .apply(
                    sid,
                    &[TaskOp::end(
                        "fail",
                        tid,
                        "agent_not_found",
                        &message,
                        ev.to_json(),
                    )],
                )
                .await?;
            self.publish(sid, &applied, redelivered).await?;
            return Ok(());
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
        let ev = ServerMessage::chat_error(
            &c.session_id,
            &c.task_id,
            None,
            "cancelled",
            reason,
            &Json::Null,
        );
        let applied = self
            .tasks
            .apply(
                &c.session_id,
                &[TaskOp::end(
                    "cancel",
                    &c.task_id,
                    "cancelled",
                    reason,
                    ev.to_json(),
                )],
            )
            .await?;
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

    async fn close(&self, c: SessionClose, redelivered: bool) -> Result<()> {
        let sid = &c.session_id;
        let reason = if c.reason.is_empty() {
            "closed by the client"
        } else {
            c.reason.as_str()
        };
        let open_key = self.tasks.open_tasks_key(sid);
        let cancel_ops = |tids: Vec<String>| -> Vec<TaskOp> {
            tids.iter()
                .map(|tid| {
                    let ev = ServerMessage::chat_error(
                        sid,
                        tid,
                        None,
                        "cancelled",
                        "the session was closed",
                        &Json::Null,
                    );
                    TaskOp::end(
                        "cancel",
                        tid,
                        "cancelled",
                        "the session was closed",
                        ev.to_json(),
                    )
                })
                .collect()
        };
        // Cancel what is open, then close (no task can be created after that), then cancel
        // anything created in between.
        let open: Vec<String> = self.tasks.client().smembers(&open_key).await?;
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
        let late: Vec<String> = self.tasks.client().smembers(&open_key).await?;
        let mut ended = first.ended;
        if !late.is_empty() {
            let second = self.tasks.apply(sid, &cancel_ops(late)).await?;
            self.publish(sid, &second, false).await?;
            ended.extend(second.ended);
        }
        for t in ended.iter().filter(|t| !t.pool.is_empty()) {
            self.tasks
                .cancel_on_executors(&t.pool, sid, &t.task_id, "the session was closed")
                .await?;
        }
        Ok(())
    }

    /// Fans out the events of an apply and drops ended tasks from the deadline set.
    async fn publish(&self, sid: &str, applied: &Applied, redelivered: bool) -> Result<()> {
        let pipeline = self.tasks.client().pipeline();
        if self
            .log
            .queue_applied(&pipeline, sid, applied, redelivered)
            .await?
        {
            let _: Vec<Value> = pipeline.all().await?;
        }
        Ok(())
    }
}
