//! Deliberation cancels: every agent of a role reads `fleet:agents:<role>:control` without a
//! group (each must see every cancel) and stops the member's request if it holds it; a cancel
//! that arrives first is remembered, so the request is dropped when it comes.

use std::time::Duration;

use fleet::envelope::{AgentControl, Envelope};
use fleet::stream::entry::parse_read;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::Cancellations;

/// Reads one role's agent control stream from its end.
pub struct AgentControlReader {
    pub client: Client,
    pub stream: String,
    pub cancellations: Cancellations,
}

impl AgentControlReader {
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let reader = self.client.clone_new();
        reader.init().await?;
        let mut last = "$".to_owned();
        while !shutdown.is_cancelled() {
            let reply: Result<Value, _> = reader
                .xread(Some(256), Some(1000), self.stream.as_str(), last.as_str())
                .await;
            let streams = match reply.map(parse_read) {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "unreadable agent control reply");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "agent control read failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    continue;
                }
            };
            for entry in streams.into_iter().flat_map(|(_, e)| e) {
                last = entry.id.to_string();
                match Envelope::<AgentControl>::from_fields(&entry.fields) {
                    Ok(env) => {
                        let AgentControl::Cancel(c) = env.msg;
                        let stopped = if c.member.is_empty() {
                            self.cancellations
                                .cancel_prefix(&format!("{}/", c.deliberation_id))
                                > 0
                        } else {
                            self.cancellations
                                .cancel(&format!("{}/{}", c.deliberation_id, c.member))
                        };
                        if stopped {
                            tracing::info!(deliberation_id = %c.deliberation_id, member = %c.member, reason = %c.reason, "cancelling agent request");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(entry = %entry.id, error = %e, "ignoring undecodable agent control entry")
                    }
                }
            }
        }
        let _ = reader.quit().await;
        Ok(())
    }
}
