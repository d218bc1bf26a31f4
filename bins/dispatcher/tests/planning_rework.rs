//! dispatcher in-process on a real redis-server: planning events derive their subtasks once per
//! transition. Copies of one event (as nats-bridge writes a redelivered message, or a publisher
//! retry stored under another sequence, or a gRPC retry) derive nothing twice; a case that
//! re-enters a state (BUILD -> TEST -> BUILD) gets fresh subtasks, whose dependencies point to
//! the fresh ids, and a fresh deliberation for a council subtask.

use std::collections::{BTreeMap, BTreeSet};

use fleet::envelope::{AgentRequest, PlanningEvent, SessionClose, TaskCommand};
use fleet::stream::entry;
use fred::prelude::*;

mod common;
use common::Env;

const CASE: &str = "US-314";

fn event(event_id: &str, from: &str, to: &str, timestamp: &str) -> PlanningEvent {
    PlanningEvent {
        event_id: event_id.into(),
        event_type: "TRANSITION".into(),
        case_id: CASE.into(),
        plan_id: "P-5".into(),
        from_state: from.into(),
        to_state: to.into(),
        timestamp: timestamp.into(),
        metadata: serde_json::Value::Null,
    }
}

/// The subtask requests of one role, by task id.
fn by_task(reqs: &[AgentRequest]) -> BTreeMap<String, &AgentRequest> {
    reqs.iter().map(|r| (r.task_id.clone(), r)).collect()
}

#[tokio::test]
async fn a_case_re_entering_build_gets_fresh_subtasks_and_copies_derive_nothing() {
    let env = Env::start().await;
    let build = event(
        "AGILE:101:1767261600000000001",
        "DESIGN",
        "BUILD",
        "2026-01-01T10:00:00.000Z",
    );
    env.send(build.clone()).await;
    assert_eq!(env.tasks_total(CASE).await, 3);
    let dev = env.requests("DEV").await;
    assert_eq!(dev.len(), 1);
    let first_dev = dev[0].task_id.clone();

    // The same message again (its marker expired, or a replayed durable), and a publisher retry
    // that JetStream stored under another sequence: the same transition.
    env.send(build.clone()).await;
    let mut retry = build.clone();
    retry.event_id = "AGILE:102:1767261600500000000".into();
    env.send(retry).await;
    assert_eq!(env.tasks_total(CASE).await, 3, "a copy derives nothing");
    assert_eq!(env.requests("DEV").await.len(), 1);
    assert_eq!(env.requests("QA").await.len(), 1);

    // BUILD -> TEST -> BUILD: the rework gets its own DEV, QA and DEVOPS subtasks.
    env.send(event(
        "AGILE:103:1767348000000000000",
        "BUILD",
        "TEST",
        "2026-01-02T10:00:00.000Z",
    ))
    .await;
    assert_eq!(env.tasks_total(CASE).await, 5);
    let rework = event(
        "AGILE:104:1767434400000000000",
        "TEST",
        "BUILD",
        "2026-01-03T10:00:00.000Z",
    );
    env.send(rework.clone()).await;
    assert_eq!(
        env.tasks_total(CASE).await,
        8,
        "the rework derives three new subtasks"
    );
    let dev = env.requests("DEV").await;
    let qa = env.requests("QA").await;
    let devops = env.requests("DEVOPS").await;
    assert_eq!((dev.len(), qa.len(), devops.len()), (2, 3, 3));
    let second_dev = dev[1].task_id.clone();
    assert_ne!(second_dev, first_dev);
    // QA `test` of each BUILD depends on that BUILD's `implement`.
    let tests: Vec<&AgentRequest> = qa.iter().filter(|r| r.task_action == "test").collect();
    assert_eq!(tests.len(), 2);
    assert_eq!(tests[0].dependencies, [first_dev]);
    assert_eq!(tests[1].dependencies, std::slice::from_ref(&second_dev));
    assert_ne!(
        tests[0].metadata["transition_id"],
        tests[1].metadata["transition_id"]
    );

    // A redelivered copy of the rework derives nothing more.
    env.send(rework.clone()).await;
    let mut retry = rework;
    retry.event_id = "AGILE:105:1767434400900000000".into();
    env.send(retry).await;
    assert_eq!(env.tasks_total(CASE).await, 8);
    assert_eq!(env.requests("DEV").await.len(), 2);

    // Every subtask is a task of the planning session, once, with its transition recorded.
    let all: BTreeSet<String> = by_task(&dev)
        .into_keys()
        .chain(by_task(&qa).into_keys())
        .chain(by_task(&devops).into_keys())
        .collect();
    assert_eq!(all.len(), 8);
    let sid = format!("plan-{CASE}");
    let meta: Option<String> = env
        .client
        .hget(env.keys.task(&sid, &second_dev), "metadata")
        .await
        .unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta.expect("a task")).unwrap();
    assert_eq!(meta["event_id"], "AGILE:104:1767434400000000000");
    assert_eq!(
        meta["transition_id"],
        dev[1].metadata["transition_id"].as_str()
    );
    env.stop().await;
}

#[tokio::test]
async fn events_without_a_timestamp_are_told_apart_by_their_event_id() {
    let env = Env::start().await;
    env.send(event("plan-evt-1", "DESIGN", "BUILD", "")).await;
    env.send(event("plan-evt-1", "DESIGN", "BUILD", "")).await;
    assert_eq!(env.tasks_total(CASE).await, 3);
    env.send(event("plan-evt-2", "BUILD", "TEST", "")).await;
    env.send(event("plan-evt-3", "TEST", "BUILD", "")).await;
    env.send(event("plan-evt-3", "TEST", "BUILD", "")).await;
    assert_eq!(env.tasks_total(CASE).await, 8);
    assert_eq!(env.requests("DEV").await.len(), 2);
    env.stop().await;
}

#[tokio::test]
async fn a_case_re_entering_design_gets_a_fresh_council_deliberation() {
    let env = Env::start().await;
    let design = event("AGILE:7:1", "DRAFT", "DESIGN", "1767261600000");
    env.send(design.clone()).await;
    env.send(design.clone()).await;
    let mut retry = design;
    retry.event_id = "AGILE:8:2".into();
    env.send(retry).await;
    let councils = |reqs: Vec<AgentRequest>| -> BTreeSet<String> {
        reqs.into_iter().map(|r| r.deliberation_id).collect()
    };
    let first = councils(env.requests("ARCHITECT").await);
    assert_eq!(first.len(), 1, "one deliberation for every copy");
    assert_eq!(
        env.requests("ARCHITECT").await.len(),
        3,
        "three members asked once"
    );
    assert_eq!(env.requests("DATA").await.len(), 1);

    env.send(event("AGILE:9:3", "DESIGN", "BUILD", "1767348000000"))
        .await;
    let rework = event("AGILE:10:4", "BUILD", "DESIGN", "1767434400000");
    env.send(rework.clone()).await;
    env.send(rework).await;
    let both = councils(env.requests("ARCHITECT").await);
    assert_eq!(both.len(), 2, "the re-entry runs a new deliberation");
    assert_eq!(env.requests("ARCHITECT").await.len(), 6);
    let second: String = both.difference(&first).next().unwrap().clone();
    let status: Option<String> = env
        .client
        .hget(env.keys.deliberation(&second), "status")
        .await
        .unwrap();
    assert!(status.is_some(), "the new deliberation exists under its id");
    // The re-entry's DATA data model depends on the re-entry's design.
    let data = env.requests("DATA").await;
    assert_eq!(data.len(), 2);
    assert_eq!(data[1].dependencies, [second]);
    env.stop().await;
}

#[tokio::test]
async fn an_event_for_a_closed_planning_session_is_dead_lettered_with_its_reason() {
    let env = Env::start().await;
    let build = event("AGILE:1:1", "DESIGN", "BUILD", "1767261600000");
    env.send(build.clone()).await;
    assert_eq!(env.tasks_total(CASE).await, 3);
    let sid = format!("plan-{CASE}");
    env.command(TaskCommand::SessionClose(SessionClose {
        session_id: sid.clone(),
        reason: "case abandoned".into(),
    }))
    .await;
    // The closed session keeps the TTL it has (shortened here to tell a refresh apart).
    let _: bool = env
        .client
        .pexpire(env.keys.session(&sid), 600_000, None)
        .await
        .unwrap();

    // A copy of the transition derived before the close loses nothing: no dead letter.
    env.send(build).await;
    env.send(event("AGILE:2:2", "BUILD", "TEST", "1767348000000"))
        .await;
    assert_eq!(env.tasks_total(CASE).await, 3, "nothing derived");
    assert_eq!(env.requests("DEVOPS").await.len(), 1);
    let v: Value = env
        .client
        .xrange(env.keys.dlq(), "-", "+", None)
        .await
        .unwrap();
    let letters = entry::parse_entries(v).unwrap();
    assert_eq!(letters.len(), 1, "the event is dead-lettered");
    let reason = letters[0].get_str("reason").unwrap_or_default();
    assert!(
        reason.contains(&format!("the planning session {sid} is closed")),
        "{reason}"
    );
    assert_eq!(letters[0].get_str("orig.kind"), Some("planning.event"));
    let ttl: i64 = env.client.pttl(env.keys.session(&sid)).await.unwrap();
    assert!(
        (1..=600_000).contains(&ttl),
        "an event does not keep a closed session alive ({ttl} ms)"
    );
    env.stop().await;
}
