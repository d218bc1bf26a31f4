//! dispatcher in-process on a real redis-server with a Planning service (`--planning-addr`):
//! the planning subtasks its cancels and closes end are reported with `UpdateTask`, CANCELLED
//! with their reason, once each (a cancel or close that ends nothing reports nothing).

use fleet::envelope::{PlanningEvent, SessionClose, TaskCancel, TaskCommand};
use fleet::planning::{PlanningRules, Subtask, session_id};

mod common;
use common::{assert_cancelled, reporting_to_planning};

const CASE: &str = "US-77";
const PLAN: &str = "P-7";

/// Case `case`'s move into BUILD, which derives DEV `implement`, QA `test` and DEVOPS `deploy`.
fn build(case: &str) -> PlanningEvent {
    PlanningEvent {
        event_id: format!("AGILE:{case}:1"),
        event_type: "TRANSITION".into(),
        case_id: case.into(),
        plan_id: PLAN.into(),
        from_state: "DESIGN".into(),
        to_state: "BUILD".into(),
        timestamp: "2026-01-01T10:00:00.000Z".into(),
        metadata: serde_json::Value::Null,
    }
}

/// The subtasks the dispatcher derives from `e` (built-in rules).
fn subtasks(e: &PlanningEvent) -> Vec<Subtask> {
    PlanningRules::builtin().derive(e, &[], &[])
}

fn cancel(case: &str, s: &Subtask, reason: &str) -> TaskCommand {
    TaskCommand::Cancel(TaskCancel {
        session_id: session_id(case),
        task_id: s.task_id.clone(),
        reason: reason.into(),
    })
}

fn close(case: &str) -> TaskCommand {
    TaskCommand::SessionClose(SessionClose {
        session_id: session_id(case),
        reason: "case abandoned".into(),
    })
}

#[tokio::test]
async fn a_cancelled_planning_subtask_is_reported_cancelled_with_its_reason_once() {
    let (env, mut planning) = reporting_to_planning().await;
    let e = build(CASE);
    env.send(e.clone()).await;
    let s = subtasks(&e);

    env.command(cancel(CASE, &s[0], "superseded by the rework"))
        .await;
    assert_cancelled(
        &planning.next_update().await,
        &s[0],
        "superseded by the rework",
    );

    // The same cancel again (a client's retry) ends nothing and reports nothing: the next
    // report is the next cancel's, with the reason a cancel without one gets.
    env.command(cancel(CASE, &s[0], "superseded by the rework"))
        .await;
    env.command(cancel(CASE, &s[1], "")).await;
    assert_cancelled(
        &planning.next_update().await,
        &s[1],
        "cancelled by the client",
    );
    env.stop().await;
}

#[tokio::test]
async fn closing_a_planning_session_reports_each_of_its_open_subtasks_once() {
    let (env, mut planning) = reporting_to_planning().await;
    let e = build(CASE);
    env.send(e.clone()).await;
    let s = subtasks(&e);
    // DEVOPS `deploy` ended before the close, which leaves it alone.
    env.command(cancel(CASE, &s[2], "not needed")).await;
    assert_cancelled(&planning.next_update().await, &s[2], "not needed");

    env.command(close(CASE)).await;
    let mut updates = planning.next_updates(2).await;
    updates.sort_by_key(|u| if u.task_id == s[0].task_id { 0 } else { 1 });
    assert_cancelled(&updates[0], &s[0], "the session was closed");
    assert_cancelled(&updates[1], &s[1], "the session was closed");

    // The close again ends nothing: the next report is another case's cancel.
    env.command(close(CASE)).await;
    let other = build("US-78");
    env.send(other.clone()).await;
    let o = subtasks(&other);
    env.command(cancel("US-78", &o[0], "sentinel")).await;
    assert_eq!(planning.next_update().await.task_id, o[0].task_id);
    env.stop().await;
}
