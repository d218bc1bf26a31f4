//! Agent mode: the exec-worker as a council agent. It answers `agent.request` entries from
//! `fleet:agents:<role>` (the role's pool) and, with `--agent-id`, from its own stream
//! `fleet:agents:<role>:member:<agent_id>`, with one shared consumer loop per stream:
//!
//! | action | answer on `fleet:callbacks` |
//! |---|---|
//! | `propose`, `review` | `proposal` (content, checks, self-score) |
//! | `select` | `selection` (the chosen candidate) |
//! | `subtask` | `started`, `chunk`*, `result` / `error` for the subtask's task |
//!
//! Backends ([`AgentMode`]): `mock` (deterministic content and checks from a hash of member,
//! description and round, like the seed's MOCK agents), `command` (a program per request:
//! request JSON on stdin, stdout is the answer, an optional last line of JSON carries checks or
//! the selection), `openai` (any OpenAI-compatible `/v1/chat/completions` endpoint, streamed).
//!
//! With `--agent-id` it registers in the council of its role and heartbeats (`ready` / `busy`)
//! every `--heartbeat-ms`; it unregisters on a clean stop. Cancels arrive on
//! `fleet:agents:<role>:control` (`agent.cancel`, deliberation stragglers) and, for subtasks, on
//! `fleet:exec:agents.<role>:control` (`exec.cancel`, from task cancels and deadlines).

pub mod answer;
pub mod command;
pub mod control;
pub mod mock;
pub mod openai;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::ValueEnum;
use fleet::council::{Councils, Registration};
use fleet::envelope::{
    AgentAction, AgentMessage, AgentRequest, Callback, Envelope, ExecRequest, ProposalCallback,
    SelectionCallback,
};
use fleet::stream::{Delivery, Handler, Outcome, Producer};
use fleet::time::now_ms;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Cancellations;
use crate::executor::{Emitter, Ending, StopWhen};

pub use answer::{ProposalAnswer, SelectionAnswer};

/// How an agent answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AgentMode {
    /// Not an agent: run chat tasks from fleet:exec:<pool> (the default).
    Off,
    /// Deterministic proposals and checks (for tests and demos).
    Mock,
    /// A program per request.
    Command,
    /// An OpenAI-compatible chat completions endpoint (vLLM, Ollama, ...).
    Openai,
}

impl AgentMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentMode::Off => "off",
            AgentMode::Mock => "mock",
            AgentMode::Command => "command",
            AgentMode::Openai => "openai",
        }
    }
}

/// What produces the answers.
pub enum Backend {
    Mock { delay: Duration },
    Command { program: String },
    OpenAi(openai::OpenAiClient),
}

impl Backend {
    async fn propose(
        &self,
        req: &AgentRequest,
        stop: &StopWhen,
    ) -> anyhow::Result<Option<ProposalAnswer>> {
        match self {
            Backend::Mock { delay } => Ok(mock::propose(req, *delay, stop).await),
            Backend::Command { program } => command::propose(program, req, stop).await,
            Backend::OpenAi(c) => c.propose(req, stop).await,
        }
    }

    async fn select(
        &self,
        req: &AgentRequest,
        stop: &StopWhen,
    ) -> anyhow::Result<Option<SelectionAnswer>> {
        match self {
            Backend::Mock { delay } => Ok(mock::select(req, *delay, stop).await),
            Backend::Command { program } => command::select(program, req, stop).await,
            Backend::OpenAi(c) => c.select(req, stop).await,
        }
    }

    async fn subtask(
        &self,
        req: &AgentRequest,
        exec: &ExecRequest,
        emit: &mut Emitter<'_>,
        stop: &StopWhen,
    ) -> anyhow::Result<Ending> {
        match self {
            Backend::Mock { delay } => mock::subtask(req, *delay, emit, stop).await,
            Backend::Command { program } => crate::command::run(program, exec, emit, stop).await,
            Backend::OpenAi(c) => c.subtask(req, emit, stop).await,
        }
    }
}

/// Answers the agent requests of one stream. Cheap to clone: every stream's loop gets one.
#[derive(Clone)]
pub struct AgentWorker {
    pub callbacks: Producer,
    pub cancellations: Cancellations,
    pub backend: Arc<Backend>,
    pub mode: AgentMode,
    /// The agent id (registered) or the consumer name: who answered.
    pub name: String,
    /// Requests in hand, for the heartbeat's ready / busy.
    pub busy: Arc<AtomicUsize>,
    /// On shutdown, requests in hand are abandoned and left pending: another agent (or this one,
    /// restarted) takes them over, instead of the shutdown waiting on a long model call.
    pub shutdown: CancellationToken,
}

/// The cancel key of a request: the subtask's task id, or `<deliberation>/<member>`.
pub fn cancel_key(req: &AgentRequest) -> String {
    match req.action {
        AgentAction::Subtask => req.task_id.clone(),
        _ => format!("{}/{}", req.deliberation_id, req.member),
    }
}

impl Handler for AgentWorker {
    type Msg = AgentMessage;

    async fn handle(&self, batch: Vec<Delivery<AgentMessage>>) -> Vec<Outcome> {
        futures::future::join_all(batch.into_iter().map(|d| self.run_one(d))).await
    }
}

/// Why a request can never be answered.
fn invalid(req: &AgentRequest) -> Option<String> {
    let valid = fleet::agent::valid_name;
    match req.action {
        AgentAction::Subtask if !valid(&req.session_id) || !valid(&req.task_id) => {
            Some("subtask request without a valid session_id and task_id".into())
        }
        AgentAction::Subtask => None,
        _ if !valid(&req.deliberation_id) || !valid(&req.member) => {
            Some("deliberation request without a valid deliberation_id and member".into())
        }
        _ => None,
    }
}

impl AgentWorker {
    async fn run_one(&self, d: Delivery<AgentMessage>) -> Outcome {
        let AgentMessage::Request(req) = d.envelope.msg;
        if let Some(reason) = invalid(&req) {
            return Outcome::DeadLetter(reason);
        }
        let span = tracing::info_span!(
            "agent_request",
            otel.name = %format!("agents process {}", req.action.as_str()),
            otel.kind = "consumer",
            messaging.system = "redis",
            fleet.action = req.action.as_str(),
            fleet.role = %req.role,
            fleet.member = %req.member,
            fleet.deliberation_id = %req.deliberation_id,
            fleet.task_id = %req.task_id,
            fleet.deliveries = d.deliveries,
        );
        fleet::telemetry::continue_from(&span, d.envelope.tp.as_deref(), d.deliveries > 1);
        let started = std::time::Instant::now();
        let key = cancel_key(&req);
        self.busy.fetch_add(1, Ordering::Relaxed);
        let result = self.answer(&req, &key, d.deliveries).instrument(span).await;
        self.busy.fetch_sub(1, Ordering::Relaxed);
        self.cancellations.finish(&key);
        metrics::histogram!("fleet_agent_request_seconds", "mode" => self.mode.as_str(), "action" => req.action.as_str())
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(outcome) => {
                metrics::counter!("fleet_agent_requests_total", "mode" => self.mode.as_str(), "action" => req.action.as_str(), "outcome" => outcome)
                    .increment(1);
                Outcome::Ack
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not answer the request; it will be delivered again");
                Outcome::Retry
            }
        }
    }

    /// Answers one request. Returns the outcome label: answered, cancelled, expired, failed.
    async fn answer(
        &self,
        req: &AgentRequest,
        key: &str,
        deliveries: u32,
    ) -> anyhow::Result<&'static str> {
        let Some(cancel) = self.cancellations.start(key) else {
            tracing::info!("request cancelled before it started");
            return Ok("cancelled");
        };
        // A shutdown stops the request too (and leaves it pending, see below).
        let done = CancellationToken::new();
        let _done = done.clone().drop_guard();
        {
            let (cancel, shutdown) = (cancel.clone(), self.shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => cancel.cancel(),
                    _ = done.cancelled() => {}
                }
            });
        }
        let abandoned = || {
            anyhow::anyhow!(
                "shutting down with the request in hand; it stays pending for another agent"
            )
        };
        let remaining = req.deadline_ms - now_ms();
        if remaining <= 0 {
            tracing::info!("request is past its deadline; skipping it");
            return Ok("expired");
        }
        let stop = StopWhen {
            cancel: cancel.clone(),
            deadline: tokio::time::Instant::now() + Duration::from_millis(remaining as u64),
        };
        let stopped = |c: &CancellationToken| {
            if c.is_cancelled() {
                "cancelled"
            } else {
                "expired"
            }
        };
        match req.action {
            AgentAction::Propose | AgentAction::Review => {
                let Some(a) = self.backend.propose(req, &stop).await? else {
                    if self.shutdown.is_cancelled() {
                        return Err(abandoned());
                    }
                    return Ok(stopped(&cancel));
                };
                let cb = Callback::Proposal(ProposalCallback {
                    deliberation_id: req.deliberation_id.clone(),
                    member: req.member.clone(),
                    round: req.round,
                    agent_id: self.name.clone(),
                    content: a.content,
                    checks: a.checks,
                    self_score: a.self_score,
                    metadata: serde_json::json!({"mode": self.mode.as_str()}),
                });
                self.callbacks.send(&Envelope::new(cb)).await?;
                Ok("answered")
            }
            AgentAction::Select => {
                let Some(a) = self.backend.select(req, &stop).await? else {
                    if self.shutdown.is_cancelled() {
                        return Err(abandoned());
                    }
                    return Ok(stopped(&cancel));
                };
                let cb = Callback::Selection(SelectionCallback {
                    deliberation_id: req.deliberation_id.clone(),
                    member: req.member.clone(),
                    winner: a.winner,
                    rationale: a.rationale,
                });
                self.callbacks.send(&Envelope::new(cb)).await?;
                Ok("answered")
            }
            AgentAction::Subtask => {
                let exec = ExecRequest {
                    session_id: req.session_id.clone(),
                    task_id: req.task_id.clone(),
                    attempt: req.attempt.max(1),
                    agent_id: self.name.clone(),
                    message: req.description.clone(),
                    metadata: serde_json::to_value(req).unwrap_or_default(),
                    params: serde_json::Value::Null,
                    deadline_ms: req.deadline_ms,
                };
                // A model answers differently each run: a run again starts over.
                let mut emit = Emitter::new(&self.callbacks, &exec, false).rerun(deliveries);
                emit.started(&self.name).await?;
                let ending = self.backend.subtask(req, &exec, &mut emit, &stop).await?;
                if matches!(ending, Ending::Stopped) && self.shutdown.is_cancelled() {
                    return Err(abandoned());
                }
                let label = match &ending {
                    Ending::Result(_) => "answered",
                    Ending::Error(..) => "failed",
                    Ending::Stopped => stopped(&cancel),
                };
                emit.end(ending).await?;
                Ok(label)
            }
        }
    }
}

/// Registers `agent_id` in the council of `role` every `every` (ready, or busy while requests
/// are in hand) until `shutdown`, then unregisters it.
pub async fn heartbeat(
    councils: Councils,
    mut registration: Registration,
    busy: Arc<AtomicUsize>,
    every: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    while !shutdown.is_cancelled() {
        registration.status = if busy.load(Ordering::Relaxed) > 0 {
            "busy".into()
        } else {
            "ready".into()
        };
        if let Err(e) = councils.register(&registration).await {
            tracing::warn!(error = %e, "heartbeat failed; retrying");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    match councils.unregister(&registration.agent_id).await {
        Ok(_) => tracing::info!(agent_id = %registration.agent_id, "unregistered from the council"),
        Err(e) => tracing::warn!(error = %e, "could not unregister"),
    }
    Ok(())
}
