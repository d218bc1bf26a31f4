//! Test harness: a real `redis-server`, a fresh key prefix, the gateway in-process on port 0,
//! session events produced the way the callback-worker does, and WebSocket / SSE clients over
//! real sockets.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use fleet::Keys;
use fleet::agent::{AgentConfig, AgentStore};
use fleet::events::ServerMessage;
use fleet::session::{Backpressure, Chat, ChatLimits, InitSession, SubmitMessage, TokenSigner};
use fleet::session_log::{FanoutConfig, LoggedEvent, SessionLog};
use fleet::task::{Retention, TaskOp, TaskStore};
use fred::prelude::*;
use futures::{SinkExt, StreamExt};
use serde_json::Value as Json;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use ws_gateway::{App, Config};

/// The token secret of every test gateway.
pub const SECRET: &str = "test-secret-0123456789abcdef";
/// How long any single expected thing may take.
pub const WAIT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Redis, a prefix, and the chat API over them (what edge-api and the callback-worker use).
pub struct Fleet {
    pub redis_url: String,
    pub prefix: String,
    pub keys: Keys,
    pub client: Client,
    pub chat: Chat,
    pub log: SessionLog,
}

/// A gateway running in-process.
pub struct Gateway {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    pub run: JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    pub fn ws_url(&self, sid: &str) -> String {
        format!("ws://{}/ws/chat/{sid}", self.http)
    }

    pub fn sse_url(&self, sid: &str) -> String {
        format!("http://{}/sse/chat/{sid}", self.http)
    }

    /// Cancels the token and waits for `run` to return.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.run)
            .await
            .expect("run returns after shutdown")
            .expect("run does not panic")
    }

    /// The gateway's Prometheus text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }
}

/// A chat session and its token.
pub struct Session {
    pub sid: String,
    pub token: String,
}

impl Fleet {
    /// The ws-gateway binary as a process of its own, on ports the system chooses, once it
    /// listens; with its client-facing address. For what only the process shows: its memory,
    /// its limits.
    pub async fn gateway_process(&self) -> (fleet_test_support::FleetProcess, SocketAddr) {
        let mut gw = fleet_test_support::FleetProcess::spawn(
            "ws-gateway",
            &[],
            &[
                ("REDIS_URL", self.redis_url.clone()),
                ("FLEET_PREFIX", self.prefix.clone()),
                ("FLEET_SECRET", SECRET.to_owned()),
                ("FLEET_HTTP_ADDR", "127.0.0.1:0".to_owned()),
                ("FLEET_ADMIN_ADDR", "127.0.0.1:0".to_owned()),
            ],
        );
        let http = gw.listening("http", WAIT).await;
        (gw, http)
    }

    pub async fn new() -> Fleet {
        Fleet::on(fleet_test_support::redis()).await
    }

    /// A fleet on the Redis at `redis_url` (a test that pauses or restarts Redis brings its own).
    pub async fn on(redis_url: String) -> Fleet {
        let prefix = fleet_test_support::prefix();
        let keys = Keys::new(&prefix);
        let client = fleet::redis::connect(&redis_url).await.expect("redis");
        let agents = AgentStore::new(client.clone(), keys.clone());
        agents
            .put(&AgentConfig {
                id: "demo".into(),
                name: "Demo".into(),
                pool: "default".into(),
                role: None,
                tenant_id: None,
                timeout_secs: None,
                params: Json::Null,
            })
            .await
            .expect("put agent");
        let chat = Chat {
            tasks: TaskStore::new(client.clone(), keys.clone(), Retention::default()),
            agents,
            tokens: TokenSigner::new(SECRET.as_bytes()),
            limits: ChatLimits::default(),
            backpressure: Backpressure::default(),
        };
        let log = SessionLog::new(client.clone(), keys.clone(), FanoutConfig::default());
        Fleet {
            redis_url,
            prefix,
            keys,
            client,
            chat,
            log,
        }
    }

    /// The gateway's config for this fleet, with `extra` flags.
    pub fn config(&self, extra: &[&str]) -> Config {
        let mut args = vec![
            "ws-gateway",
            "--redis-url",
            &self.redis_url,
            "--prefix",
            &self.prefix,
            "--secret",
            SECRET,
            "--http-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--shutdown-grace-secs",
            "5",
        ];
        args.extend_from_slice(extra);
        Config::try_parse_from(args).expect("gateway config")
    }

    pub async fn gateway(&self) -> Gateway {
        self.gateway_with(&[]).await
    }

    pub async fn gateway_with(&self, extra: &[&str]) -> Gateway {
        let app = App::build(self.config(extra)).await.expect("build gateway");
        let (http, admin) = (app.http_addr(), app.admin_addr());
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(app.run(shutdown.clone()));
        Gateway {
            http,
            admin,
            shutdown,
            run,
        }
    }

    pub async fn session(&self) -> Session {
        let s = self
            .chat
            .init_session(InitSession {
                agent_id: "demo".into(),
                ..Default::default()
            })
            .await
            .expect("init session");
        Session {
            sid: s.session_id,
            token: s.session_token,
        }
    }

    /// Submits a message as a task; returns its id.
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
            .expect("submit")
            .task_id
    }

    /// Applies `ops` to the session like the callback-worker, and writes their fan-out when
    /// `fanout` (leaving it out simulates a lost fan-out entry).
    pub async fn emit(&self, sid: &str, ops: &[TaskOp], fanout: bool) -> Vec<LoggedEvent> {
        let applied = self.chat.tasks.apply(sid, ops).await.expect("apply");
        assert!(
            !applied.events.is_empty(),
            "ops appended no event: {applied:?}"
        );
        if fanout {
            self.log
                .publish_applied(sid, &applied, false)
                .await
                .expect("fan-out");
        }
        applied.events
    }

    /// Writes a nudge: gateways read the session's log up to `event_id`.
    /// (What the callback-worker writes for a redelivered callback that appended nothing.)
    pub async fn nudge(&self, sid: &str, event_id: &str) {
        let nothing_new = fleet::task::Applied {
            last_event_id: event_id.to_owned(),
            ..Default::default()
        };
        self.log
            .publish_applied(sid, &nothing_new, true)
            .await
            .expect("nudge");
    }

    /// Emits chunk `seq` (1-based) of task `tid`, with its fan-out.
    pub async fn chunk(&self, sid: &str, tid: &str, seq: u32, content: &str) -> LoggedEvent {
        self.emit(sid, &[chunk(sid, tid, seq, content)], true)
            .await
            .remove(0)
    }
}

/// A `chunk` callback op at `seq` (1-based).
pub fn chunk(sid: &str, tid: &str, seq: u32, content: &str) -> TaskOp {
    TaskOp::ordered(
        "chunk",
        tid,
        1,
        seq,
        ServerMessage::streaming(sid, tid, seq, content, seq - 1).to_json(),
    )
}

/// The final `result` callback op at `seq`.
pub fn result(sid: &str, tid: &str, seq: u32, content: &str) -> TaskOp {
    let mut op = TaskOp::ordered(
        "result",
        tid,
        1,
        seq,
        ServerMessage::response(sid, tid, seq, content, &Json::Null).to_json(),
    );
    op.content = Some(content.to_owned());
    op
}

// ---- WebSocket client ----

/// Opens a WebSocket to `url` (the token and resume point are in its query, if any).
pub async fn ws_connect(url: &str) -> Ws {
    ws_connect_request(url, None).await
}

/// Opens a WebSocket with `Authorization: Bearer <bearer>`.
pub async fn ws_connect_request(url: &str, bearer: Option<&str>) -> Ws {
    let mut req = url.into_client_request().expect("ws request");
    if let Some(token) = bearer {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("ws connect in time")
        .expect("ws connect");
    ws
}

pub fn ws_url(gw: &Gateway, s: &Session, last_event_id: Option<&str>) -> String {
    let mut url = format!("{}?token={}", gw.ws_url(&s.sid), s.token);
    if let Some(last) = last_event_id {
        url.push_str("&last_event_id=");
        url.push_str(last);
    }
    url
}

/// The next JSON message; panics on a close or after [`WAIT`].
pub async fn recv_json(ws: &mut Ws) -> Json {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("the socket is open")
            .expect("a readable message");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON message"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Reads until the server's close frame; returns its code and reason.
pub async fn recv_close(ws: &mut Ws) -> (u16, String) {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a close in time");
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) => panic!("close without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket failed before a close frame: {e}"),
            None => panic!("socket ended without a close frame"),
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// Sends a ping message and expects the `pong` as the very next message.
pub async fn ping_pong(ws: &mut Ws) {
    send_text(ws, r#"{"message_type":"ping"}"#).await;
    let pong = recv_json(ws).await;
    assert_eq!(pong["message_type"], "pong", "{pong}");
}

/// Receives `n` messages and returns them.
pub async fn recv_n(ws: &mut Ws, n: usize) -> Vec<Json> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(recv_json(ws).await);
    }
    out
}

/// The `event_id`s of `msgs`.
pub fn event_ids(msgs: &[Json]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["event_id"].as_str().expect("event_id").to_owned())
        .collect()
}

// ---- SSE client ----

/// A Server-Sent Events stream read over a real socket.
pub struct SseStream {
    res: reqwest::Response,
    buf: String,
}

/// One SSE event: its `id` and its `data`.
#[derive(Debug)]
pub struct SseEvent {
    pub id: Option<String>,
    pub data: Json,
}

impl SseStream {
    pub async fn open(url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = reqwest::Client::new().get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        tokio::time::timeout(WAIT, req.send())
            .await
            .expect("SSE response in time")
            .expect("SSE response")
    }

    pub fn new(res: reqwest::Response) -> Self {
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        SseStream {
            res,
            buf: String::new(),
        }
    }

    /// The next event with data (comments skipped); `None` when the stream ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut id = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    } else if line.starts_with("event:") {
                        panic!("SSE frames carry no event name: {block:?}");
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let data = serde_json::from_str(&data).expect("SSE data is JSON");
                return Some(SseEvent { id, data });
            }
            let chunk = tokio::time::timeout(WAIT, self.res.chunk())
                .await
                .expect("SSE data in time")
                .expect("SSE body readable")?;
            self.buf
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    pub async fn next_n(&mut self, n: usize) -> Vec<SseEvent> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await.expect("an SSE event"));
        }
        out
    }
}
