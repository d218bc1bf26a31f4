//! NATS -> Fleet: agile.events become planning.event entries, agent.responses become
//! callbacks, and what does not parse ends in the dead-letter stream, terminated.

mod common;

use std::time::Duration;

use common::{Env, TRACEPARENT, headers, trace_id, transition};
use fleet::envelope::Callback;
use fleet::stream::entry::StreamEntry;
use fleet_test_support::eventually;
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_becomes_one_planning_event_carrying_the_trace() {
    let env = Env::start().await;
    let bridge = env.bridge(&[]).await;

    let payload = json!({
        "event_type": "TRANSITION", "case_id": "US-123", "plan_id": "P-7",
        "from": "DRAFT", "to": "BUILD", "timestamp": "2026-11-21T12:00:00Z",
        "metadata": {"story": "login"}
    });
    env.publish(
        "agile.events",
        headers(&[("traceparent", TRACEPARENT)]),
        payload.to_string(),
    )
    .await;
    env.wait_len(&env.keys.tasks(), 1, WITHIN).await;

    let events = env.planning_events().await;
    assert_eq!(events.len(), 1);
    let (envelope, p) = &events[0];
    assert_eq!(p.event_type, "TRANSITION");
    assert_eq!(p.case_id, "US-123");
    assert_eq!(p.plan_id, "P-7");
    assert_eq!(
        (p.from_state.as_str(), p.to_state.as_str()),
        ("DRAFT", "BUILD")
    );
    assert_eq!(p.timestamp, "2026-11-21T12:00:00Z");
    assert_eq!(p.metadata, json!({"story": "login"}));
    assert!(
        p.event_id.starts_with("AGILE:1:"),
        "event id is <stream>:<seq>:<stored ns>: {}",
        p.event_id
    );
    // Without a tracer in this process the bridge passes the publisher's context on as is.
    let tp = envelope
        .tp
        .as_deref()
        .expect("the entry carries a traceparent");
    assert_eq!(
        trace_id(tp),
        trace_id(TRACEPARENT),
        "same trace on both sides"
    );
    assert_eq!(tp, TRACEPARENT);

    // The message is acked: nothing pending, nothing redelivered.
    eventually(WITHIN, "the message acked", || async {
        let c = env
            .consumer_info("agile.events", "fleet-bridge-agile")
            .await;
        (c.num_ack_pending == 0 && c.num_pending == 0 && c.ack_floor.stream_sequence == 1)
            .then_some(())
    })
    .await;
    assert_eq!(bridge.stats.written(), 1);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_msg_id_is_the_event_id_and_a_republish_is_one_event() {
    let env = Env::start().await;
    let bridge = env.bridge(&[]).await;
    let h = headers(&[("Nats-Msg-Id", "planning-42")]);
    env.publish(
        "agile.events",
        h.clone(),
        transition("US-1", "DRAFT", "DESIGN"),
    )
    .await;
    env.publish("agile.events", h, transition("US-1", "DRAFT", "DESIGN"))
        .await;
    env.publish(
        "agile.events",
        headers(&[]),
        transition("US-2", "DRAFT", "DESIGN"),
    )
    .await;
    env.wait_len(&env.keys.tasks(), 2, WITHIN).await;
    eventually(WITHIN, "both stored messages acked", || async {
        let c = env
            .consumer_info("agile.events", "fleet-bridge-agile")
            .await;
        (c.num_ack_pending == 0 && c.num_pending == 0).then_some(())
    })
    .await;
    let events = env.planning_events().await;
    assert_eq!(
        events.len(),
        2,
        "JetStream stored the republished event once"
    );
    assert_eq!(events[0].1.event_id, "planning-42");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_responses_become_callbacks() {
    let env = Env::start().await;
    let bridge = env.bridge(&[]).await;
    let responses = [
        json!({"task_id": "t1", "session_id": "s1", "status": "progress",
               "progress": {"percent": 50, "step": "tests"}}),
        json!({"task_id": "t1", "session_id": "s1", "status": "chunk", "index": 0,
               "output": "hel", "seq": 2}),
        json!({"task_id": "t1", "session_id": "s1", "status": "completed", "output": "hello",
               "metadata": {"files": 3}}),
        json!({"task_id": "t2", "session_id": "s1", "status": "failed", "attempt": 2,
               "error": {"type": "timeout", "message": "took too long"}}),
        json!({"deliberation_id": "d1", "member": "DEV-1", "round": 1, "status": "proposal",
               "content": "use a queue", "checks": {"lint": {"passed": true}}}),
    ];
    for r in &responses {
        env.publish(
            "agent.responses",
            headers(&[("traceparent", TRACEPARENT)]),
            r.to_string(),
        )
        .await;
    }
    env.wait_len(&env.keys.callbacks(), 5, WITHIN).await;
    let cbs = env.callbacks().await;
    assert_eq!(cbs.len(), 5);
    for cb in &cbs {
        assert_eq!(trace_id(cb.tp.as_deref().unwrap()), trace_id(TRACEPARENT));
    }
    let Callback::Progress(p) = &cbs[0].msg else {
        panic!("{:?}", cbs[0].msg)
    };
    assert_eq!(
        (p.task_id.as_str(), p.session_id.as_str(), p.attempt, p.seq),
        ("t1", "s1", 1, 0)
    );
    assert_eq!((p.percent, p.step.as_str()), (50.0, "tests"));
    let Callback::Chunk(c) = &cbs[1].msg else {
        panic!("{:?}", cbs[1].msg)
    };
    assert_eq!((c.index, c.seq, c.content.as_str()), (0, 2, "hel"));
    let Callback::Result(r) = &cbs[2].msg else {
        panic!("{:?}", cbs[2].msg)
    };
    assert_eq!((r.content.as_str(), r.seq, r.attempt), ("hello", 0, 1));
    assert_eq!(r.metadata, json!({"files": 3}));
    let Callback::Error(f) = &cbs[3].msg else {
        panic!("{:?}", cbs[3].msg)
    };
    assert_eq!(
        (
            f.task_id.as_str(),
            f.attempt,
            f.error_type.as_str(),
            f.message.as_str()
        ),
        ("t2", 2, "timeout", "took too long")
    );
    let Callback::Proposal(p) = &cbs[4].msg else {
        panic!("{:?}", cbs[4].msg)
    };
    assert_eq!(
        (
            p.deliberation_id.as_str(),
            p.member.as_str(),
            p.round,
            p.content.as_str()
        ),
        ("d1", "DEV-1", 1, "use a queue")
    );
    assert!(p.checks.lint.as_ref().is_some_and(|c| c.passed));
    bridge.stop().await;
}

fn field<'a>(e: &'a StreamEntry, name: &str) -> &'a str {
    e.get_str(name)
        .unwrap_or_else(|| panic!("dead letter without `{name}`"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparseable_messages_are_dead_lettered_and_terminated_and_the_rest_flows() {
    let env = Env::start().await;
    let bridge = env.bridge(&[]).await;
    env.publish("agile.events", headers(&[]), "{not json").await;
    env.publish(
        "agile.events",
        headers(&[]),
        json!({"event_type": "EXPLODED", "case_id": "US-1"}).to_string(),
    )
    .await;
    // Well-formed, but the dispatcher would refuse it (a case id is a name): the bridge must
    // dead-letter it rather than ack it onto fleet:tasks.
    env.publish(
        "agile.events",
        headers(&[]),
        transition("US 123", "DRAFT", "BUILD"),
    )
    .await;
    env.publish(
        "agent.responses",
        headers(&[]),
        json!({"task_id": "t1", "status": "completed"}).to_string(),
    )
    .await;
    env.publish(
        "agile.events",
        headers(&[]),
        transition("US-2", "DRAFT", "BUILD"),
    )
    .await;

    env.wait_len(&env.keys.dlq(), 4, WITHIN).await;
    env.wait_len(&env.keys.tasks(), 1, WITHIN).await;
    let events = env.planning_events().await;
    assert_eq!(
        events[0].1.case_id, "US-2",
        "the valid event after them flowed"
    );

    let letters = env.entries(&env.keys.dlq()).await;
    assert_eq!(letters.len(), 4);
    let by_subject = |s: &str| -> Vec<&StreamEntry> {
        letters
            .iter()
            .filter(|e| e.get_str("subject") == Some(s))
            .collect()
    };
    let agile = by_subject("agile.events");
    assert_eq!(agile.len(), 3);
    let reasons: Vec<&str> = agile.iter().map(|e| field(e, "reason")).collect();
    assert!(reasons[0].contains("not valid JSON"), "{reasons:?}");
    assert!(
        reasons[1].contains("unknown event_type `EXPLODED`"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("invalid planning event") && reasons[2].contains("case_id"),
        "{reasons:?}"
    );
    assert_eq!(
        field(agile[2], "orig.data"),
        transition("US 123", "DRAFT", "BUILD")
    );
    assert_eq!(field(agile[0], "orig.data"), "{not json");
    assert_eq!(field(agile[0], "source"), "nats");
    assert_eq!(field(agile[0], "stream"), "nats:agile.events");
    assert_eq!(field(agile[0], "group"), "fleet-bridge-agile");
    assert_eq!(field(agile[0], "entry_id"), "AGILE:1");
    assert_eq!(field(agile[0], "deliveries"), "1");
    let responses = by_subject("agent.responses");
    assert_eq!(responses.len(), 1);
    assert!(field(responses[0], "reason").contains("session_id"));

    // Terminated: the server counts them done, and none was delivered twice.
    for (subject, durable, last) in [
        ("agile.events", "fleet-bridge-agile", 4),
        ("agent.responses", "fleet-bridge-responses", 1),
    ] {
        eventually(WITHIN, "dead letters terminated", || async {
            let c = env.consumer_info(subject, durable).await;
            (c.num_ack_pending == 0
                && c.num_pending == 0
                && c.num_redelivered == 0
                && c.ack_floor.stream_sequence == last)
                .then_some(())
        })
        .await;
    }
    assert_eq!(bridge.stats.dead_lettered(), 4);
    assert_eq!(bridge.stats.written(), 1);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_streams_and_consumers_are_reused() {
    let env = Env::start().await;
    // Someone else already stores agile.* in a stream of their own.
    env.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "PLANNING".into(),
            subjects: vec!["agile.*".into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    let bridge = env.bridge(&[]).await;
    env.publish("agile.events", headers(&[]), transition("US-3", "A", "B"))
        .await;
    env.wait_len(&env.keys.tasks(), 1, WITHIN).await;
    assert!(
        env.js.get_stream("AGILE").await.is_err(),
        "no second stream"
    );
    let events = env.planning_events().await;
    assert!(events[0].1.event_id.starts_with("PLANNING:1:"));
    bridge.stop().await;

    // A second start reuses the durable consumer: nothing is delivered again.
    let bridge = env.bridge(&[]).await;
    env.publish("agile.events", headers(&[]), transition("US-4", "A", "B"))
        .await;
    env.wait_len(&env.keys.tasks(), 2, WITHIN).await;
    eventually(WITHIN, "acked", || async {
        let c = env
            .consumer_info("agile.events", "fleet-bridge-agile")
            .await;
        (c.num_ack_pending == 0 && c.num_pending == 0).then_some(())
    })
    .await;
    assert_eq!(env.len(&env.keys.tasks()).await, 2);
    assert_eq!(bridge.stats.written(), 1);
    bridge.stop().await;
}

/// Regression (a publisher that died on "no responders" made `process` tests wait 90 s under
/// CPU load): the harness counts a stream ready for publishing only once the bridge's durable
/// is on it, not once the stream is listed, because nats-server lists a new stream before it
/// takes publishes (see `Env::wait_streams`). Here the streams are listed from the start, yet
/// the wait lasts until a bridge has provisioned them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_count_as_ready_once_the_bridge_consumes_them_not_once_listed() {
    let env = Env::start().await;
    for (name, subject) in [
        ("AGILE", "agile.events"),
        ("AGENT_RESPONSES", "agent.responses"),
    ] {
        env.js
            .create_stream(async_nats::jetstream::stream::Config {
                name: name.into(),
                subjects: vec![subject.into()],
                ..Default::default()
            })
            .await
            .expect("create stream");
        env.wait_stream(subject).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), env.wait_streams())
            .await
            .is_err(),
        "streams without the bridge's durables do not count as ready"
    );
    let bridge = env.bridge(&[]).await;
    env.wait_streams().await;
    env.publish("agile.events", headers(&[]), transition("US-5", "A", "B"))
        .await;
    env.wait_len(&env.keys.tasks(), 1, WITHIN).await;
    bridge.stop().await;
}

/// Publishes two planning events to an `agile.events` stream that exists before the bridge's
/// durable does (a Planning service's stream, on a first deploy), starts a bridge with `extra`,
/// publishes a third, and returns once `fleet:tasks` holds `expected` entries and the third
/// message is acked.
async fn history_then_one_more(extra: &[&str], expected: usize) -> (Env, common::Bridge) {
    let env = Env::start().await;
    env.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "AGILE".into(),
            subjects: vec!["agile.events".into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    for case in ["US-1", "US-2"] {
        env.publish(
            "agile.events",
            headers(&[]),
            transition(case, "DRAFT", "BUILD"),
        )
        .await;
    }
    assert_eq!(env.stored("agile.events").await, 2);
    let bridge = env.bridge(extra).await;
    env.publish(
        "agile.events",
        headers(&[]),
        transition("US-3", "DRAFT", "BUILD"),
    )
    .await;
    env.wait_len(&env.keys.tasks(), expected as u64, WITHIN)
        .await;
    // The durable delivers in stream order: once the last message is handled, every earlier
    // one it was going to deliver has been handled too.
    eventually(WITHIN, "the last message handled and acked", || async {
        let c = env
            .consumer_info("agile.events", "fleet-bridge-agile")
            .await;
        (c.delivered.stream_sequence == 3 && c.num_ack_pending == 0 && c.num_pending == 0)
            .then_some(())
    })
    .await;
    (env, bridge)
}

async fn case_ids(env: &Env) -> Vec<String> {
    env.planning_events()
        .await
        .into_iter()
        .map(|(_, p)| p.case_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agile_durable_starts_after_what_the_stream_already_holds() {
    let (env, bridge) = history_then_one_more(&[], 1).await;
    assert_eq!(
        case_ids(&env).await,
        ["US-3"],
        "the events published before the durable existed are not turned into work"
    );
    assert_eq!(bridge.stats.written(), 1);
    let c = env
        .consumer_info("agile.events", "fleet-bridge-agile")
        .await;
    assert_eq!(
        c.config.deliver_policy,
        async_nats::jetstream::consumer::DeliverPolicy::New
    );
    bridge.stop().await;

    // An existing durable keeps its position, whatever the flag says now.
    let bridge = env.bridge(&["--nats-agile-deliver", "all"]).await;
    env.publish(
        "agile.events",
        headers(&[]),
        transition("US-4", "DRAFT", "BUILD"),
    )
    .await;
    env.wait_len(&env.keys.tasks(), 2, WITHIN).await;
    eventually(WITHIN, "the new message handled and acked", || async {
        let c = env
            .consumer_info("agile.events", "fleet-bridge-agile")
            .await;
        (c.delivered.stream_sequence == 4 && c.num_ack_pending == 0 && c.num_pending == 0)
            .then_some(())
    })
    .await;
    assert_eq!(case_ids(&env).await, ["US-3", "US-4"]);
    assert_eq!(bridge.stats.written(), 1);
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agile_deliver_all_replays_what_the_stream_holds() {
    let (env, bridge) = history_then_one_more(&["--nats-agile-deliver", "all"], 3).await;
    assert_eq!(case_ids(&env).await, ["US-1", "US-2", "US-3"]);
    assert_eq!(bridge.stats.written(), 3);
    bridge.stop().await;
}
