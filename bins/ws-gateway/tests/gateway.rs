//! ws-gateway end to end: a real Redis, the gateway in-process, clients over real sockets.

mod common;

use common::*;
use fred::cmd;
use fred::prelude::*;
use futures::SinkExt;
use serde_json::{Value as Json, json};
use tokio_tungstenite::tungstenite::protocol::Message;

fn assert_chunk(m: &Json, content: &str) {
    assert_eq!(m["message_type"], "chat_streaming", "{m}");
    assert_eq!(m["data"]["content"], content, "{m}");
}

#[tokio::test]
async fn chunks_then_the_response_arrive_in_order_over_websocket_and_sse() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;

    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    ping_pong(&mut ws).await;
    let mut sse = SseStream::new(
        SseStream::open(&format!("{}?token={}", gw.sse_url(&s.sid), s.token), &[]).await,
    );

    let mut logged = Vec::new();
    for (seq, content) in [(1, "Hel"), (2, "lo "), (3, "world")] {
        logged.push(fleet.chunk(&s.sid, &tid, seq, content).await);
    }
    logged.extend(
        fleet
            .emit(&s.sid, &[result(&s.sid, &tid, 4, "Hello world")], true)
            .await,
    );
    let want: Vec<String> = logged.iter().map(|e| e.event_id.clone()).collect();

    let got = recv_n(&mut ws, 4).await;
    assert_eq!(event_ids(&got), want);
    assert_chunk(&got[0], "Hel");
    assert_chunk(&got[1], "lo ");
    assert_chunk(&got[2], "world");
    assert_eq!(got[3]["message_type"], "chat_response");
    assert_eq!(got[3]["data"]["content"], "Hello world");
    assert_eq!(got[3]["data"]["is_final"], true);
    for m in &got {
        assert_eq!(m["session_id"], s.sid.as_str());
        assert_eq!(m["task_id"], tid.as_str());
    }
    // Nothing more: the next message is the answer to a ping.
    ping_pong(&mut ws).await;

    let events = sse.next_n(4).await;
    for (ev, want_id) in events.iter().zip(&want) {
        assert_eq!(ev.id.as_deref(), Some(want_id.as_str()));
        assert_eq!(ev.data["event_id"], want_id.as_str());
    }
    assert_eq!(events[3].data["message_type"], "chat_response");
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_reconnecting_client_gets_exactly_the_events_it_missed() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;

    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    fleet.chunk(&s.sid, &tid, 1, "a").await;
    fleet.chunk(&s.sid, &tid, 2, "b").await;
    let first = recv_n(&mut ws, 2).await;
    assert_chunk(&first[1], "b");
    let last_seen = first[1]["event_id"].as_str().unwrap().to_owned();
    ws.close(None).await.expect("client close");
    drop(ws);

    // Missed while away.
    let c = fleet.chunk(&s.sid, &tid, 3, "c").await;
    let d = fleet.chunk(&s.sid, &tid, 4, "d").await;

    let mut ws = ws_connect(&ws_url(&gw, &s, Some(&last_seen))).await;
    let e = fleet
        .emit(&s.sid, &[result(&s.sid, &tid, 5, "abcd")], true)
        .await
        .remove(0);
    let got = recv_n(&mut ws, 3).await;
    assert_eq!(
        event_ids(&got),
        vec![c.event_id, d.event_id, e.event_id.clone()]
    );
    assert_chunk(&got[0], "c");
    assert_chunk(&got[1], "d");
    assert_eq!(got[2]["message_type"], "chat_response");
    ping_pong(&mut ws).await;

    // Resuming at the newest event sends nothing old; a Bearer header works as well.
    let mut ws = ws_connect_request(
        &format!("{}?last_event_id={}", gw.ws_url(&s.sid), e.event_id),
        Some(&s.token),
    )
    .await;
    ping_pong(&mut ws).await;
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_lost_fanout_entry_is_read_from_the_log_before_the_next_event() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    // Once the first event is in, the replay is over: later ones arrive live.
    fleet.chunk(&s.sid, &tid, 1, "a").await;
    assert_chunk(&recv_json(&mut ws).await, "a");

    let lost = fleet
        .emit(&s.sid, &[chunk(&s.sid, &tid, 2, "b")], false)
        .await
        .remove(0);
    let next = fleet.chunk(&s.sid, &tid, 3, "c").await;
    assert_eq!(next.prev, lost.event_id);
    let got = recv_n(&mut ws, 2).await;
    assert_eq!(event_ids(&got), vec![lost.event_id, next.event_id]);
    assert_chunk(&got[0], "b");
    assert_chunk(&got[1], "c");
    ping_pong(&mut ws).await;
    let metrics = gw.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("fleet_ws_gap_fills_total") && !l.ends_with(" 0")),
        "a gap fill is counted:\n{metrics}"
    );
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_client_that_keeps_sending_still_gets_its_events() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let ws = ws_connect(&ws_url(&gw, &s, None)).await;
    let (mut tx, mut rx) = futures::StreamExt::split(ws);
    // Live first: the replay of the log is over once this event is in.
    fleet.chunk(&s.sid, &tid, 1, "a").await;
    let first: Json = match futures::StreamExt::next(&mut rx).await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(&t).expect("json"),
        other => panic!("expected the first event, got {other:?}"),
    };
    assert_chunk(&first, "a");

    // The client sends without pause (a client submitting faster than the fleet answers keeps
    // the gateway's socket full like this) and reads what comes back.
    let stop = tokio_util::sync::CancellationToken::new();
    let flood = tokio::spawn({
        let stop = stop.clone();
        async move {
            let ping = Message::Text(json!({"message_type": "ping"}).to_string().into());
            let mut sent = 0u64;
            while !stop.is_cancelled() {
                if tx.send(ping.clone()).await.is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        }
    });
    let mut pongs = 0u64;
    while pongs < 200 {
        match tokio::time::timeout(WAIT, futures::StreamExt::next(&mut rx)).await {
            Ok(Some(Ok(Message::Text(t)))) if t.contains("\"pong\"") => pongs += 1,
            other => panic!("expected pongs while the client sends, got {other:?}"),
        }
    }
    // An event fanned out while the client keeps sending reaches it while it keeps sending.
    fleet.chunk(&s.sid, &tid, 2, "b").await;
    let event = tokio::time::timeout(WAIT, async {
        loop {
            match futures::StreamExt::next(&mut rx).await {
                Some(Ok(Message::Text(t))) if t.contains("\"pong\"") => pongs += 1,
                Some(Ok(Message::Text(t))) => {
                    break serde_json::from_str::<Json>(&t).expect("json");
                }
                other => panic!("expected the event while the client sends, got {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!("no event in {WAIT:?} while the client kept sending ({pongs} pongs)")
    });
    assert!(!flood.is_finished(), "the client was still sending");
    stop.cancel();
    let sent = flood.await.expect("flood");
    assert_chunk(&event, "b");
    assert!(pongs < sent, "{pongs} pongs, {sent} pings");
    gw.stop().await.expect("clean stop");
}

/// The value of gauge `name` in Prometheus text (0 when absent).
fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn connections_beyond_the_admission_bound_wait_their_turn_and_are_then_served() {
    // A Redis of its own: the test pauses its writes, which holds each admission (its presence
    // report is a write) on Redis.
    let redis = fleet_test_support::RedisServer::start();
    let fleet = Fleet::on(redis.url()).await;
    let gw = fleet.gateway_with(&["--admissions-at-once", "1"]).await;
    let sessions = [
        fleet.session().await,
        fleet.session().await,
        fleet.session().await,
    ];
    let _: Value = fleet
        .client
        .custom(cmd!("CLIENT"), vec!["PAUSE", "30000", "WRITE"])
        .await
        .expect("client pause");

    // The upgrade completes at once; admission follows, one connection at a time.
    let mut sockets = Vec::new();
    for s in &sessions {
        sockets.push(ws_connect(&ws_url(&gw, s, None)).await);
    }
    let metrics = fleet_test_support::eventually(WAIT, "two connections waiting", || async {
        let m = gw.metrics().await;
        (gauge(&m, "fleet_ws_admissions_waiting") == 2.0).then_some(m)
    })
    .await;
    assert_eq!(gauge(&metrics, "fleet_ws_connections"), 0.0, "{metrics}");

    let _: Value = fleet
        .client
        .custom(cmd!("CLIENT"), vec!["UNPAUSE"])
        .await
        .expect("client unpause");
    for (i, ws) in sockets.iter_mut().enumerate() {
        let frame = json!({"message_type": "chat_message", "data": {"message": "hi", "task_id": format!("t{i}")}});
        send_text(ws, &frame.to_string()).await;
        let queued = recv_json(ws).await;
        assert_eq!(queued["message_type"], "task_queued", "{queued}");
        assert_eq!(queued["task_id"], format!("t{i}"));
    }
    let metrics = gw.metrics().await;
    assert_eq!(
        gauge(&metrics, "fleet_ws_admissions_waiting"),
        0.0,
        "{metrics}"
    );
    assert_eq!(gauge(&metrics, "fleet_ws_connections"), 3.0, "{metrics}");
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_socket_is_served_while_its_chat_message_waits_on_redis() {
    // A Redis of its own: the test pauses its writes.
    let redis = fleet_test_support::RedisServer::start();
    let fleet = Fleet::on(redis.url()).await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    ping_pong(&mut ws).await;

    // Writes wait (the submit's `create` script among them) until the pause is lifted.
    let _: Value = fleet
        .client
        .custom(cmd!("CLIENT"), vec!["PAUSE", "30000", "WRITE"])
        .await
        .expect("client pause");
    send_text(
        &mut ws,
        r#"{"message_type":"chat_message","data":{"message":"hello","task_id":"t-paused"}}"#,
    )
    .await;
    // The socket still answers while the chat message waits on Redis...
    send_text(&mut ws, r#"{"message_type":"ping"}"#).await;
    let pong = recv_json(&mut ws).await;
    assert_eq!(
        pong["message_type"], "pong",
        "the pong comes before the queued task it did not wait for: {pong}"
    );
    // ...and a malformed frame's error waits its turn behind the chat message's reply.
    send_text(&mut ws, "not json").await;
    let _: Value = fleet
        .client
        .custom(cmd!("CLIENT"), vec!["UNPAUSE"])
        .await
        .expect("client unpause");
    let queued = recv_json(&mut ws).await;
    assert_eq!(queued["message_type"], "task_queued", "{queued}");
    assert_eq!(queued["task_id"], "t-paused");
    let refused = recv_json(&mut ws).await;
    assert_eq!(
        refused["data"]["error"]["error_type"], "invalid_message",
        "{refused}"
    );
    let task = fleet.chat.task(&s.sid, "t-paused").await.expect("task");
    assert_eq!(task.state, "dispatched");
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn chat_messages_sent_at_once_are_answered_in_the_order_sent() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let ws = ws_connect(&ws_url(&gw, &s, None)).await;
    let (mut tx, mut rx) = futures::StreamExt::split(ws);
    // More than one socket may have in flight, so that some wait for a place.
    let n = ws_gateway::ws::MAX_PENDING_REPLIES + 8;
    let ids: Vec<String> = (0..n).map(|i| format!("t-{i:03}")).collect();
    let frames = ids.iter().map(|id| {
        Ok(Message::Text(
            json!({"message_type": "chat_message", "data": {"message": "hi", "task_id": id}})
                .to_string()
                .into(),
        ))
    });
    tx.send_all(&mut futures::stream::iter(frames))
        .await
        .expect("send");
    let mut answered = Vec::with_capacity(n);
    while answered.len() < n {
        let msg = match tokio::time::timeout(WAIT, futures::StreamExt::next(&mut rx)).await {
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Json>(&t).expect("json"),
            other => panic!("expected task_queued, got {other:?} after {answered:?}"),
        };
        assert_eq!(msg["message_type"], "task_queued", "{msg}");
        answered.push(msg["task_id"].as_str().expect("task_id").to_owned());
    }
    assert_eq!(answered, ids);
    for id in &ids {
        let task = fleet.chat.task(&s.sid, id).await.expect("task");
        assert_eq!(task.state, "dispatched");
    }
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_nudge_alone_delivers_the_events_it_points_at() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    fleet.chunk(&s.sid, &tid, 1, "a").await;
    assert_chunk(&recv_json(&mut ws).await, "a");

    let lost = fleet
        .emit(
            &s.sid,
            &[chunk(&s.sid, &tid, 2, "b"), result(&s.sid, &tid, 3, "ab")],
            false,
        )
        .await;
    fleet.nudge(&s.sid, &lost[1].event_id).await;
    let got = recv_n(&mut ws, 2).await;
    assert_eq!(
        event_ids(&got),
        vec![lost[0].event_id.clone(), lost[1].event_id.clone()]
    );
    assert_eq!(got[1]["message_type"], "chat_response");
    // A nudge for what was delivered already sends nothing.
    fleet.nudge(&s.sid, &lost[1].event_id).await;
    ping_pong(&mut ws).await;
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_chat_message_over_the_websocket_queues_a_task() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;

    send_text(
        &mut ws,
        r#"{"message_type":"chat_message","data":{"message":"hello there","metadata":{"k":1},"idempotency_key":"k1"}}"#,
    )
    .await;
    let queued = recv_json(&mut ws).await;
    assert_eq!(queued["message_type"], "task_queued", "{queued}");
    assert_eq!(queued["session_id"], s.sid.as_str());
    let tid = queued["task_id"].as_str().expect("task_id").to_owned();
    assert_eq!(queued["data"]["task_id"], tid.as_str());
    assert_eq!(queued["data"]["status"], "queued");
    assert!(queued["timestamp"].is_string());
    assert!(queued.get("event_id").is_none(), "replies are not logged");

    let task = fleet.chat.task(&s.sid, &tid).await.expect("task");
    assert_eq!(task.state, "dispatched");
    assert_eq!(task.message, "hello there");
    assert_eq!(task.metadata, json!({"k": 1}));
    // The executor's request went straight to the agent's pool.
    let pool = fleet.keys.exec(fleet::agent::DEFAULT_POOL);
    let reply: Value = fleet
        .client
        .xrange(&pool, "-", "+", None)
        .await
        .expect("xrange");
    let entries = fleet::stream::entry::parse_entries(reply).expect("entries");
    let requests: Vec<_> = entries
        .iter()
        .filter(|e| e.get_str("kind") == Some("exec.request"))
        .collect();
    assert_eq!(requests.len(), 1, "one exec.request on {pool}: {entries:?}");

    // The same idempotency key answers with the same task.
    send_text(
        &mut ws,
        r#"{"message_type":"chat_message","data":{"content":"hello there","idempotency_key":"k1"}}"#,
    )
    .await;
    let again = recv_json(&mut ws).await;
    assert_eq!(again["task_id"], tid.as_str(), "{again}");
    let len: u64 = fleet.client.xlen(&pool).await.expect("xlen");
    assert_eq!(len, 1, "a duplicate sends nothing");

    // A refused submit answers with an error and keeps the connection.
    send_text(
        &mut ws,
        r#"{"message_type":"chat_message","data":{"message":"   "}}"#,
    )
    .await;
    let refused = recv_json(&mut ws).await;
    assert_eq!(refused["message_type"], "error", "{refused}");
    assert_eq!(refused["data"]["error"]["error_type"], "invalid_request");
    ping_pong(&mut ws).await;
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn refused_clients_are_closed_with_4xxx_codes() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let other = fleet.session().await;

    let mut ws = ws_connect(&gw.ws_url(&s.sid)).await;
    assert_eq!(recv_close(&mut ws).await.0, 4001, "missing token");
    let mut ws = ws_connect(&format!("{}?token=nope", gw.ws_url(&s.sid))).await;
    let (code, reason) = recv_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4001, "invalid session token"));
    let mut ws = ws_connect(&format!("{}?token={}", gw.ws_url(&s.sid), other.token)).await;
    assert_eq!(recv_close(&mut ws).await.0, 4001, "another session's token");

    let ghost = "0190f0a1-aaaa-7bbb-8ccc-ddddeeeeffff";
    let token = fleet.chat.tokens.sign(ghost, i64::MAX);
    let mut ws = ws_connect(&format!("{}?token={token}", gw.ws_url(ghost))).await;
    let (code, reason) = recv_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4004, "session not found"));

    let mut ws = ws_connect(&ws_url(&gw, &s, Some("not-an-id"))).await;
    assert_eq!(recv_close(&mut ws).await.0, 4000, "malformed last_event_id");
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn oversized_and_repeatedly_malformed_frames_close_with_4008() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway_with(&["--max-frame-bytes", "1024"]).await;
    let s = fleet.session().await;

    // One malformed frame: an error message, and the connection stays usable.
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    send_text(&mut ws, "{not json").await;
    let err = recv_json(&mut ws).await;
    assert_eq!(err["message_type"], "error", "{err}");
    assert_eq!(err["data"]["error"]["error_type"], "invalid_message");
    ping_pong(&mut ws).await;
    send_text(&mut ws, r#"{"message_type":"dance"}"#).await;
    let err = recv_json(&mut ws).await;
    assert_eq!(err["data"]["error"]["error_type"], "unknown_message_type");
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let err = recv_json(&mut ws).await;
    assert_eq!(err["data"]["error"]["error_type"], "unsupported_frame");
    send_text(&mut ws, r#"{"message_type":"chat_message","data":{}}"#).await;
    let err = recv_json(&mut ws).await;
    assert_eq!(err["data"]["error"]["error_type"], "invalid_request");
    // The fifth closes.
    send_text(&mut ws, "[]").await;
    assert_eq!(
        recv_close(&mut ws).await,
        (4008, "too many malformed messages".to_owned())
    );

    // A frame over the limit closes at once.
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    let big = format!(
        r#"{{"message_type":"chat_message","data":{{"message":"{}"}}}}"#,
        "x".repeat(2000)
    );
    send_text(&mut ws, &big).await;
    assert_eq!(
        recv_close(&mut ws).await,
        (4008, "message too large".to_owned())
    );

    // Far over the limit too (the gateway stops reading at the frame header).
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    let _ = ws.send(Message::text("y".repeat(64 * 1024))).await;
    assert_eq!(recv_close(&mut ws).await.0, 4008);
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_message_under_its_limit_is_taken_however_its_client_escapes_it() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    // 20,000 CJK characters are 60,000 bytes of message, under the 65,536 limit; a client that
    // escapes all but ASCII (Python's json.dumps) writes each as `\u4e2d`, six bytes: the frame
    // is about 120,000 bytes.
    let frame = format!(
        r#"{{"message_type":"chat_message","data":{{"message":"{}"}}}}"#,
        r"\u4e2d".repeat(20_000)
    );
    assert!(frame.len() > 2 * 60_000, "{}", frame.len());
    send_text(&mut ws, &frame).await;
    let queued = recv_json(&mut ws).await;
    assert_eq!(queued["message_type"], "task_queued", "{queued}");
    let tid = queued["task_id"].as_str().expect("task_id");
    let task = fleet
        .chat
        .tasks
        .get(&s.sid, tid)
        .await
        .expect("read the task")
        .expect("the task exists");
    assert_eq!(task.message, "\u{4e2d}".repeat(20_000));
    ping_pong(&mut ws).await;
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn frames_that_break_the_protocol_or_the_size_limit_close_with_a_code() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let fleet = Fleet::new().await;
    let gw = fleet.gateway_with(&["--max-frame-bytes", "1024"]).await;
    let s = fleet.session().await;

    // A text frame that is not UTF-8.
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    let frame = Frame::message(vec![0xFF], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(frame)).await.expect("send");
    assert_eq!(
        recv_close(&mut ws).await,
        (1007, "text is not valid UTF-8".to_owned())
    );

    // Reserved bits set, with no extension that gives them a meaning.
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    let mut frame = Frame::message(
        br#"{"message_type":"ping"}"#.to_vec(),
        OpCode::Data(Data::Text),
        true,
    );
    frame.header_mut().rsv1 = true;
    ws.send(Message::Frame(frame)).await.expect("send");
    assert_eq!(
        recv_close(&mut ws).await,
        (1002, "protocol error".to_owned())
    );

    // A binary frame over the limit closes like a text frame would (it is under the hard cap,
    // so it is read whole).
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    ws.send(Message::binary(vec![0u8; 1025]))
        .await
        .expect("send");
    assert_eq!(
        recv_close(&mut ws).await,
        (4008, "message too large".to_owned())
    );
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_socket_is_closed_with_4001_when_its_token_expires() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let token = fleet.chat.tokens.sign(&s.sid, fleet::time::now_ms() + 2000);
    let mut ws = ws_connect(&format!("{}?token={token}", gw.ws_url(&s.sid))).await;
    // Admitted: the pong comes from the connection's main loop.
    ping_pong(&mut ws).await;
    assert_eq!(
        recv_close(&mut ws).await,
        (4001, "session token expired".to_owned())
    );
    gw.stop().await.expect("clean stop");
}

/// Opens `url` and expects what the gateway answers an SSE client it cannot serve for now: 200,
/// a `retry:` field, a comment with `why`, no event, and the end of the stream.
async fn assert_sse_retry_later(url: &str, why: &str) {
    let res = SseStream::open(url, &[]).await;
    assert_eq!(
        res.status(),
        200,
        "an EventSource stops for good on anything else"
    );
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let body = tokio::time::timeout(WAIT, res.text())
        .await
        .expect("the stream ends")
        .expect("SSE body readable");
    let retry: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("retry:"))
        .unwrap_or_else(|| panic!("a retry field in {body:?}"))
        .trim()
        .parse()
        .expect("retry is a number of ms");
    assert!((1000..=3000).contains(&retry), "retry: {retry}");
    assert!(
        body.lines().any(|l| l.starts_with(':') && l.contains(why)),
        "a comment saying `{why}` in {body:?}"
    );
    assert!(!body.contains("data:"), "no event is dispatched: {body:?}");
}

#[tokio::test]
async fn sse_asks_the_client_to_retry_while_session_storage_is_unavailable() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    // Replaces `key` with a string, so that reading it as a hash or a stream fails (WRONGTYPE).
    let client = &fleet.client;
    let break_key = |key: String| async move {
        let _: () = client.del(&key).await.unwrap();
        let _: () = client.set(&key, "x", None, None, false).await.unwrap();
    };

    // At admission: the session's status cannot be read.
    let s = fleet.session().await;
    break_key(fleet.keys.session(&s.sid)).await;
    let url = format!("{}?token={}", gw.sse_url(&s.sid), s.token);
    assert_sse_retry_later(&url, "session storage unavailable").await;

    // At the start of the delivery: the log cannot be read to check the resume point.
    let s = fleet.session().await;
    break_key(fleet.keys.session_events(&s.sid)).await;
    let url = format!("{}?token={}&last_event_id=1-0", gw.sse_url(&s.sid), s.token);
    assert_sse_retry_later(&url, "session log unavailable").await;

    // Later: the replay cannot read the log.
    let url = format!("{}?token={}", gw.sse_url(&s.sid), s.token);
    assert_sse_retry_later(&url, "session log unavailable").await;

    // Refusals the client cannot fix by retrying stay HTTP errors.
    let res = SseStream::open(&format!("{}?token=nope", gw.sse_url(&s.sid)), &[]).await;
    assert_eq!(res.status(), 401);
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn sse_resumes_from_last_event_id_and_refuses_bad_tokens_with_json() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let a = fleet.chunk(&s.sid, &tid, 1, "a").await;
    let b = fleet.chunk(&s.sid, &tid, 2, "b").await;

    // The Last-Event-ID header (what EventSource sends on reconnect) wins over the query.
    let url = format!("{}?last_event_id=0-0", gw.sse_url(&s.sid));
    let auth = format!("Bearer {}", s.token);
    let res = SseStream::open(
        &url,
        &[
            ("authorization", auth.as_str()),
            ("last-event-id", a.event_id.as_str()),
        ],
    )
    .await;
    let mut sse = SseStream::new(res);
    let first = sse.next().await.expect("event");
    assert_eq!(first.id.as_deref(), Some(b.event_id.as_str()));
    assert_eq!(first.data["data"]["content"], "b");
    let c = fleet.chunk(&s.sid, &tid, 3, "c").await;
    let next = sse.next().await.expect("event");
    assert_eq!(next.id.as_deref(), Some(c.event_id.as_str()));

    // The query parameter works too.
    let res = SseStream::open(
        &format!(
            "{}?token={}&last_event_id={}",
            gw.sse_url(&s.sid),
            s.token,
            b.event_id
        ),
        &[],
    )
    .await;
    let mut sse = SseStream::new(res);
    assert_eq!(
        sse.next().await.expect("event").id.as_deref(),
        Some(c.event_id.as_str())
    );

    let res = SseStream::open(&format!("{}?token=nope", gw.sse_url(&s.sid)), &[]).await;
    assert_eq!(res.status(), 401);
    let body: Json = res.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "unauthorized");
    assert!(body["error"]["message"].is_string());

    let ghost = "0190f0a1-aaaa-7bbb-8ccc-ddddeeeeffff";
    let token = fleet.chat.tokens.sign(ghost, i64::MAX);
    let res = SseStream::open(&format!("{}?token={token}", gw.sse_url(ghost)), &[]).await;
    assert_eq!(res.status(), 404);
    let body: Json = res.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "not_found");

    let res = SseStream::open(
        &format!("{}?token={}&last_event_id=x", gw.sse_url(&s.sid), s.token),
        &[],
    )
    .await;
    assert_eq!(res.status(), 400);
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn sse_refuses_a_malformed_query_string_or_last_event_id_header_saying_which() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let a = fleet.chunk(&s.sid, &tid, 1, "a").await;

    // A query string that does not parse (a token given twice) is named as the fault, not
    // `last_event_id`, which it does not hold.
    let res = SseStream::open(
        &format!("{}?token={t}&token={t}", gw.sse_url(&s.sid), t = s.token),
        &[],
    )
    .await;
    assert_eq!(res.status(), 400);
    let body: Json = res.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("query string"), "{body}");
    assert!(message.contains("token"), "names the field: {body}");
    assert!(!message.contains("last_event_id"), "{body}");

    // A Last-Event-ID header that is not text is refused, not taken for none: the client has
    // events, and would get the whole log again.
    let res = tokio::time::timeout(
        WAIT,
        reqwest::Client::new()
            .get(gw.sse_url(&s.sid))
            .bearer_auth(&s.token)
            .header(
                "last-event-id",
                reqwest::header::HeaderValue::from_bytes(
                    format!("{}\u{ff}", a.event_id).as_bytes(),
                )
                .expect("header"),
            )
            .send(),
    )
    .await
    .expect("in time")
    .expect("response");
    assert_eq!(res.status(), 400);
    let body: Json = res.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains(&a.event_id),
        "{body}"
    );
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_resume_point_after_the_newest_event_misses_nothing_logged_later() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    fleet.chunk(&s.sid, &tid, 1, "old").await;

    // An id after anything the session logged (made up, or kept from before a failover that
    // lost the newest events): nothing old is sent, and every event logged from now on is.
    let ahead = "99999999999999-0";
    let mut ws = ws_connect(&ws_url(&gw, &s, Some(ahead))).await;
    ping_pong(&mut ws).await;
    let auth = format!("Bearer {}", s.token);
    let mut sse = SseStream::new(
        SseStream::open(
            &gw.sse_url(&s.sid),
            &[("authorization", auth.as_str()), ("last-event-id", ahead)],
        )
        .await,
    );
    let next = fleet.chunk(&s.sid, &tid, 2, "new").await;
    let got = recv_json(&mut ws).await;
    assert_eq!(got["event_id"], next.event_id.as_str(), "{got}");
    assert_chunk(&got, "new");
    let ev = sse.next().await.expect("an SSE event");
    assert_eq!(ev.id.as_deref(), Some(next.event_id.as_str()));
    ping_pong(&mut ws).await;
    drop(ws);
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn trimmed_events_are_reported_as_lost_before_what_is_left() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let mut ids = Vec::new();
    for seq in 1..=5 {
        ids.push(
            fleet
                .chunk(&s.sid, &tid, seq, &seq.to_string())
                .await
                .event_id,
        );
    }
    let _: u64 = fleet
        .client
        .xtrim(fleet.keys.session_events(&s.sid), ("MAXLEN", "=", 2_i64))
        .await
        .expect("trim");

    let mut ws = ws_connect(&ws_url(&gw, &s, Some(&ids[0]))).await;
    let lost = recv_json(&mut ws).await;
    assert_eq!(lost["message_type"], "error", "{lost}");
    assert_eq!(lost["data"]["error"]["error_type"], "events_lost");
    assert!(
        lost["data"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&ids[3]),
        "{lost}"
    );
    let rest = recv_n(&mut ws, 2).await;
    assert_eq!(event_ids(&rest), ids[3..].to_vec());
    ping_pong(&mut ws).await;

    // A client that has everything left hears nothing about losses.
    let mut ws = ws_connect(&ws_url(&gw, &s, Some(&ids[4]))).await;
    ping_pong(&mut ws).await;
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn presence_follows_the_websocket() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    assert!(!fleet.chat.status(&s.sid).await.unwrap().websocket_connected);

    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    // The pong comes from the connection's main loop, which starts after presence is recorded.
    ping_pong(&mut ws).await;
    let status = fleet.chat.status(&s.sid).await.unwrap();
    assert!(status.websocket_connected);
    assert_eq!(status.websocket_connections, 1);

    ws.close(None).await.expect("client close");
    fleet_test_support::eventually(WAIT, "presence cleared after the close", || async {
        let st = fleet.chat.status(&s.sid).await.unwrap();
        (!st.websocket_connected && st.websocket_connections == 0).then_some(())
    })
    .await;
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_failed_presence_report_is_put_right_by_the_next_refresh() {
    use std::sync::Arc;
    use ws_gateway::presence::Presence;
    use ws_gateway::registry::{Registry, Transport};

    let fleet = Fleet::new().await;
    let s = fleet.session().await;
    let registry = Arc::new(Registry::default());
    let presence = Presence::new(fleet.chat.clone(), registry.clone());
    let connections = || async {
        let st = fleet.chat.status(&s.sid).await.unwrap();
        (st.websocket_connected, st.websocket_connections)
    };

    let socket = registry.subscribe(&s.sid, Transport::WebSocket);
    presence.report(&s.sid).await;
    assert_eq!(connections().await, (true, 1));

    // The socket ends while its session's key cannot take the report (a WRONGTYPE error from
    // Redis), so the session still shows the socket afterwards.
    let key = fleet.keys.session(&s.sid);
    let hash: std::collections::HashMap<String, String> = fleet.client.hgetall(&key).await.unwrap();
    let _: () = fleet.client.del(&key).await.unwrap();
    let _: () = fleet
        .client
        .set(&key, "x", None, None, false)
        .await
        .unwrap();
    drop(socket);
    presence.report(&s.sid).await;
    assert_eq!(presence.unsent_sessions(), 1);
    let _: () = fleet.client.del(&key).await.unwrap();
    let _: () = fleet.client.hset(&key, hash).await.unwrap();
    assert_eq!(connections().await, (true, 1));

    // The next refresh reports the session again, from what the registry holds now.
    presence.refresh().await;
    assert_eq!(presence.unsent_sessions(), 0);
    assert_eq!(connections().await, (false, 0));
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001_ends_sse_and_returns_ok() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    ping_pong(&mut ws).await;
    let mut sse = SseStream::new(
        SseStream::open(&format!("{}?token={}", gw.sse_url(&s.sid), s.token), &[]).await,
    );

    gw.shutdown.cancel();
    assert_eq!(recv_close(&mut ws).await, (1001, "going away".to_owned()));
    assert!(sse.next().await.is_none(), "the SSE stream ends");
    let run = tokio::time::timeout(WAIT, gw.run)
        .await
        .expect("run returns")
        .expect("no panic");
    assert!(run.is_ok(), "{run:?}");
    // Presence was taken back on the way out.
    let st = fleet.chat.status(&s.sid).await.unwrap();
    assert_eq!(st.websocket_connections, 0);
}

#[tokio::test]
async fn admin_port_serves_health_and_metrics() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let health: Json = reqwest::get(format!("http://{}/health", gw.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["service"], "ws-gateway");
    let s = fleet.session().await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    ping_pong(&mut ws).await;
    let metrics = gw.metrics().await;
    for name in [
        "fleet_ws_connections",
        "fleet_ws_messages_sent_total",
        "fleet_ws_messages_received_total",
    ] {
        assert!(metrics.contains(name), "{name} in\n{metrics}");
    }
    let res = reqwest::get(format!("http://{}/nope", gw.http))
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_client_resumes_on_another_gateway_after_a_restart() {
    let fleet = Fleet::new().await;
    let s = fleet.session().await;
    let tid = fleet.submit(&s.sid, "hi").await;
    let first = fleet.gateway().await;
    let mut ws = ws_connect(&ws_url(&first, &s, None)).await;
    fleet.chunk(&s.sid, &tid, 1, "a").await;
    let a = recv_json(&mut ws).await;
    first.shutdown.cancel();
    assert_eq!(recv_close(&mut ws).await.0, 1001);
    drop(ws);
    first.run.await.unwrap().expect("clean stop");

    // Written while no gateway runs: only the log has them once the next one starts.
    let b = fleet.chunk(&s.sid, &tid, 2, "b").await;
    let second = fleet.gateway().await;
    let mut ws = ws_connect(&ws_url(&second, &s, a["event_id"].as_str())).await;
    let c = fleet
        .emit(&s.sid, &[result(&s.sid, &tid, 3, "abc")], true)
        .await
        .remove(0);
    let got = recv_n(&mut ws, 2).await;
    assert_eq!(event_ids(&got), vec![b.event_id, c.event_id]);
    ping_pong(&mut ws).await;
    second.stop().await.expect("clean stop");
}

/// The status, `error.code` and `error.message` of a JSON error answer.
async fn json_error(res: reqwest::Response) -> (u16, String, String) {
    let status = res.status().as_u16();
    let ctype = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ctype.starts_with("application/json"), "{status} {ctype}");
    let body: Json = res.json().await.expect("JSON error");
    let code = body["error"]["code"].as_str().expect("code").to_owned();
    let message = body["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    assert!(!message.is_empty(), "{body}");
    (status, code, message)
}

#[tokio::test]
async fn requests_that_are_no_handshake_or_use_another_method_get_json_errors() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let http = reqwest::Client::new();
    let send = |req: reqwest::RequestBuilder| async move {
        tokio::time::timeout(WAIT, req.send())
            .await
            .expect("an answer in time")
            .expect("an answer")
    };

    // A plain GET of the WebSocket route: no handshake.
    let url = format!("{}?token={}", gw.sse_url(&s.sid), s.token).replace("/sse/", "/ws/");
    let (status, code, message) = json_error(send(http.get(&url)).await).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    assert!(message.contains("WebSocket handshake"), "{message}");
    // A handshake of another version.
    let res = send(
        http.get(&url)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "8"),
    )
    .await;
    let (status, code, message) = json_error(res).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    assert!(message.contains("Sec-WebSocket-Version"), "{message}");

    // Another method than GET, on either route: 405 with Allow.
    for path in [
        format!("/ws/chat/{}", s.sid),
        format!("/sse/chat/{}", s.sid),
    ] {
        let res = send(
            http.post(format!("http://{}{path}", gw.http))
                .bearer_auth(&s.token),
        )
        .await;
        let allow = res.headers()["allow"].to_str().unwrap().to_owned();
        assert!(allow.contains("GET"), "{allow}");
        let (status, code, _) = json_error(res).await;
        assert_eq!(
            (status, code.as_str()),
            (405, "method_not_allowed"),
            "{path}"
        );
    }

    // A session id whose percent-encoding is not UTF-8: 400 over SSE, 4000 over WebSocket.
    let res = send(http.get(gw.sse_url("%FF")).bearer_auth(&s.token)).await;
    let (status, code, message) = json_error(res).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    assert!(message.contains("session id"), "{message}");
    let mut ws = ws_connect(&format!("{}?token={}", gw.ws_url("%FF"), s.token)).await;
    assert_eq!(
        recv_close(&mut ws).await,
        (4000, "malformed session id".to_owned())
    );
    gw.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_client_closing_with_chat_messages_in_flight_gets_its_close_answered_and_loses_none() {
    let fleet = Fleet::new().await;
    let gw = fleet.gateway().await;
    let s = fleet.session().await;
    let mut ws = ws_connect(&ws_url(&gw, &s, None)).await;
    // Chat messages and the close in one write: the close is read while they are submitted.
    for i in 0..5 {
        let msg = json!({"message_type": "chat_message", "data": {"message": format!("m{i}")}});
        ws.feed(Message::text(msg.to_string())).await.expect("feed");
    }
    ws.feed(Message::Close(Some(
        tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: 1000.into(),
            reason: "bye".into(),
        },
    )))
    .await
    .expect("feed close");
    ws.flush().await.expect("flush");
    // The close is answered (not the TCP connection dropped, 1006 for the client), repeating
    // its code, and no reply comes after it.
    assert_eq!(recv_close(&mut ws).await, (1000, "bye".to_owned()));
    // Answered once every message was taken.
    let status = fleet.chat.status(&s.sid).await.expect("status");
    assert_eq!(status.totals.tasks, 5, "{status:?}");
    gw.stop().await.expect("clean stop");
}
