//! `StreamDeliberation` delivers every update in order, ending in COMPLETE; two edge-api replicas
//! answer sync calls for deliberations dispatched through the other; `Orchestrate` asks an
//! ARCHITECT agent to choose among the top candidates.

use std::time::Duration;

use fleet::stream::entry::StreamId;
use fleet_e2e::deliberation::{AgentSpec, DelibFleet, DelibOptions, deliberate};
use fleet_proto::orchestrator::v1 as pb;

fn update_status(s: i32) -> pb::UpdateStatus {
    pb::UpdateStatus::try_from(s).unwrap()
}

#[tokio::test]
async fn stream_deliberation_delivers_ordered_updates_ending_in_complete() {
    let fleet = DelibFleet::start(DelibOptions {
        agents: vec![AgentSpec::mock(&["DEV"])],
        ..Default::default()
    })
    .await;
    let mut grpc = fleet.grpc(0).await;
    let mut stream = grpc
        .stream_deliberation(deliberate("streamed-1", "DEV", 3, 2, 20_000))
        .await
        .unwrap()
        .into_inner();
    let mut updates = Vec::new();
    while let Some(u) = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("an update within 20s")
        .unwrap()
    {
        updates.push(u);
    }
    // Ordered, without gaps in what matters, and resumable by event id.
    let ids: Vec<StreamId> = updates
        .iter()
        .map(|u| u.event_id.parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "event ids increase");
    let progress: Vec<i32> = updates.iter().map(|u| u.progress_percent).collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    let kinds: Vec<String> = updates
        .iter()
        .map(|u| match &u.partial_result {
            Some(p) => format!("proposal:r{}", p.round),
            None => format!("{:?}", update_status(u.status)),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Pending",
            "Generating",
            "proposal:r1",
            "proposal:r1",
            "proposal:r1",
            "Reviewing",
            "proposal:r2",
            "proposal:r2",
            "proposal:r2",
            "Scoring",
            "Complete"
        ]
    );
    let last = updates.last().unwrap();
    assert_eq!(last.progress_percent, 100);
    assert_eq!(last.results.len(), 3);
    assert!(last.results.iter().all(|p| p.round == 2), "revisions count");
    assert_eq!(last.winner_id, last.results[0].id);
    assert!(
        updates[6]
            .partial_result
            .as_ref()
            .unwrap()
            .content
            .contains("Revised after reading")
    );

    // A dropped stream resumes after the last update it delivered: the rest, each once.
    let resume = |after: &str| {
        let mut req = deliberate("streamed-1", "DEV", 3, 2, 20_000);
        req.last_event_id = after.into();
        req
    };
    let mut rest = grpc
        .stream_deliberation(resume(&updates[4].event_id))
        .await
        .unwrap()
        .into_inner();
    let mut resumed = Vec::new();
    while let Some(u) = rest.message().await.unwrap() {
        resumed.push(u.event_id);
    }
    let want: Vec<String> = updates[5..].iter().map(|u| u.event_id.clone()).collect();
    assert_eq!(resumed, want);
    // After the final update there is nothing left: the stream ends at once.
    let mut none = grpc
        .stream_deliberation(resume(&last.event_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.message().await.unwrap(), None);
    let refused = grpc
        .stream_deliberation(resume("not-an-id"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("last_event_id"), "{refused:?}");
    fleet.stop().await;
}

#[tokio::test]
async fn two_replicas_answer_sync_calls_for_deliberations_dispatched_through_the_other() {
    let fleet = DelibFleet::start(DelibOptions {
        edges: 2,
        agents: vec![AgentSpec::mock(&["QA"]).delay(300)],
        ..Default::default()
    })
    .await;
    let (mut a, mut b) = (fleet.grpc(0).await, fleet.grpc(1).await);

    // Dispatched through A (its stream open), answered by B's sync call.
    let mut stream = a
        .stream_deliberation(deliberate("replica-1", "QA", 2, 1, 20_000))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(update_status(first.status), pb::UpdateStatus::Pending);
    let via_b = b
        .deliberate(deliberate("replica-1", "QA", 2, 1, 20_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(via_b.status, pb::DeliberationStatus::Completed as i32);
    let mut last = first;
    while let Some(u) = stream.message().await.unwrap() {
        last = u;
    }
    assert_eq!(last.winner_id, via_b.winner_id);

    // Both replicas wait on the same deliberation at once: one deliberation, one winner.
    let (ra, rb) = tokio::join!(
        a.deliberate(deliberate("replica-2", "QA", 2, 1, 20_000)),
        b.deliberate(deliberate("replica-2", "QA", 2, 1, 20_000)),
    );
    let (ra, rb) = (ra.unwrap().into_inner(), rb.unwrap().into_inner());
    assert_eq!(ra.winner_id, rb.winner_id);
    assert_eq!(ra.results, rb.results);
    let got = b
        .get_deliberation_result(pb::GetDeliberationResultRequest {
            task_id: "replica-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.winner_id, ra.winner_id);
    // Counters are written just after a deliberation ends, so a reply may come before them.
    fleet_test_support::eventually(Duration::from_secs(10), "two deliberations counted", || {
        let mut a = a.clone();
        async move {
            let status = a
                .get_status(pb::GetStatusRequest {})
                .await
                .ok()?
                .into_inner();
            (status.deliberations_total == 2).then_some(())
        }
    })
    .await;
    fleet.stop().await;
}

#[tokio::test]
async fn orchestrate_asks_an_architect_to_choose_among_the_top_candidates() {
    let fleet = DelibFleet::start(DelibOptions {
        agents: vec![AgentSpec::mock(&["DEV", "ARCHITECT"])],
        ..Default::default()
    })
    .await;
    let mut grpc = fleet.grpc(0).await;
    let res = grpc
        .orchestrate(pb::OrchestrateRequest {
            task_id: "orch-1".into(),
            task_description: "Split the monolith".into(),
            role: "DEV".into(),
            constraints: Some(pb::DeliberationConstraints {
                timeout_ms: 20_000,
                ..Default::default()
            }),
            options: Some(pb::OrchestrationOptions {
                enable_peer_review: true,
                num_agents: 4,
                use_architect_agent: true,
                architect_top_k: 3,
                custom_params: [("language".to_owned(), "rust".to_owned())].into(),
                ..Default::default()
            }),
            case_id: "US-9".into(),
            story_id: "ST-1".into(),
            plan_id: "P-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        res.status,
        pb::DeliberationStatus::Completed as i32,
        "{res:?}"
    );
    assert_eq!(res.execution_id, "orch-1");
    assert_eq!(res.candidates.len(), 4);
    assert_eq!(res.selected_by, "architect:ARCHITECT-1");
    let winner = res.winner.unwrap();
    assert!(winner.rank <= 3, "the architect chose among the top 3");
    assert!(
        res.candidates.iter().all(|c| c.round == 2),
        "peer review ran a second round"
    );
    assert_eq!(
        (res.case_id.as_str(), res.plan_id.as_str()),
        ("US-9", "P-2")
    );
    // Latencies are recorded just after a deliberation ends, so a reply may come before them.
    let metrics = fleet_test_support::eventually(
        Duration::from_secs(10),
        "the orchestration's latency",
        || {
            let mut grpc = grpc.clone();
            async move {
                let m = grpc
                    .get_metrics(pb::GetMetricsRequest {})
                    .await
                    .ok()?
                    .into_inner();
                (m.orchestration.as_ref()?.count == 1).then_some(m)
            }
        },
    )
    .await;
    assert_eq!(metrics.deliberation.unwrap().count, 0);
    fleet.stop().await;
}
