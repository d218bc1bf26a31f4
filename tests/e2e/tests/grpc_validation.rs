//! Bad input over gRPC: every invalid request gets INVALID_ARGUMENT with a message naming what
//! is wrong and changes nothing; unknown ids get NOT_FOUND.

use fleet_e2e::deliberation::{DelibFleet, DelibOptions, deliberate, open_grpc_session};
use fleet_proto::orchestrator::v1 as pb;
use fred::prelude::*;
use tonic::Code;

#[tokio::test]
async fn invalid_requests_get_invalid_argument_and_change_nothing() {
    let fleet = DelibFleet::start(DelibOptions::default()).await;
    let mut grpc = fleet.grpc(0).await;
    let valid = || deliberate("bad-1", "DEV", 3, 1, 5_000);
    let cases: Vec<(pb::DeliberateRequest, &str)> = vec![
        (
            pb::DeliberateRequest {
                task_description: "   ".into(),
                ..valid()
            },
            "task_description must not be empty",
        ),
        (
            pb::DeliberateRequest {
                role: "CEO".into(),
                ..valid()
            },
            "role `CEO` is not one of DEV, QA, ARCHITECT, DEVOPS, DATA",
        ),
        (
            pb::DeliberateRequest {
                num_agents: 0,
                ..valid()
            },
            "num_agents must be between 1 and 16",
        ),
        (
            pb::DeliberateRequest {
                num_agents: 100_000,
                ..valid()
            },
            "num_agents must be between 1 and 16",
        ),
        (
            pb::DeliberateRequest {
                num_agents: -2,
                ..valid()
            },
            "num_agents must not be negative",
        ),
        (
            pb::DeliberateRequest {
                rounds: 99,
                ..valid()
            },
            "rounds must be between 1 and 5",
        ),
        (
            pb::DeliberateRequest {
                rounds: -1,
                ..valid()
            },
            "rounds must not be negative",
        ),
        (
            pb::DeliberateRequest {
                min_proposals: 4,
                ..valid()
            },
            "min_proposals must be between 1 and num_agents",
        ),
        (
            pb::DeliberateRequest {
                task_id: "has space".into(),
                ..valid()
            },
            "task_id must be",
        ),
        (
            pb::DeliberateRequest {
                constraints: Some(pb::DeliberationConstraints {
                    timeout_seconds: 100_000,
                    ..Default::default()
                }),
                ..valid()
            },
            "the timeout must be at most 3600 seconds",
        ),
        (
            pb::DeliberateRequest {
                constraints: Some(pb::DeliberationConstraints {
                    rubric: Some(pb::Rubric {
                        weights: [("lint".to_owned(), -1.0)].into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..valid()
            },
            "rubric weight `lint` must be a finite number >= 0",
        ),
        (
            pb::DeliberateRequest {
                case_id: "US/1".into(),
                ..valid()
            },
            "case_id must be",
        ),
    ];
    for (req, want) in cases {
        for stream in [false, true] {
            let err = if stream {
                grpc.stream_deliberation(req.clone())
                    .await
                    .map(|_| ())
                    .unwrap_err()
            } else {
                grpc.deliberate(req.clone()).await.map(|_| ()).unwrap_err()
            };
            assert_eq!(err.code(), Code::InvalidArgument, "{want}: {err:?}");
            assert!(
                err.message().contains(want),
                "`{}` should say `{want}`",
                err.message()
            );
        }
    }
    let err = grpc
        .orchestrate(pb::OrchestrateRequest {
            task_description: "x".into(),
            role: "DEV".into(),
            options: Some(pb::OrchestrationOptions {
                use_architect_agent: true,
                architect_top_k: 50,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("architect_top_k"),
        "{}",
        err.message()
    );
    for (req, want) in [
        (
            pb::RegisterAgentRequest {
                agent_id: "a 1".into(),
                role: "DEV".into(),
                ..Default::default()
            },
            "agent_id",
        ),
        (
            pb::RegisterAgentRequest {
                agent_id: "a1".into(),
                role: "PM".into(),
                ..Default::default()
            },
            "role `PM`",
        ),
        (
            pb::RegisterAgentRequest {
                agent_id: "a1".into(),
                role: "DEV".into(),
                status: "sleepy".into(),
                ..Default::default()
            },
            "status must be ready or busy",
        ),
    ] {
        let err = grpc.register_agent(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(want), "{}", err.message());
    }
    let err = grpc
        .create_council(pb::CreateCouncilRequest {
            role: "QA".into(),
            num_agents: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Nothing was written: no command, no deliberation, no council.
    let queued: u64 = fleet.client().xlen(fleet.keys().tasks()).await.unwrap();
    assert_eq!(queued, 0);
    let (_, keys): (String, Vec<String>) = fleet
        .client()
        .scan_page("0", format!("{}:*", fleet.base.prefix), Some(1000), None)
        .await
        .unwrap();
    let p = &fleet.base.prefix;
    let harness = [
        format!("{p}:tasks"),
        format!("{p}:callbacks"),
        format!("{p}:agent:echo"),
        format!("{p}:agent-ids"),
    ];
    let written: Vec<&String> = keys.iter().filter(|k| !harness.contains(k)).collect();
    assert!(written.is_empty(), "nothing written, found {written:?}");
    fleet.stop().await;
}

#[tokio::test]
async fn unknown_ids_get_not_found() {
    let fleet = DelibFleet::start(DelibOptions::default()).await;
    let mut grpc = fleet.grpc(0).await;
    for id in ["never-started", "not a name"] {
        let err = grpc
            .get_deliberation_result(pb::GetDeliberationResultRequest { task_id: id.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(err.message().contains("not found"));
    }
    let err = grpc
        .get_deliberation_result(pb::GetDeliberationResultRequest {
            task_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = grpc
        .unregister_agent(pb::UnregisterAgentRequest {
            agent_id: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = grpc
        .delete_council(pb::DeleteCouncilRequest {
            role: "DATA".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = grpc
        .create_session(pb::CreateSessionRequest {
            agent_id: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let s = open_grpc_session(&mut grpc).await;
    let err = grpc
        .get_task(pb::GetTaskRequest {
            session_id: s.session_id.clone(),
            session_token: s.session_token.clone(),
            task_id: "no-such-task".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    fleet.stop().await;
}
