//! [`ApiError`]: the one error every route answers with, as
//! `{"error": {"code": "<snake_case>", "message": "<human sentence>"}}`.
//!
//! Internal failures (Redis down, a script answering nonsense) are logged here and answered as
//! `503 unavailable` without their details.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleet::agent::AgentError;
use fleet::session::{ChatError, TokenError};
use serde_json::json;

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not the JSON the route takes.
    #[error("{0}")]
    InvalidJson(String),
    /// The request is well-formed but not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// No credentials, or credentials that do not check out.
    #[error("{0}")]
    Unauthorized(String),
    /// Valid credentials that do not grant this resource.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("{0}")]
    SessionClosed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request's body did not arrive within the read timeout.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    Overloaded(String),
    /// An internal failure; the detail is logged, never sent.
    #[error("internal: {0}")]
    Unavailable(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_) | ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::SessionClosed(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The machine-readable `code` of the body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::Invalid(_) => "invalid_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::SessionClosed(_) => "session_closed",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::Unavailable(_) => "unavailable",
        }
    }

    /// The human `message` of the body: never an internal detail.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Unavailable(_) => {
                "the service is temporarily unavailable; retry later".to_owned()
            }
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Unavailable(detail) = &self {
            tracing::error!(error = %detail, "request failed on an internal error");
        }
        let body = json!({"error": {"code": self.code(), "message": self.public_message()}});
        let mut response = (self.status(), Json(body)).into_response();
        match &self {
            ApiError::Overloaded(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized(_) => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

impl From<ChatError> for ApiError {
    fn from(e: ChatError) -> Self {
        match e {
            ChatError::Invalid(m) => ApiError::Invalid(m),
            e @ ChatError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            e @ ChatError::SessionClosed(_) => ApiError::SessionClosed(e.to_string()),
            e @ ChatError::Overloaded { .. } => ApiError::Overloaded(e.to_string()),
            ChatError::Unavailable(detail) => ApiError::Unavailable(detail),
        }
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Invalid(m) => ApiError::Invalid(m),
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::WrongSession => ApiError::Forbidden(e.to_string()),
            TokenError::Malformed | TokenError::BadSignature | TokenError::Expired => {
                ApiError::Unauthorized(e.to_string())
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            r if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge("request body is larger than the limit".into())
            }
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::InvalidJson("expected `Content-Type: application/json`".into())
            }
            JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => {
                ApiError::InvalidJson(r.body_text())
            }
            other => ApiError::InvalidJson(format!(
                "cannot read the request body: {}",
                other.body_text()
            )),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::Invalid(r.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_errors_map_to_their_status_and_code() {
        let cases = [
            (ChatError::Invalid("x".into()), 400, "invalid_request"),
            (
                ChatError::NotFound {
                    what: "agent",
                    id: "a".into(),
                },
                404,
                "not_found",
            ),
            (ChatError::SessionClosed("s".into()), 409, "session_closed"),
            (ChatError::Overloaded { backlog: 9 }, 429, "overloaded"),
            (ChatError::Unavailable("boom".into()), 503, "unavailable"),
        ];
        for (chat, status, code) in cases {
            let e = ApiError::from(chat);
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.code(), code);
        }
    }

    #[test]
    fn internal_details_never_reach_the_client() {
        let e = ApiError::from(ChatError::Unavailable("redis at 10.0.0.3 refused".into()));
        assert!(!e.public_message().contains("10.0.0.3"));
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn overloaded_answers_carry_retry_after() {
        let r = ApiError::from(ChatError::Overloaded { backlog: 1 }).into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn token_errors_split_into_401_and_403() {
        assert_eq!(
            ApiError::from(TokenError::WrongSession).status(),
            StatusCode::FORBIDDEN
        );
        for e in [
            TokenError::Malformed,
            TokenError::BadSignature,
            TokenError::Expired,
        ] {
            assert_eq!(ApiError::from(e).status(), StatusCode::UNAUTHORIZED);
        }
    }
}
