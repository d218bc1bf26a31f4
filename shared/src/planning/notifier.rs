//! Planning notifications: when `FLEET_PLANNING_ADDR` is set, a subtask of a planning session
//! (`plan-<case_id>`) that ends is reported to the Planning service with
//! `planning.v1.PlanningService/UpdateTask(task_id, status, result, case_id, plan_id, role)`.
//!
//! Each end is reported by the binary whose step made it, so both need the address:
//!
//! | end | reported by | status, result |
//! |---|---|---|
//! | the runner's `result` / `error` | callback-worker | COMPLETED with the answer, FAILED with the error |
//! | the deadline | callback-worker's sweeper | TIMED_OUT |
//! | `CancelTask`, `CloseSession` | dispatcher | CANCELLED with the task's reason |
//! | a council subtask's deliberation ends | callback-worker (handler or sweeper) | COMPLETED with the winning proposal's content; FAILED (nothing to score) or TIMED_OUT (no quorum by the deadline) with the deliberation's error |
//! | a council subtask's deliberation is cancelled (`CancelTask` of the subtask, `CloseSession`) | dispatcher (or the sweeper that finishes a cancel a crash interrupted) | CANCELLED with the cancel's reason |
//!
//! Once per end in the normal case: a task is reported by the `apply` call that ended it (a
//! redelivery that ends nothing reports nothing), a deliberation by the step that first marks
//! it settled (the redelivery or sweep that finishes an end a crash interrupted included).
//! Best effort: reports are sent in the background; a failure is logged and counted
//! (`fleet_planning_updates_total{ok="false"}`), never retried, and never holds back the stream
//! whose entry made the end. A report lost to a crash between the end and the call is not sent
//! again.

use std::time::Duration;

use fleet_proto::planning::v1::UpdateTaskRequest;
use fleet_proto::planning::v1::planning_service_client::PlanningServiceClient;
use tonic::transport::Channel;

use super::{SESSION_PREFIX, is_council_subtask};
use crate::deliberation::Status;
use crate::deliberation::engine::decision_of;
use crate::deliberation::store::DeliberationView;
use crate::task::{EndedTask, TaskState, TaskStore};

/// The flags of the binaries that report subtask ends (callback-worker, dispatcher).
#[derive(clap::Args, Clone, Debug)]
pub struct PlanningArgs {
    /// Address of a Planning service (`planning.v1.PlanningService`, e.g. `planning:50051`)
    /// told with `UpdateTask` when a subtask of a planning session ends. Each binary reports the
    /// ends it makes, so set it on both: callback-worker a runner's answer or error, a deadline,
    /// and a council subtask's decision (or its failure or timeout); dispatcher a cancel
    /// (`CancelTask`) and the close of the subtask's session (`CloseSession`). Best effort: a
    /// failed call is logged and counted, never retried. Unset: not told.
    #[arg(long, env = "FLEET_PLANNING_ADDR")]
    pub planning_addr: Option<String>,

    /// Milliseconds to wait for the Planning service (to connect, and for each call).
    #[arg(long, env = "FLEET_PLANNING_TIMEOUT_MS", default_value_t = 2000)]
    pub planning_timeout_ms: u64,
}

impl PlanningArgs {
    /// The notifier these flags ask for; `None` without an address.
    pub fn notifier(&self) -> Result<Option<PlanningNotifier>, tonic::transport::Error> {
        let timeout = Duration::from_millis(self.planning_timeout_ms.max(1));
        self.planning_addr
            .as_deref()
            .map(|addr| PlanningNotifier::new(addr, timeout))
            .transpose()
    }
}

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

/// The task state a final deliberation status stands for.
fn task_state_of(status: Status) -> TaskState {
    match status {
        Status::Completed => TaskState::Completed,
        Status::TimedOut => TaskState::TimedOut,
        Status::Cancelled => TaskState::Cancelled,
        _ => TaskState::Failed,
    }
}

/// The report of deliberation `view`'s end, when it is a council subtask that has ended: the
/// winning proposal's content when it has a winner, its error otherwise.
fn deliberation_update(view: &DeliberationView) -> Option<UpdateTaskRequest> {
    let spec = &view.spec;
    if !view.status.is_terminal() || !is_council_subtask(spec) {
        return None;
    }
    let result = decision_of(view).map_or_else(|| view.error.clone(), |d| d.winner_content);
    Some(UpdateTaskRequest {
        task_id: spec.deliberation_id.clone(),
        status: planning_status(task_state_of(view.status)).into(),
        result,
        case_id: spec.case_id.clone(),
        plan_id: spec.plan_id.clone(),
        role: spec.role.clone(),
    })
}

/// The report of task `t` of session `sid` as its hash records it (its answer, or its error
/// message: the reason of a cancel); `None` when it cannot be read.
async fn task_update(tasks: &TaskStore, sid: &str, t: &EndedTask) -> Option<UpdateTaskRequest> {
    let view = match tasks.get(sid, &t.task_id).await {
        Ok(Some(v)) => v,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(task_id = %t.task_id, error = %e, "reading an ended subtask failed; Planning is not told");
            return None;
        }
    };
    let meta = |k: &str| {
        view.metadata
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    Some(UpdateTaskRequest {
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
    })
}

impl PlanningNotifier {
    /// A lazily connecting client of `addr` (`http://host:port`, or `host:port`).
    pub fn new(addr: &str, timeout: Duration) -> Result<Self, tonic::transport::Error> {
        let channel = fleet_proto::lazy_channel(addr, timeout)?;
        Ok(Self {
            client: PlanningServiceClient::new(channel),
            timeout,
        })
    }

    /// Reports the tasks of session `sid` that an `apply` call just ended, if it is a planning
    /// session, in the background.
    pub fn tasks_ended(&self, tasks: &TaskStore, sid: &str, ended: &[EndedTask]) {
        if !sid.starts_with(SESSION_PREFIX) || ended.is_empty() {
            return;
        }
        let (me, tasks, sid, ended) = (self.clone(), tasks.clone(), sid.to_owned(), ended.to_vec());
        tokio::spawn(async move {
            for t in ended {
                if let Some(request) = task_update(&tasks, &sid, &t).await {
                    me.send(request).await;
                }
            }
        });
    }

    /// Reports the end of deliberation `view`, if it is a council subtask, in the background.
    pub fn deliberation_ended(&self, view: &DeliberationView) {
        let Some(request) = deliberation_update(view) else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move { me.send(request).await });
    }

    /// Calls `UpdateTask` once; counts and logs how it went.
    async fn send(&self, request: UpdateTaskRequest) {
        let task_id = request.task_id.clone();
        let mut client = self.client.clone();
        let outcome = tokio::time::timeout(self.timeout, client.update_task(request)).await;
        let ok = matches!(outcome, Ok(Ok(_)));
        metrics::counter!("fleet_planning_updates_total", "ok" => if ok { "true" } else { "false" })
            .increment(1);
        match outcome {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                tracing::warn!(%task_id, code = ?status.code(), error = %status.message(), "Planning UpdateTask failed");
            }
            Err(_) => {
                tracing::warn!(%task_id, "Planning UpdateTask did not answer in time");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliberation::scoring::rank;
    use crate::deliberation::{Checks, Proposal};
    use crate::envelope::PlanningEvent;
    use crate::planning::PlanningRules;

    /// The deliberation of the built-in DESIGN rule's council subtask, `status`, with one
    /// proposal.
    fn council_subtask(status: Status) -> DeliberationView {
        let event = PlanningEvent {
            event_id: "e1".into(),
            event_type: "TRANSITION".into(),
            case_id: "US-7".into(),
            plan_id: "P-7".into(),
            from_state: "BACKLOG".into(),
            to_state: "DESIGN".into(),
            timestamp: "2026-01-01T10:00:00Z".into(),
            metadata: serde_json::Value::Null,
        };
        let design = PlanningRules::builtin().derive(&event, &[], &[]);
        let spec = design[0].deliberation_spec(1_000);
        let proposal = Proposal {
            member: "ARCHITECT-1".into(),
            agent_id: "a1".into(),
            round: 1,
            content: "the design".into(),
            checks: Checks::default(),
            self_score: None,
            received_ms: 2_000,
        };
        let won = status == Status::Completed;
        DeliberationView {
            status,
            round: 1,
            members: Vec::new(),
            received: Default::default(),
            ranked: rank(vec![proposal.clone()], &spec.rubric),
            winner: won.then(|| proposal.member.clone()),
            winner_id: won.then(|| proposal.id(&spec.deliberation_id)),
            selected_by: String::new(),
            architect: None,
            error: if won {
                String::new()
            } else {
                "only 1 of 3 agents answered before the deadline (quorum 2)".into()
            },
            context: String::new(),
            created_ms: 1_000,
            started_ms: None,
            finished_ms: None,
            updated_ms: 1_000,
            settled: false,
            spec,
        }
    }

    #[test]
    fn a_council_subtask_with_a_winner_is_reported_completed_with_its_content() {
        let view = council_subtask(Status::Completed);
        let u = deliberation_update(&view).unwrap();
        assert_eq!(u.task_id, view.spec.deliberation_id);
        assert_eq!(
            (u.status.as_str(), u.result.as_str()),
            ("COMPLETED", "the design")
        );
        assert_eq!(
            (u.case_id.as_str(), u.plan_id.as_str(), u.role.as_str()),
            ("US-7", "P-7", "ARCHITECT")
        );
    }

    #[test]
    fn a_council_subtask_without_a_winner_is_reported_as_it_ended_with_its_error() {
        for (status, expected) in [(Status::TimedOut, "TIMED_OUT"), (Status::Failed, "FAILED")] {
            let u = deliberation_update(&council_subtask(status)).unwrap();
            assert_eq!(u.status, expected);
            assert!(u.result.contains("quorum 2"), "{}", u.result);
        }
    }

    #[test]
    fn a_cancelled_council_subtask_is_reported_cancelled_with_its_reason() {
        let mut view = council_subtask(Status::Cancelled);
        view.error = "the session was closed".into();
        let u = deliberation_update(&view).unwrap();
        assert_eq!(
            (u.status.as_str(), u.result.as_str()),
            ("CANCELLED", "the session was closed")
        );
    }

    #[test]
    fn an_open_or_plain_deliberation_is_not_reported() {
        assert_eq!(deliberation_update(&council_subtask(Status::Scoring)), None);
        let mut plain = council_subtask(Status::Completed);
        plain.spec.deliberation_id = "d-1".into();
        assert_eq!(deliberation_update(&plain), None);
    }
}
