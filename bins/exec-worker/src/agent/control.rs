//! Deliberation cancels: every agent of a role reads `fleet:agents:<role>:control` without a
//! group (each must see every cancel) and stops the member's request if it holds it; a cancel
//! that arrives first is remembered, so the request is dropped when it comes.

use fleet::envelope::AgentControl;
use fleet::stream::entry::StreamId;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::Cancellations;

/// Reads one role's agent control stream after `from`, its newest entry when the agent started
/// (as [`crate::control::ControlReader`] does).
pub struct AgentControlReader {
    pub client: Client,
    pub stream: String,
    pub from: StreamId,
    pub cancellations: Cancellations,
}

impl AgentControlReader {
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (client, stream) = (&self.client, &self.stream);
        crate::control::follow(client, stream, self.from, &shutdown, |msg: AgentControl| {
            let AgentControl::Cancel(c) = msg;
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
        })
        .await
    }
}
