//! A case re-entering a state over gRPC `ProcessPlanningEvent`: a retry of the same transition
//! (even under another `event_id`) answers the subtasks it derived before; a later transition
//! into the same state answers, creates and sends fresh ones, and a council subtask gets a new
//! deliberation, readable with `GetDeliberationResult` under its new id.

use std::collections::BTreeSet;
use std::time::Duration;

use fleet_e2e::deliberation::{AgentSpec, DelibFleet, DelibOptions, completed_deliberation};
use fleet_proto::orchestrator::v1 as pb;

fn transition(event_id: &str, from: &str, to: &str, timestamp: &str) -> pb::PlanningEventRequest {
    pb::PlanningEventRequest {
        event_type: "TRANSITION".into(),
        case_id: "US-808".into(),
        plan_id: "P-8".into(),
        from_state: from.into(),
        to_state: to.into(),
        timestamp: timestamp.into(),
        metadata: Default::default(),
        event_id: event_id.into(),
    }
}

fn ids(res: &pb::PlanningEventResponse) -> BTreeSet<String> {
    res.subtasks.iter().map(|s| s.task_id.clone()).collect()
}

#[tokio::test]
async fn a_rework_over_grpc_derives_fresh_subtasks_and_a_retry_does_not() {
    let fleet = DelibFleet::start(DelibOptions {
        agents: vec![AgentSpec::mock(&[
            "DEV",
            "QA",
            "DEVOPS",
            "ARCHITECT",
            "DATA",
        ])],
        ..Default::default()
    })
    .await;
    let mut grpc = fleet.grpc(0).await;
    let chat = &fleet.base.chat;
    let tasks_are = |n: i64| {
        let chat = chat.clone();
        async move {
            fleet_test_support::eventually(Duration::from_secs(15), "subtasks tracked", || {
                let chat = chat.clone();
                async move {
                    let s = chat.status("plan-US-808").await.ok()?;
                    (s.totals.tasks == n).then_some(())
                }
            })
            .await
        }
    };

    let build = grpc
        .process_planning_event(transition(
            "agile:1",
            "DESIGN",
            "BUILD",
            "2026-05-01T08:00:00Z",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((build.subtasks.len(), build.already_derived), (3, 0));
    tasks_are(3).await;
    // A publisher retry: another event_id, the same transition.
    let retry = grpc
        .process_planning_event(transition(
            "agile:2",
            "DESIGN",
            "BUILD",
            "2026-05-01T08:00:00Z",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.already_derived, 3);
    assert_eq!(ids(&retry), ids(&build));

    grpc.process_planning_event(transition(
        "agile:3",
        "BUILD",
        "TEST",
        "2026-05-02T08:00:00Z",
    ))
    .await
    .unwrap();
    tasks_are(5).await;
    let rework = grpc
        .process_planning_event(transition(
            "agile:4",
            "TEST",
            "BUILD",
            "2026-05-03T08:00:00Z",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rework.already_derived, 0, "rework is new work");
    assert!(ids(&rework).is_disjoint(&ids(&build)));
    assert_eq!(
        rework.subtasks[1].dependencies,
        [rework.subtasks[0].task_id.clone()]
    );
    tasks_are(8).await;

    // DESIGN twice: two deliberations, each complete under its own id.
    let mut councils = Vec::new();
    for (id, from, at) in [
        ("agile:5", "BUILD", "2026-05-04T08:00:00Z"),
        ("agile:6", "DEPLOY", "2026-05-05T08:00:00Z"),
    ] {
        let res = grpc
            .process_planning_event(transition(id, from, "DESIGN", at))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(res.already_derived, 0);
        assert_eq!(res.subtasks[0].council, 3);
        councils.push(res.subtasks[0].task_id.clone());
    }
    assert_ne!(councils[0], councils[1]);
    for id in councils {
        let result = completed_deliberation(&grpc, &id).await;
        assert_eq!(result.results.len(), 3);
    }
    fleet.stop().await;
}
