//! exec-worker in command mode, in-process on a real redis-server: what a program prints is
//! bounded (a huge stdout line, a huge stdout, megabytes of stderr) and ends the task with a
//! clear error instead of taking the executor's memory.

use std::time::Duration;

use clap::Parser;
use exec_worker::{App, Config};
use fleet::Keys;
use fleet::envelope::{Callback, Envelope, ExecCancel, ExecControl, ExecMessage, ExecRequest};
use fleet::stream::entry::{StreamId, parse_read};
use fleet::stream::producer;
use fleet::time::now_ms;
use fred::prelude::*;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

/// The program of every task: what it prints depends on the task's message.
const PROGRAM: &str = r#"input=$(cat)
case "$input" in
  *'"message":"long-line"'*)
    head -c 5000000 /dev/zero | tr '\0' x ;;
  *'"message":"long-output"'*)
    for i in $(seq 1 40); do head -c 60000 /dev/zero | tr '\0' y; echo; done ;;
  *'"message":"loud-stderr"'*)
    echo out; head -c 8000000 /dev/zero | tr '\0' e >&2; printf 'the-end' >&2; exit 3 ;;
  *'"message":"leaves-a-helper"'*)
    sleep 600 & echo "$!"; echo 'helper started' >&2; exit 4 ;;
  *'"message":"crashes"'*)
    echo 'about to crash' >&2; kill -SEGV $$ ;;
  *'"message":"waits-on-a-helper"'*)
    sleep 600 & echo "$!"; wait ;;
esac"#;

struct Worker {
    client: Client,
    keys: Keys,
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start() -> Worker {
    start_with(&[]).await
}

async fn start_with(extra: &[&str]) -> Worker {
    start_on(&fleet_test_support::prefix(), extra).await
}

async fn start_on(prefix: &str, extra: &[&str]) -> Worker {
    let redis = fleet_test_support::redis();
    let mut args = vec![
        "exec-worker",
        "--redis-url",
        &redis,
        "--prefix",
        prefix,
        "--admin-addr",
        "127.0.0.1:0",
        "--block-ms",
        "100",
        "--mode",
        "command",
        "--command",
        PROGRAM,
    ];
    args.extend(extra);
    let app = App::build(Config::try_parse_from(args).expect("config"))
        .await
        .expect("exec-worker builds");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone()));
    Worker {
        client: fleet::redis::connect(&redis).await.unwrap(),
        keys: Keys::new(prefix),
        shutdown,
        running,
    }
}

impl Worker {
    /// Runs a task with `message` and answers its callbacks, the last (`result` or `error`)
    /// included.
    async fn run(&self, message: &str) -> Vec<Callback> {
        send(&self.client, &self.keys, message).await;
        self.callbacks_of(&format!("t-{message}")).await
    }

    /// The callbacks of task `task_id`, the last (`result` or `error`) included.
    async fn callbacks_of(&self, task_id: &str) -> Vec<Callback> {
        self.callbacks_until(task_id, |seen| {
            matches!(seen.last(), Some(Callback::Result(_) | Callback::Error(_)))
        })
        .await
    }

    /// The callbacks of task `task_id` until `enough` says so.
    async fn callbacks_until(
        &self,
        task_id: &str,
        enough: impl Fn(&[Callback]) -> bool,
    ) -> Vec<Callback> {
        let reader = self.client.clone_new();
        reader.init().await.unwrap();
        let mut last = StreamId::ZERO.to_string();
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {task_id}: not the callbacks awaited; got {}",
                seen.len()
            );
            let reply: Value = reader
                .xread(Some(100), Some(500), self.keys.callbacks(), last.as_str())
                .await
                .unwrap();
            for e in parse_read(reply).unwrap().into_iter().flat_map(|(_, e)| e) {
                last = e.id.to_string();
                let cb = Envelope::<Callback>::from_fields(&e.fields).unwrap().msg;
                for cb in cb.unbatched() {
                    if cb.position().1 == task_id {
                        seen.push(cb.clone());
                    }
                }
            }
            if enough(&seen) {
                let _ = reader.quit().await;
                return seen;
            }
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.running.await.unwrap().unwrap();
    }
}

/// Sends task `t-<message>` to the default pool.
async fn send(client: &Client, keys: &Keys, message: &str) {
    let req = ExecRequest {
        session_id: "s1".into(),
        task_id: format!("t-{message}"),
        attempt: 1,
        agent_id: "cmd".into(),
        message: message.into(),
        metadata: Json::Null,
        params: Json::Null,
        deadline_ms: now_ms() + 60_000,
    };
    producer::send(
        client,
        &keys.exec(fleet::agent::DEFAULT_POOL),
        None,
        &Envelope::new(ExecMessage::Request(req)),
    )
    .await
    .unwrap();
}

fn error_of(cbs: &[Callback]) -> &fleet::envelope::TaskFailure {
    match cbs.last() {
        Some(Callback::Error(e)) => e,
        Some(Callback::Result(r)) => panic!(
            "the task ended with a result of {} bytes, not an error",
            r.content.len()
        ),
        other => panic!("the task ended with {other:?}, not an error"),
    }
}

fn chunks(cbs: &[Callback]) -> Vec<&str> {
    cbs.iter()
        .filter_map(|c| match c {
            Callback::Chunk(c) => Some(c.content.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_command_that_prints_too_much_ends_with_a_bounded_error() {
    let worker = start().await;

    // A 5 MB line without a newline: never a chunk, never a result.
    let cbs = worker.run("long-line").await;
    let e = error_of(&cbs);
    assert_eq!(e.error_type, "output_too_large");
    assert!(
        e.message.contains("a line longer than 65536 bytes"),
        "{e:?}"
    );
    assert!(chunks(&cbs).is_empty());

    // 40 lines of 60 kB: the lines up to 1 MiB are sent as chunks, then the run ends.
    let cbs = worker.run("long-output").await;
    let e = error_of(&cbs);
    assert_eq!(e.error_type, "output_too_large");
    assert!(e.message.contains("more than 1048576 bytes"), "{e:?}");
    let sent = chunks(&cbs);
    assert!(!sent.is_empty() && sent.len() < 40, "{} chunks", sent.len());
    assert!(sent.iter().map(|c| c.len()).sum::<usize>() <= 1 << 20);

    // 8 MB of stderr, then a failure: the error carries the last 4 KiB.
    let cbs = worker.run("loud-stderr").await;
    assert_eq!(chunks(&cbs), ["out\n"]);
    let e = error_of(&cbs);
    assert_eq!(e.error_type, "exit_status");
    let tail = e.details["stderr_tail"].as_str().unwrap();
    assert_eq!(tail.len(), 4096);
    assert!(tail.ends_with("eeethe-end"), "{}", &tail[tail.len() - 20..]);

    worker.stop().await;
}

#[tokio::test]
async fn a_program_killed_by_a_signal_says_which() {
    let worker = start().await;
    let cbs = worker.run("crashes").await;
    let e = error_of(&cbs);
    assert_eq!(e.error_type, "exit_status");
    assert_eq!(e.message, "the command was killed by signal 11");
    assert_eq!(e.details["signal"], 11);
    assert_eq!(e.details["exit_code"], Json::Null);
    assert_eq!(e.details["stderr_tail"], "about to crash\n");
    worker.stop().await;
}

#[tokio::test]
async fn a_request_taken_over_from_an_executor_that_died_runs_as_a_later_attempt() {
    // An executor read the request and died: it stays pending, delivered once.
    let prefix = fleet_test_support::prefix();
    let keys = Keys::new(&prefix);
    let client = fleet::redis::connect(&fleet_test_support::redis())
        .await
        .unwrap();
    let stream = keys.exec(fleet::agent::DEFAULT_POOL);
    fleet::stream::groups::ensure_group(&client, &stream, fleet::keys::GROUP_EXECUTORS)
        .await
        .unwrap();
    send(&client, &keys, "again").await;
    let read: Value = client
        .xreadgroup(
            fleet::keys::GROUP_EXECUTORS,
            "died",
            None,
            None,
            false,
            &stream,
            ">",
        )
        .await
        .unwrap();
    assert!(!read.is_null(), "the dead executor holds the request");

    // A peer takes it over and runs the program again: its answer may differ from the first
    // run's, so its callbacks name attempt 2, which replaces whatever the first run streamed.
    let worker = start_on(&prefix, &["--claim-idle-ms", "100"]).await;
    let cbs = worker.callbacks_of("t-again").await;
    let attempts: Vec<u32> = cbs.iter().map(|c| c.position().2).collect();
    assert!(!attempts.is_empty());
    assert!(attempts.iter().all(|&a| a == 2), "{cbs:?}");
    assert!(matches!(cbs.last(), Some(Callback::Result(_))), "{cbs:?}");
    worker.stop().await;
}

/// Whether process `pid` runs (a zombie waiting for its parent to reap it does not).
fn running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            != Some("Z")
    })
}

/// The pid a program printed as its first chunk.
fn printed_pid(cbs: &[Callback]) -> String {
    let pid = chunks(cbs)
        .first()
        .expect("the program printed its helper's pid")
        .trim()
        .to_owned();
    assert!(pid.parse::<u32>().is_ok(), "{pid:?}");
    pid
}

#[tokio::test]
async fn a_program_that_exits_leaving_a_helper_running_ends_its_task_and_the_helper() {
    let worker = start().await;

    // The helper holds the program's stdout and stderr open: the task still ends when the
    // program exits, with its status and stderr, and the helper is stopped with it.
    let cbs = worker.run("leaves-a-helper").await;
    let e = error_of(&cbs);
    assert_eq!(e.error_type, "exit_status");
    assert_eq!(e.details["exit_code"], 4);
    assert_eq!(e.details["stderr_tail"], "helper started\n");
    let helper = printed_pid(&cbs);
    fleet_test_support::eventually(Duration::from_secs(10), "the helper stopped", || async {
        (!running(&helper)).then_some(())
    })
    .await;

    worker.stop().await;
}

#[tokio::test]
async fn a_cancel_stops_the_processes_the_program_started() {
    let worker = start().await;
    send(&worker.client, &worker.keys, "waits-on-a-helper").await;
    let cbs = worker
        .callbacks_until("t-waits-on-a-helper", |seen| !chunks(seen).is_empty())
        .await;
    let helper = printed_pid(&cbs);
    assert!(running(&helper));

    // Sent again until it takes: the control stream is read from its end, so a cancel written
    // before the worker's first read of it is not seen.
    let cancel = Envelope::new(ExecControl::Cancel(ExecCancel {
        session_id: "s1".into(),
        task_id: "t-waits-on-a-helper".into(),
        reason: "the user cancelled".into(),
    }));
    let control = worker.keys.exec_control(fleet::agent::DEFAULT_POOL);
    fleet_test_support::eventually(Duration::from_secs(10), "the helper stopped", || async {
        producer::send(&worker.client, &control, None, &cancel)
            .await
            .unwrap();
        (!running(&helper)).then_some(())
    })
    .await;
    // And the request is done with: acked, nothing more reported.
    let exec = worker.keys.exec(fleet::agent::DEFAULT_POOL);
    fleet_test_support::eventually(Duration::from_secs(10), "the request acked", || async {
        let g = fleet::stream::groups::group(&worker.client, &exec, fleet::keys::GROUP_EXECUTORS)
            .await
            .ok()
            .flatten()?;
        (g.pending == 0).then_some(())
    })
    .await;

    worker.stop().await;
}
