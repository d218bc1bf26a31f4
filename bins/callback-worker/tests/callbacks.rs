//! callback-worker in-process on a real redis-server: a malformed task callback is
//! dead-lettered on its own, and the valid callbacks read in the same batch still apply; the
//! end of a council subtask's deliberation (its decision, or its timeout) is reported to a
//! Planning service.

use std::time::Duration;

use callback_worker::{App, Config};
use clap::Parser;
use fleet::Keys;
use fleet::council::Councils;
use fleet::deliberation::{DeliberationStore, Engine, EngineConfig};
use fleet::envelope::{
    Callback, CallbackBatch, Chunk, Envelope, PlanningEvent, Started, TaskResult,
};
use fleet::keys::GROUP_CALLBACK_WORKERS;
use fleet::planning::{PlanningRules, Subtask};
use fleet::session::Chat;
use fleet::stream::{groups, producer};
use fleet::task::TaskState;
use fleet::testing::PlanningServer;
use fleet::time::now_ms;
use fleet_test_support::eventually;
use fred::prelude::*;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

/// The plan of the planning events of these tests.
const PLAN: &str = "P-4";

struct Fixture {
    redis: String,
    client: Client,
    keys: Keys,
    chat: Chat,
}

/// A callback-worker running in this process.
struct Worker {
    shutdown: CancellationToken,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    async fn stop(self) {
        self.shutdown.cancel();
        self.running.await.unwrap().unwrap();
    }
}

impl Fixture {
    /// Starts a callback-worker on the fixture's Redis and prefix.
    async fn start_worker(&self) -> Worker {
        self.start_worker_with(&[]).await
    }

    /// Starts a callback-worker on the fixture's Redis and prefix, with `extra` flags.
    async fn start_worker_with(&self, extra: &[&str]) -> Worker {
        let args =
            fleet::testing::worker_args("callback-worker", &self.redis, self.keys.prefix(), extra);
        let app = App::build(Config::try_parse_from(args).expect("config"))
            .await
            .expect("callback-worker builds");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(app.run(shutdown.clone()));
        Worker { shutdown, running }
    }

    /// Deliberation steps on the fixture's Redis and prefix, without a Planning service (as a
    /// dispatcher's or a test's).
    fn engine(&self) -> Engine {
        Engine::new(
            DeliberationStore::new(
                self.client.clone(),
                self.keys.clone(),
                self.chat.tasks.retention().session_ttl_ms,
            ),
            Councils::new(self.client.clone(), self.keys.clone()),
            EngineConfig::default(),
        )
    }

    /// Starts the council subtask (ARCHITECT, 3 pool seats) of case `case`'s move into DESIGN
    /// as a dispatcher does, with its deadline `deadline_in_ms` after its start.
    async fn start_council_subtask(&self, case: &str, deadline_in_ms: i64) -> Subtask {
        let event = PlanningEvent {
            event_id: format!("AGILE:{case}:1"),
            event_type: "TRANSITION".into(),
            case_id: case.into(),
            plan_id: PLAN.into(),
            from_state: "DRAFT".into(),
            to_state: "DESIGN".into(),
            timestamp: "2026-01-01T10:00:00.000Z".into(),
            metadata: Json::Null,
        };
        let design = PlanningRules::builtin()
            .derive(&event, &[], &[])
            .into_iter()
            .find(|s| s.council > 0)
            .expect("DESIGN has a council subtask");
        let mut spec = design.deliberation_spec(now_ms());
        spec.deadline_ms = spec.created_ms + deadline_in_ms.max(1);
        self.engine().dispatch(&spec, "", false).await.unwrap();
        design
    }

    /// The events session `sid`'s log holds for task `tid`, `task_queued` left out, as
    /// `(message_type, data)`.
    async fn task_events(&self, sid: &str, tid: &str) -> Vec<(String, Json)> {
        fleet::testing::task_events(&self.client, &self.keys, sid, tid).await
    }
}

/// A session of agent `echo` with one submitted task, its id and the task's.
async fn session_with_task() -> (Fixture, String, String) {
    let redis = fleet_test_support::redis();
    let client = fleet::redis::connect(&redis).await.unwrap();
    let keys = Keys::new(&fleet_test_support::prefix());
    let chat = fleet::testing::echo_chat(&client, &keys).await;
    let (sid, mut tids) = fleet::testing::session_with_tasks(&chat, &["hello"]).await;
    let f = Fixture {
        redis,
        client,
        keys,
        chat,
    };
    (f, sid, tids.remove(0))
}

#[tokio::test]
async fn a_malformed_task_callback_is_dead_lettered_alone_and_its_session_still_applies() {
    let (f, sid, tid) = session_with_task().await;
    let (client, keys) = (&f.client, &f.keys);
    // Both entries are written before the worker starts, so it reads them in one batch: a chunk
    // without a task id, then the whole answer of the session's real task.
    let bad = producer::send(
        client,
        &keys.callbacks(),
        None,
        &Envelope::new(Callback::Chunk(Chunk {
            session_id: sid.clone(),
            task_id: String::new(),
            attempt: 1,
            seq: 2,
            index: 0,
            content: "lost".into(),
        })),
    )
    .await
    .unwrap();
    let good = CallbackBatch::new(vec![
        Callback::Started(Started {
            session_id: sid.clone(),
            task_id: tid.clone(),
            attempt: 1,
            seq: 1,
            executor: "test".into(),
        }),
        Callback::Result(TaskResult {
            session_id: sid.clone(),
            task_id: tid.clone(),
            attempt: 1,
            seq: 2,
            content: "hello".into(),
            metadata: Json::Null,
        }),
    ])
    .unwrap();
    producer::send(
        client,
        &keys.callbacks(),
        None,
        &Envelope::new(Callback::Batch(good)),
    )
    .await
    .unwrap();

    let worker = f.start_worker().await;

    // The default claim_idle (30 s) is past this wait: a retried batch would not come back in
    // time, so the task completes on the first delivery or not at all.
    let task = eventually(Duration::from_secs(10), "the task completed", || async {
        let t = f.chat.tasks.get(&sid, &tid).await.unwrap()?;
        (t.state() == Some(TaskState::Completed)).then_some(t)
    })
    .await;
    assert_eq!(task.result.as_deref(), Some("hello"));

    let g = eventually(Duration::from_secs(5), "both entries acked", || async {
        let g = groups::group(client, &keys.callbacks(), GROUP_CALLBACK_WORKERS)
            .await
            .unwrap()?;
        (g.pending == 0).then_some(g)
    })
    .await;
    assert_eq!(g.lag, Some(0));
    // The dead letter is written before its entry is acked.
    let letters: Value = client.xrange(keys.dlq(), "-", "+", None).await.unwrap();
    let letters = fleet::stream::entry::parse_entries(letters).unwrap();
    assert_eq!(letters.len(), 1, "only the malformed callback: {letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.get_str("entry_id").unwrap(), bad.to_string());
    assert_eq!(letter.get_str("deliveries").unwrap(), "1");
    let reason = letter.get_str("reason").unwrap();
    assert!(
        reason.contains("chunk") && reason.contains("task_id"),
        "the reason names the field: {reason}"
    );

    worker.stop().await;
}

#[tokio::test]
async fn an_unordered_callback_written_twice_under_one_entry_id_streams_once() {
    let (f, sid, tid) = session_with_task().await;
    let (client, keys) = (&f.client, &f.keys);
    // A NATS runner's unordered chunk, whose entry comes again (a redelivery after it applied:
    // same envelope id), then its unordered answer.
    let chunk = Envelope::new(Callback::Chunk(Chunk {
        session_id: sid.clone(),
        task_id: tid.clone(),
        attempt: 1,
        seq: 0,
        index: 0,
        content: "hel".into(),
    }));
    let answer = Envelope::new(Callback::Result(TaskResult {
        session_id: sid.clone(),
        task_id: tid.clone(),
        attempt: 1,
        seq: 0,
        content: "hello".into(),
        metadata: Json::Null,
    }));
    for env in [&chunk, &chunk] {
        producer::send(client, &keys.callbacks(), None, env)
            .await
            .unwrap();
    }

    let worker = f.start_worker().await;
    eventually(
        Duration::from_secs(10),
        "both chunk entries acked",
        || async {
            let g = groups::group(client, &keys.callbacks(), GROUP_CALLBACK_WORKERS)
                .await
                .unwrap()?;
            (g.pending == 0 && g.lag == Some(0)).then_some(())
        },
    )
    .await;
    producer::send(client, &keys.callbacks(), None, &answer)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the task completed", || async {
        let t = f.chat.tasks.get(&sid, &tid).await.unwrap()?;
        (t.state() == Some(TaskState::Completed)).then_some(t)
    })
    .await;

    let kinds: Vec<String> = f
        .task_events(&sid, &tid)
        .await
        .into_iter()
        .map(|(kind, _)| kind)
        .filter(|kind| kind.starts_with("chat_"))
        .collect();
    assert_eq!(kinds, ["chat_streaming", "chat_response"], "the chunk once");

    worker.stop().await;
}

#[tokio::test]
async fn a_run_again_from_the_start_replaces_what_the_earlier_run_streamed() {
    let (f, sid, tid) = session_with_task().await;
    let (client, keys) = (&f.client, &f.keys);
    let started = |attempt| {
        Callback::Started(Started {
            session_id: sid.clone(),
            task_id: tid.clone(),
            attempt,
            seq: 1,
            executor: format!("run-{attempt}"),
        })
    };
    let chunk = |attempt, content: &str| {
        Callback::Chunk(Chunk {
            session_id: sid.clone(),
            task_id: tid.clone(),
            attempt,
            seq: 2,
            index: 0,
            content: content.into(),
        })
    };
    // The first run streamed a chunk and died; a peer runs the task again as attempt 2 (its
    // answer differs), while a late callback of the first run still comes in.
    let result = Callback::Result(TaskResult {
        session_id: sid.clone(),
        task_id: tid.clone(),
        attempt: 2,
        seq: 3,
        content: "hi there".into(),
        metadata: Json::Null,
    });
    let late = Callback::Result(TaskResult {
        session_id: sid.clone(),
        task_id: tid.clone(),
        attempt: 1,
        seq: 3,
        content: "hello".into(),
        metadata: Json::Null,
    });
    let entries = [
        started(1),
        chunk(1, "hel"),
        started(2),
        chunk(2, "hi there"),
        late,
        result,
    ];
    for cb in entries {
        producer::send(client, &keys.callbacks(), None, &Envelope::new(cb))
            .await
            .unwrap();
    }

    let worker = f.start_worker().await;
    let task = eventually(Duration::from_secs(10), "the task completed", || async {
        let t = f.chat.tasks.get(&sid, &tid).await.unwrap()?;
        (t.state() == Some(TaskState::Completed)).then_some(t)
    })
    .await;
    assert_eq!(task.result.as_deref(), Some("hi there"));
    assert_eq!(task.attempt, 2);

    let events = f.task_events(&sid, &tid).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "chat_streaming",
            "task_restarted",
            "chat_streaming",
            "chat_response"
        ]
    );
    assert_eq!(events[0].1["content"], "hel");
    assert_eq!(events[2].1["content"], "hi there");
    assert_eq!(events[3].1["content"], "hi there");

    worker.stop().await;
}

#[tokio::test]
async fn a_timeout_a_stopped_sweeper_did_not_fan_out_reaches_the_gateways_with_the_next_sweep() {
    use callback_worker::Sweeper;
    use fleet::events::ServerMessage;
    use fleet::session_log::{FanoutConfig, FanoutEntry, PublishOrder, SessionLog};
    use fleet::task::TaskOp;

    let (f, sid, tid) = session_with_task().await;
    let (client, keys) = (&f.client, &f.keys);
    let log = SessionLog::new(client.clone(), keys.clone(), FanoutConfig::default());
    let sweeper = Sweeper {
        tasks: f.chat.tasks.clone(),
        log: log.clone(),
        order: PublishOrder::new(),
        engine: f.engine(),
        planning: None,
        every: Duration::from_millis(10),
    };
    // The task is overdue.
    let _: () = client
        .zadd(
            keys.deadlines(),
            Some(SetOptions::XX),
            None,
            false,
            false,
            (1.0, format!("{sid}/{tid}")),
        )
        .await
        .unwrap();
    // A sweeper ended it and stopped before its fan-out: the task is timed out in the log, the
    // gateways were not told, and its deadline is still in the set.
    let message = "the task did not finish before its deadline";
    let ev = ServerMessage::chat_error(&sid, &tid, None, "timed_out", message, &Json::Null);
    let op = TaskOp::end("timeout", &tid, "timed_out", message, ev.to_json());
    let ended = f.chat.tasks.apply(&sid, &[op]).await.unwrap();
    let timed_out = ended.events[0].event_id.parse().unwrap();
    let shard = log.fanout_key(&sid);
    let before: Value = client.xrange(&shard, "-", "+", None).await.unwrap();
    assert!(
        fleet::stream::entry::parse_entries(before)
            .unwrap()
            .iter()
            .flat_map(FanoutEntry::parse_all)
            .all(|e| e.session_id != sid),
        "nothing fanned out yet"
    );

    // The next sweep finds the task ended: it tells the gateways where the session's log is.
    sweeper.sweep().await.unwrap();
    let entries: Value = client.xrange(&shard, "-", "+", None).await.unwrap();
    let fanned: Vec<FanoutEntry> = fleet::stream::entry::parse_entries(entries)
        .unwrap()
        .iter()
        .flat_map(FanoutEntry::parse_all)
        .filter(|e| e.session_id == sid)
        .collect();
    assert_eq!(
        fanned.last().map(|e| e.event_id),
        Some(timed_out),
        "a gateway learns of the timeout: {fanned:?}"
    );
    let member: Option<f64> = client
        .zscore(keys.deadlines(), format!("{sid}/{tid}"))
        .await
        .unwrap();
    assert_eq!(member, None);
}

/// Member `member`'s proposal for council subtask `s`, whose lint scores `lint` (the rest pass).
fn proposal(s: &Subtask, member: &str, lint: f64) -> Envelope<Callback> {
    Envelope::new(Callback::Proposal(fleet::testing::proposal(
        &s.task_id, member, 1, lint,
    )))
}

#[tokio::test]
async fn a_council_subtask_is_reported_completed_with_the_winner_and_one_out_of_time_timed_out() {
    let (f, _, _) = session_with_task().await;
    let mut planning = PlanningServer::start().await;
    let worker = f
        .start_worker_with(&[
            "--planning-addr",
            &planning.addr,
            "--sweep-interval-ms",
            "20",
        ])
        .await;
    let design = f.start_council_subtask("US-41", 60_000).await;
    for (member, lint) in [
        ("ARCHITECT-1", 0.5),
        ("ARCHITECT-2", 1.0),
        ("ARCHITECT-3", 0.7),
    ] {
        producer::send(
            &f.client,
            &f.keys.callbacks(),
            None,
            &proposal(&design, member, lint),
        )
        .await
        .unwrap();
    }

    // The last proposal completes the round; the best scored wins (no architect step).
    let u = planning.next_update().await;
    assert_eq!(u.task_id, design.task_id);
    assert_eq!(
        (u.status.as_str(), u.result.as_str()),
        ("COMPLETED", "ARCHITECT-2 r1")
    );
    assert_eq!(
        (u.case_id.as_str(), u.plan_id.as_str(), u.role.as_str()),
        ("US-41", PLAN, "ARCHITECT")
    );
    let decided = f
        .engine()
        .store
        .get(&design.task_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(decided.winner.as_deref(), Some("ARCHITECT-2"));

    // A council nobody answers before its deadline: the sweeper times it out, and that is the
    // next report (the decision is not reported again).
    let late = f.start_council_subtask("US-42", 1).await;
    let u = planning.next_update().await;
    assert_eq!(u.task_id, late.task_id);
    assert_eq!(u.status, "TIMED_OUT");
    assert!(u.result.contains("deadline"), "{}", u.result);
    assert_eq!(
        (u.case_id.as_str(), u.role.as_str()),
        ("US-42", "ARCHITECT")
    );

    worker.stop().await;
}
