//! A dispatcher running in the test's process on a real redis-server, for the tests of this
//! crate that send it commands and read what it did.

// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::time::Duration;

use clap::Parser;
use dispatcher::{App, Config};
use fleet::Keys;
use fleet::envelope::{AgentMessage, AgentRequest, Envelope, PlanningEvent, TaskCommand};
use fleet::keys::GROUP_DISPATCHERS;
use fleet::planning::Subtask;
use fleet::stream::{entry, groups, producer};
use fleet::testing::PlanningServer;
use fleet_proto::planning::v1::UpdateTaskRequest;
use fleet_test_support::eventually;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

pub struct Env {
    pub client: Client,
    pub keys: Keys,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Env {
    /// A dispatcher with the test defaults, on a fresh Redis and key prefix.
    pub async fn start() -> Env {
        Env::start_with(&[]).await
    }

    /// A dispatcher with the test defaults and `extra` flags, on a fresh Redis and key prefix.
    pub async fn start_with(extra: &[&str]) -> Env {
        let redis = fleet_test_support::redis();
        let client = fleet::redis::connect(&redis).await.unwrap();
        let keys = Keys::new(&fleet_test_support::prefix());
        groups::ensure_group(&client, &keys.tasks(), GROUP_DISPATCHERS)
            .await
            .unwrap();
        let args = fleet::testing::worker_args("dispatcher", &redis, keys.prefix(), extra);
        let app = App::build(Config::try_parse_from(args).expect("config"))
            .await
            .expect("dispatcher builds");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(app.run(shutdown.clone()));
        Env {
            client,
            keys,
            shutdown,
            running,
        }
    }

    /// Writes `e` to `fleet:tasks` as a new entry (what nats-bridge or edge-api write for
    /// each copy) and waits until the dispatcher has handled and acked it.
    pub async fn send(&self, e: PlanningEvent) {
        self.command(TaskCommand::PlanningEvent(e)).await;
    }

    /// Writes `cmd` to `fleet:tasks` and waits until the dispatcher has handled and acked it.
    pub async fn command(&self, cmd: TaskCommand) {
        let env = Envelope::new(cmd);
        let id = producer::send(&self.client, &self.keys.tasks(), None, &env)
            .await
            .unwrap();
        let (client, tasks) = (&self.client, self.keys.tasks());
        eventually(Duration::from_secs(10), "the event handled", || async {
            let g = groups::group(client, &tasks, GROUP_DISPATCHERS)
                .await
                .ok()??;
            (g.last_delivered == id && g.pending == 0).then_some(())
        })
        .await;
    }

    /// Every agent request sent to `role`'s agents, in order.
    pub async fn requests(&self, role: &str) -> Vec<AgentRequest> {
        let v: Value = self
            .client
            .xrange(self.keys.agents(role), "-", "+", None)
            .await
            .unwrap();
        entry::parse_entries(v)
            .unwrap()
            .iter()
            .map(|e| {
                let AgentMessage::Request(r) = Envelope::<AgentMessage>::from_fields(&e.fields)
                    .unwrap()
                    .msg;
                r
            })
            .collect()
    }

    /// Tasks created in case `case`'s planning session.
    pub async fn tasks_total(&self, case: &str) -> i64 {
        let n: Option<i64> = self
            .client
            .hget(
                self.keys.session(&fleet::planning::session_id(case)),
                "tasks_total",
            )
            .await
            .unwrap();
        n.unwrap_or(0)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.running.await.unwrap().unwrap();
    }
}

/// A Planning service, and a dispatcher that reports to it (`--planning-addr`).
pub async fn reporting_to_planning() -> (Env, PlanningServer) {
    let planning = PlanningServer::start().await;
    let env = Env::start_with(&["--planning-addr", &planning.addr]).await;
    (env, planning)
}

/// Checks that `u` reports subtask `s` cancelled with `reason`, under its case, plan and role.
pub fn assert_cancelled(u: &UpdateTaskRequest, s: &Subtask, reason: &str) {
    assert_eq!(u.task_id, s.task_id, "{u:?}");
    assert_eq!(
        (u.status.as_str(), u.result.as_str()),
        ("CANCELLED", reason)
    );
    assert_eq!(
        (u.case_id.as_str(), u.plan_id.as_str(), u.role.as_str()),
        (s.case_id.as_str(), s.plan_id.as_str(), s.role.as_str())
    );
}
