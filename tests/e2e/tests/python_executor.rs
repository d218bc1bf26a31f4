//! The Python executor of examples/python-executor, written from docs/protocol.md alone, serves
//! a pool of the fleet: its answers stream back like any other executor's.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet::session::{InitSession, SubmitMessage};
use fleet_e2e::{Fleet, Options};

struct Python(Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_executor_serves_its_pool() {
    let fleet = Fleet::start(Options {
        front_doors: false,
        ..Default::default()
    })
    .await;
    let mut agent = fleet_e2e::echo_agent();
    agent.id = "py".into();
    agent.pool = "python".into();
    fleet.chat.agents.put(&agent).await.unwrap();

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/python-executor/executor.py"
    );
    let _python = Python(
        Command::new("python3")
            .arg(script)
            .env("REDIS_URL", &fleet.redis_url)
            .env("FLEET_PREFIX", &fleet.prefix)
            .env("FLEET_POOL", "python")
            .stdin(Stdio::null())
            .spawn()
            .expect("python3 runs (scripts/test.sh installs redis and msgpack for it)"),
    );

    let sid = fleet
        .chat
        .init_session(InitSession {
            agent_id: "py".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .session_id;
    let tid = fleet
        .chat
        .submit(
            &sid,
            SubmitMessage {
                message: "one two three".into(),
                source: "rest",
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .task_id;
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
