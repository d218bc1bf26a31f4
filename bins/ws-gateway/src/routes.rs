//! The client-facing router and the state its handlers share.
//!
//! | route | handler |
//! |---|---|
//! | `GET /ws/chat/{session_id}` | [`crate::ws::upgrade`] |
//! | `GET /sse/chat/{session_id}` | [`crate::sse::stream`] |
//!
//! Every error is the JSON shape edge-api answers with, `{"error": {"code", "message"}}`: 404
//! for any other path, 405 (with `Allow`) for a method other than `GET` (or `HEAD`), 400 for a
//! session id that is not UTF-8 once percent-decoded or a `/ws/...` request that is not a
//! WebSocket handshake.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::http::{HeaderName, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fleet::session::Chat;
use fleet::session_log::SessionLog;
use serde_json::json;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::cors::{Any, CorsLayer};

use crate::registry::Registry;

/// Size limits of WebSocket clients.
#[derive(Clone, Copy, Debug)]
pub struct WsLimits {
    /// Largest client frame (and message) accepted; larger ones close the socket with 4008.
    pub max_frame_bytes: usize,
}

impl WsLimits {
    /// Frames up to this size are read whole, so that the close after an oversized one is a clean
    /// handshake; past it the socket is cut at the frame header.
    pub fn hard_cap(&self) -> usize {
        self.max_frame_bytes.saturating_mul(4).max(4096)
    }
}

/// What every client-facing handler shares.
pub struct Gateway {
    pub chat: Chat,
    pub log: SessionLog,
    pub registry: Arc<Registry>,
    pub limits: WsLimits,
    /// Cancelled when the gateway shuts down: sockets close with 1001, SSE streams end.
    pub closing: CancellationToken,
    /// Tracks WebSocket connections, so that shutdown can wait for their close handshakes.
    pub connections: TaskTracker,
    /// This gateway's WebSocket presence on the session hashes.
    pub presence: Arc<crate::presence::Presence>,
    /// Bounds the connections waiting on Redis at once for their admission or presence, and
    /// the log reads of catch-ups after a lag or a resync.
    pub admissions: Arc<Admissions>,
}

/// Connections (WebSocket or SSE) that may wait on Redis at once for their admission (the
/// session's status, the replay's start, presence), at their end for presence, or for a read
/// of their session log while they catch up after a lag or a resync (`--admissions-at-once`).
/// When clients arrive or leave faster than Redis answers, as in a reconnect storm after a
/// gateway restart, or a resync tells every client of a fan-out shard to read its log at once,
/// the rest wait here without a deadline instead of queueing requests on the shared Redis
/// connection until its command timeout fails them: an admission or a read that failed so
/// closes its socket with 1011, only for the client to reconnect.
/// `fleet_ws_admissions_waiting` counts the connections waiting for a turn.
pub struct Admissions {
    turns: Semaphore,
}

impl Admissions {
    /// The default of `--admissions-at-once`.
    pub const DEFAULT_AT_ONCE: usize = 256;

    pub fn new(at_once: usize) -> Self {
        Self {
            turns: Semaphore::new(at_once.max(1)),
        }
    }

    /// Waits for a turn to call Redis, held as long as the permit is; `None` once closed.
    pub async fn turn(&self) -> Option<SemaphorePermit<'_>> {
        if let Ok(turn) = self.turns.try_acquire() {
            return Some(turn);
        }
        /// Counts a connection as waiting for as long as it lives (a wait can be cancelled).
        struct Waiting;
        impl Drop for Waiting {
            fn drop(&mut self) {
                metrics::gauge!("fleet_ws_admissions_waiting").decrement(1.0);
            }
        }
        metrics::gauge!("fleet_ws_admissions_waiting").increment(1.0);
        let _waiting = Waiting;
        self.turns.acquire().await.ok()
    }
}

/// The router of the client-facing port.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET])
        .allow_headers([
            header::AUTHORIZATION,
            HeaderName::from_static("last-event-id"),
        ]);
    Router::new()
        .route("/ws/chat/{session_id}", get(crate::ws::upgrade))
        .route("/sse/chat/{session_id}", get(crate::sse::stream))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(gateway)
        .layer(cors)
}

/// The JSON error answer: `{"error": {"code": <code>, "message": <message>}}`.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

async fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; use /ws/chat/{session_id} or /sse/chat/{session_id}",
    )
}

/// A known path with another method than `GET`; axum adds the `Allow` header.
async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("{method} is not allowed on {}; use GET", uri.path()),
    )
}
