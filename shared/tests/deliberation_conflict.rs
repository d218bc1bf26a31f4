//! One deliberation id, two specs: a retry (the same spec, made later) attaches to the
//! deliberation; another spec under its id is refused and changes nothing, and no step ever runs
//! a deliberation with a spec other than the one stored with it.

use std::collections::{BTreeMap, HashMap};

use fleet::deliberation::engine::{EngineError, Handled};
use fleet::deliberation::{DeliberationSpec, Status, kind};
use fleet::envelope::{AgentMessage, TaskCommand};
use fleet::testing::DeliberationFixture as Fixture;
use fleet::time::now_ms;
use fred::prelude::*;

async fn fixture() -> Fixture {
    Fixture::start(&fleet_test_support::redis(), &fleet_test_support::prefix()).await
}

fn spec(id: &str) -> DeliberationSpec {
    let now = now_ms();
    DeliberationSpec {
        deliberation_id: id.into(),
        kind: kind::DELIBERATE.into(),
        role: "DEV".into(),
        description: "Implement authentication".into(),
        num_agents: 2,
        quorum: 2,
        rounds: 1,
        deadline_ms: now + 60_000,
        created_ms: now,
        case_id: "US-1".into(),
        ..Default::default()
    }
}

/// Another request under the same id: another task, council, size and rubric.
fn other(id: &str) -> DeliberationSpec {
    let mut s = spec(id);
    s.role = "QA".into();
    s.description = "Delete the test suite".into();
    s.num_agents = 3;
    s.rubric.weights.insert("lint".into(), 1.0);
    s
}

/// Everything stored about deliberation `id`, and what was sent or counted for it.
async fn snapshot(f: &Fixture, id: &str) -> (HashMap<String, String>, usize, usize, Vec<String>) {
    let hash: HashMap<String, String> = f.client.hgetall(f.keys.deliberation(id)).await.unwrap();
    let events: usize = f.client.xlen(f.keys.deliberation_events(id)).await.unwrap();
    let commands: usize = f.client.xlen(f.keys.tasks()).await.unwrap();
    let stats: BTreeMap<String, String> = f.client.hgetall(f.keys.stats()).await.unwrap();
    let deadlines: Vec<String> = f
        .client
        .zrange(f.keys.deadlines(), 0, -1, None, false, None, false)
        .await
        .unwrap();
    let mut counted: Vec<String> = stats.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    counted.extend(deadlines);
    (hash, events, commands, counted)
}

fn request_members(reqs: &[AgentMessage]) -> Vec<String> {
    reqs.iter()
        .map(|AgentMessage::Request(r)| r.member.clone())
        .collect()
}

#[tokio::test]
async fn a_retry_attaches_and_another_spec_under_its_id_is_refused_changing_nothing() {
    let f = fixture().await;
    let s = spec("c1");
    assert!(f.engine.accept(&s).await.unwrap().created);

    // The same request made later (its start and deadline move with it) is a retry.
    let mut retry = s.clone();
    retry.created_ms += 1_500;
    retry.deadline_ms += 1_500;
    let again = f.engine.accept(&retry).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.status, Status::Pending);

    let before = snapshot(&f, "c1").await;
    type Change = Box<dyn Fn(&mut DeliberationSpec)>;
    let changes: Vec<(&str, Change)> = vec![
        ("description", Box::new(|s| s.description = "Other".into())),
        ("role", Box::new(|s| s.role = "QA".into())),
        ("members", Box::new(|s| s.num_agents = 3)),
        ("quorum", Box::new(|s| s.quorum = 1)),
        ("rounds", Box::new(|s| s.rounds = 2)),
        ("timeout", Box::new(|s| s.deadline_ms += 1)),
        (
            "rubric",
            Box::new(|s| s.rubric.description = "short".into()),
        ),
        (
            "requirements",
            Box::new(|s| s.requirements = vec!["no new deps".into()]),
        ),
        (
            "metadata",
            Box::new(|s| {
                s.metadata.insert("lang".into(), "go".into());
            }),
        ),
        ("kind", Box::new(|s| s.kind = kind::ORCHESTRATE.into())),
        ("architect", Box::new(|s| s.architect_top_k = 2)),
        ("case", Box::new(|s| s.case_id = "US-2".into())),
    ];
    for (what, change) in changes {
        let mut s = retry.clone();
        change(&mut s);
        match f.engine.accept(&s).await {
            Err(e @ EngineError::SpecConflict { .. }) => {
                let EngineError::SpecConflict { id, status } = &e else {
                    unreachable!()
                };
                assert_eq!((id.as_str(), *status), ("c1", Status::Pending), "{what}");
                let m = e.to_string();
                assert!(m.contains("`c1`") && m.contains("spec differs"), "{m}");
            }
            other => panic!("another {what} under the same id: {other:?}"),
        }
    }
    assert_eq!(
        snapshot(&f, "c1").await,
        before,
        "refused: nothing stored, sent or counted"
    );
    // The commands sent are the first call's and its retry's, both with the stored spec.
    let cmds: Vec<TaskCommand> = f.entries(&f.keys.tasks()).await;
    assert_eq!(cmds.len(), 2);
    for c in cmds {
        let TaskCommand::Deliberate(d) = c else {
            panic!("unexpected command")
        };
        assert_eq!(d, s, "the stored spec");
    }

    // Once it runs (or has ended) another spec is refused the same way.
    f.engine.dispatch(&s, "", false).await.unwrap();
    let err = f.engine.accept(&other("c1")).await.unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::SpecConflict {
                status: Status::Generating,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!f.engine.accept(&retry).await.unwrap().created);
}

#[tokio::test]
async fn the_dispatcher_never_starts_a_deliberation_with_a_spec_other_than_the_stored_one() {
    let f = fixture().await;
    let s = spec("c2");
    f.engine.accept(&s).await.unwrap();
    // A command with another spec under the id (none of the front doors sends one any more; a
    // copy of a planning event under another event id does) starts nothing...
    assert_eq!(
        f.engine.dispatch(&other("c2"), "", false).await.unwrap(),
        Handled::Dropped("conflict")
    );
    let view = f.engine.store.get("c2").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Pending);
    assert_eq!(view.spec, s);
    assert!(
        f.entries::<AgentMessage>(&f.keys.agents("QA"))
            .await
            .is_empty()
    );
    assert!(
        f.entries::<AgentMessage>(&f.keys.agents("DEV"))
            .await
            .is_empty()
    );
    // ...and the stored one's own command starts it as stored.
    f.engine.dispatch(&s, "", false).await.unwrap();
    let reqs: Vec<AgentMessage> = f.entries(&f.keys.agents("DEV")).await;
    assert_eq!(request_members(&reqs), ["DEV-1", "DEV-2"]);
    let AgentMessage::Request(r) = &reqs[0];
    assert_eq!(r.description, "Implement authentication");
}

#[tokio::test]
async fn a_deliberation_stored_without_a_fingerprint_runs_its_stored_spec() {
    let f = fixture().await;
    let s = spec("c3");
    f.engine.accept(&s).await.unwrap();
    // As if created before fingerprints were stored: it matches any spec.
    let _: i64 = f
        .client
        .hdel(f.keys.deliberation("c3"), "spec_fp")
        .await
        .unwrap();
    let attached = f.engine.accept(&other("c3")).await.unwrap();
    assert!(!attached.created);
    // The command this call sent carries the stored spec, not the caller's.
    let cmds: Vec<TaskCommand> = f.entries(&f.keys.tasks()).await;
    let Some(TaskCommand::Deliberate(sent)) = cmds.last() else {
        panic!("no command")
    };
    assert_eq!(sent, &s);

    // Even a command carrying the caller's spec starts it with the stored one: its council,
    // its size, its task.
    assert_eq!(
        f.engine.dispatch(&other("c3"), "", false).await.unwrap(),
        Handled::Applied("started")
    );
    let view = f.engine.store.get("c3").await.unwrap().unwrap();
    assert_eq!(view.spec, s);
    let ids: Vec<&str> = view.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["DEV-1", "DEV-2"]);
    assert!(
        f.entries::<AgentMessage>(&f.keys.agents("QA"))
            .await
            .is_empty()
    );
    let reqs: Vec<AgentMessage> = f.entries(&f.keys.agents("DEV")).await;
    assert_eq!(request_members(&reqs), ["DEV-1", "DEV-2"]);
    for AgentMessage::Request(r) in &reqs {
        assert_eq!(
            (r.role.as_str(), r.description.as_str()),
            ("DEV", "Implement authentication")
        );
    }
}
