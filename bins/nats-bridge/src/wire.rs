//! The JSON that travels on NATS, as typed structs, and its mapping to Fleet's envelope kinds.
//!
//! NATS-side services are written in any language, so everything the bridge reads from or
//! writes to NATS is JSON. Each inbound payload is parsed into a typed struct, validated, and
//! mapped to the message of a Fleet stream; anything that fails is a [`Rejected`] with a reason
//! in words (the bridge dead-letters it and terminates the NATS message). Unknown fields are
//! ignored, so publishers may send more than Fleet reads.
//!
//! | NATS subject (default) | JSON | Fleet |
//! |---|---|---|
//! | `agile.events` | [`AgileEvent`] | `planning.event` on `fleet:tasks` |
//! | `agent.responses` | [`AgentResponse`] | `started` / `progress` / `chunk` / `result` / `error` / `proposal` / `selection` on `fleet:callbacks` |
//! | `agent.requests` | [`AgentRequest`] (checked, published as written) | from `nats.publish` on `fleet:outbound` |
//! | any other subject | any JSON value (checked, published as written) | from `nats.publish` on `fleet:outbound` |

use std::collections::BTreeSet;

use fleet::deliberation::Checks;
use fleet::envelope::{
    Callback, Chunk, PlanningEvent, Progress, ProposalCallback, SelectionCallback, Started,
    TaskCommand, TaskFailure, TaskResult,
};
use fleet::planning::validate_event;
use serde::Deserialize;
use serde_json::Value as Json;

/// Longest id (case, plan, task, session, event type, state) accepted from NATS. Planning
/// events are held to the dispatcher's stricter rules on top (see [`planning_event`]).
pub const MAX_ID_LEN: usize = 256;

/// Event types accepted on `agile.events` unless configured otherwise.
pub const DEFAULT_EVENT_TYPES: &[&str] = &["TRANSITION", "CREATED", "UPDATED", "DELETED"];

/// Why a NATS payload was not accepted; the text is the dead letter's `reason`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

impl Rejected {
    fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }
}

type Result<T> = std::result::Result<T, Rejected>;

fn parse<'a, T: Deserialize<'a>>(what: &str, payload: &'a [u8]) -> Result<T> {
    serde_json::from_slice(payload).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            Rejected::new(format!("{what} is not valid JSON: {e}"))
        } else {
            Rejected::new(format!("{what} does not have the expected shape: {e}"))
        }
    })
}

/// A required, bounded, non-blank id.
fn id(field: &str, value: &str) -> Result<String> {
    let v = value.trim();
    if v.is_empty() {
        return Err(Rejected::new(format!("`{field}` is missing or empty")));
    }
    if v.len() > MAX_ID_LEN {
        return Err(Rejected::new(format!(
            "`{field}` is longer than {MAX_ID_LEN} bytes"
        )));
    }
    Ok(v.to_owned())
}

/// An optional, bounded id (empty when absent).
fn opt_id(field: &str, value: Option<&str>) -> Result<String> {
    match value.map(str::trim) {
        None | Some("") => Ok(String::new()),
        Some(v) => id(field, v),
    }
}

/// A timestamp as the publisher sent it: RFC 3339 text, or a number (epoch seconds or ms).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Timestamp {
    Text(String),
    Number(serde_json::Number),
}

impl Timestamp {
    fn into_text(self) -> String {
        match self {
            Timestamp::Text(s) => s,
            Timestamp::Number(n) => n.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// agile.events
// ---------------------------------------------------------------------------------------------

/// A planning event on `agile.events`, e.g.
/// `{"event_type": "TRANSITION", "case_id": "US-123", "from": "DRAFT", "to": "BUILD"}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct AgileEvent {
    /// One of the configured event types (case-insensitive; default TRANSITION, CREATED,
    /// UPDATED, DELETED).
    pub event_type: String,
    /// The story / case the event is about.
    pub case_id: String,
    #[serde(default)]
    pub plan_id: Option<String>,
    /// The state left (`from_state` is accepted too).
    #[serde(default, alias = "from_state")]
    pub from: Option<String>,
    /// The state entered (`to_state` is accepted too); required for TRANSITION.
    #[serde(default, alias = "to_state")]
    pub to: Option<String>,
    /// When it happened, as the publisher says (RFC 3339 text or an epoch number).
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
    /// Anything else the planning side wants to pass on.
    #[serde(default)]
    pub metadata: Option<Json>,
}

/// The event types `agile.events` accepts, upper-cased.
#[derive(Clone, Debug)]
pub struct EventTypes(BTreeSet<String>);

impl EventTypes {
    pub fn new<S: AsRef<str>>(types: impl IntoIterator<Item = S>) -> Self {
        Self(
            types
                .into_iter()
                .map(|t| t.as_ref().trim().to_ascii_uppercase())
                .filter(|t| !t.is_empty())
                .collect(),
        )
    }

    fn canonical(&self, t: &str) -> Option<String> {
        let up = t.trim().to_ascii_uppercase();
        self.0.contains(&up).then_some(up)
    }

    fn list(&self) -> String {
        self.0.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

impl Default for EventTypes {
    fn default() -> Self {
        Self::new(DEFAULT_EVENT_TYPES)
    }
}

/// Parses and validates an `agile.events` payload into a `planning.event` with `event_id`.
///
/// The event must also pass [`fleet::planning::validate_event`], the dispatcher's own check
/// (e.g. `case_id` is a name: no spaces or `/`). An event the bridge wrote but the dispatcher
/// refused would be acked on NATS and only later dead-lettered from `fleet:tasks`; checked
/// here, it is dead-lettered by the bridge with its reason and terminated on NATS instead.
pub fn planning_event(payload: &[u8], event_id: &str, types: &EventTypes) -> Result<TaskCommand> {
    let ev: AgileEvent = parse("agile event", payload)?;
    let event_type = types.canonical(&ev.event_type).ok_or_else(|| {
        Rejected::new(format!(
            "unknown event_type `{}` (accepted: {})",
            ev.event_type.chars().take(64).collect::<String>(),
            types.list()
        ))
    })?;
    let case_id = id("case_id", &ev.case_id)?;
    let plan_id = opt_id("plan_id", ev.plan_id.as_deref())?;
    let from_state = opt_id("from", ev.from.as_deref())?;
    let to_state = opt_id("to", ev.to.as_deref())?;
    if event_type == "TRANSITION" && to_state.is_empty() {
        return Err(Rejected::new("a TRANSITION needs `to` (or `to_state`)"));
    }
    let event = PlanningEvent {
        event_id: event_id.to_owned(),
        event_type,
        case_id,
        plan_id,
        from_state,
        to_state,
        timestamp: ev.timestamp.map(Timestamp::into_text).unwrap_or_default(),
        metadata: ev.metadata.unwrap_or(Json::Null),
    };
    validate_event(&event).map_err(|e| Rejected::new(format!("invalid planning event: {e}")))?;
    Ok(TaskCommand::PlanningEvent(event))
}

// ---------------------------------------------------------------------------------------------
// agent.responses
// ---------------------------------------------------------------------------------------------

/// What a NATS-side agent reports on `agent.responses`: about a task (subtasks of planning
/// events), e.g. `{"task_id": "...", "session_id": "...", "status": "completed", "output": "..."}`,
/// or about a deliberation, e.g. `{"deliberation_id": "...", "member": "DEV-1", "round": 1,
/// "status": "proposal", "content": "..."}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct AgentResponse {
    /// `started`, `progress`, `chunk`, `completed` or `failed` (a task); `proposal` or
    /// `selection` (a deliberation). Case-insensitive.
    pub status: String,
    /// The task (task statuses).
    #[serde(default)]
    pub task_id: Option<String>,
    /// The session of the task, as the request on `agent.requests` carried it.
    #[serde(default)]
    pub session_id: Option<String>,
    /// The answer (`completed`, `proposal`) or the piece of it (`chunk`). Text; other JSON is
    /// kept as its JSON text. `content` is accepted too.
    #[serde(default, alias = "content")]
    pub output: Option<Json>,
    /// What went wrong (`failed`): a message, or `{"type", "message", "details"}`.
    #[serde(default)]
    pub error: Option<ResponseError>,
    /// Attempt of the task this answers (default 1).
    #[serde(default)]
    pub attempt: Option<u32>,
    /// Position among the task attempt's callbacks, from 1; absent or 0 = unordered.
    #[serde(default)]
    pub seq: Option<u32>,
    /// Position of a chunk among the task's chunks, from 0 (required for `chunk`).
    #[serde(default)]
    pub index: Option<u32>,
    /// How far along (`progress`): a percentage, or `{"percent", "step"}`.
    #[serde(default)]
    pub progress: Option<ProgressJson>,
    /// What the runner is doing (`progress`).
    #[serde(default)]
    pub step: Option<String>,
    /// Who runs it (`started`).
    #[serde(default)]
    pub executor: Option<String>,
    /// Extra data kept with the result or proposal.
    #[serde(default)]
    pub metadata: Option<Json>,
    /// The deliberation (deliberation statuses).
    #[serde(default)]
    pub deliberation_id: Option<String>,
    /// The council member the request named (deliberation statuses).
    #[serde(default)]
    pub member: Option<String>,
    /// The round the proposal is for, from 1 (`proposal`).
    #[serde(default)]
    pub round: Option<u32>,
    /// Which agent answered (`proposal`).
    #[serde(default)]
    pub agent_id: Option<String>,
    /// The checks the agent ran (`proposal`): `{"policy": {"passed", "score", "message"}, ...}`.
    #[serde(default)]
    pub checks: Option<Checks>,
    /// The agent's own assessment, 0..=1 (`proposal`).
    #[serde(default)]
    pub self_score: Option<f64>,
    /// The chosen candidate's member (or proposal id) (`selection`).
    #[serde(default)]
    pub winner: Option<String>,
    /// Why it was chosen (`selection`).
    #[serde(default)]
    pub rationale: Option<String>,
}

/// The `error` of a failed response.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ResponseError {
    Message(String),
    Detailed {
        #[serde(default, rename = "type", alias = "error_type")]
        kind: Option<String>,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        details: Option<Json>,
    },
}

/// The `progress` of a progress response.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ProgressJson {
    Percent(f64),
    Detailed {
        #[serde(default)]
        percent: Option<f64>,
        #[serde(default)]
        step: Option<String>,
    },
}

/// `error_type` of a failure that did not say what kind it was.
pub const DEFAULT_ERROR_TYPE: &str = "agent_error";

fn output_text(v: Option<Json>) -> String {
    match v {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(s)) => s,
        Some(other) => other.to_string(),
    }
}

/// The answer of a `chunk` or `completed` response, which must carry one (an empty text is an
/// answer; a missing or null one is a runner sending the wrong field, whose task would
/// otherwise complete with nothing in it).
fn required_output(status: &str, v: Option<Json>) -> Result<String> {
    match v {
        None | Some(Json::Null) => Err(Rejected::new(format!(
            "a {status} response needs `output` (or `content`): the text of the answer"
        ))),
        v => Ok(output_text(v)),
    }
}

/// Parses and validates an `agent.responses` payload into a callback.
pub fn callback(payload: &[u8]) -> Result<Callback> {
    let r: AgentResponse = parse("agent response", payload)?;
    let status = r.status.trim().to_ascii_lowercase();
    match status.as_str() {
        "proposal" | "selection" => deliberation_callback(&status, r),
        "started" | "progress" | "chunk" | "completed" | "failed" => task_callback(&status, r),
        other => Err(Rejected::new(format!(
            "unknown status `{}` (accepted: started, progress, chunk, completed, failed, proposal, selection)",
            other.chars().take(64).collect::<String>()
        ))),
    }
}

fn task_callback(status: &str, r: AgentResponse) -> Result<Callback> {
    let task_id = id("task_id", r.task_id.as_deref().unwrap_or_default())?;
    let session_id = match r.session_id.as_deref().map(str::trim) {
        None | Some("") => {
            return Err(Rejected::new(
                "`session_id` is missing: a response must carry the session_id of its request",
            ));
        }
        Some(s) => id("session_id", s)?,
    };
    let attempt = r.attempt.unwrap_or(1).max(1);
    let seq = r.seq.unwrap_or(0);
    Ok(match status {
        "started" => Callback::Started(Started {
            session_id,
            task_id,
            attempt,
            seq,
            executor: r.executor.unwrap_or_default(),
        }),
        "progress" => {
            let (percent, step) = match r.progress {
                Some(ProgressJson::Percent(p)) => (Some(p), None),
                Some(ProgressJson::Detailed { percent, step }) => (percent, step),
                None => (None, None),
            };
            let percent = percent.unwrap_or(0.0);
            if !(0.0..=100.0).contains(&percent) {
                return Err(Rejected::new(format!(
                    "`progress` {percent} is outside 0..=100"
                )));
            }
            Callback::Progress(Progress {
                session_id,
                task_id,
                attempt,
                seq,
                percent: percent as f32,
                step: step.or(r.step).unwrap_or_default(),
            })
        }
        "chunk" => {
            let index = r
                .index
                .ok_or_else(|| Rejected::new("a chunk needs `index` (its position, from 0)"))?;
            Callback::Chunk(Chunk {
                session_id,
                task_id,
                attempt,
                seq,
                index,
                content: required_output(status, r.output)?,
            })
        }
        "completed" => Callback::Result(TaskResult {
            session_id,
            task_id,
            attempt,
            seq,
            content: required_output(status, r.output)?,
            metadata: r.metadata.unwrap_or(Json::Null),
        }),
        _ => {
            let (kind, message, details) = match r.error {
                Some(ResponseError::Message(m)) => (None, Some(m), None),
                Some(ResponseError::Detailed {
                    kind,
                    message,
                    details,
                }) => (kind, message, details),
                None => (None, None, None),
            };
            Callback::Error(TaskFailure {
                session_id,
                task_id,
                attempt,
                seq,
                error_type: kind
                    .filter(|k| !k.trim().is_empty())
                    .unwrap_or_else(|| DEFAULT_ERROR_TYPE.to_owned()),
                message: message
                    .filter(|m| !m.trim().is_empty())
                    .unwrap_or_else(|| "the agent reported a failure".to_owned()),
                details: details.unwrap_or(Json::Null),
            })
        }
    })
}

fn deliberation_callback(status: &str, r: AgentResponse) -> Result<Callback> {
    let deliberation_id = id(
        "deliberation_id",
        r.deliberation_id.as_deref().unwrap_or_default(),
    )?;
    let member = id("member", r.member.as_deref().unwrap_or_default())?;
    if status == "selection" {
        let winner = id("winner", r.winner.as_deref().unwrap_or_default())?;
        return Ok(Callback::Selection(SelectionCallback {
            deliberation_id,
            member,
            winner,
            rationale: r.rationale.unwrap_or_default(),
        }));
    }
    let round = match r.round {
        Some(n) if n >= 1 => n,
        _ => {
            return Err(Rejected::new(
                "a proposal needs `round` (the round of the request, from 1)",
            ));
        }
    };
    if let Some(s) = r.self_score
        && !(0.0..=1.0).contains(&s)
    {
        return Err(Rejected::new(format!("`self_score` {s} is outside 0..=1")));
    }
    Ok(Callback::Proposal(ProposalCallback {
        deliberation_id,
        member,
        round,
        agent_id: opt_id("agent_id", r.agent_id.as_deref())?,
        content: output_text(r.output),
        checks: r.checks.unwrap_or_default(),
        self_score: r.self_score,
        metadata: r.metadata.unwrap_or(Json::Null),
    }))
}

// ---------------------------------------------------------------------------------------------
// outbound: agent.requests and any other subject
// ---------------------------------------------------------------------------------------------

/// What a request on `agent.requests` must carry so that the agent's answers can find their
/// way back: a task (`task_id` and `session_id`: subtasks of planning events) or a deliberation
/// seat (`deliberation_id` and `member`: council requests). Every other field passes through.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct AgentRequest {
    #[serde(default)]
    pub task_id: String,
    #[serde(default)]
    pub session_id: String,
    #[serde(default)]
    pub deliberation_id: String,
    #[serde(default)]
    pub member: String,
}

/// Checks an outbound payload before it is published: JSON always, and an [`AgentRequest`]
/// on the requests subject.
pub fn check_outbound(payload: &str, is_agent_request: bool) -> Result<()> {
    if is_agent_request {
        let r: AgentRequest = parse("agent request", payload.as_bytes())?;
        if r.deliberation_id.trim().is_empty() {
            id("task_id", &r.task_id)?;
            id("session_id", &r.session_id)?;
        } else {
            id("deliberation_id", &r.deliberation_id)?;
            id("member", &r.member)?;
        }
    } else {
        let _: serde::de::IgnoredAny = parse("payload", payload.as_bytes())?;
    }
    Ok(())
}

/// Checks that `subject` can be published to: non-empty dot-separated tokens, no wildcards,
/// no whitespace.
pub fn check_subject(subject: &str) -> Result<()> {
    let bad = subject.is_empty()
        || subject.len() > 1024
        || subject
            .split('.')
            .any(|t| t.is_empty() || t == "*" || t == ">")
        || subject.chars().any(|c| c.is_whitespace() || c.is_control());
    if bad {
        Err(Rejected::new(format!(
            "`{}` is not a subject one can publish to",
            subject.chars().take(128).collect::<String>()
        )))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(v: Json) -> Result<TaskCommand> {
        planning_event(v.to_string().as_bytes(), "AGILE:1", &EventTypes::default())
    }

    fn planning(v: Json) -> PlanningEvent {
        match event(v).unwrap() {
            TaskCommand::PlanningEvent(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_seed_transition_maps_to_a_planning_event() {
        let p = planning(json!({
            "event_type": "TRANSITION", "case_id": "US-123", "from": "DRAFT", "to": "DESIGN"
        }));
        assert_eq!(p.event_id, "AGILE:1");
        assert_eq!(p.event_type, "TRANSITION");
        assert_eq!(p.case_id, "US-123");
        assert_eq!(
            (p.from_state.as_str(), p.to_state.as_str()),
            ("DRAFT", "DESIGN")
        );
        assert_eq!(p.plan_id, "");
        assert_eq!(p.metadata, Json::Null);
    }

    #[test]
    fn long_field_names_timestamps_and_metadata_are_accepted() {
        let p = planning(json!({
            "event_type": "transition", "case_id": "US-9", "plan_id": "P-1",
            "from_state": "BUILD", "to_state": "TEST",
            "timestamp": "2026-11-21T12:00:00Z", "metadata": {"by": "po"}
        }));
        assert_eq!(
            p.event_type, "TRANSITION",
            "event types are case-insensitive"
        );
        assert_eq!(
            (p.from_state.as_str(), p.to_state.as_str()),
            ("BUILD", "TEST")
        );
        assert_eq!(p.plan_id, "P-1");
        assert_eq!(p.timestamp, "2026-11-21T12:00:00Z");
        assert_eq!(p.metadata, json!({"by": "po"}));
        let p =
            planning(json!({"event_type": "CREATED", "case_id": "US-9", "timestamp": 1700000000}));
        assert_eq!(p.timestamp, "1700000000");
    }

    #[test]
    fn bad_agile_events_are_rejected_with_a_reason() {
        let reason = |v: &[u8]| {
            planning_event(v, "x", &EventTypes::default())
                .unwrap_err()
                .0
        };
        assert!(reason(b"{not json").contains("not valid JSON"));
        assert!(reason(b"[1,2]").contains("expected shape"));
        assert!(reason(br#"{"case_id": "US-1"}"#).contains("event_type"));
        let r = reason(br#"{"event_type": "EXPLODED", "case_id": "US-1"}"#);
        assert!(r.contains("unknown event_type `EXPLODED`"), "{r}");
        assert!(r.contains("TRANSITION"), "{r}");
        assert!(reason(br#"{"event_type": "TRANSITION", "case_id": " "}"#).contains("case_id"));
        assert!(
            reason(br#"{"event_type": "TRANSITION", "case_id": "US-1", "from": "A"}"#)
                .contains("needs `to`")
        );
        let long = format!(
            r#"{{"event_type": "CREATED", "case_id": "{}"}}"#,
            "x".repeat(MAX_ID_LEN + 1)
        );
        assert!(reason(long.as_bytes()).contains("longer than"));
    }

    /// The dispatcher refuses these ([`fleet::planning::validate_event`]); the bridge must too,
    /// so that they are dead-lettered and terminated on NATS rather than acked.
    #[test]
    fn agile_events_the_dispatcher_would_refuse_are_rejected_naming_the_field() {
        let reason = |v: Json| event(v).unwrap_err().0;
        let r = reason(json!({"event_type": "TRANSITION", "case_id": "US 123", "to": "BUILD"}));
        assert!(r.contains("case_id"), "{r}");
        let r = reason(json!({"event_type": "CREATED", "case_id": "team/US-1"}));
        assert!(r.contains("case_id"), "{r}");
        let r = reason(json!({"event_type": "CREATED", "case_id": "x".repeat(121)}));
        assert!(r.contains("case_id"), "{r}");
        let r = reason(json!({"event_type": "CREATED", "case_id": "US-1", "plan_id": "P 1"}));
        assert!(r.contains("plan_id"), "{r}");
        let r =
            reason(json!({"event_type": "TRANSITION", "case_id": "US-1", "to": "B".repeat(65)}));
        assert!(r.contains("to_state"), "{r}");
        let r = reason(json!({"event_type": "CREATED", "case_id": "US-1", "from": "A".repeat(65)}));
        assert!(r.contains("from_state"), "{r}");
        let long_type = "T".repeat(65);
        let r = planning_event(
            json!({"event_type": long_type, "case_id": "US-1"})
                .to_string()
                .as_bytes(),
            "e",
            &EventTypes::new([long_type.as_str()]),
        )
        .unwrap_err()
        .0;
        assert!(r.contains("event_type"), "{r}");
        // Names of every allowed character, at the longest the dispatcher takes, still pass.
        let p = planning(json!({
            "event_type": "TRANSITION", "case_id": format!("US-1_a.b:{}", "c".repeat(111)),
            "plan_id": "P-1", "to": "BUILD"
        }));
        assert_eq!(p.case_id.len(), 120);
    }

    #[test]
    fn configured_event_types_replace_the_defaults() {
        let types = EventTypes::new(["story_moved"]);
        assert!(
            planning_event(
                br#"{"event_type": "STORY_MOVED", "case_id": "c"}"#,
                "e",
                &types
            )
            .is_ok()
        );
        assert!(
            planning_event(br#"{"event_type": "CREATED", "case_id": "c"}"#, "e", &types).is_err()
        );
    }

    fn response(v: Json) -> Result<Callback> {
        callback(v.to_string().as_bytes())
    }

    #[test]
    fn responses_map_to_callbacks_with_unordered_defaults() {
        let cb = response(json!({
            "task_id": "t1", "session_id": "s1", "status": "completed", "output": "done"
        }))
        .unwrap();
        assert_eq!(
            cb,
            Callback::Result(TaskResult {
                session_id: "s1".into(),
                task_id: "t1".into(),
                attempt: 1,
                seq: 0,
                content: "done".into(),
                metadata: Json::Null,
            })
        );
        let cb = response(json!({
            "task_id": "t1", "session_id": "s1", "status": "failed",
            "error": {"type": "timeout", "message": "too slow", "details": {"after_s": 30}},
            "attempt": 2, "seq": 4
        }))
        .unwrap();
        let Callback::Error(f) = cb else { panic!() };
        assert_eq!((f.attempt, f.seq), (2, 4));
        assert_eq!(
            (f.error_type.as_str(), f.message.as_str()),
            ("timeout", "too slow")
        );
        assert_eq!(f.details, json!({"after_s": 30}));

        let Callback::Error(f) = response(json!({
            "task_id": "t1", "session_id": "s1", "status": "FAILED", "error": "boom"
        }))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (f.error_type.as_str(), f.message.as_str()),
            (DEFAULT_ERROR_TYPE, "boom")
        );

        let Callback::Progress(p) = response(json!({
            "task_id": "t1", "session_id": "s1", "status": "progress",
            "progress": {"percent": 40, "step": "tests"}
        }))
        .unwrap() else {
            panic!()
        };
        assert_eq!((p.percent, p.step.as_str()), (40.0, "tests"));
        let Callback::Progress(p) = response(json!({
            "task_id": "t1", "session_id": "s1", "status": "progress", "progress": 12.5, "step": "lint"
        }))
        .unwrap() else {
            panic!()
        };
        assert_eq!((p.percent, p.step.as_str()), (12.5, "lint"));

        let Callback::Chunk(c) = response(json!({
            "task_id": "t1", "session_id": "s1", "status": "chunk", "index": 3, "content": "abc", "seq": 5
        }))
        .unwrap() else {
            panic!()
        };
        assert_eq!((c.index, c.seq, c.content.as_str()), (3, 5, "abc"));

        let Callback::Result(r) = response(json!({
            "task_id": "t1", "session_id": "s1", "status": "completed", "output": {"files": 2}
        }))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            r.content, r#"{"files":2}"#,
            "non-text output is kept as its JSON text"
        );

        assert!(matches!(
            response(json!({"task_id": "t1", "session_id": "s1", "status": "started", "executor": "k8s"})),
            Ok(Callback::Started(s)) if s.executor == "k8s"
        ));
    }

    #[test]
    fn deliberation_answers_map_to_proposals_and_selections() {
        let Callback::Proposal(p) = response(json!({
            "deliberation_id": "d1", "member": "DEV-2", "round": 2, "status": "proposal",
            "content": "use a queue", "agent_id": "runner-7", "self_score": 0.7,
            "checks": {"policy": {"passed": true, "score": 0.9}, "lint": {"passed": false, "message": "2 warnings"}}
        }))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (
                p.deliberation_id.as_str(),
                p.member.as_str(),
                p.round,
                p.agent_id.as_str()
            ),
            ("d1", "DEV-2", 2, "runner-7")
        );
        assert_eq!(
            (p.content.as_str(), p.self_score),
            ("use a queue", Some(0.7))
        );
        assert!(p.checks.policy.as_ref().unwrap().passed);
        assert!(!p.checks.lint.as_ref().unwrap().passed);
        assert!(p.checks.dry_run.is_none());

        let Callback::Selection(s) = response(json!({
            "deliberation_id": "d1", "member": "ARCHITECT-1", "status": "selection",
            "winner": "DEV-2", "rationale": "simplest"
        }))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (s.winner.as_str(), s.rationale.as_str()),
            ("DEV-2", "simplest")
        );
    }

    #[test]
    fn bad_responses_are_rejected_with_a_reason() {
        let reason = |v: Json| response(v).unwrap_err().0;
        assert!(reason(json!({"task_id": "t", "status": "completed"})).contains("session_id"));
        assert!(
            reason(json!({"task_id": "", "session_id": "s", "status": "completed"}))
                .contains("task_id")
        );
        assert!(
            reason(json!({"task_id": "t", "session_id": "s", "status": "exploded"}))
                .contains("unknown status")
        );
        assert!(reason(json!({"session_id": "s", "status": "completed"})).contains("task_id"));
        assert!(
            reason(json!({"deliberation_id": "d", "member": "DEV-1", "status": "proposal"}))
                .contains("round")
        );
        assert!(
            reason(json!({"deliberation_id": "d", "round": 1, "status": "proposal"}))
                .contains("member")
        );
        assert!(
            reason(json!({"deliberation_id": "d", "member": "A-1", "status": "selection"}))
                .contains("winner")
        );
        assert!(
            reason(json!({"deliberation_id": "d", "member": "m", "round": 1,
                          "status": "proposal", "self_score": 3}))
            .contains("self_score")
        );
        assert!(
            reason(json!({"task_id": "t", "session_id": "s", "status": "chunk"})).contains("index")
        );
        assert!(
            reason(
                json!({"task_id": "t", "session_id": "s", "status": "progress", "progress": 140})
            )
            .contains("outside")
        );
        assert!(
            callback(b"\x00\x01")
                .unwrap_err()
                .0
                .contains("not valid JSON")
        );
    }

    /// A runner that sends its answer under another name (or none) is told so in a dead
    /// letter, instead of its task completing with an empty answer.
    #[test]
    fn a_response_without_its_answer_is_rejected_not_completed_empty() {
        let reason = |v: Json| response(v).unwrap_err().0;
        for status in ["completed", "chunk"] {
            let r = reason(json!({"task_id": "t", "session_id": "s", "status": status,
                                  "index": 0, "result": "the answer"}));
            assert!(r.contains("needs `output` (or `content`)"), "{r}");
            let r = reason(json!({"task_id": "t", "session_id": "s", "status": status,
                                  "index": 0, "output": null}));
            assert!(r.contains("needs `output`"), "{r}");
        }
        let Callback::Result(r) = response(json!({
            "task_id": "t", "session_id": "s", "status": "completed", "output": ""
        }))
        .unwrap() else {
            panic!()
        };
        assert_eq!(r.content, "", "an empty answer is an answer");
    }

    #[test]
    fn outbound_payloads_and_subjects_are_checked() {
        assert!(
            check_outbound(
                r#"{"task_id": "t", "session_id": "s", "role": "DEV"}"#,
                true
            )
            .is_ok()
        );
        assert!(
            check_outbound(r#"{"task_id": "t"}"#, true)
                .unwrap_err()
                .0
                .contains("session_id")
        );
        assert!(
            check_outbound(
                r#"{"deliberation_id": "d", "member": "DEV-1", "task_id": ""}"#,
                true
            )
            .is_ok()
        );
        assert!(
            check_outbound(r#"{"deliberation_id": "d", "member": ""}"#, true)
                .unwrap_err()
                .0
                .contains("member")
        );
        assert!(check_outbound(r#"{"decision": 1}"#, false).is_ok());
        assert!(check_outbound("not json", false).is_err());
        assert!(check_subject("agent.requests").is_ok());
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a"] {
            assert!(check_subject(bad).is_err(), "{bad:?}");
        }
    }
}
