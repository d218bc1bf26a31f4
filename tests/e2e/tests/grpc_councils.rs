//! Councils over gRPC: agents register (and heartbeat) per role, councils are defined, listed
//! with their health, and deleted; status and metrics count them.

use fleet_e2e::deliberation::{DelibFleet, DelibOptions};
use fleet_proto::orchestrator::v1 as pb;
use tonic::Code;

fn register(id: &str, role: &str) -> pb::RegisterAgentRequest {
    pb::RegisterAgentRequest {
        agent_id: id.into(),
        role: role.into(),
        capabilities: vec!["rust".into()],
        heartbeat_ms: 60_000,
        ..Default::default()
    }
}

#[tokio::test]
async fn councils_register_list_report_and_delete() {
    let fleet = DelibFleet::start(DelibOptions::default()).await;
    let mut grpc = fleet.grpc(0).await;
    let first = grpc
        .register_agent(register("a1", "dev"))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let agent = first.agent.unwrap();
    assert_eq!(
        (agent.role.as_str(), agent.status.as_str()),
        ("DEV", "ready")
    );
    assert!(
        !grpc
            .register_agent(register("a1", "DEV"))
            .await
            .unwrap()
            .into_inner()
            .created,
        "a heartbeat"
    );
    grpc.register_agent(register("a2", "DEV")).await.unwrap();
    grpc.register_agent(register("q1", "QA")).await.unwrap();

    let council = grpc
        .create_council(pb::CreateCouncilRequest {
            role: "DEV".into(),
            num_agents: 2,
            agent_type: "MOCK".into(),
            config: [("model".to_owned(), "none".to_owned())].into(),
        })
        .await
        .unwrap()
        .into_inner()
        .council
        .unwrap();
    assert_eq!(
        (
            council.role.as_str(),
            council.health.as_str(),
            council.ready
        ),
        ("DEV", "healthy", 2)
    );
    let err = grpc
        .create_council(pb::CreateCouncilRequest {
            role: "DEV".into(),
            num_agents: 3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // A busy heartbeat.
    grpc.register_agent(pb::RegisterAgentRequest {
        status: "busy".into(),
        ..register("a2", "DEV")
    })
    .await
    .unwrap();
    let councils = grpc
        .list_councils(pb::ListCouncilsRequest {
            include_agents: true,
        })
        .await
        .unwrap()
        .into_inner()
        .councils;
    let roles: Vec<(&str, bool)> = councils
        .iter()
        .map(|c| (c.role.as_str(), c.defined))
        .collect();
    assert_eq!(roles, [("DEV", true), ("QA", false)]);
    let dev = &councils[0];
    assert_eq!(
        (dev.ready, dev.busy, dev.health.as_str()),
        (1, 1, "degraded")
    );
    assert_eq!(dev.agents.len(), 2);
    assert_eq!(dev.agents[0].capabilities, ["rust"]);

    let status = grpc
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.councils, 1);
    let dev_count = status.roles.iter().find(|r| r.role == "DEV").unwrap();
    assert_eq!((dev_count.agents_ready, dev_count.agents_busy), (1, 1));
    let metrics = grpc
        .get_metrics(pb::GetMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metrics.agents_per_role.get("DEV"), Some(&2));
    assert_eq!(metrics.agents_per_role.get("QA"), Some(&1));
    let dev_health = metrics.councils.iter().find(|c| c.role == "DEV").unwrap();
    assert_eq!(
        (dev_health.health.as_str(), dev_health.wanted),
        ("degraded", 2)
    );

    assert!(
        grpc.unregister_agent(pb::UnregisterAgentRequest {
            agent_id: "a1".into()
        })
        .await
        .unwrap()
        .into_inner()
        .removed
    );
    let deleted = grpc
        .delete_council(pb::DeleteCouncilRequest { role: "dev".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((deleted.deleted, deleted.agents_removed), (true, 1));
    let councils = grpc
        .list_councils(pb::ListCouncilsRequest {
            include_agents: false,
        })
        .await
        .unwrap()
        .into_inner()
        .councils;
    assert_eq!(councils.len(), 1);
    assert_eq!(councils[0].role, "QA");
    assert!(councils[0].agents.is_empty(), "agents only when asked");
    fleet.stop().await;
}
