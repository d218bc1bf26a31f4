//! Subtask ids per transition: copies of one transition (a NATS redelivery, a publisher retry
//! with a new `event_id`, a gRPC retry) derive the same ids; a later transition into the same
//! state (rework) derives fresh ones, with dependencies on the fresh ids.

use std::collections::BTreeSet;

use fleet::envelope::PlanningEvent;
use fleet::planning::{PlanningRules, Subtask};

fn transition(event_id: &str, from: &str, to: &str, timestamp: &str) -> PlanningEvent {
    PlanningEvent {
        event_id: event_id.into(),
        event_type: "TRANSITION".into(),
        case_id: "US-7".into(),
        plan_id: "P-2".into(),
        from_state: from.into(),
        to_state: to.into(),
        timestamp: timestamp.into(),
        metadata: serde_json::Value::Null,
    }
}

fn ids(subtasks: &[Subtask]) -> BTreeSet<String> {
    subtasks.iter().map(|s| s.task_id.clone()).collect()
}

fn derive(e: &PlanningEvent) -> Vec<Subtask> {
    PlanningRules::builtin().derive(e, &[], &[])
}

#[test]
fn copies_of_one_transition_derive_the_same_ids() {
    let first = derive(&transition(
        "AGILE:17:1700000000000000001",
        "DESIGN",
        "BUILD",
        "2026-03-01T10:00:00.120Z",
    ));
    assert_eq!(first.len(), 3);
    // NATS redelivery: the same message.
    let redelivered = derive(&transition(
        "AGILE:17:1700000000000000001",
        "DESIGN",
        "BUILD",
        "2026-03-01T10:00:00.120Z",
    ));
    assert_eq!(redelivered, first);
    // A publisher retry without a Nats-Msg-Id: stored again, so the bridge gives it another
    // event_id, but it is the same transition (same time).
    let mut retried = transition(
        "AGILE:18:1700000000000000999",
        "design",
        "build",
        "2026-03-01T10:00:00.120Z",
    );
    retried.event_type = "transition".into();
    retried.metadata = serde_json::json!({"attempt": 2});
    assert_eq!(ids(&derive(&retried)), ids(&first));
}

#[test]
fn a_case_re_entering_a_state_derives_fresh_subtasks() {
    let build = derive(&transition(
        "AGILE:17:1",
        "DESIGN",
        "BUILD",
        "2026-03-01T10:00:00Z",
    ));
    let test = derive(&transition(
        "AGILE:18:2",
        "BUILD",
        "TEST",
        "2026-03-02T09:00:00Z",
    ));
    let rework = derive(&transition(
        "AGILE:19:3",
        "TEST",
        "BUILD",
        "2026-03-03T15:30:00Z",
    ));
    assert_eq!(rework.len(), 3);
    assert!(
        ids(&rework).is_disjoint(&ids(&build)),
        "rework needs new work"
    );
    assert!(ids(&rework).is_disjoint(&ids(&test)));
    // QA `test` depends on the rework's DEV `implement`, not on the first one's.
    assert_eq!(rework[1].dependencies, [rework[0].task_id.clone()]);
    assert_eq!(build[1].dependencies, [build[0].task_id.clone()]);
    // A re-entry from the same state as before, later, is a new transition too.
    let again = derive(&transition(
        "AGILE:20:4",
        "DESIGN",
        "BUILD",
        "2026-03-04T08:00:00Z",
    ));
    assert!(ids(&again).is_disjoint(&ids(&build)));
    assert!(ids(&again).is_disjoint(&ids(&rework)));
}

#[test]
fn without_a_timestamp_the_event_id_tells_transitions_apart() {
    let first = derive(&transition("plan-events-1", "DESIGN", "BUILD", ""));
    assert_eq!(
        ids(&derive(&transition("plan-events-1", "DESIGN", "BUILD", ""))),
        ids(&first)
    );
    let later = derive(&transition("plan-events-9", "DESIGN", "BUILD", ""));
    assert!(ids(&later).is_disjoint(&ids(&first)));
    assert_eq!(later[1].dependencies, [later[0].task_id.clone()]);
}

#[test]
fn a_council_subtask_re_entered_is_a_new_deliberation() {
    let first = derive(&transition("AGILE:5:1", "DRAFT", "DESIGN", "1767261600000"));
    let copy = derive(&transition("AGILE:6:2", "DRAFT", "DESIGN", "1767261600000"));
    let rework = derive(&transition("AGILE:9:3", "BUILD", "DESIGN", "1767348000000"));
    let design = |s: &[Subtask]| s[0].deliberation_spec(1_000).deliberation_id;
    assert_eq!(first[0].council, 3);
    assert_eq!(design(&copy), design(&first));
    assert_ne!(design(&rework), design(&first));
    // A copy under another event id asks for the same deliberation, not a conflicting one: it
    // can start the deliberation if the first copy's dispatcher died before doing so.
    assert_eq!(
        copy[0].deliberation_spec(2_000).fingerprint(),
        first[0].deliberation_spec(1_000).fingerprint()
    );
    // DATA's data model waits on its own transition's design.
    assert_eq!(rework[1].dependencies, [design(&rework)]);
    rework[0].deliberation_spec(1_000).validate().unwrap();
}
