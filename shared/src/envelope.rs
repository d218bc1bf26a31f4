//! The stream entry envelope and the typed messages it carries.
//!
//! Every entry Fleet writes to a command or work stream has the same six fields:
//!
//! | field | holds |
//! |---|---|
//! | `v` | schema version ([`SCHEMA_VERSION`]) |
//! | `kind` | what the body is, e.g. `task.submit` (see the message enums below) |
//! | `id` | UUIDv7 of the entry: the idempotency key of what it asks for |
//! | `tp` | W3C `traceparent` of the span that wrote it (empty when tracing is off) |
//! | `ts` | milliseconds since the Unix epoch when it was written |
//! | `body` | the message, MessagePack with named fields (`rmp_serde::to_vec_named`) |
//!
//! Each stream carries one message enum (a [`Message`]): [`TaskCommand`] on `fleet:tasks`,
//! [`ExecMessage`] on `fleet:exec:<pool>`, [`ExecControl`] on `fleet:exec:<pool>:control`,
//! [`AgentMessage`] on `fleet:agents:<role>` (and `fleet:agents:<role>:member:<id>`),
//! [`AgentControl`] on `fleet:agents:<role>:control`, [`Callback`] on `fleet:callbacks`,
//! [`Outbound`] on `fleet:outbound`, [`DecisionMessage`] on `fleet:decisions`. An entry whose
//! fields or body do not decode is an [`EnvelopeError`], which the consumer loop dead-letters
//! with the error as its reason.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use uuid::Uuid;

use crate::deliberation::{Checks, DeliberationSpec, Rubric};
use crate::time::now_ms;

/// The envelope schema version written in `v`.
pub const SCHEMA_VERSION: u32 = 1;

/// Field names of an envelope entry.
pub mod field {
    pub const V: &str = "v";
    pub const KIND: &str = "kind";
    pub const ID: &str = "id";
    pub const TP: &str = "tp";
    pub const TS: &str = "ts";
    pub const BODY: &str = "body";
}

/// Why an entry could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{field}` is not valid: {reason}")]
    BadField { field: &'static str, reason: String },
    #[error("unsupported schema version {0} (this build reads {SCHEMA_VERSION})")]
    Version(u32),
    #[error("unknown kind `{0}` on this stream")]
    UnknownKind(String),
    #[error("body of `{kind}` does not decode: {source}")]
    Body {
        kind: String,
        #[source]
        source: rmp_serde::decode::Error,
    },
    #[error("body does not encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

/// A family of messages that travel on one stream, one `kind` string per variant.
pub trait Message: Sized + Send + Sync + 'static {
    /// The `kind` written in the envelope.
    fn kind(&self) -> &'static str;
    /// The MessagePack body.
    fn encode_body(&self) -> Result<Vec<u8>, EnvelopeError>;
    /// Decodes a body of `kind`.
    fn decode_body(kind: &str, body: &[u8]) -> Result<Self, EnvelopeError>;
}

/// Declares a message enum whose variants map one-to-one to `kind` strings.
macro_rules! messages {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $kind:literal => $variant:ident($body:ty) ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant($body) ),+
        }

        impl $name {
            /// Every kind this enum carries.
            pub const KINDS: &'static [&'static str] = &[$($kind),+];
        }

        impl Message for $name {
            fn kind(&self) -> &'static str {
                match self { $( Self::$variant(_) => $kind ),+ }
            }

            fn encode_body(&self) -> Result<Vec<u8>, EnvelopeError> {
                match self {
                    $( Self::$variant(b) => Ok(rmp_serde::to_vec_named(b)?) ),+
                }
            }

            fn decode_body(kind: &str, body: &[u8]) -> Result<Self, EnvelopeError> {
                match kind {
                    $( $kind => rmp_serde::from_slice::<$body>(body)
                        .map(Self::$variant)
                        .map_err(|source| EnvelopeError::Body { kind: kind.to_owned(), source }), )+
                    other => Err(EnvelopeError::UnknownKind(other.to_owned())),
                }
            }
        }
    };
}

/// One decoded entry: the envelope header and its typed message.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope<M> {
    /// Idempotency key of the entry (UUIDv7).
    pub id: Uuid,
    /// W3C `traceparent` of the writer's span, if tracing was on.
    pub tp: Option<String>,
    /// When it was written, ms since the epoch.
    pub ts: i64,
    pub msg: M,
}

impl<M: Message> Envelope<M> {
    /// Wraps `msg` with a fresh UUIDv7, the current time and the current span's trace context.
    pub fn new(msg: M) -> Self {
        Self {
            id: Uuid::now_v7(),
            tp: crate::telemetry::current_traceparent(),
            ts: now_ms(),
            msg,
        }
    }

    /// Wraps `msg` with a caller-chosen idempotency key.
    pub fn with_id(id: Uuid, msg: M) -> Self {
        Self {
            id,
            ..Self::new(msg)
        }
    }

    /// The field/value pairs to XADD.
    pub fn to_fields(&self) -> Result<Vec<(&'static str, Bytes)>, EnvelopeError> {
        let body = self.msg.encode_body()?;
        Ok(vec![
            (field::V, Bytes::from(SCHEMA_VERSION.to_string())),
            (field::KIND, Bytes::from_static(self.msg.kind().as_bytes())),
            (field::ID, Bytes::from(self.id.to_string())),
            (
                field::TP,
                Bytes::from(self.tp.clone().unwrap_or_default().into_bytes()),
            ),
            (field::TS, Bytes::from(self.ts.to_string())),
            (field::BODY, Bytes::from(body)),
        ])
    }

    /// Decodes an entry's field/value pairs (in any order; unknown fields are ignored so that
    /// later versions may add some).
    pub fn from_fields(fields: &[(Bytes, Bytes)]) -> Result<Self, EnvelopeError> {
        let get = |name: &'static str| {
            fields
                .iter()
                .find(|(k, _)| k.as_ref() == name.as_bytes())
                .map(|(_, v)| v)
                .ok_or(EnvelopeError::MissingField(name))
        };
        let text = |name: &'static str| -> Result<&str, EnvelopeError> {
            std::str::from_utf8(get(name)?).map_err(|_| EnvelopeError::BadField {
                field: name,
                reason: "not UTF-8".into(),
            })
        };
        let v: u32 = text(field::V)?
            .parse()
            .map_err(|_| EnvelopeError::BadField {
                field: field::V,
                reason: "not an integer".into(),
            })?;
        if v != SCHEMA_VERSION {
            return Err(EnvelopeError::Version(v));
        }
        let kind = text(field::KIND)?;
        let id = Uuid::parse_str(text(field::ID)?).map_err(|e| EnvelopeError::BadField {
            field: field::ID,
            reason: e.to_string(),
        })?;
        let tp = match fields
            .iter()
            .find(|(k, _)| k.as_ref() == field::TP.as_bytes())
        {
            // Only a trace context: one that is not text starts a fresh trace, never fails
            // the entry.
            Some((_, v)) if !v.is_empty() => std::str::from_utf8(v).ok().map(str::to_owned),
            _ => None,
        };
        let ts = text(field::TS)?
            .parse()
            .map_err(|_| EnvelopeError::BadField {
                field: field::TS,
                reason: "not an integer".into(),
            })?;
        let msg = M::decode_body(kind, get(field::BODY)?)?;
        Ok(Self { id, tp, ts, msg })
    }
}

// ---------------------------------------------------------------------------------------------
// fleet:tasks
// ---------------------------------------------------------------------------------------------

/// A user message to run as a task (`task.submit`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSubmit {
    pub session_id: String,
    pub task_id: String,
    pub agent_id: String,
    pub attempt: u32,
    pub message: String,
    #[serde(default)]
    pub metadata: Json,
    /// Absolute deadline, ms since the epoch.
    pub deadline_ms: i64,
    /// Where the message came from: `rest`, `ws` or `grpc`.
    #[serde(default)]
    pub source: String,
}

/// Cancel a task (`task.cancel`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskCancel {
    pub session_id: String,
    pub task_id: String,
    #[serde(default)]
    pub reason: String,
}

/// Close a session and cancel its open tasks (`session.close`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionClose {
    pub session_id: String,
    #[serde(default)]
    pub reason: String,
}

/// A planning-side event (`planning.event`), e.g. a story moving to BUILD. Arrives from NATS
/// `agile.events` through nats-bridge; the dispatcher derives atomic subtasks from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanningEvent {
    /// Where the event came from, unique per event (e.g. `agile.events:<stream sequence>` or the
    /// publisher's `Nats-Msg-Id`).
    pub event_id: String,
    /// `TRANSITION`, ...
    pub event_type: String,
    pub case_id: String,
    #[serde(default)]
    pub plan_id: String,
    #[serde(default)]
    pub from_state: String,
    #[serde(default)]
    pub to_state: String,
    /// When the planning side says it happened (as it sent it).
    #[serde(default)]
    pub timestamp: String,
    #[serde(default)]
    pub metadata: Json,
}

messages! {
    /// Commands on `fleet:tasks`, consumed by the dispatchers.
    pub enum TaskCommand {
        "task.submit" => Submit(TaskSubmit),
        "task.cancel" => Cancel(TaskCancel),
        "session.close" => SessionClose(SessionClose),
        "planning.event" => PlanningEvent(PlanningEvent),
        /// Start a deliberation (`task.deliberate`): the body is the whole spec, so any writer
        /// can start one; the dispatcher creates the deliberation hash if the writer did not.
        "task.deliberate" => Deliberate(DeliberationSpec),
    }
}

// ---------------------------------------------------------------------------------------------
// fleet:exec:<pool> and its control stream
// ---------------------------------------------------------------------------------------------

/// Run a chat task (`exec.request`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub session_id: String,
    pub task_id: String,
    pub attempt: u32,
    pub agent_id: String,
    pub message: String,
    #[serde(default)]
    pub metadata: Json,
    /// The agent's configured parameters (model, temperature, command, ...).
    #[serde(default)]
    pub params: Json,
    /// Absolute deadline, ms since the epoch; the executor stops at it.
    pub deadline_ms: i64,
}

/// Stop working on a task (`exec.cancel`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecCancel {
    pub session_id: String,
    pub task_id: String,
    #[serde(default)]
    pub reason: String,
}

messages! {
    /// Work on `fleet:exec:<pool>`, consumed by the executors of that pool.
    pub enum ExecMessage {
        "exec.request" => Request(ExecRequest),
    }
}

messages! {
    /// Control entries on `fleet:exec:<pool>:control`, read (without a group) by every executor.
    pub enum ExecControl {
        "exec.cancel" => Cancel(ExecCancel),
    }
}

// ---------------------------------------------------------------------------------------------
// fleet:agents:<role> (and :member:<agent_id>) and its control stream
// ---------------------------------------------------------------------------------------------

/// What an agent request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentAction {
    /// Round 1 of a deliberation: write a proposal (answer: `proposal`).
    Propose,
    /// A review round: revise your proposal after reading `peers` (answer: `proposal`).
    Review,
    /// Architect step: choose the best of `peers`, the top candidates (answer: `selection`).
    Select,
    /// A subtask derived from a planning event, tracked as task `task_id` of session
    /// `session_id` (answer: ordinary `started` / `chunk` / `result` / `error` callbacks).
    Subtask,
}

impl AgentAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentAction::Propose => "propose",
            AgentAction::Review => "review",
            AgentAction::Select => "select",
            AgentAction::Subtask => "subtask",
        }
    }
}

/// A proposal an agent sees: a peer's (review rounds) or a candidate's (selection).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerProposal {
    /// `<deliberation>:<round>:<member>`.
    #[serde(default)]
    pub proposal_id: String,
    pub member: String,
    pub content: String,
    /// Score and rank, for candidates (0 for peers, which are not scored yet).
    #[serde(default)]
    pub score: f64,
    #[serde(default)]
    pub rank: u32,
}

/// Work for a council agent (`agent.request`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRequest {
    pub action: AgentAction,
    /// DEV, QA, ARCHITECT, DEVOPS or DATA.
    pub role: String,
    /// The council member the request is for (a registered agent id or a pool seat such as
    /// `DEV-2`); answers carry it back. Empty for subtasks.
    #[serde(default)]
    pub member: String,
    /// The deliberation (empty for subtasks).
    #[serde(default)]
    pub deliberation_id: String,
    /// Round of the deliberation, from 1.
    #[serde(default)]
    pub round: u32,
    #[serde(default)]
    pub rounds: u32,
    /// The task to solve.
    pub description: String,
    #[serde(default)]
    pub requirements: Vec<String>,
    #[serde(default)]
    pub rubric: Rubric,
    /// Constraint metadata and custom parameters.
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Hydrated context from the Context service (empty when none).
    #[serde(default)]
    pub context: String,
    /// Review: the peers' proposals of the previous round. Select: the candidates, best first.
    #[serde(default)]
    pub peers: Vec<PeerProposal>,
    /// Subtask: the session and task it is tracked as (answers carry them back).
    #[serde(default)]
    pub session_id: String,
    #[serde(default)]
    pub task_id: String,
    #[serde(default)]
    pub attempt: u32,
    /// Subtask: what to do (`implement`, `test`, `deploy`, ...).
    #[serde(default)]
    pub task_action: String,
    /// Subtask: task ids it depends on.
    #[serde(default)]
    pub dependencies: Vec<String>,
    /// Subtask: 1 = highest.
    #[serde(default)]
    pub priority: u32,
    /// Absolute deadline, ms since the epoch; the agent stops at it.
    pub deadline_ms: i64,
}

/// Stop working on a deliberation (`agent.cancel`): sent to the members that did not answer
/// before the deadline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentCancel {
    pub deliberation_id: String,
    /// The member to stop; empty: every member.
    #[serde(default)]
    pub member: String,
    #[serde(default)]
    pub reason: String,
}

messages! {
    /// Work on `fleet:agents:<role>` (the role's pool, group `executors`) and
    /// `fleet:agents:<role>:member:<agent_id>` (one registered member, group `executors`).
    pub enum AgentMessage {
        "agent.request" => Request(AgentRequest),
    }
}

messages! {
    /// Control entries on `fleet:agents:<role>:control`, read (without a group) by every agent
    /// of the role.
    pub enum AgentControl {
        "agent.cancel" => Cancel(AgentCancel),
    }
}

// ---------------------------------------------------------------------------------------------
// fleet:callbacks
// ---------------------------------------------------------------------------------------------

/// A council member's proposal for one round of a deliberation (`proposal`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProposalCallback {
    pub deliberation_id: String,
    /// The member the request named.
    pub member: String,
    pub round: u32,
    /// Which process answered (its agent id, or its consumer name).
    #[serde(default)]
    pub agent_id: String,
    pub content: String,
    /// The checks the agent ran (policy, lint, dry-run, extra ones); those not run are absent.
    #[serde(default)]
    pub checks: Checks,
    /// The agent's own assessment, 0..1 (counts only when the rubric weighs it).
    #[serde(default)]
    pub self_score: Option<f64>,
    #[serde(default)]
    pub metadata: Json,
}

/// The architect's choice among the candidates (`selection`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelectionCallback {
    pub deliberation_id: String,
    /// The architect member the request named.
    pub member: String,
    /// The chosen candidate's member id (or its proposal id).
    pub winner: String,
    #[serde(default)]
    pub rationale: String,
}

/// The executor began the task (`started`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub session_id: String,
    pub task_id: String,
    pub attempt: u32,
    /// Position of this callback among the task attempt's callbacks, from 1. 0 means
    /// "unordered": applied on arrival while the task is open (for executors that cannot
    /// number their callbacks, e.g. NATS-side runners sending one final answer).
    pub seq: u32,
    #[serde(default)]
    pub executor: String,
}

/// A piece of the answer (`chunk`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub session_id: String,
    pub task_id: String,
    pub attempt: u32,
    pub seq: u32,
    /// Position of this chunk among the task's chunks, from 0.
    pub index: u32,
    pub content: String,
}

/// How far along the task is (`progress`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub session_id: String,
    pub task_id: String,
    pub attempt: u32,
    pub seq: u32,
    #[serde(default)]
    pub percent: f32,
    #[serde(default)]
    pub step: String,
}

/// The final answer (`result`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub session_id: String,
    pub task_id: String,
    pub attempt: u32,
    pub seq: u32,
    /// The whole answer.
    pub content: String,
    #[serde(default)]
    pub metadata: Json,
}

/// The task failed (`error`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskFailure {
    pub session_id: String,
    pub task_id: String,
    pub attempt: u32,
    pub seq: u32,
    /// A short machine-readable class, e.g. `execution_error`, `exit_status`, `timeout`.
    pub error_type: String,
    pub message: String,
    #[serde(default)]
    pub details: Json,
}

messages! {
    /// Executor -> orchestrator callbacks on `fleet:callbacks`.
    pub enum Callback {
        "started" => Started(Started),
        "chunk" => Chunk(Chunk),
        "progress" => Progress(Progress),
        "result" => Result(TaskResult),
        "error" => Error(TaskFailure),
        "proposal" => Proposal(ProposalCallback),
        "selection" => Selection(SelectionCallback),
        "batch" => Batch(CallbackBatch),
    }
}

/// Task callbacks of one task attempt in one entry (`batch`), in the order they were written:
/// what an executor has ready at once, e.g. `started`, the chunks and `result` of an instant
/// answer. One plain XADD writes it and the callback-worker reads, decodes and acks one entry,
/// where one entry per callback needed a script to reach the callback-worker in one read
/// (docs/performance.md).
///
/// On the wire: `{"callbacks": [{"kind": <kind>, "body": <the callback's body, MessagePack
/// bytes>}, ...]}`. It holds at least one callback, only task callbacks (no `proposal`,
/// `selection` or `batch`), all of one `(session_id, task_id, attempt)`; a batch that breaks
/// these rules does not decode.
#[derive(Clone, Debug, PartialEq)]
pub struct CallbackBatch(Vec<Callback>);

impl CallbackBatch {
    /// `callbacks` as one batch, or why they cannot be one.
    pub fn new(callbacks: Vec<Callback>) -> Result<Self, String> {
        let Some(first) = callbacks.first() else {
            return Err("a batch holds at least one callback".into());
        };
        let (sid, tid, attempt, _) = first.position();
        for cb in &callbacks {
            if matches!(
                cb,
                Callback::Proposal(_) | Callback::Selection(_) | Callback::Batch(_)
            ) {
                return Err(format!(
                    "a batch holds task callbacks only, not `{}`",
                    cb.kind()
                ));
            }
            let (s, t, a, _) = cb.position();
            if (s, t, a) != (sid, tid, attempt) {
                return Err("the callbacks of a batch are of one task attempt".into());
            }
        }
        Ok(Self(callbacks))
    }

    /// The callbacks, in order.
    pub fn callbacks(&self) -> &[Callback] {
        &self.0
    }
}

/// A [`CallbackBatch`] as MessagePack sees it.
#[derive(Serialize, Deserialize)]
struct BatchWire {
    callbacks: Vec<BatchItem>,
}

#[derive(Serialize, Deserialize)]
struct BatchItem {
    kind: String,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

impl Serialize for CallbackBatch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let callbacks = self
            .0
            .iter()
            .map(|cb| {
                Ok(BatchItem {
                    kind: cb.kind().to_owned(),
                    body: cb.encode_body().map_err(serde::ser::Error::custom)?,
                })
            })
            .collect::<Result<_, S::Error>>()?;
        BatchWire { callbacks }.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for CallbackBatch {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = BatchWire::deserialize(deserializer)?;
        let callbacks = wire
            .callbacks
            .iter()
            .map(|item| Callback::decode_body(&item.kind, &item.body))
            .collect::<Result<Vec<_>, _>>()
            .map_err(serde::de::Error::custom)?;
        Self::new(callbacks).map_err(serde::de::Error::custom)
    }
}

impl Callback {
    /// `(session_id, task_id, attempt, seq)` of the callback. Deliberation callbacks
    /// (`proposal`, `selection`) belong to no session: `("", deliberation_id, round, 0)`. A
    /// batch is at the position of its first callback.
    pub fn position(&self) -> (&str, &str, u32, u32) {
        match self {
            Callback::Batch(b) => b.0[0].position(),
            Callback::Started(c) => (&c.session_id, &c.task_id, c.attempt, c.seq),
            Callback::Chunk(c) => (&c.session_id, &c.task_id, c.attempt, c.seq),
            Callback::Progress(c) => (&c.session_id, &c.task_id, c.attempt, c.seq),
            Callback::Result(c) => (&c.session_id, &c.task_id, c.attempt, c.seq),
            Callback::Error(c) => (&c.session_id, &c.task_id, c.attempt, c.seq),
            Callback::Proposal(c) => ("", &c.deliberation_id, c.round, 0),
            Callback::Selection(c) => ("", &c.deliberation_id, 0, 0),
        }
    }

    /// The callbacks this entry carries, in order: a batch's, or itself.
    pub fn unbatched(&self) -> &[Callback] {
        match self {
            Callback::Batch(b) => b.callbacks(),
            _ => std::slice::from_ref(self),
        }
    }

    /// The deliberation a `proposal` or `selection` is for; `None` for task callbacks.
    pub fn deliberation_id(&self) -> Option<&str> {
        match self {
            Callback::Proposal(c) => Some(&c.deliberation_id),
            Callback::Selection(c) => Some(&c.deliberation_id),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// fleet:outbound
// ---------------------------------------------------------------------------------------------

/// A message for nats-bridge to publish to NATS JetStream (`nats.publish`). The bridge sets
/// `Nats-Msg-Id` to the envelope id, so JetStream drops a republished duplicate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NatsPublish {
    /// The subject, e.g. `agent.requests` or `orchestrator.events`.
    pub subject: String,
    /// The JSON payload, as text (what NATS-side services in any language read).
    pub payload: String,
    /// Extra NATS headers (`traceparent` is added from the envelope's `tp`).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

messages! {
    /// What nats-bridge publishes, on `fleet:outbound` (group `bridge`).
    pub enum Outbound {
        "nats.publish" => Publish(NatsPublish),
    }
}

// ---------------------------------------------------------------------------------------------
// fleet:decisions
// ---------------------------------------------------------------------------------------------

/// One proposal of a decision, summarised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alternative {
    pub proposal_id: String,
    pub member: String,
    pub score: f64,
    pub rank: u32,
    pub all_passed: bool,
}

/// The outcome of a completed deliberation (`deliberation.decision`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub deliberation_id: String,
    /// `deliberate` or `orchestrate`.
    pub kind: String,
    pub role: String,
    #[serde(default)]
    pub case_id: String,
    #[serde(default)]
    pub story_id: String,
    #[serde(default)]
    pub plan_id: String,
    /// The winning member, its proposal id, content and score.
    pub winner: String,
    pub winner_id: String,
    pub winner_content: String,
    pub score: f64,
    /// `score` (top score) or `architect:<member>`.
    pub selected_by: String,
    /// Every proposal, best first (the winner included).
    pub alternatives: Vec<Alternative>,
    pub decided_ms: i64,
    pub duration_ms: i64,
}

messages! {
    /// Deliberation decisions on `fleet:decisions` (capped; read by whoever keeps decisions,
    /// e.g. a graph store). The same decision goes to NATS `orchestrator.events`.
    pub enum DecisionMessage {
        "deliberation.decision" => Decision(Decision),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json_leaf() -> impl Strategy<Value = Json> {
        prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            ".{0,12}".prop_map(Json::String),
        ]
    }

    fn json() -> impl Strategy<Value = Json> {
        json_leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    fn ids() -> impl Strategy<Value = String> {
        "[a-z0-9-]{1,36}"
    }

    fn task_command() -> impl Strategy<Value = TaskCommand> {
        prop_oneof![
            (
                ids(),
                ids(),
                ids(),
                1u32..9,
                ".{0,64}",
                json(),
                any::<i64>(),
                "rest|ws|grpc"
            )
                .prop_map(|(s, t, a, attempt, m, md, d, src)| {
                    TaskCommand::Submit(TaskSubmit {
                        session_id: s,
                        task_id: t,
                        agent_id: a,
                        attempt,
                        message: m,
                        metadata: md,
                        deadline_ms: d,
                        source: src,
                    })
                }),
            (ids(), ids(), ".{0,16}").prop_map(|(s, t, r)| TaskCommand::Cancel(TaskCancel {
                session_id: s,
                task_id: t,
                reason: r
            })),
            (ids(), ".{0,16}").prop_map(|(s, r)| TaskCommand::SessionClose(SessionClose {
                session_id: s,
                reason: r
            })),
            (
                ids(),
                "[A-Z]{1,10}",
                ids(),
                ids(),
                "[A-Z]{0,8}",
                "[A-Z]{0,8}",
                json()
            )
                .prop_map(|(e, t, c, p, f, to, md)| TaskCommand::PlanningEvent(
                    PlanningEvent {
                        event_id: e,
                        event_type: t,
                        case_id: c,
                        plan_id: p,
                        from_state: f,
                        to_state: to,
                        timestamp: "2026-11-21T12:00:00Z".into(),
                        metadata: md,
                    }
                )),
        ]
    }

    fn finite() -> impl Strategy<Value = f64> {
        -1.0e6f64..1.0e6
    }

    fn check() -> impl Strategy<Value = crate::deliberation::Check> {
        (any::<bool>(), proptest::option::of(finite()), ".{0,8}").prop_map(
            |(passed, score, message)| crate::deliberation::Check {
                passed,
                score,
                message,
            },
        )
    }

    fn checks() -> impl Strategy<Value = Checks> {
        (
            proptest::option::of(check()),
            proptest::option::of(check()),
            proptest::option::of(check()),
            prop::collection::btree_map("[a-z_]{1,8}", check(), 0..3),
        )
            .prop_map(|(policy, lint, dry_run, extra)| Checks {
                policy,
                lint,
                dry_run,
                extra,
            })
    }

    fn rubric() -> impl Strategy<Value = Rubric> {
        (
            ".{0,16}",
            prop::collection::btree_map("[a-z_]{1,8}", finite(), 0..3),
            finite(),
        )
            .prop_map(|(description, weights, self_score_weight)| Rubric {
                description,
                weights,
                self_score_weight,
            })
    }

    fn spec() -> impl Strategy<Value = DeliberationSpec> {
        (
            (
                ids(),
                "deliberate|orchestrate",
                "DEV|QA|ARCHITECT",
                ".{0,64}",
            ),
            (1u32..17, 1u32..17, 1u32..6, any::<i64>(), any::<i64>()),
            rubric(),
            prop::collection::vec(".{0,16}", 0..3),
            prop::collection::btree_map("[a-z]{1,6}", ".{0,8}", 0..3),
            (0u32..11, ids(), ids(), ids()),
        )
            .prop_map(
                |(
                    (deliberation_id, kind, role, description),
                    (num_agents, quorum, rounds, deadline_ms, created_ms),
                    rubric,
                    requirements,
                    metadata,
                    (architect_top_k, case_id, story_id, plan_id),
                )| DeliberationSpec {
                    deliberation_id,
                    kind,
                    role,
                    description,
                    num_agents,
                    quorum,
                    rounds,
                    deadline_ms,
                    rubric,
                    requirements,
                    metadata,
                    architect_top_k,
                    case_id,
                    story_id,
                    plan_id,
                    created_ms,
                },
            )
    }

    fn peer() -> impl Strategy<Value = PeerProposal> {
        (ids(), ids(), ".{0,32}", finite(), 0u32..9).prop_map(
            |(proposal_id, member, content, score, rank)| PeerProposal {
                proposal_id,
                member,
                content,
                score,
                rank,
            },
        )
    }

    fn agent_request() -> impl Strategy<Value = AgentRequest> {
        (
            prop_oneof![
                Just(AgentAction::Propose),
                Just(AgentAction::Review),
                Just(AgentAction::Select),
                Just(AgentAction::Subtask)
            ],
            ("DEV|QA", ids(), ids(), 0u32..6, 0u32..6, ".{0,64}"),
            (
                prop::collection::vec(".{0,16}", 0..3),
                rubric(),
                prop::collection::btree_map("[a-z]{1,6}", ".{0,8}", 0..3),
                ".{0,16}",
                prop::collection::vec(peer(), 0..3),
            ),
            (
                ids(),
                ids(),
                0u32..3,
                "[a-z]{0,8}",
                prop::collection::vec(ids(), 0..3),
            ),
            (0u32..5, any::<i64>()),
        )
            .prop_map(
                |(
                    action,
                    (role, member, deliberation_id, round, rounds, description),
                    (requirements, rubric, metadata, context, peers),
                    (session_id, task_id, attempt, task_action, dependencies),
                    (priority, deadline_ms),
                )| AgentRequest {
                    action,
                    role,
                    member,
                    deliberation_id,
                    round,
                    rounds,
                    description,
                    requirements,
                    rubric,
                    metadata,
                    context,
                    peers,
                    session_id,
                    task_id,
                    attempt,
                    task_action,
                    dependencies,
                    priority,
                    deadline_ms,
                },
            )
    }

    fn deliberation_callback() -> impl Strategy<Value = Callback> {
        prop_oneof![
            (
                (ids(), ids(), 1u32..6, ids(), ".{0,64}"),
                checks(),
                proptest::option::of(finite()),
                json()
            )
                .prop_map(
                    |(
                        (deliberation_id, member, round, agent_id, content),
                        checks,
                        self_score,
                        metadata,
                    )| {
                        Callback::Proposal(ProposalCallback {
                            deliberation_id,
                            member,
                            round,
                            agent_id,
                            content,
                            checks,
                            self_score,
                            metadata,
                        })
                    }
                ),
            (ids(), ids(), ids(), ".{0,32}").prop_map(
                |(deliberation_id, member, winner, rationale)| {
                    Callback::Selection(SelectionCallback {
                        deliberation_id,
                        member,
                        winner,
                        rationale,
                    })
                }
            ),
        ]
    }

    fn decision() -> impl Strategy<Value = Decision> {
        (
            (
                ids(),
                "deliberate|orchestrate",
                "DEV|QA",
                ids(),
                ids(),
                ids(),
            ),
            (
                ids(),
                ids(),
                ".{0,32}",
                finite(),
                "score|architect:[a-z]{1,4}",
            ),
            prop::collection::vec(
                (ids(), ids(), finite(), 1u32..9, any::<bool>()).prop_map(
                    |(proposal_id, member, score, rank, all_passed)| Alternative {
                        proposal_id,
                        member,
                        score,
                        rank,
                        all_passed,
                    },
                ),
                0..4,
            ),
            (any::<i64>(), any::<i64>()),
        )
            .prop_map(
                |(
                    (deliberation_id, kind, role, case_id, story_id, plan_id),
                    (winner, winner_id, winner_content, score, selected_by),
                    alternatives,
                    (decided_ms, duration_ms),
                )| Decision {
                    deliberation_id,
                    kind,
                    role,
                    case_id,
                    story_id,
                    plan_id,
                    winner,
                    winner_id,
                    winner_content,
                    score,
                    selected_by,
                    alternatives,
                    decided_ms,
                    duration_ms,
                },
            )
    }

    fn callback() -> impl Strategy<Value = Callback> {
        (ids(), ids(), 1u32..5, 1u32..1000).prop_flat_map(|(s, t, a, seq)| {
            prop_oneof![
                ".{0,8}".prop_map({
                    let (s, t) = (s.clone(), t.clone());
                    move |e| {
                        Callback::Started(Started {
                            session_id: s.clone(),
                            task_id: t.clone(),
                            attempt: a,
                            seq,
                            executor: e,
                        })
                    }
                }),
                (0u32..100, ".{0,32}").prop_map({
                    let (s, t) = (s.clone(), t.clone());
                    move |(index, content)| {
                        Callback::Chunk(Chunk {
                            session_id: s.clone(),
                            task_id: t.clone(),
                            attempt: a,
                            seq,
                            index,
                            content,
                        })
                    }
                }),
                (".{0,32}", json()).prop_map({
                    let (s, t) = (s.clone(), t.clone());
                    move |(content, metadata)| {
                        Callback::Result(TaskResult {
                            session_id: s.clone(),
                            task_id: t.clone(),
                            attempt: a,
                            seq,
                            content,
                            metadata,
                        })
                    }
                }),
                ("[a-z_]{1,12}", ".{0,32}", json()).prop_map({
                    let (s, t) = (s.clone(), t.clone());
                    move |(error_type, message, details)| {
                        Callback::Error(TaskFailure {
                            session_id: s.clone(),
                            task_id: t.clone(),
                            attempt: a,
                            seq,
                            error_type,
                            message,
                            details,
                        })
                    }
                }),
            ]
        })
    }

    /// Moves a task callback to task attempt `(s, t, a)`.
    fn move_to(cb: &mut Callback, s: &str, t: &str, a: u32) {
        let (sid, tid, attempt) = match cb {
            Callback::Started(c) => (&mut c.session_id, &mut c.task_id, &mut c.attempt),
            Callback::Chunk(c) => (&mut c.session_id, &mut c.task_id, &mut c.attempt),
            Callback::Result(c) => (&mut c.session_id, &mut c.task_id, &mut c.attempt),
            Callback::Error(c) => (&mut c.session_id, &mut c.task_id, &mut c.attempt),
            _ => unreachable!("callback() makes task callbacks only"),
        };
        (*sid, *tid, *attempt) = (s.to_owned(), t.to_owned(), a);
    }

    /// Batches of one to four task callbacks of one task attempt.
    fn batch() -> impl Strategy<Value = Vec<Callback>> {
        prop::collection::vec(callback(), 1..5).prop_map(|mut cbs| {
            let (s, t, a, _) = cbs[0].position();
            let (s, t) = (s.to_owned(), t.to_owned());
            for cb in &mut cbs[1..] {
                move_to(cb, &s, &t, a);
            }
            cbs
        })
    }

    /// A `batch` body holding `cbs` as they are (no checks).
    fn raw_batch(cbs: &[Callback]) -> Vec<u8> {
        let callbacks = cbs
            .iter()
            .map(|cb| BatchItem {
                kind: cb.kind().to_owned(),
                body: cb.encode_body().unwrap(),
            })
            .collect();
        rmp_serde::to_vec_named(&BatchWire { callbacks }).unwrap()
    }

    fn roundtrip<M: Message + PartialEq + std::fmt::Debug + Clone>(msg: M, tp: Option<String>) {
        let env = Envelope {
            id: Uuid::now_v7(),
            tp,
            ts: 1_700_000_000_123,
            msg,
        };
        let fields: Vec<(Bytes, Bytes)> = env
            .to_fields()
            .unwrap()
            .into_iter()
            .map(|(k, v)| (Bytes::from_static(k.as_bytes()), v))
            .collect();
        let back = Envelope::<M>::from_fields(&fields).unwrap();
        assert_eq!(back, env);
    }

    proptest! {
        #[test]
        fn task_commands_round_trip(msg in task_command(), tp in proptest::option::of("00-[0-9a-f]{32}-[0-9a-f]{16}-01")) {
            roundtrip(msg, tp);
        }

        #[test]
        fn callbacks_round_trip(msg in callback()) {
            roundtrip(msg, None);
        }

        #[test]
        fn batches_round_trip_in_order(cbs in batch()) {
            let msg = Callback::Batch(CallbackBatch::new(cbs.clone()).unwrap());
            prop_assert_eq!(msg.unbatched(), &cbs[..]);
            prop_assert_eq!(msg.position(), cbs[0].position());
            roundtrip(msg, None);
        }

        #[test]
        fn deliberation_commands_round_trip(spec in spec()) {
            roundtrip(TaskCommand::Deliberate(spec), None);
        }

        #[test]
        fn agent_messages_round_trip(req in agent_request(), id in ids(), member in "[a-z0-9-]{0,8}", reason in ".{0,16}") {
            roundtrip(AgentMessage::Request(req), None);
            roundtrip(AgentControl::Cancel(AgentCancel { deliberation_id: id, member, reason }), None);
        }

        #[test]
        fn deliberation_callbacks_round_trip(msg in deliberation_callback()) {
            prop_assert!(msg.deliberation_id().is_some());
            roundtrip(msg, None);
        }

        #[test]
        fn decisions_round_trip(d in decision()) {
            roundtrip(DecisionMessage::Decision(d), None);
        }

        #[test]
        fn outbound_round_trips(subject in "[a-z.]{1,20}", payload in ".{0,64}", headers in prop::collection::btree_map("[a-z-]{1,8}", ".{0,8}", 0..3)) {
            roundtrip(Outbound::Publish(NatsPublish { subject, payload, headers }), None);
        }

        #[test]
        fn arbitrary_bodies_never_panic(kind in "[a-z.]{1,16}", body in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = TaskCommand::decode_body(&kind, &body);
            let _ = Callback::decode_body(&kind, &body);
            let _ = AgentMessage::decode_body(&kind, &body);
            let _ = DecisionMessage::decode_body(&kind, &body);
        }
    }

    #[test]
    fn a_batch_that_breaks_the_rules_does_not_decode_and_says_why() {
        let cb = |tid: &str, seq| {
            Callback::Started(Started {
                session_id: "s".into(),
                task_id: tid.into(),
                attempt: 1,
                seq,
                executor: String::new(),
            })
        };
        let selection = Callback::Selection(SelectionCallback {
            deliberation_id: "d".into(),
            member: "m".into(),
            winner: "w".into(),
            rationale: String::new(),
        });
        let nested = Callback::Batch(CallbackBatch::new(vec![cb("t", 1)]).unwrap());
        for (cbs, why) in [
            (vec![], "at least one"),
            (vec![cb("t", 1), cb("u", 2)], "one task attempt"),
            (vec![cb("t", 1), selection], "not `selection`"),
            (vec![nested], "not `batch`"),
        ] {
            let err = Callback::decode_body("batch", &raw_batch(&cbs)).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        }
        assert_eq!(
            Callback::decode_body("batch", &raw_batch(&[cb("t", 1), cb("t", 2)]))
                .unwrap()
                .unbatched(),
            [cb("t", 1), cb("t", 2)]
        );
    }

    #[test]
    fn a_body_of_the_wrong_shape_is_a_clear_error() {
        let body = rmp_serde::to_vec_named(&TaskCancel {
            session_id: "s".into(),
            task_id: "t".into(),
            reason: String::new(),
        })
        .unwrap();
        let err = TaskCommand::decode_body("task.submit", &body).unwrap_err();
        assert!(err.to_string().contains("task.submit"), "{err}");
    }

    #[test]
    fn an_entry_whose_trace_context_is_not_text_still_decodes_without_it() {
        let env = Envelope::with_id(
            Uuid::now_v7(),
            TaskCommand::Cancel(TaskCancel {
                session_id: "s".into(),
                task_id: "t".into(),
                reason: String::new(),
            }),
        );
        let fields: Vec<(Bytes, Bytes)> = env
            .to_fields()
            .unwrap()
            .into_iter()
            .map(|(k, v)| match k {
                field::TP => (
                    Bytes::from_static(b"tp"),
                    Bytes::from_static(b"00-\xff\xfe"),
                ),
                _ => (Bytes::from_static(k.as_bytes()), v),
            })
            .collect();
        let back = Envelope::<TaskCommand>::from_fields(&fields).expect("the entry decodes");
        assert_eq!(back.tp, None);
        assert_eq!(back.msg, env.msg);
    }

    #[test]
    fn unknown_kinds_and_versions_are_rejected() {
        let env = Envelope::with_id(
            Uuid::now_v7(),
            TaskCommand::Cancel(TaskCancel {
                session_id: "s".into(),
                task_id: "t".into(),
                reason: String::new(),
            }),
        );
        let mut fields: Vec<(Bytes, Bytes)> = env
            .to_fields()
            .unwrap()
            .into_iter()
            .map(|(k, v)| (Bytes::from_static(k.as_bytes()), v))
            .collect();
        assert!(matches!(
            Callback::decode_body("task.cancel", b""),
            Err(EnvelopeError::UnknownKind(_))
        ));
        fields[0].1 = Bytes::from_static(b"2");
        assert!(matches!(
            Envelope::<TaskCommand>::from_fields(&fields),
            Err(EnvelopeError::Version(2))
        ));
        fields.remove(0);
        assert!(matches!(
            Envelope::<TaskCommand>::from_fields(&fields),
            Err(EnvelopeError::MissingField("v"))
        ));
    }
}
