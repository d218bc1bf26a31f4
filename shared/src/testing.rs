//! Fixtures for the tests of this crate and of the binaries built on it (feature `testing`,
//! which only dev-dependencies enable): a chat front door with one echo agent, and a session of
//! it with submitted tasks, as the tests of task state, the callback-worker and the dispatcher
//! each start from; a deliberation engine on a fresh prefix ([`DeliberationFixture`]); a Planning
//! service that records what it is told ([`PlanningServer`]).

use std::time::Duration;

use fleet_proto::planning::v1::planning_service_server::{PlanningService, PlanningServiceServer};
use fleet_proto::planning::v1::{UpdateTaskRequest, UpdateTaskResponse};
use fred::prelude::Client;
use serde_json::Value as Json;
use tokio::sync::mpsc;

use crate::Keys;
use crate::agent::{AgentConfig, AgentStore, DEFAULT_POOL};
use crate::council::Councils;
use crate::deliberation::{Check, Checks, DeliberationStore, Engine, EngineConfig};
use crate::envelope::{Envelope, Message, ProposalCallback};
use crate::session::{Chat, ChatLimits, InitSession, SubmitMessage, TokenSigner};
use crate::session_log::{FanoutConfig, SessionLog};
use crate::stream::entry::parse_entries;
use crate::task::{Retention, TaskStore};

/// The agent [`echo_chat`] registers, in pool [`DEFAULT_POOL`].
pub const ECHO_AGENT: &str = "echo";

/// A chat front door on `client` under `keys` with the default limits and retention, and
/// agent [`ECHO_AGENT`] registered.
pub async fn echo_chat(client: &Client, keys: &Keys) -> Chat {
    let agents = AgentStore::new(client.clone(), keys.clone());
    agents
        .put(&AgentConfig {
            id: ECHO_AGENT.into(),
            name: "Echo".into(),
            pool: DEFAULT_POOL.into(),
            role: None,
            tenant_id: None,
            timeout_secs: None,
            params: Json::Null,
        })
        .await
        .expect("register the echo agent");
    Chat {
        tasks: TaskStore::new(client.clone(), keys.clone(), Retention::default()),
        agents,
        tokens: TokenSigner::new(b"0123456789abcdef0123456789abcdef"),
        limits: ChatLimits::default(),
        backpressure: Default::default(),
    }
}

/// Opens a session of [`ECHO_AGENT`] on `chat` and submits each of `messages` to it, as REST
/// does: the session id and the task ids, in order.
pub async fn session_with_tasks(chat: &Chat, messages: &[&str]) -> (String, Vec<String>) {
    let sid = chat
        .init_session(InitSession {
            agent_id: ECHO_AGENT.into(),
            ..Default::default()
        })
        .await
        .expect("open a session")
        .session_id;
    let mut tids = Vec::with_capacity(messages.len());
    for message in messages {
        let t = chat
            .submit(
                &sid,
                SubmitMessage {
                    message: (*message).into(),
                    source: "rest",
                    ..Default::default()
                },
            )
            .await
            .expect("submit a task");
        tids.push(t.task_id);
    }
    (sid, tids)
}

/// The events session `sid`'s log holds for task `tid`, its `task_queued` left out, as
/// `(message_type, data)`, oldest first.
pub async fn task_events(
    client: &Client,
    keys: &Keys,
    sid: &str,
    tid: &str,
) -> Vec<(String, Json)> {
    SessionLog::new(client.clone(), keys.clone(), FanoutConfig::default())
        .replay_after(sid, None, None, 1000)
        .await
        .expect("read the session log")
        .iter()
        .filter(|e| e.task_id == tid)
        .map(|e| {
            let v: Json = serde_json::from_str(&e.json).expect("a logged event is JSON");
            let kind = v["message_type"].as_str().unwrap_or_default().to_owned();
            (kind, v["data"].clone())
        })
        .filter(|(kind, _)| kind != "task_queued")
        .collect()
}

/// The arguments that start worker binary `name` in a test on Redis `redis_url` under key
/// prefix `prefix`: admin on an ephemeral port, reads blocking 100 ms, then `extra`.
pub fn worker_args(name: &str, redis_url: &str, prefix: &str, extra: &[&str]) -> Vec<String> {
    let base = [
        name,
        "--redis-url",
        redis_url,
        "--prefix",
        prefix,
        "--admin-addr",
        "127.0.0.1:0",
        "--block-ms",
        "100",
    ];
    base.iter().chain(extra).map(|a| (*a).to_owned()).collect()
}

/// A deliberation engine (default config, 1 h TTL) on Redis `client` under `keys`, as the
/// deliberation tests drive it step by step.
pub struct DeliberationFixture {
    pub client: Client,
    pub keys: Keys,
    pub engine: Engine,
}

impl DeliberationFixture {
    /// Connects to `redis_url` and makes the engine under key prefix `prefix`.
    pub async fn start(redis_url: &str, prefix: &str) -> DeliberationFixture {
        let client = crate::redis::connect(redis_url)
            .await
            .expect("test redis client");
        let keys = Keys::new(prefix);
        let engine = Engine::new(
            DeliberationStore::new(client.clone(), keys.clone(), 3_600_000),
            Councils::new(client.clone(), keys.clone()),
            EngineConfig::default(),
        );
        DeliberationFixture {
            client,
            keys,
            engine,
        }
    }

    /// The messages of `stream`, oldest first.
    pub async fn entries<M: Message>(&self, stream: &str) -> Vec<M> {
        use fred::prelude::StreamsInterface;
        let reply: fred::types::Value = self
            .client
            .xrange(stream, "-", "+", None)
            .await
            .expect("XRANGE");
        parse_entries(reply)
            .expect("stream entries")
            .iter()
            .map(|e| {
                Envelope::<M>::from_fields(&e.fields)
                    .expect("an envelope")
                    .msg
            })
            .collect()
    }
}

/// Member `member`'s proposal for round `round` of deliberation `id` (content `<member>
/// r<round>`), whose lint check scores `lint` while policy and dry run pass.
pub fn proposal(id: &str, member: &str, round: u32, lint: f64) -> ProposalCallback {
    ProposalCallback {
        deliberation_id: id.into(),
        member: member.into(),
        round,
        agent_id: format!("proc-{member}"),
        content: format!("{member} r{round}"),
        checks: Checks {
            policy: Some(Check::pass(1.0, "")),
            lint: Some(Check::pass(lint, "")),
            dry_run: Some(Check::pass(1.0, "")),
            ..Default::default()
        },
        self_score: None,
        metadata: Json::Null,
    }
}

/// How long [`PlanningServer::next_update`] waits for a report before failing the test.
const UPDATE_WAIT: Duration = Duration::from_secs(15);

/// A `planning.v1.PlanningService` on a free port of this process that records every
/// `UpdateTask` in order, for the tests of the binaries that report subtask ends: start one,
/// pass [`PlanningServer::addr`] as `--planning-addr`, then await the reports. Stops serving
/// when dropped.
pub struct PlanningServer {
    /// Its address (`127.0.0.1:<port>`).
    pub addr: String,
    updates: mpsc::UnboundedReceiver<UpdateTaskRequest>,
    serving: tokio::task::JoinHandle<()>,
}

/// The service behind [`PlanningServer`]: hands each request to the test.
struct RecordingPlanning(mpsc::UnboundedSender<UpdateTaskRequest>);

#[tonic::async_trait]
impl PlanningService for RecordingPlanning {
    async fn update_task(
        &self,
        req: tonic::Request<UpdateTaskRequest>,
    ) -> Result<tonic::Response<UpdateTaskResponse>, tonic::Status> {
        // The test may have finished reading: a report nobody awaits is not an error.
        let _ = self.0.send(req.into_inner());
        Ok(tonic::Response::new(UpdateTaskResponse { ok: true }))
    }
}

impl PlanningServer {
    /// Serves on `127.0.0.1`, on a free port.
    pub async fn start() -> PlanningServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free port");
        let addr = listener.local_addr().expect("a bound address").to_string();
        let (tx, updates) = mpsc::unbounded_channel();
        let router = tonic::transport::Server::builder()
            .add_service(PlanningServiceServer::new(RecordingPlanning(tx)));
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let serving = tokio::spawn(async move {
            router
                .serve_with_incoming(incoming)
                .await
                .expect("the test Planning service serves");
        });
        PlanningServer {
            addr,
            updates,
            serving,
        }
    }

    /// The next `UpdateTask` it is told; fails the test when none comes within 15 s.
    pub async fn next_update(&mut self) -> UpdateTaskRequest {
        tokio::time::timeout(UPDATE_WAIT, self.updates.recv())
            .await
            .expect("an UpdateTask within 15 s")
            .expect("the test Planning service is running")
    }

    /// The next `n` `UpdateTask`s, in the order they came.
    pub async fn next_updates(&mut self, n: usize) -> Vec<UpdateTaskRequest> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_update().await);
        }
        out
    }
}

impl Drop for PlanningServer {
    fn drop(&mut self) {
        self.serving.abort();
    }
}
