//! Cancelling deliberations against a real redis-server: `cancelled` is reached by one
//! compare-and-set from every open state and from no ended one; its members' outstanding
//! requests get `agent.cancel`; its deadline entry, final update and failure event are written
//! as for any end; a late proposal or selection is dropped, and the sweeper leaves it.

use fleet::deliberation::engine::{Cancelled, Expired, Handled};
use fleet::deliberation::store::{DeliberationStore, FinalResult, Transition, Update};
use fleet::deliberation::{DeliberationSpec, Status, kind};
use fleet::envelope::{
    AgentControl, Envelope, Outbound, PlanningEvent, SelectionCallback, TaskCommand,
};
use fleet::planning::PlanningRules;
use fleet::stream::entry::{StreamId, parse_entries};
use fleet::testing::DeliberationFixture as Fixture;
use fleet::testing::proposal;
use fleet::time::now_ms;
use fred::prelude::*;

async fn fixture() -> Fixture {
    Fixture::start(&fleet_test_support::redis(), &fleet_test_support::prefix()).await
}

fn spec(id: &str, n: u32, rounds: u32) -> DeliberationSpec {
    let now = now_ms();
    DeliberationSpec {
        deliberation_id: id.into(),
        kind: kind::DELIBERATE.into(),
        role: "DEV".into(),
        description: "Implement authentication".into(),
        num_agents: n,
        quorum: n,
        rounds,
        deadline_ms: now + 60_000,
        created_ms: now,
        ..Default::default()
    }
}

async fn updates(f: &Fixture, id: &str) -> Vec<Update> {
    let reader = f.client.clone_new();
    reader.init().await.unwrap();
    DeliberationStore::read_updates(&reader, &f.keys, id, StreamId::ZERO, 1000, None)
        .await
        .unwrap()
}

/// The members of `role` told to stop working on deliberation `id`.
async fn cancelled_members(f: &Fixture, role: &str, id: &str) -> Vec<String> {
    let cancels: Vec<AgentControl> = f.entries(&f.keys.agents_control(role)).await;
    let mut out: Vec<String> = cancels
        .into_iter()
        .map(|AgentControl::Cancel(c)| c)
        .filter(|c| c.deliberation_id == id)
        .map(|c| c.member)
        .collect();
    out.sort();
    out
}

/// Checks that `id` ended cancelled with `reason`, as every end is finished: final update,
/// failure event, stats, deadline dropped.
async fn assert_cancelled(f: &Fixture, id: &str, reason: &str) {
    let view = f.engine.store.get(id).await.unwrap().unwrap();
    assert_eq!(view.status, Status::Cancelled);
    assert_eq!(view.error, reason);
    assert!(view.winner.is_none() && view.finished_ms.is_some() && view.settled);
    let last = updates(f, id).await.pop().unwrap();
    assert_eq!(last.status, "cancelled");
    assert!(last.is_terminal());
    let result: FinalResult = serde_json::from_str(&last.data).unwrap();
    assert_eq!(
        (result.status.as_str(), result.error.as_str()),
        ("cancelled", reason)
    );
    let deadline: Option<f64> = f
        .client
        .zscore(f.keys.deadlines(), format!("d:{id}"))
        .await
        .unwrap();
    assert_eq!(deadline, None, "its deadline entry is dropped");
    let outbound: Vec<Outbound> = f.entries(&f.keys.outbound()).await;
    let events: Vec<serde_json::Value> = outbound
        .iter()
        .map(|Outbound::Publish(p)| serde_json::from_str(&p.payload).unwrap())
        .filter(|v: &serde_json::Value| v["deliberation_id"] == id)
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event_type"], "deliberation.cancelled");
    assert_eq!(events[0]["status"], "cancelled");
    assert_eq!(events[0]["error"], reason);
}

#[tokio::test]
async fn a_cancel_ends_a_deliberation_from_every_open_state_and_stops_its_agents() {
    let f = fixture().await;
    let e = &f.engine;

    // pending: no dispatcher started it; nobody to stop.
    e.accept(&spec("p", 3, 1)).await.unwrap();
    assert_eq!(
        e.cancel_deliberation("p", "not needed", false)
            .await
            .unwrap(),
        Cancelled::Now
    );
    assert_cancelled(&f, "p", "not needed").await;
    // A dispatcher that gets to it now starts nothing.
    let started = e.dispatch(&spec("p", 3, 1), "", false).await.unwrap();
    assert_eq!(started, Handled::Dropped("started"));
    assert!(cancelled_members(&f, "DEV", "p").await.is_empty());

    // generating: the two members that had not answered round 1 are stopped.
    let s = spec("g", 3, 1);
    e.accept(&s).await.unwrap();
    e.dispatch(&s, "", false).await.unwrap();
    e.on_proposal(&proposal("g", "DEV-2", 1, 1.0), false)
        .await
        .unwrap();
    assert_eq!(
        e.cancel_deliberation("g", "superseded", false)
            .await
            .unwrap(),
        Cancelled::Now
    );
    assert_cancelled(&f, "g", "superseded").await;
    assert_eq!(cancelled_members(&f, "DEV", "g").await, ["DEV-1", "DEV-3"]);
    let view = e.store.get("g").await.unwrap().unwrap();
    assert_eq!(view.ranked.len(), 1, "what came in is kept, ranked");

    // reviewing (round 2 of 2): the member that had not revised is stopped.
    let s = spec("r", 2, 2);
    e.accept(&s).await.unwrap();
    e.dispatch(&s, "", false).await.unwrap();
    for m in ["DEV-1", "DEV-2"] {
        e.on_proposal(&proposal("r", m, 1, 1.0), false)
            .await
            .unwrap();
    }
    e.on_proposal(&proposal("r", "DEV-1", 2, 1.0), false)
        .await
        .unwrap();
    assert_eq!(
        e.store.get("r").await.unwrap().unwrap().status,
        Status::Reviewing
    );
    assert_eq!(
        e.cancel_deliberation("r", "rework", false).await.unwrap(),
        Cancelled::Now
    );
    assert_cancelled(&f, "r", "rework").await;
    assert_eq!(cancelled_members(&f, "DEV", "r").await, ["DEV-2"]);

    // scoring (as the deadline's quorum leaves it between its compare-and-sets): the member
    // without a proposal is told (again) to stop.
    let s = spec("s", 2, 1);
    e.accept(&s).await.unwrap();
    e.dispatch(&s, "", false).await.unwrap();
    e.on_proposal(&proposal("s", "DEV-1", 1, 1.0), false)
        .await
        .unwrap();
    let to_scoring = Transition::new(&[Status::Generating], Status::Scoring, "scoring");
    e.store.transition("s", &to_scoring).await.unwrap();
    assert_eq!(
        e.cancel_deliberation("s", "stop", false).await.unwrap(),
        Cancelled::Now
    );
    assert_cancelled(&f, "s", "stop").await;
    assert_eq!(cancelled_members(&f, "DEV", "s").await, ["DEV-2"]);

    // selecting: the architect asked to choose is stopped, and its late choice is dropped.
    let mut s = spec("a", 2, 1);
    s.kind = kind::ORCHESTRATE.into();
    s.architect_top_k = 2;
    e.accept(&s).await.unwrap();
    e.dispatch(&s, "", false).await.unwrap();
    for (m, lint) in [("DEV-1", 1.0), ("DEV-2", 0.5)] {
        e.on_proposal(&proposal("a", m, 1, lint), false)
            .await
            .unwrap();
    }
    assert_eq!(
        e.store.get("a").await.unwrap().unwrap().status,
        Status::Selecting
    );
    assert_eq!(
        e.cancel_deliberation("a", "case closed", false)
            .await
            .unwrap(),
        Cancelled::Now
    );
    assert_cancelled(&f, "a", "case closed").await;
    assert_eq!(
        cancelled_members(&f, "ARCHITECT", "a").await,
        ["ARCHITECT-1"]
    );
    let late = SelectionCallback {
        deliberation_id: "a".into(),
        member: "ARCHITECT-1".into(),
        winner: "DEV-2".into(),
        rationale: "late".into(),
    };
    assert_eq!(
        e.on_selection(&late).await.unwrap(),
        Handled::Dropped("stale")
    );
    let view = e.store.get("a").await.unwrap().unwrap();
    assert_eq!((view.status, view.winner), (Status::Cancelled, None));

    // Each end counted once, as cancelled.
    let n: Option<i64> = f
        .client
        .hget(f.keys.stats(), "deliberations_cancelled")
        .await
        .unwrap();
    assert_eq!(n, Some(5));
}

#[tokio::test]
async fn a_cancel_of_an_ended_or_unknown_deliberation_changes_nothing_and_says_so() {
    let f = fixture().await;
    let e = &f.engine;
    let s = spec("done", 1, 1);
    e.accept(&s).await.unwrap();
    e.dispatch(&s, "", false).await.unwrap();
    e.on_proposal(&proposal("done", "DEV-1", 1, 1.0), false)
        .await
        .unwrap();
    let before = e.store.get("done").await.unwrap().unwrap();
    assert_eq!(before.status, Status::Completed);
    let updates_before = updates(&f, "done").await.len();
    assert_eq!(
        e.cancel_deliberation("done", "too late", false)
            .await
            .unwrap(),
        Cancelled::AlreadyEnded(Status::Completed)
    );
    let after = e.store.get("done").await.unwrap().unwrap();
    assert_eq!(after, before, "nothing changed");
    assert_eq!(updates(&f, "done").await.len(), updates_before);
    assert!(cancelled_members(&f, "DEV", "done").await.is_empty());

    // Cancelled twice: the second changes nothing (a redelivered one sends the cancels again).
    let s = spec("twice", 2, 1);
    e.accept(&s).await.unwrap();
    e.dispatch(&s, "", false).await.unwrap();
    e.cancel_deliberation("twice", "first", false)
        .await
        .unwrap();
    let n = updates(&f, "twice").await.len();
    assert_eq!(
        e.cancel_deliberation("twice", "second", false)
            .await
            .unwrap(),
        Cancelled::AlreadyEnded(Status::Cancelled)
    );
    assert_eq!(updates(&f, "twice").await.len(), n);
    assert_eq!(e.store.get("twice").await.unwrap().unwrap().error, "first");
    assert_eq!(cancelled_members(&f, "DEV", "twice").await.len(), 2);
    e.cancel_deliberation("twice", "first", true).await.unwrap();
    assert_eq!(cancelled_members(&f, "DEV", "twice").await.len(), 4);

    assert_eq!(
        e.cancel_deliberation("nope", "x", false).await.unwrap(),
        Cancelled::Missing
    );
}

#[tokio::test]
async fn a_proposal_after_a_cancel_is_not_recorded_and_the_sweeper_leaves_it() {
    let f = fixture().await;
    let e = &f.engine;
    let mut s = spec("late", 2, 1);
    s.quorum = 1;
    s.deadline_ms = now_ms() + 50;
    e.accept(&s).await.unwrap();
    e.dispatch(&s, "", false).await.unwrap();
    e.cancel_deliberation("late", "stop", false).await.unwrap();
    let n = updates(&f, "late").await.len();
    for redelivered in [false, true] {
        let handled = e
            .on_proposal(&proposal("late", "DEV-1", 1, 1.0), redelivered)
            .await
            .unwrap();
        assert_eq!(handled, Handled::Dropped("terminal"));
    }
    assert!(e.store.proposals("late").await.unwrap().is_empty());
    assert_eq!(updates(&f, "late").await.len(), n, "no proposal update");
    // Past its deadline, with a proposal that would have made the quorum: the sweeper does not
    // score or time it out.
    assert_eq!(e.expire("late").await.unwrap(), Expired::NotOpen);
    let view = e.store.get("late").await.unwrap().unwrap();
    assert_eq!((view.status, view.ranked.len()), (Status::Cancelled, 0));
    assert_eq!(updates(&f, "late").await.len(), n);
}

/// The deliberation of the built-in DESIGN rule's council subtask of `case`.
fn council_spec(case: &str) -> DeliberationSpec {
    let event = PlanningEvent {
        event_id: "e1".into(),
        event_type: "TRANSITION".into(),
        case_id: case.into(),
        plan_id: "P-1".into(),
        from_state: "BACKLOG".into(),
        to_state: "DESIGN".into(),
        timestamp: "2026-01-01T10:00:00Z".into(),
        metadata: serde_json::Value::Null,
    };
    let design = PlanningRules::builtin().derive(&event, &[], &[]);
    design[0].deliberation_spec(now_ms())
}

#[tokio::test]
async fn a_front_door_asks_the_dispatchers_to_cancel_only_a_council_of_the_session() {
    let f = fixture().await;
    let e = &f.engine;
    let council = council_spec("US-9");
    let id = council.deliberation_id.clone();
    e.accept(&council).await.unwrap();
    let plain = spec("plain", 1, 1);
    e.accept(&plain).await.unwrap();
    let commands = |f: &Fixture| {
        let (client, keys) = (f.client.clone(), f.keys.clone());
        async move {
            let reply: Value = client.xrange(keys.tasks(), "-", "+", None).await.unwrap();
            parse_entries(reply)
                .unwrap()
                .iter()
                .map(|e| Envelope::<TaskCommand>::from_fields(&e.fields).unwrap().msg)
                .filter(|c| matches!(c, TaskCommand::Cancel(_)))
                .collect::<Vec<_>>()
        }
    };

    // Another session, a plain deliberation, an id that is no deliberation: not a council of
    // the session, nothing sent.
    for (sid, tid) in [
        ("plan-US-8", id.as_str()),
        ("plan-US-9", "plain"),
        ("plan-US-9", "x"),
    ] {
        assert_eq!(e.request_council_cancel(sid, tid, "r").await.unwrap(), None);
    }
    assert!(commands(&f).await.is_empty());

    let status = e
        .request_council_cancel("plan-US-9", &id, "r")
        .await
        .unwrap();
    assert_eq!(status, Some(Status::Pending));
    let sent = commands(&f).await;
    assert_eq!(sent.len(), 1);
    let TaskCommand::Cancel(c) = &sent[0] else {
        unreachable!()
    };
    assert_eq!(
        (c.session_id.as_str(), c.task_id.as_str(), c.reason.as_str()),
        ("plan-US-9", id.as_str(), "r")
    );

    // Ended: answered with its status, nothing sent.
    e.cancel_deliberation(&id, "r", false).await.unwrap();
    let status = e
        .request_council_cancel("plan-US-9", &id, "r")
        .await
        .unwrap();
    assert_eq!(status, Some(Status::Cancelled));
    assert_eq!(commands(&f).await.len(), 1);
}
