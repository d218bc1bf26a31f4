//! gRPC `Deliberate` end to end on a real redis-server with mock council agents: a full council
//! ranks every proposal; a killed agent process leaves the decision to the quorum rule; a
//! deadline shorter than the agents times out and cancels the stragglers; the client's own
//! deadline is honoured while the deliberation goes on.

use std::time::Duration;

use fleet::envelope::{AgentControl, DecisionMessage, Outbound};
use fleet_e2e::deliberation::{AgentSpec, DelibFleet, DelibOptions, deliberate, ready_agents};
use fleet_proto::orchestrator::v1 as pb;
use tonic::Code;

fn status(s: i32) -> pb::DeliberationStatus {
    pb::DeliberationStatus::try_from(s).unwrap()
}

#[tokio::test]
async fn deliberate_with_three_mock_agents_returns_three_ranked_proposals_and_the_winner() {
    let fleet = DelibFleet::start(DelibOptions {
        agents: vec![AgentSpec::mock(&["DEV"])],
        ..Default::default()
    })
    .await;
    let mut grpc = fleet.grpc(0).await;
    let mut req = deliberate("auth-1", "dev", 3, 1, 20_000);
    req.case_id = "US-7".into();
    let res = grpc.deliberate(req.clone()).await.unwrap().into_inner();

    assert_eq!(status(res.status), pb::DeliberationStatus::Completed);
    assert_eq!(
        (res.task_id.as_str(), res.num_agents, res.proposals_received),
        ("auth-1", 3, 3)
    );
    assert_eq!(res.results.len(), 3);
    let authors: Vec<&str> = res.results.iter().map(|p| p.author.as_str()).collect();
    let mut sorted = authors.clone();
    sorted.sort();
    assert_eq!(sorted, ["DEV-1", "DEV-2", "DEV-3"]);
    for (i, p) in res.results.iter().enumerate() {
        assert_eq!(p.rank as usize, i + 1);
        assert_eq!(p.role, "DEV");
        assert!(p.content.contains("Implement authentication"));
        let checks = p.checks.as_ref().unwrap();
        assert!(checks.policy.as_ref().unwrap().ran && checks.lint.as_ref().unwrap().ran);
    }
    for w in res.results.windows(2) {
        assert!(w[0].score >= w[1].score, "ranked by score");
    }
    assert_eq!(res.winner_id, res.results[0].id);

    // Idempotent on the task id: the same deliberation, not a second one.
    let again = grpc.deliberate(req).await.unwrap().into_inner();
    assert_eq!(again.winner_id, res.winner_id);
    let got = grpc
        .get_deliberation_result(pb::GetDeliberationResultRequest {
            task_id: "auth-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(got.status), pb::DeliberationStatus::Completed);
    assert_eq!(
        (got.phase.as_str(), got.case_id.as_str()),
        ("completed", "US-7")
    );
    assert_eq!(got.results, res.results);

    // The decision went to fleet:decisions and, for NATS, to fleet:outbound.
    let decisions: Vec<DecisionMessage> = fleet.entries(&fleet.keys().decisions()).await;
    assert_eq!(decisions.len(), 1);
    let DecisionMessage::Decision(d) = &decisions[0];
    assert_eq!(
        (d.case_id.as_str(), d.winner_id.as_str()),
        ("US-7", res.winner_id.as_str())
    );
    assert_eq!(d.alternatives.len(), 3);
    let outbound: Vec<Outbound> = fleet.entries(&fleet.keys().outbound()).await;
    assert!(outbound.iter().any(|Outbound::Publish(p)| {
        p.subject == "orchestrator.events" && p.payload.contains("deliberation.completed")
    }));

    let status = grpc
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status.deliberations_total, status.deliberations_completed),
        (1, 1)
    );
    let dev = status.roles.iter().find(|r| r.role == "DEV").unwrap();
    assert_eq!(dev.deliberations, 1);
    let metrics = grpc
        .get_metrics(pb::GetMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metrics.deliberation.unwrap().count, 1);
    fleet.stop().await;
}

#[tokio::test]
async fn a_killed_agent_process_leaves_the_decision_to_the_quorum() {
    let fleet = DelibFleet::start(DelibOptions::default()).await;
    let mut grpc = fleet.grpc(0).await;
    // Three registered agents as processes; heartbeats far apart, so a killed one still looks
    // ready and keeps being asked (on its own stream, which nobody else reads).
    let mut agents: Vec<_> = ["a1", "a2", "a3"]
        .into_iter()
        .map(|id| {
            fleet.spawn_agent(&AgentSpec {
                agent_id: Some(id.into()),
                extra: vec!["--heartbeat-ms".into(), "60000".into()],
                ..AgentSpec::mock(&["DEV"])
            })
        })
        .collect();
    ready_agents(&mut grpc, "DEV", 3).await;
    agents[1].kill();

    // Quorum 2 of 3: completes at the deadline with the two live agents' proposals.
    let mut req = deliberate("quorum-2", "DEV", 3, 1, 2_000);
    req.min_proposals = 2;
    let res = grpc.deliberate(req).await.unwrap().into_inner();
    assert_eq!(
        status(res.status),
        pb::DeliberationStatus::Completed,
        "{res:?}"
    );
    let mut authors: Vec<&str> = res.results.iter().map(|p| p.author.as_str()).collect();
    authors.sort();
    assert_eq!(authors, ["a1", "a3"]);
    assert_eq!(res.winner_id, res.results[0].id);
    assert!(res.results.iter().all(|p| p.agent_id == p.author));

    // Quorum 3 of 3: times out with what came in, and the straggler is told to stop.
    let mut req = deliberate("quorum-3", "DEV", 3, 1, 2_000);
    req.min_proposals = 3;
    let res = grpc.deliberate(req).await.unwrap().into_inner();
    assert_eq!(
        status(res.status),
        pb::DeliberationStatus::TimedOut,
        "{res:?}"
    );
    assert!(res.error.contains("only 2 of 3"), "{}", res.error);
    assert_eq!(res.results.len(), 2);
    assert!(res.winner_id.is_empty());
    let cancels: Vec<AgentControl> = fleet.entries(&fleet.keys().agents_control("DEV")).await;
    let stopped: Vec<(String, String)> = cancels
        .iter()
        .map(|AgentControl::Cancel(c)| (c.deliberation_id.clone(), c.member.clone()))
        .collect();
    assert!(stopped.contains(&("quorum-2".into(), "a2".into())));
    assert!(stopped.contains(&("quorum-3".into(), "a2".into())));
    assert_eq!(stopped.len(), 2, "only the dead member was a straggler");
    for a in &mut agents {
        assert!(
            !a.running()
                || a.terminate(Duration::from_secs(10))
                    .await
                    .is_some_and(|s| s.success())
        );
    }
    fleet.stop().await;
}

#[tokio::test]
async fn a_deadline_shorter_than_the_agents_times_out_and_cancels_the_stragglers() {
    let fleet = DelibFleet::start(DelibOptions {
        agents: vec![AgentSpec::mock(&["QA"]).delay(60_000)],
        ..Default::default()
    })
    .await;
    let mut grpc = fleet.grpc(0).await;
    let res = grpc
        .deliberate(deliberate("slow-1", "QA", 3, 1, 1_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(res.status), pb::DeliberationStatus::TimedOut);
    assert!(res.results.is_empty());
    assert!(res.error.contains("only 0 of 3"), "{}", res.error);
    let cancels: Vec<AgentControl> = fleet.entries(&fleet.keys().agents_control("QA")).await;
    let mut members: Vec<String> = cancels
        .iter()
        .map(|AgentControl::Cancel(c)| c.member.clone())
        .collect();
    members.sort();
    assert_eq!(members, ["QA-1", "QA-2", "QA-3"]);
    // The agent holding the three requests stopped each of them (at the cancel, or at the
    // deadline the request carries, whichever it saw first) and answered none.
    fleet_test_support::eventually(
        Duration::from_secs(10),
        "three stopped requests",
        || async {
            let text = fleet.agent_metrics(0).await;
            let stopped: u64 = text
                .lines()
                .filter(|l| {
                    l.starts_with("fleet_agent_requests_total")
                        && (l.contains("outcome=\"cancelled\"")
                            || l.contains("outcome=\"expired\""))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            (stopped == 3 && !text.contains("outcome=\"answered\"")).then_some(())
        },
    )
    .await;
    fleet.stop().await;
}

#[tokio::test]
async fn the_clients_deadline_is_honoured_and_the_deliberation_goes_on() {
    let fleet = DelibFleet::start(DelibOptions {
        agents: vec![AgentSpec::mock(&["DATA"]).delay(60_000)],
        ..Default::default()
    })
    .await;
    let mut grpc = fleet.grpc(0).await;
    let mut req = tonic::Request::new(deliberate("long-1", "DATA", 2, 1, 30_000));
    req.set_timeout(Duration::from_millis(800));
    let err = grpc.deliberate(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("GetDeliberationResult"),
        "{}",
        err.message()
    );
    let got = grpc
        .get_deliberation_result(pb::GetDeliberationResultRequest {
            task_id: "long-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(got.status), pb::DeliberationStatus::InProgress);
    assert_eq!(got.phase, "generating");
    fleet.stop().await;
}
