//! The REST router: chat and agent routes, health and metrics, JSON 404 / 405 fallbacks, body
//! limit, request tracing, per-route metrics and `Connection: close` when an answer leaves the
//! body unread ([`crate::unread_body`]). A body that stalls is answered 408 by the extractor that
//! reads it ([`crate::extract::ApiJson`]); the server bounds the rest ([`fleet::net::serve`]).
//!
//! | route | auth | does |
//! |---|---|---|
//! | `POST /api/v1/chat/init` | none | opens a session ([`chat::init`]) |
//! | `GET /api/v1/chat/session/{session_id}/status` | session | [`chat::status`] |
//! | `POST /api/v1/chat/session/{session_id}/task` | session | reserves a task id ([`chat::reserve`]) |
//! | `POST /api/v1/chat/session/{session_id}/token` | session | a fresh token ([`chat::refresh_token`]) |
//! | `DELETE /api/v1/chat/session/{session_id}` | session | closes the session ([`chat::close`]) |
//! | `POST /api/v1/chat/{session_id}/task` | session | submits a message ([`chat::submit`]) |
//! | `GET /api/v1/chat/{session_id}/tasks/{task_id}` | session | [`chat::task`] |
//! | `DELETE /api/v1/chat/{session_id}/tasks/{task_id}` | session | cancels the task ([`chat::cancel`]) |
//! | `GET /api/v1/agents` | API key | [`agents::list`] |
//! | `GET`, `PUT`, `DELETE /api/v1/agents/{agent_id}` | API key | [`agents::get`], [`agents::put`], [`agents::delete`] |
//! | `/health`, `/health/`, `/health/ready`, `/health/detailed`, `/health/metrics`, `/metrics` | none | [`fleet::admin::router`] |

pub mod agents;
pub mod chat;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{Method, Uri};
use axum::middleware;
use axum::routing::{get, post};
use fleet::admin::Health;
use fleet::deliberation::Engine;
use fleet::session::Chat;
use tower_http::trace::TraceLayer;

use crate::auth::ApiKeys;
use crate::error::ApiError;
use crate::http_metrics;
use crate::public_url::PublicUrls;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub chat: Chat,
    /// Deliberation steps: cancelling a planning session's council subtask
    /// ([`fleet::deliberation::Engine::request_council_cancel`]).
    pub engine: Engine,
    pub api_keys: ApiKeys,
    pub urls: Arc<PublicUrls>,
    pub health: Health,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// How long a request's body may take to arrive, from when its route starts reading it
    /// (`FLEET_HTTP_READ_TIMEOUT_SECS`; 408 after).
    pub body_timeout: Duration,
}

impl AppState {
    pub fn new(
        chat: Chat,
        engine: Engine,
        api_keys: ApiKeys,
        urls: PublicUrls,
        health: Health,
        max_body_bytes: usize,
        body_timeout: Duration,
    ) -> Self {
        Self {
            chat,
            engine,
            api_keys,
            urls: Arc::new(urls),
            health,
            max_body_bytes,
            body_timeout,
        }
    }
}

/// The whole REST surface of edge-api.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/v1/chat/init", post(chat::init))
        .route(
            "/api/v1/chat/session/{session_id}/status",
            get(chat::status),
        )
        .route(
            "/api/v1/chat/session/{session_id}/task",
            post(chat::reserve),
        )
        .route(
            "/api/v1/chat/session/{session_id}/token",
            post(chat::refresh_token),
        )
        .route(
            "/api/v1/chat/session/{session_id}",
            axum::routing::delete(chat::close),
        )
        .route("/api/v1/chat/{session_id}/task", post(chat::submit))
        .route(
            "/api/v1/chat/{session_id}/tasks/{task_id}",
            get(chat::task).delete(chat::cancel),
        )
        .route("/api/v1/agents", get(agents::list))
        .route(
            "/api/v1/agents/{agent_id}",
            get(agents::get).put(agents::put).delete(agents::delete),
        )
        .with_state(state.clone());
    api.merge(fleet::admin::router(state.health.clone()))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn(http_metrics::record))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(http_span)
                .on_response(
                    |res: &axum::response::Response,
                     _: std::time::Duration,
                     span: &tracing::Span| {
                        span.record("http.response.status_code", res.status().as_u16());
                    },
                ),
        )
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn(crate::unread_body::close_if_unread))
}

/// The server span of a request (OpenTelemetry HTTP conventions), continuing the caller's
/// trace when it sent a `traceparent` header.
fn http_span(req: &Request) -> tracing::Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(http_metrics::UNMATCHED, MatchedPath::as_str);
    let span = tracing::info_span!(
        "http_request",
        otel.name = %format!("{} {route}", req.method()),
        otel.kind = "server",
        http.request.method = %req.method(),
        http.route = route,
        url.path = %req.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    fleet::telemetry::continue_from_headers(&span, req.headers());
    span
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}
