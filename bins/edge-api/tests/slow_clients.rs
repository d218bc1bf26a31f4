//! Clients that stall, against the REST port, with the read timeout (`--http-read-timeout-secs`)
//! set low: a connection that sends nothing, or half its request's headers, is closed by the
//! server, while other clients are served; a request whose body stalls gets 408 in the JSON
//! error shape and its connection is closed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::{Value as Json, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The read timeout of these tests' apps.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a test waits for the server to close a stalled client: well above [`READ_TIMEOUT`].
const CLOSE_BOUND: Duration = Duration::from_secs(15);

async fn spawn_app_reading_within_1s() -> TestApp {
    spawn_app(&["--http-read-timeout-secs", "1"]).await
}

/// A client that connects to the app's REST port, sends `bytes` and then nothing more.
async fn stalled(app: &TestApp, bytes: &[u8]) -> (TcpStream, Instant) {
    let addr = app.base.trim_start_matches("http://").parse().unwrap();
    fleet_test_support::stalled_client(addr, bytes).await
}

/// What the server sent on `tcp` before closing it, and when, counted from `since`.
async fn until_closed(tcp: &mut TcpStream, since: Instant) -> (String, Duration) {
    fleet_test_support::until_closed(tcp, since, CLOSE_BOUND).await
}

#[tokio::test]
async fn clients_that_send_nothing_or_half_their_headers_are_closed_while_others_are_served() {
    let app = spawn_app_reading_within_1s().await;
    let (mut silent, silent_since) = stalled(&app, b"").await;
    let (mut half, half_since) = stalled(
        &app,
        b"POST /api/v1/chat/init HTTP/1.1\r\nhost: edge\r\ncontent-type: appli",
    )
    .await;

    // Meanwhile, well-behaved clients are served on connections of their own.
    app.put_agent(AGENT).await;
    let resp = app
        .http
        .post(app.url("/api/v1/chat/init"))
        .json(&json!({"agent_id": AGENT}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let served = Instant::now();

    for (what, tcp, since) in [
        ("a client that sent nothing", &mut silent, silent_since),
        ("a client that sent half its headers", &mut half, half_since),
    ] {
        let (answer, after) = until_closed(tcp, since).await;
        assert_eq!(answer, "", "{what} is closed without an answer");
        assert!(
            after >= READ_TIMEOUT,
            "{what} is closed after the read timeout, not {after:?}"
        );
        assert!(
            served < since + after,
            "the other clients were served while {what} held its connection"
        );
    }

    // On a connection of its own: the one the client pooled, idle since, is being closed by the
    // server about now (the read timeout bounds a keep-alive connection's idle time too).
    let metrics = reqwest::Client::new()
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let closed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fleet_http_read_timeouts_total "))
        .unwrap_or_else(|| panic!("fleet_http_read_timeouts_total in\n{metrics}"))
        .parse()
        .unwrap();
    assert!(closed >= 2.0, "both stalled connections counted: {closed}");
    app.stop().await;
}

#[tokio::test]
async fn a_rest_body_that_stalls_gets_408_json_and_its_connection_is_closed() {
    let mut app = spawn_app_reading_within_1s().await;
    let session = app.open_session().await;
    let init = r#"{"agent_id":"demo"}"#;
    let submit = r#"{"message":"hello"}"#;
    for (what, request) in [
        (
            "a Content-Length body to init",
            format!(
                "POST /api/v1/chat/init HTTP/1.1\r\nhost: edge\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
                init.len(),
                &init[..8]
            ),
        ),
        (
            "a chunked body to submit",
            format!(
                "POST /api/v1/chat/{}/task HTTP/1.1\r\nhost: edge\r\n\
                 authorization: Bearer {}\r\ncontent-type: application/json\r\n\
                 transfer-encoding: chunked\r\n\r\n8\r\n{}\r\n",
                session.id,
                session.token,
                &submit[..8]
            ),
        ),
    ] {
        let (mut tcp, since) = stalled(&app, request.as_bytes()).await;
        let (answer, after) = until_closed(&mut tcp, since).await;
        assert!(
            after >= READ_TIMEOUT,
            "{what}: answered after the read timeout, not {after:?}"
        );
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{what}: an answer, got {answer:?}"));
        let head = head.to_lowercase();
        assert!(head.starts_with("http/1.1 408"), "{what}: {head}");
        assert!(
            head.contains("content-type: application/json"),
            "{what}: {head}"
        );
        assert!(head.contains("connection: close"), "{what}: {head}");
        let body: Json = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["code"], "request_timeout", "{what}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("1 s")),
            "{what}: {body}"
        );
    }
    // The submit whose body stalled wrote nothing (asked on a new connection: the pooled one
    // was closed for its idleness).
    app.http = reqwest::Client::new();
    assert_eq!(app.tasks_total(&session).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_grpc_client_that_sends_nothing_is_closed_while_grpc_calls_are_served() {
    let app = spawn_app_reading_within_1s().await;
    let since = Instant::now();
    let mut silent = TcpStream::connect(app.grpc_addr).await.unwrap();
    let mut half_preface = TcpStream::connect(app.grpc_addr).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();

    // Meanwhile, a gRPC client is served on a connection of its own.
    let mut grpc = app.grpc().await;
    let status = grpc
        .get_status(fleet_proto::orchestrator::v1::GetStatusRequest {})
        .await
        .expect("GetStatus is served");
    drop(status);
    let served = Instant::now();

    for (what, tcp) in [
        ("a gRPC client that sent nothing", &mut silent),
        (
            "a gRPC client that sent half the HTTP/2 preface",
            &mut half_preface,
        ),
    ] {
        let (answer, after) = until_closed(tcp, since).await;
        assert_eq!(answer, "", "{what} is closed without an answer");
        assert!(after >= READ_TIMEOUT, "{what} closed after {after:?}");
        assert!(
            served < since + after,
            "others were served while {what} waited"
        );
    }
    app.stop().await;
}
