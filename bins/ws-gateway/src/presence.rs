//! WebSocket presence on the session hash.
//!
//! A connection adds one to the session's `ws_connections` when it is admitted and takes it
//! back when it ends ([`fleet::session::Chat::websocket_presence`]). Every
//! [`HEARTBEAT_EVERY`], [`heartbeat`] refreshes `ws_seen_ms` of every session with a WebSocket
//! here, so that the sessions of a gateway that died without taking its connections back stop
//! counting as connected after [`fleet::session::WS_PRESENCE_WINDOW_MS`].

use std::sync::Arc;
use std::time::Duration;

use fleet::session::Chat;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// How often presence is refreshed; well inside the presence window.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(15);

/// Sessions refreshed per pipeline.
const BATCH: usize = 500;

/// Refreshes the presence of this gateway's WebSocket sessions until `stop`.
pub async fn heartbeat(chat: Chat, registry: Arc<Registry>, stop: CancellationToken) {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + HEARTBEAT_EVERY,
        HEARTBEAT_EVERY,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let sessions = registry.websocket_sessions();
        for batch in sessions.chunks(BATCH) {
            if let Err(e) = chat.websocket_heartbeat(batch).await {
                tracing::warn!(error = %e, sessions = batch.len(), "presence heartbeat failed");
                break;
            }
        }
    }
}

/// Records a WebSocket (dis)connection; a failure is logged, never fatal.
pub async fn record(chat: &Chat, sid: &str, delta: i64) {
    if let Err(e) = chat.websocket_presence(sid, delta).await {
        tracing::warn!(session_id = sid, delta, error = %e, "presence update failed");
    }
}
