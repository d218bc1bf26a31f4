//! `DeriveSubtasks` (a preview from the rules, nothing written; its ids are the preview's own,
//! as it has no transition) and `ProcessPlanningEvent` (the same path as NATS `agile.events`: a
//! `planning.event` on `fleet:tasks`; the dispatchers derive, create and send the subtasks, once
//! per transition, see [`planning::transition_id`]). The answer's ids are those the dispatchers
//! derive from the same event, `event_id` filled in first.

use fleet::envelope::{Envelope, PlanningEvent, TaskCommand};
use fleet::planning::{self, DEFAULT_STRATEGY};
use fleet::stream::producer;
use fleet::time::now_ms;
use fleet_proto::orchestrator::v1 as pb;
use fred::prelude::*;
use tonic::{Request, Status};
use tracing::Span;

use super::{Orchestrator, convert, error};

/// Most extra constraints and roles a preview takes.
const MAX_LIST: usize = 64;

impl Orchestrator {
    #[tracing::instrument(skip_all, fields(case_id))]
    pub async fn derive_subtasks_rpc(
        &self,
        req: Request<pb::DeriveSubtasksRequest>,
    ) -> Result<pb::DeriveSubtasksResponse, Status> {
        let req = req.into_inner();
        Span::current().record("case_id", req.case_id.as_str());
        let strategy = if req.strategy.trim().is_empty() {
            DEFAULT_STRATEGY.to_owned()
        } else {
            req.strategy.trim().to_ascii_uppercase()
        };
        if self.rules.rule(&strategy).is_none() {
            let known: Vec<&str> = self
                .rules
                .rules
                .iter()
                .map(|r| r.to_state.as_str())
                .collect();
            return Err(Status::invalid_argument(format!(
                "no rule for strategy `{}`; known: {}",
                strategy.chars().take(32).collect::<String>(),
                known.join(", ")
            )));
        }
        if req.roles.len() > MAX_LIST || req.constraints.len() > MAX_LIST {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_LIST} roles and {MAX_LIST} constraints"
            )));
        }
        let mut roles = Vec::new();
        for r in &req.roles {
            roles.push(fleet::deliberation::parse_role(r).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "role `{}` is not one of {}",
                    r.chars().take(32).collect::<String>(),
                    fleet::deliberation::ROLES.join(", ")
                ))
            })?);
        }
        let event = PlanningEvent {
            event_id: String::new(),
            event_type: "PREVIEW".into(),
            case_id: req.case_id,
            plan_id: req.plan_id,
            from_state: String::new(),
            to_state: strategy.clone(),
            timestamp: String::new(),
            metadata: serde_json::Value::Null,
        };
        planning::validate_event(&event).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let subtasks = self.rules.derive(&event, &roles, &req.constraints);
        Ok(pb::DeriveSubtasksResponse {
            subtasks: subtasks.iter().map(|s| convert::subtask(s, "")).collect(),
            strategy,
        })
    }

    #[tracing::instrument(skip_all, fields(case_id))]
    pub async fn process_planning_event_rpc(
        &self,
        req: Request<pb::PlanningEventRequest>,
    ) -> Result<pb::PlanningEventResponse, Status> {
        let req = req.into_inner();
        Span::current().record("case_id", req.case_id.as_str());
        if req.metadata.len() > MAX_LIST {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_LIST} metadata entries"
            )));
        }
        let mut event = PlanningEvent {
            event_id: req.event_id,
            event_type: req.event_type,
            case_id: req.case_id,
            plan_id: req.plan_id,
            from_state: req.from_state,
            to_state: req.to_state,
            timestamp: req.timestamp,
            metadata: serde_json::to_value(req.metadata).unwrap_or_default(),
        };
        planning::validate_event(&event).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if event.event_id.is_empty() {
            event.event_id = planning::event_id_of(&event);
        } else if event.event_id.len() > 256 {
            return Err(Status::invalid_argument(
                "event_id is at most 256 characters",
            ));
        }
        self.chat.backpressure.check().map_err(error::chat)?;
        let subtasks = self.rules.derive(&event, &[], &[]);
        let sid = planning::session_id(&event.case_id);
        // What exists already (an earlier copy of the event derived it).
        let pipeline = self.client().pipeline();
        for s in &subtasks {
            let (key, field) = if s.council > 0 {
                (self.keys().deliberation(&s.task_id), "status")
            } else {
                (self.keys().task(&sid, &s.task_id), "state")
            };
            let _: () = pipeline
                .hget(key, field)
                .await
                .map_err(error::unavailable)?;
        }
        let _: () = pipeline
            .hget(self.keys().session(&sid), "state")
            .await
            .map_err(error::unavailable)?;
        let mut states: Vec<Option<String>> = if subtasks.is_empty() {
            Vec::new()
        } else {
            pipeline.all().await.map_err(error::unavailable)?
        };
        let closed = states.pop().flatten().as_deref() == Some("closed");
        let already = states.iter().filter(|s| s.is_some()).count();
        // The dispatchers derive nothing for a closed planning session (they dead-letter the
        // event), so accepting it would promise subtasks that never come. A retry of an event
        // derived before the close is answered as before.
        if closed && already < subtasks.len() {
            return Err(Status::failed_precondition(format!(
                "the planning session {sid} is closed: no subtask would be derived"
            )));
        }
        let env = Envelope::new(TaskCommand::PlanningEvent(event.clone()));
        producer::send(self.client(), &self.keys().tasks(), None, &env)
            .await
            .map_err(error::unavailable)?;
        metrics::counter!("fleet_planning_events_total", "source" => "grpc").increment(1);
        tracing::info!(event_id = %event.event_id, to_state = %event.to_state, subtasks = subtasks.len(), already, "planning event accepted");
        let expires = now_ms() + self.chat.limits.token_ttl.as_millis() as i64;
        Ok(pb::PlanningEventResponse {
            accepted: true,
            event_id: event.event_id,
            subtasks: subtasks
                .iter()
                .zip(
                    states
                        .iter()
                        .map(|s| s.clone().unwrap_or_default())
                        .chain(std::iter::repeat(String::new())),
                )
                .map(|(s, state)| convert::subtask(s, &state))
                .collect(),
            already_derived: already as i32,
            session_token: if subtasks.is_empty() {
                String::new()
            } else {
                self.chat.tokens.sign(&sid, expires)
            },
            session_id: sid,
        })
    }
}
