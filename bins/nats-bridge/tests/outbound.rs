//! Fleet -> NATS: what fleet:outbound holds is published to JetStream with `Nats-Msg-Id` and
//! `traceparent`, and acknowledged in Redis only after JetStream acknowledged it.

mod common;

use std::time::Duration;

use common::{Env, TRACEPARENT, trace_id};
use fleet::envelope::{Envelope, NatsPublish, Outbound};
use fleet::stream::producer;
use fleet_test_support::eventually;
use futures::StreamExt;
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbound_publish_arrives_with_its_msg_id_and_traceparent() {
    let env = Env::start().await;
    let mut requests = env.nc.subscribe("agent.requests").await.unwrap();
    let mut events = env.nc.subscribe("orchestrator.events").await.unwrap();
    let bridge = env.bridge(&[]).await;

    let payload = json!({"task_id": "t1", "session_id": "s1", "role": "DEV", "action": "subtask"})
        .to_string();
    let mut request = Envelope::new(Outbound::Publish(NatsPublish {
        subject: "agent.requests".into(),
        payload: payload.clone(),
        headers: [("x-tenant".to_owned(), "acme".to_owned())].into(),
    }));
    request.tp = Some(TRACEPARENT.into());
    producer::send(&env.redis, &env.keys.outbound(), None, &request)
        .await
        .unwrap();
    let decision = env
        .outbound(
            "orchestrator.events",
            r#"{"event_type": "DECISION", "winner": "DEV-1"}"#,
        )
        .await;

    let msg = tokio::time::timeout(WITHIN, requests.next())
        .await
        .expect("agent request published")
        .unwrap();
    assert_eq!(std::str::from_utf8(&msg.payload).unwrap(), payload);
    let h = msg.headers.expect("headers");
    assert_eq!(
        h.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()),
        Some(request.id.to_string())
    );
    let tp = h.get("traceparent").expect("traceparent").as_str();
    assert_eq!(
        trace_id(tp),
        trace_id(TRACEPARENT),
        "same trace on both sides"
    );
    assert_eq!(h.get("x-tenant").map(|v| v.as_str()), Some("acme"));

    let msg = tokio::time::timeout(WITHIN, events.next())
        .await
        .expect("orchestrator event published")
        .unwrap();
    assert_eq!(
        msg.headers.unwrap().get("Nats-Msg-Id").unwrap().as_str(),
        decision.id.to_string()
    );

    env.wait_outbound_drained().await;
    assert_eq!(env.stored("agent.requests").await, 1);
    assert_eq!(env.stored("orchestrator.events").await, 1);
    assert_eq!(bridge.stats.published(), 2);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_outputs_go_to_the_subjects_the_bridge_is_configured_with() {
    let env = Env::start().await;
    let mut requests = env.nc.subscribe("swe.agent.requests").await.unwrap();
    let mut events = env.nc.subscribe("swe.orchestrator.events").await.unwrap();
    let bridge = env
        .bridge(&[
            "--nats-requests-subject",
            "swe.agent.requests",
            "--nats-orchestrator-subject",
            "swe.orchestrator.events",
        ])
        .await;

    // What the dispatcher and the deliberation engine write: the default names.
    let payload = json!({"task_id": "t1", "session_id": "s1", "role": "DEV", "action": "subtask"})
        .to_string();
    env.outbound("agent.requests", &payload).await;
    env.outbound("orchestrator.events", r#"{"event_type": "DECISION"}"#)
        .await;

    let msg = tokio::time::timeout(WITHIN, requests.next())
        .await
        .expect("agent request published to the configured subject")
        .unwrap();
    assert_eq!(std::str::from_utf8(&msg.payload).unwrap(), payload);
    tokio::time::timeout(WITHIN, events.next())
        .await
        .expect("orchestrator event published to the configured subject")
        .unwrap();
    env.wait_outbound_drained().await;
    assert_eq!(env.stored("swe.agent.requests").await, 1);
    assert_eq!(env.stored("swe.orchestrator.events").await, 1);
    assert_eq!(env.len(&env.keys.dlq()).await, 0, "nothing dead-lettered");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republished_entry_is_stored_once_by_jetstream() {
    let env = Env::start().await;
    let bridge = env.bridge(&[]).await;
    let first = env.outbound("orchestrator.events", r#"{"n": 1}"#).await;
    env.wait_outbound_drained().await;
    // The same entry again (as after a crash between the publish and the XACK).
    producer::send(&env.redis, &env.keys.outbound(), None, &first)
        .await
        .unwrap();
    env.wait_outbound_drained().await;
    eventually(WITHIN, "two publishes acked", || async {
        (bridge.stats.published() == 2).then_some(())
    })
    .await;
    assert_eq!(bridge.stats.publish_duplicates(), 1);
    assert_eq!(env.stored("orchestrator.events").await, 1);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_cannot_be_published_are_dead_lettered() {
    let env = Env::start().await;
    let bridge = env.bridge(&[]).await;
    env.outbound("agent.requests", r#"{"task_id": "t1"}"#).await;
    env.outbound("orchestrator.events", "not json").await;
    env.outbound("agent.*", "{}").await;
    env.outbound("orchestrator.events", r#"{"ok": true}"#).await;
    env.wait_outbound_drained().await;
    env.wait_len(&env.keys.dlq(), 3, WITHIN).await;
    let letters = env.entries(&env.keys.dlq()).await;
    let reasons: Vec<&str> = letters.iter().filter_map(|e| e.get_str("reason")).collect();
    for expected in ["session_id", "not valid JSON", "not a subject"] {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "{expected}: {reasons:?}"
        );
    }
    assert!(letters.iter().all(|e| e.get_str("group") == Some("bridge")));
    assert_eq!(env.stored("orchestrator.events").await, 1);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_larger_than_its_stream_takes_is_dead_lettered_on_its_first_delivery() {
    let env = Env::start().await;
    // A Planning service's stream that stores agent requests of up to 512 bytes.
    env.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "PLANNING_REQUESTS".into(),
            subjects: vec!["agent.requests".into()],
            max_message_size: 512,
            ..Default::default()
        })
        .await
        .unwrap();
    let bridge = env.bridge(&[]).await;
    let big = json!({"task_id": "big", "session_id": "s", "description": "x".repeat(1024)});
    let big = env.outbound("agent.requests", &big.to_string()).await;
    let small = json!({"task_id": "small", "session_id": "s"}).to_string();
    env.outbound("agent.requests", &small).await;

    env.wait_len(&env.keys.dlq(), 1, WITHIN).await;
    env.wait_outbound_drained().await;
    let letters = env.entries(&env.keys.dlq()).await;
    let reason = letters[0].get_str("reason").unwrap_or_default();
    assert!(
        reason.contains("agent.requests") && reason.contains("bytes of payload"),
        "{reason}"
    );
    assert_eq!(
        letters[0].get_str("orig.id"),
        Some(big.id.to_string().as_str()),
        "the entry itself is kept"
    );
    assert_eq!(
        letters[0].get_str("deliveries"),
        Some("1"),
        "no retries of what cannot fit"
    );
    assert_eq!(
        env.stored("agent.requests").await,
        1,
        "the small one went out"
    );
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_wait_while_nats_is_down_and_go_out_after() {
    let mut env = Env::start().await;
    let bridge = env.bridge(&[]).await;
    env.wait_stream("agent.requests").await;
    env.nats.stop(false);
    eventually(WITHIN, "health degraded", || async {
        (bridge.ready().await.0 == 503).then_some(())
    })
    .await;
    for i in 0..20 {
        env.outbound(
            "agent.requests",
            &json!({"task_id": format!("t{i}"), "session_id": "s"}).to_string(),
        )
        .await;
    }
    env.nats.start_again();
    env.wait_outbound_drained().await;
    eventually(WITHIN, "20 requests stored", || async {
        (env.stored("agent.requests").await == 20).then_some(())
    })
    .await;
    eventually(WITHIN, "health ready", || async {
        (bridge.ready().await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(env.len(&env.keys.dlq()).await, 0, "nothing dead-lettered");
    bridge.stop().await;
}
