//! Harness for cross-binary tests: a whole fleet on one fresh key prefix of the test's
//! redis-server, either in-process ([`Fleet::start`]) or as processes ([`ProcessFleet`]).

pub mod deliberation;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use fleet::Keys;
use fleet::agent::{AgentConfig, AgentStore};
use fleet::events::ServerMessage;
use fleet::session::{Chat, ChatLimits, InitSession, NewSession, SubmitMessage, TokenSigner};
use fleet::session_log::{FanoutConfig, SessionLog};
use fleet::stream::entry::{StreamId, parse_read};
use fleet::task::{Retention, TaskStore};
use fred::prelude::*;
use serde_json::Value as Json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The session-token secret every test fleet uses.
pub const SECRET: &str = "e2e-secret-0123456789abcdef-0123456789";

/// The echo agent every test fleet has.
pub const AGENT: &str = "echo";

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Milliseconds between echoed words.
    pub echo_delay_ms: u64,
    /// Claim idle bound of every consumer, in ms (short in tests so takeovers are quick).
    pub claim_idle_ms: u64,
    /// Start edge-api and ws-gateway too.
    pub front_doors: bool,
    /// Start a dispatcher, a callback-worker and an exec-worker in-process (tests that run the
    /// workers as processes turn this off).
    pub workers: bool,
    /// Front doors (and [`Fleet::chat`]) send a chat task straight to its pool; off, through
    /// the dispatchers (`--direct-dispatch`).
    pub direct_dispatch: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            echo_delay_ms: 0,
            claim_idle_ms: 2_000,
            front_doors: true,
            workers: true,
            direct_dispatch: true,
        }
    }
}

/// `--redis-url` and `--prefix`: the Redis and key prefix of a test fleet, the first arguments
/// of each of its binaries.
pub fn redis_args(redis: &str, prefix: &str) -> Vec<String> {
    vec![
        "--redis-url".into(),
        redis.into(),
        "--prefix".into(),
        prefix.into(),
    ]
}

/// Arguments every binary of a test fleet shares: [`redis_args`], admin routes on a free port,
/// a 10 s shutdown grace. (Not `fleet::testing::worker_args` plus a flag: that one also sets
/// `--block-ms`, which the front doors do not take and some tests here set themselves.)
pub fn common_args(redis: &str, prefix: &str) -> Vec<String> {
    let mut args = redis_args(redis, prefix);
    args.extend(["--admin-addr", "127.0.0.1:0", "--shutdown-grace-secs", "10"].map(String::from));
    args
}

/// [`common_args`] for binary `name` run as a process: edge-api serves its admin routes on its
/// REST port, so it is given no `--admin-addr`.
pub fn process_args(name: &str, redis: &str, prefix: &str) -> Vec<String> {
    let mut args = common_args(redis, prefix);
    if name == "edge-api" {
        let at = args
            .iter()
            .position(|a| a == "--admin-addr")
            .expect("common args name an admin address");
        args.drain(at..at + 2);
    }
    args
}

/// A fleet running in this test process.
pub struct Fleet {
    pub redis_url: String,
    pub prefix: String,
    pub keys: Keys,
    pub client: Client,
    pub chat: Chat,
    pub log: SessionLog,
    pub edge: Option<SocketAddr>,
    pub gateway: Option<SocketAddr>,
    shutdown: CancellationToken,
    running: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

fn parse<C: Parser>(name: &str, args: Vec<String>) -> C {
    C::try_parse_from(std::iter::once(name.to_owned()).chain(args))
        .unwrap_or_else(|e| panic!("{name} config: {e}"))
}

impl Fleet {
    /// Starts a dispatcher, a callback-worker and an echo exec-worker (and the front doors when
    /// asked) on a fresh prefix, with the echo agent configured.
    pub async fn start(opts: Options) -> Fleet {
        let mut fleet = Fleet::harness(ChatLimits {
            direct_dispatch: opts.direct_dispatch,
            ..ChatLimits::default()
        })
        .await;
        let (redis_url, prefix) = (&fleet.redis_url, &fleet.prefix);
        let shutdown = fleet.shutdown.clone();
        let mut running = Vec::new();
        let common = common_args(redis_url, prefix);
        let claim = ["--claim-idle-ms".to_owned(), opts.claim_idle_ms.to_string()];

        if opts.workers {
            let cfg: dispatcher::Config =
                parse("dispatcher", [common.clone(), claim.to_vec()].concat());
            let app = dispatcher::App::build(cfg).await.expect("dispatcher");
            running.push(("dispatcher", tokio::spawn(app.run(shutdown.clone()))));

            let cfg: callback_worker::Config =
                parse("callback-worker", [common.clone(), claim.to_vec()].concat());
            let app = callback_worker::App::build(cfg)
                .await
                .expect("callback-worker");
            running.push(("callback-worker", tokio::spawn(app.run(shutdown.clone()))));

            let cfg: exec_worker::Config = parse(
                "exec-worker",
                [
                    common.clone(),
                    claim.to_vec(),
                    vec!["--echo-delay-ms".into(), opts.echo_delay_ms.to_string()],
                ]
                .concat(),
            );
            let app = exec_worker::App::build(cfg).await.expect("exec-worker");
            running.push(("exec-worker", tokio::spawn(app.run(shutdown.clone()))));
        }

        let (mut edge, mut gateway) = (None, None);
        if opts.front_doors {
            let secret = vec!["--secret".to_owned(), SECRET.to_owned()];
            let http = vec!["--http-addr".to_owned(), "127.0.0.1:0".to_owned()];
            let direct = vec![
                "--direct-dispatch".to_owned(),
                opts.direct_dispatch.to_string(),
            ];
            let base = [redis_args(redis_url, prefix), secret, http, direct].concat();

            // The gateway first, so that edge-api hands out its real address.
            let cfg: ws_gateway::Config = parse(
                "ws-gateway",
                [
                    base.clone(),
                    vec!["--admin-addr".into(), "127.0.0.1:0".into()],
                ]
                .concat(),
            );
            let app = ws_gateway::App::build(cfg).await.expect("ws-gateway");
            let gateway_addr = app.http_addr();
            gateway = Some(gateway_addr);
            running.push(("ws-gateway", tokio::spawn(app.run(shutdown.clone()))));

            let public = vec!["--public-ws-url".to_owned(), format!("ws://{gateway_addr}")];
            let cfg: edge_api::Config = parse("edge-api", [base, public].concat());
            let app = edge_api::App::build(cfg).await.expect("edge-api");
            edge = Some(app.http_addr());
            running.push(("edge-api", tokio::spawn(app.run(shutdown.clone()))));
        }

        fleet.edge = edge;
        fleet.gateway = gateway;
        fleet.running = running;
        fleet
    }

    /// The harness alone (Redis, prefix, agent, chat API, no component), for tests that run
    /// every component as a process.
    pub async fn start_without_workers() -> Fleet {
        Fleet::harness(ChatLimits::default()).await
    }

    /// A fresh prefix of the test's redis-server with the echo agent, and a chat API on it
    /// with `limits`; nothing running yet.
    async fn harness(limits: ChatLimits) -> Fleet {
        let redis_url = fleet_test_support::redis();
        let prefix = fleet_test_support::prefix();
        let client = fleet::redis::connect(&redis_url)
            .await
            .expect("connect redis");
        let keys = Keys::new(&prefix);
        let agents = AgentStore::new(client.clone(), keys.clone());
        agents.put(&echo_agent()).await.expect("seed agent");
        let chat = Chat {
            tasks: TaskStore::new(client.clone(), keys.clone(), Retention::default()),
            agents,
            tokens: TokenSigner::new(SECRET.as_bytes()),
            limits,
            backpressure: Default::default(),
        };
        let log = SessionLog::new(client.clone(), keys.clone(), FanoutConfig::default());
        Fleet {
            redis_url,
            prefix,
            keys,
            client,
            chat,
            log,
            edge: None,
            gateway: None,
            shutdown: CancellationToken::new(),
            running: Vec::new(),
        }
    }

    /// Stops every component and checks each one stopped cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for (name, handle) in self.running {
            let result = tokio::time::timeout(Duration::from_secs(15), handle)
                .await
                .unwrap_or_else(|_| panic!("{name} did not stop within 15s"));
            result
                .expect("component task")
                .unwrap_or_else(|e| panic!("{name} failed: {e:#}"));
        }
    }

    /// The REST base URL of edge-api.
    pub fn api(&self) -> String {
        format!("http://{}", self.edge.expect("front doors started"))
    }

    /// The base URL of ws-gateway (`ws://...`).
    pub fn ws(&self) -> String {
        format!("ws://{}", self.gateway.expect("front doors started"))
    }

    /// The HTTP base URL of ws-gateway (for SSE).
    pub fn sse(&self) -> String {
        format!("http://{}", self.gateway.expect("front doors started"))
    }

    /// Waits for the final event (`chat_response` or `chat_error`) of task `tid` in session
    /// `sid`'s log, reading the log as it grows. Returns every event of that task, in order.
    pub async fn task_events(&self, sid: &str, tid: &str, within: Duration) -> Vec<ServerMessage> {
        read_task_events(&self.client, &self.keys, sid, tid, within).await
    }

    /// Opens a session of `agent` through the chat API, as REST does (without HTTP).
    pub async fn open_session(&self, agent: &str) -> NewSession {
        self.chat
            .init_session(InitSession {
                agent_id: agent.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("open a session of {agent}: {e}"))
    }

    /// Submits `message` to session `sid` through the chat API, as REST does; returns the task
    /// id.
    pub async fn submit(&self, sid: &str, message: &str) -> String {
        self.chat
            .submit(
                sid,
                SubmitMessage {
                    message: message.into(),
                    source: "rest",
                    ..Default::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("submit to {sid}: {e}"))
            .task_id
    }

    /// Opens a session of `agent` ([`Fleet::open_session`]) and connects a WebSocket client to
    /// it through the fleet's ws-gateway.
    pub async fn watched_session(&self, agent: &str) -> (NewSession, WsClient) {
        let s = self.open_session(agent).await;
        let url = chat_ws_url(&self.ws(), &s.session_id, &s.session_token, None);
        let client = WsClient::connect(&url).await;
        (s, client)
    }
}

/// The WebSocket URL of session `sid` at ws-gateway `ws` (`ws://...`), with its `token` and,
/// to resume, the last event id the client saw.
pub fn chat_ws_url(ws: &str, sid: &str, token: &str, last_event_id: Option<&str>) -> String {
    let mut url = format!("{ws}/ws/chat/{sid}?token={token}");
    if let Some(id) = last_event_id {
        url.push_str(&format!("&last_event_id={id}"));
    }
    url
}

/// A chat session opened over REST (`POST /api/v1/chat/init`), as a browser opens one.
#[derive(Clone, Debug)]
pub struct RestSession {
    pub id: String,
    pub token: String,
    /// What edge-api answered the init with, for tests that check it.
    pub status: reqwest::StatusCode,
    pub init: Json,
}

impl RestSession {
    /// Opens a session of `agent` at edge-api `api` (`http://...`).
    pub async fn open(api: &str, agent: &str) -> RestSession {
        let res = reqwest::Client::new()
            .post(format!("{api}/api/v1/chat/init"))
            .json(&serde_json::json!({"agent_id": agent}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {api}/api/v1/chat/init: {e}"));
        let status = res.status();
        let init: Json = res.json().await.expect("init answer is JSON");
        let field = |name: &str| {
            init[name]
                .as_str()
                .unwrap_or_else(|| panic!("no {name} in the init answer ({status}): {init}"))
                .to_owned()
        };
        RestSession {
            id: field("session_id"),
            token: field("session_token"),
            status,
            init,
        }
    }

    /// This session's WebSocket URL at ws-gateway `ws` (see [`chat_ws_url`]).
    pub fn ws_url(&self, ws: &str, last_event_id: Option<&str>) -> String {
        chat_ws_url(ws, &self.id, &self.token, last_event_id)
    }

    /// Connects a WebSocket client to this session at ws-gateway `ws` (`ws://...`).
    pub async fn connect(&self, ws: &str) -> WsClient {
        WsClient::connect(&self.ws_url(ws, None)).await
    }

    /// `POST {api}/api/v1/chat/{id}/task` of `message` with this session's token, to send as
    /// is or with more headers.
    pub fn task_request(
        &self,
        http: &reqwest::Client,
        api: &str,
        message: &str,
    ) -> reqwest::RequestBuilder {
        http.post(format!("{api}/api/v1/chat/{}/task", self.id))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({"message": message}))
    }

    /// Sends `req` (a [`RestSession::task_request`]); checks edge-api accepted it (202) and
    /// returns the task id.
    pub async fn submit_request(req: reqwest::RequestBuilder) -> String {
        let res = req.send().await.expect("submit over REST");
        assert_eq!(res.status(), 202);
        let body: Json = res.json().await.expect("submit answer is JSON");
        body["task_id"].as_str().unwrap().to_owned()
    }

    /// Submits `message` at edge-api `api`, which must accept it; returns the task id.
    pub async fn submit(&self, api: &str, message: &str) -> String {
        Self::submit_request(self.task_request(&reqwest::Client::new(), api, message)).await
    }
}

/// The echo agent.
pub fn echo_agent() -> AgentConfig {
    AgentConfig {
        id: AGENT.into(),
        name: "Echo agent".into(),
        pool: fleet::agent::DEFAULT_POOL.into(),
        role: None,
        tenant_id: None,
        timeout_secs: None,
        params: Json::Null,
    }
}

/// Follows session `sid`'s log (blocking reads on a connection of its own) until the final
/// event of `tid`; returns that task's events.
pub async fn read_task_events(
    client: &Client,
    keys: &Keys,
    sid: &str,
    tid: &str,
    within: Duration,
) -> Vec<ServerMessage> {
    let reader = client.clone_new();
    reader.init().await.expect("reader connection");
    let deadline = tokio::time::Instant::now() + within;
    let mut last = StreamId::ZERO.to_string();
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            !left.is_zero(),
            "no final event for task {tid} within {within:?}; got {out:?}"
        );
        let reply: Value = reader
            .xread(
                Some(1000),
                Some(left.as_millis().min(1000) as u64),
                keys.session_events(sid),
                last.as_str(),
            )
            .await
            .expect("xread session log");
        for entry in parse_read(reply)
            .expect("read reply")
            .into_iter()
            .flat_map(|(_, e)| e)
        {
            last = entry.id.to_string();
            let msg: ServerMessage =
                serde_json::from_str(entry.get_str("d").unwrap_or_default()).expect("logged JSON");
            if msg.task_id.as_deref() == Some(tid) {
                let done = matches!(msg.message_type.as_str(), "chat_response" | "chat_error");
                out.push(msg);
                if done {
                    let _ = reader.quit().await;
                    return out;
                }
            }
        }
    }
}

/// Starts Fleet binary `name` as a process on `redis` / `prefix` with `extra` arguments.
pub fn spawn_binary(
    name: &str,
    redis: &str,
    prefix: &str,
    extra: &[&str],
) -> fleet_test_support::FleetProcess {
    let mut args = common_args(redis, prefix);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fleet_test_support::FleetProcess::spawn(name, &args, &[])
}

/// Sum of a field of several session hashes (e.g. `tasks_completed`).
pub async fn sum_session_field(client: &Client, keys: &Keys, sids: &[String], field: &str) -> i64 {
    let pipeline = client.pipeline();
    for sid in sids {
        let _: () = pipeline
            .hget(keys.session(sid), field)
            .await
            .expect("queue hget");
    }
    let values: Vec<Option<i64>> = pipeline.all().await.expect("hget pipeline");
    values.into_iter().flatten().sum()
}

/// Checks that a session log shows every task of `tids` streaming its chunks once each, in
/// order, then one final response; returns the number of chunks seen.
pub fn assert_clean_streams(log: &[fleet::session_log::LogEntry], tids: &[String]) -> usize {
    use std::collections::HashMap;
    let mut next_index: HashMap<&str, u64> = HashMap::new();
    let mut finished: HashMap<&str, bool> = HashMap::new();
    let mut chunks = 0;
    for e in log {
        let m: ServerMessage = serde_json::from_str(&e.json).expect("logged JSON");
        let Some(tid) = tids
            .iter()
            .find(|t| Some(t.as_str()) == m.task_id.as_deref())
        else {
            continue;
        };
        assert!(
            !finished.get(tid.as_str()).copied().unwrap_or(false),
            "event after the final one for {tid}: {m:?}"
        );
        match m.message_type.as_str() {
            "chat_streaming" => {
                let want = next_index.entry(tid).or_insert(0);
                assert_eq!(
                    m.data["chunk_index"].as_u64(),
                    Some(*want),
                    "chunk out of order or repeated for {tid}"
                );
                *want += 1;
                chunks += 1;
            }
            "chat_response" => {
                finished.insert(tid, true);
            }
            other => panic!("unexpected {other} for {tid}: {m:?}"),
        }
    }
    for tid in tids {
        assert!(
            finished.get(tid.as_str()).copied().unwrap_or(false),
            "task {tid} has no final response"
        );
    }
    chunks
}

/// A WebSocket chat client, as a browser would hold one.
pub struct WsClient {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    /// Every server message received, in order.
    pub received: Vec<ServerMessage>,
}

impl WsClient {
    /// Connects to `url` (e.g. the `websocket_url` edge-api handed out).
    pub async fn connect(url: &str) -> WsClient {
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        WsClient {
            socket,
            received: Vec::new(),
        }
    }

    /// Sends a `chat_message`.
    pub async fn send_chat(&mut self, message: &str) {
        use futures::SinkExt;
        let frame =
            serde_json::json!({"message_type": "chat_message", "data": {"message": message}});
        self.socket
            .send(tokio_tungstenite::tungstenite::Message::text(
                frame.to_string(),
            ))
            .await
            .expect("send chat_message");
    }

    /// The next server message (panics after `within`). Control frames (the gateway's pings)
    /// do not count as messages and do not extend the wait.
    pub async fn next(&mut self, within: Duration) -> ServerMessage {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no message within {within:?}; got {:?}", self.received))
                .expect("socket open")
                .expect("frame");
            if let tokio_tungstenite::tungstenite::Message::Text(t) = frame {
                let m: ServerMessage = serde_json::from_str(&t).expect("server JSON");
                self.received.push(m.clone());
                return m;
            }
        }
    }

    /// Reads until `done` says so; returns the messages read meanwhile.
    pub async fn until(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&ServerMessage) -> bool,
    ) -> Vec<ServerMessage> {
        let mut out = Vec::new();
        loop {
            let m = self.next(within).await;
            let stop = done(&m);
            out.push(m);
            if stop {
                return out;
            }
        }
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// True for the final event of task `tid`.
pub fn is_final_of(m: &ServerMessage, tid: &str) -> bool {
    m.task_id.as_deref() == Some(tid)
        && matches!(m.message_type.as_str(), "chat_response" | "chat_error")
}

/// Checks what one client received: per task, chunks with indexes 0, 1, 2, ... then one final
/// response, no event id twice, event ids increasing. Returns the number of chunks.
pub fn assert_clean_delivery(received: &[ServerMessage], tids: &[String]) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut last: Option<StreamId> = None;
    for m in received {
        if let Some(id) = &m.event_id {
            let id: StreamId = id.parse().expect("event id");
            assert!(seen.insert(id), "event {id} delivered twice");
            assert!(
                last.is_none_or(|l| id > l),
                "event {id} out of order after {last:?}"
            );
            last = Some(id);
        }
    }
    let as_log: Vec<fleet::session_log::LogEntry> = received
        .iter()
        .filter(|m| m.event_id.is_some())
        .map(|m| fleet::session_log::LogEntry {
            event_id: m
                .event_id
                .as_deref()
                .unwrap_or_default()
                .parse()
                .unwrap_or_default(),
            prev: None,
            task_id: m.task_id.clone().unwrap_or_default(),
            json: serde_json::to_string(m).expect("json"),
        })
        .collect();
    assert_clean_streams(&as_log, tids)
}

impl WsClient {
    /// Reads until the server closes the connection; returns its close code (text messages
    /// received meanwhile are kept in `received`).
    pub async fn close_code(&mut self, within: Duration) -> Option<u16> {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let frame = tokio::time::timeout(within, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("not closed within {within:?}"));
            match frame {
                Some(Ok(Message::Close(c))) => return c.map(|c| u16::from(c.code)),
                Some(Ok(Message::Text(t))) => {
                    if let Ok(m) = serde_json::from_str(&t) {
                        self.received.push(m);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }
}
