//! Client-facing messages: what a WebSocket / SSE client receives and sends.
//!
//! Server -> client messages are a superset of the seed's format:
//!
//! ```json
//! {"message_type": "chat_streaming", "event_id": "1732190000000-0", "session_id": "...",
//!  "task_id": "...", "seq": 2, "data": {"content": "Hello ", "is_final": false, "chunk_index": 0},
//!  "timestamp": "2026-11-21T12:00:00.123Z"}
//! ```
//!
//! Events that belong to a session's history (`chat_streaming`, `chat_response`, `chat_error`,
//! `task_progress`, `session_closed`) are rendered once, by the writer of the state change, and
//! stored verbatim in the session log without `event_id`; the gateway splices the log entry's id
//! in as `event_id` when it delivers them ([`with_event_id`]). Replies to one connection
//! (`task_queued`, `pong`, `error`) are not logged.

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use crate::time::{now_ms, rfc3339_ms};

/// Server -> client message types.
pub mod message_type {
    pub const CHAT_STREAMING: &str = "chat_streaming";
    pub const CHAT_RESPONSE: &str = "chat_response";
    pub const CHAT_ERROR: &str = "chat_error";
    pub const TASK_PROGRESS: &str = "task_progress";
    /// The task runs again from the start (a later attempt took it over): discard its chunks.
    pub const TASK_RESTARTED: &str = "task_restarted";
    pub const TASK_QUEUED: &str = "task_queued";
    pub const SESSION_CLOSED: &str = "session_closed";
    pub const PONG: &str = "pong";
    pub const ERROR: &str = "error";
    /// Client -> server.
    pub const CHAT_MESSAGE: &str = "chat_message";
    /// Client -> server.
    pub const PING: &str = "ping";
}

/// A server -> client message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerMessage {
    pub message_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    pub session_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Position of the event among its task attempt's callbacks: a client that has seen `seq`
    /// for a task never needs an event with a smaller one, until a `task_restarted` (a later
    /// attempt numbers its callbacks from 1 again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    pub data: Json,
    pub timestamp: String,
}

impl ServerMessage {
    pub fn new(message_type: &str, session_id: &str, task_id: Option<&str>, data: Json) -> Self {
        Self {
            message_type: message_type.to_owned(),
            event_id: None,
            session_id: session_id.to_owned(),
            task_id: task_id.map(str::to_owned),
            seq: None,
            data,
            timestamp: rfc3339_ms(now_ms()),
        }
    }

    pub fn with_seq(mut self, seq: u32) -> Self {
        self.seq = Some(seq);
        self
    }

    /// A piece of the answer.
    pub fn streaming(sid: &str, tid: &str, seq: u32, content: &str, chunk_index: u32) -> Self {
        Self::new(
            message_type::CHAT_STREAMING,
            sid,
            Some(tid),
            json!({"content": content, "is_final": false, "chunk_index": chunk_index}),
        )
        .with_seq(seq)
    }

    /// The final answer.
    pub fn response(sid: &str, tid: &str, seq: u32, content: &str, metadata: &Json) -> Self {
        let mut data = json!({"content": content, "is_final": true});
        if !metadata.is_null() {
            data["metadata"] = metadata.clone();
        }
        Self::new(message_type::CHAT_RESPONSE, sid, Some(tid), data).with_seq(seq)
    }

    /// The task runs again from the start as `attempt`: what it streamed so far is void, and
    /// its chunks come again from index 0.
    pub fn task_restarted(sid: &str, tid: &str, attempt: u32) -> Self {
        Self::new(
            message_type::TASK_RESTARTED,
            sid,
            Some(tid),
            json!({
                "attempt": attempt,
                "reason": "another executor took the task over and runs it again from the start; \
                           discard what it streamed so far",
            }),
        )
    }

    /// The task ended without an answer (failed, cancelled, timed out).
    pub fn chat_error(
        sid: &str,
        tid: &str,
        seq: Option<u32>,
        error_type: &str,
        message: &str,
        details: &Json,
    ) -> Self {
        let mut m = Self::new(
            message_type::CHAT_ERROR,
            sid,
            Some(tid),
            json!({"error": {"error_type": error_type, "message": message, "details": details}}),
        );
        m.seq = seq;
        m
    }

    /// A reply to one connection that is not part of the session's history.
    pub fn error(sid: &str, code: &str, message: &str) -> Self {
        Self::new(
            message_type::ERROR,
            sid,
            None,
            json!({"error": {"error_type": code, "message": message, "details": null}}),
        )
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a ServerMessage always serializes")
    }
}

/// Inserts `"event_id":"<id>"` as the first member of a rendered message object.
pub fn with_event_id(json: &str, event_id: &str) -> String {
    let rest = json.strip_prefix('{').unwrap_or(json);
    let mut out = String::with_capacity(json.len() + event_id.len() + 16);
    out.push_str("{\"event_id\":\"");
    out.push_str(event_id);
    out.push('"');
    if rest.trim_start() != "}" {
        out.push(',');
    }
    out.push_str(rest);
    out
}

/// A client -> server message.
#[derive(Clone, Debug, Deserialize)]
pub struct ClientMessage {
    pub message_type: String,
    #[serde(default)]
    pub data: Json,
}

/// The `data` of a client `chat_message`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessageData {
    /// The user's message (`content` is accepted too).
    #[serde(alias = "content")]
    pub message: String,
    #[serde(default)]
    pub metadata: Json,
    /// A task id reserved earlier with `POST /api/v1/chat/session/{id}/task`.
    #[serde(default)]
    pub task_id: Option<String>,
    /// Makes a resent message return the same task.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_is_spliced_into_a_valid_object() {
        let m = ServerMessage::streaming("s1", "t1", 3, "hi \"there\"", 1);
        let spliced = with_event_id(&m.to_json(), "17-0");
        let back: ServerMessage = serde_json::from_str(&spliced).unwrap();
        assert_eq!(back.event_id.as_deref(), Some("17-0"));
        assert_eq!(back.data["content"], "hi \"there\"");
        assert_eq!(back.seq, Some(3));
        assert_eq!(with_event_id("{}", "1-0"), "{\"event_id\":\"1-0\"}");
    }

    #[test]
    fn chat_message_accepts_content_as_an_alias() {
        let m: ClientMessage =
            serde_json::from_str(r#"{"message_type":"chat_message","data":{"content":"hi"}}"#)
                .unwrap();
        let d: ChatMessageData = serde_json::from_value(m.data).unwrap();
        assert_eq!(d.message, "hi");
    }
}
