//! Task state scripts against a real redis-server: whatever order and however often callbacks
//! arrive, the session log holds each event once, in order, and the task ends as the executor
//! said; stale, late and cancelled work changes nothing.

use fleet::Keys;
use fleet::events::ServerMessage;
use fleet::session::{Chat, InitSession, SubmitMessage, WS_PRESENCE_WINDOW_MS, WsPresence};
use fleet::session_log::{FanoutConfig, SessionLog};
use fleet::task::{OpStatus, Retention, TaskOp, TaskState};
use fred::prelude::*;
use proptest::prelude::*;
use serde_json::Value as Json;

struct Fixture {
    chat: Chat,
    log: SessionLog,
    client: Client,
    keys: Keys,
}

async fn fixture() -> Fixture {
    let client = fleet::redis::connect(&fleet_test_support::redis())
        .await
        .unwrap();
    let keys = Keys::new(&fleet_test_support::prefix());
    let chat = fleet::testing::echo_chat(&client, &keys).await;
    let log = SessionLog::new(client.clone(), keys.clone(), FanoutConfig::default());
    Fixture {
        chat,
        log,
        client,
        keys,
    }
}

/// A session with one submitted task.
async fn session_with_task(f: &Fixture) -> (String, String) {
    let (sid, mut tids) = fleet::testing::session_with_tasks(&f.chat, &["a b c"]).await;
    (sid, tids.remove(0))
}

/// The executor's callbacks for an answer of `n` chunks: started, chunks, result (seq 1..).
fn callbacks(sid: &str, tid: &str, n: u32) -> Vec<TaskOp> {
    let mut ops = vec![TaskOp::ordered("started", tid, 1, 1, String::new())];
    for i in 0..n {
        let seq = i + 2;
        let ev = ServerMessage::streaming(sid, tid, seq, &format!("w{i} "), i).to_json();
        ops.push(TaskOp::ordered("chunk", tid, 1, seq, ev));
    }
    let seq = n + 2;
    let mut result = TaskOp::ordered(
        "result",
        tid,
        1,
        seq,
        ServerMessage::response(sid, tid, seq, "all", &Json::Null).to_json(),
    );
    result.content = Some("all".into());
    ops.push(result);
    ops
}

fn logged_types_and_seqs(entries: &[fleet::session_log::LogEntry]) -> Vec<(String, u32)> {
    entries
        .iter()
        .map(|e| {
            let m: ServerMessage = serde_json::from_str(&e.json).unwrap();
            (m.message_type, m.seq.unwrap_or(0))
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Callbacks shuffled, duplicated and split into several calls still log each event once,
    /// in seq order, and complete the task.
    #[test]
    fn any_arrival_order_logs_each_event_once_in_order(
        n in 1u32..8,
        order in Just(()).prop_perturb(|_, mut rng| {
            // A random permutation of 0..12 with some indexes repeated.
            let mut v: Vec<usize> = (0..12).collect();
            for i in (1..v.len()).rev() { v.swap(i, rng.random_range(0..=i)); }
            let dups: Vec<usize> = (0..4).map(|_| rng.random_range(0..12)).collect();
            v.extend(dups);
            v
        }),
        splits in prop::collection::vec(1usize..5, 1..6),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let f = fixture().await;
            let (sid, tid) = session_with_task(&f).await;
            let all = callbacks(&sid, &tid, n);
            let arrivals: Vec<TaskOp> = order.iter().filter(|&&i| i < all.len()).map(|&i| all[i].clone()).collect();
            // Make sure every callback arrives at least once.
            let mut arrivals = arrivals;
            arrivals.extend(all.iter().cloned());
            let mut rest = &arrivals[..];
            let mut k = 0;
            while !rest.is_empty() {
                let take = splits[k % splits.len()].min(rest.len());
                f.chat.tasks.apply(&sid, &rest[..take]).await.unwrap();
                rest = &rest[take..];
                k += 1;
            }
            let task = f.chat.tasks.get(&sid, &tid).await.unwrap().unwrap();
            assert_eq!(task.state(), Some(TaskState::Completed));
            assert_eq!(task.result.as_deref(), Some("all"));
            assert_eq!(task.chunks, n);
            let log = f.log.replay_after(&sid, None, None, 1000).await.unwrap();
            let mut want: Vec<(String, u32)> = (0..n).map(|i| ("chat_streaming".to_owned(), i + 2)).collect();
            want.push(("chat_response".to_owned(), n + 2));
            assert_eq!(logged_types_and_seqs(&log), want);
        });
    }
}

#[tokio::test]
async fn stale_attempts_and_late_callbacks_change_nothing() {
    let f = fixture().await;
    let (sid, tid) = session_with_task(&f).await;
    let all = callbacks(&sid, &tid, 2);

    let mut stale = all[1].clone();
    stale.attempt = Some(2);
    let applied = f.chat.tasks.apply(&sid, &[stale]).await.unwrap();
    assert_eq!(applied.statuses, vec![OpStatus::Stale]);

    f.chat.tasks.apply(&sid, &all[..2]).await.unwrap();
    let ev =
        ServerMessage::chat_error(&sid, &tid, None, "cancelled", "stop", &Json::Null).to_json();
    let cancelled = f
        .chat
        .tasks
        .apply(
            &sid,
            &[TaskOp::end("cancel", &tid, "cancelled", "stop", ev)],
        )
        .await
        .unwrap();
    assert_eq!(cancelled.ended.len(), 1);
    assert_eq!(cancelled.ended[0].state, TaskState::Cancelled);

    let late = f.chat.tasks.apply(&sid, &all[2..]).await.unwrap();
    assert_eq!(late.statuses, vec![OpStatus::Terminal, OpStatus::Terminal]);
    assert!(late.events.is_empty());

    let task = f.chat.tasks.get(&sid, &tid).await.unwrap().unwrap();
    assert_eq!(task.state, "cancelled");
    assert_eq!(task.error.unwrap().error_type, "cancelled");
    let log = f.log.replay_after(&sid, None, None, 100).await.unwrap();
    assert_eq!(
        logged_types_and_seqs(&log),
        vec![("chat_streaming".into(), 2), ("chat_error".into(), 0)]
    );
    let status = f.chat.status(&sid).await.unwrap();
    assert_eq!(status.totals.cancelled, 1);
    assert_eq!(status.active_task, None);
}

#[tokio::test]
async fn each_logged_event_names_the_one_before_it() {
    let f = fixture().await;
    let (sid, tid) = session_with_task(&f).await;
    let applied = f
        .chat
        .tasks
        .apply(&sid, &callbacks(&sid, &tid, 3))
        .await
        .unwrap();
    assert_eq!(applied.events.len(), 4);
    assert_eq!(applied.events[0].prev, "");
    for pair in applied.events.windows(2) {
        assert_eq!(pair[1].prev, pair[0].event_id);
    }
    assert_eq!(applied.last_event_id, applied.events[3].event_id);
}

#[tokio::test]
async fn idempotency_keys_and_closed_sessions() {
    let f = fixture().await;
    let (sid, _) = session_with_task(&f).await;
    let msg = || SubmitMessage {
        message: "hi".into(),
        idempotency_key: Some("k1".into()),
        source: "rest",
        ..Default::default()
    };
    let first = f.chat.submit(&sid, msg()).await.unwrap();
    let again = f.chat.submit(&sid, msg()).await.unwrap();
    assert_eq!(first.task_id, again.task_id);
    assert!(again.duplicate);
    assert_eq!(f.chat.status(&sid).await.unwrap().totals.tasks, 2);

    let applied = f
        .chat
        .tasks
        .apply(&sid, &[TaskOp::session("close", "{}".into())])
        .await
        .unwrap();
    assert_eq!(applied.statuses, vec![OpStatus::Applied]);
    let refused = f
        .chat
        .submit(
            &sid,
            SubmitMessage {
                message: "late".into(),
                source: "rest",
                ..Default::default()
            },
        )
        .await;
    assert!(
        matches!(refused, Err(fleet::session::ChatError::SessionClosed(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn unordered_callbacks_apply_on_arrival_while_the_task_is_open() {
    let f = fixture().await;
    let (sid, tid) = session_with_task(&f).await;
    let mut result = TaskOp::ordered(
        "result",
        &tid,
        1,
        0,
        ServerMessage::response(&sid, &tid, 0, "done", &Json::Null).to_json(),
    );
    result.content = Some("done".into());
    let applied = f.chat.tasks.apply(&sid, &[result.clone()]).await.unwrap();
    assert_eq!(applied.statuses, vec![OpStatus::Applied]);
    let task = f.chat.tasks.get(&sid, &tid).await.unwrap().unwrap();
    assert_eq!(task.state, "completed");
    assert_eq!(task.result.as_deref(), Some("done"));
    let again = f.chat.tasks.apply(&sid, &[result]).await.unwrap();
    assert_eq!(again.statuses, vec![OpStatus::Terminal]);
    assert_eq!(
        f.log
            .replay_after(&sid, None, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn an_unordered_callback_delivered_twice_applies_once() {
    let f = fixture().await;
    let (sid, tid) = session_with_task(&f).await;
    let chunk = |once: &str, text: &str| {
        let mut op = TaskOp::ordered(
            "chunk",
            &tid,
            1,
            0,
            ServerMessage::streaming(&sid, &tid, 0, text, 0).to_json(),
        );
        op.once = Some(once.to_owned());
        op
    };
    let first = f
        .chat
        .tasks
        .apply(
            &sid,
            &[chunk("0190e0c2-0000-7000-8000-000000000001/0", "a")],
        )
        .await
        .unwrap();
    assert_eq!(first.statuses, vec![OpStatus::Applied]);
    // Its redelivery, alone and beside the next callback of the same entry and a new one.
    let again = f
        .chat
        .tasks
        .apply(
            &sid,
            &[
                chunk("0190e0c2-0000-7000-8000-000000000001/0", "a"),
                chunk("0190e0c2-0000-7000-8000-000000000001/1", "b"),
                chunk("0190e0c2-0000-7000-8000-000000000002/0", "c"),
                chunk("0190e0c2-0000-7000-8000-000000000002/0", "c"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        again.statuses,
        vec![
            OpStatus::Duplicate,
            OpStatus::Applied,
            OpStatus::Applied,
            OpStatus::Duplicate
        ]
    );
    let streamed: Vec<String> = f
        .log
        .replay_after(&sid, None, None, 10)
        .await
        .unwrap()
        .iter()
        .filter_map(|e| {
            let v: Json = serde_json::from_str(&e.json).ok()?;
            Some(v["data"]["content"].as_str()?.to_owned())
        })
        .collect();
    assert_eq!(streamed, ["a", "b", "c"]);
    let task = f.chat.tasks.get(&sid, &tid).await.unwrap().unwrap();
    assert_eq!(task.chunks, 3);
}

#[tokio::test]
async fn a_later_attempt_takes_the_task_over_and_the_earlier_one_is_stale() {
    let f = fixture().await;
    let (sid, tid) = session_with_task(&f).await;
    let op = |kind: &'static str, attempt: u32, seq: u32, text: &str| {
        let ev = match kind {
            "chunk" => ServerMessage::streaming(&sid, &tid, seq, text, seq - 2),
            _ => ServerMessage::response(&sid, &tid, seq, text, &Json::Null),
        };
        let mut op = TaskOp::ordered(kind, &tid, attempt, seq, ev.to_json());
        if kind == "result" {
            op.content = Some(text.to_owned());
        }
        op
    };
    let started = |attempt| TaskOp::ordered("started", &tid, attempt, 1, String::new());
    let restart = |attempt| {
        TaskOp::restart(
            &tid,
            attempt,
            ServerMessage::task_restarted(&sid, &tid, attempt).to_json(),
        )
    };
    // Attempt 1 streams a chunk; its fourth callback is parked waiting for its third.
    let first = f
        .chat
        .tasks
        .apply(
            &sid,
            &[
                started(1),
                op("chunk", 1, 2, "one"),
                op("chunk", 1, 4, "lost"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        first.statuses,
        [OpStatus::Applied, OpStatus::Applied, OpStatus::Buffered]
    );

    // Attempt 2 runs it again from the start: it takes the task over, once.
    let second = f
        .chat
        .tasks
        .apply(
            &sid,
            &[
                restart(2),
                started(2),
                op("chunk", 1, 3, "late"),
                restart(2),
                op("chunk", 2, 2, "uno"),
                restart(1),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        second.statuses,
        [
            OpStatus::Applied,
            OpStatus::Applied,
            OpStatus::Stale,
            OpStatus::Duplicate,
            OpStatus::Applied,
            OpStatus::Stale
        ]
    );
    let done = f
        .chat
        .tasks
        .apply(&sid, &[op("result", 2, 3, "uno")])
        .await
        .unwrap();
    assert_eq!(done.statuses, [OpStatus::Applied]);

    let log: Vec<(String, Json)> = f
        .log
        .replay_after(&sid, None, None, 100)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.task_id == tid)
        .map(|e| {
            let v: Json = serde_json::from_str(&e.json).unwrap();
            (
                v["message_type"].as_str().unwrap().to_owned(),
                v["data"].clone(),
            )
        })
        .filter(|(kind, _)| kind != "task_queued")
        .collect();
    let kinds: Vec<&str> = log.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "chat_streaming",
            "task_restarted",
            "chat_streaming",
            "chat_response"
        ]
    );
    assert_eq!(log[0].1["content"], "one");
    assert_eq!(log[1].1["attempt"], 2);
    assert_eq!(log[2].1["content"], "uno");
    let task = f.chat.tasks.get(&sid, &tid).await.unwrap().unwrap();
    assert_eq!(task.state(), Some(TaskState::Completed));
    assert_eq!((task.attempt, task.chunks), (2, 1));
    assert_eq!(task.result.as_deref(), Some("uno"));
    // The earlier attempt's parked callback went with it.
    let parked: Option<String> = f.client.hget(f.keys.task(&sid, &tid), "p:4").await.unwrap();
    assert_eq!(parked, None);
}

#[tokio::test]
async fn a_restart_before_anything_streamed_tells_the_client_nothing() {
    let f = fixture().await;
    let (sid, tid) = session_with_task(&f).await;
    let restart = TaskOp::restart(
        &tid,
        3,
        ServerMessage::task_restarted(&sid, &tid, 3).to_json(),
    );
    let applied = f.chat.tasks.apply(&sid, &[restart]).await.unwrap();
    assert_eq!(applied.statuses, [OpStatus::Applied]);
    assert!(applied.events.is_empty(), "{:?}", applied.events);
    let task = f.chat.tasks.get(&sid, &tid).await.unwrap().unwrap();
    assert_eq!(task.attempt, 3);
}

fn ws(sid: &str, connections: u64, version: u64) -> WsPresence {
    WsPresence {
        session_id: sid.to_owned(),
        connections,
        version,
    }
}

#[tokio::test]
async fn presence_never_recreates_an_expired_session() {
    let f = fixture().await;
    let (sid, _) = session_with_task(&f).await;
    f.chat
        .websocket_presence("gw1", &[ws(&sid, 1, 1)])
        .await
        .unwrap();
    assert!(f.chat.status(&sid).await.unwrap().websocket_connected);

    let gone = "0190aaaa-0000-7000-8000-000000000000";
    f.chat
        .websocket_presence("gw1", &[ws(gone, 1, 2)])
        .await
        .unwrap();
    assert!(matches!(
        f.chat.status(gone).await,
        Err(fleet::session::ChatError::NotFound { .. })
    ));
}

#[tokio::test]
async fn presence_sums_the_gateways_and_keeps_each_ones_newest_report() {
    let f = fixture().await;
    let (sid, _) = session_with_task(&f).await;
    let connections = |f: &Fixture| {
        let sid = sid.clone();
        let chat = f.chat.clone();
        async move { chat.status(&sid).await.unwrap().websocket_connections }
    };

    f.chat
        .websocket_presence("gw1", &[ws(&sid, 2, 1)])
        .await
        .unwrap();
    f.chat
        .websocket_presence("gw2", &[ws(&sid, 1, 1)])
        .await
        .unwrap();
    assert_eq!(connections(&f).await, 3);

    // A report that arrives after a newer one of the same gateway changes nothing.
    f.chat
        .websocket_presence("gw1", &[ws(&sid, 0, 5)])
        .await
        .unwrap();
    f.chat
        .websocket_presence("gw1", &[ws(&sid, 4, 4)])
        .await
        .unwrap();
    assert_eq!(connections(&f).await, 1);

    // The last of gw2's sockets ends: no WebSocket is left.
    f.chat
        .websocket_presence("gw2", &[ws(&sid, 0, 2)])
        .await
        .unwrap();
    let st = f.chat.status(&sid).await.unwrap();
    assert_eq!(
        (st.websocket_connected, st.websocket_connections),
        (false, 0)
    );
}

#[tokio::test]
async fn a_dead_gateways_websockets_stop_counting_after_the_presence_window() {
    let f = fixture().await;
    let (sid, _) = session_with_task(&f).await;
    let now = fleet::time::now_ms();
    // What a gateway that died holding two sockets of the session left behind, last refreshed
    // just over the window ago, and one refreshed a moment ago.
    let _: () = f
        .client
        .hset(
            f.keys.session(&sid),
            [
                (
                    fleet::session::ws_presence_field("dead"),
                    format!("2 {} 9", now - WS_PRESENCE_WINDOW_MS - 1_000),
                ),
                (
                    fleet::session::ws_presence_field("alive"),
                    format!("1 {} 3", now - 1_000),
                ),
            ],
        )
        .await
        .unwrap();
    let st = f.chat.status(&sid).await.unwrap();
    assert_eq!(
        (st.websocket_connected, st.websocket_connections),
        (true, 1)
    );
}

#[tokio::test]
async fn the_log_tells_whether_events_were_trimmed_before_its_oldest() {
    let f = fixture().await;
    let (sid, tid) = session_with_task(&f).await;
    let applied = f
        .chat
        .tasks
        .apply(&sid, &callbacks(&sid, &tid, 3))
        .await
        .unwrap();
    let ids: Vec<fleet::stream::StreamId> = applied
        .events
        .iter()
        .map(|e| e.event_id.parse().unwrap())
        .collect();
    let oldest = f.log.oldest(&sid).await.unwrap().unwrap();
    assert_eq!(oldest.prev, None, "the first event has no predecessor");
    assert!(!oldest.lost_since(fleet::stream::StreamId::ZERO));

    // Trim the first two events away.
    let _: i64 = fred::prelude::StreamsInterface::xdel(
        f.chat.tasks.client(),
        f.chat.tasks.keys().session_events(&sid),
        vec![ids[0].to_string(), ids[1].to_string()],
    )
    .await
    .unwrap();
    let oldest = f.log.oldest(&sid).await.unwrap().unwrap();
    assert_eq!(oldest.event_id, ids[2]);
    assert!(
        !oldest.lost_since(ids[1]),
        "a client that saw ids[1] lost nothing"
    );
    assert!(
        oldest.lost_since(ids[0]),
        "a client that saw only ids[0] lost ids[1]"
    );
}

#[tokio::test]
async fn a_session_counts_its_tasks_and_every_key_it_writes_expires() {
    let f = fixture().await;
    let (sid, tid) = session_with_task(&f).await;
    assert_eq!(
        f.chat.tasks.open_tasks(&sid).await.unwrap(),
        vec![tid.clone()]
    );
    let status = f.chat.status(&sid).await.unwrap();
    assert_eq!(status.active_task.as_deref(), Some(tid.as_str()));
    assert_eq!(status.totals.tasks, 1);

    f.chat
        .tasks
        .apply(&sid, &callbacks(&sid, &tid, 2))
        .await
        .unwrap();

    assert!(f.chat.tasks.open_tasks(&sid).await.unwrap().is_empty());
    let status = f.chat.status(&sid).await.unwrap();
    assert_eq!(status.active_task, None);
    assert_eq!((status.totals.tasks, status.totals.completed), (1, 1));
    let keys = f.chat.tasks.keys();
    let client = f.chat.tasks.client();
    for key in [
        keys.session(&sid),
        keys.session_events(&sid),
        keys.task(&sid, &tid),
    ] {
        let ttl: i64 = client.pttl(&key).await.unwrap();
        assert!(ttl > 0, "{key} has no TTL ({ttl})");
    }
}

/// TTLs are renewed only when the last renewal is older than a hundredth of the TTL.
#[tokio::test]
async fn a_busy_session_renews_its_ttls_once_a_hundredth_of_the_ttl_has_passed() {
    let f = fixture().await;
    let (sid, tid) = session_with_task(&f).await;
    let (keys, client) = (f.chat.tasks.keys(), f.chat.tasks.client());
    let ttl = Retention::default().session_ttl_ms;
    let session_ttl = || async { client.pttl::<i64, _>(keys.session(&sid)).await.unwrap() };
    let event = |text: &str| {
        TaskOp::session(
            "event",
            ServerMessage::streaming(&sid, &tid, 0, text, 0).to_json(),
        )
    };
    // The log's first event always sets its TTL; the rule applies after it.
    f.chat.tasks.apply(&sid, &[event("first")]).await.unwrap();
    let now = fleet::time::now_ms();
    let short = 60_000;

    // Renewed a moment ago: an event leaves the TTL alone.
    let _: () = client
        .hset(keys.session(&sid), ("ttl_refreshed_ms", now))
        .await
        .unwrap();
    let _: bool = client
        .pexpire(keys.session(&sid), short, None)
        .await
        .unwrap();
    f.chat.tasks.apply(&sid, &[event("a")]).await.unwrap();
    assert!(session_ttl().await <= short);

    // Renewed more than a hundredth of the TTL ago: the next event renews every key.
    let _: () = client
        .hset(
            keys.session(&sid),
            ("ttl_refreshed_ms", now - ttl / 100 - 1),
        )
        .await
        .unwrap();
    f.chat.tasks.apply(&sid, &[event("b")]).await.unwrap();
    assert!(session_ttl().await > ttl - 60_000);
    let log_ttl: i64 = client.pttl(keys.session_events(&sid)).await.unwrap();
    assert!(log_ttl > ttl - 60_000);
}

#[tokio::test]
async fn a_created_task_always_has_its_deadline() {
    let f = fixture().await;
    let sid = f
        .chat
        .init_session(InitSession {
            agent_id: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .session_id;
    let (client, keys) = (f.chat.tasks.client(), f.chat.tasks.keys());
    let deadline_of = |tid: &str| {
        let member = format!("{sid}/{tid}");
        async move {
            let score: Option<f64> = client.zscore(keys.deadlines(), member).await.unwrap();
            score
        }
    };
    let submit = |tid: &str| {
        f.chat.submit(
            &sid,
            SubmitMessage {
                message: "hi".into(),
                task_id: Some(tid.into()),
                source: "rest",
                ..Default::default()
            },
        )
    };
    // The pool's stream cannot take the executor's request (its key holds a string): the submit
    // fails after the task is created, as when a front door stops between its two round trips.
    let pool = keys.exec("default");
    let _: () = client
        .set(&pool, "not a stream", None, None, false)
        .await
        .unwrap();
    let refused = submit("t-1").await;
    assert!(
        matches!(refused, Err(fleet::session::ChatError::Unavailable(_))),
        "{refused:?}"
    );
    let task = f.chat.tasks.get(&sid, "t-1").await.unwrap().unwrap();
    assert_eq!(task.state(), Some(TaskState::Dispatched));
    // So the deadline sweeper still ends it: it is not open for good.
    assert_eq!(deadline_of("t-1").await, Some(task.deadline_ms as f64));

    // A submit of a taken id answers with that task and leaves its deadline as it was.
    let _: () = client.del(&pool).await.unwrap();
    let again = submit("t-1").await.unwrap();
    assert!(again.duplicate);
    assert_eq!(deadline_of("t-1").await, Some(task.deadline_ms as f64));

    // A deadline lost on the way (its front door or dispatcher stopped before it went in) is
    // registered again when the submit, or the planning command, is repeated.
    let _: () = client
        .zrem(keys.deadlines(), format!("{sid}/t-1"))
        .await
        .unwrap();
    assert!(submit("t-1").await.unwrap().duplicate);
    let restored = deadline_of("t-1").await.expect("the deadline is back");
    assert!(restored >= task.deadline_ms as f64, "{restored}");
}

#[tokio::test]
async fn a_reserved_id_whose_submit_was_refused_is_not_ended_at_its_deadline() {
    let f = fixture().await;
    let (sid, _) = fleet::testing::session_with_tasks(&f.chat, &[]).await;
    let reserved = f.chat.reserve_task(&sid).await.unwrap();
    let closed = ServerMessage::new("session_closed", &sid, None, Json::Null).to_json();
    f.chat
        .tasks
        .apply(&sid, &[TaskOp::session("close", closed)])
        .await
        .unwrap();
    // The client submits its reserved id after the close: refused, but the deadline went in
    // ahead of the refused create.
    let refused = f
        .chat
        .submit(
            &sid,
            SubmitMessage {
                message: "hi".into(),
                task_id: Some(reserved.clone()),
                source: "rest",
                ..Default::default()
            },
        )
        .await;
    assert!(
        matches!(refused, Err(fleet::session::ChatError::SessionClosed(_))),
        "{refused:?}"
    );
    let member = format!("{sid}/{reserved}");
    let deadline: Option<f64> = f.client.zscore(f.keys.deadlines(), member).await.unwrap();
    assert!(deadline.is_some());

    // At the deadline the sweeper ends what is under it: nothing, as no task was submitted.
    let message = "the task did not finish before its deadline";
    let ev = ServerMessage::chat_error(&sid, &reserved, None, "timed_out", message, &Json::Null);
    let swept = f
        .chat
        .tasks
        .apply(
            &sid,
            &[TaskOp::end(
                "timeout",
                &reserved,
                "timed_out",
                message,
                ev.to_json(),
            )],
        )
        .await
        .unwrap();
    assert_eq!(swept.statuses, [OpStatus::Missing]);
    assert!(swept.ended.is_empty(), "{:?}", swept.ended);
    let log = f.log.replay_after(&sid, None, None, 100).await.unwrap();
    assert!(
        log.iter().all(|e| e.task_id != reserved),
        "a task nobody submitted has no events: {log:?}"
    );
    let status = f.chat.status(&sid).await.unwrap();
    assert_eq!(
        (status.totals.tasks, status.totals.timed_out),
        (0, 0),
        "{:?}",
        status.totals
    );
    let task = f.chat.tasks.get(&sid, &reserved).await.unwrap().unwrap();
    assert_eq!(task.state(), Some(TaskState::Reserved));
}

#[tokio::test]
async fn a_later_attempt_naming_a_reserved_id_does_not_hold_back_its_sessions_callbacks() {
    let f = fixture().await;
    let (sid, tid) = session_with_task(&f).await;
    let reserved = f.chat.reserve_task(&sid).await.unwrap();
    // As the callback-worker builds them for one batch of the session: a callback of attempt 2
    // for the reserved id (its restart op first), then the real task's whole answer.
    let mut ops = vec![
        TaskOp::restart(
            &reserved,
            2,
            ServerMessage::task_restarted(&sid, &reserved, 2).to_json(),
        ),
        TaskOp::ordered(
            "chunk",
            &reserved,
            2,
            1,
            ServerMessage::streaming(&sid, &reserved, 1, "stray", 0).to_json(),
        ),
    ];
    ops.extend(callbacks(&sid, &tid, 1));
    let applied = f
        .chat
        .tasks
        .apply(&sid, &ops)
        .await
        .expect("the session's callbacks apply");
    assert_eq!(
        applied.statuses[..2],
        [OpStatus::Missing, OpStatus::Missing]
    );
    let task = f.chat.tasks.get(&sid, &tid).await.unwrap().unwrap();
    assert_eq!(task.state(), Some(TaskState::Completed));
    let reserved = f.chat.tasks.get(&sid, &reserved).await.unwrap().unwrap();
    assert_eq!(reserved.state(), Some(TaskState::Reserved));
}

#[tokio::test]
async fn a_run_again_after_unordered_chunks_tells_the_client_to_discard_them() {
    let f = fixture().await;
    let (sid, tid) = session_with_task(&f).await;
    // A sender that cannot number its callbacks streams a chunk of its first run.
    let mut chunk = TaskOp::ordered(
        "chunk",
        &tid,
        1,
        0,
        ServerMessage::streaming(&sid, &tid, 0, "first run", 0).to_json(),
    );
    chunk.once = Some("entry-1/0".into());
    let first = f.chat.tasks.apply(&sid, &[chunk]).await.unwrap();
    assert_eq!(first.statuses, [OpStatus::Applied]);
    // Its run again from the start takes the task over.
    let restart = TaskOp::restart(
        &tid,
        2,
        ServerMessage::task_restarted(&sid, &tid, 2).to_json(),
    );
    let second = f.chat.tasks.apply(&sid, &[restart]).await.unwrap();
    assert_eq!(second.statuses, [OpStatus::Applied]);
    let kinds: Vec<String> = fleet::testing::task_events(&f.client, &f.keys, &sid, &tid)
        .await
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    assert_eq!(kinds, ["chat_streaming", "task_restarted"]);
    let task = f.chat.tasks.get(&sid, &tid).await.unwrap().unwrap();
    assert_eq!((task.attempt, task.chunks), (2, 0));
}

/// A task that keeps streaming keeps its key as long as its session: it does not expire a TTL
/// after its creation while its session, renewed by the task's own events, lives on.
#[tokio::test]
async fn a_task_streaming_for_longer_than_the_ttl_keeps_its_key() {
    let f = fixture().await;
    let (sid, tid) = session_with_task(&f).await;
    let (keys, client) = (f.chat.tasks.keys(), f.chat.tasks.client());
    let ttl = Retention::default().session_ttl_ms;
    let pttl = |key: String| async move { client.pttl::<i64, _>(key).await.unwrap() };
    let chunk = |seq: u32| {
        let ev = ServerMessage::streaming(&sid, &tid, seq, "w", seq - 2).to_json();
        TaskOp::ordered("chunk", &tid, 1, seq, ev)
    };
    let started = TaskOp::ordered("started", &tid, 1, 1, String::new());
    f.chat
        .tasks
        .apply(&sid, &[started, chunk(2)])
        .await
        .unwrap();

    // As if it had been streaming for all but a minute of the TTL: its key has a minute left,
    // and its session's last renewal is a hundredth of the TTL old.
    let now = fleet::time::now_ms();
    let left = 60_000;
    let _: () = client
        .hset(keys.task(&sid, &tid), ("created_ms", now - ttl + left))
        .await
        .unwrap();
    let _: bool = client
        .pexpire(keys.task(&sid, &tid), left, None)
        .await
        .unwrap();
    let _: () = client
        .hset(
            keys.session(&sid),
            ("ttl_refreshed_ms", now - ttl / 100 - 1),
        )
        .await
        .unwrap();

    f.chat.tasks.apply(&sid, &[chunk(3)]).await.unwrap();
    assert!(pttl(keys.session(&sid)).await > ttl - left);
    let task_ttl = pttl(keys.task(&sid, &tid)).await;
    assert!(
        task_ttl > ttl - left,
        "the task's key expires with its session, not {task_ttl} ms from now"
    );
}
