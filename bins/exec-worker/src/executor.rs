//! Running one execution request and reporting it on `fleet:callbacks`.

use std::time::Duration;

use fleet::envelope::{
    Callback, CallbackBatch, Chunk, Envelope, ExecMessage, ExecRequest, Started, TaskFailure,
    TaskResult,
};
use fleet::stream::{Delivery, Handler, Outcome, Producer};
use fleet::time::now_ms;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Cancellations, Mode};

/// Runs the tasks of a pool.
pub struct Executor {
    pub callbacks: Producer,
    pub cancellations: Cancellations,
    pub mode: Mode,
    pub echo_delay: Duration,
    pub command: Option<String>,
    pub name: String,
}

/// How an execution ended.
pub enum Ending {
    /// The whole answer.
    Result(String),
    /// It failed: error type, message, details.
    Error(String, String, Json),
    /// Cancelled or past its deadline: nothing more to report.
    Stopped,
}

/// Writes the callbacks of one task attempt, numbering them from 1.
pub struct Emitter<'a> {
    producer: &'a Producer,
    req: &'a ExecRequest,
    /// The attempt its callbacks name: the request's, or a later one for a run again from the
    /// start ([`Emitter::rerun`]).
    attempt: u32,
    seq: u32,
    chunks: u32,
    /// Callbacks kept back to be written as one entry (`batch` mode).
    held: Vec<Callback>,
    batch: bool,
}

impl<'a> Emitter<'a> {
    pub fn new(producer: &'a Producer, req: &'a ExecRequest, batch: bool) -> Self {
        Self {
            producer,
            req,
            attempt: req.attempt,
            seq: 0,
            chunks: 0,
            held: Vec::new(),
            batch,
        }
    }

    /// For a request delivered `deliveries` times: its callbacks name attempt `attempt +
    /// deliveries - 1`. Each delivery after the first runs the task again from the start (the
    /// executor that had it died, stalled or could not report), and an executor whose output may
    /// differ between runs must not have its callbacks mixed with the earlier run's: the later
    /// attempt takes the task over, and the client is told to discard what it streamed.
    pub fn rerun(mut self, deliveries: u32) -> Self {
        self.attempt = self
            .req
            .attempt
            .saturating_add(deliveries.saturating_sub(1));
        self
    }

    fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    async fn emit(&mut self, cb: Callback) -> anyhow::Result<()> {
        if self.batch {
            self.held.push(cb);
            return Ok(());
        }
        self.producer.send(&Envelope::new(cb)).await?;
        Ok(())
    }

    /// Writes whatever is held as one entry: the callback itself, or a `batch` of them.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        let cb = match self.held.len() {
            0 => return Ok(()),
            1 => self.held.remove(0),
            _ => Callback::Batch(
                CallbackBatch::new(std::mem::take(&mut self.held)).map_err(anyhow::Error::msg)?,
            ),
        };
        self.producer.send(&Envelope::new(cb)).await?;
        Ok(())
    }

    pub async fn started(&mut self, executor: &str) -> anyhow::Result<()> {
        let seq = self.next_seq();
        let r = self.req;
        self.emit(Callback::Started(Started {
            session_id: r.session_id.clone(),
            task_id: r.task_id.clone(),
            attempt: self.attempt,
            seq,
            executor: executor.to_owned(),
        }))
        .await
    }

    pub async fn chunk(&mut self, content: &str) -> anyhow::Result<()> {
        let seq = self.next_seq();
        let index = self.chunks;
        self.chunks += 1;
        let r = self.req;
        self.emit(Callback::Chunk(Chunk {
            session_id: r.session_id.clone(),
            task_id: r.task_id.clone(),
            attempt: self.attempt,
            seq,
            index,
            content: content.to_owned(),
        }))
        .await
    }

    pub async fn end(&mut self, ending: Ending) -> anyhow::Result<()> {
        let r = self.req;
        match ending {
            Ending::Result(content) => {
                let seq = self.next_seq();
                self.emit(Callback::Result(TaskResult {
                    session_id: r.session_id.clone(),
                    task_id: r.task_id.clone(),
                    attempt: self.attempt,
                    seq,
                    content,
                    metadata: Json::Null,
                }))
                .await
            }
            Ending::Error(error_type, message, details) => {
                let seq = self.next_seq();
                self.emit(Callback::Error(TaskFailure {
                    session_id: r.session_id.clone(),
                    task_id: r.task_id.clone(),
                    attempt: self.attempt,
                    seq,
                    error_type,
                    message,
                    details,
                }))
                .await
            }
            Ending::Stopped => Ok(()),
        }
    }
}

impl Handler for Executor {
    type Msg = ExecMessage;

    async fn handle(&self, batch: Vec<Delivery<ExecMessage>>) -> Vec<Outcome> {
        futures::future::join_all(batch.into_iter().map(|d| self.run_one(d))).await
    }
}

impl Executor {
    async fn run_one(&self, d: Delivery<ExecMessage>) -> Outcome {
        let ExecMessage::Request(req) = d.envelope.msg;
        let span = tracing::info_span!(
            "execute",
            otel.name = %format!("{} process exec.request", self.callbacks.stream().replace(":callbacks", ":exec")),
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.operation = "process",
            fleet.session_id = %req.session_id,
            fleet.task_id = %req.task_id,
            fleet.attempt = req.attempt,
            fleet.deliveries = d.deliveries,
        );
        fleet::telemetry::continue_from(&span, d.envelope.tp.as_deref(), d.deliveries > 1);
        let started = std::time::Instant::now();
        let result = self.execute(&req, d.deliveries).instrument(span).await;
        self.cancellations.finish(&req.task_id);
        metrics::histogram!("fleet_exec_seconds", "mode" => format!("{:?}", self.mode).to_lowercase())
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => Outcome::Ack,
            Err(e) => {
                tracing::warn!(task_id = %req.task_id, error = %e, "could not report the task; it will run again");
                Outcome::Retry
            }
        }
    }

    async fn execute(&self, req: &ExecRequest, deliveries: u32) -> anyhow::Result<()> {
        let Some(cancel) = self.cancellations.start(&req.task_id) else {
            tracing::info!("task was cancelled before it started");
            return Ok(());
        };
        let remaining = req.deadline_ms - now_ms();
        if remaining <= 0 {
            tracing::info!("task is past its deadline; skipping it");
            return Ok(());
        }
        let stop = StopWhen {
            cancel,
            deadline: tokio::time::Instant::now() + Duration::from_millis(remaining as u64),
        };
        let delay = req
            .params
            .get("delay_ms")
            .and_then(Json::as_u64)
            .map(Duration::from_millis)
            .unwrap_or(self.echo_delay);
        let batch = self.mode == Mode::Echo && delay.is_zero();
        let mut emit = Emitter::new(&self.callbacks, req, batch);
        if self.mode != Mode::Echo {
            // Echo answers the same each run: a run again resumes where the last one's
            // callbacks stopped. A program's answer may differ: a run again starts over.
            emit = emit.rerun(deliveries);
        }
        emit.started(&self.name).await?;
        let ending = match self.mode {
            Mode::Echo => crate::echo::run(req, delay, &mut emit, &stop).await?,
            Mode::Command => {
                let program = self.command.as_deref().unwrap_or_default();
                crate::command::run(program, req, &mut emit, &stop).await?
            }
        };
        let outcome = match &ending {
            Ending::Result(_) => "completed",
            Ending::Error(..) => "failed",
            Ending::Stopped => "stopped",
        };
        emit.end(ending).await?;
        emit.flush().await?;
        metrics::counter!("fleet_exec_tasks_total", "outcome" => outcome).increment(1);
        Ok(())
    }
}

/// When an execution must stop: on cancel, or at its deadline.
pub struct StopWhen {
    pub cancel: CancellationToken,
    pub deadline: tokio::time::Instant,
}

impl StopWhen {
    /// Resolves when the execution must stop.
    pub async fn wait(&self) {
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = tokio::time::sleep_until(self.deadline) => {}
        }
    }
}
