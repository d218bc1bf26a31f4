//! dispatcher in-process on a real redis-server: a `session.close` whose first delivery closed
//! the session and died before telling the executors still stops their tasks when it is
//! delivered again, the tasks its late cancel ended included.

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Parser;
use dispatcher::{App, Config};
use fleet::Keys;
use fleet::agent::AgentStore;
use fleet::envelope::{Envelope, ExecCancel, ExecControl, SessionClose, TaskCommand, TaskSubmit};
use fleet::keys::GROUP_DISPATCHERS;
use fleet::session::Chat;
use fleet::stream::{entry, groups, producer};
use fleet::task::{OpStatus, TaskOp, TaskState};
use fleet_test_support::eventually;
use fred::prelude::*;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

struct Fixture {
    redis: String,
    client: Client,
    keys: Keys,
    chat: Chat,
    sid: String,
}

/// A session of agent `echo` (pool `default`) with `tasks` submitted tasks, sent straight to the
/// pool: an executor of `default` may be running each.
async fn session_with_tasks(tasks: usize) -> (Fixture, Vec<String>) {
    let redis = fleet_test_support::redis();
    let client = fleet::redis::connect(&redis).await.unwrap();
    let keys = Keys::new(&fleet_test_support::prefix());
    let chat = fleet::testing::echo_chat(&client, &keys).await;
    let messages: Vec<String> = (0..tasks).map(|i| format!("hello {i}")).collect();
    let messages: Vec<&str> = messages.iter().map(String::as_str).collect();
    let (sid, tids) = fleet::testing::session_with_tasks(&chat, &messages).await;
    let f = Fixture {
        redis,
        client,
        keys,
        chat,
        sid,
    };
    (f, tids)
}

impl Fixture {
    /// Puts a `session.close` on the tasks stream, read by a dispatcher that then died: it stays
    /// pending, delivered once.
    async fn close_read_by_a_dead_dispatcher(&self) {
        self.read_by_a_dead_dispatcher(TaskCommand::SessionClose(SessionClose {
            session_id: self.sid.clone(),
            reason: String::new(),
        }))
        .await;
    }

    /// Puts `command` on the tasks stream, read by a dispatcher that then died: it stays
    /// pending, delivered once.
    async fn read_by_a_dead_dispatcher(&self, command: TaskCommand) {
        let close = Envelope::new(command);
        groups::ensure_group(&self.client, &self.keys.tasks(), GROUP_DISPATCHERS)
            .await
            .unwrap();
        producer::send(&self.client, &self.keys.tasks(), None, &close)
            .await
            .unwrap();
        let read: Value = self
            .client
            .xreadgroup(
                GROUP_DISPATCHERS,
                "died",
                None,
                None,
                false,
                self.keys.tasks(),
                ">",
            )
            .await
            .unwrap();
        assert!(!read.is_null(), "the dead dispatcher holds the command");
    }

    /// What the close's handler applies to cancel task `tid`.
    fn cancel(&self, tid: &str) -> TaskOp {
        TaskOp::cancel(&self.sid, tid, "the session was closed")
    }

    /// Runs a dispatcher until the close is acked; answers the tasks told to stop.
    async fn redeliver(&self) -> BTreeSet<String> {
        self.redeliver_command()
            .await
            .into_iter()
            .map(|c| {
                assert_eq!(c.session_id, self.sid);
                assert_eq!(c.reason, "the session was closed");
                c.task_id
            })
            .collect()
    }

    /// Runs a dispatcher until the pending command is acked; answers the cancels it wrote to
    /// the executors of pool `default`.
    async fn redeliver_command(&self) -> Vec<ExecCancel> {
        let args = fleet::testing::worker_args(
            "dispatcher",
            &self.redis,
            self.keys.prefix(),
            &["--claim-idle-ms", "100"],
        );
        let app = App::build(Config::try_parse_from(args).expect("config"))
            .await
            .expect("dispatcher builds");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(app.run(shutdown.clone()));
        let g = eventually(Duration::from_secs(10), "the command acked", || async {
            let g = groups::group(&self.client, &self.keys.tasks(), GROUP_DISPATCHERS)
                .await
                .unwrap()?;
            (g.pending == 0).then_some(g)
        })
        .await;
        assert_eq!(g.lag, Some(0));
        shutdown.cancel();
        running.await.unwrap().unwrap();

        // The cancels are written before the close is acked.
        let v: Value = self
            .client
            .xrange(self.keys.exec_control("default"), "-", "+", None)
            .await
            .unwrap();
        entry::parse_entries(v)
            .unwrap()
            .iter()
            .map(|e| {
                let ExecControl::Cancel(c) =
                    Envelope::<ExecControl>::from_fields(&e.fields).unwrap().msg;
                c
            })
            .collect()
    }
}

#[tokio::test]
async fn a_redelivered_submit_whose_agent_is_gone_stops_the_task_its_first_delivery_sent() {
    let (f, tids) = session_with_tasks(1).await;
    let task = f.chat.tasks.get(&f.sid, &tids[0]).await.unwrap().unwrap();
    assert_eq!(task.state(), Some(TaskState::Dispatched));
    // A submit through the dispatchers, whose first delivery dispatched the task to pool
    // `default` and died before acking; then the agent was deleted.
    f.read_by_a_dead_dispatcher(TaskCommand::Submit(TaskSubmit {
        session_id: f.sid.clone(),
        task_id: tids[0].clone(),
        agent_id: fleet::testing::ECHO_AGENT.into(),
        attempt: 1,
        message: "hello 0".into(),
        metadata: Json::Null,
        deadline_ms: task.deadline_ms,
        source: "rest".into(),
    }))
    .await;
    AgentStore::new(f.client.clone(), f.keys.clone())
        .delete(fleet::testing::ECHO_AGENT)
        .await
        .unwrap();

    // The task fails, and the pool's executors are told to stop it.
    let cancels = f.redeliver_command().await;
    let stopped: Vec<&str> = cancels.iter().map(|c| c.task_id.as_str()).collect();
    assert_eq!(stopped, [tids[0].as_str()]);
    assert!(cancels[0].reason.contains("does not exist"), "{cancels:?}");
    let task = f.chat.tasks.get(&f.sid, &tids[0]).await.unwrap().unwrap();
    assert_eq!(task.state(), Some(TaskState::Failed));
}

#[tokio::test]
async fn a_redelivered_close_tells_the_executors_of_the_tasks_it_cancelled() {
    let (f, tids) = session_with_tasks(1).await;
    // The close's first delivery: a dispatcher read it, cancelled the task and closed the
    // session, then died before writing `exec.cancel` and before acking.
    f.close_read_by_a_dead_dispatcher().await;
    let applied = f
        .chat
        .tasks
        .apply(
            &f.sid,
            &[f.cancel(&tids[0]), TaskOp::session("close", String::new())],
        )
        .await
        .unwrap();
    assert_eq!(applied.statuses, vec![OpStatus::Applied; 2]);

    // A dispatcher takes the close over and tells the pool's executors to stop the task.
    assert_eq!(f.redeliver().await, BTreeSet::from([tids[0].clone()]));
    let task = f.chat.tasks.get(&f.sid, &tids[0]).await.unwrap().unwrap();
    assert_eq!(task.state(), Some(TaskState::Cancelled));
}

#[tokio::test]
async fn a_redelivered_close_also_stops_the_tasks_its_late_cancel_ended() {
    let (f, tids) = session_with_tasks(2).await;
    // The first delivery read one open task; the second was created before its close applied,
    // so a second apply cancelled it; then the dispatcher died.
    f.close_read_by_a_dead_dispatcher().await;
    let first = f
        .chat
        .tasks
        .apply(
            &f.sid,
            &[f.cancel(&tids[0]), TaskOp::session("close", String::new())],
        )
        .await
        .unwrap();
    assert_eq!(first.statuses, vec![OpStatus::Applied; 2]);
    let late = f
        .chat
        .tasks
        .apply(&f.sid, &[f.cancel(&tids[1])])
        .await
        .unwrap();
    assert_eq!(late.statuses, vec![OpStatus::Applied]);

    assert_eq!(f.redeliver().await, tids.iter().cloned().collect());
}
