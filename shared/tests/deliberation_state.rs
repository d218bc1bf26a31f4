//! Deliberation steps against a real redis-server: quorum, rounds, deadline, architect,
//! duplicates and stale proposals; every step leaves its update in the event stream, in order.

use fleet::council::{Councils, Registration};
use fleet::deliberation::engine::Expired;
use fleet::deliberation::store::DeliberationStore;
use fleet::deliberation::{Check, DeliberationSpec, Engine, EngineConfig, Status, kind};
use fleet::envelope::{
    AgentAction, AgentControl, AgentMessage, DecisionMessage, Outbound, SelectionCallback,
    TaskCommand,
};
use fleet::stream::entry::StreamId;
use fleet::testing::DeliberationFixture as Fixture;
use fleet::testing::proposal;
use fleet::time::now_ms;
use fred::prelude::*;

async fn fixture() -> Fixture {
    Fixture::start(&fleet_test_support::redis(), &fleet_test_support::prefix()).await
}

fn spec(id: &str, n: u32, quorum: u32, rounds: u32) -> DeliberationSpec {
    let now = now_ms();
    DeliberationSpec {
        deliberation_id: id.into(),
        kind: kind::DELIBERATE.into(),
        role: "DEV".into(),
        description: "Implement authentication".into(),
        num_agents: n,
        quorum,
        rounds,
        deadline_ms: now + 60_000,
        created_ms: now,
        case_id: "US-1".into(),
        ..Default::default()
    }
}

async fn statuses(f: &Fixture, id: &str) -> Vec<String> {
    let reader = f.client.clone_new();
    reader.init().await.unwrap();
    let ups = DeliberationStore::read_updates(&reader, &f.keys, id, StreamId::ZERO, 1000, None)
        .await
        .unwrap();
    ups.into_iter()
        .map(|u| {
            if u.is_proposal() {
                format!("proposal:{}", u.agent)
            } else {
                u.status
            }
        })
        .collect()
}

#[tokio::test]
async fn a_full_round_completes_ranks_and_decides() {
    let f = fixture().await;
    let s = spec("d1", 3, 2, 1);
    let accepted = f.engine.accept(&s).await.unwrap();
    assert!(accepted.created);
    assert!(!f.engine.accept(&s).await.unwrap().created, "idempotent");
    let cmds: Vec<TaskCommand> = f.entries(&f.keys.tasks()).await;
    assert!(matches!(&cmds[0], TaskCommand::Deliberate(d) if d.deliberation_id == "d1"));
    let deadline: Option<f64> = f.client.zscore(f.keys.deadlines(), "d:d1").await.unwrap();
    assert_eq!(deadline, Some(s.deadline_ms as f64));

    // Two registered members and one pool seat.
    for a in ["a1", "a2"] {
        f.engine
            .councils
            .register(&Registration {
                agent_id: a.into(),
                role: "DEV".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    f.engine.dispatch(&s, "ctx", false).await.unwrap();
    f.engine.dispatch(&s, "ctx", false).await.unwrap(); // a duplicate command does nothing
    let a1: Vec<AgentMessage> = f.entries(&f.keys.agent_member("DEV", "a1")).await;
    let pool: Vec<AgentMessage> = f.entries(&f.keys.agents("DEV")).await;
    assert_eq!(a1.len(), 1);
    assert_eq!(pool.len(), 1);
    let AgentMessage::Request(r) = &pool[0];
    assert_eq!(
        (r.member.as_str(), r.action, r.round),
        ("DEV-1", AgentAction::Propose, 1)
    );
    assert_eq!(r.context, "ctx");

    f.engine
        .on_proposal(&proposal("d1", "a2", 1, 0.2), false)
        .await
        .unwrap();
    f.engine
        .on_proposal(&proposal("d1", "a2", 1, 0.9), true)
        .await
        .unwrap(); // duplicate
    f.engine
        .on_proposal(&proposal("d1", "nobody", 1, 1.0), false)
        .await
        .unwrap(); // unknown
    f.engine
        .on_proposal(&proposal("d1", "a1", 2, 1.0), false)
        .await
        .unwrap(); // stale round
    f.engine
        .on_proposal(&proposal("d1", "DEV-1", 1, 0.5), false)
        .await
        .unwrap();
    f.engine
        .on_proposal(&proposal("d1", "a1", 1, 1.0), false)
        .await
        .unwrap();

    let view = f.engine.store.get("d1").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Completed);
    let order: Vec<&str> = view
        .ranked
        .iter()
        .map(|r| r.proposal.member.as_str())
        .collect();
    assert_eq!(order, ["a1", "DEV-1", "a2"]);
    assert_eq!(view.winner.as_deref(), Some("a1"));
    assert_eq!(view.winner_id.as_deref(), Some("d1:1:a1"));
    assert_eq!(
        view.ranked[2].proposal.content, "a2 r1",
        "the duplicate changed nothing"
    );
    assert_eq!(
        statuses(&f, "d1").await,
        [
            "pending",
            "generating",
            "proposal:a2",
            "proposal:DEV-1",
            "proposal:a1",
            "scoring",
            "completed"
        ]
    );
    let decisions: Vec<DecisionMessage> = f.entries(&f.keys.decisions()).await;
    let DecisionMessage::Decision(d) = &decisions[0];
    assert_eq!((d.winner.as_str(), d.case_id.as_str()), ("a1", "US-1"));
    assert_eq!(d.alternatives.len(), 3);
    let out: Vec<Outbound> = f.entries(&f.keys.outbound()).await;
    let Outbound::Publish(p) = &out[0];
    assert_eq!(p.subject, "orchestrator.events");
    assert!(p.payload.contains("deliberation.completed"));
    let deadline: Option<f64> = f.client.zscore(f.keys.deadlines(), "d:d1").await.unwrap();
    assert_eq!(deadline, None);
}

#[tokio::test]
async fn a_deliberation_outlives_its_timeout_whatever_the_session_ttl() {
    let f = fixture().await;
    // A fleet whose sessions live a minute still keeps an hour-long deliberation to its end.
    let engine = Engine::new(
        DeliberationStore::new(f.client.clone(), f.keys.clone(), 60_000),
        Councils::new(f.client.clone(), f.keys.clone()),
        EngineConfig::default(),
    );
    let mut s = spec("d-ttl", 3, 2, 1);
    s.deadline_ms = now_ms() + fleet::deliberation::MAX_TIMEOUT_MS as i64;
    engine.accept(&s).await.unwrap();
    let ttl: i64 = f.client.pttl(f.keys.deliberation("d-ttl")).await.unwrap();
    assert!(
        ttl > fleet::deliberation::MAX_TIMEOUT_MS as i64,
        "expires in {ttl} ms, before its deadline"
    );
}

#[tokio::test]
async fn review_rounds_send_peers_and_use_the_revisions() {
    let f = fixture().await;
    let s = spec("d2", 2, 2, 2);
    f.engine.accept(&s).await.unwrap();
    f.engine.dispatch(&s, "", false).await.unwrap();
    f.engine
        .on_proposal(&proposal("d2", "DEV-1", 1, 1.0), false)
        .await
        .unwrap();
    f.engine
        .on_proposal(&proposal("d2", "DEV-2", 1, 0.1), false)
        .await
        .unwrap();
    let reqs: Vec<AgentMessage> = f.entries(&f.keys.agents("DEV")).await;
    assert_eq!(reqs.len(), 4);
    let AgentMessage::Request(review) = &reqs[2];
    assert_eq!((review.action, review.round), (AgentAction::Review, 2));
    assert_eq!(review.peers.len(), 1);
    assert_ne!(review.peers[0].member, review.member);
    // Round 2 revisions: DEV-2 now beats DEV-1.
    f.engine
        .on_proposal(&proposal("d2", "DEV-1", 2, 0.1), false)
        .await
        .unwrap();
    f.engine
        .on_proposal(&proposal("d2", "DEV-2", 2, 1.0), false)
        .await
        .unwrap();
    let view = f.engine.store.get("d2").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Completed);
    assert_eq!(view.winner_id.as_deref(), Some("d2:2:DEV-2"));
    assert!(view.ranked.iter().all(|r| r.proposal.round == 2));
    assert!(statuses(&f, "d2").await.contains(&"reviewing".to_owned()));
}

#[tokio::test]
async fn a_proposal_under_a_run_of_member_ids_is_from_no_member() {
    use fleet::deliberation::engine::Handled;
    let f = fixture().await;
    let s = spec("d-comma", 2, 2, 1);
    f.engine.accept(&s).await.unwrap();
    f.engine.dispatch(&s, "", false).await.unwrap();
    // Members DEV-1 and DEV-2 (stored as the list `DEV-1,DEV-2`): `DEV-1,DEV-2` is neither.
    for bogus in ["DEV-1,DEV-2", "DEV-2,", ""] {
        let handled = f
            .engine
            .on_proposal(&proposal("d-comma", bogus, 1, 1.0), false)
            .await
            .unwrap();
        assert_eq!(handled, Handled::Dropped("unknown_member"), "`{bogus}`");
    }
    let view = f.engine.store.get("d-comma").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Generating);
    assert_eq!(view.received_now(), 0, "nothing counted for the round");
    assert!(
        f.engine
            .store
            .proposals("d-comma")
            .await
            .unwrap()
            .is_empty()
    );
    // The real members complete the round, and only they are ranked.
    for m in ["DEV-1", "DEV-2"] {
        f.engine
            .on_proposal(&proposal("d-comma", m, 1, 1.0), false)
            .await
            .unwrap();
    }
    let view = f.engine.store.get("d-comma").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Completed);
    let members: Vec<&str> = view
        .ranked
        .iter()
        .map(|r| r.proposal.member.as_str())
        .collect();
    assert_eq!(members, ["DEV-1", "DEV-2"]);
}

#[tokio::test]
async fn a_check_score_that_is_not_a_number_counts_0_not_1() {
    let f = fixture().await;
    let s = spec("d-nan", 1, 1, 1);
    f.engine.accept(&s).await.unwrap();
    f.engine.dispatch(&s, "", false).await.unwrap();
    // An agent's lint divided 0 by 0 (MessagePack carries NaN) and says it passed.
    let mut p = proposal("d-nan", "DEV-1", 1, 1.0);
    p.checks.lint = Some(Check::pass(f64::NAN, "0/0 files clean"));
    p.checks
        .extra
        .insert("security".into(), Check::pass(f64::INFINITY, ""));
    f.engine.on_proposal(&p, false).await.unwrap();
    let view = f.engine.store.get("d-nan").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Completed);
    let r = &view.ranked[0];
    // policy 0.4 * 1 + lint 0.3 * 0 + dry_run 0.3 * 1, as the check's value says.
    assert_eq!(r.score, 0.7, "{r:?}");
    let lint = r.proposal.checks.lint.as_ref().unwrap();
    assert_eq!((lint.passed, lint.value()), (true, 0.0));
    let security = &r.proposal.checks.extra["security"];
    assert_eq!(security.value(), 0.0);
}

#[tokio::test]
async fn the_deadline_applies_the_quorum_and_cancels_stragglers() {
    let f = fixture().await;
    let s = spec("d3", 3, 2, 1);
    f.engine.accept(&s).await.unwrap();
    f.engine.dispatch(&s, "", false).await.unwrap();
    f.engine
        .on_proposal(&proposal("d3", "DEV-2", 1, 1.0), false)
        .await
        .unwrap();
    f.engine
        .on_proposal(&proposal("d3", "DEV-3", 1, 0.5), false)
        .await
        .unwrap();
    assert_eq!(
        f.engine.expire("d3").await.unwrap(),
        Expired::Ended(Status::Completed)
    );
    assert_eq!(
        f.engine.expire("d3").await.unwrap(),
        Expired::NotOpen,
        "ends once"
    );
    let view = f.engine.store.get("d3").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Completed);
    assert_eq!(view.ranked.len(), 2);
    let cancels: Vec<AgentControl> = f.entries(&f.keys.agents_control("DEV")).await;
    let members: Vec<String> = cancels
        .iter()
        .map(|AgentControl::Cancel(c)| c.member.clone())
        .collect();
    assert_eq!(members, ["DEV-1"]);

    let s = spec("d4", 3, 3, 1);
    f.engine.accept(&s).await.unwrap();
    f.engine.dispatch(&s, "", false).await.unwrap();
    f.engine
        .on_proposal(&proposal("d4", "DEV-1", 1, 1.0), false)
        .await
        .unwrap();
    f.engine.expire("d4").await.unwrap();
    let view = f.engine.store.get("d4").await.unwrap().unwrap();
    assert_eq!(view.status, Status::TimedOut);
    assert!(view.error.contains("only 1 of 3"), "{}", view.error);
    assert_eq!(view.ranked.len(), 1);
    assert!(view.winner.is_none());
    // A late proposal changes nothing.
    f.engine
        .on_proposal(&proposal("d4", "DEV-2", 1, 1.0), false)
        .await
        .unwrap();
    assert_eq!(f.engine.store.proposals("d4").await.unwrap().len(), 1);
    assert_eq!(statuses(&f, "d4").await.last().unwrap(), "timed_out");
}

#[tokio::test]
async fn an_architect_is_offered_only_proposals_that_passed_policy() {
    let f = fixture().await;
    let mut s = spec("d9", 3, 3, 1);
    s.kind = kind::ORCHESTRATE.into();
    s.architect_top_k = 3;
    f.engine.accept(&s).await.unwrap();
    f.engine.dispatch(&s, "", false).await.unwrap();
    let failing = |member: &str| {
        let mut p = proposal("d9", member, 1, 1.0);
        p.checks.policy = Some(Check::fail("touches a protected path"));
        p
    };
    for p in [
        failing("DEV-1"),
        failing("DEV-2"),
        proposal("d9", "DEV-3", 1, 0.5),
    ] {
        f.engine.on_proposal(&p, false).await.unwrap();
    }
    // One proposal passed policy: nothing for an architect to choose; it wins on its own.
    let view = f.engine.store.get("d9").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Completed);
    assert_eq!(view.winner.as_deref(), Some("DEV-3"));
    assert!(
        f.entries::<AgentMessage>(&f.keys.agents("ARCHITECT"))
            .await
            .is_empty()
    );

    // Two passed: the architect chooses between those two, and a choice of a failing one
    // falls back to the best that passed.
    let mut s = spec("d10", 3, 3, 1);
    s.kind = kind::ORCHESTRATE.into();
    s.architect_top_k = 3;
    f.engine.accept(&s).await.unwrap();
    f.engine.dispatch(&s, "", false).await.unwrap();
    let mut fail = proposal("d10", "DEV-1", 1, 1.0);
    fail.checks.policy = Some(Check::fail("leaks a secret"));
    for p in [
        fail,
        proposal("d10", "DEV-2", 1, 0.3),
        proposal("d10", "DEV-3", 1, 0.6),
    ] {
        f.engine.on_proposal(&p, false).await.unwrap();
    }
    let view = f.engine.store.get("d10").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Selecting);
    let reqs: Vec<AgentMessage> = f.entries(&f.keys.agents("ARCHITECT")).await;
    let AgentMessage::Request(sel) = reqs.last().unwrap();
    let offered: Vec<&str> = sel.peers.iter().map(|p| p.member.as_str()).collect();
    assert_eq!(offered, ["DEV-3", "DEV-2"]);
    f.engine
        .on_selection(&SelectionCallback {
            deliberation_id: "d10".into(),
            member: sel.member.clone(),
            winner: "DEV-1".into(),
            rationale: "bold".into(),
        })
        .await
        .unwrap();
    let view = f.engine.store.get("d10").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Completed);
    assert_eq!(view.winner.as_deref(), Some("DEV-3"));
    assert!(
        view.selected_by.contains("chose no candidate"),
        "{}",
        view.selected_by
    );
}

#[tokio::test]
async fn an_architect_chooses_among_the_top_candidates_or_the_score_decides() {
    let f = fixture().await;
    let mut s = spec("d5", 3, 2, 1);
    s.kind = kind::ORCHESTRATE.into();
    s.architect_top_k = 2;
    f.engine.accept(&s).await.unwrap();
    f.engine.dispatch(&s, "", false).await.unwrap();
    for (m, lint) in [("DEV-1", 1.0), ("DEV-2", 0.5), ("DEV-3", 0.1)] {
        f.engine
            .on_proposal(&proposal("d5", m, 1, lint), false)
            .await
            .unwrap();
    }
    let view = f.engine.store.get("d5").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Selecting);
    let reqs: Vec<AgentMessage> = f.entries(&f.keys.agents("ARCHITECT")).await;
    let AgentMessage::Request(sel) = &reqs[0];
    assert_eq!(
        (sel.action, sel.member.as_str()),
        (AgentAction::Select, "ARCHITECT-1")
    );
    assert_eq!(sel.peers.len(), 2);
    f.engine
        .on_selection(&SelectionCallback {
            deliberation_id: "d5".into(),
            member: "ARCHITECT-1".into(),
            winner: "DEV-2".into(),
            rationale: "simpler".into(),
        })
        .await
        .unwrap();
    let view = f.engine.store.get("d5").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Completed);
    assert_eq!(view.winner.as_deref(), Some("DEV-2"));
    assert_eq!(view.selected_by, "architect:ARCHITECT-1");

    // No answer from the architect: the top score wins at the deadline.
    let mut s = spec("d6", 2, 2, 1);
    s.architect_top_k = 2;
    f.engine.accept(&s).await.unwrap();
    f.engine.dispatch(&s, "", false).await.unwrap();
    f.engine
        .on_proposal(&proposal("d6", "DEV-1", 1, 0.2), false)
        .await
        .unwrap();
    f.engine
        .on_proposal(&proposal("d6", "DEV-2", 1, 0.9), false)
        .await
        .unwrap();
    f.engine.expire("d6").await.unwrap();
    let view = f.engine.store.get("d6").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Completed);
    assert_eq!(view.winner.as_deref(), Some("DEV-2"));
    assert!(
        view.selected_by.starts_with("score"),
        "{}",
        view.selected_by
    );
    let cancels: Vec<AgentControl> = f.entries(&f.keys.agents_control("ARCHITECT")).await;
    assert_eq!(cancels.len(), 1);
}

#[tokio::test]
async fn a_crash_after_recording_the_last_proposal_is_repaired_by_its_redelivery() {
    let f = fixture().await;
    let s = spec("d7", 1, 1, 1);
    f.engine.accept(&s).await.unwrap();
    f.engine.dispatch(&s, "", false).await.unwrap();
    // Record it without the step that follows (as if the worker died right after).
    let p = proposal("d7", "DEV-1", 1, 1.0);
    f.engine
        .store
        .record(
            "d7",
            &fleet::deliberation::Proposal {
                member: p.member.clone(),
                round: 1,
                content: p.content.clone(),
                checks: p.checks.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        f.engine.store.get("d7").await.unwrap().unwrap().status,
        Status::Generating
    );
    f.engine.on_proposal(&p, true).await.unwrap();
    assert_eq!(
        f.engine.store.get("d7").await.unwrap().unwrap().status,
        Status::Completed
    );
}

#[tokio::test]
async fn a_sweep_that_loses_the_race_to_an_architect_step_leaves_the_deadline_for_the_next() {
    let f = fixture().await;
    let mut s = spec("d8", 2, 2, 1);
    s.architect_top_k = 2;
    f.engine.accept(&s).await.unwrap();
    f.engine.dispatch(&s, "", false).await.unwrap();
    f.engine
        .on_proposal(&proposal("d8", "DEV-1", 1, 0.2), false)
        .await
        .unwrap();
    // The sweeper reads the deliberation (generating, one of two proposals in)...
    let as_swept = f.engine.store.get("d8").await.unwrap().unwrap();
    assert_eq!(as_swept.status, Status::Generating);
    // ...then the last proposal lands: scoring hands it to the architect.
    f.engine
        .on_proposal(&proposal("d8", "DEV-2", 1, 0.9), false)
        .await
        .unwrap();
    assert_eq!(
        f.engine.store.get("d8").await.unwrap().unwrap().status,
        Status::Selecting
    );
    // The sweep goes on with what it read: its end is refused, and it says so (it ended
    // nothing, so it counts nothing).
    assert_eq!(
        f.engine.expire_as_read(as_swept).await.unwrap(),
        Expired::Refused(Status::Selecting)
    );
    assert_eq!(
        f.engine.store.get("d8").await.unwrap().unwrap().status,
        Status::Selecting,
        "another step owns it now"
    );
    let deadline: Option<f64> = f.client.zscore(f.keys.deadlines(), "d:d8").await.unwrap();
    assert_eq!(
        deadline,
        Some(s.deadline_ms as f64),
        "still open: the deadline stays for the next sweep"
    );

    // The architect never answers; the next sweep finds it selecting and ends it: the one
    // sweep that counts it as expired.
    assert_eq!(
        f.engine.expire("d8").await.unwrap(),
        Expired::Ended(Status::Completed)
    );
    let view = f.engine.store.get("d8").await.unwrap().unwrap();
    assert_eq!(view.status, Status::Completed);
    assert_eq!(view.winner.as_deref(), Some("DEV-2"));
    assert!(
        view.selected_by.contains("did not answer"),
        "{}",
        view.selected_by
    );
    let deadline: Option<f64> = f.client.zscore(f.keys.deadlines(), "d:d8").await.unwrap();
    assert_eq!(deadline, None, "ended: nothing left to sweep");
    assert_eq!(
        f.engine.expire("d8").await.unwrap(),
        Expired::NotOpen,
        "ends once"
    );
}

/// What a sweeper counting [`Expired::Ended`] counts: of every sweep that saw one overdue
/// deliberation, exactly one, whichever way the others lost.
#[tokio::test]
async fn of_the_sweeps_that_see_a_deliberation_overdue_exactly_one_ends_it() {
    let f = fixture().await;
    // Two sweepers read it at once (quorum reached: it completes; no quorum: it times out; never
    // started: it times out); both go on with what they read.
    for (id, answers, quorum, want) in [
        ("e1", 2, 2, Status::Completed),
        ("e2", 1, 2, Status::TimedOut),
        ("e3", 0, 2, Status::TimedOut),
    ] {
        let s = spec(id, 3, quorum, 1);
        f.engine.accept(&s).await.unwrap();
        if id != "e3" {
            f.engine.dispatch(&s, "", false).await.unwrap();
        }
        for m in ["DEV-1", "DEV-2"].into_iter().take(answers) {
            f.engine
                .on_proposal(&proposal(id, m, 1, 1.0), false)
                .await
                .unwrap();
        }
        let first = f.engine.store.get(id).await.unwrap().unwrap();
        let second = first.clone();
        let outcomes = [
            f.engine.expire_as_read(first).await.unwrap(),
            f.engine.expire_as_read(second).await.unwrap(),
            f.engine.expire(id).await.unwrap(),
        ];
        assert_eq!(
            outcomes,
            [Expired::Ended(want), Expired::NotOpen, Expired::NotOpen],
            "{id}"
        );
        let view = f.engine.store.get(id).await.unwrap().unwrap();
        assert_eq!(view.status, want, "{id}");
        let deadline: Option<f64> = f
            .client
            .zscore(f.keys.deadlines(), format!("d:{id}"))
            .await
            .unwrap();
        assert_eq!(deadline, None, "{id}: nothing left to sweep");
    }

    // A deliberation that ends by its own steps past its deadline (the last proposal lands as the
    // sweep reads it) expired nothing: the sweep that read it open counts nothing.
    let s = spec("e4", 1, 1, 1);
    f.engine.accept(&s).await.unwrap();
    f.engine.dispatch(&s, "", false).await.unwrap();
    let as_swept = f.engine.store.get("e4").await.unwrap().unwrap();
    f.engine
        .on_proposal(&proposal("e4", "DEV-1", 1, 1.0), false)
        .await
        .unwrap();
    assert_eq!(
        f.engine.expire_as_read(as_swept).await.unwrap(),
        Expired::NotOpen
    );
    assert_eq!(
        f.engine.store.get("e4").await.unwrap().unwrap().selected_by,
        "score",
        "ended by its last proposal, not by the deadline"
    );
}

/// A deliberation ended by a step that died before what follows an end (its decision, its
/// count, its deadline entry): the redelivery of its callback or the sweep finishes that, and
/// each part happens once however often they run.
#[tokio::test]
async fn what_follows_an_end_is_finished_by_a_redelivery_or_a_sweep_once() {
    let f = fixture().await;
    let counted = || async {
        let n: Option<i64> = f
            .client
            .hget(f.keys.stats(), "deliberations_completed")
            .await
            .unwrap();
        n.unwrap_or(0)
    };
    for (id, by_sweep) in [("s1", true), ("s2", false)] {
        let s = spec(id, 1, 1, 1);
        f.engine.accept(&s).await.unwrap();
        f.engine.dispatch(&s, "", false).await.unwrap();
        let p = proposal(id, "DEV-1", 1, 1.0);
        f.engine.on_proposal(&p, false).await.unwrap();
        let before = counted().await;
        // Undo what followed the end, as if the step had died right after ending it.
        let member = format!("d:{id}");
        let _: i64 = f
            .client
            .hdel(f.keys.deliberation(id), "settled_ms")
            .await
            .unwrap();
        let _: i64 = f
            .client
            .zadd(
                f.keys.deadlines(),
                None,
                None,
                false,
                false,
                (s.deadline_ms as f64, member.as_str()),
            )
            .await
            .unwrap();
        let _: i64 = f.client.del(f.keys.decisions()).await.unwrap();
        let _: i64 = f
            .client
            .hincrby(f.keys.stats(), "deliberations_completed", -1)
            .await
            .unwrap();

        for _ in 0..2 {
            if by_sweep {
                assert_eq!(f.engine.expire(id).await.unwrap(), Expired::NotOpen);
                f.engine.settle(id).await.unwrap();
            } else {
                f.engine.on_proposal(&p, true).await.unwrap();
            }
        }
        let decisions: Vec<DecisionMessage> = f.entries(&f.keys.decisions()).await;
        assert_eq!(decisions.len(), 1, "{id}: the decision is published, once");
        assert_eq!(counted().await, before, "{id}: counted once");
        let deadline: Option<f64> = f.client.zscore(f.keys.deadlines(), &member).await.unwrap();
        assert_eq!(deadline, None, "{id}: nothing left to sweep");
    }
}
