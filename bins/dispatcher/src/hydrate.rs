//! Optional hydration: when `FLEET_CONTEXT_ADDR` is set, the dispatcher asks the Context service
//! (`context.v1.ContextService/GetContext(story_id, role, phase)`) for the context of each
//! deliberation and subtask and attaches it to the agent requests. A Context service that fails
//! or does not answer within the timeout leaves the context empty: hydration never blocks work.

use std::time::Duration;

use fleet_proto::context::v1::GetContextRequest;
use fleet_proto::context::v1::context_service_client::ContextServiceClient;
use tonic::transport::Channel;

/// Phase named in `GetContext` for deliberations (subtasks name their action).
pub const PHASE_DELIBERATION: &str = "deliberation";

/// A client of the Context service.
#[derive(Clone)]
pub struct ContextHydrator {
    client: ContextServiceClient<Channel>,
    timeout: Duration,
}

impl ContextHydrator {
    /// A lazily connecting client of `addr` (`http://host:port`, or `host:port`).
    pub fn new(addr: &str, timeout: Duration) -> anyhow::Result<Self> {
        let channel = fleet_proto::lazy_channel(addr, timeout)?;
        Ok(Self {
            client: ContextServiceClient::new(channel),
            timeout,
        })
    }

    /// The context of `story_id` for `role` in `phase`; empty when there is none or the service
    /// fails (logged).
    pub async fn context(&self, story_id: &str, role: &str, phase: &str) -> String {
        if story_id.is_empty() {
            return String::new();
        }
        let mut client = self.client.clone();
        let request = GetContextRequest {
            story_id: story_id.to_owned(),
            role: role.to_owned(),
            phase: phase.to_owned(),
        };
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(self.timeout, client.get_context(request)).await;
        let outcome = match answer {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                metrics::histogram!("fleet_context_hydration_seconds")
                    .record(started.elapsed().as_secs_f64());
                return if r.context.is_empty() {
                    r.context_json
                } else {
                    r.context
                };
            }
            Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        metrics::counter!("fleet_context_hydration_failures_total").increment(1);
        tracing::warn!(story_id, role, phase, error = %outcome, "context hydration failed; going on without context");
        String::new()
    }
}
