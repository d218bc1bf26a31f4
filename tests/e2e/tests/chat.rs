//! The whole chat path through real front doors: REST init, messages over WebSocket and REST,
//! answers streamed back over WebSocket and SSE, reconnect with `last_event_id`, cancel.

use std::time::Duration;

use fleet::envelope::{Envelope, TaskCommand};
use fleet::events::ServerMessage;
use fleet::stream::entry::parse_entries;
use fleet_e2e::{AGENT, Fleet, Options, RestSession, WsClient, is_final_of};
use fred::prelude::{StreamsInterface, Value};
use futures::StreamExt;
use serde_json::Value as Json;

const WAIT: Duration = Duration::from_secs(15);

/// Opens a session over REST and connects a WebSocket client to it.
async fn open(fleet: &Fleet) -> (RestSession, WsClient) {
    let s = RestSession::open(&fleet.api(), AGENT).await;
    assert_eq!(s.status, 201);
    // The URL edge-api hands out is the gateway's, with the token: usable as is.
    assert_eq!(
        s.init["websocket_url"].as_str().unwrap(),
        s.ws_url(&fleet.ws(), None)
    );
    let ws = s.connect(&fleet.ws()).await;
    (s, ws)
}

async fn task_over_rest(fleet: &Fleet, s: &RestSession, tid: &str) -> Json {
    reqwest::Client::new()
        .get(format!("{}/api/v1/chat/{}/tasks/{tid}", fleet.api(), s.id))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Reads an SSE stream until `done` has seen what it wants; returns `(id, message)` pairs.
async fn read_sse(
    fleet: &Fleet,
    s: &RestSession,
    mut done: impl FnMut(&[ServerMessage]) -> bool,
) -> Vec<(String, ServerMessage)> {
    let res = reqwest::Client::new()
        .get(format!("{}/sse/chat/{}", fleet.sse(), s.id))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.bytes_stream();
    let mut buf = String::new();
    let mut out: Vec<(String, ServerMessage)> = Vec::new();
    loop {
        let chunk = tokio::time::timeout(WAIT, body.next())
            .await
            .expect("SSE event in time")
            .expect("SSE stream open")
            .unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let id = frame
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .map(str::to_owned);
            let data = frame.lines().find_map(|l| l.strip_prefix("data: "));
            if let (Some(id), Some(data)) = (id, data) {
                out.push((id, serde_json::from_str(data).unwrap()));
            }
        }
        let msgs: Vec<ServerMessage> = out.iter().map(|(_, m)| m.clone()).collect();
        if done(&msgs) {
            return out;
        }
    }
}

fn streamed_text(events: &[ServerMessage], tid: &str) -> String {
    events
        .iter()
        .filter(|m| m.task_id.as_deref() == Some(tid) && m.message_type == "chat_streaming")
        .map(|m| m.data["content"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_ws_and_rest_stream_back_on_ws_and_sse() {
    let fleet = Fleet::start(Options {
        echo_delay_ms: 5,
        ..Default::default()
    })
    .await;
    let (s, mut ws) = open(&fleet).await;

    let over_ws = "sent over the websocket";
    ws.send_chat(over_ws).await;
    let queued = ws.next(WAIT).await;
    assert_eq!(queued.message_type, "task_queued");
    let t1 = queued.data["task_id"].as_str().unwrap().to_owned();
    let over_rest = "sent over rest";
    let t2 = s.submit(&fleet.api(), over_rest).await;

    let mut finals = 0;
    let events = ws
        .until(WAIT, |m| {
            if is_final_of(m, &t1) || is_final_of(m, &t2) {
                finals += 1;
            }
            finals == 2
        })
        .await;
    for (tid, text) in [(&t1, over_ws), (&t2, over_rest)] {
        assert_eq!(streamed_text(&events, tid), text);
        let last = events
            .iter()
            .rfind(|m| m.task_id.as_deref() == Some(tid))
            .unwrap();
        assert_eq!(last.message_type, "chat_response");
        assert_eq!(last.data["content"], text);
        let task = task_over_rest(&fleet, &s, tid).await;
        assert_eq!(task["state"], "completed");
        assert_eq!(task["result"], text);
    }
    fleet_e2e::assert_clean_delivery(&events, &[t1.clone(), t2.clone()]);

    // SSE replays the same history with the same event ids.
    let sse = read_sse(&fleet, &s, |m| {
        m.iter()
            .filter(|m| is_final_of(m, &t1) || is_final_of(m, &t2))
            .count()
            == 2
    })
    .await;
    let ws_ids: Vec<&str> = events
        .iter()
        .filter_map(|m| m.event_id.as_deref())
        .collect();
    let sse_ids: Vec<&str> = sse.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(sse_ids, ws_ids);
    for (id, m) in &sse {
        assert_eq!(m.event_id.as_deref(), Some(id.as_str()));
    }
    ws.close().await;
    fleet.stop().await;
}

/// Submits one task over WebSocket and one over REST and waits for both answers; returns their
/// ids.
async fn two_tasks_answered(fleet: &Fleet) -> (RestSession, [String; 2]) {
    let (s, mut ws) = open(fleet).await;
    ws.send_chat("over the websocket").await;
    let queued = ws.next(WAIT).await;
    assert_eq!(queued.message_type, "task_queued");
    let t1 = queued.data["task_id"].as_str().unwrap().to_owned();
    let t2 = s.submit(&fleet.api(), "over rest").await;
    let mut finals = 0;
    let events = ws
        .until(WAIT, |m| {
            finals += usize::from(is_final_of(m, &t1) || is_final_of(m, &t2));
            finals == 2
        })
        .await;
    fleet_e2e::assert_clean_delivery(&events, &[t1.clone(), t2.clone()]);
    for (tid, text) in [(&t1, "over the websocket"), (&t2, "over rest")] {
        let task = task_over_rest(fleet, &s, tid).await;
        assert_eq!(
            (task["state"].as_str(), task["result"].as_str()),
            (Some("completed"), Some(text))
        );
        assert_eq!(task["pool"], "default");
    }
    ws.close().await;
    (s, [t1, t2])
}

/// The ids of the tasks `task.submit` entries on `fleet:tasks` carry.
async fn submitted_to_dispatchers(fleet: &Fleet) -> Vec<String> {
    let raw: Value = fleet
        .client
        .xrange(fleet.keys.tasks(), "-", "+", None)
        .await
        .unwrap();
    parse_entries(raw)
        .unwrap()
        .iter()
        .filter_map(
            |e| match Envelope::<TaskCommand>::from_fields(&e.fields).unwrap().msg {
                TaskCommand::Submit(t) => Some(t.task_id),
                _ => None,
            },
        )
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_tasks_go_from_the_front_doors_straight_to_their_pool() {
    let fleet = Fleet::start(Options::default()).await;
    two_tasks_answered(&fleet).await;
    assert_eq!(submitted_to_dispatchers(&fleet).await, Vec::<String>::new());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_direct_dispatch_off_chat_tasks_go_through_the_dispatchers() {
    let fleet = Fleet::start(Options {
        direct_dispatch: false,
        ..Default::default()
    })
    .await;
    let (_, tids) = two_tasks_answered(&fleet).await;
    assert_eq!(submitted_to_dispatchers(&fleet).await, tids.to_vec());
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_with_its_last_event_id_gets_exactly_what_it_missed() {
    let fleet = Fleet::start(Options {
        echo_delay_ms: 20,
        ..Default::default()
    })
    .await;
    let (s, mut ws) = open(&fleet).await;
    let message: String = (0..30).map(|i| format!("w{i} ")).collect();
    ws.send_chat(&message).await;
    let tid = ws.next(WAIT).await.data["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut chunks = 0;
    let before = ws
        .until(WAIT, |m| {
            chunks += (m.message_type == "chat_streaming") as usize;
            chunks == 5
        })
        .await;
    let last_seen = before.last().unwrap().event_id.clone().unwrap();
    ws.close().await;

    // The answer finishes while the client is away.
    fleet.task_events(&s.id, &tid, WAIT).await;

    let mut again = WsClient::connect(&s.ws_url(&fleet.ws(), Some(&last_seen))).await;
    let after = again.until(WAIT, |m| is_final_of(m, &tid)).await;
    let indexes: Vec<u64> = after
        .iter()
        .filter(|m| m.message_type == "chat_streaming")
        .map(|m| m.data["chunk_index"].as_u64().unwrap())
        .collect();
    assert_eq!(
        indexes,
        (5..30).collect::<Vec<u64>>(),
        "exactly the missed chunks, in order"
    );
    assert_eq!(after.last().unwrap().message_type, "chat_response");
    let all: Vec<ServerMessage> = before.into_iter().chain(after).collect();
    assert_eq!(streamed_text(&all, &tid), message);
    fleet_e2e::assert_clean_delivery(&all, &[tid]);
    again.close().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_over_rest_during_streaming_stops_the_answer_at_the_client() {
    let fleet = Fleet::start(Options {
        echo_delay_ms: 50,
        ..Default::default()
    })
    .await;
    let (s, mut ws) = open(&fleet).await;
    let long: String = (0..200).map(|i| format!("w{i} ")).collect();
    ws.send_chat(&long).await;
    let tid = ws.next(WAIT).await.data["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    ws.until(WAIT, |m| m.message_type == "chat_streaming").await;

    let res = reqwest::Client::new()
        .delete(format!("{}/api/v1/chat/{}/tasks/{tid}", fleet.api(), s.id))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let end = ws.until(WAIT, |m| is_final_of(m, &tid)).await;
    let last = end.last().unwrap();
    assert_eq!(last.message_type, "chat_error");
    assert_eq!(last.data["error"]["error_type"], "cancelled");

    // Nothing of the cancelled task reaches the client afterwards: the next task's whole answer
    // arrives and no chunk of the cancelled one is interleaved.
    ws.send_chat("after the cancel").await;
    let next_tid = ws.next(WAIT).await.data["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let later = ws.until(WAIT, |m| is_final_of(m, &next_tid)).await;
    assert!(
        later
            .iter()
            .all(|m| m.task_id.as_deref() != Some(tid.as_str())),
        "{later:?}"
    );
    assert_eq!(task_over_rest(&fleet, &s, &tid).await["state"], "cancelled");
    ws.close().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_task_queued_comes_before_the_events_of_its_task() {
    // Messages sent in bursts are submitted concurrently and answered in order; a task that
    // runs while an earlier message's answer is still owed must not show its events first.
    let fleet = Fleet::start(Options::default()).await;
    let (_, mut ws) = open(&fleet).await;
    let (rounds, burst) = (4, 32);
    for _ in 0..rounds {
        for i in 0..burst {
            ws.send_chat(&format!("m{i}")).await;
        }
    }
    let mut queued = std::collections::HashSet::new();
    let mut finals = 0;
    while finals < rounds * burst {
        let m = ws.next(WAIT).await;
        let Some(tid) = m.task_id.clone() else {
            continue;
        };
        if m.message_type == "task_queued" {
            assert!(queued.insert(tid), "one task_queued per task");
            continue;
        }
        assert!(
            queued.contains(&tid),
            "{} of task {tid} came before its task_queued",
            m.message_type
        );
        finals += is_final_of(&m, &tid) as usize;
    }
    assert_eq!(queued.len(), rounds * burst);
    ws.close().await;
    fleet.stop().await;
}
