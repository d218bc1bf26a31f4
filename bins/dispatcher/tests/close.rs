//! dispatcher in-process on a real redis-server: a `session.close` whose first delivery closed
//! the session and died before telling the executors still stops their tasks when it is
//! delivered again.

use std::time::Duration;

use clap::Parser;
use dispatcher::{App, Config};
use fleet::Keys;
use fleet::agent::{AgentConfig, AgentStore};
use fleet::envelope::{Envelope, ExecControl, SessionClose, TaskCommand};
use fleet::events::ServerMessage;
use fleet::keys::GROUP_DISPATCHERS;
use fleet::session::{Chat, ChatLimits, InitSession, SubmitMessage, TokenSigner};
use fleet::stream::{entry, groups, producer};
use fleet::task::{OpStatus, Retention, TaskOp, TaskState, TaskStore};
use fleet_test_support::eventually;
use fred::prelude::*;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_redelivered_close_tells_the_executors_of_the_tasks_it_cancelled() {
    let redis = fleet_test_support::redis();
    let client = fleet::redis::connect(&redis).await.unwrap();
    let keys = Keys::new(&fleet_test_support::prefix());
    let agents = AgentStore::new(client.clone(), keys.clone());
    agents
        .put(&AgentConfig {
            id: "echo".into(),
            name: "Echo".into(),
            pool: "default".into(),
            role: None,
            tenant_id: None,
            timeout_secs: None,
            params: Json::Null,
        })
        .await
        .unwrap();
    let chat = Chat {
        tasks: TaskStore::new(client.clone(), keys.clone(), Retention::default()),
        agents,
        tokens: TokenSigner::new(b"0123456789abcdef0123456789abcdef"),
        limits: ChatLimits::default(),
        backpressure: Default::default(),
    };
    let sid = chat
        .init_session(InitSession {
            agent_id: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .session_id;
    // Sent straight to the agent's pool: an executor of `default` may be running it.
    let tid = chat
        .submit(
            &sid,
            SubmitMessage {
                message: "hello".into(),
                source: "rest",
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .task_id;

    // The close's first delivery: a dispatcher read it, cancelled the task and closed the
    // session, then died before writing `exec.cancel` and before acking.
    let close = Envelope::new(TaskCommand::SessionClose(SessionClose {
        session_id: sid.clone(),
        reason: String::new(),
    }));
    groups::ensure_group(&client, &keys.tasks(), GROUP_DISPATCHERS)
        .await
        .unwrap();
    producer::send(&client, &keys.tasks(), None, &close)
        .await
        .unwrap();
    let read: Value = client
        .xreadgroup(
            GROUP_DISPATCHERS,
            "died",
            None,
            None,
            false,
            keys.tasks(),
            ">",
        )
        .await
        .unwrap();
    assert!(!read.is_null(), "the dead dispatcher holds the close");
    let cancel = TaskOp::end(
        "cancel",
        &tid,
        "cancelled",
        "the session was closed",
        ServerMessage::chat_error(
            &sid,
            &tid,
            None,
            "cancelled",
            "the session was closed",
            &Json::Null,
        )
        .to_json(),
    );
    let applied = chat
        .tasks
        .apply(&sid, &[cancel, TaskOp::session("close", String::new())])
        .await
        .unwrap();
    assert_eq!(applied.statuses, vec![OpStatus::Applied; 2]);

    let args = [
        "dispatcher",
        "--redis-url",
        &redis,
        "--prefix",
        keys.prefix(),
        "--admin-addr",
        "127.0.0.1:0",
        "--block-ms",
        "100",
        "--claim-idle-ms",
        "100",
    ];
    let app = App::build(Config::try_parse_from(args).expect("config"))
        .await
        .expect("dispatcher builds");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone()));

    // The dispatcher takes the close over and tells the pool's executors to stop the task.
    let control = keys.exec_control("default");
    let stop = eventually(Duration::from_secs(10), "an exec.cancel", || async {
        let v: Value = client.xrange(&control, "-", "+", None).await.unwrap();
        let entries = entry::parse_entries(v).unwrap();
        let e = entries.first()?;
        Some(Envelope::<ExecControl>::from_fields(&e.fields).unwrap())
    })
    .await;
    let ExecControl::Cancel(c) = stop.msg;
    assert_eq!(
        (c.session_id.as_str(), c.task_id.as_str()),
        (sid.as_str(), tid.as_str())
    );
    assert_eq!(c.reason, "the session was closed");

    let g = eventually(Duration::from_secs(5), "the close acked", || async {
        let g = groups::group(&client, &keys.tasks(), GROUP_DISPATCHERS)
            .await
            .unwrap()?;
        (g.pending == 0).then_some(g)
    })
    .await;
    assert_eq!(g.lag, Some(0));
    let task = chat.tasks.get(&sid, &tid).await.unwrap().unwrap();
    assert_eq!(task.state(), Some(TaskState::Cancelled));

    shutdown.cancel();
    running.await.unwrap().unwrap();
}
