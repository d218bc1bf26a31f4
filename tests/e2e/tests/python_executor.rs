//! The Python executor of examples/python-executor, written from docs/protocol.md alone, serves
//! a pool of the fleet: its answers stream back like any other executor's; it dead-letters what
//! it cannot decode and keeps serving; it stops a task on cancel and at its deadline; and a task
//! in hand when it shuts down is left to another executor, which takes it over.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet::stream::entry::parse_entries;
use fleet_e2e::{Fleet, Options};
use fred::prelude::*;
use serde_json::json;

struct Python(Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Python {
    /// Starts the example executor on pool `python` of `fleet`.
    fn start(fleet: &Fleet, claim_idle_ms: Option<u64>) -> Python {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/python-executor/executor.py"
        );
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .env("REDIS_URL", &fleet.redis_url)
            .env("FLEET_PREFIX", &fleet.prefix)
            .env("FLEET_POOL", "python")
            .stdin(Stdio::null());
        if let Some(ms) = claim_idle_ms {
            cmd.env("FLEET_CLAIM_IDLE_MS", ms.to_string());
        }
        Python(
            cmd.spawn()
                .expect("python3 runs (scripts/test.sh installs redis and msgpack for it)"),
        )
    }

    /// Sends SIGTERM and waits for the process to exit.
    fn terminate(&mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let exit = self.0.wait().expect("python3 exits");
        assert!(
            exit.success(),
            "the executor stops cleanly on SIGTERM: {exit}"
        );
    }
}

/// A fleet whose agent `py` is served by pool `python`, with `params` and `timeout_secs`.
async fn fleet_with_agent(params: serde_json::Value) -> Fleet {
    let fleet = Fleet::start(Options {
        front_doors: false,
        ..Default::default()
    })
    .await;
    let mut agent = fleet_e2e::echo_agent();
    agent.id = "py".into();
    agent.pool = "python".into();
    agent.params = params;
    fleet.chat.agents.put(&agent).await.unwrap();
    fleet
}

/// Opens a session with agent `py` and submits `message`; answers (session id, task id).
async fn submit(fleet: &Fleet, message: &str) -> (String, String) {
    let sid = fleet.open_session("py").await.session_id;
    let tid = fleet.submit(&sid, message).await;
    (sid, tid)
}

/// Entries of pool `python` delivered to an executor and not acknowledged.
async fn pending(fleet: &Fleet) -> u64 {
    let summary: Value = fleet
        .client
        .xpending(fleet.keys.exec("python"), "executors", ())
        .await
        .unwrap();
    summary.into_array()[0].as_u64().unwrap_or(0)
}

/// Whether every entry of pool `python` was delivered to an executor and acknowledged (false
/// while the executor has not created its group yet).
async fn all_acked(fleet: &Fleet) -> bool {
    let groups: Result<Value, _> = fleet.client.xinfo_groups(fleet.keys.exec("python")).await;
    let Ok(groups) = groups else { return false };
    groups.into_array().into_iter().any(|g| {
        let fields: Vec<Value> = g.into_array();
        let get = |name: &str| {
            fields
                .chunks(2)
                .find(|kv| kv[0].as_str().as_deref() == Some(name))
                .and_then(|kv| kv[1].as_u64())
        };
        get("pending") == Some(0) && get("lag") == Some(0)
    })
}

/// The kinds of the callbacks written for task `tid` (a `batch` counts as its own kind).
async fn callback_kinds(fleet: &Fleet, tid: &str) -> Vec<String> {
    let v: Value = fleet
        .client
        .xrange(fleet.keys.callbacks(), "-", "+", None)
        .await
        .unwrap();
    let mut kinds = Vec::new();
    for e in parse_entries(v).unwrap() {
        let env = fleet::envelope::Envelope::<fleet::envelope::Callback>::from_fields(&e.fields)
            .expect("the executor writes callbacks that decode");
        if env.msg.position().1 == tid {
            kinds.push(fleet::envelope::Message::kind(&env.msg).to_owned());
        }
    }
    kinds
}

/// XADDs an `exec.request` envelope with `body` (any MessagePack map) to pool `python`.
async fn write_request(fleet: &Fleet, body: serde_json::Value) {
    let body = rmp_serde::to_vec_named(&body).unwrap();
    let _: String = fleet
        .client
        .xadd(
            fleet.keys.exec("python"),
            false,
            None,
            "*",
            vec![
                ("v", bytes::Bytes::from_static(b"1")),
                ("kind", bytes::Bytes::from_static(b"exec.request")),
                ("id", bytes::Bytes::from(uuid::Uuid::now_v7().to_string())),
                ("tp", bytes::Bytes::new()),
                ("ts", bytes::Bytes::from(fleet::time::now_ms().to_string())),
                ("body", bytes::Bytes::from(body)),
            ],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_executor_serves_its_pool() {
    let fleet = fleet_with_agent(serde_json::Value::Null).await;
    let _python = Python::start(&fleet, None);
    let (sid, tid) = submit(&fleet, "one two three").await;
    let events = fleet.task_events(&sid, &tid, Duration::from_secs(20)).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.message_type.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "chat_streaming",
            "chat_streaming",
            "chat_streaming",
            "chat_response"
        ]
    );
    assert_eq!(events[3].data["content"], "three two one");
    assert_eq!(events[3].data["metadata"]["executor"], "python");
    assert_eq!(
        fleet.chat.task(&sid, &tid).await.unwrap().state,
        "completed"
    );
    fleet.stop().await;
}

/// A request whose body decodes as MessagePack but whose fields have the wrong types (what the
/// reference executor refuses to decode) is dead-lettered; the executor does not die on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_the_wrong_types_is_dead_lettered_and_work_goes_on() {
    let fleet = fleet_with_agent(serde_json::Value::Null).await;
    let mut python = Python::start(&fleet, None);
    write_request(
        &fleet,
        json!({
            "session_id": "s", "task_id": "t", "attempt": 1, "agent_id": "py",
            "message": 42, "deadline_ms": fleet::time::now_ms() + 60_000,
        }),
    )
    .await;
    let (sid, tid) = submit(&fleet, "still here").await;
    let events = fleet.task_events(&sid, &tid, Duration::from_secs(20)).await;
    assert_eq!(events.last().unwrap().data["content"], "here still");
    assert!(
        python.0.try_wait().unwrap().is_none(),
        "the executor is still running"
    );
    let v: Value = fleet
        .client
        .xrange(fleet.keys.dlq(), "-", "+", None)
        .await
        .unwrap();
    let letters = parse_entries(v).unwrap();
    assert_eq!(letters.len(), 1);
    let reason = letters[0].get_str("reason").unwrap();
    assert!(reason.contains("'message'"), "{reason}");
    // The answered request's XACK follows its callbacks.
    fleet_test_support::eventually(Duration::from_secs(20), "both requests acked", || async {
        all_acked(&fleet).await.then_some(())
    })
    .await;
    fleet.stop().await;
}

/// A cancel stops a running task: the executor writes nothing more for it and acks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_task_stops() {
    // Ten minutes a word: only a cancel ends the task before the test times out.
    let fleet = fleet_with_agent(json!({"delay_ms": 600_000})).await;
    let _python = Python::start(&fleet, None);
    let (sid, tid) = submit(&fleet, "one two three").await;
    let state = fleet_test_support::eventually(Duration::from_secs(20), "the task starts", || {
        let (chat, sid, tid) = (&fleet.chat, &sid, &tid);
        async move {
            let state = chat.task(sid, tid).await.unwrap().state;
            (state != "queued" && state != "dispatched").then_some(state)
        }
    })
    .await;
    assert_eq!(state, "running");
    fleet.chat.cancel(&sid, &tid, "test").await.unwrap();
    fleet_test_support::eventually(Duration::from_secs(20), "the request acked", || async {
        (pending(&fleet).await == 0).then_some(())
    })
    .await;
    assert_eq!(callback_kinds(&fleet, &tid).await, ["started"]);
    assert_eq!(
        fleet.chat.task(&sid, &tid).await.unwrap().state,
        "cancelled"
    );
    fleet.stop().await;
}

/// A task stops at its deadline with no one telling it (no cancel: the task is unknown to the
/// fleet, so no sweeper times it out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_stops_at_its_deadline() {
    let fleet = fleet_with_agent(serde_json::Value::Null).await;
    let _python = Python::start(&fleet, None);
    write_request(
        &fleet,
        json!({
            "session_id": "s", "task_id": "t-deadline", "attempt": 1, "agent_id": "py",
            "message": "one two three", "params": {"delay_ms": 600_000},
            "deadline_ms": fleet::time::now_ms() + 1_000,
        }),
    )
    .await;
    fleet_test_support::eventually(Duration::from_secs(20), "the request acked", || async {
        all_acked(&fleet).await.then_some(())
    })
    .await;
    let kinds = callback_kinds(&fleet, "t-deadline").await;
    assert!(
        kinds.is_empty() || kinds == ["started"],
        "nothing but `started` is written: {kinds:?}"
    );
    fleet.stop().await;
}

/// SIGTERM in the middle of a task stops the executor at once and leaves the request pending;
/// another executor takes it over and runs it again, and the client sees each chunk once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_in_hand_at_shutdown_is_taken_over() {
    let fleet = fleet_with_agent(json!({"delay_ms": 100})).await;
    let mut first = Python::start(&fleet, Some(1_000));
    let words: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let (sid, tid) = submit(&fleet, &words.join(" ")).await;
    fleet_test_support::eventually(Duration::from_secs(20), "a first chunk", || {
        let (chat, sid, tid) = (&fleet.chat, &sid, &tid);
        async move { (chat.task(sid, tid).await.unwrap().chunks > 0).then_some(()) }
    })
    .await;
    first.terminate();
    assert_eq!(
        pending(&fleet).await,
        1,
        "the request in hand stays pending"
    );
    assert_ne!(
        fleet.chat.task(&sid, &tid).await.unwrap().state,
        "completed"
    );

    let _second = Python::start(&fleet, Some(1_000));
    let events = fleet.task_events(&sid, &tid, Duration::from_secs(30)).await;
    let (last, chunks) = events.split_last().unwrap();
    let mut reversed = words.clone();
    reversed.reverse();
    assert_eq!(last.message_type, "chat_response");
    assert_eq!(last.data["content"], reversed.join(" "));
    let indexes: Vec<u64> = chunks
        .iter()
        .map(|e| e.data["chunk_index"].as_u64().unwrap())
        .collect();
    assert_eq!(
        indexes,
        (0..40).collect::<Vec<u64>>(),
        "each chunk once, in order"
    );
    fleet.stop().await;
}
