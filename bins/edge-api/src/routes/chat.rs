//! `/api/v1/chat/...`: open a session, submit messages as tasks, read, cancel, close.
//!
//! Every route but `init` takes the session's bearer token ([`SessionAuth`]), checked before
//! anything touches Redis. The work itself is [`fleet::session::Chat`]'s, shared with the
//! WebSocket gateway and gRPC; these handlers only translate HTTP.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use fleet::session::{ChatError, InitSession, SessionStatus, SubmitMessage, Submitted};
use fleet::task::TaskView;
use serde::{Deserialize, Serialize};
use tracing::Span;

use super::AppState;
use crate::auth::SessionAuth;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath};

/// The header whose value makes a submit idempotent within its session.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// `POST /api/v1/chat/init` body.
#[derive(Debug, Deserialize)]
pub struct InitRequest {
    pub agent_id: String,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// `POST /api/v1/chat/init` answer.
#[derive(Debug, Serialize)]
pub struct InitResponse {
    pub session_id: String,
    pub session_token: String,
    /// A task id reserved for the first message.
    pub task_id: String,
    pub websocket_url: String,
    pub sse_url: String,
    pub agent_id: String,
    pub agent_name: String,
    /// When the session token expires, RFC 3339.
    pub expires_at: String,
}

/// Opens a chat session with an agent: 201, or 404 when the agent is unknown.
#[tracing::instrument(skip_all, fields(session_id, task_id))]
pub async fn init(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    ApiJson(req): ApiJson<InitRequest>,
) -> Result<(StatusCode, Json<InitResponse>), ApiError> {
    let session = state
        .chat
        .init_session(InitSession {
            agent_id: req.agent_id,
            tenant_id: req.tenant_id,
            user_id: req.user_id,
            metadata: req.metadata,
        })
        .await?;
    let span = Span::current();
    span.record("session_id", session.session_id.as_str());
    span.record("task_id", session.task_id.as_str());
    tracing::info!(agent_id = %session.agent_id, "session opened");
    let bases = state.urls.bases(&headers, &uri);
    Ok((
        StatusCode::CREATED,
        Json(InitResponse {
            websocket_url: bases.websocket_url(&session.session_id, &session.session_token),
            sse_url: bases.sse_url(&session.session_id),
            expires_at: fleet::time::rfc3339_ms(session.expires_ms),
            session_id: session.session_id,
            session_token: session.session_token,
            task_id: session.task_id,
            agent_id: session.agent_id,
            agent_name: session.agent_name,
        }),
    ))
}

/// The session's state, totals and WebSocket presence.
#[tracing::instrument(skip_all, fields(session_id = %auth.session_id, task_id))]
pub async fn status(
    State(state): State<AppState>,
    auth: SessionAuth,
) -> Result<Json<SessionStatus>, ApiError> {
    Ok(Json(state.chat.status(&auth.session_id).await?))
}

/// `POST /api/v1/chat/session/{session_id}/token` answer.
#[derive(Debug, Serialize)]
pub struct Token {
    pub session_token: String,
    /// When it expires, RFC 3339.
    pub expires_at: String,
}

/// A fresh token for an open session, for a client whose session outlives its token (the
/// session's TTL slides with activity; a token's does not): 200, or 409 when it is closed.
#[tracing::instrument(skip_all, fields(session_id = %auth.session_id, task_id))]
pub async fn refresh_token(
    State(state): State<AppState>,
    auth: SessionAuth,
) -> Result<Json<Token>, ApiError> {
    let (session_token, expires_ms) = state.chat.refresh_token(&auth.session_id).await?;
    Ok(Json(Token {
        session_token,
        expires_at: fleet::time::rfc3339_ms(expires_ms),
    }))
}

/// `POST /api/v1/chat/session/{session_id}/task` answer.
#[derive(Debug, Serialize)]
pub struct Reserved {
    pub task_id: String,
    pub status: &'static str,
}

/// Reserves a task id for a later submit: 201.
#[tracing::instrument(skip_all, fields(session_id = %auth.session_id, task_id))]
pub async fn reserve(
    State(state): State<AppState>,
    auth: SessionAuth,
) -> Result<(StatusCode, Json<Reserved>), ApiError> {
    let task_id = state.chat.reserve_task(&auth.session_id).await?;
    Span::current().record("task_id", task_id.as_str());
    Ok((
        StatusCode::CREATED,
        Json(Reserved {
            task_id,
            status: "reserved",
        }),
    ))
}

/// `POST /api/v1/chat/{session_id}/task` body.
#[derive(Debug, Deserialize)]
pub struct SubmitRequest {
    pub message: String,
    #[serde(default)]
    pub metadata: serde_json::Value,
    /// A reserved task id to use.
    #[serde(default)]
    pub task_id: Option<String>,
    /// The same as the `Idempotency-Key` header, for clients that send it in the body as the
    /// WebSocket and gRPC messages do; when both are given they must agree.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// Submits a message as a task: 202 with its id at once (`duplicate: true` when the
/// `Idempotency-Key` or the task id was used before).
#[tracing::instrument(skip_all, fields(session_id = %auth.session_id, task_id))]
pub async fn submit(
    State(state): State<AppState>,
    auth: SessionAuth,
    headers: HeaderMap,
    ApiJson(req): ApiJson<SubmitRequest>,
) -> Result<(StatusCode, Json<Submitted>), ApiError> {
    let idempotency_key = headers
        .get(IDEMPOTENCY_KEY)
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::Invalid("Idempotency-Key must be printable ASCII".into()))
        })
        .transpose()?;
    let idempotency_key = match (idempotency_key, req.idempotency_key) {
        (Some(header), Some(body)) if header != body => {
            return Err(ApiError::Invalid(
                "the Idempotency-Key header and the body's idempotency_key differ".into(),
            ));
        }
        (header, body) => header.or(body),
    };
    let submitted = state
        .chat
        .submit(
            &auth.session_id,
            SubmitMessage {
                message: req.message,
                metadata: req.metadata,
                task_id: req.task_id,
                idempotency_key,
                source: "rest",
            },
        )
        .await?;
    Span::current().record("task_id", submitted.task_id.as_str());
    tracing::debug!(duplicate = submitted.duplicate, "task submitted");
    Ok((StatusCode::ACCEPTED, Json(submitted)))
}

/// Path of the task routes.
#[derive(Debug, Deserialize)]
pub struct TaskPath {
    pub session_id: String,
    pub task_id: String,
}

/// A task: state, attempt, timestamps, result or error.
#[tracing::instrument(skip_all, fields(session_id = %auth.session_id, task_id))]
pub async fn task(
    State(state): State<AppState>,
    auth: SessionAuth,
    ApiPath(path): ApiPath<TaskPath>,
) -> Result<Json<TaskView>, ApiError> {
    // Quoted short: the path is the client's, checked only further on.
    Span::current().record("task_id", fleet::agent::excerpt(&path.task_id).as_str());
    Ok(Json(
        state.chat.task(&auth.session_id, &path.task_id).await?,
    ))
}

/// What a cancel or close answers.
#[derive(Debug, Serialize)]
pub struct Ending {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    pub status: String,
}

/// Cancels a task: 202 `cancelling` when it was open, 200 with its state when it had already
/// ended or is only a reserved id (nothing to cancel).
#[tracing::instrument(skip_all, fields(session_id = %auth.session_id, task_id))]
pub async fn cancel(
    State(state): State<AppState>,
    auth: SessionAuth,
    ApiPath(path): ApiPath<TaskPath>,
) -> Result<(StatusCode, Json<Ending>), ApiError> {
    // Quoted short: the path is the client's, checked only further on.
    Span::current().record("task_id", fleet::agent::excerpt(&path.task_id).as_str());
    const REASON: &str = "cancelled by the client";
    let task = match state
        .chat
        .cancel(&auth.session_id, &path.task_id, REASON)
        .await
    {
        Ok(task) => task,
        // Not a task: a council subtask of a planning session is a deliberation, cancelled
        // through the dispatchers with the same command (as gRPC's `CancelTask` does).
        Err(e @ ChatError::NotFound { what: "task", .. }) => {
            let status = state
                .engine
                .request_council_cancel(&auth.session_id, &path.task_id, REASON)
                .await
                .map_err(|e| ApiError::Unavailable(e.to_string()))?
                .ok_or(e)?;
            let code = if status.is_terminal() {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            let ending = Ending {
                session_id: None,
                task_id: Some(path.task_id),
                status: status.cancel_answer().into(),
            };
            return Ok((code, Json(ending)));
        }
        Err(e) => return Err(e.into()),
    };
    let (code, status) = if task.cancellable() {
        tracing::info!("task cancellation requested");
        (StatusCode::ACCEPTED, "cancelling".to_owned())
    } else {
        (StatusCode::OK, task.state)
    };
    Ok((
        code,
        Json(Ending {
            session_id: None,
            task_id: Some(task.task_id),
            status,
        }),
    ))
}

/// Closes the session (and cancels its open tasks): 202 `closing`, or 200 when it was closed.
#[tracing::instrument(skip_all, fields(session_id = %auth.session_id, task_id))]
pub async fn close(
    State(state): State<AppState>,
    auth: SessionAuth,
) -> Result<(StatusCode, Json<Ending>), ApiError> {
    let status = state
        .chat
        .close(&auth.session_id, "closed by the client")
        .await?;
    let (code, label) = if status.state == "open" {
        tracing::info!("session close requested");
        (StatusCode::ACCEPTED, "closing".to_owned())
    } else {
        (StatusCode::OK, status.state)
    };
    Ok((
        code,
        Json(Ending {
            session_id: Some(status.session_id),
            task_id: None,
            status: label,
        }),
    ))
}
