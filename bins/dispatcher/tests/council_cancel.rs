//! dispatcher in-process on a real redis-server with a Planning service (`--planning-addr`): a
//! council subtask (DESIGN's ARCHITECT `design`, a deliberation of 3) is cancelled through the
//! same `task.cancel` a task's cancel is, and by the close of its planning session; it ends
//! `cancelled`, its members get `agent.cancel`, and Planning is told CANCELLED with the reason,
//! once.

use fleet::deliberation::store::DeliberationStore;
use fleet::deliberation::{DeliberationView, Status};
use fleet::envelope::{
    AgentControl, Envelope, PlanningEvent, SessionClose, TaskCancel, TaskCommand,
};
use fleet::planning::{PlanningRules, Subtask, session_id};
use fleet::stream::entry;
use fred::prelude::*;

mod common;
use common::{Env, assert_cancelled, reporting_to_planning};

const PLAN: &str = "P-3";

/// Case `case`'s move into DESIGN: the ARCHITECT council `design` and DATA `data-model`.
fn design(case: &str) -> PlanningEvent {
    PlanningEvent {
        event_id: format!("AGILE:{case}:1"),
        event_type: "TRANSITION".into(),
        case_id: case.into(),
        plan_id: PLAN.into(),
        from_state: "BACKLOG".into(),
        to_state: "DESIGN".into(),
        timestamp: "2026-02-01T10:00:00.000Z".into(),
        metadata: serde_json::Value::Null,
    }
}

/// The council subtask and the plain one `e` derives.
fn subtasks(e: &PlanningEvent) -> (Subtask, Subtask) {
    let mut s = PlanningRules::builtin().derive(e, &[], &[]);
    assert_eq!(s[0].council, 3);
    let data = s.remove(1);
    (s.remove(0), data)
}

async fn deliberation(env: &Env, id: &str) -> DeliberationView {
    DeliberationStore::new(env.client.clone(), env.keys.clone(), 3_600_000)
        .get(id)
        .await
        .unwrap()
        .expect("the council's deliberation")
}

/// The members of the ARCHITECT council told to stop deliberation `id`.
async fn stopped(env: &Env, id: &str) -> Vec<String> {
    let v: Value = env
        .client
        .xrange(env.keys.agents_control("ARCHITECT"), "-", "+", None)
        .await
        .unwrap();
    let mut out: Vec<String> = entry::parse_entries(v)
        .unwrap()
        .iter()
        .map(|e| {
            let AgentControl::Cancel(c) = Envelope::<AgentControl>::from_fields(&e.fields)
                .unwrap()
                .msg;
            c
        })
        .filter(|c| c.deliberation_id == id)
        .map(|c| c.member)
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn cancel_task_of_a_council_subtask_cancels_its_deliberation_and_tells_planning() {
    let (env, mut planning) = reporting_to_planning().await;
    let case = "US-31";
    let e = design(case);
    env.send(e.clone()).await;
    let (council, _) = subtasks(&e);
    let id = council.task_id.clone();
    assert_eq!(deliberation(&env, &id).await.status, Status::Generating);

    let cancel = |reason: &str| {
        TaskCommand::Cancel(TaskCancel {
            session_id: session_id(case),
            task_id: id.clone(),
            reason: reason.into(),
        })
    };
    // The same id under another session is not that session's: nothing happens.
    env.command(TaskCommand::Cancel(TaskCancel {
        session_id: session_id("US-32"),
        task_id: id.clone(),
        reason: "wrong session".into(),
    }))
    .await;
    assert_eq!(deliberation(&env, &id).await.status, Status::Generating);

    env.command(cancel("superseded by the rework")).await;
    let view = deliberation(&env, &id).await;
    assert_eq!(
        (view.status, view.error.as_str()),
        (Status::Cancelled, "superseded by the rework")
    );
    assert_eq!(
        stopped(&env, &id).await,
        ["ARCHITECT-1", "ARCHITECT-2", "ARCHITECT-3"]
    );
    assert_cancelled(
        &planning.next_update().await,
        &council,
        "superseded by the rework",
    );

    // Again (a client's retry): changes nothing, tells nothing; the next report is another
    // case's.
    env.command(cancel("again")).await;
    assert_eq!(
        deliberation(&env, &id).await.error,
        "superseded by the rework"
    );
    let other = design("US-33");
    env.send(other.clone()).await;
    let (other_council, _) = subtasks(&other);
    env.command(TaskCommand::Cancel(TaskCancel {
        session_id: session_id("US-33"),
        task_id: other_council.task_id.clone(),
        reason: "sentinel".into(),
    }))
    .await;
    assert_eq!(planning.next_update().await.task_id, other_council.task_id);
    env.stop().await;
}

#[tokio::test]
async fn closing_a_planning_session_cancels_its_running_council() {
    let (env, mut planning) = reporting_to_planning().await;
    let case = "US-41";
    let e = design(case);
    env.send(e.clone()).await;
    let (council, data) = subtasks(&e);
    let id = council.task_id.clone();
    assert_eq!(deliberation(&env, &id).await.status, Status::Generating);

    env.command(TaskCommand::SessionClose(SessionClose {
        session_id: session_id(case),
        reason: "case abandoned".into(),
    }))
    .await;
    let view = deliberation(&env, &id).await;
    assert_eq!(
        (view.status, view.error.as_str()),
        (Status::Cancelled, "the session was closed")
    );
    assert_eq!(stopped(&env, &id).await.len(), 3);
    // The DATA task and the council, each once.
    let mut updates = planning.next_updates(2).await;
    updates.sort_by_key(|u| u.task_id != council.task_id);
    assert_cancelled(&updates[0], &council, "the session was closed");
    assert_cancelled(&updates[1], &data, "the session was closed");

    // The close again ends nothing and tells nothing.
    env.command(TaskCommand::SessionClose(SessionClose {
        session_id: session_id(case),
        reason: "case abandoned".into(),
    }))
    .await;
    let other = design("US-42");
    env.send(other.clone()).await;
    let (other_council, _) = subtasks(&other);
    env.command(TaskCommand::Cancel(TaskCancel {
        session_id: session_id("US-42"),
        task_id: other_council.task_id.clone(),
        reason: "sentinel".into(),
    }))
    .await;
    assert_eq!(planning.next_update().await.task_id, other_council.task_id);
    env.stop().await;
}
