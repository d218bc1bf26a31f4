//! Who may read a session: the token check and the resume point, shared by WebSocket and SSE.
//!
//! The session token comes as `Authorization: Bearer <token>` or `?token=<token>` (browsers
//! cannot set headers on a WebSocket or an `EventSource`). Each refusal has a WebSocket close code
//! and an HTTP status ([`Refusal`]).

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleet::session::{Chat, ChatError, TokenError};
use fleet::stream::entry::StreamId;
use serde::Deserialize;

use crate::connection::Resume;

/// The query string of `/ws/chat/{id}` and `/sse/chat/{id}`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct AccessQuery {
    pub token: Option<String>,
    pub last_event_id: Option<String>,
}

/// WebSocket close codes of the gateway.
pub mod close {
    /// Defines each code, and [`ALL`] from the same list so that it cannot miss one.
    macro_rules! codes {
        ($($(#[doc = $doc:literal])+ $name:ident = $code:literal;)+) => {
            $($(#[doc = $doc])+ pub const $name: u16 = $code;)+
            /// Every close code above. docs/protocol.md must list each of them (checked by
            /// tests/protocol_doc.rs), so that clients can be written against the doc.
            pub const ALL: &[u16] = &[$($name),+];
        };
    }

    codes! {
        /// Normal end of a connection the client asked to close.
        NORMAL = 1000;
        /// The gateway is shutting down; reconnect (elsewhere) with `last_event_id`.
        GOING_AWAY = 1001;
        /// The client broke the WebSocket protocol (reserved bits set, an unknown opcode, a
        /// fragmented control frame...): the socket cannot be read past such a frame.
        PROTOCOL_ERROR = 1002;
        /// A text frame (or a close reason) that is not valid UTF-8.
        INVALID_DATA = 1007;
        /// The gateway cannot serve the connection (session storage or log unavailable);
        /// reconnect with `last_event_id`.
        INTERNAL = 1011;
        /// Malformed request: bad `last_event_id`, query string or session id.
        BAD_REQUEST = 4000;
        /// Missing, invalid, expired token, or a token of another session; also sent when the
        /// token of an open socket expires.
        UNAUTHORIZED = 4001;
        /// No such session.
        NOT_FOUND = 4004;
        /// Frame (text or binary) too large, or too many malformed frames.
        POLICY = 4008;
    }
}

/// Why a client may not read a session.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("missing session token")]
    MissingToken,
    #[error("{0}")]
    Token(TokenError),
    #[error("session not found")]
    NotFound,
    #[error("last_event_id `{0}` is not an event id (expected <ms>-<seq>)")]
    BadLastEventId(String),
    #[error("malformed query string: {0}")]
    BadQuery(String),
    /// The path's session id does not decode (percent-encoded bytes that are not UTF-8).
    #[error("malformed session id in the path: {0}")]
    BadSessionId(String),
    #[error("session storage unavailable; retry later")]
    Unavailable,
}

impl Refusal {
    /// The WebSocket close code and a short reason (at most 123 bytes).
    pub fn close_frame(&self) -> (u16, &'static str) {
        match self {
            Refusal::MissingToken => (close::UNAUTHORIZED, "missing session token"),
            Refusal::Token(TokenError::Expired) => (close::UNAUTHORIZED, "session token expired"),
            Refusal::Token(TokenError::WrongSession) => {
                (close::UNAUTHORIZED, "session token is for another session")
            }
            Refusal::Token(_) => (close::UNAUTHORIZED, "invalid session token"),
            Refusal::NotFound => (close::NOT_FOUND, "session not found"),
            Refusal::BadLastEventId(_) => (close::BAD_REQUEST, "malformed last_event_id"),
            Refusal::BadQuery(_) => (close::BAD_REQUEST, "malformed query string"),
            Refusal::BadSessionId(_) => (close::BAD_REQUEST, "malformed session id"),
            Refusal::Unavailable => (close::INTERNAL, "session storage unavailable"),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Refusal::MissingToken | Refusal::Token(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Refusal::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Refusal::BadLastEventId(_) | Refusal::BadQuery(_) | Refusal::BadSessionId(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            Refusal::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }
}

/// The HTTP answer with the JSON error shape. The SSE handler does not use it for
/// [`Refusal::Unavailable`]: an `EventSource` stops for good on any status but 200, so it gets
/// a stream that asks it to retry instead (see [`crate::sse`]).
impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let mut res = crate::routes::json_error(status, code, &self.to_string());
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        res
    }
}

/// The bearer token of a request: the `Authorization` header first, then `?token=`.
pub fn token(headers: &HeaderMap, query: &AccessQuery) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .or_else(|| query.token.clone().filter(|t| !t.is_empty()))
}

/// An admitted client: where it starts, and until when its token holds.
#[derive(Clone, Debug)]
pub struct Admitted {
    pub resume: Resume,
    /// When the client's token expires (ms since the Unix epoch). The token is checked once, at
    /// connect; a WebSocket is closed with 4001 at this time, since REST refuses the token then.
    pub token_expires_ms: i64,
}

/// Checks the token of session `sid`, the resume point, and that the session exists.
pub async fn admit(
    chat: &Chat,
    sid: &str,
    token: Option<&str>,
    last_event_id: Option<&str>,
) -> Result<Admitted, Refusal> {
    let token = token.ok_or(Refusal::MissingToken)?;
    let token_expires_ms = chat.authorize(sid, token).map_err(Refusal::Token)?;
    let after = match last_event_id.map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(raw) => Some(parse_event_id(raw)?),
    };
    let status = match chat.status(sid).await {
        Ok(s) => s,
        Err(ChatError::NotFound { .. }) => return Err(Refusal::NotFound),
        Err(e) => {
            tracing::warn!(session_id = sid, error = %e, "session status unavailable");
            return Err(Refusal::Unavailable);
        }
    };
    Ok(Admitted {
        resume: Resume {
            after,
            session_last: status.last_event_id.and_then(|l| l.parse().ok()),
        },
        token_expires_ms,
    })
}

/// A client-supplied event id: `<ms>-<seq>` (Redis also accepts a bare `<ms>`).
pub fn parse_event_id(raw: &str) -> Result<StreamId, Refusal> {
    raw.parse::<StreamId>()
        .map_err(|_| Refusal::BadLastEventId(raw.chars().take(64).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_token_wins_over_the_query() {
        let mut headers = HeaderMap::new();
        let q = AccessQuery {
            token: Some("q".into()),
            last_event_id: None,
        };
        assert_eq!(token(&headers, &q).as_deref(), Some("q"));
        headers.insert(header::AUTHORIZATION, "Bearer h".parse().unwrap());
        assert_eq!(token(&headers, &q).as_deref(), Some("h"));
        assert_eq!(token(&HeaderMap::new(), &AccessQuery::default()), None);
    }

    #[test]
    fn event_ids_parse_or_refuse() {
        assert_eq!(parse_event_id("17-3").unwrap(), StreamId { ms: 17, seq: 3 });
        assert!(matches!(
            parse_event_id("nope"),
            Err(Refusal::BadLastEventId(_))
        ));
        assert_eq!(
            Refusal::BadLastEventId("x".into()).close_frame().0,
            close::BAD_REQUEST
        );
        assert_eq!(
            Refusal::Token(TokenError::WrongSession).close_frame().0,
            close::UNAUTHORIZED
        );
    }
}
