//! Deliberation RPCs against edge-api in-process (no dispatcher, no agents): what a refused call
//! leaves behind (nothing), and how a stream ends when its event log is gone.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Parser;
use edge_api::{App, Config};
use fleet::council::Councils;
use fleet::deliberation::store::DeliberationStore;
use fleet::deliberation::{DeliberationSpec, Engine, EngineConfig, kind};
use fleet::envelope::{ProposalCallback, TaskCommand};
use fleet::time::now_ms;
use fleet_proto::orchestrator::v1 as pb;
use fleet_proto::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient;
use fred::prelude::*;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

/// edge-api with its gRPC address known, and what the tests read Redis with.
struct GrpcApp {
    grpc: OrchestratorServiceClient<Channel>,
    redis: Client,
    keys: fleet::Keys,
    prefix: String,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
}

async fn spawn(extra: &[&str]) -> GrpcApp {
    let prefix = fleet_test_support::prefix();
    let mut args = vec!["--secret", common::SECRET, "--grpc-addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let cfg = Config::try_parse_from(common::args(&prefix, &args)).expect("test config parses");
    let app = App::build(cfg).await.expect("edge-api builds");
    let addr = app.grpc_addr();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect gRPC");
    let redis = fleet::redis::connect(&fleet_test_support::redis())
        .await
        .expect("test redis client");
    GrpcApp {
        grpc: OrchestratorServiceClient::new(channel),
        redis,
        keys: fleet::Keys::new(&prefix),
        prefix,
        shutdown,
        server,
    }
}

impl GrpcApp {
    async fn stop(self) {
        drop(self.grpc);
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.server)
            .await
            .expect("run() returns within 5s of the cancel")
            .expect("run() does not panic")
            .expect("run() returns Ok");
    }

    /// Every key under the app's prefix.
    async fn keys_written(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut cursor = "0".to_owned();
        loop {
            let (next, page): (String, Vec<String>) = self
                .redis
                .scan_page(cursor, format!("{}:*", self.prefix), Some(1000), None)
                .await
                .unwrap();
            out.extend(page);
            if next == "0" {
                return out;
            }
            cursor = next;
        }
    }

    async fn task_commands(&self) -> Vec<TaskCommand> {
        let raw: Value = self
            .redis
            .xrange(self.keys.tasks(), "-", "+", None)
            .await
            .unwrap();
        fleet::stream::entry::parse_entries(raw)
            .unwrap()
            .iter()
            .map(|e| {
                fleet::envelope::Envelope::<TaskCommand>::from_fields(&e.fields)
                    .unwrap()
                    .msg
            })
            .collect()
    }

    async fn exists(&self, key: String) -> bool {
        let n: i64 = self.redis.exists(key).await.unwrap();
        n > 0
    }

    /// The engine the dispatcher and callback-worker would run, on the app's keys.
    fn engine(&self) -> Engine {
        Engine::new(
            DeliberationStore::new(self.redis.clone(), self.keys.clone(), 3_600_000),
            Councils::new(self.redis.clone(), self.keys.clone()),
            EngineConfig::default(),
        )
    }
}

fn deliberate(task_id: &str, n: i32) -> pb::DeliberateRequest {
    pb::DeliberateRequest {
        task_id: task_id.into(),
        task_description: "Implement authentication for the API".into(),
        role: "DEV".into(),
        num_agents: n,
        constraints: Some(pb::DeliberationConstraints {
            timeout_seconds: 600,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_call_refused_for_want_of_a_waiter_slot_has_started_nothing() {
    let mut app = spawn(&["--grpc-max-waiters", "1"]).await;
    // A stream holds the only slot once it has answered.
    let mut holder = app
        .grpc
        .stream_deliberation(deliberate("holder", 3))
        .await
        .expect("the first call gets the slot")
        .into_inner();
    let first = holder.message().await.unwrap().expect("the pending update");
    assert_eq!(first.status, pb::UpdateStatus::Pending as i32);

    let err = app
        .grpc
        .deliberate(deliberate("late", 3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limit 1"), "{}", err.message());
    let err = app
        .grpc
        .orchestrate(pb::OrchestrateRequest {
            task_id: "late-o".into(),
            task_description: "Split the billing monolith".into(),
            role: "DEV".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // Refused before anything was written: no deliberation, no command for the dispatchers.
    for id in ["late", "late-o"] {
        assert!(
            !app.exists(app.keys.deliberation(id)).await,
            "no deliberation `{id}`"
        );
        assert!(!app.exists(app.keys.deliberation_events(id)).await);
    }
    let ids: Vec<String> = app
        .task_commands()
        .await
        .into_iter()
        .map(|c| match c {
            TaskCommand::Deliberate(s) => s.deliberation_id,
            other => panic!("unexpected command {other:?}"),
        })
        .collect();
    assert_eq!(ids, ["holder"]);
    drop(holder);
    app.stop().await;
}

#[tokio::test]
async fn a_stream_whose_event_log_is_gone_ends_with_the_stored_result() {
    let mut app = spawn(&[]).await;
    let engine = app.engine();
    let now = now_ms();
    let spec = DeliberationSpec {
        deliberation_id: "gone".into(),
        kind: kind::DELIBERATE.into(),
        role: "DEV".into(),
        description: "Implement authentication for the API".into(),
        num_agents: 1,
        quorum: 1,
        rounds: 1,
        deadline_ms: now + 600_000,
        created_ms: now,
        ..Default::default()
    };
    engine.accept(&spec).await.unwrap();
    engine.dispatch(&spec, "", false).await.unwrap();
    engine
        .on_proposal(
            &ProposalCallback {
                deliberation_id: "gone".into(),
                member: "DEV-1".into(),
                round: 1,
                agent_id: "proc-1".into(),
                content: "use JWTs".into(),
                checks: Default::default(),
                self_score: None,
                metadata: serde_json::Value::Null,
            },
            false,
        )
        .await
        .unwrap();
    // The log expired (or was trimmed) before the stream came; the record still says how it ended.
    let _: i64 = app
        .redis
        .del(app.keys.deliberation_events("gone"))
        .await
        .unwrap();

    let mut stream = app
        .grpc
        .stream_deliberation(deliberate("gone", 1))
        .await
        .unwrap()
        .into_inner();
    // Only a guard against a hang: the stream ends after its first empty read.
    let updates = tokio::time::timeout(Duration::from_secs(30), async {
        let mut out = Vec::new();
        while let Some(u) = stream.message().await.unwrap() {
            out.push(u);
        }
        out
    })
    .await
    .expect("the stream ends: the stored record is final");
    assert_eq!(updates.len(), 1, "{updates:?}");
    let last = &updates[0];
    assert_eq!(last.status, pb::UpdateStatus::Complete as i32);
    assert_eq!(last.progress_percent, 100);
    assert_eq!(last.winner_id, "gone:1:DEV-1");
    assert_eq!(last.results.len(), 1);
    assert_eq!(last.results[0].content, "use JWTs");
    assert!(last.event_id.is_empty(), "not an entry of the log");
    assert!(last.current_step.contains("DEV-1 wins"), "{last:?}");
    app.stop().await;
}

#[tokio::test]
async fn oversized_or_badly_named_fields_get_invalid_argument_and_change_nothing() {
    let mut app = spawn(&[]).await;
    let before = app.keys_written().await;
    let valid = || deliberate("bad-1", 3);
    let constraints = |c: pb::DeliberationConstraints| {
        Some(pb::DeliberationConstraints {
            timeout_seconds: 600,
            ..c
        })
    };
    let metadata = |k: String, v: String| {
        constraints(pb::DeliberationConstraints {
            metadata: [(k, v)].into(),
            ..Default::default()
        })
    };
    let cases: Vec<(pb::DeliberateRequest, &str)> = vec![
        (
            pb::DeliberateRequest {
                constraints: constraints(pb::DeliberationConstraints {
                    rubric: Some(pb::Rubric {
                        description: "r".repeat(4097),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..valid()
            },
            "rubric description is 4097 bytes; the limit is 4096",
        ),
        (
            pb::DeliberateRequest {
                constraints: constraints(pb::DeliberationConstraints {
                    rubric: Some(pb::Rubric {
                        weights: [("policy".into(), 0.0), ("lint".into(), 0.0)].into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..valid()
            },
            "rubric weights are all 0",
        ),
        (
            pb::DeliberateRequest {
                constraints: metadata("has space".into(), "v".into()),
                ..valid()
            },
            "metadata key `has space` must be 1-128 characters",
        ),
        (
            pb::DeliberateRequest {
                constraints: metadata("k".repeat(129), "v".into()),
                ..valid()
            },
            "metadata key `kkkk",
        ),
        (
            pb::DeliberateRequest {
                constraints: metadata("notes".into(), "v".repeat(4097)),
                ..valid()
            },
            "metadata value of `notes` is 4097 bytes; the limit is 4096",
        ),
        (
            pb::DeliberateRequest {
                constraints: metadata("notes".into(), "v".repeat(1 << 20)),
                ..valid()
            },
            "metadata value of `notes` is 1048576 bytes; the limit is 4096",
        ),
    ];
    for (req, want) in cases {
        for stream in [false, true] {
            let err = if stream {
                app.grpc
                    .stream_deliberation(req.clone())
                    .await
                    .map(|_| ())
                    .unwrap_err()
            } else {
                app.grpc
                    .deliberate(req.clone())
                    .await
                    .map(|_| ())
                    .unwrap_err()
            };
            assert_eq!(err.code(), Code::InvalidArgument, "{want}: {err:?}");
            assert!(
                err.message().contains(want),
                "`{}` should say `{want}`",
                err.message()
            );
        }
    }
    let orchestrate = |k: &str, v: String| pb::OrchestrateRequest {
        task_id: "bad-o".into(),
        task_description: "Split the billing monolith".into(),
        role: "DEV".into(),
        constraints: constraints(Default::default()),
        options: Some(pb::OrchestrationOptions {
            custom_params: [(k.to_owned(), v)].into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    for (req, want) in [
        (
            orchestrate("a/b", "v".into()),
            "custom_params key `a/b` must be 1-128 characters",
        ),
        (
            orchestrate("language", "v".repeat(4097)),
            "custom_params value of `language` is 4097 bytes; the limit is 4096",
        ),
    ] {
        let err = app.grpc.orchestrate(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{want}: {err:?}");
        assert!(
            err.message().contains(want),
            "`{}` should say `{want}`",
            err.message()
        );
    }
    // Nothing was written: no command, no deliberation.
    assert!(app.task_commands().await.is_empty());
    assert_eq!(app.keys_written().await, before, "nothing written");
    app.stop().await;
}

#[tokio::test]
async fn the_same_task_id_with_another_spec_is_already_exists_and_starts_nothing() {
    let mut app = spawn(&[]).await;
    // The first call creates it (a stream, so the call returns at once).
    let mut first = app
        .grpc
        .stream_deliberation(deliberate("dup", 3))
        .await
        .expect("the first call starts it")
        .into_inner();
    let pending = first.message().await.unwrap().expect("the pending update");
    assert_eq!(pending.status, pb::UpdateStatus::Pending as i32);

    // The same request again attaches to it: a `Deliberate` waits on it until its own deadline.
    let mut retry = tonic::Request::new(deliberate("dup", 3));
    retry.set_timeout(Duration::from_millis(1_000));
    let err = app.grpc.deliberate(retry).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "attached: {err:?}");
    assert!(err.message().contains("still pending"), "{}", err.message());

    let hash_before: std::collections::HashMap<String, String> = app
        .redis
        .hgetall(app.keys.deliberation("dup"))
        .await
        .unwrap();
    let commands_before = app.task_commands().await;
    let events_before: u64 = app
        .redis
        .xlen(app.keys.deliberation_events("dup"))
        .await
        .unwrap();

    // Another spec under the id, through every front door: refused before anything is written.
    let changed = |f: fn(&mut pb::DeliberateRequest)| {
        let mut r = deliberate("dup", 3);
        f(&mut r);
        r
    };
    let others = [
        changed(|r| r.task_description = "Delete the test suite".into()),
        changed(|r| r.num_agents = 5),
        changed(|r| r.role = "QA".into()),
        changed(|r| r.rounds = 2),
        changed(|r| {
            r.constraints = Some(pb::DeliberationConstraints {
                timeout_seconds: 600,
                rubric: Some(pb::Rubric {
                    description: "security first".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
        }),
    ];
    // (A deadline on each call: one wrongly attached would wait for the deliberation's end.)
    let bounded = |req: pb::DeliberateRequest| {
        let mut req = tonic::Request::new(req);
        req.set_timeout(Duration::from_secs(5));
        req
    };
    for req in others {
        for stream in [false, true] {
            let err = if stream {
                app.grpc
                    .stream_deliberation(bounded(req.clone()))
                    .await
                    .map(|_| ())
                    .unwrap_err()
            } else {
                app.grpc
                    .deliberate(bounded(req.clone()))
                    .await
                    .map(|_| ())
                    .unwrap_err()
            };
            assert_eq!(err.code(), Code::AlreadyExists, "{req:?}: {err:?}");
            assert!(
                err.message().contains("`dup`") && err.message().contains("spec differs"),
                "{}",
                err.message()
            );
        }
    }
    // An orchestration is another request too, even with the same task.
    let mut orchestrate = tonic::Request::new(pb::OrchestrateRequest {
        task_id: "dup".into(),
        task_description: "Implement authentication for the API".into(),
        role: "DEV".into(),
        constraints: Some(pb::DeliberationConstraints {
            timeout_seconds: 600,
            ..Default::default()
        }),
        options: Some(pb::OrchestrationOptions {
            num_agents: 3,
            ..Default::default()
        }),
        ..Default::default()
    });
    orchestrate.set_timeout(Duration::from_secs(5));
    let err = app.grpc.orchestrate(orchestrate).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    // Nothing changed: the stored deliberation, its log, the commands to the dispatchers (the
    // first call's and the retry's, each with the stored spec).
    let hash_after: std::collections::HashMap<String, String> = app
        .redis
        .hgetall(app.keys.deliberation("dup"))
        .await
        .unwrap();
    assert_eq!(hash_after, hash_before);
    let events_after: u64 = app
        .redis
        .xlen(app.keys.deliberation_events("dup"))
        .await
        .unwrap();
    assert_eq!(events_after, events_before);
    let commands = app.task_commands().await;
    assert_eq!(commands.len(), commands_before.len());
    assert_eq!(commands.len(), 2, "{commands:?}");
    let stored = app.engine().store.get("dup").await.unwrap().unwrap().spec;
    for c in commands {
        let TaskCommand::Deliberate(s) = c else {
            panic!("unexpected command {c:?}")
        };
        assert_eq!(s, stored);
    }
    assert_eq!(stored.description, "Implement authentication for the API");
    assert_eq!(stored.num_agents, 3);
    drop(first);
    app.stop().await;
}
