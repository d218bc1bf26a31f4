//! WebSocket presence on the session hash.
//!
//! Each gateway writes its own field on a session's hash, `ws:<gateway>` (a random id chosen at
//! start), holding how many WebSockets of the session it has *now*, read from its registry
//! ([`fleet::session::Chat::websocket_presence`]). It reports a session when one of its
//! WebSockets is admitted or ends, and every [`HEARTBEAT_EVERY`] reports every session it holds
//! a WebSocket of, and again every session whose last report failed. Since each report is a count
//! and not a change, one that fails, or arrives out of order, is put right by the next. A session's
//! connections are the sum of the fresh reports: the reports of a gateway that died stop counting
//! [`fleet::session::WS_PRESENCE_WINDOW_MS`] after its last refresh.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet::session::Chat;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// How often presence is refreshed; well inside the presence window.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(15);

/// Sessions reported per batch.
const BATCH: usize = 500;

/// This gateway's presence reports.
pub struct Presence {
    chat: Chat,
    registry: Arc<Registry>,
    /// This gateway's id: its reports are the `ws:<gateway>` fields.
    gateway: String,
    /// Sessions whose last report failed; the next heartbeat reports them again.
    unsent: Mutex<HashSet<String>>,
}

impl Presence {
    /// Presence for a gateway that has just started, under a new random id.
    pub fn new(chat: Chat, registry: Arc<Registry>) -> Self {
        Self {
            chat,
            registry,
            gateway: uuid::Uuid::new_v4().simple().to_string(),
            unsent: Mutex::default(),
        }
    }

    /// This gateway's id, as in its `ws:<gateway>` fields.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// Reports how many WebSockets of `sid` this gateway holds now; a failure is logged, and the
    /// session reported again with the next heartbeat.
    pub async fn report(&self, sid: &str) {
        let report = self.registry.websocket_presence(sid);
        if let Err(e) = self
            .chat
            .websocket_presence(&self.gateway, std::slice::from_ref(&report))
            .await
        {
            tracing::warn!(session_id = sid, error = %e, "presence update failed");
            self.unsent().insert(sid.to_owned());
        }
    }

    /// Sessions whose last report failed.
    pub fn unsent_sessions(&self) -> usize {
        self.unsent().len()
    }

    fn unsent(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.unsent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports every session with a WebSocket here, and every session whose last report failed.
    pub async fn refresh(&self) {
        let mut sessions: HashSet<String> = std::mem::take(&mut *self.unsent());
        sessions.extend(self.registry.websocket_sessions());
        let sessions: Vec<String> = sessions.into_iter().collect();
        for (i, batch) in sessions.chunks(BATCH).enumerate() {
            let reports: Vec<_> = batch
                .iter()
                .map(|sid| self.registry.websocket_presence(sid))
                .collect();
            if let Err(e) = self.chat.websocket_presence(&self.gateway, &reports).await {
                tracing::warn!(error = %e, sessions = batch.len(), "presence heartbeat failed");
                self.unsent().extend(sessions[i * BATCH..].iter().cloned());
                return;
            }
        }
    }

    /// Refreshes presence every [`HEARTBEAT_EVERY`] until `stop`.
    pub async fn heartbeat(self: Arc<Self>, stop: CancellationToken) {
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
            self.refresh().await;
        }
    }
}
