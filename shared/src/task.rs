//! Task state, moved only by compare-and-set Lua scripts (`src/lua/*.lua`).
//!
//! ```text
//!  reserved ─▶ queued ─▶ dispatched ─▶ running ─▶ completed
//!                │           │            │  └───▶ failed
//!                └───────────┴────────────┴──────▶ cancelled | timed_out
//! ```
//!
//! * `create` (edge-api, ws-gateway, gRPC): a new task, `queued`, in an open session.
//! * `dispatch` (dispatcher): `queued -> dispatched`, once per `(task_id, attempt)`.
//! * `apply` (callback-worker, dispatcher on cancel, the deadline sweeper): callbacks of one
//!   `(task_id, attempt)` apply strictly in `seq` order. A duplicate is dropped, an early one is
//!   parked until its predecessor arrives, a callback of another attempt is stale, and nothing
//!   moves a terminal task. The client event of each step is appended to the session log in the
//!   same atomic step (see [`crate::session_log`]).

use std::collections::HashMap;
use std::sync::LazyLock;

use fred::prelude::*;
use fred::types::scripts::Script;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::envelope::{Envelope, ExecCancel, ExecControl};
use crate::keys::Keys;
use crate::session_log::LoggedEvent;
use crate::stream::producer::{self, ProduceError};
use crate::time::now_ms;

/// A pool's control stream keeps about this many entries; executors only read its tail.
pub const CONTROL_MAXLEN: u64 = 10_000;

/// The session hash holds `open:<tid>` while task `tid` is open (see [`TaskStore::open_tasks`]).
pub const OPEN_FIELD_PREFIX: &str = "open:";

/// Where a task is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// An id handed out by `POST /api/v1/chat/session/{id}/task`, not yet submitted.
    Reserved,
    Queued,
    Dispatched,
    Running,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl TaskState {
    pub const ALL: [TaskState; 8] = [
        TaskState::Reserved,
        TaskState::Queued,
        TaskState::Dispatched,
        TaskState::Running,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Reserved => "reserved",
            TaskState::Queued => "queued",
            TaskState::Dispatched => "dispatched",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::TimedOut => "timed_out",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Nothing moves a task out of a terminal state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Cancelled | TaskState::TimedOut
        )
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! lua {
    ($file:literal) => {
        concat!(
            include_str!("lua/prelude.lua"),
            include_str!(concat!("lua/", $file))
        )
    };
}

/// The task-state scripts, loaded by SHA and reloaded when Redis forgot them.
pub struct Scripts {
    pub create: Script,
    pub reserve: Script,
    pub dispatch: Script,
    pub apply: Script,
}

/// The compiled-in scripts.
pub static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    create: Script::from_lua(lua!("create.lua")),
    reserve: Script::from_lua(lua!("reserve.lua")),
    dispatch: Script::from_lua(lua!("dispatch.lua")),
    apply: Script::from_lua(lua!("apply.lua")),
});

impl Scripts {
    /// `SCRIPT LOAD`s every script (on every primary in cluster mode).
    pub async fn load(&self, client: &Client) -> Result<(), Error> {
        for s in [&self.create, &self.reserve, &self.dispatch, &self.apply] {
            s.load(client).await?;
        }
        Ok(())
    }
}

/// Runs `script`, loading it first if Redis does not know it (e.g. after a restart).
pub async fn eval(
    client: &Client,
    script: &Script,
    keys: Vec<String>,
    args: Vec<Value>,
) -> Result<Value, Error> {
    script.evalsha_with_reload(client, keys, args).await
}

/// Errors of the task store.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("redis: {0}")]
    Redis(#[from] Error),
    #[error("unexpected script reply: {0}")]
    Reply(String),
}

fn first_str(v: &Value) -> String {
    match v {
        Value::Array(a) => a.first().and_then(|x| x.as_string()).unwrap_or_default(),
        other => other.as_string().unwrap_or_default(),
    }
}

fn nth_str(v: &Value, n: usize) -> Option<String> {
    match v {
        Value::Array(a) => a.get(n).and_then(|x| x.as_string()),
        _ => None,
    }
}

/// A task for [`TaskStore::create`] to create.
#[derive(Clone, Copy, Debug)]
pub struct NewTask<'a> {
    pub session_id: &'a str,
    pub task_id: &'a str,
    pub message: &'a str,
    pub metadata: &'a Json,
    pub deadline_ms: i64,
    /// Where the task came from: `ws`, `rest`, `grpc` or `planning`.
    pub source: &'a str,
    pub idempotency_key: Option<&'a str>,
    /// The pool the caller sends the execution request to itself: the task is created
    /// `dispatched` to it instead of `queued`.
    pub pool: Option<&'a str>,
}

/// What `create` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Created {
    /// A new queued task; carries the session's agent id.
    New {
        agent_id: String,
    },
    /// The idempotency key was used before, for this task id.
    Duplicate {
        task_id: String,
    },
    /// The task id is already taken by a submitted task, in this state.
    Exists {
        state: String,
    },
    NoSession,
    SessionClosed,
}

/// What `dispatch` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dispatched {
    /// This call moved it `queued -> dispatched`.
    Moved,
    /// It is not queued: here is its state (`dispatched` when an earlier delivery moved it).
    NotQueued(String),
    /// The command is for another attempt.
    Stale,
    Missing,
}

/// One operation for the `apply` script (see `lua/apply.lua`).
#[derive(Clone, Debug, Default)]
pub struct TaskOp {
    pub task_id: String,
    pub op: &'static str,
    pub attempt: Option<u32>,
    pub seq: Option<u32>,
    /// Of an unordered op (`seq` 0): a key naming the delivery that carries it, so that the
    /// same delivery applied twice (redelivered after it applied) is a duplicate.
    pub once: Option<String>,
    /// The client event to append when the op applies ("" for none).
    pub event: String,
    pub content: Option<String>,
    pub error_type: Option<String>,
    pub error_message: Option<String>,
}

impl TaskOp {
    /// A callback of `(task_id, attempt)` at position `seq`.
    pub fn ordered(op: &'static str, task_id: &str, attempt: u32, seq: u32, event: String) -> Self {
        Self {
            task_id: task_id.to_owned(),
            op,
            attempt: Some(attempt),
            seq: Some(seq),
            event,
            ..Default::default()
        }
    }

    /// Attempt `attempt` takes open task `task_id` over (`op = "restart"`): it runs again from
    /// the start, so its callbacks are numbered from 1 again and the earlier attempt's become
    /// stale. `event` (a `task_restarted`) is logged when the earlier attempt had applied any.
    pub fn restart(task_id: &str, attempt: u32, event: String) -> Self {
        Self {
            task_id: task_id.to_owned(),
            op: "restart",
            attempt: Some(attempt),
            event,
            ..Default::default()
        }
    }

    /// Ends an open task as `cancelled` (`op = "cancel"`), `timed_out` (`op = "timeout"`) or
    /// `failed` (`op = "fail"`), whatever its attempt and seq.
    pub fn end(
        op: &'static str,
        task_id: &str,
        error_type: &str,
        message: &str,
        event: String,
    ) -> Self {
        Self {
            task_id: task_id.to_owned(),
            op,
            event,
            error_type: Some(error_type.to_owned()),
            error_message: Some(message.to_owned()),
            ..Default::default()
        }
    }

    /// Cancels open task `task_id` of session `sid` for `reason`, with the `chat_error` (type
    /// `cancelled`) its client gets.
    pub fn cancel(sid: &str, task_id: &str, reason: &str) -> Self {
        let ev = crate::events::ServerMessage::chat_error(
            sid,
            task_id,
            None,
            "cancelled",
            reason,
            &Json::Null,
        );
        Self::end("cancel", task_id, "cancelled", reason, ev.to_json())
    }

    /// Appends a session-level event (`op = "event"`) or closes the session (`op = "close"`).
    pub fn session(op: &'static str, event: String) -> Self {
        Self {
            op,
            event,
            ..Default::default()
        }
    }
}

/// How one op fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpStatus {
    Applied,
    Duplicate,
    Buffered,
    Stale,
    Terminal,
    Missing,
}

impl OpStatus {
    fn parse(s: &str) -> OpStatus {
        match s {
            "applied" => OpStatus::Applied,
            "duplicate" => OpStatus::Duplicate,
            "buffered" => OpStatus::Buffered,
            "stale" => OpStatus::Stale,
            "terminal" => OpStatus::Terminal,
            _ => OpStatus::Missing,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OpStatus::Applied => "applied",
            OpStatus::Duplicate => "duplicate",
            OpStatus::Buffered => "buffered",
            OpStatus::Stale => "stale",
            OpStatus::Terminal => "terminal",
            OpStatus::Missing => "missing",
        }
    }
}

/// What one `apply` call did.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub statuses: Vec<OpStatus>,
    /// Events appended to the session log, in order.
    pub events: Vec<LoggedEvent>,
    /// Tasks this call ended.
    pub ended: Vec<EndedTask>,
    /// The session's newest event id after the call (empty when it has none).
    pub last_event_id: String,
}

/// A task an `apply` call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedTask {
    pub task_id: String,
    pub state: TaskState,
    pub created_ms: i64,
    /// The pool it was dispatched to ("" when it never was).
    pub pool: String,
}

/// The session hash's field listing the tasks its close cancelled (see `lua/apply.lua`).
const CLOSE_CANCELLED_FIELD: &str = "close_cancelled";

/// The task hash's field that marks a task its front door could not send on.
const UNSENT_FIELD: &str = "unsent";

/// A task as stored, for reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub task_id: String,
    pub session_id: String,
    pub agent_id: String,
    pub state: String,
    pub attempt: u32,
    pub message: String,
    #[serde(skip_serializing_if = "Json::is_null")]
    pub metadata: Json,
    /// Chunks delivered so far.
    pub chunks: u32,
    pub created_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispatched_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
    pub updated_ms: i64,
    pub deadline_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskErrorView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The front door that created it could not send it on (see [`TaskStore::mark_unsent`]).
    #[serde(skip)]
    pub unsent: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskErrorView {
    pub error_type: String,
    pub message: String,
}

impl TaskView {
    fn from_hash(h: HashMap<String, String>) -> Option<TaskView> {
        let int = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
        Some(TaskView {
            task_id: h.get("task_id")?.clone(),
            session_id: h.get("session_id").cloned().unwrap_or_default(),
            agent_id: h.get("agent_id").cloned().unwrap_or_default(),
            state: h.get("state")?.clone(),
            attempt: int("attempt").unwrap_or(0) as u32,
            message: h.get("message").cloned().unwrap_or_default(),
            metadata: h
                .get("metadata")
                .and_then(|m| serde_json::from_str(m).ok())
                .unwrap_or(Json::Null),
            chunks: int("chunks").unwrap_or(0) as u32,
            created_ms: int("created_ms").unwrap_or(0),
            dispatched_ms: int("dispatched_ms"),
            started_ms: int("started_ms"),
            finished_ms: int("finished_ms"),
            updated_ms: int("updated_ms").unwrap_or(0),
            deadline_ms: int("deadline_ms").unwrap_or(0),
            result: h.get("result").cloned(),
            error: h.get("error_type").map(|t| TaskErrorView {
                error_type: t.clone(),
                message: h.get("error").cloned().unwrap_or_default(),
            }),
            pool: h.get("pool").cloned(),
            unsent: h.contains_key(UNSENT_FIELD),
        })
    }

    pub fn state(&self) -> Option<TaskState> {
        TaskState::parse(&self.state)
    }

    /// Whether a cancel has something to stop: the task was submitted and has not ended. A
    /// reserved id is not a task yet.
    pub fn cancellable(&self) -> bool {
        self.state()
            .is_some_and(|s| !s.is_terminal() && s != TaskState::Reserved)
    }
}

/// Session-scoped limits every writer of task state must agree on.
#[derive(Clone, Debug)]
pub struct Retention {
    /// Sessions, their tasks and their event logs expire after this long without activity.
    pub session_ttl_ms: i64,
    /// The session event log keeps about this many events.
    pub log_maxlen: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            session_ttl_ms: 24 * 3600 * 1000,
            log_maxlen: 10_000,
        }
    }
}

/// Task state in Redis.
#[derive(Clone)]
pub struct TaskStore {
    client: Client,
    keys: Keys,
    retention: Retention,
}

impl TaskStore {
    pub fn new(client: Client, keys: Keys, retention: Retention) -> Self {
        Self {
            client,
            keys,
            retention,
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn retention(&self) -> &Retention {
        &self.retention
    }

    /// Reserves `tid` in session `sid`: [`Created::New`] when reserved, otherwise why not.
    pub async fn reserve(&self, sid: &str, tid: &str) -> Result<Created, TaskError> {
        let reply = eval(
            &self.client,
            &SCRIPTS.reserve,
            vec![self.keys.session(sid), self.keys.task(sid, tid)],
            vec![
                now_ms().into(),
                sid.into(),
                tid.into(),
                self.retention.session_ttl_ms.into(),
            ],
        )
        .await?;
        Ok(match first_str(&reply).as_str() {
            "reserved" => Created::New {
                agent_id: String::new(),
            },
            "session_closed" => Created::SessionClosed,
            _ => Created::NoSession,
        })
    }

    /// Creates task `tid` as `queued`, or as `dispatched` to `pool` when the caller sends its
    /// execution request itself (see `lua/create.lua`), and registers its deadline.
    ///
    /// The deadline goes in the same round trip as the script, sent ahead of it: a caller that
    /// stops after this and before it sends the task on leaves a task that the deadline sweeper
    /// still ends (`timed_out`), never one open for good. `ZADD NX`: a task id that is taken
    /// keeps its deadline, and a redelivered command that finds its task created re-registers
    /// a deadline that was lost. When no task is created (a refused or duplicate submit) the
    /// member stays until the sweeper finds no open task under it; removing it here could remove
    /// the deadline of a concurrent create of the same task id.
    pub async fn create(&self, t: NewTask<'_>) -> Result<Created, TaskError> {
        let (sid, tid) = (t.session_id, t.task_id);
        let task_key = self.keys.task(sid, tid);
        let (idem_key, keyed) = match t.idempotency_key {
            Some(k) => (self.keys.idempotency(sid, k), "1"),
            None => (task_key.clone(), "0"),
        };
        let deadline = self.client.zadd::<i64, _, _>(
            self.keys.deadlines(),
            Some(SetOptions::NX),
            None,
            false,
            false,
            (t.deadline_ms as f64, crate::text::concat(&[sid, "/", tid])),
        );
        let create = eval(
            &self.client,
            &SCRIPTS.create,
            vec![
                self.keys.session(sid),
                self.keys.session_events(sid),
                task_key,
                idem_key,
            ],
            vec![
                now_ms().into(),
                sid.into(),
                tid.into(),
                t.message.into(),
                t.metadata.to_string().into(),
                t.deadline_ms.into(),
                t.source.into(),
                keyed.into(),
                self.retention.session_ttl_ms.into(),
                self.retention.session_ttl_ms.into(),
                t.pool.unwrap_or_default().into(),
            ],
        );
        // `join!` polls in order: the ZADD is queued on the connection before the script.
        let (registered, reply) = tokio::join!(deadline, create);
        let (_, reply) = (registered?, reply?);
        Ok(match first_str(&reply).as_str() {
            "created" => Created::New {
                agent_id: nth_str(&reply, 1).unwrap_or_default(),
            },
            "duplicate" => Created::Duplicate {
                task_id: nth_str(&reply, 1).unwrap_or_default(),
            },
            "exists" => Created::Exists {
                state: nth_str(&reply, 1).unwrap_or_default(),
            },
            "session_closed" => Created::SessionClosed,
            "no_session" => Created::NoSession,
            other => return Err(TaskError::Reply(other.to_owned())),
        })
    }

    /// Moves `(tid, attempt)` `queued -> dispatched` (see `lua/dispatch.lua`).
    pub async fn dispatch(
        &self,
        sid: &str,
        tid: &str,
        attempt: u32,
        pool: &str,
    ) -> Result<Dispatched, TaskError> {
        let reply = eval(
            &self.client,
            &SCRIPTS.dispatch,
            vec![self.keys.task(sid, tid)],
            vec![now_ms().into(), attempt.into(), pool.into()],
        )
        .await?;
        Ok(match first_str(&reply).as_str() {
            "dispatched" => Dispatched::Moved,
            "stale" => Dispatched::Stale,
            "missing" => Dispatched::Missing,
            other => Dispatched::NotQueued(other.to_owned()),
        })
    }

    /// The ids of the session's open tasks (created and not yet ended): its hash's `open:<tid>`
    /// fields.
    pub async fn open_tasks(&self, sid: &str) -> Result<Vec<String>, TaskError> {
        let fields: Vec<String> = self.client.hkeys(self.keys.session(sid)).await?;
        Ok(fields
            .into_iter()
            .filter_map(|f| f.strip_prefix(OPEN_FIELD_PREFIX).map(str::to_owned))
            .collect())
    }

    /// The tasks that closing session `sid` cancelled, as `(task id, pool)`: the `apply` call
    /// whose `close` op applied keeps them on the session hash.
    pub async fn close_cancelled(&self, sid: &str) -> Result<Vec<(String, String)>, TaskError> {
        let raw: Option<String> = self
            .client
            .hget(self.keys.session(sid), CLOSE_CANCELLED_FIELD)
            .await?;
        let Some(raw) = raw else {
            return Ok(Vec::new());
        };
        let flat: Vec<String> = serde_json::from_str(&raw)
            .map_err(|e| TaskError::Reply(format!("{CLOSE_CANCELLED_FIELD}: {e}")))?;
        Ok(flat
            .chunks_exact(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect())
    }

    /// The keys and arguments of one `apply` call for session `sid`: nine arguments per op
    /// (see `lua/apply.lua`).
    pub fn apply_call(&self, sid: &str, ops: &[TaskOp]) -> (Vec<String>, Vec<Value>) {
        let mut keys = vec![self.keys.session(sid), self.keys.session_events(sid)];
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut args: Vec<Value> = Vec::with_capacity(3 + 9 * ops.len());
        args.extend([
            now_ms().into(),
            self.retention.session_ttl_ms.into(),
            (self.retention.log_maxlen as i64).into(),
        ]);
        let text = |v: &Option<String>| Value::from(v.as_deref().unwrap_or_default());
        for op in ops {
            let k = if op.task_id.is_empty() {
                0
            } else {
                *index.entry(op.task_id.as_str()).or_insert_with(|| {
                    keys.push(self.keys.task(sid, &op.task_id));
                    keys.len()
                })
            };
            args.extend([
                (k as i64).into(),
                op.task_id.as_str().into(),
                op.op.into(),
                op.attempt.map_or(Value::from(""), |a| i64::from(a).into()),
                match (op.seq.unwrap_or(0), &op.once) {
                    (0, Some(once)) => once.as_str().into(),
                    (seq, _) => i64::from(seq).into(),
                },
                op.event.as_str().into(),
                text(&op.content),
                text(&op.error_type),
                text(&op.error_message),
            ]);
        }
        (keys, args)
    }

    /// Applies `ops` to session `sid` atomically (see `lua/apply.lua`).
    pub async fn apply(&self, sid: &str, ops: &[TaskOp]) -> Result<Applied, TaskError> {
        let (keys, args) = self.apply_call(sid, ops);
        let reply = eval(&self.client, &SCRIPTS.apply, keys, args).await?;
        parse_applied(reply, ops)
    }

    /// Tells every executor of `pool` to stop working on task `tid` (`exec.cancel` on the
    /// pool's control stream).
    pub async fn cancel_on_executors(
        &self,
        pool: &str,
        sid: &str,
        tid: &str,
        reason: &str,
    ) -> Result<(), ProduceError> {
        let env = Envelope::new(ExecControl::Cancel(ExecCancel {
            session_id: sid.to_owned(),
            task_id: tid.to_owned(),
            reason: reason.to_owned(),
        }));
        producer::send(
            &self.client,
            &self.keys.exec_control(pool),
            Some(CONTROL_MAXLEN),
            &env,
        )
        .await?;
        Ok(())
    }

    /// Marks task `tid`, created a moment ago, as not sent on: the XADD of its request failed
    /// after `create` stored it. A retry of the same submit (its `Idempotency-Key` or task id)
    /// then sends it (`Chat::submit`) instead of answering "duplicate" for a task nobody will
    /// run. The hash's TTL is set again with the field, so a hash that expired in between is
    /// not left behind for good.
    pub async fn mark_unsent(&self, sid: &str, tid: &str) -> Result<(), TaskError> {
        let key = self.keys.task(sid, tid);
        let pipeline = self.client.pipeline();
        let _: () = pipeline.hset(&key, (UNSENT_FIELD, "1")).await?;
        let _: () = pipeline
            .pexpire(&key, self.retention.session_ttl_ms, None)
            .await?;
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }

    /// Clears the mark of [`TaskStore::mark_unsent`] once the task was sent.
    pub async fn clear_unsent(&self, sid: &str, tid: &str) -> Result<(), TaskError> {
        let _: i64 = self
            .client
            .hdel(self.keys.task(sid, tid), UNSENT_FIELD)
            .await?;
        Ok(())
    }

    /// Reads a task.
    pub async fn get(&self, sid: &str, tid: &str) -> Result<Option<TaskView>, TaskError> {
        let h: HashMap<String, String> = self.client.hgetall(self.keys.task(sid, tid)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        Ok(TaskView::from_hash(h))
    }
}

/// Parses the reply of the `apply` script for `ops`, the ops of the call.
pub fn parse_applied(reply: Value, ops: &[TaskOp]) -> Result<Applied, TaskError> {
    let mut parts = reply.into_array().into_iter();
    let (Some(statuses), Some(events), Some(ended), Some(last)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TaskError::Reply("apply returned fewer than 4 parts".into()));
    };
    let statuses = statuses
        .into_array()
        .into_iter()
        .map(|s| OpStatus::parse(&s.as_string().unwrap_or_default()))
        .collect();
    let mut out_events = Vec::new();
    let mut it = events.into_array().into_iter();
    while let (Some(prev), Some(eid), Some(source)) = (it.next(), it.next(), it.next()) {
        // The index (from 1) of the op whose event it is, or the JSON of an op parked earlier.
        let json = match source {
            Value::Integer(i) => usize::try_from(i - 1)
                .ok()
                .and_then(|i| ops.get(i))
                .map(|op| op.event.clone())
                .ok_or_else(|| TaskError::Reply(format!("apply named op {i} of {}", ops.len())))?,
            other => other.as_string().unwrap_or_default(),
        };
        out_events.push(LoggedEvent {
            prev: prev.as_string().unwrap_or_default(),
            event_id: eid.as_string().unwrap_or_default(),
            json,
        });
    }
    let mut out_ended = Vec::new();
    let mut it = ended.into_array().into_iter();
    while let (Some(tid), Some(state), Some(created), Some(pool)) =
        (it.next(), it.next(), it.next(), it.next())
    {
        if let Some(state) = state.as_string().and_then(|s| TaskState::parse(&s)) {
            out_ended.push(EndedTask {
                task_id: tid.as_string().unwrap_or_default(),
                state,
                created_ms: created
                    .as_string()
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0),
                pool: pool.as_string().unwrap_or_default(),
            });
        }
    }
    Ok(Applied {
        statuses,
        events: out_events,
        ended: out_ended,
        last_event_id: last.as_string().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(s));
        }
        assert_eq!(TaskState::parse("nope"), None);
        assert!(TaskState::TimedOut.is_terminal());
        assert!(!TaskState::Running.is_terminal());
    }

    #[test]
    fn apply_calls_declare_each_task_key_once() {
        let store_keys = Keys::new("p");
        let ops = [
            TaskOp::ordered("chunk", "t1", 1, 1, "{}".into()),
            TaskOp::ordered("chunk", "t2", 1, 1, "{}".into()),
            TaskOp::ordered("result", "t1", 1, 2, "{}".into()),
            TaskOp::session("event", "{}".into()),
        ];
        let client = Client::default();
        let store = TaskStore::new(client, store_keys, Retention::default());
        let (keys, args) = store.apply_call("s", &ops);
        assert_eq!(keys.len(), 4);
        assert_eq!(keys[2], "p:{s:s}:task:t1");
        assert_eq!(keys[3], "p:{s:s}:task:t2");
        assert_eq!(args.len(), 3 + 9 * ops.len());
        let op = |n: usize| &args[3 + 9 * n..3 + 9 * (n + 1)];
        assert_eq!(op(2)[0], Value::Integer(3), "t1 again: its first key");
        assert_eq!(op(2)[4], Value::Integer(2), "its seq");
        assert_eq!(
            op(3)[0],
            Value::Integer(0),
            "a session-level op names no task key"
        );
    }
}
