//! A chat task whose executor is killed mid-answer runs again on another executor. The program
//! answers differently each run, so the client hears `task_restarted` and then the second run's
//! answer whole: never the first run's chunks spliced with the second's.

use std::time::Duration;

use fleet::task::TaskState;
use fleet_e2e::{AGENT, Fleet, Options, spawn_binary};
use fleet_test_support::eventually;

/// Each line is a chunk. The first run (the one to create `<dir>/ran`) prints a line and then
/// waits long enough to be killed for certain; any later run answers at once, and differently.
fn program(dir: &std::path::Path) -> String {
    format!(
        r#"cat > /dev/null
if mkdir "{}/ran" 2>/dev/null; then
  echo "run one, line one"; sleep 30; echo "run one, line two"
else
  echo "run two, line one"; echo "run two, line two"
fi"#,
        dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_run_again_by_another_executor_streams_the_new_answer_whole() {
    let fleet = Fleet::start(Options {
        workers: false,
        ..Default::default()
    })
    .await;
    let (redis, prefix) = (fleet.redis_url.clone(), fleet.prefix.clone());
    let dir = std::env::temp_dir().join(format!("fleet-rerun-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let program = program(&dir);
    let executor_args = [
        "--mode",
        "command",
        "--command",
        &program,
        "--claim-idle-ms",
        "500",
        "--block-ms",
        "100",
    ];
    let mut callbacks = spawn_binary("callback-worker", &redis, &prefix, &["--block-ms", "100"]);
    let mut first = spawn_binary("exec-worker", &redis, &prefix, &executor_args);

    let (s, mut client) = fleet.watched_session(AGENT).await;
    let tid = fleet.submit(&s.session_id, "hello").await;

    // The first run streams its first line; its executor dies before the second.
    loop {
        let m = client.next(Duration::from_secs(20)).await;
        if m.message_type == "chat_streaming" {
            break;
        }
    }
    first.kill();
    let mut second = spawn_binary("exec-worker", &redis, &prefix, &executor_args);

    loop {
        let m = client.next(Duration::from_secs(30)).await;
        if m.message_type == "chat_response" || m.message_type == "chat_error" {
            break;
        }
    }
    let task_events: Vec<_> = client
        .received
        .iter()
        .filter(|m| m.task_id.as_deref() == Some(tid.as_str()) && m.event_id.is_some())
        .collect();
    let kinds: Vec<&str> = task_events
        .iter()
        .map(|m| m.message_type.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "chat_streaming",
            "task_restarted",
            "chat_streaming",
            "chat_streaming",
            "chat_response"
        ],
        "{task_events:#?}"
    );
    let text = |i: usize| task_events[i].data["content"].as_str().unwrap().to_owned();
    assert_eq!(text(0), "run one, line one\n");
    assert_eq!(task_events[1].data["attempt"], 2);
    assert_eq!(
        [text(2), text(3)],
        ["run two, line one\n", "run two, line two\n"]
    );
    assert_eq!(task_events[2].data["chunk_index"], 0, "chunks start again");
    assert_eq!(
        text(4),
        "run two, line one\nrun two, line two\n",
        "the answer is the second run's alone"
    );

    let task = eventually(Duration::from_secs(5), "the task completed", || async {
        let t = fleet.chat.tasks.get(&s.session_id, &tid).await.unwrap()?;
        (t.state() == Some(TaskState::Completed)).then_some(t)
    })
    .await;
    assert_eq!(task.attempt, 2);
    for p in [&mut callbacks, &mut second] {
        assert!(p.running(), "{} died:\n{}", p.name(), p.log());
    }
    fleet.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
