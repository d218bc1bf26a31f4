//! Optional hydration against real (in-test) gRPC servers: with a Context service configured,
//! agent requests carry its `GetContext` answer; with a Planning service configured, subtasks
//! that end are reported with `UpdateTask`.

use fleet::testing::PlanningServer;
use fleet_e2e::deliberation::{AgentSpec, DelibFleet, DelibOptions, deliberate};
use fleet_proto::context::v1::context_service_server::{ContextService, ContextServiceServer};
use fleet_proto::context::v1::{GetContextRequest, GetContextResponse};
use fleet_proto::orchestrator::v1 as pb;
use tonic::{Request, Response, Status};

struct Context;

#[tonic::async_trait]
impl ContextService for Context {
    async fn get_context(
        &self,
        req: Request<GetContextRequest>,
    ) -> Result<Response<GetContextResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(GetContextResponse {
            context: format!("ctx:{}/{}/{}", r.story_id, r.role, r.phase),
            ..Default::default()
        }))
    }
}

/// Serves `router` on a free port; returns its address.
async fn serve(router: tonic::transport::server::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(router.serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)));
    addr.to_string()
}

#[tokio::test]
async fn agent_requests_carry_context_and_subtask_endings_reach_planning() {
    let context =
        serve(tonic::transport::Server::builder().add_service(ContextServiceServer::new(Context)))
            .await;
    let mut planning = PlanningServer::start().await;
    // DEV agents echo their whole request (the context included) as their answer.
    let fleet = DelibFleet::start(DelibOptions {
        agents: vec![
            AgentSpec {
                mode: "command",
                extra: vec!["--command".into(), "cat".into()],
                ..AgentSpec::mock(&["DEV"])
            },
            AgentSpec::mock(&["QA", "DEVOPS"]),
        ],
        dispatcher_args: vec!["--context-addr".into(), context],
        callback_args: vec!["--planning-addr".into(), planning.addr.clone()],
        ..Default::default()
    })
    .await;
    let mut grpc = fleet.grpc(0).await;
    let mut req = deliberate("hydrated-1", "DEV", 1, 1, 20_000);
    req.story_id = "ST-5".into();
    let res = grpc.deliberate(req).await.unwrap().into_inner();
    assert_eq!(res.status, pb::DeliberationStatus::Completed as i32);
    assert!(
        res.results[0].content.contains("ctx:ST-5/DEV/deliberation"),
        "{}",
        res.results[0].content
    );

    grpc.process_planning_event(pb::PlanningEventRequest {
        event_type: "TRANSITION".into(),
        case_id: "US-5".into(),
        plan_id: "P-5".into(),
        to_state: "BUILD".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let updates = planning.next_updates(3).await;
    assert!(
        updates
            .iter()
            .all(|u| u.status == "COMPLETED" && u.case_id == "US-5" && u.plan_id == "P-5")
    );
    let dev = updates.iter().find(|u| u.role == "DEV").unwrap();
    assert!(
        dev.result.contains("ctx:US-5/DEV/implement"),
        "{}",
        dev.result
    );
    fleet.stop().await;
}
