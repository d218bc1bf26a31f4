//! kill -9 and SIGTERM of worker processes in the middle of 1,000 tasks: every task still
//! completes, every session log shows each task's chunks once, in order, then its response, and
//! so does every WebSocket client watching a session through ws-gateway.

use std::time::Duration;

use fleet_e2e::{
    AGENT, Fleet, Options, WsClient, assert_clean_delivery, assert_clean_streams, spawn_binary,
    sum_session_field,
};
use fleet_test_support::eventually;

const TASKS: usize = 1000;
const SESSIONS: usize = 10;

struct Load {
    fleet: Fleet,
    sids: Vec<String>,
    tids: Vec<Vec<String>>,
    /// One WebSocket client per session, connected before anything was submitted.
    clients: Vec<WsClient>,
}

/// Front doors in-process (the workers run as processes), sessions each watched by a WebSocket
/// client, and 1,000 submitted tasks.
async fn load() -> Load {
    let fleet = Fleet::start(Options {
        workers: false,
        ..Default::default()
    })
    .await;
    let mut sids = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..SESSIONS {
        let (s, client) = fleet.watched_session(AGENT).await;
        clients.push(client);
        sids.push(s.session_id);
    }
    let mut tids = vec![Vec::new(); SESSIONS];
    for i in 0..TASKS {
        let s = i % SESSIONS;
        let tid = fleet
            .submit(&sids[s], &format!("task {i} has five words"))
            .await;
        tids[s].push(tid);
    }
    Load {
        fleet,
        sids,
        tids,
        clients,
    }
}

impl Load {
    async fn completed(&self) -> i64 {
        sum_session_field(
            &self.fleet.client,
            &self.fleet.keys,
            &self.sids,
            "tasks_completed",
        )
        .await
    }

    async fn wait_completed(&self, at_least: i64, within: Duration) {
        eventually(within, &format!("{at_least} completed tasks"), || async {
            (self.completed().await >= at_least).then_some(())
        })
        .await;
    }

    /// Every client gets every task's chunks once, in order, then its response.
    async fn check_clients(&mut self) {
        let mut chunks = 0;
        for (s, client) in self.clients.iter_mut().enumerate() {
            let tids = &self.tids[s];
            let mut open: std::collections::HashSet<&str> =
                tids.iter().map(String::as_str).collect();
            // Read until every task of the session has ended (what arrived before is kept too).
            for m in &client.received {
                if m.message_type == "chat_response" {
                    open.remove(m.task_id.as_deref().unwrap_or_default());
                }
            }
            while !open.is_empty() {
                let m = client.next(Duration::from_secs(30)).await;
                if m.message_type == "chat_response" {
                    open.remove(m.task_id.as_deref().unwrap_or_default());
                }
            }
            let events: Vec<_> = client
                .received
                .iter()
                .filter(|m| m.event_id.is_some())
                .cloned()
                .collect();
            chunks += assert_clean_delivery(&events, tids);
        }
        assert_eq!(
            chunks,
            TASKS * 5,
            "every client saw each of its tasks' five words exactly once"
        );
    }

    async fn check_logs(&self) {
        let mut chunks = 0;
        for (s, sid) in self.sids.iter().enumerate() {
            let log = self
                .fleet
                .log
                .replay_after(sid, None, None, 100_000)
                .await
                .unwrap();
            chunks += assert_clean_streams(&log, &self.tids[s]);
        }
        assert_eq!(
            chunks,
            TASKS * 5,
            "every task streamed its five words exactly once"
        );
        for (s, sid) in self.sids.iter().enumerate() {
            for tid in &self.tids[s] {
                let t = self.fleet.chat.task(sid, tid).await.unwrap();
                assert_eq!(t.state, "completed", "task {tid}");
            }
        }
    }
}

fn worker_args() -> [&'static str; 6] {
    [
        "--claim-idle-ms",
        "1000",
        "--batch",
        "16",
        "--max-in-flight",
        "32",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_each_worker_mid_run_loses_and_repeats_nothing() {
    let mut l = load().await;
    let (redis, prefix) = (l.fleet.redis_url.clone(), l.fleet.prefix.clone());
    let exec = |r: &str, p: &str| {
        spawn_binary(
            "exec-worker",
            r,
            p,
            &[&worker_args()[..], &["--echo-delay-ms", "3"]].concat(),
        )
    };
    let mut dispatcher = spawn_binary("dispatcher", &redis, &prefix, &worker_args());
    let mut callbacks = spawn_binary("callback-worker", &redis, &prefix, &worker_args());
    let mut executor = exec(&redis, &prefix);

    l.wait_completed(150, Duration::from_secs(60)).await;
    executor.kill();
    executor = exec(&redis, &prefix);

    l.wait_completed(400, Duration::from_secs(60)).await;
    dispatcher.kill();
    dispatcher = spawn_binary("dispatcher", &redis, &prefix, &worker_args());

    l.wait_completed(650, Duration::from_secs(60)).await;
    callbacks.kill();
    callbacks = spawn_binary("callback-worker", &redis, &prefix, &worker_args());

    l.wait_completed(TASKS as i64, Duration::from_secs(90))
        .await;
    l.check_logs().await;
    l.check_clients().await;
    for p in [&mut dispatcher, &mut callbacks, &mut executor] {
        assert!(p.running(), "{} died:\n{}", p.name(), p.log());
    }
    l.fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_loses_nothing() {
    let mut l = load().await;
    let (redis, prefix) = (l.fleet.redis_url.clone(), l.fleet.prefix.clone());
    let exec_args = [&worker_args()[..], &["--echo-delay-ms", "3"]].concat();
    let mut procs = [
        spawn_binary("dispatcher", &redis, &prefix, &worker_args()),
        spawn_binary("callback-worker", &redis, &prefix, &worker_args()),
        spawn_binary("exec-worker", &redis, &prefix, &exec_args),
    ];
    let mut threshold = 150;
    for proc in procs.iter_mut() {
        l.wait_completed(threshold, Duration::from_secs(60)).await;
        let name = proc.name().to_owned();
        let status = proc.terminate(Duration::from_secs(15)).await;
        let status =
            status.unwrap_or_else(|| panic!("{name} did not exit within its grace period"));
        assert!(
            status.success(),
            "{name} exited with {status}:\n{}",
            proc.log()
        );
        let args: Vec<&str> = if name == "exec-worker" {
            exec_args.clone()
        } else {
            worker_args().to_vec()
        };
        *proc = spawn_binary(&name, &redis, &prefix, &args);
        threshold += 250;
    }
    l.wait_completed(TASKS as i64, Duration::from_secs(90))
        .await;
    l.check_logs().await;
    l.check_clients().await;
    l.fleet.stop().await;
}
