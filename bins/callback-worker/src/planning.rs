//! Optional Planning notifications: when `FLEET_PLANNING_ADDR` is set, a subtask of a planning
//! session (`plan-<case_id>`) that ends is reported to the Planning service with
//! `planning.v1.PlanningService/UpdateTask(task_id, status, result)`. Best effort: a failure is
//! logged and counted, never retried, and never holds back the callbacks.

use std::time::Duration;

use fleet::task::{EndedTask, TaskState, TaskStore};
use fleet_proto::planning::v1::UpdateTaskRequest;
use fleet_proto::planning::v1::planning_service_client::PlanningServiceClient;
use tonic::transport::Channel;

/// Session ids of planning sessions start with this.
pub const PLANNING_SESSION_PREFIX: &str = "plan-";

/// A client of the Planning service.
#[derive(Clone)]
pub struct PlanningNotifier {
    client: PlanningServiceClient<Channel>,
    timeout: Duration,
}

/// The Planning status of a final task state.
pub fn planning_status(state: TaskState) -> &'static str {
    match state {
        TaskState::Completed => "COMPLETED",
        TaskState::Cancelled => "CANCELLED",
        TaskState::TimedOut => "TIMED_OUT",
        _ => "FAILED",
    }
}

impl PlanningNotifier {
    /// A lazily connecting client of `addr` (`http://host:port`, or `host:port`).
    pub fn new(addr: &str, timeout: Duration) -> anyhow::Result<Self> {
        let channel = fleet_proto::lazy_channel(addr, timeout)?;
        Ok(Self {
            client: PlanningServiceClient::new(channel),
            timeout,
        })
    }

    /// Reports the tasks of session `sid` that just ended, if it is a planning session, in the
    /// background.
    pub fn tasks_ended(&self, tasks: &TaskStore, sid: &str, ended: &[EndedTask]) {
        if !sid.starts_with(PLANNING_SESSION_PREFIX) || ended.is_empty() {
            return;
        }
        let (me, tasks, sid, ended) = (self.clone(), tasks.clone(), sid.to_owned(), ended.to_vec());
        tokio::spawn(async move {
            for t in ended {
                me.report(&tasks, &sid, &t).await;
            }
        });
    }

    async fn report(&self, tasks: &TaskStore, sid: &str, t: &EndedTask) {
        let view = match tasks.get(sid, &t.task_id).await {
            Ok(Some(v)) => v,
            _ => return,
        };
        let meta = |k: &str| {
            view.metadata
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let request = UpdateTaskRequest {
            task_id: t.task_id.clone(),
            status: planning_status(t.state).into(),
            result: view
                .result
                .clone()
                .or_else(|| view.error.as_ref().map(|e| e.message.clone()))
                .unwrap_or_default(),
            case_id: meta("case_id"),
            plan_id: meta("plan_id"),
            role: meta("role"),
        };
        let mut client = self.client.clone();
        match tokio::time::timeout(self.timeout, client.update_task(request)).await {
            Ok(Ok(_)) => {
                metrics::counter!("fleet_planning_updates_total", "ok" => "true").increment(1);
            }
            Ok(Err(status)) => {
                metrics::counter!("fleet_planning_updates_total", "ok" => "false").increment(1);
                tracing::warn!(task_id = %t.task_id, code = ?status.code(), error = %status.message(), "Planning UpdateTask failed");
            }
            Err(_) => {
                metrics::counter!("fleet_planning_updates_total", "ok" => "false").increment(1);
                tracing::warn!(task_id = %t.task_id, "Planning UpdateTask did not answer in time");
            }
        }
    }
}
