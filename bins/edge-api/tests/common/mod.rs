//! What every edge-api test shares: the app running in-process on a free port over the test
//! process's own redis-server, under a key prefix of its own, and readers of what it wrote.

#![allow(dead_code)] // each test binary uses its own part of this

use std::time::Duration;

use clap::Parser;
use edge_api::{App, Config};
use fleet::envelope::{Envelope, ExecMessage, ExecRequest, TaskCommand};
use fleet::session::TokenSigner;
use fleet::stream::entry::parse_entries;
use fred::prelude::*;
use reqwest::StatusCode;
use serde_json::{Value as Json, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The `FLEET_SECRET` of every test app (32 bytes).
pub const SECRET: &str = "test-secret-0123456789abcdefghij";

/// An agent every chat test opens its sessions with.
pub const AGENT: &str = "demo";

/// The arguments of a test app, before the extra ones of a test.
pub fn args(prefix: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "edge-api",
        "--redis-url",
        &fleet_test_support::redis(),
        "--prefix",
        prefix,
        "--http-addr",
        "127.0.0.1:0",
    ]
    .map(str::to_owned)
    .into();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

pub struct TestApp {
    pub base: String,
    /// Where its gRPC server listens.
    pub grpc_addr: std::net::SocketAddr,
    pub http: reqwest::Client,
    pub redis: Client,
    pub keys: fleet::Keys,
    pub prefix: String,
    pub shutdown: CancellationToken,
    pub server: JoinHandle<anyhow::Result<()>>,
}

/// Builds and runs edge-api with `--secret SECRET` and `extra` arguments.
pub async fn spawn_app(extra: &[&str]) -> TestApp {
    let mut with_secret = vec!["--secret", SECRET];
    with_secret.extend_from_slice(extra);
    spawn_app_with(&with_secret).await
}

/// Builds and runs edge-api with exactly `extra` arguments on top of Redis, prefix and address.
pub async fn spawn_app_with(extra: &[&str]) -> TestApp {
    let prefix = fleet_test_support::prefix();
    let cfg = Config::try_parse_from(args(&prefix, extra)).expect("test config parses");
    let app = App::build(cfg).await.expect("edge-api builds");
    let base = format!("http://{}", app.http_addr());
    let grpc_addr = app.grpc_addr();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run(shutdown.clone()));
    let redis = fleet::redis::connect(&fleet_test_support::redis())
        .await
        .expect("test redis client");
    TestApp {
        base,
        grpc_addr,
        http: reqwest::Client::new(),
        redis,
        keys: fleet::Keys::new(&prefix),
        prefix,
        shutdown,
        server,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A gRPC channel to the app (HTTP/2), and an `OrchestratorService` client on it.
    pub async fn grpc_channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc_addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect gRPC")
    }

    pub async fn grpc(
        &self,
    ) -> fleet_proto::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient<
        tonic::transport::Channel,
    > {
        fleet_proto::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient::new(
            self.grpc_channel().await,
        )
    }

    /// Stops the app and checks it stopped cleanly and promptly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.server)
            .await
            .expect("run() returns within 5s of the cancel")
            .expect("run() does not panic")
            .expect("run() returns Ok");
    }

    /// Creates agent `id` through the API (open: no API keys configured).
    pub async fn put_agent(&self, id: &str) {
        let resp = self
            .http
            .put(self.url(&format!("/api/v1/agents/{id}")))
            .json(&json!({"name": format!("Agent {id}")}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    }

    /// Opens a session with [`AGENT`] (creating it first); returns the init answer.
    pub async fn open_session(&self) -> Session {
        self.put_agent(AGENT).await;
        let resp = self
            .http
            .post(self.url("/api/v1/chat/init"))
            .json(&json!({"agent_id": AGENT}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        let body: Json = resp.json().await.unwrap();
        Session {
            id: body["session_id"].as_str().unwrap().to_owned(),
            token: body["session_token"].as_str().unwrap().to_owned(),
            first_task: body["task_id"].as_str().unwrap().to_owned(),
            init: body,
        }
    }

    /// A request with `Authorization: Bearer <token>`.
    pub fn authed(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
    ) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(token)
    }

    /// `POST /api/v1/chat/{sid}/task` with `body`.
    pub async fn submit(&self, s: &Session, body: Json) -> reqwest::Response {
        self.authed(
            reqwest::Method::POST,
            &format!("/api/v1/chat/{}/task", s.id),
            &s.token,
        )
        .json(&body)
        .send()
        .await
        .unwrap()
    }

    /// `GET path` with `token`, as JSON (asserting 200).
    pub async fn get_json(&self, path: &str, token: &str) -> Json {
        let resp = self
            .authed(reqwest::Method::GET, path, token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.json().await.unwrap()
    }

    /// The session's status as JSON (asserting 200).
    pub async fn status(&self, s: &Session) -> Json {
        self.get_json(&format!("/api/v1/chat/session/{}/status", s.id), &s.token)
            .await
    }

    /// `GET /api/v1/chat/{sid}/tasks/{tid}` as JSON (asserting 200).
    pub async fn task_json(&self, s: &Session, tid: &str) -> Json {
        self.get_json(&format!("/api/v1/chat/{}/tasks/{tid}", s.id), &s.token)
            .await
    }

    /// Tasks submitted in the session so far, per its status.
    pub async fn tasks_total(&self, s: &Session) -> i64 {
        self.status(s).await["totals"]["tasks"].as_i64().unwrap()
    }

    /// Entries on `<prefix>:tasks`.
    pub async fn tasks_stream_len(&self) -> u64 {
        self.stream_len(&self.keys.tasks()).await
    }

    /// Entries on `stream`.
    pub async fn stream_len(&self, stream: &str) -> u64 {
        self.redis.xlen(stream).await.unwrap()
    }

    /// Every command on `<prefix>:tasks`, decoded.
    pub async fn task_commands(&self) -> Vec<TaskCommand> {
        let raw: Value = self
            .redis
            .xrange(self.keys.tasks(), "-", "+", None)
            .await
            .unwrap();
        parse_entries(raw)
            .unwrap()
            .iter()
            .map(|e| Envelope::<TaskCommand>::from_fields(&e.fields).unwrap().msg)
            .collect()
    }

    /// Every execution request on `<prefix>:exec:<pool>`, decoded.
    pub async fn exec_requests(&self, pool: &str) -> Vec<ExecRequest> {
        let raw: Value = self
            .redis
            .xrange(self.keys.exec(pool), "-", "+", None)
            .await
            .unwrap();
        parse_entries(raw)
            .unwrap()
            .iter()
            .map(|e| {
                let ExecMessage::Request(r) = Envelope::from_fields(&e.fields).unwrap().msg;
                r
            })
            .collect()
    }

    /// Opens a TCP connection, writes `request` (raw HTTP/1.1) and reads the head of the answer
    /// (status line and headers, lowercased), without sending anything more. Panics if no
    /// answer comes within 5 s. Returns the connection, for what the test sends next.
    pub async fn raw_answer_head(&self, request: &str) -> (tokio::net::TcpStream, String) {
        use tokio::io::AsyncWriteExt;
        let addr = self.base.trim_start_matches("http://");
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let head = read_head(&mut tcp).await;
        (tcp, head)
    }

    /// A signer with the test secret, to forge valid tokens for any session id.
    pub fn signer(&self) -> TokenSigner {
        TokenSigner::new(SECRET.as_bytes())
    }
}

/// An open session.
pub struct Session {
    pub id: String,
    pub token: String,
    /// The task id `init` reserved.
    pub first_task: String,
    pub init: Json,
}

/// Asserts an error answer: its status, `error.code` and a non-empty `error.message`.
/// Returns the message.
pub async fn assert_error(resp: reqwest::Response, status: StatusCode, code: &str) -> String {
    assert_eq!(resp.status(), status, "status of {}", resp.url());
    assert!(
        resp.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "error answers are JSON"
    );
    let body: Json = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap().to_owned();
    assert!(!message.is_empty(), "{body}");
    message
}

/// Reads the head of one HTTP/1.1 answer from `tcp` (status line and headers, lowercased); panics
/// if the connection closes first or nothing comes within 5 s.
pub async fn read_head(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            let n = tcp.read(&mut byte).await.expect("read the answer");
            assert!(
                n > 0,
                "closed without an answer: {}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("an answer within 5 s");
    String::from_utf8_lossy(&head).to_lowercase()
}
