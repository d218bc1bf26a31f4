//! dispatcher -> exec-worker -> callback-worker, in-process, on a real redis-server.

use std::time::Duration;

use fleet::session_log::FanoutEntry;
use fleet::stream::entry::parse_read;
use fleet_e2e::{AGENT, Fleet, Options};
use fred::prelude::*;

#[tokio::test]
async fn a_submitted_message_streams_back_and_completes() {
    let fleet = Fleet::start(Options {
        front_doors: false,
        ..Default::default()
    })
    .await;
    let sid = fleet.open_session(AGENT).await.session_id;
    let tid = fleet.submit(&sid, "hello from the fleet").await;

    let events = fleet.task_events(&sid, &tid, Duration::from_secs(10)).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.message_type.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "chat_streaming",
            "chat_streaming",
            "chat_streaming",
            "chat_streaming",
            "chat_response"
        ]
    );
    let streamed: String = events[..4]
        .iter()
        .map(|e| e.data["content"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, "hello from the fleet");
    let indexes: Vec<u64> = events[..4]
        .iter()
        .map(|e| e.data["chunk_index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 2, 3]);
    assert_eq!(events[4].data["content"], "hello from the fleet");

    let task = fleet.chat.task(&sid, &tid).await.unwrap();
    assert_eq!(task.state, "completed");
    assert_eq!(task.result.as_deref(), Some("hello from the fleet"));
    assert!(
        task.dispatched_ms.is_some() && task.started_ms.is_some() && task.finished_ms.is_some()
    );
    let status = fleet.chat.status(&sid).await.unwrap();
    assert_eq!(status.totals.completed, 1);
    fleet.stop().await;
}

#[tokio::test]
async fn a_task_whose_agent_was_deleted_fails_with_agent_not_found() {
    let fleet = Fleet::start(Options {
        front_doors: false,
        ..Default::default()
    })
    .await;
    let sid = fleet.open_session(AGENT).await.session_id;
    assert!(fleet.chat.agents.delete(AGENT).await.unwrap());
    let tid = fleet.submit(&sid, "anyone there?").await;

    let events = fleet.task_events(&sid, &tid, Duration::from_secs(10)).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.message_type.as_str()).collect();
    assert_eq!(kinds, ["chat_error"], "{events:?}");
    let error = &events[0].data["error"];
    assert_eq!(error["error_type"], "agent_not_found");
    assert!(
        error["message"].as_str().unwrap().contains(AGENT),
        "{error}"
    );
    let task = fleet.chat.task(&sid, &tid).await.unwrap();
    assert_eq!(task.state, "failed");
    assert!(task.dispatched_ms.is_none(), "never sent to an executor");
    let status = fleet.chat.status(&sid).await.unwrap();
    assert_eq!(status.totals.failed, 1);
    fleet.stop().await;
}

#[tokio::test]
async fn cancel_during_streaming_ends_the_task_and_no_chunk_follows() {
    let fleet = Fleet::start(Options {
        echo_delay_ms: 100,
        front_doors: false,
        ..Default::default()
    })
    .await;
    let sid = fleet.open_session(AGENT).await.session_id;
    let long: String = (0..200).map(|i| format!("w{i} ")).collect();
    let tid = fleet.submit(&sid, &long).await;

    // Wait until it streams, then cancel.
    fleet_test_support::eventually(Duration::from_secs(10), "the first chunk", || async {
        let t = fleet.chat.task(&sid, &tid).await.unwrap();
        (t.chunks > 0).then_some(())
    })
    .await;
    fleet
        .chat
        .cancel(&sid, &tid, "user pressed stop")
        .await
        .unwrap();

    let events = fleet.task_events(&sid, &tid, Duration::from_secs(10)).await;
    let last = events.last().unwrap();
    assert_eq!(last.message_type, "chat_error");
    assert_eq!(last.data["error"]["error_type"], "cancelled");
    assert!(events.len() < 200, "the executor stopped streaming");
    let task = fleet.chat.task(&sid, &tid).await.unwrap();
    assert_eq!(task.state, "cancelled");
    let chunks_at_cancel = task.chunks;

    // The executor stops: a new task on the same executor completes promptly, and the
    // cancelled task never gains a chunk.
    let next = fleet.submit(&sid, "still alive").await;
    let events = fleet
        .task_events(&sid, &next, Duration::from_secs(10))
        .await;
    assert_eq!(events.last().unwrap().message_type, "chat_response");
    assert_eq!(
        fleet.chat.task(&sid, &tid).await.unwrap().chunks,
        chunks_at_cancel
    );
    let log = fleet
        .log
        .replay_after(&sid, None, None, 10_000)
        .await
        .unwrap();
    let after_cancel = log
        .iter()
        .skip_while(|e| !e.json.contains("\"chat_error\""))
        .filter(|e| e.task_id == tid)
        .count();
    assert_eq!(
        after_cancel, 1,
        "nothing of the cancelled task was logged after its chat_error"
    );
    fleet.stop().await;
}

#[tokio::test]
async fn a_task_past_its_deadline_times_out() {
    let fleet = Fleet::start(Options {
        echo_delay_ms: 200,
        front_doors: false,
        ..Default::default()
    })
    .await;
    let mut agent = fleet_e2e::echo_agent();
    agent.id = "slow".into();
    agent.timeout_secs = Some(1);
    fleet.chat.agents.put(&agent).await.unwrap();
    let sid = fleet.open_session("slow").await.session_id;
    let long: String = (0..50).map(|i| format!("w{i} ")).collect();
    let tid = fleet.submit(&sid, &long).await;

    let events = fleet.task_events(&sid, &tid, Duration::from_secs(10)).await;
    let last = events.last().unwrap();
    assert_eq!(last.message_type, "chat_error");
    assert_eq!(last.data["error"]["error_type"], "timed_out");
    assert_eq!(
        fleet.chat.task(&sid, &tid).await.unwrap().state,
        "timed_out"
    );
    fleet.stop().await;
}

#[tokio::test]
async fn closing_a_session_cancels_its_open_tasks() {
    let fleet = Fleet::start(Options {
        echo_delay_ms: 100,
        front_doors: false,
        ..Default::default()
    })
    .await;
    let sid = fleet.open_session(AGENT).await.session_id;
    let long: String = (0..100).map(|i| format!("w{i} ")).collect();
    let tid = fleet.submit(&sid, &long).await;
    fleet.chat.close(&sid, "done").await.unwrap();

    let events = fleet.task_events(&sid, &tid, Duration::from_secs(10)).await;
    assert_eq!(
        events.last().unwrap().data["error"]["error_type"],
        "cancelled"
    );
    let status =
        fleet_test_support::eventually(Duration::from_secs(5), "the session closed", || async {
            let s = fleet.chat.status(&sid).await.unwrap();
            (s.state == "closed").then_some(s)
        })
        .await;
    assert_eq!(status.totals.cancelled, 1);
    let log = fleet
        .log
        .replay_after(&sid, None, None, 1000)
        .await
        .unwrap();
    assert!(log.last().unwrap().json.contains("session_closed"));
    fleet.stop().await;
}

#[tokio::test]
async fn the_command_executor_streams_stdout_and_reports_failures() {
    // A fleet whose executor runs a program instead of echoing.
    let redis = fleet_test_support::redis();
    let fleet = Fleet::start(Options {
        front_doors: false,
        ..Default::default()
    })
    .await;
    let mut agent = fleet_e2e::echo_agent();
    agent.id = "shell".into();
    agent.pool = "shell".into();
    fleet.chat.agents.put(&agent).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let script = r#"read -r task; case "$task" in *fail*) echo "bad input" >&2; exit 3;; esac; echo "line one"; echo "line two""#;
    let cfg: exec_worker::Config = clap::Parser::try_parse_from(
        ["exec-worker".to_owned()]
            .into_iter()
            .chain(fleet_e2e::common_args(&redis, &fleet.prefix))
            .chain(["--mode", "command", "--pool", "shell", "--command", script].map(String::from)),
    )
    .unwrap();
    let app = exec_worker::App::build(cfg).await.unwrap();
    let shell = tokio::spawn(app.run(stop.clone()));

    let sid = fleet.open_session("shell").await.session_id;
    let ok = fleet.submit(&sid, "go").await;
    let events = fleet.task_events(&sid, &ok, Duration::from_secs(10)).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.message_type.as_str()).collect();
    assert_eq!(kinds, ["chat_streaming", "chat_streaming", "chat_response"]);
    assert_eq!(events[2].data["content"], "line one\nline two\n");

    let bad = fleet.submit(&sid, "please fail").await;
    let events = fleet.task_events(&sid, &bad, Duration::from_secs(10)).await;
    let err = &events.last().unwrap().data["error"];
    assert_eq!(err["error_type"], "exit_status");
    assert_eq!(err["details"]["exit_code"], 3);
    assert_eq!(err["details"]["stderr_tail"], "bad input\n");
    assert_eq!(fleet.chat.task(&sid, &bad).await.unwrap().state, "failed");

    stop.cancel();
    shell.await.unwrap().unwrap();
    fleet.stop().await;
}

/// The callback-worker handles batches concurrently, and one session's callbacks may sit in
/// several of them; still, the session's fan-out entries reach the stream in the order their
/// events were logged, so a gateway can hand each one out without reading the log to fill a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_fan_out_follows_its_log_order_under_load() {
    const TASKS: usize = 3000;
    let fleet = Fleet::start(Options {
        front_doors: false,
        ..Default::default()
    })
    .await;
    let sid = fleet.open_session(AGENT).await.session_id;
    let tids = futures::future::join_all(
        (0..TASKS).map(|i| fleet.submit(&sid, if i % 2 == 0 { "even" } else { "odd" })),
    )
    .await;
    assert_eq!(tids.len(), TASKS);
    // Follow the session's fan-out shard until it has carried every task's result.
    let reader = fleet.client.clone_new();
    reader.init().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut fanned, mut after) = (Vec::<FanoutEntry>::new(), "0".to_owned());
    let results = |f: &[FanoutEntry]| {
        f.iter()
            .filter(|e| {
                e.json
                    .as_ref()
                    .is_some_and(|j| j.contains("\"chat_response\""))
            })
            .count()
    };
    while results(&fanned) < TASKS {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            !left.is_zero(),
            "{} of {TASKS} results fanned out within 60 s",
            results(&fanned)
        );
        let reply: fred::types::Value = reader
            .xread(
                Some(1_000),
                Some(left.as_millis().min(1_000) as u64),
                fleet.log.fanout_key(&sid),
                after.as_str(),
            )
            .await
            .unwrap();
        for entry in parse_read(reply).unwrap().into_iter().flat_map(|(_, e)| e) {
            after = entry.id.to_string();
            fanned.extend(
                FanoutEntry::parse_all(&entry)
                    .into_iter()
                    .filter(|e| e.session_id == sid),
            );
        }
    }
    let logged = fleet
        .log
        .replay_after(&sid, None, None, 10 * TASKS as u64)
        .await
        .unwrap();
    assert_eq!(logged.len(), 2 * TASKS, "a chunk and a result per task");
    let out_of_order: Vec<String> = fanned
        .windows(2)
        .filter(|w| w[1].prev != Some(w[0].event_id))
        .map(|w| format!("{} after {}", w[1].event_id, w[0].event_id))
        .collect();
    assert!(
        out_of_order.is_empty(),
        "{} of {} fan-out events do not follow the one before them: {:?}",
        out_of_order.len(),
        fanned.len(),
        &out_of_order[..out_of_order.len().min(5)]
    );
    let fanned_ids: Vec<_> = fanned.iter().map(|e| e.event_id).collect();
    let logged_ids: Vec<_> = logged.iter().map(|e| e.event_id).collect();
    assert_eq!(
        fanned_ids, logged_ids,
        "every logged event is fanned out once"
    );
    fleet.stop().await;
}
