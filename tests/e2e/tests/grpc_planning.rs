//! Planning events over gRPC (and replayed as NATS would): subtasks derived once per transition
//! with deterministic ids, tracked as tasks of the case's planning session, sent once to the
//! role's agents and to NATS `agent.requests`, answered by mock agents; a council subtask is
//! cancelled by `CancelTask` and by `CloseSession` of its planning session.

use std::collections::BTreeSet;
use std::time::Duration;

use fleet::envelope::{AgentMessage, Envelope, Outbound, PlanningEvent, TaskCommand};
use fleet::keys::GROUP_DISPATCHERS;
use fleet::stream::{groups, producer};
use fleet::testing::PlanningServer;
use fleet_e2e::deliberation::{AgentSpec, DelibFleet, DelibOptions, completed_deliberation};
use fleet_proto::orchestrator::v1 as pb;
use fleet_proto::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient;
use fred::prelude::*;
use tonic::transport::Channel;

fn event() -> pb::PlanningEventRequest {
    pb::PlanningEventRequest {
        event_type: "TRANSITION".into(),
        case_id: "US-42".into(),
        plan_id: "P-1".into(),
        from_state: "DESIGN".into(),
        to_state: "BUILD".into(),
        timestamp: "2026-11-21T12:00:00Z".into(),
        metadata: Default::default(),
        event_id: "agile.events:17".into(),
    }
}

#[tokio::test]
async fn a_planning_event_processed_twice_derives_its_subtasks_once() {
    let fleet = DelibFleet::start(DelibOptions {
        agents: vec![AgentSpec::mock(&["DEV", "QA", "DEVOPS"])],
        ..Default::default()
    })
    .await;
    let mut grpc = fleet.grpc(0).await;

    let first = grpc
        .process_planning_event(event())
        .await
        .unwrap()
        .into_inner();
    assert!(first.accepted);
    assert_eq!(first.session_id, "plan-US-42");
    assert_eq!(first.already_derived, 0);
    let roles: Vec<&str> = first.subtasks.iter().map(|s| s.role.as_str()).collect();
    assert_eq!(roles, ["DEV", "QA", "DEVOPS"]);
    assert_eq!(
        first.subtasks[1].dependencies,
        [first.subtasks[0].task_id.clone()]
    );
    let ids: BTreeSet<String> = first.subtasks.iter().map(|s| s.task_id.clone()).collect();

    // The preview derives the same subtasks, under ids of its own: ids belong to a transition,
    // which a preview does not have.
    let preview = grpc
        .derive_subtasks(pb::DeriveSubtasksRequest {
            case_id: "US-42".into(),
            plan_id: "P-1".into(),
            roles: vec![],
            strategy: "build".into(),
            constraints: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let preview_ids: BTreeSet<String> =
        preview.subtasks.iter().map(|s| s.task_id.clone()).collect();
    assert!(preview_ids.is_disjoint(&ids));
    let preview_roles: Vec<&str> = preview.subtasks.iter().map(|s| s.role.as_str()).collect();
    assert_eq!(preview_roles, roles);

    // Wait for the first copy to be derived, then send it again, over gRPC and as nats-bridge
    // would (the same planning.event on fleet:tasks).
    let chat = &fleet.base.chat;
    fleet_test_support::eventually(
        Duration::from_secs(10),
        "three subtasks tracked",
        || async {
            let s = chat.status("plan-US-42").await.ok()?;
            (s.totals.tasks == 3).then_some(())
        },
    )
    .await;
    let second = grpc
        .process_planning_event(event())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.already_derived, 3);
    let replay = Envelope::new(TaskCommand::PlanningEvent(PlanningEvent {
        event_id: "agile.events:17".into(),
        event_type: "TRANSITION".into(),
        case_id: "US-42".into(),
        plan_id: "P-1".into(),
        from_state: "DESIGN".into(),
        to_state: "BUILD".into(),
        timestamp: "2026-11-21T12:00:00Z".into(),
        metadata: serde_json::Value::Null,
    }));
    producer::send(fleet.client(), &fleet.keys().tasks(), None, &replay)
        .await
        .unwrap();
    let (client, tasks) = (fleet.client().clone(), fleet.keys().tasks());
    fleet_test_support::eventually(Duration::from_secs(10), "every copy handled", || {
        let (client, tasks) = (client.clone(), tasks.clone());
        async move {
            let g = groups::group(&client, &tasks, GROUP_DISPATCHERS)
                .await
                .ok()??;
            (g.lag == Some(0) && g.pending == 0 && g.last_delivered.ms > 0).then_some(())
        }
    })
    .await;

    // Derived once: three tasks, three agent requests, three NATS publishes.
    assert_eq!(chat.status("plan-US-42").await.unwrap().totals.tasks, 3);
    let mut requested = BTreeSet::new();
    for role in ["DEV", "QA", "DEVOPS"] {
        let reqs: Vec<AgentMessage> = fleet.entries(&fleet.keys().agents(role)).await;
        assert_eq!(reqs.len(), 1, "{role} asked once");
        let AgentMessage::Request(r) = &reqs[0];
        assert_eq!(
            (r.session_id.as_str(), r.role.as_str()),
            ("plan-US-42", role)
        );
        requested.insert(r.task_id.clone());
    }
    assert_eq!(requested, ids);
    let outbound: Vec<Outbound> = fleet.entries(&fleet.keys().outbound()).await;
    let published: BTreeSet<String> = outbound
        .iter()
        .filter(|Outbound::Publish(p)| p.subject == "agent.requests")
        .map(|Outbound::Publish(p)| {
            let v: serde_json::Value = serde_json::from_str(&p.payload).unwrap();
            assert_eq!(v["session_id"], "plan-US-42");
            v["task_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(published, ids);
    assert_eq!(outbound.len(), 3);

    // The mock agents answer; each subtask is readable like any task of the session.
    for id in &ids {
        let task =
            fleet_test_support::eventually(Duration::from_secs(10), "subtask completed", || {
                let mut grpc = grpc.clone();
                let (id, token) = (id.clone(), first.session_token.clone());
                async move {
                    let t = grpc
                        .get_task(pb::GetTaskRequest {
                            session_id: "plan-US-42".into(),
                            session_token: token,
                            task_id: id,
                        })
                        .await
                        .ok()?
                        .into_inner();
                    (t.state == "completed").then_some(t)
                }
            })
            .await;
        assert!(task.result.contains("mock"), "{}", task.result);
        assert!(task.metadata_json.contains("\"kind\":\"subtask\""));
    }
    let status = grpc
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.planning_events_total, 3);
    fleet.stop().await;
}

#[tokio::test]
async fn transitions_without_a_rule_derive_nothing_and_bad_events_are_refused() {
    let fleet = DelibFleet::start(DelibOptions::default()).await;
    let mut grpc = fleet.grpc(0).await;
    let mut e = event();
    e.to_state = "DONE".into();
    let res = grpc.process_planning_event(e).await.unwrap().into_inner();
    assert!(res.accepted && res.subtasks.is_empty());
    let mut bad = event();
    bad.case_id = "US 42".into();
    let err = grpc.process_planning_event(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("case_id"));
    // A transition that names no target state, or a timestamp of a megabyte: refused, not
    // accepted to derive nothing (or to carry the megabyte to every dispatcher).
    let mut bad = event();
    bad.to_state = String::new();
    let err = grpc.process_planning_event(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("to_state"), "{}", err.message());
    let mut bad = event();
    bad.timestamp = "9".repeat(1 << 20);
    let err = grpc.process_planning_event(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("timestamp"), "{}", err.message());
    let err = grpc
        .derive_subtasks(pb::DeriveSubtasksRequest {
            case_id: "US-1".into(),
            strategy: "LAUNCH".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("BUILD"), "{}", err.message());
    fleet.stop().await;
}

#[tokio::test]
async fn a_design_transition_starts_an_async_deliberation_queryable_by_its_id() {
    let fleet = DelibFleet::start(DelibOptions {
        agents: vec![AgentSpec::mock(&["ARCHITECT", "DATA"])],
        ..Default::default()
    })
    .await;
    let mut grpc = fleet.grpc(0).await;
    let design = || pb::PlanningEventRequest {
        event_type: "TRANSITION".into(),
        case_id: "US-77".into(),
        plan_id: "P-3".into(),
        from_state: "DRAFT".into(),
        to_state: "DESIGN".into(),
        event_id: "agile.events:5".into(),
        ..Default::default()
    };
    let res = grpc
        .process_planning_event(design())
        .await
        .unwrap()
        .into_inner();
    let architecture = &res.subtasks[0];
    assert_eq!(
        (architecture.role.as_str(), architecture.council),
        ("ARCHITECT", 3)
    );
    let id = architecture.task_id.clone();
    let result = completed_deliberation(&grpc, &id).await;
    assert_eq!(
        (
            result.results.len(),
            result.case_id.as_str(),
            result.plan_id.as_str()
        ),
        (3, "US-77", "P-3")
    );
    // Replayed: nothing new, the same deliberation.
    let again = grpc
        .process_planning_event(design())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.already_derived, 2);
    assert_eq!(again.subtasks[0].state, "completed");
    // Counters are written just after a deliberation ends, so a reply may come before them;
    // the replay must not add one.
    let status =
        fleet_test_support::eventually(Duration::from_secs(10), "the deliberation counted", || {
            let mut grpc = grpc.clone();
            async move {
                let status = grpc
                    .get_status(pb::GetStatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                (status.deliberations_total > 0).then_some(status)
            }
        })
        .await;
    assert_eq!(status.deliberations_total, 1);
    fleet.stop().await;
}

#[tokio::test]
async fn an_event_for_a_closed_planning_session_is_refused() {
    let fleet = DelibFleet::start(DelibOptions::default()).await;
    let mut grpc = fleet.grpc(0).await;
    let first = grpc
        .process_planning_event(event())
        .await
        .unwrap()
        .into_inner();
    let chat = &fleet.base.chat;
    fleet_test_support::eventually(Duration::from_secs(10), "subtasks tracked", || async {
        let s = chat.status("plan-US-42").await.ok()?;
        (s.totals.tasks == 3).then_some(())
    })
    .await;
    grpc.close_session(pb::CloseSessionRequest {
        session_id: first.session_id.clone(),
        session_token: first.session_token.clone(),
        reason: "case abandoned".into(),
    })
    .await
    .unwrap();
    fleet_test_support::eventually(Duration::from_secs(10), "the session closed", || async {
        let s = chat.status("plan-US-42").await.ok()?;
        (s.state == "closed").then_some(())
    })
    .await;

    // A later transition of the case: the dispatchers would derive nothing, so it is not
    // accepted with subtasks that never come.
    let mut rework = event();
    rework.from_state = "TEST".into();
    rework.timestamp = "2026-11-22T12:00:00Z".into();
    rework.event_id = "agile.events:18".into();
    let err = grpc.process_planning_event(rework).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("plan-US-42 is closed"),
        "{}",
        err.message()
    );
    assert_eq!(chat.status("plan-US-42").await.unwrap().totals.tasks, 3);
    // A retry of the event derived before the close is answered as before.
    let retry = grpc
        .process_planning_event(event())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.already_derived, 3);
    fleet.stop().await;
}

/// Waits (up to 15 s) until deliberation `task_id` reads `status`; returns its result.
async fn deliberation_in(
    grpc: &OrchestratorServiceClient<Channel>,
    task_id: &str,
    status: pb::DeliberationStatus,
) -> pb::GetDeliberationResultResponse {
    let what = format!("deliberation {task_id} {status:?}");
    fleet_test_support::eventually(Duration::from_secs(15), &what, || {
        let mut grpc = grpc.clone();
        let task_id = task_id.to_owned();
        async move {
            let r = grpc
                .get_deliberation_result(pb::GetDeliberationResultRequest { task_id })
                .await
                .ok()?
                .into_inner();
            (r.status == status as i32).then_some(r)
        }
    })
    .await
}

#[tokio::test]
async fn a_council_subtask_is_cancelled_by_cancel_task_and_by_closing_its_session() {
    // No ARCHITECT agent: the councils wait for proposals until they are cancelled.
    let mut planning = PlanningServer::start().await;
    let fleet = DelibFleet::start(DelibOptions {
        dispatcher_args: vec!["--planning-addr".into(), planning.addr.clone()],
        callback_args: vec!["--planning-addr".into(), planning.addr.clone()],
        ..Default::default()
    })
    .await;
    let mut grpc = fleet.grpc(0).await;
    let design = |case: &str| pb::PlanningEventRequest {
        event_type: "TRANSITION".into(),
        case_id: case.into(),
        plan_id: "P-5".into(),
        from_state: "DRAFT".into(),
        to_state: "DESIGN".into(),
        event_id: format!("agile.events:{case}"),
        ..Default::default()
    };
    let first = grpc
        .process_planning_event(design("US-90"))
        .await
        .unwrap()
        .into_inner();
    let council = first.subtasks[0].task_id.clone();
    assert_eq!(first.subtasks[0].council, 3);
    deliberation_in(&grpc, &council, pb::DeliberationStatus::InProgress).await;
    let second = grpc
        .process_planning_event(design("US-91"))
        .await
        .unwrap()
        .into_inner();
    let other = second.subtasks[0].task_id.clone();
    deliberation_in(&grpc, &other, pb::DeliberationStatus::InProgress).await;

    // Not a council of the caller's session: NOT_FOUND, as before.
    let err = grpc
        .cancel_task(pb::CancelTaskRequest {
            session_id: second.session_id.clone(),
            session_token: second.session_token.clone(),
            task_id: council.clone(),
            reason: "wrong case".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let cancel = || pb::CancelTaskRequest {
        session_id: first.session_id.clone(),
        session_token: first.session_token.clone(),
        task_id: council.clone(),
        reason: "the design is settled elsewhere".into(),
    };
    let res = grpc.cancel_task(cancel()).await.unwrap().into_inner();
    assert_eq!(
        (res.task_id.as_str(), res.status.as_str()),
        (council.as_str(), "cancelling")
    );
    let result = deliberation_in(&grpc, &council, pb::DeliberationStatus::Cancelled).await;
    assert_eq!(result.error, "the design is settled elsewhere");
    let told = planning.next_update().await;
    assert_eq!(
        (
            told.task_id.as_str(),
            told.status.as_str(),
            told.result.as_str()
        ),
        (
            council.as_str(),
            "CANCELLED",
            "the design is settled elsewhere"
        )
    );
    // Again: answered with its final state.
    let res = grpc.cancel_task(cancel()).await.unwrap().into_inner();
    assert_eq!(res.status, "cancelled");

    // Its update stream ends with the cancel.
    let reader = fleet.client().clone_new();
    reader.init().await.unwrap();
    let updates = fleet::deliberation::DeliberationStore::read_updates(
        &reader,
        fleet.keys(),
        &council,
        fleet::stream::entry::StreamId::ZERO,
        100,
        None,
    )
    .await
    .unwrap();
    assert_eq!(updates.last().unwrap().status, "cancelled");

    // Closing US-91's planning session cancels its council (and its DATA task).
    grpc.close_session(pb::CloseSessionRequest {
        session_id: second.session_id.clone(),
        session_token: second.session_token.clone(),
        reason: "case abandoned".into(),
    })
    .await
    .unwrap();
    let result = deliberation_in(&grpc, &other, pb::DeliberationStatus::Cancelled).await;
    assert_eq!(result.error, "the session was closed");
    let mut told: Vec<_> = planning
        .next_updates(2)
        .await
        .into_iter()
        .map(|u| (u.task_id, u.status))
        .collect();
    told.sort();
    let mut want = vec![
        (other.clone(), "CANCELLED".to_owned()),
        (second.subtasks[1].task_id.clone(), "CANCELLED".to_owned()),
    ];
    want.sort();
    assert_eq!(told, want);

    // REST cancels a council subtask as gRPC does: 202 while it runs, 200 with its state after.
    let third = grpc
        .process_planning_event(design("US-92"))
        .await
        .unwrap()
        .into_inner();
    let council = third.subtasks[0].task_id.clone();
    deliberation_in(&grpc, &council, pb::DeliberationStatus::InProgress).await;
    let url = format!(
        "{}/api/v1/chat/{}/tasks/{council}",
        fleet.rest(0),
        third.session_id
    );
    let delete = || async {
        let res = reqwest::Client::new()
            .delete(&url)
            .bearer_auth(&third.session_token)
            .send()
            .await
            .unwrap();
        let code = res.status().as_u16();
        let body: serde_json::Value = res.json().await.unwrap();
        (code, body["task_id"].clone(), body["status"].clone())
    };
    assert_eq!(
        delete().await,
        (202, council.clone().into(), "cancelling".into())
    );
    let result = deliberation_in(&grpc, &council, pb::DeliberationStatus::Cancelled).await;
    assert_eq!(result.error, "cancelled by the client");
    let told = planning.next_update().await;
    assert_eq!(
        (told.task_id.as_str(), told.status.as_str()),
        (council.as_str(), "CANCELLED")
    );
    assert_eq!(
        delete().await,
        (200, council.clone().into(), "cancelled".into())
    );
    fleet.stop().await;
}
